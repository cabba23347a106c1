"""The Prometheus endpoint and the log line of failed calls."""

from __future__ import annotations

import logging
import urllib.request

import pytest
import torch

from lossd.client import InvalidArgumentError, LossClient
from tests.conftest import start_server


def test_metrics_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    server = start_server(metrics_port=0)
    try:
        assert server.metrics_port
        with LossClient(f"127.0.0.1:{server.port}", retries=0) as client:
            loss = client.loss("NTXentLoss", memory_bank_size=(64, 8), session_id="watched")
            for _ in range(3):
                loss(torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)).backward()
            with (
                caplog.at_level(logging.WARNING, logger="lossd.server"),
                pytest.raises(InvalidArgumentError),
            ):
                loss(torch.randn(4, 8), torch.randn(5, 8))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        server.stop(grace=0)
    assert 'lossd_requests_total{code="OK",loss="NTXentLoss",method="Compute"} 3.0' in text
    assert (
        'lossd_requests_total{code="INVALID_ARGUMENT",loss="NTXentLoss",method="Compute"} 1.0'
    ) in text
    assert 'lossd_request_seconds_bucket{le="+Inf",loss="NTXentLoss",method="Compute"} 4.0' in text
    assert 'lossd_payload_bytes_total{direction="in",method="Compute"}' in text
    assert "lossd_sessions 1.0" in text
    assert f"lossd_state_bytes {64 * 8 * 4 + 8}.0" in text
    assert "lossd_queue_depth 0.0" in text
    failures = [r.getMessage() for r in caplog.records if "rpc failed" in r.getMessage()]
    assert len(failures) == 1
    assert "session=watched" in failures[0] and "status=INVALID_ARGUMENT" in failures[0]
    assert "request=" in failures[0] and "request=-" not in failures[0]
