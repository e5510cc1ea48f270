"""Which records to read back: `RecordFilter`, and the one statement of what each of its fields means.

A filter is turned into a list of `Condition`s, all of which must hold. The JSON
Lines sink evaluates them in Python (`RecordFilter.matches`); the SQL sinks
translate the same list into a parameterized `WHERE` clause. Adding a field means
adding its condition here, so the three sinks cannot drift apart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Final

import msgspec

from multillm.schemas import LLMLogRecord, Mode

__all__ = ["Condition", "Op", "RecordFilter", "parse_bound"]

# Record fields a filter may require to equal a given value.
EQUAL_FIELDS: Final = ("request_id", "mode", "model_name", "trace_id", "session_id")


class RecordFilter(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which records to read. Every field left at its default selects everything; set fields must all match.

    Attributes:
        request_id, mode, model_name, trace_id, session_id: the record's field equals this.
        attributes: every `key: value` pair is among the record's `log_attributes`.
        since: `created_at >= since`; until: `created_at < until`. ISO-8601 UTC text in the records'
            own format (`parse_bound` makes one from what a person typed). Compared as text, which orders
            `YYYY-MM-DDTHH:MM:SS[.fff]...` timestamps by time.
        limit: at most this many records, the first in (`created_at`, `model_index`, `log_id`) order.
    """

    request_id: str | None = None
    mode: Mode | None = None
    model_name: str | None = None
    trace_id: str | None = None
    session_id: str | None = None
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    since: str | None = None
    until: str | None = None
    limit: int | None = None

    def conditions(self) -> list[Condition]:
        """What a record must satisfy to be selected (the limit aside)."""
        equal = [(name, getattr(self, name)) for name in EQUAL_FIELDS]
        found = [Condition(Op.EQUAL, name, value) for name, value in equal if value is not None]
        found += [Condition(Op.HAS_ATTRIBUTE, key, value) for key, value in self.attributes.items()]
        if self.since is not None:
            found.append(Condition(Op.AT_LEAST, "created_at", self.since))
        if self.until is not None:
            found.append(Condition(Op.BEFORE, "created_at", self.until))
        return found

    def matches(self, record: LLMLogRecord) -> bool:
        """True if `record` satisfies every condition (the limit is not a condition)."""
        return all(condition.holds(record) for condition in self.conditions())

    def narrowed(self, request_id: str | None, limit: int | None) -> RecordFilter:
        """This filter with the positional arguments of `Sink.records` applied on top."""
        changes = {k: v for k, v in (("request_id", request_id), ("limit", limit)) if v is not None}
        return msgspec.structs.replace(self, **changes) if changes else self


class Op(enum.Enum):
    EQUAL = "equal"
    HAS_ATTRIBUTE = "has_attribute"
    AT_LEAST = "at_least"
    BEFORE = "before"


@dataclass(frozen=True, slots=True)
class Condition:
    """One requirement: `field` (a record field, or an attribute key for HAS_ATTRIBUTE) against `value`."""

    op: Op
    field: str
    value: str

    def holds(self, record: LLMLogRecord) -> bool:
        if self.op is Op.HAS_ATTRIBUTE:
            return any(a.key == self.field and a.value == self.value for a in record.log_attributes)
        actual = getattr(record, self.field)
        if self.op is Op.EQUAL:
            return bool(actual == self.value)
        if self.op is Op.AT_LEAST:
            return bool(actual >= self.value)
        return bool(actual < self.value)


def parse_bound(text: str, *, end_of_day: bool = False) -> str:
    """A `since`/`until` bound from an ISO-8601 date or date-time, as UTC text comparable with `created_at`.

    A date-time without an offset is UTC. A bare date is midnight UTC at its start, or, with
    `end_of_day` (for an exclusive `until`), at its end, so `--until 2026-11-30` includes that day.
    The bound keeps at most milliseconds (the records' precision) and drops trailing zeros, so
    that it sorts before every `created_at` at the same instant whatever suffix (`Z`, `+00:00`)
    and precision the record has.

    Raises:
        ValueError: `text` is neither an ISO-8601 date nor date-time.
    """
    stripped = text.strip()
    try:
        if len(stripped) == 10:
            day = date.fromisoformat(stripped)
            moment = datetime.combine(day + timedelta(days=1 if end_of_day else 0), time(), tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(stripped)
    except ValueError:
        example = "2026-11-25 or 2026-11-25T01:45Z"
        raise ValueError(f"{text!r} is not an ISO-8601 date or date-time (e.g. {example})") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    whole = moment.astimezone(UTC).isoformat(timespec="milliseconds").removesuffix("+00:00")
    # Trailing zeros (and a bare dot) would sort after a record's "Z" or "+00:00" at the same instant.
    return whole.rstrip("0").rstrip(".") if "." in whole else whole
