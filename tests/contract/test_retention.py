"""Retention, for every store: finished documents go after their window, with their
attempts, oldest first and in batches; nothing that can still be sent goes."""

from __future__ import annotations

import pytest

from cmi_sdk import OutboxRowNotFoundError
from cmi_sdk.outbox import OutboxStore, RetentionStore
from tests.contract.rows import NOW, new_row, outcome


def test_finished_rows_are_purged_after_their_window(store: OutboxStore) -> None:
    assert isinstance(store, RetentionStore)
    store.insert([new_row(n) for n in range(1, 6)])
    store.claim(owner="w", now=NOW, lease_seconds=30, limit=10)
    store.complete(
        [
            outcome("msg_0001", "w", "delivered", finished_at=NOW + 1),
            outcome("msg_0002", "w", "delivered", finished_at=NOW + 2),
            outcome("msg_0003", "w", "dead", finished_at=NOW + 1),
            outcome("msg_0004", "w", "dead", finished_at=NOW + 1),
            outcome("msg_0005", "w", "retry"),
        ]
    )
    assert store.redrive(msg_id="msg_0004", now=NOW + 3) == 1  # pending again: it stays
    window = {"delivered_before": NOW + 10, "dead_before": NOW + 10}
    assert store.purgeable(delivered_before=NOW, dead_before=NOW) == {"delivered": 0, "dead": 0}
    assert store.purgeable(**window) == {"delivered": 2, "dead": 1}

    assert store.purge(**window, limit=1) == {"delivered": 1, "dead": 1}  # oldest first
    with pytest.raises(OutboxRowNotFoundError):
        store.get_row("msg_0001")
    assert store.attempts("msg_0001") == []
    assert store.get_row("msg_0002").state == "delivered"
    assert store.purge(**window, limit=10) == {"delivered": 1, "dead": 0}
    assert store.purge(**window, limit=10) == {"delivered": 0, "dead": 0}
    left = {r.msg_id: r.state for r in store.rows(limit=10)}
    assert left == {"msg_0004": "pending", "msg_0005": "retry"}
    assert [a.outcome for a in store.attempts("msg_0005")] == ["retry"]
