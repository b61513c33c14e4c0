"""Encode the slices of a volume on demand and keep the recent embeddings: every 3D prompt rule shares it."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from qmedsam.data.preprocess import Geometry, preprocess_image
from qmedsam.inference.runtime import Engine


class SliceEncoder:
    """Preprocess + encode slices of a volume on demand, keeping recent embeddings (4 MiB each)."""

    def __init__(self, engine: Engine, volume: np.ndarray | Sequence[np.ndarray], max_cached: int = 256) -> None:
        self.engine = engine
        self.volume = volume
        self.max_cached = max_cached
        self.geometry: Geometry | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.encoded = 0
        self.encode_seconds = 0.0  # preprocessing + encoder time spent so far (an interactive UI reports it)

    def __call__(self, z: int) -> np.ndarray:
        if z in self._cache:
            self._cache.move_to_end(z)
            return self._cache[z]
        started = time.perf_counter()
        tensor, self.geometry = preprocess_image(self.volume[z])
        embedding = self.engine.encode(tensor)
        self.encode_seconds += time.perf_counter() - started
        self.encoded += 1
        self._cache[z] = embedding
        if len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return embedding
