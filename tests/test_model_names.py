"""Model names at their limits: what a routing key and a queue name can hold, and nothing invisible."""

from __future__ import annotations

from pathlib import Path

import pytest

from multillm.config import ENV_CONFIG
from multillm.errors import Code
from multillm.producers import Client, ReplyQueue, make_request
from multillm.schemas import encode
from multillm.sinks import Sink
from tests.broker_tools import collect_replies, publish_raw
from tests.conftest import StartWorker, wait_for_records
from tests.test_cli import multillm

# "multillm.model." is 15 bytes: a 240-byte name makes a 255-byte queue name, AMQP's most.
LONGEST = "mock/" + "\u00e9" * 117 + "x"  # 5 + 234 + 1 = 240 bytes, 123 characters
assert len(LONGEST.encode()) == 240


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mock/" + "x" * 300, "is 305 characters long, over 200"),
        ("mock/" + "\u4e2d" * 190, "is 575 bytes in UTF-8, over 240"),
        ("mock/a b", "contains U+0020 at character 6"),
        ("mock/gpt\u202e4o", "contains U+202E at character 8"),
        ("mock/gpt\u061c4o", "contains U+061C at character 8"),  # Arabic letter mark, a bidi control
        ("mock/gpt\u00ad4o", "contains U+00AD at character 8"),  # soft hyphen, invisible
    ],
)
def test_a_model_worker_refuses_a_name_no_request_may_use(config_path: Path, name: str, expected: str) -> None:
    done = multillm("worker", "model", "--model", name, env={ENV_CONFIG: str(config_path)}, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("multillm: configuration error: model name") and expected in line


def test_the_longest_name_is_served_and_one_byte_more_is_refused_by_name(
    start_worker: StartWorker, client: Client, sink: Sink, broker_url: str
) -> None:
    start_worker("primary")
    start_worker("model", model=LONGEST)
    future = client.submit(make_request(["mock/echo", LONGEST], "hi"))
    assert future.result(timeout=30).text == "echo says: hi"
    records = wait_for_records(sink, future.request_id, 2)
    assert [(r.model_name, r.status) for r in records] == [("mock/echo", "ok"), (LONGEST, "ok")]

    # A request that names a longer model is refused whole, before any model is called, and
    # says which model: a routing key of over 255 bytes would fail the fan-out mid-request.
    replies = ReplyQueue(broker_url, "names.replies")
    replies.declare()  # before publishing, as a service would
    replies.close()
    body = make_request(["mock/echo", "mock/x"], "hi")
    raw = encode(body).replace(b'"mock/x"', b'"' + (LONGEST + "y").encode() + b'"')
    publish_raw(broker_url, raw, "names.replies", message_id="too-long")
    [reply] = collect_replies(broker_url, "names.replies", 1)
    assert reply.status is not None and reply.status.code == Code.INVALID_ARGUMENT
    assert "is 241 bytes in UTF-8, over 240" in reply.status.message and "`$.models[1]`" in reply.status.message
    assert sink.records("too-long") == []
