"""The distillation teacher: the fp32 LiteMedSAM, with its image embeddings cached on disk.

An image embedding does not depend on the box, so it is computed once per slice and flip and kept as
fp16 `.npy` (2 MiB each): later epochs and later stages never run the teacher's encoder on that view
again. The decoder is cheap and runs per box. Cache entries are keyed by the sample key (file + slice),
the flips, the image size and the teacher weights' SHA-256, so a changed tree file (new key) or other
weights never reuse a stale embedding; writes are atomic, so concurrent ranks and workers may share it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from qmedsam.files import atomic_write, sha256_file
from qmedsam.model.litemedsam import LiteMedSAM, load_pretrained_litemedsam
from qmedsam.model.weights import pretrained_weights_path


class Teacher:
    """Frozen fp32 LiteMedSAM: `embed(images, keys, flips)` (cached) and `decode(embeddings, boxes)`."""

    def __init__(self, cache_dir: Path | None, weights: Path | None = None, device: torch.device | None = None):
        path = Path(weights) if weights is not None else pretrained_weights_path()
        self.device = device or torch.device("cpu")
        self.model: LiteMedSAM = load_pretrained_litemedsam(path).to(self.device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.weights_sha256 = sha256_file(path)
        self.cache_dir = Path(cache_dir) / self.weights_sha256[:16] if cache_dir is not None else None
        self.hits = 0
        self.misses = 0

    def _entry(self, key: str, flips: tuple[int, int], size: int) -> Path | None:
        if self.cache_dir is None:
            return None
        name = hashlib.sha256(f"{key}|{flips[0]}{flips[1]}|{size}".encode()).hexdigest()
        return self.cache_dir / name[:2] / f"{name}.npy"

    @torch.no_grad()
    def embed(self, images: torch.Tensor, keys: list[str], flips: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 256, 64, 64) float32 on the teacher's device, from the cache where possible."""
        size = int(images.shape[-1])
        entries = [self._entry(k, (int(f[0]), int(f[1])), size) for k, f in zip(keys, flips.tolist(), strict=True)]
        out: list[torch.Tensor | None] = [None] * len(keys)
        for i, entry in enumerate(entries):
            if entry is not None and entry.is_file():
                try:
                    out[i] = torch.from_numpy(np.load(entry, allow_pickle=False).astype(np.float32))
                    self.hits += 1
                except (OSError, ValueError):
                    out[i] = None  # a damaged entry is recomputed and rewritten
        todo = [i for i, value in enumerate(out) if value is None]
        if todo:
            self.misses += len(todo)
            computed = self.model.encode(images[todo].to(self.device)).float().cpu()
            for j, i in enumerate(todo):
                out[i] = computed[j]
                if entries[i] is not None:
                    half = computed[j].numpy().astype(np.float16)
                    atomic_write(entries[i], lambda handle, a=half: np.save(handle, a, allow_pickle=False))
        return torch.stack([t for t in out if t is not None]).to(self.device)

    @torch.no_grad()
    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """One box per embedding: (B, 256, 64, 64) + (B, 4) -> logits (B, 1, S, S)."""
        return self.model.decode(embeddings.to(self.device), boxes.to(self.device))[0]
