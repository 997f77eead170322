"""A flow-matching setup as one value: where samples live, the probability path, time sampling and the coupling.

:class:`Flow` is what the trainer, the sampler and the likelihood take: nothing downstream asks which manifold or
path it holds.

- ``manifold``: where data and samples live. The prior is its base distribution (:meth:`Manifold.random_base
  <manifold_fm.manifolds.Manifold.random_base>`), samplers integrate on it and likelihoods are densities on it.
- ``path``: joins noise ``x0`` and data ``x1``; its ``path.manifold`` is whose tangent projection the loss applies
  (the manifold itself for a geodesic path, ``Euclidean()`` for paths that leave it).
- ``time_sampler``: the training times ``t`` (``t = 0`` noise, ``t = 1`` data).
- ``coupling``: pairs noise with data inside a batch (independent by default; minibatch OT).
- ``project_data``: data are mapped onto ``manifold`` with ``projx`` first (latent tokens onto their spheres).
- ``prior_manifold``, ``loss_manifold``, ``sampling_manifold`` (default: ``manifold``, ``path.manifold``,
  ``manifold``): whose base distribution the noise is, whose tangent projection the loss applies, and where the
  sampler integrates (e.g. plain ambient steps for a chord path between spherical latents; the samples are then
  projected onto ``manifold`` at the end, :meth:`Flow.finish`). The paper's ablation arms differ in these.

One training example: ``t ~ time_sampler``, ``x0 ~ prior``, ``(x0, x1) = coupling(x0, x1)``,
``(x_t, u_t) = path(x0, x1, t)``, loss ``|P_{x_t} (v(x_t, t) - u_t)|^2`` (:func:`~manifold_fm.loss.flow_matching_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .coupling import Coupling, IndependentCoupling
from .loss import Reduction, flow_matching_loss
from .manifolds import Manifold
from .paths import PathSample, ProbabilityPath
from .time import TimeSampler, UniformTime


@dataclass
class Flow:
    """Manifold, path, time sampler and coupling of one flow-matching setup (see the module docstring)."""

    manifold: Manifold
    path: ProbabilityPath
    time_sampler: TimeSampler = field(default_factory=UniformTime)
    coupling: Coupling = field(default_factory=IndependentCoupling)
    project_data: bool = False
    name: str = "flow"
    prior_manifold: Manifold | None = None
    loss_manifold: Manifold | None = None
    sampling_manifold: Manifold | None = None

    def __post_init__(self) -> None:
        self.prior_manifold = self.prior_manifold or self.manifold
        self.loss_manifold = self.loss_manifold or self.path.manifold
        self.sampling_manifold = self.sampling_manifold or self.manifold

    def prepare_data(self, x1: Tensor) -> Tensor:
        """Data as the flow sees them: ``projx(x1)`` with ``project_data``, else unchanged."""
        return self.manifold.projx(x1) if self.project_data else x1

    def prior(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``shape`` samples of the prior, the base distribution of ``prior_manifold``."""
        assert self.prior_manifold is not None
        return self.prior_manifold.random_base(tuple(shape), generator=generator, dtype=dtype, device=device)

    def finish(self, samples: Tensor) -> Tensor:
        """Samples integrated on ``sampling_manifold`` as data of the flow: projected onto ``manifold`` when they
        were integrated elsewhere and the data are projected (``project_data``); unchanged otherwise."""
        if self.sampling_manifold is self.manifold or not self.project_data:
            return samples
        return self.manifold.projx(samples)

    def draw(
        self,
        n: int,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """The random part of ``n`` training examples of point shape ``shape``: times ``t`` (shape ``(n,)``), then
        prior samples ``x0``, drawn from ``generator`` in that order."""
        t = self.time_sampler.sample(n, generator=generator, device=device, dtype=dtype)
        return t, self.prior((n, *shape), generator, device, dtype=dtype)

    def pair_and_sample(
        self, x0: Tensor, x1: Tensor, t: Tensor, labels: Tensor | None = None
    ) -> tuple[PathSample, Tensor | None]:
        """Couple noise ``x0`` with prepared data ``x1`` and sample the path at ``t``. Returns the path sample and
        the labels in the coupled order (couplings permute ``x0`` only, so they come back unchanged)."""
        x0, x1, labels = self.coupling.pair(x0, x1, labels)
        return self.path.sample(x0, x1, t), labels

    def sample_path(
        self, x1: Tensor, generator: torch.Generator | None = None, labels: Tensor | None = None
    ) -> tuple[PathSample, Tensor | None]:
        """One batch of training examples for prepared data ``x1``: :meth:`draw` then :meth:`pair_and_sample`."""
        t, x0 = self.draw(x1.shape[0], x1.shape[1:], generator, x1.device, x1.dtype)
        return self.pair_and_sample(x0, x1, t, labels)

    def loss(self, pred: Tensor, sample: PathSample, reduction: Reduction = "mean") -> Tensor:
        """The flow-matching loss of a prediction at ``sample.x_t``, projected on ``loss_manifold``."""
        assert self.loss_manifold is not None
        return flow_matching_loss(self.loss_manifold, pred, sample, reduction=reduction)


__all__ = ["Flow"]
