"""The `lossd` command: `lossd serve` (the server) and `lossd bench` (a client-side
benchmark)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each one's module adds its own flags."""
    from lossd.client import bench
    from lossd.server import cli as serve_cli

    parser = argparse.ArgumentParser(prog="lossd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the loss server", description="Serve lossd.v1.LossService over gRPC."
    )
    serve_cli.add_arguments(serve)
    serve.set_defaults(run=serve_cli.run)
    timing = commands.add_parser(
        "bench", help="time remote steps against in-process ones", description=bench.__doc__
    )
    bench.add_arguments(timing)
    timing.set_defaults(run=bench.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lossd` console script."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
