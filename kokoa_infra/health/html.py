"""`kokoa health --html`: a self-contained status page rewritten every sweep, and the short history beside it."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from kokoa_infra.atomic_file import write_atomically
from kokoa_infra.health.results import NodeResult, Sweep, milliseconds, origin_traffic, parse_timestamp, timestamp
from kokoa_infra.health.traffic import ATTACK_REFUSED_PER_S, Rates
from kokoa_infra.templating import TEMPLATES_DIR, environment

SERVING, DRAINED, UNHEALTHY = "serving", "drained", "unhealthy"
STATE_LETTERS = {SERVING: "s", DRAINED: "d", UNHEALTHY: "u"}
STATE_OF_LETTER = {letter: state for state, letter in STATE_LETTERS.items()}
STATE_SYMBOLS = {SERVING: "\u2713", DRAINED: "\u2013", UNHEALTHY: "\u2717"}   # ✓ – ✗
DEFAULT_HISTORY = 48
MAX_HISTORY = 1000
STALE_AFTER_INTERVALS = 3
DEFAULT_INTERVAL_S = 60.0   # before two sweeps are recorded, with no --interval/--html-interval
MIN_REFRESH_S = 10
CERT_WARNING_DAYS = 14      # certbot renews at 30 days left: under 14, renewal is failing
HISTORY_SUFFIX = ".history.json"
HISTORY_VERSION = 1
HIDDEN = "hidden"


def node_state(node: NodeResult) -> str:
    """unhealthy (a check failed) before drained (no A record, still running) before serving."""
    if not node.healthy:
        return UNHEALTHY
    return DRAINED if node.target.drained else SERVING


# --- history -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeHistory:
    """One node's recent states: `strip` has a letter per sweep (oldest first), ending with the last."""

    state: str
    since: str          # checkedAt of the first sweep that saw this state
    first_seen: bool    # `since` is when the node was first seen: the state may be older
    strip: str


# One sweep's traffic of an edge, or of an origin's edges together: requests/s, refused/s,
# 5xx/s, and the origin's median and 99th percentile response time in seconds (None: no answer).
TrafficPoint = tuple[float, float, float, float | None, float | None]


@dataclass(frozen=True)
class History:
    """The last sweeps (checkedAt, durationMs) and every current node's strip; bounded by `limit`.
    `traffic`: per edge and per origin ("origin/<name>") a point per sweep, oldest first, None
    where its traffic was not known (not scraped, or the first scrape)."""

    sweeps: tuple[tuple[str, float], ...] = ()
    nodes: dict[str, NodeHistory] | None = None
    traffic: dict[str, tuple[TrafficPoint | None, ...]] | None = None

    def node(self, key: str) -> NodeHistory | None:
        return (self.nodes or {}).get(key)


def update_history(history: History, sweep: Sweep, limit: int) -> History:
    """Add the sweep; keep the last `limit` sweeps and only the nodes this sweep saw."""
    at = timestamp(sweep.checked_at)
    nodes: dict[str, NodeHistory] = {}
    for node in sweep.nodes:
        state, before = node_state(node), history.node(node.key)
        strip = ((before.strip if before else "") + STATE_LETTERS[state])[-limit:]
        if before is not None and before.state == state:
            nodes[node.key] = NodeHistory(state, before.since, before.first_seen, strip)
        else:
            nodes[node.key] = NodeHistory(state, at, before is None, strip)
    sweeps = (history.sweeps + ((at, round(sweep.duration_s * 1000, 1)),))[-limit:]
    return History(sweeps=sweeps, nodes=nodes, traffic=_update_traffic(history, sweep, limit))


def _point(rates: Rates | None) -> TrafficPoint | None:
    if rates is None:
        return None
    seconds = rates.upstream_seconds
    return (round(rates.requests_per_s, 3), round(rates.refused_per_s, 3), round(rates.errors_per_s, 3),
            None if 0.5 not in seconds else round(seconds[0.5], 6),
            None if 0.99 not in seconds else round(seconds[0.99], 6))


def _update_traffic(history: History, sweep: Sweep, limit: int) -> dict[str, tuple[TrafficPoint | None, ...]]:
    """Each edge whose traffic was asked for, and each origin of them: this sweep's point added."""
    now: dict[str, TrafficPoint | None] = {}
    for node in sweep.nodes:
        if node.target.role == "edge" and node.traffic is not None:
            now[node.key] = _point(node.traffic.rates if node.traffic.ok else None)
    for origin, total in origin_traffic(sweep).items():
        now[f"origin/{origin}"] = _point(total.rates)
    before = history.traffic or {}
    return {key: (before.get(key, ()) + (point,))[-limit:] for key, point in now.items()}


def history_document(history: History) -> dict[str, Any]:
    return {"version": HISTORY_VERSION,
            "sweeps": [{"checkedAt": at, "durationMs": ms} for at, ms in history.sweeps],
            "nodes": {key: {"state": node.state, "since": node.since, "firstSeen": node.first_seen,
                            "strip": node.strip}
                      for key, node in (history.nodes or {}).items()},
            # One short string per sweep ("requests/s refused/s 5xx/s p50 p99", "-" unknown):
            # the file stays small with a thousand sweeps.
            "traffic": {key: [_point_text(point) for point in points]
                        for key, points in (history.traffic or {}).items()}}


def _point_text(point: TrafficPoint | None) -> str:
    if point is None:
        return "-"
    return " ".join("-" if value is None else f"{value:g}" for value in point)


def parse_history(text: str) -> History:
    """The history file's content; ValueError when it is not one this version wrote."""
    try:
        document = json.loads(text)
        if document.get("version") != HISTORY_VERSION:
            raise ValueError(f"unknown version {document.get('version')!r}")
        sweeps = tuple((str(entry["checkedAt"]), float(entry["durationMs"]))
                       for entry in document["sweeps"])
        for at, _ in sweeps:
            parse_timestamp(at)
        nodes = {}
        for key, entry in document["nodes"].items():
            strip = str(entry["strip"])
            if entry["state"] not in STATE_LETTERS or not set(strip) <= set(STATE_OF_LETTER):
                raise ValueError(f"bad state in {key!r}")
            parse_timestamp(entry["since"])
            nodes[str(key)] = NodeHistory(entry["state"], entry["since"], bool(entry["firstSeen"]),
                                          strip)
        traffic = {str(key): tuple(_parse_point(str(point)) for point in points)
                   for key, points in document.get("traffic", {}).items()}
        return History(sweeps=sweeps, nodes=nodes, traffic=traffic)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"missing or malformed {exc}") from exc


def _parse_point(text: str) -> TrafficPoint | None:
    if text == "-":
        return None
    requests, refused, errors, p50, p99 = text.split()
    return (float(requests), float(refused), float(errors), None if p50 == "-" else float(p50),
            None if p99 == "-" else float(p99))


def measured_interval(history: History) -> float | None:
    """The median time between the recorded sweeps (a timer's or cron's period), if two exist."""
    moments = [parse_timestamp(at) for at, _ in history.sweeps[-11:]]
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(moments, moments[1:])]
    gaps = [gap for gap in gaps if gap > 0]
    return statistics.median(gaps) if gaps else None


# --- the page ----------------------------------------------------------------------------------

PAGE_TEMPLATE = "health/status.html.j2"
STYLE = (TEMPLATES_DIR / "health" / "status.css").read_text(encoding="utf-8").strip()
# Ages the page against the reader's clock: the `stale` class and the age line. Everything it
# needs is in the page (data-* attributes); it loads nothing and the CSP admits only its hash.
SCRIPT = (TEMPLATES_DIR / "health" / "status.js").read_text(encoding="utf-8").strip()


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Nothing may load: no image, font, frame, connection or form target; only this style and script.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src {_csp_hash(STYLE)}; "
                           f"script-src {_csp_hash(SCRIPT)}; base-uri 'none'; form-action 'none'")
_ENV = environment(html=True)


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _ms(value: float) -> str:
    return milliseconds(value, unit="\u00a0ms")   # never split from its unit


def _interval_text(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 120 else _duration(seconds)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


class _Redactor:
    """Hides the origins' public addresses (endpoints) from every text on the page unless allowed."""

    def __init__(self, sweep: Sweep, show: bool) -> None:
        secrets = set() if show else {node.target.public_ip for node in sweep.nodes
                                      if node.target.role == "origin"}
        # Whole addresses or names only: 10.0.0.1 must not eat into an edge's 10.0.0.12.
        self.pattern = re.compile("|".join(rf"(?<![\w.-]){re.escape(secret)}(?![\w-]|\.\w)"
                                           for secret in sorted(secrets, key=len, reverse=True)))

    def __call__(self, text: str) -> str:
        return self.pattern.sub("[origin address hidden]", text) if self.pattern.pattern else text


@dataclass(frozen=True)
class _Section:
    origin: str
    domain: str
    nodes: list[NodeResult]


def _sections(nodes: Iterable[NodeResult]) -> list[_Section]:
    """One section per origin, in first-seen order: the origin first, then its edges as listed."""
    grouped: dict[str, _Section] = {}
    for node in nodes:
        section = grouped.setdefault(node.target.origin,
                                     _Section(node.target.origin, node.target.domain, []))
        section.nodes.append(node)
    for section in grouped.values():
        section.nodes.sort(key=lambda node: node.target.role != "origin")   # stable
    return list(grouped.values())


# What the template shows, cell by cell: plain values, the markup is the template's.

def _strip(history: NodeHistory | None, sweeps: tuple[tuple[str, float], ...]) -> dict | None:
    if history is None:
        return None
    strip = history.strip
    times = [at for at, _ in sweeps][-len(strip):] if sweeps else []
    times = [""] * (len(strip) - len(times)) + times
    runs: list[list[Any]] = []   # [letter, sweeps, checkedAt of the first]
    for letter, at in zip(strip, times):
        if runs and runs[-1][0] == letter:
            runs[-1][1] += 1
        else:
            runs.append([letter, 1, at])
    label = (f"Last {_plural(len(strip), 'sweep')}, oldest first: "
             + ", then ".join(f"{count} {STATE_OF_LETTER[letter]}" + (f" from {at[11:19]}" if at else "")
                              for letter, count, at in runs) + " (UTC)")
    # One bare element per sweep (a big stack has thousands); the label carries the times.
    return {"label": label, "letters": strip}


def _ping(node: NodeResult, address_shown: bool) -> dict | None:
    ping = node.ping
    if ping is None:
        return None
    shown = ping.address if (address_shown or ping.via == "wireguard") else "address hidden"
    return {"rtt": _ms(ping.rtt_ms) if ping.ok and ping.rtt_ms is not None else None,
            "partial": f"{ping.received}/{ping.sent} replies" if ping.ok and ping.received < ping.sent else None,
            "via": ping.via, "address": shown}


def _https(node: NodeResult, redact: _Redactor) -> dict:
    https = node.https
    if https is None:
        return {"absent": "not probed (origin)" if node.target.role == "origin" else "not checked"}
    return {"absent": None, "code": https.code, "ok": https.ok,
            "latency": _ms(https.latency_ms) if https.latency_ms is not None else None,
            "error": redact(https.error) if https.error else None}


def _certificate(node: NodeResult) -> dict:
    days = None if node.https is None else node.https.cert_days_left
    if days is None:
        return {"level": "none"}
    if days < 0:
        return {"level": "failed", "text": f"expired {_plural(-days, 'day')} ago"}
    if days < CERT_WARNING_DAYS:
        return {"level": "warn", "text": f"{_plural(days, 'day')} left"}
    return {"level": "ok", "text": f"{days} days left"}


def _since(recorded: NodeHistory | None, checked_at: datetime) -> dict | None:
    if recorded is None:
        return None
    since = parse_timestamp(recorded.since)
    return {"duration": _duration((checked_at - since).total_seconds()),
            "word": "first seen" if recorded.first_seen else "since", "at": recorded.since,
            "shown": since.strftime("%H:%M:%S UTC" if since.date() == checked_at.date() else "%Y-%m-%d %H:%M UTC")}


def _node_row(node: NodeResult, index: int, history: History, checked_at: datetime,
              redact: _Redactor, show_origin_addresses: bool, out_of_dns: dict[str, str]) -> dict:
    target = node.target
    address_shown = show_origin_addresses or target.role != "origin"
    role = target.role + (" \u00b7 drained (no A record)" if target.drained else "")
    if target.role == "edge" and target.name in out_of_dns:
        role += f" \u00b7 out of DNS since {out_of_dns[target.name]} (failover)"
    if address_shown:
        role += f" \u00b7 {target.public_ip}"
    state = node_state(node)
    recorded = history.node(node.key)
    return {"index": index, "key": node.key, "name": target.name, "role": role, "state": state,
            "symbol": STATE_SYMBOLS[state], "reasons": [redact(reason) for reason in node.problems(with_address=False)],
            "ping": _ping(node, address_shown), "https": _https(node, redact), "cert": _certificate(node),
            "since": _since(recorded, checked_at), "history": _strip(recorded, history.sweeps)}


CHART_WIDTH, CHART_HEIGHT = 240, 44


def _rate_text(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _chart(points: tuple[TrafficPoint | None, ...], what: str) -> dict | None:
    """requests/s, refused/s and 5xx/s over the recorded sweeps as an inline SVG (no asset), with
    its figures in words for screen readers."""
    known = [p for p in points if p is not None]
    if not known:
        return None
    top = max(max(p[0], p[1], p[2]) for p in known) or 1.0
    step = CHART_WIDTH / max(len(points) - 1, 1)
    lines = []
    for series, css in ((0, "req"), (1, "ref"), (2, "err")):
        runs: list[list[str]] = [[]]
        for index, point in enumerate(points):
            if point is None:
                runs.append([])
                continue
            x = index * step if len(points) > 1 else CHART_WIDTH / 2
            y = CHART_HEIGHT - 2 - (CHART_HEIGHT - 4) * point[series] / top
            runs[-1].append(f"{x:.1f},{y:.1f}")
        for run in runs:
            if len(run) == 1:   # a lone point: a short dash, so that it shows
                x, y = map(float, run[0].split(","))
                run = [f"{max(0, x - 2):.1f},{y:.1f}", f"{min(CHART_WIDTH, x + 2):.1f},{y:.1f}"]
            if run:
                lines.append({"css": css, "points": " ".join(run)})
    last = known[-1]
    label = f"{what}, last {len(points)} sweeps: " + "; ".join(
        f"{name} per second up to {_rate_text(max(p[series] for p in known))}, now {_rate_text(last[series])}"
        for series, name in enumerate(("requests", "refused", "5xx")))
    return {"width": CHART_WIDTH, "height": CHART_HEIGHT, "lines": lines, "label": label, "top": _rate_text(top)}


def _under_attack(points: tuple[TrafficPoint | None, ...]) -> bool:
    return bool(points) and points[-1] is not None and points[-1][1] >= ATTACK_REFUSED_PER_S


def _traffic_row(key: str, name: str, sub: str, history: History, node: NodeResult | None) -> dict:
    points = (history.traffic or {}).get(key, ())
    last = points[-1] if points else None
    traffic = node.traffic if node is not None else None
    rates = None if last is None else {
        "requests": _rate_text(last[0]), "refused": _rate_text(last[1]), "errors": _rate_text(last[2]),
        "p50": None if last[3] is None else _ms(last[3] * 1000),
        "p99": None if last[4] is None else _ms(last[4] * 1000)}
    return {"key": key, "name": name, "sub": sub, "attack": _under_attack(points),
            "unscraped": (traffic.error or "") if traffic is not None and not traffic.ok else None,
            "rates": rates, "chart": _chart(points, f"{name} traffic")}


def _traffic_table(section: _Section, history: History) -> dict | None:
    edges = [node for node in section.nodes if node.target.role == "edge" and node.traffic is not None]
    if not edges:
        return None
    origin_key = f"origin/{section.origin}"
    points = (history.traffic or {}).get(origin_key, ())
    rows = [_traffic_row(origin_key, section.origin, f"all {len(edges)} edges", history, None)]
    rows += [_traffic_row(node.key, node.target.name, "edge", history, node) for node in edges]
    return {"rows": rows, "attack": _under_attack(points), "sweeps": len(points) or 1}


def _section(section: _Section, index_of: dict[int, int], history: History, sweep: Sweep, redact: _Redactor,
             show_origin_addresses: bool, out_of_dns: dict[str, str]) -> dict:
    edges = [node for node in section.nodes if node.target.role == "edge"]
    serving = sum(node_state(node) == SERVING for node in edges)
    return {"origin": section.origin, "domain": section.domain, "serving": serving, "edges": len(edges),
            "none_serving": bool(edges) and not serving,
            "detail": ", ".join(f"{count} {state}" for state in (DRAINED, UNHEALTHY)
                                if (count := sum(node_state(node) == state for node in edges))),
            "rows": [_node_row(node, index_of[id(node)], history, sweep.checked_at, redact,
                               show_origin_addresses, out_of_dns) for node in section.nodes],
            "traffic": _traffic_table(section, history)}


def render_page(sweep: Sweep, history: History, interval_s: float,
                show_origin_addresses: bool = False, out_of_dns: dict[str, str] | None = None) -> str:
    """The whole page: inline style and script only, nothing fetched from anywhere."""
    redact = _Redactor(sweep, show_origin_addresses)
    stale_after_s = STALE_AFTER_INTERVALS * interval_s
    states = [node_state(node) for node in sweep.nodes]
    unhealthy = [(index, node) for index, node in enumerate(sweep.nodes) if states[index] == UNHEALTHY]
    total = len(sweep.nodes)
    if unhealthy:
        overall = f"{STATE_SYMBOLS[UNHEALTHY]} {len(unhealthy)} of {total} nodes unhealthy"
        title = f"Kokoa status: {len(unhealthy)} of {total} unhealthy"
    else:
        overall = f"{STATE_SYMBOLS[SERVING]} all {total} nodes healthy"
        title = f"Kokoa status: all {total} healthy"
    index_of = {id(node): index for index, node in enumerate(sweep.nodes)}
    page = {
        "csp": CONTENT_SECURITY_POLICY, "style": STYLE, "script": SCRIPT, "title": title, "overall": overall,
        "refresh_s": max(MIN_REFRESH_S, round(interval_s)),
        "generated_at": timestamp(sweep.checked_at + timedelta(seconds=sweep.duration_s)),
        "stale_after_s": f"{stale_after_s:g}", "stale_after": _interval_text(stale_after_s),
        "interval": _interval_text(interval_s),
        "unhealthy": [{"index": index, "key": node.key, "text": redact("; ".join(node.problems(with_address=False)))}
                      for index, node in unhealthy],
        "checked_at": timestamp(sweep.checked_at), "checked_at_text": _utc(sweep.checked_at),
        "duration": f"{sweep.duration_s:.2f}", "checks": ", ".join(sweep.checks) or "none",
        "counts": {state: states.count(state) for state in (SERVING, DRAINED, UNHEALTHY)},
        "recorded": len(history.sweeps), "has_traffic": bool(history.traffic),
        "sections": [_section(section, index_of, history, sweep, redact, show_origin_addresses, out_of_dns or {})
                     for section in _sections(sweep.nodes)],
        "attack_threshold": f"{ATTACK_REFUSED_PER_S:g}",
    }
    return _ENV.get_template(PAGE_TEMPLATE).render(page=page)


# --- writing it every sweep --------------------------------------------------------------------

@dataclass
class StatusPage:
    """Where `--html` writes: the page at `path`, its history at path + ".history.json"."""

    path: str
    history_limit: int = DEFAULT_HISTORY
    interval_s: float | None = None     # --html-interval, else --interval; None: measured
    show_origin_addresses: bool = False

    def __post_init__(self) -> None:
        self.history: History | None = None   # read from the file at the first sweep
        self.out_of_dns: dict[str, str] = {}   # edge -> since when failover keeps it out of DNS

    @property
    def history_path(self) -> str:
        return self.path + HISTORY_SUFFIX

    def load_history(self) -> tuple[History, str | None]:
        """The recorded history; an empty one (and a warning) when the file is unreadable."""
        try:
            text = Path(self.history_path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return History(), None
        except OSError as exc:
            return History(), f"starting a new history: cannot read {self.history_path}: {exc.strerror or exc}"
        try:
            return parse_history(text), None
        except ValueError as exc:
            return History(), f"starting a new history: {self.history_path} is not a history file: {exc}"

    def write(self, sweep: Sweep) -> tuple[list[str], list[str]]:
        """Write page and history; return (files that could not be written, warnings)."""
        warnings: list[str] = []
        if self.history is None:
            self.history, warning = self.load_history()
            warnings += [warning] if warning else []
        history = update_history(self.history, sweep, self.history_limit)
        interval = self.interval_s or measured_interval(history) or DEFAULT_INTERVAL_S
        failed = []
        for path, render in (
                (self.path, lambda: render_page(sweep, history, interval, self.show_origin_addresses,
                                                     self.out_of_dns)),
                (self.history_path, lambda: json.dumps(history_document(history), indent=1) + "\n")):
            try:
                write_atomically(path, render())
            except OSError as exc:
                failed.append(f"cannot write {path}: {exc.strerror or exc}")
        self.history = history
        return failed, warnings
