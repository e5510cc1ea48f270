"""The judge worker: real workers, the real broker, the mock answering the judge's prompts by its
documented rule (the answer with more capital letters wins; `[judge:first]` in the prompt: the
first answer shown always wins)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pika

from multillm import contract
from multillm.mock_llm import MockControl
from multillm.mock_llm.protocol import POSITION_BIASED
from multillm.producers import Client, make_request
from multillm.schemas import LLMLogRecord, LLMScore, V1Score, decode_record, encode
from multillm.sinks import RecordFilter, Sink
from tests.broker_tools import read_dead_letters, wait_until_settled
from tests.conftest import StartWorker

JUDGE = "mock/judge"
MODELS = ["mock/echo", "mock/upper", "mock/reverse"]


def _wait_for_scores(sink: Sink, count: int, timeout: float = 20.0) -> list[LLMScore]:
    deadline = time.monotonic() + timeout
    while len(found := sink.scores()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _judge_records(sink: Sink, scored: LLMLogRecord) -> list[LLMLogRecord]:
    return sink.records(where=RecordFilter(attributes={"judgeOf": scored.log_id}))


def _start_pipeline(start_worker: StartWorker, *judges: list[str]) -> None:
    start_worker("primary")
    for model in MODELS[1:]:
        start_worker("model", model=model)
    for extra in judges or ([],):
        start_worker("judge", model=JUDGE, extra_args=extra)


def test_each_non_primary_answer_gets_one_verdict_against_the_primary(
    start_worker: StartWorker, client: Client, sink: Sink, config_path: Path
) -> None:
    config_path.write_text(
        config_path.read_text()
        + f'[prices."{JUDGE}"]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n'
        + '[judge]\nprompt = "Be a fair judge."\n'
    )
    _start_pipeline(start_worker)

    replies = [client.create(make_request(MODELS, f"hello world {i}")) for i in range(3)]
    request_ids = [r.request_id for r in sink.records() if r.log_id in {reply.id for reply in replies}]

    scores = _wait_for_scores(sink, 6)
    assert len(scores) == 6
    records = {r.log_id: r for r in sink.records() if r.model_name in MODELS}
    by_model = {(records[s.log_id].model_name, s.label, s.value) for s in scores}
    # "upper says: HELLO WORLD 0" has more capitals than "echo says: hello world 0"; reverse has as many
    assert by_model == {("mock/upper", "win", 1.0), ("mock/reverse", "tie", 0.5)}
    assert {s.name for s in scores} == {contract.JUDGE_SCORE_NAME}
    assert {s.source for s in scores} == {f"judge:{JUDGE}"}
    assert {records[s.log_id].request_id for s in scores} == set(request_ids)
    for score in scores:
        scored = records[score.log_id]
        assert not scored.is_primary and score.request_id == scored.request_id
        assert (
            score.score_id
            == V1Score(log_id=scored.log_id, name="judge.vs_primary", label="x", source="judge:mock/judge").id
        )
        asks = _judge_records(sink, scored)
        # both orders asked, each a record of the judge model, priced, in the scored record's trace
        assert sorted(a.log_attributes[1].value for a in asks) == ["candidate-first", "primary-first"]
        for ask in asks:
            assert ask.model_name == JUDGE and ask.status == "ok"
            assert ask.cost_usd == (ask.prompt_tokens * 1.0 + ask.completion_tokens * 2.0) / 1e6
            assert ask.trace_id == scored.trace_id and ask.parent_span_id == scored.span_id
            assert ask.messages[0].content == "Be a fair judge." and "<answer_a>" in (ask.messages[1].content or "")
        assert "capital letters" in (score.comment or "")


def test_a_verdict_that_follows_the_order_is_a_tie(start_worker: StartWorker, client: Client, sink: Sink) -> None:
    _start_pipeline(start_worker)

    client.create(make_request(MODELS[:2], f"{POSITION_BIASED} hello"))

    [score] = _wait_for_scores(sink, 1)
    assert (score.label, score.value) == ("tie", 0.5)
    assert (score.comment or "").startswith("The verdict changed with the order (loss, then win): a tie.")


def test_sampling_judges_the_requests_the_documented_hash_picks(
    start_worker: StartWorker, client: Client, sink: Sink, broker_url: str
) -> None:
    _start_pipeline(start_worker, ["--sample", "0.5"])

    primaries = {client.create(make_request(MODELS[:2], f"sampled {i}")).id for i in range(16)}
    request_ids = [r.request_id for r in sink.records() if r.log_id in primaries]
    # The rule docs/contract.md states: the first 8 bytes of SHA-256(request id), big-endian, over 2^64.
    expected = {i for i in request_ids if int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") < 2**63}
    assert 0 < len(expected) < 16, "the sample of this run should be a real part"
    assert {s.request_id for s in _wait_for_scores(sink, len(expected))} == expected
    wait_until_settled(broker_url, contract.JUDGE_QUEUE)
    assert {s.request_id for s in sink.scores()} == expected


def test_one_score_per_record_under_redelivery_and_two_judges(
    start_worker: StartWorker, client: Client, sink: Sink, broker_url: str, mock_control: MockControl
) -> None:
    # The judge answers slowly, so that the first judge is killed while its asks are in flight.
    mock_control.set_fault("judge", latency_ms=800)
    start_worker("primary")
    start_worker("model", model="mock/upper")
    first = start_worker("judge", model=JUDGE)

    primaries = {client.create(make_request(MODELS[:2], f"twice {i}")).id for i in range(4)}
    request_ids = [r.request_id for r in sink.records() if r.log_id in primaries]
    deadline = time.monotonic() + 20
    while not any(c.model == "judge" for c in mock_control.calls()):
        assert time.monotonic() < deadline, "the judge never asked"
        time.sleep(0.02)
    first.kill()
    start_worker("judge", model=JUDGE)
    start_worker("judge", model=JUDGE)
    # Every record once more on the stream, as a worker whose confirm was lost would send it.
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    for record in sink.records():
        channel.basic_publish(
            contract.RECORD_EXCHANGE,
            "",
            encode(record),
            pika.BasicProperties(type=contract.TYPE_RECORD, delivery_mode=2, message_id=record.log_id),
        )
    connection.close()

    _wait_for_scores(sink, 4, timeout=30)
    wait_until_settled(broker_url, contract.JUDGE_QUEUE)
    scores = sink.scores()
    assert sorted(s.request_id or "" for s in scores) == sorted(request_ids)
    assert len({s.score_id for s in scores}) == len(scores) == 4
    for score in scores:
        [scored] = [r for r in sink.records(score.request_id) if r.log_id == score.log_id]
        assert len(_judge_records(sink, scored)) == 2
    assert read_dead_letters(broker_url, 1, timeout=0.5) == []


def test_a_judge_that_cannot_answer_leaves_error_records_and_a_dead_letter(
    start_worker: StartWorker, client: Client, sink: Sink, broker_url: str, mock_control: MockControl
) -> None:
    mock_control.set_fault("judge", always=500)
    _start_pipeline(start_worker)

    client.create(make_request(MODELS[:2], "no verdict"))

    [dead] = read_dead_letters(broker_url, 1, timeout=30)
    assert dead.headers[contract.HEADER_SOURCE_QUEUE] == contract.JUDGE_QUEUE
    assert "the judge could not judge record" in dead.headers[contract.HEADER_ERROR]
    # The stream record of whichever of the pair came second, naming the record it could not judge
    [scored] = [r for r in sink.records() if r.model_name == "mock/upper"]
    assert f"the judge could not judge record {scored.log_id}" in dead.headers[contract.HEADER_ERROR]
    assert decode_record(dead.body).model_name in MODELS[:2]
    asks = [r for r in sink.records() if r.model_name == JUDGE]
    assert sorted(r.status for r in asks) == ["error", "error"]
    assert sink.scores() == []
