"""The README's layout table names every module of the package, of the shared test code, of the benchmarks and
of docs/, and the repository points at no document outside itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
LISTED = ("kokoa_infra", "tests/support", "bench", "docs")
# Documents that live outside this repository: nothing in it may lean on them.
OUTSIDE = re.compile(r"\b(CONTRACT|LAB|STYLE|LAYOUT)\.md|/work/shared|(?i:\bthe seed('s)?\b(?! of))")


def layout_rows(readme: str) -> list[tuple[str, str]]:
    """(first cell, whole row) of each row of the table under `## Layout`."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return [(row.split("|")[1], row) for row in section.splitlines() if row.startswith("| `")]


def unlisted(rows: list[tuple[str, str]], modules: list[str]) -> list[str]:
    """Modules (paths) neither named in a first cell nor named by file name in their directory's row."""
    missing = []
    for module in modules:
        directory, name = module.rsplit("/", 1)
        named = any(f"`{module}`" in first for first, _ in rows)
        in_row = any(f"`{directory}/`" in first and f"`{name}`" in row for first, row in rows)
        if not (named or in_row):
            missing.append(module)
    return missing


def test_the_layout_table_names_every_module():
    rows = layout_rows((PROJECT / "README.md").read_text())
    modules = sorted(p.relative_to(PROJECT).as_posix() for top in LISTED for p in (PROJECT / top).rglob("*.py")
                     if p.name != "__init__.py" and "__pycache__" not in p.parts)
    assert "kokoa_infra/lab/context.py" in modules and "tests/support/stacks.py" in modules
    assert unlisted(rows, modules) == []


def test_the_check_sees_a_module_the_table_leaves_out():
    rows = layout_rows("# x\n\n## Layout\n\n| path | what |\n|---|---|\n"
                       "| `a/one.py` | one |\n| `a/b/` | `two.py`, and three |\n\n## Next\n\n| `a/b/three.py` | |\n")
    assert unlisted(rows, ["a/one.py", "a/b/two.py", "a/b/three.py"]) == ["a/b/three.py"]


def test_no_file_points_at_documents_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in files:
        path = PROJECT / name
        if name.startswith("tests/golden/") or path.suffix in (".png", ".json") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) and name != "tests/unit/test_layout.py":
                found.append(f"{name}:{number}: {line.strip()}")
    assert found == []
