"""The catalog: what the server and the client need to know about each loss.

For every loss: its class (constructor defaults come from its signature), the layout of
its forward arguments (kind, dtype, whether each tensor is per-sample along dim 0, which
get gradients), the names of its state and what it returns. The server and the client
are generic over this table: adding a loss is one module plus one entry in `_ENTRIES`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import nn

from .barlow_twins_loss import BarlowTwinsLoss
from .co2_regularizer import CO2Regularizer
from .dcl_loss import DCLLoss, DCLWLoss
from .dino_loss import DINOLoss
from .hypersphere_loss import HypersphereLoss
from .ibot_loss import IBOTPatchLoss
from .koleo_loss import KoLeoLoss
from .memory_bank import MemoryBankModule
from .mmcr_loss import MMCRLoss
from .msn_loss import MSNLoss
from .negative_cosine_similarity import NegativeCosineSimilarity
from .ntx_ent_loss import NTXentLoss
from .pmsn_loss import PMSNCustomLoss, PMSNLoss
from .swav_loss import SwaVLoss
from .sym_neg_cos_sim_loss import SymNegCosineSimilarityLoss
from .tico_loss import TiCoLoss
from .vicreg_loss import VICRegLoss
from .vicregl_loss import VICRegLLoss


class Kind(str, Enum):
    """The Python shape of a forward argument."""

    TENSOR = "tensor"
    TENSOR_LIST = "tensor_list"  # list of tensors, e.g. DINO's views
    TENSOR_PAIR = "tensor_pair"  # (a, b) tuple, e.g. SymNeg's (z, p)
    PAIR_LIST = "pair_list"  # sequence of (a, b) tuples, e.g. VICRegL's (global, local)
    NUMBER = "number"
    INTEGER = "integer"
    FLAG = "flag"


class Batch(str, Enum):
    """How an argument relates to the batch (used to split a global batch across ranks)."""

    NONE = "none"  # not per-sample: must be the same on every rank
    ROWS = "rows"  # every tensor of the argument is per-sample along dim 0
    VIEW_ROWS = "view_rows"  # (views * batch_size, ...), view-major; batch_size from `views_of`


class DType(str, Enum):
    """The dtypes a tensor argument accepts."""

    FLOAT = "float"  # float16, bfloat16, float32, float64
    BOOL = "bool"
    ANY = "any"


class Returns(str, Enum):
    """What forward returns."""

    LOSS = "loss"  # a one-element tensor wired into autograd
    OUTPUTS = "outputs"  # MemoryBankModule: (output, bank or None), no gradient


@dataclass(frozen=True)
class Arg:
    """One forward argument.

    `grad` says which tensors of the argument receive a gradient: one flag for all of
    them, or one per element of each pair (TENSOR_PAIR and PAIR_LIST).
    """

    name: str
    kind: Kind
    batch: Batch = Batch.NONE
    grad: bool | tuple[bool, bool] = False
    dtype: DType = DType.FLOAT
    views_of: str = ""  # VIEW_ROWS: the ROWS argument whose length is the batch size

    @property
    def is_tensor(self) -> bool:
        """True when the argument holds tensors."""
        return self.kind in (Kind.TENSOR, Kind.TENSOR_LIST, Kind.TENSOR_PAIR, Kind.PAIR_LIST)


@dataclass(frozen=True)
class BankSlot:
    """Where a loss keeps its memory bank: the constructor argument that sizes it and the
    path of the MemoryBankModule ("" when the loss is one)."""

    size_arg: str
    module: str


@dataclass(frozen=True)
class LossSpec:
    """Everything generic code needs to know about one loss."""

    cls: type[nn.Module]
    args: tuple[Arg, ...]
    state: tuple[str, ...] = ()
    returns: Returns = Returns.LOSS
    bank: BankSlot | None = None
    notes: str = ""
    _signature: inspect.Signature = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_signature", inspect.signature(self.cls.forward))

    @property
    def name(self) -> str:
        """The class name, which is also the name on the wire."""
        return self.cls.__name__

    @property
    def constructor(self) -> inspect.Signature:
        """The constructor's signature (without `self`)."""
        return inspect.signature(self.cls)

    @property
    def forward(self) -> inspect.Signature:
        """The forward signature (with `self`)."""
        return self._signature

    def constructor_defaults(self) -> dict[str, Any]:
        """Constructor parameters with a default, and the default."""
        return {
            n: p.default
            for n, p in self.constructor.parameters.items()
            if p.default is not inspect.Parameter.empty
        }

    def required_config(self) -> tuple[str, ...]:
        """Constructor parameters without a default."""
        return tuple(
            n
            for n, p in self.constructor.parameters.items()
            if p.default is inspect.Parameter.empty
        )

    def arg_default(self, name: str) -> Any:
        """The forward default of argument `name`, or `inspect.Parameter.empty`."""
        return self._signature.parameters[name].default

    def arg(self, name: str) -> Arg:
        """The argument called `name`."""
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(name)


_T, _L, _P, _PL = Kind.TENSOR, Kind.TENSOR_LIST, Kind.TENSOR_PAIR, Kind.PAIR_LIST
_ROWS = Batch.ROWS


def _two_views(a: str, b: str) -> tuple[Arg, Arg]:
    return Arg(a, _T, _ROWS, grad=True), Arg(b, _T, _ROWS, grad=True)


_BANK_STATE = ("memory_bank.bank", "memory_bank.bank_ptr")
_BANK = BankSlot("memory_bank_size", "memory_bank")
_MSN_ARGS = (
    Arg("anchors", _T, Batch.VIEW_ROWS, grad=True, views_of="targets"),
    Arg("targets", _T, _ROWS),
    Arg("prototypes", _T, grad=True),
    Arg("target_sharpen_temperature", Kind.NUMBER),
)

_ENTRIES: tuple[LossSpec, ...] = (
    LossSpec(BarlowTwinsLoss, _two_views("z_a", "z_b")),
    LossSpec(
        CO2Regularizer,
        _two_views("out0", "out1"),
        state=_BANK_STATE,
        bank=_BANK,
        notes="differentiable, unlike lightly 1.6",
    ),
    LossSpec(DCLLoss, _two_views("out0", "out1")),
    LossSpec(DCLWLoss, _two_views("out0", "out1")),
    LossSpec(
        DINOLoss,
        (
            Arg("teacher_out", _L, _ROWS, grad=True),
            Arg("student_out", _L, _ROWS, grad=True),
            Arg("teacher_temp", Kind.NUMBER),
            Arg("epoch", Kind.INTEGER),
        ),
        state=("center",),
    ),
    LossSpec(HypersphereLoss, _two_views("z_a", "z_b")),
    LossSpec(
        IBOTPatchLoss,
        (
            Arg("teacher_out", _T, _ROWS, grad=True),
            Arg("student_out", _T, _ROWS, grad=True),
            Arg("mask", _T, _ROWS, dtype=DType.BOOL),
            Arg("teacher_temp", Kind.NUMBER),
        ),
        state=("center.center",),
    ),
    LossSpec(KoLeoLoss, (Arg("x", _T, _ROWS, grad=True),)),
    LossSpec(
        MemoryBankModule,
        (
            Arg("output", _T, _ROWS),
            Arg("labels", _T, _ROWS, dtype=DType.ANY),
            Arg("update", Kind.FLAG),
        ),
        state=("bank", "bank_ptr"),
        returns=Returns.OUTPUTS,
        bank=BankSlot("size", ""),
    ),
    LossSpec(MMCRLoss, _two_views("online", "momentum")),
    LossSpec(MSNLoss, _MSN_ARGS),
    LossSpec(NegativeCosineSimilarity, _two_views("x0", "x1")),
    LossSpec(NTXentLoss, _two_views("out0", "out1"), state=_BANK_STATE, bank=_BANK),
    LossSpec(PMSNCustomLoss, _MSN_ARGS),
    LossSpec(PMSNLoss, _MSN_ARGS),
    LossSpec(
        SwaVLoss,
        (
            Arg("high_resolution_outputs", _L, _ROWS, grad=True),
            Arg("low_resolution_outputs", _L, _ROWS, grad=True),
            Arg("queue_outputs", _L, _ROWS),
        ),
    ),
    LossSpec(
        SymNegCosineSimilarityLoss,
        (
            Arg("out0", _P, _ROWS, grad=(False, True)),
            Arg("out1", _P, _ROWS, grad=(False, True)),
        ),
        notes="lightly 1.5 API (removed in lightly 1.6)",
    ),
    LossSpec(
        TiCoLoss,
        (
            *_two_views("z_a", "z_b"),
            Arg("update_covariance_matrix", Kind.FLAG),
        ),
        state=("C",),
    ),
    LossSpec(
        VICRegLLoss,
        (
            Arg("global_view_features", _PL, _ROWS, grad=(True, True)),
            Arg("global_view_grids", _L, _ROWS),
            Arg("local_view_features", _PL, _ROWS, grad=(True, True)),
            Arg("local_view_grids", _L, _ROWS),
        ),
    ),
    LossSpec(VICRegLoss, _two_views("z_a", "z_b")),
)

#: Every loss by name, in alphabetical order.
LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in sorted(_ENTRIES, key=lambda s: s.name)}


def get(name: str) -> LossSpec:
    """The spec of loss `name`; ValueError naming the known losses otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(
            f"Expected `loss` to be one of {', '.join(LOSSES)}, but got {name!r}."
        ) from None
