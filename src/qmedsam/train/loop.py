"""One quantization-aware training stage, single process or under torchrun (DDP).

torchrun is the distributed engine: it sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous), this
module reads them; gloo on CPU, nccl on GPU. Every rank builds the same dataset (same seed) and takes its
shard through `DistributedSampler(drop_last=True)`, so no sample is seen twice in an epoch. Rank 0 alone
logs, validates and writes checkpoints; the others wait at barriers.

Checkpoints (`out_dir/last.pt`, `best.pt`, `init.pt`; atomic writes, `torch.load(weights_only=True)`) hold
model, optimizer, scheduler epoch, step, position in the epoch, config, sampler seed and RNG state. Sample
randomness is a pure function of (seed, epoch, index) (see `qmedsam.datasets.modality`), so `--resume` from a
mid-epoch checkpoint replays the remaining batches exactly: the loss trajectory continues as if the run
had never stopped. A non-finite loss stops the run before the optimizer step, leaving the last good
checkpoint untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_write
from qmedsam.model.weights import pretrained_weights_path
from qmedsam.train.config import TrainConfig
from qmedsam.train.progress import RunLog
from qmedsam.train.validate import ValidationSet

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "qmedsam-train-checkpoint-v1"


class TrainingError(UserFacingError):
    """A run that cannot continue (non-finite loss, unusable checkpoint); the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """What torchrun put in the environment (a plain `qmedsam train` is rank 0 of 1)."""
    try:
        return DistEnv(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as exc:
        raise UserFacingError(
            f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc}); launch with torchrun"
        ) from None


def pick_device(spec: str, env: DistEnv) -> torch.device:
    """`auto` -> the rank's GPU when CUDA is available, else CPU; `cuda` -> cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{env.local_rank}"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserFacingError(f"device {spec!r} asked for, but torch sees no CUDA device; use device=cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Schedule, checkpoints


def lr_factor(epoch: int, config: TrainConfig) -> float:
    """The seed's schedule per epoch: linear warm-up from `warmup_start_factor`, cosine to `min_lr_factor`,
    then `extra_epochs` at the minimum."""
    if epoch < config.warmup_epochs:
        return config.warmup_start_factor + (1 - config.warmup_start_factor) * epoch / config.warmup_epochs
    t = epoch - config.warmup_epochs
    if t < config.cosine_epochs:
        return config.min_lr_factor + (1 - config.min_lr_factor) * 0.5 * (
            1 + math.cos(math.pi * t / config.cosine_epochs)
        )
    return config.min_lr_factor


def atomic_torch_save(payload: Any, path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise TrainingError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a qmedsam training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


# --------------------------------------------------------------------------------------------------
# Model


def quant_spec_for(config: TrainConfig):
    from qmedsam.model.quant import QuantSpec

    spec = QuantSpec.from_yaml(config.quant_spec) if config.quant_spec else QuantSpec()
    return dataclasses.replace(spec, image_encoder=config.quantize_encoder, mask_decoder=config.quantize_decoder)


def build_student(config: TrainConfig, calibration_batches, decoder_samples=()) -> tuple[nn.Module, dict]:
    """The stage's starting model: `init_checkpoint` (float or quantized, e.g. the previous stage's) or the
    pretrained weights; parts whose quantizers the weights do not carry are calibrated on real slices, then
    reconstructed against the float model if the config asks (encoder block by block on the calibration
    slices, decoder end to end on `decoder_samples`)."""
    from qmedsam.model import quant
    from qmedsam.model.calibrate import calibrate
    from qmedsam.model.litemedsam import load_state_dict_file

    spec = quant_spec_for(config)
    source = Path(config.init_checkpoint) if config.init_checkpoint else pretrained_weights_path()
    state = load_state_dict_file(source)
    model = quant.build_quantized(spec if spec.enabled else None)
    from_float = not quant.is_quantized_state_dict(state)
    if from_float:
        quant.load_float_state_dict(model, state, str(source))
        parts = [p for p, on in (("image_encoder", spec.image_encoder), ("mask_decoder", spec.mask_decoder)) if on]
    else:
        state = quant.without_float_layer_quantizers(state, spec.float_layers)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not quant.is_quantizer_key(k)]
        if missing or result.unexpected_keys:
            raise TrainingError(
                f"{source}: weights do not fit this stage's model (missing {missing[:4]}, unexpected "
                f"{result.unexpected_keys[:4]}); check quantize_encoder / quantize_decoder against the previous stage"
            )
        parts = sorted({k.split(".")[0] for k in result.missing_keys})
    summary: dict[str, Any] = {"init": str(source), "calibrated_parts": parts}
    if parts:
        summary |= calibrate(model, calibration_batches, parts=parts)
    encoder_now = config.reconstruct_encoder and "image_encoder" in parts
    decoder_now = config.reconstruct_decoder and spec.mask_decoder
    if encoder_now or decoder_now:
        from qmedsam.model.litemedsam import load_pretrained_litemedsam
        from qmedsam.train import reconstruct

        float_model = load_pretrained_litemedsam(source if from_float else None)
        rates = {"lr": config.reconstruct_lr, "scale_lr": config.reconstruct_scale_lr, "seed": config.seed}
    if encoder_now:
        images = torch.cat([image for image, _ in calibration_batches])
        images = images[np.linspace(0, len(images) - 1, config.reconstruct_images).round().astype(int)]
        steps, batch = config.reconstruct_steps, config.reconstruct_batch_size
        report = reconstruct.reconstruct_encoder(model, float_model, images, steps=steps, batch_size=batch, **rates)
        summary["reconstruction"] = report.to_dict()
    if decoder_now:
        steps, batch = config.reconstruct_decoder_steps, config.reconstruct_decoder_batch_size
        samples = list(decoder_samples)
        distilled = reconstruct.reconstruct_decoder(model, float_model, samples, steps=steps, batch_size=batch, **rates)
        summary["decoder_reconstruction"] = distilled.to_dict()
    return model, summary


def set_trainable(model: nn.Module, config: TrainConfig) -> list[nn.Parameter]:
    """requires_grad per part; frozen parts stay in eval mode during training."""
    plan = {
        "image_encoder": config.train_encoder,
        "prompt_encoder": config.train_prompt_encoder,
        "mask_decoder": config.train_decoder,
    }
    params = []
    for part, trainable in plan.items():
        for parameter in getattr(model, part).parameters():
            parameter.requires_grad_(trainable)
            if trainable:
                params.append(parameter)
    return params


def set_modes(model: nn.Module, config: TrainConfig, training: bool) -> None:
    model.eval()
    if training:
        for part, trainable in (
            ("image_encoder", config.train_encoder),
            ("prompt_encoder", config.train_prompt_encoder),
            ("mask_decoder", config.train_decoder),
        ):
            if trainable:
                getattr(model, part).train()


class StudentStep(nn.Module):
    """What DDP wraps: image + one box per image -> (logits (B, 1, S, S), embedding). A frozen encoder
    runs without autograd (stage 2 needs no encoder graph)."""

    def __init__(self, model: nn.Module, encoder_trainable: bool) -> None:
        super().__init__()
        self.model = model
        self.encoder_trainable = encoder_trainable

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with contextlib.nullcontext() if self.encoder_trainable else torch.no_grad():
            embedding = self.model.encode(image)
        logits = self.model.decode(embedding, boxes)[0]
        return logits, embedding


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class RunState:
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    best_dsc: float = -1.0


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer: equal on all ranks when DDP keeps them in sync."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_ranks_in_sync(model: nn.Module, env: DistEnv) -> list[str]:
    """Every rank's parameter digest (one entry single-process); raises if the ranks disagree."""
    digest = parameter_digest(model)
    if not env.distributed:
        return [digest]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, digest)
    if len(set(gathered)) != 1:
        raise TrainingError(f"ranks hold different parameters after a step: {gathered}")
    return gathered


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def _config_dict(config: TrainConfig) -> dict:
    return json.loads(json.dumps(config.to_dict()))


def make_dataset(config: TrainConfig):
    from qmedsam.datasets.modality import GatherModalityDataset

    return GatherModalityDataset(
        config.data_root,
        image_size=config.image_size,
        bbox_shift=config.bbox_shift,
        mod_sample=config.sampler_strategy,
        augment=config.augment,
        split=config.train_split,
        seed=config.seed,
        unlabelled=config.teacher,  # unlabelled samples need the teacher's targets
    )


def _batch_indices(sampler, start_batch: int, batch_size: int) -> list[list[int]]:
    indices = list(iter(sampler))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]
    return batches[start_batch:]


def train(config: TrainConfig, resume: Path | None = None, keep_process_group: bool = False) -> Path:
    """Run one stage; returns the best (or, without validation, the last) checkpoint of rank 0.

    Under torchrun the process group is created on first use; it is destroyed at the end unless
    `keep_process_group` (a chain of stages keeps one group: re-creating it on torchrun's store can hang).
    """
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from qmedsam.train.losses import qmedsam_loss
    from qmedsam.train.teacher import Teacher

    env = dist_env()
    device = pick_device(config.device, env)
    if config.threads:
        torch.set_num_threads(config.threads)
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    out_dir = Path(config.out_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    try:
        dataset = make_dataset(config)
        resume_state = load_checkpoint(resume) if resume is not None else None
        init_path = out_dir / "init.pt"
        if resume_state is None:
            # Rank 0 builds (and calibrates) the starting model once; every rank loads the same bytes.
            if env.is_main:
                dataset.set_epoch(0)
                calib = [dataset[i] for i in np.linspace(0, len(dataset) - 1, config.calib_slices).astype(int)]
                batches = [(s.image[None], s.box[None]) for s in calib]
                decoder_samples = []
                if config.reconstruct_decoder:
                    count = min(config.reconstruct_decoder_samples, len(dataset))
                    picks = np.random.default_rng(config.seed).choice(len(dataset), count, replace=False)
                    decoder_samples = [(s.image[None], s.box[None]) for s in (dataset[int(i)] for i in picks)]
                model, summary = build_student(config, batches, decoder_samples)
                atomic_torch_save(
                    {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "init": summary}, init_path
                )
                log.info("starting model: %s", summary)
            barrier(env)
            start_state = load_checkpoint(init_path)
        else:
            start_state = resume_state
        from qmedsam.model import quant

        spec = quant_spec_for(config)
        model = quant.build_quantized(spec if spec.enabled else None)
        model.load_state_dict(start_state["model"], strict=True)
        model.to(device)
        params = set_trainable(model, config)
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, config))
        state = RunState()
        if resume_state is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            state = RunState(**resume_state["run"])
            torch.set_rng_state(resume_state["rng"]["torch"])
            saved = dict(resume_state["config"], max_steps=config.max_steps)
            if saved != _config_dict(config):
                log.warning("resuming with a config that differs from the checkpoint's (beyond max_steps)")
        step_module: nn.Module = StudentStep(model, config.train_encoder)
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: the decoder's IoU head is not in the loss.
            step_module = DistributedDataParallel(
                step_module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        teacher = None
        if config.teacher:
            cache = Path(config.teacher_cache) if config.teacher_cache else Path(config.data_root) / ".teacher-cache"
            teacher = Teacher(cache, device=device)
        validation = ValidationSet(config) if env.is_main and config.val_every_epochs else None
        run_log = RunLog(out_dir, enabled=env.is_main)
        sampler = DistributedSampler(
            dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=config.seed, drop_last=True
        )
        best_path = out_dir / "best.pt"
        last_path = out_dir / "last.pt"

        def checkpoint(path: Path) -> None:
            atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "run": dataclasses.asdict(state),
                    "config": _config_dict(config),
                    "sampler": {"seed": config.seed, "world_size": env.world_size, "drop_last": True},
                    "rng": _rng_state(),
                },
                path,
            )

        done = config.max_steps is not None and state.step >= config.max_steps
        if done and env.is_main:  # max_steps 0: the starting model is the result
            checkpoint(last_path)
        while state.epoch < config.epochs and not done:
            dataset.set_epoch(state.epoch)
            sampler.set_epoch(state.epoch)
            epoch_batches = len(sampler) // config.batch_size
            batches = _batch_indices(sampler, state.batch_in_epoch, config.batch_size)
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers)
            set_modes(model, config, training=True)
            epoch_start = time.perf_counter()
            run_log.start_epoch(state.epoch, epoch_batches, state.batch_in_epoch)
            for batch in loader:
                images = batch.image.to(device)
                boxes = batch.box.to(device)
                logits, embedding = step_module(images, boxes)
                teacher_embedding = teacher_logits = None
                if teacher is not None:
                    teacher_embedding = teacher.embed(batch.image, list(batch.key), batch.flips)
                    teacher_logits = teacher.decode(teacher_embedding, boxes)
                parts = qmedsam_loss(
                    logits,
                    batch.mask.to(device),
                    batch.labelled,
                    embedding if config.train_encoder else None,
                    teacher_embedding,
                    teacher_logits,
                    config.distill_weight,
                )
                loss_value = parts.total.detach()
                if env.distributed:
                    dist.all_reduce(loss_value)
                    loss_value /= env.world_size
                if not torch.isfinite(loss_value):
                    raise TrainingError(
                        f"non-finite loss ({float(loss_value)}) at epoch {state.epoch}, step {state.step}: "
                        f"stopped before the optimizer step; {last_path} holds the last good state "
                        "(lower lr, or resume from it)"
                    )
                optimizer.zero_grad(set_to_none=True)
                parts.total.backward()
                optimizer.step()
                state.step += 1
                state.batch_in_epoch += 1
                run_log.step(state, float(loss_value), len(batch.key) * env.world_size, optimizer.param_groups[0]["lr"])
                at_limit = config.max_steps is not None and state.step >= config.max_steps
                if env.is_main and (state.step % config.checkpoint_every_steps == 0 or at_limit):
                    checkpoint(last_path)
                if at_limit:
                    done = True
                    break
            if state.batch_in_epoch >= epoch_batches:  # the epoch is complete (not cut short by max_steps)
                state.epoch += 1
                state.batch_in_epoch = 0
                scheduler.step()
                metrics: dict[str, Any] = {"epoch_seconds": time.perf_counter() - epoch_start}
                if validation is not None and state.epoch % config.val_every_epochs == 0:
                    set_modes(model, config, training=False)
                    metrics |= validation.score(model)
                    if metrics["dsc"] > state.best_dsc:
                        state.best_dsc = metrics["dsc"]
                        checkpoint(best_path)
                metrics["rank_digests"] = check_ranks_in_sync(model, env)
                if env.is_main:
                    checkpoint(last_path)
                run_log.end_epoch(state, metrics)
            barrier(env)
        run_log.record({"type": "sync", "step": state.step, "rank_digests": check_ranks_in_sync(model, env)})
        run_log.close()
        barrier(env)
        return best_path if best_path.is_file() else last_path
    finally:
        if env.distributed and dist.is_initialized() and not keep_process_group:
            dist.destroy_process_group()
