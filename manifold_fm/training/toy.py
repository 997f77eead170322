"""Manifold runs (``kind: manifold``; ``kind: toy`` is the older name of the same): a small MLP flow on a manifold,
trained by the one :class:`~manifold_fm.training.trainer.Trainer`, on a built-in synthetic dataset (evaluated against
its known density) or on a user's file of points (``data.file``: split train/val/test, see
:mod:`manifold_fm.data.points`).

``train_toy(config, overrides, out_dir, resume)`` writes::

    <out_dir>/config.yaml          the resolved configuration
    <out_dir>/checkpoints/         atomic safetensors checkpoints (weights, EMA, optimizer/RNG state, meta.json)
    <out_dir>/metrics.jsonl        the training log (and val_nll at each validation, eval.val_every)
    <out_dir>/best.safetensors     the EMA weights of the best validation NLL so far (best.json: its step and NLL)
    <out_dir>/metrics.json         test NLL of the best (else final EMA) weights ± standard error, the solver check,
                                   true NLL of a built-in target, on-manifold error, time
    <out_dir>/samples.png          data (test points) vs. model samples in the manifold's plot chart

``flow.path: geodesic`` uses the manifold's geodesics (tangent targets); ``flow.path: linear`` the ambient straight
line ``(1-t) x0 + t x1`` with ``x1 - x0`` targets, the baseline: its samples are still integrated on the manifold
(velocities projected), so both are evaluated the same way. A built-in dataset is drawn with a generator seeded by
the step (:class:`~manifold_fm.data.sources.SamplerSource`); a file's training split is read in a per-epoch shuffled
order in which every point appears every epoch (:class:`~manifold_fm.data.sources.TensorSource` with
``drop_last=False``); either way resuming is exact. Early stopping (``eval.patience``) ends the run with a checkpoint
of the step it stopped at. :func:`load_manifold_run`, :func:`evaluate_manifold_run` and
:func:`sample_manifold_run` serve ``manifold-fm evaluate``, ``sample`` and ``export`` on such a run folder.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_path, write_json_atomic, write_text_atomic
from ..config import ConfigError, to_dict
from ..data.points import check_on_manifold, latlon_to_sphere, read_points, split_points
from ..data.sources import DataSource, SamplerSource, TensorSource
from ..data.toy import ToyDataset, build_toy_dataset
from ..eval.plots import plot_samples
from ..flow import Flow
from ..likelihood import log_likelihood
from ..manifolds import Manifold, build_manifold
from ..sampler import generate, model_velocity
from ..solvers import IntegrationStats
from .builders import build_flow, build_model
from .flow_objective import FlowObjective
from .schema import RESUME_SECTIONS, ManifoldSpec, ToyRunConfig, load_toy_config
from .trainer import Hook, Trainer


def toy_dataset(cfg: ToyRunConfig) -> ToyDataset:
    """The built-in dataset of ``cfg.data``; a bad name or parameter is a :class:`ConfigError` naming ``data`` (and,
    for a parameter, the valid ones)."""
    try:
        return build_toy_dataset(cfg.data.dataset, **cfg.data.params)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None


def build_run_manifold(spec: ManifoldSpec) -> Manifold:
    """The manifold of ``manifold:``: a registry name (``manifold-fm manifolds``) or ``pkg.module:Class`` (a
    :class:`Manifold` subclass), built with ``params``; a bad one is a :class:`ConfigError`."""
    if ":" in spec.name:
        module_name, _, attr = spec.name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"manifold: cannot import {spec.name} ({exc}); give pkg.module:Class") from None
        if not (isinstance(cls, type) and issubclass(cls, Manifold)):
            raise ConfigError(f"manifold: {spec.name} is not a subclass of manifold_fm.manifolds.Manifold")
        try:
            return cls(**spec.params)
        except TypeError as exc:
            valid = ", ".join(p for p in inspect.signature(cls).parameters if p != "self") or "none"
            raise ConfigError(f"manifold.params: {spec.name}: {exc}; valid parameters: {valid}") from None
    try:
        return build_manifold(spec.name, **spec.params)
    except ValueError as exc:
        raise ConfigError(f"manifold: {exc} (see manifold-fm manifolds)") from None


@dataclass
class RunData:
    """What a manifold run trains and evaluates on: the manifold, the shape of one point, the training batches, the
    validation and test points (``None`` for a built-in dataset: drawn at evaluation time), the built-in dataset
    (``None`` for a file: no true density), and a description."""

    manifold: Manifold
    point_shape: tuple[int, ...]
    source: DataSource
    val: Tensor | None
    test: Tensor | None
    dataset: ToyDataset | None
    description: str
    sizes: dict[str, int]


def resolve_data_file(cfg: ToyRunConfig, run_dir: Path | None = None) -> Path:
    """``data.file`` as given (relative to the working directory), else relative to the run folder, else the
    absolute path recorded at training time (``data_file.txt`` in the run folder)."""
    assert cfg.data.file is not None
    path = Path(cfg.data.file)
    if path.is_file() or run_dir is None:
        return path
    candidates = [run_dir / path]
    recorded = run_dir / "data_file.txt"
    if recorded.is_file():
        candidates.append(Path(recorded.read_text().strip()))
    return next((c for c in candidates if c.is_file()), path)


def file_points(cfg: ToyRunConfig, manifold: Manifold, path: Path) -> Tensor:
    """The points of ``data.file`` (lat/lon converted, checked on ``manifold``), in the default dtype."""
    x, where = read_points(path)
    if cfg.data.latlon is not None:
        x = latlon_to_sphere(x, cfg.data.latlon)
    x = check_on_manifold(x, manifold, where, cfg.data.tolerance, cfg.data.project, source=str(path))
    return x.to(torch.get_default_dtype())


def run_data(cfg: ToyRunConfig, run_dir: Path | None = None) -> RunData:
    """The :class:`RunData` of ``cfg``: a file of points split train/val/test (training batches from the train split,
    each epoch using every point), or a built-in dataset sampled afresh at every step."""
    if cfg.data.file is None:
        dataset = toy_dataset(cfg)
        return RunData(
            dataset.manifold,
            tuple(dataset.point_shape),
            SamplerSource(dataset.sample),
            None,
            None,
            dataset,
            cfg.data.dataset,
            {},
        )
    spec = cfg.manifold or ManifoldSpec(name="sphere")
    manifold = build_run_manifold(spec)
    path = resolve_data_file(cfg, run_dir)
    x = file_points(cfg, manifold, path)
    split = split_points(x.shape[0], cfg.data.split, cfg.data.split_seed)
    train = x[split.train]
    sizes = {"train": int(split.train.numel()), "val": int(split.val.numel()), "test": int(split.test.numel())}
    return RunData(
        manifold,
        tuple(x.shape[1:]),
        TensorSource(train, drop_last=False),
        x[split.val] if split.val.numel() else None,
        x[split.test] if split.test.numel() else None,
        None,
        Path(cfg.data.file).name,
        sizes,
    )


def toy_model(cfg: ToyRunConfig, data: ToyDataset | RunData) -> nn.Module:
    """The MLP of ``cfg.model``, initialised from ``train.seed`` (not the global RNG, so a fixed seed reproduces
    across processes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, data.point_shape, periodic=data.manifold.periodic)


def nll(
    model: nn.Module,
    x: Tensor,
    manifold: Manifold,
    cfg: ToyRunConfig,
    steps: int,
    generator: torch.Generator | None = None,
    stats: IntegrationStats | None = None,
) -> tuple[float, float]:
    """Mean negative log-likelihood of ``x`` under ``model``'s flow and its standard error (:func:`log_prob`)."""
    logp = log_prob(model, x, manifold, cfg, steps, generator, stats)
    return float(-logp.mean()), float(logp.std() / math.sqrt(logp.numel())) if logp.numel() > 1 else 0.0


def log_prob(
    model: nn.Module,
    x: Tensor,
    manifold: Manifold,
    cfg: ToyRunConfig,
    steps: int,
    generator: torch.Generator | None = None,
    stats: IntegrationStats | None = None,
) -> Tensor:
    """``(N,)`` log-density of points ``x`` (w.r.t. the Riemannian volume) under ``model``'s flow: the run's
    likelihood solver (``sample.method`` with ``steps`` steps, ``sample.transport``, ``eval.divergence``)."""
    model.eval()
    spec = cfg.sample
    return log_likelihood(
        model_velocity(model, spec),
        x,
        manifold,
        steps=steps,
        method=spec.method,
        divergence_method=cfg.eval.divergence,
        generator=generator,
        stats=stats,
        transport=spec.transport,
    )


def validation_points(cfg: ToyRunConfig, data: RunData) -> Tensor | None:
    """The validation split, or ``eval.val_samples`` points drawn from a built-in dataset (seeded by
    ``eval.seed + 1``, apart from the test points)."""
    if data.dataset is not None:
        return data.dataset.sample(cfg.eval.val_samples, torch.Generator().manual_seed(cfg.eval.seed + 1))
    return data.val


BEST_WEIGHTS = "best.safetensors"
BEST_RECORD = "best.json"


def validation_hook(cfg: ToyRunConfig, data: RunData, out: Path, trainer_ref: list[Trainer]) -> Hook | None:
    """Every ``eval.val_every`` steps: the validation NLL of the EMA weights (logged as ``val_nll``); the best
    weights so far written to ``best.safetensors`` (``best.json``: step, NLL); with ``eval.patience``, the trainer is
    asked to stop once that many validations in a row brought no improvement."""
    every = cfg.eval.val_every
    val = validation_points(cfg, data)
    if every is None or val is None:
        return None
    steps = cfg.eval.val_steps or cfg.eval.likelihood_steps

    def fn(step: int, ema_model: nn.Module) -> dict[str, float]:
        mean, stderr = nll(ema_model, val, data.manifold, cfg, steps, torch.Generator().manual_seed(cfg.eval.seed))
        best = read_best(out)
        if best is not None and best["step"] > step:  # left by a later step of a run resumed from earlier
            best = None
        if best is None or mean < best["val_nll"]:
            from safetensors.torch import save_file

            with atomic_path(out / BEST_WEIGHTS) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in ema_model.state_dict().items()}, str(tmp))
            best = {"step": step, "val_nll": mean, "val_nll_stderr": stderr}
            write_json_atomic(out / BEST_RECORD, best)
        elif cfg.eval.patience is not None and step - best["step"] >= cfg.eval.patience * every:
            trainer_ref[0].request_stop()
        return {"val_nll": mean, "val_nll_stderr": stderr, "best_val_nll": best["val_nll"]}

    return Hook(every, fn)


def read_best(out: Path) -> dict[str, Any] | None:
    """The ``best.json`` record of a run folder (``None`` if there is none)."""
    try:
        return json.loads((Path(out) / BEST_RECORD).read_text())
    except (OSError, ValueError):
        return None


def train_toy(
    config: Any = "toy-sphere",
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    checkpoint: str | int | Path | None = None,
) -> Path:
    """Train and evaluate a manifold flow; returns the run folder (see the module docstring for its contents).
    ``overwrite``: replace the run in ``out_dir`` once the config and dataset are valid; ``checkpoint`` (with
    ``resume``): the kept checkpoint to continue from (default the latest).

    Raises:
        ConfigError: bad configuration.
        InputError: a data file that cannot be read, or whose points are off the manifold.
        TrainingError: the run folder already holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    cfg = config if isinstance(config, ToyRunConfig) and not overrides else load_toy_config(config, overrides)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{cfg.name}-{cfg.flow.path}"
    data = run_data(cfg, out if resume else None)
    flow = build_flow(cfg.flow, data.manifold)
    plain = to_dict(cfg)
    trainer_ref: list[Trainer] = []
    hook = validation_hook(cfg, data, out, trainer_ref)
    trainer = Trainer(
        FlowObjective(toy_model(cfg, data), flow, cfg.optim),
        data.source,
        cfg.train,
        out,
        hooks=[hook] if hook is not None else [],
        fingerprint={k: plain[k] for k in (*RESUME_SECTIONS, "manifold")},
        config=plain,
        device="cpu",
        progress=progress,
        meta={"config": plain, "point_shape": list(data.point_shape)},
    )
    trainer_ref.append(trainer)
    trainer.fit(resume=resume, overwrite=overwrite, checkpoint=checkpoint)
    if cfg.data.file is not None:
        write_text_atomic(out / "data_file.txt", str(resolve_data_file(cfg).resolve()) + "\n")
    t_eval = time.perf_counter()
    model, weights = final_model(trainer.ema.model, out)
    metrics = evaluate_toy(model, data, flow, cfg, out)
    best = read_best(out)
    metrics.update(
        {
            "weights": weights,
            "train_steps": cfg.train.steps,
            "steps_trained": trainer.step,
            "stopped_early": trainer.step < cfg.train.steps,
            "train_seconds": round(trainer.train_seconds, 2),
            "eval_seconds": round(time.perf_counter() - t_eval, 2),
            "final_loss": trainer.last_loss,  # the mean loss of the last train.log_every steps
            **({"best_step": best["step"], "best_val_nll": best["val_nll"]} if best is not None else {}),
            **({f"{k}_points": v for k, v in data.sizes.items()}),
        }
    )
    write_json_atomic(out / "metrics.json", metrics)
    return out


def final_model(ema_model: nn.Module, out: Path) -> tuple[nn.Module, str]:
    """The weights a run is evaluated, sampled and exported with: the best by validation NLL (``best.safetensors``)
    when validations ran, else the final EMA weights. Returns the model and which (``best (step N)`` or ``ema``)."""
    best = read_best(out)
    if best is None or not (out / BEST_WEIGHTS).is_file():
        return ema_model, "ema"
    from safetensors.torch import load_file

    model = copy.deepcopy(ema_model)
    model.load_state_dict(load_file(str(out / BEST_WEIGHTS)))
    return model.eval(), f"best (step {best['step']})"


def evaluate_toy(
    model: nn.Module, data: RunData | ToyDataset, flow: Flow, cfg: ToyRunConfig, out: Path | None = None
) -> dict[str, Any]:
    """Test NLL (exact change of variables) with its standard error, the solver check (the test NLL again with
    ``eval.check_steps`` steps), the samples' on-manifold error and, for a built-in dataset, the true NLL of the
    same points and the samples' data log-density; writes ``samples.png`` into ``out`` if given. Uses
    ``cfg.sample``'s solver."""
    if isinstance(data, ToyDataset):
        data = RunData(data.manifold, tuple(data.point_shape), SamplerSource(data.sample), None, None, data, "", {})
    model.eval()
    manifold = flow.manifold
    gen = torch.Generator().manual_seed(cfg.eval.seed)
    test = data.dataset.sample(cfg.eval.test_samples, gen) if data.dataset is not None else data.test
    if test is None:
        raise ConfigError("data.split: the run has no test points (its test fraction is 0)")
    spec = cfg.sample
    stats = IntegrationStats()
    steps = cfg.eval.likelihood_steps
    mean, stderr = nll(model, test, manifold, cfg, steps, gen, stats)
    samples = generate(model, flow, (cfg.eval.plot_samples, *data.point_shape), spec, generator=gen)
    metrics: dict[str, Any] = {
        "dataset": data.description or cfg.data.dataset,
        "manifold": repr(manifold),
        "path": cfg.flow.path,
        "test_nll": mean,
        "test_nll_stderr": stderr,
        "test_points": int(test.shape[0]),
    }
    metrics.update(solver_check(model, test, manifold, cfg, mean, stderr))
    if data.dataset is not None:
        metrics["true_nll"] = float(-data.dataset.log_prob(test).mean())
        metrics["samples_data_nll"] = float(-data.dataset.log_prob(samples).mean())
        metrics["nll_gap"] = metrics["test_nll"] - metrics["true_nll"]
    metrics.update(
        {
            "on_manifold_error": float(manifold.point_error(samples).max()),
            "likelihood_nfe": stats.nfe,
            "sampler": f"{spec.method} x {spec.steps} ({spec.transport})",
            "likelihood_solver": f"{spec.method} x {steps} ({cfg.eval.divergence} divergence)",
        }
    )
    if out is not None:
        truth = f", true {metrics['true_nll']:.3f}" if "true_nll" in metrics else ""
        title = f"{cfg.name} ({cfg.flow.path}): test NLL {mean:.3f}{truth}"
        shown = data.dataset.sample(cfg.eval.plot_samples, gen) if data.dataset is not None else test
        plot_samples(shown, samples, manifold, out / "samples.png", title=title)
    return metrics


def solver_check(
    model: nn.Module, test: Tensor, manifold: Manifold, cfg: ToyRunConfig, mean: float, stderr: float
) -> dict[str, Any]:
    """The test NLL again with ``eval.check_steps`` steps (default twice ``likelihood_steps``; 0: skipped): its value,
    the difference, and ``solver_converged`` (the two differ by at most the standard error). A warning otherwise."""
    steps = cfg.eval.check_steps if cfg.eval.check_steps is not None else 2 * cfg.eval.likelihood_steps
    if steps == 0:
        return {}
    check, _ = nll(model, test, manifold, cfg, steps, torch.Generator().manual_seed(cfg.eval.seed))
    diff = abs(check - mean)
    ok = diff <= stderr
    if not ok:
        warnings.warn(
            f"the test NLL changes by {diff:.4f} from {cfg.eval.likelihood_steps} to {steps} solver steps, more than "
            f"its standard error {stderr:.4f}: the likelihood solver has not converged; raise eval.likelihood_steps",
            stacklevel=2,
        )
    return {"check_steps": steps, "test_nll_check": check, "solver_difference": diff, "solver_converged": ok}


@dataclass
class LoadedManifoldRun:
    """A trained manifold run, ready to evaluate, sample or export: its config, manifold, flow, network (eval mode),
    the step and which weights (``best (step N)``, ``ema`` or ``model``), and its folder."""

    cfg: ToyRunConfig
    manifold: Manifold
    flow: Flow
    model: nn.Module
    point_shape: tuple[int, ...]
    step: int
    weights: str
    folder: Path | None


def is_manifold_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds a manifold (``toy``) run."""
    from .run_folder import run_status

    status = run_status(folder) if Path(folder).is_dir() else None
    return status is not None and status.kind in ("toy", "manifold")


def manifold_run_from_record(
    config: dict[str, Any],
    point_shape: list[int],
    weights: dict[str, Tensor],
    step: int,
    which: str,
    folder: Path | None,
) -> LoadedManifoldRun:
    """Rebuild a manifold run from its config (plain data), point shape and network weights."""
    cfg = load_toy_config(config)
    if cfg.data.file is None:
        manifold = toy_dataset(cfg).manifold
    else:
        manifold = build_run_manifold(cfg.manifold or ManifoldSpec(name="sphere"))
    shape = tuple(int(s) for s in point_shape)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model, shape, periodic=manifold.periodic)
    model.load_state_dict(weights)
    return LoadedManifoldRun(cfg, manifold, build_flow(cfg.flow, manifold), model.eval(), shape, step, which, folder)


def load_manifold_run(
    run: str | Path, *, checkpoint: str | int | Path | None = None, use_ema: bool = True, best: bool = True
) -> LoadedManifoldRun:
    """A manifold run folder's network: the best weights by validation NLL (``best.safetensors``, when ``best`` and
    no ``checkpoint`` is named), else the latest (or named) checkpoint's EMA weights (``use_ema=False``: raw)."""
    from safetensors.torch import load_file

    from ..errors import InputError
    from .checkpoint import load_checkpoint, select_checkpoint

    run = Path(run)
    if not is_manifold_run(run):
        raise InputError(f"{run} holds no manifold run (no config.yaml of kind manifold/toy and checkpoints/)")
    chosen = select_checkpoint(run / "checkpoints", checkpoint)
    if chosen is None:
        raise InputError(f"{run} holds no checkpoint yet; train it first (manifold-fm train --out {run})")
    record = read_best(run)
    if best and checkpoint is None and record is not None and (run / BEST_WEIGHTS).is_file():
        ckpt = load_checkpoint(chosen, model=False, ema=False, state=False)
        weights, which, step = load_file(str(run / BEST_WEIGHTS)), f"best (step {record['step']})", record["step"]
    else:
        averaged = use_ema and (chosen / "ema.safetensors").is_file()
        ckpt = load_checkpoint(chosen, model=not averaged, ema=averaged, state=False)
        weights, which, step = (ckpt.ema if averaged else ckpt.model), ("ema" if averaged else "model"), ckpt.step
    if "config" not in ckpt.meta or "point_shape" not in ckpt.meta:
        raise InputError(f"checkpoint {ckpt.path} was not written by a manifold run (no config/point_shape)")
    return manifold_run_from_record(ckpt.meta["config"], ckpt.meta["point_shape"], weights, step, which, run)


def evaluate_manifold_run(
    run: str | Path,
    *,
    steps: int | None = None,
    check_steps: int | None = None,
    checkpoint: str | int | Path | None = None,
    use_ema: bool = True,
) -> dict[str, Any]:
    """``manifold-fm evaluate RUN``: the test NLL of a manifold run (its test split, or a built-in dataset's test
    points) with its standard error, the solver, and the solver check at ``check_steps`` (default twice ``steps``;
    ``steps`` default ``eval.likelihood_steps``)."""
    loaded = load_manifold_run(run, checkpoint=checkpoint, use_ema=use_ema)
    cfg = loaded.cfg
    steps = steps or cfg.eval.likelihood_steps
    cfg = cfg.model_copy(
        update={
            "eval": cfg.eval.model_copy(
                update={"likelihood_steps": steps, "check_steps": 2 * steps if check_steps is None else check_steps}
            )
        }
    )
    data = run_data(cfg, Path(run))
    gen = torch.Generator().manual_seed(cfg.eval.seed)
    test = data.dataset.sample(cfg.eval.test_samples, gen) if data.dataset is not None else data.test
    if test is None:
        raise ConfigError("data.split: the run has no test points (its test fraction is 0)")
    mean, stderr = nll(loaded.model, test, loaded.manifold, cfg, steps, gen)
    result: dict[str, Any] = {
        "run": str(run),
        "weights": loaded.weights,
        "step": loaded.step,
        "test_nll": mean,
        "test_nll_stderr": stderr,
        "test_points": int(test.shape[0]),
        "likelihood_solver": f"{cfg.sample.method} x {steps} ({cfg.eval.divergence} divergence)",
    }
    result.update(solver_check(loaded.model, test, loaded.manifold, cfg, mean, stderr))
    if data.dataset is not None:
        result["true_nll"] = float(-data.dataset.log_prob(test).mean())
    return result


def sample_manifold_run(
    loaded: LoadedManifoldRun, num: int, *, seed: int = 0, method: str | None = None, steps: int | None = None
) -> Tensor:
    """``num`` samples of a loaded manifold run with its sampler (``method``/``steps`` override it), seeded."""
    from ..config import validate
    from ..sampler import SamplerSpec

    base = loaded.cfg.sample.model_dump(include=set(SamplerSpec.model_fields))
    chosen = {k: v for k, v in {"method": method, "steps": steps}.items() if v is not None}
    spec = validate(SamplerSpec, {**base, **chosen})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return generate(loaded.model, loaded.flow, (num, *loaded.point_shape), spec, generator=gen)


#: What each entry of a toy run's ``metrics.json`` is, in the order :func:`metrics_table` prints them.
METRIC_MEANINGS: dict[str, str] = {
    "dataset": "the built-in dataset, or the file of points",
    "manifold": "the manifold it lives on",
    "path": "geodesic (on the manifold) or linear (the baseline)",
    "test_nll": "negative log-likelihood of held-out data under the learned flow (nats, lower is better)",
    "test_nll_stderr": "standard error of test_nll",
    "test_points": "the points test_nll is the mean over (the test split of a file)",
    "check_steps": "the second solver step count the test NLL was recomputed with",
    "test_nll_check": "the test NLL with check_steps solver steps",
    "solver_difference": "|test_nll - test_nll_check| (above test_nll_stderr: the solver has not converged)",
    "solver_converged": "solver_difference <= test_nll_stderr",
    "likelihood_solver": "solver x steps of the likelihood (divergence)",
    "weights": "the weights evaluated: the best by validation NLL, or the final EMA",
    "best_step": "the step of the best validation NLL",
    "best_val_nll": "the best validation NLL",
    "steps_trained": "steps actually trained (fewer than train_steps after early stopping)",
    "stopped_early": "whether early stopping (eval.patience) ended the run",
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
    "train_points": "points in the training split (a file)",
    "val_points": "points in the validation split (a file)",
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


__all__ = [
    "METRIC_MEANINGS",
    "LoadedManifoldRun",
    "RunData",
    "build_run_manifold",
    "evaluate_manifold_run",
    "evaluate_toy",
    "is_manifold_run",
    "load_manifold_run",
    "manifold_run_from_record",
    "metrics_table",
    "nll",
    "run_data",
    "sample_manifold_run",
    "toy_dataset",
    "toy_model",
    "train_toy",
]
