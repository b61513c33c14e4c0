"""The client's packed-array format, checked before anything is allocated.

The nnInteractive client packs arrays as `NNIA` + version + codec + ndim + dtype name + int64 shape + blosc2
chunks (`nnInteractive.inference.remote.serialization`, used here as a dependency, not copied). Its
`unpack_array` allocates whatever shape and dtype the header declares, so a hostile or mistaken header could ask
for terabytes or an object array: the header is read and checked here first (numeric dtype, non-negative shape of
the expected rank, at most `max_voxels`), and only then unpacked.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"NNIA"
ALLOWED_DTYPES = frozenset(
    ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32", "float64"]
)


class WireError(ValueError):
    """A packed array the server refuses; `status` is the HTTP status to answer with (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PackedHeader:
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)


def read_header(body: bytes, what: str) -> PackedHeader:
    """The declared dtype and shape of a packed array, or a WireError naming what is wrong."""
    if len(body) < 8:
        raise WireError(f"{what}: {len(body)} bytes is too short for a packed array (magic NNIA, ...)")
    magic, _version, _codec, ndim, name_len = struct.unpack_from("<4sBBBB", body, 0)
    if magic != MAGIC:
        raise WireError(f"{what}: not a packed array (magic {magic!r}, expected {MAGIC!r})")
    end = 8 + name_len + 8 * ndim
    if len(body) < end:
        raise WireError(f"{what}: header truncated ({len(body)} bytes, the header needs {end})")
    try:
        name = body[8 : 8 + name_len].decode("ascii")
    except UnicodeDecodeError:
        raise WireError(f"{what}: dtype name is not ASCII") from None
    if name not in ALLOWED_DTYPES:
        raise WireError(f"{what}: dtype {name!r}; expected one of {sorted(ALLOWED_DTYPES)}")
    shape = struct.unpack_from(f"<{ndim}q", body, 8 + name_len)
    if any(d < 0 for d in shape):
        raise WireError(f"{what}: negative size in shape {list(shape)}")
    return PackedHeader(np.dtype(name), tuple(int(d) for d in shape))


def unpack_checked(body: bytes, what: str, ndim: int, max_voxels: int) -> np.ndarray:
    """The array of a packed body of rank `ndim` and at most `max_voxels` elements (else 413), else WireError."""
    from nnInteractive.inference.remote.serialization import unpack_array

    header = read_header(body, what)
    if len(header.shape) != ndim:
        raise WireError(f"{what}: shape {list(header.shape)} has {len(header.shape)} axes; expected {ndim}")
    if header.voxels > max_voxels:
        raise WireError(
            f"{what}: shape {list(header.shape)} is {header.voxels:,} voxels; this server takes at most "
            f"{max_voxels:,} (qmedsam serve --max-voxels)",
            status=413,
        )
    if header.voxels == 0:
        raise WireError(f"{what}: shape {list(header.shape)} is empty")
    try:
        return unpack_array(body)
    except (ValueError, struct.error, RuntimeError) as exc:
        raise WireError(f"{what}: cannot unpack ({exc})") from None


def pack(array: np.ndarray) -> bytes:
    """A mask region in the client's format (masks compress best without a filter, as the client packs them)."""
    import blosc2
    from nnInteractive.inference.remote.serialization import pack_array

    return pack_array(array, filters=[blosc2.Filter.NOFILTER], nthreads=1)
