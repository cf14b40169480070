"""The Pulumi program under mocks: resources, dependencies, secrets and stack outputs."""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import io
import re
import tarfile

import pytest

from kokoa_infra.keys import public_key
from kokoa_infra.mocked_program import ProgramFailed, run_program
from tests.support.stacks import BASE_CONFIG, OTHER_ZONE, SSH_KEY, ZONE

COMMAND = "command:remote:Command"
DNS_RECORD = "cloudflare:index/dnsRecord:DnsRecord"
RANDOM_BYTES = "random:index/randomBytes:RandomBytes"


def test_components_own_their_children(program):
    by_urn = {r.urn: r for r in program.resources}
    blog = program.named("blog")
    assert blog.type == "kokoa:index:Origin"
    edge = program.named("edge-tokyo-1")
    assert edge.type == "kokoa:index:EdgeNode" and edge.parent == blog.urn
    for child in ("edge-tokyo-1-wireguard-key", "edge-tokyo-1-preshared-key", "edge-tokyo-1-install",
                  "edge-tokyo-1-a-record"):
        assert program.named(child).parent == edge.urn
    for child in ("blog-wireguard-key", "blog-install", "blog-certificate"):
        assert program.named(child).parent == blog.urn
    # At the top: the origins, and the stack's key for naming servers (one for all).
    assert all(r.parent in by_urn or r.type == "kokoa:index:Origin" or r.name == "kokoa-server-key"
               for r in program.resources)


def test_keys_are_32_random_bytes_per_node_and_pair(program):
    keys = program.of_type(RANDOM_BYTES)
    assert sorted(r.name for r in keys) == sorted(
        ["blog-wireguard-key", "shop-wireguard-key", "kokoa-server-key", "blog-pass-key", "shop-pass-key"]
        + [f"{e}-{k}" for e in ("edge-tokyo-1", "edge-osaka-1", "edge-tokyo-2")
           for k in ("wireguard-key", "preshared-key")])
    assert all(r.inputs["length"] == 32 for r in keys)


def test_outputs_have_the_documented_shape(program):
    out = program.outputs
    assert set(out) == {"origins", "edges", "dnsRecords", "dnsFailover", "healthTargets", "bundles", "healthTokens"}
    assert out["origins"]["blog"] == {
        "domain": "blog.example.com", "subnet": 0, "wireguardIp": "10.100.0.1",
        "publicKey": out["origins"]["blog"]["publicKey"], "endpoint": "203.0.113.10",
        "listenPort": 51820, "edges": ["edge-tokyo-1", "edge-osaka-1"], "hostnames": []}
    assert out["origins"]["shop"]["endpoint"] == "203.0.113.21"
    assert out["origins"]["shop"]["listenPort"] == 51821
    assert out["edges"]["edge-osaka-1"] == {
        "origin": "blog", "domain": "blog.example.com", "hostnames": [], "publicIp": "198.51.100.8",
        "wireguardIp": "10.100.0.11", "publicKey": out["edges"]["edge-osaka-1"]["publicKey"],
        "dns": False}
    assert out["edges"]["edge-tokyo-2"]["wireguardIp"] == "10.100.1.10"
    assert out["dnsRecords"] == {"blog.example.com": ["198.51.100.7"], "shop.example.com": ["198.51.100.9"]}
    assert out["healthTargets"][0] == {"name": "blog", "role": "origin", "origin": "blog",
                                       "domain": "blog.example.com", "hostnames": [], "wireguardIp": "10.100.0.1",
                                       "publicIp": "203.0.113.10"}
    assert {(t["name"], t["role"]) for t in out["healthTargets"]} == {
        ("blog", "origin"), ("shop", "origin"), ("edge-tokyo-1", "edge"), ("edge-osaka-1", "edge"),
        ("edge-tokyo-2", "edge")}
    assert set(out["bundles"]) == {"origin/blog", "origin/shop", "edge/edge-tokyo-1",
                                   "edge/edge-osaka-1", "edge/edge-tokyo-2"}
    assert set(out["bundles"]["edge/edge-tokyo-2"]) >= {"wg-origin-1.conf", "nginx.conf", "install.sh"}
    assert set(out["bundles"]["origin/blog"]) >= {"wg0.conf", "install.sh"}


def test_bundles_and_origin_addresses_are_the_secret_outputs(program):
    # As `await out.is_secret()` sees each output: a secret inside makes it secret...
    assert program.secret_outputs == {"bundles", "origins", "healthTargets", "healthTokens"}
    # ...while the engine keeps the rest of it plain: only the origins' addresses are hidden.
    assert program.output_secret_paths == {
        "bundles": {"."}, "origins": {"blog.endpoint", "shop.endpoint"}, "edges": set(), "dnsRecords": set(),
        "dnsFailover": set(), "healthTargets": {"0.publicIp", "1.publicIp"}, "healthTokens": {"."}}
    assert [t["role"] for t in program.outputs["healthTargets"][:2]] == ["origin", "origin"]


ORIGIN_ADDRESSES = ("203.0.113.10", "203.0.113.20", "203.0.113.21")  # blog's host, shop's host and endpoint


def plain_strings(value, secret_paths, path=""):
    """Every string in `value` that is not under one of `secret_paths` ("." is all of it)."""
    if "." in secret_paths or path in secret_paths:
        return
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from plain_strings(item, secret_paths, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from plain_strings(item, secret_paths, f"{path}.{index}" if path else str(index))


def test_no_origin_address_is_plain_in_outputs_or_state(program):
    """Outputs, and the inputs every resource stores in state, name an origin's address only
    inside secrets (triggers were `server 203.0.113.10`)."""
    leaks = [(name, path) for name, value in program.outputs.items()
             for path, text in plain_strings(value, program.output_secret_paths[name])
             if any(a in text for a in ORIGIN_ADDRESSES)]
    leaks += [(resource.name, path) for resource in program.resources
              for path, text in plain_strings(resource.inputs, resource.secret_paths)
              if any(a in text for a in ORIGIN_ADDRESSES)]
    assert leaks == []


def test_public_keys_match_private_keys(program):
    wg0 = program.outputs["bundles"]["origin/blog"]["wg0.conf"]
    private = next(line.split(" = ", 1)[1] for line in wg0.splitlines() if line.startswith("PrivateKey"))
    assert public_key(private) == program.outputs["origins"]["blog"]["publicKey"]
    assert program.outputs["edges"]["edge-tokyo-1"]["publicKey"] in wg0


def test_secrets_reach_resources_only_as_secrets(program):
    for command in program.of_type(COMMAND):
        assert "connection" in command.secret_paths or "connection.privateKey" in command.secret_paths
        assert command.inputs["connection"]["privateKey"] == SSH_KEY
        if "stdin" in command.inputs:
            assert "stdin" in command.secret_paths
        # Keys travel in stdin only; the command line shows a hash, never key material.
        assert "PrivateKey" not in command.inputs["create"]
        assert SSH_KEY not in command.inputs["create"]


def test_push_commands_carry_the_bundle_and_a_content_hash(program):
    install = program.named("edge-tokyo-2-install")
    conn = install.inputs["connection"]
    assert (conn["host"], conn["port"], conn["user"]) == ("198.51.100.9", 2222, "root")
    assert conn["hostKey"] == BASE_CONFIG["kokoa:edges"][2]["hostKey"]
    assert program.named("blog-install").inputs["connection"]["hostKey"].startswith("ssh-ed25519 ")
    assert install.delete_before_replace
    assert "uninstall.sh" in install.inputs["delete"]
    archive = base64.b64decode(install.inputs["stdin"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(archive))) as tar:
        names = tar.getnames()
    assert sorted(names) == sorted(program.outputs["bundles"]["edge/edge-tokyo-2"])
    assert hashlib.sha256(archive).hexdigest() in install.inputs["create"]


def test_changed_bundle_changes_create_but_not_connection(config):
    before = run_program(config)
    config["kokoa:origins"][0]["rateLimit"] = {"requestsPerSecond": 5}
    after = run_program(config)
    old, new = before.named("edge-tokyo-1-install"), after.named("edge-tokyo-1-install")
    # An in-place update (create/stdin) rather than a replacement (triggers).
    assert old.inputs["create"] != new.inputs["create"]
    assert old.inputs["connection"] == new.inputs["connection"]
    # The server, named by a keyed hash (its address stays out of the plain state).
    trigger, = old.inputs["triggers"]
    assert new.inputs["triggers"] == [trigger] and re.fullmatch(r"server [0-9a-f]{24}", trigger)
    assert trigger != program_trigger_of(before, "edge-osaka-1-install")


def program_trigger_of(run, command):
    return run.named(command).inputs["triggers"][0]


def test_the_trigger_is_a_keyed_hash_of_the_server(config):
    base = run_program(config)
    # The same server under another stack key: another tag (the key is the stack's secret).
    other_key = run_program(config, seed=b"another stack")
    assert program_trigger_of(other_key, "blog-install") != program_trigger_of(base, "blog-install")
    # Another server: another trigger, hence a replacement (uninstall there, install here).
    config["kokoa:origins"][0]["host"] = "203.0.113.11"
    assert program_trigger_of(run_program(config), "blog-install") != program_trigger_of(base, "blog-install")


def test_dns_records_only_for_undrained_edges(program):
    records = {r.name: r.inputs for r in program.of_type(DNS_RECORD)}
    assert set(records) == {"edge-tokyo-1-a-record", "edge-tokyo-2-a-record"}
    record = records["edge-tokyo-1-a-record"]
    assert record == {"zoneId": ZONE, "name": "blog.example.com", "type": "A", "content": "198.51.100.7",
                      "ttl": 60, "proxied": False, "comment": "kokoa edge edge-tokyo-1 (stack test)"}


def test_drained_edge_keeps_its_push(program):
    assert program.named("edge-osaka-1-install").type == COMMAND
    assert "edge-osaka-1" in program.outputs["bundles"]["origin/blog"]["wg0.conf"]


def test_dns_record_waits_for_its_edge_install(program):
    record = program.named("edge-tokyo-1-a-record")
    assert program.named("edge-tokyo-1-install").urn in record.dependencies
    # Replaced create-before-delete (Pulumi's default): the new record exists before the old goes.
    assert not record.delete_before_replace


def test_zone_override_and_no_zone(config):
    config["kokoa:origins"][1]["zoneId"] = OTHER_ZONE
    zones = {r.name: r.inputs["zoneId"] for r in run_program(config).of_type(DNS_RECORD)}
    assert zones == {"edge-tokyo-1-a-record": ZONE, "edge-tokyo-2-a-record": OTHER_ZONE}

    del config["kokoa:cloudflareZoneId"]
    run = run_program(config)
    assert {r.name for r in run.of_type(DNS_RECORD)} == {"edge-tokyo-2-a-record"}
    assert any("no Cloudflare zone for blog" in message for _, message in run.logs)
    assert run.outputs["dnsRecords"]["blog.example.com"] == ["198.51.100.7"]


def test_certificate_waits_for_edges_and_their_records(program):
    deps = set(program.named("blog-certificate").dependencies)
    for name in ("blog-install", "edge-tokyo-1-install", "edge-tokyo-1-a-record"):
        assert program.named(name).urn in deps
    # A drained edge is not in DNS, so validation cannot depend on it.
    assert program.named("edge-osaka-1-install").urn not in deps


def test_origin_without_serving_edges_requests_no_certificate(config):
    config["kokoa:edges"] = [e for e in config["kokoa:edges"] if e["origin"] != "shop"]
    names = {r.name for r in run_program(config).resources}
    assert "shop-install" in names and "shop-certificate" not in names


def test_same_config_renders_byte_identical_bundles(program):
    again = run_program(BASE_CONFIG)
    assert again.outputs["bundles"] == program.outputs["bundles"]
    assert ({r.name: r.inputs for r in again.of_type(COMMAND)}
            == {r.name: r.inputs for r in program.of_type(COMMAND)})


def _bundle_and_keys(run, node):
    name = node.split("/", 1)[1]
    section = "origins" if node.startswith("origin/") else "edges"
    return run.outputs["bundles"][node], run.outputs[section][name]


def test_adding_removing_reordering_entries_changes_no_other_node(config):
    base = run_program(config)

    reordered = copy.deepcopy(config)
    reordered["kokoa:origins"].reverse()
    reordered["kokoa:edges"].reverse()
    run = run_program(reordered)
    assert run.outputs["bundles"] == base.outputs["bundles"]
    for key in ("origins", "edges", "dnsRecords"):
        assert run.outputs[key] == base.outputs[key]

    added = copy.deepcopy(config)
    added["kokoa:edges"].append({"name": "edge-nagoya-1", "origin": "blog",
                                 "publicIp": "198.51.100.10", "index": 12,
                                 "hostKey": BASE_CONFIG["kokoa:edges"][0]["hostKey"]})
    added["kokoa:origins"].append({"name": "wiki", "domain": "wiki.example.com", "subnet": 2,
                                   "host": "203.0.113.30", "upstream": "http://127.0.0.1:80",
                                   "hostKey": BASE_CONFIG["kokoa:origins"][0]["hostKey"]})
    run = run_program(added)
    for node in ("origin/shop", "edge/edge-tokyo-1", "edge/edge-osaka-1", "edge/edge-tokyo-2"):
        assert _bundle_and_keys(run, node) == _bundle_and_keys(base, node), node
    # The new edge's origin gains exactly one peer; its own key does not change.
    assert run.outputs["origins"]["blog"]["publicKey"] == base.outputs["origins"]["blog"]["publicKey"]
    assert run.outputs["bundles"]["origin/blog"]["wg0.conf"].count("[Peer]") == 3
    assert run.outputs["edges"]["edge-nagoya-1"]["wireguardIp"] == "10.100.0.12"

    removed = copy.deepcopy(config)
    removed["kokoa:edges"] = [e for e in removed["kokoa:edges"] if e["name"] != "edge-osaka-1"]
    run = run_program(removed)
    for node in ("origin/shop", "edge/edge-tokyo-1", "edge/edge-tokyo-2"):
        assert _bundle_and_keys(run, node) == _bundle_and_keys(base, node), node
    assert "edge-osaka-1" not in run.outputs["bundles"]["origin/blog"]["wg0.conf"]


def test_invalid_config_logs_every_problem_and_registers_no_resource(config):
    config["kokoa:edges"][0]["origin"] = "nope"
    config["kokoa:edges"][2]["index"] = 300
    del config["kokoa:sshPrivateKey"]
    with pytest.raises(ProgramFailed, match="3 configuration problem.*nothing was declared") as failed:
        run_program(config)
    assert failed.value.run.resources == []
    errors = failed.value.errors
    assert len(errors) == 3
    assert any(m.startswith("kokoa:edges[0] (edge-tokyo-1): origin: no origin is named 'nope'") for m in errors)
    assert any(m.startswith("kokoa:edges[2] (edge-tokyo-2): index:") for m in errors)
    assert any(m.startswith("kokoa: sshPrivateKey: is required") for m in errors)


def _stack_config(path):
    from ruamel.yaml import YAML

    config = YAML(typ="safe").load(path.read_text())["config"]
    # The mocks have no secrets provider: plain stand-ins for the secrets users set.
    return config | {"kokoa:sshPrivateKey": SSH_KEY, "cloudflare:apiToken": "token"}


@pytest.mark.parametrize("name", ["Pulumi.dev.yaml", "stacks/reference.yaml"])
def test_shipped_stack_files_are_valid(name):
    from kokoa_infra.project import PROJECT_DIR

    run = run_program(_stack_config(PROJECT_DIR / name))
    assert run.outputs["origins"]
    if name == "Pulumi.dev.yaml":
        assert len(run.outputs["origins"]) == 2 and len(run.outputs["edges"]) == 3
        assert [e["dns"] for e in run.outputs["edges"].values()].count(False) == 1


def test_pulumi_project_is_kokoa_in_python():
    from ruamel.yaml import YAML

    from kokoa_infra.project import PROJECT_DIR

    project = YAML(typ="safe").load((PROJECT_DIR / "Pulumi.yaml").read_text())
    runtime = project["runtime"]
    assert project["name"] == "kokoa"
    assert (runtime if isinstance(runtime, str) else runtime["name"]) == "python"


def test_remote_commands_are_valid_posix_sh_and_fall_back_to_sudo(program, tmp_path):
    """What runs in the SSH user's login shell: `sh -n`, shellcheck as sh, root or sudo -n."""
    import shutil
    import subprocess

    for command in program.of_type(COMMAND):
        for action in ("create", "delete"):
            text = command.inputs.get(action)
            if text is None:
                continue
            script = tmp_path / f"{command.name}-{action}.sh"
            script.write_text(text)
            assert subprocess.run(["sh", "-n", str(script)]).returncode == 0, text
            if shutil.which("shellcheck"):
                checked = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True)
                assert checked.returncode == 0, checked.stdout
            assert 'if [ "$(id -u)" -eq 0 ]; then' in text and "else sudo -n " in text


# --- visitor passes and capacity (docs/security.md, "Distributed floods") ----------------------

def defended_config() -> dict:
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0].update({"capacity": {"concurrentRequests": 9}, "allowFrom": ["10.9.3.0/24"],
                                       "exemptPaths": ["/api/"]})
    config["kokoa:edges"].append({"name": "edge-nagoya-1", "origin": "blog", "publicIp": "198.51.100.10",
                                  "index": 12, "hostKey": BASE_CONFIG["kokoa:edges"][0]["hostKey"]})
    return config


def test_an_origins_edges_share_one_secret_pass_key_and_its_capacity():
    program = run_program(defended_config())
    pass_key = program.named("blog-pass-key")
    assert pass_key.parent == program.named("blog").urn and pass_key.inputs["length"] == 32
    bundles = program.outputs["bundles"]
    key_files = {edge: bundles[f"edge/{edge}"]["pass-key.conf"] for edge in ("edge-tokyo-1", "edge-nagoya-1",
                                                                               "edge-osaka-1")}
    assert len(set(key_files.values())) == 1  # DNS round robin sends a visitor to any of them
    assert "pass-key.conf" not in bundles["edge/edge-tokyo-2"]  # shop: underAttack off
    token = program.outputs["healthTokens"]["blog"]
    assert f"js_var $kokoa_health_token {token};" in key_files["edge-tokyo-1"]
    assert token != program.outputs["healthTokens"]["shop"]
    # 9 across tokyo-1 and nagoya-1 (serving) and osaka-1 (drained: 1): 4 + 4 + 1.
    shares = {edge: next(line for line in bundles[f"edge/{edge}"]["nginx.conf"].splitlines() if "max_conns=" in line)
              for edge in ("edge-tokyo-1", "edge-nagoya-1", "edge-osaka-1")}
    assert {edge: line.rsplit("=", 1)[1] for edge, line in shares.items()} == {
        "edge-tokyo-1": "4;", "edge-nagoya-1": "4;", "edge-osaka-1": "1;"}
    # The key reaches the hosts in the (secret) stdin only, never on a command line.
    key = next(line.split()[2].rstrip(";") for line in key_files["edge-tokyo-1"].splitlines()
               if line.startswith("js_var $kokoa_pass_key "))
    assert len(key) == 64 and all(key not in c.inputs["create"] for c in program.of_type(COMMAND))


def test_draining_an_edge_moves_its_share_to_the_others():
    config = defended_config()
    config["kokoa:edges"][3]["dns"] = False  # nagoya-1 drained too: tokyo-1 alone serves
    bundles = run_program(config).outputs["bundles"]
    conf = bundles["edge/edge-tokyo-1"]["nginx.conf"]
    assert "max_conns=7;" in conf and "limit_conn kokoa_open 6;" in conf
