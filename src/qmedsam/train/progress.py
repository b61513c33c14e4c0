"""What a run reports (rank 0 only): a progress bar, `metrics.jsonl` and a loss / DSC curve PNG.

`metrics.jsonl` gets one line per optimizer step (`type: step`: epoch, step, loss, lr, samples/s) and one
per finished epoch (`type: epoch`: validation DSC / NSD, seconds). A resumed run appends to the same
file; steps replayed after a resume appear again, and the last line for a step is the one that counts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from qmedsam.files import atomic_write

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> tuple[dict[int, dict], list[dict]]:
    """(last `step` record per step, `epoch` records in order) from a metrics.jsonl."""
    steps: dict[int, dict] = {}
    epochs: list[dict] = []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "step":
            steps[int(record["step"])] = record
        elif record.get("type") == "epoch":
            epochs.append(record)
    return steps, epochs


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.bar = None
        self._last = time.perf_counter()
        self._handle = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115 (kept open for the run)

    def record(self, record: dict[str, Any]) -> None:
        """Any other record (e.g. the ranks' parameter digests at the end of a run)."""
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()

    def start_epoch(self, epoch: int, total_batches: int, done_batches: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total_batches, initial=done_batches, desc=f"epoch {epoch}", unit="batch", leave=True)
        self._last = time.perf_counter()

    def step(self, state, loss: float, samples: int, lr: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = samples / max(now - self._last, 1e-9)
        self._last = now
        self._write(
            {"type": "step", "epoch": state.epoch, "step": state.step, "loss": loss, "lr": lr, "samples_per_s": rate}
        )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.2f}")
            self.bar.update(1)

    def end_epoch(self, state, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._write({"type": "epoch", "epoch": state.epoch, "step": state.step, **metrics})
        if "dsc" in metrics:
            log.info("epoch %d: validation DSC %.4f NSD %.4f", state.epoch, metrics["dsc"], metrics["nsd"])
        self.plot()

    def plot(self) -> None:
        """loss per step and validation DSC per epoch -> `curves.png` (skipped without matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.info("matplotlib not installed: no curves.png (pip install qmedsam[report])")
            return
        steps, epochs = read_metrics(self.path)
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        order = sorted(steps)
        left.plot(order, [steps[s]["loss"] for s in order], linewidth=0.8)
        left.set_xlabel("step")
        left.set_ylabel("training loss")
        scored = [e for e in epochs if "dsc" in e]
        right.plot([e["epoch"] for e in scored], [e["dsc"] for e in scored], marker="o", label="DSC")
        right.plot([e["epoch"] for e in scored], [e["nsd"] for e in scored], marker="s", label="NSD")
        right.set_xlabel("epoch")
        right.set_ylabel("validation")
        right.legend()
        fig.tight_layout()
        atomic_write(self.out_dir / "curves.png", lambda handle: fig.savefig(handle, format="png", dpi=100))
        plt.close(fig)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
