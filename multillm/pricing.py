"""What a model call cost, in US dollars: the `cost_usd` of a record.

Prices come from the `genai-prices` package's bundled table (never fetched at run time)
or, per model, from `[prices."provider/model"]` in `multillm.toml`, which wins. A model
is matched against the table once per process: by our provider's name when the table
knows a provider of that name, else by the provider's base URL (so `[providers.azure]`
pointing at api.openai.com is priced as OpenAI). A model the table does not know costs
None, with one warning per model per process: never a wrong number.

What is counted: prompt tokens, of which those the provider reports as read from its
cache are priced at the table's cache-read price; completion tokens, which include
reasoning tokens on OpenAI's API, at the output price. Not counted: cache writes, tool
and search fees, per-request fees, and any discount a provider grants outside its list
price.
"""

from __future__ import annotations

import contextlib
from decimal import Decimal
from typing import Final

import structlog
from genai_prices import Usage, calc_price
from msgspec import Struct

from multillm.config import PriceOverride, ProviderConfig

log = structlog.get_logger(__name__)

_PER_MTOK: Final = Decimal(1_000_000)


class TokenUsage(Struct, frozen=True, kw_only=True):
    """The tokens of one call, as the provider reported them; `cached_tokens` are part of `prompt_tokens`."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class _Table(Struct, frozen=True):
    """Where the table prices a model: its own name there, and the provider to match it under."""

    model_ref: str
    provider_id: str | None
    provider_api_url: str | None


class Prices:
    """Prices models; one per process. Not thread-safe: the workers price on their event loop."""

    def __init__(self, providers: dict[str, ProviderConfig], overrides: dict[str, PriceOverride]) -> None:
        self._providers = providers
        self._overrides = overrides
        # model name -> how it is priced; None: it has no known price (warned once).
        self._resolved: dict[str, PriceOverride | _Table | None] = {}
        # genai-prices reads its bundled table at the first lookup (about 25 ms, more under load):
        # here, as the worker starts, rather than on the event loop under its first requests.
        with contextlib.suppress(LookupError):
            calc_price(Usage(input_tokens=0, output_tokens=0), "", provider_id="")

    def cost_usd(self, model_name: str, usage: TokenUsage) -> float | None:
        """The cost of `usage` on `model_name` (`provider/model`), or None when its price is unknown."""
        if model_name not in self._resolved:
            self._resolved[model_name] = self._resolve(model_name)
        source = self._resolved[model_name]
        if source is None:
            return None
        if isinstance(source, PriceOverride):
            return float(_override_cost(source, usage))
        return float(_table_cost(source, usage))

    def _resolve(self, model_name: str) -> PriceOverride | _Table | None:
        if (override := self._overrides.get(model_name)) is not None:
            return override
        provider, _, model = model_name.partition("/")
        candidates = [_Table(model, provider, None)]
        if (config := self._providers.get(provider)) is not None:
            candidates.append(_Table(model, None, config.base_url))
        for table in candidates:
            try:
                _table_cost(table, TokenUsage(prompt_tokens=0, completion_tokens=0))
            except LookupError:
                continue
            return table
        log.warning(
            "price.unknown",
            model=model_name,
            hint=f'add [prices."{model_name}"] input_per_mtok and output_per_mtok to multillm.toml',
        )
        return None


def _override_cost(price: PriceOverride, usage: TokenUsage) -> Decimal:
    cached_price = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    fresh = usage.prompt_tokens - usage.cached_tokens
    total = (
        Decimal(fresh) * Decimal(str(price.input_per_mtok))
        + Decimal(usage.cached_tokens) * Decimal(str(cached_price))
        + Decimal(usage.completion_tokens) * Decimal(str(price.output_per_mtok))
    )
    return total / _PER_MTOK


def _table_cost(table: _Table, usage: TokenUsage) -> Decimal:
    tokens = Usage(
        input_tokens=usage.prompt_tokens,
        cache_read_tokens=usage.cached_tokens or None,
        output_tokens=usage.completion_tokens,
    )
    if table.provider_id is not None:
        found = calc_price(tokens, table.model_ref, provider_id=table.provider_id)
    else:
        found = calc_price(tokens, table.model_ref, provider_api_url=table.provider_api_url)
    return found.total_price
