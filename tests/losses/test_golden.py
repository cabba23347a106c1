"""Every lightly 1.6.0 reference case: forward values, gradients and state after each step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lossd.losses import registry
from tests.golden import (
    GRAD_ATOL,
    GRAD_RTOL,
    LOSS_RTOL,
    as_leaves,
    assert_tree_close,
    case_id,
    leaves,
    load_cases,
    tree_map,
)

CASES = load_cases()


def build(case: dict[str, Any]) -> torch.nn.Module:
    """The loss of a case, with the case's initial state loaded."""
    module = registry.get(case["loss"]).cls(**case["config"])
    if case["state"] is not None:
        module.load_state_dict(case["state"])
    return module


def gradients(loss: torch.Tensor, args: dict[str, Any]) -> dict[str, Any]:
    """d loss.sum() / d every leaf of args, shaped like args (None where no gradient)."""
    inputs = [t for t in leaves(args) if t.requires_grad]
    found = torch.autograd.grad(loss.sum(), inputs, allow_unused=True)
    by_id = {id(t): g for t, g in zip(inputs, found)}
    grads = tree_map(lambda t: by_id.get(id(t)), args)
    return {
        k: (None if not isinstance(v, (torch.Tensor, list, tuple)) else v) for k, v in grads.items()
    }


def test_there_is_a_case_for_every_loss() -> None:
    assert {c["loss"] for c in CASES} == set(registry.LOSSES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_case(case: dict[str, Any]) -> None:
    module = build(case)
    for i, step in enumerate(case["steps"]):
        where = f"{case['name']} step {i}"
        args = as_leaves(step["args"])
        result = module(**args)
        if step["loss"] is None:  # MemoryBankModule answers its outputs
            output, bank = result
            assert_tree_close({"output": output, "bank": bank}, step["outputs"], 0, 0, where)
        else:
            assert result.shape == (1,) or result.dim() == 0, f"{where}: shape {result.shape}"
            assert result.item() == pytest.approx(step["loss"], rel=LOSS_RTOL), where
            assert_tree_close(gradients(result, args), step["grads"], GRAD_RTOL, GRAD_ATOL, where)
        assert_tree_close(module.state_dict(), step["state_after"], LOSS_RTOL, 1e-6, where)
