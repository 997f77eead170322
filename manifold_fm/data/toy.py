"""Toy datasets on manifolds with known densities, for end-to-end checks of flows and likelihoods.

Every dataset has ``manifold``, ``point_shape``, ``sample(n, generator=None) -> Tensor (n, *point_shape)`` and
``log_prob(x) -> Tensor (n,)``: the exact log density with respect to the manifold's **Riemannian volume** (area on
``S^2``, ``dtheta_1 dtheta_2`` on the torus, the hyperbolic volume on the Poincare ball), the same measure as
:func:`manifold_fm.likelihood.log_likelihood`. ``entropy(n)`` is the Monte Carlo estimate ``-E[log p]`` (the best
achievable test NLL).

- :class:`VMFMixture`: von Mises-Fisher mixture on the unit sphere ``S^2``;
- :class:`ProductVMFMixture`: mixture of products of vMFs on ``(S^2)^k`` (a ``(n, k, 3)`` tensor on
  ``TokenSpheres(3, axis=-1, radius=1)``): the tokens are coupled through the shared component;
- :class:`TorusWrappedNormalMixture`: wrapped-normal mixture on the flat torus ``T^d`` (angles in ``[-pi, pi)``);
- :class:`PoincareWrappedNormalMixture`: wrapped-normal mixture on the Poincare ball via the geoopt adapter;
- :class:`LorentzWrappedNormalMixture`: the same mixture carried to the hyperboloid by the isometry between the models;
- :class:`SPDWrappedNormalMixture`: wrapped-normal mixture on 2x2 SPD matrices with the affine-invariant metric
  (density w.r.t. its Riemannian volume).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..manifolds import FlatTorus, GeooptManifold, Manifold, Sphere, TokenSpheres
from ..manifolds.geoopt_adapter import import_geoopt, spd_wrapped_normal_log_prob

_DT = torch.float64  # densities and samples are computed in float64 and returned in the requested dtype


def _log_weights(weights: Sequence[float] | None, k: int) -> Tensor:
    w = torch.full((k,), 1.0 / k, dtype=_DT) if weights is None else torch.as_tensor(weights, dtype=_DT)
    if w.shape != (k,) or bool((w <= 0).any()):
        raise ValueError(f"mixture weights must be {k} positive numbers, got {weights!r}")
    return torch.log(w / w.sum())


def _components(n: int, log_w: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)


def vmf_log_density(x: Tensor, mu: Tensor, kappa: Tensor) -> Tensor:
    """``log vMF(x; mu, kappa)`` on the unit ``S^2`` (w.r.t. area):
    ``log kappa - log(2 pi) - log(1 - e^{-2 kappa}) + kappa (<mu, x> - 1)`` (the stable form of
    ``kappa e^{kappa <mu,x>} / (4 pi sinh kappa)``). Broadcasts ``x (..., 3)`` against ``mu (..., 3)``."""
    return (
        torch.log(kappa)
        - math.log(2 * math.pi)
        - torch.log(-torch.expm1(-2 * kappa))
        + kappa * ((x * mu).sum(-1) - 1.0)
    )


def vmf_sample(mu: Tensor, kappa: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One vMF sample on ``S^2`` per row of ``mu (n, 3)`` (``kappa (n,)``), by inverting the CDF of ``<mu, x>``:
    ``w = 1 + log(u + (1 - u) e^{-2 kappa}) / kappa``, then a uniform direction on the circle orthogonal to ``mu``."""
    n = mu.shape[0]
    u = torch.rand(n, generator=generator, dtype=_DT)
    w = 1.0 + torch.log(u + (1.0 - u) * torch.exp(-2.0 * kappa)) / kappa
    w = w.clamp(-1.0, 1.0)
    g = torch.randn(n, 3, generator=generator, dtype=_DT)
    g = g - (g * mu).sum(-1, keepdim=True) * mu
    g = g / torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    x = w[:, None] * mu + torch.sqrt((1.0 - w * w).clamp_min(0.0))[:, None] * g
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


class ToyDataset:
    """Base: subclasses set ``manifold``, ``point_shape`` and implement ``_sample`` / ``_log_prob`` in float64."""

    manifold: Manifold
    point_shape: tuple[int, ...]

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """``n`` i.i.d. samples, shape ``(n, *point_shape)``."""
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"number of samples must be a positive integer, got {n!r}")
        return self._sample(n, generator).to(dtype or torch.get_default_dtype())

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log density w.r.t. the Riemannian volume, shape ``(n,)``, in ``x``'s dtype."""
        if tuple(x.shape[1:]) != self.point_shape:
            shape = ", ".join(map(str, self.point_shape))
            raise ValueError(f"expected points of shape (n, {shape}), got {tuple(x.shape)}")
        return self._log_prob(x.to(_DT)).to(x.dtype)

    def entropy(self, n: int = 20000, generator: torch.Generator | None = None) -> float:
        """Monte Carlo ``-E[log p(x)]`` from ``n`` samples (standard error about ``std(log p) / sqrt(n)``)."""
        x = self._sample(n, generator)
        return float(-self._log_prob(x).mean())

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError


def default_sphere_means(k: int) -> Tensor:
    """``k`` well-spread unit vectors (a Fibonacci lattice, rotated off the coordinate axes)."""
    i = torch.arange(k, dtype=_DT) + 0.5
    z = 1.0 - 2.0 * i / k
    phi = i * math.pi * (3.0 - math.sqrt(5.0)) + 0.3
    r = torch.sqrt(1.0 - z * z)
    return _unit(torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1))


class VMFMixture(ToyDataset):
    """``sum_k w_k vMF(x; mu_k, kappa_k)`` on the unit sphere ``S^2`` (manifold ``Sphere(1.0)``, points ``(n, 3)``).

    Defaults: 4 components on a Fibonacci lattice with concentrations 8, 12, 16, 20 and equal weights.
    """

    def __init__(
        self,
        means: Sequence[Sequence[float]] | Tensor | None = None,
        kappas: Sequence[float] | None = None,
        weights: Sequence[float] | None = None,
        components: int = 4,
    ) -> None:
        mu = default_sphere_means(components) if means is None else _unit(torch.as_tensor(means, dtype=_DT))
        if mu.ndim != 2 or mu.shape[1] != 3:
            raise ValueError(f"vMF means must have shape (k, 3), got {tuple(mu.shape)}")
        k = mu.shape[0]
        kap = torch.linspace(8.0, 20.0, k, dtype=_DT) if kappas is None else torch.as_tensor(kappas, dtype=_DT)
        if kap.shape != (k,) or bool((kap <= 0).any()):
            raise ValueError(f"kappas must be {k} positive numbers, got {kappas!r}")
        self.means, self.kappas, self.log_w = mu, kap, _log_weights(weights, k)
        self.manifold = Sphere(1.0)
        self.point_shape = (3,)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        comp = _components(n, self.log_w, generator)
        return vmf_sample(self.means[comp], self.kappas[comp], generator)

    def _log_prob(self, x: Tensor) -> Tensor:
        lp = vmf_log_density(x[:, None, :], self.means[None], self.kappas[None]) + self.log_w
        return torch.logsumexp(lp, dim=1)


class ProductVMFMixture(ToyDataset):
    """Mixture of products of vMFs on ``(S^2)^k``: ``sum_c w_c prod_j vMF(x_j; mu_cj, kappa_c)``.

    Points are ``(n, k, 3)`` on ``TokenSpheres(3, axis=-1, radius=1)``. Component means are drawn once from a
    seeded generator (``seed``), so the target is fixed for a given configuration.
    """

    def __init__(
        self,
        spheres: int = 2,
        components: int = 4,
        kappa: float = 12.0,
        seed: int = 0,
        weights: Sequence[float] | None = None,
    ) -> None:
        if spheres < 1 or components < 1 or kappa <= 0:
            raise ValueError("ProductVMFMixture needs spheres >= 1, components >= 1 and kappa > 0")
        g = torch.Generator().manual_seed(seed)
        self.means = _unit(torch.randn(components, spheres, 3, generator=g, dtype=_DT))
        self.kappa = torch.tensor(float(kappa), dtype=_DT)
        self.log_w = _log_weights(weights, components)
        self.manifold = TokenSpheres(3, axis=-1, radius=1.0)
        self.point_shape = (spheres, 3)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        comp = _components(n, self.log_w, generator)
        mu = self.means[comp].reshape(-1, 3)
        x = vmf_sample(mu, self.kappa.expand(mu.shape[0]), generator)
        return x.reshape(n, *self.point_shape)

    def _log_prob(self, x: Tensor) -> Tensor:
        lp = vmf_log_density(x[:, None], self.means[None], self.kappa).sum(-1) + self.log_w
        return torch.logsumexp(lp, dim=1)


def _wrap(a: Tensor) -> Tensor:
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


class TorusWrappedNormalMixture(ToyDataset):
    """Mixture of wrapped diagonal normals on the flat torus ``T^d`` (angles in ``[-pi, pi)``, ``FlatTorus()``).

    Density of one component: ``prod_i sum_m N(x_i + 2 pi m; mu_i, sigma^2)``, the sum truncated to
    ``|m| <= wraps`` (``wraps=3`` is exact to double precision for ``sigma <= 1.5``). Defaults: ``d = 2``, 4
    components at fixed positions with ``sigma`` 0.35..0.6.
    """

    def __init__(
        self,
        means: Sequence[Sequence[float]] | Tensor | None = None,
        sigmas: Sequence[float] | None = None,
        weights: Sequence[float] | None = None,
        wraps: int = 3,
    ) -> None:
        if means is None:
            mu = torch.tensor([[-2.0, -2.5], [1.0, 2.8], [2.6, -0.5], [-0.5, 0.7]], dtype=_DT)
        else:
            mu = _wrap(torch.as_tensor(means, dtype=_DT))
        if mu.ndim != 2:
            raise ValueError(f"torus means must have shape (k, d), got {tuple(mu.shape)}")
        k = mu.shape[0]
        sig = torch.linspace(0.35, 0.6, k, dtype=_DT) if sigmas is None else torch.as_tensor(sigmas, dtype=_DT)
        if sig.shape != (k,) or bool((sig <= 0).any()):
            raise ValueError(f"sigmas must be {k} positive numbers, got {sigmas!r}")
        self.means, self.sigmas, self.log_w, self.wraps = mu, sig, _log_weights(weights, k), int(wraps)
        self.manifold = FlatTorus()
        self.point_shape = (mu.shape[1],)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        comp = _components(n, self.log_w, generator)
        z = torch.randn(n, self.point_shape[0], generator=generator, dtype=_DT)
        return _wrap(self.means[comp] + self.sigmas[comp, None] * z)

    def _log_prob(self, x: Tensor) -> Tensor:
        m = torch.arange(-self.wraps, self.wraps + 1, dtype=_DT) * (2 * math.pi)
        diff = x[:, None, :, None] + m - self.means[None, :, :, None]  # (n, k, d, wraps)
        sig = self.sigmas[None, :, None, None]
        lg = -0.5 * (diff / sig).square() - torch.log(sig) - 0.5 * math.log(2 * math.pi)
        per_comp = torch.logsumexp(lg, dim=-1).sum(-1) + self.log_w  # (n, k)
        return torch.logsumexp(per_comp, dim=1)


class PoincareWrappedNormalMixture(ToyDataset):
    """Mixture of isotropic wrapped normals on the Poincare ball (curvature ``-c``) via :class:`GeooptManifold`.

    Component ``k``: draw ``v ~ N(0, sigma_k^2 I)`` in orthonormal coordinates of ``T_{mu_k}`` and map
    ``x = exp_{mu_k}(v / lambda_{mu_k})`` (``lambda_x = 2 / (1 - c |x|^2)`` converts to the ball's coordinates).
    Its density w.r.t. hyperbolic volume (isotropy makes the orientation irrelevant) is
    ``N(lambda_mu log_mu(x); 0, sigma^2 I) * (sqrt(c) r / sinh(sqrt(c) r))^{d-1}``, ``r = dist(mu, x)``.
    Defaults: ``d = 2``, ``c = 1``, 3 components with ``sigma = 0.3``.
    """

    def __init__(
        self,
        means: Sequence[Sequence[float]] | Tensor | None = None,
        sigmas: Sequence[float] | None = None,
        weights: Sequence[float] | None = None,
        curvature: float = 1.0,
        base_std: float = 0.5,
    ) -> None:
        geoopt = import_geoopt()
        self.c = float(curvature)
        mu = (
            torch.tensor([[0.5, 0.0], [-0.25, 0.43], [-0.25, -0.43]], dtype=_DT)
            if means is None
            else torch.as_tensor(means, dtype=_DT)
        )
        if mu.ndim != 2 or bool((self.c * mu.square().sum(-1) >= 1.0).any()):
            raise ValueError("Poincare means must have shape (k, d) and lie inside the ball (c |mu|^2 < 1)")
        k = mu.shape[0]
        sig = torch.full((k,), 0.3, dtype=_DT) if sigmas is None else torch.as_tensor(sigmas, dtype=_DT)
        if sig.shape != (k,) or bool((sig <= 0).any()):
            raise ValueError(f"sigmas must be {k} positive numbers, got {sigmas!r}")
        self.means, self.sigmas, self.log_w = mu, sig, _log_weights(weights, k)
        self.ball = geoopt.PoincareBall(c=self.c)
        self.manifold = GeooptManifold(self.ball, base_std=base_std)
        self.point_shape = (mu.shape[1],)

    def _lambda(self, x: Tensor) -> Tensor:
        return 2.0 / (1.0 - self.c * x.square().sum(-1, keepdim=True))

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        comp = _components(n, self.log_w, generator)
        mu = self.means[comp]
        v = self.sigmas[comp, None] * torch.randn(n, self.point_shape[0], generator=generator, dtype=_DT)
        x = self.ball.expmap(mu, v / self._lambda(mu))
        return self.ball.projx(x).as_subclass(Tensor)

    def _log_prob(self, x: Tensor) -> Tensor:
        d = self.point_shape[0]
        mu = self.means[None].expand(x.shape[0], -1, -1)
        xx = x[:, None].expand_as(mu)
        v = self._lambda(mu) * self.ball.logmap(mu, xx).as_subclass(Tensor)
        r = torch.linalg.vector_norm(v, dim=-1)
        sig = self.sigmas[None]
        gauss = -0.5 * (r / sig).square() - d * torch.log(sig) - 0.5 * d * math.log(2 * math.pi)
        sr = math.sqrt(self.c) * r
        safe = torch.where(sr > 1e-6, sr, torch.ones_like(sr))
        log_ratio = torch.where(sr > 1e-6, torch.log(safe / torch.sinh(safe)), -sr.square() / 6)
        return torch.logsumexp(gauss + (d - 1) * log_ratio + self.log_w, dim=1)


class LorentzWrappedNormalMixture(ToyDataset):
    """:class:`PoincareWrappedNormalMixture` on the hyperboloid ``<x, x>_L = -1/c`` (``geoopt.Lorentz(k = 1/c)``).

    The map ``y -> (1/sqrt c) ((1 + c|y|^2), 2 sqrt(c) y) / (1 - c|y|^2)`` from the Poincare ball of curvature ``-c``
    is an isometry onto the hyperboloid, so it carries the mixture's samples and keeps its density w.r.t. the
    Riemannian volume: ``log p(x) = log p_ball(x_{1:} / (1 + sqrt(c) x_0))``. Points are ``(n, d + 1)``. The
    same mixture arguments as the Poincare mixture (defaults: ``d = 2``, 3 components, ``sigma = 0.3``); ``base_std``
    is the prior's standard deviation in the hyperboloid's (Riemannian) normal coordinates.
    """

    def __init__(
        self,
        means: Sequence[Sequence[float]] | Tensor | None = None,
        sigmas: Sequence[float] | None = None,
        weights: Sequence[float] | None = None,
        curvature: float = 1.0,
        base_std: float = 1.0,
    ) -> None:
        geoopt = import_geoopt()
        self.ball_mixture = PoincareWrappedNormalMixture(means, sigmas, weights, curvature)
        self.c = self.ball_mixture.c
        self.manifold = GeooptManifold(geoopt.Lorentz(k=1.0 / self.c), base_std=base_std)
        self.point_shape = (self.ball_mixture.point_shape[0] + 1,)

    def to_hyperboloid(self, y: Tensor) -> Tensor:
        """The isometry from the Poincare ball (curvature ``-c``) onto the hyperboloid."""
        sc = math.sqrt(self.c)
        y2 = self.c * y.square().sum(-1, keepdim=True)
        return torch.cat([1.0 + y2, 2.0 * sc * y], dim=-1) / ((1.0 - y2) * sc)

    def to_ball(self, x: Tensor) -> Tensor:
        """The inverse isometry, hyperboloid to Poincare ball."""
        sc = math.sqrt(self.c)
        return x[..., 1:] / (1.0 + sc * x[..., :1])

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        return self.to_hyperboloid(self.ball_mixture._sample(n, generator))

    def _log_prob(self, x: Tensor) -> Tensor:
        return self.ball_mixture._log_prob(self.to_ball(x))


class SPDWrappedNormalMixture(ToyDataset):
    """Mixture of isotropic wrapped normals on ``n x n`` SPD matrices with the affine-invariant metric
    ``<U, V>_X = tr(X^-1 U X^-1 V)`` (manifold ``GeooptManifold(geoopt.SymmetricPositiveDefinite())``, points
    ``(n, n)``); densities are w.r.t. that metric's Riemannian volume.

    Component ``k`` with mean ``M_k``: ``S ~ N(0, sigma_k^2)`` in orthonormal coordinates of ``T_I`` (the symmetric
    part of ``sigma_k E``, ``E`` a Gaussian matrix), ``X = M^1/2 expm(S) M^1/2 = exp_M(M^1/2 S M^1/2)``. The congruence
    ``X -> M^-1/2 X M^-1/2`` is an isometry, so ``p_k(X)`` is the wrapped normal at the identity
    (:func:`~manifold_fm.manifolds.geoopt_adapter.spd_wrapped_normal_log_prob`) at ``M^-1/2 X M^-1/2``. ``means``
    are given as matrix logarithms (symmetric). Defaults: ``2 x 2``, 3 components, ``sigma`` 0.25, 0.3, 0.35.
    """

    def __init__(
        self,
        log_means: Sequence[Sequence[Sequence[float]]] | Tensor | None = None,
        sigmas: Sequence[float] | None = None,
        weights: Sequence[float] | None = None,
        base_std: float = 0.5,
    ) -> None:
        geoopt = import_geoopt()
        if log_means is None:
            logm = torch.tensor(
                [[[0.9, 0.0], [0.0, -0.3]], [[-0.5, 0.6], [0.6, 0.2]], [[-0.2, -0.7], [-0.7, -0.6]]], dtype=_DT
            )
        else:
            logm = torch.as_tensor(log_means, dtype=_DT)
        if logm.ndim != 3 or logm.shape[1] != logm.shape[2] or not torch.allclose(logm, logm.transpose(1, 2)):
            raise ValueError(f"SPD log-means must be symmetric matrices of shape (k, n, n), got {tuple(logm.shape)}")
        k = logm.shape[0]
        sig = torch.linspace(0.25, 0.35, k, dtype=_DT) if sigmas is None else torch.as_tensor(sigmas, dtype=_DT)
        if sig.shape != (k,) or bool((sig <= 0).any()):
            raise ValueError(f"sigmas must be {k} positive numbers, got {sigmas!r}")
        self.log_means, self.sigmas, self.log_w = logm, sig, _log_weights(weights, k)
        self.sqrt_means = torch.linalg.matrix_exp(logm / 2)
        self.inv_sqrt_means = torch.linalg.matrix_exp(-logm / 2)
        self.manifold = GeooptManifold(geoopt.SymmetricPositiveDefinite(), base_std=base_std)
        self.point_shape = (logm.shape[1], logm.shape[1])

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        comp = _components(n, self.log_w, generator)
        e = torch.randn(n, *self.point_shape, generator=generator, dtype=_DT)
        s = self.sigmas[comp, None, None] * (e + e.transpose(1, 2)) / 2
        half = self.sqrt_means[comp]
        x = half @ torch.linalg.matrix_exp(s) @ half
        return (x + x.transpose(1, 2)) / 2

    def _log_prob(self, x: Tensor) -> Tensor:
        inv = self.inv_sqrt_means[None]  # (1, k, n, n)
        y = inv @ x[:, None] @ inv
        lp = spd_wrapped_normal_log_prob((y + y.transpose(-1, -2)) / 2, self.sigmas[None])
        return torch.logsumexp(lp + self.log_w, dim=1)


TOY_DATASETS = {
    "vmf": VMFMixture,
    "product_vmf": ProductVMFMixture,
    "torus_wrapped_normal": TorusWrappedNormalMixture,
    "poincare_wrapped_normal": PoincareWrappedNormalMixture,
    "lorentz_wrapped_normal": LorentzWrappedNormalMixture,
    "spd_wrapped_normal": SPDWrappedNormalMixture,
}


def build_toy_dataset(name: str, **kwargs: object) -> ToyDataset:
    """A toy dataset by name (``vmf``, ``product_vmf``, ``torus_wrapped_normal``, ``poincare_wrapped_normal``,
    ``lorentz_wrapped_normal``, ``spd_wrapped_normal``)."""
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset '{name}'; choose one of {', '.join(TOY_DATASETS)}")
    cls = TOY_DATASETS[name]
    valid = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"dataset '{name}' has no parameter {', '.join(unknown)}; its parameters: {', '.join(valid)}")
    try:
        return cls(**kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"dataset '{name}': {exc} (its parameters: {', '.join(valid)})") from None


__all__ = [
    "TOY_DATASETS",
    "LorentzWrappedNormalMixture",
    "PoincareWrappedNormalMixture",
    "ProductVMFMixture",
    "SPDWrappedNormalMixture",
    "ToyDataset",
    "TorusWrappedNormalMixture",
    "VMFMixture",
    "build_toy_dataset",
    "vmf_log_density",
    "vmf_sample",
]
