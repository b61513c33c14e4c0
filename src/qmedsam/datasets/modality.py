"""Training samples from a training tree: the QMedSAM seed's `ModalityDataset` / `GatherModalityDataset`, made lean.

Tree: `ROOT/<Modality>/<Dataset>/<name>.npz` (any depth below the modality folder), optional
`ROOT/manifest.json` with a `split` per file. A labelled file holds `imgs` and `gts`; an unlabelled one only
`imgs` (its samples train by distillation alone). `2D_` / `3D_` file-name prefixes say which is which
(else: `imgs` of ndim 2, or ndim 3 with 1 or 3 channels last, is 2D).

What a sample is
- Labelled: every slice (a 2D image is one slice) on which some label covers at least `min_mask_pixels`
  pixels after `resize_mask` into the model frame. Default `DEFAULT_MIN_MASK_PIXELS` = 10 px at 256²
  (about 160 px at the teacher's 1024²): smaller objects give boxes made mostly of margin noise.
- Unlabelled: every non-constant slice (a constant slice normalises to zeros and teaches nothing).
- `__getitem__` flips the ORIGINAL slice and its labels (augment=True: each axis with p = 0.5), then
  preprocesses through `qmedsam.data.preprocess` only, so the zero padding stays bottom/right as at
  inference. A labelled sample takes a random label among those with >= `min_mask_pixels` pixels on the
  (flipped) resized slice; if a flip makes every label fall under that (nearest-neighbour sampling of thin
  structures is not flip-symmetric) the sample is served unflipped. Box: the mask's tight box in model space
  (`mask_box`), each side widened by an independent random 0..bbox_shift px (inclusive), clipped to the
  resized extent [0, new_w - 1] x [0, new_h - 1] (pixel-index coordinates, like `mask_box`): never into the
  padding. Unlabelled: width and height each uniform in 10-60 % of the resized extent (rounded, >= 1 px),
  position uniform inside the extent; the mask is all zero and `labelled` is False.

Sampling per modality (`GatherModalityDataset(mod_sample=...)`, also `modify_mod_sample`), n = a modality's
number of 2D samples (`num_sources`), m = the smallest n: `"Min"` -> m each; `"OneTenth"` -> `max(n // 10, m)`
(floor division); `"All"` / None -> n; an int k -> min(k, n) (capping logs a warning); a list/tuple -> one
int-or-None per modality, in `mod_names()` order.

Determinism: the epoch's subset comes from an RNG seeded by (seed, crc32(modality name), epoch); each
sample's randomness (flips, label, margins, random box) from `np.random.default_rng((seed, crc32(name),
epoch, source index))`. Nothing depends on global or worker RNG state, so 0, 1 or 2 DataLoader workers and
every DDP rank see identical samples, and nothing is needed per worker (no `worker_init_fn`). `shuffle()`
advances the epoch and re-draws (the seed's per-epoch call); `set_epoch(e)` sets it explicitly.

DDP (every rank builds the dataset with the same arguments and seed, so lengths agree)::

    dataset = GatherModalityDataset(root, mod_sample="OneTenth", seed=1)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=1, drop_last=True)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)  # same subset and draws on every rank
        sampler.set_epoch(epoch)
        for batch in DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2):  # a `Sample` of batches
            ...

Ranks' index sets are disjoint and cover the dataset once when len(dataset) % world == 0; otherwise the
sampler pads by repeating unless drop_last=True. Keep `persistent_workers=False` (the default): a
persistent worker holds its own copy of the dataset and never sees `set_epoch` / `shuffle` from the main
process. A new `modify_mod_sample` changes len(dataset): make a new sampler after it.

Index and cache (built once per modality folder, reused; rebuilt per file whose size or mtime changed,
dropped for removed files, added for new ones; a different `INDEX_VERSION` or image size rebuilds):

    <modality>/.qmedsam-index/index-s256.json     version, image_size, files, skipped (JSON, no pickle)
    <modality>/.qmedsam-index/index-s256.lock     flock: concurrent builders (DDP ranks) build once
    <modality>/.qmedsam-index/arrays/<rel>.imgs.npy, <rel>.gts.npy   uncompressed, atomic tmp + os.replace

The index records, per file, its size and mtime, dimension, shape and a flat table of (slice, label,
pixels at model scale) triples (unlabelled: the usable slices); skipped files with their reason. When the
modality folder is not writable the same layout goes to `$QMEDSAM_CACHE/index/<name>-<sha256(abs path)[:16]>`
(else `${XDG_CACHE_HOME:-~/.cache}/qmedsam/index/...`); `cache_dir=` chooses that base explicitly.
Slices are read from the .npy files with `np.load(mmap_mode="r")`, opened lazily per process (at most
`MAX_OPEN_FILES` at once) and never pickled. Bad files (no `imgs`, `gts` of another shape, NaN or
infinite values, all-background labels, unreadable or truncated) are skipped at index time with one warning
naming file and reason, and listed in `dataset.skipped`.

Speed: a sample costs ~0.65 ms on the demo tree once glibc keeps the per-sample ~0.8 MB arrays on its heap
(`tune_allocator`, which DataLoader workers apply to themselves) and ~2.2 ms with glibc's defaults. A
DataLoader adds ~1.6 ms of inter-process transfer per batch: use batches of 4 or more with workers.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import hashlib
import json
import logging
import operator
import os
import tempfile
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, get_worker_info

from qmedsam.data.npz import NpzError, read_npz
from qmedsam.data.preprocess import MODEL_SIZE, Geometry, geometry_for, mask_box, preprocess_image, resize_mask
from qmedsam.datasets.manifest import MANIFEST_NAME, read_manifest
from qmedsam.files import atomic_write, atomic_write_bytes, default_cache_root

log = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_DIR_NAME = ".qmedsam-index"
DEFAULT_MIN_MASK_PIXELS = 10
UNLABELLED_BOX_FRACTION = (0.1, 0.6)
STRATEGIES = ("Min", "OneTenth", "All")
MAX_OPEN_FILES = 256
_SAVE_EVERY_S = 30.0  # a long index build is checkpointed, so an interrupted one resumes

ModSample = int | str | None | Sequence[int | None]


class Sample(NamedTuple):
    """One training sample; the first three fields are the seed's (image, mask, box)."""

    image: torch.Tensor  # (3, S, S) float32 in [0, 1], zero padding bottom/right
    mask: torch.Tensor  # (1, S, S) uint8 0/1; all zero when unlabelled
    box: torch.Tensor  # (4,) float32 [x0, y0, x1, y1], inclusive pixel indices in S-space
    labelled: bool
    label: int  # 0 when unlabelled
    flips: torch.Tensor  # (2,) int64 (hflip, vflip), applied to the original slice
    key: str  # "<Modality>/<rel file>:<slice>", stable id of the (unflipped) slice


class EmptyDatasetError(ValueError):
    """A folder that yields no samples (no .npz files, none in the split, or none usable)."""


class _Skip(Exception):
    """A file that cannot give samples; the message is the reason recorded in the index."""


# --------------------------------------------------------------------------------------------------
# Small helpers

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_tuned_pid: int | None = None


def tune_allocator(threshold: int = 32 << 20) -> bool:
    """Serve blocks under `threshold` bytes from glibc's heap instead of fresh mmaps; True when applied.

    Every sample allocates a few ~0.8 MB float32 arrays (inside `preprocess_image`). With its defaults glibc
    keeps serving such blocks with fresh mmaps and returning them with munmap, so every sample page-faults
    megabytes of zeroed memory, several times slower per sample (benchmarks/README.md, "Data loading").
    DataLoader workers call this themselves on their first sample (their process only serves the dataset);
    call it in the main process for num_workers=0, or set MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
    in the environment. RSS changed by < 5 MB. No-op (False) without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
    except (OSError, AttributeError):
        return False


def _tune_worker() -> None:
    """Once per DataLoader worker process (forked workers inherit the parent's flag, hence the pid)."""
    global _tuned_pid
    pid = os.getpid()
    if _tuned_pid != pid and get_worker_info() is not None:
        _tuned_pid = pid
        tune_allocator()


def _as_count(value: Any, what: str) -> int | None:
    """None or a non-negative int (numpy ints too; bools and floats refused)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int >= 0 or None, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an int >= 0 or None, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{what} must be >= 0, got {count}")
    return count


def mod_sample_counts(mod_sample: ModSample, sizes: Sequence[int], names: Sequence[str] = ()) -> list[int | None]:
    """Requested samples per modality for a strategy (None = all); capping to n happens in the dataset."""
    sizes = [int(n) for n in sizes]
    label = f" for modalities {list(names)}" if names else ""
    if isinstance(mod_sample, str):
        smallest = min(sizes) if sizes else 0
        key = mod_sample.lower()
        if key == "min":
            return [smallest] * len(sizes)
        if key == "onetenth":
            return [max(n // 10, smallest) for n in sizes]
        if key == "all":
            return [None] * len(sizes)
        raise ValueError(
            f"mod_sample={mod_sample!r} is not a strategy; expected one of {STRATEGIES}, an int, None or a list"
        )
    if isinstance(mod_sample, list | tuple):
        if len(mod_sample) != len(sizes):
            raise ValueError(
                f"mod_sample has {len(mod_sample)} entries; expected one per modality ({len(sizes)}){label}"
            )
        return [_as_count(v, f"mod_sample[{i}]") for i, v in enumerate(mod_sample)]
    return [_as_count(mod_sample, "mod_sample")] * len(sizes)


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, np.ascontiguousarray(array), allow_pickle=False))


def _save_json(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, json.dumps(payload, separators=(",", ":")).encode("utf-8"))


def _dir_writable(folder: Path) -> bool:
    """Whether `folder` (created if missing) accepts a new file; permissions alone lie for root and on RO mounts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
        return True
    except OSError:
        return False


def index_dir_for(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a modality folder's index and array cache live (see the module docstring)."""
    folder = Path(folder).resolve()
    tag = f"{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}"
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / tag
    local = folder / INDEX_DIR_NAME
    if _dir_writable(local):
        return local
    fallback = default_cache_root() / "index" / tag
    log.info("%s is not writable; keeping its index in %s", folder, fallback)
    return fallback


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock, so DDP ranks starting together build an index once (no-op where flock fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. some network file systems
            log.debug("no lock on %s (%s); building without one", path, exc)
        try:
            yield
        finally:
            with suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Indexing one file


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        arrays = read_npz(path, keys=("imgs", "gts"))
    except (NpzError, OSError) as exc:  # any damage (zip, CRC, header, dtype, I/O) skips the file, never the epoch
        raise _Skip(f"unreadable .npz ({exc})") from None
    if "imgs" not in arrays:
        raise _Skip("no 'imgs' array")
    return arrays["imgs"], arrays.get("gts")


def _dimension(name: str, imgs: np.ndarray) -> int:
    prefix = name[:3].upper()
    if prefix in ("2D_", "3D_"):
        return int(prefix[0])
    return 2 if imgs.ndim == 2 or (imgs.ndim == 3 and imgs.shape[2] in (1, 3)) else 3


def image_stack(name: str, imgs: np.ndarray) -> tuple[int, np.ndarray]:
    """(dimension, imgs as (D, H, W[, 3])) of a training file's image, checked as the dataset checks it.

    For readers outside the dataset (calibration slices from unlabelled files); raises ValueError.
    """
    try:
        dimension, stack, _ = _validate(name, imgs, None)
    except _Skip as exc:
        raise ValueError(str(exc)) from None
    return dimension, stack


def _validate(name: str, imgs: np.ndarray, gts: np.ndarray | None) -> tuple[int, np.ndarray, np.ndarray | None]:
    """-> (dimension, imgs as (D, H, W[, 3]), gts as (D, H, W) compact dtype or None); raises _Skip."""
    if imgs.dtype == np.bool_:
        imgs = imgs.astype(np.uint8)
    if imgs.dtype.kind not in "uif":
        raise _Skip(f"'imgs' has dtype {imgs.dtype}; expected a numeric image")
    dimension = _dimension(name, imgs)
    if dimension == 2:
        if imgs.ndim == 3 and imgs.shape[2] == 1:
            imgs = imgs[:, :, 0]
        if not (imgs.ndim == 2 or (imgs.ndim == 3 and imgs.shape[2] == 3)):
            raise _Skip(f"'imgs' has shape {imgs.shape}; expected (H, W, 3), (H, W, 1) or (H, W) for 2D")
        stack = imgs[None]
    else:
        if imgs.ndim != 3:
            raise _Skip(f"'imgs' has shape {imgs.shape}; expected (D, H, W) for 3D")
        stack = imgs
    if stack.size == 0:
        raise _Skip(f"'imgs' is empty (shape {imgs.shape})")
    if imgs.dtype.kind == "f" and not np.isfinite(imgs).all():
        raise _Skip("'imgs' holds NaN or infinite values")
    if gts is None:
        return dimension, stack, None
    if gts.dtype == np.bool_:
        gts = gts.astype(np.uint8)
    if gts.dtype.kind == "f":
        if not (np.isfinite(gts).all() and np.array_equal(gts, np.round(gts))):
            raise _Skip("'gts' holds non-integer, NaN or infinite values; expected integer labels")
        gts = gts.astype(np.int64)
    elif gts.dtype.kind not in "ui":
        raise _Skip(f"'gts' has dtype {gts.dtype}; expected integer labels")
    if dimension == 2 and gts.ndim == 3 and gts.shape[2] == 1:
        gts = gts[:, :, 0]
    labels = gts[None] if dimension == 2 else gts
    if labels.shape != stack.shape[:3]:
        spatial = stack.shape[1:3] if dimension == 2 else stack.shape[:3]
        raise _Skip(f"'gts' has shape {gts.shape}; expected the image's spatial shape {spatial}")
    if labels.min() < 0:
        raise _Skip("'gts' has negative labels; expected 0 (background) and 1..N")
    top = int(labels.max())
    if top == 0:
        raise _Skip("'gts' is all background (no label > 0)")
    if top > np.iinfo(np.int32).max:
        raise _Skip(f"'gts' has label {top}; at most {np.iinfo(np.int32).max} supported")
    compact = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32  # dtypes cv2 resizes
    return dimension, stack, labels.astype(compact, copy=False)


def _label_table(labels: np.ndarray, geometry: Geometry) -> list[int]:
    """Flat [slice, label, pixels at model scale, ...] for every slice that holds a label."""
    table: list[int] = []
    for z in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
        counts = np.bincount(resize_mask(labels[z], geometry).ravel())
        for label in np.flatnonzero(counts[1:]) + 1:
            table += [int(z), int(label), int(counts[label])]
    return table


# --------------------------------------------------------------------------------------------------
# One modality folder


class ModalityDataset(Dataset[Sample]):
    """The 2D samples of one modality folder (`ROOT/<Modality>`), a random subset drawn per epoch.

    `sample` None = every sample; an int larger than `num_sources` is capped with a warning. `buffer_len` is
    accepted for the seed's signature and unused: slices are memory-mapped, nothing is buffered.
    """

    def __init__(
        self,
        dataset_fp: str | os.PathLike,
        image_size: int = MODEL_SIZE,
        bbox_shift: int = 20,
        sample: int | None = None,
        shuffle: bool = True,
        buffer_len: int | None = None,
        augment: bool = True,
        logger: logging.Logger | None = None,
        *,
        split: str = "train",
        seed: int = 0,
        min_mask_pixels: int = DEFAULT_MIN_MASK_PIXELS,
        unlabelled: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.log = logger or log
        self.folder = Path(dataset_fp).expanduser().absolute()
        if not self.folder.is_dir():
            raise ValueError(f"dataset_fp {self.folder}: not a folder; expected ROOT/<Modality> of a training tree")
        for value, what, low in ((image_size, "image_size", 1), (bbox_shift, "bbox_shift", 0), (seed, "seed", 0)):
            if _as_count(value, what) is None or value < low:
                raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
        if _as_count(min_mask_pixels, "min_mask_pixels") is None or min_mask_pixels < 1:
            raise ValueError(f"min_mask_pixels must be an int >= 1, got {min_mask_pixels!r}")
        if not isinstance(split, str):
            raise ValueError(f"split must be a string ('train', 'validation' or 'all'), got {split!r}")
        self.name = self.folder.name
        self.root = self.folder.parent
        self.image_size = int(image_size)
        self.bbox_shift = int(bbox_shift)
        self.augment = bool(augment)
        self.reshuffle = bool(shuffle)
        self.buffer_len = buffer_len
        self.split = split
        self.seed = int(seed)
        self.min_mask_pixels = int(min_mask_pixels)
        self.unlabelled = bool(unlabelled)
        self._code = zlib.crc32(self.name.encode("utf-8"))
        self._epoch = 0
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()

        selected = self._select_files(split)
        self.index_dir = index_dir_for(self.folder, cache_dir)
        self.index_path = self.index_dir / f"index-s{self.image_size}.json"
        self.index_stats: dict[str, int] = {}
        files, skipped = self._update_index(selected)
        self._build_sources(selected, files, skipped)
        self.modify_sample(sample)

    # -- discovery and split ------------------------------------------------------------------

    def _discover(self) -> list[str]:
        found = []
        for path in self.folder.rglob("*.npz"):
            rel = path.relative_to(self.folder)
            if not any(part.startswith(".") for part in rel.parts) and path.is_file():
                found.append(rel.as_posix())
        return sorted(found)

    def _select_files(self, split: str) -> list[str]:
        self._all_files = self._discover()
        if not self._all_files:
            raise EmptyDatasetError(f"{self.folder}: no .npz files; expected <Dataset>/<name>.npz below it")
        manifest = read_manifest(self.root)
        if manifest is None:
            if split not in ("train", "all"):
                raise ValueError(
                    f"split={split!r} needs {self.root / MANIFEST_NAME}, which is absent or not a manifest"
                )
            return self._all_files
        if split == "all":
            return self._all_files
        selected, unlisted = [], []
        for rel in self._all_files:
            entry = manifest.get(f"{self.name}/{rel}")
            if entry is None:
                unlisted.append(rel)
            elif entry["split"] == split:
                selected.append(rel)
        if unlisted:
            self.log.warning(
                "%s: %d file(s) not in %s excluded from split %r (e.g. %s)",
                self.folder,
                len(unlisted),
                self.root / MANIFEST_NAME,
                split,
                ", ".join(unlisted[:3]),
            )
        if not selected:
            raise EmptyDatasetError(f"{self.folder}: no files in split {split!r} of {self.root / MANIFEST_NAME}")
        return selected

    # -- index ----------------------------------------------------------------------------------

    def _array_path(self, rel: str, kind: str) -> Path:
        return self.index_dir / "arrays" / f"{rel}.{kind}.npy"

    def _read_index(self) -> dict | None:
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.log.warning("%s: unreadable index (%s); rebuilding it", self.index_path, exc)
            return None
        if (
            not isinstance(index, dict)
            or index.get("version") != INDEX_VERSION
            or index.get("image_size") != self.image_size
            or not isinstance(index.get("files"), dict)
            or not isinstance(index.get("skipped"), dict)
        ):
            self.log.info("%s: index of another version or image size; rebuilding it", self.index_path)
            return None
        return index

    def _write_index(self, files: dict, skipped: dict) -> None:
        payload = {
            "format": "qmedsam dataset index",
            "version": INDEX_VERSION,
            "image_size": self.image_size,
            "folder": str(self.folder),
            "files": files,
            "skipped": skipped,
        }
        _save_json(self.index_path, payload)

    def _index_file(self, rel: str, stat: tuple[int, int]) -> dict:
        """Read, validate and cache one file; -> its index record (raises _Skip)."""
        imgs, gts = _read_arrays(self.folder / rel)
        dimension, stack, labels = _validate(Path(rel).name, imgs, gts)
        geometry = geometry_for(stack.shape[1], stack.shape[2], self.image_size)
        record: dict[str, Any] = {
            "size": stat[0],
            "mtime_ns": stat[1],
            "dimension": dimension,
            "labelled": labels is not None,
            "shape": list(stack.shape),
            "dtype": str(stack.dtype),
        }
        if labels is not None:
            record["table"] = _label_table(labels, geometry)
        else:
            flat = stack.reshape(stack.shape[0], -1)
            usable = np.flatnonzero(flat.max(axis=1) > flat.min(axis=1))
            if len(usable) == 0:
                raise _Skip("'imgs' is constant (no contrast); an unlabelled file needs some")
            record["usable"] = usable.tolist()
        _save_npy(self._array_path(rel, "imgs"), stack)
        if labels is not None:
            _save_npy(self._array_path(rel, "gts"), labels)
        return record

    def _cached(self, rel: str, record: dict) -> bool:
        if not self._array_path(rel, "imgs").is_file():
            return False
        return not record["labelled"] or self._array_path(rel, "gts").is_file()

    def _drop_arrays(self, rel: str) -> None:
        for kind in ("imgs", "gts"):
            self._array_path(rel, kind).unlink(missing_ok=True)

    def _update_index(self, selected: list[str]) -> tuple[dict, dict]:
        """Reuse, refresh, extend and prune the folder's index for the selected files."""
        stats = {"reused": 0, "indexed": 0, "removed": 0}
        with _locked(self.index_path.with_suffix(".lock")):
            index = self._read_index()
            files: dict[str, dict] = index["files"] if index else {}
            skipped: dict[str, dict] = index["skipped"] if index else {}
            changed = index is None
            present = set(self._all_files)
            for rel in [r for r in [*files, *skipped] if r not in present]:
                files.pop(rel, None)
                skipped.pop(rel, None)
                self._drop_arrays(rel)
                stats["removed"] += 1
                changed = True
            todo = []
            for rel in selected:
                try:
                    st = (self.folder / rel).stat()
                except OSError as exc:  # vanished since discovery: not in this dataset, nothing recorded
                    self.log.warning("%s: skipped (%s)", self.folder / rel, exc)
                    continue
                stat = (st.st_size, st.st_mtime_ns)
                old = files.get(rel) or skipped.get(rel)
                if old and (old["size"], old["mtime_ns"]) == stat and (rel in skipped or self._cached(rel, old)):
                    stats["reused"] += 1
                else:
                    todo.append((rel, stat))
            if todo:
                self.log.info("%s: indexing %d file(s) into %s", self.folder, len(todo), self.index_dir)
            start = last_save = time.monotonic()
            for rel, stat in todo:
                files.pop(rel, None)
                skipped.pop(rel, None)
                try:
                    files[rel] = self._index_file(rel, stat)
                except _Skip as reason:
                    self._drop_arrays(rel)
                    skipped[rel] = {"size": stat[0], "mtime_ns": stat[1], "reason": str(reason)}
                    self.log.warning("%s: skipped (%s)", self.folder / rel, reason)
                stats["indexed"] += 1
                changed = True
                if time.monotonic() - last_save > _SAVE_EVERY_S:
                    self._write_index(files, skipped)
                    last_save = time.monotonic()
            if changed:
                self._write_index(files, skipped)
            if todo:
                self.log.info("%s: indexed %d file(s) in %.1f s", self.folder, len(todo), time.monotonic() - start)
        stats["skipped"] = sum(rel in skipped for rel in selected)
        self.index_stats = stats
        return files, skipped

    def _build_sources(self, selected: list[str], files: dict, skipped: dict) -> None:
        self.skipped: dict[str, str] = {}
        self._files: list[str] = []
        self._labelled: list[bool] = []
        self._shapes: list[tuple[int, ...]] = []
        src_file, src_slice = [], []
        for rel in selected:
            if rel in skipped:
                self.skipped[f"{self.name}/{rel}"] = skipped[rel]["reason"]
                continue
            record = files.get(rel)
            if record is None:
                continue
            if record["labelled"]:
                table = np.asarray(record["table"], dtype=np.int64).reshape(-1, 3)
                slices = np.unique(table[table[:, 2] >= self.min_mask_pixels, 0])
            elif self.unlabelled:
                slices = np.asarray(record["usable"], dtype=np.int64)
            else:
                continue
            if len(slices) == 0:
                continue
            src_file.append(np.full(len(slices), len(self._files), dtype=np.int32))
            src_slice.append(slices.astype(np.int32))
            self._files.append(rel)
            self._labelled.append(bool(record["labelled"]))
            self._shapes.append(tuple(record["shape"]))
        if self.skipped and self.index_stats["indexed"] == 0:
            self.log.info("%s: %d file(s) skipped (reasons in .skipped)", self.folder, len(self.skipped))
        if not src_file:
            raise EmptyDatasetError(
                f"{self.folder}: no usable samples in split {self.split!r} "
                f"({len(selected)} file(s), {len(self.skipped)} skipped: {self.skipped})"
            )
        self._src_file = np.concatenate(src_file)
        self._src_slice = np.concatenate(src_slice)
        self.num_sources = len(self._src_file)

    # -- subset and epochs ----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def modify_sample(self, sample: int | None) -> None:
        """Serve `sample` samples per epoch (None = all; capped at num_sources with a warning)."""
        count = _as_count(sample, "sample")
        if count is not None and count > self.num_sources:
            self.log.warning(
                "%s: sample=%d > %d available samples; using %d", self.name, count, self.num_sources, self.num_sources
            )
        self.num_samples = self.num_sources if count is None else min(count, self.num_sources)
        self._draw()

    def _draw(self) -> None:
        n, k = self.num_sources, self.num_samples
        if k >= n:
            self._subset = np.arange(n, dtype=np.int64)
            return
        epoch = self._epoch if self.reshuffle else 0
        rng = np.random.default_rng((self.seed, self._code, epoch))
        self._subset = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch explicitly (training loops, DDP ranks) and re-draw the subset."""
        epoch = _as_count(epoch, "epoch")
        if epoch is None:
            raise ValueError("epoch must be an int >= 0, got None")
        self._epoch = epoch
        self._draw()

    def shuffle(self) -> None:
        """Next epoch: new subset (when shuffle=True and sample < num_sources) and new per-sample draws."""
        self.set_epoch(self._epoch + 1)

    # -- samples --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_samples

    def _source(self, index: int) -> int:
        index = operator.index(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return int(self._subset[index])

    def sample_key(self, index: int) -> str:
        """The sample's slice id without reading it."""
        source = self._source(index)
        return f"{self.name}/{self._files[self._src_file[source]]}:{int(self._src_slice[source])}"

    def sample_keys(self) -> list[str]:
        return [self.sample_key(i) for i in range(self.num_samples)]

    def _arrays(self, file_id: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The file's cached arrays, memory-mapped on first use in this process (LRU-bounded)."""
        arrays = self._open.get(file_id)
        if arrays is not None:
            self._open.move_to_end(file_id)
            return arrays
        rel = self._files[file_id]
        imgs = np.load(self._array_path(rel, "imgs"), mmap_mode="r", allow_pickle=False)
        gts = (
            np.load(self._array_path(rel, "gts"), mmap_mode="r", allow_pickle=False)
            if self._labelled[file_id]
            else None
        )
        if imgs.shape != self._shapes[file_id] or (gts is not None and gts.shape != imgs.shape[:3]):
            raise RuntimeError(f"{self.index_dir}: cached arrays of {rel} do not match the index; delete the folder")
        self._open[file_id] = (imgs, gts)
        if len(self._open) > MAX_OPEN_FILES:
            self._open.popitem(last=False)
        return imgs, gts

    def __getitem__(self, index: int) -> Sample:
        _tune_worker()
        source = self._source(index)
        file_id, z = int(self._src_file[source]), int(self._src_slice[source])
        rng = np.random.default_rng((self.seed, self._code, self._epoch, source))
        hflip, vflip = (bool(f) for f in rng.random(2) < 0.5) if self.augment else (False, False)
        imgs, gts = self._arrays(file_id)
        key = f"{self.name}/{self._files[file_id]}:{z}"
        if gts is None:
            return self._unlabelled(imgs[z], hflip, vflip, rng, key)
        return self._labelled_sample(imgs[z], gts[z], hflip, vflip, rng, key)

    @staticmethod
    def _flip(array: np.ndarray, hflip: bool, vflip: bool) -> np.ndarray:
        """Flipped copy (cv2 wants positive strides); an unflipped slice stays a view of the memory map."""
        if vflip:
            array = array[::-1]
        if hflip:
            array = array[:, ::-1]
        return np.ascontiguousarray(array) if hflip or vflip else array

    def _labelled_sample(
        self, image: np.ndarray, labels: np.ndarray, hflip: bool, vflip: bool, rng: np.random.Generator, key: str
    ) -> Sample:
        geometry = geometry_for(image.shape[0], image.shape[1], self.image_size)
        for flips in ((hflip, vflip), (False, False)):
            resized = resize_mask(self._flip(labels, *flips), geometry)
            counts = np.bincount(resized.ravel())
            counts[0] = 0
            eligible = np.flatnonzero(counts >= self.min_mask_pixels)
            if len(eligible):
                break
        else:  # the index said this slice has a label this large unflipped: the cache changed under us
            raise RuntimeError(f"{key}: no label of >= {self.min_mask_pixels} px; the index is stale, delete it")
        hflip, vflip = flips
        label = int(eligible[rng.integers(len(eligible))])
        mask = resized == label
        x0, y0, x1, y1 = mask_box(mask).tolist()
        m = rng.integers(0, self.bbox_shift + 1, size=4).tolist()
        new_h, new_w = geometry.resized
        box = np.array(
            [max(0, x0 - m[0]), max(0, y0 - m[1]), min(new_w - 1, x1 + m[2]), min(new_h - 1, y1 + m[3])],
            dtype=np.float32,
        )
        tensor, _ = preprocess_image(self._flip(image, hflip, vflip), self.image_size)
        return Sample(
            image=torch.from_numpy(tensor[0]),
            mask=torch.from_numpy(mask.view(np.uint8)[None]),
            box=torch.from_numpy(box),
            labelled=True,
            label=label,
            flips=torch.tensor([hflip, vflip], dtype=torch.int64),
            key=key,
        )

    def _unlabelled(self, image: np.ndarray, hflip: bool, vflip: bool, rng: np.random.Generator, key: str) -> Sample:
        tensor, geometry = preprocess_image(self._flip(image, hflip, vflip), self.image_size)
        new_h, new_w = geometry.resized
        low, high = UNLABELLED_BOX_FRACTION
        frac_w, frac_h = rng.uniform(low, high, size=2)
        box_w = min(new_w, max(1, round(frac_w * new_w)))
        box_h = min(new_h, max(1, round(frac_h * new_h)))
        x0 = int(rng.integers(0, new_w - box_w + 1))
        y0 = int(rng.integers(0, new_h - box_h + 1))
        box = np.array([x0, y0, x0 + box_w - 1, y0 + box_h - 1], dtype=np.float32)
        size = self.image_size
        return Sample(
            image=torch.from_numpy(tensor[0]),
            mask=torch.zeros((1, size, size), dtype=torch.uint8),
            box=torch.from_numpy(box),
            labelled=False,
            label=0,
            flips=torch.tensor([hflip, vflip], dtype=torch.int64),
            key=key,
        )

    # -- pickling (DataLoader workers with spawn, DDP) -------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # memory maps are reopened lazily in the receiving process
        return state

    def __repr__(self) -> str:
        return (
            f"ModalityDataset({str(self.folder)!r}, split={self.split!r}, samples={self.num_samples}/"
            f"{self.num_sources}, epoch={self._epoch}, skipped={len(self.skipped)})"
        )


# --------------------------------------------------------------------------------------------------
# Several modalities


class GatherModalityDataset(ConcatDataset[Sample]):
    """Every modality of a tree (a str/Path root: each sub-folder is one) or of a list of modality folders,
    concatenated (torch's `ConcatDataset`; its offsets follow each modality's per-epoch sample count).

    Modality folders of a root that yield no samples (e.g. none in the split) are dropped with a warning and
    listed in `.dropped`; an explicitly listed folder must yield samples. See the module docstring for the
    `mod_sample` strategies.
    """

    def __init__(
        self,
        dataset_fp: str | os.PathLike | Sequence[str | os.PathLike],
        image_size: int = MODEL_SIZE,
        bbox_shift: int = 20,
        mod_sample: ModSample = 1000,
        shuffle: bool = True,
        buffer_len: int | None = None,
        augment: bool = True,
        logger: logging.Logger | None = None,
        *,
        split: str = "train",
        seed: int = 0,
        min_mask_pixels: int = DEFAULT_MIN_MASK_PIXELS,
        unlabelled: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.log = logger or log
        self.dropped: dict[str, str] = {}
        from_root = isinstance(dataset_fp, str | os.PathLike)
        if from_root:
            root = Path(dataset_fp).expanduser()
            if not root.is_dir():
                raise ValueError(f"dataset_fp {root}: not a folder; expected ROOT of ROOT/<Modality>/<Dataset>/*.npz")
            folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not folders:
                raise ValueError(f"dataset_fp {root}: no modality folders; expected ROOT/<Modality>/<Dataset>/*.npz")
        else:
            folders = [Path(p).expanduser() for p in dataset_fp]
            if not folders:
                raise ValueError("dataset_fp is an empty list; expected modality folders")
        names = [f.name for f in folders]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset_fp: modality folder names must be unique (they key samples), got {names}")
        datasets: list[ModalityDataset] = []
        for folder in folders:
            try:
                dataset = ModalityDataset(
                    folder,
                    image_size,
                    bbox_shift,
                    None,
                    shuffle,
                    buffer_len,
                    augment,
                    logger,
                    split=split,
                    seed=seed,
                    min_mask_pixels=min_mask_pixels,
                    unlabelled=unlabelled,
                    cache_dir=cache_dir,
                )
            except EmptyDatasetError as exc:
                if not from_root:
                    raise
                self.log.warning("modality %s dropped: %s", folder.name, exc)
                self.dropped[folder.name] = str(exc)
                continue
            datasets.append(dataset)
        if not datasets:
            raise ValueError(f"dataset_fp {dataset_fp}: no modality folder yields samples ({self.dropped})")
        super().__init__(datasets)
        self.datasets: list[ModalityDataset] = datasets
        self.modify_mod_sample(mod_sample)

    @property
    def skipped(self) -> dict[str, str]:
        """{ROOT-relative file: reason} of every skipped file."""
        return {k: v for d in self.datasets for k, v in d.skipped.items()}

    @property
    def epoch(self) -> int:
        return self.datasets[0].epoch

    def mod_names(self) -> list[str]:
        return [d.name for d in self.datasets]

    def mod_samples(self) -> list[int]:
        """Samples served per modality this epoch."""
        return [len(d) for d in self.datasets]

    def mod_sources(self) -> list[int]:
        """Samples available per modality (n in the strategies)."""
        return [d.num_sources for d in self.datasets]

    def modify_mod_sample(self, mod_sample: ModSample) -> None:
        """Apply a strategy ("Min", "OneTenth", "All"), an int, None or a per-modality list."""
        counts = mod_sample_counts(mod_sample, self.mod_sources(), self.mod_names())
        self.mod_sample = mod_sample
        for dataset, count in zip(self.datasets, counts, strict=True):
            dataset.modify_sample(count)
        self.cumulative_sizes = self.cumsum(self.datasets)

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)

    def shuffle(self) -> None:
        """The seed's per-epoch call: every modality advances its epoch and re-draws."""
        for dataset in self.datasets:
            dataset.shuffle()

    def _locate(self, index: int) -> tuple[ModalityDataset, int]:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        which = bisect.bisect_right(self.cumulative_sizes, index)
        return self.datasets[which], index - (self.cumulative_sizes[which - 1] if which else 0)

    def sample_key(self, index: int) -> str:
        dataset, local = self._locate(index)
        return dataset.sample_key(local)

    def sample_keys(self) -> list[str]:
        return [k for d in self.datasets for k in d.sample_keys()]

    def __getitem__(self, index: int) -> Sample:
        dataset, local = self._locate(index)
        return dataset[local]

    def __repr__(self) -> str:
        mods = ", ".join(
            f"{n}={s}/{a}" for n, s, a in zip(self.mod_names(), self.mod_samples(), self.mod_sources(), strict=True)
        )
        return f"GatherModalityDataset({mods}, epoch={self.epoch})"
