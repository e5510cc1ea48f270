"""Fixpoint's own generated client (`fixpoint-openapi` 0.4.0) talks to the pipeline unchanged.

Nothing of ours is on the caller's side: requests are built and encoded by Fixpoint's pydantic
models, published and read with raw pika, and replies, error replies and the records' JSON are
parsed by Fixpoint's models. Our code runs only in the worker processes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fixpoint_openapi.models as fp
import pika
import pytest

from multillm.mock_llm import MockControl
from multillm.sinks import Sink
from tests.conftest import StartWorker, wait_for_records

# Spelled here as Fixpoint's API and AMQP spell them, not taken from our contract module:
# this file checks that module against the outside world.
REQUEST_EXCHANGE = "multillm.requests"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
MODES = [None, fp.V1Mode.MODE_UNSPECIFIED, fp.V1Mode.MODE_TEST, fp.V1Mode.MODE_STAGING, fp.V1Mode.MODE_PROD]


class RawCaller:
    """A caller on raw pika: one exclusive reply queue, publishes with reply_to and correlation_id."""

    def __init__(self, broker_url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.reply_queue = self.channel.queue_declare("", exclusive=True).method.queue

    def publish(self, body: str, request_id: str, *, headers: dict[str, Any] | None = None) -> str:
        correlation_id = "corr-" + request_id
        self.channel.basic_publish(
            REQUEST_EXCHANGE,
            "multillm.requests",
            body.encode(),
            pika.BasicProperties(
                message_id=request_id,
                correlation_id=correlation_id,
                reply_to=self.reply_queue,
                content_type="application/json",
                delivery_mode=2,
                type="V1CreateMultiLLMChatCompletionRequest",
                headers=headers,
            ),
            mandatory=True,
        )
        return correlation_id

    def replies(self, count: int, timeout: float = 30.0) -> dict[str, tuple[pika.BasicProperties, str]]:
        """`count` replies by correlation id, each with its AMQP properties and body."""
        got: dict[str, tuple[pika.BasicProperties, str]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(self.reply_queue, auto_ack=True)
            if method is None:
                self.connection.sleep(0.02)
                continue
            got[props.correlation_id] = (props, body.decode())
        assert len(got) == count, f"{len(got)} of {count} replies came"
        return got

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def caller(broker_url: str) -> Iterator[RawCaller]:
    opened = RawCaller(broker_url)
    yield opened
    opened.close()


def _request(
    mode: fp.V1Mode | None, display_model: int, with_tracing: bool
) -> fp.V1CreateMultiLLMChatCompletionRequest:
    return fp.V1CreateMultiLLMChatCompletionRequest(
        models=[
            fp.V1Model(name="mock/alpha", temperature=0.2, max_tokens=50),
            fp.V1Model(name="mock/beta", api_key="sk-fixpoint-secret-0123456789"),
        ],
        messages=[
            fp.V1InputMessage(role="system", content="Be brief."),
            fp.V1InputMessage(role="user", content=f"mode {mode} display {display_model}"),
        ],
        display_model=display_model,
        tracing=fp.V1Tracing(
            session_id="sess", trace_id="trace-" + uuid.uuid4().hex[:8], span_id="span-1", parent_span_id="span-0"
        )
        if with_tracing
        else None,
        user_id="user-7",
        mode=mode,
        log_attributes=[fp.V1LogAttribute(key="experiment", value="fixpoint")],
    )


def test_replies_to_fixpoint_requests_are_read_by_fixpoint_in_every_mode(
    start_worker: StartWorker, caller: RawCaller, sink: Sink, mock_control: MockControl
) -> None:
    start_worker("primary")
    start_worker("model", model="mock/alpha")
    start_worker("model", model="mock/beta")
    sent: dict[str, tuple[str, fp.V1CreateMultiLLMChatCompletionRequest]] = {}
    for number, mode in enumerate(MODES):
        for display_model in (0, 1):
            request = _request(mode, display_model, with_tracing=bool(number % 2) != bool(display_model))
            request_id = f"fp-{number}-{display_model}-{uuid.uuid4().hex[:6]}"
            sent[caller.publish(request.to_json(), request_id)] = (request_id, request)

    replies = caller.replies(len(sent))
    external_ids = {call.id for call in mock_control.calls()}
    for correlation_id, (props, body) in replies.items():
        request_id, request = sent[correlation_id]
        assert props.type == "V1MultiLLMChatCompletion" and props.content_type == "application/json"
        reply = fp.V1MultiLLMChatCompletion.from_json(body)
        assert reply is not None
        records = wait_for_records(sink, request_id, 2)
        primary = records[request.display_model or 0]
        assert primary.is_primary and primary.status == "ok"
        assert reply.id == primary.log_id == reply.completion.id
        assert reply.primary_external_id == primary.external_id == reply.completion.external_id
        assert reply.primary_external_id in external_ids
        assert reply.model_names == ["mock/alpha", "mock/beta"]
        assert reply.display_model == request.display_model
        assert reply.tracing == request.tracing
        expected_mode = fp.V1Mode.MODE_PROD if request.mode in (None, fp.V1Mode.MODE_UNSPECIFIED) else request.mode
        assert reply.mode == expected_mode
        assert {r.mode for r in records} == {expected_mode.value}
        completion = reply.completion
        assert completion.model == primary.model_name
        [choice] = completion.choices
        assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "stop"
        assert choice.message.content and choice.message.content.endswith(request.messages[1].content or "?")
        assert completion.usage.prompt_tokens == primary.prompt_tokens
        assert completion.usage.completion_tokens == primary.completion_tokens
        assert completion.usage.total_tokens == primary.total_tokens
        assert "sk-fixpoint-secret" not in body

        for record in records:
            # The records' JSON columns are Fixpoint's message and choice shapes, too.
            assert [fp.V1InputMessage.from_dict(json.loads(_json(m))) for m in record.messages] == request.messages
            [stored] = record.output or []
            assert fp.V1ChatCompletionChoice.from_json(_json(stored)) is not None
            assert record.user_id == "user-7"
            assert [(a.key, a.value) for a in record.log_attributes] == [("experiment", "fixpoint")]
            if request.tracing:
                assert record.trace_id == request.tracing.trace_id
                assert record.parent_span_id == request.tracing.span_id
        assert records[0].temperature == 0.2 and records[0].max_tokens == 50


def _json(struct: Any) -> str:
    from multillm.schemas import encode

    return encode(struct).decode()


def test_error_replies_are_read_by_fixpoint(
    start_worker: StartWorker, caller: RawCaller, sink: Sink, mock_control: MockControl
) -> None:
    start_worker("primary")
    mock_control.set_fault("down", always=503)
    cases = {
        "unknown-provider": (
            fp.V1CreateMultiLLMChatCompletionRequest(
                models=[fp.V1Model(name="nosuch/model")], messages=[fp.V1InputMessage(role="user", content="hi")]
            ).to_json(),
            None,
            3,
        ),
        "no-models": (
            fp.V1CreateMultiLLMChatCompletionRequest(messages=[fp.V1InputMessage(role="user", content="hi")]).to_json(),
            None,
            3,
        ),
        "not-json": ("{models", None, 3),
        "provider-down": (
            fp.V1CreateMultiLLMChatCompletionRequest(
                models=[fp.V1Model(name="mock/down")], messages=[fp.V1InputMessage(role="user", content="hi")]
            ).to_json(),
            None,
            14,
        ),
        "past-deadline": (
            fp.V1CreateMultiLLMChatCompletionRequest(
                models=[fp.V1Model(name="mock/alpha")], messages=[fp.V1InputMessage(role="user", content="hi")]
            ).to_json(),
            {"x-multillm-deadline": int(time.time() * 1000) - 1000},
            4,
        ),
    }
    by_correlation = {
        caller.publish(body, name, headers=headers): (name, code) for name, (body, headers, code) in cases.items()
    }

    for correlation_id, (props, body) in caller.replies(len(cases)).items():
        name, code = by_correlation[correlation_id]
        assert props.type == "RpcStatus", name
        status = fp.RpcStatus.from_json(body)
        assert status is not None and status.code == code, (name, body)
        assert status.message, name
        assert status.details is not None, name
        if name == "provider-down":
            [record] = wait_for_records(sink, name, 1)
            [detail] = status.details
            assert detail.type == ERROR_INFO
            assert detail.additional_properties["domain"] == "multillm"
            assert detail.additional_properties["metadata"] == {
                "logId": record.log_id,
                "attempts": str(record.attempts),
            }
            assert record.status == "error" and record.error_code == 14
        else:
            assert status.details == [], name
