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

Before anything is built, a run refuses what it cannot finish: a `--resume` file that is not a run checkpoint
(e.g. a stage's `init.pt`), and a config whose estimated peak memory does not fit this machine
(`qmedsam.train.memory`), instead of being killed by the kernel mid-step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from qmedsam.errors import UserFacingError
from qmedsam.files import atomic_write
from qmedsam.model.weights import pretrained_weights_path
from qmedsam.train import memory
from qmedsam.train.config import TrainConfig
from qmedsam.train.losses import qmedsam_loss
from qmedsam.train.progress import RunLog
from qmedsam.train.validate import ValidationSet

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "qmedsam-train-checkpoint-v1"
RUN_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "run", "config", "rng")
"""What `--resume` needs beyond the format tag; a stage's init.pt has `model` (and `init`) only."""


class TrainingError(UserFacingError):
    """A run that cannot continue or start (non-finite loss, unusable checkpoint, not enough memory); the message
    says what to do."""


# --------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    """Ranks on this node: they share its memory."""

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
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )
    except ValueError as exc:
        raise UserFacingError(
            f"RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE must be integers ({exc}); launch with torchrun"
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


def read_torch_file(path: Path) -> Any:
    if not path.is_file():
        raise TrainingError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise TrainingError(f"{path}: not a readable checkpoint ({exc})") from None


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    state = read_torch_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a qmedsam training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _holds_weights_only(state: Any) -> bool:
    """A plain state dict of tensors, or a dict holding one under `model` (what `init_checkpoint` takes)."""
    weights = state.get("model", state) if isinstance(state, dict) else None
    return isinstance(weights, dict) and bool(weights) and all(isinstance(v, torch.Tensor) for v in weights.values())


def load_resume_checkpoint(path: Path) -> dict:
    """The run checkpoint `--resume` continues from, checked before anything is built: a stage's starting model
    (init.pt) or a weights file would otherwise fail deep in the set-up (KeyError 'optimizer')."""
    path = Path(path)
    state = read_torch_file(path)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        missing = [key for key in RUN_CHECKPOINT_KEYS if key not in state]
        fields = sorted(f.name for f in dataclasses.fields(RunState))
        run = state.get("run")
        if not missing and isinstance(run, dict) and sorted(run) == fields:
            return state
        restart = f"start a new run from these weights with --set init_checkpoint={path}"
        if "init" in state:
            last = path.parent / "last.pt"
            instead = (
                f"resume from {last}"
                if last.is_file()
                else f"there is no {last} yet (the run stopped before its first checkpoint): start it again without "
                "--resume"
            )
            raise TrainingError(
                f"{path} is a stage's starting model (init.pt), not a run checkpoint: {instead}, or {restart}"
            )
        lacks = f"missing {missing}" if missing else f"its 'run' is not {{{', '.join(fields)}}}"
        raise TrainingError(
            f"{path}: a qmedsam training checkpoint without the run state --resume needs ({lacks}): resume from "
            f"the run's last.pt, or {restart}"
        )
    if _holds_weights_only(state):
        raise TrainingError(
            f"{path} holds model weights (a state dict), not a run checkpoint (format {CHECKPOINT_FORMAT} with "
            f"optimizer, scheduler and RNG state): --resume continues a run from its last.pt; to train from these "
            f"weights, start a new run with --set init_checkpoint={path}"
        )
    raise TrainingError(
        f"{path}: not a qmedsam run checkpoint (format {CHECKPOINT_FORMAT}); --resume takes a run's last.pt or best.pt"
    )


# --------------------------------------------------------------------------------------------------
# Model


def quant_spec_for(config: TrainConfig):
    from qmedsam.model.quant import QuantSpec

    spec = QuantSpec.from_yaml(config.quant_spec) if config.quant_spec else QuantSpec()
    return dataclasses.replace(spec, image_encoder=config.quantize_encoder, mask_decoder=config.quantize_decoder)


def load_student(spec, source: Path) -> tuple[nn.Module, bool, list[str]]:
    """(quantized model with the weights of `source`, whether they were float, the parts whose quantizers the
    weights do not carry and so need calibrating)."""
    from qmedsam.model import quant
    from qmedsam.model.litemedsam import load_state_dict_file

    state = load_state_dict_file(source)
    model = quant.build_quantized(spec if spec.enabled else None)
    if not quant.is_quantized_state_dict(state):
        quant.load_float_state_dict(model, state, str(source))
        parts = [p for p, on in (("image_encoder", spec.image_encoder), ("mask_decoder", spec.mask_decoder)) if on]
        return model, True, parts
    state = quant.without_float_layer_quantizers(state, spec.float_layers)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not quant.is_quantizer_key(k)]
    if missing or result.unexpected_keys:
        raise TrainingError(
            f"{source}: weights do not fit this stage's model (missing {missing[:4]}, unexpected "
            f"{result.unexpected_keys[:4]}); check quantize_encoder / quantize_decoder against the previous stage"
        )
    return model, False, sorted({k.split(".")[0] for k in result.missing_keys})


def reconstruct_student(
    model: nn.Module,
    config: TrainConfig,
    float_weights: Path | None,
    calibrated_parts: list[str],
    calibration_batches,
    decoder_samples=(),
) -> dict[str, Any]:
    """Train the freshly quantized parts to reproduce the float model, where the config asks: the encoder block
    by block on the calibration slices (only when it was just calibrated), the decoder end to end on
    `decoder_samples`. `float_weights`: the float model's file (None: the pretrained weights)."""
    from qmedsam.model.litemedsam import load_pretrained_litemedsam
    from qmedsam.train import reconstruct

    encoder_now = config.reconstruct_encoder and "image_encoder" in calibrated_parts
    decoder_now = config.reconstruct_decoder and config.quantize_decoder
    summary: dict[str, Any] = {}
    if not (encoder_now or decoder_now):
        return summary
    float_model = load_pretrained_litemedsam(float_weights)
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
    return summary


def build_student(config: TrainConfig, calibration_batches, decoder_samples=()) -> tuple[nn.Module, dict]:
    """The stage's starting model: `init_checkpoint` (float or quantized, e.g. the previous stage's) or the
    pretrained weights; parts whose quantizers the weights do not carry are calibrated on real slices, then
    reconstructed against the float model if the config asks (encoder block by block on the calibration
    slices, decoder end to end on `decoder_samples`)."""
    from qmedsam.model.calibrate import calibrate

    source = Path(config.init_checkpoint) if config.init_checkpoint else pretrained_weights_path()
    model, from_float, parts = load_student(quant_spec_for(config), source)
    summary: dict[str, Any] = {"init": str(source), "calibrated_parts": parts}
    if parts:
        summary |= calibrate(model, calibration_batches, parts=parts)
    float_weights = source if from_float else None
    summary |= reconstruct_student(model, config, float_weights, parts, calibration_batches, decoder_samples)
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


def check_data_root(root: str | Path) -> Path:
    """The training tree's folder, or an error naming it and how to build one (was a traceback)."""
    path = Path(root)
    if not path.is_dir():
        raise UserFacingError(
            f"data_root {path}: no such folder; build the training tree with `qmedsam data train --out {path}` "
            "or point --set data_root=DIR at one"
        )
    return path


def make_dataset(config: TrainConfig):
    from qmedsam.datasets.modality import GatherModalityDataset

    check_data_root(config.data_root)
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


class Trainer:
    """One stage's run, in the seed's order: `run()` = refuse what cannot finish, `set_up()` (dataset, starting
    model or resumed state, optimizer, DDP, teacher), then per epoch `step(batch)` for each batch and
    `end_of_epoch()`; returns the best (or last) checkpoint of rank 0.

    Under torchrun the process group is created by `run()`; it is destroyed at the end unless
    `keep_process_group` (a chain of stages keeps one group: re-creating it on torchrun's store can hang).
    """

    # set by set_up()
    dataset: Any
    model: nn.Module
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    teacher: Any
    validation: ValidationSet | None
    run_log: RunLog
    sampler: DistributedSampler

    def __init__(self, config: TrainConfig, resume: Path | None = None, keep_process_group: bool = False) -> None:
        self.config = config
        self.keep_process_group = keep_process_group
        self.env = dist_env()
        # Checked first: a wrong --resume file is refused before any process group, dataset or model exists.
        self.resume_state = load_resume_checkpoint(resume) if resume is not None else None
        self.device = pick_device(config.device, self.env)
        self.out_dir = Path(config.out_dir)
        self.best_path = self.out_dir / "best.pt"
        self.last_path = self.out_dir / "last.pt"
        self.state = RunState()

    # --- set-up ---------------------------------------------------------------------------------------

    def refuse_what_cannot_fit(self) -> None:
        """Refuse a config whose estimated peak memory exceeds what this node can give (`qmedsam.train.memory`),
        before anything is built. The ranks agree on one verdict, so all of them refuse or none does. On a GPU
        the activations live in device memory, which the estimate (host RSS, measured on CPU) does not model."""
        if self.device.type != "cpu":
            return
        refusal = memory.refusal(self.config, self.env.local_world_size)
        if self.env.distributed:
            verdicts: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(verdicts, refusal)
            refusal = next((verdict for verdict in verdicts if verdict), None)
        if refusal:
            raise TrainingError(refusal)

    def set_up(self) -> None:
        """Dataset, model (the starting model or the resumed state), optimizer and schedule, DDP, teacher,
        validation, log and sampler: the order fixes the RNG consumption that an exact resume relies on."""
        config, env = self.config, self.env
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.dataset = make_dataset(config)
        start_state = self.starting_state()
        from qmedsam.model import quant

        spec = quant_spec_for(config)
        self.model = quant.build_quantized(spec if spec.enabled else None)
        self.model.load_state_dict(start_state["model"], strict=True)
        self.model.to(self.device)
        params = set_trainable(self.model, config)
        self.optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: lr_factor(e, config))
        if self.resume_state is not None:
            self.restore(self.resume_state)
        self.step_module = self.wrap_for_ranks(StudentStep(self.model, config.train_encoder))
        self.teacher = self.make_teacher()
        self.validation = ValidationSet(config) if env.is_main and config.val_every_epochs else None
        self.run_log = RunLog(self.out_dir, enabled=env.is_main)
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=config.seed, drop_last=True
        )

    def starting_state(self) -> dict:
        """The resumed checkpoint, or the stage's starting model: rank 0 builds (and calibrates) it once into
        init.pt, and every rank loads the same bytes."""
        if self.resume_state is not None:
            return self.resume_state
        init_path = self.out_dir / "init.pt"
        if self.env.is_main:
            self.write_starting_model(init_path)
        barrier(self.env)
        return load_checkpoint(init_path)

    def write_starting_model(self, init_path: Path) -> None:
        """Rank 0: calibration slices (evenly spread) and the decoder's distillation samples (seeded draw) from
        epoch 0 of the dataset, `build_student`, then init.pt."""
        config, dataset = self.config, self.dataset
        dataset.set_epoch(0)
        calib = [dataset[i] for i in np.linspace(0, len(dataset) - 1, config.calib_slices).astype(int)]
        batches = [(s.image[None], s.box[None]) for s in calib]
        decoder_samples = []
        if config.reconstruct_decoder:
            count = min(config.reconstruct_decoder_samples, len(dataset))
            picks = np.random.default_rng(config.seed).choice(len(dataset), count, replace=False)
            decoder_samples = [(s.image[None], s.box[None]) for s in (dataset[int(i)] for i in picks)]
        model, summary = build_student(config, batches, decoder_samples)
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "init": summary}, init_path)
        log.info("starting model: %s", summary)

    def restore(self, resume_state: dict) -> None:
        """Optimizer, schedule, position and RNG of the resumed run (after the model is built: building it
        draws from the RNG)."""
        self.optimizer.load_state_dict(resume_state["optimizer"])
        self.scheduler.load_state_dict(resume_state["scheduler"])
        self.state = RunState(**resume_state["run"])
        torch.set_rng_state(resume_state["rng"]["torch"])
        saved = dict(resume_state["config"], max_steps=self.config.max_steps)
        if saved != _config_dict(self.config):
            log.warning("resuming with a config that differs from the checkpoint's (beyond max_steps)")

    def wrap_for_ranks(self, step_module: nn.Module) -> nn.Module:
        if not self.env.distributed:
            return step_module
        # find_unused_parameters: the decoder's IoU head is not in the loss.
        return DistributedDataParallel(
            step_module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    def make_teacher(self):
        if not self.config.teacher:
            return None
        from qmedsam.train.teacher import Teacher

        config = self.config
        cache = Path(config.teacher_cache) if config.teacher_cache else Path(config.data_root) / ".teacher-cache"
        return Teacher(cache, device=self.device)

    # --- checkpoints, steps, epochs -----------------------------------------------------------------------

    def checkpoint(self, path: Path) -> None:
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "run": dataclasses.asdict(self.state),
                "config": _config_dict(self.config),
                "sampler": {"seed": self.config.seed, "world_size": self.env.world_size, "drop_last": True},
                "rng": _rng_state(),
            },
            path,
        )

    def at_step_limit(self) -> bool:
        return self.config.max_steps is not None and self.state.step >= self.config.max_steps

    def step(self, batch) -> bool:
        """One optimizer step on `batch` (teacher targets, loss averaged over the ranks, stop on a non-finite
        loss before the update), logged and periodically checkpointed; True once `max_steps` is reached."""
        config, env, state, device = self.config, self.env, self.state, self.device
        images = batch.image.to(device)
        boxes = batch.box.to(device)
        logits, embedding = self.step_module(images, boxes)
        teacher_embedding = teacher_logits = None
        if self.teacher is not None:
            teacher_embedding = self.teacher.embed(batch.image, list(batch.key), batch.flips)
            teacher_logits = self.teacher.decode(teacher_embedding, boxes)
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
                f"stopped before the optimizer step; {self.last_path} holds the last good state "
                "(lower lr, or resume from it)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        self.optimizer.step()
        state.step += 1
        state.batch_in_epoch += 1
        lr = self.optimizer.param_groups[0]["lr"]
        self.run_log.step(state, float(loss_value), len(batch.key) * env.world_size, lr)
        at_limit = self.at_step_limit()
        if env.is_main and (state.step % config.checkpoint_every_steps == 0 or at_limit):
            self.checkpoint(self.last_path)
        return at_limit

    def train_epoch(self) -> bool:
        """This rank's remaining batches of the current epoch (all of them unless resumed mid-epoch), then
        `end_of_epoch` if the epoch completed; True once `max_steps` is reached."""
        config, state = self.config, self.state
        self.dataset.set_epoch(state.epoch)
        self.sampler.set_epoch(state.epoch)
        epoch_batches = len(self.sampler) // config.batch_size
        batches = _batch_indices(self.sampler, state.batch_in_epoch, config.batch_size)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=config.num_workers)
        set_modes(self.model, config, training=True)
        epoch_start = time.perf_counter()
        self.run_log.start_epoch(state.epoch, epoch_batches, state.batch_in_epoch)
        done = False
        for batch in loader:
            if self.step(batch):
                done = True
                break
        if state.batch_in_epoch >= epoch_batches:  # the epoch is complete (not cut short by max_steps)
            self.end_of_epoch(epoch_start)
        return done

    def end_of_epoch(self, epoch_start: float) -> None:
        """Next epoch's learning rate, validation (best.pt on a better DSC), the ranks' digests, last.pt."""
        config, state = self.config, self.state
        state.epoch += 1
        state.batch_in_epoch = 0
        self.scheduler.step()
        metrics: dict[str, Any] = {"epoch_seconds": time.perf_counter() - epoch_start}
        if self.validation is not None and state.epoch % config.val_every_epochs == 0:
            set_modes(self.model, config, training=False)
            metrics |= self.validation.score(self.model)
            if metrics["dsc"] > state.best_dsc:
                state.best_dsc = metrics["dsc"]
                self.checkpoint(self.best_path)
        metrics["rank_digests"] = check_ranks_in_sync(self.model, self.env)
        if self.env.is_main:
            self.checkpoint(self.last_path)
        self.run_log.end_epoch(state, metrics)

    # --- the whole stage ------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Set up, train until the epochs or `max_steps` run out, check the ranks agree; the best checkpoint
        (or, without validation, the last)."""
        config, env = self.config, self.env
        if config.threads:
            torch.set_num_threads(config.threads)
        if env.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        try:
            self.refuse_what_cannot_fit()
            self.set_up()
            done = self.at_step_limit()
            if done and env.is_main:  # max_steps 0: the starting model is the result
                self.checkpoint(self.last_path)
            while self.state.epoch < config.epochs and not done:
                done = self.train_epoch()
                barrier(env)
            sync = check_ranks_in_sync(self.model, env)
            self.run_log.record({"type": "sync", "step": self.state.step, "rank_digests": sync})
            self.run_log.close()
            barrier(env)
            return self.best_path if self.best_path.is_file() else self.last_path
        finally:
            if env.distributed and dist.is_initialized() and not self.keep_process_group:
                dist.destroy_process_group()


def train(config: TrainConfig, resume: Path | None = None, keep_process_group: bool = False) -> Path:
    """Run one stage (`Trainer`); returns the best (or, without validation, the last) checkpoint of rank 0."""
    return Trainer(config, resume, keep_process_group).run()
