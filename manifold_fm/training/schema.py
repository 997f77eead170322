"""The run configuration: one schema for toy, image and default runs, with the sections they share.

Every run is a YAML file with a top-level ``kind`` (``toy``, ``image``, ``default`` or ``finetune``) and sections::

    model    the velocity network (an MLP for toy manifolds, a SiT for latents)      ModelConfig
    flow     path, latent space, training-time distribution, coupling                FlowConfig
    optim    AdamW, learning-rate schedule, gradient clipping                       OptimConfig
    train    steps, batch, seed, EMA, precision, checkpoints, logging, hooks        TrainConfig
    sample   the sampler spec (solver, steps, guidance) plus grid settings          SampleConfig
    data     toy: a toy dataset; image: built-in images or a latent cache; default: the built-in split sizes
    eval     toy: the likelihood evaluation; default: the sample-quality evaluation
    tokenizer, finetune, modes, parallel: latent-image runs and the default run

A ``kind: finetune`` run (a decoder finetune, ``manifold-fm finetune-decoder``) has ``train`` and ``optim`` (the same
classes with the finetune's defaults), its own ``finetune`` section and a ``source`` record.

``model``, ``flow``, ``optim``, ``train`` and ``sample`` are the same classes in every kind, so a key means the same
everywhere (``train.steps``, ``sample.method``...). Load any run with :func:`load_run_config`; an unknown key, a
bad value or a combination that is not supported is one :class:`~manifold_fm.config.ConfigError` line naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..config import ConfigError, Section, StrictBool, load_config, read_source, validate
from ..sampler import SamplerSpec

# ----------------------------------------------------------------------------------------------- shared sections


class ModelConfig(Section):
    """The velocity network: ``arch: mlp`` (toy manifolds: ``hidden``, ``depth``, ``time_dim``) or a SiT name such
    as ``SiT-B/2`` (latents: ``time_scale`` multiplies ``t`` before its sinusoidal embedding)."""

    arch: str = "mlp"
    hidden: int = Field(256, ge=1)
    depth: int = Field(3, ge=0)
    time_dim: int = Field(64, ge=2)
    time_scale: float = 1.0

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch == "mlp":
            return arch
        from ..models.sit import SiTSpec

        SiTSpec.parse(arch)  # ValueError names the valid ones
        return arch

    @property
    def is_sit(self) -> bool:
        return self.arch != "mlp"

    @model_validator(mode="after")
    def _options_fit_the_arch(self) -> ModelConfig:
        fields = type(self).model_fields
        mlp_only = [k for k in ("hidden", "depth", "time_dim") if getattr(self, k) != fields[k].default]
        if self.is_sit and mlp_only:
            raise ValueError(f"{mlp_only[0]}: applies to arch 'mlp' only, not {self.arch}")
        return self


#: The paper's flow variants (its ablation, SiT-B/2 on FLUX.2) by name: the ``flow`` settings each one fixes.
FLOW_PRESETS: dict[str, dict[str, str]] = {
    "linear": {"latent": "vanilla", "prior": "gaussian", "path": "linear", "projection": "off", "sampler": "ambient"},
    "shell": {"latent": "vanilla", "prior": "gaussian", "path": "shell", "projection": "off", "sampler": "ambient"},
    "spherical-linear": {
        "latent": "spherical",
        "prior": "uniform",
        "path": "linear",
        "projection": "off",
        "sampler": "ambient",
    },
    "spherical": {
        "latent": "spherical",
        "prior": "uniform",
        "path": "geodesic",
        "projection": "on",
        "sampler": "exp-map",
    },
}
_LATENT_KEYS = ("latent", "prior", "projection", "sampler")


class FlowConfig(Section):
    """The flow, as independent settings (unset ones follow from the others; latent-image runs only except
    ``path``, ``time*`` and ``coupling``):

    - ``path``: ``geodesic`` of the run's manifold (slerp on token spheres), the ambient straight ``linear`` line
      (a chord for spherical latents), or ``shell`` (token radii interpolated linearly, directions along the arc);
    - ``latent``: ``spherical`` (tokens projected to radius ``sqrt(d)``, decoded by the finetuned decoder) or
      ``vanilla`` (the tokenizer's normalised latents); default ``spherical`` for a geodesic path, else ``vanilla``;
    - ``prior``: ``uniform`` on the token spheres or ``gaussian``; default: the latent space's own;
    - ``projection``: the loss's tangent projection, ``on`` (needs the geodesic path) or ``off``; default ``on``
      for the geodesic path;
    - ``sampler``: ``exp-map`` steps on the token spheres (needs spherical latents) or ``ambient`` steps in the
      latent space (projected onto the spheres at the end for spherical latents); default ``exp-map`` for the
      geodesic path; the solver itself (Euler, Heun, RK4, ...) is ``sample.method``;
    - ``time``, ``time_mean``, ``time_std``, ``time_shift``: the distribution of training times (``uniform`` or
      ``logit_normal``, then the SD3 shift); ``coupling``: ``independent`` or minibatch ``ot``;
    - ``ot_solver``, ``ot_reg``: how ``ot`` assigns: ``exact`` (scipy, on the CPU: one transfer of the cost matrix
      per step), ``sinkhorn`` (entropic OT on the batch's device, rounded to a permutation, with no host read on an
      accelerator) or ``auto`` (exact for batches of up to 1024 rows per process, Sinkhorn above);
      ``ot_reg`` > 0 is Sinkhorn's regularisation relative to the spread of the cost (smaller: closer to exact OT,
      more iterations; see :func:`~manifold_fm.coupling.sinkhorn_log_plan`).

    The paper's four arms are :data:`FLOW_PRESETS` (``linear``, ``shell``, ``spherical-linear``, ``spherical``);
    ``preset: NAME`` in a config (or ``--set flow.preset=NAME``) sets all five settings to one of them, whatever
    the file says.
    """

    path: Literal["geodesic", "linear", "shell"] = "geodesic"
    latent: Literal["spherical", "vanilla"] | None = None
    prior: Literal["uniform", "gaussian"] | None = None
    projection: Literal["on", "off"] | None = None
    sampler: Literal["exp-map", "ambient"] | None = None
    time: Literal["uniform", "logit_normal"] = "uniform"
    time_mean: float = 0.0
    time_std: float = Field(1.0, gt=0)
    time_shift: float = Field(1.0, gt=0)
    coupling: Literal["independent", "ot"] = "independent"
    ot_solver: Literal["exact", "sinkhorn", "auto"] = "auto"
    ot_reg: float = Field(0.05, gt=0)

    @property
    def resolved(self) -> dict[str, str]:
        """Every latent-image setting, with the unset ones filled in from the others."""
        geodesic = self.path == "geodesic"
        latent = self.latent or ("spherical" if geodesic else "vanilla")
        return {
            "latent": latent,
            "prior": self.prior or ("uniform" if latent == "spherical" else "gaussian"),
            "path": self.path,
            "projection": self.projection or ("on" if geodesic else "off"),
            "sampler": self.sampler or ("exp-map" if geodesic else "ambient"),
        }

    @property
    def resolved_latent(self) -> str:
        return self.resolved["latent"]

    @property
    def preset(self) -> str:
        """The :data:`FLOW_PRESETS` name of these settings, or ``custom`` for another valid combination."""
        settings = self.resolved
        return next((name for name, fields in FLOW_PRESETS.items() if fields == settings), "custom")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("preset") is None:
            if isinstance(data, Mapping) and "preset" in data:
                data = {k: v for k, v in data.items() if k != "preset"}
            return data
        data = dict(data)
        name = data.pop("preset")
        if name not in FLOW_PRESETS:
            raise ValueError(f"preset: {name!r} is not one of {', '.join(map(repr, FLOW_PRESETS))}")
        return {**data, **FLOW_PRESETS[name]}

    @field_validator("projection", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off as true/false
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self) -> FlowConfig:
        r = self.resolved
        if r["path"] == "geodesic" and (r["latent"], r["prior"]) != ("spherical", "uniform"):
            raise ValueError(
                "path: the geodesic (slerp) path joins points on the token spheres: it needs "
                "latent spherical and prior uniform"
            )
        if r["projection"] == "on" and r["path"] != "geodesic":
            raise ValueError("projection: the tangent projection needs interpolants on the spheres (path geodesic)")
        if r["sampler"] == "exp-map" and r["latent"] != "spherical":
            raise ValueError("sampler: exp-map steps need spherical latents; use sampler ambient")
        return self


class OptimConfig(Section):
    """AdamW; a linear warm-up over ``warmup_steps``, then a ``constant`` rate (as SiT) or a ``cosine`` decay to
    ``lr * min_lr_ratio`` at ``train.steps``; gradients clipped to ``grad_clip`` (``null``: off)."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)


#: Experiment trackers accelerate can log to (``train.log_with``); each needs its own package installed.
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive")


class TrainConfig(Section):
    """The training loop. ``batch_size`` is the global batch (split across processes, then into ``grad_accum``
    micro-batches per process); ``ema_decay: 0`` keeps the EMA equal to the raw weights; ``mixed_precision`` is the
    forward pass's autocast (``auto``: bf16 on GPUs that support it, full precision on CPU); a checkpoint is written
    every ``checkpoint_every`` steps and the newest ``keep_checkpoints`` are kept (``null``: all), plus every one
    whose step is a multiple of ``keep_every`` (e.g. one each epoch for crashes, every 10th kept for evaluations);
    ``threads`` sets torch's intra-op threads (``null``: leave as is); hooks run every ``sample_every`` /
    ``eval_every`` steps (``null``: never); ``log_with`` adds accelerate trackers (``tensorboard``, ``wandb``, ...)
    to the always-written ``metrics.jsonl``."""

    steps: int = Field(1000, ge=0)
    batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    class_dropout: float = Field(0.1, ge=0, lt=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: int = Field(0, ge=0)
    # YAML reads a bare `no` as false, so false is accepted as "no".
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    compile: StrictBool = False
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int | None = Field(2, ge=1)
    keep_every: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int | None = Field(None, ge=1)
    eval_every: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    log_with: list[Literal[TRACKERS]] = Field(default_factory=list)  # type: ignore[valid-type]

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _false_is_no(cls, value: Any) -> Any:
        if value is False:
            return "no"
        if value is True:
            raise ValueError("expected one of 'auto', 'no', 'bf16', 'fp16', got true")
        return value


class SampleConfig(SamplerSpec):
    """The sampler spec (:class:`~manifold_fm.sampler.SamplerSpec`: solver, steps, guidance) plus the noise
    ``seed`` of grids, ``grid_per_class`` samples per class in training grids, and whether to sample the EMA
    weights."""

    seed: int = 0
    grid_per_class: int = Field(4, ge=1)
    ema: StrictBool = True


def _section(cls: type[Section]) -> Any:
    return Field(default_factory=cls)


class RunBase(Section):
    """What every run has: ``kind``, ``name`` and the five shared sections."""

    name: str = "run"
    model: ModelConfig = _section(ModelConfig)
    flow: FlowConfig = _section(FlowConfig)
    optim: OptimConfig = _section(OptimConfig)
    train: TrainConfig = _section(TrainConfig)
    sample: SampleConfig = _section(SampleConfig)


# ------------------------------------------------------------------------------------------------------- toy


class ManifoldSpec(Section):
    """The manifold of a run with its own data: a name of the registry (``manifold-fm manifolds``: ``sphere``,
    ``flat_torus``, ``product``, ``poincare_ball``, ``lorentz``, ``spd``, ...) or a user's
    :class:`~manifold_fm.manifolds.Manifold` subclass by import path ``pkg.module:Class``, with its constructor
    ``params``. A bare string is the name with no params."""

    name: str = "sphere"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class ToyDataConfig(Section):
    """The run's data: a built-in synthetic dataset of :mod:`manifold_fm.data.toy` by ``name`` with its constructor
    ``params`` (it brings its manifold and its true density), or a ``file`` of points (CSV, NPY, NPZ, PT; see
    :mod:`manifold_fm.data.points`) on the run's ``manifold``:

    - ``latlon``: the file's two columns are latitude and longitude (``degrees`` or ``radians``), converted to the
      unit sphere ``S^2``;
    - ``tolerance``: how far from the manifold a point may be (``Manifold.point_error``); farther rows are an error
      naming them, unless ``project: true`` projects them;
    - ``split``: train/val/test fractions (80/10/10), drawn with ``split_seed``."""

    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    file: Path | None = None
    latlon: Literal["degrees", "radians"] | None = None
    project: StrictBool = False
    tolerance: float = Field(1e-4, gt=0)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> ToyDataConfig:
        if self.file is not None and (self.name is not None or self.params):
            raise ValueError("file: give either a built-in dataset (name, params) or a file of points, not both")
        if self.file is None and (self.latlon is not None or self.project):
            raise ValueError("latlon: applies to a file of points (data.file)")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split: three fractions >= 0 summing to 1 (train, val, test), got {list(self.split)}")
        if self.split[0] <= 0:
            raise ValueError("split: the training fraction must be > 0")
        return self

    @property
    def dataset(self) -> str:
        """The built-in dataset's name (``vmf`` when neither it nor a file is given)."""
        return self.name or "vmf"


class ToyEvalConfig(Section):
    """Evaluation of the learned density:

    - after training: test NLL on the test split (a file) or ``test_samples`` fresh points (a built-in dataset),
      with ``likelihood_steps`` steps of ``sample.method`` and ``exact`` or ``hutchinson`` divergence, and
      ``plot_samples`` samples for the plot, all from ``seed``; ``check_steps`` (default twice ``likelihood_steps``):
      a second step count the test NLL is recomputed with, to check the solver (a warning when the two differ by more
      than the standard error; 0: no check);
    - during training, every ``val_every`` steps (``null``: never): the validation NLL (the validation split, or
      ``val_samples`` fresh points) with ``val_steps`` steps (default ``likelihood_steps``); the best weights by it
      are kept (``best.safetensors``) and used for the final evaluation; ``patience``: stop after that many
      validations without improvement (``null``: never stop early)."""

    test_samples: int = Field(1000, ge=1)
    plot_samples: int = Field(2000, ge=1)
    likelihood_steps: int = Field(40, ge=1)
    check_steps: int | None = Field(None, ge=0)
    divergence: Literal["exact", "hutchinson"] = "exact"
    seed: int = 1234
    val_every: int | None = Field(None, ge=1)
    val_samples: int = Field(1000, ge=1)
    val_steps: int | None = Field(None, ge=1)
    patience: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _patience_needs_validation(self) -> ToyEvalConfig:
        if self.patience is not None and self.val_every is None:
            raise ValueError("patience: early stopping needs validations; set eval.val_every too")
        return self


class ToyRunConfig(RunBase):
    """``kind: manifold`` (``toy`` is its older name, accepted as the same): a small MLP flow on a manifold, trained on
    a built-in synthetic dataset (evaluated against its known density) or on a file of points (split into
    train/val/test)."""

    kind: Literal["manifold", "toy"] = "manifold"
    name: str = "manifold"
    manifold: ManifoldSpec | None = None
    data: ToyDataConfig = _section(ToyDataConfig)
    eval: ToyEvalConfig = _section(ToyEvalConfig)

    @model_validator(mode="after")
    def _toy_fits(self) -> ToyRunConfig:
        latent_only = [k for k in _LATENT_KEYS if getattr(self.flow, k) is not None]
        if latent_only:
            raise ValueError(
                f"flow.{latent_only[0]}: applies to latent-image runs; a manifold run's space, prior and "
                "sampler are its manifold's"
            )
        if self.flow.path == "shell":
            raise ValueError("flow.path: 'shell' is a latent-image path (token radii and directions)")
        if self.model.is_sit:
            raise ValueError(f"model.arch: manifold runs train arch 'mlp', got {self.model.arch}")
        if self.data.file is None and self.manifold is not None:
            raise ValueError(
                f"manifold: the built-in dataset {self.data.dataset!r} lives on its own manifold; give data.file to "
                "train on your points on this manifold, or drop manifold"
            )
        if self.data.latlon is not None and self.manifold is not None and self.manifold.name != "sphere":
            raise ValueError("manifold: latitude/longitude data live on the unit sphere (manifold: sphere)")
        return self


#: ``kind: manifold`` runs (:class:`ToyRunConfig`, whose older kind name is ``toy``).
ManifoldRunConfig = ToyRunConfig


# ----------------------------------------------------------------------------------------------------- image


class TokenizerConfig(Section):
    """The autoencoder that turns images into latents (and back for sample grids).

    ``builtin``: the tiny VAE shipped/cached by :func:`manifold_fm.tokenizers.builtin_tokenizer` (cached in
    ``cache_dir``); ``diffusers``: a diffusers ``AutoencoderKL``-family model from ``name_or_path`` (hub id or local
    folder); ``none``: latents only (no decoding). ``decoder_state``: a decoder finetuned for projected latents
    (``manifold-fm finetune-decoder``), used by spherical-latent runs. A relative path given to ``train`` is relative
    to the working directory; the run records it relative to its run folder and resolves it against the run folder
    when loaded, so a run moved together with its decoder still loads (:mod:`~manifold_fm.training.run_folder`).
    """

    kind: Literal["builtin", "diffusers", "none"] = "builtin"
    name_or_path: str | None = None
    subfolder: str | None = None
    vae_kind: Literal["kl", "flux2"] = "kl"
    cache_dir: Path | None = None
    decoder_state: Path | None = None


class ImageDataConfig(Section):
    """Training data: the built-in images (``per_class`` per class at ``size`` px, encoded once in memory), or a
    latent cache from ``extract-latents`` (``latents``, read by ``num_workers`` workers)."""

    source: Literal["builtin", "latents"] = "builtin"
    latents: Path | None = None
    per_class: int = Field(300, ge=1)
    size: int = Field(32, ge=8)
    seed: int = 0
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _latents_named(self) -> ImageDataConfig:
        if self.source == "latents" and self.latents is None:
            raise ValueError("latents: required when data.source is 'latents' (a folder from extract-latents)")
        return self


class ImageEvalConfig(Section):
    """Evaluations during training (every ``train.eval_every`` steps) on a fixed set of ``samples`` class-balanced
    samples drawn with noise ``seed``: the FD-builtin-classifier and its accuracy on the built-in data; FID (through
    torch-fidelity) against ``reference`` with local ``inception_weights`` on a latent cache. The final step is
    evaluated too."""

    samples: int = Field(240, ge=2)
    seed: int = 1
    inception_weights: Path | None = None
    reference: Path | None = None
    batch_size: int = Field(64, ge=1)


def _default_sit(data: Any, arch: str) -> Any:
    """Before validation: a latent run's ``model`` section without ``arch`` gets ``arch`` (not the MLP)."""
    if isinstance(data, Mapping):
        data = dict(data)
        model = data.get("model")
        if model is None:
            data["model"] = {"arch": arch}
        elif isinstance(model, Mapping) and "arch" not in model:
            data["model"] = {"arch": arch, **model}
    return data


class ImageRunConfig(RunBase):
    """``kind: image``: a class-conditional SiT flow on latent images."""

    kind: Literal["image"] = "image"
    name: str = "image"
    tokenizer: TokenizerConfig = _section(TokenizerConfig)
    data: ImageDataConfig = _section(ImageDataConfig)
    eval: ImageEvalConfig = _section(ImageEvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _sit_by_default(cls, data: Any) -> Any:
        return _default_sit(data, "SiT-Micro/1")

    @model_validator(mode="after")
    def _image_fits(self) -> ImageRunConfig:
        if not self.model.is_sit:
            raise ValueError("model.arch: image runs train a SiT (e.g. SiT-B/2), not 'mlp'")
        if self.data.source == "builtin" and self.tokenizer.kind == "none":
            raise ValueError("tokenizer.kind: 'none' needs data.source 'latents' (built-in images must be encoded)")
        if self.train.eval_every and self.data.source == "latents":
            missing = [k for k in ("inception_weights", "reference") if getattr(self.eval, k) is None]
            if missing or self.tokenizer.kind == "none":
                raise ValueError(
                    f"eval.{missing[0] if missing else 'tokenizer'}: FID during training on a latent cache needs "
                    "eval.inception_weights, eval.reference and a tokenizer to decode with"
                )
        return self


# --------------------------------------------------------------------------------------------------- default


class DefaultDataConfig(Section):
    """The built-in images of the default run: ``per_class`` training and ``test_per_class`` held-out images."""

    per_class: int = Field(300, ge=2)
    test_per_class: int = Field(100, ge=2)


class FinetuneConfig(Section):
    """The default run's spherical decoder finetune (encoder frozen): ``steps`` at ``batch_size``, with the recipe
    :func:`default_finetune_config` pins."""

    steps: int = Field(200, ge=0)
    batch_size: int = Field(16, ge=1)


class DefaultEvalConfig(Section):
    """Sample quality: ``num_samples`` final samples per mode, ``samples`` per evaluation during training (every
    ``train.eval_every`` steps), scored by the shipped built-in classifier."""

    num_samples: int = Field(600, ge=2)
    samples: int = Field(240, ge=2)


class DefaultRunConfig(RunBase):
    """``kind: default``: the whole method at small scale (``manifold-fm train`` with no config): a spherical
    decoder finetune, then one image run per flow preset in ``modes`` with the same sections, in parallel
    processes with ``parallel``, each sampled and scored."""

    kind: Literal["default"] = "default"
    name: str = "default"
    tokenizer: TokenizerConfig = _section(TokenizerConfig)
    data: DefaultDataConfig = _section(DefaultDataConfig)
    finetune: FinetuneConfig = _section(FinetuneConfig)
    eval: DefaultEvalConfig = _section(DefaultEvalConfig)
    modes: list[str] = Field(default_factory=lambda: ["spherical", "linear"])
    parallel: StrictBool = True

    @model_validator(mode="before")
    @classmethod
    def _sit_by_default(cls, data: Any) -> Any:
        return _default_sit(data, "SiT-Micro/2")

    @model_validator(mode="after")
    def _default_fits(self) -> DefaultRunConfig:
        bad = [m for m in self.modes if m not in FLOW_PRESETS]
        if bad or not self.modes:
            raise ValueError(f"modes: must be a non-empty list of {', '.join(FLOW_PRESETS)}, got {self.modes}")
        chosen = [k for k in _LATENT_KEYS if getattr(self.flow, k) is not None]
        if chosen or self.flow.path != FlowConfig.model_fields["path"].default:
            raise ValueError("flow: the default run's flows are its modes; choose them with modes=[...]")
        if not self.model.is_sit:
            raise ValueError("model.arch: the default run trains a SiT (e.g. SiT-Micro/2), not 'mlp'")
        if self.tokenizer.kind != "builtin":
            raise ValueError("tokenizer.kind: the default run uses the built-in tokenizer")
        if self.train.steps < 2 or self.train.batch_size < 2:
            raise ValueError("train: the default run needs steps >= 2 and batch_size >= 2")
        return self


def image_run_config(cfg: DefaultRunConfig, mode: str, decoder_state: Path | None) -> ImageRunConfig:
    """The image run of one mode of the default run: its shared sections with the flow preset ``mode``, the
    built-in data, one checkpoint at the end, and for spherical latents the finetuned decoder ``decoder_state`` as
    the mode's run folder records it (relative to that folder)."""
    flow = {**cfg.flow.model_dump(), **FLOW_PRESETS[mode]}
    spherical = FLOW_PRESETS[mode]["latent"] == "spherical"
    train = cfg.train.model_copy(
        update={
            "checkpoint_every": min(cfg.train.checkpoint_every, cfg.train.steps),
            "keep_checkpoints": 1,
            "log_every": max(1, min(25, cfg.train.steps // 4)),
            "mixed_precision": "no",
        }
    )
    tokenizer = cfg.tokenizer.model_copy(update={"decoder_state": decoder_state if spherical else None})
    data = {"source": "builtin", "per_class": cfg.data.per_class, "seed": 0}
    evaluation = {"samples": cfg.eval.samples, "seed": cfg.train.seed + 1}
    sample = cfg.sample.model_copy(update={"seed": cfg.train.seed})
    return validate(
        ImageRunConfig,
        {
            "kind": "image",
            "name": f"{cfg.name}-{mode}",
            "model": cfg.model.model_dump(),
            "flow": flow,
            "optim": cfg.optim.model_dump(),
            "train": train.model_dump(),
            "sample": sample.model_dump(),
            "tokenizer": tokenizer.model_dump(),
            "data": data,
            "eval": evaluation,
        },
    )


# -------------------------------------------------------------------------------------------------- finetune


class DecoderFinetuneConfig(Section):
    """The decoder finetune's own settings (``manifold-fm finetune-decoder``; the math in
    :mod:`manifold_fm.tokenizers.finetune`):

    - ``latents``: train the decoder on ``projected`` latents (the spherical decoder) or ``raw`` ones (the paper's
      FT-vanilla control);
    - ``l1_weight``, ``perceptual_weight``, ``gan_weight`` (LDM's ``disc_weight``): the loss weights;
    - ``gan_start``: the first step of the adversarial terms (``null``: 0 with ``disc_init``, else ``steps // 2``);
      ``gan_warmup``: steps over which the generator's GAN weight rises linearly from there (0: at once, as LDM);
      ``adaptive_gan_weight``: LDM's gradient-norm ratio at the decoder's last convolution (else 1);
    - ``disc_loss_scale``: ``s_D`` of the hinge loss (LDM: 0.5); ``disc_lr``: the discriminator's learning rate
      (``null``: ``optim.lr``; its other AdamW settings are ``optim``'s, without clipping);
    - ``discriminator``: LDM's ``nlayer`` PatchGAN (``disc_layers`` x ``disc_channels``, ``disc_norm``; default
      3 x 64 with BatchNorm, or the architecture of ``disc_init``, a local checkpoint to start from) or the small
      GroupNorm ``patch`` one of the built-in default run.
    """

    latents: Literal["projected", "raw"] = "projected"
    l1_weight: float = Field(1.0, ge=0)
    perceptual_weight: float = Field(1.0, ge=0)
    gan_weight: float = Field(0.5, ge=0)
    gan_start: int | None = Field(None, ge=0)
    gan_warmup: int = Field(0, ge=0)
    adaptive_gan_weight: StrictBool = True
    disc_loss_scale: float = Field(0.5, gt=0)
    disc_lr: float | None = Field(None, gt=0)
    discriminator: Literal["nlayer", "patch"] = "nlayer"
    disc_layers: int | None = Field(None, ge=1)
    disc_channels: int | None = Field(None, ge=1)
    disc_norm: Literal["batch", "actnorm"] | None = None
    disc_init: Path | None = None

    @model_validator(mode="after")
    def _patch_is_fixed(self) -> DecoderFinetuneConfig:
        if self.discriminator == "patch":
            given = [k for k in ("disc_layers", "disc_channels", "disc_norm", "disc_init") if getattr(self, k)]
            if given:
                raise ValueError(f"{given[0]}: the 'patch' discriminator has a fixed architecture; use 'nlayer'")
        return self

    def resolved(self, steps: int) -> DecoderFinetuneConfig:
        """These settings with ``gan_start`` filled in for a run of ``steps`` steps."""
        if self.gan_start is not None:
            return self
        return self.model_copy(update={"gan_start": 0 if self.disc_init is not None else steps // 2})


class FinetuneOptimConfig(OptimConfig):
    """:class:`OptimConfig` with LDM's autoencoder defaults: Adam betas ``(0.5, 0.9)``, no weight decay, no
    gradient clipping, a constant learning rate of 1e-4."""

    betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: float | None = Field(None, gt=0)


class FinetuneTrainConfig(TrainConfig):
    """:class:`TrainConfig` with the finetune's defaults: 500 steps at batch 16, full precision, no EMA (the exported
    decoder is then the raw one), a checkpoint every 1000 steps. ``grad_accum`` must stay 1 and the hooks
    (``sample_every``, ``eval_every``) unset; ``class_dropout`` does not apply."""

    steps: int = Field(500, ge=0)
    batch_size: int = Field(16, ge=1)
    class_dropout: float = Field(0.0, ge=0, lt=1)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    checkpoint_every: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _fits_the_finetune(self) -> FinetuneTrainConfig:
        if self.grad_accum != 1:
            raise ValueError("grad_accum: the decoder finetune takes one batch per step; set it to 1")
        hooks = [k for k in ("sample_every", "eval_every") if getattr(self, k) is not None]
        if hooks:
            raise ValueError(f"{hooks[0]}: the decoder finetune has no sample grids or evaluations during training")
        return self


class FinetuneRunConfig(Section):
    """``kind: finetune``: one decoder finetune (``manifold-fm finetune-decoder`` writes it to its run folder's
    ``config.yaml``): ``train`` and ``optim`` (the shared classes, with the finetune's defaults), ``finetune`` (its own
    settings) and ``source``, a record of what it read (tokenizer, data, held-out split) that a resumed run must
    share."""

    kind: Literal["finetune"] = "finetune"
    name: str = "finetune"
    source: dict[str, Any] = Field(default_factory=dict)
    optim: FinetuneOptimConfig = _section(FinetuneOptimConfig)
    train: FinetuneTrainConfig = _section(FinetuneTrainConfig)
    finetune: DecoderFinetuneConfig = _section(DecoderFinetuneConfig)


#: The sections a resumed finetune must share with its checkpoint (besides the batch size and seed).
FINETUNE_RESUME_SECTIONS = ("source", "finetune", "optim")


def default_finetune_config(cfg: DefaultRunConfig) -> FinetuneRunConfig:
    """The decoder finetune of the default run: ``finetune.steps`` at ``finetune.batch_size`` on projected latents of
    the built-in training images, with the built-in run's pinned recipe (the small ``patch`` PatchGAN from half-way,
    a linear warm-up over a tenth of the steps, GAN weight 0.1, unscaled hinge loss, decoder gradients clipped at 1),
    seed ``train.seed``, on the CPU in full precision, one checkpoint at the end."""
    steps = cfg.finetune.steps
    return validate(
        FinetuneRunConfig,
        {
            "kind": "finetune",
            "name": f"{cfg.name}-decoder",
            "source": {"tokenizer": "builtin", "data": f"builtin train split, {cfg.data.per_class} per class"},
            "optim": {"lr": 1e-4, "grad_clip": 1.0},
            "train": {
                "steps": steps,
                "batch_size": cfg.finetune.batch_size,
                "seed": cfg.train.seed,
                "threads": cfg.train.threads,
                "checkpoint_every": max(1, min(cfg.train.checkpoint_every, steps)),
                "keep_checkpoints": 1,
                "log_every": max(1, min(25, steps // 4)),
            },
            "finetune": {
                "latents": "projected",
                "discriminator": "patch",
                "gan_weight": 0.1,
                "gan_start": steps // 2,
                "gan_warmup": max(1, steps // 10),
                "disc_loss_scale": 1.0,
            },
        },
    )


# ------------------------------------------------------------------------------------------------------ load

#: The sections a resumed run must share with its checkpoint (``train.steps`` may grow, logging may change).
RESUME_SECTIONS = ("model", "flow", "data", "optim")

RunConfig = ToyRunConfig | ImageRunConfig | DefaultRunConfig | FinetuneRunConfig
KINDS: dict[str, type[Section]] = {
    "manifold": ToyRunConfig,
    "toy": ToyRunConfig,
    "image": ImageRunConfig,
    "default": DefaultRunConfig,
    "finetune": FinetuneRunConfig,
}


def load_run_config(
    source: str | Path | Mapping[str, Any] | BaseModel | None, overrides: Sequence[str] = (), kind: str | None = None
) -> RunConfig:
    """A validated run config from a built-in name, a YAML path, a mapping or a config, plus ``key=value``
    overrides. The class comes from the top-level ``kind`` (or ``kind`` here, which must then agree with the file)."""
    from ..config import apply_overrides

    data = apply_overrides(read_source(source), overrides)
    found = data.get("kind", kind)
    if kind is not None and found != kind:
        raise ConfigError(f"kind: this is a {found!r} config, expected {kind!r}")
    if found not in KINDS:
        raise ConfigError(
            f"kind: {found!r} is not one of {', '.join(map(repr, KINDS))} (the config's top-level 'kind')"
        )
    return validate(KINDS[found], data)  # type: ignore[return-value]


def load_toy_config(source: Any, overrides: Sequence[str] = ()) -> ToyRunConfig:
    """:func:`load_run_config` for ``kind: toy``."""
    return load_config(ToyRunConfig, source, overrides)


def load_image_config(source: Any, overrides: Sequence[str] = ()) -> ImageRunConfig:
    """:func:`load_run_config` for ``kind: image`` (a mapping without ``kind`` is taken as one)."""
    return load_config(ImageRunConfig, source, overrides)


__all__ = [
    "FLOW_PRESETS",
    "KINDS",
    "RESUME_SECTIONS",
    "TRACKERS",
    "DefaultDataConfig",
    "DefaultEvalConfig",
    "DecoderFinetuneConfig",
    "DefaultRunConfig",
    "FINETUNE_RESUME_SECTIONS",
    "FinetuneConfig",
    "FinetuneOptimConfig",
    "FinetuneRunConfig",
    "FinetuneTrainConfig",
    "FlowConfig",
    "ImageDataConfig",
    "ImageEvalConfig",
    "ImageRunConfig",
    "ManifoldRunConfig",
    "ManifoldSpec",
    "ModelConfig",
    "OptimConfig",
    "RunBase",
    "RunConfig",
    "SampleConfig",
    "ToyDataConfig",
    "ToyEvalConfig",
    "ToyRunConfig",
    "TokenizerConfig",
    "TrainConfig",
    "default_finetune_config",
    "image_run_config",
    "load_image_config",
    "load_run_config",
    "load_toy_config",
]
