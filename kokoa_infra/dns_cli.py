"""`kokoa-dns`: list, add and remove a zone's Cloudflare A records by hand (the seed's manual tool)."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import urlsplit

import click

from kokoa_infra.conventions import CONTEXT, CouldNotRun, Failed, epilog
from kokoa_infra.model import DNS_TTL, DOMAIN_RE, ZONE_ID_RE, ipv4_problem, parse_ipv4 as canonical_ipv4_address
from kokoa_infra.tables import format_table

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

ENVIRONMENT = {
    "CLOUDFLARE_API_TOKEN": 'API token sent as "Authorization: Bearer ..."; needs Zone > DNS > Edit on '
                            "the zone (required)",
    "CLOUDFLARE_ZONE_ID": "the zone's id, 32 hex digits, from the zone's Overview page in the dashboard "
                          "(required)",
    "CLOUDFLARE_API_BASE_URL": f"API endpoint (optional; default {DEFAULT_API_BASE_URL})",
    "KOKOA_DNS_TIMEOUT": "default of --timeout",
    "KOKOA_DNS_ATTEMPTS": "default of --attempts",
    "KOKOA_DNS_BACKOFF": "default of --backoff",
}
ENVIRONMENT_HELP = epilog("Cloudflare refused or failed, or nothing matched",
                          "bad usage or configuration: nothing was sent", ENVIRONMENT)


class ConfigError(CouldNotRun):
    """The environment is missing or malformed; nothing was sent."""


class CloudflareApiError(Failed):
    """Cloudflare (or the network on the way) answered with a failure."""

    def __init__(self, message: str, codes: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.codes = codes


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


def parse_ipv4(ctx: click.Context | None, param: click.Parameter | None, value: str) -> str:
    """Click callback: an IPv4 address in canonical dotted-quad form (the model's rule)."""
    address = canonical_ipv4_address(value.strip())
    if address is None:
        raise click.BadParameter(ipv4_problem(value.strip()))
    return str(address)


# Cloudflare's name for the zone's own domain in a record.
ZONE_APEX = "@"


def parse_fqdn(ctx: click.Context | None, param: click.Parameter | None,
               value: str | None) -> str | None:
    """Click callback: a fully qualified domain name (the model's rule for an origin's domain),
    lower-cased, without the final dot."""
    if value is None:
        return None
    name = value.strip().lower().removesuffix(".")
    if not DOMAIN_RE.fullmatch(name):
        raise click.BadParameter(
            f"{value!r} is not a fully qualified domain name (like blog.example.com: "
            "letters, digits and inner hyphens, dot-separated)")
    return name


class CloudflareDns:
    """The DNS records endpoints of one zone, with timeouts and bounded retries."""

    def __init__(self, settings: ApiSettings, policy: RetryPolicy,
                 session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        import requests

        self.policy = policy
        self.session = session or requests.Session()
        self.sleep = sleep
        self.records_path = f"zones/{settings.zone_id}/dns_records"

    def list_a_records(self, name: str | None = None, content: str | None = None) -> list[dict[str, Any]]:
        """Every A record matching the filters, all pages read."""
        params: dict[str, Any] = {"type": "A", "per_page": PAGE_SIZE}
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
        body = {"type": "A", "name": name, "content": ip, "ttl": DNS_TTL,
                "proxied": False, "comment": RECORD_COMMENT}
        record = self._call("POST", self.records_path, body=body).get("result")
        if not isinstance(record, dict):
            raise CloudflareApiError("adding the record: Cloudflare's answer has no record")
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
                + f" without a Cloudflare JSON answer{given_up}: {_excerpt(response.text)}")
        if envelope.get("success") is not True or response.status_code >= 400:
            errors = envelope.get("errors") if isinstance(envelope.get("errors"), list) else []
            lines = _format_errors(errors) or ["(no error details in the answer)"]
            raise CloudflareApiError(
                f"{what} failed with HTTP {response.status_code}{given_up}:\n" + "\n".join(lines),
                codes=tuple(e.get("code") for e in errors if isinstance(e, dict)))
        return envelope

    def _send(self, method: str, url: str, params: dict[str, Any] | None,
              body: dict[str, Any] | None) -> tuple[requests.Response, str]:
        """Send with retries: the last response, and why retrying stopped if it is a
        retryable failure (" (gave up after 4 attempts)"), else ''."""
        import requests

        # Only GET and DELETE may be repeated after the server might have acted on them:
        # a second POST could add the record twice or fail with "already exists".
        repeatable = method in ("GET", "DELETE")
        headers = {"Authorization": f"Bearer {self.settings.token}",
                   "User-Agent": "kokoa-dns"}
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


def _describe(record: Mapping[str, Any]) -> str:
    proxied = "proxied" if record.get("proxied") else "unproxied"
    return (f"A {record.get('name')} -> {record.get('content')} "
            f"(ttl {_ttl_text(record.get('ttl'))}, {proxied}, id {record.get('id')})")


def _ttl_text(ttl: Any) -> str:
    return "auto" if ttl == 1 else str(ttl)  # Cloudflare's TTL 1 means "automatic"


def render_table(records: list[dict[str, Any]]) -> str:
    """Records as aligned columns: name, content, proxied, ttl, id, comment."""
    return format_table(("NAME", "CONTENT", "PROXIED", "TTL", "ID", "COMMENT"), [
        (str(r.get("name", "")), str(r.get("content", "")), "yes" if r.get("proxied") else "no",
         _ttl_text(r.get("ttl")), str(r.get("id", "")), str(r.get("comment") or ""))
        for r in records])


def transport_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--timeout / --attempts / --backoff, shared by every subcommand."""
    command = click.option(
        "--backoff", "backoff_seconds", type=click.FloatRange(0, MAX_WAIT_SECONDS), default=0.5,
        show_default=True, envvar="KOKOA_DNS_BACKOFF", show_envvar=True,
        help="Seconds before the first retry; doubles for each further retry.")(command)
    command = click.option(
        "--attempts", type=click.IntRange(1, 10), default=4, show_default=True,
        envvar="KOKOA_DNS_ATTEMPTS", show_envvar=True,
        help="Tries per request on HTTP 429, 5xx and connection failures.")(command)
    command = click.option(
        "--timeout", "timeout_seconds", type=click.FloatRange(0.1, 300), default=10.0,
        show_default=True, envvar="KOKOA_DNS_TIMEOUT", show_envvar=True,
        help="Seconds to wait for a connection, and again for an answer.")(command)
    return command


def connect(timeout_seconds: float, attempts: int, backoff_seconds: float) -> CloudflareDns:
    return CloudflareDns(read_settings(os.environ),
                         RetryPolicy(timeout_seconds, attempts, backoff_seconds))


@click.group(epilog=ENVIRONMENT_HELP, context_settings=CONTEXT)
def cli() -> None:
    """Manage the zone's A records on Cloudflare by hand.

    Pulumi manages the records of the stack's edges; this tool is for looking at the
    zone and for emergencies (take an edge's address out of DNS at once).
    """


@cli.command("list", epilog=ENVIRONMENT_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@transport_options
def list_command(as_json: bool, timeout_seconds: float, attempts: int, backoff_seconds: float) -> None:
    """Show every A record in the zone (all pages)."""
    dns = connect(timeout_seconds, attempts, backoff_seconds)
    records = sorted(dns.list_a_records(), key=lambda r: (str(r.get("name")), str(r.get("content"))))
    if as_json:
        fields = ("name", "type", "content", "proxied", "ttl", "id", "comment")
        click.echo(json.dumps([{key: r.get(key) for key in fields} for r in records], indent=2))
    elif records:
        click.echo(render_table(records))
    else:
        click.echo("no A records in the zone")


@cli.command("add", epilog=ENVIRONMENT_HELP)
@click.option("--ip", required=True, metavar="IP", callback=parse_ipv4,
              help="IPv4 address the record points to.")
@click.option("--name", metavar="NAME", callback=parse_fqdn,
              help="Fully qualified record name, e.g. blog.example.com (default: the zone apex).")
@transport_options
def add_command(ip: str, name: str | None, timeout_seconds: float, attempts: int,
                backoff_seconds: float) -> None:
    """Add an unproxied A record NAME -> IP, TTL 60.

    Without --name the record is for the zone apex (Cloudflare's "@"). The record's
    comment says "managed by kokoa-dns". Cloudflare refuses a record identical to one
    already there (error 81057).
    """
    dns = connect(timeout_seconds, attempts, backoff_seconds)
    record = dns.create_a_record(name or ZONE_APEX, ip)
    click.echo(f"added {_describe(record)}")
    if name is not None and record.get("name") not in (None, name):
        click.echo(f"note: Cloudflare stored the name as {record.get('name')} "
                   f"({name} is not inside the zone?)", err=True)


@cli.command("remove", epilog=ENVIRONMENT_HELP)
@click.option("--ip", required=True, metavar="IP", callback=parse_ipv4,
              help="Remove A records with this content.")
@click.option("--name", metavar="NAME", callback=parse_fqdn,
              help="Only records with this fully qualified name.")
@transport_options
def remove_command(ip: str, name: str | None, timeout_seconds: float, attempts: int,
                   backoff_seconds: float) -> None:
    """Remove every A record pointing to IP (only NAME's, with --name)."""
    dns = connect(timeout_seconds, attempts, backoff_seconds)
    # Filter again here: deleting is not undoable, and a proxy that drops the query
    # string would otherwise hand back every record in the zone.
    matches = [r for r in dns.list_a_records(name=name, content=ip)
               if r.get("type") == "A" and r.get("content") == ip
               and (name is None or str(r.get("name", "")).lower() == name)]
    if not matches:
        where = f" named {name}" if name else ""
        raise NothingMatched(f"no A record{where} points to {ip}; nothing removed")
    failures = []
    for record in matches:
        try:
            dns.delete_record(record["id"])
        except CloudflareApiError as exc:
            if exc.codes == (RECORD_NOT_FOUND,):
                click.echo(f"already gone {_describe(record)}")
                continue
            failures.append(f"{_describe(record)}: {exc.message}")
            continue
        click.echo(f"removed {_describe(record)}")
    if failures:
        raise CloudflareApiError(f"{len(failures)} of {len(matches)} records not removed:\n"
                                 + "\n".join(failures))


def main() -> None:
    cli(prog_name="kokoa-dns")


if __name__ == "__main__":
    main()
