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


def test_postprocess_upscales_only_where_a_mask_can_be_and_changes_nothing():
    """The region-restricted upscale equals the whole-image upscale pixel for pixel (same arithmetic), and
    OpenCV's INTER_LINEAR thresholded at 0 (the mapping it reproduces), for small, large, absent and
    everywhere-positive masks on images smaller and larger than the model square."""
    import cv2

    from qmedsam.data.preprocess import _linear_taps, upscale_region

    rng = np.random.default_rng(0)
    for height, width in [(512, 512), (341, 512), (1024, 768), (300, 420), (1500, 2000), (100, 30), (256, 256)]:
        geometry = geometry_for(height, width)
        logits = rng.normal(-3, 1, size=(6, 256, 256)).astype(np.float32)
        for b in range(4):  # objects of random size and place (some fall in the padding)
            y, x = rng.integers(0, 240, 2)
            logits[b, y : y + rng.integers(1, 60), x : x + rng.integers(1, 60)] += 6
        logits[4] = rng.normal(size=(256, 256))  # positive all over
        logits[5] = -np.abs(logits[5]) - 0.01  # nowhere positive
        masks = postprocess_logits(logits, geometry)
        new_h, new_w = geometry.resized
        for logit, mask in zip(logits, masks, strict=True):
            crop = np.ascontiguousarray(logit[:new_h, :new_w])
            if (new_h, new_w) == (height, width):
                np.testing.assert_array_equal(mask, crop > 0)
                continue
            taps = _linear_taps(new_h, height), _linear_taps(new_w, width)
            whole = upscale_region(crop, *taps, (0, height), (0, width)) > 0
            np.testing.assert_array_equal(mask, whole)
            np.testing.assert_array_equal(mask, cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR) > 0)
        assert not masks[5].any()


def test_postprocess_of_a_one_pixel_logit_that_no_output_pixel_reads_is_an_empty_mask():
    """Shrinking to an image smaller than the model square skips some source rows and columns: a mask positive
    only there is empty in the image, as OpenCV gives it (it raised an IndexError: a real 91x117 MR slice
    whose clicked mask was 1 logit pixel)."""
    import cv2

    for height, width in [(91, 117), (100, 30), (61, 200)]:
        geometry = geometry_for(height, width)
        new_h, new_w = geometry.resized
        for y, x in [(new_h // 2, s) for s in range(new_w)] + [(s, new_w // 2) for s in range(new_h)]:
            logits = np.full((1, 256, 256), -5.0, np.float32)
            logits[0, y, x] = 5.0
            crop = np.ascontiguousarray(logits[0, :new_h, :new_w])
            expected = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR) > 0
            np.testing.assert_array_equal(postprocess_logits(logits, geometry)[0], expected)
