"""LossClient: one long-lived channel to a lossd server, and the calls it offers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from torch import Tensor

from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

from .errors import InvalidArgumentError, from_rpc_error

DEFAULT_TARGET = "localhost:50051"
ROUTE_HEADER = "x-lossd-route"


def default_target() -> str:
    """The server to use when none is given: $LOSSD_SERVER, else localhost:50051."""
    return os.environ.get("LOSSD_SERVER", DEFAULT_TARGET)


@dataclass(frozen=True)
class SessionInfo:
    """What the server knows about a session."""

    session_id: str
    loss: str
    config: dict[str, Any]
    device: str
    steps: int
    created_at: float
    last_used_at: float
    created: bool
    state_bytes: int

    @classmethod
    def from_message(cls, msg: pb.Session) -> SessionInfo:
        return cls(
            session_id=msg.session_id, loss=msg.loss, config=codec.decode_values(msg.config),
            device=msg.device, steps=msg.steps, created_at=msg.created_at,
            last_used_at=msg.last_used_at, created=msg.created, state_bytes=msg.state_bytes,
        )


@dataclass(frozen=True)
class LossInfo:
    """A catalog entry: constructor defaults, required parameters, forward arguments."""

    name: str
    defaults: dict[str, Any]
    required: tuple[str, ...]
    args: tuple[str, ...]
    state: tuple[str, ...]
    doc: str


class LossClient:
    """A connection to a lossd server.

    Args:
        target: "host:port" of the server (default: $LOSSD_SERVER or localhost:50051).
        token: bearer token, sent as `authorization: Bearer TOKEN` on every call.
        timeout: seconds per call (None: no deadline).
        root_certificates: PEM bytes of the CA to trust; enables TLS.
        max_message_mb: the largest message sent or accepted.
        options: extra gRPC channel options.

    Use it as a context manager, or call `close()`.

    Example::

        with LossClient("gpu-box:50051") as client:
            criterion = client.loss("NTXentLoss", temperature=0.2)
            loss = criterion(out0, out1)
            loss.backward()
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        timeout: float | None = None,
        root_certificates: bytes | None = None,
        max_message_mb: int = codec.DEFAULT_MAX_MESSAGE_MB,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target or default_target()
        self.timeout = timeout
        limit = max_message_mb * 1024 * 1024
        channel_options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            *options,
        ]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(self.target, credentials, channel_options)
        else:
            self._channel = grpc.insecure_channel(self.target, channel_options)
        self._stub = pb_grpc.LossServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ())

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> LossClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LossClient({self.target!r})"

    # -- the catalog and sessions ----------------------------------------------------------

    def list_losses(self) -> list[LossInfo]:
        """The server's catalog."""
        response = self.call("ListLosses", pb.ListLossesRequest())
        return [LossInfo(name=info.name, defaults=codec.decode_values(info.defaults),
                         required=tuple(info.required), args=tuple(a.name for a in info.args),
                         state=tuple(info.state), doc=info.doc)
                for info in response.losses]

    def create_session(self, loss: str, *, session_id: str | None = None,
                       seed: int | None = None, device: str | None = None,
                       **config: Any) -> SessionInfo:
        """Create a session of `loss` with constructor `config`, or attach to `session_id`."""
        request = pb.CreateSessionRequest(loss=loss, session_id=session_id or "",
                                          device=device or "")
        if seed is not None:
            request.seed = seed
        try:
            codec.encode_values(config, request.config)
        except ValueError as error:
            raise InvalidArgumentError(f"{loss} config: {error}") from None
        response = self.call("CreateSession", request, session_id=session_id or "")
        return SessionInfo.from_message(response)

    def get_session(self, session_id: str) -> SessionInfo:
        """The session's info; SessionNotFoundError if it does not exist."""
        request = pb.GetSessionRequest(session_id=session_id)
        return SessionInfo.from_message(self.call("GetSession", request, session_id=session_id))

    def list_sessions(self) -> list[SessionInfo]:
        """All sessions on the server."""
        response = self.call("ListSessions", pb.ListSessionsRequest())
        return [SessionInfo.from_message(s) for s in response.sessions]

    def delete_session(self, session_id: str) -> None:
        """Delete a session and its state; SessionNotFoundError if it does not exist."""
        self.call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id),
                  session_id=session_id)

    def get_state(self, session_id: str) -> dict[str, Tensor]:
        """The session's state tensors under lightly's names."""
        response = self.call("GetState", pb.GetStateRequest(session_id=session_id),
                             session_id=session_id)
        return {k: t.clone() for k, t in codec.decode_tensors(response.tensors).items()}

    def set_state(self, session_id: str, tensors: dict[str, Tensor]) -> None:
        """Replace the session's whole state (all or nothing)."""
        request = pb.SetStateRequest(session_id=session_id)
        codec.encode_tensors(tensors, request.tensors)
        self.call("SetState", request, session_id=session_id)

    def loss(self, name: str, *, session_id: str | None = None, seed: int | None = None,
             device: str | None = None, **config: Any) -> Any:
        """A remote `nn.Module` of loss `name`: same forward as the in-process class.

        With `session_id`, attaches to that session if it exists (same config) or creates
        it; another process can attach to the same session by the same id.
        """
        from .remote import RemoteLoss

        return RemoteLoss(self, name, session_id=session_id, seed=seed, device=device,
                          config=config)

    # -- the one call wrapper --------------------------------------------------------------

    def call(self, method: str, request: Any, *, session_id: str = "",
             timeout: float | None = None) -> Any:
        """Invoke RPC `method`; a failure raises the matching LossdError, never a grpc error."""
        try:
            return getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.target, session_id) from None
