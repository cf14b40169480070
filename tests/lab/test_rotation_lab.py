"""Rotations in the lab with a client that follows DNS: zero failed requests, and the stack file edited by the CLI.

A client in the client namespace resolves the domain through the lab resolver before
every request (tests use it as the internet's users). The lab's DNS is the Cloudflare
stand-in, to which `kokoa lab up` applies the program's DnsRecords, as `pulumi up` does.
All traffic stays in the lab's namespaces; the stand-in listens on loopback.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from click.testing import CliRunner
from ruamel.yaml import YAML

from kokoa_infra.cli import main as kokoa
from kokoa_infra.dns_cli import cli as kokoa_dns
from kokoa_infra.lab.deploy import up
from kokoa_infra.lab.dns import LabDns
from kokoa_infra.lab.executor import SshRunner
from kokoa_infra.lab.rotation import rotate_ssh_key
from tests.lab.test_lab_e2e import domain_of, wait_for_certificates

PROJECT = Path(__file__).resolve().parents[2]
BLOG = "blog"


class DnsFollowingClient:
    """tests/support/dns_client.py in the client namespace, bounded in requests and time; always stopped."""

    def __init__(self, lab, domain: str, max_seconds: float = 240) -> None:
        self.lab = lab
        tag = uuid.uuid4().hex[:8]
        self.log = lab.state_dir / f"dns-client-{tag}.log"
        self.stop_file = lab.state_dir / f"dns-client-{tag}.stop"
        self.argv = ["ip", "netns", "exec", lab.status["client"], sys.executable, "-m", "tests.support.dns_client",
                     "--resolver", lab.status["resolver"], "--domain", domain, "--ca", lab.status["caBundle"],
                     "--log", str(self.log), "--stop-file", str(self.stop_file), "--max-seconds", str(max_seconds)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "DnsFollowingClient":
        self.log.touch()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=PROJECT)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_file.touch()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        finally:
            self.stop_file.unlink(missing_ok=True)

    def lines(self, since: float = 0.0) -> list[tuple[float, str, str]]:
        found = []
        for line in self.log.read_text().splitlines():
            when, address, outcome = line.split()
            if float(when) >= since:
                found.append((float(when), address, outcome))
        return found

    @property
    def failures(self) -> list[tuple[float, str, str]]:
        return [line for line in self.lines() if line[2] != "200"]

    @property
    def ok(self) -> int:
        return sum(1 for line in self.lines() if line[2] == "200")

    def wait_for(self, count: int, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while self.ok < count and time.monotonic() < deadline:
            time.sleep(0.2)


def resolve(lab, domain: str) -> set[str]:
    proc = lab.on_host(lab.status["client"], sys.executable, "-m", "kokoa_infra.lab.resolver", "query",
                       "--server", lab.status["resolver"], domain)
    return set(proc.stdout.split())


def stack_copy(lab, tmp_path: Path) -> Path:
    """The lab's current stack config as a stack file, for the kokoa CLI to edit."""
    path = tmp_path / "Pulumi.lab.yaml"
    with open(path, "w") as out:
        YAML().dump({"config": lab.config()}, out)
    return path


def cli(*args: str) -> str:
    result = CliRunner().invoke(kokoa, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def edges_in(path: Path) -> list[dict]:
    return YAML(typ="safe").load(path.read_text())["config"]["kokoa:edges"]


def edge(lab, name: str) -> dict:
    return next(e for e in lab.status["edges"] if e["name"] == name)


def test_status_names_the_resolver_which_answers_from_the_standin(lab):
    assert lab.status["resolver"]
    blog_edges = {e["publicIp"] for e in lab.status["edges"] if e["origin"] == BLOG}
    assert resolve(lab, domain_of(lab, BLOG)) == blog_edges
    records = {(r["name"], r["content"]) for r in LabDns(lab.lab).records()}
    assert (domain_of(lab, BLOG), edge(lab, "edge-blog-2")["publicIp"]) in records


def records_of(lab, edge_name: str, origin: str) -> list[str]:
    """The edge's A record resources: its origin's domain's, then one per other hostname."""
    hostnames = next(o for o in lab.status["origins"] if o["name"] == origin)["hostnames"]
    return sorted([f"{edge_name}-a-record", *(f"{edge_name}-a-record-{name}" for name in hostnames)])


def test_a_drain_and_undrain_with_the_cli_change_what_the_resolver_answers(lab, tmp_path):
    domain, address = domain_of(lab, BLOG), edge(lab, "edge-blog-2")["publicIp"]
    names = [domain, *next(o for o in lab.status["origins"] if o["name"] == BLOG)["hostnames"]]
    records = records_of(lab, "edge-blog-2", BLOG)
    path = stack_copy(lab, tmp_path)
    assert "deletes the A record" in cli("drain", "edge-blog-2", "--file", str(path))
    try:
        report = lab.apply({"kokoa:edges": edges_in(path)})
        assert sorted(report.changed) == [f"deleted {record}" for record in records]
        assert all(address not in resolve(lab, name) for name in names)
    finally:
        cli("undrain", "edge-blog-2", "--file", str(path))
        report = lab.apply({"kokoa:edges": edges_in(path)})
    assert sorted(report.changed) == [f"created {record}" for record in records]
    assert all(address in resolve(lab, name) for name in names)


def test_kokoa_dns_remove_takes_an_edge_out_until_the_next_up_refreshes(lab, monkeypatch):
    """Pulumi.yaml has `refresh: always`: the next `up` reads the record as gone and creates it again."""
    domain, address = domain_of(lab, BLOG), edge(lab, "edge-blog-2")["publicIp"]
    for name, value in LabDns(lab.lab).environment().items():
        monkeypatch.setenv(name, value)
    removed = CliRunner().invoke(kokoa_dns, ["remove", "--ip", address, "--name", domain])
    assert removed.exit_code == 0, removed.output
    assert address not in resolve(lab, domain)
    report = lab.apply()
    assert report.changed == ["created edge-blog-2-a-record"]
    assert address in resolve(lab, domain)


def test_rotating_the_operator_ssh_key_reinstalls_nothing_and_fails_no_request(lab):
    wait_for_certificates(lab, lab.status["edges"])
    servers = [*lab.status["origins"], *lab.status["edges"]]
    pids = "cat /run/nginx.pid /run/kokoa-gateway.pid 2>/dev/null; ip -o link show | grep -o 'wg[-a-z0-9]*' | sort"
    before = {s["netns"]: lab.on_host(s["netns"], "sh", "-c", pids).stdout for s in servers}
    old_key = lab.lab.operator_key.read_text()
    with DnsFollowingClient(lab, domain_of(lab, BLOG)) as client:
        client.wait_for(5)
        deployment = rotate_ssh_key(lab.lab, lab.overrides, lab.stack_file, echo=print)
        time.sleep(1)
    assert client.failures == [] and client.ok > 5
    assert set(deployment.report.counts) <= {"updated", "unchanged"}
    assert ("updated", "edge-blog-1-install") in deployment.report.actions
    assert {s["netns"]: lab.on_host(s["netns"], "sh", "-c", pids).stdout for s in servers} == before
    assert lab.lab.operator_key.read_text() != old_key
    # The old key is refused everywhere, the new one is let in.
    runner = SshRunner(lab.status["client"], lab.state_dir / "tmp")
    for server in servers:
        connection = {"host": server["publicIp"], "port": 22, "user": "root",
                      "hostKey": lab.lab.host_key(server["netns"])}
        assert runner.run({**connection, "privateKey": old_key}, "true", None, {}).returncode == 255
        assert runner.run({**connection, "privateKey": lab.lab.operator_key.read_text()}, "true", None,
                          {}).returncode == 0


def test_rotating_an_edges_wireguard_key_drained_first_fails_no_request(lab, tmp_path):
    wait_for_certificates(lab, lab.status["edges"])
    domain = domain_of(lab, BLOG)
    path = stack_copy(lab, tmp_path)
    keys_before = {n: e["publicKey"] for n, e in json.loads(lab.outputs_file.read_text())["edges"].items()}
    with DnsFollowingClient(lab, domain) as client:
        client.wait_for(5)
        cli("drain", "edge-blog-2", "--file", str(path))
        lab.apply({"kokoa:edges": edges_in(path)})
        time.sleep(2)  # the client caches nothing: what was resolved before the drain has been served
        yaml = YAML()
        document = yaml.load(path.read_text())
        next(e for e in document["config"]["kokoa:edges"] if e["name"] == "edge-blog-2")["keyGeneration"] = 2
        with open(path, "w") as out:
            yaml.dump(document, out)
        report = lab.apply({"kokoa:edges": edges_in(path)})
        assert sorted(report.changed) == ["updated blog-install", "updated edge-blog-2-install"]
        wait_for_certificates(lab, [edge(lab, "edge-blog-2")], deadline_s=60)  # serves through the new tunnel
        cli("undrain", "edge-blog-2", "--file", str(path))
        lab.apply({"kokoa:edges": edges_in(path)})
        client.wait_for(client.ok + 10)
    assert client.failures == [] and client.ok > 10
    keys_after = {n: e["publicKey"] for n, e in json.loads(lab.outputs_file.read_text())["edges"].items()}
    assert keys_after["edge-blog-2"] != keys_before["edge-blog-2"]
    assert {n: k for n, k in keys_after.items() if n != "edge-blog-2"} == \
           {n: k for n, k in keys_before.items() if n != "edge-blog-2"}


def test_replacing_an_edge_end_to_end_fails_no_request_and_leaves_the_old_server_clean(lab, tmp_path):
    """The rotation runbook (docs/operations.md): add, wait until it serves, drain, wait out the TTL, remove."""
    wait_for_certificates(lab, lab.status["edges"])
    domain = domain_of(lab, BLOG)
    old = edge(lab, "edge-blog-2")
    spare = lab.spare_edge_host()
    path = stack_copy(lab, tmp_path)
    with DnsFollowingClient(lab, domain) as client:
        client.wait_for(5)
        edges = edges_in(path)
        index = max(e["index"] for e in edges if e["origin"] == BLOG) + 1
        edges.append({"name": "edge-blog-3", "origin": BLOG, "publicIp": spare, "index": index})
        lab.apply({"kokoa:edges": edges})
        new = edge(lab, "edge-blog-3")
        wait_for_certificates(lab, [new], deadline_s=90)
        assert spare in resolve(lab, domain)
        path = stack_copy(lab, tmp_path)
        cli("drain", old["name"], "--file", str(path))
        lab.apply({"kokoa:edges": edges_in(path)})
        drained_at = time.time()
        assert old["publicIp"] not in resolve(lab, domain)
        time.sleep(2)  # the TTL: this client caches nothing, so in-flight requests are all it waits for
        assert all(address != old["publicIp"] for _, address, _ in client.lines(since=drained_at + 1))
        cli("remove-edge", old["name"], "--file", str(path))
        lab.overrides.update({"kokoa:edges": edges_in(path)})
        deployment = up(lab.lab, lab.overrides, lab.stack_file, echo=print, prune=False)
        assert ("deleted", "edge-blog-2-install") in deployment.report.actions
        client.wait_for(client.ok + 10)
    assert client.failures == [] and client.ok > 10
    assert {address for _, address, _ in client.lines()} >= {old["publicIp"], spare}
    left = lab.on_host(old["netns"], "sh", "-c",
                       "ls /etc/kokoa/bundle /etc/wireguard/*.conf /etc/kokoa/tls 2>/dev/null; "
                       "pgrep -x nginx; pgrep -x wireguard-go; ip -o link show | grep -o 'wg-[a-z0-9-]*'",
                       check=False).stdout
    assert left.strip() == "", f"left on the old server: {left}"
    lab.apply()  # now the lab removes the old server
    assert old["name"] not in {e["name"] for e in lab.status["edges"]}
