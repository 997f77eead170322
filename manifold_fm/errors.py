"""User errors: problems with what the user gave (a config, a file, a value, a combination of options).

The command line reports these in one line and exits with status 1; anything else that escapes a command is a bug in
manifold-fm and surfaces with its traceback and a line asking to report it (:mod:`manifold_fm.cli`). The library's
own user-error types are :class:`~manifold_fm.config.ConfigError` (a config key or value),
:class:`~manifold_fm.manifolds.ManifoldError` (a tensor that is not a point or tangent vector),
``CheckpointError`` and ``TrainingError`` (:mod:`manifold_fm.training`), :class:`InputError` (below) and
``FileNotFoundError`` / ``FileExistsError`` for paths. Raise :class:`InputError` for bad input that none of the
others names; a plain ``ValueError`` means a bug.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input that is not a config key (``ConfigError``) or a manifold point (``ManifoldError``): a data,
    statistics or weights file's contents, an unsupported combination of command-line options, too few samples.

    A ``ValueError``, so code that catches ``ValueError`` around library calls keeps working."""


__all__ = ["InputError"]
