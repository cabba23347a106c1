"""Every golden case in float64, float16 and bfloat16: it works (close to lightly's float32
values) or raises ValueError; state keeps its float32 dtype; mixed dtypes are handled."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from tests.golden import GRAD_ATOL, GRAD_RTOL, LOSS_RTOL, leaves, tree_map
from tests.losses.cases import CASES, STATEFUL_CASES, build, case_ids, run_step, step_args

DTYPES = [torch.float64, torch.float16, torch.bfloat16]

#: Loose bounds for half precision, relative to max(1, |reference|) for the loss and to
#: the reference gradient's norm. float16 keeps ~3 decimal digits, bfloat16 ~2-3; errors
#: grow through temperatures like 0.04 and through sums over the batch.
HALF_LOSS_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
HALF_GRAD_TOL = {torch.float16: 5e-2, torch.bfloat16: 1.5e-1}
#: VICRegL matches local features by nearest neighbour: rounding can change a match, which
#: moves the gradient of the local features by more than rounding itself.
VICREGL_HALF_GRAD_TOL = 0.3


def _finite(tree: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in leaves(tree))


def _pairs(actual: Any, expected: Any) -> list[tuple[Tensor, Tensor]]:
    """(actual, expected) gradient tensors, matched by position; None where expected is None."""
    if expected is None:
        assert actual is None, "a gradient where lightly has none"
        return []
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), "no gradient where lightly has one"
        return [(actual, expected)]
    if isinstance(expected, dict):
        return [p for k in expected for p in _pairs(actual[k], expected[k])]
    return [p for a, e in zip(actual, expected, strict=True) for p in _pairs(a, e)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_case_in_another_dtype_works_or_raises_value_error(
    case: dict[str, Any], dtype: torch.dtype
) -> None:
    module = build(case)
    for i, step in enumerate(case["steps"]):
        where = f"{case['name']} step {i} in {dtype}"
        try:
            result, grads = run_step(module, step, dtype)
        except ValueError:
            return  # an allowed answer; nothing else may escape
        if step["loss"] is None:  # MemoryBankModule: output unchanged, bank float32
            output, bank = result
            assert output.dtype == dtype and bank.dtype == torch.float32, where
            tol = 0 if dtype == torch.float64 else 1e-2
            torch.testing.assert_close(bank, step["outputs"]["bank"], rtol=tol, atol=tol)
            continue
        assert result.dtype in (dtype, torch.float32), where  # float32 state/constants promote
        assert _finite(result) and _finite([g for g in leaves(grads) if g is not None]), where
        reference = step["loss"]
        if dtype == torch.float64:
            assert result.item() == pytest.approx(reference, rel=LOSS_RTOL), where
            for got, want in _pairs(grads, step["grads"]):
                assert got.dtype == dtype, where
                torch.testing.assert_close(got.float(), want, rtol=GRAD_RTOL, atol=GRAD_ATOL)
        else:
            bound = HALF_LOSS_TOL[dtype] * max(1.0, abs(reference))
            assert abs(result.item() - reference) <= bound, f"{where}: {result.item()}"
            limit = (
                VICREGL_HALF_GRAD_TOL if case["loss"] == "VICRegLLoss" else (HALF_GRAD_TOL[dtype])
            )
            for got, want in _pairs(grads, step["grads"]):
                assert got.dtype == dtype, where
                error = (got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-6)
                assert error <= limit, f"{where}: relative gradient error {error:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", STATEFUL_CASES, ids=case_ids(STATEFUL_CASES))
def test_state_stays_float32(case: dict[str, Any], dtype: torch.dtype) -> None:
    """Banks, centers and an existing C keep float32 whatever the batches' dtype (lightly
    would turn a center into float64 for good after one float64 batch)."""
    module = build(case)
    steps = case["steps"]
    if case["loss"] == "TiCoLoss":  # C is born with the first batch: make it float32 first
        run_step(module, steps[0])
        steps = steps[1:]
    for step in steps:
        run_step(module, step, dtype)
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                assert value.dtype == torch.float32, f"{key} became {value.dtype}"


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_tico_covariance_takes_the_first_batch_dtype_at_least_float32(
    first: torch.dtype, expected: torch.dtype
) -> None:
    case = next(c for c in CASES if c["loss"] == "TiCoLoss")
    module = build(case)
    run_step(module, case["steps"][0], first)
    assert module.C.dtype == expected
    for other in DTYPES:  # and keeps it
        run_step(module, case["steps"][1], other)
        assert module.C.dtype == expected


def _top_level_tensor_args(case: dict[str, Any]) -> list[str]:
    return [
        k
        for k, v in case["steps"][0]["args"].items()
        if any(t.is_floating_point() for t in leaves(v))
    ]


MIXED = [(c, name, dtype) for c in CASES for name in _top_level_tensor_args(c) for dtype in DTYPES]


@pytest.mark.parametrize(
    ("case", "arg", "dtype"), MIXED, ids=[f"{c['name']}-{a}-{d}" for c, a, d in MIXED]
)
def test_one_argument_in_another_dtype_works_or_raises_value_error(
    case: dict[str, Any], arg: str, dtype: torch.dtype
) -> None:
    module = build(case)
    step = case["steps"][0]
    args = step_args(step)
    args[arg] = tree_map(
        lambda t: (
            t.detach().to(dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t
        ),
        args[arg],
    )
    try:
        result = module(**args)
    except ValueError as error:
        assert "`" in str(error)
        return
    if isinstance(result, tuple):
        return
    assert _finite(result)
    reference = step["loss"]
    assert abs(result.item() - reference) <= HALF_LOSS_TOL[torch.bfloat16] * max(1, abs(reference))
    inputs = [t for t in leaves(args) if t.requires_grad]
    grads = torch.autograd.grad(result.sum(), inputs, allow_unused=True)
    for t, g in zip(inputs, grads, strict=True):
        assert g is None or (g.dtype == t.dtype and bool(torch.isfinite(g).all()))
