"""``manifold-fm manifolds``: list the registered manifolds with a one-line description each."""

from __future__ import annotations

import click

from ..manifolds import available_manifolds


@click.command("manifolds")
@click.option("--names-only", is_flag=True, help="Print only the names, one per line (for scripts).")
def manifolds(names_only: bool) -> None:
    """List the manifolds that a manifold run's `manifold:` key (`kind: manifold` with `data.file`) and
    `build_manifold(name, **options)` accept (a config may also name a class: `manifold: pkg.module:Class`)."""
    entries = available_manifolds()
    if names_only:
        for name in entries:
            click.echo(name)
        return
    width = max(len(name) for name in entries)
    for name, description in entries.items():
        click.echo(f"{name:<{width}}  {description}")
