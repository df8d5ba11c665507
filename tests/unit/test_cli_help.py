"""Every subcommand's help: a one-line summary, help on every option, an example that
parses, and the CMI_* variables it reads (each one the SDK knows)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

import pytest

from cmi_sdk.cli import build_parser
from cmi_sdk.cli._help import GUIDE, ONLY_FROM_ENVIRONMENT
from cmi_sdk.config import Settings


def _commands(
    parser: argparse.ArgumentParser, path: str = ""
) -> list[tuple[str, argparse.ArgumentParser]]:
    found: list[tuple[str, argparse.ArgumentParser]] = []
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    seen: set[int] = set()
    for name, sub in subs[0].choices.items():
        if id(sub) not in seen:
            seen.add(id(sub))
            found += _commands(sub, f"{path} {name}".strip())
    return found


COMMANDS = _commands(build_parser())
KNOWN = {f"CMI_{name.upper()}" for name in Settings.model_fields} | ONLY_FROM_ENVIRONMENT


def test_every_command_has_a_guide_entry_and_no_entry_is_stale() -> None:
    assert {path for path, _ in COMMANDS} == set(GUIDE)


def _without_help(parser: argparse.ArgumentParser) -> list[list[str]]:
    return [
        action.option_strings or [action.dest]
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        and action.help is not argparse.SUPPRESS
        and not (action.help or "").strip()
    ]


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=[p for p, _ in COMMANDS])
def test_every_option_has_help(path: str, parser: argparse.ArgumentParser) -> None:
    assert _without_help(parser) == [], f"cmi {path}: options without help"


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=[p for p, _ in COMMANDS])
def test_every_command_says_what_it_does_with_an_example_and_its_variables(
    path: str, parser: argparse.ArgumentParser
) -> None:
    assert parser.description, f"cmi {path}: no summary"
    assert parser.epilog is not None
    assert "example:\n  cmi " in parser.epilog
    assert "reads: " in parser.epilog
    example, variables = GUIDE[path]
    assert example.startswith(f"cmi {path} ") or example == f"cmi {path}"
    # The example is a command line the parser takes as this command.
    args = build_parser().parse_args(shlex.split(example)[1:])
    assert args.func is parser.get_default("func")
    assert set(variables) <= KNOWN, set(variables) - KNOWN
    for name in variables:
        assert name in parser.epilog.replace("\n  ", " ")


def test_a_command_that_signs_says_it_reads_the_key() -> None:
    for path in ("emit", "serve", "terms add", "render"):
        assert "CMI_SIGNING_KEY" in GUIDE[path][1], path


def test_help_prints_the_example_and_variables() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cmi_sdk.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "the port to listen on" in result.stdout
    assert "example:\n  cmi serve --reference-firms --port 8000" in result.stdout
    assert "CMI_DATABASE_URL" in result.stdout


def test_an_option_without_help_is_caught() -> None:
    """The check above can fail: a parser with a bare option is found out."""
    bare = argparse.ArgumentParser()
    bare.add_argument("--port")
    bare.add_argument("name")
    bare.add_argument("--host", help="where")
    assert _without_help(bare) == [["--port"], ["name"]]
