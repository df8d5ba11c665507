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

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import datetime

    from cmi_sdk._models import Transaction
    from cmi_sdk._standards import StandardRegistry
    from cmi_sdk._terms import SharingTerms, TermsDecision, TermsPolicy, TermsProposal
    from cmi_sdk.outbox import DeliveryReport

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "cmi_sdk"
"""The pluggy project name, and the entry-point group plugins are published under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks a hook specification (for this module only)."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a function or method as a hook implementation."""


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

    :param report: the document's id, terms, customer, destination, attempts and status.
    """


@hookspec
def cmi_on_dead_letter(report: DeliveryReport) -> None:
    """A document became a dead letter: its retries ran out, its destination is gone
    (410), or the egress guard refused the destination.

    Called by the delivery worker after the outcome is recorded; a notification, whose
    return values are ignored. The row is kept: an operator can redrive it
    (``cmi outbox redrive``).

    :param report: the document's id, terms, customer, destination, attempts, the last
        status and the error.
    """
