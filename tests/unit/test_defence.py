"""Distributed floods, without a namespace: validation of capacity, underAttack, allowFrom,
exemptPaths and challengeDifficulty; the capacity split across edges; the rendered edge."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from kokoa_infra.admission import Admission, reserve, split_capacity
from kokoa_infra.model import Defence
from kokoa_infra.render import file_mode, render_edge_bundle
from kokoa_infra.validate import parse_topology
from tests.support.rendering import KEY, PASS_KEY, bundles
from tests.support.stacks import BASE_CONFIG, blog_problems, blog_with

BLOG = "kokoa:origins[0] (blog)"


problems = blog_problems


def defence(**values: Any) -> Defence:
    return parse_topology(blog_with(**values)).origin("blog").defence


def test_defaults_are_off_without_capacity_and_auto_with_it():
    assert defence() == Defence(capacity=None, under_attack="off", challenge_difficulty=16)
    assert defence(capacity={"concurrentRequests": 8}).under_attack == "auto"
    assert defence(capacity={"concurrentRequests": 8}, underAttack="off").under_attack == "off"
    on = defence(underAttack="on", allowFrom=["198.51.100.7", "10.0.0.0/8"], exemptPaths=["/api/", "/hooks"],
                 challengeDifficulty=20)
    assert (on.capacity, on.under_attack, on.challenge_difficulty) == (None, "on", 20)
    assert on.allow_from == ("198.51.100.7/32", "10.0.0.0/8") and on.exempt_paths == ("/api/", "/hooks")
    assert on.passes and not defence().passes


REFUSED = {
    "auto without capacity": ({"underAttack": "auto"},
                              f"{BLOG}: underAttack: auto challenges visitors only while the origin is at its "
                              "capacity: set capacity: {concurrentRequests: N} (the most requests the application "
                              "serves at once), or use on or off"),
    "unknown mode": ({"underAttack": "yes"}, f"{BLOG}: underAttack: 'yes' is not one of off, auto, on"),
    "a boolean mode": ({"underAttack": True}, f"{BLOG}: underAttack: True is not one of off, auto, on"),
    "capacity not a mapping": ({"capacity": 8}, f"{BLOG}: capacity: must be a mapping like {{concurrentRequests: 8}}"),
    "capacity 0": ({"capacity": {"concurrentRequests": 0}},
                   f"{BLOG} capacity: concurrentRequests: 0 is not a whole number from 1 to 65535"),
    "capacity over limit_conn": ({"capacity": {"concurrentRequests": 65536}},
                                 f"{BLOG} capacity: concurrentRequests: 65536 is not a whole number from 1 to 65535"),
    "capacity without its key": ({"capacity": {}}, f"{BLOG} capacity: concurrentRequests: is required"),
    "capacity unknown key": ({"capacity": {"concurrentRequests": 4, "requestsPerSecond": 9}},
                             f"{BLOG} capacity: requestsPerSecond: unknown key (allowed: concurrentRequests)"),
    "difficulty too low": ({"challengeDifficulty": 7},
                           f"{BLOG}: challengeDifficulty: 7 is not a whole number from 8 to 24"),
    "difficulty too high": ({"challengeDifficulty": 25},
                            f"{BLOG}: challengeDifficulty: 25 is not a whole number from 8 to 24"),
    "allowFrom not a list": ({"allowFrom": "10.0.0.0/8"},
                             f"{BLOG}: allowFrom: '10.0.0.0/8' is not a list of IPv4 networks like [\"192.0.2.0/24\"]"),
    "allowFrom host bits": ({"allowFrom": ["10.0.0.1/8"]}, f"{BLOG}: allowFrom[0]: '10.0.0.1/8' has host bits set; "
                                                            "write 10.0.0.0/8"),
    "allowFrom not a network": ({"allowFrom": ["10.0.0.0/8", "example.com"]},
                                f"{BLOG}: allowFrom[1]: 'example.com' is not an IPv4 network like 198.51.100.0/24"),
    "allowFrom twice": ({"allowFrom": ["10.0.0.0/8", "10.0.0.0/8"]},
                        f"{BLOG}: allowFrom: lists 10.0.0.0/8 more than once"),
    "allowFrom too many": ({"allowFrom": [f"10.0.{i}.0/24" for i in range(101)]},
                           f"{BLOG}: allowFrom: has 101 entries; at most 100"),
    "exempt without slash": ({"exemptPaths": ["api/"]},
                             f"{BLOG}: exemptPaths[0]: 'api/' is not a path prefix like /api/ (a leading /, then at "
                             "most 199 of A-Z a-z 0-9 . _ ~ / -)"),
    "exempt with a brace": ({"exemptPaths": ["/api/ { return 200; }"]},
                            f"{BLOG}: exemptPaths[0]: '/api/ {{ return 200; }}' is not a path prefix like /api/ (a "
                            "leading /, then at most 199 of A-Z a-z 0-9 . _ ~ / -)"),
    "exempt with a newline": ({"exemptPaths": ["/api/\n"]},
                              f"{BLOG}: exemptPaths[0]: '/api/\\n' is not a path prefix like /api/ (a leading /, then "
                              "at most 199 of A-Z a-z 0-9 . _ ~ / -)"),
    "exempt everything": ({"exemptPaths": ["/"]}, f"{BLOG}: exemptPaths[0]: '/' exempts every path, which is "
                                                   "underAttack: off"),
    "exempt dot-dot": ({"exemptPaths": ["/a/../b"]}, f"{BLOG}: exemptPaths[0]: '/a/../b' has an empty, . or .. "
                                                      "segment, which a normalised path never has"),
    "exempt double slash": ({"exemptPaths": ["/a//b"]}, f"{BLOG}: exemptPaths[0]: '/a//b' has an empty, . or .. "
                                                         "segment, which a normalised path never has"),
    "exempt acme": ({"exemptPaths": ["/.well-known/acme-challenge/"]},
                    f"{BLOG}: exemptPaths[0]: ACME challenges are never challenged already"),
    "exempt twice": ({"exemptPaths": ["/api/", "/api/"]}, f"{BLOG}: exemptPaths: lists /api/ more than once"),
    "exempt too long": ({"exemptPaths": ["/" + "a" * 200]},
                        f"{BLOG}: exemptPaths[0]: '/{'a' * 200}' is not a path prefix like /api/ (a leading /, then "
                        "at most 199 of A-Z a-z 0-9 . _ ~ / -)"),
}


@pytest.mark.parametrize("values, expected", REFUSED.values(), ids=REFUSED.keys())
def test_bad_defence_values_are_refused_one_message_each(values, expected):
    assert problems(**values) == [expected]


def test_every_problem_of_the_defence_is_reported_at_once():
    assert len(problems(underAttack="sometimes", challengeDifficulty=99, exemptPaths=["x", "/"],
                        allowFrom=["300.0.0.0/8"])) == 5


# --- the capacity split ---------------------------------------------------------------------

def edges_of(config: dict, origin: str = "blog"):
    topology = parse_topology(config)
    return topology.edges_of(topology.origin(origin))


def add_edges(config: dict, count: int) -> dict:
    for i in range(count):
        config["edges"].append({"name": f"edge-extra-{i}", "origin": "blog", "publicIp": f"198.51.100.{50 + i}",
                                "index": 20 + i, "hostKey": BASE_CONFIG["kokoa:edges"][0]["hostKey"]})
    return config


def test_reserve_for_pass_holders_is_a_quarter_and_never_the_whole_share():
    assert [reserve(share) for share in (1, 2, 3, 4, 7, 8, 16, 100)] == [0, 1, 1, 1, 1, 2, 4, 25]


def test_the_capacity_is_split_across_serving_edges_and_adds_up():
    config = add_edges(blog_with(capacity={"concurrentRequests": 10}), 2)  # tokyo-1, extra-0, extra-1 serve
    split = split_capacity(10, edges_of(config))
    # osaka-1 is drained: 1; the 9 left go 3/3/3.
    assert {name: a.share for name, a in split.items()} == {"edge-tokyo-1": 3, "edge-osaka-1": 1,
                                                            "edge-extra-0": 3, "edge-extra-1": 3}
    assert sum(a.share for a in split.values()) == 10
    assert split["edge-tokyo-1"] == Admission(share=3, open=2)


def test_adding_an_edge_shrinks_every_share_and_the_lower_indexes_take_the_remainder():
    config = blog_with(capacity={"concurrentRequests": 8})
    assert {n: a.share for n, a in split_capacity(8, edges_of(config)).items()} == {
        "edge-tokyo-1": 7, "edge-osaka-1": 1}
    config = add_edges(config, 2)
    assert {n: a.share for n, a in split_capacity(8, edges_of(config)).items()} == {
        "edge-tokyo-1": 3, "edge-osaka-1": 1, "edge-extra-0": 2, "edge-extra-1": 2}


def test_draining_gives_the_edge_one_and_the_rest_to_the_serving_ones():
    config = add_edges(blog_with(capacity={"concurrentRequests": 8}), 1)
    assert {n: a.share for n, a in split_capacity(8, edges_of(config)).items()} == {
        "edge-tokyo-1": 4, "edge-osaka-1": 1, "edge-extra-0": 3}
    config["edges"][0]["dns"] = False  # tokyo-1 drained as well
    assert {n: a.share for n, a in split_capacity(8, edges_of(config)).items()} == {
        "edge-tokyo-1": 1, "edge-osaka-1": 1, "edge-extra-0": 6}


def test_a_capacity_below_the_number_of_edges_still_gives_each_one():
    config = add_edges(blog_with(capacity={"concurrentRequests": 2}), 3)
    split = split_capacity(2, edges_of(config))
    assert set(a.share for a in split.values()) == {1} and all(a.open == 1 for a in split.values())


# --- the rendered edge ------------------------------------------------------------------------

def rendered(**values: Any) -> dict[str, str]:
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0].update(values)
    return bundles(config)["edge/edge-tokyo-1"]


def test_without_capacity_or_challenge_the_edge_loads_no_njs_and_keeps_no_key():
    files = rendered()
    assert "challenge.js" not in files and "pass-key.conf" not in files
    assert "js_" not in files["nginx.conf"] and "max_conns" not in files["nginx.conf"]
    assert "libnginx-mod-http-js" not in files["install.sh"]


def test_capacity_alone_answers_503_over_the_share_without_njs():
    conf = rendered(capacity={"concurrentRequests": 4}, underAttack="off")["nginx.conf"]
    assert "max_conns=3;" in conf and "zone kokoa_origin 64k;" in conf  # osaka-1 drained keeps 1
    assert "js_" not in conf and "error_page 502 503 = @kokoa_full;" in conf
    assert "add_header Retry-After 1 always;" in conf


def test_a_challenge_loads_njs_and_installs_its_module_and_secret_key():
    files = rendered(capacity={"concurrentRequests": 4}, exemptPaths=["/api/"], allowFrom=["10.9.3.0/24"])
    conf = files["nginx.conf"]
    assert conf.splitlines()[5].startswith("load_module /usr/lib/nginx/modules/ngx_http_js_module.so;")
    # Zones of their own: a reload that gave kokoa_requests another key would be refused.
    assert "limit_req_zone $kokoa_visitor zone=kokoa_visitor_requests:20m" in conf
    assert "limit_conn_zone $kokoa_visitor zone=kokoa_visitor_connections:20m" in conf
    assert "limit_conn kokoa_open 2;" in conf and "        10.9.3.0/24 1;" in conf
    assert re.search(r"location /api/ \{\n(.*\n)*?            error_page 502 503 = @kokoa_full;", conf)
    assert f"js_var $kokoa_pass_key {PASS_KEY};" in files["pass-key.conf"]
    assert file_mode("pass-key.conf") == 0o600 and file_mode("challenge.js") == 0o644
    assert "/usr/lib/nginx/modules/ngx_http_js_module.so:libnginx-mod-http-js" in files["install.sh"]


def test_a_new_pass_key_changes_nginx_conf_so_that_the_install_reloads_it():
    topology = parse_topology(blog_with(capacity={"concurrentRequests": 4}))
    origin, edge = topology.origin("blog"), topology.edges[0]
    one, other = (render_edge_bundle(topology.settings, origin, edge, KEY, KEY, KEY, pass_key=key,
                                     admission=Admission(3, 2))["nginx.conf"] for key in (PASS_KEY, "f" * 64))
    changed = [(a, b) for a, b in zip(one.splitlines(), other.splitlines()) if a != b]
    assert len(changed) == 1 and changed[0][0].startswith("# file, which reloads nginx: sha256 ")
    assert PASS_KEY not in one and "f" * 64 not in other  # the digest, not the key


def test_a_challenge_cannot_be_rendered_without_a_pass_key_nor_capacity_without_a_share():
    topology = parse_topology(blog_with(underAttack="on"))
    origin, edge = topology.origin("blog"), topology.edges[0]
    with pytest.raises(ValueError, match="needs its pass key"):
        render_edge_bundle(topology.settings, origin, edge, KEY, KEY, KEY)
    with pytest.raises(ValueError, match="needs its pass key"):
        render_edge_bundle(topology.settings, origin, edge, KEY, KEY, KEY, pass_key="not hex")
    capped = parse_topology(blog_with(capacity={"concurrentRequests": 4}, underAttack="off"))
    with pytest.raises(ValueError, match="an admission goes with origin blog's capacity"):
        render_edge_bundle(capped.settings, capped.origin("blog"), capped.edges[0], KEY, KEY, KEY)


def test_on_challenges_at_the_door_and_auto_only_when_full():
    on = rendered(underAttack="on")["nginx.conf"]
    assert "if ($kokoa_open) {\n                js_content kokoa.challenge;" in on
    assert "max_conns" not in on  # on needs no capacity
    auto = rendered(capacity={"concurrentRequests": 4})["nginx.conf"]
    assert "js_content kokoa.challenge;" not in auto and "error_page 502 503 = @kokoa_busy;" in auto


def test_shield_numbers_come_from_the_origin_rate_limit():
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0]["rateLimit"] = {"requestsPerSecond": 7, "burst": 9, "connections": 11}
    table = bundles(config)["edge/edge-tokyo-1"]["firewall.nft"]
    assert "limit rate over 7/second burst 9 packets } counter name shield_new drop" in table
    assert "ct count over 11 } counter name shield_open drop" in table
    config["kokoa:origins"][0]["rateLimit"] |= {"newConnectionsPerSecond": 3, "newConnectionsBurst": 4}
    table = bundles(config)["edge/edge-tokyo-1"]["firewall.nft"]
    assert "limit rate over 3/second burst 4 packets } counter name shield_new drop" in table
