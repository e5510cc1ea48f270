"""Every type that crosses a process boundary, as msgspec Structs. No I/O here.

Python names are snake_case; on the wire they are camelCase (Fixpoint's public
v1 multi-LLM API) through `rename="camel"`. Unknown fields are ignored and every
optional field has a default, so older and newer peers can talk. The log record
keeps snake_case: it is a table row, and its columns are the contract.

Decoding validates: `decode_request` raises `msgspec.ValidationError` whose text
names the offending field (e.g. "Expected `int`, got `str` - at `$.displayModel`").
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

Mode = Literal["MODE_UNSPECIFIED", "MODE_TEST", "MODE_STAGING", "MODE_PROD"]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
RecordStatus = Literal["ok", "error"]

ModelName = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9_.\-]+/\S+\Z",
        max_length=200,
        description="`provider/model`, e.g. `openai/gpt-4o-mini`",
    ),
]
# (`\Z`, not `$`: msgspec searches, and `$` also matches before a final newline.)
# Printable ASCII without spaces: a key that an HTTP header cannot carry is refused
# when the request is decoded, before an HTTP library can quote it in an error.
ApiKey = Annotated[str, Meta(pattern=r"^[\x21-\x7e]+\Z", max_length=1024)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]


class _Wire(Struct, rename="camel", omit_defaults=True, kw_only=True, frozen=True):
    """Base of the wire messages: camelCase names, defaults left out when encoding."""


class V1Model(_Wire, frozen=True):
    name: ModelName
    temperature: Temperature | None = None
    max_tokens: PositiveInt | None = None
    api_key: ApiKey | None = None

    def __repr__(self) -> str:
        # The key must never reach a log line or a traceback through repr().
        key = "'***'" if self.api_key else "None"
        return (
            f"V1Model(name={self.name!r}, temperature={self.temperature!r}, "
            f"max_tokens={self.max_tokens!r}, api_key={key})"
        )

    @property
    def provider(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def provider_model(self) -> str:
        """The model name the provider's API is called with (`mock/echo` -> `echo`)."""
        return self.name.split("/", 1)[1]

    def without_key(self) -> V1Model:
        return msgspec.structs.replace(self, api_key=None)


class ToolCallFunction(_Wire, frozen=True):
    name: str
    arguments: str = ""


class ToolCall(_Wire, frozen=True):
    id: str
    type: str = "function"
    function: ToolCallFunction | None = None


class ChatMessage(_Wire, frozen=True):
    role: Role
    # A list holds OpenAI content parts (text, image_url, ...), passed through as given.
    content: str | list[dict[str, object]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class V1Tracing(_Wire, frozen=True):
    session_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None


class LogAttribute(_Wire, frozen=True):
    key: str
    value: str


class V1CreateMultiLLMChatCompletionRequest(_Wire, frozen=True):
    models: Annotated[list[V1Model], Meta(min_length=1, max_length=64)]
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    display_model: NonNegativeInt = 0
    tracing: V1Tracing | None = None
    user_id: str | None = None
    mode: Mode = "MODE_UNSPECIFIED"
    log_attributes: list[LogAttribute] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError during decoding.
        if self.display_model >= len(self.models):
            raise ValueError(
                f"displayModel {self.display_model} is out of range for {len(self.models)} model(s)"
                " - at `$.displayModel`"
            )

    @property
    def primary(self) -> V1Model:
        return self.models[self.display_model]

    @property
    def stored_mode(self) -> Mode:
        return "MODE_PROD" if self.mode == "MODE_UNSPECIFIED" else self.mode

    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


# --- the reply --------------------------------------------------------------


class V1ChatCompletionMessage(_Wire, frozen=True):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class V1Choice(_Wire, frozen=True):
    index: int
    message: V1ChatCompletionMessage
    finish_reason: str | None = None


class V1Usage(_Wire, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class V1ChatCompletion(_Wire, frozen=True):
    id: str
    external_id: str
    model: str
    choices: list[V1Choice] = msgspec.field(default_factory=list)
    usage: V1Usage = msgspec.field(default_factory=V1Usage)


class V1MultiLLMChatCompletion(_Wire, frozen=True):
    id: str
    primary_external_id: str
    model_names: list[str]
    display_model: int
    completion: V1ChatCompletion
    tracing: V1Tracing | None = None
    mode: Mode = "MODE_PROD"

    @property
    def text(self) -> str:
        """The primary completion's first choice, or "" when it has none."""
        if not self.completion.choices:
            return ""
        return self.completion.choices[0].message.content or ""


class RpcStatus(_Wire, frozen=True):
    """gRPC-style error reply; codes as in `multillm.errors.Code`."""

    code: int
    message: str
    details: list[dict[str, object]] = msgspec.field(default_factory=list)


# --- worker to worker -------------------------------------------------------


class FanOutCopy(_Wire, frozen=True):
    """What the primary sends to the queue of each other model.

    `request` keeps only the api key of the model this copy is for, so a copy
    never carries another model's secret.
    """

    request_id: str
    model_index: NonNegativeInt
    request: V1CreateMultiLLMChatCompletionRequest
    deadline_ms: int | None = None
    # The request had been delivered before: this model may already have its record.
    redelivered: bool = False

    def __post_init__(self) -> None:
        if self.model_index >= len(self.request.models):
            raise ValueError(
                f"modelIndex {self.model_index} is out of range for {len(self.request.models)} model(s)"
                " - at `$.modelIndex`"
            )

    @property
    def model(self) -> V1Model:
        return self.request.models[self.model_index]


# --- the log record ---------------------------------------------------------


class LLMLogRecord(Struct, kw_only=True):
    """One model's input and output for one request: a row of `llm_logs`."""

    log_id: str
    request_id: str
    model_name: str
    model_index: int
    is_primary: bool
    external_id: str | None = None
    status: RecordStatus = "ok"
    error_code: int | None = None
    error_message: str | None = None
    messages: list[ChatMessage] = msgspec.field(default_factory=list)
    temperature: float | None = None
    max_tokens: int | None = None
    output: list[V1Choice] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    latency_ms: float | None = None
    attempts: int = 0
    session_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    user_id: str | None = None
    mode: Mode = "MODE_PROD"
    log_attributes: list[LogAttribute] = msgspec.field(default_factory=list)
    created_at: str = ""
    completed_at: str = ""


# Built once: msgspec's encoders and decoders are cheap to reuse, costly to build.
_request_decoder: Final = msgspec.json.Decoder(V1CreateMultiLLMChatCompletionRequest)
_fanout_decoder: Final = msgspec.json.Decoder(FanOutCopy)
_reply_decoder: Final = msgspec.json.Decoder(V1MultiLLMChatCompletion)
_status_decoder: Final = msgspec.json.Decoder(RpcStatus)
_record_decoder: Final = msgspec.json.Decoder(LLMLogRecord)
_encoder: Final = msgspec.json.Encoder()


def encode(message: Struct) -> bytes:
    """JSON bytes of any message or record."""
    return _encoder.encode(message)


def decode_request(body: bytes) -> V1CreateMultiLLMChatCompletionRequest:
    """Decode and validate a request.

    Raises:
        msgspec.ValidationError: a field is missing or wrong; the message names it.
        msgspec.DecodeError: the body is not JSON, or not UTF-8; the message says where.
    """
    try:
        return _request_decoder.decode(body)
    except msgspec.ValidationError:
        raise
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec reports bad UTF-8 inside a string without saying where, as a DecodeError
        # from 0.23 on and a UnicodeDecodeError before: find the byte, the same on every version.
        try:
            body.decode()
        except UnicodeDecodeError as bad:
            raise msgspec.DecodeError(f"JSON is malformed: not UTF-8 at byte {bad.start}") from None
        if isinstance(exc, UnicodeDecodeError):
            raise msgspec.DecodeError(f"JSON is malformed: {exc}") from None
        raise


def decode_fanout(body: bytes) -> FanOutCopy:
    return _fanout_decoder.decode(body)


def decode_reply(body: bytes) -> V1MultiLLMChatCompletion:
    return _reply_decoder.decode(body)


def decode_status(body: bytes) -> RpcStatus:
    return _status_decoder.decode(body)


def decode_record(body: bytes | str) -> LLMLogRecord:
    return _record_decoder.decode(body)
