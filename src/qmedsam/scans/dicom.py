"""A DICOM series in (a `Scan` on its own voxel grid) and a DICOM SEG out (highdicom), referencing the series.

Voxel order of a series: i = column, j = row (of each image), k = slice in position order along the slice
normal (row direction x column direction). The affine follows from ImageOrientationPatient, PixelSpacing and
the first and last ImagePositionPatient (LPS, converted to NIfTI's RAS), so the NIfTI output overlays the
series and the SEG's frames are the source images' own.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_write
from qmedsam.scans.nifti import Scan

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_GAP_FACTOR = 1.5
"""A step between neighbouring slices above 1.5x the median step means missing slices."""


@dataclass
class DicomSeries:
    scan: Scan
    datasets: list  # pydicom Datasets, sorted along k (the SEG references them in this order)


def is_dicom_folder(path: Path) -> bool:
    """A folder whose files include DICOM Part 10 files ('DICM' at byte 128) and no .npz case files."""
    if not path.is_dir() or any(path.glob("*.npz")):
        return False
    for item in sorted(path.iterdir())[:64]:
        if item.is_file():
            with item.open("rb") as handle:
                head = handle.read(132)
            if head[128:132] == b"DICM":
                return True
    return False


def _fill_uids_from_file_meta(ds) -> None:
    """Anonymisers sometimes blank SOPClassUID / SOPInstanceUID in the data set while the file meta keeps them
    (TotalSegmentator's example series does); the SEG must reference the images by them."""
    meta = getattr(ds, "file_meta", None)
    for keyword, meta_keyword in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        if not str(getattr(ds, keyword, "") or "") and meta is not None and getattr(meta, meta_keyword, None):
            setattr(ds, keyword, getattr(meta, meta_keyword))


def _require() -> None:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise UserFacingError("reading DICOM needs pydicom: pip install 'qmedsam[scans]'") from None


def _floats(ds, keyword: str, count: int, path: Path) -> np.ndarray:
    value = getattr(ds, keyword, None)
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.size != count or not np.all(np.isfinite(values)):
        raise UserFacingError(f"{path}: DICOM tag {keyword} is {value!r}; expected {count} numbers")
    return values


def _read_file(path: Path):
    """The file's dataset with every element parsed (pydicom defers them: a damaged one would fail later, far
    from its file), or None for a file that is not DICOM (a stray file in the folder is skipped)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError):
        return None
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise UserFacingError(f"{path}: damaged DICOM file ({type(exc).__name__}: {exc})") from None
    try:
        for _ in ds.iterall():
            pass
    except Exception as exc:
        raise UserFacingError(f"{path}: damaged DICOM element ({type(exc).__name__}: {exc})") from None
    return ds


def read_dicom_series(folder: str | Path) -> DicomSeries:
    """One series from a folder of DICOM files (non-DICOM files are ignored); clear errors for mixed series,
    missing or duplicate slices, tilted or inconsistent geometry, multi-frame / colour images and damaged files."""
    try:
        return _read_series(Path(folder))
    except UserFacingError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, struct.error) as exc:
        raise UserFacingError(f"{folder}: damaged DICOM data ({type(exc).__name__}: {exc})") from None


def _read_series(folder: Path) -> DicomSeries:
    _require()
    import nibabel as nib

    if not folder.is_dir():
        raise UserFacingError(f"{folder}: not a folder of DICOM files")
    datasets, paths = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        ds = _read_file(path)
        if ds is None:
            continue
        if "PixelData" in ds:
            _fill_uids_from_file_meta(ds)
            datasets.append(ds)
            paths.append(path)
    if not datasets:
        raise UserFacingError(f"{folder}: no DICOM images found")
    series = Counter(str(getattr(ds, "SeriesInstanceUID", "?")) for ds in datasets)
    if len(series) > 1:
        listed = ", ".join(f"{uid} ({n} files)" for uid, n in series.items())
        raise UserFacingError(f"{folder}: mixed series ({listed}); put one series per folder")
    first = datasets[0]
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        raise UserFacingError(f"{paths[0]}: multi-frame DICOM is not supported; expected one image per file")
    orientation = _floats(first, "ImageOrientationPatient", 6, paths[0])
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    spacing = _floats(first, "PixelSpacing", 2, paths[0])  # [between rows, between columns]
    positions = []
    for ds, path in zip(datasets, paths, strict=True):
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path), orientation, atol=1e-4):
            raise UserFacingError(f"{path}: ImageOrientationPatient differs from {paths[0]}; one geometry expected")
        if (int(ds.Rows), int(ds.Columns)) != (int(first.Rows), int(first.Columns)):
            raise UserFacingError(f"{path}: image size differs from {paths[0]}")
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))
    along = np.array([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(along, kind="stable")
    datasets = [datasets[i] for i in order]
    paths = [paths[i] for i in order]
    positions = [positions[i] for i in order]
    along = along[order]
    steps = np.diff(along)
    if len(steps):
        if np.any(steps < 1e-3):
            dup = int(np.argmin(steps))
            raise UserFacingError(f"{paths[dup + 1]}: duplicate slice position (same as {paths[dup]})")
        median = float(np.median(steps))
        big = np.flatnonzero(steps > MAX_GAP_FACTOR * median)
        if len(big):
            k = int(big[0])
            raise UserFacingError(
                f"{folder}: missing slices between {paths[k].name} and {paths[k + 1].name} (gap {steps[k]:.2f} mm, "
                f"usual step {median:.2f} mm)"
            )
        slice_step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        slice_step = normal * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    slices = []
    for ds, path in zip(datasets, paths, strict=True):
        try:
            pixels = ds.pixel_array
        except Exception as exc:
            raise UserFacingError(f"{path}: cannot decode the pixel data ({exc})") from None
        if pixels.ndim != 2:
            raise UserFacingError(f"{path}: pixel data has shape {pixels.shape}; expected one grey image")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        slices.append(pixels.astype(np.float32) * slope + intercept)
    array = np.stack([s.T for s in slices], axis=2)  # (columns i, rows j, slices k)
    if not np.all(np.isfinite(array)):
        raise UserFacingError(f"{folder}: pixel values are not finite after RescaleSlope / RescaleIntercept")
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]
    lps[:3, 1] = col_cos * spacing[0]
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    if np.array_equal(array, np.round(array)) and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    header = nib.Nifti1Image(array, affine).header
    header.set_qform(affine, 1)
    header.set_sform(affine, 1)
    modality = str(getattr(first, "Modality", "") or "") or None
    scan = Scan(folder, array, affine, header, modality=modality)
    return DicomSeries(scan, datasets)


def _with_series_identity(datasets: list) -> tuple[list, dict[str, str]]:
    """The source datasets with a StudyInstanceUID and SeriesInstanceUID, which a SEG must reference (Type 1).

    Anonymised series sometimes carry none. Then copies get UIDs derived from the images' SOPInstanceUIDs
    (the same series always gets the same ones), and the generated values are returned to be reported."""
    import copy

    import pydicom

    generated: dict[str, str] = {}
    sop_uids = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if any(not str(getattr(ds, keyword, "") or "").strip() for ds in datasets):
            generated[keyword] = pydicom.uid.generate_uid(entropy_srcs=[keyword, *sop_uids])
    if not generated:
        return datasets, generated
    copies = [copy.deepcopy(ds) for ds in datasets]
    for ds in copies:
        for keyword, uid in generated.items():
            setattr(ds, keyword, uid)
    return copies, generated


def write_dicom_seg(labels: np.ndarray, series: DicomSeries, path: Path, software_version: str) -> dict:
    """A DICOM SEG (label values as segments, BINARY) referencing the series, written atomically.

    Returns what the sidecar records: the SEG's own series UID, the study and series it references, and
    `generated_uids` (with a warning) when the source lacked the study / series identity a SEG needs."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources, generated = _with_series_identity(series.datasets)

    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        raise ValueError("nothing was segmented: a DICOM SEG needs at least one segment")
    frames = np.transpose(labels, (2, 1, 0))  # (k, j, i) = (slice, row, column), the source images' frames
    numbered = np.zeros(frames.shape, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        numbered[frames == value] = number
    algorithm = hd.AlgorithmIdentificationSequence(
        name="qmedsam LiteMedSAM", version=software_version, family=codes.DCM.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"label {value}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, value in enumerate(values, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=numbered,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="qmedsam",
        manufacturer_model_name="LiteMedSAM (qmedsam)",
        software_versions=software_version,
        device_serial_number="none",
        series_description="qmedsam box-prompted segmentation",
    )
    atomic_write(path, seg.save_as)
    record = {
        "file": path.name,
        "seg_series_instance_uid": str(seg.SeriesInstanceUID),
        "study_instance_uid": str(sources[0].StudyInstanceUID),
        "referenced_series_instance_uid": str(sources[0].SeriesInstanceUID),
    }
    if generated:
        record["generated_uids"] = generated
        record["warning"] = (
            f"the source series has no {' or '.join(generated)}; the SEG carries generated ones (listed here), so "
            "a PACS links it to the images only if they are given the same UIDs"
        )
    return record
