"""Building a server (separate from running it, so tests bind port 0 and get the port)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

from .auth import Authenticator, load_tokens
from .calls import SafeRequests
from .compute import Computer
from .config import ServerConfig, resolve_device
from .limits import Admission
from .metrics import Metrics
from .persistence import Snapshotter, StateDir
from .servicer import LossServicer
from .sessions import SessionStore

log = logging.getLogger("lossd.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name


@dataclass
class LossdServer:
    """A built server: `start()`, then `stop()`. `port` is the bound port."""

    grpc_server: grpc.Server
    port: int
    config: ServerConfig
    store: SessionStore
    health: health.HealthServicer
    metrics: Metrics
    snapshots: Snapshotter | None = None
    metrics_port: int | None = None
    _stop_reaper: threading.Event = field(default_factory=threading.Event)

    def start(self) -> LossdServer:
        """Start serving, the idle-session reaper, snapshots and the metrics endpoint."""
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port)
            log.info("metrics on :%d/metrics", self.metrics_port)
        self.grpc_server.start()
        if self.snapshots is not None:
            self.snapshots.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._reap, name="lossd-reaper", daemon=True).start()
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health turns NOT_SERVING, new calls are refused, running ones
        get `grace` seconds (default: the config's) to finish, then the state is written."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        self.health.enter_graceful_shutdown()
        self._stop_reaper.set()
        self.grpc_server.stop(grace).wait()
        if self.snapshots is not None:
            self.snapshots.stop()
            sessions, banks = self.snapshots.snapshot()
            log.info("wrote %d session(s) and %d bank(s) on shutdown", sessions, banks)
        self.metrics.close()

    def wait(self) -> None:
        """Block until the server stops."""
        self.grpc_server.wait_for_termination()

    def _reap(self) -> None:
        interval = min(60.0, max(0.05, self.config.session_ttl_s / 10))
        while not self._stop_reaper.wait(interval):
            for session_id in self.store.expire_idle():
                log.info("session expired after %.0f s idle: %s", self.store.ttl_s, session_id)


def create_server(
    config: ServerConfig, interceptors: Sequence[grpc.ServerInterceptor] = ()
) -> LossdServer:
    """A LossdServer bound to config.host:config.port, its state restored, not yet started."""
    default_device = resolve_device(config.device)
    store = SessionStore(
        lambda name: resolve_device(name, str(default_device)),
        config.session_ttl_s,
        limits=config.limits,
    )
    snapshots = None
    if config.state_dir:
        snapshots = Snapshotter(StateDir(config.state_dir), store, config.snapshot_interval_s)
        snapshots.restore()
    admission = Admission(config.limits.max_concurrent_steps, config.limits.max_queued_steps)
    metrics = _metrics(store, admission)
    auth = Authenticator(load_tokens(config.auth_tokens_file))
    servicer = LossServicer(
        store,
        Computer(admission, config.global_batch_timeout_s),
        auth,
        metrics,
        snapshots,
        config.shared_memory_dir,
        max_region_bytes=2 * config.max_message_bytes,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="lossd-rpc"),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
        interceptors=[SafeRequests(), *interceptors],
    )
    pb_grpc.add_LossServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    if config.tls_cert or config.tls_key:
        if not (config.tls_cert and config.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    log.info(
        "lossd on %s:%d, device %s, auth %s, state %s",
        config.host,
        port,
        default_device,
        "on" if auth.enabled else "off",
        config.state_dir or "not kept",
    )
    return LossdServer(server, port, config, store, health_servicer, metrics, snapshots)


def _metrics(store: SessionStore, admission: Admission) -> Metrics:
    metrics = Metrics()
    metrics.gauge("lossd_sessions", "Sessions held", lambda: len(store.all()))
    metrics.gauge("lossd_banks", "Shared banks held", lambda: len(store.banks.all()))
    metrics.gauge(
        "lossd_state_bytes", "Bytes of state of all sessions and banks", store.total_state_bytes
    )
    metrics.gauge("lossd_queue_depth", "Steps waiting for a turn", lambda: admission.waiting)
    metrics.gauge("lossd_steps_running", "Steps computing now", lambda: admission.running)
    return metrics
