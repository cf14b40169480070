"""One `kokoa lab up` or `down` at a time per lab directory (a lock in /run/lock, no root needed)."""

from __future__ import annotations

import pytest


def test_a_second_up_or_down_on_the_same_lab_is_refused_while_one_runs(tmp_path):
    import click

    from kokoa_infra.lab.cli import exclusive, lock_path

    lab_dir = tmp_path / "lab"
    try:
        with exclusive(lab_dir):
            with pytest.raises(click.ClickException, match="another `kokoa lab up` or `down` is running"):
                with exclusive(lab_dir):
                    pass
        with exclusive(lab_dir):  # released: the next one runs
            pass
    finally:
        lock_path(lab_dir).unlink(missing_ok=True)
