"""Container health check: asks lossd's gRPC health service; exit 0 when it is SERVING.

Used by the image's HEALTHCHECK (Kubernetes uses its built-in gRPC probes instead).
Arguments: [host:port] [service]; defaults: 127.0.0.1:$LOSSD_PORT (50051), and
lossd.v1.LossService, which turns NOT_SERVING as soon as the server starts to shut down.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('LOSSD_PORT', '50051')}"
    service = argv[2] if len(argv) > 2 else "lossd.v1.LossService"
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3
            )
        except grpc.RpcError as error:
            print(f"{target}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
