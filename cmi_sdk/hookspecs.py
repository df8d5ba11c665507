"""The hooks cmi-sdk calls, and what each one promises.

Every hook's name starts with ``cmi_``, and the SDK always calls hooks with keyword
arguments, so an implementation may take only the arguments it needs. Implement one with
:data:`cmi_sdk.hookimpl`::

    from cmi_sdk import hookimpl

    @hookimpl
    def cmi_register_standards(register):
        register.add(MY_STANDARD)

The docs' hook reference (``docs/hooks.md``) is generated from the docstrings below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from cmi_sdk._standards import StandardRegistry

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "cmi_sdk"
"""The pluggy project name, and the entry-point group plugins are published under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks a hook specification (for this module only)."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a function or method as a hook implementation."""


@hookspec
def cmi_register_standards(register: StandardRegistry) -> None:
    """Add the XML standards a plugin provides.

    Called once, when an :class:`~cmi_sdk.Adapter` is created, after every plugin is
    registered. Each implementation calls ``register.add(standard)`` for every
    :class:`~cmi_sdk.Standard` it provides; return values are ignored.

    :param register: the adapter's :class:`~cmi_sdk.StandardRegistry`. Adding a standard
        whose name or root element is already taken raises :class:`~cmi_sdk.PluginError`,
        and the adapter is not created.
    """
