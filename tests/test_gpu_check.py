"""The GPU check of the ImageNet recipe (experiments/imagenet_sfm/gpu_check.py) in its CPU mode, its runner (time
slices, failures, child processes), its recipe estimate, and the wheels script that equips the GPU machine."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import cpu_env, load_script, require_flux2_vae

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments" / "imagenet_sfm"


@pytest.fixture(scope="module")
def gc() -> Any:
    return load_script(EXP / "gpu_check.py", "imagenet_sfm_gpu_check")


def _rate(units: float, t1: float, t2: float) -> Any:
    """What the check must report for ``units`` more work taking ``t2 - t1`` longer: the rate, or None when the
    larger run was not slower (timing noise on a busy CPU)."""
    return pytest.approx(units / (t2 - t1), rel=1e-3) if t2 > t1 else None


# ----------------------------------------------------------------------------- the CPU mode, every stage
def test_gpu_check_cpu_mode_runs_every_stage(gc: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_flux2_vae()
    out = tmp_path / "report.json"
    assert gc.main(["--cpu", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    st = report["stages"]
    assert {k: v["status"] for k, v in st.items()} == {
        **dict.fromkeys(["wheels", "data", "weights", "extract", "finetune", "train", "train_fid"], "pass"),
        **dict.fromkeys(["sample", "evaluate"], "pass"),
        "multiprocess": "skipped",  # GPU mode only
    }
    assert report["mode"] == "cpu" and report["failed"] == [] and report["estimate_80ep_B2_pair"] is None
    spec = gc.CPU
    # data: the synthetic JPEGs went through prepare_imagenet.py; the folders hold N1 and N2 images
    assert st["data"]["prepared"]["written"] == spec.classes * spec.raw_per_class
    work = tmp_path / "work"
    assert len(list((work / "imagenet256").rglob("*.png"))) == spec.images
    assert len(list((work / "imagenet256-small").rglob("*.png"))) == spec.images_small
    # extract-latents: each image and its flip, FLUX.2's 32 channels; the rate is the two-size difference
    ext = st["extract"]
    assert ext["latents"] == {"count": 2 * spec.images, "shape": [32, 16, 16], "dtype": "bfloat16"}
    t1, t2 = ext["run_s"][str(spec.images_small)], ext["run_s"][str(spec.images)]
    assert ext["images_per_s"] == _rate(spec.images - spec.images_small, t1, t2)
    # finetune-decoder, killed (SIGKILL) while writing checkpoint 2 and resumed: the run's own record shows the second
    # session starting at checkpoint 1 (the last complete one) and running only the remaining steps
    ft, steps = st["finetune"], spec.finetune_steps
    assert spec.finetune_checkpoint_every == 1 and steps == 3
    kr = ft["kill_resume"]
    assert kr["killed_in_checkpoint"] == 2 and kr["at_kill"]["latest"] == "step_00000001"
    assert kr["at_kill"]["sessions"] == [{"start": 0, "steps": 1}]
    assert len(kr["at_kill"]["half_written"]) == 1 and kr["at_kill"]["half_written"][0].startswith("step_00000002.tmp-")
    run = work / "decoders" / "flux2"
    meta = json.loads((run / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["sessions"] == kr["sessions"] == [{"start": 0, "steps": 1}, {"start": 1, "steps": 2}]
    assert not list((run / "checkpoints").glob("*.tmp-*")) and (run / "decoder.safetensors").is_file()
    # its rate: the logged windows but each session's first (step 1: the first session's, step 2: the resumed one's)
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3]
    assert ft["images_per_s"] == pytest.approx(rows[3]["samples_per_s"], abs=1e-4)
    # training: the grid's configs on the latent cache, four runs, the trainer's own rates
    tr = st["train"]
    for run in ("linear-b4", "spherical-b4", "linear-b2", "spherical-b2"):
        assert tr[run]["images_per_s"] > 0 and tr[run]["mfu"] is None  # no peak FLOPs known on a CPU
        config = (work / "runs" / run / "config.yaml").read_text()
        assert "source: latents" in config and str(work / "latents" / "flux2") in config
    assert tr["spherical_over_linear_step_time_b4"] == pytest.approx(
        tr["spherical-b4"]["step_s"] / tr["linear-b4"]["step_s"], rel=1e-3
    )
    # FID over training through the run's eval hook (the stand-in network under Inception's name)
    assert math.isfinite(st["train_fid"]["evaluation"]["fid"])
    # sample: the ADM .npz, the cost fit per precision, and samples of trained weights on the spheres in bf16 and fp32
    smp = st["sample"]
    assert smp["npz"] == {"arr_0": [2 * spec.sample_batch, 32, 32, 3], "dtype": "uint8", "arr_1": [4]}
    a, b = spec.sample_steps
    for precision in ("fp32", "bf16"):
        info = json.loads((work / "samples" / f"{precision}-a" / "sample_info.json").read_text())
        assert info["precision"] == precision  # sample --precision, as recorded by the command
        secs = smp[precision]["run_s"]
        t_a, t_b = secs[f"2x{a}"], secs[f"2x{b}"]
        expected_ms = 1e3 * (t_b - t_a) / ((b - a) * spec.sample_batch) if t_b > t_a else None
        ms = expected_ms and pytest.approx(expected_ms, rel=1e-3, abs=1e-4)  # reported to 4 decimals
        assert smp[precision]["step_ms_per_image"] == ms
    for precision in ("bf16", "fp32"):
        check = smp["on_sphere"][precision]
        assert check["max_radius_error"] < 1e-5 and check["velocity_rms_t0"] > 1e-4  # not a zero output layer
    # the library's bf16 took effect (the same network and input give another output than in fp32)
    assert smp["on_sphere"]["bf16"]["velocity_rms_t0"] != smp["on_sphere"]["fp32"]["velocity_rms_t0"]
    ev = st["evaluate"]
    assert ev["num_samples"] == 2 * spec.sample_batch and "fid" in ev["metrics"] and ev["precision"] == "bf16"
    assert set(ev["inception_images_per_s"]) == {"fp32", "bf16"}
    assert "pending" not in report and not any("pending" in str(v) for v in st.values())
    # the README rows of this report: one per figure it holds (a timing fit lost in a busy CPU's noise has none),
    # five columns, marked as no measurement
    assert gc.main(["--rows", str(out)]) == 0
    rows = capsys.readouterr().out.splitlines()
    s = report["summary"]
    figures = [s["extract_images_per_s"], s["finetune_images_per_s"], *s["train_images_per_s"].values()]
    figures += [s["spherical_over_linear_step_time"], *s["sample_images_per_s_250_steps"].values()]
    assert s["finetune_images_per_s"] == ft["images_per_s"] and None not in s["train_images_per_s"].values()
    assert len(rows) == sum(f is not None for f in figures) >= 6
    assert all(r.count(" | ") == 4 and "cpu mode: not a measurement" in r for r in rows)
    # a second try of some stages on the kept work folder (the README's retry): each starts from nothing, so the
    # training runs are not refused (their folders hold runs) and the timed runs time work, not resumed caches
    again = tmp_path / "again.json"
    only = "extract,train,sample"
    caches = {p: p.stat().st_mtime_ns for p in (work / "latents").rglob("*.safetensors")}
    assert gc.main(["--cpu", "--out", str(again), "--work", str(work), "--only", only]) == 0
    st2 = json.loads(again.read_text())["stages"]
    assert [k for k, v in st2.items() if v["status"] == "pass"] == ["wheels", *only.split(",")]
    assert st2["extract"]["latents"] == ext["latents"] and set(st2["train"]) >= {"linear-b4", "spherical-b2"}
    rewritten = {p: p.stat().st_mtime_ns for p in (work / "latents").rglob("*.safetensors")}
    assert rewritten.keys() == caches.keys() and all(rewritten[p] != t for p, t in caches.items())


def test_gpu_check_finetune_stage_starts_from_nothing(gc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second try of the finetune stage on a kept work folder (--only finetune): the run folder and the pause
    marker of the first try are gone before the run starts (the command would refuse a folder that holds a run, and
    an existing marker would let the run finish unpaused), and the run is killed in checkpoint 2C."""
    out = tmp_path / "decoders" / "flux2"
    (out / "checkpoints" / "step_00000003").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000003\n")
    marker = tmp_path / "finetune-paused-in-checkpoint"
    marker.write_text("old")
    seen = {}

    def kill_when_ready(cmd, ready, timeout, env):  # noqa: ANN001, ANN202
        seen.update(out_exists=out.exists(), marker_exists=marker.exists(), ready=ready(), pause=env[PAUSE])
        raise gc.StageError("stop here")

    PAUSE = "MANIFOLD_FM_TEST_PAUSE_IN_CHECKPOINT"
    monkeypatch.setattr(gc, "kill_when_ready", kill_when_ready)
    ctx = gc.Context(gc.CPU, tmp_path, gc.Record(tmp_path / "stages" / "finetune.json"), time.time() + 60)
    with pytest.raises(gc.StageError, match="stop here"):
        gc.stage_finetune(ctx)
    assert seen == {"out_exists": False, "marker_exists": False, "ready": False, "pause": f"{marker}:2"}


# ----------------------------------------------------------------------------- the runner
def test_gpu_check_runner_reports_failures_and_continues(
    gc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing stage is reported with its error line; stages that do not need it still run, the others are
    skipped with the reason; the exit status says a stage failed."""

    def broken(ctx: Any) -> None:
        ctx.record["partial"] = 1.5
        raise RuntimeError("CUDA out of memory (simulated)\nsecond line")

    def fine(ctx: Any) -> None:
        ctx.record["images_per_s"] = 12.0

    fakes = {"data": broken, "weights": fine}
    stages = [
        dataclasses.replace(st, fn=fakes.get(st.name, lambda ctx: pytest.fail("must be skipped"))) for st in gc.STAGES
    ]
    monkeypatch.setattr(gc, "STAGES", stages)
    out = tmp_path / "r.json"
    assert gc.main(["--cpu", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    st = report["stages"]
    assert st["data"]["status"] == "fail" and st["data"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert st["data"]["partial"] == 1.5  # figures written before the failure are kept
    assert st["weights"]["status"] == "pass" and st["weights"]["images_per_s"] == 12.0
    assert st["extract"] == {"slice_s": 120.0, "status": "skipped", "reason": "needs data"}
    assert st["train"]["reason"] == "needs extract" and report["failed"] == ["data"]
    capsys.readouterr()
    assert gc.main(["--rows", str(out)]) == 0
    assert any("stage data" in r and "fail: RuntimeError" in r for r in capsys.readouterr().out.splitlines())


def test_gpu_check_stops_an_isolated_stage_at_its_slice(gc: Any, tmp_path: Path) -> None:
    """With --isolate each stage is a child process; one over its time slice is stopped and reported as such.
    (0.6 s cannot hold a training run: the child does not get past importing torch.)"""
    out = tmp_path / "r.json"
    t0 = time.perf_counter()
    code = gc.main(["--cpu", "--isolate", "--only", "train", "--budget", "3", "--out", str(out)])
    assert code == 1 and time.perf_counter() - t0 < 30
    train = json.loads(out.read_text())["stages"]["train"]
    assert train["status"] == "timeout" and train["slice_s"] == pytest.approx(0.6, abs=0.05)
    assert "stopped at its time slice" in train["error"] and train["seconds"] < 15


def test_gpu_check_child_process_runs_one_stage_from_its_command_line(gc: Any, tmp_path: Path) -> None:
    """What a child gets (stage, work folder, the sizes as JSON, its deadline) runs that stage and leaves its
    figures in work/stages/<name>.json."""
    spec = json.dumps(dataclasses.asdict(gc.CPU))
    args = ["--stage", "data", "--work", str(tmp_path), "--spec", spec, "--deadline", str(time.time() + 60)]
    assert gc.main(args) == 0
    figures = json.loads((tmp_path / "stages" / "data.json").read_text())
    assert figures["image_folders"] == {"small": gc.CPU.images_small, "full": gc.CPU.images}
    assert (tmp_path / "ref.npz").is_file()


def test_kill_when_ready_kills_the_whole_group_once_ready(gc: Any, tmp_path: Path) -> None:
    # the run starts a child of its own (as a DataLoader worker): both go when the run is killed
    script = (
        "import subprocess, sys, time, pathlib; d = pathlib.Path(sys.argv[1])\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "(d / 'child').write_text(str(child.pid)); (d / 'latest').write_text('1')\n"
        "time.sleep(60); (d / 'not-killed').write_text('!')\n"
    )
    cmd = [sys.executable, "-c", script, str(tmp_path)]
    ready = lambda: (tmp_path / "latest").is_file()  # noqa: E731
    assert gc.kill_when_ready(cmd, ready, timeout=30, env=cpu_env()) < 20
    time.sleep(0.2)
    assert not (tmp_path / "not-killed").exists() and not _running(int((tmp_path / "child").read_text()))
    quick = [sys.executable, "-c", "pass"]
    with pytest.raises(gc.StageError, match="ended .* before it could be killed"):
        gc.kill_when_ready(quick, lambda: False, timeout=30, env=cpu_env())


def _running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except FileNotFoundError:
        return False


CHILD = """
import dataclasses, json, os, sys, time, importlib.util
spec = importlib.util.spec_from_file_location("gc", sys.argv[1]); gc = importlib.util.module_from_spec(spec)
sys.modules["gc"] = gc; spec.loader.exec_module(gc)
work = sys.argv[2]
sleeper = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
def stage(ctx):  # a stage that started a process in its own session and waits on it
    gc.kill_when_ready([sys.executable, "-c", sleeper, work + "/grandchild"], lambda: False, 120)
gc.STAGES[:] = [dataclasses.replace(gc.STAGES[0], fn=stage)]
args = ["--stage", gc.STAGES[0].name, "--work", work, "--spec", json.dumps(dataclasses.asdict(gc.GPU))]  # no torch
sys.exit(gc.main([*args, "--deadline", str(time.time() + 120)]))
"""


def test_a_stage_stopped_at_its_slice_stops_the_processes_it_started(tmp_path: Path) -> None:
    """The runner stops a stage's child process with SIGTERM; the child unwinds, so a process the stage started in
    its own session (the finetune runs) does not outlive it."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(EXP / "gpu_check.py"), str(tmp_path)], env=cpu_env(), start_new_session=True
    )
    marker = tmp_path / "grandchild"
    deadline = time.time() + 60
    while not (marker.is_file() and marker.read_text()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    grandchild = int(marker.read_text())
    os.killpg(proc.pid, signal.SIGTERM)  # what the runner's _stop_group sends first
    assert proc.wait(timeout=30) != 0
    time.sleep(0.5)
    alive = _running(grandchild)
    if alive:  # leave nothing behind before failing
        os.kill(grandchild, signal.SIGKILL)
    assert not alive


def test_gpu_check_shell_wrapper_runs_the_script(tmp_path: Path) -> None:
    # From an unrelated directory, without relying on an installed package: the wrapper sets PYTHONPATH itself.
    proc = subprocess.run(
        ["bash", str(EXP / "gpu_check.sh"), "--help"],
        capture_output=True,
        text=True,
        env=cpu_env(drop=("PYTHONPATH",), PYTHON=sys.executable, OUT=str(tmp_path)),
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--cpu" in proc.stdout and "--peak-tflops" in proc.stdout and "--budget" in proc.stdout


# ----------------------------------------------------------------------------- peak table, MFU, the estimate
def test_gpu_check_peak_flops_lookup(gc: Any) -> None:
    assert gc.peak_flops("NVIDIA H100 80GB HBM3") == (989.4e12, "data sheet, dense bf16 (H100)")
    assert gc.peak_flops(None, 100.0) == (100e12, "--peak-tflops")
    assert gc.peak_flops(None)[0] is None and gc.peak_flops("Mystery GPU")[0] is None
    assert gc.mfu(46.1e9, 1000.0, 989.4e12) == pytest.approx(3 * 46.1e9 * 1000.0 / 989.4e12, rel=1e-12)
    assert gc.mfu(46.1e9, 1000.0, None) is None
    from manifold_fm.models.sit import build_sit, sit_forward_flops

    model = build_sit("SiT-B/2", input_size=32, in_channels=32, num_classes=1000, device="meta")
    assert sit_forward_flops(model) == pytest.approx(46.1e9, rel=0.01)  # FLUX.2 latents at 256 px


def test_recipe_estimate_from_hand_computed_rates(gc: Any) -> None:
    """Round rates, so every hour figure is checkable by hand (8 GPUs)."""
    stages = {
        "extract": {"images_per_s": 1000.0},
        "finetune": {"images_per_s": 64.0},
        "train": {"linear-b32": {"images_per_s": 2000.0}, "spherical-b32": {"images_per_s": 1600.0}},
        "sample": {
            "fp32": {"step_ms_per_image": 2.0, "other_ms_per_image": 10.0},
            "bf16": {"step_ms_per_image": 1.0, "other_ms_per_image": 6.0},
        },
        "evaluate": {
            "precision": "bf16",
            "inception_images_per_s": {"fp32": 2500.0, "bf16": 3200.0},
            "wall_s": 20.0,
            "num_samples": 256,
        },
    }
    est = gc.recipe_estimate(stages)
    h = est["hours"]
    assert h["extract_latents"] == round(1_281_167 / 8000 / 3600, 2)  # 0.04
    # 2 decoders x 200,183 steps x 32 images at 64 img/s per GPU on 8 GPUs
    assert est["recipe"]["finetune_steps"] == 200_183
    assert h["decoder_finetunes"] == round(2 * 200_183 * 32 / (8 * 64) / 3600, 2)  # 6.95
    assert h["train_linear"] == round(400_400 * 256 / (8 * 2000) / 3600, 2)  # 1.78
    assert h["train_spherical"] == round(400_400 * 256 / (8 * 1600) / 3600, 2)  # 2.22
    # per image: 250 steps x 2 ms x (0.5 + 1 + 1) + 3 x 10 ms = 1.28 s; 50,000 of them on 8 GPUs: 8000 s
    assert h["fid50k_sampling_per_arm_fp32"] == round(8000 / 3600, 2)
    # bf16: 250 x 1 ms x 2.5 + 3 x 6 ms = 0.643 s per image: 4018.75 s
    assert h["fid50k_sampling_per_arm_bf16"] == round(50_000 * 0.643 / 8 / 3600, 2)
    # 3 x (fixed + 50,000 images at the fp32 rate), fixed = 20 s - the 256 images at the rate evaluate ran in (bf16)
    assert h["fid50k_evaluate_per_arm"] == round(3 * (20 - 256 / 3200 + 50_000 / 2500) / 3600, 2)
    parts = [h["extract_latents"], h["decoder_finetunes"], h["train_linear"], h["train_spherical"]]
    total = sum(parts) + 2 * h["fid50k_sampling_per_arm_bf16"] + 2 * h["fid50k_evaluate_per_arm"]
    assert est["total_pair_hours"] == pytest.approx(total) and est["total_uses_sampling"] == "bf16"
    assert "not a measurement" in est["label"]
    del stages["sample"]["bf16"]  # the recipe samples in bf16: without its rate, no total
    assert gc.recipe_estimate(stages)["total_pair_hours"] is None
    assert gc.recipe_estimate(stages)["hours"]["fid50k_sampling_per_arm_fp32"] == h["fid50k_sampling_per_arm_fp32"]


# ----------------------------------------------------------------------------- the wheels script
def test_gpu_wheels_checks_each_wheels_requirements_against_the_folder_and_the_image() -> None:
    gw = load_script(EXP / "scripts" / "gpu_wheels.py", "imagenet_sfm_gpu_wheels")
    metadata = "\n".join(
        [
            "Name: example",
            "Requires-Dist: numpy",
            "Requires-Dist: pydantic-core==2.46.4",
            "Requires-Dist: typing-extensions>=3.6.4; python_version < '3.8'",  # not on 3.12
            "Requires-Dist: pytest; extra == 'test'",  # an extra
            "Requires-Dist: lazy-importer>=0.1; python_version < '3.15'",  # nowhere
            "Requires-Dist: huggingface-hub>=1.34.0",  # the image has 1.33.0
            "Requires-Dist: pydantic_core>=2.47",  # this folder has 2.46.4
        ]
    )
    problems = gw.unmet_requirements(
        metadata, {"pydantic_core": "2.46.4"}, {"numpy": None, "huggingface_hub": "1.33.0"}
    )
    assert len(problems) == 3
    assert "neither this folder nor the GPU image holds lazy-importer" in problems[0]
    assert "the GPU image has huggingface-hub 1.33.0" in problems[1]
    assert "this folder has pydantic-core 2.46.4" in problems[2]
    # what the check installs is what the script pins, and the folder it builds is git-ignored
    assert {r.split("==")[0].replace("-", "_"): r.split("==")[1] for r in gw.REQUIREMENTS}.items() <= gw.MISSING.items()
    gc = load_script(EXP / "gpu_check.py", "imagenet_sfm_gpu_check")
    assert gw.DEFAULT_OUT == gc.DEFAULT_WHEELS
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(gw.DEFAULT_OUT / "x.whl")],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        env=cpu_env(),
    )
    assert ignored.returncode == 0
    cmd = gw.download_command("geoopt", "0.5.1", Path("/tmp/w"))
    assert cmd[-1] == "geoopt==0.5.1" and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "manylinux2014_x86_64" in cmd
