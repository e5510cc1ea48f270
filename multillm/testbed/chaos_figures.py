"""What `multillm chaos` counts, and the table it prints.

Each figure is read from a source that would show the failure it names, never from what
the pipeline's own guarantees make impossible (a table's unique key cannot hold two rows):

- model calls, from the mock's log of the calls it served: per (request, model), the calls
  before its first answer retry an injected fault; those after it repeat work already done
  (a redelivery, or two workers on one message after a cut connection);
- duplicate record writes, from the workers' logs: a worker logs `record.duplicate` when the
  sink's idempotent write found the record there already;
- records, from the sink: each ok record must carry an answer the mock gave that model for
  that request's prompt, and each first reply must agree with its primary record.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Final

import msgspec

from multillm.mock_llm import MockCall
from multillm.producers import Reply
from multillm.schemas import LLMLogRecord
from multillm.workers.storage import RECORD_DUPLICATE

# The event multillm/workers/model_run.py logs (at info) for a write the sink refused.
REFUSED_WRITE_EVENT: Final = RECORD_DUPLICATE


class ChaosReport(msgspec.Struct):
    requests_sent: int = 0
    publish_failures: int = 0
    replies_received: int = 0
    error_replies_by_code: dict[int, int] = msgspec.field(default_factory=dict)
    duplicate_replies: int = 0
    lost_replies: int = 0
    records_expected: int = 0
    records_found: int = 0
    lost_records: int = 0
    replies_disagreeing_with_records: int = 0
    records_without_their_answer: int = 0
    refused_record_writes: int = 0
    model_calls: int = 0
    mock_calls_failed: int = 0
    retrying_calls: int = 0
    repeated_model_calls: int = 0
    worker_kills: int = 0
    worker_sigterms: int = 0
    unclean_exits: int = 0
    workers_died_on_their_own: int = 0
    connection_cuts: int = 0
    node_kills: int = 0
    dead_letters: int = 0
    # "source queue: reason" of each dead letter, counted, so that a run that left some says why.
    dead_letter_reasons: dict[str, int] = msgspec.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """Nothing lost, nothing contradicted, every stop clean. Repeated calls and refused writes
        are at-least-once at work under SIGKILLs and cut connections: counted, not failures."""
        failures = (
            self.lost_replies,
            self.lost_records,
            self.replies_disagreeing_with_records,
            self.records_without_their_answer,
            self.unclean_exits,
            self.workers_died_on_their_own,
        )
        return not any(failures)

    def table(self) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.error_replies_by_code.items())) or "none"
        rows = [
            ("requests sent (confirmed)", self.requests_sent),
            ("publishes not confirmed (caller told)", self.publish_failures),
            ("replies received", self.replies_received),
            ("error replies by code", codes),
            ("duplicate replies (dropped by the client)", self.duplicate_replies),
            ("lost replies", self.lost_replies),
            ("records expected", self.records_expected),
            ("records found", self.records_found),
            ("lost records", self.lost_records),
            ("replies disagreeing with their record", self.replies_disagreeing_with_records),
            ("ok records with no such answer from the mock", self.records_without_their_answer),
            ("duplicate record writes (refused by the sink)", self.refused_record_writes),
            ("model calls (the mock's log)", self.model_calls),
            ("mock calls failed on purpose", self.mock_calls_failed),
            ("calls retrying a failed call", self.retrying_calls),
            ("calls repeating an answered call", self.repeated_model_calls),
            (
                "worker restarts (SIGKILL + SIGTERM)",
                f"{self.worker_kills + self.worker_sigterms} ({self.worker_kills} + {self.worker_sigterms})",
            ),
            ("SIGTERMed workers that did not exit 0", self.unclean_exits),
            ("workers that died on their own", self.workers_died_on_their_own),
            ("broker connection cuts", self.connection_cuts),
            ("messages in multillm.dead", self.dead_letters),
            ("wall time", f"{self.seconds:.0f} s"),
        ]
        if self.node_kills:  # a run on the cluster (`chaos --cluster`)
            rows.insert(-2, ("broker nodes SIGKILLed (down 5-10 s, then restarted)", self.node_kills))
        rows += [(f"  dead: {why}", n) for why, n in sorted(self.dead_letter_reasons.items())]
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
        return "\n".join(lines)


def count_calls(report: ChaosReport, calls: Sequence[MockCall], prompts: Collection[str]) -> None:
    """The mock's calls for `prompts` (one per request), split by why each was made."""
    statuses: dict[tuple[str | None, str | None], list[int]] = defaultdict(list)
    for call in calls:  # oldest first: the order the mock received them in
        if call.prompt in prompts:
            statuses[(call.model, call.prompt)].append(call.status)
    report.model_calls = sum(len(s) for s in statuses.values())
    report.mock_calls_failed = sum(status != 200 for s in statuses.values() for status in s)
    report.retrying_calls = report.repeated_model_calls = 0
    for pair in statuses.values():
        answered = pair.index(200) if 200 in pair else len(pair)
        report.retrying_calls += min(answered, len(pair) - 1)
        report.repeated_model_calls += max(0, len(pair) - 1 - answered)


def count_records(report: ChaosReport, records: Iterable[LLMLogRecord]) -> int:
    """Records found and lost, one per (request, model) at most; returns how many were found."""
    report.records_found = len({(r.request_id, r.model_index) for r in records})
    report.lost_records = report.records_expected - report.records_found
    return report.records_found


def records_without_their_answer(
    records: Iterable[LLMLogRecord], prompts: Mapping[str, str], calls: Iterable[MockCall]
) -> int:
    """Ok records whose external id the mock never gave that model for that request's prompt."""
    served = {(call.model, call.prompt, call.id) for call in calls if call.id is not None}
    return sum(
        (r.model_name.partition("/")[2], prompts[r.request_id], r.external_id) not in served
        for r in records
        if r.status == "ok"
    )


def disagreements(records: Iterable[LLMLogRecord], replies: Mapping[str, Reply]) -> int:
    """Replies whose primary record says otherwise (another answer, another outcome)."""
    primaries = {r.request_id: r for r in records if r.is_primary}
    wrong = 0
    for request_id, reply in replies.items():
        record = primaries.get(request_id)
        if record is None:
            continue  # counted as a lost record
        if reply.completion is not None:
            agrees = (
                record.status == "ok"
                and reply.completion.id == record.log_id
                and reply.completion.primary_external_id == record.external_id
            )
        else:
            agrees = record.status == "error" and reply.status is not None and reply.status.code == record.error_code
        wrong += not agrees
    return wrong


class _LogLine(msgspec.Struct):
    event: str = ""
    request_id: str | None = None


_log_line: Final = msgspec.json.Decoder(_LogLine)


def refused_writes(log_lines: Iterable[str], request_ids: Collection[str]) -> int:
    """Record writes of `request_ids` that the sink refused as duplicates, from the workers' JSON log lines."""
    refused = 0
    for line in log_lines:
        if REFUSED_WRITE_EVENT not in line:  # most lines: skip them undecoded
            continue
        try:
            entry = _log_line.decode(line)
        except msgspec.DecodeError:  # a line of pika's or kombu's, not JSON
            continue
        refused += entry.event == REFUSED_WRITE_EVENT and entry.request_id in request_ids
    return refused
