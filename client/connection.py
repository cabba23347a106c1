"""LossClient: one long-lived channel to a lossd server, and the calls it offers."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from torch import Tensor

from lossd.v1 import codec, stream
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc
from lossd.v1.shared import aligned

from .errors import InvalidArgumentError, from_rpc_error, from_status
from .memory import MemoryLease
from .streaming import ComputeStream, StepFailed

log = logging.getLogger("lossd.client")
RESULT_ROOM = 64 * 1024  # room for the loss value (and small outputs) in a shared region

DEFAULT_TARGET = "localhost:50051"
ROUTE_HEADER = "x-lossd-route"
# Calls that are safe to repeat after a lost reply: reads, creates with a client-chosen
# name, and Compute, whose request id makes a repeat return the first answer.
_RETRIED = {
    "ListLosses",
    "CreateSession",
    "GetSession",
    "ListSessions",
    "Compute",
    "GetState",
    "SetState",
    "CreateBank",
    "GetBank",
    "ListBanks",
    "GetBankState",
    "SetBankState",
    "Snapshot",
}
_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


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
    shared_bank: str

    @classmethod
    def from_message(cls, msg: pb.Session) -> SessionInfo:
        return cls(
            session_id=msg.session_id,
            loss=msg.loss,
            config=codec.decode_values(msg.config),
            device=msg.device,
            steps=msg.steps,
            created_at=msg.created_at,
            last_used_at=msg.last_used_at,
            created=msg.created,
            state_bytes=msg.state_bytes,
            shared_bank=msg.shared_bank,
        )


@dataclass(frozen=True)
class BankInfo:
    """What the server knows about a shared bank."""

    name: str
    num_features: int
    dim: int
    dtype: torch.dtype
    device: str
    pointer: int
    rows_written: int
    sessions: tuple[str, ...]
    created: bool

    @classmethod
    def from_message(cls, msg: pb.Bank) -> BankInfo:
        return cls(
            name=msg.name,
            num_features=msg.num_features,
            dim=msg.dim,
            dtype=codec.torch_dtype(msg.dtype),
            device=msg.device,
            pointer=msg.pointer,
            rows_written=msg.rows_written,
            sessions=tuple(msg.sessions),
            created=msg.created,
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


@dataclass(frozen=True)
class StepResult:
    """A decoded Compute answer: the result, and per argument its gradients tree."""

    result: Any
    grads: dict[str, Any]
    steps: int


class LossClient:
    """A connection to a lossd server.

    Args:
        target: "host:port" of the server (default: $LOSSD_SERVER or localhost:50051).
        token: bearer token, sent as `authorization: Bearer TOKEN` on every call.
        timeout: seconds per call (None: no deadline). Stream steps have no deadline.
        root_certificates: PEM bytes of the CA to trust; enables TLS.
        stream: send steps over one long-lived ComputeStream per session route, large
            tensors in chunks, instead of one unary Compute each.
        shared_memory: when the server runs on this host (with --shared-memory), pass
            tensors through a shared-memory region per session instead of the socket;
            falls back to the wire when the server cannot map it.
        wire_dtype: send float32 tensors as this dtype (torch.float16 or torch.bfloat16)
            to halve the bytes; the server computes in float32 and answers gradients in
            the wire dtype.
        retries: how often a call that failed with UNAVAILABLE or DEADLINE_EXCEEDED is
            repeated (with exponential backoff and the same request id).
        max_message_mb: the largest message sent or accepted.
        chunk_mb: chunk size of streamed tensors.
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
        stream: bool = False,
        shared_memory: bool = False,
        wire_dtype: torch.dtype | None = None,
        retries: int = 5,
        max_message_mb: int = codec.DEFAULT_MAX_MESSAGE_MB,
        chunk_mb: float = stream.DEFAULT_CHUNK_BYTES / 2**20,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target or default_target()
        self.timeout = timeout
        self.stream = stream
        self.shared_memory = shared_memory
        if wire_dtype not in (None, torch.float16, torch.bfloat16):
            raise InvalidArgumentError(
                f"Expected `wire_dtype` to be torch.float16 or "
                f"torch.bfloat16, but got {wire_dtype}."
            )
        self.wire_dtype = wire_dtype
        self.retries = retries
        self.chunk_bytes = int(chunk_mb * 2**20)
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
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._routes: dict[str, str] = {}  # session id -> routing key, where not the id
        self._streams: dict[str, ComputeStream] = {}
        self._streams_lock = threading.Lock()
        self._leases: dict[str, MemoryLease | None] = {}  # None: the server said no

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the streams, shared-memory leases and the channel."""
        with self._streams_lock:
            for s in self._streams.values():
                s.close()
            self._streams.clear()
            for lease in self._leases.values():
                if lease is not None:
                    lease.close()
            self._leases.clear()
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
        return [
            LossInfo(
                name=info.name,
                defaults=codec.decode_values(info.defaults),
                required=tuple(info.required),
                args=tuple(a.name for a in info.args),
                state=tuple(info.state),
                doc=info.doc,
            )
            for info in response.losses
        ]

    def create_session(
        self,
        loss: str,
        *,
        session_id: str | None = None,
        seed: int | None = None,
        device: str | None = None,
        shared_bank: str | None = None,
        shared_bank_dtype: torch.dtype | None = None,
        attach_only: bool = False,
        **config: Any,
    ) -> SessionInfo:
        """Create a session of `loss` with constructor `config`, or attach to `session_id`.

        Without `session_id` the client picks a fresh one, so that even the creating call
        can be routed by it. With `shared_bank`, the session uses that bank (created with
        `create_bank`) and its calls are routed by the bank's name. With `attach_only`,
        SessionNotFoundError instead of a new session when `session_id` does not exist.
        """
        session_id = session_id or uuid.uuid4().hex
        request = pb.CreateSessionRequest(
            loss=loss,
            session_id=session_id,
            device=device or "",
            shared_bank=shared_bank or "",
            attach_only=attach_only,
        )
        if seed is not None:
            request.seed = seed
        if shared_bank_dtype is not None:
            request.shared_bank_dtype = codec.wire_dtype(shared_bank_dtype)  # type: ignore[assignment]
        try:
            codec.encode_values(config, request.config)
        except ValueError as error:
            raise InvalidArgumentError(f"{loss} config: {error}") from None
        if shared_bank:
            self._routes[session_id] = shared_bank
        response = self.call("CreateSession", request, session_id=session_id)
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
        self.call(
            "DeleteSession", pb.DeleteSessionRequest(session_id=session_id), session_id=session_id
        )

    def get_state(self, session_id: str) -> dict[str, Tensor]:
        """The session's state tensors under lightly's names."""
        response = self.call(
            "GetState", pb.GetStateRequest(session_id=session_id), session_id=session_id
        )
        return _owned(codec.decode_tensors(response.tensors))

    def set_state(self, session_id: str, tensors: dict[str, Tensor]) -> None:
        """Replace the session's whole state (all or nothing)."""
        request = pb.SetStateRequest(session_id=session_id)
        codec.encode_tensors(tensors, request.tensors)
        self.call("SetState", request, session_id=session_id)

    def loss(
        self,
        name: str,
        *,
        session_id: str | None = None,
        seed: int | None = None,
        device: str | None = None,
        shared_bank: str | None = None,
        world_size: int = 1,
        rank: int = 0,
        attach_only: bool = False,
        **config: Any,
    ) -> Any:
        """A remote `nn.Module` of loss `name`: same forward as the in-process class.

        Args:
            name: the loss class, e.g. "NTXentLoss".
            session_id: attach to (or create) this session; another process can attach
                to the same session by the same id.
            seed: seed of the session's initial memory bank.
            device: server-side device of the session.
            shared_bank: read negatives from and enqueue into this shared bank.
            world_size, rank: this process is rank `rank` of `world_size` ranks that form
                one global batch per step (needs `session_id`, the same on every rank).
            attach_only: resume `session_id`; SessionNotFoundError if it does not exist
                (instead of a fresh session), e.g. behind a load balancer.
            config: the loss's constructor arguments.
        """
        from .remote import RemoteLoss

        return RemoteLoss(
            self,
            name,
            session_id=session_id,
            seed=seed,
            device=device,
            shared_bank=shared_bank,
            world_size=world_size,
            rank=rank,
            attach_only=attach_only,
            config=config,
        )

    # -- shared banks ----------------------------------------------------------------------

    def create_bank(
        self,
        name: str,
        num_features: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
        device: str | None = None,
    ) -> BankInfo:
        """Create a shared bank of random unit rows, or return the existing one of the same
        shape and dtype (AlreadyExistsError for another)."""
        request = pb.CreateBankRequest(
            name=name,
            num_features=num_features,
            dim=dim,
            dtype=codec.wire_dtype(dtype),
            device=device or "",
        )
        if seed is not None:
            request.seed = seed
        return BankInfo.from_message(self.call("CreateBank", request, route=name))

    def get_bank(self, name: str) -> BankInfo:
        """Size, pointer, rows written and attached sessions of a bank."""
        return BankInfo.from_message(self.call("GetBank", pb.GetBankRequest(name=name), route=name))

    def list_banks(self) -> list[BankInfo]:
        """All shared banks on the server."""
        return [
            BankInfo.from_message(b) for b in self.call("ListBanks", pb.ListBanksRequest()).banks
        ]

    def delete_bank(self, name: str) -> None:
        """Delete a bank no session is attached to."""
        self.call("DeleteBank", pb.DeleteBankRequest(name=name), route=name)

    def get_bank_state(self, name: str) -> dict[str, Tensor]:
        """The bank's `bank` (num_features, dim) and `bank_ptr` (1,)."""
        response = self.call("GetBankState", pb.GetBankRequest(name=name), route=name)
        return _owned(codec.decode_tensors(response.tensors))

    def set_bank_state(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Replace the bank's rows and pointer (all or nothing)."""
        request = pb.SetBankStateRequest(name=name)
        codec.encode_tensors(tensors, request.tensors)
        self.call("SetBankState", request, route=name)

    def snapshot(self) -> tuple[int, int]:
        """Write this tenant's changed sessions and banks to the server's state directory
        now; returns how many sessions and banks were written."""
        response = self.call("Snapshot", pb.SnapshotRequest())
        return response.sessions, response.banks

    # -- steps -----------------------------------------------------------------------------

    def step(
        self, request: pb.ComputeRequest, args: dict[str, Any], wanted: set[int]
    ) -> StepResult:
        """Run one step: `args` are encoded into `request` (tensors whose id is in `wanted`
        ask for gradients), sent over shared memory, the stream or as one Compute, and the
        answer decoded (`input_ref`s resolve to the objects in `args`)."""
        sent, sent_wanted = self._on_the_wire(args, wanted, request)
        lease, shared = self._shared_sink(request, sent, sent_wanted)
        chunker = codec.Chunker(self.chunk_bytes) if self.stream else None
        sink = codec.Sinks(shared, chunker)
        try:
            codec.encode_values(
                sent, request.args, wants_grad=lambda t: id(t) in sent_wanted, sink=sink
            )
        except ValueError as error:
            raise InvalidArgumentError(str(error)) from None
        if chunker is None:
            response = self.call("Compute", request, session_id=request.session_id)
            chunks: Iterator[Tensor] | None = None
        else:
            response, chunks = self._stream_step(request, chunker)
        regions = {lease.region.name: lease.region} if lease and lease.region else None
        source = codec.Payloads(chunks, regions)
        result = codec.decode_value(response.result, "result", inputs=args, source=source)
        grads = codec.decode_values(response.grads, source=source)
        if regions:  # the region is reused by the next step: own what came through it
            result, grads = _owned(result, args), _owned(grads, args)
        return StepResult(result, grads, response.steps)

    def _on_the_wire(
        self, args: dict[str, Any], wanted: set[int], request: pb.ComputeRequest
    ) -> tuple[dict[str, Any], set[int]]:
        """The arguments as sent: float32 tensors cast to the wire dtype, if one is set
        (then the server is told to compute in float32). Returns them and the ids of the
        sent tensors that want gradients."""
        if self.wire_dtype is None:
            return args, wanted
        sent_wanted: set[int] = set()

        def cast(t: Tensor) -> Tensor:
            out = t.detach().to(self.wire_dtype) if t.dtype == torch.float32 else t
            if id(t) in wanted:
                sent_wanted.add(id(out))
            return out

        request.compute_dtype = codec.wire_dtype(torch.float32)  # type: ignore[assignment]
        return codec.map_tensors(cast, args), sent_wanted

    def _shared_sink(
        self, request: pb.ComputeRequest, args: dict[str, Any], wanted: set[int]
    ) -> tuple[MemoryLease | None, codec.TensorSink | None]:
        """The session's shared-memory lease, large enough for this step, and the sink that
        puts the inputs at the start of its region (the server may answer after them);
        (None, None) when tensors go on the wire."""
        if not self.shared_memory:
            return None, None
        inputs, outputs = _shared_sizes(args, wanted)
        lease = self._lease(request.session_id, inputs + outputs)
        if lease is None or lease.region is None:
            return None, None
        request.shared_region = lease.region.name
        request.shared_output_offset = inputs
        request.shared_output_capacity = lease.region.size - inputs
        return lease, lease.region.writer(0, inputs)

    def _lease(self, session_id: str, nbytes: int) -> MemoryLease | None:
        """The session's lease with a region of at least `nbytes` (None: the wire)."""
        lease = self._leases.get(session_id, ...)
        try:
            if lease is ...:
                route = self._routes.get(session_id, session_id)
                lease = MemoryLease(self._stub, self._call_metadata(route), session_id, nbytes)
                self._leases[session_id] = lease
            elif lease is not None:
                lease.ensure(nbytes)
        except (grpc.RpcError, OSError) as error:
            detail = error.details() if isinstance(error, grpc.Call) else str(error)
            log.warning(
                "shared memory unavailable for session %s (%s); using the wire", session_id, detail
            )
            self._leases[session_id] = lease = None
        return lease

    def _stream_step(
        self, request: pb.ComputeRequest, chunker: codec.Chunker
    ) -> tuple[pb.ComputeResponse, Iterator[Tensor]]:
        route = self._routes.get(request.session_id, request.session_id)
        for attempt in range(self.retries + 1):
            channel = self._stream_for(route)
            try:
                return channel.step(request, chunker)
            except StepFailed as failed:
                raise from_status(failed.code, failed.message, self.target) from None
            except grpc.RpcError as error:
                # Failed steps come back as StepError messages; an RpcError means the
                # stream itself broke (a restart, an idle stream reset by a proxy): open a
                # new one and resend with the same request id, which the server answers
                # at most once.
                self._drop_stream(route, channel)
                if _fatal(error) or attempt == self.retries:
                    raise from_rpc_error(error, self.target) from None
                _backoff(attempt)
        raise AssertionError("unreachable")

    def _stream_for(self, route: str) -> ComputeStream:
        with self._streams_lock:
            channel = self._streams.get(route)
            if channel is None:
                metadata = self._call_metadata(route)
                channel = self._streams[route] = ComputeStream(self._stub, metadata)
            return channel

    def _drop_stream(self, route: str, channel: ComputeStream) -> None:
        with self._streams_lock:
            if self._streams.get(route) is channel:
                del self._streams[route]
        channel.close(cancel=True)

    # -- the one call wrapper --------------------------------------------------------------

    def call(
        self,
        method: str,
        request: Any,
        *,
        session_id: str = "",
        route: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Invoke RPC `method`; a failure raises the matching LossdError, never a grpc error.

        Calls about a session carry the routing header (`x-lossd-route`): the session id,
        or the shared bank's name for a session attached to one, so that a load balancer
        hashing on it sends every call about the session to the same replica. Calls that
        can be repeated safely are retried on UNAVAILABLE and DEADLINE_EXCEEDED.
        """
        if route is None:
            route = self._routes.get(session_id, session_id)
        metadata = self._call_metadata(route)
        attempts = self.retries + 1 if method in _RETRIED else 1
        for attempt in range(attempts):
            try:
                return getattr(self._stub, method)(
                    request, timeout=timeout or self.timeout, metadata=metadata
                )
            except grpc.RpcError as error:
                if not _retryable(error) or attempt == attempts - 1:
                    raise from_rpc_error(error, self.target) from None
                _backoff(attempt)
        raise AssertionError("unreachable")

    def _call_metadata(self, route: str) -> tuple[tuple[str, str], ...]:
        return (*self._metadata, (ROUTE_HEADER, route)) if route else self._metadata


def _retryable(error: grpc.RpcError) -> bool:
    return isinstance(error, grpc.Call) and error.code() in _RETRY_CODES


def _fatal(error: grpc.RpcError) -> bool:
    """Stream failures that a new stream would meet again."""
    return isinstance(error, grpc.Call) and error.code() in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    )


def _backoff(attempt: int) -> None:
    """Exponential backoff with jitter: about 0.1, 0.2, 0.4 ... s, at most 2 s."""
    time.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + random.random() / 2))


def _owned(tree: Any, args: dict[str, Any] | None = None) -> Any:
    """Copies that own their memory of decoded tensors (which view a message's bytes or a
    shared region), but not of the caller's own `args`, returned as input refs."""
    mine = {id(t) for t in codec.tensors_in(args)}
    return codec.map_tensors(lambda t: t if id(t) in mine else t.clone(), tree)


def _shared_sizes(args: dict[str, Any], wanted: set[int]) -> tuple[int, int]:
    """Bytes the inputs take in a region, and the room the answer needs after them."""
    tensors = codec.tensors_in(args)
    inputs = sum(aligned(t.numel() * t.element_size()) for t in tensors)
    grads = sum(aligned(t.numel() * t.element_size()) for t in tensors if id(t) in wanted)
    return inputs, grads + RESULT_ROOM
