"""Read a NIfTI scan (or label map) and write a label map on exactly its grid."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qmedsam.data.cases import segmentation_dtype
from qmedsam.data.npz import MAX_BYTES_ENV, max_case_bytes
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_write_bytes
from qmedsam.scans.orientation import VoxelMapping

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


@dataclass
class Scan:
    """A 3D scan in its file's voxel order, with the geometry an output must keep."""

    path: Path
    array: np.ndarray  # (I, J, K) as stored (scaled by the header's slope/intercept)
    affine: np.ndarray
    header: Any  # nibabel header of the input (qform/sform codes, zooms)
    modality: str | None = None  # known for DICOM; None for NIfTI


def _squeeze_to_3d(path: Path, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in data_shape)
    if len(shape) == 3:
        return shape
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        return shape[:3]
    if len(shape) == 2:
        raise UserFacingError(f"{path}: a 2D image (shape {shape}); expected a 3D volume (I, J, K)")
    raise UserFacingError(f"{path}: a {len(shape)}D image (shape {shape}); expected one 3D volume, not a series")


def read_nifti(path: str | Path) -> Scan:
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(str(path))
    except FileNotFoundError:
        raise UserFacingError(f"{path}: file not found") from None
    except Exception as exc:  # nibabel raises several types for a broken file
        raise UserFacingError(f"{path}: not a readable NIfTI file ({exc})") from None
    shape = _squeeze_to_3d(path, image.shape)
    declared, limit = int(np.prod(image.shape, dtype=object)) * image.get_data_dtype().itemsize, max_case_bytes()
    if declared > limit:  # nibabel allocates the declared size before it reads a .nii.gz
        raise UserFacingError(
            f"{path}: header declares {declared} bytes of voxels (shape {image.shape}), more than the "
            f"{limit}-byte limit ({MAX_BYTES_ENV} changes it)"
        )
    try:
        array = np.asarray(image.dataobj).reshape(shape)
    except Exception as exc:
        raise UserFacingError(f"{path}: cannot read the voxel data ({exc})") from None
    if array.dtype.kind not in "uif":
        raise UserFacingError(f"{path}: voxel data type {array.dtype} is not numeric")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise UserFacingError(f"{path}: voxel data holds NaN or infinite values")
    if min(shape) == 0:
        raise UserFacingError(f"{path}: empty volume (shape {shape})")
    return Scan(path, array, np.asarray(image.affine, dtype=np.float64), image.header)


def same_grid(a: Scan, b: Scan, atol: float = 1e-3) -> bool:
    return a.array.shape == b.array.shape and np.allclose(a.affine, b.affine, atol=atol)


def on_grid_of(scan: Scan, other: Scan, atol: float = 1e-3) -> np.ndarray | None:
    """`other`'s voxels in `scan`'s voxel order if both cover the same voxels (the same grid stored in another
    axis order or direction, as DICOM converters differ on), else None."""
    import nibabel as nib

    if same_grid(scan, other, atol):
        return other.array
    ornt = nib.orientations
    try:
        transform = ornt.ornt_transform(ornt.io_orientation(other.affine), ornt.io_orientation(scan.affine))
    except ValueError:
        return None
    moved = nib.Nifti1Image(other.array, other.affine).as_reoriented(transform)
    if moved.shape == scan.array.shape and np.allclose(moved.affine, scan.affine, atol=atol):
        return np.asarray(moved.dataobj)
    return None


def write_label_nifti(labels: np.ndarray, like: Scan, path: Path) -> None:
    """Label map (file voxel order) on the grid of `like`: same shape, affine, qform/sform and codes;
    the smallest unsigned integer dtype; no intensity scaling. Written atomically."""
    import nibabel as nib

    if labels.shape != like.array.shape:
        raise ValueError(f"label map shape {labels.shape} is not the scan's {like.array.shape}")
    dtype = segmentation_dtype(int(labels.max()) if labels.size else 0)
    out = nib.Nifti1Image(labels.astype(dtype), like.affine, like.header.copy())
    out.set_data_dtype(dtype)
    # the input's own qform/sform and codes, unset ones included (None, code 0), so a reader derives the same affine
    qform, qcode = like.header.get_qform(coded=True)
    sform, scode = like.header.get_sform(coded=True)
    out.set_qform(qform, int(qcode))
    out.set_sform(sform, int(scode))
    out.header.set_slope_inter(1.0, 0.0)
    out.header["descrip"] = b"qmedsam labels"
    payload = out.to_bytes()
    atomic_write_bytes(path, gzip.compress(payload, mtime=0) if Path(path).name.endswith(".gz") else payload)


def to_zyx(img) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A nibabel image -> the working (z, y, x) array, mapped exactly as `predict` maps a scan
    (`VoxelMapping`), and its spacing in that order (mm)."""
    data = np.asarray(img.dataobj)
    if data.ndim != 3:
        raise UserFacingError(f"expected a 3D volume, got shape {data.shape}")
    mapping = VoxelMapping.from_affine(img.affine, data.shape)
    zooms = img.header.get_zooms()[:3]
    spacing = tuple(float(zooms[axis]) for axis in mapping.source_axis)
    return mapping.to_work(data), spacing  # type: ignore[return-value]
