"""What both stores do with an intermediary's secrets: the list kept in its row (as JSON),
adding, rotating with a grace window, and sealing each secret at rest.

A row's ``secrets`` is a JSON list; each item is ``{"secret": S, "expires_at": T}`` with
``T`` null for a secret without an end, where ``S`` is the secret sealed for
``intermediary:<name>`` (see :mod:`cmi_sdk._secrets`) or, without encryption at rest, the
secret itself. Stores made before rotation windows kept bare strings: they read as secrets
without an end.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cmi_sdk._secrets import SecretsKeyring, open_secret, seal_secret

__all__ = [
    "Intermediary",
    "IntermediarySecret",
    "context",
    "decode",
    "encode",
    "not_active",
    "reseal",
    "rotated",
    "with_secret",
]


@dataclass(frozen=True, slots=True)
class IntermediarySecret:
    """One of an intermediary's secrets, and when it stops working (None: never)."""

    secret: str = field(repr=False)
    expires_at: float | None = None

    def valid_at(self, now: float) -> bool:
        """Whether requests signed with it are taken at ``now``."""
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class Intermediary:
    """A registered intermediary as the store keeps it."""

    name: str
    created_at: float
    secrets: tuple[IntermediarySecret, ...]
    revoked_at: float | None = None
    """When it was revoked: its requests are refused from then on, whatever they carry."""
    generation: int = 0
    """Counts the changes to its row: a cached verifier is good while this is unchanged."""

    def valid_secrets(self, now: float) -> tuple[str, ...]:
        """The secrets requests may be signed with at ``now``: none once revoked."""
        if self.revoked_at is not None:
            return ()
        return tuple(s.secret for s in self.secrets if s.valid_at(now))

    def public_dict(self) -> dict[str, object]:
        """Everything but the secrets themselves (for ``cmi intermediaries list``)."""
        return {
            "name": self.name,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "secrets": [{"expires_at": s.expires_at} for s in self.secrets],
        }


def not_active(name: str, *, known: bool) -> str:
    """Why a rotation or revocation of ``name`` cannot be done."""
    if not known:
        return f"no intermediary named {name!r} is registered"
    return f"intermediary {name!r} is revoked: register it again with a new secret"


def context(name: str) -> str:
    """The associated data a secret of intermediary ``name`` is sealed with."""
    return f"intermediary:{name}"


def decode(
    text: str | list[Any], name: str, keyring: SecretsKeyring | None
) -> list[IntermediarySecret]:
    """The secrets of a row's JSON list, opened."""
    items = json.loads(text) if isinstance(text, str) else text
    out: list[IntermediarySecret] = []
    for item in items:
        if isinstance(item, str):  # written before rotation windows
            stored, expires = item, None
        elif isinstance(item, dict):
            stored, expires = str(item["secret"]), item.get("expires_at")
        else:
            continue
        secret = open_secret(keyring, stored, context=context(name))
        out.append(IntermediarySecret(secret, None if expires is None else float(expires)))
    return out


def encode(secrets: Sequence[IntermediarySecret], name: str, keyring: SecretsKeyring | None) -> str:
    """A row's JSON list for ``secrets``, each sealed when there is a keyring."""
    return json.dumps(
        [
            {
                "secret": seal_secret(keyring, s.secret, context=context(name)),
                "expires_at": s.expires_at,
            }
            for s in secrets
        ]
    )


def with_secret(secrets: Sequence[IntermediarySecret], secret: str) -> list[IntermediarySecret]:
    """``secrets`` with ``secret`` added without an end (one already there keeps its place
    and loses its end)."""
    if any(s.secret == secret for s in secrets):
        return [IntermediarySecret(secret) if s.secret == secret else s for s in secrets]
    return [*secrets, IntermediarySecret(secret)]


def rotated(
    secrets: Sequence[IntermediarySecret], secret: str, *, at: float, grace_until: float
) -> list[IntermediarySecret]:
    """``secrets`` after a rotation to ``secret`` at ``at``: the others end at
    ``grace_until`` at the latest, those already ended are dropped."""
    kept = [
        IntermediarySecret(
            s.secret, grace_until if s.expires_at is None else min(s.expires_at, grace_until)
        )
        for s in secrets
        if s.valid_at(at) and s.secret != secret
    ]
    return [s for s in kept if s.valid_at(at)] + [IntermediarySecret(secret)]


def reseal(text: str | list[Any], name: str, keyring: SecretsKeyring) -> str | None:
    """The row's list sealed anew with the keyring's first key; None when it already is."""
    items = json.loads(text) if isinstance(text, str) else text
    stored = [item if isinstance(item, str) else str(item["secret"]) for item in items]
    if all(keyring.is_current(s) for s in stored):
        return None
    return encode(decode(items, name, keyring), name, keyring)
