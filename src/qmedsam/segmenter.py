"""The Python API: `Segmenter`, box-prompted masks from numpy arrays, on the same code path as `qmedsam predict`.

Two ways to use it:
- whole images: `segment_2d(image, boxes)` / `segment_3d(volume, boxes)` return a label map (label i+1 =
  box i, later boxes on top), exactly what `qmedsam predict` writes for the same arrays;
- interactive: `set_image(image_or_volume)` once, then `predict(box, z=...)` per box, and
  `predict(box, points=..., point_labels=..., z=...)` to correct a mask with include (1) / exclude (0) clicks.
  Each slice is encoded the first time a box needs it and its embedding kept (a bounded LRU cache), so every
  later box or click on that slice costs only the decoder. Stateless: the same inputs give the same mask.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Generator
from typing import Literal

import numpy as np

from qmedsam.data.cases import Case, case_from_arrays, image_dimension, validated_image
from qmedsam.data.clicks import scale_points, validated_clicks, validated_volume_clicks
from qmedsam.data.preprocess import postprocess_logits, scale_boxes
from qmedsam.engines import ModelChoice, load_engine, resolve_model_dir
from qmedsam.errors import UserFacingError
from qmedsam.inference.click_reach import SliceDecoder, VolumeClicks
from qmedsam.inference.from_slice import (
    FromSliceResult,
    PlaneSlices,
    StopRule,
    run_to_end,
    validated_spacing,
    walk_from_slice,
)
from qmedsam.inference.runtime import Engine
from qmedsam.inference.segment import DEFAULT_BATCH, PROMPT_STRATEGIES, SliceEncoder, segment_case

DEFAULT_CACHED_SLICES = 128
"""Embeddings kept by the interactive API: 4 MiB each, so 512 MiB at most (as napari keeps). A click on a 3D
object carries through many of its slices (an exclude click up to 8x its in-plane reach); each slice no longer
kept costs an encoder run (~160 ms on a 2-core EPYC): with 32 kept, a click on a 99-slice organ took 2.3 s."""

FROM_SLICE_CACHED_SLICES = 128
"""Embeddings kept per view by `segment_from_slice` by default: a second object in the same volume and view reuses
the slices the first one walked through; 512 MiB at most."""

DECODED_MASK_CACHE_BYTES = 64 << 20
"""Decoded slice masks `predict` keeps for the current image (64 MiB: 256 slices of 512x512), so that a new
click on an object costs its own decoder call, not the box's and every earlier click's again."""


class Segmenter:
    """Box-prompted segmentation of 2D images and 3D volumes with an exported OpenVINO model.

    Images are numpy arrays as in the challenge files: 2D (H, W), (H, W, 1) or (H, W, 3); 3D (D, H, W),
    intensities already in display range (uint8 preferred). Boxes are inclusive pixel indices,
    2D [x_min, y_min, x_max, y_max], 3D [x_min, y_min, z_min, x_max, y_max, z_max].
    """

    def __init__(
        self,
        model: ModelChoice = None,
        precision: Literal["auto", "f32", "bf16"] = "auto",
        threads: int | None = None,
        *,
        engine: Engine | None = None,
        cached_slices: int = DEFAULT_CACHED_SLICES,
        batch: int = DEFAULT_BATCH,
        view_cached_slices: int = FROM_SLICE_CACHED_SLICES,
    ) -> None:
        """`engine` replaces the OpenVINO model (e.g. a `TorchEngine` reference); then `model` must be None.
        `cached_slices` bounds the embeddings `predict` keeps, `view_cached_slices` those `segment_from_slice`
        keeps per view (three views at most); 4 MiB each."""
        if engine is not None and model is not None:
            raise UserFacingError("give either model or engine, not both")
        if cached_slices < 1 or batch < 1 or view_cached_slices < 1:
            raise UserFacingError("cached_slices, view_cached_slices and batch must be at least 1")
        if engine is None:
            engine = load_engine(model, precision=precision, threads=threads)
        self.engine = engine
        self.cached_slices = cached_slices
        self.view_cached_slices = view_cached_slices
        self.batch = batch
        self._encoder: SliceEncoder | None = None
        self._dimension: int | None = None
        self._views: dict[tuple, tuple[PlaneSlices, SliceEncoder]] = {}
        self.last_from_slice: FromSliceResult | None = None
        # decoded slice masks of the current image by (slice, box, clicks): clicks apply in order, each
        # re-decoding with the clicks before it, so without this an object's Nth click cost N decoder calls
        # on its slice plus its box on every slice of a volume; with it, one (a pure function's memo)
        self._decoded_masks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._decoded_bytes = 0

    # -- whole images ------------------------------------------------------------------------------

    def segment_2d(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(H, W) label map for a 2D image and (N, 4) boxes; dtype the smallest unsigned type holding N."""
        return segment_case(self.engine, _checked_case(image, boxes, 2, "segment_2d"), batch=self.batch)

    def segment_3d(self, volume: np.ndarray, boxes: np.ndarray, prompt_mode: str = "fixed") -> np.ndarray:
        """(D, H, W) label map for a volume and (N, 6) boxes with the 3D prompt rule `prompt_mode`
        ('fixed': the box's xy extent on every slice of its z range; 'propagate': the LiteMedSAM baseline's)."""
        if prompt_mode not in PROMPT_STRATEGIES:
            raise UserFacingError(f"prompt_mode must be one of {sorted(PROMPT_STRATEGIES)}, got {prompt_mode!r}")
        case = _checked_case(volume, boxes, 3, "segment_3d")
        return segment_case(self.engine, case, prompt_mode=prompt_mode, batch=self.batch)

    def segment_from_slice(
        self,
        volume: np.ndarray,
        box: np.ndarray | list[float],
        axis: int = 0,
        index: int | None = None,
        spacing: tuple[float, float, float] | list[float] | np.ndarray | None = None,
        *,
        max_slices: int | None = None,
        stop_rule: StopRule | None = None,
    ) -> np.ndarray:
        """(D, H, W) bool mask of the whole object from one box on one slice (`qmedsam.inference.from_slice`).

        `box` [x0, y0, x1, y1] in the pixel indices of slice `index` along `axis` (the slice is
        `np.take(volume, index, axis)`: x its columns, y its rows), as `predict` takes. The walk goes outward in
        both directions and stops where the object ends (the measured `StopRule`), at the volume's edge, or after
        `max_slices` slices each way. `spacing` (z, y, x), e.g. a scan's voxel size, resamples slices whose two
        in-plane spacings differ to square pixels before encoding. Slices are encoded only as far as the walk
        reaches and kept, so a second object in the same volume and view reuses them. How the walk went (slices,
        why each direction stopped, encodings) is in `last_from_slice`.
        """
        return run_to_end(
            self.walk_from_slice(volume, box, axis, index, spacing, max_slices=max_slices, stop_rule=stop_rule)
        )

    def walk_from_slice(
        self,
        volume: np.ndarray,
        box: np.ndarray | list[float],
        axis: int = 0,
        index: int | None = None,
        spacing: tuple[float, float, float] | list[float] | np.ndarray | None = None,
        *,
        max_slices: int | None = None,
        stop_rule: StopRule | None = None,
    ) -> Generator[int, None, np.ndarray]:
        """`segment_from_slice` as a generator: yields the number of slices decoded so far after each one (a UI
        shows progress and may stop early), returns the mask."""
        if index is None:
            raise UserFacingError("segment_from_slice: give index, the slice the box is drawn on")
        array = np.asarray(volume)
        if image_dimension(array) != 3:
            raise UserFacingError(f"segment_from_slice: expected a (D, H, W) volume, got shape {array.shape}")
        recovered: list[str] = []
        checked = validated_image(array, 3, "segment_from_slice", recovered)
        for message in recovered:
            warnings.warn(message, stacklevel=2)
        if axis not in (0, 1, 2):
            raise UserFacingError(f"segment_from_slice: axis must be 0, 1 or 2, got {axis!r}")
        sizes = validated_spacing(spacing, "segment_from_slice")
        key = (_volume_digest(checked), axis, sizes)
        if key not in self._views:
            if len(self._views) >= 3:  # the last volume's three views at most
                self._views.pop(next(iter(self._views)))
            plane = PlaneSlices(checked, axis, sizes)
            self._views[key] = (plane, SliceEncoder(self.engine, plane, max_cached=self.view_cached_slices))
        result = yield from walk_from_slice(
            self.engine,
            checked,
            box,
            axis,
            int(index),
            sizes,
            rule=stop_rule,
            max_slices=max_slices,
            slices=self._views[key],
            source="segment_from_slice",
        )
        self.last_from_slice = result
        return result.mask

    # -- interactive -------------------------------------------------------------------------------

    def set_image(self, image: np.ndarray) -> None:
        """Hold a 2D image ((H, W), (H, W, 1), (H, W, 3), RGBA (H, W, 4)) or a 3D volume ((D, H, W)) for `predict`.

        Nothing is encoded yet: a slice is encoded the first time a box asks for it.
        """
        image = np.asarray(image)
        dimension = image_dimension(image)
        recovered: list[str] = []
        checked = validated_image(image, dimension, "set_image", recovered)
        for message in recovered:
            warnings.warn(message, stacklevel=2)
        volume = checked[None] if dimension == 2 else checked
        self._encoder = SliceEncoder(self.engine, volume, max_cached=self.cached_slices)
        self._dimension = dimension
        self._decoded_masks.clear()
        self._decoded_bytes = 0

    @property
    def encoded_slices(self) -> int:
        """How many slice encodings the current image has cost so far (cache hits are free)."""
        return 0 if self._encoder is None else self._encoder.encoded

    @property
    def encode_seconds(self) -> float:
        """Seconds spent preprocessing and encoding slices of the current image (decoder time excluded)."""
        return 0.0 if self._encoder is None else self._encoder.encode_seconds

    def predict(
        self,
        box: np.ndarray | list[float],
        points: np.ndarray | list | None = None,
        point_labels: np.ndarray | list | None = None,
        z: int | None = None,
        spacing: tuple[float, float, float] | list[float] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Boolean mask of one box on the image given to `set_image`, refined by clicks.

        2D image: box [x0, y0, x1, y1] -> (H, W). Volume: a 2D box with `z` -> that slice's (H, W) mask;
        a 3D box [x0, y0, z0, x1, y1, z1] -> (D, H, W) mask by the fixed-box rule over z0..z1.
        `points` (N, 2) are (x, y) pixel coordinates on the same image (or slice `z`), `point_labels` (N,) 1 =
        include, 0 = exclude; the box stays (clicks refine a boxed object). Without points, exactly the mask
        `segment_2d` paints for the box.
        Clicks apply in order, each re-decoding its slice with the box and the clicks there so far and changing
        the mask only in the region connected to it and no farther than the click (include: added, exclude:
        removed; qmedsam.inference.click_reach). Decoded masks are kept for the image (by slice, box and clicks),
        so calling again with one more click costs one decoder call (plus the slices it carries to).
        With a 3D box, `points` (N, 3) are (x, y, z) voxel coordinates, and each click also carries to the
        neighbouring slices of the box's z range (an include click 2.5x, an exclude click 8x as far in z as its
        correction reached in-plane, as far as such errors go on: qmedsam.inference.click_reach); `spacing`
        (z, y, x) in mm makes that distance physical (default: cubic voxels). Stateless: the same inputs give the
        same mask.
        """
        if self._encoder is None or self._dimension is None:
            raise UserFacingError("call set_image(image) before predict(box)")
        volume = self._encoder.volume
        box = np.asarray(box, dtype=np.float64).ravel()
        if (points is None) != (point_labels is None):
            raise UserFacingError("predict: points and point_labels go together (one label per point)")
        if spacing is not None and (self._dimension == 2 or box.size != 6):
            raise UserFacingError("predict: spacing applies to a 3D box with clicks (how far a click carries)")
        if self._dimension == 3 and box.size == 6:
            if z is not None:
                raise UserFacingError("predict: give a 3D box [x0, y0, z0, x1, y1, z1] or a 2D box with z, not both")
            return self._volume_mask(box, points, point_labels, validated_spacing(spacing, "predict"))
        clicks = validated_clicks(points, point_labels, volume.shape[1:3], "predict") if points is not None else None
        if self._dimension == 2:
            if z not in (None, 0):
                raise UserFacingError(f"predict: z={z} given for a 2D image")
            return self._clicked_slice_mask(box, 0, clicks)
        if z is None:
            raise UserFacingError("predict: a 2D box on a volume needs z (the slice index)")
        if not 0 <= int(z) < volume.shape[0]:
            raise UserFacingError(f"predict: z={z} outside the volume (0..{volume.shape[0] - 1})")
        return self._clicked_slice_mask(box, int(z), clicks)

    def _clicked_slice_mask(self, box: np.ndarray, z: int, clicks: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """One slice: the box's mask, then each click applied in order (`VolumeClicks` on that slice alone)."""
        masks = {z: self._slice_mask(box, z, "predict")}
        if clicks is not None and len(clicks[0]):
            applied = VolumeClicks(self._slice_decoder(box), masks, (z, z), (1.0, 1.0, 1.0))
            for (x, y), label in zip(*clicks, strict=True):
                applied.apply(z, float(y), float(x), int(label))
        return masks[z]

    def _volume_mask(
        self,
        box: np.ndarray,
        points: object,
        point_labels: object,
        spacing: tuple[float, float, float] | None,
    ) -> np.ndarray:
        """A 3D box's mask by the fixed-box rule, then its clicks applied in order (`VolumeClicks`)."""
        assert self._encoder is not None
        volume = self._encoder.volume
        case = case_from_arrays(volume, box[None], 3, "predict")
        (x0, y0, z0, x1, y1, z1) = case.boxes[0]
        xy_box = np.array([x0, y0, x1, y1], dtype=np.float64)
        masks = {s: self._slice_mask(xy_box, s, "predict") for s in range(int(z0), int(z1) + 1)}
        if points is not None:
            xy, slices, labels = validated_volume_clicks(points, point_labels, volume.shape, "predict")
            clicks = VolumeClicks(self._slice_decoder(xy_box), masks, (int(z0), int(z1)), spacing or (1.0, 1.0, 1.0))
            for (x, y), here, label in zip(xy, slices, labels, strict=True):
                clicks.apply(int(here), float(y), float(x), int(label))
        mask = np.zeros(volume.shape, dtype=bool)
        for here, slice_mask in masks.items():
            mask[here] = slice_mask
        return mask

    def _slice_decoder(self, box: np.ndarray) -> SliceDecoder:
        """The decoder call `VolumeClicks` makes: box `box` on slice z with the clicks there."""

        def decode(z: int, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
            return self._slice_mask(box, z, "predict", (points, labels))

        return decode

    def _slice_mask(
        self, box: np.ndarray, z: int, source: str, clicks: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        assert self._encoder is not None
        checked = case_from_arrays(self._encoder.volume[z], box[None], 2, source)
        with_clicks = clicks is not None and len(clicks[0]) > 0
        key: tuple = (z, checked.boxes[0].tobytes())
        if with_clicks:
            points, labels = (np.ascontiguousarray(a, np.float64) for a in clicks)
            key += (points.tobytes(), labels.tobytes())
        if key in self._decoded_masks:  # before the embedding: a kept mask needs no encoder either
            self._decoded_masks.move_to_end(key)
            return self._decoded_masks[key].copy()
        embedding = self._encoder(z)
        geometry = self._encoder.geometry
        assert geometry is not None
        model_box = scale_boxes(checked.boxes, geometry)
        if with_clicks:
            logits = self.engine.decode(
                embedding, model_box, scale_points(points, geometry)[None], labels.astype(np.float32)[None]
            )
        else:
            logits = self.engine.decode(embedding, model_box)
        mask = postprocess_logits(logits, geometry)[0]
        self._decoded_masks[key] = mask.copy()
        self._decoded_bytes += mask.nbytes
        while self._decoded_bytes > DECODED_MASK_CACHE_BYTES and len(self._decoded_masks) > 1:
            _, dropped = self._decoded_masks.popitem(last=False)
            self._decoded_bytes -= dropped.nbytes
        return mask


__all__ = ["Segmenter", "resolve_model_dir"]


def _volume_digest(volume: np.ndarray) -> tuple:
    """What identifies a volume for the embedding cache: its shape, dtype and contents (a changed array is new)."""
    return (volume.shape, volume.dtype.str, hashlib.blake2b(np.ascontiguousarray(volume).data, digest_size=16).digest())


def _checked_case(image: np.ndarray, boxes: np.ndarray, dimension: Literal[2, 3], source: str) -> Case:
    """`case_from_arrays`, with what it recovered (RGBA alpha dropped, boxes clipped) raised as Python warnings."""
    case = case_from_arrays(image, boxes, dimension, source)
    for message in case.warnings:
        warnings.warn(message, stacklevel=3)
    return case
