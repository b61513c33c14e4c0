"""TinyViT-5M image encoder as used by LiteMedSAM (256² input -> 256×64×64 embedding).

Parameter names match the published `lite_medsam.pth` so the pretrained weights load strictly.
Convs and linears come from a `LayerFactory`, so the same definition serves float and QAT models.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from qmedsam.model.layers import FLOAT_LAYERS, LayerFactory


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (SAM's definition, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Conv2dBN(nn.Sequential):
    """Conv (no bias) followed by BatchNorm; keys `c.*` and `bn.*` as in the checkpoint.

    `fused()` returns one conv with the BatchNorm folded in, which is what gets quantized: quantizing
    the conv weight before an unfolded BatchNorm would quantize the wrong tensor.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        )
        bn = nn.BatchNorm2d(out_channels)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)

    @torch.no_grad()
    def fused(self, layers: LayerFactory = FLOAT_LAYERS) -> nn.Module:
        conv, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = layers.conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            stride=conv.stride[0],
            padding=conv.padding[0],
            groups=conv.groups,
            bias=True,
        )
        fused.weight.data.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.data.copy_(bn.bias - bn.running_mean * scale)
        return fused


def fuse_conv_bn(module: nn.Module, layers: LayerFactory = FLOAT_LAYERS) -> nn.Module:
    """Replace every `Conv2dBN` below `module` by its BatchNorm-folded conv from `layers`, in place.

    Quantized encoders are built this way, so the tensor that gets quantized is the folded weight.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, Conv2dBN):
            setattr(module, name, child.fused(layers))
        else:
            fuse_conv_bn(child, layers)
    return module


class PatchEmbed(nn.Module):
    """Two 1×1 conv-BN layers: TinyViT-in-LiteMedSAM keeps the full 256² resolution here."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 1), nn.GELU(), Conv2dBN(embed_dim // 2, embed_dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1×1 expand, 3×3 depthwise, 1×1 project)."""

    def __init__(self, channels: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(channels * expand_ratio)
        self.conv1 = Conv2dBN(channels, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, channels, 1, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = self.conv3(x)
        return self.act3(x + shortcut)


class PatchMerging(nn.Module):
    """Downsampling between stages; LiteMedSAM's last merge (to 320 channels) keeps stride 1."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        stride = 1 if out_dim in (320, 448, 576) else 2
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            height, width = self.input_resolution
            x = x.view(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks at full resolution, then patch merging."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, out_dim: int, expand_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = PatchMerging(input_resolution, dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class Mlp(nn.Module):
    """Pre-norm MLP of a TinyViT block."""

    def __init__(self, dim: int, hidden: int, layers: LayerFactory) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = layers.linear(dim, hidden)
        self.fc2 = layers.linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Windowed multi-head self-attention with learned relative position biases."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: tuple[int, int], layers: LayerFactory):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.value_dim = key_dim  # attn_ratio 1 in LiteMedSAM
        self.norm = nn.LayerNorm(dim)
        self.qkv = layers.linear(dim, num_heads * (2 * key_dim + self.value_dim))
        self.proj = layers.linear(num_heads * self.value_dim, dim)
        self.q_quant = layers.act_quant()
        self.k_quant = layers.act_quant()
        self.v_quant = layers.act_quant()
        self.softmax_quant = layers.softmax_quant()
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        indices = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                indices.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs",
            torch.tensor(indices, dtype=torch.long).view(len(points), len(points)),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q = self.q_quant(q.permute(0, 2, 1, 3))
        k = self.k_quant(k.permute(0, 2, 1, 3))
        v = self.v_quant(v.permute(0, 2, 1, 3))
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        attn = self.softmax_quant(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.value_dim)
        return self.proj(x)


class TinyViTBlock(nn.Module):
    """Window attention, depthwise local conv, MLP — each with a residual."""

    def __init__(
        self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int, layers: LayerFactory
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        head_dim = dim // num_heads
        self.attn = Attention(dim, head_dim, num_heads, (window_size, window_size), layers)
        self.mlp = Mlp(dim, dim * 4, layers)
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.input_resolution
        batch, length, channels = x.shape
        ws = self.window_size
        shortcut = x
        if height == ws and width == ws:
            x = self.attn(x)
        else:
            x = x.view(batch, height, width, channels)
            pad_b = (ws - height % ws) % ws
            pad_r = (ws - width % ws) % ws
            if pad_b or pad_r:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = height + pad_b, width + pad_r
            nh, nw = ph // ws, pw // ws
            x = x.view(batch, nh, ws, nw, ws, channels).transpose(2, 3).reshape(batch * nh * nw, ws * ws, channels)
            x = self.attn(x)
            x = x.view(batch, nh, nw, ws, ws, channels).transpose(2, 3).reshape(batch, ph, pw, channels)
            if pad_b or pad_r:
                x = x[:, :height, :width].contiguous()
            x = x.view(batch, length, channels)
        x = shortcut + x
        x = x.transpose(1, 2).reshape(batch, channels, height, width)
        x = self.local_conv(x)
        x = x.view(batch, channels, length).transpose(1, 2)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """A transformer stage: TinyViT blocks, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        out_dim: int | None,
        layers: LayerFactory,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [TinyViTBlock(dim, input_resolution, num_heads, window_size, layers) for _ in range(depth)]
        )
        self.downsample = PatchMerging(input_resolution, dim, out_dim) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder: (B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64)."""

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mbconv_expand_ratio: float = 4.0,
        out_chans: int = 256,
        layers: LayerFactory = FLOAT_LAYERS,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.embed_dims = tuple(embed_dims)
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        n_stages = len(depths)
        for i in range(n_stages):
            # Resolution halves at each merge except the last one (stride 1): 256, 128, 64, 64.
            resolution = img_size // (2 ** (i - 1 if i == n_stages - 1 else i))
            out_dim = embed_dims[i + 1] if i < n_stages - 1 else None
            if i == 0:
                stage: nn.Module = ConvLayer(
                    embed_dims[0], (resolution, resolution), depths[0], embed_dims[1], mbconv_expand_ratio
                )
            else:
                stage = BasicLayer(
                    embed_dims[i], (resolution, resolution), depths[i], num_heads[i], window_sizes[i], out_dim, layers
                )
            self.layers.append(stage)
        self.final_resolution = img_size // (2 ** (n_stages - 2))
        self.neck = nn.Sequential(
            layers.conv2d(embed_dims[-1], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            layers.conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        batch, _, channels = x.shape
        side = self.final_resolution
        x = x.view(batch, side, side, channels).permute(0, 3, 1, 2)
        return self.neck(x)
