"""Every command the README and the docs show runs, as written, on a fresh checkout, with
the clock a year ahead: an example that expires, or a command that only worked on the day
it was written, fails here.

Each page's ``sh`` blocks run in order, in one shell, in a new folder holding what a
checkout has (``examples/``), with the installed ``cmi`` on the path. What the reader
would do by hand is done for them: a command sent to the background (``... &``) is waited
for until its port answers, and stopped at the end; ``pip install`` is skipped (the test
runs in an environment where the checkout is installed). Ports are moved to free ones, so
runs side by side do not collide.

A block that cannot run on a fresh machine (it needs a PostgreSQL server, or files the
reader downloads) says why in an HTML comment just before it::

    <!-- not run: needs a PostgreSQL server -->

and only the blocks listed in ``NOT_RUN`` may.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLOCK = Path(__file__).resolve().parent / "clock_ahead"
A_YEAR = 366 * 24 * 3600

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_BLOCK = re.compile(
    r"(?:<!-- not run: (?P<why>[^>]*?) -->[ \t]*\n[ \t]*)?```sh\n(?P<code>.*?)```", re.S
)

#: The blocks that do not run here, by page: each needs something a fresh machine lacks.
NOT_RUN = {
    "README.md": {"the test suite itself"},
    "performance.md": {"benchmarks of minutes, judged by their own targets"},
    "scale.md": {"needs a PostgreSQL server"},
    "stores.md": {"the test suite itself"},
    "verify.md": {"needs an OFX statement and its signature, as a store received them"},
    "ubl.md": {"needs the official UBL 2.4 schemas, downloaded"},
}


def _blocks(page: Path) -> list[tuple[str | None, str]]:
    text = page.read_text(encoding="utf-8")
    return [(m.group("why"), m.group("code")) for m in _BLOCK.finditer(text)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_PRELUDE = r"""
set -euo pipefail
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
cmi_wait_port() {
    for _ in $(seq 1 150); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}
"""


def _script(code: str, ports: dict[str, str]) -> str:
    """The page's commands as a reader runs them: pip skipped, background servers waited
    for, ports moved."""
    for old, new in ports.items():
        code = code.replace(old, new)
    lines: list[str] = []
    joined = code.replace("\\\n", " ")
    for line in joined.splitlines():
        command = line.split("  #")[0].strip()
        if re.match(r"pip install\b", command):
            command = re.sub(r"^pip install .*?(&&|$)", "", command).strip()
            if not command:
                continue
        lines.append(command)
        if command.endswith("&"):
            port = re.search(r"--port (\d+)", command)
            if port is not None:
                lines.append(f"cmi_wait_port {port.group(1)}")
    return "\n".join(lines)


def _pages_with_commands() -> list[Path]:
    return [page for page in PAGES if _blocks(page)]


def test_only_the_listed_blocks_are_not_run() -> None:
    found = {
        page.name: {why for why, _ in _blocks(page) if why is not None}
        for page in _pages_with_commands()
    }
    assert {name: whys for name, whys in found.items() if whys} == NOT_RUN


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("page", _pages_with_commands(), ids=lambda p: p.name)
def test_documented_commands_run_a_year_from_now(page: Path, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    ports = {"8000": str(_free_port()), "8900": str(_free_port())}
    code = "\n".join(code for why, code in _blocks(page) if why is None)
    if not code.strip():
        pytest.skip("no command on this page runs here")
    script = _PRELUDE + _script(code, ports)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CMI_") and key not in {"PYTHONPATH"}
    }
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(CLOCK),
        CMI_TEST_CLOCK_AHEAD=str(A_YEAR),
        HOME=str(tmp_path),
    )
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert result.returncode == 0, (
        f"{page.name}: a documented command failed a year from now\n--- script\n{script}"
        f"\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    )


def test_the_clock_is_a_year_ahead_in_the_commands() -> None:
    """The harness's own check: a command sees the wall clock a year ahead, and dates
    made by C code are still dates."""
    env = {**os.environ, "PYTHONPATH": str(CLOCK), "CMI_TEST_CLOCK_AHEAD": str(A_YEAR)}
    code = (
        "import datetime as d, time\n"
        "now = d.datetime.now(d.UTC)\n"
        "assert isinstance(now.date(), d.date) and isinstance(d.datetime.fromisoformat("
        "'2030-01-01T00:00:00+00:00'), d.datetime)\n"
        "print(time.time(), now.timestamp(), d.date.today().toordinal())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    real = dt.datetime.now(dt.UTC)
    assert float(out[0]) - real.timestamp() > A_YEAR - 60
    assert float(out[1]) - real.timestamp() > A_YEAR - 60
    assert int(out[2]) - real.date().toordinal() >= 365
