"""Building a server (separate from running it, so tests bind port 0 and get the port)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

from .compute import Computer
from .config import ServerConfig, resolve_device
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
    _stop_reaper: threading.Event = field(default_factory=threading.Event)

    def start(self) -> LossdServer:
        """Start serving and the idle-session reaper."""
        self.grpc_server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._reap, name="lossd-reaper", daemon=True).start()
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls, let running ones finish for `grace` seconds, then stop."""
        self.health.enter_graceful_shutdown()
        self._stop_reaper.set()
        self.grpc_server.stop(grace).wait()

    def wait(self) -> None:
        """Block until the server stops."""
        self.grpc_server.wait_for_termination()

    def _reap(self) -> None:
        interval = min(60.0, max(0.05, self.config.session_ttl_s / 10))
        while not self._stop_reaper.wait(interval):
            for session_id in self.store.expire_idle():
                log.info("session expired after %.0f s idle: %s", self.store.ttl_s, session_id)


def create_server(config: ServerConfig,
                  interceptors: Sequence[grpc.ServerInterceptor] = ()) -> LossdServer:
    """A LossdServer bound to config.host:config.port, not yet started."""
    default_device = resolve_device(config.device)
    store = SessionStore(lambda name: resolve_device(name, str(default_device)),
                         config.session_ttl_s)
    limits = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers,
                                                    thread_name_prefix="lossd-rpc"),
                         options=limits, interceptors=interceptors)
    computer = Computer(store, config.global_batch_timeout_s)
    pb_grpc.add_LossServiceServicer_to_server(LossServicer(store, computer), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    log.info("lossd on %s:%d, device %s", config.host, port, default_device)
    return LossdServer(server, port, config, store, health_servicer)
