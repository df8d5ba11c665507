"""What every subcommand's ``--help`` ends with: an example, and the ``CMI_*`` variables
the command reads. Kept in one table, beside the parser, so a test can hold every command
to it (each example parses; each variable is one the SDK knows)."""

from __future__ import annotations

import argparse
import textwrap

__all__ = ["GUIDE", "ONLY_FROM_ENVIRONMENT", "document"]

_STORE = ("CMI_DATABASE_URL", "CMI_SECRETS_KEY", "CMI_SECRETS_KEY_FILE")
_SIGNING = ("CMI_SIGNING_KEY", "CMI_SIGNING_CERT", "CMI_FIRM")
_EGRESS = ("CMI_ALLOW_LOOPBACK", "CMI_ALLOW_PRIVATE")
_SERVER = (
    "CMI_HEADER_TIMEOUT",
    "CMI_BODY_TIMEOUT",
    "CMI_KEEP_ALIVE_TIMEOUT",
    "CMI_MAX_CONNECTIONS",
    "CMI_MAX_HEADER_BYTES",
)
_DELIVERY = (
    "CMI_DELIVERY_CONCURRENCY",
    "CMI_DELIVERY_CONNECTIONS",
    "CMI_PER_DESTINATION",
    "CMI_DESTINATION_LEASES",
    "CMI_LEASE_SECONDS",
    "CMI_RETRY_SCHEDULE",
    "CMI_HTTP_TIMEOUT",
    "CMI_WEBHOOK_ED25519_KEY",
)

GUIDE: dict[str, tuple[str, tuple[str, ...]]] = {
    "standards": ("cmi standards --json", ()),
    "render": (
        "cmi render --standard cmi-ticket examples/ticket.json --output ticket.xml",
        ("CMI_SIGNING_KEY", "CMI_SIGNING_CERT"),
    ),
    "validate": ("cmi validate ticket.xml", ()),
    "keys generate": ("cmi keys generate keys", ()),
    "verify": ("cmi verify ticket.xml --cert keys/cert.pem", ()),
    "parse": ("cmi parse ticket.xml --cert keys/cert.pem", ()),
    "terms add": (
        (
            "cmi terms add --customer cust-7f3a9c --destination https://store.example/inbox"
            " --secret-file store.secret --standard cmi-ticket --until +365d"
        ),
        (*_STORE, *_SIGNING, *_EGRESS, "CMI_DESTINATION_SECRET", "CMI_TRANSACTION_KINDS"),
    ),
    "terms list": ("cmi terms list --customer cust-7f3a9c --all", _STORE),
    "terms revoke": ("cmi terms revoke terms_0123456789abcdef0123", (*_STORE, *_SIGNING)),
    "links create": ("cmi links create --account acct-7f3a9c --ttl 10", _STORE),
    "links list": ("cmi links list --intermediary relay", _STORE),
    "links revoke": ("cmi links revoke link_0123456789abcdef0123", (*_STORE, *_SIGNING)),
    "emit": (
        "cmi emit examples/ticket.json",
        (*_STORE, *_SIGNING, *_EGRESS, "CMI_TRANSACTION_KINDS"),
    ),
    "deliver": ("cmi deliver --once", (*_STORE, *_EGRESS, *_DELIVERY)),
    "outbox status": ("cmi outbox status --json", _STORE),
    "outbox list": ("cmi outbox list --state dead --limit 20", _STORE),
    "outbox redrive": ("cmi outbox redrive --since 2026-11-24T00:00:00Z", _STORE),
    "outbox problems": ("cmi outbox problems --limit 20", _STORE),
    "outbox purge": ("cmi outbox purge --dry-run --keep-days 30", _STORE),
    "acceptances recover": (
        "cmi acceptances recover --reference-firms",
        (*_STORE, *_SIGNING, "CMI_ACCEPTANCE_LEASE"),
    ),
    "db migrate": ("cmi db migrate", ("CMI_DATABASE_URL",)),
    "db sql": ("cmi db sql --dialect postgresql --schema cmi", ("CMI_DATABASE_URL",)),
    "intermediaries add": (
        "cmi intermediaries add relay --secret-file relay.secret",
        (*_STORE, "CMI_INTERMEDIARY_SECRET"),
    ),
    "intermediaries rotate": (
        "cmi intermediaries rotate relay --grace 24h --out relay-new.secret",
        _STORE,
    ),
    "intermediaries revoke": ("cmi intermediaries revoke relay", (*_STORE, *_SIGNING)),
    "intermediaries list": ("cmi intermediaries list --json", _STORE),
    "secrets generate": ("cmi secrets generate --out relay.secret", ()),
    "secrets generate-key": ("cmi secrets generate-key --out secrets.key", ()),
    "secrets encrypt": ("cmi secrets encrypt", _STORE),
    "listen": (
        "cmi listen --port 8900 --store inbox --secret-file inbox.secret --cert keys/cert.pem",
        ("CMI_DESTINATION_SECRET", *_SERVER),
    ),
    "request": (
        (
            "cmi request examples/request.json --date +30d --to http://127.0.0.1:8000"
            " --intermediary relay --secret-file relay.secret"
        ),
        ("CMI_INTERMEDIARY_SECRET",),
    ),
    "accept": (
        (
            "cmi accept off_0123456789abcdef0123 --customer cust-7f3a9c"
            " --to http://127.0.0.1:8000 --intermediary relay --secret-file relay.secret"
        ),
        ("CMI_INTERMEDIARY_SECRET",),
    ),
    "demo": ("cmi demo", ()),
    "serve": (
        "cmi serve --reference-firms --port 8000",
        (*_STORE, *_SIGNING, *_SERVER, "CMI_METRICS_TOKEN", "CMI_TRANSACTION_KINDS"),
    ),
}
"""Each command (as typed after ``cmi``): an example, and the ``CMI_*`` variables it reads."""

_CONFIG_NOTE = "The settings (not the secrets) may also come from a cmi.toml here."

#: Read from the environment only, never from cmi.toml (a secret is not kept in a file
#: the whole team edits).
ONLY_FROM_ENVIRONMENT = frozenset({"CMI_INTERMEDIARY_SECRET", "CMI_DESTINATION_SECRET"})


def document(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every command under ``parser`` its summary as description, and an epilog with
    its example and variables (from :data:`GUIDE`)."""
    for action in parser._actions:  # argparse keeps subcommands only there
        if not isinstance(action, argparse._SubParsersAction):
            continue
        summaries = {choice.dest: choice.help for choice in action._choices_actions}
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias (cmi secret = cmi secrets)
                continue
            seen.add(id(sub))
            command = f"{path} {name}".strip()
            summary = summaries.get(name) or ""
            if sub.description is None and summary:
                sub.description = summary[:1].upper() + summary[1:] + "."
            document(sub, command)
            if command in GUIDE:
                example, variables = GUIDE[command]
                reads = ", ".join(variables) if variables else "no CMI_* variable"
                note = f" {_CONFIG_NOTE}" if set(variables) - ONLY_FROM_ENVIRONMENT else ""
                sub.epilog = "\n\n".join(
                    (
                        "example:\n"
                        + textwrap.fill(
                            example, 78, initial_indent="  ", subsequent_indent="      "
                        ),
                        textwrap.fill(f"reads: {reads}.{note}", 78, subsequent_indent="  "),
                    )
                )
                sub.formatter_class = argparse.RawDescriptionHelpFormatter
