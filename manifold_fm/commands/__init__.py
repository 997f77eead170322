"""One module per ``manifold-fm`` subcommand (registered in :data:`manifold_fm.cli.COMMANDS`)."""
