"""The lab's hosts come from the program's own model (`parse_topology`), not from a parser of their own."""

from __future__ import annotations

import copy

import pytest

from kokoa_infra.lab.deploy import STACK_FILE, load_stack
from kokoa_infra.lab.hosts import LabTopology, model_config, topology
from kokoa_infra.lab.processes import LabError
from kokoa_infra.validate import parse_topology


@pytest.fixture
def stack() -> dict:
    return copy.deepcopy(load_stack(STACK_FILE))


def test_servers_are_the_models_origins_and_edges(stack):
    model = parse_topology(model_config(stack))
    lab = topology(stack, "t-")
    assert isinstance(lab, LabTopology)
    assert [(h.name, h.ip, h.domain, h.upstream) for h in lab.of_role("origin")] == [
        (o.name, o.ssh.host, o.domain, o.upstream) for o in model.origins]
    assert [(h.name, h.ip, h.origin, h.domain) for h in lab.of_role("edge")] == [
        (e.name, e.public_ip, e.origin, model.origin(e.origin).domain) for e in model.edges]
    assert [(h.role, h.ip, h.netns) for h in lab.hosts if not h.is_server] == [
        ("client", "172.31.255.2", "t-client"), ("acme", "172.31.255.5", "t-acme")]


def test_the_models_normalisation_applies(stack):
    # The model's canonical address and its defaults (an edge's SSH host is its publicIp).
    stack["kokoa:edges"][0]["host"] = stack["kokoa:edges"][0]["publicIp"]
    assert topology(stack).server("edge", "edge-blog-1").ip == "172.31.255.21"


def test_a_config_the_program_refuses_is_refused_with_the_programs_messages(stack):
    stack["kokoa:origins"][1]["subnet"] = 0
    stack["kokoa:edges"][2]["index"] = 300
    with pytest.raises(LabError) as refused:
        topology(stack)
    assert str(refused.value) == (
        "invalid lab stack config:\n"
        "  kokoa:origins[1] (shop): subnet: subnet 0 is already used by kokoa:origins[0] (blog)\n"
        "  kokoa:edges[2] (edge-shop-1): index: 300 is not a whole number from 10 to 254")


def test_host_keys_are_left_to_lab_up_but_a_given_one_is_checked(stack):
    assert "hostKey" not in stack["kokoa:origins"][0]
    topology(stack)  # none given: read as insecureAnyHostKey until the servers exist
    stack["kokoa:origins"][0]["hostKey"] = "ssh-rsa AAAA"
    with pytest.raises(LabError, match=r"kokoa:origins\[0\] \(blog\): hostKey: an ssh-rsa host key cannot be pinned"):
        topology(stack)


def test_lab_rules_on_top_of_the_model(stack):
    stack["kokoa:edges"][1]["host"] = "172.31.255.30"
    stack["lab:clientIp"] = "10.0.0.2"
    with pytest.raises(LabError) as refused:
        topology(stack)
    assert str(refused.value) == (
        "invalid lab topology:\n"
        "  edge edge-blog-2: a lab edge has one address; drop host or make it equal to publicIp\n"
        "  client: 10.0.0.2 is not a host address of the lab network 172.31.255.0/24")
