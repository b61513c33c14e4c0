"""Layer factories: the one switch between float and quantized layers.

Every model module asks a `LayerFactory` for its linears, convs and activation quantizers instead of
constructing `nn.Linear` directly, so the model is defined once and quantization is configuration.
The float factory here has no dependency beyond torch; `qmedsam.model.quant` provides the Brevitas one.
"""

from __future__ import annotations

from torch import nn


class LayerFactory:
    """Float layers; subclasses return quantized equivalents with the same parameter names."""

    quantized = False

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

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
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)

    def conv_transpose2d(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Module:
        return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride)

    def act_quant(self) -> nn.Module:
        """Signed activation quantizer placed before a matmul input (identity in float)."""
        return nn.Identity()

    def softmax_quant(self) -> nn.Module:
        """Unsigned quantizer for a softmax output in [0, 1] (identity in float)."""
        return nn.Identity()


FLOAT_LAYERS = LayerFactory()
