"""The built wheel carries everything needed at run time.

Builds the wheel, installs it into a fresh virtualenv, and runs ``cmi`` from a directory
outside the repository, so nothing can come from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "cmi-sdk"
    # Build from a copy of the tracked layout, so a stray build/ or egg-info cannot leak in.
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "site"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("cmi_sdk-*.whl")
    return found


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "cmi_sdk/__init__.py",
        "cmi_sdk/py.typed",
        "cmi_sdk/outbox/sqlite.py",
        "cmi_core/schemas/consent-1.0.xsd",
        "cmi_ofx/plugin.py",
        "cmi_ofx/sgml.py",
        "cmi_ofx/reader.py",
        "cmi_ofx/values.py",
        "cmi_ofx/py.typed",
        "cmi_ofx/schemas/ofx-statement-1.0.xsd",
        "cmi_ofx/templates/statement.ofx.j2",
        "cmi_airline/emsr.py",
        "cmi_ubl/plugin.py",
        "cmi_ubl/py.typed",
        "cmi_ubl/schemas/cmi-ubl-1.0-Invoice.xsd",
        "cmi_ubl/schemas/cmi-ubl-1.0-cac.xsd",
        "cmi_ubl/schemas/cmi-ubl-1.0-cbc.xsd",
        "cmi_ubl/templates/Invoice.xml.j2",
        "cmi_ubl/templates/_macros.xml.j2",
        "cmi_sdk/outbox/postgres.py",
        "cmi_sdk/outbox/sql/sqlite/queries.sql",
        "cmi_sdk/outbox/sql/sqlite/migrations/0001_tables.sql",
        "cmi_sdk/outbox/sql/postgres/queries.sql",
        "cmi_sdk/outbox/sql/postgres/migrations/0001_tables.sql",
        "cmi_lender/plugin.py",
        "cmi_core/plugin.py",
        "cmi_core/schemas/__init__.py",
        "cmi_ticket/plugin.py",
        "cmi_ticket/schemas/ticket-1.0.xsd",
        "cmi_ticket/templates/ticket.xml.j2",
        "cmi_sdk_pytest/__init__.py",
    ):
        assert required in names, f"{required} is missing from the wheel"
    assert any(n.startswith("cmi_core/schemas/") and n.endswith(".xsd") for n in names)
    assert any(n.startswith("cmi_core/templates/") and n.endswith(".j2") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "docs/", "plugins/")) for n in names)


def test_installed_wheel_renders_and_validates(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run(
        [str(bindir / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(ROOT / "examples" / "ticket.json", work / "ticket.json")
    shutil.copy(ROOT / "examples" / "bank-transaction.json", work / "bank-transaction.json")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"

    def cmi(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bindir / "cmi"), *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    where = subprocess.run(
        [str(bindir / "python"), "-c", "import cmi_sdk, cmi_core; print(cmi_sdk.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(env_dir) in where.stdout, "cmi_sdk must come from the installed wheel"

    # The store's named queries and migrations are read from the installed package.
    ddl = cmi("db", "sql", "--dialect", "sqlite")
    assert ddl.returncode == 0, ddl.stderr
    assert "CREATE TABLE IF NOT EXISTS cmi_outbox" in ddl.stdout

    listing = cmi("standards")
    assert listing.returncode == 0, listing.stderr
    assert "cmi-ticket" in listing.stdout
    assert "cmi " in listing.stdout

    rendered = cmi("render", "--standard", "cmi-ticket", "ticket.json", "-o", "ticket.xml")
    assert rendered.returncode == 0, rendered.stderr
    checked = cmi("validate", "ticket.xml")
    assert checked.returncode == 0, checked.stderr
    assert "valid cmi-ticket ticket" in checked.stdout

    assert "ofx 2.2" in listing.stdout
    rendered = cmi("render", "--standard", "ofx", "bank-transaction.json", "-o", "statement.ofx")
    assert rendered.returncode == 0, rendered.stderr
    checked = cmi("validate", "statement.ofx")
    assert checked.returncode == 0, checked.stderr
    assert "valid ofx statement" in checked.stdout

    assert "ubl 2.4" in listing.stdout
    rendered = cmi(
        "render", "--standard", "ubl", "--type", "Invoice", "ticket.json", "-o", "inv.xml"
    )
    assert rendered.returncode == 0, rendered.stderr
    checked = cmi("validate", "inv.xml")
    assert checked.returncode == 0, checked.stderr
    assert "valid ubl Invoice" in checked.stdout

    demo = cmi("demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "landed in the customer's store and verified" in demo.stdout.replace("\n", " ")
