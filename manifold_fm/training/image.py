"""Image flow training: tokenizer + latents + SiT + :class:`~manifold_fm.training.trainer.FlowTrainer`.

``train_image(config, overrides, out_dir, resume)`` is what ``manifold-fm train --config <kind: image YAML>`` runs.
A run folder holds ``config.yaml``, ``checkpoints/``, ``metrics.jsonl`` and ``samples/step_XXXXXXXX.png`` grids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
def encode_dataset(tokenizer: Any, images: Tensor, batch_size: int = 256, progress: bool = False) -> Tensor:
    """Latents of ``images`` (``(N, 3, H, W)`` in [-1, 1]) in batches, in float32 on the CPU."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, images.shape[0], batch_size), desc="encode", disable=not progress, leave=False):
        batch = images[i : i + batch_size].to(tokenizer.device, tokenizer.dtype)
        out.append(tokenizer.encode(batch).float().cpu())
    return torch.cat(out)


def build_latents(cfg: ImageRunConfig, tokenizer: Any, progress: bool = True) -> tuple[Any, int, int, int]:
    """Training latents and their ``(channels, side, num_classes)``."""
    d = cfg.data
    if d.source == "builtin":
        from ..data.images import BuiltinImages

        ds = BuiltinImages("train", size=d.size, per_class=d.per_class, seed=d.seed)
        images, labels = ds.tensors()
        latents = encode_dataset(tokenizer, images, progress=progress)
        return TensorLatents(latents, labels), latents.shape[1], latents.shape[-1], ds.num_classes
    from ..data.latents import LatentCache

    if d.latents is None or not Path(d.latents).is_dir():
        raise FileNotFoundError(
            f"data.latents: {d.latents} is not a folder; create it with manifold-fm extract-latents"
        )
    cache = LatentCache(d.latents)
    manifest = cache.manifest
    c, h, _ = manifest.get("latent_shape") or tuple(cache[0][0].shape)
    num_classes = int(manifest.get("num_classes") or len(manifest.get("class_names") or []))
    if num_classes < 1:
        raise ValueError(f"latent cache {d.latents}: its manifest names no classes (num_classes/class_names)")
    if len(cache) < cfg.train.batch_size:
        raise ValueError(f"latent cache {d.latents} holds {len(cache)} latents, fewer than train.batch_size")
    return DatasetLatents(cache, num_workers=d.num_workers), int(c), int(h), num_classes


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
    data, channels, side, num_classes = build_latents(cfg, tokenizer, progress=progress)
    flow = flow_from_config(cfg, channels)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, channels, side, num_classes)
    save_config(cfg, out / "config.yaml")
    on_sample = None
    if cfg.train.sample_every:
        on_sample = grid_hook(cfg, flow, sample_decoder(cfg, tokenizer), out, (channels, side, side), num_classes)
    trainer = FlowTrainer(
        model, flow, data, cfg, out, null_class=num_classes, device=device, on_sample=on_sample, on_eval=on_eval,
        progress=progress,
        meta={"latent_shape": [channels, side, side], "num_classes": num_classes,
              "tokenizer": getattr(tokenizer, "name", None)},
    )
    try:
        return trainer.fit(resume=resume)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
