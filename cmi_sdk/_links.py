"""Service links: how a customer lets one intermediary act for them at the firm.

The firm knows a customer by its own account id, which never leaves the firm. While the
customer is signed in, the firm's code asks for a *link code* (:meth:`Adapter.create_link_code
<cmi_sdk.Adapter.create_link_code>`): short-lived, single-use, high-entropy, kept by the
store only as a hash. The customer gives it to their intermediary, which redeems it with a
signed ``POST /cmi/links`` and receives a ``customer_ref`` of its own for the customer::

    firm (customer signed in) ── create_link_code(account) ──▶ code (10 min, once)
    customer ── code ──▶ intermediary ── POST /cmi/links {"code"} ──▶ firm
    firm ──▶ Link(account, intermediary, customer_ref: random, pairwise)

The reference is *pairwise*: random, different for every link, not derived from the
account id, so two intermediaries cannot tell that they serve the same customer. References
are scoped by intermediary: ``(intermediary, customer_ref)`` names a customer, and the same
string under another intermediary names another customer (or nobody). A document for an
account goes to the firm's direct terms for it and to the terms of its active links, each
carrying that link's reference; nothing else. This follows the service-link model of
MyData and the pairwise identifiers of Kantara's consent receipts.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cmi_sdk._exceptions import LinkError, TermsError
from cmi_sdk._models import Link, _pseudonymous, utc_at

if TYPE_CHECKING:
    from cmi_sdk._emit import Emitter, SignedConsent
    from cmi_sdk.outbox import OutboxStore

__all__ = [
    "DEFAULT_LINK_CODE_TTL",
    "LinkCode",
    "LinkRevocation",
    "LinkService",
    "link_code_hash",
]

log = logging.getLogger("cmi_sdk.links")

DEFAULT_LINK_CODE_TTL = dt.timedelta(minutes=10)
"""How long a link code can be redeemed unless the firm says otherwise."""

_MAX_LINK_CODE_TTL = dt.timedelta(days=1)
_CODE_PREFIX = "lc_"
# 160 random bits in base32 (lower case, no padding): 32 characters a customer can copy.
_CODE = re.compile(r"lc_[a-z2-7]{32}")
_REFUSED = "the link code is unknown, used or expired"
_INTERMEDIARY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}")  # an Identifier


@dataclass(frozen=True, slots=True)
class LinkCode:
    """A link code, as the firm hands it to its signed-in customer.

    :ivar code: the code itself (shown once: the store keeps only its hash).
    :ivar account: the account it links.
    :ivar expires_at: after this it cannot be redeemed.
    """

    code: str = field(repr=False)
    account: str
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class LinkRevocation:
    """What revoking a link did.

    :ivar link: the link, revoked.
    :ivar consents: the signed consent record of each of its terms' revocation.
    :ivar cancelled: how many undelivered documents were cancelled.
    """

    link: Link
    consents: tuple[SignedConsent, ...]
    cancelled: int


def link_code_hash(code: str) -> str:
    """What the store keeps of a code: its SHA-256, in hex. The code holds 160 random bits,
    so a plain hash cannot be reversed by trying codes."""
    return hashlib.sha256(code.encode()).hexdigest()


def _new_code() -> str:
    return _CODE_PREFIX + base64.b32encode(secrets.token_bytes(20)).decode().lower()


class LinkService:
    """Link codes and links of one adapter (built by the adapter)."""

    def __init__(
        self,
        *,
        store: Callable[[], OutboxStore],
        emitter: Emitter,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._emitter = emitter
        self._clock = clock

    def create_code(self, account: str, *, ttl: dt.timedelta) -> LinkCode:
        """A fresh code for ``account``, redeemable once within ``ttl``."""
        try:  # the firm's documents for the account carry it: it must fit a reference
            _pseudonymous(account)
        except ValueError as exc:
            raise LinkError(f"account {account!r}: {exc}") from None
        if not dt.timedelta(0) < ttl <= _MAX_LINK_CODE_TTL:
            raise LinkError(f"a link code lives more than 0 and at most {_MAX_LINK_CODE_TTL}")
        now = self._clock()
        code = _new_code()
        expires = now + ttl.total_seconds()
        self._store().add_link_code(
            link_code_hash(code), account, created_at=now, expires_at=expires
        )
        log.info("link code created for an account, valid until %s", utc_at(expires))
        return LinkCode(code=code, account=account, expires_at=utc_at(expires))

    def redeem(self, code: str, *, intermediary: str) -> Link:
        """Turn ``code`` into a link of ``intermediary`` with a fresh pairwise reference."""
        if not isinstance(code, str) or not _CODE.fullmatch(code):
            raise LinkError(_REFUSED)  # the same answer as for a well-formed unknown code
        if not _INTERMEDIARY.fullmatch(intermediary):
            raise LinkError(f"{intermediary!r} is not an intermediary's name")
        link = self._store().redeem_link_code(
            link_code_hash(code),
            intermediary=intermediary,
            link_id=f"link_{secrets.token_hex(10)}",
            # 128 random bits: nothing of the account, nothing shared with another link.
            customer_ref=f"cus_{secrets.token_hex(16)}",
            now=self._clock(),
        )
        if link is None:
            raise LinkError(_REFUSED)
        log.info("link %s redeemed by intermediary %s", link.id, intermediary)
        return link

    def revoke(self, link_id: str) -> LinkRevocation:
        """Revoke the link and every terms of its reference, each with a signed consent
        record, in one transaction; their undelivered documents are cancelled."""
        store = self._store()
        link = store.get_link(link_id)
        if link.revoked_at is not None:
            raise LinkError(f"link {link_id} is already revoked")
        now = utc_at(self._clock())
        terms = store.list_terms(customer_ref=link.customer_ref, intermediary=link.intermediary)
        consents = [self._emitter.consent(t, "revoked", now) for t in terms]
        cancelled, late = store.revoke_link(
            link_id, now.timestamp(), [(c.record, c.xml) for c in consents]
        )
        # Terms the customer revoked on their own meanwhile keep their own record.
        consents = [
            c
            for c in consents
            if any(r.id == c.record.id for r, _ in store.consent_records(c.record.terms_id))
        ]
        # Terms registered for the reference while this ran: the link is revoked, so they
        # reach nothing of the account's; revoke them too, as the customer asked.
        for terms_id in late:
            try:
                consent, more = self._emitter.revoke(terms_id)
            except TermsError:
                continue  # revoked meanwhile by someone else
            consents.append(consent)
            cancelled += more
        log.info(
            "link %s revoked: %d terms revoked, %d undelivered documents cancelled",
            link_id,
            len(consents),
            cancelled,
        )
        return LinkRevocation(
            link=store.get_link(link_id), consents=tuple(consents), cancelled=cancelled
        )

    def revoke_intermediary(self, intermediary: str) -> tuple[int, int]:
        """Revoke every active link of ``intermediary`` and every terms it registered (for
        links or its own pseudonyms), each with a signed consent record; how many links
        and how many terms outside them were revoked.

        The intermediary chose each of its terms' secrets, and a terms secret signs the
        customer's pulls (``cmi-terms``): while its terms stand, a revoked intermediary
        could still pull, and its destinations still be pushed to."""
        store = self._store()
        links = terms = 0
        for link in store.links(intermediary=intermediary):
            try:
                self.revoke(link.id)
            except LinkError:
                continue  # revoked meanwhile
            links += 1
        for found in store.list_terms(intermediary=intermediary):
            try:
                self._emitter.revoke(found.id)
            except TermsError:
                continue  # revoked meanwhile
            terms += 1
        log.info(
            "intermediary %s revoked: %d links and %d other terms revoked",
            intermediary,
            links,
            terms,
        )
        return links, terms
