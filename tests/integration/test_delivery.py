"""Delivery against a real customer's store on loopback: retries, schedules, Retry-After,
410, redirects, timeouts, revocation, leases, per-destination limits and the hooks."""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from cmi_sdk import (
    DEFAULT_PLUGINS,
    Adapter,
    DeliveryStats,
    DeliveryWorker,
    EgressGuard,
    RetrySchedule,
    hookimpl,
)
from cmi_sdk._delivery import DEFAULT_SCHEDULE, parse_retry_after
from cmi_sdk.outbox import DeliveryReport
from cmi_sdk.receiver import CustomerStore
from cmi_sdk.webhooks import WebhookVerifier, generate_secret, public_key_for
from tests.fakes import Faulty
from tests.support import emitting_adapter, register, serve_app, signer, ticket

FAST = RetrySchedule(delays=(0, 0, 0, 0, 0), jitter=0)


@dataclass
class Hooks:
    """A firm's plugin that records the delivery notifications."""

    delivered: list[DeliveryReport] = field(default_factory=list)
    dead: list[DeliveryReport] = field(default_factory=list)

    @hookimpl
    def cmi_on_delivered(self, report: DeliveryReport) -> None:
        self.delivered.append(report)

    @hookimpl
    def cmi_on_dead_letter(self, report: DeliveryReport) -> None:
        self.dead.append(report)


@dataclass
class Setup:
    adapter: Adapter
    store: CustomerStore
    secret: str
    hooks: Hooks
    faulty: Faulty
    url: str
    clock: list[float]

    def worker(self, **options: Any) -> DeliveryWorker:
        options.setdefault("schedule", FAST)
        options.setdefault("timeout", httpx.Timeout(5.0))
        return self.adapter.delivery_worker(**options)

    def stored(self) -> list[str]:
        return self.store.documents()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    secret = generate_secret()
    cert = signer().certificate.public_bytes(serialization.Encoding.PEM)
    store = CustomerStore(directory=tmp_path / "inbox", secrets=[secret], certificate=cert)
    faulty = Faulty(store.app, lambda _n: None)
    hooks = Hooks()
    clock = [time.time()]
    adapter = emitting_adapter(tmp_path, plugins=[hooks], clock=lambda: clock[0])
    with serve_app(faulty) as url:
        yield Setup(adapter, store, secret, hooks, faulty, url + "inbox", clock)


def _terms(s: Setup, **fields: Any) -> str:
    return register(s.adapter, destination=s.url, secret=s.secret, **fields).id


def test_a_document_is_delivered_signed_and_stored(setup: Setup) -> None:
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    with setup.worker() as worker:
        stats = worker.run_once()
    assert (stats.delivered, stats.retried, stats.dead) == (1, 0, 0)
    assert setup.stored() == [emission.msg_id]
    saved = setup.store.directory / f"{emission.msg_id}.xml"
    assert saved.read_bytes() == emission.document
    headers = json.loads((setup.store.directory / f"{emission.msg_id}.json").read_text())
    assert headers["webhook-id"] == emission.msg_id
    assert headers["content-type"] == "application/xml"
    assert headers["signature_verified"] is True
    row = setup.adapter.store.get_row(emission.msg_id)
    assert (row.state, row.attempts, row.last_status) == ("delivered", 1, 200)
    (report,) = setup.hooks.delivered
    assert (report.msg_id, report.attempts, report.status) == (emission.msg_id, 1, 200)
    assert setup.hooks.dead == []


def test_the_headers_follow_standard_webhooks(setup: Setup) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    with setup.worker(transport=httpx.MockTransport(handler)) as worker:
        assert worker.run_once().delivered == 1
    (request,) = seen
    assert request.headers["content-type"] == "application/xml"
    assert request.headers["webhook-id"] == emission.msg_id
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
    assert request.headers["webhook-signature"].startswith("v1,")
    WebhookVerifier(secrets=(setup.secret,)).verify(request.headers, request.content)


def test_a_receiver_failing_n_times_then_succeeding_stores_one_document(setup: Setup) -> None:
    setup.faulty.plan = lambda n: 500 if n <= 3 else None
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    with setup.worker() as worker:
        stats = worker.run_once()
    assert (stats.retried, stats.delivered) == (3, 1)
    assert setup.stored() == [emission.msg_id]
    assert setup.adapter.store.get_row(emission.msg_id).attempts == 4
    outcomes = [a.outcome for a in setup.adapter.store.attempts(emission.msg_id)]
    assert outcomes == ["retry", "retry", "retry", "delivered"]


def test_a_receiver_down_for_a_simulated_day(setup: Setup) -> None:
    start = setup.clock[0]
    setup.faulty.plan = lambda _n: 503 if setup.clock[0] < start + 86400 else None
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    schedule = RetrySchedule()  # the Standard Webhooks one, with its jitter
    with setup.worker(schedule=schedule, seed=7) as worker:
        for _ in range(20):  # bounded: at most 20 wake-ups
            worker.run_once()
            row = setup.adapter.store.get_row(emission.msg_id)
            if row.state != "retry":
                break
            assert row.next_attempt_at is not None
            setup.clock[0] = row.next_attempt_at  # sleep until the next attempt is due
    row = setup.adapter.store.get_row(emission.msg_id)
    assert row.state == "delivered"
    attempts = setup.adapter.store.attempts(emission.msg_id)
    # Immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h (all down), then 10 h later: up.
    assert [a.outcome for a in attempts] == ["retry"] * 7 + ["delivered"]
    gaps = [b.started_at - a.started_at for a, b in itertools.pairwise(attempts)]
    for gap, nominal in zip(gaps, DEFAULT_SCHEDULE, strict=True):
        assert nominal * 0.9 <= gap <= nominal * 1.1
    assert attempts[-1].started_at >= start + 86400
    assert setup.stored() == [emission.msg_id]
    assert setup.faulty.requests == 8


def test_retries_run_out_into_a_dead_letter(setup: Setup) -> None:
    setup.faulty.plan = lambda _n: 500
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    with setup.worker(schedule=RetrySchedule(delays=(0, 0), jitter=0)) as worker:
        stats = worker.run_once()
    assert (stats.retried, stats.dead) == (2, 1)
    row = setup.adapter.store.get_row(emission.msg_id)
    assert row.state == "dead"
    assert row.attempts == 3
    assert row.last_error == "HTTP 500 (after 3 attempts)"
    (report,) = setup.hooks.dead
    assert report.status == 500
    assert report.attempts == 3
    # Dead rows are kept, and an operator can redrive them.
    setup.faulty.plan = lambda _n: None
    assert setup.adapter.store.redrive(msg_id=emission.msg_id, now=setup.clock[0]) == 1
    with setup.worker() as worker:
        assert worker.run_once().delivered == 1
    assert setup.stored() == [emission.msg_id]


def test_retry_after_is_honoured(setup: Setup) -> None:
    setup.faulty.plan = lambda _n: (429, {"retry-after": "3600"})
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    with setup.worker(schedule=RetrySchedule(jitter=0)) as worker:
        worker.run_once()
    row = setup.adapter.store.get_row(emission.msg_id)
    assert row.state == "retry"
    assert row.last_status == 429
    assert row.next_attempt_at == pytest.approx(setup.clock[0] + 3600)


def test_retry_after_as_an_http_date() -> None:
    now = 1_900_000_000.0
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after("Mon, 18 Mar 2030 17:46:40 GMT", now) == 86400
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_410_disables_the_destination(setup: Setup) -> None:
    setup.faulty.plan = lambda _n: 410
    _terms(setup)
    first, second = (setup.adapter.emit(ticket(id=f"DL-{i}"))[0] for i in range(2))
    with setup.worker(batch=1) as worker:
        stats = worker.run_once()
    assert stats.dead == 2
    assert setup.faulty.requests == 1  # the second was not even tried
    assert setup.adapter.store.get_row(first.msg_id).last_status == 410
    assert "destination disabled" in (setup.adapter.store.get_row(second.msg_id).last_error or "")
    assert setup.url in setup.adapter.store.disabled_destinations()
    assert {r.msg_id for r in setup.hooks.dead} == {first.msg_id, second.msg_id}
    assert setup.adapter.store.enable_destination(setup.url)


def test_redirects_are_failures_and_never_followed(setup: Setup) -> None:
    setup.faulty.plan = lambda _n: (302, {"location": "http://127.0.0.1:9/elsewhere"})
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    with setup.worker(schedule=RetrySchedule(delays=(3600,), jitter=0)) as worker:
        stats = worker.run_once()
    assert stats.retried == 1
    row = setup.adapter.store.get_row(emission.msg_id)
    # Followed, it would have failed to connect to port 9 instead.
    assert row.last_error == "HTTP 302: redirects are not followed"


def test_timeouts_are_explicit(setup: Setup) -> None:
    setup.faulty.delay = 1.0
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    with setup.worker(
        timeout=httpx.Timeout(0.2), schedule=RetrySchedule(delays=(3600,), jitter=0)
    ) as worker:
        stats = worker.run_once()
    assert stats.retried == 1
    assert "timed out" in (setup.adapter.store.get_row(emission.msg_id).last_error or "")


def test_the_egress_guard_refuses_at_delivery_time(setup: Setup) -> None:
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    with setup.worker(egress=EgressGuard()) as worker:  # this one does not allow loopback
        assert worker.run_once().dead == 1
    row = setup.adapter.store.get_row(emission.msg_id)
    assert (row.last_error or "").startswith("egress guard:")
    assert setup.faulty.requests == 0


def test_terms_revoked_while_rows_are_queued(setup: Setup) -> None:
    setup.faulty.plan = lambda _n: 503
    terms_id = _terms(setup)
    queued = [setup.adapter.emit(ticket(id=f"DL-{i}"))[0] for i in range(3)]
    with setup.worker(schedule=RetrySchedule(delays=(0,) * 3, jitter=0)) as worker:
        worker.run_round()  # all three failed once and wait for their retry
    setup.faulty.plan = lambda _n: None
    before = setup.faulty.requests
    setup.adapter.revoke_terms(terms_id)
    with setup.worker() as worker:
        stats = worker.run_once()
    assert stats.attempts == 0
    assert setup.faulty.requests == before
    assert setup.stored() == []
    for emission in queued:
        assert setup.adapter.store.get_row(emission.msg_id).state == "cancelled"


def test_a_row_written_just_after_its_terms_were_revoked_is_cancelled(setup: Setup) -> None:
    # An emission read the terms just before the revocation committed and wrote its row
    # just after it: the revocation could not cancel a row that was not there yet.
    terms_id = _terms(setup)
    rows, _emissions, _problems = setup.adapter._emitter.prepare(
        [ticket()], connection=None, customer_refs=None
    )
    setup.adapter.revoke_terms(terms_id)
    store = setup.adapter.store
    store.insert(rows)
    with setup.worker() as worker:
        assert worker.run_once().attempts == 0
        setup.clock[0] += 3600  # any lease would have run out: nothing claims it again
        assert worker.run_once().attempts == 0
    assert setup.faulty.requests == 0
    row = store.get_row(rows[0].msg_id)
    assert (row.state, row.last_error, row.lease_owner) == ("cancelled", "terms revoked", None)


def test_pull_only_terms_never_push(setup: Setup) -> None:
    register(setup.adapter, when="pull", destination=None)
    (emission,) = setup.adapter.emit(ticket())
    assert emission.state == "pull"
    with setup.worker() as worker:
        assert worker.run_once().attempts == 0
    assert setup.faulty.requests == 0
    assert setup.adapter.store.get_row(emission.msg_id).state == "pull"


def test_concurrency_is_bounded_per_destination(setup: Setup) -> None:
    setup.faulty.delay = 0.05
    _terms(setup)
    setup.adapter.emit_many(ticket(id=f"DL-{i}") for i in range(12))
    with setup.worker(concurrency=6, per_destination=2) as worker:
        assert worker.run_once().delivered == 12
    assert setup.faulty.max_in_flight == 2
    assert len(setup.stored()) == 12


def test_a_stalled_lease_is_recovered(setup: Setup) -> None:
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    store = setup.adapter.store
    claimed = store.claim(owner="dead-worker", now=setup.clock[0], lease_seconds=30, limit=10)
    assert [r.msg_id for r in claimed] == [emission.msg_id]
    with setup.worker() as worker:
        assert worker.run_once().attempts == 0  # leased to someone else, not yet stalled
        setup.clock[0] += 31
        assert worker.run_once().delivered == 1
    assert store.get_row(emission.msg_id).attempts == 1  # the dead worker's claim is none
    assert setup.stored() == [emission.msg_id]


def test_a_heartbeat_keeps_the_lease_of_a_slow_batch(setup: Setup) -> None:
    setup.faulty.delay = 0.6
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    real = DeliveryWorker(
        store=setup.adapter.store,
        hook=setup.adapter.plugin_manager.hook,
        egress=setup.adapter.egress,
        lease_seconds=0.3,
        schedule=FAST,
    )
    thread = threading.Thread(target=real.run_round)
    thread.start()
    time.sleep(0.45)  # past the first lease, within the renewed one
    rival = real.store.claim(owner="rival", now=time.time(), lease_seconds=30, limit=10)
    thread.join(10)
    real.close()
    assert rival == []
    assert setup.adapter.store.get_row(emission.msg_id).state == "delivered"


def test_a_failing_notification_hook_does_not_undo_a_delivery(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        @hookimpl
        def cmi_on_delivered(self, report: DeliveryReport) -> None:  # noqa: ARG002
            raise RuntimeError("the firm's audit log is down")

    setup.adapter.plugin_manager.register(Broken())
    _terms(setup)
    (emission,) = setup.adapter.emit(ticket())
    with setup.worker() as worker:
        assert worker.run_once().delivered == 1
    assert setup.adapter.store.get_row(emission.msg_id).state == "delivered"
    assert "cmi_on_delivered hook failed" in caplog.text


def test_the_background_worker_delivers_and_stops(setup: Setup) -> None:
    setup.adapter.clock = time.time
    _terms(setup)
    worker = setup.adapter.delivery_worker(schedule=FAST).start(poll_interval=0.05)
    try:
        (emission,) = setup.adapter.emit(ticket())
        deadline = time.monotonic() + 10
        while not setup.stored() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        worker.stop()
    assert setup.stored() == [emission.msg_id]


def test_jitter_stays_within_its_bounds() -> None:
    schedule = RetrySchedule(delays=(100, 1000), jitter=0.2)
    rng = random.Random(1)  # noqa: S311
    delays = [schedule.next_delay(1, rng) for _ in range(200)]
    assert all(d is not None and 80 <= d <= 120 for d in delays)
    assert len(set(delays)) > 100
    assert schedule.next_delay(3, rng) is None
    assert schedule.max_attempts == 3


def test_delivery_stats_add_up() -> None:
    total = DeliveryStats(delivered=1)
    total.add(DeliveryStats(retried=2, dead=1, skipped=4))
    assert (total.attempts, total.skipped) == (4, 4)
    assert ("cmi-defaults", "cmi_sdk._default_hooks") in DEFAULT_PLUGINS


def test_an_ed25519_key_adds_a_v1a_signature(setup: Setup) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    key = "whsk_" + base64.b64encode(os.urandom(32)).decode()
    _terms(setup)
    setup.adapter.emit(ticket())
    with setup.worker(ed25519_key=key, transport=httpx.MockTransport(handler)) as worker:
        assert worker.run_once().delivered == 1
    (request,) = seen
    versions = [part.split(",")[0] for part in request.headers["webhook-signature"].split()]
    assert versions == ["v1", "v1a"]
    only_v1a = WebhookVerifier(public_keys=(public_key_for(key),))
    assert only_v1a.verify(request.headers, request.content) == request.headers["webhook-id"]


def test_metrics_in_the_prometheus_text_format(setup: Setup) -> None:
    from cmi_sdk.asgi import prometheus_text

    setup.faulty.plan = lambda n: 500 if n == 1 else None
    _terms(setup)
    setup.adapter.emit_many(ticket(id=f"DL-{i}") for i in range(2))
    setup.clock[0] += 10
    with setup.worker() as worker:
        worker.run_round()
    text = prometheus_text(setup.adapter)
    assert 'cmi_outbox_rows{state="delivered"} 1' in text
    assert 'cmi_outbox_rows{state="retry"} 1' in text
    assert 'cmi_delivery_attempts_total{outcome="retry"} 1' in text
    assert 'cmi_delivery_attempts_total{outcome="delivered"} 1' in text
    assert "cmi_outbox_dead_letters 0" in text
    age = next(line for line in text.splitlines() if line.startswith("cmi_outbox_oldest"))
    assert float(age.split()[1]) == pytest.approx(10, abs=0.5)
    # The worker's own figures: latency by outcome, outcomes by reason.
    assert 'cmi_delivery_results_total{outcome="retry",reason="5xx"} 1' in text
    assert 'cmi_delivery_results_total{outcome="delivered",reason="2xx"} 1' in text
    assert 'cmi_delivery_seconds_count{outcome="delivered"} 1' in text
    assert 'cmi_delivery_seconds_bucket{outcome="delivered",le="+Inf"} 1' in text
    assert "cmi_delivery_open_circuits 0" in text
    with serve_app(setup.adapter.asgi_app(metrics=True)) as url:
        response = httpx.get(url + "metrics", timeout=10)
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "cmi_delivery_attempts_total" in response.text
    with serve_app(setup.adapter.asgi_app()) as url:
        assert httpx.get(url + "metrics", timeout=10).status_code == 404  # off by default
