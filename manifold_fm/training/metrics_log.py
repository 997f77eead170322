"""Run metrics: one JSON object per line in ``metrics.jsonl``, and experiment trackers through accelerate.

Each record is ``{"step": int, "time": seconds since the run started, <name>: float, ...}``. On resume the log is
truncated to the resumed step first, so a resumed run's log reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..records import read_jsonl


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as strings
    return value


class RunLogger:
    """Append-only JSONL metrics, always; and the experiment trackers of ``accelerator`` (accelerate's own tracking:
    ``Accelerator(log_with=[...])``, started here with ``tracker_config`` as hyperparameters) when one is given.

    Only the main process logs (``enabled``); on resume the JSONL log is truncated to the resumed step first.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        resume_step: int | None = None,
        enabled: bool = True,
        accelerator: Any = None,
        tracker_config: Mapping[str, Any] | None = None,
        run_name: str = "run",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.start = time.perf_counter()
        self.accelerator = accelerator
        if accelerator is not None:
            # every process calls it (accelerate starts trackers on the main process only)
            accelerator.init_trackers(run_name, config=dict(tracker_config or {}))
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate(resume_step)
        elif self.path.exists():
            self.path.unlink()

    def truncate(self, step: int) -> None:
        """Keep only records with ``step <= step`` (atomically rewritten)."""
        kept = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.perf_counter() - self.start, 3)}
        record.update({k: _clean(v) for k, v in values.items()})
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.accelerator is not None:
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self.accelerator.log(scalars, step=int(step))

    def close(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
            self.accelerator = None


__all__ = ["RunLogger", "read_jsonl"]
