"""multillm: multi-LLM chat completions over RabbitMQ.

Services import the client side from here; workers run from the `multillm` command.
"""

from __future__ import annotations

import logging

from multillm.errors import (
    BrokerUnavailable,
    Code,
    ConfigError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MultiLLMError,
    NotFound,
    PermissionDenied,
    RequestTimeout,
    ResourceExhausted,
    RpcError,
    Unauthenticated,
    Unavailable,
)
from multillm.producers import (
    AsyncClient,
    AsyncReplyStream,
    Client,
    PendingReply,
    Reply,
    ReplyQueue,
    ReplyStream,
    StreamDelta,
    StreamText,
    make_request,
)
from multillm.schemas import (
    ChatMessage,
    LLMLogRecord,
    RpcStatus,
    V1ChatCompletionChunk,
    V1CreateMultiLLMChatCompletionRequest,
    V1Model,
    V1MultiLLMChatCompletion,
    V1Tracing,
)

# The standard library's convention for libraries: nothing is printed unless the
# application configures logging (see multillm.logging_setup.get_logger).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AsyncClient",
    "AsyncReplyStream",
    "BrokerUnavailable",
    "ChatMessage",
    "Client",
    "Code",
    "ConfigError",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "LLMLogRecord",
    "MultiLLMError",
    "NotFound",
    "PendingReply",
    "PermissionDenied",
    "Reply",
    "ReplyQueue",
    "ReplyStream",
    "RequestTimeout",
    "ResourceExhausted",
    "RpcError",
    "RpcStatus",
    "StreamDelta",
    "StreamText",
    "Unauthenticated",
    "Unavailable",
    "V1ChatCompletionChunk",
    "V1CreateMultiLLMChatCompletionRequest",
    "V1Model",
    "V1MultiLLMChatCompletion",
    "V1Tracing",
    "make_request",
]
