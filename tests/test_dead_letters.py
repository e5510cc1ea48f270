"""What lands in `multillm.dead`: masked, cut to a bound, and still traceable to what was sent."""

from __future__ import annotations

import hashlib
from typing import Any

import pika
import pytest

from multillm import contract
from multillm.errors import Code
from multillm.producers import ReplyQueue, make_request
from multillm.redact import redact_body
from multillm.schemas import V1Model, encode
from tests.broker_tools import collect_replies, read_dead_letters
from tests.conftest import StartWorker

REPLIES = "test.dead.replies"
KEY = "sk-huge-request-0123456789"
LIMIT = contract.DEAD_LETTER_MAX_BODY_BYTES


@pytest.fixture(autouse=True)
def reply_queue(broker_url: str) -> None:
    queue = ReplyQueue(broker_url, REPLIES)
    queue.declare()
    queue.close()


def _huge_request() -> bytes:
    """About 10 MB of valid JSON, its api key near the start; a cut at LIMIT, masked or not, splits a character."""
    valid = encode(make_request([V1Model(name="mock/a", api_key=KEY)], "big"))
    for offset in range(3):
        body = valid[:-1] + b',"pad":"' + b"a" * offset + "€".encode() * 3_400_000 + b'"}'
        masked = body.replace(KEY.encode(), b"***")
        if body[LIMIT] & 0xC0 == masked[LIMIT] & 0xC0 == 0x80:  # UTF-8 continuation bytes
            return body
    raise AssertionError("no padding puts a character across the cut")


@pytest.mark.parametrize("size", ["10 MB", "small"])
def test_a_dead_letter_is_masked_cut_to_the_limit_and_says_what_it_was(
    start_worker: StartWorker, broker_url: str, raw_channel: Any, size: str
) -> None:
    start_worker("primary")
    body = _huge_request() if size == "10 MB" else encode(make_request([V1Model(name="bogus/a", api_key=KEY)], "x"))
    raw_channel.basic_publish(
        contract.REQUEST_EXCHANGE,
        contract.REQUEST_ROUTING_KEY,
        body,
        pika.BasicProperties(content_type=contract.CONTENT_TYPE, reply_to=REPLIES, correlation_id="dl-1"),
    )

    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.request_id == "dl-1"
    assert reply.status is not None and reply.status.code == Code.INVALID_ARGUMENT
    [dead] = read_dead_letters(broker_url, 1)
    assert dead.headers[contract.HEADER_ORIGINAL_BYTES] == len(body)
    assert dead.headers[contract.HEADER_ORIGINAL_SHA256] == hashlib.sha256(body).hexdigest()
    assert KEY.encode() not in dead.body and b'"apiKey":"***"' in dead.body
    text = dead.body.decode("utf-8")  # cut between characters, not inside one
    if size == "10 MB":
        assert "over the limit" in dead.headers[contract.HEADER_ERROR]
        assert dead.headers[contract.HEADER_BODY_CUT] is True
        assert LIMIT // 2 < len(dead.body) <= LIMIT
        assert text.endswith("€")
    else:
        assert "bogus" in dead.headers[contract.HEADER_ERROR]
        assert dead.headers[contract.HEADER_BODY_CUT] is False
        assert dead.body == redact_body(body)
