"""Components: each takes only what it uses, and every one registers its outputs.

The registration test follows data-safe-haven's test_component_registration: every
`pulumi.ComponentResource` subclass in the package must end its `__init__` with
`self.register_outputs(...)` (without it the engine waits for outputs that never come and
the component shows as still creating); and under the mocks every component the program
declares did register them.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap

import pulumi
import pytest

import kokoa_infra
from kokoa_infra.components import EdgeNodeArgs, OriginArgs
from kokoa_infra.stackfile import kokoa_config
from kokoa_infra.validate import parse_topology
from tests.support.stacks import BASE_CONFIG


def component_classes() -> list[type]:
    found = []
    for module in pkgutil.walk_packages(kokoa_infra.__path__, "kokoa_infra."):
        if module.name.endswith("__main__"):
            continue  # `python -m` entry points run when imported
        loaded = importlib.import_module(module.name)
        found += [cls for _, cls in inspect.getmembers(loaded, inspect.isclass)
                  if issubclass(cls, pulumi.ComponentResource) and cls.__module__ == module.name]
    return found


def ends_with_register_outputs(cls: type) -> bool:
    """Whether the last statement of cls.__init__ is `self.register_outputs(...)`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    last = tree.body[0].body[-1]
    return (isinstance(last, ast.Expr) and isinstance(last.value, ast.Call)
            and isinstance(last.value.func, ast.Attribute) and last.value.func.attr == "register_outputs"
            and isinstance(last.value.func.value, ast.Name) and last.value.func.value.id == "self")


def test_every_component_class_registers_its_outputs():
    classes = component_classes()
    assert {c.__name__ for c in classes} == {"Origin", "EdgeNode"}
    assert [c.__name__ for c in classes if not ends_with_register_outputs(c)] == []


def test_the_check_finds_a_component_that_does_not():
    class Forgetful(pulumi.ComponentResource):
        def __init__(self, name: str) -> None:
            super().__init__("kokoa:test:Forgetful", name)
            self.value = 1

    assert not ends_with_register_outputs(Forgetful)


def test_every_declared_component_registered_its_outputs(program):
    components = [r for r in program.resources if not r.custom]
    assert {r.type for r in components} == {"kokoa:index:Origin", "kokoa:index:EdgeNode"}
    assert {r.urn: program.registered_outputs.get(r.urn) for r in components} == {
        r.urn: ["publicKey"] for r in components}


@pytest.fixture
def topology():
    return parse_topology(kokoa_config(BASE_CONFIG))


def test_an_edge_takes_its_own_origin_only(topology):
    shop, tokyo = topology.origin("shop"), topology.edges[0]
    with pytest.raises(ValueError, match="^edge edge-tokyo-1 serves origin blog, not shop$"):
        EdgeNodeArgs(edge=tokyo, origin=shop, settings=topology.settings, zone_id=None,
                     origin_public_key=None, ssh_private_key=None, stack="test", pass_key=None,
                     server_key=None)


def test_an_origin_takes_its_own_edges_in_index_order(topology):
    blog = topology.origin("blog")
    ours, theirs = topology.edges_of(blog), topology.edges_of(topology.origin("shop"))
    common = dict(origin=blog, settings=topology.settings, zone_id=None, ssh_private_key=None, stack="test",
                  server_key=None)
    with pytest.raises(ValueError, match="^edge edge-tokyo-2 serves origin shop, not blog$"):
        OriginArgs(edges=ours + theirs, **common)
    with pytest.raises(ValueError, match="^the edges of origin blog must be in index order$"):
        OriginArgs(edges=tuple(reversed(ours)), **common)
    assert OriginArgs(edges=ours, **common).edges == ours


def test_no_component_takes_the_whole_topology():
    for args in (EdgeNodeArgs, OriginArgs):
        assert not [f.name for f in args.__dataclass_fields__.values() if "Topology" in str(f.type)]
