"""The Docker images, checked without a Docker engine (CI has none): the key properties of both Dockerfiles,
the Python image's pip line resolving without torch in a fresh venv, and predict.sh against a local install
that cannot import torch. (Built and run for real where an engine exists: `make docker docker-cpp`.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
from test_shipped_model import BLOCK_TORCH

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions per build stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def _instruction(stage: list[str], keyword: str) -> list[str]:
    return [line for line in stage if line.split()[0].upper() == keyword]


def test_python_dockerfile_is_slim_non_root_torch_free_and_runs_predict_sh():
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in text
    build, runtime = stages(DOCKER / "Dockerfile")
    pip_lines = [line for line in _instruction(build, "RUN") if "pip install" in line]
    installed = [line.split("pip install", 1)[1] for line in pip_lines]
    assert pip_lines and all(re.findall(r"\[[^\]]*\]", line) in ([], ["[serve]"]) for line in installed)  # serve only
    assert "torch" not in " ".join(pip_lines).replace("find_spec('torch')", "")  # only the check
    users = _instruction(runtime, "USER")
    assert users and users[-1].split()[1] not in ("root", "0")
    assert any("predict.sh" in line for line in _instruction(runtime, "COPY"))
    assert _instruction(runtime, "CMD") == ['CMD ["predict.sh"]']
    assert any("QMEDSAM_CACHE=/tmp/" in line for line in _instruction(runtime, "ENV"))
    assert not any("src/" in line for line in _instruction(runtime, "COPY"))  # only the built venv, no sources


def test_cpp_dockerfile_is_multi_stage_with_a_slim_non_root_runtime():
    build, runtime = stages(DOCKER / "Dockerfile.cpp")
    assert any("cmake --install" in line for line in _instruction(build, "RUN"))
    assert any("openvino==" in line for line in _instruction(build, "RUN"))
    assert (
        runtime[0] == "FROM ${RUNTIME_BASE}"
        and "ARG RUNTIME_BASE=debian:bookworm-slim" in (DOCKER / "Dockerfile.cpp").read_text()
    )
    runtime_text = " ".join(runtime)
    assert "g++" not in runtime_text and "-dev" not in runtime_text  # no compilers or headers at run time
    assert _instruction(runtime, "USER")[-1].split()[1] not in ("root", "0")
    assert _instruction(runtime, "ENTRYPOINT") == ['ENTRYPOINT ["/opt/qmedsam/bin/qmedsam-cpp"]']
    # the model the binary defaults to is installed by cmake --install (CMakeLists: share/qmedsam/models/int8)
    assert "share/qmedsam/models/int8" in (ROOT / "cpp" / "CMakeLists.txt").read_text()


def test_dockerignore_sends_only_what_the_images_copy():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and {"!src/", "!cpp/", "!docker/", "!pyproject.toml"} <= set(lines)


def test_image_pip_line_resolves_without_torch_in_a_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    source = tmp_path / "src"  # what the image's build stage copies: pyproject.toml, README.md, src/
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    report = tmp_path / "report.json"
    run = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            f"{source}[serve]",  # the image's extra: the server for Slicer's nnInteractive client
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"qmedsam", "openvino", "numpy", "opencv-python-headless", "fastapi", "nninteractive-client"} <= names
    assert not names & {"torch", "brevitas", "nncf", "monai", "torchvision", "timm"}, sorted(names)


def test_predict_sh_against_a_local_install_without_torch(demo_dir, tmp_path):
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    shutil.copy(demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz", inputs)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(tmp_path / "site"),
        "INPUT_DIR": str(inputs),
        "OUTPUT_DIR": str(outputs),
        "TMPDIR": str(tmp_path),
    }
    env.pop("QMEDSAM_CACHE", None)
    run = subprocess.run([str(DOCKER / "predict.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "openvino-int8" in run.stderr  # the shipped int8 model, torch unavailable
    segs = np.load(outputs / "2D_CT_TotalSeg_0001.npz")["segs"]
    assert segs.shape == (101, 122) and segs.max() == 6
    assert (tmp_path / "qmedsam-cache" / "ov_cache").is_dir()  # OpenVINO's cache went to the writable place
    assert (outputs / "timing.csv").read_text().splitlines()[1].split(",")[5] == "ok"
