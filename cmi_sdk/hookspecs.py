"""The hooks cmi-sdk calls, and what each one promises.

Every hook's name starts with ``cmi_``, and the SDK always calls hooks with keyword
arguments, so an implementation may take only the arguments it needs. Implement one with
:data:`cmi_sdk.hookimpl`::

    from cmi_sdk import hookimpl

    @hookimpl
    def cmi_register_standards(register):
        register.add(MY_STANDARD)

The docs' hook reference (``docs/hooks.md``) is generated from the docstrings below.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

if TYPE_CHECKING:
    import datetime
    import datetime as dt

    from cmi_sdk._models import (
        Acceptance,
        Advice,
        Offer,
        Request,
        Reward,
        SharingTerms,
        TermsDecision,
        TermsPolicy,
        TermsProposal,
        Transaction,
    )
    from cmi_sdk._quotes import Availability, ClaimCheck, Hold, Quote, RevenueDecision
    from cmi_sdk._standards import StandardRegistry
    from cmi_sdk.outbox import DeliveryReport

__all__ = ["NONBLOCKING_ATTRIBUTE", "PROJECT_NAME", "hookimpl", "hookspec", "nonblocking"]

PROJECT_NAME = "cmi_sdk"
"""The pluggy project name, and the entry-point group plugins are published under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks a hook specification (for this module only)."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a function or method as a hook implementation."""

NONBLOCKING_ATTRIBUTE = "cmi_nonblocking"
"""The attribute :func:`nonblocking` sets on the functions it marks."""

_F = TypeVar("_F", bound=Callable[..., Any])


def nonblocking(function: _F) -> _F:
    """Mark a request-pipeline hook implementation that never waits: it answers from
    memory or a local file, promptly, and never from a network or behind a lock another
    process may hold for long::

        @hookimpl
        @nonblocking
        def cmi_price(self, request, availability, decision): ...

    When every implementation of the request pipeline's hooks (stages 1 to 8) is marked,
    and the store's offer calls never wait on a network either (the SQLite store's
    don't), the pipeline runs on the caller's own thread, the endpoint's event loop
    included, instead of handing each request to a worker thread: no thread switches,
    which on a busy server cost more than the whole pipeline. A stage that still runs
    past its budget makes no offer (``<stage>-timeout``, and a warning in the log), but
    the answer waits for it; an unmarked implementation is timed out on the worker
    thread and the caller is answered at once. Mark only what cannot block.

    :raises TypeError: ``function`` is ``async def``: coroutines run on the pipeline's
        own event loop, never on the caller's.
    """
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        raise TypeError(
            f"{function.__qualname__} is async: only a plain function can be nonblocking"
        )
    setattr(function, NONBLOCKING_ATTRIBUTE, True)
    return function


@hookspec
def cmi_register_standards(register: StandardRegistry) -> None:
    """Add the XML standards a plugin provides.

    Called once, when an :class:`~cmi_sdk.Adapter` is created, after every plugin is
    registered. Each implementation calls ``register.add(standard)`` for every
    :class:`~cmi_sdk.Standard` it provides; return values are ignored.

    :param register: the adapter's :class:`~cmi_sdk.StandardRegistry`. Adding a standard
        whose name or root element is already taken raises :class:`~cmi_sdk.PluginError`,
        and the adapter is not created.
    """


@hookspec(firstresult=True)
def cmi_select_standard(
    transaction: Transaction, terms: SharingTerms
) -> tuple[str, str | None] | None:
    """Choose the standard and document type of the document ``terms`` get for
    ``transaction``.

    Called once per document, first in the emit pipeline. Stops at the first non-None
    result. The default (a ``trylast`` implementation) answers with the standard and
    document type the terms name.

    :param transaction: the transaction being emitted.
    :param terms: the customer's sharing terms the document goes out under.
    :return: ``(standard, document_type)``; the document type may be None when the
        standard has one document type for transactions. None leaves the choice to the
        next implementation.
    """


@hookspec(firstresult=True)
def cmi_review_terms(
    proposal: TermsProposal, policy: TermsPolicy, now: datetime.datetime
) -> TermsDecision | None:
    """Answer terms a customer proffers: accept, offer one alternative, or reject.

    Called when terms are proffered (``POST /cmi/terms``, ``cmi terms add``,
    :meth:`~cmi_sdk.Adapter.propose_terms`), after the SDK has checked that they are
    well-formed, name a standard and fields the firm has, and point at a destination the
    egress guard allows. Stops at the first non-None result. The default (``trylast``)
    judges the proposal against the firm's published ``policy``.

    :param proposal: the terms as proffered.
    :param policy: the firm's published :class:`~cmi_sdk.TermsPolicy`.
    :param now: the adapter's clock, timezone-aware UTC (alternatives count from it).
    :return: a :class:`~cmi_sdk.TermsDecision` with ``outcome`` ``accepted``,
        ``alternative`` (with ``alternative`` set) or ``rejected`` (with a ``reason``); the
        SDK registers accepted terms and makes their consent record. None defers.
    """


@hookspec
def cmi_on_delivered(report: DeliveryReport) -> None:
    """A document was delivered: its destination answered 2xx.

    Called by the delivery worker after the outcome is recorded; a notification, whose
    return values are ignored. An exception is logged and does not undo the delivery.

    :param report: a :class:`~cmi_sdk.DeliveryReport`: the document's id, terms, customer,
        destination, attempts and status.
    """


@hookspec
def cmi_on_dead_letter(report: DeliveryReport) -> None:
    """A document became a dead letter: its retries ran out, its destination is gone
    (410), or the egress guard refused the destination.

    Called by the delivery worker after the outcome is recorded; a notification, whose
    return values are ignored. The row is kept: an operator can redrive it
    (``cmi outbox redrive``).

    :param report: a :class:`~cmi_sdk.DeliveryReport`: the document's id, terms, customer,
        destination, attempts, the last status and the error.
    """


# -- customer-initiated requests: the pipeline, in the order it runs -----------------------


@hookspec
def cmi_validate_request(request: Request) -> list[str] | None:
    """Stage 1: say what is wrong with a request the firm cannot serve as it is.

    Called for every request that passed authentication and its XSD, before anything
    else. Every implementation is called; their problems are put together, and any problem
    refuses the request (``urn:cmi:problem:invalid-request``), with no offer made.

    :param request: the customer's request, as a canonical model.
    :return: problems, in words (an empty list or None when there are none).
    """


@hookspec
def cmi_verify_claims(request: Request) -> list[ClaimCheck] | None:
    """Stage 2: check the claims the customer makes (a loyalty tier, a credit band).

    Every implementation is called; each returns a verdict for the claims it knows how to
    check. Claims nobody checked count as unverified. The verdicts reach the rewards stage.

    :param request: the request, whose ``claims`` to check.
    :return: one :class:`~cmi_sdk.ClaimCheck` per claim checked.
    """


@hookspec(firstresult=True)
def cmi_check_capacity(request: Request) -> Availability | None:
    """Stage 3: is there something to sell? Stops at the first non-None result.

    Answers without reserving anything: an offer is a quote. Runs within its share of the
    request's deadline; a capacity system that does not answer in time means no offer
    (``urn:cmi:problem:capacity-timeout``).

    :param request: the request.
    :return: an :class:`~cmi_sdk.Availability`, or None when the product is not the
        plugin's (the next plugin is asked). ``available`` 0 means sold out.
    """


@hookspec(firstresult=True)
def cmi_revenue_decision(request: Request, availability: Availability) -> RevenueDecision | None:
    """Stage 4: should the firm sell this now, and at no less than what?

    Stops at the first non-None result. Runs within its budget; no answer in time, or no
    answer at all, means no offer (fail closed).

    :param request: the request.
    :param availability: what capacity found.
    :return: a :class:`~cmi_sdk.RevenueDecision`: ``accept`` and the price ``floor``
        (a bid price), which the SDK enforces on the price and the rewards.
    """


@hookspec(firstresult=True)
def cmi_price(
    request: Request, availability: Availability, decision: RevenueDecision
) -> Quote | None:
    """Stage 5: the price for this request. Stops at the first non-None result.

    The SDK refuses a quote below ``decision.floor`` (no offer is made, and the logs name
    the plugin). Runs within its budget; late means no offer.

    :param request: the request.
    :param availability: what capacity found.
    :param decision: revenue management's decision, with the floor.
    :return: a :class:`~cmi_sdk.Quote`: the line items, and the product as priced.
    """


@hookspec
def cmi_rewards(request: Request, quote: Quote, claims: list[ClaimCheck]) -> list[Reward] | None:
    """Stage 6: rewards for this customer (a loyalty discount). Every implementation is
    called.

    The SDK applies them in a fixed order, largest first, then by code, each as a negative
    line item, and stops before the price would go below the floor: a reward that does not
    fit whole is cut to fit.

    :param request: the request.
    :param quote: the price before rewards.
    :param claims: the verdicts on the request's claims (verified or not).
    :return: rewards, each with the amount it takes off.
    """


@hookspec
def cmi_advise(request: Request) -> list[Advice] | None:
    """Stage 7: recommendations to attach to the offer (another date, a better product).
    Every implementation is called; all advice is attached.

    :param request: the request.
    :return: pieces of advice.
    """


@hookspec
def cmi_offer_validity(request: Request, offer: Offer) -> dt.timedelta | None:
    """Stage 8: how long the offer may be accepted. Every implementation is called, and
    the shortest window wins; when none answers, the adapter's ``offer_validity`` (15
    minutes by default).

    :param request: the request.
    :param offer: the offer as built, with the default window.
    :return: how long from now the offer holds.
    """


@hookspec(firstresult=True)
def cmi_hold(offer: Offer, acceptance: Acceptance) -> Hold | None:
    """On acceptance: hold the inventory of the offer while it is booked.

    Stops at the first non-None result. Capacity and the revenue decision are checked
    again first. To refuse (sold out meanwhile, a limit reached), raise
    :class:`~cmi_sdk.AcceptanceError` or a subclass: the acceptance is refused with its
    ``problem`` and nothing is booked. Any other exception is an outage, logged with the
    plugin's name (:class:`~cmi_sdk.PluginFailedError`, a 5xx): nothing is booked, and a
    retry of the acceptance may book.

    :param offer: the offer accepted.
    :param acceptance: the customer's acceptance.
    :return: the :class:`~cmi_sdk.Hold`, or None when nothing needs holding.
    """


@hookspec(firstresult=True)
def cmi_book(offer: Offer, acceptance: Acceptance, hold: Hold | None) -> Transaction | None:
    """On acceptance: book the offer and return the transaction. Stops at the first
    non-None result.

    Called once per acceptance while it holds its lease: a retried acceptance, and any
    other acceptance of the same offer, gets the first one's result. Once it returns, the
    acceptance is booked: its documents are queued under the customer's terms in the
    same commit that records the booking, and a document that cannot be made is recorded
    for the operator, never answered as a failure. Should the process die inside it, the
    acceptance is recovered after its lease (``cmi_find_booking``); booking the same
    acceptance id twice should return the first booking.

    :param offer: the offer accepted.
    :param acceptance: the acceptance (with the customer's identity, if they gave it).
    :param hold: the hold taken for it, if any.
    :return: the :class:`~cmi_sdk.Transaction` booked.
    """


@hookspec(firstresult=True)
def cmi_find_booking(offer: Offer, acceptance: Acceptance) -> Transaction | None:
    """On recovery: did the firm's system book this acceptance? Stops at the first
    non-None result.

    Called for an acceptance left ``processing`` by a process that died during
    ``cmi_hold`` or ``cmi_book`` (its lease ran out), when it is retried or by a recovery
    pass (:meth:`~cmi_sdk.Adapter.recover_acceptances`, ``cmi acceptances recover``). Read
    the booking by ``acceptance.id`` from the firm's own records; never book here. A
    transaction completes the acceptance as booked (its documents queued); when no
    implementation answers (the default), nothing was booked: the hold recorded for the
    acceptance is released (``cmi_release``) and a retry books afresh. An exception is
    logged and the acceptance is tried again after another lease.

    :param offer: the offer the acceptance was for.
    :param acceptance: the acceptance as it was received, without the customer's identity
        (which goes to ``cmi_book`` and is not kept by the SDK): look the booking up by its
        ``id``.
    :return: the :class:`~cmi_sdk.Transaction` booked for it (as ``cmi_book`` returned
        it), or None when the firm's system has no booking for it (or the offer is not the
        plugin's).
    """


@hookspec
def cmi_release(offer: Offer, hold: Hold) -> None:
    """Release a hold: the booking failed. A notification.

    :param offer: the offer whose acceptance failed.
    :param hold: the hold to let go.
    """


@hookspec
def cmi_on_offer_expired(offer: Offer) -> None:
    """An offer's validity ran out without an acceptance; a notification, called when an
    acceptance of it is refused as expired.

    :param offer: the offer that expired.
    """
