"""The cohort manifest: one CSV row per scan, every row checked before any work starts, all problems at once.

Columns (a header row; only these): `image` (required: a case .npz, a NIfTI file or a DICOM series folder),
`boxes` (a boxes .json/.csv) or `labels` (a label map whose labels' boxes are the prompts) for a scan, `id`
(default: the name its outputs carry) and `window` (a scan's intensity window, default `--window`). Relative paths
resolve against the manifest's folder. A case .npz carries its own boxes and uint8 image, so it takes neither.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from qmedsam.errors import UserFacingError
from qmedsam.inference.jobs import case_output_names, scan_output_names, scan_stem
from qmedsam.scans.dicom import is_dicom_folder
from qmedsam.scans.intensity import parse_window
from qmedsam.scans.nifti import is_nifti

COLUMNS = ("id", "image", "boxes", "labels", "window")
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
"""A manifest of a million scans is ~200 MB of CSV; anything larger is not a manifest."""


@dataclass(frozen=True)
class CohortCase:
    """One validated manifest row."""

    id: str
    image: Path
    kind: str  # "npz" | "nifti" | "dicom"
    boxes: Path | None = None
    labels: Path | None = None
    window: str | None = None
    line: int = 0  # the manifest line it came from, for messages

    def output_names(self) -> list[str]:
        """The files `predict` writes for it, under the names a single run gives them."""
        return case_output_names(self.image) if self.kind == "npz" else scan_output_names(self.image)


def _kind_of(path: Path) -> str | None:
    if path.is_file() and path.name.lower().endswith(".npz"):
        return "npz"
    if path.is_file() and is_nifti(path):
        return "nifti"
    if is_dicom_folder(path):
        return "dicom"
    return None


def _resolve(folder: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else folder / path


def read_manifest(path: Path) -> list[CohortCase]:
    """Every row of a cohort manifest, validated; raises UserFacingError listing every problem found."""
    if not path.is_file():
        raise UserFacingError(f"{path}: no such manifest file")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserFacingError(f"{path}: {path.stat().st_size} bytes; a manifest is a CSV of at most 256 MiB")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark is not part of the header
    except UnicodeDecodeError as exc:
        raise UserFacingError(f"{path}: not UTF-8 text ({exc}); expected a CSV manifest") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows, None)
    except csv.Error as exc:
        raise UserFacingError(f"{path}: line 1: {exc}; expected a CSV header row") from None
    if not header:
        raise UserFacingError(f"{path}: empty; expected a header row with the columns {', '.join(COLUMNS)}")
    header = [name.strip() for name in header]
    problems: list[str] = []
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        problems.append(f"unknown column(s) {unknown}; the columns are {', '.join(COLUMNS)}")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        problems.append(f"column(s) {repeated} appear more than once")
    if "image" not in header:
        problems.append("no `image` column")
    if problems:
        raise UserFacingError(_listing(path, problems))
    folder = path.absolute().parent
    cases: list[CohortCase] = []
    while True:
        try:
            values = next(rows, None)
        except csv.Error as exc:
            problems.append(f"line {rows.line_num}: {exc}")
            break
        if values is None:
            break
        number = rows.line_num
        if not any(value.strip() for value in values):
            continue  # blank lines
        if len(values) != len(header):
            problems.append(f"line {number}: {len(values)} field(s), the header has {len(header)}")
            continue
        row = {name: value.strip() for name, value in zip(header, values, strict=True)}
        case = _case_of(row, number, folder, problems)
        if case is not None:
            cases.append(case)
    if not cases and not problems:
        problems.append("no rows; expected one row per scan")
    problems += _collisions(cases)
    if problems:
        raise UserFacingError(_listing(path, problems))
    return cases


def _case_of(row: dict[str, str], line: int, folder: Path, problems: list[str]) -> CohortCase | None:
    where = f"line {line}"
    before = len(problems)
    if not row.get("image"):
        problems.append(f"{where}: `image` is empty")
        return None
    image = _resolve(folder, row["image"])
    kind = _kind_of(image)
    if kind is None:
        what = "no such file or folder" if not image.exists() else "not a case .npz, NIfTI file or DICOM series folder"
        problems.append(f"{where}: image {image}: {what}")
        return None
    prompts = {key: _resolve(folder, row[key]) if row.get(key) else None for key in ("boxes", "labels")}
    window = row.get("window") or None
    if kind == "npz":
        given = [key for key in ("boxes", "labels", "window") if row.get(key)]
        if given:
            problems.append(
                f"{where}: {image.name} is a case file (its boxes and uint8 image inside); {given} apply to scans"
            )
    else:
        if (prompts["boxes"] is None) == (prompts["labels"] is None):
            problems.append(f"{where}: a scan needs `boxes` or `labels`, exactly one")
        for key, prompt in prompts.items():
            if prompt is not None and not prompt.is_file():
                problems.append(f"{where}: {key} {prompt}: no such file")
        if window is not None:
            try:
                parse_window(window)
            except UserFacingError as exc:
                problems.append(f"{where}: window: {exc}")
    case_id = row.get("id") or (image.name[: -len(".npz")] if kind == "npz" else scan_stem(image))
    if "\n" in case_id or "\r" in case_id:
        problems.append(f"{where}: id {case_id!r} has a line break")
    if len(problems) > before:
        return None
    return CohortCase(case_id, image, kind, prompts["boxes"], prompts["labels"], window, line)


def _collisions(cases: list[CohortCase]) -> list[str]:
    """Two rows may not share an id (the ledger's key) nor an output name (one would overwrite the other)."""
    problems = []
    for what, key in (("id", lambda case: [case.id]), ("output file", CohortCase.output_names)):
        seen: dict[str, int] = {}
        for case in cases:
            for name in key(case):
                if name in seen:
                    problems.append(f"line {case.line}: {what} {name!r} is also line {seen[name]}'s")
                else:
                    seen[name] = case.line
    return problems


def _listing(path: Path, problems: list[str]) -> str:
    shown = problems[:50]
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    return f"{path}: {len(problems)} problem(s), nothing was run:\n  " + "\n  ".join(shown) + more


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (1 <= I <= N) -> (I, N)."""
    parts = text.split("/")
    try:
        index, count = (int(part) for part in parts)
    except ValueError:
        raise UserFacingError(f"--shard {text!r}: expected I/N, e.g. 3/8") from None
    if not 1 <= index <= count:
        raise UserFacingError(f"--shard {text!r}: expected 1 <= I <= N")
    return index, count


def in_shard(case_id: str, index: int, count: int) -> bool:
    """Shard I of N holds the ids whose SHA-256 is I-1 modulo N: a function of the id alone, so it is stable when
    the manifest is reordered or grows, and the shards of one N partition the cohort."""
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "big") % count == index - 1
