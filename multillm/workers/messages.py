"""What the consumer loop and the handlers pass each other: deliveries, messages to publish, settlements."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pika
from opentelemetry.trace import Span

from multillm import contract
from multillm.contract import QueueSpec
from multillm.errors import Code
from multillm.metrics import Published
from multillm.redact import redact_body


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as received from `queue`. `generation` names the connection it came on; handlers never use it."""

    tag: int
    properties: pika.BasicProperties
    body: bytes
    redelivered: bool
    generation: int
    queue: str
    # Its processing's span, when this process exports traces (`tracing`); ended when it is settled.
    span: Span | None = None

    @property
    def delivery_count(self) -> int:
        """How many times the broker delivered it before (0 the first time).

        Trusted only on a redelivery: on a first delivery the header can only have
        come from the producer (or from a dead letter being replayed).
        """
        if not self.redelivered:
            return 0
        count = (self.properties.headers or {}).get(contract.HEADER_DELIVERY_COUNT, 0)
        return int(count) if isinstance(count, int) and not isinstance(count, bool) else 0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish, with a confirm, and mandatory unless `mandatory` is False: a record for the
    records' stream, which no queue may be bound to, and a reply to a direct reply-to name, which the
    broker returns even when it delivered it. For those, the broker's confirm is the whole of it.

    `kind`, `about` and `code` say what it is, for the metrics, by whoever builds it:
    `about` is the model of a fan-out copy or the source queue of a dead letter, and
    `code` the status of a reply or a dead letter (0: a completion).
    """

    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    kind: Published
    about: str = ""
    code: int = 0
    # A reply whose queue is gone is dead-lettered with this reason instead of being dropped.
    dead_letter_reason: str | None = None
    mandatory: bool = True


@dataclass(slots=True)
class Settlement:
    """What a delivery owes before it is acked: the messages to publish (confirmed) first.

    `requeue`: nothing was done; put the message back for any worker (one that was
    waiting for a call slot when its worker began to stop).
    """

    publishes: list[Outgoing] = field(default_factory=list)
    requeue: bool = False


# Whether each message published at once was taken by a queue, in order (see `Work`).
Taken = Awaitable[list[bool]]


@dataclass(frozen=True, slots=True)
class Running:
    """What a work gets while it runs.

    `taken`: whether a queue took each message of its `publish_first`. A lost connection
    fails that wait: the delivery is redelivered.
    `send`: publish now, on the delivery's connection, what nothing waits for (the chunks of a
    streamed answer); dropped once that connection is gone, since the delivery is redelivered.
    `called`: the model call is over. Its call slot goes to the next delivery at once, while
    this one writes its record and replies: the slot bounds calls, not bookkeeping (which the
    prefetch bounds). Calling it again does nothing.
    """

    taken: Taken
    send: Callable[[Sequence[Outgoing]], None]
    called: Callable[[], None]


@dataclass(frozen=True, slots=True)
class Work:
    """A model call to run in a call slot, at most `concurrency` at once; `run` returns the Settlement.

    `publish_first` goes out as soon as the delivery is taken, before the work waits for
    a slot (the primary's fan-out copies, so that the other models run meanwhile).
    """

    run: Callable[[Running], Awaitable[Settlement]]
    publish_first: Sequence[Outgoing] = ()


# What a handler decides for a delivery: settle it now, or after some work.
Decision = Settlement | Work


class Handler(Protocol):
    """A worker's part of a message's life: it decides, the consumer carries it out.

    Every method runs on the worker's event loop, must not block, and returns what should
    happen; none publishes, acks or rejects itself.
    """

    queue: QueueSpec

    def on_delivery(self, delivery: Delivery) -> Decision:
        """What to do with a message taken from `queue`."""
        ...

    def on_give_up(self, delivery: Delivery) -> Decision:
        """The message was delivered too often (it keeps failing or killing workers):
        settle it for good, with its reply or record and a dead letter."""
        ...

    def on_error(self, delivery: Delivery, error: Exception, taken: Sequence[bool] | None) -> Decision:
        """What is owed when handling failed unexpectedly (a bug): never a silent drop, and
        a record for every model the message names that would otherwise have none.

        `taken`: whether a queue took each message of the work's `publish_first`; None when
        they never went out (the bug was in `on_delivery`). A `Work` it returns publishes
        nothing first, and its own failure dead-letters the message bare (`last_resort`)."""
        ...


def too_large(body: bytes, limit: int) -> str | None:
    """Why `body` is refused unread (over `max_body_bytes`), or None."""
    return f"body is {len(body)} bytes, over the limit of {limit}" if len(body) > limit else None


def dead_letter(
    delivery: Delivery,
    queue: str,
    reason: str,
    code: int,
    body: bytes | None = None,
    message_type: str | None = None,
    *,
    keep_whole: bool = False,
    bare: bool = False,
) -> Outgoing:
    """A copy of a message (or `body` instead) for `multillm.dead`, with why it is there in headers.

    Every dead letter is built here. The body has its api keys masked and is cut to
    `DEAD_LETTER_MAX_BODY_BYTES` unless `keep_whole` (a record to replay); the headers
    say whether it was cut, and the size and sha256 of the body as it came. Only our own
    headers go with it: a header the producer sent may not even encode again (pika reads
    a huge double as an int it cannot write back), and a copied `x-delivery-count` would
    make a replayed dead letter look exhausted. `bare`: none of the original's properties
    either, for when they may be what could not be encoded.
    """
    original = delivery.body if body is None else body
    kept, cut = (redact_body(original), False) if keep_whole else _masked_within(original)
    headers = {
        contract.HEADER_ERROR: reason[:1000],
        contract.HEADER_ERROR_CODE: int(code),
        contract.HEADER_SOURCE_QUEUE: queue,
        contract.HEADER_BODY_CUT: cut,
        contract.HEADER_ORIGINAL_BYTES: len(original),
        contract.HEADER_ORIGINAL_SHA256: hashlib.sha256(original).hexdigest(),
    }
    if bare:
        properties = pika.BasicProperties(delivery_mode=contract.PERSISTENT, headers=headers)
    else:
        props = delivery.properties
        properties = pika.BasicProperties(
            content_type=props.content_type,
            delivery_mode=contract.PERSISTENT,
            message_id=props.message_id,
            correlation_id=props.correlation_id,
            reply_to=props.reply_to,
            type=message_type or props.type,
            headers=headers,
        )
    return Outgoing(
        exchange="",
        routing_key=contract.DEAD_QUEUE,
        body=kept,
        properties=properties,
        kind=Published.DEAD_LETTER,
        about=queue,
        code=int(code),
    )


def last_resort(delivery: Delivery) -> Settlement:
    """When even the handler's `on_error` failed: the message dead-lettered with none of its properties
    (they may be what failed), so that it is not lost."""
    reason = "could not settle this message (see the worker's log)"
    return Settlement([dead_letter(delivery, delivery.queue, reason, Code.INTERNAL, bare=True)])


def _masked_within(body: bytes, limit: int = contract.DEAD_LETTER_MAX_BODY_BYTES) -> tuple[bytes, bool]:
    """`body` with its api keys masked and cut to `limit` bytes, and whether it was cut.

    Cut before masking too: masking reads every byte, seconds for a 10 MB body on the
    worker's event loop, and it reads a key cut off by the end as a key (redact.py), so
    what is kept is masked all the same. Cut after masking again: a key shorter than the
    mask makes the body longer.
    """
    cut = len(body) > limit
    masked = redact_body(_cut_utf8(body, limit) if cut else body)
    if len(masked) > limit:
        return _cut_utf8(masked, limit), True
    return masked, cut


def _cut_utf8(body: bytes, limit: int) -> bytes:
    """The first `limit` bytes at most, not splitting a UTF-8 sequence, so the cut body still reads as text."""
    end = limit
    # A continuation byte: its character began before the cut. A UTF-8 character has at most
    # three; a body that is not UTF-8 at all is cut at most three bytes short.
    while end > limit - 3 and body[end] & 0xC0 == 0x80:
        end -= 1
    return body[:end]
