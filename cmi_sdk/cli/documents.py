"""``cmi standards``, ``render``, ``validate``, ``parse``, ``verify`` and ``keys``: documents
and the keys that sign them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cmi_sdk._exceptions import (
    CMIError,
    ModelValidationError,
)
from cmi_sdk._models import load_model
from cmi_sdk._xml import DEFAULT_MAX_BYTES
from cmi_sdk.cli._common import (
    EXIT_INVALID,
    EXIT_OK,
    InputError,
    UsageError,
    _adapter,
    _emitting_adapter,
    _located,
    _read,
    _report,
    _resolve_names,
    _settings,
    _write,
)


def cmd_standards(args: argparse.Namespace) -> int:
    """List installed standards and their document types."""
    adapter = _adapter(args)
    if args.json:
        listing = adapter.standards.describe()
        _write((json.dumps(listing, indent=2) + "\n").encode(), None)
        return EXIT_OK
    # Names run as long as UBL's (RequestForQuotation), roots longer: a column as wide as
    # the longest name, and the root on a line of its own, so nothing runs over another.
    width = max((len(d.name) for s in adapter.standards for d in s.document_types), default=0)
    lines = []
    for std in adapter.standards:
        title = f"  {std.title}" if std.title else ""
        lines.append(f"{std.name} {std.version}{title}")
        for d in std.document_types:
            lines.append(f"  {d.name:<{width}}  from {d.model.__name__}")
            lines.append(f"  {'':<{width}}  root {d.root}")
    _write(("\n".join(lines) + "\n").encode(), None)
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    """Render a canonical JSON model as a document of a standard."""
    # Signing reads the configured key (CMI_SIGNING_KEY, CMI_SIGNING_CERT); refused without.
    adapter = _emitting_adapter(args) if getattr(args, "sign", False) else _adapter(args)
    doc_type = _resolve_names(adapter, args.standard, args.type)
    if doc_type is None:  # argparse requires --standard; kept for callers of cmd_render
        raise UsageError("render needs --standard")
    text = _read(args.input)
    try:
        model = load_model(doc_type.model, text)
    except ModelValidationError as exc:
        raise _located(args.input, exc) from None
    if getattr(args, "sign", False):
        xml = adapter.render_signed(model, standard=args.standard, document_type=args.type)
    else:
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
            # The rules an XSD cannot express (a currency's decimal places) are checked by
            # reading the model back; a minimized document has no complete model to read.
            if not doc.withheld:
                doc.to_model()
        except CMIError as exc:
            _report(path, exc)
            status = EXIT_INVALID
            continue
        if not args.quiet:
            note = f" (withheld: {', '.join(doc.withheld)})" if doc.withheld else ""
            line = f"{path}: valid {doc.standard.name} {doc.document_type.name}{note}\n"
            _write(line.encode(), None)
    return status


def cmd_parse(args: argparse.Namespace) -> int:
    """Parse a document back into its canonical model, printed as JSON."""
    adapter = _adapter(args)
    _resolve_names(adapter, args.standard, args.type)
    data = _read(args.file, adapter.parser.max_bytes)
    cert = _read(args.cert, 1 << 20) if args.cert else None
    try:
        if cert is not None:
            from cmi_sdk.signing import verify_detached, verify_document  # noqa: PLC0415

            beside = Path(f"{args.file}.sig")
            if args.file != "-" and beside.is_file():
                # A detached signature (OFX) covers the file's exact bytes: read them.
                signature = _read(str(beside), DEFAULT_MAX_BYTES)
                data = verify_detached(data, signature, cert, max_bytes=adapter.parser.max_bytes)
            else:
                # Values are read from what the signature covers, as the verifier saw it.
                data = verify_document(data, cert, max_bytes=adapter.parser.max_bytes)
        model = adapter.parse(data, standard=args.standard, document_type=args.type)
    except CMIError as exc:
        raise _located(args.file, exc) from None
    except ValueError as exc:  # not a certificate
        raise InputError(f"{args.cert}: not a PEM certificate: {exc}") from None
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
    """Verify a document's XML-DSig signature (inside it, or detached beside it) against a
    pinned certificate."""
    from cmi_sdk.signing import verify_detached, verify_document  # noqa: PLC0415

    cert_path = args.cert or _configured_certificate()
    cert = _read(cert_path, 1 << 20)
    data = _read(args.file, DEFAULT_MAX_BYTES)
    signature_path = args.signature
    if signature_path is None and args.file != "-" and Path(f"{args.file}.sig").is_file():
        signature_path = f"{args.file}.sig"
    try:
        if signature_path is not None:
            signature = _read(signature_path, DEFAULT_MAX_BYTES)
            verify_detached(data, signature, cert)
        else:
            verify_document(data, cert)
    except CMIError as exc:
        raise _located(args.file, exc) from None
    except ValueError as exc:  # not a certificate
        raise InputError(f"{cert_path}: not a PEM certificate: {exc}") from None
    if not args.quiet:
        how = f" (detached: {signature_path})" if signature_path is not None else ""
        _write(f"{args.file}: signature verified{how}\n".encode(), None)
    return EXIT_OK


def _configured_certificate() -> str:
    """The firm's certificate as configured (CMI_SIGNING_CERT, or cmi.toml's signing_cert)."""
    cert = _settings().signing_cert
    if cert is None:
        raise UsageError("verify needs the signer's certificate: --cert, or CMI_SIGNING_CERT")
    return str(cert)
