"""Wire types: camelCase round trips, and validation errors that name the field."""

from __future__ import annotations

import msgspec
import pytest

from multillm import schemas
from multillm.errors import Code, InvalidArgument, RpcError, Unavailable
from multillm.producers import make_request
from multillm.schemas import (
    FanOutCopy,
    LLMLogRecord,
    RpcStatus,
    V1ChatCompletion,
    V1ChatCompletionMessage,
    V1Choice,
    V1Model,
    V1MultiLLMChatCompletion,
    V1Tracing,
    V1Usage,
)

GOOD = (
    b'{"models": [{"name": "openai/gpt-4o-mini", "temperature": 0.2, "maxTokens": 64, "apiKey": "sk-x"},'
    b' {"name": "mock/echo"}], "messages": [{"role": "system", "content": "be brief"},'
    b' {"role": "user", "content": "hi"}], "displayModel": 1, "userId": "u1", "mode": "MODE_TEST",'
    b' "tracing": {"sessionId": "s", "traceId": "t", "spanId": "p"},'
    b' "logAttributes": [{"key": "k", "value": "v"}], "someFutureField": 1}'
)


def test_request_round_trip_keeps_camel_case_wire_names() -> None:
    request = schemas.decode_request(GOOD)
    assert request.display_model == 1 and request.primary.name == "mock/echo"
    assert request.models[0].max_tokens == 64 and request.user_id == "u1"
    assert request.tracing == V1Tracing(session_id="s", trace_id="t", span_id="p")
    wire = msgspec.json.decode(schemas.encode(request))
    assert set(wire) == {"models", "messages", "displayModel", "userId", "mode", "tracing", "logAttributes"}
    assert wire["models"][0]["maxTokens"] == 64
    assert schemas.decode_request(schemas.encode(request)) == request


def test_defaults_and_stored_mode() -> None:
    request = schemas.decode_request(b'{"models": [{"name": "a/b"}], "messages": [{"role": "user", "content": "x"}]}')
    assert request.display_model == 0 and request.mode == "MODE_UNSPECIFIED"
    assert request.stored_mode == "MODE_PROD"
    assert request.log_attributes == [] and request.tracing is None


def test_reply_and_status_round_trip() -> None:
    reply = V1MultiLLMChatCompletion(
        id="log-1",
        primary_external_id="chatcmpl-1",
        model_names=["a/b", "c/d"],
        display_model=0,
        tracing=V1Tracing(trace_id="t"),
        completion=V1ChatCompletion(
            id="log-1",
            external_id="chatcmpl-1",
            model="a/b",
            choices=[V1Choice(index=0, message=V1ChatCompletionMessage(content="yo"), finish_reason="stop")],
            usage=V1Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        ),
    )
    wire = msgspec.json.decode(schemas.encode(reply))
    assert wire["primaryExternalId"] == "chatcmpl-1" and wire["modelNames"] == ["a/b", "c/d"]
    assert wire["completion"]["externalId"] == "chatcmpl-1"
    assert wire["completion"]["choices"][0]["finishReason"] == "stop"
    assert wire["completion"]["usage"] == {"promptTokens": 1, "completionTokens": 2, "totalTokens": 3}
    assert schemas.decode_reply(schemas.encode(reply)) == reply
    status = RpcStatus(code=14, message="down")
    assert msgspec.json.decode(schemas.encode(status)) == {"code": 14, "message": "down", "details": []}
    assert schemas.decode_status(b'{"code": 3, "message": "bad", "details": []}').code == 3


def test_fanout_copy_and_record_round_trip() -> None:
    request = schemas.decode_request(GOOD)
    copy = FanOutCopy(request_id="r1", model_index=0, request=request, deadline_ms=123)
    wire = msgspec.json.decode(schemas.encode(copy))
    assert wire["requestId"] == "r1" and wire["modelIndex"] == 0 and wire["deadlineMs"] == 123
    assert schemas.decode_fanout(schemas.encode(copy)) == copy
    record = LLMLogRecord(log_id="l", request_id="r1", model_name="a/b", model_index=0, is_primary=True)
    assert "log_id" in msgspec.json.decode(schemas.encode(record))
    assert schemas.decode_record(schemas.encode(record)) == record


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"models": [], "messages": [{"role": "user", "content": "x"}]}', "`$.models`"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "missing required field `models`"),
        (b'{"models": [{"name": "a/b"}]}', "missing required field `messages`"),
        (
            b'{"models": [{"name": "a/b"}], "messages": [{"role": "user", "content": "x"}], "displayModel": 1}',
            "displayModel 1 is out of range for 1 model(s)",
        ),
        (
            b'{"models": [{"name": "a/b"}], "messages": [{"role": "user", "content": "x"}], "displayModel": -1}',
            "`$.displayModel`",
        ),
        (
            b'{"models": [{"name": "a/b"}], "messages": [{"role": "user", "content": "x"}], "displayModel": "0"}',
            "Expected `int`, got `str` - at `$.displayModel`",
        ),
        (
            b'{"models": [{"name": "no-provider"}], "messages": [{"role": "user", "content": "x"}]}',
            "model name 'no-provider' must be `provider/model`",
        ),
        (  # 190 CJK characters: under the 200 characters, but 575 bytes; a routing key holds 255
            b'{"models": [{"name": "a/b"}, {"name": "mock/' + "\u4e2d".encode() * 190 + b'"}], "messages": []}',
            "is 575 bytes in UTF-8, over 240 (its queue name must fit AMQP's 255 bytes) - at `$.models[1]`",
        ),
        (
            b'{"models": [{"name": "mock/a b"}], "messages": [{"role": "user", "content": "x"}]}',
            "contains U+0020 at character 6",
        ),
        (
            b'{"models": [{"name": "mock/a\\u0000b"}], "messages": [{"role": "user", "content": "x"}]}',
            "model name 'mock/a\\x00b' contains U+0000 at character 6",
        ),
        (
            b'{"models": [{"name": "mock/gpt\\u202e4o"}], "messages": [{"role": "user", "content": "x"}]}',
            "model name 'mock/gpt\\u202e4o' contains U+202E at character 8",
        ),
        (
            b'{"models": [{"name": "a/' + b"x" * 199 + b'"}], "messages": [{"role": "user", "content": "x"}]}',
            "Expected `str` of length <= 200 - at `$.models[0].name`",
        ),
        (
            b'{"models": [{"name": "a/b"}], "messages": [{"role": "user", "content": "x"}], "userId": "u\\u0000"}',
            "`userId` has NUL (U+0000) at character 1, which no sink can store",
        ),
        (
            b'{"models": [{"name": "a/b"}], "messages": [{"role": "user", "content": "x"}],'
            b' "tracing": {"sessionId": "\\u0000"}}',
            "`sessionId` has NUL (U+0000) at character 0, which no sink can store - at `$.tracing`",
        ),
        (
            b'{"models": [{"name": "a/b", "temperature": 9}], "messages": [{"role": "user", "content": "x"}]}',
            "`$.models[0].temperature`",
        ),
        (
            b'{"models": [{"name": "a/b"}], "messages": [{"role": "robot", "content": "x"}]}',
            "`$.messages[0].role`",
        ),
        (
            b'{"models": [{"name": "a/b"}], "messages": [{"role": "user", "content": "x"}], "mode": "LIVE"}',
            "`$.mode`",
        ),
        (  # a number no sink's integer column can hold
            b'{"models": [{"name": "a/b", "maxTokens": 18446744073709551615}], "messages": []}',
            "Expected `int` <= 2147483647 - at `$.models[0].maxTokens`",
        ),
        (  # msgspec alone says "truncated"
            b'{"models": [{"name": "a/b"}], "messages": [{"role": "user", "content": "\\ud800x"}]}',
            "\\ud800 at byte 72 is half of a UTF-16 surrogate pair, not text",
        ),
        (
            b'{"models": [{"name": "a/b"}], "messages": [{"role": "user", "content": "x\\udc00"}]}',
            "\\udc00 at byte 73 is half of a UTF-16 surrogate pair, not text",
        ),
        (b"[1, 2]", "Expected `object`, got `array`"),
        (b'{"models": [{"name": "a/b"}], "messages": [', "truncated"),
        (b"\xff\xfe", "malformed"),
        (b'{"models": [{"name": "a/\xff"}], "messages": []}', "JSON is malformed: not UTF-8 at byte 24"),
    ],
)
def test_invalid_requests_raise_errors_naming_the_problem(body: bytes, expected: str) -> None:
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)) as caught:
        schemas.decode_request(body)
    assert expected in str(caught.value)


@pytest.mark.parametrize("key", ["sk-SECRET\\n", "sk-\\u0000x", "sk SECRET", "sk-\\u00e9"])
def test_an_api_key_no_http_header_can_carry_is_refused_without_echoing_it(key: str) -> None:
    body = '{"models": [{"name": "a/b", "apiKey": "KEY"}], "messages": [{"role": "user", "content": "x"}]}'
    body = body.replace("KEY", key)
    with pytest.raises(msgspec.ValidationError) as caught:
        schemas.decode_request(body.encode())
    assert "`$.models[0].apiKey`" in str(caught.value) and "SECRET" not in str(caught.value)


def test_api_key_is_hidden_from_repr_but_kept_for_the_call() -> None:
    model = V1Model(name="openai/gpt-4o", api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(model)
    assert "sk-very-secret" not in repr(make_request([model], "hi"))
    assert model.api_key == "sk-very-secret" and model.without_key().api_key is None
    assert model.provider == "openai" and model.provider_model == "gpt-4o"


def test_make_request_checks_what_it_is_given() -> None:
    with pytest.raises(ValueError, match="at least one model"):
        make_request([], "hi")
    with pytest.raises(ValueError, match="out of range"):
        make_request(["a/b"], "hi", display_model=3)


def test_rpc_errors_are_typed_by_code() -> None:
    assert isinstance(RpcError.from_status(RpcStatus(code=Code.UNAVAILABLE, message="x")), Unavailable)
    error = RpcError.from_status(RpcStatus(code=Code.INVALID_ARGUMENT, message="bad field"))
    assert isinstance(error, InvalidArgument) and error.code == 3 and "bad field" in str(error)
    assert type(RpcError.from_status(RpcStatus(code=99, message="?"))) is RpcError


@pytest.mark.parametrize(
    "body",
    [
        b'{"models": [{"name": "a/b", "apiKey": "sk-SECRET-1"}]}',
        b'{"models": [{"name": "a/b", "api\\u004bey": "sk-SECRET-1"}]}',
        b'{"models": [{"apiKey" :  "sk-SECRET-1", "name": "a/b"}], "messages": [',
        b'{"models": [{"name": "a/b", "apiKey": "sk-SECRET-1',
        b'{"models": [{"name": "a/b", "apiKey": "sk-SECRET-1\\"quoted\\""}]}',
    ],
)
def test_redact_body_masks_keys_however_they_are_spelled(body: bytes) -> None:
    from multillm.redact import redact_body

    masked = redact_body(body)
    assert b"SECRET" not in masked and b'"***"' in masked
    assert b'"name": "a/b"' in masked
