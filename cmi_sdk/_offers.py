"""From a customer's request to signed offers, and from an acceptance to a booking.

The pipeline runs the firm's systems through hooks, in a fixed order::

    validate ▸ verify claims ▸ capacity ▸ revenue decision ▸ price ▸ rewards ▸ advice
    ▸ validity ▸ build, sign and store the offer

Each stage has a budget carved out of the request's deadline (``respond_by``, or the
adapter's default): stage *n* must be done by the start plus the sum of the shares of
stages 1..*n*, so a fast stage leaves its time to the next. pluggy has no timeouts, so the
pipeline runs on a worker thread and the caller waits stage by stage: a stage still running
at its deadline means no offer (fail closed), and the caller is answered at once; the late
plugin finishes in the background and its answer is dropped. A plugin that raises means no
offer either, and the log names the plugin.

When every implementation of the pipeline's hooks is marked
:func:`~cmi_sdk.nonblocking` and the store's offer calls never wait on a network, the
pipeline runs on the caller's thread instead: handing a request to a worker and back costs
more than the whole pipeline on a busy server. A stage past its deadline still makes no
offer, found when it returns.

Hook implementations may be ``async def``: the pipeline awaits what they return.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hashlib
import inspect
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from cmi_sdk._exceptions import (
    AcceptanceError,
    CMIError,
    FirmSystemError,
    NoAnswerError,
    OfferExpiredError,
    OfferNotFoundError,
    PluginFailedError,
    Problem,
    ReplayedMessageError,
    RequestRefusedError,
    StageTimeoutError,
)
from cmi_sdk._models import (
    Acceptance,
    Advice,
    FlightWanted,
    LineItem,
    Money,
    Offer,
    OfferSet,
    Request,
    Reward,
    Transaction,
)
from cmi_sdk._quotes import Availability, ClaimCheck, Hold, Quote, RevenueDecision
from cmi_sdk._retention import ACCEPTANCE_SKEW
from cmi_sdk.hookspecs import NONBLOCKING_ATTRIBUTE
from cmi_sdk.outbox import (
    AcceptanceClaim,
    AcceptanceRecord,
    AcceptanceState,
    EmissionProblem,
    NewRow,
    OutboxStore,
    SeenMessage,
    StoredOffer,
)

if TYPE_CHECKING:
    from cmi_sdk._documents import Documents
    from cmi_sdk._emit import Emission

__all__ = [
    "DEFAULT_STAGE_SHARES",
    "AcceptanceResult",
    "Answer",
    "OfferPipeline",
    "Prepared",
]

log = logging.getLogger("cmi_sdk.offers")

_Answer = TypeVar("_Answer")

#: How often, at most, a waiting event loop reads a request's current stage deadline again.
_DEADLINE_POLL = 0.02

DEFAULT_STAGE_SHARES: dict[str, float] = {
    "validation": 0.05,
    "claims": 0.10,
    "capacity": 0.25,
    "revenue": 0.20,
    "pricing": 0.20,
    "rewards": 0.05,
    "advice": 0.05,
    "validity": 0.05,
    "offer": 0.05,
}
"""Each stage's share of the request's time budget, in pipeline order (they sum to 1)."""

_TIMEOUT_OF: dict[str, Problem] = {
    "validation": Problem.VALIDATION_TIMEOUT,
    "claims": Problem.CLAIMS_TIMEOUT,
    "capacity": Problem.CAPACITY_TIMEOUT,
    "revenue": Problem.REVENUE_TIMEOUT,
    "pricing": Problem.PRICING_TIMEOUT,
    "rewards": Problem.REWARDS_TIMEOUT,
    "advice": Problem.ADVICE_TIMEOUT,
    "validity": Problem.VALIDITY_TIMEOUT,
    "offer": Problem.OFFER_TIMEOUT,
}
"""The problem a stage that missed its budget is answered with."""

PIPELINE_HOOKS = (
    "cmi_validate_request",
    "cmi_verify_claims",
    "cmi_check_capacity",
    "cmi_revenue_decision",
    "cmi_price",
    "cmi_rewards",
    "cmi_advise",
    "cmi_offer_validity",
)
"""The hooks a request runs through, in order (stages 1 to 8)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request as the endpoint read it, for :meth:`~cmi_sdk.Adapter.answer_request_async`."""

    request: Request
    intermediary: str | None = None
    """The intermediary that passed the request on."""
    message: SeenMessage | None = None
    """The signed message the request came in: its id is remembered (replay cache) in the
    commit that stores the answer's offers, and refused if it was remembered meanwhile."""


def _prepared(value: Prepared | tuple[Any, ...]) -> Prepared:
    """``value`` as :class:`Prepared`; a tuple (request, intermediary[, message]) is the
    shape of earlier releases, still taken for one release."""
    if isinstance(value, Prepared):
        return value
    return Prepared(*value)


@dataclass(frozen=True, slots=True)
class Answer:
    """The firm's answer to a request: the model and its signed ``offers`` document."""

    offers: OfferSet
    xml: bytes


@dataclass(frozen=True, slots=True)
class AcceptanceResult:
    """What an acceptance came to: booked (with the transaction) or refused.

    A retried acceptance (same id) gets the first one's result, read back from the store:
    then ``transaction`` is None and ``replayed`` is True.
    """

    outcome: str
    acceptance_id: str
    offer_id: str
    transaction_id: str | None = None
    documents: tuple[str, ...] = ()
    """The message ids of the documents emitted for the booking."""
    problem: str | None = None
    detail: str | None = None
    transaction: Transaction | None = None
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready data (what the endpoint answers)."""
        out: dict[str, Any] = {
            "outcome": self.outcome,
            "acceptance_id": self.acceptance_id,
            "offer_id": self.offer_id,
        }
        if self.transaction_id is not None:
            out["transaction_id"] = self.transaction_id
            out["documents"] = list(self.documents)
        if self.problem is not None:
            out["problem"] = self.problem
            out["detail"] = self.detail
        if self.replayed:  # the answer given before: nothing more was booked
            out["replayed"] = True
        return out


@dataclass
class _Run:
    """A request's progress, shared between the thread running its pipeline and the caller
    waiting for it. Its deadline is checked only by :meth:`OfferPipeline._check` and moved
    only by :meth:`OfferPipeline._enter`."""

    start: float
    budget: float
    deadline: float
    inline: bool
    """Runs on the caller's thread (see :meth:`OfferPipeline.runs_inline`)."""
    stage: str = "validation"
    abandoned: bool = False
    """The request was refused as late: the pipeline stops at its next check."""
    request_id: str = "(not yet read)"
    message: SeenMessage | None = None
    """The signed message the request came in, remembered with what answering stores."""


@dataclass
class _Stages:
    shares: dict[str, float]
    ends: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        total = 0.0
        self.ends = {}
        for stage, share in self.shares.items():
            total += share
            self.ends[stage] = total


def _plugin_of(caller: pluggy.HookCaller, exc: BaseException) -> str | None:
    """The plugin whose hook implementation raised ``exc``: found by the code objects in
    the traceback (pluggy re-raises the implementation's own exception)."""
    codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()}
    tb = exc.__traceback__
    found = None
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code)
        if name is not None:
            found = name
        tb = tb.tb_next
    return found


_STAGE_OF = dict(zip(PIPELINE_HOOKS, list(DEFAULT_STAGE_SHARES)[:-1], strict=True))


REQUEST_ID_GENERATIONS = 8
"""How many times one intermediary may use one request id, each once the offer of the one
before has expired."""


def request_offer_id(intermediary: str, request_id: str, generation: int = 0) -> str:
    """The id of the offer answering ``request_id`` from ``intermediary`` (the
    ``generation``-th time the id is used): the same request sent again finds it."""
    digest = hashlib.sha256(
        "\x1f".join(("cmi-offer-id/v1", intermediary, request_id, str(generation))).encode()
    )
    return f"off_{digest.hexdigest()[:20]}"


def _same_request(first: Request, again: Request) -> bool:
    """Whether ``again`` asks what ``first`` asked: the same request sent again may carry
    new timestamps (a client stamps each send), nothing else."""
    moments = {"created_at", "respond_by"}
    return first.model_dump(exclude=moments) == again.model_dump(exclude=moments)


def _only_plugin(caller: pluggy.HookCaller) -> str:
    names = [impl.plugin_name for impl in caller.get_hookimpls()]
    return ", ".join(names) or "none"


class OfferPipeline:
    """The request-to-offer pipeline and acceptance of one adapter (built by it)."""

    def __init__(
        self,
        *,
        hook: pluggy.HookRelay,
        store: Callable[[], OutboxStore],
        documents: Documents,
        prepare: Callable[
            [Transaction, str, str | None],
            tuple[list[NewRow], list[Emission], list[EmissionProblem]],
        ],
        firm: str,
        clock: Callable[[], float],
        default_budget: float = 2.0,
        max_budget: float = 30.0,
        default_validity: dt.timedelta = dt.timedelta(minutes=15),
        stage_shares: dict[str, float] | None = None,
        workers: int = 8,
        acceptance_lease: float = 300.0,
    ) -> None:
        self._hook = hook
        self._store = store
        self._documents = documents
        self._prepare = prepare
        self.acceptance_lease = acceptance_lease
        """Seconds a booking process holds an acceptance: past it, a crashed booking is
        recovered. It must outlast ``cmi_hold`` and ``cmi_book`` together."""
        self.firm = firm
        self._clock = clock
        self.default_budget = default_budget
        self.max_budget = max_budget
        self.default_validity = default_validity
        shares = dict(stage_shares or DEFAULT_STAGE_SHARES)
        if list(shares) != list(DEFAULT_STAGE_SHARES) or not math.isclose(
            sum(shares.values()), 1.0
        ):
            raise ValueError(f"stage shares name the stages {list(DEFAULT_STAGE_SHARES)}, sum 1")
        self._stages = _Stages(shares)
        self._workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._hook_loop = _HookLoop()

    # -- answering requests ---------------------------------------------------------------

    def answer(self, request: Request, *, intermediary: str | None = None) -> Answer:
        """Run the pipeline for ``request``; see the module's description.

        :raises RequestRefusedError: the firm cannot serve the request as it is.
        :raises FirmSystemError: a stage late, a plugin failing or missing: no offer is
            made (fail closed).
        """
        run = self._new_run()
        self._begin(run, Prepared(request, intermediary))
        return self._execute(run, lambda: self._respond(request, run, intermediary))

    async def answer_async(self, prepare: Callable[[], Prepared | tuple[Any, ...]]) -> Answer:
        """:meth:`answer` for an event loop, with the request's preparation (the endpoint's
        authentication and parsing) where the pipeline runs: one hand-off a request.

        :param prepare: returns the :class:`Prepared` request (a tuple of its fields is
            still taken, for one release); runs where the pipeline runs.
        :raises ReplayedMessageError: the message was remembered meanwhile (a replay
            racing the original); nothing is stored.
        """
        run = self._new_run()

        def job() -> Answer:
            prepared = _prepared(prepare())
            self._begin(run, prepared)
            return self._respond(prepared.request, run, prepared.intermediary)

        return await self._execute_async(run, job)

    def _new_run(self) -> _Run:
        start = time.monotonic()
        # Until the request is read, its budget is the longest a request may have.
        return _Run(
            start=start,
            budget=self.max_budget,
            deadline=start + self.max_budget,
            inline=self.runs_inline(),
        )

    def _begin(self, run: _Run, prepared: Prepared) -> None:
        """The request is read: its budget runs from now."""
        run.request_id = prepared.request.id
        run.message = prepared.message
        run.budget = self._budget(prepared.request)
        run.start = time.monotonic()

    # -- where a request runs: the caller's thread, or a worker the caller waits for -----

    def _execute(self, run: _Run, job: Callable[[], Answer]) -> Answer:
        """Run ``job`` (a request's pipeline) on the caller's thread when ``run.inline``,
        else on a worker, waited for until the current stage's deadline (:meth:`_check`)."""
        if run.inline:
            return job()
        future = self._executor().submit(job)
        while True:
            try:
                return future.result(timeout=_wait(run))
            except concurrent.futures.TimeoutError:
                self._check(run)

    async def _execute_async(self, run: _Run, job: Callable[[], Answer]) -> Answer:
        """:meth:`_execute` for an event loop: inline, the job runs on the loop (no stage
        can wait on anything); else the loop awaits the worker."""
        if run.inline:
            return job()
        future = asyncio.wrap_future(self._executor().submit(job))
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), _wait(run))
            except TimeoutError:
                self._check(run)

    # -- the deadline ---------------------------------------------------------------------

    def _check(self, run: _Run) -> None:
        """The one deadline check, made by the pipeline before each stage and before its
        commit, and by a waiting caller whose wait ran out: past the current stage's
        deadline the request is refused (fail closed) and its pipeline abandoned."""
        if run.abandoned:  # refused already, by the waiting caller: said and logged there
            raise StageTimeoutError("abandoned", stage=run.stage, problem=_TIMEOUT_OF[run.stage])
        if time.monotonic() < run.deadline:
            return
        run.abandoned = True
        raise self._late(run)

    def _enter(self, run: _Run, stage: str) -> None:
        """Start ``stage``, if the one before it kept its deadline: its own runs to the
        start plus the shares of the stages up to it."""
        self._check(run)
        run.deadline = run.start + run.budget * self._stages.ends[stage]
        run.stage = stage

    def _late(self, run: _Run) -> StageTimeoutError:
        """The refusal of a request whose current stage missed its budget, logged."""
        stage = run.stage
        share = self._stages.shares[stage]
        where = ""
        if run.inline:
            hooks = [h for h in PIPELINE_HOOKS if _STAGE_OF[h] == stage]
            plugins = ", ".join(_only_plugin(getattr(self._hook, h)) for h in hooks) or "the SDK"
            where = f"; it ran on the caller's thread (marked nonblocking: {plugins})"
        log.warning(
            "request %s: %s missed its budget (%.0f ms of %.0f ms)%s; no offer",
            run.request_id,
            stage,
            share * run.budget * 1000,
            run.budget * 1000,
            where,
        )
        return StageTimeoutError(
            f"the firm's {stage} stage did not answer within the request's time budget;"
            " no offer is made",
            stage=stage,
            problem=_TIMEOUT_OF[stage],
        )

    def runs_inline(self) -> bool:
        """Whether requests are answered on the caller's thread: every implementation of
        the pipeline's hooks is marked :func:`~cmi_sdk.nonblocking`, and the store says
        its offer calls never wait on a network (``nonblocking``). Asked a request, so
        a plugin registered later counts."""
        return not self.threaded_by()

    def threaded_by(self) -> list[str]:
        """What keeps :meth:`runs_inline` false: ``plugin.hook`` of each unmarked
        implementation, and ``store``."""
        found = [] if self._store().nonblocking else ["store"]
        found += [
            f"{impl.plugin_name}.{name}"
            for name in PIPELINE_HOOKS
            for impl in getattr(self._hook, name).get_hookimpls()
            if not getattr(impl.function, NONBLOCKING_ATTRIBUTE, False)
        ]
        return found

    def _budget(self, request: Request) -> float:
        budget = self.default_budget
        if request.respond_by is not None:
            left = request.respond_by.timestamp() - self._clock()
            if left <= 0:
                raise RequestRefusedError(
                    "the request's respond_by has passed", problem=Problem.DEADLINE_PASSED
                )
            budget = min(left, self.max_budget)
        return budget

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        self._workers, thread_name_prefix="cmi-offers"
                    )
        return self._pool

    def close(self) -> None:
        """Stop the worker threads (after the pipelines in flight)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._hook_loop.close()

    def _call(self, name: str, *, first: bool, **kwargs: Any) -> Any:
        caller: pluggy.HookCaller = getattr(self._hook, name)
        try:
            result = caller(**kwargs)
            if first:
                return self._await(result)
            return [self._await(r) for r in result]
        except CMIError:
            raise
        except Exception as exc:
            plugin = _plugin_of(caller, exc)
            log.exception("%s failed in plugin %s", name, plugin or "(unknown)")
            raise PluginFailedError(
                f"{name} failed in plugin {plugin or '(unknown)'}",
                plugin=plugin,
            ) from None

    def _answer(
        self, name: str, kind: type[_Answer], missing: str, problem: Problem, **kwargs: Any
    ) -> _Answer:
        """The first answer to a hook that must answer: NoAnswerError (``missing``, with
        ``problem``) when no plugin does, PluginFailedError when it is not a ``kind``."""
        answer = self._call(name, first=True, **kwargs)
        if answer is None:
            raise NoAnswerError(missing, hook=name, problem=problem)
        _expect(answer, kind, name, self._hook)
        return answer  # type: ignore[no-any-return]

    def _await(self, value: Any) -> Any:
        if not inspect.isawaitable(value):
            return value
        if _loop_running():
            # Only a nonblocking pipeline runs on a loop, and only plain functions can be
            # marked: this one returned an awaitable, which must not block the loop.
            if inspect.iscoroutine(value):
                value.close()
            raise TypeError(
                "a hook implementation marked nonblocking returned an awaitable; it must"
                " return its answer (or be async def, unmarked)"
            )
        return self._hook_loop.run(value)

    def _respond(self, request: Request, run: _Run, intermediary: str | None) -> Answer:
        """The answer given before to the same request id, still valid; else the pipeline's."""
        self._enter(run, "validation")
        if intermediary is None:
            return self._pipeline(request, run, None, f"off_{secrets.token_hex(10)}")
        offer_id, earlier = self._earlier_answer(request, intermediary)
        if earlier is not None:
            self._remember_alone(run)
            return earlier
        return self._pipeline(request, run, intermediary, offer_id)

    def _pipeline(
        self, request: Request, run: _Run, intermediary: str | None, offer_id: str
    ) -> Answer:
        problems = [
            p
            for ps in self._call("cmi_validate_request", first=False, request=request)
            for p in (ps or [])
        ]
        if problems:
            raise RequestRefusedError(
                "the firm cannot serve this request: " + "; ".join(map(str, problems)),
                problem=Problem.INVALID_REQUEST,
            )

        self._enter(run, "claims")
        checks = self._claims(request)

        self._enter(run, "capacity")
        availability: Availability | None = self._call(
            "cmi_check_capacity", first=True, request=request
        )
        units = request.wanted.passengers if isinstance(request.wanted, FlightWanted) else 1
        if availability is None:
            return self._declined(request, run, "the firm has nothing to offer for this request")
        _expect(availability, Availability, "cmi_check_capacity", self._hook)
        if availability.available < units:
            return self._declined(request, run, "sold out")

        self._enter(run, "revenue")
        decision = self._answer(
            "cmi_revenue_decision",
            RevenueDecision,
            "no revenue-management system answered (cmi_revenue_decision); no offer is made",
            Problem.NO_REVENUE_DECISION,
            request=request,
            availability=availability,
        )
        if not decision.accept:
            return self._declined(request, run, decision.reason or "the firm does not sell now")

        self._enter(run, "pricing")
        quote = self._answer(
            "cmi_price",
            Quote,
            "no pricing system answered (cmi_price); no offer is made",
            Problem.NO_PRICE,
            request=request,
            availability=availability,
            decision=decision,
        )
        floor = decision.floor
        total = quote.total
        if floor is not None:
            self._check_floor(request, total, floor)

        self._enter(run, "rewards")
        offered = self._call(
            "cmi_rewards", first=False, request=request, quote=quote, claims=checks
        )
        items, applied, price = _apply_rewards(
            quote.items, total, [r for rs in offered for r in (rs or [])], floor
        )

        self._enter(run, "advice")
        advice: list[Advice] = [
            a
            for batch in self._call("cmi_advise", first=False, request=request)
            for a in (batch or [])
        ]

        self._enter(run, "validity")
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        offer = Offer(
            id=offer_id,
            request_id=request.id,
            kind=request.kind,
            firm=self.firm,
            customer_ref=request.customer_ref,
            reply_to=request.reply_to,
            created_at=now,
            valid_from=now,
            valid_until=now + self.default_validity,
            product=quote.product or availability.product,
            items=items,
            price=price,
            rewards=applied,
            advice=tuple(advice),
        )
        windows = [
            w
            for w in self._call("cmi_offer_validity", first=False, request=request, offer=offer)
            if w is not None
        ]
        window = min(windows) if windows else self.default_validity
        if window <= dt.timedelta(0):
            return self._declined(request, run, "the offer would expire at once")
        offer = offer.model_copy(update={"valid_until": now + window})

        if request.constraints.max_price is not None:
            most = request.constraints.max_price
            if most.currency == offer.price.currency and offer.price.amount > most.amount:
                return self._declined(
                    request, run, f"the best price, {offer.price}, is above {most}"
                )

        self._enter(run, "offer")
        return self._offered(request, run, offer, intermediary)

    def _offered(
        self, request: Request, run: _Run, offer: Offer, intermediary: str | None
    ) -> Answer:
        """The last stage: the answer with its offer, signed and stored."""
        answer = OfferSet(
            request_id=request.id,
            firm=self.firm,
            reply_to=request.reply_to,
            answered_at=offer.created_at,
            offers=(offer,),
        )
        xml = self._documents.render_signed(answer, standard="cmi", document_type="offers")
        # Kept with the signed answer it went out in; GET /cmi/offers/{id} signs the offer
        # alone when asked, so answering costs one signature.
        try:
            self._keep(
                run,
                [StoredOffer(offer=offer, request=request, xml=xml, intermediary=intermediary)],
            )
        except CMIError:
            raise
        except Exception:
            # The same request id, answered meanwhile by another process or thread: its
            # offer took the id this one was to take. That answer is this one's.
            if intermediary is None:
                raise
            taken, earlier = self._earlier_answer(request, intermediary)
            if earlier is None or taken != offer.id:
                raise
            self._remember_alone(run)
            return earlier
        return Answer(answer, xml)

    # -- a request id sent again ----------------------------------------------------------

    def _earlier_answer(self, request: Request, intermediary: str) -> tuple[str, Answer | None]:
        """The id the request's offer takes, and the answer the same intermediary was given
        for the same request id while its offer is still valid (None: answer afresh).

        The offer id is derived from the intermediary, the request id and a generation:
        a request sent again finds the offer its first answer stored (an idempotency key,
        kept by the store's primary key across processes, with no table of its own). Once
        that offer has expired, the next generation answers afresh.

        :raises RequestRefusedError: ``request-conflict``: the id was used for another
            request (other wants, constraints or claims) whose offer is still valid, or
            too many times.
        """
        store = self._store()
        now = self._clock()
        for generation in range(REQUEST_ID_GENERATIONS):
            offer_id = request_offer_id(intermediary, request.id, generation)
            try:
                stored = store.get_offer(offer_id)
            except OfferNotFoundError:
                return offer_id, None
            if stored.offer.valid_until.timestamp() <= now:
                continue  # the first answer has lapsed: the id may ask again
            if stored.intermediary != intermediary or not _same_request(stored.request, request):
                raise RequestRefusedError(
                    f"request id {request.id} was used for another request, whose offer is"
                    f" valid until {stored.offer.valid_until:%Y-%m-%d %H:%M:%S} UTC; send"
                    " this request with a new id",
                    problem=Problem.REQUEST_CONFLICT,
                )
            answer = OfferSet(
                request_id=stored.offer.request_id,
                firm=stored.offer.firm,
                reply_to=stored.offer.reply_to,
                answered_at=stored.offer.created_at,
                offers=(stored.offer,),
            )
            return offer_id, Answer(answer, stored.xml)
        raise RequestRefusedError(
            f"request id {request.id} was used {REQUEST_ID_GENERATIONS} times; send the"
            " request with a new id",
            problem=Problem.REQUEST_CONFLICT,
        )

    def _remember_alone(self, run: _Run) -> None:
        """Remember the message id of a request answered from its first answer: a message
        id is used once, whatever it asked."""
        message = run.message
        if message is None:
            return
        if not self._store().remember_message(
            message.party, message.msg_id, expires_at=message.expires_at, now=message.now
        ):
            raise ReplayedMessageError(f"message id {message.msg_id} was already used")

    def _keep(self, run: _Run, stored: list[StoredOffer]) -> None:
        """Store an answer's offers (none for a declined answer) and, in the same commit,
        the message id the request came in.

        :raises ReplayedMessageError: the id was remembered meanwhile; nothing is stored.
        """
        self._check(run)  # the last stage's deadline: a late answer is not committed
        store = self._store()
        message = run.message
        if message is None:
            if stored:
                store.add_offers(stored)
            return
        store.add_offers(stored, message=message)
        if run.abandoned:
            # The caller was answered with a timeout while this stage committed: the
            # request was refused, and a refused request leaves its id free (its offer
            # stays, unknown to anyone, until it expires).
            store.forget_message(message.party, message.msg_id)

    def _check_floor(self, request: Request, total: Money, floor: Money) -> None:
        """Refuse a price below the revenue decision's floor (or in another currency): the
        firm's pricing answered what its revenue management forbids."""
        if floor.currency != total.currency:
            raise PluginFailedError(
                f"the price is in {total.currency}, the floor in {floor.currency}",
                plugin=_only_plugin(self._hook.cmi_price),
                problem=Problem.PRICE_BELOW_FLOOR,
            )
        if total.amount < floor.amount:
            plugins = _only_plugin(self._hook.cmi_price)
            log.error(
                "request %s: cmi_price (%s) priced %s below the floor %s",
                request.id,
                plugins,
                total,
                floor,
            )
            raise PluginFailedError(
                f"the price {total} is below the floor {floor} (cmi_price: {plugins});"
                " no offer is made",
                plugin=plugins,
                problem=Problem.PRICE_BELOW_FLOOR,
            )

    def _claims(self, request: Request) -> list[ClaimCheck]:
        found = [
            c
            for batch in self._call("cmi_verify_claims", first=False, request=request)
            for c in (batch or [])
        ]
        checked = {(c.claim.type, c.claim.value) for c in found}
        found.extend(
            ClaimCheck(claim=claim, verified=False, reason="nobody checked it")
            for claim in request.claims
            if (claim.type, claim.value) not in checked
        )
        return found

    def _declined(self, request: Request, run: _Run, reason: str) -> Answer:
        self._enter(run, "offer")
        answer = OfferSet(
            request_id=request.id,
            firm=self.firm,
            reply_to=request.reply_to,
            answered_at=dt.datetime.fromtimestamp(self._clock(), dt.UTC),
            declined=reason[:256],
        )
        xml = self._documents.render_signed(answer, standard="cmi", document_type="offers")
        self._keep(run, [])
        return Answer(answer, xml)

    # -- acceptance -----------------------------------------------------------------------

    def accept(
        self, offer_id: str, acceptance: Acceptance, *, intermediary: str | None = None
    ) -> AcceptanceResult:
        """Book ``acceptance`` of the offer; see :meth:`cmi_sdk.Adapter.accept_offer`.

        :raises OfferNotFoundError: no such offer (or not the intermediary's).
        :raises AcceptanceError: refused; nothing was booked.
        :raises FirmSystemError: the firm's systems failed; nothing was booked, and a
            retry may book.
        """
        store = self._store()
        stored = store.get_offer(offer_id)
        offer = stored.offer
        if stored.intermediary is not None and intermediary not in (None, stored.intermediary):
            raise OfferNotFoundError(f"no offer {offer_id!r}")  # not to be probed
        if acceptance.offer_id != offer.id:
            raise AcceptanceError(f"the acceptance is for offer {acceptance.offer_id}")
        if acceptance.customer_ref != offer.customer_ref:
            raise AcceptanceError("the acceptance is not from the customer the offer was for")
        if acceptance.accepted_at.timestamp() < offer.created_at.timestamp() - ACCEPTANCE_SKEW:
            # Made for a purged offer whose id this one has (see cmi_sdk._retention).
            raise AcceptanceError(f"the acceptance was made before offer {offer.id} was")
        # Each round claims the acceptance, or recovers the one in its way whose lease ran
        # out (a crashed booking) and claims again.
        for _ in range(3):
            owner = _owner()
            now = self._clock()
            claim = AcceptanceClaim(
                acceptance_id=acceptance.id,
                offer_id=offer.id,
                intermediary=intermediary,
                # Kept for recovery, without the identity the customer may have given
                # with it: that goes to the firm's cmi_book, and is not the SDK's to keep.
                acceptance=acceptance.model_copy(update={"identity": None}).model_dump_json(),
                owner=owner,
                lease_until=now + self.acceptance_lease,
            )
            found = store.begin_acceptance(claim, now)
            if found is None:
                return self._booking(stored, acceptance, owner)
            mine = found.acceptance_id == acceptance.id
            if not mine and found.intermediary != intermediary:
                # Another party's acceptance holds the offer: say so, and nothing of it.
                raise AcceptanceError(
                    f"offer {offer.id} was already accepted", problem=Problem.ALREADY_ACCEPTED
                )
            if found.state == "processing":
                if found.lease_until is not None and found.lease_until >= now:
                    raise AcceptanceError(
                        f"offer {offer.id} is being booked; retry shortly",
                        problem=Problem.ACCEPTANCE_IN_PROGRESS,
                    )
                self._recover(found, stored, acceptance if mine else None)
                continue
            return _replayed(found)
        raise AcceptanceError(
            f"offer {offer.id} is being booked; retry shortly",
            problem=Problem.ACCEPTANCE_IN_PROGRESS,
        )

    def _booking(self, stored: StoredOffer, acceptance: Acceptance, owner: str) -> AcceptanceResult:
        """Hold and book a claimed acceptance, then complete it."""
        offer = stored.offer
        try:
            tx = self._book(stored, acceptance, owner)
        except _LeaseLostError:
            raise AcceptanceError(
                f"offer {offer.id} is being booked; retry shortly",
                problem=Problem.ACCEPTANCE_IN_PROGRESS,
            ) from None
        except (AcceptanceError, FirmSystemError) as exc:
            # A refusal is the answer, and a retry's; an outage of the firm's systems
            # leaves the offer to a retry.
            self._end(
                acceptance.id,
                offer.id,
                owner,
                state="released" if isinstance(exc, FirmSystemError) else "refused",
                problem=exc.problem,
                detail=str(exc),
            )
            raise
        except BaseException:
            # An unexpected failure: the booking did not happen; let a retry try again.
            self._end(
                acceptance.id,
                offer.id,
                owner,
                state="released",
                problem=Problem.ACCEPTANCE_FAILED,
                detail="the booking failed",
            )
            raise
        # Booked: from here on the answer is "booked". A failure to record it leaves the
        # acceptance processing, and its recovery finds the booking (cmi_find_booking).
        return self._complete(stored, acceptance, owner, tx)

    def _end(
        self,
        acceptance_id: str,
        offer_id: str,
        owner: str,
        *,
        state: AcceptanceState,
        problem: Problem,
        detail: str,
    ) -> None:
        """Record an acceptance that booked nothing (refused, or released for a retry)."""
        refused = AcceptanceResult(
            outcome="refused",
            acceptance_id=acceptance_id,
            offer_id=offer_id,
            problem=problem,
            detail=detail,
        )
        try:
            self._store().finish_acceptance(
                acceptance_id, owner, state, json.dumps(refused.to_json()), self._clock()
            )
        except CMIError:
            # The lease runs out, and recovery finds that nothing was booked.
            log.exception("acceptance %s: its outcome could not be recorded", acceptance_id)

    def _complete(
        self, stored: StoredOffer, acceptance: Acceptance, owner: str, tx: Transaction
    ) -> AcceptanceResult:
        """Record a booking and queue its documents, in one commit."""
        offer = stored.offer
        rows, emissions, problems = self._prepare(tx, acceptance.customer_ref, stored.intermediary)
        result = AcceptanceResult(
            outcome="booked",
            acceptance_id=acceptance.id,
            offer_id=offer.id,
            transaction_id=tx.id,
            documents=tuple(e.msg_id for e in emissions),
            transaction=tx,
        )
        found = self._store().finish_acceptance(
            acceptance.id,
            owner,
            "booked",
            json.dumps(result.to_json()),
            self._clock(),
            rows=rows,
            problems=problems,
        )
        if found is not None:
            if found.state == "booked":
                return _replayed(found)  # recovered by another process meanwhile
            log.error(
                "acceptance %s was booked as %s after its lease ran out and another"
                " acceptance took offer %s: the firm's system may hold two bookings of it",
                acceptance.id,
                tx.id,
                offer.id,
            )
            raise AcceptanceError(
                f"offer {offer.id} was already accepted", problem=Problem.ALREADY_ACCEPTED
            )
        log.info(
            "offer %s booked as %s (%d documents%s)",
            offer.id,
            tx.id,
            len(emissions),
            f", {len(problems)} emission problems" if problems else "",
        )
        return result

    def _book(self, stored: StoredOffer, acceptance: Acceptance, owner: str) -> Transaction:
        offer, request = stored.offer, stored.request
        now = self._clock()
        if now >= offer.valid_until.timestamp():
            self._notify("cmi_on_offer_expired", offer=offer)
            raise OfferExpiredError(
                f"offer {offer.id} expired at {offer.valid_until:%Y-%m-%dT%H:%M:%SZ}"
            )
        # Checked again: a refusal (AcceptanceError) is the answer; a plugin that fails
        # is an outage (FirmSystemError), and a retry may book.
        availability = self._call("cmi_check_capacity", first=True, request=request)
        units = request.wanted.passengers if isinstance(request.wanted, FlightWanted) else 1
        if availability is None or availability.available < units:
            raise AcceptanceError("no longer available", problem=Problem.NO_LONGER_AVAILABLE)
        decision = self._call(
            "cmi_revenue_decision", first=True, request=request, availability=availability
        )
        if decision is None or not decision.accept:
            raise AcceptanceError(
                "the firm no longer sells this offer", problem=Problem.NO_LONGER_AVAILABLE
            )
        if decision.floor is not None and (
            decision.floor.currency != offer.price.currency
            or decision.floor.amount > offer.price.amount
        ):
            raise AcceptanceError(
                f"the offer's price is now below the firm's floor {decision.floor}",
                problem=Problem.PRICE_CHANGED,
            )
        hold: Hold | None = self._call("cmi_hold", first=True, offer=offer, acceptance=acceptance)
        self._record_hold(offer, acceptance, owner, hold)
        try:
            tx = self._answer(
                "cmi_book",
                Transaction,
                "no booking system answered (cmi_book)",
                Problem.NOT_BOOKED,
                offer=offer,
                acceptance=acceptance,
                hold=hold,
            )
        except Exception as exc:
            if hold is not None:
                self._notify("cmi_release", offer=offer, hold=hold)
            if isinstance(exc, AcceptanceError | NoAnswerError):
                raise
            raise PluginFailedError(
                f"the booking failed: {exc}",
                plugin=exc.plugin if isinstance(exc, FirmSystemError) else None,
                problem=Problem.NOT_BOOKED,
            ) from None
        return tx

    def _record_hold(
        self, offer: Offer, acceptance: Acceptance, owner: str, hold: Hold | None
    ) -> None:
        """Record the hold with the acceptance (recovery releases it after a crash) and
        renew the lease: a process whose lease ran out books nothing, and lets its hold
        go, as it does when the store fails here."""
        held = None if hold is None else hold.model_dump_json()
        lease_until = self._clock() + self.acceptance_lease
        renewed = False
        try:
            renewed = self._store().renew_acceptance(acceptance.id, owner, lease_until, hold=held)
        finally:
            if not renewed and hold is not None:
                self._notify("cmi_release", offer=offer, hold=hold)
        if not renewed:
            raise _LeaseLostError

    # -- recovery -------------------------------------------------------------------------

    def recover(self, *, limit: int = 100) -> dict[str, int]:
        """Recover acceptances left ``processing`` by a crash (their lease ran out): each
        is completed as booked when ``cmi_find_booking`` finds its booking (its documents
        queued), else its hold is released and it is marked released, for a retry to
        book. Return how many went each way (``booked``, ``released``)."""
        store = self._store()
        done = {"booked": 0, "released": 0}
        for found in store.stalled_acceptances(self._clock(), limit):
            try:
                stored = store.get_offer(found.offer_id)
            except OfferNotFoundError:
                log.error("acceptance %s is of an offer no longer kept", found.acceptance_id)
                continue
            try:
                outcome = self._recover(found, stored, None)
            except CMIError:
                # One acceptance's trouble (the store, another's claim) is not the others'.
                log.exception("acceptance %s could not be recovered", found.acceptance_id)
                continue
            if outcome is not None:
                done[outcome] += 1
        return done

    def _recover(
        self, found: AcceptanceRecord, stored: StoredOffer, incoming: Acceptance | None
    ) -> str | None:
        """Take over ``found`` (its lease ran out), ask the firm's systems whether it was
        booked, and complete or release it; the outcome, or None when another process
        took it over first or the firm's systems did not answer."""
        store = self._store()
        offer = stored.offer
        owner = _owner()
        now = self._clock()
        if not store.take_over_acceptance(
            found.acceptance_id, owner, now, now + self.acceptance_lease
        ):
            return None
        acceptance = _acceptance_of(found, offer, incoming, now)
        try:
            tx = self._call("cmi_find_booking", first=True, offer=offer, acceptance=acceptance)
            if tx is not None:
                _expect(tx, Transaction, "cmi_find_booking", self._hook)
        except CMIError:
            log.exception(
                "acceptance %s: cmi_find_booking failed; it is tried again when its lease runs out",
                found.acceptance_id,
            )
            return None
        if tx is not None:
            log.warning(
                "acceptance %s was interrupted after its booking %s: completed as booked",
                found.acceptance_id,
                tx.id,
            )
            self._complete(stored, acceptance, owner, tx)
            return "booked"
        if found.hold is not None:
            self._notify("cmi_release", offer=offer, hold=Hold.model_validate_json(found.hold))
        log.warning(
            "acceptance %s was interrupted before any booking: its hold is released and a"
            " retry may book",
            found.acceptance_id,
        )
        self._end(
            found.acceptance_id,
            offer.id,
            owner,
            state="released",
            problem=Problem.NOT_BOOKED,
            detail="the booking was interrupted; nothing was booked",
        )
        return "released"

    def _notify(self, name: str, **kwargs: Any) -> None:
        try:
            self._call(name, first=False, **kwargs)
        except CMIError:
            log.exception("%s failed", name)


class _LeaseLostError(Exception):
    """The acceptance's lease ran out and another process took it over."""


def _owner() -> str:
    """A lease owner: this call, in this process."""
    return f"{os.getpid()}:{secrets.token_hex(8)}"


def _replayed(found: AcceptanceRecord) -> AcceptanceResult:
    """The recorded answer of a booked or refused acceptance."""
    if found.result is None:  # pragma: no cover - booked and refused rows have answers
        raise AcceptanceError(
            f"acceptance {found.acceptance_id} has no recorded answer",
            problem=Problem.ACCEPTANCE_IN_PROGRESS,
        )
    data = json.loads(found.result)
    return AcceptanceResult(
        outcome=data["outcome"],
        acceptance_id=data["acceptance_id"],
        offer_id=data["offer_id"],
        transaction_id=data.get("transaction_id"),
        documents=tuple(data.get("documents", ())),
        problem=data.get("problem"),
        detail=data.get("detail"),
        replayed=True,
    )


def _acceptance_of(
    found: AcceptanceRecord, offer: Offer, incoming: Acceptance | None, now: float
) -> Acceptance:
    """The acceptance a record was made for: as recorded, or (a record of an earlier
    version, which kept none) the retry's, or rebuilt from the offer."""
    if found.acceptance is not None:
        return Acceptance.model_validate_json(found.acceptance)
    if incoming is not None:
        return incoming
    return Acceptance(
        id=found.acceptance_id,
        offer_id=offer.id,
        customer_ref=offer.customer_ref,
        accepted_at=dt.datetime.fromtimestamp(now, dt.UTC),
    )


def _wait(run: _Run) -> float:
    """How long a caller waits for a worker before it checks the deadline again. The worker
    moves the deadline as it enters each stage, after the wait began: wake at least every
    _DEADLINE_POLL to read it again, so that a stage that overruns its share is refused at
    its own deadline, not at the request's longest."""
    return min(max(0.0, run.deadline - time.monotonic()), _DEADLINE_POLL)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _resolve(value: Any) -> Any:
    return await value


class _HookLoop:
    """The one event loop every coroutine a hook implementation returns runs on, on a
    thread of its own, started at the first async answer (a cost paid only by async
    plugins) and stopped by :meth:`close`.

    One loop for the pipeline's life, not one per call: an async plugin's clients and
    pools (an ``httpx.AsyncClient``, a database pool) are bound to the loop they were made
    on, so they keep working from one request to the next. The pipeline's worker threads
    wait for their coroutine's answer; a coroutine that blocks the loop delays every async
    plugin, as it would in the firm's own service."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, awaitable: Any) -> Any:
        """The answer ``awaitable`` resolves to, awaited on the hook loop."""
        future = asyncio.run_coroutine_threadsafe(_resolve(awaitable), self._started())
        return future.result()

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="cmi-hook-loop", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def close(self) -> None:
        """Stop the loop (after the coroutines it is running finish their current step)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


def _expect(value: object, kind: type, hook: str, relay: pluggy.HookRelay) -> None:
    if not isinstance(value, kind):
        plugins = _only_plugin(getattr(relay, hook))
        raise PluginFailedError(
            f"{hook} ({plugins}) returned {type(value).__name__}, not {kind.__name__}",
            plugin=plugins,
        )


def _apply_rewards(
    items: tuple[LineItem, ...], total: Money, rewards: Iterable[Reward], floor: Money | None
) -> tuple[tuple[LineItem, ...], tuple[Reward, ...], Money]:
    """Apply rewards to a quote's ``items`` (which sum to ``total``) largest first (then by
    code), each as a negative line, never taking the total below the floor: a reward that
    does not fit whole is cut to what fits. Return the items, the rewards as applied and
    the new total."""
    added: list[LineItem] = []
    applied: list[Reward] = []
    lowest = floor.amount if floor is not None else Decimal(0)
    for reward in sorted(rewards, key=lambda r: (-r.amount.amount, r.code)):
        if reward.amount.currency != total.currency or reward.amount.amount <= 0:
            log.warning("reward %s skipped: not a positive %s amount", reward.code, total.currency)
            continue
        room = total.amount - lowest
        take = min(reward.amount.amount, room)
        exponent = Decimal(1).scaleb(-total.minor_units)
        take = take.quantize(exponent, rounding=ROUND_DOWN)
        if take <= 0:
            continue
        cut = Money(amount=take, currency=total.currency)
        minus = Money(amount=-take, currency=total.currency)
        added.append(
            LineItem(
                description=f"Reward: {reward.description}"[:256], unit_price=minus, amount=minus
            )
        )
        applied.append(
            reward if take == reward.amount.amount else reward.model_copy(update={"amount": cut})
        )
        total = Money(amount=total.amount - take, currency=total.currency)
    return items + tuple(added), tuple(applied), total
