"""How long finished records are kept: the windows the delivery worker and
``cmi outbox purge`` turn into the times a :class:`~cmi_sdk.outbox.RetentionStore` purges
before, and the rule that keeps a purged offer from being booked through its old
acceptance.

An offer's id comes from the intermediary's request id, so once an offer is purged the
same request id may be answered with an offer of the same id. An acceptance records when
it was made; one made well before the offer it names was made for the purged one, and is
refused (:data:`ACCEPTANCE_SKEW`). That holds while an acceptance outlives its purge by
more than the skew it is allowed, hence :data:`MIN_OFFER_WINDOW`.
"""

from __future__ import annotations

from cmi_sdk._exceptions import ConfigurationError

__all__ = [
    "ACCEPTANCE_SKEW",
    "MIN_OFFER_WINDOW",
    "RETAINED",
    "check_offer_windows",
    "check_windows",
    "purge_windows",
]

RETAINED = {
    "delivered": "delivered",
    "dead": "dead",
    "pull": "pull-only",
    "merged": "merged into digests",
    "cancelled": "cancelled",
    "offers": "offers",
    "acceptances": "acceptances",
    "seen": "message ids",
    "attempts": "attempts of delivered documents",
    "problems": "emission problems",
}
"""The kinds a purge counts, with the words ``cmi outbox purge`` says them in."""

ACCEPTANCE_SKEW = 3600.0
"""Seconds an acceptance may say it was made before its offer was (the two clocks differ);
earlier, it was made for another offer that had the same id."""

MIN_OFFER_WINDOW = 86400.0
"""The shortest an expired offer or a finished acceptance is kept (a day): far longer
than :data:`ACCEPTANCE_SKEW` plus any clock's error."""


def check_windows(*windows: float | None) -> None:
    """Refuse a window that is no length: negative, or NaN (a NaN time reaches the store,
    where PostgreSQL sorts it above every number and the purge deletes every row of its
    kind). None keeps; infinity keeps too.

    :raises ConfigurationError: one is."""
    if any(w is not None and not w >= 0 for w in windows):
        raise ConfigurationError("retention windows must be numbers of seconds, >= 0")


def check_offer_windows(*windows: float | None) -> None:
    """Refuse an offer or acceptance window shorter than :data:`MIN_OFFER_WINDOW`.

    :raises ConfigurationError: one is."""
    if any(w is not None and not w >= MIN_OFFER_WINDOW for w in windows):
        raise ConfigurationError(
            "offers and acceptances must be kept at least a day (86400 seconds)"
        )


def purge_windows(
    now: float,
    *,
    delivered: float | None,
    dead: float | None,
    offers: float | None,
    acceptances: float | None,
    attempts: float | None,
) -> dict[str, float]:
    """The times :meth:`~cmi_sdk.outbox.RetentionStore.purge` deletes before, at ``now``,
    for windows in seconds (None: that kind is kept). Message ids go once expired.

    The ``delivered`` window (the pull window) is every finished document's but a dead
    letter's: a pull-only document's from when it was written (it could be pulled from
    then), a document merged into a digest's from the merge (its content went out in the
    digest document, itself kept for the pull window once delivered), a cancelled one's
    from its cancellation (nobody may pull it: pulls under revoked terms are refused; it
    shows the operator what a revocation stopped, and the consent records keep the
    revocation itself). Each is also the time a document emitted again is stored
    afresh, so one window keeps that the same for all of them. Emission problems (each
    keeps its transaction, for the operator to emit again) go after the ``dead``
    window.

    :raises ConfigurationError: a window is negative or NaN (see :func:`check_windows`)."""

    check_windows(delivered, dead, offers, acceptances, attempts)

    def before(window: float | None) -> float:
        return 0.0 if window is None else now - window

    return {
        "delivered_before": before(delivered),
        "dead_before": before(dead),
        "pull_before": before(delivered),
        "merged_before": before(delivered),
        "cancelled_before": before(delivered),
        "offers_before": before(offers),
        # An offer goes only with its acceptances: with them kept, so is it.
        "acceptances_before": before(acceptances),
        "seen_before": now,
        "attempts_before": before(attempts),
        # The operator's to-do list, as dead letters are: kept as long.
        "problems_before": before(dead),
    }
