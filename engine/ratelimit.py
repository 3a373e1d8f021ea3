"""A per-client limit on generation requests (``--rate-limit N``), shared by the UI and the HTTP API.

A token bucket per client: up to ``per_minute`` requests at once, refilled at ``per_minute`` a
minute. A client is whatever the face identifies it by (the logged-in user, else its address).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from .errors import EngineError


class RateLimited(EngineError):
    """A client sent more generation requests than ``--rate-limit`` allows; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def client_key(username: "str | None", address: "str | None") -> str:
    """Who a request counts against: the logged-in user, else the client's address."""
    return f"user:{username}" if username else f"address:{address or 'unknown'}"


class RateLimiter:
    """``acquire(client)`` takes one request from the client's bucket or raises ``RateLimited``."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1, found {per_minute}")
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def acquire(self, client: str) -> None:
        rate = self.per_minute / 60.0
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(client, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - at) * rate)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise RateLimited(
                    f"too many requests: this server allows {self.per_minute} generation requests a minute "
                    f"per client; try again in {wait:.0f} s", retry_after_s=wait)
            self._buckets[client] = (tokens - 1.0, now)
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled completely (a client idle for a minute): bounded memory."""
        if len(self._buckets) > 1024:
            self._buckets = {c: (t, at) for c, (t, at) in self._buckets.items() if now - at < 60.0}


__all__ = ["RateLimited", "RateLimiter", "client_key"]
