"""`qmedsam serve`: the nnInteractive v2 protocol over HTTP, so 3D Slicer's and napari's nnInteractive clients segment
with qmedsam on a CPU (FastAPI + uvicorn; install with `pip install 'qmedsam[serve]'`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from qmedsam.engines import load_engine
from qmedsam.errors import UserFacingError
from qmedsam.serve.app import ServeSettings, create_app

API_KEY_ENV = "QMEDSAM_SERVE_API_KEY"
DEFAULT_PORT = 1527  # what the Slicer extension's server field suggests

DESCRIPTION = f"""\
Serve the model to nnInteractive clients (3D Slicer's nnInteractive extension, napari-nninteractive's remote
mode, or the `nninteractive-client` library): point the client at http://HOST:PORT.

What a client can do here: draw a box on a slice of any view (axial, coronal, sagittal) -> the whole 3D object,
walked out from that slice until the measured stop rule says it ended; a box with depth -> the fixed 3D-box rule;
an exclude box erases what it finds from the current object; a lasso counts as its bounding box; seed the object
with an existing segment; undo; reset starts a new object. Points and scribbles are refused (and not advertised)
until the shipped decoder is click-trained. Images arrive as raw intensities without a modality: Hounsfield-like
values get the CT soft-tissue window, anything else its 0.5-99.5 percentiles (as `qmedsam predict -i scan.nii.gz`).

Safe by default: binds 127.0.0.1; another address needs an API key (--api-key KEY, or the environment variable
{API_KEY_ENV}), which clients send as `Authorization: Bearer KEY` (Slicer: the API key field; the client
library: NN_INTERACTIVE_API_KEY). Images over --max-voxels or bodies over --max-upload-mb are refused (413);
at most --max-sessions sessions at a time (503 beyond), each reaped after --idle-timeout seconds without an action
or 90 s without any request (clients heartbeat every 30 s). Embeddings are cached per session (--cache-mb).
One engine serves every session, one prediction at a time: on a small CPU a walk still going --prediction-budget
seconds after its request arrived ends where it is (logged), so the answer beats Slicer's 60 s timeout even
behind another session's walk; draw another box on the rest of the object if it was cut short.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the model to 3D Slicer / napari nnInteractive clients (nnInteractive v2 protocol, CPU)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require this key from clients (default: the environment variable {API_KEY_ENV}, if set)",
    )
    parser.add_argument("--max-sessions", type=int, default=4, help="sessions served at once (default 4)")
    parser.add_argument(
        "-m",
        "--model",
        default=None,
        help="'int8' (the shipped model, the default), 'fp32', or a model directory from `qmedsam export`",
    )
    parser.add_argument("--precision", choices=["auto", "f32", "bf16"], default="auto", help="OpenVINO precision")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    parser.add_argument(
        "--max-voxels", type=int, default=256 * 1024 * 1024, help="largest image in voxels (default 268,435,456)"
    )
    parser.add_argument("--max-upload-mb", type=int, default=1024, help="largest request body in MiB (default 1024)")
    parser.add_argument(
        "--idle-timeout", type=float, default=600.0, help="seconds without an action before a session ends (600)"
    )
    parser.add_argument("--cache-mb", type=int, default=768, help="embedding cache per session in MiB (default 768)")
    parser.add_argument(
        "--prediction-budget",
        type=float,
        default=45.0,
        help="seconds from a request's arrival after which a walk ends where it is, so the answer beats the "
        "client's timeout (Slicer waits 60 s; default 45)",
    )
    parser.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> ServeSettings:
    """The checked settings; refuses an exposed address without a key before anything loads."""
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and len(api_key) < 16:
        raise UserFacingError(
            "--api-key: use at least 16 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    if not _loopback(args.host) and api_key is None:
        raise UserFacingError(
            f"--host {args.host} exposes the server beyond this machine: give --api-key KEY (or set {API_KEY_ENV}); "
            "clients then send it as a bearer token"
        )
    for option, value in (
        ("--max-sessions", args.max_sessions),
        ("--max-voxels", args.max_voxels),
        ("--max-upload-mb", args.max_upload_mb),
        ("--cache-mb", args.cache_mb),
    ):
        if value < 1:
            raise UserFacingError(f"{option} must be at least 1 (got {value})")
    if not 0 < args.port < 65536:
        raise UserFacingError(f"--port must be 1..65535 (got {args.port})")
    if not args.idle_timeout > 0:
        raise UserFacingError(f"--idle-timeout must be positive (got {args.idle_timeout})")
    if not args.prediction_budget > 0:
        raise UserFacingError(f"--prediction-budget must be positive (got {args.prediction_budget})")
    return ServeSettings(
        api_key=api_key,
        max_sessions=args.max_sessions,
        max_voxels=args.max_voxels,
        max_body_bytes=args.max_upload_mb << 20,
        idle_timeout=args.idle_timeout,
        cache_mb=args.cache_mb,
        model_name=str(args.model or "int8"),
        prediction_budget=args.prediction_budget,
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        import uvicorn
    except ImportError as exc:
        raise UserFacingError(f"qmedsam serve needs {exc.name}: pip install 'qmedsam[serve]'") from None
    engine = load_engine(args.model, precision=args.precision, threads=args.threads)
    app = create_app(engine, settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(
        f"qmedsam serve: model {settings.model_name} on http://{args.host}:{args.port} "
        f"({'API key required' if settings.api_key else 'no API key: this machine only'}); Ctrl-C stops",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0
