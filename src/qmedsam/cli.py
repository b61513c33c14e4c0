"""`qmedsam` command line: one entry point, one module per subcommand under `qmedsam.commands`.

Subcommand modules import their heavy dependencies (torch, openvino) inside `run`, so `--help` and
light commands stay fast and work on an inference-only install.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from qmedsam.errors import UserFacingError
from qmedsam.version import __version__

# Subcommand name -> module with `register(subparsers)`; the order is the order shown in --help.
COMMANDS: dict[str, str] = {
    "predict": "qmedsam.commands.predict",
    "export": "qmedsam.commands.export",
    "evaluate": "qmedsam.commands.evaluate",
    "data": "qmedsam.commands.data",
    "train": "qmedsam.commands.train",
    "finetune": "qmedsam.commands.finetune",
    "bench": "qmedsam.commands.bench",
    "serve": "qmedsam.commands.serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmedsam",
        description="Box-prompted medical segmentation with LiteMedSAM: quantize, export to OpenVINO, run on CPUs.",
    )
    parser.add_argument("--version", action="version", version=f"qmedsam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for commands that record it
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserFacingError as exc:
        print(f"qmedsam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
