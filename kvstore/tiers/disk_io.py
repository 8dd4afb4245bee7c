"""File I/O backends of the disk tier: kvikio (GPUDirect Storage or its compat mode) or POSIX.

Chosen once at start-up by ``select_io(config.io)`` and shown in the tier's stats
(``info["io"]``). kvikio needs libcuda even for host buffers, so "auto" picks it
only when kvikio and cupy import and a CUDA device is visible; CI (no GPU) always
runs the POSIX backend, and the kvikio one is tested on a GPU machine
(tests/tiers/test_gpu.py). Both are imported lazily: a CPU-only daemon never
loads cupy or kvikio.

Writes stay POSIX in both backends (temp file + fsync + rename is what makes them
crash-safe); kvikio serves reads. ``read_into`` fills a caller's host buffer (the
GPU tier's pinned staging buffer, so a chunk goes file -> pinned -> HBM with no
pageable bounce and is verified in between); ``read_to_device`` picks how a file
reaches device memory: kvikio straight into it (GDS, or kvikio's compat path) when
the backend is kvikio, else a POSIX read into host staging and one H2D copy.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from kvstore.errors import InvalidArgument

logger = logging.getLogger(__name__)


class DiskIO(Protocol):
    name: str  # shown in stats: "posix", "kvikio-gds" or "kvikio-compat"

    def read(self, path: str, tail_bytes: int = 0) -> tuple[bytes, bytes, int]:
        """The file as (all but its last ``tail_bytes``, those last bytes, inode number).

        The disk tier keeps a key record after each object (``tiers/record.py``); the
        split is made by the reads themselves, so the object is never copied to cut
        the record off. A file shorter than ``tail_bytes`` gives ``(b"", whole file)``.
        """
        ...

    def read_into(self, path: str, out: memoryview) -> tuple[int, int]:
        """Read the file's first ``len(out)`` bytes into ``out``; (bytes read, inode)."""
        ...


class PosixIO:
    """os.read into bytes: one allocation, no extra copy for single-read files."""

    name = "posix"

    def read(self, path: str, tail_bytes: int = 0) -> tuple[bytes, bytes, int]:
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            head_bytes = max(0, st.st_size - tail_bytes)
            head = _read_exactly(fd, head_bytes)
            tail = _read_exactly(fd, st.st_size - head_bytes) if len(head) == head_bytes else b""
        finally:
            os.close(fd)
        return head, tail, st.st_ino

    def read_into(self, path: str, out: memoryview) -> tuple[int, int]:
        with open(path, "rb", buffering=0) as fh:
            inode = os.fstat(fh.fileno()).st_ino
            num_read = 0
            while num_read < len(out):
                got = fh.readinto(out[num_read:])
                if not got:
                    break  # shorter than expected: verification reports it truncated
                num_read += got
        return num_read, inode


def _read_exactly(fd: int, num_bytes: int) -> bytes:
    """Up to ``num_bytes`` from ``fd``; fewer only if the file is shorter than stat said
    (then verification reports it truncated)."""
    parts: list[bytes] = []
    remaining = num_bytes
    while remaining > 0:
        part = os.read(fd, remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    if len(parts) == 1:
        return parts[0]  # one allocation, no extra copy
    return b"".join(parts)


class KvikioIO:
    """kvikio.CuFile reads; host reads land in a pinned buffer, device reads in HBM."""

    def __init__(self) -> None:
        import cupy  # noqa: F401 - kvikio's buffers
        import cupyx
        import kvikio
        import kvikio.defaults

        self._kvikio = kvikio
        self._cupyx = cupyx
        compat = kvikio.defaults.compat_mode()
        is_compat = bool(compat) if isinstance(compat, bool) else str(compat).endswith("ON")
        self.name = "kvikio-compat" if is_compat else "kvikio-gds"

    def read(self, path: str, tail_bytes: int = 0) -> tuple[bytes, bytes, int]:
        st = os.stat(path)
        buf = self._cupyx.empty_pinned((st.st_size,), dtype="uint8")
        with self._kvikio.CuFile(path, "r") as fh:
            num_read = fh.read(buf)
        view = memoryview(buf)[:num_read]
        head_bytes = max(0, num_read - tail_bytes)
        return bytes(view[:head_bytes]), bytes(view[head_bytes:]), st.st_ino

    def read_into(self, path: str, out: memoryview) -> tuple[int, int]:
        import numpy as np

        inode = os.stat(path).st_ino
        with self._kvikio.CuFile(path, "r") as fh:
            num_read = fh.read(np.frombuffer(out, dtype=np.uint8))
        return int(num_read), inode

    def read_into_device(self, path: str, out: Any) -> int:
        """Read a whole file into a device buffer (cupy/torch CUDA array); bytes read."""
        with self._kvikio.CuFile(path, "r") as fh:
            return int(fh.read(out))


def _kvikio_usable() -> bool:
    try:
        import cupy
        import kvikio  # noqa: F401

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # ImportError, or CUDA driver errors on a machine without a GPU
        return False


def select_io(mode: str) -> DiskIO:
    """The backend for ``tiers.disk.io``: "auto", "posix" or "kvikio".

    Raises:
        InvalidArgument: "kvikio" was asked for and cannot be used here.
    """
    if mode == "posix":
        return PosixIO()
    if mode not in ("auto", "kvikio"):
        raise InvalidArgument(f"tiers.disk.io must be 'auto', 'posix' or 'kvikio', got {mode!r}")
    if not _kvikio_usable():
        if mode == "kvikio":
            raise InvalidArgument("tiers.disk.io = 'kvikio' needs kvikio, cupy and a CUDA "
                                  "device; use 'auto' or 'posix' on this machine")
        return PosixIO()
    try:
        io = KvikioIO()
    except Exception as exc:
        if mode == "kvikio":
            raise InvalidArgument(f"kvikio failed to start: {exc}") from exc
        logger.warning("kvikio unusable (%s); the disk tier uses POSIX I/O", exc)
        return PosixIO()
    logger.info("disk tier reads through %s", io.name)
    return io


def device_read_mode(io: DiskIO) -> str:
    """How ``read_to_device`` reaches device memory with this backend."""
    return "kvikio-direct" if isinstance(io, KvikioIO) else "host-staged"


def read_to_device(io: DiskIO, path: str, out: Any, staging: memoryview) -> int:
    """Read a whole file into ``out`` (a 1-D uint8 device tensor or cupy array).

    kvikio reads straight into it (GDS where the driver has it, else kvikio's own
    compat path); any other backend reads into ``staging`` (pinned host memory,
    at least the file's size) and copies host to device once. Unverified: callers
    that need verified bytes read into host memory (``read_into``) and check there.

    Returns:
        Bytes read (the file's size unless it shrank meanwhile).
    """
    if isinstance(io, KvikioIO):
        return io.read_into_device(path, out)
    num_read, _ = io.read_into(path, staging)
    import torch

    host = torch.frombuffer(staging, dtype=torch.uint8)[:num_read]
    torch.as_tensor(out)[:num_read].copy_(host, non_blocking=False)
    return num_read
