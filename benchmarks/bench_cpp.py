"""C++ vs Python predictor, whole process per case as the challenge ran them, side by side in one run.

For every case and model, each predictor is started once per repeat on that case alone (`-i CASE -o OUT`), the
two alternating so drift hits both; the figure is wall time from process start to exit (model load from a warm
OpenVINO cache, reading, segmenting, writing). Masks are compared too: the two must agree voxel for voxel.

    python benchmarks/bench_cpp.py --cases data/demo/cases --model int8 --model runs/compare/fp32 [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qmedsam.engines import resolve_model_dir
from qmedsam.inference.machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, default=ROOT / "data" / "demo" / "cases")
    parser.add_argument("--model", action="append", help="'int8', 'fp32' or a model folder (repeatable)")
    parser.add_argument("--binary", type=Path, default=ROOT / "build" / "cpp" / "qmedsam-cpp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = args.model or ["int8"]
    cases = sorted(args.cases.glob("*.npz"))
    python = [sys.executable, "-m", "qmedsam", "predict"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in models:
            model_dir = str(resolve_model_dir(model))
            for case in cases:
                outs = {name: Path(scratch) / f"{name}-{case.stem}" for name in ("python", "cpp")}
                commands = {
                    "python": [*python, "-i", str(case), "-o", str(outs["python"]), "-m", model_dir],
                    "cpp": [str(args.binary), "-i", str(case), "-o", str(outs["cpp"]), "-m", model_dir],
                }
                for command in commands.values():  # warm-up: OpenVINO's compiled-model cache, page cache
                    timed(command)
                seconds: dict[str, list[float]] = {"python": [], "cpp": []}
                for repeat in range(args.repeats):
                    order = ("python", "cpp") if repeat % 2 == 0 else ("cpp", "python")
                    for name in order:
                        seconds[name].append(timed(commands[name]))
                same = np.array_equal(
                    np.load(outs["python"] / case.name)["segs"], np.load(outs["cpp"] / case.name)["segs"]
                )
                py, cpp = statistics.median(seconds["python"]), statistics.median(seconds["cpp"])
                rows.append(
                    {
                        "model": Path(model_dir).name if model not in ("int8", "fp32") else model,
                        "case": case.name,
                        "python_s": py,
                        "cpp_s": cpp,
                        "python_over_cpp": py / cpp,
                        "identical_masks": bool(same),
                        "python_all": seconds["python"],
                        "cpp_all": seconds["cpp"],
                    }
                )
                print(
                    f"{rows[-1]['model']:>6} {case.name:<34} python {py:7.2f} s  C++ {cpp:7.2f} s  "
                    f"python/C++ {py / cpp:5.2f}x  identical {same}",
                    flush=True,
                )
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; median of {args.repeats} whole-process runs per cell\n")
    print("| model | case | Python (s) | C++ (s) | Python / C++ | identical masks |\n|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['case']} | {row['python_s']:.2f} | {row['cpp_s']:.2f} | "
            f"{row['python_over_cpp']:.2f}x | {row['identical_masks']} |"
        )
    for model in dict.fromkeys(row["model"] for row in rows):
        py = sum(row["python_s"] for row in rows if row["model"] == model)
        cpp = sum(row["cpp_s"] for row in rows if row["model"] == model)
        print(f"| {model} | **all cases** | {py:.2f} | {cpp:.2f} | {py / cpp:.2f}x | |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
