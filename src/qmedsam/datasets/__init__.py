"""Training data: the dataset SDK (`GatherModalityDataset`, `ModalityDataset`, the seed's names), the manifest
every build writes, and `recipes/` that build trees from pinned package-registry archives.

`from qmedsam.datasets import GatherModalityDataset` imports PyTorch only when asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmedsam.datasets.modality import GatherModalityDataset, ModalityDataset

__all__ = ["GatherModalityDataset", "ModalityDataset"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from qmedsam.datasets import modality

        return getattr(modality, name)
    raise AttributeError(f"module 'qmedsam.datasets' has no attribute {name!r}")
