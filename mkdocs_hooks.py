"""mkdocs build hooks: the hooks reference is generated from cmi_sdk.hookspecs' docstrings."""

from __future__ import annotations

import inspect
import re
from typing import Any

from cmi_sdk import hookspecs as _module
from cmi_sdk.hookspecs import PROJECT_NAME

MARKER = "<!-- hookspecs -->"


def _spec_options(func: Any) -> dict[str, Any] | None:
    """The options pluggy's HookspecMarker left on ``func``; None if it is no hookspec."""
    options: dict[str, Any] | None = getattr(func, f"{PROJECT_NAME}_spec", None)
    return options


def hookspecs() -> list[Any]:
    """Every hookspec function in cmi_sdk.hookspecs, in source order."""
    funcs = [
        f
        for name, f in vars(_module).items()
        if name.startswith("cmi_") and inspect.isfunction(f) and _spec_options(f) is not None
    ]
    return sorted(funcs, key=lambda f: f.__code__.co_firstlineno)


def _markdown(doc: str) -> str:
    """A hookspec docstring as markdown: ``:param x:`` lines become a parameter list."""
    lines: list[str] = []
    in_params = False
    for line in inspect.cleandoc(doc).splitlines():
        match = re.match(r":param (\w+):\s*(.*)", line)
        if match:
            if not in_params:
                lines += ["", "**Parameters**", ""]
                in_params = True
            lines.append(f"- `{match[1]}`: {match[2]}")
        elif in_params and line.startswith("    "):
            lines[-1] += " " + line.strip()
        else:
            in_params = False
            lines.append(line)
    text = "\n".join(lines)
    # Sphinx roles read as code in markdown.
    return re.sub(r":(?:class|func|meth|data|attr):`~?([^`]+)`", r"`\1`", text)


def render_hooks() -> str:
    """The markdown of the whole hooks reference."""
    out = []
    for func in hookspecs():
        options = _spec_options(func) or {}
        sig = inspect.signature(func)
        kind = (
            "firstresult: the first non-None answer wins"
            if options.get("firstresult")
            else "every implementation is called; results are collected in a list"
        )
        out += [
            f"## `{func.__name__}`",
            "",
            f"```python\n{func.__name__}{sig}\n```",
            "",
            f"*Calling convention:* {kind}.",
            "",
            _markdown(func.__doc__ or ""),
            "",
        ]
    return "\n".join(out)


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    """mkdocs event: fill the marker on the hooks page."""
    if MARKER in markdown:
        return markdown.replace(MARKER, render_hooks())
    return markdown


def on_post_build(config: Any, **_: Any) -> None:
    """Write the stylesheet of Pygments' highlighting (the classes pymdownx.highlight
    puts on code blocks) into the site: made by the Pygments that highlighted it."""
    from pathlib import Path  # noqa: PLC0415

    from pygments.formatters import HtmlFormatter  # noqa: PLC0415

    css = Path(config["site_dir"]) / "css" / "pygments.css"
    css.parent.mkdir(parents=True, exist_ok=True)
    css.write_text(HtmlFormatter(style="default").get_style_defs(".highlight"), encoding="utf-8")
