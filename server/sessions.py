"""Sessions: one loss instance with its state, and the store that holds them."""

from __future__ import annotations

import inspect
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lossd.losses import MemoryBankModule, registry
from lossd.losses.memory_bank import parse_bank_size
from lossd.v1.shared import SharedRegion

from .banks import BankStore, SharedBank
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .global_batch import GlobalSteps
from .limits import Limits, estimate_state_bytes
from .replies import ReplyCache

# Constructing a loss may draw its memory bank from the global RNG; seeding it is only
# safe while no other thread does the same.
_RNG_LOCK = threading.Lock()
MAX_ID_LENGTH = 128


@dataclass
class Session:
    """One instance of a loss and its state, owned by a tenant.

    `lock` serializes the steps of the session: hold it to run forward/backward, to read
    or to replace the state (and the bank's lock after it, see `bank_lock`). `config` is
    the full constructor config (defaults applied, tuples as lists), which is what
    create-or-attach compares. `version` counts state changes (for snapshots).
    """

    tenant: str
    session_id: str
    loss: str
    config: dict[str, Any]
    module: nn.Module
    device: torch.device
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    steps: int = 0
    bank: SharedBank | None = None
    version: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    replies: ReplyCache = field(default_factory=ReplyCache, repr=False)
    global_steps: GlobalSteps = field(default_factory=GlobalSteps, repr=False)
    # shared-memory regions lent by clients on this host, by name (see AttachMemory)
    regions: dict[str, SharedRegion] = field(default_factory=dict, repr=False)

    def bank_lock(self) -> AbstractContextManager[object]:
        """The shared bank's lock (a no-op without one); take it after `lock`."""
        return self.bank.lock if self.bank is not None else nullcontext()

    @property
    def spec(self) -> registry.LossSpec:
        """The registry entry of the session's loss."""
        return registry.LOSSES[self.loss]

    def touch(self) -> None:
        """Mark the session as used now (idle expiry counts from here)."""
        self.last_used_at = time.time()

    def changed(self) -> None:
        """Record a state change (a step, a SetState)."""
        self.version += 1
        if self.bank is not None:
            self.bank.version += 1

    def own_state(self) -> dict[str, torch.Tensor]:
        """The state the session owns: its state_dict without a shared bank's tensors."""
        state = self.module.state_dict()
        if self.bank is not None and self.spec.bank is not None:
            prefix = f"{self.spec.bank.module}." if self.spec.bank.module else ""
            state = {
                k: v for k, v in state.items() if k not in (f"{prefix}bank", f"{prefix}bank_ptr")
            }
        return state

    def state_bytes(self) -> int:
        """Bytes held by the session's own state (a shared bank counts for the bank)."""
        return sum(t.numel() * t.element_size() for t in self.own_state().values())


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
    return {
        name: _as_lists(value)
        for name, value in bound.arguments.items()
        if spec.constructor.parameters[name].kind in named
    }


def _as_lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    return value


def check_id(kind: str, value: str) -> None:
    """Session ids and bank names: 1 to 128 printable characters."""
    if not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise InvalidArgument(
            f"Expected `{kind}` to be 1 to {MAX_ID_LENGTH} printable "
            f"characters, but got {value[:MAX_ID_LENGTH]!r}."
        )


class SessionStore:
    """All sessions of a server, by (tenant, id). Thread-safe.

    Lock order: the store's lock is never held while waiting for a session's lock.
    `on_remove` callbacks run (outside the lock) for every deleted or expired session.
    """

    def __init__(
        self,
        resolve_device: Callable[[str], torch.device],
        ttl_s: float,
        banks: BankStore | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._resolve_device = resolve_device
        self.ttl_s = ttl_s
        self.limits = limits or Limits()
        self.banks = banks if banks is not None else BankStore()
        self.on_remove: list[Callable[[Session], None]] = []
        self._sessions: dict[tuple[str, str], Session] = {}
        self._lock = threading.Lock()

    def resolve_device(self, name: str) -> torch.device:
        """A device of this server from its name ("" for the default); ValueError if none."""
        return self._resolve_device(name)

    def create(
        self,
        tenant: str,
        loss: str,
        config: dict[str, Any],
        session_id: str = "",
        seed: int | None = None,
        device: str = "",
        shared_bank: str = "",
        shared_bank_dtype: torch.dtype | None = None,
        attach_only: bool = False,
    ) -> tuple[Session, bool]:
        """Create a session, or attach to `session_id` if it exists with the same config.

        With `shared_bank`, the session reads its negatives from and enqueues into that
        bank (of the same tenant); its bank size defaults to the bank's shape. With
        `attach_only`, a missing session is NotFound rather than created.

        Returns (session, created). Raises AlreadyExists when the id is taken by another
        loss or config, InvalidArgument for an unknown loss or a config its class rejects,
        FailedPrecondition for a bank of another shape or dtype, ResourceExhausted past a
        limit.
        """
        spec = registry.get(loss)  # ValueError, answered INVALID_ARGUMENT
        bank = self.banks.get(tenant, shared_bank) if shared_bank else None
        if bank is not None:
            config = fit_bank(spec, config, bank, shared_bank_dtype)
        full = canonical_config(spec, config)
        session_id = session_id or secrets.token_hex(16)
        check_id("session_id", session_id)
        existing = self.find(tenant, session_id)
        if existing is not None:
            return self._attach(existing, loss, full, bank), False
        if attach_only:
            raise NotFound(f"session {session_id!r} not found on this server")
        resolved = self._resolve_device(device)
        if bank is not None and bank.device != resolved:
            raise FailedPrecondition(
                f"bank {bank.name!r} lives on {bank.device}, the session "
                f"would compute on {resolved}"
            )
        self._check_room(tenant, 0 if bank else estimate_state_bytes(spec, full))
        module = _build(spec, full, seed, resolved)
        session = Session(
            tenant=tenant,
            session_id=session_id,
            loss=loss,
            config=full,
            module=module,
            device=resolved,
            bank=bank,
        )
        with self._lock:
            winner = self._sessions.setdefault((tenant, session_id), session)
            if winner is session and bank is not None:
                share_bank(spec, module, bank)
                bank.sessions.add(session_id)
        if winner is not session:  # another call created the same id meanwhile
            return self._attach(winner, loss, full, bank), False
        return session, True

    def restore(self, session: Session) -> None:
        """Put a session back (from a snapshot), attached to its bank if it has one."""
        with self._lock:
            self._sessions[(session.tenant, session.session_id)] = session
            if session.bank is not None:
                share_bank(session.spec, session.module, session.bank)
                session.bank.sessions.add(session.session_id)

    def get(self, tenant: str, session_id: str) -> Session:
        """The tenant's session with this id; NotFound otherwise."""
        session = self.find(tenant, session_id)
        if session is None:
            raise NotFound(f"session {session_id!r} not found on this server")
        session.touch()
        return session

    def all(self, tenant: str | None = None) -> list[Session]:
        """The tenant's sessions (every tenant's for None), oldest first."""
        with self._lock:
            sessions = [s for (t, _), s in self._sessions.items() if tenant in (None, t)]
        return sorted(sessions, key=lambda s: s.created_at)

    def delete(self, tenant: str, session_id: str) -> None:
        """Remove a session (detaching it from its bank); NotFound if there is none."""
        with self._lock:
            session = self._sessions.pop((tenant, session_id), None)
            if session is None:
                raise NotFound(f"session {session_id!r} not found on this server")
            self._detach(session)
        self._removed(session)

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Remove sessions idle for longer than the TTL (not those computing now)."""
        now = time.time() if now is None else now
        with self._lock:
            idle = [
                s
                for s in self._sessions.values()
                if now - s.last_used_at > self.ttl_s and not s.lock.locked()
            ]
            for session in idle:
                del self._sessions[(session.tenant, session.session_id)]
                self._detach(session)
        for session in idle:
            self._removed(session)
        return [s.session_id for s in idle]

    def total_state_bytes(self) -> int:
        """State bytes of all sessions and banks."""
        return sum(s.state_bytes() for s in self.all()) + self.banks.total_bytes()

    def check_room(self, tenant: str, new_bytes: int) -> None:
        """ResourceExhausted if `new_bytes` more state would pass a limit."""
        self._check_room(tenant, new_bytes, new_session=False)

    def _check_room(self, tenant: str, new_bytes: int, new_session: bool = True) -> None:
        limits = self.limits
        if new_session and len(self.all(tenant)) >= limits.max_sessions_per_tenant:
            raise ResourceExhausted(
                f"tenant has {limits.max_sessions_per_tenant} sessions, the "
                "most allowed; delete some first"
            )
        if new_bytes > limits.max_session_state_bytes:
            raise ResourceExhausted(
                f"the state would take {_mib(new_bytes)}; at most "
                f"{_mib(limits.max_session_state_bytes)} per session or bank"
            )
        used = self.total_state_bytes()
        if used + new_bytes > limits.max_state_bytes:
            raise ResourceExhausted(
                f"the state would take {_mib(new_bytes)}, and {_mib(used)} of the server's "
                f"{_mib(limits.max_state_bytes)} are in use"
            )

    def find(self, tenant: str, session_id: str) -> Session | None:
        """The tenant's session with this id, or None."""
        with self._lock:
            return self._sessions.get((tenant, session_id))

    @staticmethod
    def _detach(session: Session) -> None:
        if session.bank is not None:
            session.bank.sessions.discard(session.session_id)

    def _removed(self, session: Session) -> None:
        for callback in self.on_remove:
            callback(session)

    @staticmethod
    def _attach(
        session: Session, loss: str, config: dict[str, Any], bank: SharedBank | None
    ) -> Session:
        if session.loss != loss or session.config != config or session.bank is not bank:
            theirs = f" on bank {session.bank.name!r}" if session.bank else ""
            mine = f" on bank {bank.name!r}" if bank else ""
            raise AlreadyExists(
                f"session {session.session_id!r} exists with {session.loss}"
                f"({_describe(session.config)}){theirs}; asked for {loss}"
                f"({_describe(config)}){mine}"
            )
        session.touch()
        return session


def _build(
    spec: registry.LossSpec, config: dict[str, Any], seed: int | None, device: torch.device
) -> nn.Module:
    """The loss module on `device`; its initial bank drawn from `seed`."""
    seed = secrets.randbits(63) if seed is None else seed
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = spec.cls(**config)
    return module.to(device)


def build_module(
    spec: registry.LossSpec, config: dict[str, Any], device: torch.device
) -> nn.Module:
    """A module to load saved state into (its initial random bank is overwritten)."""
    return _build(spec, config, 0, device)


def fit_bank(
    spec: registry.LossSpec, config: dict[str, Any], bank: SharedBank, dtype: torch.dtype | None
) -> dict[str, Any]:
    """The config with its bank size set to the shared bank's shape (FailedPrecondition
    when it asks for another shape or dtype)."""
    if spec.bank is None:
        raise InvalidArgument(
            f"Expected a loss with a memory bank for `shared_bank`, but {spec.name} has none."
        )
    shape = bank.shape
    if dtype is not None and dtype != bank.dtype:
        raise FailedPrecondition(
            f"bank {bank.name!r} holds {bank.dtype} rows {shape}; the session asks for {dtype}"
        )
    asked = config.get(spec.bank.size_arg, 0)
    size = parse_bank_size(spec.bank.size_arg, asked)
    if size != (0,) and (size[0] != shape[0] or (len(size) > 1 and size != shape)):
        raise FailedPrecondition(
            f"bank {bank.name!r} has shape {shape}; the session asks for "
            f"{spec.bank.size_arg}={tuple(size)}"
        )
    return {**config, spec.bank.size_arg: list(shape)}


def share_bank(spec: registry.LossSpec, module: nn.Module, bank: SharedBank) -> None:
    """Point the session module's memory bank at the shared bank's storage."""
    assert spec.bank is not None
    target = module.get_submodule(spec.bank.module)
    assert isinstance(target, MemoryBankModule)
    target.share_storage_of(bank.module)


def _describe(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
