"""Configuration from ``CMI_*`` environment variables or a ``cmi.toml`` file.

The ``cmi`` command reads it; a firm's code may too (``Settings.load().adapter()``).
Environment variables win over the file. A value that is not valid is refused with the
setting, where it came from (the variable, or the key in the file) and why. The names,
with their defaults:

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
``CMI_DELIVERY_CONCURRENCY``   ``delivery_concurrency``        512 (documents in flight)
``CMI_DELIVERY_CONNECTIONS``   ``delivery_connections``        what ``ulimit -n`` allows
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

import contextvars
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cmi_sdk._adapter import DEFAULT_DATABASE_URL, Adapter
from cmi_sdk._delivery import DEFAULT_SCHEDULE, RetrySchedule
from cmi_sdk._exceptions import ConfigurationError
from cmi_sdk._files import warn_if_shared
from cmi_sdk._limits import DEFAULT_BODY_TIMEOUT, ServerLimits
from cmi_sdk._models import TermsPolicy
from cmi_sdk._secrets import SecretsKeyring
from cmi_sdk.egress import EgressGuard

__all__ = ["CONFIG_FILE", "ENV_PREFIX", "Settings"]

CONFIG_FILE = "cmi.toml"
"""The configuration file looked for in the working directory."""

ENV_PREFIX = "CMI_"
"""The prefix of the settings' environment variables (``CMI_DATABASE_URL``)."""


def _not_a_boolean(value: Any) -> Any:
    # A count or a number of seconds given as true or false is a mistake, not 1 or 0.
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    return value


def _boolean(value: Any) -> Any:
    # As a shell writes them: " on ", "" (unset) is off.
    if isinstance(value, str):
        value = value.strip()
        return value or False
    return value


def _listed(value: Any) -> Any:
    """A comma-separated string (an environment variable) as a list; anything else as is."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _none_if_empty(value: Any) -> Any:
    return value if value not in ("", None, ()) and value != [] else None


Flag = Annotated[bool, BeforeValidator(_boolean)]
Count = Annotated[int, Field(ge=1), BeforeValidator(_not_a_boolean)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_not_a_boolean)]
Delay = Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(_not_a_boolean)]
OptionalPath = Annotated[Path | None, BeforeValidator(_none_if_empty)]
OptionalText = Annotated[str | None, BeforeValidator(_none_if_empty)]

#: The sources of the settings being loaded (by :meth:`Settings.load`); none otherwise, so
#: that ``Settings(...)`` holds what it is given and nothing else.
_LOADING: contextvars.ContextVar[tuple[PydanticBaseSettingsSource, ...]] = contextvars.ContextVar(
    "cmi_settings_sources", default=()
)


class _Environment(EnvSettingsSource):
    """The ``CMI_*`` variables of a given mapping (``os.environ`` by default); never
    ``CMI_POLICY``: the policy is a table of ``cmi.toml``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # Names are matched without regard to case, as the source does. An empty value is
        # kept: it unsets what the file says (the fields read it as their empty value).
        policy = f"{ENV_PREFIX}POLICY".lower()
        return {
            name.lower(): value for name, value in self._environ.items() if name.lower() != policy
        }


class Settings(BaseSettings):
    """The adapter's and the delivery worker's settings (pydantic-settings: each field's
    variable is ``CMI_`` and its name in capitals)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        validate_default=False,
    )

    database_url: str = DEFAULT_DATABASE_URL
    allow_loopback: Flag = False
    """Accept loopback destinations, over plain http too (tests and demos only)."""
    allow_private: Flag = False
    signing_key: OptionalPath = None
    signing_cert: OptionalPath = None
    firm: str = "firm.example"
    webhook_ed25519_key: OptionalText = None
    delivery_concurrency: Count = 512
    delivery_connections: Annotated[Count | None, BeforeValidator(_none_if_empty)] = None
    """The delivery worker's most open connections (in flight and kept alive); by
    default, what the open-files limit allows."""
    per_destination: Count = 1
    destination_leases: Annotated[Count | None, BeforeValidator(_none_if_empty)] = None
    """With PostgreSQL: the most rows leased to one destination across all workers."""
    lease_seconds: Seconds = 60.0
    retry_schedule: Annotated[tuple[Delay, ...], NoDecode, BeforeValidator(_listed)] = (
        DEFAULT_SCHEDULE
    )
    http_timeout: Seconds = 10.0
    transaction_kinds: Annotated[
        tuple[str, ...] | None,
        NoDecode,
        BeforeValidator(lambda v: _none_if_empty(_listed(v))),
    ] = None
    """The kinds of transaction the firm emits; None: every kind."""
    acceptance_lease: Seconds = 300.0
    header_timeout: Seconds = 10.0
    """Seconds a client may take to send a request's head; then its connection is closed."""
    body_timeout: Seconds = DEFAULT_BODY_TIMEOUT
    """Seconds a request's body may take to arrive in full; then the answer is 408."""
    keep_alive_timeout: Seconds = 5.0
    """Seconds an idle connection is kept open after a response."""
    max_connections: Count = 1000
    """The most connections open at once (fewer if the descriptor limit is lower)."""
    max_header_bytes: Count = 32 * 1024
    """The most bytes a request's line and headers may hold; larger is answered 431."""
    metrics_token: OptionalText = None
    """The bearer token ``GET /metrics`` asks for (``cmi serve --metrics``)."""
    secrets_key: Annotated[OptionalText, Field(repr=False)] = None
    """``cmisk_`` keys that seal the stored secrets (encryption at rest), the sealing key
    first."""
    secrets_key_file: OptionalPath = None
    """Or a file of them (mode 0600), one a line."""
    policy: TermsPolicy = Field(default_factory=TermsPolicy)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],  # noqa: ARG003  (always this class)
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,  # noqa: ARG003  (see load)
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """What a ``Settings(...)`` holds: the values given, then (inside :meth:`load`)
        the environment and ``cmi.toml``."""
        return (init_settings, *_LOADING.get())

    @classmethod
    def load(
        cls, *, environ: Mapping[str, str] | None = None, directory: Path | None = None
    ) -> Settings:
        """Read ``cmi.toml`` in ``directory`` (the working directory by default), then the
        ``CMI_*`` environment variables over it.

        :raises ConfigurationError: a value of the wrong type, an unknown key in the file;
            the message names each setting, its variable or key, and the reason.
        """
        env = os.environ if environ is None else environ
        path = (directory or Path.cwd()) / CONFIG_FILE
        try:
            sources: tuple[PydanticBaseSettingsSource, ...] = (
                _Environment(cls, env),
                TomlConfigSettingsSource(cls, toml_file=path if path.is_file() else None),
            )
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{path}: {exc}") from None
        token = _LOADING.set(sources)
        try:
            return cls()
        except ValidationError as exc:
            raise _configuration_error(exc, env, path) from None
        finally:
            _LOADING.reset(token)

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
            "max_connections": self.delivery_connections,
            "per_destination": self.per_destination,
            "destination_lease_limit": self.destination_leases,
            "lease_seconds": self.lease_seconds,
            "schedule": RetrySchedule(delays=self.retry_schedule),
            "timeout": httpx.Timeout(self.http_timeout, connect=min(5.0, self.http_timeout)),
        }


def _configuration_error(
    exc: ValidationError, env: Mapping[str, str], path: Path
) -> ConfigurationError:
    """One line for each bad setting: its name, where its value came from, and why."""
    unknown: list[str] = []
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else "?"
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            unknown.append(name)
            continue
        variable = f"{ENV_PREFIX}{name.upper()}"
        where = variable if env.get(variable) else f"{name} in {path}"
        inner = ".".join(str(p) for p in error["loc"][1:])
        reason = error["msg"].removeprefix("Value error, ")
        lines.append(f"setting {name} ({where}): {f'{inner}: ' if inner else ''}{reason}")
    if unknown:
        lines.insert(0, f"{path}: unknown settings {', '.join(sorted(unknown))}")
    return ConfigurationError("; ".join(lines))
