"""Exactly-once steps: the answers of a session's recent requests, by request id."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Entry:
    done: threading.Event = field(default_factory=threading.Event)
    reply: Any = None
    failed: bool = False


class ReplyCache:
    """Runs each request id once; a retry gets the first answer.

    A retry that arrives while the first attempt still runs waits for it. A failed
    attempt is forgotten (it changed no state), so its retry runs again. Only the last
    `capacity` answers are kept: retries come right after the attempt they repeat.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def run(self, request_id: str, compute: Callable[[], Any]) -> Any:
        """compute() once per request id (always, for an empty id)."""
        if not request_id:
            return compute()
        while True:
            with self._lock:
                entry = self._entries.get(request_id)
                owner = entry is None
                if owner:
                    entry = self._entries[request_id] = _Entry()
            assert entry is not None
            if owner:
                return self._own(request_id, entry, compute)
            entry.done.wait()
            if not entry.failed:
                return entry.reply
            # the first attempt failed and was forgotten: try to own the retry

    def _own(self, request_id: str, entry: _Entry, compute: Callable[[], Any]) -> Any:
        try:
            entry.reply = compute()
        except BaseException:
            entry.failed = True
            with self._lock:
                self._entries.pop(request_id, None)
            raise
        finally:
            entry.done.set()
        with self._lock:
            while len(self._entries) > self.capacity:
                oldest, old = next(iter(self._entries.items()))
                if not old.done.is_set():
                    break
                del self._entries[oldest]
        return entry.reply
