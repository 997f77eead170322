"""Sample quality against the number of network evaluations (NFE), and classifier-free guidance, on trained models
of the built-in proxy (the arms of ``benchmarks/ablation.py``'s runs, one model per arm and seed).

``nfe``: every arm's EMA model sampled with euler, heun, midpoint and rk4 at 4, 8, 16, 32 and 64 NFE (steps = NFE /
stages), on a uniform time grid and on a grid shifted toward the noise (``sample.time_shift``), plus an adaptive
solver (dopri5) and the 250-NFE Euler reference; each scored by the built-in classifier's Fréchet distance and
accuracy on the same class-balanced noise and labels. Every setting is scored twice, on two disjoint sets of noise:
the *selection* noise chooses the ``--nfe`` presets (``sampler_presets.{json,md}``), the *report* noise gives every
number the tables print, so no preset is reported on the samples it was chosen on. The rule
(:func:`best_presets`): per budget, the setting with the lowest mean FD on the selection noise replaces the plain
default (Euler on the uniform grid) only if its gain over it exceeds the seed spread (the sample standard deviation
of the plain default's FD over the models); otherwise the preset is the plain default.

``guidance``: Euler 20 steps at CFG scales 1 to 4, without and
with a guidance interval. ``ot``: the linear and spherical models trained with the independent coupling and with
minibatch OT (``python benchmarks/ablation.py --work runs/ot --arms linear spherical --name ablation_ot --set
flow.coupling=ot``) at 250, 16, 8 and 1 Euler steps, and the straightness of their flows. ``precision``: every model
sampled at ``sample.precision`` fp32 and bf16 (Euler 20 steps, CFG 3: the default run's sampler) from the same
noise: FD and accuracy per seed, how far the bf16 latents land from the fp32 ones, and the rule that sets ``auto``
on GPUs (:data:`manifold_fm.precision.AUTO_ON_CUDA`) applied to them.

    python benchmarks/sampling.py nfe       # -> results/sampling_nfe.{json,md,png}, sampler_presets.{json,md}
    python benchmarks/sampling.py guidance             # -> results/sampling_guidance.{json,md,png}
    python benchmarks/sampling.py ot --ot-runs runs/ot # -> results/sampling_ot.{json,md}
    python benchmarks/sampling.py nfe --report         # rebuild the table and plot from the saved json
    python benchmarks/sampling.py nfe --quick          # a tiny run of the study on a tiny trained run (a smoke run)
    python benchmarks/sampling.py precision            # -> results/sampling_precision.{json,md}

Runs: ``--runs runs/ablation`` holds ``seed<N>/<arm>`` folders (``python benchmarks/ablation.py``). The (arm, seed)
models are scored in parallel processes, one thread each. The ``precision`` study trains the models it lacks (a
default run with the linear and spherical arms per seed, as the ablation trains them, into ``--train-dir``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from reporting import NOISE_OFFSETS, add_output_options, map_in_processes, mean_sd, output_dir

ROOT = Path(__file__).resolve().parent.parent
METRIC = "fd_builtin_classifier"
NFES = (4, 8, 16, 32, 64)
STAGES = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}
SHIFTS = (1.0, 3.0)
REFERENCE = {"method": "euler", "steps": 250}
ADAPTIVE = {"method": "dopri5", "steps": 1, "atol": 1e-3, "rtol": 1e-3}
CFG_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
CFG_INTERVALS: dict[str, tuple[float, float] | None] = {"none": None, "t<=0.7": (0.0, 0.7), "t>=0.3": (0.3, 1.0)}
#: The noise of each model's samples: ``report`` (every number printed) and ``select`` (the presets' choice).
NOISE = ("report", "select")


def nfe_grid() -> dict[str, dict[str, Any]]:
    """Setting name -> sampler overrides for the NFE study."""
    grid: dict[str, dict[str, Any]] = {"euler-250": dict(REFERENCE), "dopri5-1e-3": dict(ADAPTIVE)}
    for method, stages in STAGES.items():
        for nfe in NFES:
            if nfe % stages:
                continue
            for shift in SHIFTS:
                grid[f"{method}-{nfe}-shift{shift:g}"] = {"method": method, "steps": nfe // stages, "time_shift": shift}
    return grid


def ot_grid() -> dict[str, dict[str, Any]]:
    """Setting name -> sampler overrides for the coupling study: full and few-step Euler, and one step (for the
    straightness figure)."""
    return {f"euler-{n}": {"method": "euler", "steps": n} for n in (250, 16, 8, 1)}


def guidance_grid() -> dict[str, dict[str, Any]]:
    """Setting name -> sampler overrides for the guidance study (Euler, 20 steps)."""
    return {
        f"cfg{scale:g}-{name}": {"method": "euler", "steps": 20, "cfg_scale": scale, "cfg_interval": interval}
        for scale in CFG_SCALES
        for name, interval in CFG_INTERVALS.items()
        if not (scale == 1.0 and interval is not None)
    }


class _Counted:
    """Wraps a model to count its forward calls (one per network evaluation of a batch)."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls = model, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model(*args, **kwargs)


def score(job: tuple[Any, ...]) -> dict[str, Any]:
    """Every setting of ``grid`` on one trained model: FD, accuracy, NFE per sample and seconds; with both
    ``euler-1`` and ``euler-250`` in the grid, the flow's straightness error too: ``mean |z_1 - z_250| / mean
    |x_0 - z_250|`` over the samples (``z_n``: the sample after ``n`` Euler steps from the noise ``x_0``; 0 for a
    flow whose one step lands where the full solve does). ``job``: ``(run_dir, arm, seed, grid, samples,
    coupling[, noise])``, ``noise`` one of :data:`NOISE` (default ``report``)."""
    run_dir, arm, seed, grid, samples, coupling = job[:6]
    noise = job[6] if len(job) > 6 else "report"
    import torch

    torch.set_num_threads(1)
    from manifold_fm.config import validate
    from manifold_fm.eval.classifier import builtin_evaluator
    from manifold_fm.eval.sample_quality import SampleQuality
    from manifold_fm.sampler import SamplerSpec
    from manifold_fm.training.runs import load_run

    evaluator = builtin_evaluator()
    run = load_run(run_dir)
    base = run.cfg.sample.model_dump(include=set(SamplerSpec.model_fields))
    noise_seed = NOISE_OFFSETS[noise] + seed
    out: dict[str, Any] = {}
    latents: dict[str, torch.Tensor] = {}
    for name, overrides in grid.items():
        spec = validate(SamplerSpec, {**base, "cfg_scale": 1.0, "cfg_interval": None, "time_shift": 1.0, **overrides})
        counted = _Counted(run.model)
        # one chunk of all the samples, so the forward calls counted are the NFE per sample
        quality = SampleQuality(
            run.flow, spec, run.decoder, run.latent_shape, run.num_classes, evaluator, batch_size=samples
        )
        t0 = time.perf_counter()
        z, images, labels, _ = quality.sample(counted, samples, seed=noise_seed)
        r = evaluator.evaluate(images, labels)
        out[name] = {
            METRIC: r[METRIC],
            "classifier_accuracy": r["classifier_accuracy"],
            "nfe": counted.calls,
            "seconds": time.perf_counter() - t0,
        }
        if name in ("euler-1", "euler-250"):
            latents[name] = z.flatten(1).double()
    row: dict[str, Any] = {"arm": arm, "seed": seed, "coupling": coupling, "noise": noise, "settings": out}
    if len(latents) == 2:
        from manifold_fm.seeding import seeded_generator

        g = seeded_generator(noise_seed, 0, "sample")  # the noise of SampleQuality's one chunk
        x0 = run.flow.prior((samples, *run.latent_shape), g, "cpu", dtype=torch.float32).flatten(1).double()
        full = latents["euler-250"]
        miss = (latents["euler-1"] - full).norm(dim=1).mean()
        row["straightness_error"] = float(miss / (x0 - full).norm(dim=1).mean())
    return row


#: The sampler of the precision study: the default run's (``manifold_fm/configs/default.yaml``).
PRECISION_SAMPLER = {"method": "euler", "steps": 20, "cfg_scale": 3.0}
#: The arms whose latents are projected to the token spheres (their on-sphere error is float rounding).
SPHERICAL_ARMS = ("spherical-linear", "spherical")


def score_precision(job: tuple[str, str, int, int]) -> dict[str, Any]:
    """One trained model sampled at fp32 and bf16 from the same noise and labels: FD, accuracy and seconds of
    each (CPU: bf16 autocast there, timings are this machine's), and the largest and mean ``|z_bf16 - z_fp32|`` of
    the latents."""
    run_dir, arm, seed, samples = job
    import torch

    torch.set_num_threads(1)
    from manifold_fm.config import validate
    from manifold_fm.eval.classifier import builtin_evaluator
    from manifold_fm.eval.sample_quality import SampleQuality, token_norm_error
    from manifold_fm.sampler import SamplerSpec
    from manifold_fm.training.runs import load_run

    evaluator = builtin_evaluator()
    run = load_run(run_dir)
    base = run.cfg.sample.model_dump(include=set(SamplerSpec.model_fields))
    out: dict[str, Any] = {"arm": arm, "seed": seed, "run": run_dir}
    latents = {}
    for precision in ("fp32", "bf16"):
        spec = validate(SamplerSpec, {**base, **PRECISION_SAMPLER, "cfg_interval": None, "precision": precision})
        quality = SampleQuality(run.flow, spec, run.decoder, run.latent_shape, run.num_classes, evaluator)
        t0 = time.perf_counter()
        z, images, labels, _ = quality.sample(run.model, samples, seed=NOISE_OFFSETS["precision"] + seed)
        r = evaluator.evaluate(images, labels)
        out[precision] = {
            METRIC: r[METRIC],
            "classifier_accuracy": r["classifier_accuracy"],
            "seconds": time.perf_counter() - t0,
            "on_sphere_error_max": token_norm_error(z)["max"],
        }
        latents[precision] = z.double()
    diff = (latents["bf16"] - latents["fp32"]).abs()
    out["latent_max_abs_diff"] = float(diff.max())
    out["latent_mean_abs_diff"] = float(diff.mean())
    out["latent_rms"] = float(latents["fp32"].square().mean().sqrt())
    return out


def precision_choice(rows: list[dict], arms: list[str]) -> dict[str, Any]:
    """The rule behind ``auto`` on GPUs: bf16 when, for every arm, the change of the mean FD from fp32 to bf16 is
    within the sample standard deviation of the fp32 FD over seeds; else tf32 (float32 tensors, TF32 matmuls)."""
    per_arm = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        fp32 = mean_sd([r["fp32"][METRIC] for r in mine])
        bf16 = mean_sd([r["bf16"][METRIC] for r in mine])
        per_arm[arm] = {
            "fd_change": bf16[0] - fp32[0],
            "fd_seed_sd": fp32[1],
            "within": abs(bf16[0] - fp32[0]) <= fp32[1],
        }
    return {"arms": per_arm, "choice": "bf16" if all(a["within"] for a in per_arm.values()) else "tf32"}


def precision_table(rows: list[dict], arms: list[str], command: str, samples: int) -> str:
    lines = [
        "| arm | seed | FD fp32 | FD bf16 | accuracy fp32 | accuracy bf16 | max abs latent difference | "
        "mean abs latent difference | on-sphere error (max), fp32 | bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])

        def sphere(r: dict, p: str, arm: str = arm) -> str:
            text = f"{r[p]['on_sphere_error_max']:.1e}"
            return text if arm in SPHERICAL_ARMS else f"({text})"

        for r in mine:
            lines.append(
                f"| {arm} | {r['seed']} | {r['fp32'][METRIC]:.3f} | {r['bf16'][METRIC]:.3f} | "
                f"{r['fp32']['classifier_accuracy']:.3f} | {r['bf16']['classifier_accuracy']:.3f} | "
                f"{r['latent_max_abs_diff']:.2e} | {r['latent_mean_abs_diff']:.2e} | {sphere(r, 'fp32')} | "
                f"{sphere(r, 'bf16')} |"
            )
        fd = {p: mean_sd([r[p][METRIC] for r in mine]) for p in ("fp32", "bf16")}
        acc = {p: mean_sd([r[p]["classifier_accuracy"] for r in mine]) for p in ("fp32", "bf16")}
        lines.append(
            f"| {arm} | mean ± sd | {fd['fp32'][0]:.3f} ± {fd['fp32'][1]:.3f} | {fd['bf16'][0]:.3f} ± "
            f"{fd['bf16'][1]:.3f} | {acc['fp32'][0]:.3f} ± {acc['fp32'][1]:.3f} | {acc['bf16'][0]:.3f} ± "
            f"{acc['bf16'][1]:.3f} | {max(r['latent_max_abs_diff'] for r in mine):.2e} (max) | | | |"
        )
    choice = precision_choice(rows, arms)
    seeds = sorted({r["seed"] for r in rows})
    rms = statistics.mean(r["latent_rms"] for r in rows)
    lines += [
        "",
        "Rule: bf16 is the GPU default (`sample.precision: auto`) when, for every arm, the change of the mean FD from "
        "fp32 to bf16 is within the sample standard deviation of the fp32 FD over seeds; otherwise tf32.",
        "",
        "| arm | FD change bf16 - fp32 | sd of FD over seeds (fp32) | within |",
        "|---|---|---|---|",
        *(
            f"| {arm} | {c['fd_change']:+.4f} | {c['fd_seed_sd']:.4f} | {'yes' if c['within'] else 'no'} |"
            for arm, c in choice["arms"].items()
        ),
        "",
        f"Choice: **{choice['choice']}**.",
        "",
        f"One trained model per arm and seed (seeds {', '.join(map(str, seeds))}), {samples} samples each, "
        "drawn with Euler 20 steps and CFG 3 at `--precision fp32` (IEEE float32) and `--precision bf16` (network "
        "and decoder under bfloat16 autocast; the exp-map steps stay float32) from the same noise and labels, "
        "decoded and scored by the built-in classifier (FD-builtin-classifier: lower is better). Latent "
        f"differences: over every element of every sample (the fp32 latents' RMS is {rms:.2f}). On-sphere error: "
        "the largest | |z| / sqrt(d) - 1 | over the generated tokens, in parentheses for arms whose latents are not "
        "projected to the spheres (shown for reference). Run on the CPU, where bfloat16 autocast rounds as on a "
        "GPU (bfloat16 inputs, float32 accumulation); timings are in the JSON and are this CPU's, not a GPU's.",
        "",
        f"Written by `{command}`.",
    ]
    return "\n".join(lines)


def _stats(rows: list[dict], arm: str, name: str, key: str, coupling: str | None = None) -> tuple[float, float]:
    values = [
        r["settings"][name][key] if key in r["settings"][name] else r[key]
        for r in rows
        if r["arm"] == arm and coupling in (None, r.get("coupling"))
    ]
    return mean_sd(values)


def _noise(rows: list[dict], noise: str) -> list[dict]:
    """The rows scored on ``noise`` (rows written before the two noises existed are ``report`` rows)."""
    return [r for r in rows if r.get("noise", "report") == noise]


def nfe_table(rows: list[dict], arms: list[str], command: str) -> str:
    best = {arm: best_presets(rows, arm) for arm in arms}
    rows = _noise(rows, "report")
    names = [n for n in nfe_grid() if all(n in r["settings"] for r in rows)]
    head = "| setting | NFE | " + " | ".join(f"{a} FD | {a} acc" for a in arms) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(arms)]
    for name in names:
        nfe = statistics.mean(r["settings"][name]["nfe"] for r in rows)
        cells = []
        for arm in arms:
            fd, acc = _stats(rows, arm, name, METRIC), _stats(rows, arm, name, "classifier_accuracy")
            cells.append(f"{fd[0]:.2f} ± {fd[1]:.2f} | {acc[0]:.3f}")
        lines.append(f"| {name} | {nfe:.0f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Preset per NFE budget (chosen on the selection noise by the rule below; FD on the report noise):",
        "",
        "| NFE | " + " | ".join(arms) + " |",
    ]
    lines.append("|---|" + "---|" * len(arms))
    for nfe in best[arms[0]]:
        cells = [f"{b['setting']} ({b['fd']:.2f}, {b['vs_250']:+.0%} vs 250)" for b in (best[a][nfe] for a in arms)]
        lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines += [
        "",
        f"Mean ± sample standard deviation over the models of seeds {', '.join(map(str, seeds))} (one trained model "
        "per arm and seed), FD-builtin-classifier (lower is better) and the built-in classifier's accuracy on the "
        "same class-balanced noise and labels for every setting, no guidance. NFE: network evaluations per sample "
        "(counted); `shift3` is the time grid warped by shift 3 (more steps near the noise). `-250` is the Euler "
        "reference; percentages are against it. " + RULE,
        "",
        f"Written by `{command}`.",
    ]
    return "\n".join(lines)


#: How a preset is chosen (printed under the tables).
RULE = (
    "Presets: per budget, the setting with the lowest mean FD on the selection noise (samples disjoint from the "
    "report noise every printed number comes from) replaces the plain default, Euler on the uniform grid, only if "
    "its gain over it (mean FD difference) exceeds the seed spread (the sample standard deviation of the plain "
    "default's FD over the models); otherwise the preset is the plain default."
)


def best_presets(rows: list[dict], arm: str = "spherical") -> dict[int, dict[str, Any]]:
    """Per NFE budget, the preset of ``arm``'s models by :data:`RULE`: the best fixed-step setting on the selection
    noise if it beats the plain default (``euler-<nfe>-shift1``) by more than the seed spread, else the plain
    default; its method and time shift (what :data:`manifold_fm.sampler.NFE_PRESETS` holds) and, on the report
    noise, its FD and FD relative to the 250-step reference. Rows without selection noise (written before it
    existed) select on their own samples."""
    grid = nfe_grid()
    select, report = _noise(rows, "select") or _noise(rows, "report"), _noise(rows, "report")
    ref = _stats(report, arm, "euler-250", METRIC)[0]
    out: dict[int, dict[str, Any]] = {}
    for nfe in NFES:
        default = f"euler-{nfe}-shift1"
        candidates = [n for n in grid if n.split("-")[1:2] == [str(nfe)] and all(n in r["settings"] for r in select)]
        if default not in candidates:
            continue
        best = min(candidates, key=lambda n: _stats(select, arm, n, METRIC)[0])
        plain, spread = _stats(select, arm, default, METRIC)
        gain = plain - _stats(select, arm, best, METRIC)[0]
        chosen = best if gain > spread else default
        fd = _stats(report, arm, chosen, METRIC)
        out[nfe] = {
            "setting": chosen,
            "method": grid[chosen]["method"],
            "time_shift": grid[chosen]["time_shift"],
            "fd": fd[0],
            "fd_sd": fd[1],
            "vs_250": fd[0] / ref - 1,
            "best_on_selection": best,
            "gain_on_selection": gain,
            "seed_spread": spread,
        }
    return out


def presets_table(presets: dict[int, dict[str, Any]], command: str) -> str:
    lines = [
        "| `--nfe` | method | steps | time shift | spherical FD (mean ± sd) | vs 250 Euler steps |",
        "|---|---|---|---|---|---|",
        *(
            f"| {nfe} | {p['method']} | {nfe // STAGES[p['method']]} | {p['time_shift']:g} | "
            f"{p['fd']:.2f} ± {p['fd_sd']:.2f} | {p['vs_250']:+.0%} |"
            for nfe, p in presets.items()
        ),
        "",
        "The sampler `manifold-fm sample --nfe N` uses (`manifold_fm.sampler.NFE_PRESETS`, the row of the largest "
        "budget <= N; steps = N / stages), from the spherical models of the NFE study (`sampling_nfe.md`). " + RULE,
        "",
        f"Written by `{command}`.",
    ]
    return "\n".join(lines)


def guidance_table(rows: list[dict], arms: list[str], command: str) -> str:
    head = "| scale | interval | " + " | ".join(f"{a} FD | {a} acc" for a in arms) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(arms)]
    for name in guidance_grid():
        scale, interval = name.split("-", 1)
        cells = []
        for arm in arms:
            fd, acc = _stats(rows, arm, name, METRIC), _stats(rows, arm, name, "classifier_accuracy")
            cells.append(f"{fd[0]:.2f} ± {fd[1]:.2f} | {acc[0]:.3f} ± {acc[1]:.3f}")
        lines.append(f"| {scale.removeprefix('cfg')} | {interval} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines += [
        "",
        f"Mean ± sample standard deviation over the models of seeds {', '.join(map(str, seeds))}; Euler, 20 steps, "
        "classifier-free guidance at each scale, on the whole path (`none`) or only for t <= 0.7 / t >= 0.3 "
        "(t = 0 is noise, t = 1 data).",
        "",
        f"Written by `{command}`.",
    ]
    return "\n".join(lines)


def ot_table(rows: list[dict], arms: list[str], command: str) -> str:
    names = list(ot_grid())
    head = "| arm | coupling | " + " | ".join(f"FD at {n.split('-')[1]} NFE" for n in names) + " | straightness error |"
    lines = [head, "|---|---|" + "---|" * (len(names) + 1)]
    for arm in arms:
        for coupling in ("independent", "ot"):
            cells = [_stats(rows, arm, n, METRIC, coupling) for n in names]
            err = _stats(rows, arm, names[0], "straightness_error", coupling)
            text = " | ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in cells)
            lines.append(f"| {arm} | {coupling} | {text} | {err[0]:.3f} ± {err[1]:.3f} |")
    seeds = sorted({r["seed"] for r in rows})
    lines += [
        "",
        f"Mean ± sample standard deviation over the models of seeds {', '.join(map(str, seeds))}, each arm trained "
        "with the independent coupling and with minibatch OT (`flow.coupling: ot`: exact assignment within each "
        "class by the squared geodesic cost on the token spheres, squared Euclidean for linear), everything else "
        "equal; FD-builtin-classifier after Euler with 250, 16, 8 and 1 steps from the same noise. Straightness "
        "error: mean |z_1 - z_250| / mean |x_0 - z_250| (0: one Euler step lands where 250 do).",
        "",
        f"Written by `{command}`.",
    ]
    return "\n".join(lines)


def plot_nfe(rows: list[dict], arms: list[str], path: Path) -> None:
    from manifold_fm.eval.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.6), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms, strict=True):
        for i, method in enumerate(STAGES):
            for shift, style in zip(SHIFTS, ("-", "--"), strict=True):
                xs = [n for n in NFES if f"{method}-{n}-shift{shift:g}" in rows[0]["settings"]]
                if not xs:
                    continue
                ys = [_stats(rows, arm, f"{method}-{n}-shift{shift:g}", METRIC)[0] for n in xs]
                ax.plot(xs, ys, style, marker="o", ms=3, color=f"C{i}", label=f"{method}, shift {shift:g}")
        ax.axhline(_stats(rows, arm, "euler-250", METRIC)[0], color="0.3", lw=1, label="euler, 250 NFE")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations per sample")
        ax.set_title(arm)
    axes[0][0].set_ylabel("FD-builtin-classifier (lower is better)")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def plot_guidance(rows: list[dict], arms: list[str], path: Path) -> None:
    from manifold_fm.eval.plots import pyplot, save_figure

    plt = pyplot()
    fig, (fd_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, arm in enumerate(arms):
        for name, style in zip(CFG_INTERVALS, ("-", "--", ":"), strict=True):
            scales = [s for s in CFG_SCALES if not (s == 1.0 and name != "none")]
            keys = [f"cfg{s:g}-none" if s == 1.0 else f"cfg{s:g}-{name}" for s in scales]
            fd_ax.plot(scales, [_stats(rows, arm, k, METRIC)[0] for k in keys], style, marker="o", ms=3, color=f"C{i}")
            acc_ax.plot(
                scales,
                [_stats(rows, arm, k, "classifier_accuracy")[0] for k in keys],
                style,
                marker="o",
                ms=3,
                color=f"C{i}",
                label=f"{arm}, interval {name}",
            )
    fd_ax.set_xlabel("CFG scale")
    fd_ax.set_ylabel("FD-builtin-classifier (lower is better)")
    acc_ax.set_xlabel("CFG scale")
    acc_ax.set_ylabel("classifier accuracy")
    acc_ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=("nfe", "guidance", "ot", "precision"))
    parser.add_argument("--runs", type=Path, default=Path("runs/ablation"), help="seed<N>/<arm> run folders")
    parser.add_argument("--ot-runs", type=Path, default=Path("runs/ot"), help="the same, trained with flow.coupling=ot")
    parser.add_argument("--arms", nargs="+", default=["linear", "spherical"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=None, help="samples per setting and model (240; precision 600)")
    parser.add_argument(
        "--train-dir",
        type=Path,
        default=Path("runs/precision"),
        help="precision: where the models missing from --runs are trained (seed<N>/<arm>)",
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot from the saved json")
    add_output_options(parser)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from manifold_fm.atomic import write_json_atomic, write_text_atomic

    if args.quick and args.study != "nfe":
        parser.error("--quick: only the nfe study has a quick mode")
    results = output_dir(parser, args)
    if args.samples is None:
        args.samples = 24 if args.quick else 600 if args.study == "precision" else 240
    stem = f"sampling_{args.study}"
    if args.study == "precision":
        _precision_study(args, stem, results)
        return
    command = (
        f"python benchmarks/sampling.py {args.study} --runs {args.runs} --arms {' '.join(args.arms)} "
        f"--seeds {' '.join(map(str, args.seeds))} --samples {args.samples}"
    ) + (f" --ot-runs {args.ot_runs}" if args.study == "ot" else "")
    if args.quick:
        command = f"python benchmarks/sampling.py nfe --quick --out {results}"
    if args.report:
        saved = json.loads((results / f"{stem}.json").read_text())
        rows, command = saved["rows"], saved["command"]
    else:
        grid = {"nfe": nfe_grid, "guidance": guidance_grid, "ot": ot_grid}[args.study]()
        folders = {"independent": args.runs, **({"ot": args.ot_runs} if args.study == "ot" else {})}
        if args.quick:  # two tiny trained models and the settings of the two smallest budgets
            from ablation import QUICK, run_seed

            args.arms, args.seeds = ["linear", "spherical"], [0, 1]
            folders = {"independent": results / "runs"}
            for seed in args.seeds:
                run_seed(seed, results / "runs", QUICK, tuple(args.arms))
            grid = {k: v for k, v in grid.items() if k.split("-")[1] in ("4", "8", "250")}
        noises = list(NOISE) if args.study == "nfe" else ["report"]  # nfe: choose on one noise, report another
        jobs = [
            (str(folder / f"seed{seed}" / arm), arm, seed, grid, args.samples, coupling, noise)
            for coupling, folder in folders.items()
            for seed in args.seeds
            for arm in args.arms
            for noise in noises
        ]
        t0 = time.perf_counter()
        rows = map_in_processes(__file__, "score", jobs, args.processes)
        write_json_atomic(
            results / f"{stem}.json",
            {"command": command, "wall_s": round(time.perf_counter() - t0, 1), "samples": args.samples, "rows": rows},
        )
    table = {"nfe": nfe_table, "guidance": guidance_table, "ot": ot_table}[args.study](rows, args.arms, command)
    write_text_atomic(results / f"{stem}.md", table + "\n")
    if args.study == "nfe":
        plot_nfe(_noise(rows, "report"), args.arms, results / f"{stem}.png")
        if "spherical" in args.arms:
            presets = best_presets(rows)
            write_json_atomic(results / "sampler_presets.json", {"command": command, "rule": RULE, "presets": presets})
            write_text_atomic(results / "sampler_presets.md", presets_table(presets, command) + "\n")
    elif args.study == "guidance":
        plot_guidance(rows, args.arms, results / f"{stem}.png")
    print(table)


def _precision_study(args: argparse.Namespace, stem: str, results: Path) -> None:
    from manifold_fm.atomic import write_json_atomic, write_text_atomic

    command = (
        f"python benchmarks/sampling.py precision --runs {args.runs} --train-dir {args.train_dir} --arms "
        f"{' '.join(args.arms)} --seeds {' '.join(map(str, args.seeds))} --samples {args.samples}"
    )
    samples = args.samples
    if args.report:
        saved = json.loads((results / f"{stem}.json").read_text())
        rows, command, samples = saved["rows"], saved["command"], saved["samples"]
    else:
        from ablation import run_seed

        t0 = time.perf_counter()
        folders = {}
        for seed in args.seeds:
            have = all((args.runs / f"seed{seed}" / arm / "checkpoints").is_dir() for arm in args.arms)
            trained = args.runs / f"seed{seed}"
            folders[seed] = trained if have else run_seed(seed, args.train_dir, [], tuple(args.arms))
        jobs = [(str(folders[seed] / arm), arm, seed, args.samples) for seed in args.seeds for arm in args.arms]
        rows = map_in_processes(__file__, "score_precision", jobs, args.processes)
        write_json_atomic(
            results / f"{stem}.json",
            {
                "command": command,
                "wall_s": round(time.perf_counter() - t0, 1),
                "samples": args.samples,
                "sampler": PRECISION_SAMPLER,
                "choice": precision_choice(rows, args.arms),
                "rows": rows,
            },
        )
    table = precision_table(rows, args.arms, command, samples)
    write_text_atomic(results / f"{stem}.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
