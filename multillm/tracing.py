"""OpenTelemetry traces: a request's path through the queues, as the caller's tracing sees it.

W3C trace context (`traceparent`, `tracestate`) travels in AMQP headers. A `Client` sets it from
the caller's current span; a worker continues it from a delivery's headers and carries it on to
every message it publishes for that delivery (the fan-out copies, the reply, the records'
stream), so that one request to three models is one trace across every process it touched:

    publish multillm.requests                      (the caller, PRODUCER)
      process multillm.requests                    (the primary worker, CONSUMER)
        publish multillm.models                    (a fan-out copy, PRODUCER)
          process multillm.model.<name>            (that model's worker, CONSUMER)
            chat <model>                           (the model call, CLIENT, GenAI attributes)
            write llm_logs                         (its record)
        chat <model>                               (the primary's own call)
        write llm_logs
        publish amq.default                        (the reply, PRODUCER)

Spans follow OpenTelemetry's semantic conventions for messaging (RabbitMQ) and GenAI client
calls. Message content is kept off spans unless `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`
is `true`.

A worker or the `multillm` command exports spans (OTLP over HTTP, with the SDK's own exporter,
which reads the other `OTEL_EXPORTER_OTLP_*` variables) only when the environment asks: an
OTLP endpoint in `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
`OTEL_TRACES_EXPORTER=otlp`; never with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
Otherwise `ENABLED` is False and the workers' hot path does not touch OpenTelemetry at all.
The library side (`Client`) never configures the SDK: it uses whatever tracer provider the
application set, which is a no-op when it set none.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final

import msgspec
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from multillm.errors import ConfigError, ProviderError, code_name
from multillm.metrics import Published

if TYPE_CHECKING:
    import pika

    from multillm.providers import ModelCall, ModelResult
    from multillm.workers.messages import Outgoing

# Whether this process exports spans (`configure`). Read on every delivery: a module global, not a call.
ENABLED = False
# Whether model calls' spans hold their messages (`configure`, from ENV_CAPTURE_CONTENT).
CAPTURE_CONTENT = False

_TRACER_NAME: Final = "multillm"
_tracer = trace.get_tracer(_TRACER_NAME)
_provider: Any = None

ENV_CAPTURE_CONTENT: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
# RabbitMQ's name for the exchange whose name is "" (what a reply goes to).
DEFAULT_EXCHANGE: Final = "amq.default"
MESSAGING_SYSTEM: Final = "rabbitmq"


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces to be exported (see the module docstring).

    Raises:
        ConfigError: it asks for a protocol or an exporter this build cannot export with.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters == {"none"}:
        return False
    if exporters - {"otlp", "none"}:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']!r}: only otlp (or none) is supported")
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint and "otlp" not in exporters:
        return False
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol.strip().lower() != "http/protobuf":
        raise ConfigError(
            f"OTLP protocol {protocol!r}: multillm exports OTLP over HTTP (http/protobuf); point"
            " OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP port (4318)"
        )
    return True


def configure(service_name: str) -> bool:
    """Export this process's spans through OTLP when the environment asks; returns whether it does.

    `service_name` names the process (`service.name`) unless `OTEL_SERVICE_NAME` or
    `OTEL_RESOURCE_ATTRIBUTES` names it.

    Raises:
        ConfigError: as `wanted`.
    """
    global ENABLED, CAPTURE_CONTENT, _provider
    if ENABLED or not wanted():
        return ENABLED
    # Imported here: a process that exports nothing never loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; ours only when they name none.
    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create() if named else Resource.create({SERVICE_NAME: service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    CAPTURE_CONTENT = os.environ.get(ENV_CAPTURE_CONTENT, "").strip().lower() == "true"
    ENABLED = True
    return True


def shutdown() -> None:
    """Export what is left, then stop (at the process's end)."""
    global ENABLED, _provider
    provider, _provider = _provider, None
    ENABLED = False
    if provider is not None:
        provider.shutdown()


# --- messages ------------------------------------------------------------------


def consumed(queue: str, properties: pika.BasicProperties, body_size: int, redelivered: bool) -> Span:
    """The CONSUMER span of a delivery's processing, a child of the context its headers carry."""
    parent = propagate.extract(properties.headers or {})
    # Few attributes: the SDK checks each one's value, a good part of a span's cost.
    attributes: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": queue,
        "messaging.message.body.size": body_size,
    }
    if redelivered:
        attributes["multillm.redelivered"] = True
    if properties.message_id:
        attributes["messaging.message.id"] = properties.message_id
    if properties.correlation_id:
        attributes["messaging.message.conversation_id"] = properties.correlation_id
    return _tracer.start_span(f"process {queue}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes)


def settled(span: Span, outcome: str) -> None:
    """End a delivery's span: `ack` or `requeue` (an error status), or `lost` (its connection went)."""
    span.set_attribute("messaging.rabbitmq.settlement", outcome)
    if outcome != "ack":
        span.set_status(Status(StatusCode.ERROR, outcome))
    span.end()


def publishing(message: Outgoing) -> Span | None:
    """The PRODUCER span of one publish, in the current context, its context put into the message's
    headers (`traceparent`) so that whoever consumes the message continues the trace.

    A record for the records' stream gets the current context without a span of its own (the
    judge continues the trace from it; a span each would add a fifth to a request's spans), and
    a chunk of a streamed answer gets neither (one a token would drown the trace)."""
    if message.kind is Published.CHUNK:
        return None
    props = message.properties
    if message.kind is Published.RECORD:
        props.headers = _with_context(props.headers, None)
        return None
    name, attributes = _publish_span(message.exchange, message.routing_key, props.message_id, None)
    span = _tracer.start_span(name, kind=SpanKind.PRODUCER, attributes=attributes)
    props.headers = _with_context(props.headers, span)
    return span


def _publish_span(
    exchange: str, routing_key: str, message_id: str | None, correlation_id: str | None
) -> tuple[str, dict[str, Any]]:
    """The name and attributes of a publish's span (semantic conventions for RabbitMQ)."""
    destination = exchange or DEFAULT_EXCHANGE
    attributes: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": destination,
        "messaging.rabbitmq.destination.routing_key": routing_key,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    if correlation_id:
        attributes["messaging.message.conversation_id"] = correlation_id
    return f"publish {destination}", attributes


def _with_context(headers: dict[str, Any] | None, span: Span | None) -> dict[str, Any]:
    """`headers` and the trace context of `span` (the current one when None)."""
    out = dict(headers or {})
    propagate.inject(out, context=None if span is None else trace.set_span_in_context(span))
    return out


def published(span: Span, result: str) -> None:
    """End a publish's span once the broker answered: `ok`, `unroutable` or `refused`."""
    if result != "ok":
        span.set_status(Status(StatusCode.ERROR, result))
    span.end()


@contextlib.contextmanager
def client_publish(
    exchange: str, routing_key: str, message_id: str, correlation_id: str | None, headers: dict[str, Any]
) -> Iterator[None]:
    """A `Client`'s publish: a PRODUCER span of the application's tracer provider (a no-op when it set
    none), in the caller's current context, whose context goes into `headers`."""
    name, attributes = _publish_span(exchange, routing_key, message_id, correlation_id)
    with _tracer.start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes):
        propagate.inject(headers)
        yield


def log_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: `trace_id` and `span_id` of the current span on every line, so that a
    log line leads to its trace (OpenTelemetry's hex forms). Nothing when this process exports no traces."""
    if ENABLED:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event.setdefault("trace_id", format(context.trace_id, "032x"))
            event.setdefault("span_id", format(context.span_id, "016x"))
    return event


def active(span: Span | None) -> contextlib.AbstractContextManager[Any]:
    """`span` as the current span within (nothing when None)."""
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(span, end_on_exit=False)


# --- model calls and records ----------------------------------------------------------


def model_call(provider: str, call: ModelCall, base_url: str) -> Span:
    """The GenAI CLIENT span of one model call (its retries inside), in the current context."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": call.model,
    }
    if call.temperature is not None:
        attributes["gen_ai.request.temperature"] = call.temperature
    if call.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = call.max_tokens
    host, port = _server(base_url)
    if host:
        attributes["server.address"] = host
    if port:
        attributes["server.port"] = port
    if CAPTURE_CONTENT:
        messages = [
            {"role": m.role, "parts": [{"type": "text", "content": m.content if isinstance(m.content, str) else ""}]}
            for m in call.messages
        ]
        attributes["gen_ai.input.messages"] = msgspec.json.encode(messages).decode()
    return _tracer.start_span(f"chat {call.model}", kind=SpanKind.CLIENT, attributes=attributes)


def model_answered(span: Span, outcome: ModelResult | ProviderError) -> None:
    """End a model call's span with what it got: the response's id and usage, or the error's code."""
    span.set_attribute("multillm.attempts", outcome.attempts)
    if isinstance(outcome, ProviderError):
        span.set_attribute("error.type", code_name(outcome.code))
        span.set_status(Status(StatusCode.ERROR, outcome.message[:500]))
        span.end()
        return
    span.set_attribute("gen_ai.response.id", outcome.external_id)
    if outcome.usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", outcome.usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", outcome.usage.completion_tokens)
    reasons = [c.finish_reason for c in outcome.choices if c.finish_reason]
    if reasons:
        span.set_attribute("gen_ai.response.finish_reasons", reasons)
    if CAPTURE_CONTENT:
        output = [
            {"role": "assistant", "parts": [{"type": "text", "content": c.message.content or ""}]}
            for c in outcome.choices
        ]
        span.set_attribute("gen_ai.output.messages", msgspec.json.encode(output).decode())
    span.end()


def record_write(table: str, system: str) -> Span:
    """The span of writing one row (its wait for the group commit included), in the current context."""
    return _tracer.start_span(
        f"write {table}",
        kind=SpanKind.INTERNAL,
        attributes={"db.system.name": system, "db.collection.name": table, "db.operation.name": "write"},
    )


def record_written(span: Span, written: bool | None) -> None:
    """End a write's span: `written` (False: the row was there already; None: the sink refused it)."""
    span.set_attribute("multillm.written", "new" if written else "duplicate" if written is False else "refused")
    if written is None:
        span.set_status(Status(StatusCode.ERROR, "the sink did not take the row"))
    span.end()


@functools.cache  # a provider's base URL, parsed at its first call, not at every one
def _server(base_url: str) -> tuple[str | None, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    try:
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return parts.hostname, None
