"""Image flow training: tokenizer + latents + SiT + :class:`~manifold_fm.training.trainer.FlowTrainer`.

``train_image(config, overrides, out_dir, resume)`` is what ``manifold-fm train --config <kind: image YAML>`` runs.
A run folder holds ``config.yaml``, ``checkpoints/``, ``metrics.jsonl`` and ``samples/step_XXXXXXXX.png`` grids.

Which latents each mode trains on: linear runs the normalised latents (``tokenizer.encode``, or a cache as stored);
spherical runs the raw encoder output projected per token (``SphericalTokenizer.encode``; a cache is read
denormalised with its manifest's normalisation), so one cache serves both modes. The checkpoint meta records the
generated latents' normalisation (``latent_normalization``), which grids and ``manifold-fm sample`` decode with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import save_config
from .checkpoint import CheckpointError
from .image_config import ImageRunConfig, load_image_config
from .trainer import DatasetLatents, FlowSetup, FlowTrainer, TensorLatents, flow_from_config


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
        raise ValueError("tokenizer.name_or_path: required for a diffusers tokenizer (hub id or local folder)")
    return DiffusersTokenizer.from_pretrained(tc.name_or_path, subfolder=tc.subfolder, kind=tc.vae_kind).eval()


def sample_decoder(cfg: ImageRunConfig, base: Any) -> Any:
    """What decodes generated latents: spherical runs use ``SphericalTokenizer(base, decoder_state)``."""
    if base is None or cfg.flow.mode != "spherical":
        return base
    from ..tokenizers import SphericalTokenizer

    state = None
    if cfg.tokenizer.decoder_state is not None:
        path = Path(cfg.tokenizer.decoder_state)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.decoder_state: {path} does not exist (run finetune-decoder first)")
        from safetensors.torch import load_file

        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    return SphericalTokenizer(base, decoder_state=state).eval()


@torch.no_grad()
def encode_dataset(tokenizer: Any, images: Tensor, batch_size: int = 256, progress: bool = False,
                   raw: bool = False) -> Tensor:
    """Latents of ``images`` (``(N, 3, H, W)`` in [-1, 1]) in batches, in float32 on the CPU.

    ``raw=False``: ``tokenizer.encode`` (normalised, what the linear baseline trains on); ``raw=True``:
    ``tokenizer.encode_raw`` (the encoder's posterior mode, which spherical training projects to radius sqrt(C)).
    """
    from tqdm.auto import tqdm

    encode = tokenizer.encode_raw if raw else tokenizer.encode
    out = []
    for i in tqdm(range(0, images.shape[0], batch_size), desc="encode", disable=not progress, leave=False):
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

    data: Any
    channels: int
    side: int
    num_classes: int
    normalization: dict[str, Any] | None


_PROJECTED = {"kind": "identity", "shift": 0.0, "scale": 1.0, "meta": {"projected": True}}


def build_latents(cfg: ImageRunConfig, tokenizer: Any, progress: bool = True) -> ImageLatents:
    """Training latents for ``cfg.flow.mode``.

    Spherical mode trains on ``projx(raw)``: the built-in images are encoded raw, and a latent cache is read
    denormalised with its manifest's normalisation (``LatentCache(raw=True)``), so one cache serves a linear and a
    spherical run and the spherical data are those the finetuned decoder was trained on. A cache written with
    ``extract-latents --spherical`` is already projected and serves only spherical runs.
    """
    d = cfg.data
    spherical = cfg.flow.mode == "spherical"
    if d.source == "builtin":
        from ..data.images import BuiltinImages

        ds = BuiltinImages("train", size=d.size, per_class=d.per_class, seed=d.seed)
        images, labels = ds.tensors()
        latents = encode_dataset(tokenizer, images, progress=progress, raw=spherical)
        norm = _PROJECTED if spherical else tokenizer.normalization.to_dict()
        return ImageLatents(TensorLatents(latents, labels), latents.shape[1], latents.shape[-1], ds.num_classes, norm)
    from ..data.latents import LatentCache

    if d.latents is None or not Path(d.latents).is_dir():
        raise FileNotFoundError(
            f"data.latents: {d.latents} is not a folder; create it with manifold-fm extract-latents"
        )
    cache = LatentCache(d.latents, raw=spherical)
    manifest = cache.manifest
    if cache.spherical and not spherical:
        raise ValueError(
            f"latent cache {d.latents} holds projected latents (extract-latents --spherical), which a linear run "
            "cannot use; extract a cache without --spherical (one such cache serves both modes)"
        )
    c, h, _ = manifest.get("latent_shape") or tuple(cache[0][0].shape)
    num_classes = int(manifest.get("num_classes") or len(manifest.get("class_names") or []))
    if num_classes < 1:
        raise ValueError(f"latent cache {d.latents}: its manifest names no classes (num_classes/class_names)")
    if len(cache) < cfg.train.batch_size:
        raise ValueError(f"latent cache {d.latents} holds {len(cache)} latents, fewer than train.batch_size")
    norm = _PROJECTED if spherical else cache.normalization.to_dict()
    return ImageLatents(DatasetLatents(cache, num_workers=d.num_workers), int(c), int(h), num_classes, norm)


def run_decoder(cfg: ImageRunConfig, base: Any, normalization: Mapping[str, Any] | None = None) -> Any:
    """What decodes a run's generated latents (``None`` without a tokenizer).

    Linear runs: ``base`` with ``normalization`` (the training latents' normalisation, recorded in the checkpoint
    meta as ``latent_normalization``; ``None`` keeps the tokenizer's own). Spherical runs:
    ``SphericalTokenizer(base, tokenizer.decoder_state)``, which decodes projected raw latents.
    """
    if base is None:
        return None
    if cfg.flow.mode != "spherical" and normalization is not None:
        from ..tokenizers import LatentNormalization

        base.with_normalization(LatentNormalization.from_dict(dict(normalization)))
    return sample_decoder(cfg, base)


def build_model(cfg: ImageRunConfig, channels: int, side: int, num_classes: int) -> nn.Module:
    from ..models.sit import build_sit

    return build_sit(cfg.model.arch, input_size=side, in_channels=channels, num_classes=num_classes,
                     time_scale=cfg.model.time_scale)


def grid_hook(cfg: ImageRunConfig, flow: FlowSetup, decoder: Any, out_dir: Path, shape: tuple[int, int, int],
              num_classes: int) -> Any:
    """``on_sample``: a PNG grid (one row per class, fixed noise) from the EMA model."""
    from ..eval.sampling import SamplerSpec, generate_latents, save_image_grid

    def hook(step: int, model: nn.Module) -> None:
        per = cfg.sample.grid_per_class
        labels = torch.arange(num_classes).repeat_interleave(per)
        spec = SamplerSpec(method=cfg.sample.method, steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale,
                           cfg_interval=cfg.sample.cfg_interval)
        device = next(model.parameters()).device
        z = generate_latents(model, flow, labels.to(device), shape, spec, seed=cfg.sample.seed, null_class=num_classes)
        if decoder is None:
            return
        with torch.no_grad():
            images = decoder.decode(z.to(decoder.device, decoder.dtype)).float().cpu()
        save_image_grid(images, out_dir / "samples" / f"step_{step:08d}.png", nrow=per)

    return hook


def train_image(
    config: str | Path | Mapping[str, Any] | ImageRunConfig | None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    resume: bool = False,
    *,
    progress: bool = True,
    on_eval: Any = None,
    device: str | None = None,
) -> Path:
    """Train a SiT flow on image latents as configured; returns the final checkpoint folder.

    ``on_eval(step, ema_model) -> metrics`` (optional) is called every ``train.eval_every`` steps.
    """
    cfg = load_image_config(config, overrides)
    out = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tokenizer = load_tokenizer(cfg, progress=progress)
    lat = build_latents(cfg, tokenizer, progress=progress)
    channels, side, num_classes = lat.channels, lat.side, lat.num_classes
    flow = flow_from_config(cfg, channels)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, channels, side, num_classes)
    save_config(cfg, out / "config.yaml")
    on_sample = None
    if cfg.train.sample_every:
        decoder = run_decoder(cfg, tokenizer, lat.normalization)
        on_sample = grid_hook(cfg, flow, decoder, out, (channels, side, side), num_classes)
    trainer = FlowTrainer(
        model, flow, lat.data, cfg, out, null_class=num_classes, device=device, on_sample=on_sample,
        on_eval=on_eval, progress=progress,
        meta={"latent_shape": [channels, side, side], "num_classes": num_classes,
              "tokenizer": getattr(tokenizer, "name", None), "latent_normalization": lat.normalization},
    )
    try:
        return trainer.fit(resume=resume)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
