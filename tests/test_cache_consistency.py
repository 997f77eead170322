"""One latent cache, two runs: spherical training projects the cache's *raw* latents (what the finetuned decoder
saw), linear runs decode with the cache's own normalisation, wrong cache kinds and broken checkpoints fail in one
line from the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from manifold_fm.cli import main
from manifold_fm.data.builtin_images import BuiltinImages
from manifold_fm.data.latents import LatentCache, extract_latents
from manifold_fm.sampler import SamplerSpec
from manifold_fm.tokenizers import LatentNormalization, SphericalTokenizer, builtin_tokenizer
from manifold_fm.training.builders import preset_flow
from manifold_fm.training.checkpoint import load_checkpoint
from manifold_fm.training.image import build_latents, train_image
from manifold_fm.training.runs import load_run, sample_run
from manifold_fm.training.schema import FLOW_PRESETS, load_image_config

RUN = [
    "tokenizer.kind=builtin",
    "data.source=latents",
    "model.arch=SiT-Micro/2",
    "train.batch_size=8",
    "train.sample_every=null",
    "train.log_every=1",
    "sample.steps=2",
]


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    return BuiltinImages("test", per_class=1).tensors()  # 12 images, one per class


@pytest.fixture(scope="module")
def stats() -> LatentNormalization:
    """Dataset-style statistics far from the tokenizer's own: a per-channel shift and scale."""
    g = torch.Generator().manual_seed(3)
    return LatentNormalization(
        shift=torch.randn(16, generator=g, dtype=torch.float64),
        scale=0.5 + torch.rand(16, generator=g, dtype=torch.float64),
        kind="dataset",
    )


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, stats: LatentNormalization) -> dict[str, Path]:
    """A cache normalised with ``stats`` (as ``extract-latents --dataset-stats`` writes) and a spherical cache."""
    root = tmp_path_factory.mktemp("caches")
    ds = BuiltinImages("test", per_class=1)
    tok = builtin_tokenizer(progress=False).eval().with_normalization(stats)
    extract_latents(tok, ds, root / "stats", batch_size=5, flip=False, progress=False)
    base = builtin_tokenizer(progress=False).eval()
    extract_latents(SphericalTokenizer(base), ds, root / "spherical", batch_size=5, flip=False, progress=False)
    return {"stats": root / "stats", "spherical": root / "spherical"}


def _training_data(cache: Path, mode: str) -> torch.Tensor:
    """The data latents the trainer's loss sees (after ``Flow.prepare_data``), in cache order."""
    cfg = load_image_config("image-builtin", [*RUN, f"data.latents={cache}", f"flow.path={FLOW_PRESETS[mode]['path']}"])
    lat = build_latents(cfg, builtin_tokenizer(progress=False), progress=False)
    x = torch.stack([lat.data.dataset[i][0] for i in range(len(lat.data))])
    return preset_flow(mode, lat.channels).prepare_data(x)


def test_spherical_training_data_are_the_spherical_tokenizers_latents(caches, images) -> None:
    x, _ = images
    base = builtin_tokenizer(progress=False).eval()
    with torch.no_grad():
        raw = base.encode_raw(x).double()
    reference = (16**0.5 * raw / raw.norm(dim=1, keepdim=True)).float()  # float64 projection of the raw latents
    from_stats_cache = _training_data(caches["stats"], "spherical")
    from_spherical_cache = _training_data(caches["spherical"], "spherical")
    torch.testing.assert_close(from_stats_cache, reference, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(from_spherical_cache, reference, atol=2e-5, rtol=1e-5)
    # the old behaviour, projecting the normalised latents, is a different set of directions
    normalised = LatentCache(caches["stats"]).load_all()[0]
    assert (preset_flow("spherical", 16).prepare_data(normalised) - reference).abs().max() > 0.1


def test_linear_training_data_are_the_cache_as_stored(caches) -> None:
    stored = LatentCache(caches["stats"]).load_all()[0]
    torch.testing.assert_close(_training_data(caches["stats"], "linear"), stored, atol=0, rtol=0)


def test_raw_cache_reads_invert_the_manifest_normalisation(caches, images, stats) -> None:
    x, _ = images
    base = builtin_tokenizer(progress=False).eval()
    with torch.no_grad():
        raw = base.encode_raw(x)
    cache = LatentCache(caches["stats"], raw=True)
    assert not cache.spherical and LatentCache(caches["spherical"]).spherical
    torch.testing.assert_close(cache.load_all()[0], raw, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(cache[3][0], raw[3], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(cache.normalization.shift, stats.shift)


def test_linear_run_refuses_a_spherical_cache_in_one_line(caches, tmp_path) -> None:
    cfg = load_image_config("image-builtin", [*RUN, f"data.latents={caches['spherical']}", "flow.path=linear"])
    with pytest.raises(ValueError, match="--spherical"):
        build_latents(cfg, builtin_tokenizer(progress=False), progress=False)
    sets = [a for kv in [*RUN, f"data.latents={caches['spherical']}", "train.steps=1"] for a in ("--set", kv)]
    result = CliRunner().invoke(
        main, ["train", "--config", "image-builtin", *sets, "--path", "linear", "--out", str(tmp_path / "r")]
    )
    assert "extract-latents --spherical" in _one_line_error(result)


def test_linear_run_on_a_dataset_stats_cache_decodes_with_those_stats(caches, stats, tmp_path) -> None:
    out = tmp_path / "lin"
    train_image(
        "image-builtin",
        [*RUN, f"data.latents={caches['stats']}", "flow.path=linear", "train.steps=2"],
        out,
        progress=False,
    )
    run = load_run(out)
    spec = SamplerSpec(method="euler", steps=2)
    _, _, z = sample_run(run, 6, spec, seed=1, progress=False, decode=False)
    _, _, decoded = sample_run(run, 6, spec, seed=1, progress=False)
    # independent decode: undo the cache's statistics in float64, then the base decoder on raw latents
    base = builtin_tokenizer(progress=False).eval()
    raw = (z.double() / stats.scale.view(1, -1, 1, 1) + stats.shift.view(1, -1, 1, 1)).float()
    with torch.no_grad():
        expected = base.decode_raw(raw)
        wrong = base.decode(z)  # the tokenizer's own constants: what sampling did before
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)
    assert (decoded - wrong).abs().max() > 1e-2


def _corrupt_latest(run: Path) -> Path:
    step = sorted((run / "checkpoints").glob("step_*"))[-1]
    (step / "model.safetensors").write_bytes(b"not a safetensors file")
    return step / "model.safetensors"


def _one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]  # progress bars may precede it on stderr
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


def test_resume_from_a_corrupt_checkpoint_is_one_line_for_toy_and_image_runs(tmp_path) -> None:
    runner = CliRunner()
    toy = tmp_path / "toy"
    ok = runner.invoke(main, ["train", "--config", "toy-sphere", "--steps", "2", "--out", str(toy)])
    assert ok.exit_code == 0, ok.output
    bad = _corrupt_latest(toy)
    extend = ["--extend", "--reschedule"]  # a longer run (its cosine schedule recomputed): the checkpoint is read
    line = _one_line_error(
        runner.invoke(main, ["train", "--config", "toy-sphere", "--steps", "4", "--out", str(toy), "--resume", *extend])
    )
    # the file is named, and no earlier checkpoint is suggested where none is kept
    assert f"checkpoint file {bad} is unreadable" in line and line.endswith(
        f"no other checkpoint is kept in {bad.parent.parent}"
    )

    img = tmp_path / "img"
    sets = ["data.source=builtin", "data.per_class=1", "train.batch_size=8", "train.sample_every=null"]
    sets = [a for kv in [*sets, "model.arch=SiT-Micro/2", "train.checkpoint_every=1"] for a in ("--set", kv)]
    ok = runner.invoke(main, ["train", "--config", "image-builtin", *sets, "--steps", "2", "--out", str(img)])
    assert ok.exit_code == 0, ok.output
    longer = ["train", "--config", str(img / "config.yaml"), "--steps", "3", "--out", str(img), "--resume", "--extend"]
    # a TrainingError (config section differs from the checkpoint's) is one line too
    line = _one_line_error(runner.invoke(main, [*longer, "--set", "optim.lr=0.5"]))
    assert "cannot resume" in line and "optim" in line
    bad = _corrupt_latest(img)
    line = _one_line_error(runner.invoke(main, longer))
    # the file, and the option that picks the checkpoint still kept
    assert f"checkpoint file {bad} is unreadable" in line and line.endswith("--checkpoint STEP (kept: 1)")
    again = runner.invoke(main, [*longer, "--checkpoint", "1"])
    assert again.exit_code == 0, again.output
    assert load_checkpoint(img / "checkpoints").meta["sessions"] == [{"start": 0, "steps": 1}, {"start": 1, "steps": 2}]
