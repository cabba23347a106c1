"""Bad input raises ValueError naming the argument, never a bare torch error, and changes
no state. Property-based: hypothesis builds a valid call for each loss, then breaks one
thing about it."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lossd.losses import (
    BarlowTwinsLoss,
    CO2Regularizer,
    DCLLoss,
    DCLWLoss,
    DINOLoss,
    HypersphereLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    MemoryBankModule,
    MMCRLoss,
    MSNLoss,
    NegativeCosineSimilarity,
    NTXentLoss,
    PMSNCustomLoss,
    PMSNLoss,
    SwaVLoss,
    SymNegCosineSimilarityLoss,
    TiCoLoss,
    VICRegLLoss,
    VICRegLoss,
)
from lossd.losses.registry import LOSSES, Batch, DType, Kind
from tests.losses.cases import assert_same_state, snapshot

SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

Data = st.DataObject

# -- how an error must look -------------------------------------------------------------------

_FORMULA = re.compile(r"^Expected `[^`]+` to be .+, but got .+\.$", re.DOTALL)


def named_arguments(message: str) -> set[str]:
    """The argument names in the message's first backticked segment, without indices:
    "`teacher_out[1]`" -> {"teacher_out"}; "`a and b`" -> {"a", "b"}."""
    segments = re.findall(r"`([^`]+)`", message)
    assert segments, f"no argument in backticks: {message!r}"
    return {re.sub(r"\[.*$", "", part).strip() for part in segments[0].split(" and ")}


def assert_value_error(
    call: Callable[[], Any], names: set[str], module: nn.Module | None = None
) -> None:
    """`call` raises ValueError in lossd's formula, naming one of `names` first, and leaves
    the module's state as it was."""
    before = None if module is None else snapshot(module)
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert _FORMULA.match(message), f"not the formula: {message!r}"
    assert named_arguments(message) & names, f"{message!r} names none of {names}"
    if module is not None:
        assert_same_state(snapshot(module), before, "after the failed call")


# -- building valid calls ---------------------------------------------------------------------


@dataclass
class Call:
    """A module and keyword arguments that make a valid forward call."""

    module: nn.Module
    args: dict[str, Any]
    sizes: dict[str, int]


def _gen(data: Data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def _size(data: Data, label: str, lo: int = 2, hi: int = 5) -> int:
    return data.draw(st.integers(lo, hi), label=label)


class Maker:
    """Random tensors from one hypothesis-seeded generator."""

    def __init__(self, data: Data) -> None:
        self.g = _gen(data)

    def __call__(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.g)


def _two_views(cls: type[nn.Module], a: str, b: str, **config: Any) -> Callable[[Data], Call]:
    def make(data: Data) -> Call:
        r, batch, dim = Maker(data), _size(data, "B"), _size(data, "D")
        return Call(cls(**config), {a: r(batch, dim), b: r(batch, dim)}, {"B": batch, "D": dim})

    return make


def _ntxent(data: Data) -> Call:
    r, batch, dim = Maker(data), _size(data, "B", 1), _size(data, "D")
    bank = data.draw(st.sampled_from(["none", "tuple", "lazy"]), label="bank")
    n = _size(data, "n", 1, 8)
    module = NTXentLoss(memory_bank_size={"none": 0, "tuple": (n, dim), "lazy": n}[bank])
    if bank != "none" and data.draw(st.booleans(), label="warm"):
        module(r(batch, dim).requires_grad_(), r(batch, dim))
    return Call(
        module,
        {"out0": r(batch, dim).requires_grad_(), "out1": r(batch, dim)},
        {"B": batch, "D": dim, "bank": int(bank != "none")},
    )


def _co2(data: Data) -> Call:
    r, batch, dim = Maker(data), _size(data, "B", 1), _size(data, "D")
    bank = data.draw(st.booleans(), label="bank")
    module = CO2Regularizer(memory_bank_size=(_size(data, "n", 1, 8), dim) if bank else 0)
    return Call(
        module,
        {"out0": r(batch, dim), "out1": r(batch, dim)},
        {"B": batch, "D": dim, "bank": int(bank)},
    )


def _tico(data: Data) -> Call:
    r, batch, dim = Maker(data), _size(data, "B"), _size(data, "D")
    module = TiCoLoss()
    if data.draw(st.booleans(), label="warm"):
        module(r(batch, dim), r(batch, dim))
    return Call(module, {"z_a": r(batch, dim), "z_b": r(batch, dim)}, {"B": batch, "D": dim})


def _vicreg(data: Data) -> Call:
    r, batch, dim = Maker(data), _size(data, "B"), _size(data, "D")
    middle = data.draw(st.lists(st.integers(1, 3), max_size=1), label="middle")
    shape = (batch, *middle, dim)
    return Call(VICRegLoss(), {"z_a": r(*shape), "z_b": r(*shape)}, {"B": batch, "D": dim})


def _negcos(data: Data) -> Call:
    r, batch, dim = Maker(data), _size(data, "B"), _size(data, "D")
    return Call(
        NegativeCosineSimilarity(),
        {"x0": r(batch, dim), "x1": r(batch, dim)},
        {"B": batch, "D": dim},
    )


def _koleo(data: Data) -> Call:
    r, batch, dim = Maker(data), _size(data, "B", 1), _size(data, "D")
    return Call(KoLeoLoss(), {"x": r(batch, dim)}, {"B": batch, "D": dim})


def _mmcr(data: Data) -> Call:
    r, batch, k, dim = Maker(data), _size(data, "B"), _size(data, "k", 1, 3), _size(data, "D")
    return Call(
        MMCRLoss(),
        {"online": r(batch, k, dim), "momentum": r(batch, k, dim)},
        {"B": batch, "D": dim},
    )


def _msn(cls: Callable[[], nn.Module]) -> Callable[[Data], Call]:
    def make(data: Data) -> Call:
        r, batch, dim = Maker(data), _size(data, "B"), _size(data, "D")
        views, protos = _size(data, "V", 1, 3), _size(data, "K", 1, 6)
        args = {
            "anchors": r(views * batch, dim),
            "targets": r(batch, dim),
            "prototypes": r(protos, dim),
        }
        if data.draw(st.booleans(), label="sharpen"):
            args["target_sharpen_temperature"] = data.draw(st.floats(0.05, 2.0))
        return Call(cls(), args, {"B": batch, "D": dim})

    return make


def _dino(data: Data) -> Call:
    r, batch, dim = Maker(data), _size(data, "B", 1), _size(data, "D")
    n_t = _size(data, "Vt", 1, 3)
    n_s = _size(data, "Vs", 2 if n_t == 1 else 1, 4)
    module = DINOLoss(output_dim=dim, warmup_teacher_temp_epochs=_size(data, "W", 0, 4))
    args: dict[str, Any] = {
        "teacher_out": [r(batch, dim) for _ in range(n_t)],
        "student_out": [r(batch, dim) for _ in range(n_s)],
    }
    if data.draw(st.booleans(), label="epoch"):
        args["epoch"] = data.draw(st.integers(0, 6))
    return Call(module, args, {"B": batch, "D": dim})


def _ibot(data: Data) -> Call:
    g = _gen(data)
    batch, dim = _size(data, "B", 1), _size(data, "D")
    h, w = _size(data, "H", 1, 3), _size(data, "W", 1, 3)
    mask = torch.rand(batch, h, w, generator=g) < 0.5
    n = int(mask.sum())
    return Call(
        IBOTPatchLoss(output_dim=dim),
        {
            "teacher_out": torch.randn(n, dim, generator=g),
            "student_out": torch.randn(n, dim, generator=g),
            "mask": mask,
        },
        {"B": batch, "D": dim, "N": n},
    )


def _bank(data: Data) -> Call:
    r, batch, dim = Maker(data), _size(data, "B", 1), _size(data, "D")
    lazy = data.draw(st.booleans(), label="lazy")
    module = MemoryBankModule(
        size=_size(data, "n", 1, 8) if lazy else (_size(data, "n", 1, 8), dim)
    )
    if lazy:
        module(r(batch, dim), update=True)  # shapes the bank
    return Call(
        module,
        {"output": r(batch, dim), "update": data.draw(st.booleans())},
        {"B": batch, "D": dim},
    )


def _swav(data: Data) -> Call:
    r, batch, k = Maker(data), _size(data, "B", 1), _size(data, "K")
    n_high = _size(data, "Vh", 1, 3)
    n_low = _size(data, "Vl", 1 if n_high == 1 else 0, 3)
    args: dict[str, Any] = {
        "high_resolution_outputs": [r(batch, k) for _ in range(n_high)],
        "low_resolution_outputs": [r(batch, k) for _ in range(n_low)],
    }
    if data.draw(st.booleans(), label="queue"):
        q = _size(data, "Q", 1, 6)
        args["queue_outputs"] = [r(q, k) for _ in range(n_high)]
    return Call(SwaVLoss(), args, {"B": batch, "D": k})


def _symneg(data: Data) -> Call:
    r, batch, dim = Maker(data), _size(data, "B", 1), _size(data, "D")
    return Call(
        SymNegCosineSimilarityLoss(),
        {"out0": (r(batch, dim), r(batch, dim)), "out1": (r(batch, dim), r(batch, dim))},
        {"B": batch, "D": dim},
    )


def _vicregl(data: Data) -> Call:
    r, batch = Maker(data), _size(data, "B", 2, 4)
    dg, dl = _size(data, "Dg"), _size(data, "Dl")
    n_global = _size(data, "G", 1, 2)
    n_local = _size(data, "L", 1 if n_global == 1 else 0, 2)
    hg, hl = _size(data, "Hg", 1, 3), _size(data, "Hl", 1, 2)

    def views(n: int, h: int) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
        return (
            [(r(batch, dg), r(batch, h, h, dl)) for _ in range(n)],
            [r(batch, h, h, 2) for _ in range(n)],
        )

    gf, gg = views(n_global, hg)
    args: dict[str, Any] = {"global_view_features": gf, "global_view_grids": gg}
    if n_local:
        args["local_view_features"], args["local_view_grids"] = views(n_local, hl)
    return Call(VICRegLLoss(num_matches=(3, 2)), args, {"B": batch, "D": dl})


VALID: dict[str, Callable[[Data], Call]] = {
    "BarlowTwinsLoss": _two_views(BarlowTwinsLoss, "z_a", "z_b"),
    "CO2Regularizer": _co2,
    "DCLLoss": _two_views(DCLLoss, "out0", "out1"),
    "DCLWLoss": _two_views(DCLWLoss, "out0", "out1"),
    "DINOLoss": _dino,
    "HypersphereLoss": _two_views(HypersphereLoss, "z_a", "z_b"),
    "IBOTPatchLoss": _ibot,
    "KoLeoLoss": _koleo,
    "MemoryBankModule": _bank,
    "MMCRLoss": _mmcr,
    "MSNLoss": _msn(MSNLoss),
    "NegativeCosineSimilarity": _negcos,
    "NTXentLoss": _ntxent,
    "PMSNCustomLoss": _msn(lambda: PMSNCustomLoss("uniform")),
    "PMSNLoss": _msn(PMSNLoss),
    "SwaVLoss": _swav,
    "SymNegCosineSimilarityLoss": _symneg,
    "TiCoLoss": _tico,
    "VICRegLLoss": _vicregl,
    "VICRegLoss": _vicreg,
}

NAMES = list(LOSSES)


def test_there_is_a_valid_call_for_every_loss() -> None:
    assert set(VALID) == set(LOSSES)


@pytest.mark.parametrize("name", NAMES)
@settings(SETTINGS, max_examples=15)
@given(data=st.data())
def test_valid_calls_work(name: str, data: Data) -> None:
    """The starting points of the mutations below are valid, so a ValueError after a
    mutation is caused by the mutation."""
    call = VALID[name](data)
    result = call.module(**call.args)
    if name != "MemoryBankModule":
        assert result.numel() == 1


# -- generic mutations, driven by the registry ------------------------------------------------

Path = tuple[Any, ...]
Mutation = Callable[[Data, Call], "tuple[dict[str, Any], set[str]] | None"]


def _tensor_paths(tree: Any, path: Path = ()) -> list[tuple[Path, Tensor]]:
    if isinstance(tree, Tensor):
        return [(path, tree)]
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _tensor_paths(v, (*path, k))]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in _tensor_paths(v, (*path, i))]
    return []


def _replace(tree: Any, path: Path, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, head: _replace(tree[head], rest, value)}
    items = list(tree)
    items[head] = _replace(items[head], rest, value)
    return type(tree)(items)


def _pick_tensor(data: Data, call: Call) -> tuple[Path, Tensor] | None:
    paths = _tensor_paths(call.args)
    if not paths:
        return None
    return data.draw(st.sampled_from(paths), label="tensor")


def non_tensor(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """A tensor replaced by something that is not a tensor."""
    picked = _pick_tensor(data, call)
    if picked is None:
        return None
    path, t = picked
    value = data.draw(
        st.sampled_from([None, 1.0, "x", t.tolist(), t.detach().numpy(), np.float32(1.0)]),
        label="value",
    )
    return _replace(call.args, path, value), {path[0]}


def wrong_dtype(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """A tensor cast to a dtype its argument does not take."""
    picked = _pick_tensor(data, call)
    if picked is None:
        return None
    path, t = picked
    spec_dtype = LOSSES[type(call.module).__name__].arg(path[0]).dtype
    if spec_dtype == DType.BOOL:
        bad = [torch.float32, torch.int64, torch.uint8]
    else:
        bad = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]
    dtype = data.draw(st.sampled_from(bad), label="dtype")
    return _replace(call.args, path, t.to(dtype)), {path[0]}


def bad_scalar(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """A number, integer or flag argument given a value of the wrong kind."""
    spec = LOSSES[type(call.module).__name__]
    scalars = [a for a in spec.args if a.kind in (Kind.NUMBER, Kind.INTEGER, Kind.FLAG)]
    if not scalars:
        return None
    arg = data.draw(st.sampled_from(scalars), label="scalar")
    common = ["x", [1], torch.ones(2), {}]
    if arg.kind == Kind.NUMBER:  # every number argument is a temperature
        bad = [*common, True, math.nan, math.inf, 0.0, 0, -0.5, -1e-9]
    elif arg.kind == Kind.INTEGER:  # DINO's epoch
        schedule = len(call.module.teacher_temp_schedule)
        bad = [*common, 1.5, "3", True, -schedule - 1, -schedule - 7]
    else:
        bad = [*common, 1, 0, 1.0, None, "True"]
    value = data.draw(st.sampled_from(bad), label="value")
    return {**call.args, arg.name: value}, {arg.name}


def not_a_sequence(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """A list (or pair) argument given something that is not a list or tuple."""
    spec = LOSSES[type(call.module).__name__]
    seqs = [a for a in spec.args if a.kind in (Kind.TENSOR_LIST, Kind.PAIR_LIST, Kind.TENSOR_PAIR)]
    if not seqs:
        return None
    arg = data.draw(st.sampled_from(seqs), label="sequence")
    value = data.draw(st.sampled_from([torch.ones(2, 2), "ab", {"a": 1}, 3]), label="value")
    names = {arg.name}
    if arg.name.startswith("local_view"):  # lossd checks the pairing of the locals first
        names = {"local_view_features", "local_view_grids"}
    return {**call.args, arg.name: value}, names


def wrong_ndim(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """A tensor argument with a dim too few or too many (where that is not allowed)."""
    name = type(call.module).__name__
    if name == "NegativeCosineSimilarity":  # takes any broadcastable shapes
        return None
    picked = _pick_tensor(data, call)
    if picked is None:
        return None
    path, t = picked
    if name == "VICRegLoss" and t.dim() == 2 and data.draw(st.booleans(), label="3d"):
        return None  # (B, ..., D) is valid when both views have it
    new = t[..., 0] if data.draw(st.booleans(), label="drop") else t.unsqueeze(-1)
    if new.dim() == 0:
        new = new.reshape(1, 1, 1, 1, 1)
    args = _replace(call.args, path, new)
    tensor_args = {a.name for a in LOSSES[name].args if a.is_tensor}
    return args, tensor_args  # a shape check may name the argument it is compared with


GENERIC: list[Mutation] = [non_tensor, wrong_dtype, bad_scalar, not_a_sequence, wrong_ndim]


# -- mutations that need to know the loss ----------------------------------------------------


def _first_two(call: Call) -> tuple[str, str]:
    names = [k for k, v in call.args.items() if isinstance(v, Tensor)]
    return names[0], names[1]


def batch_mismatch(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """The second view has a different batch size."""
    a, b = _first_two(call)
    t = call.args[b]
    extra = data.draw(st.integers(1, 3), label="extra")
    grown = torch.cat([t, t[:1].expand(extra, *t.shape[1:])])
    if type(call.module).__name__ == "NegativeCosineSimilarity" and t.shape[0] == 1:
        return None  # would broadcast
    return {**call.args, b: grown}, {a, b}


def dim_mismatch(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """The second view has another feature dim."""
    a, b = _first_two(call)
    t = call.args[b]
    if type(call.module).__name__ == "NegativeCosineSimilarity" and t.shape[-1] + 1 == 1:
        return None
    wider = torch.cat([t, t[..., :1]], dim=-1)
    return {**call.args, b: wider}, {a, b}


def batch_of_one(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """Both views have a single sample (the batch statistics need two)."""
    a, b = _first_two(call)
    return {**call.args, a: call.args[a][:1], b: call.args[b][:1]}, {a, b}


def other_dim_than_state(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """Inputs whose dim differs from the dim of existing state (a bank, TiCo's C)."""
    module = call.module
    state = getattr(getattr(module, "memory_bank", module), "bank", None)
    if isinstance(module, TiCoLoss):
        state = module.C
    if state is None:
        return None
    a, b = _first_two(call)
    dim = state.shape[-1] + data.draw(st.integers(1, 3), label="extra")
    return {
        **call.args,
        a: torch.randn(call.args[a].shape[0], dim),
        b: torch.randn(call.args[b].shape[0], dim),
    }, {a, b}


def mixed_dtypes(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """The second view in another floating dtype, for losses that need one dtype."""
    a, b = _first_two(call)
    dtype = data.draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16]))
    if isinstance(call.module, NTXentLoss) and not call.module.memory_bank.enabled:
        return None  # the in-batch loss promotes
    return {**call.args, b: call.args[b].to(dtype)}, {a, b}


def negcos_bad_dim(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    """NegativeCosineSimilarity along a dim the inputs do not have."""
    call.module = NegativeCosineSimilarity(dim=data.draw(st.sampled_from([2, 3, -3])))
    return call.args, {"x0"}


def mmcr_no_views(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    return {k: v[:, :0] for k, v in call.args.items()}, {"online"}


def msn_not_a_multiple(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    anchors, batch = call.args["anchors"], call.args["targets"].shape[0]
    rows = data.draw(st.integers(1, 3 * batch).filter(lambda n: n % batch), label="rows")
    return {**call.args, "anchors": anchors[:1].expand(rows, -1).clone()}, {"anchors"}


def msn_other_dims(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    which = data.draw(st.sampled_from(["targets", "prototypes"]), label="which")
    t = call.args[which]
    return {**call.args, which: torch.cat([t, t[:, :1]], dim=1)}, {which}


def msn_no_prototypes(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    return {**call.args, "prototypes": call.args["prototypes"][:0]}, {"prototypes"}


def msn_mixed(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    which = data.draw(st.sampled_from(["targets", "prototypes"]), label="which")
    return {**call.args, which: call.args[which].double()}, {"anchors", which}


def dino_one_view_each(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    return (
        {
            **call.args,
            "teacher_out": call.args["teacher_out"][:1],
            "student_out": call.args["student_out"][:1],
        },
        {"teacher_out", "student_out"},
    )


def dino_empty_list(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    which = data.draw(st.sampled_from(["teacher_out", "student_out"]), label="which")
    return {**call.args, which: []}, {which}


def _views_of(call: Call, names: list[str]) -> list[tuple[str, int]]:
    return [(n, i) for n in names for i in range(len(call.args.get(n) or []))]


def view_shape(names: list[str], dims: tuple[int, ...]) -> Mutation:
    """One view of a list argument gets another size along one of `dims`."""

    def mutate(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
        name, i = data.draw(st.sampled_from(_views_of(call, names)), label="view")
        dim = data.draw(st.sampled_from(dims), label="dim")
        t = call.args[name][i]
        if t.shape[dim] == 0:
            return None
        index = [slice(None)] * t.dim()
        index[dim] = slice(0, 1)
        grown = torch.cat([t, t[tuple(index)]], dim=dim)
        views = list(call.args[name])
        views[i] = grown
        return {**call.args, name: views}, set(names)

    return mutate


def ibot_count(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    n = call.sizes["N"]
    rows = data.draw(st.integers(0, n + 3).filter(lambda k: k != n), label="rows")
    t = torch.randn(rows, call.sizes["D"])
    return {**call.args, "teacher_out": t, "student_out": t.clone()}, {"teacher_out"}


def ibot_dims(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    which = data.draw(st.sampled_from(["teacher_out", "student_out", "both"]), label="which")
    n = call.sizes["N"]
    args = dict(call.args)
    for key in ["teacher_out", "student_out"] if which == "both" else [which]:
        args[key] = torch.randn(n, call.sizes["D"] + 1)
    return args, {"teacher_out", "student_out"}


def ibot_rows_differ(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    s = call.args["student_out"]
    return {**call.args, "student_out": torch.cat([s, torch.randn(1, s.shape[1])])}, {
        "student_out",
        "teacher_out",
    }


def ibot_no_images(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    return {**call.args, "mask": call.args["mask"][:0]}, {"mask", "teacher_out"}


def swav_one_crop(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    args = {
        **call.args,
        "high_resolution_outputs": call.args["high_resolution_outputs"][:1],
        "low_resolution_outputs": [],
    }
    args.pop("queue_outputs", None)
    return args, {"high_resolution_outputs", "low_resolution_outputs"}


def swav_no_high(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    args = {**call.args, "high_resolution_outputs": []}
    args.pop("queue_outputs", None)
    return args, {"high_resolution_outputs"}


def swav_short_queue(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    highs = call.args["high_resolution_outputs"]
    queue = [torch.randn(3, highs[0].shape[1]) for _ in range(len(highs) - 1)]
    return {**call.args, "queue_outputs": queue}, {"queue_outputs"}


def swav_queue_width(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    highs = call.args["high_resolution_outputs"]
    queue = [torch.randn(3, highs[0].shape[1] + 1) for _ in highs]
    return {**call.args, "queue_outputs": queue}, {"queue_outputs"}


def swav_empty(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    along = data.draw(st.sampled_from([0, 1]), label="empty dim")
    args = {
        k: [t[:0] if along == 0 else t[:, :0] for t in v]
        for k, v in call.args.items()
        if k != "queue_outputs"
    }
    return args, {"high_resolution_outputs", "low_resolution_outputs"}


def symneg_bad_pair(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    which = data.draw(st.sampled_from(["out0", "out1"]), label="which")
    z, p = call.args[which]
    value = data.draw(st.sampled_from([(z,), (z, p, p), [z, p, z]]), label="pair")
    return {**call.args, which: value}, {which}


def symneg_shapes(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    which = data.draw(st.sampled_from(["out0", "out1"]), label="which")
    element = data.draw(st.sampled_from([0, 1]), label="element")
    along = data.draw(st.sampled_from([0, 1]), label="dim")
    pair = list(call.args[which])
    t = pair[element]
    pair[element] = torch.cat([t, t[:1] if along == 0 else t[:, :1]], dim=along)
    return {**call.args, which: tuple(pair)}, {"out0", "out1"}


def vicregl_grid_count(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    kinds = ["global"] + (["local"] if "local_view_grids" in call.args else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    grids = call.args[f"{kind}_view_grids"]
    value = grids[:-1] if data.draw(st.booleans(), label="fewer") else [*grids, grids[0]]
    return {**call.args, f"{kind}_view_grids": value}, {f"{kind}_view_grids"}


def vicregl_half_locals(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    args = dict(call.args)
    if "local_view_grids" in args:
        args.pop(data.draw(st.sampled_from(["local_view_features", "local_view_grids"])))
    else:
        args["local_view_grids"] = call.args["global_view_grids"]
    return args, {"local_view_features", "local_view_grids"}


def vicregl_one_view(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    return (
        {
            "global_view_features": call.args["global_view_features"][:1],
            "global_view_grids": call.args["global_view_grids"][:1],
        },
        {"global_view_features"},
    )


def vicregl_batch_of_one(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    def first(tree: Any) -> Any:
        if isinstance(tree, Tensor):
            return tree[:1]
        return type(tree)(first(t) for t in tree)

    return {k: first(v) for k, v in call.args.items()}, {"global_view_features"}


def vicregl_feature_shape(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    kinds = ["global"] + (["local"] if "local_view_features" in call.args else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    views = list(call.args[f"{kind}_view_features"])
    i = data.draw(st.integers(0, len(views) - 1), label="view")
    element = data.draw(st.sampled_from([0, 1]), label="element")
    along = data.draw(st.sampled_from([0, -1] if element == 0 else [0, 1, 2, -1]), label="dim")
    pair = list(views[i])
    t = pair[element]
    index = [slice(None)] * t.dim()
    index[along] = slice(0, 1)
    pair[element] = torch.cat([t, t[tuple(index)]], dim=along)
    views[i] = tuple(pair)
    return {**call.args, f"{kind}_view_features": views}, {
        "global_view_features",
        "local_view_features",
        "global_view_grids",
        "local_view_grids",
    }


def vicregl_mixed(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    kinds = ["global"] + (["local"] if "local_view_features" in call.args else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    i = data.draw(st.integers(0, len(call.args[f"{kind}_view_grids"]) - 1), label="view")
    if kind == "global" and i == 0 and len(call.args["global_view_grids"]) == 1:
        return None  # the only global view is the reference
    i = max(i, 1) if kind == "global" else i
    if data.draw(st.booleans(), label="grid"):
        grids = list(call.args[f"{kind}_view_grids"])
        grids[i] = grids[i].double()
        return {**call.args, f"{kind}_view_grids": grids}, {f"{kind}_view_grids"}
    views = list(call.args[f"{kind}_view_features"])
    views[i] = (views[i][0], views[i][1].double())
    return {**call.args, f"{kind}_view_features": views}, {f"{kind}_view_features"}


def bank_other_dim(data: Data, call: Call) -> tuple[dict[str, Any], set[str]] | None:
    out = call.args["output"]
    return {**call.args, "output": torch.randn(out.shape[0], out.shape[1] + 1)}, {"output"}


TWO_VIEW = [batch_mismatch, dim_mismatch]
NEEDS_TWO = [*TWO_VIEW, batch_of_one]

SPECIFIC: dict[str, list[Mutation]] = {
    "BarlowTwinsLoss": [*NEEDS_TWO, mixed_dtypes],
    "CO2Regularizer": [*TWO_VIEW, other_dim_than_state, mixed_dtypes],
    "DCLLoss": [*NEEDS_TWO, mixed_dtypes],
    "DCLWLoss": [*NEEDS_TWO, mixed_dtypes],
    "DINOLoss": [
        dino_one_view_each,
        dino_empty_list,
        view_shape(["teacher_out", "student_out"], (0, 1)),
    ],
    "HypersphereLoss": NEEDS_TWO,
    "IBOTPatchLoss": [ibot_count, ibot_dims, ibot_rows_differ, ibot_no_images],
    "KoLeoLoss": [],
    "MemoryBankModule": [bank_other_dim],
    "MMCRLoss": [*TWO_VIEW, mmcr_no_views],
    "MSNLoss": [msn_not_a_multiple, msn_other_dims, msn_no_prototypes, msn_mixed],
    "NegativeCosineSimilarity": [*TWO_VIEW, negcos_bad_dim],
    "NTXentLoss": [*TWO_VIEW, other_dim_than_state, mixed_dtypes],
    "PMSNCustomLoss": [msn_not_a_multiple, msn_other_dims, msn_no_prototypes, msn_mixed],
    "PMSNLoss": [msn_not_a_multiple, msn_other_dims, msn_no_prototypes, msn_mixed],
    "SwaVLoss": [
        swav_one_crop,
        swav_no_high,
        swav_short_queue,
        swav_queue_width,
        swav_empty,
        view_shape(["high_resolution_outputs", "low_resolution_outputs"], (0, 1)),
    ],
    "SymNegCosineSimilarityLoss": [symneg_bad_pair, symneg_shapes],
    "TiCoLoss": [*NEEDS_TWO, other_dim_than_state],
    "VICRegLLoss": [
        vicregl_grid_count,
        vicregl_half_locals,
        vicregl_one_view,
        vicregl_batch_of_one,
        vicregl_feature_shape,
        vicregl_mixed,
    ],
    "VICRegLoss": NEEDS_TWO,
}


def _applies(name: str, mutation: Mutation) -> bool:
    """Whether a generic mutation has something to work on in this loss's signature."""
    kinds = {a.kind for a in LOSSES[name].args}
    if mutation is bad_scalar:
        return bool(kinds & {Kind.NUMBER, Kind.INTEGER, Kind.FLAG})
    if mutation is not_a_sequence:
        return bool(kinds & {Kind.TENSOR_LIST, Kind.PAIR_LIST, Kind.TENSOR_PAIR})
    return not (mutation is wrong_ndim and name == "NegativeCosineSimilarity")


MUTATIONS = [(name, m) for name in NAMES for m in GENERIC + SPECIFIC[name] if _applies(name, m)]


@pytest.mark.parametrize(
    ("name", "mutate"), MUTATIONS, ids=[f"{n}-{m.__qualname__.split('.')[0]}" for n, m in MUTATIONS]
)
@settings(SETTINGS, max_examples=12)
@given(data=st.data())
def test_bad_input_raises_value_error_naming_the_argument(
    name: str, mutate: Mutation, data: Data
) -> None:
    call = VALID[name](data)
    mutated = mutate(data, call)
    assume(mutated is not None)  # some mutations need e.g. a bank or two views
    assert mutated is not None
    args, names = mutated
    assert_value_error(lambda: call.module(**args), names, call.module)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_an_empty_batch_is_a_value_error_or_a_result(name: str, data: Data) -> None:
    """Zero samples: ValueError naming an argument, or a result (lightly's NaN included);
    never an exception from deep inside torch."""
    call = VALID[name](data)
    spec = LOSSES[name]

    def empty(tree: Any) -> Any:
        if isinstance(tree, Tensor):
            return tree[:0]
        return type(tree)(empty(t) for t in tree)

    args = {
        k: empty(v) if spec.arg(k).batch != Batch.NONE and v is not None else v
        for k, v in call.args.items()
    }
    before = snapshot(call.module)
    try:
        call.module(**args)
    except ValueError as error:
        assert named_arguments(str(error)) & {a.name for a in spec.args}, str(error)
        assert_same_state(snapshot(call.module), before, "after the failed call")


# -- constructors ---------------------------------------------------------------------------

CONSTRUCTORS = {name: spec.cls for name, spec in LOSSES.items()}
_REQUIRED_CONFIG = {"PMSNCustomLoss": {"target_distribution": "uniform"}}

#: Constructor parameters that must be > 0 (temperatures, widths, epsilons).
POSITIVE = {
    ("DCLLoss", "temperature"),
    ("DCLWLoss", "temperature"),
    ("DCLWLoss", "sigma"),
    ("DINOLoss", "warmup_teacher_temp"),
    ("DINOLoss", "teacher_temp"),
    ("DINOLoss", "student_temp"),
    ("IBOTPatchLoss", "teacher_temp"),
    ("IBOTPatchLoss", "student_temp"),
    ("KoLeoLoss", "p"),
    ("KoLeoLoss", "eps"),
    ("MSNLoss", "temperature"),
    ("PMSNLoss", "temperature"),
    ("PMSNCustomLoss", "temperature"),
    ("SwaVLoss", "temperature"),
    ("SwaVLoss", "sinkhorn_epsilon"),
    ("CO2Regularizer", "t_consistency"),
    ("NegativeCosineSimilarity", "eps"),
    ("VICRegLoss", "eps"),
    ("VICRegLLoss", "eps"),
}
#: Integer parameters and their minimum.
INTEGERS = {
    ("DINOLoss", "output_dim"): 1,
    ("DINOLoss", "warmup_teacher_temp_epochs"): 0,
    ("IBOTPatchLoss", "output_dim"): 1,
    ("MSNLoss", "sinkhorn_iterations"): 0,
    ("PMSNLoss", "sinkhorn_iterations"): 0,
    ("PMSNCustomLoss", "sinkhorn_iterations"): 0,
    ("SwaVLoss", "sinkhorn_iterations"): 0,
    ("NegativeCosineSimilarity", "dim"): None,
}
#: Parameters in [0, 1].
UNIT = {("DINOLoss", "center_momentum"), ("IBOTPatchLoss", "center_momentum"), ("TiCoLoss", "beta")}
#: Parameters with their own rules, tested separately below.
SPECIAL = {
    "memory_bank_size",
    "size",
    "num_matches",
    "center_mode",
    "weight_fn",
    "target_distribution",
    "me_max_weight",
}


def _bad_values(loss: str, param: str, default: Any) -> list[Any]:
    """Values the parameter must reject."""
    if isinstance(default, bool):
        return ["yes", 1, 0, None, 1.0]
    if (loss, param) in INTEGERS:
        minimum = INTEGERS[(loss, param)]
        low = [] if minimum is None else [minimum - 1, minimum - 10]
        return ["3", 2.5, None, True, [1], *low]
    bad: list[Any] = ["0.1", None, True, [0.1], math.nan, math.inf, -math.inf]
    if (loss, param) in POSITIVE:
        bad += [0, 0.0, -1e-6, -2]
    if (loss, param) in UNIT:
        bad += [-0.1, 1.5]
    return bad


CONSTRUCTOR_CASES = [
    (loss, param, value)
    for loss, cls in CONSTRUCTORS.items()
    for param, p in LOSSES[loss].constructor.parameters.items()
    if param not in SPECIAL and p.default is not p.empty
    for value in _bad_values(loss, param, p.default)
]


@pytest.mark.parametrize(
    ("loss", "param", "value"),
    CONSTRUCTOR_CASES,
    ids=[f"{lo}-{pa}-{v!r}" for lo, pa, v in CONSTRUCTOR_CASES],
)
def test_constructor_rejects_bad_values(loss: str, param: str, value: Any) -> None:
    config = {**_REQUIRED_CONFIG.get(loss, {}), param: value}
    assert_value_error(lambda: CONSTRUCTORS[loss](**config), {param})


def test_every_constructor_parameter_is_covered() -> None:
    covered = {(lo, pa) for lo, pa, _ in CONSTRUCTOR_CASES}
    for loss, spec in LOSSES.items():
        for param in spec.constructor.parameters:
            assert (loss, param) in covered or param in SPECIAL, (loss, param)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: NTXentLoss(memory_bank_size=v),
        lambda v: CO2Regularizer(memory_bank_size=v),
        lambda v: MemoryBankModule(size=v),
    ],
    ids=["NTXentLoss", "CO2Regularizer", "MemoryBankModule"],
)
@pytest.mark.parametrize(
    "size", [-1, (-1, 4), (4, -1), [3, -2], "64", 2.5, True, (4, 2.0), (4, 0), (), None]
)
def test_bank_sizes_are_validated(make: Callable[[Any], nn.Module], size: Any) -> None:
    names = {"memory_bank_size", "size"}
    assert_value_error(lambda: make(size), names)


@pytest.mark.parametrize("size", [(4, 3, 2), [4, 3, 2]])
def test_losses_on_2d_embeddings_reject_multi_dim_banks(size: Any) -> None:
    assert_value_error(lambda: NTXentLoss(memory_bank_size=size), {"memory_bank_size"})
    assert MemoryBankModule(size=size).bank.shape == (4, 3, 2)


@pytest.mark.parametrize("size", [0, (0, 5), [0, 5], 5, (5,), (5, 3), [5, 3]])
def test_good_bank_sizes_are_accepted(size: Any) -> None:
    NTXentLoss(memory_bank_size=size)
    MemoryBankModule(size=size)


@pytest.mark.parametrize("mode", ["median", "MEAN", "", 1, None])
@pytest.mark.parametrize("cls", [DINOLoss, IBOTPatchLoss])
def test_unknown_center_mode(cls: type[nn.Module], mode: Any) -> None:
    assert_value_error(lambda: cls(output_dim=4, center_mode=mode), {"center_mode"})


@pytest.mark.parametrize("value", ["vmf", "von-mises-fisher", "", 3, [1]])
def test_unknown_weight_fn(value: Any) -> None:
    assert_value_error(lambda: DCLLoss(weight_fn=value), {"weight_fn"})


@pytest.mark.parametrize("value", ["gaussian", "Uniform", "", 3, None])
def test_unknown_target_distribution(value: Any) -> None:
    assert_value_error(lambda: PMSNCustomLoss(target_distribution=value), {"target_distribution"})


@pytest.mark.parametrize("value", [(0, 4), (3,), (3, 4, 5), (1.5, 2), "20,4", None, (True, 2)])
def test_bad_num_matches(value: Any) -> None:
    assert_value_error(lambda: VICRegLLoss(num_matches=value), {"num_matches"})


@pytest.mark.parametrize("value", ["0.5", math.nan, -math.inf, [1.0]])
def test_bad_me_max_weight(value: Any) -> None:
    with pytest.warns(DeprecationWarning):
        assert_value_error(lambda: MSNLoss(me_max_weight=value), {"me_max_weight"})


@pytest.mark.parametrize("tau", [0, 0.0, 1e-9, -1e-9, math.nan, "0.5", None])
def test_ntxent_temperature_rule(tau: Any) -> None:
    """NTXent keeps lightly's rule: anything with |tau| >= 1e-8, negative values included."""
    assert_value_error(lambda: NTXentLoss(temperature=tau), {"temperature"})
