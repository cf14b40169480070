"""The lab's Cloudflare and DNS: the stand-in API on loopback, the program's DnsRecords applied to it, a resolver.

`pulumi up` creates, updates and deletes the A records through pulumi-cloudflare; in
the lab the executor does the same against the stand-in (`cloudflare_standin.py`, run
on 127.0.0.1 of this machine), and `resolver.py`, in the ACME host's namespace on port
53, answers each lab domain from the stand-in's records. So `kokoa drain` + `kokoa lab
up`, or `kokoa-dns remove --ip` against the stand-in, take an edge out of what clients
resolve, as on the internet.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from typing import Any, Mapping

import requests

from kokoa_infra.atomic_file import write_private
from kokoa_infra.lab.executor import DNS_RECORD, ExecutorError
from kokoa_infra.lab.hosts import LabTopology
from kokoa_infra.lab.lab import Lab
from kokoa_infra.lab.processes import LabError, alive
from kokoa_infra.mocked_program import DeclaredResource

# The lab zone's id: any 32 hex digits ("kokoa lab zone.." in hex).
LAB_ZONE_ID = "6b6f6b6f61206c6162207a6f6e652e2e"
RESOLVER_PORT = 53
# Inputs of a DnsRecord and the fields of the API's record they become.
RECORD_FIELDS = {"name": "name", "type": "type", "content": "content", "ttl": "ttl", "proxied": "proxied",
                 "comment": "comment"}


class CloudflareApi:
    """The few calls pulumi-cloudflare's DnsRecord makes (terraform-provider-cloudflare `dns_record/resource.go`)."""

    def __init__(self, base_url: str, token: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        response = self.session.request(method, f"{self.base_url}/{path}", json=body, timeout=self.timeout)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None


class DnsRecordHandler:
    """pulumi-cloudflare's DnsRecord: POST to create, PUT to update, DELETE by id, GET by id to refresh."""

    # zone_id and type are RequiresReplace (terraform-provider-cloudflare dns_record/schema.go).
    provider_replace_keys = frozenset({"zoneId", "type"})

    def __init__(self, api: CloudflareApi, echo=print) -> None:
        self.api = api
        self.echo = echo

    def check(self, res: DeclaredResource) -> None:
        if not res.inputs.get("zoneId"):
            raise ExecutorError(f"{res.name}: a DnsRecord without zoneId")

    @staticmethod
    def _body(inputs: Mapping[str, Any]) -> dict[str, Any]:
        # Numbers arrive as floats from the engine; JSON sends 60, not 60.0, as the provider does.
        return {field: int(inputs[key]) if isinstance(inputs[key], float) and inputs[key].is_integer()
                else inputs[key] for key, field in RECORD_FIELDS.items() if key in inputs}

    def _fail(self, what: str, entry: Mapping[str, Any], status: int, payload: Any) -> ExecutorError:
        errors = (payload or {}).get("errors") if isinstance(payload, dict) else None
        detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors or []) or f"HTTP {status}"
        return ExecutorError(f"{what} {entry['name']} failed: {detail}")

    def create(self, entry):
        inputs = entry["inputs"]
        status, payload = self.api.call("POST", f"zones/{inputs['zoneId']}/dns_records", self._body(inputs))
        if status != 200 or not payload.get("success"):
            raise self._fail("create", entry, status, payload)
        self.echo(f"  create  {entry['name']}  {inputs['name']} A {inputs['content']}")
        return {"id": payload["result"]["id"]}

    def update(self, old, new):
        inputs = new["inputs"]
        record_id = old["outputs"]["id"]
        status, payload = self.api.call("PUT", f"zones/{inputs['zoneId']}/dns_records/{record_id}",
                                        self._body(inputs))
        if status != 200 or not payload.get("success"):
            raise self._fail("update", new, status, payload)
        self.echo(f"  update  {new['name']}  {inputs['name']} A {inputs['content']}")
        return {"id": record_id}

    def delete(self, entry):
        inputs = entry["inputs"]
        status, payload = self.api.call("DELETE", f"zones/{inputs['zoneId']}/dns_records/{entry['outputs']['id']}")
        if status != 200:
            # The provider's Delete does not forgive a 404: the record must be refreshed away first.
            raise self._fail("delete", entry, status, payload)
        self.echo(f"  delete  {entry['name']}  {inputs['name']} A {inputs['content']}")

    def read(self, entry):
        inputs = entry["inputs"]
        status, payload = self.api.call("GET", f"zones/{inputs['zoneId']}/dns_records/{entry['outputs']['id']}")
        if status == 404:
            return None
        if status != 200:
            raise self._fail("refresh", entry, status, payload)
        record = payload["result"]
        observed = dict(inputs)
        for key, field in RECORD_FIELDS.items():
            if field in record and (key in inputs or record[field] is not None):
                observed[key] = record[field]
        return {"inputs": observed, "outputs": entry["outputs"]}


def zone_name(topo: LabTopology) -> str:
    """The zone the lab domains live in: the parent of the first origin's domain (kokoa.test)."""
    domains = [h.domain for h in topo.of_role("origin")]
    return domains[0].split(".", 1)[1] if domains and "." in domains[0] else "kokoa.test"


class LabDns:
    """The stand-in and the resolver of one lab: started when missing, recorded for `kokoa lab down`."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = lab.dir / "cloudflare"
        self.token_file = self.dir / "token"
        self.url_file = self.dir / "url"
        self.records_file = self.dir / "records.json"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    @property
    def base_url(self) -> str:
        return self.url_file.read_text().strip()

    def resolver_ip(self, topo: LabTopology) -> str | None:
        acme = topo.one("acme")
        return acme.ip if acme else None

    def ensure(self, topo: LabTopology, echo=print) -> None:
        """Start the stand-in (root namespace, 127.0.0.1) and the resolver (ACME namespace) unless running."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.token_file.exists():
            write_private(self.token_file, secrets.token_urlsafe(24) + "\n")
        processes = self.lab.record()["processes"]
        if not alive(processes.get("cloudflare")):
            self.url_file.unlink(missing_ok=True)
            echo(f"  cloudflare stand-in  127.0.0.1  (zone {zone_name(topo)})")
            child = self.lab.spawn([sys.executable, "-m", "kokoa_infra.lab.cloudflare_standin", "--port", "0",
                                     "--token-file", str(self.token_file), "--zone", LAB_ZONE_ID,
                                     "--zone-name", zone_name(topo), "--state-file", str(self.records_file),
                                     "--url-file", str(self.url_file)], self.dir / "standin.log")
            with self.lab.recording() as rec:
                rec["processes"]["cloudflare"] = child.pid
            self._wait("the Cloudflare stand-in", lambda: self.url_file.exists() and child.poll() is None)
        acme = topo.one("acme")
        if acme is not None and not alive(processes.get("resolver")):
            echo(f"  resolver  {acme.ip}:{RESOLVER_PORT}  ({acme.netns})")
            child = self.lab.spawn(["ip", "netns", "exec", acme.netns, sys.executable, "-m",
                                     "kokoa_infra.lab.resolver", "serve", "--address", acme.ip,
                                     "--port", str(RESOLVER_PORT), "--records", str(self.records_file)],
                                    self.dir / "resolver.log")
            with self.lab.recording() as rec:
                rec["processes"]["resolver"] = child.pid
            self._wait("the lab resolver", lambda: child.poll() is None and self._answers(acme.netns, acme.ip))

    def _answers(self, netns: str, ip: str) -> bool:
        proc = self.lab.on_host(netns, ["ss", "-Hlun", f"sport = :{RESOLVER_PORT}"])
        return proc.returncode == 0 and ip in proc.stdout

    @staticmethod
    def _wait(what: str, ready, tries: int = 100, delay: float = 0.1) -> None:
        for _ in range(tries):
            if ready():
                return
            time.sleep(delay)
        raise LabError(f"{what} did not start within {tries * delay:.0f}s")

    def stack_config(self) -> dict[str, str]:
        """What the program needs to declare the records: the zone, and the provider's token."""
        return {"kokoa:cloudflareZoneId": LAB_ZONE_ID, "cloudflare:apiToken": self.token}

    def handler(self, echo=print) -> DnsRecordHandler:
        return DnsRecordHandler(CloudflareApi(self.base_url, self.token), echo)

    def environment(self) -> dict[str, str]:
        """`kokoa-dns` against the stand-in."""
        return {"CLOUDFLARE_API_BASE_URL": self.base_url, "CLOUDFLARE_API_TOKEN": self.token,
                "CLOUDFLARE_ZONE_ID": LAB_ZONE_ID}

    def records(self) -> list[dict[str, Any]]:
        if not self.records_file.exists():
            return []
        return json.loads(self.records_file.read_text())["records"]


__all__ = ["DNS_RECORD", "LabDns", "DnsRecordHandler", "CloudflareApi", "LAB_ZONE_ID"]
