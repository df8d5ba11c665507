"""``cmi intermediaries`` and ``cmi secrets``: who may call the endpoint, and the secrets
they sign with."""

from __future__ import annotations

import argparse
import sys

from cmi_sdk.cli._common import (
    EXIT_OK,
    UsageError,
    _emitting_adapter,
    _print_json,
    _read_secret,
    _settings,
    _write,
    _write_secret,
)


def cmd_intermediaries_add(args: argparse.Namespace) -> int:
    """Register an intermediary and its Standard Webhooks secret."""
    secret = _read_secret(args)
    adapter = _emitting_adapter(args, require_signer=False)
    adapter.add_intermediary(args.name, secret)
    _write(f"{args.name}\n".encode(), None)
    return EXIT_OK


def cmd_intermediaries_rotate(args: argparse.Namespace) -> int:
    """Give an intermediary a new secret, shown once; the old ones work for --grace."""
    import datetime as dt  # noqa: PLC0415

    adapter = _emitting_adapter(args, require_signer=False)
    grace = dt.timedelta(seconds=args.grace)
    secret = adapter.rotate_intermediary(args.name, grace=grace)
    _write_secret(secret, args.out)
    until = dt.datetime.fromtimestamp(adapter.clock(), dt.UTC) + grace
    print(
        f"cmi: {args.name}'s other secrets work until {until:%Y-%m-%dT%H:%M:%SZ}; give the"
        " new one to the intermediary now (it is not shown again)",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_intermediaries_revoke(args: argparse.Namespace) -> int:
    """Revoke an intermediary: its requests are refused from now on, its links and terms
    revoked."""
    adapter = _emitting_adapter(args, require_signer=False)
    if adapter.revoke_intermediary(args.name):
        _write(f"{args.name} revoked\n".encode(), None)
    else:
        _write(f"{args.name} was revoked already\n".encode(), None)
    return EXIT_OK


def cmd_intermediaries_list(args: argparse.Namespace) -> int:
    """List intermediaries and their secrets' ends (never the secrets)."""
    import datetime as dt  # noqa: PLC0415

    adapter = _emitting_adapter(args, require_signer=False)
    found = adapter.intermediaries()
    if args.json:
        _print_json([i.public_dict() for i in found])
        return EXIT_OK

    def when(moment: float) -> str:
        return f"{dt.datetime.fromtimestamp(moment, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"

    now = adapter.clock()
    lines = []
    for item in found:
        if item.revoked_at is not None:
            lines.append(f"{item.name}  revoked {when(item.revoked_at)}")
            continue
        valid = [s for s in item.secrets if s.valid_at(now)]
        ends = ", ".join(
            "no end" if s.expires_at is None else f"until {when(s.expires_at)}" for s in valid
        )
        lines.append(f"{item.name}  active  {len(valid)} secret(s): {ends}")
    _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
    return EXIT_OK


def cmd_secrets_generate(args: argparse.Namespace) -> int:
    """Print (or write to a new 0600 file) a fresh Standard Webhooks secret."""
    from cmi_sdk.webhooks import generate_secret  # noqa: PLC0415

    _write_secret(generate_secret(), args.out)
    return EXIT_OK


def cmd_secrets_generate_key(args: argparse.Namespace) -> int:
    """Print (or write to a new 0600 file) a fresh key to seal stored secrets with."""
    from cmi_sdk._secrets import generate_secrets_key  # noqa: PLC0415

    _write_secret(generate_secrets_key(), args.out)
    return EXIT_OK


def cmd_secrets_encrypt(args: argparse.Namespace) -> int:
    """Seal every stored secret with the first configured secrets key."""
    settings = _settings()
    keyring = settings.secrets_keyring()
    if keyring is None:
        raise UsageError(
            "no secrets key is configured: set CMI_SECRETS_KEY or CMI_SECRETS_KEY_FILE (make"
            " a key with `cmi secrets generate-key --out FILE`)"
        )
    adapter = _emitting_adapter(args, require_signer=False)
    changed = adapter.reseal_secrets()
    _write(f"sealed {changed} row(s) with secrets key {keyring.key_ids[0]}\n".encode(), None)
    return EXIT_OK
