"""For the status page's tests and screenshot: a sample sweep history with nodes down, headless
Chromium, a page reader."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from ipaddress import IPv4Address
from pathlib import Path

from kokoa_infra.health.html import DEFAULT_HISTORY, History, render_page, update_history
from kokoa_infra.health.results import HttpsResult, NodeResult, PingResult, Sweep, TrafficMemory
from kokoa_infra.health.targets import Target
from kokoa_infra.health.traffic import EdgeCounters, TrafficResult

# No background traffic of the browser's own: no sync, component updates, field trials, QUIC.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
CHROMIUM_TIMEOUT_S = 60
PHONE_WINDOW = (390, 1600)
SAMPLE_INTERVAL_S = 30
SAMPLE_END = datetime(2025, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
# Requests Chromium sends by itself even with background networking off (time and component
# update over its Client Update Protocol, recognisable by the cup2key parameter): not the page's.
BROWSER_OWN_REQUEST = re.compile(r"[?&]cup2key=")
URL_REQUEST = re.compile(r"NotifyBeforeURLRequest: (\S+)")

ORIGINS = [  # name, domain, wireguard ip, public endpoint (hidden on the page by default)
    ("blog", "blog.example.com", "10.100.0.1", "203.0.113.10"),
    ("shop", "shop.example.com", "10.100.1.1", "203.0.113.21"),
]
EDGES = [  # name, origin, index, public ip, drained
    ("edge-tokyo-1", "blog", 10, "198.51.100.7", False),
    ("edge-osaka-1", "blog", 11, "198.51.100.8", True),
    ("edge-nagoya-1", "blog", 12, "198.51.100.12", False),
    ("edge-tokyo-2", "shop", 10, "198.51.100.9", False),
    ("edge-seoul-1", "shop", 11, "198.51.100.30", False),
]


def sample_targets() -> list[Target]:
    domains = {name: domain for name, domain, _, _ in ORIGINS}
    subnets = {name: number for number, (name, *_rest) in enumerate(ORIGINS)}
    return ([Target(name, "origin", name, domain, IPv4Address(wg), public)
             for name, domain, wg, public in ORIGINS]
            + [Target(name, "edge", origin, domains[origin],
                      IPv4Address(f"10.100.{subnets[origin]}.{index}"), public, drained)
               for name, origin, index, public, drained in EDGES])


def _ping(target: Target, up: bool, rtt_ms: float) -> PingResult:
    return PingResult(ok=up, address=str(target.wireguard_ip), via="wireguard",
                      rtt_ms=rtt_ms if up else None, sent=1, received=int(up),
                      error=None if up else "timeout")


def _https(code: int | None, latency_ms: float, days: int, error: str | None = None) -> HttpsResult:
    if code is None:
        return HttpsResult(ok=False, code=None, latency_ms=None, cert_days_left=None,
                           error=error or "timeout while connecting")
    return HttpsResult(ok=code < 500, code=code, latency_ms=latency_ms, cert_days_left=days,
                       error=None if code < 500 else f"HTTP {code}")


UPSTREAM_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"))


def _sample_rates(name: str, step: int, steps: int) -> tuple[float, float, float, float]:
    """requests/s, refused/s, 5xx/s and a typical origin time of edge `name` during sweep `step`."""
    left = steps - 1 - step
    wave = 1 + 0.35 * ((step * 37) % 11) / 10
    base = {"edge-tokyo-1": 42.0, "edge-osaka-1": 0.4, "edge-nagoya-1": 18.0, "edge-tokyo-2": 25.0,
            "edge-seoul-1": 12.0}[name] * wave
    refused = 0.2 * wave
    errors = 0.0
    if name == "edge-tokyo-1" and left < 8:          # a flood: the edge refuses most of it
        refused, base = 160.0 + 10 * (left % 3), base + 170.0
    if name == "edge-nagoya-1" and left < 10:        # its origin stopped answering: 502s
        errors = base * 0.9
    return base, refused, errors, 0.012 + 0.004 * (step % 5) + (0.03 if name == "edge-tokyo-2" else 0)


def sample_traffic(target: Target, step: int, steps: int) -> TrafficResult | None:
    """The edge's counters after sweep `step` (as its mtail would have them), or its scrape failing."""
    if target.role != "edge":
        return None
    address = f"{target.wireguard_ip}:3903"
    if target.name == "edge-seoul-1" and steps - 1 - step < 4:
        return TrafficResult(ok=False, address=address, error="metrics: timeout while connecting")
    requests = refused = errors = 0.0
    buckets = [0.0] * len(UPSTREAM_BOUNDS)
    for earlier in range(step + 1):
        rate, refused_rate, error_rate, typical = _sample_rates(target.name, earlier, steps)
        requests += rate * SAMPLE_INTERVAL_S
        refused += refused_rate * SAMPLE_INTERVAL_S
        errors += error_rate * SAMPLE_INTERVAL_S
        answered = (rate - refused_rate) * SAMPLE_INTERVAL_S
        for index, bound in enumerate(UPSTREAM_BOUNDS):   # most near the typical time, a tail
            buckets[index] += answered * (0.0 if bound < typical else 0.9 if bound < typical * 8 else 1.0)
    ok = requests - refused - errors
    counters = EdgeCounters(
        requests={(target.domain, "2xx"): round(ok * 0.93), (target.domain, "3xx"): round(ok * 0.05),
                  (target.domain, "4xx"): round(ok * 0.02 + refused), (target.domain, "5xx"): round(errors)},
        limited={"limit": round(refused * 0.7), "shield_new": round(refused * 0.3)},
        bytes={"in": round(requests * 610), "out": round(ok * 14800)}, connections=float(3 + step % 7),
        buckets=tuple(zip(UPSTREAM_BOUNDS, (round(b) for b in buckets))),
        upstream_count=round(buckets[-1]), upstream_sum=round(buckets[-1] * 0.02, 3))
    return TrafficResult(ok=True, address=address, counters=counters)


def sample_sweep(step: int, steps: int, end: datetime = SAMPLE_END) -> Sweep:
    """Sweep `step` of `steps` (30 s apart, the last at `end`): a story with three nodes down at the end.

    edge-nagoya-1's origin stopped answering it through the tunnel 10 sweeps ago (HTTP 502);
    edge-seoul-1 went silent 4 sweeps ago (no ping, no HTTPS); edge-tokyo-2 flapped once and
    its certificate has 9 days left; edge-osaka-1 is drained and healthy.
    """
    left = steps - 1 - step
    jitter = (step * 7919) % 13 / 10
    nodes = []
    for number, target in enumerate(sample_targets()):   # figures differ from node to node
        ping, https = _ping(target, True, round(0.31 + 0.07 * number + jitter / 10, 3)), None
        if target.role == "edge":
            https = _https(200, round(4.2 + 0.9 * number + jitter, 3), 61 + number)
        if target.name == "edge-nagoya-1" and left < 10:
            https = _https(502, round(3.1 + jitter / 4, 3), 61)
        if target.name == "edge-seoul-1" and left < 4:
            ping, https = _ping(target, False, 0), _https(None, 0, 0)
        if target.name == "edge-tokyo-2":
            https = _https(200 if left not in (20, 21) else 504, round(5.3 + jitter, 3), 9)
        if target.name == "shop" and left in (20, 21):
            ping = _ping(target, False, 0)
        nodes.append(NodeResult(target=target, ping=ping, https=https,
                                traffic=sample_traffic(target, step, steps)))
    checked_at = end - timedelta(seconds=SAMPLE_INTERVAL_S * left)
    return Sweep(checked_at=checked_at, duration_s=1.02 + jitter / 10, checks=("ping", "https"),
                 nodes=nodes)


def sample_history(steps: int = DEFAULT_HISTORY, limit: int = DEFAULT_HISTORY,
                   end: datetime = SAMPLE_END) -> tuple[Sweep, History]:
    """The last sample sweep and the history of all `steps` of them."""
    history = History()
    memory = TrafficMemory()
    sweep = sample_sweep(0, steps, end)
    for step in range(steps):
        sweep = memory.apply(sample_sweep(step, steps, end))
        history = update_history(history, sweep, limit)
    return sweep, history


def sample_page(end: datetime = SAMPLE_END, show_origin_addresses: bool = False) -> str:
    sweep, history = sample_history(end=end)
    return render_page(sweep, history, SAMPLE_INTERVAL_S, show_origin_addresses)


# --- headless Chromium ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BrowserRun:
    returncode: int
    stdout: str
    log: str            # Chromium's verbose log (stderr)

    @property
    def requested_urls(self) -> list[str]:
        """Every URL the browser was about to request, its own update/time checks left out."""
        return [url for url in URL_REQUEST.findall(self.log) if not BROWSER_OWN_REQUEST.search(url)]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(page: Path | str, *extra: str, netns: str | None = None,
                 window: tuple[int, int] = PHONE_WINDOW) -> BrowserRun:
    """Open `page` (a file, or a URL given as a string with its scheme) in headless Chromium
    with a new empty profile; `netns` confines it.

    Started in its own process group, which is killed afterwards, so no renderer or zygote
    outlives the call even on a timeout.
    """
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (Debian package `chromium`)")
    profile = tempfile.mkdtemp(prefix="kokoa-chromium-")
    argv = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
            "--v=1", f"--window-size={window[0]},{window[1]}", *extra,
            page if isinstance(page, str) and "://" in page else Path(page).resolve().as_uri()]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    env = {**os.environ, "HOME": profile, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               errors="replace", env=env, start_new_session=True)
    try:
        stdout, log = process.communicate(timeout=CHROMIUM_TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if process.poll() is None:
            process.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
    return BrowserRun(process.returncode, stdout, log)


def screenshot(page: Path, png: Path, netns: str | None = None,
               window: tuple[int, int] = PHONE_WINDOW) -> BrowserRun:
    """Render `page` at `window` and write the PNG; raise when Chromium fails or writes none."""
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    run = run_chromium(page, f"--screenshot={png}", "--hide-scrollbars", netns=netns, window=window)
    if run.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium exited {run.returncode} without {png}:\n{run.log[-2000:]}")
    return run


def dump_dom(page: Path, netns: str | None = None) -> BrowserRun:
    """The page's DOM after its script ran (stdout)."""
    return run_chromium(page, "--dump-dom", netns=netns)


# --- reading a page back (tests) -----------------------------------------------------------------

VOID_ELEMENTS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                           "source", "track", "wbr"})

INLINE_ELEMENTS = frozenset({"a", "b", "code", "em", "strong", "time"})   # no break around them


@dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]
    children: list[Element | str]

    def text(self) -> str:
        """The visible text, whitespace collapsed."""
        parts: list[str] = []

        def walk(element: Element) -> None:
            for child in element.children:
                if isinstance(child, str):
                    parts.append(child)
                elif child.tag in INLINE_ELEMENTS:
                    walk(child)
                elif child.tag not in ("script", "style"):
                    parts.append(" ")
                    walk(child)
                    parts.append(" ")

        walk(self)
        return " ".join("".join(parts).split())

    def iter(self, tag: str | None = None) -> Iterator[Element]:
        for child in self.children:
            if isinstance(child, Element):
                if tag is None or child.tag == tag:
                    yield child
                yield from child.iter(tag)

    def first(self, tag: str) -> Element:
        return next(self.iter(tag))

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class _TreeBuilder(HTMLParser):
    """html.parser into Elements; an end tag that does not close the open element is an error."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, [])
        self.stack = [self.root]
        self.doctype: str | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs), [])
        self.stack[-1].children.append(element)
        if tag not in VOID_ELEMENTS:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, dict(attrs), []))

    def handle_endtag(self, tag: str) -> None:
        if len(self.stack) < 2 or self.stack[-1].tag != tag:
            raise ValueError(f"</{tag}> closes <{self.stack[-1].tag}>")
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse_html(text: str) -> tuple[Element, str | None]:
    """(document, doctype); ValueError unless every element is closed in order."""
    builder = _TreeBuilder()
    builder.feed(text)
    builder.close()
    if len(builder.stack) != 1:
        raise ValueError(f"unclosed <{builder.stack[-1].tag}>")
    return builder.root, builder.doctype


@dataclass
class PageRow:
    """One node's row: its key, state attribute, the row header and the cells by label."""

    key: str
    state: str
    header: str
    cells: dict[str, str]
    element: Element


def page_rows(document: Element) -> dict[str, PageRow]:
    rows = {}
    for row in document.iter("tr"):
        key = row.attrs.get("data-node")
        if key is None:
            continue
        cells = {str(cell.attrs.get("data-label")): cell.text() for cell in row.iter("td")}
        rows[key] = PageRow(key, str(row.attrs.get("data-state")), row.first("th").text(), cells, row)
    return rows
