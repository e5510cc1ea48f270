"""The client library that services import (kombu): send requests, read replies."""

from __future__ import annotations

from collections.abc import Sequence

from multillm.producers.aio import AsyncClient
from multillm.producers.client import Client, PendingReply
from multillm.producers.replies import Reply, ReplyQueue
from multillm.producers.streaming import AsyncReplyStream, ReplyStream, StreamDelta, StreamText
from multillm.schemas import (
    ChatMessage,
    LogAttribute,
    Mode,
    V1CreateMultiLLMChatCompletionRequest,
    V1Model,
    V1Tracing,
)

__all__ = [
    "AsyncClient",
    "AsyncReplyStream",
    "Client",
    "PendingReply",
    "Reply",
    "ReplyQueue",
    "ReplyStream",
    "StreamDelta",
    "StreamText",
    "make_request",
]


def make_request(
    models: Sequence[str | V1Model],
    messages: str | Sequence[ChatMessage],
    *,
    display_model: int = 0,
    tracing: V1Tracing | None = None,
    user_id: str | None = None,
    mode: Mode = "MODE_UNSPECIFIED",
    log_attributes: dict[str, str] | None = None,
) -> V1CreateMultiLLMChatCompletionRequest:
    """A request from model names (or `V1Model`s) and a prompt (or chat messages).

    Raises:
        ValueError: `display_model` is out of range, or `models` is empty.
    """
    if not models:
        raise ValueError("models must name at least one model")
    chat = [ChatMessage(role="user", content=messages)] if isinstance(messages, str) else list(messages)
    return V1CreateMultiLLMChatCompletionRequest(
        models=[V1Model(name=m) if isinstance(m, str) else m for m in models],
        messages=chat,
        display_model=display_model,
        tracing=tracing,
        user_id=user_id,
        mode=mode,
        log_attributes=[LogAttribute(key=k, value=v) for k, v in (log_attributes or {}).items()],
    )
