"""Where settings come from: the environment, laid over an optional flat TOML file
(`STREAM_CONFIG_FILE`), read through typed look-ups that turn a bad value into one
`ConfigError` naming the variable; and `Secret`, which keeps a value out of reprs, logs and
exceptions. `Source` also remembers every name it was asked for, so a file key that is not
a setting is caught (`check_file_keys`) and the deployment checks can list the variables.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from stream.checks import read_text
from stream.errors import ConfigError

__all__ = ["Secret", "Source"]

T = TypeVar("T")

# Variables read outside `Settings` (the Kafka jars' cache, the bench's profiler).
READ_ELSEWHERE = frozenset(
    {"STREAM_CACHE_DIR", "STREAM_BENCH_PROFILE", "STREAM_BENCH_PROFILER", "STREAM_BENCH_RUN"}
)


class Secret:
    """A string that never shows itself in `repr`, `str`, logs or exceptions."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__


class Source:
    """Typed look-ups over the environment, merged over `STREAM_CONFIG_FILE` if set."""

    def __init__(self, env: dict[str, str]) -> None:
        self.file = env.get("STREAM_CONFIG_FILE")
        from_file = self._file_values(self.file)
        self.file_keys = frozenset(from_file)
        # An empty variable counts as unset (see `text`), also over the file: compose's
        # `${NAME:-}` must not erase a spend limit the file sets.
        self.env_keys = frozenset(k for k, v in env.items() if v.strip())
        self.env = {**from_file, **{k: v for k, v in env.items() if v.strip()}}
        self.asked: set[str] = {"STREAM_CONFIG_FILE", *READ_ELSEWHERE}

    @staticmethod
    def _file_values(path: str | None) -> dict[str, str]:
        if not path:
            return {}
        text = read_text(Path(path), f"STREAM_CONFIG_FILE {path!r}")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"STREAM_CONFIG_FILE {path!r} is not valid TOML: {exc}") from exc
        except RecursionError:
            raise ConfigError(f"STREAM_CONFIG_FILE {path!r} is nested too deep") from None
        for key, value in data.items():
            if not isinstance(value, str | int | float | bool):
                raise ConfigError(
                    f"STREAM_CONFIG_FILE {path!r}: {key} must be a string, number or boolean "
                    "(settings are flat: NAME = value)"
                )
        return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in data.items()}

    def check_file_keys(self) -> None:
        """Every key of the config file is a setting: a typo must not pass silently."""
        for key in sorted(self.file_keys - self.asked):
            close = difflib.get_close_matches(key, sorted(self.asked), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"STREAM_CONFIG_FILE {self.file!r}: {key} is not a setting{hint}; "
                "the README's Configuration section lists them"
            )

    def check_env_keys(self) -> None:
        """A `STREAM_*` variable that is no setting but close to one is a typo: refused,
        or `STREAM_SPEND_LIMT_USD=5` would run with no limit. Others are left alone (a
        platform may set variables of its own that share the prefix)."""
        settings = sorted(self.asked)
        for key in sorted(self.env_keys - self.asked - self.file_keys):
            if not key.startswith("STREAM_"):
                continue
            if close := difflib.get_close_matches(key, settings, n=1, cutoff=0.85):
                raise ConfigError(
                    f"{key} is not a setting (did you mean {close[0]}?): rename or unset it; "
                    "the README's Configuration section lists them"
                )

    def text(self, name: str, default: str) -> str:
        # An empty variable counts as unset: compose's `${NAME:-}` and templating tools
        # define variables as "" when they mean "not set".
        self.asked.add(name)
        return self.env.get(name, "").strip() or default

    def path(self, name: str) -> Path | None:
        value = self.text(name, "")
        if value and not Path(value).is_file():
            raise ConfigError(f"{name} points at {value!r}, which is not a readable file")
        return Path(value) if value else None

    def file_name(self, name: str) -> str | None:
        path = self.path(name)
        return None if path is None else str(path)

    def secret(self, name: str) -> Secret:
        """`NAME`, or the contents of the file named by `NAME_FILE` (trailing newline cut)."""
        self.asked.update((name, f"{name}_FILE"))
        file_name = self.env.get(f"{name}_FILE", "").strip()
        if self.env.get(name, "").strip() and file_name:
            raise ConfigError(f"set {name} or {name}_FILE, not both")
        if file_name:
            return Secret(read_text(Path(file_name), f"{name}_FILE {file_name!r}").strip())
        return Secret(self.env.get(name, "").strip())

    def _parse(self, name: str, default: T, convert: Callable[[str], T], kind: str) -> T:
        self.asked.add(name)
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            # Python reads "١٠" and "1_000" as numbers too; Kafka and the README do not.
            if not raw.isascii() or "_" in raw:
                raise ValueError(raw)
            return convert(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {kind} (got {raw!r})") from None

    def integer(self, name: str, default: int, *, low: int, high: int | None = None) -> int:
        value = self._parse(name, default, int, "a whole number")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{name} must be {bound} (got {value})")
        return value

    def number(self, name: str, default: float, *, low: float, high: float | None = None) -> float:
        value = self._parse(name, default, float, "a number")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number (got {value})")
        if not value >= low:
            raise ConfigError(f"{name} must be at least {low} (got {value})")
        if high is not None and value > high:
            raise ConfigError(f"{name} must be at most {high:g} (got {value:g})")
        return value

    def optional_number(
        self, name: str, *, low: float = 0.0, above: bool = False, high: float | None = None
    ) -> float | None:
        """A finite number at least `low` (above it, with `above`) and at most `high`, or
        None when the variable is unset (or empty)."""
        self.asked.add(name)
        if not self.env.get(name, "").strip():
            return None
        value = self._parse(name, low, float, "a number")
        if above and math.isfinite(value) and not value > low:  # (-1: "above 0", not "at least")
            raise ConfigError(f"{name} must be above {low:g} (got {value:g})")
        return self.number(name, low, low=low, high=high)

    def amounts(self, name: str) -> dict[str, float]:
        """`id=USD,id=USD` → {id: USD}, each a positive number."""
        raw = self.text(name, "")
        amounts: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in raw.split(","))):
            key, _, value = item.partition("=")
            try:
                amount = float(value) if value.isascii() and "_" not in value else -1.0
            except ValueError:
                amount = -1.0
            if not key.strip() or not 0 < amount < float("inf"):
                raise ConfigError(f"{name} must look like model-id=USD,model-id=USD (got {item!r})")
            amounts[key.strip()] = amount
        return amounts

    def boolean(self, name: str, default: bool) -> bool:
        truth = {
            "1": True,
            "true": True,
            "yes": True,
            "on": True,
            "0": False,
            "false": False,
            "no": False,
            "off": False,
        }

        def convert(raw: str) -> bool:
            return truth[raw.lower()] if raw.lower() in truth else _raise_value()

        return self._parse(name, default, convert, "true or false")

    def choice(
        self,
        name: str,
        options: tuple[str, ...],
        default: str,
        *,
        upper: bool = False,
        lower: bool = False,
    ) -> str:
        value = self.text(name, default)
        value = value.upper() if upper else value.lower() if lower else value
        if value not in options:
            named = ", ".join(option for option in options if option)
            unset = " or unset" if "" in options else ""
            raise ConfigError(f"{name} must be one of {named}{unset} (got {value!r})")
        return value

    def optional_choice(self, name: str, options: tuple[str, ...]) -> str | None:
        return self.choice(name, ("", *options), "", upper=True) or None


def _raise_value() -> bool:
    raise ValueError
