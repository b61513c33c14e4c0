"""napari rectangles <-> the project's boxes, with no Qt: what the widget computes, testable on its own.

Boxes are inclusive pixel indices: [x0, y0, x1, y1] in 2D, [x0, y0, z0, x1, y1, z1] in 3D (the case format).
A rectangle's vertices are napari data coordinates ((y, x) or (z, y, x)), where pixel centres sit on
integers, so a corner is rounded to the pixel it lies in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qmedsam.data.cases import CaseError
from qmedsam.scans.intensity import parse_window, to_uint8

WINDOWS = ("auto", "none", "ct-abdomen", "ct-lung", "ct-brain", "ct-bone", "percentile")
"""'auto': a uint8 image is used as it is; otherwise a CT window when values are Hounsfield units, else the
volume's 0.5-99.5 percentiles (as `qmedsam predict -i scan.nii.gz`). 'none': the values as they are."""

FEATURES = {"label": 0, "z0": -1, "z1": -1, "axis": -1, "index": -1}
"""Per-rectangle features the widget keeps on its Shapes layer: the label the box paints (0 = not yet
assigned), in 3D the box's z range, and for a box drawn with "3D from this slice" the axis and the slice it was
drawn on (-1: the fixed 3D rule)."""

CLICK_FEATURES = {"object": 0, "label": 1}
"""Per-point features of the widget's clicks layer: the object (its box's label) the click refines and the
click's label as `Segmenter.predict` takes it (1 include, 0 exclude)."""


def no_clicks() -> np.ndarray:
    return np.zeros((0, 4), np.float64)


@dataclass(frozen=True)
class BoxJob:
    """One box to segment: `label` is painted where its mask is; `box` is in the case format. `clicks` (N, 4)
    rows (x, y, z, label) are the object's clicks (z = 0 in 2D) in the order they were made."""

    label: int
    box: np.ndarray
    clicks: np.ndarray = field(default_factory=no_clicks)
    from_slice: tuple[int, int] | None = None  # (axis, index): `box` [x0, y0, x1, y1] on that slice finds the object

    @property
    def is_3d(self) -> bool:
        return self.box.size == 6

    def clicks_in_range(self) -> np.ndarray:
        """The clicks on a 3D box's slices (a box edited to fewer slices leaves the clicks beyond them unused)."""
        z = np.rint(self.clicks[:, 2])
        return self.clicks[(z >= self.box[2]) & (z <= self.box[5])]

    def clicks_on(self, z: int) -> dict[str, np.ndarray]:
        """`Segmenter.predict` keyword arguments for the clicks on slice `z` (none: no keywords, the box alone)."""
        on = self.clicks[np.rint(self.clicks[:, 2]) == z]
        if not len(on):
            return {}
        return {"points": on[:, :2], "point_labels": on[:, 3]}


@dataclass(frozen=True)
class ObjectPrompts:
    """What made one object's mask: its `label`, its case-format `box` and its clicks, (N, 4) rows (x, y, z,
    label) in the image's pixel coordinates (z = 0 in 2D)."""

    label: int
    box: np.ndarray
    clicks: np.ndarray = field(default_factory=no_clicks)
    from_slice: tuple[int, int] | None = None  # (axis, index) of a one-slice box; `box` is then [x0, y0, x1, y1]


def rectangle_box(vertices: np.ndarray, spatial_shape: tuple[int, ...]) -> tuple[np.ndarray, int | None]:
    """A rectangle's vertices (data coordinates of the image) -> ([x0, y0, x1, y1] rounded to pixels, the slice
    index it was drawn on, or None in 2D). The box itself is checked (and clipped) where it is used, by
    `Segmenter.predict`, like every box the Python API gets; only the slice is checked here."""
    vertices = np.asarray(vertices, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != len(spatial_shape) or vertices.shape[1] not in (2, 3):
        raise CaseError(f"rectangle vertices of shape {vertices.shape} do not match an image of {spatial_shape}")
    z = None
    if vertices.shape[1] == 3:
        z = int(np.rint(vertices[:, 0].mean()))
        if not 0 <= z < spatial_shape[0]:
            raise CaseError(f"rectangle drawn on slice {z}, outside the volume (0..{spatial_shape[0] - 1})")
    ys, xs = vertices[:, -2], vertices[:, -1]
    return np.rint([xs.min(), ys.min(), xs.max(), ys.max()]).astype(np.int64), z


def slice_rectangle(vertices: np.ndarray, spatial_shape: tuple[int, ...]) -> tuple[int, int, np.ndarray]:
    """A rectangle drawn on a volume in whichever view napari shows (data coordinates (z, y, x)) -> (the axis it
    is flat along, the slice index on that axis, [x0, y0, x1, y1] in that slice's own pixels: x its columns, y
    its rows, the other two axes in order), as `Segmenter.segment_from_slice` takes it."""
    vertices = np.asarray(vertices, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(spatial_shape) != 3:
        raise CaseError(f"rectangle vertices of shape {vertices.shape} are not on a volume of {spatial_shape}")
    flat = [axis for axis in range(3) if np.ptp(vertices[:, axis]) < 1e-6]
    if len(flat) != 1:
        raise CaseError("the rectangle does not lie on one slice of the volume (draw it in a 2D view)")
    axis = flat[0]
    index = int(np.rint(vertices[0, axis]))
    if not 0 <= index < spatial_shape[axis]:
        raise CaseError(f"rectangle drawn on slice {index} of axis {axis}, outside the volume")
    rows, cols = (vertices[:, a] for a in range(3) if a != axis)
    return axis, index, np.rint([cols.min(), rows.min(), cols.max(), rows.max()]).astype(np.int64)


def slice_box_rectangle(box: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A one-slice box ([x0, y0, x1, y1] on slice `index` of `axis`) -> (4, 3) rectangle vertices (z, y, x)."""
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box).ravel())
    corners = [(y0, x0), (y0, x1), (y1, x1), (y1, x0)]
    return np.array([np.insert(np.array(corner), axis, float(index)) for corner in corners])


def box_rectangle(box: np.ndarray) -> np.ndarray:
    """A case-format box -> rectangle vertices: (4, 2) for a 2D box, (4, 3) on the middle slice for a 3D one."""
    box = np.asarray(box, dtype=np.float64).ravel()
    if box.size == 4:
        x0, y0, x1, y1 = box
        return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
    x0, y0, z0, x1, y1, z1 = box
    z = float(int((z1 - z0) / 2 + z0))
    return np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]])


def z_range(drawn: int, z_from: int, z_to: int, depth: int) -> tuple[int, int]:
    """The z range of a box drawn on slice `drawn`: [z_from, z_to] when that contains it, else the drawn slice
    alone (a box always covers the slice it was drawn on); clipped to the volume."""
    lo, hi = (z_from, z_to) if z_from <= drawn <= z_to else (drawn, drawn)
    return max(0, lo), min(depth - 1, hi)


def model_image(data: np.ndarray, rgb: bool, window: str) -> np.ndarray:
    """The array the model sees for an image layer's data: RGB as it is; grey data windowed to uint8 by
    `window` (see WINDOWS), the same intensity rules as `qmedsam predict -i scan.nii.gz`."""
    data = np.asarray(data)
    if rgb or window == "none" or (window == "auto" and data.dtype == np.uint8):
        return data
    image, _ = to_uint8(data, parse_window(window))
    return image


def paint(target: np.ndarray, label: int, mask: np.ndarray) -> None:
    """Replace `label`'s pixels in `target` with `mask` (a box edited or re-run moves its mask)."""
    target[target == label] = 0
    target[mask] = label
