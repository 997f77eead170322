"""The default run's report: its summary table (Markdown) and result files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from .schema import FLOW_PRESETS


def format_table(results: dict[str, Any]) -> str:
    """The summary table (Markdown) of a default run's ``results``: one row per mode, then the reference rows."""
    lines = [
        "| run | FD-builtin-classifier ↓ | classifier accuracy ↑ | on-sphere error (max) | train wall time | "
        "sampling s/image |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in results["modes"].items():
        spherical = FLOW_PRESETS.get(mode, {}).get("latent") == "spherical"
        ose = f"{r['on_sphere_error_max']:.1e}" if spherical else f"({r['on_sphere_error_max']:.2f})"
        lines.append(
            f"| {mode} | {r['fd_builtin_classifier']:.3f} | {r['classifier_accuracy']:.3f} | {ose} | "
            f"{r['train_s']:.0f} s | {r['sample_s_per_image'] * 1e3:.1f} ms |"
        )
    for name, r in results["references"].items():
        acc = f"{r['classifier_accuracy']:.3f}" if "classifier_accuracy" in r else "-"
        lines.append(f"| {name} | {r['fd_builtin_classifier']:.3f} | {acc} | - | - | - |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path, threads: int) -> str:
    """Write ``results.json`` and ``results.md`` (the table and the total wall time) into ``out``; returns the table."""
    table = format_table(results)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=str))
    write_text_atomic(
        out / "results.md", table + f"\n\nTotal wall time: {results['total_s']:.0f} s ({threads} threads).\n"
    )
    return table


__all__ = ["format_table", "write_report"]
