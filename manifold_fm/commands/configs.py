"""``manifold-fm configs``: list the built-in configs (or print one)."""

from __future__ import annotations

import click


def _summary(text: str) -> tuple[str, list[tuple[bool, str]]]:
    """``(kind, description)`` of a config file's text: its top-level ``kind`` and its opening comment block (every
    ``#`` line before the first other line) as ``(is_code, text)`` pieces: prose lines joined into paragraphs, and
    lines indented past ``# `` (a command to run) kept as they are."""
    import yaml

    kind = ""
    try:
        data = yaml.safe_load(text) or {}
        kind = str(data.get("kind", "")) if isinstance(data, dict) else ""
    except yaml.YAMLError:
        kind = "?"
    pieces: list[tuple[bool, str]] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].removeprefix(" ")
        code = body.startswith(" ")
        if code or not pieces or pieces[-1][0]:
            pieces.append((code, body.strip()))
        else:
            pieces[-1] = (False, f"{pieces[-1][1]} {body.strip()}".strip())
    return kind, [(code, part) for code, part in pieces if part]


@click.command("configs")
@click.argument("name", required=False)
def configs(name: str | None) -> None:
    """List built-in configs with their kind and whole description (wrapped to the terminal); with NAME, print that
    config's YAML."""
    import shutil
    import textwrap

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
    indent = " " * (width + 2 + 8 + 2)  # name, kind, then the description's column
    columns = max(len(indent) + 40, min(shutil.get_terminal_size((100, 24)).columns, 120))
    for n in names:
        kind, pieces = _summary((BUILTIN_DIR / f"{n}.yaml").read_text())
        lead = f"{n:<{width}}  {kind:<8}  "
        if not pieces:
            click.echo(lead.rstrip())
        for code, part in pieces:
            if code:  # a command line: never broken
                click.echo(f"{lead}  {part}")
            else:
                wrapped = textwrap.fill(
                    part,
                    columns,
                    initial_indent=lead,
                    subsequent_indent=indent,
                    break_on_hyphens=False,
                    break_long_words=False,
                )
                click.echo(wrapped)
            lead = indent
