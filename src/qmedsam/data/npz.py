"""The npz container contract: what a case file may hold, checked before anything is allocated.

A case file is untrusted (truncated in transit, corrupted, or crafted), so it is not handed to `np.load`.
This reader accepts exactly what `np.savez` / `np.savez_compressed` write, with every size checked first;
the C++ predictor (cpp/src/npz.cpp) implements the same rules with the same messages, so both predictors
give one verdict for one file (tests/test_hostile_files.py runs both over tests/data/hostile/).

The contract (README "Input limits"):
- a zip archive of at most `MAX_MEMBERS` members, each named once, each stored or deflated, not encrypted;
- each member is a `.npy` array (format 1.0, 2.0 or 3.0) whose header is at most `MAX_HEADER_LENGTH` bytes
  (numpy's own limit) and is a plain dict of exactly 'descr', 'fortran_order' and 'shape';
- dtype bool, (u)int8..64 or float16/32/64, any byte order; no object, string, complex or structured dtypes;
- at most `MAX_DIMS` dimensions, each >= 0; the byte size (their product times the item size, in checked
  arithmetic) equals the member's size after the header, and all members together decode to at most
  `max_bytes` (default 4 GiB, `QMEDSAM_MAX_CASE_BYTES` to change it);
- each member's CRC-32 matches its bytes.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Collection
from pathlib import Path

import numpy as np

MAX_MEMBERS = 64
MAX_HEADER_LENGTH = 10_000
MAX_DIMS = 32
DEFAULT_MAX_BYTES = 4 * 1024**3
MAX_BYTES_ENV = "QMEDSAM_MAX_CASE_BYTES"
_MAGIC = b"\x93NUMPY"
_KEYS = ("descr", "fortran_order", "shape")
_ITEMSIZES = {"b": (1,), "u": (1, 2, 4, 8), "i": (1, 2, 4, 8), "f": (2, 4, 8)}
_INT64_MAX = 2**63 - 1


class NpzError(ValueError):
    """The file breaks the npz contract; the message says which rule, without the path (the caller adds it)."""


def max_case_bytes() -> int:
    """The decoded-size cap: `QMEDSAM_MAX_CASE_BYTES` (a whole number of bytes) or 4 GiB."""
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    if not text.isdigit() or int(text) < 1:
        raise NpzError(f"environment variable {MAX_BYTES_ENV}={text!r}; expected a whole number of bytes >= 1")
    return min(int(text), _INT64_MAX)


class _HeaderParser:
    """A bounded parser for the .npy header dict: `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.

    Accepts what numpy writes (either quote style, any whitespace, an optional trailing comma, padding after
    the dict) and nothing that needs evaluation; its grammar is the C++ parser's, rule for rule.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> NpzError:
        return NpzError(f"npy header is not a plain dict: expected {what} at offset {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def expect(self, char: str) -> None:
        self.skip_space()
        if self.pos >= len(self.text) or self.text[self.pos] != char:
            raise self.fail(f"'{char}'")
        self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def string(self) -> str:
        quote = self.peek()
        if quote not in ("'", '"'):
            raise self.fail("a quoted string")
        end = self.text.find(quote, self.pos + 1)
        if end < 0:
            raise self.fail("a closing quote")
        value = self.text[self.pos + 1 : end]
        self.pos = end + 1
        return value

    def boolean(self) -> bool:
        self.skip_space()
        for word, value in (("True", True), ("False", False)):
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return value
        raise self.fail("True or False")

    def integer(self) -> int:
        self.skip_space()
        start = self.pos
        if self.pos < len(self.text) and self.text[self.pos] == "-":
            self.pos += 1
        digits = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "0123456789":
            self.pos += 1
        if self.pos == digits:
            raise self.fail("a whole number")
        if self.pos - digits > 19:
            raise NpzError(f"npy header: shape dimension {self.text[start : self.pos]} is too large")
        value = int(self.text[start : self.pos])
        if value < 0:
            raise NpzError(f"npy header: shape has a negative dimension ({value})")
        if value > _INT64_MAX:
            raise NpzError(f"npy header: shape dimension {value} is too large")
        return value

    def shape(self) -> tuple[int, ...]:
        self.expect("(")
        dims: list[int] = []
        while self.peek() != ")":
            if len(dims) == MAX_DIMS:
                raise NpzError(f"npy header: shape has more than {MAX_DIMS} dimensions")
            dims.append(self.integer())
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != ")":
                raise self.fail("',' or ')'")
        self.pos += 1
        return tuple(dims)

    def parse(self) -> dict[str, object]:
        self.expect("{")
        fields: dict[str, object] = {}
        while self.peek() != "}":
            key = self.string()
            if key not in _KEYS:
                raise NpzError(f"npy header has an unexpected key '{key}'; expected exactly {list(_KEYS)}")
            if key in fields:
                raise NpzError(f"npy header names '{key}' twice")
            self.expect(":")
            if key == "descr":
                if self.peek() == "[":
                    raise NpzError("structured dtypes are not accepted; expected bool, integer or float")
                fields[key] = self.string()
            elif key == "fortran_order":
                fields[key] = self.boolean()
            else:
                fields[key] = self.shape()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "}":
                raise self.fail("',' or '}'")
        self.pos += 1
        self.skip_space()
        if self.pos != len(self.text):
            raise self.fail("only padding after the dict")
        missing = [key for key in _KEYS if key not in fields]
        if missing:
            raise NpzError(f"npy header lacks {missing}; expected exactly {list(_KEYS)}")
        return fields


def parse_dtype(descr: str) -> np.dtype:
    """'<f4', '|u1', '>i2', '|b1' ... -> a native-order numpy dtype; anything else is refused by name."""
    if descr[:1] == "O" or descr[1:2] == "O":
        raise NpzError("object arrays (pickles) are not accepted")
    order, kind, size = descr[:1], descr[1:2], descr[2:]
    if (
        order not in ("<", ">", "|", "=")
        or kind not in _ITEMSIZES
        or not (size.isascii() and size.isdigit())
        or len(size) > 2
    ):
        raise NpzError(f"dtype '{descr}' is not accepted; expected bool, (u)int8-64 or float16/32/64")
    itemsize = int(size)
    if itemsize not in _ITEMSIZES[kind] or (order == "|" and itemsize != 1):
        raise NpzError(f"dtype '{descr}' is not accepted; expected bool, (u)int8-64 or float16/32/64")
    return np.dtype(f"{'>' if order == '>' else '<'}{kind}{itemsize}")


def parse_npy(raw: bytearray, max_bytes: int) -> np.ndarray:
    """One .npy member's bytes -> its array (native byte order), every size checked against `raw`."""
    if len(raw) < 10 or raw[:6] != _MAGIC:
        raise NpzError("not a .npy array (no \\x93NUMPY magic)")
    major = raw[6]
    if major == 1:
        header_length, offset = int.from_bytes(raw[8:10], "little"), 10
    elif major in (2, 3):
        if len(raw) < 12:
            raise NpzError("npy header is truncated")
        header_length, offset = int.from_bytes(raw[8:12], "little"), 12
    else:
        raise NpzError(f"npy format version {major} is not accepted; expected 1, 2 or 3")
    if header_length > MAX_HEADER_LENGTH:
        raise NpzError(f"npy header is {header_length} bytes; at most {MAX_HEADER_LENGTH} are accepted")
    if len(raw) - offset < header_length:
        raise NpzError("npy header is truncated")
    try:
        header = raw[offset : offset + header_length].decode("utf-8" if major == 3 else "latin-1")
    except UnicodeDecodeError:
        raise NpzError("npy header is not valid UTF-8") from None
    fields = _HeaderParser(header).parse()
    dtype = parse_dtype(str(fields["descr"]))
    shape: tuple[int, ...] = fields["shape"]  # type: ignore[assignment]
    # The nonzero dimensions are bounded even when another is zero (an empty array whose element counts and
    # strides would overflow a C++ int64), step by step as the C++ checked product is.
    empty = 0 in shape
    span = dtype.itemsize
    for dim in (d for d in shape if d):
        span *= dim
        if span > max_bytes:
            what = "is empty, but its nonzero dimensions span more than" if empty else "decodes to more than"
            raise NpzError(
                f"array of shape {shape} and dtype {dtype.name} {what} {max_bytes} bytes "
                f"(the limit; {MAX_BYTES_ENV} changes it)"
            )
    nbytes = 0 if empty else span
    start = offset + header_length
    available = len(raw) - start
    if available < nbytes:
        raise NpzError(f"array data is truncated ({available} of {nbytes} bytes)")
    if available > nbytes:
        raise NpzError(f"{available - nbytes} bytes follow the array data; expected none")
    count = nbytes // dtype.itemsize
    flat = np.frombuffer(raw, dtype=dtype, count=count, offset=start)
    array = flat.reshape(shape, order="F" if fields["fortran_order"] else "C")
    return np.ascontiguousarray(array, dtype=dtype.newbyteorder("="))


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytearray:
    """The member's bytes, exactly its declared size, with the CRC-32 checked here (not left to zipfile)."""
    raw = bytearray(info.file_size)
    view = memoryview(raw)
    filled = 0
    try:
        with archive.open(info) as handle:
            while filled < info.file_size:
                got = handle.readinto(view[filled:])
                if not got:
                    break
                filled += got
    except zipfile.BadZipFile as exc:  # zipfile checks the CRC itself when it reaches the member's end
        if "CRC" not in str(exc):
            raise
        filled = info.file_size
    if filled != info.file_size:
        raise NpzError(f"member '{info.filename}' cannot be read")
    if zlib.crc32(raw) != info.CRC:
        raise NpzError(f"member '{info.filename}' fails its CRC-32 check (corrupted)")
    return raw


_LOCAL_HEADER = b"PK\x03\x04"
_END_RECORD = b"PK\x05\x06"


def _check_zip_bounds(path: Path) -> None:
    """The file is one zip archive and nothing else: it starts with a member (or is an empty archive) and its
    end record (+ its declared comment) ends the file. zipfile would skip data before or after the archive;
    libzip's consistency check (the C++ reader's) refuses it, so both refuse it."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size < 22:
            raise NpzError("not a zip archive")
        handle.seek(0)
        head = handle.read(4)
        tail_size = min(size, 22 + 65_535)
        handle.seek(size - tail_size)
        tail = handle.read(tail_size)
    end = tail.rfind(_END_RECORD)
    while end >= 0 and end + 22 + int.from_bytes(tail[end + 20 : end + 22], "little") != len(tail):
        end = tail.rfind(_END_RECORD, 0, end)
    if head not in (_LOCAL_HEADER, _END_RECORD) or end < 0:
        raise NpzError("not a zip archive")


def _check_local_headers(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> None:
    """Every member's local header agrees with the central directory (name, no overlap), before any data is
    read: what libzip's ZIP_CHECKCONS checks when the C++ reader opens the archive."""
    for info in infos:
        try:
            archive.open(info).close()
        except (RuntimeError, NotImplementedError):
            pass  # encrypted or an unsupported method: the headers were fine; refused below by name
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error):
            raise NpzError("not a zip archive") from None


def read_npz(
    path: str | os.PathLike, max_bytes: int | None = None, keys: Collection[str] | None = None
) -> dict[str, np.ndarray]:
    """Every array of the npz at `path`, keyed by member name without `.npy`; `NpzError` names the broken rule.

    With `keys`, only those members are read (the rest pass the container checks unread), e.g. `spacing`
    without decoding a large image.
    """
    limit = max_case_bytes() if max_bytes is None else max_bytes
    _check_zip_bounds(Path(path))
    try:
        archive = zipfile.ZipFile(Path(path))
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError):
        raise NpzError("not a zip archive") from None
    arrays: dict[str, np.ndarray] = {}
    with archive:
        infos = archive.infolist()
        _check_local_headers(archive, infos)
        if len(infos) > MAX_MEMBERS:
            raise NpzError(f"{len(infos)} members; at most {MAX_MEMBERS} are accepted")
        declared, remaining = 0, limit
        seen: set[str] = set()
        for info in infos:
            name = info.filename
            key = name[:-4] if name.endswith(".npy") else name
            if key in seen:
                raise NpzError(f"member '{name}' appears twice")
            seen.add(key)
            if info.flag_bits & 0x1:
                raise NpzError(f"member '{name}' is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise NpzError(
                    f"member '{name}' uses compression method {info.compress_type}; expected stored or deflate"
                )
            if keys is not None and key not in keys:
                continue
            declared += info.file_size  # checked before a byte is allocated (a zip bomb declares its size)
            if declared > limit + len(infos) * (MAX_HEADER_LENGTH + 12):
                raise NpzError(
                    f"members declare {declared} bytes, more than the {limit}-byte limit ({MAX_BYTES_ENV} changes it)"
                )
            try:
                raw = _read_member(archive, info)
            except (zipfile.BadZipFile, EOFError, zlib.error, OSError, RuntimeError, ValueError) as exc:
                if isinstance(exc, NpzError):
                    raise
                raise NpzError(f"member '{name}' cannot be read") from None
            try:
                arrays[key] = parse_npy(raw, remaining)
            except NpzError as exc:
                raise NpzError(f"member '{name}': {exc}") from None
            remaining -= arrays[key].nbytes
    return arrays
