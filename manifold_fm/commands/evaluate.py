"""``manifold-fm evaluate``: FID / IS / precision-recall (torch-fidelity, local Inception weights) or, on the built-in
dataset, the Fréchet distance in a small built-in classifier's features plus that classifier's accuracy; on a
manifold run's folder, its test NLL with the standard error, the solver, and a check of the solver at a second step
count."""

from __future__ import annotations

from pathlib import Path

import click

from ..atomic import write_json_atomic
from ..progress import progress_option
from ..threads import threads_option


@click.command("evaluate")
@click.argument("samples", type=click.Path(path_type=Path))
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    default=None,
    help="Reference statistics .npz (mu, sigma), an .npz of images (arr_0) or an image folder.",
)
@click.option(
    "--inception-weights",
    type=click.Path(path_type=Path),
    default=None,
    help="Local pt_inception-2015-12-05-6726825d.pth (nothing is downloaded).",
)
@click.option(
    "--feature-extractor",
    default="inception-v3-compat",
    show_default=True,
    help="A torch-fidelity feature extractor name (anything but Inception is reported as fd[name]).",
)
@click.option(
    "--builtin",
    "builtin",
    is_flag=True,
    default=False,
    help="Evaluate against the built-in dataset with its classifier (default when no --reference).",
)
@click.option("--no-isc", is_flag=True, default=False, help="Skip the Inception Score.")
@click.option("--no-prc", is_flag=True, default=False, help="Skip precision/recall.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "tf32", "fp32"]),
    default="fp32",
    show_default=True,
    help="Arithmetic of the feature network (fp32: IEEE float32, TF32 off, as the reference statistics were made; "
    "tf32: TF32 matmuls on GPUs; bf16: bf16 autocast; auto: bf16 on CUDA GPUs, fp32 elsewhere).",
)
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None, help="Write the metrics as JSON.")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Manifold runs: likelihood solver steps (default: the run's eval.likelihood_steps).",
)
@click.option(
    "--check-steps",
    type=click.IntRange(min=0),
    default=None,
    help="Manifold runs: the second step count the solver is checked with (default: twice --steps; 0: no check).",
)
@click.option(
    "--checkpoint",
    "checkpoint",
    default=None,
    metavar="STEP|PATH",
    help="Manifold runs: evaluate this kept checkpoint's EMA weights instead of the best by validation NLL.",
)
@threads_option
@progress_option
def evaluate(
    samples: Path,
    reference: Path | None,
    inception_weights: Path | None,
    feature_extractor: str,
    builtin: bool,
    no_isc: bool,
    no_prc: bool,
    batch_size: int,
    precision: str,
    out_path: Path | None,
    steps: int | None,
    check_steps: int | None,
    checkpoint: str | None,
    progress: bool,
) -> None:
    """Score SAMPLES (an .npz in the ADM layout, uint8 NHWC in arr_0 and labels in arr_1, or an image folder), or
    a manifold run's folder: its test NLL (written to RUN/evaluation.json or --out)."""
    from ..training.toy import is_manifold_run

    if is_manifold_run(samples):
        _evaluate_manifold(samples, steps, check_steps, checkpoint, out_path)
        return
    import numpy as np
    import torch

    from ..errors import InputError
    from ..eval.fid import fidelity_metrics, load_images
    from ..precision import precision_scope

    # User errors (missing or malformed files, weights) become one line in the CLI group (manifold_fm/cli.py).
    _refuse_run_folder(samples)
    images = load_images(samples, progress)
    labels = None
    if samples.suffix == ".npz":
        with np.load(samples) as data:
            if "arr_1" in data:
                labels = torch.from_numpy(np.asarray(data["arr_1"]).reshape(-1).astype(np.int64))
    if images.shape[0] < 2:
        raise InputError(f"{samples} holds {images.shape[0]} image(s); Fréchet distances need at least 2")
    metrics: dict[str, float] = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where torch-fidelity runs the feature network
    if reference is not None:
        with precision_scope(precision, device):
            found = fidelity_metrics(
                images,
                reference,
                inception_weights=inception_weights,
                feature_extractor=feature_extractor,
                isc=not no_isc,
                prc=not no_prc,
                batch_size=batch_size,
                progress=progress,
            )
        metrics.update(found)
    if builtin or reference is None:
        from ..eval.classifier import FD_NAME, builtin_evaluator

        ev = builtin_evaluator()
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with precision_scope(precision, "cpu"):  # the built-in classifier runs on the CPU
            res = ev.evaluate(x, labels if labels is not None and labels.shape[0] == x.shape[0] else None, progress)
        metrics[FD_NAME] = res["fd_builtin_classifier"]
        if "classifier_accuracy" in res:
            metrics["classifier_accuracy"] = res["classifier_accuracy"]
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        click.echo(f"{k:<{width}}  {v:.4f}")
    if out_path is not None:
        write_json_atomic(out_path, {"samples": str(samples), "num_samples": int(images.shape[0]), **metrics})


def _evaluate_manifold(
    run: Path, steps: int | None, check_steps: int | None, checkpoint: str | None, out_path: Path | None
) -> None:
    import warnings

    from ..training.toy import evaluate_manifold_run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_manifold_run(run, steps=steps, check_steps=check_steps, checkpoint=checkpoint)
    click.echo(f"test NLL  {result['test_nll']:.4f} ± {result['test_nll_stderr']:.4f} (standard error, "
               f"{result['test_points']} test points)")  # fmt: skip
    click.echo(f"weights   {result['weights']}")
    click.echo(f"solver    {result['likelihood_solver']}")
    if "check_steps" in result:
        verdict = "converged" if result["solver_converged"] else "NOT converged"
        click.echo(
            f"check     {result['test_nll_check']:.4f} with {result['check_steps']} steps: differs by "
            f"{result['solver_difference']:.4f} ({verdict}: the standard error is {result['test_nll_stderr']:.4f})"
        )
    if "true_nll" in result:
        click.echo(f"true NLL  {result['true_nll']:.4f} (the target density on the same points)")
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    target = out_path or run / "evaluation.json"
    write_json_atomic(target, result)
    click.echo(f"written: {target}")


def _refuse_run_folder(samples: Path) -> None:
    """A run folder is not samples: one line saying which samples it holds (``sample`` writes them) or how to make
    them."""
    from ..errors import InputError
    from ..training.run_folder import run_status

    if not samples.is_dir() or run_status(samples) is None:
        return
    found = sorted(str(p) for p in [*samples.glob("samples-*/samples.npz"), *samples.glob("*/samples-*/samples.npz")])
    if found:
        raise InputError(f"{samples} is a run folder, not samples; evaluate its samples: {', '.join(found)}")
    raise InputError(
        f"{samples} is a run folder, not samples; sample it first (manifold-fm sample {samples}: a default run's "
        "modes each into <mode>/samples-<step>/samples.npz), then evaluate those files"
    )
