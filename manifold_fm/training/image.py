"""Latent-image runs (``kind: image``): tokenizer + latents + SiT, trained by the one
:class:`~manifold_fm.training.trainer.Trainer`.

``train_image(config, overrides, out_dir, resume)`` is what ``manifold-fm train --config <kind: image YAML>`` runs.
A run folder holds ``config.yaml``, ``checkpoints/``, ``metrics.jsonl`` and ``samples/step_XXXXXXXX.png`` grids (one
row per class, named). Its config and checkpoints record ``tokenizer.decoder_state`` relative to the run folder when
it was given relative (:mod:`manifold_fm.training.run_folder`).

Which latents each flow trains on: vanilla-latent runs (the linear baseline) the normalised latents
(``tokenizer.encode``, or a cache as stored); spherical-latent runs the raw encoder output projected per token
(``SphericalTokenizer.encode``; a cache is read denormalised with its manifest's normalisation), so one cache serves
both. The checkpoint meta records the
generated latents' normalisation (``latent_normalization``), which grids and ``manifold-fm sample`` decode with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from manifold_fm.errors import InputError

from ..config import to_dict
from ..data.sources import DatasetSource, DataSource, TensorSource
from ..flow import Flow
from ..threads import using_threads
from .builders import build_model, latent_flow
from .checkpoint import CheckpointError
from .flow_objective import FlowObjective
from .run_folder import default_out_dir, recorded_path
from .schema import RESUME_SECTIONS, ImageRunConfig, load_image_config
from .trainer import Hook, Trainer


def _spherical(cfg: ImageRunConfig) -> bool:
    return cfg.flow.resolved_latent == "spherical"


def load_tokenizer(cfg: ImageRunConfig, progress: bool = True) -> Any:
    """The base tokenizer named by ``cfg.tokenizer`` (``None`` for ``kind: none``)."""
    tc = cfg.tokenizer
    if tc.kind == "none":
        return None
    if tc.kind == "builtin":
        from ..tokenizers import builtin_tokenizer

        return builtin_tokenizer(tc.cache_dir, progress=progress).eval()
    from ..tokenizers import DiffusersTokenizer

    if not tc.name_or_path:
        raise InputError("tokenizer.name_or_path: required for a diffusers tokenizer (hub id or local folder)")
    return DiffusersTokenizer.from_pretrained(tc.name_or_path, subfolder=tc.subfolder, kind=tc.vae_kind).eval()


def tokenizer_name(cfg: ImageRunConfig) -> str | None:
    """The ``name`` of the tokenizer :func:`load_tokenizer` loads (recorded in checkpoints), without loading its
    weights (``None`` for ``kind: none``)."""
    tc = cfg.tokenizer
    if tc.kind == "none":
        return None
    if tc.kind == "builtin":
        from ..tokenizers.tiny_vae import builtin_tokenizer_file, tiny_vae_name

        path = builtin_tokenizer_file(tc.cache_dir)
        return tiny_vae_name(path) if path is not None else load_tokenizer(cfg, progress=False).name
    from ..tokenizers.diffusers_adapter import diffusers_tokenizer_name

    if not tc.name_or_path:
        raise InputError("tokenizer.name_or_path: required for a diffusers tokenizer (hub id or local folder)")
    return diffusers_tokenizer_name(tc.name_or_path, tc.subfolder, tc.vae_kind)


class LazyDecoder:
    """A decoder loaded on first use: ``load()`` builds it (e.g. :func:`run_decoder` of a freshly loaded tokenizer)
    when it first decodes (or its dtype is asked), on the device it was last moved to with :meth:`to`. A process
    that never decodes never loads the tokenizer's weights; one that does holds them on its own device."""

    def __init__(self, load: Callable[[], Any], device: torch.device | str = "cpu") -> None:
        self._load, self._decoder, self._device = load, None, torch.device(device)

    @property
    def loaded(self) -> bool:
        return self._decoder is not None

    def get(self) -> Any:
        """The decoder (loaded now if it was not), on this object's device."""
        if self._decoder is None:
            self._decoder = self._load().to(self._device)
        return self._decoder

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.get().dtype

    def to(self, device: torch.device | str) -> LazyDecoder:
        """Decode on ``device`` from now on (moves the weights if they are loaded); returns ``self``."""
        self._device = torch.device(device)
        if self._decoder is not None:
            self._decoder.to(self._device)
        return self

    def decode(self, latents: Tensor) -> Tensor:
        return self.get().decode(latents)


def sample_decoder(cfg: ImageRunConfig, base: Any) -> Any:
    """What decodes generated latents: spherical-latent runs use ``SphericalTokenizer(base, decoder_state)``."""
    if base is None or not _spherical(cfg):
        return base
    from ..tokenizers import SphericalTokenizer

    state = None
    if cfg.tokenizer.decoder_state is not None:
        path = _check_decoder_state(cfg)
        from safetensors.torch import load_file

        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    return SphericalTokenizer(base, decoder_state=state).eval()


def _check_decoder_state(cfg: ImageRunConfig) -> Path | None:
    """``tokenizer.decoder_state`` as a path (``None`` if unset); ``FileNotFoundError`` if it is not a file."""
    if cfg.tokenizer.decoder_state is None:
        return None
    path = Path(cfg.tokenizer.decoder_state)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.decoder_state: {path} does not exist (run finetune-decoder first)")
    return path


@torch.no_grad()
def encode_dataset(
    tokenizer: Any, images: Tensor, batch_size: int = 256, progress: bool = False, raw: bool = False
) -> Tensor:
    """Latents of ``images`` (``(N, 3, H, W)`` in [-1, 1]) in batches, in float32 on the CPU.

    ``raw=False``: ``tokenizer.encode`` (normalised, what the linear baseline trains on); ``raw=True``:
    ``tokenizer.encode_raw`` (the encoder's posterior mode, which spherical training projects to radius sqrt(C)).
    """
    from ..progress import progress_bar

    encode = tokenizer.encode_raw if raw else tokenizer.encode
    out = []
    for i in progress_bar(range(0, images.shape[0], batch_size), desc="encode", disable=not progress, leave=False):
        batch = images[i : i + batch_size].to(tokenizer.device, tokenizer.dtype)
        out.append(encode(batch).float().cpu())
    return torch.cat(out)


@dataclass
class ImageLatents:
    """Training latents of an image run and what decodes the model's samples.

    Attributes:
        data: the latent source given to the trainer.
        channels, side, num_classes: ``C``, ``h`` (= ``w``) and the number of classes.
        normalization: the ``LatentNormalization`` (as a dict) of the latents the model learns to generate: the
            cache manifest's (or tokenizer's) in linear mode; the identity in spherical mode, whose data are the
            raw encoder output projected to the spheres, as ``SphericalTokenizer.encode`` makes them.
    """

    data: DataSource
    channels: int
    side: int
    num_classes: int
    normalization: dict[str, Any] | None


_PROJECTED = {"kind": "identity", "shift": 0.0, "scale": 1.0, "meta": {"projected": True}}


def build_latents(cfg: ImageRunConfig, tokenizer: Any, progress: bool = True) -> ImageLatents:
    """Training latents for ``cfg.flow``'s latent space.

    Spherical mode trains on ``projx(raw)``: the built-in images are encoded raw, and a latent cache is read
    denormalised with its manifest's normalisation (``LatentCache(raw=True)``), so one cache serves a linear and a
    spherical run and the spherical data are those the finetuned decoder was trained on. A cache written with
    ``extract-latents --spherical`` is already projected and serves only spherical runs.
    """
    d = cfg.data
    spherical = _spherical(cfg)
    if d.source == "builtin":
        from ..data.builtin_images import BuiltinImages

        ds = BuiltinImages("train", size=d.size, per_class=d.per_class, seed=d.seed)
        images, labels = ds.tensors()
        latents = encode_dataset(tokenizer, images, progress=progress, raw=spherical)
        norm = _PROJECTED if spherical else tokenizer.normalization.to_dict()
        return ImageLatents(TensorSource(latents, labels), latents.shape[1], latents.shape[-1], ds.num_classes, norm)
    from ..data.latents import LatentCache

    if d.latents is None or not Path(d.latents).is_dir():
        raise FileNotFoundError(
            f"data.latents: {d.latents} is not a folder; create it with manifold-fm extract-latents"
        )
    cache = LatentCache(d.latents, raw=spherical)
    manifest = cache.manifest
    if cache.spherical and not spherical:
        raise InputError(
            f"latent cache {d.latents} holds projected latents (extract-latents --spherical), which a vanilla-latent "
            "run cannot use; extract a cache without --spherical (one such cache serves both flows)"
        )
    c, h, _ = manifest.get("latent_shape") or tuple(cache[0][0].shape)
    num_classes = int(manifest.get("num_classes") or len(manifest.get("class_names") or []))
    if num_classes < 1:
        raise InputError(f"latent cache {d.latents}: its manifest names no classes (num_classes/class_names)")
    if len(cache) < cfg.train.batch_size:
        raise InputError(f"latent cache {d.latents} holds {len(cache)} latents, fewer than train.batch_size")
    norm = _PROJECTED if spherical else cache.normalization.to_dict()
    return ImageLatents(DatasetSource(cache, num_workers=d.num_workers), int(c), int(h), num_classes, norm)


def class_names(cfg: ImageRunConfig, num_classes: int) -> list[str]:
    """The names of a run's ``num_classes`` classes, for labelling pictures: the built-in images' shape-texture names,
    a latent cache's ``class_names`` (when its manifest is readable here), else ``class 0``, ``class 1``, ..."""
    names: list[str] = []
    if cfg.data.source == "builtin":
        from ..data.builtin_images import CLASS_NAMES

        names = list(CLASS_NAMES)
    elif cfg.data.latents is not None:
        import json

        from ..data.latents import MANIFEST

        try:
            names = [str(n) for n in json.loads((Path(cfg.data.latents) / MANIFEST).read_text()).get("class_names", [])]
        except (OSError, ValueError, AttributeError):
            names = []  # a cache on another machine: number the classes
    return names if len(names) == num_classes else [f"class {k}" for k in range(num_classes)]


def run_decoder(cfg: ImageRunConfig, base: Any, normalization: Mapping[str, Any] | None = None) -> Any:
    """What decodes a run's generated latents (``None`` without a tokenizer).

    Linear runs: ``base`` with ``normalization`` (the training latents' normalisation, recorded in the checkpoint
    meta as ``latent_normalization``; ``None`` keeps the tokenizer's own). Spherical runs:
    ``SphericalTokenizer(base, tokenizer.decoder_state)``, which decodes projected raw latents.
    """
    if base is None:
        return None
    if not _spherical(cfg) and normalization is not None:
        from ..tokenizers import LatentNormalization

        base.with_normalization(LatentNormalization.from_dict(dict(normalization)))
    return sample_decoder(cfg, base)


def image_model(cfg: ImageRunConfig, channels: int, side: int, num_classes: int) -> nn.Module:
    """The SiT of ``cfg.model`` for ``(channels, side, side)`` latents, initialised from ``train.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, (channels, side, side), num_classes)


def grid_hook(
    cfg: ImageRunConfig, flow: Flow, decoder: Any, out_dir: Path, shape: tuple[int, int, int], num_classes: int
) -> Hook:
    """A PNG grid every ``train.sample_every`` steps (main process): one row per class (named), fixed noise, the
    EMA model; sampled and decoded on the model's device in ``sample.precision``. Without a decoder: no grid."""
    from ..eval.image_io import save_image_grid
    from ..precision import precision_scope
    from ..sampler import generate

    names = class_names(cfg, num_classes)

    def grid(step: int, model: nn.Module) -> None:
        if decoder is None:
            return
        per = cfg.sample.grid_per_class
        device = next(model.parameters()).device
        labels = torch.arange(num_classes, device=device).repeat_interleave(per)
        g = torch.Generator(device=device).manual_seed(cfg.sample.seed)
        z = generate(
            model, flow, (labels.shape[0], *shape), cfg.sample, generator=g, labels=labels, null_class=num_classes
        )
        dec = decoder.to(device)
        with torch.no_grad(), precision_scope(cfg.sample.precision, device):
            images = dec.decode(z.to(dtype=dec.dtype)).float().cpu()
        save_image_grid(
            images,
            out_dir / "samples" / f"step_{step:08d}.png",
            nrow=per,
            row_labels=names,
            title=f"{cfg.name}, step {step}",
        )

    return Hook(cfg.train.sample_every, grid)


def eval_hook(
    cfg: ImageRunConfig,
    flow: Flow,
    decoder: Any,
    shape: tuple[int, int, int],
    num_classes: int,
    evaluator: Any = None,
    skip_step: int | None = None,
) -> Hook:
    """Evaluations every ``train.eval_every`` steps on ``eval.samples`` samples with fixed noise (``eval.seed``), in
    chunks of ``eval.batch_size``: the built-in classifier's FD and accuracy on the built-in data (``evaluator``,
    default the cached built-in one), FID (and IS) against ``eval.reference`` (local Inception weights) on a latent
    cache. The hook runs on every process: each samples, decodes and scores its share of the chunks on its own device
    and the features are gathered (:class:`~manifold_fm.eval.sample_quality.SampleQuality`), so the numbers do not
    depend on the process count. ``skip_step``: a step left to the caller (e.g. a final evaluation with more
    samples)."""
    from ..eval.sample_quality import SampleQuality

    if evaluator is None:
        if cfg.data.source == "builtin":
            from ..eval.classifier import builtin_evaluator

            evaluator = builtin_evaluator()  # the shipped classifier; images are resized to its size
        else:
            from ..eval.fid import FidelityEvaluator

            e = cfg.eval
            evaluator = FidelityEvaluator(e.reference, inception_weights=e.inception_weights, batch_size=e.batch_size)
    quality = SampleQuality(flow, cfg.sample, decoder, shape, num_classes, evaluator, batch_size=cfg.eval.batch_size)

    def evaluate(step: int, model: nn.Module) -> dict[str, float]:
        if step == skip_step:
            return {}
        return quality(model, cfg.eval.samples, seed=cfg.eval.seed, distributed=True)

    return Hook(cfg.train.eval_every, evaluate, all_processes=True)


def image_trainer(
    cfg: ImageRunConfig,
    model: nn.Module,
    flow: Flow,
    data: DataSource,
    out: Path,
    *,
    shape: tuple[int, int, int],
    num_classes: int,
    tokenizer_name: str | None,
    latent_normalization: Mapping[str, Any] | None,
    hooks: Sequence[Hook] = (),
    device: str | None = None,
    progress: bool = True,
    progress_position: int = 0,
) -> Trainer:
    """The :class:`~manifold_fm.training.trainer.Trainer` of an image run: the config written to the run folder and
    stored in every checkpoint with what :func:`~manifold_fm.training.runs.load_run` needs to rebuild the run
    (latent shape, classes, tokenizer, the generated latents' normalisation)."""
    plain = to_dict(cfg)
    return Trainer(
        FlowObjective(model, flow, cfg.optim, null_class=num_classes),
        data,
        cfg.train,
        out,
        hooks=hooks,
        fingerprint={k: plain[k] for k in RESUME_SECTIONS},
        config=plain,
        device=device,
        progress=progress,
        progress_position=progress_position,
        meta={
            "config": plain,
            "latent_shape": list(shape),
            "num_classes": num_classes,
            "tokenizer": tokenizer_name,
            "latent_normalization": latent_normalization,
        },
    )


def train_image(
    config: str | Path | Mapping[str, Any] | ImageRunConfig | None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    resume: bool = False,
    *,
    progress: bool = True,
    hooks: Sequence[Hook] = (),
    device: str | None = None,
    overwrite: bool = False,
    checkpoint: str | int | Path | None = None,
) -> Path:
    """Train a SiT flow on image latents as configured; returns the final checkpoint folder.

    ``hooks`` (e.g. evaluations, :class:`~manifold_fm.training.trainer.Hook`) run after the sample-grid hook.
    ``overwrite``: replace the run in ``out_dir`` once the config, tokenizer and data have loaded. ``checkpoint``
    (with ``resume``): the kept checkpoint to continue from (a step or a ``step_*`` folder; default the latest).
    """
    cfg = config if isinstance(config, ImageRunConfig) and not overrides else load_image_config(config, overrides)
    out = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
    with using_threads(cfg.train.threads or torch.get_num_threads()):  # train.threads null: keep the count
        return _train_image(cfg, out, resume, overwrite, progress, hooks, device, checkpoint)


def _train_image(
    cfg: ImageRunConfig,
    out: Path,
    resume: bool,
    overwrite: bool,
    progress: bool,
    hooks: Sequence[Hook],
    device: str | None,
    checkpoint: str | int | Path | None = None,
) -> Path:
    # the tokenizer is loaded where it is used: by every process to encode the built-in images, else only by the
    # processes that decode (grids: the main process; evaluations: every process, each on its own device)
    tokenizer = load_tokenizer(cfg, progress=progress) if cfg.data.source == "builtin" else None
    lat = build_latents(cfg, tokenizer, progress=progress)
    channels, side, num_classes = lat.channels, lat.side, lat.num_classes
    flow = latent_flow(cfg.flow, channels)
    model = image_model(cfg, channels, side, num_classes)
    all_hooks = []
    decoder = None
    if (cfg.train.sample_every or cfg.train.eval_every) and cfg.tokenizer.kind != "none":
        if _spherical(cfg):
            _check_decoder_state(cfg)  # now, not at the first grid

        def load() -> Any:
            base = tokenizer if tokenizer is not None else load_tokenizer(cfg, progress=False)
            return run_decoder(cfg, base, lat.normalization)

        decoder = LazyDecoder(load)
    if cfg.train.sample_every:
        all_hooks.append(grid_hook(cfg, flow, decoder, out, (channels, side, side), num_classes))
    if cfg.train.eval_every:
        all_hooks.append(eval_hook(cfg, flow, decoder, (channels, side, side), num_classes))
    # what the run folder records: the decoder relative to the run folder (it may move with it)
    tok = cfg.tokenizer.model_copy(update={"decoder_state": recorded_path(cfg.tokenizer.decoder_state, out)})
    trainer = image_trainer(
        cfg.model_copy(update={"tokenizer": tok}),
        model,
        flow,
        lat.data,
        out,
        shape=(channels, side, side),
        num_classes=num_classes,
        tokenizer_name=tokenizer.name if tokenizer is not None else tokenizer_name(cfg),
        latent_normalization=lat.normalization,
        hooks=[*all_hooks, *hooks],
        device=device,
        progress=progress,
    )
    try:
        return trainer.fit(resume=resume, overwrite=overwrite, checkpoint=checkpoint)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
