"""Where the Jinja2 templates are and the two environments that render them: the bundles'
files (shell, nginx, WireGuard: no escaping, undefined names fail) and HTML pages
(autoescaped)."""

from __future__ import annotations

import shlex
from pathlib import Path

import jinja2

# templates/ at the top of the repository; an installed package carries them as
# kokoa_infra/templates (pyproject.toml), found from any directory.
_PACKAGE = Path(__file__).resolve().parent
TEMPLATES_DIR = next((where for where in (_PACKAGE / "templates", _PACKAGE.parent / "templates") if where.is_dir()),
                     _PACKAGE / "templates")


def environment(*, html: bool = False) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=html,
        trim_blocks=True,
        lstrip_blocks=True,
        # Templates do not change while a program runs: compiled once, never stat()ed again.
        auto_reload=False,
    )
    env.filters["shell_quote"] = lambda value: shlex.quote(str(value))
    return env
