"""Where the Jinja2 templates are and the two environments that render them: the bundles'
files (shell, nginx, WireGuard: no escaping, undefined names fail) and HTML pages
(autoescaped)."""

from __future__ import annotations

import shlex
from pathlib import Path

import jinja2

# Shipped inside the package (package-data), so an installed `kokoa` finds them from any directory.
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def environment(*, html: bool = False) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=html,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["shell_quote"] = lambda value: shlex.quote(str(value))
    return env
