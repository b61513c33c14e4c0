"""`qmedsam bench`: engine speed and accuracy side by side, in one run (numbers are not tests)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from qmedsam.benchmark import EngineConfig, ProcessRun, time_cases, time_components, time_process
from qmedsam.engines import resolve_model_dir
from qmedsam.errors import UserFacingError
from qmedsam.evaluate.metrics import evaluate_folder, summarise
from qmedsam.files import atomic_write_bytes
from qmedsam.inference.machine import machine_line, machine_record


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time engines side by side (components, or whole cases with DSC/NSD)",
        description="Benchmarks measured in one run, reported with precision hint and threads, plus ratios to "
        "the first configuration. Engine configs: torch, openvino:f32, openvino:bf16.",
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="WHAT")
    components = sub.add_parser("components", help="median ms of encoder and decoder (1 and 16 boxes)")
    components.add_argument(
        "-m", "--model", action="append", default=None,
        help="'int8' (the shipped model), 'fp32' or a model folder (repeatable; default: int8, as predict)",
    )  # fmt: skip
    components.add_argument("--precision", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16"])
    components.add_argument("--torch", action="store_true", help="also time the PyTorch fp32 reference")
    components.add_argument("--repeats", type=int, default=10)
    components.add_argument("--threads", type=int, default=None)
    components.add_argument("--json", type=Path, default=None, help="also write the results here")
    components.set_defaults(func=run_components)

    cases = sub.add_parser("cases", help="seconds per case and DSC/NSD per engine config on real cases")
    cases.add_argument("-i", "--input", type=Path, required=True, help="folder of case .npz files")
    cases.add_argument("--gt", type=Path, default=None, help="ground-truth folder (adds DSC/NSD)")
    cases.add_argument(
        "-m", "--model", action="append", default=None,
        help="'int8', 'fp32' or a model folder (repeatable: every engine config runs on each; default: int8)",
    )  # fmt: skip
    cases.add_argument(
        "--engines", nargs="+", default=["torch", "openvino:f32", "openvino:bf16"],
        help="engine configs to compare (default: torch openvino:f32 openvino:bf16)",
    )  # fmt: skip
    cases.add_argument("--prompt-mode", choices=["fixed", "propagate"], default="fixed")
    cases.add_argument("--threads", type=int, default=None)
    cases.add_argument("--json", type=Path, default=None, help="also write the results here")
    cases.set_defaults(func=run_cases)

    process = sub.add_parser(
        "process",
        help="whole processes, start to exit (cold and warm model cache): predict per model, torch, C++",
        description="Time `qmedsam predict` as a user runs it, from process start to exit: once with an empty "
        "OpenVINO model cache (cold) and --repeats times with it filled (warm). Optional references: "
        "`qmedsam predict --engine torch` (PyTorch fp32 eager; every ratio is against it) and the C++ predictor.",
    )
    process.add_argument("-i", "--input", type=Path, required=True, help="a case .npz or a folder of them")
    process.add_argument(
        "-m", "--model", action="append", default=None,
        help="'int8', 'fp32' or a model folder (repeatable; default: int8)",
    )  # fmt: skip
    process.add_argument("--torch", action="store_true", help="also time `qmedsam predict --engine torch`")
    process.add_argument("--cpp", type=Path, default=None, metavar="BINARY", help="also time qmedsam-cpp per model")
    process.add_argument("--prompt-mode", choices=["fixed", "propagate"], default="fixed")
    process.add_argument("--repeats", type=int, default=2, help="warm runs per predictor (default 2)")
    process.add_argument("--threads", type=int, default=None)
    process.add_argument("--json", type=Path, default=None, help="also write the results here")
    process.set_defaults(func=run_process)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _threads_note(threads: int | None) -> str:
    import os

    return f"threads={threads or os.cpu_count()}"


def _write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        atomic_write_bytes(path, (json.dumps({"machine": machine_record(), **payload}, indent=2) + "\n").encode())


def _model_dirs(models: list[str] | None) -> list[Path]:
    """-m values as predict reads them: 'int8' (default), 'fp32' or a model folder."""
    return [resolve_model_dir(model) for model in models or ["int8"]]


def run_components(args: argparse.Namespace) -> int:
    models = _model_dirs(args.model)
    configs = [EngineConfig("openvino", p, m) for m in models for p in args.precision]
    if args.torch:
        configs.insert(0, EngineConfig("torch"))
    results = []
    for config in configs:
        engine = config.build(args.threads)
        timing = time_components(engine, args.repeats)
        meta = getattr(engine, "meta", {"precision": "fp32"})
        results.append({"config": config.label, "ir_precision": meta.get("precision"), **timing})
        print(f"measured {config.label}", file=sys.stderr)

    base = results[0]
    print(f"\n{machine_line()}")
    print(f"median ms over {args.repeats} runs, {_threads_note(args.threads)}, LATENCY hint, 1 stream")
    width = max(42, *(len(row["config"]) for row in results))
    header = f"{'config':{width}s} {'IR':>6s} {'encoder':>9s} {'dec 1':>8s} {'dec 16':>8s} {'1+5 clk':>8s}"
    print(f"{header}   ratio enc/dec16 vs first")
    for row in results:
        print(
            f"{row['config']:{width}s} {row['ir_precision']:>6s} {row['encoder_ms']:9.1f} {row['decoder_1_ms']:8.1f} "
            f"{row['decoder_16_ms']:8.1f} {row['decoder_1_box_5_clicks_ms']:8.1f}   "
            f"{base['encoder_ms'] / row['encoder_ms']:.2f}x / "
            f"{base['decoder_16_ms'] / row['decoder_16_ms']:.2f}x"
        )
    _write_json(args.json, {"threads": args.threads, "repeats": args.repeats, "results": results})
    return 0


def run_cases(args: argparse.Namespace) -> int:
    case_paths = sorted(args.input.glob("*.npz"))
    if not case_paths:
        raise UserFacingError(f"{args.input}: no .npz case files")
    try:
        parsed = [EngineConfig.parse(text, model) for model in _model_dirs(args.model) for text in args.engines]
    except ValueError as exc:
        raise UserFacingError(str(exc)) from None
    configs = list(dict.fromkeys(parsed))  # torch ignores --model: run it once
    rows = []
    with tempfile.TemporaryDirectory(prefix="qmedsam-bench-") as tmp:
        for config in configs:
            start = time.perf_counter()
            engine = config.build(args.threads)
            load = time.perf_counter() - start
            out = Path(tmp) / config.label.replace(":", "_").replace("@", "_")
            seconds = time_cases(engine, case_paths, out, args.prompt_mode)
            row = {"config": config.label, "load_seconds": load, "seconds": seconds}
            if args.gt is not None:
                summary = summarise(evaluate_folder(out, args.gt, images_dir=args.input, workers=1, progress=False))
                row["dsc"] = {c["case"]: c["dsc"] for c in summary["cases"]}
                row["nsd"] = {c["case"]: c["nsd"] for c in summary["cases"]}
                row["mean_dsc"], row["mean_nsd"] = summary["overall"]["dsc"], summary["overall"]["nsd"]
            rows.append(row)
            print(f"measured {config.label}", file=sys.stderr)
    names = [p.name for p in case_paths]
    width = max(22, *(len(r["config"]) + 2 for r in rows))
    first = max(34, *(len(name) + 2 for name in names))

    print(f"\n{machine_line()}")
    print(f"seconds per case (engine loaded once; prompt mode {args.prompt_mode}; {_threads_note(args.threads)})")
    print(f"{'case':{first}s}" + "".join(f"{r['config']:>{width}s}" for r in rows))
    for name in names:
        cells = []
        for r in rows:
            cell = f"{r['seconds'][name]:.2f}s"
            if "dsc" in r and r["dsc"].get(name) is not None:
                cell += f" D{r['dsc'][name]:.3f}"
            cells.append(f"{cell:>{width}s}")
        print(f"{name:{first}s}" + "".join(cells))
    totals = [sum(r["seconds"].values()) for r in rows]
    print(f"{'total seconds':{first}s}" + "".join(f"{t:>{width}.2f}" for t in totals))
    print(f"{'speed-up vs first':{first}s}" + "".join(f"{totals[0] / t:>{width - 1}.2f}x" for t in totals))
    print(f"{'engine load seconds':{first}s}" + "".join(f"{r['load_seconds']:>{width}.2f}" for r in rows))
    if args.gt is not None:
        print(f"{'mean DSC':{first}s}" + "".join(f"{r['mean_dsc']:>{width}.4f}" for r in rows))
        print(f"{'mean NSD (challenge rule)':{first}s}" + "".join(f"{r['mean_nsd']:>{width}.4f}" for r in rows))
    _write_json(args.json, {"prompt_mode": args.prompt_mode, "threads": args.threads, "results": rows})
    return 0


def run_process(args: argparse.Namespace) -> int:
    if not args.input.exists():
        raise UserFacingError(f"{args.input}: no such case file or folder")
    if args.cpp is not None and not args.cpp.is_file():
        raise UserFacingError(f"{args.cpp}: no such binary (build it with `make cpp`)")
    if args.repeats < 1:
        raise UserFacingError("--repeats must be at least 1")
    common = ["-i", "{input}", "-o", "{output}", "--prompt-mode", args.prompt_mode]
    if args.threads:
        common += ["--threads", str(args.threads)]
    python = [sys.executable, "-m", "qmedsam", "predict", *common]
    runs = [ProcessRun("torch", (*python, "--engine", "torch"))] if args.torch else []
    for model in args.model or ["int8"]:
        model_dir = str(resolve_model_dir(model))
        name = model if model in ("int8", "fp32") else Path(model).name
        runs.append(ProcessRun(f"python-{name}", (*python, "-m", model_dir)))
        if args.cpp is not None:
            runs.append(ProcessRun(f"cpp-{name}", (str(args.cpp), *common, "-m", model_dir)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="qmedsam-bench-") as tmp:
        for run in runs:
            rows.append(time_process(run, args.input, Path(tmp), args.repeats))
            print(f"measured {run.label}", file=sys.stderr)
    reference = rows[0]
    print(f"\n{machine_line()}")
    settings = f"prompt mode {args.prompt_mode}; {_threads_note(args.threads)}; OpenVINO f32 hint, LATENCY"
    print(f"whole process, start to exit, on {args.input} ({settings})")
    print(f"cold = empty model cache; warm = median of {args.repeats} with it filled; ratios vs {reference['label']}")
    print(f"{'predictor':24s} {'cold s':>9s} {'warm s':>9s} {'spread s':>9s} {'cold ratio':>11s} {'warm ratio':>11s}")
    for row in rows:
        row["cold_ratio"] = reference["cold_s"] / row["cold_s"]
        row["warm_ratio"] = reference["warm_s"] / row["warm_s"]
        print(
            f"{row['label']:24s} {row['cold_s']:9.2f} {row['warm_s']:9.2f} {row['warm_spread_s']:9.2f} "
            f"{row['cold_ratio']:10.2f}x {row['warm_ratio']:10.2f}x"
        )
        row.pop("output")
    _write_json(args.json, {"input": str(args.input), "reference": reference["label"], "results": rows})
    return 0
