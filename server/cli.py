"""`lossd serve`: flags, logging, signals. Only this module reads argv for the server."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from .app import create_server
from .config import DEFAULT_MAX_MESSAGE_MB, DEFAULT_PORT, ServerConfig

log = logging.getLogger("lossd.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `lossd serve`."""
    parser.add_argument("--host", default="localhost",
                        help="address to listen on; 0.0.0.0 or [::] for all (default: localhost)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port to listen on (default: {DEFAULT_PORT})")
    parser.add_argument("--device", default="auto",
                        help="auto (first CUDA device if any, else CPU), cpu, cuda or cuda:N "
                             "(default: auto); sessions may ask for another")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB,
                        help="largest request or reply in MiB (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=16,
                        help="RPC worker threads; steps of different sessions run in parallel "
                             "(default: %(default)s)")
    parser.add_argument("--session-ttl", type=float, default=24 * 3600.0, metavar="SECONDS",
                        help="delete sessions idle for this long (default: 86400, a day)")
    parser.add_argument("--global-batch-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="how long the ranks of a global-batch step wait for each other "
                             "before the step fails with ABORTED (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default: INFO)")


def config_from(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed flags."""
    return ServerConfig(host=args.host, port=args.port, device=args.device,
                        max_message_mb=args.max_message_mb, workers=args.workers,
                        session_ttl_s=args.session_ttl,
                        global_batch_timeout_s=args.global_batch_timeout)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully. Returns the exit status."""
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    server = create_server(config_from(args)).start()
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"lossd serving on {args.host}:{server.port}", flush=True)
    stopping.wait()
    server.stop(grace=10.0)
    return 0
