"""Cohort throughput on this machine: plain `qmedsam predict` on a folder vs `predict --manifest` in one process vs
on a local Ray instance (1 actor x N threads, N actors x 1 thread), side by side on the same cases in one run.

    python benchmarks/cohort_throughput.py                       # the demo cases repeated to 50
    python benchmarks/cohort_throughput.py --repeats 4 --threads 2

Whole-process wall time (interpreter start, Ray start, model load, every case) -> scans per hour, and each run's
outputs compared with plain predict's byte for byte. Say which CPU the figures come from; nothing else should run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QMEDSAM = [sys.executable, "-m", "qmedsam"]


def make_cohort(cases: Path, repeats: int, folder: Path) -> tuple[Path, Path, int]:
    """The demo cases copied `repeats` times under distinct names, as a folder and as a manifest."""
    inputs = folder / "cases"
    inputs.mkdir(parents=True)
    rows = ["image"]
    for k in range(repeats):
        for case in sorted(cases.glob("*.npz")):
            name = f"{case.stem}_r{k:02d}.npz"
            shutil.copy(case, inputs / name)
            rows.append(f"cases/{name}")
    manifest = folder / "cohort.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return inputs, manifest, len(rows) - 1


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def same_outputs(out: Path, reference: Path) -> bool:
    names = sorted(p.name for p in reference.glob("*.npz"))
    return bool(names) and all(
        (out / n).is_file() and (out / n).read_bytes() == (reference / n).read_bytes() for n in names
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", type=Path, default=Path("data/demo/cases"), help="case .npz folder (qmedsam data demo)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="copies of each case (5 demo cases x 10 = 50)")
    parser.add_argument("--threads", type=int, default=2, help="this machine's cores")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cohort-bench-"))
    try:
        inputs, manifest, count = make_cohort(args.cases, args.repeats, work)
        common = ["--precision", args.precision]
        t = args.threads
        runs = {
            f"plain predict ({t} threads)": ["predict", "-i", str(inputs), "--threads", str(t)],
            f"--manifest, one process ({t} threads)": ["predict", "--manifest", str(manifest), "--threads", str(t)],
            f"--ray, 1 actor x {t} threads": [
                *("predict", "--manifest", str(manifest), "--ray", "--ray-actors", "1", "--threads", str(t)),
            ],
            f"--ray, {t} actors x 1 thread": [
                *("predict", "--manifest", str(manifest), "--ray", "--ray-actors", str(t), "--threads", "1"),
            ],
        }
        results = []
        reference = None
        for label, command in runs.items():
            out = work / f"out{len(results)}"
            seconds = timed([*QMEDSAM, *command, "-o", str(out), *common])
            reference = reference or out
            results.append((label, seconds, same_outputs(out, reference)))
            print(f"{label}: {seconds:.1f} s", file=sys.stderr)
        base = results[0][1]
        print(f"{count} cases ({args.cases}, repeated {args.repeats}x), --precision {args.precision}\n")
        print("| run | wall s | scans/hour | vs plain predict | outputs = plain predict's |")
        print("|---|---:|---:|---:|---|")
        for label, seconds, same in results:
            print(f"| {label} | {seconds:.1f} | {count / seconds * 3600:.0f} | {base / seconds:.2f}x | {same} |")
        one_actor, one_process = results[2][1], results[1][1]
        print(f"\nRay overhead at 1 actor (vs --manifest in one process): {one_actor - one_process:+.1f} s")
        print(json.dumps({label: round(seconds, 2) for label, seconds, _ in results}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
