"""Shared fixtures: a real lossd server on a free loopback port, and clients of it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import grpc
import pytest

from lossd.client import LossClient
from lossd.server import LossdServer, ServerConfig, create_server


def require_tool(available: bool, what: str) -> None:
    """Skip when an external program is missing, except in CI, where that is a failure."""
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required in CI but is not available")
    pytest.skip(f"{what} is not available")


def start_server(
    interceptors: Sequence[grpc.ServerInterceptor] = (), **overrides: object
) -> LossdServer:
    """A started server on 127.0.0.1 and a free port; stop it when done."""
    config = ServerConfig(host="127.0.0.1", port=0, workers=8)
    for key, value in overrides.items():
        setattr(config, key, value)
    return create_server(config, interceptors).start()


@pytest.fixture(scope="session")
def server() -> Iterator[LossdServer]:
    """One server for the whole session (tests use their own sessions on it); it takes
    shared memory from clients on this host."""
    srv = start_server(shared_memory_dir="/dev/shm")
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="session")
def target(server: LossdServer) -> str:
    """host:port of the session's server."""
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def client(target: str) -> Iterator[LossClient]:
    """A client of the session's server."""
    with LossClient(target, timeout=60) as c:
        yield c
