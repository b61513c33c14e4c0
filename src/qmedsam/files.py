"""Files the program writes: atomically, with normal permissions, hashed; and where its cache lives.

The bottom of the package: imports nothing of qmedsam, so anything may stand on it.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)  # read, not changed: the process's umask, for `normal_permissions`


def normal_permissions(path: str | os.PathLike, directory: bool = False) -> None:
    """The permissions a plain `open`/`mkdir` would give (mkstemp/mkdtemp make 0600/0700), so outputs and
    model directories are readable by other users, e.g. a non-root container user."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


def _publish(tmp_name: str, path: Path) -> None:
    """Give the temporary file normal permissions and rename it into place."""
    normal_permissions(tmp_name)
    os.replace(tmp_name, path)


def _temporary_affixes(path: Path) -> tuple[str, str]:
    """Prefix and suffix of `atomic_write`'s temporaries for `path`: hidden, beside it, ending in .tmp."""
    return f".{path.name}.", ".tmp"


def leftover_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporaries a killed `atomic_write` of `path` left behind (what a rerun may remove: ours alone). Only
    mkstemp's 8 random characters between the affixes: `.a.npz.*.tmp` would also match a temporary of `a.npz.npz`."""
    path = Path(path)
    prefix, suffix = _temporary_affixes(path)
    return sorted(path.parent.glob(glob.escape(prefix) + "?" * 8 + glob.escape(suffix)))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(handle)` on a temporary file in the same folder, then rename it into place, so readers
    never see half a file (the one mechanism behind every qmedsam output: npz, npy, JSON, PNG, checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_affixes(path)
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        _publish(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
"""The date every npz member carries: numpy's `savez` stamps the current time, so the same arrays written twice
gave different bytes; with a fixed date an output is a function of its content (a rerun or a second machine
writes the same file, and a checksum says whether anything changed)."""


def _write_npz(handle: BinaryIO, arrays: dict[str, np.ndarray], compressed: bool) -> None:
    """What `np.savez[_compressed]` writes, member by member in order, with a fixed member date."""
    compression = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(handle, mode="w", compression=compression, allowZip64=True) as archive:
        for key, value in arrays.items():
            member = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_EPOCH)
            member.compress_type = compression
            member.external_attr = 0o600 << 16  # what ZipFile.open(name, "w") gives a member
            with archive.open(member, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.asanyarray(value), allow_pickle=False)


def atomic_savez(path: str | os.PathLike, compressed: bool = True, **arrays: np.ndarray) -> Path:
    """Write an npz atomically (see `atomic_write`), reproducibly (`ZIP_EPOCH`); never pickles (object arrays
    are refused)."""
    return atomic_write(path, lambda handle: _write_npz(handle, arrays, compressed))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log shared by several writers (job-array shards on shared storage): one `write` of
    the whole line under an exclusive lock on the file, then fsync, so lines never interleave and a finished line
    survives a crash. A kill mid-write can leave at most a torn last line, which readers skip."""
    if "\n" in line:
        raise ValueError("a log line must not contain a newline")
    payload = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write bytes atomically (used for PNG, CSV and JSON outputs)."""
    return atomic_write(path, lambda handle: handle.write(payload))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def default_cache_root() -> Path:
    """`$QMEDSAM_CACHE`, else `$XDG_CACHE_HOME/qmedsam`, else `~/.cache/qmedsam`."""
    if os.environ.get("QMEDSAM_CACHE"):
        return Path(os.environ["QMEDSAM_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qmedsam"
