"""The rendered edge with a capacity, visitor passes and the challenge, serving for real (nginx
and Debian's njs) in throwaway namespaces, in front of a slow application: passes forged,
expired, from another network or under another origin's key are refused; a solved challenge
is one pass however often it is replayed; exempt paths, allowFrom and the health token are
never challenged; the origin never sees more than the edge's share."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from kokoa_infra.render import JS_MODULE, health_token
from kokoa_infra.stackfile import kokoa_config
from kokoa_infra.validate import parse_topology
from tests.support.edge_serving import link_tunnel, start_edge_nginx, throwaway_certificate, write_edge_files
from tests.support.rendering import PASS_KEY, bundles, wireguard_ips
from tests.support.stacks import BASE_CONFIG

DOMAIN = "blog.example.com"
VISITOR, NEIGHBOUR, STRANGER, MONITOR = "10.9.1.5", "10.9.1.6", "10.9.2.5", "10.9.3.5"
# The application: /?ms=N answers after N ms; every answer says the most requests it had at once.
APP = '''
import http.server, socketserver, sys, threading, time, urllib.parse
state = {"now": 0, "peak": 0}; lock = threading.Lock()
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/__now":  # for the test, from the edge's namespace: not counted
            body = ("%d\\n" % state["now"]).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
            return
        with lock:
            state["now"] += 1; state["peak"] = max(state["peak"], state["now"])
        try:
            query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            time.sleep(min(int(query.get("ms", ["0"])[0]), 5000) / 1000)
            body = ("app path=%s health=%s peak=%d\\n" % (self.path, self.headers.get("Kokoa-Health", "-"),
                                                         state["peak"])).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        finally:
            with lock:
                state["now"] -= 1
    def log_message(self, *args): pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True; allow_reuse_address = True
Server((sys.argv[1], 80), Handler).serve_forever()
'''

pytestmark = pytest.mark.skipif(not Path(JS_MODULE).exists(), reason="libnginx-mod-http-js is not installed "
                                                                      "(make setup installs it)")


@dataclass
class Response:
    code: int
    headers: dict[str, str]
    body: str

    @property
    def challenged(self) -> bool:
        return self.code == 503 and "var CHALLENGE = " in self.body

    @property
    def pass_cookie(self) -> str | None:
        match = re.match(r"kokoa_pass=([^;]+);", self.headers.get("set-cookie", ""))
        return match[1] if match else None


@dataclass
class Edge:
    netns: str
    origin: str
    ca: Path
    directory: Path
    origin_address: str

    def reload(self, **values: Any) -> None:
        """Render blog with other values and reload the running nginx, as an install does."""
        write_edge_files(self.directory, edge_files(values))
        master = (self.directory / "run" / "nginx.pid").read_text().strip()
        subprocess.run(["kill", "-HUP", master], check=True)
        time.sleep(1.5)  # the new workers start, the old ones finish

    def get(self, path: str = "/", source: str = VISITOR, cookies: dict[str, str] | None = None,
            headers: dict[str, str] | None = None) -> Response:
        argv = ["ip", "netns", "exec", self.netns, "curl", "-sS", "--max-time", "8", "--cacert", str(self.ca),
                "--resolve", f"{DOMAIN}:443:{source}", "--interface", source, "-D", "-"]
        for name, value in (cookies or {}).items():
            argv += ["-b", f"{name}={value}"]
        for name, value in (headers or {}).items():
            argv += ["-H", f"{name}: {value}"]
        done = subprocess.run([*argv, f"https://{DOMAIN}{path}"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        head, _, body = done.stdout.partition("\n\n")  # text mode: CRLF read as \n
        lines = head.split("\n")
        return Response(int(lines[0].split()[1]),
                        {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}, body)

    def at_once(self, path: str, count: int, cookies: dict[str, str] | None = None) -> list[str]:
        """The status codes of `count` requests sent at the same time, each on its own connection."""
        argv = ["ip", "netns", "exec", self.netns, "curl", "-s", "--max-time", "8", "--cacert", str(self.ca),
                "--resolve", f"{DOMAIN}:443:{VISITOR}", "--interface", VISITOR, "--http1.1", "--parallel",
                "--parallel-immediate", "--parallel-max", str(count), "-w", "%{http_code}\\n"]
        for name, value in (cookies or {}).items():
            argv += ["-b", f"{name}={value}"]
        for _ in range(count):
            argv += ["-o", "/dev/null", f"https://{DOMAIN}{path}"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.split()

    def at_origin(self) -> int:
        """Requests the application is working on now (asked directly, through the tunnel)."""
        done = subprocess.run(["ip", "netns", "exec", self.netns, "curl", "-s", "--max-time", "3",
                               f"http://{self.origin_address}/__now"], capture_output=True, text=True, timeout=30)
        return int(done.stdout or -1)

    def wait_at_origin(self, count: int) -> None:
        for _ in range(100):
            if self.at_origin() >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"the application never had {count} requests at once")

    def hold(self, path: str, source: str = VISITOR, cookies: dict[str, str] | None = None) -> subprocess.Popen:
        """A request that keeps its place at the origin while the test goes on (returns once
        the application has it)."""
        before = self.at_origin()
        argv = ["ip", "netns", "exec", self.netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                "--max-time", "8", "--cacert", str(self.ca), "--resolve", f"{DOMAIN}:443:{source}",
                "--interface", source]
        for name, value in (cookies or {}).items():
            argv += ["-b", f"{name}={value}"]
        held = subprocess.Popen([*argv, f"https://{DOMAIN}{path}"], stdout=subprocess.PIPE, text=True)
        self.wait_at_origin(before + 1)
        return held


def edge_files(values: dict[str, Any]) -> dict[str, str]:
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0].update({"challengeDifficulty": 8, **values})
    return bundles(config)["edge/edge-tokyo-1"]


@pytest.fixture
def start_edge(make_netns, tmp_path) -> Callable[..., Edge]:
    """Renders edge-tokyo-1 with blog's entry updated by the given values and starts it with the
    slow application behind it (osaka-1 is drained: tokyo-1 gets the share of the capacity less 1)."""

    def start(**values: Any) -> Edge:
        edge_ns, origin_ns = make_netns(), make_netns()
        files = edge_files(values)
        ips = wireguard_ips(BASE_CONFIG)
        link_tunnel(edge_ns, origin_ns, ips["edge-tokyo-1"], ips["blog"])
        for address in (VISITOR, NEIGHBOUR, STRANGER, MONITOR):
            subprocess.run(["ip", "-n", edge_ns, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
        app = tmp_path / "app.py"
        app.write_text(APP)
        subprocess.Popen(["ip", "netns", "exec", origin_ns, sys.executable, str(app), ips["blog"]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ca = throwaway_certificate(tmp_path, DOMAIN)
        start_edge_nginx(edge_ns, tmp_path, files)
        edge = Edge(edge_ns, origin_ns, ca, tmp_path, ips["blog"])
        for _ in range(50):  # the application's first answer
            if subprocess.run(["ip", "netns", "exec", edge_ns, "curl", "-s", "-o", "/dev/null",
                               f"http://{ips['blog']}/"], capture_output=True, timeout=10).returncode == 0:
                break
            time.sleep(0.1)
        return edge

    return start  # make_netns kills every process left in the namespaces


# --- passes and solutions made here the way the edge makes them (an independent implementation) ---

def mac(text: str, key: str = PASS_KEY) -> str:
    digest = hmac.new(key.encode(), text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def make_pass(network: str = "10.9.1.0/24", expiry: int | None = None, pass_id: str = "0123456789abcdef",
              origin: str = "blog", key: str = PASS_KEY) -> str:
    expiry = int(time.time()) + 3600 if expiry is None else expiry
    return f"{expiry}.{pass_id}.{mac(f'pass|{origin}|{network}|{expiry}|{pass_id}', key)}"


def solve(page: str) -> str:
    challenge, bits = re.search(r'var CHALLENGE = "([^"]+)", BITS = (\d+);', page).groups()
    for counter in range(1 << 24):
        value = f"{challenge}.{counter}"
        if int.from_bytes(hashlib.sha256(value.encode()).digest(), "big") >> (256 - int(bits)) == 0:
            return value
    raise AssertionError("no solution")


def test_only_a_valid_pass_of_this_origin_and_network_gets_through(start_edge):
    edge = start_edge(underAttack="on")
    first = edge.get("/")
    assert first.challenged and first.headers["retry-after"] == "5" and first.headers["cache-control"] == "no-store"
    assert first.pass_cookie is None
    ok = edge.get("/", cookies={"kokoa_pass": make_pass()})
    assert ok.code == 200 and ok.body.startswith("app path=/ ")
    assert edge.get("/", source=NEIGHBOUR, cookies={"kokoa_pass": make_pass()}).code == 200  # same /24
    refused = {
        "forged": make_pass()[:-2] + "AA",
        "expired": make_pass(expiry=int(time.time()) - 1),
        "too far ahead": make_pass(expiry=int(time.time()) + 2 * 86400),
        "other network": make_pass(network="10.9.2.0/24"),
        "other origin's name": make_pass(origin="shop"),
        "other origin's key": make_pass(key="f" * 64),
    }
    for why, value in refused.items():
        assert edge.get("/", cookies={"kokoa_pass": value}).challenged, why
    assert edge.get("/", source=STRANGER, cookies={"kokoa_pass": make_pass()}).challenged


def test_a_solved_challenge_is_one_pass_however_often_it_is_replayed(start_edge):
    edge = start_edge(underAttack="on")
    page = edge.get("/").body
    assert '<html lang="en">' in page and "<noscript>" in page and "http" not in page.split("<script>")[1]
    solution = solve(page)
    first = edge.get("/", cookies={"kokoa_solution": solution})
    assert first.code == 200 and first.pass_cookie
    assert first.headers["set-cookie"].endswith("; Secure; HttpOnly; SameSite=Lax")
    again = edge.get("/", source=NEIGHBOUR, cookies={"kokoa_solution": solution})
    assert again.code == 200 and again.pass_cookie == first.pass_cookie  # the same pass, the same limits
    assert edge.get("/", cookies={"kokoa_pass": first.pass_cookie}).code == 200
    # A wrong counter, another network, a changed difficulty: refused.
    challenge, counter = solution.rsplit(".", 1)
    wrong = next(f"{challenge}.{n}" for n in range(int(counter) + 1, 1 << 24)
                 if int.from_bytes(hashlib.sha256(f"{challenge}.{n}".encode()).digest(), "big") >> 248 != 0)
    assert edge.get("/", cookies={"kokoa_solution": wrong}).challenged
    assert edge.get("/", source=STRANGER, cookies={"kokoa_solution": solution}).challenged
    time_, pass_id, bits, signature, _ = solution.split(".")
    easier = f"{time_}.{pass_id}.1.{signature}.0"
    assert edge.get("/", cookies={"kokoa_solution": easier}).challenged
    # A challenge older than five minutes is worthless, even well signed and solved.
    old = str(int(time.time()) - 301)
    stale = f"{old}.{pass_id}.8.{mac(f'challenge|blog|10.9.1.0/24|{old}|{pass_id}|8')}"
    assert edge.get("/", cookies={"kokoa_solution": solve(f'var CHALLENGE = "{stale}", BITS = 8;')}).challenged


def test_exempt_paths_allow_from_and_the_health_token_are_never_challenged(start_edge):
    edge = start_edge(underAttack="on", exemptPaths=["/api/", "/a-b_c.d~e/"], allowFrom=["10.9.3.0/24"])
    assert edge.get("/api/orders").code == 200
    assert edge.get("/a-b_c.d~e/x").code == 200
    assert edge.get("/apix").challenged  # a prefix, matched as nginx matches locations
    assert edge.get("/", source=MONITOR).code == 200
    token = health_token(PASS_KEY, parse_topology(kokoa_config(BASE_CONFIG)).origin("blog"))
    probe = edge.get("/", headers={"Kokoa-Health": token})
    assert probe.code == 200 and "health=-" in probe.body  # and the token does not reach the application
    assert edge.get("/", headers={"Kokoa-Health": token[:-1] + "0"}).challenged


def test_a_pass_is_limited_as_one_visitor(start_edge):
    edge = start_edge(underAttack="on", rateLimit={"requestsPerSecond": 1, "burst": 2, "connections": 50})
    one, other = make_pass(pass_id="1111111111111111"), make_pass(pass_id="2222222222222222")
    # Eight at once (one curl, eight connections): 1 served, 1 waits its turn (the burst of
    # 2), the rest refused.
    codes = edge.at_once("/", 8, cookies={"kokoa_pass": one})
    assert codes.count("429") >= 5, codes  # one pass: one visitor's rate
    assert edge.get("/", cookies={"kokoa_pass": other}).code == 200  # another visitor on the same address


def test_auto_hands_out_passes_in_normal_times_and_challenges_only_when_full(start_edge):
    # capacity 3: osaka-1 (drained) 1, tokyo-1 2, of which 1 for requests without a pass.
    edge = start_edge(capacity={"concurrentRequests": 3}, exemptPaths=["/api/"], allowFrom=["10.9.3.0/24"])
    normal = edge.get("/")
    assert normal.code == 200 and normal.pass_cookie  # carried into the next attack
    visitor = normal.pass_cookie
    held = edge.hold("/?ms=4000")  # the open part is taken
    assert edge.get("/").challenged
    assert edge.get("/api/x").code == 503  # exempt: never a challenge, a fast 503
    kept = edge.hold("/?ms=4000", cookies={"kokoa_pass": visitor})  # the pass holder's reserved place
    full = edge.get("/", cookies={"kokoa_pass": visitor})
    assert full.code == 503 and full.headers["retry-after"] == "1" and not full.challenged
    monitor = edge.get("/", source=MONITOR)
    assert monitor.code == 503 and not monitor.challenged  # allowFrom: never a challenge either
    assert held.communicate(timeout=15)[0] == "200" and kept.communicate(timeout=15)[0] == "200"
    assert "peak=2" in edge.get("/", cookies={"kokoa_pass": visitor}).body  # never above the share


def test_capacity_without_challenge_is_a_fast_503_and_a_dead_origin_still_a_502(start_edge):
    edge = start_edge(capacity={"concurrentRequests": 2}, underAttack="off")  # tokyo-1: 1
    held = edge.hold("/?ms=4000")
    started = time.monotonic()
    busy = edge.get("/")
    assert busy.code == 503 and busy.headers["retry-after"] == "1" and time.monotonic() - started < 1.5
    assert held.communicate(timeout=15)[0] == "200"
    subprocess.run(["ip", "netns", "exec", edge.origin, "pkill", "-f", "app.py"], check=False)
    subprocess.run(["ip", "netns", "pids", edge.origin], capture_output=True)
    time.sleep(0.3)
    assert edge.get("/").code == 502


def test_headless_chromium_solves_the_challenge_and_sees_the_page(start_edge):
    from tests.support.html_preview import chromium_binary, run_chromium

    if chromium_binary() is None:
        pytest.skip("chromium is not installed (make setup installs it)")
    edge = start_edge(underAttack="on", challengeDifficulty=16)  # the default difficulty
    started = time.monotonic()
    browser = run_chromium(f"https://{DOMAIN}/", "--dump-dom", "--virtual-time-budget=20000",
                           "--ignore-certificate-errors", f"--host-resolver-rules=MAP {DOMAIN} {VISITOR}",
                           netns=edge.netns)
    elapsed = time.monotonic() - started
    assert browser.returncode == 0, browser.log[-2000:]
    # The application's answer, after the script solved the challenge and loaded the page again.
    assert "app path=/ health=-" in browser.stdout, browser.stdout[:2000]
    assert elapsed < 15, elapsed


def test_the_defence_switches_on_and_off_by_a_reload(start_edge):
    # nginx keeps the old configuration when a reload gives a zone another key: the
    # per-visitor limits must not reuse the per-address zones' names.
    edge = start_edge()
    assert edge.get("/").pass_cookie is None
    edge.reload(capacity={"concurrentRequests": 3})
    assert edge.get("/").pass_cookie  # auto: passes handed out
    edge.reload(underAttack="on")
    assert edge.get("/").challenged
    edge.reload()
    plain = edge.get("/")
    assert plain.code == 200 and plain.pass_cookie is None


def test_a_client_that_gives_up_keeps_its_place_until_the_origin_answers(start_edge):
    edge = start_edge(capacity={"concurrentRequests": 2}, underAttack="off")  # tokyo-1: 1
    impatient = edge.hold("/?ms=4000")
    impatient.kill()  # the client leaves; the application still works on its request
    impatient.wait(timeout=10)
    assert edge.at_origin() == 1
    assert edge.get("/").code == 503  # so its place is still taken
    for _ in range(100):  # until the application answers it (4 s after it came)
        if edge.at_origin() == 0:
            break
        time.sleep(0.1)
    assert "peak=1" in edge.get("/").body


@pytest.mark.parametrize("values, answer", [
    ({"capacity": {"concurrentRequests": 65535}, "challengeDifficulty": 24}, "a pass"),  # the upper bounds
    ({"capacity": {"concurrentRequests": 1}, "challengeDifficulty": 8, "underAttack": "on"}, "the challenge"),
    ({"capacity": {"concurrentRequests": 65535}, "underAttack": "off"}, "the application"),
], ids=["auto at the upper bounds", "on at the lower bounds", "off at the upper bound"])
def test_the_bounds_of_the_new_keys_are_what_nginx_accepts(start_edge, values, answer):
    # The fixture's nginx starts only with a file it accepted (max_conns, limit_conn < 65536).
    first = start_edge(**values).get("/")
    got = "the challenge" if first.challenged else "a pass" if first.pass_cookie else "the application"
    assert got == answer and (first.code == 200) == (answer != "the challenge")


def _outcomes(edge: Edge) -> list[tuple[str, str]]:
    """(status class, outcome) of each request in the edge's access log, its buffer flushed first
    (nginx writes what it holds when it reopens its logs)."""
    master = (edge.directory / "run" / "nginx.pid").read_text().strip()
    subprocess.run(["kill", "-USR1", master], check=True)
    time.sleep(1)
    lines = (edge.directory / "log" / "nginx" / "access.log").read_text().splitlines()
    return [(fields[1], fields[-1]) for fields in (line.rsplit(" kokoa ", 1)[-1].split() for line in lines)]


def test_the_access_log_tells_limits_capacity_and_challenges_apart(start_edge):
    """What the edge's metrics count (docs/health.md, "Traffic"): the outcome each refusal is
    logged with, from the njs script (the challenge page) or from nginx (the share, the limits)."""
    edge = start_edge(capacity={"concurrentRequests": 3}, exemptPaths=["/api/"])
    visitor = edge.get("/").pass_cookie
    held = edge.hold("/?ms=2500")                       # the open part is taken
    assert edge.get("/").challenged                      # no pass: the challenge
    assert edge.get("/api/x").code == 503                # exempt path over the share: capacity
    kept = edge.hold("/?ms=2500", cookies={"kokoa_pass": visitor})
    assert edge.get("/", cookies={"kokoa_pass": visitor}).code == 503   # the whole share: capacity
    assert held.communicate(timeout=15)[0] == "200" and kept.communicate(timeout=15)[0] == "200"
    logged = _outcomes(edge)
    assert logged.count(("5xx", "challenge")) == 1
    assert logged.count(("5xx", "capacity")) == 2
    assert logged.count(("2xx", "-")) == 3 and len(logged) == 6


def test_a_rate_limited_request_is_logged_as_the_limit(start_edge):
    edge = start_edge(underAttack="off", rateLimit={"requestsPerSecond": 1, "burst": 2, "connections": 50})
    codes = [int(code) for code in edge.at_once("/", 8)]
    logged = _outcomes(edge)
    assert codes.count(429) >= 1
    assert logged.count(("4xx", "limit")) == codes.count(429)
    assert logged.count(("2xx", "-")) == codes.count(200)
