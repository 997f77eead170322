"""The extract-latents, finetune-decoder and probe commands, end to end on tiny built-in data."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.data.latents import LatentCache


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_extract_latents_cli(tmp_path) -> None:
    out = tmp_path / "cache"
    r = _run("extract-latents", "--per-class", "1", "--shard-size", "8", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "24 latents of shape [16, 8, 8] in 2 shard(s); 0 unreadable" in r.output
    cache = LatentCache(out)
    assert len(cache) == 24 and cache.manifest["tokenizer"].startswith("builtin-tiny-vae-")
    r = _run("extract-latents", "--per-class", "1", "--shard-size", "8", "--out", str(out))  # resumes: nothing to do
    assert r.exit_code == 0 and "24 latents" in r.output
    r = _run("extract-latents", "--per-class", "1", "--spherical", "--no-flip", "--out", str(tmp_path / "sph"))
    assert r.exit_code == 0, r.output
    z, _ = LatentCache(tmp_path / "sph")[0]
    torch.testing.assert_close(z.norm(dim=0), torch.full((8, 8), 4.0), rtol=1e-5, atol=1e-5)
    r = _run("extract-latents", "--per-class", "1", "--no-flip", "--out", str(out))
    assert r.exit_code != 0 and "flip" in r.output


def test_bad_inputs_give_one_line_errors(tmp_path) -> None:
    r = CliRunner().invoke(main, ["extract-latents", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["probe", "--normalization", str(tmp_path / "missing.json"), "--out", str(tmp_path)])
    assert r.exit_code == 1 and "missing.json" in r.output
    r = CliRunner().invoke(main, ["finetune-decoder", "--lpips-vgg", "x.pth", "--out", str(tmp_path / "f")])
    assert r.exit_code == 1 and "both" in r.output


def test_finetune_decoder_cli_with_vanilla_control(tmp_path) -> None:
    out = tmp_path / "ft"
    r = _run(
        "finetune-decoder",
        "--per-class",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--eval-items",
        "8",
        "--vanilla-control",
        "--out",
        str(out),
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["metrics"]) == {
        "original_decoder/raw_latents",
        "original_decoder/projected_latents",
        "finetuned_decoder/projected_latents",
        "finetuned_decoder/raw_latents",
    }
    assert rep["perceptual_metric"] == "fallback:grad-pyramid-l1"
    assert (out / "decoder.safetensors").is_file() and (out / "decoder_vanilla.safetensors").is_file()
    # The finetuned decoder plugs into the spherical tokenizer used by extract-latents / probe.
    r = _run(
        "probe",
        "--per-class",
        "2",
        "--num",
        "24",
        "--t-points",
        "3",
        "--max-pairs",
        "4",
        "--spherical",
        "--decoder-state",
        str(out / "decoder.safetensors"),
        "--out",
        str(tmp_path / "probe_sph"),
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "probe_sph" / "report.json").read_text())
    assert rep["norms"]["raw"]["cv"] < 1e-5 and rep["tokenizer"]["finetuned_decoder"]


def test_probe_cli_writes_report_and_figures(tmp_path) -> None:
    r = _run(
        "probe",
        "--split",
        "test",
        "--per-class",
        "2",
        "--num",
        "24",
        "--t-points",
        "5",
        "--max-pairs",
        "12",
        "--out",
        str(tmp_path),
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "report.json").read_text())
    assert set(rep["norms"]) == {"raw", "normalized", "gaussian_prior"}
    assert rep["paths"]["t"] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert max(rep["paths"]["slerp"]["radial_share"]) < 1e-10
    assert rep["swap"]["pairs"] == 12
    for name in ("norm_hist.png", "norm_along_t.png", "radial_share.png", "swap_distances.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "swap probe" in r.output


def test_extract_latents_with_dataset_stats(tmp_path) -> None:
    out = tmp_path / "c"
    r = _run("extract-latents", "--per-class", "2", "--no-flip", "--dataset-stats", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert (out / "latent_stats.json").is_file()
    z, _ = LatentCache(out).load_all()
    m = LatentCache(out).manifest
    assert m["normalization"]["kind"] == "dataset"
    # Per-channel statistics of the cached latents are (0, 1) by construction.
    per_channel = z.double().transpose(0, 1).reshape(z.shape[1], -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(16, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        per_channel.std(1, unbiased=False), torch.ones(16, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_finetune_decoder_rfid_with_a_stand_in_extractor(tmp_path, register_standin) -> None:
    """rFID plumbing, with a small registered feature extractor standing in for Inception (no weights here)."""
    register_standin("standin_c", pool=4, features=5)  # 4x4-pooled pixels, a fixed random projection to 5
    out = tmp_path / "ft"
    r = _run(
        "finetune-decoder",
        "--per-class",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--eval-items",
        "24",
        "--fid-extractor",
        "standin_c",
        "--out",
        str(out),
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["rfid_metric"] == "fd[standin_c]"
    vals = {k: m["rfid"] for k, m in rep["metrics"].items()}
    assert len(vals) == 3 and all(v >= 0 for v in vals.values())
    assert "rfd[standin_c]" in r.output
    r = CliRunner().invoke(
        main,
        [
            "finetune-decoder",
            "--per-class",
            "1",
            "--steps",
            "0",
            "--eval-items",
            "4",
            "--inception-weights",
            str(tmp_path / "nope.pth"),
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 1 and "nope.pth" in r.output


def test_probe_and_extract_on_an_image_folder_with_a_corrupt_file(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("n01", "n02"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 255, (40 + 7 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "img" / cls / f"{i}.JPEG")
    (tmp_path / "img" / "n02" / "9_bad.JPEG").write_bytes(b"not an image")
    r = CliRunner().invoke(
        main, ["probe", "--data", str(tmp_path / "img"), "--num", "7", "--t-points", "3", "--out", str(tmp_path / "p")]
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["skipped"] == 1 and rep["images"] == 6 and "9_bad.JPEG" in rep["skipped_items"][0]
    r = _run("extract-latents", "--data", str(tmp_path / "img"), "--out", str(tmp_path / "c"))
    assert r.exit_code == 0 and "12 latents" in r.output and "1 unreadable image(s) skipped" in r.output
    r = _run(
        "finetune-decoder",
        "--data",
        str(tmp_path / "img"),
        "--workers",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--eval-items",
        "7",
        "--out",
        str(tmp_path / "ft"),
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert rep["runs"]["projected"]["eval_items"] == 6 and (tmp_path / "ft" / "decoder.safetensors").is_file()
