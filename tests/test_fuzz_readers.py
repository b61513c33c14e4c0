"""Property-based fuzzing (Hypothesis) of every reader of user files: case .npz, NIfTI, DICOM and box files.

Whatever the bytes, a reader either returns a valid object or raises the error the commands report per case
(CaseError / UserFacingError) — never another exception, a hang or an unbounded allocation. Mutations start
from real valid files (numpy's, nibabel's, pydicom's own test data) so they reach the parsers, not just the
magic numbers. QMEDSAM_FUZZ_EXAMPLES sets the examples per target (CI: the default, a few seconds each).
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmedsam.data.cases import Case, CaseError, read_case
from qmedsam.errors import UserFacingError
from qmedsam.scans.boxes import ScanBoxes, read_boxes
from qmedsam.scans.dicom import read_dicom_series
from qmedsam.scans.nifti import Scan, read_nifti

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on every damaged element

FUZZ = settings(
    max_examples=int(os.environ.get("QMEDSAM_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


VALID_MEMBERS = {
    "imgs.npy": _npy(np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)),
    "boxes.npy": _npy(np.array([[1, 1, 0, 6, 6, 1]], np.int64)),
    "spacing.npy": _npy(np.array([1.0, 1.0, 2.0])),
}


@st.composite
def mutated(draw, payload: bytes) -> bytes:
    """`payload` with a few bytes overwritten, a slice cut out or repeated, or cut short."""
    data = bytearray(payload)
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if data and draw(st.booleans()):
        start = draw(st.integers(0, len(data) - 1))
        end = draw(st.integers(start, min(len(data), start + 64)))
        data[start:end] = data[start:end] * draw(st.integers(0, 3))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _accepts_or_refuses(read, *args) -> object | None:
    try:
        return read(*args)
    except (CaseError, UserFacingError):
        return None


@FUZZ
@given(data=st.one_of(st.binary(max_size=600), mutated(b"".join(VALID_MEMBERS.values()))))
def test_read_case_on_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "3D_fuzz.npz"
    path.write_bytes(data)
    assert _accepts_or_refuses(read_case, path) is None or isinstance(read_case(path), Case)


@FUZZ
@given(member=st.sampled_from(sorted(VALID_MEMBERS)), data=st.data(), method=st.sampled_from([0, 8]))
def test_read_case_on_mutated_npy_members_with_valid_crc(tmp_path, member, data, method):
    """The zip is rebuilt around each mutated member, so the CRC matches and the .npy parser sees it."""
    payload = data.draw(mutated(VALID_MEMBERS[member]))
    path = tmp_path / data.draw(st.sampled_from(["3D_fuzz.npz", "2D_fuzz.npz", "fuzz.npz"]))
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, valid in VALID_MEMBERS.items():
            archive.writestr(name, payload if name == member else valid)
    case = _accepts_or_refuses(read_case, path)
    if case is not None:
        assert isinstance(case, Case) and case.image.size and case.boxes.ndim == 2


def _nifti_bytes() -> bytes:
    image = nib.Nifti1Image(np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3), np.diag([0.8, 0.8, 2.5, 1]))
    return image.to_bytes()


NIFTI = _nifti_bytes()


@FUZZ
@given(data=st.data(), compressed=st.booleans())
def test_read_nifti_on_mutated_files(tmp_path, data, compressed):
    raw = data.draw(mutated(NIFTI))
    path = tmp_path / ("scan.nii.gz" if compressed else "scan.nii")
    path.write_bytes(gzip.compress(raw, mtime=0) if compressed else raw)
    scan = _accepts_or_refuses(read_nifti, path)
    if scan is not None:
        assert isinstance(scan, Scan) and scan.array.ndim == 3 and np.isfinite(scan.affine).all()


@FUZZ
@given(data=st.data())
def test_read_nifti_on_a_broken_gzip_stream(tmp_path, data):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(data.draw(mutated(gzip.compress(NIFTI, mtime=0))))
    assert _accepts_or_refuses(read_nifti, path) is None or isinstance(read_nifti(path), Scan)


DICOM_FILES = [
    Path(pydicom.__file__).parent / "data" / "test_files" / name for name in ("CT_small.dcm", "MR_small.dcm")
]


@FUZZ
@given(data=st.data())
def test_read_dicom_series_on_mutated_files(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("series")
    source = data.draw(st.sampled_from(DICOM_FILES))
    (folder / "1.dcm").write_bytes(data.draw(mutated(source.read_bytes())))
    if data.draw(st.booleans()):
        (folder / "notes.txt").write_bytes(data.draw(st.binary(max_size=64)))  # a stray non-DICOM file
    series = _accepts_or_refuses(read_dicom_series, folder)
    if series is not None:
        assert series.scan.array.ndim == 3


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=7) | st.dictionaries(st.sampled_from(["box", "label", "x"]), inner),
    max_leaves=20,
)


@FUZZ
@given(
    content=st.one_of(
        st.binary(max_size=300),
        _JSON_VALUES.map(lambda value: __import__("json").dumps(value).encode()),
        st.lists(st.lists(st.text(max_size=6), max_size=8), max_size=5).map(
            lambda rows: "\n".join(["i_min,j_min,k_min,i_max,j_max,k_max,label", *(",".join(r) for r in rows)]).encode()
        ),
    ),
    suffix=st.sampled_from([".json", ".csv"]),
)
def test_read_boxes_on_arbitrary_content(tmp_path, content, suffix):
    path = tmp_path / f"boxes{suffix}"
    path.write_bytes(content)
    boxes = _accepts_or_refuses(read_boxes, path)
    if boxes is not None:
        assert isinstance(boxes, ScanBoxes)
