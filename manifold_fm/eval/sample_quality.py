"""Sample quality of a latent-image model: sample with fixed noise and labels, decode, score.

:class:`SampleQuality` draws class-balanced samples from a model with a :class:`~manifold_fm.flow.Flow` and a
:class:`~manifold_fm.sampler.SamplerSpec` and reports an evaluator's metrics (the built-in classifier's FD and
accuracy, :class:`~manifold_fm.eval.classifier.BuiltinEvaluator`; FID through torch-fidelity,
:class:`~manifold_fm.eval.fid.FidelityEvaluator`), the on-sphere error of the generated tokens
(:func:`token_norm_error`) and the sampling time per image.

The samples come in chunks of ``batch_size``: chunk ``j`` holds samples ``[j B, (j + 1) B)`` with labels
``i % num_classes`` and noise from a generator seeded by ``(seed, j, "sample")`` (as ``manifold-fm sample`` draws
them, :func:`~manifold_fm.training.runs.sample_chunks`). Everything runs on the model's device: labels, generator,
noise, the decoder and the evaluator's feature network. With ``distributed=True`` each process samples, decodes and
scores its share of the chunks (:mod:`manifold_fm.distributed`) and the per-sample rows (evaluator features, token
errors; not the images) are gathered for the statistics, so the metrics do not depend on the number of processes and
no process waits idle in a collective.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..distributed import gather_rows, process_chunks, process_share
from ..flow import Flow
from ..sampler import SamplerSpec, generate
from ..seeding import seeded_generator
from .image_io import balanced_labels


class Evaluator(Protocol):
    """What scores samples: per-sample rows on the images' device, then metrics from every sample's rows."""

    def features(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample rows ``{name: (N, ...)}`` of ``images`` (``(N, 3, H, W)`` in [-1, 1]) and their labels."""
        ...

    def metrics(self, rows: dict[str, Tensor]) -> dict[str, float]:
        """The metrics of all samples' rows (gathered from every process)."""
        ...


def token_norm_error(latents: Tensor) -> dict[str, float]:
    """``| |z| / sqrt(d) - 1 |`` over every token (channel axis 1 of ``(B, d, H, W)``): max and mean."""
    err = _token_errors(latents)
    return {"max": float(err.max()), "mean": float(err.mean())}


def _token_errors(latents: Tensor) -> Tensor:
    """``| |z| / sqrt(d) - 1 |`` per token, ``(B, H, W)`` in float64 (float32 on devices without float64)."""
    dtype = torch.float32 if latents.device.type == "mps" else torch.float64
    return (torch.linalg.vector_norm(latents.to(dtype), dim=1) / latents.shape[1] ** 0.5 - 1).abs()


class SampleQuality:
    """Samples ``model`` with fixed noise and labels, decodes with ``decoder`` and scores with ``evaluator``.

    Args:
        flow: the run's flow (prior and manifold).
        spec: the sampler (its ``precision`` applies to sampling and decoding).
        decoder: a tokenizer whose ``decode`` maps latents to images in [-1, 1]; moved to the model's device.
        shape: one latent, ``(C, H, W)``.
        num_classes: labels are ``i % num_classes``; ``num_classes`` is also the null class of guidance.
        evaluator: an :class:`Evaluator` (``features`` and ``metrics``).
        batch_size: samples per chunk (one sampler call and one decode each).
    """

    def __init__(
        self,
        flow: Flow,
        spec: SamplerSpec,
        decoder: Any,
        shape: tuple[int, int, int],
        num_classes: int,
        evaluator: Any,
        batch_size: int = 64,
    ) -> None:
        self.flow, self.spec, self.decoder, self.shape = flow, spec, decoder, shape
        self.num_classes, self.evaluator, self.batch_size = num_classes, evaluator, batch_size

    def _chunk(self, model: nn.Module, j: int, start: int, stop: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(latents, images, labels)`` of chunk ``j`` (samples ``[start, stop)``), on the model's device."""
        from ..precision import precision_scope

        device = next(model.parameters()).device
        labels = balanced_labels(stop, self.num_classes, device=device)[start:]
        g = seeded_generator(seed, j, "sample", device=device)
        z = generate(
            model, self.flow, (stop - start, *self.shape), self.spec, generator=g, labels=labels,
            null_class=self.num_classes,
        )  # fmt: skip
        decoder = _on(self.decoder, device)
        with torch.no_grad(), precision_scope(self.spec.precision, device):
            images = decoder.decode(z.to(dtype=decoder.dtype)).float()
        return z, images, labels

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, float]:
        """``(latents, images, labels, seconds)`` of all ``n`` class-balanced samples (in this process, on the model's
        device)."""
        t0 = time.perf_counter()
        parts = [self._chunk(model, j, start, stop, seed) for j, start, stop in process_chunks(n, self.batch_size)]
        z, images, labels = (torch.cat([p[i] for p in parts]) for i in range(3))
        return z, images, labels, time.perf_counter() - t0

    @torch.no_grad()
    def __call__(self, model: nn.Module, n: int, seed: int, distributed: bool = False) -> dict[str, float]:
        """The evaluator's metrics of ``n`` samples, plus ``on_sphere_error_max/mean`` and ``sample_s_per_image``.

        ``distributed``: every process of the ``torch.distributed`` group calls this at once, does its share of the
        chunks and gets the same metrics (the main process logs them)."""
        rank, world = process_share() if distributed else (0, 1)
        device = next(model.parameters()).device
        t0 = time.perf_counter()
        local: dict[str, list[Tensor]] = {}
        for j, start, stop in process_chunks(n, self.batch_size, rank, world):
            z, images, labels = self._chunk(model, j, start, stop, seed)
            rows = dict(self.evaluator.features(images, labels))
            err = _token_errors(z).flatten(1)
            rows["token_error_max"], rows["token_error_mean"] = err.amax(dim=1), err.mean(dim=1)
            for k, v in rows.items():
                local.setdefault(k, []).append(v.to(device))
        secs = time.perf_counter() - t0
        mine = {k: torch.cat(v) for k, v in local.items()}
        rows = gather_rows(mine, n, self.batch_size, device=device) if world > 1 else mine
        out = dict(self.evaluator.metrics({k: v for k, v in rows.items() if not k.startswith("token_error_")}))
        out.update(
            {
                "on_sphere_error_max": float(rows["token_error_max"].max()),
                "on_sphere_error_mean": float(rows["token_error_mean"].mean()),
                # this process's wall time per image it sampled (all processes sample at once)
                "sample_s_per_image": secs * world / n,
            }
        )
        return out


def _on(decoder: Any, device: torch.device) -> Any:
    """``decoder`` on ``device`` (moved once; a no-op when it is there)."""
    if torch.device(decoder.device) != device:
        decoder.to(device)
    return decoder


__all__ = ["Evaluator", "SampleQuality", "token_norm_error"]
