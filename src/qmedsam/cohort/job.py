"""One cohort case on an engine -> its output files and its ledger entry; what identifies an input and a model.

The same function runs in the local loop and in a Ray actor; a case's failure becomes its entry (status "error"
and the message), never an exception, so one bad scan does not end the cohort.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from qmedsam.cohort.manifest import CohortCase
from qmedsam.data.cases import CaseError
from qmedsam.engines import load_engine, resolve_model_dir
from qmedsam.errors import UserFacingError
from qmedsam.files import sha256_file
from qmedsam.inference.jobs import JobResult, predict_case_file, predict_scan_job, read_scan_job
from qmedsam.inference.runtime import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOptions:
    """The `predict` flags that shape every case's output."""

    prompt_mode: str = "fixed"
    batch: int = 16
    window: str = "auto"  # a scan row's window when its `window` column is empty
    overlays: Path | None = None


@dataclass(frozen=True)
class EngineSpec:
    """The `predict` flags that choose the engine: what each worker loads once (`-m` is passed as given, so
    'int8' means each node's installed package)."""

    model: str | None = None
    engine: str = "openvino"
    precision: str = "auto"
    threads: int | None = None
    checkpoint: Path | None = None

    def load(self) -> Engine:
        return load_engine(
            self.model, engine=self.engine, precision=self.precision, threads=self.threads, checkpoint=self.checkpoint
        )

    def fingerprint(self) -> str:
        """The model a ledger entry was made with: the model folder's files by name and content (a re-exported
        model is another model) and the precision rule; or the torch reference and its checkpoint."""
        if self.engine == "torch":
            return f"torch:{sha256_file(self.checkpoint)[:16] if self.checkpoint else 'pretrained'}"
        return f"openvino:{_digest_folder(resolve_model_dir(self.model))[:16]}:precision={self.precision}"


def _digest_folder(folder: Path) -> str:
    """A folder's visible files by name and content (what a DICOM series reader looks at; a model folder)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def input_sha256(case: CohortCase, options: PredictOptions) -> str:
    """What a case's output is a function of, besides the model: the image's bytes, the prompt file's bytes, the
    window and the prompt rule. A rerun skips a finished case only while this is unchanged."""
    image = _digest_folder(case.image) if case.kind == "dicom" else sha256_file(case.image)
    prompts = {key: sha256_file(path) for key, path in (("boxes", case.boxes), ("labels", case.labels)) if path}
    window = None if case.kind == "npz" else (case.window or options.window)
    identity = {"image": image, "prompts": prompts, "window": window, "prompt_mode": options.prompt_mode}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def run_case(engine: Engine, case: CohortCase, options: PredictOptions, out_dir: Path) -> dict:
    """Segment one case and write its outputs; the ledger entry for it (status "ok" or "error")."""
    started = time.perf_counter()
    entry: dict = {"id": case.id, "image": str(case.image)}
    try:
        entry["input_sha256"] = input_sha256(case, options)
        result = _predict(engine, case, options, out_dir, started)
        entry.update(
            status="ok",
            outputs=[path.name for path in result.outputs],
            dimension=result.dimension,
            objects=result.objects,
            warnings=result.warnings,
        )
    except (CaseError, UserFacingError, OSError) as exc:
        entry.update(status="error", message=str(exc))
    except Exception as exc:  # one broken case must not end the cohort
        entry.update(status="error", message=f"unexpected failure: {type(exc).__name__}: {exc}")
        log.debug("traceback", exc_info=True)
    entry["seconds"] = round(time.perf_counter() - started, 4)
    entry["engine"] = engine.name
    return entry


def _predict(engine: Engine, case: CohortCase, options: PredictOptions, out_dir: Path, started: float) -> JobResult:
    if case.kind == "npz":
        return predict_case_file(engine, case.image, out_dir, options.prompt_mode, options.batch, options.overlays)
    job = read_scan_job(case.image, case.boxes, case.labels, case.window or options.window)
    return predict_scan_job(engine, job, out_dir, options.prompt_mode, options.batch, started)
