"""The reference firms (an airline and a lender) as plugins: the core finds them through an
entry-point group, like any other plugin, and never imports them by name."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cmi_sdk._exceptions import ConfigurationError, PluginError

__all__ = ["REFERENCE_FIRMS", "REFERENCE_FIRMS_GROUP", "reference_firms"]

REFERENCE_FIRMS_GROUP = "cmi_sdk.reference_firms"
"""The entry-point group a reference firm is installed under: each entry names a callable
taking ``database`` (a file path) and ``firm`` (the firm's identifier) that returns the
plugin object."""

REFERENCE_FIRMS: tuple[str, ...] = ("airline", "lender")
"""The reference firms ``cmi serve --reference-firms`` and ``cmi demo`` run, in order."""


def reference_firms(
    directory: Path, *, firm: str, names: Iterable[str] = REFERENCE_FIRMS
) -> dict[str, Any]:
    """The named reference firms as plugin objects, each keeping its data in
    ``directory/<name>.db``.

    :raises ConfigurationError: a named firm is not installed.
    :raises PluginError: its entry point failed to load.
    """
    installed = {
        entry.name: entry for entry in importlib.metadata.entry_points(group=REFERENCE_FIRMS_GROUP)
    }
    firms: dict[str, Any] = {}
    for name in names:
        entry = installed.get(name)
        if entry is None:
            raise ConfigurationError(
                f"no reference firm {name!r} is installed (entry-point group"
                f" {REFERENCE_FIRMS_GROUP}; installed: {', '.join(sorted(installed)) or 'none'});"
                " an installation from a checkout registers them when installed again"
                " (pip install -e .)"
            )
        try:
            factory: Callable[..., Any] = entry.load()
        except Exception as exc:
            raise PluginError(
                f"the reference firm {name!r} failed to load: {exc}", plugin=name
            ) from exc
        firms[name] = factory(database=directory / f"{name}.db", firm=firm)
    return firms
