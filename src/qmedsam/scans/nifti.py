"""Read a NIfTI scan (or label map) and write a label map on exactly its grid."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmedsam.errors import UserFacingError

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
    header: object  # nibabel header of the input (qform/sform codes, zooms)
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


def smallest_label_dtype(max_label: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise UserFacingError(f"label {max_label} does not fit a 32-bit label map")


def write_label_nifti(labels: np.ndarray, like: Scan, path: Path) -> None:
    """Label map (file voxel order) on the grid of `like`: same shape, affine, qform/sform and codes;
    the smallest unsigned integer dtype; no intensity scaling. Written atomically."""
    import nibabel as nib

    if labels.shape != like.array.shape:
        raise ValueError(f"label map shape {labels.shape} is not the scan's {like.array.shape}")
    dtype = smallest_label_dtype(int(labels.max()) if labels.size else 0)
    header = like.header.copy() if hasattr(like.header, "copy") else None
    out = nib.Nifti1Image(labels.astype(dtype), like.affine, header)
    out.set_data_dtype(dtype)
    if header is not None:
        qform, qcode = like.header.get_qform(coded=True)
        sform, scode = like.header.get_sform(coded=True)
        # the input's own qform/sform and codes, unset ones included, so a reader derives the same affine
        out.set_qform(qform, int(qcode)) if qform is not None else out.set_qform(None)
        out.set_sform(sform, int(scode)) if sform is not None else out.set_sform(None)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["descrip"] = b"qmedsam labels"
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".nii.gz" if path.name.endswith(".gz") else ".nii", dir=path.parent
    )
    os.close(fd)
    try:
        nib.save(out, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
