"""Edit `Pulumi.<stack>.yaml` in place: append an origin or edge with the next free allocation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from kokoa_infra.atomic_file import PRIVATE, write_atomically
from kokoa_infra.model import InvalidConfig, next_index, next_subnet, parse_topology

PREFIX = "kokoa:"
# Keys in the order CONTRACT.md shows them, so added entries read like hand-written ones.
ORIGIN_ORDER = ["name", "domain", "subnet", "host", "endpoint", "listenPort", "upstream", "sshPort",
                "sshUser", "hostKey", "insecureAnyHostKey", "rateLimit", "hstsMaxAge", "zoneId",
                "keyGeneration"]
EDGE_ORDER = ["name", "origin", "publicIp", "index", "host", "sshPort", "sshUser", "hostKey",
              "insecureAnyHostKey", "dns", "keyGeneration"]


class StackFileError(Exception):
    """The stack file cannot be read or the change would make it invalid."""


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: comments, key order and quoting survive
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.preserve_quotes = True
    # Never fold long values (host keys) over lines: entries stay one key per line as written.
    yaml.width = 4096
    return yaml


def stack_file(stack: str | None, path: str | None) -> Path:
    if path:
        return Path(path)
    if not stack:
        raise StackFileError("name the stack (--stack NAME edits Pulumi.NAME.yaml) or the file (--file PATH)")
    return Path(f"Pulumi.{stack}.yaml")


def kokoa_config(config: dict[str, Any]) -> dict[str, Any]:
    """The `kokoa:` keys without their prefix, as the model reads them (secrets left out)."""
    return {key[len(PREFIX):]: value for key, value in config.items()
            if key.startswith(PREFIX) and not (isinstance(value, dict) and "secure" in value)}


def _plain(value: Any) -> Any:
    """ruamel's commented containers → plain dicts and lists for the model."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def append_entry(path: Path, list_key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Append `entry` to `kokoa:<list_key>` after allocating its `subnet`/`index` when absent.

    The whole resulting config is validated first; on any problem the file is untouched.
    Returns the entry as written.
    """
    yaml = _yaml()
    try:
        document = yaml.load(path.read_text()) if path.exists() else None
    except OSError as exc:
        raise StackFileError(f"cannot read {path}: {exc.strerror}") from exc
    except Exception as exc:  # ruamel raises several parser error types
        raise StackFileError(f"{path} is not valid YAML: {exc}") from exc
    if document is None:
        document = CommentedMap()
    if not isinstance(document, dict):
        raise StackFileError(f"{path} must be a YAML mapping with a `config:` key")
    config = document.setdefault("config", CommentedMap())
    entries = config.setdefault(PREFIX + list_key, CommentedSeq())
    if not isinstance(entries, list):
        raise StackFileError(f"{path}: {PREFIX}{list_key} must be a list")

    plain = _plain(config)
    entry = {k: v for k, v in entry.items() if v is not None}
    try:
        if list_key == "origins" and "subnet" not in entry:
            entry["subnet"] = next_subnet(plain.get(PREFIX + "origins") or [])
        if list_key == "edges" and "index" not in entry:
            entry["index"] = next_index(plain.get(PREFIX + "edges") or [], entry.get("origin", ""))
    except ValueError as exc:
        raise StackFileError(str(exc)) from exc

    candidate = kokoa_config(plain)
    candidate[list_key] = list(candidate.get(list_key) or []) + [entry]
    try:
        parse_topology(candidate)
    except InvalidConfig as exc:
        raise StackFileError("\n".join(str(p) for p in exc.problems)) from exc

    order = ORIGIN_ORDER if list_key == "origins" else EDGE_ORDER
    entries.append(CommentedMap(sorted(entry.items(), key=lambda item: order.index(item[0]))))
    _write_document(path, document, yaml)
    return entry


def _write_document(path: Path, document: Any, yaml: YAML) -> None:
    text = io.StringIO()
    yaml.dump(document, text)
    # Keep the file's own mode; a new stack file is private, as mkstemp made it before.
    mode = path.stat().st_mode & 0o777 if path.exists() else PRIVATE
    write_atomically(path, text.getvalue(), mode)
