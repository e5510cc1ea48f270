"""The mock's wire: its control protocol (faults, calls) and the part of OpenAI's chat API it speaks."""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec
from msgspec import Meta, Struct

DROP: Final = 0
# How many calls `/_mock/calls` keeps, the latest.
MAX_LOGGED_CALLS: Final = 100_000
Status = Annotated[int, Meta(ge=0, le=599)]


# --- the control protocol ----------------------------------------------------


class Fault(Struct, kw_only=True, forbid_unknown_fields=True):
    """What `POST /_mock/faults` takes: how the next calls of one model are answered.

    `statuses` are answered in order, then `always` for ever (or normal answers); a
    status is 0 (close the socket without answering) or an HTTP status from 200 on.
    `drop_connection` puts one dropped connection before `statuses`. `retry_after`
    (seconds) and `retry_after_ms` become headers of the error answers; `latency_ms`
    replaces the server's latency for this model; `echo_auth` puts the caller's bearer
    token in error messages (to test that it gets scrubbed). `error_rate` makes each
    call after those fail at random, with one of `error_statuses` (0 = drop), from a
    generator seeded with `seed` (for chaos runs). For a streamed answer (`"stream": true`),
    `token_delay_ms` replaces the server's delay between tokens, and `cut_after_tokens` resets
    the connection after that many tokens (a stream cut mid-answer; a status fails the call
    before the first token), in the first `cut_streams` streamed answers (None: in every one).
    Setting a model's fault replaces the one it had.
    """

    model: str
    statuses: list[Status] = msgspec.field(default_factory=list)
    always: Status | None = None
    retry_after: Annotated[float, Meta(ge=0)] | None = None
    retry_after_ms: Annotated[int, Meta(ge=0)] | None = None
    latency_ms: Annotated[float, Meta(ge=0)] | None = None
    drop_connection: bool = False
    echo_auth: bool = False
    error_rate: Annotated[float, Meta(ge=0, le=1)] = 0.0
    error_statuses: list[Status] = msgspec.field(default_factory=lambda: [500])
    seed: int = 0
    token_delay_ms: Annotated[float, Meta(ge=0)] | None = None
    cut_after_tokens: Annotated[int, Meta(ge=0)] | None = None
    cut_streams: Annotated[int, Meta(ge=0)] | None = None


class MockCall(Struct, kw_only=True):
    """One call the mock served, as `GET /_mock/calls` lists it (the last 100,000).

    `id` is the `chatcmpl-` id of a completion (None for errors), `status` 0 a dropped
    connection, `auth_sha256` the SHA-256 of the bearer token (never the token itself),
    `prompt` the last user message's text (None for an undecodable request).
    """

    id: str | None
    model: str | None
    status: int
    auth_sha256: str | None
    prompt: str | None


# --- OpenAI's wire, only the fields the mock reads or writes -------------------


class _Part(Struct):
    type: str = "text"
    text: str | None = None


class _InMessage(Struct):
    role: str
    content: str | list[_Part] | None = None


class _StreamOptions(Struct):
    include_usage: bool = False


class _ChatRequest(Struct):
    model: str
    messages: Annotated[list[_InMessage], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None


class _OutMessage(Struct):
    content: str
    role: str = "assistant"


class _Choice(Struct):
    message: _OutMessage
    finish_reason: str
    index: int = 0


class _PromptDetails(Struct):
    cached_tokens: int


class _Usage(Struct, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # As if the provider cached the conversation before its last message: a rule the tests
    # can predict, so that cached-token pricing is tested through the wire.
    prompt_tokens_details: _PromptDetails | None = None


class _Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[_Choice]
    usage: _Usage
    object: str = "chat.completion"


class _Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class _ChunkChoice(Struct):
    delta: _Delta
    finish_reason: str | None = None
    index: int = 0


class _Chunk(Struct, omit_defaults=True):
    """One server-sent event of a streamed answer (OpenAI's `chat.completion.chunk`)."""

    id: str
    created: int
    model: str
    choices: list[_ChunkChoice]
    usage: _Usage | None = None
    object: str = "chat.completion.chunk"


def _pieces(content: str) -> list[str]:
    """The streamed tokens of `content`: its words, each but the last with the space after it,
    so that the deltas joined are `content` again."""
    words = content.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


class _ErrorDetail(Struct):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class _ErrorBody(Struct):
    error: _ErrorDetail


_encoder: Final = msgspec.json.Encoder()
_chat_decoder: Final = msgspec.json.Decoder(_ChatRequest)
_fault_decoder: Final = msgspec.json.Decoder(Fault)
_calls_decoder: Final = msgspec.json.Decoder(list[MockCall])

_ERROR_TYPES: Final = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_exceeded",
}


def _text(message: _InMessage) -> str:
    if isinstance(message.content, list):
        return " ".join(p.text for p in message.content if p.text)
    return message.content or ""


def _prompt(request: _ChatRequest) -> str:
    """The text of the last user message."""
    return next((_text(m) for m in reversed(request.messages) if m.role == "user"), "")


# The tags around the two answers in the judge's default prompt (workers/judging.py).
_JUDGED: Final = re.compile(r"<answer_a>(.*?)</answer_a>.*<answer_b>(.*?)</answer_b>", re.DOTALL)
# In the judged conversation: the mock judge picks whichever answer it is shown first.
POSITION_BIASED: Final = "[judge:first]"


def _verdict(prompt: str) -> str | None:
    """The mock judge's verdict, for a prompt holding two tagged answers: the one with more capital
    letters wins ("the louder answer"), a tie when they have as many; with `POSITION_BIASED` in the
    prompt, always the first shown. None: not a judge's prompt."""
    judged = _JUDGED.search(prompt)
    if judged is None:
        return None
    if POSITION_BIASED in prompt:
        winner, reason = "A", "the first answer, as always"
    else:
        a, b = (sum(c.isupper() for c in answer) for answer in judged.groups())
        winner = "A" if a > b else "B" if b > a else "tie"
        reason = f"capital letters: {a} in A, {b} in B"
    return msgspec.json.encode({"winner": winner, "reason": reason}).decode()


def _answer(request: _ChatRequest) -> tuple[str, str, _Usage]:
    """The deterministic content, finish reason and usage (tokens are whitespace words; those of every
    message before the last are reported as cached)."""
    prompt = _prompt(request)
    words = prompt.split()
    if (verdict := _verdict(prompt)) is not None:
        prompt_tokens = sum(len(_text(m).split()) for m in request.messages)
        return verdict, "stop", _Usage(prompt_tokens, len(verdict.split()), prompt_tokens + len(verdict.split()))
    if request.model == "reverse":
        words.reverse()
    elif request.model == "upper":
        words = [w.upper() for w in words]
    out = [request.model, "says:", *words]
    limit = request.max_completion_tokens or request.max_tokens
    finish = "stop"
    if limit is not None and len(out) > limit:
        out, finish = out[:limit], "length"
    prompt_tokens = sum(len(_text(m).split()) for m in request.messages)
    cached = sum(len(_text(m).split()) for m in request.messages[:-1])
    details = _PromptDetails(cached) if cached else None
    return " ".join(out), finish, _Usage(prompt_tokens, len(out), prompt_tokens + len(out), details)
