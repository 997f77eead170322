"""Train a small MLP flow on a toy manifold dataset and evaluate it against the known density.

``train_toy(config, overrides, out_dir, resume)`` (the ``kind: toy`` branch of ``manifold-fm train``) writes::

    <out_dir>/config.yaml          the resolved configuration
    <out_dir>/checkpoints/         atomic safetensors checkpoints (weights + optimizer/RNG state + meta.json)
    <out_dir>/metrics.json         test NLL under the learned flow, true NLL of the target, on-manifold error, time
    <out_dir>/samples.png          data vs. model samples (lat/lon for spheres, angles for the torus, the disk)

Training: ``x1 ~ data``, ``x0 ~ manifold.random_base``, ``t ~`` the time sampler, an optional minibatch coupling,
``x_t, u_t`` from the path, loss :func:`~manifold_fm.loss.flow_matching_loss`. ``path: geodesic`` uses the
manifold's geodesics (tangent targets); ``path: linear`` the ambient straight line ``(1-t) x0 + t x1`` with
``x1 - x0`` targets, the baseline: its samples are still integrated on the manifold (velocities projected), so both
are evaluated the same way.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_json_atomic
from ..config import ConfigError, load_config, save_config
from ..coupling import build_coupling
from ..data.toy import ToyDataset, build_toy_dataset
from ..likelihood import log_likelihood
from ..loss import flow_matching_loss
from ..manifolds import FlatTorus, GeooptManifold, Manifold
from ..models.mlp import VelocityMLP
from ..paths import build_path
from ..solvers import IntegrationStats, integrate
from ..time import build_time_sampler
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass
class ToyDataConfig:
    """Which toy dataset (``manifold_fm.data.toy``) and its constructor arguments."""

    name: str = "vmf"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToyModelConfig:
    hidden: int = 256
    depth: int = 3
    time_dim: int = 64


@dataclass
class ToyTrainConfig:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    weight_decay: float = 0.0
    time_sampler: Literal["uniform", "logit_normal"] = "uniform"
    time_shift: float = 1.0
    coupling: Literal["independent", "ot"] = "independent"
    seed: int = 0
    checkpoint_every: int = 500
    threads: int = 1  # tiny models: one thread avoids contention (2 threads ran 10x slower on a loaded 2-core box)


@dataclass
class ToyEvalConfig:
    test_samples: int = 1000
    plot_samples: int = 2000
    method: str = "rk4"
    steps: int = 40
    likelihood_steps: int = 40
    divergence: Literal["exact", "hutchinson"] = "exact"
    # How RK stages are moved between tangent spaces (manifold_fm.solvers): "dlog" (exact chart map, any manifold)
    # or "ambient" (classical RK in the ambient coordinates + projx: for spheres/torus and full-dimensional charts
    # such as the Poincare ball, where it skips the forward-mode JVP through logmap at every stage).
    transport: Literal["dlog", "parallel", "project", "ambient"] = "dlog"
    seed: int = 1234


@dataclass
class ToyConfig:
    """``kind: toy`` configuration (``manifold_fm/configs/toy-*.yaml``)."""

    kind: Literal["toy"] = "toy"
    name: str = "toy"
    path: Literal["geodesic", "linear"] = "geodesic"
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    eval: ToyEvalConfig = field(default_factory=ToyEvalConfig)


def load_toy_config(config: Any, overrides: list[str] | tuple[str, ...] = ()) -> ToyConfig:
    cfg = config if isinstance(config, ToyConfig) else load_config(ToyConfig, config, list(overrides))
    if cfg.train.steps < 0 or cfg.train.batch_size < 1:
        raise ConfigError("train.steps must be >= 0 and train.batch_size >= 1")
    return cfg


def build_model(cfg: ToyConfig, dataset: ToyDataset) -> VelocityMLP:
    return VelocityMLP(
        dataset.point_shape,
        hidden=cfg.model.hidden,
        depth=cfg.model.depth,
        time_dim=cfg.model.time_dim,
        periodic=isinstance(dataset.manifold, FlatTorus),
    )


def _lr_at(cfg: ToyTrainConfig, step: int) -> float:
    warm = max(1, min(100, cfg.steps // 20))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))




def train_toy(
    config: Any = "toy-sphere",
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train and evaluate a toy flow; returns the run folder (see the module docstring for its contents).

    Raises:
        ConfigError: bad configuration; ValueError: the run folder already holds a run and ``resume`` is False.
    """
    cfg = load_toy_config(config, overrides)
    try:
        dataset = build_toy_dataset(cfg.data.name, **cfg.data.params)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{cfg.name}-{cfg.path}"
    ckpt_root = out / "checkpoints"
    existing = latest_checkpoint(ckpt_root)
    if existing is not None and not resume:
        raise ValueError(f"{out} already holds a run (checkpoint {existing.name}); pass --resume or another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(cfg.train.threads, os.cpu_count() or 1)))
    try:
        return _run(cfg, dataset, out, ckpt_root, existing, progress)
    finally:
        torch.set_num_threads(prev_threads)


def _run(
    cfg: ToyConfig, dataset: ToyDataset, out: Path, ckpt_root: Path, existing: Path | None, progress: bool
) -> Path:
    manifold = dataset.manifold

    # Initialise from the run's seed, not the global RNG, so a fixed seed reproduces across processes.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, dataset)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    start, elapsed = 0, 0.0
    if existing is not None:
        try:
            ck = load_checkpoint(existing)
        except SafetensorError as exc:  # not among the errors load_checkpoint converts
            raise CheckpointError(f"checkpoint {existing} is unreadable ({exc}); resume from an earlier one") from None
        model.load_state_dict(ck.model)
        opt.load_state_dict(ck.state["optimizer"])
        gen.set_state(ck.state["generator"])
        start, elapsed = ck.step, float(ck.meta.get("train_seconds", 0.0))

    path = build_path(cfg.path, manifold)
    times = build_time_sampler(cfg.train.time_sampler, shift=cfg.train.time_shift)
    coupling = build_coupling(cfg.train.coupling, path.manifold if cfg.path == "linear" else manifold)
    losses: list[float] = []
    model.train()
    t_start = time.perf_counter()
    bar = tqdm(range(start, cfg.train.steps), desc=f"train {cfg.name} ({cfg.path})", disable=not progress,
               initial=start, total=cfg.train.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg.train, step)
        b = cfg.train.batch_size
        x1 = dataset.sample(b, gen)
        x0 = manifold.random_base((b, *dataset.point_shape), generator=gen)
        t = times.sample(b, generator=gen)
        x0, x1, _ = coupling.pair(x0, x1)
        ps = path.sample(x0, x1, t)
        loss = flow_matching_loss(path.manifold, model(ps.x_t, ps.t), ps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.4f}")
        done = step + 1
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            _save(ckpt_root, done, model, opt, gen, elapsed + time.perf_counter() - t_start)
    bar.close()
    train_seconds = elapsed + time.perf_counter() - t_start
    if cfg.train.steps == 0 or start >= cfg.train.steps:
        _save(ckpt_root, max(start, cfg.train.steps), model, opt, gen, train_seconds)

    t_eval = time.perf_counter()
    metrics = evaluate_toy(model, dataset, cfg, out, progress=progress)
    metrics.update(
        {
            "train_steps": cfg.train.steps,
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(time.perf_counter() - t_eval, 2),
            "final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None,
        }
    )
    write_json_atomic(out / "metrics.json", metrics)
    return out


def _save(
    root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, secs: float
) -> None:
    save_checkpoint(
        root,
        step,
        model.state_dict(),
        state={"optimizer": opt.state_dict(), "generator": gen.get_state()},
        meta={"train_seconds": secs},
        keep=2,
    )


def model_velocity(model: torch.nn.Module) -> Any:
    """``velocity(x, t)`` for the solvers from a toy ``model(x, t)``."""
    return lambda x, t: model(x, t)


def evaluate_toy(
    model: torch.nn.Module, dataset: ToyDataset, cfg: ToyConfig, out: Path | None = None, progress: bool = False
) -> dict[str, Any]:
    """Test NLL (exact change of variables), true NLL of the target on the same points, samples' on-manifold error
    and the data log-density of generated samples; writes ``samples.png`` into ``out`` if given."""
    model.eval()
    manifold = dataset.manifold
    gen = torch.Generator().manual_seed(cfg.eval.seed)
    test = dataset.sample(cfg.eval.test_samples, gen)
    velocity = model_velocity(model)
    stats = IntegrationStats()
    logp = log_likelihood(
        velocity, test, manifold, steps=cfg.eval.likelihood_steps, method=cfg.eval.method,
        divergence_method=cfg.eval.divergence, generator=gen, stats=stats, transport=cfg.eval.transport,
    )
    x0 = manifold.random_base((cfg.eval.plot_samples, *dataset.point_shape), generator=gen)
    with torch.no_grad():
        samples = integrate(
            velocity, x0, manifold, steps=cfg.eval.steps, method=cfg.eval.method, transport=cfg.eval.transport
        )
    on_manifold = float(manifold.point_error(samples).max())
    metrics = {
        "dataset": cfg.data.name,
        "manifold": repr(manifold),
        "path": cfg.path,
        "test_nll": float(-logp.mean()),
        "test_nll_stderr": float(logp.std() / math.sqrt(logp.numel())),
        "true_nll": float(-dataset.log_prob(test).mean()),
        "samples_data_nll": float(-dataset.log_prob(samples).mean()),
        "on_manifold_error": on_manifold,
        "likelihood_nfe": stats.nfe,
        "sampler": f"{cfg.eval.method} x {cfg.eval.steps} ({cfg.eval.transport})",
    }
    metrics["nll_gap"] = metrics["test_nll"] - metrics["true_nll"]
    if out is not None:
        title = f"{cfg.name} ({cfg.path}): test NLL {metrics['test_nll']:.3f}, true {metrics['true_nll']:.3f}"
        plot_samples(dataset.sample(cfg.eval.plot_samples, gen), samples, manifold, out / "samples.png", title=title)
    return metrics


def _coords(x: torch.Tensor, manifold: Manifold) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    x = x.detach().double()
    if isinstance(manifold, FlatTorus) or isinstance(manifold, GeooptManifold):
        return x[:, 0], x[:, 1], "x1", "x2"
    v = x.reshape(x.shape[0], -1, 3)[:, 0]  # first sphere of a product
    v = v / v.norm(dim=-1, keepdim=True)
    return torch.atan2(v[:, 1], v[:, 0]), torch.asin(v[:, 2].clamp(-1, 1)), "longitude", "latitude"


def plot_samples(data: torch.Tensor, samples: torch.Tensor, manifold: Manifold, path: Path, title: str = "") -> None:
    """Scatter data and model samples side by side (lat/lon for spheres, angles for the torus, the Poincare disk);
    written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    for ax, pts, label in zip(axes, (data, samples), ("data", "model samples"), strict=False):
        a, b, xl, yl = _coords(pts, manifold)
        ax.scatter(a.numpy(), b.numpy(), s=2, alpha=0.5)
        ax.set_title(label)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if isinstance(manifold, GeooptManifold):
            ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="k", lw=0.8))
            ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


__all__ = ["ToyConfig", "build_model", "evaluate_toy", "load_toy_config", "plot_samples", "train_toy"]
