"""One long-lived ComputeStream: steps go out and come back over it one at a time."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
from torch import Tensor

from lossd.v1 import codec, stream
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

_CLOSE = object()


class StepFailed(Exception):
    """A step answered with a StepError; the stream itself is fine."""

    def __init__(self, error: pb.StepError) -> None:
        super().__init__(error.message)
        self.code = grpc.StatusCode.UNKNOWN
        for code in grpc.StatusCode:
            if code.value[0] == error.code:
                self.code = code
        self.message = error.message


class ComputeStream:
    """A bidirectional ComputeStream to one server (one routing key).

    `step(header, chunker)` sends a request and its chunks and returns the response with
    the iterator of its assembled chunk payloads. Thread-safe: steps are serialized.
    A broken stream raises grpc.RpcError; make a new ComputeStream to go on.
    """

    def __init__(self, stub: pb_grpc.LossServiceStub, metadata: tuple[tuple[str, str], ...]):
        self._outgoing: queue.Queue[Any] = queue.Queue()
        self._incoming = stub.ComputeStream(iter(self._outgoing.get, _CLOSE), metadata=metadata)
        self._lock = threading.Lock()

    def step(
        self, request: pb.ComputeRequest, chunker: codec.Chunker
    ) -> tuple[pb.ComputeResponse, Iterator[Tensor]]:
        with self._lock:
            for message in stream.frames(pb.StreamMessage(request=request), chunker):
                self._outgoing.put(message)
            assembler = stream.Assembler()
            complete = False
            while not complete:
                message = next(self._incoming)
                kind = message.WhichOneof("kind")
                if kind == "error":
                    raise StepFailed(message.error)
                if kind == "response":
                    complete = assembler.start(message.response)
                elif kind == "chunk":
                    complete = assembler.add(message.chunk)
            return assembler.message, assembler.payloads()

    def close(self, cancel: bool = False) -> None:
        """End the stream: the server sees the end of its requests and finishes; with
        `cancel`, abandon it at once (a broken stream)."""
        self._outgoing.put(_CLOSE)
        if cancel:
            self._incoming.cancel()
