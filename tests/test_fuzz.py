"""Property-based fuzzing of a running primary worker with generated bodies and headers.

Every message gets exactly one reply: a completion when it was a valid request,
INVALID_ARGUMENT (3) when it was not. Afterwards the worker still serves.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multillm import contract
from multillm.errors import Code
from multillm.producers import Client, make_request
from multillm.producers.publishing import connect
from multillm.producers.replies import decode_reply_message
from multillm.schemas import decode_request
from tests.broker_tools import publish_raw
from tests.conftest import StartWorker

FUZZ_REPLIES = "fuzz.replies"
VALID: dict[str, Any] = {
    "models": [{"name": "mock/a"}, {"name": "mock/b", "temperature": 0.5}],
    "messages": [{"role": "user", "content": "hi"}],
    "displayModel": 0,
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A valid request with one field (top level or in a model) replaced by anything."""
    request = msgspec.json.decode(msgspec.json.encode(VALID))
    target = draw(st.sampled_from(["top", "model", "message"]))
    holder = {"top": request, "model": request["models"][0], "message": request["messages"][0]}[target]
    key = draw(st.sampled_from([*holder.keys(), "apiKey", "maxTokens", "mode", "tracing", "extra"]))
    holder[key] = draw(json_values)
    return msgspec.json.encode(request)


bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(msgspec.json.encode),
    mutated_requests(),
    st.just(msgspec.json.encode(VALID)),
)
header_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
    st.booleans(),
    st.none(),
)
headers = st.dictionaries(
    st.sampled_from([contract.HEADER_DEADLINE, contract.HEADER_DELIVERY_COUNT, "x-custom", "x-death"]),
    header_values,
    max_size=3,
)
content_types = st.sampled_from(
    [contract.CONTENT_TYPE, "application/json; charset=utf-8", "text/plain", "application/json; charset=utf-16"]
)
encodings = st.sampled_from(["utf-8", "binary", "gzip", "base64"])


def _expected_valid(body: bytes, content_type: str, encoding: str) -> bool:
    if encoding in ("gzip", "base64") or content_type in ("text/plain", "application/json; charset=utf-16"):
        return False
    try:
        decode_request(body)
    except msgspec.DecodeError:
        return False
    return True


def test_every_generated_message_gets_one_clear_reply_and_the_worker_keeps_serving(
    start_worker: StartWorker, client: Client, broker_url: str
) -> None:
    start_worker("primary", concurrency=8)
    start_worker("model", model="mock/b", concurrency=8)
    counter = itertools.count()

    with connect(broker_url) as connection:
        replies = connection.SimpleQueue(FUZZ_REPLIES, no_ack=True)

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            body=bodies,
            header=headers,
            content_type=content_types,
            encoding=encodings,
            message_id=st.none() | st.text(st.characters(codec="ascii"), max_size=255),
        )
        def check(
            body: bytes, header: dict[str, Any], content_type: str, encoding: str, message_id: str | None
        ) -> None:
            correlation = f"fuzz-{next(counter)}"
            publish_raw(
                broker_url,
                body,
                FUZZ_REPLIES,
                content_type=content_type,
                content_encoding=encoding,
                headers=header,
                correlation_id=correlation,
                message_id=message_id,
            )
            message = replies.get(block=True, timeout=30)
            props = message.properties
            reply = decode_reply_message(message.body, props.get("type"), props.get("correlation_id"))
            assert reply.request_id == correlation
            outcome = reply.status.code if reply.status else 0
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if not _expected_valid(body, content_type, encoding):
                assert reply.status is not None and reply.status.code == Code.INVALID_ARGUMENT, reply
            elif reply.status is not None:
                # A valid body may still carry a deadline in the past (4) or a delivery
                # count past the give-up mark (13); nothing else.
                assert reply.status.code in (Code.DEADLINE_EXCEEDED, Code.INTERNAL), reply
            else:
                assert reply.completion is not None and reply.completion.model_names[0] == "mock/a"

        outcomes: dict[int, int] = {}
        check()
        # Both sides of the property were exercised (about 1 in 16 examples is valid).
        assert outcomes.get(0, 0) > 0 and outcomes.get(Code.INVALID_ARGUMENT, 0) > 0, outcomes
        assert replies.qsize() == 0  # no message was answered twice
        replies.close()

    assert (
        client.create(make_request(["mock/a", "mock/b"], "after the storm"), timeout=30).text
        == "a says: after the storm"
    )
