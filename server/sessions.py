"""Sessions: one loss instance with its state, and the store that holds them."""

from __future__ import annotations

import inspect
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lossd.losses import registry

from .errors import AlreadyExists, InvalidArgument, NotFound

# Constructing a loss may draw its memory bank from the global RNG; seeding it is only
# safe while no other thread does the same.
_RNG_LOCK = threading.Lock()
MAX_ID_LENGTH = 128


@dataclass
class Session:
    """One instance of a loss and its state.

    `lock` serializes the steps of the session: hold it to run forward/backward, to read
    or to replace the state. `config` is the full constructor config (defaults applied,
    tuples as lists), which is what create-or-attach compares.
    """

    session_id: str
    loss: str
    config: dict[str, Any]
    module: nn.Module
    device: torch.device
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    steps: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def spec(self) -> registry.LossSpec:
        """The registry entry of the session's loss."""
        return registry.LOSSES[self.loss]

    def touch(self) -> None:
        """Mark the session as used now (idle expiry counts from here)."""
        self.last_used_at = time.time()

    def state_bytes(self) -> int:
        """Bytes held by the session's state tensors."""
        return sum(t.numel() * t.element_size() for t in self.module.state_dict().values())


def canonical_config(spec: registry.LossSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The full constructor config: unknown names rejected, defaults filled in,
    tuples turned into lists (as they travel), so that equal configs compare equal."""
    try:
        bound = spec.constructor.bind(**config)
    except TypeError as error:
        names = ", ".join(spec.constructor.parameters) or "none"
        raise InvalidArgument(f"{spec.name}: {error}; its parameters are: {names}") from None
    bound.apply_defaults()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: _as_lists(value) for name, value in bound.arguments.items()
            if spec.constructor.parameters[name].kind in named}


def _as_lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    return value


def _check_session_id(session_id: str) -> None:
    if len(session_id) > MAX_ID_LENGTH or not session_id.isprintable():
        raise InvalidArgument(
            f"Expected `session_id` to be at most {MAX_ID_LENGTH} printable characters, "
            f"but got {session_id[:MAX_ID_LENGTH]!r}...")


class SessionStore:
    """All sessions of a server, by id. Thread-safe.

    Lock order: the store's lock is never held while waiting for a session's lock.
    """

    def __init__(self, resolve_device: Callable[[str], torch.device], ttl_s: float) -> None:
        self._resolve_device = resolve_device
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(
        self,
        loss: str,
        config: dict[str, Any],
        session_id: str = "",
        seed: int | None = None,
        device: str = "",
    ) -> tuple[Session, bool]:
        """Create a session, or attach to `session_id` if it exists with the same config.

        Returns (session, created). Raises AlreadyExists when the id is taken by another
        loss or config, InvalidArgument for an unknown loss or a config its class rejects.
        """
        try:
            spec = registry.get(loss)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        full = canonical_config(spec, config)
        if session_id:
            _check_session_id(session_id)
            existing = self._find(session_id)
            if existing is not None:
                return self._attach(existing, loss, full), False
        session = Session(
            session_id=session_id or uuid.uuid4().hex,
            loss=loss,
            config=full,
            module=self._build(spec, full, seed, self._resolve_device(device)),
            device=self._resolve_device(device),
        )
        with self._lock:
            winner = self._sessions.setdefault(session.session_id, session)
        if winner is not session:  # another call created the same id meanwhile
            return self._attach(winner, loss, full), False
        return session, True

    def get(self, session_id: str) -> Session:
        """The session with this id; NotFound otherwise."""
        session = self._find(session_id)
        if session is None:
            raise NotFound(f"session {session_id!r} not found on this server")
        session.touch()
        return session

    def list(self) -> list[Session]:
        """All sessions, oldest first."""
        with self._lock:
            return sorted(self._sessions.values(), key=lambda s: s.created_at)

    def delete(self, session_id: str) -> None:
        """Remove a session; NotFound if there is none with this id."""
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise NotFound(f"session {session_id!r} not found on this server")

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Remove sessions idle for longer than the TTL (not those computing now)."""
        now = time.time() if now is None else now
        with self._lock:
            idle = [s.session_id for s in self._sessions.values()
                    if now - s.last_used_at > self.ttl_s and not s.lock.locked()]
            for session_id in idle:
                del self._sessions[session_id]
        return idle

    def _find(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.get(session_id)

    @staticmethod
    def _attach(session: Session, loss: str, config: dict[str, Any]) -> Session:
        if session.loss != loss or session.config != config:
            raise AlreadyExists(
                f"session {session.session_id!r} exists with {session.loss}"
                f"({_describe(session.config)}); asked for {loss}({_describe(config)})")
        session.touch()
        return session

    @staticmethod
    def _build(spec: registry.LossSpec, config: dict[str, Any], seed: int | None,
               device: torch.device) -> nn.Module:
        """The loss module on `device`; its initial bank drawn from `seed`."""
        seed = secrets.randbits(63) if seed is None else seed
        with _RNG_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = spec.cls(**config)
        return module.to(device)


def _describe(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())
