"""The lab applies the program's DnsRecords through the one Cloudflare client (kokoa_infra.cloudflare): its
retries, its errors, and the provider's calls (POST, PUT, GET by id, DELETE) against the local stand-in."""

from __future__ import annotations

import pytest

from kokoa_infra.cloudflare import RetryPolicy
from kokoa_infra.lab.cloudflare_standin import FakeCloudflare, failure_envelope
from kokoa_infra.lab.dns import DnsRecordHandler
from kokoa_infra.lab.executor import ExecutorError
from tests.support.stacks import ZONE

TOKEN = "lab-token"


@pytest.fixture
def cloudflare():
    with FakeCloudflare(TOKEN, ZONE, zone_name="example.com") as server:
        yield server


def entry(content: str, record_id: str | None = None) -> dict:
    inputs = {"zoneId": ZONE, "name": "blog.example.com", "type": "A", "content": content, "ttl": 60.0,
              "proxied": False, "comment": "kokoa edge edge-1"}
    return {"name": "edge-1-a-record", "inputs": inputs, "outputs": {"id": record_id} if record_id else {}}


def handler(cf: FakeCloudflare, attempts: int = 3) -> DnsRecordHandler:
    return DnsRecordHandler(cf.base_url, TOKEN, echo=lambda _: None, policy=RetryPolicy(5.0, attempts, 0.01))


def never(message: str) -> None:
    raise AssertionError(f"no warning expected: {message}")


def test_create_update_read_and_delete_as_the_provider_does(cloudflare):
    dns = handler(cloudflare)
    made = dns.create(entry("198.51.100.7"), never)
    [record] = cloudflare.records_of("A")
    assert made == {"id": record["id"]} and record["ttl"] == 60 and record["comment"] == "kokoa edge edge-1"

    assert dns.update(entry("198.51.100.7", record["id"]), entry("198.51.100.8"), never) == made
    assert [r["content"] for r in cloudflare.records_of("A")] == ["198.51.100.8"]
    assert "PUT" in {request.method for request in cloudflare.requests}

    read = dns.read(entry("198.51.100.7", record["id"]))
    assert read["inputs"]["content"] == "198.51.100.8"  # what Cloudflare holds, not what was recorded

    dns.delete(entry("198.51.100.8", record["id"]), never)
    assert cloudflare.records_of("A") == []
    assert dns.read(entry("198.51.100.8", record["id"])) is None  # 404 on refresh: gone from state


def test_a_rate_limit_is_waited_out_and_retried(cloudflare):
    cloudflare.force(429, headers={"Retry-After": "0"}, times=2, method="POST")
    handler(cloudflare).create(entry("198.51.100.7"), never)
    assert len(cloudflare.records_of("A")) == 1


def test_a_refused_create_names_the_resource_and_cloudflare_s_error(cloudflare):
    cloudflare.force(400, failure_envelope([{"code": 81057, "message": "Record already exists."}]), method="POST")
    with pytest.raises(ExecutorError) as failed:
        handler(cloudflare).create(entry("198.51.100.7"), never)
    assert str(failed.value).startswith("create edge-1-a-record failed: POST ")
    assert "81057: Record already exists." in str(failed.value)


def test_a_delete_of_a_record_already_gone_fails_as_the_provider_s_does(cloudflare):
    with pytest.raises(ExecutorError, match="(?s)delete edge-1-a-record failed: .*81044: Record does not exist"):
        handler(cloudflare, attempts=1).delete(entry("198.51.100.7", "0" * 32), never)
