"""Claimed sessions: a bounded pool of leases, each with its own lock, reaped when idle or silent.

The protocol's two clocks: the idle timeout counts from the last real action (an image, an interaction, ...;
heartbeats do not postpone it), the liveness timeout from the last request of any kind (the client heartbeats
every few seconds, so a crashed client's session is freed soon). A request for a lease that is gone is answered
410, a claim beyond `max_sessions` 503, a release of an unknown lease succeeds (it is gone either way).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qmedsam.serve.session import InteractiveSession

log = logging.getLogger(__name__)


class LeaseGone(LookupError):
    """HTTP 410: the lease expired, was released, or never existed (e.g. a server restart)."""


class AtCapacity(RuntimeError):
    """HTTP 503: every session slot is taken."""


@dataclass
class Lease:
    token: str
    session: InteractiveSession
    last_action: float
    last_seen: float
    lock: threading.Lock = field(default_factory=threading.Lock)


class LeasePool:
    def __init__(
        self,
        new_session: Callable[[str], InteractiveSession],
        max_sessions: int,
        idle_timeout: float,
        liveness_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.new_session = new_session
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.liveness_timeout = liveness_timeout
        self.clock = clock
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def claim(self) -> Lease:
        self.reap()
        with self._lock:
            if len(self._leases) >= self.max_sessions:
                raise AtCapacity(
                    f"all {self.max_sessions} sessions are in use (qmedsam serve --max-sessions); try again later"
                )
            token = secrets.token_urlsafe(24)
            now = self.clock()
            lease = Lease(token, self.new_session(f"session {token[:6]}"), now, now)
            self._leases[token] = lease
        log.info("claimed %s (%d of %d in use)", lease.session.name, len(self), self.max_sessions)
        return lease

    def get(self, token: str | None, action: bool) -> Lease:
        """The live lease for `token`; `action` (a real user action) also resets its idle clock."""
        now = self.clock()
        with self._lock:
            lease = self._leases.get(token or "")
            if lease is None or self._expired(lease, now):
                if lease is not None:
                    self._drop(lease, "expired")
                raise LeaseGone("lease expired or unknown: claim a new session")
            lease.last_seen = now
            if action:
                lease.last_action = now
            return lease

    def remaining(self, lease: Lease) -> float:
        return max(0.0, self.idle_timeout - (self.clock() - lease.last_action))

    def release(self, token: str | None) -> bool:
        with self._lock:
            lease = self._leases.get(token or "")
            if lease is None:
                return False
            self._drop(lease, "released")
            return True

    def reap(self) -> int:
        now = self.clock()
        with self._lock:
            gone = [lease for lease in self._leases.values() if self._expired(lease, now)]
            for lease in gone:
                self._drop(lease, "reaped (idle or no heartbeat)")
            return len(gone)

    def _expired(self, lease: Lease, now: float) -> bool:
        return now - lease.last_action > self.idle_timeout or now - lease.last_seen > self.liveness_timeout

    def _drop(self, lease: Lease, why: str) -> None:
        self._leases.pop(lease.token, None)
        log.info("%s %s", lease.session.name, why)
