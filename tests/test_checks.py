from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from stream import config
from stream.backfill.window import parse_age, parse_time
from stream.checks import (
    INSTANCE_ID_MAX,
    check_instance_id,
    check_topic_prefix,
    parse_duration,
)
from stream.config import Settings, seconds_option
from stream.errors import ConfigError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

parts = st.lists(
    st.tuples(st.integers(min_value=0, max_value=10_000), st.sampled_from(sorted(UNITS))),
    min_size=1,
    max_size=4,
)


def _text(chosen: list[tuple[int, str]], upper: bool) -> str:
    text = "".join(f"{number}{unit}" for number, unit in chosen)
    return text.upper() if upper else text


@given(parts, st.booleans(), st.sampled_from(["", " ", "\t"]))
def test_a_written_duration_reads_back_as_its_seconds(
    chosen: list[tuple[int, str]], upper: bool, pad: str
) -> None:
    text = f"{pad}{_text(chosen, upper)}{pad}"
    assert parse_duration(text) == sum(number * UNITS[unit] for number, unit in chosen)


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False), st.sampled_from(["", "s"]))
@example(2.0, "s")
@example(1e-05, "s")
@example(3600.0, "")
def test_a_float_written_by_python_reads_back(seconds: float, unit: str) -> None:
    # settings are generated with f"{seconds}s" (the bench does): 1e-05s, 3600.0s
    assert parse_duration(f"{seconds}{unit}") == seconds


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " ",
        "soon",
        "h",
        "1h 30m",
        "1m30",
        "-1h",
        "+5s",
        "1y",
        "1ms",
        "inf",
        "nan",
        "1_000s",
        "1,5h",
        "1e400s",
        "1h-",
        "١٢s",  # Arabic-Indic digits: str.isdigit says yes, a duration says no
    ],
)
def test_garbage_is_not_a_duration(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.text(max_size=12))
def test_any_text_is_a_finite_duration_or_a_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert math.isfinite(seconds) and seconds >= 0


@given(st.text(max_size=12))
def test_an_option_in_seconds_takes_what_float_took_and_durations(text: str) -> None:
    """--interval, --stall-after, --retry-for…: a number reads as before (the command's
    bounds refuse inf and nan in its own words); units as the environment's durations."""
    try:
        expected = float(text)
    except ValueError:
        try:
            expected = parse_duration(text)
        except ValueError:
            with pytest.raises(argparse.ArgumentTypeError, match="is not a duration"):
                seconds_option(text)
            return
    got = seconds_option(text)
    assert got == expected or (math.isnan(got) and math.isnan(expected))


@pytest.mark.parametrize(("text", "seconds"), [("5m", 300.0), ("1h30m", 5400.0), ("90", 90.0)])
def test_an_option_in_seconds_reads_units(text: str, seconds: float) -> None:
    assert seconds_option(text) == seconds


@given(parts.filter(lambda chosen: any(number for number, _ in chosen)), st.booleans())
def test_the_spend_window_and_the_redrive_deadline_take_the_same_forms(
    chosen: list[tuple[int, str]], upper: bool
) -> None:
    text = _text(chosen, upper)
    expected = parse_age(text, option="--deadline", most=10**12)
    if expected > 31 * 86400:  # a spend window is at most 31 days
        with pytest.raises(ConfigError, match="STREAM_SPEND_WINDOW must be at most 31d"):
            Settings.from_env({"STREAM_SPEND_WINDOW": text})
        return
    assert Settings.from_env({"STREAM_SPEND_WINDOW": text}).spend.window_s == expected


@pytest.mark.parametrize("text", ["1h30m", "90", "2.5", "1.5h", "1w"])
def test_forms_once_taken_by_only_one_of_them(text: str) -> None:
    window = Settings.from_env({"STREAM_SPEND_WINDOW": text}).spend.window_s
    assert window == parse_age(text, option="--deadline") == parse_duration(text)


@pytest.mark.parametrize("bad", ["soon", "0", "0m", "-1h", "1h 30m"])
def test_garbage_and_zero_are_one_config_error_for_both(bad: str) -> None:
    with pytest.raises(ConfigError, match="STREAM_SPEND_WINDOW must be a duration"):
        Settings.from_env({"STREAM_SPEND_WINDOW": bad})
    with pytest.raises(ConfigError, match="--deadline .* is not a duration"):
        parse_age(bad, option="--deadline")


def test_an_age_in_since_takes_the_same_forms_but_not_a_bare_number() -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    noon = int(now.timestamp() * 1000)
    assert parse_time("1.5h", option="--since", now=now) == noon - 90 * 60_000
    assert parse_time("1W", option="--since", now=now) == noon - 7 * 86_400_000
    # 20250601 would be a date to some and seconds to others: neither, say so
    for bare in ("90", "20250601"):
        with pytest.raises(ConfigError, match="--since"):
            parse_time(bare, option="--since", now=now)


@given(st.text(min_size=1, max_size=30))
def test_an_instance_id_takes_the_characters_of_a_topic_name(text: str) -> None:
    def accepted(check: Callable[[str], object]) -> bool:
        try:
            check(text)
        except ConfigError:
            return False
        return True

    as_id = accepted(lambda value: check_instance_id(value, "STREAM_INSTANCE_ID"))
    assert as_id == (accepted(check_topic_prefix) and text not in (".", ".."))
    if as_id:
        assert check_instance_id(text, "x") == text
    assert config.check_instance_id is check_instance_id  # worker.py imports it from config


def test_an_instance_id_leaves_room_for_the_stage_suffix() -> None:
    assert check_instance_id("w" * INSTANCE_ID_MAX, "x") == "w" * INSTANCE_ID_MAX
    with pytest.raises(ConfigError, match=f"STREAM_INSTANCE_ID 'w+' .* up to {INSTANCE_ID_MAX}"):
        Settings.from_env({"STREAM_INSTANCE_ID": "w" * (INSTANCE_ID_MAX + 1)})
