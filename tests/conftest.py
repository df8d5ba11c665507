"""Shared fixtures and the hypothesis profiles (HYPOTHESIS_PROFILE=ci in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from cmi_sdk import Adapter

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def default_adapter() -> Adapter:
    """The default adapter: default and entry-point plugins (immutable once built)."""
    return Adapter()


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return ROOT / "examples"
