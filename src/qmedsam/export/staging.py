"""Write a model folder beside its destination and swap it in only when complete; never replace a folder
export did not make."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qmedsam.errors import UserFacingError
from qmedsam.files import normal_permissions
from qmedsam.inference.model_dir import MODEL_FILES, MODEL_FORMAT, is_model_dir


def check_replaceable(out_dir: Path, force: bool = False) -> None:
    """Refuse an existing `out_dir` that export did not make, so `--out .` never deletes a user's files.

    Replaceable: nothing there, an empty folder, or a model folder (meta.json with format 'qmedsam-openvino')
    holding only the files an export writes. Anything else needs `force` (the `--force` flag).
    """
    if force or not os.path.lexists(out_dir):
        return
    hint = "choose another --out, or pass --force to replace it and everything in it"
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise UserFacingError(f"{out_dir} exists and is not a folder; {hint}")
    names = sorted(entry.name for entry in out_dir.iterdir())
    if not names:
        return
    if not is_model_dir(out_dir):
        raise UserFacingError(
            f"{out_dir} is not a qmedsam model folder ({out_dir / 'meta.json'} with format '{MODEL_FORMAT}' is what "
            f"marks one) and holds {len(names)} entries; {hint}"
        )
    foreign = [name for name in names if name not in MODEL_FILES]
    if foreign:
        raise UserFacingError(
            f"{out_dir} is a qmedsam model folder but also holds {foreign[:5]}, which export did not write; {hint}"
        )


def _remove_replaced(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def staged_directory(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir`; it replaces `out_dir` only if the block succeeds.

    A crash or a failed check never leaves a half-written model directory that later runs would trust, and an
    existing `out_dir` is replaced only if `check_replaceable` allows it (checked before and after the work).
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    normal_permissions(staging, directory=True)  # mkdtemp makes it 0700: a model must be readable by others
    try:
        yield staging
        check_replaceable(out_dir, force)
        replaced = None
        if os.path.lexists(out_dir):  # moved aside first, so a failed rename leaves the old folder in place
            replaced = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.replaced.", dir=out_dir.parent)) / "old"
            out_dir.rename(replaced)
        try:
            staging.rename(out_dir)
        except BaseException:
            if replaced is not None:  # put the old folder back where it was
                replaced.rename(out_dir)
                replaced.parent.rmdir()
            raise
        if replaced is not None:
            _remove_replaced(replaced)
            replaced.parent.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
