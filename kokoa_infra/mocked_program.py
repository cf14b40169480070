"""The Kokoa Pulumi program evaluated under Pulumi's mocks, with everything it declares recorded.

No Pulumi CLI or provider plugin is needed: the SDK's mock monitor stands in for the
engine. The tests assert on the recorded resources and outputs; the lab executes the
recorded `pulumi_command.remote` commands over real SSH.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pulumi
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime import settings as pulumi_settings

from kokoa_infra.project import PROJECT_DIR

RANDOM_BYTES = "random:index/randomBytes:RandomBytes"


@dataclass(frozen=True)
class DeclaredResource:
    """One resource as the program registered it (secrets unwrapped in `inputs`)."""

    urn: str
    type: str
    name: str
    inputs: dict[str, Any]
    secret_paths: frozenset[str]
    dependencies: tuple[str, ...]
    parent: str
    delete_before_replace: bool
    # The resource options the engine acts on (RegisterResourceRequest), as declared.
    # replaceOnChanges includes what the SDK adds itself (pulumi_command: "triggers[*]").
    replace_on_changes: tuple[str, ...] = ()
    ignore_changes: tuple[str, ...] = ()
    # Alias specs resolved to URNs the way the engine collapses them (parent, name and
    # type default to the resource's own), in the URN scheme of the mock monitor.
    aliases: tuple[str, ...] = ()
    retain_on_delete: bool = False
    additional_secret_outputs: tuple[str, ...] = ()
    custom: bool = True


@dataclass
class ProgramRun:
    """What one evaluation of the program declared and exported."""

    resources: list[DeclaredResource] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: set[str] = field(default_factory=set)
    # Each output's secret values as the engine stores them: "." for the whole output, else
    # paths like "blog.endpoint" or "0.publicIp" (list items by index).
    output_secret_paths: dict[str, set[str]] = field(default_factory=dict)
    logs: list[tuple[str, str]] = field(default_factory=list)
    # URN of each component that called register_outputs → the output names it registered.
    registered_outputs: dict[str, list[str]] = field(default_factory=dict)

    def of_type(self, type_token: str) -> list[DeclaredResource]:
        return [r for r in self.resources if r.type == type_token]

    def named(self, name: str) -> DeclaredResource:
        matches = [r for r in self.resources if r.name == name]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} resources named {name!r}")
        return matches[0]


class ProgramFailed(pulumi.RunError):
    """The program stopped (invalid config or a bug); `run` holds what it logged and declared."""

    def __init__(self, message: str, run: ProgramRun) -> None:
        super().__init__(message)
        self.run = run

    @property
    def errors(self) -> list[str]:
        return [message for level, message in self.run.logs if level == "error"]


class KokoaMocks(pulumi.runtime.Mocks):
    """Provider stand-ins: RandomBytes get bytes derived from `seed` and the resource name.

    A fixed seed makes keys repeat across runs the way Pulumi state keeps them.
    """

    def __init__(self, seed: bytes = b"kokoa-tests") -> None:
        self.seed = seed
        # {name: the name it had before}, for resources that answer to an alias: state would
        # keep their bytes, so the bytes follow the old name.
        self.former_name: dict[str, str] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        state = dict(args.inputs)
        if args.typ == RANDOM_BYTES:
            length = int(args.inputs["length"])
            material = self.seed + b"\0" + self.former_name.get(args.name, args.name).encode()
            keepers = args.inputs.get("keepers")
            if keepers:
                # A changed keeper replaces RandomBytes, i.e. new random bytes (pulumi-random:
                # "keepers ... when changed, will trigger recreation of resource"). Without
                # keepers the bytes stay what they were before keepers existed.
                material += b"\0" + json.dumps(keepers, sort_keys=True).encode()
            raw = hashlib.sha256(material).digest()[:length]
            state["base64"] = base64.b64encode(raw).decode()
            state["hex"] = raw.hex()
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs):
        return {}


def _reveal(value: Any, secrets: set[str], prefix: str = "") -> Any:
    """`value` as the engine receives it (secrets wrapped) → the plain value; where each
    secret sat goes into `secrets` ("." for the whole value, else paths like "blog.endpoint"
    or "0.publicIp", list items by index). One walk for both."""
    if rpc.is_rpc_secret(value):
        secrets.add(prefix or ".")
        value = rpc.unwrap_rpc_secret(value)
    if isinstance(value, dict):
        return {key: _reveal(item, secrets, f"{prefix}.{key}" if prefix else key) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_reveal(item, secrets, f"{prefix}.{index}" if prefix else str(index))
                for index, item in enumerate(value)]
    return value


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """The SDK's mock monitor, also keeping each registration's options and secrets."""

    def __init__(self, mocks: pulumi.runtime.Mocks, run: ProgramRun) -> None:
        super().__init__(mocks)
        self.run = run
        self.alias_names: dict[str, list[str]] = {}  # URN → the names it answered to before

    def RegisterResource(self, request):  # noqa: N802 (gRPC name)
        if request.type != "pulumi:pulumi:Stack":
            self._remember_former_names(request)
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            secrets: set[str] = set()
            inputs = _reveal(_struct_to_python(request.object), secrets)
            self.run.resources.append(DeclaredResource(
                urn=response.urn,
                type=request.type,
                name=request.name,
                inputs=inputs,
                secret_paths=frozenset(secrets),
                dependencies=tuple(request.dependencies),
                parent=request.parent,
                delete_before_replace=request.deleteBeforeReplace,
                replace_on_changes=tuple(request.replaceOnChanges),
                ignore_changes=tuple(request.ignoreChanges),
                aliases=tuple(self._alias_urns(request)),
                retain_on_delete=bool(request.retainOnDelete),
                additional_secret_outputs=tuple(request.additionalSecretOutputs),
                custom=bool(request.custom),
            ))
        return response

    def RegisterResourceOutputs(self, request):  # noqa: N802 (gRPC name)
        self.run.registered_outputs[request.urn] = sorted(_struct_to_python(request.outputs))
        return super().RegisterResourceOutputs(request)

    def _remember_former_names(self, request) -> None:
        """Own alias names, and the parent's swapped into the name's prefix (the engine's
        inheritedChildAlias), so that the mocks derive an aliased RandomBytes as state keeps it."""
        names = [urn.rsplit("::", 1)[1] for urn in self._alias_urns(request)]
        parent_name = request.parent.rsplit("::", 1)[1] if request.parent else ""
        for old_parent in self.alias_names.get(request.parent, []):
            if parent_name and request.name.startswith(parent_name):
                names.append(old_parent + request.name[len(parent_name):])
        names = [n for n in dict.fromkeys(names) if n != request.name]
        self.alias_names[self.make_urn(request.parent, request.type, request.name)] = names
        if names and isinstance(self.mocks, KokoaMocks):
            self.mocks.former_name[request.name] = names[0]

    def _alias_urns(self, request) -> list[str]:
        """Each alias as a URN: the engine's collapseAliasToUrn (pkg/resource/deploy/step_generator.go)."""
        urns = list(request.aliasURNs)
        for alias in request.aliases:
            if alias.urn:
                urns.append(alias.urn)
                continue
            spec = alias.spec
            # Built as the mock monitor builds the resource's own URN, so that they compare.
            parent = "" if spec.noParent else (spec.parentUrn or request.parent)
            urns.append(self.make_urn(parent, spec.type or request.type, spec.name or request.name))
        return list(dict.fromkeys(urns))


class _LogRecorder(logging.Handler):
    """Keeps what the program logs through `pulumi.log` (the mock engine's logger)."""

    def __init__(self, run: ProgramRun) -> None:
        super().__init__(logging.INFO)
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        self.run.logs.append((record.levelname.lower(), record.getMessage()))


def _struct_to_python(struct) -> Any:
    from google.protobuf import json_format

    return json_format.MessageToDict(struct)


def config_map(stack_config: Mapping[str, Any]) -> dict[str, str]:
    """`Pulumi.<stack>.yaml`'s `config:` mapping → the string map the runtime expects.

    Secrets must already be plain text here (the mocks have no secrets provider).
    """
    flat: dict[str, str] = {}
    for key, value in stack_config.items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            raise ValueError(f"{key} is encrypted; pass its plain value to the mock run")
        flat[key] = value if isinstance(value, str) else json.dumps(value)
    return flat


SECRET_CONFIG_KEYS = ("kokoa:sshPrivateKey", "cloudflare:apiToken")


def run_program(stack_config: Mapping[str, Any], *, stack: str = "test",
                seed: bytes = b"kokoa-tests", program: Path | None = None) -> ProgramRun:
    """Evaluate `__main__.py` with `stack_config` under mocks and return what it declared.

    Raises ProgramFailed, after the run has settled, when the program stops; its `run`
    holds the messages logged before (one error per configuration problem).
    """
    run = ProgramRun()
    mocks = KokoaMocks(seed)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        logger = logging.getLogger(f"kokoa.mocked_program.{id(run)}")
        logger.propagate = False
        # What the program says (info and up); the SDK's own debug lines, several per
        # resource, are not kept (a record each would cost more than most resources).
        logger.setLevel(logging.INFO)
        logger.addHandler(_LogRecorder(run))
        pulumi.runtime.set_mocks(mocks, project="kokoa", stack=stack, preview=False,
                                 logger=logger, monitor=RecordingMonitor(mocks, run))
        pulumi.runtime.set_all_config(config_map(stack_config),
                                      [k for k in SECRET_CONFIG_KEYS if k in stack_config])
        main = program or PROJECT_DIR / "__main__.py"

        async def evaluate() -> None:
            await pulumi.runtime.stack.run_pulumi_func(
                lambda: runpy.run_path(str(main), run_name="__main__"))
            root = pulumi_settings.get_root_resource()
            for name, value in dict(root.outputs).items():
                # As the SDK sends it to the engine: nested secrets stay where they are. One
                # walk gives both the plain value and where its secrets are.
                secrets = run.output_secret_paths[name] = set()
                run.outputs[name] = _reveal(await rpc.serialize_property(value, [], name), secrets)
                if secrets:
                    run.secret_outputs.add(name)

        try:
            loop.run_until_complete(evaluate())
        except Exception as exc:
            raise ProgramFailed(str(exc), run) from exc
    finally:
        pulumi_settings.SETTINGS.outputs.clear()
        pulumi_settings.reset_options()
        loop.close()
        asyncio.set_event_loop(None)
    return run
