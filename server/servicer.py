"""The gRPC servicer: thin. Decode, call the core, encode; errors leave via rpc_method."""

from __future__ import annotations

import copy

import grpc
import torch

from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

from . import steps
from .catalog import build_catalog
from .errors import FailedPrecondition, InvalidArgument, rpc_method
from .sessions import Session, SessionStore


class LossServicer(pb_grpc.LossServiceServicer):
    """Implements lossd.v1.LossService over a SessionStore."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self._catalog = build_catalog()

    @rpc_method
    def ListLosses(self, request: pb.ListLossesRequest, context: grpc.ServicerContext
                   ) -> pb.ListLossesResponse:
        return self._catalog

    @rpc_method
    def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.ServicerContext
                      ) -> pb.Session:
        try:
            config = codec.decode_values(request.config)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        session, created = self.store.create(
            request.loss, config, request.session_id,
            request.seed if request.HasField("seed") else None, request.device)
        return session_message(session, created=created)

    @rpc_method
    def GetSession(self, request: pb.GetSessionRequest, context: grpc.ServicerContext
                   ) -> pb.Session:
        return session_message(self.store.get(request.session_id))

    @rpc_method
    def ListSessions(self, request: pb.ListSessionsRequest, context: grpc.ServicerContext
                     ) -> pb.ListSessionsResponse:
        return pb.ListSessionsResponse(sessions=[session_message(s) for s in self.store.list()])

    @rpc_method
    def DeleteSession(self, request: pb.DeleteSessionRequest, context: grpc.ServicerContext
                      ) -> pb.DeleteSessionResponse:
        self.store.delete(request.session_id)
        return pb.DeleteSessionResponse()

    @rpc_method
    def Compute(self, request: pb.ComputeRequest, context: grpc.ServicerContext
                ) -> pb.ComputeResponse:
        session = self.store.get(request.session_id)
        inputs = steps.decode_inputs(session.spec, request.args, session.device)
        result, grads = steps.run_step(session, inputs)
        return steps.encode_response(inputs, result, grads, session.steps)

    @rpc_method
    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext) -> pb.State:
        session = self.store.get(request.session_id)
        with session.lock:
            return state_message(session)

    @rpc_method
    def SetState(self, request: pb.SetStateRequest, context: grpc.ServicerContext) -> pb.State:
        session = self.store.get(request.session_id)
        tensors = _decode_state(request)
        with session.lock:
            replace_state(session, tensors)
            return state_message(session)


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
    )
    codec.encode_values(session.config, msg.config)
    return msg


def state_message(session: Session) -> pb.State:
    """The session's state tensors (call with the session's lock held)."""
    msg = pb.State(steps=session.steps)
    codec.encode_tensors(session.module.state_dict(), msg.tensors)
    return msg


def _decode_state(request: pb.SetStateRequest) -> dict[str, torch.Tensor]:
    try:
        tensors = codec.decode_tensors(request.tensors)
    except ValueError as error:
        raise InvalidArgument(str(error)) from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidArgument(f"Expected state `{name}` to hold finite values, but it "
                                  "holds NaN or Inf.")
    return tensors


def replace_state(session: Session, tensors: dict[str, torch.Tensor]) -> None:
    """Load `tensors` as the session's whole state, or change nothing.

    Call with the session's lock held. Names must be the loss's state names; shapes that
    do not fit raise FailedPrecondition.
    """
    allowed = set(session.spec.state)
    unknown = sorted(set(tensors) - allowed)
    if unknown:
        raise InvalidArgument(f"{session.loss} has no state {', '.join(map(repr, unknown))}; "
                              f"its state names are {', '.join(sorted(allowed)) or 'none'}")
    missing = sorted(set(session.module.state_dict()) - set(tensors))
    if missing:
        raise InvalidArgument(f"state is missing {', '.join(map(repr, missing))}; SetState "
                              "replaces the whole state")
    # Load into a copy and swap it in, so that a load that fails half way changes nothing.
    candidate = copy.deepcopy(session.module)
    try:
        candidate.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise FailedPrecondition(f"state does not fit this {session.loss} session: {error}"
                                 ) from None
    session.module = candidate
