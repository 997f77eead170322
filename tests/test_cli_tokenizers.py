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
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["probe", "--normalization", str(tmp_path / "missing.json"), "--out", str(tmp_path)])
    assert r.exit_code == 1 and "missing.json" in r.output
    r = CliRunner().invoke(main, ["finetune-decoder", "--lpips-vgg", "x.pth", "--out", str(tmp_path / "f")])
    assert r.exit_code == 1 and "both" in r.output


def test_finetune_decoder_cli_reports_three_decoders_on_held_out_images(tmp_path) -> None:
    """One decoder per run folder: the spherical one, the FT-vanilla control (--latents raw) in another, then the
    full side-by-side table from the finished spherical run with --resume --compare (which does not retrain it)."""
    from safetensors.torch import load_file

    from manifold_fm.training.checkpoint import load_checkpoint

    base = ["finetune-decoder", "--per-class", "1", "--steps", "2", "--batch-size", "4", "--eval-items", "8"]
    sph, raw = tmp_path / "sph", tmp_path / "raw"
    r = _run(*base, "--gan-start", "0", "--out", str(sph))
    assert r.exit_code == 0, r.output
    assert list(json.loads((sph / "report.json").read_text())["reconstruction"]) == ["original", "spherical"]
    r = _run(*base, "--gan-start", "0", "--latents", "raw", "--out", str(raw))
    assert r.exit_code == 0, r.output
    trained = load_file(str(sph / "decoder.safetensors"))
    refused = CliRunner().invoke(main, [*base, "--gan-start", "0", "--out", str(sph)])
    assert refused.exit_code == 1 and "pass --resume" in refused.output
    r = _run(*base, "--gan-start", "0", "--out", str(sph), "--resume", "--compare", str(raw))
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(sph / "checkpoints")  # not retrained: still the first run's only checkpoint
    assert ckpt.step == 2 and ckpt.meta["sessions"] == [{"start": 0, "steps": 2}]
    assert all(torch.equal(v, load_file(str(sph / "decoder.safetensors"))[k]) for k, v in trained.items())
    rep = json.loads((sph / "report.json").read_text())
    assert rep["eval"] == {"source": "built-in test split", "images": 8, "skipped": 0}
    assert list(rep["reconstruction"]) == ["original", "ft_vanilla", "spherical"]
    assert set(rep["metrics"]) == {
        f"{d}_decoder/{z}"
        for d in ("original", "ft_vanilla", "spherical")
        for z in ("raw_latents", "projected_latents")
    }
    # The paper's table reads each decoder on its own latents; the swap control holds the same latents fixed.
    assert rep["reconstruction"]["spherical"] == rep["metrics"]["spherical_decoder/projected_latents"]
    assert rep["reconstruction"]["ft_vanilla"] == rep["swap_control"]["raw_latents"]["ft_vanilla"]
    assert set(rep["swap_control"]["projected_latents"]) == {"original", "ft_vanilla", "spherical"}
    assert rep["perceptual_metric"] == "fallback:grad-pyramid-l1" and rep["rfid_metric"] is None
    disc = rep["runs"]["spherical"]["discriminator"]
    assert disc["layers"] == 3 and disc["base_channels"] == 64 and disc["parameters"] == 2_765_633
    assert rep["runs"]["ft_vanilla"]["project"] is False and rep["runs"]["spherical"]["gan_start"] == 0
    assert rep["decoders"]["ft_vanilla"] == str(raw / "decoder.safetensors")
    for folder in (sph, raw):
        for f in ("decoder", "discriminator"):
            assert (folder / f"{f}.safetensors").is_file(), (folder, f)
    assert "decoder-swap control" in r.output and not any(p.name.startswith(".rfid") for p in sph.iterdir())
    for args, needle, code in [
        (["--resume", "--out", str(tmp_path / "empty")], "holds no finetune run", 2),
        (["--compare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")], "holds no finished finetune", 2),
        (["--compare", f"spherical={raw}", "--out", str(tmp_path / "c")], "named 'spherical'", 2),
    ]:
        bad = CliRunner().invoke(main, [*base, *args])
        assert bad.exit_code == code and needle in bad.output and "Traceback" not in bad.output, (args, bad.output)
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
        str(sph / "decoder.safetensors"),
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
        "--anchors",
        "12",
        "--pairs",
        "50",
        "--out",
        str(tmp_path),
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "report.json").read_text())
    assert set(rep["norms"]) == {"raw", "normalized", "gaussian_prior"}
    assert rep["paths"]["t"] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert max(rep["paths"]["slerp"]["radial_share"]) < 1e-10
    assert rep["swap"]["pairs"] == rep["swap"]["anchors"] == 12
    sd = rep["shell_deviation"]  # 50 (prior, data) pairs over 24 images: images reused with fresh prior samples
    assert sd["pairs"] == 50 and sd["mean"] == pytest.approx(rep["paths"]["linear"]["shell_deviation"])
    assert sd["mean"][0] < sd["max"][0] and sd["peak_mean"] == max(sd["mean"])
    for name in ("norm_hist.png", "norm_along_t.png", "radial_share.png", "shell_deviation.png", "swap_distances.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "swap probe over 12 anchors" in r.output and "sigma from the nearest endpoint shell" in r.output


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
    """rFID plumbing, with a small registered feature extractor standing in for Inception (no weights here); the
    original decoder's value is recomputed from scratch (features, Gaussian fit, Frechet distance in numpy/scipy)."""
    import numpy as np
    from scipy import linalg

    from manifold_fm.data.builtin_images import BuiltinImages
    from manifold_fm.tokenizers import builtin_tokenizer
    from manifold_fm.tokenizers.finetune import spread_indices

    cls = register_standin("standin_c", pool=4, features=5)  # 4x4-pooled pixels, a fixed random projection to 5
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
    assert rep["rfid_metric"] == "fd[standin_c]" and rep["rfid_images"] == 24
    vals = {k: m["rfid"] for k, m in rep["metrics"].items()}
    assert len(vals) == 4 and all(v >= 0 for v in vals.values())  # original + spherical, raw + projected latents
    assert "rfd[standin_c]" in r.output
    # Independent recomputation for the original decoder on raw latents.
    test = BuiltinImages("test", size=32)
    x = test.render(spread_indices(len(test), 24))[0]
    tok = builtin_tokenizer()
    with torch.no_grad():
        rec = tok.decode_raw(tok.encode_raw(x))
    extractor = cls("standin_c", ["pool"])

    def feats(images: torch.Tensor) -> np.ndarray:
        u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return extractor(u8)[0].double().numpy()

    f1, f2 = feats(rec), feats(x)
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    assert vals["original_decoder/raw_latents"] == pytest.approx(fd, rel=1e-3, abs=1e-6)
    r = CliRunner().invoke(
        main,
        [
            "finetune-decoder",
            "--per-class",
            "1",
            "--steps",
            "0",
            "--batch-size",
            "4",
            "--eval-items",
            "4",
            "--inception-weights",
            str(tmp_path / "nope.pth"),
            "--out",
            str(tmp_path / "nope"),
        ],
    )
    assert r.exit_code == 1 and "nope.pth" in r.output


def test_finetune_decoder_length_discriminator_checkpoint_and_errors(tmp_path) -> None:
    from manifold_fm.tokenizers.discriminator import NLayerDiscriminator

    torch.manual_seed(0)
    d0 = NLayerDiscriminator(3, 8, 2)
    ckpt = {"state_dict": {f"loss.discriminator.{k}": v for k, v in d0.state_dict().items()}}
    torch.save(ckpt, tmp_path / "ae.ckpt")
    out = tmp_path / "ft"
    base = ["finetune-decoder", "--per-class", "1", "--batch-size", "4", "--eval-items", "4"]
    r = _run(*base, "--epochs", "2", "--disc-ckpt", str(tmp_path / "ae.ckpt"), "--out", str(out))
    assert r.exit_code == 0, r.output
    run = json.loads((out / "report.json").read_text())["runs"]["spherical"]
    assert run["steps"] == 6 and run["epochs"] == pytest.approx(2.0)  # ceil(2 * 12 / 4)
    assert run["disc_init"] == str(tmp_path / "ae.ckpt") and run["gan_start"] == 0
    assert run["discriminator"]["layers"] == 2 and run["discriminator"]["base_channels"] == 8
    from safetensors.torch import load_file

    trained = load_file(str(out / "discriminator.safetensors"))
    assert not torch.equal(trained["main.0.weight"], d0.state_dict()["main.0.weight"])  # it trained
    for args, needle in [
        (["--steps", "2", "--epochs", "1"], "not both"),
        (["--steps", "1", "--disc-ckpt", str(tmp_path / "none.ckpt")], "none.ckpt does not exist"),
        (["--steps", "1", "--disc-ckpt", str(tmp_path / "ae.ckpt"), "--disc-layers", "3"], "layers 3"),
        (["--steps", "1", "--eval-data", str(tmp_path / "nowhere")], "--eval-data"),
    ]:
        r = CliRunner().invoke(main, [*base, *args, "--out", str(tmp_path / "bad")])
        assert r.exit_code in (1, 2) and needle in r.output and "Traceback" not in r.output, (args, r.output)


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
        "--eval-data",
        str(tmp_path / "img"),
        "--eval-items",
        "7",
        "--out",
        str(tmp_path / "ft"),
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert (
        rep["eval"]["images"] == 6
        and rep["eval"]["skipped"] == 1
        and (tmp_path / "ft" / "decoder.safetensors").is_file()
    )
    # Without --eval-data a folder's held-out images are carved out of it and left out of training.
    r = _run(
        "finetune-decoder",
        "--data",
        str(tmp_path / "img"),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--eval-items",
        "3",
        "--out",
        str(tmp_path / "ft2"),
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "ft2" / "report.json").read_text())
    assert rep["eval"]["source"].startswith("3 images held out") and rep["runs"]["spherical"]["dataset_size"] == 4
