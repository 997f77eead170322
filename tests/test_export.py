"""Shareable models: ``manifold-fm export`` writes a self-contained folder; ``manifold_fm.from_pretrained`` loads it
anywhere and samples exactly what the run samples.

The comparisons are bit for bit (``torch.equal``): the exported weights, decoder state and latent normalisation are
the run's values stored losslessly (safetensors, and JSON floats, which round-trip float64 exactly), the pipeline
rebuilds the run with the same ``build_run`` and samples with the same ``sample_run``, on the same device and thread
count, so every floating-point operation is the same.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import manifold_fm
from manifold_fm.cli import main
from manifold_fm.config import validate
from manifold_fm.eval.image_io import to_uint8
from manifold_fm.pipeline import LatentImagePipeline, export_run
from manifold_fm.sampler import SamplerSpec
from manifold_fm.tokenizers import LatentNormalization, SphericalTokenizer, builtin_tokenizer
from manifold_fm.training.image import train_image
from manifold_fm.training.runs import load_run, sample_run

DOCS = Path(__file__).resolve().parents[1] / "docs"
TINY = ["train.steps=3", "data.per_class=2", "train.batch_size=8", "train.sample_every=null", "sample.steps=3"]
LABELS = [0, 1, 2]
# The default run's final row for its linear mode, as `results.json` holds it (the numbers are the test's own).
DEFAULT_RESULTS = {
    "config": {"name": "tiny"},
    "modes": {"linear": {"fd_builtin_classifier": 12.3456, "classifier_accuracy": 0.4375, "steps": 3}},
    "references": {"real held-out images": {"fd_builtin_classifier": 0.5}},
}
EVAL_DURING = {"fd_builtin_classifier": 21.5, "classifier_accuracy": 0.125}
EVAL_AFTER = {"fd_builtin_classifier": 33.25, "classifier_accuracy": 0.25}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("export-runs")
    # A "finetuned" decoder for projected latents: the base decoder's state, perturbed so that decoding with it
    # differs visibly from decoding with the base decoder. It lives outside the run, named by an absolute path.
    g = torch.Generator().manual_seed(0)
    state = builtin_tokenizer().decoder_module().state_dict()
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    decoder = base / "finetune" / "decoder.safetensors"
    decoder.parent.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(decoder))
    torch.manual_seed(0)
    spherical = base / "spherical-run"
    train_image("image-builtin", [*TINY, f"tokenizer.decoder_state={decoder}"], spherical, progress=False)
    # The linear run sits where the default run puts a mode (<out>/linear, named <name>-linear) next to results.json.
    linear = base / "default" / "linear"
    train_image("image-builtin", [*TINY, "flow.path=linear", "name=tiny-linear"], linear, progress=False)
    (linear.parent / "results.json").write_text(json.dumps(DEFAULT_RESULTS))
    # Its samples decode with a normalisation other than the tokenizer's own (as a run on a latent cache with
    # dataset statistics does): the export must carry the recorded one.
    meta_path = next((linear / "checkpoints").glob("step_*/meta.json"))
    meta = json.loads(meta_path.read_text())
    norm = LatentNormalization.from_dict(meta["latent_normalization"])
    norm = LatentNormalization(shift=norm.shift + 0.3, scale=norm.scale * 1.5, kind="dataset")
    meta["latent_normalization"] = norm.to_dict()
    meta_path.write_text(json.dumps(meta))
    # Evaluations: one logged during training (and one after the exported step, which must be left out), and
    # `manifold-fm evaluate` output saved next to `manifold-fm sample` output (and one for another step).
    with (linear / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 2, "time": 0.5, **EVAL_DURING}) + "\n")
        fh.write(json.dumps({"step": 9, "time": 0.9, "fd_builtin_classifier": 99.0}) + "\n")
    sampled = linear / "samples-00000003"
    cli = ["sample", str(linear), "--num", "4", "--steps", "1", "--out", str(sampled), "--device", "cpu"]
    assert CliRunner().invoke(main, cli).exit_code == 0
    (sampled / "metrics.json").write_text(json.dumps({"samples": "x.npz", "num_samples": 4, **EVAL_AFTER}))
    other = linear / "samples-old"
    other.mkdir()
    (other / "sample_info.json").write_text(json.dumps({"step": 1, "method": "euler"}))
    (other / "metrics.json").write_text(json.dumps({"fd_builtin_classifier": 77.0}))
    return {"spherical": spherical, "linear": linear, "decoder": decoder}


def _reference(run_dir: Path, steps: int = 2, seed: int = 0) -> torch.Tensor:
    """``sample_run`` of the original run: its sampler with ``steps`` replaced, as ``manifold-fm sample --steps``."""
    run = load_run(run_dir)
    spec = validate(SamplerSpec, {**run.cfg.sample.model_dump(include=set(SamplerSpec.model_fields)), "steps": steps})
    return sample_run(run, len(LABELS), spec, seed=seed, labels=torch.tensor(LABELS), progress=False)[2]


def _export(run_dir: Path, out: Path, *extra: str) -> None:
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output


def test_spherical_export_is_self_contained_and_samples_like_the_run(runs: dict[str, Path], tmp_path: Path) -> None:
    expected = _reference(runs["spherical"])
    _export(runs["spherical"], tmp_path / "a" / "exported")
    moved = tmp_path / "b" / "moved"
    shutil.move(tmp_path / "a" / "exported", moved)
    assert sorted(p.name for p in moved.iterdir()) == [
        "README.md",
        "config.json",
        "decoder.safetensors",
        "model.safetensors",
    ]
    original = runs["decoder"]
    hidden = original.with_name("elsewhere.safetensors")
    original.rename(hidden)  # the folder must not need the run's decoder file
    try:
        pipe = manifold_fm.from_pretrained(moved)
        images = pipe(class_labels=LABELS, num_steps=2, seed=0)
        latents = pipe(class_labels=LABELS, num_steps=2, seed=0, output_type="latent")
    finally:
        hidden.rename(original)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(images, expected)
    # The copied decoder state is the run's, and it is what decodes: the base decoder gives other images.
    copied, source = load_file(str(moved / "decoder.safetensors")), load_file(str(original))
    assert copied.keys() == source.keys() and all(torch.equal(copied[k], source[k]) for k in source)
    with torch.no_grad():
        base = SphericalTokenizer(builtin_tokenizer()).decode(latents)
    assert (base - images).abs().max() > 0.05
    record = json.loads((moved / "config.json").read_text())
    assert record["config"]["tokenizer"]["decoder_state"] == "decoder.safetensors"
    assert record["weights"] == "ema" and record["step"] == 3 and record["flow"] == "spherical"
    # The other output types are the same samples.
    arr = pipe(class_labels=LABELS, num_steps=2, seed=0, output_type="np")
    assert arr.dtype.name == "uint8" and (arr == to_uint8(expected)).all()
    pil = pipe(class_labels=LABELS, num_steps=2, seed=0, output_type="pil")
    assert len(pil) == 3 and (np.asarray(pil[1]) == arr[1]).all()


def test_linear_export_carries_the_latent_normalisation_and_the_measured_metrics(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    expected = _reference(runs["linear"], steps=3, seed=5)
    _export(runs["linear"], tmp_path / "exported")
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "exported", moved)
    shutil.rmtree(tmp_path / "exported")
    pipe = LatentImagePipeline.from_pretrained(moved)
    assert not (moved / "decoder.safetensors").exists()
    images = pipe(class_labels=LABELS, seed=5)  # the run's sampler: euler, 3 steps
    assert torch.equal(images, expected)
    # Decoding with the tokenizer's own normalisation instead would give other images.
    latents = pipe(class_labels=LABELS, seed=5, output_type="latent")
    with torch.no_grad():
        own = builtin_tokenizer().decode(latents)
    assert (own - images).abs().max() > 0.05
    # Metrics: exactly the recorded numbers, from the default run's results.json and the run's metrics.jsonl.
    record = json.loads((moved / "config.json").read_text())
    metrics = record["metrics"]
    assert metrics["default_run"]["final"] == DEFAULT_RESULTS["modes"]["linear"]
    assert metrics["default_run"]["references"] == DEFAULT_RESULTS["references"]
    logged = [json.loads(line) for line in (runs["linear"] / "metrics.jsonl").read_text().splitlines()]
    assert metrics["training"] == {"step": 3, "loss": [r for r in logged if "loss" in r][-1]["loss"]}
    assert metrics["evaluation"] == {"step": 2, **EVAL_DURING}
    [evaluated] = metrics["sample_evaluations"]
    assert evaluated["folder"] == "samples-00000003" and evaluated["metrics"] == EVAL_AFTER
    assert evaluated["num_samples"] == 4 and evaluated["steps"] == 1 and evaluated["ema"] is True
    assert set(metrics) == {"default_run", "training", "evaluation", "sample_evaluations"}
    card = (moved / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: manifold-fm" in card
    assert "| fd_builtin_classifier | 12.35 |" in card and "| classifier_accuracy | 0.4375 |" in card
    assert "| fd_builtin_classifier | 21.5 |" in card and "| fd_builtin_classifier | 33.25 |" in card
    assert "| 99 |" not in card and "| 77 |" not in card
    assert "linear" in card and "from_pretrained" in card


def test_a_run_without_evaluations_reports_none(runs: dict[str, Path], tmp_path: Path) -> None:
    """Numbers come only from files; a run with no metrics.jsonl gets a card that says so."""
    bare = tmp_path / "bare"
    shutil.copytree(runs["spherical"], bare)
    (bare / "metrics.jsonl").unlink()
    out = export_run(bare, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["metrics"] == {}
    assert "no measured metrics" in (out / "README.md").read_text()


def test_the_guide_snippet_runs_as_written(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = (DOCS / "guides" / "sharing.md").read_text()
    snippet = next(b for b in re.findall(r"^```py\n(.*?)^```", page, re.DOTALL | re.MULTILINE) if "class_labels" in b)
    monkeypatch.chdir(tmp_path)
    _export(runs["spherical"], Path("exported"))
    namespace: dict[str, object] = {}
    exec(compile(snippet, "sharing.md", "exec"), namespace)
    images = namespace["images"]
    assert isinstance(images, torch.Tensor) and images.shape == (3, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1


def test_save_pretrained_and_push_to_hub_round_trip_offline(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = LatentImagePipeline.from_run(runs["spherical"])
    expected = pipe(class_labels=LABELS, num_steps=2, seed=3)
    pipe.save_pretrained(tmp_path / "saved")
    again = manifold_fm.from_pretrained(tmp_path / "saved")
    assert torch.equal(again(class_labels=LABELS, num_steps=2, seed=3), expected)

    # A stand-in for the Hub: push_to_hub uploads into `hub/<repo>`, from_pretrained("<repo>") downloads from it.
    hub = tmp_path / "hub"

    class FakeApi:
        def __init__(self, token: object = None) -> None:
            pass

        def create_repo(self, repo_id: str, **kwargs: object) -> object:
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id: str, folder_path: Path, **kwargs: object) -> str:
            shutil.copytree(folder_path, hub / repo_id)
            return f"https://hub.invalid/{repo_id}"

    def fake_file(repo_id: str, filename: str, **kwargs: object) -> str:
        return str(hub / repo_id / filename)

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(hub / repo_id))
    assert again.push_to_hub("someone/tiny-sfm") == "https://hub.invalid/someone/tiny-sfm"
    assert 'from_pretrained("someone/tiny-sfm")' in (hub / "someone/tiny-sfm/README.md").read_text()
    pulled = manifold_fm.from_pretrained("someone/tiny-sfm")
    assert torch.equal(pulled(class_labels=LABELS, num_steps=2, seed=3), expected)


def test_export_refuses_to_overwrite_and_errors_are_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    cli = CliRunner()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    busy = cli.invoke(main, ["export", str(runs["linear"]), "--out", str(out)])
    assert busy.exit_code != 0 and "--overwrite" in busy.output and "Traceback" not in busy.output
    forced = cli.invoke(main, ["export", str(runs["linear"]), "--out", str(out), "--overwrite"])
    assert forced.exit_code != 0 and "not an exported model" in forced.output
    assert (out / "notes.txt").read_text() == "mine"  # nothing already written is lost
    (out / "notes.txt").unlink()
    _export(runs["linear"], out)  # an empty folder is fine
    assert (out / "config.json").is_file()

    done = tmp_path / "done"
    _export(runs["linear"], done)
    again = cli.invoke(main, ["export", str(runs["spherical"]), "--out", str(done)])
    assert again.exit_code != 0 and "--overwrite" in again.output
    _export(runs["spherical"], done, "--overwrite")  # an earlier export is replaced, whole
    assert json.loads((done / "config.json").read_text())["flow"] == "spherical"
    assert (done / "decoder.safetensors").is_file() and not list(tmp_path.glob(".done.tmp-*"))

    missing = cli.invoke(main, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert missing.exit_code != 0 and "does not exist" in missing.output and len(missing.output.splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="not a folder"):
        manifold_fm.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not an exported model"):
        manifold_fm.from_pretrained(tmp_path)
    pipe = manifold_fm.from_pretrained(done)
    with pytest.raises(ValueError, match="class_labels"):
        pipe()
    with pytest.raises(ValueError, match="labels must be in"):
        pipe(class_labels=[pipe.num_classes])
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], output_type="jpeg")
    with pytest.raises(ValueError, match="method"):
        pipe(class_labels=[0], method="nosuch")


@pytest.mark.parametrize("mode", ["spherical", "linear"])
def test_the_model_card_lists_exactly_the_files_the_folder_holds(
    runs: dict[str, Path], tmp_path: Path, mode: str
) -> None:
    """The card's Files table against the folder listing (the spherical run names its decoder by an absolute path
    outside the run: the export holds it as decoder.safetensors, and the card says so)."""
    out = tmp_path / mode
    _export(runs[mode], out)
    files = (out / "README.md").read_text().split("## Files")[1].split("\n## ")[0]
    listed = re.findall(r"^\| `([^`]+)` \|", files, flags=re.MULTILINE)
    assert sorted(listed) == sorted(p.name for p in out.iterdir())
    assert ("decoder.safetensors" in listed) == (mode == "spherical")
