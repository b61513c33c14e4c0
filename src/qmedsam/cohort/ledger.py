"""`OUT/ledger.jsonl`: what a cohort run did, one JSON line per event, appended under a lock (`files.append_line`).

A case's line `{"id", "status": "started"}` is written before its outputs, and `"ok"` or `"error"` (with seconds,
the input hash, the model, the output files, the message) after them; the last line of an id is its state. So a
rerun knows which outputs it made itself (a case whose last line is "started" was cut off mid-way: it is redone,
its files replaced) and refuses to replace a file no line accounts for. Several shards may share one ledger.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from qmedsam.files import append_line

LEDGER_NAME = "ledger.jsonl"
STATUSES = ("started", "ok", "error")

log = logging.getLogger(__name__)


class Ledger:
    """The append-only record of a cohort output folder."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LEDGER_NAME

    def latest(self) -> dict[str, dict]:
        """The last well-formed line of every id. A torn line (a kill mid-append) or a foreign one is skipped
        with a warning; it never stops a rerun."""
        if not self.path.is_file():
            return {}
        state: dict[str, dict] = {}
        with self.path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    entry = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    log.warning("%s line %d: not a JSON line (cut off by a kill?); skipped", self.path, number)
                    continue
                if (
                    not isinstance(entry, dict)
                    or not isinstance(entry.get("id"), str)
                    or entry.get("status") not in STATUSES
                ):
                    log.warning("%s line %d: not a ledger entry; skipped", self.path, number)
                    continue
                state[entry["id"]] = entry
        return state

    def append(self, entry: dict) -> None:
        """One event, stamped with the time (UTC, ISO 8601)."""
        stamped = {**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        append_line(self.path, json.dumps(stamped, sort_keys=False, separators=(",", ":")))
