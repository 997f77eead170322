"""Decoder finetuning for spherical tokenizers, on the one :class:`~manifold_fm.training.trainer.Trainer`: the encoder
frozen, a copy of the decoder and a discriminator trained to decode projected latents (the SFM paper's finetune), or
raw ones (its "FT-vanilla" control).

Per step, with ``x`` this process's share of the step's images, ``z = E(x)`` the frozen posterior mode and
``z~ = sqrt(d) z/|z|`` per token (``finetune.latents: projected``; ``raw`` keeps ``z~ = z``)::

    L_rec = w_l1 * mean|D(z~) - x| + w_p * P(D(z~), x)
    L_G   = L_rec + ramp(step) * w_gan * a * (-mean Disc(D(z~)))
    L_D   = s_D * (mean relu(1 - Disc(x)) + mean relu(1 + Disc(D(z~))))      (hinge; only once step >= gan_start)

(the math of :mod:`manifold_fm.tokenizers.finetune`). ``a`` is LDM's adaptive weight at the decoder's last
convolution ``W``, from the *global* batch's gradients: ``grad_W L_rec`` and ``grad_W L_adv`` are averaged over the
processes before their norms are taken, so 1 process and N processes at the same global batch compute the same
weight. The decoder is updated first (AdamW with ``optim``, its gradients clipped to ``optim.grad_clip``), then the
discriminator on the decoded images from before that update (AdamW, ``finetune.disc_lr``, no clipping).

What the trainer gives every run: the step's images are a pure function of the step (a per-epoch permutation of the
dataset, :class:`~manifold_fm.data.sources.StepIndexer`; unreadable images are left out of their batch), atomic
checkpoints (decoder = the model, with its EMA; discriminator; both optimizers) and exact resume, data parallelism
over processes, ``train.mixed_precision`` autocast of the decoder, discriminator and perceptual-network forward
passes (losses in float32), trackers and progress.

Discriminators with BatchNorm (LDM's default ``NLayerDiscriminator``) normalise over each forward call's batch:
with several GPU processes the trainer turns them into ``SyncBatchNorm`` (global batch statistics, as one process);
on several CPU processes they keep per-process statistics, so there only the GroupNorm ``patch`` discriminator
trains like one process to rounding.

**Exported weights** (``decoder.safetensors`` in the run folder): the decoder's EMA weights, in float32. With
``train.ema_decay: 0`` (the finetune's default) the EMA is the raw decoder, bit for bit; ``discriminator.safetensors``
holds the raw discriminator.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from manifold_fm.errors import InputError

from ..atomic import atomic_path
from ..config import ConfigError, to_dict
from ..data.sources import Batch, DatasetSource
from ..manifolds import TokenSpheres
from ..tokenizers.base import Tokenizer
from ..tokenizers.finetune import adaptive_gan_weight, build_discriminator, compare_decoders, hinge_discriminator_loss
from ..tokenizers.perceptual import GradientPyramidDistance
from .objective import Objective, Part, StepContext
from .schema import FINETUNE_RESUME_SECTIONS, DecoderFinetuneConfig, FinetuneRunConfig, OptimConfig, TrainConfig

#: The files a finetune writes into its run folder when it ends.
DECODER_STATE = "decoder.safetensors"
DISCRIMINATOR_STATE = "discriminator.safetensors"


class DecoderObjective(Objective):
    """Decoder + discriminator finetuning of ``tokenizer`` (see the module docstring).

    Args:
        tokenizer: its encoder gives the latents (frozen; moved to the training device); its decoder is copied.
        cfg: the ``finetune`` section, with ``gan_start`` resolved (:meth:`DecoderFinetuneConfig.resolved`).
        optim: the decoder's optimiser settings (the discriminator's differ by ``finetune.disc_lr`` and no clipping).
        discriminator: the discriminator to train (:func:`~manifold_fm.tokenizers.finetune.build_discriminator`).
        perceptual: the image distance ``P``; default the weightless
            :class:`~manifold_fm.tokenizers.perceptual.GradientPyramidDistance`.

    Logs ``loss`` (``L_G``), ``l1``, ``perceptual``, ``adv`` (``-mean Disc(D(z~))``, 0 before ``gan_start``),
    ``disc`` (``L_D``), ``gan_scale`` (``a``) and ``ramp``.
    """

    terms = ("loss", "l1", "perceptual", "adv", "disc", "gan_scale", "ramp")

    def __init__(
        self,
        tokenizer: Tokenizer,
        cfg: DecoderFinetuneConfig,
        optim: OptimConfig,
        *,
        discriminator: nn.Module,
        perceptual: nn.Module | None = None,
    ) -> None:
        if cfg.gan_start is None:
            raise ValueError("DecoderObjective needs a resolved gan_start (DecoderFinetuneConfig.resolved)")
        self.tokenizer, self.cfg, self.optim = tokenizer, cfg, optim
        self.project = cfg.latents == "projected"
        self.name = f"decoder ({cfg.latents} latents)"
        self.manifold = TokenSpheres(tokenizer.latent_channels, axis=1)
        self.decoder = copy.deepcopy(tokenizer.decoder_module()).float().requires_grad_(True)
        self.discriminator = discriminator.float().requires_grad_(True)
        self.perceptual = (perceptual or GradientPyramidDistance()).eval().requires_grad_(False)
        self.gan_start = int(cfg.gan_start)
        self._gan_on = cfg.gan_weight > 0
        has_conv = any(p.ndim == 4 for p in self.decoder.parameters())
        if not has_conv and cfg.adaptive_gan_weight and self._gan_on:
            raise InputError(
                "adaptive GAN weighting needs a convolutional decoder; set finetune.adaptive_gan_weight false"
            )
        self._size_checked = False

    def setup(self, train: TrainConfig, device: torch.device) -> None:
        if train.grad_accum != 1:
            raise ConfigError(
                "train.grad_accum: the decoder finetune takes one batch per step (its adaptive GAN weight and "
                "discriminator update are per batch); set it to 1"
            )
        self.tokenizer.to(device).eval().requires_grad_(False)
        self.perceptual.to(device)
        self._gan_on = self.cfg.gan_weight > 0 and self.gan_start < train.steps

    def parts(self) -> list[Part]:
        disc_optim = self.optim.model_copy(update={"lr": self.cfg.disc_lr or self.optim.lr, "grad_clip": None})
        return [Part("decoder", self.decoder, self.optim), Part("discriminator", self.discriminator, disc_optim)]

    def meta(self) -> dict[str, Any]:
        return {"objective": "decoder_finetune", "latents": self.cfg.latents, "tokenizer": self.tokenizer.name}

    def ramp(self, step: int) -> float:
        """The generator's GAN factor at 0-based ``step``: 0 before ``gan_start``, then rising linearly over
        ``gan_warmup`` steps (``min(1, (step - gan_start + 1) / gan_warmup)``; at once for ``gan_warmup`` 0)."""
        if step < self.gan_start:
            return 0.0
        return min(1.0, (step - self.gan_start + 1) / max(1, self.cfg.gan_warmup))

    def latents(self, x: Tensor) -> Tensor:
        """``z~`` of images ``x``: the frozen encoder's posterior mode (projected per token), in float32."""
        with torch.no_grad():
            z = self.tokenizer.encode_raw(x.to(self.tokenizer.dtype)).float()
        return self.manifold.projx(z) if self.project else z

    def _check_size(self, x: Tensor, disc: nn.Module) -> None:
        min_side = getattr(disc, "min_image_size", None)
        if self._gan_on and callable(min_side) and min(x.shape[-2:]) < min_side():
            raise InputError(
                f"images of {tuple(x.shape[-2:])} px are too small for the {getattr(disc, 'layers', '?')}-layer "
                f"discriminator (it needs >= {min_side()} px); use fewer discriminator layers"
            )

    def step(self, ctx: StepContext, batch: Batch) -> tuple[Tensor, Tensor | None]:
        cfg = self.cfg
        x = batch[0].to(ctx.device, torch.float32)
        decoder, disc_raw = ctx.modules["decoder"], ctx.raw["discriminator"]
        if not self._size_checked:
            self._check_size(x, disc_raw)
            self._size_checked = True
        z = self.latents(x)
        with ctx.autocast():
            rec = decoder(z).float()
        l1 = (rec - x).abs().mean()
        with ctx.autocast():
            p = self.perceptual(rec, x).float().mean()
        rec_loss = cfg.l1_weight * l1 + cfg.perceptual_weight * p
        ramp = self.ramp(ctx.step)
        zero = l1.new_zeros(())
        adv, scale, loss = zero, l1.new_ones(()), rec_loss
        if ramp > 0 and cfg.gan_weight > 0:
            disc_raw.requires_grad_(False)  # the generator's pass: no discriminator gradients
            with ctx.autocast():
                adv = -disc_raw(rec).float().mean()
            if cfg.adaptive_gan_weight:
                w = [q for q in ctx.raw["decoder"].parameters() if q.ndim == 4][-1]
                g_rec = torch.autograd.grad(rec_loss, w, retain_graph=True)[0]
                g_adv = torch.autograd.grad(adv, w, retain_graph=True)[0]
                g = ctx.all_reduce_mean(torch.stack([g_rec, g_adv]))  # the global batch's gradients
                scale = adaptive_gan_weight(g[0], g[1])
            loss = rec_loss + (ramp * cfg.gan_weight) * scale * adv
        ctx.backward(loss)
        ctx.update("decoder")
        d_loss = zero
        if ctx.step >= self.gan_start and cfg.gan_weight > 0:
            disc_raw.requires_grad_(True)
            disc = ctx.modules["discriminator"]
            with ctx.autocast():
                real, fake = disc(x), disc(rec.detach())
            d_loss = cfg.disc_loss_scale * hinge_discriminator_loss(real.float(), fake.float())
            ctx.backward(d_loss)
            ctx.update("discriminator")
        terms = torch.stack([loss, l1, p, adv, d_loss, scale, torch.full_like(zero, ramp)]).detach()
        return terms, None


@dataclass
class FinetuneResult:
    """What :func:`finetune_decoder` returns: the exported decoder (EMA weights) and discriminator as float32 CPU state
    dicts, a JSON-safe report, the run folder (``None`` for a temporary one) and whether this is the main process (the
    one that wrote the files and evaluated)."""

    decoder_state: dict[str, Tensor]
    discriminator_state: dict[str, Tensor]
    report: dict[str, Any]
    out_dir: Path | None = None
    is_main_process: bool = True
    config: FinetuneRunConfig | None = field(default=None, repr=False)


def finetune_config(
    source: str | Path | Mapping[str, Any] | FinetuneRunConfig | None = None, overrides: Sequence[str] = ()
) -> FinetuneRunConfig:
    """A validated ``kind: finetune`` config from a mapping, a YAML path or a config, plus ``key=value`` overrides."""
    from ..config import load_config

    if isinstance(source, FinetuneRunConfig) and not overrides:
        return source
    if source is None:
        source = {}
    if isinstance(source, Mapping) and "kind" not in source:
        source = {"kind": "finetune", **source}
    return load_config(FinetuneRunConfig, source, overrides)


def _save_state(state: Mapping[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))


def finetune_decoder(
    tokenizer: Tokenizer,
    dataset: Dataset,
    config: str | Path | Mapping[str, Any] | FinetuneRunConfig | None = None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    perceptual: nn.Module | None = None,
    discriminator: nn.Module | None = None,
    trust_pickle: bool = False,
    num_workers: int = 0,
    eval_dataset: Dataset | None = None,
    eval_items: int = 64,
    device: str | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Finetune a copy of ``tokenizer``'s decoder with a discriminator (see the module docstring).

    Args:
        tokenizer: any :class:`~manifold_fm.tokenizers.base.Tokenizer`; its weights stay untouched (it is moved to
            the training device).
        dataset: yields ``(image, label)``, images ``(3, H, W)`` in ``[-1, 1]``; step ``k`` reads the ``k``-th batch
            of a per-epoch permutation (seeded by ``train.seed``).
        config, overrides: the ``kind: finetune`` config (:class:`~manifold_fm.training.schema.FinetuneRunConfig`:
            ``train``, ``optim``, ``finetune``, ``source`` sections; a mapping may leave out ``kind``) and
            ``key=value`` overrides such as ``train.steps=200``.
        out_dir: the run folder (``config.yaml``, ``checkpoints/``, ``metrics.jsonl``, then ``decoder.safetensors``
            and ``discriminator.safetensors``); ``None``: a temporary folder, deleted at the end.
        resume, overwrite: continue the run in ``out_dir`` exactly (a finished run is not retrained, and its files
            are not rewritten), or replace it;
            without either a folder holding a run is refused (:class:`~manifold_fm.training.trainer.TrainingError`).
        perceptual: the image distance ``P`` (default the weightless fallback).
        discriminator: a module trained as given (deep-copied) instead of ``finetune.discriminator``'s.
        trust_pickle: allow a pickled ``finetune.disc_init`` that holds Python objects (runs its code).
        num_workers: DataLoader processes reading the training images.
        eval_dataset, eval_items: a quick held-out report on the first ``eval_items`` items of ``eval_dataset``
            (default ``dataset``): the original and the finetuned decoder on raw and projected latents
            (:func:`~manifold_fm.tokenizers.finetune.compare_decoders`); ``eval_items=0`` skips it.
        device: ``"cpu"`` to force the CPU; default accelerate's choice (the process's GPU).

    Returns:
        a :class:`FinetuneResult`; its report holds the settings, the last logged window's mean of every logged
        term (``final_losses``) and, with ``eval_items``, ``metrics``: ``"<decoder>_decoder/<latents>" ->
        {psnr, ssim, perceptual}`` for ``original`` and ``finetuned``.
    """
    from .trainer import Trainer

    cfg = finetune_config(config, overrides)
    n = len(dataset)  # type: ignore[arg-type]
    if n < cfg.train.batch_size:
        raise InputError(
            f"the finetune dataset has {n} images, fewer than one batch of {cfg.train.batch_size}; lower the batch size"
        )
    ft = cfg.finetune.resolved(cfg.train.steps)
    cfg = cfg.model_copy(update={"finetune": ft})
    disc = build_discriminator(
        discriminator if discriminator is not None else ft.discriminator,
        layers=ft.disc_layers,
        channels=ft.disc_channels,
        norm=ft.disc_norm,
        init=ft.disc_init,
        seed=cfg.train.seed,
        trust_pickle=trust_pickle,
    )
    objective = DecoderObjective(tokenizer, ft, cfg.optim, discriminator=disc, perceptual=perceptual)
    plain = to_dict(cfg)
    with tempfile.TemporaryDirectory(prefix="finetune-") if out_dir is None else contextlib.nullcontext() as tmp:
        out = Path(tmp) / "run" if out_dir is None else Path(out_dir)
        trainer = Trainer(
            objective,
            DatasetSource(dataset, num_workers=num_workers, skip_unreadable=True),
            cfg.train,
            out,
            fingerprint={k: plain[k] for k in FINETUNE_RESUME_SECTIONS} | {"stream": _stream(cfg.train)},
            config=plain,
            device=device,
            progress=progress,
            meta={"config": plain},
        )
        trainer.fit(resume=resume, overwrite=overwrite)
        decoder_state = {k: v.detach().float().cpu().contiguous() for k, v in trainer.ema.state_dict().items()}
        trained = trainer.part_module("discriminator").state_dict()
        disc_state = {k: v.detach().cpu().contiguous() for k, v in trained.items()}
        main = trainer.accelerator.is_main_process
        written = trainer.finished_before and (out / DECODER_STATE).is_file() and (out / DISCRIMINATOR_STATE).is_file()
        if main and out_dir is not None and not written:  # a finished run's files are never rewritten
            _save_state(decoder_state, out / DECODER_STATE)
            _save_state(disc_state, out / DISCRIMINATOR_STATE)
    report = _report(cfg, tokenizer, trainer, n, _perceptual_name(objective.perceptual))
    if main and eval_items > 0:
        ev = eval_dataset if eval_dataset is not None else dataset
        idx = list(range(min(eval_items, len(ev))))  # type: ignore[arg-type]
        cmp = compare_decoders(
            tokenizer, {"original": None, "finetuned": decoder_state}, ev, idx, perceptual=objective.perceptual
        )
        report["eval_items"], report["metrics"] = cmp["images"], cmp["metrics"]
    return FinetuneResult(decoder_state, disc_state, report, None if out_dir is None else out, main, cfg)


def _stream(train: TrainConfig) -> dict[str, Any]:
    """What fixes the step's images: a resumed finetune must read the same stream."""
    return {"batch_size": train.batch_size, "seed": train.seed}


def _perceptual_name(perceptual: nn.Module) -> str:
    return getattr(perceptual, "name", type(perceptual).__name__)


def _report(cfg: FinetuneRunConfig, tokenizer: Tokenizer, trainer: Any, n: int, perceptual: str) -> dict[str, Any]:
    """The settings and last losses of a finished finetune (JSON-safe; no timings, so it is reproducible)."""
    ft, t, o = cfg.finetune, cfg.train, cfg.optim
    disc = trainer.part_module("discriminator")
    describe = getattr(disc, "describe", None)
    return {
        "tokenizer": tokenizer.name,
        "latents": ft.latents,
        "project": ft.latents == "projected",
        "steps": t.steps,
        "epochs": t.steps * t.batch_size / n,
        "dataset_size": n,
        "batch_size": t.batch_size,
        "lr": o.lr,
        "disc_lr": ft.disc_lr or o.lr,
        "weights": {
            "l1": ft.l1_weight,
            "perceptual": ft.perceptual_weight,
            "gan": ft.gan_weight,
            "adaptive_gan_weight": ft.adaptive_gan_weight,
        },
        "gan_start": ft.gan_start,
        "gan_warmup": ft.gan_warmup,
        "disc_loss_scale": ft.disc_loss_scale,
        "grad_clip": o.grad_clip,
        "discriminator": describe() if callable(describe) else {"class": type(disc).__name__},
        "disc_init": None if ft.disc_init is None else str(ft.disc_init),
        "perceptual_metric": perceptual,
        "mixed_precision": t.mixed_precision,
        "exported_decoder": f"EMA weights (train.ema_decay {t.ema_decay}; 0: the raw decoder)",
        "final_losses": dict(trainer.last_terms),
        "eval_items": 0,
        "metrics": {},
    }


__all__ = [
    "DECODER_STATE",
    "DISCRIMINATOR_STATE",
    "DecoderObjective",
    "FinetuneResult",
    "finetune_config",
    "finetune_decoder",
]
