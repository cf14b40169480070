"""The lab's own pieces: executor semantics with a fake SSH runner, and real namespace hosts with sshd."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest

from kokoa_infra.lab import executor
from kokoa_infra.lab.executor import COMMAND, COPY_TO_REMOTE, Completed, ExecutorError, SshRunner, apply
from kokoa_infra.lab.hosts import Host, Lab, Topology, lab_unavailable, namespaces
from kokoa_infra.mockrun import DeclaredResource
from tests.lab_fixture import TAG

STACK = "urn:pulumi:lab::kokoa::pulumi:pulumi:Stack::kokoa-lab"
KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
       "-----END OPENSSH PRIVATE KEY-----\n")


def urn(name: str, typ: str = COMMAND) -> str:
    return f"urn:pulumi:lab::kokoa::{typ}::{name}"


def command(name: str, create: str = "", *, host: str = "10.0.0.1", deps: tuple[str, ...] = (),
            parent: str = STACK, dbr: bool = False, **inputs) -> DeclaredResource:
    conn = {"host": host, "port": 22.0, "user": "root", "privateKey": KEY, "hostKey": "ssh-ed25519 AAAAC3 lab"}
    body = {"connection": conn, "create": create or f"echo create {name}", **inputs}
    secret = {"connection"} | ({"stdin"} if "stdin" in inputs else set())
    return DeclaredResource(urn=urn(name), type=COMMAND, name=name, inputs=body,
                            secret_paths=frozenset(secret), dependencies=tuple(urn(d) for d in deps),
                            parent=parent, delete_before_replace=dbr)


class FakeRunner:
    """Records (host, command, stdin, environment) and fails commands containing `fail_on`."""

    def __init__(self, fail_on: str | None = None, output: str = "") -> None:
        self.calls: list[tuple[str, str, str | None, dict]] = []
        self.fail_on = fail_on
        self.output = output

    def run(self, connection, command, stdin, environment):
        self.calls.append((connection["host"], command, stdin, dict(environment)))
        if self.fail_on and self.fail_on in command:
            return Completed(7, self.output + "\nout line", "boom: " + self.output)
        return Completed(0, "ok\n", "")

    @property
    def commands(self) -> list[str]:
        return [c[1] for c in self.calls]


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "commands.json"


def test_first_run_creates_in_registration_order_and_skips_other_types(state_file):
    component = DeclaredResource(urn=urn("blog", "kokoa:index:Origin"), type="kokoa:index:Origin", name="blog",
                                 inputs={}, secret_paths=frozenset(), dependencies=(), parent=STACK,
                                 delete_before_replace=False)
    resources = [command("a"), component,
                 command("b", deps=("a",), parent=component.urn),
                 command("c", deps=("b",))]
    runner = FakeRunner()
    report = apply(resources, state_file, runner, echo=lambda _: None)
    assert runner.commands == ["echo create a", "echo create b", "echo create c"]
    assert report.counts == {"created": 3}
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600


def test_registration_order_violating_a_dependency_is_refused(state_file):
    resources = [command("b", deps=("a",)), command("a")]
    with pytest.raises(ExecutorError, match="registered before its dependency a"):
        apply(resources, state_file, FakeRunner(), echo=lambda _: None)


def test_dependencies_through_components_are_followed():
    comp_urn = urn("blog", "kokoa:index:Origin")
    component = DeclaredResource(urn=comp_urn, type="kokoa:index:Origin", name="blog", inputs={},
                                 secret_paths=frozenset(), dependencies=(), parent=STACK,
                                 delete_before_replace=False)
    steps = executor.plan([component, command("inner", parent=comp_urn),
                           DeclaredResource(urn=urn("after", COMMAND), type=COMMAND, name="after",
                                            inputs=command("after").inputs, secret_paths=frozenset(),
                                            dependencies=(comp_urn,), parent=STACK,
                                            delete_before_replace=False)])
    assert [(r.name, deps) for r, deps in steps] == [("inner", []), ("after", [urn("inner")])]


def test_rerun_with_identical_inputs_runs_nothing(state_file):
    resources = [command("a", stdin="secret-stdin-value"), command("b", deps=("a",))]
    apply(resources, state_file, FakeRunner(), echo=lambda _: None)
    runner = FakeRunner()
    report = apply(resources, state_file, runner, echo=lambda _: None)
    assert runner.calls == []
    assert report.counts == {"unchanged": 2}


def test_changed_stdin_runs_update_or_else_create(state_file):
    apply([command("a", update="reload a", stdin="v1"), command("b", stdin="v1")], state_file,
          FakeRunner(), echo=lambda _: None)
    runner = FakeRunner()
    report = apply([command("a", update="reload a", stdin="v2"), command("b", stdin="v2")], state_file,
                   runner, echo=lambda _: None)
    assert runner.calls == [("10.0.0.1", "reload a", "v2", {}), ("10.0.0.1", "echo create b", "v2", {})]
    assert report.counts == {"updated": 2}


def test_changed_environment_is_an_update_and_is_sent(state_file):
    apply([command("a", environment={"KOKOA_HASH": "1"})], state_file, FakeRunner(), echo=lambda _: None)
    runner = FakeRunner()
    apply([command("a", environment={"KOKOA_HASH": "2"})], state_file, runner, echo=lambda _: None)
    assert runner.calls == [("10.0.0.1", "echo create a", None, {"KOKOA_HASH": "2"})]


def test_environment_names_sshd_refuses_are_an_error(state_file):
    with pytest.raises(ExecutorError, match="AcceptEnv"):
        apply([command("a", environment={"HASH": "1"})], state_file, FakeRunner(), echo=lambda _: None)


def test_changed_triggers_replace_delete_first_when_asked(state_file):
    apply([command("a", delete="undo a", triggers=["1"], dbr=True)], state_file, FakeRunner(), echo=lambda _: None)
    runner = FakeRunner()
    report = apply([command("a", create="make a v2", delete="undo a v2", triggers=["2"], dbr=True)],
                   state_file, runner, echo=lambda _: None)
    assert runner.commands == ["undo a", "make a v2"]
    assert report.counts == {"replaced": 1}


def test_changed_connection_replaces_create_before_delete_by_default(state_file):
    apply([command("a", delete="undo a")], state_file, FakeRunner(), echo=lambda _: None)
    runner = FakeRunner()
    apply([command("a", delete="undo a", host="10.0.0.2")], state_file, runner, echo=lambda _: None)
    assert [(h, c) for h, c, _, _ in runner.calls] == [("10.0.0.2", "echo create a"), ("10.0.0.1", "undo a")]


def test_failed_delete_of_a_replacement_is_retried_next_run(state_file):
    apply([command("a", delete="undo a")], state_file, FakeRunner(), echo=lambda _: None)
    with pytest.raises(ExecutorError):
        apply([command("a", delete="undo a", host="10.0.0.2")], state_file, FakeRunner(fail_on="undo"),
              echo=lambda _: None)
    runner = FakeRunner()
    report = apply([command("a", delete="undo a", host="10.0.0.2")], state_file, runner, echo=lambda _: None)
    assert [(h, c) for h, c, _, _ in runner.calls] == [("10.0.0.1", "undo a")]
    assert report.counts == {"deleted": 1, "unchanged": 1}


def test_removed_resources_are_deleted_dependants_first(state_file):
    resources = [command("a", delete="del a"), command("b", delete="del b", deps=("a",)),
                 command("c", delete="del c", deps=("b",)), command("keep")]
    apply(resources, state_file, FakeRunner(), echo=lambda _: None)
    runner = FakeRunner()
    report = apply([command("keep")], state_file, runner, echo=lambda _: None)
    assert runner.commands == ["del c", "del b", "del a"]
    assert report.counts == {"deleted": 3, "unchanged": 1}
    assert report.changed == ["deleted c", "deleted b", "deleted a"]
    assert list(json.loads(state_file.read_text())["resources"]) == [urn("keep")]


def test_failure_stops_the_run_and_keeps_what_succeeded(state_file):
    resources = [command("a"), command("b", create="explode b", deps=("a",)), command("c", deps=("b",))]
    with pytest.raises(ExecutorError) as failed:
        apply(resources, state_file, FakeRunner(fail_on="explode"), echo=lambda _: None)
    assert failed.value.exit_code == 7
    assert "create b on root@10.0.0.1:22 failed (exit code 7" in str(failed.value)
    assert "boom" in str(failed.value)
    assert list(json.loads(state_file.read_text())["resources"]) == [urn("a")]
    runner = FakeRunner()
    apply(resources, state_file, runner, echo=lambda _: None)
    assert runner.commands == ["explode b", "echo create c"]


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


def test_copy_to_remote_string_asset_is_copied_with_cat(state_file):
    copy = DeclaredResource(
        urn=urn("cfg", COPY_TO_REMOTE), type=COPY_TO_REMOTE, name="cfg",
        inputs={"connection": command("x").inputs["connection"], "remotePath": "/etc/kokoa/a b.conf",
                "source": {executor.ASSET_SIG_KEY: executor.STRING_ASSET_SIG, "text": "hello\n"}},
        secret_paths=frozenset(), dependencies=(), parent=STACK, delete_before_replace=False)
    runner = FakeRunner()
    apply([copy], state_file, runner, echo=lambda _: None)
    assert runner.calls == [("10.0.0.1", "cat > '/etc/kokoa/a b.conf'", "hello\n", {})]


def test_ssh_argv_pins_the_host_key_and_runs_in_the_operator_namespace(tmp_path):
    argv = SshRunner("lab-client", tmp_path).argv(
        {"host": "172.31.255.11", "port": 2222.0, "user": "root"}, tmp_path / "key",
        tmp_path / "known_hosts", ["KOKOA_X"], "echo hi")
    assert argv[:5] == ["ip", "netns", "exec", "lab-client", "ssh"]
    for option in ("StrictHostKeyChecking=yes", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
                   "BatchMode=yes", "ConnectTimeout=10", "SendEnv=KOKOA_X"):
        assert option in argv
    assert argv[-7:] == ["-p", "2222", "-l", "root", "172.31.255.11", "--", "echo hi"]


HOSTTEST_PREFIX = f"kokoah{TAG}-"


@pytest.mark.netns
def test_two_hosts_run_commands_over_ssh_from_the_operator_namespace_and_leave_nothing():
    reason = lab_unavailable(f"{HOSTTEST_PREFIX}probe")
    if reason:
        pytest.skip(reason)
    lab = Lab(Path(f"/var/lib/kokoa-lab-hosttest{TAG}"), HOSTTEST_PREFIX)
    hosts = (Host("client", "client", "172.31.255.2", f"{HOSTTEST_PREFIX}client"),
             Host("one", "edge", "172.31.255.21", f"{HOSTTEST_PREFIX}one", origin="x"),
             Host("two", "edge", "172.31.255.22", f"{HOSTTEST_PREFIX}two", origin="x"))
    topo = Topology(ipaddress.ip_network("172.31.255.0/24"), hosts)
    try:
        lab.ensure(topo, echo=lambda _: None)

        def hello(host: Host, host_key_of: Host | None = None) -> DeclaredResource:
            conn = {"host": host.ip, "port": 22.0, "user": "root", "privateKey": lab.operator_key.read_text(),
                    "hostKey": lab.host_key((host_key_of or host).netns)}
            create = 'echo "$KOKOA_GREETING from $(hostname)" > /run/kokoa-hello && cat > /etc/kokoa/stdin'
            return DeclaredResource(urn=urn(f"hello-{host.name}"), type=COMMAND, name=f"hello-{host.name}",
                                    inputs={"connection": conn, "create": create, "stdin": f"to {host.name}",
                                            "environment": {"KOKOA_GREETING": "hello"}},
                                    secret_paths=frozenset({"connection"}), dependencies=(), parent=STACK,
                                    delete_before_replace=False)

        runner = SshRunner(f"{HOSTTEST_PREFIX}client", lab.dir / "tmp")
        report = apply([hello(hosts[1]), hello(hosts[2])], lab.dir / "commands.json", runner, echo=lambda _: None)
        assert report.counts == {"created": 2}
        for host in hosts[1:]:
            hello_file = lab.on_host(host.netns, ["cat", "/run/kokoa-hello"], check=True).stdout
            assert hello_file == f"hello from {host.name}\n"
            assert lab.on_host(host.netns, ["cat", "/etc/kokoa/stdin"], check=True).stdout == f"to {host.name}"
            # Its own pid namespace, with sshd as init.
            assert lab.on_host(host.netns, ["cat", "/proc/1/comm"], check=True).stdout == "sshd\n"
        assert not Path("/run/kokoa-hello").exists() and not Path("/etc/kokoa/stdin").exists()

        # The pinned host key is checked: host one's key does not let us into host two.
        with pytest.raises(ExecutorError) as refused:
            apply([hello(hosts[2], host_key_of=hosts[1])], lab.dir / "other.json", runner, echo=lambda _: None)
        assert refused.value.exit_code == 255
    finally:
        left = lab.down(echo=lambda _: None)
    assert left == []
    assert not {h.netns for h in hosts} & namespaces()


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
