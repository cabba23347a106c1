"""Bearer tokens, tenant isolation and TLS."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd.client import (
    BankNotFoundError,
    LossClient,
    SessionNotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from lossd.server import LossdServer
from tests.conftest import require_tool, start_server


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LossdServer]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(
        "# token tenant\nalpha-secret team-a\nbeta-secret team-b\nalpha-second team-a\n"
    )
    server = start_server(auth_tokens_file=str(tokens))
    yield server
    server.stop(grace=0)


def connect(server: LossdServer, token: str | None) -> LossClient:
    return LossClient(f"127.0.0.1:{server.port}", token=token, retries=0)


@pytest.mark.parametrize("token", [None, "wrong-secret"])
def test_missing_or_unknown_tokens_are_unauthenticated(
    secured: LossdServer, token: str | None
) -> None:
    with connect(secured, token) as client, pytest.raises(UnauthenticatedError) as info:
        client.list_sessions()
    assert isinstance(info.value, PermissionError)


def test_health_needs_no_token(secured: LossdServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tenants_never_see_each_others_sessions_or_banks(secured: LossdServer) -> None:
    with (
        connect(secured, "alpha-secret") as a,
        connect(secured, "beta-secret") as b,
        connect(secured, "alpha-second") as a2,
    ):
        a.create_bank("negatives", 16, 4)
        mine = a.loss("NTXentLoss", session_id="same-id", shared_bank="negatives")
        mine(torch.randn(4, 4, requires_grad=True), torch.randn(4, 4))
        theirs = b.loss("DCLLoss", session_id="same-id")  # ids are per tenant
        assert theirs.session_id == mine.session_id
        assert [s.loss for s in b.list_sessions()] == ["DCLLoss"]
        assert b.list_banks() == []
        with pytest.raises(BankNotFoundError):
            b.get_bank_state("negatives")
        with pytest.raises(BankNotFoundError):
            b.loss("NTXentLoss", shared_bank="negatives")
        b.delete_session("same-id")
        with pytest.raises(SessionNotFoundError):
            b.get_state("same-id")
        # a's session is untouched, and visible to a's other token
        assert a2.get_session("same-id").steps == 1
        assert a2.get_bank("negatives").rows_written == 4


def test_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_AUTH_TOKENS", "env-secret tenant-x")
    server = start_server()
    try:
        with connect(server, "env-secret") as client:
            assert client.list_sessions() == []
        with connect(server, None) as client, pytest.raises(UnauthenticatedError):
            client.list_sessions()
    finally:
        server.stop(grace=0)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1, made by openssl for this test."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls(tmp_path: Path) -> None:
    require_tool(
        subprocess.run(["which", "openssl"], capture_output=True).returncode == 0, "openssl"
    )
    cert, key = self_signed(tmp_path)
    server = start_server(tls_cert=str(cert), tls_key=str(key))
    try:
        target = f"localhost:{server.port}"
        with LossClient(target, root_certificates=cert.read_bytes(), retries=0) as client:
            loss = client.loss("VICRegLoss")
            assert loss(torch.randn(4, 3), torch.randn(4, 3)).item() > 0
        with LossClient(target, retries=0, timeout=5) as plain, pytest.raises(UnavailableError):
            plain.list_sessions()
    finally:
        server.stop(grace=0)
