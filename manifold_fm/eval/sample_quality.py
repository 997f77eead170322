"""Sample quality of a latent-image model on the built-in data: sample with fixed noise and labels, decode, score.

:class:`SampleQuality` draws class-balanced samples from a model with a :class:`~manifold_fm.flow.Flow` and a
:class:`~manifold_fm.sampler.SamplerSpec` (noise seeded by the caller, so an evaluation is repeatable along
training), decodes them and reports the built-in classifier's FD and accuracy
(:class:`~manifold_fm.eval.classifier.BuiltinEvaluator`), the on-sphere error of the generated tokens
(:func:`token_norm_error`) and the sampling time per image.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ..flow import Flow
from ..sampler import SamplerSpec, generate
from .image_io import balanced_labels


def token_norm_error(latents: Tensor) -> dict[str, float]:
    """``| |z| / sqrt(d) - 1 |`` over every token (channel axis 1 of ``(B, d, H, W)``): max and mean."""
    err = (torch.linalg.vector_norm(latents.double(), dim=1) / latents.shape[1] ** 0.5 - 1).abs()
    return {"max": float(err.max()), "mean": float(err.mean())}


class SampleQuality:
    """Samples ``model`` with fixed noise and labels, decodes with ``decoder`` and scores with ``evaluator``.

    Args:
        flow: the run's flow (prior and manifold).
        spec: the sampler.
        decoder: a tokenizer whose ``decode`` maps latents to images in [-1, 1].
        shape: one latent, ``(C, H, W)``.
        num_classes: labels are ``i % num_classes``; ``num_classes`` is also the null class of guidance.
        evaluator: ``evaluate(images, labels) -> {"fd_builtin_classifier", "classifier_accuracy", ...}``.
    """

    def __init__(
        self, flow: Flow, spec: SamplerSpec, decoder: Any, shape: tuple[int, int, int], num_classes: int, evaluator: Any
    ) -> None:
        self.flow, self.spec, self.decoder, self.shape = flow, spec, decoder, shape
        self.num_classes, self.evaluator = num_classes, evaluator

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, float]:
        """``(latents, images, labels, seconds)`` for ``n`` class-balanced samples with noise from ``seed``."""
        labels = balanced_labels(n, self.num_classes)
        t0 = time.perf_counter()
        g = torch.Generator(device=labels.device).manual_seed(seed)
        z = generate(
            model, self.flow, (n, *self.shape), self.spec, generator=g, labels=labels, null_class=self.num_classes
        )
        images = self.decoder.decode(z).float()
        return z, images, labels, time.perf_counter() - t0

    def __call__(self, model: nn.Module, n: int, seed: int) -> dict[str, float]:
        """The evaluator's metrics of ``n`` samples, plus ``on_sphere_error_max/mean`` and ``sample_s_per_image``."""
        z, images, labels, secs = self.sample(model, n, seed)
        out = dict(self.evaluator.evaluate(images, labels))
        err = token_norm_error(z)
        out.update(
            {"on_sphere_error_max": err["max"], "on_sphere_error_mean": err["mean"], "sample_s_per_image": secs / n}
        )
        return out


__all__ = ["SampleQuality", "token_norm_error"]
