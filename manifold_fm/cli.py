"""The ``manifold-fm`` command line: a click group whose subcommands live in ``manifold_fm.commands``.

Subcommands are imported lazily so ``manifold-fm --help`` stays fast and a command's heavy dependencies (diffusers,
torch-fidelity) load only when that command runs.

Errors are reported in one place, :class:`LazyGroup`: a mistake in the command line itself (click's usage errors: an
unknown command or option, a missing argument, a value of the wrong type, out of range or not among the choices,
options that exclude each other) becomes one ``Error: ...`` line and exit status 2 (:data:`USAGE_EXIT`); the library's
user-error types (:func:`user_error_types`: config, manifold, checkpoint, training and input errors, missing or
existing paths) become one ``Error: ...`` line and exit status 1 (:data:`INPUT_EXIT`); anything else is a bug and
surfaces with its traceback, to which a line asking to report it is appended.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import click

from .version import __version__

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
    "compare": "manifold_fm.commands.compare:compare",
}


#: Exit status of a usage error (the command line itself is wrong; nothing ran), click's and POSIX's convention.
USAGE_EXIT = 2
#: Exit status of any other user error (a config, a file, a run folder: what the command line named is wrong).
INPUT_EXIT = 1

#: Appended to the traceback of an error that is not a user error.
REPORT_LINE = (
    "manifold-fm stopped on an internal error (a bug, not a problem with your input): please file an issue with "
    "the command line and this traceback."
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix, reported in one line (imported when an error occurs, so the
    command line's start-up stays light; a type whose module cannot be imported cannot have been raised)."""
    types: list[type[BaseException]] = [FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError]
    for module, name in (
        ("manifold_fm.errors", "InputError"),
        ("manifold_fm.config", "ConfigError"),
        ("manifold_fm.manifolds.base", "ManifoldError"),
        ("manifold_fm.data.image_folder", "ImageReadError"),
        ("manifold_fm.training.checkpoint", "CheckpointError"),
        ("manifold_fm.training.trainer", "TrainingError"),
    ):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, name):
            types.append(getattr(loaded, name))
    return tuple(types)


def is_user_error(exc: BaseException) -> bool:
    """Whether the CLI reports ``exc`` in one line: an instance of one of :func:`user_error_types`. A plain
    ``ValueError`` is a bug (user errors are typed, see :mod:`manifold_fm.errors`)."""
    return isinstance(exc, user_error_types())


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OneLineUsageError(click.UsageError):
    """A usage error shown as one ``Error: ...`` line, exit status :data:`USAGE_EXIT`: click's own prints the usage
    and a ``--help`` hint above it, three lines where the command-line guide promises one."""

    exit_code = USAGE_EXIT

    def show(self, file: object = None) -> None:
        click.echo(f"Error: {self.format_message()}", file=file, err=True)  # type: ignore[arg-type]


def one_line_usage(exc: click.UsageError) -> click.UsageError:
    """``exc`` as a :class:`OneLineUsageError` (its message formatted while its context is still attached, since
    click's messages for parameters read it). Asking for help with no arguments stays as it is."""
    if isinstance(exc, (OneLineUsageError, click.exceptions.NoArgsIsHelpError)):
        return exc
    return OneLineUsageError(one_line(exc.format_message()))


class LazyGroup(click.Group):
    """A click group that imports each subcommand's module on first use, and reports errors in one place."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        """Parse the group's own options; a usage error there (``manifold-fm --bogus``) is one line too."""
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise one_line_usage(exc) from None

    def invoke(self, ctx: click.Context) -> object:
        """Run the subcommand; a usage error (parsing its options, or raised by it) becomes one line with exit status
        :data:`USAGE_EXIT`, a user error a one-line :class:`click.ClickException` (exit status :data:`INPUT_EXIT`),
        and any other exception propagates with :data:`REPORT_LINE` added to its traceback."""
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise one_line_usage(exc) from None
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as exc:
            if is_user_error(exc):
                raise click.ClickException(one_line(exc)) from None
            if hasattr(exc, "add_note"):  # Python >= 3.11: printed after the traceback
                exc.add_note(REPORT_LINE)
            else:  # pragma: no cover - Python 3.10
                click.echo(REPORT_LINE, err=True)
            raise

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
