"""Cohorts (`qmedsam predict --manifest`) on real demo cases and TotalSegmentator's example scans (npz + NIfTI):
a broken manifest lists every problem and runs nothing; a run killed with SIGKILL and rerun finishes only the
rest, with the outputs of an uninterrupted run; shards 1/2 + 2/2 are the whole; Ctrl-C leaves no half-written
file; on a local Ray cluster (`ray start --head` on 127.0.0.1, 2 actors x 1 thread) the outputs are the bytes of
plain `predict`, and a case that kills its actor is retried once on a fresh actor, then recorded while the rest
finish.

The shipped int8 model with f32 float ops and one thread throughout: masks do not depend on the thread count
(checked), and f32 keeps them independent of the CPU's bf16 choice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmedsam.cli import main
from qmedsam.cohort.ledger import Ledger
from qmedsam.cohort.manifest import in_shard, read_manifest
from qmedsam.errors import UserFacingError
from qmedsam.files import default_cache_root

FLAGS = ["-m", "int8", "--precision", "f32", "--threads", "1"]
QMEDSAM = [sys.executable, "-m", "qmedsam"]


@pytest.fixture(scope="module")
def cohort(small_cases_dir: Path, ct_scan, mr_scan, tmp_path_factory) -> Path:
    """A manifest (relative paths) of two case files and two NIfTI scans, one prompted by its label map and one
    by a box file; the folder it sits in."""
    folder = tmp_path_factory.mktemp("cohort")
    (folder / "cases").mkdir()
    (folder / "scans").mkdir()
    for name in ("2D_CT_TotalSeg_0001.npz", "3D_MR_TotalSeg_0001.npz"):
        shutil.copy(small_cases_dir / name, folder / "cases")
    for path in (*ct_scan, *mr_scan):
        shutil.copy(path, folder / "scans")
    labels = np.asarray(nib.load(folder / "scans" / "mr_labels.nii.gz").dataobj)
    boxes = []
    for value in (1, 2):
        where = np.argwhere(labels == value)
        boxes.append([*map(int, where.min(0)), *map(int, where.max(0))])
    (folder / "scans" / "mr_boxes.json").write_text(json.dumps(boxes))
    (folder / "cohort.csv").write_text(
        "id,image,boxes,labels,window\n"
        ",cases/2D_CT_TotalSeg_0001.npz,,,\n"
        ",scans/ct.nii.gz,,scans/ct_labels.nii.gz,\n"
        "mr-1,scans/mr.nii.gz,scans/mr_boxes.json,,percentile\n"
        ",cases/3D_MR_TotalSeg_0001.npz,,,\n"
    )
    return folder


@pytest.fixture(scope="module")
def reference(cohort: Path, tmp_path_factory) -> Path:
    """Plain `predict`, one input at a time: what every cohort run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    scans = cohort / "scans"
    assert main(["predict", "-i", str(cohort / "cases"), "-o", str(out), *FLAGS]) == 0
    assert (
        main(
            [
                "predict",
                "-i",
                str(scans / "ct.nii.gz"),
                "--boxes-from",
                str(scans / "ct_labels.nii.gz"),
                "-o",
                str(out),
                *FLAGS,
            ]
        )
        == 0
    )
    mr = ["-i", str(scans / "mr.nii.gz"), "--boxes", str(scans / "mr_boxes.json"), "--window", "percentile"]
    assert main(["predict", *mr, "-o", str(out), *FLAGS]) == 0
    (out / "timing.csv").unlink()
    return out


def assert_same_outputs(out: Path, reference: Path, skip: tuple[str, ...] = ()) -> None:
    """Every file of the reference, byte for byte; a sidecar JSON field for field but its timing."""
    names = sorted(p.name for p in reference.iterdir() if not p.name.startswith(skip or "\0"))
    assert names, "empty reference"
    for name in names:
        ours, theirs = out / name, reference / name
        assert ours.is_file(), f"{name} missing"
        if name.endswith(".json"):
            a, b = json.loads(ours.read_text()), json.loads(theirs.read_text())
            a.pop("seconds"), b.pop("seconds")
            assert a == b, name
        else:
            assert ours.read_bytes() == theirs.read_bytes(), f"{name} differs"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "half-written files left"


def test_a_broken_manifest_lists_every_problem_and_runs_nothing(cohort: Path, tmp_path, capsys):
    manifest = tmp_path / "broken.csv"
    manifest.write_text(
        "id,image,boxes,labels,window\n"
        f",{cohort}/cases/2D_CT_TotalSeg_0001.npz,,,\n"
        f"2D_CT_TotalSeg_0001,{cohort}/cases/3D_MR_TotalSeg_0001.npz,,,\n"  # the first row's id again
        f",{cohort}/cases/missing.npz,,,\n"
        f",{cohort}/scans/ct.nii.gz,,,\n"  # a scan without prompts
        f",{cohort}/scans/mr.nii.gz,{cohort}/scans/mr_boxes.json,,W400\n"  # a window that is not one
        f",{cohort}/cases/3D_MR_TotalSeg_0001.npz,{cohort}/scans/mr_boxes.json,,\n"  # a case file carries its boxes
        f"x,{cohort}/scans/mr.nii.gz,,nope.nii.gz,\n"  # a missing label map
        "only,two\n"
    )
    out = tmp_path / "out"
    assert main(["predict", "--manifest", str(manifest), "-o", str(out), *FLAGS]) == 2
    err = capsys.readouterr().err
    for expected in (
        "line 3: id '2D_CT_TotalSeg_0001' is also line 2's",
        "line 4: image",
        "missing.npz: no such file or folder",
        "line 5: a scan needs `boxes` or `labels`, exactly one",
        "line 6: window:",
        "line 7: 3D_MR_TotalSeg_0001.npz is a case file",
        "line 8: labels",
        "nope.nii.gz: no such file",
        "line 9: 2 field(s), the header has 5",
    ):
        assert expected in err, (expected, err)
    assert not out.exists(), "nothing may run (or be created) for a broken manifest"
    manifest.write_text("image,mask\ncases/2D_CT_TotalSeg_0001.npz,x\n")
    with pytest.raises(UserFacingError, match=r"unknown column\(s\) \['mask'\]"):
        read_manifest(manifest)
    manifest.write_text("id,image\n,cases/2D_CT_TotalSeg_0001.npz\n")
    shutil.copytree(cohort / "cases", tmp_path / "cases")
    assert [case.id for case in read_manifest(manifest)] == ["2D_CT_TotalSeg_0001"]  # relative to the CSV's folder
    for flag in (["--shard", "1/2"], ["--ray"], ["--retry-failed"]):
        assert main(["predict", "-i", str(cohort / "cases"), "-o", str(out), *flag]) == 2
    assert main(["predict", "--manifest", str(cohort / "cohort.csv"), "-o", str(out), "--shard", "3/2"]) == 2


def test_shards_partition_the_cohort_whatever_the_order():
    ids = [f"case-{i:04d}" for i in range(400)]
    for count in (2, 3, 7):
        shards = [{i for i in ids if in_shard(i, index, count)} for index in range(1, count + 1)]
        assert set().union(*shards) == set(ids) and sum(map(len, shards)) == len(ids)
        assert all(len(shard) > len(ids) / count / 2 for shard in shards)  # none starved
        assert shards == [{i for i in reversed(ids) if in_shard(i, index, count)} for index in range(1, count + 1)]


def _ledger_states(out: Path) -> dict[str, str]:
    return {key: entry["status"] for key, entry in Ledger(out).latest().items()}


def test_a_killed_run_resumes_with_only_the_rest_and_the_same_outputs(cohort: Path, reference: Path, tmp_path):
    out = tmp_path / "out"
    command = [*QMEDSAM, "predict", "--manifest", str(cohort / "cohort.csv"), "-o", str(out), *FLAGS]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while "ok" not in _ledger_states(out).values() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = _ledger_states(out)
    finished = {key for key, state in first.items() if state == "ok"}
    assert finished and len(finished) < 4, f"the kill came too late to test a resume: {first}"
    assert main(["predict", "--manifest", str(cohort / "cohort.csv"), "-o", str(out), *FLAGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == len(finished) and summary["done"] == 4 - len(finished), summary
    assert summary["cohort"] == {"cases": 4, "ok": 4, "error": 0, "not_done": 0}
    lines = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert sum(entry["status"] == "ok" for entry in lines) == 4, "a finished case was run again"
    assert_same_outputs(out, reference)
    # an input that changed is redone; a model that changed redoes everything
    boxes = cohort / "scans" / "mr_boxes.json"
    saved = boxes.read_text()
    try:
        boxes.write_text(json.dumps(json.loads(saved)[:1]))
        assert main(["predict", "--manifest", str(cohort / "cohort.csv"), "-o", str(out), *FLAGS]) == 0
        assert json.loads((out / "summary.json").read_text())["done"] == 1
    finally:
        boxes.write_text(saved)


def test_shards_fill_one_folder_and_failures_wait_for_retry(cohort: Path, reference: Path, tmp_path, capsys):
    out = tmp_path / "out"
    runs = [
        main(["predict", "--manifest", str(cohort / "cohort.csv"), "-o", str(out), "--shard", f"{i}/2", *FLAGS])
        for i in (1, 2)
    ]
    assert runs == [0, 0]
    assert _ledger_states(out) == dict.fromkeys(["2D_CT_TotalSeg_0001", "ct", "mr-1", "3D_MR_TotalSeg_0001"], "ok")
    assert json.loads((out / "summary.json").read_text())["cohort"]["ok"] == 4
    assert_same_outputs(out, reference)
    # a file the ledger does not account for is never replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "ct.json").write_text("mine\n")
    assert main(["predict", "--manifest", str(cohort / "cohort.csv"), "-o", str(foreign), *FLAGS]) == 2
    assert "line 3 (ct): ct.json" in capsys.readouterr().err and (foreign / "ct.json").read_text() == "mine\n"
    # a case that fails is recorded, the rest done; a rerun skips it unless --retry-failed
    broken = tmp_path / "broken"
    shutil.copytree(cohort, broken)
    (broken / "cases" / "2D_CT_TotalSeg_0001.npz").write_bytes(b"PK\x03\x04 not a zip")
    retried = tmp_path / "retried"
    assert main(["predict", "--manifest", str(broken / "cohort.csv"), "-o", str(retried), *FLAGS]) == 1
    assert _ledger_states(retried)["2D_CT_TotalSeg_0001"] == "error"
    assert sorted(_ledger_states(retried).values()) == ["error", "ok", "ok", "ok"]
    assert main(["predict", "--manifest", str(broken / "cohort.csv"), "-o", str(retried), *FLAGS]) == 1
    assert json.loads((retried / "summary.json").read_text())["skipped_failed_before"] == ["2D_CT_TotalSeg_0001"]
    shutil.copy(cohort / "cases" / "2D_CT_TotalSeg_0001.npz", broken / "cases")  # the input changed: redone
    assert main(["predict", "--manifest", str(broken / "cohort.csv"), "-o", str(retried), *FLAGS]) == 0
    assert_same_outputs(retried, reference)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "scheduler-time-limit"])
def test_ctrl_c_leaves_whole_files_and_an_honest_summary(cohort: Path, tmp_path, stop):
    """The signal lands while a case runs, with cases left: the cohort plus copies of its case files, so that a
    fast machine cannot finish every case between two looks at the ledger."""
    out = tmp_path / "out"
    repeats = tmp_path / "repeats"
    repeats.mkdir()
    rows = []
    for i in range(1, 5):
        for name in ("2D_CT_TotalSeg", "3D_MR_TotalSeg"):
            copy = repeats / f"{name}_{1000 + i}.npz"
            shutil.copy(cohort / "cases" / f"{name}_0001.npz", copy)
            rows.append(f",{copy},,,\n")
    manifest = cohort / f"cohort-longer-{stop.name}.csv"
    manifest.write_text((cohort / "cohort.csv").read_text() + "".join(rows))
    command = [*QMEDSAM, "predict", "--manifest", str(manifest), "-o", str(out), *FLAGS]
    # Ctrl-C as a terminal delivers it: the child starts with SIGINT at its default, whatever this test process
    # inherited (an ignored SIGINT is inherited across exec, and Python then never raises KeyboardInterrupt;
    # a full suite's process had it ignored once: the run went on through all 12 cases and exited 0)
    process = subprocess.Popen(
        command, stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    deadline = time.monotonic() + 120
    while "started" not in _ledger_states(out).values() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(stop)
    assert process.wait(timeout=120) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["not_run"] >= 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    states = Ledger(out).latest()
    for entry in states.values():
        if entry["status"] == "ok":
            assert all((out / name).is_file() for name in entry["outputs"])


def _ray_home(home: Path, token: str | None = None) -> dict[str, str]:
    """An environment whose home is `home` (Ray keeps its token in ~/.ray/auth_token; the user's stays untouched),
    the model cache unchanged, Ray's usage reporting off."""
    if token is not None:
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(token)
    return {**os.environ, "HOME": str(home), "QMEDSAM_CACHE": str(default_cache_root()), "RAY_USAGE_STATS_ENABLED": "0"}


def test_ray_alone_starts_ray_on_this_machine(cohort: Path, reference: Path, tmp_path):
    """`--ray` with no address: a Ray instance of its own for the run, gone after it (one actor, one case)."""
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"image\n{cohort}/cases/2D_CT_TotalSeg_0001.npz\n")
    out = tmp_path / "out"
    command = [*QMEDSAM, "predict", "--manifest", str(manifest), "-o", str(out), *FLAGS, "--ray", "--ray-actors", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_ray_home(tmp_path / "home"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "2D_CT_TotalSeg_0001.npz").read_bytes() == (reference / "2D_CT_TotalSeg_0001.npz").read_bytes()
    assert Ledger(out).latest()["2D_CT_TotalSeg_0001"]["attempts"] == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory) -> dict[str, str]:
    """The head node's user, as Ray >= 2.59 leaves them after any local `ray.init()`: a token in ~/.ray/auth_token,
    which `ray start` then enforces (a driver joining by address must send it)."""
    return _ray_home(tmp_path_factory.mktemp("ray") / "home", token=os.urandom(32).hex())


@pytest.fixture(scope="module")
def ray_cluster(cohort: Path, ray_home: dict[str, str]):
    """A one-node Ray cluster on 127.0.0.1 (2 CPUs), its workers told to die on the case id "crash"."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="qr", dir="/tmp")  # short: Ray's unix sockets live under it
    port = _free_port()
    env = {**ray_home, "QMEDSAM_COHORT_CRASH_IDS": "crash"}
    start = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2"]
    start += ["--include-dashboard", "false", "--temp-dir", temp, "--object-store-memory", str(100 * 2**20)]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=ray_home)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_cluster_gives_plain_predicts_bytes_and_survives_a_dying_actor(
    cohort, reference, ray_cluster, ray_home, tmp_path
):
    shutil.copy(cohort / "cases" / "2D_CT_TotalSeg_0001.npz", tmp_path / "2D_CT_crash.npz")
    manifest = tmp_path / "cohort.csv"
    rows = (
        (cohort / "cohort.csv")
        .read_text()
        .replace(",cases/", f",{cohort}/cases/")
        .replace(",scans/", f",{cohort}/scans/")
    )
    manifest.write_text(rows + f"crash,{tmp_path}/2D_CT_crash.npz,,,\n")
    out = tmp_path / "out"
    command = [*QMEDSAM, "predict", "--manifest", str(manifest), "-o", str(out), *FLAGS]
    result = subprocess.run(
        [*command, "--ray", ray_cluster, "--ray-actors", "2"], capture_output=True, text=True, timeout=600, env=ray_home
    )
    assert result.returncode == 1, result.stderr  # the crashing case failed, recorded
    latest = Ledger(out).latest()
    assert latest["crash"]["status"] == "error" and latest["crash"]["attempts"] == 2, latest["crash"]
    assert "died" in latest["crash"]["message"]
    ok = {key for key, entry in latest.items() if entry["status"] == "ok"}
    assert ok == {"2D_CT_TotalSeg_0001", "ct", "mr-1", "3D_MR_TotalSeg_0001"}
    assert len({latest[key]["worker"] for key in ok}) >= 2, "two actors shared the work"
    assert not (out / "2D_CT_crash.npz").exists()
    assert_same_outputs(out, reference)
