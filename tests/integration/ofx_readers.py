"""Independent OFX readers, run on what the SDK emits: libofx's ``ofxdump`` (the library
GnuCash uses; Debian package ``ofx``), ofxtools and ofxparse.

Each helper fails the test on any error the reader reports. ``ofxdump`` is a program: where
it is missing the tests that need it skip, except in CI (``CI`` set), where they fail, since
``.ci/run`` installs it.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def need_program(name: str, package: str) -> str:
    """The path of the program ``name`` (Debian's ``package``), or skip; in CI, which
    installs it, fail instead."""
    found = shutil.which(name)
    if found is None:
        reason = f"{name} is not installed (Debian: apt-get install {package})"
        if IN_CI:
            pytest.fail(f"{reason}; CI (CI is set) requires it")
        pytest.skip(reason)
    return found


def need_ofxdump() -> str:
    """The path of libofx's ``ofxdump``, or skip (fail in CI)."""
    return need_program("ofxdump", "ofx")


def ofxdump(data: bytes, folder: Path) -> list[str]:
    """Read ``data`` with libofx's ``ofxdump``; fail on any error it reports; return its
    lines."""
    program = need_ofxdump()
    path = folder / "statement.ofx"
    path.write_bytes(data)
    done = subprocess.run([program, str(path)], capture_output=True, timeout=60, check=False)
    lines = (done.stdout + done.stderr).decode("utf-8", errors="replace").splitlines()
    errors = [line for line in lines if "ERROR" in line]
    assert not errors, "\n".join(errors)
    assert done.returncode == 0, lines[-5:]
    return lines


def ofxdump_values(lines: list[str], label: str) -> list[str]:
    """The values ``ofxdump`` printed after ``label:`` (such as ``Total money amount``)."""
    return [line.split(":", 1)[1].strip() for line in lines if line.strip().startswith(label + ":")]


def ofxtools(data: bytes) -> Any:
    """Read ``data`` with ofxtools and convert it to its models. It warns when it skips a
    private tag (CMI.TRNID, CMI.EXTDNAME), as for every bank's INTU.BID; any other
    warning fails."""
    from ofxtools.models.base import PrivateTagWarning
    from ofxtools.Parser import OFXTree

    tree = OFXTree()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", PrivateTagWarning)
        tree.parse(io.BytesIO(data))
        return tree.convert()


def ofxparse(data: bytes) -> Any:
    """Read ``data`` with ofxparse (strictly: a parse problem is an error, not a warning)."""
    from ofxparse import OfxParser

    with warnings.catch_warnings():
        # ofxparse 0.21 calls BeautifulSoup's findAll, which bs4 4.13 calls deprecated,
        # and reads OFX 2 with bs4's HTML parser, which bs4 warns about.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="It looks like you're using an HTML parser")
        return OfxParser.parse(io.BytesIO(data), fail_fast=True)
