"""idleTimeout, maxBodySize and streamingPaths of an origin: validation, one message per problem,
and what the edge and gateway render from them (served for real in tests/netns/test_real_sites.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kokoa_infra.render import DROPPED_CLIENT_HEADERS
from kokoa_infra.validate import parse_topology
from tests.support.rendering import bundles
from tests.support.stacks import BASE_CONFIG, blog_problems, blog_with

BLOG = "kokoa:origins[0] (blog)"
PATH_RULE = "is not a path prefix like /api/ (a leading /, then at most 199 of A-Z a-z 0-9 . _ ~ / -)"


problems = blog_problems


def rendered(**values: Any) -> dict[str, dict[str, str]]:
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0].update(values)
    return bundles(config)


REFUSED = {
    "idle 0": ({"idleTimeout": 0}, f"{BLOG}: idleTimeout: 0 is not a whole number from 1 to 3600"),
    "idle too long": ({"idleTimeout": 3601}, f"{BLOG}: idleTimeout: 3601 is not a whole number from 1 to 3600"),
    "idle as text": ({"idleTimeout": "60s"}, f"{BLOG}: idleTimeout: '60s' is not a whole number from 1 to 3600"),
    "body size in g": ({"maxBodySize": "1g"},
                       f"{BLOG}: maxBodySize: '1g' is not a size like 10m or 512k (a number, then k or m)"),
    "body size as number": ({"maxBodySize": 10},
                            f"{BLOG}: maxBodySize: 10 is not a size like 10m or 512k (a number, then k or m)"),
    "body size with a newline": ({"maxBodySize": "10m\n"},
                                 f"{BLOG}: maxBodySize: '10m\\n' is not a size like 10m or 512k "
                                 "(a number, then k or m)"),
    "body size 0": ({"maxBodySize": "0"},
                    f"{BLOG}: maxBodySize: '0' is not a size like 10m or 512k (a number, then k or m)"),
    "body size too small": ({"maxBodySize": "1023"}, f"{BLOG}: maxBodySize: '1023' is not from 1k to 1024m"),
    "body size too big": ({"maxBodySize": "1025m"}, f"{BLOG}: maxBodySize: '1025m' is not from 1k to 1024m"),
    "streaming not a list": ({"streamingPaths": "/upload/"},
                             f"{BLOG}: streamingPaths: '/upload/' is not a list of path prefixes like [\"/upload/\"]"),
    "streaming with a brace": ({"streamingPaths": ["/up { }"]}, f"{BLOG}: streamingPaths[0]: '/up {{ }}' {PATH_RULE}"),
    "streaming twice": ({"streamingPaths": ["/up/", "/up/"]}, f"{BLOG}: streamingPaths: lists /up/ more than once"),
    "streaming dot-dot": ({"streamingPaths": ["/a/../b"]},
                          f"{BLOG}: streamingPaths[0]: '/a/../b' has an empty, . or .. segment, which a normalised "
                          "path never has"),
    "streaming too many": ({"streamingPaths": [f"/p{i}/" for i in range(51)]},
                           f"{BLOG}: streamingPaths: has 51 entries; at most 50"),
}


@pytest.mark.parametrize("values, expected", REFUSED.values(), ids=REFUSED.keys())
def test_bad_values_are_refused_one_message_each(values, expected):
    assert problems(**values) == [expected]


def test_the_defaults_are_what_every_stack_had():
    blog = parse_topology(blog_with()).origin("blog")
    assert (blog.idle_timeout, blog.max_body_size, blog.streaming_paths) == (60, "16m", ())


def test_the_keys_reach_the_edge_and_both_gateway_forms():
    files = rendered(idleTimeout=300, maxBodySize="50m", streamingPaths=["/upload/", "/"],
                     upstream="http://127.0.0.1:8080/app")
    plain = rendered(upstream="http://127.0.0.1:8080/app")
    edge, gateway = files["edge/edge-tokyo-1"]["nginx.conf"], files["origin/blog"]["gateway.conf"]
    for conf, without in ((edge, plain["edge/edge-tokyo-1"]["nginx.conf"]),
                          (gateway, plain["origin/blog"]["gateway.conf"])):
        assert "client_max_body_size 50m;" in conf
        assert conf.count("proxy_read_timeout 300s;") == conf.count("proxy_send_timeout 300s;") == 2
        # "/" streams in the one `location /`: no duplicate location.
        assert conf.count("proxy_request_buffering off;") == 2
        assert conf.count("location / {") == without.count("location / {")
    relay = rendered(idleTimeout=300)["origin/blog"]["gateway.conf"]
    # The relay must not cut an upgraded connection before the edge's idleTimeout does.
    assert "proxy_timeout 315s;" in relay


def test_a_streaming_path_that_is_also_exempt_is_one_location():
    edge = rendered(underAttack="on", exemptPaths=["/upload/"], streamingPaths=["/upload/"])["edge/edge-tokyo-1"]
    conf = edge["nginx.conf"]
    assert conf.count("location /upload/ {") == 1
    assert conf.count("proxy_request_buffering off;") == 1


def test_every_proxied_location_drops_the_client_identity_headers():
    conf = rendered(underAttack="on", exemptPaths=["/api/"], streamingPaths=["/up/"])["edge/edge-tokyo-1"]["nginx.conf"]
    locations = conf.count("proxy_pass http://kokoa_origin;")
    assert locations == 3
    for header in ("True-Client-IP", "X-Client-IP", "CF-Connecting-IP", "X-Original-URL", "X-Rewrite-URL",
                   "X-Forwarded-Scheme"):
        assert header in DROPPED_CLIENT_HEADERS
        assert conf.count(f'proxy_set_header {header} "";') == locations, header
    assert conf.count("proxy_set_header X-Forwarded-Proto https;") == locations
