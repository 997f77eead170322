"""A small classifier of the built-in images, for evaluating generators where Inception weights are unavailable.

Two numbers come out of it (neither is FID):

- **FD-builtin-classifier**: the Fréchet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` between
  Gaussians fitted to the classifier's 128-d penultimate features of generated images and of the built-in test split;
- **classifier accuracy**: how often the classifier assigns a class-conditional sample to the class it was asked for.

The classifier is trained once (deterministic for a seed and thread count) and cached next to the tokenizer cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import atomic_path, write_json_atomic
from ..errors import InputError
from .fid import feature_stats, frechet_distance

CACHE_NAME = "builtin_classifier-v3"
FD_NAME = "FD-builtin-classifier"


class SmallClassifier(nn.Module):
    """3x3 conv layers (GroupNorm, SiLU; one full-resolution, three stride-2) and a linear head on the 128-d
    mean-pooled features. Deliberately small (about 8 MFLOPs per 32x32 image) so it trains in under a minute on
    2 CPU cores; the full-resolution first layer keeps the fine stripe/checker textures that separate classes."""

    feature_dim = 128

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(
            block(3, w // 2, 1), block(w // 2, w, 2), block(w, 2 * w, 2), block(2 * w, self.feature_dim, 2)
        )
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.num_classes = num_classes

    def features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, 128)``."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur (5 taps, reflect padding)."""
    k = torch.exp(-0.5 * (torch.arange(-2, 3, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random horizontal flips, shifts of up to 2 pixels, and for half the batch a Gaussian blur (sigma 0.3-1.2 px)
    plus a little noise, so that tokenizer reconstructions (slightly blurred) are still recognised: otherwise the
    metric would mostly measure the decoder's blur rather than the generator."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    soft = torch.rand(b, generator=g) < 0.5
    sigma = 0.3 + 0.9 * float(torch.rand(1, generator=g))
    noisy = _blur(x, sigma) + 0.03 * torch.randn(x.shape, generator=g)
    x = torch.where(soft[:, None, None, None], noisy, x)
    pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
    return pad[:, :, dy : dy + h, dx : dx + w]


def train_classifier(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> SmallClassifier:
    """Cross-entropy with AdamW and cosine decay on ``images`` (``(N, 3, H, W)`` in [-1, 1]); returns eval mode."""
    from ..progress import progress_bar

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in progress_bar(range(steps), desc="train classifier", disable=not progress, leave=False):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        loss = F.cross_entropy(model(_augment(images[idx], g)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(
    model: SmallClassifier, images: Tensor, batch_size: int = 256, progress: bool = False
) -> tuple[Tensor, Tensor]:
    """``(features (N, 128), predicted labels (N,))``, in batches (a progress bar on stderr with ``progress``)."""
    from ..progress import progress_bar

    feats, preds = [], []
    starts = range(0, images.shape[0], batch_size)
    for i in progress_bar(starts, desc="classifier features", unit="batch", disable=not progress, leave=False):
        f = model.features(images[i : i + batch_size].float())
        feats.append(f)
        preds.append(model.head(f).argmax(-1))
    return torch.cat(feats), torch.cat(preds)


def _cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MANIFOLD_FM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "manifold-fm"


@dataclass
class BuiltinEvaluator:
    """The cached classifier plus the reference feature statistics of the built-in test split.

    It scores in two parts (:class:`~manifold_fm.eval.sample_quality.Evaluator`): :meth:`features` gives per-image
    rows on the images' device (the classifier follows them there), :meth:`metrics` the FD and accuracy of every
    image's rows (e.g. gathered from several processes); :meth:`evaluate` is both at once."""

    model: SmallClassifier
    mu: np.ndarray
    sigma: np.ndarray
    info: dict[str, Any]

    @torch.no_grad()
    def features(self, images: Tensor, labels: Tensor | None = None, batch_size: int = 256) -> dict[str, Tensor]:
        """``{"features": (N, 128)}`` of ``images`` (``(N, 3, H, W)`` in [-1, 1], resized to the classifier's
        size) and, given labels, ``{"correct": (N,)}`` (1 where the classifier predicts the label), on the images'
        device."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        size = self.info["size"]
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(
                images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        if next(self.model.parameters()).device != images.device:
            self.model.to(images.device)
        feats, preds = predict(self.model, images.float(), batch_size=batch_size)
        rows = {"features": feats.float()}
        if labels is not None:
            rows["correct"] = (preds == labels.to(preds.device)).float()
        return rows

    def metrics(self, rows: dict[str, Tensor]) -> dict[str, float]:
        """``fd_builtin_classifier`` of the rows' features against the test split's, and ``classifier_accuracy``
        when the rows have ``correct``."""
        mu, sigma = feature_stats(rows["features"].cpu())
        out = {"fd_builtin_classifier": frechet_distance(mu, sigma, self.mu, self.sigma)}
        if "correct" in rows:
            out["classifier_accuracy"] = float(rows["correct"].double().mean())
        return out

    def evaluate(self, images: Tensor, labels: Tensor | None = None, progress: bool = False) -> dict[str, float]:
        """``fd_builtin_classifier`` of ``images`` (``(N, 3, H, W)`` in [-1, 1]) and, given labels, the accuracy
        (``progress``: a progress bar on stderr), computed on the images' device."""
        from ..progress import progress_bar

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        if images.shape[0] < 2:
            raise InputError(f"need at least 2 images for feature statistics, got {images.shape[0]}")
        parts: list[dict[str, Tensor]] = []
        step = 256
        for i in progress_bar(
            range(0, images.shape[0], step), desc="classifier features", unit="batch", disable=not progress
        ):
            parts.append(self.features(images[i : i + step], None if labels is None else labels[i : i + step]))
        return self.metrics({k: torch.cat([p[k] for p in parts]) for k in parts[0]})


def builtin_evaluator(
    cache_dir: str | Path | None = None,
    *,
    train_if_missing: bool = True,
    progress: bool = True,
    per_class: int = 300,
    test_per_class: int = 100,
    steps: int = 800,
    size: int = 32,
    train_data: tuple[Tensor, Tensor] | None = None,
    test_data: tuple[Tensor, Tensor] | None = None,
) -> BuiltinEvaluator:
    """The built-in classifier (trained on ``BuiltinImages('train')`` once, then cached) and test-split statistics.

    ``train_data`` / ``test_data``: the already rendered ``(images, labels)`` of exactly those splits, to skip
    rendering them again (the caller vouches that they match ``per_class`` / ``test_per_class`` / ``size``).
    """
    from safetensors.torch import load_file, save_file

    from ..data.builtin_images import BuiltinImages

    train = BuiltinImages("train", size=size, per_class=per_class, seed=0)
    test = BuiltinImages("test", size=size, per_class=test_per_class, seed=0)
    key = f"{CACHE_NAME}-s{size}-p{per_class}-t{test_per_class}-n{steps}"
    root = _cache_dir(cache_dir)
    weights, meta_path = root / f"{key}.safetensors", root / f"{key}.json"
    test_x, test_y = test_data if test_data is not None else test.tensors()
    if weights.is_file() and meta_path.is_file():
        model = SmallClassifier(train.num_classes)
        model.load_state_dict(load_file(str(weights)))
        model.eval().requires_grad_(False)
        info = json.loads(meta_path.read_text())
    else:
        if not train_if_missing:
            raise FileNotFoundError(f"no cached built-in classifier at {weights}; allow training it once")
        x, y = train_data if train_data is not None else train.tensors()
        model = train_classifier(x, y, train.num_classes, steps=steps, progress=progress)
        _, preds = predict(model, test_x)
        info = {
            "test_accuracy": float((preds == test_y).float().mean()),
            "train": train.identity,
            "test": test.identity,
            "steps": steps,
            "size": size,
            "feature_dim": SmallClassifier.feature_dim,
        }
        root.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        write_json_atomic(meta_path, info)
    feats, _ = predict(model, test_x)
    mu, sigma = feature_stats(feats)
    return BuiltinEvaluator(model, mu, sigma, {**info, "cache": str(root)})
