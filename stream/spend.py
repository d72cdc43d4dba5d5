"""The spend limit: money per sliding window, for the whole worker and optionally per model.

    stage ─► ProviderClient.complete(spend=budget) ─► budget.admit ─► call ─► hold.settle
    engine ─► flow ─► budget.holds(topic): "spend_limit" ─► partitions paused, nothing lost

Before a call spends, `admit` holds its estimated cost; the call goes out only while what
was spent in the last `window_s`, plus what calls in flight hold, plus this estimate stays
within the limit; when it settles, the hold becomes the real cost, timed now. So no window
of `window_s` seconds ever spends more than the limit, as long as no call costs more than
its estimate: the larger of the most expensive call seen for the model so far and, when
the request sets `max_tokens`, its prompt (bytes / 3 as tokens) plus `max_tokens` (the
most it can cost; before the model's first call, without `max_tokens`, the prompt alone);
a model's first call runs alone, and a call waiting for room is estimated again each time
it wakes (a backlog queued behind the first call holds what that call cost). A call that
costs more than its estimate can overshoot by the difference.

What was spent is kept in time slots, at most `_SLOTS` per window (a worker paying 800 calls
a second would otherwise keep an entry per call: 2.9 million for a 1 h window, ~280 MB,
and sum them all again each time one left). A slot leaves the window when its latest spend
does, so a spend may count up to a slot's width (window / `_SLOTS`) longer than it must:
the gate may open that much later, never earlier.

The engine's gate (`holds`) closes when the next typical call (the most expensive seen)
would not fit, or while a call waits for room under the worker-wide limit (a request's
`max_tokens` may make its estimate dearer than the typical call): no new record starts,
the partitions pause (lag grows, the records wait in Kafka), and the commit metadata says
`held=spend_limit` so `stream lag` shows why. Calls already admitted finish. When old
spend leaves the window the gate opens again by itself.
A per-model limit is enforced at admission only: that model's records wait in flight
(their slots taken) while others go on.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio

from stream.catalog import Model
from stream.prices import is_amount

__all__ = ["HELD", "Budget", "BudgetSnapshot", "SpendLanes"]

log = logging.getLogger(__name__)

HELD = "spend_limit"
_PROMPT_BYTES_PER_TOKEN = 3  # fewer than the usual ~4: the estimate errs high
_LOG_EVERY_S = 60.0
_SLOTS = 1000  # time slots per window that spend is kept in
_SLOT_LEAST_S = 0.01  # …each at least this wide


class BudgetSnapshot(NamedTuple):
    name: str
    limit_usd: float | None
    window_s: float
    spent_usd: float  # in the current window
    held_usd: float  # by calls admitted and not settled
    limited: bool
    by_model: dict[str, float]  # spent in the window


class _Slot:
    """What was spent within one slot of time: its total, by model, and when last."""

    __slots__ = ("by_model", "index", "last", "total")

    def __init__(self, index: int) -> None:
        self.index = index
        self.last = -math.inf
        self.total = 0.0
        self.by_model: dict[str, float] = {}


@dataclass
class _Hold:
    budget: Budget
    model: str
    estimate: float
    settled: bool = field(default=False)

    def settle(self, cost_usd: float | None) -> None:
        if not self.settled:
            self.settled = True
            self.budget._settle(self, self.estimate if cost_usd is None else cost_usd)


class Budget:
    """One spend limit over a sliding window (`SpendGate` for the provider client)."""

    def __init__(
        self,
        name: str,
        *,
        limit_usd: float | None,
        window_s: float,
        model_limits: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.limit_usd = limit_usd
        self.window_s = window_s
        # A spend counts a little longer than the window: the result that carries a cost is
        # written (and timestamped) a moment after the call was paid, so anyone summing
        # results' costs over any window of their timestamps must find it under the limit.
        self._keep_s = window_s + min(1.0, 0.05 * window_s)
        self._model_limits = dict(model_limits or {})
        self._clock = clock
        self._slot_s = max(window_s / _SLOTS, _SLOT_LEAST_S)
        self._spent: deque[_Slot] = deque()  # oldest first
        self._spent_total = 0.0
        self._by_model: dict[str, float] = {}
        self._held_total = 0.0
        self._held_by_model: dict[str, float] = {}
        self._holds_by_model: dict[str, int] = {}
        self._dearest: dict[str, float] = {}  # the most a call to the model has cost
        self._changed = anyio.Event()
        self._limited = False
        self._logged_at = -math.inf  # at the edge the gate flaps once per freed call
        self._told_dear: set[str] = set()  # models said to cost more than the limit a call
        self._waiting = 0  # calls waiting for room under the worker-wide limit
        self.changes = 0  # counts what was spent: `stream.spendstate` writes on a change

    async def admit(self, model: Model, body_bytes: int, max_tokens: int | None) -> _Hold:
        # Estimated afresh on every wake: a call queued behind the model's first one must
        # hold what that call revealed, not the prompt-only guess it arrived with.
        while not self._fits(model.id, estimate := self._estimate(model, body_bytes, max_tokens)):
            # Held by the worker-wide limit (not a model's own, nor its first call): the
            # gate closes too (`holds`), so the engine stops starting records and says why.
            held = not _within(self.limit_usd, self._spent_total, self._held_total, estimate)
            self._waiting += held
            wait = self._next_expiry_in()
            try:
                with anyio.move_on_after(math.inf if wait is None else wait):
                    await self._changed.wait()
            finally:
                self._waiting -= held
        if self.limit_usd is not None and estimate > self.limit_usd:
            self._warn_dear(model.id, estimate)
        self._held_total += estimate
        self._held_by_model[model.id] = self._held_by_model.get(model.id, 0.0) + estimate
        self._holds_by_model[model.id] = self._holds_by_model.get(model.id, 0) + 1
        return _Hold(self, model.id, estimate)

    def holds(self, topic: str) -> str | None:
        """The engine's gate: `spend_limit` while the next typical call would not fit, or
        a call waits for room."""
        if self.limit_usd is None:
            return None
        self._prune()
        # The next typical call, the dearest seen, asked as admission asks it: one dearer
        # than the whole limit goes alone on an empty window (taken whole, it closed the
        # gate for good, empty window or not).
        # Calls already waiting for room hold it too: their estimates (`max_tokens` bounds
        # them) may not fit where the typical call would.
        typical = max(self._dearest.values(), default=0.0)
        limited = (
            self._waiting > 0
            or not _within(self.limit_usd, self._spent_total, self._held_total, typical)
            or self._spent_total >= self.limit_usd
        )
        if limited != self._limited:
            self._limited = limited
            self._log_change()
        return HELD if limited else None

    def snapshot(self) -> BudgetSnapshot:
        self._prune()
        return BudgetSnapshot(
            name=self.name,
            limit_usd=self.limit_usd,
            window_s=self.window_s,
            spent_usd=self._spent_total,
            held_usd=self._held_total,
            limited=self._limited,
            by_model=dict(self._by_model),
        )

    def __repr__(self) -> str:
        s = self.snapshot()
        return (
            f"Budget({s.name}: ${s.spent_usd:.4f} spent + ${s.held_usd:.4f} held of "
            f"{s.limit_usd} per {s.window_s:g} s, limited={s.limited})"
        )

    # -- accounting ---------------------------------------------------------------------------

    def _estimate(self, model: Model, body_bytes: int, max_tokens: int | None) -> float:
        price = model.price
        if price is None:
            return 0.0
        prompt = body_bytes / _PROMPT_BYTES_PER_TOKEN * price.input
        answer = (max_tokens or 0) * price.output
        return max(self._dearest.get(model.id, 0.0), (prompt + answer) / 1_000_000)

    def _fits(self, model: str, estimate: float) -> bool:
        self._prune()
        if model not in self._dearest and self._holds_by_model.get(model, 0) > 0:
            return False  # the model's first call runs alone: its cost is not known yet
        return _within(self.limit_usd, self._spent_total, self._held_total, estimate) and _within(
            self._model_limits.get(model),
            self._by_model.get(model, 0.0),
            self._held_by_model.get(model, 0.0),
            estimate,
        )

    def _settle(self, hold: _Hold, cost: float) -> None:
        model = hold.model
        self._held_total = max(0.0, self._held_total - hold.estimate)
        self._held_by_model[model] = max(0.0, self._held_by_model.get(model, 0.0) - hold.estimate)
        self._holds_by_model[model] -= 1
        # Sums of floats leave a remainder (1e-18) after their last hold goes: with the
        # gate at the limit's edge it kept the gate shut, nothing held and nothing spent.
        if not self._holds_by_model[model]:
            self._held_by_model[model] = 0.0
            if not any(self._holds_by_model.values()):
                self._held_total = 0.0
        if cost > 0:
            self.changes += 1
            self._count(self._clock(), model, cost)
            self._dearest[model] = max(self._dearest.get(model, 0.0), cost)
        else:
            self._dearest.setdefault(model, 0.0)
        self._wake()

    def export(self) -> list[list[Any]]:
        """The window as `restore` takes it: each slot's age (seconds since its latest
        spend) and amounts by model, oldest first. (Not the dearest call per model: one
        outlier would set every estimate for good; a restart starts them afresh.)"""
        self._prune()
        now = self._clock()
        return [[now - slot.last, slot.by_model] for slot in self._spent]

    def restore(self, slots: Iterable[tuple[float, Mapping[str, float]]]) -> float:
        """Count what an earlier process spent (`export`'s slots, aged to now) as spent
        here, before any call of this one; returns how much of it is still in the window.
        ValueError for amounts that are not money."""
        now = self._clock()
        spends = [  # all read before any is counted: a bad amount counts none
            (now - max(0.0, age), str(model), _money(usd))
            for age, by_model in sorted(slots, key=lambda slot: -slot[0])  # oldest first
            for model, usd in by_model.items()
        ]
        kept = [(when, model, usd) for when, model, usd in spends if when > now - self._keep_s]
        for when, model, usd in kept:  # (the rest left the window while no worker ran)
            self._count(when, model, usd)
        return sum(usd for _, _, usd in kept)

    def _count(self, when: float, model: str, usd: float) -> None:
        """`usd` spent on `model` at `when` (no earlier than any spend counted before)."""
        index = int(when // self._slot_s)
        if not self._spent or index > self._spent[-1].index:
            self._spent.append(_Slot(index))
        slot = self._spent[-1]
        slot.last = max(slot.last, when)
        slot.total += usd
        slot.by_model[model] = slot.by_model.get(model, 0.0) + usd
        self._spent_total += usd
        self._by_model[model] = self._by_model.get(model, 0.0) + usd

    def _prune(self) -> None:
        horizon = self._clock() - self._keep_s
        expired = False
        while self._spent and self._spent[0].last <= horizon:
            self._spent.popleft()
            expired = True
        if expired:
            # Summed afresh rather than subtracted (no float drift over days of windows):
            # at most once per slot, over at most `_SLOTS` of them.
            by_model: dict[str, float] = {}
            for slot in self._spent:
                for model, cost in slot.by_model.items():
                    by_model[model] = by_model.get(model, 0.0) + cost
            self._spent_total = sum(slot.total for slot in self._spent)
            self._by_model = by_model
            self._wake()

    def _next_expiry_in(self) -> float | None:
        if not self._spent:
            return None
        return max(0.0, self._spent[0].last + self._keep_s - self._clock()) + 0.001

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _warn_dear(self, model: str, estimate: float) -> None:
        """A call that may cost more than the whole limit goes alone, on an empty window:
        say so, once per model (each such call overshoots the limit)."""
        if model in self._told_dear:
            return
        self._told_dear.add(model)
        log.warning(
            "spend limit (%s): a call to %s may cost $%.6g, more than the whole limit of "
            "$%.6g per %g s; such calls go one at a time, each on an empty window (each "
            "overshoots): raise STREAM_SPEND_LIMIT_USD or lower max_tokens",
            self.name,
            model,
            estimate,
            self.limit_usd,
            self.window_s,
        )

    def _log_change(self) -> None:
        now = self._clock()
        if now - self._logged_at < _LOG_EVERY_S:
            log.debug("spend limit (%s): limited=%s", self.name, self._limited)
            return
        self._logged_at = now
        if self._limited:
            log.warning(
                "spend limit reached (%s): $%.6g spent and $%.6g held of $%.6g per %g s; "
                "partitions paused until older spend leaves the window",
                self.name,
                self._spent_total,
                self._held_total,
                self.limit_usd,
                self.window_s,
            )
        else:
            log.warning("spend limit (%s): room again, partitions resume", self.name)


def _money(value: object) -> float:
    if not is_amount(value):
        raise ValueError(f"{value!r} is no amount of money")
    return float(value)


def _within(limit: float | None, spent: float, held: float, estimate: float) -> bool:
    if limit is None:
        return True
    # An estimate above the whole limit can never fit: it goes alone, on an empty window.
    return spent + held + min(estimate, limit) <= limit + 1e-12


class SpendLanes:
    """Which budget a record spends from: replays and re-drives have their own, if set."""

    def __init__(self, live: Budget, backfill: Budget | None, backfill_topics: frozenset[str]):
        self.live = live
        self.backfill = backfill or live
        self._backfill_topics = backfill_topics

    def budgets(self) -> tuple[Budget, ...]:
        return (self.live,) if self.backfill is self.live else (self.live, self.backfill)

    def for_record(self, topic: str, replayed: bool) -> Budget:
        if topic in self._backfill_topics or replayed:
            return self.backfill
        return self.live

    def holds(self, topic: str) -> str | None:
        """The engine's gate: by the topic's budget (re-drives into the live topic are held
        at admission only: the engine cannot tell them apart before they start)."""
        budget = self.backfill if topic in self._backfill_topics else self.live
        return budget.holds(topic)
