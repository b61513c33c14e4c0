"""`manifest.json`: what a dataset build wrote (files, sizes, splits, provenance). The recipes write it; the
training dataset, validation and `qmedsam data cases` read it; every reader is here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qmedsam.errors import UserFacingError

log = logging.getLogger(__name__)


MANIFEST_NAME = "manifest.json"


MANIFEST_FORMAT = "qmedsam training tree"


def read_manifest(root: Path) -> dict[str, dict] | None:
    """`ROOT/manifest.json` as {posix relative file: entry}; None when absent or another format."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc}); expected a '{MANIFEST_FORMAT}' manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        log.warning("%s: not a '%s' manifest; ignored (no split information)", path, MANIFEST_FORMAT)
        return None
    cases = manifest.get("cases")
    if not isinstance(cases, list) or not all(
        isinstance(c, dict) and isinstance(c.get("file"), str) and isinstance(c.get("split"), str) for c in cases
    ):
        raise ValueError(f"{path}: 'cases' must be a list of objects with string 'file' and 'split'")
    return {c["file"]: c for c in cases}


def load_manifest(out_dir: Path) -> dict | None:
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def labelled_split_entries(root: Path, split: str) -> list[dict]:
    """Manifest entries of the labelled files of `split` in a training tree; a clear error when there are none."""
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserFacingError(
            f"{path}: not a training tree manifest (build one with `qmedsam data train`): {exc}"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cases"), list):
        raise UserFacingError(f"{path}: expected key 'cases' with a list of files")
    entries = [e for e in manifest["cases"] if e.get("split") == split and e.get("labelled")]
    if not entries:
        raise UserFacingError(f"{path}: no labelled files in split {split!r}")
    return entries
