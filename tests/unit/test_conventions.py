"""One CLI convention: exit codes and environment variables in every --help, -s/--stack alike
everywhere, `kokoa dns` as `kokoa-dns`, progress on stderr, no silent wait."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

import kokoa_infra
from kokoa_infra import conventions, dns_cli
from kokoa_infra.cli import main
from kokoa_infra.lab import cli as lab_cli
from kokoa_infra.lab import deploy
from kokoa_infra.lab.executor import ExecutorError

PACKAGE = Path(kokoa_infra.__file__).parent


def commands(group: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, group)]
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            found += commands(command, path + (name,))
    return found


ALL = commands(main)


def help_of(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_tree_is_what_the_readme_lists():
    assert {" ".join(path) for path, _ in ALL} >= {
        "", "add-origin", "add-edge", "bundle", "drain", "undrain", "remove-edge", "under-attack", "health",
        "dns", "dns list", "dns add", "dns remove", "lab", "lab up", "lab status", "lab down", "lab rotate-ssh-key"}


@pytest.mark.parametrize("path", [path for path, _ in ALL], ids=lambda path: " ".join(path) or "kokoa")
def test_every_help_gives_the_exit_codes(path):
    text = " ".join(help_of(path).split())
    assert re.search(r"Exit codes: 0 [^;]+; 1 .+; 2 usage error or could not run \(.+\)\.", text), text


def test_every_environment_variable_the_package_reads_is_named_in_a_help():
    read = set()
    for source in PACKAGE.rglob("*.py"):
        if source.parent.name == "lab" and source.stem in ("cloudflare_standin", "resolver"):
            continue  # the lab's own helper processes, configured by the lab, not by users
        read |= set(re.findall(r'"((?:KOKOA|CLOUDFLARE)_[A-Z_]+)"', source.read_text()))
    assert read >= {"KOKOA_STACK", "KOKOA_PROJECT_DIR", "KOKOA_LAB_ORDER_SEED", "CLOUDFLARE_API_TOKEN"}
    shown = "".join(help_of(path) for path, _ in ALL)
    assert sorted(name for name in read if name not in shown) == []


def test_stack_is_s_or_stack_with_the_same_default_everywhere():
    found = []
    for path, command in ALL:
        for param in command.params:
            if param.name == "stack":
                found.append(" ".join(path))
                assert param.opts == ["-s", "--stack"], path
                assert param.envvar == conventions.STACK_ENV, path
                assert conventions.STACK_DEFAULT in param.help, path
    assert sorted(found) == ["add-edge", "add-origin", "bundle", "drain", "health", "remove-edge", "under-attack",
                             "undrain"]


def test_kokoa_dns_is_kokoa_dns():
    assert main.commands["dns"] is dns_cli.cli
    kokoa = CliRunner().invoke(main, ["dns", "list"], env={"CLOUDFLARE_API_TOKEN": None, "CLOUDFLARE_ZONE_ID": None})
    alone = CliRunner().invoke(dns_cli.cli, ["list"], env={"CLOUDFLARE_API_TOKEN": None, "CLOUDFLARE_ZONE_ID": None})
    assert kokoa.exit_code == alone.exit_code == 2
    assert kokoa.stderr == alone.stderr


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert (result.exit_code, result.stdout) == (0, "kokoa, version 0.1.0\n")


def test_a_heartbeat_speaks_when_nothing_else_does():
    said = io.StringIO()
    with conventions.heartbeat(lambda line: said.write(line + "\n"), every_s=0.3) as say:
        say("boot machines")
        time.sleep(1.2)
        say("done")
    lines = said.getvalue().splitlines()
    assert lines[0] == "boot machines" and lines[-1] == "done"
    assert 2 <= len(lines[1:-1]) <= 4
    assert all(re.fullmatch(r"  \.\.\. still: boot machines \(\d s\)", line) for line in lines[1:-1]), lines


@pytest.fixture
def fake_lab(monkeypatch, tmp_path):
    """`kokoa lab up` with every side effect replaced: no root, no namespaces, no lock."""
    monkeypatch.setattr(lab_cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(lab_cli, "lab_unavailable", lambda *_: None)
    monkeypatch.setattr(lab_cli, "exclusive", lambda _dir: __import__("contextlib").nullcontext())
    monkeypatch.setattr(deploy, "verify_sites", lambda lab, status, echo=None: {"edge-1": "hello from blog"})
    monkeypatch.setattr(deploy, "how_to_reach", lambda status: "curl ...")
    stack = tmp_path / "lab.yaml"
    stack.write_text("config: {}\n")
    return ["lab", "up", "--stack-file", str(stack), "--lab-dir", "/var/lib/kokoa-lab-never-made"]


def test_lab_up_puts_progress_on_stderr_and_the_result_on_stdout(fake_lab, monkeypatch):
    def up(lab, stack_file, echo):
        echo("hosts (/var/lib/kokoa-lab-never-made)")
        return SimpleNamespace(status={})

    monkeypatch.setattr(deploy, "up", up)
    result = CliRunner().invoke(main, fake_lab)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["hosts (/var/lib/kokoa-lab-never-made)",
                                          "sites (verified HTTPS from the client, through each edge)"]
    assert result.stdout.startswith("edge-1: hello from blog\n\nThe lab is up (")


def test_a_failed_remote_command_makes_lab_up_exit_1_not_its_own_code(fake_lab, monkeypatch):
    def up(lab, stack_file, echo):
        raise ExecutorError("create edge-1-install on 172.31.255.21: exit 42", exit_code=42)

    monkeypatch.setattr(deploy, "up", up)
    result = CliRunner().invoke(main, fake_lab)
    assert result.exit_code == 1
    assert result.stderr == ("Error: create edge-1-install on 172.31.255.21: exit 42\n"
                             "command logs: /var/lib/kokoa-lab-never-made/logs; `kokoa lab up` again carries on\n")


def test_lab_commands_that_cannot_run_exit_2(monkeypatch):
    monkeypatch.setattr(lab_cli.os, "geteuid", lambda: 1000)
    for args in (["lab", "up"], ["lab", "status"], ["lab", "down"], ["lab", "rotate-ssh-key"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, args
        assert result.stderr == "Error: kokoa lab needs root (network namespaces, mounts, /var/lib)\n"
