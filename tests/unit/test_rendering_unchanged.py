"""Existing stacks render the files they rendered before: every file of every bundle of
BASE_CONFIG and of the lab's stack, compared byte for byte with tests/golden/<stack>/<bundle>/<file> (rendered with
main's code before issue 17). A change that is meant for every stack updates the golden
files in its own commit, so that its diff shows exactly what existing stacks get;
`.venv/bin/python tests/unit/test_rendering_unchanged.py` writes them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script: tests.* as pytest finds them
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.rendering import bundles, lab_config
from tests.support.stacks import BASE_CONFIG

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
# The lab's stack as it was on main (tests/golden/lab-stack.yaml): the lab itself moves on.
STACKS = {"base": lambda: BASE_CONFIG, "lab": lambda: lab_config(GOLDEN / "lab-stack.yaml")}


def _rendered(stack: str) -> dict[str, dict[str, str]]:
    return bundles(STACKS[stack]())


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_existing_stacks_render_the_stored_files(stack):
    stored = {str(path.relative_to(GOLDEN / stack)): path.read_text()
              for path in (GOLDEN / stack).rglob("*") if path.is_file()}
    rendered = {f"{bundle}/{name}": text for bundle, files in _rendered(stack).items() for name, text in files.items()}
    assert sorted(rendered) == sorted(stored)
    for name, text in rendered.items():
        assert text == stored[name], f"{name} differs from tests/golden/{stack}/{name}"


if __name__ == "__main__":  # pragma: no cover - a developer's tool
    for stack in STACKS:
        for bundle, files in _rendered(stack).items():
            for name, text in files.items():
                path = GOLDEN / stack / bundle / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
