"""ComputeStream: the same semantics as unary Compute, over one long-lived stream."""

from __future__ import annotations

import torch

from lossd.client import InvalidArgumentError, LossClient
from lossd.losses import DINOLoss


def test_large_tensors_travel_in_chunks_both_ways(target: str) -> None:
    with LossClient(target, stream=True, chunk_mb=0.25) as client:
        remote = client.loss("DINOLoss", output_dim=4096)
        local = DINOLoss(output_dim=4096)
        teacher = [torch.randn(64, 4096) for _ in range(2)]  # 1 MiB each: 4 chunks
        student = [torch.randn(64, 4096, requires_grad=True) for _ in range(3)]
        value = remote(teacher, student, epoch=0)
        value.backward()
        copies = [s.detach().clone().requires_grad_(True) for s in student]
        expected = local(teacher, copies, epoch=0)
        expected.backward()
        assert torch.equal(value.detach(), expected.detach())
        for got, want in zip(student, copies):
            assert torch.equal(got.grad, want.grad)
        assert torch.equal(remote.state_dict()["center"], local.center)


def test_a_failed_step_leaves_the_stream_usable(target: str) -> None:
    with LossClient(target, stream=True) as client:
        remote = client.loss("VICRegLoss")
        good = (torch.randn(8, 4, requires_grad=True), torch.randn(8, 4))
        remote(*good)
        try:
            remote(torch.randn(1, 4), torch.randn(1, 4))
        except InvalidArgumentError as error:
            assert "`z_a`" in str(error)
        else:
            raise AssertionError("expected InvalidArgumentError")
        remote(*good).backward()
        assert client.get_session(remote.session_id).steps == 2


def test_sessions_of_one_client_share_nothing_but_the_channel(target: str) -> None:
    with LossClient(target, stream=True) as client:
        a, b = client.loss("NTXentLoss"), client.loss("NTXentLoss", temperature=0.1)
        for _ in range(3):
            a(torch.randn(4, 3), torch.randn(4, 3))
            b(torch.randn(4, 3), torch.randn(4, 3))
        assert client.get_session(a.session_id).steps == 3
        assert client.get_session(b.session_id).steps == 3
