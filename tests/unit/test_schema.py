"""Every config key is declared once (kokoa_infra/model.py): the reference stack, the docs table,
how Pulumi reads each key and what the stack file editor writes all come from the declarations.

Regenerate stacks/reference.yaml and docs/configuration.md's table after changing a declaration:
    .venv/bin/python tests/unit/test_schema.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from kokoa_infra.model import Edge, InvalidConfig, Origin, Topology
from kokoa_infra.program import read_config
from kokoa_infra.schema import (
    Entries,
    Flag,
    Text,
    Whole,
    declared_keys,
    every_key,
    key,
    reference_table,
    reference_yaml,
    top_level,
)
from kokoa_infra.stackfile import EDGE_KEYS, OBJECT_KEYS, ORIGIN_KEYS, kokoa_config
from kokoa_infra.validate import check_entry, parse_topology
from kokoa_infra.values import DOMAIN_RE

PROJECT_DIR = Path(__file__).resolve().parents[2]
REFERENCE = PROJECT_DIR / "stacks" / "reference.yaml"
CONFIGURATION = PROJECT_DIR / "docs" / "configuration.md"
TABLE_START = "<!-- keys: generated from kokoa_infra/model.py by tests/unit/test_schema.py -->\n"
TABLE_END = "<!-- end of keys -->\n"


def configuration_with(table: str) -> str:
    text = CONFIGURATION.read_text()
    before, rest = text.split(TABLE_START, 1)
    return before + TABLE_START + table + TABLE_END + rest.split(TABLE_END, 1)[1]


def test_the_reference_stack_is_generated_from_the_declarations():
    assert REFERENCE.read_text() == reference_yaml(Topology), \
        "stacks/reference.yaml is out of date: .venv/bin/python tests/unit/test_schema.py"


def test_the_configuration_table_is_generated_from_the_declarations():
    assert CONFIGURATION.read_text() == configuration_with(reference_table(Topology)), \
        "docs/configuration.md is out of date: .venv/bin/python tests/unit/test_schema.py"


def test_the_reference_stack_is_a_valid_config():
    """What it shows, uncommented keys and examples, passes validation as it stands."""
    topology = parse_topology(kokoa_config(YAML(typ="safe").load(REFERENCE.read_text())["config"]))
    assert [o.name for o in topology.origins] == ["blog"] and [e.name for e in topology.edges] == ["edge-tokyo-1"]
    assert topology.origins[0].defence.capacity == 8 and topology.ssh_private_key_set


def test_every_key_has_one_doc_line_and_is_required_or_has_a_default():
    keys = list(every_key(Topology))
    assert len(keys) > 50
    for full, spec in keys:
        assert spec.doc and "\n" not in spec.doc and spec.doc == spec.doc.strip(), full
        assert spec.required or spec.default is not None or spec.default_doc or spec.example is not None, full
    names = [full for full, _ in keys]
    assert len(names) == len(set(names))


def test_the_editor_writes_keys_in_declaration_order():
    assert ORIGIN_KEYS[:4] == ("name", "domain", "subnet", "host") and ORIGIN_KEYS[-1] == "keyGeneration"
    assert EDGE_KEYS == ("name", "origin", "publicIp", "index", "host", "sshPort", "sshUser", "hostKey",
                         "insecureAnyHostKey", "dns", "keyGeneration")


class RecordingConfig:
    """What `pulumi.Config` is asked, by method."""

    def __init__(self) -> None:
        self.asked: dict[str, str] = {}

    def get(self, name: str):
        self.asked[name] = "get"

    def get_object(self, name: str):
        self.asked[name] = "get_object"

    def get_secret(self, name: str):
        self.asked[name] = "get_secret"


def test_pulumi_reads_each_key_by_its_kind_not_by_a_list():
    config = RecordingConfig()
    assert read_config(config) == ({}, None)
    assert config.asked == {spec.name: ("get_secret" if spec.name == "sshPrivateKey" else
                                        "get" if spec.kind.text else "get_object") for spec in top_level(Topology)}
    # Numbers, booleans, lists and mappings are JSON/YAML values; the stack file editor decodes the same ones.
    assert {name for name, how in config.asked.items() if how == "get_object"} == set(OBJECT_KEYS) == {
        "certRefreshInterval", "sshAllowFrom", "dnsFailover", "origins", "edges", "formerNames"}


# --- a nested list of objects is a declaration like any other --------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Alias:
    name: str = key(Text(DOMAIN_RE, "a domain"), required=True,
                    doc="another name of the site")
    redirect: bool = key(Flag(), default=False, doc="answer with a redirect to the domain")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Site:
    name: str = key(Whole(0, 9), required=True, doc="a number")
    aliases: tuple[Alias, ...] = key(Entries(Alias), default=(), doc="its other names")


def test_a_nested_list_of_objects_is_read_built_and_reported_by_entry_and_key():
    site = check_entry(Site, {"name": 1, "aliases": [{"name": "www.example.com"},
                                                     {"name": "old.example.com", "redirect": True}]}, "kokoa:sites[0]")
    assert site == Site(name=1, aliases=(Alias(name="www.example.com"), Alias(name="old.example.com", redirect=True)))
    with pytest.raises(InvalidConfig) as raised:
        check_entry(Site, {"name": 1, "aliases": [{"name": "www.example.com", "redirect": "yes"}, "x", {"nme": 2}]},
                    "kokoa:sites[0]")
    assert [str(p) for p in raised.value.problems] == [
        "kokoa:sites[0]: aliases[1]: 'x' is not a mapping of keys to values",
        "kokoa:sites[0] aliases[0] (www.example.com): redirect: 'yes' is not true or false",
        "kokoa:sites[0] aliases[2]: nme: unknown key (allowed: name, redirect)",
        "kokoa:sites[0] aliases[2]: name: is required",
    ]
    assert [full for full, _ in every_key(Site)] == ["name", "aliases", "aliases[].name", "aliases[].redirect"]
    assert declared_keys(Site) == ("name", "aliases")


def test_origin_and_edge_keys_are_their_dataclass_fields():
    """Each declared key is an attribute of what the templates get: nothing to wire in between."""
    origin_fields = {f.name for f in dataclasses.fields(Origin)}
    edge_fields = {f.name for f in dataclasses.fields(Edge)}
    assert {"idle_timeout", "max_body_size", "streaming_paths"} <= origin_fields
    assert len(ORIGIN_KEYS) == len(origin_fields) - 1 and len(EDGE_KEYS) == len(edge_fields) - 1  # + wireguard_ip


if __name__ == "__main__":
    REFERENCE.write_text(reference_yaml(Topology))
    CONFIGURATION.write_text(configuration_with(reference_table(Topology)))
    print(f"wrote {REFERENCE} and {CONFIGURATION}", file=sys.stderr)
