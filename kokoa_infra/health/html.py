"""`kokoa health --html`: a self-contained status page rewritten every sweep, and the short history beside it."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from html import escape
from pathlib import Path
from typing import Any

from kokoa_infra.atomic_file import write_atomically
from kokoa_infra.health.report import timestamp
from kokoa_infra.health.results import NodeResult, Sweep
from kokoa_infra.health.traffic import ATTACK_REFUSED_PER_S, Rates, origin_traffic

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


def failing_checks(node: NodeResult) -> list[str]:
    """Each failed check with its reason, without the pinged address (an origin's may be secret)."""
    failed = []
    if node.ping is not None and not node.ping.ok:
        failed.append(f"ping: {node.ping.error or 'no reply'}")
    if node.https is not None and not node.https.ok:
        failed.append(f"https: {node.https.error or 'failed'}")
    return failed


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


def parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def measured_interval(history: History) -> float | None:
    """The median time between the recorded sweeps (a timer's or cron's period), if two exist."""
    moments = [parse_timestamp(at) for at, _ in history.sweeps[-11:]]
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(moments, moments[1:])]
    gaps = [gap for gap in gaps if gap > 0]
    return statistics.median(gaps) if gaps else None


# --- the page ----------------------------------------------------------------------------------

STYLE = """
:root{--ok:#1a7f37;--drained:#57606a;--bad:#c62828;--warn:#8a5a00;--ink:#1f2328;--muted:#57606a;
--line:#d0d7de;--paper:#fff;--band:#f6f8fa;--req:#0969da;--ref:#bc4c00}
*{box-sizing:border-box}
body{margin:0;padding:0 12px 24px;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"DejaVu Sans",sans-serif;color:var(--ink);background:var(--paper)}
header,main,footer{max-width:1100px;margin:0 auto}
h1{font-size:1.4em;margin:16px 0 4px}
h2{font-size:1.15em;margin:24px 0 2px}
.domain,.sub,.meta,footer{color:var(--muted)}
.domain{font-weight:normal;font-size:.9em;overflow-wrap:anywhere}
.sub{display:block;font-size:.85em;overflow-wrap:anywhere}
.meta{margin:2px 0}
.overall{display:inline-block;margin:6px 0;padding:4px 10px;border-radius:6px;color:#fff;font-weight:600}
.overall.ok{background:var(--ok)}.overall.bad{background:var(--bad)}
.problems{margin:4px 0 8px;padding-left:20px}
.problems a{color:var(--bad)}
.freshness{margin:6px 0;padding:6px 10px;border-left:4px solid var(--line);background:var(--band)}
body.stale .freshness{border-color:var(--bad);color:var(--bad);font-weight:600}
body.stale .state,body.stale .strip,body.stale .overall{filter:grayscale(1);opacity:.6}
.edges{margin:2px 0 6px}
.edges.none{color:var(--bad);font-weight:600}
table{width:100%;border-collapse:collapse;table-layout:fixed}
thead th:nth-child(1){width:16%}thead th:nth-child(2){width:15%}thead th:nth-child(3){width:13%}
thead th:nth-child(4){width:14%}thead th:nth-child(5){width:11%}thead th:nth-child(6){width:13%}
th,td{text-align:left;vertical-align:top;padding:6px 8px}
thead th{font-size:.8em;text-transform:uppercase;color:var(--muted);border-bottom:2px solid var(--line)}
tbody tr{border-bottom:1px solid var(--line)}
tbody th{font-weight:600}
.state{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;white-space:nowrap}
.state.serving{background:var(--ok)}.state.drained{background:var(--drained)}
.state.unhealthy{background:var(--bad)}
.why{display:block;color:var(--bad);font-size:.9em;overflow-wrap:anywhere}
.warn{color:var(--warn);font-weight:600}
.failed{color:var(--bad);font-weight:600}
.strip{display:flex;gap:1px;height:18px;width:100%}
.strip i{flex:0 1 6px;min-width:1px;border-radius:1px;background:var(--line)}
.strip .s{background:var(--ok)}.strip .d{background:var(--drained)}.strip .u{background:var(--bad)}
.legend{font-size:.85em;color:var(--muted)}
.legend .key{display:inline-block;width:10px;height:10px;margin:0 3px 0 8px;border-radius:2px}
.key.s{background:var(--ok)}.key.d{background:var(--drained)}.key.u{background:var(--bad)}
h3{font-size:1em;margin:14px 0 2px}
.attack{display:inline-block;padding:1px 8px;border-radius:10px;background:var(--bad);color:#fff;
font-weight:600;font-size:.85em;white-space:nowrap}
.chart{display:block;width:100%;height:44px;background:var(--band);border-radius:2px}
.chart polyline{fill:none;stroke-width:1.6;stroke-linejoin:round}
.chart .req{stroke:var(--req)}.chart .ref{stroke:var(--ref)}.chart .err{stroke:var(--bad)}
.key.req{background:var(--req)}.key.ref{background:var(--ref)}.key.err{background:var(--bad)}
footer{margin-top:24px;font-size:.85em;border-top:1px solid var(--line);padding-top:8px}
code{font-size:.95em}
.visually-hidden{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
@media (max-width:719px){
 thead{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
 table,tbody,tr,th,td{display:block;width:100%}
 tbody tr{padding:6px 0}
 tbody th{padding:6px 4px 2px}
 td{display:grid;grid-template-columns:7em minmax(0,1fr);gap:8px;padding:3px 4px}
 td::before{content:attr(data-label);color:var(--muted);font-size:.85em}
}
""".strip()

# Ages the page against the reader's clock: the `stale` class and the age line. Everything it
# needs is in the page (data-* attributes); it loads nothing and the CSP admits only its hash.
SCRIPT = """
(function(){
var b=document.body,at=Date.parse(b.getAttribute("data-generated-at")),
limit=1000*Number(b.getAttribute("data-stale-after-s")),age=document.getElementById("age");
function text(s){s=Math.max(0,Math.round(s));if(s<120)return s+" s";if(s<7200)return Math.round(s/60)+" min";
return Math.round(s/3600)+" h";}
function check(){var old=Date.now()-at,stale=old>limit;b.classList.toggle("stale",stale);
age.textContent=stale?"STALE: this page was written "+text(old/1000)+" ago, more than "+
text(limit/1000)+" (3 intervals): the checker has stopped or cannot write it; its figures are out of date."
:"Written "+text(old/1000)+" ago by your clock; it counts as stale after "+text(limit/1000)+" (3 intervals).";}
check();setInterval(check,5000);
})();
""".strip()


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Nothing may load: no image, font, frame, connection or form target; only this style and script.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src {_csp_hash(STYLE)}; "
                           f"script-src {_csp_hash(SCRIPT)}; base-uri 'none'; form-action 'none'")


def _e(value: object) -> str:
    return escape(str(value), quote=True)


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
    return f"{value:.2f}\u00a0ms" if value < 10 else f"{value:.1f}\u00a0ms"   # never split from its unit


def _interval_text(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 120 else _duration(seconds)


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


def _strip(history: NodeHistory | None, sweeps: tuple[tuple[str, float], ...]) -> str:
    if history is None:
        return '<span class="sub">no history</span>'
    strip = history.strip
    times = [at for at, _ in sweeps][-len(strip):] if sweeps else []
    times = [""] * (len(strip) - len(times)) + times
    runs: list[list[Any]] = []   # [letter, sweeps, checkedAt of the first]
    for letter, at in zip(strip, times):
        if runs and runs[-1][0] == letter:
            runs[-1][1] += 1
        else:
            runs.append([letter, 1, at])
    label = (f"Last {len(strip)} sweep{'s' if len(strip) != 1 else ''}, oldest first: "
             + ", then ".join(f"{count} {STATE_OF_LETTER[letter]}" + (f" from {at[11:19]}" if at else "")
                              for letter, count, at in runs) + " (UTC)")
    # One bare element per sweep (a big stack has thousands); the label carries the times.
    cells = "".join(f'<i class="{letter}"></i>' for letter in strip)
    return f'<span class="strip" role="img" aria-label="{_e(label)}" title="{_e(label)}">{cells}</span>'


def _node_row(node: NodeResult, index: int, history: History, checked_at: datetime,
              redact: _Redactor, show_origin_addresses: bool, out_of_dns: dict[str, str] | None = None) -> str:
    target, ping, https = node.target, node.ping, node.https
    state = node_state(node)
    is_origin = target.role == "origin"
    address_shown = show_origin_addresses or not is_origin
    role = target.role + (" \u00b7 drained (no A record)" if target.drained else "")
    if target.role == "edge" and target.name in (out_of_dns or {}):
        role += f" \u00b7 out of DNS since {(out_of_dns or {})[target.name]} (failover)"
    if address_shown:
        role += f" \u00b7 {target.public_ip}"
    why = "".join(f'<span class="why">{_e(redact(reason))}</span>' for reason in failing_checks(node))
    state_cell = f'<span class="state {state}">{STATE_SYMBOLS[state]} {state}</span>{why}'

    if ping is None:
        ping_cell = '<span class="sub">not checked</span>'
    else:
        shown = ping.address if (address_shown or ping.via == "wireguard") else HIDDEN
        figure = (_ms(ping.rtt_ms) if ping.ok and ping.rtt_ms is not None
                  else '<span class="failed">no reply</span>')
        if ping.ok and ping.received < ping.sent:
            figure += f' <span class="warn">{ping.received}/{ping.sent} replies</span>'
        ping_cell = (f'{figure}<span class="sub">via {_e(ping.via)} '
                     f'{"address hidden" if shown == HIDDEN else _e(shown)}</span>')

    if https is None:
        https_cell = '<span class="sub">' + ("not probed (origin)" if is_origin else "not checked") + "</span>"
        cert_cell = '<span class="sub">\u2014</span>'
    else:
        if https.code is not None:
            code = (f'<span class="failed">HTTP {https.code}</span>' if not https.ok
                    else f"HTTP {https.code}")
            latency = f" \u00b7 {_ms(https.latency_ms)}" if https.latency_ms is not None else ""
            https_cell = code + latency
        else:
            https_cell = '<span class="failed">no response</span>'
        if https.error and https.code is None:
            https_cell += f'<span class="sub">{_e(redact(https.error))}</span>'
        days = https.cert_days_left
        if days is None:
            cert_cell = '<span class="sub">\u2014</span>'
        elif days < 0:
            cert_cell = f'<span class="failed">expired {-days} day{"s" if days != -1 else ""} ago</span>'
        elif days < CERT_WARNING_DAYS:
            cert_cell = f'<span class="warn">{days} day{"s" if days != 1 else ""} left</span>'
        else:
            cert_cell = f"{days} days left"

    recorded = history.node(node.key)
    if recorded is None:
        since_cell = '<span class="sub">\u2014</span>'
    else:
        since = parse_timestamp(recorded.since)
        shown = since.strftime("%H:%M:%S UTC" if since.date() == checked_at.date() else "%Y-%m-%d %H:%M UTC")
        since_cell = (f"for {_e(_duration((checked_at - since).total_seconds()))}"
                      f'<span class="sub">{"first seen" if recorded.first_seen else "since"} '
                      f'<time datetime="{_e(recorded.since)}">{_e(shown)}</time></span>')

    return (f'<tr id="node-{index}" data-node="{_e(node.key)}" data-state="{state}">'
            f'<th scope="row">{_e(target.name)}<span class="sub">{_e(role)}</span></th>'
            f'<td data-label="State"><div>{state_cell}</div></td>'
            f'<td data-label="Ping RTT"><div>{ping_cell}</div></td>'
            f'<td data-label="HTTPS"><div>{https_cell}</div></td>'
            f'<td data-label="Certificate"><div>{cert_cell}</div></td>'
            f'<td data-label="State since"><div>{since_cell}</div></td>'
            f'<td data-label="History"><div>{_strip(recorded, history.sweeps)}</div></td></tr>')


CHART_WIDTH, CHART_HEIGHT = 240, 44


def _rate_text(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _chart(points: tuple[TrafficPoint | None, ...], what: str) -> str:
    """requests/s, refused/s and 5xx/s over the recorded sweeps as an inline SVG (no asset), with
    its figures in words for screen readers."""
    known = [p for p in points if p is not None]
    if not known:
        return '<span class="sub">no rates yet (two scrapes make the first)</span>'
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
                lines.append(f'<polyline class="{css}" points="{" ".join(run)}" '
                             'vector-effect="non-scaling-stroke"/>')
    last = known[-1]
    label = (f"{what}, last {len(points)} sweeps: requests per second up to {_rate_text(max(p[0] for p in known))}, "
             f"now {_rate_text(last[0])}; refused per second up to {_rate_text(max(p[1] for p in known))}, "
             f"now {_rate_text(last[1])}; 5xx per second up to {_rate_text(max(p[2] for p in known))}, "
             f"now {_rate_text(last[2])}")
    return (f'<svg class="chart" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" preserveAspectRatio="none" '
            f'role="img" aria-label="{_e(label)}"><title>{_e(label)}</title>{"".join(lines)}</svg>'
            f'<span class="sub" aria-hidden="true">scale 0\u2013{_rate_text(top)}/s</span>')


def _response_text(point: TrafficPoint | None) -> str:
    if point is None or point[3] is None:
        return '<span class="sub">no answers this interval</span>'
    return (f"p50 {_ms(point[3] * 1000)}"
            + ("" if point[4] is None else f'<span class="sub">p99 {_ms(point[4] * 1000)}</span>'))


def _traffic_row(key: str, name: str, sub: str, history: History, node: NodeResult | None) -> str:
    points = (history.traffic or {}).get(key, ())
    last = points[-1] if points else None
    attack = last is not None and last[1] >= ATTACK_REFUSED_PER_S
    mark = ' <span class="attack">\u26a0 under attack</span>' if attack else ""
    header = f'<th scope="row">{_e(name)}{mark}<span class="sub">{_e(sub)}</span></th>'
    traffic = node.traffic if node is not None else None
    if traffic is not None and not traffic.ok:
        unknown = (f'<span class="failed">not scraped</span><span class="sub">{_e(traffic.error or "")}: '
                   "traffic unknown, not zero</span>")
        cells = (f'<td data-label="Requests/s" colspan="4"><div>{unknown}</div></td>')
    elif last is None:
        cells = ('<td data-label="Requests/s" colspan="4"><div><span class="sub">first scrape: rates from '
                 "the next sweep on</span></div></td>")
    else:
        cells = (f'<td data-label="Requests/s"><div>{_rate_text(last[0])}</div></td>'
                 f'<td data-label="Refused/s"><div>{_rate_text(last[1])}</div></td>'
                 f'<td data-label="5xx/s"><div>{_rate_text(last[2])}</div></td>'
                 f'<td data-label="Origin response"><div>{_response_text(last)}</div></td>')
    chart = _chart(points, f"{name} traffic")
    return (f'<tr data-traffic="{_e(key)}" data-under-attack="{str(attack).lower()}">{header}{cells}'
            f'<td data-label="Traffic history"><div>{chart}</div></td></tr>')


def _traffic_table(section: _Section, history: History, number: int) -> str:
    edges = [node for node in section.nodes if node.target.role == "edge" and node.traffic is not None]
    if not edges:
        return ""
    origin_key = f"origin/{section.origin}"
    rows = _traffic_row(origin_key, section.origin, f"all {len(edges)} edges", history, None)
    rows += "".join(_traffic_row(node.key, node.target.name, "edge", history, node) for node in edges)
    points = (history.traffic or {}).get(origin_key, ())
    attack = bool(points) and points[-1] is not None and points[-1][1] >= ATTACK_REFUSED_PER_S
    heading = f"traffic-{number}"
    return (f'<h3 id="{heading}">Traffic'
            + (' <span class="attack">\u26a0 under attack</span>' if attack else "") + "</h3>"
            f'<table class="traffic" aria-labelledby="{heading}"><caption class="visually-hidden">'
            f"Traffic of origin {_e(section.origin)} and its edges over the last sweep interval</caption>"
            '<thead><tr><th scope="col">Edge</th><th scope="col">Requests/s</th><th scope="col">Refused/s</th>'
            '<th scope="col">5xx/s</th><th scope="col">Origin response</th>'
            f'<th scope="col">Last {len(points) or 1} sweeps</th></tr></thead><tbody>{rows}</tbody></table>')


def render_page(sweep: Sweep, history: History, interval_s: float,
                show_origin_addresses: bool = False, out_of_dns: dict[str, str] | None = None) -> str:
    """The whole page: inline style and script only, nothing fetched from anywhere."""
    redact = _Redactor(sweep, show_origin_addresses)
    written_at = sweep.checked_at + timedelta(seconds=sweep.duration_s)
    stale_after_s = STALE_AFTER_INTERVALS * interval_s
    refresh_s = max(MIN_REFRESH_S, round(interval_s))
    states = [node_state(node) for node in sweep.nodes]
    unhealthy = [(index, node) for index, node in enumerate(sweep.nodes) if states[index] == UNHEALTHY]
    total = len(sweep.nodes)
    if unhealthy:
        overall = f'<p class="overall bad">{STATE_SYMBOLS[UNHEALTHY]} {len(unhealthy)} of {total} nodes unhealthy</p>'
        title = f"Kokoa status: {len(unhealthy)} of {total} unhealthy"
    else:
        overall = f'<p class="overall ok">{STATE_SYMBOLS[SERVING]} all {total} nodes healthy</p>'
        title = f"Kokoa status: all {total} healthy"
    problems = ""
    if unhealthy:
        items = "".join(
            f'<li><a href="#node-{index}">{_e(node.key)}</a>: {_e(redact("; ".join(failing_checks(node))))}</li>'
            for index, node in unhealthy)
        problems = f'<ul class="problems" aria-label="Unhealthy nodes">{items}</ul>'
    counts = {state: states.count(state) for state in (SERVING, DRAINED, UNHEALTHY)}
    index_of = {id(node): index for index, node in enumerate(sweep.nodes)}
    recorded = len(history.sweeps)

    sections = []
    for number, section in enumerate(_sections(sweep.nodes)):
        edges = [node for node in section.nodes if node.target.role == "edge"]
        serving = sum(node_state(node) == SERVING for node in edges)
        detail = ", ".join(f"{count} {state}" for state in (DRAINED, UNHEALTHY)
                           if (count := sum(node_state(node) == state for node in edges)))
        edge_line = (f'<p class="edges{" none" if edges and not serving else ""}">'
                     f"Serving edges: {serving} of {len(edges)}"
                     + (f" ({detail})" if detail else "")
                     + (": no edge serves this site" if edges and not serving else "") + "</p>")
        rows = "".join(_node_row(node, index_of[id(node)], history, sweep.checked_at, redact,
                                 show_origin_addresses, out_of_dns) for node in section.nodes)
        heading_id = f"origin-{number}"
        sections.append(
            f'<section aria-labelledby="{heading_id}">'
            f'<h2 id="{heading_id}">{_e(section.origin)} <span class="domain">{_e(section.domain)}</span></h2>'
            f"{edge_line}"
            f'<table><caption class="visually-hidden">Nodes of origin {_e(section.origin)}</caption>'
            "<thead><tr>"
            '<th scope="col">Node</th><th scope="col">State</th><th scope="col">Ping RTT</th>'
            '<th scope="col">HTTPS through edge</th><th scope="col">Certificate</th>'
            '<th scope="col">State since</th>'
            f'<th scope="col">Last {recorded} sweep{"s" if recorded != 1 else ""}</th>'
            f"</tr></thead><tbody>{rows}</tbody></table>{_traffic_table(section, history, number)}</section>")
    if not sections:
        sections.append("<p>No nodes: the stack outputs list no health targets.</p>")

    legend = ('<p class="legend" aria-hidden="true">History, oldest to newest:'
              '<span class="key s"></span>serving<span class="key d"></span>drained'
              '<span class="key u"></span>unhealthy'
              + (' \u00b7 Traffic:<span class="key req"></span>requests/s<span class="key ref"></span>refused/s'
                 '<span class="key err"></span>5xx/s' if history.traffic else "") + "</p>")
    generated = timestamp(written_at)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{_e(CONTENT_SECURITY_POLICY)}">
<meta http-equiv="refresh" content="{refresh_s}">
<meta name="referrer" content="no-referrer">
<meta name="robots" content="noindex, nofollow">
<meta name="generator" content="kokoa health --html">
<title>{_e(title)}</title>
<style>{STYLE}</style>
</head>
<body data-generated-at="{generated}" data-stale-after-s="{stale_after_s:g}">
<header>
<h1>Kokoa status</h1>
{overall}
{problems}
<p class="meta">Sweep at <time datetime="{timestamp(sweep.checked_at)}">{_e(_utc(sweep.checked_at))}</time>, took {sweep.duration_s:.2f} s.
Checks: {_e(", ".join(sweep.checks) or "none")}. Nodes: {counts[SERVING]} serving, {counts[DRAINED]} drained, {counts[UNHEALTHY]} unhealthy.</p>
<p class="freshness" id="freshness"><span id="age" role="status">This page is rewritten about every
{_e(_interval_text(interval_s))} and reloads itself as often. If the sweep time above is more than
{_e(_interval_text(stale_after_s))} ago (3 intervals), the page is stale: the checker has stopped.</span></p>
{legend}
</header>
<main>
{"".join(sections)}
</main>
<footer>
<p>Written by <code>kokoa health --html</code>. State: <strong>serving</strong> = every check passed;
<strong>drained</strong> = healthy edge with <code>dns: false</code> (no A record);
<strong>unhealthy</strong> = a check failed (named under the state). HTTPS is ok below status 500.
Traffic: per second over the last sweep interval, from each edge's metrics through the tunnel;
refused = the edge's limits, capacity, challenges and its firewall's drops; <strong>under attack</strong>
= {ATTACK_REFUSED_PER_S:g} or more refused a second.</p>
<p>Configuration bundles are not offered here: they hold WireGuard private keys and this page is
shared and cached. Use <code>kokoa bundle</code>.</p>
</footer>
<script>{SCRIPT}</script>
</body>
</html>
"""


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
