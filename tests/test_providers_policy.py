"""The pure pieces of the provider client: classifier, backoff, Retry-After, breaker, limiter."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import anyio
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.prices import Price, token_counts
from stream.providers.breaker import BreakerConfig, CircuitBreaker
from stream.providers.completion import BadOutput, parse_completion, split_reasoning
from stream.providers.limiter import AdaptiveLimiter
from stream.providers.ratelimits import MAX_RESET_S, RateLimits, read_ratelimits
from stream.providers.retry import (
    FATAL_STATUSES,
    RETRYABLE_STATUSES,
    Backoff,
    classify,
    retry_after,
)

RETRYABLE = [408, 409, 425, 429, 500, 502, 503, 504, 524, 529]
FATAL = [400, 401, 402, 403, 404, 413, 422]


@pytest.mark.parametrize("status", RETRYABLE)
def test_retryable_statuses(status: int) -> None:
    assert classify(status).retryable


@pytest.mark.parametrize("status", FATAL)
def test_fatal_statuses(status: int) -> None:
    assert not classify(status).retryable


def test_insufficient_quota_is_fatal_even_as_429() -> None:
    verdict = classify(429, {}, "insufficient_quota")
    assert not verdict.retryable and verdict.error_type == "insufficient_quota"
    assert classify(429, {}, "rate_limit_exceeded").retryable


@given(status=st.integers(100, 599), code=st.none() | st.text(max_size=20))
def test_classifier_is_total_and_follows_the_tables(status: int, code: str | None) -> None:
    verdict = classify(status, {}, code)
    assert verdict.error_type
    if status in FATAL_STATUSES:
        assert not verdict.retryable
    elif status == 429 and code == "insufficient_quota":
        assert not verdict.retryable
    elif status in RETRYABLE_STATUSES or status >= 500:
        assert verdict.retryable
    else:
        assert not verdict.retryable
    # Only server-side trouble may count against the provider's health.
    assert not (verdict.provider_fault and 400 <= status < 500 and status != 408)


@given(
    status=st.integers(100, 599),
    flag=st.sampled_from(["true", "false", "TRUE", " false "]),
)
def test_x_should_retry_overrides_the_table(status: int, flag: str) -> None:
    verdict = classify(status, {"x-should-retry": flag}, None)
    assert verdict.retryable is (flag.strip().lower() == "true")


@given(attempt=st.integers(1, 10_000), seed=st.integers(0, 2**32))
def test_backoff_is_full_jitter_under_an_exponential_ceiling(attempt: int, seed: int) -> None:
    backoff = Backoff(base_s=0.25, cap_s=8.0)
    delay = backoff.delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(8.0, 0.25 * 2 ** min(attempt - 1, 60))
    assert backoff.ceiling(attempt) <= backoff.ceiling(attempt + 1)


def test_backoff_ceiling_doubles_until_the_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=8.0)
    assert [backoff.ceiling(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


@given(seconds=st.floats(0, 10_000, allow_nan=False))
def test_retry_after_seconds_and_ms_are_read_as_they_are(seconds: float) -> None:
    # Not capped: a wait past the request's deadline fails over instead of being shortened.
    assert retry_after({"retry-after": repr(seconds)}, 0.0) == pytest.approx(seconds)
    ms = {"retry-after-ms": repr(seconds * 1000), "retry-after": "999"}
    assert retry_after(ms, 0.0) == pytest.approx(seconds)


def test_402_is_quota_and_a_context_length_refusal_says_so() -> None:
    quota = classify(402, {}, "payment_required")
    assert quota == (False, "insufficient_quota", False)
    together = "Input token count + max_tokens must be less than the context length of the model"
    assert classify(403, {}, "invalid_request_error", together).error_type == (
        "context_length_exceeded"
    )
    assert classify(400, {}, "context_length_exceeded").error_type == "context_length_exceeded"
    assert classify(403, {}, None, "forbidden").error_type == "forbidden"
    assert not classify(403, {}, None, together).retryable


def test_retry_after_http_date() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(datetime(2025, 1, 1, 12, 0, 7, tzinfo=UTC), usegmt=True)
    assert retry_after({"retry-after": later}, now.timestamp()) == pytest.approx(7.0)
    earlier = format_datetime(datetime(2025, 1, 1, 11, 0, 0, tzinfo=UTC), usegmt=True)
    assert retry_after({"retry-after": earlier}, now.timestamp()) == 0.0


@pytest.mark.parametrize("raw", ["", "soon", "-1", "nan", "inf"])
def test_retry_after_ignores_junk(raw: str) -> None:
    assert retry_after({"retry-after": raw}, 0.0) is None


def test_ratelimit_headers_are_read_as_openai_and_together_send_them() -> None:
    openai_style = {
        "x-ratelimit-limit-requests": "5000",
        "x-ratelimit-remaining-requests": "4999",
        "x-ratelimit-reset-requests": "12ms",
        "x-ratelimit-limit-tokens": "160000",
        "x-ratelimit-remaining-tokens": "159976",
        "x-ratelimit-reset-tokens": "1m0.5s",
    }
    assert read_ratelimits(openai_style) == RateLimits(
        5000, 4999, pytest.approx(0.012), 160000, 159976, pytest.approx(60.5)
    )
    together_style = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "2"}
    assert read_ratelimits(together_style) == RateLimits(remaining_requests=0, reset_requests_s=2)
    assert read_ratelimits({"x-ratelimit-reset": "6h"}).reset_requests_s == MAX_RESET_S
    junk = {"x-ratelimit-remaining": "-3", "x-ratelimit-reset": "x1"}
    assert not read_ratelimits(junk).announced


# --- breaker ------------------------------------------------------------------------------


def _breaker() -> CircuitBreaker:
    return CircuitBreaker(
        BreakerConfig(window_s=10, min_calls=4, failure_rate=0.5, cooldown_s=5, probes=1)
    )


def _call(breaker: CircuitBreaker, outcome: str, at: float) -> str:
    """One call let through at `at` that finishes at once with `outcome`."""
    ticket = breaker.allow(at)
    assert ticket is not None
    return breaker.record(outcome, at, ticket)  # type: ignore[arg-type]


def test_breaker_opens_probes_and_closes() -> None:
    breaker = _breaker()
    for t in range(3):
        assert _call(breaker, "failure", t) == "closed"
    assert _call(breaker, "failure", 3) == "open"  # 4 calls, 100% failing
    assert breaker.allow(4) is None
    assert breaker.state(8.0) == "half_open"
    probe = breaker.allow(8.0)
    assert probe is not None and probe.probe and breaker.allow(8.0) is None  # one at a time
    assert breaker.record("failure", 8.5, probe) == "open"
    assert _call(breaker, "success", 13.5) == "closed"
    assert breaker.snapshot(14).calls == 0


def test_breaker_needs_min_calls_and_ignores_neutral_outcomes() -> None:
    breaker = _breaker()
    for t in range(3):
        _call(breaker, "failure", t)
    for t in range(10):
        _call(breaker, "neutral", 3 + t * 0.01)
    assert breaker.state(4) == "closed"


def test_breaker_forgets_failures_outside_its_window() -> None:
    breaker = _breaker()
    for t in range(3):
        _call(breaker, "failure", t)
    assert _call(breaker, "failure", 20) == "closed"  # the first three aged out


def test_a_neutral_probe_frees_the_probe_slot() -> None:
    breaker = _breaker()
    for t in range(4):
        _call(breaker, "failure", t)
    probe = breaker.allow(10)
    assert probe is not None and breaker.allow(10) is None
    assert breaker.record("neutral", 10, probe) == "half_open"
    assert breaker.allow(10) is not None


def test_a_call_sent_before_the_breaker_opened_is_not_the_probes_verdict() -> None:
    breaker = _breaker()
    slow = breaker.allow(0)  # a long call, sent while all was well
    assert slow is not None
    for t in range(4):
        _call(breaker, "failure", 1 + t)
    probe = breaker.allow(10)  # half-open: the probe is out
    assert probe is not None and probe.probe
    # The slow call answers now: neither its success nor its failure decides.
    assert breaker.record("success", 10.5, slow) == "half_open"
    assert breaker.record("failure", 10.6, slow) == "half_open"
    assert breaker.allow(10.7) is None  # the probe slot is still the probe's
    assert breaker.record("success", 11, probe) == "closed"
    # ... nor does a stale failure count in the fresh window after the close.
    stale = [breaker.record("failure", 11 + t, slow) for t in range(10)]
    assert stale == ["closed"] * 10 and breaker.snapshot(20).calls == 0


@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["success", "failure", "neutral"]),
            st.floats(0, 5),
            st.booleans(),  # let through now, or hold it and finish it later
        ),
        max_size=60,
    )
)
def test_breaker_invariants(events: list[tuple[str, float, bool]]) -> None:
    breaker = _breaker()
    now = 0.0
    held = []
    for outcome, step, finish_now in events:
        now += step
        state_before = breaker.state(now)
        ticket = breaker.allow(now)
        if state_before == "closed":
            assert ticket is not None and not ticket.probe
        elif state_before == "open":
            assert ticket is None
        # half-open: a probe, unless one is out (held below)
        if ticket is not None and finish_now:
            after = breaker.record(outcome, now, ticket)  # type: ignore[arg-type]
            if state_before == "half_open" and outcome == "success":
                assert after == "closed"
            if state_before == "half_open" and outcome == "failure":
                assert after == "open"
        elif ticket is not None:
            held.append((outcome, ticket))
        elif state_before == "open":
            # A held call finishes now. It was let through before the breaker opened, so it
            # reports on the past and leaves the breaker open.
            if held:
                late_outcome, late_ticket = held.pop(0)
                assert breaker.record(late_outcome, now, late_ticket) == "open"  # type: ignore[arg-type]
        snap = breaker.snapshot(now)
        assert 0 <= snap.failures <= snap.calls
        assert snap.probes_in_flight <= 1


# --- limiter ------------------------------------------------------------------------------


@given(
    steps=st.lists(st.sampled_from(["ok", "throttle", "plain"]), max_size=200),
    ceiling=st.integers(1, 64),
)
def test_limiter_limit_stays_in_bounds(steps: list[str], ceiling: int) -> None:
    clock = iter(range(1_000_000))
    limiter = AdaptiveLimiter(ceiling, clock=lambda: float(next(clock)))
    for step in steps:
        permit = limiter.try_acquire()
        assert permit is not None
        limiter.release(permit, throttled=step == "throttle", success=step == "ok")
        assert 1.0 <= limiter.limit <= ceiling
    assert limiter.snapshot().in_flight == 0


def test_limiter_cuts_once_per_round_of_calls() -> None:
    ticks = iter(range(1_000))
    limiter = AdaptiveLimiter(100, initial=100, clock=lambda: float(next(ticks)))
    burst = [limiter.try_acquire() for _ in range(50)]
    for permit in burst:
        assert permit is not None
        limiter.release(permit, throttled=True)
    assert limiter.limit == 50.0  # fifty 429s from one round: one halving
    later = limiter.try_acquire()
    assert later is not None
    limiter.release(later, throttled=True)
    assert limiter.limit == 25.0
    ok = limiter.try_acquire()
    assert ok is not None
    limiter.release(ok, success=True)
    assert limiter.limit == 26.0


def test_limiter_starts_small_and_doubles_per_round_until_throttled() -> None:
    limiter = AdaptiveLimiter(1000, initial=4)
    rounds = []
    for _ in range(9):
        permits = [limiter.try_acquire() for _ in range(int(limiter.limit))]
        assert limiter.try_acquire() is None  # the limit holds
        for permit in permits:
            assert permit is not None
            limiter.release(permit, success=True)
        rounds.append(limiter.limit)
    assert rounds == [8, 16, 32, 64, 128, 256, 512, 1000, 1000]


def test_announced_room_opens_the_limit_at_once_until_the_first_throttle() -> None:
    now = [0.0]
    limiter = AdaptiveLimiter(1000, initial=4, clock=lambda: now[0])
    limiter.heed(RateLimits(remaining_requests=600, reset_requests_s=60))
    assert limiter.limit == 600
    permit = limiter.try_acquire()
    assert permit is not None
    now[0] += 1
    limiter.release(permit, throttled=True)
    assert limiter.limit == 300
    limiter.heed(RateLimits(remaining_requests=900, reset_requests_s=60))
    assert limiter.limit == 300  # throttled once: the provider's 429s speak louder


def test_an_announced_allowance_is_never_overrun_before_its_reset() -> None:
    now = [0.0]
    limiter = AdaptiveLimiter(100, initial=100, clock=lambda: now[0])
    limiter.heed(RateLimits(remaining_requests=3, reset_requests_s=10))
    assert [limiter.try_acquire() is not None for _ in range(5)] == [True] * 3 + [False] * 2
    assert limiter.paused_until == 10.0
    now[0] = 10.0
    assert limiter.try_acquire() is not None  # a new window


def test_spent_tokens_pause_new_calls_until_their_reset() -> None:
    now = [5.0]
    limiter = AdaptiveLimiter(100, clock=lambda: now[0])
    limiter.heed(RateLimits(remaining_tokens=0, reset_tokens_s=2.5))
    assert limiter.try_acquire() is None and limiter.paused_until == 7.5
    now[0] = 7.5
    assert limiter.try_acquire() is not None


@pytest.mark.anyio
async def test_limiter_serves_a_thousand_callers_without_losing_a_slot() -> None:
    limiter = AdaptiveLimiter(10)
    peak = 0
    done = 0

    async def caller(index: int) -> None:
        nonlocal peak, done
        permit = await limiter.acquire()
        peak = max(peak, limiter.snapshot().in_flight)
        await anyio.lowlevel.checkpoint()
        limiter.release(permit, throttled=index % 7 == 0, success=index % 7 != 0)
        done += 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for index in range(1000):
                tg.start_soon(caller, index)
    assert done == 1000 and 1 <= peak <= 10
    assert limiter.snapshot().in_flight == 0 and limiter.snapshot().waiting == 0


@pytest.mark.anyio
async def test_a_cancelled_waiter_does_not_leak_its_slot() -> None:
    limiter = AdaptiveLimiter(1)
    held = limiter.try_acquire()
    assert held is not None
    queued = anyio.Event()

    async def waiter(scope: anyio.CancelScope) -> None:
        with scope:
            queued.set()
            await limiter.acquire()

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, scope)
        await queued.wait()
        await anyio.wait_all_tasks_blocked()
        scope.cancel()
    limiter.release(held)
    assert limiter.try_acquire() is not None


# --- reasoning ----------------------------------------------------------------------------


def test_think_blocks_move_to_reasoning() -> None:
    assert split_reasoning("<think>\nhmm\n</think>\n\nYes.") == ("Yes.", "hmm")
    assert split_reasoning("plan</think>Done") == ("Done", "plan")
    assert split_reasoning("<think>a</think>x<think>b</think>y") == ("xy", "a\n\nb")
    assert split_reasoning("Just an answer") == ("Just an answer", None)


@given(answer=st.text().filter(lambda t: "think>" not in t), thought=st.text())
def test_split_reasoning_never_leaves_a_tag(answer: str, thought: str) -> None:
    thought = thought.replace("think>", "")
    content, reasoning = split_reasoning(f"<think>{thought}</think>{answer}")
    assert "<think>" not in content and "</think>" not in content
    assert content == answer.strip()
    assert reasoning == (thought.strip() or None)


# --- reading an answer --------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@given(
    finish=_JSON,
    usage=_JSON,
    ident=_JSON,
    content=_JSON,
    tool_calls=_JSON,
)
def test_any_answer_is_read_or_refused_never_crashes(
    finish: object, usage: object, ident: object, content: object, tool_calls: object
) -> None:
    body = {
        "id": ident,
        "model": "m",
        "choices": [
            {
                "finish_reason": finish,
                "message": {"content": content, "tool_calls": tool_calls},
            }
        ],
        "usage": usage,
    }
    try:
        parsed = parse_completion(orjson.dumps(body), json_output=False)
    except BadOutput as exc:
        assert exc.error_type in {"malformed_response", "empty_content", "content_filter"}
        return
    assert parsed.content or parsed.tool_calls or parsed.finish_reason == "length"
    assert parsed.response_id is None or len(parsed.response_id) <= 200
    assert parsed.finish_reason is None or len(parsed.finish_reason) <= 64
    for value in (parsed.usage or {}).values():  # counts only, never negative
        counts = value.values() if isinstance(value, dict) else [value]
        assert all(v is None or (type(v) is int and v >= 0) for v in counts)
    assert token_counts(parsed.usage) is None or token_counts(parsed.usage).cached >= 0  # type: ignore[union-attr]


def test_price_cost_counts_cached_input_and_reasoning_once() -> None:
    price = Price(input=2.0, output=10.0, cached_input=0.5)
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 400},
        "completion_tokens_details": {"reasoning_tokens": 200},
    }
    assert price.cost(usage) == pytest.approx((600 * 2 + 400 * 0.5 + 300 * 10) / 1e6)
    # A detail count above its parent is a provider's bug: bounded, never negative.
    usage["prompt_tokens_details"] = {"cached_tokens": 5000}
    assert price.cost(usage) == pytest.approx((1000 * 0.5 + 300 * 10) / 1e6)
    assert price.cost(None) is None and price.cost({"total_tokens": 3}) is None


@pytest.mark.anyio
async def test_a_queued_call_waits_out_a_pause_announced_by_the_call_that_freed_its_slot() -> None:
    # As the client does: the finished call releases its slot, then the limiter hears its
    # 429's Retry-After. The caller queued behind it must not go out into that pause.
    limiter = AdaptiveLimiter(1, initial=1)
    first = await limiter.acquire()
    started: list[float] = []

    async def queued() -> None:
        await limiter.acquire()
        started.append(anyio.current_time())

    async with anyio.create_task_group() as group:
        group.start_soon(queued)
        await anyio.wait_all_tasks_blocked()
        limiter.release(first, throttled=True)
        limiter.pause(0.3)
        paused_until = anyio.current_time() + 0.3
    assert started and started[0] >= paused_until - 0.01


@pytest.mark.anyio
async def test_queued_calls_spend_the_announced_allowance_too() -> None:
    limiter = AdaptiveLimiter(3, initial=3)
    holders = [await limiter.acquire() for _ in range(3)]
    started: list[float] = []

    async def queued() -> None:
        await limiter.acquire()
        started.append(anyio.current_time())

    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(queued)
        await anyio.wait_all_tasks_blocked()
        # One start left in a window that resets in 0.3 s; three slots come free.
        limiter.heed(RateLimits(remaining_requests=1, reset_requests_s=0.3))
        reset = anyio.current_time() + 0.3
        for permit in holders:
            limiter.release(permit)
    started.sort()
    assert len(started) == 3
    assert started[0] < reset - 0.1  # the one the window allows goes at once
    assert started[1] >= reset - 0.01 and started[2] >= reset - 0.01


@pytest.mark.anyio
async def test_a_caller_waiting_out_a_pause_is_refused_when_it_grows_past_its_deadline() -> None:
    limiter = AdaptiveLimiter(4)
    limiter.pause(5)
    end = limiter.paused_until + 5  # the first pause fits: it waits
    got: list[object] = []

    async def caller() -> None:
        got.append(await limiter.acquire(end))

    with anyio.fail_after(3):  # the first pause alone would keep it 5 s
        async with anyio.create_task_group() as group:
            group.start_soon(caller)
            await anyio.wait_all_tasks_blocked()
            limiter.pause(60)
    assert got == [None]
    assert limiter.snapshot().in_flight == 0
