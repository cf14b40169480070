"""kokoa_infra's modules import each other without a circle: every import counts, also those under
TYPE_CHECKING and those inside functions (a lazy import hides a circle from Python, not from a reader).
"""

from __future__ import annotations

from pathlib import Path

from tests.support.import_graph import cycles, import_graph

PACKAGE = Path(__file__).resolve().parents[2] / "kokoa_infra"


def test_kokoa_infra_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "kokoa_infra.lab.lab" in graph and "kokoa_infra.lab.servers" in graph["kokoa_infra.lab.lab"]
    assert cycles(graph) == []


def test_the_check_finds_a_cycle_through_type_checking_and_lazy_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    (package / "d.py").write_text("from pkg import a\n")
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
