"""The client side of the same-host fast path: a session's shared-memory region, lent to
the server over an AttachMemory stream for as long as the client holds it."""

from __future__ import annotations

import queue
import threading
from typing import Any

from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc
from lossd.v1.shared import SharedRegion, aligned

_CLOSE = object()
MIN_REGION = 1 << 20


class MemoryLease:
    """One session's region and the stream that lends it to the server.

    `ensure(nbytes)` makes the region at least that large (a new, larger region replaces
    it on the server). Raises grpc.RpcError if the server refuses (no --shared-memory, or
    another host); the caller then sends bytes on the wire.
    """

    def __init__(
        self,
        stub: pb_grpc.LossServiceStub,
        metadata: tuple[tuple[str, str], ...],
        session_id: str,
        nbytes: int,
    ) -> None:
        self.session_id = session_id
        self._outgoing: queue.Queue[Any] = queue.Queue()
        self._incoming = stub.AttachMemory(iter(self._outgoing.get, _CLOSE), metadata=metadata)
        self._lock = threading.Lock()
        self.region: SharedRegion | None = None
        try:
            self.ensure(nbytes)
        except BaseException:
            self.close()
            raise

    def ensure(self, nbytes: int) -> SharedRegion:
        """The region, grown to hold `nbytes` (with headroom) if needed."""
        with self._lock:
            if self.region is not None and self.region.size >= nbytes:
                return self.region
            region = SharedRegion.create(max(MIN_REGION, aligned(nbytes + nbytes // 4)))
            try:
                self._outgoing.put(
                    pb.MemoryLease(
                        session_id=self.session_id, path=str(region.path), size=region.size
                    )
                )
                next(self._incoming)  # the server has mapped it
            except BaseException:
                region.close()
                raise
            finally:
                region.unlink()  # from now on only the two mappings hold the memory
            if self.region is not None:
                self.region.close()
            self.region = region
            return region

    def close(self) -> None:
        """End the lease; the server lets go of the region, and so does this process."""
        self._outgoing.put(_CLOSE)
        self._incoming.cancel()
        if self.region is not None:
            self.region.close()
