"""Framing of ComputeStream: a request or response, then the chunks of its large tensors."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb

#: Bytes per Chunk message. 4 MiB chunks keep each message small enough for gRPC's
#: Python layer to move at full speed, where one 64 MiB message is several times slower.
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024


def frames(header: pb.StreamMessage, chunker: codec.Chunker) -> Iterator[pb.StreamMessage]:
    """The header message, then a Chunk message for each piece of its chunked tensors."""
    yield header
    for chunk in chunker.chunks():
        yield pb.StreamMessage(chunk=chunk)


class Assembler:
    """Reassembles one request or response from its header and chunks.

    `start(message)` takes the header; `add(chunk)` each chunk; both return True once
    every chunked tensor is complete. `payloads()` then yields the assembled bytes in the
    order `codec.decode_value(..., chunks=...)` consumes them. ValueError on a chunk that
    does not fit (wrong tensor, offset or length).
    """

    def __init__(self) -> None:
        self.message: Any = None
        self._buffers: list[Tensor] = []
        self._filled: list[int] = []

    def start(self, message: Any) -> bool:
        if self.message is not None and not self.complete:
            raise ValueError("a new message started before the chunks of the last one arrived")
        self.message = message
        # uint8 tensors rather than bytearrays: no zero-filling of memory about to be written
        self._buffers = [torch.empty(n, dtype=torch.uint8) for n in codec.chunked_sizes(message)]
        self._filled = [0] * len(self._buffers)
        return self.complete

    def add(self, chunk: pb.Chunk) -> bool:
        if self.message is None or self.complete:
            raise ValueError("a chunk arrived that belongs to no message")
        index, offset, data = chunk.tensor, chunk.offset, chunk.data
        if not 0 <= index < len(self._buffers):
            raise ValueError(
                f"chunk for tensor {index}, but the message has "
                f"{len(self._buffers)} chunked tensor(s)"
            )
        buffer = self._buffers[index]
        if offset != self._filled[index] or offset + len(data) > len(buffer):
            raise ValueError(
                f"chunk of tensor {index} at offset {offset} (+{len(data)} bytes) "
                f"does not continue it at {self._filled[index]} of {len(buffer)}"
            )
        if data:
            with warnings.catch_warnings():  # read-only bytes, only read here
                warnings.simplefilter("ignore", UserWarning)
                piece = torch.frombuffer(data, dtype=torch.uint8)
            buffer[offset : offset + len(data)].copy_(piece)
        self._filled[index] += len(data)
        return self.complete

    @property
    def complete(self) -> bool:
        """True when every chunked tensor has all its bytes."""
        return all(f == len(b) for f, b in zip(self._filled, self._buffers))

    def payloads(self) -> Iterator[Tensor]:
        """The assembled tensors' bytes (uint8 tensors), in order."""
        return iter(self._buffers)
