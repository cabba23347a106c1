"""Limits: sessions per tenant, state bytes per session and per server, concurrent steps."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lossd.losses import MemoryBankModule, registry

from .errors import InvalidArgument, ResourceExhausted

MIB = 1024 * 1024


@dataclass
class Limits:
    """What one server accepts. The defaults suit one GPU box with tens of GB of memory."""

    max_sessions_per_tenant: int = 1000
    max_session_state_bytes: int = 8 * 1024 * MIB
    max_state_bytes: int = 32 * 1024 * MIB
    max_concurrent_steps: int = 4
    max_queued_steps: int = 64


def estimate_state_bytes(spec: registry.LossSpec, config: dict[str, Any]) -> int:
    """The state a new session of `spec` with `config` will hold, without allocating it.

    The module is built on the meta device; a bank whose feature dim comes from the first
    batch counts one float per row (its lower bound).
    """
    try:
        with torch.device("meta"):
            module = spec.cls(**config)
    except (ValueError, TypeError) as error:
        raise InvalidArgument(str(error)) from None
    total = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    for sub in module.modules():
        if isinstance(sub, MemoryBankModule) and sub.enabled and sub.bank is None:
            total += sub.size[0] * 4
    return total


class Admission:
    """At most `concurrent` steps compute at once; at most `queued` wait for a turn, the
    next one is refused with RESOURCE_EXHAUSTED."""

    def __init__(self, concurrent: int, queued: int) -> None:
        self._slots = threading.Semaphore(concurrent)
        self._queued = queued
        self._waiting = 0
        self._running = 0
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self._waiting >= self._queued:
                raise ResourceExhausted(f"server busy: {self._waiting} steps already wait for a "
                                        "turn; retry later")
            self._waiting += 1
        try:
            self._slots.acquire()
        finally:
            with self._lock:
                self._waiting -= 1
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
            self._slots.release()
