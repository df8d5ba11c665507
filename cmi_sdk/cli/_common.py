"""Helpers every command module shares: input and output, secrets, the configured
adapter, exit codes and error reporting."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmi_sdk._adapter import Adapter
from cmi_sdk._exceptions import (
    CMIError,
    DocumentValidationError,
    MalformedXMLError,
    ModelValidationError,
    NotFoundError,
    ValidationIssue,
)
from cmi_sdk._files import replace_file, warn_if_shared, write_private_file
from cmi_sdk._standards import DocumentType

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
    try:
        replace_file(output, data)
    except OSError as exc:
        raise InputError(f"{output}: cannot write: {exc.strerror or exc}") from None


#: Why no option takes a secret's value: shown in the help and in the refusal.
_WHY_NOT_ON_COMMAND_LINE = (
    "a secret on the command line can be read by every user of the machine (ps, /proc) and"
    " stays in the shell's history"
)


class _RefusedSecret(argparse.Action):
    """``--secret VALUE``: refused, with what to use instead."""

    def __init__(self, option_strings: list[str], dest: str, env: str, **kwargs: Any) -> None:
        self.env = env
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,  # noqa: ARG002  (nothing is stored)
        values: object,  # noqa: ARG002  (the secret, which is not used)
        option_string: str | None = None,
    ) -> None:
        parser.error(
            f"{option_string} is refused: {_WHY_NOT_ON_COMMAND_LINE}; give --secret-file PATH"
            f" ('-' reads standard input) or set {self.env}"
        )


def _secret_options(p: argparse.ArgumentParser, env: str, *, several: bool = False) -> None:
    """``--secret-file`` (and the environment variable ``env``) for a command that needs a
    secret; ``--secret`` is refused with the reason."""
    p.add_argument(
        "--secret-file",
        action="append" if several else "store",
        metavar="PATH",
        help=(
            f"read the whsec_ secret{'s (one a line; repeatable)' if several else ''} from PATH"
            f" ('-': standard input), or set {env}; never give a secret as an argument:"
            f" {_WHY_NOT_ON_COMMAND_LINE}"
        ),
    )
    p.add_argument("--secret", action=_RefusedSecret, env=env, nargs="?", help=argparse.SUPPRESS)
    p.set_defaults(secret_env=env)


def _read_secrets(args: argparse.Namespace) -> list[str]:
    """The secrets of ``--secret-file`` (files, or '-') or of the command's environment
    variable; separated by lines, spaces or commas."""
    files = args.secret_file
    paths = [] if files is None else [files] if isinstance(files, str) else list(files)
    texts: list[str] = []
    for path in paths:
        if path != "-":
            warn_if_shared(path, "the secret file")
        texts.append(_read(path, 1 << 16).decode("utf-8", errors="replace"))
    if not paths:
        value = os.environ.get(args.secret_env)
        if not value:
            raise UsageError(
                f"this command needs a secret: give --secret-file PATH ('-' reads standard"
                f" input) or set {args.secret_env}"
            )
        texts.append(value)
    secrets = [part for text in texts for part in re.split(r"[\s,]+", text) if part]
    if not secrets:
        raise InputError(f"no secret found in {', '.join(paths)}")
    return secrets


def _read_secret(args: argparse.Namespace) -> str:
    """The one secret of ``--secret-file`` or the command's environment variable."""
    secrets = _read_secrets(args)
    if len(secrets) > 1:
        raise InputError("expected one secret, found several")
    return secrets[0]


def _write_secret(text: str, out: str | None) -> None:
    """Print a new secret (or key), or write it to a new file readable by its owner only."""
    if out is None or out == "-":
        _write(f"{text}\n".encode(), None)
        return
    try:
        write_private_file(out, f"{text}\n".encode())
    except FileExistsError:
        raise InputError(f"{out} exists; not overwriting it") from None
    except OSError as exc:
        raise InputError(f"{out}: cannot write: {exc.strerror or exc}") from None
    print(f"cmi: wrote {out} (readable by its owner only)", file=sys.stderr)


def _duration(text: str) -> float:
    """``--grace``: seconds, or a number with s, m, h or d."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 30m, 24h, 7d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


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


def _settings() -> Any:
    from cmi_sdk.config import Settings  # noqa: PLC0415

    return Settings.load()


def _emitting_adapter(args: argparse.Namespace, *, require_signer: bool = True) -> Adapter:
    """The adapter of the configured store and keys; refuses to produce unsigned documents."""
    return _configured_adapter(args.block, require_signer=require_signer)


def _configured_adapter(block: list[str], *, require_signer: bool) -> Adapter:
    settings = _settings()
    how = (
        "run `cmi keys generate keys` and set CMI_SIGNING_KEY=keys/key.pem and"
        " CMI_SIGNING_CERT=keys/cert.pem (or signing_key and signing_cert in cmi.toml)"
    )
    try:
        signer = settings.signer()
    except CMIError as exc:
        if require_signer:
            raise UsageError(f"{exc}; for a development pair, {how}") from None
        signer = None  # commands that sign nothing work without a usable key
    if require_signer and signer is None:
        raise UsageError(f"no signing key is configured: {how}")
    adapter: Adapter = settings.adapter(block=block, signer=signer)
    return adapter


def _print_json(data: object) -> None:
    _write((json.dumps(data, indent=2, default=str) + "\n").encode(), None)


def _until(text: str | None) -> str | None:
    """``--until``: a date (the terms lapse at its start, UTC), days from now (``+365d``)
    or an ISO 8601 time."""
    if text is None:
        return None
    import datetime as dt  # noqa: PLC0415

    days = re.fullmatch(r"\+(\d{1,5})d?", text.strip())
    if days is not None:
        return (dt.datetime.now(dt.UTC) + dt.timedelta(days=int(days.group(1)))).isoformat()
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        return text  # a full time: the model checks it is timezone-aware
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).isoformat()


def _client(args: argparse.Namespace) -> Any:
    from cmi_sdk.client import CMIClient  # noqa: PLC0415

    if not re.match(r"https?://[^/]", args.to):
        raise UsageError(f"--to {args.to!r} is not an http(s) URL, such as https://firm.example")
    return CMIClient(args.to, secret=_read_secret(args), intermediary=args.intermediary)


#: Said with an answer that is not the endpoint's own: the usual cause is the mount prefix.
_PREFIX_HINT = (
    "if the firm mounts its endpoint under a prefix, give it in --to"
    " (--to https://firm.example/partners); GET {base}/.well-known/cmi answers where the"
    " endpoint is"
)


@contextlib.contextmanager
def _reaching(base: str) -> Iterator[None]:
    """Report a request that got no HTTP answer (nothing listening, an unknown host, a TLS
    failure, a timeout) as what it is: the firm's endpoint could not be reached, exit 1,
    with the URL and the cause, never as a bug of the SDK."""
    import httpx  # noqa: PLC0415

    try:
        yield
    except httpx.HTTPError as exc:
        url = base
        with contextlib.suppress(RuntimeError):  # an error raised before a request was made
            url = str(exc.request.url)
        raise InputError(f"cannot reach {url}: {_network_cause(exc)}") from None


def _network_cause(exc: BaseException) -> str:
    """The root cause of a failed request, in words (the deepest exception explains)."""
    import socket  # noqa: PLC0415
    import ssl  # noqa: PLC0415

    import httpx  # noqa: PLC0415

    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = "; ".join(dict.fromkeys(str(e) for e in chain if str(e))) or type(exc).__name__
    if any(isinstance(e, ssl.SSLError) for e in chain) or "SSL" in text:
        return (
            f"the TLS handshake failed ({text}); is it an https endpoint, with a trusted"
            " certificate?"
        )
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "refused" in text.lower():
        return "the connection was refused: nothing listens there (is the firm's endpoint running?)"
    if any(isinstance(e, socket.gaierror) for e in chain):
        return f"the host name is unknown ({text})"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    return text


def _answer_problem(response: Any) -> InputError:
    """What a refusal (or an answer that is not the endpoint's) says, with the URL, and a
    hint where one helps."""
    url = str(response.request.url)
    base = url.split("/cmi/", 1)[0]
    status = f"{response.status_code} {response.reason_phrase}".strip()
    data: Any = None
    if "json" in response.headers.get("content-type", ""):
        with contextlib.suppress(ValueError):
            data = response.json()
    kind = data.get("type", "") if isinstance(data, dict) else ""
    if not isinstance(kind, str) or not kind.startswith("urn:cmi:problem:"):
        hint = f"; {_PREFIX_HINT.format(base=base)}" if response.status_code == 404 else ""
        return InputError(f"{url} answered {status}, not a CMI answer{hint}")
    slug = kind.removeprefix("urn:cmi:problem:")
    detail = str(data.get("detail", ""))
    hint = ""
    if slug == "not-found" and "no such route" in detail:
        hint = f"; {_PREFIX_HINT.format(base=base)}"
    return InputError(f"the firm answered {status} {slug} at {url}: {detail}{hint}")


class _ReportedError(Exception):
    """An error already explained on standard error."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _issue_line(source: str, issue: ValidationIssue) -> str:
    line = f"{issue.line}:" if issue.line is not None else ""
    where = f" {issue.path}:" if issue.path else ""
    return f"{source}:{line}{where} {issue.reason}"


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


def _serving_adapter(*, block: list[str], reference_firms: bool) -> Adapter:
    adapter = _configured_adapter(block, require_signer=False)
    if reference_firms:
        adapter = _with_reference_firms(block, adapter)
    return adapter


def _with_reference_firms(block: list[str], adapter: Adapter) -> Adapter:
    """The same adapter's settings, with the reference airline and lender plugged in:
    their SQLite files in the working directory, flights 30 days out seeded once."""
    from cmi_sdk._reference import reference_firms  # noqa: PLC0415
    from cmi_sdk.demo import seed_flights  # noqa: PLC0415

    firms = reference_firms(Path(), firm=adapter.firm)
    seed_flights(firms["airline"], skip_existing=True)
    firm: Adapter = _settings().adapter(
        block=block, signer=adapter.signer, plugins=list(firms.values())
    )
    return firm
