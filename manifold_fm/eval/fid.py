"""Fréchet distances and the torch-fidelity metrics (FID, Inception Score, precision/recall).

``frechet_distance`` is ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` between Gaussians fitted to features
(Heusel et al.). FID is that distance in the 2048-d pool features of torch-fidelity's ``inception-v3-compat``
network, which needs its weight file (``pt_inception-2015-12-05-6726825d.pth``): nothing is downloaded here, so a
local path must be given (torch-fidelity reads it with ``torch.load`` as the state dict of its
``FeatureExtractorInceptionV3``). The reference is either a statistics file (``.npz`` with ``mu`` and ``sigma``, as in
the ADM reference batches or pytorch-fid) or images (a folder, or an ``.npz`` whose ``arr_0`` is uint8 NHWC, the
layout of ADM sample and reference batches).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from torch import Tensor
from torch.utils.data import Dataset

from ..atomic import atomic_path
from ..errors import InputError

INCEPTION = "inception-v3-compat"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def feature_stats(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features, in float64."""
    f = features.double().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise InputError(f"need at least 2 feature vectors of shape (N, D) for statistics, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``.

    As in pytorch-fid/ADM: if the product is singular, ``eps * I`` is added to both covariances; a tiny imaginary
    part from ``sqrtm`` round-off is dropped (a large one raises).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise InputError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    # Rank-deficient covariances (fewer samples than feature dims) leave ~1e-6 round-off below the true value 0.
    return max(0.0, float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


# ----------------------------------------------------------------------------- images
class UInt8Images(Dataset):
    """``(N, H, W, 3)`` uint8 images as torch-fidelity wants them: ``(3, H, W)`` uint8 tensors."""

    def __init__(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1)))


def load_images(path: str | Path, progress: bool = False) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` from an ADM ``.npz`` (``arr_0``) or a folder of images (searched recursively; a
    progress bar on stderr with ``progress``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass an .npz of samples or a folder of images")
    if path.is_file():
        if path.suffix != ".npz":
            raise InputError(f"{path}: expected an .npz (ADM layout, arr_0 uint8 NHWC) or a folder of images")
        with np.load(path) as data:
            if "arr_0" not in data:
                raise InputError(
                    f"{path} has no arr_0 image array and no mu/sigma statistics (keys: {', '.join(data.files)})"
                )
            arr = data["arr_0"]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise InputError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
        return arr
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    from ..progress import progress_bar

    out = []
    for f in progress_bar(files, desc=f"read {path.name}", unit="image", disable=not progress, leave=False):
        try:
            with Image.open(f) as im:
                out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"cannot read image {f}: {exc}; remove or replace it") from None
    shapes = {a.shape for a in out}
    if len(shapes) != 1:
        raise InputError(f"images in {path} have different sizes {sorted(shapes)[:3]}...; resize them first")
    return np.stack(out)


def load_reference_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mu, sigma)`` if ``path`` is a statistics ``.npz`` (keys ``mu``, ``sigma``: pytorch-fid's files, and the ADM
    reference batches, which also hold ``mu_s``/``sigma_s`` and usually the images as ``arr_0``), else ``None``."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".npz"):
        return None
    with np.load(path) as data:
        if "mu" in data and "sigma" in data:
            return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        if "mu" in data or "sigma" in data:
            raise InputError(f"{path} holds only one of mu and sigma (keys: {', '.join(data.files)}); need both")
    return None


def has_image_array(path: str | Path) -> bool:
    """Whether ``path`` is an ``.npz`` holding an ``arr_0`` array (the ADM layout of images)."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".npz"):
        return False
    with np.load(path) as data:
        return "arr_0" in data.files


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write ``mu``/``sigma`` to an ``.npz`` (atomically)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, mu=mu, sigma=sigma)
    return path


# ----------------------------------------------------------------------------- torch-fidelity
def _extractor(name: str, layers: list[str], weights: str | Path | None, cuda: bool) -> Any:
    from torch_fidelity.utils import create_feature_extractor

    kwargs: dict[str, Any] = {"verbose": False}
    if name == INCEPTION:
        if weights is None:
            raise FileNotFoundError(
                "FID needs the Inception weights file (pt_inception-2015-12-05-6726825d.pth) and nothing is "
                "downloaded here; pass its local path with --inception-weights"
            )
        if not Path(weights).is_file():
            raise FileNotFoundError(f"Inception weights {weights} not found; pass the .pth file's local path")
    if weights is not None:
        kwargs["feature_extractor_weights_path"] = str(weights)
    return create_feature_extractor(name, layers, cuda=cuda, **kwargs)


def _features(images: np.ndarray, extractor: Any, batch_size: int, cuda: bool, progress: bool) -> dict[str, Tensor]:
    from torch_fidelity.utils import get_featuresdict_from_dataset

    from ..progress import shows_bars

    # torch-fidelity's verbose mode is its progress bar on stderr: only as a bar on a terminal
    return get_featuresdict_from_dataset(UInt8Images(images), extractor, batch_size, cuda, True, shows_bars(progress))


def fidelity_metrics(
    samples: np.ndarray,
    reference: str | Path | np.ndarray,
    *,
    inception_weights: str | Path | None = None,
    feature_extractor: str = INCEPTION,
    isc: bool = True,
    prc: bool = True,
    batch_size: int = 64,
    cuda: bool | None = None,
    prc_neighborhood: int = 3,
    progress: bool = False,
) -> dict[str, float]:
    """FID (+ IS, precision/recall) of uint8 NHWC ``samples`` against ``reference`` through torch-fidelity
    (``progress``: progress bars on stderr while reading images and extracting features).

    ``reference``: a statistics ``.npz`` (``mu``, ``sigma``, as pytorch-fid writes them: FID only, since
    precision/recall need reference features), an ADM reference batch (``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and
    the images as ``arr_0``: FID from its statistics, precision/recall from its images), an ``.npz`` of images
    (``arr_0``), a folder of images, or an image array. ``feature_extractor`` may name any
    extractor registered with torch-fidelity (the test suite registers a small stand-in; metrics computed with it
    are not FID and are keyed ``fd[<name>]`` instead of ``fid``).
    """
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from ..progress import shows_bars

    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise InputError(
            f"unknown torch-fidelity feature extractor '{feature_extractor}'; "
            f"registered: {', '.join(FEATURE_EXTRACTORS_REGISTRY)}"
        )
    cuda = torch.cuda.is_available() if cuda is None else cuda
    cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    fid_layer = cls.get_default_feature_layer_for_metric("fid")
    isc_layer = cls.get_default_feature_layer_for_metric("isc")
    stats = None if isinstance(reference, np.ndarray) else load_reference_stats(reference)
    layers = [fid_layer] + ([isc_layer] if isc and isc_layer != fid_layer else [])
    extractor = _extractor(feature_extractor, layers, inception_weights, cuda)
    feats = _features(samples, extractor, batch_size, cuda, progress)
    mu, sigma = feature_stats(feats[fid_layer])
    fid_key = "fid" if feature_extractor == INCEPTION else f"fd[{feature_extractor}]"
    out: dict[str, float] = {}
    ref_feats = None
    if stats is not None:
        out[fid_key] = frechet_distance(mu, sigma, *stats)
        if prc and has_image_array(reference):  # an ADM reference batch: its images give precision/recall
            ref_feats = _features(load_images(reference, progress), extractor, batch_size, cuda, progress)
    else:
        ref_images = reference if isinstance(reference, np.ndarray) else load_images(reference, progress)
        ref_feats = _features(ref_images, extractor, batch_size, cuda, progress)
        out[fid_key] = frechet_distance(mu, sigma, *feature_stats(ref_feats[fid_layer]))
    if prc and ref_feats is not None:
        verbose = shows_bars(progress)
        kw = {"prc_neighborhood": prc_neighborhood, "prc_batch_size": 10000, "cuda": cuda, "verbose": verbose}
        m = prc_featuresdict_to_metric(feats, ref_feats, fid_layer, **kw)
        out.update({"precision": float(m["precision"]), "recall": float(m["recall"])})
    if isc:
        m = isc_featuresdict_to_metric(
            feats, isc_layer, isc_splits=min(10, samples.shape[0]), rng_seed=2020, verbose=False
        )
        out.update(
            {
                "inception_score_mean": float(m["inception_score_mean"]),
                "inception_score_std": float(m["inception_score_std"]),
            }
        )
    return out


def write_random_inception_weights(path: str | Path, seed: int = 0, calibration_images: int = 4) -> Path:
    """A weights file in the format torch-fidelity loads for ``inception-v3-compat`` (``torch.save`` of its
    ``FeatureExtractorInceptionV3``'s ``state_dict()``; it reads the file with ``torch.load`` and a strict
    ``load_state_dict``), with random weights: for timing FID and testing the real loading path where the real file
    is not available. Nothing measured through it is FID. Batch-norm statistics are calibrated on
    ``calibration_images`` random images, so activations stay O(1) through the network's 94 convolutions."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # build the module without the download and the strict load at the end of its __init__
        with (
            mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
        ):
            model = fe.FeatureExtractorInceptionV3(INCEPTION, ["2048"])
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batch
        model.train()
        with torch.no_grad():
            model(torch.randint(0, 256, (calibration_images, 3, 32, 32), dtype=torch.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.eval().state_dict(), tmp)
    return path


# ----------------------------------------------------------------------------- evaluator on any device
def images_to_uint8(images: Tensor) -> Tensor:
    """``(N, 3, H, W)`` in [-1, 1] -> ``(N, 3, H, W)`` uint8 on the same device, rounding as ADM does
    (``round((x + 1) * 127.5)``; :func:`~manifold_fm.eval.image_io.to_uint8` is the NHWC array on the host)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FidelityEvaluator:
    """FID (and the Inception Score) of generated images through torch-fidelity's feature extractor, run directly on
    the images' device, in two parts (:class:`~manifold_fm.eval.sample_quality.Evaluator`): :meth:`features` gives
    per-image rows (the FD layer's features and, with ``isc``, the IS layer's logits), :meth:`metrics` the FID and IS
    of every image's rows (e.g. gathered from several processes). The reference is what :func:`fidelity_metrics`
    takes: a statistics ``.npz`` or images (whose features are computed once, on the extractor's device).

    Args:
        reference: ``mu``/``sigma`` statistics ``.npz``, an ``.npz`` of images (``arr_0``) or an image folder.
        inception_weights: the local Inception weight file (:func:`fidelity_metrics`).
        feature_extractor: a torch-fidelity extractor name (anything but Inception is keyed ``fd[<name>]``).
        isc: also the Inception Score.
        batch_size: images per forward pass of the extractor.
    """

    def __init__(
        self,
        reference: str | Path,
        *,
        inception_weights: str | Path | None = None,
        feature_extractor: str = INCEPTION,
        isc: bool = True,
        batch_size: int = 64,
    ) -> None:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise InputError(
                f"unknown torch-fidelity feature extractor '{feature_extractor}'; "
                f"registered: {', '.join(FEATURE_EXTRACTORS_REGISTRY)}"
            )
        cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
        self.fd_layer = cls.get_default_feature_layer_for_metric("fid")
        self.isc_layer = cls.get_default_feature_layer_for_metric("isc") if isc else None
        layers = [self.fd_layer] + ([self.isc_layer] if isc and self.isc_layer != self.fd_layer else [])
        self.extractor = _extractor(feature_extractor, layers, inception_weights, cuda=False).eval()
        self.reference, self.batch_size = reference, batch_size
        self.key = "fid" if feature_extractor == INCEPTION else f"fd[{feature_extractor}]"
        self._ref: tuple[np.ndarray, np.ndarray] | None = None
        self._device = torch.device("cpu")

    @torch.no_grad()
    def _extract(self, images_u8: Tensor) -> dict[str, Tensor]:
        """The extractor's layers for uint8 ``(N, 3, H, W)`` images, in batches, on the images' device."""
        if self._device != images_u8.device:  # follows the images (moved once)
            self.extractor.to(images_u8.device)
            self._device = images_u8.device
        parts = []
        for i in range(0, images_u8.shape[0], self.batch_size):
            out = self.extractor(images_u8[i : i + self.batch_size])
            parts.append(self.extractor.convert_features_tuple_to_dict(out))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def features(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """``{"fd": (N, D)}`` and, with ``isc``, ``{"isc": (N, K)}`` of ``images`` (``(N, 3, H, W)`` in [-1, 1]) on
        their device (the labels are not used)."""
        feats = self._extract(images_to_uint8(images))
        rows = {"fd": feats[self.fd_layer].float()}
        if self.isc_layer is not None:
            rows["isc"] = feats[self.isc_layer].float()
        return rows

    def _reference_stats(self, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        if self._ref is None:
            stats = load_reference_stats(self.reference)
            if stats is None:
                arr = load_images(self.reference)
                u8 = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
                feats = torch.cat(
                    [self._extract(u8[i : i + 1024].to(device))[self.fd_layer].cpu() for i in range(0, len(u8), 1024)]
                )
                stats = feature_stats(feats)
            self._ref = stats
        return self._ref

    def metrics(self, rows: dict[str, Tensor]) -> dict[str, float]:
        """FID (``fid``, or ``fd[<name>]`` for another extractor) of the rows against the reference and, with
        ``isc``, ``inception_score_mean`` / ``inception_score_std`` (torch-fidelity's, 10 splits)."""
        mu, sigma = feature_stats(rows["fd"].cpu())
        out = {self.key: frechet_distance(mu, sigma, *self._reference_stats(rows["fd"].device))}
        if self.isc_layer is not None:
            from torch_fidelity.metric_isc import isc_featuresdict_to_metric

            logits = rows["isc"].cpu()
            m = isc_featuresdict_to_metric(
                {self.isc_layer: logits}, self.isc_layer, isc_splits=min(10, logits.shape[0]), rng_seed=2020,
                verbose=False,
            )  # fmt: skip
            out["inception_score_mean"] = float(m["inception_score_mean"])
            out["inception_score_std"] = float(m["inception_score_std"])
        return out
