from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.catalog import (
    DEFAULT_MODELS,
    MODEL_FALLBACKS,
    Model,
    build_catalog,
    get_fallback_provider,
    load_catalog,
    unpriced,
)
from stream.config import Settings
from stream.errors import ConfigError
from stream.prices import DEFAULT_PRICES, Price


def _settings(
    tmp_path: Path, catalog: str | None = None, *, key: str = "", ext: str = "toml"
) -> Settings:
    env = {"TOGETHER_API_KEY": key} if key else {}
    if catalog is not None:
        path = tmp_path / f"catalog.{ext}"
        path.write_text(catalog)
        env["STREAM_CATALOG_FILE"] = str(path)
    return Settings.from_env(env)


def test_defaults_map_the_synthetic_models_to_their_api_strings(tmp_path: Path) -> None:
    catalog = load_catalog(_settings(tmp_path))
    r1 = catalog.get("deepseek-r1-0528-syn")
    assert r1 == Model(
        id="deepseek-r1-0528-syn",
        provider="synthetic",
        api_model="hf:deepseek-ai/DeepSeek-R1-0528",
        timeout_s=120.0,
        price=Price(input=3.0, output=8.0),
        context_tokens=163_840,
    )
    synthetic = [m for m in catalog.models.values() if m.provider == "synthetic"]
    assert all(m.api_model.startswith("hf:") for m in synthetic)
    assert catalog.get("kimi-k2-thinking-syn").api_model == "hf:moonshotai/Kimi-K2-Thinking"  # type: ignore[union-attr]
    assert catalog.get("nope") is None


def test_prices_default_and_are_overridden_by_the_catalog_file(tmp_path: Path) -> None:
    defaults = load_catalog(_settings(tmp_path))
    assert unpriced(defaults) == ["glm-4.6-syn", "minimax-m2-syn", "qwen3-coder-480b-syn"]
    text = """
[models.my-model-syn]
provider = "synthetic"
api_model = "hf:org/My-Model"
initial_concurrency = 2
price = { input = 0.5, output = 2.0, cached_input = 0.125 }
context_tokens = 32768

[prices]
"glm-4.6-syn" = { input = 0.6, output = 2.2 }
"deepseek-r1-0528-syn" = { input = 2.5, output = 7.5 }
"""
    catalog = load_catalog(_settings(tmp_path, text))
    mine = catalog.models["my-model-syn"]
    assert mine.initial_concurrency == 2 and mine.price is not None
    assert mine.context_tokens == 32768
    assert mine.price.cached_input == 0.125 and mine.price.read_on.endswith("catalog.toml")
    assert catalog.models["glm-4.6-syn"].price.input == 0.6  # type: ignore[union-attr]
    assert catalog.models["deepseek-r1-0528-syn"].price.output == 7.5  # type: ignore[union-attr]
    assert unpriced(catalog) == ["minimax-m2-syn", "qwen3-coder-480b-syn"]


def test_a_default_model_replaced_without_a_price_keeps_its_list_price(tmp_path: Path) -> None:
    text = '[models.deepseek-r1]\nprovider = "together"\napi_model = "deepseek-ai/R1-new"\n'
    replaced = load_catalog(_settings(tmp_path, text)).models["deepseek-r1"]
    assert replaced.api_model == "deepseek-ai/R1-new"
    assert replaced.price == DEFAULT_PRICES["deepseek-r1"]
    assert replaced.context_tokens == 163_840  # and its context window
    text = '[models.new]\nprovider = "together"\napi_model = "org/new"\n'
    assert load_catalog(_settings(tmp_path, text)).models["new"].context_tokens == 2**20


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[prices]\n"nope" = { input = 1, output = 1 }', "not in the catalog"),
        ('[prices]\n"glm-4.6-syn" = { input = 1 }', "input and output"),
        ('[prices]\n"glm-4.6-syn" = { input = -1, output = 1 }', ">= 0"),
        ('[prices]\n"glm-4.6-syn" = { input = 1, output = 1, vat = 1 }', "unknown keys"),
        (
            '[models.m]\nprovider = "synthetic"\napi_model = "hf:m"\ninitial_concurrency = 0',
            "initial_concurrency",
        ),
        (
            '[models.m]\nprovider = "synthetic"\napi_model = "hf:m"\ncontext_tokens = 1.5',
            "context_tokens must be a whole number",
        ),
    ],
)
def test_a_bad_price_is_one_clear_error(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_catalog(_settings(tmp_path, text))


def test_reasoning_models_get_long_timeouts(tmp_path: Path) -> None:
    catalog = load_catalog(_settings(tmp_path))
    for model_id in ("deepseek-r1-0528-syn", "kimi-k2-thinking-syn", "deepseek-r1"):
        assert 60 <= catalog.models[model_id].timeout_s <= 120


def test_fallback_for_follows_the_mapping_only(tmp_path: Path) -> None:
    catalog = load_catalog(_settings(tmp_path))
    assert catalog.fallback_for("deepseek-r1-0528-syn").api_model == "deepseek-ai/DeepSeek-R1"  # type: ignore[union-attr]
    kimi = catalog.fallback_for("kimi-k2-thinking-syn")
    assert kimi is not None and kimi.api_model == "moonshotai/Kimi-K2-Instruct"
    assert catalog.fallback_for("deepseek-v3-0324-syn") is None
    assert catalog.fallback_for("glm-4.6-syn") is None


def test_get_fallback_provider_needs_the_mapping_and_the_together_key(tmp_path: Path) -> None:
    without = _settings(tmp_path)
    with_key = _settings(tmp_path, key="tg-test")
    catalog = load_catalog(with_key)
    assert get_fallback_provider("deepseek-r1-0528-syn", catalog, without) is None
    model = get_fallback_provider("deepseek-r1-0528-syn", catalog, with_key)
    assert model is not None and model.id == "deepseek-r1" and model.provider == "together"
    assert get_fallback_provider("minimax-m2-syn", catalog, with_key) is None
    assert get_fallback_provider("unknown", catalog, with_key) is None


def test_a_file_adds_models_and_replaces_the_mapping(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        """
        [models.my-syn]
        provider = "synthetic"
        api_model = "hf:org/My"
        timeout_s = 30

        [models.my-tg]
        provider = "together"
        api_model = "org/My"

        [fallbacks]
        "my-syn" = "my-tg"
        """,
    )
    catalog = load_catalog(settings)
    assert catalog.get("my-syn") == Model(
        id="my-syn", provider="synthetic", api_model="hf:org/My", timeout_s=30.0
    )
    assert catalog.fallback_for("my-syn") == catalog.get("my-tg")
    # the default mappings stay unless replaced (a file that added one dropped them all)
    assert catalog.fallback_for("deepseek-r1-0528-syn") == catalog.get("deepseek-r1")
    assert catalog.get("glm-4.6-syn") is not None  # defaults stay unless replaced


def test_a_catalog_file_replaces_or_removes_a_default_fallback(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        """
        [fallbacks]
        "deepseek-r1-0528-syn" = ""
        "kimi-k2-thinking-syn" = "deepseek-r1"
        """,
    )
    catalog = load_catalog(settings)
    assert catalog.fallback_for("deepseek-r1-0528-syn") is None  # "": none for this one
    assert catalog.fallback_for("kimi-k2-thinking-syn") == catalog.get("deepseek-r1")
    expected = {k: v for k, v in MODEL_FALLBACKS.items() if k != "deepseek-r1-0528-syn"}
    assert catalog.fallbacks == expected | {"kimi-k2-thinking-syn": "deepseek-r1"}


def test_a_json_file_works_too(tmp_path: Path) -> None:
    body = {"models": {"glm-4.6-syn": {"provider": "synthetic", "api_model": "hf:x/y"}}}
    catalog = load_catalog(_settings(tmp_path, json.dumps(body), ext="json"))
    assert catalog.models["glm-4.6-syn"].api_model == "hf:x/y"
    assert catalog.fallbacks == MODEL_FALLBACKS


_TOGETHER = '[models.tg]\nprovider = "together"\napi_model = "a/b"\n'
_SYN = '[models.syn]\nprovider = "synthetic"\napi_model = "hf:a/b"\n'


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[fallbacks]\n"deepseek-r1-0528-syn" = "missing"', ["'missing'", "not a model"]),
        ('[fallbacks]\n"missing" = "deepseek-r1"', ["'missing'", "not a model"]),
        ('[fallbacks]\n"deepseek-r1-0528-syn" = "glm-4.6-syn"', ["target", "together"]),
        ('[fallbacks]\n"deepseek-r1" = "kimi-k2-instruct"', ["source", "synthetic"]),
        ('[fallbacks]\n"glm-4.6-syn" = "glm-4.6-syn"', ["'glm-4.6-syn'", "itself"]),
        (
            '[fallbacks]\n"deepseek-r1-0528-syn" = "deepseek-r1"\n"deepseek-r1" = '
            '"deepseek-r1-0528-syn"',
            ["cycle"],
        ),
        (
            '[fallbacks]\n"glm-4.6-syn" = "deepseek-r1-0528-syn"\n'
            '"deepseek-r1-0528-syn" = "deepseek-r1"',
            ["'glm-4.6-syn'", "one level"],
        ),
        ('[models.x]\nprovider = "openai"\napi_model = "m"', ["'x'", "provider"]),
        ('[models.x]\nprovider = "together"\napi_model = 3', ["'x'", "api_model"]),
        ('[models.x]\nprovider = "together"\napi_model = ""', ["'x'", "api_model"]),
        (_TOGETHER.replace("tg", "x") + "timeout_s = -1", ["'x'", "timeout_s"]),
        (_TOGETHER.replace("tg", "x") + 'timeout_s = "60"', ["'x'", "timeout_s"]),
        (_TOGETHER.replace("tg", "x") + "timeout_s = true", ["'x'", "timeout_s"]),
        (_TOGETHER.replace("tg", "x") + "colour = 1", ["'x'", "unknown keys"]),
        ('[models]\nx = "y"', ["'x'", "table"]),
        ("models = 3", ["models"]),
        ('fallbacks = "x"', ["fallbacks"]),
        ("[fallbacks]\nsyn = 3", ["'syn'"]),
        ("[extra]\na = 1", ["unknown top-level"]),
        ("this is = = not toml", ["not valid TOML"]),
    ],
)
def test_bad_catalogs_name_the_entry_and_the_file(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    settings = _settings(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_catalog(settings)
    message = str(caught.value)
    assert str(settings.catalog_file) in message
    for word in words:
        assert word in message


def test_bad_json_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_catalog(_settings(tmp_path, "{nope", ext="json"))
    with pytest.raises(ConfigError, match="table/object"):
        load_catalog(_settings(tmp_path, "[1, 2]", ext="json"))


def test_the_built_in_catalog_is_valid() -> None:
    catalog = build_catalog({m.id: m for m in DEFAULT_MODELS}, MODEL_FALLBACKS)
    assert set(catalog.fallbacks) == {"deepseek-r1-0528-syn", "kimi-k2-thinking-syn"}


_IDS = st.sampled_from(["a", "b", "c", "d", "e", "f"])


@given(
    providers=st.dictionaries(_IDS, st.sampled_from(["synthetic", "together"])),
    mapping=st.dictionaries(_IDS, _IDS, max_size=6),
)
def test_every_catalog_that_loads_has_one_level_synthetic_to_together_fallbacks(
    providers: dict[str, str], mapping: dict[str, str]
) -> None:
    models = {
        k: Model(id=k, provider=p, api_model=f"x/{k}", timeout_s=1.0)  # type: ignore[arg-type]
        for k, p in providers.items()
    }
    try:
        catalog = build_catalog(models, mapping, source="prop")
    except ConfigError as exc:
        assert "prop" in str(exc)
        return
    for source_id in mapping:
        target = catalog.fallback_for(source_id)
        assert target is not None and target.provider == "together"
        assert models[source_id].provider == "synthetic"
        assert catalog.fallback_for(target.id) is None
