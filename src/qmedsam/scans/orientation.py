"""Between a scan's own voxel grid and the model's working array, exactly and reversibly.

The working array is the one the demo and training data use (PROTOCOL.md): nibabel's closest canonical
(RAS) orientation, transposed to (z, y, x) and flipped along y and x, so an axial slice looks like a
radiological display. Only axis permutations and flips are involved (no resampling), so a label map
mapped back lands on the input's voxels one for one, and the output keeps the input's affine and header.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Working axis w (0 = z, 1 = y, 2 = x) is RAS axis RAS_OF_WORK[w], flipped when WORK_FLIP[w] is -1.
RAS_OF_WORK = (2, 1, 0)  # z = S, y = A, x = R
WORK_FLIP = (1, -1, -1)  # y runs anterior -> posterior, x right -> left


@dataclass(frozen=True)
class VoxelMapping:
    """File array axes (i, j, k) <-> working axes (z, y, x): `source_axis[w]` is the file axis that becomes
    working axis w, reversed when `flip[w]` is -1."""

    file_shape: tuple[int, int, int]
    source_axis: tuple[int, int, int]
    flip: tuple[int, int, int]

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: tuple[int, ...]) -> VoxelMapping:
        """The mapping nibabel's `as_closest_canonical` + the (z, y, x) transpose and y/x flips apply."""
        import nibabel as nib

        if len(shape) != 3:
            raise ValueError(f"expected a 3D grid, got shape {tuple(shape)}")
        ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
        source, flip = [], []
        for w in range(3):
            matches = np.flatnonzero(ornt[:, 0] == RAS_OF_WORK[w])
            if len(matches) != 1:
                raise ValueError(
                    f"affine has no clear axis for RAS axis {RAS_OF_WORK[w]} (orientation {ornt.tolist()})"
                )
            axis = int(matches[0])
            source.append(axis)
            flip.append(int(ornt[axis, 1]) * WORK_FLIP[w])
        return cls(tuple(int(s) for s in shape), tuple(source), tuple(flip))  # type: ignore[arg-type]

    @property
    def work_shape(self) -> tuple[int, int, int]:
        return tuple(self.file_shape[a] for a in self.source_axis)  # type: ignore[return-value]

    def to_work(self, array: np.ndarray) -> np.ndarray:
        """File-ordered (i, j, k) array -> working (z, y, x) array (a contiguous copy)."""
        if tuple(array.shape) != self.file_shape:
            raise ValueError(f"array shape {array.shape} is not the grid's {self.file_shape}")
        work = np.transpose(array, self.source_axis)
        for w in range(3):
            if self.flip[w] == -1:
                work = np.flip(work, axis=w)
        return np.ascontiguousarray(work)

    def to_file(self, work: np.ndarray) -> np.ndarray:
        """Working (z, y, x) array -> the file's (i, j, k) order (inverse of `to_work`)."""
        if tuple(work.shape) != self.work_shape:
            raise ValueError(f"array shape {work.shape} is not the working shape {self.work_shape}")
        for w in range(3):
            if self.flip[w] == -1:
                work = np.flip(work, axis=w)
        return np.ascontiguousarray(np.transpose(work, np.argsort(self.source_axis)))

    def box_to_work(self, box: np.ndarray) -> np.ndarray:
        """Inclusive file-index box [i0, j0, k0, i1, j1, k1] -> the case format [x0, y0, z0, x1, y1, z1]."""
        box = np.asarray(box, dtype=np.int64)
        lo, hi = np.zeros(3, np.int64), np.zeros(3, np.int64)
        for w in range(3):
            a = self.source_axis[w]
            if self.flip[w] == 1:
                lo[w], hi[w] = box[a], box[3 + a]
            else:
                size = self.file_shape[a]
                lo[w], hi[w] = size - 1 - box[3 + a], size - 1 - box[a]
        return np.array([lo[2], lo[1], lo[0], hi[2], hi[1], hi[0]], dtype=np.int64)

    def box_to_file(self, work_box: np.ndarray) -> np.ndarray:
        """Case-format box [x0, y0, z0, x1, y1, z1] -> inclusive file-index box [i0, j0, k0, i1, j1, k1]."""
        x0, y0, z0, x1, y1, z1 = (int(v) for v in work_box)
        lo_w, hi_w = (z0, y0, x0), (z1, y1, x1)
        out = np.zeros(6, np.int64)
        for w in range(3):
            a = self.source_axis[w]
            if self.flip[w] == 1:
                out[a], out[3 + a] = lo_w[w], hi_w[w]
            else:
                size = self.file_shape[a]
                out[a], out[3 + a] = size - 1 - hi_w[w], size - 1 - lo_w[w]
        return out

    def describe(self) -> dict:
        names = "zyx"
        return {
            "working_axes": "(z, y, x): z inferior->superior, y anterior->posterior, x right->left",
            "from_file_axis": {names[w]: int(self.source_axis[w]) for w in range(3)},
            "reversed": {names[w]: self.flip[w] == -1 for w in range(3)},
        }
