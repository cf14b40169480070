"""The Cloudflare DNS records API of one zone: settings from the environment, timeouts, bounded retries.

Shared by `kokoa dns` (by hand), `kokoa health --failover` (the agent) and the lab. HTTP 429
(honouring Retry-After), 5xx and connection failures are retried with exponential backoff; a
request that may have been acted on is repeated only when repeating it is harmless (GET, DELETE,
PUT, PATCH), so a failure always surfaces as CloudflareApiError and never as a change that silently
did or did not happen.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import urlsplit

from kokoa_infra.conventions import CouldNotRun, Failed
from kokoa_infra.model import DNS_TTL
from kokoa_infra.values import ZONE_ID_RE

if TYPE_CHECKING:  # imported when a request is made: `--help` and usage errors stay fast
    import requests

DEFAULT_API_BASE_URL = "https://api.cloudflare.com/client/v4"
RECORD_COMMENT = "managed by kokoa-dns"
# Cloudflare's default page size; bigger pages risk server-side timeouts (its API docs,
# "Pagination"). We follow result_info.total_pages whatever size the server grants.
PAGE_SIZE = 100
# A guard against a server whose total_pages never ends: a million records at 100 a page.
MAX_PAGES = 10_000
# Cloudflare's rate limit window is five minutes; waiting that long inside a CLI helps
# nobody, so a longer Retry-After (or backoff) ends the attempt with the wait in the message.
MAX_WAIT_SECONDS = 30.0
RECORD_NOT_FOUND = 81044
# RFC 6750 b64token: anything else (a space, a line break) would corrupt the header.
API_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

class ConfigError(CouldNotRun):
    """The environment is missing or malformed; nothing was sent."""


class CloudflareApiError(Failed):
    """Cloudflare (or the network on the way) answered with a failure."""

    def __init__(self, message: str, codes: tuple[int, ...] = (), status: int | None = None) -> None:
        super().__init__(message)
        self.codes = codes
        self.status = status  # the HTTP status, when Cloudflare answered at all


class NothingMatched(Failed):
    """No record matched what was to be removed."""


@dataclass(frozen=True)
class ApiSettings:
    """Where and as whom to call the API, from the environment."""

    token: str
    zone_id: str
    base_url: str


@dataclass(frozen=True)
class RetryPolicy:
    """How long one request may take and how often it is tried."""

    timeout_seconds: float = 10.0
    attempts: int = 4
    backoff_seconds: float = 0.5

    def delay_before(self, retry: int) -> float:
        """Exponential backoff before retry number `retry` (1-based)."""
        # No jitter: one interactive client, no herd of retries to spread out.
        return min(self.backoff_seconds * 2 ** (retry - 1), MAX_WAIT_SECONDS)


def read_settings(environ: Mapping[str, str]) -> ApiSettings:
    """The API settings, or one ConfigError naming every missing or malformed variable."""
    token = environ.get("CLOUDFLARE_API_TOKEN", "").strip()
    zone_id = environ.get("CLOUDFLARE_ZONE_ID", "").strip()
    base_url = environ.get("CLOUDFLARE_API_BASE_URL", "").strip() or DEFAULT_API_BASE_URL
    missing = [name for name, value in (("CLOUDFLARE_API_TOKEN", token),
                                        ("CLOUDFLARE_ZONE_ID", zone_id)) if not value]
    problems = []
    if missing:
        problems.append("missing environment variable" + ("s" if len(missing) > 1 else "")
                        + ": " + ", ".join(missing))
    if token and not API_TOKEN.fullmatch(token):
        # Never echo the token: it is a secret.
        problems.append("CLOUDFLARE_API_TOKEN has characters no API token has (a space or line break?)")
    if zone_id and not ZONE_ID_RE.fullmatch(zone_id):
        problems.append(f"CLOUDFLARE_ZONE_ID must be the zone's id, 32 lower-case hex digits "
                        f"(not the domain name), got {zone_id!r}")
    if not _is_http_url(base_url):
        problems.append(f"CLOUDFLARE_API_BASE_URL must be an http(s) URL, got {base_url!r}")
    if len(problems) == 1:
        raise ConfigError(f"{problems[0]} (see kokoa-dns --help)")
    if problems:
        raise ConfigError(f"{len(problems)} configuration problems (see kokoa-dns --help):\n  "
                          + "\n  ".join(problems))
    return ApiSettings(token, zone_id, base_url.rstrip("/"))


def _is_http_url(text: str) -> bool:
    try:
        url = urlsplit(text)
        url.port  # raises ValueError when the port is not a number in range
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)


class CloudflareDns:
    """The DNS records endpoints of one zone, with timeouts and bounded retries."""

    def __init__(self, settings: ApiSettings, policy: RetryPolicy,
                 session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep, user_agent: str = "kokoa-dns") -> None:
        self.settings = settings
        self.user_agent = user_agent
        import requests

        self.policy = policy
        self.session = session or requests.Session()
        self.sleep = sleep
        self.records_path = f"zones/{settings.zone_id}/dns_records"

    def list_a_records(self, name: str | None = None, content: str | None = None) -> list[dict[str, Any]]:
        """Every A record matching the filters, all pages read."""
        return self.list_records("A", name=name, content=content)

    def list_records(self, record_type: str, name: str | None = None,
                     content: str | None = None) -> list[dict[str, Any]]:
        """Every record of `record_type` matching the filters, all pages read."""
        params: dict[str, Any] = {"type": record_type, "per_page": PAGE_SIZE}
        if name is not None:
            params["name"] = name
        if content is not None:
            params["content"] = content
        records: dict[str, dict[str, Any]] = {}
        page, total_pages = 1, 1
        while page <= total_pages:
            if page > MAX_PAGES:
                raise CloudflareApiError(f"listing records: gave up after {MAX_PAGES} pages")
            envelope = self._call("GET", self.records_path, params={**params, "page": page})
            result = envelope.get("result")
            if not isinstance(result, list) or not all(isinstance(r, dict) and "id" in r for r in result):
                raise CloudflareApiError("listing records: Cloudflare's answer has no list of records")
            for record in result:
                # A record created or deleted meanwhile shifts the pages: one may come twice.
                records.setdefault(record["id"], record)
            if not result:
                break  # past the last page, whatever total_pages says
            total_pages = _as_int((envelope.get("result_info") or {}).get("total_pages"), default=page)
            page += 1
        return list(records.values())

    def create_a_record(self, name: str, ip: str) -> dict[str, Any]:
        return self.create_record("A", name, ip, RECORD_COMMENT)

    def create_record(self, record_type: str, name: str, content: str, comment: str,
                      ttl: int = DNS_TTL) -> dict[str, Any]:
        """POST one unproxied record (never repeated: Cloudflare may have made it already)."""
        return self.post_record({"type": record_type, "name": name, "content": content, "ttl": ttl,
                                 "proxied": False, "comment": comment})

    def post_record(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """POST a record with exactly these fields (as pulumi-cloudflare's DnsRecord creates one)."""
        record = self._call("POST", self.records_path, body=dict(fields)).get("result")
        if not isinstance(record, dict):
            raise CloudflareApiError("adding the record: Cloudflare's answer has no record")
        return record

    def get_record(self, record_id: str) -> dict[str, Any] | None:
        """One record by id; None when Cloudflare answers 404 (it is gone)."""
        try:
            record = self._call("GET", f"{self.records_path}/{record_id}").get("result")
        except CloudflareApiError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(record, dict):
            raise CloudflareApiError("reading the record: Cloudflare's answer has no record")
        return record

    def put_record(self, record_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Overwrite one record with these fields (PUT, as pulumi-cloudflare's DnsRecord updates one)."""
        record = self._call("PUT", f"{self.records_path}/{record_id}", body=dict(fields)).get("result")
        if not isinstance(record, dict):
            raise CloudflareApiError("overwriting the record: Cloudflare's answer has no record")
        return record

    def patch_record(self, record_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Change the given fields of one record (PATCH: setting the same values twice is harmless)."""
        record = self._call("PATCH", f"{self.records_path}/{record_id}", body=dict(fields)).get("result")
        if not isinstance(record, dict):
            raise CloudflareApiError("changing the record: Cloudflare's answer has no record")
        return record

    def delete_record(self, record_id: str) -> None:
        self._call("DELETE", f"{self.records_path}/{record_id}")

    def _call(self, method: str, path: str, params: dict[str, Any] | None = None,
              body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One API call: the envelope of a success, or CloudflareApiError."""
        url = f"{self.settings.base_url}/{path}"
        response, given_up = self._send(method, url, params, body)
        what = f"{method} {urlsplit(url).path}"
        try:
            envelope = response.json()
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict) or "success" not in envelope:
            raise CloudflareApiError(
                f"{what}: HTTP {response.status_code} {response.reason or ''}".rstrip()
                + f" without a Cloudflare JSON answer{given_up}: {_excerpt(response.text)}",
                status=response.status_code)
        if envelope.get("success") is not True or response.status_code >= 400:
            errors = envelope.get("errors") if isinstance(envelope.get("errors"), list) else []
            lines = _format_errors(errors) or ["(no error details in the answer)"]
            raise CloudflareApiError(
                f"{what} failed with HTTP {response.status_code}{given_up}:\n" + "\n".join(lines),
                codes=tuple(e.get("code") for e in errors if isinstance(e, dict)), status=response.status_code)
        return envelope

    def _send(self, method: str, url: str, params: dict[str, Any] | None,
              body: dict[str, Any] | None) -> tuple[requests.Response, str]:
        """Send with retries: the last response, and why retrying stopped if it is a
        retryable failure (" (gave up after 4 attempts)"), else ''."""
        import requests

        # Only GET, DELETE, PUT and PATCH (the same fields set again) may be repeated after the
        # server might have acted on them: a second POST could add the record twice or fail
        # with "already exists".
        repeatable = method in ("GET", "DELETE", "PUT", "PATCH")
        headers = {"Authorization": f"Bearer {self.settings.token}",
                   "User-Agent": self.user_agent}
        timeout = (self.policy.timeout_seconds, self.policy.timeout_seconds)
        for attempt in range(1, self.policy.attempts + 1):
            last_attempt = attempt == self.policy.attempts
            try:
                response = self.session.request(method, url, params=params, json=body,
                                                headers=headers, timeout=timeout)
            except requests.RequestException as exc:
                retry = (repeatable or _never_reached_server(exc)) and _is_transient(exc)
                if last_attempt or not retry:
                    tries = f" (gave up after {attempt} attempts)" if attempt > 1 else ""
                    raise CloudflareApiError(
                        f"{method} {url}: {_describe_transport_error(exc, self.policy)}{tries}") from None
                self.sleep(self.policy.delay_before(attempt))
                continue
            status = response.status_code
            if not (status == 429 or (repeatable and 500 <= status <= 599)):
                return response, ""
            if last_attempt:
                return response, f" (gave up after {attempt} attempts)"
            asked = _retry_after_seconds(response.headers.get("Retry-After"))
            if asked is not None and asked > MAX_WAIT_SECONDS:
                return response, f" (not retried: Cloudflare asks to wait {asked:.0f} s)"
            self.sleep(max(self.policy.delay_before(attempt), asked or 0.0))
        raise AssertionError("unreachable: the last attempt always returns or raises")


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _format_errors(errors: list[Any], indent: str = "  ") -> list[str]:
    """Cloudflare errors as `code: message` lines, chained causes indented below."""
    lines = []
    for entry in errors:
        if not isinstance(entry, dict):
            lines.append(f"{indent}{entry}")
            continue
        lines.append(f"{indent}{entry.get('code', '?')}: {entry.get('message', '(no message)')}")
        chain = entry.get("error_chain")
        if isinstance(chain, list):
            lines.extend(_format_errors(chain, indent + "  "))
    return lines


def _excerpt(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    if not flat:
        return "(empty body)"
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _retry_after_seconds(header: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110)."""
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _never_reached_server(exc: requests.RequestException) -> bool:
    """True when the request cannot have been acted on: the connection never opened."""
    import requests
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))


def _is_transient(exc: requests.RequestException) -> bool:
    import requests

    # A TLS failure (bad certificate) stays bad however often it is retried.
    return isinstance(exc, (requests.ConnectionError, requests.Timeout)) and not isinstance(
        exc, requests.exceptions.SSLError)


def _describe_transport_error(exc: requests.RequestException, policy: RetryPolicy) -> str:
    import requests

    if isinstance(exc, requests.ConnectTimeout):
        return f"could not connect within {policy.timeout_seconds:g} s"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {policy.timeout_seconds:g} s"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS failure (certificate or protocol); check CLOUDFLARE_API_BASE_URL"
    if isinstance(exc, requests.ConnectionError):
        found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
        return "could not connect: " + (found.group(1).strip() if found else type(exc).__name__)
    return f"request failed: {type(exc).__name__}"
