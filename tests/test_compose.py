"""docker-compose.yml on paper: it validates, and every name in it is one multillm knows.

No Docker engine is needed: `docker compose config` only reads the file, and the rest
parses it with PyYAML and checks it against the CLI's own parser, the config loader and
the README.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from multillm.cli import _parser
from multillm.config import ENV_BROKER_URL, ENV_CONFIG, ENV_SINK_URL, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
README = ROOT / "README.md"
README_SECTION = "## Run everything with Docker Compose"
METRICS_PORT = "9100"


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict) and found
    return found


def multillm_services() -> dict[str, dict[str, Any]]:
    """The services that run our image (ENTRYPOINT multillm), by their `build`."""
    return {name: s for name, s in services().items() if "build" in s}


def workers() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in multillm_services().items() if s["command"][0] == "worker"}


def readme_section() -> str:
    text = README.read_text()
    assert README_SECTION in text, f"README.md has no {README_SECTION!r} section"
    section = text.split(README_SECTION, 1)[1]
    return section.split("\n## ", 1)[0]


def env_names_read_by_multillm() -> set[str]:
    """Every `MULTILLM_...` name spelled in the package's source: the variables it can read."""
    names: set[str] = set()
    for path in (ROOT / "multillm").rglob("*.py"):
        names.update(re.findall(r"\bMULTILLM_[A-Z_]+\b", path.read_text()))
    return names


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) or `docker-compose` (v1), whichever this machine has."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` (the compose plugin) nor `docker-compose` is installed")
    done = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_every_service_the_readme_names_is_defined_and_no_other() -> None:
    table_rows = re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", readme_section(), flags=re.MULTILINE)
    assert table_rows, "the README's compose section has no table of services"
    assert sorted(table_rows) == sorted(services())


def test_the_infrastructure_services_have_health_checks() -> None:
    found = services()
    assert found["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")
    assert "rabbitmq-diagnostics" in found["rabbitmq"]["healthcheck"]["test"]
    assert found["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in found["postgres"]["healthcheck"]["test"]
    for name, service in found.items():
        assert service.get("restart") in {"always", "unless-stopped", "on-failure"}, name


def test_every_multillm_command_is_a_real_subcommand() -> None:
    parser = _parser()
    kinds = set()
    for name, service in multillm_services().items():
        command = service["command"]
        assert isinstance(command, list) and all(isinstance(a, str) for a in command), name
        args, unknown = parser.parse_known_args(command)
        assert unknown == [], f"{name}: unknown arguments {unknown}"
        kinds.add((args.command, getattr(args, "kind", None)))
    assert kinds == {("mock-llm", None), ("worker", "primary"), ("worker", "model")}


def test_workers_serve_metrics_on_a_published_port() -> None:
    published_host_ports = []
    for name, service in workers().items():
        command = service["command"]
        assert command[command.index("--metrics-port") + 1] == METRICS_PORT, name
        [port] = service["ports"]
        host_port, container_port = str(port).rsplit(":", 2)[-2:]
        assert container_port == METRICS_PORT, name
        published_host_ports.append(host_port)
    assert len(set(published_host_ports)) == len(published_host_ports), "two workers share a host port"


def test_workers_are_wired_by_environment_variables_multillm_reads() -> None:
    readable = env_names_read_by_multillm()
    assert {ENV_BROKER_URL, ENV_SINK_URL, ENV_CONFIG} <= readable
    found = services()
    for name, service in multillm_services().items():
        env = service.get("environment", {})
        unknown = {k for k in env if k.startswith("MULTILLM_")} - readable
        assert not unknown, f"{name} sets variables multillm never reads: {unknown}"
    for name, service in workers().items():
        env = service["environment"]
        broker, sink = urlsplit(env[ENV_BROKER_URL]), urlsplit(env[ENV_SINK_URL])
        assert broker.scheme == "amqp" and broker.hostname == "rabbitmq" and broker.hostname in found, name
        assert sink.scheme == "postgresql" and sink.hostname == "postgres", name
        assert sink.path == "/" + found["postgres"]["environment"]["POSTGRES_DB"], name
        for dependency in ("rabbitmq", "postgres"):
            assert service["depends_on"][dependency]["condition"] == "service_healthy", name
        for dependency, how in service["depends_on"].items():
            if how["condition"] == "service_healthy":
                assert "healthcheck" in found[dependency], f"{name} waits for {dependency}, which has no health check"


def test_the_mounted_config_points_the_mock_provider_at_the_mock_service() -> None:
    mock_args = _parser().parse_args(services()["mock-llm"]["command"])
    for name, service in workers().items():
        config_in_container = service["environment"][ENV_CONFIG]
        mounts = dict(reversed(v.split(":")[:2]) for v in service["volumes"])
        assert config_in_container in mounts, f"{name}: {config_in_container} is not mounted"
        settings = load_settings(ROOT / mounts[config_in_container])  # raises on an unknown key
        mock = urlsplit(settings.providers["mock"].base_url)
        assert (mock.hostname, mock.port) == ("mock-llm", mock_args.port), name
        if service["command"][1] == "model":
            model = service["command"][service["command"].index("--model") + 1]
            assert model.split("/", 1)[0] in settings.providers, f"{name}: no provider for {model}"


def test_the_readme_request_reaches_a_worker_for_every_model() -> None:
    """The primary worker calls the primary model; every other model needs its own worker."""
    [line] = [ln for ln in readme_section().splitlines() if "multillm request" in ln]
    args = _parser().parse_args(shlex.split(line.split("multillm", 1)[1].split("#", 1)[0]))
    served = {s["command"][s["command"].index("--model") + 1] for s in workers().values() if "--model" in s["command"]}
    assert "primary" in services()
    others = [m for i, m in enumerate(args.model) if i != args.display_model]
    assert others and set(others) <= served


def test_the_image_runs_multillm_as_a_user_other_than_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^ENTRYPOINT \[\"multillm\"\]$", dockerfile, flags=re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert "[postgres]" in dockerfile
