"""A cohort on Ray: a pool of actors, each loading the model once with a set number of threads, one case in flight
per actor (back-pressure: the driver holds the rest), outputs written by the actors into the output folder (which
every node must see at the same path), ledger lines written by the driver.

A case whose actor dies under it (a crash, an OOM kill, a lost node) is retried once on a fresh actor, then
recorded as failed; a case that fails with an error is recorded at once (the same input fails the same way).
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from qmedsam.cohort.job import EngineSpec, PredictOptions, run_case
from qmedsam.cohort.manifest import CohortCase
from qmedsam.cohort.run import Event, Executor
from qmedsam.errors import UserFacingError

log = logging.getLogger("qmedsam.cohort")

ATTEMPTS = 2
"""A case is tried on at most this many actors when actors die under it."""

CRASH_IDS_ENV = "QMEDSAM_COHORT_CRASH_IDS"
"""Fault injection for the retry path's test (like Ray's own `RAY_testing_*` switches): an actor whose environment
lists a case id (comma-separated) ends its process abruptly when handed that case, as a segfault would."""


class CaseWorker:
    """One actor: the engine loaded once, then case after case."""

    def __init__(self, spec: EngineSpec) -> None:
        self.engine = spec.load()

    def ready(self) -> str:
        return self.engine.name

    def run(self, case: CohortCase, options: PredictOptions, out_dir: Path) -> dict:
        if case.id in os.environ.get(CRASH_IDS_ENV, "").split(","):
            os._exit(70)
        return {**run_case(self.engine, case, options, out_dir), "worker": f"{os.uname().nodename}:{os.getpid()}"}


AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"


def _use_token_like_ray_start() -> None:
    """Join a cluster with the token `ray start` would have used on this machine. Why: `ray start` turns token
    authentication on whenever a token exists (Ray >= 2.59 writes ~/.ray/auth_token on any local `ray.init()`),
    but `ray.init(address=HOST:PORT)` does so only for address 'auto', so a driver on the head node is refused by
    its own cluster. A token sent to a cluster without authentication is ignored; RAY_AUTH_MODE, when set, wins."""
    if AUTH_MODE_ENV in os.environ:
        return
    token_given = os.environ.get(AUTH_TOKEN_ENV) or os.environ.get(AUTH_TOKEN_PATH_ENV)
    if token_given or Path(DEFAULT_TOKEN_FILE).expanduser().is_file():
        os.environ[AUTH_MODE_ENV] = "token"
        if "ray" in sys.modules:  # Ray read its settings at import: re-read them, as Ray itself does
            try:
                from ray._raylet import Config

                Config.initialize("")
            except (ImportError, AttributeError):
                log.warning("Ray was imported before %s was set; set it before importing Ray", AUTH_MODE_ENV)


def _require_ray():
    try:
        import ray
    except ImportError:
        raise UserFacingError("--ray needs Ray: pip install 'qmedsam[cluster]'") from None
    return ray


def ray_executor(
    address: str, actors: int | None, spec: EngineSpec, options: PredictOptions, out_dir: Path
) -> Executor:
    """`address`: 'local' starts a Ray instance on this machine; 'auto' or HOST:PORT (or ray://...) joins a cluster.
    `actors`: how many (default: the cluster's CPUs over each actor's threads)."""
    if address != "local":
        _use_token_like_ray_start()
    ray = _require_ray()

    def run(cases: list[CohortCase]) -> Iterator[Event]:
        if not cases:
            return
        threads = spec.threads or 1
        worker_spec = EngineSpec(spec.model, spec.engine, spec.precision, threads, spec.checkpoint)
        started_here = not ray.is_initialized()
        if started_here:
            kwargs = {"include_dashboard": False} if address == "local" else {}
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserFacingError(
                    f"--ray {address}: could not start or join a Ray cluster: {exc}. If the cluster uses token "
                    f"authentication, this machine needs its token: {AUTH_TOKEN_ENV}, {AUTH_TOKEN_PATH_ENV} or "
                    f"{DEFAULT_TOKEN_FILE}"
                ) from None
        try:
            yield from _stream(ray, cases, actors, threads, worker_spec, options, out_dir)
        finally:
            if started_here:
                ray.shutdown()

    return run


def _stream(ray, cases, actors, threads, spec, options, out_dir) -> Iterator[Event]:
    from ray.exceptions import RayActorError, RayTaskError

    cpus = int(ray.cluster_resources().get("CPU", 1))
    count = actors or max(1, cpus // threads)
    if count * threads > cpus:
        log.warning(
            "%d actors x %d threads asks for %d CPUs; the cluster has %d", count, threads, count * threads, cpus
        )
    remote = ray.remote(num_cpus=threads, max_restarts=0)(CaseWorker)
    out_dir = out_dir.resolve()

    def start_actor():
        actor = remote.remote(spec)
        try:
            ray.get(actor.ready.remote())
        except RayActorError as exc:
            raise UserFacingError(f"a Ray actor could not load the model: {exc}") from None
        return actor

    pool = [start_actor() for _ in range(min(count, len(cases)))]
    log.info("%d Ray actor(s) x %d thread(s)", len(pool), threads)
    queue: deque[tuple[CohortCase, int]] = deque((case, 1) for case in cases)
    in_flight: dict = {}  # ref -> (actor, case, attempt)
    idle = list(pool)
    while queue or in_flight:
        while queue and idle:
            case, attempt = queue.popleft()
            actor = idle.pop()
            if attempt == 1:
                yield "started", case, {}
            in_flight[actor.run.remote(case, options, out_dir)] = (actor, case, attempt)
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        ref = ready[0]
        actor, case, attempt = in_flight.pop(ref)
        try:
            entry = ray.get(ref)
            idle.append(actor)
        except RayTaskError as exc:  # not raised by a case's own failure (run_case records those)
            idle.append(actor)
            entry = {"id": case.id, "image": str(case.image), "status": "error", "message": f"Ray: {exc}"}
        except RayActorError as exc:
            ray.kill(actor)
            idle.append(start_actor())  # a fresh actor in the dead one's place
            if attempt < ATTEMPTS:
                log.warning("%s: its Ray actor died (%s); retrying on a fresh actor", case.id, type(exc).__name__)
                queue.appendleft((case, attempt + 1))
                continue
            entry = {
                "id": case.id,
                "image": str(case.image),
                "status": "error",
                "message": f"the worker process died while segmenting it, {attempt} times ({type(exc).__name__})",
            }
        entry["attempts"] = attempt
        yield "done", case, entry
