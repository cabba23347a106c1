"""Helpers shared by the loss-library tests: the golden cases grouped by kind, running a
step with leaves that require grad, and snapshots of a loss's state."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lossd.losses import registry
from tests.golden import as_leaves, leaves, load_cases, tree_map

CASES: list[dict[str, Any]] = load_cases()

#: Cases whose loss has state after a step (banks, centers, TiCo's C, MemoryBankModule).
STATEFUL_CASES: list[dict[str, Any]] = [
    c for c in CASES if any(step["state_after"] for step in c["steps"])
]

#: One case per loss class (the first one in the file).
FIRST_CASE: dict[str, dict[str, Any]] = {}
for _case in CASES:
    FIRST_CASE.setdefault(_case["loss"], _case)


def T(*shape: int, s: int = 0) -> Tensor:
    """The semantics doc's input recipe (§7): sin(0.7 i + 1.3 s) over i < prod(shape),
    computed in float64, reshaped, then cast to float32."""
    n = math.prod(shape)
    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.7 + 1.3 * s).reshape(shape).float()


def case_ids(cases: list[dict[str, Any]]) -> list[str]:
    """Readable pytest ids."""
    return [c["name"] for c in cases]


def build(case: dict[str, Any], load_state: bool = True) -> nn.Module:
    """A fresh instance of the case's loss, with the case's initial state loaded."""
    module = registry.get(case["loss"]).cls(**case["config"])
    if load_state and case["state"] is not None:
        module.load_state_dict(case["state"])
    return module


def cast(tree: Any, dtype: torch.dtype | None) -> Any:
    """`tree` with every floating tensor cast to `dtype` (None: unchanged)."""
    if dtype is None:
        return tree
    return tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def step_args(step: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Fresh copies of a step's arguments: floating tensors become leaves requiring grad."""
    return as_leaves(cast(step["args"], dtype))


def detached_args(step: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Fresh copies of a step's arguments that do not require grad."""
    return tree_map(lambda t: t.detach().clone(), cast(step["args"], dtype))


def gradients(result: Tensor, args: dict[str, Any]) -> dict[str, Any]:
    """d result.sum() / d every leaf of args, shaped like args (None where no gradient)."""
    inputs = [t for t in leaves(args) if t.requires_grad]
    found: tuple[Tensor | None, ...] = ()
    if inputs and result.requires_grad:
        found = torch.autograd.grad(result.sum(), inputs, allow_unused=True)
    by_id = {id(t): g for t, g in zip(inputs, found, strict=False)}

    def grad_of(tree: Any) -> Any:
        if isinstance(tree, Tensor):
            return by_id.get(id(tree))
        if isinstance(tree, (list, tuple)):
            return type(tree)(grad_of(v) for v in tree)
        return None  # numbers, flags, None

    return {k: grad_of(v) for k, v in args.items()}


def run_step(
    module: nn.Module, step: dict[str, Any], dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """One forward (and backward) of a step: (result, gradients or None for outputs)."""
    args = step_args(step, dtype)
    result = module(**args)
    if isinstance(result, tuple):  # MemoryBankModule answers (output, bank)
        return tuple(r.detach().clone() if isinstance(r, Tensor) else r for r in result), None
    return result.detach().clone(), gradients(result, args)


def snapshot(module: nn.Module) -> dict[str, Tensor | None]:
    """Every buffer of `module`, cloned, including buffers that are still None (lazy state)."""
    found: dict[str, Tensor | None] = {}
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            key = f"{prefix}.{name}" if prefix else name
            found[key] = None if buf is None else buf.detach().clone()
    return found


def cloned_state(module: nn.Module) -> dict[str, Tensor]:
    """`state_dict()` with every tensor cloned, so later steps cannot change it."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(actual: dict[str, Any], expected: dict[str, Any], where: str = "") -> None:
    """Two snapshots (or state dicts) hold the same names, Nones, dtypes and exact values."""
    assert set(actual) == set(expected), f"{where}: state names {set(actual)} != {set(expected)}"
    for key, value in expected.items():
        got = actual[key]
        if value is None:
            assert got is None, f"{where}: {key} should still be None"
            continue
        assert got is not None, f"{where}: {key} is None"
        assert got.dtype == value.dtype, f"{where}: {key} dtype {got.dtype} != {value.dtype}"
        torch.testing.assert_close(
            got, value, rtol=0, atol=0, msg=lambda m, key=key: f"{where}: {key}: {m}"
        )


def assert_trees_equal(actual: Any, expected: Any, where: str = "") -> None:
    """Two nested results (tensors, Nones, lists, tuples, dicts) are exactly equal."""
    if expected is None:
        assert actual is None, f"{where}: expected None"
    elif isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{where}: expected a tensor"
        torch.testing.assert_close(
            actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: {m}"
        )
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys differ"
        for k in expected:
            assert_trees_equal(actual[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_trees_equal(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
