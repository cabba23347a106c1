"""The gRPC servicer: thin. Decode, call the core, encode; errors leave via rpc_method."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import grpc
import torch
from torch import nn

from lossd.v1 import codec, stream
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc
from lossd.v1 import tensor_pb2 as tpb
from lossd.v1.shared import SharedRegion

from . import steps
from .auth import Authenticator
from .banks import SharedBank, bank_bytes
from .calls import log_failure, note, observe_step, rpc_method, rpc_stream
from .catalog import build_catalog
from .compute import Computer
from .errors import FailedPrecondition, InvalidArgument, Unavailable, status_of
from .metrics import Metrics
from .persistence import Snapshotter
from .sessions import Session, SessionStore, check_id


class LossServicer(pb_grpc.LossServiceServicer):
    """Implements lossd.v1.LossService over a SessionStore and its BankStore.

    Every method first resolves the caller's tenant (Authenticator); sessions and banks
    are looked up within it, so tenants never see each other's.
    """

    def __init__(
        self,
        store: SessionStore,
        computer: Computer,
        auth: Authenticator,
        metrics: Metrics | None = None,
        snapshots: Snapshotter | None = None,
        shared_memory_dir: str | None = None,
        max_region_bytes: int = 2**31,
        chunk_bytes: int = stream.DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.store = store
        self.shared_memory_dir = shared_memory_dir
        self.max_region_bytes = max_region_bytes
        store.on_remove.append(release_regions)
        self.banks = store.banks
        self.computer = computer
        self.auth = auth
        self.metrics = metrics
        self.snapshots = snapshots
        self.chunk_bytes = chunk_bytes
        self._catalog = build_catalog()

    def _tenant(self, context: grpc.ServicerContext) -> str:
        tenant = self.auth.tenant(context)
        note(tenant=tenant)
        return tenant

    def _session(self, context: grpc.ServicerContext, session_id: str) -> Session:
        session = self.store.get(self._tenant(context), session_id)
        note(loss=session.loss)
        return session

    # -- catalog and sessions --------------------------------------------------------------

    @rpc_method
    def ListLosses(
        self, request: pb.ListLossesRequest, context: grpc.ServicerContext
    ) -> pb.ListLossesResponse:
        self._tenant(context)
        return self._catalog

    @rpc_method
    def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.ServicerContext
    ) -> pb.Session:
        tenant = self._tenant(context)
        note(loss=request.loss)
        config = codec.decode_values(request.config)
        dtype = (
            codec.torch_dtype(request.shared_bank_dtype)
            if request.shared_bank_dtype != tpb.DTYPE_UNSPECIFIED
            else None
        )
        session, created = self.store.create(
            tenant,
            request.loss,
            config,
            request.session_id,
            request.seed if request.HasField("seed") else None,
            request.device,
            request.shared_bank,
            dtype,
            request.attach_only,
        )
        return session_message(session, created=created)

    @rpc_method
    def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.ServicerContext
    ) -> pb.Session:
        return session_message(self._session(context, request.session_id))

    @rpc_method
    def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.ServicerContext
    ) -> pb.ListSessionsResponse:
        sessions = self.store.all(self._tenant(context))
        return pb.ListSessionsResponse(sessions=[session_message(s) for s in sessions])

    @rpc_method
    def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSessionResponse:
        self.store.delete(self._tenant(context), request.session_id)
        return pb.DeleteSessionResponse()

    # -- steps -----------------------------------------------------------------------------

    @rpc_method
    def Compute(
        self, request: pb.ComputeRequest, context: grpc.ServicerContext
    ) -> pb.ComputeResponse:
        session = self._session(context, request.session_id)
        return self.computer.compute(session, request).encode(_output_sink(session, request))

    @rpc_stream
    def ComputeStream(
        self, request_iterator: Iterator[pb.StreamMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.StreamMessage]:
        tenant = self._tenant(context)
        assembler = stream.Assembler()
        received, start = 0, time.perf_counter()
        for message in request_iterator:
            if not received:
                start = time.perf_counter()
            received += message.ByteSize()
            kind = message.WhichOneof("kind")
            try:
                if kind == "request":
                    complete = assembler.start(message.request)
                elif kind == "chunk":
                    complete = assembler.add(message.chunk)
                else:
                    raise ValueError(f"expected a request or a chunk, got {kind or 'nothing'}")
            except ValueError as error:
                raise InvalidArgument(f"ComputeStream framing: {error}") from None
            if complete:
                sent = 0
                for out in self._stream_step(tenant, assembler):
                    sent += out.ByteSize()
                    yield out
                code = (
                    grpc.StatusCode.OK
                    if out.WhichOneof("kind") != "error"
                    else (_code(out.error.code))
                )
                observe_step(self, code, time.perf_counter() - start, received, sent)
                received = 0

    def _stream_step(self, tenant: str, assembler: stream.Assembler) -> Iterator[pb.StreamMessage]:
        request: pb.ComputeRequest = assembler.message
        try:
            session = self.store.get(tenant, request.session_id)
            note(loss=session.loss)
            reply = self.computer.compute(session, request, assembler.payloads())
        except Exception as error:  # noqa: BLE001 - a failed step does not end the stream
            code, message = status_of(error)
            log_failure("ComputeStream", request, code, message)
            yield pb.StreamMessage(
                error=pb.StepError(
                    request_id=request.request_id, code=code.value[0], message=message
                )
            )
            return
        chunker = codec.Chunker(self.chunk_bytes)
        response = reply.encode(codec.Sinks(_output_sink(session, request), chunker))
        yield from stream.frames(pb.StreamMessage(response=response), chunker)

    @rpc_stream
    def AttachMemory(
        self, request_iterator: Iterator[pb.MemoryLease], context: grpc.ServicerContext
    ) -> Iterator[pb.MemoryLease]:
        if self.shared_memory_dir is None:
            raise FailedPrecondition(
                "this server takes no shared memory; start it with --shared-memory"
            )
        tenant = self._tenant(context)
        lent: dict[str, tuple[Session, str]] = {}  # session id -> its region from this stream
        try:
            for lease in request_iterator:
                session = self.store.get(tenant, lease.session_id)
                region = _open_region(lease, self.shared_memory_dir, self.max_region_bytes)
                with session.lock:
                    session.regions[region.name] = region
                previous = lent.get(session.session_id)
                lent[session.session_id] = (session, region.name)
                if previous is not None:  # a larger region replaces this stream's last one
                    release_region(*previous)
                yield lease
        finally:
            for session, name in lent.values():
                release_region(session, name)

    # -- session state ---------------------------------------------------------------------

    @rpc_method
    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext) -> pb.State:
        session = self._session(context, request.session_id)
        with session.lock, session.bank_lock():
            return state_message(session.module, session.steps)

    @rpc_method
    def SetState(self, request: pb.SetStateRequest, context: grpc.ServicerContext) -> pb.State:
        session = self._session(context, request.session_id)
        tensors = decode_state(request.tensors)
        with session.lock, session.bank_lock():
            grows = _nbytes(tensors) - session.state_bytes()
            if grows > 0:
                self.store.check_room(session.tenant, grows)
            load_state(session.module, tensors, session.spec.state, session.loss)
            session.changed()
            return state_message(session.module, session.steps)

    # -- shared banks ----------------------------------------------------------------------

    @rpc_method
    def CreateBank(self, request: pb.CreateBankRequest, context: grpc.ServicerContext) -> pb.Bank:
        tenant = self._tenant(context)
        check_id("name", request.name)
        dtype = (
            codec.torch_dtype(request.dtype)
            if request.dtype != tpb.DTYPE_UNSPECIFIED
            else torch.float32
        )
        device = self.store.resolve_device(request.device)
        size = bank_bytes(request.num_features, request.dim, dtype)
        if self.banks.find(tenant, request.name) is None:
            self.store.check_room(tenant, size)
        bank, created = self.banks.create(
            tenant,
            request.name,
            request.num_features,
            request.dim,
            dtype,
            device,
            request.seed if request.HasField("seed") else None,
        )
        return bank_message(bank, created=created)

    @rpc_method
    def GetBank(self, request: pb.GetBankRequest, context: grpc.ServicerContext) -> pb.Bank:
        return bank_message(self.banks.get(self._tenant(context), request.name))

    @rpc_method
    def ListBanks(
        self, request: pb.ListBanksRequest, context: grpc.ServicerContext
    ) -> pb.ListBanksResponse:
        banks = self.banks.all(self._tenant(context))
        return pb.ListBanksResponse(banks=[bank_message(b) for b in banks])

    @rpc_method
    def DeleteBank(
        self, request: pb.DeleteBankRequest, context: grpc.ServicerContext
    ) -> pb.DeleteBankResponse:
        bank = self.banks.delete(self._tenant(context), request.name)
        if self.snapshots is not None:
            self.snapshots.forget_bank(bank)
        return pb.DeleteBankResponse()

    @rpc_method
    def GetBankState(self, request: pb.GetBankRequest, context: grpc.ServicerContext) -> pb.State:
        bank = self.banks.get(self._tenant(context), request.name)
        with bank.lock:
            return state_message(bank.module, bank.rows_written)

    @rpc_method
    def SetBankState(
        self, request: pb.SetBankStateRequest, context: grpc.ServicerContext
    ) -> pb.State:
        bank = self.banks.get(self._tenant(context), request.name)
        tensors = decode_state(request.tensors)
        with bank.lock:
            load_state(bank.module, tensors, ("bank", "bank_ptr"), f"bank {bank.name!r}")
            bank.version += 1
            return state_message(bank.module, bank.rows_written)

    # -- durability ------------------------------------------------------------------------

    @rpc_method
    def Snapshot(
        self, request: pb.SnapshotRequest, context: grpc.ServicerContext
    ) -> pb.SnapshotResponse:
        tenant = self._tenant(context)
        if self.snapshots is None:
            raise Unavailable("this server keeps no state directory (--state-dir is empty)")
        sessions, banks = self.snapshots.snapshot(tenant)
        return pb.SnapshotResponse(sessions=sessions, banks=banks)


def _output_sink(session: Session, request: pb.ComputeRequest) -> codec.TensorSink | None:
    """Where the reply's tensors go in the caller's shared-memory region, if it lent one."""
    region = session.regions.get(request.shared_region) if request.shared_region else None
    if region is None:
        return None
    return region.writer(request.shared_output_offset, request.shared_output_capacity)


def _open_region(lease: pb.MemoryLease, directory: str, max_bytes: int) -> SharedRegion:
    try:
        return SharedRegion.open(lease.path, lease.size, directory, max_bytes)
    except OSError as error:  # e.g. the client is on another host
        raise FailedPrecondition(
            f"cannot map {lease.path!r} ({error.strerror}); shared memory "
            "works only when client and server share a host"
        ) from None


def release_regions(session: Session) -> None:
    """Let go of all of the session's shared-memory regions (it is being removed)."""
    for name in list(session.regions):
        release_region(session, name)


def release_region(session: Session, name: str) -> None:
    """Let go of one of the session's shared-memory regions."""
    with session.lock:
        region = session.regions.pop(name, None)
    if region is not None:
        region.close()


def session_message(session: Session, created: bool = False) -> pb.Session:
    """The Session message of a session."""
    msg = pb.Session(
        session_id=session.session_id,
        loss=session.loss,
        device=str(session.device),
        steps=session.steps,
        created_at=session.created_at,
        last_used_at=session.last_used_at,
        created=created,
        state_bytes=session.state_bytes(),
        shared_bank=session.bank.name if session.bank is not None else "",
    )
    codec.encode_values(session.config, msg.config)
    return msg


def bank_message(bank: SharedBank, created: bool = False) -> pb.Bank:
    """The Bank message of a shared bank."""
    num_features, dim = bank.shape
    return pb.Bank(
        name=bank.name,
        num_features=num_features,
        dim=dim,
        dtype=codec.wire_dtype(bank.dtype),
        device=str(bank.device),
        pointer=bank.pointer,
        rows_written=bank.rows_written,
        sessions=sorted(bank.sessions),
        created_at=bank.created_at,
        created=created,
    )


def state_message(module: nn.Module, steps: int) -> pb.State:
    """A module's state tensors (call with its locks held)."""
    msg = pb.State(steps=steps)
    codec.encode_tensors(module.state_dict(), msg.tensors)
    return msg


def decode_state(tensors: dict[str, pb.Tensor]) -> dict[str, torch.Tensor]:
    """State tensors from the wire, checked to be finite."""
    decoded = codec.decode_tensors(tensors)
    for name, t in decoded.items():
        if t.is_floating_point() and not steps.all_finite(t):
            raise InvalidArgument(
                f"Expected state `{name}` to hold finite values, but it holds NaN or Inf."
            )
    return decoded


def load_state(
    module: nn.Module, tensors: dict[str, torch.Tensor], names: tuple[str, ...], owner: str
) -> None:
    """Load `tensors` as the module's whole state, or change nothing (call with its locks
    held). Names must be among `names`; shapes that do not fit raise FailedPrecondition.

    The load is tried on a copy first, because torch's load_state_dict may have copied
    some tensors by the time it reports a problem with another. Then it runs on the module
    itself, in place, so that storage shared with a bank stays shared.
    """
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise InvalidArgument(
            f"{owner} has no state {', '.join(map(repr, unknown))}; its "
            f"state names are {', '.join(sorted(names)) or 'none'}"
        )
    missing = sorted(set(module.state_dict()) - set(tensors))
    if missing:
        raise InvalidArgument(
            f"state is missing {', '.join(map(repr, missing))}; the whole state is replaced at once"
        )
    try:
        copy.deepcopy(module).load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise FailedPrecondition(f"state does not fit {owner}: {error}") from None
    module.load_state_dict(tensors, strict=True)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _code(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)
