"""The egress guard: where the SDK may deliver documents.

Customers choose the URLs their documents go to, so without a guard a customer could point a
delivery at ``http://169.254.169.254/`` or ``https://10.0.0.5/admin`` and turn the firm into a
proxy into its own network (server-side request forgery). :class:`EgressGuard` accepts only
``https`` destinations whose addresses are public, with opt-ins for tests, demos and partners
on private networks.

Two checks, two moments:

- :meth:`EgressGuard.check_url` is static (no DNS): run it when a customer registers a
  destination, so a bad URL is refused while they are still there to fix it.
- :meth:`EgressGuard.resolve` resolves the host and checks every address: run it right before
  each delivery. A name that resolved to a public address yesterday may resolve to a private
  one today (DNS rebinding). :meth:`EgressGuard.pin` returns the checked addresses with the
  normalized URL, and the delivery engine connects only to those addresses (its client
  never resolves a name itself), so the answer that was checked is the one connected to.

The delivery client never follows redirects: a public host could otherwise answer ``302
Location: http://10.0.0.5/`` and send the request where the guard would not.

Resolution failure raises :class:`EgressResolutionError`, which delivery treats as retryable
(the name may work later); any other :class:`DestinationNotAllowedError` is permanent.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple
from urllib.parse import urlsplit

import idna

from cmi_sdk._exceptions import (
    ConfigurationError,
    DestinationNotAllowedError,
    EgressResolutionError,
)

__all__ = [
    "MAX_URL_LENGTH",
    "DestinationNotAllowedError",
    "EgressGuard",
    "EgressResolutionError",
    "PinnedDestination",
]

MAX_URL_LENGTH = 2048
"""The longest destination URL accepted, in characters (after normalization too)."""

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_PORTS: Final = {"https": 443, "http": 80}
_HOST_CHARACTERS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


_Kind = Literal["loopback", "private", "metadata"]


class _Verdict(NamedTuple):
    """Why an address is refused; ``kind`` tells the opt-ins that may overrule it."""

    what: str
    kind: _Kind | None = None


class _Range(NamedTuple):
    verdict: _Verdict
    networks: tuple[_Network, ...]


def _range(what: str, *networks: str, kind: _Kind | None = None) -> _Range:
    return _Range(_Verdict(what, kind), tuple(ipaddress.ip_network(n) for n in networks))


# Addresses refused whatever the opt-ins: each serves the cloud instance its credentials.
# 169.254.169.254 is AWS, GCP, Azure, Oracle, DigitalOcean; fd00:ec2::254 is AWS over IPv6
# (inside fc00::/7, which allow_private would otherwise permit); 100.100.100.200 is Alibaba;
# 168.63.129.16 is Azure's WireServer (a public address, reachable only from inside Azure).
_METADATA: Final = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)

# The first match wins. Kept explicit rather than left to ``is_global`` alone: the stdlib's
# tables changed across patch releases (CVE-2024-4032), and some non-public ranges (multicast)
# count as global there.
_RANGES: Final = (
    # Connecting to 0.0.0.0 reaches the local host on Linux, like loopback (RFC 1122, 4291).
    _range("an unspecified address (0.0.0.0/8, ::)", "0.0.0.0/8", "::/128"),
    _range(
        "a loopback address (127.0.0.0/8, ::1), permitted only with CMI_ALLOW_LOOPBACK=1"
        " (allow_loopback=True in Python)",
        "127.0.0.0/8",
        "::1/128",
        kind="loopback",
    ),
    # RFC 1918 and unique local addresses (RFC 4193).
    _range(
        "a private address (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7),"
        " permitted only with allow_private=True",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
        kind="private",
    ),
    _range("a link-local address (169.254.0.0/16, fe80::/10)", "169.254.0.0/16", "fe80::/10"),
    _range("a multicast address (224.0.0.0/4, ff00::/8)", "224.0.0.0/4", "ff00::/8"),
    # Shared address space (RFC 6598): inside a provider's network, never on the internet.
    _range("a carrier-grade NAT address (100.64.0.0/10)", "100.64.0.0/10"),
    _range("a benchmarking address (198.18.0.0/15, 2001:2::/48)", "198.18.0.0/15", "2001:2::/48"),
    # RFC 5737, RFC 3849 and RFC 9637.
    _range(
        "a documentation address"
        " (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, 3fff::/20)",
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "2001:db8::/32",
        "3fff::/20",
    ),
    _range("a site-local address (fec0::/10, deprecated)", "fec0::/10"),
    # Teredo embeds an obfuscated client address behind a relay the guard cannot judge.
    _range("a Teredo tunnel address (2001::/32)", "2001::/32"),
    _range("an IETF protocol assignment (192.0.0.0/24, 2001::/23)", "192.0.0.0/24", "2001::/23"),
    # 6to4 (RFC 7526 deprecates it) routes to whatever IPv4 address it embeds, 127.0.0.1 and
    # 169.254.169.254 included; refused whole rather than judged by that address.
    _range("a 6to4 address (2002::/16, 192.88.99.0/24, deprecated)", "2002::/16", "192.88.99.0/24"),
    # Local-use NAT64 (RFC 8215) translates to any IPv4 address the operator's gateway picks.
    _range("a local-use NAT64 address (64:ff9b:1::/48)", "64:ff9b:1::/48"),
    _range("a discard-only address (100::/64)", "100::/64"),
    # 240.0.0.0/4 includes the limited broadcast address 255.255.255.255.
    _range("a reserved address (240.0.0.0/4)", "240.0.0.0/4"),
)

_GLOBAL_UNICAST: Final = ipaddress.IPv6Network("2000::/3")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix
_METADATA_VERDICT: Final = _Verdict("a cloud metadata service address", "metadata")


def _classify(addr: _IPAddress) -> _Verdict | None:
    """Why ``addr`` is not a public destination, or None when it is."""
    if addr in _METADATA:
        return _METADATA_VERDICT
    if isinstance(addr, ipaddress.IPv6Address):
        # These carry an IPv4 address that is what the connection really reaches: with
        # DNS64, every IPv4-only public host appears inside 64:ff9b::/96.
        embedded = addr.ipv4_mapped
        label = "an IPv4-mapped address of"
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
            label = "a NAT64 address of"
        if embedded is not None:
            inner = _classify(embedded)
            return None if inner is None else _Verdict(f"{label} {inner.what}", inner.kind)
    for rng in _RANGES:
        if any(addr in net for net in rng.networks):
            return rng.verdict
    if isinstance(addr, ipaddress.IPv6Address) and addr not in _GLOBAL_UNICAST:
        return _Verdict("a reserved address (IPv6 outside 2000::/3)")
    if not addr.is_global:
        return _Verdict("an address that is not globally reachable")
    return None


def _parse_address(text: str) -> _IPAddress:
    # A zone (fe80::1%eth0) only picks an interface; the address decides the range.
    return ipaddress.ip_address(text.partition("%")[0])


def _is_loopback(addr: _IPAddress) -> bool:
    verdict = _classify(addr)
    return verdict is not None and verdict.kind == "loopback"


class _RefusedError(Exception):
    """A reason to refuse a URL, raised by the parsing helpers; the message says why."""


def _parse_ipv4_number(part: str) -> int:
    # inet_aton's forms, which resolvers and the WHATWG URL standard both accept: 0x-prefixed
    # hexadecimal, 0-prefixed octal, otherwise decimal.
    if part.startswith("0x"):
        digits, base, allowed = part[2:], 16, "0123456789abcdef"
    elif len(part) > 1 and part.startswith("0"):
        digits, base, allowed = part[1:], 8, "01234567"
    else:
        digits, base, allowed = part, 10, "0123456789"
    if not all(c in allowed for c in digits) or (base == 10 and not digits):
        raise ValueError(part)
    return int(digits, base) if digits else 0


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address ``host`` (lowercase ASCII) denotes if it ends in a number, else None.

    ``2130706433``, ``0x7f.1``, ``0177.0.0.1`` and ``127.1`` all mean 127.0.0.1 to the system
    resolver, so they are judged as that address, not as names.
    """
    parts = host.split(".")
    last = parts[-1]
    ends_in_number = last.isdigit() or (
        last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:])
    )
    if not ends_in_number:
        return None
    malformed = _RefusedError(f"{host} looks like an IPv4 address but is not a valid one")
    if len(parts) > 4:
        raise malformed
    try:
        numbers = [_parse_ipv4_number(p) for p in parts]
    except ValueError:
        raise malformed from None
    # Each part but the last is one byte; the last fills the bytes that remain.
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise malformed
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _normalize_name(text: str) -> str:
    """``text`` as a lowercase ASCII host name without the root's trailing dot."""
    if text.isascii():
        name = text.lower()
    else:
        try:
            # IDNA 2008 with UTS #46 mapping, as httpx and browsers encode names; the mapping
            # also folds full-width digits and dots, so the IPv4 check comes after it.
            name = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise _RefusedError(f"{text} is not a valid internationalized host name") from exc
    name = name.removesuffix(".")  # example.com. is example.com, named from the root
    if not name:
        raise _RefusedError("the URL has no host")
    labels = name.split(".")
    if len(name) > 253 or not all(
        0 < len(label) <= 63 and set(label) <= _HOST_CHARACTERS for label in labels
    ):
        raise _RefusedError(f"{text} is not a valid host name")
    return name


def _normalize_host(text: str) -> tuple[str, _IPAddress | None]:
    """``text`` (a name or an IPv4 address in any form) as its normal form and address."""
    name = _normalize_name(text)
    ip = _parse_ipv4(name)
    return (name, None) if ip is None else (ip.compressed, ip)


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class PinnedDestination(NamedTuple):
    """A destination as the egress guard checked it (:meth:`EgressGuard.pin`)."""

    url: str
    """The URL normalized (:meth:`EgressGuard.check_url`): what to send the request to."""
    host: str
    """The host: lowercase A-labels, or an address without brackets."""
    port: int
    addresses: tuple[str, ...]
    """Every address the host resolved to, each checked: the only ones to connect to."""


class _Target(NamedTuple):
    url: str  # normalized
    scheme: str
    host: str  # lowercase A-labels, or the canonical address without brackets
    port: int
    ip: _IPAddress | None


@dataclass(frozen=True)
class EgressGuard:
    """Decides whether the SDK may deliver to a destination URL.

    By default only ``https`` to public addresses is accepted.

    :param allow_loopback: for tests and demos: permits loopback addresses (127.0.0.0/8, ::1,
        ``localhost``), and plain ``http``, but only to those.
    :param allow_private: permits private addresses (10.0.0.0/8, 172.16.0.0/12,
        192.168.0.0/16, fc00::/7), still over ``https`` only. Cloud metadata addresses stay
        refused.
    :param allowed_hosts: host names the operator trusts although they resolve to non-public
        addresses (a partner reached over a private link); their addresses are not checked,
        except that cloud metadata addresses stay refused. Matched exactly after
        normalization (case, IDNA, a trailing dot); an IP address may be listed too.
    :param resolver: ``resolver(host, port)`` returns the host's addresses as strings and
        raises :class:`OSError` when it cannot; defaults to :func:`socket.getaddrinfo`.
        Injectable so tests need no DNS.
    :raises ConfigurationError: ``allowed_hosts`` holds something that is not a host.
    """

    allow_loopback: bool = False
    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    resolver: Callable[[str, int], list[str]] | None = None

    def __post_init__(self) -> None:
        hosts: Iterable[str] = self.allowed_hosts
        if isinstance(hosts, str):
            # frozenset("example.com") would silently allow single letters.
            raise ConfigurationError("allowed_hosts must be a collection of host names")
        normalized = set()
        for entry in hosts:
            try:
                normalized.add(self._normalize_allowed(entry))
            except (_RefusedError, ValueError) as exc:
                raise ConfigurationError(f"allowed_hosts: {exc}") from None
        object.__setattr__(self, "allowed_hosts", frozenset(normalized))

    @staticmethod
    def _normalize_allowed(entry: str) -> str:
        bare = entry.removeprefix("[").removesuffix("]")
        if ":" in bare:
            return ipaddress.IPv6Address(bare).compressed
        return _normalize_host(entry)[0]

    def check_url(self, url: str) -> str:
        """Check ``url`` without resolving it; return it normalized.

        Normalized means: lowercase scheme and host, the host in IDNA ASCII form without a
        trailing dot, an IPv4 address in any form (``2130706433``, ``0x7f.1``) written
        dotted, an IPv6 address compressed, the default port dropped, an empty path as
        ``/``. Deliver to the returned URL, so that what is connected to is what was checked.

        :param url: the destination, as the customer gave it.
        :raises DestinationNotAllowedError: the URL is not absolute, not ``https`` (or
            ``http`` to loopback under ``allow_loopback``), holds credentials, a fragment,
            whitespace or a backslash, has no host or a bad port, is longer than
            :data:`MAX_URL_LENGTH`, or its host is an address :meth:`check_address` refuses,
            a ``localhost`` name or a single label (``intranet``, which the resolver would
            complete with the firm's search domains) not in ``allowed_hosts``. The message
            says which.
        """
        return self._target(url).url

    def check_address(self, ip: str) -> None:
        """Check one IP address (IPv4, or IPv6 without brackets; a ``%zone`` is ignored).

        Refused: unspecified (0.0.0.0/8, ::), loopback (unless ``allow_loopback``), private
        (unless ``allow_private``), link-local, multicast, carrier-grade NAT (100.64.0.0/10),
        benchmarking, documentation, site-local, Teredo, 6to4, IETF protocol assignments,
        reserved, anything else the stdlib calls not global, and cloud metadata addresses
        (whatever the options). IPv4-mapped (``::ffff:a.b.c.d``) and NAT64
        (``64:ff9b::a.b.c.d``) addresses are judged by the IPv4 address they carry.

        :param ip: the address.
        :raises DestinationNotAllowedError: the address is refused or is not an address;
            its ``url`` is ``ip``.
        """
        try:
            addr = _parse_address(ip)
        except ValueError:
            raise DestinationNotAllowedError(f"{ip!r} is not an IP address", url=ip) from None
        reason = self._refusal(addr)
        if reason is not None:
            raise DestinationNotAllowedError(f"{ip} is {reason}", url=ip)

    def resolve(self, url: str) -> list[str]:
        """Check ``url``, resolve its host and check every address; return the addresses.

        One refused address refuses the whole destination, so a DNS answer that mixes a
        public address with a private one cannot slip the private one through. An IP
        address in the URL is returned as it is, without resolving. For a host in
        ``allowed_hosts`` only cloud metadata addresses are refused.

        Messages name the host but not a refused address: they may reach the customer who
        chose the URL, and with split-horizon DNS the address would map the firm's network
        for them.

        :param url: the destination, as the customer gave it.
        :returns: the addresses, in the resolver's order, without duplicates.
        :raises EgressResolutionError: the host could not be resolved, or resolved to no
            address: retryable.
        :raises DestinationNotAllowedError: :meth:`check_url` refuses the URL, or an address
            is refused: permanent.
        """
        return list(self.pin(url).addresses)

    def pin(self, url: str) -> PinnedDestination:
        """Check ``url``, resolve its host and check every address, like :meth:`resolve`,
        and return what a client needs to connect to exactly what was checked: the
        normalized URL, its host and port, and the addresses.

        A client that resolves the host again may get another answer (DNS rebinding: a
        public address for the check, a private one for the connection). Connect to one
        of :attr:`PinnedDestination.addresses` instead, and keep the host name for the
        ``Host`` header and TLS (SNI and certificate verification).

        :raises EgressResolutionError: as :meth:`resolve`.
        :raises DestinationNotAllowedError: as :meth:`resolve`.
        """
        target = self._target(url)
        if target.ip is not None:
            # check_url has judged it
            return PinnedDestination(target.url, target.host, target.port, (target.ip.compressed,))
        resolver = self.resolver or _system_resolver
        try:
            answers = resolver(target.host, target.port)
        except OSError as exc:
            raise EgressResolutionError(
                f"{target.host} could not be resolved: {exc}", url=url
            ) from exc
        if not answers:
            raise EgressResolutionError(f"{target.host} resolved to no address", url=url)
        addresses: dict[str, None] = {}  # ordered, without duplicates
        for text in answers:
            try:
                addr = _parse_address(text)
            except ValueError:
                raise DestinationNotAllowedError(
                    f"the resolver answered {target.host} with something that is not an IP address",
                    url=url,
                ) from None
            reason = self._refusal(addr, trusted=target.host in self.allowed_hosts)
            if reason is not None:
                raise DestinationNotAllowedError(f"{target.host} resolves to {reason}", url=url)
            if target.scheme == "http" and not _is_loopback(addr):
                raise DestinationNotAllowedError(
                    f"plain http is accepted only to loopback addresses, and {target.host}"
                    " resolves to another",
                    url=url,
                )
            addresses[str(addr)] = None
        return PinnedDestination(target.url, target.host, target.port, tuple(addresses))

    def _refusal(self, addr: _IPAddress, *, trusted: bool = False) -> str | None:
        """Why ``addr`` is refused under this guard's options, or None when it is not.

        :param trusted: the host is in ``allowed_hosts``: only metadata addresses count.
        """
        verdict = _classify(addr)
        if verdict is None or (trusted and verdict.kind != "metadata"):
            return None
        if (verdict.kind == "loopback" and self.allow_loopback) or (
            verdict.kind == "private" and self.allow_private
        ):
            return None
        return verdict.what

    def _target(self, url: str) -> _Target:
        try:
            return self._parse(url)
        except _RefusedError as exc:
            raise DestinationNotAllowedError(str(exc), url=url) from None

    def _parse(self, url: str) -> _Target:
        scheme, netloc, path, query = _split_url(url)
        host_text, host, ip, port = _split_netloc(netloc, scheme)
        allowed = host in self.allowed_hosts
        if ip is None and not allowed:
            if host == "localhost" or host.endswith(".localhost"):
                # RFC 6761: these names are the local machine, whatever DNS says.
                if not self.allow_loopback:
                    raise _RefusedError(
                        f"{host} names the firm's own machine, permitted only with"
                        " CMI_ALLOW_LOOPBACK=1 (allow_loopback=True in Python)"
                    )
            elif "." not in host:
                # The resolver completes a single label with its search domains: internal.
                raise _RefusedError(f"the host must be a fully qualified name, not {host}")
        if ip is not None:
            reason = self._refusal(ip, trusted=allowed)
            if reason is not None:
                shown = host if host_text in (host, f"{host}.") else f"{host_text} ({host})"
                raise _RefusedError(f"{shown} is {reason}")

        if scheme == "http":
            loopback = host == "localhost" or (ip is not None and _is_loopback(ip))
            if not (self.allow_loopback and loopback):
                raise _RefusedError(
                    "the destination must use https; plain http is accepted only to"
                    " loopback addresses, with CMI_ALLOW_LOOPBACK=1 (allow_loopback=True in"
                    " Python)"
                )

        netloc_out = f"[{host}]" if isinstance(ip, ipaddress.IPv6Address) else host
        if port != _DEFAULT_PORTS[scheme]:
            netloc_out += f":{port}"
        normalized = f"{scheme}://{netloc_out}{path or '/'}"
        if query:
            normalized += f"?{query}"
        if len(normalized) > MAX_URL_LENGTH:
            raise _RefusedError(
                f"the URL is longer than {MAX_URL_LENGTH} characters once normalized"
            )
        return _Target(normalized, scheme, host, port, ip)


def _split_url(url: str) -> tuple[str, str, str, str]:
    """Scheme, netloc, path and query of an absolute http(s) URL without a fragment."""
    # Checked on the raw text, before any parser: parsers disagree about these (urlsplit
    # drops tabs and newlines, browsers read a backslash as '/'), and the client must see
    # the host the guard saw.
    if len(url) > MAX_URL_LENGTH:
        raise _RefusedError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(c <= " " or "\x7f" <= c <= "\x9f" for c in url):
        raise _RefusedError("the URL holds whitespace or control characters")
    if "\\" in url:
        raise _RefusedError("the URL holds a backslash")
    if "#" in url:
        raise _RefusedError("the URL has a fragment (#...), which is never sent to the server")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _RefusedError(f"the URL cannot be parsed: {exc}") from None
    scheme = parts.scheme
    if not scheme or not url[len(scheme) + 1 :].startswith("//"):
        raise _RefusedError("the URL is not absolute: it needs https:// and a host")
    if scheme not in _DEFAULT_PORTS:
        raise _RefusedError(f"the destination must use https, not {scheme}")
    if "@" in parts.netloc:
        raise _RefusedError("the URL holds credentials (user:password@); send them in headers")
    return scheme, parts.netloc, parts.path, parts.query


def _split_netloc(netloc: str, scheme: str) -> tuple[str, str, _IPAddress | None, int]:
    """The host as written, normalized and as an address (if it is one), and the port."""
    ip: _IPAddress | None
    if netloc.startswith("["):
        end = netloc.find("]")
        host_text, rest = netloc[1:end], netloc[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise _RefusedError("the URL's host is a malformed IPv6 address")
        port_text = rest[1:]
        if "%" in host_text:
            raise _RefusedError("an IPv6 zone (%...) is not accepted in a destination")
        try:
            ip = ipaddress.IPv6Address(host_text)
        except ValueError:
            raise _RefusedError(f"[{host_text}] is not a valid IPv6 address") from None
        host = ip.compressed
    else:
        host_text, _, port_text = netloc.partition(":")
        if ":" in port_text:
            raise _RefusedError("an IPv6 address in a URL must be in brackets: https://[::1]/")
        if not host_text:
            raise _RefusedError("the URL has no host")
        host, ip = _normalize_host(host_text)
    if not port_text:  # https://example.com:/ means the default port (RFC 3986)
        port = _DEFAULT_PORTS[scheme]
    elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise _RefusedError(f"the port must be a number from 1 to 65535, not {port_text!r}")
    return host_text, host, ip, port
