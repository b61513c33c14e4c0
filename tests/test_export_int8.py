"""Brevitas LiteMedSAM calibrated on real demo slices, exported through the CLI to an IR that runs in int8.

One calibration and one export per module (they are the slow parts); every test reads from them.
The NNCF comparison point is exported too (a few slices, it is the cheaper of the two).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qmedsam.commands.export import parity_samples_from
from qmedsam.export.int8 import INT8_PRECISIONS, int8_coverage, real_slices, verify_ir
from qmedsam.export.int8_parity import ParityThresholds, decompose_fake_quantize, ir_to_check, unit_parity
from qmedsam.export.parity import compare_engines
from qmedsam.inference.machine import cpu_flags, exact_int8_dot_products
from qmedsam.inference.ov_core import shared_core
from qmedsam.inference.runtime import OpenVINOEngine, TorchEngine, layer_precisions
from qmedsam.model.calibrate import calibrate, model_inputs
from qmedsam.model.quant import QuantSpec, load_litemedsam

SPEC_PATH = Path(__file__).parent.parent / "configs" / "quant" / "w8a8_per_channel.yaml"
CALIBRATION_SLICES = 1
# The fake-quant model vs the float one (mask Dice), on the small cases' parity slices after calibration alone.
# What the check protects is calibration working, not a particular float rounding: with activation scales
# left at their placeholders the agreement is 0.062; this test's calibration (1 slice + bias correction) gives
# 0.946 on an AMD EPYC (4 slices: 0.949; on the demo's 5 slices 0.946 vs 0.945, and 0.949 for 4 slices on an
# Intel Xeon, where float results differ from the EPYC's by ~0.012). 0.90 sits 0.05 (4x the cross-CPU spread)
# under the calibrated figure and far above a broken calibration.
MIN_AGREEMENT_WITH_FLOAT = 0.90
# OpenVINO int8 vs PyTorch fake-quant, whole pipeline: see qmedsam.export.int8_parity for why this is not 0.99.
MIN_PARITY_WITH_FAKE_QUANT = 0.90  # measured 0.965 (the reference vs its own float64 twin: 0.956)


@pytest.fixture(scope="module")
def spec() -> QuantSpec:
    return QuantSpec.from_yaml(SPEC_PATH)


@pytest.fixture(scope="module")
def parity_slices(small_cases_dir: Path):
    return parity_samples_from(small_cases_dir)


@pytest.fixture(scope="module")
def calibrated(spec: QuantSpec, demo_dir: Path):
    """Pretrained float weights, calibrated on training slices (not the parity slices' files' layout)."""
    model = load_litemedsam(spec)
    summary = calibrate(
        model, model_inputs(real_slices(demo_dir / "train", limit=CALIBRATION_SLICES)), bias_correction=True
    )
    return model, summary


@pytest.fixture(scope="module")
def quantized_checkpoint(calibrated, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "quantized.pt"
    torch.save(calibrated[0].state_dict(), path)
    return path


@pytest.fixture(scope="module")
def int8_dir(quantized_checkpoint: Path, small_cases_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`qmedsam export --quant SPEC --checkpoint QUANTIZED.pt`: a QAT-style checkpoint, no calibration. The
    export's own parity checks run on the small real cases (3 slices), as do the tests below."""
    from qmedsam.cli import main

    out = tmp_path_factory.mktemp("models") / "int8"
    argv = ["export", "--quant", str(SPEC_PATH), "--checkpoint", str(quantized_checkpoint)]
    argv += ["--parity-cases", str(small_cases_dir), "--out", str(out)]
    assert main(argv) == 0
    return out


def test_calibrated_fake_quant_is_close_to_float(calibrated, pretrained_model, parity_slices):
    """Before any training, calibration alone keeps masks close to the float model's on real slices."""
    model, summary = calibrated
    assert summary == {"samples": CALIBRATION_SLICES, "boxes": summary["boxes"], "smoothed_convs": 15}
    agreement = compare_engines(TorchEngine(pretrained_model), TorchEngine(model), parity_slices)
    assert agreement["mask_dice_mean"] >= MIN_AGREEMENT_WITH_FLOAT, agreement


def test_quantized_checkpoint_round_trips(calibrated, quantized_checkpoint, spec, parity_slices):
    from qmedsam.data.preprocess import preprocess_image, scale_boxes
    from qmedsam.errors import UserFacingError

    model, _ = calibrated
    reloaded = load_litemedsam(spec, quantized_checkpoint)  # strict load into a freshly built model
    sample = parity_slices[0]
    image, geometry = preprocess_image(sample.image)
    boxes = torch.from_numpy(scale_boxes(sample.boxes, geometry))
    with torch.no_grad():
        a = model.decode(model.encode(torch.from_numpy(image)), boxes)[0]
        b = reloaded.decode(reloaded.encode(torch.from_numpy(image)), boxes)[0]
    assert torch.equal(a, b)
    seed = QuantSpec.from_yaml(SPEC_PATH.parent / "w8a8_per_tensor.yaml")
    with pytest.raises(UserFacingError, match="does not match the quant spec"):
        load_litemedsam(seed, quantized_checkpoint)


def test_quantized_checkpoint_loads_with_more_float_layers(quantized_checkpoint, spec, tmp_path):
    """A trained checkpoint can give up int8 where it costs accuracy: a spec that keeps more layers float
    loads it (those layers' quantizer state dropped, their weights kept); the converse is refused."""
    import dataclasses

    from qmedsam.errors import UserFacingError

    extra = ("mask_decoder.transformer.layers.0.cross_attn_image_to_token.q_proj", "mask_decoder.hyper_quant")
    more_float = dataclasses.replace(spec, float_layers=(*spec.float_layers, *extra))
    model = load_litemedsam(more_float, quantized_checkpoint)
    assert type(model.get_submodule(extra[0])) is torch.nn.Linear
    assert type(model.get_submodule(extra[1])) is torch.nn.Identity
    trained = torch.load(quantized_checkpoint, map_location="cpu", weights_only=True)
    assert torch.equal(model.get_submodule(extra[0]).weight, trained[f"{extra[0]}.weight"])
    torch.save(model.state_dict(), tmp_path / "more_float.pt")
    with pytest.raises(UserFacingError, match="does not match the quant spec"):
        load_litemedsam(spec, tmp_path / "more_float.pt")


def test_conv_and_fully_connected_layers_run_in_int8(int8_dir):
    """Read back from the CPU plugin, not assumed: every encoder Conv/FC runs i8/u8; in the decoder all but the
    prompt encoder's, float by design: its two Fourier-feature projections (the box's corners and the clicks) and
    the click map's mask-prompt convolutions (three on the map, three on an empty map)."""

    core = shared_core()
    prompt_encoder_float = {"FullyConnected:f32": 2, "Convolution:f32": 6}
    for part, allowed_float in (("encoder", {}), ("decoder", prompt_encoder_float)):
        compiled = core.compile_model(str(int8_dir / f"{part}.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        counts = layer_precisions(compiled)
        conv_fc = {k: n for k, n in counts.items() if k.split(":")[0] in ("Convolution", "FullyConnected")}
        not_int8 = {k: n for k, n in conv_fc.items() if k.split(":")[1] not in INT8_PRECISIONS}
        assert sum(conv_fc.values()) - sum(not_int8.values()) >= (69 if part == "encoder" else 44), counts
        assert not_int8 == allowed_float, counts
    meta = json.loads((int8_dir / "meta.json").read_text())
    assert meta["int8_coverage"]["encoder"]["int8_fraction"] == 1.0
    flags = cpu_flags()
    if flags["avx512_vnni"] or flags["amx_int8"]:
        # Attention matmuls are fused into int8 subgraphs (10 encoder blocks, 7 decoder attentions).
        assert meta["int8_coverage"]["decoder"]["int8_fraction"] >= 0.95
        assert meta["int8_coverage"]["encoder"]["layers"].get("Subgraph(attention):i8") == 10
    else:
        # Without AVX-512 VNNI / AMX the CPU plugin has no int8 attention subgraph and runs the three
        # token-to-image probs x values matmuls in f32 (seen on an AVX2-only AMD EPYC): 58 of 62 layers int8.
        assert meta["int8_coverage"]["decoder"]["int8_fraction"] >= 0.9


def test_int8_ir_matches_the_fake_quant_model(int8_dir, small_cases_dir):
    """Parity where it is meaningful (see qmedsam.export.int8_parity): every encoder block of the saved IR on
    PyTorch's input to it, the decoder on PyTorch's embedding (the issue's 0.99 unless the reference decoder is
    less steady than that against its own float64 twin), and end to end against the reference's own
    float64/float32 agreement."""
    export_slices = parity_samples_from(small_cases_dir)  # what int8_dir's export measured on
    meta = json.loads((int8_dir / "meta.json").read_text())
    parity = meta["parity_vs_torch"]["f32"]
    assert parity["reference"] == "torch-brevitas-fakequant" and parity["samples_from"] == "cases"
    assert parity["samples"] == len(export_slices)
    units = meta["quantization"]["encoder_units"]
    assert len(units) == 17 and set(parity["units"]) == {unit["module"] for unit in units}
    assert units[0] == {"module": "patch_embed", "input": "image", "output": units[1]["input"]}
    assert units[-1]["module"] == "neck" and units[-1]["output"] == "image_embedding"
    assert max(u["one_minus_cos"] for u in parity["units"].values()) <= ParityThresholds().max_unit_error  # ~1e-5
    decoder = parity["decoder_teacher_forced"]
    assert decoder["boxes"] == sum(len(s.boxes) for s in export_slices)
    # 0.99, or 0.01 under the reference decoder's own float64 agreement where the reference is less steady
    # (this calibration on an Intel Xeon: twin 0.984, IR 0.986; another calibration: twin 0.990, IR 0.997).
    decoder_floor = parity["reference_floor"]["decoder_mask_dice_mean"]
    assert 0.95 <= decoder_floor <= 1.0
    assert decoder["required"] == max(0.95, min(0.99, decoder_floor - 0.01))
    assert decoder["mask_dice_mean"] >= decoder["required"], parity
    end_to_end, floor = parity["end_to_end"], parity["reference_floor"]["mask_dice_mean"]
    assert 0.9 <= floor < 1.0  # measured 0.956: the reference is this far from itself in float64
    assert end_to_end["mask_dice_mean"] >= max(MIN_PARITY_WITH_FAKE_QUANT, floor - 0.03), parity
    # On a CPU whose int8 kernels saturate (no VNNI/AMX) the checks ran the IR's graph in f32, and what this
    # CPU's int8 kernels give is recorded beside them
    assert parity["int8_kernels"].startswith("exact" if exact_int8_dot_products() else "saturating")
    assert ("this_cpu_int8_kernels" in parity) == (not exact_int8_dot_products())


def test_decomposed_fake_quantize_is_the_op_in_f32():
    """FakeQuantize spelled out in elementary ops gives the op's own values (its definition, in float64 here)
    and leaves the CPU plugin no int8 layer to fuse."""
    import openvino as ov
    from openvino import opset13

    x = opset13.parameter([1, 4, 8, 8], ov.Type.f32, name="x")
    weights = np.random.default_rng(0).standard_normal((3, 4, 3, 3)).astype(np.float32)

    def fake_quantize(node, low, high, levels):
        lo, hi = opset13.constant(np.float32(low)), opset13.constant(np.float32(high))
        return opset13.fake_quantize(node, lo, hi, lo, hi, levels)

    conv = opset13.convolution(
        fake_quantize(x, 0.0, 2.0, 256),
        fake_quantize(opset13.constant(weights), -1.5, 1.5, 255),
        [1, 1],
        [0, 0],
        [0, 0],
        [1, 1],
    )
    model = ov.Model([opset13.result(conv)], [x])
    sample = np.random.default_rng(1).uniform(-0.5, 2.5, (1, 4, 8, 8)).astype(np.float32)
    core = shared_core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    decomposed = core.compile_model(decompose_fake_quantize(model), "CPU", config)
    got = decomposed(sample)[0]
    precisions = {str(op.get_rt_info()["runtimePrecision"]) for op in decomposed.get_runtime_model().get_ops()}
    assert not precisions & {"u8", "i8"}

    def quantized(values, low, high, levels):  # the FakeQuantize definition, in float64
        step = (high - low) / (levels - 1)
        return np.round((np.clip(values.astype(np.float64), low, high) - low) / step) * step + low

    import torch

    expected = torch.nn.functional.conv2d(
        torch.from_numpy(quantized(sample, 0.0, 2.0, 256)), torch.from_numpy(quantized(weights, -1.5, 1.5, 255))
    ).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_block_check_catches_a_single_missing_quantizer(int8_dir, calibrated, parity_slices, tmp_path):
    """The block check is sharp enough to see one quantizer the IR has and the reference lacks (on the IR the
    export checks: itself, or its FakeQuantize-in-f32 copy on a CPU whose int8 kernels saturate)."""
    import copy

    from torch import nn

    meta = json.loads((int8_dir / "meta.json").read_text())
    units = meta["quantization"]["encoder_units"]
    faulty = copy.deepcopy(calibrated[0])
    faulty.image_encoder.get_submodule("layers.3.blocks.1.attn").softmax_quant = nn.Identity()
    result = unit_parity(ir_to_check(int8_dir, tmp_path) / "encoder.xml", faulty, units, parity_slices[:2])
    worst = max(result, key=lambda name: result[name]["one_minus_cos"])
    assert worst == "layers.3.blocks.1"
    assert result[worst]["one_minus_cos"] > 3 * ParityThresholds().max_unit_error, result[worst]  # 2.1e-4


def test_int8_model_dir_keeps_the_engine_contract(int8_dir, spec, quantized_checkpoint):
    meta = json.loads((int8_dir / "meta.json").read_text())
    assert meta["precision"] == "int8"
    assert meta["quantization"]["tool"] == "brevitas" and meta["quantization"]["spec"] == spec.to_dict()
    # the checkpoint as a portable name (outside the working directory: its file name), never this machine's path
    assert meta["source"]["weights"] == quantized_checkpoint.name
    assert meta["source"]["command"].startswith("qmedsam export --quant")
    assert sorted(p.name for p in int8_dir.iterdir()) == [
        "decoder.bin",
        "decoder.xml",
        "encoder.bin",
        "encoder.xml",
        "meta.json",
    ]
    engine = OpenVINOEngine(int8_dir, precision="f32", num_threads=2)
    embedding = engine.encode(np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32))
    assert embedding.shape == (1, 256, 64, 64)
    boxes = np.array([[10, 20, 100, 120], [30, 30, 200, 220], [0, 0, 255, 255]], np.float32)
    three = engine.decode(embedding, boxes)
    assert three.shape == (3, 256, 256)
    np.testing.assert_allclose(engine.decode(embedding, boxes[1:2])[0], three[1], atol=1e-3)


def test_export_fails_loudly_below_the_required_int8_coverage(int8_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(int8_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    with pytest.raises(RuntimeError, match="int8 coverage below the required minimum"):
        # The decoder keeps one float FullyConnected (prompt encoder), so 100% cannot be met.
        verify_ir(copy, meta, None, [], "cases", {"decoder": 1.0}, 0.0)


def test_float_model_has_no_int8_layers(fp32_model_dir):
    coverage = int8_coverage(fp32_model_dir)
    assert coverage["encoder"]["int8_fraction"] == coverage["decoder"]["int8_fraction"] == 0.0


def test_nncf_ptq_comparison_point(demo_dir, small_cases_dir, tmp_path, capsys):
    """`qmedsam export --ptq`: NNCF on the fp32 IR (TRANSFORMER type), coverage and parity vs float recorded."""
    from qmedsam.cli import main

    out = tmp_path / "ptq"
    argv = ["export", "--ptq", "--calib", str(demo_dir / "train"), "--calib-slices", "2"]
    argv += ["--parity-cases", str(small_cases_dir), "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["precision"] == "int8" and meta["quantization"]["tool"] == "nncf"
    assert meta["quantization"]["settings"]["model_type"] == "TRANSFORMER"
    assert meta["int8_coverage"]["encoder"]["int8_fraction"] >= 0.5
    assert meta["int8_coverage"]["decoder"]["int8_fraction"] >= 0.5
    parity = meta["parity_vs_torch"]["f32"]
    assert parity["reference"] == "torch-float" and parity["mask_dice_mean"] >= 0.8  # measured 0.84-0.90
    assert '"int8_coverage"' in capsys.readouterr().out  # the CLI prints coverage and parity (after NNCF's bars)


def test_cli_refuses_float_weights_without_calibration_data(tmp_path, capsys):
    from qmedsam.cli import main

    assert main(["export", "--quant", str(SPEC_PATH), "--out", str(tmp_path / "x")]) == 2
    assert "needs --calib DIR" in capsys.readouterr().err
    assert main(["export", "--ptq", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
