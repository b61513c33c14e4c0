"""`qmedsam serve` as 3D Slicer meets it: latency of set_image, the first box -> 3D object and a second object, then
N clients at once for a while (every heartbeat answered? server memory flat?). Loopback only.

    python benchmarks/serve_latency.py                      # the TotalSegmentator example CT (30 slices)
    python benchmarks/serve_latency.py --clients 3 --seconds 60

Drives a server it starts (`qmedsam serve`, shipped int8 model) with the real `nninteractive-client`. Say which CPU
the figures come from; nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nninteractive_flow import box_on_slice, open_session  # noqa: E402

from qmedsam.datasets.recipes.sources import fetch_sources, read_members  # noqa: E402
from qmedsam.scans.nifti import to_zyx  # noqa: E402

TS_REF = "totalsegmentator-2.18.0/tests/reference_files/"
KEY = "benchmark-key-of-enough-length"


def example_ct():
    import nibabel as nib

    archive = fetch_sources(keys=["totalsegmentator"])["totalsegmentator"]
    members = [TS_REF + "example_ct_sm.nii.gz", TS_REF + "example_seg.nii.gz"]
    raw = read_members(archive, members)
    image, spacing = to_zyx(nib.Nifti1Image.from_bytes(gzip.decompress(raw[members[0]])))
    labels, _ = to_zyx(nib.Nifti1Image.from_bytes(gzip.decompress(raw[members[1]])))
    return np.ascontiguousarray(image), labels.astype(np.int16), spacing


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(port: int, max_sessions: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qmedsam", "serve", "--port", str(port), "--api-key", KEY]
    proc = subprocess.Popen([*cmd, "--max-sessions", str(max_sessions)], stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def latency(url: str, image, labels, spacing) -> dict:
    started = time.perf_counter()
    session, buffer = open_session(url, KEY, image, spacing, read_timeout=60.0)
    opened = time.perf_counter() - started
    rows = {"claim + set_image + set_target_buffer + reset (s)": opened}
    for name, label, axis in (("first object: spleen, axial box (s)", 1, 0), ("second object: kidney (s)", 2, 0),
                              ("third object: spleen again, coronal box (s)", 1, 1)):  # fmt: skip
        session.reset_interactions()
        started = time.perf_counter()
        result = box_on_slice(session, buffer, labels == label, axis)
        rows[name] = time.perf_counter() - started
        rows[name.split(":")[0] + " Dice"] = result["dice"]
    session.close()
    return rows


def load(url: str, image, labels, spacing, clients: int, seconds: float, pid: int) -> dict:
    stop = time.monotonic() + seconds
    errors: list[str] = []
    beats: list[float] = []
    boxes = [0] * clients
    memory = [rss_mb(pid)]

    def client(number: int) -> None:
        try:
            session, buffer = open_session(url, KEY, image, spacing, read_timeout=60.0)
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(f"client {number}: {exc!r}")
            return
        try:
            while time.monotonic() < stop:
                session.reset_interactions()
                box_on_slice(session, buffer, labels == (1 + number % 2), number % 3)
                boxes[number] += 1
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(f"client {number}: {exc!r}")
        finally:
            session.close()

    def heartbeats() -> None:
        session, _ = open_session(url, KEY, image[:2], spacing, read_timeout=60.0)
        try:
            while time.monotonic() < stop:
                t = time.perf_counter()
                session.heartbeat()
                beats.append(time.perf_counter() - t)
                memory.append(rss_mb(pid))
                time.sleep(1.0)
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(f"heartbeat: {exc!r}")
        finally:
            session.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    threads.append(threading.Thread(target=heartbeats))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answered = beats
    return {
        "clients": clients,
        "seconds": seconds,
        "boxes done": sum(boxes),
        "heartbeats answered": len(answered),
        "slowest heartbeat (s)": max(answered) if answered else None,
        "server RSS start / peak / end (MB)": [memory[0], max(memory), memory[-1]],
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    image, labels, spacing = example_ct()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(port, args.clients + 1)
    url = f"http://127.0.0.1:{port}"
    try:
        result = {"cpu": _cpu(), "latency": latency(url, image, labels, spacing)}
        result["load"] = load(url, image, labels, spacing, args.clients, args.seconds, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps(result, indent=2))
    return 1 if result["load"]["errors"] else 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
