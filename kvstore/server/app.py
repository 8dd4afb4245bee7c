"""The daemon process: build the gRPC server, run it until a signal, drain, flush.

``create_server`` builds and binds a server (port 0 picks a free port);
``serve`` runs one until SIGTERM/SIGINT; ``ServerThread`` runs one on its own
event loop in a background thread, for tests and embedding.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from kvstore import _frames as frames
from kvstore._proto import kvstore_pb2, kvstore_pb2_grpc
from kvstore.config import Config, ConfigProblem, ServerConfig
from kvstore.errors import InvalidArgument, Unavailable
from kvstore.server.auth import Authenticator
from kvstore.server.local import SameHostPolicy
from kvstore.server.metrics import ServiceCounters
from kvstore.server.namespaces import NamespaceRegistry
from kvstore.server.prometheus import MetricsEndpoint
from kvstore.server.service import KVStoreServicer
from kvstore.server.wire import RequestLimits, lenient_deserializer

if TYPE_CHECKING:
    from kvstore.engine import Engine

log = logging.getLogger(__name__)

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:50051"`` / ``"[::1]:0"`` -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"server.listen must be HOST:PORT (e.g. 127.0.0.1:50051), "
                              f"got {listen!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_listen(config: ServerConfig) -> tuple[str, int]:
    """Refuse a non-loopback bind without TLS unless ``allow_insecure_remote``.

    Returns:
        (host, port) to bind.
    """
    host, port = split_listen(config.listen)
    if config.metrics_listen and not is_loopback(split_listen(config.metrics_listen)[0]):
        log.warning("server.metrics_listen %s is not loopback: the Prometheus endpoint has no "
                    "TLS or auth and names every tenant and namespace", config.metrics_listen)
    if is_loopback(host):
        return host, port
    is_tls = config.tls_cert_file is not None
    if not is_tls and not config.allow_insecure_remote:
        raise InvalidArgument(
            f"server.listen is {config.listen!r}, which is not a loopback address, and TLS "
            "is off: anyone on the network path could read the KV and the bearer tokens. "
            "Set server.tls_cert_file and server.tls_key_file, or server.allow_insecure_remote "
            "= true (--allow-insecure-remote) on a network you trust"
        )
    if not config.tokens and config.tls_client_ca_file is None:
        log.warning("listening on %s without bearer tokens or client certificates: anyone "
                    "who can reach it can read and write every namespace", config.listen)
    return host, port


def server_problems(config: ServerConfig) -> list[ConfigProblem]:
    """What would stop a daemon with this config from starting (bind, TLS files)."""
    problems = []
    for key, check in (("server.listen", check_listen), ("server.tls_cert_file",
                                                          _server_credentials)):
        try:
            check(config)
        except InvalidArgument as exc:
            problems.append(ConfigProblem(key, str(exc)))
    return problems


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc}") from exc


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config; with ``tls_client_ca_file``, mutual TLS."""
    if config.tls_cert_file is None and config.tls_key_file is None:
        if config.tls_client_ca_file is not None:
            raise InvalidArgument("server.tls_client_ca_file needs TLS: set "
                                  "server.tls_cert_file and server.tls_key_file too")
        return None
    if config.tls_cert_file is None or config.tls_key_file is None:
        raise InvalidArgument("TLS needs both server.tls_cert_file and server.tls_key_file, "
                              f"got cert={config.tls_cert_file!r} key={config.tls_key_file!r}")
    key = _read_pem(config.tls_key_file, "server.tls_key_file")
    cert = _read_pem(config.tls_cert_file, "server.tls_cert_file")
    if config.tls_client_ca_file is None:
        return grpc.ssl_server_credentials([(key, cert)])
    client_ca = _read_pem(config.tls_client_ca_file, "server.tls_client_ca_file")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=True)


@dataclass(slots=True)
class ServerHandle:
    """A built server and everything that must be stopped with it."""

    server: grpc.aio.Server
    port: int  # the bound port (the real one when the config said 0)
    engine: Engine
    executor: ThreadPoolExecutor  # tier I/O off the event loop
    health: health_aio.HealthServicer
    metrics: MetricsEndpoint | None  # Prometheus endpoint, if configured
    counters: ServiceCounters
    ready_task: asyncio.Task[None] | None = None  # sets SERVING once the arena is prefaulted

    async def shutdown(self, grace_s: float, *, close_engine: bool = True,
                       notice_s: float = 0.0) -> None:
        """Report NOT_SERVING, keep serving ``notice_s``, then stop accepting calls, drain
        in-flight ones up to ``grace_s``, and flush."""
        await self.health.enter_graceful_shutdown()
        self.counters.mark_draining()
        if self.ready_task is not None:
            self.ready_task.cancel()
        if notice_s > 0:
            log.info("health is NOT_SERVING; still serving for %.1f s before the drain", notice_s)
            await asyncio.sleep(notice_s)
        await self.server.stop(grace_s)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.executor.shutdown, True)
        if close_engine:
            await loop.run_in_executor(None, self.engine.close)  # flushes DRAM to disk
        if self.metrics is not None:
            self.metrics.close()
        log.info("daemon stopped")


class _HandlerCapture:
    """Stands in for the server while the generated code registers its handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self.service = ""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, dict(handlers)


def _add_servicer(servicer: KVStoreServicer, server: grpc.aio.Server) -> None:
    """Register the servicer with ``kvstore._frames.serialize`` as every response serializer
    and lenient request deserializers.

    The generated registration hard-wires ``SerializeToString``; Get's data messages
    are framed by hand instead (see ``kvstore._frames`` for why), so the handlers the
    generated code builds are captured and re-registered with the pass-through serializer.
    Its ``FromString`` deserializers raise on bytes that do not parse, which gRPC
    reports as UNKNOWN (with a traceback, before the caller is authenticated); the
    lenient ones hand the servicer a ``MalformedRequest`` to refuse after auth.
    """
    capture = _HandlerCapture()
    kvstore_pb2_grpc.add_KVStoreServicer_to_server(servicer, capture)
    handlers = {name: handler._replace(
                    response_serializer=frames.serialize,
                    request_deserializer=lenient_deserializer(handler.request_deserializer))
                for name, handler in capture.handlers.items()}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


def build_server(config: Config, engine: Engine) -> ServerHandle:
    """Build and bind (not start) a server over ``engine``; call inside the event loop."""
    host, port = check_listen(config.server)
    credentials = _server_credentials(config.server)
    limit = config.server.max_message_bytes
    limits = RequestLimits(max_tokens=config.server.max_request_tokens,
                           max_chunks=config.server.max_request_chunks)
    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # gRPC sets SO_REUSEPORT by default: a second daemon on the same address would
        # bind too and the kernel would split clients between two separate stores.
        ("grpc.so_reuseport", 0),
    ])
    executor = ThreadPoolExecutor(max_workers=max(1, config.server.io_threads),
                                  thread_name_prefix="kvstore-io")
    registry = NamespaceRegistry(config.tiers.disk.path if config.tiers.disk.enabled else None)
    counters = ServiceCounters()
    same_host = SameHostPolicy(enabled=config.server.same_host,
                               arena_for_tenants=config.server.arena_for_tenants)
    servicer = KVStoreServicer(engine, registry, Authenticator(config.server.tokens), executor,
                               counters, max_message_bytes=limit, limits=limits,
                               same_host=same_host)
    _add_servicer(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        executor.shutdown(wait=False)
        raise InvalidArgument(f"cannot bind {address}: {exc} (is another daemon or program "
                              "listening there? pick another --listen port)") from exc
    metrics = None
    if config.server.metrics_listen:
        metrics = MetricsEndpoint(config.server.metrics_listen, counters, engine)
    return ServerHandle(server, bound, engine, executor, health, metrics, counters)


async def _start(handle: ServerHandle) -> None:
    """Start serving; health says SERVING once the DRAM arena is prefaulted.

    Until then the daemon answers (a call is correct, only its first writes to each
    arena page are slower), but a readiness probe sees NOT_SERVING, so a load
    balancer sends it traffic only at full speed.
    """
    for name in ("", SERVICE_NAME):
        await handle.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await handle.server.start()
    handle.ready_task = asyncio.get_running_loop().create_task(_serve_when_ready(handle))


async def _serve_when_ready(handle: ServerHandle) -> None:
    prefaulted = handle.engine.dram.prefaulted
    while not prefaulted.is_set():  # polled: a thread blocked on wait() would outlive a stop
        await asyncio.sleep(0.05)
    if handle.counters.is_draining:
        return
    for name in ("", SERVICE_NAME):
        await handle.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    handle.counters.mark_ready()
    log.info("ready: arena prefaulted, health SERVING")


def create_server(config: Config, engine: Engine | None = None) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started, grpc.aio server and its port (call inside the event loop).

    With ``engine`` None an engine is built from ``config`` (DRAM + disk); the
    caller then owns stopping the server. ``serve`` and ``ServerThread`` also
    drain and close the engine; prefer them.
    """
    if engine is None:
        from kvstore.engine import Engine

        engine = Engine.from_config(config)
    handle = build_server(config, engine)
    return handle.server, handle.port


async def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT, then drain, flush and return 0."""
    from kvstore.engine import Engine

    engine = Engine.from_config(config)
    try:
        handle = build_server(config, engine)
    except BaseException:
        engine.close()
        raise
    # Handlers first: a SIGTERM sent as soon as the log says "listening" must drain.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await _start(handle)
    log.info("kvstore daemon listening on %s (port %d)", config.server.listen, handle.port)
    await stop.wait()
    log.info("signal received: draining for up to %.1f s", config.server.drain_timeout_s)
    await handle.shutdown(config.server.drain_timeout_s, notice_s=config.server.drain_notice_s)
    return 0


class ServerThread:
    """A daemon on its own event loop in a background thread.

    >>> with ServerThread(config) as server:
    ...     Client(server.address, ...)
    """

    def __init__(self, config: Config, engine: Engine | None = None) -> None:
        self.config = config
        self._owns_engine = engine is None
        self._engine = engine
        self._loop = asyncio.new_event_loop()
        self._handle: ServerHandle | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore-server",
                                        daemon=True)
        self._stopped = False

    @property
    def port(self) -> int:
        assert self._handle is not None, "server not started"
        return self._handle.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def engine(self) -> Any:
        assert self._handle is not None, "server not started"
        return self._handle.engine

    @property
    def metrics_port(self) -> int | None:
        """Port of the Prometheus endpoint; None when metrics are off."""
        assert self._handle is not None, "server not started"
        return None if self._handle.metrics is None else self._handle.metrics.port

    @property
    def counters(self) -> ServiceCounters:
        assert self._handle is not None, "server not started"
        return self._handle.counters

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until health says SERVING (the arena is prefaulted).

        Raises:
            Unavailable: not ready within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not self.counters.is_ready:
            if time.monotonic() > deadline:
                raise Unavailable(f"daemon not ready after {timeout_s} s (arena prefault)")
            time.sleep(0.02)

    def start(self) -> ServerThread:
        if self._engine is None:
            from kvstore.engine import Engine

            self._engine = Engine.from_config(self.config)
        self._thread.start()
        try:
            self._handle = self._call(self._build_and_start())
        except BaseException:
            self._stop_loop()
            if self._owns_engine:
                self._engine.close()
            raise
        return self

    async def _build_and_start(self) -> ServerHandle:
        handle = build_server(self.config, self._engine)
        await _start(handle)
        return handle

    def _call(self, coro: Any, timeout: float | None = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace_s: float | None = None) -> None:
        """Drain up to ``grace_s`` (default drain_timeout_s), close an owned engine, join."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.server.drain_timeout_s if grace_s is None else grace_s
        if self._handle is not None:
            self._call(self._handle.shutdown(grace, close_engine=self._owns_engine), None)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(grace_s=1.0)
