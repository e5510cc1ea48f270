"""`multillm demo`: the whole pipeline on this machine, against the bundled mock LLM.

Starts the mock (in this process, on a free port), a primary worker and one
worker per extra model (as child processes, exactly as an operator would run
them), sends a few multi-model requests, prints each reply and every model's
record side by side, gives each primary answer a user's feedback (a score), waits
for the judge worker's verdicts, shows `logs compare` of two of the models on this
run's requests, streams one more answer as a chat window would show it, then stops
everything with SIGTERM.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path

from multillm import contract
from multillm.cli.commands import connect_client
from multillm.cli.comparison import compare
from multillm.cli.logs import comparison_table, print_output, side_by_side
from multillm.config import DEFAULT_MOCK_LATENCY_MS, DEFAULT_MOCK_TOKEN_DELAY_MS, ENV_CONFIG, Settings
from multillm.errors import CommandError, MultiLLMError
from multillm.mock_llm import MockLLM
from multillm.producers import Client, make_request
from multillm.progress import progress
from multillm.schemas import LLMLogRecord
from multillm.sinks import RecordFilter, Sink, open_sink
from multillm.testbed.processes import WorkerProcess, wait_for_consumers, write_worker_config

# The mock answers `echo` as asked, `upper` in capitals and `reverse` word by word,
# so the three columns of each request differ visibly.
MODELS = ("mock/echo", "mock/upper", "mock/reverse")
# The mock judges by a rule (mock_llm/protocol.py): the answer with more capital letters wins.
JUDGE = "mock/judge"
# What the demo compares at the end: the cheap model in use, and the dear one considered.
BASELINE, CANDIDATE = "mock/echo", "mock/upper"
# The mock's models are priced like real ones (USD per million input and output tokens), so that
# the demo's records show costs; genai-prices' table does not know them.
DEMO_PRICES = {"mock/echo": (0.15, 0.6), "mock/upper": (2.5, 10.0), "mock/reverse": (1.1, 4.4), JUDGE: (0.15, 0.6)}
STREAMED_PROMPT = "Tell me, word by word, how a message queue hands work to a worker."
PROMPTS = (
    "Summarise the plot of Hamlet in one sentence.",
    "What is a message queue good for?",
    "Name three prime numbers above one hundred.",
    "Translate 'good morning' into French.",
)


def run_demo(settings: Settings, *, requests: int = 3, latency_ms: float = DEFAULT_MOCK_LATENCY_MS) -> int:
    client = connect_client(settings)  # fails first, in one line, if no broker answers
    workers: list[WorkerProcess] = []
    with (
        tempfile.TemporaryDirectory(prefix="multillm-demo-") as tmp,
        MockLLM(latency_ms=latency_ms, token_delay_ms=DEFAULT_MOCK_TOKEN_DELAY_MS) as mock,
    ):
        config = write_worker_config(
            Path(tmp), broker_url=settings.broker_url, sink_url=settings.sink_url, mock_url=mock.url, prices=DEMO_PRICES
        )
        env = {ENV_CONFIG: str(config)}
        logs = os.path.join(tmp, "workers.log")
        print(
            f"mock LLM at {mock.url} ({latency_ms:g} ms a call, {DEFAULT_MOCK_TOKEN_DELAY_MS:g} ms a token when"
            f" streamed); sink {settings.sink_url}"
        )
        try:
            workers.append(WorkerProcess(["primary", "--concurrency", "4"], env=env, log_path=logs))
            for model in MODELS:
                workers.append(WorkerProcess(["model", "--model", model, "--concurrency", "4"], env=env, log_path=logs))
            workers.append(WorkerProcess(["judge", "--model", JUDGE, "--concurrency", "4"], env=env, log_path=logs))
            queues = [contract.REQUEST_QUEUE, *(contract.model_queue(model) for model in MODELS), contract.JUDGE_QUEUE]
            with progress("starting workers", len(queues)) as started:
                for done, queue in enumerate(queues, 1):
                    wait_for_consumers(settings.broker_url, queue, 1, workers=workers)
                    started(done)
            print(f"started {len(workers)} workers: primary, one per model ({', '.join(MODELS)}), judge {JUDGE}\n")
            _send(client, settings, requests)
            _stream(client)
        except (RuntimeError, MultiLLMError, TimeoutError) as exc:
            raise CommandError(f"{exc}; worker logs: {Path(logs).read_text()[-2000:]}") from None
        finally:
            client.close()
            codes = [w.stop() for w in workers]
            print(f"\nstopped {len(workers)} workers (exit codes {codes}); mock stopped")
    return 0


def _send(client: Client, settings: Settings, count: int) -> None:
    pending = []
    started = time.monotonic()
    run = uuid.uuid4().hex[:8]  # this run's records, apart from earlier runs' in the same sink
    for i in range(count):
        request = make_request(
            list(MODELS),
            PROMPTS[i % len(PROMPTS)],
            display_model=i % len(MODELS),
            log_attributes={"demo": str(i), "demoRun": run},
        )
        pending.append((request, client.submit(request, timeout=60)))
    sink = open_sink(settings.sink_url)
    try:
        score_ids = []
        for n, (request, future) in enumerate(pending):
            reply = future.result(timeout=60)
            print(f"reply to request {future.request_id} in {time.monotonic() - started:.2f}s")
            print(f"  primary {request.primary.name}: {reply.text}")
            print(f"  primary log id {reply.id}   external id {reply.primary_external_id}")
            print(side_by_side(_all_records(sink, future.request_id, len(request.models))))
            # As a user would: a thumbs up or down on the answer shown (every third one down).
            label = "down" if n % 3 == 2 else "up"
            score_ids.append(client.score(reply.id, "feedback", label=label, request_id=future.request_id))
            print(f"  feedback {label} on the primary's answer (score {score_ids[-1]})\n")
        stored = _stored_scores(sink, set(score_ids))
        print(f"{stored} of {len(score_ids)} scores stored by the primary worker")
        this_run = RecordFilter(attributes={"demoRun": run})
        # The judge scores each non-primary answer against the primary's: two a request.
        verdicts = _verdicts(sink, this_run, (len(MODELS) - 1) * count)
        print(f"{verdicts} of {(len(MODELS) - 1) * count} answers judged against their primary's by {JUDGE}\n")
        comparison = compare(sink.records(where=this_run), sink.scores(this_run), BASELINE, CANDIDATE)
        print_output(comparison_table(comparison))
        print(comparison.conclusion)
    finally:
        sink.close()
    print(f"\nthe same again: multillm logs compare --baseline {BASELINE} --candidate {CANDIDATE} --attr demoRun={run}")
    print("see them again with: multillm logs show REQUEST_ID   (or: multillm logs list / stats)")
    print("score an answer with: multillm logs score LOG_ID --name feedback --label up")


def _stream(client: Client) -> None:
    """One request streamed, printed as it arrives, as a chat window would show it."""
    request = make_request([MODELS[0]], STREAMED_PROMPT, log_attributes={"demo": "streamed"})
    print(f"\nstreamed (multillm request --stream): the answer of {request.primary.name} as it is written")
    started = time.monotonic()
    first: float | None = None
    stream = client.stream(request, timeout=60)
    print("  ", end="", flush=True)
    for delta in stream:
        first = first or time.monotonic() - started
        if delta.restart:
            print("\n  (started over) ", end="")
        print(delta.text, end="", flush=True)
    print(
        f"\n  first words after {(first or 0) * 1000:.0f} ms, the whole answer after {time.monotonic() - started:.2f}s"
    )


def _stored_scores(sink: Sink, score_ids: set[str], timeout: float = 30.0) -> int:
    """How many of `score_ids` the sink holds, once it holds them all or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        found = len(score_ids & {s.score_id for s in sink.scores()})
        if found == len(score_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _verdicts(sink: Sink, where: RecordFilter, expected: int, timeout: float = 30.0) -> int:
    """How many judge verdicts the records `where` selects have, once all `expected` are in or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        found = sum(1 for s in sink.scores(where) if s.name == contract.JUDGE_SCORE_NAME)
        if found >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _all_records(sink: Sink, request_id: str, expected: int, timeout: float = 30.0) -> list[LLMLogRecord]:
    """The per-model workers finish on their own time: wait until every model has its record."""
    deadline = time.monotonic() + timeout
    while True:
        records = sink.records(request_id)
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(0.05)
