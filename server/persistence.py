"""Durable state: sessions and shared banks snapshotted to a directory, restored on start.

One file per session and per bank, written atomically (temporary file, fsync, rename,
fsync of the directory) with torch.save and read back with `weights_only=True`: plain
tensors, numbers and strings, never pickled code. A file that cannot be read is logged and
skipped; everything else loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lossd.losses import registry

from .banks import SharedBank, new_bank_module
from .sessions import Session, SessionStore, build_module

log = logging.getLogger("lossd.server")
FORMAT = 1


class StateDir:
    """The files of one state directory: `sessions/` and `banks/`, named by a digest of
    (tenant, id) so that any id makes a safe file name."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for kind in ("sessions", "banks"):
            (self.root / kind).mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, tenant: str, name: str) -> Path:
        digest = hashlib.sha256(f"{tenant}\0{name}".encode()).hexdigest()[:32]
        return self.root / kind / f"{digest}.pt"

    def write(self, path: Path, payload: dict[str, Any]) -> None:
        """Replace `path` with `payload`, atomically and durably."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def read_all(self, kind: str) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Every readable snapshot of `kind`; unreadable ones are logged and skipped."""
        for path in sorted((self.root / kind).glob("*.pt")):
            try:
                payload = torch.load(path, weights_only=True, map_location="cpu")
                if not isinstance(payload, dict) or payload.get("format") != FORMAT:
                    raise ValueError(f"not a lossd snapshot of format {FORMAT}")
            except Exception as error:  # noqa: BLE001 - a bad file must not stop the server
                log.error("skipping unreadable snapshot %s: %s", path, error)
                continue
            yield path, payload


class Snapshotter:
    """Writes changed sessions and banks to a StateDir and restores them from it.

    Args:
        state_dir: where the files go.
        store: the sessions (and, through it, the banks).
        interval_s: seconds between periodic snapshots of what changed (0: none).
    """

    def __init__(self, state_dir: StateDir, store: SessionStore, interval_s: float) -> None:
        self.dir = state_dir
        self.store = store
        self.interval_s = interval_s
        self._saved: dict[tuple[str, str, str], int] = {}  # (kind, tenant, id) -> version
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        store.on_remove.append(self.forget_session)

    # -- restore ---------------------------------------------------------------------------

    def restore(self) -> tuple[int, int]:
        """Load every readable bank, then every session; returns how many of each."""
        banks = sum(self._restore_bank(p, payload) for p, payload in self.dir.read_all("banks"))
        sessions = sum(
            self._restore_session(p, payload) for p, payload in self.dir.read_all("sessions")
        )
        log.info("restored %d session(s) and %d bank(s) from %s", sessions, banks, self.dir.root)
        return sessions, banks

    def _restore_bank(self, path: Path, payload: dict[str, Any]) -> bool:
        try:
            state = payload["state"]
            rows = state["bank"]
            device = self._device(payload.get("device", ""))
            module = new_bank_module(int(rows.shape[0]), int(rows.shape[1]), rows.dtype, device)
            module.load_state_dict(state)
            module.cursor.rows_written = int(payload["rows_written"])
            bank = SharedBank(
                payload["tenant"],
                payload["name"],
                module,
                device,
                created_at=float(payload["created_at"]),
            )
        except Exception as error:  # noqa: BLE001 - skip what cannot be restored
            log.error("skipping bank snapshot %s: %s", path, error)
            return False
        self.store.banks.restore(bank)
        self._saved[("banks", bank.tenant, bank.name)] = bank.version
        return True

    def _restore_session(self, path: Path, payload: dict[str, Any]) -> bool:
        try:
            tenant, session_id = payload["tenant"], payload["session_id"]
            spec = registry.get(payload["loss"])
            bank = (
                self.store.banks.get(tenant, payload["shared_bank"])
                if payload["shared_bank"]
                else None
            )
            device = bank.device if bank is not None else self._device(payload["device"])
            module = build_module(spec, payload["config"], device)
            _, unexpected = module.load_state_dict(payload["state"], strict=False)
            if unexpected:
                raise ValueError(f"unexpected state {unexpected}")
            session = Session(
                tenant=tenant,
                session_id=session_id,
                loss=spec.name,
                config=payload["config"],
                module=module,
                device=device,
                created_at=float(payload["created_at"]),
                steps=int(payload["steps"]),
                bank=bank,
            )
        except Exception as error:  # noqa: BLE001 - skip what cannot be restored
            log.error("skipping session snapshot %s: %s", path, error)
            return False
        self.store.restore(session)
        self._saved[("sessions", tenant, session_id)] = session.version
        return True

    def _device(self, name: str) -> torch.device:
        try:
            return self.store.resolve_device(name)
        except ValueError:
            log.warning("device %r of a snapshot is not here; using the default", name)
            return self.store.resolve_device("")

    # -- snapshot --------------------------------------------------------------------------

    def snapshot(self, tenant: str | None = None) -> tuple[int, int]:
        """Write the sessions and banks (of `tenant`, or all) that changed since their last
        snapshot; returns how many of each were written."""
        with self._write_lock:
            banks = sum(self._write_bank(b) for b in self.store.banks.all(tenant))
            sessions = sum(self._write_session(s) for s in self.store.all(tenant))
        return sessions, banks

    def _write_session(self, session: Session) -> bool:
        return self._write(
            ("sessions", session.tenant, session.session_id),
            session.lock,
            lambda: session.version,
            lambda: {
                "tenant": session.tenant,
                "session_id": session.session_id,
                "loss": session.loss,
                "config": session.config,
                "device": str(session.device),
                "steps": session.steps,
                "created_at": session.created_at,
                "shared_bank": session.bank.name if session.bank is not None else "",
                "state": _host_copies(session.own_state()),
            },
            still_held=lambda: self.store.find(session.tenant, session.session_id) is session,
        )

    def _write_bank(self, bank: SharedBank) -> bool:
        return self._write(
            ("banks", bank.tenant, bank.name),
            bank.lock,
            lambda: bank.version,
            lambda: {
                "tenant": bank.tenant,
                "name": bank.name,
                "device": str(bank.device),
                "created_at": bank.created_at,
                "rows_written": bank.rows_written,
                "state": _host_copies(bank.module.state_dict()),
            },
            still_held=lambda: self.store.banks.find(bank.tenant, bank.name) is bank,
        )

    def _write(
        self,
        key: tuple[str, str, str],
        lock: threading.Lock,
        version_of: Callable[[], int],
        payload_of: Callable[[], dict[str, Any]],
        still_held: Callable[[], bool],
    ) -> bool:
        """Write one file if its owner changed since its last snapshot: the payload is
        taken under the owner's lock (a consistent state), written outside it."""
        with lock:
            version = version_of()
            if self._saved.get(key) == version:
                return False
            payload = {"format": FORMAT, **payload_of()}
        if not still_held():
            return False  # deleted meanwhile
        self.dir.write(self.dir.path(*key), payload)
        self._saved[key] = version
        return True

    def forget_session(self, session: Session) -> None:
        """Remove a deleted session's file."""
        self._forget(("sessions", session.tenant, session.session_id))

    def forget_bank(self, bank: SharedBank) -> None:
        """Remove a deleted bank's file."""
        self._forget(("banks", bank.tenant, bank.name))

    def _forget(self, key: tuple[str, str, str]) -> None:
        with self._write_lock:
            self._saved.pop(key, None)
            self.dir.remove(self.dir.path(*key))

    # -- the periodic thread ---------------------------------------------------------------

    def start(self) -> None:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="lossd-snapshots", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.snapshot()
            except Exception:
                log.exception("periodic snapshot failed")


def _host_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of state tensors, safe to write after the owner's lock is released."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
