"""Probability paths: how a noise sample ``x0`` and a data sample ``x1`` are joined, and the velocity to learn.

Every path maps ``(x0, x1, t)`` with per-sample times ``t`` of shape ``(B,)`` (broadcast over every other axis, so
all tokens of a sample share its time) to a :class:`PathSample` holding the interpolant ``x_t`` and the target
velocity ``u_t = d x_t / dt``. Time runs from ``t = 0`` (noise) to ``t = 1`` (data). Works on ``(B, D)``,
``(B, N, D)`` and ``(B, C, H, W)`` tensors without any reshaping by the caller.

- :class:`GeodesicPath` follows the manifold's own geodesic (closed-form slerp on spheres and token spheres,
  exp/log elsewhere): ``u_t = log_{x_t}(x1) / (1 - t)``, tangent at ``x_t``.
- :class:`LinearPath` is the Euclidean baseline ``x_t = (1-t) x0 + t x1``, ``u_t = x1 - x0``.
- :class:`PolarPath` is the "shell" ablation: radius interpolated linearly, direction by slerp.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .manifolds import Euclidean, Manifold, TokenSpheres
from .manifolds.numerics import broadcast_time


@dataclass
class PathSample:
    """One batch drawn from a probability path.

    Attributes:
        x0: noise samples (shape ``S``).
        x1: data samples (shape ``S``).
        t: per-sample times, shape ``(B,)``.
        x_t: the interpolant at ``t`` (shape ``S``).
        u_t: the target velocity ``d x_t / dt`` at ``x_t`` (shape ``S``).
    """

    x0: Tensor
    x1: Tensor
    t: Tensor
    x_t: Tensor
    u_t: Tensor


class ProbabilityPath(ABC):
    """A probability path: ``sample(x0, x1, t)`` returns the interpolant and its target velocity as a
    :class:`PathSample`.

    Attributes:
        manifold: the manifold whose tangent projection the loss applies to predictions and targets on this path
            (the manifold itself for :class:`GeodesicPath`; ``Euclidean()`` for paths that leave it, whose loss is
            ambient).
    """

    manifold: Manifold

    @abstractmethod
    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        """The path at per-sample times ``t`` (shape ``(B,)``) between noise ``x0`` and data ``x1``."""


def _check_pair(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    if x0.shape != x1.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but x1 has shape {tuple(x1.shape)}; they must match")
    if x0.ndim < 1:
        raise ValueError("x0 and x1 must have a leading batch axis")
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    if t.ndim == 0:
        t = t.expand(x0.shape[0])
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape (B,) = ({x0.shape[0]},), got {tuple(t.shape)}")
    return t


class GeodesicPath(ProbabilityPath):
    """The geodesic path of ``manifold``: ``x_t = exp_{x0}(t log_{x0} x1)``, ``u_t = d x_t / dt``.

    On :class:`~manifold_fm.manifolds.Sphere` / :class:`~manifold_fm.manifolds.TokenSpheres` this is the closed-form
    slerp ``x_t = (sin((1-t)w) x0 + sin(t w) x1) / sin w`` with ``u_t = w (cos(t w) x1 - cos((1-t) w) x0) / sin w``
    (per token, ``w`` the angle), evaluated without the ``0/0`` at ``w -> 0``.
    """

    def __init__(self, manifold: Manifold) -> None:
        if not isinstance(manifold, Manifold):
            raise TypeError(f"GeodesicPath needs a Manifold, got {type(manifold).__name__}")
        self.manifold = manifold

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        t = _check_pair(x0, x1, t)
        x_t, u_t = self.manifold.geodesic(x0, x1, t)
        return PathSample(x0=x0, x1=x1, t=t, x_t=x_t, u_t=u_t)

    def __repr__(self) -> str:
        return f"GeodesicPath({self.manifold!r})"


class LinearPath(ProbabilityPath):
    """The Euclidean (rectified-flow / SiT) path ``x_t = (1-t) x0 + t x1``, ``u_t = x1 - x0``.

    Its :attr:`manifold` is :class:`~manifold_fm.manifolds.Euclidean` (every axis but the batch axis is one point).
    Used as the baseline: with a spherical prior and data it is "ambient interpolation", projected only at sampling.
    """

    def __init__(self) -> None:
        self.manifold: Manifold = Euclidean()

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        t = _check_pair(x0, x1, t)
        tt = broadcast_time(t, x0)
        u_t = x1 - x0
        return PathSample(x0=x0, x1=x1, t=t, x_t=torch.addcmul(x0, tt, u_t), u_t=u_t)

    def __repr__(self) -> str:
        return "LinearPath()"


class PolarPath(ProbabilityPath):
    """Radius interpolated linearly, direction by slerp (the SFM paper's "shell" ablation), per token along ``axis``.

    With ``r_i = |x_i|`` and unit directions ``d_i = x_i / r_i`` (per token):
    ``r_t = (1-t) r0 + t r1``, ``d_t = slerp(d0, d1, t)``, ``x_t = r_t d_t`` and
    ``u_t = (r1 - r0) d_t + r_t d'_t`` where ``d'_t`` is the unit-sphere slerp velocity.
    ``axis`` is the channel axis: 1 for ``(B, C, H, W)`` and ``(B, D)``, -1 for ``(B, N, D)``.
    Zero-norm tokens get direction ``e_0`` (the sphere's ``projx`` policy). Its :attr:`manifold` is
    :class:`~manifold_fm.manifolds.Euclidean`: the path leaves every sphere, so the loss is ambient.
    """

    def __init__(self, axis: int = 1) -> None:
        self.axis = axis
        self.manifold: Manifold = Euclidean()

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        t = _check_pair(x0, x1, t)
        if x0.ndim < 2:
            raise ValueError(f"PolarPath needs a batch with a channel axis, got shape {tuple(x0.shape)}")
        unit = TokenSpheres(dim=x0.shape[self.axis], axis=self.axis, radius=1.0)
        r0 = torch.linalg.vector_norm(x0, dim=self.axis, keepdim=True)
        r1 = torch.linalg.vector_norm(x1, dim=self.axis, keepdim=True)
        d_t, dd_t = unit.geodesic(unit.projx(x0), unit.projx(x1), t)
        tt = broadcast_time(t, x0)
        r_t = torch.lerp(r0, r1, tt)
        return PathSample(x0=x0, x1=x1, t=t, x_t=r_t * d_t, u_t=(r1 - r0) * d_t + r_t * dd_t)

    def __repr__(self) -> str:
        return f"PolarPath(axis={self.axis})"


def build_path(name: str, manifold: Manifold, axis: int = 1) -> ProbabilityPath:
    """``"geodesic"`` -> :class:`GeodesicPath` on ``manifold``; ``"linear"`` -> :class:`LinearPath`;
    ``"polar"`` -> :class:`PolarPath` (``axis``)."""
    if name == "geodesic":
        return GeodesicPath(manifold)
    if name == "linear":
        return LinearPath()
    if name == "polar":
        return PolarPath(axis=axis)
    raise ValueError(f"unknown path '{name}'; choose geodesic, linear or polar")


__all__ = ["GeodesicPath", "LinearPath", "PathSample", "PolarPath", "ProbabilityPath", "build_path"]
