"""`AsyncClient`: `Client.create`, `Client.stream` and `Client.score` for asyncio services.

It wraps a `Client`: the confirmed publish runs in a worker thread (kombu is
blocking), and the reply's future is awaited without blocking the event loop.
"""

from __future__ import annotations

import asyncio
from functools import partial

from multillm.errors import RequestTimeout
from multillm.producers.client import DEFAULT_TIMEOUT, Client
from multillm.producers.publishing import new_request_id
from multillm.producers.streaming import AsyncReplyStream
from multillm.schemas import V1CreateMultiLLMChatCompletionRequest, V1MultiLLMChatCompletion


class AsyncClient:
    """Example:
    async with AsyncClient() as client:
        reply = await client.create(make_request(["mock/a", "mock/b"], "Hello"))
    """

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = 8,
        connect_timeout: float = 10.0,
    ) -> None:
        """Connect as `Client(broker_url, ...)` does; None: `$MULTILLM_BROKER_URL`, else the local broker."""
        self._client = Client(broker_url, timeout=timeout, pool_size=pool_size, connect_timeout=connect_timeout)

    async def create(
        self, request: V1CreateMultiLLMChatCompletionRequest, *, timeout: float | None = None
    ) -> V1MultiLLMChatCompletion:
        """Publish `request` and await its reply; raises like `Client.create`."""
        timeout = self._client.timeout if timeout is None else timeout
        pending = await asyncio.to_thread(self._client.submit, request, timeout=timeout)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(pending), timeout)
        except TimeoutError:
            raise RequestTimeout(f"no reply to request {pending.request_id} within {timeout:g}s") from None
        finally:
            self._client.forget(pending)

    async def stream(
        self, request: V1CreateMultiLLMChatCompletionRequest, *, timeout: float | None = None
    ) -> AsyncReplyStream:
        """Publish `request` asking for the primary's answer as it is written; `async for` what this
        returns (`Client.stream`, awaited).

        Example:
            stream = await client.stream(make_request(["mock/a"], "Hello"))
            async for delta in stream:
                print(delta.text, end="", flush=True)
            reply = stream.reply
        """
        timeout = self._client.timeout if timeout is None else timeout
        stream = AsyncReplyStream(new_request_id(), timeout, self._client.forget_stream)
        await asyncio.to_thread(self._client.open_stream, request, stream.request_id, stream.put, timeout)
        return stream

    async def score(
        self,
        log_id: str,
        name: str,
        *,
        value: float | None = None,
        label: str | None = None,
        comment: str | None = None,
        source: str | None = None,
        request_id: str | None = None,
        score_id: str | None = None,
    ) -> str:
        """`Client.score`, awaited: the same arguments, errors and returned id."""
        score = partial(
            self._client.score,
            log_id,
            name,
            value=value,
            label=label,
            comment=comment,
            source=source,
            request_id=request_id,
            score_id=score_id,
        )
        return await asyncio.to_thread(score)

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
