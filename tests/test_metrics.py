"""DSC / NSD against the challenge's reference: DeepMind's `surface-distance` package and compute_metrics.py's rules.

The package is a test dependency only. Its empty-mask paths use `np.Inf` / `np.NaN` (gone in numpy 2), so the
reference helpers below settle empty masks themselves, exactly as the package did under numpy 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import surface_distance  # a dev dependency (pyproject [dev]); imported, not skipped, so CI cannot miss it
from scipy import ndimage
from surface_distance import lookup_tables

from qmedsam.data.cases import read_ground_truth
from qmedsam.evaluate.metrics import (
    check_spacing_order,
    dice_per_label,
    evaluate_arrays,
    nsd_per_label,
)
from qmedsam.evaluate.surface import (
    neighbourhood_codes,
    surface_dice,
    surface_distances,
    surfel_sizes,
)

TOL = 1e-6
# The package still imports from scipy.ndimage.filters / .morphology.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:surface_distance")


# --------------------------------------------------------------------------------------------------------
# Reference: the package + the challenge's compute_metrics.py, with numpy-2-safe empty paths.


@pytest.fixture(autouse=True)
def _unsorted_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The package sorts every surfel in Python; the order cannot change NSD, only the test's run time."""
    monkeypatch.setattr(surface_distance.metrics, "_sort_distances_surfels", lambda d, a: (d, a))


def ref_dice(gt: np.ndarray, pred: np.ndarray) -> float:
    if gt.sum() + pred.sum() == 0:
        return float("nan")  # the package returns np.NaN here
    return float(surface_distance.compute_dice_coefficient(gt, pred))


def ref_nsd(gt: np.ndarray, pred: np.ndarray, spacing, tolerance: float = 2.0) -> float:
    gt, pred = gt.astype(bool), pred.astype(bool)
    if not gt.any() and not pred.any():
        return float("nan")  # 0 / 0 in the package
    if not gt.any() or not pred.any():
        return 0.0  # the package: distances inf, overlap 0 over the non-empty side's area
    distances = surface_distance.compute_surface_distances(gt, pred, spacing_mm=spacing)
    return float(surface_distance.compute_surface_dice_at_tolerance(distances, tolerance))


def ref_case(gt: np.ndarray, seg: np.ndarray, dimension: int, spacing=None, rule: str = "challenge"):
    """compute_metrics.py (rule 'challenge') or the per-label variant, on arrays."""
    labels = range(1, int(gt.max()) + 1)
    dsc_list = [ref_dice(gt == i, seg == i) for i in labels]
    dsc = float(np.mean(dsc_list)) if dsc_list else float("nan")
    if rule == "challenge":
        if not dsc > 0.2:
            return dsc, 0.0
        if dimension == 2:
            gt, seg, spacing = gt[..., None], seg[..., None], [1.0, 1.0, 1.0]
        return dsc, float(np.mean([ref_nsd(gt == i, seg == i, spacing) for i in labels]))
    if dimension == 2:
        spacing = [1.0, 1.0]
    nsd = [ref_nsd(gt == i, seg == i, spacing) if d > 0.2 else 0.0 for i, d in zip(labels, dsc_list, strict=True)]
    return dsc, float(np.mean(nsd)) if nsd else 0.0


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOL


def perturb(gt: np.ndarray, seed: int) -> np.ndarray:
    """A plausible imperfect prediction: shifted, one object missed, one grown, one eroded, some noise."""
    rng = np.random.default_rng(seed)
    shift = tuple(int(s) for s in rng.integers(-2, 3, gt.ndim))
    pred = np.roll(gt, shift, axis=tuple(range(gt.ndim)))
    labels = np.unique(gt)[1:]
    if len(labels) > 3:
        pred[pred == labels[1]] = 0
        grown = ndimage.binary_dilation(pred == labels[0], iterations=2) & (pred == 0)
        pred[grown] = labels[0]
        pred[(pred == labels[2]) & ~ndimage.binary_erosion(pred == labels[2], iterations=2)] = 0
    # Speckle near the objects, each speck taking the nearest object's label (as a box-prompted model would),
    # and a few holes: many tiny components and single voxels on both surfaces.
    distance, nearest = ndimage.distance_transform_edt(pred == 0, return_indices=True)
    near = (distance > 0) & (distance <= 3) & (rng.random(gt.shape) < 0.05)
    pred[near] = pred[tuple(index[near] for index in nearest)]
    pred[(pred > 0) & (rng.random(gt.shape) < 0.01)] = 0
    return pred


def _reverse_bits(code: int, width: int) -> int:
    return int(format(code, f"0{width}b")[::-1], 2)


# --------------------------------------------------------------------------------------------------------
# Lookup tables and the surface algorithm.


@pytest.mark.parametrize("seed", range(6))
def test_lookup_tables_match_package_for_all_codes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    spacing = rng.uniform(0.05, 6.0, 3) if seed else np.ones(3)
    ours = surfel_sizes(spacing)
    theirs = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    # The package weights the 2x2x2 neighbours with bits 7..0, we use 0..7: the codes are bit-reversed.
    for code in range(256):
        assert ours[code] == pytest.approx(theirs[_reverse_bits(code, 8)], abs=1e-12), code
    ours2 = surfel_sizes(spacing[:2])
    theirs2 = lookup_tables.create_table_neighbour_code_to_contour_length(spacing[:2])
    for code in range(16):
        assert ours2[code] == pytest.approx(theirs2[_reverse_bits(code, 4)], abs=1e-12), code


def test_surfel_tables_are_geometrically_sane() -> None:
    # Complement and empty/full codes: same surface / no surface.
    sizes = surfel_sizes((1.3, 0.7, 2.1))
    assert sizes[0] == sizes[255] == 0
    assert np.allclose(sizes, sizes[::-1])
    # A cube of n^3 unit voxels: 6 faces of n^2, minus what the chamfered edges and corners cut off.
    cube = np.ones((5, 5, 5), bool)
    codes = neighbourhood_codes(cube)
    area = surfel_sizes((1.0, 1.0, 1.0))[codes].sum()
    assert 6 * 16 < area < 6 * 25
    # A 2D square's contour: 4 straight sides of n - 1 plus 4 diagonal corners of sqrt(2)/2.
    square = np.ones((4, 4), bool)
    length = surfel_sizes((1.0, 1.0))[neighbourhood_codes(square)].sum()
    assert length == pytest.approx(4 * 3 + 4 * math.sqrt(0.5))


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_masks_match_package(ndim: int) -> None:
    rng = np.random.default_rng(10 + ndim)
    for trial in range(40):
        shape = tuple(int(s) for s in rng.integers(2, 18 if ndim == 3 else 40, ndim))
        # Every third trial is speckle: many single voxels, objects touching every border.
        speckle = rng.random(shape) < (0.3 if trial % 3 == 0 else 0.55)
        gt = speckle if trial % 3 == 0 else ndimage.binary_opening(speckle)
        pred = gt ^ (rng.random(shape) < 0.08)
        spacing = tuple(float(s) for s in rng.uniform(0.3, 4.0, ndim))
        tolerance = float(rng.choice([0.5, 1.0, 2.0, 3.5]))
        assert close(surface_dice(gt, pred, spacing, tolerance), ref_nsd(gt, pred, spacing, tolerance)), trial


def test_empty_and_one_sided_masks() -> None:
    empty = np.zeros((6, 7, 5), bool)
    blob = empty.copy()
    blob[2:4, 3:5, 1:3] = True
    assert math.isnan(surface_dice(empty, empty, (1, 1, 1)))
    assert surface_dice(blob, empty, (1, 2, 3)) == 0.0
    assert surface_dice(empty, blob, (1, 2, 3)) == 0.0
    d = surface_distances(blob, empty, (1, 2, 3))
    assert np.all(np.isinf(d.distances_gt_to_pred)) and d.sizes_pred.size == 0
    assert surface_dice(blob[..., 1], empty[..., 1], (1, 1)) == 0.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 0.7), (0.5, 2.5, 1.25)])
def test_single_voxels_and_border_objects_match_package(spacing) -> None:
    shape = (5, 6, 7)
    for a in [(0, 0, 0), (2, 3, 4), (4, 5, 6)]:
        for b in [(0, 0, 0), (2, 3, 5), (4, 5, 6), (1, 1, 1)]:
            gt = np.zeros(shape, bool)
            pred = np.zeros(shape, bool)
            gt[a] = True
            pred[b] = True
            assert close(surface_dice(gt, pred, spacing), ref_nsd(gt, pred, spacing)), (a, b)
    full = np.ones(shape, bool)
    corner = full.copy()
    corner[:2, :3, :] = False
    assert close(surface_dice(full, corner, spacing), ref_nsd(full, corner, spacing))
    assert surface_dice(full, full, spacing) == pytest.approx(1.0)


def test_crop_does_not_change_the_result() -> None:
    rng = np.random.default_rng(3)
    gt = ndimage.binary_opening(rng.random((9, 12, 10)) < 0.6)
    pred = ndimage.binary_dilation(gt)
    spacing = (2.0, 0.8, 1.1)
    padded = [np.pad(m, ((3, 1), (0, 5), (2, 2))) for m in (gt, pred)]
    a = surface_distances(gt, pred, spacing)
    b = surface_distances(*padded, spacing, crop=True)
    c = surface_distances(*padded, spacing, crop=False)
    for x in (b, c):
        assert np.allclose(np.sort(a.distances_gt_to_pred), np.sort(x.distances_gt_to_pred))
        assert a.sizes_gt.sum() == pytest.approx(x.sizes_gt.sum())


# --------------------------------------------------------------------------------------------------------
# DSC and the case rules.


def test_dice_per_label_counts_gaps_and_ignores_labels_above_max() -> None:
    gt = np.array([[1, 1, 0, 3], [1, 0, 0, 3]])
    pred = np.array([[1, 0, 2, 3], [9, 0, 0, 0]])
    dsc, gt_counts, pred_counts = dice_per_label(gt, pred, 3)
    assert gt_counts.tolist() == [3, 0, 2] and pred_counts.tolist() == [1, 1, 1]
    assert dsc[0] == pytest.approx(2 * 1 / 4)
    assert dsc[1] == 0.0  # only predicted: 0
    assert dsc[2] == pytest.approx(2 * 1 / 3)
    both_missing, _, _ = dice_per_label(np.array([0, 2]), np.array([0, 2]), 2)
    assert math.isnan(both_missing[0]) and both_missing[1] == 1.0
    wide, _, _ = dice_per_label(np.array([1, 1], np.uint64), np.array([1, 0], np.uint64), 1)
    assert wide[0] == pytest.approx(2 / 3)


def test_challenge_edge_cases() -> None:
    gt = np.zeros((20, 20), np.uint8)
    gt[2:8, 2:8] = 1
    gt[10:16, 10:16] = 3  # label 2 is a gap
    labels, dsc, nsd, computed = evaluate_arrays(gt, gt.copy(), dimension=2)
    assert [r.label for r in labels] == [1, 2, 3]
    assert math.isnan(labels[1].dsc) and math.isnan(dsc)  # the challenge's np.mean propagates NaN
    assert nsd == 0.0 and not computed  # NaN > 0.2 is False -> NSD 0, as in compute_metrics.py
    assert (dsc, nsd) == pytest.approx(ref_case(gt, gt.copy(), 2), nan_ok=True)

    _, dsc, nsd, computed = evaluate_arrays(np.zeros((5, 5), np.uint8), np.ones((5, 5), np.uint8), dimension=2)
    assert math.isnan(dsc) and nsd == 0.0 and not computed  # no labels at all

    # Case DSC <= 0.2: no NSD under the challenge rule, even for a well-segmented label.
    gt = np.zeros((30, 30), np.uint8)
    gt[1:6, 1:6] = 1
    gt[10:20, 10:20] = 2
    gt[22:28, 22:28] = 3
    gt[6:9, 20:29] = 4
    gt[20:22, 1:9] = 5
    pred = np.zeros_like(gt)
    pred[1:6, 1:6] = 1
    _, dsc, nsd, computed = evaluate_arrays(gt, pred, dimension=2)
    assert dsc == pytest.approx(0.2) and nsd == 0.0 and not computed
    labels, dsc, nsd, computed = evaluate_arrays(gt, pred, dimension=2, nsd_rule="per-label")
    assert computed and labels[0].nsd == pytest.approx(1.0) and nsd == pytest.approx(0.2)


def test_two_dimensional_rules_differ_as_documented() -> None:
    """Flat caps count as surface under the challenge rule, which raises 2D NSD."""
    gt = np.zeros((40, 40), np.uint8)
    gt[8:30, 8:30] = 1
    pred = np.roll(gt, 3, axis=1)
    _, _, challenge, _ = evaluate_arrays(gt, pred, dimension=2)
    _, _, strict, _ = evaluate_arrays(gt, pred, dimension=2, nsd_rule="per-label")
    assert challenge > strict
    assert challenge == pytest.approx(ref_case(gt, pred, 2)[1], abs=TOL)
    assert strict == pytest.approx(ref_case(gt, pred, 2, rule="per-label")[1], abs=TOL)


def test_nsd_per_label_missing_labels() -> None:
    gt = np.zeros((8, 8, 3), np.uint8)
    gt[1:3, 1:3, :] = 1
    pred = np.zeros_like(gt)
    pred[5:7, 5:7, 1] = 2
    out = nsd_per_label(gt, pred, [1, 2, 3], (1.0, 1.0, 1.0))
    assert out[1] == 0.0 and out[2] == 0.0 and math.isnan(out[3])


def test_spacing_order_heuristic() -> None:
    shape = (40, 256, 256)
    assert check_spacing_order((3.0, 0.8, 0.8), shape) is None  # (z, y, x): fine
    assert "xyz" in check_spacing_order((0.8, 0.8, 3.0), shape)  # stored (x, y, z)
    assert check_spacing_order((1.0, 1.0, 1.0), shape) is None
    assert check_spacing_order((1.0, 2.0, 3.0), shape) is None


# --------------------------------------------------------------------------------------------------------
# Real masks: the demo dataset (stardist nuclei, TotalSegmentator CT/MR organs, MNI brain tissue).


def _demo_gts(demo_dir: Path) -> dict[str, np.ndarray]:
    return {p.name: read_ground_truth(p) for p in sorted((demo_dir / "gts").glob("*.npz"))}


@pytest.mark.parametrize("rule", ["challenge", "per-label"])
def test_real_masks_match_reference(demo_dir: Path, rule: str) -> None:
    gts = _demo_gts(demo_dir)
    assert any(n.startswith("2D") for n in gts) and any(n.startswith("3D") for n in gts)
    for seed, (name, gt) in enumerate(gts.items()):
        dimension = 2 if name.startswith("2D") else 3
        # Anisotropic on purpose (the demo's spacings are isotropic): NSD must follow the stated spacing.
        spacing = (2.5, 0.9, 0.7) if dimension == 3 else None
        pred = perturb(gt, seed)
        labels, dsc, nsd, _ = evaluate_arrays(gt, pred, dimension=dimension, spacing=spacing, nsd_rule=rule)
        ref_dsc, ref_nsd_value = ref_case(gt, pred, dimension, spacing, rule)
        assert close(dsc, ref_dsc), name
        assert close(nsd, ref_nsd_value), (name, nsd, ref_nsd_value)
        assert 0.2 < dsc < 1.0 and 0.0 < nsd < 1.0, name


def test_real_mask_labels_match_reference_per_label(demo_dir: Path) -> None:
    """Per-label NSD on a real 3D mask with strongly anisotropic spacing, each label separately."""
    gts = _demo_gts(demo_dir)
    name = next(n for n in gts if n.startswith("3D"))
    gt = gts[name]
    pred = perturb(gt, 7)
    spacing = (4.0, 0.6, 1.3)
    labels = list(range(1, int(gt.max()) + 1))
    ours = nsd_per_label(gt, pred, labels, spacing)
    for label in labels:
        assert close(ours[label], ref_nsd(gt == label, pred == label, spacing)), label
