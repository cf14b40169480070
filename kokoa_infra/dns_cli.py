"""`kokoa-dns`: list, add and remove a zone's Cloudflare A records by hand (the emergency tool beside Pulumi)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import click

# The API client lives in kokoa_infra.cloudflare (shared with failover and the lab); these
# names stay importable from here for the tests and scripts that use them.
from kokoa_infra.cloudflare import (  # noqa: F401
    DEFAULT_API_BASE_URL,
    MAX_PAGES,
    MAX_WAIT_SECONDS,
    PAGE_SIZE,
    RECORD_COMMENT,
    RECORD_NOT_FOUND,
    ApiSettings,
    CloudflareApiError,
    CloudflareDns,
    ConfigError,
    NothingMatched,
    RetryPolicy,
    read_settings,
)
from kokoa_infra.conventions import CONTEXT, epilog
from kokoa_infra.tables import format_table
from kokoa_infra.values import DOMAIN_RE, ipv4_problem
from kokoa_infra.values import parse_ipv4 as canonical_ipv4_address

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
