"""`lossd serve`: flags, logging, signals. Only this module reads argv for the server."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from .app import create_server
from .auth import TOKENS_ENV
from .config import DEFAULT_MAX_MESSAGE_MB, DEFAULT_PORT, DEFAULT_STATE_DIR, ServerConfig
from .limits import MIB, Limits

log = logging.getLogger("lossd.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `lossd serve`."""
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host",
        default="localhost",
        help="address to listen on; 0.0.0.0 or [::] for all (default: localhost)",
    )
    net.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on (default: {DEFAULT_PORT})",
    )
    net.add_argument(
        "--max-message-mb",
        type=int,
        default=DEFAULT_MAX_MESSAGE_MB,
        help="largest request or reply in MiB (default: %(default)s)",
    )
    net.add_argument(
        "--workers",
        type=int,
        default=64,
        help="RPC worker threads; every open stream (ComputeStream, a "
        "shared-memory lease) and every rank waiting for a global batch "
        "holds one; --max-concurrent-steps bounds the computing ones "
        "(default: %(default)s)",
    )
    net.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    net.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    net.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="'TOKEN TENANT' per line: clients must send 'authorization: Bearer "
        f"TOKEN'; sessions and banks are per tenant (also ${TOKENS_ENV}, the "
        "same lines); default: no authentication",
    )
    net.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at :PORT/metrics (default: off)",
    )

    compute = parser.add_argument_group("compute")
    compute.add_argument(
        "--device",
        default="auto",
        help="auto (first CUDA device if any, else CPU), cpu, cuda or cuda:N "
        "(default: auto); sessions may ask for another",
    )
    compute.add_argument(
        "--shared-memory",
        action="store_true",
        help="let clients on this host pass tensors through shared memory "
        "(LossClient(shared_memory=True)); off by default",
    )
    compute.add_argument(
        "--shared-memory-dir",
        default="/dev/shm",
        metavar="DIR",
        help="where clients' shared-memory regions live (default: %(default)s)",
    )
    compute.add_argument(
        "--global-batch-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long the ranks of a global-batch step wait for each other "
        "before the step fails with ABORTED (default: %(default)s)",
    )

    state = parser.add_argument_group("state")
    state.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help="snapshot sessions and banks here and restore them on start; an "
        "empty value keeps no state (default: %(default)s)",
    )
    state.add_argument(
        "--snapshot-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="write what changed this often; 0: only on shutdown and on demand "
        "(default: %(default)s)",
    )
    state.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long running calls may finish before the "
        "state is written and the server exits (default: %(default)s)",
    )
    state.add_argument(
        "--session-ttl",
        type=float,
        default=24 * 3600.0,
        metavar="SECONDS",
        help="delete sessions idle for this long (default: 86400, a day)",
    )

    limits = parser.add_argument_group("limits")
    default = Limits()
    limits.add_argument(
        "--max-sessions-per-tenant",
        type=int,
        default=default.max_sessions_per_tenant,
        help="(default: %(default)s)",
    )
    limits.add_argument(
        "--max-session-state-mb",
        type=int,
        default=default.max_session_state_bytes // MIB,
        help="largest state of one session or bank, in MiB (default: %(default)s)",
    )
    limits.add_argument(
        "--max-state-mb",
        type=int,
        default=default.max_state_bytes // MIB,
        help="all sessions' and banks' state together, in MiB (default: %(default)s)",
    )
    limits.add_argument(
        "--max-concurrent-steps",
        type=int,
        default=default.max_concurrent_steps,
        help="steps computing at once (default: %(default)s)",
    )
    limits.add_argument(
        "--max-queued-steps",
        type=int,
        default=default.max_queued_steps,
        help="steps waiting for a turn; more are refused with "
        "RESOURCE_EXHAUSTED (default: %(default)s)",
    )

    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: INFO)",
    )


def config_from(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed flags."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        max_message_mb=args.max_message_mb,
        workers=args.workers,
        session_ttl_s=args.session_ttl,
        global_batch_timeout_s=args.global_batch_timeout,
        state_dir=args.state_dir,
        snapshot_interval_s=args.snapshot_interval,
        shutdown_grace_s=args.shutdown_grace,
        auth_tokens_file=args.auth_tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
        shared_memory_dir=args.shared_memory_dir if args.shared_memory else None,
        limits=Limits(
            max_sessions_per_tenant=args.max_sessions_per_tenant,
            max_session_state_bytes=args.max_session_state_mb * MIB,
            max_state_bytes=args.max_state_mb * MIB,
            max_concurrent_steps=args.max_concurrent_steps,
            max_queued_steps=args.max_queued_steps,
        ),
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully. Returns the exit status."""
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    server = create_server(config_from(args)).start()
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"lossd serving on {args.host}:{server.port}", flush=True)
    stopping.wait()
    server.stop()
    log.info("stopped")
    return 0
