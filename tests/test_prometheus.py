"""Prometheus for real: the alert rules under promtool, the dashboard and the rules made of the
queries of docs/metrics.md, and every one of those queries run by a real Prometheus scraping real
workers and a real RabbitMQ under a load whose figures the test knows.

The load is sent twice, the second time word for word as the first: once before Prometheus
scrapes the workers, once after. Every series then starts, in Prometheus, at its first phase's
count and grows by the same count again, all of one worker's series sampled at the same instants.
That makes PromQL's extrapolation to the edges of a window (rate(), increase()) the same factor
for every series of a worker, whatever the machine's timing: shares and ratios come out exactly
as the load's, and every rate is that one factor times the load's count, the factor read once
per worker from `multillm_messages_consumed_total`.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from multillm import RpcError, contract
from multillm.errors import code_name
from multillm.mock_llm import MockControl
from multillm.producers import Client, make_request
from multillm.sinks import Sink
from multillm.testbed.processes import WorkerProcess
from multillm.testbed.prometheus import Prometheus, PromQLError, Series, installed, promtool
from multillm.testbed.rabbitmq import vhost_of
from tests.conftest import StartWorker, wait_for_log, wait_for_records

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "metrics.md"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
EXAMPLE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "multillm-alerts.yml"
RULES_TESTS = PROMETHEUS_DIR / "multillm-alerts_test.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "multillm.json"
COMPOSE_FILE = ROOT / "docker-compose.yml"
MONITORING_PROFILE = "monitoring"
# Where RabbitMQ's rabbitmq_prometheus plugin listens (its default).
BROKER_METRICS_PORT = 15692
# Long enough for RabbitMQ's statistics (emitted every 5 s) and a few 1 s scrapes and evaluations.
DEADLINE = 60.0

Labels = frozenset[tuple[str, str]]


def labels(**values: str) -> Labels:
    return frozenset(values.items())


def normalized(expr: str) -> str:
    """PromQL with its whitespace made single spaces: how the docs, the rules and the panels are compared."""
    return " ".join(expr.split())


def docs_queries() -> list[str]:
    """Every ```promql block of docs/metrics.md, one query each."""
    return [normalized(block) for block in re.findall(r"^```promql\n(.*?)^```", DOCS.read_text(), re.M | re.S)]


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


@pytest.fixture(scope="module")
def tools() -> None:
    if not installed():
        pytest.fail("prometheus and promtool are not installed: scripts/services.sh prometheus --install")


# --- promtool -------------------------------------------------------------------------------


def test_promtool_checks_the_example_config_and_the_rules(tools: None) -> None:
    done = promtool("check", "config", str(EXAMPLE_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "multillm-alerts.yml" in done.stdout  # the rule file was checked with it
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass(tools: None) -> None:
    done = promtool("test", "rules", str(RULES_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    tested = set(re.findall(r"alertname: (\w+)", RULES_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in rules()}, "an alert has no unit test"


@pytest.mark.parametrize(
    ("original", "mutant"),
    [
        ("for: 5m", "for: 6m"),  # a minute late
        ("for: 10m", "for: 9m"),  # a minute early
        ("for: 15m", "for: 16m"),
        ("> 0.05", "> 0.1"),  # deaf to 10% of errors
        ("> 0.05", "> 0.03"),  # woken by 4%
        ("> 0.005", "> 0.01"),  # deaf to 7.5 ms
        ("> 0.1\n", "> 0.5\n"),
        ("triage|judge|model", "triage|judge|dead|model"),  # nobody consumes multillm.dead
        ('queue="multillm.dead"', 'queue=~"multillm.+"'),
    ],
)
def test_promtool_unit_tests_catch_a_changed_rule(tools: None, tmp_path: Path, original: str, mutant: str) -> None:
    """The unit tests fail on a rule changed in the ways that matter: its threshold, its `for:`, what it reads."""
    assert original in RULES.read_text()
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(original, mutant))
    (tmp_path / RULES_TESTS.name).write_text(RULES_TESTS.read_text())
    done = promtool("test", "rules", str(tmp_path / RULES_TESTS.name))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout + done.stderr


# --- one source for each query ----------------------------------------------------------------


def test_the_rules_and_the_dashboard_are_the_queries_of_the_docs() -> None:
    documented = docs_queries()
    assert len(documented) == len(set(documented)), "a query is in docs/metrics.md twice"
    rule_exprs = {rule["alert"]: normalized(rule["expr"]) for rule in rules()}
    panel_exprs = {
        panel["title"]: normalized(target["expr"]) for panel in dashboard_panels() for target in panel["targets"]
    }
    assert {name: expr for name, expr in rule_exprs.items() if expr not in documented} == {}
    assert {title: expr for title, expr in panel_exprs.items() if expr not in documented} == {}
    used = set(rule_exprs.values()) | set(panel_exprs.values())
    assert [expr for expr in documented if expr not in used] == [], "a query of the docs is no panel and no rule"


def test_every_rule_says_how_bad_and_what_to_do() -> None:
    for rule in rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert f"`{name}`" in DOCS.read_text(), f"{name} is not in docs/metrics.md"


def test_the_dashboard_asks_for_a_prometheus_data_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    wanted = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        assert panel["datasource"] == wanted, panel["title"]
        assert [t["datasource"] for t in panel["targets"]] == [wanted] * len(panel["targets"]), panel["title"]
        assert [t["refId"] for t in panel["targets"]] == ["A", "B", "C"][: len(panel["targets"])]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_compose_provisions_prometheus_and_grafana_from_deploy() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        assert service["profiles"] == [MONITORING_PROFILE]
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])

    def mounts(service: dict[str, Any]) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in service["volumes"] if v.startswith("./")}

    # It reads the example config, the rules beside it.
    [config_flag] = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    config_folder, config_name = config_flag.split("=", 1)[1].rsplit("/", 1)
    assert (ROOT / mounts(prometheus)[config_folder]).resolve() / config_name == EXAMPLE_CONFIG

    # The example config's targets are the Compose services: the workers on their metrics port,
    # and the broker.
    jobs = {job["job_name"]: job for job in yaml.safe_load(EXAMPLE_CONFIG.read_text())["scrape_configs"]}
    worker_targets = {t for group in jobs["multillm"]["static_configs"] for t in group["targets"]}
    workers = {
        f"{name}:{s['command'][s['command'].index('--metrics-port') + 1]}"
        for name, s in services.items()
        if "build" in s and s["command"][0] == "worker" and not s.get("profiles")
    }
    assert worker_targets == workers
    [broker_target] = [t for group in jobs["rabbitmq"]["static_configs"] for t in group["targets"]]
    assert broker_target == f"rabbitmq:{BROKER_METRICS_PORT}"

    grafana_mounts = mounts(grafana)
    provisioning = GRAFANA_DIR / "provisioning"
    assert (ROOT / grafana_mounts["/etc/grafana/provisioning"]).resolve() == provisioning
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in prometheus["ports"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "multillm.yml").read_text())["providers"]
    dashboards_in_container = provider["options"]["path"]
    assert (ROOT / grafana_mounts[dashboards_in_container]).resolve() == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/{DASHBOARD.name}"


# --- the load ---------------------------------------------------------------------------------

PRIMARY, MODEL = "primary", "model"
REQUESTS_QUEUE = contract.REQUEST_QUEUE
BETA_QUEUE = contract.model_queue("mock/beta")
# What one phase of the load sends: (models, the code its reply has). mock/beta has a worker of
# its own, mock/nowhere none; nosuch/ is no provider.
LOAD: list[tuple[list[str], str]] = [
    *[(["mock/alpha", "mock/beta"], "OK")] * 3,
    (["mock/flaky"], "OK"),  # one 503, then an answer
    *[(["mock/broken"], "UNAVAILABLE")] * 2,  # 503 on each of its 4 tries
    (["mock/alpha", "mock/nowhere"], "OK"),
    (["nosuch/model"], "INVALID_ARGUMENT"),
]
# Then one request while the sink's table is away: its record is tried 4 times and dead-lettered.
SINK_DOWN: tuple[list[str], str] = (["mock/alpha"], "OK")


def series(name: str, kind: str, **more: str) -> tuple[str, Labels]:
    return name, labels(kind=kind, **more)


# What one phase of the load counts, series by series, on each worker: every series of these
# metrics, none left out (a series the load makes that is not here fails the test).
COUNTS: dict[tuple[str, Labels], int] = {
    series("multillm_messages_consumed_total", PRIMARY, queue=REQUESTS_QUEUE): 9,
    series("multillm_replies_sent_total", PRIMARY, outcome="ok", code="OK"): 6,
    series("multillm_replies_sent_total", PRIMARY, outcome="error", code="UNAVAILABLE"): 2,
    series("multillm_replies_sent_total", PRIMARY, outcome="error", code="INVALID_ARGUMENT"): 1,
    series("multillm_errors_total", PRIMARY, model="mock/broken", code="UNAVAILABLE"): 2,
    series("multillm_errors_total", PRIMARY, model="mock/nowhere", code="UNAVAILABLE"): 1,
    series("multillm_retries_total", PRIMARY, model="mock/flaky", reason="503"): 1,
    series("multillm_retries_total", PRIMARY, model="mock/broken", reason="503"): 6,
    series("multillm_model_call_seconds_count", PRIMARY, model="mock/alpha"): 5,
    series("multillm_model_call_seconds_count", PRIMARY, model="mock/flaky"): 1,
    series("multillm_model_call_seconds_count", PRIMARY, model="mock/broken"): 2,
    series("multillm_fanout_copies_total", PRIMARY, model="mock/beta", result="published"): 3,
    series("multillm_fanout_copies_total", PRIMARY, model="mock/nowhere", result="unroutable"): 1,
    series("multillm_dead_letters_total", PRIMARY, queue=REQUESTS_QUEUE, code="INVALID_ARGUMENT"): 1,
    series("multillm_dead_letters_total", PRIMARY, queue=REQUESTS_QUEUE, code="UNAVAILABLE"): 1,  # the record
    series("multillm_sink_write_seconds_count", PRIMARY): 8 + 4,  # 8 records written, 4 tries of the 9th
    series("multillm_sink_write_failures_total", PRIMARY): 4,
    series("multillm_model_calls_in_flight", PRIMARY, model="mock/alpha"): 0,
    series("multillm_model_calls_in_flight", PRIMARY, model="mock/flaky"): 0,
    series("multillm_model_calls_in_flight", PRIMARY, model="mock/broken"): 0,
    series("multillm_messages_consumed_total", MODEL, queue=BETA_QUEUE): 3,
    series("multillm_model_call_seconds_count", MODEL, model="mock/beta"): 3,
    series("multillm_sink_write_seconds_count", MODEL): 3,
    series("multillm_model_calls_in_flight", MODEL, model="mock/beta"): 0,
}
COUNTED = sorted({name for name, _ in COUNTS} | {"multillm_redeliveries_total", "multillm_publish_failures_total"})
# Dead letters in the vhost's multillm.dead after one phase: the invalid request and the record.
DEAD_LETTERS = 2


def phase_counts(phases: int) -> dict[tuple[str, Labels], float]:
    """Every counted series after `phases` phases (gauges stay at their value)."""
    return {key: float(count * phases) for key, count in COUNTS.items()}


def send_load(client: Client, mock: MockControl, sink: Sink, sink_db: Path) -> None:
    """One phase. The latencies put each model's calls well inside one bucket of multillm_model_call_seconds
    (alpha and beta 0.25-0.5 s, flaky 0.5-1 s, broken 0.25-0.5 s), so that both phases fill the same buckets."""
    mock.set_fault("alpha", latency_ms=300)
    mock.set_fault("beta", latency_ms=300)
    mock.set_fault("flaky", statuses=[503], latency_ms=300)
    mock.set_fault("broken", always=503, latency_ms=80)
    futures = [(client.submit(make_request(models, f"load {i}")), code) for i, (models, code) in enumerate(LOAD)]
    for future, code in futures:
        assert _answer_code(lambda future=future: client.wait(future, timeout=60)) == code
    for future, _ in futures[:3]:  # the fanned-out records, written by the model worker
        assert len(wait_for_records(sink, future.request_id, 2)) == 2
    # The workers' inserts fail while the table is away, as they would on a database gone wrong.
    away = f"{contract.LOG_TABLE}_away"
    _rename_table(sink_db, contract.LOG_TABLE, away)
    try:
        models, code = SINK_DOWN
        assert _answer_code(lambda: client.create(make_request(models, "the sink is down"), timeout=60)) == code
    finally:
        _rename_table(sink_db, away, contract.LOG_TABLE)


def _rename_table(db: Path, name: str, new_name: str) -> None:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute(f"ALTER TABLE {name} RENAME TO {new_name}")
    finally:
        conn.close()


def _answer_code(call: Callable[[], object]) -> str:
    try:
        call()
    except RpcError as exc:
        return code_name(exc.code)
    return "OK"


# --- a worker's own /metrics --------------------------------------------------------------------


def metrics_port(worker: WorkerProcess) -> int:
    """The port a worker started with `--metrics-port 0` chose, from its `metrics.serving` log line."""
    wait_for_log(worker, "metrics.serving")
    [line] = [line for line in worker.log_text().splitlines() if "metrics.serving" in line]
    return int(json.loads(line)["port"])


def scrape(port: int) -> dict[tuple[str, Labels], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def counted(samples: Mapping[tuple[str, Labels], float]) -> dict[tuple[str, Labels], float]:
    return {key: value for key, value in samples.items() if key[0] in COUNTED}


def scrape_until(ports: list[int], expected: Mapping[tuple[str, Labels], float]) -> dict[tuple[str, Labels], float]:
    """Every sample of the workers at `ports`, once their counted series are `expected` (replies are
    counted when the broker confirms them, which may be after the caller has them)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        samples: dict[tuple[str, Labels], float] = {}
        for port in ports:
            samples.update(scrape(port))
        if counted(samples) == expected or time.monotonic() > deadline:
            assert counted(samples) == expected
            return samples
        time.sleep(0.1)


@dataclass
class Histogram:
    """One series group of a histogram as a worker exposed it: cumulative count by upper bound."""

    after_first: dict[float, float]
    after_second: dict[float, float]

    @property
    def second(self) -> dict[float, float]:
        return {le: self.after_second[le] - self.after_first.get(le, 0.0) for le in self.after_second}

    @property
    def symmetric(self) -> bool:
        """Both phases put the same number of observations in each bucket."""
        return self.second == self.after_first

    def bounds(self) -> tuple[float, float]:
        """The lower edge of the lowest bucket the second phase put anything in, and the upper edge of
        the highest (the highest finite one for +Inf): where any quantile of it lies."""
        edges = sorted(self.second)
        filled = [i for i, le in enumerate(edges) if self.second[le] > (self.second[edges[i - 1]] if i else 0.0)]
        low = edges[filled[0] - 1] if filled[0] else 0.0
        high = edges[filled[-1]] if math.isfinite(edges[filled[-1]]) else edges[-2]
        return low, high


def histograms(
    first: Mapping[tuple[str, Labels], float], second: Mapping[tuple[str, Labels], float], name: str, *by: str
) -> dict[Labels, Histogram]:
    """The `_bucket` series of histogram `name`, summed by the labels `by`, after each phase."""

    def grouped(samples: Mapping[tuple[str, Labels], float]) -> dict[Labels, dict[float, float]]:
        found: dict[Labels, dict[float, float]] = {}
        for (sample, sample_labels), value in samples.items():
            if sample == f"{name}_bucket":
                values = dict(sample_labels)
                group = found.setdefault(labels(**{k: values[k] for k in by}), {})
                le = float(values["le"])
                group[le] = group.get(le, 0.0) + value
        return found

    before, after = grouped(first), grouped(second)
    return {key: Histogram(before.get(key, {}), after[key]) for key in after}


def quantile(q: float, buckets: Mapping[float, float]) -> float:
    """histogram_quantile(q, ...) of cumulative bucket counts, as Prometheus reckons it: linear within
    the bucket the rank falls in; the highest finite bound when it falls in +Inf."""
    edges = sorted(buckets)
    rank = q * buckets[edges[-1]]
    for i, le in enumerate(edges[:-1]):
        if buckets[le] >= rank:
            start, below = (edges[i - 1], buckets[edges[i - 1]]) if i else (0.0, 0.0)
            return start + (le - start) * (rank - below) / (buckets[le] - below)
    return edges[-2]


# --- what each query of the docs must return --------------------------------------------------


@dataclass
class Figures:
    """What the queries are checked against, besides the load's counts."""

    instances: dict[str, str]  # kind -> the target's host:port
    vhost: str
    # The factor Prometheus's extrapolation gave every rate and increase of a worker's series,
    # by kind: increase(...) = factor x the second phase's count.
    factor: dict[str, float]
    latency: dict[Labels, Histogram]  # multillm_model_call_seconds by kind and model
    sink_writes: dict[Labels, Histogram]  # multillm_sink_write_seconds by kind

    def rate(self, kind: str, count: float) -> float:
        return self.factor[kind] * count / 300  # every rate of the docs is over [5m]

    def increase(self, kind: str, count: float) -> float:
        return self.factor[kind] * count


Problems = list[str]
Check = Callable[[list[Series], Figures], Problems]


def as_dict(result: list[Series], drop: tuple[str, ...] = ()) -> dict[Labels, float]:
    """The series by their labels, less `drop` and the metric's name (a comparison keeps it: `up == 0`)."""
    dropped = {"__name__", *drop}
    return {frozenset((k, v) for k, v in found.items() if k not in dropped): value for found, value in result}


def equal(expected: Callable[[Figures], Mapping[Labels, float]], drop: tuple[str, ...] = ()) -> Check:
    """Exactly these series (labels as the query keeps them, less `drop`), each with its figure to
    the last few bits."""

    def check(result: list[Series], figures: Figures) -> Problems:
        wanted, got = dict(expected(figures)), as_dict(result, drop)
        if set(got) != set(wanted):
            return [f"series {sorted(map(sorted, got))}, expected {sorted(map(sorted, wanted))}"]
        return [
            f"{sorted(key)}: {got[key]!r}, expected {wanted[key]!r}"
            for key in wanted
            if not math.isclose(got[key], wanted[key], rel_tol=1e-9, abs_tol=1e-12)
        ]

    return check


def in_vhost(expected: Mapping[Labels, float]) -> Check:
    """The broker's series of the test's own vhost (the broker is shared) are exactly these."""

    def check(result: list[Series], figures: Figures) -> Problems:
        ours = [(found, value) for found, value in result if found.get("vhost") == figures.vhost]
        return equal(lambda _: expected, drop=("vhost",))(ours, figures)

    return check


def latency_p99(result: list[Series], figures: Figures) -> Problems:
    problems: Problems = []
    got = as_dict(result)
    wanted = {labels(model=dict(key)["model"]): histogram for key, histogram in figures.latency.items()}
    if set(got) != set(wanted):
        return [f"models {sorted(map(sorted, got))}, expected {sorted(map(sorted, wanted))}"]
    for key, histogram in wanted.items():
        problems += _within_histogram(sorted(key), got[key], histogram, 0.99)
    return problems


def _within_histogram(name: object, value: float, histogram: Histogram, q: float) -> Problems:
    if histogram.symmetric:  # the same factor for every bucket: exactly the buckets' quantile
        expected = quantile(q, histogram.second)
        return [] if math.isclose(value, expected, rel_tol=1e-9) else [f"{name}: {value}, expected {expected}"]
    low, high = histogram.bounds()  # the phases filled different buckets: somewhere among them
    return [] if low <= value <= high else [f"{name}: {value}, expected within [{low}, {high}]"]


def sink_write_p99(result: list[Series], figures: Figures) -> Problems:
    """Two workers' buckets summed: their factors differ, so the quantile lies among the buckets filled."""
    if len(result) != 1 or result[0][0]:
        return [f"{result}: expected one series without labels"]
    lows, highs = zip(*(h.bounds() for h in figures.sink_writes.values()), strict=True)
    value = result[0][1]
    return [] if min(lows) <= value <= max(highs) else [f"{value}: expected within [{min(lows)}, {max(highs)}]"]


def loop_lag(result: list[Series], figures: Figures) -> Problems:
    """How late a loop runs is the machine's: one figure per worker process, within the buckets (5 s the highest)."""
    got = as_dict(result)
    wanted = {labels(instance=instance) for instance in figures.instances.values()}
    if set(got) != wanted:
        return [f"instances {sorted(map(sorted, got))}, expected {sorted(map(sorted, wanted))}"]
    return [f"{sorted(key)}: {value}" for key, value in got.items() if not 0 <= value <= 5.0]


def nothing(result: list[Series], figures: Figures) -> Problems:
    return [f"{result}: expected nothing"] if result else []


def per_phase(kind: str, name: str, **more: str) -> int:
    return COUNTS[series(name, kind, **more)]


ERRORS = "multillm_errors_total"
REPLIES = "multillm_replies_sent_total"
CALLS = "multillm_model_call_seconds_count"
RETRIES = "multillm_retries_total"
FANOUT = "multillm_fanout_copies_total"
DEAD = "multillm_dead_letters_total"
WRITES = "multillm_sink_write_seconds_count"
WRITE_FAILURES = "multillm_sink_write_failures_total"
ERROR_SHARE = (
    per_phase(PRIMARY, REPLIES, outcome="error", code="UNAVAILABLE")
    + per_phase(PRIMARY, REPLIES, outcome="error", code="INVALID_ARGUMENT")
) / sum(count for (name, _), count in COUNTS.items() if name == REPLIES)
WRITE_FAILURE_SHARE = per_phase(PRIMARY, WRITE_FAILURES) / per_phase(PRIMARY, WRITES)
QUEUE_FILTER = 'queue=~"multillm[.](requests|scores|triage|judge|dead|model[.].+)"'
WORK_QUEUE_FILTER = 'queue=~"multillm[.](requests|scores|triage|judge|model[.].+)"'
ALL_QUEUES = [REQUESTS_QUEUE, contract.SCORE_QUEUE, contract.TRIAGE_QUEUE, contract.DEAD_QUEUE, BETA_QUEUE]

# Each query of docs/metrics.md (whitespace made single spaces) and what it returns once the load
# is in: evaluated at the instant of the workers' last scrape.
AT_THE_LAST_SCRAPE: dict[str, Check] = {
    'sum by (code) (rate(multillm_replies_sent_total{outcome="error"}[5m]))': equal(
        lambda f: {
            labels(code=code): f.rate(PRIMARY, per_phase(PRIMARY, REPLIES, outcome="error", code=code))
            for code in ("UNAVAILABLE", "INVALID_ARGUMENT")
        }
    ),
    'sum(rate(multillm_replies_sent_total{outcome="error"}[5m])) / sum(rate(multillm_replies_sent_total[5m]))': equal(
        lambda f: {labels(): ERROR_SHARE}
    ),
    "sum by (model, code) (rate(multillm_errors_total[5m]))": equal(
        lambda f: {
            labels(model=model, code="UNAVAILABLE"): f.rate(
                PRIMARY, per_phase(PRIMARY, ERRORS, model=model, code="UNAVAILABLE")
            )
            for model in ("mock/broken", "mock/nowhere")
        }
    ),
    "histogram_quantile(0.99, sum by (model, le) (rate(multillm_model_call_seconds_bucket[5m])))": latency_p99,
    "sum by (model) (multillm_model_calls_in_flight)": equal(
        lambda f: {labels(model=m): 0.0 for m in ("mock/alpha", "mock/flaky", "mock/broken", "mock/beta")}
    ),
    "sum by (model) (rate(multillm_retries_total[5m])) / sum by (model) "
    "(rate(multillm_model_call_seconds_count[5m]))": equal(
        lambda f: {
            labels(model=m): per_phase(PRIMARY, RETRIES, model=m, reason="503") / per_phase(PRIMARY, CALLS, model=m)
            for m in ("mock/flaky", "mock/broken")
        }
    ),
    'sum by (model) (increase(multillm_fanout_copies_total{result!="published"}[1h])) > 0': equal(
        lambda f: {
            labels(model="mock/nowhere"): f.increase(
                PRIMARY, per_phase(PRIMARY, FANOUT, model="mock/nowhere", result="unroutable")
            )
        }
    ),
    "sum by (queue, code) (increase(multillm_dead_letters_total[1h])) > 0": equal(
        lambda f: {
            labels(queue=REQUESTS_QUEUE, code=code): f.increase(
                PRIMARY, per_phase(PRIMARY, DEAD, queue=REQUESTS_QUEUE, code=code)
            )
            for code in ("INVALID_ARGUMENT", "UNAVAILABLE")
        }
    ),
    "histogram_quantile(0.99, sum by (le) (rate(multillm_sink_write_seconds_bucket[5m])))": sink_write_p99,
    "sum by (instance, kind) (rate(multillm_sink_write_failures_total[5m])) / sum by (instance, kind) "
    "(rate(multillm_sink_write_seconds_count[5m]))": equal(
        # The model worker's writes never failed: no failure series, no share.
        lambda f: {labels(instance=f.instances[PRIMARY], kind=PRIMARY): WRITE_FAILURE_SHARE}
    ),
    "sum by (instance, kind) (rate(multillm_sink_write_failures_total[5m])) / sum by (instance, kind) "
    "(rate(multillm_sink_write_seconds_count[5m])) > 0.1": equal(
        lambda f: {labels(instance=f.instances[PRIMARY], kind=PRIMARY): WRITE_FAILURE_SHARE}
    ),
    "histogram_quantile(0.5, sum by (instance, le) (rate(multillm_event_loop_lag_seconds_bucket[5m])))": loop_lag,
    # No worker died holding messages: nothing redelivered (the rules' unit tests run it on series).
    "sum by (queue) (rate(multillm_redeliveries_total[5m]))": nothing,
    'sum(rate(multillm_replies_sent_total{outcome="error"}[5m])) / sum(rate(multillm_replies_sent_total[5m])) > 0.05': (
        equal(lambda f: {labels(): ERROR_SHARE})
    ),
    # Machine-dependent: checked against the median query, evaluated at the same instant, below.
    "histogram_quantile(0.5, sum by (instance, le) (rate(multillm_event_loop_lag_seconds_bucket[5m]))) > 0.005": (
        lambda result, figures: []
    ),
}


def grew(result: list[Series], figures: Figures) -> Problems:
    """The vhost's multillm.dead grew by at least the second phase's dead letters (the first phase's too,
    if Prometheus saw it empty), extrapolated to the 15 minutes."""
    ours = [value for found, value in result if found.get("vhost") == figures.vhost]
    if len(ours) != 1 or ours[0] < DEAD_LETTERS:
        return [f"{ours}: expected one series of at least {DEAD_LETTERS}"]
    return []


# The queries on the broker's metrics and on `up`, read while the load's workers run: these follow
# RabbitMQ's statistics, emitted every few seconds, so they are read until they show the load.
WHILE_THE_WORKERS_RUN: dict[str, Check] = {
    f"max by (vhost, queue) (rabbitmq_detailed_queue_messages_ready{{{QUEUE_FILTER}}})": in_vhost(
        {labels(queue=q): 2.0 * DEAD_LETTERS if q == contract.DEAD_QUEUE else 0.0 for q in ALL_QUEUES}
    ),
    f"max by (vhost, queue) (rabbitmq_detailed_queue_consumers{{{QUEUE_FILTER}}})": in_vhost(
        # The primary consumes requests, scores and triage; nobody multillm.dead.
        {labels(queue=q): 0.0 if q == contract.DEAD_QUEUE else 1.0 for q in ALL_QUEUES}
    ),
    f"max by (vhost, queue) (rabbitmq_detailed_queue_consumers{{{WORK_QUEUE_FILTER}}}) == 0": in_vhost({}),
    'max by (vhost) (delta(rabbitmq_detailed_queue_messages{queue="multillm.dead"}[15m])) > 0': grew,
    'up{job="multillm"} == 0': equal(lambda f: {}),
}

# And once the model worker has stopped.
AFTER_THE_MODEL_WORKER_STOPPED: dict[str, Check] = {
    f"max by (vhost, queue) (rabbitmq_detailed_queue_consumers{{{WORK_QUEUE_FILTER}}}) == 0": in_vhost(
        {labels(queue=BETA_QUEUE): 0.0}
    ),
    'up{job="multillm"} == 0': equal(lambda f: {labels(job="multillm", instance=f.instances[MODEL]): 0.0}),
}


def test_every_query_of_the_docs_has_an_expected_answer() -> None:
    expected = set(AT_THE_LAST_SCRAPE) | set(WHILE_THE_WORKERS_RUN)
    assert set(docs_queries()) == expected
    assert set(AFTER_THE_MODEL_WORKER_STOPPED) <= expected


# --- against the real thing -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Debian's Prometheus on the example config's jobs and rules, scraping every second: the workers
    of `set_targets("multillm", ...)` and this machine's RabbitMQ."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{BROKER_METRICS_PORT}/metrics", timeout=10).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ's rabbitmq_prometheus plugin does not answer ({exc}): scripts/services.sh prometheus")
    server = Prometheus(tmp_path_factory.mktemp("prometheus"))
    example = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in example["scrape_configs"]}
    assert set(jobs) == {"multillm", "rabbitmq"}
    workers = {k: v for k, v in jobs["multillm"].items() if k != "static_configs"}
    workers["file_sd_configs"] = [{"files": [str(server.targets_file("multillm"))], "refresh_interval": "1s"}]
    broker = {k: v for k, v in jobs["rabbitmq"].items() if k != "static_configs"}
    broker["static_configs"] = [{"targets": [f"127.0.0.1:{BROKER_METRICS_PORT}"]}]
    server.set_targets("multillm", [])  # none until the test has sent its first phase
    server.start(
        {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS_DIR / name) for name in example["rule_files"]],
            "scrape_configs": [workers, broker],
        }
    )
    yield server
    server.stop()


def eventually(problems: Callable[[], Problems]) -> Problems:
    """`problems()` again and again until it finds none or the deadline passes; what it found last."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            found = problems()
        except PromQLError as exc:  # a query Prometheus refuses stays refused
            return [str(exc)]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def now(prometheus: Prometheus, expr: str, check: Check, figures: Figures) -> Callable[[], Problems]:
    """What `check` finds wrong with `expr` evaluated now."""
    return lambda: check(prometheus.query(expr), figures)


def prometheus_counts(result: list[Series], instances: Mapping[str, str]) -> dict[tuple[str, Labels], float]:
    """The counted series as Prometheus has them, keyed as a worker's own /metrics keys them."""
    kinds = {instance: kind for kind, instance in instances.items()}
    found = {}
    for series_labels, value in result:
        rest = {k: v for k, v in series_labels.items() if k not in {"__name__", "job", "instance"}}
        assert kinds[series_labels["instance"]] == rest["kind"], series_labels
        found[series_labels["__name__"], frozenset(rest.items())] = value
    return found


def test_every_query_of_the_docs_under_a_known_load(
    prometheus: Prometheus,
    start_worker: StartWorker,
    client: Client,
    mock_control: MockControl,
    sink: Sink,
    sink_url: str,
    broker_url: str,
) -> None:
    assert sink_url.startswith("sqlite:///")
    sink_db = Path(sink_url.removeprefix("sqlite:///"))
    primary = start_worker(PRIMARY, concurrency=16, extra_args=["--metrics-port", "0"])
    beta = start_worker(MODEL, model="mock/beta", extra_args=["--metrics-port", "0"])
    ports = {PRIMARY: metrics_port(primary), MODEL: metrics_port(beta)}
    instances = {kind: f"127.0.0.1:{port}" for kind, port in ports.items()}

    # The first phase, unseen by Prometheus; then its figures, at the workers.
    send_load(client, mock_control, sink, sink_db)
    after_first = scrape_until(list(ports.values()), phase_counts(1))

    # Prometheus's first sample of every series is the first phase's count.
    prometheus.set_targets("multillm", list(instances.values()))
    counted_query = f'{{__name__=~"{"|".join(COUNTED)}"}}'

    def counts_are(phases: int) -> Callable[[], Problems]:
        def check() -> Problems:
            got = prometheus_counts(prometheus.query(counted_query), instances)
            return [] if got == phase_counts(phases) else [f"{got}"]

        return check

    assert eventually(counts_are(1)) == []

    send_load(client, mock_control, sink, sink_db)
    after_second = scrape_until(list(ports.values()), phase_counts(2))
    assert eventually(counts_are(2)) == []

    # Every series of a worker ends in the same scrape: evaluate at the latest one, and read the
    # factor each worker's rates come out with from the requests it consumed.
    at = max(value for _, value in prometheus.query('timestamp(up{job="multillm"})'))
    consumed = as_dict(prometheus.query("sum by (kind) (increase(multillm_messages_consumed_total[5m]))", at))
    factor = {
        kind: consumed[labels(kind=kind)] / count
        for (name, key), count in COUNTS.items()
        if name == "multillm_messages_consumed_total"
        for kind in [dict(key)["kind"]]
    }
    # Extrapolation only widens the window: between half an interval and a whole one more at each end.
    assert all(1.0 <= f <= 3.2 for f in factor.values()), factor
    figures = Figures(
        instances=instances,
        vhost=vhost_of(broker_url),
        factor=factor,
        latency=histograms(after_first, after_second, "multillm_model_call_seconds", "kind", "model"),
        sink_writes=histograms(after_first, after_second, "multillm_sink_write_seconds", "kind"),
    )

    problems: dict[str, Problems] = {}
    results: dict[str, list[Series]] = {}
    for expr, check in AT_THE_LAST_SCRAPE.items():
        try:
            results[expr] = prometheus.query(expr, at)
        except PromQLError as exc:
            problems[expr] = [str(exc)]
            continue
        problems[expr] = check(results[expr], figures)
    lag = "histogram_quantile(0.5, sum by (instance, le) (rate(multillm_event_loop_lag_seconds_bucket[5m])))"
    late = {key for key, value in as_dict(results.get(lag, [])).items() if value > 0.005}
    if set(as_dict(results.get(f"{lag} > 0.005", []))) != late:
        problems[f"{lag} > 0.005"] = [f"{results.get(f'{lag} > 0.005')}: expected the instances in {late}"]

    for expr, check in WHILE_THE_WORKERS_RUN.items():
        problems[expr] = eventually(now(prometheus, expr, check, figures))
    assert {expr: found for expr, found in problems.items() if found} == {}

    assert beta.stop() == 0
    for expr, check in AFTER_THE_MODEL_WORKER_STOPPED.items():
        problems[expr] = eventually(now(prometheus, expr, check, figures))
    assert {expr: found for expr, found in problems.items() if found} == {}

    # The rules saw it too: the alerts the load makes are pending (or firing, without a `for:`),
    # and every rule evaluates without an error.
    expected_alerts = {
        ("MultillmErrorRateHigh", labels(severity="critical"), "pending"),
        ("MultillmSinkFailing", labels(severity="critical", instance=instances[PRIMARY], kind=PRIMARY), "pending"),
        ("MultillmFanoutUnroutable", labels(severity="warning", model="mock/nowhere"), "firing"),
        ("MultillmDeadLettersGrowing", labels(severity="warning", vhost=figures.vhost), "firing"),
        (
            "MultillmQueueWithoutConsumer",
            labels(severity="critical", vhost=figures.vhost, queue=BETA_QUEUE),
            "pending",
        ),
        ("MultillmWorkerDown", labels(severity="warning", job="multillm", instance=instances[MODEL]), "pending"),
    }

    def alerts_are() -> Problems:
        found = set()
        for alert in prometheus.api("alerts")["alerts"]:
            alert_labels = dict(alert["labels"])
            name = alert_labels.pop("alertname")
            if alert_labels.get("vhost", figures.vhost) != figures.vhost or name == "MultillmEventLoopLag":
                continue  # another vhost's, on the shared broker; or the machine's
            found.add((name, frozenset(alert_labels.items()), alert["state"]))
        return [] if found == expected_alerts else [f"{sorted(found)}"]

    assert eventually(alerts_are) == []
    evaluated = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in evaluated} == {rule["alert"] for rule in rules()}
    assert [(rule["name"], rule.get("lastError")) for rule in evaluated if rule["health"] != "ok"] == []
