"""Pulumi components: an Origin with its EdgeNodes, their secret keys, SSH pushes and A records."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, TypeVar

import pulumi
import pulumi_cloudflare as cloudflare
import pulumi_random as random
from pulumi_command import remote

from kokoa_infra.admission import Admission, admissions
from kokoa_infra.keys import public_key
from kokoa_infra.model import DNS_TTL, Edge, Settings, Ssh, check_serves, server_identity
from kokoa_infra.model import Origin as OriginSpec
from kokoa_infra.render import (
    INSTALL_DIR,
    EdgePeer,
    bundle_archive,
    health_token,
    render_edge_bundle,
    render_origin_bundle,
)

ORIGIN_TYPE = "kokoa:index:Origin"
EDGE_TYPE = "kokoa:index:EdgeNode"


SERVER_KEY = "kokoa-server-key"
T = TypeVar("T")


def secret_of(output: pulumi.Output[T]) -> pulumi.Output[T]:
    """`output`, marked secret as it is. `Output.secret` would lift every value nested in it
    again (a bundle's files, one Output each); an apply that returns an Output passes it on
    whole, with its dependencies and the secret mark of both."""
    return pulumi.Output.secret(True).apply(lambda _: output)


def gathered(outputs: Mapping[str, pulumi.Output[Any]]) -> pulumi.Output[dict[str, Any]]:
    """One Output of {name: value} of `outputs`: `Output.all(**outputs)` without lifting every
    value nested in each again (550 bundles of 7 files would be some 7,000 Outputs more).
    Merged in halves, so that each value is looked over for unknowns about log2(n) times,
    not n times. Secret when any of them is; unknown (preview) when any of them is."""
    items = list(outputs.items())
    if not items:
        return pulumi.Output.from_input({})
    if len(items) == 1:
        (name, output), = items
        return output.apply(lambda value: {name: value})
    half = len(items) // 2
    first, second = gathered(dict(items[:half])), gathered(dict(items[half:]))
    return first.apply(lambda one: second.apply(lambda other: {**one, **other}))


def combined(*outputs: pulumi.Output[Any]) -> pulumi.Output[list[Any]]:
    """The values of `outputs` as one list: `Output.all(*outputs)` in one apply per output
    (Output.all lifts each again first, two Outputs more each). For a few small values: each
    apply looks over the values gathered so far for unknowns."""
    def rest(index: int, values: tuple[Any, ...]) -> pulumi.Output[list[Any]] | list[Any]:
        if index == len(outputs):
            return list(values)
        return outputs[index].apply(lambda value: rest(index + 1, (*values, value)))
    chain = rest(0, ())
    return chain if isinstance(chain, pulumi.Output) else pulumi.Output.from_input(chain)


def server_key() -> pulumi.Output[str]:
    """The stack's secret for naming servers without their addresses (keyed hashes): 32
    random bytes in state, made once."""
    return pulumi.Output.secret(random.RandomBytes(SERVER_KEY, length=32).base64)


def keyed_server_tag(key_base64: str, identity: str) -> str:
    """HMAC-SHA256 of a server's identity under the stack's key, shortened: the same server
    gives the same tag, another server another, and the tag does not give the address away
    (there are few IPv4 addresses; without the key they cannot be tried)."""
    return hmac.new(base64.b64decode(key_base64), identity.encode(), hashlib.sha256).hexdigest()[:24]


def server_tag(key: pulumi.Output[str], identity: str) -> pulumi.Output[str]:
    # Derived from a secret, hence secret by default; a keyed hash is meant to be shown.
    return pulumi.Output.unsecret(key.apply(lambda k: keyed_server_tag(k, identity)))


def _identity_text(ssh: Ssh) -> str:
    identity = server_identity(ssh)
    return identity if isinstance(identity, str) else f"{identity[0]}:{identity[1]}"


def _wireguard_secret(name: str, parent: pulumi.Resource, generation: int,
                      server: pulumi.Output[str]) -> pulumi.Output[str]:
    """32 random bytes kept in state: a private key or PSK that survives later runs.

    Its keepers replace it, i.e. new bytes: the server it is on (`server`, a keyed hash:
    a node moved to another server under the same name must not take keys along that the
    old server had) and a `keyGeneration` above 1.
    """
    keepers: dict[str, pulumi.Input[str]] = {"server": server}
    if generation > 1:
        keepers["keyGeneration"] = str(generation)
    raw = random.RandomBytes(name, length=32, keepers=keepers, opts=pulumi.ResourceOptions(parent=parent))
    return pulumi.Output.secret(raw.base64)


def _wireguard_key_pair(name: str, parent: pulumi.Resource, generation: int,
                        server: pulumi.Output[str]) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
    """(secret private key, plain public key) of a node."""
    private_key = _wireguard_secret(f"{name}-wireguard-key", parent, generation, server)
    # Derived from a secret, so secret by default; a public key is meant to be shown.
    return private_key, pulumi.Output.unsecret(private_key.apply(public_key))


def _connection(ssh: Ssh, private_key: pulumi.Input[str]) -> remote.ConnectionArgs:
    return remote.ConnectionArgs(host=ssh.host, port=ssh.port, user=ssh.user,
                                 private_key=private_key, host_key=ssh.host_key)


def host_trigger(ssh: Ssh, key: pulumi.Output[str]) -> pulumi.Output[str]:
    """What identifies the server a command runs on, for `triggers`: a keyed hash of its
    SSH address (triggers are plain in state and in every preview; an origin's address must
    not be).

    pulumi-command replaces a Command only when `triggers` change (provider
    `common/inputs.go`); any other change, `connection` included, is an update run on the
    new connection (`remote/commandController.go`). So a rotated key, user, port or host
    key re-runs the idempotent install where it is, while a node moved to another server
    is replaced: the old state's uninstall runs on the old server first.
    """
    return pulumi.Output.unsecret(key.apply(lambda k: f"server {keyed_server_tag(k, _identity_text(ssh))}"))


def node_server_tag(ssh: Ssh, public_address: str, key: pulumi.Output[str]) -> pulumi.Output[str]:
    """What identifies the server a node's secrets were made for: its SSH address and the
    address it is reached at (an SSH tunnel on loopback may stay while the server behind changes)."""
    return server_tag(key, f"{_identity_text(ssh)} {public_address}")


def node_aliases(former_names: Sequence[str]) -> list[pulumi.Alias]:
    """A renamed node is the same resources under a new name (children follow their parent's
    alias: `inheritedChildAlias` in the engine): updated in place, never deleted from the
    server it stays on."""
    return [pulumi.Alias(name=name) for name in former_names]


def _push_command(name: str, label: str, ssh: Ssh, ssh_private_key: pulumi.Input[str],
                  files: pulumi.Output[dict[str, str]], parent: pulumi.Resource, key: pulumi.Output[str],
                  depends_on: Sequence[pulumi.Resource] = ()) -> remote.Command:
    """Copy the bundle over SSH (stdin) and run its install.sh; its uninstall.sh on delete.

    The bundle's hash is part of `create`, so a changed file is an in-place update that
    re-runs the idempotent install; so is a changed connection to the same server (a
    rotated SSH key). A different server changes `triggers`: the command is replaced, the
    old server cleaned up first (delete_before_replace), then the new one installed.
    """
    archive = files.apply(bundle_archive)
    command = pulumi.Output.unsecret(
        archive.apply(lambda data: _install_script(label, hashlib.sha256(data).hexdigest())))
    return remote.Command(
        name,
        connection=_connection(ssh, ssh_private_key),
        create=command,
        delete=f"if [ -x {INSTALL_DIR}/uninstall.sh ]; then {_as_root(INSTALL_DIR + '/uninstall.sh')}; fi",
        # Secret as the bundle it is made of (no second Output.secret: a whole bundle lifted again).
        stdin=archive.apply(lambda data: base64.b64encode(data).decode()),
        triggers=[host_trigger(ssh, key)],
        # Otherwise update and delete setenv PULUMI_COMMAND_STDOUT/STDERR: a stock sshd refuses
        # them (one warning per command), and one that accepts them receives the old output.
        add_previous_output_in_env=False,
        # Logs may name paths and addresses, never keys; still, keep them out of plain state.
        logging=remote.Logging.STDERR,
        opts=pulumi.ResourceOptions(parent=parent, delete_before_replace=True,
                                    depends_on=list(depends_on),
                                    additional_secret_outputs=["stdout", "stderr"]),
    )


def _as_root(command: str) -> str:
    """`command` as root: directly for root, else through passwordless sudo (cloud images' admin user)."""
    return f'if [ "$(id -u)" -eq 0 ]; then {command}; else sudo -n {command}; fi'


def _install_script(label: str, digest: str) -> str:
    # Runs in the SSH user's login shell: POSIX sh only. The digest line makes any change
    # of the bundle a change of `create`, hence an update that re-runs the install.
    return (f"# kokoa bundle {label} sha256:{digest}\n"
            "set -eu\n"
            "tmp=$(mktemp -d /tmp/kokoa-bundle.XXXXXX)\n"
            "trap 'rm -rf \"$tmp\"' EXIT\n"
            "base64 -d | tar -xzf - -C \"$tmp\"\n"
            + _as_root('bash "$tmp/install.sh"') + "\n")


@dataclass(frozen=True)
class EdgeNodeArgs:
    """What an edge is made of: itself, the origin it serves, the settings its files use."""

    edge: Edge
    origin: OriginSpec  # the one it serves: its domain, subnet, endpoint, port and rate limit
    settings: Settings  # ACME, certificate refresh interval, SSH allow list
    zone_id: str | None  # the Cloudflare zone of its A record; None: no record is managed
    origin_public_key: pulumi.Output[str]
    ssh_private_key: pulumi.Input[str]
    stack: str
    # The origin's visitor pass key (secret, hex), the same on all its edges.
    pass_key: pulumi.Output[str]
    server_key: pulumi.Output[str]  # the stack's key for naming servers (server_key())
    # This edge's share of the origin's capacity; None when the origin sets none.
    admission: Admission | None = None
    former_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_serves(self.origin, [self.edge])


class EdgeNode(pulumi.ComponentResource):
    """An edge server: WireGuard tunnel to its origin, nginx with TLS, its A record."""

    public_key: pulumi.Output[str]
    preshared_key: pulumi.Output[str]
    server_tag: pulumi.Output[str]
    bundle: pulumi.Output[dict[str, str]]
    install: remote.Command
    dns_records: list[cloudflare.DnsRecord]  # one per name of its origin; none when drained or without a zone

    def __init__(self, name: str, args: EdgeNodeArgs, opts: pulumi.ResourceOptions | None = None):
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(aliases=node_aliases(args.former_names)))
        super().__init__(EDGE_TYPE, name, {}, opts)
        edge, origin = args.edge, args.origin
        # A new generation replaces the edge's own key and its PSK (both sit on the edge);
        # its origin only learns the new public key and PSK.
        # The server takes part too: a new server under the same name gets new keys.
        self.server_tag = node_server_tag(edge.ssh, edge.public_ip, args.server_key)
        private_key, self.public_key = _wireguard_key_pair(name, self, edge.key_generation, self.server_tag)
        self.preshared_key = _wireguard_secret(f"{name}-preshared-key", self, edge.key_generation,
                                               self.server_tag)
        # Secret: made of the node's private key, a secret (_wireguard_secret).
        self.bundle = combined(
            private_key, self.preshared_key, args.origin_public_key, args.pass_key,
        ).apply(lambda keys: render_edge_bundle(args.settings, origin, edge, *keys[:3], pass_key=keys[3],
                                                admission=args.admission))
        self.install = _push_command(f"{name}-install", f"edge/{edge.name}", edge.ssh,
                                     args.ssh_private_key, self.bundle, self, args.server_key)

        # An A record for each name of the origin; the domain's keeps the resource name it always had.
        self.dns_records = [
            self._a_record(f"{name}-a-record" if hostname == origin.domain else f"{name}-a-record-{hostname}",
                           hostname, args)
            for hostname in origin.names] if edge.dns and args.zone_id else []
        self.register_outputs({"publicKey": self.public_key})

    def _a_record(self, resource_name: str, hostname: str, args: EdgeNodeArgs) -> cloudflare.DnsRecord:
        # Only after the install: DNS never sends users to a half-built edge.
        return cloudflare.DnsRecord(
            resource_name,
            zone_id=args.zone_id,
            name=hostname,
            type="A",
            content=args.edge.public_ip,
            ttl=DNS_TTL,
            proxied=False,
            comment=f"kokoa edge {args.edge.name} (stack {args.stack})",
            # With failover the agent parks a failing edge's record under another name and
            # votes in its comment; ignoring both keeps a refreshed `pulumi up` from undoing
            # that, while creating and deleting the record stay the program's (docs/dns.md).
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.install],
                                        ignore_changes=["name", "comment"] if args.settings.dns_failover else None))


@dataclass(frozen=True)
class OriginArgs:
    """What an origin is made of: itself, its edges, the settings its files use."""

    origin: OriginSpec
    edges: tuple[Edge, ...]  # its edges (each becomes a child EdgeNode), in index order
    settings: Settings  # ACME server and CA, SSH allow list, certificate refresh interval
    zone_id: str | None  # the Cloudflare zone of its edges' A records; None: no record is managed
    ssh_private_key: pulumi.Input[str]
    stack: str
    server_key: pulumi.Output[str]  # the stack's key for naming servers (server_key())
    former_names: tuple[str, ...] = ()
    # Former names of its edges: {edge: (old name, ...)}.
    edge_former_names: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_serves(self.origin, self.edges)
        if [e.index for e in self.edges] != sorted(e.index for e in self.edges):
            raise ValueError(f"the edges of origin {self.origin.name} must be in index order")


class Origin(pulumi.ComponentResource):
    """An origin server: WireGuard hub for its edges, tunnel gateway, certificate; owns its EdgeNodes."""

    public_key: pulumi.Output[str]
    bundle: pulumi.Output[dict[str, str]]
    health_token: pulumi.Output[str]
    edges: dict[str, EdgeNode]
    install: remote.Command
    certificate: remote.Command | None

    def __init__(self, name: str, args: OriginArgs, opts: pulumi.ResourceOptions | None = None):
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(aliases=node_aliases(args.former_names)))
        super().__init__(ORIGIN_TYPE, name, {}, opts)
        spec = args.origin
        private_key, self.public_key = _wireguard_key_pair(
            name, self, spec.key_generation, node_server_tag(spec.ssh, spec.endpoint, args.server_key))
        # Every origin has one, whatever its underAttack says: switching the challenge on
        # needs no new resource, and passes handed out before an attack stay valid.
        pass_key = pulumi.Output.secret(random.RandomBytes(
            f"{name}-pass-key", length=32, opts=pulumi.ResourceOptions(parent=self)).hex)
        self.health_token = pulumi.Output.secret(pass_key.apply(lambda key: health_token(key, spec)))
        shares = admissions(spec, args.edges)
        self.edges = {}
        for edge in args.edges:  # (a loop: a comprehension is one more frame in every resource's stack trace)
            self.edges[edge.name] = EdgeNode(edge.name, EdgeNodeArgs(
                edge=edge, origin=spec, settings=args.settings, zone_id=args.zone_id,
                origin_public_key=self.public_key, ssh_private_key=args.ssh_private_key, stack=args.stack,
                pass_key=pass_key, admission=shares[edge.name], server_key=args.server_key,
                former_names=args.edge_former_names.get(edge.name, ())),
                opts=pulumi.ResourceOptions(parent=self))
        edge_specs = list(args.edges)
        edge_nodes = [self.edges[edge.name] for edge in edge_specs]

        def render(values: list[str]) -> dict[str, str]:
            origin_key, *edge_values = values
            peers = [EdgePeer(edge, *edge_values[3 * i:3 * i + 3]) for i, edge in enumerate(edge_specs)]
            return render_origin_bundle(args.settings, spec, origin_key, peers)

        # Each edge with its server's tag: the origin replaces its TLS key when a holder of
        # the current one is gone, and an edge on a new server is a new holder. Secret: made of
        # the origin's private key, a secret (_wireguard_secret).
        self.bundle = combined(
            private_key, *[k for node in edge_nodes for k in (node.public_key, node.preshared_key, node.server_tag)],
        ).apply(render)
        self.install = _push_command(f"{name}-install", f"origin/{spec.name}", spec.ssh,
                                     args.ssh_private_key, self.bundle, self, args.server_key)

        # HTTP-01 validation needs an edge that relays it and DNS pointing there, so the
        # first certificate waits for the edges' installs and A records.
        serving = [node for node, edge in zip(edge_nodes, edge_specs) if edge.dns]
        self.certificate = None
        if serving:
            self.certificate = remote.Command(
                f"{name}-certificate",
                connection=_connection(spec.ssh, args.ssh_private_key),
                # Naming the names and the ACME server in the command re-runs it when they change.
                create=(f"# kokoa certificate for {', '.join(spec.names)} from {args.settings.acme_server}\n"
                        + _as_root(f"{INSTALL_DIR}/certificate.sh")),
                add_previous_output_in_env=False,
                opts=pulumi.ResourceOptions(
                    parent=self,
                    depends_on=[self.install, *[n.install for n in serving],
                                *[record for n in serving for record in n.dns_records]]),
            )
        self.register_outputs({"publicKey": self.public_key})
