"""A cohort run: which cases are left (the ledger), run them here or on Ray, record each, summarise.

A case is skipped when its last ledger line is "ok" with the same input hash and model and its outputs are all
there; one that failed the same way before is skipped too unless `--retry-failed`. Any other case is (re)done. A
case no ledger line accounts for may not replace a file already in the output folder: the run lists them and stops
before any work, as for a bad manifest.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qmedsam.cohort.job import EngineSpec, PredictOptions, input_sha256, run_case
from qmedsam.cohort.ledger import LEDGER_NAME, Ledger
from qmedsam.cohort.manifest import CohortCase, in_shard
from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_write_bytes, leftover_temporaries

log = logging.getLogger("qmedsam.cohort")

SUMMARY_NAME = "summary.json"

Event = tuple[str, CohortCase, dict]
"""("started", case, {}) before a case's outputs are written; ("done", case, ledger entry) after."""
Executor = Callable[[list[CohortCase]], Iterator[Event]]


@dataclass
class Plan:
    """What a run will do with each case of its shard."""

    run: list[CohortCase] = field(default_factory=list)
    done_before: list[CohortCase] = field(default_factory=list)
    failed_before: list[CohortCase] = field(default_factory=list)


def plan_cohort(
    cases: list[CohortCase], out_dir: Path, options: PredictOptions, model: str, retry_failed: bool
) -> Plan:
    """Sort the shard's cases by what the ledger says of them; refuse to replace files the ledger does not
    account for; remove the temporaries a killed run left of a case it had started."""
    latest = Ledger(out_dir).latest()
    plan = Plan()
    foreign: list[str] = []
    for case in cases:
        entry = latest.get(case.id)
        if entry is None:
            existing = [name for name in case.output_names() if (out_dir / name).exists()]
            if existing:
                foreign.append(f"line {case.line} ({case.id}): {', '.join(existing)}")
            else:
                plan.run.append(case)
            continue
        for name in case.output_names():  # a case our ledger started: what a killed writer of ours left
            for stale in leftover_temporaries(out_dir / name):
                stale.unlink(missing_ok=True)
        same = entry.get("model") == model and entry.get("input_sha256") == input_sha256(case, options)
        if same and entry["status"] == "ok" and all((out_dir / name).is_file() for name in entry.get("outputs", [])):
            plan.done_before.append(case)
        elif same and entry["status"] == "error" and not retry_failed:
            plan.failed_before.append(case)
        else:
            plan.run.append(case)
    if foreign:
        raise UserFacingError(
            f"{out_dir}: {len(foreign)} case(s) would replace files that {LEDGER_NAME} does not say this cohort wrote "
            "(move them away or choose another output folder); nothing was run:\n  " + "\n  ".join(foreign[:50])
        )
    return plan


def local_executor(spec: EngineSpec, options: PredictOptions, out_dir: Path) -> Executor:
    """Cases one after another in this process, the engine loaded once (only if there is work)."""

    def run(cases: list[CohortCase]) -> Iterator[Event]:
        if not cases:
            return
        engine = spec.load()
        for case in cases:
            yield "started", case, {}
            yield "done", case, run_case(engine, case, options, out_dir)

    return run


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_cohort(
    cases: list[CohortCase],
    out_dir: Path,
    *,
    manifest: Path,
    options: PredictOptions,
    spec: EngineSpec,
    executor: Executor,
    shard: tuple[int, int] | None = None,
    retry_failed: bool = False,
) -> int:
    """Run what is left of the cohort's shard; the exit code (0: every case of the shard done, 1: some failed,
    130: interrupted)."""
    from tqdm import tqdm

    started = time.perf_counter()
    mine = [case for case in cases if shard is None or in_shard(case.id, *shard)]
    out_dir.mkdir(parents=True, exist_ok=True)
    model = spec.fingerprint()
    plan = plan_cohort(mine, out_dir, options, model, retry_failed)
    ledger = Ledger(out_dir)
    shard_text = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(
        f"{len(mine)} case(s){shard_text}: {len(plan.run)} to run, {len(plan.done_before)} done before, "
        f"{len(plan.failed_before)} failed before" + ("" if retry_failed else " (--retry-failed redoes them)"),
        file=sys.stderr,
    )
    done: list[str] = []
    failed: list[dict] = []
    interrupted = False
    progress = tqdm(total=len(plan.run), desc="cohort", unit="case", file=sys.stderr)
    main_thread = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # a time limit stops like Ctrl-C
    try:
        for kind, case, entry in executor(plan.run):
            if kind == "started":
                ledger.append({"id": case.id, "status": "started", "model": model})
                continue
            entry["model"] = model
            ledger.append(entry)
            for warning in entry.get("warnings", []):
                tqdm.write(f"warning: {case.id}: {warning}", file=sys.stderr)
            if entry["status"] == "ok":
                done.append(case.id)
            else:
                failed.append({"id": case.id, "message": entry.get("message", "")})
                tqdm.write(f"error: {case.id} ({case.image}): {entry.get('message', '')}", file=sys.stderr)
            progress.update(1)
    except KeyboardInterrupt:
        interrupted = True
        tqdm.write("interrupted: finished cases are in the ledger; rerun the same command to go on", file=sys.stderr)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_term)
        progress.close()
    wall = time.perf_counter() - started
    summary = _summary(cases, mine, plan, done, failed, wall, interrupted, manifest, out_dir, model, shard)
    atomic_write_bytes(out_dir / SUMMARY_NAME, (json.dumps(summary, indent=2) + "\n").encode())
    print(
        f"{len(done)} done, {len(failed)} failed, {len(plan.done_before) + len(plan.failed_before)} skipped in "
        f"{wall:.1f} s ({summary['scans_per_hour']} scans/hour); {out_dir / SUMMARY_NAME}",
        file=sys.stderr,
    )
    if interrupted:
        return 130
    if failed or plan.failed_before:
        print(
            f"{len(failed) + len(plan.failed_before)} case(s) of this run's set failed; see {out_dir / LEDGER_NAME}",
            file=sys.stderr,
        )
        return 1
    return 0


def _summary(
    cases: list[CohortCase],
    mine: list[CohortCase],
    plan: Plan,
    done: list[str],
    failed: list[dict],
    wall: float,
    interrupted: bool,
    manifest: Path,
    out_dir: Path,
    model: str,
    shard: tuple[int, int] | None,
) -> dict:
    """This run's counts, and the whole cohort's state as the (possibly shared) ledger has it now."""
    latest = Ledger(out_dir).latest()
    states = [latest.get(case.id, {}).get("status") for case in cases]
    return {
        "manifest": str(manifest),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "model": model,
        "cases": len(mine),
        "done": len(done),
        "failed": len(failed),
        "skipped": len(plan.done_before) + len(plan.failed_before),
        "skipped_done_before": len(plan.done_before),
        "skipped_failed_before": [case.id for case in plan.failed_before],
        "not_run": len(plan.run) - len(done) - len(failed),
        "interrupted": interrupted,
        "wall_seconds": round(wall, 3),
        "scans_per_hour": round(len(done) / wall * 3600, 1) if wall > 0 else 0.0,
        "failures": failed,
        "cohort": {
            "cases": len(cases),
            "ok": states.count("ok"),
            "error": states.count("error"),
            "not_done": len(cases) - states.count("ok") - states.count("error"),
        },
    }
