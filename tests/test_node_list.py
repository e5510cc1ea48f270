"""A broker URL that lists several nodes (`;`), on the one broker of this machine.

The cluster itself is tested in tests/test_cluster.py; here, what needs no cluster: the list is
checked (a bad entry is named, its password masked, exit 2), a node that refuses does not stop
the others, and where each part starts in the list.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from pathlib import Path

import pytest

from multillm.config import ENV_BROKER_URL, ENV_CONFIG
from multillm.errors import ConfigError
from multillm.producers import AsyncClient, Client, ReplyQueue, make_request
from multillm.testbed.rabbitmq import rabbitmqctl, vhost_of
from multillm.urls import broker_nodes
from multillm.workers.nodes import BrokerNodes
from tests.conftest import StartWorker
from tests.test_cli import multillm

SECRET = "s3cret-pw"
# Nothing listens on port 1: a node that refuses at once.
REFUSING = f"amqp://guest:{SECRET}@127.0.0.1:1/%2F"


def test_one_url_and_a_list_of_nodes() -> None:
    assert broker_nodes("amqp://guest:guest@localhost:5672/%2F") == ["amqp://guest:guest@localhost:5672/%2F"]
    assert broker_nodes("amqp://a:1/v; amqps://u:p@b/v ;amqp://c:3") == [
        "amqp://a:1/v",
        "amqps://u:p@b/v",
        "amqp://c:3",
    ]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"amqp://u:{SECRET}@a:5672/;;amqp://c", "entry 2 of 3 ('') is empty"),
        (f"amqp://u:{SECRET}@a:5672/;", "entry 2 of 2 ('') is empty"),
        (f"amqp://u:{SECRET}@a/;http://u:{SECRET}@b/", "entry 2 of 2 ('http://u:***@b/') must start with amqp://"),
        (f"amqp://u:{SECRET}@a/;rabbit-2:5672", "entry 2 of 2 ('rabbit-2:5672') must start with amqp://"),
        (f"amqp://u:{SECRET}@:5672/;amqp://b", "entry 1 of 2 ('amqp://u:***@:5672/') names no host"),
        (f"amqp://u:{SECRET}@a:99999/", "the broker URL ('amqp://u:***@a:99999/') is not a URL"),
        # A '#' in a password ends the URL's host part: urlsplit's own message would quote the rest.
        (f"amqp://a/;amqp://u:{SECRET}#x@b/", "entry 2 of 2 ('amqp://u:***@b/') is not a URL"),
        (f"amqp://a/;amqp://u:{SECRET}@b:0/", "entry 2 of 2 ('amqp://u:***@b:0/') has port 0"),
    ],
)
def test_a_bad_entry_is_named_and_its_password_masked(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        broker_nodes(url)
    assert problem in str(raised.value)
    assert SECRET not in str(raised.value)


def test_a_query_pika_refuses_is_a_configuration_error_too() -> None:
    with pytest.raises(ConfigError, match=r"entry 2 of 2 \('amqp://u:\*\*\*@b/\?heartbeat=often'\)") as raised:
        BrokerNodes(f"amqp://a/;amqp://u:{SECRET}@b/?heartbeat=often")
    assert SECRET not in str(raised.value)


def test_every_client_refuses_a_malformed_list_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = f"amqp://guest:{SECRET}@127.0.0.1:5672/;amqp//127.0.0.1:5673/"
    for build in (
        lambda: Client(bad, connect_timeout=1),
        lambda: ReplyQueue(bad, name="replies"),
        lambda: asyncio.run(AsyncClient(bad, connect_timeout=1).close()),
    ):
        with pytest.raises(ConfigError, match="entry 2 of 2") as raised:
            build()
        assert SECRET not in str(raised.value)
    monkeypatch.setenv(ENV_BROKER_URL, bad)
    with pytest.raises(ConfigError, match="entry 2 of 2"):
        Client(connect_timeout=1)


@pytest.mark.parametrize(
    "command",
    [
        ["request", "--model", "mock/a", "hi"],
        ["worker", "primary"],
        ["worker", "model", "--model", "mock/a"],
        ["logs", "replay-dead"],
        ["demo"],
        ["bench"],
        ["chaos"],
    ],
)
def test_a_malformed_list_is_a_configuration_error_for_every_command(command: list[str], tmp_path: Path) -> None:
    bad = f"amqp://guest:{SECRET}@127.0.0.1:5672/%2F;amqp://guest:{SECRET}@/%2F"
    done = multillm(*command, env={ENV_BROKER_URL: bad}, cwd=tmp_path, timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"{ENV_BROKER_URL}: entry 2 of 2 ('amqp://guest:***@/%2F') names no host" in done.stderr
    assert SECRET not in done.stderr + done.stdout


def test_a_malformed_list_in_the_config_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "multillm.toml"
    config.write_text('broker_url = "amqp://localhost/;"\n')
    done = multillm("request", "--model", "mock/a", "hi", env={ENV_CONFIG: str(config)}, timeout=30)
    assert done.returncode == 2
    assert f"{config}: broker_url: entry 2 of 2 ('') is empty" in done.stderr


def test_a_refusing_node_does_not_stop_the_others(
    start_worker: StartWorker, broker_url: str, config_path: Path
) -> None:
    """The first node refuses: the workers (told to start at the first node), the `multillm request`
    command and a Client go on to the second, and the worker's log names both nodes."""
    config_path.write_text('broker_failover = "round-robin"\n' + config_path.read_text())
    nodes = f"{REFUSING};{broker_url}"
    primary = start_worker("primary", env={ENV_BROKER_URL: nodes})
    start_worker("model", model="mock/upper", env={ENV_BROKER_URL: nodes})
    done = multillm(
        "request", "--model", "mock/echo", "--model", "mock/upper", "--json", "over the list",
        env={ENV_CONFIG: str(config_path), ENV_BROKER_URL: nodes},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["completion"]["choices"][0]["message"]["content"] == "echo says: over the list"
    with Client(nodes, connect_timeout=10) as client:
        reply = client.create(make_request(["mock/echo"], "again"), timeout=30)
    assert reply.text == "echo says: again"
    log = primary.log_text()
    [unreachable] = [line for line in log.splitlines() if "broker.node_unreachable" in line]
    assert "127.0.0.1:1" in unreachable and "ConnectionRefused" in unreachable
    [consuming] = [line for line in log.splitlines() if "worker.consuming" in line]
    assert "127.0.0.1:5672" in consuming
    assert SECRET not in log


def test_a_node_that_never_answers_does_not_stop_a_client(start_worker: StartWorker, broker_url: str) -> None:
    """A listening socket that never speaks AMQP (a machine that died with its port open) listed
    first, and spaces around the ';': the Client waits out one node's connect timeout, then
    goes on to the broker."""
    start_worker("primary")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        nodes = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/%2F ; {broker_url}"
        with Client(nodes, connect_timeout=30) as client:
            reply = client.create(make_request(["mock/echo"], "past a silent node"), timeout=30)
    assert reply.text == "echo says: past a silent node"


def test_a_client_given_a_cluster_keeps_its_replies_in_a_quorum_queue(broker_url: str) -> None:
    """Replies to calls in flight must survive the node that holds the queue (docs/operations.md)."""
    with (
        Client(broker_url, connect_timeout=5) as single,
        Client(f"{broker_url};{broker_url}", connect_timeout=5) as listed,
    ):
        types = dict(
            line.split("\t")
            for line in rabbitmqctl("list_queues", "-p", vhost_of(broker_url), "name", "type", "--no-table-headers")
            .strip()
            .splitlines()
        )
        assert types[single.reply_queue] == "classic"
        assert types[listed.reply_queue] == "quorum"


def test_shuffle_spreads_the_first_node_and_round_robin_starts_at_the_first() -> None:
    url = "amqp://a:1/;amqp://b:2/;amqp://c:3/"
    firsts = {next(BrokerNodes(url, "shuffle", random.Random(seed)).attempts())[0] for seed in range(30)}
    assert firsts == {"a:1", "b:2", "c:3"}
    ordered = BrokerNodes(url, "round-robin")
    assert [name for name, _ in ordered.attempts()] == ["a:1", "b:2", "c:3"]


def test_after_a_lost_connection_the_node_it_was_on_is_tried_last() -> None:
    nodes = BrokerNodes("amqp://a:1/;amqp://b:2/;amqp://c:3/", "round-robin")
    nodes.connected("b:2")
    assert nodes.current == "b:2"
    assert [name for name, _ in nodes.attempts()] == ["c:3", "a:1", "b:2"]
    # Shuffled, a fleet that loses a node spreads over all the others, and tries that node last.
    after_b = set()
    for seed in range(30):
        shuffled = BrokerNodes("amqp://a:1/;amqp://b:2/;amqp://c:3/", "shuffle", random.Random(seed))
        shuffled.connected("b:2")
        order = [name for name, _ in shuffled.attempts()]
        assert order[-1] == "b:2"
        after_b.add(order[0])
    assert after_b == {"a:1", "c:3"}
    single = BrokerNodes("amqp://a:1/")
    single.connected("a:1")
    assert [name for name, _ in single.attempts()] == ["a:1"]
