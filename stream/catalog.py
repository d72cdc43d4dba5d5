"""The model catalog: catalog id → provider, API model string and per-model timeout.

Requests name a catalog id (`deepseek-r1-0528-syn`); the provider client needs the API
string (`hf:deepseek-ai/DeepSeek-R1-0528`) and how long the model may take. `MODEL_FALLBACKS`
maps a Synthetic model to its Together AI equivalent, one level deep.

A catalog file (`STREAM_CATALOG_FILE`, TOML or JSON) overrides the defaults:

    [models.my-model-syn]              # added, or replaces a default with the same id
    provider = "synthetic"             # "synthetic" | "together"
    api_model = "hf:org/My-Model"
    timeout_s = 90
    initial_concurrency = 4            # optional: calls in flight at start (grows from it)
    context_tokens = 131072            # optional: the context window (default 2²⁰)
    price = { input = 0.5, output = 2.0, cached_input = 0.1 }   # optional, USD per 10⁶

    [prices]                           # optional: prices of models already in the catalog
    "deepseek-r1-0528-syn" = { input = 3.0, output = 8.0 }

    [fallbacks]                        # added to the default mapping, or replacing one
    "my-model-syn" = "deepseek-r1"
    "kimi-k2-thinking-syn" = ""        # "": no fallback for this one

Everything is checked at load, and a bad entry is one `ConfigError` naming it and the file,
so a worker with a broken catalog refuses to start instead of dead-lettering at run time.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from stream.checks import read_text
from stream.config import Settings
from stream.errors import ConfigError
from stream.prices import DEFAULT_PRICES, Price

__all__ = [
    "DEFAULT_MODELS",
    "MODEL_FALLBACKS",
    "Catalog",
    "Model",
    "get_fallback_provider",
    "load_catalog",
    "unpriced",
]

ProviderName = Literal["synthetic", "together"]
# The context window of a model that does not give its own: above any served today, so it
# bounds an absurd usage without cutting a real one.
DEFAULT_CONTEXT_TOKENS = 2**20
PROVIDERS: tuple[ProviderName, ...] = ("synthetic", "together")
_BUILT_IN = "<built-in defaults>"


@dataclass(frozen=True, kw_only=True)
class Model:
    id: str
    provider: ProviderName
    api_model: str
    timeout_s: float
    price: Price | None = None
    # Calls in flight when the worker starts (None: the provider's default); grows by AIMD.
    initial_concurrency: int | None = None
    # The context window, in tokens: no answer can bill more prompt or completion tokens,
    # so a usage over it is not believed (`stream.providers.charges`).
    context_tokens: int = DEFAULT_CONTEXT_TOKENS


def _m(
    id: str,
    provider: ProviderName,
    api_model: str,
    timeout_s: float,
    *,
    price: Price | None = None,
    initial_concurrency: int | None = None,
    context_tokens: int | None = None,
) -> Model:
    """A catalog model (built in, or from a file); without a price or a context window of
    its own, those known for its id when there are."""
    if context_tokens is None:
        context_tokens = DEFAULT_CONTEXTS.get(id, DEFAULT_CONTEXT_TOKENS)
    return Model(
        id=id,
        provider=provider,
        api_model=api_model,
        timeout_s=timeout_s,
        price=DEFAULT_PRICES.get(id) if price is None else price,
        initial_concurrency=initial_concurrency,
        context_tokens=context_tokens,
    )


# Context windows, in tokens, as the models' configurations give them
# (max_position_embeddings), rounded up where a provider's page says more: a bound on what
# one answer can bill. Qwen3-Coder has none here (262,144 native, up to 10⁶ with YaRN,
# which a provider may serve): it gets the default.
DEFAULT_CONTEXTS: Mapping[str, int] = {
    "deepseek-r1-0528-syn": 163_840,
    "kimi-k2-thinking-syn": 262_144,
    "deepseek-v3-0324-syn": 163_840,
    "deepseek-v3.1-terminus-syn": 163_840,
    "minimax-m2-syn": 204_800,
    "glm-4.6-syn": 204_800,
    "deepseek-r1": 163_840,
    "kimi-k2-instruct": 262_144,
}

# Reasoning models think for minutes before the first token: they get the long budgets.
DEFAULT_MODELS: tuple[Model, ...] = (
    _m("deepseek-r1-0528-syn", "synthetic", "hf:deepseek-ai/DeepSeek-R1-0528", 120.0),
    _m("kimi-k2-thinking-syn", "synthetic", "hf:moonshotai/Kimi-K2-Thinking", 120.0),
    _m("deepseek-v3-0324-syn", "synthetic", "hf:deepseek-ai/DeepSeek-V3-0324", 60.0),
    _m("deepseek-v3.1-terminus-syn", "synthetic", "hf:deepseek-ai/DeepSeek-V3.1-Terminus", 60.0),
    _m("minimax-m2-syn", "synthetic", "hf:MiniMaxAI/MiniMax-M2", 90.0),
    _m("glm-4.6-syn", "synthetic", "hf:zai-org/GLM-4.6", 90.0),
    _m("qwen3-coder-480b-syn", "synthetic", "hf:Qwen/Qwen3-Coder-480B-A35B-Instruct", 60.0),
    _m("deepseek-r1", "together", "deepseek-ai/DeepSeek-R1", 120.0),
    _m("kimi-k2-instruct", "together", "moonshotai/Kimi-K2-Instruct", 60.0),
)

# DeepSeek V3, MiniMax, GLM and Qwen Coder have no Together equivalent on purpose.
MODEL_FALLBACKS: Mapping[str, str] = {
    "deepseek-r1-0528-syn": "deepseek-r1",
    "kimi-k2-thinking-syn": "kimi-k2-instruct",
}


@dataclass(frozen=True, kw_only=True)
class Catalog:
    models: Mapping[str, Model]
    fallbacks: Mapping[str, str] = field(default_factory=dict)
    source: str = _BUILT_IN

    def get(self, model_id: str) -> Model | None:
        return self.models.get(model_id)

    def fallback_for(self, model_id: str) -> Model | None:
        """The mapped fallback model, whether or not its provider is configured."""
        target = self.fallbacks.get(model_id)
        return None if target is None else self.models.get(target)

    def __repr__(self) -> str:
        return f"Catalog({len(self.models)} models, {len(self.fallbacks)} fallbacks, {self.source})"


def unpriced(catalog: Catalog) -> list[str]:
    """Models without a price: their calls cost nothing as far as the worker can tell."""
    return sorted(model.id for model in catalog.models.values() if model.price is None)


def get_fallback_provider(model_id: str, catalog: Catalog, settings: Settings) -> Model | None:
    """The fallback to run `model_id` on: only when it is mapped AND Together has a key."""
    target = catalog.fallback_for(model_id)
    if target is None or not settings.together.api_key:
        return None
    return target


def load_catalog(settings: Settings) -> Catalog:
    """The default catalog, overridden by `settings.catalog_file` when set; validated."""
    models = {m.id: m for m in DEFAULT_MODELS}
    fallbacks: Mapping[str, str] = dict(MODEL_FALLBACKS)
    source = _BUILT_IN
    if settings.catalog_file is not None:
        source = str(settings.catalog_file)
        data = _read(settings.catalog_file)
        models.update(_parse_models(data.get("models", {}), source))
        models.update(_parse_prices(data.get("prices", {}), models, source))
        if "fallbacks" in data:
            changed = _parse_fallbacks(data["fallbacks"], source)
            kept = {k: v for k, v in fallbacks.items() if k not in changed}
            # the file's own first: an error names its entry before a default it broke
            fallbacks = {k: v for k, v in changed.items() if v} | kept
        unknown = set(data) - {"models", "fallbacks", "prices"}
        if unknown:
            raise ConfigError(f"catalog {source}: unknown top-level keys {sorted(unknown)}")
    return build_catalog(models, fallbacks, source=source)


def build_catalog(
    models: Mapping[str, Model], fallbacks: Mapping[str, str], *, source: str = _BUILT_IN
) -> Catalog:
    """A validated catalog; raises `ConfigError` naming the bad entry and `source`."""
    for source_id, target_id in fallbacks.items():
        _check_fallback(models, fallbacks, source_id, target_id, source)
    return Catalog(models=dict(models), fallbacks=dict(fallbacks), source=source)


def _check_fallback(
    models: Mapping[str, Model], fallbacks: Mapping[str, str], src: str, dst: str, where: str
) -> None:
    entry = f"catalog {where}: fallback {src!r} → {dst!r}"
    if src == dst:
        raise ConfigError(f"{entry} maps a model to itself; remove it")
    if fallbacks.get(dst) == src:
        raise ConfigError(f"{entry} forms a cycle with {dst!r} → {src!r}; fallbacks go one way")
    if dst in fallbacks:
        raise ConfigError(f"{entry} chains on to {fallbacks[dst]!r}; fallbacks are one level deep")
    if src not in models:
        raise ConfigError(f"{entry}: {src!r} is not a model in the catalog")
    if dst not in models:
        raise ConfigError(f"{entry}: {dst!r} is not a model in the catalog")
    if models[src].provider != "synthetic":
        raise ConfigError(f"{entry}: the source must be a synthetic model")
    if models[dst].provider != "together":
        raise ConfigError(f"{entry}: the target must be a together model")


def _read(path: Path) -> dict[str, Any]:
    text = read_text(path, f"catalog {path}")
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"catalog {path} is not valid {kind}: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"catalog {path} is nested too deep to be a catalog") from None
    if not isinstance(data, dict):
        raise ConfigError(f"catalog {path} must hold a table/object at the top")
    return cast(dict[str, Any], data)


def _parse_models(raw: object, where: str) -> dict[str, Model]:
    if not isinstance(raw, dict):
        raise ConfigError(f"catalog {where}: 'models' must be a table of model ids")
    return {str(key): _parse_model(str(key), value, where) for key, value in raw.items()}


def _parse_model(model_id: str, raw: object, where: str) -> Model:
    entry = f"catalog {where}: model {model_id!r}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{entry} must be a table with provider, api_model, timeout_s")
    unknown = set(raw) - {
        "provider",
        "api_model",
        "timeout_s",
        "price",
        "initial_concurrency",
        "context_tokens",
    }
    if unknown:
        raise ConfigError(f"{entry} has unknown keys {sorted(unknown)}")
    provider = raw.get("provider")
    if provider not in PROVIDERS:
        raise ConfigError(f"{entry}: provider must be one of {PROVIDERS} (got {provider!r})")
    api_model = raw.get("api_model")
    if not isinstance(api_model, str) or not api_model.strip():
        raise ConfigError(f"{entry}: api_model must be a non-empty string (got {api_model!r})")
    timeout = _positive(raw.get("timeout_s", 60.0), f"{entry}: timeout_s")
    initial = raw.get("initial_concurrency")
    if initial is not None and not _whole(initial):
        raise ConfigError(f"{entry}: initial_concurrency must be a whole number >= 1")
    context = raw.get("context_tokens")
    if context is not None and not _whole(context):
        raise ConfigError(f"{entry}: context_tokens must be a whole number >= 1")
    price = _parse_price(raw["price"], f"{entry}: price", where) if "price" in raw else None
    return _m(
        model_id,
        provider,
        api_model,
        timeout,
        price=price,
        initial_concurrency=initial,
        context_tokens=context,
    )


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive(value: object, what: str, *, zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not (value >= 0 if zero else value > 0):  # type: ignore[arg-type,operator]
        bound = "a finite number >= 0" if zero else "a positive, finite number"
        raise ConfigError(f"{what} must be {bound} (got {value!r})")
    return float(value)  # type: ignore[arg-type]


def _parse_price(raw: object, what: str, where: str) -> Price:
    if not isinstance(raw, dict) or not {"input", "output"} <= set(raw):
        raise ConfigError(f"{what} must be a table with input and output (USD per 10⁶ tokens)")
    unknown = set(raw) - {"input", "output", "cached_input"}
    if unknown:
        raise ConfigError(f"{what} has unknown keys {sorted(unknown)}")
    cached = raw.get("cached_input")
    return Price(
        input=_positive(raw["input"], f"{what}.input", zero=True),
        output=_positive(raw["output"], f"{what}.output", zero=True),
        cached_input=None
        if cached is None
        else _positive(cached, f"{what}.cached_input", zero=True),
        read_on=where,
    )


def _parse_prices(raw: object, models: Mapping[str, Model], where: str) -> dict[str, Model]:
    if not isinstance(raw, dict):
        raise ConfigError(f"catalog {where}: 'prices' must be a table of id = {{input, output}}")
    priced: dict[str, Model] = {}
    for key, value in raw.items():
        model = models.get(str(key))
        if model is None:
            raise ConfigError(f"catalog {where}: price for {key!r}, which is not in the catalog")
        price = _parse_price(value, f"catalog {where}: price of {key!r}", where)
        priced[model.id] = replace(model, price=price)
    return priced


def _parse_fallbacks(raw: object, where: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ConfigError(f"catalog {where}: 'fallbacks' must be a table of id = id")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise ConfigError(
                f"catalog {where}: fallback {key!r} must name a model id (got {value!r})"
            )
    return {str(k): str(v) for k, v in raw.items()}
