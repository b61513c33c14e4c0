"""Samples/s of the training dataset alone (index building excluded) and the memory of a DataLoader worker.

Rows: direct `__getitem__` in this process (with glibc's default allocator settings, then after
`tune_allocator()`), then a DataLoader (batch_size, default 1) with 0, 1, 2 workers; workers tune their
allocator themselves, the 0-worker row runs after the main process was tuned. Each row is the best of
--repeats rounds (the machine is shared); a loader round is timed from its first batch (start-up printed
apart). RSS is read from /proc/<pid>/status of each worker (VmRSS; RssAnon is private memory, RssFile the
shared, memory-mapped slice cache) near the end of the round; for 0 workers, of this process.

    python benchmarks/bench_datasets.py --root /tmp/sdk_demo/train [--samples 1000] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from qmedsam.inference.machine import cpu_name


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS / RssAnon / RssFile of a process in MB (Linux)."""
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[name] = int(value.split()[0]) / 1024
    return out


def bench_direct(dataset, n: int, seed: int) -> float:
    order = np.random.default_rng(seed).integers(0, len(dataset), size=n)
    for i in order[: n // 10]:  # warm-up: first page faults of the memory maps and the heap
        dataset[int(i)]
    start = time.perf_counter()
    for i in order:
        dataset[int(i)]
    return n / (time.perf_counter() - start)


def bench_loader(dataset, n: int, workers: int, batch_size: int, seed: int) -> tuple[float, float, list[dict]]:
    """-> (samples/s after the first batch, seconds to the first batch, per-worker /proc status)."""
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=n + batch_size, generator=torch.Generator().manual_seed(seed)
    )
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
    begin = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - begin
    start = time.perf_counter()
    done = 0
    statuses: list[dict] = []
    for batch in iterator:
        done += len(batch.key)
        if done >= n - batch_size and not statuses:
            pids = [w.pid for w in getattr(iterator, "_workers", [])] or [os.getpid()]
            statuses = [proc_status(pid) for pid in pids]
    rate = done / (time.perf_counter() - start)
    del iterator
    return rate, first, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="training tree ROOT (ROOT/<Modality>/...)")
    parser.add_argument("--samples", type=int, default=1000, help="samples timed per row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--split", default="all", help="manifest split ('all' = every file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, help="index/array cache base (default: beside the data)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per row; the best is printed")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads of this process (workers use 1); 2 on a shared 2-core machine made the "
        "0-worker collate 10x slower whenever another process held a core",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    from qmedsam.datasets.modality import GatherModalityDataset, tune_allocator

    def build() -> tuple[GatherModalityDataset, float]:
        start = time.perf_counter()
        dataset = GatherModalityDataset(
            args.root, mod_sample=None, split=args.split, seed=args.seed, cache_dir=args.cache_dir
        )
        return dataset, time.perf_counter() - start

    dataset, built = build()
    dataset, reused = build()
    indexed = sum(d.index_stats["indexed"] for d in dataset.datasets)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores), torch threads {torch.get_num_threads()}")
    print(f"tree: {args.root}  {dataset!r}")
    print(
        f"index: first construction {built:.2f} s, reused {reused:.3f} s; {len(dataset.skipped)} file(s) skipped, "
        f"{indexed} re-indexed on reuse"
    )
    print(f"timed: {args.samples} random samples per round, best of {args.repeats}, batch_size {args.batch_size}")
    print()
    print(f"{'reader':<24}{'samples/s':>10}{'start s':>9}{'RSS MB':>9}{'anon MB':>9}{'file MB':>9}")
    for tuned in (False, True):
        if tuned:
            tune_allocator()
        rate = max(bench_direct(dataset, args.samples, args.seed + r) for r in range(args.repeats))
        own = proc_status(os.getpid())
        row = f"{own['VmRSS']:>9.0f}{own['RssAnon']:>9.0f}{own['RssFile']:>9.0f}"
        label = "direct, tuned" if tuned else "direct, glibc default"
        print(f"{label:<24}{rate:>10.0f}{'-':>9}{row}")
    for workers in args.workers:
        rounds = [
            bench_loader(dataset, args.samples, workers, args.batch_size, args.seed + r) for r in range(args.repeats)
        ]
        rate, first, statuses = max(rounds, key=lambda r: r[0])
        rss = max(s["VmRSS"] for s in statuses)
        anon = max(s["RssAnon"] for s in statuses)
        file_mb = max(s["RssFile"] for s in statuses)
        label = f"DataLoader {workers} worker" + ("s" if workers != 1 else "")
        print(f"{label:<24}{rate:>10.0f}{first:>9.2f}{rss:>9.0f}{anon:>9.0f}{file_mb:>9.0f}")


if __name__ == "__main__":
    main()
