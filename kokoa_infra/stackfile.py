"""Edit `Pulumi.<stack>.yaml` in place: append an origin or edge with the next free allocation, drain,
undrain or remove an edge, set an origin's underAttack."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from kokoa_infra.addressing import next_index, next_subnet
from kokoa_infra.atomic_file import PRIVATE, write_atomically
from kokoa_infra.conventions import STACK_ENV, selected_stack
from kokoa_infra.model import DNS_TTL, UNDER_ATTACK_MODES, Edge, InvalidConfig, Origin, Topology
from kokoa_infra.schema import Secret, declared_keys, top_level
from kokoa_infra.validate import parse_topology

PREFIX = "kokoa:"
# Keys in the order an added entry is written, as stacks/reference.yaml shows them.
ORIGIN_KEYS, EDGE_KEYS = declared_keys(Origin), declared_keys(Edge)
# Top-level keys that hold a list or mapping, or a number: a JSON string is decoded, as
# `pulumi.Config.get_object` does.
OBJECT_KEYS = tuple(k.name for k in top_level(Topology) if not k.kind.text and not isinstance(k.kind, Secret))


class StackFileError(Exception):
    """The stack file cannot be read, or names no such entry: nothing could be done."""


class ChangeRefused(StackFileError):
    """The change would make the config invalid, or take a site out of DNS: nothing changed."""


DEFAULT_INDENT = (2, 4, 2)  # mapping, sequence, offset: `    - name: ...` under its key


def _yaml(indent: tuple[int, int, int] = DEFAULT_INDENT) -> YAML:
    yaml = YAML()  # round-trip: comments, key order and quoting survive
    mapping, sequence, offset = indent
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    yaml.preserve_quotes = True
    # Never fold long values (host keys) over lines: entries stay one key per line as written.
    yaml.width = 1 << 16
    return yaml


def guess_indent(text: str) -> tuple[int, int, int]:
    """The file's own indentation (mapping, sequence, offset), so that an edit keeps it:
    `  - name:` under `  kokoa:origins:` is offset 0; the default is `    - name:`."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    mapping = next((len(line) - len(line.lstrip()) for line in lines if line[:1] == " "), DEFAULT_INDENT[0])
    for parent, line in zip(lines, lines[1:]):
        stripped = line.lstrip()
        if stripped.startswith("- ") and parent.rstrip().endswith(":") and not parent.lstrip().startswith("- "):
            offset = (len(line) - len(stripped)) - (len(parent) - len(parent.lstrip()))
            if offset >= 0:
                return mapping, offset + 2, offset
    return mapping, DEFAULT_INDENT[1], DEFAULT_INDENT[2]


def stack_file(stack: str | None, path: str | None) -> Path:
    """`path`, else Pulumi.<stack>.yaml, else the file of the stack `pulumi stack select` chose."""
    if path:
        return Path(path)
    stack = stack or selected_stack()
    if not stack:
        raise StackFileError(f"name the stack (-s NAME edits Pulumi.NAME.yaml; or ${STACK_ENV}, or "
                             "`pulumi stack select NAME`) or the file (--file PATH)")
    return Path(f"Pulumi.{stack}.yaml")


def kokoa_config(config: dict[str, Any]) -> dict[str, Any]:
    """The `kokoa:` keys without their prefix, as the model reads them (a secret as its
    ciphertext: the model only sees that it is set).

    An object key may hold its value as a JSON string (`kokoa:origins: '[{"name": ...}]'`):
    decoded, as `pulumi.Config.get_object` does.
    """
    found = {key[len(PREFIX):]: value for key, value in config.items() if key.startswith(PREFIX)}
    for key in OBJECT_KEYS:
        if isinstance(found.get(key), str):
            try:
                found[key] = json.loads(found[key])
            except ValueError:
                pass  # left as it is: the model says what is wrong with it
    return found


def _plain(value: Any) -> Any:
    """ruamel's commented containers → plain dicts and lists for the model."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class StackDocument:
    """A stack file, loaded to be edited and written back touching only the lines it changes.

    The file's own indentation is kept, and so are comments, quoting and wide lines. A list
    or mapping held as a JSON string stays a JSON string: the edit changes that one line.
    """

    def __init__(self, path: Path, create: bool = False) -> None:
        self.path = path
        try:
            text = path.read_text() if path.exists() or not create else ""
        except OSError as exc:
            raise StackFileError(f"cannot read {path}: {exc.strerror}") from exc
        self.yaml = _yaml(guess_indent(text))
        try:
            document = self.yaml.load(text)
        except Exception as exc:  # ruamel raises several parser error types
            raise StackFileError(f"{path} is not valid YAML: {exc}") from exc
        if document is None and create:
            document = CommentedMap()
        if isinstance(document, dict) and create:
            document.setdefault("config", CommentedMap())
        if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
            raise StackFileError(f"{path} must be a YAML mapping with a `config:` key")
        self.document = document
        self.config = document["config"]
        self._decoded: dict[str, Any] = {}  # key → the value decoded from its JSON string

    def objects(self, key: str, create: type | None = None) -> Any:
        """The value of `kokoa:<key>` to change in place (decoded if it is a JSON string);
        with `create`, an empty one of that type is added when the key is absent."""
        full = PREFIX + key
        if full in self._decoded:
            return self._decoded[full]
        value = self.config.get(full)
        if isinstance(value, str):
            try:
                self._decoded[full] = json.loads(value)
            except ValueError as exc:
                raise StackFileError(f"{self.path}: {full} is neither YAML nor a JSON string: {exc}") from exc
            return self._decoded[full]
        if value is None and create is not None:
            value = self.config[full] = CommentedSeq() if create is list else CommentedMap()
        return value

    def plain(self) -> dict[str, Any]:
        """The config as plain values, JSON strings decoded (what `pulumi up` would read)."""
        for key in OBJECT_KEYS:
            if isinstance(self.config.get(PREFIX + key), str):
                self.objects(key)
        config = _plain(self.config)
        for full, value in self._decoded.items():
            config[full] = _plain(value)
        return config

    def write(self) -> None:
        for full, value in self._decoded.items():
            original = self.config[full]
            if json.loads(original) == value:
                continue  # unchanged: its line stays as written
            compact = ", " not in original and ": " not in original
            encoded = json.dumps(value, separators=(",", ":") if compact else None)
            # The same scalar style (plain, 'single' or "double" quoted) as the line had.
            self.config[full] = type(original)(encoded) if type(original) is not str else encoded
        text = io.StringIO()
        self.yaml.dump(self.document, text)
        # Keep the file's own mode; a new stack file is private, as mkstemp made it before.
        mode = self.path.stat().st_mode & 0o777 if self.path.exists() else PRIVATE
        write_atomically(self.path, text.getvalue(), mode)


def _move_trailing_comment(source: Any, target: Any) -> None:
    """What follows the last key of `source` (blank lines, comments before the next key) goes
    after the last key of `target`, so that it stays where it was in the file."""
    if not (hasattr(source, "ca") and hasattr(target, "ca") and source and target):
        return
    last = list(source)[-1]
    tokens = source.ca.items.get(last)
    if tokens and len(tokens) > 2 and tokens[2] is not None:
        target.ca.items[list(target)[-1]] = [None, None, tokens[2], None]
        tokens[2] = None


def append_entry(path: Path, list_key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Append `entry` to `kokoa:<list_key>` after allocating its `subnet`/`index` when absent.

    The whole resulting config is validated first; on any problem the file is untouched.
    Returns the entry as written.
    """
    stack = StackDocument(path, create=True)
    entries = stack.objects(list_key, create=list)
    if not isinstance(entries, list):
        raise StackFileError(f"{path}: {PREFIX}{list_key} must be a list")

    plain = stack.plain()
    entry = {k: v for k, v in entry.items() if v is not None}
    try:
        if list_key == "origins" and "subnet" not in entry:
            entry["subnet"] = next_subnet(plain.get(PREFIX + "origins") or [])
        if list_key == "edges" and "index" not in entry:
            entry["index"] = next_index(plain.get(PREFIX + "edges") or [], entry.get("origin", ""))
    except ValueError as exc:
        raise ChangeRefused(str(exc)) from exc

    candidate = kokoa_config(plain)
    candidate[list_key] = list(candidate.get(list_key) or []) + [entry]
    try:
        parse_topology(candidate)
    except InvalidConfig as exc:
        raise ChangeRefused("\n".join(str(p) for p in exc.problems)) from exc

    order = ORIGIN_KEYS if list_key == "origins" else EDGE_KEYS
    ordered = sorted(entry.items(), key=lambda item: order.index(item[0]))
    if isinstance(entries, CommentedSeq):
        entries.append(CommentedMap(ordered))
        if len(entries) > 1:
            _move_trailing_comment(entries[-2], entries[-1])
    else:
        entries.append(dict(ordered))
    stack.write()
    return entry


# --- drain, undrain, remove: one edge's entry, for `kokoa drain/undrain/remove-edge` ---------

@dataclass(frozen=True)
class StackChange:
    """What changed in the stack file, and what the next `pulumi up` will do because of it."""

    path: Path
    changed: bool
    summary: str
    next_up: list[str]


def _entry(stack: StackDocument, list_key: str, name: str) -> tuple[Any, int]:
    """The `kokoa:<list_key>` list ("origins" or "edges") and the position of the entry `name`."""
    entries = stack.objects(list_key)
    if not isinstance(entries, list):
        raise StackFileError(f"the stack has no {PREFIX}{list_key} list")
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and entry.get("name") == name:
            return entries, i
    known = ", ".join(str(e.get("name")) for e in entries if isinstance(e, dict)) or "none"
    raise StackFileError(f"no {list_key[:-1]} is named {name!r} ({list_key}: {known})")


@dataclass(frozen=True)
class _EdgeView:
    """What these commands need of an edge, read from the entries as they are.

    Draining, undraining or removing one edge cannot make the rest of the config invalid,
    so the whole file is not validated here (the lab's stack file, for one, leaves the
    host keys to `kokoa lab up`); `pulumi up` validates everything.
    """

    name: str
    origin: str
    public_ip: str
    dns: bool
    host: str
    user: str
    port: int
    names: tuple[str, ...]  # its origin's: the domain, then the hostnames
    zone: bool

    @property
    def site(self) -> str:
        """Its origin's names, for messages."""
        return ", ".join(self.names)


def _view(stack: StackDocument, entry: Any) -> _EdgeView:
    plain = stack.plain()
    name = entry.get("name")
    origins = {o.get("name"): o for o in plain.get(PREFIX + "origins") or [] if isinstance(o, dict)}
    origin = origins.get(entry.get("origin"))
    if origin is None:
        raise StackFileError(f"edge {name}: its origin {entry.get('origin')!r} is not in the stack")
    if not isinstance(entry.get("publicIp"), str):
        raise StackFileError(f"edge {name}: no publicIp")
    return _EdgeView(name=name, origin=origin["name"], public_ip=entry["publicIp"],
                     dns=entry.get("dns", True) is not False,
                     host=str(entry.get("host", entry["publicIp"])),
                     user=str(entry.get("sshUser", plain.get(PREFIX + "sshUser", "root"))),
                     port=int(entry.get("sshPort", 22)), names=_names(origin),
                     zone=bool(origin.get("zoneId") or plain.get(PREFIX + "cloudflareZoneId")))


def _names(origin: dict) -> tuple[str, ...]:
    """An origin entry's names as written: its domain, then each of its hostnames."""
    hostnames = origin.get("hostnames") if isinstance(origin.get("hostnames"), list) else []
    return (str(origin.get("domain")),
            *(str(h["name"]) for h in hostnames if isinstance(h, dict) and isinstance(h.get("name"), str)))


def _serving(stack: StackDocument, origin: str) -> list[str]:
    return [e.get("name") for e in stack.objects("edges") or []
            if isinstance(e, dict) and e.get("origin") == origin and e.get("dns", True) is not False]


def _insert(entry: dict, key: str, value: Any, order: tuple[str, ...]) -> None:
    """`key: value` where `order` (the keys in writing order) puts it: before the entry's first
    key that comes after it (a ruamel map, or a dict from JSON)."""
    keys = list(entry)
    position = next((k for k, name in enumerate(keys) if name in order[order.index(key) + 1:]), len(keys))
    if hasattr(entry, "insert"):
        entry.insert(position, key, value)
        return
    items = list(entry.items())
    entry.clear()
    entry.update(items[:position] + [(key, value)] + items[position:])


def _record_lines(edge: _EdgeView, verb: str) -> list[str]:
    if edge.zone:
        return [f"{verb} the A record {name} → {edge.public_ip} (TTL {DNS_TTL} s)" for name in edge.names]
    action = "add" if verb == "creates" else "remove"
    records = "it" if len(edge.names) == 1 else f"its {len(edge.names)} records"
    return [f"manages no A record (no Cloudflare zone for {edge.origin}): {action} {records} by hand: "
            + "; ".join(f"kokoa-dns {action} --ip {edge.public_ip} --name {name}" for name in edge.names)]


def set_edge_dns(path: Path, name: str, serving: bool, force: bool = False) -> StackChange:
    """Drain (`serving=False`: `dns: false`) or undrain an edge, keeping the file's comments.

    Draining the last serving edge of an origin is refused unless `force`. On any problem
    the file is left as it was.
    """
    stack = StackDocument(path)
    edges, i = _entry(stack, "edges", name)
    edge = _view(stack, edges[i])
    site = edge.site
    if edge.dns == serving:
        return StackChange(path, False, f"edge {name} is already {'serving' if serving else 'drained'}; "
                                       f"{path} is unchanged", [])
    entry = edges[i]
    if serving:
        if "dns" in entry:
            del entry["dns"]  # the default: serving
    else:
        others = [e for e in _serving(stack, edge.origin) if e != name]
        if not others and not force:
            raise ChangeRefused(f"{name} is the last serving edge of {edge.origin} ({site}): draining it "
                                 "takes the site out of DNS. Add and deploy another edge first, or use --force")
        _insert(entry, "dns", False, EDGE_KEYS)
    stack.write()
    serving_now = _serving(stack, edge.origin)
    if serving:
        lines = [*_record_lines(edge, "creates"),
                 f"{site} is then served by {', '.join(serving_now)}"]
        return StackChange(path, True, f"undrained edge {name} in {path}", lines)
    lines = [*_record_lines(edge, "deletes"), f"keeps {name} running and its tunnel up",
             (f"{site} is then served by {', '.join(serving_now)}" if serving_now
              else f"WARNING: {site} then has no serving edge: the site is unreachable"),
             f"then wait out the TTL before `kokoa remove-edge {name}`"]
    return StackChange(path, True, f"drained edge {name} in {path} (dns: false)", lines)


def remove_edge(path: Path, name: str, force: bool = False) -> StackChange:
    """Delete an edge's entry, keeping the file's comments.

    Removing an origin's last serving edge is refused unless `force`; drain it first and
    wait out the TTL. On any problem the file is left as it was.
    """
    stack = StackDocument(path)
    edges, i = _entry(stack, "edges", name)
    edge = _view(stack, edges[i])
    others = [e for e in _serving(stack, edge.origin) if e != name]
    if edge.dns and not others and not force:
        raise ChangeRefused(f"{name} is the last serving edge of {edge.origin} ({edge.site}): removing it "
                             "takes the site down. Add and deploy another edge first, or use --force")
    if i == len(edges) - 1 and i > 0:
        _move_trailing_comment(edges[i], edges[i - 1])
    del edges[i]
    renames = stack.objects("formerNames")
    if isinstance(renames, dict) and name in renames:
        del renames[name]
    stack.write()
    host = f"{edge.user}@{edge.host}" + (f":{edge.port}" if edge.port != 22 else "")
    lines = [f"runs its uninstall.sh on {host} (nginx stopped, tunnel down, its keys and certificate removed)"]
    if edge.dns:
        lines += _record_lines(edge, "deletes")
        lines.append("WARNING: it was still serving; clients that cached its address fail until the TTL passes"
                     if others else f"WARNING: {edge.site} then has no serving edge: the site is unreachable")
    lines += [f"removes its peer from origin {edge.origin} and its WireGuard keys from the state"]
    if not _serving(stack, edge.origin) and not edge.dns:
        lines.append(f"{edge.site} has no serving edge (it had none before either)")
    return StackChange(path, True, f"removed edge {name} from {path}", lines)


# --- underAttack: one origin's entry, for `kokoa under-attack` --------------------------------

def set_under_attack(path: Path, name: str, mode: str) -> StackChange:
    """Set origin `name`'s `underAttack` to `mode`, keeping the file's comments.

    `auto` needs the origin's `capacity` (it challenges only while the origin is full);
    the default is written as no key at all. On any problem the file is left as it was.
    """
    if mode not in UNDER_ATTACK_MODES:
        raise ChangeRefused(f"{mode!r} is not one of {', '.join(UNDER_ATTACK_MODES)}")
    stack = StackDocument(path)
    origins, i = _entry(stack, "origins", name)
    entry = origins[i]
    capacity = entry.get("capacity")
    concurrent = capacity.get("concurrentRequests") if isinstance(capacity, dict) else None
    if mode == "auto" and capacity is None:
        raise ChangeRefused(f"origin {name} has no capacity: auto challenges visitors only while the origin is "
                            f"full. Set its capacity (kokoa:origins[].capacity: {{concurrentRequests: N}}, the "
                            "most requests the application serves at once), or use on")
    default = "auto" if capacity is not None else "off"
    current = entry.get("underAttack", default)
    if current == mode:
        return StackChange(path, False, f"origin {name} is already underAttack: {mode}; {path} is unchanged", [])
    if mode == default:
        del entry["underAttack"]
    elif "underAttack" in entry:
        entry["underAttack"] = mode
    else:
        _insert(entry, "underAttack", mode, ORIGIN_KEYS)
    stack.write()
    edges = [e.get("name") for e in stack.objects("edges") or []
             if isinstance(e, dict) and e.get("origin") == name]
    where = f"on {', '.join(edges)}" if edges else "on its edges (it has none yet)"
    exempt = [*(entry.get("allowFrom") or []), *(entry.get("exemptPaths") or [])]
    spared = f" ({', '.join(exempt)} and the health checker excepted)" if exempt else " (the health checker excepted)"
    lines = {
        "on": [f"{where}: every request without a visitor pass gets the challenge{spared}; visitors "
               "who solve it, or came with a pass, go through"],
        "auto": [f"{where}: requests without a visitor pass get the challenge only while {name} is at its "
                 f"capacity ({concurrent} requests at once){spared}; visitors answered before get a pass"],
        "off": [f"{where}: no visitor pass and no challenge"
                + (f"; over {name}'s capacity ({concurrent} requests at once) a 503 with Retry-After"
                   if capacity is not None else "")],
    }[mode]
    lines.append("reloads nginx on each edge (open connections finish)"
                 + ("; installs libnginx-mod-http-js where it is missing" if mode != "off" else ""))
    return StackChange(path, True, f"set underAttack: {mode} for origin {name} in {path}", lines)
