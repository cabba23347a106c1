"""The reference cases computed with lightly 1.6.0 (see tests/losses/data/README.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

DATA = Path(__file__).parent / "losses" / "data" / "lightly_reference.pt"

# Tolerances the reference data's README gives for a faithful float32 implementation.
LOSS_RTOL = 1e-4
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-5


def load_cases() -> list[dict[str, Any]]:
    """All cases, as plain dicts (torch.load with weights_only=True: no pickle code)."""
    return torch.load(DATA, weights_only=True)


def case_id(case: dict[str, Any]) -> str:
    """A readable pytest id."""
    return case["name"]


def tree_map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """Apply fn to every tensor in nested lists, tuples and dicts; keep their types."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def leaves(tree: Any) -> list[Tensor]:
    """The tensors of a tree, depth first."""
    found: list[Tensor] = []
    tree_map(found.append, tree)
    return found


def as_leaves(args: dict[str, Any]) -> dict[str, Any]:
    """Copies of the step's arguments; floating tensors become leaves requiring grad."""

    def leaf(t: Tensor) -> Tensor:
        t = t.detach().clone()
        return t.requires_grad_(t.is_floating_point())

    return tree_map(leaf, args)


def assert_tree_close(actual: Any, expected: Any, rtol: float, atol: float, where: str) -> None:
    """Compare two trees: same structure, None where None, tensors close."""
    if expected is None:
        assert actual is None, f"{where}: expected None, got {actual}"
        return
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{where}: expected a tensor, got {type(actual)}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        torch.testing.assert_close(
            actual.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}"
        )
        return
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys {set(actual)} != {set(expected)}"
        for k in expected:
            assert_tree_close(actual[k], expected[k], rtol, atol, f"{where}.{k}")
        return
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_tree_close(a, e, rtol, atol, f"{where}[{i}]")
        return
    assert actual == expected, f"{where}: {actual!r} != {expected!r}"
