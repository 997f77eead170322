"""The real evaluation path: FID/IS through torch-fidelity's Inception loaded from a local weights file in the real
file's format, and the ADM reference-batch formats (statistics ``mu``/``sigma`` with or without the images ``arr_0``,
images only) as the ADM evaluator writes them."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.errors import InputError
from manifold_fm.eval.fid import feature_stats, fidelity_metrics, frechet_distance, write_random_inception_weights

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def independent_fd(a: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance via symmetric eigendecompositions, ``tr (S1^1/2 S2 S1^1/2)^1/2`` (no scipy sqrtm)."""
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def images(n: int, seed: int, shift: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, size=(n, size, size, 3)) + shift, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_fid_and_inception_score_through_a_local_inception_weights_file(tmp_path: Path) -> None:
    """~60 s on one core: three 2048-d matrix square roots (scipy's sqrtm, 20 s each) and Inception on 20 images."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = write_random_inception_weights(tmp_path / WEIGHTS_NAME)
    samples, ref = images(6, 0), images(8, 1, shift=40)
    # torch-fidelity's own loader on the file (strict load_state_dict: the format is right)
    ext = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    fa, fb = (ext(torch.from_numpy(x).permute(0, 3, 1, 2))[0].double().numpy() for x in (samples, ref))
    assert fa.shape == (6, 2048) and float(fa.std()) > 1e-3  # features carry signal
    # an ADM reference batch: statistics of the reference images, the spatial ones, and the images themselves
    mu_b, sigma_b = feature_stats(fb)
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, arr_0=ref, mu=mu_b, sigma=sigma_b, mu_s=mu_b[:16], sigma_s=sigma_b[:16, :16])
    m = fidelity_metrics(samples, adm, inception_weights=weights, cuda=False, prc=False, batch_size=8)
    assert set(m) == {"fid", "inception_score_mean", "inception_score_std"}
    assert all(math.isfinite(v) for v in m.values())
    assert m["fid"] == pytest.approx(independent_fd(fa, mu_b, sigma_b), rel=1e-3) and m["fid"] > 1.0
    # 6 samples in min(10, 6) splits: one per split, where p(y) = p(y|x), so each split's score is exp(0) = 1
    assert m["inception_score_mean"] == pytest.approx(1.0, abs=1e-9) and m["inception_score_std"] < 1e-9
    # the same set against itself: 0 (here the images are the reference: features recomputed, no statistics file)
    same = fidelity_metrics(samples, samples, inception_weights=weights, cuda=False, prc=False, isc=False)
    assert same == {"fid": pytest.approx(0.0, abs=1e-3)}


@pytest.fixture
def standin(register_standin: Callable[..., type]) -> type:
    return register_standin("standin6", pool=8, features=6, logits=5)


def standin_features(ext_cls: type, x: np.ndarray) -> np.ndarray:
    ext = ext_cls("standin6", ["pool"])
    return ext(torch.from_numpy(x).permute(0, 3, 1, 2))[0].double().numpy()


def test_adm_reference_batch_statistics_give_fid_and_its_images_give_precision_recall(
    tmp_path: Path, standin: type
) -> None:
    samples, ref = images(30, 0), images(40, 1, shift=40)
    fa, fb = standin_features(standin, samples), standin_features(standin, ref)
    # Statistics that are NOT those of arr_0 (as if computed on more images): the FID must come from them.
    mu, sigma = feature_stats(fb)
    mu, sigma = mu + 0.5, sigma * 1.3
    adm = tmp_path / "ref_batch.npz"
    np.savez(adm, arr_0=ref, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    m = fidelity_metrics(samples, adm, feature_extractor="standin6", cuda=False, isc=False)
    assert m["fd[standin6]"] == pytest.approx(independent_fd(fa, mu, sigma), rel=1e-6)
    images_only = fidelity_metrics(samples, ref, feature_extractor="standin6", cuda=False, isc=False)
    assert (m["precision"], m["recall"]) == (images_only["precision"], images_only["recall"])
    assert abs(images_only["fd[standin6]"] - m["fd[standin6]"]) > 0.1  # the two references are told apart
    # statistics only (pytorch-fid's layout): FID, no precision/recall
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=mu, sigma=sigma)
    m2 = fidelity_metrics(samples, stats_only, feature_extractor="standin6", cuda=False, isc=False)
    assert set(m2) == {"fd[standin6]"} and m2["fd[standin6]"] == pytest.approx(m["fd[standin6]"], rel=1e-12)
    # images only, in the ADM sample layout (arr_0 images, arr_1 labels)
    ref_npz = tmp_path / "ref_images.npz"
    np.savez(ref_npz, ref, np.zeros(40, np.int64))
    m3 = fidelity_metrics(samples, ref_npz, feature_extractor="standin6", cuda=False, isc=False)
    assert m3 == pytest.approx(images_only, rel=1e-12)
    assert m3["fd[standin6]"] == pytest.approx(frechet_distance(*feature_stats(fa), *feature_stats(fb)), rel=1e-6)


def reference_inception_score(logits: np.ndarray, splits: int, seed: int = 2020) -> tuple[float, float]:
    """Inception score in float64 with torch-fidelity's conventions (rows shuffled by
    ``np.random.RandomState(seed).permutation``, split ``k`` is rows ``k N // splits`` to ``(k + 1) N // splits``,
    mean and population standard deviation over splits), each split's score written as a mutual information,
    ``exp(H(mean_x p(y|x)) - mean_x H(p(y|x)))``, which equals ``exp(E_x KL(p(y|x) || p(y)))``."""
    z = logits[np.random.RandomState(seed).permutation(len(logits))]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)

    def entropy(q: np.ndarray) -> np.ndarray:
        return -(q * np.log(q)).sum(axis=-1)

    n = len(p)
    scores = []
    for k in range(splits):
        chunk = p[k * n // splits : (k + 1) * n // splits]
        scores.append(math.exp(entropy(chunk.mean(axis=0)) - entropy(chunk).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_equals_an_independent_float64_computation(register_standin: Callable[..., type]) -> None:
    """A classifier with known logits: images of four flat 16x16 blocks of random colours, so the stand-in's
    ``pool=2`` features are exactly those colours over 255 (12 numbers per image, channel-major as torch flattens
    ``(C, 2, 2)``), and its logits are the features times a fixed ``(12, 5)`` head. 37 images make splits of 3 and 4
    (the boundaries matter) and a score far from 1."""
    head = 6.0 * torch.randn(12, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    register_standin("standin_is", pool=2, logits=head)
    colours = np.random.default_rng(4).integers(0, 256, size=(37, 2, 2, 3)).astype(np.uint8)  # (N, row, col, C)
    samples = colours.repeat(16, axis=1).repeat(16, axis=2)  # (N, 32, 32, C)
    m = fidelity_metrics(samples, samples, feature_extractor="standin_is", cuda=False, prc=False)
    features = colours.transpose(0, 3, 1, 2).reshape(37, 12) / 255.0
    mean, std = reference_inception_score(features @ head.numpy(), splits=10)
    assert mean > 1.5 and std > 0.05  # not the degenerate value 1 of one image per split
    # the reference itself on a closed form: confident predictions spread evenly over 5 classes score 5
    confident = 50.0 * np.eye(5)[np.arange(40) % 5]
    assert reference_inception_score(confident, splits=1) == pytest.approx((5.0, 0.0), abs=1e-9)
    assert m["inception_score_mean"] == pytest.approx(mean, rel=1e-5)
    assert m["inception_score_std"] == pytest.approx(std, rel=1e-4)


def test_malformed_reference_files_are_one_line_input_errors(tmp_path: Path, standin: type) -> None:
    samples = images(6, 0)
    half = tmp_path / "half.npz"
    np.savez(half, mu=np.zeros(6))
    with pytest.raises(InputError, match="only one of mu and sigma"):
        fidelity_metrics(samples, half, feature_extractor="standin6", cuda=False)
    neither = tmp_path / "neither.npz"
    np.savez(neither, feats=np.zeros((3, 6)))
    with pytest.raises(InputError, match="no arr_0 image array and no mu/sigma statistics"):
        fidelity_metrics(samples, neither, feature_extractor="standin6", cuda=False)
    wrong_dim = tmp_path / "wrong_dim.npz"
    np.savez(wrong_dim, mu=np.zeros(2048), sigma=np.eye(2048))  # Inception statistics, stand-in features
    with pytest.raises(InputError, match="statistics do not match"):
        fidelity_metrics(samples, wrong_dim, feature_extractor="standin6", cuda=False)


def test_evaluate_cli_reads_adm_sample_and_reference_batches(tmp_path: Path, standin: type) -> None:
    samples, ref = images(20, 0), images(24, 1, shift=40)
    sample_npz = tmp_path / "samples.npz"
    np.savez(sample_npz, samples, np.arange(20) % 4)  # ADM: arr_0 uint8 NHWC, arr_1 labels
    mu, sigma = feature_stats(standin_features(standin, ref))
    adm = tmp_path / "ref.npz"
    np.savez(adm, arr_0=ref, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    out = tmp_path / "metrics.json"
    args = ["evaluate", str(sample_npz), "--reference", str(adm), "--feature-extractor", "standin6", "--no-isc"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    fa = standin_features(standin, samples)
    assert report["num_samples"] == 20 and report["fd[standin6]"] == pytest.approx(independent_fd(fa, mu, sigma))
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
