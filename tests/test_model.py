"""Validation and allocation of the stack config: one test per rule of CONTRACT.md."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest

from conftest import BASE_CONFIG
from kokoa_infra.model import InvalidConfig, next_index, next_subnet, parse_topology
from kokoa_infra.stackfile import kokoa_config


def problems_after(change: Callable[[dict[str, Any]], None]) -> list[str]:
    config = kokoa_config(copy.deepcopy(BASE_CONFIG))
    change(config)
    with pytest.raises(InvalidConfig) as raised:
        parse_topology(config)
    return [str(p) for p in raised.value.problems]


def test_valid_config_allocates_addresses_and_defaults():
    topology = parse_topology(kokoa_config(BASE_CONFIG))
    blog, shop = topology.origins
    assert (blog.wireguard_ip, blog.endpoint, blog.listen_port) == ("10.100.0.1", "203.0.113.10", 51820)
    assert (shop.wireguard_ip, shop.endpoint, shop.listen_port) == ("10.100.1.1", "203.0.113.21", 51821)
    assert blog.rate_limit.requests_per_second == 20 and shop.rate_limit.burst == 100
    assert blog.ssh.user == "root" and blog.ssh.port == 22
    tokyo2 = topology.edges[2]
    assert (tokyo2.wireguard_ip, tokyo2.ssh.host, tokyo2.ssh.port) == ("10.100.1.10", "198.51.100.9", 2222)
    assert [e.dns for e in topology.edges] == [True, False, True]
    assert topology.settings.acme_server == "https://acme-v02.api.letsencrypt.org/directory"


def test_network_setting_moves_every_address():
    config = kokoa_config(BASE_CONFIG) | {"network": "172.20.0.0/16"}
    topology = parse_topology(config)
    assert topology.origins[1].wireguard_ip == "172.20.1.1"
    assert topology.edges[0].wireguard_ip == "172.20.0.10"


def set_origin(i: int, key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c["origins"][i].__setitem__(key, value)


def set_edge(i: int, key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c["edges"][i].__setitem__(key, value)


def delete(section: str, i: int, key: str) -> Callable[[dict], None]:
    return lambda c: c[section][i].pop(key)


CASES = {
    # unknown origin
    "unknown origin": (set_edge(0, "origin", "wiki"),
                       "kokoa:edges[0] (edge-tokyo-1): origin: no origin is named 'wiki'"),
    # duplicates
    "duplicate origin name": (set_origin(1, "name", "blog"), "kokoa:origins[1] (blog): name: origin name 'blog' is already used"),
    "duplicate domain": (set_origin(1, "domain", "blog.example.com"), "kokoa:origins[1] (shop): domain: domain 'blog.example.com' is already used by kokoa:origins[0] (blog)"),
    "duplicate subnet": (set_origin(1, "subnet", 0), "kokoa:origins[1] (shop): subnet: subnet 0 is already used"),
    "duplicate origin host": (set_origin(1, "host", "203.0.113.10"), "kokoa:origins[1] (shop): host: origin host '203.0.113.10' is already used"),
    "duplicate edge name": (set_edge(1, "name", "edge-tokyo-1"), "kokoa:edges[1] (edge-tokyo-1): name: edge name 'edge-tokyo-1' is already used"),
    "duplicate public ip": (set_edge(2, "publicIp", "198.51.100.7"), "kokoa:edges[2] (edge-tokyo-2): publicIp: public IP '198.51.100.7' is already used"),
    "duplicate index": (set_edge(1, "index", 10), "kokoa:edges[1] (edge-osaka-1): index: origin and index ('blog', 10) is already used"),
    # ranges
    "subnet too big": (set_origin(0, "subnet", 256), "kokoa:origins[0] (blog): subnet: 256 is not a whole number from 0 to 255"),
    "subnet negative": (set_origin(0, "subnet", -1), "subnet: -1 is not a whole number"),
    "subnet not a number": (set_origin(0, "subnet", "1"), "subnet: '1' is not a whole number"),
    "subnet boolean": (set_origin(0, "subnet", True), "subnet: True is not a whole number"),
    "index below 10": (set_edge(0, "index", 9), "kokoa:edges[0] (edge-tokyo-1): index: 9 is not a whole number from 10 to 254"),
    "index above 254": (set_edge(0, "index", 255), "index: 255 is not a whole number from 10 to 254"),
    "listen port": (set_origin(0, "listenPort", 70000), "listenPort: 70000 is not a whole number from 1 to 65535"),
    "ssh port": (set_edge(0, "sshPort", 0), "kokoa:edges[0] (edge-tokyo-1): sshPort: 0 is not a whole number"),
    "rate limit": (set_origin(0, "rateLimit", {"requestsPerSecond": 0}), "kokoa:origins[0] (blog) rateLimit: requestsPerSecond: 0 is not a whole number"),
    # malformed addresses and names
    "malformed ip": (set_edge(0, "publicIp", "198.51.100.300"), "kokoa:edges[0] (edge-tokyo-1): publicIp: '198.51.100.300' is not an IPv4 address"),
    "ip with spaces": (set_edge(0, "publicIp", " 198.51.100.7"), "publicIp: ' 198.51.100.7' is not an IPv4 address"),
    "loopback ip": (set_edge(0, "publicIp", "127.0.0.1"), "publicIp: 127.0.0.1 cannot be a public address"),
    "edge on origin address": (set_edge(0, "publicIp", "203.0.113.10"), "publicIp: 203.0.113.10 is the address of origin blog"),
    "malformed domain": (set_origin(0, "domain", "blog..example.com"), "kokoa:origins[0] (blog): domain: 'blog..example.com' is not a lower-case domain name"),
    "upper-case domain": (set_origin(0, "domain", "Blog.example.com"), "domain: 'Blog.example.com' is not a lower-case"),
    "single-label domain": (set_origin(0, "domain", "localhost"), "domain: 'localhost' is not a lower-case"),
    "bad name": (set_origin(0, "name", "Blog"), "kokoa:origins[0] (Blog): name: 'Blog' is not a name"),
    "name too long": (set_edge(0, "name", "e" * 32), "name: '" + "e" * 32 + "' is not a name"),
    "bad host": (set_origin(0, "host", "host_name"), "kokoa:origins[0] (blog): host: 'host_name' is not an IPv4 address or host name"),
    "bad host key": (set_origin(0, "hostKey", "ssh-ed25519"), "hostKey: 'ssh-ed25519' is not an OpenSSH public host key"),
    "bad upstream": (set_origin(0, "upstream", "ftp://127.0.0.1"), "upstream: 'ftp://127.0.0.1' is not an http(s)"),
    "bad dns flag": (set_edge(0, "dns", "no"), "kokoa:edges[0] (edge-tokyo-1): dns: 'no' is not true or false"),
    # characters that would escape into a config file or shell script
    "domain with semicolon": (set_origin(0, "domain", "blog.example.com;reboot"), "domain: 'blog.example.com;reboot' is not"),
    "domain with newline": (set_origin(0, "domain", "blog.example.com\nserver_name evil"), "domain:"),
    "name with shell": (set_edge(0, "name", "edge$(reboot)"), "name: 'edge$(reboot)' is not"),
    "upstream with brace": (set_origin(0, "upstream", "http://127.0.0.1:8080/}"), "upstream:"),
    "upstream with quote": (set_origin(0, "upstream", "http://127.0.0.1:8080/'x"), "upstream:"),
    "host with space": (set_edge(0, "host", "a b"), "kokoa:edges[0] (edge-tokyo-1): host:"),
    "ssh user with dollar": (set_edge(0, "sshUser", "$USER"), "sshUser: '$USER' is not a user name"),
    "host key comment injection": (set_origin(0, "hostKey", "ssh-ed25519 AAAA x\ny"), "hostKey:"),
    # required keys and typos
    "missing domain": (delete("origins", 0, "domain"), "kokoa:origins[0] (blog): domain: is required"),
    "missing subnet": (delete("origins", 0, "subnet"), "subnet: is required"),
    "missing upstream": (delete("origins", 1, "upstream"), "kokoa:origins[1] (shop): upstream: is required"),
    "missing public ip": (delete("edges", 0, "publicIp"), "kokoa:edges[0] (edge-tokyo-1): publicIp: is required"),
    "missing index": (delete("edges", 0, "index"), "index: is required"),
    "unknown key": (set_edge(0, "publicIP", "198.51.100.7"), "kokoa:edges[0] (edge-tokyo-1): publicIP: unknown key"),
    "entry not a mapping": (lambda c: c["edges"].append("edge-x"), "kokoa:edges[3]: edges: must be a mapping"),
    # settings
    "missing acme email": (lambda c: c.pop("acmeEmail"), "kokoa: acmeEmail: is required"),
    "bad acme email": (lambda c: c.__setitem__("acmeEmail", "ops"), "kokoa: acmeEmail: 'ops' is not an e-mail address"),
    "acme server not https": (lambda c: c.__setitem__("acmeServer", "http://acme"), "kokoa: acmeServer:"),
    "public network": (lambda c: c.__setitem__("network", "8.8.0.0/16"), "kokoa: network:"),
    "network too small": (lambda c: c.__setitem__("network", "10.100.0.0/24"), "kokoa: network:"),
    "bad zone id": (lambda c: c.__setitem__("cloudflareZoneId", "zone"), "kokoa: cloudflareZoneId:"),
}


@pytest.mark.parametrize("change, expected", CASES.values(), ids=CASES.keys())
def test_bad_input_is_refused_naming_entry_and_key(change, expected):
    problems = problems_after(change)
    assert any(expected in p for p in problems), problems


def test_every_problem_is_reported_at_once():
    def many(c):
        c["edges"][0]["origin"] = "wiki"
        c["edges"][1]["index"] = 5
        c["origins"][1]["domain"] = "bad domain"
        c["acmeEmail"] = "nobody"
    problems = problems_after(many)
    assert len(problems) == 4, problems


def test_problems_of_one_value_are_not_repeated():
    # A bad subnet must not also be reported as a duplicate or missing value.
    problems = problems_after(set_origin(0, "subnet", 999))
    assert len(problems) == 1, problems


def test_next_free_allocations_fill_gaps():
    assert next_subnet([{"subnet": 0}, {"subnet": 2}]) == 1
    assert next_subnet([]) == 0
    edges = [{"origin": "blog", "index": 10}, {"origin": "blog", "index": 11}, {"origin": "shop", "index": 12}]
    assert next_index(edges, "blog") == 12
    assert next_index(edges, "shop") == 10
    with pytest.raises(ValueError, match="no free subnet"):
        next_subnet([{"subnet": n} for n in range(256)])
