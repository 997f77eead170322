"""Config sections to objects: the velocity network of ``model`` and the :class:`~manifold_fm.flow.Flow` of ``flow``.

The only place that turns names into classes; the trainer and the samplers then take the objects as values.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..coupling import IndependentCoupling, OTCoupling
from ..flow import Flow
from ..manifolds import Euclidean, Manifold, TokenSpheres
from ..paths import GeodesicPath, LinearPath, PolarPath, ProbabilityPath
from ..time import build_time_sampler
from .schema import FLOW_PRESETS, FlowConfig, ModelConfig


def build_model(
    cfg: ModelConfig, point_shape: Sequence[int], num_classes: int | None = None, periodic: bool = False
) -> nn.Module:
    """The network of ``cfg`` for points of ``point_shape``: ``VelocityMLP`` (``mlp``; ``periodic`` embeds angle
    coordinates as ``cos, sin``) or a SiT on ``(C, H, W)`` latents with ``num_classes`` classes (+ the null class)."""
    if not cfg.is_sit:
        from ..models.mlp import VelocityMLP

        return VelocityMLP(
            point_shape,
            hidden=cfg.hidden,
            depth=cfg.depth,
            time_dim=cfg.time_dim,
            num_classes=num_classes,
            periodic=periodic,
        )
    from ..models.sit import build_sit

    if len(point_shape) != 3 or point_shape[1] != point_shape[2] or num_classes is None:
        raise ValueError(f"{cfg.arch} needs square (C, H, W) latents and classes, got {tuple(point_shape)}")
    c, h, _ = point_shape
    return build_sit(cfg.arch, input_size=h, in_channels=c, num_classes=num_classes, time_scale=cfg.time_scale)


def build_flow(cfg: FlowConfig, manifold: Manifold, *, project_data: bool = False, name: str | None = None) -> Flow:
    """The flow of ``cfg`` on ``manifold``: its geodesic (``path: geodesic``) or the ambient straight line
    (``linear``, whose loss is ambient), the training-time sampler, and the coupling (``ot``: minibatch OT with the
    squared geodesic cost of the path's own manifold)."""
    path: ProbabilityPath = GeodesicPath(manifold) if cfg.path == "geodesic" else LinearPath()
    times = build_time_sampler(cfg.time, mean=cfg.time_mean, std=cfg.time_std, shift=cfg.time_shift)
    coupling = (
        OTCoupling(path.manifold, solver=cfg.ot_solver, reg=cfg.ot_reg)
        if cfg.coupling == "ot"
        else IndependentCoupling()
    )
    return Flow(manifold, path, times, coupling, project_data=project_data, name=name or cfg.path)


def latent_flow(cfg: FlowConfig, channels: int) -> Flow:
    """The flow of a latent-image run with ``channels`` latent channels (:class:`FlowConfig`'s settings): spherical
    latents live on ``TokenSpheres(channels, axis=1)`` (data projected per token), vanilla ones in ``Euclidean()``;
    the prior, the loss's projection and the sampler's space are each the token spheres or the flat latent space;
    the path is the slerp, the straight line or the shell path (:class:`~manifold_fm.paths.PolarPath`). Named after
    its preset (``spherical``, ``linear``, ``shell``, ``spherical-linear``; ``custom`` otherwise)."""
    r = cfg.resolved
    spheres, flat = TokenSpheres(channels, axis=1), Euclidean()
    manifold: Manifold = spheres if r["latent"] == "spherical" else flat
    path: ProbabilityPath = {"geodesic": GeodesicPath(spheres), "linear": LinearPath(), "shell": PolarPath(axis=1)}[
        r["path"]
    ]
    times = build_time_sampler(cfg.time, mean=cfg.time_mean, std=cfg.time_std, shift=cfg.time_shift)
    coupling = (
        OTCoupling(path.manifold, solver=cfg.ot_solver, reg=cfg.ot_reg)
        if cfg.coupling == "ot"
        else IndependentCoupling()
    )
    return Flow(
        manifold,
        path,
        times,
        coupling,
        project_data=r["latent"] == "spherical",
        name=cfg.preset,
        prior_manifold=spheres if r["prior"] == "uniform" else flat,
        loss_manifold=spheres if r["projection"] == "on" else flat,
        sampling_manifold=spheres if r["sampler"] == "exp-map" else flat,
    )


def preset_flow(name: str, channels: int) -> Flow:
    """The latent flow of a :data:`~manifold_fm.training.schema.FLOW_PRESETS` name (``spherical``, ``linear``) with
    the default time sampler and coupling, for ``channels`` latent channels."""
    if name not in FLOW_PRESETS:
        raise ValueError(f"unknown flow preset {name!r}; choose one of {', '.join(FLOW_PRESETS)}")
    return latent_flow(FlowConfig(**FLOW_PRESETS[name]), channels)


__all__ = ["build_flow", "build_model", "latent_flow", "preset_flow"]
