"""`--precision auto`: each part's OpenVINO hint measured on this CPU behind an accuracy gate, then cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qmedsam.evaluate.metrics import mean_mask_dice
from qmedsam.inference.machine import native_bf16
from qmedsam.inference.model_dir import SHIPPED_INT8_DIR
from qmedsam.inference.precision import CANDIDATES, choice_path, choose_precision
from qmedsam.inference.runtime import OpenVINOEngine


def test_auto_measures_each_part_behind_the_accuracy_gate_and_caches_the_choice(tmp_path: Path):
    cache = tmp_path / "ov"
    choice = choose_precision(SHIPPED_INT8_DIR, cache, num_threads=2, measure_anyway=True)
    assert choice.encoder in CANDIDATES and choice.decoder in CANDIDATES
    for part in ("encoder", "decoder"):
        rows = choice.measurements[part]
        assert set(rows) == set(CANDIDATES)
        assert rows["f32"]["agreement"] == 1.0  # f32 is the reference
        assert all(row["ms"] > 0 and 0.0 <= row["agreement"] <= 1.0 for row in rows.values())
        chosen = rows[choice.hint(part)]
        assert chosen["agreement"] >= 0.99 and chosen["ms"] <= rows["f32"]["ms"]
    path = choice_path(SHIPPED_INT8_DIR, cache, 2, CANDIDATES)
    written = path.stat().st_mtime_ns
    again = choose_precision(SHIPPED_INT8_DIR, cache, num_threads=2, measure_anyway=True)
    assert again == choice and path.stat().st_mtime_ns == written  # read back, not measured again


def test_a_hint_whose_masks_do_not_agree_is_never_chosen(tmp_path: Path):
    choice = choose_precision(SHIPPED_INT8_DIR, tmp_path, num_threads=2, min_agreement=1.01, measure_anyway=True)
    assert (choice.encoder, choice.decoder) == ("f32", "f32")
    assert not (tmp_path / "qmedsam-precision").exists()  # only the default gate's choice is remembered


def test_auto_engine_runs_the_chosen_hints(tmp_path: Path):
    engine = OpenVINOEngine(SHIPPED_INT8_DIR, "auto", num_threads=2, cache_dir=tmp_path)
    assert set(engine.hints) == {"encoder", "decoder"} and set(engine.hints.values()) <= set(CANDIDATES)
    if not native_bf16():  # nothing to gain, nothing measured
        assert engine.hints == {"encoder": "f32", "decoder": "f32"} and engine.name == "openvino-int8-f32"
        assert not (tmp_path / "qmedsam-precision").exists()
    forced = OpenVINOEngine(SHIPPED_INT8_DIR, "f32", num_threads=2, cache_dir=tmp_path)
    image = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    if engine.hints["encoder"] == "f32":
        assert np.array_equal(engine.encode(image), forced.encode(image))


def test_mask_agreement_is_mean_per_box_dice():
    a = np.zeros((2, 4, 4), bool)
    b = a.copy()
    a[0, :2], b[0, :1] = True, True  # Dice 2*4 / (8 + 4)
    assert abs(mean_mask_dice(a, b) - (2 * 4 / 12 + 1.0) / 2) < 1e-9  # the second pair: both empty, full agreement
