"""Prometheus metrics of one server (own registry, so that tests can run several)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Counters and histograms of calls, gauges read from the server at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lossd_requests",
            "RPCs by method, loss and status code",
            ["method", "loss", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lossd_request_seconds",
            "RPC latency by method and loss",
            ["method", "loss"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.payload = Counter(
            "lossd_payload_bytes",
            "Message bytes by method and direction",
            ["method", "direction"],
            registry=self.registry,
        )

    def observe(
        self, method: str, loss: str, code: str, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        """Record one finished call (or one step of a stream)."""
        self.requests.labels(method, loss, code).inc()
        self.latency.labels(method, loss).observe(seconds)
        self.payload.labels(method, "in").inc(bytes_in)
        self.payload.labels(method, "out").inc(bytes_out)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge whose value `read()` gives when scraped."""
        Gauge(name, help_text, registry=self.registry).set_function(read)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 picks one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if any."""
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
