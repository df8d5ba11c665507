"""How long a client may take and how many may be connected: the settings of the HTTP
servers ``cmi serve`` and ``cmi listen`` run (see :mod:`cmi_sdk._serving`). Kept apart from
the serving code, so that reading settings imports no server."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cmi_sdk._exceptions import ConfigurationError

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "RESERVED_DESCRIPTORS",
    "ServerLimits",
    "open_files_limit",
    "raise_open_files_limit",
]

DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a request's body may take to arrive in full, by default."""

RESERVED_DESCRIPTORS = 64
"""Descriptors kept back from a connection cap for the store, logs and worker threads."""


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """How long a client may take and how many may be connected at once.

    :param header_timeout: seconds a connection may take to send a request's head, counted
        from when it opens or from the end of the previous response.
    :param keep_alive_timeout: seconds an idle connection is kept open after a response.
    :param max_connections: the most connections open at once; lowered at start to what
        the process's descriptor limit allows.
    :param max_header_bytes: the most bytes a request's line and headers may hold; a larger
        head is answered 431 and its connection closed.
    """

    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1000
    max_header_bytes: int = 32 * 1024

    def __post_init__(self) -> None:
        for name in ("header_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ConfigurationError(f"{name} must be a positive, finite number of seconds")
        if self.max_connections < 1:
            raise ConfigurationError("max_connections must be at least 1")
        if self.max_header_bytes < 1024:
            raise ConfigurationError("max_header_bytes must be at least 1024")

    def connection_cap(self) -> int:
        """:attr:`max_connections`, or fewer when the descriptor limit is lower."""
        soft = open_files_limit()
        if soft is None:
            return self.max_connections
        return max(1, min(self.max_connections, soft - RESERVED_DESCRIPTORS))


def open_files_limit() -> int | None:
    """The process's soft limit on open descriptors; None where there is none."""
    try:
        import resource  # noqa: PLC0415  (POSIX only)
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit(wanted: int) -> int | None:
    """Raise the soft limit on open descriptors toward ``wanted``, never above the hard
    limit and never down; returns the limit in force (None: there is none).

    A process that talks to thousands of hosts needs a descriptor per connection, and the
    usual soft limit (1,024) is a default for interactive shells, not a decision: the hard
    limit is the system's. Called by ``cmi deliver``, not by the library, whose process is
    the firm's to configure.
    """
    try:
        import resource  # noqa: PLC0415  (POSIX only)
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    if soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):  # pragma: no cover - a platform that refuses
        return soft
    return target
