"""What click training decodes against, computed once: slices of the labelled training split with their
ground truth in model space, the image embeddings of the model's own int8 encoder (the embeddings the product
decodes) and of the float teacher, cached on disk beside the data.

A training view is one slice of a labelled image, unflipped or flipped (flips are applied to the original
slice before preprocessing, as the dataset SDK does), preprocessed by the one function inference uses; files
holding the same image with different labels (the training tree splits one CT's labels over four files) are
one image with all their objects, encoded once. Its
ground truth is resized into the 256² model frame with `resize_mask`; an object is a label covering at least
`MIN_OBJECT_PIXELS` there. Embeddings are fp16 memory maps in `<data_root>/.click-cache/`, keyed by the
file's and the encoders' SHA-256, so a changed file or model is re-encoded and an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmedsam.data.cases import load_npz
from qmedsam.data.preprocess import geometry_for, preprocess_image, resize_mask
from qmedsam.datasets.manifest import labelled_split_entries
from qmedsam.files import atomic_write, sha256_file

log = logging.getLogger(__name__)

MIN_OBJECT_PIXELS = 10
"""An object smaller than this in the 256² frame is not trained on (the dataset SDK's `min_mask_pixels`)."""

FLIPS = ((False, False), (True, False), (False, True), (True, True))
"""(horizontal, vertical) flips; view 0 of a slice is always unflipped."""

Encode = Callable[[np.ndarray], np.ndarray]
"""(1, 3, 256, 256) float32 -> (1, 256, 64, 64) float32."""


@dataclass(frozen=True)
class ViewSet:
    """Cached training (or validation) views: `labels[i]` the 256² label map of view i (0 = background),
    `objects` the (view, label) pairs to train on; embeddings stay in their per-file memory maps
    (`where[i]` = (file part, row)) and are read per batch."""

    labels: np.ndarray
    resized: np.ndarray
    """(views, 2) height and width of the image inside the 256² frame (the rest is padding)."""
    objects: np.ndarray
    where: np.ndarray
    student_parts: tuple[np.ndarray, ...]
    teacher_parts: tuple[np.ndarray, ...] | None
    keys: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.objects)

    def student(self, views: Sequence[int]) -> np.ndarray:
        """(len(views), 256, 64, 64) float32 student embeddings."""
        return self._read(self.student_parts, views)

    def teacher(self, views: Sequence[int]) -> np.ndarray:
        if self.teacher_parts is None:
            raise ValueError("these views were cached without teacher embeddings")
        return self._read(self.teacher_parts, views)

    def _read(self, parts: tuple[np.ndarray, ...], views: Sequence[int]) -> np.ndarray:
        return np.stack([parts[self.where[v, 0]][self.where[v, 1]] for v in views]).astype(np.float32)


def _flip(array: np.ndarray, hflip: bool, vflip: bool) -> np.ndarray:
    if vflip:
        array = array[::-1]
    if hflip:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def _slices(path: Path, dimension: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    data = load_npz(path)
    for key in ("imgs", "gts"):
        if key not in data:
            raise ValueError(f"{path}: missing key '{key}' (a labelled training file has imgs and gts)")
    imgs, gts = data["imgs"], data["gts"]
    if dimension == 2:
        if gts.shape != imgs.shape[:2]:
            raise ValueError(f"{path}: gts {gts.shape} does not match imgs {imgs.shape}")
        return [imgs], [gts]
    if imgs.ndim != 3 or gts.shape != imgs.shape:
        raise ValueError(f"{path}: expected imgs and gts of the same (D, H, W) shape, got {imgs.shape}, {gts.shape}")
    return list(imgs), list(gts)


def _views_of(
    name: str, images: list[np.ndarray], gts: list[np.ndarray], slice_stride: int, views_per_slice: int, rng
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(image, 256² labels, key) of every kept view of an image: slices holding an object, every `slice_stride`-th."""
    out = []
    kept = [z for z, g in enumerate(gts) if g.any()][::slice_stride]
    for z in kept:
        flips = [FLIPS[0], *(FLIPS[1 + int(i)] for i in rng.permutation(3)[: views_per_slice - 1])]
        for hflip, vflip in flips:
            image = _flip(images[z], hflip, vflip)
            geometry = geometry_for(image.shape[0], image.shape[1])
            labels = resize_mask(_flip(gts[z], hflip, vflip).astype(np.uint16), geometry)
            out.append((image, labels, f"{name}:{z}:{'h' if hflip else ''}{'v' if vflip else ''}"))
    return out


def _same_image_groups(root: Path, entries: list[dict]) -> list[tuple[list[str], list[str], list, np.ndarray]]:
    """Labelled files grouped by identical `imgs` (a tree may split one scan's labels over several files): per
    group (file names, file SHA-256s, slices, merged label slices with each file's labels offset past the
    previous files'), in manifest order. One image is then encoded once, with all its objects."""
    groups: dict[str, tuple[list[str], list[str], list, np.ndarray]] = {}
    for entry in entries:
        path = root / entry["file"]
        images, gts = _slices(path, int(entry["dimension"]))
        stack = np.stack(images)
        key = hashlib.sha256(repr((stack.shape, stack.dtype.str)).encode() + stack.tobytes()).hexdigest()
        labels = np.stack(gts).astype(np.uint16)
        if key not in groups:
            groups[key] = ([path.name], [sha256_file(path)], images, labels)
            continue
        names, shas, _, merged = groups[key]
        offset = int(merged.max())
        merged[labels > 0] = labels[labels > 0] + offset
        names.append(path.name)
        shas.append(sha256_file(path))
    return list(groups.values())


def _cached_embeddings(cache: Path, images: Sequence[np.ndarray], encode: Encode, what: str) -> np.ndarray:
    """(n, 256, 64, 64) fp16 embeddings of `images`, read from `cache` or computed and written atomically."""
    if cache.is_file():
        array = np.load(cache, mmap_mode="r")
        if array.shape == (len(images), 256, 64, 64) and array.dtype == np.float16:
            return array
        log.warning("%s: unexpected shape %s, re-encoding", cache, array.shape)
    started = time.perf_counter()
    out = np.empty((len(images), 256, 64, 64), np.float16)
    for i, image in enumerate(images):
        tensor, _ = preprocess_image(image)
        out[i] = encode(tensor)[0]
    atomic_write(cache, lambda handle: np.save(handle, out))
    log.info("encoded %d views with the %s encoder in %.0f s", len(images), what, time.perf_counter() - started)
    return np.load(cache, mmap_mode="r")


def build_views(
    root: Path,
    split: str,
    student: tuple[str, Encode],
    teacher: tuple[str, Encode] | None,
    slice_stride: int = 1,
    views_per_slice: int = 1,
    max_views: int | None = None,
    seed: int = 0,
) -> ViewSet:
    """Every labelled file of `split` in the tree at `root`, as cached views. `student` / `teacher` are
    (identity, encode) pairs; the identity (a SHA-256 of the encoder's files) keys the cache. `max_views`
    keeps that many views spread evenly over the split (validation)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    cache_root = root / ".click-cache"
    groups = []
    for names, shas, images, merged in _same_image_groups(root, labelled_split_entries(root, split)):
        views = _views_of("+".join(names), images, list(merged), slice_stride, views_per_slice, rng)
        if views:
            groups.append((shas, views))
    total = sum(len(views) for _, views in groups)
    if not total:
        raise ValueError(f"{root}: no labelled slices in split {split!r}")
    keep = np.ones(total, bool)
    if max_views is not None and max_views < total:  # thinned before encoding: only kept views cost an encoder pass
        keep[:] = False
        keep[np.linspace(0, total - 1, max_views).round().astype(int)] = True
    labels, resized, objects, keys, where = [], [], [], [], []
    students, teachers = [], []
    offset = 0
    for shas, views in groups:
        local = np.flatnonzero(keep[offset : offset + len(views)])
        offset += len(views)
        if not len(local):
            continue
        views = [views[i] for i in local]
        recipe = [shas[0] if len(shas) == 1 else sorted(shas), slice_stride, views_per_slice, seed, split]
        if max_views is not None:  # which views of this image were kept is part of what is cached
            recipe.append(["kept", max_views, local.tolist()])
        stem = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
        images = [image for image, _, _ in views]
        students.append(_cached_embeddings(cache_root / f"{stem}-{student[0][:16]}.npy", images, student[1], "student"))
        if teacher is not None:
            teachers.append(
                _cached_embeddings(cache_root / f"{stem}-{teacher[0][:16]}.npy", images, teacher[1], "teacher")
            )
        for row, (image, view_labels, key) in enumerate(views):
            geometry = geometry_for(image.shape[0], image.shape[1])
            where.append((len(students) - 1, row))
            labels.append(view_labels)
            resized.append(geometry.resized)
            keys.append(key)
    chosen = np.arange(len(labels))
    label_maps = np.stack([labels[i] for i in chosen])
    for view, label_map in enumerate(label_maps):
        counts = np.bincount(label_map.ravel())
        for label in np.flatnonzero(counts >= MIN_OBJECT_PIXELS):
            if label:
                objects.append((view, int(label)))
    return ViewSet(
        labels=label_maps,
        resized=np.array([resized[i] for i in chosen], np.int64),
        objects=np.array(objects, np.int64).reshape(-1, 2),
        where=np.array([where[i] for i in chosen], np.int64),
        student_parts=tuple(students),
        teacher_parts=tuple(teachers) if teacher is not None else None,
        keys=tuple(keys[i] for i in chosen),
    )
