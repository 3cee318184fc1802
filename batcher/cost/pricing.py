"""Cost from usage: prices from genai-prices (maintained, offline) or the job's ``[pricing]``.

A model's price is looked up once and kept: ``input``, ``output`` and ``cached`` US dollars per
million tokens. Prompt tokens include the cached ones (as OpenAI reports them), which are billed
at the cached price; reasoning tokens are part of the completion tokens and billed as output,
as OpenAI bills them. A model with no known price gets no cost (``None``, never a silent 0) and
one warning. ``batch_discount`` prices at the Batch API's half rate.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from batcher.disk_cache import JsonCache, cache_dir, without_secrets
from batcher.errors import ConfigError
from batcher.http.redact import redact_url
from batcher.records import Usage

#: The Batch API's discount on every token price.
BATCH_DISCOUNT = 0.5


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per million tokens, and where the figures come from."""

    input: float
    output: float
    cached: float
    source: str
    input_max: float | None = None  # the highest tier, for prices that rise with prompt length
    output_max: float | None = None

    def cost(self, usage: Usage) -> float | None:
        """The cost of one answer's usage; ``None`` when it has no token counts."""
        if usage.prompt_tokens is None and usage.completion_tokens is None:
            return None
        prompt = usage.prompt_tokens or 0
        cached = min(usage.cached_tokens or 0, prompt)
        completion = usage.completion_tokens or 0
        dollars = (prompt - cached) * self.input + cached * self.cached
        return (dollars + completion * self.output) / 1e6

    def worst_case(self, prompt_tokens: int, completion_budget: int) -> float:
        """The most a request can cost: its prompt uncached and its whole completion budget."""
        top_in = max(self.input, self.input_max or 0.0)
        top_out = max(self.output, self.output_max or 0.0)
        return (prompt_tokens * top_in + completion_budget * top_out) / 1e6


def parse_pricing(table: Mapping[str, Any]) -> tuple[dict[str, Price], bool]:
    """Read a job's ``[pricing]``: per-model tables and ``batch_discount``.

    ``[pricing."my-model"] input = 0.2, output = 0.6, cached = 0.1`` (USD per million tokens;
    ``cached`` defaults to ``input``; 0 is a valid price, for a self-hosted model).
    """
    models: dict[str, Price] = {}
    discount = False
    for key, value in table.items():
        if key == "batch_discount":
            if not isinstance(value, bool):
                raise ConfigError("pricing.batch_discount", f"must be true or false, got {value!r}")
            discount = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(
                f"pricing.{key}",
                'must be a table of prices, e.g. [pricing."my-model"] input = 0.2, output = 0.6',
            )
        unknown = set(value) - {"input", "output", "cached"}
        if unknown:
            raise ConfigError(f"pricing.{key}.{sorted(unknown)[0]}", "unknown key "
                              "(expected input, output, cached)")  # fmt: skip
        prices = {}
        for name in ("input", "output", "cached"):
            if name not in value:
                if name == "cached":
                    continue
                raise ConfigError(f"pricing.{key}.{name}", "missing (USD per million tokens)")
            price = value[name]
            if (
                isinstance(price, bool)
                or not isinstance(price, int | float)
                or not (math.isfinite(price) and price >= 0)
            ):
                raise ConfigError(f"pricing.{key}.{name}", f"must be a number >= 0, got {price!r}")
            prices[name] = float(price)
        models[key] = Price(
            input=prices["input"],
            output=prices["output"],
            cached=prices.get("cached", prices["input"]),
            source="job [pricing]",
        )
    return models, discount


#: Distinct names of answering models whose prices are looked up (see ``Pricer._looks_up``).
MAX_ANSWERING_MODELS = 64


class Pricer:
    """Prices requests by model, from the job's overrides first, then genai-prices."""

    def __init__(
        self,
        overrides: Mapping[str, Price] | None = None,
        *,
        provider_api_url: str | None = None,
        batch_discount: bool = False,
    ) -> None:
        self._overrides = dict(overrides or {})
        # genai-prices matches a provider by the URL's host and path: credentials are no use
        # to it, and the URL goes into the cache key.
        self._api_url = redact_url(provider_api_url) or None
        self._factor = BATCH_DISCOUNT if batch_discount else 1.0
        self._known: dict[str, Price | None] = {}
        self._answered: dict[str, Price | None] = {}
        self.unknown_models: list[str] = []
        #: Set once an answer named a model past ``MAX_ANSWERING_MODELS``: priced as the model
        #: asked for, which may be cheaper than what answered.
        self.answering_models_capped = False
        # A lookup may run in a thread (``prefetch``, or the engine's worker threads); the
        # lock makes a second lookup of the same model wait for the first, not repeat it.
        self._lock = threading.Lock()
        self._prefetching: set[str] = set()
        self._prefetch_lock = threading.Lock()  # not ``_lock``: that one is held by lookups

    @property
    def batch_discount(self) -> bool:
        """Whether every price is the Batch API's (``[pricing] batch_discount``)."""
        return self._factor != 1.0

    def prefetch(self, model: str | None) -> None:
        """Look ``model``'s price up in a background thread, unless it is known or under way
        (a lookup can take 0.3 s: it runs while the first requests are out)."""
        key = model or ""
        with self._prefetch_lock:
            if key in self._known or key in self._prefetching:
                return
            self._prefetching.add(key)
        threading.Thread(target=self._price_of, args=(key,), daemon=True).start()

    def known(self, model: str | None) -> bool:
        """Whether ``model``'s price (or that it has none) is known: no lookup needed."""
        key = model or ""
        return key in self._known or key in self._overrides

    def ready(self, asked: Any, answered: str | None, usage: Usage | None) -> bool:
        """Whether ``cost_of`` can answer at once, without a lookup (which can take 0.3 s,
        so the engine makes it in a thread rather than on its event loop)."""
        if usage is None:
            return True
        asked_name = asked if isinstance(asked, str) else None
        if asked_name in self._overrides or answered in self._overrides:
            return True
        if answered is not None and answered != asked_name and self._looks_up(answered):
            if answered not in self._answered:
                return False
            if self._answered[answered] is not None:
                return True
        return self.known(asked_name)

    def price(self, model: str | None) -> Price | None:
        """The price of ``model``, or ``None`` (noted in ``unknown_models``) when unknown."""
        price = self._price_of(model or "")
        key = model or ""
        if price is None and key not in self.unknown_models:
            self.unknown_models.append(key)
        return price

    def _price_of(self, key: str) -> Price | None:
        if key not in self._known:
            with self._lock:
                if key not in self._known:
                    price = self._discounted(self._overrides.get(key) or self._lookup(key))
                    self._known[key] = price
        return self._known[key]

    def cost_of(self, asked: Any, answered: str | None, usage: Usage | None) -> float | None:
        """The cost of an answer. A job's ``[pricing]`` of the model that answered comes
        first (a gateway may answer with another model than the one asked, billed as that
        one); then the job's price of the model asked for (a self-hosted model may answer
        under another name); else the model that answered (servers answer with dated names,
        such as ``gpt-4o-2024-08-06``, priced exactly); else the model asked for."""
        if usage is None:
            return None
        asked_name = asked if isinstance(asked, str) else None
        if answered is not None and answered in self._overrides:
            return self.cost(answered, usage)
        if asked_name is not None and asked_name in self._overrides:
            return self.cost(asked_name, usage)
        if answered is not None and answered != asked_name and self._looks_up(answered):
            if answered not in self._answered:
                with self._lock:
                    if answered not in self._answered:
                        self._answered[answered] = self._discounted(self._lookup(answered))
            price = self._answered[answered]
            if price is not None:
                return price.cost(usage)
        return self.cost(asked_name, usage)

    def _looks_up(self, answered: str) -> bool:
        """Whether the price of a model that answered is (or may be) looked up: at most
        ``MAX_ANSWERING_MODELS`` names, so a server that names a new model in every answer
        cannot make a lookup per answer; past them an answer is priced as the model asked."""
        if answered in self._answered or len(self._answered) < MAX_ANSWERING_MODELS:
            return True
        self.answering_models_capped = True
        return False

    def cost(self, model: str | None, usage: Usage | None) -> float | None:
        """What an answer cost; ``None`` if the model's price or the usage is unknown."""
        if usage is None:
            return None
        price = self.price(model)
        return None if price is None else price.cost(usage)

    def _discounted(self, price: Price | None) -> Price | None:
        if price is None or self._factor == 1.0:
            return price
        f = self._factor
        return Price(
            input=price.input * f,
            output=price.output * f,
            cached=price.cached * f,
            source=price.source + " (Batch API discount)",
            input_max=None if price.input_max is None else price.input_max * f,
            output_max=None if price.output_max is None else price.output_max * f,
        )

    def _lookup(self, model: str) -> Price | None:
        if not model:
            return None
        cache = PriceCache.default()
        key = cache.key(model, self._api_url) if cache else ""
        if cache:
            hit, price = cache.get(key)
            if hit:
                return price
        price = lookup_price(model, self._api_url)
        if cache:
            cache.put(key, price)
        return price


class PriceCache:
    """Prices found in genai-prices, kept on disk by its version, model and endpoint URL.

    A lookup costs ~0.3 s of CPU (and genai-prices' tables, ~12 MB, stay loaded); its answer
    cannot change until genai-prices is upgraded, so a run of a model seen before reads the
    file instead. Where it lives, and how it is turned off: ``disk_cache``.
    """

    def __init__(self, path: Path, version: str) -> None:
        self.path = path
        self.version = version
        self._file = JsonCache(path)

    @classmethod
    def default(cls) -> PriceCache | None:
        folder = cache_dir()
        if folder is None:
            return None
        import importlib.metadata  # 20 ms: here, in the lookup's thread, not at start-up

        try:
            version = importlib.metadata.version("genai-prices")
        except importlib.metadata.PackageNotFoundError:
            return None
        return cls(folder / "prices.json", version)

    def key(self, model: str, api_url: str | None) -> str:
        return f"{self.version}\t{without_secrets(api_url)}\t{model}"

    def get(self, key: str) -> tuple[bool, Price | None]:
        """``(True, price)`` when ``key`` is in the file (``price`` ``None``: known unknown)."""
        entries = self._file.read()
        if key not in entries:
            return False, None
        found = entries[key]
        try:
            return True, None if found is None else Price(**found)
        except TypeError:  # written by another version of batcher
            return False, None

    def put(self, key: str, price: Price | None) -> None:
        entries = self._file.read()
        entries[key] = None if price is None else dataclasses.asdict(price)
        self._file.write(entries)


def lookup_price(model: str, api_url: str | None = None) -> Price | None:
    """``model``'s price in genai-prices (matched with the endpoint ``api_url`` when given)."""
    from genai_prices import Usage as GenaiUsage
    from genai_prices import calc_price

    try:
        found = calc_price(
            GenaiUsage(input_tokens=0, output_tokens=0),
            model,
            provider_api_url=api_url if api_url else None,
        )
    except LookupError:
        if api_url is None:
            return None
        try:  # an unknown gateway URL: match the model on its own
            found = calc_price(GenaiUsage(input_tokens=0, output_tokens=0), model)
        except LookupError:
            return None
    mp = found.model_price
    base_in, base_out = _base(mp.input_mtok), _base(mp.output_mtok)
    if base_in is None or base_out is None:
        return None
    cached = _base(mp.cache_read_mtok)
    return Price(
        input=base_in,
        output=base_out,
        cached=base_in if cached is None else cached,
        source=f"genai-prices {found.provider.id}/{found.model.id}",
        input_max=_top(mp.input_mtok),
        output_max=_top(mp.output_mtok),
    )


def _base(value: Any) -> float | None:
    """A per-MTok price as a float; for tiered prices, the base tier (noted in DESIGN_NOTES)."""
    if value is None:
        return None
    if isinstance(value, Decimal | int | float):
        return float(value)
    base = getattr(value, "base", None)
    return float(base) if isinstance(base, Decimal | int | float) else None


def _top(value: Any) -> float | None:
    """The highest tier of a tiered price (``None`` for a flat one)."""
    tiers = getattr(value, "tiers", None)
    if not tiers:
        return None
    prices = [float(t.price) for t in tiers if isinstance(getattr(t, "price", None), Decimal)]
    return max(prices) if prices else None
