"""Where lossd differs from lightly on purpose, and closed-form facts and reference values
from the behavioural spec of lightly.loss (values measured on lightly 1.6.0)."""

from __future__ import annotations

import math
import warnings
from decimal import Decimal
from typing import Any

import pytest
import torch
import torch.nn.functional as F

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
from lossd.losses.center import Center
from lossd.losses.swav_loss import sinkhorn
from tests.losses.cases import T


def approx(value: str) -> Any:
    """pytest.approx to one unit in the last digit of a value printed as `value`."""
    exponent = Decimal(value).as_tuple().exponent
    assert isinstance(exponent, int)
    return pytest.approx(float(value), abs=10.0**exponent)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


# -- reference values (semantics §7) ------------------------------------------------------


def _a() -> torch.Tensor:
    return T(4, 6, s=0)


def _b() -> torch.Tensor:
    return T(4, 6, s=1)


REFERENCE: list[tuple[str, Any, Any, str, list[str | None]]] = [
    # (id, constructor, inputs (positional), value, grad norms in input order)
    ("Barlow", BarlowTwinsLoss, lambda: [_a(), _b()], "3.36717", ["2.66131", "2.54936"]),
    ("DCL", DCLLoss, lambda: [_a(), _b()], "5.99095", ["3.9225", "3.90151"]),
    ("DCLW", DCLWLoss, lambda: [_a(), _b()], "6.31577", ["3.99564", "4.09875"]),
    ("Hypersphere", HypersphereLoss, lambda: [_a(), _b()], "-0.111857", ["0.578095", "0.542242"]),
    ("KoLeo", KoLeoLoss, lambda: [_a()], "1.33404", ["11.0104"]),
    (
        "NegCos",
        NegativeCosineSimilarity,
        lambda: [_a(), _b()],
        "-0.273378",
        ["0.287241", "0.271166"],
    ),
    ("NTXent", NTXentLoss, lambda: [_a(), _b()], "1.93561", ["0.641195", "0.623133"]),
    (
        "NTXent-t0.1",
        lambda: NTXentLoss(temperature=0.1),
        lambda: [_a(), _b()],
        "6.01176",
        ["3.82581", "3.79807"],
    ),
    ("VICReg", VICRegLoss, lambda: [_a(), _b()], "25.234", ["7.71956", "7.82945"]),
    # The recipe's rows are sinusoids, so the mean embeddings have a zero singular value
    # whose subgradient is arbitrary: lightly's gradient norms (0.611817, 0.61012) move in
    # the third digit under 1e-6 noise, so only the value is compared.
    ("MMCR", MMCRLoss, lambda: [T(3, 2, 6, s=0), T(3, 2, 6, s=1)], "-1.67167", []),
    (
        "MSN",
        MSNLoss,
        lambda: [T(8, 6, s=0), T(4, 6, s=1), T(5, 6, s=2)],
        "9.24218",
        ["0.185896", None, "0.361167"],
    ),
    (
        "PMSN",
        PMSNLoss,
        lambda: [T(8, 6, s=0), T(4, 6, s=1), T(5, 6, s=2)],
        "9.25479",
        ["0.184786", None, "0.327169"],
    ),
    (
        "PMSNCustom-uniform",
        lambda: PMSNCustomLoss("uniform"),
        lambda: [T(8, 6, s=0), T(4, 6, s=1), T(5, 6, s=2)],
        "9.23711",
        ["0.185997", None, "0.373081"],
    ),
    (
        "SwaV",
        SwaVLoss,
        lambda: [[T(4, 5, s=0), T(4, 5, s=1)], [T(4, 5, s=5), T(4, 5, s=6), T(4, 5, s=7)]],
        "4.11893",
        ["0.639026", "0.488831", "0.775269", "0.777488", "1.44034"],
    ),
    (
        "SwaV-queue",
        SwaVLoss,
        lambda: [
            [T(4, 5, s=0), T(4, 5, s=1)],
            [T(4, 5, s=5), T(4, 5, s=6), T(4, 5, s=7)],
            [T(6, 5, s=9), T(6, 5, s=10)],
        ],
        "4.20597",
        [None] * 7,
    ),
    (
        "SymNeg",
        SymNegCosineSimilarityLoss,
        lambda: [(T(4, 6, s=2), T(4, 6, s=3)), (T(4, 6, s=4), T(4, 6, s=5))],
        "0.187403",
        [None, "0.136062", None, "0.108422"],
    ),
    (
        "VICRegL",
        VICRegLLoss,
        lambda: [
            [(T(3, 8, s=i), T(3, 3, 3, 4, s=20 + i)) for i in (0, 1)],
            [T(3, 3, 3, 2, s=40 + i) for i in (0, 1)],
            [(T(3, 8, s=60 + i), T(3, 2, 2, 4, s=80 + i)) for i in (0, 1)],
            [T(3, 2, 2, 2, s=90 + i) for i in (0, 1)],
        ],
        "47.7475",
        ["4.23078", "0.798285", None, None, None, None, "2.29654", "0.352951"],
    ),
]


def _leaves(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for item in tree for t in _leaves(item)]


def _as_leaves(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return leaf(tree)
    return type(tree)(_as_leaves(t) for t in tree)


@pytest.mark.parametrize(
    ("make", "inputs", "value", "grads"), [r[1:] for r in REFERENCE], ids=[r[0] for r in REFERENCE]
)
def test_lightly_reference_value(
    make: Any, inputs: Any, value: str, grads: list[str | None]
) -> None:
    args = _as_leaves(inputs())
    loss = make()(*args)
    assert loss.shape == ((1,) if isinstance(loss, torch.Tensor) and loss.dim() else ())
    assert loss.item() == approx(value)
    tensors = _leaves(args)
    found = torch.autograd.grad(loss.sum(), tensors, allow_unused=True)
    for i, (norm, g) in enumerate(zip(grads, found, strict=False)):
        if norm is not None:
            assert g is not None and g.norm().item() == approx(norm), f"input {i}"


def test_tico_reference_values_depend_on_call_order() -> None:
    loss = TiCoLoss()
    a, b = leaf(_a()), leaf(_b())
    first = loss(a, b)
    first.backward()
    assert first.item() == approx("1.14117")
    assert a.grad.norm().item() == approx("0.284784")
    assert b.grad.norm().item() == approx("0.271166")
    assert loss(_b(), _a()).item() == approx("1.5194")


def _dino_views() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [T(4, 5, s=s) for s in (0, 1)], [T(4, 5, s=s) for s in (10, 11, 12, 13)]


def test_dino_reference_values_with_epochs() -> None:
    """DINOLoss(5, .04, .07, 3): epoch 1 is tau_t = .055, epoch 5 is past the warmup."""
    loss = DINOLoss(5, 0.04, 0.07, 3)
    teacher, student = _dino_views()
    t, s = [leaf(x) for x in teacher], [leaf(x) for x in student]
    first = loss(t, s, epoch=1)
    first.backward()
    assert first.item() == approx("10.2232")
    norms = ["0.110955", "0.528511", "0.716461", "0.955076", "1.85843", "2.0398"]
    for x, norm in zip(t + s, norms, strict=True):
        assert x.grad.norm().item() == approx(norm)
    assert loss(*_dino_views(), epoch=5).item() == approx("10.2221")
    center = loss.center.flatten().tolist()
    expected = ["-0.009439", "0.007866", "0.021471", "0.024979", "0.016738"]
    for got, want in zip(center, expected, strict=True):
        assert got == approx(want)


def test_ibot_reference_value() -> None:
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 2] = mask[1, 0, 1] = True
    loss = IBOTPatchLoss(5)
    t, s = leaf(T(3, 5, s=0)), leaf(T(3, 5, s=1))
    value = loss(t, s, mask)
    value.backward()
    assert value.item() == approx("4.10826")
    assert t.grad.norm().item() == approx("4.75343")
    assert s.grad.norm().item() == approx("7.52351")
    expected = ["0.010207", "0.02536", "0.028587", "0.018368", "-0.000489"]
    for got, want in zip(loss.center.value.flatten().tolist(), expected, strict=True):
        assert got == approx(want)


# -- deliberate differences ------------------------------------------------------------------


def test_co2_is_differentiable() -> None:
    """lightly 1.6 detaches CO2's result (it never trains); lossd's carries the gradient."""
    a, b = leaf(_a()), leaf(_b())
    value = CO2Regularizer()(a, b)
    assert value.item() == approx("32.9837")  # lightly's value
    assert value.requires_grad and value.grad_fn is not None
    value.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


@pytest.mark.parametrize("bank", [0, (6, 4)])
def test_co2_gradient_is_the_gradient_of_its_value(bank: Any) -> None:
    """gradcheck in float64: the gradient is that of the returned value, bank included."""
    torch.manual_seed(0)
    state = CO2Regularizer(memory_bank_size=bank).state_dict()

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        module = CO2Regularizer(memory_bank_size=bank, t_consistency=0.5)
        module.load_state_dict(state)  # the same bank on every evaluation
        return module(x, y)

    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, y))


def test_dcl_named_weight_fn_is_dclw() -> None:
    a, b = _a(), _b()
    named = DCLLoss(weight_fn="von_mises_fisher")
    x0, x1, y0, y1 = leaf(a), leaf(b), leaf(a), leaf(b)
    value, reference = named(x0, x1), DCLWLoss()(y0, y1)
    assert value.item() == reference.item()
    assert value.item() == approx("6.31577")  # lightly's DCLW value
    assert value.item() != DCLLoss()(a, b).item()  # the weighting changes the value
    value.backward()
    reference.backward()
    torch.testing.assert_close(x0.grad, y0.grad, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, y1.grad, rtol=0, atol=0)


def test_dcl_callable_weight_fn_sees_normalized_inputs_and_is_not_detached() -> None:
    seen: list[torch.Tensor] = []

    def weight(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.extend([x, y])
        return (x * y).sum(dim=1)

    def detached(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return weight(x.detach(), y.detach())

    a1, a2 = leaf(_a()), leaf(_a())
    DCLLoss(weight_fn=weight)(a1, _b()).backward()
    DCLLoss(weight_fn=detached)(a2, _b()).backward()
    for t in seen:
        torch.testing.assert_close(t.norm(dim=1), torch.ones(4))
    assert not torch.allclose(a1.grad, a2.grad)  # the gradient flows through the weights


def test_pmsn_custom_named_distributions() -> None:
    anchors, targets, prototypes = T(8, 6, s=0), T(4, 6, s=1), T(5, 6, s=2)
    power = PMSNCustomLoss("power_law")(anchors, targets, prototypes)
    assert power.item() == PMSNLoss()(anchors, targets, prototypes).item()
    uniform = PMSNCustomLoss("uniform")(anchors, targets, prototypes)

    def flat(m: torch.Tensor) -> torch.Tensor:
        return torch.full_like(m, 1 / m.shape[0])

    assert uniform.item() == pytest.approx(
        PMSNCustomLoss(flat)(anchors, targets, prototypes).item(), rel=1e-6
    )
    assert uniform.item() != power.item()


def test_pmsn_regularizers_in_closed_form() -> None:
    """m = [.1, .3, .6]: power law (e=.25) gives sum q log(q/m) with q ~ k^-e; the uniform
    prior gives (1/3) sum log((1/3)/m)."""
    m = torch.tensor([0.1, 0.3, 0.6])
    q = [k**-0.25 for k in (1, 2, 3)]
    q = [v / sum(q) for v in q]
    expected = sum(qk * math.log(qk / mk) for qk, mk in zip(q, m.tolist(), strict=True))
    assert PMSNLoss().regularization_loss(m).item() == pytest.approx(expected, rel=1e-5)
    uniform = sum(math.log((1 / 3) / mk) for mk in m.tolist()) / 3
    assert PMSNCustomLoss("uniform").regularization_loss(m).item() == pytest.approx(
        uniform, rel=1e-5
    )
    assert PMSNCustomLoss("power_law").regularization_loss(m).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_dino_epoch_and_teacher_temp() -> None:
    teacher, student = _dino_views()

    def value(*args: Any, **kwargs: Any) -> float:
        return DINOLoss(5, 0.04, 0.07, 3)(teacher, student, *args, **kwargs).item()

    schedule = torch.linspace(0.04, 0.07, 3).tolist()  # float32 values, like lightly's
    for epoch, tau in enumerate(schedule):
        assert value(epoch=epoch) == value(teacher_temp=tau)
    assert value(epoch=7) == value(teacher_temp=0.07) == value()  # past the warmup
    assert value(epoch=-1) == value(teacher_temp=schedule[-1])  # negative: from the end
    assert value(epoch=-3) == value(teacher_temp=schedule[0])
    assert value(0.055, epoch=0) == value(teacher_temp=0.055)  # teacher_temp wins
    assert value(epoch=0) != value(epoch=2)


def test_dino_third_positional_argument_is_teacher_temp() -> None:
    """lightly 1.6: `loss(t, s, 5)` means teacher_temp=5.0, not epoch 5."""
    teacher, student = _dino_views()
    third = DINOLoss(5, 0.04, 0.07, 30)(teacher, student, 5).item()
    assert third == DINOLoss(5, 0.04, 0.07, 30)(teacher, student, teacher_temp=5.0).item()
    assert third != DINOLoss(5, 0.04, 0.07, 30)(teacher, student, epoch=5).item()
    with pytest.raises(ValueError, match="`teacher_temp`"):  # lightly: NaN
        DINOLoss(5)(teacher, student, 0)


def test_msn_me_max_weight_overrides_regularization_weight() -> None:
    args = (T(8, 6, s=0), T(4, 6, s=1), T(5, 6, s=2))
    with pytest.warns(DeprecationWarning):
        old = MSNLoss(regularization_weight=1.0, me_max_weight=0.3)
    assert old.regularization_weight == 0.3
    assert old(*args).item() == MSNLoss(regularization_weight=0.3)(*args).item()
    assert old(*args).item() != MSNLoss()(*args).item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MSNLoss(regularization_weight=0.3)  # no warning without me_max_weight


def test_bare_int_bank_size_takes_the_dim_from_the_first_batch() -> None:
    """lightly 1.6 rejects a bare int; the 1.5 API (and lossd) take dim from the data."""
    loss = NTXentLoss(memory_bank_size=64)
    loss(leaf(torch.randn(8, 24)), torch.randn(8, 24))
    assert loss.memory_bank.bank.shape == (64, 24)
    bank = MemoryBankModule(size=64)
    bank(torch.randn(8, 3, 5), update=True)
    assert bank.bank.shape == (64, 3, 5)


def test_banks_and_tico_covariance_are_in_the_state_dict() -> None:
    assert set(NTXentLoss(memory_bank_size=(8, 4)).state_dict()) == {
        "memory_bank.bank",
        "memory_bank.bank_ptr",
    }
    assert set(CO2Regularizer(memory_bank_size=(8, 4)).state_dict()) == {
        "memory_bank.bank",
        "memory_bank.bank_ptr",
    }
    assert set(MemoryBankModule(size=(8, 4)).state_dict()) == {"bank", "bank_ptr"}
    tico = TiCoLoss()
    tico(_a(), _b())
    assert set(tico.state_dict()) == {"C"}


def test_dino_center_stays_float32_after_a_float64_batch() -> None:
    """lightly's center would turn float64 for good."""
    loss = DINOLoss(5)
    teacher, student = _dino_views()
    loss([t.double() for t in teacher], [s.double() for s in student])
    assert loss.center.dtype == torch.float32
    expected = 0.1 * torch.stack(teacher).double().mean(dim=(0, 1))
    torch.testing.assert_close(loss.center.flatten().double(), expected, rtol=1e-6, atol=1e-7)


def test_ibot_without_masked_tokens_keeps_its_center() -> None:
    """lightly would set the center to NaN for good (mean of no tokens)."""
    loss = IBOTPatchLoss(4)
    loss.load_state_dict({"center.center": torch.full((1, 4), 0.25)})
    value = loss(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(3, 2, 2, dtype=torch.bool))
    assert value.item() == 0.0
    torch.testing.assert_close(loss.center.value, torch.full((1, 4), 0.25), rtol=0, atol=0)


def _textbook_sinkhorn(scores: torch.Tensor, iterations: int, epsilon: float) -> torch.Tensor:
    """SwaV's Sinkhorn-Knopp as in the paper's pseudo-code, in float64, no max shift."""
    q = torch.exp(scores.double() / epsilon).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T


@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_swav_sinkhorn_equals_the_textbook_on_moderate_scores(iterations: int) -> None:
    scores = T(6, 5, s=3) * 0.5
    torch.testing.assert_close(
        sinkhorn(scores.double(), iterations, 0.05), _textbook_sinkhorn(scores, iterations, 0.05)
    )
    codes = sinkhorn(scores, iterations, 0.05)
    if iterations:
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(6))


def test_swav_large_scores_do_not_overflow() -> None:
    """lightly: exp(out / eps) overflows (exp > 3.4e38) and the loss is NaN; lossd shifts
    the scores by their maximum first, which leaves the codes unchanged."""
    high = [T(4, 5, s=0) + 10, T(4, 5, s=1) + 10]
    low = [T(4, 5, s=5) + 10]
    assert torch.isinf(torch.exp(high[0] / 0.05)).any()  # float32 exp overflows
    value = SwaVLoss()(high, low)
    assert torch.isfinite(value).all()
    codes = sinkhorn(high[0], 3, 0.05)
    torch.testing.assert_close(codes, _textbook_sinkhorn(high[0], 3, 0.05).float())
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(4))


@pytest.mark.xfail(
    strict=True,
    reason="known limit: after the max shift, a prototype whose "
    "every score is > 87 * epsilon below the maximum underflows to a zero row, "
    "and Sinkhorn divides 0 by 0 (lightly: NaN by overflow). A log-domain "
    "Sinkhorn fixes it at about 3x the Sinkhorn time.",
)
def test_swav_huge_scores_give_finite_codes() -> None:
    high = [T(4, 5, s=0) * 100, T(4, 5, s=1) * 100]
    assert torch.isfinite(SwaVLoss()(high, [T(4, 5, s=5) * 100])).all()


def test_temperatures_must_be_positive_except_ntxent() -> None:
    a, b = _a(), _b()
    forward = NTXentLoss(temperature=-0.5)(a, b)
    backward = NTXentLoss(temperature=-0.5)(b, a)
    assert torch.isfinite(forward) and forward.item() == pytest.approx(backward.item(), rel=1e-5)
    for make in (
        lambda: DCLLoss(temperature=-0.1),
        lambda: SwaVLoss(temperature=0),
        lambda: MSNLoss(temperature=0.0),
        lambda: DINOLoss(student_temp=-1),
    ):
        with pytest.raises(ValueError, match="temp"):
            make()


def test_vicregl_compares_views_by_index() -> None:
    """lightly skips a pair by object identity: the same tensor twice gives NaN there."""
    g, local, grid = T(4, 8, s=0), T(4, 2, 2, 4, s=1), T(4, 2, 2, 2, s=2)
    same = VICRegLLoss(num_matches=(2, 2))([(g, local), (g, local)], [grid, grid])
    copies = VICRegLLoss(num_matches=(2, 2))(
        [(g, local), (g.clone(), local.clone())], [grid, grid.clone()]
    )
    assert torch.isfinite(same).all()
    assert same.item() == copies.item()


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: TiCoLoss()(torch.randn(1, 4), torch.randn(1, 4)), "z_a"),  # lightly: Assertion
        (lambda: VICRegLoss()(torch.randn(1, 4), torch.randn(1, 4)), "z_a"),  # Assertion
        (lambda: VICRegLoss()(torch.randn(3, 4), torch.randn(3, 5)), "z_b"),  # Assertion
        (lambda: BarlowTwinsLoss()(torch.randn(3, 4), torch.randn(3, 5)), "z_b"),  # Assertion
        (lambda: MMCRLoss()(torch.randn(3, 2, 4), torch.randn(3, 3, 4)), "momentum"),  # Assertion
        (lambda: MMCRLoss()(torch.randn(3, 4), torch.randn(3, 4)), "online"),  # RuntimeError
        (lambda: NTXentLoss()(torch.randn(3, 4), torch.randn(2, 4)), "out1"),  # IndexError
        (lambda: NTXentLoss()(torch.randn(3, 4, 2), torch.randn(3, 4, 2)), "out0"),  # ValueError
        (lambda: DCLLoss()(torch.randn(1, 4), torch.randn(1, 4)), "out0"),  # -inf
        (lambda: HypersphereLoss()(torch.randn(1, 4), torch.randn(1, 4)), "z_a"),  # NaN
        (
            lambda: IBOTPatchLoss(4)(
                torch.randn(2, 4), torch.randn(2, 4), torch.ones(1, 1, 3).bool()
            ),
            "teacher_out",
        ),  # RuntimeError
        (
            lambda: IBOTPatchLoss(4)(torch.randn(2, 4), torch.randn(2, 4), torch.ones(1, 1, 2)),
            "mask",
        ),  # IndexError
        (
            lambda: SwaVLoss()([torch.randn(3, 4), torch.randn(3, 4)], [], [torch.randn(5, 4)]),
            "queue_outputs",
        ),  # IndexError
        (
            lambda: MSNLoss()(torch.randn(5, 4), torch.randn(2, 4), torch.randn(3, 4)),
            "anchors",
        ),  # RuntimeError
        (lambda: DINOLoss(4)([torch.randn(2, 4)], [torch.randn(2, 4)]), "teacher_out"),
    ],
    ids=[
        "tico-B1",
        "vicreg-B1",
        "vicreg-shapes",
        "barlow-dims",
        "mmcr-shapes",
        "mmcr-2d",
        "ntxent-batch",
        "ntxent-3d",
        "dcl-B1",
        "hypersphere-B1",
        "ibot-count",
        "ibot-float-mask",
        "swav-short-queue",
        "msn-multiple",
        "dino-one-view",
    ],
)
def test_bad_input_is_a_value_error_where_lightly_raises_something_else(
    call: Any, name: str
) -> None:
    with pytest.raises(ValueError, match=f"`{name}"):
        call()


# -- closed-form facts (semantics §6) -------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 5, 16])
@pytest.mark.parametrize("tau", [0.1, 0.5, -0.5])
def test_ntxent_identical_embeddings_give_log_2b_minus_1(batch: int, tau: float) -> None:
    """Every logit is 1/tau, so each row's cross entropy is log(#candidates) = log(2B - 1)."""
    x = torch.ones(batch, 7)
    assert NTXentLoss(temperature=tau)(x, x.clone()).item() == pytest.approx(
        math.log(2 * batch - 1), abs=1e-5
    )


@pytest.mark.parametrize(("n", "batch"), [(6, 3), (8, 4), (5, 2)])
def test_ntxent_identical_embeddings_with_a_filled_bank_give_log_n_plus_1(
    n: int, batch: int
) -> None:
    loss = NTXentLoss(temperature=0.2, memory_bank_size=(n, 3))
    x = torch.tensor([[1.0, 2.0, 2.0]]).expand(batch, 3)
    for _ in range(math.ceil(n / batch) + 1):  # fills every row (surplus rows are dropped)
        loss(leaf(x), x.clone())
    torch.testing.assert_close(loss.memory_bank.bank, F.normalize(x[:1], dim=1).expand(n, 3))
    assert loss(leaf(x), x.clone()).item() == pytest.approx(math.log(n + 1), abs=1e-5)


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        ([[1.0]], -math.log(2e-8)),  # B = 1: the "neighbour" is the point itself: 17.7275
        ([[0.0, 1.0], [0.0, -1.0]], -math.log(2)),
        ([[0.0, 1.0], [1.0, 0.0]], -math.log(math.sqrt(2))),
    ],
)
def test_koleo_reference_values(x: list[list[float]], expected: float) -> None:
    assert KoLeoLoss()(torch.tensor(x)).item() == pytest.approx(expected, rel=1e-5)
    if len(x) == 1:
        assert expected == pytest.approx(17.7275, abs=1e-4)


def test_koleo_duplicate_rows_give_a_huge_value() -> None:
    assert KoLeoLoss()(torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, -1.0]])).item() > 10


@pytest.mark.parametrize("lmda", [0.0, 5e-3, 1.0])
def test_mmcr_zero_input_gives_zero(lmda: float) -> None:
    assert MMCRLoss(lmda=lmda)(torch.zeros(4, 2, 3), torch.zeros(4, 2, 3)).item() == 0.0


def test_barlow_is_invariant_to_affine_rescaling() -> None:
    x = T(8, 5, s=2)
    assert BarlowTwinsLoss()(x, x.clone()).item() == pytest.approx(
        BarlowTwinsLoss()(x, 2 * x + 4).item(), rel=1e-4
    )


def _cross_entropy(teacher: list[float], student: list[float], tau_t: float, tau_s: float) -> float:
    """-sum softmax(teacher / tau_t) * log_softmax(student / tau_s), by hand."""
    et = [math.exp(v / tau_t) for v in teacher]
    p = [v / sum(et) for v in et]
    log_z = math.log(sum(math.exp(v / tau_s) for v in student))
    return -sum(pk * (v / tau_s - log_z) for pk, v in zip(p, student, strict=True))


def test_ibot_weights_tokens_per_image_and_counts_empty_images() -> None:
    """3 images with 2, 1 and 0 masked tokens: (ce_a / 2 + ce_b / 2 + ce_c) / 3."""
    mask = torch.zeros(3, 1, 3, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 0, 2] = mask[1, 0, 1] = True
    teacher, student = T(3, 4, s=0), T(3, 4, s=1)
    ce = [_cross_entropy(teacher[i].tolist(), student[i].tolist(), 0.04, 0.1) for i in range(3)]
    expected = (ce[0] / 2 + ce[1] / 2 + ce[2]) / 3
    assert IBOTPatchLoss(4)(teacher, student, mask).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("momentum", "factor"), [(0.0, 1.0), (0.1, 0.9), (0.5, 0.5), (0.9, 0.1), (1.0, 0.0)]
)
def test_center_momentum_table(momentum: float, factor: float) -> None:
    """From a zero center, one update with momentum m gives (1 - m) * mean."""
    x = T(6, 4, s=3)
    center = Center(size=(1, 4), momentum=momentum)
    center.update(x)
    torch.testing.assert_close(center.value, factor * x.mean(dim=0, keepdim=True))

    ibot = IBOTPatchLoss(4, center_momentum=momentum)
    mask = torch.ones(2, 1, 3, dtype=torch.bool)
    ibot(x, x.clone(), mask)
    torch.testing.assert_close(ibot.center.value, factor * x.mean(dim=0, keepdim=True))

    dino = DINOLoss(4, center_momentum=momentum)
    dino([x[:3], x[3:]], [x[:3].clone(), x[3:].clone()])
    torch.testing.assert_close(dino.center, factor * x.mean(dim=0).reshape(1, 1, 4))
