"""Scale-out behind nginx: two replicas, consistent hashing on x-lossd-route.

nginx is configured from docker/nginx/lossd.conf.template, the file compose and k8s use.
Each session must live on exactly one replica, every result must equal the in-process
loss, and a replica that does not hold a session must answer NOT_FOUND.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lossd.client import LossClient, SessionNotFoundError, UnavailableError
from lossd.losses import registry
from lossd.server import LossdServer
from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb
from tests.conftest import require_tool, start_server

from .nginx import ROOT, TEMPLATE, Nginx, find_nginx, free_port, render, syntax_errors

SESSIONS = 50
STEPS = 3


@dataclass
class Cluster:
    """Two replicas and the nginx in front of them."""

    replicas: list[LossdServer]
    nginx: Nginx

    @property
    def replica_targets(self) -> list[str]:
        return [f"127.0.0.1:{r.port}" for r in self.replicas]

    def holders(self, session_id: str) -> list[int]:
        """Indexes of the replicas whose store holds `session_id`, asked directly."""
        found = []
        for index, target in enumerate(self.replica_targets):
            with LossClient(target, timeout=30) as direct:
                try:
                    direct.get_session(session_id)
                except SessionNotFoundError:
                    continue
                found.append(index)
        return found


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    binary = find_nginx()
    require_tool(binary is not None, "nginx (apt-get install nginx)")
    assert binary is not None
    return binary


@pytest.fixture(scope="module")
def cluster(nginx_binary: str) -> Iterator[Cluster]:
    replicas = [start_server(), start_server()]
    try:
        with Nginx(nginx_binary, [f"127.0.0.1:{r.port}" for r in replicas]) as nginx:
            yield Cluster(replicas, nginx)
    finally:
        for replica in replicas:
            replica.stop(grace=1.0)


@pytest.fixture
def via_nginx(cluster: Cluster) -> Iterator[LossClient]:
    with LossClient(cluster.nginx.target, timeout=30) as client:
        yield client


# -- the losses the sessions run: stateful ones, so that a step on the wrong replica shows ---

Inputs = tuple[tuple[Any, ...], dict[str, Any], list[Tensor]]  # args, kwargs, grad leaves


def ntxent_inputs(g: torch.Generator, step: int) -> Inputs:
    out0 = torch.randn(8, 8, generator=g, requires_grad=True)
    return (out0, torch.randn(8, 8, generator=g)), {}, [out0]


def dino_inputs(g: torch.Generator, step: int) -> Inputs:
    teacher = [torch.randn(4, 16, generator=g) for _ in range(2)]
    student = [torch.randn(4, 16, generator=g, requires_grad=True) for _ in range(3)]
    return (teacher, student), {"epoch": step}, student


def tico_inputs(g: torch.Generator, step: int) -> Inputs:
    z_a = torch.randn(8, 8, generator=g, requires_grad=True)
    z_b = torch.randn(8, 8, generator=g, requires_grad=True)
    return (z_a, z_b), {}, [z_a, z_b]


CASES: list[tuple[str, dict[str, Any], Callable[[torch.Generator, int], Inputs]]] = [
    ("NTXentLoss", {"temperature": 0.1, "memory_bank_size": (32, 8)}, ntxent_inputs),
    ("DINOLoss", {"output_dim": 16}, dino_inputs),
    ("TiCoLoss", {}, tico_inputs),
]


def in_process(loss: str, config: dict[str, Any], seed: int) -> nn.Module:
    """The loss as the server builds it: the initial bank drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return registry.get(loss).cls(**config)


def step_and_compare(
    remote: nn.Module,
    local: nn.Module,
    make: Callable[[torch.Generator, int], Inputs],
    seed: int,
    step: int,
) -> None:
    """One step of `remote` and of `local` on equal inputs: equal losses and gradients."""
    args, kwargs, leaves = make(torch.Generator().manual_seed(seed), step)
    got = remote(*args, **kwargs)
    got.backward()
    local_args, local_kwargs, local_leaves = make(torch.Generator().manual_seed(seed), step)
    want = local(*local_args, **local_kwargs)
    want.backward()
    assert torch.equal(got.detach(), want.detach()), (seed, step)
    for leaf, local_leaf in zip(leaves, local_leaves, strict=True):
        assert torch.equal(leaf.grad, local_leaf.grad), (seed, step)


# -- the tests ---------------------------------------------------------------------------


def test_each_session_lives_on_one_replica_and_matches_in_process(
    cluster: Cluster, via_nginx: LossClient
) -> None:
    run = uuid.uuid4().hex[:8]
    sessions = []
    for i in range(SESSIONS):
        loss, config, make = CASES[i % len(CASES)]
        session_id = f"route-{run}-{i}"
        remote = via_nginx.loss(loss, session_id=session_id, seed=i, **config)
        sessions.append((session_id, remote, in_process(loss, config, seed=i), make))

    # Steps interleaved across sessions, as concurrent trainers would send them, in
    # another order each round (so that no round-robin could happen to match the hash).
    for step in range(STEPS):
        for i in random.Random(step).sample(range(SESSIONS), SESSIONS):
            _, remote, local, make = sessions[i]
            step_and_compare(remote, local, make, 1000 * i + step, step)

    placement = {}
    for session_id, remote, local, _ in sessions:
        holders = cluster.holders(session_id)
        assert len(holders) == 1, f"{session_id} is on replicas {holders}"
        placement[session_id] = holders[0]
        with LossClient(cluster.replica_targets[holders[0]], timeout=30) as direct:
            assert direct.get_session(session_id).steps == STEPS
            state = direct.get_state(session_id)
        # The state read through nginx is the holder's, and equals the in-process one.
        assert state.keys() == remote.state_dict().keys() == local.state_dict().keys()
        for name, tensor in local.state_dict().items():
            assert torch.equal(state[name], tensor), (session_id, name)

    # Both replicas got sessions (all 50 on one would happen with probability ~2**-49),
    # and their direct listings partition the sessions.
    assert set(placement.values()) == {0, 1}
    listed = []
    for target in cluster.replica_targets:
        with LossClient(target, timeout=30) as direct:
            listed.append({s.session_id for s in direct.list_sessions()} & placement.keys())
    assert listed[0].isdisjoint(listed[1])
    assert listed[0] | listed[1] == placement.keys()
    for index, ids in enumerate(listed):
        assert ids == {s for s, holder in placement.items() if holder == index}


def test_two_clients_share_one_session_through_nginx(cluster: Cluster) -> None:
    # Two trainers (two channels, so two connections to nginx; one of them streaming)
    # attach to one session id; their steps must meet on one replica, in one state.
    session_id = f"shared-{uuid.uuid4().hex[:8]}"
    config = {"temperature": 0.1, "memory_bank_size": (32, 8)}
    local = in_process("NTXentLoss", config, seed=7)
    with (
        LossClient(cluster.nginx.target, timeout=30) as first,
        LossClient(cluster.nginx.target, timeout=30, stream=True) as second,
    ):
        remotes = [
            c.loss("NTXentLoss", session_id=session_id, seed=7, **config) for c in (first, second)
        ]
        for step in range(4):
            step_and_compare(remotes[step % 2], local, ntxent_inputs, 500 + step, step)
        assert second.get_session(session_id).steps == 4
        bank = first.get_state(session_id)["memory_bank.bank"]
    assert torch.equal(bank, local.state_dict()["memory_bank.bank"])
    assert len(cluster.holders(session_id)) == 1


def test_two_clients_share_a_bank_through_nginx(cluster: Cluster) -> None:
    # Each trainer has its own session; both are attached to one shared bank, so their
    # calls are routed by the bank's name and must all reach the bank's replica.
    name = f"bank-{uuid.uuid4().hex[:8]}"
    with (
        LossClient(cluster.nginx.target, timeout=30) as first,
        LossClient(cluster.nginx.target, timeout=30, stream=True) as second,
    ):
        first.create_bank(name, 16, 8, seed=2)
        remotes = [c.loss("NTXentLoss", shared_bank=name, temperature=0.2) for c in (first, second)]
        local = registry.get("NTXentLoss").cls(temperature=0.2, memory_bank_size=(16, 8))
        local.load_state_dict(
            {f"memory_bank.{k}": v for k, v in second.get_bank_state(name).items()}
        )
        for step, remote in enumerate(remotes * 3):  # one serial history in one bank
            step_and_compare(remote, local, ntxent_inputs, 700 + step, step)
        bank = first.get_bank(name)
        assert bank.rows_written == 6 * 8
        assert set(bank.sessions) == {r.session_id for r in remotes}
        state = second.get_bank_state(name)
    assert torch.equal(state["bank"], local.state_dict()["memory_bank.bank"])
    [home] = cluster.holders(remotes[0].session_id)
    assert cluster.holders(remotes[1].session_id) == [home]
    with LossClient(cluster.replica_targets[home], timeout=30) as direct:
        assert direct.get_bank(name).name == name
    with LossClient(cluster.replica_targets[1 - home], timeout=30) as direct:
        assert name not in {b.name for b in direct.list_banks()}


def test_a_replica_without_the_session_answers_not_found(
    cluster: Cluster, via_nginx: LossClient
) -> None:
    session_id = f"lost-{uuid.uuid4().hex[:8]}"
    remote = via_nginx.loss("NegativeCosineSimilarity", session_id=session_id)
    [home] = cluster.holders(session_id)
    other = 1 - home

    # The session's replica loses it (a restart without --state-dir): the next step is
    # NOT_FOUND, and nginx does not try the other replica, which never creates one.
    with LossClient(cluster.replica_targets[home], timeout=30) as direct:
        direct.delete_session(session_id)
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(SessionNotFoundError, match="not on the replica"):
        remote(x, torch.randn(4, 8))
    with pytest.raises(SessionNotFoundError):
        via_nginx.get_session(session_id)
    assert cluster.holders(session_id) == []

    # Even when the other replica holds a session of that id, nginx never sends it there.
    with LossClient(cluster.replica_targets[other], timeout=30) as direct:
        direct.create_session("NegativeCosineSimilarity", session_id=session_id)
    request = pb.ComputeRequest(session_id=session_id, request_id=uuid.uuid4().hex)
    codec.encode_values({"x0": torch.randn(4, 8), "x1": torch.randn(4, 8)}, request.args)
    with pytest.raises(SessionNotFoundError, match="not on the replica"):
        via_nginx.call("Compute", request, session_id=session_id)
    assert cluster.holders(session_id) == [other]


def test_large_step_and_calls_without_a_route(cluster: Cluster, via_nginx: LossClient) -> None:
    # 2 x 24 MiB up, 24 MiB of gradient back: nginx's default 1 MiB body limit is off.
    assert "NTXentLoss" in {info.name for info in via_nginx.list_losses()}  # no route header
    remote = via_nginx.loss("NegativeCosineSimilarity")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6144, 1024, generator=g, requires_grad=True)
    x1 = torch.randn(6144, 1024, generator=g)
    got = remote(x0, x1)
    got.backward()
    local_x0 = x0.detach().clone().requires_grad_()
    want = registry.get("NegativeCosineSimilarity").cls()(local_x0, x1)
    want.backward()
    assert torch.equal(got.detach(), want.detach())
    assert torch.equal(x0.grad, local_x0.grad)
    assert len(cluster.holders(remote.session_id)) == 1


def test_a_stopped_replica_fails_its_calls_and_nginx_does_not_reroute(nginx_binary: str) -> None:
    # Own cluster: one of its replicas is stopped. With nginx's defaults (retry the next
    # upstream, mark a failing server down) the call would land on the other replica,
    # which would create a fresh session under the old id: silently lost state.
    replicas = [start_server(), start_server()]
    try:
        with Nginx(nginx_binary, [f"127.0.0.1:{r.port}" for r in replicas]) as nginx:
            cluster = Cluster(replicas, nginx)
            session_id = f"down-{uuid.uuid4().hex[:8]}"
            with LossClient(nginx.target, timeout=30, retries=0) as client:
                client.create_session("DINOLoss", session_id=session_id, output_dim=8)
                [home] = cluster.holders(session_id)
                replicas[home].stop(grace=0)
                for _ in range(3):  # more than nginx's default max_fails of 1
                    with pytest.raises(UnavailableError):
                        client.create_session("DINOLoss", session_id=session_id, output_dim=8)
            live = cluster.replica_targets[1 - home]
            with LossClient(live, timeout=30) as direct, pytest.raises(SessionNotFoundError):
                direct.get_session(session_id)
    finally:
        for replica in replicas:
            replica.stop(grace=0)


def setting(text: str, name: str) -> str:
    """The value of environment variable `name` in compose.yaml (`NAME: value`) or in a
    k8s container (`- name: NAME` then `value: ...`), folded `>-` scalars joined."""
    lines = text.splitlines()
    i = next(
        i
        for i, line in enumerate(lines)
        if line.strip() == f"- name: {name}" or line.strip().startswith(f"{name}:")
    )
    if lines[i].strip() == f"- name: {name}":
        i += 1  # k8s: `value:` follows
    line = lines[i]
    value = line.split(":", 1)[1].strip()
    if value != ">-":
        return value.strip('"')
    indent = len(line) - len(line.lstrip())
    folded = []
    for more in lines[i + 1 :]:
        if len(more) - len(more.lstrip()) <= indent:
            break
        folded.append(more.strip())
    return " ".join(folded)


@pytest.mark.parametrize("path", ["compose.yaml", "k8s/nginx.yaml"])
def test_the_deployments_settings_render_a_config_nginx_accepts(
    nginx_binary: str, path: str
) -> None:
    text = (ROOT / "docker" / path).read_text()
    values = {
        name: setting(text, name)
        for name in ("LOSSD_LISTEN", "LOSSD_RESOLVER", "LOSSD_UPSTREAM_SERVERS")
    }
    assert values["LOSSD_RESOLVER"].startswith("resolver ")
    assert values["LOSSD_UPSTREAM_SERVERS"].count("max_fails=0 resolve;") >= 2
    # Debian's nginx predates `resolve` (1.27.3), and nginx -t looks names up: check the
    # rest with loopback addresses in place of the replicas' and the DNS server's names.
    servers = re.sub(
        r"server \S+:50051 (max_fails=0) resolve;",
        lambda m: f"server 127.0.0.1:{free_port()} {m.group(1)};",
        values["LOSSD_UPSTREAM_SERVERS"],
    )
    resolver = re.sub(
        r"^resolver [\w.-]*[a-z][\w.-]*", "resolver 127.0.0.1", values["LOSSD_RESOLVER"]
    )
    config = render(
        TEMPLATE.read_text(),
        {**values, "LOSSD_UPSTREAM_SERVERS": servers, "LOSSD_RESOLVER": resolver},
    )
    assert not re.search(r"\$\{LOSSD_\w+\}", config)
    assert syntax_errors(nginx_binary, config) == ""
