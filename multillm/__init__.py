"""multillm: multi-LLM chat completions over RabbitMQ.

Services import the client side from here; workers run from the `multillm` command.
"""

from __future__ import annotations

from multillm.errors import (
    BrokerUnavailable,
    ConfigError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MultiLLMError,
    RequestTimeout,
    ResourceExhausted,
    RpcError,
    Unavailable,
)
from multillm.producers import AsyncClient, Client, PendingReply, Reply, ReplyQueue, make_request
from multillm.schemas import (
    ChatMessage,
    LLMLogRecord,
    RpcStatus,
    V1CreateMultiLLMChatCompletionRequest,
    V1Model,
    V1MultiLLMChatCompletion,
    V1Tracing,
)

__all__ = [
    "AsyncClient",
    "BrokerUnavailable",
    "ChatMessage",
    "Client",
    "ConfigError",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "LLMLogRecord",
    "MultiLLMError",
    "PendingReply",
    "Reply",
    "ReplyQueue",
    "RequestTimeout",
    "ResourceExhausted",
    "RpcError",
    "RpcStatus",
    "Unavailable",
    "V1CreateMultiLLMChatCompletionRequest",
    "V1Model",
    "V1MultiLLMChatCompletion",
    "V1Tracing",
    "make_request",
]
