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
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from cmi_sdk import __version__
from cmi_sdk._adapter import Adapter
from cmi_sdk._exceptions import (
    CMIError,
    DocumentValidationError,
    MalformedXMLError,
    ModelValidationError,
    NotFoundError,
    ValidationIssue,
)
from cmi_sdk._models import load_model
from cmi_sdk._standards import DocumentType
from cmi_sdk._xml import DEFAULT_MAX_BYTES

__all__ = ["EXIT_INTERNAL", "EXIT_INVALID", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class UsageError(Exception):
    """Bad arguments: reported with exit code 2."""


class InputError(Exception):
    """Input that cannot be read: reported with exit code 1."""


def _read(path: str, limit: int | None = None) -> bytes:
    """Read ``path`` ('-' is standard input), at most ``limit`` + 1 bytes when limited."""
    size = -1 if limit is None else limit + 1
    try:
        if path == "-":
            return sys.stdin.buffer.read(size)
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _write(data: bytes, output: str | None) -> None:
    """Write ``data`` to ``output`` atomically, or to standard output in one piece."""
    if output is None or output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    target = Path(output)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.")
    except OSError as exc:
        raise InputError(f"{output}: cannot write: {exc.strerror or exc}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as an ordinary new file would be, not mkstemp's 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _adapter(args: argparse.Namespace) -> Adapter:
    return Adapter(block=args.block)


def _resolve_names(
    adapter: Adapter, standard: str | None, doc_type: str | None
) -> DocumentType[Any] | None:
    """Check names given on the command line, so a typo is a usage error (exit 2); return
    the named document type, if a standard was named."""
    if doc_type is not None and standard is None:
        raise UsageError("--type needs --standard")
    if standard is None:
        return None
    try:
        return adapter.standards.resolve(standard, doc_type)[1]
    except NotFoundError as exc:
        raise UsageError(str(exc)) from None


def cmd_standards(args: argparse.Namespace) -> int:
    """List installed standards and their document types."""
    adapter = _adapter(args)
    if args.json:
        listing = [
            {
                "name": std.name,
                "version": std.version,
                "title": std.title,
                "document_types": [
                    {
                        "name": d.name,
                        "root": d.root,
                        "model": d.model.__name__,
                        "description": d.description,
                    }
                    for d in std.document_types
                ],
            }
            for std in adapter.standards
        ]
        _write((json.dumps(listing, indent=2) + "\n").encode(), None)
        return EXIT_OK
    lines = []
    for std in adapter.standards:
        title = f"  {std.title}" if std.title else ""
        lines.append(f"{std.name} {std.version}{title}")
        lines.extend(
            f"  {d.name:<14} {d.root}  (from {d.model.__name__})" for d in std.document_types
        )
    _write(("\n".join(lines) + "\n").encode(), None)
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    """Render a canonical JSON model as a document of a standard."""
    adapter = _adapter(args)
    doc_type = _resolve_names(adapter, args.standard, args.type)
    if doc_type is None:  # argparse requires --standard; kept for callers of cmd_render
        raise UsageError("render needs --standard")
    text = _read(args.input)
    try:
        model = load_model(doc_type.model, text)
    except ModelValidationError as exc:
        raise _located(args.input, exc) from None
    xml = adapter.render(model, standard=args.standard, document_type=args.type)
    _write(xml, args.output)
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate documents; report every error with its line, path and reason."""
    adapter = _adapter(args)
    _resolve_names(adapter, args.standard, args.type)
    status = EXIT_OK
    for path in args.files:
        data = _read(path, adapter.parser.max_bytes)
        try:
            doc = adapter.validate(data, standard=args.standard, document_type=args.type)
            doc.to_model()  # the rules an XSD cannot express (a currency's decimal places)
        except CMIError as exc:
            _report(path, exc)
            status = EXIT_INVALID
            continue
        if not args.quiet:
            _write(f"{path}: valid {doc.standard.name} {doc.document_type.name}\n".encode(), None)
    return status


def cmd_parse(args: argparse.Namespace) -> int:
    """Parse a document back into its canonical model, printed as JSON."""
    adapter = _adapter(args)
    _resolve_names(adapter, args.standard, args.type)
    data = _read(args.file, adapter.parser.max_bytes)
    try:
        model = adapter.parse(data, standard=args.standard, document_type=args.type)
    except CMIError as exc:
        raise _located(args.file, exc) from None
    _write((model.model_dump_json(indent=2) + "\n").encode(), args.output)
    return EXIT_OK


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Write a development key pair: DIR/key.pem and a self-signed DIR/cert.pem."""
    from cmi_sdk.signing import generate_development_keys  # noqa: PLC0415

    try:
        key, cert = generate_development_keys(args.dir, algorithm=args.algorithm)
    except FileExistsError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"{args.dir}: cannot write: {exc.strerror or exc}") from None
    _write(f"{key}\n{cert}\n".encode(), None)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a document's XML-DSig signature against a pinned certificate."""
    from cmi_sdk.signing import verify_document  # noqa: PLC0415

    cert = _read(args.cert, 1 << 20)
    data = _read(args.file, DEFAULT_MAX_BYTES)
    try:
        verify_document(data, cert)
    except CMIError as exc:
        raise _located(args.file, exc) from None
    except ValueError as exc:  # not a certificate
        raise InputError(f"{args.cert}: not a PEM certificate: {exc}") from None
    if not args.quiet:
        _write(f"{args.file}: signature verified\n".encode(), None)
    return EXIT_OK


class _ReportedError(Exception):
    """An error already explained on standard error."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _issue_line(source: str, issue: ValidationIssue) -> str:
    line = f"{issue.line}:" if issue.line is not None else ""
    return f"{source}:{line} {issue.path}: {issue.reason}"


def _located(source: str, exc: CMIError) -> _ReportedError:
    if isinstance(exc, DocumentValidationError | ModelValidationError):
        head = str(exc).splitlines()[0]
        return _ReportedError([f"{source}: {head}"] + [_issue_line(source, i) for i in exc.issues])
    if isinstance(exc, MalformedXMLError) and exc.line is not None:
        return _ReportedError([f"{source}:{exc.line}: {exc}"])
    return _ReportedError([f"{source}: {exc}"])


def _report(source: str, exc: CMIError) -> None:
    for line in _located(source, exc).lines:
        print(line, file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cmi`` command."""
    parser = _Parser(
        prog="cmi",
        description="Customer-managed interactions: render, validate and parse standard XML.",
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

    p = sub.add_parser("verify", help="verify a signed document against a certificate")
    p.add_argument("file", metavar="FILE.xml", help="the signed document ('-': stdin)")
    p.add_argument("--cert", required=True, metavar="cert.pem", help="the signer's certificate")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("parse", help="parse an XML document back into canonical JSON")
    p.add_argument("file", metavar="FILE", help="the document ('-': stdin)")
    p.add_argument("--standard", "-s", help="the standard (default: from the root element)")
    p.add_argument("--type", "-t", metavar="DOCTYPE", help="the document type")
    p.add_argument("--output", "-o", metavar="FILE", help="write here (atomically), not stdout")
    p.set_defaults(func=cmd_parse)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
