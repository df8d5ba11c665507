"""The delivery engine's parts: its timeouts, its resolver, its metrics."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from cmi_sdk import ConfigurationError
from cmi_sdk._delivery import DeliveryMetrics, Timeouts, _PinnedResolver


def test_timeouts_from_httpx_and_numbers() -> None:
    assert Timeouts.of(None) == Timeouts(connect=5.0, read=10.0, total=30.0)
    assert Timeouts.of(2) == Timeouts(connect=2.0, read=2.0, total=2.0)
    # CMI_HTTP_TIMEOUT's shape: connect, then write and read; the total bounds all three.
    assert Timeouts.of(httpx.Timeout(10.0, connect=5.0)) == Timeouts(5.0, 10.0, 25.0)
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ConfigurationError):
            Timeouts(connect=bad)


def test_the_resolver_answers_only_what_the_guard_checked() -> None:
    pins = {("store.example", 443): ("203.0.113.7", "2001:db8::7")}
    resolver = _PinnedResolver(pins)
    found = asyncio.run(resolver.resolve("store.example", 443))
    assert [(r["hostname"], r["host"], r["port"]) for r in found] == [
        ("store.example", "203.0.113.7", 443),
        ("store.example", "2001:db8::7", 443),
    ]
    # Another port of the same host, or a host never checked: no address at all, no DNS.
    for host, port in (("store.example", 8443), ("elsewhere.example", 443)):
        with pytest.raises(OSError, match="not been checked"):
            asyncio.run(resolver.resolve(host, port))


def test_metrics_count_outcomes_and_bucket_latency() -> None:
    metrics = DeliveryMetrics()
    metrics.observe("delivered", "2xx", 0.08)
    metrics.observe("delivered", "2xx", 3.0)
    metrics.observe("retry", "circuit open", None)  # sent nothing: counted, not timed
    text = "\n".join(metrics.prometheus_lines())
    assert 'cmi_delivery_seconds_bucket{outcome="delivered",le="0.1"} 1' in text
    assert 'cmi_delivery_seconds_bucket{outcome="delivered",le="5"} 2' in text
    assert 'cmi_delivery_seconds_count{outcome="delivered"} 2' in text
    assert 'cmi_delivery_seconds_sum{outcome="delivered"} 3.080000' in text
    assert 'cmi_delivery_results_total{outcome="retry",reason="circuit open"} 1' in text
    assert 'outcome="retry",le=' not in text
