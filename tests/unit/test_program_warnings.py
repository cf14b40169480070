"""The program's loud warnings at every preview/up: nodes without a pinned host key, SSH open to all."""

from __future__ import annotations

import pytest

from kokoa_infra.mocked_program import ProgramFailed, run_program
from tests.support.stacks import BASE_CONFIG

OPEN_SSH = ("kokoa: SSH on every host is open to the internet; set kokoa:sshAllowFrom to the networks "
            "you administer from (e.g. [\"198.51.100.0/24\"])")


def warnings(run) -> list[str]:
    return [message for level, message in run.logs if level == "warning"]


def test_default_config_warns_once_that_ssh_is_open_to_everyone(program):
    assert warnings(program) == [OPEN_SSH]


def test_ssh_allow_from_is_read_and_silences_the_warning(config):
    config["kokoa:sshAllowFrom"] = ["198.51.100.0/24", "203.0.113.5/32"]
    assert warnings(run_program(config)) == []
    config["kokoa:sshAllowFrom"] = ["198.51.100.0/24", "0.0.0.0/0"]
    assert warnings(run_program(config)) == [OPEN_SSH]
    config["kokoa:sshAllowFrom"] = []
    with pytest.raises(ProgramFailed) as failed:
        run_program(config)
    assert failed.value.errors == [
        "kokoa: sshAllowFrom: is empty, which would lock the operator out of SSH on every host; list the "
        "networks you administer from, or remove the key to allow everyone (0.0.0.0/0)"]


def test_insecure_any_host_key_warns_naming_each_node_and_pins_nothing(config):
    config["kokoa:sshAllowFrom"] = ["198.51.100.0/24"]
    del config["kokoa:edges"][2]["hostKey"]
    config["kokoa:edges"][2]["insecureAnyHostKey"] = True
    del config["kokoa:origins"][0]["hostKey"]
    config["kokoa:origins"][0]["insecureAnyHostKey"] = True
    run = run_program(config)
    assert warnings(run) == [
        "kokoa: INSECURE: origin blog has insecureAnyHostKey: true: SSH to 203.0.113.10 accepts ANY host "
        "key, so whoever answers there receives its bundle and WireGuard keys; pin hostKey "
        "(ssh-keyscan -t ed25519 203.0.113.10) unless this host is throwaway",
        "kokoa: INSECURE: edge edge-tokyo-2 has insecureAnyHostKey: true: SSH to 198.51.100.9 accepts ANY "
        "host key, so whoever answers there receives its bundle and WireGuard keys; pin hostKey "
        "(ssh-keyscan -t ed25519 -p 2222 198.51.100.9) unless this host is throwaway",
    ]
    # pulumi-command accepts any host key only when the connection has none.
    assert "hostKey" not in run.named("edge-tokyo-2-install").inputs["connection"]
    assert "hostKey" not in run.named("blog-install").inputs["connection"]
    assert (run.named("edge-tokyo-1-install").inputs["connection"]["hostKey"]
            == BASE_CONFIG["kokoa:edges"][0]["hostKey"])


def test_an_allow_list_that_covers_everyone_warns_like_0_0_0_0_0(config):
    # Two halves of the internet are the internet: the same warning as 0.0.0.0/0.
    config["kokoa:sshAllowFrom"] = ["0.0.0.0/1", "128.0.0.0/1"]
    assert warnings(run_program(config)) == [OPEN_SSH]


def test_a_capacity_below_the_number_of_edges_is_warned_naming_what_the_origin_may_get(config):
    config["kokoa:sshAllowFrom"] = ["198.51.100.0/24"]
    config["kokoa:origins"][0]["capacity"] = {"concurrentRequests": 1}  # blog: tokyo-1 and osaka-1
    assert warnings(run_program(config)) == [
        "kokoa: origin blog has capacity 1 for 2 edges: each edge still lets 1 request through at once, so "
        "the origin may get 2; raise capacity.concurrentRequests or remove edges"]
    config["kokoa:origins"][0]["capacity"] = {"concurrentRequests": 2}
    assert warnings(run_program(config)) == []
