"""The ImageNet-256 recipe (experiments/imagenet_sfm) end to end at toy scale on CPU, through the user's CLI/configs."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import cpu_env, load_script, require_flux2_vae

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments" / "imagenet_sfm"
CLASSES = ("n00000001", "n00000002")


def reference_center_crop(pil: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's ``center_crop_arr``, transcribed independently of the project's implementation."""
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.array(pil)
    crop_y = (arr.shape[0] - size) // 2
    crop_x = (arr.shape[1] - size) // 2
    return arr[crop_y : crop_y + size, crop_x : crop_x + size]


def write_fake_imagenet(root: Path, per_class: int = 4, corrupt: bool = False) -> dict[str, Image.Image]:
    """Two class folders of generated images of assorted sizes/modes (class 0: warm, class 1: cool stripes)."""
    rng = np.random.default_rng(0)
    written = {}
    sizes = [(48, 40), (40, 64), (130, 70), (33, 33), (96, 100), (70, 200)]
    for k, wnid in enumerate(CLASSES):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[(i + k) % len(sizes)]
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * (3 + i)) % 256, (yy * (2 + k)) % 256, ((xx + yy) * 5) % 256], -1)
            if k == 1:
                base = base[..., ::-1]
            arr = np.clip(base + rng.integers(0, 30, base.shape), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            if i == 1:
                img = img.convert("L")  # a greyscale file: must come out RGB
            name = f"{wnid}_{i}.JPEG" if i % 2 == 0 else f"{wnid}_{i}.png"
            img.save(root / wnid / name, **({"quality": 95} if name.endswith("JPEG") else {}))
            written[f"{wnid}/{Path(name).stem}"] = Image.open(root / wnid / name)
    if corrupt:
        (root / CLASSES[0] / "broken.JPEG").write_bytes(b"not a jpeg at all")
    return written


# ----------------------------------------------------------------------------- data preparation
def test_prepare_imagenet_matches_adm_center_crop_and_reports_skips(tmp_path: Path) -> None:
    prep = load_script(EXP / "scripts" / "prepare_imagenet.py", "imagenet_sfm_prepare")
    src, dst = tmp_path / "train", tmp_path / "out"
    originals = write_fake_imagenet(src, per_class=3, corrupt=True)
    assert prep.main(["--src", str(src), "--dst", str(dst), "--size", "32", "--workers", "1", "--no-progress"]) == 0
    report = json.loads((dst / "prepare_report.json").read_text())
    assert (report["images"], report["written"], report["skipped"], report["classes"]) == (7, 6, 1, 2)
    assert report["skipped_files"][0]["file"].endswith("broken.JPEG")
    for key, pil in originals.items():
        out = np.asarray(Image.open(dst / f"{key}.png"))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, reference_center_crop(pil.convert("RGB"), 32))
    # Resuming writes nothing new; a threshold below the skip count fails the run.
    again = prep.prepare(src, dst, size=32, workers=2, progress=False)
    assert (again["written"], again["existing"], again["skipped"]) == (0, 6, 1)
    assert prep.main(["--src", str(src), "--dst", str(dst), "--size", "32", "--max-skipped", "0", "--no-progress"]) == 1
    assert prep.main(["--src", str(tmp_path / "missing"), "--dst", str(dst), "--no-progress"]) == 2


# ----------------------------------------------------------------------------- the whole recipe at toy scale
def _frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to feature rows ``a`` and ``b``, from scipy's sqrtm in float64."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def _tiny_flux2_vae(path: Path) -> None:
    """A randomly initialised AutoencoderKLFlux2 with FLUX.2's block types, 8 latent channels and f=4."""
    import torch

    AutoencoderKLFlux2 = require_flux2_vae()
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(path)


def test_recipe_end_to_end_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, register_standin: Callable[..., type]
) -> None:
    """README steps 1-5 with the grid's FLUX.2 B/2 pair, shrunk only by command-line options and --set."""
    require_flux2_vae()  # before any work: the recipe's tokenizer is FLUX.2's VAE
    import torch
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from manifold_fm.cli import main
    from manifold_fm.data.latents import LatentCache

    monkeypatch.chdir(tmp_path)  # the configs' relative paths (weights/, data/, runs/) resolve here, as for a user
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    # 1. data: fake ImageNet -> ADM centre crop
    write_fake_imagenet(tmp_path / "imagenet" / "train", per_class=4)
    prep = load_script(EXP / "scripts" / "prepare_imagenet.py", "imagenet_sfm_prepare")
    assert prep.main(["--src", "imagenet/train", "--dst", "data/imagenet256", "--size", "32", "--no-progress"]) == 0
    # 0. weights: a tiny FLUX.2-class VAE in diffusers format, loaded by path from here on
    _tiny_flux2_vae(tmp_path / "weights" / "flux2-vae")
    vae = ["--tokenizer", "weights/flux2-vae", "--kind", "flux2"]
    data = ["--data", "data/imagenet256", "--size", "32"]

    # 2. decoder finetuning for projected latents, the FT-vanilla control in its own folder, and the side-by-side
    #    reconstruction report (the control's run compares the finished spherical one)
    ft = ["--steps", "2", "--batch-size", "4", "--gan-start", "1", "--eval-items", "4"]
    cli("finetune-decoder", *vae, *data, *ft, "--out", "runs/decoders/flux2")
    cli(
        "finetune-decoder",
        *vae,
        *data,
        *ft,
        "--latents",
        "raw",
        "--out",
        "runs/decoders/flux2-raw",
        "--compare",
        "runs/decoders/flux2",
    )
    report = json.loads((tmp_path / "runs/decoders/flux2-raw/report.json").read_text())
    assert list(report["reconstruction"]) == ["original", "ft_vanilla", "spherical"]
    assert len(report["metrics"]) == 6 and all(math.isfinite(m["psnr"]) for m in report["metrics"].values())
    assert load_file("runs/decoders/flux2/decoder.safetensors")

    # 3. one latent cache with horizontal flips (the tokenizer's own batch-norm normalisation) serves both runs
    cli("extract-latents", *vae, *data, "--out", "data/latents/flux2", "--batch-size", "4")
    plain = LatentCache("data/latents/flux2")
    assert len(plain) == 2 * 8 and not plain.spherical  # 8 images, each with its flip
    # what a spherical run trains on (the cache denormalised, then projected) is SphericalTokenizer.encode's output
    from manifold_fm.data.image_folder import image_dataset
    from manifold_fm.tokenizers import SphericalTokenizer, load_tokenizer
    from manifold_fm.training.builders import preset_flow

    z = preset_flow("spherical", 8).prepare_data(LatentCache("data/latents/flux2", raw=True)[0][0][None])[0]
    assert z.shape == (8, 8, 8)
    first = image_dataset("data/imagenet256", size=32)[0][0][None]
    with torch.no_grad():
        expected = SphericalTokenizer(load_tokenizer("weights/flux2-vae", kind="flux2")).encode(first)[0]
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z.norm(dim=0), torch.full((8, 8), math.sqrt(8.0)), rtol=1e-5, atol=1e-5)

    # 4. training: the grid's FLUX.2 B/2 pair, same CLI, shrunk with --set
    shrink = [
        "model.arch=SiT-Micro/2",
        "train.steps=2",
        "train.batch_size=4",
        "train.mixed_precision='no'",
        "train.checkpoint_every=2",
        "train.sample_every=2",
        "train.log_every=1",
        "data.num_workers=0",
        "sample.steps=2",
    ]
    runs = {}
    for mode in ("linear", "spherical"):
        name = f"flux2-B2-{mode}-80ep"
        sets = [x for s in shrink for x in ("--set", s)]
        cli("train", "--config", str(EXP / "configs" / f"{name}.yaml"), "--out", f"runs/{name}", *sets)
        runs[mode] = tmp_path / "runs" / name
        assert (runs[mode] / "checkpoints" / "latest").is_file()
        assert list((runs[mode] / "samples").glob("step_*.png"))

    # 5. sampling in the ADM layout (classes cycle, so every class equally often) and evaluation
    # In place of Inception: per-channel means (FD features, float64) and 4 logits (IS) through a fixed matrix.
    extractor = "imagenet-sfm-test-standin"
    w = [[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, -1.0, 0.5], [2.0, 0.0, 1.0, -1.0]]
    register_standin(extractor, pool=1, logits=w, dtype=torch.float64)
    ref_images = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "data/imagenet256").rglob("*.png"))])
    ref_feats = ref_images.reshape(len(ref_images), -1, 3).astype(np.float64).mean(1) / 255.0
    np.savez(tmp_path / "ref_stats.npz", mu=ref_feats.mean(0), sigma=np.cov(ref_feats, rowvar=False))
    for run in runs.values():
        out = run / "fid8-cfg1.5"
        cli(
            "sample",
            str(run),
            "--num",
            "8",
            "--cfg-scale",
            "1.5",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--device",
            "cpu",
        )
        with np.load(out / "samples.npz") as npz:
            images, labels = npz["arr_0"], npz["arr_1"].reshape(-1)
        assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
        assert np.bincount(labels, minlength=2).tolist() == [4, 4]
        cli(
            "evaluate",
            str(out / "samples.npz"),
            "--reference",
            "ref_stats.npz",
            "--feature-extractor",
            extractor,
            "--no-prc",
            "--batch-size",
            "4",
            "--out",
            str(out / "metrics.json"),
        )
        metrics = json.loads((out / "metrics.json").read_text())
        feats = images.reshape(8, -1, 3).astype(np.float64).mean(1) / 255.0
        assert metrics[f"fd[{extractor}]"] == pytest.approx(_frechet_reference(feats, ref_feats), rel=1e-6, abs=1e-9)
        assert "fid" not in metrics  # a stand-in's distance is never called FID
        assert math.isfinite(metrics["inception_score_mean"])


# ----------------------------------------------------------------------------- launch scripts (launcher stubbed)
def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def _calls(log: Path) -> list[list[str]]:
    return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_train_script_builds_the_accelerate_command(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    stub = _stub(tmp_path / "accelerate", f'printf "%q " "$@" >> {log}; echo >> {log}\n')
    script = str(EXP / "scripts" / "train.sh")
    base = {"ACCELERATE": str(stub), "GPUS_PER_NODE": "1"}
    config = str((EXP / "configs" / "flux2-B2-spherical-80ep.yaml").resolve())

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", script, *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=cpu_env(**{**base, **env}),
            timeout=60,
        )

    assert run("flux2-B2-spherical-80ep", "--set", "train.compile=true").returncode == 0
    assert _calls(log)[-1] == [
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "-m",
        "manifold_fm.cli",
        "train",
        "--config",
        config,
        "--out",
        "runs/flux2-B2-spherical-80ep",
        "--set",
        "train.compile=true",
    ]
    # Many nodes: one process per GPU on every node, rendezvous at node 0; a checkpoint present -> --resume.
    (tmp_path / "runs" / "flux2-B2-spherical-80ep" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "flux2-B2-spherical-80ep" / "checkpoints" / "latest").write_text("step_00000010")
    assert run(config, NNODES="4", NODE_RANK="2", MASTER_ADDR="node0", GPUS_PER_NODE="8").returncode == 0
    call = _calls(log)[-1]
    assert call[:13] == [
        "launch",
        "--num_processes",
        "32",
        "--num_machines",
        "4",
        "--machine_rank",
        "2",
        "--multi_gpu",
        "--main_process_ip",
        "node0",
        "--main_process_port",
        "29500",
        "-m",
    ]
    assert call[-1] == "--resume" and call[call.index("--config") + 1] == config
    bad = run("flux2-B3-spherical")
    assert bad.returncode == 2 and "flux2-B2-spherical-80ep" in bad.stderr and len(_calls(log)) == 2
    # GPUS_PER_NODE unset: the GPUs are counted by $PYTHON (default python3: the GPU image has no `python`)
    count = _stub(tmp_path / "python-stub", "echo 3\n")
    base.pop("GPUS_PER_NODE")
    proc = subprocess.run(["bash", script, config], capture_output=True, text=True, cwd=tmp_path,
                          env=cpu_env(drop=("GPUS_PER_NODE",), PYTHON=str(count), **base), timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert _calls(log)[-1][:3] == ["launch", "--num_processes", "3"] and "--multi_gpu" in _calls(log)[-1]


def test_launch_scripts_never_call_a_bare_python() -> None:
    """The scripts run Python as $PYTHON (default python3), never as `python`, which the GPU image lacks."""
    import re

    for script in sorted((EXP / "scripts").glob("*.sh")) + [EXP / "gpu_check.sh"]:
        code = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
        bare = [line for line in code if re.search(r"""(^|[\s"'(:-])python(\s|$|")""", line.split("#")[0])]
        assert not bare, (script.name, bare)


def test_sample_eval_script_samples_each_scale_then_evaluates(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    accelerate = _stub(tmp_path / "accelerate", f'printf "%q " "$@" >> {log}; echo >> {log}\n')
    # The CLI stub records the call and, for evaluate, writes a metrics file where --out points.
    cli = _stub(
        tmp_path / "mfm",
        f'printf "%q " "$@" >> {log}; echo >> {log}\n'
        "while [[ $# -gt 0 ]]; do if [[ $1 == --out ]]; then "
        'mkdir -p "$(dirname "$2")"; echo \'{"fid": 12.5, "inception_score_mean": 101.25}\' > "$2"; fi; '
        "shift; done\n",
    )
    run_dir, ref, weights = tmp_path / "runs" / "r", tmp_path / "ref.npz", tmp_path / "inception.pth"
    run_dir.mkdir(parents=True)
    ref.write_bytes(b"x")
    weights.write_bytes(b"x")
    (run_dir / "fid50000-cfg2.0").mkdir()
    (run_dir / "fid50000-cfg2.0" / "samples.npz").write_bytes(b"x")  # already sampled: reused, not redone
    env = {
        "ACCELERATE": str(accelerate),
        "MANIFOLD_FM": str(cli),
        "GPUS_PER_NODE": "8",
        "STEPS": "100",
        "SCALES": "1.5 2.0",
    }
    proc = subprocess.run(
        ["bash", str(EXP / "scripts" / "sample_eval.sh"), str(run_dir), str(ref), str(weights)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cpu_env(**env),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    calls = _calls(log)
    assert [c[0] for c in calls] == ["launch", "evaluate", "evaluate"]
    out = f"{run_dir}/fid50000-cfg1.5"
    assert calls[0] == [
        "launch",
        "--num_processes",
        "8",
        "--multi_gpu",
        "-m",
        "manifold_fm.cli",
        "sample",
        str(run_dir),
        "--num",
        "50000",
        "--cfg-scale",
        "1.5",
        "--batch-size",
        "125",
        "--seed",
        "0",
        "--out",
        out,
        "--steps",
        "100",
    ]
    assert calls[1] == [
        "evaluate",
        f"{out}/samples.npz",
        "--reference",
        str(ref),
        "--inception-weights",
        str(weights),
        "--no-prc",
        "--out",
        f"{out}/metrics.json",
    ]
    assert "| r | 1.5 | 12.50 | 101.25 |" in proc.stdout and "| r | 2.0 | 12.50 | 101.25 |" in proc.stdout
    # Node 1 of 2: samples its share of every scale (rendezvous at node 0), never evaluates.
    log.unlink()
    env2 = {**env, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "SCALES": "1.0"}
    proc = subprocess.run(
        ["bash", str(EXP / "scripts" / "sample_eval.sh"), str(run_dir), str(ref), str(weights)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cpu_env(**env2),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    calls = _calls(log)
    assert len(calls) == 1 and calls[0][:13] == [
        "launch",
        "--num_processes",
        "16",
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "node0",
        "--main_process_port",
        "29500",
        "--multi_gpu",
        "-m",
    ]
    missing = subprocess.run(
        ["bash", str(EXP / "scripts" / "sample_eval.sh"), str(run_dir), "nope.npz", str(weights)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cpu_env(**env),
        timeout=60,
    )
    assert missing.returncode == 2 and "nope.npz does not exist" in missing.stderr
    # Without MANIFOLD_FM and GPUS_PER_NODE: $PYTHON counts the GPUs and runs the CLI and the table; PRECISION goes to
    # sample, EVAL_ARGS to evaluate.
    python = _stub(
        tmp_path / "python-stub",
        f'if [[ $1 == -c ]]; then echo 2; exit 0; fi\nprintf "%q " "$@" >> {log}; echo >> {log}\n',
    )
    log.unlink()
    env3 = {**env, "SCALES": "1.0", "PYTHON": str(python), "PRECISION": "fp32", "EVAL_ARGS": "--precision bf16"}
    del env3["MANIFOLD_FM"], env3["GPUS_PER_NODE"]
    proc = subprocess.run(
        ["bash", str(EXP / "scripts" / "sample_eval.sh"), str(run_dir), str(ref), str(weights)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cpu_env(drop=("MANIFOLD_FM", "GPUS_PER_NODE"), **env3),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    sample, evaluate, table = _calls(log)
    assert sample[:5] == ["launch", "--num_processes", "2", "--multi_gpu", "-m"]
    assert sample[-4:] == ["--steps", "100", "--precision", "fp32"]
    assert evaluate[:3] == ["-m", "manifold_fm.cli", "evaluate"] and evaluate[-2:] == ["--precision", "bf16"]
    assert table == ["-", str(run_dir), "50000", "1.0"]


# ----------------------------------------------------------------------------- per-channel latent statistics
def test_latent_stats_bakes_dataset_standardisation_into_a_vae_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from diffusers import AutoencoderKL

    from manifold_fm.data.image_folder import ImageFolderDataset
    from manifold_fm.tokenizers import DiffusersTokenizer

    stats = load_script(EXP / "scripts" / "latent_stats.py", "imagenet_sfm_latent_stats")
    assert stats.even_indices(10, 4) == [0, 2, 5, 7] and stats.even_indices(3, 8) == [0, 1, 2]
    write_fake_imagenet(tmp_path / "raw", per_class=3)
    prep = load_script(EXP / "scripts" / "prepare_imagenet.py", "imagenet_sfm_prepare")
    assert (
        prep.main(["--src", str(tmp_path / "raw"), "--dst", str(tmp_path / "img"), "--size", "16", "--no-progress"])
        == 0
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "vae-stats"
    args = [
        "--vae",
        str(tmp_path / "vae"),
        "--data",
        str(tmp_path / "img"),
        "--out",
        str(out),
        "--size",
        "16",
        "--max-items",
        "100",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert stats.main(args) == 0

    # Reference: every image's posterior mode in float64, per-channel mean and (population) std over all positions.
    images = torch.stack([img for img, _ in ImageFolderDataset(tmp_path / "img", size=16)])
    with torch.no_grad():
        z = vae.double().encode(images.double()).latent_dist.mode()
    zc = z.transpose(0, 1).reshape(4, -1)
    config = json.loads((out / "config.json").read_text())
    np.testing.assert_allclose(config["latents_mean"], zc.mean(1).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(config["latents_std"], zc.std(1, unbiased=False).numpy(), rtol=1e-4, atol=1e-6)
    assert config["scaling_factor"] == 1.0 and config["shift_factor"] is None
    assert (out / "diffusion_pytorch_model.safetensors").is_symlink() and (out / "latent_stats.json").is_file()
    # Loaded from the derived folder, the tokenizer's own normalisation now standardises every channel.
    tok = DiffusersTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        y = tok.encode(images).double().transpose(0, 1).reshape(4, -1)
    np.testing.assert_allclose(y.mean(1).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.std(1, unbiased=False).numpy(), 1.0, atol=1e-4)
    # FLUX.2 folders normalise with their own batch-norm statistics: refused with a one-line reason.
    flux = tmp_path / "flux2"
    _tiny_flux2_vae(flux)
    assert stats.main([*args[:1], str(flux), *args[2:5], str(tmp_path / "x"), *args[6:]]) == 2
    assert "AutoencoderKLFlux2" in capsys.readouterr().err and not (tmp_path / "x").exists()
