"""kokoa:origins[].hostnames: the validation's messages, what the edge and the gateway render for
several names (a door per application, a redirect behind the limits), one certificate for every name,
an A record per name and edge, and health and failover per name."""

from __future__ import annotations

import copy
import io
from datetime import datetime, timezone
from ipaddress import IPv4Address

import pytest
from ruamel.yaml import YAML

from kokoa_infra.health.probes import SweepOptions, run_sweep
from kokoa_infra.health.report import render_prometheus, sweep_document
from kokoa_infra.health.results import HostnameResult, HttpsResult, NodeResult, Sweep
from kokoa_infra.health.targets import HostnameTarget, LocalNetwork, Target, parse_targets
from kokoa_infra.lab.cloudflare_standin import FakeCloudflare
from kokoa_infra.mocked_program import run_program
from kokoa_infra.model import InvalidConfig
from kokoa_infra.render import applications
from kokoa_infra.stackfile import kokoa_config, remove_edge, set_edge_dns
from kokoa_infra.validate import parse_topology
from tests.support.rendering import bundles, wireguard_ips
from tests.support.stacks import BASE_CONFIG, blog_problems
from tests.unit.test_failover import IPS, TOKEN, ZONE_ID, agent, live

BLOG, WWW, API, STATIC = "blog.example.com", "www.blog.example.com", "api.blog.example.com", "static.blog.example.com"
HOSTNAMES = [{"name": WWW, "redirectTo": BLOG}, {"name": API, "upstream": "http://127.0.0.1:9000/v1"},
             {"name": STATIC}]
ENTRY = "kokoa:origins[0] (blog)"


def with_hostnames(hostnames=HOSTNAMES, **blog) -> dict:
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0] |= {"hostnames": copy.deepcopy(hostnames), **blog}
    return config


# --- validation ---------------------------------------------------------------------------------

def test_hostnames_are_read_in_order_with_their_upstream_or_redirect():
    blog = parse_topology(kokoa_config(with_hostnames())).origin("blog")
    assert blog.names == (BLOG, WWW, API, STATIC)
    assert [(h.upstream, h.redirect_to) for h in blog.hostnames] == [
        (None, BLOG), ("http://127.0.0.1:9000/v1", None), (None, None)]
    assert parse_topology(kokoa_config(BASE_CONFIG)).origin("blog").names == (BLOG,)


@pytest.mark.parametrize("hostnames, expected", [
    ({"name": WWW}, [f"{ENTRY}: hostnames: {{'name': '{WWW}'}} is not a list of entries"]),
    (["www"], [f"{ENTRY}: hostnames[0]: 'www' is not a mapping of keys to values"]),
    ([{"name": "WWW.blog.example.com"}],
     [f"{ENTRY} hostnames[0] (WWW.blog.example.com): name: 'WWW.blog.example.com' is not a lower-case domain name like "
      "www.blog.example.com"]),
    ([{"upstream": "http://127.0.0.1:9000"}], [f"{ENTRY} hostnames[0]: name: is required"]),
    ([{"name": WWW, "port": 80}],
     [f"{ENTRY} hostnames[0] ({WWW}): port: unknown key (allowed: name, redirectTo, upstream)"]),
    ([{"name": API, "upstream": "ftp://127.0.0.1"}],
     [f"{ENTRY} hostnames[0] ({API}): upstream: 'ftp://127.0.0.1' is not an http(s)://host[:port][/path] URL of "
      "the application"]),
    ([{"name": API, "upstream": "http://169.254.169.254/"}],
     [f"{ENTRY} hostnames[0] ({API}): upstream: 'http://169.254.169.254/': host 169.254.169.254 is link-local / "
      "cloud metadata (169.254.0.0/16), not the address of an application"]),
    ([{"name": WWW, "redirectTo": BLOG, "upstream": "http://127.0.0.1:9000"}],
     [f"{ENTRY} hostnames[0] ({WWW}): redirectTo: cannot go with upstream: a redirected name never reaches an "
      "application; keep one of the two"]),
    ([{"name": WWW, "redirectTo": WWW}],
     [f"{ENTRY} hostnames[0] ({WWW}): redirectTo: {WWW} is this name itself; redirect to a name that is served, "
      f"such as {BLOG}"]),
    ([{"name": WWW, "redirectTo": "shop.example.com"}],
     [f"{ENTRY} hostnames[0] ({WWW}): redirectTo: shop.example.com is not a name of this origin (its domain {BLOG} "
      "or one of its hostnames)"]),
    # A chain, and so a loop, is refused at each redirect that points at another redirect.
    ([{"name": WWW, "redirectTo": STATIC}, {"name": STATIC, "redirectTo": WWW}],
     [f"{ENTRY} hostnames[0] ({WWW}): redirectTo: {STATIC} is redirected itself (to {WWW}); redirect straight to a "
      f"name that is served, such as {BLOG}",
      f"{ENTRY} hostnames[1] ({STATIC}): redirectTo: {WWW} is redirected itself (to {STATIC}); redirect straight to a "
      f"name that is served, such as {BLOG}"]),
    ([{"name": BLOG}], [f"{ENTRY} hostnames[0] ({BLOG}): name: {BLOG} is already a name of {ENTRY}; a name belongs to "
                        "one origin, once"]),
    ([{"name": WWW}, {"name": WWW, "redirectTo": BLOG}],
     [f"{ENTRY} hostnames[1] ({WWW}): name: {WWW} is already a name of {ENTRY} hostnames[0] ({WWW}); a name "
      "belongs to one origin, once"]),
    ([{"name": "shop.example.com"}],
     [f"{ENTRY} hostnames[0] (shop.example.com): name: shop.example.com is already a name of "
      "kokoa:origins[1] (shop); a name belongs to one origin, once"]),
    ([{"name": f"n{i}.blog.example.com"} for i in range(100)],
     [f"{ENTRY}: hostnames: has 100 names; with the domain an origin has at most 100 (all on one "
      "certificate): at most 99 here"]),
], ids=["not a list", "not a mapping", "upper case", "no name", "unknown key", "bad upstream",
        "metadata upstream", "upstream and redirect", "self redirect", "foreign target", "loop",
        "the domain again", "twice", "another origin's domain", "101 names"])
def test_each_problem_of_hostnames_is_one_message_naming_entry_and_key(hostnames, expected):
    assert blog_problems(hostnames=hostnames) == expected


def test_a_hostname_taken_by_another_origin_is_reported_there_whatever_the_order():
    config = with_hostnames([{"name": "www.shop.example.com"}])
    config["kokoa:origins"][1]["hostnames"] = [{"name": "www.shop.example.com"}]
    with pytest.raises(InvalidConfig) as raised:
        parse_topology(kokoa_config(config))
    assert [str(p) for p in raised.value.problems] == [
        "kokoa:origins[1] (shop) hostnames[0] (www.shop.example.com): name: www.shop.example.com is already a "
        f"name of {ENTRY} hostnames[0] (www.shop.example.com); a name belongs to one origin, once"]


def test_99_hostnames_of_the_longest_length_are_accepted():
    tail = ".blog.example.com"
    names = [f"{'a' * 63}.{'b' * 63}.{'c' * 63}.{i:02d}{'d' * (253 - 3 * 64 - 2 - len(tail))}{tail}"
             for i in range(99)]
    assert all(len(name) == 253 for name in names)
    blog = parse_topology(kokoa_config(with_hostnames([{"name": name} for name in names]))).origin("blog")
    assert len(blog.names) == 100


# --- rendering -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, str]]:
    return bundles(with_hostnames(HOSTNAMES + [{"name": "ws.blog.example.com", "upstream": "http://127.0.0.1:9001"}]))


def server_block(conf: str, listen: str, server_name: str) -> str:
    """The server block of `conf` that listens on `listen` for `server_name` (its text up to the next one)."""
    for block in conf.split("\n    server {\n")[1:]:
        if f"listen {listen}" in block and f"server_name {server_name};" in block:
            return block
    raise AssertionError(f"no server for {server_name} on {listen}")


def test_one_application_per_upstream_each_at_its_own_door(rendered):
    blog = parse_topology(kokoa_config(with_hostnames())).origin("blog")
    apps = applications(blog)
    assert [(a.names, a.door, a.suffix, a.relay) for a in apps] == [
        ((BLOG, STATIC), 80, "", True), ((API,), 81, "_1", False)]
    ip = wireguard_ips(BASE_CONFIG)["blog"]
    edge = rendered["edge/edge-tokyo-1"]["nginx.conf"]
    # The edge sends each name to its application's door; the origin's upstream keeps its name.
    for suffix, door in (("", 80), ("_1", 81), ("_2", 82)):
        assert f"upstream kokoa_origin{suffix} {{\n        server {ip}:{door};" in edge
    # A server per name (its own $server_name for the access log), each to its application's door.
    for name, group in ((BLOG, "kokoa_origin"), (STATIC, "kokoa_origin"), (API, "kokoa_origin_1"),
                        ("ws.blog.example.com", "kokoa_origin_2")):
        assert f"proxy_pass http://{group};" in server_block(edge, "443 ssl http2", name)
    # Port 80 takes every name (ACME's challenges for each, and the way to HTTPS).
    for name in (BLOG, WWW, API, STATIC, "ws.blog.example.com"):
        assert "location /.well-known/acme-challenge/" in server_block(edge, "80;", name)
    # The gateway: the origin's upstream relayed on 80, api's HTTP proxy under its path on 81,
    # ws's relay on 82; the firewall opens exactly these doors (and the certificate port) to the edges.
    gateway = rendered["origin/blog"]["gateway.conf"]
    http, stream = gateway.split("\nstream {\n")
    assert f"listen {ip}:81;\n        server_name {API};" in http
    assert "proxy_pass http://kokoa_application_1/v1$uri;" in http and "server 127.0.0.1:9000;" in http
    assert f"listen {ip}:80;" in stream and "proxy_pass kokoa_application;" in stream
    assert f"listen {ip}:82;" in stream and "proxy_pass kokoa_application_2;" in stream
    assert "server 127.0.0.1:9001;" in stream
    assert f"ip daddr {ip} tcp dport {{ 80, 81, 82, 9080 }} accept" in rendered["origin/blog"]["firewall.nft"]


def test_a_redirecting_name_is_answered_at_the_edge_behind_the_limits(rendered):
    redirect = server_block(rendered["edge/edge-tokyo-1"]["nginx.conf"], "443 ssl http2", WWW)
    assert "proxy_pass" not in redirect   # never the origin
    assert f"return 301 https://{BLOG}$request_uri;" in redirect
    # The limits apply before the redirect: a `return` in the location would come before them.
    assert "limit_req zone=kokoa_requests burst=40 delay=20;" in redirect
    assert "limit_conn kokoa_connections 50;" in redirect
    location = redirect.split("location / {", 1)[1].split("}", 1)[0]
    assert "return" not in location and "try_files /kokoa @kokoa_redirect;" in location
    assert "ssl_certificate /etc/letsencrypt/live/blog.example.com/fullchain.pem;" in redirect


def test_capacity_counts_the_origins_own_upstream_and_the_challenge_every_served_name():
    rendered = bundles(with_hostnames(capacity={"concurrentRequests": 8}, underAttack="on"))
    edge = rendered["edge/edge-tokyo-1"]["nginx.conf"]
    assert "server 10.100.0.1:80 max_conns=" in edge and "server 10.100.0.1:81;" in edge
    own = [server_block(edge, "443 ssl http2", name) for name in (BLOG, STATIC)]
    api = server_block(edge, "443 ssl http2", API)
    assert all("limit_conn kokoa_open" in block for block in own) and "limit_conn kokoa_open" not in api
    for served in (*own, api):
        assert "js_content kokoa.challenge;" in served and "limit_req zone=kokoa_visitor_requests" in served


def test_one_certificate_for_every_name_replaced_when_the_names_change(rendered):
    script = rendered["origin/blog"]["certificate.sh"]
    assert (f"NAMES=(-d {WWW} -d {API} -d {STATIC} -d ws.blog.example.com --renew-with-new-domains)\n"
            'certbot certonly --webroot -w "$WEBROOT" -d "$DOMAIN" "${NAMES[@]}" --cert-name "$DOMAIN"') in script
    # The edges keep fetching the one lineage, named after the domain.
    assert "TLS_DIR=/etc/letsencrypt/live/blog.example.com" in rendered["edge/edge-tokyo-1"]["cert-refresh.sh"]


# --- the program: records, the certificate step, the outputs ----------------------------------------

@pytest.fixture(scope="module")
def program():
    return run_program(with_hostnames())


def test_an_a_record_for_every_name_on_every_serving_edge(program):
    records = {(r.name, r.inputs["name"], r.inputs["content"])
               for r in program.of_type("cloudflare:index/dnsRecord:DnsRecord")}
    assert records == {
        ("edge-tokyo-1-a-record", BLOG, "198.51.100.7"),   # the resource name it always had
        (f"edge-tokyo-1-a-record-{WWW}", WWW, "198.51.100.7"),
        (f"edge-tokyo-1-a-record-{API}", API, "198.51.100.7"),
        (f"edge-tokyo-1-a-record-{STATIC}", STATIC, "198.51.100.7"),
        ("edge-tokyo-2-a-record", "shop.example.com", "198.51.100.9")}   # edge-osaka-1 is drained
    assert program.outputs["dnsRecords"] == {BLOG: ["198.51.100.7"], WWW: ["198.51.100.7"],
                                             API: ["198.51.100.7"], STATIC: ["198.51.100.7"],
                                             "shop.example.com": ["198.51.100.9"]}


def test_the_certificate_step_names_every_name_and_waits_for_every_record(program):
    certificate = program.named("blog-certificate")
    assert certificate.inputs["create"].startswith(f"# kokoa certificate for {BLOG}, {WWW}, {API}, {STATIC} from ")
    records = {r.urn for r in program.of_type("cloudflare:index/dnsRecord:DnsRecord")
               if r.inputs["name"] != "shop.example.com"}
    assert records <= set(certificate.dependencies)
    # A stack without hostnames keeps the command it had (no re-run at the next up).
    plain = run_program(BASE_CONFIG).named("blog-certificate").inputs["create"]
    assert plain.startswith(f"# kokoa certificate for {BLOG} from https://")


def test_the_outputs_name_every_hostname(program):
    out = program.outputs
    assert out["origins"]["blog"]["hostnames"] == [WWW, API, STATIC]
    assert out["edges"]["edge-tokyo-1"]["hostnames"] == [WWW, API, STATIC]
    edge = next(t for t in out["healthTargets"] if t["name"] == "edge-tokyo-1")
    assert edge["hostnames"] == [{"name": WWW, "redirectTo": BLOG}, {"name": API}, {"name": STATIC}]
    targets = parse_targets(out)
    assert next(t for t in targets if t.name == "edge-tokyo-1").hostnames == (
        HostnameTarget(WWW, BLOG), HostnameTarget(API), HostnameTarget(STATIC))


def test_drain_and_remove_edge_name_every_record(tmp_path):
    path = tmp_path / "Pulumi.prod.yaml"
    buffer = io.StringIO()
    YAML().dump({"config": with_hostnames()}, buffer)
    path.write_text(buffer.getvalue())
    change = set_edge_dns(path, "edge-tokyo-2", serving=False, force=True)
    assert "deletes the A record shop.example.com → 198.51.100.9 (TTL 60 s)" in change.next_up
    change = set_edge_dns(path, "edge-osaka-1", serving=True)
    assert [line for line in change.next_up if line.startswith("creates")] == [
        f"creates the A record {name} → 198.51.100.8 (TTL 60 s)" for name in (BLOG, WWW, API, STATIC)]
    assert f"{BLOG}, {WWW}, {API}, {STATIC} is then served by edge-tokyo-1, edge-osaka-1" in change.next_up
    change = remove_edge(path, "edge-osaka-1")
    assert sum(line.startswith("deletes the A record") for line in change.next_up) == 4


# --- health and failover, per name ---------------------------------------------------------------

def edge_target(name: str, **extra) -> Target:
    return Target(name=name, role="edge", origin="blog", domain=BLOG, wireguard_ip=IPv4Address("10.100.0.10"),
                  public_ip=IPS[name], hostnames=(HostnameTarget(WWW, BLOG), HostnameTarget(API)), **extra)


def test_every_name_is_probed_through_every_edge_a_redirect_for_its_301():
    probed = []

    def fake_https(name, address, timeout_s, ca_bundle, port, health_token=None, redirect_to=None):
        probed.append((name, address, redirect_to))
        ok = name != API
        return HttpsResult(ok, 301 if redirect_to else 200 if ok else 502, 1.0, 80, None if ok else "HTTP 502",
                           f"https://{redirect_to}/" if redirect_to else None)

    sweep = run_sweep([edge_target("e1"), edge_target("e2")], SweepOptions(checks=("https",)), LocalNetwork({}, ()),
                      https=fake_https)
    assert sorted(probed) == sorted((name, IPS[edge], redirect) for edge in ("e1", "e2")
                                    for name, redirect in ((BLOG, None), (WWW, BLOG), (API, None)))
    node = sweep.nodes[0]
    assert node.https.ok and not node.healthy and node.problem() == f"https {API}: HTTP 502"
    document = sweep_document(sweep)["nodes"][0]["checks"]
    assert document["https"]["code"] == 200   # the domain's, as before
    assert [(h["hostname"], h["redirectTo"], h["ok"], h["location"]) for h in document["hostnames"]] == [
        (WWW, BLOG, True, f"https://{BLOG}/"), (API, None, False, None)]
    metrics = render_prometheus(sweep)
    assert f'kokoa_hostname_up{{name="e1",role="edge",origin="blog",hostname="{WWW}"}} 1' in metrics
    assert f'kokoa_hostname_up{{name="e1",role="edge",origin="blog",hostname="{API}"}} 0' in metrics


@pytest.fixture
def cloudflare():
    with FakeCloudflare(TOKEN, ZONE_ID, zone_name="example.com") as server:
        yield server


def sweep_by_name(results: dict[tuple[str, str], bool]) -> Sweep:
    """edge -> name -> passed, for e1 and e2 with blog's three names."""
    def https(ok: bool) -> HttpsResult:
        return HttpsResult(ok, 200 if ok else 502, 1.0, 80, None if ok else "HTTP 502")
    nodes = []
    for edge in ("e1", "e2"):
        target = edge_target(edge)
        nodes.append(NodeResult(target, None, https(results.get((edge, BLOG), True)),
                                hostnames=tuple(HostnameResult(n, https(results.get((edge, n), True)))
                                                for n in (WWW, API))))
    return Sweep(checked_at=datetime.now(timezone.utc), duration_s=0.1, checks=("https",), nodes=nodes)


def test_failover_parks_only_the_name_an_edge_fails(cloudflare, tmp_path):
    for edge in ("e1", "e2"):
        for name in (BLOG, WWW, API):
            cloudflare.add_record("A", name, IPS[edge], ttl=60, comment=f"kokoa edge {edge} (stack t)")
    a = agent(cloudflare, tmp_path, fail_after=2, recover_after=1)
    for _ in range(2):
        report = a.after_sweep(sweep_by_name({("e1", WWW): False}))
    # e1's www record is parked under its own name; its other names stay in DNS.
    assert live(cloudflare, WWW) == {IPS["e2"]}
    assert live(cloudflare, BLOG) == live(cloudflare, API) == {IPS["e1"], IPS["e2"]}
    assert any(r["name"] == f"kokoa-out-e1.{WWW}" for r in cloudflare.records_of("A"))
    assert list(report.removed) == [("e1", WWW)]
    # api fails through every edge: that name's counts are held (not the edges' other names').
    for _ in range(3):
        report = a.after_sweep(sweep_by_name({("e1", WWW): False, ("e1", API): False, ("e2", API): False}))
    assert live(cloudflare, API) == {IPS["e1"], IPS["e2"]}
    assert any(f"every edge of blog fails from here for {API}" in note for note in report.notes)
    # Both fail www in one sweep: held; then e1 passes www again and e2 fails it: they swap places.
    report = a.after_sweep(sweep_by_name({("e1", WWW): False, ("e2", WWW): False}))
    assert any("every edge of blog fails from here for www.blog.example.com" in note for note in report.notes)
    for _ in range(2):
        a.after_sweep(sweep_by_name({("e1", WWW): True, ("e2", WWW): False}))
    assert live(cloudflare, WWW) == {IPS["e1"]}
    a.after_sweep(sweep_by_name({}))
    assert live(cloudflare, WWW) == {IPS["e1"], IPS["e2"]}   # put back under the name it left
