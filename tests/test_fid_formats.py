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
