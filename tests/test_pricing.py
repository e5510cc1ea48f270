"""Every record's `cost_usd`: from genai-prices' table, from `[prices."..."]`, or None when unknown."""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from genai_prices import Usage, calc_price
from structlog.testing import capture_logs

from multillm import contract
from multillm.config import PriceOverride, ProviderConfig, load_settings
from multillm.errors import ConfigError
from multillm.pricing import Prices, TokenUsage
from multillm.producers import Client, make_request
from multillm.schemas import ChatMessage, LLMLogRecord, LLMScore
from multillm.sinks import open_sink
from multillm.sinks._rows import LOGS, Column, Kind
from tests.conftest import StartWorker, wait_for_records
from tests.test_cli import multillm

OPENAI = {"openai": ProviderConfig(base_url="https://api.openai.com/v1", api_key="k")}
USAGE = TokenUsage(prompt_tokens=12_000, completion_tokens=3_000, cached_tokens=2_000)


def _table_per_mtok(model: str) -> tuple[float, float, float]:
    """Input, output and cache-read prices of `model` as the table lists them (USD per million)."""
    price = calc_price(Usage(input_tokens=1), model, provider_id="openai").model_price
    flat = (price.input_mtok, price.output_mtok, price.cache_read_mtok)
    assert all(isinstance(p, Decimal) for p in flat), f"{model}: tiered or missing prices {flat}"
    return float(flat[0]), float(flat[1]), float(flat[2])  # type: ignore[arg-type]


def test_a_model_the_table_knows_is_priced_from_it_cached_tokens_at_the_cache_price() -> None:
    per_input, per_output, per_cached = _table_per_mtok("gpt-4o")
    expected = (10_000 * per_input + 2_000 * per_cached + 3_000 * per_output) / 1e6
    assert per_cached < per_input  # the cached share must make a difference for the check to mean anything

    cost = Prices(OPENAI, {}).cost_usd("openai/gpt-4o", USAGE)

    assert cost == pytest.approx(expected, rel=1e-9)


def test_a_provider_the_table_does_not_name_is_matched_by_its_base_url() -> None:
    providers = {"work-gateway": ProviderConfig(base_url="https://api.openai.com/v1", api_key="k")}
    per_input, per_output, _ = _table_per_mtok("gpt-4o-mini")
    plain = TokenUsage(prompt_tokens=1_000, completion_tokens=500)

    cost = Prices(providers, {}).cost_usd("work-gateway/gpt-4o-mini", plain)

    assert cost == pytest.approx((1_000 * per_input + 500 * per_output) / 1e6, rel=1e-9)


def test_an_override_wins_over_the_table_and_prices_cached_tokens_as_input_unless_told() -> None:
    plain = PriceOverride(input_per_mtok=3.0, output_per_mtok=7.0)
    with_cache = PriceOverride(input_per_mtok=3.0, output_per_mtok=7.0, cached_input_per_mtok=0.5)
    prices = Prices(OPENAI, {"openai/gpt-4o": plain, "openai/gpt-4o-mini": with_cache})

    assert prices.cost_usd("openai/gpt-4o", USAGE) == pytest.approx((12_000 * 3 + 3_000 * 7) / 1e6)
    assert prices.cost_usd("openai/gpt-4o-mini", USAGE) == pytest.approx((10_000 * 3 + 2_000 * 0.5 + 3_000 * 7) / 1e6)


def test_an_unknown_model_costs_none_with_one_warning_per_model() -> None:
    prices = Prices({"mock": ProviderConfig(base_url="http://127.0.0.1:9/v1", api_key="k")}, {})
    with capture_logs() as logs:
        costs = [prices.cost_usd(name, USAGE) for name in ("mock/echo", "mock/echo", "mock/upper", "mock/echo")]

    assert costs == [None] * 4
    warned = [entry["model"] for entry in logs if entry["event"] == "price.unknown"]
    assert warned == ["mock/echo", "mock/upper"]
    assert 'prices."mock/echo"' in next(e["hint"] for e in logs if e["event"] == "price.unknown")


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ('[prices."gpt-4o"]\ninput_per_mtok = 1\noutput_per_mtok = 2\n', 'prices."gpt-4o"'),
        ('[prices."mock/echo"]\ninput_per_mtok = -1\noutput_per_mtok = 2\n', "input_per_mtok"),
        ('[prices."mock/echo"]\ninput_per_mtok = 1\n', "output_per_mtok"),
        ('[prices."mock/echo"]\ninput_per_mtok = 1\noutput_per_mtok = 2\nper_call = 3\n', "per_call"),
    ],
)
def test_a_bad_price_is_a_configuration_error_that_names_it(tmp_path: Path, table: str, named: str) -> None:
    path = tmp_path / "multillm.toml"
    path.write_text(table)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(path)


# --- sinks made by an earlier version gain the new columns, keeping their rows -------------

NEW_COLUMNS = ("cached_tokens", "reasoning_tokens", "cost_usd", "time_to_first_token_ms")
_OLD_TYPES = {Kind.TEXT: "TEXT", Kind.INTEGER: "INTEGER", Kind.REAL: "REAL", Kind.BOOLEAN: "INTEGER", Kind.JSON: "TEXT"}


def _old_record(n: int) -> LLMLogRecord:
    return LLMLogRecord(
        log_id=f"old-{n}", request_id=f"req-{n}", model_name="mock/echo", model_index=0, is_primary=True,
        prompt_tokens=5, completion_tokens=7, total_tokens=12, created_at=f"2026-11-0{n}T00:00:00Z",
    )  # fmt: skip


def _old_table_sql(types: dict[Kind, str]) -> str:
    defs = ", ".join(f"{c.name} {types[c.kind]}{' PRIMARY KEY' if c.name == 'log_id' else ''}" for c in _old_columns())
    return f"CREATE TABLE {contract.LOG_TABLE} ({defs})"


def _old_rows(count: int) -> list[tuple[object, ...]]:
    rows = []
    for n in range(1, count + 1):
        record = _old_record(n)
        rows.append(tuple(_plain(getattr(record, c.name)) for c in _old_columns()))
    return rows


def _plain(value: object) -> object:
    if isinstance(value, list):
        return "[]"
    return int(value) if isinstance(value, bool) else value


def _check_migrated(url: str) -> None:
    # Read-only first: it changes nothing, and reads the missing columns as None.
    reader = open_sink(url, read_only=True)
    assert [(r.log_id, r.cost_usd, r.total_tokens) for r in reader.records()] == [
        ("old-1", None, 12),
        ("old-2", None, 12),
    ]
    assert reader.scores() == []  # no table `llm_scores` yet, and a reader makes none
    reader.close()
    sink = open_sink(url)
    new = LLMLogRecord(
        log_id="new-1", request_id="req-new", model_name="mock/echo", model_index=0, is_primary=True,
        cached_tokens=3, reasoning_tokens=4, cost_usd=0.00125, created_at="2026-12-01T00:00:00Z",
    )  # fmt: skip
    assert sink.write(new)
    score = LLMScore(score_id="s-1", log_id="old-1", name="feedback", label="up", value=1.0, created_at="x")
    assert sink.write_scores([score]) == [True]
    got = {r.log_id: r for r in sink.records()}
    assert sink.scores() == [score]
    sink.close()
    assert sorted(got) == ["new-1", "old-1", "old-2"]
    assert got["old-1"] == _old_record(1)
    assert (got["new-1"].cached_tokens, got["new-1"].reasoning_tokens, got["new-1"].cost_usd) == (3, 4, 0.00125)


def test_an_old_sqlite_sink_gains_the_columns_without_losing_a_row(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(_old_table_sql(_OLD_TYPES))
        marks = ", ".join("?" for _ in _old_columns())
        conn.executemany(f"INSERT INTO {contract.LOG_TABLE} VALUES ({marks})", _old_rows(2))
    _check_migrated(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({contract.LOG_TABLE})")}
    assert set(NEW_COLUMNS) <= columns


def test_an_old_postgres_sink_gains_the_columns_without_losing_a_row(pg_database: str) -> None:
    types = {Kind.TEXT: "TEXT", Kind.INTEGER: "BIGINT", Kind.REAL: "DOUBLE PRECISION", Kind.BOOLEAN: "BOOLEAN"}
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {contract.LOG_TABLE}, {contract.SCORE_TABLE}")
        conn.execute(_old_table_sql({**types, Kind.JSON: "JSONB"}))
        marks = ", ".join("%s" for _ in _old_columns())
        rows = [tuple(bool(v) if c.kind is Kind.BOOLEAN else v for c, v in zip(_old_columns(), row, strict=True))
                for row in _old_rows(2)]  # fmt: skip
        conn.cursor().executemany(f"INSERT INTO {contract.LOG_TABLE} VALUES ({marks})", rows)
    try:
        _check_migrated(pg_database)
    finally:
        with psycopg.connect(pg_database, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {contract.LOG_TABLE}, {contract.SCORE_TABLE}")


def _old_columns() -> list[Column]:
    """The columns of `llm_logs` before prices (and of a sink without `llm_scores`)."""
    return [c for c in LOGS.columns if c.name not in NEW_COLUMNS]


# --- through the workers ---------------------------------------------------------------------


def test_records_carry_the_cost_of_their_tokens_and_an_unpriced_model_none(
    start_worker: StartWorker, config_path: Path, client: Client
) -> None:
    with config_path.open("a") as config:
        config.write(
            '[prices."mock/echo"]\ninput_per_mtok = 0.15\noutput_per_mtok = 0.6\ncached_input_per_mtok = 0.03\n'
        )
    primary = start_worker("primary")
    other = start_worker("model", model="mock/upper")
    # The mock reports the words of every message before the last as cached prompt tokens.
    conversation = [
        ChatMessage(role="system", content="answer in one line"),
        ChatMessage(role="user", content="what does it cost"),
    ]
    sink = open_sink(load_settings(config_path).sink_url)
    try:
        for messages in ("a single question", conversation):
            future = client.submit(make_request(["mock/echo", "mock/upper"], messages))
            future.result(timeout=30)
            echo, upper = wait_for_records(sink, future.request_id, 2)
            cached = 4 if messages is conversation else None
            assert (echo.cached_tokens, upper.cached_tokens) == (cached, cached)
            assert echo.prompt_tokens and echo.completion_tokens
            fresh = echo.prompt_tokens - (cached or 0)
            expected = (fresh * 0.15 + (cached or 0) * 0.03 + echo.completion_tokens * 0.6) / 1e6
            assert echo.cost_usd == pytest.approx(expected, rel=1e-9)
            assert upper.status == "ok" and upper.cost_usd is None
    finally:
        sink.close()
    assert other.log_text().count('"price.unknown"') == 1
    assert "price.unknown" not in primary.log_text()


# --- reading them: logs list, show, stats -----------------------------------------------------


def _priced(n: int, model: str, cost: float | None, *, request: str | None = None) -> LLMLogRecord:
    return LLMLogRecord(
        log_id=f"{model}-{n}", request_id=request or f"req-{n}", model_name=model,
        model_index=0 if model == "a/x" else 1, is_primary=model == "a/x", prompt_tokens=10,
        completion_tokens=20, total_tokens=30, latency_ms=5.0, cost_usd=cost, created_at=f"2026-12-01T00:00:{n:02d}Z",
    )  # fmt: skip


def test_logs_stats_list_and_show_give_costs_computed_over_priced_records(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/costs.db"
    a_costs = [0.0012, 0.0031, 0.0007]
    sink = open_sink(url)
    sink.write_many(
        [_priced(n, "a/x", cost) for n, cost in enumerate(a_costs)]
        + [_priced(0, "b/y", 0.02, request="req-0"), _priced(1, "b/y", None, request="req-1")]
    )
    sink.close()

    done = multillm("logs", "stats", "--json", "--sink", url)
    assert done.returncode == 0, done.stderr
    stats = {s["model_name"]: s for s in json.loads(done.stdout)}
    a, b = stats["a/x"], stats["b/y"]
    assert a["priced"] == 3 and a["cost_usd"] == pytest.approx(sum(a_costs))
    assert a["mean_cost_usd"] == pytest.approx(sum(a_costs) / 3)
    assert a["cost_per_1k_requests_usd"] == pytest.approx(sum(a_costs) / 3 * 1000)
    # The unpriced record is left out of the mean, not counted as free.
    assert (b["records"], b["priced"], b["cost_usd"], b["mean_cost_usd"]) == (2, 1, 0.02, 0.02)

    listed = {
        s["request_id"]: s["cost_usd"] for s in json.loads(multillm("logs", "list", "--json", "--sink", url).stdout)
    }
    assert listed == {"req-0": pytest.approx(0.0012 + 0.02), "req-1": 0.0031, "req-2": 0.0007}

    table = multillm("logs", "stats", "--sink", url).stdout
    assert "cost $" in table and f"{sum(a_costs):.6f}" in table
    shown = multillm("logs", "show", "req-1", "--sink", url).stdout
    assert "0.003100" in shown and "cost $" in shown
