"""Challenge-format case files: read and validate untrusted `.npz` inputs, write outputs atomically.

Every problem is reported with the file, the key and what was expected, so a batch run can skip one bad
case and say exactly why. Recoverable oddities (a box partly outside the image) become warnings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from qmedsam.data.npz import NpzError, read_npz
from qmedsam.files import atomic_savez

MAX_IMAGE_AXIS = 65_535  # voxels along any image axis (OpenCV and the C++ predictor index with int)
MAX_BOX_COORDINATE = 2**31 - 1  # a box value past this is no pixel coordinate (and would wrap in int64 casts)


class CaseError(ValueError):
    """A case file that cannot be segmented; the message names file, key and expectation."""


@dataclass
class Case:
    """One validated case: image, boxes (clipped to the image, int64) and optional spacing."""

    path: Path
    dimension: Literal[2, 3]
    image: np.ndarray  # 2D: (H, W, 3); 3D: (D, H, W)
    boxes: np.ndarray  # 2D: (N, 4) x0 y0 x1 y1; 3D: (N, 6) x0 y0 z0 x1 y1 z1 (inclusive)
    spacing: tuple[float, float, float] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def modality(self) -> str:
        return modality_of(self.path.name)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the segmentation: (H, W) for 2D, (D, H, W) for 3D."""
        return tuple(self.image.shape[:2]) if self.dimension == 2 else tuple(self.image.shape)


def modality_of(file_name: str) -> str:
    """The modality is the second `_`-separated token: `3D_CT_Abdomen_0007.npz` -> `CT`."""
    parts = Path(file_name).stem.split("_")
    return parts[1] if len(parts) > 1 else "unknown"


def segmentation_dtype(n_objects: int) -> np.dtype:
    """Smallest unsigned dtype that holds labels 0..n_objects (the baseline's uint8 broke above 255)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_objects <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz under the npz contract (`qmedsam.data.npz`); a broken file becomes CaseError."""
    path = Path(path)
    if not path.exists():
        raise CaseError(f"{path}: file not found")
    if not path.is_file():
        raise CaseError(f"{path}: not a regular file")
    try:
        return read_npz(path)
    except NpzError as exc:
        raise CaseError(f"{path}: not a readable .npz ({exc})") from None
    except OSError as exc:
        raise CaseError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _dimension_from_name(path: Path) -> int | None:
    prefix = path.name[:2].upper()
    return {"2D": 2, "3D": 3}.get(prefix)


def _validate_image(path: Path, image: np.ndarray, dimension: int, warnings: list[str]) -> np.ndarray:
    if image.dtype.kind not in "uif" and image.dtype != np.bool_:
        raise CaseError(f"{path}: key 'imgs' has dtype {image.dtype}; expected a numeric image (uint8 preferred)")
    if dimension == 2:
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = np.ascontiguousarray(image[:, :, :3])
            warnings.append(f"{path.name}: key 'imgs' is RGBA {image.shape[:2] + (4,)}; alpha channel dropped")
        elif not (image.ndim == 3 and image.shape[2] == 3):
            raise CaseError(
                f"{path}: key 'imgs' has shape {image.shape}; expected (H, W, 3), (H, W, 4) RGBA, (H, W, 1) or (H, W) "
                "for a 2D case"
            )
    elif image.ndim != 3:
        raise CaseError(f"{path}: key 'imgs' has shape {image.shape}; expected (D, H, W) for a 3D case")
    if min(image.shape) == 0:
        raise CaseError(f"{path}: key 'imgs' is empty (shape {image.shape})")
    if max(image.shape) > MAX_IMAGE_AXIS:
        raise CaseError(
            f"{path}: key 'imgs' has shape {image.shape}; expected at most {MAX_IMAGE_AXIS} along each axis"
        )
    if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
        raise CaseError(f"{path}: key 'imgs' contains NaN or infinite values")
    if image.dtype == np.bool_:
        image = image.astype(np.uint8)
    return image


def _validate_boxes(path: Path, boxes: np.ndarray, dimension: int, shape: tuple[int, ...], warnings: list[str]):
    width = 4 if dimension == 2 else 6
    boxes = np.asarray(boxes)
    if boxes.dtype.kind not in "uif":
        raise CaseError(f"{path}: key 'boxes' has dtype {boxes.dtype}; expected numbers")
    if boxes.ndim == 1 and boxes.size == width:
        boxes = boxes[None, :]
    if boxes.size == 0:
        raise CaseError(f"{path}: key 'boxes' is empty; expected at least one box of {width} numbers")
    if boxes.ndim != 2 or boxes.shape[1] != width:
        raise CaseError(f"{path}: key 'boxes' has shape {boxes.shape}; expected (N, {width}) for a {dimension}D case")
    if not np.all(np.isfinite(boxes)):
        rows = sorted(set(np.where(~np.isfinite(boxes))[0].tolist()))
        raise CaseError(f"{path}: key 'boxes' has NaN or infinite values in rows {rows}")
    beyond = np.abs(boxes.astype(np.float64)) > MAX_BOX_COORDINATE
    if np.any(beyond):
        rows = sorted(set(np.where(beyond)[0].tolist()))
        raise CaseError(
            f"{path}: key 'boxes' has values beyond +-{MAX_BOX_COORDINATE} in rows {rows}; expected pixel coordinates"
        )
    boxes = np.rint(boxes).astype(np.int64)
    half = width // 2
    lo, hi = boxes[:, :half], boxes[:, half:]
    # Axis order of the box columns: x, y(, z); array axes are (y, x) or (z, y, x).
    extents = [shape[1], shape[0]] if dimension == 2 else [shape[2], shape[1], shape[0]]
    axis_names = "xyz"
    for row in range(len(boxes)):
        for a in range(half):
            if hi[row, a] < lo[row, a]:
                raise CaseError(
                    f"{path}: key 'boxes' row {row} is inverted ({axis_names[a]}_max {hi[row, a]} < "
                    f"{axis_names[a]}_min {lo[row, a]})"
                )
            if hi[row, a] < 0 or lo[row, a] > extents[a] - 1:
                raise CaseError(
                    f"{path}: key 'boxes' row {row} lies outside the image along {axis_names[a]} "
                    f"([{lo[row, a]}, {hi[row, a]}] vs size {extents[a]})"
                )
        if hi[row, 0] == lo[row, 0] or hi[row, 1] == lo[row, 1]:
            raise CaseError(
                f"{path}: key 'boxes' row {row} has zero width or height ({boxes[row].tolist()}); "
                "expected x_max > x_min and y_max > y_min"
            )
    clipped = boxes.copy()
    for a in range(half):
        clipped[:, a] = np.clip(lo[:, a], 0, extents[a] - 1)
        clipped[:, half + a] = np.clip(hi[:, a], 0, extents[a] - 1)
    changed = np.where(np.any(clipped != boxes, axis=1))[0]
    if len(changed):
        warnings.append(f"{path.name}: boxes {changed.tolist()} extend outside the image; clipped to it")
    return clipped


def _validate_spacing(path: Path, data: dict[str, np.ndarray], warnings: list[str]):
    if "spacing" not in data:
        return None
    spacing = np.asarray(data["spacing"], dtype=np.float64).ravel() if data["spacing"].dtype.kind in "uif" else None
    if spacing is None or spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        warnings.append(f"{path.name}: key 'spacing' is {data['spacing']!r}; expected 3 positive numbers, ignored")
        return None
    return (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def read_case(path: str | os.PathLike) -> Case:
    """Read and validate one challenge case (`imgs`, `boxes`, optional `spacing`)."""
    path = Path(path)
    data = load_npz(path)
    for key in ("imgs", "boxes"):
        if key not in data:
            raise CaseError(f"{path}: missing key '{key}' (found keys: {sorted(data)})")
    boxes = np.asarray(data["boxes"])
    dimension = _dimension_from_name(path)
    if dimension is None:
        if boxes.ndim == 2 and boxes.shape[1] in (4, 6):
            dimension = 2 if boxes.shape[1] == 4 else 3
        else:
            dimension = image_dimension(data["imgs"])
    warnings: list[str] = []
    image = _validate_image(path, data["imgs"], dimension, warnings)
    shape = image.shape[:2] if dimension == 2 else image.shape
    boxes = _validate_boxes(path, boxes, dimension, tuple(shape), warnings)
    spacing = _validate_spacing(path, data, warnings)
    return Case(path=path, dimension=dimension, image=image, boxes=boxes, spacing=spacing, warnings=warnings)


def image_dimension(image: np.ndarray) -> Literal[2, 3]:
    """2 for (H, W), (H, W, 1), (H, W, 3) or RGBA (H, W, 4) images, else 3 (a (D, H, W) volume)."""
    return 2 if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)) else 3


def validated_image(
    image: np.ndarray, dimension: Literal[2, 3], source: str, warnings: list[str] | None = None
) -> np.ndarray:
    """An in-memory image checked as `read_case` checks a file's `imgs` (2D grey becomes (H, W, 3), RGBA loses
    alpha); recoverable oddities are appended to `warnings` when given."""
    return _validate_image(Path(source), np.asarray(image), dimension, [] if warnings is None else warnings)


def case_from_arrays(image: np.ndarray, boxes: np.ndarray, dimension: Literal[2, 3], source: str) -> Case:
    """A validated case from in-memory arrays (the Python API), checked exactly as `read_case` checks a file;
    `source` names the arrays in error messages (e.g. 'segment_2d')."""
    if dimension not in (2, 3):
        raise CaseError(f"{source}: dimension must be 2 or 3, got {dimension!r}")
    path = Path(source)
    warnings: list[str] = []
    image = validated_image(image, dimension, source, warnings)
    shape = image.shape[:2] if dimension == 2 else image.shape
    boxes = _validate_boxes(path, np.asarray(boxes), dimension, tuple(shape), warnings)
    return Case(path=path, dimension=dimension, image=image, boxes=boxes, warnings=warnings)


def read_ground_truth(path: str | os.PathLike, key: str = "gts") -> np.ndarray:
    """Read a ground-truth label array (integer labels 1..N, 0 = background)."""
    path = Path(path)
    data = load_npz(path)
    if key not in data:
        raise CaseError(f"{path}: missing key '{key}' (found keys: {sorted(data)})")
    labels = data[key]
    if labels.dtype.kind not in "uib":
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise CaseError(f"{path}: key '{key}' has dtype {labels.dtype}; expected integer labels")
    if labels.size and labels.min() < 0:
        raise CaseError(f"{path}: key '{key}' has negative labels; expected 0 (background) and 1..N")
    return labels


def write_segmentation(out_dir: str | os.PathLike, case_name: str, segs: np.ndarray) -> Path:
    """Write `segs` for a case under the same file name, atomically."""
    return atomic_savez(Path(out_dir) / case_name, segs=segs)
