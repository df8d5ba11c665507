"""The façade: one :class:`Adapter` owns its plugin manager, its standards and its parser."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy
from lxml import etree
from pydantic import BaseModel

from cmi_sdk import hookspecs
from cmi_sdk._documents import Documents
from cmi_sdk._emit import Emission, Emitter, SignedConsent
from cmi_sdk._exceptions import (
    ConfigurationError,
    DocumentTooLargeError,
    DocumentTypeNotFoundError,
    DocumentValidationError,
    PluginError,
    ValidationIssue,
)
from cmi_sdk._links import DEFAULT_LINK_CODE_TTL, LinkCode, LinkRevocation, LinkService
from cmi_sdk._models import (
    TRANSACTION_KINDS,
    Acceptance,
    Link,
    Request,
    SharingTerms,
    TermsDecision,
    TermsPolicy,
    TermsProposal,
    Transaction,
    TransactionKind,
)
from cmi_sdk._offers import AcceptanceResult, Answer, OfferPipeline, Prepared
from cmi_sdk._secrets import SecretsKeyring
from cmi_sdk._standards import (
    DocumentType,
    Standard,
    StandardRegistry,
    parse_model,
)
from cmi_sdk._xml import DEFAULT_MAX_BYTES, DEFAULT_MAX_DEPTH, HardenedParser
from cmi_sdk.egress import EgressGuard
from cmi_sdk.outbox import Intermediary, OutboxRow, OutboxStore, StoredOffer

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from cmi_sdk._delivery import DeliveryMetrics, DeliveryWorker
    from cmi_sdk.signing import DocumentSigner

__all__ = ["CORE_PLUGINS", "DEFAULT_PLUGINS", "Adapter", "ValidatedDocument"]

log = logging.getLogger("cmi_sdk")

DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("cmi", "cmi_core.plugin"),
    ("cmi-defaults", "cmi_sdk._default_hooks"),
)
"""The plugins every adapter registers first, as (name, module) pairs. They are ordinary
plugins: any plugin registered later overrides them, and a user can block them by name,
apart from the core vocabulary (``CORE_PLUGINS``)."""

CORE_PLUGINS: frozenset[str] = frozenset({"cmi"})
"""The plugins no adapter works without: ``cmi`` is the core vocabulary (requests, offers,
acceptances, terms) that the endpoint and the request pipeline speak, so blocking it is
refused when the adapter is built rather than failing at the first request."""

DEFAULT_DATABASE_URL = "sqlite:///./cmi.db"
"""Where the embedded store lives unless told otherwise: ``cmi.db`` in the working folder."""


@dataclass(frozen=True, slots=True)
class ValidatedDocument:
    """A document that passed its schema.

    :ivar standard: the standard it belongs to.
    :ivar document_type: its document type.
    :ivar tree: the parsed tree (parse it again only if you need a fresh copy).
    :ivar xml: the bytes that were validated.
    """

    standard: Standard
    document_type: DocumentType[Any]
    tree: etree._ElementTree
    xml: bytes

    @property
    def withheld(self) -> tuple[str, ...]:
        """The fields the customer's terms withheld from this document (empty: complete)."""
        return tuple(str(self.tree.getroot().get("withheld", "")).split())

    def to_model(self) -> BaseModel:
        """The document's canonical model.

        :raises DocumentValidationError: for rules the XSD cannot express, such as an amount
            finer than its currency allows; and for a minimized document, which has no
            complete canonical model.
        """
        if self.withheld:
            issue = ValidationIssue(
                "a minimized document has no complete canonical model: fields withheld under"
                f" the customer's terms: {' '.join(self.withheld)}",
                "/@withheld",
                self.tree.getroot().sourceline,
            )
            raise DocumentValidationError(
                [issue],
                document=self.xml,
                standard=self.standard.name,
                document_type=self.document_type.name,
            )
        model: BaseModel = parse_model(self.standard, self.document_type, self.tree, self.xml)
        return model


REQUIRED_TO_ANSWER: dict[str, str] = {
    "cmi_revenue_decision": "no-revenue-decision",
    "cmi_price": "no-price",
}
"""The hooks a firm that answers requests must implement, with the problem every request
gets without them."""


class Adapter:
    """The firm's side of customer-managed interactions: one per process is typical.

    :param plugins: extra plugin objects (modules, classes or instances with hook
        implementations), registered after the default and entry-point plugins so that
        theirs win.
    :param entry_points: load the plugins installed under the ``cmi_sdk`` entry-point group.
    :param block: names of plugins never to register (default or entry-point ones); the
        core vocabulary ``cmi`` cannot be blocked.
    :param max_document_bytes: the cap on incoming documents.
    :param max_depth: the nesting limit for incoming documents.
    :param store: where terms, consent records and the outbox live; by default a
        :class:`~cmi_sdk.outbox.sqlite.SQLiteStore` at ``database_url``, opened on first use
        (an adapter that only renders never creates a database).
    :param database_url: the default store's location, ``sqlite:///./cmi.db`` unless given.
    :param signer: signs every emitted document and consent record (XML-DSig); without
        one, documents go out unsigned and a warning is logged once.
    :param firm: the firm's identifier, as consent records name it.
    :param policy: the terms the firm accepts, published at ``/.well-known/cmi``.
    :param egress: the egress guard for customers' destinations (public https only, by
        default).
    :param webhook_ed25519_key: a ``whsk_`` key: deliveries also carry a ``v1a``
        signature, whose public key ``/.well-known/cmi`` publishes.
    :param secrets_keyring: seal the webhook and intermediary secrets the default store
        keeps (encryption at rest; see :class:`~cmi_sdk.SecretsKeyring`). A store given
        as ``store`` takes its own keyring.
    :param clock: POSIX seconds; tests inject one.
    :param request_budget: seconds the firm's systems have to answer a request without a
        ``respond_by`` (shared among the pipeline's stages).
    :param offer_validity: how long an offer holds when no ``cmi_offer_validity``
        implementation says.
    :param transaction_kinds: the kinds of transaction the firm emits (``flight``,
        ``bank_statement_line``, ``loan``, ``purchase``); every kind by default. Terms
        whose document type can express none of them are refused when proposed.
    :param acceptance_lease: seconds an acceptance being booked is held by the process
        booking it (5 minutes by default): it must outlast ``cmi_hold`` and ``cmi_book``
        together. An acceptance whose process died is recovered once it runs out.
    :raises PluginError: a plugin failed to load, implements an unknown ``cmi_`` hook, or
        registers a standard that clashes with another.
    :raises ConfigurationError: ``block`` names the core vocabulary; or a plugin answers
        requests (``cmi_check_capacity``) but none implements ``cmi_revenue_decision`` or
        ``cmi_price`` (see :meth:`missing_hooks`).
    """

    def __init__(
        self,
        *,
        plugins: Iterable[object] = (),
        entry_points: bool = True,
        block: Iterable[str] = (),
        max_document_bytes: int = DEFAULT_MAX_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
        store: OutboxStore | None = None,
        database_url: str = DEFAULT_DATABASE_URL,
        signer: DocumentSigner | None = None,
        firm: str = "firm.example",
        policy: TermsPolicy | None = None,
        egress: EgressGuard | None = None,
        webhook_ed25519_key: str | None = None,
        secrets_keyring: SecretsKeyring | None = None,
        clock: Callable[[], float] = time.time,
        request_budget: float = 2.0,
        offer_validity: dt.timedelta = dt.timedelta(minutes=15),
        transaction_kinds: Iterable[TransactionKind] | None = None,
        acceptance_lease: float = 300.0,
    ) -> None:
        block = tuple(block)
        if core := sorted(CORE_PLUGINS.intersection(block)):
            raise ConfigurationError(
                f"{', '.join(map(repr, core))} cannot be blocked: the SDK speaks the core"
                " vocabulary itself (requests, offers, acceptances, terms); block other plugins"
                " or override its hooks with a plugin of your own"
            )
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        for name in block:
            self._pm.set_blocked(name)
        for name, module in DEFAULT_PLUGINS:
            if not self._pm.is_blocked(name):
                self._register(_import(name, module), name)
        if entry_points:
            try:
                self._pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
            except Exception as exc:
                raise PluginError(f"an entry-point plugin failed to load: {exc}") from exc
        for plugin in plugins:
            self._register(plugin, None)
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc), plugin=self._pm.get_name(exc.plugin)) from exc
        if missing := self.missing_hooks():
            raise ConfigurationError(
                "the firm answers requests for offers (cmi_check_capacity:"
                f" {', '.join(self._implementers('cmi_check_capacity'))}), but no plugin"
                f" implements {' or '.join(missing)}: every request would be refused"
                f" ({', '.join(REQUIRED_TO_ANSWER[h] for h in missing)}). Implement"
                " them (docs: Connect your systems)"
            )
        self.parser = HardenedParser(max_bytes=max_document_bytes, max_depth=max_depth)
        """The hardened parser for every incoming document."""
        self.standards = StandardRegistry()
        """The standards the plugins registered."""
        self._pm.hook.cmi_register_standards(register=self.standards)
        self.documents = Documents(standards=self.standards, parser=self.parser, signer=signer)
        """The one document pipeline: render, validate, minimize and sign."""
        self._store = store
        self._owns_store = store is None
        """Whether the adapter opens its store (at ``database_url``) and so closes it."""
        self._store_lock = threading.Lock()
        self.delivery_metrics: DeliveryMetrics | None = None
        """The figures of the delivery workers this adapter made (``/metrics``); None
        until it makes one."""
        self.database_url = database_url
        """The default store's location (unused when a store was given)."""
        self.webhook_ed25519_key = webhook_ed25519_key
        self._keyring = secrets_keyring
        self.clock = clock
        """The adapter's clock, POSIX seconds."""
        self._emitter = Emitter(
            hook=self._pm.hook,
            standards=self.standards,
            store=lambda: self.store,
            documents=self.documents,
            egress=egress or EgressGuard(),
            policy=policy or TermsPolicy(),
            firm=firm,
            clock=clock,
            transaction_kinds=_kinds(transaction_kinds),
        )
        self._links = LinkService(store=lambda: self.store, emitter=self._emitter, clock=clock)
        self._offers = OfferPipeline(
            hook=self._pm.hook,
            store=lambda: self.store,
            documents=self.documents,
            prepare=lambda tx, ref, intermediary: self._emitter.prepare(
                [tx], connection=None, customer_refs=[ref], intermediary=intermediary
            ),
            firm=firm,
            clock=clock,
            default_budget=request_budget,
            default_validity=offer_validity,
            acceptance_lease=acceptance_lease,
        )

    def _register(self, plugin: object, name: str | None) -> None:
        try:
            self._pm.register(plugin, name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}") from exc

    def _implementers(self, hook: str) -> list[str]:
        caller: pluggy.HookCaller = getattr(self._pm.hook, hook)
        return [impl.plugin_name for impl in caller.get_hookimpls()]

    def missing_hooks(self) -> list[str]:
        """The hooks a firm that answers requests for offers must implement, and does not.

        A firm answers requests when a plugin implements ``cmi_check_capacity``; then
        ``cmi_revenue_decision`` and ``cmi_price`` must be implemented too, or every request
        is refused (fail closed). An adapter that only emits documents needs neither. The
        adapter refuses to be built with one missing; this says which, for plugins
        registered later through :attr:`plugin_manager`.
        """
        if not self._implementers("cmi_check_capacity"):
            return []
        return [hook for hook in REQUIRED_TO_ANSWER if not self._implementers(hook)]

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The adapter's own pluggy plugin manager (for inspection and tests)."""
        return self._pm

    def plugin_names(self) -> list[str]:
        """The names of the registered plugins, in registration order."""
        return [name for name, _ in self._pm.list_name_plugin()]

    @property
    def store(self) -> OutboxStore:
        """The store of terms, consent records and the outbox (opened on first use)."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = open_store(self.database_url, keyring=self._keyring)
        return self._store

    @property
    def signer(self) -> DocumentSigner | None:
        """What signs documents and consent records, if anything."""
        return self.documents.signer

    @property
    def firm(self) -> str:
        """The firm's identifier."""
        return self._emitter.firm

    @property
    def egress(self) -> EgressGuard:
        """The egress guard for customers' destinations."""
        return self._emitter.egress

    @property
    def policy(self) -> TermsPolicy:
        """The terms the firm accepts, with the standards it offers filled in."""
        return self._emitter.effective_policy()

    # -- emission -------------------------------------------------------------------------

    def emit(
        self,
        transaction: Transaction,
        *,
        connection: object | None = None,
        customer_refs: Sequence[str] | None = None,
    ) -> list[Emission]:
        """Emit ``transaction`` to every customer it concerns, under each one's terms.

        For each active set of terms: select the standard (``cmi_select_standard``),
        render, validate, minimize to the fields the terms allow, sign, and write an outbox
        row. A customer without terms gets nothing (logged, not raised); revoked or lapsed
        terms get nothing.

        A customer may hold several terms (OFX for bank lines, a UBL invoice for purchases,
        the ticket for flights): the transaction goes out under those whose document type
        expresses its kind, and the others are skipped (logged). A document that cannot be
        made for one set of terms (a mapping, render or validation error) never fails the
        call: it is logged and kept as an :class:`~cmi_sdk.outbox.EmissionProblem` for the
        operator (``cmi outbox problems``; in the same transaction as the rows when
        ``connection`` is given), and the customer's other terms get their documents.

        :param connection: the firm's own database connection, with its transaction open:
            the rows are written inside it, and commit or roll back with the firm's write.
            Without one, the rows are committed at once in the adapter's store.
        :param customer_refs: the customers the transaction concerns (a payer and a
            traveller, say); by default its ``customer_ref``. Each gets a document of their
            own, carrying their own reference.
        :return: one :class:`Emission` per document written (empty when nobody has terms).
        :raises ConfigurationError: ``connection`` is not to the store's database.
        :raises StoreError: the store failed.
        """
        return self._emitter.emit([transaction], connection=connection, customer_refs=customer_refs)

    def emit_many(
        self, transactions: Iterable[Transaction], *, connection: object | None = None
    ) -> list[Emission]:
        """Emit many transactions with one commit (a group commit): all rows or none."""
        return self._emitter.emit(list(transactions), connection=connection, customer_refs=None)

    def propose_terms(
        self, proposal: TermsProposal, *, intermediary: str | None = None
    ) -> TermsDecision:
        """Answer terms a customer proffers: accepted (registered, with a signed consent
        record), one alternative, or rejected (see ``cmi_review_terms``).

        :param intermediary: the registered intermediary proffering them for the customer.
        :raises TermsError: the terms name a standard, document type or field the firm does
            not have, a document type that expresses none of the kinds of transaction the
            firm emits (:attr:`transaction_kinds`), or lapse in the past.
        :raises DestinationNotAllowedError: the egress guard refuses the destination.
        """
        return self._emitter.propose(proposal, intermediary=intermediary)

    def revoke_terms(self, terms_id: str) -> SignedConsent:
        """Revoke terms: nothing more goes out under them, including documents still
        waiting in the outbox. Returns the signed consent record of the revocation.

        :raises TermsNotFoundError: no such terms.
        :raises TermsError: already revoked.
        """
        return self._emitter.revoke(terms_id)[0]

    def get_terms(self, terms_id: str) -> SharingTerms:
        """The terms with that id (revoked or not).

        :raises TermsNotFoundError: no such terms.
        """
        return self.store.get_terms(terms_id)

    def list_terms(
        self, *, customer_ref: str | None = None, include_revoked: bool = False
    ) -> list[SharingTerms]:
        """Registered terms, oldest first."""
        return self.store.list_terms(customer_ref=customer_ref, include_revoked=include_revoked)

    # -- service links --------------------------------------------------------------------

    def create_link_code(
        self, account: str, *, ttl: dt.timedelta = DEFAULT_LINK_CODE_TTL
    ) -> LinkCode:
        """A code for the signed-in customer of ``account`` to give one intermediary:
        single-use, redeemable within ``ttl`` (at most a day), kept only as a hash. Call it
        only for the customer who holds the account: the code lets an intermediary act
        for them (see the "Customers, links and pseudonyms" guide).

        :param account: the firm's own id for the customer (it never leaves the firm);
            the ``customer_ref`` of the transactions the firm emits for them.
        :raises LinkError: ``account`` does not fit a reference, or ``ttl`` is out of range.
        """
        return self._links.create_code(account, ttl=ttl)

    def redeem_link_code(self, code: str, *, intermediary: str) -> Link:
        """Redeem a link code for ``intermediary`` (what ``POST /cmi/links`` does): the
        customer's new link, whose ``customer_ref`` is the intermediary's reference for
        them, random and pairwise.

        :raises LinkError: the code is unknown, used or expired (one error for all three).
        """
        return self._links.redeem(code, intermediary=intermediary)

    def links(
        self,
        *,
        account: str | None = None,
        intermediary: str | None = None,
        include_revoked: bool = False,
    ) -> list[Link]:
        """Service links, oldest first: an account's, an intermediary's, or all."""
        return self.store.links(
            account=account, intermediary=intermediary, include_revoked=include_revoked
        )

    def get_link(self, link_id: str) -> Link:
        """The link with that id (revoked or not).

        :raises LinkNotFoundError: no such link.
        """
        return self.store.get_link(link_id)

    def revoke_link(self, link_id: str) -> LinkRevocation:
        """Revoke a link: the account's documents stop going to it, and every terms of its
        reference is revoked (each with a signed consent record) with their undelivered
        documents cancelled, in one transaction.

        :raises LinkNotFoundError: no such link.
        :raises LinkError: already revoked.
        """
        return self._links.revoke(link_id)

    # -- intermediaries and secrets -------------------------------------------------------

    def add_intermediary(self, name: str, secret: str) -> None:
        """Register an intermediary with its ``whsec_`` secret, or add a secret to it (kept
        with the others, with no end). A revoked intermediary registered again keeps only
        this secret.

        :raises ConfigurationError: the secret is not a Standard Webhooks secret."""
        from cmi_sdk.webhooks import WebhookVerifier  # noqa: PLC0415

        WebhookVerifier(secrets=(secret,))  # refuses a malformed secret
        self.store.add_intermediary(name, secret, at=self.clock())

    def rotate_intermediary(
        self, name: str, *, grace: dt.timedelta = dt.timedelta(hours=24), secret: str | None = None
    ) -> str:
        """Give an intermediary a new secret, and return it (the only time it is shown):
        requests signed with its other secrets are taken until ``grace`` has passed, then
        refused.

        :param secret: the new secret; by default a fresh random one.
        :raises IntermediaryNotFoundError: no such intermediary, or it is revoked.
        :raises ConfigurationError: ``secret`` is not a Standard Webhooks secret, or the
            grace is negative."""
        from cmi_sdk.webhooks import WebhookVerifier, generate_secret  # noqa: PLC0415

        if grace < dt.timedelta(0):
            raise ConfigurationError("the grace window cannot be negative")
        new = generate_secret() if secret is None else secret
        WebhookVerifier(secrets=(new,))
        now = self.clock()
        self.store.rotate_intermediary(name, new, at=now, grace_until=now + grace.total_seconds())
        return new

    def revoke_intermediary(self, name: str) -> bool:
        """Refuse every request of the intermediary from now on (the endpoint checks on
        each request), forget its secrets, and revoke its links and every terms it
        registered (each with a signed consent record; their undelivered documents are
        cancelled): it chose those terms' secrets, which sign pulls. False when it was
        revoked already (what a revocation left unrevoked is revoked again).

        :raises IntermediaryNotFoundError: no such intermediary."""
        revoked = self.store.revoke_intermediary(name, at=self.clock())
        self._links.revoke_intermediary(name)
        return revoked

    def intermediaries(self) -> list[Intermediary]:
        """The registered intermediaries, revoked ones too, by name."""
        return self.store.list_intermediaries()

    def reseal_secrets(self) -> int:
        """Seal every secret the store keeps with its keyring's first key: secrets stored
        before encryption at rest was switched on, and those sealed with an older key.
        Returns how many rows changed.

        :raises ConfigurationError: no secrets key is configured, or a secret does not
            open with the configured keys."""
        return self.store.reseal_secrets()

    # -- requests, offers, acceptances ---------------------------------------------------

    def answer_request(self, request: Request, *, intermediary: str | None = None) -> Answer:
        """Run the firm's systems on a customer's request and answer with signed offers.

        The pipeline (see :mod:`cmi_sdk.hookspecs`): validate, verify claims, capacity,
        revenue decision, price (never below the floor), rewards, advice, validity; then
        the offer is built, signed and stored. Nothing is reserved: an offer is a quote.

        :return: the :class:`~cmi_sdk.OfferSet` and its signed ``offers`` document; an
            answer without offers says why (``declined``).
        :raises RequestRefusedError: a plugin found the request invalid, or its
            ``respond_by`` has passed: no offer is made.
        :raises FirmSystemError: a stage missed its share of the deadline, a plugin failed
            or none answered: no offer is made (fail closed).
        """
        return self._offers.answer(request, intermediary=intermediary)

    async def answer_request_async(
        self, prepare: Callable[[], Prepared | tuple[Any, ...]]
    ) -> Answer:
        """:meth:`answer_request` for an event loop (the endpoint's): ``prepare``, which
        returns the :class:`~cmi_sdk.Prepared` request (the request, the intermediary and,
        optionally, the signed message it came in), runs on the pipeline's worker thread
        before it, so a request costs the loop one hand-off (none when
        :attr:`answers_inline`: then both run on the loop); the message id is remembered
        (replay cache) in the commit that stores the offers.

        .. deprecated:: a ``prepare`` returning a tuple ``(request, intermediary[,
           message])`` is still taken in this release; return a ``Prepared``."""
        return await self._offers.answer_async(prepare)

    @property
    def answers_inline(self) -> bool:
        """Whether requests are answered on the caller's thread (the endpoint's event
        loop included) rather than handed to a worker thread: every implementation of the
        pipeline's hooks is marked :func:`~cmi_sdk.nonblocking` and the store's offer
        calls never wait on a network. :attr:`threaded_by` says what stands in the way."""
        return self._offers.runs_inline()

    @property
    def threaded_by(self) -> list[str]:
        """What sends requests to worker threads: each unmarked implementation of a
        pipeline hook, as ``plugin.hook``, and ``store`` when the store may wait on a
        network. Empty when :attr:`answers_inline`."""
        return self._offers.threaded_by()

    def accept_offer(
        self, offer_id: str, acceptance: Acceptance, *, intermediary: str | None = None
    ) -> AcceptanceResult:
        """Accept an offer: capacity and price are checked again, inventory is held
        (``cmi_hold``), the booking made (``cmi_book``), and the booking recorded with its
        documents queued under the customer's terms, in one commit.

        An offer is accepted at most once. A retry with the same acceptance id gets the
        first result and books nothing more; another acceptance of the same offer gets the
        booking's answer too when it comes through the same intermediary (the offer's
        customer), else an ``already-accepted`` refusal that names nothing of the other.
        Once booked, the answer is booked: a document that cannot be made is recorded for
        the operator (see :meth:`emit`), never answered as a failure.

        While one process books, the acceptance holds a lease (``acceptance_lease``); if
        the process dies, a retry after the lease, or :meth:`recover_acceptances`, asks
        the firm's system (``cmi_find_booking``) and completes the booking, or releases
        the hold so that the retry books.

        :raises OfferNotFoundError: no such offer.
        :raises OfferExpiredError: the offer's window is over.
        :raises AcceptanceError: no longer available, refused by the firm's systems
            (``problem`` says which), ``already-accepted`` or ``acceptance-in-progress``.
        :raises FirmSystemError: the firm's systems failed (``not-booked`` when the booking
            did); nothing was booked, and a retry may book.
        """
        return self._offers.accept(offer_id, acceptance, intermediary=intermediary)

    def recover_acceptances(self, *, limit: int = 100) -> dict[str, int]:
        """Recover acceptances whose booking process died (their lease ran out): completed
        as booked when ``cmi_find_booking`` finds the booking (documents queued), else
        released (the hold let go) for a retry to book. Returns how many went each way,
        ``{"booked": n, "released": m}``. Run it from a periodic job or
        ``cmi acceptances recover``, where the firm's booking plugins are registered:
        without a ``cmi_find_booking`` implementation, every stalled acceptance is taken as
        not booked. A retried acceptance recovers its own at once."""
        return self._offers.recover(limit=limit)

    @property
    def transaction_kinds(self) -> tuple[str, ...]:
        """The kinds of transaction the firm emits: terms must be able to express one."""
        return self._emitter.transaction_kinds

    def get_offer(self, offer_id: str) -> StoredOffer:
        """An offer made, with its request and signed document.

        :raises OfferNotFoundError: no such offer.
        """
        return self.store.get_offer(offer_id)

    def offer_document(self, offer_id: str) -> bytes:
        """The offer alone as a signed ``cmi`` ``offer`` document.

        :raises OfferNotFoundError: no such offer.
        """
        return self.documents.render_signed(
            self.store.get_offer(offer_id).offer, standard="cmi", document_type="offer"
        )

    def render_signed(
        self, model: BaseModel, *, standard: str, document_type: str | None = None
    ) -> bytes:
        """Render ``model`` (validated against the XSD) and sign it with the adapter's
        signer; unsigned when there is none (see :meth:`Documents.render_signed`)."""
        return self.documents.render_signed(model, standard=standard, document_type=document_type)

    def _document_headers(self, row: OutboxRow) -> dict[str, str]:
        return self.documents.delivery_headers(
            row.body, standard=row.standard, document_type=row.document_type, name=row.msg_id
        )

    def delivery_worker(self, **options: Any) -> DeliveryWorker:
        """A :class:`~cmi_sdk.DeliveryWorker` for this adapter's outbox; ``options`` go to
        its constructor (concurrency, timeouts, retry schedule, ...)."""
        from cmi_sdk._delivery import DeliveryMetrics, DeliveryWorker  # noqa: PLC0415

        if self.delivery_metrics is None:
            self.delivery_metrics = DeliveryMetrics()
        options.setdefault("metrics", self.delivery_metrics)
        options.setdefault("egress", self.egress)
        options.setdefault("document_headers", self._document_headers)
        options.setdefault("ed25519_key", self.webhook_ed25519_key)
        options.setdefault("clock", self.clock)
        options.setdefault("digests", self._emitter.merge_due_digests)
        return DeliveryWorker(store=self.store, hook=self._pm.hook, **options)

    def asgi_app(self, **options: Any) -> Starlette:
        """The firm's endpoint as a Starlette app (see :func:`cmi_sdk.asgi.create_app`)."""
        from cmi_sdk.asgi import create_app  # noqa: PLC0415

        return create_app(self, **options)

    def lifespan(
        self, *, deliver: bool = True, close: bool = True, **worker_options: Any
    ) -> Callable[[object], AbstractAsyncContextManager[None]]:
        """A lifespan for the firm's Starlette or FastAPI app that mounts the endpoint:
        ``FastAPI(lifespan=adapter.lifespan())``. A mounted app's own lifespan is not run
        by its host, so the host's runs this one.

        At startup it starts the delivery worker (a background thread; ``worker_options``
        go to :meth:`delivery_worker`, ``poll_interval`` to its ``start``); at shutdown it
        stops the worker, letting deliveries in flight finish, and closes the adapter.

        :param deliver: start a delivery worker (False: the firm runs ``cmi deliver``
            elsewhere).
        :param close: close the adapter at shutdown.
        """
        options = dict(worker_options)
        poll_interval = float(options.pop("poll_interval", 1.0))

        @contextlib.asynccontextmanager
        async def lifespan(_app: object) -> AsyncIterator[None]:
            worker = None
            if deliver:
                worker = self.delivery_worker(**options).start(poll_interval=poll_interval)
            try:
                yield
            finally:
                try:
                    if worker is not None:
                        # Stopping waits for deliveries in flight: not on the event loop.
                        await asyncio.to_thread(worker.stop)
                finally:
                    if close:
                        self.close()

        return lifespan

    def close(self) -> None:
        """Stop the adapter's worker threads (the request pipeline's) and close the store
        the adapter opened at ``database_url``.

        A store the caller passed in (``store=``) is left open: the caller opened it, may
        share it with other adapters, and closes it."""
        self._offers.close()
        if self._owns_store and self._store is not None:
            self._store.close()

    def now(self) -> dt.datetime:
        """The adapter's clock as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    # -- documents -----------------------------------------------------------------------

    def render(
        self,
        model: BaseModel,
        *,
        standard: str,
        document_type: str | None = None,
        validate: bool = True,
    ) -> bytes:
        """Render ``model`` as a document of ``standard`` and return its UTF-8 bytes.

        :param model: a canonical model: Transaction, Request, Offer or Acceptance.
        :param standard: the standard's name, such as ``cmi-ticket``.
        :param document_type: required when the standard has several document types.
        :param validate: check the result against the document type's XSD (the default).
        :raises StandardNotFoundError: no such standard.
        :raises DocumentTypeNotFoundError: no such document type.
        :raises MappingError: the document type cannot express this model.
        :raises RenderError: a value holds a character XML 1.0 cannot carry.
        :raises DocumentValidationError: the result breaks the schema (a plugin bug).
        """
        return self.documents.render(
            model, standard=standard, document_type=document_type, validate=validate
        )

    def validate(
        self,
        xml: bytes,
        *,
        standard: str | None = None,
        document_type: str | None = None,
    ) -> ValidatedDocument:
        """Parse ``xml`` with the hardened parser and validate it against its schema.

        With no ``standard``, the document type is found from the root element.

        :raises XMLInputError: the bytes were refused before validation (too large,
            malformed, a DTD, too deep).
        :raises NotFoundError: no installed standard knows this document.
        :raises DocumentValidationError: the document breaks the schema; ``issues`` says
            where and why.
        """
        other = self._not_xml(xml, standard, document_type)
        if other is not None:
            # A document type that is not XML (OFX 1's SGML): read by its own hardened
            # reader, under the same byte cap, then validated as any other.
            std, doc_type = other
            if len(xml) > self.parser.max_bytes:
                raise DocumentTooLargeError(
                    f"the document is over the {self.parser.max_bytes}-byte cap",
                    limit=self.parser.max_bytes,
                )
            assert doc_type.reader is not None  # noqa: S101  (_not_xml found it so)
            tree = doc_type.reader(xml).getroottree()
        else:
            tree = self.parser.parse(xml)
            std, doc_type = self._identify(tree, standard, document_type)
        self.documents.check(tree.getroot(), xml, standard=std, document_type=doc_type)
        return ValidatedDocument(std, doc_type, tree, xml)

    def parse(
        self,
        xml: bytes,
        *,
        standard: str | None = None,
        document_type: str | None = None,
    ) -> BaseModel:
        """Validate ``xml`` (see :meth:`validate`) and return its canonical model.

        :raises DocumentValidationError: also for rules the XSD cannot express, such as an
            amount finer than its currency allows.
        """
        return self.validate(xml, standard=standard, document_type=document_type).to_model()

    def _not_xml(
        self, xml: bytes, standard: str | None, document_type: str | None
    ) -> tuple[Standard, DocumentType[Any]] | None:
        """The document type that is not XML these bytes are to be read as, if any: the one
        named, or the one whose documents start as they do."""
        if standard is not None and document_type is not None:
            std = self.standards.get(standard)
            doc_type = std.document_type(document_type)
            return (std, doc_type) if doc_type.reader is not None else None
        found = self.standards.for_magic(xml)
        if found is None or (standard is not None and found[0].name != standard):
            return None
        return found

    def _identify(
        self, tree: etree._ElementTree, standard: str | None, document_type: str | None
    ) -> tuple[Standard, DocumentType[Any]]:
        root = str(tree.getroot().tag)
        if standard is None:
            std, doc_type = self.standards.for_root(root)
            if document_type is not None and document_type != doc_type.name:
                raise DocumentTypeNotFoundError(
                    f"the document is a {std.name} {doc_type.name}, not a {document_type}"
                )
            return std, doc_type
        std = self.standards.get(standard)
        if document_type is not None:
            doc_type = std.document_type(document_type)
        else:
            found = [d for d in std.document_types if d.root == root]
            if not found:
                raise DocumentTypeNotFoundError(
                    f"standard {std.name!r} has no document whose root element is {root}"
                )
            doc_type = found[0]
        return std, doc_type


def open_store(url: str, *, keyring: SecretsKeyring | None = None) -> OutboxStore:
    """The store a database URL names: ``sqlite:///path.db`` (the embedded default) or
    ``postgresql://...`` (the scale-out store; ``pip install 'cmi-sdk[postgres]'``), whose
    tables live in the schema ``cmi`` unless the URL says ``?schema=NAME``;
    ``?ordered_by_customer=1`` delivers each customer's documents to a destination in
    order. Other query parameters go to libpq.

    :param keyring: seals the secrets the store keeps (see :class:`~cmi_sdk.SecretsKeyring`).
    :raises ConfigurationError: another scheme, or the PostgreSQL driver is missing.
    """
    if url.startswith("sqlite:"):
        from cmi_sdk.outbox.sqlite import SQLiteStore  # noqa: PLC0415

        return SQLiteStore.from_url(url, keyring=keyring)
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        try:
            from cmi_sdk.outbox.postgres import PostgresStore  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigurationError(
                f"the PostgreSQL store needs psycopg: pip install 'cmi-sdk[postgres]' ({exc})"
            ) from None
        base, _, query = url.partition("?")
        options = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
        store_options: dict[str, Any] = {"keyring": keyring}
        if "schema" in options:  # several stores in one database (tests, tenants)
            store_options["schema"] = options.pop("schema")
        if "ordered_by_customer" in options:  # each customer's documents in order
            store_options["ordered_by_customer"] = options.pop("ordered_by_customer") in {
                "1",
                "true",
                "yes",
            }
        rest = "&".join(f"{k}={v}" for k, v in options.items())
        target = f"{base}?{rest}" if rest else base
        return PostgresStore.from_url(target, **store_options)
    raise ConfigurationError(
        f"no store for {url!r}: use sqlite:///path.db or postgresql://user@host/db"
    )


def _kinds(kinds: Iterable[str] | None) -> tuple[str, ...]:
    """The transaction kinds a firm emits, checked: every kind when None."""
    if kinds is None:
        return TRANSACTION_KINDS
    chosen = tuple(dict.fromkeys(kinds))
    unknown = [k for k in chosen if k not in TRANSACTION_KINDS]
    if unknown or not chosen:
        raise ConfigurationError(
            f"transaction_kinds takes one or more of {', '.join(TRANSACTION_KINDS)},"
            f" not {', '.join(unknown) or 'none'}"
        )
    return chosen


def _import(name: str, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PluginError(f"default plugin {name!r} ({module}) is missing: {exc}") from exc
