"""Shared-memory regions: the same-host fast path for tensors (client and server).

A client creates a region as a file under /dev/shm (mode 0600), the server maps it when
the client lends it to a session (AttachMemory), and the client then unlinks the name:
from that moment only the two mappings keep the memory, so the kernel frees it when both
processes let go, whether they close, disconnect or crash. Tensors then travel as
`SharedSlice` offsets into the region instead of bytes in messages.
"""

from __future__ import annotations

import mmap
import os
import secrets
import stat
from pathlib import Path

import torch
from torch import Tensor

from lossd.v1 import codec
from lossd.v1 import tensor_pb2 as pb

DEFAULT_DIR = "/dev/shm"
PREFIX = "lossd-"
ALIGN = 64  # every tensor starts on a cache line, so any dtype can view its bytes


def aligned(n: int) -> int:
    """n rounded up to ALIGN."""
    return -(-n // ALIGN) * ALIGN


class SharedRegion:
    """A shared-memory file mapped into this process; `bytes` is a uint8 tensor over it.

    Also the TensorSource of the tensors that point into it (`bytes_of`).
    """

    def __init__(self, path: Path, size: int, fd: int) -> None:
        self.path = path
        self.size = size
        self._fd = fd
        self._map = mmap.mmap(fd, size)
        self.bytes: Tensor = torch.frombuffer(self._map, dtype=torch.uint8)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, size: int, directory: str = DEFAULT_DIR) -> SharedRegion:
        """A new region of `size` bytes, readable and writable only by this user."""
        sweep_stale(directory)
        path = Path(directory) / f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
            return cls(path, size, fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def open(
        cls, path: str, size: int, directory: str = DEFAULT_DIR, max_size: int | None = None
    ) -> SharedRegion:
        """Map a region a client created. ValueError for a path outside `directory`, not a
        lossd region, a symlink, or smaller than `size`."""
        candidate = Path(path)
        if candidate.parent != Path(directory) or not candidate.name.startswith(PREFIX):
            raise ValueError(
                f"Expected `path` to be a {PREFIX}* file in {directory}, but got {path!r}."
            )
        if size <= 0 or (max_size is not None and size > max_size):
            raise ValueError(f"Expected `size` in (0, {max_size}] bytes, but got {size}.")
        fd = os.open(candidate, os.O_RDWR | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size < size:
                raise ValueError(
                    f"Expected `path` to be a regular file of at least {size} "
                    f"bytes, but got {info.st_size}."
                )
            return cls(candidate, size, fd)
        except BaseException:
            os.close(fd)
            raise

    def unlink(self) -> None:
        """Remove the name; the mappings stay valid."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Let go of the region (the memory goes once no tensor views it any more)."""
        self.bytes = torch.empty(0, dtype=torch.uint8)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def bytes_of(self, msg: pb.Tensor, nbytes: int, name: str) -> Tensor:
        """The `nbytes` bytes a SharedSlice points to (bounds and alignment checked)."""
        offset = msg.shared.offset
        itemsize = torch.empty((), dtype=codec.torch_dtype(msg.dtype)).element_size()
        if offset < 0 or offset + nbytes > self.size or offset % itemsize:
            raise ValueError(
                f"`{name}`: bytes [{offset}, {offset + nbytes}) are not an aligned "
                f"slice of the {self.size}-byte region"
            )
        return self.bytes[offset : offset + nbytes]

    def writer(self, start: int, capacity: int) -> RegionWriter:
        """A TensorSink that places tensors in [start, start + capacity)."""
        return RegionWriter(self, start, capacity)


class RegionWriter:
    """Places tensors one after another in a window of a region (a codec TensorSink)."""

    def __init__(self, region: SharedRegion, start: int, capacity: int) -> None:
        self.region = region
        self.next = start
        self.end = min(start + capacity, region.size)

    def take(self, t: Tensor, msg: pb.Tensor) -> bool:
        nbytes = t.numel() * t.element_size()
        offset = aligned(self.next)
        if offset + nbytes > self.end:
            return False
        if nbytes:
            source = t.detach().contiguous().reshape(-1).view(torch.uint8)
            self.region.bytes[offset : offset + nbytes].copy_(source)
        msg.shared.region = self.region.name
        msg.shared.offset = offset
        self.next = offset + nbytes
        return True


def sweep_stale(directory: str = DEFAULT_DIR) -> None:
    """Remove regions left by this user's processes that died before unlinking them."""
    try:
        entries = list(Path(directory).glob(f"{PREFIX}*"))
    except OSError:
        return
    for path in entries:
        pid = path.name[len(PREFIX) :].split("-", 1)[0]
        try:
            if path.stat().st_uid == os.getuid() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)
        except OSError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
