"""A training tree from a user's own labelled cases (`qmedsam finetune`): what the click recipe trains on.

Input: `CASES/<name>.npz` (`imgs`, optional `boxes` and `spacing`, the challenge case format) with
`GTS/<name>.npz` (`gts`, labels 1..N, 0 = background; optional `spacing`), or `CASES/<name>.nii[.gz]` with a
label map `GTS/<name>.nii[.gz]` on the same grid (mapped to the working (z, y, x) array exactly as
`qmedsam predict` maps a scan, intensities windowed as its `--window auto` does). A 2D case is one whose `gts`
is (H, W) (images (H, W), (H, W, 1), (H, W, 3) or RGBA), a 3D case one whose `gts` is (D, H, W).

Every pair is read and checked first; a bad pair (unreadable file, missing key, shapes that disagree, no label,
a case without ground truth or the reverse) is skipped with a message naming the file and key, and the rest
is used. The cases left, sorted by name, are split by case: every `held_out_every`-th is `validation` (held
out; at least one when there are two or more), the rest `train`; fewer than two usable cases are refused.

Written (the user's files are only read):
- `TREE/cases/<name>.npz` (`imgs` (2D as (H, W, 3)), `gts`, `spacing` for 3D) and `TREE/manifest.json` in
  the training-tree format (`qmedsam.datasets.manifest`), the manifest last and atomically;
- `HELD_OUT/cases/<name>.npz` + `HELD_OUT/gts/<name>.npz` for each held-out case, challenge format, for
  `qmedsam evaluate`: a copy of the user's npz pair when its `boxes` match its labels (box i = label i+1, every
  label 1..N present; 3D with a spacing), else imgs + the tight box of every promptable label (labels renumbered
  1..N, as `qmedsam data cases` writes them); `HELD_OUT/manifest.json` says which.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmedsam.data.cases import CaseError, load_npz, read_case, read_ground_truth, segmentation_dtype, validated_image
from qmedsam.datasets.manifest import MANIFEST_FORMAT, MANIFEST_NAME, load_manifest
from qmedsam.datasets.recipes.demo import promptable_labels, relabel, tight_boxes
from qmedsam.datasets.recipes.split_cases import MIN_LABEL_VOXELS
from qmedsam.datasets.recipes.train_tree import slices_with_labels
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_savez, atomic_write_bytes
from qmedsam.scans.intensity import to_uint8
from qmedsam.scans.nifti import on_grid_of, read_nifti
from qmedsam.scans.orientation import VoxelMapping

log = logging.getLogger(__name__)

RECIPE = "user cases"
TRAIN, HELD_OUT = "train", "validation"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ASSUMED_SPACING = (1.0, 1.0, 1.0)


@dataclass
class Pair:
    """A case file and its ground-truth file, matched by name."""

    name: str  # the case's name without suffix; the tree and held-out files are <name>.npz
    image: Path
    truth: Path

    @property
    def kind(self) -> str:
        return "npz" if self.image.name.lower().endswith(".npz") else "nifti"


@dataclass
class UserCase:
    """One checked pair, in the working layout."""

    pair: Pair
    dimension: int
    imgs: np.ndarray  # 2D (H, W, 3); 3D (D, H, W)
    gts: np.ndarray  # 2D (H, W); 3D (D, H, W)
    spacing: tuple[float, float, float] | None  # 3D, array order (z, y, x), mm
    reusable: bool  # the user's npz pair is a valid challenge case whose boxes match its labels
    warnings: list[str] = field(default_factory=list)
    detail: dict = field(default_factory=dict)


@dataclass
class UserTree:
    """What `build_user_tree` wrote and what it left out."""

    root: Path
    held_out_dir: Path
    train: list[str]
    held_out: list[str]
    skipped: list[str]
    warnings: list[str]


def _stem(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in (".npz", *NIFTI_SUFFIXES):
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """{name: file} of the case-like files of a folder (.npz, .nii, .nii.gz), and the names given twice."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        stem = _stem(path)
        if stem and path.is_file() and not path.name.startswith("."):
            found.setdefault(stem, []).append(path)
    clashes = [
        f"{folder}: {', '.join(p.name for p in paths)} share the name {stem!r}; skipped (keep one)"
        for stem, paths in found.items()
        if len(paths) > 1
    ]
    return {stem: paths[0] for stem, paths in found.items() if len(paths) == 1}, clashes


def find_pairs(images: Path, truths: Path) -> tuple[list[Pair], list[str]]:
    """Cases and ground truths matched by name, sorted; the files without a partner are reported."""
    for option, folder in (("--images", images), ("--gt", truths)):
        if not folder.is_dir():
            raise UserFacingError(f"{option} {folder}: not a folder")
    cases, problems = _files(images)
    gts, gt_clashes = _files(truths)
    problems += gt_clashes
    pairs = [Pair(name, cases[name], gts[name]) for name in sorted(cases) if name in gts]
    problems += [
        f"{cases[n]}: no ground truth {truths / n}.npz (or .nii.gz); skipped" for n in sorted(cases) if n not in gts
    ]
    problems += [
        f"{gts[n]}: no case file {images / n}.npz (or .nii.gz); skipped" for n in sorted(gts) if n not in cases
    ]
    mixed = [p for p in pairs if p.image.name.lower().endswith(".npz") != p.truth.name.lower().endswith(".npz")]
    problems += [f"{p.image} and {p.truth}: one is .npz, the other NIfTI; skipped (use one format)" for p in mixed]
    return [p for p in pairs if p not in mixed], problems


def _spacing(path: Path, data: dict[str, np.ndarray]) -> tuple[float, float, float] | None:
    """`spacing` of an npz as 3 positive finite numbers, or None (absent); a bad value is a CaseError."""
    if "spacing" not in data:
        return None
    raw = data["spacing"]
    values = np.asarray(raw, dtype=np.float64).ravel() if raw.dtype.kind in "uif" else None
    if values is None or values.size != 3 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise CaseError(f"{path}: key 'spacing' is {raw!r}; expected 3 positive numbers (z, y, x) in mm")
    return (float(values[0]), float(values[1]), float(values[2]))


def _boxes_match(pair: Pair, gts: np.ndarray) -> tuple[bool, str | None]:
    """Whether the case file is a valid challenge case whose box i is the object labelled i+1."""
    try:
        case = read_case(pair.image)
    except CaseError as exc:
        return False, f"its boxes are not usable ({exc})"
    present = np.unique(gts[gts > 0])
    if len(case.boxes) != len(present) or not np.array_equal(present, np.arange(1, len(case.boxes) + 1)):
        return False, f"its {len(case.boxes)} boxes do not match its labels {present[:10].tolist()}"
    return True, None


def _read_npz_pair(pair: Pair) -> UserCase:
    data = load_npz(pair.image)
    if "imgs" not in data:
        raise CaseError(f"{pair.image}: missing key 'imgs' (found keys: {sorted(data)})")
    gts = read_ground_truth(pair.truth, "gts")
    if gts.ndim not in (2, 3):
        raise CaseError(f"{pair.truth}: key 'gts' has shape {gts.shape}; expected (H, W) for 2D or (D, H, W) for 3D")
    dimension = gts.ndim
    prefix = {"2D": 2, "3D": 3}.get(pair.image.name[:2].upper())
    if prefix is not None and prefix != dimension:
        raise CaseError(
            f"{pair.image}: the name says {prefix}D but key 'gts' in {pair.truth} has shape {gts.shape} ({dimension}D)"
        )
    imgs = validated_image(data["imgs"], dimension, str(pair.image))
    spatial = tuple(imgs.shape[:2] if dimension == 2 else imgs.shape)
    if tuple(gts.shape) != spatial:
        raise CaseError(
            f"{pair.truth}: key 'gts' has shape {gts.shape}; expected the shape of key 'imgs' in {pair.image}, "
            f"{spatial}"
        )
    case = UserCase(pair, dimension, imgs, gts, None, False)
    if dimension == 3:
        gt_data = load_npz(pair.truth)
        case.spacing = _spacing(pair.truth, gt_data) or _spacing(pair.image, data)
    if "boxes" in data:
        case.reusable, why = _boxes_match(pair, gts)
        if why:
            case.warnings.append(f"{pair.image}: {why}; if held out, it is scored with tight boxes of its labels")
    return case


def _read_nifti_pair(pair: Pair) -> UserCase:
    try:
        import nibabel  # noqa: F401
    except ImportError:
        raise UserFacingError("NIfTI cases need nibabel: pip install 'qmedsam[scans]'") from None
    try:
        scan = read_nifti(pair.image)
        labels = read_nifti(pair.truth)
    except UserFacingError as exc:
        raise CaseError(str(exc)) from None
    aligned = on_grid_of(scan, labels)
    if aligned is None:
        raise CaseError(
            f"{pair.truth}: label map (shape {labels.array.shape}) is not on the grid of {pair.image} "
            f"(shape {scan.array.shape}); resample it to the image first"
        )
    if aligned.dtype.kind == "f":
        if not np.array_equal(aligned, np.round(aligned)):
            raise CaseError(f"{pair.truth}: label map holds non-integer values")
        aligned = aligned.astype(np.int64)
    if aligned.dtype.kind not in "uib" or (aligned.size and aligned.min() < 0):
        raise CaseError(f"{pair.truth}: labels must be integers 0 (background) and 1..N")
    try:
        mapping = VoxelMapping.from_affine(scan.affine, scan.array.shape)
    except ValueError as exc:
        raise CaseError(f"{pair.image}: {exc}") from None
    imgs, windowing = to_uint8(mapping.to_work(scan.array), "auto")
    gts = mapping.to_work(aligned)
    zooms = scan.header.get_zooms()[:3]
    spacing = tuple(float(zooms[axis]) for axis in mapping.source_axis)
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        spacing = None
    return UserCase(pair, 3, imgs, gts, spacing, False, detail={"windowing": windowing})  # type: ignore[arg-type]


def read_pair(pair: Pair) -> UserCase:
    """One pair read and checked; every problem of the files is a CaseError naming the file and key."""
    case = _read_npz_pair(pair) if pair.kind == "npz" else _read_nifti_pair(pair)
    if not case.gts.any():
        raise CaseError(f"{pair.truth}: no labelled voxel (all 0); nothing to train or score on")
    if not promptable_labels(case.gts, MIN_LABEL_VOXELS)[0]:
        raise CaseError(
            f"{pair.truth}: no label of at least {MIN_LABEL_VOXELS} voxels with a box of some width and height"
        )
    if case.dimension == 3 and case.spacing is None:
        case.warnings.append(
            f"{pair.image}: no spacing (in the case or ground-truth file); {ASSUMED_SPACING} mm assumed for scoring"
        )
    return case


def held_out_indices(count: int, every: int) -> list[int]:
    """Every `every`-th case (1-based: every-1, 2*every-1, ...) is held out; the last one when that gives none."""
    held = [i for i in range(count) if (i + 1) % every == 0]
    return held or [count - 1]


OWN_ENTRIES = frozenset({"cases", "gts", ".click-cache", MANIFEST_NAME})


def _prepare(folder: Path) -> None:
    """Create `folder`, or reuse one this module wrote (its manifest says so, or it holds nothing but what this
    module writes); refuse any other non-empty folder."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(folder)
    ours = (
        manifest is not None and isinstance(manifest.get("recipe"), dict) and manifest["recipe"].get("name") == RECIPE
    )
    foreign = [p.name for p in folder.iterdir() if p.name not in OWN_ENTRIES]
    if foreign and not ours:
        raise UserFacingError(
            f"{folder} holds files `qmedsam finetune` did not write ({', '.join(sorted(foreign)[:3])}); choose a new "
            "or empty --out"
        )


def _tree_entry(case: UserCase, split: str, file: str, root: Path) -> dict:
    name = case.pair.name
    modality = name.split("_")[1] if name[:3].upper() in ("2D_", "3D_") and name.count("_") >= 2 else "user"
    return {
        "file": file,
        "name": f"{name}.npz",
        "modality": modality,
        "dataset": "user",
        "dimension": case.dimension,
        "split": split,
        "source_volume": str(case.pair.image),
        "labelled": True,
        "label_origin": "user",
        "source": {"image": str(case.pair.image), "ground_truth": str(case.pair.truth), "format": case.pair.kind},
        "shape": list(case.imgs.shape),
        "spacing": list(case.spacing) if case.spacing is not None else None,
        "n_objects": len(np.unique(case.gts[case.gts > 0])),
        "samples_2d": slices_with_labels(case.gts, case.imgs, case.dimension),
        "bytes": (root / file).stat().st_size,
        **case.detail,
    }


def _write_held_out(case: UserCase, out: Path) -> dict:
    """The challenge case + ground truth of a held-out case (a copy of the user's pair when it is one)."""
    file = f"{case.pair.name}.npz"
    if case.reusable and (case.dimension == 2 or case.spacing is not None):
        for source, folder in ((case.pair.image, "cases"), (case.pair.truth, "gts")):
            (out / folder).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, out / folder / file)
        return {"name": file, "boxes": "the case file's (copied)", "objects": int(case.gts.max())}
    kept, dropped = promptable_labels(case.gts, MIN_LABEL_VOXELS)  # not empty: read_pair checked
    gts = relabel(case.gts, kept)
    arrays = {"imgs": case.imgs, "boxes": tight_boxes(gts, len(kept))}
    truth = {"gts": gts}
    if case.dimension == 3:
        arrays["spacing"] = truth["spacing"] = np.asarray(case.spacing or ASSUMED_SPACING, dtype=np.float64)
    atomic_savez(out / "cases" / file, **arrays)
    atomic_savez(out / "gts" / file, **truth)
    return {
        "name": file,
        "boxes": "tight boxes of the labels (renumbered 1..N)",
        "objects": len(kept),
        "source_labels": kept,
        "dropped_labels": dropped,
    }


@dataclass
class CheckedCases:
    """The usable pairs, sorted by name, and what was left out."""

    pairs: list[Pair]
    skipped: list[str]
    warnings: list[str]


def check_user_cases(images: Path, truths: Path) -> CheckedCases:
    """Read and check every pair of `images` / `truths` (nothing is written); refused (UserFacingError) when
    fewer than two are usable."""
    images, truths = Path(images), Path(truths)
    pairs, skipped = find_pairs(images, truths)
    warnings: list[str] = []
    usable: list[Pair] = []
    for pair in pairs:
        try:
            case = read_pair(pair)
        except CaseError as exc:
            skipped.append(f"{exc}; skipped")
            continue
        warnings.extend(case.warnings)
        usable.append(pair)
    if len(usable) < 2:
        found = f"{len(pairs)} pair(s) found, {len(usable)} usable"
        problems = "".join(f"\n  {s}" for s in skipped)
        raise UserFacingError(
            f"fine-tuning needs at least 2 labelled cases (one to train on, one held out to score); {found} in "
            f"--images {images} / --gt {truths}{problems}"
        )
    return CheckedCases(usable, skipped, warnings)


def write_user_tree(checked: CheckedCases, root: Path, held_out_dir: Path, held_out_every: int = 5) -> UserTree:
    """Write the training tree at `root` and the held-out cases at `held_out_dir` (see the module docstring);
    an earlier output of this function there is replaced (the embedding cache is kept)."""
    root, held_out_dir = Path(root), Path(held_out_dir)
    if held_out_every < 2:
        raise UserFacingError(f"--held-out-every must be at least 2 (got {held_out_every}): some cases must train")
    held = set(held_out_indices(len(checked.pairs), held_out_every))
    _prepare(root)
    _prepare(held_out_dir)
    for folder in ("cases", "gts"):
        shutil.rmtree(held_out_dir / folder, ignore_errors=True)  # our own earlier output (checked above)
    old = load_manifest(root)
    entries, held_records, train_names, held_names = [], [], [], []
    for index, pair in enumerate(checked.pairs):
        case = read_pair(pair)  # read again: one case in memory at a time
        split = HELD_OUT if index in held else TRAIN
        file = f"cases/{pair.name}.npz"
        arrays = {"imgs": case.imgs, "gts": case.gts.astype(segmentation_dtype(int(case.gts.max())))}
        if case.dimension == 3 and case.spacing is not None:
            arrays["spacing"] = np.asarray(case.spacing, dtype=np.float64)
        atomic_savez(root / file, **arrays)
        entries.append(_tree_entry(case, split, file, root))
        if split == HELD_OUT:
            held_records.append(_write_held_out(case, held_out_dir))
            held_names.append(f"{pair.name}.npz")
        else:
            train_names.append(f"{pair.name}.npz")
    written = {e["file"] for e in entries}
    for entry in (old or {}).get("cases", []):
        rel = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(rel, str) and rel not in written and rel.startswith("cases/") and ".." not in rel:
            (root / rel).unlink(missing_ok=True)
    recipe = {
        "name": RECIPE,
        "held_out_every": held_out_every,
        "images": str(checked.pairs[0].image.parent),
        "ground_truth": str(checked.pairs[0].truth.parent),
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "recipe": recipe,
        "split_rule": (
            f"by case, sorted by name: every {held_out_every}th is validation (held out; the last one when that "
            "gives none), the rest train"
        ),
        "layout": "cases/<name>.npz: imgs (2D (H, W, 3), 3D (D, H, W)), gts (0 background), spacing (3D, z y x mm)",
        "skipped": checked.skipped,
        "warnings": checked.warnings,
        "cases": entries,
    }
    atomic_write_bytes(root / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    held_manifest = {"recipe": recipe, "tree": str(root), "split": HELD_OUT, "cases": held_records}
    atomic_write_bytes(held_out_dir / MANIFEST_NAME, (json.dumps(held_manifest, indent=2) + "\n").encode())
    log.info("training tree %s: %d train, %d held out", root, len(train_names), len(held_names))
    return UserTree(root, held_out_dir, train_names, held_names, checked.skipped, checked.warnings)


def build_user_tree(images: Path, truths: Path, root: Path, held_out_dir: Path, held_out_every: int = 5) -> UserTree:
    """`check_user_cases` then `write_user_tree`: nothing is written when the cases are refused."""
    if held_out_every < 2:
        raise UserFacingError(f"--held-out-every must be at least 2 (got {held_out_every}): some cases must train")
    return write_user_tree(check_user_cases(images, truths), root, held_out_dir, held_out_every)
