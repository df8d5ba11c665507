"""The ``cmi`` command.

Exit codes: 0 success, 1 invalid input (the input was refused, nothing was written),
2 usage error (bad arguments, unknown standard or document type), 3 internal error (a bug in
the SDK or a plugin; ``--debug`` shows the traceback).

Errors go to standard error, without a traceback unless ``--debug`` is given. Output goes to
standard output only once it is complete, and ``--output`` files are written atomically, so a
failure never leaves a partial file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from cmi_sdk import __version__
from cmi_sdk._exceptions import CMIError
from cmi_sdk.cli._common import (
    EXIT_INTERNAL,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    InputError,
    UsageError,
    _duration,
    _ReportedError,
    _secret_options,
)
from cmi_sdk.cli._help import document
from cmi_sdk.cli.demo import cmd_demo
from cmi_sdk.cli.documents import (
    cmd_keys_generate,
    cmd_parse,
    cmd_render,
    cmd_standards,
    cmd_validate,
    cmd_verify,
)
from cmi_sdk.cli.intermediaries import (
    cmd_intermediaries_add,
    cmd_intermediaries_list,
    cmd_intermediaries_revoke,
    cmd_intermediaries_rotate,
    cmd_secrets_encrypt,
    cmd_secrets_generate,
    cmd_secrets_generate_key,
)
from cmi_sdk.cli.outbox import (
    cmd_acceptances,
    cmd_db_migrate,
    cmd_db_sql,
    cmd_deliver,
    cmd_emit,
    cmd_outbox,
    cmd_outbox_problems,
    cmd_outbox_purge,
)
from cmi_sdk.cli.requests import cmd_accept, cmd_request, travel_date
from cmi_sdk.cli.serving import cmd_listen, cmd_serve, serve_app
from cmi_sdk.cli.terms import (
    cmd_links_create,
    cmd_links_list,
    cmd_links_revoke,
    cmd_terms_add,
    cmd_terms_list,
    cmd_terms_revoke,
)

__all__ = ["EXIT_INTERNAL", "EXIT_INVALID", "EXIT_OK", "EXIT_USAGE", "main", "serve_app"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cmi`` command."""
    parser = _Parser(
        prog="cmi",
        description=(
            "Customer-managed interactions: standard XML documents under the customer's"
            " terms, signed and delivered reliably."
        ),
        epilog="Exit codes: 0 ok, 1 invalid input, 2 usage error, 3 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"cmi-sdk {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for errors (for bug reports)"
    )
    parser.add_argument(
        "--block",
        action="append",
        default=[],
        metavar="NAME",
        help="do not load the plugin NAME (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("standards", help="list installed standards and their document types")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_standards)

    p = sub.add_parser(
        "render",
        help="render a canonical JSON model (a transaction, request, ...) as standard XML",
    )
    p.add_argument("input", metavar="INPUT.json", help="the canonical model as JSON ('-': stdin)")
    p.add_argument("--standard", "-s", required=True, help="the standard, such as cmi-ticket")
    p.add_argument("--type", "-t", metavar="DOCTYPE", help="the document type, if several")
    p.add_argument("--output", "-o", metavar="FILE", help="write here (atomically), not stdout")
    p.add_argument(
        "--sign",
        action="store_true",
        help="sign the document with the configured key (CMI_SIGNING_KEY, CMI_SIGNING_CERT)",
    )
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="validate XML documents against their schemas")
    p.add_argument("files", nargs="+", metavar="FILE", help="documents to validate ('-': stdin)")
    p.add_argument("--standard", "-s", help="the standard (default: from the root element)")
    p.add_argument("--type", "-t", metavar="DOCTYPE", help="the document type")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing for valid files")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("keys", help="manage signing keys")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_Parser)
    keys.required = True
    k = keys.add_parser(
        "generate", help="write DIR/key.pem and a self-signed DIR/cert.pem (development)"
    )
    k.add_argument("dir", metavar="DIR", help="the folder to write into (created if needed)")
    k.add_argument("--algorithm", choices=["ec", "rsa"], default="ec", help="default: ec")
    k.set_defaults(func=cmd_keys_generate)

    p = sub.add_parser(
        "verify",
        help="verify a signed document against a certificate",
        description="Verify a document's XML-DSig signature: inside it, or detached beside it"
        " (FILE.sig, as cmi listen keeps an OFX statement's). Reads CMI_SIGNING_CERT.",
        epilog="example: cmi verify store/msg_1234.ofx --cert cert.pem",
    )
    p.add_argument("file", metavar="FILE", help="the signed document ('-': stdin)")
    p.add_argument(
        "--cert",
        metavar="cert.pem",
        help="the signer's certificate (default: CMI_SIGNING_CERT, the configured one)",
    )
    p.add_argument(
        "--signature",
        metavar="SIG",
        help="a detached signature over FILE's exact bytes (default: FILE.sig when it exists)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("terms", help="register, list and revoke customers' sharing terms")
    terms = p.add_subparsers(dest="terms_command", metavar="ACTION", parser_class=_Parser)
    terms.required = True
    t = terms.add_parser("add", help="register terms (as the firm's policy answers them)")
    t.add_argument("--customer", required=True, metavar="REF", help="pseudonymous reference")
    t.add_argument("--destination", metavar="URL", help="where documents go ('pull': nowhere)")
    _secret_options(t, "CMI_DESTINATION_SECRET")
    t.add_argument("--standard", default="cmi", help="default: cmi")
    t.add_argument("--type", metavar="DOCTYPE", help="the document type, if several")
    t.add_argument("--fields", metavar="a,b,c", help="the fields that may be shared")
    t.add_argument("--when", default="now", metavar="now|digest:6h|pull", help="default: now")
    t.add_argument(
        "--purpose",
        default="Keep the customer's records of their transactions",
        metavar="TEXT",
        help="why the customer shares, in their words (default: keeping their records)",
    )
    t.add_argument("--purpose-code", default="records", metavar="CODE", help="default: records")
    t.add_argument(
        "--until",
        metavar="DATE|+Nd",
        help="when the terms lapse: a date, an ISO time, or days from now (+365d)",
    )
    t.set_defaults(func=cmd_terms_add)
    t = terms.add_parser("list", help="list terms")
    t.add_argument("--customer", metavar="REF", help="only this customer's terms")
    t.add_argument("--all", action="store_true", help="include revoked terms")
    t.add_argument("--json", action="store_true", help="print JSON, for scripts")
    t.set_defaults(func=cmd_terms_list)
    t = terms.add_parser("revoke", help="revoke terms: nothing more goes out under them")
    t.add_argument("id", metavar="ID", help="the terms' id, as cmi terms add printed it")
    t.set_defaults(func=cmd_terms_revoke)

    p = sub.add_parser("links", help="customers' links to their intermediaries")
    links = p.add_subparsers(dest="links_command", metavar="ACTION", parser_class=_Parser)
    links.required = True
    lk = links.add_parser(
        "create", help="a single-use link code for a signed-in customer's account"
    )
    lk.add_argument("--account", required=True, metavar="ACCOUNT", help="the firm's account id")
    lk.add_argument("--ttl", type=int, default=10, metavar="MINUTES", help="default: 10")
    lk.add_argument("--json", action="store_true", help="print JSON, for scripts")
    lk.set_defaults(func=cmd_links_create)
    lk = links.add_parser("list", help="list links")
    lk.add_argument("--account", metavar="ACCOUNT", help="only this account's links")
    lk.add_argument("--intermediary", metavar="NAME", help="only this intermediary's links")
    lk.add_argument("--all", action="store_true", help="include revoked links")
    lk.add_argument("--json", action="store_true", help="print JSON, for scripts")
    lk.set_defaults(func=cmd_links_list)
    lk = links.add_parser("revoke", help="revoke a link and every terms of its reference")
    lk.add_argument("id", metavar="ID", help="the link's id (cmi links list)")
    lk.set_defaults(func=cmd_links_revoke)

    p = sub.add_parser("emit", help="emit a canonical transaction under its customer's terms")
    p.add_argument("file", metavar="FILE.json", help="the transaction ('-': stdin)")
    p.add_argument(
        "--customer",
        action="append",
        metavar="REF",
        help="a customer the transaction concerns (repeatable; default: its customer_ref)",
    )
    p.set_defaults(func=cmd_emit)

    p = sub.add_parser("deliver", help="deliver the outbox to customers' destinations")
    p.add_argument("--once", action="store_true", help="deliver what is due now, then exit")
    p.add_argument("--poll", type=float, default=1.0, help="idle poll interval, seconds")
    p.set_defaults(func=cmd_deliver)

    p = sub.add_parser("outbox", help="inspect the outbox and redrive dead letters")
    outbox = p.add_subparsers(dest="outbox_command", metavar="ACTION", parser_class=_Parser)
    outbox.required = True
    o = outbox.add_parser("status", help="counts by state, oldest pending, disabled")
    o.add_argument("--json", action="store_true", help="print JSON, for monitoring")
    o.set_defaults(func=cmd_outbox)
    o = outbox.add_parser("list", help="rows, newest first")
    o.add_argument(
        "--state",
        choices=["pending", "leased", "retry", "delivered", "dead", "pull", "cancelled"],
        help="only rows in this state",
    )
    o.add_argument("--limit", type=int, default=50, metavar="N", help="at most N rows (50)")
    o.add_argument("--json", action="store_true", help="print JSON, for scripts")
    o.set_defaults(func=cmd_outbox)
    o = outbox.add_parser("redrive", help="make a dead row (or all dead since T) pending")
    o.add_argument("id", nargs="?", metavar="ID", help="the dead row's id (msg_...)")
    o.add_argument("--since", metavar="T", help="an ISO 8601 time with a timezone")
    o.set_defaults(func=cmd_outbox)
    o = outbox.add_parser(
        "problems", help="documents that could not be made for a customer's terms"
    )
    o.add_argument("--limit", type=int, default=50, metavar="N", help="at most N (50)")
    o.add_argument("--json", action="store_true", help="print JSON, for scripts")
    o.set_defaults(func=cmd_outbox_problems)
    o = outbox.add_parser(
        "purge", help="delete finished documents, offers and acceptances past their window"
    )
    o.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    o.add_argument(
        "--keep-days",
        type=float,
        default=30.0,
        help="delivered, pull-only, merged and cancelled documents (30)",
    )
    o.add_argument(
        "--keep-dead-days",
        type=float,
        default=90.0,
        help="dead letters and emission problems (90)",
    )
    o.add_argument(
        "--keep-offer-days", type=float, default=30.0, help="offers, once expired (30; >= 1)"
    )
    o.add_argument(
        "--keep-acceptance-days",
        type=float,
        default=30.0,
        help="finished acceptances; they go with their offer (30; >= 1)",
    )
    o.add_argument(
        "--keep-attempt-days", type=float, default=7.0, help="attempts of delivered ones (7)"
    )
    o.set_defaults(func=cmd_outbox_purge)

    p = sub.add_parser("acceptances", help="recover acceptances whose booking process died")
    acceptances = p.add_subparsers(
        dest="acceptances_command", metavar="ACTION", parser_class=_Parser
    )
    acceptances.required = True
    a = acceptances.add_parser(
        "recover", help="complete or release acceptances whose lease ran out"
    )
    a.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (100)")
    a.add_argument(
        "--reference-firms",
        action="store_true",
        help="with the reference airline and lender (as cmi serve --reference-firms)",
    )
    a.add_argument(
        "--assume-not-booked",
        action="store_true",
        help="release stalled acceptances even when no plugin can say whether they were"
        " booked (cmi_find_booking)",
    )
    a.set_defaults(func=cmd_acceptances)

    p = sub.add_parser("db", help="the store's database")
    db = p.add_subparsers(dest="db_command", metavar="ACTION", parser_class=_Parser)
    db.required = True
    d = db.add_parser("migrate", help="create or upgrade the tables (CMI_DATABASE_URL)")
    d.set_defaults(func=cmd_db_migrate)
    d = db.add_parser(
        "sql",
        help="print the statements that create the tables, for your own migration tool",
        description="Print the DDL of the store's tables at their current schema version,"
        " with the row that records the version: tables made from it are found current by"
        " the store. Example: cmi db sql --dialect postgresql --schema cmi > cmi.sql",
    )
    d.add_argument(
        "--dialect",
        choices=("sqlite", "postgresql"),
        help="the database (default: the one CMI_DATABASE_URL names)",
    )
    d.add_argument(
        "--schema",
        default="cmi",
        help="PostgreSQL: the schema the tables go in, as ?schema= in the URL (default: cmi)",
    )
    d.set_defaults(func=cmd_db_sql)

    p = sub.add_parser("intermediaries", help="register, rotate and revoke intermediaries")
    inter = p.add_subparsers(dest="intermediaries_command", metavar="ACTION", parser_class=_Parser)
    inter.required = True
    i = inter.add_parser("add", help="register NAME with its secret (again: add a secret)")
    i.add_argument("name", metavar="NAME", help="the name it signs its requests with")
    _secret_options(i, "CMI_INTERMEDIARY_SECRET")
    i.set_defaults(func=cmd_intermediaries_add)
    i = inter.add_parser(
        "rotate", help="give NAME a new secret (shown once); the old ones work for --grace"
    )
    i.add_argument("name", metavar="NAME", help="the intermediary")
    i.add_argument(
        "--grace",
        type=_duration,
        default=86400.0,
        metavar="24h",
        help="how long the old secrets keep working (90s, 30m, 24h, 7d; 0: not at all)",
    )
    i.add_argument("--out", metavar="FILE", help="write the new secret to a new 0600 file")
    i.set_defaults(func=cmd_intermediaries_rotate)
    i = inter.add_parser(
        "revoke", help="refuse NAME's requests from now on; revoke its links and terms"
    )
    i.add_argument("name", metavar="NAME", help="the intermediary")
    i.set_defaults(func=cmd_intermediaries_revoke)
    i = inter.add_parser("list", help="intermediaries and when their secrets end")
    i.add_argument("--json", action="store_true", help="print JSON, for scripts")
    i.set_defaults(func=cmd_intermediaries_list)

    p = sub.add_parser(
        "secrets", aliases=["secret"], help="make secrets and keys; seal stored secrets"
    )
    sec = p.add_subparsers(dest="secrets_command", metavar="ACTION", parser_class=_Parser)
    sec.required = True
    x = sec.add_parser("generate", help="a fresh whsec_ secret (for terms or intermediaries)")
    x.add_argument("--out", metavar="FILE", help="write it to a new 0600 file, not stdout")
    x.set_defaults(func=cmd_secrets_generate)
    x = sec.add_parser("generate-key", help="a fresh cmisk_ key for CMI_SECRETS_KEY")
    x.add_argument("--out", metavar="FILE", help="write it to a new 0600 file, not stdout")
    x.set_defaults(func=cmd_secrets_generate_key)
    x = sec.add_parser(
        "encrypt", help="seal every stored secret with the first key of CMI_SECRETS_KEY"
    )
    x.set_defaults(func=cmd_secrets_encrypt)

    def server_limit_options(p: argparse.ArgumentParser) -> None:
        group = p.add_argument_group(
            "limits on clients",
            "each overrides its CMI_* setting (docs: Run at scale, Slow and idle clients)",
        )
        group.add_argument(
            "--header-timeout",
            type=float,
            metavar="S",
            help="close a connection whose request head is not in within S seconds"
            " (CMI_HEADER_TIMEOUT, default 10)",
        )
        group.add_argument(
            "--body-timeout",
            type=float,
            metavar="S",
            help="answer 408 and close when a body is not in within S seconds of its head"
            " (CMI_BODY_TIMEOUT, default 30)",
        )
        group.add_argument(
            "--keep-alive-timeout",
            type=float,
            metavar="S",
            help="close a connection idle for S seconds after a response"
            " (CMI_KEEP_ALIVE_TIMEOUT, default 5)",
        )
        group.add_argument(
            "--max-connections",
            type=int,
            metavar="N",
            help="keep at most N connections open; over it, the one that waited longest for"
            " its head is closed (CMI_MAX_CONNECTIONS, default 1000)",
        )

    p = sub.add_parser("listen", help="run a customer's store (tests and demos)")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (127.0.0.1)")
    p.add_argument("--store", required=True, metavar="DIR", help="where documents are saved")
    _secret_options(p, "CMI_DESTINATION_SECRET", several=True)
    p.add_argument("--cert", metavar="cert.pem", help="also verify the firm's XML-DSig")
    server_limit_options(p)
    p.set_defaults(func=cmd_listen)

    def intermediary_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--to", required=True, metavar="URL", help="the firm's endpoint base")
        p.add_argument(
            "--intermediary",
            required=True,
            metavar="NAME",
            help="act as this intermediary, as the firm registered it",
        )
        _secret_options(p, "CMI_INTERMEDIARY_SECRET")

    p = sub.add_parser("request", help="as an intermediary: post a request, print the offers")
    p.add_argument("file", metavar="FILE", help="a canonical request (JSON) or request XML")
    intermediary_options(p)
    p.add_argument(
        "--date",
        type=travel_date,
        metavar="DATE|+Nd",
        help="the wanted travel date: a date or days from today (+30d); over the file's",
    )
    p.add_argument("--xml", action="store_true", help="print the signed offers XML")
    p.add_argument(
        "--ids", action="store_true", help="print only the offer ids, one a line (for scripts)"
    )
    p.add_argument("--output", "-o", metavar="FILE", help="with --xml: write it here")
    p.set_defaults(func=cmd_request)

    p = sub.add_parser("accept", help="as an intermediary: accept an offer for a customer")
    p.add_argument("offer_id", metavar="OFFER_ID", help="the offer, as cmi request printed it")
    intermediary_options(p)
    p.add_argument("--customer", required=True, metavar="REF", help="the offer's customer")
    p.add_argument(
        "--id",
        metavar="ID",
        help="the acceptance id (idempotency key); by default derived from the intermediary,"
        " the offer and the customer, so running the command again books nothing more",
    )
    p.add_argument("--name", help="the customer's name, if they choose to give it")
    p.add_argument("--email", help="the customer's e-mail, if they choose to give it")
    p.set_defaults(func=cmd_accept)

    p = sub.add_parser("demo", help="run the whole loop on loopback, with nothing to set up")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve the firm's CMI endpoint")
    p.add_argument(
        "--metrics",
        action="store_true",
        help="serve GET /metrics (Prometheus text format), behind the CMI_METRICS_TOKEN"
        " bearer token if set, else open to whoever reaches the endpoint",
    )
    p.add_argument(
        "--reference-firms",
        action="store_true",
        help="plug in the reference airline and lender (their data in the working folder)",
    )
    p.add_argument("--port", type=int, default=8000, help="the port to listen on (8000)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (127.0.0.1; 0.0.0.0: every interface)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serve from N processes (one a core: a process runs one request's code at a time)",
    )
    server_limit_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("parse", help="parse an XML document back into canonical JSON")
    p.add_argument("file", metavar="FILE", help="the document ('-': stdin)")
    p.add_argument("--standard", "-s", help="the standard (default: from the root element)")
    p.add_argument("--type", "-t", metavar="DOCTYPE", help="the document type")
    p.add_argument("--output", "-o", metavar="FILE", help="write here (atomically), not stdout")
    p.add_argument(
        "--cert",
        metavar="cert.pem",
        help="verify the signature first, and parse only what it covers",
    )
    p.set_defaults(func=cmd_parse)
    document(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cmi`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"cmi: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _ReportedError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_INVALID
    except (InputError, CMIError) as exc:
        if args.debug:
            raise
        print(f"cmi: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"cmi: internal error: {type(exc).__name__}: {exc} (run with --debug and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
