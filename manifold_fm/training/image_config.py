"""The image-training config (``kind: image`` YAML files), validated on load by :mod:`manifold_fm.config`.

Every section has defaults sized for a 2-core CPU; the ImageNet configs override them. Load with::

    cfg = load_image_config("image-builtin", overrides=["train.steps=50", "flow.mode=linear"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, load_config


@dataclass
class ModelConfig:
    """Which SiT (``SiT-B/2``, ``SiT-Tiny/1``...); ``time_scale`` multiplies ``t`` before its sinusoidal embedding."""

    arch: str = "SiT-Micro/1"
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        from ..models.sit import SiTSpec

        try:
            SiTSpec.parse(self.arch)
        except ValueError as exc:
            raise ConfigError(f"model.arch: {exc}") from None


@dataclass
class TokenizerConfig:
    """The autoencoder that turns images into latents (and back for sample grids).

    ``builtin``: the tiny VAE shipped/cached by :func:`manifold_fm.tokenizers.builtin_tokenizer`; ``diffusers``: a
    diffusers ``AutoencoderKL``-family model from ``name_or_path`` (hub id or local folder). ``decoder_state``: a
    decoder finetuned for projected latents (from ``manifold-fm finetune-decoder``), used in spherical mode.
    """

    kind: Literal["builtin", "diffusers", "none"] = "builtin"
    name_or_path: str | None = None
    subfolder: str | None = None
    vae_kind: Literal["kl", "flux2"] = "kl"
    cache_dir: Path | None = None
    decoder_state: Path | None = None


@dataclass
class DataConfig:
    """Training data: the built-in images (encoded once in memory), or a latent cache from ``extract-latents``."""

    source: Literal["builtin", "latents"] = "builtin"
    latents: Path | None = None
    per_class: int = 300
    size: int = 32
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.source == "latents" and self.latents is None:
            raise ConfigError("data.latents: required when data.source is 'latents' (a folder from extract-latents)")
        if self.per_class < 1:
            raise ConfigError(f"data.per_class: must be >= 1, got {self.per_class}")


@dataclass
class FlowConfig:
    """Spherical (TokenSpheres prior, geodesic path, tangent loss, exp-map sampler) or linear flow matching."""

    mode: Literal["spherical", "linear"] = "spherical"
    time: Literal["uniform", "logit_normal"] = "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    time_shift: float = 1.0


@dataclass
class OptimConfig:
    """AdamW with an optional linear warm-up, then constant (as SiT)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be positive, got {self.lr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip: must be positive or null, got {self.grad_clip}")


@dataclass
class TrainConfig:
    """Loop settings. ``batch_size`` is the global batch (split across processes)."""

    steps: int = 1000
    batch_size: int = 64
    seed: int = 0
    class_dropout: float = 0.1
    ema_decay: float = 0.999
    ema_warmup: int = 0
    # YAML reads a bare `no` as false, so false is accepted as "no".
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] | bool = "auto"
    compile: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 2
    log_every: int = 10
    sample_every: int | None = None
    eval_every: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.mixed_precision is False:
            self.mixed_precision = "no"
        elif self.mixed_precision is True:
            raise ConfigError("train.mixed_precision: expected one of 'auto', 'no', 'bf16', 'fp16', got true")
        if self.steps < 1:
            raise ConfigError(f"train.steps: must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size: must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"train.class_dropout: must be in [0, 1), got {self.class_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"train.checkpoint_every: must be >= 1, got {self.checkpoint_every}")


@dataclass
class SampleConfig:
    """Sampler used for grids during training and as the default of ``manifold-fm sample``."""

    method: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] | None = None
    grid_per_class: int = 4
    seed: int = 0


@dataclass
class ImageRunConfig:
    """A whole image run: ``kind: image`` plus the sections above."""

    kind: Literal["image"] = "image"
    name: str = "image"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.data.source == "builtin" and self.tokenizer.kind == "none":
            raise ConfigError("tokenizer.kind: 'none' needs data.source 'latents' (built-in images must be encoded)")


def translate_overrides(overrides: Sequence[str]) -> list[str]:
    """Map ``train``'s generic shortcuts onto image keys: ``path=linear|geodesic`` -> ``flow.mode=linear|spherical``."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "path":
            value = value.strip()
            mode = {"geodesic": "spherical", "spherical": "spherical", "linear": "linear"}.get(value)
            if mode is None:
                raise ConfigError(f"path: {value!r} is not one of 'geodesic', 'linear'")
            item = f"flow.mode={mode}"
        out.append(item)
    return out


def load_image_config(
    source: str | Path | Mapping[str, Any] | ImageRunConfig | None, overrides: Sequence[str] = ()
) -> ImageRunConfig:
    """A validated :class:`ImageRunConfig` from a built-in name, a YAML path, a mapping (or a config plus overrides)."""
    if isinstance(source, ImageRunConfig):
        from ..config import to_dict

        source = to_dict(source)
    return load_config(ImageRunConfig, source, translate_overrides(overrides))
