"""Files the program writes: atomically, with normal permissions, hashed; and where its cache lives.

The bottom of the package: imports nothing of qmedsam, so anything may stand on it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
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


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(handle)` on a temporary file in the same folder, then rename it into place, so readers
    never see half a file (the one mechanism behind every qmedsam output: npz, npy, JSON, PNG, checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        _publish(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_savez(path: str | os.PathLike, compressed: bool = True, **arrays: np.ndarray) -> Path:
    """Write an npz atomically (see `atomic_write`)."""
    return atomic_write(path, lambda handle: (np.savez_compressed if compressed else np.savez)(handle, **arrays))


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
