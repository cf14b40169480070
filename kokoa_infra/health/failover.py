"""`kokoa health --failover`: take a failing edge's A records out of DNS and put them back when it passes.

Ownership (docs/dns.md "Automatic failover"): `pulumi up` creates and deletes the edges' A
records, as always. With `kokoa:dnsFailover: true` the program declares them with
`ignore_changes: [name, comment]`, and the agent owns exactly those two fields: it takes a
record out of DNS by renaming it to a parking name (`kokoa-out-<edge>.<domain>`) and puts it
back by renaming it to the domain. The record keeps its id, so a refreshed `pulumi up`
finds it, sees only ignored fields changed, and leaves it parked; a drained or removed
edge's record is deleted by the program as before, whatever its name. The agent never
creates or deletes an A record.

The records also carry the agents' votes, in their comment after the program's marker:
`kokoa edge edge-1 (stack prod); a=down; b=up; out=2025-05-01T03:00:00Z`. A record is
parked only when every agent that voted on it says down, and put back by an agent that
says up, so two agents never park and restore a record in turns.

Per name: an edge has one record for each name of its origin (`kokoa:origins[].hostnames`),
and each is counted, voted on, parked (`kokoa-out-<edge>.<that name>`) and put back on the
probe of that name through that edge, so an edge that fails one name keeps serving the others. Parking a hostname's
record happens under a lock made of a TXT record (`_kokoa-failover.<domain>`): Cloudflare
refuses a second identical record (81057), which makes creating it the one atomic step the
API offers; the holder re-reads the hostname's records and keeps at least one in DNS.

Decision rules (one sweep = one HTTPS probe per name through each edge, the end-to-end check):
- K (`--fail-after`) consecutive failed sweeps make this agent's vote `down`, M
  (`--recover-after`) consecutive passing sweeps make it `up`; a new agent votes `up` at
  its first passing sweep.
- When every edge of an origin fails a name in the same sweep, this checker's own network (or
  that name's application) is the likelier cause: the counts of that name stay as they were
  and a note says why.
- The last A record of a hostname is never parked; a drained edge (`dns: false`) or one no
  longer in the outputs is never put back.
- Every API failure is reported and nothing is believed done: the state is what the
  records say at the next read.

The agent's counts, votes and the changes counter are kept in a JSON state file written
atomically after every sweep, so a restart carries on where it stopped.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kokoa_infra.atomic_file import write_atomically
from kokoa_infra.cloudflare import CloudflareApiError, CloudflareDns
from kokoa_infra.health.results import Sweep, parse_timestamp, timestamp
from kokoa_infra.health.targets import Target

DEFAULT_FAIL_AFTER = 3
DEFAULT_RECOVER_AFTER = 3
DEFAULT_STATE_FILE = "/var/lib/kokoa-health/failover.json"
# 2: counts per edge and name (1 counted per edge: read as no counts, which K sweeps rebuild).
STATE_VERSION = 2
AGENT_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,15}")
# The program's marker (components.py: `kokoa edge NAME (stack STACK)`), then the agents' fields.
MARKER_RE = re.compile(r"kokoa edge (?P<edge>[a-z][a-z0-9-]{0,30}) \(stack (?P<stack>[^)]*)\)")
PARKED_PREFIX = "kokoa-out-"
LOCK_PREFIX = "_kokoa-failover."
LOCK_CONTENT = "kokoa failover lock"
# A lock older than this was left by an agent that died holding it: taken over.
LOCK_STALE_S = 120.0
DUPLICATE_RECORD = (81057, 81058)
UP, DOWN = "up", "down"


class FailoverError(Exception):
    """Failover cannot run with these outputs or options (exit 2)."""


def now_text(moment: datetime | None = None) -> str:
    return timestamp(moment or datetime.now(timezone.utc))


def default_agent_name() -> str:
    """This host's short name, cut to an agent name (letters, digits, hyphens, 16 at most)."""
    name = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return (name or "agent")[:16].rstrip("-") or "agent"


def agent_problem(name: str) -> str | None:
    if not AGENT_RE.fullmatch(name):
        return (f"{name!r} is not an agent name: 1 to 16 lower-case letters, digits and hyphens, "
                "starting with a letter or digit (it is written into the records' comments)")
    return None


def parked_name(edge: str, hostname: str) -> str:
    return f"{PARKED_PREFIX}{edge}.{hostname}"


def require_failover_on(outputs: dict[str, Any]) -> None:
    """Failover acts only on a stack whose program leaves the records' names to it."""
    if outputs.get("dnsFailover") is not True:
        raise FailoverError(
            "the stack does not set kokoa:dnsFailover: true (output `dnsFailover`), so the next "
            "`pulumi up` would put every removed record back: set it, run `pulumi up`, and refresh "
            "the outputs file")


# --- the records' comments --------------------------------------------------------------------

@dataclass
class EdgeRecord:
    """One of the program's A records as Cloudflare has it now."""

    id: str
    edge: str
    name: str
    content: str
    marker: str                      # the program's comment, kept as it is
    votes: dict[str, str]            # agent -> up | down
    out_since: str | None

    def comment(self) -> str:
        fields = [self.marker] + [f"{agent}={vote}" for agent, vote in sorted(self.votes.items())]
        if self.out_since:
            fields.append(f"out={self.out_since}")
        return "; ".join(fields)


def parse_record(record: dict[str, Any]) -> EdgeRecord | None:
    """The program's record with its votes; None for any other record."""
    comment = str(record.get("comment") or "")
    found = MARKER_RE.match(comment)
    if record.get("type") != "A" or not found:
        return None
    votes, out_since = {}, None
    for part in comment[found.end():].split(";"):
        key, _, value = part.strip().partition("=")
        if key == "out" and value:
            out_since = value
        elif AGENT_RE.fullmatch(key) and value in (UP, DOWN):
            votes[key] = value
    return EdgeRecord(id=str(record["id"]), edge=found["edge"], name=str(record.get("name", "")).lower(),
                      content=str(record.get("content", "")), marker=found.group(0), votes=votes,
                      out_since=out_since)


# --- the agent's own memory ---------------------------------------------------------------

@dataclass
class EdgeCount:
    fails: int = 0
    passes: int = 0
    vote: str | None = None


@dataclass
class AgentState:
    edges: dict[str, dict[str, EdgeCount]] = field(default_factory=dict)   # edge -> hostname -> count
    changes: int = 0

    def count(self, edge: str, hostname: str) -> EdgeCount:
        return self.edges.setdefault(edge, {}).setdefault(hostname, EdgeCount())

    def vote(self, edge: str, hostname: str) -> str | None:
        return self.edges.get(edge, {}).get(hostname, EdgeCount()).vote

    def document(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "changes": self.changes,
                "edges": {edge: {hostname: {"fails": c.fails, "passes": c.passes, "vote": c.vote}
                                 for hostname, c in sorted(names.items())}
                          for edge, names in sorted(self.edges.items())}}


def load_state(path: str) -> tuple[AgentState, str | None]:
    """The saved state; a fresh one (and why) when the file is missing or unreadable."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return AgentState(), None
    except (OSError, ValueError) as exc:
        return AgentState(), f"starting with no failover counts: cannot read {path}: {exc}"
    try:
        if document.get("version") != STATE_VERSION:
            raise ValueError(f"version {document.get('version')!r}")
        edges = {str(edge): {str(hostname): EdgeCount(int(c["fails"]), int(c["passes"]),
                                                       c["vote"] if c.get("vote") in (UP, DOWN) else None)
                             for hostname, c in names.items()}
                 for edge, names in document["edges"].items()}
        return AgentState(edges=edges, changes=int(document.get("changes", 0))), None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return AgentState(), f"starting with no failover counts: {path} is not a failover state file ({exc})"


# --- one sweep's outcome ----------------------------------------------------------------

@dataclass
class FailoverReport:
    agent: str
    events: list[str] = field(default_factory=list)       # changes made (also logged)
    notes: list[str] = field(default_factory=list)        # why something was not done
    errors: list[str] = field(default_factory=list)       # API failures: nothing believed done
    # (edge, hostname) -> hostname, address, since: the records parked
    removed: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    in_dns: set[tuple[str, str]] = field(default_factory=set)   # (edge, hostname) of the records in DNS
    changes: int = 0

    def document(self) -> dict[str, Any]:
        return {"agent": self.agent, "changes": self.changes,
                "removed": [{"edge": edge, **info} for (edge, _), info in sorted(self.removed.items())],
                "events": self.events, "notes": self.notes, "errors": self.errors}

    def out_of_dns(self) -> dict[str, str]:
        """edge name -> since when (one of) its records is out of DNS (the status page's mark)."""
        out: dict[str, str] = {}
        for (edge, _), info in sorted(self.removed.items()):
            out.setdefault(edge, info.get("since") or "?")
        return out


def prometheus_lines(report: FailoverReport) -> list[str]:
    """kokoa_failover_removed{edge,hostname} (1 out of DNS, 0 in) and the changes counter."""
    def labels(edge: str, hostname: str) -> str:
        return f'{{edge="{edge}",hostname="{hostname}"}}'
    lines = ["# HELP kokoa_failover_removed 1 while failover keeps the edge's A record out of DNS.",
             "# TYPE kokoa_failover_removed gauge"]
    rows = {key: 1 for key in report.removed} | {key: 0 for key in report.in_dns if key not in report.removed}
    lines += [f"kokoa_failover_removed{labels(edge, hostname)} {value}"
              for (edge, hostname), value in sorted(rows.items())]
    lines += ["# HELP kokoa_failover_changes_total Records this agent took out of DNS or put back.",
              "# TYPE kokoa_failover_changes_total counter",
              f'kokoa_failover_changes_total{{agent="{report.agent}"}} {report.changes}']
    return lines


# --- the agent ------------------------------------------------------------------------------

class FailoverAgent:
    """Counts each edge's sweeps, votes in its records, parks and restores them."""

    def __init__(self, dns: CloudflareDns, agent: str, state_file: str, fail_after: int = DEFAULT_FAIL_AFTER,
                 recover_after: int = DEFAULT_RECOVER_AFTER, log: Callable[[str], None] = print,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 between_read_and_park: Callable[[], None] = lambda: None) -> None:
        problem = agent_problem(agent)
        if problem:
            raise FailoverError(problem)
        self.dns, self.agent, self.state_file = dns, agent, state_file
        self.fail_after, self.recover_after = fail_after, recover_after
        self.log, self.clock = log, clock
        # Tests widen the race window here: after the re-read, before the rename.
        self.between_read_and_park = between_read_and_park
        self.said: set[str] = set()   # the notes of the last sweep, logged once while they hold
        self.state, warning = load_state(state_file)
        if warning:
            log(f"kokoa health: {warning}")

    # The whole of one sweep's failover work; never raises for an API failure.
    def after_sweep(self, sweep: Sweep) -> FailoverReport:
        report = FailoverReport(agent=self.agent)
        edges = {node.target.name: node for node in sweep.nodes if node.target.role == "edge"}
        self._count(sweep, report)
        try:
            records = [r for r in map(parse_record, self.dns.list_a_records()) if r is not None]
        except CloudflareApiError as exc:
            report.errors.append(f"reading the A records: {exc.message}")
        else:
            # This stack's edges' records, each with the name it is for.
            mine = [(r, hostname) for r in records if r.edge in edges
                    for hostname in [self._hostname_of(r, edges[r.edge].target)] if hostname is not None]
            self._vote(mine, report)
            self._restore(mine, edges, report)
            self._park(mine, report)
            self._describe(mine, report)
        report.changes = self.state.changes
        try:
            write_atomically(self.state_file, json.dumps(self.state.document(), indent=1) + "\n", 0o600)
        except OSError as exc:
            report.errors.append(f"cannot write {self.state_file}: {exc.strerror or exc}")
        for line in report.errors:
            self.log(f"kokoa health: failover: {line}")
        for line in report.notes:
            if line not in self.said:
                self.log(f"kokoa health: failover: {line}")
        self.said = set(report.notes)
        return report

    @staticmethod
    def _hostname_of(record: EdgeRecord, target: Target) -> str | None:
        """The name of the edge's origin the record is for (in DNS under it, or parked from it), or
        None when the record is not this edge's (another address, stack or name)."""
        if record.content != target.public_ip:
            return None
        return next((name for name in (n.lower() for n in target.names)
                     if record.name in (name, parked_name(target.name, name))), None)

    def _count(self, sweep: Sweep, report: FailoverReport) -> None:
        by_name: dict[tuple[str, str], list[tuple[str, bool]]] = {}   # (origin, name) -> (edge, passed)
        for node in sweep.nodes:
            if node.target.role == "edge":
                for name, https in node.https_by_name():
                    by_name.setdefault((node.target.origin, name.lower()), []).append((node.target.name, https.ok))
        for (origin, name), results in sorted(by_name.items()):
            if not any(passed for _, passed in results):
                report.notes.append(
                    f"every edge of {origin} fails from here for {name} ({', '.join(edge for edge, _ in results)}): "
                    "more likely this checker's own network; nothing removed, counts held")
                continue
            for edge, passed in results:
                count = self.state.count(edge, name)
                if passed:
                    count.passes, count.fails = count.passes + 1, 0
                    if count.vote is None or count.passes >= self.recover_after:
                        count.vote = UP
                else:
                    count.fails, count.passes = count.fails + 1, 0
                    if count.fails >= self.fail_after:
                        count.vote = DOWN

    def _event(self, report: FailoverReport, text: str) -> None:
        line = f"{now_text(self.clock())} kokoa-failover {text}"
        report.events.append(line)
        self.state.changes += 1
        self.log(line)

    def _vote(self, records: list[tuple[EdgeRecord, str]], report: FailoverReport) -> None:
        """Write this agent's vote into each of its records where it differs."""
        for record, hostname in records:
            vote = self.state.vote(record.edge, hostname)
            if vote is None or record.votes.get(self.agent) == vote:
                continue
            votes = {**record.votes, self.agent: vote}
            try:
                voted = EdgeRecord(**{**record.__dict__, "votes": votes})
                self.dns.patch_record(record.id, {"comment": voted.comment()})
            except CloudflareApiError as exc:
                report.errors.append(f"recording the vote on {record.edge}'s record of {hostname}: {exc.message}")
                continue
            record.votes = votes

    def _restore(self, records: list[tuple[EdgeRecord, str]], edges: dict[str, Any], report: FailoverReport) -> None:
        for record, hostname in records:
            if record.name == hostname or self.state.vote(record.edge, hostname) != UP:
                continue
            if edges[record.edge].target.drained:
                report.notes.append(f"{record.edge} passes but is drained (dns: false): left out of DNS; "
                                    "the next `pulumi up` deletes its record")
                continue
            try:
                back = EdgeRecord(**{**record.__dict__, "out_since": None})
                self.dns.patch_record(record.id, {"name": hostname, "comment": back.comment()})
            except CloudflareApiError as exc:
                report.errors.append(f"putting {record.edge}'s record of {hostname} back: {exc.message}")
                continue
            record.name, record.out_since = hostname, None
            self._event(report, f"restored {record.edge} ({record.content}) to {hostname}: "
                                f"https passed {self.recover_after} sweeps in a row")

    def _park(self, records: list[tuple[EdgeRecord, str]], report: FailoverReport) -> None:
        wanted: dict[str, list[EdgeRecord]] = {}
        for record, hostname in records:
            if record.name != hostname or self.state.vote(record.edge, hostname) != DOWN:
                continue
            waiting = sorted(agent for agent, vote in record.votes.items() if vote != DOWN)
            if waiting:
                report.notes.append(f"{record.edge} fails {hostname} from here; not removed while "
                                    f"{', '.join(waiting)} see{'s' if len(waiting) == 1 else ''} it up")
                continue
            wanted.setdefault(hostname, []).append(record)
        for hostname, candidates in sorted(wanted.items()):
            self._park_under_lock(hostname, sorted(candidates, key=lambda r: r.edge), report)

    def _park_under_lock(self, hostname: str, candidates: list[EdgeRecord], report: FailoverReport) -> None:
        lock = self._lock(hostname, report)
        if lock is None:
            return
        try:
            try:
                # Read again under the lock: what is in DNS now, whoever changed it meanwhile.
                live = [r for r in self.dns.list_a_records(name=hostname)
                        if str(r.get("name", "")).lower() == hostname]
            except CloudflareApiError as exc:
                report.errors.append(f"reading {hostname}'s records: {exc.message}")
                return
            self.between_read_and_park()
            live_ids = {str(r["id"]) for r in live}
            remaining = len(live_ids)
            for record in candidates:
                if record.id not in live_ids:
                    continue
                if remaining <= 1:
                    report.notes.append(f"{record.edge} fails but its record is the last of {hostname}: "
                                        "a name is never emptied")
                    continue
                since = now_text(self.clock())
                try:
                    self.dns.patch_record(record.id, {
                        "name": parked_name(record.edge, hostname),
                        "comment": EdgeRecord(**{**record.__dict__, "out_since": since}).comment()})
                except CloudflareApiError as exc:
                    report.errors.append(f"removing {record.edge}'s record of {hostname}: {exc.message}")
                    continue
                remaining -= 1
                record.name, record.out_since = parked_name(record.edge, hostname), since
                self._event(report, f"removed {record.edge} ({record.content}) from {hostname}: "
                                    f"https failed {self.fail_after} sweeps in a row")
        finally:
            self._unlock(lock, hostname, report)

    def _lock(self, hostname: str, report: FailoverReport) -> str | None:
        """The lock record's id, or None (with a note) when another agent holds it."""
        name = LOCK_PREFIX + hostname
        for _ in range(2):
            try:
                holder = f"kokoa failover agent {self.agent} at {now_text(self.clock())}"
                return str(self.dns.create_record("TXT", name, LOCK_CONTENT, holder)["id"])
            except CloudflareApiError as exc:
                if not set(exc.codes) & set(DUPLICATE_RECORD):
                    report.errors.append(f"taking the lock of {hostname}: {exc.message}")
                    return None
            try:
                held = [r for r in self.dns.list_records("TXT", name=name) if r.get("content") == LOCK_CONTENT]
            except CloudflareApiError as exc:
                report.errors.append(f"reading the lock of {hostname}: {exc.message}")
                return None
            stale = [r for r in held if self._lock_age(r) > LOCK_STALE_S]
            if not stale or len(stale) < len(held):
                report.notes.append(f"another agent is changing {hostname}'s records: trying again next sweep")
                return None
            for record in stale:
                try:
                    self.dns.delete_record(str(record["id"]))
                except CloudflareApiError:
                    pass   # someone else took it over first; the create below says who won
        report.notes.append(f"could not take the lock of {hostname}: trying again next sweep")
        return None

    def _lock_age(self, record: dict[str, Any]) -> float:
        found = re.search(r" at (\S+)$", str(record.get("comment") or ""))
        try:
            taken = parse_timestamp(found[1])
        except (TypeError, ValueError):
            return LOCK_STALE_S + 1   # not one of ours, or unreadable: treat as left behind
        return (self.clock() - taken).total_seconds()

    def _unlock(self, lock_id: str, hostname: str, report: FailoverReport) -> None:
        try:
            self.dns.delete_record(lock_id)
        except CloudflareApiError as exc:
            report.errors.append(f"releasing the lock of {hostname} (taken over after {LOCK_STALE_S:.0f} s): "
                                 f"{exc.message}")

    def _describe(self, records: list[tuple[EdgeRecord, str]], report: FailoverReport) -> None:
        for record, hostname in records:
            if record.name == hostname:
                report.in_dns.add((record.edge, hostname))
            else:
                report.removed[(record.edge, hostname)] = {"hostname": hostname, "address": record.content,
                                                           "since": record.out_since or "?"}
