"""The `kokoa` command: edit the stack config, write node bundles, check health, run the lab.

Each command imports what it needs when it runs: `kokoa --help` and `kokoa health` load
neither Pulumi nor the template engine.
"""

from __future__ import annotations

from pathlib import Path

import click

from kokoa_infra import dns_cli
from kokoa_infra.conventions import CONTEXT, STACK_ENVIRONMENT, CouldNotRun, Failed, epilog, stack_option
from kokoa_infra.health.command import health
from kokoa_infra.lab.cli import LAB_ENVIRONMENT, lab

FILE_HELP = "Edit this stack file instead of Pulumi.<stack>.yaml."
EDIT_EPILOG = epilog("the change was refused (it would make the config invalid, or take a site out of DNS "
                     "without --force): nothing changed",
                     "no stack named, the stack file cannot be read, or no such entry", STACK_ENVIRONMENT)


@click.group(context_settings=CONTEXT, epilog=epilog(
    "the command failed", "bad usage, or its input cannot be read",
    {**STACK_ENVIRONMENT, **LAB_ENVIRONMENT,
     "CLOUDFLARE_*, KOKOA_DNS_*": "read by `kokoa dns` (kokoa dns --help)"}))
@click.version_option(package_name="kokoa-proxy", prog_name="kokoa")
def main() -> None:
    """Kokoa Proxy: web origins behind disposable WireGuard-tunnelled edges.

    `pulumi up` does the deployment; these commands help around it. Results go to stdout,
    progress and errors to stderr; every command's --help gives its exit codes.
    """


def stack_file_options(command):
    """-s/--stack / --file: which stack file a command edits."""
    command = click.option("--file", "file", type=click.Path(dir_okay=False), help=FILE_HELP)(command)
    return stack_option("Edit Pulumi.NAME.yaml in the current directory")(command)


def _stack_file_error(exc: Exception) -> click.ClickException:
    from kokoa_infra.stackfile import ChangeRefused

    if isinstance(exc, ChangeRefused):
        return Failed(f"nothing changed:\n{exc}")
    return CouldNotRun(f"nothing changed:\n{exc}")


def _append(stack: str | None, file: str | None, list_key: str, entry: dict) -> None:
    from kokoa_infra.stackfile import StackFileError, append_entry, stack_file

    try:
        path = stack_file(stack, file)
        written = append_entry(path, list_key, entry)
    except StackFileError as exc:
        raise _stack_file_error(exc) from None
    allocation = "subnet" if list_key == "origins" else "index"
    click.echo(f"added {list_key[:-1]} {written['name']} ({allocation} {written[allocation]}) to {path}; "
               "run `pulumi up` to deploy it")


def host_key_options(command):
    """--host-key / --scan-host-key / --insecure-any-host-key: exactly one is required."""
    command = click.option(
        "--insecure-any-host-key", "insecure_any_host_key", is_flag=True,
        help="Throwaway hosts only: accept ANY SSH host key (insecureAnyHostKey: true; "
             "every preview and up warns).")(command)
    command = click.option(
        "--scan-host-key", "scan_host_key", is_flag=True,
        help="Read the server's ed25519 (else ECDSA) host key with ssh-keyscan (5 s timeout), "
             "record it and print its SHA256 fingerprint on stderr: compare it with the "
             "server's console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub).")(command)
    return click.option("--host-key", help="The server's SSH host key to pin "
                                           "('ssh-ed25519 AAAA...', e.g. from ssh-keyscan -t ed25519 HOST).")(command)


def _host_key_entry(host: str, port: int | None, host_key: str | None, scan: bool,
                    insecure: bool) -> dict:
    """The entry's hostKey (given or scanned) or insecureAnyHostKey."""
    chosen = [flag for flag, used in (("--host-key", host_key is not None), ("--scan-host-key", scan),
                                      ("--insecure-any-host-key", insecure)) if used]
    if not chosen:
        raise click.UsageError("pin the server's SSH host key: pass --host-key 'ssh-ed25519 AAAA...', "
                               "--scan-host-key (reads it with ssh-keyscan), or --insecure-any-host-key "
                               "(throwaway hosts only)")
    if len(chosen) > 1:
        raise click.UsageError(f"pass only one of {', '.join(chosen)}")
    if insecure:
        return {"insecureAnyHostKey": True}
    if not scan:
        return {"hostKey": host_key}
    from kokoa_infra.host_keys import HostKeyScanError, scan_host_key

    try:
        scanned = scan_host_key(host, port or 22)
    except HostKeyScanError as exc:
        raise Failed(f"nothing changed: {exc}") from None
    kind = "ed25519" if scanned.key.startswith("ssh-ed25519 ") else "ecdsa"
    click.echo(f"host key of {host} port {port or 22}: {scanned.fingerprint}\n"
               f"compare it with the server's console (ssh-keygen -lf /etc/ssh/ssh_host_{kind}_key.pub) "
               "before `pulumi up`", err=True)
    return {"hostKey": scanned.key}


@main.command("add-origin", epilog=EDIT_EPILOG)
@stack_file_options
@click.option("--name", required=True, help="Origin name, ^[a-z][a-z0-9-]{0,30}$.")
@click.option("--domain", required=True, help="The site's domain, e.g. blog.example.com.")
@click.option("--host", required=True, help="SSH address of the origin server.")
@click.option("--upstream", required=True, help="The application as seen from the origin, e.g. http://127.0.0.1:8080.")
@click.option("--endpoint", help="Address edges dial for WireGuard (default: --host).")
@click.option("--listen-port", type=int, help="WireGuard UDP port (default 51820).")
@click.option("--subnet", type=int, help="0..255; default: the next free one.")
@click.option("--ssh-port", type=int, help="Default 22.")
@click.option("--ssh-user", help="Default: kokoa:sshUser.")
@host_key_options
def add_origin(stack, file, name, domain, host, upstream, endpoint, listen_port, subnet,
               ssh_port, ssh_user, host_key, scan_host_key, insecure_any_host_key) -> None:
    """Append an origin to the stack config with the next free subnet.

    One of --host-key, --scan-host-key or --insecure-any-host-key is required.
    """
    pinned = _host_key_entry(host, ssh_port, host_key, scan_host_key, insecure_any_host_key)
    _append(stack, file, "origins", {
        "name": name, "domain": domain, "subnet": subnet, "host": host, "endpoint": endpoint,
        "listenPort": listen_port, "upstream": upstream, "sshPort": ssh_port,
        "sshUser": ssh_user, **pinned})


@main.command("add-edge", epilog=EDIT_EPILOG)
@stack_file_options
@click.option("--name", required=True, help="Edge name, ^[a-z][a-z0-9-]{0,30}$.")
@click.option("--origin", required=True, help="The origin this edge serves.")
@click.option("--public-ip", required=True, help="The edge's public IPv4 address (its A record).")
@click.option("--index", type=int, help="10..254 within the origin; default: the next free one.")
@click.option("--host", help="SSH address (default: --public-ip).")
@click.option("--ssh-port", type=int, help="Default 22.")
@click.option("--ssh-user", help="Default: kokoa:sshUser.")
@host_key_options
@click.option("--drained", is_flag=True, help="Add it without an A record (dns: false).")
def add_edge(stack, file, name, origin, public_ip, index, host, ssh_port, ssh_user, host_key,
             scan_host_key, insecure_any_host_key, drained) -> None:
    """Append an edge to the stack config with the next free index of its origin.

    One of --host-key, --scan-host-key or --insecure-any-host-key is required.
    """
    pinned = _host_key_entry(host or public_ip, ssh_port, host_key, scan_host_key,
                             insecure_any_host_key)
    _append(stack, file, "edges", {
        "name": name, "origin": origin, "publicIp": public_ip, "index": index, "host": host,
        "sshPort": ssh_port, "sshUser": ssh_user, **pinned,
        "dns": False if drained else None})


@main.command(epilog=epilog(
    "the archive could not be written", "the outputs cannot be read, or NODE has no bundle",
    {**STACK_ENVIRONMENT, "PULUMI_CONFIG_PASSPHRASE": "read by `pulumi stack output --show-secrets` "
                                                       "for a stack with a passphrase secrets provider"}))
@click.argument("node")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write the .tar.gz (default: kokoa-<role>-<name>.tar.gz).")
@stack_option("Read `pulumi stack output` of this stack")
@click.option("--outputs", "outputs_file", type=click.Path(dir_okay=False),
              help="Read the outputs from this JSON file instead of calling pulumi.")
def bundle(node: str, output: str | None, stack: str | None, outputs_file: str | None) -> None:
    """Write the bundle of NODE (origin/NAME or edge/NAME) as a .tar.gz.

    The archive holds the node's private key: it is written with mode 0600.
    Unpack it on the host and run `sudo ./install.sh`.
    """
    from kokoa_infra.atomic_file import write_private
    from kokoa_infra.outputs import OutputsError, load_outputs
    from kokoa_infra.render import bundle_archive

    try:
        outputs = load_outputs(stack, outputs_file, show_secrets=True)
    except OutputsError as exc:
        raise CouldNotRun(str(exc)) from None
    bundles = outputs.get("bundles")
    if not isinstance(bundles, dict):
        raise CouldNotRun("the outputs have no readable `bundles` (read them with --show-secrets; "
                          "has `pulumi up` run?)")
    if node not in bundles:
        known = ", ".join(sorted(bundles)) or "none"
        raise CouldNotRun(f"no bundle {node!r}; known: {known}")
    files = bundles[node]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CouldNotRun(f"bundle {node!r} is not a mapping of file names to contents")
    target = Path(output or f"kokoa-{node.replace('/', '-')}.tar.gz")
    try:
        write_private(target, bundle_archive(files))
    except OSError as exc:
        raise Failed(f"cannot write {target}: {exc.strerror or exc}") from None
    click.echo(f"wrote {target} ({len(files)} files, mode 0600)")


def _edit_stack(stack: str | None, file: str | None, change) -> None:
    from kokoa_infra.stackfile import StackFileError, stack_file

    try:
        path = stack_file(stack, file)
        result = change(path)
    except StackFileError as exc:
        raise _stack_file_error(exc) from None
    click.echo(result.summary)
    if result.next_up:
        click.echo("The next `pulumi up`:")
        for line in result.next_up:
            click.echo(f"  - {line}")


force_option = click.option("--force", is_flag=True, help="Also when it is the origin's last serving edge.")


@main.command("drain", epilog=EDIT_EPILOG)
@stack_file_options
@force_option
@click.argument("edge")
def drain(stack, file, force, edge) -> None:
    """Take EDGE out of DNS (dns: false); it keeps running until removed."""
    from kokoa_infra.stackfile import set_edge_dns

    _edit_stack(stack, file, lambda path: set_edge_dns(path, edge, serving=False, force=force))


@main.command("undrain", epilog=EDIT_EPILOG)
@stack_file_options
@click.argument("edge")
def undrain(stack, file, edge) -> None:
    """Put EDGE back in DNS (drops dns: false)."""
    from kokoa_infra.stackfile import set_edge_dns

    _edit_stack(stack, file, lambda path: set_edge_dns(path, edge, serving=True))


@main.command("remove-edge", epilog=EDIT_EPILOG)
@stack_file_options
@force_option
@click.argument("edge")
def remove_edge_command(stack, file, force, edge) -> None:
    """Delete EDGE's entry: the next `pulumi up` uninstalls it from its server."""
    from kokoa_infra.stackfile import remove_edge

    _edit_stack(stack, file, lambda path: remove_edge(path, edge, force=force))


@main.command("under-attack", epilog=EDIT_EPILOG)
@stack_file_options
@click.argument("mode", type=click.Choice(["on", "off", "auto"]))
@click.argument("origin")
def under_attack(stack, file, mode, origin) -> None:
    """Set ORIGIN's underAttack: on (challenge every visitor without a pass), auto (only while
    the origin is at its capacity) or off. docs/operations.md, "Under a distributed flood"."""
    from kokoa_infra.stackfile import set_under_attack

    _edit_stack(stack, file, lambda path: set_under_attack(path, origin, mode))


main.add_command(health)
main.add_command(lab)
main.add_command(dns_cli.cli, "dns")

if __name__ == "__main__":
    main()
