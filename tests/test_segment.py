"""Case-level segmentation logic (encode once per slice, label order, 3D prompt rules).

A transparent geometric engine (mask = the prompt box) makes every expectation exact; the real
engines are covered end to end in test_predict_cli.py and test_engines.py.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from qmedsam.data.cases import Case
from qmedsam.data.preprocess import geometry_for, postprocess_logits
from qmedsam.inference.segment import segment_case


class BoxEngine:
    """Implements the Engine protocol: the 'mask' of a box is the box itself; counts calls."""

    name = "box"

    def __init__(self) -> None:
        self.encodes = 0
        self.decode_sizes: list[int] = []
        self.prompts: list[np.ndarray] = []

    def encode(self, image: np.ndarray) -> np.ndarray:
        self.encodes += 1
        return np.zeros((1, 256, 64, 64), np.float32)

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        self.decode_sizes.append(len(boxes))
        self.prompts.extend(boxes.copy())
        logits = -np.ones((len(boxes), 256, 256), np.float32)
        for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
            logits[i, y0 : y1 + 1, x0 : x1 + 1] = 1
        return logits


def make_case(dimension: int, boxes: list[list[int]], shape: tuple[int, ...]) -> Case:
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    return Case(Path(f"{dimension}D_T_T_0001.npz"), dimension, image, np.array(boxes, dtype=np.int64))


def test_2d_encodes_once_and_later_boxes_overwrite_earlier_ones():
    engine = BoxEngine()
    case = make_case(2, [[10, 10, 100, 100], [50, 50, 150, 150], [0, 0, 20, 20]], (256, 256, 3))
    segs = segment_case(engine, case, batch=2)
    assert engine.encodes == 1 and engine.decode_sizes == [2, 1]
    assert segs[60, 60] == 2 and segs[15, 15] == 3 and segs[30, 30] == 1 and segs[200, 200] == 0


def test_3d_fixed_encodes_each_covered_slice_once_for_all_boxes():
    engine = BoxEngine()
    case = make_case(3, [[10, 10, 1, 60, 60, 3], [40, 40, 2, 120, 120, 5], [5, 5, 7, 9, 9, 7]], (9, 128, 128))
    segs = segment_case(engine, case, prompt_mode="fixed")
    # slices 1..5 and 7 are covered; 0, 6 and 8 are never encoded
    assert engine.encodes == 6
    assert engine.decode_sizes == [1, 2, 2, 1, 1, 1]
    assert set(np.unique(segs[0])) == {0} and set(np.unique(segs[6])) == {0}
    assert segs[2, 50, 50] == 2 and segs[1, 50, 50] == 1 and segs[7, 7, 7] == 3


def test_3d_propagation_follows_the_previous_mask_and_shares_embeddings():
    engine = BoxEngine()
    case = make_case(3, [[10, 10, 0, 60, 60, 4], [20, 20, 1, 40, 40, 3]], (5, 256, 256))
    segs = segment_case(engine, case, prompt_mode="propagate")
    assert engine.encodes == 5  # the second object reuses the cached slice embeddings
    first_prompt, second_prompt = engine.prompts[0], engine.prompts[1]
    assert first_prompt.tolist() == [10, 10, 60, 60]  # middle slice: the original box
    assert second_prompt.tolist() == [7, 7, 63, 63]  # next slice: previous mask box widened by 3 px
    assert segs[0, 30, 30] == 1 and segs[2, 30, 30] == 2


def test_3d_propagation_resizes_the_previous_mask_like_the_baseline_on_upscaled_images():
    """A 45x120 slice is upscaled 2.13x: the next prompt is the box of the mask after the image's own
    INTER_AREA resize (the baseline's `resize_longest_side` of its uint8 label slice), widened by 3 and
    clamped to [0, 256] - not the tight box in original pixels scaled (which differs here)."""
    engine = BoxEngine()
    case = make_case(3, [[7, 5, 0, 50, 30, 2]], (3, 45, 120))
    segment_case(engine, case, prompt_mode="propagate")
    # BoxEngine's mask of the middle prompt floor(box * 256/120), mapped back by the real post-processing:
    geometry = geometry_for(45, 120)
    logits = engine.decode(np.zeros(1), engine.prompts[0][None])
    first_mask = postprocess_logits(logits, geometry)[0].astype(np.uint8)
    resized = cv2.resize(first_mask, (256, 96), interpolation=cv2.INTER_AREA)  # label 1, as the baseline's volume
    ys, xs = np.nonzero(resized)
    expected = [max(0, xs.min() - 3), max(0, ys.min() - 3), min(256, xs.max() + 3), min(256, ys.max() + 3)]
    assert engine.prompts[1].tolist() == expected
    ys, xs = np.nonzero(first_mask)
    scaled_tight = [np.floor(xs.min() * geometry.scale) - 3, np.floor(ys.min() * geometry.scale) - 3]
    assert scaled_tight != expected[:2]  # the old rule gave a different prompt on this image


def test_many_objects_use_a_wider_dtype():
    engine = BoxEngine()
    boxes = [[i % 200, 0, i % 200 + 5, 5] for i in range(300)]
    segs = segment_case(engine, make_case(2, boxes, (256, 256, 3)), batch=64)
    assert segs.dtype == np.uint16 and segs.max() == 300
