"""How far a 3D click carries to neighbouring slices (qmedsam.inference.click_reach), on synthetic masks: the
rule the protocol and `Segmenter.predict` share. The real-model path is in test_click_protocol.py."""

from __future__ import annotations

import numpy as np

from qmedsam.inference.click_reach import (
    EXCLUDE_CARRY,
    INCLUDE_CARRY,
    VolumeClicks,
    carried_slices,
    click_reach_mm,
    local_edit,
)


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_reach_is_the_in_plane_depth_of_what_the_click_changed():
    before = np.zeros((40, 40), bool)
    after = _disc((40, 40), (20, 20), 6)
    # the click at the centre of a disc of radius 6 px it added: ~7 px to the border (the first pixel outside)
    assert 6.0 <= click_reach_mm(before, after, (20, 20), (1.0, 1.0)) <= 7.0
    assert 12.0 <= click_reach_mm(before, after, (20, 20), (2.0, 2.0)) <= 14.0  # in mm
    assert click_reach_mm(before, after, (2, 2), (1.0, 1.0)) == 0.0  # nothing changed where it clicked
    # only the changed part connected to the click counts
    far = after | _disc((40, 40), (3, 3), 2)
    assert click_reach_mm(before, far, (20, 20), (1.0, 1.0)) == click_reach_mm(before, after, (20, 20), (1.0, 1.0))
    # the image edge is a border: a change running off the image is shallow at the edge
    assert click_reach_mm(before, np.ones((40, 40), bool), (0, 20), (1.0, 1.0)) == 1.0


def test_a_click_carries_within_its_measured_multiple_of_its_reach_and_the_z_range_until_the_mask_agrees():
    shape = (10, 10)
    empty, full = np.zeros(shape, bool), np.ones(shape, bool)
    masks = {z: empty for z in range(20)}

    def slices(reach, z_range=(0, 19), label=1, z=10):
        return carried_slices(z, reach, 3.0, z_range, (5, 5), label, masks.get)

    assert slices(0.0) == [] and slices(2.9 / INCLUDE_CARRY) == []  # less than one slice away
    assert slices(6.5 / INCLUDE_CARRY) == [11, 12, 9, 8]  # two 3 mm slices each way, up first, nearest first
    assert slices(30.0, z_range=(8, 11)) == [11, 9, 8]  # never past the box's z range
    masks[12] = full  # an include click: the mask already covers the point there, so that error ends at 11
    assert slices(30.0) == [11, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert slices(30.0, label=0) == []  # an exclude click where the mask is already empty: nothing to carry
    # no mask on a slice is an empty one; 30 mm = 10 slices
    assert carried_slices(5, 30.0 / INCLUDE_CARRY, 3.0, (0, 19), (5, 5), 1, {}.get) == [*range(6, 16), 4, 3, 2, 1, 0]
    # an exclude click carries through a mask that still holds its point, EXCLUDE_CARRY x its reach
    solid = {z: full for z in range(20)}
    assert carried_slices(10, 6.5 / EXCLUDE_CARRY, 3.0, (0, 19), (5, 5), 0, solid.get) == [11, 12, 9, 8]
    # the measured asymmetry: a false positive goes on farther in z than a miss of the same in-plane depth
    assert EXCLUDE_CARRY > INCLUDE_CARRY > 1
    include = carried_slices(10, 3.0, 3.0, (0, 19), (5, 5), 1, {}.get)
    exclude = carried_slices(10, 3.0, 3.0, (0, 19), (5, 5), 0, solid.get)
    assert set(include) < set(exclude)


def test_volume_clicks_apply_in_order_and_accumulate_per_slice():
    """A toy decoder: the mask is the disc of radius 3 around every include click on the slice, minus those of
    exclude clicks; a click's disc is sqrt(10) = 3.16 mm deep at its centre (the nearest pixel outside is (1, 3)
    away), so an include click carries 2.5 x 3.16 = 7.9 mm (two 3 mm slices each way) and an exclude click
    8 x 3.16 = 25 mm (here: the whole z range)."""
    shape = (20, 20)
    calls: list[tuple[int, list[list[float]], list[float]]] = []

    def decode(z, points, labels):
        calls.append((z, points.tolist(), labels.tolist()))
        mask = np.zeros(shape, bool)
        for (x, y), label in zip(points, labels, strict=True):
            disc = _disc(shape, (int(y), int(x)), 3)
            mask = mask | disc if label == 1 else mask & ~disc
        return mask

    masks: dict[int, np.ndarray] = {z: np.zeros(shape, bool) for z in range(2, 8)}
    clicks = VolumeClicks(decode, masks, (2, 7), (3.0, 1.0, 1.0))
    assert clicks.apply(3, 10.0, 10.0, 1) == [3, 4, 5, 2]  # two slices up, one down to the z range's end
    assert all(masks[z][10, 10] for z in (2, 3, 4, 5)) and not masks[6][10, 10]
    # an exclude click on the same spot removes the disc on 4 and carries through every slice still holding it
    assert clicks.apply(4, 10.0, 10.0, 0) == [4, 5, 3, 2]  # 6 already agrees (empty there): stops before it
    assert calls[-1] == (2, [[10.0, 10.0], [10.0, 10.0]], [1.0, 0.0])  # the slice's clicks so far, in order
    assert not any(masks[z][10, 10] for z in range(2, 8))
    assert clicks.apply(6, 10.0, 10.0, 0) == [6]  # already empty there: changes nothing, carries nowhere


def test_a_click_changes_only_the_region_it_is_connected_to_and_no_farther_than_itself():
    before = _disc((40, 40), (20, 20), 8)  # x from 12 to 28 on row 20
    # the decoder, given an include click at (20, 31), 3 px outside the mask, grows the mask there (a disc
    # reaching x = 36) but also drops a part far away and adds a blob elsewhere
    after = (before | _disc((40, 40), (20, 32), 4) | _disc((40, 40), (5, 5), 2)) & ~_disc((40, 40), (20, 12), 3)
    edited = local_edit(before, after, (20, 31), 1)
    assert edited[20, 31] and edited[20, 29] and (edited >= before).all()  # only adds, up to the click
    assert not edited[20, 32] and not edited[20, 35]  # the decoder's growth beyond the click is not taken
    assert not edited[5, 5]  # the unconnected blob is not taken
    added = np.argwhere(edited & ~before)
    assert np.hypot(added[:, 0] - 20, added[:, 1] - 20).max() <= 8 + 3 + 1  # no farther out than the click
    assert not (edited & ~before & ~after).any()  # it adds nothing the decoder did not give
    # an exclude click at depth 4 inside (x = 15): the decoder drops a disc reaching x = 18; only the pixels no
    # deeper than the click go
    after = before & ~_disc((40, 40), (20, 13), 5)
    dropped = local_edit(before, after, (20, 15), 0)
    assert not dropped[20, 15] and not dropped[20, 12] and (dropped <= before).all()
    assert dropped[20, 17] and dropped[20, 18]  # deeper than the click: kept
    assert np.array_equal(dropped | ~after, before | ~after)  # only what the decoder dropped goes
    # where the decoder did not follow the click, nothing changes
    assert np.array_equal(local_edit(before, before, (20, 20), 0), before)
    assert np.array_equal(local_edit(before, after, (20, 20), 1), before)  # include on foreground: nothing to add
    # an include click on an empty mask takes the decoder's region connected to it, whole
    empty = np.zeros((40, 40), bool)
    assert np.array_equal(local_edit(empty, before, (20, 20), 1), before)


def test_an_exclude_click_on_a_rim_never_empties_the_object():
    """The failure that bounded the edit: a small nucleus's mask with a false-positive rim; given an exclude
    click in the rim, the decoder dropped the whole nucleus. The edit peels only as deep as the click."""
    before = _disc((40, 40), (20, 20), 7)
    click = (20, 15)  # depth 3 (x = 13 is the mask's edge)
    dropped = local_edit(before, np.zeros_like(before), click, 0)
    assert not dropped[click] and dropped[20, 20] and dropped.sum() > before.sum() // 4
    # in mm: a 2 mm pixel pitch across x makes the same click no deeper, relative to the edge, than before
    assert np.array_equal(local_edit(before, np.zeros_like(before), click, 0, (2.0, 2.0)), dropped)


def test_the_evaluate_help_states_the_carry_the_code_uses():
    from qmedsam.commands.evaluate import DESCRIPTION

    text = " ".join(DESCRIPTION.split())
    assert f"include click {INCLUDE_CARRY:g} times and an exclude click {EXCLUDE_CARRY:g} times" in text
