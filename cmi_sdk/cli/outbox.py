"""``cmi emit``, ``deliver``, ``outbox``, ``acceptances`` and ``db``: the firm's documents on
their way to customers, and the store they wait in."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from cmi_sdk._delivery import CIRCUIT_OPEN, DeliveryProgress
from cmi_sdk._exceptions import (
    ConfigurationError,
    ModelValidationError,
)
from cmi_sdk._models import load_model
from cmi_sdk.cli._common import (
    EXIT_OK,
    UsageError,
    _emitting_adapter,
    _located,
    _print_json,
    _read,
    _serving_adapter,
    _settings,
    _write,
)
from cmi_sdk.outbox import OutboxRow


def cmd_emit(args: argparse.Namespace) -> int:
    """Emit a canonical transaction to its customer under their terms."""
    from cmi_sdk._models import Transaction  # noqa: PLC0415

    adapter = _emitting_adapter(args)
    text = _read(args.file)
    try:
        tx = load_model(Transaction, text)
    except ModelValidationError as exc:
        raise _located(args.file, exc) from None
    emissions = adapter.emit(tx, customer_refs=args.customer or None)
    if not emissions:
        print(
            f"cmi: no active sharing terms for {', '.join(args.customer or [tx.customer_ref])}:"
            " nothing emitted",
            file=sys.stderr,
        )
    lines = [
        f"{e.msg_id}  {e.terms_id}  {e.standard} {e.document_type}  {e.state}"
        + (f"  withheld={','.join(e.withheld)}" if e.withheld else "")
        for e in emissions
    ]
    _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
    return EXIT_OK


def cmd_deliver(args: argparse.Namespace) -> int:
    """Deliver the outbox: what is due now (--once), or until interrupted."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from cmi_sdk._limits import raise_open_files_limit  # noqa: PLC0415

    settings = _settings()
    adapter = _emitting_adapter(args, require_signer=False)
    options = settings.worker_options()
    # A connection a store: room for those in flight and as many kept alive.
    raise_open_files_limit(4 * options["concurrency"] + 256)
    worker = adapter.delivery_worker(**options)
    try:
        if args.once:
            stats = worker.run_once()
            skipped = f", skipped {stats.skipped}" if stats.skipped else ""
            lines = [
                f"delivered {stats.delivered}, retry later {stats.retried}, dead {stats.dead}"
                + skipped
            ]
            # Why rows wait for a retry, most frequent first: what an operator acts on.
            lines.extend(
                f"  retry: {count} x {reason}"
                for reason, count in stats.retry_reasons().most_common(20)
            )
            _write(("\n".join(lines) + "\n").encode(), None)
            return EXIT_OK
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        print(f"cmi: delivering from {adapter.database_url} (Ctrl-C stops)", file=sys.stderr)
        progress = _progress_line if sys.stderr.isatty() else None
        try:
            worker.run(stop=stop, poll_interval=args.poll, progress=progress)
        except KeyboardInterrupt:
            stop.set()
        if progress is not None:
            print(file=sys.stderr)
        return EXIT_OK
    finally:
        worker.close()


def _progress_line(progress: DeliveryProgress) -> None:
    """The worker's figures on one terminal line, rewritten in place."""
    sys.stderr.write(f"\r\x1b[K{progress.line()}")
    sys.stderr.flush()


def cmd_outbox(args: argparse.Namespace) -> int:
    """Inspect the outbox, or redrive dead rows."""
    import datetime as dt  # noqa: PLC0415

    adapter = _emitting_adapter(args, require_signer=False)
    store = adapter.store
    now = adapter.clock()
    if args.outbox_command == "status":
        status = store.status(now)
        circuits = open_circuits(store.rows(state="retry", limit=5000))
        data = {
            "counts": status.counts,
            "oldest_pending_age_seconds": status.oldest_pending_age,
            "disabled_destinations": list(status.disabled_destinations),
            "open_circuits": circuits,
        }
        if args.json:
            _print_json(data)
        else:
            lines = [f"{state:<10} {count}" for state, count in status.counts.items()]
            if status.oldest_pending_age is not None:
                lines.append(f"oldest pending: {status.oldest_pending_age:.0f} s")
            lines.extend(f"disabled: {url}" for url in status.disabled_destinations)
            lines.extend(
                f"open circuit: {url} ({count} documents waiting for its probe)"
                for url, count in circuits.items()
            )
            _write(("\n".join(lines) + "\n").encode(), None)
        return EXIT_OK
    if args.outbox_command == "list":
        rows = store.rows(state=args.state, limit=args.limit)
        if args.json:
            _print_json([r.summary() for r in rows])
        else:
            lines = [
                f"{r.msg_id}  {r.state:<9} attempts={r.attempts}  {r.destination or '(pull)'}"
                + (f"  last_error={r.last_error}" if r.last_error else "")
                for r in rows
            ]
            _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
        return EXIT_OK
    # redrive
    if (args.id is None) == (args.since is None):
        raise UsageError("outbox redrive takes an ID or --since T")
    if args.id is not None:
        count = store.redrive(msg_id=args.id, now=now)
    else:
        try:
            since = dt.datetime.fromisoformat(args.since)
        except ValueError:
            raise UsageError(f"--since {args.since!r} is not an ISO 8601 time") from None
        if since.tzinfo is None:
            raise UsageError("--since needs a timezone (for example 2026-11-24T00:00:00Z)")
        count = store.redrive(since=since.timestamp(), now=now)
    _write(f"redriven {count}\n".encode(), None)
    return EXIT_OK


def open_circuits(rows: list[OutboxRow]) -> dict[str, int]:
    """Destinations whose circuit a worker opened, with their documents waiting for it:
    read from the rows a worker failed at once for an open circuit (their last error
    says so), so every worker's circuits show, from any process."""
    found: dict[str, int] = {}
    for row in rows:
        if row.destination and (row.last_error or "").startswith(CIRCUIT_OPEN):
            found[row.destination] = found.get(row.destination, 0) + 1
    return found


def cmd_outbox_purge(args: argparse.Namespace) -> int:
    """Delete what is finished past its window: delivered, pull-only, merged and
    cancelled documents (``--keep-days``), dead letters and emission problems, expired
    offers with their finished acceptances, expired message ids (``--dry-run``: count
    them); the delivery worker does the same in small batches as it runs."""
    from cmi_sdk._retention import (  # noqa: PLC0415
        RETAINED,
        check_offer_windows,
        check_windows,
        purge_windows,
    )
    from cmi_sdk.outbox import RetentionStore  # noqa: PLC0415

    try:
        check_windows(args.keep_days, args.keep_dead_days, args.keep_attempt_days)
    except ConfigurationError:
        raise UsageError(
            "--keep-days, --keep-dead-days and --keep-attempt-days must be >= 0"
        ) from None
    try:
        check_offer_windows(args.keep_offer_days * 86400, args.keep_acceptance_days * 86400)
    except ConfigurationError:
        raise UsageError("--keep-offer-days and --keep-acceptance-days must be >= 1") from None
    adapter = _emitting_adapter(args, require_signer=False)
    store = adapter.store
    if not isinstance(store, RetentionStore):
        raise UsageError(f"{type(store).__name__} cannot purge")
    window = purge_windows(
        adapter.clock(),
        delivered=args.keep_days * 86400,
        dead=args.keep_dead_days * 86400,
        offers=args.keep_offer_days * 86400,
        acceptances=args.keep_acceptance_days * 86400,
        attempts=args.keep_attempt_days * 86400,
    )
    if args.dry_run:
        counts = store.purgeable(**window)
        verb = "would purge"
    else:
        counts = dict.fromkeys(RETAINED, 0)
        for _ in range(100_000):  # bounded: batches of 1,000 until none is left
            done = store.purge(**window, limit=1000)
            counts = {k: counts[k] + done[k] for k in counts}
            if not any(done.values()):
                break
        verb = "purged"
    said = ", ".join(f"{counts[kind]} {name}" for kind, name in RETAINED.items())
    _write(f"{verb} {said}\n".encode(), None)
    return EXIT_OK


def cmd_db_migrate(args: argparse.Namespace) -> int:  # noqa: ARG001  (no options)
    """Create or upgrade the store's tables (SQLite or PostgreSQL); idempotent."""
    from cmi_sdk._adapter import open_store  # noqa: PLC0415

    url = _settings().database_url
    store = open_store(url)
    store.migrate()
    shown = url.rsplit("@", maxsplit=1)[-1]  # never a password
    _write(f"migrated {shown}\n".encode(), None)
    return EXIT_OK


def cmd_db_sql(args: argparse.Namespace) -> int:
    """Print the statements that create the store's tables, for the firm's own migration
    tool; the dialect is the one ``CMI_DATABASE_URL`` names unless ``--dialect`` says."""
    from cmi_sdk.outbox.ddl import schema_sql  # noqa: PLC0415

    dialect = args.dialect
    if dialect is None:
        url = _settings().database_url
        dialect = "postgresql" if url.startswith(("postgresql:", "postgres:")) else "sqlite"
    _write(schema_sql(dialect, schema=args.schema).encode(), None)
    return EXIT_OK


def cmd_acceptances(args: argparse.Namespace) -> int:
    """Recover acceptances whose booking process died (their lease ran out)."""
    adapter = _serving_adapter(block=args.block, reference_firms=args.reference_firms)
    if not adapter.plugin_manager.hook.cmi_find_booking.get_hookimpls():
        # Without the firm's booking system, a booking made before the crash is invisible:
        # releasing its acceptance would let another acceptance book the offer again.
        if not args.assume_not_booked:
            raise UsageError(
                "no plugin implements cmi_find_booking, so a booking made before a crash"
                " cannot be seen: install the firm's plugin (or --reference-firms), or pass"
                " --assume-not-booked to release every stalled acceptance"
            )
        print(
            "cmi: no plugin implements cmi_find_booking: every stalled acceptance is taken"
            " as not booked (its hold released, a retry books afresh)",
            file=sys.stderr,
        )
    done = adapter.recover_acceptances(limit=args.limit)
    _write(f"booked {done['booked']}\nreleased {done['released']}\n".encode(), None)
    return EXIT_OK


def cmd_outbox_problems(args: argparse.Namespace) -> int:
    """List the documents that could not be made (emission problems), newest first."""

    adapter = _emitting_adapter(args, require_signer=False)
    problems = adapter.store.emission_problems(limit=args.limit)
    if args.json:
        _print_json(
            [
                {k: v for k, v in dataclasses.asdict(p).items() if k != "transaction"}
                for p in problems
            ]
        )
        return EXIT_OK
    lines = [f"{p.transaction_id}  terms={p.terms_id}  {p.standard}: {p.reason}" for p in problems]
    _write(("\n".join(lines) + "\n").encode() if lines else b"", None)
    return EXIT_OK
