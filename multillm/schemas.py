"""Every type that crosses a process boundary, as msgspec Structs. No I/O here.

Python names are snake_case; on the wire they are camelCase (Fixpoint's public
v1 multi-LLM API) through `rename="camel"`. Unknown fields are ignored and every
optional field has a default, so older and newer peers can talk. The log record
keeps snake_case: it is a table row, and its columns are the contract.

Decoding validates: `decode_request` raises `msgspec.ValidationError` whose text
names the offending field (e.g. "Expected `int`, got `str` - at `$.displayModel`").
"""

from __future__ import annotations

import json
import math
import re
import sys
import unicodedata
import uuid
from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from multillm.contract import DETAIL_LOG_ID, ERROR_DOMAIN, ERROR_INFO_TYPE, ID_NAMESPACE, MAX_MODEL_NAME_BYTES

Mode = Literal["MODE_UNSPECIFIED", "MODE_TEST", "MODE_STAGING", "MODE_PROD"]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
RecordStatus = Literal["ok", "error"]

MAX_MODEL_NAME_CHARS: Final = 200
_PROVIDER: Final = re.compile(r"[A-Za-z0-9_.\-]+\Z")
# Characters a name may not hold: controls (NUL cannot even be stored by PostgreSQL), whitespace,
# private use, and the invisible and bidirectional formatting characters that make a name look
# like another one in a log or a queue list (U+202E turns the rest of a line around): every
# character of these Unicode categories, and the blank fillers that are letters to Unicode.
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Co", "Cs", "Zs", "Zl", "Zp"})
_BLANK_LETTERS: Final = frozenset("\u034f\u115f\u1160\u3164\uffa0")
_ASCII_FORBIDDEN: Final = re.compile("[\x00-\x20\x7f]")


def _forbidden_in_name(name: str) -> tuple[int, str] | None:
    """The first character a model name may not hold, with its index, or None."""
    if name.isascii():  # the usual case, ten times faster: only controls and the space to look for
        ascii_bad = _ASCII_FORBIDDEN.search(name)
        return (ascii_bad.start(), ascii_bad.group()) if ascii_bad else None
    for index, char in enumerate(name):
        if char in _BLANK_LETTERS or unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            return index, char
    return None


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a model name, or None.

    A model name becomes a routing key and, after `multillm.model.`, a queue name: both are AMQP
    short strings of at most 255 bytes, so a name is held to MAX_MODEL_NAME_BYTES of UTF-8 as well
    as MAX_MODEL_NAME_CHARS characters.
    """
    provider, slash, model = name.partition("/")
    if not slash or not model or not _PROVIDER.match(provider):
        return f"model name {_shown(name)} must be `provider/model`, the provider of letters, digits, '_', '.', '-'"
    if bad := _forbidden_in_name(name):
        index, char = bad
        return (
            f"model name {_shown(name)} contains U+{ord(char):04X} at character {index}:"
            " no whitespace, control or invisible formatting characters"
        )
    if len(name) > MAX_MODEL_NAME_CHARS:
        return f"model name {_shown(name)} is {len(name)} characters long, over {MAX_MODEL_NAME_CHARS}"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_MODEL_NAME_BYTES:
        return (
            f"model name {_shown(name)} is {size} bytes in UTF-8, over {MAX_MODEL_NAME_BYTES}"
            " (its queue name must fit AMQP's 255 bytes)"
        )
    return None


def _shown(name: str) -> str:
    """`name` quoted with its invisible characters escaped, and cut when long."""
    text = ascii(name) if _forbidden_in_name(name) else repr(name)
    return text if len(text) <= 80 else text[:60] + "..." + text[-15:]


def _refuse_nul(value: str | None, field: str) -> None:
    """Text that lands in a column of its own: PostgreSQL cannot store NUL in text."""
    if value is not None and "\x00" in value:
        raise ValueError(f"`{field}` has NUL (U+0000) at character {value.index(chr(0))}, which no sink can store")


# Further limits (bytes, invisible characters) are checked by `model_name_problem`, with a clear message.
ModelName = Annotated[
    str, Meta(max_length=MAX_MODEL_NAME_CHARS, description="`provider/model`, e.g. `openai/gpt-4o-mini`")
]
# Printable ASCII without spaces: a key that an HTTP header cannot carry is refused
# when the request is decoded, before an HTTP library can quote it in an error.
ApiKey = Annotated[str, Meta(pattern=r"^[\x21-\x7e]+\Z", max_length=1024)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
# At most what a signed 32-bit integer holds, as OpenAI's API does; a larger number could not
# even be stored (SQLite's and PostgreSQL's integers stop at 2**63 - 1).
MaxTokens = Annotated[int, Meta(ge=1, le=2**31 - 1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]


class _Wire(Struct, rename="camel", omit_defaults=True, kw_only=True, frozen=True):
    """Base of the messages we read: camelCase names, defaults left out when encoding."""


class _Reply(Struct, rename="camel", kw_only=True, frozen=True):
    """Base of what we answer: camelCase names, every field written, defaults too.

    Fixpoint's generated models require fields whose value is often our default (`mode`
    `MODE_PROD`, a message's `role` `assistant`, `choices`, `usage`): a reply that left them
    out could not be read by a client built on that API.
    """


class V1Model(_Wire, frozen=True):
    name: ModelName
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None
    api_key: ApiKey | None = None

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError during decoding, with its path.
        if problem := model_name_problem(self.name):
            raise ValueError(problem)

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


class ToolCallFunction(_Reply, frozen=True):
    name: str
    arguments: str = ""


class ToolCall(_Reply, frozen=True):
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

    def __post_init__(self) -> None:
        _refuse_nul(self.session_id, "sessionId")
        _refuse_nul(self.trace_id, "traceId")
        _refuse_nul(self.span_id, "spanId")
        _refuse_nul(self.parent_span_id, "parentSpanId")


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
        _refuse_nul(self.user_id, "userId")
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


class V1ChatCompletionMessage(_Reply, frozen=True):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class V1Choice(_Reply, frozen=True):
    index: int
    message: V1ChatCompletionMessage
    finish_reason: str | None = None


class V1Usage(_Reply, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class V1ChatCompletion(_Reply, frozen=True):
    id: str
    external_id: str
    model: str
    choices: list[V1Choice] = msgspec.field(default_factory=list)
    usage: V1Usage = msgspec.field(default_factory=V1Usage)


class V1MultiLLMChatCompletion(_Reply, frozen=True):
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


class V1ChatCompletionChunk(_Reply, frozen=True):
    """A piece of the primary's answer, sent to `reply_to` before the final reply of a request that
    asked for a stream (header `x-multillm-stream`).

    `id` is the primary's log id (the final reply's `id`); `stream_id` names one try at the answer
    (a retry or a redelivery starts a new one, from `seq` 0); `delta` is the text that follows the
    try's earlier chunks.
    """

    id: str
    stream_id: str
    seq: int
    delta: str


class ErrorInfo(_Reply, frozen=True):
    """A detail of an `RpcStatus`: google.rpc.ErrorInfo as a protobuf `Any` in JSON.

    `metadata` holds `logId` (the primary's error record) and `attempts` (model calls made), as
    strings, as ErrorInfo's map of strings says. Any other detail a foreign peer sends decodes
    with its `@type` kept and its other fields dropped.
    """

    type: str = msgspec.field(default=ERROR_INFO_TYPE, name="@type")
    reason: str = ""
    domain: str = ERROR_DOMAIN
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class RpcStatus(_Reply, frozen=True):
    """gRPC-style error reply (google.rpc.Status in JSON); codes as in `multillm.errors.Code`."""

    code: int
    message: str
    details: list[ErrorInfo] = msgspec.field(default_factory=list)

    @property
    def log_id(self) -> str | None:
        """The log id of the primary's error record, when one was written."""
        for detail in self.details:
            if log_id := detail.metadata.get(DETAIL_LOG_ID):
                return log_id
        return None


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
    # Parts of prompt_tokens and completion_tokens, where the provider reports them.
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    # What the call cost (multillm/pricing.py); None when the model's price is unknown.
    cost_usd: float | None = None
    latency_ms: float | None = None
    # A streamed call (the primary's, when the request asked for a stream): from the call's start,
    # retries included, to the first text of the try that answered; else None.
    time_to_first_token_ms: float | None = None
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


# --- scores ------------------------------------------------------------------

MAX_SCORE_NAME_CHARS: Final = 200
MAX_SCORE_LABEL_CHARS: Final = 200
MAX_SCORE_COMMENT_CHARS: Final = 10_000
MAX_ID_CHARS: Final = 200
# User feedback (`name` `feedback`): `label` up or down, `value` 1 or 0 (docs/contract.md).
FEEDBACK: Final = "feedback"
FEEDBACK_VALUES: Final = {"up": 1.0, "down": 0.0}

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")
# Out of range: msgspec reads 1e999 as infinity, which no score can mean (JSON has no NaN).
FiniteFloat = Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]


class V1Score(_Wire, frozen=True):
    """A score of one record (`logId`), published to `multillm.scores`: a number, a label or both.

    `scoreId` is derived from `logId`, `name` and `source` when absent (`id`), so that the
    same judgement sent twice is stored once.
    """

    log_id: Id
    name: Annotated[str, Meta(max_length=MAX_SCORE_NAME_CHARS)]
    value: FiniteFloat | None = None
    label: Annotated[str, Meta(max_length=MAX_SCORE_LABEL_CHARS)] | None = None
    comment: Annotated[str, Meta(max_length=MAX_SCORE_COMMENT_CHARS)] | None = None
    source: Annotated[str, Meta(max_length=MAX_SCORE_NAME_CHARS)] | None = None
    request_id: Id | None = None
    score_id: Id | None = None

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError during decoding, with its path.
        if problem := score_problem(self):
            raise ValueError(problem)

    @property
    def id(self) -> str:
        """`scoreId`, or the UUIDv5 of `["score", logId, name, source or ""]` in JSON when absent:
        the same record, name and source make the same id."""
        if self.score_id:
            return self.score_id
        return str(uuid.uuid5(ID_NAMESPACE, json.dumps(["score", self.log_id, self.name, self.source or ""])))


def score_problem(score: V1Score) -> str | None:
    """Why `score` cannot be stored, or None: what the field types alone do not say."""
    if not score.name:
        return "`name` is empty"
    # Names and sources are identifiers (a column of `logs stats`, a key of its JSON); a label is text.
    for field, text in (("name", score.name), ("source", score.source)):
        if text is not None and (bad := _forbidden_in_name(text)):
            index, char = bad
            return f"`{field}` contains U+{ord(char):04X} at character {index}: no whitespace or control characters"
    if score.label is not None and (control := _CONTROL.search(score.label)):
        return f"`label` contains U+{ord(control.group()):04X} at character {control.start()}: no control characters"
    if score.label is not None and not score.label.strip():
        return "`label` is blank: leave it out instead"
    if score.value is None and score.label is None:
        return "the score has neither a `value` nor a `label`"
    if score.value is not None and not math.isfinite(score.value):  # built in Python: JSON has none
        return f"`value` {score.value} is not a finite number"
    if score.name == FEEDBACK:
        expected = FEEDBACK_VALUES.get(score.label or "")
        if expected is None:
            return f"`feedback` takes `label` up or down, not {score.label!r}"
        if score.value is not None and score.value != expected:
            return f"`feedback` {score.label} has `value` {expected:g}, not {score.value:g}"
    for field, text in (("logId", score.log_id), ("comment", score.comment), ("requestId", score.request_id)):
        if text is not None and "\x00" in text:
            return f"`{field}` has NUL (U+0000), which no sink can store"
    return None


class LLMScore(Struct, kw_only=True):
    """A stored score: a row of `llm_scores` (snake_case, like the log record)."""

    score_id: str
    log_id: str
    request_id: str | None = None
    name: str
    value: float | None = None
    label: str | None = None
    comment: str | None = None
    source: str | None = None
    created_at: str = ""


# A \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or the latter alone. Only looked for
# once msgspec has refused a body, to name the problem.
_LONE_SURROGATE: Final = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)

T = TypeVar("T")

# Built once: msgspec's encoders and decoders are cheap to reuse, costly to build.
_request_decoder: Final = msgspec.json.Decoder(V1CreateMultiLLMChatCompletionRequest)
_fanout_decoder: Final = msgspec.json.Decoder(FanOutCopy)
_reply_decoder: Final = msgspec.json.Decoder(V1MultiLLMChatCompletion)
_status_decoder: Final = msgspec.json.Decoder(RpcStatus)
_chunk_decoder: Final = msgspec.json.Decoder(V1ChatCompletionChunk)
_record_decoder: Final = msgspec.json.Decoder(LLMLogRecord)
_score_decoder: Final = msgspec.json.Decoder(V1Score)
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
    return _decoded(_request_decoder, body)


def decode_score(body: bytes) -> V1Score:
    """Decode and validate a score; raises as `decode_request` does."""
    return _decoded(_score_decoder, body)


def _decoded(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    try:
        return decoder.decode(body)
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
        if lone := _LONE_SURROGATE.search(body):
            # msgspec calls this "truncated", which sends a producer looking in the wrong place.
            escape = lone.group().decode()
            raise msgspec.DecodeError(
                f"JSON is malformed: {escape} at byte {lone.start()} is half of a UTF-16 surrogate pair, not text"
            ) from None
        raise


def decode_fanout(body: bytes) -> FanOutCopy:
    return _fanout_decoder.decode(body)


def decode_reply(body: bytes) -> V1MultiLLMChatCompletion:
    return _reply_decoder.decode(body)


def decode_chunk(body: bytes) -> V1ChatCompletionChunk:
    return _decoded(_chunk_decoder, body)


def decode_status(body: bytes) -> RpcStatus:
    return _status_decoder.decode(body)


def decode_record(body: bytes | str) -> LLMLogRecord:
    return _record_decoder.decode(body)


def checked_score(score: V1Score) -> V1Score:
    """`score` as a worker will read it, checked as a worker checks it (a Struct built in Python
    skips the limits of its fields' types).

    Raises:
        msgspec.ValidationError: (a ValueError) the score cannot be stored; the message names why.
    """
    return _score_decoder.decode(_encoder.encode(score))
