"""Server settings: one dataclass, filled by `lossd serve` flags or by tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lossd.v1.codec import DEFAULT_MAX_MESSAGE_MB

from .limits import Limits

DEFAULT_PORT = 50051
DEFAULT_STATE_DIR = "./lossd-state"
__all__ = ["DEFAULT_MAX_MESSAGE_MB", "DEFAULT_PORT", "ServerConfig", "resolve_device"]


@dataclass
class ServerConfig:
    """Everything `create_server` needs. Port 0 binds a free port (tests).

    `state_dir` "" keeps no durable state; `metrics_port` None serves no metrics;
    `auth_tokens_file` None takes tokens from $LOSSD_AUTH_TOKENS, if set (else no auth);
    `shared_memory_dir` None takes no shared-memory regions from clients.
    """

    host: str = "localhost"
    port: int = DEFAULT_PORT
    device: str = "auto"
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    workers: int = 64
    session_ttl_s: float = 24 * 3600.0
    global_batch_timeout_s: float = 120.0
    state_dir: str = ""
    snapshot_interval_s: float = 60.0
    shutdown_grace_s: float = 30.0
    auth_tokens_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None
    shared_memory_dir: str | None = None
    limits: Limits = field(default_factory=Limits)

    @property
    def max_message_bytes(self) -> int:
        """The gRPC send/receive limit in bytes."""
        return self.max_message_mb * 1024 * 1024


def resolve_device(requested: str, default: str = "auto") -> torch.device:
    """A torch device from "auto", "cpu", "cuda" or "cuda:N" (empty: `default`).

    "auto" is the first CUDA device when there is one, else the CPU. ValueError for a
    device this machine does not have.
    """
    name = requested or default
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"Expected `device` to be auto, cpu, cuda or cuda:N, but got {name!r}."
        ) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"Expected `device` to be auto, cpu, cuda or cuda:N, but got {name!r}.")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = 0 if device.index is None else device.index
    if index >= count:
        raise ValueError(
            f"Expected `device` to be one of this server's {count} CUDA "
            f"device(s), but got {name!r}."
        )
    return torch.device("cuda", index)
