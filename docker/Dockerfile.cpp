# qmedsam-cpp image: the C++ predictor, the OpenVINO runtime libraries from the openvino wheel, OpenCV and
# libzip from Debian (built against in the first stage, their shared libraries copied), and the shipped int8
# model; no compiler, no package installs and no Python needed at run time. Build from the repository root:
#   docker build -f docker/Dockerfile.cpp -t qmedsam-cpp:latest .
#   docker run --rm -v $PWD/inputs:/workspace/inputs:ro -v $PWD/outputs:/workspace/outputs qmedsam-cpp:latest
# Offline / behind a proxy: the openvino wheel in docker/wheelhouse and --build-arg PIP_ARGS="--no-index --find-links /wheels".
ARG BASE=python:3.11-slim-bookworm
ARG RUNTIME_BASE=debian:bookworm-slim

FROM ${BASE} AS build
ARG PIP_ARGS=""
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ make pkg-config libopencv-dev libzip-dev \
 && rm -rf /var/lib/apt/lists/*
COPY docker/wheelhouse/ /wheels/
RUN python3 -m venv /opt/ov && /opt/ov/bin/pip install --no-cache-dir ${PIP_ARGS} openvino==2026.4.1
COPY cpp/ /src/cpp/
COPY docker/trim-openvino.sh /src/docker/
COPY src/qmedsam/models/int8/ /src/src/qmedsam/models/int8/
RUN OV=/opt/ov/lib/python3.11/site-packages/openvino \
 && cmake -S /src/cpp -B /build -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/opt/qmedsam \
      -DOpenVINO_DIR=$OV/cmake -DCMAKE_INSTALL_RPATH=/opt/qmedsam/lib/openvino \
 && cmake --build /build -j"$(nproc)" \
 && cmake --install /build \
 && mkdir -p /opt/qmedsam/lib/openvino \
 && cp -a $OV/libs/. /opt/qmedsam/lib/openvino/ \
 && sh /src/docker/trim-openvino.sh /opt/qmedsam/lib/openvino \
 && mkdir -p /opt/qmedsam/lib/deps \
 && LD_LIBRARY_PATH=/opt/qmedsam/lib/openvino ldd /opt/qmedsam/bin/qmedsam-cpp \
    | awk '$3 ~ /^\// && $3 !~ /openvino/ {print $3}' \
    | grep -v -E '/lib(c|m|dl|rt|pthread|stdc\+\+|gcc_s)\.so|/ld-linux' \
    | xargs -r -I{} cp -L {} /opt/qmedsam/lib/deps/

FROM ${RUNTIME_BASE}
# No packages at run time: OpenCV, libzip and their libraries were copied from the build stage (ldd).
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin qmedsam
COPY --from=build /opt/qmedsam /opt/qmedsam
ENV QMEDSAM_CACHE=/tmp/qmedsam-cache \
    LD_LIBRARY_PATH=/opt/qmedsam/lib/openvino:/opt/qmedsam/lib/deps
WORKDIR /workspace
USER qmedsam
ENTRYPOINT ["/opt/qmedsam/bin/qmedsam-cpp"]
CMD ["-i", "/workspace/inputs", "-o", "/workspace/outputs"]
