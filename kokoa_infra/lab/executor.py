"""Stand-in for the Pulumi engine and the pulumi-command provider: applies the program's recorded resources for real.

No Pulumi CLI or provider plugin can be had on the lab machine, so `kokoa lab up` evaluates
the program under mocks (`kokoa_infra.mocked_program`) and this module does with the declared
resources what `pulumi up` would: `command:remote:Command` over real SSH, and, when given a
handler for it, `cloudflare:index/dnsRecord:DnsRecord` against a Cloudflare API (the lab's
stand-in). State is kept between runs like a stack's checkpoint; one run is an `Update`.

Each rule, and where the engine or the provider states it (pulumi-command v1.2.1, its
pulumi-go-provider v1.3.0, pulumi/pulumi `pkg/resource/deploy`,
cloudflare/terraform-provider-cloudflare `internal/services/dns_record` at the commit
pulumi-cloudflare builds from):

1. Replacement only when a changed input is a replaceOnChanges input: the provider's
   schema (`triggers`: pulumi-command `provider/pkg/provider/common/inputs.go`;
   `zone_id`, `type`: terraform-provider-cloudflare `dns_record/schema.go`
   RequiresReplace) or the resource's own `replaceOnChanges` as the program declared it
   (the SDK adds `triggers[*]` for Command), matched as property paths
   (`applyReplaceOnChanges` and `PropertyPath.Contains` in `step_generator.go`,
   `sdk/go/common/resource/properties_path.go`). A resource whose provider has an
   Update replaces on nothing else: pulumi-go-provider `infer/resource.go` Diff. So a
   changed `connection` (secret only: `remote/command.go`) is an in-place update.
2. An update runs `update`, or `create` again when there is none, with the new inputs:
   new connection, stdin, environment (`remote/commandController.go` Update:
   `CommandOutputs{CommandInputs: news, BaseOutputs: olds.BaseOutputs}`).
3. A delete runs the old state's `delete` on the old state's connection
   (`commandController.go` Delete uses `req.State`). A DnsRecord delete is a DELETE of
   the recorded id, and a 404 fails it (`dns_record/resource.go` Delete).
4. Replacement: with `deleteBeforeReplace` the old delete runs, then the new create, in
   the resource's own turn; otherwise the new create runs in its turn and the old one
   becomes a pending delete, deleted with the other deletes after every create and update
   (`GenerateDeletes` in `step_generator.go`: `res.Delete` states become
   DeleteReplacement steps). A pending delete that failed stays pending and is retried
   in the next run's delete phase.
5. Creates and updates run as soon as their dependencies are done, independent ones in
   parallel (`pulumi up --parallel`: "Defaults to unbounded"), in a seeded shuffled
   order, so that a missing `depends_on` shows here as it would for real. After a
   failure nothing new starts; running steps finish (Pulumi's blog, "Continue on Error":
   "letting already in-flight operations complete, but not starting any new operations").
6. Deletes of resources no longer declared run last, dependants before dependencies,
   independent ones in parallel (`ScheduleDeletes` antichains in `step_generator.go`).
   `retainOnDelete` drops the state without running the delete.
7. Aliases: a resource found in the old state under one of its aliases is the same
   resource (no create, no delete); a child of an aliased parent also answers to its
   name with the parent's old name as prefix (`generateAliases`, `inheritedChildAlias`,
   `getOldResource` in `step_generator.go`).
8. `ignoreChanges` paths keep their old value before diffing (pulumi-go-provider
   `infer/resource.go` diff).
9. `environment` is sent with SSH setenv, and a failure fails the command
   (`remote/commandOutputs.go`, `logAndWrapSetenvErr` with `diag.Error`). A stock sshd
   accepts no variables (sshd_config(5) AcceptEnv: "The default is not to accept any
   environment variables"), so any `environment` fails the step here.
10. `PULUMI_COMMAND_STDOUT`/`STDERR` (the previous stdout/stderr) are set on update and
   delete unless `addPreviousOutputInEnv` is false; the setenv failure is a warning and
   the command still runs (`commandOutputs.go`). A stock sshd refuses them: the
   executor reports the provider's warning and sends nothing.
11. A failed create leaves nothing in state, a failed update leaves the old state
   (Command returns a plain error, not an initialization failure: `commandController.go`
   with pulumi-go-provider's `infer/resource.go`), so the next run tries again.
12. Refresh (`options: refresh: always` in Pulumi.yaml, `sdk/go/common/workspace/
   project.json`): a Command reads back unchanged (no Read in `commandController.go`; the
   default Read of pulumi-go-provider returns the state as is); a DnsRecord is read by id,
   and a 404 removes it from state, so the program's record is created again
   (`dns_record/resource.go` Read).

Different on purpose: no dial retries (the provider dials up to `dialErrorLimit`, 10
times: `remote/connection.go`), so a dead host fails at once; the executor authenticates
with `privateKey` only; URNs are the mock monitor's (a child's type is prefixed with its
parent's own type only, where the engine keeps the whole chain), consistently so within
the lab's state; dependent replacements through property dependencies
(`calculateDependentReplacements`) are not computed, as no command takes another
command's output as input.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

from kokoa_infra.atomic_file import write_private

if TYPE_CHECKING:  # the resources come from an evaluation; this module needs no Pulumi
    from kokoa_infra.mocked_program import DeclaredResource

COMMAND = "command:remote:Command"
DNS_RECORD = "cloudflare:index/dnsRecord:DnsRecord"
# What a stock sshd accepts with setenv: nothing (AcceptEnv is empty by default).
ACCEPT_ENV: tuple[str, ...] = ()
PREVIOUS_OUTPUT_ENV = ("PULUMI_COMMAND_STDOUT", "PULUMI_COMMAND_STDERR")
CONNECTION_SECRETS = ("privateKey", "password", "privateKeyPassword")
TAIL_LINES = 20
STATE_VERSION = 2
# Unbounded in the engine; the lab has a handful of hosts.
DEFAULT_PARALLEL = 16

Echo = Callable[[str], None]


class ExecutorError(Exception):
    """The run stopped: a step failed (`exit_code` is a command's code) or the resources cannot be executed."""

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
    """What one `apply` did, in the order it finished: (action, resource name), action one of
    created / updated / replaced / deleted / unchanged; and the provider's warnings."""

    actions: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seed: int = 0

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
             command: str) -> list[str]:
        port = int(connection.get("port", 22))
        argv = ["ip", "netns", "exec", self.netns, "ssh", "-F", "/dev/null",
                "-i", str(key_file), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-o", "GlobalKnownHostsFile=/dev/null"]
        if known_hosts is None:
            # No hostKey given: the provider then accepts any host key.
            argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        else:
            argv += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"]
        return argv + ["-p", str(port), "-l", connection.get("user", "root"), connection["host"], "--", command]

    def run(self, connection, command, stdin, environment):
        if environment:
            raise ExecutorError("the SSH runner sends no environment (a stock sshd refuses it)")
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
            env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
            argv = self.argv(connection, key_file, known_hosts, command)
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


# --- property paths (replaceOnChanges, ignoreChanges) ----------------------------------

def parse_path(text: str) -> tuple[Any, ...]:
    """`a.b[0]["c.d"][*]` → ("a", "b", 0, "c.d", "*"), as `resource.ParsePropertyPath` reads it."""
    parts: list[Any] = []
    i, word = 0, ""
    while i < len(text):
        ch = text[i]
        if ch == ".":
            if word:
                parts.append(word)
            word = ""
        elif ch == "[":
            if word:
                parts.append(word)
            word = ""
            end = text.index("]", i)
            inner = text[i + 1:end]
            if inner.startswith('"'):
                parts.append(json.loads(inner))
            elif inner == "*":
                parts.append("*")
            else:
                parts.append(int(inner))
            i = end
        else:
            word += ch
        i += 1
    if word:
        parts.append(word)
    return tuple(parts)


def path_contains(pattern: tuple[Any, ...], path: tuple[Any, ...]) -> bool:
    """`PropertyPath.Contains`: `path` is `pattern` or below it; "*" matches any one key or index."""
    if len(path) < len(pattern):
        return False
    return all(p == "*" or p == q for p, q in zip(pattern, path))


def changed_paths(old: Any, new: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The leaf paths at which `old` and `new` differ (a key added or removed is its own path)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                found.append(prefix + (key,))
            else:
                found += changed_paths(old[key], new[key], prefix + (key,))
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        found = []
        for i, (a, b) in enumerate(zip(old, new)):
            found += changed_paths(a, b, prefix + (i,))
        return found
    return [] if old == new else [prefix]


def _with_ignored(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str]) -> dict[str, Any]:
    """`new` with every ignoreChanges path set back to its old value (when the old one has it)."""
    result = json.loads(json.dumps(new))
    for text in ignore:
        path = parse_path(text)
        source: Any = old
        for part in path:
            if isinstance(source, dict) and part in source:
                source = source[part]
            elif isinstance(source, list) and isinstance(part, int) and part < len(source):
                source = source[part]
            else:
                break
        else:
            target = result
            for part in path[:-1]:
                target = target.setdefault(part, {}) if isinstance(target, dict) else target[part]
            target[path[-1]] = source
    return result


def replace_reasons(old_inputs: Mapping[str, Any], new_inputs: Mapping[str, Any],
                    provider_keys: Iterable[str], replace_on_changes: Iterable[str]) -> list[str]:
    """The changed inputs that force a replacement (rule 1); [] means update in place."""
    changed = changed_paths(dict(old_inputs), dict(new_inputs))
    top = {p[0] for p in changed}
    reasons = sorted(k for k in top if k in set(provider_keys))
    patterns = [parse_path(p) for p in replace_on_changes]
    for pattern in patterns:
        # The engine checks the detailed diff's paths and the changed top-level keys.
        if any(path_contains(pattern, p) for p in changed) or any(path_contains(pattern, (k,)) for k in top):
            reasons.append(".".join(str(x) for x in pattern))
    return sorted(set(reasons))


# --- URNs and aliases --------------------------------------------------------------------

def _urn_parts(urn: str) -> tuple[str, str, str, str]:
    """(stack, project, qualified type, name) of `urn:pulumi:<stack>::<project>::<type>::<name>`."""
    head, project, qualified, name = urn.split("::", 3)
    return head[len("urn:pulumi:"):], project, qualified, name


def _child_urn(parent: str, typ: str, name: str, stack: str, project: str) -> str:
    """A URN as the mock monitor makes it (`MockMonitor.make_urn`)."""
    if parent:
        typ = _urn_parts(parent)[2].split("$")[-1] + "$" + typ
    return f"urn:pulumi:{stack}::{project}::{typ}::{name}"


def resolve_aliases(resources: list[DeclaredResource], known: set[str]) -> dict[str, str]:
    """{new URN: old URN} for declared resources found in the old state under an alias (rule 7)."""
    declared = {r.urn for r in resources}
    by_urn = {r.urn: r for r in resources}
    aliased: dict[str, str] = {}
    for r in resources:  # registration order: a parent before its children
        if r.urn in known:
            continue
        stack, project, _, _ = _urn_parts(r.urn)
        candidates = list(r.aliases)
        parent_old = aliased.get(r.parent)
        if parent_old and r.parent in by_urn:
            parent_name, old_parent_name = by_urn[r.parent].name, _urn_parts(parent_old)[3]

            def inherited(typ: str, name: str) -> str:
                if name.startswith(parent_name):
                    name = old_parent_name + name[len(parent_name):]
                return _child_urn(parent_old, typ, name, stack, project)

            candidates.append(inherited(r.type, r.name))
            for alias in r.aliases:
                _, _, qualified, alias_name = _urn_parts(alias)
                candidates.append(inherited(qualified.split("$")[-1], alias_name))
        for candidate in candidates:
            if candidate in known and candidate not in declared and candidate not in aliased.values():
                aliased[r.urn] = candidate
                break
    return aliased


# --- what runs --------------------------------------------------------------------------

def _phase_command(entry: Mapping[str, Any], phase: str) -> tuple[str | None, str | None]:
    """(command, stdin) for `phase` of a state entry."""
    inputs = entry["inputs"]
    if phase == "update":
        return inputs.get("update") or inputs.get("create") or None, inputs.get("stdin")
    return inputs.get(phase) or None, inputs.get("stdin")


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


Warn = Callable[[str], None]


class Handler(Protocol):
    """What a provider does with one resource type. `provider_replace_keys`: its schema's replaceOnChanges.

    `warn` takes the provider's warnings (they go into the run's report).
    """

    provider_replace_keys: frozenset[str]

    def check(self, res: DeclaredResource) -> None: ...
    def create(self, entry: dict[str, Any], warn: Warn) -> dict[str, Any]: ...
    def update(self, old: dict[str, Any], new: dict[str, Any], warn: Warn) -> dict[str, Any]: ...
    def delete(self, entry: dict[str, Any], warn: Warn) -> None: ...
    def read(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        """{"inputs", "outputs"} as the provider reads them back; None when the resource is gone."""


class CommandHandler:
    """pulumi-command's remote Command, over a Runner (real SSH in the lab)."""

    provider_replace_keys = frozenset({"triggers"})

    def __init__(self, runner: Runner, echo: Echo = _stderr_echo, log_dir: Path | None = None) -> None:
        self.runner = runner
        self.echo = echo
        self.log_dir = log_dir

    def check(self, res: DeclaredResource) -> None:
        pass

    def create(self, entry, warn):
        return self._run(entry, "create", None, warn)

    def update(self, old, new, warn):
        # The new inputs with the old outputs: those are what PULUMI_COMMAND_* would carry.
        return self._run(new, "update", old.get("outputs") or {}, warn)

    def delete(self, entry, warn):
        self._run(entry, "delete", entry.get("outputs") or {}, warn)

    def read(self, entry):
        # No Read: pulumi-go-provider's default returns the state as it is.
        return {"inputs": entry["inputs"], "outputs": entry.get("outputs") or {}}

    def _run(self, entry: Mapping[str, Any], phase: str, previous: Mapping[str, str] | None,
             warn: Warn) -> dict[str, Any]:
        command, stdin = _phase_command(entry, phase)
        outputs = dict(previous or {})
        if command is None:
            return outputs
        inputs = entry["inputs"]
        conn = inputs["connection"]
        target = f"{conn.get('user', 'root')}@{conn['host']}:{int(conn.get('port', 22))}"
        refused = [k for k in sorted(inputs.get("environment") or {}) if k not in ACCEPT_ENV]
        if refused:
            raise ExecutorError(
                f"{phase} {entry['name']} on {target}: could not set environment variable {refused[0]!r}: "
                "ssh: setenv failed (the server's AcceptEnv does not allow it; a stock sshd accepts none). "
                "Put the variables in the command instead ('VAR=value command')")
        if previous and inputs.get("addPreviousOutputInEnv") is not False:
            for name, key in zip(PREVIOUS_OUTPUT_ENV, ("stdout", "stderr")):
                if previous.get(key):
                    warn(f"{entry['name']}: Unable to set '{name}'. This only works if your SSH server is "
                              "configured to accept these variables via AcceptEnv (the provider sets the "
                              "previous output on update and delete unless addPreviousOutputInEnv is false)")
        started = time.monotonic()
        result = self.runner.run(conn, command, stdin, {})
        took = time.monotonic() - started
        secrets = _secret_strings(entry)
        if self.log_dir is not None:
            self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            text = f"exit {result.returncode}\n{result.stdout}\n--- stderr ---\n{result.stderr}"
            write_private(self.log_dir / f"{entry['name']}.{phase}.log", redact(text, secrets))
        if result.returncode != 0:
            what = "ssh could not connect or authenticate" if result.returncode == 255 else "failed"
            raise ExecutorError(
                f"{phase} {entry['name']} on {target} {what} (exit code {result.returncode}, {took:.1f}s)\n"
                + redact(_tail("stdout", result.stdout) + "\n" + _tail("stderr", result.stderr), secrets),
                exit_code=result.returncode)
        self.echo(f"  {phase:<7} {entry['name']}  {target}  {took:.1f}s")
        return {"stdout": result.stdout.removesuffix("\n"), "stderr": result.stderr.removesuffix("\n")}


# --- state --------------------------------------------------------------------------------

def load_state(state_file: Path) -> dict[str, Any]:
    empty = {"version": STATE_VERSION, "resources": {}, "pendingDeletes": [], "known": []}
    if not state_file.exists():
        return empty
    state = json.loads(state_file.read_text())
    if state.get("version") != STATE_VERSION:
        raise ExecutorError(f"{state_file} has state version {state.get('version')}, expected {STATE_VERSION} "
                            "(`kokoa lab down` removes it with the lab)")
    return state


def project_refreshes_always(project_file: Path) -> bool:
    """Whether Pulumi.yaml says `options: refresh: always` (then every `pulumi up` refreshes first)."""
    from ruamel.yaml import YAML

    project = YAML(typ="safe").load(Path(project_file).read_text()) or {}
    return (project.get("options") or {}).get("refresh") == "always"


def plan(resources: list[DeclaredResource], executable: Iterable[str] = (COMMAND,)
         ) -> list[tuple[DeclaredResource, list[str]]]:
    """Executable resources in registration order, each with the executable URNs it must follow.

    Registration order is a valid order only if every dependency and parent was registered
    earlier; that is checked, not assumed. Dependencies on other resources (keys, components,
    types not executed) are followed through to the executable resources behind them.
    """
    executable_types = set(executable)
    position = {r.urn: i for i, r in enumerate(resources)}
    by_urn = {r.urn: r for r in resources}
    children: dict[str, list[str]] = {}
    for r in resources:
        children.setdefault(r.parent, []).append(r.urn)
    runnable = {r.urn for r in resources if r.type in executable_types}
    memo: dict[str, frozenset[str]] = {}

    def behind(urn: str) -> frozenset[str]:
        """Executable resources that `urn` stands for when something depends on it."""
        if urn in runnable:
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
        if r.urn in runnable:
            deps: set[str] = set()
            for dep in r.dependencies:
                deps |= behind(dep)
            if r.parent in runnable:
                deps.add(r.parent)
            steps.append((r, sorted(deps - {r.urn})))
    return steps


def _delete_antichains(entries: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Keys of `entries` in rounds: each round holds no entry another remaining one depends on."""
    urn_of = {key: e.get("urn", key) for key, e in entries.items()}
    remaining = dict(entries)
    rounds = []
    while remaining:
        needed = {d for e in remaining.values() for d in e.get("deps", [])}
        ready = sorted(k for k in remaining if urn_of[k] not in needed) or sorted(remaining)
        rounds.append(ready)
        for key in ready:
            del remaining[key]
    return rounds


class _Scheduler:
    """Runs units of work as their dependencies finish: shuffled with a seed, up to `parallel` at once."""

    def __init__(self, parallel: int, rng: random.Random) -> None:
        self.parallel = max(1, parallel)
        self.rng = rng

    def run(self, deps: Mapping[str, Iterable[str]], work: Callable[[str], None]) -> None:
        waiting = {key: set(d) & set(deps) for key, d in deps.items()}
        done: set[str] = set()
        running: dict[Future, str] = {}
        failure: BaseException | None = None
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            while True:
                if failure is None:
                    ready = [k for k in sorted(waiting) if waiting[k] <= done]
                    self.rng.shuffle(ready)
                    for key in ready[: self.parallel - len(running)]:
                        del waiting[key]
                        running[pool.submit(work, key)] = key
                if not running:
                    break
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    key = running.pop(future)
                    if future.exception() is not None:
                        failure = failure or future.exception()
                    else:
                        done.add(key)
        if failure is not None:
            raise failure


class Update:
    """One `pulumi up` of the declared resources against the state file: refresh, aliases, creates and updates,
    then deletes (the rules above). State (which holds private keys and stdin, hence 0600) is saved after every
    step, so a failed run keeps what succeeded and the next run carries on from there."""

    def __init__(self, resources: list[DeclaredResource], state_file: Path, handlers: Mapping[str, Handler],
                 echo: Echo = _stderr_echo, seed: int | None = None, parallel: int = 1) -> None:
        for res in resources:
            if res.type in handlers:
                handlers[res.type].check(res)
        self.resources = resources
        self.state_file = state_file
        self.handlers = handlers
        self.echo = echo
        self.steps = {res.urn: (res, deps) for res, deps in plan(resources, handlers)}
        self.state = load_state(state_file)
        self.report = Report(seed=seed if seed is not None else random.SystemRandom().randrange(2 ** 32))
        self.scheduler = _Scheduler(parallel, random.Random(self.report.seed))
        self.lock = threading.RLock()

    def run(self, refresh: bool = False) -> Report:
        if refresh:
            self.refresh()
        self.move_aliases()
        self.scheduler.run({urn: deps for urn, (_, deps) in self.steps.items()}, self.step)
        condemned = self.condemned()
        for round_ in _delete_antichains(condemned):
            self.scheduler.run({key: () for key in round_}, lambda key: self.remove(key, condemned[key]))
        with self.lock:
            self.state["known"] = sorted(set(self.state["resources"]) | {r.urn for r in self.resources})
            self.save()
        return self.report

    # --- bookkeeping (any worker thread) ----------------------------------------------------
    def save(self) -> None:
        with self.lock:
            write_private(self.state_file, json.dumps(self.state, indent=1, sort_keys=True))

    def act(self, action: str, name: str) -> None:
        with self.lock:
            self.report.actions.append((action, name))

    def warn(self, message: str) -> None:
        with self.lock:
            self.report.warnings.append(message)
        self.echo(f"  warning {message}")

    def store(self, urn: str, entry: dict[str, Any] | None, pending: dict[str, Any] | None = None) -> None:
        with self.lock:
            if entry is None:
                self.state["resources"].pop(urn, None)
            else:
                self.state["resources"][urn] = entry
            if pending is not None:
                self.state["pendingDeletes"].append(pending)
            self.save()

    # --- the phases -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rule 12: what the provider reads back replaces the recorded state."""
        for urn, entry in list(self.state["resources"].items()):
            handler = self.handlers.get(entry["type"])
            if handler is None:
                continue
            observed = handler.read(entry)
            if observed is None:
                self.echo(f"  refresh {entry['name']}: gone, dropped from state")
                del self.state["resources"][urn]
            else:
                entry.update(_normal(observed))
        self.save()

    def move_aliases(self) -> None:
        """Rule 7: the old state of an aliased resource moves to its new URN."""
        resources = self.state["resources"]
        known = set(self.state.get("known", [])) | set(resources)
        aliased = resolve_aliases(self.resources, known)
        for new_urn, old_urn in aliased.items():
            if old_urn in resources:
                entry = resources.pop(old_urn)
                entry["urn"] = new_urn
                resources[new_urn] = entry
        self.state["known"] = sorted((known - set(aliased.values())) | {r.urn for r in self.resources})
        self.save()

    def step(self, urn: str) -> None:
        """Create, update, replace (rules 1, 2, 4, 8 and 11) or leave one declared resource."""
        res, deps = self.steps[urn]
        handler = self.handlers[res.type]
        with self.lock:
            old = self.state["resources"].get(urn)
        new = {"urn": res.urn, "name": res.name, "type": res.type, "inputs": _normal(res.inputs), "outputs": {},
               "deps": deps, "parent": res.parent, "secretPaths": sorted(res.secret_paths),
               "deleteBeforeReplace": res.delete_before_replace, "replaceOnChanges": list(res.replace_on_changes),
               "retainOnDelete": res.retain_on_delete}
        if old is None:
            new["outputs"] = _normal(handler.create(new, self.warn))
            self.store(urn, new)
            self.act("created", res.name)
            return
        compared = _with_ignored(old["inputs"], new["inputs"], res.ignore_changes)
        new["inputs"] = compared
        if not changed_paths(old["inputs"], compared):
            if old.get("deps") != deps or old.get("replaceOnChanges") != new["replaceOnChanges"]:
                self.store(urn, {**new, "outputs": old.get("outputs", {})})
            self.act("unchanged", res.name)
            return
        reasons = replace_reasons(old["inputs"], compared, handler.provider_replace_keys, res.replace_on_changes)
        if not reasons:
            new["outputs"] = _normal(handler.update(old, new, self.warn))
            self.store(urn, new)
            self.act("updated", res.name)
        elif res.delete_before_replace:
            if not old.get("retainOnDelete"):
                handler.delete(old, self.warn)
            self.store(urn, None)
            new["outputs"] = _normal(handler.create(new, self.warn))
            self.store(urn, new)
            self.act("replaced", res.name)
        else:
            new["outputs"] = _normal(handler.create(new, self.warn))
            # The old one is deleted with the other deletes, after every create and update.
            self.store(urn, new, pending=old)
            self.act("replaced", res.name)

    def condemned(self) -> dict[str, dict[str, Any]]:
        """Rules 4 and 6: pending deletes of replacements, then what is no longer declared."""
        found = {f"pending:{i}": entry for i, entry in enumerate(self.state["pendingDeletes"])}
        for urn, entry in self.state["resources"].items():
            if urn not in self.steps and entry["type"] in self.handlers:
                found[urn] = entry
        return found

    def remove(self, key: str, entry: dict[str, Any]) -> None:
        if not entry.get("retainOnDelete"):
            self.handlers[entry["type"]].delete(entry, self.warn)
        with self.lock:
            if key.startswith("pending:"):
                self.state["pendingDeletes"].remove(entry)
            else:
                del self.state["resources"][key]
            self.save()
        self.act("deleted", entry["name"])


def apply(resources: list[DeclaredResource], state_file: Path, runner: Runner | None = None,
          echo: Echo = _stderr_echo, log_dir: Path | None = None, *,
          handlers: Mapping[str, Handler] | None = None, seed: int | None = None,
          parallel: int = 1, refresh: bool = False) -> Report:
    """Bring the hosts (and DNS, with a DnsRecord handler) in line with the declared resources: one `Update`.

    Commands go to `runner` unless `handlers` says who executes which type. `seed` orders
    independent steps (random when None; the report keeps it).
    """
    if handlers is None:
        if runner is None:
            raise ExecutorError("apply needs a runner or handlers")
        handlers = {COMMAND: CommandHandler(runner, echo, log_dir)}
    return Update(resources, state_file, handlers, echo, seed, parallel).run(refresh)
