"""Validation and allocation of the stack config: one test per rule of stacks/reference.yaml.

Every refusal is checked by its whole message; bounds that another tool consumes are
checked against that tool (`nginx -t`, `nft -c`).
"""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from kokoa_infra import model
from kokoa_infra.addressing import next_index, next_subnet
from kokoa_infra.model import DEFAULT_HSTS_MAX_AGE, InvalidConfig, RateLimit
from kokoa_infra.schema import declared_key, declared_keys
from kokoa_infra.stackfile import kokoa_config
from kokoa_infra.validate import parse_topology
from tests.support.stacks import BASE_CONFIG

PROJECT_DIR = Path(__file__).resolve().parents[2]
RSA_WHY = ("pulumi-command offers only SHA-1 ssh-rsa signatures for RSA host keys, which OpenSSH 8.8 "
           "and later refuse, so the connection would fail")


def problems_after(change: Callable[[dict[str, Any]], None]) -> list[str]:
    config = kokoa_config(copy.deepcopy(BASE_CONFIG))
    change(config)
    with pytest.raises(InvalidConfig) as raised:
        parse_topology(config)
    return [str(p) for p in raised.value.problems]


def topology_after(change: Callable[[dict[str, Any]], None]) -> model.Topology:
    config = kokoa_config(copy.deepcopy(BASE_CONFIG))
    change(config)
    return parse_topology(config)


def test_valid_config_allocates_addresses_and_defaults():
    topology = parse_topology(kokoa_config(BASE_CONFIG))
    blog, shop = topology.origins
    assert (blog.wireguard_ip, blog.endpoint, blog.listen_port) == ("10.100.0.1", "203.0.113.10", 51820)
    assert (shop.wireguard_ip, shop.endpoint, shop.listen_port) == ("10.100.1.1", "203.0.113.21", 51821)
    assert blog.rate_limit.requests_per_second == 20 and shop.rate_limit.burst == 100
    assert blog.ssh.user == "root" and blog.ssh.port == 22
    assert blog.ssh.host_key == BASE_CONFIG["kokoa:origins"][0]["hostKey"]
    assert not blog.ssh.insecure_any_host_key
    tokyo2 = topology.edges[2]
    assert (tokyo2.wireguard_ip, tokyo2.ssh.host, tokyo2.ssh.port) == ("10.100.1.10", "198.51.100.9", 2222)
    assert [e.dns for e in topology.edges] == [True, False, True]
    assert topology.settings.acme_server == "https://acme-v02.api.letsencrypt.org/directory"
    # The keys other parts build on, with their defaults.
    assert topology.settings.ssh_allow_from == ("0.0.0.0/0",)
    assert topology.settings.ssh_open_to_everyone
    assert (blog.hsts_max_age, blog.key_generation) == (63072000, 1)
    assert [e.key_generation for e in topology.edges] == [1, 1, 1]
    assert (blog.rate_limit.new_connections_per_second, blog.rate_limit.new_connections_burst) == (20, 40)
    assert (shop.rate_limit.new_connections_per_second, shop.rate_limit.new_connections_burst) == (50, 100)


def test_network_setting_moves_every_address():
    config = kokoa_config(BASE_CONFIG) | {"network": "172.20.0.0/16"}
    topology = parse_topology(config)
    assert topology.origins[1].wireguard_ip == "172.20.1.1"
    assert topology.edges[0].wireguard_ip == "172.20.0.10"


def set_origin(i: int, key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c["origins"][i].__setitem__(key, value)


def set_edge(i: int, key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c["edges"][i].__setitem__(key, value)


def set_setting(key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c.__setitem__(key, value)


def delete(section: str, i: int, key: str) -> Callable[[dict], None]:
    return lambda c: c[section][i].pop(key)


def both(*changes: Callable[[dict], None]) -> Callable[[dict], None]:
    def change(c: dict) -> None:
        for one in changes:
            one(c)
    return change


BLOG = "kokoa:origins[0] (blog)"
SHOP = "kokoa:origins[1] (shop)"
TOKYO = "kokoa:edges[0] (edge-tokyo-1)"
OSAKA = "kokoa:edges[1] (edge-osaka-1)"
TOKYO2 = "kokoa:edges[2] (edge-tokyo-2)"
NOT_A_NAME = "is not a name matching ^[a-z][a-z0-9-]{0,30}$"
NOT_A_DOMAIN = "is not a lower-case domain name like blog.example.com"
NOT_AN_UPSTREAM = "is not an http(s)://host[:port][/path] URL of the application"
NOT_A_HOST = "is not an IPv4 address or host name"
NOT_A_HOST_KEY = "is not an OpenSSH public host key like 'ssh-ed25519 AAAA...'"
NOT_AN_IP = "is not an IPv4 address like 198.51.100.7"
NOT_A_ZONE = "is not a 32-character hex Cloudflare zone id"
NOT_A_NETWORK = ("is not a private IPv4 network of /16 or larger (origin X gets <net>.X.1), "
                 "e.g. 10.100.0.0/16")
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDd7AtxSHCugrtrMKP/YMzbtnWxfXPvYgySEdfDEVk+n"

CASES = {
    # unknown origin
    "unknown origin": (set_edge(0, "origin", "wiki"),
                       f"{TOKYO}: origin: no origin is named 'wiki' (origins: blog, shop)"),
    # duplicates
    "duplicate origin name": (set_origin(1, "name", "blog"),
                              "kokoa:origins[1] (blog): name: origin name 'blog' is already used by "
                              "kokoa:origins[0]"),
    "duplicate domain": (set_origin(1, "domain", "blog.example.com"),
                         f"{SHOP}: domain: domain 'blog.example.com' is already used by {BLOG}"),
    "duplicate subnet": (set_origin(1, "subnet", 0), f"{SHOP}: subnet: subnet 0 is already used by {BLOG}"),
    "duplicate origin host": (set_origin(1, "host", "203.0.113.10"),
                              f"{SHOP}: host: origin host '203.0.113.10' is already used by {BLOG}"),
    "duplicate endpoint and port": (both(set_origin(1, "endpoint", "203.0.113.10"),
                                         set_origin(1, "listenPort", 51820)),
                                    f"{SHOP}: listenPort: endpoint and port ('203.0.113.10', 51820) is "
                                    f"already used by {BLOG}"),
    "duplicate edge name": (set_edge(1, "name", "edge-tokyo-1"),
                            "kokoa:edges[1] (edge-tokyo-1): name: edge name 'edge-tokyo-1' is already used "
                            "by kokoa:edges[0]"),
    "duplicate public ip": (set_edge(2, "publicIp", "198.51.100.7"),
                            f"{TOKYO2}: publicIp: public IP '198.51.100.7' is already used by {TOKYO}"),
    "duplicate edge host": (set_edge(2, "host", "198.51.100.7"),
                            f"{TOKYO2}: host: edge host '198.51.100.7' is already used by {TOKYO}"),
    "duplicate index": (set_edge(1, "index", 10),
                        f"{OSAKA}: index: origin and index ('blog', 10) is already used by {TOKYO}"),
    # ranges
    "subnet too big": (set_origin(0, "subnet", 256), f"{BLOG}: subnet: 256 is not a whole number from 0 to 255"),
    "subnet negative": (set_origin(0, "subnet", -1), f"{BLOG}: subnet: -1 is not a whole number from 0 to 255"),
    "subnet not a number": (set_origin(0, "subnet", "1"),
                            f"{BLOG}: subnet: '1' is not a whole number from 0 to 255"),
    "subnet boolean": (set_origin(0, "subnet", True),
                       f"{BLOG}: subnet: True is not a whole number from 0 to 255"),
    "index below 10": (set_edge(0, "index", 9), f"{TOKYO}: index: 9 is not a whole number from 10 to 254"),
    "index above 254": (set_edge(0, "index", 255), f"{TOKYO}: index: 255 is not a whole number from 10 to 254"),
    "listen port": (set_origin(0, "listenPort", 70000),
                    f"{BLOG}: listenPort: 70000 is not a whole number from 1 to 65535"),
    "ssh port": (set_edge(0, "sshPort", 0), f"{TOKYO}: sshPort: 0 is not a whole number from 1 to 65535"),
    "cert refresh interval": (set_setting("certRefreshInterval", 4),
                              "kokoa: certRefreshInterval: 4 is not a whole number from 5 to 86400"),
    # malformed addresses and names
    "domain that is an address": (set_origin(0, "domain", "203.0.113.10"),
                                  f"{BLOG}: domain: '203.0.113.10' {NOT_A_DOMAIN}"),
    "malformed ip": (set_edge(0, "publicIp", "198.51.100.300"), f"{TOKYO}: publicIp: '198.51.100.300' {NOT_AN_IP}"),
    "ip with spaces": (set_edge(0, "publicIp", " 198.51.100.7"), f"{TOKYO}: publicIp: ' 198.51.100.7' {NOT_AN_IP}"),
    "ip not a string": (set_edge(0, "publicIp", 3325256711), f"{TOKYO}: publicIp: 3325256711 {NOT_AN_IP}"),
    "edge on origin address": (set_edge(0, "publicIp", "203.0.113.10"),
                               f"{TOKYO}: publicIp: 203.0.113.10 is the address of origin blog; an edge "
                               "must run on its own server"),
    "edge on origin endpoint": (set_edge(0, "publicIp", "203.0.113.21"),
                                f"{TOKYO}: publicIp: 203.0.113.21 is the address of origin shop; an edge "
                                "must run on its own server"),
    "edge ssh on origin host": (set_edge(0, "host", "203.0.113.20"),
                                f"{TOKYO}: host: 203.0.113.20 is the address of origin shop; an edge "
                                "must run on its own server"),
    "malformed domain": (set_origin(0, "domain", "blog..example.com"),
                         f"{BLOG}: domain: 'blog..example.com' {NOT_A_DOMAIN}"),
    "upper-case domain": (set_origin(0, "domain", "Blog.example.com"),
                          f"{BLOG}: domain: 'Blog.example.com' {NOT_A_DOMAIN}"),
    "single-label domain": (set_origin(0, "domain", "localhost"), f"{BLOG}: domain: 'localhost' {NOT_A_DOMAIN}"),
    "bad name": (set_origin(0, "name", "Blog"), f"kokoa:origins[0] (Blog): name: 'Blog' {NOT_A_NAME}"),
    "name too long": (set_edge(0, "name", "e" * 32),
                      f"kokoa:edges[0] ({'e' * 32}): name: '{'e' * 32}' {NOT_A_NAME}"),
    "bad host": (set_origin(0, "host", "host_name"), f"{BLOG}: host: 'host_name' {NOT_A_HOST}"),
    "bad upstream": (set_origin(0, "upstream", "ftp://127.0.0.1"),
                     f"{BLOG}: upstream: 'ftp://127.0.0.1' {NOT_AN_UPSTREAM}"),
    "bad dns flag": (set_edge(0, "dns", "no"), f"{TOKYO}: dns: 'no' is not true or false"),
    # characters that would escape into a config file or shell script
    "domain with semicolon": (set_origin(0, "domain", "blog.example.com;reboot"),
                              f"{BLOG}: domain: 'blog.example.com;reboot' {NOT_A_DOMAIN}"),
    "domain with newline": (set_origin(0, "domain", "blog.example.com\nserver_name evil"),
                            f"{BLOG}: domain: 'blog.example.com\\nserver_name evil' {NOT_A_DOMAIN}"),
    "name with shell": (set_edge(0, "name", "edge$(reboot)"),
                        f"kokoa:edges[0] (edge$(reboot)): name: 'edge$(reboot)' {NOT_A_NAME}"),
    "upstream with brace": (set_origin(0, "upstream", "http://127.0.0.1:8080/}"),
                            f"{BLOG}: upstream: 'http://127.0.0.1:8080/}}' {NOT_AN_UPSTREAM}"),
    "upstream with quote": (set_origin(0, "upstream", "http://127.0.0.1:8080/'x"),
                            f"{BLOG}: upstream: \"http://127.0.0.1:8080/'x\" {NOT_AN_UPSTREAM}"),
    "host with space": (set_edge(0, "host", "a b"), f"{TOKYO}: host: 'a b' {NOT_A_HOST}"),
    "ssh user with dollar": (set_edge(0, "sshUser", "$USER"), f"{TOKYO}: sshUser: '$USER' is not a user name"),
    "host key comment injection": (set_origin(0, "hostKey", "ssh-ed25519 AAAA x\ny"),
                                   f"{BLOG}: hostKey: 'ssh-ed25519 AAAA x\\ny' {NOT_A_HOST_KEY}"),
    # required keys and typos
    "missing domain": (delete("origins", 0, "domain"), f"{BLOG}: domain: is required"),
    "missing subnet": (delete("origins", 0, "subnet"), f"{BLOG}: subnet: is required"),
    "missing host": (delete("origins", 0, "host"), f"{BLOG}: host: is required"),
    "missing upstream": (delete("origins", 1, "upstream"), f"{SHOP}: upstream: is required"),
    "missing public ip": (delete("edges", 0, "publicIp"), f"{TOKYO}: publicIp: is required"),
    "missing index": (delete("edges", 0, "index"), f"{TOKYO}: index: is required"),
    "unknown key": (set_edge(0, "publicIP", "198.51.100.7"),
                    f"{TOKYO}: publicIP: unknown key (allowed: dns, host, hostKey, index, insecureAnyHostKey, "
                    "keyGeneration, name, origin, publicIp, sshPort, sshUser)"),
    "unknown rate limit key": (set_origin(0, "rateLimit", {"rps": 5}),
                               f"{BLOG} rateLimit: rps: unknown key (allowed: burst, connections, "
                               "newConnectionsBurst, newConnectionsPerSecond, requestsPerSecond)"),
    "rate limit not a mapping": (set_origin(0, "rateLimit", 5),
                                 f"{BLOG}: rateLimit: must be a mapping like {{requestsPerSecond: 20, "
                                 "burst: 40, connections: 50}"),
    "entry not a mapping": (lambda c: c["edges"].append("edge-x"),
                            "kokoa: edges[3]: 'edge-x' is not a mapping of keys to values"),
    "entries not a list": (set_setting("edges", {"name": "x"}), "kokoa: edges: {'name': 'x'} is not a list of entries"),
    # settings
    "missing acme email": (lambda c: c.pop("acmeEmail"), "kokoa: acmeEmail: is required"),
    "bad acme email": (set_setting("acmeEmail", "ops"), "kokoa: acmeEmail: 'ops' is not an e-mail address"),
    "acme server not https": (set_setting("acmeServer", "http://acme"),
                              "kokoa: acmeServer: 'http://acme' is not an https:// ACME directory URL"),
    "acme ca bundle not pem": (set_setting("acmeCaBundle", "cert"),
                               "kokoa: acmeCaBundle: must be PEM text with at least one CERTIFICATE block"),
    "public network": (set_setting("network", "8.8.0.0/16"), f"kokoa: network: '8.8.0.0/16' {NOT_A_NETWORK}"),
    "network too small": (set_setting("network", "10.100.0.0/24"),
                          f"kokoa: network: '10.100.0.0/24' {NOT_A_NETWORK}"),
    "bad zone id": (set_setting("cloudflareZoneId", "zone"), f"kokoa: cloudflareZoneId: 'zone' {NOT_A_ZONE}"),
    "bad origin zone id": (set_origin(0, "zoneId", "ZONE"), f"{BLOG}: zoneId: 'ZONE' {NOT_A_ZONE}"),
}

# A value with a trailing newline passes `re.match(r"^...$")`; every field uses fullmatch.
NEWLINE = {
    "origin name": (set_origin(0, "name", "blog\n"), f"kokoa:origins[0]: name: 'blog\\n' {NOT_A_NAME}"),
    "edge name": (set_edge(0, "name", "edge-tokyo-1\n"),
                  f"kokoa:edges[0]: name: 'edge-tokyo-1\\n' {NOT_A_NAME}"),
    "edge origin": (set_edge(0, "origin", "blog\n"), f"{TOKYO}: origin: 'blog\\n' is not an origin name"),
    "domain": (set_origin(0, "domain", "blog.example.com\n"),
               f"{BLOG}: domain: 'blog.example.com\\n' {NOT_A_DOMAIN}"),
    "upstream": (set_origin(0, "upstream", "http://127.0.0.1:8080\n"),
                 f"{BLOG}: upstream: 'http://127.0.0.1:8080\\n' {NOT_AN_UPSTREAM}"),
    "origin host name": (set_origin(0, "host", "blog-server.example.com\n"),
                         f"{BLOG}: host: 'blog-server.example.com\\n' {NOT_A_HOST}"),
    "origin host address": (set_origin(0, "host", "203.0.113.10\n"), f"{BLOG}: host: '203.0.113.10\\n' {NOT_A_HOST}"),
    "edge host": (set_edge(0, "host", "198.51.100.7\n"), f"{TOKYO}: host: '198.51.100.7\\n' {NOT_A_HOST}"),
    "endpoint": (set_origin(1, "endpoint", "203.0.113.21\n"), f"{SHOP}: endpoint: '203.0.113.21\\n' {NOT_A_HOST}"),
    "public ip": (set_edge(0, "publicIp", "198.51.100.7\n"), f"{TOKYO}: publicIp: '198.51.100.7\\n' {NOT_AN_IP}"),
    "acme email": (set_setting("acmeEmail", "ops@example.com\n"),
                   "kokoa: acmeEmail: 'ops@example.com\\n' is not an e-mail address"),
    "acme server": (set_setting("acmeServer", "https://acme.example.com/dir\n"),
                    "kokoa: acmeServer: 'https://acme.example.com/dir\\n' is not an https:// ACME directory URL"),
    "global ssh user": (set_setting("sshUser", "root\n"), "kokoa: sshUser: 'root\\n' is not a user name"),
    "entry ssh user": (set_edge(0, "sshUser", "admin\n"), f"{TOKYO}: sshUser: 'admin\\n' is not a user name"),
    "host key": (set_origin(0, "hostKey", ED25519 + "\n"), f"{BLOG}: hostKey: '{ED25519}\\n' {NOT_A_HOST_KEY}"),
    "cloudflare zone id": (set_setting("cloudflareZoneId", "023e105f4ecef8ad9ca31a8372d0c353\n"),
                           f"kokoa: cloudflareZoneId: '023e105f4ecef8ad9ca31a8372d0c353\\n' {NOT_A_ZONE}"),
    "origin zone id": (set_origin(0, "zoneId", "023e105f4ecef8ad9ca31a8372d0c353\n"),
                       f"{BLOG}: zoneId: '023e105f4ecef8ad9ca31a8372d0c353\\n' {NOT_A_ZONE}"),
    "network": (set_setting("network", "10.100.0.0/16\n"), f"kokoa: network: '10.100.0.0/16\\n' {NOT_A_NETWORK}"),
    "ssh allow from": (set_setting("sshAllowFrom", ["198.51.100.0/24\n"]),
                       "kokoa: sshAllowFrom[0]: '198.51.100.0/24\\n' is not an IPv4 network like "
                       "198.51.100.0/24 (prefix length 0 to 32)"),
}


def assert_only_problem_of_its_entry(problems: list[str], expected: str) -> None:
    """`expected` is reported, whole, and is the only problem of its entry (one per value)."""
    assert expected in problems, problems
    entry = expected.split(": ", 1)[0]
    assert [p for p in problems if p.split(": ", 1)[0] == entry] == [expected], problems


@pytest.mark.parametrize("change, expected", CASES.values(), ids=CASES.keys())
def test_bad_input_is_refused_naming_entry_and_key(change, expected):
    assert_only_problem_of_its_entry(problems_after(change), expected)


@pytest.mark.parametrize("change, expected", NEWLINE.values(), ids=NEWLINE.keys())
def test_a_trailing_newline_is_refused(change, expected):
    assert_only_problem_of_its_entry(problems_after(change), expected)


# --- addresses: canonical IPv4, compared normalised ----------------------------------------

NON_CANONICAL = {
    # HOSTNAME_RE alone takes all-digit labels: this "host name" is the blog origin's address
    # (and inet_aton reads 010 as octal 8).
    "origin host": (set_origin(1, "host", "203.000.113.010"),
                    f"{SHOP}: host: '203.000.113.010' has leading zeros, which some tools read as octal; "
                    "write 203.0.113.10"),
    "edge host": (set_edge(0, "host", "203.000.113.010"),
                  f"{TOKYO}: host: '203.000.113.010' has leading zeros, which some tools read as octal; "
                  "write 203.0.113.10"),
    "endpoint": (set_origin(1, "endpoint", "203.0.113.021"),
                 f"{SHOP}: endpoint: '203.0.113.021' has leading zeros, which some tools read as octal; "
                 "write 203.0.113.21"),
    "public ip": (set_edge(0, "publicIp", "198.051.100.007"),
                  f"{TOKYO}: publicIp: '198.051.100.007' has leading zeros, which some tools read as octal; "
                  "write 198.51.100.7"),
    "upstream host": (set_origin(0, "upstream", "http://127.000.000.001:8080"),
                      f"{BLOG}: upstream: 'http://127.000.000.001:8080': host '127.000.000.001' has leading "
                      "zeros, which some tools read as octal; write 127.0.0.1"),
    "three numbers": (set_origin(0, "host", "203.0.113"), f"{BLOG}: host: '203.0.113' {NOT_AN_IP}"),
    "one number": (set_edge(0, "host", "3405803786"), f"{TOKYO}: host: '3405803786' {NOT_AN_IP}"),
    "octet above 255": (set_origin(1, "endpoint", "203.0.113.256"), f"{SHOP}: endpoint: '203.0.113.256' {NOT_AN_IP}"),
    "trailing dot": (set_edge(0, "host", "198.51.100.7."), f"{TOKYO}: host: '198.51.100.7.' {NOT_AN_IP}"),
}


@pytest.mark.parametrize("change, expected", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_hosts_of_digits_and_dots_must_be_canonical_ipv4(change, expected):
    assert_only_problem_of_its_entry(problems_after(change), expected)


def test_host_names_with_numeric_labels_stay_host_names():
    topology = topology_after(both(set_origin(0, "host", "203-0-113-10.example.net"),
                                   set_edge(0, "host", "edge1.203.example.net")))
    assert topology.origins[0].ssh.host == "203-0-113-10.example.net"
    assert topology.origins[0].endpoint == "203-0-113-10.example.net"
    assert topology.edges[0].ssh.host == "edge1.203.example.net"


def ssh_tunnel(section: str, i: int, host: str, port: int) -> Callable[[dict], None]:
    return both(lambda c: c[section][i].__setitem__("host", host),
                lambda c: c[section][i].__setitem__("sshPort", port))


def test_ssh_tunnels_on_loopback_are_told_apart_by_port():
    topology = topology_after(both(ssh_tunnel("edges", 0, "127.0.0.1", 2201),
                                   ssh_tunnel("edges", 1, "127.0.0.1", 2202),
                                   ssh_tunnel("origins", 0, "localhost", 2203),
                                   set_origin(0, "endpoint", "203.0.113.10")))
    assert [e.ssh.host for e in topology.edges[:2]] == ["127.0.0.1", "127.0.0.1"]
    assert topology.origins[0].ssh.host == "localhost"


def test_one_tunnel_is_one_server_whatever_the_loopback_spelling():
    problems = problems_after(both(ssh_tunnel("edges", 0, "127.0.0.1", 2201),
                                   ssh_tunnel("edges", 1, "127.0.0.2", 2201)))
    assert problems == [f"{OSAKA}: host: edge host '127.0.0.2' port 2201 is already used by {TOKYO}"]
    problems = problems_after(both(ssh_tunnel("origins", 0, "localhost", 2201),
                                   set_origin(0, "endpoint", "203.0.113.10"),
                                   ssh_tunnel("edges", 0, "127.0.0.1", 2201)))
    assert problems == [f"{TOKYO}: host: 127.0.0.1 is the address of origin blog; an edge must run "
                        "on its own server"]


# --- public addresses -----------------------------------------------------------------------

SPECIAL = {
    "0.0.0.0": "is unspecified (0.0.0.0/8)",
    "0.1.2.3": "is unspecified (0.0.0.0/8)",
    "127.0.0.1": "is a loopback address (127.0.0.0/8)",
    "127.8.9.10": "is a loopback address (127.0.0.0/8)",
    "169.254.169.254": "is link-local / cloud metadata (169.254.0.0/16)",
    "169.254.0.1": "is link-local / cloud metadata (169.254.0.0/16)",
    "224.0.0.1": "is multicast (224.0.0.0/4)",
    "239.255.255.250": "is multicast (224.0.0.0/4)",
    "240.0.0.1": "is reserved (240.0.0.0/4)",
    "255.255.255.255": "is reserved (240.0.0.0/4)",
}


@pytest.mark.parametrize("address, why", SPECIAL.items(), ids=SPECIAL.keys())
def test_public_ip_and_endpoint_must_be_public(address, why):
    assert_only_problem_of_its_entry(problems_after(set_edge(0, "publicIp", address)),
                                     f"{TOKYO}: publicIp: {address} {why}, not a public address")
    assert_only_problem_of_its_entry(problems_after(set_origin(1, "endpoint", address)),
                                     f"{SHOP}: endpoint: {address} {why}, not a public address")


@pytest.mark.parametrize("address", ["10.1.2.3", "172.16.0.9", "172.31.255.21", "192.168.1.5", "100.64.0.7"])
def test_private_addresses_are_allowed(address):
    # Origins often sit on private networks; the lab runs on 172.31.255.0/24.
    endpoint = address.rsplit(".", 1)[0] + ".200"
    topology = topology_after(both(set_edge(0, "publicIp", address), set_origin(1, "endpoint", endpoint)))
    assert topology.edges[0].public_ip == address == topology.edges[0].ssh.host
    assert topology.origins[1].endpoint == endpoint


@pytest.mark.parametrize("address, why", [(a, w) for a, w in SPECIAL.items() if "loopback" not in w],
                         ids=[a for a, w in SPECIAL.items() if "loopback" not in w])
def test_ssh_host_cannot_be_unspecified_link_local_multicast_or_reserved(address, why):
    assert_only_problem_of_its_entry(problems_after(set_edge(0, "host", address)),
                                     f"{TOKYO}: host: {address} {why}, not the address of a server's SSH")
    assert_only_problem_of_its_entry(problems_after(both(set_origin(1, "host", address))),
                                     f"{SHOP}: host: {address} {why}, not the address of a server's SSH")


def test_ssh_host_may_be_loopback_but_the_endpoint_may_not():
    topology = topology_after(ssh_tunnel("edges", 0, "127.0.0.1", 2222))
    assert (topology.edges[0].ssh.host, topology.edges[0].public_ip) == ("127.0.0.1", "198.51.100.7")
    topology = topology_after(ssh_tunnel("origins", 1, "127.0.0.1", 2200))
    assert (topology.origins[1].ssh.host, topology.origins[1].endpoint) == ("127.0.0.1", "203.0.113.21")
    # Without an endpoint, edges would dial the SSH tunnel's address.
    problems = problems_after(ssh_tunnel("origins", 0, "127.0.0.1", 2200))
    assert problems == [f"{BLOG}: endpoint: is required when host is 127.0.0.1: edges dial the endpoint, "
                        "which must be a public address (default: host)"]


# --- ports and limits: bounded by the tools that consume them --------------------------------

@pytest.mark.parametrize("url, port", [("http://127.0.0.1:99999", 99999), ("http://127.0.0.1:0", 0),
                                       ("https://[::1]:65536/app", 65536)])
def test_upstream_port_is_1_to_65535(url, port):
    assert_only_problem_of_its_entry(problems_after(set_origin(0, "upstream", url)),
                                     f"{BLOG}: upstream: '{url}': port {port} is not from 1 to 65535")


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "http://127.0.0.1:65535/x", "https://app.internal",
                                 "https://[::1]:8443/app"])
def test_upstream_ports_in_range_pass(url):
    assert topology_after(set_origin(0, "upstream", url)).origins[0].upstream == url


RATE_LIMIT_BOUNDS = {name: (declared_key(RateLimit, name).kind.low, declared_key(RateLimit, name).kind.high)
                     for name in declared_keys(RateLimit)}


def test_rate_limit_bounds_are_the_documented_ones():
    assert RATE_LIMIT_BOUNDS == {"requestsPerSecond": (1, 100000), "burst": (1, 1000000),
                                 "connections": (1, 65535), "newConnectionsPerSecond": (1, 1000000),
                                 "newConnectionsBurst": (1, 1000000)}


@pytest.mark.parametrize("key", RATE_LIMIT_BOUNDS)
def test_rate_limit_values_outside_their_bounds_are_refused(key):
    low, high = RATE_LIMIT_BOUNDS[key]
    for value in (low - 1, high + 1, True, "5"):
        assert_only_problem_of_its_entry(
            problems_after(set_origin(0, "rateLimit", {key: value})),
            f"{BLOG} rateLimit: {key}: {value!r} is not a whole number from {low} to {high}")
    for value in (low, high):
        limits = topology_after(set_origin(0, "rateLimit", {key: value})).origins[0].rate_limit
        assert getattr(limits, {"requestsPerSecond": "requests_per_second", "burst": "burst",
                                "connections": "connections",
                                "newConnectionsPerSecond": "new_connections_per_second",
                                "newConnectionsBurst": "new_connections_burst"}[key]) == value


def test_new_connection_limits_default_to_the_request_limits():
    limits = topology_after(set_origin(0, "rateLimit", {"requestsPerSecond": 7, "burst": 3})).origins[0].rate_limit
    assert (limits.new_connections_per_second, limits.new_connections_burst) == (7, 3)
    limits = topology_after(set_origin(0, "rateLimit", {"requestsPerSecond": 7, "burst": 3,
                                                        "newConnectionsPerSecond": 100,
                                                        "newConnectionsBurst": 200})).origins[0].rate_limit
    assert (limits.requests_per_second, limits.burst, limits.connections) == (7, 3, 50)
    assert (limits.new_connections_per_second, limits.new_connections_burst) == (100, 200)
    # The dataclass derives them too, and never a burst below nftables' minimum of 1.
    assert model.RateLimit(requests_per_second=9, burst=0).new_connections_burst == 1
    assert model.RateLimit(requests_per_second=9).new_connections_per_second == 9


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (make setup installs it)")
    return path


def nginx_accepts(tmp_path: Path, rate: Any, burst: Any, connections: Any) -> subprocess.CompletedProcess:
    """`nginx -t` of the edge's limit directives (as templates/edge/nginx.conf.j2 writes them)."""
    conf = tmp_path / "limits.conf"
    (tmp_path / "tmp").mkdir(exist_ok=True)
    temp_paths = " ".join(f"{kind}_temp_path {tmp_path}/tmp;"
                          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""
pid {tmp_path}/nginx.pid;
events {{}}
http {{
    {temp_paths}
    access_log off;
    limit_req_zone $binary_remote_addr zone=kokoa_requests:1m rate={rate}r/s;
    limit_conn_zone $binary_remote_addr zone=kokoa_connections:1m;
    server {{
        listen unix:{tmp_path}/nginx.sock;
        location / {{
            limit_req zone=kokoa_requests burst={burst} nodelay;
            limit_conn kokoa_connections {connections};
            return 204;
        }}
    }}
}}
""")
    return subprocess.run([need("nginx"), "-t", "-c", str(conf), "-p", str(tmp_path), "-g", "error_log stderr;"],
                          capture_output=True, text=True, timeout=30)


def limits_or_none(rate_limit: dict[str, int]) -> model.RateLimit | None:
    try:
        return topology_after(set_origin(0, "rateLimit", rate_limit)).origins[0].rate_limit
    except InvalidConfig:
        return None


def test_request_limits_are_bounded_by_what_nginx_accepts(tmp_path):
    """The model's lowest and highest values pass `nginx -t`; the values it refuses because
    nginx would (rate/burst 0, connections 0 and 65536) fail `nginx -t`."""
    defaults = {"requestsPerSecond": 20, "burst": 40, "connections": 50}
    for key in defaults:
        low, high = RATE_LIMIT_BOUNDS[key]
        for value in (low, high):
            limits = limits_or_none({key: value})
            assert limits is not None, (key, value)
            result = nginx_accepts(tmp_path, limits.requests_per_second, limits.burst, limits.connections)
            assert result.returncode == 0, (key, value, result.stderr)
        refused = [low - 1] + ([high + 1] if key == "connections" else [])  # nginx's own limits
        for value in refused:
            assert limits_or_none({key: value}) is None, (key, value)
            result = nginx_accepts(tmp_path, *(dict(defaults, **{key: value}).values()))
            assert result.returncode != 0, (key, value)
    assert "connection limit must be less 65536" in nginx_accepts(tmp_path, 20, 40, 65536).stderr
    assert 'invalid burst value "burst=0"' in nginx_accepts(tmp_path, 20, 0, 50).stderr


# --- HSTS and key generations ---------------------------------------------------------------

def test_hsts_max_age_bounds_and_default():
    assert topology_after(lambda c: None).origins[0].hsts_max_age == DEFAULT_HSTS_MAX_AGE == 63072000
    for value in (0, 1, 126144000):
        assert topology_after(set_origin(0, "hstsMaxAge", value)).origins[0].hsts_max_age == value
    for value in (-1, 126144001, "63072000", False):
        assert_only_problem_of_its_entry(problems_after(set_origin(0, "hstsMaxAge", value)),
                                         f"{BLOG}: hstsMaxAge: {value!r} is not a whole number from 0 to 126144000")


def test_key_generation_is_a_whole_number_of_at_least_1():
    topology = topology_after(both(set_origin(1, "keyGeneration", 2), set_edge(2, "keyGeneration", 1000)))
    assert [o.key_generation for o in topology.origins] == [1, 2]
    assert [e.key_generation for e in topology.edges] == [1, 1, 1000]
    for value in (0, -3, "2", True, 1.5):
        assert_only_problem_of_its_entry(problems_after(set_edge(0, "keyGeneration", value)),
                                         f"{TOKYO}: keyGeneration: {value!r} is not a whole number of at least 1")
        assert_only_problem_of_its_entry(problems_after(set_origin(0, "keyGeneration", value)),
                                         f"{BLOG}: keyGeneration: {value!r} is not a whole number of at least 1")


# --- SSH host keys --------------------------------------------------------------------------

def ssh_keygen(tmp_path: Path, key_type: str, bits: int | None = None) -> str:
    """A real public key made by ssh-keygen: 'type base64'."""
    path = tmp_path / f"key-{key_type}-{bits}"
    argv = [need("ssh-keygen"), "-q", "-t", key_type, "-N", "", "-C", "", "-f", str(path)]
    subprocess.run(argv + (["-b", str(bits)] if bits else []), check=True, capture_output=True, timeout=60)
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


@pytest.mark.parametrize("key_type, bits", [("ed25519", None), ("ecdsa", 256), ("ecdsa", 384), ("ecdsa", 521)])
def test_ed25519_and_ecdsa_host_keys_are_pinned(tmp_path, key_type, bits):
    key = ssh_keygen(tmp_path, key_type, bits)
    topology = topology_after(both(set_origin(0, "hostKey", key), set_edge(0, "hostKey", key + " root@edge")))
    assert topology.origins[0].ssh.host_key == key
    assert topology.edges[0].ssh.host_key == key + " root@edge"


def test_missing_host_key_is_refused_saying_how_to_get_one():
    assert_only_problem_of_its_entry(
        problems_after(delete("origins", 0, "hostKey")),
        f"{BLOG}: hostKey: is required: pin the server's SSH host key (ssh-keyscan -t ed25519 203.0.113.10 "
        "prints it; kokoa add-origin/add-edge --scan-host-key records it), or set insecureAnyHostKey: true "
        "for a throwaway host")
    assert_only_problem_of_its_entry(
        problems_after(delete("edges", 2, "hostKey")),
        f"{TOKYO2}: hostKey: is required: pin the server's SSH host key (ssh-keyscan -t ed25519 -p 2222 "
        "198.51.100.9 prints it; kokoa add-origin/add-edge --scan-host-key records it), or set "
        "insecureAnyHostKey: true for a throwaway host")


def test_rsa_host_key_is_refused_saying_why(tmp_path):
    key = ssh_keygen(tmp_path, "rsa", 2048)
    assert_only_problem_of_its_entry(
        problems_after(set_origin(0, "hostKey", key)),
        f"{BLOG}: hostKey: an ssh-rsa host key cannot be pinned: {RSA_WHY}; use the host's ed25519 key "
        "(ssh-keyscan -t ed25519 203.0.113.10)")
    assert_only_problem_of_its_entry(
        problems_after(set_edge(2, "hostKey", key)),
        f"{TOKYO2}: hostKey: an ssh-rsa host key cannot be pinned: {RSA_WHY}; use the host's ed25519 key "
        "(ssh-keyscan -t ed25519 -p 2222 198.51.100.9)")


def _blob(*fields: bytes) -> str:
    return base64.b64encode(b"".join(len(f).to_bytes(4, "big") + f for f in fields)).decode()


ED25519_DATA = ED25519.split()[1]
ECDSA_256_DATA = _blob(b"ecdsa-sha2-nistp256", b"nistp256", b"\x04" + bytes(64))
OTHER_TYPES = {
    "security key": (f"sk-ssh-ed25519@openssh.com {ED25519_DATA}",
                     "key type 'sk-ssh-ed25519@openssh.com' is not accepted: use the host's ssh-ed25519 (or "
                     "ecdsa-sha2-nistp256/384/521) key (ssh-keyscan -t ed25519 203.0.113.10)"),
    "dsa": (f"ssh-dss {_blob(b'ssh-dss', b'p', b'q', b'g', b'y')}",
            "key type 'ssh-dss' is not accepted: use the host's ssh-ed25519 (or ecdsa-sha2-nistp256/384/521) "
            "key (ssh-keyscan -t ed25519 203.0.113.10)"),
    "type and data disagree": (f"ssh-ed25519 {ECDSA_256_DATA}",
                               f"the key data of ssh-ed25519 {ECDSA_256_DATA!r} does not hold an ssh-ed25519 key"),
    "short ed25519 key": (f"ssh-ed25519 {_blob(b'ssh-ed25519', bytes(31))}",
                          f"the key data of ssh-ed25519 {_blob(b'ssh-ed25519', bytes(31))!r} does not hold an "
                          "ssh-ed25519 key"),
    "wrong curve": (f"ecdsa-sha2-nistp384 {ECDSA_256_DATA}",
                    f"the key data of ecdsa-sha2-nistp384 {ECDSA_256_DATA!r} does not hold an ecdsa-sha2-nistp384 key"),
    "truncated base64": (f"ssh-ed25519 {ED25519_DATA[:-4]}",
                         f"the key data of ssh-ed25519 {ED25519_DATA[:-4]!r} does not hold an ssh-ed25519 key"),
    "only the type": ("ssh-ed25519", f"'ssh-ed25519' {NOT_A_HOST_KEY}"),
    "ssh-keyscan line with the host": (f"203.0.113.10 {ED25519}", f"'203.0.113.10 {ED25519}' {NOT_A_HOST_KEY}"),
    "not a string": (["ssh-ed25519", ED25519_DATA], f"['ssh-ed25519', '{ED25519_DATA}'] {NOT_A_HOST_KEY}"),
}


@pytest.mark.parametrize("key, why", OTHER_TYPES.values(), ids=OTHER_TYPES.keys())
def test_other_host_keys_are_refused(key, why):
    assert_only_problem_of_its_entry(problems_after(set_origin(0, "hostKey", key)), f"{BLOG}: hostKey: {why}")


def test_insecure_any_host_key_opts_out_per_node():
    topology = topology_after(both(delete("edges", 1, "hostKey"), set_edge(1, "insecureAnyHostKey", True),
                                   delete("origins", 1, "hostKey"), set_origin(1, "insecureAnyHostKey", True)))
    osaka, shop = topology.edges[1], topology.origins[1]
    assert (osaka.ssh.host_key, osaka.ssh.insecure_any_host_key) == (None, True)
    assert (shop.ssh.host_key, shop.ssh.insecure_any_host_key) == (None, True)
    assert [e.ssh.insecure_any_host_key for e in topology.edges] == [False, True, False]
    # false is the default and still requires the key.
    topology = topology_after(set_edge(0, "insecureAnyHostKey", False))
    assert topology.edges[0].ssh.host_key == BASE_CONFIG["kokoa:edges"][0]["hostKey"]


def test_insecure_any_host_key_excludes_a_host_key_and_must_be_a_boolean():
    assert_only_problem_of_its_entry(
        problems_after(set_edge(1, "insecureAnyHostKey", True)),
        f"{OSAKA}: hostKey: must be absent when insecureAnyHostKey is true (keep the pinned key and remove "
        "insecureAnyHostKey: it is the safe one)")
    assert_only_problem_of_its_entry(
        problems_after(both(delete("origins", 0, "hostKey"), set_origin(0, "insecureAnyHostKey", "yes"))),
        f"{BLOG}: insecureAnyHostKey: 'yes' is not true or false")
    assert_only_problem_of_its_entry(
        problems_after(both(delete("edges", 0, "hostKey"), set_edge(0, "insecureAnyHostKey", False))),
        f"{TOKYO}: hostKey: is required: pin the server's SSH host key (ssh-keyscan -t ed25519 198.51.100.7 "
        "prints it; kokoa add-origin/add-edge --scan-host-key records it), or set insecureAnyHostKey: true "
        "for a throwaway host")


# --- kokoa:sshAllowFrom ---------------------------------------------------------------------

def test_ssh_allow_from_is_normalised():
    settings = topology_after(set_setting("sshAllowFrom", ["198.51.100.0/24", "203.0.113.5/32",
                                                           "192.0.2.9"])).settings
    assert settings.ssh_allow_from == ("198.51.100.0/24", "203.0.113.5/32", "192.0.2.9/32")
    assert not settings.ssh_open_to_everyone
    settings = topology_after(set_setting("sshAllowFrom", ["198.51.100.0/24", "0.0.0.0/0"])).settings
    assert settings.ssh_open_to_everyone


ALLOW_FROM = {
    "host bits": (["198.51.100.0/24", "203.0.113.5/24"],
                  "kokoa: sshAllowFrom[1]: '203.0.113.5/24' has host bits set; write 203.0.113.0/24"),
    "host bits everywhere": (["10.1.2.3/0"], "kokoa: sshAllowFrom[0]: '10.1.2.3/0' has host bits set; write 0.0.0.0/0"),
    "empty": ([], "kokoa: sshAllowFrom: is empty, which would lock the operator out of SSH on every host; "
                  "list the networks you administer from, or remove the key to allow everyone (0.0.0.0/0)"),
    "not a list": ("198.51.100.0/24", "kokoa: sshAllowFrom: '198.51.100.0/24' is not a list of IPv4 networks "
                                      "like [\"198.51.100.0/24\", \"203.0.113.5/32\"]"),
    "not a network": (["office"], "kokoa: sshAllowFrom[0]: 'office' is not an IPv4 network like 198.51.100.0/24"),
    "ipv6": (["2001:db8::/32"], "kokoa: sshAllowFrom[0]: '2001:db8::/32' is not an IPv4 network like "
                                "198.51.100.0/24"),
    "prefix too long": (["198.51.100.0/33"], "kokoa: sshAllowFrom[0]: '198.51.100.0/33' is not an IPv4 network "
                                             "like 198.51.100.0/24 (prefix length 0 to 32)"),
    "netmask": (["198.51.100.0/255.255.255.0"], "kokoa: sshAllowFrom[0]: '198.51.100.0/255.255.255.0' is not an "
                                                "IPv4 network like 198.51.100.0/24 (prefix length 0 to 32)"),
    "leading zeros": (["198.051.100.0/24"], "kokoa: sshAllowFrom[0]: '198.051.100.0/24' has leading zeros, which "
                                            "some tools read as octal; write 198.51.100.0/24"),
    "not a string": ([24], "kokoa: sshAllowFrom[0]: 24 is not an IPv4 network like 198.51.100.0/24"),
}


@pytest.mark.parametrize("value, expected", ALLOW_FROM.values(), ids=ALLOW_FROM.keys())
def test_ssh_allow_from_refuses(value, expected):
    problems = problems_after(set_setting("sshAllowFrom", value))
    assert problems == [expected]


# --- reporting --------------------------------------------------------------------------------

def third_origin(config: dict[str, Any], **values: Any) -> None:
    config["origins"].append({"name": "wiki", "domain": "wiki.example.com", "subnet": 2, "host": "203.0.113.30",
                              "upstream": "http://127.0.0.1:8080", "hostKey": ED25519, **values})


def test_a_duplicate_names_the_entry_that_had_the_value_first_never_itself():
    # Entry 2 repeats entry 1 (not entry 0, not itself); a duplicated name is named by position.
    assert problems_after(lambda c: third_origin(c, name="shop")) == [
        "kokoa:origins[2] (shop): name: origin name 'shop' is already used by kokoa:origins[1]"]
    assert problems_after(lambda c: third_origin(c, subnet=1)) == [
        "kokoa:origins[2] (wiki): subnet: subnet 1 is already used by kokoa:origins[1] (shop)"]
    assert problems_after(lambda c: (third_origin(c, subnet=1), c["origins"][1].__setitem__("subnet", 0))) == [
        "kokoa:origins[1] (shop): subnet: subnet 0 is already used by kokoa:origins[0] (blog)"]


def test_a_duplicate_is_reported_with_the_other_problems_of_its_entries():
    # Entry 0 has another problem, and still its subnet and name count as taken.
    def change(c):
        c["origins"][0]["domain"] = "bad domain"
        c["origins"][1]["subnet"] = 0
        c["edges"][0]["publicIp"] = "198.51.100.300"
        c["edges"][1]["name"] = "edge-tokyo-1"
    assert problems_after(change) == [
        f"{BLOG}: domain: 'bad domain' {NOT_A_DOMAIN}",
        f"{SHOP}: subnet: subnet 0 is already used by {BLOG}",
        f"{TOKYO}: publicIp: '198.51.100.300' {NOT_AN_IP}",
        "kokoa:edges[1] (edge-tokyo-1): name: edge name 'edge-tokyo-1' is already used by kokoa:edges[0]",
    ]


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
    # An edge without `host` uses its publicIp: one problem, not a second one for `host`.
    assert problems_after(delete("edges", 0, "publicIp")) == [f"{TOKYO}: publicIp: is required"]
    assert problems_after(set_edge(0, "publicIp", "169.254.169.254")) == [
        f"{TOKYO}: publicIp: 169.254.169.254 is link-local / cloud metadata (169.254.0.0/16), not a public address"]
    # An origin without `host` is one problem, not also a missing endpoint.
    assert problems_after(delete("origins", 1, "host")) == [f"{SHOP}: host: is required"]
    assert problems_after(delete("origins", 0, "host")) == [f"{BLOG}: host: is required"]


def test_next_free_allocations_fill_gaps():
    assert next_subnet([{"subnet": 0}, {"subnet": 2}]) == 1
    assert next_subnet([]) == 0
    edges = [{"origin": "blog", "index": 10}, {"origin": "blog", "index": 11}, {"origin": "shop", "index": 12}]
    assert next_index(edges, "blog") == 12
    assert next_index(edges, "shop") == 10
    with pytest.raises(ValueError, match="no free subnet"):
        next_subnet([{"subnet": n} for n in range(256)])


def test_the_edges_interface_is_named_after_their_origin():
    topology = topology_after(lambda c: None)
    assert [o.edge_interface for o in topology.origins] == ["wg-origin-0", "wg-origin-1"]
    assert not hasattr(topology.edges[0], "interface")


# --- issue 18, item 5: values that would weaken protection ---------------------------------

NUMBER_FORMS = {"hex": "0xcb00710a", "hex parts": "0xcb.0.113.0xa", "upper-case hex": "0XCB00710A"}


@pytest.mark.parametrize("value", NUMBER_FORMS.values(), ids=NUMBER_FORMS.keys())
def test_an_address_written_as_a_number_is_not_a_host_name(value):
    # inet_aton reads these as 203.0.113.10: as a "name", the same server could be an edge
    # and be published in DNS.
    why = (f"{value!r} is the IPv4 address 203.0.113.10 written as a number, which resolvers read as "
           "that address; write 203.0.113.10")
    assert_only_problem_of_its_entry(problems_after(set_origin(1, "endpoint", value)), f"{SHOP}: endpoint: {why}")
    assert_only_problem_of_its_entry(problems_after(set_edge(0, "host", value)), f"{TOKYO}: host: {why}")
    url = f"http://{value}:8080/"
    assert_only_problem_of_its_entry(problems_after(set_origin(0, "upstream", url)),
                                     f"{BLOG}: upstream: {url!r}: host {why}")


def test_host_names_that_only_look_numeric_stay_names():
    topology = topology_after(both(set_origin(1, "endpoint", "0x1.example.net"), set_edge(0, "host", "cafe.example")))
    assert topology.origins[1].endpoint == "0x1.example.net" and topology.edges[0].ssh.host == "cafe.example"


UPSTREAM_SPECIAL = {
    "http://169.254.169.254/latest/meta-data": "169.254.169.254 is link-local / cloud metadata (169.254.0.0/16)",
    "http://0.0.0.0:8080": "0.0.0.0 is unspecified (0.0.0.0/8)",
    "http://224.0.0.1": "224.0.0.1 is multicast (224.0.0.0/4)",
    "http://240.0.0.1": "240.0.0.1 is reserved (240.0.0.0/4)",
    "http://[::ffff:a9fe:a9fe]/": "169.254.169.254 is link-local / cloud metadata (169.254.0.0/16)",
    "http://[fe80::1]:8080": "fe80::1 is link-local (fe80::/10)",
    "http://[::]:8080": ":: is unspecified (::)",
}


@pytest.mark.parametrize("url, why", UPSTREAM_SPECIAL.items(), ids=UPSTREAM_SPECIAL.keys())
def test_upstream_refuses_what_host_and_endpoint_refuse_but_loopback(url, why):
    assert_only_problem_of_its_entry(problems_after(set_origin(0, "upstream", url)),
                                     f"{BLOG}: upstream: {url!r}: host {why}, not the address of an application")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://127.1.2.3:80/app", "https://[::1]:8443",
                                 "http://10.0.0.5:8080", "https://app.internal"])
def test_upstream_on_loopback_or_a_private_network_stays_fine(url):
    assert topology_after(set_origin(0, "upstream", url)).origins[0].upstream == url


SPECIAL_NETWORKS = {
    "127.0.0.0/8": "127.0.0.0 is a loopback address (127.0.0.0/8)",
    "169.254.0.0/16": "169.254.0.0 is link-local / cloud metadata (169.254.0.0/16)",
    "0.0.0.0/8": "0.0.0.0 is unspecified (0.0.0.0/8)",
}


@pytest.mark.parametrize("network, why", SPECIAL_NETWORKS.items(), ids=SPECIAL_NETWORKS.keys())
def test_network_is_not_loopback_link_local_or_this_network(network, why):
    why = why.split(" ", 1)[1]
    assert problems_after(set_setting("network", network)) == [
        f"kokoa: network: {network!r} {why}: tunnel addresses there do not route; use a private network "
        "such as 10.100.0.0/16"]


@pytest.mark.parametrize("port", [80, 443])
def test_an_edges_ssh_port_is_not_a_web_port(port):
    assert_only_problem_of_its_entry(problems_after(set_edge(0, "sshPort", port)),
                                     f"{TOKYO}: sshPort: {port} is one of the edge's web ports (80, 443), which "
                                     "go through the flood shield to nginx; give SSH another port")
    # An origin drops 80 and 443 from outside the tunnel: SSH there passes no shield.
    assert topology_after(set_origin(0, "sshPort", 443)).origins[0].ssh.port == 443


@pytest.mark.parametrize("networks", [["0.0.0.0/1", "128.0.0.0/1"], ["0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/1"],
                                      ["0.0.0.0/0"]])
def test_an_allow_list_that_covers_everyone_is_open_to_everyone(networks):
    settings = topology_after(set_setting("sshAllowFrom", networks)).settings
    assert settings.ssh_open_to_everyone
    almost = topology_after(set_setting("sshAllowFrom", ["0.0.0.0/1", "128.0.0.0/2"])).settings
    assert not almost.ssh_open_to_everyone
