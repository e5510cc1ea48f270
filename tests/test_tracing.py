"""OpenTelemetry traces across the queue: the caller's process and the workers' export to a real OTLP/HTTP
receiver (protobuf decoded with OpenTelemetry's own generated classes), and one request is one trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pika
import pytest

from multillm import tracing
from multillm.errors import ConfigError
from multillm.testbed.otlp import OtlpReceiver, ReceivedSpan
from tests.conftest import StartWorker

MODELS = ["mock/echo", "mock/upper", "mock/reverse"]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started


def otel_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    # Spans out 50 ms after they end, not 5 s: the test waits for them.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50", **extra}


CALLER = textwrap.dedent(
    """
    import sys
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from multillm import Client, make_request

    # The caller's own tracing, as a service that runs OpenTelemetry has it.
    provider = TracerProvider(resource=Resource.create({"service.name": "caller-service"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    with trace.get_tracer("caller").start_as_current_span("handle chat turn"), Client(sys.argv[1]) as client:
        reply = client.create(make_request(sys.argv[2].split(","), "trace me"), timeout=30)
    provider.shutdown()
    print(reply.text)
    """
)


def by_name(spans: list[ReceivedSpan], name: str, service: str | None = None) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name and (service is None or s.service == service)]


def test_one_request_to_three_models_is_one_trace_across_the_processes(
    start_worker: StartWorker, broker_url: str, receiver: OtlpReceiver
) -> None:
    env = otel_env(receiver)
    start_worker("primary", env=env)
    for model in MODELS[1:]:
        start_worker("model", model=model, env=env)
    caller = subprocess.run(
        [sys.executable, "-c", CALLER, broker_url, ",".join(MODELS)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert caller.returncode == 0, caller.stderr
    assert caller.stdout.strip() == "echo says: trace me"

    def complete(spans: list[ReceivedSpan]) -> bool:
        return len(by_name(spans, "write llm_logs")) == 3 and len(by_name(spans, "publish amq.default")) == 1

    spans = receiver.wait_for(complete)
    [turn] = by_name(spans, "handle chat turn", "caller-service")
    assert {s.trace_id for s in spans} == {turn.trace_id}  # one trace, every process
    ids = {s.span_id: s for s in spans}

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        return ids[span.parent_span_id]

    [publish] = by_name(spans, "publish multillm.requests", "caller-service")
    assert (publish.kind, parent(publish)) == ("PRODUCER", turn)
    [process] = by_name(spans, "process multillm.requests", "multillm-worker-primary")
    assert (process.kind, parent(process)) == ("CONSUMER", publish)
    assert process.attributes["messaging.system"] == "rabbitmq"
    assert process.attributes["messaging.rabbitmq.settlement"] == "ack"

    # The primary's own call: a GenAI client span with the semantic conventions' attributes.
    [chat] = by_name(spans, "chat echo")
    assert (chat.kind, chat.service, parent(chat)) == ("CLIENT", "multillm-worker-primary", process)
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.provider.name"] == "mock"
    assert chat.attributes["gen_ai.request.model"] == "echo"
    assert chat.attributes["gen_ai.response.id"].startswith("chatcmpl-")
    assert (chat.attributes["gen_ai.usage.input_tokens"], chat.attributes["gen_ai.usage.output_tokens"]) == (2, 4)
    assert "gen_ai.input.messages" not in chat.attributes  # content only when the operator opts in
    [reply] = by_name(spans, "publish amq.default")
    assert (reply.kind, parent(reply)) == ("PRODUCER", process)

    # Each other model: its copy's publish in the primary, then its worker's processing and call.
    copies = by_name(spans, "publish multillm.models", "multillm-worker-primary")
    assert sorted(c.attributes["messaging.rabbitmq.destination.routing_key"] for c in copies) == sorted(MODELS[1:])
    for copy in copies:
        model = copy.attributes["messaging.rabbitmq.destination.routing_key"]
        assert parent(copy) == process
        [consumed] = by_name(spans, f"process multillm.model.{model}", "multillm-worker-model")
        assert parent(consumed) == copy
        [called] = by_name(spans, f"chat {model.removeprefix('mock/')}")
        assert parent(called) == consumed and called.attributes["gen_ai.usage.output_tokens"] == 4
    writes = by_name(spans, "write llm_logs")
    assert all(
        w.attributes["db.collection.name"] == "llm_logs" and w.attributes["multillm.written"] == "new" for w in writes
    )
    assert {parent(w).name for w in writes} == {
        "process multillm.requests",
        *(f"process multillm.model.{m}" for m in MODELS[1:]),
    }
    assert not any(s.error for s in spans)


def test_a_raw_callers_traceparent_is_continued_and_content_only_when_asked(
    start_worker: StartWorker, raw_channel: pika.adapters.blocking_connection.BlockingChannel, receiver: OtlpReceiver
) -> None:
    worker = start_worker(
        "primary",
        env=otel_env(receiver, OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true", MULTILLM_LOG_LEVEL="debug"),
    )
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    raw_channel.basic_publish(
        "multillm.requests",
        "multillm.requests",
        b'{"models": [{"name": "mock/echo"}], "messages": [{"role": "user", "content": "raw"}]}',
        pika.BasicProperties(
            message_id="raw-traced", headers={"traceparent": f"00-{trace_id}-{span_id}-01", "tracestate": "vendor=1"}
        ),
    )
    spans = receiver.wait_for(lambda spans: bool(by_name(spans, "process multillm.requests")))
    [process] = by_name(spans, "process multillm.requests")
    assert (process.trace_id, process.parent_span_id) == (trace_id, span_id)
    [chat] = by_name(receiver.wait_for(lambda spans: bool(by_name(spans, "chat echo"))), "chat echo")
    assert chat.trace_id == trace_id
    assert '"content":"raw"' in chat.attributes["gen_ai.input.messages"]
    assert '"content":"echo says: raw"' in chat.attributes["gen_ai.output.messages"]
    # The worker's log lines about the request name its trace and span: a line leads to the trace.
    lines = [json.loads(line) for line in worker.log_text().splitlines() if line.startswith("{")]
    about = [line for line in lines if line.get("request_id") == "raw-traced"]
    assert about and all(line["trace_id"] == trace_id for line in about)
    assert {line["span_id"] for line in about} <= {s.span_id for s in receiver.spans()}


@pytest.mark.parametrize(
    "switch", [{}, {"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}], ids=["on", "disabled", "none"]
)
def test_nothing_goes_out_when_the_environment_says_no(
    start_worker: StartWorker, broker_url: str, receiver: OtlpReceiver, switch: dict[str, str]
) -> None:
    from multillm.producers import Client, make_request

    worker = start_worker("primary", env=otel_env(receiver, **switch))
    with Client(broker_url, timeout=30) as client:
        assert client.create(make_request(["mock/echo"], "hello")).text == "echo says: hello"
    # A worker that exports sends what it still holds as it stops: once stopped, it has sent all.
    assert worker.stop() == 0
    assert (receiver.count > 0) is (not switch)


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True),
    ],
)
def test_when_the_environment_asks_for_traces(environ: dict[str, str], wanted: bool) -> None:
    assert tracing.wanted(environ) is wanted


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "'grpc'"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "'zipkin'"),
    ],
)
def test_what_cannot_be_exported_is_a_configuration_error(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        tracing.wanted(environ)
