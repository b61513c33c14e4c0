"""Quantization as configuration: a `QuantSpec` and the Brevitas layer factory it selects.

This is the ONLY module that imports brevitas. The model is defined once (`LiteMedSAM`); a spec turns
its encoder and/or decoder into Brevitas fake-quant layers through `BrevitasLayers`, a `LayerFactory`
subclass. Everything else that needs Brevitas (calibration, QCDQ export) goes through the thin
wrappers at the bottom of this file.

Choices that come from measurements on OpenVINO 2026.4 (PROTOCOL.md), not taste:
- weights are quantized with `narrow_range=False`: Brevitas' default narrow range exports a Clip
  after the weight QuantizeLinear that keeps OpenVINO convolutions in fp32;
- every quantized conv/linear also quantizes its INPUT (per-tensor): OpenVINO runs a layer in int8
  only when both of its operands pass through a FakeQuantize;
- the softmax output gets an unsigned quantizer with its range fixed to [0, 1] (scale 1/255), so no
  attention probability is clipped and no calibration is needed for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from qmedsam.errors import UserFacingError
from qmedsam.model.layers import FLOAT_LAYERS, LayerFactory
from qmedsam.model.litemedsam import LiteMedSAM, load_state_dict_file
from qmedsam.model.weights import pretrained_weights_path
from qmedsam.typed_config import from_mapping, read_yaml_mapping

# Brevitas warnings that say nothing about the user's model: an optional CUDA kernel package it does not
# need here, and an accumulator zero point no qmedsam layer uses. Matched by message, nothing else hidden.
warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
warnings.filterwarnings("ignore", message="Computing zero point of output accumulator not supported yet")

WeightGranularity = Literal["per_tensor", "per_channel"]
SoftmaxQuant = Literal["unsigned", "signed", "float"]
ActivationScaling = Literal["percentile", "mse"]

# State-dict keys that belong to quantizers (absent from a float checkpoint).
QUANTIZER_KEY_PARTS = ("input_quant.", "output_quant.", "weight_quant.", "bias_quant.", "act_quant.", "input_smoothing")
SMOOTHING_BUFFER = "input_smoothing"


class QuantSpecError(UserFacingError):
    """A quantization spec (YAML or dict) with an unknown, missing or wrong-typed key."""


@dataclass(frozen=True)
class QuantSpec:
    """Which parts of LiteMedSAM are quantized and how. Defaults: the improved spec
    (`configs/quant/w8a8_per_channel.yaml`); the seed's setup is `configs/quant/w8a8_per_tensor.yaml`.

    The prompt encoder, norms, GELU, softmax and biases always stay float.
    """

    image_encoder: bool = True
    """Every encoder conv (BatchNorm folded first) and linear, plus the attention matmul inputs."""
    mask_decoder: bool = True
    """Attention linears, MLPs, hypernetwork MLPs, both transposed convs and the final mask product."""
    weight_bit_width: int = 8
    activation_bit_width: int = 8
    weight_granularity: WeightGranularity = "per_channel"
    weight_narrow_range: bool = False
    """Brevitas' default (True) exports a Clip that keeps OpenVINO convolutions in fp32."""
    matmul_inputs: bool = True
    """Quantize q, k, v before the attention matmuls and both operands of the decoder's mask product."""
    softmax_output: SoftmaxQuant = "unsigned"
    """Quantizer after the attention softmax: unsigned (better), signed (the seed's) or float."""
    token_to_image_softmax: bool = False
    """Also quantize the softmax of the decoder's token-to-image attentions (4096 keys). 8 bits cannot
    hold probabilities around 1/4096: quantizing them cut decoder mask agreement with float from 0.99
    to 0.70-0.78 on a microscopy slice. The MatMul they feed is ~4 MFLOP per box: float costs no speed."""
    smooth_depthwise: bool = True
    """Scale each depthwise conv's input per channel (folded into its weights, SmoothQuant-style) so a
    per-tensor activation quantizer fits channels whose ranges differ by 500x (TinyViT's MBConvs).
    Exact with per-channel weights; with per-tensor weights it splits the range (alpha 0.5)."""
    smooth_conv_inputs: bool = False
    """Also smooth the inputs of the encoder's regular (groups=1) convs, alpha 0.5. Their input quantizers
    carry much of the calibrated model's embedding error (patch embedding conv 2: 17%, last patch merging
    1x1 conv: 12%), but mask agreement with float did not move reliably: 0.947 -> 0.960 calibrated on 8
    demo slices, 0.960 -> 0.948 on 4. Off until QAT or more data says otherwise."""
    asymmetric_inputs: bool = True
    """Conv/linear inputs get a zero point (most follow a GELU: range [-0.17, max], half of a signed
    grid unused). OpenVINO runs these in u8; MatMul and transposed-conv inputs stay symmetric, since
    OpenVINO 2026.4 runs those in fp32 once their input has a zero point (measured)."""
    activation_scaling: ActivationScaling = "percentile"
    """How calibration sets activation scales: a percentile of the values seen, or minimal quantization
    MSE (slower to calibrate: ~6x on the encoder)."""
    activation_percentile: float = 99.9999
    """Upper percentile for `percentile` scaling (100 minus it is the lower one of zero-point inputs).
    Mask agreement with float on the demo slices after calibration: 99.99 0.91, 99.999 (Brevitas'
    default) 0.93, 99.9999 0.95, 99.99999 0.93."""
    min_int8_fraction: float = 0.9
    """Export fails if fewer of a quantized part's Conv/FC/MatMul layers than this run in int8."""
    float_layers: tuple[str, ...] = ()
    """Modules (full names, e.g. `image_encoder.patch_embed.seq.2`) kept float inside a quantized part:
    mixed precision for the few layers whose quantization costs the most accuracy per FLOP, chosen by
    measurement (`benchmarks/quant_sensitivity.py`). A conv or linear becomes its float twin (OpenVINO runs
    it in f32), a matmul-input quantizer an identity."""

    def __post_init__(self) -> None:
        for name in ("weight_bit_width", "activation_bit_width"):
            value = getattr(self, name)
            if not 2 <= value <= 8:
                raise QuantSpecError(f"{name} must be between 2 and 8, got {value}")
        if not 50.0 < self.activation_percentile < 100.0:
            raise QuantSpecError(f"activation_percentile must be in (50, 100), got {self.activation_percentile}")
        if not 0.0 <= self.min_int8_fraction <= 1.0:
            raise QuantSpecError(f"min_int8_fraction must be in [0, 1], got {self.min_int8_fraction}")
        if isinstance(self.float_layers, str):
            raise QuantSpecError(f"float_layers must be a list of module names, got the string {self.float_layers!r}")
        object.__setattr__(self, "float_layers", tuple(self.float_layers))  # a list from Python callers too

    @property
    def enabled(self) -> bool:
        return self.image_encoder or self.mask_decoder

    def to_dict(self) -> dict[str, Any]:
        """Plain data as YAML / JSON hold it (lists, not tuples), so it equals a spec read back from meta.json."""
        return {**dataclasses.asdict(self), "float_layers": list(self.float_layers)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "quant spec") -> QuantSpec:
        """Validate a mapping (e.g. parsed YAML); errors name `source` and the offending key."""
        return from_mapping(cls, data, source, QuantSpecError)

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuantSpec:
        return cls.from_dict(read_yaml_mapping(path, "quant spec", QuantSpecError), source=str(path))


class BrevitasLayers(LayerFactory):
    """Brevitas fake-quant layers with the float layers' parameter names (`weight`, `bias`)."""

    quantized = True

    def __init__(self, spec: QuantSpec) -> None:
        from brevitas.quant import (
            Int8ActPerTensorFloat,
            Int8ActPerTensorFloatMSE,
            Int8WeightPerChannelFloat,
            Int8WeightPerTensorFloat,
            ShiftedUint8ActPerTensorFloat,
            ShiftedUint8ActPerTensorFloatMSE,
            Uint8ActPerTensorFloat,
            Uint8ActPerTensorFloatMSE,
        )

        self.spec = spec
        base = Int8WeightPerChannelFloat if spec.weight_granularity == "per_channel" else Int8WeightPerTensorFloat
        self.weight_quant = base.let(bit_width=spec.weight_bit_width, narrow_range=spec.weight_narrow_range)
        mse = spec.activation_scaling == "mse"
        signed, unsigned = (
            (Int8ActPerTensorFloatMSE, Uint8ActPerTensorFloatMSE)
            if mse
            else (Int8ActPerTensorFloat, Uint8ActPerTensorFloat)
        )
        shifted = ShiftedUint8ActPerTensorFloatMSE if mse else ShiftedUint8ActPerTensorFloat
        bits = {"bit_width": spec.activation_bit_width}
        high = {} if mse else {"high_percentile_q": spec.activation_percentile}
        low = {} if mse else {"low_percentile_q": 100.0 - spec.activation_percentile}
        self.signed_act = signed.let(**bits, **high)
        self.unsigned_act = unsigned.let(**bits, **high)
        self.layer_input = shifted.let(**bits, **high, **low) if spec.asymmetric_inputs else self.signed_act

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        import brevitas.nn as qnn

        return qnn.QuantLinear(
            in_features, out_features, bias=bias, weight_quant=self.weight_quant, input_quant=self.layer_input
        )

    def conv2d(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
    ) -> nn.Module:
        import brevitas.nn as qnn

        extra: dict[str, Any] = {}
        conv_class: type[nn.Module] = qnn.QuantConv2d
        if self.spec.smooth_depthwise and groups > 1 and groups == in_channels == out_channels:
            conv_class = smoothed_quant_conv2d_class()
            # Per-channel weights absorb any per-channel factor exactly; per-tensor ones share the range.
            extra["smoothing_alpha"] = 1.0 if self.spec.weight_granularity == "per_channel" else 0.5
        elif self.spec.smooth_conv_inputs and groups == 1 and in_channels > 3:
            conv_class = smoothed_quant_conv2d_class()
            extra["smoothing_alpha"] = 0.5  # the factor moves onto input columns, not whole output channels
        return conv_class(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=bias,
            weight_quant=self.weight_quant,
            input_quant=self.layer_input,
            **extra,
        )

    def conv_transpose2d(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Module:
        import brevitas.nn as qnn

        return qnn.QuantConvTranspose2d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            weight_quant=self.weight_quant,
            input_quant=self.signed_act,
        )

    def act_quant(self) -> nn.Module:
        import brevitas.nn as qnn

        if not self.spec.matmul_inputs:
            return nn.Identity()
        return qnn.QuantIdentity(act_quant=self.signed_act)

    def softmax_quant(self) -> nn.Module:
        import brevitas.nn as qnn

        if self.spec.softmax_output == "float":
            return nn.Identity()
        quantizer = self.unsigned_act if self.spec.softmax_output == "unsigned" else self.signed_act
        return qnn.QuantIdentity(act_quant=quantizer)


@functools.cache
def smoothed_quant_conv2d_class() -> type[nn.Module]:
    """`QuantConv2d` that multiplies its input per channel by the buffer `input_smoothing` first.

    Calibration sets the buffer and divides the (depthwise) weights by it, so the float function is
    unchanged while the input quantizer sees channels of equal range. Created lazily: brevitas is
    imported only when a quantized model is built.
    """
    import brevitas.nn as qnn

    class SmoothedQuantConv2d(qnn.QuantConv2d):
        def __init__(self, *args: Any, smoothing_alpha: float = 1.0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.smoothing_alpha = smoothing_alpha
            self.register_buffer(SMOOTHING_BUFFER, torch.ones(self.in_channels))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x * self.input_smoothing.view(1, -1, 1, 1))

    return SmoothedQuantConv2d


def layer_factories(quant: QuantSpec | None) -> tuple[LayerFactory, LayerFactory]:
    """(encoder factory, decoder factory) for a spec; float where a part is not quantized."""
    if quant is None or not quant.enabled:
        return FLOAT_LAYERS, FLOAT_LAYERS
    quantized = BrevitasLayers(quant)
    return (quantized if quant.image_encoder else FLOAT_LAYERS), (quantized if quant.mask_decoder else FLOAT_LAYERS)


def build_quantized(quant: QuantSpec | None) -> LiteMedSAM:
    """An untrained LiteMedSAM with the parts `quant` names built from Brevitas layers (float if None).

    The same `LiteMedSAM` class as the float model, given quantized layer factories; BatchNorm is folded
    into the quantized convs (the folded weight is what gets quantized).
    """
    if quant is None:
        return LiteMedSAM()
    encoder_layers, decoder_layers = layer_factories(quant)
    return prepare_quantized(LiteMedSAM(encoder_layers, decoder_layers), quant)


def prepare_quantized(model: nn.Module, quant: QuantSpec | None) -> nn.Module:
    """Finish a `LiteMedSAM` built with `layer_factories(quant)`: fold the encoder's BatchNorms into
    (quantized) convs and keep the token-to-image softmaxes float unless the spec asks otherwise."""
    from qmedsam.model.tiny_vit import fuse_conv_bn

    encoder_layers, _ = layer_factories(quant)
    if encoder_layers.quantized:
        fuse_conv_bn(model.image_encoder, encoder_layers)
    if quant is not None and quant.mask_decoder and not quant.token_to_image_softmax:
        for name, module in model.mask_decoder.named_modules():
            if name.endswith("token_to_image"):
                module.softmax_quant = nn.Identity()
    if quant is not None:
        for name in quant.float_layers:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise QuantSpecError(f"float_layers: {name!r} is no such module") from None
            model.set_submodule(name, float_twin(module, name))
    return model


def float_twin(module: nn.Module, name: str) -> nn.Module:
    """The float layer a quantized one stands for (same parameter names, so float weights load into it)."""
    import brevitas.nn as qnn

    if isinstance(module, qnn.QuantConv2d):
        return nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            groups=module.groups,
            bias=module.bias is not None,
        )
    if isinstance(module, qnn.QuantLinear):
        return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    if isinstance(module, qnn.QuantIdentity):
        return nn.Identity()
    raise QuantSpecError(
        f"float_layers: {name!r} is a {type(module).__name__}, not a quantized conv, linear or matmul input"
    )


# --- weights -------------------------------------------------------------------------------------------


def is_quantizer_key(key: str) -> bool:
    return any(part in key for part in QUANTIZER_KEY_PARTS)


def is_quantized_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    return any(is_quantizer_key(key) for key in state)


def folded_float_state_dict(state: Mapping[str, torch.Tensor], fold_encoder: bool) -> dict[str, torch.Tensor]:
    """A float LiteMedSAM state dict with the encoder's BatchNorms folded into their convs (if asked).

    Done by loading it strictly into the float model and folding there (`Conv2dBN.fused`), so the
    arithmetic exists once and a malformed checkpoint fails with PyTorch's key report.
    """
    from qmedsam.model.tiny_vit import fuse_conv_bn

    model = LiteMedSAM()
    model.load_state_dict(dict(state), strict=True)
    if fold_encoder:
        fuse_conv_bn(model.image_encoder)
    return model.state_dict()


def load_float_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Load float LiteMedSAM weights into a (partly) quantized model built by `build_quantized`.

    Only quantizer parameters may be missing afterwards (they keep their initial values until
    `calibrate`); any other missing or unexpected key is an error.
    """
    from qmedsam.model.tiny_vit import Conv2dBN

    fold = not any(isinstance(m, Conv2dBN) for m in model.image_encoder.modules())
    try:
        folded = folded_float_state_dict(state, fold_encoder=fold)
    except RuntimeError as exc:
        raise UserFacingError(f"{source}: not a float LiteMedSAM state dict: {exc}") from None
    result = model.load_state_dict(folded, strict=False)
    missing = [k for k in result.missing_keys if not is_quantizer_key(k)]
    if missing or result.unexpected_keys:
        raise UserFacingError(
            f"{source}: float weights do not fit the quantized model (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )


def without_float_layer_quantizers(
    state: Mapping[str, torch.Tensor], float_layers: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """`state` less the quantizer entries of the modules `float_layers` names (their weights stay)."""

    def dropped(key: str) -> bool:
        return any(key.startswith(f"{name}.") and is_quantizer_key(key[len(name) :]) for name in float_layers)

    return {key: value for key, value in state.items() if not dropped(key)}


def load_litemedsam(spec: QuantSpec | None, weights: str | Path | None = None) -> nn.Module:
    """The model for `spec` with weights from a float or quantized checkpoint (default: pretrained).

    A quantized checkpoint must have been saved from the same spec (strict load, calibrated
    quantizers included), except that the spec may keep more layers float than the checkpoint did: their
    trained quantizer state is dropped (a trained model can still give up int8 where it costs accuracy).
    A float checkpoint is folded and leaves activation quantizers uncalibrated.
    """
    path = Path(weights) if weights is not None else pretrained_weights_path()
    state = load_state_dict_file(path)
    model = build_quantized(spec)
    if is_quantized_state_dict(state):
        state = without_float_layer_quantizers(state, spec.float_layers if spec is not None else ())
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UserFacingError(f"{path}: quantized checkpoint does not match the quant spec: {exc}") from None
    else:
        load_float_state_dict(model, state, str(path))
    return model.eval()


def uncalibrated_quantizers(model: nn.Module) -> list[str]:
    """Names of activation quantizers still waiting for runtime statistics (their scale is a placeholder)."""
    from brevitas.core.scaling.standalone import ParameterFromRuntimeStatsScaling

    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, ParameterFromRuntimeStatsScaling) and m.counter <= m.collect_stats_steps
    ]


# --- thin wrappers for the modules that must not import brevitas ---------------------------------------


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[None]:
    """Brevitas calibration: quantization off, activation statistics collected; scales set on exit."""
    from brevitas.graph.calibrate import calibration_mode as brevitas_calibration_mode

    with brevitas_calibration_mode(model):
        yield


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[None]:
    """Run a Brevitas model as its float equivalent (e.g. to measure float activations)."""
    from brevitas.graph.calibrate import quantization_status_manager

    with quantization_status_manager(
        model, disable_act_quant=True, disable_weight_quant=True, disable_bias_quant=True, is_training=False
    ):
        yield


@contextlib.contextmanager
def bias_correction_mode(model: nn.Module) -> Iterator[None]:
    """Brevitas bias correction; layers without a bias stay without one (state-dict keys unchanged)."""
    from brevitas.graph.calibrate import bias_correction_mode as brevitas_bias_correction_mode

    with brevitas_bias_correction_mode(model, skip_if_no_bias=True):
        yield


def export_onnx_qcdq(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, **kwargs: Any) -> None:
    """Brevitas QCDQ ONNX export (QuantizeLinear/DequantizeLinear pairs OpenVINO turns into int8).

    Uses torch's TorchScript exporter (`dynamo=False`): its `dynamic_axes` give the decoder its dynamic
    box count, and it is the path Brevitas' QCDQ handlers were written for.
    """
    from brevitas.export import export_onnx_qcdq as brevitas_export

    kwargs.setdefault("dynamo", False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        brevitas_export(module, args=args, export_path=str(path), **kwargs)


__all__ = [
    "BrevitasLayers",
    "build_quantized",
    "QuantSpec",
    "QuantSpecError",
    "layer_factories",
    "load_float_state_dict",
    "load_litemedsam",
    "without_float_layer_quantizers",
]
