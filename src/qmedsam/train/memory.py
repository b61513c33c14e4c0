"""Peak resident memory of a training run, estimated from its config, and the refusal of a run that cannot fit.

Without it, the seed's stage 1 (batch 4, quantized encoder trained with the fp32 teacher) under
`torchrun --nproc-per-node 2` on a 24 GiB machine ran until the kernel's OOM killer took a rank, ending in a
torchrun traceback. A training step keeps Brevitas's fake-quant activations for autograd, so memory grows
with the batch: ~5 GiB per sample when the encoder is trained, ~0.5 GiB when only the decoder is.

The estimate of one rank's peak RSS is linear:

    peak = RUNTIME + WHOLE_RUN + TEACHER [teacher] + optimizer state of the trained parts + WORKER x num_workers
           + batch_size x ((ENCODER_SAMPLE if train_encoder else DECODER_SAMPLE) + TEACHER_SAMPLE [teacher])

(the activation terms are absent with `max_steps: 0`, which takes no step). The constants are host memory on a
CPU, measured as below; a GPU keeps the activations in device memory, which this does not model. The verdict
compares `peak x ranks on this node` (torchrun's LOCAL_WORLD_SIZE) with what the node can give: `MemAvailable`
from /proc/meminfo, or the cgroup's headroom when lower, plus what the training processes hold already (the
estimate counts it). When neither is readable there is no verdict. `QMEDSAM_SKIP_MEMORY_CHECK=1` skips it.

Measured on this project's 2-core AMD EPYC machine (24 GiB, torch 2.13 CPU, Brevitas 0.13.4): "Maximum resident
set size" of `/usr/bin/time -v` for one-step runs, single process, on the `qmedsam data train` tree:

    OMP_NUM_THREADS=1 QMEDSAM_SKIP_MEMORY_CHECK=1 /usr/bin/time -v qmedsam train --config configs/train/STAGE.yaml \
      --set data_root=TREE out_dir=OUT teacher_cache=EMPTY_DIR max_steps=1 threads=1 num_workers=0 calib_slices=2 \
      val_max_slices=2 val_every_epochs=0 device=cpu batch_size=B        (stages 2, 3: also init_checkpoint=null)

    KiB                          batch 1      batch 2     per sample    intercept
    stage 1                    5,819,872   11,017,100     5,197,228      622,644
    stage 1, teacher=false     5,704,368   10,826,920     5,122,552      581,816
    stage 2 (decoder only)     1,178,320    1,731,592       553,272      625,048
    stage 3 (both trained)     6,141,220   11,565,256     5,424,036      717,184

An earlier whole-run measurement on the same machine (batch 1, 2 threads, one loader worker, 16 calibration
slices, validation each epoch, several steps) peaked higher: stage 1 7.6, stage 2 1.9, stage 3 7.9 million KiB;
WHOLE_RUN covers that difference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from qmedsam.train.config import TrainConfig

GIB = 1024**3
KIB = 1024

SKIP_ENV = "QMEDSAM_SKIP_MEMORY_CHECK"

RUNTIME_GIB = 0.55
"""Interpreter, torch + Brevitas, the fake-quant student, the dataset: the intercepts above less the optimizer
state (0.49 to 0.55 GiB)."""
WHOLE_RUN_GIB = 1.65
"""What a whole run adds to the one-step peak (calibration on 16 slices, validation, 2 threads, allocator growth
over many steps): stage 3's whole-run 7.9 million KiB less its one-step estimate, the largest gap of the three."""
TEACHER_GIB = 0.04
"""The fp32 LiteMedSAM teacher's weights: the stage-1 intercepts with and without the teacher."""
ENCODER_SAMPLE_GIB = 5_349_360 * KIB / GIB
"""Per sample with the encoder trained (fake-quant activations kept for autograd): stage 3's slope less the
teacher's (5.10 GiB; stage 1, whose decoder is float and frozen, needs 4.89)."""
DECODER_SAMPLE_GIB = 553_272 * KIB / GIB
"""Per sample with the encoder frozen (run without autograd): stage 2's slope (0.53 GiB)."""
TEACHER_SAMPLE_GIB = 74_676 * KIB / GIB
"""Per sample with the teacher (its encoder on a cache miss, embedding and mask targets): stage 1's slope with
and without it (0.07 GiB)."""
WORKER_GIB = 0.25
"""One DataLoader worker process, a process of its own (README, `benchmarks/bench_datasets.py`: ~250 MB)."""

ENCODER_PARAMETERS = 5_726_740
DECODER_PARAMETERS = 4_058_340
PROMPT_ENCODER_PARAMETERS = 6_220
OPTIMIZER_BYTES_PER_PARAMETER = 12
"""A trained fp32 parameter's gradient, SGD momentum buffer and DDP's gradient bucket copy."""


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's estimated peak RSS: `fixed + per_sample x batch_size` bytes."""

    fixed: int
    per_sample: int
    batch_size: int

    @property
    def peak(self) -> int:
        return self.fixed + self.per_sample * self.batch_size

    def largest_batch(self, per_rank: float) -> int:
        """The largest batch size whose peak fits in `per_rank` bytes (0: not even one sample)."""
        if self.per_sample == 0:
            return self.batch_size if self.fixed <= per_rank else 0
        return max(0, math.floor((per_rank - self.fixed) / self.per_sample))


def estimate(config: TrainConfig) -> MemoryEstimate:
    """One rank's peak resident memory for `config`, from the linear model of this module's docstring."""
    trained = (
        ENCODER_PARAMETERS * config.train_encoder
        + DECODER_PARAMETERS * config.train_decoder
        + PROMPT_ENCODER_PARAMETERS * config.train_prompt_encoder
    )
    fixed_gib = RUNTIME_GIB + WHOLE_RUN_GIB + TEACHER_GIB * config.teacher + WORKER_GIB * config.num_workers
    fixed = fixed_gib * GIB + trained * OPTIMIZER_BYTES_PER_PARAMETER
    activations = ENCODER_SAMPLE_GIB if config.train_encoder else DECODER_SAMPLE_GIB
    per_sample = activations + TEACHER_SAMPLE_GIB * config.teacher
    if config.max_steps == 0:  # no step, no activations
        per_sample = 0.0
    return MemoryEstimate(fixed=round(fixed), per_sample=round(per_sample * GIB), batch_size=config.batch_size)


@dataclass(frozen=True)
class Available:
    """Bytes this node can give a new run, and where the figure comes from."""

    bytes: int
    source: str


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_headroom(cgroup: Path) -> tuple[int, str] | None:
    """limit - usage + reclaimable page cache, for cgroup v2 (memory.max) or v1 (memory/memory.limit_in_bytes)."""
    for limit_file, usage_file, stat_file, cache_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        if limit is None or usage is None or limit >= 1 << 60:  # v1 writes "no limit" as ~2^63
            continue
        cache = 0
        with contextlib.suppress(OSError):
            for line in (cgroup / stat_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key and value.strip().isdigit():
                    cache = int(value)
        return max(0, limit - usage + cache), f"cgroup limit {cgroup / limit_file}"
    return None


def resident_bytes(status: Path = Path("/proc/self/status")) -> int:
    """This process's current RSS (0 when unreadable): already held, so part of what the run can use."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> Available | None:
    """What this node can give now: MemAvailable, or the cgroup's headroom when lower; None when neither is
    readable."""
    found = []
    free = _meminfo_available(meminfo)
    if free is not None:
        found.append((free, f"MemAvailable in {meminfo}"))
    headroom = _cgroup_headroom(cgroup)
    if headroom is not None:
        found.append(headroom)
    if not found:
        return None
    amount, source = min(found)
    return Available(amount, source)


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def refusal_message(config: TrainConfig, ranks: int, available: Available) -> str | None:
    """Why `config` cannot run with `ranks` processes on a node that can give `available`, and each knob that
    alone would make it fit; None when it fits."""
    ranks = max(1, ranks)
    need = estimate(config)
    if need.peak * ranks <= available.bytes:
        return None

    def fits(changed: TrainConfig, processes: int = ranks) -> bool:
        return estimate(changed).peak * processes <= available.bytes

    knobs = []
    largest = need.largest_batch(available.bytes / ranks)
    if largest >= 1:
        knobs.append(f"--set batch_size={largest} (the largest that fits)")
    processes = math.floor(available.bytes / need.peak)
    if 1 <= processes < ranks:
        knobs.append(f"fewer processes per node (torchrun --nproc-per-node {processes})")
    if config.train_encoder:
        decoder_only = dataclasses.replace(config, train_encoder=False, train_decoder=True)
        if fits(decoder_only):
            knobs.append("train the decoder only (--set train_encoder=false train_decoder=true, a different stage)")
    if config.num_workers and fits(dataclasses.replace(config, num_workers=0)):
        knobs.append("--set num_workers=0 (no DataLoader worker processes)")
    activations = "encoder trained" if config.train_encoder else "decoder only"
    teacher = ", with the teacher" if config.teacher else ""
    plural = "es" if ranks > 1 else ""
    return (
        f"not enough memory for this run: an estimated {_gib(need.peak)} peak per process ({_gib(need.fixed)} for "
        f"runtime, models and optimizer + batch_size {config.batch_size} x {_gib(need.per_sample)} of activations, "
        f"{activations}{teacher}) x {ranks} process{plural} on this node = {_gib(need.peak * ranks)}, but "
        f"{_gib(available.bytes)} is available ({available.source}). To fit: "
        f"{'; or '.join(knobs) or 'fewer processes per node, or a machine with more memory'}. "
        f"To run anyway (the kernel may kill it), set {SKIP_ENV}=1."
    )


def refusal(config: TrainConfig, ranks_on_node: int = 1) -> str | None:
    """This node's verdict on `config`: the refusal message, or None when it fits, the check is skipped
    (QMEDSAM_SKIP_MEMORY_CHECK=1) or the available memory is unknown."""
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return None
    available = available_memory()
    if available is None:
        return None
    held = resident_bytes() * max(1, ranks_on_node)  # each rank on the node holds about as much as this one
    source = f"{available.source}, plus {_gib(held)} the training processes hold already"
    return refusal_message(config, ranks_on_node, Available(available.bytes + held, source))
