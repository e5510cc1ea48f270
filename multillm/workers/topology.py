"""Declaring the worker's side of the topology that contract.py describes."""

from __future__ import annotations

import pika.exceptions

from multillm import contract
from multillm.contract import QueueSpec
from multillm.errors import ConfigError
from multillm.workers.amqp_session import AmqpSession


def queues_for(consumed: list[QueueSpec]) -> tuple[QueueSpec, ...]:
    """The queues a worker consuming `consumed` declares: those, and the two every work queue dead-letters
    through (triage, then dead), each once."""
    declared = [*consumed, contract.triage_queue(), contract.dead_queue()]
    return tuple({spec.name: spec for spec in declared}.values())


async def declare(session: AmqpSession, queues: tuple[QueueSpec, ...]) -> None:
    """Declare every exchange, then these queues and their bindings, and remove the obsolete bindings
    of these queues; idempotent, so every start may.

    Raises:
        ConfigError: the broker has one of them with other arguments (406): retrying cannot help.
    """
    channel = session.channel
    assert channel is not None
    try:
        for exchange, kind in contract.EXCHANGES.items():
            await session.call(channel.exchange_declare, exchange, exchange_type=kind, durable=True)
        for spec in queues:
            await session.call(channel.queue_declare, spec.name, durable=True, arguments=spec.arguments)
            if spec.exchange:
                await session.call(channel.queue_bind, spec.name, spec.exchange, routing_key=spec.routing_key)
        declared = {spec.name for spec in queues}
        for queue, exchange, routing_key in contract.OBSOLETE_BINDINGS:
            if queue in declared:
                await session.call(channel.queue_unbind, queue, exchange, routing_key=routing_key)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        raise ConfigError(
            f"the broker refused our topology: {exc.reply_text}. Another program declared it with other "
            "arguments; delete that queue or exchange (it is empty when drained) or align the arguments"
        ) from None
