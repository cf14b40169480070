"""The lab's DNS, all of it: the Cloudflare stand-in, the resolver that answers from it, and pebble's DNS.

`pulumi up` creates, updates and deletes the A records through pulumi-cloudflare; in
the lab the executor does the same against the stand-in (`cloudflare_standin.py`, run
on 127.0.0.1 of this machine) through the one Cloudflare client (`kokoa_infra.cloudflare`),
and `resolver.py`, in the ACME host's namespace on port 53, answers each lab domain from
the stand-in's records. So `kokoa drain` + `kokoa lab up`, or `kokoa-dns remove --ip`
against the stand-in, take an edge out of what clients resolve, as on the internet.
pebble-challtestsrv, beside pebble, is the DNS pebble validates through: it answers each
origin domain with the A records the program declares. `LabDns.ensure` starts all three.
"""

from __future__ import annotations

import json
import secrets
import sys
from typing import TYPE_CHECKING, Any, Mapping

from kokoa_infra.atomic_file import write_private
from kokoa_infra.cloudflare import ApiSettings, CloudflareApiError, CloudflareDns, RetryPolicy
from kokoa_infra.lab.context import LabContext
from kokoa_infra.lab.executor import ExecutorError
from kokoa_infra.lab.hosts import Host, LabTopology
from kokoa_infra.lab.processes import alive, listening, run, wait_until

if TYPE_CHECKING:  # the resources come from an evaluation; starting the DNS needs no Pulumi
    from kokoa_infra.mocked_program import DeclaredResource

# The lab zone's id: any 32 hex digits ("kokoa lab zone.." in hex).
LAB_ZONE_ID = "6b6f6b6f61206c6162207a6f6e652e2e"
RESOLVER_PORT = 53
# pebble-challtestsrv in the ACME host's namespace: its DNS (pebble's -dnsserver) and its management API.
CHALLTESTSRV_DNS = "127.0.0.1:8053"
CHALLTESTSRV_MANAGEMENT_PORT = 8055
# Inputs of a DnsRecord and the fields of the API's record they become.
RECORD_FIELDS = {"name": "name", "type": "type", "content": "content", "ttl": "ttl", "proxied": "proxied",
                 "comment": "comment"}


class DnsRecordHandler:
    """pulumi-cloudflare's DnsRecord: POST to create, PUT to update, DELETE by id, GET by id to refresh."""

    # zone_id and type are RequiresReplace (terraform-provider-cloudflare dns_record/schema.go).
    provider_replace_keys = frozenset({"zoneId", "type"})

    def __init__(self, base_url: str, token: str, echo=print, policy: RetryPolicy = RetryPolicy()) -> None:
        self.base_url = base_url
        self.token = token
        self.echo = echo
        self.policy = policy
        self._zones: dict[str, CloudflareDns] = {}

    def _zone(self, inputs: Mapping[str, Any]) -> CloudflareDns:
        zone_id = inputs["zoneId"]
        if zone_id not in self._zones:
            self._zones[zone_id] = CloudflareDns(ApiSettings(self.token, zone_id, self.base_url.rstrip("/")),
                                                 self.policy, user_agent="kokoa-lab")
        return self._zones[zone_id]

    def check(self, res: DeclaredResource) -> None:
        if not res.inputs.get("zoneId"):
            raise ExecutorError(f"{res.name}: a DnsRecord without zoneId")

    @staticmethod
    def _body(inputs: Mapping[str, Any]) -> dict[str, Any]:
        # Numbers arrive as floats from the engine; JSON sends 60, not 60.0, as the provider does.
        return {field: int(inputs[key]) if isinstance(inputs[key], float) and inputs[key].is_integer()
                else inputs[key] for key, field in RECORD_FIELDS.items() if key in inputs}

    def create(self, entry, warn):
        inputs = entry["inputs"]
        try:
            record = self._zone(inputs).post_record(self._body(inputs))
        except CloudflareApiError as exc:
            raise ExecutorError(f"create {entry['name']} failed: {exc}") from exc
        self.echo(f"  create  {entry['name']}  {inputs['name']} A {inputs['content']}")
        return {"id": record["id"]}

    def update(self, old, new, warn):
        inputs = new["inputs"]
        record_id = old["outputs"]["id"]
        try:
            self._zone(inputs).put_record(record_id, self._body(inputs))
        except CloudflareApiError as exc:
            raise ExecutorError(f"update {new['name']} failed: {exc}") from exc
        self.echo(f"  update  {new['name']}  {inputs['name']} A {inputs['content']}")
        return {"id": record_id}

    def delete(self, entry, warn):
        inputs = entry["inputs"]
        try:
            # The provider's Delete does not forgive a 404: the record must be refreshed away first.
            self._zone(inputs).delete_record(entry["outputs"]["id"])
        except CloudflareApiError as exc:
            raise ExecutorError(f"delete {entry['name']} failed: {exc}") from exc
        self.echo(f"  delete  {entry['name']}  {inputs['name']} A {inputs['content']}")

    def read(self, entry):
        inputs = entry["inputs"]
        try:
            record = self._zone(inputs).get_record(entry["outputs"]["id"])
        except CloudflareApiError as exc:
            raise ExecutorError(f"refresh {entry['name']} failed: {exc}") from exc
        if record is None:
            return None
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
    """The stand-in, the resolver and pebble's DNS of one lab: started when missing, recorded for `kokoa lab down`."""

    def __init__(self, lab: LabContext) -> None:
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

    def ensure(self, topo: LabTopology, echo=print) -> None:
        """Start whichever is not running: the stand-in (root namespace, 127.0.0.1), and, with an ACME host,
        the resolver and pebble-challtestsrv (both in its namespace)."""
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
            wait_until("the Cloudflare stand-in", lambda: self.url_file.exists() and child.poll() is None, tries=100)
        acme = topo.one("acme")
        if acme is None:
            return
        if not alive(processes.get("resolver")):
            echo(f"  resolver  {acme.ip}:{RESOLVER_PORT}  ({acme.netns})")
            child = self.lab.spawn(["ip", "netns", "exec", acme.netns, sys.executable, "-m",
                                     "kokoa_infra.lab.resolver", "serve", "--address", acme.ip,
                                     "--port", str(RESOLVER_PORT), "--records", str(self.records_file)],
                                    self.dir / "resolver.log")
            with self.lab.recording() as rec:
                rec["processes"]["resolver"] = child.pid
            wait_until("the lab resolver", lambda: child.poll() is None and self._answers(acme.netns, acme.ip),
                       tries=100)
        if not alive(processes.get("challtestsrv")):
            self._start_challtestsrv(acme)

    def _answers(self, netns: str, ip: str) -> bool:
        proc = self.lab.on_host(netns, ["ss", "-Hlun", f"sport = :{RESOLVER_PORT}"])
        return proc.returncode == 0 and ip in proc.stdout

    def _start_challtestsrv(self, acme: Host) -> None:
        # Names with no A record resolve to the ACME host itself, where nothing answers on port 80.
        child = self.lab.spawn(["ip", "netns", "exec", acme.netns, "pebble-challtestsrv", "-dns01", CHALLTESTSRV_DNS,
                                "-http01", "", "-https01", "", "-tlsalpn01", "",
                                "-management", f"127.0.0.1:{CHALLTESTSRV_MANAGEMENT_PORT}",
                                "-defaultIPv4", acme.ip, "-defaultIPv6", ""], self.lab.acme_dir / "challtestsrv.log")
        with self.lab.recording() as rec:
            rec["processes"]["challtestsrv"] = child.pid
            rec.pop("dns", None)  # a new one answers nothing yet
        wait_until("pebble-challtestsrv", lambda: child.poll() is None
                   and listening(acme.netns, CHALLTESTSRV_MANAGEMENT_PORT))

    def set_acme_records(self, topo: LabTopology, records: Mapping[str, list[str]]) -> None:
        """Make pebble's DNS (pebble-challtestsrv) answer every name of the program's `dnsRecords`
        output (each origin's domain and hostnames) with exactly its addresses; a name no longer
        there, with none."""
        acme = topo.one("acme")
        if acme is None:
            return
        wanted = {name: sorted(addresses) for name, addresses in records.items()}
        before = self.lab.record().get("dns") or {}
        if before == wanted:
            return
        for name in sorted(before.keys() | wanted.keys()):
            self._challtestsrv(acme, "clear-a", {"host": f"{name}."})
            if wanted.get(name):
                self._challtestsrv(acme, "add-a", {"host": f"{name}.", "addresses": wanted[name]})
        with self.lab.recording() as rec:
            rec["dns"] = wanted

    @staticmethod
    def _challtestsrv(acme: Host, action: str, body: dict) -> None:
        run(["ip", "netns", "exec", acme.netns, "curl", "-fsS", "-m", "5", "-X", "POST",
             "-d", json.dumps(body), f"http://127.0.0.1:{CHALLTESTSRV_MANAGEMENT_PORT}/{action}"])

    def stack_config(self) -> dict[str, str]:
        """What the program needs to declare the records: the zone, and the provider's token."""
        return {"kokoa:cloudflareZoneId": LAB_ZONE_ID, "cloudflare:apiToken": self.token}

    def handler(self, echo=print) -> DnsRecordHandler:
        return DnsRecordHandler(self.base_url, self.token, echo)

    def environment(self) -> dict[str, str]:
        """`kokoa-dns` against the stand-in."""
        return {"CLOUDFLARE_API_BASE_URL": self.base_url, "CLOUDFLARE_API_TOKEN": self.token,
                "CLOUDFLARE_ZONE_ID": LAB_ZONE_ID}

    def records(self) -> list[dict[str, Any]]:
        if not self.records_file.exists():
            return []
        return json.loads(self.records_file.read_text())["records"]
