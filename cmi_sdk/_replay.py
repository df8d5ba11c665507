"""The message ids of requests for offers, from authentication to the commit of the answer.

One id's way through the endpoint:

1. Authenticated: :meth:`RequestIds.hold` refuses an id the replay cache remembers, or one
   being answered now in this process (a copy arriving meanwhile is refused at once, not
   after running the firm's systems), and holds it in flight.
2. Answered: the pipeline remembers the id in the commit that stores the answer's offers,
   which refuses it if a replay committed first; a request found late during that commit
   forgets it there (``OfferPipeline._keep``).
3. Over: :meth:`RequestIds.release` lets the in-flight hold go; a request refused after its
   commit forgets its id (:meth:`RequestIds.forgets`), a replay refused at the commit does
   not (the id is the original's).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from cmi_sdk._exceptions import ReplayedMessageError
from cmi_sdk.outbox import OutboxStore, SeenMessage

__all__ = ["RequestIds"]


class RequestIds:
    """The endpoint's bookkeeping of request message ids (see the module's description)."""

    def __init__(self, store: Callable[[], OutboxStore]) -> None:
        self._store = store
        self._in_flight: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def hold(self, message: SeenMessage) -> None:
        """Refuse a message id remembered already or being answered now; else hold it in
        flight until :meth:`release`.

        :raises ReplayedMessageError: the id was used.
        """
        key = (message.party, message.msg_id)
        with self._lock:
            if key in self._in_flight:
                raise ReplayedMessageError(f"message id {message.msg_id} is being answered")
            self._in_flight.add(key)
        try:
            if self._store().message_seen(message.party, message.msg_id, now=message.now):
                raise ReplayedMessageError(f"message id {message.msg_id} was already used")
        except BaseException:
            self.release(message)
            raise

    def release(self, message: SeenMessage | None) -> None:
        """The request of ``message`` is over: its id is no longer in flight."""
        if message is not None:
            with self._lock:
                self._in_flight.discard((message.party, message.msg_id))

    @staticmethod
    def forgets(message: SeenMessage | None, *, committed: bool) -> bool:
        """Whether a refused request forgets its id: only one it remembered itself, at once
        (no ``message`` held: a store without ``message_seen``) or in the commit of its
        answer; never one refused at the commit, whose id is the original's."""
        return committed or message is None
