"""Clients given no URL connect where the `multillm` command would: `$MULTILLM_BROKER_URL`."""

from __future__ import annotations

import asyncio

import kombu.exceptions
import pytest

from multillm import contract
from multillm.config import ENV_BROKER_URL
from multillm.errors import BrokerUnavailable
from multillm.producers import AsyncClient, Client, ReplyQueue
from multillm.producers.publishing import connect


def queue_exists(broker_url: str, name: str) -> bool:
    with connect(broker_url) as connection:
        try:
            connection.default_channel.queue_declare(name, passive=True)
        except kombu.exceptions.ChannelError:
            return False
        return True


def test_client_without_a_url_uses_the_environment(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BROKER_URL, broker_url)  # a vhost of this test's own: nothing else declares there
    with Client(connect_timeout=5) as client:
        assert queue_exists(broker_url, client.reply_queue)


def test_async_client_without_a_url_uses_the_environment(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BROKER_URL, broker_url)

    async def start_and_close() -> None:
        client = AsyncClient(connect_timeout=5)
        await client.close()

    assert not queue_exists(broker_url, contract.REQUEST_QUEUE)
    asyncio.run(start_and_close())
    assert queue_exists(broker_url, contract.REQUEST_QUEUE)


def test_reply_queue_without_a_url_uses_the_environment(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BROKER_URL, broker_url)
    replies = ReplyQueue(name="my-service.replies")
    try:
        replies.declare()
    finally:
        replies.close()
    assert queue_exists(broker_url, "my-service.replies")


def test_a_reply_queue_needs_a_name() -> None:
    with pytest.raises(ValueError, match="name of its queue"):
        ReplyQueue()


def test_an_explicit_url_wins_over_the_environment(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BROKER_URL, "amqp://guest:guest@127.0.0.1:1/")
    with Client(broker_url, connect_timeout=5) as client:
        assert queue_exists(broker_url, client.reply_queue)


def test_the_environment_names_an_unreachable_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BROKER_URL, "amqp://guest:guest@127.0.0.1:1/")
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1/"):
        Client(connect_timeout=1)
