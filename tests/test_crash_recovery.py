"""Crash recovery, tested by killing: ``manifold-fm train`` killed mid-step and in the middle of a checkpoint write,
``extract-latents`` killed mid-shard and ``sample`` killed between chunks, each then resumed or rerun; the results
equal those of an uninterrupted run bit for bit, and no half-written checkpoint is ever chosen. Also exact resume
when training from a latent cache read by a DataLoader with worker processes.

Every kill is a SIGKILL of a real ``python -m manifold_fm.cli`` process (no cleanup code runs); the references run
uninterrupted in this process with the same settings (one torch thread). Every rerun is proven to continue, not to
start over: a training run starts at its checkpoint's step and runs only the remaining steps, keeping the log of the
steps before (``assert_resumed``); ``sample`` samples only the chunks that were not on disk; ``extract-latents``
encodes only the shards that were not complete.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from manifold_fm.cli import main
from manifold_fm.training.checkpoint import latest_checkpoint, load_checkpoint

from helpers import assert_resumed, cpu_env, log_lines

pytestmark = pytest.mark.slow

TRAIN = [
    "train",
    "--config",
    "image-builtin",
    "--set",
    "data.per_class=2",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.steps=8",
    "--set",
    "train.sample_every=null",
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "train.log_every=1",
    "--set",
    "train.threads=1",
    "--set",
    "train.keep_checkpoints=null",
]


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "manifold_fm.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cpu_env(**(env or {})),
    )


def _kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the process ended before the moment to kill it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _invoke(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "checkpoints")
    assert ckpt.step == 8
    assert ckpt.ema is not None
    return {**ckpt.model, **{f"ema.{k}": v for k, v in ckpt.ema.items()}}


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass  # a line being written
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ref") / "run"
    _invoke([*TRAIN, "--out", str(out)])
    return _final_weights(out)


def test_train_killed_mid_step_resumes_bit_for_bit(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    run = tmp_path / "run"
    proc = _start([*TRAIN, "--out", str(run)])
    _kill_when(proc, lambda: max(_logged_steps(run), default=0) >= 5)  # between the checkpoints of steps 4 and 6
    killed_at = load_checkpoint(run / "checkpoints").step
    assert killed_at in (4, 6)
    before = log_lines(run)
    _invoke([*TRAIN, "--out", str(run), "--resume"])
    weights = _final_weights(run)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    # started at the checkpoint's step, ran only the steps after it, kept the log of those before
    assert_resumed(run, killed_at, 8, before)
    # the resumed log reads like an uninterrupted one: every step once
    assert _logged_steps(run) == list(range(1, 9))


def test_train_killed_inside_a_checkpoint_write_never_uses_it(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    run, marker = tmp_path / "run", tmp_path / "paused"
    proc = _start([*TRAIN, "--out", str(run)], env={"MANIFOLD_FM_TEST_PAUSE_IN_CHECKPOINT": f"{marker}:4"})
    _kill_when(proc, marker.exists)  # model.safetensors of step 4 is written, the rest is not
    half = Path(marker.read_text())
    assert half.is_dir() and (half / "model.safetensors").is_file() and not (half / "meta.json").exists()
    latest = latest_checkpoint(run / "checkpoints")
    assert latest is not None and latest.name == "step_00000002"  # the half-written one is never chosen
    before = log_lines(run)
    _invoke([*TRAIN, "--out", str(run), "--resume"])
    weights = _final_weights(run)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert_resumed(run, 2, 8, before)  # from the last complete checkpoint, steps 3-8 only
    assert not list((run / "checkpoints").glob("*.tmp-*"))  # the next write cleared the debris


def _cache(folder: Path) -> dict[str, np.ndarray]:
    manifest = json.loads((folder / "manifest.json").read_text())
    out = {}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        for key, value in load_file(str(shard)).items():
            out[f"{shard.name}/{key}"] = value.numpy()
    out["manifest shards"] = np.array(json.dumps(manifest["shards"], sort_keys=True))  # files, counts, ranges
    return out


def test_extract_latents_killed_mid_shard_resumes_to_the_same_cache(tmp_path: Path) -> None:
    args = ["extract-latents", "--per-class", "60", "--shard-size", "48", "--batch-size", "8", "--no-flip"]
    _invoke([*args, "--out", str(tmp_path / "whole")])
    part = tmp_path / "part"

    def two_shards_done() -> bool:
        try:
            return len(json.loads((part / "manifest.json").read_text()).get("shards", [])) >= 2
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return False

    _kill_when(_start([*args, "--out", str(part)]), two_shards_done)
    done = {p: p.stat().st_mtime_ns for p in part.glob("shard-*.safetensors")}  # complete (written atomically)
    assert len(done) >= 2
    result = CliRunner().invoke(main, [*args, "--out", str(part)])  # resumes by default
    assert result.exit_code == 0, result.output
    # only the missing shards were encoded: the complete ones are kept as they were, and said so
    assert {p: p.stat().st_mtime_ns for p in done} == done
    shards = json.loads((part / "manifest.json").read_text())["num_shards"]
    assert f"{len(done)} of {shards} shard(s) were complete (kept, not encoded again)" in result.output
    whole, resumed = _cache(tmp_path / "whole"), _cache(part)
    assert whole.keys() == resumed.keys() and len(whole) > 4
    assert all(np.array_equal(whole[k], resumed[k]) for k in whole)


def test_sample_killed_between_chunks_reruns_to_the_same_samples(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _invoke([*TRAIN, "--set", "train.steps=2", "--out", str(run)])
    args = ["sample", str(run), "--num", "48", "--batch-size", "4", "--steps", "8", "--no-grid"]
    _invoke([*args, "--out", str(tmp_path / "whole")])
    part = tmp_path / "part"
    _kill_when(_start([*args, "--out", str(part)]), lambda: len(list((part / "shards").glob("chunk_*.npz"))) >= 3)
    kept = {p.name: p.stat().st_mtime_ns for p in (part / "shards").glob("chunk_*.npz")}
    assert 3 <= len(kept) < 12 and not (part / "samples.npz").exists()
    import manifold_fm.training.runs as runs

    sampled: list[int] = []  # the chunks the rerun samples (one generate call each)
    real = runs.generate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "generate", lambda *a, **k: sampled.append(1) or real(*a, **k))
        result = CliRunner().invoke(main, [*args, "--out", str(part)])
    assert result.exit_code == 0, result.output
    # the chunks on disk were kept, not sampled again: the rerun sampled the others only
    assert len(sampled) == 12 - len(kept)
    assert f"{len(kept)} of 12 chunks were on disk from an interrupted run (kept, not resampled)" in result.output
    with np.load(tmp_path / "whole" / "samples.npz") as a, np.load(part / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not (part / "shards").exists()
    # finished samples are not sampled over; chunks of another request are refused, not mixed in
    again = CliRunner().invoke(main, [*args, "--out", str(part)])
    assert again.exit_code == 1 and "already holds samples" in again.output and "--overwrite" in again.output
    other = tmp_path / "other"
    (other / "shards").mkdir(parents=True)
    (other / "shards" / "request.json").write_text(json.dumps({"seed": 99}))
    refused = CliRunner().invoke(main, [*args, "--out", str(other)])
    assert refused.exit_code == 1 and "another request" in refused.output and "--overwrite" in refused.output


def test_resume_from_a_latent_cache_read_by_dataloader_workers_is_exact(tmp_path: Path) -> None:
    from manifold_fm.data.builtin_images import BuiltinImages
    from manifold_fm.data.latents import extract_latents
    from manifold_fm.tokenizers import builtin_tokenizer
    from manifold_fm.training.image import train_image

    extract_latents(
        builtin_tokenizer(progress=False),
        BuiltinImages("train", per_class=2),
        tmp_path / "cache",
        batch_size=12,
        progress=False,
    )
    over = [
        "data.source=latents",
        f"data.latents={tmp_path / 'cache'}",
        "data.num_workers=2",
        "train.steps=6",
        "train.batch_size=8",
        "train.sample_every=null",
        "train.checkpoint_every=3",
        "train.threads=1",
    ]
    train_image("image-builtin", over, tmp_path / "whole", progress=False)
    train_image("image-builtin", [*over, "train.steps=3"], tmp_path / "part", progress=False)  # stopped at 3
    before = log_lines(tmp_path / "part")
    train_image("image-builtin", over, tmp_path / "part", resume=True, progress=False)
    assert_resumed(tmp_path / "part", 3, 6, before)
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoints"), load_checkpoint(tmp_path / "part" / "checkpoints")
    assert a.step == b.step == 6 and all(torch.equal(a.model[k], b.model[k]) for k in a.model)


FINETUNE = [
    "finetune-decoder",
    "--per-class",
    "2",
    "--steps",
    "12",
    "--batch-size",
    "4",
    "--gan-start",
    "2",
    "--discriminator",
    "patch",
    "--eval-items",
    "2",
    "--checkpoint-every",
    "3",
    "--threads",
    "1",
    "--set",
    "train.log_every=1",
    "--set",
    "train.keep_checkpoints=null",
]


def test_finetune_decoder_killed_mid_training_resumes_bit_for_bit(tmp_path: Path) -> None:
    """A decoder finetune SIGKILLed between checkpoints and resumed: the resumed process starts at the checkpoint's
    step and runs only the remaining steps (the sessions the checkpoints record), and the final decoder and
    discriminator equal an uninterrupted run's bit for bit."""
    whole, run = tmp_path / "whole", tmp_path / "run"
    _invoke([*FINETUNE, "--out", str(whole)])
    proc = _start([*FINETUNE, "--out", str(run)])
    _kill_when(proc, lambda: max(_logged_steps(run), default=0) >= 7)  # after the step-6 checkpoint
    killed_at = load_checkpoint(run / "checkpoints").step
    assert killed_at in (6, 9) and not (run / "decoder.safetensors").exists()
    before = log_lines(run)
    _invoke([*FINETUNE, "--out", str(run), "--resume"])
    sessions = load_checkpoint(run / "checkpoints").meta["sessions"]
    assert sessions == [{"start": 0, "steps": killed_at}, {"start": killed_at, "steps": 12 - killed_at}]
    assert_resumed(run, killed_at, 12, before)
    for name in ("decoder", "discriminator"):
        a, b = load_file(str(whole / f"{name}.safetensors")), load_file(str(run / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _logged_steps(run) == list(range(1, 13))  # the resumed log reads like an uninterrupted one
