"""The abstract :class:`Manifold` every path, loss and solver works through.

A point batch is a tensor; the manifold decides which axes form one point (its *point axes*) and which are batch
axes. Scalar quantities (``inner``, ``norm``, ``dist``) are reduced over the point axes, so they have the batch shape.
Tangent vectors live in the ambient space, with the same shape as their base point.

A subclass must implement ``projx``, ``proju``, ``expmap``, ``logmap`` and ``random_base``; everything else has a
correct (if not the fastest) default built from those: the flat ambient metric for ``inner``, ``|log_x y|`` for
``dist``, the exp/log geodesic for ``geodesic`` and projection for ``transp``. Override what has a closed form.

**Extension points of the engine.** Whatever the solvers, the likelihood, the couplings and the trainers need from a
manifold is a method here, with a correct generic default that a manifold overrides in closed form:

- :meth:`dlogmap` (exp-map Runge-Kutta steppers): the differential of ``log_x``; default a forward-mode JVP through
  :meth:`logmap`.
- :meth:`ambient_retract` (ambient Runge-Kutta steppers): back onto the manifold from a nearby ambient point;
  default :meth:`projx`.
- :meth:`orthogonal_proju`, :meth:`tangent_basis` (divergences of the likelihood): the ambient-orthogonal tangent
  projection; default an orthonormal basis of the range of :meth:`proju` (an SVD of its ``D x D`` matrix).
- :meth:`log_volume_density` (likelihoods in coordinates whose metric is not the ambient one): default 0 when
  :meth:`inner` is the ambient dot product, else half the log-determinant of the metric's Gram matrix on that basis.
- :meth:`base_log_prob` (likelihoods): the density of :meth:`random_base`. No generic default can exist (the prior
  is the subclass's own): the default raises, naming the method to implement.
- :meth:`pairwise_sq_dist` (optimal-transport couplings): the ``(B0, B1)`` matrix of squared distances; default
  :meth:`dist` on every pair, in chunks.
- :attr:`periodic` and :meth:`chart2d` (models and plots): whether coordinates are angles, and 2-D plot coordinates.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .numerics import broadcast_time, compute_dtype, load_forward_ad, safe_sqrt, upcast


class ManifoldError(ValueError):
    """A tensor is not a valid point or tangent vector of a manifold (wrong shape, non-finite, off the manifold)."""


# Elements materialised at once by the generic pairwise distance (pairs x entries per sample).
_PAIRWISE_CHUNK = 1 << 23


@dataclass(frozen=True)
class Chart2D:
    """Two plot coordinates per point (``u``, ``v``: shape ``(N,)``), their axis labels, and the radius of a disk
    that bounds the chart (``None`` when unbounded), for scatter plots of samples."""

    u: Tensor
    v: Tensor
    xlabel: str
    ylabel: str
    disk_radius: float | None = None


class Manifold(ABC):
    """A Riemannian manifold embedded in (or charted by) an ambient tensor space.

    Attributes:
        name: a short identifier used in configs and reports.
        point_ndim: how many trailing axes form one point; ``None`` means every axis but the leading batch axis
            (used by :class:`TokenSpheres`, where a whole ``(C, H, W)`` latent is one point of a product manifold).
    """

    name: str = "manifold"
    point_ndim: int | None = 1
    #: Whether point coordinates are angles (``2 pi``-periodic): networks should embed them as ``cos, sin``.
    periodic: bool = False

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

    # ---------------------------------------------------------- engine extension points
    def dlogmap(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``d(log_x)_y [v]``: the differential of ``y -> log_x(y)`` at ``y`` applied to ``v`` (tangent at ``y``),
        a tangent vector at ``x``. Used by the exp-map Runge-Kutta steppers to move stage velocities into the chart
        of the step's base point.

        Default: the forward-mode JVP of :meth:`logmap` (one ``logmap`` with dual numbers). The primal is marked as
        requiring grad so that manifolds with an in-place no-autograd fast path take their differentiable one.
        """
        load_forward_ad()  # torch's first use of forward AD would print a deprecation warning of its own
        with torch.enable_grad(), fwAD.dual_level():
            out = self.logmap(x, fwAD.make_dual(y.detach().requires_grad_(True), v))
            tangent = fwAD.unpack_dual(out).tangent
        if tangent is None:
            # A zero stand-in here once hid a real bug (TorchScript kernels dropping forward-AD tangents): fail loudly.
            raise RuntimeError(
                f"{type(self).__name__}.logmap lost the forward-mode AD tangent, so d(log) is unknown; make logmap "
                "differentiable with torch.func.jvp, override dlogmap, or integrate with transport='parallel'/'ambient'"
            )
        return tangent.detach()

    def ambient_retract(self, y: Tensor) -> Tensor:
        """Back onto the manifold from ``y = x + h k`` (``x`` a point, ``k`` tangent there, small ``h``), as the ambient
        Runge-Kutta steppers produce. Default :meth:`projx`; a manifold may skip degenerate-case handling that
        cannot trigger this close to itself."""
        return self.projx(y)

    def _flat_points(self, x: Tensor) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
        """``x`` as ``(N, *point_shape)`` with ``(batch shape, point shape)``."""
        k = len(self.point_dims(x))
        batch, pshape = tuple(x.shape[: x.ndim - k]), tuple(x.shape[x.ndim - k :])
        return x.reshape(-1, *pshape), batch, pshape

    @upcast
    def tangent_basis(self, x: Tensor) -> Tensor:
        """An orthonormal basis (in the ambient dot product) of the tangent space at each point, shape
        ``(*batch, n, *point_shape)`` with ``n`` the manifold's dimension.

        Default: the range of ``u -> proju(x, u)``, from the SVD of its ``D x D`` matrix on the ambient basis
        (``D`` entries per point; one ``proju`` call on ``D`` copies and a batched SVD: meant for small ``D``).
        The nonzero singular values of a projection are at least 1, so the rank is read off at 1/2; ``proju``
        need not be orthogonal (e.g. the Minkowski projection of the hyperboloid).
        """
        flat, batch, pshape = self._flat_points(x)
        n_pts, d = flat.shape[0], math.prod(pshape)
        eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape(1, d, *pshape).expand(n_pts, d, *pshape)
        cols = self.proju(
            flat.unsqueeze(1).expand(n_pts, d, *pshape).reshape(n_pts * d, *pshape), eye.reshape(n_pts * d, *pshape)
        )
        matrix = cols.reshape(n_pts, d, d).transpose(1, 2)  # column k = P e_k
        left, sing, _ = torch.linalg.svd(matrix)
        ranks = (sing > 0.5).sum(dim=-1)
        rank = int(ranks.max()) if ranks.numel() else 0
        if ranks.numel() and int(ranks.min()) != rank:
            raise ManifoldError(
                f"{self.name}: the tangent space dimension varies across the batch "
                f"({int(ranks.min())} to {rank}); check proju"
            )
        return left[..., :rank].transpose(1, 2).reshape(*batch, rank, *pshape)

    def orthogonal_proju(self, x: Tensor, u: Tensor) -> Tensor:
        """The projection of ambient ``u`` onto ``T_x`` that is orthogonal in the ambient dot product.

        Divergences (the likelihood's ``tr(P J P)``) need this one: they are taken with respect to the volume the
        ambient space induces on the manifold. Default: ``sum_i <e_i, u> e_i`` over :meth:`tangent_basis`. A manifold
        whose :meth:`proju` is already orthogonal (every built-in one) overrides this with ``proju``.
        """
        basis = self.tangent_basis(x)  # (*batch, n, *pshape)
        k = len(self.point_dims(x))
        point_axes = tuple(range(-k, 0))
        coef = (basis * u.unsqueeze(-k - 1)).sum(dim=point_axes, keepdim=True)
        return (coef * basis).sum(dim=-k - 1)

    def log_volume_density(self, x: Tensor) -> Tensor:
        """``log sqrt(det g)(x)``: the log-density of the Riemannian volume with respect to the volume the ambient
        space induces on the manifold, with the batch shape.

        Default: 0 when :meth:`inner` is the ambient dot product (the induced metric: spheres, the torus, SO(3) as
        matrices...); otherwise half the log-determinant of the Gram matrix ``G_ij = <e_i, e_j>_x`` of :meth:`inner`
        on :meth:`tangent_basis` (``n^2`` inner products per point). Charts with a conformal metric override it in
        closed form (the Poincare ball: ``d log(2 / (1 - c|x|^2))``).
        """
        if type(self).inner is Manifold.inner:
            return torch.zeros(x.shape[: x.ndim - len(self.point_dims(x))], dtype=x.dtype, device=x.device)
        flat, batch, pshape = self._flat_points(x)  # (N, *pshape)
        basis = self.tangent_basis(x).reshape(flat.shape[0], -1, *pshape)  # (N, n, *pshape)
        size = (basis.shape[0], basis.shape[1], basis.shape[1], *pshape)
        gram = self.inner(
            flat[:, None, None].expand(size).reshape(-1, *pshape),
            basis[:, :, None].expand(size).reshape(-1, *pshape),
            basis[:, None, :].expand(size).reshape(-1, *pshape),
        ).reshape(size[:3])
        return (0.5 * torch.linalg.slogdet(gram.double())[1]).to(x.dtype).reshape(batch)

    def base_log_prob(self, x: Tensor) -> Tensor:
        """``log p_0(x)`` of :meth:`random_base`'s distribution with respect to the Riemannian volume, with the
        batch shape. Needed for likelihoods; there is no generic default (the prior is the manifold's own choice),
        so a manifold used with :func:`~manifold_fm.likelihood.log_likelihood` implements it."""
        raise NotImplementedError(
            f"{type(self).__name__} has no base_log_prob(x): implement it (the log-density of random_base with "
            "respect to the Riemannian volume) to compute likelihoods, or pass base_log_prob_fn to log_likelihood"
        )

    def pairwise_sq_dist(self, x0: Tensor, x1: Tensor) -> Tensor:
        """``C[i, j] = sum dist(x0_i, x1_j)^2`` over every axis but the leading one (for a manifold whose points are
        smaller than a sample: the product metric over them), shape ``(B0, B1)``; the cost of OT couplings.

        Default: :meth:`dist` on every pair, in row chunks of at most ~8M ambient entries.
        """
        n0, n1 = x0.shape[0], x1.shape[0]
        per = max(1, x0[0].numel())
        rows = max(1, _PAIRWISE_CHUNK // (per * max(1, n1)))
        out = torch.empty(n0, n1, dtype=x0.dtype, device=x0.device)
        for i in range(0, n0, rows):
            a = x0[i : i + rows]
            r = a.shape[0]
            aa = a.unsqueeze(1).expand(r, n1, *a.shape[1:]).reshape(r * n1, *a.shape[1:])
            bb = x1.unsqueeze(0).expand(r, *x1.shape).reshape(r * n1, *x1.shape[1:])
            out[i : i + r] = self.dist(aa, bb).square().reshape(r, n1, -1).sum(dim=2)
        return out

    def chart2d(self, x: Tensor) -> Chart2D:
        """Plot coordinates of points ``x`` (a batch of ``N`` points). Default: the first two ambient coordinates."""
        flat = x.detach().reshape(x.shape[0], -1).double()
        return Chart2D(flat[:, 0], flat[:, 1], "x1", "x2")

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
