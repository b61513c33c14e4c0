"""QuantSpec, the Brevitas LiteMedSAM built from it, weight loading and calibration on real demo slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qmedsam.errors import UserFacingError
from qmedsam.model.litemedsam import LiteMedSAM
from qmedsam.model.quant import (
    QuantSpec,
    QuantSpecError,
    build_quantized,
    load_float_state_dict,
    quantization_disabled,
)
from qmedsam.model.tiny_vit import Conv2dBN
from qmedsam.model.weights import pretrained_weights_path

CONFIGS = Path(__file__).parent.parent / "configs" / "quant"


# --- QuantSpec ----------------------------------------------------------------------------------------


def test_shipped_specs_load():
    seed = QuantSpec.from_yaml(CONFIGS / "w8a8_per_tensor.yaml")
    improved = QuantSpec.from_yaml(CONFIGS / "w8a8_per_channel.yaml")
    assert (seed.weight_granularity, seed.softmax_output, seed.token_to_image_softmax) == ("per_tensor", "signed", True)
    assert not seed.weight_narrow_range and not improved.weight_narrow_range  # int8 convs in OpenVINO need it
    assert improved == QuantSpec()  # the defaults are the improved spec
    assert QuantSpec.from_dict(improved.to_dict()) == improved


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("weight_bits: 8\n", "unknown key(s) 'weight_bits' (did you mean 'weight_bit_width'?)"),
        ("weight_bit_width: '8'\n", "key 'weight_bit_width' must be an integer, got '8'"),
        ("weight_bit_width: true\n", "key 'weight_bit_width' must be an integer, got True"),
        ("image_encoder: 1\n", "key 'image_encoder' must be true or false, got 1"),
        ("weight_granularity: per_row\n", "key 'weight_granularity' must be one of ['per_tensor', 'per_channel']"),
        ("min_int8_fraction: high\n", "key 'min_int8_fraction' must be a number"),
        ("activation_bit_width: 16\n", "activation_bit_width must be between 2 and 8, got 16"),
        ("- image_encoder\n", "expected a mapping of quant spec keys, got list"),
        ("image_encoder: [\n", "not valid YAML"),
    ],
)
def test_yaml_errors_name_file_and_key(tmp_path, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(QuantSpecError) as info:
        QuantSpec.from_yaml(path)
    assert str(path) in str(info.value) and expected in str(info.value)
    assert isinstance(info.value, UserFacingError)  # the CLI prints it without a traceback


def test_missing_yaml_and_empty_yaml(tmp_path):
    with pytest.raises(QuantSpecError, match="cannot read quant spec"):
        QuantSpec.from_yaml(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert QuantSpec.from_yaml(tmp_path / "empty.yaml") == QuantSpec()
    assert QuantSpec.from_dict({"min_int8_fraction": 1}).min_int8_fraction == 1.0  # ints are numbers


# --- one model definition, quantized by configuration ---------------------------------------------------


def _brevitas_types():
    import brevitas.nn as qnn

    return qnn.QuantConv2d, qnn.QuantLinear, qnn.QuantConvTranspose2d, qnn.QuantIdentity


def test_spec_off_builds_the_float_model():
    float_keys = set(LiteMedSAM().state_dict())
    assert set(build_quantized(None).state_dict()) == float_keys
    assert set(build_quantized(QuantSpec(image_encoder=False, mask_decoder=False)).state_dict()) == float_keys
    decoder_only = build_quantized(QuantSpec(image_encoder=False))
    assert any(isinstance(m, Conv2dBN) for m in decoder_only.image_encoder.modules())  # encoder untouched
    assert {k for k in decoder_only.state_dict() if k.startswith("image_encoder.")} == {
        k for k in float_keys if k.startswith("image_encoder.")
    }


def test_spec_on_quantizes_the_seed_coverage():
    quant_conv, quant_linear, quant_deconv, quant_identity = _brevitas_types()
    model = build_quantized(QuantSpec())
    encoder, decoder = model.image_encoder, model.mask_decoder
    assert not any(isinstance(m, Conv2dBN | nn.BatchNorm2d) for m in encoder.modules())  # folded
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    # patch embed 2 + MBConv 2x3 + patch merging 3x3 + local convs 10 + neck 2
    assert len(convs) == 29 and all(isinstance(m, quant_conv) for m in convs)
    depthwise = [m for m in convs if m.groups > 1]
    assert len(depthwise) == 15 and all(hasattr(m, "input_smoothing") for m in depthwise)
    linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 40 and all(isinstance(m, quant_linear) for m in linears)
    for part in (encoder, decoder.transformer):
        for attention in (m for m in part.modules() if hasattr(m, "softmax_quant")):
            assert all(isinstance(getattr(attention, f"{x}_quant"), quant_identity) for x in "qkv")
    decoder_linears = [m for m in decoder.modules() if isinstance(m, nn.Linear)]
    assert decoder_linears and all(isinstance(m, quant_linear) for m in decoder_linears)
    deconvs = [m for m in decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == 2 and all(isinstance(m, quant_deconv) for m in deconvs)
    assert isinstance(decoder.hyper_quant, quant_identity) and isinstance(decoder.upscaled_quant, quant_identity)
    # Softmax outputs: quantized except the 4096-key token-to-image attentions (see QuantSpec).
    softmax = {n: type(m) for n, m in decoder.named_modules() if n.endswith("softmax_quant")}
    assert len(softmax) == 7
    assert all((cls is nn.Identity) == ("token_to_image" in n) for n, cls in softmax.items())
    seed = build_quantized(QuantSpec.from_yaml(CONFIGS / "w8a8_per_tensor.yaml"))
    assert all(isinstance(m, quant_identity) for n, m in seed.named_modules() if n.endswith("softmax_quant"))
    assert not any(hasattr(m, "input_smoothing") for m in seed.modules())
    # The prompt encoder always stays float.
    assert not any(isinstance(m, _brevitas_types()) for m in model.prompt_encoder.modules())


def test_float_layers_keep_named_modules_float(tmp_path):
    """Mixed precision by configuration: the named layers are float twins with the same parameter names,
    everything else stays quantized; a wrong name or kind is refused naming the key."""
    quant_conv, quant_linear, _, quant_identity = _brevitas_types()
    names = (
        "image_encoder.patch_embed.seq.2",
        "image_encoder.layers.0.blocks.0.conv2",
        "image_encoder.layers.1.blocks.0.attn.qkv",
        "image_encoder.layers.1.blocks.0.attn.q_quant",
    )
    path = tmp_path / "mixed.yaml"
    path.write_text("float_layers:\n" + "".join(f"  - {n}\n" for n in names))
    spec = QuantSpec.from_yaml(path)
    assert spec.float_layers == names and QuantSpec.from_dict(spec.to_dict()) == spec
    model = build_quantized(spec)
    full = build_quantized(QuantSpec())
    for name in names:
        module = model.get_submodule(name)
        assert not isinstance(module, _brevitas_types()), name
        assert isinstance(full.get_submodule(name), quant_conv | quant_linear | quant_identity), name
    assert type(model.get_submodule(names[1])) is nn.Conv2d and model.get_submodule(names[1]).groups > 1
    float_keys = {k for k in model.state_dict() if not any(p in k for p in ("_quant.", "input_smoothing"))}
    assert float_keys == {k for k in full.state_dict() if not any(p in k for p in ("_quant.", "input_smoothing"))}
    quantized = [m for m in model.image_encoder.modules() if isinstance(m, quant_conv | quant_linear)]
    assert len(quantized) == 29 + 40 - 3
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    load_float_state_dict(model, state)  # float checkpoints still load
    for text, expected in [
        ("float_layers: image_encoder.neck\n", "must be a list of strings"),
        ("float_layers: [image_encoder.nope]\n", "'image_encoder.nope' is no such module"),
        ("float_layers: [image_encoder.patch_embed]\n", "is a PatchEmbed, not a quantized conv"),
    ]:
        path.write_text(text)
        with pytest.raises(QuantSpecError, match=expected):
            build_quantized(QuantSpec.from_yaml(path))


def test_float_weights_load_into_the_quantized_model(pretrained_model):
    """BatchNorm folded, quantizer parameters the only keys not in the float checkpoint, and with
    quantization switched off the quantized model computes the float function."""
    model = build_quantized(QuantSpec()).eval()
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    load_float_state_dict(model, state)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[30.0, 40.0, 120.0, 150.0]])
    with torch.no_grad(), quantization_disabled(model):
        embedding = model.encode(image)
        logits = model.decode(embedding, boxes)[0]
    with torch.no_grad():
        ref_embedding = pretrained_model.encode(image)
        ref_logits = pretrained_model.decode(ref_embedding, boxes)[0]
    torch.testing.assert_close(embedding, ref_embedding, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=1e-4)
    with pytest.raises(UserFacingError, match="not a float LiteMedSAM state dict"):
        load_float_state_dict(model, {k: v for k, v in state.items() if "neck" not in k}, "broken.pth")


def test_input_smoothing_leaves_the_float_function_unchanged(pretrained_model, demo_dir):
    """Depthwise and (opt-in) regular conv input smoothing move per-channel factors between input and
    weight: with quantization off the model still computes the float function, and a second smoothing
    pass re-derives the factors instead of compounding them."""
    import dataclasses

    from qmedsam.export.int8 import real_slices
    from qmedsam.model.calibrate import model_inputs, smooth_inputs, smoothed_layers

    model = build_quantized(dataclasses.replace(QuantSpec(), smooth_conv_inputs=True)).eval()
    load_float_state_dict(model, torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True))
    batches = model_inputs(real_slices(demo_dir / "train", limit=1))
    assert smooth_inputs(model, batches) == 15 + 13  # depthwise + regular convs but the 3-channel image conv
    regular = {n: m for n, m in smoothed_layers(model).items() if m.groups == 1}
    assert len(regular) == 13 and all(not torch.all(m.input_smoothing == 1) for m in regular.values())
    first = {n: m.input_smoothing.clone() for n, m in smoothed_layers(model).items()}
    smooth_inputs(model, batches)
    assert all(torch.allclose(first[n], m.input_smoothing, rtol=1e-4) for n, m in smoothed_layers(model).items())
    image = batches[0][0]
    with torch.no_grad(), quantization_disabled(model):
        embedding = model.encode(image)
    with torch.no_grad():
        torch.testing.assert_close(embedding, pretrained_model.encode(image), atol=1e-4, rtol=1e-4)


# --- calibration data and export preconditions ------------------------------------------------------------------------


def test_uncalibrated_model_is_refused_by_the_export(tmp_path):
    from qmedsam.export.int8 import export_int8

    model = build_quantized(QuantSpec())
    with pytest.raises(UserFacingError, match="not calibrated"):
        export_int8(model, QuantSpec(), tmp_path / "out", {}, [object()])
    assert not (tmp_path / "out").exists()


def test_real_slices_from_cases_and_training_tree(demo_dir):
    from qmedsam.export.int8 import real_slices

    cases = real_slices(demo_dir / "cases", limit=7, max_boxes=4)
    train = real_slices(demo_dir / "train", limit=7, max_boxes=4)
    for samples in (cases, train):
        assert len(samples) == 7
        assert len({s.name.split("[")[0] for s in samples}) == 5  # every file takes a turn
        for sample in samples:
            assert sample.image.ndim in (2, 3) and 1 <= len(sample.boxes) <= 4
            height, width = sample.image.shape[:2]
            assert np.all(sample.boxes[:, 2] < width) and np.all(sample.boxes[:, 3] < height)
            assert np.all(sample.boxes[:, :2] <= sample.boxes[:, 2:])
    with pytest.raises(UserFacingError, match="no readable slices"):
        real_slices(demo_dir / "gts")
