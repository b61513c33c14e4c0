"""Files in and out of napari: challenge cases (.npz) and NIfTI scans as layers, the demo cases as sample
data, a Labels layer saved as NIfTI (on the scan's own grid when it came from one) or npz (`segs`), and the
prompts that made it (boxes and clicks) as JSON next to it.

Layer data tuples are `(data, kwargs, layer_type)`, napari's reader contract; nothing here imports Qt.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qmedsam.data.cases import CaseError, read_case, segmentation_dtype
from qmedsam.datasets.recipes.demo import build_demo, is_complete
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_savez, atomic_write_bytes, default_cache_root
from qmedsam.napari.layers import FEATURES, ObjectPrompts, box_rectangle
from qmedsam.scans.nifti import is_nifti, nifti_stem, read_nifti, write_label_nifti
from qmedsam.scans.orientation import VoxelMapping
from qmedsam.version import __version__

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


# -- prompts (boxes and clicks) -------------------------------------------------------------------------------

PROMPTS_FORMAT = "qmedsam-clicks"
PROMPTS_VERSION = 1
PROMPTS_SUFFIX = ".clicks.json"
MAX_PROMPTS_BYTES = 16 * 2**20
MAX_LABEL = 65535  # the widget's Labels layer is uint16
COORDINATES = (
    "x = column, y = row (pixel centres at integers), z = slice, in the image layer's array (for a NIfTI scan: "
    "the working (z, y, x) orientation of `qmedsam predict -i scan.nii.gz`); box [x0, y0, x1, y1] or "
    "[x0, y0, z0, x1, y1, z1] inclusive; click label 1 = include, 0 = exclude"
)


def prompts_path(masks_path: str | os.PathLike) -> Path:
    """The JSON written next to saved masks: `masks.nii.gz` / `masks.npz` -> `masks.clicks.json`."""
    path = Path(masks_path)
    stem = nifti_stem(path) if is_nifti(path) else path.stem
    return path.with_name(stem + PROMPTS_SUFFIX)


def write_prompts(
    path: str | os.PathLike,
    objects: list[ObjectPrompts],
    image_shape: tuple[int, ...],
    *,
    masks: str | None = None,
    image: str | None = None,
    model: str | None = None,
    model_dir: str | None = None,
) -> Path:
    """Write the boxes and clicks of `objects` (image pixel coordinates) and the model that ran them, atomically."""
    document = {
        "format": PROMPTS_FORMAT,
        "version": PROMPTS_VERSION,
        "qmedsam": __version__,
        "masks": masks,
        "image": image,
        "image_shape": [int(n) for n in image_shape],
        "model": model,
        "model_dir": model_dir,
        "coordinates": COORDINATES,
        "objects": [
            {
                "label": int(obj.label),
                "box": [int(v) for v in obj.box],
                "clicks": [
                    {"x": float(x), "y": float(y), "z": int(round(z)), "label": int(label)}
                    for x, y, z, label in obj.clicks
                ],
                **(
                    {}
                    if obj.from_slice is None
                    else {"from_slice": {"axis": int(obj.from_slice[0]), "index": int(obj.from_slice[1])}}
                ),
            }
            for obj in objects
        ],
    }
    return atomic_write_bytes(path, (json.dumps(document, indent=1) + "\n").encode())


def read_prompts(path: str | os.PathLike, image_shape: tuple[int, ...] | None = None) -> list[ObjectPrompts]:
    """Read and check a prompts JSON (untrusted: every key and value is checked, an error names the file, the
    key and what was expected). `image_shape`: the image it is loaded onto, which must be the one it was made on."""
    path = Path(path)

    def fail(key: str, problem: str) -> UserFacingError:
        return UserFacingError(f"{path}: {key} {problem}")

    try:
        size = path.stat().st_size
        if size > MAX_PROMPTS_BYTES:
            raise fail("file", f"is {size} bytes; expected at most {MAX_PROMPTS_BYTES}")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserFacingError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise fail("file", "is not UTF-8 text; expected a qmedsam clicks JSON") from None

    def no_constants(name: str):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        document = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:
        raise fail("file", f"is not valid JSON ({exc}); expected a qmedsam clicks JSON") from None
    if not isinstance(document, dict):
        raise fail("top level", f"is a {type(document).__name__}; expected an object")
    if document.get("format") != PROMPTS_FORMAT:
        raise fail("format", f"is {document.get('format')!r}; expected {PROMPTS_FORMAT!r}")
    if document.get("version") != PROMPTS_VERSION:
        raise fail("version", f"is {document.get('version')!r}; expected {PROMPTS_VERSION}")
    for key in ("masks", "image", "model", "model_dir", "qmedsam", "coordinates"):
        if key in document and document[key] is not None and not isinstance(document[key], str):
            raise fail(key, f"is {document[key]!r}; expected a string or null")
    shape = document.get("image_shape")
    if not isinstance(shape, list) or len(shape) not in (2, 3) or not all(_is_int(n) and 0 < n <= 65535 for n in shape):
        raise fail("image_shape", f"is {shape!r}; expected [height, width] or [depth, height, width], positive")
    if image_shape is not None and tuple(shape) != tuple(image_shape):
        raise fail("image_shape", f"is {shape}; expected {list(image_shape)}, the shape of the image it is loaded on")
    items = document.get("objects")
    if not isinstance(items, list):
        raise fail("objects", f"is {type(items).__name__}; expected a list")
    objects = [_object_prompts(item, f"objects[{i}]", shape, fail) for i, item in enumerate(items)]
    labels = [obj.label for obj in objects]
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise fail("objects", f"give label {twice} twice; expected each object's label once")
    return objects


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _object_prompts(item: object, key: str, shape: list[int], fail) -> ObjectPrompts:
    if not isinstance(item, dict):
        raise fail(key, f"is a {type(item).__name__}; expected an object with label, box and clicks")
    label = item.get("label")
    if not _is_int(label) or not 1 <= label <= MAX_LABEL:
        raise fail(f"{key}.label", f"is {label!r}; expected an integer 1..{MAX_LABEL}")
    unknown = sorted(set(item) - {"label", "box", "clicks", "from_slice"})
    if unknown:
        raise fail(key, f"has unknown key(s) {unknown}; expected label, box, clicks, from_slice")
    if "from_slice" in item:
        return _one_slice_object(item, key, int(label), shape, fail)
    box = item.get("box")
    size = 4 if len(shape) == 2 else 6
    if not isinstance(box, list) or len(box) != size or not all(_is_number(v) for v in box):
        layout = "[x0, y0, x1, y1]" if size == 4 else "[x0, y0, z0, x1, y1, z1]"
        raise fail(f"{key}.box", f"is {box!r}; expected {layout}, {size} finite numbers")
    half = size // 2
    if any(box[i] > box[i + half] for i in range(half)):
        raise fail(f"{key}.box", f"is {box}; expected each minimum <= its maximum")
    if size == 6 and not (_is_int(box[2]) and _is_int(box[5]) and box[2] >= 0 and box[5] < shape[0]):
        raise fail(f"{key}.box", f"has z {box[2]!r}..{box[5]!r}; expected slice indices 0..{shape[0] - 1}")
    clicks = item.get("clicks", [])
    if not isinstance(clicks, list):
        raise fail(f"{key}.clicks", f"is a {type(clicks).__name__}; expected a list")
    rows = [_click(click, f"{key}.clicks[{i}]", shape, fail) for i, click in enumerate(clicks)]
    array = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return ObjectPrompts(int(label), np.array(box, dtype=np.int64), array)


def _one_slice_object(item: dict, key: str, label: int, shape: list[int], fail) -> ObjectPrompts:
    """An object found from one box on one slice: `from_slice` {axis, index}, `box` [x0, y0, x1, y1] in that
    slice's pixels (columns, rows of the other two axes), no clicks."""
    if len(shape) != 3:
        raise fail(f"{key}.from_slice", "is given on a 2D image; expected it only on a volume")
    where = item["from_slice"]
    if not isinstance(where, dict) or set(where) != {"axis", "index"}:
        raise fail(f"{key}.from_slice", f'is {where!r}; expected {{"axis": 0|1|2, "index": slice}}')
    axis, index = where["axis"], where["index"]
    if not _is_int(axis) or axis not in (0, 1, 2):
        raise fail(f"{key}.from_slice.axis", f"is {axis!r}; expected 0, 1 or 2")
    if not _is_int(index) or not 0 <= index < shape[axis]:
        raise fail(f"{key}.from_slice.index", f"is {index!r}; expected a slice index 0..{shape[axis] - 1}")
    rows, cols = (shape[a] for a in range(3) if a != axis)
    box = item.get("box")
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise fail(f"{key}.box", f"is {box!r}; expected [x0, y0, x1, y1] on slice {index} of axis {axis}")
    x0, y0, x1, y1 = box
    if x0 > x1 or y0 > y1 or x1 < 0 or y1 < 0 or x0 > cols - 1 or y0 > rows - 1:
        raise fail(f"{key}.box", f"is {box}; expected minimum <= maximum inside the {cols} x {rows} slice")
    if item.get("clicks", []) != []:
        raise fail(f"{key}.clicks", "are given for an object found from one slice; expected none")
    return ObjectPrompts(label, np.array(box, dtype=np.int64), np.zeros((0, 4)), (int(axis), int(index)))


def _click(click: object, key: str, shape: list[int], fail) -> tuple[float, float, int, int]:
    if not isinstance(click, dict):
        raise fail(key, f"is a {type(click).__name__}; expected an object with x, y, z and label")
    height, width = shape[-2:]
    x, y, z, label = (click.get(name) for name in ("x", "y", "z", "label"))
    if not _is_number(x) or not 0 <= x <= width - 1:
        raise fail(f"{key}.x", f"is {x!r}; expected a number 0..{width - 1} (a column of the image)")
    if not _is_number(y) or not 0 <= y <= height - 1:
        raise fail(f"{key}.y", f"is {y!r}; expected a number 0..{height - 1} (a row of the image)")
    if len(shape) == 2:
        if z not in (None, 0) or isinstance(z, bool):
            raise fail(f"{key}.z", f"is {z!r}; expected 0 (a 2D image)")
        z = 0
    elif not _is_int(z) or not 0 <= z < shape[0]:  # outside the box's z range: kept, unused (as in the widget)
        raise fail(f"{key}.z", f"is {z!r}; expected a slice index 0..{shape[0] - 1}")
    if not _is_int(label) or label not in (0, 1):
        raise fail(f"{key}.label", f"is {label!r}; expected 1 (include) or 0 (exclude)")
    return float(x), float(y), int(z), int(label)


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
