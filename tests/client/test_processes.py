"""Several processes and threads against one server: attaching by id, parallel sessions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import torch

from lossd.client import LossClient
from lossd.losses import NTXentLoss

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, target: str, *args: str) -> str:
    """Run `code` in a fresh interpreter with LOSSD_SERVER=target; return its stdout."""
    env = {**os.environ, "LOSSD_SERVER": target, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


STEP = """
    import sys, torch
    from lossd.client import NTXentLoss
    loss = NTXentLoss(temperature=0.1, memory_bank_size=(32, 8), session_id=sys.argv[1])
    g = torch.Generator().manual_seed(int(sys.argv[2]))
    out0 = torch.randn(8, 8, generator=g, requires_grad=True)
    value = loss(out0, torch.randn(8, 8, generator=g))
    value.backward()
    print(repr(value.item()), repr(out0.grad.norm().item()))
"""


def test_second_process_attaches_to_the_same_session(target: str) -> None:
    with LossClient(target) as client:
        mine = client.loss(
            "NTXentLoss", session_id="shared-run", temperature=0.1, memory_bank_size=(32, 8), seed=3
        )
        initial = mine.state_dict()
    # Two steps from two other processes, as a restarted trainer would continue.
    first = run_python(STEP, target, "shared-run", "1").split()
    second = run_python(STEP, target, "shared-run", "2").split()
    local = NTXentLoss(temperature=0.1, memory_bank_size=(32, 8))
    local.load_state_dict(initial)
    for seed, (value, grad_norm) in ((1, first), (2, second)):
        g = torch.Generator().manual_seed(seed)
        out0 = torch.randn(8, 8, generator=g, requires_grad=True)
        expected = local(out0, torch.randn(8, 8, generator=g))
        expected.backward()
        assert float(value) == expected.item()
        assert float(grad_norm) == out0.grad.norm().item()
    with LossClient(target) as client:
        assert client.get_session("shared-run").steps == 2
        assert torch.equal(
            client.get_state("shared-run")["memory_bank.bank"],
            local.state_dict()["memory_bank.bank"],
        )


WORKER = """
    import sys, torch
    from lossd.client import LossClient
    from lossd.losses import DINOLoss
    with LossClient() as client:
        remote = client.loss("DINOLoss", output_dim=16)
        local = DINOLoss(output_dim=16)
        g = torch.Generator().manual_seed(int(sys.argv[1]))
        for step in range(10):
            teacher = [torch.randn(8, 16, generator=g) for _ in range(2)]
            student = [torch.randn(8, 16, generator=g) for _ in range(4)]
            got = remote(teacher, student, epoch=step)
            assert torch.equal(got, local(teacher, student, epoch=step))
        assert torch.equal(remote.state_dict()["center"], local.center)
    print("ok")
"""


def test_parallel_sessions_from_processes_and_threads(target: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WORKER), str(seed)],
            env={**os.environ, "LOSSD_SERVER": target, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(3)
    ]
    errors: list[BaseException] = []

    def thread_worker(seed: int) -> None:
        try:
            with LossClient(target) as client:
                remote = client.loss("NTXentLoss", memory_bank_size=(64, 8), seed=seed)
                local = NTXentLoss(memory_bank_size=(64, 8))
                local.load_state_dict(remote.state_dict())
                g = torch.Generator().manual_seed(seed)
                for _ in range(10):
                    x = torch.randn(8, 8, generator=g, requires_grad=True)
                    y = torch.randn(8, 8, generator=g)
                    assert torch.equal(remote(x, y).detach(), local(x, y).detach())
                assert torch.equal(
                    remote.state_dict()["memory_bank.bank"], local.state_dict()["memory_bank.bank"]
                )
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=thread_worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", err
