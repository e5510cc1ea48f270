"""What an OpenAI-compatible endpoint answers, decoded with msgspec into Structs of our own: only
the fields we keep, skipping the SDK's pydantic models (providers/openai_compat.py says why).

A completion is one JSON body (`decode_completion`); a streamed answer is server-sent events of
completion chunks, each decoded as it comes (`events`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

import httpx2
import msgspec
import openai
from msgspec import Meta, Struct

from multillm.errors import Code, ProviderError
from multillm.schemas import ToolCall


# OpenAI's response body (snake_case), only what we keep. `ToolCall`'s fields are
# single words, so its camelCase wire names are OpenAI's too.
class Message(Struct):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(Struct):
    index: int = 0
    message: Message = msgspec.field(default_factory=Message)
    finish_reason: str | None = None


# What the sinks' integer columns hold: a provider that reports more is refused at the door
# (an error record, code 13), instead of making a record no sink can store.
_TokenCount = Annotated[int, Meta(ge=0, le=2**63 - 1)]


class PromptDetails(Struct):
    cached_tokens: _TokenCount | None = None


class CompletionDetails(Struct):
    reasoning_tokens: _TokenCount | None = None


class Usage(Struct):
    prompt_tokens: _TokenCount = 0
    completion_tokens: _TokenCount = 0
    total_tokens: _TokenCount = 0
    prompt_tokens_details: PromptDetails | None = None
    completion_tokens_details: CompletionDetails | None = None


class Completion(Struct):
    id: str = ""
    model: str = ""
    choices: list[Choice] = msgspec.field(default_factory=list)
    usage: Usage | None = None


_completion_decoder: Final = msgspec.json.Decoder(Completion)


# A streamed answer's events (`chat.completion.chunk`), only what we keep.
class Delta(Struct):
    content: str | None = None


class ChunkChoice(Struct):
    index: int = 0
    delta: Delta = msgspec.field(default_factory=Delta)
    finish_reason: str | None = None


class StreamError(Struct):
    message: str = "the provider's stream reported an error"


class Chunk(Struct):
    id: str = ""
    model: str = ""
    choices: list[ChunkChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    # An error event in the middle of a stream (the SDK raises `openai.APIError` for it too).
    error: StreamError | None = None


_chunk_decoder: Final = msgspec.json.Decoder(Chunk)


def decode_completion(body: bytes) -> Completion:
    try:
        return _completion_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Not retried: a provider that answers 200 with garbage will most likely do it again.
        raise ProviderError(Code.INTERNAL, f"the provider's answer is not a chat completion: {exc}") from None


async def events(lines: AsyncIterator[str], request: Any) -> AsyncIterator[Chunk]:
    """The chunks of a server-sent event stream, up to `[DONE]`.

    Raises:
        ProviderError: INTERNAL, an event is not a chat completion chunk.
        openai.APIError: the stream reported an error (as the SDK's own stream raises it).
        openai.APIConnectionError: the connection broke mid-stream (retried, as a failed connect).
    """
    events = _event_data(lines)
    while True:
        try:
            event = await anext(events)
        except StopAsyncIteration:
            return
        except httpx2.TransportError as exc:
            raise openai.APIConnectionError(message="the provider's stream broke off", request=request) from exc
        if event == "[DONE]":
            return
        try:
            chunk = _chunk_decoder.decode(event)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProviderError(Code.INTERNAL, f"the provider's stream is not chat completion chunks: {exc}") from None
        if chunk.error is not None:
            raise openai.APIError(chunk.error.message, request, body=None)
        yield chunk


async def _event_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event: its `data:` lines joined; other fields are not read."""
    data: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield "\n".join(data)
            data = []
    if data:  # the last event, when the body ends without the blank line after it
        yield "\n".join(data)
