"""The library is silent unless the application configures logging; then its lines show.

Each case is a fresh interpreter (logging configuration is process-wide): it makes a
`Client`, sends it a reply nobody waits for (`reply.unmatched`, a debug line) and then
the reply to its own request, so the first has been logged when `wait` returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys

import kombu

{prelude}

import multillm
from multillm import contract
from multillm.producers import client as client_module
from multillm.producers.publishing import connect

url = sys.argv[1]
with multillm.Client(url, connect_timeout=10) as client:
    pending = client.submit(multillm.make_request(["mock/none"], "hi"), timeout=30)
    with connect(url) as connection:
        producer = kombu.Producer(connection.default_channel)
        for correlation_id in ("nobody-waits", pending.request_id):
            producer.publish(
                b'{{"code": 5, "message": "no such model"}}',
                routing_key=client.reply_queue,
                type=contract.TYPE_ERROR,
                content_type=contract.CONTENT_TYPE,
                correlation_id=correlation_id,
            )
    try:
        client.wait(pending, timeout=30)
    except multillm.NotFound:
        pass
    # A warning too: the standard library prints those even unconfigured, unless a handler is found.
    client_module.log.warning("probe.warning", n=1)
print("done")
"""

PRELUDES = {
    "unconfigured": "",
    "stdlib": "import logging\nlogging.basicConfig(level=logging.DEBUG, format='%(name)s %(levelname)s %(message)s')",
    "structlog": (
        "import structlog\nstructlog.configure(processors=[structlog.processors.add_log_level,"
        " structlog.processors.JSONRenderer()], logger_factory=structlog.PrintLoggerFactory(sys.stderr))"
    ),
    "cli": "from multillm.logging_setup import configure_logging\nconfigure_logging('debug', json=True)",
}


def run_script(prelude: str, broker_url: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(prelude=prelude), broker_url],
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.endswith("done\n"), done.stderr
    return done


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_client_in_an_unconfigured_application_prints_nothing(broker_url: str) -> None:
    done = run_script(PRELUDES["unconfigured"], broker_url)
    assert (done.stdout, done.stderr) == ("done\n", "")


def test_an_application_that_configures_the_standard_library_sees_the_lines(broker_url: str) -> None:
    done = run_script(PRELUDES["stdlib"], broker_url)
    assert done.stdout == "done\n"
    assert "multillm.producers.client DEBUG reply.unmatched correlation_id='nobody-waits'\n" in done.stderr
    assert "multillm.producers.client WARNING probe.warning n=1\n" in done.stderr


def test_an_application_that_configures_structlog_sees_the_lines(broker_url: str) -> None:
    done = run_script(PRELUDES["structlog"], broker_url)
    assert done.stdout == "done\n"
    lines = json_lines(done.stderr)
    assert {"event": "reply.unmatched", "level": "debug", "correlation_id": "nobody-waits"} in lines
    assert {"event": "probe.warning", "level": "warning", "n": 1} in lines


def test_the_cli_configuration_logs_as_it_always_did(broker_url: str) -> None:
    done = run_script(PRELUDES["cli"], broker_url)
    [unmatched] = [line for line in json_lines(done.stderr) if line["event"] == "reply.unmatched"]
    assert set(unmatched) == {"event", "level", "timestamp", "correlation_id"}
    assert (unmatched["level"], unmatched["correlation_id"]) == ("debug", "nobody-waits")
