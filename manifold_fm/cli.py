"""The ``manifold-fm`` command line: a click group whose subcommands live in ``manifold_fm.commands``.

Subcommands are imported lazily so ``manifold-fm --help`` stays fast and a command's heavy dependencies (diffusers,
torch-fidelity) load only when that command runs.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from . import __version__

# name -> "module:attribute" of a click.Command; one module per command under manifold_fm/commands/.
COMMANDS: dict[str, str] = {
    "manifolds": "manifold_fm.commands.manifolds:manifolds",
    "demo": "manifold_fm.commands.demo:demo",
    "train": "manifold_fm.commands.train:train",
    "sample": "manifold_fm.commands.sample:sample",
    "evaluate": "manifold_fm.commands.evaluate:evaluate",
    "finetune-decoder": "manifold_fm.commands.finetune_decoder:finetune_decoder",
    "extract-latents": "manifold_fm.commands.extract_latents:extract_latents",
    "probe": "manifold_fm.commands.probe:probe",
    "configs": "manifold_fm.commands.configs:configs",
    "convert-vae": "manifold_fm.commands.convert_vae:convert_vae",
    "export": "manifold_fm.commands.export:export",
}


class LazyGroup(click.Group):
    """A click group that imports each subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._available(name))

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not self._available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="manifold-fm")
def main() -> None:
    """Riemannian flow matching: spherical flow matching for latent images, and flows on any manifold."""


if __name__ == "__main__":
    main()
