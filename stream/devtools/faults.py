"""The simulator's fault grammar: `--latency` and `--faults` specs, parsed into plans.

    --faults 'hf:*R1*=rate:0.2:429;*=rate:0.01:500;outage=10-70:hf:*'

A `FaultPlan` answers, for one request to a model, which fault (if any) it gets, given a
uniform draw and the time since the simulator started; the server (`simulator.py`) turns
that kind into a response.
"""

from __future__ import annotations

import fnmatch
import math
import random
import re
from dataclasses import dataclass

from stream.errors import ConfigError

__all__ = [
    "FAULT_HELP",
    "FaultPlan",
    "FaultRule",
    "Latency",
    "Outage",
    "known_kind",
    "parse_faults",
    "parse_latency",
]

FAULT_HELP = """\
faults (--faults SPEC): rules separated by ';', each one of
  PATTERN=rate:P:KIND[,rate:P:KIND...]   requests for models matching PATTERN (shell-style,
                                         e.g. 'hf:*', '*R1*', '*') get KIND with probability P
  outage=START-END[/KIND]:PATTERN        from START to END seconds after start, every request
                                         for a matching model gets KIND (default 503)
KIND:
  429[/S]      rate limited, Retry-After S seconds (default 1; also retry-after-ms)
  quota        429 with error code insufficient_quota
  402          Together's quota: the account's monthly spending limit is reached
  context_length  Together's 403: input tokens + max_tokens over the model's context
  NNN          any HTTP status (500, 503, 529, 400, 401 ...) with an OpenAI error body
  hang[/S]     answer only after S seconds (default 600): past any client timeout
  reset        close the connection with a TCP reset, no answer
  resetbody    200 headers and half a body, then a TCP reset (a crash mid-answer)
  malformed    200 with a truncated JSON body
  empty        200 with empty content
  notjson      200 with prose even when JSON output was asked for
  huge         200 with a 1.5 MiB answer (a long thinking model's output)
  length       200 cut in half, finish_reason length (also: any answer over max_tokens)
  tool_calls   200 with content null, one tool call, finish_reason tool_calls
  content_filter  200 with content null, finish_reason content_filter
When several rules match a model, their probabilities stack in the order given.
example: 'hf:deepseek-ai/DeepSeek-R1-0528=rate:0.2:429;*=rate:0.01:500;outage=10-70:hf:*'

per request (deterministic, for tests): header 'x-sim-fault: KIND[xN]' or the marker
'[[sim:KIND[xN]]]' in the last user message forces KIND; with xN only the first N requests
carrying that exact marker and messages fail, later ones succeed (retries then success).
Header 'x-sim-latency: SECONDS' overrides the latency of one request.
Errors answer at once; answers (and bad 200s) after the latency."""

_KIND = re.compile(
    r"^(?:(\d{3})|429/[\d.]+|quota|hang(?:/[\d.]+)?|reset|resetbody|malformed|empty|notjson|huge"
    r"|length|tool_calls|content_filter|context_length)$"
)


def known_kind(kind: str) -> bool:
    """Whether `kind` is a fault the simulator can inject (`429`, `hang/5`, `reset` …)."""
    return kind == "429" or _KIND.match(kind) is not None


@dataclass(frozen=True)
class Latency:
    """`fixed` a, `uniform` a..b, `exp` with mean a, `normal` mean a sd b (clamped at 0)."""

    kind: str = "fixed"
    a: float = 0.0
    b: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        if self.kind == "normal":
            return max(0.0, rng.gauss(self.a, self.b))
        return self.a


def parse_latency(text: str) -> Latency:
    """`0.5`, `uniform:0.1:0.9`, `exp:0.5`, `normal:0.5:0.1` → `Latency`."""
    parts = text.strip().split(":")
    arity = {"uniform": 2, "exp": 1, "normal": 2}
    try:
        if len(parts) == 1:
            latency = Latency("fixed", float(parts[0]))
        elif parts[0] in arity and len(parts) == arity[parts[0]] + 1:
            numbers = [float(p) for p in parts[1:]] + [0.0]
            latency = Latency(parts[0], numbers[0], numbers[1])
        else:
            raise ValueError(text)
    except ValueError:
        raise ConfigError(
            f"latency {text!r} must be SECONDS, uniform:LOW:HIGH, exp:MEAN or normal:MEAN:SD"
        ) from None
    if min(latency.a, latency.b) < 0 or not math.isfinite(latency.a + latency.b):
        raise ConfigError(f"latency {text!r} must not be negative")
    if latency.kind == "uniform" and latency.a > latency.b:
        raise ConfigError(
            f"latency {text!r}: LOW is above HIGH; write uniform:{parts[2]}:{parts[1]}"
        )
    return latency


@dataclass(frozen=True)
class FaultRule:
    pattern: str
    rate: float
    kind: str


@dataclass(frozen=True)
class Outage:
    start: float
    end: float
    pattern: str
    kind: str = "503"


@dataclass(frozen=True)
class FaultPlan:
    rules: tuple[FaultRule, ...] = ()
    outages: tuple[Outage, ...] = ()

    def pick(self, model: str, draw: float, elapsed: float) -> str | None:
        """The fault for a request to `model`, given a uniform `draw` in [0, 1)."""
        for outage in self.outages:
            if outage.start <= elapsed < outage.end and fnmatch.fnmatchcase(model, outage.pattern):
                return outage.kind
        edge = 0.0
        for rule in self.rules:
            if fnmatch.fnmatchcase(model, rule.pattern):
                edge += rule.rate
                if draw < edge:
                    return rule.kind
        return None


def parse_faults(spec: str) -> FaultPlan:
    """Read the `--faults` grammar (see `FAULT_HELP`); a bad spec is a `ConfigError`."""
    rules: list[FaultRule] = []
    outages: list[Outage] = []
    for raw in filter(None, (part.strip() for part in spec.split(";"))):
        head, sep, body = raw.partition("=")
        if not sep or not body:
            raise ConfigError(f"fault rule {raw!r} must look like PATTERN=rate:P:KIND")
        if head == "outage":
            outages.append(_outage(raw, body))
        else:
            rules.extend(_rule(raw, head, item) for item in body.split(","))
    return FaultPlan(tuple(rules), tuple(outages))


def _rule(raw: str, pattern: str, item: str) -> FaultRule:
    parts = item.split(":")
    if len(parts) != 3 or parts[0] != "rate":
        raise ConfigError(f"fault rule {raw!r}: {item!r} must be rate:P:KIND")
    try:
        rate = float(parts[1])
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"fault rule {raw!r}: the rate must be between 0 and 1")
    return FaultRule(pattern, rate, _kind(raw, parts[2]))


def _outage(raw: str, body: str) -> Outage:
    window, sep, pattern = body.partition(":")
    span, _, kind = window.partition("/")
    start, dash, end = span.partition("-")
    try:
        begin, finish = float(start), float(end)
    except ValueError:
        begin = finish = -1.0
    if not sep or not pattern or not dash or not 0 <= begin < finish:
        raise ConfigError(f"fault rule {raw!r} must look like outage=START-END[/KIND]:PATTERN")
    return Outage(begin, finish, pattern, _kind(raw, kind or "503"))


def _kind(raw: str, kind: str) -> str:
    if known_kind(kind):
        return kind
    raise ConfigError(f"fault rule {raw!r}: unknown fault {kind!r} (see stream simulate --help)")
