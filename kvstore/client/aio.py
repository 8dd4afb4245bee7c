"""The asyncio client: ``AsyncClient`` has ``Client``'s methods as ``async`` ones (grpc.aio).

Both run the same plans (``kvstore.client._core``); this module only performs
their effects on grpc.aio. Channels are created on first use, inside the running
event loop; CPU work (arena copies, client-side decoding) runs on a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from kvstore.client._connections import Connections
from kvstore.client._core import ClientCore
from kvstore.client._plan import (
    END,
    Emit,
    Offload,
    OpenStream,
    Plan,
    Receive,
    Unary,
    async_stream,
    awaitable,
)


class AsyncConnections(Connections):
    """``Connections`` over grpc.aio channels."""

    channel_api = grpc.aio

    async def aclose(self) -> None:
        for channel in self._channels.values():
            await channel.close()  # type: ignore[misc]
        self._channels.clear()


class _Driver:
    """Performs one plan's effects on grpc.aio (see ``Client._drive``)."""

    def __init__(self, client: AsyncClient, plan: Plan[Any]) -> None:
        self.client, self.plan = client, plan
        self.result: Any = None
        self._value: Any = None
        self._error: Exception | None = None

    async def next_emitted(self) -> Any:
        """Run the plan to its next emitted value; END once it returned (see ``result``)."""
        while True:
            try:
                effect = self.plan.send(self._value) if self._error is None \
                    else self.plan.throw(self._error)
            except StopIteration as stop:
                self.result = stop.value
                return END
            self._value, self._error = None, None
            if isinstance(effect, Emit):
                return effect.value
            try:
                self._value = await self._perform(effect)
            except Exception as exc:  # raised in the plan, which decides
                self._error = exc

    async def _perform(self, effect: Any) -> Any:
        conns = self.client._conns
        if isinstance(effect, Receive):
            return await anext(effect.stream, END)
        if isinstance(effect, Unary):
            call = getattr(conns.stub(effect.index), effect.method)
            return await call(effect.request, timeout=effect.timeout_s, metadata=conns.metadata)
        if isinstance(effect, OpenStream):
            call = getattr(conns.stub(effect.index), effect.method)
            return aiter(call(effect.request, timeout=effect.timeout_s, metadata=conns.metadata))
        if isinstance(effect, Offload):
            return await asyncio.to_thread(effect.fn, *effect.args)
        raise AssertionError(f"unknown effect {effect!r}")


class AsyncClient(ClientCore):
    """Asyncio client of one namespace; same arguments, methods and semantics as ``Client``.

    A lease from ``lease`` is released with ``await lease.release()`` or ``async with``.
    """

    connections = AsyncConnections

    put = awaitable(ClientCore.put)
    lookup = awaitable(ClientCore.lookup)
    get = awaitable(ClientCore.get)
    get_layers = async_stream(ClientCore.get_layers)
    delete = awaitable(ClientCore.delete)
    prefetch = awaitable(ClientCore.prefetch)
    stats = awaitable(ClientCore.stats)
    fetch_blocks = awaitable(ClientCore.fetch_blocks)
    put_blob = awaitable(ClientCore.put_blob)
    get_blob = awaitable(ClientCore.get_blob)
    put_chunk = awaitable(ClientCore.put_chunk)
    get_chunk = awaitable(ClientCore.get_chunk)
    lookup_chunk = awaitable(ClientCore.lookup_chunk)
    delete_chunk = awaitable(ClientCore.delete_chunk)
    lease = awaitable(ClientCore.lease)
    view = awaitable(ClientCore.view)

    async def _run(self, plan: Plan[Any]) -> Any:
        driver = _Driver(self, plan)
        try:
            if await driver.next_emitted() is not END:
                raise AssertionError("a plan emitted outside get_layers")
        finally:
            plan.close()
        return driver.result

    async def _iterate(self, plan: Plan[None]) -> AsyncIterator[Any]:
        driver = _Driver(self, plan)
        try:
            while (item := await driver.next_emitted()) is not END:
                yield item
        finally:
            plan.close()

    async def close(self) -> None:
        self._local.close()
        self._gpu.close()
        await self._conns.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
