"""Shared memory banks: the bank API, sessions attached to a bank, and several processes
enqueueing into one bank at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lossd.client import AlreadyExistsError, FailedPreconditionError, LossClient
from lossd.losses import NTXentLoss

ROOT = Path(__file__).resolve().parents[2]


def test_bank_lifecycle(client: LossClient) -> None:
    info = client.create_bank("life", 32, 4, seed=1)
    assert info.created and (info.num_features, info.dim) == (32, 4)
    assert info.dtype == torch.float32 and info.pointer == 0 and info.rows_written == 0
    assert not client.create_bank("life", 32, 4).created  # same shape: the existing one
    with pytest.raises(AlreadyExistsError):
        client.create_bank("life", 32, 8)
    state = client.get_bank_state("life")
    torch.manual_seed(1)
    assert torch.equal(state["bank"], torch.nn.functional.normalize(torch.randn(32, 4), dim=-1))
    rows = torch.arange(128.0).reshape(32, 4)
    client.set_bank_state("life", {"bank": rows, "bank_ptr": torch.tensor([5])})
    assert torch.equal(client.get_bank_state("life")["bank"], rows)
    assert client.get_bank("life").pointer == 5
    with pytest.raises(FailedPreconditionError):
        client.set_bank_state("life", {"bank": torch.zeros(31, 4), "bank_ptr": torch.tensor([0])})
    assert "life" in {b.name for b in client.list_banks()}
    client.delete_bank("life")
    with pytest.raises(KeyError):
        client.get_bank("life")


def test_sessions_share_the_bank_and_show_it_as_their_own(client: LossClient) -> None:
    client.create_bank("moco", 16, 6, seed=2)
    a = client.loss("NTXentLoss", shared_bank="moco", temperature=0.2)
    b = client.loss("NTXentLoss", shared_bank="moco", temperature=0.2)
    assert client.get_session(a.session_id).config["memory_bank_size"] == [16, 6]
    local = NTXentLoss(temperature=0.2, memory_bank_size=(16, 6))
    local.load_state_dict({f"memory_bank.{k}": v for k, v in client.get_bank_state("moco").items()})
    g = torch.Generator().manual_seed(0)
    for remote in (a, b, a, b, b):  # any session, one bank, one serial history
        out0 = torch.randn(4, 6, generator=g, requires_grad=True)
        out1 = torch.randn(4, 6, generator=g)
        assert torch.equal(remote(out0, out1).detach(), local(out0, out1).detach())
    bank = client.get_bank("moco")
    assert bank.rows_written == 20 and bank.pointer == 20 % 16
    assert set(bank.sessions) == {a.session_id, b.session_id}
    state = a.state_dict()  # the bank under the loss's usual names
    assert torch.equal(state["memory_bank.bank"], local.memory_bank.bank)
    assert int(state["memory_bank.bank_ptr"]) == bank.pointer
    with pytest.raises(FailedPreconditionError, match="delete them first"):
        client.delete_bank("moco")
    co2 = client.loss("CO2Regularizer", shared_bank="moco")
    queue = client.loss("MemoryBankModule", shared_bank="moco", feature_dim_first=False)
    _, snapshot = queue(torch.randn(2, 6))
    assert torch.equal(snapshot, co2.state_dict()["memory_bank.bank"])


def test_attaching_with_another_shape_or_dtype_fails(client: LossClient) -> None:
    client.create_bank("narrow", 16, 6)
    with pytest.raises(FailedPreconditionError, match=r"\(16, 6\).*\(16, 8\)"):
        client.loss("NTXentLoss", shared_bank="narrow", memory_bank_size=(16, 8))
    with pytest.raises(FailedPreconditionError, match="float16"):
        client.create_session("NTXentLoss", shared_bank="narrow", shared_bank_dtype=torch.float16)
    with pytest.raises(ValueError, match="memory bank"):
        client.loss("DCLLoss", shared_bank="narrow")
    session = client.loss("NTXentLoss", shared_bank="narrow")
    with pytest.raises(FailedPreconditionError, match="memory bank"):
        session(torch.randn(4, 8, requires_grad=True), torch.randn(4, 8))
    half = client.create_bank("half", 8, 6, dtype=torch.float16)
    assert half.dtype == torch.float16
    client.loss("NTXentLoss", shared_bank="half")(
        torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    )
    assert client.get_bank("half").rows_written == 4


ENQUEUE = """
    import sys, torch
    from lossd.client import LossClient
    job, steps = int(sys.argv[1]), int(sys.argv[2])
    with LossClient() as client:
        queue = client.loss("MemoryBankModule", shared_bank="jobs", feature_dim_first=False)
        for step in range(steps):
            rows = torch.tensor([[job, step, row, 0.0] for row in range(8)])
            queue(rows, update=True)
"""

READ = """
    import torch
    from lossd.client import LossClient
    with LossClient() as client:
        rows = client.get_bank_state("jobs")["bank"]
    mine = rows[rows[:, 0] == 0]
    assert len(mine) == 8 * 25, len(mine)
    print(mine[:, 1].reshape(25, 8)[:, 0].tolist())
"""


def run(code: str, target: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**os.environ, "LOSSD_SERVER": target, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_enqueue_into_one_bank(client: LossClient, target: str) -> None:
    client.create_bank("jobs", 512, 4)
    jobs = [run(ENQUEUE, target, str(job), "25") for job in (0, 1)]
    for job in jobs:
        _, err = job.communicate(timeout=180)
        assert job.returncode == 0, err
    bank = client.get_bank("jobs")
    assert bank.rows_written == 400 and bank.pointer == 400
    rows = client.get_bank_state("jobs")["bank"][:400]
    # A serialization of the two jobs' steps: blocks of 8 rows of one (job, step) each,
    # every step exactly once, each job's steps in order, rows in order within a block.
    blocks = rows.reshape(50, 8, 4)
    assert torch.equal(blocks[:, :, 2], torch.arange(8.0).expand(50, 8))
    assert (blocks[:, :, :2] == blocks[:, :1, :2]).all(), "a block mixes two steps"
    for job in (0.0, 1.0):
        steps = blocks[blocks[:, 0, 0] == job][:, 0, 1]
        assert steps.tolist() == [float(s) for s in range(25)]
    reader = run(READ, target)
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    assert out.strip() == str([float(s) for s in range(25)])
