"""The committed gRPC stubs are what `make proto` generates from the .proto files."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    sources = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "lossd" / "v1").glob("*.proto"))
    status = protoc.main(
        [
            "protoc",
            f"-I{PROTO}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *sources,
        ]
    )
    assert status == 0
    generated = sorted((tmp_path / "lossd" / "v1").iterdir())
    assert generated, "protoc produced nothing"
    for fresh in generated:
        committed = PROTO / "lossd" / "v1" / fresh.name
        assert committed.exists(), f"{fresh.name} is not committed; run `make proto`"
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.relative_to(ROOT)} is stale; run `make proto`"
        )
