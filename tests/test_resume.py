"""Exact resume: a run interrupted at step k and resumed matches an uninterrupted run bitwise at step n (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from manifold_fm.config import to_dict
from manifold_fm.data.sources import StepIndexer, TensorSource
from manifold_fm.models.sit import SiT
from manifold_fm.training.builders import preset_flow
from manifold_fm.training.checkpoint import load_checkpoint
from manifold_fm.training.flow_objective import FlowObjective
from manifold_fm.training.metrics_log import read_jsonl
from manifold_fm.training.schema import load_image_config
from manifold_fm.training.trainer import Hook, Trainer, TrainingError

from helpers import assert_resumed, log_lines


class Interrupt(Exception):
    pass


def _cfg(steps: int, **extra: object) -> object:
    overrides = [
        f"train.steps={steps}",
        "train.batch_size=8",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.class_dropout=0.3",
        "train.ema_decay=0.9",
        "optim.lr=3e-3",
        "optim.warmup_steps=3",
        "optim.grad_clip=0.5",
        "tokenizer.kind=none",
        "data.source=latents",
        "data.latents=unused",
        "train.keep_checkpoints=null",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_image_config(None, overrides)


def _data() -> TensorSource:
    g = torch.Generator().manual_seed(1)
    # 20 items with batch 8: 2 batches per epoch, so 8 steps cross 3 epoch boundaries (reshuffles).
    return TensorSource(torch.randn(20, 4, 4, 4, generator=g), torch.arange(20) % 3)


def _model() -> SiT:
    return SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)


def _trainer(out: Path, steps: int, mode: str, hooks: list[Hook] | None = None) -> Trainer:
    cfg = _cfg(steps, **{"flow.path": {"spherical": "geodesic", "linear": "linear"}[mode]})
    plain = to_dict(cfg)
    torch.manual_seed(0)  # the same initial weights in every run (as train_image seeds before building)
    return Trainer(
        FlowObjective(_model(), preset_flow(mode, 4), cfg.optim, null_class=3),
        _data(),
        cfg.train,
        out,
        device="cpu",
        hooks=hooks or [],
        fingerprint={k: plain[k] for k in ("model", "flow", "data", "optim")},
        progress=False,
    )


def _run(out: Path, steps: int, mode: str, resume: bool = False, stop_at: int | None = None) -> Trainer:
    def hook(step: int, model: torch.nn.Module) -> None:
        if stop_at is not None and step == stop_at:
            raise Interrupt

    trainer = _trainer(out, steps, mode, [Hook(1, hook)])
    try:
        trainer.fit(resume=resume)
    except Interrupt:
        pass
    return trainer


@pytest.mark.parametrize("mode", ["spherical", "linear"])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path: Path, mode: str) -> None:
    _run(tmp_path / "full", 8, mode)
    # Interrupted after step 5: the last checkpoint is step 4, so step 5 is recomputed after resuming.
    part = _run(tmp_path / "part", 8, mode, stop_at=5)
    assert part.step == 5
    assert load_checkpoint(tmp_path / "part" / "checkpoints").step == 4
    torch.manual_seed(12345)  # a resumed process starts with arbitrary global RNG state
    before = log_lines(tmp_path / "part")
    resumed = _run(tmp_path / "part", 8, mode, resume=True)
    assert resumed.step == 8
    # a resume, not a restart: it started at step 4, ran steps 5-8 only, and kept the log of steps 1-4
    assert_resumed(tmp_path / "part", 4, 8, before)

    a = load_checkpoint(tmp_path / "full" / "checkpoints")
    b = load_checkpoint(tmp_path / "part" / "checkpoints")
    assert a.step == b.step == 8
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    assert a.ema is not None and b.ema is not None
    for name in a.ema:
        assert torch.equal(a.ema[name], b.ema[name]), name
    opt_a, opt_b = a.state["optimizer"]["state"], b.state["optimizer"]["state"]
    for k in opt_a:
        assert torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"])
    # The log of the resumed run reads like the uninterrupted one (steps 1..8 once each, same losses).
    la = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    lb = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "part" / "metrics.jsonl")]
    assert la == lb and [s for s, _ in la] == list(range(1, 9))


def test_resume_refuses_a_changed_model_or_flow(tmp_path: Path) -> None:
    _run(tmp_path, 2, "spherical")
    with pytest.raises(TrainingError, match="flow differ"):
        _trainer(tmp_path, 4, "linear").fit(resume=True)
    with pytest.raises(TrainingError, match="already holds a run"):  # nothing is overwritten without --resume
        _trainer(tmp_path, 4, "spherical").fit()


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    trainer = _run(tmp_path, 2, "linear", resume=True)
    assert trainer.step == 2


def test_step_indexer_shards_cover_the_global_batch_and_each_epoch_once() -> None:
    single = StepIndexer(23, 6, seed=3, world_size=1)
    double = StepIndexer(23, 6, seed=3, world_size=2)
    assert single.batches_per_epoch == 3
    seen: list[int] = []
    for step in range(3):
        whole = single.indices(step)
        halves = torch.cat([double.indices(step, 0), double.indices(step, 1)])
        assert torch.equal(whole, halves)
        seen += whole.tolist()
    assert len(set(seen)) == 18  # one epoch: no repeats, the 5 left over are dropped
    assert not torch.equal(single.indices(0), single.indices(3))  # the next epoch reshuffles
    with pytest.raises(ValueError, match="not divisible"):
        StepIndexer(23, 5, seed=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        StepIndexer(4, 8, seed=0)
