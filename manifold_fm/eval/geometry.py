"""Latent-geometry diagnostics: per-token norm statistics and what linear, polar and slerp paths do to the norms.

A *token* is the vector along ``axis`` at one position (the channel vector of a ``(B, C, H, W)`` latent, ``axis=1``).
All statistics are computed in float64.

Reference values (tested): Gaussian tokens ``N(0, I_d)`` have radius ~ ``sqrt(d)`` with coefficient of variation
~ ``1/sqrt(2d)``; the linear chord between independent points on the sphere of radius ``sqrt(d)`` has midpoint
norm ~ ``sqrt(d/2)``; slerp between points of one sphere stays on it (zero shell deviation) with a purely tangent
velocity (zero radial share).

:func:`shell_deviation_profile` is the paper's shell-deviation figure: how many shell standard deviations the
linear path's tokens sit from the nearest endpoint shell along ``t``, mean and maximum over (prior, data) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..manifolds import TokenSpheres
from ..paths import GeodesicPath, LinearPath, PolarPath

PATHS = ("linear", "polar", "slerp")
# Shell std floor relative to the shell radius: an exact sphere has std 0; deviations are then measured against
# this floor (a 1e-6 relative tolerance) so the numbers stay finite and an on-sphere path still reads ~0.
_STD_FLOOR = 1e-6


def token_norms(latents: Tensor, axis: int = 1) -> Tensor:
    """Per-token Euclidean norms (float64), the ``axis`` dimension removed."""
    if latents.ndim < 2:
        raise ValueError(f"latents must have a batch axis and a token axis, got shape {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents contain NaN/Inf values")
    return torch.linalg.vector_norm(latents.double(), dim=axis)


def token_norm_stats(latents: Tensor, axis: int = 1) -> dict[str, float]:
    """Statistics of the per-token radius ``r = |z_token|`` over every token of every sample.

    Returns ``d`` (token dimension), ``sqrt_d``, ``tokens`` (count), ``mean_radius``, ``std_radius`` (population
    std), ``mean_radius_over_sqrt_d``, ``cv = std/mean``, ``min``, ``max`` and the 1/50/99 % quantiles.
    """
    r = token_norms(latents, axis).flatten()
    d = latents.shape[axis]
    mean = float(r.mean())
    std = float(r.std(unbiased=False)) if r.numel() > 1 else 0.0
    q = (
        torch.quantile(r, torch.tensor([0.01, 0.5, 0.99], dtype=r.dtype, device=r.device)).tolist()
        if r.numel()
        else [0.0] * 3
    )
    return {
        "d": int(d),
        "sqrt_d": d**0.5,
        "tokens": int(r.numel()),
        "mean_radius": mean,
        "std_radius": std,
        "mean_radius_over_sqrt_d": mean / d**0.5,
        "cv": std / mean if mean > 0 else float("nan"),
        "min": float(r.min()),
        "max": float(r.max()),
        "q01": q[0],
        "q50": q[1],
        "q99": q[2],
    }


def _shell(r: Tensor) -> tuple[float, float]:
    mean = float(r.mean())
    return mean, max(float(r.std(unbiased=False)), _STD_FLOOR * max(mean, 1e-12))


def path_diagnostics(
    x0: Tensor,
    x1: Tensor,
    ts: Sequence[float] | Tensor,
    axis: int = 1,
    paths: Sequence[str] = PATHS,
) -> dict[str, Any]:
    """Norm and velocity diagnostics along probability paths from prior samples ``x0`` to data ``x1``.

    Paths (``manifold_fm.paths``): ``linear`` ``x_t = (1-t) x0 + t x1`` on the raw endpoints; ``polar`` (radius
    linear, direction slerp) on the raw endpoints; ``slerp`` (the SFM geodesic) between the endpoints projected to
    radius ``sqrt(d)``. For each path and each ``t``:

    - ``norm_mean``, ``norm_std``: per-token ``|x_t|`` over tokens (and ``norm_mean_over_sqrt_d``);
    - ``shell_deviation``: mean over tokens of ``min_k |(|x_t| - m_k)| / s_k`` with ``(m_k, s_k)`` the mean and std
      of the token radius at endpoint ``k`` (0 = prior, 1 = data) of *that* path, i.e. how many shell standard
      deviations the token sits from the nearest endpoint shell (``s_k`` floored at ``1e-6 m_k``);
    - ``radial_share``: mean over tokens of ``<u_t, x_t/|x_t|>^2 / |u_t|^2`` (0 = purely tangent velocity), and
      ``radial_energy_share``: ``sum radial^2 / sum |u_t|^2`` over all tokens.

    Returns ``{"t": [...], "d": d, "<path>": {metric: [value per t]}}``.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    x0, x1 = x0.double(), x1.double()
    token_norms(x0, axis), token_norms(x1, axis)  # validates shapes and finiteness
    d = x0.shape[axis]
    t_list = [float(t) for t in (ts.tolist() if torch.is_tensor(ts) else ts)]
    sphere = TokenSpheres(d, axis=axis)
    out: dict[str, Any] = {"t": t_list, "d": int(d)}
    for name in paths:
        if name == "slerp":
            a, b = sphere.projx(x0), sphere.projx(x1)
            path: Any = GeodesicPath(sphere)
        elif name == "polar":
            a, b, path = x0, x1, PolarPath(axis=axis)
        else:
            a, b, path = x0, x1, LinearPath()
        shells = [_shell(token_norms(a, axis)), _shell(token_norms(b, axis))]
        rec: dict[str, list[float]] = {
            k: []
            for k in (
                "norm_mean",
                "norm_std",
                "norm_mean_over_sqrt_d",
                "shell_deviation",
                "radial_share",
                "radial_energy_share",
            )
        }
        for t in t_list:
            s = path.sample(a, b, torch.full((a.shape[0],), t, dtype=a.dtype, device=a.device))
            r = torch.linalg.vector_norm(s.x_t, dim=axis, keepdim=True)
            dev = torch.minimum(*[(r - m).abs() / sd for m, sd in shells])
            unit = s.x_t / r.clamp_min(1e-300)
            radial2 = (s.u_t * unit).sum(dim=axis, keepdim=True) ** 2
            total2 = (s.u_t**2).sum(dim=axis, keepdim=True)
            share = torch.where(total2 > 0, radial2 / total2.clamp_min(1e-300), torch.zeros_like(total2))
            rec["norm_mean"].append(float(r.mean()))
            rec["norm_std"].append(float(r.std(unbiased=False)))
            rec["norm_mean_over_sqrt_d"].append(float(r.mean()) / d**0.5)
            rec["shell_deviation"].append(float(dev.mean()))
            rec["radial_share"].append(float(share.mean()))
            tot = float(total2.sum())
            rec["radial_energy_share"].append(float(radial2.sum()) / tot if tot > 0 else 0.0)
        out[name] = rec
    return out


SHELL_DEVIATION_DEFINITION = (
    "Pairs (x0_p, x1_p): a prior sample and a data latent. Along the linear path x_t = (1-t) x0 + t x1, each token n "
    "of pair p has norm r_pn(t) = |x_t,pn|. The endpoint shells are the token norms at t=0 (prior) and t=1 (data): "
    "mean m_k and standard deviation sigma_k (population, over all tokens of all pairs). A token's deviation is its "
    "distance to the nearest endpoint shell in that shell's sigma units, min_k |r_pn(t) - m_k| / sigma_k; a pair's "
    "deviation D_p(t) is the mean over its tokens. Reported along t: the mean and the maximum of D_p(t) over pairs; "
    "'peak_mean' is the largest mean (the 'deviates up to X sigma' figure), 'peak_max' the largest maximum."
)


def shell_deviation_profile(x0: Tensor, x1: Tensor, ts: Sequence[float] | Tensor, axis: int = 1) -> dict[str, Any]:
    """How far the linear path's tokens leave the endpoint shells, in units of the shells' spread (sigma).

    ``x0`` are prior samples and ``x1`` data latents, paired along the batch axis (pair ``p`` is ``(x0[p],
    x1[p])``). Definition (also returned as ``"definition"``): token norms ``r_pn(t) = |(1-t) x0_pn + t x1_pn|``;
    endpoint shells ``(m_k, sigma_k)``, the mean and population std of the token norms at ``t = 0`` and ``t = 1``
    over all tokens of all pairs (``sigma_k`` floored at ``1e-6 m_k``); token deviation
    ``min_k |r_pn(t) - m_k| / sigma_k``; pair deviation ``D_p(t)`` = mean over the pair's tokens. Computed in
    float64.

    Returns ``{"definition", "t", "pairs", "tokens_per_pair", "d", "shells": {"prior": {mean, std}, "data":
    {mean, std}}, "mean": [mean_p D_p(t)], "max": [max_p D_p(t)], "peak_mean", "peak_mean_t", "peak_max",
    "peak_max_t"}``. ``mean`` equals :func:`path_diagnostics`' linear ``shell_deviation``.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    r0, r1 = token_norms(x0, axis), token_norms(x1, axis)  # validates shapes and finiteness
    if r0.shape[0] < 1:
        raise ValueError("shell deviation needs at least one pair")
    a, b = x0.double(), x1.double()
    shells = [_shell(r0), _shell(r1)]
    t_list = [float(t) for t in (ts.tolist() if torch.is_tensor(ts) else ts)]
    means, maxes = [], []
    for t in t_list:
        r = torch.linalg.vector_norm((1 - t) * a + t * b, dim=axis)
        dev = torch.minimum(*[(r - m).abs() / sd for m, sd in shells])
        per_pair = dev.flatten(1).mean(dim=1)
        means.append(float(per_pair.mean()))
        maxes.append(float(per_pair.max()))
    i_mean = max(range(len(t_list)), key=means.__getitem__) if t_list else 0
    i_max = max(range(len(t_list)), key=maxes.__getitem__) if t_list else 0
    return {
        "definition": SHELL_DEVIATION_DEFINITION,
        "t": t_list,
        "pairs": int(r0.shape[0]),
        "tokens_per_pair": int(r0[0].numel()),
        "d": int(x0.shape[axis]),
        "shells": {
            "prior": {"mean": shells[0][0], "std": shells[0][1]},
            "data": {"mean": shells[1][0], "std": shells[1][1]},
        },
        "mean": means,
        "max": maxes,
        "peak_mean": means[i_mean] if t_list else float("nan"),
        "peak_mean_t": t_list[i_mean] if t_list else float("nan"),
        "peak_max": maxes[i_max] if t_list else float("nan"),
        "peak_max_t": t_list[i_max] if t_list else float("nan"),
    }
