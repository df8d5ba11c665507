"""The egress guard: which destinations the SDK may deliver to (SSRF defence).

Nothing here reaches the network: names are resolved by injected resolvers, except
``localhost`` with the default one, which works offline.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmi_sdk import CMIError, ConfigurationError, InvalidInputError
from cmi_sdk.egress import (
    MAX_URL_LENGTH,
    DestinationNotAllowedError,
    EgressGuard,
    EgressResolutionError,
)

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:4700::1"


def answering(*addresses: str) -> Callable[[str, int], list[str]]:
    """A resolver that answers every name with ``addresses``."""

    def resolver(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolver


def failing(exc: OSError) -> Callable[[str, int], list[str]]:
    def resolver(host: str, port: int) -> list[str]:
        raise exc

    return resolver


def never_called(host: str, port: int) -> list[str]:
    raise AssertionError(f"resolved {host}:{port}, which should not need resolving")


def refused(guard: EgressGuard, url: str) -> str:
    """The message of the refusal ``check_url`` raises; checks the error carries the URL."""
    with pytest.raises(DestinationNotAllowedError) as info:
        guard.check_url(url)
    assert not isinstance(info.value, EgressResolutionError)
    assert info.value.url == url
    return str(info.value)


# -- check_url: accepted and normalized ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "normalized"),
    [
        (f"https://{PUBLIC_V4}/x", f"https://{PUBLIC_V4}/x"),
        (f"https://[{PUBLIC_V6}]/", f"https://[{PUBLIC_V6}]/"),
        ("https://[2606:4700:0:0:0:0:0:1]:8443/a", f"https://[{PUBLIC_V6}]:8443/a"),
        ("https://example.com", "https://example.com/"),
        ("HTTPS://Example.COM./Path?q=1&r=%20", "https://example.com/Path?q=1&r=%20"),
        ("https://example.com:443/", "https://example.com/"),
        ("https://example.com:/", "https://example.com/"),
        ("https://example.com:8443/hook", "https://example.com:8443/hook"),
        ("https://bücher.example/", "https://xn--bcher-kva.example/"),
        ("https://faß.example/", "https://xn--fa-hia.example/"),  # IDNA 2008, as httpx
        ("https://a_b.example.com/", "https://a_b.example.com/"),
        ("https://example.com//other.example/", "https://example.com//other.example/"),
    ],
)
def test_accepts_and_normalizes(url: str, normalized: str) -> None:
    assert EgressGuard(resolver=never_called).check_url(url) == normalized


# -- check_url: refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"http://{PUBLIC_V4}/", "must use https"),
        ("http://example.com/", "must use https"),
        ("ftp://example.com/", "must use https, not ftp"),
        ("file:///etc/passwd", "must use https, not file"),
        ("gopher://example.com/", "must use https, not gopher"),
        ("example.com/hook", "not absolute"),
        ("//example.com/hook", "not absolute"),
        ("https:example.com", "not absolute"),
        ("https://", "no host"),
        ("https:///hook", "no host"),
        ("https://:443/", "no host"),
        ("https://user:secret@example.com/", "credentials"),
        ("https://user@example.com/", "credentials"),
        ("https://example.com@10.0.0.1/", "credentials"),
        ("https://example.com:0/", "port"),
        ("https://example.com:65536/", "port"),
        ("https://example.com:99999999/", "port"),
        ("https://example.com:https/", "port"),
        ("https://example.com:+443/", "port"),
        ("https://example.com:٤٤٣/", "port"),  # Arabic-Indic digits pass str.isdigit()
        ("https://[2606:4700::1]:0/", "port"),
        ("https://example.com/#top", "fragment"),
        ("https://example.com/#", "fragment"),
        ("https://exa mple.com/", "whitespace"),
        ("https://example.com/\nHost: 10.0.0.1", "whitespace"),
        ("https://example.com\t/", "whitespace"),
        ("https://example.com\x00.evil/", "control"),
        ("https://example.com\\@10.0.0.1/", "backslash"),
        ("https://example.com/" + "a" * MAX_URL_LENGTH, "longer than 2048"),
        ("https://::1/", "must be in brackets"),
        ("https://[127.0.0.1]/", "cannot be parsed"),
        ("https://[::1/", "cannot be parsed"),
        ("https://[fe80::1%25eth0]/", "zone"),
        ("https://[v1.future]/", "not a valid IPv6"),
        ("https://a..example.com/", "not a valid host name"),
        ("https://-%41.example.com/", "not a valid host name"),
        ("https://" + "a" * 64 + ".example.com/", "not a valid host name"),
        ("https://ex$ample.com/", "not a valid host name"),
        ("https://intranet/", "fully qualified"),
        ("https://localhost/", "allow_loopback"),
        ("https://LOCALHOST./", "allow_loopback"),
        ("https://api.localhost/", "allow_loopback"),
        ("https://1.2.3.256/", "not a valid one"),
        ("https://1.2.3.4.5/", "not a valid one"),
        ("https://example.123/", "not a valid one"),
        ("https://09.1.1.1/", "not a valid one"),  # 09 is not octal
    ],
)
def test_refuses(url: str, reason: str) -> None:
    assert reason in refused(EgressGuard(resolver=never_called), url)


def test_length_limit_counts_characters_and_is_inclusive() -> None:
    base = "https://example.com/"
    at_limit = base + "a" * (MAX_URL_LENGTH - len(base))
    assert EgressGuard().check_url(at_limit) == at_limit
    assert "longer than" in refused(EgressGuard(), at_limit + "a")


def test_normalization_cannot_push_past_the_length_limit() -> None:
    # Each "ü" label grows when IDNA-encoded; the raw URL fits, the normalized one does not.
    base = "https://" + ".".join(["ü" * 20] * 5) + ".example/"
    url = base + "a" * (MAX_URL_LENGTH - len(base))
    assert "once normalized" in refused(EgressGuard(), url)


# -- IP literals in tricky forms are judged as the address they denote ---------------------


@pytest.mark.parametrize(
    ("url", "normalized"),
    [
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/"),
        ("http://2130706433/", "http://127.0.0.1/"),
        ("http://0x7f.1/", "http://127.0.0.1/"),
        ("http://0X7F.0.0.1/", "http://127.0.0.1/"),
        ("http://0177.0.0.1/", "http://127.0.0.1/"),
        ("http://0x7f000001/", "http://127.0.0.1/"),
        ("http://127.1/", "http://127.0.0.1/"),
        ("http://127.0.0.1./", "http://127.0.0.1/"),
        # Full-width digits and dots, which IDNA folds to ASCII.
        ("http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11/", "http://127.0.0.1/"),
        ("http://[::1]:8000/x", "http://[::1]:8000/x"),
        ("http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/"),
        ("http://localhost:8000/", "http://localhost:8000/"),
    ],
)
def test_loopback_forms_need_allow_loopback(url: str, normalized: str) -> None:
    assert EgressGuard(allow_loopback=True).check_url(url) == normalized
    assert "allow_loopback" in refused(EgressGuard(), url)
    https = "https" + url.removeprefix("http")
    assert "allow_loopback" in refused(EgressGuard(), https)


@pytest.mark.parametrize(
    "url",
    [
        "https://0/",
        "https://0.0.0.0/",
        "https://0x/",
        "https://[::]/",
        "https://[0:0:0:0:0:0:0:0]/",
    ],
)
def test_unspecified_addresses_are_refused_whatever_the_options(url: str) -> None:
    guard = EgressGuard(allow_loopback=True, allow_private=True)
    assert "unspecified" in refused(guard, url)


def test_http_is_only_for_loopback_even_with_allow_loopback() -> None:
    guard = EgressGuard(allow_loopback=True, allow_private=True)
    for url in ("http://10.0.0.1/", f"http://{PUBLIC_V4}/", "http://example.com/"):
        assert "must use https" in refused(guard, url)
    # ... while https to the same private address is what allow_private is for.
    assert guard.check_url("https://10.0.0.1/") == "https://10.0.0.1/"


@pytest.mark.parametrize(
    "url",
    ["https://10.0.0.1", "https://172.16.5.4/", "https://192.168.1.1/", "https://[fd12::1]/"],
)
def test_private_literals_need_allow_private(url: str) -> None:
    assert "allow_private" in refused(EgressGuard(), url)
    assert "allow_private" in refused(EgressGuard(allow_loopback=True), url)
    assert EgressGuard(allow_private=True).check_url(url).startswith("https://")


def test_ipv4_mapped_literals_are_judged_by_their_ipv4_address() -> None:
    message = refused(EgressGuard(), "https://[::ffff:10.0.0.1]/")
    assert "IPv4-mapped" in message
    assert "private" in message
    assert EgressGuard(allow_private=True).check_url("https://[::ffff:10.0.0.1]/") == (
        "https://[::ffff:a00:1]/"
    )
    assert "metadata" in refused(EgressGuard(), "https://[::ffff:169.254.169.254]/")
    assert EgressGuard().check_url(f"https://[::ffff:{PUBLIC_V4}]/") == (
        "https://[::ffff:5db8:d822]/"
    )


def test_nat64_literals_are_judged_by_their_ipv4_address() -> None:
    assert "NAT64" in refused(EgressGuard(), "https://[64:ff9b::10.0.0.1]/")
    assert "metadata" in refused(EgressGuard(), "https://[64:ff9b::169.254.169.254]/")
    assert EgressGuard().check_url(f"https://[64:ff9b::{PUBLIC_V4}]/") == (
        "https://[64:ff9b::5db8:d822]/"
    )
    # The local-use prefix can translate anywhere: refused whatever the options.
    guard = EgressGuard(allow_loopback=True, allow_private=True)
    assert "local-use NAT64" in refused(guard, "https://[64:ff9b:1::a00:1]/")


def test_6to4_and_teredo_literals_are_refused() -> None:
    # 2002:7f00:1:: embeds 127.0.0.1, 2002:a9fe:a9fe:: 169.254.169.254.
    for url in (
        "https://[2002:7f00:1::]/",
        "https://[2002:a9fe:a9fe::]/",
        "https://[2002:5db8:d822::]/",
    ):
        assert "6to4" in refused(EgressGuard(), url)
    assert "Teredo" in refused(EgressGuard(), "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/")


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data/",
        "https://2852039166/",  # 169.254.169.254 as one number
        "https://0xa9.0xfe.0xa9.0xfe/",
        "https://[fd00:ec2::254]/",
        "https://100.100.100.200/",
        "https://168.63.129.16/",
    ],
)
def test_cloud_metadata_is_always_refused(url: str) -> None:
    guard = EgressGuard(allow_loopback=True, allow_private=True)
    assert "metadata" in refused(guard, url)


def test_message_shows_the_address_a_tricky_form_denotes() -> None:
    assert "2130706433 (127.0.0.1) is a loopback address" in refused(
        EgressGuard(), "https://2130706433/"
    )


# -- check_address -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip",
    [PUBLIC_V4, "8.8.8.8", "1.1.1.1", PUBLIC_V6, "2001:4860:4860::8888", f"::ffff:{PUBLIC_V4}"],
)
def test_public_addresses_pass(ip: str) -> None:
    EgressGuard().check_address(ip)


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("0.0.0.0", "unspecified"),  # noqa: S104 (an address to refuse, not to bind)
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.0.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.255", "carrier-grade NAT"),
        ("198.18.0.1", "benchmarking"),
        ("198.19.255.255", "benchmarking"),
        ("2001:2::1", "benchmarking"),
        ("192.0.2.1", "documentation"),
        ("198.51.100.1", "documentation"),
        ("203.0.113.1", "documentation"),
        ("2001:db8::1", "documentation"),
        ("3fff::1", "documentation"),
        ("fec0::1", "site-local"),
        ("192.0.0.8", "IETF protocol"),
        ("192.88.99.1", "6to4"),
        ("100::1", "discard-only"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::127.0.0.1", "reserved"),  # IPv4-compatible, deprecated
        ("4000::1", "reserved"),
        ("::ffff:127.0.0.1", "IPv4-mapped address of a loopback"),
        ("::ffff:192.168.0.1", "IPv4-mapped address of a private"),
        ("::ffff:0.0.0.0", "IPv4-mapped address of an unspecified"),
        ("169.254.169.254", "metadata"),
    ],
)
def test_non_public_addresses_are_refused(ip: str, reason: str) -> None:
    with pytest.raises(DestinationNotAllowedError, match=reason) as info:
        EgressGuard().check_address(ip)
    assert info.value.url == ip


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_allow_loopback_permits_loopback_only(ip: str) -> None:
    EgressGuard(allow_loopback=True).check_address(ip)
    with pytest.raises(DestinationNotAllowedError, match="loopback"):
        EgressGuard(allow_private=True).check_address(ip)


@pytest.mark.parametrize("ip", ["10.1.2.3", "172.20.0.1", "192.168.100.1", "fd00::1"])
def test_allow_private_permits_private_only(ip: str) -> None:
    EgressGuard(allow_private=True).check_address(ip)
    with pytest.raises(DestinationNotAllowedError, match="private"):
        EgressGuard(allow_loopback=True).check_address(ip)


@pytest.mark.parametrize(
    "ip",
    ["169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16", "169.254.1.1"],
)
def test_options_never_permit_metadata_or_link_local(ip: str) -> None:
    with pytest.raises(DestinationNotAllowedError):
        EgressGuard(allow_loopback=True, allow_private=True).check_address(ip)


@pytest.mark.parametrize("text", ["", "example.com", "10.0.0", "1.2.3.4/24", "[::1]", "::g"])
def test_check_address_refuses_what_is_not_an_address(text: str) -> None:
    with pytest.raises(DestinationNotAllowedError, match="not an IP address"):
        EgressGuard().check_address(text)


# -- resolve ------------------------------------------------------------------------------


def test_resolve_returns_every_checked_address() -> None:
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return [PUBLIC_V4, PUBLIC_V6, PUBLIC_V4]

    guard = EgressGuard(resolver=resolver)
    assert guard.resolve("https://Hooks.Example.COM./x") == [PUBLIC_V4, PUBLIC_V6]
    assert guard.resolve("https://bücher.example:8443/") == [PUBLIC_V4, PUBLIC_V6]
    # The resolver sees the normalized host and the effective port.
    assert calls == [("hooks.example.com", 443), ("xn--bcher-kva.example", 8443)]


@pytest.mark.parametrize(
    "private",
    ["10.0.0.5", "127.0.0.1", "169.254.169.254", "::1", "fd00::5", "::ffff:10.0.0.5"],
)
def test_one_non_public_address_refuses_the_destination(private: str) -> None:
    for answer in ([PUBLIC_V4, private], [private, PUBLIC_V4]):
        guard = EgressGuard(resolver=answering(*answer))
        with pytest.raises(DestinationNotAllowedError) as info:
            guard.resolve("https://mixed.example.com/")
        assert not isinstance(info.value, EgressResolutionError)
        assert info.value.url == "https://mixed.example.com/"
        assert "mixed.example.com resolves to" in str(info.value)
        # The customer may read this; the firm's internal addresses stay out of it (the
        # ranges named in parentheses are public knowledge).
        assert private not in re.sub(r"\([^)]*\)", "", str(info.value))


def test_resolve_permits_what_the_options_permit() -> None:
    guard = EgressGuard(allow_private=True, resolver=answering("10.0.0.5", PUBLIC_V4))
    assert guard.resolve("https://partner.example.com/") == ["10.0.0.5", PUBLIC_V4]
    guard = EgressGuard(allow_private=True, resolver=answering("10.0.0.5", "169.254.169.254"))
    with pytest.raises(DestinationNotAllowedError, match="metadata"):
        guard.resolve("https://partner.example.com/")


@pytest.mark.parametrize(
    "exc",
    [
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        TimeoutError("timed out"),
        OSError("network unreachable"),
    ],
)
def test_resolution_failure_is_retryable(exc: OSError) -> None:
    guard = EgressGuard(resolver=failing(exc))
    with pytest.raises(EgressResolutionError, match="could not be resolved") as info:
        guard.resolve("https://gone.example.com/")
    assert info.value.url == "https://gone.example.com/"
    assert info.value.__cause__ is exc


def test_an_empty_answer_is_a_resolution_failure() -> None:
    with pytest.raises(EgressResolutionError, match="no address"):
        EgressGuard(resolver=answering()).resolve("https://empty.example.com/")


def test_a_resolver_answer_that_is_not_an_address_is_refused() -> None:
    guard = EgressGuard(resolver=answering("example.org"))
    with pytest.raises(DestinationNotAllowedError, match="not an IP address") as info:
        guard.resolve("https://odd.example.com/")
    assert not isinstance(info.value, EgressResolutionError)


def test_resolve_applies_check_url_first() -> None:
    guard = EgressGuard(resolver=never_called)
    with pytest.raises(DestinationNotAllowedError, match="must use https"):
        guard.resolve("http://example.com/")
    with pytest.raises(DestinationNotAllowedError, match="private"):
        guard.resolve("https://10.0.0.1/")


def test_an_address_in_the_url_is_not_resolved() -> None:
    guard = EgressGuard(resolver=never_called)
    assert guard.resolve(f"https://{PUBLIC_V4}/x") == [PUBLIC_V4]
    assert guard.resolve("https://[2606:4700:0::1]/") == [PUBLIC_V6]
    assert guard.resolve(f"https://{int(ipaddress.IPv4Address(PUBLIC_V4))}/") == [PUBLIC_V4]


def test_zones_in_resolver_answers_are_judged_by_the_address() -> None:
    guard = EgressGuard(resolver=answering("fe80::1%eth0"))
    with pytest.raises(DestinationNotAllowedError, match="link-local"):
        guard.resolve("https://zoned.example.com/")


def test_http_to_localhost_must_resolve_to_loopback_only() -> None:
    # A tampered hosts file must not turn the loopback allowance into plain http elsewhere.
    guard = EgressGuard(allow_loopback=True, allow_private=True, resolver=answering("10.0.0.1"))
    with pytest.raises(DestinationNotAllowedError, match="plain http"):
        guard.resolve("http://localhost:8000/")
    guard = EgressGuard(allow_loopback=True, resolver=answering("127.0.0.1", "::1"))
    assert guard.resolve("http://localhost:8000/") == ["127.0.0.1", "::1"]


def test_default_resolver_resolves_localhost_offline() -> None:
    addresses = EgressGuard(allow_loopback=True).resolve("http://localhost:8080/hook")
    assert addresses
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses)
    with pytest.raises(DestinationNotAllowedError, match="allow_loopback"):
        EgressGuard().resolve("https://localhost/")


# -- allowed_hosts -------------------------------------------------------------------------


def test_allowed_hosts_skip_the_address_check() -> None:
    resolver = answering("10.20.30.40", "127.0.0.1")
    guard = EgressGuard(allowed_hosts=frozenset({"Partner.Internal.Example."}), resolver=resolver)
    assert guard.allowed_hosts == frozenset({"partner.internal.example"})
    assert guard.resolve("https://partner.internal.example/hook") == ["10.20.30.40", "127.0.0.1"]
    assert guard.resolve("https://PARTNER.internal.example./hook") == ["10.20.30.40", "127.0.0.1"]
    # Exact match only: neither a subdomain nor a lookalike is trusted.
    for url in (
        "https://x.partner.internal.example/",
        "https://partner.internal.example.evil.com/",
    ):
        with pytest.raises(DestinationNotAllowedError, match="resolves to"):
            guard.resolve(url)
    # Trust covers the addresses, not the scheme.
    with pytest.raises(DestinationNotAllowedError, match="must use https"):
        guard.resolve("http://partner.internal.example/")


def test_allowed_hosts_never_reach_cloud_metadata() -> None:
    guard = EgressGuard(
        allowed_hosts=frozenset({"partner.internal.example", "169.254.169.254"}),
        resolver=answering("10.0.0.1", "::ffff:169.254.169.254"),
    )
    with pytest.raises(DestinationNotAllowedError, match="metadata"):
        guard.resolve("https://partner.internal.example/")
    with pytest.raises(DestinationNotAllowedError, match="metadata"):
        guard.check_url("https://169.254.169.254/")


def test_allowed_hosts_may_list_addresses_and_single_labels() -> None:
    guard = EgressGuard(
        allowed_hosts=frozenset({"10.1.2.3", "[FD00::1]", "billing-gw"}),
        resolver=answering("10.9.9.9"),
    )
    assert guard.allowed_hosts == frozenset({"10.1.2.3", "fd00::1", "billing-gw"})
    assert guard.check_url("https://10.1.2.3/") == "https://10.1.2.3/"
    assert guard.check_url("https://167838211/") == "https://10.1.2.3/"
    assert guard.check_url("https://[fd00::1]/") == "https://[fd00::1]/"
    assert guard.resolve("https://billing-gw/") == ["10.9.9.9"]
    with pytest.raises(DestinationNotAllowedError, match="private"):
        guard.check_url("https://10.1.2.4/")


@pytest.mark.parametrize("hosts", ["example.com", frozenset({"a..b"}), frozenset({"[::g]"})])
def test_bad_allowed_hosts_are_a_configuration_error(hosts: frozenset[str]) -> None:
    with pytest.raises(ConfigurationError, match="allowed_hosts"):
        EgressGuard(allowed_hosts=hosts)


# -- the errors ----------------------------------------------------------------------------


def test_errors_fit_the_tree() -> None:
    assert issubclass(EgressResolutionError, DestinationNotAllowedError)
    for base in (DestinationNotAllowedError, InvalidInputError, ValueError, CMIError):
        assert issubclass(EgressResolutionError, base)


def test_guard_is_immutable() -> None:
    guard = EgressGuard()
    with pytest.raises(AttributeError):
        guard.allow_private = True  # type: ignore[misc]


# -- properties ----------------------------------------------------------------------------

_ten = st.integers(min_value=0, max_value=2**24 - 1).map(
    lambda n: ipaddress.IPv4Address(0x0A000000 + n)
)


@given(_ten)
def test_any_address_in_10_0_0_0_8_is_refused_without_allow_private(
    addr: ipaddress.IPv4Address,
) -> None:
    guard = EgressGuard(allow_loopback=True, resolver=answering(PUBLIC_V4, str(addr)))
    with pytest.raises(DestinationNotAllowedError, match="private"):
        guard.check_address(str(addr))
    for url in (f"https://{addr}/", f"https://{int(addr)}/", f"https://[::ffff:{addr}]/"):
        with pytest.raises(DestinationNotAllowedError, match="private"):
            guard.check_url(url)
    with pytest.raises(DestinationNotAllowedError, match="private"):
        guard.resolve("https://rebind.example.com/")
    EgressGuard(allow_private=True).check_address(str(addr))


def _spellings(addr: ipaddress.IPv4Address) -> list[str]:
    """Ways the system resolver also reads ``addr``: one number, hex, octal, short forms."""
    octets = addr.packed
    return [
        str(int(addr)),
        hex(int(addr)),
        ".".join(f"0x{b:x}" for b in octets),
        ".".join(f"0{b:o}" for b in octets),
        f"{octets[0]}.{int.from_bytes(octets[1:])}",
        f"{octets[0]}.{octets[1]}.{int.from_bytes(octets[2:])}",
    ]


@given(st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address))
def test_every_spelling_of_an_address_is_judged_as_that_address(
    addr: ipaddress.IPv4Address,
) -> None:
    guard = EgressGuard(resolver=never_called)
    expected: str | None
    try:
        expected = guard.check_url(f"https://{addr}/")
    except DestinationNotAllowedError:
        expected = None
    for spelling in _spellings(addr):
        try:
            got: str | None = guard.check_url(f"https://{spelling}/")
        except DestinationNotAllowedError:
            got = None
        assert got == expected, spelling
