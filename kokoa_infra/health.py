"""Placeholder: replaced by the `kokoa health` implementation."""
import click


@click.command()
def health() -> None:
    """Check every node (not implemented yet)."""
    raise click.ClickException("kokoa health is not implemented yet")
