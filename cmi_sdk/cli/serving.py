"""``cmi serve`` and ``cmi listen``: the firm's endpoint, and a customer's store on loopback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from cmi_sdk.cli._common import (
    EXIT_OK,
    UsageError,
    _read,
    _read_secrets,
    _serving_adapter,
    _settings,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette


def cmd_listen(args: argparse.Namespace) -> int:
    """Run a customer's store: verify, dedup and save every delivered document."""
    from cmi_sdk.receiver import CustomerStore, format_line, serve  # noqa: PLC0415

    cert = _read(args.cert, 1 << 20) if args.cert else None

    def show(doc: Any) -> None:
        print(format_line(doc), flush=True)

    settings = _server_settings(args)
    store = CustomerStore(
        directory=args.store,
        secrets=_read_secrets(args),
        certificate=cert,
        on_document=show,
        body_timeout=settings.body_timeout,
    )

    def ready(port: int) -> None:
        print(f"listening on http://{args.host}:{port}/ storing in {args.store}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        serve(store, host=args.host, port=args.port, ready=ready, limits=settings.server_limits())
    return EXIT_OK


def _server_settings(args: argparse.Namespace) -> Any:
    """The settings, with the server limits given on the command line over them."""
    settings = _settings()
    given = {
        name: getattr(args, name)
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "max_connections")
        if getattr(args, name, None) is not None
    }
    return settings.model_copy(update=given) if given else settings


#: How ``cmi serve --workers N`` hands its options to the worker processes it starts.
_SERVE_OPTIONS = "CMI_SERVE_OPTIONS"


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the firm's CMI endpoint with uvicorn, in one process or ``--workers`` N."""
    from cmi_sdk._serving import run_server  # noqa: PLC0415

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    # Built here whatever the number of workers: a missing key or a bad setting is told
    # before anything listens, and the reference firms' data is seeded once.
    settings = _server_settings(args)
    limits = settings.server_limits()
    adapter = _serving_adapter(block=args.block, reference_firms=args.reference_firms)
    workers = "" if args.workers == 1 else f" with {args.workers} worker processes"
    print(
        f"cmi: serving on http://{args.host}:{args.port}/{workers} (Ctrl-C stops)",
        file=sys.stderr,
    )
    if args.metrics:
        if settings.metrics_token is None:
            print(
                f"cmi: GET /metrics is open to whoever reaches {args.host}:{args.port};"
                " set CMI_METRICS_TOKEN to ask for a bearer token",
                file=sys.stderr,
            )
        else:
            print("cmi: GET /metrics asks for the CMI_METRICS_TOKEN bearer token", file=sys.stderr)
    options: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": "warning",
        "access_log": False,
        "ws": "none",  # the endpoint is HTTP only: no upgrade to another protocol's limits
    }
    app_options = {
        "metrics": args.metrics,
        "metrics_token": settings.metrics_token,
        "body_timeout": settings.body_timeout,
    }
    if args.workers == 1:
        run_server(adapter.asgi_app(**app_options), limits=limits, **options)
        return EXIT_OK
    # One Python process runs one request's code at a time (the GIL): N processes use N
    # cores. Each builds its own adapter from the same settings; the store (replay cache,
    # offers, acceptances) is what they share.
    adapter.close()
    # The token is not passed on: each worker reads it from the settings, as this did.
    os.environ[_SERVE_OPTIONS] = json.dumps(
        {
            "block": args.block,
            "reference_firms": args.reference_firms,
            "metrics": args.metrics,
            "body_timeout": settings.body_timeout,
        }
    )
    run_server(
        "cmi_sdk.cli.serving:serve_app",
        factory=True,
        workers=args.workers,
        limits=limits,
        **options,
    )
    return EXIT_OK


def serve_app() -> Starlette:
    """The endpoint of one worker process of ``cmi serve --workers N``: an adapter built
    from the settings, with the options the command passed in ``CMI_SERVE_OPTIONS``."""
    options = json.loads(os.environ.get(_SERVE_OPTIONS, "{}"))
    adapter = _serving_adapter(
        block=options.get("block", []), reference_firms=options.get("reference_firms", False)
    )
    settings = _settings()
    return adapter.asgi_app(
        metrics=options.get("metrics", False),
        metrics_token=settings.metrics_token,
        body_timeout=options.get("body_timeout", settings.body_timeout),
    )
