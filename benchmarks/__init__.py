"""The benchmarks of manifold-fm: scripts that measure what the library claims and write their reports to
``benchmarks/results/``, the only source of the figures that ``benchmarks/README.md`` and the docs quote.

Each script runs on its own (``python benchmarks/<script>.py``, ``--quick`` for a smoke run that never writes to
``benchmarks/results/``), and ``python -m benchmarks`` runs them by name or all together (see ``__main__.py``).
"""
