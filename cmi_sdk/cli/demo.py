"""``cmi demo``: the whole loop on loopback."""

from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:  # noqa: ARG001  (no options)
    """Run the whole loop on loopback: terms, requests, offers, acceptance, the ticket."""
    from cmi_sdk.demo import run_demo  # noqa: PLC0415

    def say(line: str) -> None:
        print(line, flush=True)

    return run_demo(say)
