"""The shared preprocessing follows PROTOCOL.md exactly (sizes, normalisation, padding, boxes, output)."""

from __future__ import annotations

import numpy as np

from qmedsam.data.preprocess import (
    geometry_for,
    mask_box,
    postprocess_logits,
    preprocess_image,
    resize_mask,
    scale_boxes,
)


def test_geometry_rounds_like_the_baseline():
    geometry = geometry_for(300, 420)
    assert geometry.resized == (int(300 * 256 / 420 + 0.5), 256) == (183, 256)
    assert geometry_for(512, 512).resized == (256, 256)


def test_image_is_min_max_normalised_and_zero_padded():
    image = np.tile(np.linspace(50, 200, 420, dtype=np.float32), (300, 1)).astype(np.uint8)
    tensor, geometry = preprocess_image(image)
    assert tensor.shape == (1, 3, 256, 256) and tensor.dtype == np.float32
    content = tensor[0, :, : geometry.resized[0], : geometry.resized[1]]
    assert np.isclose(content.min(), 0) and np.isclose(content.max(), 1)
    assert np.all(tensor[0, :, geometry.resized[0] :, :] == 0)
    assert np.array_equal(tensor[0, 0], tensor[0, 2])


def test_constant_image_does_not_divide_by_zero():
    tensor, _ = preprocess_image(np.full((10, 10, 3), 7, np.uint8))
    assert np.all(np.isfinite(tensor)) and tensor.max() == 0


def test_boxes_scale_by_the_longest_side():
    geometry = geometry_for(300, 420)
    boxes = scale_boxes(np.array([[0, 0, 419, 299]]), geometry)
    assert np.allclose(boxes, [[0, 0, np.floor(419 * 256 / 420), np.floor(299 * 256 / 420)]])


def test_postprocess_crops_resizes_and_thresholds():
    geometry = geometry_for(300, 420)
    logits = -np.ones((2, 256, 256), np.float32)
    logits[0, :100, :100] = 5  # inside the resized extent
    logits[1, 200:, :] = 5  # only in the padding
    masks = postprocess_logits(logits, geometry)
    assert masks.shape == (2, 300, 420) and masks.dtype == bool
    assert masks[0].sum() > 0 and masks[1].sum() == 0


def test_mask_geometry_matches_image_geometry():
    mask = np.zeros((300, 420), np.uint8)
    mask[30:60, 40:90] = 3
    geometry = geometry_for(*mask.shape)
    small = resize_mask(mask, geometry)
    assert small.shape == (256, 256) and set(np.unique(small)) == {0, 3}
    assert mask_box(mask).tolist() == [40, 30, 89, 59]
    assert mask_box(np.zeros((4, 4))) is None
