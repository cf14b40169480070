"""Stand-in for the pulumi-command provider: applies the program's recorded remote commands over real SSH.

No Pulumi CLI or provider plugin can be had on the lab machine, so `kokoa lab up` evaluates
the program under mocks (`kokoa_infra.mockrun`) and this module does what the engine and
the command provider would do with the declared `command:remote:Command` (and StringAsset
`CopyToRemote`) resources: create in dependency order, update or replace on changed inputs,
delete what is no longer declared, and keep state between runs. With the CLI installed,
`pulumi up` against the same stack does the same. Not mirrored: parallelism, and the
`PULUMI_COMMAND_STDOUT/STDERR` variables the provider sets for update and delete.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

from kokoa_infra.atomic_file import write_private
from kokoa_infra.mockrun import DeclaredResource

COMMAND = "command:remote:Command"
COPY_TO_REMOTE = "command:remote:CopyToRemote"
# Changing these replaces the resource; any other input change is an in-place update.
REPLACE_KEYS = ("connection", "triggers")
# pulumi-command sends `environment` with SSH setenv, which fails unless the server's
# AcceptEnv allows the name; the lab's sshd accepts exactly this prefix.
ACCEPTED_ENV_PREFIX = "KOKOA_"
CONNECTION_SECRETS = ("privateKey", "password", "privateKeyPassword")
ASSET_SIG_KEY = "4dabf18193072939515e22adb298388d"
STRING_ASSET_SIG = "c44067f5952c0a294b673a41bacd8c17"
TAIL_LINES = 20
STATE_VERSION = 1

Echo = Callable[[str], None]


class ExecutorError(Exception):
    """The run stopped: a command failed (`exit_code` is its code) or the resources cannot be executed."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Completed:
    """What one remote command did."""

    returncode: int
    stdout: str
    stderr: str


@dataclass
class Report:
    """What one `apply` did, in order: (action, resource name), action one of
    created / updated / replaced / deleted / unchanged."""

    actions: list[tuple[str, str]] = field(default_factory=list)

    @property
    def counts(self) -> Counter:
        return Counter(action for action, _ in self.actions)

    @property
    def changed(self) -> list[str]:
        return [f"{action} {name}" for action, name in self.actions if action != "unchanged"]


class Runner(Protocol):
    def run(self, connection: Mapping[str, Any], command: str, stdin: str | None,
            environment: Mapping[str, str]) -> Completed: ...


class SshRunner:
    """OpenSSH run from inside the operator's network namespace, host key pinned as the provider does."""

    def __init__(self, netns: str, scratch_dir: Path, timeout: float = 600.0) -> None:
        self.netns = netns
        self.scratch_dir = Path(scratch_dir)
        self.timeout = timeout

    def argv(self, connection: Mapping[str, Any], key_file: Path, known_hosts: Path | None,
             env_names: Iterable[str], command: str) -> list[str]:
        port = int(connection.get("port", 22))
        argv = ["ip", "netns", "exec", self.netns, "ssh", "-F", "/dev/null",
                "-i", str(key_file), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-o", "GlobalKnownHostsFile=/dev/null"]
        if known_hosts is None:
            # No hostKey given: the provider then accepts any host key.
            argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        else:
            argv += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"]
        for name in env_names:
            argv += ["-o", f"SendEnv={name}"]
        return argv + ["-p", str(port), "-l", connection.get("user", "root"), connection["host"], "--", command]

    def run(self, connection, command, stdin, environment):
        if not connection.get("privateKey"):
            raise ExecutorError(f"connection to {connection.get('host')} has no privateKey; "
                                "the lab executor authenticates with keys only")
        self.scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.scratch_dir) as tmp:
            key_file = Path(tmp) / "key"
            write_private(key_file, connection["privateKey"].rstrip("\n") + "\n")
            known_hosts = None
            if connection.get("hostKey"):
                known_hosts = Path(tmp) / "known_hosts"
                port = int(connection.get("port", 22))
                pattern = connection["host"] if port == 22 else f"[{connection['host']}]:{port}"
                key_type, key_data = connection["hostKey"].split()[:2]
                known_hosts.write_text(f"{pattern} {key_type} {key_data}\n")
            env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **environment}
            argv = self.argv(connection, key_file, known_hosts, environment, command)
            try:
                proc = subprocess.run(argv, input=stdin or "", capture_output=True, text=True,
                                      env=env, timeout=self.timeout, check=False)
            except subprocess.TimeoutExpired as exc:
                return Completed(124, _text(exc.stdout), _text(exc.stderr) + f"\ntimed out after {self.timeout:.0f}s")
            return Completed(proc.returncode, proc.stdout, proc.stderr)


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


def _normal(value: Any) -> Any:
    """JSON round trip, so inputs compare equal to what the state file gives back."""
    return json.loads(json.dumps(value, sort_keys=True))


def _phase_command(entry: Mapping[str, Any], phase: str) -> tuple[str | None, str | None]:
    """(command, stdin) for `phase` of a state entry; CopyToRemote becomes `cat >` with the asset on stdin."""
    inputs = entry["inputs"]
    if entry["type"] == COPY_TO_REMOTE:
        if phase == "delete":
            return None, None  # the provider leaves copied files in place
        return f"cat > {shlex.quote(inputs['remotePath'])}", inputs["source"]["text"]
    return inputs.get(phase) or None, inputs.get("stdin")


def _check_executable(res: DeclaredResource) -> None:
    if res.type == COPY_TO_REMOTE:
        source = res.inputs.get("source") or {}
        if source.get(ASSET_SIG_KEY) != STRING_ASSET_SIG:
            raise ExecutorError(f"{res.name}: the lab executor copies StringAsset sources only")
    bad = [k for k in (res.inputs.get("environment") or {}) if not k.startswith(ACCEPTED_ENV_PREFIX)]
    if bad:
        raise ExecutorError(f"{res.name}: environment {', '.join(sorted(bad))} would be refused by sshd "
                            f"(AcceptEnv {ACCEPTED_ENV_PREFIX}*); prefix the names or put them in the command")


def plan(resources: list[DeclaredResource]) -> list[tuple[DeclaredResource, list[str]]]:
    """Executable resources in registration order, each with the command URNs it must follow.

    Registration order is a valid order only if every dependency and parent was registered
    earlier; that is checked, not assumed. Dependencies on other resources (keys, components)
    are followed through to the commands behind them.
    """
    position = {r.urn: i for i, r in enumerate(resources)}
    by_urn = {r.urn: r for r in resources}
    children: dict[str, list[str]] = {}
    for r in resources:
        children.setdefault(r.parent, []).append(r.urn)
    executable = {r.urn for r in resources if r.type in (COMMAND, COPY_TO_REMOTE)}
    memo: dict[str, frozenset[str]] = {}

    def behind(urn: str) -> frozenset[str]:
        """Commands that `urn` stands for when something depends on it."""
        if urn in executable:
            return frozenset({urn})
        if urn not in memo:
            memo[urn] = frozenset()  # cycle guard; cycles cannot be registered anyway
            found: set[str] = set()
            for dep in by_urn[urn].dependencies:
                found |= behind(dep)
            for child in children.get(urn, ()):
                found |= behind(child)
            memo[urn] = frozenset(found)
        return memo[urn]

    steps = []
    for i, r in enumerate(resources):
        for dep in r.dependencies:
            if dep not in position:
                raise ExecutorError(f"{r.name} depends on {dep}, which the program never declared")
            if position[dep] > i:
                raise ExecutorError(f"{r.name} is registered before its dependency {by_urn[dep].name}")
        if r.parent in position and position[r.parent] > i:
            raise ExecutorError(f"{r.name} is registered before its parent {by_urn[r.parent].name}")
        if r.urn in executable:
            _check_executable(r)
            deps: set[str] = set()
            for dep in r.dependencies:
                deps |= behind(dep)
            if r.parent in executable:
                deps.add(r.parent)
            steps.append((r, sorted(deps - {r.urn})))
    return steps


def _delete_order(entries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Dependants before their dependencies; among free ones, the latest created first."""
    remaining = dict(entries)
    order = []
    while remaining:
        needed = {d for e in remaining.values() for d in e["deps"]}
        ready = [u for u in remaining if u not in needed] or list(remaining)
        urn = max(ready, key=lambda u: remaining[u]["seq"])
        order.append(urn)
        del remaining[urn]
    return order


def _secret_strings(entry: Mapping[str, Any]) -> list[str]:
    """Every string in the entry's secret inputs, plus the private key and stdin whatever their marking."""
    found: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    inputs = entry["inputs"]
    for path in entry.get("secretPaths", []):
        value: Any = inputs
        for key in ([] if path == "." else path.split(".")):
            value = value.get(key) if isinstance(value, dict) else None
        if path == "connection":
            # Secret as a whole because the key is in it; host, user and host key are not secrets.
            value = {k: v for k, v in (value or {}).items() if k in CONNECTION_SECRETS}
        collect(value)
    collect((inputs.get("connection") or {}).get("privateKey"))
    collect(inputs.get("stdin"))
    collect((inputs.get("source") or {}).get("text"))
    return found


def redact(text: str, secrets: Iterable[str]) -> str:
    """Hide secret values, and each long line of a multi-line secret, from text shown to people."""
    pieces = set()
    for secret in secrets:
        if len(secret) >= 6:
            pieces.add(secret)
        pieces |= {line.strip() for line in secret.splitlines() if len(line.strip()) >= 12}
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "[secret]")
    return text


def _tail(label: str, text: str) -> str:
    lines = text.rstrip("\n").splitlines()[-TAIL_LINES:]
    if not lines:
        return f"--- {label}: empty ---"
    return f"--- {label} (last {len(lines)} lines) ---\n" + "\n".join(lines)


def _stderr_echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_state(state_file: Path) -> dict[str, Any]:
    if not state_file.exists():
        return {"version": STATE_VERSION, "seq": 0, "resources": {}, "pendingDeletes": []}
    state = json.loads(state_file.read_text())
    if state.get("version") != STATE_VERSION:
        raise ExecutorError(f"{state_file} has state version {state.get('version')}, expected {STATE_VERSION}")
    return state


def apply(resources: list[DeclaredResource], state_file: Path, runner: Runner,
          echo: Echo = _stderr_echo, log_dir: Path | None = None) -> Report:
    """Bring the hosts in line with the declared commands; returns what ran.

    State (which holds private keys and stdin, hence 0600) is saved after every step, so a
    failed run keeps what succeeded and the next run carries on from there.
    """
    steps = plan(resources)
    state = load_state(state_file)
    report = Report()

    def save() -> None:
        write_private(state_file, json.dumps(state, indent=1, sort_keys=True))

    def run(entry: Mapping[str, Any], phase: str) -> None:
        command, stdin = _phase_command(entry, phase)
        if command is None:
            return
        conn = entry["inputs"]["connection"]
        target = f"{conn.get('user', 'root')}@{conn['host']}:{int(conn.get('port', 22))}"
        started = time.monotonic()
        result = runner.run(conn, command, stdin, entry["inputs"].get("environment") or {})
        took = time.monotonic() - started
        secrets = _secret_strings(entry)
        if log_dir is not None:
            log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            text = f"exit {result.returncode}\n{result.stdout}\n--- stderr ---\n{result.stderr}"
            write_private(log_dir / f"{entry['name']}.{phase}.log", redact(text, secrets))
        if result.returncode != 0:
            what = "ssh could not connect or authenticate" if result.returncode == 255 else "failed"
            raise ExecutorError(
                f"{phase} {entry['name']} on {target} {what} (exit code {result.returncode}, {took:.1f}s)\n"
                + redact(_tail("stdout", result.stdout) + "\n" + _tail("stderr", result.stderr), secrets),
                exit_code=result.returncode)
        echo(f"  {phase:<7} {entry['name']}  {target}  {took:.1f}s")

    def record(res: DeclaredResource, deps: list[str], seq: int | None = None) -> None:
        if seq is None:
            state["seq"] += 1
            seq = state["seq"]
        state["resources"][res.urn] = {
            "name": res.name, "type": res.type, "inputs": _normal(res.inputs), "deps": deps,
            "secretPaths": sorted(res.secret_paths), "deleteBeforeReplace": res.delete_before_replace,
            "seq": seq}
        save()

    # A create-before-delete replacement whose delete failed last time: the engine retries it first.
    for old in list(state["pendingDeletes"]):
        run(old, "delete")
        state["pendingDeletes"].remove(old)
        save()
        report.actions.append(("deleted", old["name"]))

    for res, deps in steps:
        old = state["resources"].get(res.urn)
        new = {"name": res.name, "type": res.type, "inputs": _normal(res.inputs),
               "secretPaths": sorted(res.secret_paths)}
        if old is None:
            run(new, "create")
            record(res, deps)
            report.actions.append(("created", res.name))
        elif old["inputs"] == new["inputs"]:
            if old["deps"] != deps:
                record(res, deps, old["seq"])
            report.actions.append(("unchanged", res.name))
        elif any(old["inputs"].get(k) != new["inputs"].get(k) for k in REPLACE_KEYS):
            if res.delete_before_replace:
                run(old, "delete")
                del state["resources"][res.urn]
                save()
                run(new, "create")
                record(res, deps)
            else:
                run(new, "create")
                state["pendingDeletes"].append(old)
                record(res, deps)
                run(old, "delete")
                state["pendingDeletes"].remove(old)
                save()
            report.actions.append(("replaced", res.name))
        else:
            run(new, "update" if new["inputs"].get("update") else "create")
            record(res, deps, old["seq"])
            report.actions.append(("updated", res.name))

    declared = {res.urn for res, _ in steps}
    gone = {urn: e for urn, e in state["resources"].items() if urn not in declared}
    for urn in _delete_order(gone):
        run(gone[urn], "delete")
        del state["resources"][urn]
        save()
        report.actions.append(("deleted", gone[urn]["name"]))
    if not state_file.exists():
        save()
    return report
