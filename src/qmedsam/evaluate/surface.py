"""Normalised surface Dice (NSD) with surfel areas, vectorised: DeepMind's neighbourhood-code algorithm.

Why our own: the challenge scored with DeepMind's `surface-distance`, which sorts every surface element in
Python and breaks on empty masks under numpy 2. This module computes the same numbers (checked against the
package to 1e-6 in tests/test_metrics.py) on the cropped bounding box of each object.

The algorithm. Corners of the voxel grid are where surfaces live: each corner looks at its 2x2(x2) voxel
neighbourhood and gets a code (one bit per voxel inside the mask). A corner whose code is neither empty nor
full is a surface element ("surfel"). Its size is what marching squares / marching cubes would put there:
  * 2D: line segments between midpoints of the cut cell edges (a saddle = two separate corners cut off);
  * 3D: triangles with vertices at midpoints of the cut cube edges, using the classic marching-cubes
    triangulation (minority corners cut off component by component, as in Lorensen & Cline's 15 cases).
Lengths and areas are measured in mm, i.e. after scaling each axis by its spacing. The distance from a surfel
to the other surface is the Euclidean distance transform (in mm) of the other surface's corner grid. NSD at
tolerance t = (gt surfel size within t of pred + pred surfel size within t of gt) / (all surfel sizes).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Lookup tables, built from the definition above.
# A corner of the 2x2x2 cell at offset (a, b, c) owns bit 4a + 2b + c of the code (2D: (a, b) -> bit 2a + b).
# Canonical marching-cubes configurations: inside corners, and triangles whose vertices are midpoints of
# cube edges ("abc-abc"). Every other code is one of these under the 48 symmetries of the cube, possibly
# with inside and outside swapped (the classic table uses the same surface for a code and its complement).
_CANONICAL_3D: tuple[tuple[str, tuple[str, ...]], ...] = (
    # one corner cut off
    ("000", ("000-100 000-010 000-001",)),
    # an edge: a planar quad
    ("000 001", ("000-100 001-101 001-011", "000-100 001-011 000-010")),
    # two corners on a face diagonal: separated (two corners cut off)
    ("000 011", ("000-100 000-010 000-001", "011-111 011-001 011-010")),
    # two corners on a body diagonal
    ("000 111", ("000-100 000-010 000-001", "111-011 111-101 111-110")),
    # an L of three corners on a face: a pentagon, folded along the line joining the two arms' off-face edges
    # into a triangle (plane a = 1/2) and a planar quad (plane a + b + c = 3/2)
    (
        "000 001 010",
        ("000-100 001-101 010-110", "010-110 010-011 001-011", "010-110 001-011 001-101"),
    ),
    # a whole face: a planar quad
    ("000 001 010 011", ("000-100 001-101 011-111", "000-100 011-111 010-110")),
    # three corners pairwise on face diagonals: three corners cut off
    ("011 101 110", ("011-111 011-001 011-010", "101-001 101-111 101-100", "110-010 110-100 110-111")),
    # a corner with its three neighbours: a planar hexagon
    (
        "000 100 010 001",
        (
            "100-110 010-110 010-011",
            "100-110 010-011 001-011",
            "100-110 001-011 001-101",
            "100-110 001-101 100-101",
        ),
    ),
    # an edge and a separate corner
    ("000 001 110", ("000-100 001-101 001-011", "000-100 001-011 000-010", "110-010 110-100 110-111")),
    # a chain of three edges along three axes: a skew hexagon, a central triangle on alternate vertices
    # plus the three ears
    (
        "001 000 010 110",
        (
            "001-101 010-011 110-100",
            "001-101 001-011 010-011",
            "010-011 110-111 110-100",
            "110-100 000-100 001-101",
        ),
    ),
    # an L and the corner opposite its centre
    (
        "000 001 010 111",
        (
            "000-100 001-101 010-110",
            "010-110 010-011 001-011",
            "010-110 001-011 001-101",
            "111-011 111-101 111-110",
        ),
    ),
    # two opposite parallel edges: two planar quads
    (
        "000 001 110 111",
        (
            "000-100 001-101 001-011",
            "000-100 001-011 000-010",
            "110-100 111-101 111-011",
            "110-100 111-011 110-010",
        ),
    ),
    # four corners, pairwise on face diagonals: four corners cut off
    (
        "000 011 101 110",
        (
            "000-100 000-010 000-001",
            "011-111 011-001 011-010",
            "101-001 101-111 101-100",
            "110-010 110-100 110-111",
        ),
    ),
)

# Marching squares: one corner cut off, an edge (a straight segment), a diagonal pair (two corners cut off).
_CANONICAL_2D: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("00", ("00-10 00-01",)),
    ("00 01", ("00-10 01-11",)),
    ("00 11", ("00-10 00-01", "11-01 11-10")),
)


def _corner(text: str) -> tuple[int, ...]:
    return tuple(int(ch) for ch in text)


def _code(corners: Sequence[tuple[int, ...]]) -> int:
    ndim = len(corners[0]) if corners else 0
    return sum(1 << sum(bit << (ndim - 1 - axis) for axis, bit in enumerate(c)) for c in corners)


def _symmetries(ndim: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """All axis permutations combined with all axis flips: the symmetry group of the square / cube."""
    return [
        (perm, flips)
        for perm in itertools.permutations(range(ndim))
        for flips in itertools.product((0, 1), repeat=ndim)
    ]


def _transform(point: np.ndarray, perm: tuple[int, ...], flips: tuple[int, ...]) -> np.ndarray:
    """Map a point of the unit cell: flip the flagged axes, then send axis i to axis perm[i]."""
    out = np.empty_like(point)
    for axis in range(len(perm)):
        out[..., perm[axis]] = 1 - point[..., axis] if flips[axis] else point[..., axis]
    return out


@lru_cache(maxsize=2)
def _code_to_elements(ndim: int) -> tuple[np.ndarray, ...]:
    """For every neighbourhood code, its surface elements as vertex arrays in unit-cell coordinates.

    3D: (T, 3, 3) triangles; 2D: (S, 2, 2) segments. Built by applying the square / cube symmetries (and the
    inside/outside swap) to the canonical configurations; asserts that all codes are covered consistently.
    """
    canonical = _CANONICAL_3D if ndim == 3 else _CANONICAL_2D
    all_corners = list(itertools.product((0, 1), repeat=ndim))
    n_codes = 1 << len(all_corners)
    table: dict[int, np.ndarray] = {0: np.zeros((0, ndim, ndim)), n_codes - 1: np.zeros((0, ndim, ndim))}
    for inside_text, elements_text in canonical:
        inside = [_corner(c) for c in inside_text.split()]
        elements = []
        for element in elements_text:
            vertices = []
            for edge in element.split():
                a, b = (np.array(_corner(c), dtype=np.float64) for c in edge.split("-"))
                assert (tuple(a.astype(int)) in inside) != (tuple(b.astype(int)) in inside), (inside_text, edge)
                vertices.append((a + b) / 2)
            elements.append(vertices)
        base = np.array(elements, dtype=np.float64)
        for perm, flips in _symmetries(ndim):
            image = [tuple(int(v) for v in _transform(np.array(c), perm, flips)) for c in inside]
            code = _code(image)
            for target in (code, n_codes - 1 - code):
                if target not in table:
                    table[target] = _transform(base, perm, flips)
    assert len(table) == n_codes, f"{ndim}D surfel table covers {len(table)} of {n_codes} codes"
    return tuple(table[code] for code in range(n_codes))


@lru_cache(maxsize=2)
def _flat_elements(ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """All codes' elements stacked, with the code each belongs to: one vectorised pass per spacing."""
    elements = _code_to_elements(ndim)
    codes = np.concatenate([np.full(len(e), code) for code, e in enumerate(elements)])
    return np.concatenate(elements), codes


@lru_cache(maxsize=64)
def _surfel_sizes_cached(spacing: tuple[float, ...]) -> np.ndarray:
    ndim = len(spacing)
    vertices, codes = _flat_elements(ndim)
    v = vertices * np.asarray(spacing, dtype=np.float64)  # to mm
    if ndim == 3:
        size = 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1)
    else:
        size = np.linalg.norm(v[:, 1] - v[:, 0], axis=1)
    sizes = np.bincount(codes, weights=size, minlength=1 << (1 << ndim))
    sizes.setflags(write=False)
    return sizes


def surfel_sizes(spacing: Sequence[float]) -> np.ndarray:
    """Code -> surfel size in mm (2D: contour length, 16 codes; 3D: surface area in mm², 256 codes)."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) not in (2, 3):
        raise ValueError(f"spacing must have 2 or 3 values, got {spacing}")
    return _surfel_sizes_cached(spacing)


# ---------------------------------------------------------------------------------------------------------
# Surfaces and distances.


def neighbourhood_codes(mask: np.ndarray) -> np.ndarray:
    """Code of every corner of the voxel grid (shape + 1 per axis); voxels outside the array are background."""
    mask = np.asarray(mask, dtype=bool)
    ndim = mask.ndim
    padded = np.pad(mask, 1).view(np.uint8)
    corner_shape = tuple(n + 1 for n in mask.shape)
    codes = np.zeros(corner_shape, dtype=np.uint8)
    for offset in itertools.product((0, 1), repeat=ndim):
        bit = sum(o << (ndim - 1 - axis) for axis, o in enumerate(offset))
        window = tuple(slice(o, o + n) for o, n in zip(offset, corner_shape, strict=True))
        codes |= padded[window] << np.uint8(bit)
    return codes


@dataclass(frozen=True)
class SurfaceDistances:
    """Surfel sizes (mm or mm²) and each surfel's distance (mm) to the other surface; unsorted."""

    distances_gt_to_pred: np.ndarray
    distances_pred_to_gt: np.ndarray
    sizes_gt: np.ndarray
    sizes_pred: np.ndarray


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    slices = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(slices)


def surface_distances(
    mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float], crop: bool = True
) -> SurfaceDistances:
    """Surfels of both masks and their distances to the other surface (inf when the other mask is empty).

    Works on the union bounding box (the corner grid gets its one-voxel margin from `neighbourhood_codes`);
    the result does not depend on the crop, it only saves time. Pass crop=False when the caller already cropped.
    """
    from scipy.ndimage import distance_transform_edt

    mask_gt = np.asarray(mask_gt, dtype=bool)
    mask_pred = np.asarray(mask_pred, dtype=bool)
    if mask_gt.shape != mask_pred.shape:
        raise ValueError(f"mask shapes differ: gt {mask_gt.shape}, pred {mask_pred.shape}")
    if len(spacing) != mask_gt.ndim or mask_gt.ndim not in (2, 3):
        raise ValueError(f"need 2D or 3D masks with one spacing per axis; got {mask_gt.shape} and {spacing}")
    spacing = tuple(float(s) for s in spacing)
    if crop:
        box = _bbox(mask_gt | mask_pred)
        if box is None:
            empty = np.zeros(0)
            return SurfaceDistances(empty, empty, empty, empty)
        mask_gt, mask_pred = mask_gt[box], mask_pred[box]
    sizes = surfel_sizes(spacing)
    full = (1 << (1 << mask_gt.ndim)) - 1
    codes_gt = neighbourhood_codes(mask_gt)
    codes_pred = neighbourhood_codes(mask_pred)
    border_gt = (codes_gt != 0) & (codes_gt != full)
    border_pred = (codes_pred != 0) & (codes_pred != full)

    def distances_to(border: np.ndarray, at: np.ndarray) -> np.ndarray:
        if not at.any():
            return np.zeros(0)
        if not border.any():
            return np.full(int(at.sum()), np.inf)
        return distance_transform_edt(~border, sampling=spacing)[at]

    return SurfaceDistances(
        distances_gt_to_pred=distances_to(border_pred, border_gt),
        distances_pred_to_gt=distances_to(border_gt, border_pred),
        sizes_gt=sizes[codes_gt[border_gt]],
        sizes_pred=sizes[codes_pred[border_pred]],
    )


def surface_dice_from(distances: SurfaceDistances, tolerance: float) -> float:
    """Surface Dice at `tolerance` mm; NaN when neither mask has a surface (both empty), like DeepMind's 0/0."""
    total = float(distances.sizes_gt.sum() + distances.sizes_pred.sum())
    if total == 0.0:
        return float("nan")
    overlap = float(
        distances.sizes_gt[distances.distances_gt_to_pred <= tolerance].sum()
        + distances.sizes_pred[distances.distances_pred_to_gt <= tolerance].sum()
    )
    return overlap / total


def surface_dice(mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float], tolerance: float = 2.0) -> float:
    """Normalised surface Dice of two binary masks: 0 if exactly one is empty, NaN if both are."""
    return surface_dice_from(surface_distances(mask_gt, mask_pred, spacing), tolerance)
