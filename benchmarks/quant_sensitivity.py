"""Which layers' quantization costs the most accuracy: the measurement behind `float_layers`.

For the calibrated int8 encoder (the spec's calibration on `--calib`, as `qmedsam export --quant` does), each
quantized layer in turn has its quantizers switched off (input and weight: the layer runs float, everything
else stays int8) and the relative squared error of the image embedding against the float encoder,
||q(x) - f(x)||^2 / ||f(x)||^2, is measured on real slices. The slices come from the TRAINING split only
(MR from pydicom-data, CT from the TotalSegmentator DICOM series), never from validation or demo volumes,
so the choice it supports is not tuned on the cases it is scored on. Also printed: each layer's share of the
encoder's multiply-accumulates, since keeping a layer float costs speed in proportion to it.

`--part decoder` does the same for the mask decoder: both decoders get the FLOAT encoder's embedding (so the
decoder's own error is isolated) and the error is the mean disagreement 1 - Dice between the quantized and the
float decoder's masks over every box of each slice; the MAC share is per box.

    .venv/bin/python benchmarks/quant_sensitivity.py --out benchmarks/quant_sensitivity.json
    .venv/bin/python benchmarks/quant_sensitivity.py --table benchmarks/quant_sensitivity.json   # table only
    .venv/bin/python benchmarks/quant_sensitivity.py --part decoder --quant configs/quant/w8a8_mixed.yaml \
        --out benchmarks/quant_sensitivity_decoder.json

About 15 s per layer on 2 cores (109 quantized modules: ~30 min).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn


def part_macs(part: str) -> dict[str, int]:
    """Multiply-accumulates of every conv / linear of one part of the float model (BatchNorm folded): the
    encoder on a 256x256 input, or the decoder for one box."""
    from qmedsam.model.litemedsam import LiteMedSAM
    from qmedsam.model.tiny_vit import fuse_conv_bn

    model = LiteMedSAM().eval()
    fuse_conv_bn(model.image_encoder)
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            if isinstance(module, nn.ConvTranspose2d):
                per_output = module.in_channels // module.groups  # stride == kernel: each output sees one tap
            elif isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            else:
                per_output = module.in_features
            macs[name] = output.numel() * per_output

        return record

    root = PART_MODULES[part]
    for name, module in getattr(model, root).named_modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            module.register_forward_hook(hook(f"{root}.{name}"))
    with torch.no_grad():
        embedding = model.encode(torch.zeros(1, 3, 256, 256))
        if part == "decoder":
            model.decode(embedding, torch.tensor([[32.0, 32.0, 160.0, 160.0]]))
    return macs


PART_MODULES = {"encoder": "image_encoder", "decoder": "mask_decoder"}


def measure(args: argparse.Namespace) -> dict:
    from brevitas.proxy.quant_proxy import QuantProxyFromInjector

    from qmedsam.export.int8 import real_slices
    from qmedsam.model.calibrate import calibrate, model_inputs
    from qmedsam.model.litemedsam import load_pretrained_litemedsam
    from qmedsam.model.quant import QuantSpec, load_litemedsam

    torch.manual_seed(0)
    spec = QuantSpec.from_yaml(args.quant)
    model = load_litemedsam(spec)
    calibrate(model, model_inputs(real_slices(args.calib, limit=args.calib_slices)))
    reference = load_pretrained_litemedsam().eval()
    slices = [s for folder in args.slices for s in real_slices(folder[0], limit=int(folder[1]), max_boxes=4)]
    batches = model_inputs(slices)
    with torch.no_grad():
        float_embeddings = [reference.encode(image) for image, _ in batches]
        float_masks = [reference.decode(e, b)[0] > 0 for e, (_, b) in zip(float_embeddings, batches, strict=True)]

    def encoder_errors() -> list[float]:
        with torch.no_grad():
            return [
                float((model.encode(image) - target).pow(2).sum() / target.pow(2).sum())
                for (image, _), target in zip(batches, float_embeddings, strict=True)
            ]

    def decoder_errors() -> list[float]:
        errors = []
        with torch.no_grad():
            for embedding, (_, boxes), target in zip(float_embeddings, batches, float_masks, strict=True):
                masks = model.decode(embedding, boxes)[0] > 0
                overlap = (masks & target).flatten(1).sum(1).double()
                total = masks.flatten(1).sum(1).double() + target.flatten(1).sum(1).double()
                dice = torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total))
                errors.append(float(1 - dice.mean()))
        return errors

    errors = encoder_errors if args.part == "encoder" else decoder_errors
    names = [s.name for s in slices]
    result: dict = {"part": args.part, "quant_spec": str(args.quant), "slices": names, "layers": {}}
    if args.out is not None and args.out.is_file():  # resume an interrupted measurement of the same setup
        earlier = json.loads(args.out.read_text())
        setup = (earlier.get("part", "encoder"), earlier.get("quant_spec"), earlier.get("slices"))
        if setup == (args.part, str(args.quant), names):
            result = earlier
    result.setdefault("base", errors())
    root = PART_MODULES[args.part]
    layers = [
        (f"{root}.{name}", module)
        for name, module in getattr(model, root).named_modules()
        if any(isinstance(child, QuantProxyFromInjector) for child in module.children())
    ]
    for name, module in layers:
        if name in result["layers"] or not name.startswith(tuple(args.only or [""])):
            continue
        start = time.perf_counter()
        proxies = [c for c in module.children() if isinstance(c, QuantProxyFromInjector)]
        for proxy in proxies:
            proxy.disable_quant = True
        result["layers"][name] = errors()
        for proxy in proxies:
            proxy.disable_quant = False
        seconds = time.perf_counter() - start
        print(f"{name}: {[round(e, 4) for e in result['layers'][name]]} ({seconds:.0f} s)", flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(result: dict, top: int) -> str:
    part = result.get("part", "encoder")
    macs = part_macs(part)
    total = sum(macs.values())
    base = sum(result["base"]) / len(result["base"])
    rows = sorted(result["layers"].items(), key=lambda item: sum(item[1]) / len(item[1]))
    what = "relative squared embedding error" if part == "encoder" else "mask disagreement (1 - Dice) with float"
    lines = [
        f"Calibrated int8 {part}, {what} on {len(result['base'])} training-split slices "
        f"({', '.join(result['slices'])}): mean {base:.4f} with every layer of the spec quantized.",
        "",
        f"| layer kept float | mean error | reduction | per slice | share of {part} MACs |",
        "|---|---|---|---|---|",
    ]
    for name, errs in rows[:top]:
        mean = sum(errs) / len(errs)
        share = macs.get(name, 0) / total
        lines.append(
            f"| `{name}` | {mean:.4f} | {100 * (1 - mean / base):.0f}% | {' / '.join(f'{e:.4f}' for e in errs)} "
            f"| {100 * share:.1f}% |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PART_MODULES), default="encoder", help="which part to measure")
    parser.add_argument("--quant", type=Path, default=Path("configs/quant/w8a8_per_channel.yaml"))
    parser.add_argument("--calib", type=Path, default=Path("data/trainsplit/cases"))
    parser.add_argument("--calib-slices", type=int, default=8)
    parser.add_argument(
        "--slices",
        nargs=2,
        action="append",
        metavar=("FOLDER", "N"),
        help="N slices from FOLDER (repeatable; default: 3 from data/train/MR/pydicom, 1 from the CT DICOM series)",
    )
    parser.add_argument(
        "--out", type=Path, help="write the measurement here (JSON), layer by layer; an existing one is resumed"
    )
    parser.add_argument("--only", nargs="+", metavar="PREFIX", help="measure only layers whose names start so")
    parser.add_argument("--table", type=Path, help="print the table of an earlier measurement and stop")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text()), args.top))
        return 0
    args.slices = args.slices or [
        ("data/train/MR/pydicom", "3"),
        ("data/train/CT/TotalSeg", "1"),  # its first file: the DICOM series (training split)
    ]
    print(table(measure(args), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
