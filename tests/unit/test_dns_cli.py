"""kokoa-dns against the local Cloudflare-compatible server: listing, adding, removing, failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import requests
from click.testing import CliRunner, Result

from kokoa_infra import dns_cli
from kokoa_infra.lab.cloudflare_standin import FakeCloudflare, failure_envelope

PROJECT_DIR = Path(__file__).resolve().parents[2]
ZONE_ID = "023e105f4ecef8ad9ca31a8372d0c353"
OTHER_ZONE_ID = "ffffffffffffffffffffffffffffffff"
TOKEN = "kokoa-test-token_0123456789"
EDGE_IP = "198.51.100.7"
OTHER_IP = "198.51.100.8"
VARIABLES = ("CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ZONE_ID", "CLOUDFLARE_API_BASE_URL")


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real credentials, proxies or tuning from the caller's shell reach a test."""
    for name in (*VARIABLES, "KOKOA_DNS_TIMEOUT", "KOKOA_DNS_ATTEMPTS", "KOKOA_DNS_BACKOFF",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    # The suite-wide loopback_only guard (conftest.py) keeps requests off the real API.


@pytest.fixture
def cloudflare() -> Iterator[FakeCloudflare]:
    with FakeCloudflare(TOKEN, ZONE_ID, zone_name="example.com") as server:
        yield server


def run(base_url: str, *args: str, **env: str | None) -> Result:
    """Invoke kokoa-dns in-process with a working environment, overridden by `env`."""
    environment: dict[str, str | None] = {
        "CLOUDFLARE_API_TOKEN": TOKEN,
        "CLOUDFLARE_ZONE_ID": ZONE_ID,
        "CLOUDFLARE_API_BASE_URL": base_url,
        "KOKOA_DNS_BACKOFF": "0.01",  # keep retries fast; the policy itself is tested below
    }
    environment.update(env)
    result = CliRunner().invoke(dns_cli.cli, list(args), env=environment)
    # An expected failure is a message and an exit code, never a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def run_process(base_url: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run kokoa-dns as a real process, killed after `timeout` seconds (a hang fails the test)."""
    environment = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(PROJECT_DIR),
                   "CLOUDFLARE_API_TOKEN": TOKEN, "CLOUDFLARE_ZONE_ID": ZONE_ID,
                   "CLOUDFLARE_API_BASE_URL": base_url, "KOKOA_DNS_BACKOFF": "0.05"}
    return subprocess.run([sys.executable, "-m", "kokoa_infra.dns_cli", *args], env=environment,
                          capture_output=True, text=True, timeout=timeout, check=False)


def closed_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def seed_edges(server: FakeCloudflare) -> None:
    """Two names on EDGE_IP, one A elsewhere, and other types carrying the same values."""
    server.add_record("A", "blog.example.com", EDGE_IP, ttl=60)
    server.add_record("A", "shop.example.com", EDGE_IP, ttl=60)
    server.add_record("A", "blog.example.com", OTHER_IP, ttl=60)
    server.add_record("AAAA", "blog.example.com", "2001:db8::7")
    server.add_record("TXT", "blog.example.com", EDGE_IP)
    server.add_record("CNAME", "www.example.com", "blog.example.com")


def a_records(server: FakeCloudflare) -> set[tuple[str, str]]:
    return {(r["name"], r["content"]) for r in server.records_of("A")}


def methods(server: FakeCloudflare) -> list[str]:
    return [request.method for request in server.requests]


# -- list ------------------------------------------------------------------------------


def test_list_reads_every_page(cloudflare: FakeCloudflare) -> None:
    for n in range(250):
        cloudflare.add_record("A", f"edge{n:03}.example.com", f"203.0.113.{n % 250}")
    cloudflare.add_record("AAAA", "edge000.example.com", "2001:db8::1")

    result = run(cloudflare.base_url, "list", "--json")

    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert len(listed) == 250
    assert {r["name"] for r in listed} == {f"edge{n:03}.example.com" for n in range(250)}
    assert {r["type"] for r in listed} == {"A"}
    assert [(r.query["page"], r.query["per_page"], r.query["type"]) for r in cloudflare.requests] == [
        ("1", "100", "A"), ("2", "100", "A"), ("3", "100", "A")]


def test_list_follows_the_page_size_the_server_grants(cloudflare: FakeCloudflare) -> None:
    cloudflare.max_per_page = 40
    for n in range(250):
        cloudflare.add_record("A", f"edge{n:03}.example.com", EDGE_IP)

    result = run(cloudflare.base_url, "list", "--json")

    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 250
    assert [r.query["page"] for r in cloudflare.requests] == [str(p) for p in range(1, 8)]


def test_list_prints_a_table_of_the_record_fields(cloudflare: FakeCloudflare) -> None:
    record = cloudflare.add_record("A", "blog.example.com", EDGE_IP, ttl=60, comment="edge-tokyo-1")
    cloudflare.add_record("A", "auto.example.com", OTHER_IP, ttl=1, proxied=True)

    result = run(cloudflare.base_url, "list")

    assert result.exit_code == 0, result.output
    header, first, second = result.stdout.splitlines()
    assert header.split() == ["NAME", "CONTENT", "PROXIED", "TTL", "ID", "COMMENT"]
    assert first.split() == ["auto.example.com", OTHER_IP, "yes", "auto", first.split()[4]]
    assert second.split() == ["blog.example.com", EDGE_IP, "no", "60", record["id"], "edge-tokyo-1"]


def test_list_of_an_empty_zone_says_so(cloudflare: FakeCloudflare) -> None:
    result = run(cloudflare.base_url, "list")

    assert result.exit_code == 0, result.output
    assert "no A records" in result.stdout
    assert len(cloudflare.requests) == 1


# -- add -------------------------------------------------------------------------------


def test_add_creates_an_unproxied_record_with_ttl_60(cloudflare: FakeCloudflare) -> None:
    result = run(cloudflare.base_url, "add", "--ip", EDGE_IP, "--name", "Blog.Example.com.")

    assert result.exit_code == 0, result.output
    (record,) = cloudflare.records_of("A")
    assert (record["name"], record["content"], record["ttl"], record["proxied"], record["comment"]) == (
        "blog.example.com", EDGE_IP, 60, False, "managed by kokoa-dns")
    assert record["id"] in result.stdout and "blog.example.com" in result.stdout


def test_add_without_a_name_is_for_the_zone_apex(cloudflare: FakeCloudflare) -> None:
    result = run(cloudflare.base_url, "add", "--ip", EDGE_IP)

    assert result.exit_code == 0, result.output
    (record,) = cloudflare.records_of("A")
    assert (record["name"], record["content"]) == ("example.com", EDGE_IP)
    assert "note:" not in result.output


def test_adding_the_same_record_again_shows_cloudflares_error(cloudflare: FakeCloudflare) -> None:
    assert run(cloudflare.base_url, "add", "--ip", EDGE_IP, "--name", "blog.example.com").exit_code == 0

    result = run(cloudflare.base_url, "add", "--ip", EDGE_IP, "--name", "blog.example.com")

    assert result.exit_code == 1
    assert "81057: Record already exists." in result.stderr
    assert len(cloudflare.records_of("A")) == 1
    assert methods(cloudflare) == ["POST", "POST"]


def test_add_does_not_repeat_a_post_the_server_may_have_acted_on(cloudflare: FakeCloudflare) -> None:
    cloudflare.force(500, failure_envelope([{"code": 10000, "message": "Internal error"}]), method="POST")

    result = run(cloudflare.base_url, "add", "--ip", EDGE_IP, "--name", "blog.example.com")

    assert result.exit_code == 1
    assert "HTTP 500" in result.stderr and "10000: Internal error" in result.stderr
    assert methods(cloudflare) == ["POST"]


def test_add_points_out_a_name_cloudflare_stored_differently(cloudflare: FakeCloudflare) -> None:
    result = run(cloudflare.base_url, "add", "--ip", EDGE_IP, "--name", "blog.example.org")

    assert result.exit_code == 0, result.output
    assert "stored the name as blog.example.org.example.com" in result.stderr


def test_a_definitive_answer_after_a_retry_is_reported_as_it_is(cloudflare: FakeCloudflare) -> None:
    cloudflare.force(503)
    cloudflare.force(403, failure_envelope([{"code": 10000, "message": "Authentication error"}]))

    result = run(cloudflare.base_url, "list")

    assert result.exit_code == 1
    assert "failed with HTTP 403:\n  10000: Authentication error" in result.stderr
    assert "gave up" not in result.stderr
    assert methods(cloudflare) == ["GET", "GET"]


# -- remove ----------------------------------------------------------------------------


def test_remove_by_ip_takes_every_a_record_with_that_content(cloudflare: FakeCloudflare) -> None:
    seed_edges(cloudflare)
    others_before = [r for r in cloudflare.records_of() if r["type"] != "A"]

    result = run(cloudflare.base_url, "remove", "--ip", EDGE_IP)

    assert result.exit_code == 0, result.output
    assert a_records(cloudflare) == {("blog.example.com", OTHER_IP)}
    assert [r for r in cloudflare.records_of() if r["type"] != "A"] == others_before
    assert "removed A blog.example.com -> 198.51.100.7" in result.stdout
    assert "removed A shop.example.com -> 198.51.100.7" in result.stdout


def test_remove_with_name_takes_only_that_names_record(cloudflare: FakeCloudflare) -> None:
    seed_edges(cloudflare)

    result = run(cloudflare.base_url, "remove", "--ip", EDGE_IP, "--name", "blog.example.com")

    assert result.exit_code == 0, result.output
    assert a_records(cloudflare) == {("shop.example.com", EDGE_IP), ("blog.example.com", OTHER_IP)}
    assert len(cloudflare.records_of()) == 5


def test_remove_with_nothing_matching_says_so_and_deletes_nothing(cloudflare: FakeCloudflare) -> None:
    seed_edges(cloudflare)

    result = run(cloudflare.base_url, "remove", "--ip", "192.0.2.1")

    assert result.exit_code == 1
    assert "nothing removed" in result.stderr
    assert "DELETE" not in methods(cloudflare)
    assert len(cloudflare.records_of()) == 6


def test_remove_checks_each_record_itself_before_deleting(cloudflare: FakeCloudflare) -> None:
    seed_edges(cloudflare)
    cloudflare.honour_filters = False  # as if a proxy had dropped the query string

    result = run(cloudflare.base_url, "remove", "--ip", EDGE_IP, "--name", "shop.example.com")

    assert result.exit_code == 0, result.output
    assert a_records(cloudflare) == {("blog.example.com", EDGE_IP), ("blog.example.com", OTHER_IP)}
    assert methods(cloudflare).count("DELETE") == 1


def test_remove_of_a_record_deleted_meanwhile_is_not_a_failure(cloudflare: FakeCloudflare) -> None:
    cloudflare.add_record("A", "blog.example.com", EDGE_IP)
    cloudflare.force(404, failure_envelope([{"code": 81044, "message": "Record does not exist."}]),
                     method="DELETE")

    result = run(cloudflare.base_url, "remove", "--ip", EDGE_IP)

    assert result.exit_code == 0, result.output
    assert "already gone A blog.example.com" in result.stdout


def test_remove_reports_records_it_could_not_delete(cloudflare: FakeCloudflare) -> None:
    seed_edges(cloudflare)
    cloudflare.force(403, failure_envelope([{"code": 10000, "message": "Authentication error"}]),
                     method="DELETE")

    result = run(cloudflare.base_url, "remove", "--ip", EDGE_IP)

    assert result.exit_code == 1
    assert "1 of 2 records not removed" in result.stderr
    assert "10000: Authentication error" in result.stderr
    assert len(a_records(cloudflare)) == 2


# -- authentication and configuration ---------------------------------------------------


def test_a_wrong_token_shows_cloudflares_authentication_error(cloudflare: FakeCloudflare) -> None:
    result = run(cloudflare.base_url, "list", CLOUDFLARE_API_TOKEN="not-the-token")

    assert result.exit_code == 1
    assert "HTTP 403" in result.stderr and "10000: Authentication error" in result.stderr
    assert len(cloudflare.requests) == 1  # an auth failure is not retried


def test_a_zone_the_token_cannot_reach_is_an_authentication_error(cloudflare: FakeCloudflare) -> None:
    result = run(cloudflare.base_url, "add", "--ip", EDGE_IP, "--name", "blog.example.com",
                 CLOUDFLARE_ZONE_ID=OTHER_ZONE_ID)

    assert result.exit_code == 1
    assert "10000: Authentication error" in result.stderr
    assert cloudflare.records_of() == []


@pytest.mark.parametrize("args", [
    ["list"],
    ["add", "--ip", EDGE_IP, "--name", "blog.example.com"],
    ["remove", "--ip", EDGE_IP],
])
def test_missing_variables_are_all_named_and_nothing_is_sent(cloudflare: FakeCloudflare,
                                                             args: list[str]) -> None:
    result = run(cloudflare.base_url, *args, CLOUDFLARE_API_TOKEN=None, CLOUDFLARE_ZONE_ID=None)

    assert result.exit_code == 2
    assert "CLOUDFLARE_API_TOKEN" in result.stderr and "CLOUDFLARE_ZONE_ID" in result.stderr
    assert cloudflare.requests == []


def test_a_missing_zone_id_alone_is_named(cloudflare: FakeCloudflare) -> None:
    result = run(cloudflare.base_url, "list", CLOUDFLARE_ZONE_ID="")

    assert result.exit_code == 2
    assert "missing environment variable: CLOUDFLARE_ZONE_ID" in result.stderr
    assert "CLOUDFLARE_API_TOKEN" not in result.stderr
    assert cloudflare.requests == []


def test_a_domain_name_given_as_zone_id_is_refused(cloudflare: FakeCloudflare) -> None:
    result = run(cloudflare.base_url, "list", CLOUDFLARE_ZONE_ID="example.com")

    assert result.exit_code == 2
    assert "32 lower-case hex digits" in result.stderr
    assert cloudflare.requests == []


@pytest.mark.parametrize("args", [
    ["add", "--ip", "300.1.2.3", "--name", "blog.example.com"],
    ["add", "--ip", "198.51.100", "--name", "blog.example.com"],
    ["add", "--ip", "198.51.100.07", "--name", "blog.example.com"],
    ["add", "--ip", "2001:db8::1", "--name", "blog.example.com"],
    ["add", "--ip", EDGE_IP, "--name", "blog"],
    ["add", "--ip", EDGE_IP, "--name", "bad_name.example.com"],
    ["add", "--ip", EDGE_IP, "--name", "-blog.example.com"],
    ["add", "--ip", EDGE_IP, "--name", "blog.example.com;rm -rf"],
    ["add", "--ip", EDGE_IP, "--name", "a" * 64 + ".example.com"],
    ["add", "--ip", EDGE_IP, "--name", "10.0.0.1"],
    ["remove", "--ip", "not-an-ip"],
    ["remove", "--ip", EDGE_IP, "--name", "blog example.com"],
])
def test_malformed_ip_or_name_is_refused_before_any_request(cloudflare: FakeCloudflare,
                                                            args: list[str]) -> None:
    result = run(cloudflare.base_url, *args)

    assert result.exit_code == 2
    assert "Invalid value for '--" in result.stderr
    assert cloudflare.requests == []


@pytest.mark.parametrize("command", [[], ["list"], ["add"], ["remove"]])
def test_help_says_what_the_variables_are(command: list[str]) -> None:
    result = CliRunner().invoke(dns_cli.cli, [*command, "--help"])

    assert result.exit_code == 0
    for name in VARIABLES:
        assert name in result.output
    assert "Zone > DNS > Edit" in result.output and "32 hex digits" in result.output
    assert "https://api.cloudflare.com/client/v4" in result.output


# -- transport failures and retries ------------------------------------------------------


def test_an_unreachable_endpoint_fails_clearly_and_quickly() -> None:
    url = f"http://127.0.0.1:{closed_loopback_port()}/client/v4"

    started = time.monotonic()
    proc = run_process(url, "list", timeout=30)
    elapsed = time.monotonic() - started

    assert proc.returncode == 1
    assert "could not connect: Connection refused (gave up after 4 attempts)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 10


def test_rate_limited_once_then_retried_after_the_asked_wait(cloudflare: FakeCloudflare) -> None:
    cloudflare.add_record("A", "blog.example.com", EDGE_IP)
    cloudflare.force(429, headers={"Retry-After": "1"})

    started = time.monotonic()
    result = run(cloudflare.base_url, "list", "--json")
    elapsed = time.monotonic() - started

    assert result.exit_code == 0, result.output
    assert [r["content"] for r in json.loads(result.stdout)] == [EDGE_IP]
    assert methods(cloudflare) == ["GET", "GET"]
    assert elapsed >= 0.9  # Retry-After honoured, not just the 0.01 s backoff


def test_a_rate_limit_wait_beyond_the_cap_gives_up_at_once(cloudflare: FakeCloudflare) -> None:
    cloudflare.force(429, headers={"Retry-After": "300"}, times=None)

    proc = run_process(cloudflare.base_url, "list", timeout=10)

    assert proc.returncode == 1
    assert "HTTP 429 (not retried: Cloudflare asks to wait 300 s)" in proc.stderr
    assert "971: More than 1200 requests per 300 seconds reached" in proc.stderr
    assert len(cloudflare.requests) == 1


def test_a_server_failing_for_ever_is_given_up_in_bounded_time(cloudflare: FakeCloudflare) -> None:
    cloudflare.force(500, times=None)

    started = time.monotonic()
    result = run(cloudflare.base_url, "list", KOKOA_DNS_BACKOFF="0.1")
    elapsed = time.monotonic() - started

    assert result.exit_code == 1
    assert "HTTP 500" in result.stderr and "gave up after 4 attempts" in result.stderr
    assert len(cloudflare.requests) == 4
    assert 0.7 <= elapsed < 5  # slept 0.1 + 0.2 + 0.4 between the attempts


def test_the_default_retry_policy_gives_up_within_a_few_seconds() -> None:
    policy = dns_cli.RetryPolicy()

    assert sum(policy.delay_before(retry) for retry in range(1, policy.attempts)) <= 5
    assert dns_cli.RetryPolicy(attempts=10, backoff_seconds=30).delay_before(9) == dns_cli.MAX_WAIT_SECONDS


def test_a_gateway_error_without_json_is_reported_as_such(cloudflare: FakeCloudflare) -> None:
    cloudflare.force(502, "<html><body><h1>502 Bad Gateway</h1></body></html>", times=None)

    result = run(cloudflare.base_url, "list")

    assert result.exit_code == 1
    assert "HTTP 502 Bad Gateway without a Cloudflare JSON answer" in result.stderr
    assert "502 Bad Gateway</h1>" in result.stderr
    assert len(cloudflare.requests) == 4


def test_an_error_chain_is_printed_under_its_error(cloudflare: FakeCloudflare) -> None:
    cloudflare.force(400, failure_envelope([{
        "code": 6003, "message": "Invalid request headers",
        "error_chain": [{"code": 6111, "message": "Invalid format for Authorization header"}]}]))

    result = run(cloudflare.base_url, "list")

    assert result.exit_code == 1
    assert ("  6003: Invalid request headers\n"
            "    6111: Invalid format for Authorization header") in result.stderr


# -- the fake server on its own ----------------------------------------------------------


@pytest.mark.parametrize("method, resource, body, headers, status, codes", [
    ("GET", f"{ZONE_ID}/dns_records", None, {}, 400, [9106]),
    ("GET", f"{ZONE_ID}/dns_records", None, {"Authorization": TOKEN}, 400, [6003]),
    ("GET", f"{ZONE_ID}/dns_records", None, {"Authorization": "Bearer wrong"}, 403, [10000]),
    ("GET", f"{OTHER_ZONE_ID}/dns_records", None, None, 403, [10000]),
    ("GET", "example.com/dns_records", None, None, 400, [7003, 7000]),
    ("POST", f"{ZONE_ID}/dns_records", {"type": "CNAME", "name": "blog", "content": "x.example.net"},
     None, 400, [81053]),
    ("POST", f"{ZONE_ID}/dns_records", {"type": "A", "name": "blog", "content": EDGE_IP},
     None, 400, [81057]),
    ("POST", f"{ZONE_ID}/dns_records", {"type": "A", "name": "new", "content": "2001:db8::1"},
     None, 400, [9005]),
    ("DELETE", f"{ZONE_ID}/dns_records/{'0' * 32}", None, None, 404, [81044]),
])
def test_the_fake_server_answers_as_cloudflare_documents(
        cloudflare: FakeCloudflare, method: str, resource: str, body: dict | None,
        headers: dict | None, status: int, codes: list[int]) -> None:
    cloudflare.add_record("A", "blog.example.com", EDGE_IP)
    url = f"{cloudflare.base_url}/zones/{resource}"
    sent_headers = {"Authorization": f"Bearer {TOKEN}"} if headers is None else headers

    response = requests.request(method, url, json=body, headers=sent_headers, timeout=5)

    envelope = response.json()
    assert response.status_code == status
    assert (envelope["success"], envelope["result"]) == (False, None)
    assert [e["code"] for e in envelope["errors"]] == codes


def test_the_fake_server_runs_standalone_for_the_lab() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "kokoa_infra.lab.cloudflare_standin", "--port", "0",
         "--token", TOKEN, "--zone", ZONE_ID],
        stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        assert urlsplit(base_url).hostname == "127.0.0.1"

        assert run(base_url, "add", "--ip", EDGE_IP, "--name", "blog.example.com").exit_code == 0
        listed = run(base_url, "list", "--json")
        assert [(r["name"], r["content"]) for r in json.loads(listed.stdout)] == [
            ("blog.example.com", EDGE_IP)]
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0
