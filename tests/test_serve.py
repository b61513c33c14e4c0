"""`qmedsam serve` driven by the real `nninteractive-client` (the code 3D Slicer runs), on real TotalSegmentator CT and
MR volumes with their raw intensities and reference labels: a box on each of the three axes finds the organ beyond
the drawn slice, exclude and undo, two sessions at once, and the refusals (401, 410, 503, 413, 400)."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from nnInteractive.inference.remote import ServerAtCapacityError, SessionExpiredError
from nninteractive_flow import box_on_slice, dice, open_session  # tests/ is on sys.path

from qmedsam.datasets.recipes.sources import fetch_sources, read_members
from qmedsam.scans.nifti import to_zyx

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
OLD_CLIENT = REPO / ".venv" / "clients" / "nninteractive-client-2.5.1"
TS_REF = "totalsegmentator-2.18.0/tests/reference_files/"
KEY = "a-test-key-of-enough-length"
KIDNEY = 2  # kidney_right in TotalSegmentator's `total` map: slices 0..18 of the CT's 30, ends inside it
MR_ORGAN = 5  # the MR's largest structure (label 5), on all 20 slices: measured Dice 0.83 from its largest slice
MAX_VOXELS = 2_000_000


def _volume(image_member: str, seg_member: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    import nibabel as nib

    archive = fetch_sources(keys=["totalsegmentator"])["totalsegmentator"]
    raw = read_members(archive, [TS_REF + image_member, TS_REF + seg_member])
    image, spacing = to_zyx(nib.Nifti1Image.from_bytes(gzip.decompress(raw[TS_REF + image_member])))
    labels, _ = to_zyx(nib.Nifti1Image.from_bytes(gzip.decompress(raw[TS_REF + seg_member])))
    return np.ascontiguousarray(image), np.ascontiguousarray(labels.astype(np.int16)), spacing


@pytest.fixture(scope="module")
def ct():
    """example_ct_sm (30 x 101 x 122, 3 mm, raw Hounsfield units) and its reference `total` segmentation."""
    return _volume("example_ct_sm.nii.gz", "example_seg.nii.gz")


@pytest.fixture(scope="module")
def mr():
    return _volume("example_mr_sm.nii.gz", "example_seg_mr.nii.gz")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`qmedsam serve` on 127.0.0.1 with a key, two sessions at most and a small voxel limit."""
    port = _free_port()
    cmd = [sys.executable, "-m", "qmedsam", "serve", "--port", str(port), "--api-key", KEY, "--max-sessions", "2"]
    cmd += ["--max-voxels", str(MAX_VOXELS), "--threads", "2", "--precision", "f32"]
    log = open(os.devnull, "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("qmedsam serve did not come up in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_a_box_on_each_axis_finds_the_organ_beyond_the_drawn_slice(server, ct):
    """Slicer's sequence on the CT: a box on the kidney's largest axial, coronal and sagittal slice (a new object
    each time), then an exclude box that erases the object, undo that brings it back, heartbeat, close -> 410."""
    image, labels, spacing = ct
    truth = labels == KIDNEY
    session, buffer = open_session(server, KEY, image, spacing)
    assert session.supported_interactions == {
        "points": False, "bbox2d": True, "bbox3d": True, "scribble": False, "lasso": True,
    }  # fmt: skip
    assert session.supports_undo and session.original_image_shape == (1, *image.shape)
    results = {}
    for axis in (0, 1, 2):
        session.reset_interactions()
        assert not buffer.any()
        results[axis] = box_on_slice(session, buffer, truth, axis)
        assert results[axis]["voxels_off_the_drawn_slice"] > 0, results[axis]
        assert results[axis]["dice"] >= 0.6, results  # measured: see the note
    kept = buffer.copy()
    erased = box_on_slice(session, buffer, truth, 2, include=False)
    assert erased["voxels"] < kept.sum() // 4  # the same box excluded: what it found is gone
    session.undo()
    np.testing.assert_array_equal(buffer, kept)
    assert 0 < session.heartbeat() <= 600
    token = session._lease_token
    session.close()
    gone = httpx.post(server + "/heartbeat", headers={"Authorization": f"Bearer {KEY}", "X-Lease-Token": token})
    assert gone.status_code == 410


def test_two_sessions_on_different_images_do_not_mix(server, ct, mr):
    ct_session, ct_buffer = open_session(server, KEY, ct[0], ct[2])
    mr_session, mr_buffer = open_session(server, KEY, mr[0], mr[2])
    try:
        mr_result = box_on_slice(mr_session, mr_buffer, mr[1] == MR_ORGAN, 0)
        ct_result = box_on_slice(ct_session, ct_buffer, ct[1] == KIDNEY, 0)
        assert mr_result["dice"] >= 0.6 and ct_result["dice"] >= 0.6, (mr_result, ct_result)
        assert dice(mr_buffer > 0, mr[1] == MR_ORGAN) == mr_result["dice"]  # the CT's box did not touch it
        boxed = mr_buffer.copy()
        # A lasso on the same slice is taken as its bounding box: the same object (the slices are cached now).
        truth = mr[1] == MR_ORGAN
        (k0, k1), _, _ = mr_result["bbox"]
        lasso = np.zeros(truth.shape, np.uint8)
        lasso[k0] = truth[k0]
        mr_session.reset_interactions()
        mr_session.add_lasso_interaction(lasso, include_interaction=True)
        np.testing.assert_array_equal(mr_buffer, boxed)
        # An existing segment seeds the object (Slicer, editing a segment); an exclude box erases what it finds.
        mr_session.reset_interactions()
        mr_session.add_initial_seg_interaction(truth.astype(np.uint8))
        np.testing.assert_array_equal(mr_buffer, truth)
        mr_session.add_bbox_interaction(mr_result["bbox"], include_interaction=False)
        assert (mr_buffer > 0).sum() < truth.sum() // 2 and not (mr_buffer.astype(bool) & ~truth).any()
        mr_session.undo()
        np.testing.assert_array_equal(mr_buffer, truth)
        with pytest.raises(ServerAtCapacityError):
            open_session(server, KEY, mr[0], mr[2])
    finally:
        ct_session.close()
        mr_session.close()


def test_the_oldest_supported_client_drives_it_too(server, mr, tmp_path):
    """nninteractive-client 2.5.1 (installed beside the newest by `make setup`), in its own process."""
    assert OLD_CLIENT.is_dir(), "make setup installs nninteractive-client 2.5.1 into .venv/clients"
    case = tmp_path / "mr.npz"
    np.savez(case, image=mr[0], labels=mr[1], spacing=np.asarray(mr[2]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(OLD_CLIENT), str(TESTS)]))
    script = [sys.executable, str(TESTS / "nninteractive_flow.py"), server, KEY, str(case), str(MR_ORGAN), "0"]
    result = subprocess.run(script, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    flow = json.loads(result.stdout.strip().splitlines()[-1])
    assert flow["client"] == "2.5.1" and flow["supported_interactions"]["bbox2d"] is True
    assert flow["dice"] >= 0.6 and flow["voxels_off_the_drawn_slice"] > 0, flow


def test_refusals_name_what_is_wrong(server, ct):
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    with pytest.raises(httpx.HTTPStatusError) as info:
        nnInteractiveRemoteInferenceSession(server, api_key="wrong-key-of-enough-length")
    assert info.value.response.status_code == 401
    session = nnInteractiveRemoteInferenceSession(server, api_key=KEY)
    try:
        with pytest.raises(httpx.HTTPStatusError) as info:  # over --max-voxels: refused from the header, 413
            session.set_image(np.zeros((1, 200, 100, 101), np.int16), {"spacing": [1, 1, 1]})
        assert info.value.response.status_code == 413 and "--max-voxels" in info.value.response.json()["detail"]
        with pytest.raises(httpx.HTTPStatusError) as info:  # no image yet
            session.add_bbox_interaction([[0, 1], [0, 5], [0, 5]], include_interaction=True)
        assert info.value.response.status_code == 409
        image, _, spacing = ct
        session.set_image(image[None], {"spacing": list(spacing)})
        session.set_target_buffer(np.zeros(image.shape, np.uint8))
        for coords, expected in (
            ([[0, 1], [0, 1], [0, 5]], "flat along axes [0, 1]"),
            ([[5, 3], [0, 9], [0, 9]], "is empty"),
            ([[0, 1], [500, 600], [0, 9]], "lies outside the image"),
        ):
            with pytest.raises(httpx.HTTPStatusError) as info:
                session.add_bbox_interaction(coords, include_interaction=True)
            assert info.value.response.status_code == 400 and expected in info.value.response.json()["detail"]
        # A box with depth on every axis (bbox3d): the fixed rule, its in-plane box on each slice of its depth only.
        buffer = np.zeros(image.shape, np.uint8)
        session.set_target_buffer(buffer)
        session.add_bbox_interaction([[8, 11], [50, 74], [29, 53]], include_interaction=True)
        assert buffer[8:11].any() and not np.delete(buffer, [8, 9, 10], axis=0).any()
        assert not buffer[:, :50].any() and not buffer[:, 74:].any() and not buffer[:, :, 53:].any()
        with pytest.raises(httpx.HTTPStatusError) as info:  # not advertised, refused by name
            session.add_point_interaction([10, 50, 50], include_interaction=True)
        assert "point interactions are not supported" in info.value.response.json()["detail"]
        headers = {"Authorization": f"Bearer {KEY}", "X-Lease-Token": session._lease_token}
        hostile = b"NNIA\x01\x01\x04\x06object" + b"\x00" * 32  # an object dtype never reaches the unpacker
        answer = httpx.post(server + "/set_image", content=hostile, headers=headers)
        assert answer.status_code == 400 and "dtype 'object'" in answer.json()["detail"]
        huge = b"NNIA\x01\x01\x04\x05uint8" + np.array([1, 1 << 20, 1 << 20, 1 << 20], "<i8").tobytes() + b"\0" * 4
        answer = httpx.post(server + "/set_image", content=huge, headers=headers)
        assert answer.status_code == 413  # the declared shape is refused before any allocation
        token = session._lease_token
    finally:
        session.close()
    with pytest.raises(SessionExpiredError):  # what the client makes of the server's 410
        from nnInteractive.inference.remote.remote_session import _raise_for_lease_errors

        _raise_for_lease_errors(httpx.post(server + "/heartbeat", headers={**headers, "X-Lease-Token": token}))
    released = httpx.post(server + "/release", headers={"Authorization": f"Bearer {KEY}", "X-Lease-Token": "nope"})
    assert released.status_code == 200  # releasing a lease that is gone succeeds


def test_an_exposed_address_needs_a_key():
    result = subprocess.run(
        [sys.executable, "-m", "qmedsam", "serve", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "QMEDSAM_SERVE_API_KEY"},
    )
    assert result.returncode == 2 and "--host 0.0.0.0 exposes the server" in result.stderr
