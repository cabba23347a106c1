"""Remote modules: the autograd bridge, no_grad, state_dict, drop-in classes, errors."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import lossd.client as remote_api
import lossd.losses as local_api
from lossd.client import (
    InvalidArgumentError,
    LossClient,
    LossdError,
    SessionNotFoundError,
    UnavailableError,
)
from lossd.losses import registry


def pair(batch: int = 8, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, dim, generator=g, requires_grad=True),
        torch.randn(batch, dim, generator=g, requires_grad=True),
    )


def leaf_copy(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def test_gradients_flow_through_scaling_and_other_terms(client: LossClient) -> None:
    remote = client.loss("NTXentLoss", temperature=0.2)
    local = local_api.NTXentLoss(temperature=0.2)
    w = torch.randn(6, 6, requires_grad=True)
    x, y = pair()
    (3.0 * remote(x @ w, y) + (x**2).sum()).backward()
    w_remote, x_remote = w.grad.clone(), x.grad.clone()
    w.grad = None
    x2, y2 = leaf_copy(x, y)
    (3.0 * local(x2 @ w, y2) + (x2**2).sum()).backward()
    torch.testing.assert_close(w_remote, w.grad)
    torch.testing.assert_close(x_remote, x2.grad)
    torch.testing.assert_close(y.grad, y2.grad)


def test_shape_one_results_backpropagate(client: LossClient) -> None:
    views = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    loss = client.loss("SwaVLoss")(views[:2], views[2:])
    assert loss.shape == (1,)
    (loss * 2).sum().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in views)


def test_no_grad_sends_and_computes_no_gradient(client: LossClient) -> None:
    remote = client.loss("NTXentLoss", memory_bank_size=(16, 6))
    before = remote.state_dict()
    x, y = pair()
    with torch.no_grad():
        value = remote(x, y)
    assert not value.requires_grad and value.grad_fn is None
    # lightly's rule, kept remotely: no grad on out0 -> the bank is left alone.
    after = remote.state_dict()
    assert torch.equal(before["memory_bank.bank"], after["memory_bank.bank"])
    value = remote(x.detach(), y.detach())
    assert not value.requires_grad
    remote(x, y).backward()
    assert int(remote.state_dict()["memory_bank.bank_ptr"]) == 8


def test_only_inputs_that_require_grad_get_one(client: LossClient) -> None:
    x, y = pair()
    y = y.detach()
    client.loss("DCLLoss")(x, y).backward()
    assert x.grad is not None and y.grad is None


def test_state_dict_round_trip_and_nesting(client: LossClient) -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(6, 6)
            self.criterion = client.loss("NTXentLoss", memory_bank_size=(16, 6), seed=1)

    model = Model()
    x, y = pair()
    model.criterion(model.head(x), y).backward()
    state = model.state_dict()
    assert {
        "head.weight",
        "head.bias",
        "criterion.memory_bank.bank",
        "criterion.memory_bank.bank_ptr",
    } <= set(state)
    fresh = Model()
    fresh.load_state_dict(state)
    assert torch.equal(
        fresh.criterion.state_dict()["memory_bank.bank"], state["criterion.memory_bank.bank"]
    )
    x2, y2 = pair(seed=3)
    a = model.criterion(x2, y2)
    b = fresh.criterion(*leaf_copy(x2, y2))
    assert torch.equal(a.detach(), b.detach())


def test_memory_bank_module_returns_its_input_object(client: LossClient) -> None:
    bank = client.loss("MemoryBankModule", size=(8, 3))
    out = torch.randn(2, 3)
    output, snapshot = bank(out, update=True)
    assert output is out and snapshot.shape == (3, 8)
    assert client.loss("MemoryBankModule", size=0)(out)[1] is None


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_dropin_classes_mirror_the_in_process_signatures(name: str) -> None:
    local, remote = getattr(local_api, name), getattr(remote_api, name)
    local_params = inspect.signature(local).parameters
    remote_params = inspect.signature(remote).parameters
    assert list(local_params) == list(remote_params)[: len(local_params)]
    assert {"server", "client", "session_id"} <= set(remote_params)
    assert inspect.signature(remote.forward) == inspect.signature(local.forward)
    assert issubclass(remote, remote_api.RemoteLoss) and remote.__name__ == name


def test_dropin_two_line_switch(target: str) -> None:
    criterion = remote_api.NTXentLoss(0.2, memory_bank_size=(32, 6), server=target)
    local = local_api.NTXentLoss(0.2, memory_bank_size=(32, 6))
    local.load_state_dict(criterion.state_dict())
    x, y = pair()
    x2, y2 = leaf_copy(x, y)
    remote_value, local_value = criterion(x, y), local(x2, y2)
    torch.testing.assert_close(remote_value, local_value, rtol=0, atol=0)
    criterion.close(delete_session=True)


def test_positional_constructor_and_forward_arguments(target: str) -> None:
    dino = remote_api.DINOLoss(8, server=target)  # output_dim positionally
    teacher = [torch.randn(4, 8) for _ in range(2)]
    student = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    value = dino(teacher, student, 0.05)  # lightly 1.6: the third positional is teacher_temp
    local = local_api.DINOLoss(8)(teacher, [s.detach() for s in student], 0.05)
    torch.testing.assert_close(value.detach(), local)
    dino.close()


def test_errors_subclass_what_in_process_code_raises(client: LossClient, target: str) -> None:
    remote = client.loss("BarlowTwinsLoss")
    with pytest.raises(ValueError, match="z_a") as info:
        remote(torch.randn(1, 4), torch.randn(1, 4))
    assert isinstance(info.value, InvalidArgumentError) and isinstance(info.value, LossdError)
    with pytest.raises(TypeError):
        remote(torch.randn(4, 4))  # a missing argument fails locally, like nn.Module
    with pytest.raises(ValueError, match="weight_fn"):
        client.loss("DCLLoss", weight_fn=lambda a, b: a)  # callables cannot travel
    with pytest.raises(KeyError):
        client.get_session("missing")
    with pytest.raises(LookupError):
        client.delete_session("missing")
    with pytest.raises(SessionNotFoundError) as missing:
        client.get_session("missing")
    assert str(missing.value).startswith("session 'missing' not found")
    with (
        LossClient("127.0.0.1:1", timeout=2, retries=0) as nowhere,
        pytest.raises(ConnectionError) as down,
    ):
        nowhere.list_sessions()
    assert isinstance(down.value, UnavailableError)


def test_catalog_lists_every_loss(client: LossClient) -> None:
    catalog = {info.name: info for info in client.list_losses()}
    assert set(catalog) == set(registry.LOSSES)
    assert catalog["NTXentLoss"].defaults["temperature"] == 0.5
    assert catalog["NTXentLoss"].args == ("out0", "out1")
    assert catalog["PMSNCustomLoss"].required == ("target_distribution",)
    assert catalog["DINOLoss"].state == ("center",)
