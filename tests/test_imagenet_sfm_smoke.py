"""The ImageNet-256 recipe (experiments/imagenet_sfm) end to end at toy scale on CPU, through the user's CLI/configs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments" / "imagenet_sfm"
CLASSES = ("n00000001", "n00000002")


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


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
    prep = _load(EXP / "scripts" / "prepare_imagenet.py", "imagenet_sfm_prepare")
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


# ----------------------------------------------------------------------------- GPU check, CPU path
def test_gpu_check_shell_wrapper_runs_the_script(tmp_path: Path) -> None:
    # From an unrelated directory, without relying on an installed package: the wrapper sets PYTHONPATH itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        ["bash", str(EXP / "gpu_check.sh"), "--help"], capture_output=True, text=True, env=env, timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--cpu-smoke" in proc.stdout and "--peak-tflops" in proc.stdout


def test_gpu_check_cpu_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gc = _load(EXP / "gpu_check.py", "imagenet_sfm_gpu_check")
    out = tmp_path / "gpu_check.json"
    assert gc.main(["--cpu-smoke", "--out", str(out), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    assert report["mode"] == "cpu-smoke" and report["spec"]["sit"] == "SiT-Micro/2"
    # The FLUX.2-shaped VAE (32 latent channels) was saved, reloaded by path and encoded images with their flips.
    ext = report["extraction"]
    assert ext["latent_shape"] == [32, 16, 16] and ext["encodes_per_s_with_flips"] == pytest.approx(
        2 * ext["images_per_s"], rel=0.02
    )
    train = report["training"]
    for mode in ("linear", "spherical"):
        assert train[mode]["images_per_s"] > 0 and math.isfinite(train[mode]["final_loss"])
        assert train[mode]["step_s"] == pytest.approx(train["batch"] / train[mode]["images_per_s"], rel=0.01)
        assert report["sampling"][mode]["ode_images_per_s_fp32"] > 0
    assert train["spherical_over_linear_step_time"] == pytest.approx(
        train["spherical"]["step_s"] / train["linear"]["step_s"], rel=1e-3
    )
    # Spherical samples end on the token spheres (exp-map steps), to float32 accuracy.
    assert report["sampling"]["spherical"]["max_radius_error_fp32"] < 1e-5
    assert train["linear"]["mfu"] is None and report["peak_bf16_tflops"] is None  # no peak FLOPs known on a CPU


def test_gpu_check_peak_flops_lookup() -> None:
    import torch

    gc = _load(EXP / "gpu_check.py", "imagenet_sfm_gpu_check")
    assert gc.peak_flops(torch.device("cpu"), 100.0) == (100e12, "--peak-tflops")
    assert gc.peak_flops(torch.device("cpu"), None)[0] is None
    # MFU arithmetic: 3 x forward FLOPs x images/s over the peak; the FLOP count of SiT-B/2 on 32x32x32 latents.
    from manifold_fm.models.sit import build_sit, sit_forward_flops

    model = build_sit("SiT-B/2", input_size=32, in_channels=32, num_classes=1000, device="meta")
    assert sit_forward_flops(model) == pytest.approx(46.1e9, rel=0.01)
