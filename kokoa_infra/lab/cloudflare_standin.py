"""A local Cloudflare-v4-compatible DNS records API (`/zones/{zone}/dns_records`) for tests and the lab.

It binds 127.0.0.1 only and keeps its records in memory, and with `state_file` also in
a JSON file (rewritten atomically after every change; the lab's resolver answers from
it). Tests drive it through `FakeCloudflare` (seed records, force responses, read the
request log); the lab runs it standalone:
`python -m kokoa_infra.lab.cloudflare_standin --port P --token T --zone Z [--state-file F]`.

What is modelled, and where it comes from:

- Envelope `{success, errors, messages, result}` plus `result_info {page, per_page,
  count, total_count, total_pages}` on lists; a failure has `success: false`,
  `result: null` and `errors: [{code, message}]`, optionally with `error_chain`:
  cloudflare/api-schemas `common.yaml` (api-response-common, api-response-collection,
  api-response-common-failure).
- `GET /zones/{zone}/dns_records` filters `type`, `name`, `content` (exact values, all
  must match: `match` defaults to `all`), `page` (default 1) and `per_page` (default
  100, minimum 1, maximum 5,000,000): cloudflare/cloudflare-python
  `types/dns/record_list_params.py` and the OpenAPI schemas `dns-records_page` /
  `dns-records_per_page`. Paging with `page` and `per_page`: developers.cloudflare.com
  /fundamentals/api/how-to/make-api-calls/ ("Pagination").
- Auth is `Authorization: Bearer <token>` (RFC 6750): same page. A token that cannot
  act on the zone (wrong token, or a zone it has no access to) gets HTTP 403 with
  10000 "Authentication error": developers.cloudflare.com/terraform/troubleshooting/
  authentication-error-dns-records/. No Authorization header: HTTP 400, 9106 "Missing
  X-Auth-Key, X-Auth-Email or Authorization headers" (cloudflare/cloudflare-python
  issue 2678). A header that is not `Bearer <token>`: HTTP 400, 6003 "Invalid request
  headers" with error_chain 6111 "Invalid format for Authorization header"
  (jeessy2/ddns-go issue 916).
- A zone id that is not an identifier (32 hex digits): HTTP 400, 7003 "Could not route
  to ..., perhaps your object identifier is invalid?" and 7000 "No route for that URI"
  (cloudflare/cloudflare-go issue 118); a well-formed id the token cannot reach is the
  403/10000 above, as Cloudflare does not reveal whether the zone exists.
- POST of a record identical to one present (same type, name, content): HTTP 400,
  81057 "Record already exists." (jeessy2/ddns-go issue 1149; newer answers may say
  81058 "An identical record already exists.", ddns-go issue 1378). A CNAME beside an
  A/AAAA/CNAME of the same name, or the reverse: HTTP 400, 81053 "An A, AAAA, or CNAME
  record with that host already exists." (cloudflare/terraform-provider-cloudflare
  issue 1247; developers.cloudflare.com/dns/manage-dns-records/troubleshooting/
  records-with-same-name/). A record's content that is not an IPv4 address: HTTP 400,
  9005 "Content for A record must be a valid IPv4 address." (timothymiller/cloudflare-ddns
  issue 230).
- PUT `/zones/{zone}/dns_records/{id}` overwrites a record (what pulumi-cloudflare's
  DnsRecord update sends: terraform-provider-cloudflare `dns_record/resource.go` Update
  calls `DNS.Records.Update`, cloudflare-go's PUT "Overwrite DNS Record"); PATCH
  changes the given fields ("Update DNS Record"). Unknown id: 404, 81044.
- DELETE of an unknown record id: HTTP 404, 81044 "Record does not exist."
  (zanjie1999/cloudflare-api-v4-ddns issue 5 for the body; the status is as commonly
  reported). A successful DELETE answers `result: {"id": ...}` (api-response-single-id).
- HTTP 429 carries `Retry-After` in seconds (developers.cloudflare.com/fundamentals/api/
  reference/limits/); the default 429 body says "More than 1200 requests per 300 seconds
  reached. Please wait and consider throttling your request speed"
  (lablabs/cloudflare-exporter issue 74) with code 971 (commonly reported, not documented).

Not documented, shapes chosen here: bad `page`/`per_page` values and malformed JSON
bodies answer HTTP 400 with code 1001; an unsupported method answers HTTP 405 with code
7001. Relative names are completed with the zone name and `@` is the apex, as the
dashboard does. TTL and proxied values are stored as given, not checked.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import re
import signal
import sys
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_PREFIX = "/client/v4"
LOOPBACK = "127.0.0.1"
DEFAULT_PER_PAGE = 100
MAX_PER_PAGE = 5_000_000
IDENTIFIER = re.compile(r"[0-9a-f]{32}")
ADDRESS_TYPES = frozenset({"A", "AAAA", "CNAME"})
RATE_LIMITED_MESSAGE = ("More than 1200 requests per 300 seconds reached. "
                        "Please wait and consider throttling your request speed")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it (the token itself is not kept)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    authorized: bool


@dataclass
class ForcedResponse:
    """An answer given instead of the normal one, `remaining` times (None: forever)."""

    status: int
    body: dict[str, Any] | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    remaining: int | None = 1
    method: str | None = None


class ApiFailure(Exception):
    """A Cloudflare failure answer: HTTP status plus the `errors` list."""

    def __init__(self, status: int, *errors: dict[str, Any]) -> None:
        super().__init__(status, errors)
        self.status = status
        self.errors = list(errors)


def error(code: int, message: str, chain: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"code": code, "message": message}
    if chain:
        entry["error_chain"] = chain
    return entry


def failure_envelope(errors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"success": False, "errors": errors, "messages": [], "result": None}


def default_body_for(status: int) -> dict[str, Any] | None:
    if status == 429:
        return failure_envelope([error(971, RATE_LIMITED_MESSAGE)])
    return None


class FakeCloudflare:
    """The fake API server: one zone, one token, records in memory, knobs for tests."""

    def __init__(self, token: str, zone_id: str, zone_name: str = "example.com",
                 port: int = 0, max_per_page: int = MAX_PER_PAGE, state_file: Path | None = None) -> None:
        self.token = token
        self.zone_id = zone_id
        self.zone_name = zone_name.lower().rstrip(".")
        # A server may hand out smaller pages than asked; clients must follow result_info.
        self.max_per_page = max_per_page
        # Off only to prove a client re-checks what it is about to delete.
        self.honour_filters = True
        self.records: dict[str, dict[str, Any]] = {}
        self.state_file = Path(state_file) if state_file else None
        if self.state_file is not None and self.state_file.exists():
            self.records = {r["id"]: r for r in json.loads(self.state_file.read_text())["records"]}
        self.requests: list[RecordedRequest] = []
        self.forced: deque[ForcedResponse] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((LOOPBACK, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}{API_PREFIX}"

    def start(self) -> FakeCloudflare:
        # A short poll interval: shutdown() waits for the loop to notice, and tests stop a lot.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="fake-cloudflare", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (the standalone mode)."""
        try:
            self._server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._server.server_close()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeCloudflare:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- knobs for tests -----------------------------------------------------------------

    def add_record(self, record_type: str, name: str, content: str, ttl: int = 1,
                   proxied: bool = False, comment: str | None = None) -> dict[str, Any]:
        """Put a record in the zone directly, without the API's checks."""
        with self._lock:
            return self._store(record_type, self._full_name(name), content, ttl, proxied, comment)

    def force(self, status: int, body: dict[str, Any] | str | None = None,
              headers: dict[str, str] | None = None, times: int | None = 1,
              method: str | None = None) -> None:
        """Answer the next `times` requests (None: all, for ever) with this response.

        `method` limits it to requests of that method. A `str` body is sent as text/html,
        as a proxy in front of the API would; None gives the usual Cloudflare body.
        """
        with self._lock:
            self.forced.append(ForcedResponse(status, body, dict(headers or {}), times,
                                              method.upper() if method else None))

    def records_of(self, record_type: str | None = None) -> list[dict[str, Any]]:
        """A copy of the zone's records, optionally of one type."""
        with self._lock:
            return [dict(r) for r in self.records.values() if record_type in (None, r["type"])]

    # -- the API -----------------------------------------------------------------------

    def _full_name(self, name: str) -> str:
        name = name.strip().lower().rstrip(".")
        if name in ("@", ""):
            return self.zone_name
        if name == self.zone_name or name.endswith("." + self.zone_name):
            return name
        return f"{name}.{self.zone_name}"

    def _store(self, record_type: str, name: str, content: str, ttl: int, proxied: bool,
               comment: str | None) -> dict[str, Any]:
        now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        record = {
            "id": uuid.uuid4().hex,
            "zone_id": self.zone_id,
            "zone_name": self.zone_name,
            "name": name,
            "type": record_type,
            "content": content,
            "proxiable": record_type in ADDRESS_TYPES,
            "proxied": proxied,
            "ttl": ttl,
            "locked": False,
            "comment": comment,
            "tags": [],
            "meta": {},
            "created_on": now,
            "modified_on": now,
        }
        self.records[record["id"]] = record
        self._persist()
        return dict(record)

    def _persist(self) -> None:
        """The records as JSON, replaced atomically: readers see the old or the new file."""
        if self.state_file is None:
            return
        from kokoa_infra.atomic_file import write_atomically

        body = {"zone_id": self.zone_id, "zone_name": self.zone_name,
                "records": sorted(self.records.values(), key=lambda r: (r["name"], r["type"], r["content"]))}
        write_atomically(self.state_file, json.dumps(body, indent=1), 0o644)

    def _take_forced(self, method: str) -> ForcedResponse | None:
        for forced in self.forced:
            if forced.method in (None, method):
                if forced.remaining is not None:
                    forced.remaining -= 1
                    if forced.remaining <= 0:
                        self.forced.remove(forced)
                return forced
        return None

    def _check_auth(self, authorization: str | None) -> None:
        if authorization is None:
            raise ApiFailure(400, error(9106, "Missing X-Auth-Key, X-Auth-Email or Authorization headers"))
        scheme, _, credentials = authorization.partition(" ")
        if scheme != "Bearer" or not credentials or " " in credentials.strip():
            raise ApiFailure(400, error(6003, "Invalid request headers",
                                        [error(6111, "Invalid format for Authorization header")]))
        if credentials.strip() != self.token:
            raise ApiFailure(403, error(10000, "Authentication error"))

    def _route(self, method: str, path: str, query: dict[str, str], body: Any,
               authorization: str | None) -> tuple[int, dict[str, Any]]:
        no_route = ApiFailure(
            400, error(7003, f"Could not route to {path}, perhaps your object identifier is invalid?"),
            error(7000, "No route for that URI"))
        if not path.startswith(API_PREFIX + "/"):
            raise no_route
        self._check_auth(authorization)
        parts = path[len(API_PREFIX) + 1:].strip("/").split("/")
        if len(parts) not in (3, 4) or parts[0] != "zones" or parts[2] != "dns_records":
            raise no_route
        zone_id = parts[1]
        if not IDENTIFIER.fullmatch(zone_id):
            raise no_route
        if zone_id != self.zone_id:
            raise ApiFailure(403, error(10000, "Authentication error"))
        if len(parts) == 3 and method == "GET":
            return 200, self._list(query)
        if len(parts) == 3 and method == "POST":
            return 200, self._create(body)
        if len(parts) == 4 and method == "GET":
            return 200, self._get(parts[3])
        if len(parts) == 4 and method == "DELETE":
            return 200, self._delete(parts[3])
        if len(parts) == 4 and method in ("PUT", "PATCH"):
            return 200, self._overwrite(parts[3], body, partial=method == "PATCH")
        raise ApiFailure(405, error(7001, f"Method {method} not available for that URI."))

    def _list(self, query: dict[str, str]) -> dict[str, Any]:
        page = _positive_int(query, "page", 1, sys.maxsize)
        per_page = min(_positive_int(query, "per_page", DEFAULT_PER_PAGE, MAX_PER_PAGE),
                       self.max_per_page)
        wanted = {key: query[key] for key in ("type", "content") if key in query}
        if "name" in query:
            wanted["name"] = self._full_name(query["name"])
        matching = [record for record in self.records.values()
                    if not self.honour_filters
                    or all(record[key] == value for key, value in wanted.items())]
        window = matching[(page - 1) * per_page: page * per_page]
        return {
            "success": True, "errors": [], "messages": [],
            "result": [dict(r) for r in window],
            "result_info": {"page": page, "per_page": per_page, "count": len(window),
                            "total_count": len(matching),
                            "total_pages": math.ceil(len(matching) / per_page)},
        }

    def _create(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiFailure(400, error(1001, "Request body must be a JSON object."))
        type_ = str(body.get("type", "")).upper()
        content = str(body.get("content", ""))
        if not type_ or not body.get("name") or not content:
            raise ApiFailure(400, error(1001, "type, name and content are required."))
        if type_ == "A":
            try:
                ipaddress.IPv4Address(content)
            except ValueError:
                raise ApiFailure(400, error(
                    9005, "Content for A record must be a valid IPv4 address.")) from None
        ttl = body.get("ttl", 1)
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            raise ApiFailure(400, error(1001, "ttl must be an integer."))
        name = self._full_name(str(body["name"]))
        for record in self.records.values():
            if (record["type"], record["name"], record["content"]) == (type_, name, content):
                raise ApiFailure(400, error(81057, "Record already exists."))
            if (record["name"] == name and type_ in ADDRESS_TYPES and record["type"] in ADDRESS_TYPES
                    and "CNAME" in (type_, record["type"])):
                raise ApiFailure(400, error(
                    81053, "An A, AAAA, or CNAME record with that host already exists."))
        record = self._store(type_, name, content, ttl, bool(body.get("proxied", False)),
                             body.get("comment"))
        return {"success": True, "errors": [], "messages": [], "result": record}

    def _get(self, record_id: str) -> dict[str, Any]:
        if record_id not in self.records:
            raise ApiFailure(404, error(81044, "Record does not exist."))
        return {"success": True, "errors": [], "messages": [], "result": dict(self.records[record_id])}

    def _delete(self, record_id: str) -> dict[str, Any]:
        if self.records.pop(record_id, None) is None:
            raise ApiFailure(404, error(81044, "Record does not exist."))
        self._persist()
        return {"success": True, "errors": [], "messages": [], "result": {"id": record_id}}

    def _overwrite(self, record_id: str, body: Any, partial: bool) -> dict[str, Any]:
        if record_id not in self.records:
            raise ApiFailure(404, error(81044, "Record does not exist."))
        if not isinstance(body, dict):
            raise ApiFailure(400, error(1001, "Request body must be a JSON object."))
        record = dict(self.records[record_id])
        fields = ("type", "name", "content", "ttl", "proxied", "comment")
        if not partial and not all(body.get(k) for k in ("type", "name", "content")):
            raise ApiFailure(400, error(1001, "type, name and content are required."))
        for key in fields:
            if key in body:
                record[key] = body[key]
        record["type"] = str(record["type"]).upper()
        record["name"] = self._full_name(str(record["name"]))
        if record["type"] == "A":
            try:
                ipaddress.IPv4Address(str(record["content"]))
            except ValueError:
                raise ApiFailure(400, error(9005, "Content for A record must be a valid IPv4 address.")) from None
        for other in self.records.values():
            if other["id"] != record_id and (other["type"], other["name"], other["content"]) == (
                    record["type"], record["name"], record["content"]):
                raise ApiFailure(400, error(81058, "An identical record already exists."))
        record["modified_on"] = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        self.records[record_id] = record
        self._persist()
        return {"success": True, "errors": [], "messages": [], "result": dict(record)}

    def handle(self, method: str, target: str, body_bytes: bytes,
               authorization: str | None) -> tuple[int, dict[str, str], bytes]:
        """Answer one request: (status, headers, body)."""
        split = urlsplit(target)
        query = {key: values[0] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        body: Any = None
        body_error = False
        if body_bytes:
            try:
                body = json.loads(body_bytes)
            except ValueError:
                body_error = True
        with self._lock:
            self.requests.append(RecordedRequest(
                method, split.path, query, body,
                authorized=authorization == f"Bearer {self.token}"))
            forced = self._take_forced(method)
            if forced is not None:
                return _encode_forced(forced)
            try:
                if body_error:
                    raise ApiFailure(400, error(1001, "Request body is not valid JSON."))
                status, payload = self._route(method, split.path, query, body, authorization)
            except ApiFailure as failure:
                status, payload = failure.status, failure_envelope(failure.errors)
        return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fake-cloudflare"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, payload = fake.handle(
                    self.command, self.path, body, self.headers.get("Authorization"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the request log is `fake.requests`; stderr stays quiet in tests

        return Handler


def _positive_int(query: dict[str, str], key: str, default: int, maximum: int) -> int:
    if key not in query:
        return default
    try:
        value = int(query[key])
    except ValueError:
        raise ApiFailure(400, error(1001, f"{key} must be an integer.")) from None
    if not 1 <= value <= maximum:
        raise ApiFailure(400, error(1001, f"{key} must be between 1 and {maximum}."))
    return value


def _encode_forced(forced: ForcedResponse) -> tuple[int, dict[str, str], bytes]:
    headers = dict(forced.headers)
    body = forced.body if forced.body is not None else default_body_for(forced.status)
    if isinstance(body, str):
        headers.setdefault("Content-Type", "text/html")
        return forced.status, headers, body.encode()
    if body is None:
        return forced.status, headers, b""
    headers.setdefault("Content-Type", "application/json")
    return forced.status, headers, json.dumps(body).encode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--token", help="the API token clients must send as Bearer")
    parser.add_argument("--zone", required=True, help="the zone id (32 hex digits)")
    parser.add_argument("--zone-name", default="example.com", help="the zone's domain name")
    parser.add_argument("--state-file", help="keep the records in this JSON file (loaded at start)")
    parser.add_argument("--url-file", help="also write the base URL to this file once listening")
    parser.add_argument("--token-file", help="read the token from this file instead of --token")
    args = parser.parse_args(argv)
    if not IDENTIFIER.fullmatch(args.zone):
        parser.error("--zone must be 32 lower-case hex digits, like a Cloudflare zone id")
    token = Path(args.token_file).read_text().strip() if args.token_file else args.token
    if not token:
        parser.error("--token or --token-file is required")
    server = FakeCloudflare(token, args.zone, args.zone_name, port=args.port, state_file=args.state_file)
    server._persist()
    # SIGTERM ends serve_forever the same way Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(server.base_url, flush=True)
    if args.url_file:
        from kokoa_infra.atomic_file import write_atomically

        write_atomically(Path(args.url_file), server.base_url + "\n", 0o644)
    server.serve_forever()


if __name__ == "__main__":
    main()
