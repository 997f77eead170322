"""``manifold-fm configs``: list the built-in configs (or print one)."""

from __future__ import annotations

import click


def _summary(text: str) -> tuple[str, str]:
    """``(kind, first comment line)`` of a config file's text."""
    import yaml

    kind = ""
    try:
        data = yaml.safe_load(text) or {}
        kind = str(data.get("kind", "")) if isinstance(data, dict) else ""
    except yaml.YAMLError:
        kind = "?"
    first = next((line.lstrip("# ").rstrip() for line in text.splitlines() if line.startswith("#")), "")
    return kind, first


@click.command("configs")
@click.argument("name", required=False)
def configs(name: str | None) -> None:
    """List built-in configs with their kind and description; with NAME, print that config's YAML."""
    from ..config import BUILTIN_DIR, ConfigError, builtin_configs, resolve_config

    if name is not None:
        try:
            click.echo(resolve_config(name).read_text().rstrip())
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        return
    names = builtin_configs()
    if not names:
        click.echo("no built-in configs")
        return
    width = max(len(n) for n in names)
    for n in names:
        kind, desc = _summary((BUILTIN_DIR / f"{n}.yaml").read_text())
        click.echo(f"{n:<{width}}  {kind:<8}  {desc}")
