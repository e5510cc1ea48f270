"""Reading a request off the wire: its id, its body (size, content type, encoding, JSON, providers), its deadline."""

from __future__ import annotations

from typing import TypeGuard

import msgspec
import pika

from multillm import contract
from multillm.errors import Code, InvalidArgument
from multillm.providers import Providers
from multillm.records import request_id_for
from multillm.schemas import V1CreateMultiLLMChatCompletionRequest, decode_request
from multillm.workers.messages import Delivery, too_large

_UTF8 = {"utf-8", "utf8"}
# kombu labels a bytes body "binary"; the others say the body is the JSON as is.
_ACCEPTED_ENCODINGS = {"", "identity", "binary", *_UTF8}


def read_request(
    delivery: Delivery, providers: Providers, max_body_bytes: int
) -> V1CreateMultiLLMChatCompletionRequest:
    """The request in `delivery`, every model of it served by a configured provider.

    Raises:
        InvalidArgument: what is wrong with it, in words fit for the error reply.
    """
    props, body = delivery.properties, delivery.body
    if reason := too_large(body, max_body_bytes):
        raise _invalid(f"request {reason}")
    media_type, _, params = (props.content_type or contract.CONTENT_TYPE).partition(";")
    charset = params.strip().lower().removeprefix("charset=") if params.strip() else "utf-8"
    if media_type.strip().lower() != contract.CONTENT_TYPE or charset not in _UTF8:
        raise _invalid(f"content_type {props.content_type!r} is not {contract.CONTENT_TYPE!r} in UTF-8")
    if (props.content_encoding or "").lower() not in _ACCEPTED_ENCODINGS:
        raise _invalid(f"content_encoding {props.content_encoding!r} is not supported; send UTF-8 JSON")
    try:
        request = decode_request(body)
    except msgspec.DecodeError as exc:  # a ValidationError is one too
        raise _invalid(f"invalid request: {exc}") from None
    for model in request.models:
        if not providers.has(model.provider):
            raise _invalid(
                f"unknown provider {model.provider!r} in model {model.name!r}"
                f" (configured: {', '.join(providers.names()) or 'none'})"
            )
    return request


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(Code.INVALID_ARGUMENT, message)


def request_id_of(delivery: Delivery) -> str:
    """The request's id: its message id, else its correlation id, else one derived from its body."""
    props = delivery.properties
    return request_id_for(props.message_id, props.correlation_id, delivery.body)


def deadline_of(props: pika.BasicProperties, received_ms: int) -> int | None:
    """The request's deadline (epoch ms): the earliest that its header and its AMQP `expiration` give.

    `expiration` counts from when the message entered the queue, which the worker cannot see:
    from the AMQP `timestamp` when the producer set one, and from `received_ms` in any case,
    an upper bound (the broker had not expired it yet).
    """
    candidates = []
    value = (props.headers or {}).get(contract.HEADER_DEADLINE)
    if _is_int(value):
        # pika decodes 64-bit header integers as its own int subclass; msgspec wants a plain int.
        candidates.append(int(value))
    expiration = props.expiration
    if isinstance(expiration, str) and expiration.isascii() and expiration.isdigit():
        ttl = int(expiration)
        candidates.append(received_ms + ttl)
        if _is_int(props.timestamp) and props.timestamp > 0:  # seconds since the epoch
            candidates.append(int(props.timestamp) * 1000 + ttl)
    return min(candidates, default=None)


def wants_stream(props: pika.BasicProperties) -> bool:
    """Whether the request asked for the primary's answer as it is written (header `x-multillm-stream`:
    AMQP boolean true, or the string "true" from a client that can only send strings)."""
    value = (props.headers or {}).get(contract.HEADER_STREAM)
    return value is True or (isinstance(value, str | bytes) and value.lower() in ("true", b"true"))


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
