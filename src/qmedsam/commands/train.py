"""`qmedsam train`: one quantization-aware training stage, or the seed's chain of three.

Single process by default; `torchrun --nproc-per-node N [--nnodes ...] -m qmedsam train ...` runs it under
DDP (gloo on CPU, nccl on GPU). Stage files are flat YAML (`configs/train/stage*.yaml`); `--set key=value`
overrides any key. `--stages 1,2,3` runs the chain: each stage starts from the previous stage's best
checkpoint, and with `--set out_dir=DIR` stage k writes to DIR/stage<k>.

Refused before anything is built (exit code 2, no traceback): a `--resume` file that is not a run checkpoint
(a stage's init.pt or a weights file: start from those with `--set init_checkpoint=FILE`), and a stage whose
estimated peak memory, times the processes on the node, exceeds what the node can give
(`qmedsam.train.memory`; `QMEDSAM_SKIP_MEMORY_CHECK=1` skips that check).
"""

from __future__ import annotations

from pathlib import Path

from qmedsam.errors import UserFacingError
from qmedsam.train.config import ClickConfig, load_config

STAGE_FILES = {
    1: "stage1_quant_encoder.yaml",
    2: "stage2_quant_decoder.yaml",
    3: "stage3_finetune_both.yaml",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="quantization-aware training (one stage or the three-stage chain; torchrun for DDP)",
        description=(
            "Train LiteMedSAM with quantization in the loop on a `qmedsam data train` tree: stage 1 quantized "
            "encoder with the fp32 teacher, stage 2 encoder + decoder quantized with the decoder trained, stage 3 "
            "both trained with the teacher. Run under `torchrun --nproc-per-node N -m qmedsam train ...` for DDP. "
            "Writes out_dir/{init,last,best}.pt, metrics.jsonl and curves.png; export the result with "
            "`qmedsam export --quant SPEC --checkpoint out_dir/best.pt`. `--config configs/train/clicks.yaml` runs the "
            "click recipe instead: the int8 decoder and point embeddings learn corrective clicks on cached embeddings "
            "of the shipped int8 encoder (export with `qmedsam export --checkpoint out_dir/best.pt`). A stage whose "
            "estimated peak memory (per process, times the processes on this node) exceeds the available memory is "
            "refused before anything "
            "is built, saying what would fit (batch_size, processes); QMEDSAM_SKIP_MEMORY_CHECK=1 skips that check."
        ),
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="stage config (flat YAML keys)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set data_root=DIR out_dir=DIR max_steps=5",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="CKPT",
        help="continue a run exactly from its last.pt (a run checkpoint; to start a new run from a stage's init.pt "
        "or other weights, use --set init_checkpoint=FILE)",
    )
    parser.add_argument(
        "--stages",
        metavar="LIST",
        help="run stages in order, e.g. 1,2,3, with the stage files from --config-dir",
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=Path("configs/train"),
        metavar="DIR",
        help="folder with the stage files for --stages (default: configs/train)",
    )
    parser.set_defaults(func=run)


def _parse_stages(text: str) -> list[int]:
    try:
        stages = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserFacingError(f"--stages {text!r}: expected stage numbers like 1,2,3") from None
    if not stages or any(s not in STAGE_FILES for s in stages):
        raise UserFacingError(f"--stages {text!r}: stages are 1, 2 and 3")
    return stages


def run(args) -> int:
    import dataclasses

    from qmedsam.train.loop import dist_env, train

    if args.stages is None:
        if args.config is None and not args.overrides:
            raise UserFacingError("give --config FILE (and/or --set key=value), or --stages 1,2,3")
        config = load_config(args.config, args.overrides)
        if isinstance(config, ClickConfig):
            from qmedsam.train.clicks import train_clicks

            print(f"best checkpoint: {train_clicks(config, args.resume)}")
            return 0
        best = train(config, args.resume)
        if dist_env().is_main:
            print(f"best checkpoint: {best}")
        return 0
    if args.config is not None or args.resume is not None:
        raise UserFacingError("--stages takes its stage files from --config-dir; drop --config / --resume")
    previous: Path | None = None
    for stage in _parse_stages(args.stages):
        config = load_config(args.config_dir / STAGE_FILES[stage], args.overrides)
        if any(item.split("=", 1)[0].strip() == "out_dir" for item in args.overrides):
            config = dataclasses.replace(config, out_dir=str(Path(config.out_dir) / f"stage{stage}"))
        if previous is not None:
            config = dataclasses.replace(config, init_checkpoint=str(previous))
        previous = train(config, keep_process_group=True)
        if dist_env().is_main:
            print(f"stage {stage}: best checkpoint {previous}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
