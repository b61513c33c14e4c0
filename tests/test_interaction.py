"""The simulated click rule (`next_click`) on synthetic masks whose right answer is worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from qmedsam.evaluate.interaction import EXCLUDE, INCLUDE, Click, largest_error_region, next_click, sample_click


def _blank(shape=(40, 40)) -> np.ndarray:
    return np.zeros(shape, bool)


def test_a_miss_gets_an_include_click_at_the_centre_of_the_largest_missed_blob() -> None:
    truth, prediction = _blank(), _blank()
    truth[5:14, 5:14] = True  # a 9x9 miss: centre (9, 9)
    truth[20:35, 22:37] = True  # a 15x15 miss, the largest: centre (27, 29)
    prediction[5:14, 5:14] = True  # found the small one ...
    prediction[20:35, 22:37] = False  # ... missed the big one
    truth[30:32, 2:4] = True  # a 2x2 miss, small
    assert next_click(prediction, truth) == Click((27, 29), INCLUDE)


def test_a_false_positive_gets_an_exclude_click() -> None:
    truth, prediction = _blank(), _blank()
    truth[10:20, 10:20] = True
    prediction[10:20, 10:20] = True
    prediction[25:36, 3:14] = True  # 11x11 overshoot, centre (30, 8)
    assert next_click(prediction, truth) == Click((30, 8), EXCLUDE)


def test_the_larger_error_wins_whichever_its_kind() -> None:
    truth, prediction = _blank(), _blank()
    truth[2:7, 2:7] = True  # 25-pixel miss
    prediction[20:27, 20:27] = True  # 49-pixel false positive
    assert next_click(prediction, truth) == Click((23, 23), EXCLUDE)
    truth[30:39, 30:39] = True  # now an 81-pixel miss is the largest
    assert next_click(prediction, truth) == Click((34, 34), INCLUDE)


def test_ties_are_broken_deterministically() -> None:
    # a miss and a false positive of the same size: the miss
    truth, prediction = _blank(), _blank()
    truth[2:7, 30:35] = True
    prediction[20:25, 2:7] = True
    assert next_click(prediction, truth) == Click((4, 32), INCLUDE)
    # two misses of the same size: the first in array order (the lower component index)
    truth = _blank()
    truth[25:30, 2:7] = True
    truth[5:10, 20:25] = True
    assert next_click(_blank(), truth) == Click((7, 22), INCLUDE)
    # several points equally far from the border (an even-sized square): the first in array order
    truth = _blank((10, 10))
    truth[2:8, 2:8] = True  # centre pixels (4, 4), (4, 5), (5, 4), (5, 5) all at distance 3
    assert next_click(_blank((10, 10)), truth) == Click((4, 4), INCLUDE)
    # and the same inputs always give the same click
    rng = np.random.default_rng(0)
    noisy_truth, noisy_prediction = rng.random((30, 30)) > 0.5, rng.random((30, 30)) > 0.5
    assert len({next_click(noisy_prediction, noisy_truth) for _ in range(3)}) == 1


def test_an_exact_mask_needs_no_click() -> None:
    truth = _blank()
    truth[10:20, 5:9] = True
    assert next_click(truth.copy(), truth) is None
    assert next_click(_blank(), _blank()) is None
    assert largest_error_region(truth, truth) is None
    assert next_click(truth.astype(np.uint8) * 3, truth) is None  # any non-zero value is the mask


def test_the_image_edge_counts_as_border() -> None:
    truth = _blank((20, 20))
    truth[:, :7] = True  # a miss along the left, top and bottom edges
    # distance to the border: min(row + 1, 20 - row, col + 1, 7 - col); the column term peaks at 4 (col 3)
    assert next_click(_blank((20, 20)), truth) == Click((3, 3), INCLUDE)
    # a miss covering the whole image is clicked in its middle, not on an edge
    assert next_click(_blank((9, 9)), np.ones((9, 9), bool)) == Click((4, 4), INCLUDE)


def test_3d_clicks_measure_distance_with_the_spacing() -> None:
    truth = np.zeros((9, 31, 31), bool)
    truth[2:7, 5:26, 5:26] = True  # 5 slices of 21x21
    prediction = np.zeros_like(truth)
    # isotropic: the slab is thin, the deepest points are on the middle slice, 3 from top and bottom
    assert next_click(prediction, truth) == Click((4, 7, 7), INCLUDE)
    assert next_click(prediction, truth, spacing=(1.0, 1.0, 1.0)) == Click((4, 7, 7), INCLUDE)
    # 5 mm slices: the slab is thick, the in-plane centre is the deepest point
    assert next_click(prediction, truth, spacing=(5.0, 1.0, 1.0)) == Click((4, 15, 15), INCLUDE)
    # a false positive in 3D: 26-connected, one region
    prediction = truth.copy()
    prediction[0:3, 0:3, 0:3] = True
    prediction[3, 3, 3] = True  # touches the cube only by a corner: still the same region
    region, label = largest_error_region(prediction, truth)
    assert label == EXCLUDE and region[3, 3, 3] and region[0, 0, 0]


def test_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        next_click(_blank((10, 10)), _blank((10, 11)))


def test_training_clicks_fall_inside_the_error_with_its_label() -> None:
    truth, prediction = _blank(), _blank()
    truth[10:30, 10:30] = True
    prediction[10:30, 10:20] = True  # misses the right half
    rng = np.random.default_rng(1)
    clicks = [sample_click(prediction, truth, rng, centre_probability=0.0) for _ in range(50)]
    assert all(c is not None and c.label == INCLUDE for c in clicks)
    assert all(10 <= c.position[0] < 30 and 20 <= c.position[1] < 30 for c in clicks)
    assert len({c.position for c in clicks}) > 1  # not always the centre
    again = sample_click(prediction, truth, np.random.default_rng(1), centre_probability=0.0)
    assert again == clicks[0]  # the same generator state gives the same click
    assert sample_click(truth, truth, rng) is None
