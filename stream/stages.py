"""The two stages of the pipeline, each a handler `record → outputs` for the engine.

primary:  request → Synthetic → result, or → the fallback topic with the failure attached
fallback: fallback record → MODEL_FALLBACKS → Together → result, or → a dead letter

Every input ends in exactly one output record, chosen here; the engine decides when it
counts as done. Bad input is a dead letter with its original bytes, never an exception.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

from stream import records
from stream.catalog import Catalog, Model, get_fallback_provider
from stream.config import Settings
from stream.engine import MAX_OUTPUT_BYTES, Output
from stream.errors import (
    InvalidRecordError,
    OutputRejectedError,
    ProviderError,
    UndecodableRecordError,
)
from stream.outlimits import KEY_KEPT_BYTES, OutputLimits, inputs_fit, record_size
from stream.prices import is_amount
from stream.providers import Completion, ProviderClient
from stream.records import Decoder, Held, Request, SourceRecord
from stream.spend import Budget, SpendLanes

__all__ = ["FallbackStage", "PrimaryStage", "StageObserver", "Topics"]

log = logging.getLogger(__name__)

# Provider failures that are the request's, not the provider's: the same request fails the
# same way anywhere (and is paid for again), so it is a dead letter with that reason at once.
FINAL_ERRORS = frozenset({"content_filter", "context_length_exceeded"})
# Headers `stream replay` and `stream redrive` add (stream.backfill): such a request was
# run before, so its calls are counted as repeats and spend from the backfill budget.
_REPEAT_HEADERS = {records.HEADER_REPLAYED_FROM: "replay", records.HEADER_REDRIVEN_FROM: "redrive"}


class StageObserver(Protocol):
    """Where outcomes are counted (the metrics module implements it)."""

    def record_outcome(self, stage: str, outcome: str, reason: str | None = None) -> None: ...

    def record_fallback(self, from_model: str, to_model: str) -> None: ...

    def record_repeat(self, stage: str, cause: str) -> None: ...


@dataclass(frozen=True)
class Topics:
    """The real names of the pipeline's topics (the prefix applied)."""

    requests: str
    backfill: str
    fallback: str
    results: str
    dead_letter: str

    @classmethod
    def of(cls, settings: Settings) -> Topics:
        return cls(
            requests=settings.topic("predictions.requests"),
            backfill=settings.topic("predictions.backfill"),
            fallback=settings.topic("predictions.fallback"),
            results=settings.topic("predictions.results"),
            dead_letter=settings.topic("predictions.dead-letter"),
        )


class _Stage:
    name = "stage"

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        observer: StageObserver | None,
        cluster_limits: Mapping[str, int] | None,
        spend: SpendLanes | None = None,
    ):
        self.topics = Topics.of(settings)
        self._spend = spend
        self._catalog = catalog
        self._observer = observer
        # The largest result the results topic takes: a result over it would be refused on
        # every try after it was paid for. And the largest dead letter: one carrying a large
        # input whole (base64 is a third larger; a compressed batch lets values in far over
        # the topic's own limit) would stop the worker for good.
        limits = OutputLimits(settings, cluster_limits)
        self._max_result = limits.largest(self.topics.results)
        self._max_dead = limits.largest(self.topics.dead_letter)

    def on_error(self, record: SourceRecord, exc: BaseException) -> Sequence[Output]:
        """A bug in a handler, or outputs Kafka refused for good: the record becomes a dead
        letter (with its request when that parses, so it can be re-driven) and the worker
        goes on. (The engine has logged it, traceback and all.)"""
        if isinstance(exc, UndecodableRecordError):
            # Nothing of it reached the stage: the dead letter says where it is.
            return [self._dead(record, "invalid_encoding", str(exc))]
        reason = "output_rejected" if isinstance(exc, OutputRejectedError) else "handler_error"
        try:
            request, failures = self._salvage(record)
        except Exception:  # the last line of defence must not fail too
            request, failures = None, []
        error = f"{type(exc).__name__}: {exc}"
        return [self._dead(record, reason, error, request=request, failures=failures)]

    def _salvage(self, record: SourceRecord) -> tuple[dict[str, Any] | None, list[Any]]:
        """The record's request (and failures so far) if it parses, for a dead letter."""
        return None, []

    def _dead(
        self,
        record: SourceRecord,
        reason: str,
        error: str,
        *,
        request: dict[str, Any] | None = None,
        failures: Sequence[dict[str, Any]] = (),
    ) -> Output:
        self._count("dead_letter", reason)
        request_id = request.get("request_id") if request else None
        build = partial(
            records.dead_letter,
            record,
            reason=reason,
            error=error,
            stage=self.name,
            request=request,
            failures=failures,
        )
        if request is not None or inputs_fit(record, limit=self._max_dead):
            output = self._output(record, self.topics.dead_letter, build(), request_id)
            if record_size(output) <= self._max_dead:
                return output
        # Too large to write: it goes without the input's bytes (and a large key), which
        # stay in the input topic at its `source`, and says what it left out.
        log.warning(
            "the dead letter of %s[%d]@%d is too large to carry the input (%d bytes of value, "
            "%d of key): it names its source instead",
            record.topic,
            record.partition,
            record.offset,
            len(record.value or b""),
            len(record.key or b""),
        )
        output = self._output(record, self.topics.dead_letter, build(carry=False), request_id)
        return output if len(output.key or b"") <= KEY_KEPT_BYTES else replace(output, key=None)

    def _result(
        self,
        record: SourceRecord,
        request: Held,
        done: Completion,
        *,
        attempts: int,
        fallback: bool,
        failures: Sequence[dict[str, Any]] = (),
    ) -> Output:
        value = records.result_record(
            request,
            provider=done.provider,
            provider_model=done.provider_model,
            content=done.content,
            reasoning=done.reasoning,
            usage=done.usage,
            attempts=attempts,
            latency_ms=done.latency_ms,
            fallback=fallback,
            finish_reason=done.finish_reason,
            tool_calls=done.tool_calls,
            provider_request_id=done.provider_request_id,
            cost_usd=done.cost_usd,
        )
        output = self._output(record, self.topics.results, value, request.request_id)
        size = record_size(output)
        limit = self._max_result
        if size > limit:
            error = (
                f"the result of {done.provider} {done.provider_model} is {size} bytes, over "
                f"the {limit} bytes {self.topics.results} takes: raise the topic's "
                f"max.message.bytes (up to {MAX_OUTPUT_BYTES}, the most this worker writes) "
                "or ask for fewer tokens"
            )
            # The answer was paid for: its failure says what it cost, and the id to quote.
            paid = records.failure(
                provider=done.provider,
                model=done.provider_model,
                status=200,
                error_type="result_too_large",
                message=error,
                attempts=done.attempts,
                provider_request_id=done.provider_request_id,
                cost_usd=done.cost_usd,
            )
            return self._dead(
                record,
                "result_too_large",
                error,
                request=self._body_of(record),
                failures=[*failures, paid],
            )
        self._count("result", "fallback" if fallback else None)
        return output

    def _final(
        self,
        record: SourceRecord,
        request: Held,
        exc: ProviderError,
        failures: Sequence[dict[str, Any]],
    ) -> Output:
        """A dead letter whose reason is the provider's verdict on the request itself."""
        return self._dead(
            record,
            exc.error_type,
            f"{request.model}: {exc.message[:300]}",
            request=self._body_of(record),
            failures=failures,
        )

    def _body_of(self, record: SourceRecord) -> dict[str, Any]:
        """The request as it came, parsed again from the record: a call in flight keeps
        only its body bytes and the `Held` part, not a second, parsed copy of the prompt
        (10,000 calls of 20 KB prompts in flight: 200 MB). It parsed before, so it parses."""
        body, _ = self._salvage(record)
        if body is None:
            raise InvalidRecordError("invalid_request", "the request no longer parses")
        return body

    @staticmethod
    def _output(record: SourceRecord, topic: str, value: bytes, request_id: Any) -> Output:
        rid = request_id if isinstance(request_id, str) else None
        headers = records.output_headers(record, rid)
        if record.key is not None:
            # The input's key: the output may follow it to its partition (co-partitioning).
            return Output(topic, value, record.key, headers, follows=record.partition)
        return Output(topic, value, rid.encode() if rid else None, headers)

    def _repeat_cause(self, record: SourceRecord) -> str | None:
        for key, _ in record.headers or ():
            cause = _REPEAT_HEADERS.get(key if isinstance(key, str) else key.decode("latin-1"))
            if cause is not None:
                return cause
        return None

    def _spend_gate(self, record: SourceRecord) -> Budget | None:
        """The budget this record's calls spend from (None: no spend limit), counting a
        repeat (a replay or re-drive of a request run before) on the way."""
        cause = self._repeat_cause(record)
        if cause is not None and self._observer is not None:
            self._observer.record_repeat(self.name, cause)
        if self._spend is None:
            return None
        return self._spend.for_record(record.topic, cause is not None)

    def _call(
        self, client: ProviderClient, model: Model, request: Request, record: SourceRecord
    ) -> Coroutine[Any, Any, Completion]:
        """The provider call of `request` on `model`, not yet awaited: the caller awaits
        it, so it is no coroutine level (a frame per call in flight) of its own."""
        return client.complete(
            model,
            request.messages,
            request.params,
            deadline=request.deadline,
            request_id=request.request_id,
            spend=self._spend_gate(record),
        )

    def _count(self, outcome: str, reason: str | None = None) -> None:
        if self._observer is not None:
            self._observer.record_outcome(self.name, outcome, reason)

    @property
    def output_topics(self) -> tuple[str, ...]:
        """Every topic this stage writes to (its engine's producers learn them at start)."""
        return (self.topics.results, self.topics.dead_letter)


class PrimaryStage(_Stage):
    """Runs a request on the provider its model lives on (Synthetic, by the catalog)."""

    name = "primary"

    @property
    def output_topics(self) -> tuple[str, ...]:
        return (self.topics.results, self.topics.fallback, self.topics.dead_letter)

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        clients: Mapping[str, ProviderClient],
        observer: StageObserver | None = None,
        cluster_limits: Mapping[str, int] | None = None,
        spend: SpendLanes | None = None,
    ):
        """`cluster_limits`: topic → max.message.bytes as the cluster has it, if known;
        `spend`: the spend limits, when set."""
        super().__init__(settings, catalog, observer, cluster_limits, spend)
        self._clients = clients
        self._decoder = Decoder(
            settings.topics_dir / "request.schema.json",
            max_bytes=settings.max_request_bytes,
            known_models=lambda model: catalog.get(model) is not None,
        )

    async def handle(self, record: SourceRecord) -> Sequence[Output]:
        try:
            request = self._decoder.decode(record.value, now=time.time(), key=record.key)
        except InvalidRecordError as exc:
            return [self._dead(record, exc.reason, exc.message, request=exc.request)]
        model = self._catalog.get(request.model)
        assert model is not None  # the decoder checked the catalog
        call = self._call(self._clients[model.provider], model, request, record)
        held = request.held()
        del request  # the call has what it needs; a failure parses the record again
        try:
            done = await call
        except ProviderError as exc:
            failure = records.failure_of(exc)
            if exc.error_type in FINAL_ERRORS:
                return [self._final(record, held, exc, [failure])]
            self._count("fallback", exc.error_type)
            value = records.fallback_record(self._body_of(record), failure)
            return [self._output(record, self.topics.fallback, value, held.request_id)]
        return [self._result(record, held, done, attempts=done.attempts, fallback=False)]

    def _salvage(self, record: SourceRecord) -> tuple[dict[str, Any] | None, list[Any]]:
        try:
            return self._decoder.parse(record.value, key=record.key), []
        except InvalidRecordError:
            return None, []


class FallbackStage(_Stage):
    """Runs a failed request on its MODEL_FALLBACKS target at Together, or dead-letters it."""

    name = "fallback"

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        together: ProviderClient,
        observer: StageObserver | None = None,
        cluster_limits: Mapping[str, int] | None = None,
        spend: SpendLanes | None = None,
    ):
        """`cluster_limits`: topic → max.message.bytes as the cluster has it, if known;
        `spend`: the spend limits, when set."""
        super().__init__(settings, catalog, observer, cluster_limits, spend)
        self._together = together
        self._settings = settings
        self._decoder = Decoder(
            settings.topics_dir / "fallback.schema.json",
            max_bytes=settings.max_request_bytes + 8192,  # room for the failure
            known_models=lambda model: catalog.get(model) is not None,
        )

    async def handle(self, record: SourceRecord) -> Sequence[Output]:
        try:
            body = self._decoder.parse(record.value, key=record.key)
        except InvalidRecordError as exc:
            return [self._dead(record, exc.reason, exc.message)]
        failure = body.pop("failure")
        try:
            request = self._decoder.request(body, now=time.time())
        except InvalidRecordError as exc:
            return [self._dead(record, exc.reason, exc.message, request=body, failures=[failure])]
        return [await self._fall_back(record, request, failure)]

    def _salvage(self, record: SourceRecord) -> tuple[dict[str, Any] | None, list[Any]]:
        try:
            body = self._decoder.parse(record.value, key=record.key)
        except InvalidRecordError:
            return None, []
        failure = body.pop("failure")
        return body, [failure]

    async def _fall_back(
        self, record: SourceRecord, request: Request, failure: dict[str, Any]
    ) -> Output:
        target = get_fallback_provider(request.model, self._catalog, self._settings)
        if target is not None:
            return await self._run_fallback(record, request, failure, target)
        mapped = self._catalog.fallback_for(request.model)
        if mapped is None:
            return self._dead(
                record,
                "no_fallback",
                f"{request.model} has no fallback model",
                request=request.body,
                failures=[failure],
            )
        return self._dead(
            record,
            "fallback_unconfigured",
            f"{request.model} falls back to {mapped.id} at Together, but "
            "TOGETHER_API_KEY is not set",
            request=request.body,
            failures=[failure],
        )

    async def _run_fallback(
        self, record: SourceRecord, request: Request, failure: dict[str, Any], target: Model
    ) -> Output:
        try:
            done = await self._call(self._together, target, request, record)
        except ProviderError as exc:
            if exc.error_type in FINAL_ERRORS:
                failures = [failure, records.failure_of(exc)]
                return self._final(record, request.held(), exc, failures)
            return self._dead(
                record,
                "fallback_failed",
                f"{request.model} failed on {failure['provider']} and "
                f"{target.id} failed on together: {exc.message[:200]}",
                request=request.body,
                failures=[failure, records.failure_of(exc)],
            )
        if self._observer is not None:
            self._observer.record_fallback(request.model, target.id)
        # The whole request's cost, the first stage's billed failures too; unknown when
        # either is (a failure's null: billed, for what nobody can tell; none billed is 0).
        paid, cost = failure.get("cost_usd"), done.cost_usd
        done = replace(done, cost_usd=cost + paid if cost is not None and is_amount(paid) else None)
        return self._result(
            record,
            request.held(),
            done,
            attempts=failure["attempts"] + done.attempts,
            fallback=True,
            failures=[failure],
        )
