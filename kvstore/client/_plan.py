"""Plans: the client's calls written once, as generators that yield effects, run by a driver.

A plan is a generator that never does I/O itself: it yields an effect (an RPC to
one address, the next message of a response stream, work to run off the event
loop, a value to hand to the caller) and receives its result, or has the
effect's exception raised at the ``yield``. ``kvstore.client.sync`` drives plans
with blocking gRPC, ``kvstore.client.aio`` with grpc.aio; the request planning,
failover, leases and layer streaming live only in the plans
(``kvstore.client._core``), so the two clients cannot drift apart.

``blocking``/``awaitable`` (and their streaming forms) turn a plan method into
a client method with the same name, signature and docstring.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Unary:
    """Call ``method`` (a unary or stream-unary RPC) on address ``index``; sends back the
    response. ``request`` may be an iterator of messages (stream-unary)."""

    index: int
    method: str
    request: Any
    timeout_s: float


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Start the unary-stream RPC ``method``; sends back a handle for :class:`Receive`.

    ``read_ahead``: read messages on a background thread while the caller works
    (the blocking driver; asyncio reads ahead anyway), so gRPC's flow-control
    window never stalls the daemon between layers.
    """

    index: int
    method: str
    request: Any
    timeout_s: float
    read_ahead: bool = False


@dataclass(frozen=True, slots=True)
class Receive:
    """The next message of an open stream; sends back :data:`END` after the last."""

    stream: Any


@dataclass(frozen=True, slots=True)
class Offload:
    """Run ``fn(*args)`` (CPU work: a copy, a decode) off the event loop; sends back its
    result. The blocking driver runs it inline."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Emit:
    """Hand ``value`` to the caller of a streaming method (``get_layers``)."""

    value: Any


END = object()  # what Receive sends back once a stream has ended
Effect = Unary | OpenStream | Receive | Offload | Emit
Plan = Generator[Effect, Any, T]


def start_call(conns: Any, effect: Unary | OpenStream) -> Any:
    """Start the RPC of an effect on ``conns`` (blocking stubs: the response or the
    stream; grpc.aio: an awaitable call or an async stream)."""
    call = getattr(conns.stub(effect.index), effect.method)
    return call(effect.request, timeout=effect.timeout_s, metadata=conns.metadata)


def driven_by(call: Callable[..., Any], stream: Callable[..., Any],
              streaming: frozenset[str]) -> Callable[[type], type]:
    """Class decorator: every public plan of the class's bases becomes a method of the
    class, wrapped by ``call`` (``stream`` for the names in ``streaming``)."""

    def decorate(cls: type) -> type:
        for base in cls.__mro__[1:]:
            for name, member in vars(base).items():
                if name.startswith("_") or not inspect.isgeneratorfunction(member) \
                        or name in vars(cls):
                    continue
                setattr(cls, name, (stream if name in streaming else call)(member))
        return cls

    return decorate


def blocking(plan: Callable[..., Plan[Any]]) -> Callable[..., Any]:
    """The blocking client method running ``plan`` (the class provides ``_run``)."""

    @functools.wraps(plan)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._run(plan(self, *args, **kwargs))

    return method


def blocking_stream(plan: Callable[..., Plan[None]]) -> Callable[..., Any]:
    """The blocking generator method handing out what ``plan`` emits (``_iterate``)."""

    @functools.wraps(plan)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        yield from self._iterate(plan(self, *args, **kwargs))

    return method


def awaitable(plan: Callable[..., Plan[Any]]) -> Callable[..., Any]:
    """The ``async`` client method running ``plan`` (the class provides ``_run``)."""

    @functools.wraps(plan)
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await self._run(plan(self, *args, **kwargs))

    return method


def async_stream(plan: Callable[..., Plan[None]]) -> Callable[..., Any]:
    """The async-generator method handing out what ``plan`` emits (``_iterate``)."""

    @functools.wraps(plan)
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        async for item in self._iterate(plan(self, *args, **kwargs)):
            yield item

    return method
