"""The component-swap probe: is image content carried by token directions or by token norms?

For an anchor latent ``z_a`` and its nearest same-class neighbour ``z_b`` (L2 over the whole latent), write every
token as ``z = r u`` with ``r = |z|`` and ``u = z / r``. Decode hybrids and measure their distance to the anchor's
own decode ``D(z_a)``:

- ``neighbour``: ``D(z_b)`` (how different the neighbour is at all);
- ``radius_swapped``: ``r_b u_a``, the anchor's directions with the neighbour's norms;
- ``direction_swapped``: ``r_a u_b``, the anchor's norms with the neighbour's directions;
- ``radius_flattened``: ``mean(r_a) u_a``, every token at the anchor's mean token norm.

If directions carry the content, ``radius_swapped`` and ``radius_flattened`` stay close to the anchor while
``direction_swapped`` moves about as far as the neighbour itself. Distances: the perceptual distance in use (LPIPS or
the named fallback), PSNR (dB, higher = closer) and any extra distances given, e.g. the DINOv2 class-token cosine
distance (:class:`~manifold_fm.tokenizers.perceptual.DINOv2Distance`) the paper reports beside LPIPS. The number of
anchors is settable (the paper: 1024).

:func:`plot_probe_report` draws the figures of ``manifold-fm probe``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..tokenizers.base import Tokenizer
from ..tokenizers.perceptual import GradientPyramidDistance, psnr

HYBRIDS = ("neighbour", "radius_swapped", "direction_swapped", "radius_flattened")


def same_class_neighbours(latents: Tensor, labels: Tensor) -> Tensor:
    """For each item, the index of its nearest other item of the same class (L2), or -1 if it has none."""
    flat = latents.flatten(1).double()
    d = torch.cdist(flat, flat)
    same = labels[:, None] == labels[None, :]
    d = torch.where(same, d, torch.full_like(d, float("inf")))
    d.fill_diagonal_(float("inf"))
    best = d.argmin(dim=1)
    return torch.where(torch.isfinite(d.min(dim=1).values), best, torch.full_like(best, -1))


def swap_hybrids(za: Tensor, zb: Tensor, axis: int = 1) -> dict[str, Tensor]:
    """The hybrid latents of the probe (module docstring) for anchor/neighbour batches of equal shape."""
    ra = torch.linalg.vector_norm(za, dim=axis, keepdim=True)
    rb = torch.linalg.vector_norm(zb, dim=axis, keepdim=True)
    tiny = torch.finfo(za.dtype).tiny
    ua, ub = za / ra.clamp_min(tiny), zb / rb.clamp_min(tiny)
    mean_ra = ra.mean(dim=tuple(range(1, za.ndim)), keepdim=True)
    return {
        "neighbour": zb,
        "radius_swapped": rb * ua,
        "direction_swapped": ra * ub,
        "radius_flattened": mean_ra * ua,
    }


@torch.no_grad()
def component_swap_probe(
    tokenizer: Tokenizer,
    images: Tensor,
    labels: Tensor,
    *,
    perceptual: nn.Module | None = None,
    max_pairs: int = 64,
    batch_size: int = 32,
    extra_distances: Mapping[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Run the probe on ``images`` ``(N, 3, H, W)`` with class ``labels`` ``(N,)``; returns a JSON-safe report.

    Latents are ``tokenizer.encode`` (normalised); decodes use ``tokenizer.decode``. The first ``max_pairs`` anchors
    (the paper: 1024) that have a same-class neighbour are used. ``extra_distances``: name -> image distance module
    (``(B, 3, H, W)`` pairs -> ``(B,)``), e.g. ``{"dinov2": DINOv2Distance(...)}``, measured beside the perceptual
    distance. The report has per-hybrid ``{<d>_mean, <d>_std, <d>}`` for ``d`` in ``perceptual``, ``psnr`` and each
    extra name (``<d>`` per anchor), plus ``metric`` (the perceptual distance's name), ``metrics`` (every distance's
    name), ``pairs`` / ``anchors`` (count).
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    perceptual = perceptual or GradientPyramidDistance()
    device = tokenizer.device
    perceptual = perceptual.to(device)
    extras = {k: m.to(device) for k, m in (extra_distances or {}).items()}
    clash = {"perceptual", "psnr"} & set(extras)
    if clash:
        raise ValueError(f"extra distance names {sorted(clash)} are taken; choose other names")
    z = torch.cat([tokenizer.encode(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)])
    nb = same_class_neighbours(z.float().cpu(), labels.cpu())
    anchors = torch.nonzero(nb >= 0).flatten()[:max_pairs]
    if anchors.numel() == 0:
        raise ValueError("no anchor has a same-class neighbour; give at least two images of one class")
    per: dict[str, dict[str, list[float]]] = {
        h: {"perceptual": [], "psnr": [], **{k: [] for k in extras}} for h in HYBRIDS
    }
    for start in range(0, anchors.numel(), batch_size):
        a = anchors[start : start + batch_size]
        za, zb = z[a], z[nb[a]]
        ref = tokenizer.decode(za).float()
        for name, h in swap_hybrids(za.float(), zb.float(), axis=tokenizer.channel_axis).items():
            img = tokenizer.decode(h.to(za.dtype)).float()
            per[name]["perceptual"] += perceptual(img, ref).float().cpu().tolist()
            per[name]["psnr"] += psnr(img, ref).cpu().tolist()
            for k, dist in extras.items():
                per[name][k] += dist(img, ref).float().cpu().tolist()
    out: dict[str, Any] = {
        "metric": getattr(perceptual, "name", type(perceptual).__name__),
        "metrics": {
            "perceptual": getattr(perceptual, "name", type(perceptual).__name__),
            "psnr": "psnr-db",
            **{k: getattr(m, "name", type(m).__name__) for k, m in extras.items()},
        },
        "pairs": int(anchors.numel()),
        "anchors": int(anchors.numel()),
        "tokenizer": tokenizer.name,
    }
    for name, vals in per.items():
        entry: dict[str, Any] = {}
        for key, v in vals.items():
            t = torch.tensor(v, dtype=torch.float64)
            entry[f"{key}_mean"] = float(t.mean())
            entry[f"{key}_std"] = float(t.std(unbiased=False))
        out[name] = {**entry, **vals}
    return out


def plot_probe_report(report: dict[str, Any], norms: dict[str, Tensor], out_dir: str | Path) -> list[Path]:
    """Write the probe figures (PNG) into ``out_dir``; returns their paths.

    ``norm_hist.png``: histograms of per-token ``|z|/sqrt(d)`` for each entry of ``norms`` (name -> norms tensor);
    ``norm_along_t.png`` and ``radial_share.png`` from ``report["paths"]``; ``shell_deviation.png`` from
    ``report["shell_deviation"]`` when present; ``swap_distances.png`` from ``report["swap"]`` (one panel per
    distance).
    """
    from .plots import pyplot, save_figure

    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        written.append(save_figure(fig, out / name))

    d = report["paths"]["d"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, r in norms.items():
        ax.hist((r.flatten().double() / d**0.5).numpy(), bins=60, alpha=0.5, density=True, label=name)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel(r"token norm $|z| / \sqrt{d}$")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    save(fig, "norm_hist.png")

    paths = report["paths"]
    t = paths["t"]
    path_names: Sequence[str] = [p for p in ("linear", "polar", "slerp") if p in paths]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for p in path_names:
        m = torch.tensor(paths[p]["norm_mean"]) / d**0.5
        s = torch.tensor(paths[p]["norm_std"]) / d**0.5
        ax.plot(t, m, label=p)
        ax.fill_between(t, m - s, m + s, alpha=0.2)
    ax.set_xlabel("t (0 = prior, 1 = data)")
    ax.set_ylabel(r"token norm $/\sqrt{d}$ (mean $\pm$ std)")
    ax.legend(fontsize=8)
    save(fig, "norm_along_t.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for p in path_names:
        ax.plot(t, paths[p]["radial_share"], label=p)
    ax.set_xlabel("t")
    ax.set_ylabel("radial share of velocity target")
    ax.set_ylim(-0.02, 1.0)
    ax.legend(fontsize=8)
    save(fig, "radial_share.png")

    if "shell_deviation" in report:
        sd = report["shell_deviation"]
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.plot(sd["t"], sd["mean"], label=f"mean over {sd['pairs']} pairs")
        ax.plot(sd["t"], sd["max"], ls="--", label="max over pairs")
        ax.set_xlabel("t (0 = prior, 1 = data)")
        ax.set_ylabel(r"distance to nearest endpoint shell ($\sigma$)")
        ax.set_title("linear path: token norms off the endpoint shells", fontsize=9)
        ax.legend(fontsize=8)
        save(fig, "shell_deviation.png")

    swap = report["swap"]
    names = [h for h in HYBRIDS if h in swap]
    extra = [k for k in swap.get("metrics", {}) if k not in ("perceptual", "psnr")]
    panels = [("perceptual", f"distance to anchor decode ({swap['metric']})")]
    panels += [("psnr", "PSNR to anchor decode (dB)")]
    panels += [(k, f"{k} distance to anchor decode") for k in extra]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        ax.boxplot([swap[h][key] for h in names])
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(1, len(names) + 1), [n.replace("_", "\n") for n in names], fontsize=7)
    save(fig, "swap_distances.png")
    return written
