"""`kokoa health --failover`'s decision rules against the local Cloudflare stand-in on 127.0.0.1."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from kokoa_infra.cloudflare import ApiSettings, CloudflareDns, RetryPolicy
from kokoa_infra.health import failover as fo
from kokoa_infra.health.command import health
from kokoa_infra.health.html import StatusPage
from kokoa_infra.health.results import HttpsResult, NodeResult, Sweep
from kokoa_infra.health.targets import Target
from kokoa_infra.lab.cloudflare_standin import FakeCloudflare

ZONE_ID = "023e105f4ecef8ad9ca31a8372d0c353"
TOKEN = "kokoa-test-token_0123456789"
BLOG = "blog.example.com"
IPS = {"e1": "198.51.100.1", "e2": "198.51.100.2", "e3": "198.51.100.3", "s1": "198.51.100.9"}


@pytest.fixture
def cloudflare() -> Iterator[FakeCloudflare]:
    with FakeCloudflare(TOKEN, ZONE_ID, zone_name="example.com") as server:
        yield server


def program_record(cf: FakeCloudflare, edge: str, domain: str = BLOG) -> str:
    """The A record `pulumi up` makes for an edge (components.py's comment is the marker)."""
    return cf.add_record("A", domain, IPS[edge], ttl=60, comment=f"kokoa edge {edge} (stack t)")["id"]


def target(name: str, origin: str = "blog", drained: bool = False) -> Target:
    domain = BLOG if origin == "blog" else "shop.example.com"
    return Target(name=name, role="edge", origin=origin, domain=domain, wireguard_ip=IPv4Address("10.100.0.10"),
                  public_ip=IPS[name], drained=drained)


def sweep(results: dict[str, bool], drained: tuple[str, ...] = ()) -> Sweep:
    """One sweep: edge name -> HTTPS probe passed (shop's s1 is always there and passing)."""
    nodes = [NodeResult(target(name, drained=name in drained), ping=None,
                        https=HttpsResult(ok=ok, code=200 if ok else 502, latency_ms=1.0, cert_days_left=80,
                                          error=None if ok else "HTTP 502"))
             for name, ok in results.items()]
    nodes.append(NodeResult(target("s1", "shop"), None, HttpsResult(True, 200, 1.0, 80, None)))
    return Sweep(checked_at=datetime.now(timezone.utc), duration_s=0.1, checks=("https",), nodes=nodes)


def agent(cf: FakeCloudflare, tmp_path: Path, name: str = "a", **kwargs) -> fo.FailoverAgent:
    dns = CloudflareDns(ApiSettings(TOKEN, ZONE_ID, cf.base_url), RetryPolicy(5.0, 3, 0.01),
                        sleep=kwargs.pop("sleep", lambda s: None))
    return fo.FailoverAgent(dns, name, str(tmp_path / f"{name}.json"), log=lambda line: None, **kwargs)


def names(cf: FakeCloudflare) -> dict[str, str]:
    """edge -> the name its A record has now."""
    return {fo.parse_record(r).edge: r["name"] for r in cf.records_of("A") if fo.parse_record(r)}


def live(cf: FakeCloudflare, domain: str = BLOG) -> set[str]:
    return {r["content"] for r in cf.records_of("A") if r["name"] == domain}


def test_k_failed_sweeps_park_the_record_and_m_passing_ones_put_it_back(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    a = agent(cloudflare, tmp_path, fail_after=3, recover_after=2)
    a.after_sweep(sweep({"e1": True, "e2": True}))
    for _ in range(2):
        a.after_sweep(sweep({"e1": False, "e2": True}))
    assert live(cloudflare) == {IPS["e1"], IPS["e2"]}          # 2 failures: still in DNS
    report = a.after_sweep(sweep({"e1": False, "e2": True}))
    assert live(cloudflare) == {IPS["e2"]}
    assert names(cloudflare)["e1"] == "kokoa-out-e1.blog.example.com"   # same record, same id, parked
    assert list(report.removed) == [("e1", BLOG)] and report.removed[("e1", BLOG)]["hostname"] == BLOG
    assert any("removed e1" in event for event in report.events)
    a.after_sweep(sweep({"e1": True, "e2": True}))
    assert live(cloudflare) == {IPS["e2"]}                     # 1 pass of 2: still out
    report = a.after_sweep(sweep({"e1": True, "e2": True}))
    assert live(cloudflare) == {IPS["e1"], IPS["e2"]}
    assert report.removed == {} and report.changes == 2
    # The comment still starts with the program's marker, so the record stays the program's.
    record = next(r for r in cloudflare.records_of("A") if r["content"] == IPS["e1"])
    assert record["comment"].startswith("kokoa edge e1 (stack t)") and "out=" not in record["comment"]


def test_a_ping_alone_decides_nothing_a_flapping_edge_is_not_removed(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    a = agent(cloudflare, tmp_path, fail_after=3)
    for ok in (False, False, True, False, False, True):
        a.after_sweep(sweep({"e1": ok, "e2": True}))
    assert live(cloudflare) == {IPS["e1"], IPS["e2"]}


def test_the_last_record_of_a_hostname_is_never_removed(cloudflare, tmp_path):
    program_record(cloudflare, "e1")
    program_record(cloudflare, "s1", "shop.example.com")
    a = agent(cloudflare, tmp_path, fail_after=1)
    # e2 passes (so this is not "every edge fails") but has no record: e1's is the last.
    report = a.after_sweep(sweep({"e1": False, "e2": True}))
    assert live(cloudflare) == {IPS["e1"]}
    assert any("last of blog.example.com" in note for note in report.notes)


def test_every_edge_of_an_origin_failing_removes_nothing_and_says_why(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    a = agent(cloudflare, tmp_path, fail_after=2)
    for _ in range(4):
        report = a.after_sweep(sweep({"e1": False, "e2": False, "e3": False}, drained=("e3",)))
    assert live(cloudflare) == {IPS["e1"], IPS["e2"]}
    assert any("every edge of blog fails from here" in note for note in report.notes)
    # The counts were held, not run up: one bad sweep of e1 alone afterwards is not K.
    a.after_sweep(sweep({"e1": False, "e2": True, "e3": True}, drained=("e3",)))
    assert live(cloudflare) == {IPS["e1"], IPS["e2"]}


def test_a_drained_edge_is_never_put_back_and_foreign_records_are_never_touched(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    by_hand = cloudflare.add_record("A", BLOG, IPS["e3"], ttl=60, comment="managed by kokoa-dns")
    other_stack_edge = program_record(cloudflare, "e3", "blog.example.com.other")  # noqa: F841 (another name)
    a = agent(cloudflare, tmp_path, fail_after=1, recover_after=1)
    a.after_sweep(sweep({"e1": False, "e2": True}))
    assert names(cloudflare)["e1"].startswith("kokoa-out-")
    # `kokoa drain e1` + `pulumi up` has not run yet: the record is parked, the edge now passes.
    report = a.after_sweep(sweep({"e1": True, "e2": True}, drained=("e1",)))
    assert names(cloudflare)["e1"].startswith("kokoa-out-")
    assert any("e1 passes but is drained" in note for note in report.notes)
    # The hand-made record (no marker) and a record of an edge not in the outputs: untouched.
    assert cloudflare.records_of("A")[[r["id"] for r in cloudflare.records_of("A")].index(by_hand["id"])] == by_hand
    a.after_sweep(sweep({"e2": False, "e1": True}, drained=("e1",)))
    assert IPS["e3"] in live(cloudflare)
    assert not any(r["type"] == "A" and r["comment"] == "managed by kokoa-dns" and r["name"] != BLOG
                   for r in cloudflare.records_of())


def test_the_agent_never_creates_or_deletes_an_a_record(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    a = agent(cloudflare, tmp_path, fail_after=1, recover_after=1)
    for results in ({"e1": False, "e2": True}, {"e1": True, "e2": True}, {"e1": True, "e2": False}):
        a.after_sweep(sweep(results))
    a_records = [r for r in cloudflare.requests if r.path.endswith("dns_records") and r.method == "POST"
                 and (r.body or {}).get("type") == "A"]
    assert a_records == []
    assert not any(r.method == "DELETE" and r.path.split("/")[-1] in {x["id"] for x in cloudflare.records_of("A")}
                   for r in cloudflare.requests)
    assert len(cloudflare.records_of("A")) == 2 and not cloudflare.records_of("TXT")   # lock released


def test_two_agents_remove_a_record_only_when_both_see_it_fail(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    a, b = agent(cloudflare, tmp_path, "a", fail_after=1), agent(cloudflare, tmp_path, "b", fail_after=1)
    b.after_sweep(sweep({"e1": True, "e2": True}))              # b votes up on both
    report = a.after_sweep(sweep({"e1": False, "e2": True}))
    assert live(cloudflare) == {IPS["e1"], IPS["e2"]}
    assert any("not removed while b sees it up" in note for note in report.notes)
    b.after_sweep(sweep({"e1": False, "e2": True}))             # now both agree
    assert live(cloudflare) == {IPS["e2"]}
    # a sees e1 pass again: it puts it back; b, still seeing it fail, does not take it out again.
    a2 = agent(cloudflare, tmp_path, "a", fail_after=1, recover_after=1)
    a2.after_sweep(sweep({"e1": True, "e2": True}))
    assert live(cloudflare) == {IPS["e1"], IPS["e2"]}
    for _ in range(3):
        b.after_sweep(sweep({"e1": False, "e2": True}))
    assert live(cloudflare) == {IPS["e1"], IPS["e2"]}


def test_two_agents_racing_for_different_last_but_one_records_never_empty_the_name(cloudflare, tmp_path):
    """a sees only e1 fail, b only e2; b's whole sweep runs while a is between its read and its rename."""
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    b = agent(cloudflare, tmp_path, "b", fail_after=1)
    b_reports = []
    a = agent(cloudflare, tmp_path, "a", fail_after=1,
              between_read_and_park=lambda: b_reports.append(b.after_sweep(sweep({"e2": False, "e3": True},
                                                                                 drained=("e3",)))))
    a.after_sweep(sweep({"e1": False, "e3": True}, drained=("e3",)))
    assert live(cloudflare) == {IPS["e2"]}
    assert any("another agent is changing blog.example.com" in n for n in b_reports[0].notes)
    report = b.after_sweep(sweep({"e2": False, "e3": True}, drained=("e3",)))
    assert live(cloudflare) == {IPS["e2"]}
    assert any("last of blog.example.com" in note for note in report.notes)


def test_a_lock_left_by_a_dead_agent_is_taken_over_after_it_goes_stale(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    old = datetime.now(timezone.utc) - timedelta(seconds=fo.LOCK_STALE_S + 5)
    cloudflare.add_record("TXT", fo.LOCK_PREFIX + BLOG, fo.LOCK_CONTENT,
                          comment=f"kokoa failover agent z at {fo.now_text(old)}")
    agent(cloudflare, tmp_path, fail_after=1).after_sweep(sweep({"e1": False, "e2": True}))
    assert live(cloudflare) == {IPS["e2"]} and not cloudflare.records_of("TXT")


def test_counts_survive_a_restart_through_the_state_file(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    first = agent(cloudflare, tmp_path, fail_after=3)
    first.after_sweep(sweep({"e1": False, "e2": True}))
    first.after_sweep(sweep({"e1": False, "e2": True}))
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["edges"]["e1"][BLOG]["fails"] == 2
    restarted = agent(cloudflare, tmp_path, fail_after=3)
    restarted.after_sweep(sweep({"e1": False, "e2": True}))
    assert live(cloudflare) == {IPS["e2"]}
    assert json.loads((tmp_path / "a.json").read_text())["changes"] == 1


def test_an_unreadable_state_file_starts_afresh_and_says_so(cloudflare, tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    said = []
    dns = CloudflareDns(ApiSettings(TOKEN, ZONE_ID, cloudflare.base_url), RetryPolicy(5.0, 1, 0))
    fo.FailoverAgent(dns, "a", str(tmp_path / "a.json"), log=said.append)
    assert said and "cannot read" in said[0]


def test_429_with_retry_after_is_waited_for_and_the_change_happens(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    waits = []
    a = agent(cloudflare, tmp_path, fail_after=1, sleep=waits.append)
    cloudflare.force(429, headers={"Retry-After": "2"}, method="PATCH")
    report = a.after_sweep(sweep({"e1": False, "e2": True}))
    assert live(cloudflare) == {IPS["e2"]} and report.errors == []
    assert max(waits) >= 2


def test_a_failed_api_call_is_never_taken_for_a_change(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    a = agent(cloudflare, tmp_path, fail_after=1)
    cloudflare.force(500, headers={}, times=None, method="PATCH")
    report = a.after_sweep(sweep({"e1": False, "e2": True}))
    assert live(cloudflare) == {IPS["e1"], IPS["e2"]}
    assert report.removed == {} and report.changes == 0 and report.errors
    removed = [line for line in fo.prometheus_lines(report) if line.endswith(" 1")]
    assert not any("kokoa_failover_removed" in line for line in removed)
    cloudflare.forced.clear()
    report = a.after_sweep(sweep({"e1": False, "e2": True}))
    assert live(cloudflare) == {IPS["e2"]} and report.changes == 1 and report.errors == []
    # A failed read: nothing is believed, nothing changes, the report says so.
    cloudflare.force(503, times=None, method="GET")
    report = a.after_sweep(sweep({"e1": True, "e2": True}))
    assert report.errors and report.removed == {}


def test_the_outputs_json_prometheus_and_page_show_what_is_out_of_dns(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        program_record(cloudflare, edge)
    a = agent(cloudflare, tmp_path, fail_after=1)
    current = sweep({"e1": False, "e2": True})
    report = a.after_sweep(current)
    lines = fo.prometheus_lines(report)
    assert 'kokoa_failover_removed{edge="e1",hostname="blog.example.com"} 1' in lines
    assert 'kokoa_failover_removed{edge="e2",hostname="blog.example.com"} 0' in lines
    assert 'kokoa_failover_changes_total{agent="a"} 1' in lines
    document = report.document()
    assert document["removed"][0]["edge"] == "e1" and document["removed"][0]["since"].endswith("Z")
    page = StatusPage(str(tmp_path / "status.html"), interval_s=30)
    page.out_of_dns = report.out_of_dns()
    assert page.write(current)[0] == []
    assert f"out of DNS since {document['removed'][0]['since']}" in (tmp_path / "status.html").read_text()


def test_failover_refuses_a_stack_without_dns_failover_and_options_without_failover(tmp_path):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"healthTargets": [
        {"name": "e1", "role": "edge", "origin": "blog", "domain": BLOG, "wireguardIp": "10.100.0.10",
         "publicIp": "127.0.0.1"}], "dnsFailover": False}))
    env = {"CLOUDFLARE_API_TOKEN": TOKEN, "CLOUDFLARE_ZONE_ID": ZONE_ID,
           "CLOUDFLARE_API_BASE_URL": "http://127.0.0.1:9/client/v4"}
    result = CliRunner().invoke(health, ["--outputs", str(outputs), "--checks", "https", "--failover",
                                         "--failover-state", str(tmp_path / "s.json")], env=env)
    assert result.exit_code == 2 and "kokoa:dnsFailover: true" in result.output
    result = CliRunner().invoke(health, ["--outputs", str(outputs), "--fail-after", "5"], env=env)
    assert result.exit_code == 2 and "--fail-after needs --failover" in result.output
    result = CliRunner().invoke(health, ["--outputs", str(outputs), "--checks", "ping", "--failover"], env=env)
    assert result.exit_code == 2 and "keep https in --checks" in result.output
    result = CliRunner().invoke(health, ["--outputs", str(outputs), "--failover", "--agent", "Bad Name"], env=env)
    assert result.exit_code == 2 and "not an agent name" in result.output
