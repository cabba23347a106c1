"""Limits: sessions per tenant, state bytes per session and per server, concurrent steps."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lossd.losses import MemoryBankModule, registry

from .errors import InvalidArgument, ResourceExhausted

MIB = 1024 * 1024
T = TypeVar("T")


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
    """Runs steps on a few long-lived compute threads: at most `concurrent` at once, at most
    `queued` waiting for a turn (the next one is refused with RESOURCE_EXHAUSTED).

    Why threads of their own: torch's intra-op parallelism keeps a team of helper threads
    per calling thread. Computing on gRPC's many worker threads would spread steps over
    many such teams, which then compete for the cores; a few compute threads, the most
    recently used one first, keep one team warm.
    """

    def __init__(self, concurrent: int, queued: int) -> None:
        self._slots = threading.Semaphore(concurrent)
        self._queued = queued
        self._waiting = 0
        self._size = concurrent
        self._idle: list[_ComputeThread] = [_ComputeThread() for _ in range(concurrent)]
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._size - len(self._idle)

    def run(self, fn: Callable[[], T]) -> T:
        """fn() on a compute thread, once one is free; its result or its exception."""
        with self._lock:
            if self._waiting >= self._queued:
                raise ResourceExhausted(
                    f"server busy: {self._waiting} steps already wait for a turn; retry later"
                )
            self._waiting += 1
        try:
            self._slots.acquire()
        finally:
            with self._lock:
                self._waiting -= 1
        with self._lock:
            worker = self._idle.pop()  # the most recently used: its helper threads are warm
        try:
            return worker.call(fn)
        finally:
            with self._lock:
                self._idle.append(worker)
            self._slots.release()


class _ComputeThread:
    """A daemon thread that runs one function at a time for its callers."""

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="lossd-compute", daemon=True).start()

    def call(self, fn: Callable[[], T]) -> T:
        done: Future[T] = Future()
        self._inbox.put((fn, done))
        return done.result()

    def _loop(self) -> None:
        while True:
            fn, done = self._inbox.get()
            try:
                done.set_result(fn())
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                done.set_exception(error)
