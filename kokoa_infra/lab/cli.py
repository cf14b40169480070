"""Placeholder: replaced by `kokoa lab`."""
import click


@click.group()
def lab() -> None:
    """Run the whole system on this machine (not implemented yet)."""
