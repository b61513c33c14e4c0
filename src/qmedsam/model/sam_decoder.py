"""SAM prompt encoder, two-way transformer and mask decoder (a box, and clicks that refine it).

Parameter names follow segment-anything so the LiteMedSAM checkpoint loads strictly. The prompt
encoder always stays float; the transformer and mask head take layers from a `LayerFactory`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qmedsam.model.layers import FLOAT_LAYERS, LayerFactory
from qmedsam.model.tiny_vit import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of normalised coordinates with a fixed random Gaussian matrix."""

    def __init__(self, num_pos_feats: int = 64) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        height, width = size
        matrix = self.positional_encoding_gaussian_matrix
        grid = torch.ones((height, width), device=matrix.device, dtype=matrix.dtype)
        y = (grid.cumsum(dim=0) - 0.5) / height
        x = (grid.cumsum(dim=1) - 0.5) / width
        return self._encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        scale = coords.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]])
        return self._encode(coords.to(self.positional_encoding_gaussian_matrix.dtype) * scale)


NOT_A_POINT = -1.0
"""Point label of padding (SAM's): lets a batch of prompts with fewer clicks share one points array."""

CLICK_MAP_SIGMA = 2.0
"""Width (px of the 256² input) of the bump each click leaves on the click map. The clicks' sparse tokens place
them through low-frequency Fourier features (SAM's, ~40 px wide at 256²), too coarse for objects of ~12 px; the
map says at 4-px resolution where a click is, through the dense path."""


class PromptEncoder(nn.Module):
    """Encodes a box (two corner tokens) and clicks: one token each (SAM's point embeddings, label 1 include,
    0 exclude, -1 padding) and a dense click map (+1 bumps at include clicks, -1 at exclude clicks) through SAM's
    mask-prompt layers, added to the no-mask embedding as a change that is exactly zero away from the clicks."""

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (256, 256),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the embedding grid, (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) or (B, 1, 4) boxes in input-image pixels -> (B, 2, C) sparse embeddings."""
        coords = boxes.reshape(-1, 2, 2) + 0.5  # pixel centres
        corners = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        offsets = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return corners + offsets.unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) clicks (x, y) in input-image pixels + (B, N) labels -> (B, N, C) sparse embeddings.
        Written as float arithmetic on the labels (no indexing) so the exported graph takes any N."""
        coords = self.pe_layer.forward_with_coords(points + 0.5, self.input_image_size)
        labels = labels.to(coords.dtype).unsqueeze(-1)
        padding = (labels == NOT_A_POINT).to(coords.dtype)
        include = (labels == 1).to(coords.dtype)
        exclude = (labels == 0).to(coords.dtype)
        return (
            coords * (1 - padding)
            + padding * self.not_a_point_embed.weight
            + exclude * self.point_embeddings[0].weight
            + include * self.point_embeddings[1].weight
        )

    def click_map(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) clicks + (B, N) labels -> (B, 1, H, W) on the input image's grid: a Gaussian bump of
        `CLICK_MAP_SIGMA` px cut at 3 sigma, +1 at include clicks, -1 at exclude clicks, 0 for padding (and for
        N = 0), summed and clipped to [-1, 1]."""
        height, width = self.input_image_size
        dtype = self.no_mask_embed.weight.dtype
        ys = torch.arange(height, dtype=dtype).reshape(1, 1, height, 1)
        xs = torch.arange(width, dtype=dtype).reshape(1, 1, 1, width)
        points = points.to(dtype)
        dx = xs - points[..., 0, None, None]
        dy = ys - points[..., 1, None, None]
        labels = labels.to(dtype)
        sign = (labels == 1).to(dtype) - (labels == 0).to(dtype)
        squared = dx * dx + dy * dy
        near = (squared <= (3 * CLICK_MAP_SIGMA) ** 2).to(dtype)  # cut at 3 sigma: the change stays local
        bumps = torch.exp(squared * (-0.5 / CLICK_MAP_SIGMA**2)) * near * sign[..., None, None]
        return bumps.sum(dim=1, keepdim=True).clamp(-1.0, 1.0)

    def embed_click_map(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w): how the clicks change the dense embedding. The mask-prompt layers see one 4x4 patch per
        embedding cell, so subtracting their output on an empty map makes the change exactly 0 wherever no click
        is near, and a box's dense embedding with no clicks (N = 0, or all padding) is exactly the no-mask one."""
        # The same computation on an empty map of the same size, so the difference is exactly 0 away from clicks
        # (the embedding of a smaller empty patch differs in the last bits).
        empty = torch.zeros((1, 1, *self.input_image_size), dtype=self.no_mask_embed.weight.dtype)
        return self.mask_downscaling(self.click_map(points, labels)) - self.mask_downscaling(empty)

    def forward(
        self, boxes: torch.Tensor, points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse (B, N + 2, C), dense (1 or B, C, h, w)): the clicks' tokens then the box's (SAM's order);
        without clicks exactly the box's two. Without clicks the dense embedding is the same for every box, so
        it has batch 1 and broadcasts (the decoder relies on this to share work between boxes)."""
        sparse = self.embed_boxes(boxes)
        height, width = self.image_embedding_size
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, height, width)
        if points is not None:
            if point_labels is None:
                raise ValueError("points need point_labels")
            sparse = torch.cat([self.embed_points(points, point_labels), sparse], dim=1)
            dense = dense + self.embed_click_map(points, point_labels)
        return sparse, dense


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, layers: LayerFactory) -> None:
        super().__init__()
        self.lin1 = layers.linear(dim, hidden)
        self.lin2 = layers.linear(hidden, dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention whose projections may downsample the internal width."""

    def __init__(self, dim: int, num_heads: int, layers: LayerFactory, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the internal width {internal}")
        self.q_proj = layers.linear(dim, internal)
        self.k_proj = layers.linear(dim, internal)
        self.v_proj = layers.linear(dim, internal)
        self.out_proj = layers.linear(internal, dim)
        self.q_quant = layers.act_quant()
        self.k_quant = layers.act_quant()
        self.v_quant = layers.act_quant()
        self.softmax_quant = layers.softmax_quant()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        return x.reshape(batch, tokens, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self.q_quant(self._heads(self.q_proj(q)))
        k = self.k_quant(self._heads(self.k_proj(k)))
        v = self.v_quant(self._heads(self.v_proj(v)))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        attn = self.softmax_quant(torch.softmax(attn, dim=-1))
        out = attn @ v
        batch, heads, tokens, per_head = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * per_head))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, MLP, image->token cross-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool, layers: LayerFactory):
        super().__init__()
        self.self_attn = Attention(dim, num_heads, layers)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, layers, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, layers)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, layers, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        layers: LayerFactory = FLOAT_LAYERS,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, i == 0, layers) for i in range(depth)]
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, layers, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    """ReLU MLP used for the hypernetworks and the IoU head."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, layers: LayerFactory):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(layers.linear(n, k) for n, k in zip(dims, outs, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Predicts 256² mask logits (and IoU) from an image embedding and prompt embeddings."""

    def __init__(
        self,
        transformer_dim: int = 256,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        layers: LayerFactory = FLOAT_LAYERS,
    ) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(embedding_dim=transformer_dim, layers=layers)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            layers.conv_transpose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            layers.conv_transpose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            [
                MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3, layers)
                for _ in range(self.num_mask_tokens)
            ]
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, layers
        )
        self.hyper_quant = layers.act_quant()
        self.upscaled_quant = layers.act_quant()

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (masks (B, M, 256, 256), iou (B, M)); M = 1, or 3 with `multimask_output`."""
        n_prompts = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(n_prompts, -1, -1), sparse_prompt_embeddings], dim=1)
        # One embedding serves every prompt: it stays batch 1 and broadcasts against the prompts' batch, so
        # the first layer's box-independent work (the image tokens' k/v projections for token->image and q
        # projection for image->token, three 4096x256 linears) runs once per image instead of once per box.
        src = image_embeddings + dense_prompt_embeddings
        _, channels, height, width = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        batch = hs.shape[0]
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        src = src.transpose(1, 2).reshape(batch, channels, height, width)
        upscaled = self.upscaled_quant(self.output_upscaling(src))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        hyper_in = self.hyper_quant(hyper_in)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]
