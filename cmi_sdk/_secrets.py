"""Encryption at rest of the secrets the stores keep (webhook and intermediary secrets).

A store given a :class:`SecretsKeyring` writes every secret sealed with AES-256-GCM under
the keyring's first key, with the row it belongs to (``terms:<id>``, ``intermediary:<name>``)
as associated data: a sealed secret copied into another row does not open there. Sealed
text reads ``enc:v1:<key id>:<base64url of nonce and ciphertext>``; the key id names which
key sealed it, so a keyring may hold several keys during a rotation (the first seals, all
open). A secret stored before encryption was switched on is read as it is, until
``cmi secrets encrypt`` seals it.

A missing or wrong key is a :class:`~cmi_sdk.ConfigurationError` naming the row, never a
wrong secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cmi_sdk._exceptions import ConfigurationError

__all__ = ["SecretsKeyring", "generate_secrets_key", "is_sealed", "open_secret", "seal_secret"]

_KEY_PREFIX = "cmisk_"
_SEALED_PREFIX = "enc:v1:"
_NONCE_BYTES = 12
_KEY_BYTES = 32
_SPLIT = re.compile(r"[\s,]+")


def generate_secrets_key() -> str:
    """A new random key for :class:`SecretsKeyring`: ``cmisk_`` and 32 bytes in base64."""
    return _KEY_PREFIX + base64.b64encode(os.urandom(_KEY_BYTES)).decode()


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"cmi-sdk secrets key " + key).hexdigest()[:8]


def _associated(context: str) -> bytes:
    return f"cmi-sdk secret of {context}".encode()


class SecretsKeyring:
    """The keys that seal and open the secrets a store keeps.

    :param keys: ``cmisk_`` keys (see :func:`generate_secrets_key`); the first seals every
        secret written, and every key opens what it sealed (keep an old key here until
        ``cmi secrets encrypt`` has sealed everything again with the new first one).
    :raises ConfigurationError: no key, or a key that is not ``cmisk_`` and 32 bytes.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if isinstance(keys, str):
            raise ConfigurationError("keys must be a list of cmisk_ keys, not one string")
        if not keys:
            raise ConfigurationError("a secrets keyring needs at least one cmisk_ key")
        self._ciphers: dict[str, AESGCM] = {}
        self._order: list[str] = []
        for number, text in enumerate(keys, start=1):
            raw = self._decode(text, number)
            kid = _key_id(raw)
            if kid not in self._ciphers:
                self._ciphers[kid] = AESGCM(raw)
                self._order.append(kid)

    @staticmethod
    def _decode(text: str, number: int) -> bytes:
        where = f"secrets key {number}"
        if not text.startswith(_KEY_PREFIX):
            raise ConfigurationError(
                f"{where} is not a cmisk_ key (make one with `cmi secrets generate-key`)"
            )
        try:
            raw = base64.b64decode(text[len(_KEY_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"{where} is not valid base64 after cmisk_") from None
        if len(raw) != _KEY_BYTES:
            raise ConfigurationError(f"{where} must hold {_KEY_BYTES} bytes, not {len(raw)}")
        return raw

    @classmethod
    def from_text(cls, text: str) -> SecretsKeyring:
        """The keys in ``text``, separated by commas or white space, the sealing key first."""
        return cls([part for part in _SPLIT.split(text.strip()) if part])

    @classmethod
    def from_file(cls, path: str | Path) -> SecretsKeyring:
        """The keys in a file, one a line (or separated as :meth:`from_text` takes them)."""
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read the secrets key file {path}: {exc}") from None
        return cls.from_text(text)

    def __repr__(self) -> str:
        return f"SecretsKeyring(key ids {', '.join(self._order)})"

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The keys' ids (not secret), the sealing key's first."""
        return tuple(self._order)

    def seal(self, secret: str, *, context: str) -> str:
        """``secret`` sealed with the first key, bound to ``context`` (the row's identity)."""
        kid = self._order[0]
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[kid].encrypt(nonce, secret.encode(), _associated(context))
        return f"{_SEALED_PREFIX}{kid}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, stored: str, *, context: str) -> str:
        """The secret a sealed text holds; plain text (stored unsealed) is returned as is.

        :raises ConfigurationError: the key that sealed it is not in the keyring, or the
            text was sealed for another row or altered."""
        if not is_sealed(stored):
            return stored
        kid, data = _parts(stored, context)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise ConfigurationError(
                f"the secret of {context} was sealed with secrets key {kid}, which is not"
                f" among the configured keys ({', '.join(self._order)}): add it to"
                " CMI_SECRETS_KEY (after the current key)"
            )
        try:
            plain = cipher.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], _associated(context))
        except InvalidTag:
            raise ConfigurationError(
                f"the secret of {context} does not open with secrets key {kid}: it was sealed"
                " for another row, or altered"
            ) from None
        return plain.decode()

    def is_current(self, stored: str) -> bool:
        """Whether ``stored`` is sealed with the sealing (first) key."""
        return stored.startswith(f"{_SEALED_PREFIX}{self._order[0]}:")


def _parts(stored: str, context: str) -> tuple[str, bytes]:
    kid, sep, encoded = stored[len(_SEALED_PREFIX) :].partition(":")
    try:
        data = base64.urlsafe_b64decode(encoded)
    except (binascii.Error, ValueError):
        data = b""
    if not sep or len(data) <= _NONCE_BYTES:
        raise ConfigurationError(f"the sealed secret of {context} is damaged")
    return kid, data


def is_sealed(stored: str) -> bool:
    """Whether a stored secret is sealed (else it was stored as plain text)."""
    return stored.startswith(_SEALED_PREFIX)


def seal_secret(keyring: SecretsKeyring | None, secret: str, *, context: str) -> str:
    """What a store writes for ``secret``: sealed with a keyring, else the secret itself."""
    return secret if keyring is None else keyring.seal(secret, context=context)


def open_secret(keyring: SecretsKeyring | None, stored: str, *, context: str) -> str:
    """The secret a store read; sealed text without a keyring is a configuration error."""
    if keyring is not None:
        return keyring.open(stored, context=context)
    if is_sealed(stored):
        kid, _ = _parts(stored, context)
        raise ConfigurationError(
            f"the secret of {context} is encrypted at rest (secrets key {kid}), and no"
            " secrets key is configured: set CMI_SECRETS_KEY or CMI_SECRETS_KEY_FILE"
        )
    return stored
