"""Toy runs (``kind: toy``): a small MLP flow on a toy manifold dataset, trained by the one
:class:`~manifold_fm.training.trainer.Trainer` and evaluated against the known density.

``train_toy(config, overrides, out_dir, resume)`` writes::

    <out_dir>/config.yaml          the resolved configuration
    <out_dir>/checkpoints/         atomic safetensors checkpoints (weights, EMA, optimizer/RNG state, meta.json)
    <out_dir>/metrics.jsonl        the training log
    <out_dir>/metrics.json         test NLL under the learned flow, true NLL of the target, on-manifold error, time
    <out_dir>/samples.png          data vs. model samples in the manifold's plot chart

``flow.path: geodesic`` uses the manifold's geodesics (tangent targets); ``flow.path: linear`` the ambient straight
line ``(1-t) x0 + t x1`` with ``x1 - x0`` targets, the baseline: its samples are still integrated on the manifold
(velocities projected), so both are evaluated the same way. The data are drawn from the dataset with a generator
seeded by the step (:class:`~manifold_fm.data.sources.SamplerSource`), so resuming is exact.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_json_atomic
from ..config import ConfigError, to_dict
from ..data.sources import SamplerSource
from ..data.toy import ToyDataset, build_toy_dataset
from ..eval.plots import plot_samples
from ..flow import Flow
from ..likelihood import log_likelihood
from ..sampler import generate, model_velocity
from ..solvers import IntegrationStats
from .builders import build_flow, build_model
from .flow_objective import FlowObjective
from .schema import RESUME_SECTIONS, ToyRunConfig, load_toy_config
from .trainer import Trainer


def toy_dataset(cfg: ToyRunConfig) -> ToyDataset:
    """The dataset of ``cfg.data``; a bad name or parameter is a :class:`ConfigError` naming ``data``."""
    try:
        return build_toy_dataset(cfg.data.name, **cfg.data.params)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None


def toy_model(cfg: ToyRunConfig, dataset: ToyDataset) -> nn.Module:
    """The MLP of ``cfg.model``, initialised from ``train.seed`` (not the global RNG, so a fixed seed reproduces
    across processes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, dataset.point_shape, periodic=dataset.manifold.periodic)


def train_toy(
    config: Any = "toy-sphere",
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    checkpoint: str | int | Path | None = None,
) -> Path:
    """Train and evaluate a toy flow; returns the run folder (see the module docstring for its contents).
    ``overwrite``: replace the run in ``out_dir`` once the config and dataset are valid; ``checkpoint`` (with
    ``resume``): the kept checkpoint to continue from (default the latest).

    Raises:
        ConfigError: bad configuration.
        TrainingError: the run folder already holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    cfg = config if isinstance(config, ToyRunConfig) and not overrides else load_toy_config(config, overrides)
    dataset = toy_dataset(cfg)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{cfg.name}-{cfg.flow.path}"
    flow = build_flow(cfg.flow, dataset.manifold)
    plain = to_dict(cfg)
    trainer = Trainer(
        FlowObjective(toy_model(cfg, dataset), flow, cfg.optim),
        SamplerSource(dataset.sample),
        cfg.train,
        out,
        fingerprint={k: plain[k] for k in RESUME_SECTIONS},
        config=plain,
        device="cpu",
        progress=progress,
        meta={"config": plain, "point_shape": list(dataset.point_shape)},
    )
    trainer.fit(resume=resume, overwrite=overwrite, checkpoint=checkpoint)
    t_eval = time.perf_counter()
    metrics = evaluate_toy(trainer.ema.model, dataset, flow, cfg, out)
    metrics.update(
        {
            "train_steps": cfg.train.steps,
            "train_seconds": round(trainer.train_seconds, 2),
            "eval_seconds": round(time.perf_counter() - t_eval, 2),
            "final_loss": trainer.last_loss,  # the mean loss of the last train.log_every steps
        }
    )
    write_json_atomic(out / "metrics.json", metrics)
    return out


def evaluate_toy(
    model: nn.Module, dataset: ToyDataset, flow: Flow, cfg: ToyRunConfig, out: Path | None = None
) -> dict[str, Any]:
    """Test NLL (exact change of variables), true NLL of the target on the same points, the samples' on-manifold
    error and data log-density; writes ``samples.png`` into ``out`` if given. Uses ``cfg.sample``'s solver."""
    model.eval()
    manifold = flow.manifold
    gen = torch.Generator().manual_seed(cfg.eval.seed)
    test = dataset.sample(cfg.eval.test_samples, gen)
    spec = cfg.sample
    stats = IntegrationStats()
    logp = log_likelihood(
        model_velocity(model, spec),
        test,
        manifold,
        steps=cfg.eval.likelihood_steps,
        method=spec.method,
        divergence_method=cfg.eval.divergence,
        generator=gen,
        stats=stats,
        transport=spec.transport,
    )
    samples = generate(model, flow, (cfg.eval.plot_samples, *dataset.point_shape), spec, generator=gen)
    metrics = {
        "dataset": cfg.data.name,
        "manifold": repr(manifold),
        "path": cfg.flow.path,
        "test_nll": float(-logp.mean()),
        "test_nll_stderr": float(logp.std() / math.sqrt(logp.numel())),
        "true_nll": float(-dataset.log_prob(test).mean()),
        "samples_data_nll": float(-dataset.log_prob(samples).mean()),
        "on_manifold_error": float(manifold.point_error(samples).max()),
        "likelihood_nfe": stats.nfe,
        "sampler": f"{spec.method} x {spec.steps} ({spec.transport})",
    }
    metrics["nll_gap"] = metrics["test_nll"] - metrics["true_nll"]
    if out is not None:
        title = f"{cfg.name} ({cfg.flow.path}): test NLL {metrics['test_nll']:.3f}, true {metrics['true_nll']:.3f}"
        plot_samples(dataset.sample(cfg.eval.plot_samples, gen), samples, manifold, out / "samples.png", title=title)
    return metrics


#: What each entry of a toy run's ``metrics.json`` is, in the order :func:`metrics_table` prints them.
METRIC_MEANINGS: dict[str, str] = {
    "dataset": "the toy dataset",
    "manifold": "the manifold it lives on",
    "path": "geodesic (on the manifold) or linear (the baseline)",
    "test_nll": "negative log-likelihood of held-out data under the learned flow (nats, lower is better)",
    "test_nll_stderr": "standard error of test_nll",
    "true_nll": "the same points' NLL under the true density: the floor test_nll can reach",
    "nll_gap": "test_nll - true_nll (0: the flow matches the data's density)",
    "samples_data_nll": "NLL of the flow's samples under the true density (near true_nll for good samples)",
    "on_manifold_error": "largest coordinate of |projx(x) - x| over the samples: how far they are off the manifold",
    "final_loss": "mean flow-matching loss of the last logged steps",
    "likelihood_nfe": "velocity evaluations of the likelihood computation",
    "sampler": "solver x steps (transport)",
    "train_steps": "training steps",
    "train_seconds": "wall time of the training steps",
    "eval_seconds": "wall time of this evaluation",
}


def metrics_table(metrics: dict[str, Any]) -> str:
    """A toy run's ``metrics.json`` as a Markdown table: metric, value and what it means (the entries of
    :data:`METRIC_MEANINGS` first, in its order, then any others)."""
    lines = ["| metric | value | meaning |", "|---|---|---|"]
    for key in [*(k for k in METRIC_MEANINGS if k in metrics), *(k for k in metrics if k not in METRIC_MEANINGS)]:
        value = metrics[key]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {text} | {METRIC_MEANINGS.get(key, '')} |")
    return "\n".join(lines)


__all__ = ["METRIC_MEANINGS", "evaluate_toy", "metrics_table", "toy_dataset", "toy_model", "train_toy"]
