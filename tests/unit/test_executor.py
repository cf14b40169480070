"""The lab executor follows the engine and pulumi-command: one test per rule, each naming its source.

Sources (see kokoa_infra/lab/executor.py's docstring for the list): pulumi-command v1.2.1
`provider/pkg/provider/common/inputs.go`, `remote/command.go`, `remote/commandController.go`,
`remote/commandOutputs.go`; pulumi-go-provider v1.3.0 `infer/resource.go`; pulumi/pulumi
`pkg/resource/deploy/step_generator.go`, `sdk/go/common/resource/properties_path.go`.
All SSH here is a fake runner: no traffic.
"""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

import pytest

from kokoa_infra.lab import executor
from kokoa_infra.lab.executor import (
    COMMAND,
    Completed,
    ExecutorError,
    SshRunner,
    apply,
    parse_path,
    path_contains,
    replace_reasons,
)
from kokoa_infra.mocked_program import DeclaredResource

STACK = "urn:pulumi:lab::kokoa::pulumi:pulumi:Stack::kokoa-lab"
KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
       "-----END OPENSSH PRIVATE KEY-----\n")
OTHER_KEY = KEY.replace("bm9uZQ\n", "b3RoZXI\n")


def urn(name: str, typ: str = COMMAND, parent_type: str = "pulumi:pulumi:Stack") -> str:
    return f"urn:pulumi:lab::kokoa::{parent_type}${typ}::{name}"


def command(name: str, create: str = "", *, host: str = "10.0.0.1", deps: tuple[str, ...] = (),
            parent: str = STACK, dbr: bool = False, key: str = KEY, user: str = "root", port: float = 22.0,
            host_key: str = "ssh-ed25519 AAAAC3 lab", replace_on_changes: tuple[str, ...] = ("triggers[*]",),
            aliases: tuple[str, ...] = (), ignore_changes: tuple[str, ...] = (), retain: bool = False,
            **inputs) -> DeclaredResource:
    """A Command as the SDK registers it (it adds replaceOnChanges triggers[*] itself)."""
    conn = {"host": host, "port": port, "user": user, "privateKey": key, "hostKey": host_key}
    body = {"connection": conn, "create": create or f"echo create {name}", **inputs}
    secret = {"connection"} | ({"stdin"} if "stdin" in inputs else set())
    parent_type = parent.split("::")[2].split("$")[-1] if parent != STACK else "pulumi:pulumi:Stack"
    return DeclaredResource(urn=urn(name, parent_type=parent_type), type=COMMAND, name=name, inputs=body,
                            secret_paths=frozenset(secret),
                            dependencies=tuple(d if d.startswith("urn:") else urn(d) for d in deps),
                            parent=parent, delete_before_replace=dbr, replace_on_changes=replace_on_changes,
                            aliases=aliases, ignore_changes=ignore_changes, retain_on_delete=retain)


def component(name: str, typ: str = "kokoa:index:Origin", aliases: tuple[str, ...] = ()) -> DeclaredResource:
    return DeclaredResource(urn=urn(name, typ), type=typ, name=name, inputs={}, secret_paths=frozenset(),
                            dependencies=(), parent=STACK, delete_before_replace=False, aliases=aliases,
                            custom=False)


class FakeRunner:
    """Records (host, command, stdin, key) and fails commands containing `fail_on`; thread-safe."""

    def __init__(self, fail_on: str | None = None, output: str = "", stdout: str = "ok\n",
                 delay: float = 0.0) -> None:
        self.calls: list[tuple[str, str, str | None, str]] = []
        self.fail_on = fail_on
        self.output = output
        self.stdout = stdout
        self.delay = delay
        self.lock = threading.Lock()

    def run(self, connection, command, stdin, environment):
        assert environment == {}, "the executor never sends environment"
        time.sleep(self.delay)
        with self.lock:
            self.calls.append((connection["host"], command, stdin, connection["privateKey"]))
        if self.fail_on and self.fail_on in command:
            return Completed(7, self.output + "\nout line", "boom: " + self.output)
        return Completed(0, self.stdout, "")

    @property
    def commands(self) -> list[str]:
        return [c[1] for c in self.calls]

    @property
    def hosts_and_commands(self) -> list[tuple[str, str]]:
        return [(c[0], c[1]) for c in self.calls]


def quiet(_: str) -> None:
    pass


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "commands.json"


def run(resources, state_file, runner=None, **kw):
    return apply(resources, state_file, runner or FakeRunner(), echo=quiet, **kw)


# --- order ---------------------------------------------------------------------------------

def test_first_run_creates_dependencies_first_and_skips_other_types(state_file):
    comp = component("blog")
    b = command("b", deps=("a",), parent=comp.urn)
    resources = [command("a"), comp, b, command("c", deps=(b.urn,))]
    runner = FakeRunner()
    report = run(resources, state_file, runner)
    assert runner.commands == ["echo create a", "echo create b", "echo create c"]
    assert report.counts == {"created": 3}
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600


def test_registration_order_violating_a_dependency_is_refused(state_file):
    with pytest.raises(ExecutorError, match="registered before its dependency a"):
        run([command("b", deps=("a",)), command("a")], state_file)


def test_dependencies_through_components_are_followed():
    comp = component("blog")
    after = DeclaredResource(urn=urn("after"), type=COMMAND, name="after", inputs=command("after").inputs,
                             secret_paths=frozenset(), dependencies=(comp.urn,), parent=STACK,
                             delete_before_replace=False)
    steps = executor.plan([comp, command("inner", parent=comp.urn), after])
    inner = urn("inner", parent_type="kokoa:index:Origin")
    assert [(r.name, deps) for r, deps in steps] == [("inner", []), ("after", [inner])]


def test_independent_steps_run_in_a_seeded_shuffled_order(state_file, tmp_path):
    """Rule 5: the engine runs independent steps in parallel, so no order among them is promised."""
    resources = [command(n) for n in "abcdef"] + [command("last", deps=tuple("abcdef"))]
    orders = set()
    for seed in range(8):
        runner = FakeRunner()
        run(resources, tmp_path / f"s{seed}.json", runner, seed=seed)
        assert runner.commands[-1] == "echo create last"  # dependencies are always respected
        orders.add(tuple(runner.commands))
    assert len(orders) > 1
    again = FakeRunner()
    run(resources, tmp_path / "again.json", again, seed=3)
    first = FakeRunner()
    run(resources, tmp_path / "first.json", first, seed=3)
    assert again.commands == first.commands  # a seed reproduces its order


def test_a_missing_depends_on_fails_as_it_would_for_real(tmp_path):
    """Rule 5: `install` needs what `prepare` makes; without depends_on some order breaks it."""
    class Host:
        def __init__(self):
            self.files: set[str] = set()

        def run(self, connection, command, stdin, environment):
            if command.startswith("touch"):
                self.files.add(command.split()[1])
                return Completed(0, "", "")
            if command.startswith("need") and command.split()[1] not in self.files:
                return Completed(1, "", "missing " + command.split()[1])
            return Completed(0, "", "")

    def resources(with_dependency: bool):
        return [command("prepare", "touch /etc/x"), command("other"),
                command("install", "need /etc/x", deps=("prepare",) if with_dependency else ())]

    failures = 0
    for seed in range(12):
        try:
            apply(resources(False), tmp_path / f"no{seed}.json", Host(), echo=quiet, seed=seed)
        except ExecutorError:
            failures += 1
        apply(resources(True), tmp_path / f"yes{seed}.json", Host(), echo=quiet, seed=seed)  # never fails
    assert failures > 0


def test_independent_steps_run_in_parallel(state_file):
    """Rule 5: `pulumi up --parallel` defaults to unbounded."""
    runner = FakeRunner(delay=0.4)
    started = time.monotonic()
    run([command(n) for n in "abcd"], state_file, runner, parallel=4)
    assert time.monotonic() - started < 1.2
    assert len(runner.calls) == 4


def test_after_a_failure_nothing_new_starts_and_running_steps_finish(state_file):
    """Rule 5 and 11: in-flight steps complete, no new one starts; a failed create leaves no state."""
    resources = [command("a"), command("b", create="explode b", deps=("a",)), command("c", deps=("b",))]
    with pytest.raises(ExecutorError) as failed:
        run(resources, state_file, FakeRunner(fail_on="explode"))
    assert failed.value.exit_code == 7
    assert "create b on root@10.0.0.1:22 failed (exit code 7" in str(failed.value)
    assert "boom" in str(failed.value)
    assert list(json.loads(state_file.read_text())["resources"]) == [urn("a")]
    runner = FakeRunner()
    run(resources, state_file, runner)
    assert runner.commands == ["explode b", "echo create c"]


# --- update or replace -------------------------------------------------------------------

def test_rerun_with_identical_inputs_runs_nothing(state_file):
    resources = [command("a", stdin="secret-stdin-value"), command("b", deps=("a",))]
    run(resources, state_file)
    runner = FakeRunner()
    report = run(resources, state_file, runner)
    assert runner.calls == []
    assert report.counts == {"unchanged": 2}


def test_changed_stdin_runs_update_or_else_create_with_the_new_stdin(state_file):
    """Rule 2: commandController.go Update runs `update`, else `create`, with the new inputs."""
    run([command("a", update="reload a", stdin="v1"), command("b", stdin="v1")], state_file)
    runner = FakeRunner()
    report = run([command("a", update="reload a", stdin="v2"), command("b", stdin="v2")], state_file, runner)
    assert sorted((c, s) for _, c, s, _ in runner.calls) == [("echo create b", "v2"), ("reload a", "v2")]
    assert report.counts == {"updated": 2}


@pytest.mark.parametrize("change", [{"key": OTHER_KEY}, {"user": "admin"}, {"port": 2222.0},
                                    {"host_key": "ssh-ed25519 AAAAC3 rotated"}, {"host": "10.0.0.2"}])
def test_a_changed_connection_is_an_update_on_the_new_connection(state_file, change):
    """Rule 1: only `triggers` is replaceOnChanges (common/inputs.go); `connection` is secret only
    (remote/command.go), and the provider has an Update, so nothing else replaces (infer/resource.go)."""
    run([command("a", delete="undo a")], state_file)
    runner = FakeRunner()
    report = run([command("a", delete="undo a", **change)], state_file, runner)
    assert report.counts == {"updated": 1}
    assert runner.commands == ["echo create a"]  # no `undo a` anywhere
    host, _, _, key = runner.calls[0]
    assert host == change.get("host", "10.0.0.1") and key == change.get("key", KEY)


def test_changed_triggers_replace_delete_first_with_the_old_state(state_file):
    """Rules 1, 3, 4: the old delete (old connection) runs, then the new create."""
    run([command("a", delete="undo a", triggers=["server 1"], dbr=True)], state_file)
    runner = FakeRunner()
    report = run([command("a", create="make a v2", delete="undo a v2", triggers=["server 2"], dbr=True,
                          host="10.0.0.2", key=OTHER_KEY)], state_file, runner)
    assert [(h, c, k) for h, c, _, k in runner.calls] == [("10.0.0.1", "undo a", KEY),
                                                          ("10.0.0.2", "make a v2", OTHER_KEY)]
    assert report.counts == {"replaced": 1}


def test_create_before_delete_replacement_deletes_the_old_one_after_every_other_step(state_file):
    """Rule 4: the old state becomes a pending delete, deleted in GenerateDeletes at the end."""
    run([command("a", delete="undo a", triggers=["1"]), command("b")], state_file)
    runner = FakeRunner()
    run([command("a", delete="undo a", triggers=["2"], host="10.0.0.2"), command("b", stdin="new"),
         command("c", deps=("a",))], state_file, runner)
    assert runner.hosts_and_commands[-1] == ("10.0.0.1", "undo a")
    assert ("10.0.0.2", "echo create a") in runner.hosts_and_commands


def test_replace_on_changes_declared_by_the_program_replaces(state_file):
    """Rule 1: the resource's own replaceOnChanges, as recorded in the mock run."""
    run([command("a", replace_on_changes=("triggers[*]", "stdin"), stdin="1", delete="undo")], state_file)
    runner = FakeRunner()
    report = run([command("a", replace_on_changes=("triggers[*]", "stdin"), stdin="2", delete="undo")],
                 state_file, runner)
    assert report.counts == {"replaced": 1, "deleted": 1}  # the old one, after the create
    assert runner.commands == ["echo create a", "undo"]


def test_property_paths_match_as_the_engine_matches_them():
    """properties_path.go Contains: a pattern holds the paths below it; "*" matches one element."""
    assert parse_path('a.b[0]["c.d"][*]') == ("a", "b", 0, "c.d", "*")
    assert path_contains(("triggers", "*"), ("triggers", 0))
    assert not path_contains(("triggers", "*"), ("triggers",))
    assert path_contains(("connection",), ("connection", "privateKey"))
    assert replace_reasons({"triggers": ["a"]}, {"triggers": ["b"]}, (), ("triggers[*]",)) == ["triggers.*"]
    # Absent → present: the provider's schema key catches what the SDK's pattern does not.
    assert replace_reasons({}, {"triggers": ["b"]}, ("triggers",), ("triggers[*]",)) == ["triggers"]
    assert replace_reasons({"connection": {"user": "a"}}, {"connection": {"user": "b"}},
                           ("triggers",), ("triggers[*]",)) == []


def test_ignore_changes_keep_the_old_value(state_file):
    """Rule 8: infer/resource.go diff sets each ignored path back to its state value."""
    run([command("a", stdin="1", ignore_changes=("stdin",))], state_file)
    runner = FakeRunner()
    report = run([command("a", stdin="2", ignore_changes=("stdin",))], state_file, runner)
    assert runner.calls == [] and report.counts == {"unchanged": 1}


# --- deletes ------------------------------------------------------------------------------

def test_removed_resources_are_deleted_dependants_first(state_file):
    resources = [command("a", delete="del a"), command("b", delete="del b", deps=("a",)),
                 command("c", delete="del c", deps=("b",)), command("keep")]
    run(resources, state_file)
    runner = FakeRunner()
    report = run([command("keep")], state_file, runner)
    assert runner.commands == ["del c", "del b", "del a"]
    assert report.changed == ["deleted c", "deleted b", "deleted a"]
    assert list(json.loads(state_file.read_text())["resources"]) == [urn("keep")]


def test_retain_on_delete_drops_the_state_without_running_delete(state_file):
    run([command("a", delete="del a", retain=True)], state_file)
    runner = FakeRunner()
    report = run([], state_file, runner)
    assert runner.calls == [] and report.counts == {"deleted": 1}


def test_a_failed_pending_delete_is_retried_in_the_next_delete_phase(state_file):
    """Rule 4: a failed delete of a replaced resource stays pending and is retried at the end."""
    run([command("a", delete="undo a", triggers=["1"])], state_file)
    with pytest.raises(ExecutorError):
        run([command("a", delete="undo a", triggers=["2"], host="10.0.0.2")], state_file, FakeRunner(fail_on="undo"))
    runner = FakeRunner()
    report = run([command("a", delete="undo a", triggers=["2"], host="10.0.0.2"), command("new")],
                 state_file, runner)
    assert runner.hosts_and_commands == [("10.0.0.1", "echo create new"), ("10.0.0.1", "undo a")]
    assert report.counts == {"deleted": 1, "unchanged": 1, "created": 1}


def test_delete_runs_with_the_old_state(state_file):
    """Rule 3: commandController.go Delete uses req.State: old connection, old delete."""
    run([command("a", delete="undo v1", key=KEY)], state_file)
    runner = FakeRunner()
    run([], state_file, runner)
    assert [(c, k) for _, c, _, k in runner.calls] == [("undo v1", KEY)]


# --- environment and previous output ----------------------------------------------------------

def test_environment_fails_the_step_as_a_stock_sshd_refuses_setenv(state_file):
    """Rule 9: commandOutputs.go returns logAndWrapSetenvErr (diag.Error) when Setenv fails."""
    runner = FakeRunner()
    with pytest.raises(ExecutorError, match="could not set environment variable 'KOKOA_HASH'"):
        run([command("a"), command("b", deps=("a",), environment={"KOKOA_HASH": "1"})], state_file, runner)
    assert runner.commands == ["echo create a"]


def test_previous_output_in_env_is_a_warning_per_command_unless_disabled(state_file):
    """Rule 10: update and delete setenv PULUMI_COMMAND_STDOUT/STDERR; a refusal only warns."""
    run([command("a", stdin="1"), command("b", stdin="1", addPreviousOutputInEnv=False)], state_file,
        FakeRunner(stdout="installed\n"))
    state = json.loads(state_file.read_text())
    assert state["resources"][urn("a")]["outputs"] == {"stdout": "installed", "stderr": ""}
    runner = FakeRunner()
    report = run([command("a", stdin="2"), command("b", stdin="2", addPreviousOutputInEnv=False)],
                 state_file, runner)
    assert report.counts == {"updated": 2}
    assert len(report.warnings) == 1 and report.warnings[0].startswith("a: Unable to set 'PULUMI_COMMAND_STDOUT'")


# --- aliases, refresh, state ----------------------------------------------------------------

def test_an_aliased_resource_is_the_same_resource(state_file):
    """Rule 7: getOldResource finds the old state through an alias: no create, no delete."""
    run([command("old-name", "install", delete="uninstall")], state_file)
    runner = FakeRunner()
    report = run([command("new-name", "install", delete="uninstall", aliases=(urn("old-name"),))],
                 state_file, runner)
    assert runner.calls == [] and report.counts == {"unchanged": 1}
    assert list(json.loads(state_file.read_text())["resources"]) == [urn("new-name")]


def test_children_follow_their_parents_alias(state_file):
    """Rule 7: inheritedChildAlias swaps the parent's old name into the child's name prefix."""
    old_parent = component("edge-old", "kokoa:index:EdgeNode")
    run([old_parent, command("edge-old-install", "install", delete="uninstall", parent=old_parent.urn)],
        state_file)
    new_parent = component("edge-new", "kokoa:index:EdgeNode", aliases=(old_parent.urn,))
    runner = FakeRunner()
    report = run([new_parent, command("edge-new-install", "install", delete="uninstall", parent=new_parent.urn)],
                 state_file, runner)
    assert runner.calls == [] and report.counts == {"unchanged": 1}


def test_refresh_reads_commands_back_unchanged(state_file):
    """Rule 12: Command has no Read; pulumi-go-provider's default returns the state as it is."""
    run([command("a")], state_file)
    runner = FakeRunner()
    report = run([command("a")], state_file, runner, refresh=True)
    assert runner.calls == [] and report.counts == {"unchanged": 1}


# --- output and the SSH runner ----------------------------------------------------------------

def test_secrets_never_reach_the_output(state_file, capsys):
    stdin = "PrivateKey = c2VjcmV0LXdpcmVndWFyZC1rZXktbWF0ZXJpYWw=\n"
    lines: list[str] = []
    leaked = f"{stdin}{KEY}ssh: connect to host 10.0.0.1 port 22"
    with pytest.raises(ExecutorError) as failed:
        apply([command("a", create="explode", stdin=stdin)], state_file,
              FakeRunner(fail_on="explode", output=leaked), echo=lines.append)
    shown = str(failed.value) + "\n".join(lines) + "".join(capsys.readouterr())
    assert "c2VjcmV0LXdpcmVndWFyZC1rZXktbWF0ZXJpYWw=" not in shown
    assert "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ" not in shown
    assert "[secret]" in shown
    assert "connect to host 10.0.0.1" in shown  # the address is not a secret, only the key


def test_ssh_argv_pins_the_host_key_and_runs_in_the_operator_namespace(tmp_path):
    argv = SshRunner("lab-client", tmp_path).argv(
        {"host": "172.31.255.11", "port": 2222.0, "user": "root"}, tmp_path / "key",
        tmp_path / "known_hosts", "echo hi")
    assert argv[:5] == ["ip", "netns", "exec", "lab-client", "ssh"]
    for option in ("StrictHostKeyChecking=yes", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
                   "BatchMode=yes", "ConnectTimeout=10"):
        assert option in argv
    assert not any(a.startswith("SendEnv") for a in argv)
    assert argv[-7:] == ["-p", "2222", "-l", "root", "172.31.255.11", "--", "echo hi"]
