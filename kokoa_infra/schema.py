"""How a stack config key is declared, and what each kind of value may be.

Every `kokoa:` key is declared once, as a field of a dataclass of kokoa_infra/model.py:

    idle_timeout: int = key(Whole(1, 3600), default=60, doc="seconds an open WebSocket ... may stay silent")

The field's name gives the key's name (`idle_timeout` → `idleTimeout`), the kind its type and
bounds; `default` or `required`, and one doc line. From these declarations come the validation
(kokoa_infra/validate.py reads every declared key and reports one problem per value), the
order `kokoa add-origin/add-edge` write keys in, how `pulumi.Config` reads each key (a string
or a JSON/YAML value), stacks/reference.yaml and docs/configuration.md (`reference_yaml()`,
`reference_table()`, checked by tests/unit/test_schema.py).

A kind checks one value: it returns the value as the model keeps it, or reports what is wrong
through `where` (entry and key of the value) and returns INVALID. Rules that join several keys
or entries (an endpoint that defaults to host, unique names...) are validate.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import textwrap
import typing
from typing import Any, Iterator, Protocol

from kokoa_infra.addressing import NETWORK_MAX_PREFIX
from kokoa_infra.values import (
    DIGITS_AND_DOTS_RE,
    HOSTNAME_RE,
    LEADING_ZEROS,
    PATH_PREFIX_RE,
    PORT_RANGE,
    SIZE_RE,
    SIZE_UNITS,
    UPSTREAM_RE,
    canonical_ipv4,
    ipv4_problem,
    numeric_host_problem,
    parse_ipv4,
    public_address_problem,
    special_address,
    ssh_address_problem,
    upstream_address_problem,
)

INVALID: Any = type("Invalid", (), {"__repr__": lambda self: "INVALID", "__bool__": lambda self: False})()
"""A value whose problem was reported: nothing is built from it."""


class Where(Protocol):
    """The entry and key of the value being checked (validate.py's reader)."""

    entry: str
    key: str

    def fail(self, message: str, *, key: str | None = None, entry: str | None = None) -> Any:
        """Report a problem of this value (or of `key`, e.g. "allowFrom[2]", or of another
        `entry`, e.g. a list's own label); returns INVALID."""

    def read(self, cls: type, raw: dict[str, Any], entry: str) -> Any:
        """The declared keys of `cls` in the mapping `raw`, an entry labelled `entry`."""


# --- kinds of values ------------------------------------------------------------------------------

class Kind:
    """What one key's value may be."""

    # A string in the stack file (Pulumi's config.get reads it); else a JSON/YAML value (get_object).
    text = False

    def check(self, value: Any, where: Where) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        """The type and bounds, for docs/configuration.md."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Text(Kind):
    pattern: re.Pattern[str]
    what: str  # "a user name": "'x' is not a user name"
    text = True

    def check(self, value: Any, where: Where) -> Any:
        if not isinstance(value, str) or not self.pattern.fullmatch(value):
            return where.fail(f"{value!r} is not {self.what}")
        return value

    def describe(self) -> str:
        return f"text: {self.what}"


@dataclasses.dataclass(frozen=True)
class Whole(Kind):
    low: int
    high: int | None = None

    def check(self, value: Any, where: Where) -> Any:
        # YAML `true` is an int in Python; a port or allocation is never a boolean.
        if (isinstance(value, bool) or not isinstance(value, int) or value < self.low
                or (self.high is not None and value > self.high)):
            return where.fail(f"{value!r} is not a whole number {self.bounds}")
        return value

    @property
    def bounds(self) -> str:
        return f"from {self.low} to {self.high}" if self.high is not None else f"of at least {self.low}"

    def describe(self) -> str:
        return f"whole number {self.low}..{self.high}" if self.high is not None else f"whole number >= {self.low}"


class Flag(Kind):
    def check(self, value: Any, where: Where) -> Any:
        if not isinstance(value, bool):
            return where.fail(f"{value!r} is not true or false")
        return value

    def describe(self) -> str:
        return "true or false"


@dataclasses.dataclass(frozen=True)
class Choice(Kind):
    options: tuple[str, ...]
    text = True

    def check(self, value: Any, where: Where) -> Any:
        if value not in self.options:
            return where.fail(f"{value!r} is not one of {', '.join(self.options)}")
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(self.options)


@dataclasses.dataclass(frozen=True)
class Host(Kind):
    """An IPv4 address (canonical, public or fit for SSH) or a host name."""

    public: bool
    text = True

    def check(self, value: Any, where: Where) -> Any:
        if not isinstance(value, str):
            return where.fail(f"{value!r} is not an IPv4 address or host name")
        if DIGITS_AND_DOTS_RE.fullmatch(value):
            address = parse_ipv4(value)
            if address is None:
                return where.fail(ipv4_problem(value))
            problem = public_address_problem(address) if self.public else ssh_address_problem(address)
            return where.fail(problem) if problem else str(address)
        numeric = numeric_host_problem(value)
        if numeric:
            return where.fail(numeric)
        if not HOSTNAME_RE.fullmatch(value):
            return where.fail(f"{value!r} is not an IPv4 address or host name")
        return value

    def describe(self) -> str:
        return "IPv4 address (public) or host name" if self.public else "IPv4 address or host name"


class PublicAddress(Kind):
    """A canonical, public IPv4 address."""

    text = True

    def check(self, value: Any, where: Where) -> Any:
        if not isinstance(value, str):
            return where.fail(f"{value!r} is not an IPv4 address like 198.51.100.7")
        address = parse_ipv4(value)
        if address is None:
            return where.fail(ipv4_problem(value))
        problem = public_address_problem(address)
        return where.fail(problem) if problem else str(address)

    def describe(self) -> str:
        return "public IPv4 address"


class Upstream(Kind):
    """The application's URL as the origin host reaches it."""

    text = True

    def check(self, value: Any, where: Where) -> Any:
        match = UPSTREAM_RE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            return where.fail(f"{value!r} is not an http(s)://host[:port][/path] URL of the application")
        host, port = match["host"], match["port"]
        if DIGITS_AND_DOTS_RE.fullmatch(host) and parse_ipv4(host) is None:
            return where.fail(f"{value!r}: host {ipv4_problem(host)}")
        if port is not None and not PORT_RANGE[0] <= int(port) <= PORT_RANGE[1]:
            return where.fail(f"{value!r}: port {port} is not from 1 to 65535")
        problem = numeric_host_problem(host) or upstream_address_problem(host)
        return where.fail(f"{value!r}: host {problem}") if problem else value

    def describe(self) -> str:
        return "http(s)://host[:port][/path] URL"


class HostKey(Kind):
    """An OpenSSH public host key line. Checked with the entry's host and port (validate.py),
    which the message's ssh-keyscan command names."""

    text = True

    def check(self, value: Any, where: Where) -> Any:
        return value

    def describe(self) -> str:
        return "OpenSSH public key: ssh-ed25519 or ecdsa-sha2-nistp256/384/521"


@dataclasses.dataclass(frozen=True)
class Size(Kind):
    """nginx's size syntax (a number, then k or m), within bounds in bytes."""

    low: int
    high: int
    text = True

    def check(self, value: Any, where: Where) -> Any:
        match = SIZE_RE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            return where.fail(f"{value!r} is not a size like 10m or 512k (a number, then k or m)")
        if not self.low <= int(match["number"]) * SIZE_UNITS[match["unit"].lower()] <= self.high:
            return where.fail(f"{value!r} is not from {_size(self.low)} to {_size(self.high)}")
        return value

    def describe(self) -> str:
        return f"size (a number, then k or m) {_size(self.low)}..{_size(self.high)}"


def _size(size: int) -> str:
    return f"{size // 1024 ** 2}m" if size >= 1024 ** 2 else f"{size // 1024}k"


class Ipv4Network(Kind):
    """One IPv4 network in CIDR, normalised ("198.51.100.0/24"); a bare address is its /32."""

    def check(self, value: Any, where: Where) -> Any:
        if not isinstance(value, str):
            return where.fail(f"{value!r} is not an IPv4 network like 198.51.100.0/24")
        address, slash, prefix = value.partition("/")
        if slash and not (prefix.isascii() and prefix.isdigit() and str(int(prefix)) == prefix and int(prefix) <= 32):
            return where.fail(f"{value!r} is not an IPv4 network like 198.51.100.0/24 (prefix length 0 to 32)")
        if parse_ipv4(address) is None:
            canonical = canonical_ipv4(address)
            return where.fail(LEADING_ZEROS.format(value=value, canonical=canonical + slash + prefix) if canonical
                              else f"{value!r} is not an IPv4 network like 198.51.100.0/24")
        try:
            return str(ipaddress.IPv4Network(value))
        except ValueError:
            return where.fail(f"{value!r} has host bits set; write {ipaddress.IPv4Network(value, strict=False)}")

    def describe(self) -> str:
        return "IPv4 networks (CIDR)"


@dataclasses.dataclass(frozen=True)
class PathPrefix(Kind):
    """A path prefix nginx takes as a `location` and that matches what it says. `exempt`: a
    prefix never challenged, where "/" and the ACME challenges make no sense."""

    exempt: bool = False

    def check(self, value: Any, where: Where) -> Any:
        if not isinstance(value, str) or not PATH_PREFIX_RE.fullmatch(value):
            return where.fail(f"{value!r} is not a path prefix like /api/ (a leading /, then at most "
                              "199 of A-Z a-z 0-9 . _ ~ / -)")
        if value == "/" and self.exempt:
            return where.fail("'/' exempts every path, which is underAttack: off")
        if "//" in value or any(part in (".", "..") for part in value.split("/")):
            # nginx matches the normalised path: such a prefix would never match anything.
            return where.fail(f"{value!r} has an empty, . or .. segment, which a normalised path never has")
        if value.startswith("/.well-known/acme-challenge") and self.exempt:
            return where.fail("ACME challenges are never challenged already")
        return value

    def describe(self) -> str:
        return "path prefixes"


@dataclasses.dataclass(frozen=True)
class ListOf(Kind):
    """A list of `item`s, each reported as key[i]: at most `most`, each once (`distinct`);
    `empty`: why an empty list is refused (None: allowed)."""

    item: Kind
    what: str  # 'path prefixes like ["/api/"]': "5 is not a list of path prefixes like ..."
    most: int | None = None
    distinct: bool = True
    empty: str | None = None

    def check(self, value: Any, where: Where) -> Any:
        if not isinstance(value, list):
            return where.fail(f"{value!r} is not a list of {self.what}")
        if not value and self.empty:
            return where.fail(self.empty)
        if self.most is not None and len(value) > self.most:
            return where.fail(f"has {len(value)} entries; at most {self.most}")
        items = [self.item.check(item, _Item(where, i)) for i, item in enumerate(value)]
        if INVALID in items:
            return INVALID
        repeated = sorted({item for item in items if items.count(item) > 1}) if self.distinct else []
        if repeated:
            return where.fail(f"lists {', '.join(repeated)} more than once")
        return tuple(items)

    def describe(self) -> str:
        return f"list of at most {self.most} {self.item.describe()}" if self.most else \
            f"list of {self.item.describe()}"


@dataclasses.dataclass
class _Item:
    """Where item i of a list is: its problems are reported as key[i]."""

    outer: Where
    index: int

    @property
    def entry(self) -> str:
        return self.outer.entry

    @property
    def key(self) -> str:
        return f"{self.outer.key}[{self.index}]"

    def fail(self, message: str, *, key: str | None = None, entry: str | None = None) -> Any:
        return self.outer.fail(message, key=key or self.key, entry=entry)

    def read(self, cls: type, raw: dict[str, Any], entry: str) -> Any:
        return self.outer.read(cls, raw, entry)


class PrivateNetwork(Kind):
    """kokoa:network: a private IPv4 network with room for every origin's /24."""

    text = True

    def check(self, value: Any, where: Where) -> Any:
        try:
            network = ipaddress.IPv4Network(value) if isinstance(value, str) else None
        except ValueError:
            network = None
        if network is None or not network.is_private or network.prefixlen > NETWORK_MAX_PREFIX:
            return where.fail(f"{value!r} is not a private IPv4 network of /{NETWORK_MAX_PREFIX} or larger "
                              "(origin X gets <net>.X.1), e.g. 10.100.0.0/16")
        # Python counts loopback, link-local and 0.0.0.0/8 as private; no tunnel can use them.
        special = special_address(network.network_address, loopback_ok=False)
        if special:
            return where.fail(f"{value!r} {special}: tunnel addresses there do not route; use a private "
                              "network such as 10.100.0.0/16")
        return network

    def describe(self) -> str:
        return f"private IPv4 network, /{NETWORK_MAX_PREFIX} or larger"


class Pem(Kind):
    text = True

    def check(self, value: Any, where: Where) -> Any:
        if not isinstance(value, str) or "-----BEGIN CERTIFICATE-----" not in value:
            return where.fail("must be PEM text with at least one CERTIFICATE block")
        return value

    def describe(self) -> str:
        return "PEM certificates"


class Secret(Kind):
    """A Pulumi secret: the model keeps only whether it is set, never its value."""

    def check(self, value: Any, where: Where) -> Any:
        return True

    def describe(self) -> str:
        return "secret (pulumi config set --secret)"


@dataclasses.dataclass(frozen=True)
class Group(Kind):
    """A mapping of the keys declared by `cls`: {requestsPerSecond: 20, burst: 40}."""

    cls: type
    like: str  # "{concurrentRequests: 8}": "must be a mapping like {concurrentRequests: 8}"

    def check(self, value: Any, where: Where) -> Any:
        if not isinstance(value, dict):
            return where.fail(f"must be a mapping like {self.like}")
        return where.read(self.cls, value, f"{where.entry} {where.key}")

    def describe(self) -> str:
        return "mapping"


@dataclasses.dataclass(frozen=True)
class Entries(Kind):
    """A list of mappings, each of the keys declared by `cls`, labelled `kokoa:origins[i] (name)`
    in messages (a nested list: `kokoa:origins[0] (blog) hostnames[1] (www)`)."""

    cls: type

    def check(self, value: Any, where: Where) -> Any:
        top = where.entry == "kokoa"
        prefix = f"kokoa:{where.key}" if top else f"{where.entry} {where.key}"
        if not isinstance(value, list):
            return where.fail(f"{value!r} is not a list of entries")
        entries = []
        for i, item in enumerate(value):
            name = item.get("name") if isinstance(item, dict) else None
            # A name with a newline or control character would break the one-line message.
            label = f"{prefix}[{i}]" + (f" ({name})" if isinstance(name, str) and name.isprintable() else "")
            if not isinstance(item, dict):
                where.fail(f"{item!r} is not a mapping of keys to values", key=f"{where.key}[{i}]")
                continue
            entries.append(where.read(self.cls, item, label))
        return entries

    def describe(self) -> str:
        return "list of entries"


class FormerNames(Kind):
    """{node: former name or [former names]}; the names are checked against the nodes by validate.py."""

    def check(self, value: Any, where: Where) -> Any:
        if not isinstance(value, dict):
            return where.fail("must be a mapping {node: former name or [names]}")
        return {str(node): [names] if isinstance(names, str) else names for node, names in value.items()}

    def describe(self) -> str:
        return "mapping {node: former name or [former names]}"


# --- declaring a key --------------------------------------------------------------------------------

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its name in the stack file, its kind, default (or REQUIRED) and doc line."""

    name: str
    kind: Kind
    default: Any
    doc: str
    # How the default reads in docs when it is not a value ("kokoa:sshUser", "host").
    default_doc: str | None = None
    # The value stacks/reference.yaml shows (default: the default); `shown=False`: commented out.
    example: Any = None
    shown: bool = True

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def camel(name: str) -> str:
    """A field's name as a key: idle_timeout → idleTimeout."""
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def key(kind: Kind, *, doc: str, required: bool = False, default: Any = None, name: str | None = None,
        default_doc: str | None = None, example: Any = None, shown: bool = True) -> Any:
    """A dataclass field that is a config key. `name`: when it is not the field's name in
    camelCase. Not `required` and no `default`: None, which a rule of validate.py may fill in
    (say so in `default_doc`)."""
    spec = dict(kind=kind, default=REQUIRED if required else default, doc=doc, default_doc=default_doc,
                example=example, shown=shown, name=name)
    if required:
        return dataclasses.field(metadata={"key": spec})
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"key": spec})
    return dataclasses.field(default=default, metadata={"key": spec})


def derived() -> Any:
    """A field that is no config key: validate.py computes it (a WireGuard address)."""
    return dataclasses.field(default=None, metadata={"derived": True})


def inline() -> Any:
    """A field whose dataclass's keys sit at this level, not under a key of their own."""
    return dataclasses.field(default=None, metadata={"inline": True})


@functools.cache
def declared(cls: type) -> tuple[tuple[str, Key | type], ...]:
    """(field name, Key) for each key of `cls` in writing order; (field name, dataclass) for an inline one."""
    found: list[tuple[str, Key | type]] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("inline"):
            found.append((f.name, typing.get_type_hints(cls)[f.name]))
        elif "key" in f.metadata:
            spec = dict(f.metadata["key"])
            found.append((f.name, Key(name=spec.pop("name") or camel(f.name), **spec)))
    return tuple(found)


def top_level(cls: type) -> Iterator[Key]:
    """The keys of `cls` (inline ones included), in writing order."""
    for _, spec in declared(cls):
        if isinstance(spec, type):
            yield from top_level(spec)
        else:
            yield spec


@functools.cache
def declared_keys(cls: type) -> tuple[str, ...]:
    """The key names of `cls` (inline ones included), in writing order."""
    return tuple(spec.name for spec in top_level(cls))


def declared_key(cls: type, name: str) -> Key:
    """The declaration of key `name` of `cls` (inline ones included)."""
    for spec in top_level(cls):
        if spec.name == name:
            return spec
    raise KeyError(name)


def every_key(cls: type, path: str = "") -> Iterator[tuple[str, Key]]:
    """("origins[].rateLimit.burst", Key) for every key reachable from `cls`, depth first."""
    for spec in top_level(cls):
        full = f"{path}{spec.name}"
        yield full, spec
        if isinstance(spec.kind, Entries):
            yield from every_key(spec.kind.cls, f"{full}[].")
        elif isinstance(spec.kind, Group):
            yield from every_key(spec.kind.cls, f"{full}.")


# --- the reference stack file and the docs table ------------------------------------------------------

REFERENCE_HEADER = """\
# Every key of a Kokoa stack, with its default and rules. Copy what you need into
# Pulumi.<stack>.yaml (`pulumi stack init <stack>` creates it). Allocations (subnet,
# index) are explicit so that adding, removing or reordering entries never changes
# another node's WireGuard address or keys; `kokoa add-origin` / `kokoa add-edge` pick
# the next free value for you. Every value is validated before anything is declared.
#
# Generated from the declarations in kokoa_infra/model.py: edit those, then regenerate with
# .venv/bin/python tests/unit/test_schema.py (the test checks that this file is up to date).
config:
"""
# Keys of other packages that a Kokoa stack sets, shown after kokoa's own settings.
PROVIDER_KEYS = """\
  # Secret, read by the pulumi-cloudflare provider (a token with Zone.DNS edit).
  #   pulumi config set --secret cloudflare:apiToken <token>
  cloudflare:apiToken:
    secure: AAABA...
"""
WIDTH = 100


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(spec: Key) -> str:
    """How the default reads: "" for none (and for a mapping's, which its keys give)."""
    if spec.default_doc:
        return spec.default_doc
    if spec.required or spec.default in (None, (), {}) or isinstance(spec.kind, (Group, Entries)):
        return ""
    return _yaml_value(spec.default)


def _doc_line(spec: Key) -> str:
    default = _default(spec)
    if spec.required:
        parts = ["required", spec.kind.describe()]
    elif default.startswith("required"):  # "required with any origin": a rule of validate.py
        parts = [default, spec.kind.describe()]
    else:
        parts = ["optional", spec.kind.describe()] + ([f"default {default}"] if default else [])
    return f"{spec.doc} ({'; '.join(parts)})"


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - len(indent) - 2, initial_indent=f"{indent}# ",
                         subsequent_indent=f"{indent}# ", break_on_hyphens=False)


def _reference_entries(cls: type, indent: str) -> list[str]:
    """The keys of one entry of `cls` (a list item), each after its doc comment."""
    lines: list[str] = []
    first = True
    for spec in top_level(cls):
        lead = f"{indent}- " if first else f"{indent}  "
        inner = f"{indent}  "
        lines += _comment(_doc_line(spec), indent if first else inner)
        lines += _reference_key(spec, lead, inner, f"{spec.name}:")
        first = False
    return lines


def _reference_key(spec: Key, lead: str, inner: str, label: str) -> list[str]:
    example = spec.example if spec.example is not None else spec.default
    comment = "" if spec.shown else "# "
    if isinstance(spec.kind, Secret):
        return [f"{lead}{comment}{label}", f"{inner}  {comment}secure: AAABA..."]
    if isinstance(spec.kind, Entries):
        return [f"{lead}{label}", *_reference_entries(spec.kind.cls, inner + "  ")]
    if isinstance(spec.kind, Group):
        lines = [f"{lead}{comment}{label}"]
        for sub in top_level(spec.kind.cls):
            lines += _comment(_doc_line(sub), inner + "  ")
            lines += _reference_key(sub, inner + "  ", inner + "  ", f"{sub.name}:")
        return lines
    if isinstance(example, str) and "\n" in example:
        return [f"{lead}{comment}{label} |", *(f"{inner}{comment}  {line}" for line in example.splitlines())]
    return [f"{lead}{comment}{label} {_yaml_value(example)}"]


def reference_yaml(root: type) -> str:
    """stacks/reference.yaml: every key of `root` (model.Topology) with its doc and an example."""
    lines = [REFERENCE_HEADER.rstrip("\n")]
    for spec in top_level(root):
        lines += _comment(_doc_line(spec), "  ")
        lines += _reference_key(spec, "  ", "  ", f"kokoa:{spec.name}:")
        if isinstance(spec.kind, Secret):
            lines += PROVIDER_KEYS.rstrip("\n").splitlines()
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: `|` and `<` escaped (outside backticks alike, enough here)."""
    return text.replace("|", "\\|").replace("<", "\\<") if "`" not in text else text.replace("|", "\\|")


def reference_table(root: type) -> str:
    """The table of every key for docs/configuration.md."""
    rows = ["| key | type and bounds | default | what it does |", "|---|---|---|---|"]
    for full, spec in every_key(root):
        default = "required" if spec.required else spec.default_doc or (
            f"`{_default(spec)}`" if _default(spec) else "")
        name = f"`kokoa:{full}`" if "." not in full and "[" not in full else f"`{full}`"
        cells = [_cell(spec.kind.describe()), _cell(default), _cell(spec.doc)]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"
