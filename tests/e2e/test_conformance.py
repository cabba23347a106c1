"""Every reference case through the server equals the in-process loss: value, gradients,
state after each step; and both equal lightly's reference values."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lossd.client import LossClient, RemoteLoss
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


def gradients(result: torch.Tensor, args: dict[str, Any]) -> Any:
    """d result.sum() / d each leaf of args (None where there is none), shaped like args."""
    inputs = [t for t in leaves(args) if t.requires_grad]
    found = torch.autograd.grad(result.sum(), inputs, allow_unused=True)
    by_id = {id(t): g for t, g in zip(inputs, found)}
    return tree_map(lambda t: by_id.get(id(t)), args)


def assert_same(remote: Any, local: Any, where: str) -> None:
    """Bit-identical trees (the server runs the same code on the same CPU)."""
    assert_tree_close(remote, local, 0, 0, where)


def test_every_loss_has_a_case() -> None:
    assert {c["loss"] for c in CASES} == set(registry.LOSSES)


@pytest.fixture(params=["unary", "stream", "shared-memory"])
def any_client(request: pytest.FixtureRequest, target: str) -> Iterator[LossClient]:
    """A unary client, a streaming one whose tiny chunks split every tensor, and one that
    passes tensors through shared memory."""
    with LossClient(
        target,
        timeout=60,
        stream=request.param == "stream",
        chunk_mb=100 / 2**20,
        shared_memory=request.param == "shared-memory",
    ) as client:
        yield client


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_case_through_server_equals_in_process(
    case: dict[str, Any], any_client: LossClient
) -> None:
    client = any_client
    remote = client.loss(case["loss"], **case["config"])
    local = registry.get(case["loss"]).cls(**case["config"])
    if case["state"] is not None:
        remote.load_state_dict(case["state"])
        local.load_state_dict(case["state"])
    for i, step in enumerate(case["steps"]):
        where = f"{case['name']} step {i}"
        remote_args, local_args = as_leaves(step["args"]), as_leaves(step["args"])
        remote_out, local_out = remote(**remote_args), local(**local_args)
        if step["loss"] is None:
            output, bank = remote_out
            assert output is remote_args["output"], "MemoryBankModule returns its input as is"
            assert_same(bank, local_out[1], where)
            assert_tree_close({"output": output, "bank": bank}, step["outputs"], 0, 0, where)
        else:
            assert remote_out.shape == local_out.shape and remote_out.dtype == local_out.dtype
            assert_same(remote_out.detach(), local_out.detach(), where)
            assert remote_out.item() == pytest.approx(step["loss"], rel=LOSS_RTOL), where
            remote_grads = gradients(remote_out, remote_args)
            assert_same(remote_grads, gradients(local_out, local_args), where)
            expected = {
                k: (v if isinstance(v, (torch.Tensor, list, tuple)) else None)
                for k, v in step["grads"].items()
            }
            got = {
                k: (v if isinstance(v, (torch.Tensor, list, tuple)) else None)
                for k, v in remote_grads.items()
            }
            assert_tree_close(got, expected, GRAD_RTOL, GRAD_ATOL, where)
        assert_same(remote.state_dict(), local.state_dict(), where)
        assert_tree_close(remote.state_dict(), step["state_after"], LOSS_RTOL, 1e-6, where)
    assert isinstance(remote, RemoteLoss)
    assert client.get_session(remote.session_id).steps == len(case["steps"])
