"""Rotations under the executor: the program's commands against a fake SSH, as `pulumi up` would run them.

SSH credentials of the same server rotate in place (an update on the new connection);
a node moved to another server is replaced, its old server cleaned up first; a renamed
node (kokoa:formerNames) keeps its resources; keyGeneration rotates one node's keys.
"""

from __future__ import annotations

import copy

import pytest

from kokoa_infra.lab.executor import apply
from kokoa_infra.mocked_program import ProgramFailed, run_program
from tests.support.stacks import SSH_KEY
from tests.unit.test_executor import FakeRunner, quiet

OTHER_SSH_KEY = SSH_KEY.replace("AAAAAABAAAAMwAAAAtzc2gtZW", "AAAAAABAAAAMwAAAAtzc2gtZX")
NEW_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPmFJZw3PTr9wRB1gZtK62mtbFCt/MZLaLP+n7vZG91q"


def deploy(config, state_file, runner=None):
    runner = runner or FakeRunner()
    report = apply(run_program(config).resources, state_file, runner, echo=quiet, seed=1, parallel=4)
    return report, runner


@pytest.fixture
def deployed(tmp_path, config):
    """A stack deployed once; returns (config to change, state file)."""
    state = tmp_path / "commands.json"
    report, _ = deploy(config, state)
    assert report.counts == {"created": 7}
    return config, state


def uninstalls(runner):
    return [(host, key) for host, command, _, key in runner.calls if "uninstall.sh" in command]


@pytest.mark.parametrize("change", ["key", "user", "port", "hostKey"])
def test_rotating_ssh_credentials_of_the_same_server_uninstalls_nothing(deployed, change):
    config, state = deployed
    edges = config["kokoa:edges"]
    if change == "key":
        config["kokoa:sshPrivateKey"] = OTHER_SSH_KEY
    elif change == "user":
        config["kokoa:sshUser"] = "admin"
    elif change == "port":
        edges[0]["sshPort"] = 2200
    else:
        edges[0]["hostKey"] = NEW_HOST_KEY
    report, runner = deploy(config, state)
    assert uninstalls(runner) == []
    assert "replaced" not in report.counts and "deleted" not in report.counts
    if change == "key":
        # Every command runs again (idempotent install) over the new key, on its own server.
        assert report.counts == {"updated": 7}
        assert {key for _, _, _, key in runner.calls} == {OTHER_SSH_KEY}
    else:
        assert ("updated", "edge-tokyo-1-install") in report.actions


def test_moving_a_node_to_another_server_uninstalls_the_old_server_first(deployed):
    config, state = deployed
    config["kokoa:edges"][0]["host"] = "198.51.100.70"
    config["kokoa:sshPrivateKey"] = OTHER_SSH_KEY
    report, runner = deploy(config, state)
    assert ("replaced", "edge-tokyo-1-install") in report.actions
    moved = [(host, key, "uninstall.sh" in cmd) for host, cmd, _, key in runner.calls
             if host in ("198.51.100.7", "198.51.100.70")]
    # The old state's delete, on the old server with the old key, then the install on the new one.
    assert moved == [("198.51.100.7", SSH_KEY, True), ("198.51.100.70", OTHER_SSH_KEY, False)]


def test_renaming_a_node_with_its_former_name_keeps_its_server(deployed):
    config, state = deployed
    renamed = copy.deepcopy(config)
    renamed["kokoa:edges"][0]["name"] = "edge-kyoto-1"
    renamed["kokoa:formerNames"] = {"edge-kyoto-1": "edge-tokyo-1"}
    before = run_program(config)
    after = run_program(renamed)
    # Same keys: the RandomBytes follow their parent's alias.
    assert (after.outputs["edges"]["edge-kyoto-1"]["publicKey"]
            == before.outputs["edges"]["edge-tokyo-1"]["publicKey"])
    report, runner = deploy(renamed, state)
    assert uninstalls(runner) == []
    assert ("updated", "edge-kyoto-1-install") in report.actions
    assert "deleted" not in report.counts and "created" not in report.counts


def test_renaming_a_node_without_its_former_name_would_wipe_its_server(deployed):
    """Why formerNames exists: the new name installs, then the old name's uninstall runs on the same server."""
    config, state = deployed
    config["kokoa:edges"][0]["name"] = "edge-kyoto-1"
    _, runner = deploy(config, state)
    hosts = [host for host, command, _, _ in runner.calls if host == "198.51.100.7"]
    assert uninstalls(runner) == [("198.51.100.7", SSH_KEY)] and len(hosts) == 2
    assert "uninstall.sh" in runner.calls[-1][1]  # after the install: the server is left without its edge


def test_former_names_are_validated(config):
    config["kokoa:formerNames"] = {"nope": "x", "edge-tokyo-1": ["edge-osaka-1"], "blog": ["Bad Name"]}
    with pytest.raises(ProgramFailed) as failed:
        run_program(config)
    errors = failed.value.errors
    assert any("kokoa:formerNames: nope: names no origin or edge" in e for e in errors)
    assert any("edge-osaka-1 is the name of a node of this stack" in e for e in errors)
    assert any("'Bad Name' is not a node name" in e for e in errors)


# --- keyGeneration ------------------------------------------------------------------------

def keys(run):
    return ({name: o["publicKey"] for name, o in run.outputs["origins"].items()}
            | {name: e["publicKey"] for name, e in run.outputs["edges"].items()})


def test_raising_an_edges_key_generation_rotates_its_keys_only(config):
    base = run_program(config)
    config["kokoa:edges"][0]["keyGeneration"] = 2
    run = run_program(config)
    before, after = keys(base), keys(run)
    assert after["edge-tokyo-1"] != before["edge-tokyo-1"]
    assert {k: v for k, v in after.items() if k != "edge-tokyo-1"} == \
           {k: v for k, v in before.items() if k != "edge-tokyo-1"}
    bundles, old_bundles = run.outputs["bundles"], base.outputs["bundles"]
    for node in ("origin/shop", "edge/edge-osaka-1", "edge/edge-tokyo-2"):
        assert bundles[node] == old_bundles[node], node
    old_psk = old_bundles["edge/edge-tokyo-1"]["wg-origin-0.conf"].split("PresharedKey = ")[1].split()[0]
    assert old_psk not in bundles["origin/blog"]["wg0.conf"]  # the PSK rotates with the edge
    keepers = run.named("edge-tokyo-1-wireguard-key").inputs["keepers"]
    assert keepers["keyGeneration"] == "2"
    # Generation 1 has no such keeper; both have the server's.
    old_keepers = base.named("edge-tokyo-1-wireguard-key").inputs["keepers"]
    assert "keyGeneration" not in old_keepers and old_keepers["server"] == keepers["server"]


def test_raising_an_origins_key_generation_changes_its_own_key(config):
    base = run_program(config)
    config["kokoa:origins"][1]["keyGeneration"] = 3
    run = run_program(config)
    before, after = keys(base), keys(run)
    assert after["shop"] != before["shop"]
    assert {k: v for k, v in after.items() if k != "shop"} == {k: v for k, v in before.items() if k != "shop"}
    assert run.outputs["bundles"]["origin/blog"] == base.outputs["bundles"]["origin/blog"]


def test_key_rotation_updates_the_two_installs_in_place(deployed):
    config, state = deployed
    config["kokoa:edges"][0]["keyGeneration"] = 2
    report, runner = deploy(config, state)
    assert sorted(report.changed) == ["updated blog-install", "updated edge-tokyo-1-install"]
    assert uninstalls(runner) == []


# --- a node moved to another server under the same name (issue 18, item 4) -----------------

def psk_of(run, edge, interface):
    return run.outputs["bundles"][f"edge/{edge}"][interface].split("PresharedKey = ")[1].split()[0]


# (the edge's entry before, what the move changes)
MOVES = {
    "publicIp and host": ({}, {"publicIp": "198.51.100.70"}),
    "host alone": ({}, {"host": "198.51.100.71"}),
    # The same SSH tunnel on loopback, another server behind it.
    "publicIp behind one tunnel": ({"host": "127.0.0.1", "sshPort": 2201}, {"publicIp": "198.51.100.72"}),
}


@pytest.mark.parametrize("entry, move", MOVES.values(), ids=MOVES.keys())
def test_an_edge_moved_to_another_server_gets_new_keys(config, entry, move):
    config["kokoa:edges"][0].update(entry)
    base = run_program(config)
    config["kokoa:edges"][0].update(move)
    run = run_program(config)
    before, after = keys(base), keys(run)
    assert after["edge-tokyo-1"] != before["edge-tokyo-1"]
    assert psk_of(run, "edge-tokyo-1", "wg-origin-0.conf") != psk_of(base, "edge-tokyo-1", "wg-origin-0.conf")
    # The old server's keys are no longer admitted by the origin; nothing else changes.
    assert before["edge-tokyo-1"] not in run.outputs["bundles"]["origin/blog"]["wg0.conf"]
    assert {k: v for k, v in after.items() if k != "edge-tokyo-1"} == \
           {k: v for k, v in before.items() if k != "edge-tokyo-1"}


def test_an_origin_moved_to_another_server_gets_a_new_key(config):
    base = run_program(config)
    config["kokoa:origins"][0]["host"] = "203.0.113.11"
    assert keys(run_program(config))["blog"] != keys(base)["blog"]


def key_holder_block(install_sh):
    """The part of an origin's install.sh that records the TLS key's holders."""
    start = install_sh.index('EDGES="')
    end = install_sh.index('mv -f "$KEY_HOLDERS.kokoa-new" "$KEY_HOLDERS"\n', start)
    return install_sh[start:end] + 'mv -f "$KEY_HOLDERS.kokoa-new" "$KEY_HOLDERS"\n'


def run_key_holders(run, state_dir):
    """Run that block of the origin blog's install.sh against KEY_HOLDERS in `state_dir`;
    True when it asks for a new TLS key."""
    import subprocess

    script = ('set -euo pipefail\nlog() { echo "$*"; }\n'
              f'KEY_HOLDERS={state_dir}/tls-key-holders\nROTATE_KEY={state_dir}/rotate-tls-key\n'
              + key_holder_block(run.outputs["bundles"]["origin/blog"]["install.sh"]))
    subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True, timeout=30)
    rotate = state_dir / "rotate-tls-key"
    asked = rotate.exists()
    rotate.unlink(missing_ok=True)
    return asked


def test_the_origin_replaces_its_tls_key_when_a_holder_moves_to_another_server(config, tmp_path):
    base = run_program(config)
    assert run_key_holders(base, tmp_path) is False  # the first holders
    assert run_key_holders(base, tmp_path) is False  # the same edges on the same servers
    config["kokoa:edges"][0]["publicIp"] = "198.51.100.70"  # edge-tokyo-1, same name, new server
    assert run_key_holders(run_program(config), tmp_path) is True


def test_holders_recorded_by_name_before_the_upgrade_replace_no_key(program, tmp_path):
    (tmp_path / "tls-key-holders").write_text("edge-osaka-1\nedge-tokyo-1\n")
    assert run_key_holders(program, tmp_path) is False
    holders = (tmp_path / "tls-key-holders").read_text().split()
    assert [h.split("@")[0] for h in holders] == ["edge-osaka-1", "edge-tokyo-1"] and all("@" in h for h in holders)
    # A name that is gone still counts as gone.
    (tmp_path / "tls-key-holders").write_text("edge-kyoto-9\nedge-tokyo-1\n")
    assert run_key_holders(program, tmp_path) is True
