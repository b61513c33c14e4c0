"""Files in and out of napari: challenge cases (.npz) and NIfTI scans as layers, the demo cases as sample
data, and a Labels layer saved as NIfTI (on the scan's own grid when it came from one) or npz (`segs`).

Layer data tuples are `(data, kwargs, layer_type)`, napari's reader contract; nothing here imports Qt.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qmedsam.data.cases import CaseError, read_case, segmentation_dtype
from qmedsam.datasets.recipes.demo import build_demo, is_complete
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_savez, atomic_write_bytes, default_cache_root
from qmedsam.napari.layers import FEATURES, box_rectangle
from qmedsam.scans.nifti import is_nifti, nifti_stem, read_nifti, write_label_nifti
from qmedsam.scans.orientation import VoxelMapping

LayerData = tuple[np.ndarray | list, dict, str]
SCAN_KEY = "qmedsam_scan"  # image layer metadata: the Scan a NIfTI layer came from (its grid, for saving)
MAPPING_KEY = "qmedsam_mapping"  # ... and the VoxelMapping from the file's voxel order to the shown array
CASE_KEY = "qmedsam_case"  # ... or the case file an npz layer came from


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari reader hook: our reader for a case npz (one with `imgs`) or a NIfTI file, else None."""
    if isinstance(path, list):
        return None if not path or not all(_readable(p) for p in path) else read_layers
    return read_layers if _readable(path) else None


def _readable(path: str) -> bool:
    path = str(path)
    if is_nifti(Path(path)):
        return True
    if not path.lower().endswith(".npz"):
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return "imgs" in data.files
    except (OSError, ValueError):
        return False


def read_layers(path: str | list[str]) -> list[LayerData]:
    paths = path if isinstance(path, list) else [path]
    layers: list[LayerData] = []
    for item in paths:
        layers.extend(read_scan_layers(item) if is_nifti(Path(item)) else read_case_layers(item))
    return layers


def read_case_layers(path: str | os.PathLike) -> list[LayerData]:
    """A challenge case -> its image (3D spacing as the layer scale) and its boxes as a Shapes layer
    (3D boxes drawn on their middle slice, the z range in the shapes' features)."""
    case = read_case(path)
    name = Path(path).name.removesuffix(".npz")
    scale = list(case.spacing) if case.dimension == 3 and case.spacing else None
    image_kwargs: dict = {"name": name, "metadata": {CASE_KEY: str(path)}, "rgb": case.dimension == 2}
    if scale:
        image_kwargs["scale"] = scale
    shapes_kwargs: dict = {
        "name": f"{name} boxes",
        "shape_type": "rectangle",
        "edge_color": "yellow",
        "face_color": "transparent",
        "edge_width": 2,
        "features": box_features(case.boxes),
    }
    if scale:
        shapes_kwargs["scale"] = scale
    rectangles = [box_rectangle(box) for box in case.boxes]
    return [(case.image, image_kwargs, "image"), (rectangles, shapes_kwargs, "shapes")]


def box_features(boxes: np.ndarray) -> dict[str, np.ndarray]:
    """Shapes features for boxes read from a file: labels not yet assigned, 3D z ranges from the boxes."""
    features = {key: np.full(len(boxes), default, np.int64) for key, default in FEATURES.items()}
    if boxes.shape[1] == 6:
        features["z0"], features["z1"] = boxes[:, 2].astype(np.int64), boxes[:, 5].astype(np.int64)
    return features


def read_scan_layers(path: str | os.PathLike) -> list[LayerData]:
    """A NIfTI scan -> an image layer in the working (z, y, x) order the model is run in (the same mapping
    as `qmedsam predict -i scan.nii.gz`), raw intensities, voxel spacing as scale; its grid kept for saving."""
    scan = read_nifti(path)
    mapping = VoxelMapping.from_affine(scan.affine, scan.array.shape)
    zooms = [float(z) for z in scan.header.get_zooms()[:3]]
    scale = [zooms[axis] for axis in mapping.source_axis]
    name = nifti_stem(Path(path))
    metadata = {SCAN_KEY: scan, MAPPING_KEY: mapping}
    return [(mapping.to_work(scan.array), {"name": name, "scale": scale, "metadata": metadata}, "image")]


def save_labels(labels: np.ndarray, path: str | os.PathLike, metadata: dict | None = None, scale=None) -> Path:
    """Write a label map shown over an image layer (its `metadata` and `scale`).

    `.nii` / `.nii.gz`: on the source scan's grid (shape, affine, qform/sform) when the image came from a NIfTI
    file; otherwise an axis-aligned grid with the layer's scale as voxel size. `.npz`: the challenge format,
    `segs` (plus `spacing` for a volume). Written atomically."""
    path = Path(path)
    metadata = metadata or {}
    labels = np.asarray(labels)
    dtype = segmentation_dtype(int(labels.max()) if labels.size else 0)
    if path.name.lower().endswith(".npz"):
        arrays: dict[str, np.ndarray] = {"segs": labels.astype(dtype)}
        if labels.ndim == 3 and scale is not None:
            arrays["spacing"] = np.asarray(scale, dtype=np.float64)[-3:]
        return atomic_savez(path, **arrays)
    if not is_nifti(Path(path)):
        raise UserFacingError(f"{path}: save as .nii, .nii.gz or .npz")
    return _save_nifti(labels, path, metadata, scale)


def _save_nifti(labels: np.ndarray, path: Path, metadata: dict, scale) -> Path:
    import nibabel as nib

    scan, mapping = metadata.get(SCAN_KEY), metadata.get(MAPPING_KEY)
    if scan is not None and mapping is not None:
        write_label_nifti(mapping.to_file(labels), scan, path)
        return path
    # no source grid: (z, y, x) or (y, x) -> (x, y, z) voxels, the layer scale as voxel size
    volume = labels[None] if labels.ndim == 2 else labels
    spacing = list(scale)[-volume.ndim :] if scale is not None else [1.0] * volume.ndim
    if len(spacing) == 2:
        spacing = [1.0, *spacing]
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    image = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), affine)
    image.set_data_dtype(volume.dtype)
    return atomic_write_bytes(path, image.to_bytes())


# -- sample data ---------------------------------------------------------------------------------------------


def demo_dir() -> Path:
    """Where the plug-in keeps the demo cases: `$QMEDSAM_DEMO_DIR`, else the qmedsam cache's `demo` folder;
    built there with `qmedsam data demo`'s code on first use (PyPI downloads, cached)."""
    folder = Path(os.environ.get("QMEDSAM_DEMO_DIR") or default_cache_root() / "demo")
    if not is_complete(folder):
        build_demo(folder)
    return folder


def _sample(case_name: str) -> Callable[[], list[LayerData]]:
    def load() -> list[LayerData]:
        path = demo_dir() / "cases" / case_name
        try:
            return read_case_layers(path)
        except CaseError as exc:
            raise UserFacingError(f"demo case {path}: {exc}") from None

    load.__name__ = f"sample_{case_name.removesuffix('.npz')}"
    return load


sample_2d_ct = _sample("2D_CT_TotalSeg_0001.npz")
sample_2d_microscopy = _sample("2D_Microscopy_DSB2018_0001.npz")
sample_3d_ct = _sample("3D_CT_TotalSeg_0001.npz")
sample_3d_mr = _sample("3D_MR_TotalSeg_0001.npz")
sample_3d_mr_mni = _sample("3D_MR_MNI152_0001.npz")
