"""Channels to a list of daemons, their order and deadlines (shared by both clients).

The failover policy itself is described and run in ``kvstore.client._core``;
``Connections.call`` runs it for namespace-free calls (``fetch_stats``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from kvstore import _frames as frames
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.client import _protocol as proto
from kvstore.client._status import error_from_rpc, is_failover
from kvstore.errors import DeadlineExceeded, InvalidArgument, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]


def normalize_addresses(addresses: str | Sequence[str]) -> list[str]:
    found = [addresses] if isinstance(addresses, str) else list(addresses)
    if not found or not all(isinstance(a, str) and ":" in a for a in found):
        raise InvalidArgument(f"addresses must be HOST:PORT strings, got {addresses!r}")
    return found


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    if max_message_bytes < 2 * proto.PART_HEADROOM_BYTES:
        raise InvalidArgument(f"max_message_bytes must be >= {2 * proto.PART_HEADROOM_BYTES}, "
                              f"got {max_message_bytes}")
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # After a lost connection gRPC fails calls at once until its next reconnect
            # attempt, backing off from 1 s up to 120 s by default: a daemon restarted in a
            # few seconds stayed unreachable for as long. Retry every 0.1-1 s instead.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]


def read_pem(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc}") from exc


def channel_credentials(tls_ca_file: str | None, tls_cert_file: str | None = None,
                        tls_key_file: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials of a channel, or None for plaintext.

    Args:
        tls_ca_file: PEM CA bundle the daemon's certificate must chain to; set = TLS.
        tls_cert_file, tls_key_file: the client's own certificate and key, for a daemon
            that requires client certificates (``server.tls_client_ca_file``).

    Raises:
        InvalidArgument: one of cert/key without the other, a client certificate
            without TLS, or an unreadable file.
    """
    if (tls_cert_file is None) != (tls_key_file is None):
        raise InvalidArgument("a client certificate needs both tls_cert_file and tls_key_file, "
                              f"got cert={tls_cert_file!r} key={tls_key_file!r}")
    if tls_ca_file is None:
        if tls_cert_file is not None:
            raise InvalidArgument("tls_cert_file/tls_key_file need TLS: pass tls_ca_file too")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca_file, "tls_ca_file"),
        private_key=read_pem(tls_key_file, "tls_key_file"),
        certificate_chain=read_pem(tls_cert_file, "tls_cert_file"))


class Connections:
    """Channels to a list of daemons and the failover loop over them."""

    channel_api: Any = grpc  # grpc.aio for the asyncio client: same channel constructors

    def __init__(self, addresses: str | Sequence[str], *, token: str | None,
                 tls_ca_file: str | None, timeout_s: float, max_message_bytes: int,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None) -> None:
        self.addresses = normalize_addresses(addresses)
        self.timeout_s = timeout_s
        self.metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = channel_options(max_message_bytes)
        self._credentials = channel_credentials(tls_ca_file, tls_cert_file, tls_key_file)
        self._channels: dict[int, grpc.Channel] = {}
        self._current = 0

    def stub(self, index: int) -> pb_grpc.KVStoreStub:
        channel = self._channels.get(index)
        if channel is None:
            address = self.addresses[index]
            if self._credentials is not None:
                channel = self.channel_api.secure_channel(address, self._credentials,
                                                          options=self._options)
            else:
                channel = self.channel_api.insecure_channel(address, options=self._options)
            self._channels[index] = channel
        return frames.stub(channel)

    def order(self) -> list[int]:
        """Address indexes to try, the one that answered last first."""
        n = len(self.addresses)
        return [(self._current + i) % n for i in range(n)]

    def succeeded(self, index: int) -> None:
        self._current = index

    def remaining(self, deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"{what}: timeout of {self.timeout_s} s spent before a daemon "
                                   "answered")
        return left

    def record_failure(self, what: str, index: int, exc: grpc.RpcError,
                       failures: list[str]) -> None:
        """Raise the mapped error unless ``exc`` may succeed on the next address; else note it."""
        if not is_failover(exc):
            raise error_from_rpc(exc, self.addresses[index]) from None
        failures.append(f"{self.addresses[index]}: {exc.code().name} {exc.details()}")
        log.info("%s failed on %s, trying the next address", what, failures[-1])

    def all_failed(self, what: str, failures: list[str]) -> Unavailable:
        return Unavailable(f"{what}: no daemon answered; tried " + "; ".join(failures))

    def call(self, what: str, fn: Callable[[pb_grpc.KVStoreStub, float, Metadata], T]) -> T:
        """Run ``fn(stub, timeout_s, metadata)`` against each address until one answers."""
        deadline = time.monotonic() + self.timeout_s
        failures: list[str] = []
        for index in self.order():
            try:
                result = fn(self.stub(index), self.remaining(deadline, what), self.metadata)
            except grpc.RpcError as exc:
                self.record_failure(what, index, exc, failures)
                continue
            self.succeeded(index)
            return result
        raise self.all_failed(what, failures)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
