"""The `kokoa health` command: ping every node and probe HTTPS through every edge, once or every N seconds."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import click

from kokoa_infra.atomic_file import write_atomically
from kokoa_infra.conventions import CONTEXT, STACK_ENVIRONMENT, CouldNotRun, epilog, stack_option
from kokoa_infra.health import failover as fo
from kokoa_infra.health.html import DEFAULT_HISTORY, MAX_HISTORY, StatusPage
from kokoa_infra.health.probes import (
    CHECKS,
    PingPermissionError,
    SweepOptions,
    check_ping_permission,
    fit_file_descriptors,
    run_sweep,
)
from kokoa_infra.health.report import (
    dumps,
    render_summary_line,
    render_table,
    render_traffic_table,
    statuses,
    statuses_from_document,
    sweep_document,
    transitions,
    write_textfile,
)
from kokoa_infra.health.results import Sweep, TrafficMemory, exit_code
from kokoa_infra.health.targets import LocalNetwork, Target, TargetsError, parse_targets, read_local_network
from kokoa_infra.health.traffic import METRICS_PORT, TRAFFIC_MODES
from kokoa_infra.outputs import OutputsError, load_outputs

CLEAR_SCREEN = "\x1b[H\x1b[2J"
RECENT_CHANGES_SHOWN = 10


class HealthError(CouldNotRun):
    """kokoa health could not run; exits 2 with the message (no traceback)."""


class StopRequested(Exception):
    """SIGTERM arrived: end the loop like Ctrl-C does."""


def parse_checks(_ctx: click.Context | None, _param: click.Parameter | None,
                 value: str) -> tuple[str, ...]:
    """'ping,https' -> ("ping", "https"); an unknown or empty name is a usage error (exit 2)."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHECKS]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown check {', '.join(map(repr, unknown)) or '(none given)'}: "
            f"choose from {', '.join(CHECKS)}, comma-separated")
    return tuple(check for check in CHECKS if check in names)


# The stack outputs `kokoa health` reads (`pulumi stack output NAME --json --show-secrets`).
HEALTH_OUTPUTS = ("healthTargets", "edges", "healthTokens")


def read_targets(stack: str | None, outputs_file: str | None) -> list[Target]:
    """The nodes from the stack outputs; HealthError with the reason when they cannot be had."""
    try:
        # The origins' public addresses and the health tokens are secret outputs; the bundles
        # are not asked for.
        return parse_targets(load_outputs(stack=stack, outputs_file=outputs_file, show_secrets=True,
                                          names=HEALTH_OUTPUTS))
    except (OutputsError, TargetsError) as exc:
        raise HealthError(str(exc)) from exc


def read_traffic_memory(status_file: str | None) -> TrafficMemory:
    """The edges' counters an earlier run recorded in the status file (rates from the first sweep)."""
    import json

    if status_file is None:
        return TrafficMemory()
    try:
        return TrafficMemory.from_status_document(json.loads(Path(status_file).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return TrafficMemory()


def read_previous_statuses(status_file: str | None) -> dict[str, str]:
    if status_file is None:
        return {}
    try:
        return statuses_from_document(Path(status_file).read_text(encoding="utf-8"))
    except OSError:
        return {}


@dataclass
class Reporter:
    """Where each sweep goes: stdout (table, live view, line or JSON), stderr, the files."""

    as_json: bool
    live: bool
    status_file: str | None
    prometheus_file: str | None
    previous: dict[str, str] | None   # None: no memory of earlier states, log no transitions
    interval_s: float | None = None
    status_page: StatusPage | None = None
    # --failover: acts on the sweep; its outcome joins the JSON, Prometheus text and page.
    failover: Callable[[Sweep], fo.FailoverReport] | None = None
    metrics_table: bool = False     # --metrics: the traffic table instead of the nodes table
    # Looked up when the Reporter is made, so a redirected sys.stdout is honoured.
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    def __post_init__(self) -> None:
        self.recent_changes: deque[str] = deque(maxlen=RECENT_CHANGES_SHOWN)

    def report(self, sweep: Sweep) -> list[str]:
        """Log transitions, print, write the files; return the files that could not be written."""
        if self.previous is not None:
            for line in transitions(self.previous, sweep):
                self.recent_changes.append(line)
                print(line, file=self.err, flush=True)
            self.previous = statuses(sweep)
        failover = self.failover(sweep) if self.failover is not None else None
        self.out.write(self._stdout_text(sweep, failover))
        self.out.flush()
        failed = []
        prometheus_extra = "" if failover is None else "\n".join(fo.prometheus_lines(failover)) + "\n"
        for path, render in ((self.status_file, lambda: dumps(self._document(sweep, failover), pretty=True)),):
            if path is None:
                continue
            try:
                write_atomically(path, render())
            except OSError as exc:
                failed.append(f"cannot write {path}: {exc.strerror or exc}")
        if self.prometheus_file is not None:
            try:   # the node series and the edges' traffic, through prometheus_client
                write_textfile(self.prometheus_file, sweep, prometheus_extra)
            except OSError as exc:
                failed.append(f"cannot write {self.prometheus_file}: {exc.strerror or exc}")
        if self.status_page is not None:
            if failover is not None:
                self.status_page.out_of_dns = failover.out_of_dns()
            page_failed, warnings = self.status_page.write(sweep)
            for warning in warnings:
                print(f"kokoa health: {warning}", file=self.err, flush=True)
            failed += page_failed
        return failed

    @staticmethod
    def _document(sweep: Sweep, failover: fo.FailoverReport | None) -> dict:
        document = sweep_document(sweep)
        if failover is not None:
            document["failover"] = failover.document()
        return document

    def _stdout_text(self, sweep: Sweep, failover: fo.FailoverReport | None = None) -> str:
        if self.as_json:
            return dumps(self._document(sweep, failover), pretty=self.interval_s is None)
        if self.metrics_table:
            prefix = f"{render_summary_line(sweep)}\n" if self.interval_s is not None else ""
            return (CLEAR_SCREEN if self.live and self.interval_s is not None else "") + prefix + \
                render_traffic_table(sweep)
        if self.interval_s is None:
            return render_table(sweep)
        if not self.live:
            return render_summary_line(sweep) + "\n"
        footer = f"next sweep in {self.interval_s:g} s · Ctrl-C to stop\n"
        changes = ("\nrecent changes:\n" + "\n".join(self.recent_changes) + "\n"
                   if self.recent_changes else "")
        return CLEAR_SCREEN + "kokoa health\n\n" + render_table(sweep) + changes + footer


class NodeList:
    """The targets for the next sweep, re-read every time so added or removed nodes show up."""

    def __init__(self, stack: str | None, outputs_file: str | None, targets: list[Target]) -> None:
        self.stack, self.outputs_file, self.targets = stack, outputs_file, targets
        self.last_error = ""
        self.just_read = True   # the first sweep uses the list read at start-up

    def refresh(self) -> list[Target]:
        """The current targets; on a read error, say so once and keep the last good list."""
        if self.just_read:
            self.just_read = False
            return self.targets
        try:
            self.targets = read_targets(self.stack, self.outputs_file)
            self.last_error = ""
        except HealthError as exc:
            if exc.message != self.last_error:
                print(f"kokoa health: keeping the last node list: {exc.message}",
                      file=sys.stderr, flush=True)
            self.last_error = exc.message
        return self.targets


def make_failover_agent(stack: str | None, outputs_file: str | None, agent: str, state_file: str,
                        fail_after: int, recover_after: int) -> fo.FailoverAgent:
    """The failover agent, once the stack says it owns the records' names and the API is configured."""
    import os

    from kokoa_infra.cloudflare import CloudflareDns, ConfigError, RetryPolicy, read_settings

    try:
        fo.require_failover_on(load_outputs(stack=stack, outputs_file=outputs_file, names=("dnsFailover",)))
        dns = CloudflareDns(read_settings(os.environ), RetryPolicy(), user_agent="kokoa-health-failover")
        return fo.FailoverAgent(dns, agent, state_file, fail_after, recover_after,
                                log=lambda line: print(line, file=sys.stderr, flush=True))
    except (OutputsError, fo.FailoverError, ConfigError) as exc:
        raise HealthError(f"--failover: {exc}") from exc


def run_interval(sweep_once: Callable[[], Sweep], report: Callable[[Sweep], None],
                 interval_s: float, stop: threading.Event,
                 max_sweeps: int | None = None) -> int:
    """Sweep every `interval_s` seconds (start to start) until Ctrl-C, SIGTERM or `stop`; return 0."""
    def request_stop(_signum: int, _frame: object) -> None:
        raise StopRequested()

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, request_stop) if on_main_thread else None
    sweeps = 0
    try:
        while not stop.is_set() and (max_sweeps is None or sweeps < max_sweeps):
            started = time.monotonic()
            report(sweep_once())
            sweeps += 1
            stop.wait(max(0.0, interval_s - (time.monotonic() - started)))
    except (KeyboardInterrupt, StopRequested):
        pass
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return 0


@click.command(context_settings=CONTEXT, epilog=epilog(
    "some node is unhealthy", "the outputs cannot be read, no ICMP socket can be opened, or a file cannot be "
    "written", STACK_ENVIRONMENT, done="every node is healthy"))
@click.option("--once", is_flag=True, help="Check every node once and exit (the default).")
@click.option("--interval", type=click.FloatRange(min=1.0), metavar="SECONDS",
              help="Check every SECONDS seconds until Ctrl-C or SIGTERM.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the JSON document (one line per sweep with --interval).")
@click.option("--status-file", metavar="FILE", help="Write the JSON document to FILE atomically.")
@click.option("--prometheus", "prometheus_file", metavar="FILE",
              help="Write node-exporter textfile metrics to FILE (name it *.prom) atomically.")
@click.option("--html", "html_file", metavar="FILE",
              help="Write a self-contained status page to FILE atomically every sweep "
                   "(its history goes to FILE.history.json).")
@click.option("--html-history", type=click.IntRange(1, MAX_HISTORY), default=DEFAULT_HISTORY,
              show_default=True, metavar="N", help="Sweeps shown in the page's history strips.")
@click.option("--html-interval", type=click.FloatRange(min=1.0), metavar="SECONDS",
              help="How often the page is rewritten (a timer's period): it shows itself stale after "
                   "3 of these. Default: --interval, else measured from the recorded sweeps.")
@click.option("--html-show-origin-addresses", is_flag=True,
              help="Show the origins' public addresses on the page (hidden by default).")
@stack_option("Read this stack's outputs with `pulumi stack output`")
@click.option("--outputs", "outputs_file", metavar="FILE",
              help="Read the outputs from FILE (JSON holding healthTargets, from "
                   "`pulumi stack output --json --show-secrets`).")
@click.option("--checks", default="ping,https", show_default=True, callback=parse_checks,
              help="Checks to run, comma-separated: ping, https.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.05, 60), default=1.0,
              show_default=True, metavar="SECONDS", help="Wait this long for each echo reply.")
@click.option("--count", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Echo requests per node; one reply makes ping ok.")
@click.option("--https-timeout", "https_timeout_s", type=click.FloatRange(0.1, 120), default=5.0,
              show_default=True, metavar="SECONDS", help="Connect and read timeout of the HTTPS probe.")
@click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Trust these CA certificates (PEM) instead of the system's.")
@click.option("--concurrency", type=click.IntRange(1, 4096), default=256, show_default=True,
              help="Pings in flight at once.")
@click.option("--https-concurrency", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="HTTPS probes in flight at once.")
@click.option("--traffic", type=click.Choice(TRAFFIC_MODES), default="auto", show_default=True,
              help="Scrape the edges' traffic metrics over the tunnel (port %d): auto = the edges "
                   "this host reaches through a tunnel (on an origin, its own)." % METRICS_PORT)
@click.option("--metrics", "metrics_table", is_flag=True,
              help="Print the edges' traffic as a table (requests, refusals, 5xx, per second "
                   "from the second sweep on, or against --status-file's last run) instead of the nodes.")
@click.option("--ping-via", type=click.Choice(["auto", "wireguard", "public"]), default="auto",
              show_default=True,
              help="Address to ping: auto = WireGuard IP when this host is on its tunnel network.")
@click.option("--failover", is_flag=True,
              help="Take a failing edge's A records out of DNS and put them back when it passes "
                   "(needs kokoa:dnsFailover: true and CLOUDFLARE_API_TOKEN, CLOUDFLARE_ZONE_ID; docs/dns.md).")
@click.option("--fail-after", type=click.IntRange(1, 100), default=fo.DEFAULT_FAIL_AFTER, show_default=True,
              metavar="K", help="With --failover: consecutive failed HTTPS sweeps before an edge leaves DNS.")
@click.option("--recover-after", type=click.IntRange(1, 100), default=fo.DEFAULT_RECOVER_AFTER,
              show_default=True, metavar="M",
              help="With --failover: consecutive passing sweeps before it is put back.")
@click.option("--failover-state", metavar="FILE", default=fo.DEFAULT_STATE_FILE, show_default=True,
              help="With --failover: the agent's counts, kept across restarts (written atomically).")
@click.option("--agent", metavar="NAME", default=None,
              help="With --failover: this agent's name in the records' votes (default: the host name).")
def health(once: bool, interval: float | None, as_json: bool, status_file: str | None,
           prometheus_file: str | None, html_file: str | None, html_history: int,
           html_interval: float | None, html_show_origin_addresses: bool,
           stack: str | None, outputs_file: str | None,
           checks: tuple[str, ...], timeout_s: float, count: int, https_timeout_s: float,
           ca_bundle: str | None, concurrency: int, https_concurrency: int, traffic: str,
           metrics_table: bool, ping_via: str,
           failover: bool = False, fail_after: int = fo.DEFAULT_FAIL_AFTER,
           recover_after: int = fo.DEFAULT_RECOVER_AFTER, failover_state: str = fo.DEFAULT_STATE_FILE,
           agent: str | None = None) -> None:
    """Ping every node and probe HTTPS through every edge.

    The result goes to stdout (a table, a line per sweep, or JSON); state changes and
    problems to stderr.
    """
    if once and interval is not None:
        raise click.UsageError("give --once or --interval, not both")
    if stack and outputs_file:
        raise click.UsageError("give --stack or --outputs, not both")
    if html_file is None and (html_interval is not None or html_show_origin_addresses):
        raise click.UsageError("--html-interval and --html-show-origin-addresses need --html FILE")
    page = None if html_file is None else StatusPage(
        html_file, history_limit=html_history, interval_s=html_interval or interval,
        show_origin_addresses=html_show_origin_addresses)
    options = fit_file_descriptors(SweepOptions(
        checks=checks, timeout_s=timeout_s, count=count, https_timeout_s=https_timeout_s,
        ca_bundle=ca_bundle, concurrency=concurrency, https_concurrency=https_concurrency,
        ping_via=ping_via, traffic=traffic))  # type: ignore[arg-type]
    if metrics_table and as_json:
        raise click.UsageError("give --metrics or --json, not both")
    if metrics_table and traffic == "off":
        raise click.UsageError("--metrics needs the traffic: not --traffic off")
    failover_given = [name for name, given in (
        ("--fail-after", fail_after != fo.DEFAULT_FAIL_AFTER),
        ("--recover-after", recover_after != fo.DEFAULT_RECOVER_AFTER),
        ("--failover-state", failover_state != fo.DEFAULT_STATE_FILE), ("--agent", agent is not None)) if given]
    if failover_given and not failover:
        raise click.UsageError(f"{', '.join(failover_given)} need{'s' if len(failover_given) == 1 else ''} --failover")
    if failover and "https" not in checks:
        raise click.UsageError("--failover decides on the HTTPS probe: keep https in --checks")
    if agent is not None and fo.agent_problem(agent):
        raise click.BadParameter(fo.agent_problem(agent), param_hint="--agent")
    targets = read_targets(stack, outputs_file)
    failover_agent = make_failover_agent(stack, outputs_file, agent or fo.default_agent_name(),
                                         failover_state, fail_after, recover_after) if failover else None
    if "ping" in checks:
        try:
            check_ping_permission()
        except PingPermissionError as exc:
            raise HealthError(str(exc)) from exc

    def local_network() -> LocalNetwork:
        if ("ping" in checks and ping_via == "auto") or traffic == "auto":
            return read_local_network()
        return LocalNetwork(addresses={}, routes=())

    # Without a status file a single run has nothing to compare with, so it logs no transitions.
    remembers = interval is not None or status_file is not None
    reporter = Reporter(as_json=as_json, live=sys.stdout.isatty(), status_file=status_file,
                        prometheus_file=prometheus_file, interval_s=interval, status_page=page,
                        previous=read_previous_statuses(status_file) if remembers else None,
                        failover=None if failover_agent is None else failover_agent.after_sweep,
                        metrics_table=metrics_table)
    memory = read_traffic_memory(status_file)
    if interval is None:
        try:
            sweep = memory.apply(run_sweep(targets, options, local_network()))
        except KeyboardInterrupt:
            raise HealthError("interrupted before the sweep finished") from None
        failed = reporter.report(sweep)
        if failed:
            raise HealthError("; ".join(failed))
        sys.exit(exit_code(sweep))

    node_list = NodeList(stack, outputs_file, targets)

    def sweep_once() -> Sweep:
        return memory.apply(run_sweep(node_list.refresh(), options, local_network()))

    def report(sweep: Sweep) -> None:
        for problem in reporter.report(sweep):
            print(f"kokoa health: {problem}", file=sys.stderr, flush=True)

    sys.exit(run_interval(sweep_once, report, interval, threading.Event()))

