"""`AmqpSession` against the real broker: awaited RPCs, and nothing left waiting when the channel or connection goes."""

from __future__ import annotations

import asyncio

import pika
import pika.exceptions
import pytest

from multillm.workers.amqp_session import AmqpSession


def test_calls_answer_and_a_refused_one_ends_the_session_for_every_waiter(broker_url: str) -> None:
    async def scenario() -> None:
        session = await AmqpSession.open(pika.URLParameters(broker_url))
        channel = session.channel
        assert channel is not None and session.is_open
        frame = await session.call(channel.queue_declare, "amqp-session-test", durable=False, auto_delete=True)
        assert frame.method.queue == "amqp-session-test"
        # The same name with other arguments: the broker closes the channel with 406.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            await session.call(channel.queue_declare, "amqp-session-test", durable=True)
        assert refused.value.reply_code == 406
        assert session.gone.done() and not session.is_open
        # Once the session is over, a call fails at once with the same reason instead of waiting.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            await asyncio.wait_for(session.call(channel.basic_qos, prefetch_count=1), 5)
        await session.aclose()
        assert session.closed.done()

    asyncio.run(scenario())


def test_a_lost_session_fails_a_pending_call_with_the_reason(broker_url: str) -> None:
    async def scenario() -> None:
        session = await AmqpSession.open(pika.URLParameters(broker_url))
        channel = session.channel
        assert channel is not None
        # A method that never calls back, as a broker that never answers.
        pending = asyncio.ensure_future(session.call(lambda callback: None))
        await asyncio.sleep(0)
        session.lose(ConnectionResetError("cut"))
        with pytest.raises(ConnectionResetError, match="cut"):
            await asyncio.wait_for(pending, 5)
        await session.aclose()
        assert session.closed.done()

    asyncio.run(scenario())


def test_an_unreachable_broker_fails_open() -> None:
    async def scenario() -> None:
        params = pika.URLParameters("amqp://guest:guest@127.0.0.1:1/%2F?connection_attempts=1&socket_timeout=2")
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            await asyncio.wait_for(AmqpSession.open(params), 20)

    asyncio.run(scenario())


def test_a_watched_future_fails_when_the_session_ends_and_at_once_after(broker_url: str) -> None:
    async def scenario() -> None:
        session = await AmqpSession.open(pika.URLParameters(broker_url))
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[int] = loop.create_future()
        session.watch(answered)
        answered.set_result(7)  # done before the session ends: left as it is
        waiting: asyncio.Future[int] = loop.create_future()
        session.watch(waiting)
        session.lose(ConnectionResetError("cut"))
        with pytest.raises(ConnectionResetError, match="cut"):
            await asyncio.wait_for(waiting, 5)
        assert answered.result() == 7
        late: asyncio.Future[int] = loop.create_future()
        session.watch(late)
        with pytest.raises(ConnectionResetError, match="cut"):
            await asyncio.wait_for(late, 5)
        await session.aclose()

    asyncio.run(scenario())


def test_the_frames_of_one_turn_reach_the_socket_as_one_write_in_their_order(broker_url: str) -> None:
    queue = "amqp-session-coalescing"

    async def scenario() -> None:
        session = await AmqpSession.open(pika.URLParameters(broker_url))
        channel = session.channel
        assert channel is not None
        await session.call(channel.queue_declare, queue, durable=False)
        await session.call(channel.queue_purge, queue)
        # pika's own transport, watched as it is handed the bytes: it still sends them itself.
        transport = session.connection._transport
        handed = transport.write
        writes: list[bytes] = []

        def write(data: bytes) -> None:
            writes.append(data)
            handed(data)

        transport.write = write
        for i in range(50):  # 150 frames in one turn: method, header and body each
            channel.basic_publish("", queue, str(i).encode())
        assert writes == []  # nothing before the turn is over
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(writes) == 1
        await session.call(channel.queue_declare, queue, passive=True)  # a round trip: all of it arrived
        assert len(writes) == 2
        await session.aclose()

    asyncio.run(scenario())
    # What the broker holds, read by a plain pika client: all fifty, in the order they were published.
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        bodies = []
        while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
            bodies.append(got[2])
        channel.queue_delete(queue)
    finally:
        connection.close()
    assert bodies == [str(i).encode() for i in range(50)]
