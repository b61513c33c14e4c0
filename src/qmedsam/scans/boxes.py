"""Box prompts for a scan, in the scan file's own voxel indices.

A box is `[i_min, j_min, k_min, i_max, j_max, k_max]`: the file's array axes in order (nibabel's
`img.dataobj[i, j, k]`; for a DICOM series i = column, j = row, k = slice in position order), inclusive at
both ends. Each box carries the label value written for it (default: its row number + 1).

- JSON: `[[i0, j0, k0, i1, j1, k1], ...]` or `[{"box": [...], "label": 3}, ...]`;
- CSV: header `i_min,j_min,k_min,i_max,j_max,k_max` and optionally `label`, `from_slice`;

A slice box says so explicitly: `{"box": [i0, j0, k, i1, j1, k], "from_slice": true}` (CSV: `from_slice` true/1)
is a box on one slice (extent 1 along exactly one axis, any of the three) from which the whole object is found
(`qmedsam.inference.from_slice`). Without the flag a box one slice thick keeps its meaning: the object on that
slice only.
- from a label map on the same grid: the tight box of every label value present (output label = that value).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmedsam.errors import UserFacingError

CSV_COLUMNS = ("i_min", "j_min", "k_min", "i_max", "j_max", "k_max")


TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no", "")


@dataclass(frozen=True)
class ScanBoxes:
    boxes: np.ndarray  # (N, 6) int64 file-index boxes
    labels: np.ndarray  # (N,) int64 output label of each box, >= 1
    from_slice: np.ndarray | None = None  # (N,) bool: box n is a slice box (None: none is)

    def slice_flags(self) -> np.ndarray:
        return np.zeros(len(self.boxes), bool) if self.from_slice is None else self.from_slice


def slice_axis(box: np.ndarray) -> int | None:
    """The one file axis along which a box is one voxel thick (None if not exactly one)."""
    thin = [axis for axis in range(3) if box[axis] == box[3 + axis]]
    return thin[0] if len(thin) == 1 else None


def _checked(path: Path, rows: list, labels: list[int], flags: list[bool] | None = None) -> ScanBoxes:
    if not rows:
        raise UserFacingError(f"{path}: no boxes; expected at least one [i_min, j_min, k_min, i_max, j_max, k_max]")
    try:
        boxes = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserFacingError(f"{path}: boxes must be lists of 6 numbers") from None
    if boxes.ndim != 2 or boxes.shape[1] != 6:
        raise UserFacingError(f"{path}: boxes have shape {boxes.shape}; expected (N, 6) [i0, j0, k0, i1, j1, k1]")
    if not np.all(np.isfinite(boxes)) or not np.array_equal(boxes, np.round(boxes)):
        raise UserFacingError(f"{path}: box values must be whole voxel indices")
    label_array = np.array(labels, dtype=np.int64)
    if np.any(label_array < 1):
        raise UserFacingError(f"{path}: labels must be >= 1 (0 is background), got {sorted(set(labels))[:5]}")
    if len(set(labels)) != len(labels):
        raise UserFacingError(f"{path}: each box needs its own label; repeated: {sorted(set(labels))[:5]}")
    checked = boxes.astype(np.int64)
    from_slice = None
    if flags is not None and any(flags):
        from_slice = np.array(flags, dtype=bool)
        for row in np.nonzero(from_slice)[0]:
            if slice_axis(checked[row]) is None:
                raise UserFacingError(
                    f"{path}: box {row} is marked from_slice but is not one voxel thick along exactly one axis "
                    f"({checked[row].tolist()}); a slice box is [i0, j0, k, i1, j1, k] (or thin along i or j)"
                )
    return ScanBoxes(checked, label_array, from_slice)


def _flag(value, path: Path, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise UserFacingError(f"{path}: {where} 'from_slice' must be true or false, got {value!r}")


def read_boxes(path: str | Path) -> ScanBoxes:
    """Boxes from a .json or .csv file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserFacingError(f"{path}: cannot read boxes ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UserFacingError(f"{path}: boxes are not UTF-8 text (byte {exc.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserFacingError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "boxes" in data:
            data = data["boxes"]
        if not isinstance(data, list):
            raise UserFacingError(f"{path}: expected a JSON list of boxes")
        rows, labels, flags = [], [], []
        for n, item in enumerate(data):
            if isinstance(item, dict):
                if "box" not in item:
                    raise UserFacingError(f"{path}: box {n} has no 'box' key")
                unknown = sorted(set(item) - {"box", "label", "from_slice"})
                if unknown:
                    raise UserFacingError(
                        f"{path}: box {n} has unknown key(s) {unknown}; expected box, label, from_slice"
                    )
                rows.append(item["box"])
                label = item.get("label", n + 1)
                if not isinstance(label, int) or isinstance(label, bool):
                    raise UserFacingError(f"{path}: box {n} 'label' must be an integer, got {label!r}")
                labels.append(label)
                flag = item.get("from_slice", False)
                if not isinstance(flag, bool):
                    raise UserFacingError(f"{path}: box {n} 'from_slice' must be true or false, got {flag!r}")
                flags.append(flag)
            else:
                rows.append(item)
                labels.append(n + 1)
                flags.append(False)
        return _checked(path, rows, labels, flags)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        fields = [f.strip() for f in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in fields]
        if missing:
            raise UserFacingError(f"{path}: CSV header lacks {missing}; expected {','.join(CSV_COLUMNS)}[,label]")
        rows, labels, flags = [], [], []
        for n, row in enumerate(reader):
            row = {k.strip(): v for k, v in row.items() if k is not None}
            try:
                rows.append([float(row[c]) for c in CSV_COLUMNS])
                labels.append(int(row["label"]) if row.get("label") not in (None, "") else n + 1)
            except (TypeError, ValueError):
                raise UserFacingError(f"{path}: CSV row {n + 2} has a value that is not a number") from None
            flags.append(_flag(row.get("from_slice") or "", path, f"CSV row {n + 2}"))
        return _checked(path, rows, labels, flags)
    raise UserFacingError(f"{path}: boxes must be a .json or .csv file")


def boxes_from_labels(labels: np.ndarray, source: str) -> ScanBoxes:
    """The tight file-index box of every label value present in a label map."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        if not np.array_equal(labels, np.round(labels)):
            raise UserFacingError(f"{source}: label map holds non-integer values")
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "uib":
        raise UserFacingError(f"{source}: label map has dtype {labels.dtype}; expected integers")
    values = [int(v) for v in np.unique(labels) if v != 0]
    if any(v < 0 for v in values):
        raise UserFacingError(f"{source}: label map has negative labels")
    if not values:
        raise UserFacingError(f"{source}: label map is empty (no voxel > 0), so there is nothing to prompt")
    rows = []
    for value in values:
        where = np.nonzero(labels == value)
        rows.append([int(a.min()) for a in where] + [int(a.max()) for a in where])
    return ScanBoxes(np.array(rows, dtype=np.int64), np.array(values, dtype=np.int64))


def check_inside(boxes: ScanBoxes, shape: tuple[int, int, int], source: str) -> None:
    """Refuse inverted boxes and boxes wholly outside the volume (partly outside is clipped later)."""
    for row, box in enumerate(boxes.boxes):
        for axis, name in enumerate("ijk"):
            lo, hi = box[axis], box[3 + axis]
            if hi < lo:
                raise UserFacingError(
                    f"{source}: box {row} is inverted along {name} ({name}_max {hi} < {name}_min {lo})"
                )
            if hi < 0 or lo > shape[axis] - 1:
                raise UserFacingError(
                    f"{source}: box {row} lies outside the volume along {name} ([{lo}, {hi}] vs size {shape[axis]})"
                )
