"""The `multillm` command as a user runs it: real processes, real broker, real mock."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from multillm.cli import _parser, main
from multillm.cli.demo import STREAMED_PROMPT
from multillm.config import ENV_BROKER_URL, ENV_CONFIG, ENV_LOG_LEVEL, ENV_SINK_URL
from multillm.mock_llm import Fault
from tests.conftest import StartWorker


def multillm(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "multillm", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_request_prints_the_reply_and_logs_show_every_model(
    start_worker: StartWorker, config_path: Path, broker_url: str
) -> None:
    start_worker("primary")
    start_worker("model", model="mock/upper")
    env = {ENV_CONFIG: str(config_path), ENV_BROKER_URL: broker_url}

    done = multillm("request", "--model", "mock/echo", "--model", "mock/upper", "--json", "hello there", env=env)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["completion"]["choices"][0]["message"]["content"] == "echo says: hello there"
    assert reply["primaryExternalId"].startswith("chatcmpl-")

    listing = json.loads(multillm("logs", "list", "--json", env=env).stdout)
    [request] = listing
    assert request["models"][0] == "mock/echo"

    for _ in range(100):  # the per-model worker writes its record on its own time
        shown = multillm("logs", "show", request["request_id"], env=env)
        if "HELLO THERE" in shown.stdout:
            break
        time.sleep(0.1)
    assert "echo says: hello there" in shown.stdout and "upper says: HELLO THERE" in shown.stdout
    assert "(primary)" in shown.stdout

    stats = json.loads(multillm("logs", "stats", "--json", env=env).stdout)
    assert {s["model_name"]: s["records"] for s in stats} == {"mock/echo": 1, "mock/upper": 1}


def test_request_prints_the_request_id_that_logs_show_takes(
    start_worker: StartWorker, config_path: Path, broker_url: str
) -> None:
    start_worker("primary")
    env = {ENV_CONFIG: str(config_path), ENV_BROKER_URL: broker_url}

    done = multillm("request", "--model", "mock/echo", "good morning", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "echo says: good morning\n"  # the answer alone: the ids go to stderr
    found = re.search(r"^request id (\S+)  \(multillm logs show \1\)$", done.stderr, re.MULTILINE)
    assert found, done.stderr
    [listed] = json.loads(multillm("logs", "list", "--json", env=env).stdout)
    assert found[1] == listed["request_id"]
    assert "(primary log id " in done.stderr  # the reply's id is a record's, and says so
    shown = multillm("logs", "show", found[1], env=env)
    assert shown.returncode == 0 and "echo says: good morning" in shown.stdout

    failed = multillm("request", "--model", "nosuch/model", "hi", env=env)
    assert failed.returncode == 1 and re.search(r"^request id \S+", failed.stderr, re.MULTILINE)


def test_request_with_an_unknown_provider_says_so(start_worker: StartWorker, config_path: Path) -> None:
    start_worker("primary")
    done = multillm("request", "--model", "nosuch/model", "hi", env={ENV_CONFIG: str(config_path)})
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stdout and "unknown provider 'nosuch'" in done.stdout


def test_no_broker_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    done = multillm(
        "request", "--model", "mock/a", "hi", env={ENV_BROKER_URL: "amqp://guest:pw-secret@127.0.0.1:1/"}, cwd=tmp_path
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "pw-secret" not in done.stderr
    assert "no broker answered at amqp://guest:***@127.0.0.1:1/" in done.stderr.strip().splitlines()[-1]


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "multillm.toml").write_text('[providers.mock]\nbase_url = "http://x"\napi_kye = "oops"\n')
    done = multillm("logs", "list", cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown field `api_kye`" in done.stderr and "Traceback" not in done.stderr


def test_unknown_model_provider_for_a_model_worker_is_a_config_error(config_path: Path) -> None:
    done = multillm("worker", "model", "--model", "nosuch/x", env={ENV_CONFIG: str(config_path)})
    assert done.returncode == 2 and "configured: mock" in done.stderr


def test_a_client_that_cannot_be_built_stops_the_worker_at_start(tmp_path: Path) -> None:
    # Clients are built before the broker is contacted: a bad CA setting is a start-up error, not failed calls.
    (tmp_path / "multillm.toml").write_text('[providers.mock]\nbase_url = "https://127.0.0.1:1/v1"\n')
    env = {ENV_BROKER_URL: "amqp://guest:guest@127.0.0.1:1/", "SSL_CERT_FILE": "/nonexistent/ca.pem"}
    done = multillm("worker", "primary", env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "provider 'mock': cannot build its client" in done.stderr
    assert "SSL_CERT_FILE is '/nonexistent/ca.pem'" in done.stderr


def test_a_model_worker_builds_only_its_own_provider(
    start_worker: StartWorker, config_path: Path, broker_url: str
) -> None:
    config_path.write_text(config_path.read_text() + '[providers.broken]\nbase_url = "http://h:abc/v1"\n')
    start_worker("model", model="mock/echo")  # consuming: `broken` is none of its business
    # The primary may call any provider, so it builds them all and refuses to start.
    done = multillm("worker", "primary", env={ENV_CONFIG: str(config_path), ENV_BROKER_URL: broker_url}, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "provider 'broken': cannot build its client: InvalidURL: Invalid port: 'abc'" in done.stderr


def test_demo_runs_end_to_end_and_stops_everything(broker_url: str, tmp_path: Path) -> None:
    sink = tmp_path / "demo.jsonl"
    done = multillm(
        "demo",
        "--requests",
        "3",
        "--latency-ms",
        "20",
        env={ENV_BROKER_URL: broker_url, ENV_SINK_URL: f"jsonl:///{sink}"},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("reply to request") == 3
    assert "stopped 5 workers (exit codes [0, 0, 0, 0, 0])" in done.stdout
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    asks = [r for r in lines if any(a["key"] == "judgeOf" for a in r["log_attributes"])]
    [streamed] = [r for r in lines if {"key": "demo", "value": "streamed"} in r["log_attributes"]]
    records = [r for r in lines if r not in asks and r is not streamed]
    assert len(records) == 9 and all(r["status"] == "ok" for r in records)
    assert sorted(r["is_primary"] for r in records).count(True) == 3
    # The judge asked twice about each of the 6 non-primary answers.
    assert len(asks) == 12 and {r["model_name"] for r in asks} == {"mock/judge"}
    assert "6 of 6 answers judged against their primary's by mock/judge" in done.stdout
    # upper beats echo where either is the primary (requests 0 and 1); request 2's primary is reverse
    assert re.search(r"judge: win / tie / loss\s*│\s*│\s*2 / 0 / 0\s*│", done.stdout), done.stdout
    assert "On 3 pairs: the figures support: the candidate costs" in done.stdout
    # One more answer, streamed and printed as it came: its record has the time to its first token.
    assert f"echo says: {STREAMED_PROMPT}\n  first words after" in done.stdout
    assert streamed["status"] == "ok" and 0 < streamed["time_to_first_token_ms"] < streamed["latency_ms"]


def test_a_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    done = multillm("--log-level", "error", "chaos", "--requests", "120", "--duration", "12", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = dict(
        (cells[1].strip(), cells[2].strip())
        for cells in (line.split("|") for line in done.stdout.splitlines() if line.startswith("| "))
    )
    assert table["requests sent (confirmed)"] == table["replies received"] != "0"
    assert table["lost replies"] == table["lost records"] == "0"
    assert (
        table["replies disagreeing with their record"] == table["ok records with no such answer from the mock"] == "0"
    )
    # Counted where they happen (the mock's log, the workers' logs): numbers, whatever they are.
    calls = int(table["model calls (the mock's log)"])
    assert calls >= 3 * int(table["requests sent (confirmed)"]) + int(table["calls repeating an answered call"])
    assert int(table["duplicate record writes (refused by the sink)"]) >= 0
    assert table["SIGTERMed workers that did not exit 0"] == table["workers that died on their own"] == "0"
    assert int(table["records found"]) == 3 * int(table["requests sent (confirmed)"])
    assert table["worker restarts (SIGKILL + SIGTERM)"] != "0 (0 + 0)"


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser: (), ("worker",), ("worker", "primary"), ..."""
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subcommands(sub, (*path, name))
    return found


def _help(capsys: pytest.CaptureFixture[str], *path: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


BROKER_ONLY = {ENV_BROKER_URL, ENV_CONFIG, ENV_LOG_LEVEL}
SINK_ONLY = {ENV_SINK_URL, ENV_CONFIG, ENV_LOG_LEVEL}
EVERY_VARIABLE = BROKER_ONLY | SINK_ONLY


def _expected_environment(path: tuple[str, ...]) -> set[str]:
    if path[:1] == ("mock-llm",):
        return {ENV_LOG_LEVEL}  # the mock reads no settings
    if path[:1] in (("request",), ("chaos",), ("bench",)):
        return BROKER_ONLY
    if path == ("logs", "replay-dead"):
        return EVERY_VARIABLE  # from the broker's dead letters to the sink
    if path == ("logs", "score"):
        return BROKER_ONLY  # a message to the workers, which write it
    if path[:1] == ("logs",):
        return SINK_ONLY
    return EVERY_VARIABLE  # the top level, the workers (they write records) and the demo


@pytest.mark.parametrize("path", _subcommands(_parser()), ids=lambda p: " ".join(p) or "multillm")
def test_every_help_names_its_environment_and_its_defaults(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help(capsys, *path)
    environment = text.partition("\nenvironment:\n")[2]
    named = {word for word in environment.split() if word.startswith("MULTILLM_")}
    assert named == _expected_environment(path), text
    parser = _parser()
    for name in path:
        [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    for action in parser._actions:
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.help != argparse.SUPPRESS:
            assert action.help and "default" in action.help, f"{action.option_strings} does not say its default"


def test_request_help_describes_the_prompt_timeout_and_primary(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(_help(capsys, "request").split())
    assert "prompt the user message sent to every model" in text
    assert "--timeout SECONDS how long to wait for the reply (default 60)" in text
    assert "--display-model INDEX which --model (0 = the first) is the primary" in text
    assert "request id that `multillm logs show` takes" in text


def test_mock_llm_help_documents_its_faults(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "mock-llm")
    assert "(default 150)" in text and "(default 8089)" in text and "(default 127.0.0.1)" in text
    for route in ("POST   /_mock/faults", "DELETE /_mock/faults", "GET    /_mock/calls"):
        assert route in text
    # Every field a fault takes is named (the help is checked against the wire type, not a copy).
    for field in msgspec.structs.fields(Fault):
        assert f'"{field.name}"' in text, field.name
