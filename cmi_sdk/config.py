"""Configuration from ``CMI_*`` environment variables or a ``cmi.toml`` file.

The ``cmi`` command reads it; a firm's code may too (``Settings.load().adapter()``).
Environment variables win over the file. The names, with their defaults:

=============================  ==============================  =============================
variable                       ``cmi.toml`` key                default
=============================  ==============================  =============================
``CMI_DATABASE_URL``           ``database_url``                ``sqlite:///./cmi.db``
``CMI_ALLOW_LOOPBACK``         ``allow_loopback``              off: public https only
``CMI_ALLOW_PRIVATE``          ``allow_private``               off
``CMI_SIGNING_KEY``            ``signing_key``                 none (documents unsigned)
``CMI_SIGNING_CERT``           ``signing_cert``                none
``CMI_FIRM``                   ``firm``                        ``firm.example``
``CMI_WEBHOOK_ED25519_KEY``    ``webhook_ed25519_key``         none (v1 HMAC only)
``CMI_DELIVERY_CONCURRENCY``   ``delivery_concurrency``        4
``CMI_PER_DESTINATION``        ``per_destination``             1
``CMI_DESTINATION_LEASES``     ``destination_leases``          none (PostgreSQL only)
``CMI_LEASE_SECONDS``          ``lease_seconds``               60
``CMI_RETRY_SCHEDULE``         ``retry_schedule``              the Standard Webhooks one
``CMI_HTTP_TIMEOUT``           ``http_timeout``                10 (seconds)
``CMI_TRANSACTION_KINDS``      ``transaction_kinds``           every kind
``CMI_ACCEPTANCE_LEASE``       ``acceptance_lease``            300 (seconds)
``CMI_SECRETS_KEY``            ``secrets_key``                 none (secrets stored as is)
``CMI_SECRETS_KEY_FILE``       ``secrets_key_file``            none
``CMI_HEADER_TIMEOUT``         ``header_timeout``              10 (seconds)
``CMI_BODY_TIMEOUT``           ``body_timeout``                30 (seconds)
``CMI_KEEP_ALIVE_TIMEOUT``     ``keep_alive_timeout``          5 (seconds)
``CMI_MAX_CONNECTIONS``        ``max_connections``             1000
``CMI_MAX_HEADER_BYTES``       ``max_header_bytes``            32768
``CMI_METRICS_TOKEN``          ``metrics_token``               none (``/metrics`` open)
=============================  ==============================  =============================

The last six are for ``cmi serve`` and ``cmi listen`` (see :class:`~cmi_sdk.ServerLimits`):
how long a client may take to send a request's head and its body, how long an idle
connection is kept, how many connections may be open at once, how large a request's head
may be, and the bearer token ``GET /metrics`` asks for.

``CMI_SECRETS_KEY`` (or the file ``CMI_SECRETS_KEY_FILE`` names) holds one or more
``cmisk_`` keys, separated by commas, spaces or lines: the first seals the secrets the store
keeps, every one opens them (see :class:`~cmi_sdk.SecretsKeyring`).

``CMI_RETRY_SCHEDULE`` is a comma-separated list of seconds (``5,300,1800``).
``CMI_TRANSACTION_KINDS`` names the kinds of transaction the firm emits, comma-separated
(``flight``, ``bank_statement_line``, ``loan``, ``purchase``): terms that can express none
of them are refused when proposed. ``CMI_ACCEPTANCE_LEASE`` is how long a booking process
holds an acceptance before a crashed one is recovered. The firm's
terms policy is the ``[policy]`` table of ``cmi.toml``, with the fields of
:class:`~cmi_sdk.TermsPolicy`.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cmi_sdk._adapter import DEFAULT_DATABASE_URL, Adapter
from cmi_sdk._delivery import DEFAULT_SCHEDULE, RetrySchedule
from cmi_sdk._exceptions import ConfigurationError
from cmi_sdk._files import warn_if_shared
from cmi_sdk._limits import DEFAULT_BODY_TIMEOUT, ServerLimits
from cmi_sdk._models import TermsPolicy
from cmi_sdk._secrets import SecretsKeyring
from cmi_sdk.egress import EgressGuard

__all__ = ["CONFIG_FILE", "Settings"]

CONFIG_FILE = "cmi.toml"
"""The configuration file looked for in the working directory."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """The adapter's and the delivery worker's settings."""

    database_url: str = DEFAULT_DATABASE_URL
    allow_loopback: bool = False
    """Accept loopback destinations, over plain http too (tests and demos only)."""
    allow_private: bool = False
    signing_key: Path | None = None
    signing_cert: Path | None = None
    firm: str = "firm.example"
    webhook_ed25519_key: str | None = None
    delivery_concurrency: int = 4
    per_destination: int = 1
    destination_leases: int | None = None
    """With PostgreSQL: the most rows leased to one destination across all workers."""
    lease_seconds: float = 60.0
    retry_schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    http_timeout: float = 10.0
    transaction_kinds: tuple[str, ...] | None = None
    """The kinds of transaction the firm emits; None: every kind."""
    acceptance_lease: float = 300.0
    header_timeout: float = 10.0
    """Seconds a client may take to send a request's head; then its connection is closed."""
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    """Seconds a request's body may take to arrive in full; then the answer is 408."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle connection is kept open after a response."""
    max_connections: int = 1000
    """The most connections open at once (fewer if the descriptor limit is lower)."""
    max_header_bytes: int = 32 * 1024
    """The most bytes a request's line and headers may hold; larger is answered 431."""
    metrics_token: str | None = None
    """The bearer token ``GET /metrics`` asks for (``cmi serve --metrics``)."""
    secrets_key: str | None = field(default=None, repr=False)
    """``cmisk_`` keys that seal the stored secrets (encryption at rest), the sealing key
    first."""
    secrets_key_file: Path | None = None
    """Or a file of them (mode 0600), one a line."""
    policy: TermsPolicy = field(default_factory=TermsPolicy)

    @classmethod
    def load(
        cls, *, environ: Mapping[str, str] | None = None, directory: Path | None = None
    ) -> Settings:
        """Read ``cmi.toml`` in ``directory`` (the working directory by default), then the
        ``CMI_*`` environment variables over it.

        :raises ConfigurationError: a value of the wrong type, an unknown key in the file.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = (directory or Path.cwd()) / CONFIG_FILE
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigurationError(f"{path}: {exc}") from None
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise ConfigurationError(f"{path}: unknown settings {', '.join(unknown)}")
            values.update(data)
        for f in fields(cls):
            name = f"CMI_{f.name.upper()}"
            if f.name != "policy" and name in env:
                values[f.name] = env[name]
        return cls._coerce(values)

    @classmethod
    def _coerce(cls, values: dict[str, Any]) -> Settings:
        out: dict[str, Any] = {}
        for key, value in values.items():
            try:
                out[key] = _convert(key, value)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"setting {key}: {exc}") from None
        return cls(**out)

    def signer(self) -> Any:
        """The :class:`~cmi_sdk.signing.DocumentSigner` of the configured key, or None."""
        if self.signing_key is None and self.signing_cert is None:
            return None
        if self.signing_key is None or self.signing_cert is None:
            raise ConfigurationError("set both CMI_SIGNING_KEY and CMI_SIGNING_CERT, or neither")
        from cmi_sdk.signing import DocumentSigner  # noqa: PLC0415

        try:
            key = self.signing_key.read_bytes()
            cert = self.signing_cert.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the signing key or certificate: {exc}") from None
        return DocumentSigner.from_pem(key, cert)

    def server_limits(self) -> ServerLimits:
        """The limits ``cmi serve`` and ``cmi listen`` serve with."""
        return ServerLimits(
            header_timeout=self.header_timeout,
            keep_alive_timeout=self.keep_alive_timeout,
            max_connections=self.max_connections,
            max_header_bytes=self.max_header_bytes,
        )

    def secrets_keyring(self) -> SecretsKeyring | None:
        """The keyring of ``secrets_key`` or ``secrets_key_file``, or None.

        :raises ConfigurationError: both are set, or a key is malformed."""
        if self.secrets_key is not None and self.secrets_key_file is not None:
            raise ConfigurationError("set CMI_SECRETS_KEY or CMI_SECRETS_KEY_FILE, not both")
        if self.secrets_key is not None:
            return SecretsKeyring.from_text(self.secrets_key)
        if self.secrets_key_file is not None:
            warn_if_shared(self.secrets_key_file, "the secrets key file")
            return SecretsKeyring.from_file(self.secrets_key_file)
        return None

    def egress(self) -> EgressGuard:
        """The egress guard these settings describe."""
        return EgressGuard(allow_loopback=self.allow_loopback, allow_private=self.allow_private)

    def adapter(self, **options: Any) -> Adapter:
        """An :class:`~cmi_sdk.Adapter` with these settings; ``options`` override them."""
        options.setdefault("database_url", self.database_url)
        if "signer" not in options:  # a signer given overrides the key files, unread
            options["signer"] = self.signer()
        options.setdefault("firm", self.firm)
        options.setdefault("policy", self.policy)
        options.setdefault("egress", self.egress())
        options.setdefault("webhook_ed25519_key", self.webhook_ed25519_key)
        options.setdefault("transaction_kinds", self.transaction_kinds)
        options.setdefault("acceptance_lease", self.acceptance_lease)
        if "secrets_keyring" not in options:
            options["secrets_keyring"] = self.secrets_keyring()
        return Adapter(**options)

    def worker_options(self) -> dict[str, Any]:
        """The delivery worker's options (for :meth:`Adapter.delivery_worker`)."""
        import httpx  # noqa: PLC0415

        return {
            "concurrency": self.delivery_concurrency,
            "per_destination": self.per_destination,
            "destination_lease_limit": self.destination_leases,
            "lease_seconds": self.lease_seconds,
            "schedule": RetrySchedule(delays=self.retry_schedule),
            "timeout": httpx.Timeout(self.http_timeout, connect=min(5.0, self.http_timeout)),
        }


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean (1/0, true/false)")


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a whole number")
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of seconds")
    seconds = float(value)
    if not 0 < seconds < math.inf:
        raise ValueError("must be a positive, finite number of seconds")
    return seconds


def _schedule(value: Any) -> tuple[float, ...]:
    items = value.split(",") if isinstance(value, str) else value
    delays = tuple(float(item) for item in items if str(item).strip())
    if not all(0 <= d < math.inf for d in delays):
        raise ValueError("delays are finite seconds >= 0")
    return delays


def _kinds(value: Any) -> tuple[str, ...] | None:
    items = value.split(",") if isinstance(value, str) else value
    kinds = tuple(str(item).strip() for item in items if str(item).strip())
    return kinds or None


def _path(value: Any) -> Path | None:
    return Path(str(value)) if value else None


def _optional_text(value: Any) -> str | None:
    return str(value) if value else None


def _policy(value: Any) -> TermsPolicy:
    try:
        return TermsPolicy.model_validate(value)
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "database_url": str,
    "allow_loopback": _boolean,
    "allow_private": _boolean,
    "signing_key": _path,
    "signing_cert": _path,
    "firm": str,
    "webhook_ed25519_key": _optional_text,
    "delivery_concurrency": _count,
    "per_destination": _count,
    "destination_leases": lambda v: None if v in ("", None) else _count(v),
    "lease_seconds": _seconds,
    "retry_schedule": _schedule,
    "http_timeout": _seconds,
    "transaction_kinds": _kinds,
    "acceptance_lease": _seconds,
    "header_timeout": _seconds,
    "body_timeout": _seconds,
    "keep_alive_timeout": _seconds,
    "max_connections": _count,
    "max_header_bytes": _count,
    "metrics_token": _optional_text,
    "secrets_key": _optional_text,
    "secrets_key_file": _path,
    "policy": _policy,
}


def _convert(key: str, value: Any) -> Any:
    return _CONVERTERS[key](value)
