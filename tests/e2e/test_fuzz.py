"""Property-based fuzzing of the wire contract, through a real server and the raw stub.

Hypothesis starts from valid requests of several losses and breaks them the ways a buggy
or hostile peer could: byte lengths, shapes (negative, absurd, overflowing), dtypes
(unknown, wrong, relabelled, compute_dtype), non-finite and huge floats, empty batches,
view counts and batch sizes, kinds, nesting, argument names, gradient flags, session ids,
bytes said to be elsewhere (chunks, shared memory); it also sends odd CreateSession and
SetState requests. Properties: every call ends with a clear status (never INTERNAL or
UNKNOWN, a message without a traceback); a call that fails changes no state (GetState,
the session's step count, a shared bank's rows, pointer and sessions); a call that
succeeds counts one step, answers finite values and leaves finite state finite; the
server keeps serving, and every fuzzed session still computes a valid step afterwards.
What the fuzz found is pinned down by plain tests at the end."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from lossd.losses import registry
from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc
from lossd.v1 import tensor_pb2 as tpb

TIMEOUT = 30.0  # seconds per call: a hang shows as DEADLINE_EXCEEDED, which fails
#: The statuses a request that is wrong may end with; anything else fails the property.
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
INT64 = st.integers(-(2**63), 2**63 - 1)
FLOAT_DTYPES = (tpb.FLOAT32, tpb.FLOAT64, tpb.FLOAT16, tpb.BFLOAT16)
VALID_DTYPES = (*FLOAT_DTYPES, tpb.INT64, tpb.INT32, tpb.BOOL, tpb.UINT8)


def fuzz_settings(examples: int) -> settings:
    """Bounded runs: no deadline (the server shares two cores), no example database."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


# -- the losses under fuzz: a config and a valid step -------------------------------------


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _ntxent_args(g: torch.Generator, b: int) -> dict[str, Any]:
    return {"out0": _randn(g, b, 8), "out1": _randn(g, b, 8)}


def _dino_args(g: torch.Generator, b: int) -> dict[str, Any]:
    return {
        "teacher_out": [_randn(g, b, 8) for _ in range(2)],
        "student_out": [_randn(g, b, 8) for _ in range(3)],
        "teacher_temp": 0.05,
        "epoch": 3,
    }


def _swav_args(g: torch.Generator, b: int) -> dict[str, Any]:
    return {
        "high_resolution_outputs": [_randn(g, b, 6) for _ in range(2)],
        "low_resolution_outputs": [_randn(g, b, 6)],
        "queue_outputs": [_randn(g, 8, 6) for _ in range(2)],
    }


def _ibot_args(g: torch.Generator, b: int) -> dict[str, Any]:
    mask = torch.rand(b, 2, 2, generator=g) < 0.5
    mask[0, 0, 0] = True
    n = int(mask.sum())
    return {
        "teacher_out": _randn(g, n, 8),
        "student_out": _randn(g, n, 8),
        "mask": mask,
        "teacher_temp": 0.04,
    }


def _msn_args(g: torch.Generator, b: int) -> dict[str, Any]:
    return {
        "anchors": _randn(g, 2 * b, 8),
        "targets": _randn(g, b, 8),
        "prototypes": _randn(g, 5, 8),
        "target_sharpen_temperature": 0.25,
    }


def _vicregl_args(g: torch.Generator, b: int) -> dict[str, Any]:
    return {
        "global_view_features": [(_randn(g, b, 8), _randn(g, b, 2, 2, 3)) for _ in range(2)],
        "global_view_grids": [_randn(g, b, 2, 2, 2) for _ in range(2)],
        "local_view_features": [(_randn(g, b, 8), _randn(g, b, 1, 1, 3))],
        "local_view_grids": [_randn(g, b, 1, 1, 2)],
    }


def _bank_args(g: torch.Generator, b: int) -> dict[str, Any]:
    return {"output": _randn(g, b, 4), "labels": torch.arange(b), "update": True}


@dataclass(frozen=True)
class Target:
    """One session under fuzz: its loss, config and a builder of valid steps."""

    loss: str
    config: dict[str, Any]
    make_args: Callable[[torch.Generator, int], dict[str, Any]]
    shared_bank: bool = False

    @property
    def spec(self) -> registry.LossSpec:
        return registry.get(self.loss)


TARGETS: dict[str, Target] = {
    "ntxent": Target("NTXentLoss", {}, _ntxent_args),
    "ntxent-bank": Target("NTXentLoss", {"memory_bank_size": [32, 8]}, _ntxent_args),
    "ntxent-shared": Target("NTXentLoss", {}, _ntxent_args, shared_bank=True),
    "dino": Target("DINOLoss", {"output_dim": 8}, _dino_args),
    "swav": Target("SwaVLoss", {}, _swav_args),
    "ibot": Target("IBOTPatchLoss", {"output_dim": 8}, _ibot_args),
    "msn": Target("MSNLoss", {}, _msn_args),
    "vicregl": Target("VICRegLLoss", {"num_matches": [2, 1]}, _vicregl_args),
    "memory-bank": Target(
        "MemoryBankModule", {"size": [32, 4], "feature_dim_first": False}, _bank_args
    ),
}


@dataclass(frozen=True)
class Fuzzed:
    """The sessions (by target key) and the shared bank the fuzz runs against, with the
    state each had after its first valid step."""

    sessions: dict[str, str]
    bank: str
    initial: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def bank_of(self, key: str) -> str:
        return self.bank if TARGETS[key].shared_bank else ""


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield pb_grpc.LossServiceStub(channel)


@pytest.fixture(scope="module")
def fuzzed(stub: pb_grpc.LossServiceStub) -> Iterator[Fuzzed]:
    """One session per target (and a shared bank), each past one valid step."""
    tag = uuid.uuid4().hex[:8]
    bank = f"fuzz-bank-{tag}"
    stub.CreateBank(
        pb.CreateBankRequest(name=bank, num_features=32, dim=8, seed=0), timeout=TIMEOUT
    )
    sessions = {}
    for key, spec in TARGETS.items():
        request = pb.CreateSessionRequest(
            loss=spec.loss,
            session_id=f"fuzz-{key}-{tag}",
            seed=0,
            shared_bank=bank if spec.shared_bank else "",
        )
        codec.encode_values(spec.config, request.config)
        sessions[key] = stub.CreateSession(request, timeout=TIMEOUT).session_id
        stub.Compute(valid_request(sessions[key], spec, seed=0, batch=4), timeout=TIMEOUT)
    initial = {
        key: codec.decode_tensors(
            stub.GetState(pb.GetStateRequest(session_id=sid), timeout=TIMEOUT).tensors
        )
        for key, sid in sessions.items()
    }
    yield Fuzzed(
        sessions, bank, {k: {n: t.clone() for n, t in v.items()} for k, v in initial.items()}
    )
    for session_id in sessions.values():
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=TIMEOUT)
    stub.DeleteBank(pb.DeleteBankRequest(name=bank), timeout=TIMEOUT)


def valid_request(session_id: str, spec: Target, seed: int, batch: int) -> pb.ComputeRequest:
    """A valid Compute of `spec`'s loss, every float tensor asking for its gradient."""
    request = pb.ComputeRequest(session_id=session_id, request_id=uuid.uuid4().hex)
    args = spec.make_args(torch.Generator().manual_seed(seed), batch)
    codec.encode_values(args, request.args, wants_grad=lambda t: t.is_floating_point())
    return request


# -- checking: clear statuses, unchanged state ---------------------------------------------


def assert_clear_failure(error: grpc.RpcError, what: str) -> None:
    """The failure has one of the expected codes and a non-empty message, no traceback."""
    code, details = error.code(), error.details() or ""
    assert code in CLEAR, f"{what}: {code.name} {details!r}"
    assert details.strip(), f"{what}: {code.name} without a message"
    assert "Traceback" not in details, f"{what}: {details!r}"


def snapshot(stub: pb_grpc.LossServiceStub, session_id: str, bank: str = "") -> dict[str, Any]:
    """Everything a failed call must leave as it was: the session's state and step counts,
    and a shared bank's rows, pointer, row count and sessions."""
    state = stub.GetState(pb.GetStateRequest(session_id=session_id), timeout=TIMEOUT)
    found: dict[str, Any] = {
        "steps": state.steps,
        "session.steps": stub.GetSession(
            pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT
        ).steps,
    }
    found.update({f"state {k}": v.clone() for k, v in codec.decode_tensors(state.tensors).items()})
    if bank:
        info = stub.GetBank(pb.GetBankRequest(name=bank), timeout=TIMEOUT)
        found.update(
            {
                "bank.pointer": info.pointer,
                "bank.rows_written": info.rows_written,
                "bank.sessions": sorted(info.sessions),
            }
        )
        rows = stub.GetBankState(pb.GetBankRequest(name=bank), timeout=TIMEOUT)
        tensors = codec.decode_tensors(rows.tensors)
        found.update({f"bank {k}": v.clone() for k, v in tensors.items()})
    return found


def assert_same(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    """Two snapshots are equal, tensors exactly (dtype included)."""
    assert before.keys() == after.keys(), f"{what}: state names changed"
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == after[key].dtype, f"{what}: {key} changed dtype"
            assert value.shape == after[key].shape, f"{what}: {key} changed shape"
            same = codec.tensor_bytes(value) == codec.tensor_bytes(after[key])  # NaN == NaN
            assert same, f"{what}: {key} changed"
        else:
            assert value == after[key], f"{what}: {key} {value!r} -> {after[key]!r}"


# -- strategies: odd values and tensors ----------------------------------------------------


def _itemsize(dtype: int) -> int:
    return torch.empty((), dtype=codec.torch_dtype(dtype)).element_size()


@st.composite
def raw_tensors(draw: st.DrawFn) -> tpb.Tensor:
    """A small Tensor message: any dtype (unknown ones too), bytes that usually fit."""
    dtype = draw(st.one_of(st.sampled_from(VALID_DTYPES), st.integers(0, 12)), label="dtype")
    shape = draw(st.lists(st.integers(0, 4), max_size=4), label="shape")
    size = math.prod(shape) * (_itemsize(dtype) if dtype in VALID_DTYPES else 4)
    data = draw(
        st.one_of(
            st.binary(min_size=size, max_size=size), st.just(bytes(size)), st.binary(max_size=64)
        ),
        label="data",
    )
    return tpb.Tensor(dtype=dtype, shape=shape, data=data, requires_grad=draw(st.booleans()))


def _container(items: list[tpb.Value], as_tuple: bool) -> tpb.Value:
    value = tpb.Value()
    box = value.tuple if as_tuple else value.list
    box.SetInParent()  # an empty list is still a list
    for item in items:
        box.items.add().CopyFrom(item)
    return value


SCALARS = st.one_of(
    st.floats().map(lambda x: tpb.Value(number=x)),
    INT64.map(lambda i: tpb.Value(integer=i)),
    st.booleans().map(lambda b: tpb.Value(flag=b)),
    st.text(max_size=12).map(lambda s: tpb.Value(text=s)),
    st.builds(lambda: tpb.Value(none=True)),
    st.builds(tpb.Value),  # no kind at all
    st.text(max_size=12).map(lambda s: tpb.Value(input_ref=s)),
)
VALUES = st.recursive(
    st.one_of(SCALARS, raw_tensors().map(lambda t: tpb.Value(tensor=t))),
    lambda children: st.builds(_container, st.lists(children, max_size=3), st.booleans()),
    max_leaves=6,
)
SHAPES = st.one_of(
    st.tuples(st.lists(INT64, max_size=4), st.integers(-(2**63), -1), st.integers(0, 4)).map(
        lambda t: [*t[0][: t[2]], t[1], *t[0][t[2] :]]
    ),  # a negative extent somewhere
    st.lists(st.integers(2**31, 2**63 - 1), min_size=1, max_size=4),  # products overflow int64
    st.lists(st.integers(2**20, 2**63 - 1), min_size=1, max_size=3).flatmap(
        lambda s: st.permutations([*s, 0])
    ),  # zero bytes, absurd extents
    st.lists(st.integers(2**32, 2**63 - 1), min_size=2, max_size=3).map(
        lambda s: [0, *s]
    ),  # zero bytes, and strides that overflow int64
    st.integers(17, 64).map(lambda n: [1] * n),  # more dims than allowed
    st.just([]),
    st.lists(st.integers(0, 6), max_size=4),
)


# -- mutations of one Tensor message -------------------------------------------------------


def _decoded(msg: tpb.Tensor) -> torch.Tensor | None:
    """The tensor a message holds (a copy), or None if it no longer decodes."""
    try:
        return codec.decode_tensor(msg, "t").clone()
    except (ValueError, RuntimeError):  # RuntimeError: the codec's own overflow bug
        return None


def _reencode(msg: tpb.Tensor, t: torch.Tensor) -> None:
    codec.encode_tensor(t, requires_grad=msg.requires_grad, out=msg)


def t_byte_length(data: st.DataObject, msg: tpb.Tensor) -> None:
    """Too few or too many bytes for the shape and dtype."""
    delta = data.draw(st.integers(1, 64), label="bytes") * data.draw(st.sampled_from([-1, 1]))
    msg.data = msg.data[: max(0, len(msg.data) + delta)] if delta < 0 else msg.data + bytes(delta)


def t_shape(data: st.DataObject, msg: tpb.Tensor) -> None:
    """Another shape: negative, absurd, overflowing, too many dims, scalar or small."""
    shape = data.draw(SHAPES, label="shape")
    msg.shape[:] = shape
    if msg.dtype in VALID_DTYPES and data.draw(st.booleans(), label="bytes fit"):
        size = math.prod(shape) * _itemsize(msg.dtype)
        if 0 <= size <= 4096:
            msg.data = bytes(size)


def t_dtype(data: st.DataObject, msg: tpb.Tensor) -> None:
    """An unknown dtype, the same bytes under another dtype, or a converted tensor."""
    how = data.draw(st.sampled_from(["unknown", "relabel", "convert"]), label="dtype change")
    if how == "unknown":
        msg.dtype = data.draw(
            st.one_of(st.just(0), st.integers(9, 2**31 - 1), st.integers(-(2**31), -1)),
            label="dtype",
        )
        return
    dtype = data.draw(st.sampled_from(VALID_DTYPES), label="dtype")
    if how == "relabel":
        msg.dtype = dtype
        return
    t = _decoded(msg)
    if t is None:
        return
    wanted = codec.torch_dtype(dtype)
    if wanted == torch.bool:
        t = t != 0
    elif not wanted.is_floating_point and t.is_floating_point():
        t = (t * 3).round().abs().to(wanted)
    else:
        t = t.to(wanted)
    _reencode(msg, t)


def t_non_finite(data: st.DataObject, msg: tpb.Tensor) -> None:
    """NaN, Inf or -Inf in a float tensor."""
    t = _decoded(msg)
    if t is None or not t.is_floating_point() or t.numel() == 0:
        return
    flat = t.reshape(-1)
    for _ in range(data.draw(st.integers(1, 3), label="non-finite count")):
        index = data.draw(st.integers(0, flat.numel() - 1), label="index")
        flat[index] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
    _reencode(msg, t)


def t_huge(data: st.DataObject, msg: tpb.Tensor) -> None:
    """Finite but huge values (up to the dtype's largest), which may overflow inside."""
    t = _decoded(msg)
    if t is None or not t.is_floating_point() or t.numel() == 0:
        return
    big = torch.finfo(t.dtype).max
    scale = min(big, 10.0 ** data.draw(st.integers(1, 308), label="power of ten"))
    t = (t.double() * scale).clamp(-big, big).to(t.dtype)
    _reencode(msg, t)


def _resize(data: st.DataObject, msg: tpb.Tensor, dim: int) -> None:
    """Another extent along `dim` (0: the batch), bytes that fit; 0 makes it empty."""
    t = _decoded(msg)
    if t is None or t.dim() == 0:
        return
    old = t.shape[dim]
    new = data.draw(st.integers(0, 2 * old + 3), label=f"extent of dim {dim}")
    index = torch.arange(new) % max(old, 1)
    if old == 0:
        shape = list(t.shape)
        shape[dim] = new
        _reencode(msg, torch.zeros(shape, dtype=t.dtype))
    else:
        _reencode(msg, t.index_select(dim, index))


def t_rows(data: st.DataObject, msg: tpb.Tensor) -> None:
    """Another batch size (0: an empty batch)."""
    _resize(data, msg, 0)


def t_columns(data: st.DataObject, msg: tpb.Tensor) -> None:
    """Another extent of the last dim (feature dim, grid coordinates, ...)."""
    t = _decoded(msg)
    if t is not None and t.dim() > 0:
        _resize(data, msg, t.dim() - 1)


def t_requires_grad(data: st.DataObject, msg: tpb.Tensor) -> None:
    """Flip the gradient flag (bool and int tensors asking for a gradient)."""
    msg.requires_grad = not msg.requires_grad


def t_elsewhere(data: st.DataObject, msg: tpb.Tensor) -> None:
    """Bytes said to be elsewhere: in chunks (none follow a unary call) or in a shared
    memory region the session never attached."""
    if "shared" in _TENSOR_FIELDS and data.draw(st.booleans(), label="shared"):
        msg.shared.region = data.draw(st.text(max_size=24), label="region")
        msg.shared.offset = data.draw(INT64, label="offset")
    else:
        msg.chunked = True
    if data.draw(st.booleans(), label="drop data"):
        msg.data = b""


_TENSOR_FIELDS = set(tpb.Tensor.DESCRIPTOR.fields_by_name)
_REQUEST_FIELDS = set(pb.ComputeRequest.DESCRIPTOR.fields_by_name)
TENSOR_MUTATIONS: dict[str, Callable[[st.DataObject, tpb.Tensor], None]] = {
    "byte length": t_byte_length,
    "shape": t_shape,
    "dtype": t_dtype,
    "non-finite": t_non_finite,
    "rows": t_rows,
    "columns": t_columns,
    "requires_grad": t_requires_grad,
    "elsewhere": t_elsewhere,
    "huge": t_huge,
}


# -- mutations of a ComputeRequest ---------------------------------------------------------


def _tensor_slots(value: tpb.Value) -> list[tpb.Tensor]:
    kind = value.WhichOneof("kind")
    if kind == "tensor":
        return [value.tensor]
    if kind in ("list", "tuple"):
        return [t for item in getattr(value, kind).items for t in _tensor_slots(item)]
    return []


def _all_tensors(request: pb.ComputeRequest) -> list[tpb.Tensor]:
    return [t for name in sorted(request.args) for t in _tensor_slots(request.args[name])]


def _pick_arg(data: st.DataObject, request: pb.ComputeRequest) -> str | None:
    names = sorted(request.args)
    return data.draw(st.sampled_from(names), label="argument") if names else None


def m_tensor(data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec) -> None:
    """One tensor of the request, broken one way."""
    slots = _all_tensors(request)
    if not slots:
        return
    msg = slots[data.draw(st.integers(0, len(slots) - 1), label="tensor")]
    how = data.draw(st.sampled_from(sorted(TENSOR_MUTATIONS)), label="tensor mutation")
    TENSOR_MUTATIONS[how](data, msg)


def m_empty_batch(data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec) -> None:
    """Every tensor of the request (or of one argument) with 0 rows."""
    name = _pick_arg(data, request)
    every = data.draw(st.booleans(), label="every argument")
    for arg in sorted(request.args):
        if not every and arg != name:
            continue
        for msg in _tensor_slots(request.args[arg]):
            if len(msg.shape) > 0 and msg.dtype in VALID_DTYPES:
                msg.shape[0] = 0
                msg.data = b""


def m_views(data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec) -> None:
    """A list argument with a view dropped, repeated, emptied, foreign or of the other kind."""
    lists = [
        n for n in sorted(request.args) if request.args[n].WhichOneof("kind") in ("list", "tuple")
    ]
    if not lists:
        return
    value = request.args[data.draw(st.sampled_from(lists), label="list argument")]
    kind = value.WhichOneof("kind")
    items = getattr(value, kind).items
    how = data.draw(
        st.sampled_from(["drop", "repeat", "clear", "append", "swap kind"]), label="view change"
    )
    if how == "drop" and len(items):
        del items[data.draw(st.integers(0, len(items) - 1), label="view")]
    elif how == "repeat" and len(items):
        items.add().CopyFrom(items[data.draw(st.integers(0, len(items) - 1), label="view")])
    elif how == "clear":
        del items[:]
    elif how == "append":
        items.add().CopyFrom(data.draw(VALUES, label="foreign view"))
    elif how == "swap kind":
        copied = [tpb.Value() for _ in items]
        for new, old in zip(copied, items):
            new.CopyFrom(old)
        value.CopyFrom(_container(copied, as_tuple=kind == "list"))


def m_kind(data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec) -> None:
    """An argument (present or not) replaced by a value of any kind."""
    name = data.draw(
        st.sampled_from(sorted({a.name for a in spec.args} | set(request.args))), label="argument"
    )
    request.args[name].CopyFrom(data.draw(VALUES, label="value"))


def m_scalar(data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec) -> None:
    """A number, integer or flag argument set to an odd scalar (NaN, huge, text, None...)."""
    names = [a.name for a in spec.args if not a.is_tensor] or [a.name for a in spec.args]
    name = data.draw(st.sampled_from(names), label="argument")
    request.args[name].CopyFrom(data.draw(SCALARS, label="scalar"))


def m_nest(data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec) -> None:
    """An argument wrapped in lists and tuples (up to 40 levels, below protobuf's limit)."""
    name = _pick_arg(data, request)
    if name is None:
        return
    inner = tpb.Value()
    inner.CopyFrom(request.args[name])
    outer = request.args[name]
    outer.Clear()
    slot = outer
    for _ in range(data.draw(st.integers(1, 40), label="levels")):
        box = slot.tuple if data.draw(st.booleans(), label="tuple") else slot.list
        slot = box.items.add()
    slot.CopyFrom(inner)


def m_unknown_arg(data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec) -> None:
    """An argument the loss does not have."""
    known = {a.name for a in spec.args}
    name = data.draw(st.text(max_size=16).filter(lambda s: s not in known), label="name")
    request.args[name].CopyFrom(data.draw(VALUES, label="value"))


def m_missing(data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec) -> None:
    """An argument left out (required or not)."""
    name = _pick_arg(data, request)
    if name is not None:
        del request.args[name]


def m_session(data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec) -> None:
    """A session id the server does not have (empty, long, odd characters)."""
    request.session_id = data.draw(
        st.one_of(st.text(max_size=200), st.uuids().map(lambda u: f"fuzz-missing-{u.hex}")),
        label="session id",
    )


def m_global_batch(
    data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec
) -> None:
    """A global-batch shard with a rank outside [0, world_size) (never one that waits)."""
    world = data.draw(st.integers(-3, 64), label="world_size")
    rank = data.draw(st.integers(-(2**31), 2**31 - 1), label="rank")
    if world >= 2 and 0 <= rank < world:
        rank = world
    request.global_batch.CopyFrom(
        pb.GlobalBatch(world_size=world, rank=rank, step=data.draw(INT64, label="step"))
    )


def m_compute_dtype(
    data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec
) -> None:
    """Compute in another dtype: any of the wire's (ints too) or an unknown one."""
    request.compute_dtype = data.draw(
        st.one_of(
            st.sampled_from(VALID_DTYPES), st.integers(9, 2**31 - 1), st.integers(-(2**31), -1)
        ),
        label="compute_dtype",
    )


def m_shared_output(
    data: st.DataObject, request: pb.ComputeRequest, spec: registry.LossSpec
) -> None:
    """Answer into a shared-memory region the session never attached, at odd offsets."""
    request.shared_region = data.draw(st.text(max_size=24), label="shared_region")
    request.shared_output_offset = data.draw(INT64, label="offset")
    request.shared_output_capacity = data.draw(INT64, label="capacity")


MUTATIONS: dict[str, Callable[[st.DataObject, pb.ComputeRequest, registry.LossSpec], None]] = {
    "tensor": m_tensor,
    "empty batch": m_empty_batch,
    "views": m_views,
    "kind": m_kind,
    "scalar": m_scalar,
    "nest": m_nest,
    "unknown argument": m_unknown_arg,
    "missing": m_missing,
    "session": m_session,
    "global batch": m_global_batch,
}
if "compute_dtype" in _REQUEST_FIELDS:  # newer contract: mixed precision, shared memory
    MUTATIONS["compute dtype"] = m_compute_dtype
if "shared_region" in _REQUEST_FIELDS:
    MUTATIONS["shared output"] = m_shared_output


# -- the properties ------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(TARGETS))
def test_valid_steps_succeed_and_count(
    stub: pb_grpc.LossServiceStub, fuzzed: Fuzzed, key: str
) -> None:
    """The unbroken requests the fuzz starts from are valid (so a failure below is the
    mutation's doing) and count as a step."""
    session_id = fuzzed.sessions[key]
    before = snapshot(stub, session_id, fuzzed.bank_of(key))
    reply = stub.Compute(valid_request(session_id, TARGETS[key], seed=1, batch=3), timeout=TIMEOUT)
    assert reply.steps == before["steps"] + 1


@fuzz_settings(examples=1000)
@given(data=st.data())
def test_fuzzed_compute_fails_cleanly_and_changes_nothing(
    stub: pb_grpc.LossServiceStub, fuzzed: Fuzzed, data: st.DataObject
) -> None:
    key = data.draw(st.sampled_from(sorted(TARGETS)), label="target")
    spec = TARGETS[key]
    request = valid_request(
        fuzzed.sessions[key],
        spec,
        seed=data.draw(st.integers(0, 2**16)),
        batch=data.draw(st.integers(2, 5), label="batch"),
    )
    names = data.draw(
        st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3), label="mutations"
    )
    for name in names:
        MUTATIONS[name](data, request, spec.spec)
    session_id, bank = fuzzed.sessions[key], fuzzed.bank_of(key)
    before = snapshot(stub, session_id, bank)
    try:
        reply = stub.Compute(request, timeout=TIMEOUT)
    except grpc.RpcError as error:
        note(f"{error.code().name}: {error.details()}")
        event(f"Compute: {error.code().name}")
        assert_clear_failure(error, f"Compute on {key} after {names}")
        assert_same(before, snapshot(stub, session_id, bank), f"failed Compute on {key}")
        return
    event("Compute: OK")
    assert_good_step(reply, before, snapshot(stub, session_id, bank), f"{key} after {names}")


def assert_good_step(
    reply: pb.ComputeResponse, before: dict[str, Any], after: dict[str, Any], what: str
) -> None:
    """A successful step counts once, answers finite values and leaves finite state
    finite (lossd refuses input that would make a NaN loss or a NaN center)."""
    assert reply.steps == after["steps"] == before["steps"] + 1, f"{what}: steps"
    for key, value in after.items():
        was_finite = (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and bool(torch.isfinite(before[key]).all())
        )
        if was_finite:
            assert bool(torch.isfinite(value).all()), f"{what}: {key} is no longer finite"
    for t in _tensor_slots(reply.result):
        result = codec.decode_tensor(t, "result")
        assert bool(torch.isfinite(result).all()), f"{what}: answered {result}"


@fuzz_settings(examples=300)
@given(data=st.data())
def test_fuzzed_set_state_fails_cleanly_and_changes_nothing(
    stub: pb_grpc.LossServiceStub, fuzzed: Fuzzed, data: st.DataObject
) -> None:
    key = data.draw(st.sampled_from(sorted(TARGETS)), label="target")
    session_id, bank = fuzzed.sessions[key], fuzzed.bank_of(key)
    before = snapshot(stub, session_id, bank)
    on_bank = bool(bank) and data.draw(st.booleans(), label="SetBankState")
    tensors = (
        {k.removeprefix("bank "): v for k, v in before.items() if k.startswith("bank ")}
        if on_bank
        else {k.removeprefix("state "): v for k, v in before.items() if k.startswith("state ")}
    )
    messages = {name: codec.encode_tensor(t) for name, t in tensors.items()}
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        how = data.draw(
            st.sampled_from(["drop", "unknown", "replace", "pointer", "tensor"]),
            label="state change",
        )
        names = sorted(messages)
        if how == "drop" and names:
            del messages[data.draw(st.sampled_from(names), label="name")]
        elif how == "unknown":
            messages[data.draw(st.text(max_size=24), label="name")] = data.draw(raw_tensors())
        elif how == "replace" and names:
            messages[data.draw(st.sampled_from(names), label="name")] = data.draw(raw_tensors())
        elif how == "pointer":
            pointer = [n for n in names if n.endswith("bank_ptr")] or ["bank_ptr"]
            value = data.draw(
                st.one_of(
                    INT64.map(lambda i: torch.tensor([i])),
                    st.floats(width=32).map(lambda x: torch.tensor([x])),
                ),
                label="pointer",
            )
            messages[pointer[0]] = codec.encode_tensor(value)
        elif how == "tensor" and names:
            msg = messages[data.draw(st.sampled_from(names), label="name")]
            mutation = data.draw(st.sampled_from(sorted(TENSOR_MUTATIONS)), label="mutation")
            TENSOR_MUTATIONS[mutation](data, msg)
    if on_bank:
        request: Any = pb.SetBankStateRequest(name=bank)
        call = stub.SetBankState
    else:
        request = pb.SetStateRequest(session_id=session_id)
        call = stub.SetState
    for name, msg in messages.items():
        request.tensors[name].CopyFrom(msg)
    try:
        call(request, timeout=TIMEOUT)
    except grpc.RpcError as error:
        note(f"{error.code().name}: {error.details()}")
        event(f"SetState: {error.code().name}")
        assert_clear_failure(error, f"SetState on {key}")
        assert_same(before, snapshot(stub, session_id, bank), f"failed SetState on {key}")
        return
    event("SetState: OK")
    if bank:  # a loaded pointer is where the next enqueue goes
        after = snapshot(stub, session_id, bank)
        assert after["bank.pointer"] == int(after["bank bank_ptr"])


CONFIG_INTS = st.one_of(
    st.integers(-4, 64), st.integers(2**40, 2**63 - 1), st.integers(-(2**63), -1)
)
CONFIG_VALUES = st.one_of(
    CONFIG_INTS.map(lambda i: tpb.Value(integer=i)),
    st.lists(CONFIG_INTS, max_size=3).flatmap(
        lambda ints: st.builds(
            _container, st.just([tpb.Value(integer=i) for i in ints]), st.booleans()
        )
    ),
    VALUES,
)
DEVICES = st.one_of(
    st.sampled_from(
        ["", "cpu", "cpu:0", "auto", "cuda", "cuda:7", "meta", "mps", "tpu:0", "cpu:-1"]
    ),
    st.text(max_size=12),
)


@fuzz_settings(examples=300)
@given(data=st.data())
def test_fuzzed_create_session_fails_cleanly_and_creates_nothing(
    stub: pb_grpc.LossServiceStub, fuzzed: Fuzzed, data: st.DataObject
) -> None:
    spec = TARGETS[data.draw(st.sampled_from(sorted(TARGETS)), label="like")]
    odd_loss = data.draw(st.integers(0, 3), label="odd loss") == 0
    loss = data.draw(st.text(max_size=16), label="loss") if odd_loss else spec.loss
    config = {name: codec.encode_value(value) for name, value in spec.config.items()}
    params = list(spec.spec.constructor.parameters)
    for _ in range(data.draw(st.integers(0, 2), label="config changes")):
        name = data.draw(st.one_of(st.sampled_from(params), st.text(max_size=12)), label="name")
        if name in config and data.draw(st.booleans(), label="drop"):
            del config[name]
        else:
            config[name] = data.draw(CONFIG_VALUES, label="value")
    request = pb.CreateSessionRequest(
        loss=loss,
        device=data.draw(st.one_of(st.just(""), DEVICES), label="device"),
        session_id=data.draw(
            st.one_of(
                st.uuids().map(lambda u: f"fuzz-new-{u.hex}"),
                st.text(max_size=140),
                st.sampled_from(sorted(fuzzed.sessions.values())),
            ),
            label="session id",
        ),
        shared_bank=data.draw(
            st.sampled_from(["", "", "", fuzzed.bank, "fuzz-no-such-bank"]), label="shared bank"
        ),
        shared_bank_dtype=data.draw(
            st.one_of(st.just(0), st.sampled_from(VALID_DTYPES), st.integers(9, 2**31 - 1)),
            label="bank dtype",
        ),
    )
    for name, value in config.items():
        request.config[name].CopyFrom(value)
    if data.draw(st.booleans(), label="seeded"):
        request.seed = data.draw(INT64, label="seed")
    sessions_before = _session_ids(stub)
    bank_before = snapshot_bank(stub, fuzzed.bank)
    try:
        reply = stub.CreateSession(request, timeout=TIMEOUT)
    except grpc.RpcError as error:
        note(f"{error.code().name}: {error.details()}")
        event(f"CreateSession: {error.code().name}")
        assert_clear_failure(error, f"CreateSession {loss}")
        assert _session_ids(stub) == sessions_before, "a failed CreateSession left a session"
        assert snapshot_bank(stub, fuzzed.bank) == bank_before
        return
    event(f"CreateSession: OK, created={reply.created}")
    if reply.created:
        assert reply.session_id not in sessions_before
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=reply.session_id), timeout=TIMEOUT)
    else:
        assert reply.session_id in sessions_before


def _session_ids(stub: pb_grpc.LossServiceStub) -> set[str]:
    return {
        s.session_id for s in stub.ListSessions(pb.ListSessionsRequest(), timeout=TIMEOUT).sessions
    }


def snapshot_bank(stub: pb_grpc.LossServiceStub, bank: str) -> tuple[int, int, list[str]]:
    info = stub.GetBank(pb.GetBankRequest(name=bank), timeout=TIMEOUT)
    return info.pointer, info.rows_written, sorted(info.sessions)


def _nested(depth: int) -> tpb.Value:
    """A tensor wrapped in `depth` lists (built in place: protobuf's constructors copy
    through its parser, which refuses the deepest of these)."""
    value = tpb.Value()
    slot = value
    for _ in range(depth):
        slot = slot.list.items.add()
    codec.encode_value(torch.ones(4, 8), out=slot)
    return value


@pytest.mark.parametrize("depth", [9, 30, 48, 49, 64, 200])
def test_deep_nesting_is_a_clear_status(
    stub: pb_grpc.LossServiceStub, fuzzed: Fuzzed, depth: int
) -> None:
    """Nesting past lossd's limit (8) is INVALID_ARGUMENT, also past protobuf's parser
    limit (100 message levels: about 49 list levels inside a ComputeRequest)."""
    session_id = fuzzed.sessions["ntxent-bank"]
    request = valid_request(session_id, TARGETS["ntxent-bank"], seed=2, batch=4)
    request.args["out0"].CopyFrom(_nested(depth))
    before = snapshot(stub, session_id)
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(request, timeout=TIMEOUT)
    assert_clear_failure(info.value, f"Compute with {depth} levels")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_same(before, snapshot(stub, session_id), f"{depth} levels")


@pytest.mark.parametrize(
    "payload", [b"\xff\xff\xff\xff", b"\x1a\x05\x0a\x03abc\x0a"], ids=["garbage", "truncated"]
)
def test_unparsable_request_is_a_clear_status(target: str, payload: bytes) -> None:
    """Bytes that are no ComputeRequest at all: INVALID_ARGUMENT, not INTERNAL."""
    with grpc.insecure_channel(target) as channel:
        compute = channel.unary_unary("/lossd.v1.LossService/Compute")
        with pytest.raises(grpc.RpcError) as info:
            compute(payload, timeout=TIMEOUT)
    assert_clear_failure(info.value, "unparsable Compute")


# -- what the fuzz found, pinned down -------------------------------------------------------


OVERFLOWING = [0, 2**62, 2**62]  # no bytes, but torch cannot compute its strides


@pytest.mark.parametrize("call", ["Compute", "SetState", "CreateSession"])
def test_empty_tensor_with_overflowing_extents_is_invalid(
    stub: pb_grpc.LossServiceStub, fuzzed: Fuzzed, call: str
) -> None:
    """A tensor of 0 elements whose other extents overflow int64 strides is
    INVALID_ARGUMENT wherever tensors are decoded, not INTERNAL."""
    session_id = fuzzed.sessions["ntxent-bank"]
    bad = tpb.Tensor(dtype=tpb.FLOAT32, shape=OVERFLOWING, data=b"")
    request: Any
    if call == "Compute":
        request = valid_request(session_id, TARGETS["ntxent-bank"], seed=4, batch=4)
        request.args["out0"].tensor.CopyFrom(bad)
    elif call == "SetState":
        request = pb.SetStateRequest(session_id=session_id)
        request.tensors["memory_bank.bank"].CopyFrom(bad)
        request.tensors["memory_bank.bank_ptr"].CopyFrom(codec.encode_tensor(torch.tensor([0])))
    else:
        request = pb.CreateSessionRequest(loss="NTXentLoss", session_id=f"fuzz-{uuid.uuid4().hex}")
        request.config["temperature"].tensor.CopyFrom(bad)
    before = snapshot(stub, session_id)
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, call)(request, timeout=TIMEOUT)
    assert_clear_failure(info.value, f"{call} with shape {OVERFLOWING}")
    assert_same(before, snapshot(stub, session_id), call)


@pytest.mark.parametrize("dtype", [tpb.FLOAT16, tpb.BFLOAT16], ids=["float16", "bfloat16"])
def test_msn_in_half_precision_answers_a_finite_loss(
    stub: pb_grpc.LossServiceStub, fuzzed: Fuzzed, dtype: int
) -> None:
    """MSN computed in half precision (compute_dtype) on ordinary inputs: a finite loss."""
    session_id = fuzzed.sessions["msn"]
    g = torch.Generator().manual_seed(0)
    request = pb.ComputeRequest(
        session_id=session_id, request_id=uuid.uuid4().hex, compute_dtype=dtype
    )
    codec.encode_values(
        {"anchors": _randn(g, 6, 8), "targets": _randn(g, 3, 8), "prototypes": _randn(g, 5, 8)},
        request.args,
    )
    reply = stub.Compute(request, timeout=TIMEOUT)
    loss = codec.decode_value(reply.result, "result")
    assert bool(torch.isfinite(loss).all()), f"answered {loss}"


@pytest.mark.parametrize(
    "teacher",
    [torch.full((4, 8), 3e38), torch.full((4, 8), 1e300, dtype=torch.float64)],
    ids=["float32 3e38", "float64 1e300"],
)
def test_finite_teacher_outputs_never_make_the_dino_center_infinite(
    stub: pb_grpc.LossServiceStub, teacher: torch.Tensor
) -> None:
    """Finite but huge teacher outputs either fail cleanly (changing nothing) or leave a
    finite center, so that the next ordinary step still answers a finite loss."""
    request = pb.CreateSessionRequest(loss="DINOLoss", session_id=f"fuzz-{uuid.uuid4().hex}")
    codec.encode_values({"output_dim": 8}, request.config)
    session_id = stub.CreateSession(request, timeout=TIMEOUT).session_id
    try:
        huge = pb.ComputeRequest(session_id=session_id, request_id=uuid.uuid4().hex)
        g = torch.Generator().manual_seed(0)
        student = _randn(g, 4, 8).to(teacher.dtype)
        codec.encode_values(
            {"teacher_out": [teacher, teacher], "student_out": [student] * 2}, huge.args
        )
        before = snapshot(stub, session_id)
        try:
            stub.Compute(huge, timeout=TIMEOUT)
        except grpc.RpcError as error:
            assert_clear_failure(error, "Compute with huge teacher outputs")
            assert_same(before, snapshot(stub, session_id), "failed Compute")
        center = snapshot(stub, session_id)["state center"]
        assert bool(torch.isfinite(center).all()), f"the center is now {center}"
        normal = pb.ComputeRequest(session_id=session_id, request_id=uuid.uuid4().hex)
        codec.encode_values(
            {"teacher_out": [_randn(g, 4, 8)] * 2, "student_out": [_randn(g, 4, 8)] * 2},
            normal.args,
        )
        loss = codec.decode_value(stub.Compute(normal, timeout=TIMEOUT).result, "result")
        assert bool(torch.isfinite(loss).all()), f"the next ordinary step answered {loss}"
    finally:
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=TIMEOUT)


def test_server_still_serves_after_the_fuzz(
    target: str, stub: pb_grpc.LossServiceStub, fuzzed: Fuzzed
) -> None:
    """Health answers SERVING, and every fuzzed session computes a valid step (no lock
    was left held). A SetState that succeeded may have loaded huge but finite values (the
    caller's garbage, refused by later steps as non-finite losses), so each session first
    gets its state after its first step back."""
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lossd.v1.LossService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    for key, session_id in fuzzed.sessions.items():
        restore = pb.SetStateRequest(session_id=session_id)
        codec.encode_tensors(fuzzed.initial[key], restore.tensors)
        stub.SetState(restore, timeout=TIMEOUT)
        steps = snapshot(stub, session_id)["steps"]
        reply = stub.Compute(
            valid_request(session_id, TARGETS[key], seed=3, batch=4), timeout=TIMEOUT
        )
        assert reply.steps == steps + 1, key
