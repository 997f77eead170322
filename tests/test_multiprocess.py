"""Two processes on CPU through accelerate's own launcher (``accelerate launch --multi_gpu --num_processes 2`` starts
two gloo ranks when no GPU is present): the same training as one process, one checkpoint per save, exact resume
after a kill (with two processes, and with one), replicas checked equal, and sampling shards that merge to the
one-process samples.

Reference for "the same": one process at the same global batch. The processes draw every step's noise for the
global batch and take their slices, so the runs differ only in the order DDP sums gradients (float rounding).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.training.checkpoint import latest_checkpoint, load_checkpoint

from helpers import accelerate_command, assert_resumed, cpu_env, kill_launched, log_lines

pytestmark = pytest.mark.slow

TRAIN = [
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
    "train.checkpoint_every=4",
    "--set",
    "train.log_every=1",
    "--set",
    "train.threads=1",
    # one evaluation, at the end: every process samples and scores its share (12 samples in chunks of 4)
    "--set",
    "train.eval_every=8",
    "--set",
    "eval.samples=12",
    "--set",
    "eval.batch_size=4",
    "--set",
    "sample.steps=2",
]
# summation order only: observed ~1.5e-8 on these weights (magnitude ~0.2); the bound leaves room, a different
# stream of examples or noise would differ by ~1e-3
ROUNDING = 1e-6


def _launch(*args: str, wait: bool = True, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``accelerate launch`` with 2 CPU processes of ``python -m manifold_fm.cli ARGS`` (its own process group)."""
    proc = subprocess.Popen(
        accelerate_command("-m", "manifold_fm.cli", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=cpu_env(**(env or {})),
    )
    if wait:
        out, _ = proc.communicate(timeout=600)
        proc.stdout_text = out  # type: ignore[attr-defined]
        assert proc.returncode == 0, out[-3000:]
    return proc


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _column(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if key in r]


def _weights(run: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "checkpoints")
    assert ckpt.step == 8
    return ckpt.ema if ema else ckpt.model  # type: ignore[return-value]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    two = _launch("train", *TRAIN, "--out", str(root / "two"))
    one = CliRunner().invoke(main, ["train", *TRAIN, "--out", str(root / "one")])
    assert one.exit_code == 0, one.output
    return {"two": root / "two", "one": root / "one", "root": root, "two_output": two.stdout_text}  # type: ignore


def test_two_processes_train_like_one_at_the_same_global_batch(runs: dict) -> None:
    assert _max_diff(_weights(runs["two"]), _weights(runs["one"])) < ROUNDING
    assert _max_diff(_weights(runs["two"], ema=True), _weights(runs["one"], ema=True)) < ROUNDING
    two, one = _records(runs["two"]), _records(runs["one"])
    np.testing.assert_allclose(_column(two, "loss"), _column(one, "loss"), rtol=1e-6)  # the global batch's mean
    # the evaluation at step 8 ran on both processes (each its share) and was logged once, by the main process;
    # it scores the EMA weights, equal to rounding, so the metrics agree to rounding
    (ev2,), (ev1,) = ([r for r in recs if "fd_builtin_classifier" in r] for recs in (two, one))
    assert ev2["step"] == ev1["step"] == 8
    for key in ("fd_builtin_classifier", "classifier_accuracy", "on_sphere_error_max"):
        assert ev2[key] == pytest.approx(ev1[key], rel=1e-4, abs=1e-7), key
    # exactly one checkpoint per save, written by the main process; one "run folder" line
    names = sorted(p.name for p in (runs["two"] / "checkpoints").iterdir())
    assert names == ["latest", "step_00000004", "step_00000008"]  # keep_checkpoints: 2; no second writer's files
    assert load_checkpoint(runs["two"] / "checkpoints").meta["processes"] == 2
    assert runs["two_output"].count("run folder:") == 1


def test_a_killed_two_process_run_resumes_exactly_with_two_or_one_processes(runs: dict) -> None:
    """Killed while alive and mid-training (its main process paused inside the write of the step-8 checkpoint, so
    steps 5-8 ran but the run has not finished: only the step-4 checkpoint is complete), then resumed with two
    processes and with one: each starts at step 4, runs steps 5-8 only, and ends where an uninterrupted run does."""
    part, marker = runs["root"] / "part", runs["root"] / "paused"
    pause = {"MANIFOLD_FM_TEST_PAUSE_IN_CHECKPOINT": f"{marker}:8"}
    proc = _launch("train", *TRAIN, "--set", "train.steps=8", "--out", str(part), wait=False, env=pause)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, "the run ended before it could be killed mid-training"
        assert time.monotonic() < deadline, "timed out waiting for the step-8 checkpoint write"
        time.sleep(0.05)
    assert proc.poll() is None  # alive when killed
    kill_launched(proc)  # the launcher and both ranks
    latest = latest_checkpoint(part / "checkpoints")
    assert latest is not None and latest.name == "step_00000004"  # strictly before the last step
    assert not (part / "checkpoints" / "step_00000008").exists()
    before = log_lines(part)
    assert max(json.loads(line)["step"] for line in before) == 8  # it had trained past the checkpoint
    copy = runs["root"] / "part-one"
    import shutil

    shutil.copytree(part, copy)
    _launch("train", *TRAIN, "--out", str(part), "--resume")
    assert _max_diff(_weights(part), _weights(runs["two"])) == 0.0  # bit for bit with two processes
    assert_resumed(part, 4, 8, before)
    # one process continues the same global stream: equal up to the summation order
    resumed = CliRunner().invoke(main, ["train", *TRAIN, "--out", str(copy), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert _max_diff(_weights(copy), _weights(runs["one"])) < ROUNDING
    assert_resumed(copy, 4, 8, before)


_MISMATCH = """
import os, sys, torch
from manifold_fm.data.sources import TensorSource
from manifold_fm.models.sit import SiT
from manifold_fm.training.builders import preset_flow
from manifold_fm.training.schema import load_image_config
from manifold_fm.training.flow_objective import FlowObjective
from manifold_fm.training.trainer import Trainer, TrainingError

rank = int(os.environ["RANK"])  # (set by the launcher)
cfg = load_image_config(None, ["tokenizer.kind=none", "data.source=latents", "data.latents=x", "train.batch_size=4",
                               "train.steps=1"])
torch.manual_seed(rank)  # a bug: each process builds different initial weights
model = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=3)
data = TensorSource(torch.randn(8, 4, 4, 4), torch.arange(8) % 3)
try:
    Trainer(FlowObjective(model, preset_flow("spherical", 4), cfg.optim, null_class=3), data, cfg.train,
            sys.argv[1], device="cpu", progress=False).fit()
except TrainingError as exc:
    print(f"rank {rank}: {exc}")
    sys.exit(3)
"""


def test_replicas_that_disagree_stop_the_run_with_a_message(tmp_path: Path) -> None:
    script = tmp_path / "mismatch.py"
    script.write_text(_MISMATCH)
    cmd = accelerate_command(str(script), str(tmp_path / "run"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cpu_env())
    assert proc.returncode != 0
    assert "2 processes hold different weights at the start" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sampling_on_two_processes_merges_to_the_one_process_samples(runs: dict) -> None:
    args = ["sample", str(runs["one"]), "--num", "10", "--batch-size", "3", "--steps", "2", "--no-grid"]
    _launch(*args, "--out", str(runs["root"] / "s2"))
    single = CliRunner().invoke(main, [*args, "--out", str(runs["root"] / "s1")])
    assert single.exit_code == 0, single.output
    with np.load(runs["root"] / "s2" / "samples.npz") as a, np.load(runs["root"] / "s1" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
        assert a["arr_0"].shape[0] == 10


def test_ot_coupling_pairs_per_process_like_one_process_per_micro_batch(tmp_path: Path) -> None:
    """``flow.coupling: ot`` under 2 processes: each process pairs its own slice of the global batch, which is what one
    process does per micro-batch with ``train.grad_accum: 2`` (the same slices), so the two runs agree to rounding;
    one process at the whole batch pairs over all of it and trains differently."""
    ot = ["--set", "flow.coupling=ot"]
    _launch("train", *TRAIN, *ot, "--out", str(tmp_path / "two"))
    accum = CliRunner().invoke(
        main, ["train", *TRAIN, *ot, "--set", "train.grad_accum=2", "--out", str(tmp_path / "a")]
    )
    assert accum.exit_code == 0, accum.output
    whole = CliRunner().invoke(main, ["train", *TRAIN, *ot, "--out", str(tmp_path / "w")])
    assert whole.exit_code == 0, whole.output
    assert _max_diff(_weights(tmp_path / "two"), _weights(tmp_path / "a")) < ROUNDING
    assert _max_diff(_weights(tmp_path / "two"), _weights(tmp_path / "w")) > 100 * ROUNDING


# Adam divides each gradient by its running RMS, which magnifies the rounding of near-zero gradients: observed 2e-6
# on these weights (lr 1e-4, 6 steps); with each process weighting the GAN term by its own half-batch's adaptive
# weight instead of the global one, 1.8e-4
FINETUNE_ROUNDING = 2e-5
FINETUNE = [
    "finetune-decoder",
    "--per-class",
    "1",
    "--steps",
    "6",
    "--batch-size",
    "4",
    "--gan-start",
    "2",
    "--discriminator",
    "patch",
    "--eval-items",
    "2",
    "--threads",
    "1",
    "--set",
    "train.log_every=1",
]


def test_two_processes_finetune_a_decoder_like_one_at_the_same_global_batch(tmp_path: Path) -> None:
    """finetune-decoder on 2 gloo processes at global batch 4 (each reads its 2 images of every step) equals 1 process
    at batch 4 up to summation order: the logged losses to rel. 1e-5, the decoder and the GroupNorm 'patch'
    discriminator to FINETUNE_ROUNDING. The adaptive GAN weight (from step 2 on) uses the gradients of the global
    batch: without their all-reduce each process would weight its own half's GAN term (losses then differ by 2-7%).
    """
    from safetensors.torch import load_file

    two = _launch(*FINETUNE, "--out", str(tmp_path / "two"))
    one = CliRunner().invoke(main, [*FINETUNE, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    logs = {
        k: [json.loads(line) for line in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
        for k in ("one", "two")
    }
    for term in ("loss", "l1", "perceptual", "adv", "disc", "gan_scale"):
        np.testing.assert_allclose([r[term] for r in logs["two"]], [r[term] for r in logs["one"]], rtol=1e-5)
    for name in ("decoder", "discriminator"):
        a = load_file(str(tmp_path / "two" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "one" / f"{name}.safetensors"))
        assert _max_diff(a, b) < FINETUNE_ROUNDING, name
    assert [r["gan_scale"] for r in logs["one"]][:2] == [1.0, 1.0] and logs["one"][-1]["gan_scale"] != 1.0
    assert load_checkpoint(tmp_path / "two" / "checkpoints").meta["processes"] == 2
    assert two.stdout_text.count("decoder-swap control") == 1  # the report: main process only


_EVAL = """
import json, sys
from pathlib import Path
import torch
from manifold_fm.eval.classifier import builtin_evaluator
from manifold_fm.tokenizers import builtin_tokenizer
from manifold_fm.training.builders import latent_flow
from manifold_fm.training.image import eval_hook, image_model, run_decoder
from manifold_fm.training.schema import load_image_config

torch.set_num_threads(1)
cfg = load_image_config("image-builtin", ["sample.steps=2", "eval.samples=10", "eval.batch_size=4"])
model = image_model(cfg, 16, 8, 12)
evaluator = builtin_evaluator(test_per_class=4)
chunks = []  # the batches this process decodes
decoder = run_decoder(cfg, builtin_tokenizer(progress=False))
decode = decoder.decode
decoder.decode = lambda z: chunks.append(z.shape[0]) or decode(z)
hook = eval_hook(cfg, latent_flow(cfg.flow, 16), decoder, (16, 8, 8), 12, evaluator)
import accelerate  # the launcher's process group (gloo on CPU)
accelerate.PartialState()
metrics = hook.fn(2, model)
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps({"world": world, "chunks": chunks, "metrics": metrics}))
"""


def test_the_evaluation_hook_on_two_processes_equals_one_process(tmp_path: Path) -> None:
    """The evaluation hook's metrics under 2 processes (each sampling, decoding and scoring its share of the chunks;
    the features gathered) equal one process's, and both processes did work: 10 samples in chunks of 4 are chunks of
    4, 4 and 2; process 0 does chunks 0 and 2, process 1 chunk 1."""
    from manifold_fm.eval.classifier import builtin_evaluator
    from manifold_fm.tokenizers import builtin_tokenizer
    from manifold_fm.training.builders import latent_flow
    from manifold_fm.training.image import eval_hook, image_model, run_decoder
    from manifold_fm.training.schema import load_image_config

    evaluator = builtin_evaluator(test_per_class=4)  # the shipped classifier, in both
    cfg = load_image_config("image-builtin", ["sample.steps=2", "eval.samples=10", "eval.batch_size=4"])
    decoder = run_decoder(cfg, builtin_tokenizer(progress=False))
    one = eval_hook(cfg, latent_flow(cfg.flow, 16), decoder, (16, 8, 8), 12, evaluator).fn(
        2, image_model(cfg, 16, 8, 12)
    )
    script = tmp_path / "evaluate.py"
    script.write_text(_EVAL)
    proc = subprocess.run(
        accelerate_command(str(script), str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_env(),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["chunks"] for r in ranks] == [[4, 2], [4]]
    for r in ranks:
        assert set(r["metrics"]) == set(one)
        for key in set(one) - {"sample_s_per_image"}:
            assert r["metrics"][key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key


def _cache_files(folder: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    out: dict[str, object] = {"manifest": json.loads((folder / "manifest.json").read_text())}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        out.update({f"{shard.name}/{k}": v for k, v in load_file(str(shard)).items()})
    return out


def _writers(folder: Path) -> list[list[int]]:
    """The process that wrote each shard (from the record in its metadata)."""
    from safetensors import safe_open

    out = []
    for shard in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.append(json.loads(f.metadata()["record"])["process"])
    return out


def _same_cache(a: dict[str, object], b: dict[str, object]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_extract_latents_on_two_processes_writes_the_one_process_cache(tmp_path: Path) -> None:
    """Each process encodes its shards (0, 2, 4, ... and 1, 3, 5, ...); the main process writes the manifest: the
    cache equals one process's, file for file. A cache stopped after some shards resumes with another process count
    and redoes only the missing shards."""
    args = ["extract-latents", "--per-class", "5", "--shard-size", "9", "--batch-size", "4", "--split", "test"]
    one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = _launch(*args, "--out", str(tmp_path / "two"))
    assert two.stdout_text.count("latents of shape") == 1  # one summary, from the main process
    reference = _cache_files(tmp_path / "one")
    assert len(reference["manifest"]["shards"]) == 7  # 60 images in shards of 9
    assert _same_cache(_cache_files(tmp_path / "two"), reference)
    assert _writers(tmp_path / "two") == [[k % 2, 2] for k in range(7)]
    # stopped after shards 0-2 (one process), resumed by two
    import shutil

    part = tmp_path / "part"
    shutil.copytree(tmp_path / "one", part)
    for k in range(3, 7):
        (part / f"shard-{k:05d}.safetensors").unlink()
    kept = (part / "shard-00001.safetensors").stat().st_mtime_ns
    _launch(*args, "--out", str(part))
    assert (part / "shard-00001.safetensors").stat().st_mtime_ns == kept
    assert _same_cache(_cache_files(part), reference)
    assert _writers(part) == [[0, 1]] * 3 + [[1, 2], [0, 2], [1, 2], [0, 2]]  # shards 3-6 split over the two
