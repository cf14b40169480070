"""A deploy during a failover (docs/dns.md): the program under mocks, applied by the lab executor with
`refresh: always` to the local Cloudflare, while the failover agent has an edge's record parked."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from kokoa_infra.cloudflare import ApiSettings, CloudflareDns, RetryPolicy
from kokoa_infra.health import failover as fo
from kokoa_infra.health.results import HttpsResult, NodeResult, Sweep
from kokoa_infra.health.targets import Target
from kokoa_infra.lab.cloudflare_standin import FakeCloudflare
from kokoa_infra.lab.dns import DnsRecordHandler
from kokoa_infra.lab.executor import DNS_RECORD, apply
from kokoa_infra.mocked_program import run_program
from tests.support.stacks import BASE_CONFIG, ZONE

TOKEN = "test-token"
BLOG = "blog.example.com"
EDGES = {"edge-tokyo-1": "198.51.100.7", "edge-osaka-1": "198.51.100.8"}


def stack(failover: bool, drained: tuple[str, ...] = (), removed: tuple[str, ...] = ()) -> dict:
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:dnsFailover"] = failover
    config["kokoa:edges"] = [{**e, "dns": e["name"] not in drained} for e in config["kokoa:edges"]
                             if e["name"] not in removed]
    return config


def pulumi_up(config: dict, state: Path, cf: FakeCloudflare) -> dict[str, str]:
    """`pulumi up` with `refresh: always`: the DnsRecords only (no hosts here); actions by record."""
    resources = run_program(config).resources   # only the DnsRecords have a handler: the rest is skipped
    report = apply(resources, state, handlers={DNS_RECORD: DnsRecordHandler(cf.base_url, TOKEN,
                                                                              echo=lambda _: None)},
                   echo=lambda _: None, seed=1, refresh=True)
    return {name.removesuffix("-a-record"): action for action, name in report.actions}


def blog_sweep(ok: dict[str, bool], drained: tuple[str, ...] = ()) -> Sweep:
    nodes = [NodeResult(Target(name, "edge", "blog", BLOG, IPv4Address("10.100.0.10"), EDGES[name],
                               drained=name in drained),
                        None, HttpsResult(passed, 200 if passed else 502, 1.0, 80, None if passed else "HTTP 502"))
             for name, passed in ok.items()]
    return Sweep(datetime.now(timezone.utc), 0.1, ("https",), nodes)


@pytest.fixture
def cloudflare():
    with FakeCloudflare(TOKEN, ZONE, zone_name="example.com") as server:
        yield server


def live(cf: FakeCloudflare) -> set[str]:
    return {r["content"] for r in cf.records_of("A") if r["name"] == BLOG}


def agent(cf: FakeCloudflare, tmp_path: Path) -> fo.FailoverAgent:
    dns = CloudflareDns(ApiSettings(TOKEN, ZONE, cf.base_url), RetryPolicy(5.0, 2, 0.01))
    return fo.FailoverAgent(dns, "a", str(tmp_path / "failover.json"), fail_after=1, recover_after=1,
                            log=lambda _: None)


def test_the_program_ignores_name_and_comment_only_with_dns_failover():
    def options(failover: bool) -> set[tuple[str, ...]]:
        return {r.ignore_changes for r in run_program(stack(failover)).resources if r.type == DNS_RECORD}
    assert options(True) == {("name", "comment")}
    assert options(False) == {()}
    assert run_program(stack(True)).outputs["dnsFailover"] is True


def test_a_deploy_during_a_failover_leaves_the_record_out_and_a_drain_then_deletes_it(cloudflare, tmp_path):
    state = tmp_path / "state.json"
    assert set(pulumi_up(stack(True), state, cloudflare).values()) == {"created"}
    assert live(cloudflare) == set(EDGES.values())
    a = agent(cloudflare, tmp_path)
    a.after_sweep(blog_sweep({"edge-tokyo-1": False, "edge-osaka-1": True}))
    assert live(cloudflare) == {EDGES["edge-osaka-1"]}
    # 1. `pulumi up` (refresh reads the parked record by id: it exists; name and comment are ignored).
    assert pulumi_up(stack(True), state, cloudflare)["edge-tokyo-1"] == "unchanged"
    assert live(cloudflare) == {EDGES["edge-osaka-1"]}
    # 2. The edge is drained meanwhile: the program deletes its record by id, parked or not...
    assert pulumi_up(stack(True, drained=("edge-tokyo-1",)), state, cloudflare)["edge-tokyo-1"] == "deleted"
    assert EDGES["edge-tokyo-1"] not in {r["content"] for r in cloudflare.records_of("A")}
    # ...and the agent, seeing it pass, never makes one.
    a.after_sweep(blog_sweep({"edge-tokyo-1": True, "edge-osaka-1": True}, drained=("edge-tokyo-1",)))
    assert live(cloudflare) == {EDGES["edge-osaka-1"]}
    # 3. Undrained: the program creates the record again, in DNS.
    pulumi_up(stack(True), state, cloudflare)
    assert live(cloudflare) == set(EDGES.values())


def test_a_removed_edge_s_parked_record_is_deleted_by_the_program(cloudflare, tmp_path):
    state = tmp_path / "state.json"
    pulumi_up(stack(True), state, cloudflare)
    agent(cloudflare, tmp_path).after_sweep(blog_sweep({"edge-tokyo-1": False, "edge-osaka-1": True}))
    actions = pulumi_up(stack(True, removed=("edge-tokyo-1",)), state, cloudflare)
    assert actions["edge-tokyo-1"] == "deleted"
    assert {r["content"] for r in cloudflare.records_of("A")} == {EDGES["edge-osaka-1"], "198.51.100.9"}


def test_without_dns_failover_the_deploy_would_put_the_record_back(cloudflare, tmp_path):
    """Why the key exists: the same sequence without ignore_changes fights the agent."""
    state = tmp_path / "state.json"
    pulumi_up(stack(False), state, cloudflare)
    agent(cloudflare, tmp_path).after_sweep(blog_sweep({"edge-tokyo-1": False, "edge-osaka-1": True}))
    assert live(cloudflare) == {EDGES["edge-osaka-1"]}
    assert pulumi_up(stack(False), state, cloudflare)["edge-tokyo-1"] == "updated"
    assert live(cloudflare) == set(EDGES.values())
