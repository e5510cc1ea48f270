"""`multillm logs replay-dead`: write the records and scores waiting in `multillm.dead` to the sink.

Each dead letter is taken once with `basic.get` and held unacknowledged. A record or score
the sink stores (or already had: writes are idempotent on `log_id` and `score_id`) is
acknowledged; every other dead letter, and every row the sink would not take, stays held until
the connection closes, when the broker puts them all back in the queue in the order
they were taken. Holding them is what stops the loop: nothing is read twice, and one
record the sink refuses does not strand those behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import kombu
import kombu.exceptions
import msgspec

from multillm import contract
from multillm.errors import CommandError, describe
from multillm.producers.publishing import connect, declare_queues
from multillm.schemas import LLMScore, decode_record
from multillm.sinks import Sink
from multillm.urls import mask_url

# The rows a worker dead-letters when the sink would not take them, by AMQP `type`, and how
# each is decoded and written.
_ROWS: Final[dict[str, tuple[Callable[[bytes], Any], Callable[[Sink, Any], bool]]]] = {
    contract.TYPE_RECORD: (decode_record, lambda sink, record: sink.write(record)),
    contract.TYPE_STORED_SCORE: (
        msgspec.json.Decoder(LLMScore).decode,
        lambda sink, score: sink.write_scores([score])[0],
    ),
}
_CONNECT_TIMEOUT_SECONDS: Final = 10.0


@dataclass
class ReplayCounts:
    """What one replay did."""

    written: int = 0
    already_stored: int = 0
    others: int = 0
    # One line per record the sink did not take, saying which and why.
    failures: list[str] = field(default_factory=list)


def replay_dead_records(broker_url: str, sink: Sink, report: Callable[[str], None] = print) -> ReplayCounts:
    """Write every `LLMLogRecord` and `LLMScore` dead letter to `sink`; acknowledge those it stored.

    Args:
        broker_url: the broker whose `multillm.dead` is read.
        sink: where the records go.
        report: told one line for each record that could not be written, as it happens.

    Raises:
        CommandError: no broker answered at `broker_url`.
    """
    counts = ReplayCounts()
    with connect(broker_url) as connection:
        try:
            connection.ensure_connection(max_retries=1, timeout=_CONNECT_TIMEOUT_SECONDS)
            declare_queues(connection, contract.dead_queue())
        except (OSError, kombu.exceptions.OperationalError) as exc:
            raise CommandError(f"cannot reach the broker at {mask_url(broker_url)}: {exc}") from None
        queue = kombu.Queue(contract.DEAD_QUEUE, no_declare=True)(connection.default_channel)
        position = 0
        while (message := queue.get(no_ack=False)) is not None:
            position += 1
            row_type = message.properties.get("type")
            if row_type not in _ROWS:
                counts.others += 1
                continue
            failure = _write(sink, message, row_type, counts)
            if failure is None:
                message.ack()
            else:
                line = f"not written: dead letter {position} ({_log_id(message.body)}): {failure}"
                counts.failures.append(line)
                report(line)
    return counts


def _write(sink: Sink, message: Any, row_type: str, counts: ReplayCounts) -> str | None:
    """Store the record or score of `message`; None if it is in the sink now, else why not."""
    decode, write = _ROWS[row_type]
    try:
        row = decode(message.body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        return f"not a valid {row_type}: {exc}"
    try:
        written = write(sink, row)
    except Exception as exc:  # whatever the sink's driver raises: reported, and the record kept
        return "the sink refused it: " + describe(exc)
    if written:
        counts.written += 1
    else:
        counts.already_stored += 1
    return None


class _LogId(msgspec.Struct):
    log_id: str


def _log_id(body: bytes) -> str:
    try:
        return f"log_id {msgspec.json.decode(body, type=_LogId).log_id!r}"
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return "no log_id"


def summary(counts: ReplayCounts) -> str:
    """One line: what was written and what is left in `multillm.dead`."""
    return (
        f"{counts.written + counts.already_stored} records and scores written to the sink and removed from"
        f" {contract.DEAD_QUEUE} ({counts.already_stored} of them were stored already); left in {contract.DEAD_QUEUE}:"
        f" {len(counts.failures)} not written, {counts.others} other dead letters"
    )
