"""The test tiers: a unit test that asks for a namespace or the lab is refused at collection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def test_a_unit_test_using_a_namespace_is_refused(tmp_path):
    tests = tmp_path / "tests"
    (tests / "unit").mkdir(parents=True)
    (tests / "conftest.py").write_text((PROJECT / "tests" / "conftest.py").read_text()
                                       .replace('pytest_plugins = ["tests.support.lab_fixture"]', ""))
    (tests / "unit" / "test_wrong.py").write_text("def test_wrong(netns):\n    pass\n\n\ndef test_right():\n    pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", str(tests)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 4, result.stdout + result.stderr
    assert result.stderr == ("ERROR: tests in the wrong tier:\n"
                             "  tests/unit/test_wrong.py::test_wrong: a unit test using make_netns, netns\n\n")


def test_the_tiers_are_marked_by_directory():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", "-m",
                             "netns or lab", "tests/unit"], capture_output=True, text=True, timeout=60, cwd=PROJECT)
    assert "no tests collected" in result.stdout, result.stdout
