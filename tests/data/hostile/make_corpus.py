"""Write the hostile case files of this folder (run from anywhere: `python tests/data/hostile/make_corpus.py`).

Each file breaks one rule of the npz contract (qmedsam.data.npz, README "Input limits") or of the case
contract (qmedsam.data.cases); tests/test_hostile_files.py holds the verdict each predictor must give. Files
that a fuzzer found stay here as they were found; this script only makes the hand-written ones.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
VALID_BOXES = np.array([[1, 1, 0, 6, 6, 1]], dtype=np.int64)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def raw_npy(header: str, data: bytes = b"", version: int = 1) -> bytes:
    """A .npy member with exactly this header text (padded as numpy pads it) and data."""
    text = header.encode("latin-1")
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(text)) + text + data


def _entry(name: str, method: int = zipfile.ZIP_STORED) -> zipfile.ZipInfo:
    """A member with a fixed timestamp, so the corpus is the same bytes on every run of this script."""
    info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
    info.compress_type = method
    return info


def zip_members(path: Path, members: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, payload in members:
            archive.writestr(_entry(name, method), payload)
    data = buffer.getvalue()
    path.write_bytes(data)
    return data


def case_with_imgs(name: str, imgs_member: bytes, method: int = zipfile.ZIP_STORED) -> bytes:
    return zip_members(HERE / name, [("imgs.npy", imgs_member), ("boxes.npy", npy(VALID_BOXES))], method)


def header(shape: str, descr: str = "'|u1'", fortran: str = "False", extra: str = "") -> str:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, {extra}}}"


def main() -> None:
    image = np.zeros((2, 8, 8), np.uint8)
    # Shape whose byte product wraps around 2**64 (2**32 * 2**32 * 1), Fortran order: a few bytes of data.
    case_with_imgs(
        "3D_shape_wraps_2_64.npz", raw_npy(header("(4294967296, 4294967296, 1)", fortran="True"), b"\0" * 16)
    )
    case_with_imgs("3D_negative_dimension.npz", raw_npy(header("(-1, 8, 8)"), b"\0" * 16))
    # Found by the fuzzer: an empty array (one zero dimension) whose other dimensions multiply past 2**63.
    case_with_imgs(
        "3D_empty_shape_overflows.npz",
        raw_npy(header("(0100001553522344, 001553522344, 0, 4)", descr="'<f2'", fortran="True")),
    )
    # A 60 KB header (std::regex recursed on it until the stack overflowed) and a bounded one of deep nesting.
    case_with_imgs("3D_header_60kb.npz", raw_npy(header("(2, 8, 8)") + " " * 60_000, image.tobytes(), version=2))
    case_with_imgs("3D_header_nested.npz", raw_npy(header("(" * 9000)))
    case_with_imgs("3D_header_expression.npz", raw_npy(header("(2*1, 8, 8)"), image.tobytes()))
    case_with_imgs(
        "3D_header_missing_shape.npz", raw_npy("{'descr': '|u1', 'fortran_order': False, }", image.tobytes())
    )
    case_with_imgs("3D_header_extra_key.npz", raw_npy(header("(2, 8, 8)", extra="'x': 1"), image.tobytes()))
    case_with_imgs("3D_header_33_dims.npz", raw_npy(header("(" + "1, " * 33 + ")"), b"\0"))
    case_with_imgs("3D_npy_version_9.npz", raw_npy(header("(2, 8, 8)"), image.tobytes(), version=9))
    case_with_imgs("3D_object_dtype.npz", raw_npy(header("(2,)", descr="'|O'"), b"\x80\x04N."))
    case_with_imgs("3D_structured_dtype.npz", raw_npy(header("(2, 8, 8)", descr="[('a', '<u1')]"), image.tobytes()))
    case_with_imgs("3D_complex_image.npz", npy(np.zeros((2, 8, 8), np.complex64)))
    case_with_imgs("3D_string_image.npz", npy(np.array([["a"] * 8] * 8)))
    case_with_imgs("3D_data_truncated.npz", npy(image)[:-40])
    case_with_imgs("3D_data_trailing_bytes.npz", npy(image) + b"\0" * 7)
    case_with_imgs("3D_member_not_npy.npz", b"this is not an npy array, just bytes")
    case_with_imgs("3D_axis_over_65535.npz", npy(np.zeros((1, 1, 70_000), np.uint8)))
    zip_members(
        HERE / "3D_boxes_beyond_int.npz",
        [("imgs.npy", npy(image)), ("boxes.npy", npy(np.array([[0, 0, 0, 1e300, 5, 1]])))],
    )
    zip_members(HERE / "3D_missing_boxes.npz", [("imgs.npy", npy(image))])
    zip_members(
        HERE / "3D_bzip2_member.npz", [("imgs.npy", npy(image)), ("boxes.npy", npy(VALID_BOXES))], zipfile.ZIP_BZIP2
    )
    zip_members(
        HERE / "3D_65_members.npz",
        [("imgs.npy", npy(image)), ("boxes.npy", npy(VALID_BOXES))]
        + [(f"x{i}.npy", npy(np.zeros(1))) for i in range(63)],
    )
    # A stored member with flipped bytes: the CRC-32 no longer matches (Python's zipfile refused it, C++ segmented it).
    data = bytearray(case_with_imgs("3D_bad_crc.npz", npy(np.arange(128, dtype=np.uint8).reshape(2, 8, 8))))
    at = data.index(bytes(range(40, 48)))
    data[at : at + 4] = b"\xff\xff\xff\xff"
    (HERE / "3D_bad_crc.npz").write_bytes(bytes(data))
    # Encrypted flag set in the local and central headers.
    data = bytearray(case_with_imgs("3D_encrypted_member.npz", npy(image)))
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature)
        data[at + flag_offset] |= 1
    (HERE / "3D_encrypted_member.npz").write_bytes(bytes(data))
    # A zip bomb: 64 MiB of zeros in ~64 KB (the test caps decoded bytes at 32 MiB), and one that lies about its
    # size (declares 1 KiB, inflates to 64 MiB: the readers stop at the declared size and the CRC fails).
    bomb = npy(np.zeros((1, 8192, 8192), np.uint8))
    case_with_imgs("3D_zip_bomb.npz", bomb, zipfile.ZIP_DEFLATED)
    data = bytearray(case_with_imgs("3D_zip_bomb_lies.npz", bomb, zipfile.ZIP_DEFLATED))
    for signature, size_offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature)
        data[at + size_offset : at + size_offset + 4] = struct.pack("<I", 1024)
    (HERE / "3D_zip_bomb_lies.npz").write_bytes(bytes(data))
    whole = zip_members(HERE / "3D_truncated_zip.npz", [("imgs.npy", npy(image)), ("boxes.npy", npy(VALID_BOXES))])
    (HERE / "3D_truncated_zip.npz").write_bytes(whole[:150])
    (HERE / "3D_empty_file.npz").write_bytes(b"")
    (HERE / "3D_not_a_zip.npz").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (HERE / "3D_duplicate_member.npz").write_bytes(_duplicate_member(image))
    # Zip structure: a local header that disagrees with the central directory, an entry overlapping another
    # (zipfile and libzip read these differently unless both check), and bytes before or after the archive.
    members = [("imgs.npy", npy(image)), ("boxes.npy", npy(VALID_BOXES))]
    data = bytearray(zip_members(HERE / "3D_local_name_differs.npz", members))
    at = data.index(b"PK\x03\x04") + 30
    data[at : at + 8] = b"IMGS.npy"
    (HERE / "3D_local_name_differs.npz").write_bytes(bytes(data))
    data = bytearray(zip_members(HERE / "3D_overlapping_entries.npz", members))
    second = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 1)
    struct.pack_into("<I", data, second + 42, 0)  # boxes' local header offset -> the imgs member's
    (HERE / "3D_overlapping_entries.npz").write_bytes(bytes(data))
    whole = zip_members(HERE / "3D_prepended_bytes.npz", members)
    (HERE / "3D_prepended_bytes.npz").write_bytes(b"MZ" + bytes(98) + whole)
    (HERE / "3D_trailing_bytes.npz").write_bytes(whole + bytes(100))
    # A member name in UTF-8 bytes without the UTF-8 flag: by the zip spec CP437, and both readers name it so.
    data = bytearray(zip_members(HERE / "3D_cp437_member_name.npz", [*members, ("XX.npy", b"not an array")]))
    for signature, name_offset in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46)):
        at = data.find(signature)
        while at >= 0:
            if data[at + name_offset : at + name_offset + 2] == b"XX":
                data[at + name_offset : at + name_offset + 2] = "é".encode()
            at = data.find(signature, at + 4)
    (HERE / "3D_cp437_member_name.npz").write_bytes(bytes(data))


def _duplicate_member(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(_entry("imgs.npy"), npy(image))
        archive.writestr(_entry("boxes.npy"), npy(VALID_BOXES))
        archive.writestr(_entry("imgs"), npy(np.ones((2, 8, 8), np.uint8)))
    return buffer.getvalue()


if __name__ == "__main__":
    main()
