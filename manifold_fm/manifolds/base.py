"""The abstract :class:`Manifold` every path, loss and solver works through.

A point batch is a tensor; the manifold decides which axes form one point (its *point axes*) and which are batch
axes. Scalar quantities (``inner``, ``norm``, ``dist``) are reduced over the point axes, so they have the batch shape.
Tangent vectors live in the ambient space, with the same shape as their base point.

A subclass must implement ``projx``, ``proju``, ``expmap``, ``logmap`` and ``random_base``; everything else has a
correct (if not the fastest) default built from those: the flat ambient metric for ``inner``, ``|log_x y|`` for
``dist``, the exp/log geodesic for ``geodesic`` and projection for ``transp``. Override what has a closed form.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from ._numerics import broadcast_time, compute_dtype, safe_sqrt, upcast


class ManifoldError(ValueError):
    """A tensor is not a valid point or tangent vector of a manifold (wrong shape, non-finite, off the manifold)."""


class Manifold(ABC):
    """A Riemannian manifold embedded in (or charted by) an ambient tensor space.

    Attributes:
        name: a short identifier used in configs and reports.
        point_ndim: how many trailing axes form one point; ``None`` means every axis but the leading batch axis
            (used by :class:`TokenSpheres`, where a whole ``(C, H, W)`` latent is one point of a product manifold).
    """

    name: str = "manifold"
    point_ndim: int | None = 1

    # ------------------------------------------------------------------ axes
    def point_dims(self, x: Tensor) -> tuple[int, ...]:
        """The axes of ``x`` that make up one point."""
        if self.point_ndim is None:
            if x.ndim < 2:
                raise ManifoldError(
                    f"{self.name}: expected a batch of points with at least 2 dimensions, got shape {tuple(x.shape)}"
                )
            return tuple(range(1, x.ndim))
        if x.ndim < self.point_ndim:
            raise ManifoldError(
                f"{self.name}: a point has {self.point_ndim} axes but the tensor has shape {tuple(x.shape)}"
            )
        return tuple(range(x.ndim - self.point_ndim, x.ndim))

    def reduce(self, values: Tensor, like: Tensor) -> Tensor:
        """Sum ``values`` (broadcastable to ``like``) over the point axes of ``like``; returns the batch shape."""
        dims = self.point_dims(like)
        if values.ndim != like.ndim:
            raise ManifoldError(f"{self.name}: cannot reduce shape {tuple(values.shape)} like {tuple(like.shape)}")
        return values.sum(dim=dims)

    # ------------------------------------------------------------ required
    @abstractmethod
    def projx(self, x: Tensor) -> Tensor:
        """The closest point of the manifold to ambient ``x`` (a retraction onto it)."""

    @abstractmethod
    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        """Project ambient ``u`` onto the tangent space at ``x``."""

    @abstractmethod
    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """The exponential map: the point reached at time 1 along the geodesic from ``x`` with velocity ``u``."""

    @abstractmethod
    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        """The logarithmic map: the tangent vector at ``x`` whose exponential is ``y`` (shortest geodesic)."""

    @abstractmethod
    def random_base(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Samples of the manifold's base (prior) distribution with the given full tensor shape."""

    # ------------------------------------------------------------- defaults
    @upcast
    def inner(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """Riemannian inner product ``<u, v>_x``, reduced over the point axes. Default: the ambient dot product."""
        return self.reduce(u * v, x)

    def norm(self, x: Tensor, u: Tensor) -> Tensor:
        """``sqrt(<u, u>_x)`` with a finite (zero) gradient at ``u = 0``."""
        return safe_sqrt(self.inner(x, u, u).to(compute_dtype(u.dtype))).to(u.dtype)

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Geodesic distance ``|log_x(y)|_x``, reduced over the point axes."""
        return self.norm(x, self.logmap(x, y))

    @upcast
    def geodesic(self, x0: Tensor, x1: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """The point ``x_t`` and velocity ``u_t = d x_t / dt`` of the shortest geodesic with ``x_0 = x0, x_1 = x1``.

        Default: ``x_t = exp_{x0}(t log_{x0} x1)`` and ``u_t = log_{x_t}(x1) / (1 - t)`` for ``t <= 1/2``,
        ``u_t = -log_{x_t}(x0) / t`` for ``t > 1/2`` (both equal the velocity of a constant-speed geodesic; the switch
        keeps the division away from 0). ``t`` broadcasts per sample (shape ``(B,)``) over every token.
        """
        tt = broadcast_time(t, x0)
        v = self.logmap(x0, x1)
        x_t = self.expmap(x0, tt * v)
        late = tt > 0.5
        forward = self.logmap(x_t, x1) / torch.where(late, torch.ones_like(tt), 1.0 - tt)
        backward = -self.logmap(x_t, x0) / torch.where(late, tt, torch.ones_like(tt))
        return x_t, torch.where(late, backward, forward)

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Move tangent vector ``v`` at ``x`` to the tangent space at ``y``.

        Default: projection onto ``T_y`` (a vector transport, not an isometry). Manifolds with a closed-form
        parallel transport along the geodesic override this.
        """
        return self.proju(y, v)

    # -------------------------------------------------------------- checks
    def _tolerance(self, dtype: torch.dtype) -> float:
        return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)

    def check_finite(self, x: Tensor, what: str) -> None:
        if not torch.is_tensor(x):
            raise ManifoldError(f"{self.name}: {what} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ManifoldError(f"{self.name}: {what} must be a floating tensor, got dtype {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ManifoldError(f"{self.name}: {what} has {bad} NaN/Inf entries; check the data or the step size")

    def check_point(self, x: Tensor, atol: float | None = None) -> None:
        """Raise :class:`ManifoldError` with a one-line reason unless ``x`` is a batch of points (within ``atol``)."""
        self.check_finite(x, "point")
        self.point_dims(x)
        tol = self._tolerance(x.dtype) if atol is None else atol
        err = self.point_error(x)
        if err.numel() and float(err.max()) > tol:
            raise ManifoldError(
                f"{self.name}: point is off the manifold by {float(err.max()):.3g} (tolerance {tol:.3g}); "
                "apply projx() first"
            )

    def check_vector(self, x: Tensor, u: Tensor, atol: float | None = None) -> None:
        """Raise :class:`ManifoldError` unless ``u`` is a tangent vector at ``x`` (within ``atol``, relative)."""
        self.check_point(x, atol)
        self.check_finite(u, "tangent vector")
        if u.shape != x.shape:
            raise ManifoldError(
                f"{self.name}: tangent vector shape {tuple(u.shape)} differs from point shape {tuple(x.shape)}"
            )
        tol = self._tolerance(u.dtype) if atol is None else atol
        err = self.vector_error(x, u)
        if err.numel() and float(err.max()) > tol:
            raise ManifoldError(
                f"{self.name}: vector is not tangent at its base point (relative normal part {float(err.max()):.3g}, "
                f"tolerance {tol:.3g}); apply proju(x, u) first"
            )

    def point_error(self, x: Tensor) -> Tensor:
        """How far ``x`` is from the manifold, per batch element (relative to the manifold's scale)."""
        xc = x.to(compute_dtype(x.dtype))
        diff = (self.projx(xc) - xc).abs()
        return diff.amax(dim=self.point_dims(x)) if diff.ndim else diff

    def vector_error(self, x: Tensor, u: Tensor) -> Tensor:
        """Size of the normal part of ``u`` at ``x`` relative to ``|u|`` (0 for a tangent vector)."""
        xc, uc = x.to(compute_dtype(x.dtype)), u.to(compute_dtype(u.dtype))
        normal = uc - self.proju(xc, uc)
        dims = self.point_dims(x)
        scale = uc.abs().amax(dim=dims).clamp_min(torch.finfo(uc.dtype).tiny)
        return normal.abs().amax(dim=dims) / scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
