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

from kvstore.client import _plan
from kvstore.client._connections import Connections
from kvstore.client._core import STREAMING_PLANS, ClientCore
from kvstore.client._plan import Plan, async_stream, awaitable, driven_by


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
                return _plan.END
            self._value, self._error = None, None
            if isinstance(effect, _plan.Emit):
                return effect.value
            try:
                self._value = await self._perform(effect)
            except Exception as exc:  # raised in the plan, which decides
                self._error = exc

    async def _perform(self, effect: Any) -> Any:
        if isinstance(effect, _plan.Receive):
            return await anext(effect.stream, _plan.END)
        if isinstance(effect, _plan.Offload):
            return await asyncio.to_thread(effect.fn, *effect.args)
        call = _plan.start_call(self.client._conns, effect)
        return aiter(call) if isinstance(effect, _plan.OpenStream) else await call


@driven_by(awaitable, async_stream, STREAMING_PLANS)
class AsyncClient(ClientCore):
    """Asyncio client of one namespace; same arguments, methods and semantics as ``Client``.

    A lease from ``lease`` is released with ``await lease.release()`` or ``async with``.
    """

    connections = AsyncConnections

    async def _run(self, plan: Plan[Any]) -> Any:
        driver = _Driver(self, plan)
        try:
            if await driver.next_emitted() is not _plan.END:
                raise AssertionError("a plan emitted outside get_layers")
        finally:
            plan.close()
        return driver.result

    async def _iterate(self, plan: Plan[None]) -> AsyncIterator[Any]:
        driver = _Driver(self, plan)
        try:
            while (item := await driver.next_emitted()) is not _plan.END:
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
