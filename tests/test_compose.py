"""docker-compose.yml on paper: it validates, and every name in it is one multillm knows.

No Docker engine is needed: `docker compose config` only reads the file, and the rest
parses it with PyYAML and checks it against the CLI's own parser, the config loader and
the README. The `cluster` profile (three RabbitMQ nodes and workers given all three) is
checked too: its node list, shared cookie and cluster-formation config, and that a plain
`docker compose up` still starts what it did before the profile.
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
from multillm.errors import ConfigError
from multillm.urls import broker_nodes

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
README = ROOT / "README.md"
README_SECTION = "## Run everything with Docker Compose"
METRICS_PORT = "9100"
CLUSTER_PROFILE = "cluster"
MONITORING_PROFILE = "monitoring"
PROFILES = (CLUSTER_PROFILE, MONITORING_PROFILE)
# What a plain `docker compose up` starts (the services without a profile): the same six
# as before the cluster profile existed.
DEFAULT_SERVICES = {"rabbitmq", "postgres", "mock-llm", "primary", "worker-upper", "worker-reverse"}
CLUSTER_NODE_COUNT = 3
AMQP_PORT = 5672
RABBITMQ_DATA_DIR = "/var/lib/rabbitmq"
# Where the image's RabbitMQ and Erlang look for the cookie ($HOME of the rabbitmq user).
ERLANG_COOKIE_IN_CONTAINER = RABBITMQ_DATA_DIR + "/.erlang.cookie"
RABBITMQ_CONF_IN_CONTAINER = "/etc/rabbitmq/rabbitmq.conf"


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


def profiles(service: dict[str, Any]) -> list[str]:
    found = service.get("profiles", [])
    assert isinstance(found, list)
    return found


def in_setup(profile: str | None, found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services of `found` in a profile, or (None) the default ones: those without a profile."""
    return {name: s for name, s in found.items() if (profile in profiles(s) if profile else not profiles(s))}


def cluster_nodes() -> dict[str, dict[str, Any]]:
    """The cluster profile's RabbitMQ services."""
    return {
        n: s for n, s in in_setup(CLUSTER_PROFILE, services()).items() if s.get("image", "").startswith("rabbitmq:")
    }


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each port the service publishes."""
    found = []
    for port in service.get("ports", []):
        assert isinstance(port, str), f'{port!r}: quote ports as "IP:HOST:CONTAINER" strings'
        host_ip, host_port, container_port = port.split(":")
        found.append((host_ip, int(host_port), int(container_port)))
    return found


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each short-syntax volume of the service: {path in the container: (source, mode)}."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        found[target] = (source, mode[0] if mode else "rw")
    return found


def rabbitmq_conf(path: Path) -> dict[str, str]:
    """A rabbitmq.conf (sysctl format: `key = value` lines and # comments) as a dict."""
    settings: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, sep, value = line.partition("=")
            assert sep and key.strip() not in settings, f"{path}: {line!r}"
            settings[key.strip()] = value.strip()
    return settings


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


def run_compose(command: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("profile_args", [[], *(["--profile", p] for p in PROFILES)], ids=["default", *PROFILES])
def test_docker_compose_config_accepts_the_file(profile_args: list[str]) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` (the compose plugin) nor `docker-compose` is installed")
    done = run_compose(command, *profile_args, "config", "--quiet")
    assert done.returncode == 0, done.stderr


def test_a_plain_up_starts_what_it_did_and_the_profile_only_adds() -> None:
    found = services()
    for name, service in found.items():
        assert profiles(service) in ([], *([p] for p in PROFILES)), f"{name}: profiles {profiles(service)}"
    assert set(in_setup(None, found)) == DEFAULT_SERVICES
    for profile in PROFILES:
        assert set(in_setup(profile, found)), f"the {profile} profile has no services"
    # A default service waiting for one of the profile's would not start without it.
    for name, service in in_setup(None, found).items():
        assert set(service.get("depends_on", {})) <= DEFAULT_SERVICES, name


@pytest.mark.parametrize("profile", [None, *PROFILES], ids=["default", *PROFILES])
def test_compose_enables_the_services_of_the_profiles_named(profile: str | None) -> None:
    """The same, asked of Compose itself (v2: v1's `config --services` lists every profile's)."""
    command = compose_command()
    if command != ["docker", "compose"]:
        pytest.skip("needs `docker compose` (the compose plugin, v2)")
    done = run_compose(command, *(["--profile", profile] if profile else []), "config", "--services")
    assert done.returncode == 0, done.stderr
    expected = DEFAULT_SERVICES | (set(in_setup(profile, services())) if profile else set())
    assert set(done.stdout.split()) == expected


def test_every_service_the_readme_names_is_defined_and_no_other() -> None:
    """The table lists the default services; the cluster profile's are named beside it."""
    section = readme_section()
    table_rows = re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", section, flags=re.MULTILINE)
    assert table_rows, "the README's compose section has no table of services"
    assert sorted(table_rows) == sorted(in_setup(None, services()))
    assert f"docker compose --profile {CLUSTER_PROFILE} up" in section
    named = set(re.findall(r"`([a-z0-9-]+)`", section))
    assert set(in_setup(CLUSTER_PROFILE, services())) <= named


def test_the_infrastructure_services_have_health_checks() -> None:
    found = services()
    for name in ["rabbitmq", *cluster_nodes()]:
        assert found[name]["image"].startswith("rabbitmq:3.13"), name
        assert "rabbitmq-diagnostics" in found[name]["healthcheck"]["test"], name
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
        brokers = [urlsplit(node) for node in broker_nodes(env[ENV_BROKER_URL])]
        sink = urlsplit(env[ENV_SINK_URL])
        # The default workers use the single node; the cluster's, all of its nodes.
        expected = sorted(cluster_nodes()) if CLUSTER_PROFILE in profiles(service) else ["rabbitmq"]
        assert sorted(b.hostname or "" for b in brokers) == expected, name
        assert all(b.scheme == "amqp" and b.hostname in found for b in brokers), name
        assert sink.scheme == "postgresql" and sink.hostname == "postgres", name
        assert sink.path == "/" + found["postgres"]["environment"]["POSTGRES_DB"], name
        for dependency in (*expected, "postgres"):
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


@pytest.mark.parametrize("profile", [None, CLUSTER_PROFILE], ids=["default", "cluster"])
def test_the_readme_request_reaches_a_worker_for_every_model(profile: str | None) -> None:
    """The primary worker calls the primary model; every other model needs its own worker,
    on the single node and on the cluster alike."""
    [line] = [ln for ln in readme_section().splitlines() if "multillm request" in ln]
    args = _parser().parse_args(shlex.split(line.split("multillm", 1)[1].split("#", 1)[0]))
    commands = [s["command"] for s in in_setup(profile, workers()).values()]
    served = {c[c.index("--model") + 1] for c in commands if "--model" in c}
    assert [c[1] for c in commands].count("primary") == 1
    others = [m for i, m in enumerate(args.model) if i != args.display_model]
    assert others and set(others) <= served


def test_the_cluster_workers_run_the_default_workers_commands() -> None:
    default = sorted(s["command"] for s in in_setup(None, workers()).values())
    assert sorted(s["command"] for s in in_setup(CLUSTER_PROFILE, workers()).values()) == default


def test_the_cluster_workers_broker_url_lists_the_three_nodes() -> None:
    nodes = cluster_nodes()
    assert len(nodes) == CLUSTER_NODE_COUNT
    cluster_workers = in_setup(CLUSTER_PROFILE, workers())
    assert cluster_workers
    for name, service in cluster_workers.items():
        try:
            node_urls = broker_nodes(service["environment"][ENV_BROKER_URL])
        except ConfigError as exc:
            pytest.fail(f"{name}: {exc}")
        parts = [urlsplit(url) for url in node_urls]
        assert sorted(p.hostname or "" for p in parts) == sorted(nodes), f"{name}: not each node once"
        for part in parts:
            assert part.scheme == "amqp" and part.port == AMQP_PORT, f"{name}: {part.hostname}"
        assert "rabbitmq" not in service["depends_on"], f"{name} waits for the single node"
    for name, node in nodes.items():
        assert AMQP_PORT in [container for _, _, container in published_ports(node)], f"{name}: no AMQP port"


def test_the_cluster_nodes_share_one_cookie_and_one_formation_config() -> None:
    nodes = cluster_nodes()
    secrets = compose()["secrets"]
    named_volumes = compose()["volumes"]
    cookie_files, conf_files, data_volumes = set(), set(), set()
    for name, node in nodes.items():
        # The node's name is rabbit@<hostname>; its peers reach it by that name, the service's.
        assert node["hostname"] == name
        [secret] = node["secrets"]
        source, target = (secret, secret) if isinstance(secret, str) else (secret["source"], secret["target"])
        secret_path = target if target.startswith("/") else f"/run/secrets/{target}"
        cookie_files.add(secrets[source]["file"])
        # The entrypoint copies the secret to where Erlang reads the cookie, only the
        # owner (rabbitmq) able to read it, then runs the image's entrypoint.
        shell, flag, script, *_ = node["entrypoint"]
        assert (shell, flag) == ("sh", "-c"), name
        copy = re.search(
            r"\binstall -m 0?[46]00 -o rabbitmq -g rabbitmq (\S+) (\S+) && exec docker-entrypoint\.sh ", script
        )
        assert copy and copy.groups() == (secret_path, ERLANG_COOKIE_IN_CONTAINER), f"{name}: {script}"
        assert node["command"] == ["rabbitmq-server"], name
        volumes = mounts(node)
        data, _ = volumes[RABBITMQ_DATA_DIR]
        assert data in named_volumes, name
        data_volumes.add(data)
        conf_source, mode = volumes[RABBITMQ_CONF_IN_CONTAINER]
        assert mode == "ro", f"{name}: {RABBITMQ_CONF_IN_CONTAINER} is not read-only"
        conf_files.add(conf_source)
    assert len(cookie_files) == 1, f"the nodes' cookies differ: {cookie_files}"
    assert len(conf_files) == 1, f"the nodes' configs differ: {conf_files}"
    assert len(data_volumes) == len(nodes), "two nodes share a data volume"

    [cookie_file] = cookie_files
    cookie = (ROOT / cookie_file).read_text()
    # Erlang accepts printable ASCII, a trailing newline ignored.
    assert re.fullmatch(r"[!-~]{20,255}\n?", cookie), f"{cookie_file} is no Erlang cookie"

    [conf_file] = conf_files
    settings = rabbitmq_conf(ROOT / conf_file)
    assert settings["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = [v for k, v in settings.items() if k.startswith("cluster_formation.classic_config.nodes.")]
    assert sorted(listed) == sorted(f"rabbit@{node['hostname']}" for node in nodes.values())


def test_no_two_services_publish_the_same_port_and_all_on_loopback() -> None:
    """Every service, every profile on: the cluster's ports clash with none of the default setup's."""
    published: dict[int, str] = {}
    for name, service in services().items():
        for host_ip, host_port, _ in published_ports(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {host_port} on {host_ip}"
            assert host_port not in published, f"{name} and {published.get(host_port)} both publish {host_port}"
            published[host_port] = name


def test_the_image_runs_multillm_as_a_user_other_than_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^ENTRYPOINT \[\"multillm\"\]$", dockerfile, flags=re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert "[postgres]" in dockerfile
