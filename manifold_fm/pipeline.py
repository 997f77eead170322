"""Shareable models: a trained latent-image run as a self-describing folder that loads in one call.

``manifold-fm export RUN --out DIR`` (or :func:`export_run`) writes::

    DIR/
      config.json          what rebuilds the run: its config, latent shape, classes, the tokenizer reference and name,
                           the latent normalisation its samples decode with, the step, and the run's measured metrics
      model.safetensors    the network's EMA weights
      decoder.safetensors  the decoder finetuned on projected latents (spherical runs that use one)
      README.md            the model card: what the model is, how to use it, the metrics found in the run folder

and :func:`from_pretrained` loads it (a local folder, or a Hub repository id) as a :class:`LatentImagePipeline`::

    pipe = manifold_fm.from_pretrained("exported/")
    images = pipe(class_labels=[0, 1, 2], num_steps=20, seed=0)  # (3, 3, H, W) float32 in [-1, 1]

The pipeline rebuilds the run with :func:`~manifold_fm.training.runs.build_run` (the code that loads run folders)
and samples with :func:`~manifold_fm.training.runs.sample_run`, so for the same seed, labels, sampler and batch size
its samples are the run's, bit for bit. It is a ``huggingface_hub`` ``ModelHubMixin``: ``pipe.save_pretrained(dir)``
writes the folder above and ``pipe.push_to_hub("user/name")`` uploads it. The tokenizer is a reference, not a
copy: the built-in tiny VAE ships with manifold-fm; a diffusers VAE is loaded from its Hub id or local folder.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin
from torch import Tensor

from manifold_fm.errors import InputError
from manifold_fm.hub import looks_like_repo_id, offline_snapshot

from .sampler import SamplerSpec
from .training.runs import LoadedRun, build_run, checkpoint_run_folder, read_run_checkpoint, sample_run
from .version import __version__

#: ``config.json``'s ``format`` (an exported folder is recognised by it) and its version.
FORMAT = "manifold-fm/latent-image"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DECODER_NAME = "decoder.safetensors"

#: What :meth:`LatentImagePipeline.__call__` returns for each ``output_type``.
OutputType = Literal["pt", "np", "pil", "latent"]
_OUTPUT_TYPES = ("pt", "np", "pil", "latent")

# The checkpoint record build_run reads, copied from meta.json into config.json.
_RUN_KEYS = ("step", "config", "latent_shape", "num_classes", "tokenizer", "latent_normalization", "flow")


class LatentImagePipeline(
    ModelHubMixin,
    library_name="manifold-fm",
    tags=["manifold-fm", "flow-matching", "image-generation", "class-conditional"],
):
    """A trained latent-image flow ready to sample: network, flow and decoder, with what describes it.

    Build one with :func:`from_pretrained` (an exported folder or Hub repository) or :meth:`from_run` (a run
    folder); ``save_pretrained`` / ``push_to_hub`` (from ``huggingface_hub``'s ``ModelHubMixin``) write the folder
    described in :mod:`manifold_fm.pipeline`.

    Args:
        run: the rebuilt run (:class:`~manifold_fm.training.runs.LoadedRun`).
        record: the ``config.json`` record: the run's checkpoint record (``config``, ``latent_shape``,
            ``num_classes``, ``tokenizer``, ``latent_normalization``, ``step``, ``flow``), ``weights`` (``ema`` or
            ``model``) and ``metrics`` (measured in the run folder; empty if none was found).

    Attributes:
        run: the :class:`~manifold_fm.training.runs.LoadedRun` (``sample_run(pipe.run, ...)`` works as for a run).
        record: the record written to ``config.json``.
    """

    def __init__(self, run: LoadedRun, record: Mapping[str, Any]) -> None:
        self.run = run
        self.record = dict(record)

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_run(
        cls,
        run: str | Path,
        *,
        use_ema: bool = True,
        device: str | torch.device = "cpu",
        progress: bool = False,
        checkpoint: str | int | Path | None = None,
    ) -> LatentImagePipeline:
        """The pipeline of a trained run folder (or its ``checkpoints`` folder, or one ``step_*`` folder): the
        latest checkpoint's (or the kept one ``checkpoint`` names: a step or a ``step_*`` folder) EMA weights
        (``use_ema=False``, or a checkpoint without EMA: the raw weights; the EMA file is then not read), and the
        metrics the run folder holds for that step (see :func:`run_metrics`)."""
        ckpt = read_run_checkpoint(run, checkpoint=checkpoint, use_ema=use_ema)
        ema = use_ema and ckpt.ema is not None
        root = checkpoint_run_folder(ckpt)
        loaded = build_run(ckpt.meta, ckpt.ema if ema else ckpt.model, device=device, progress=progress, run_dir=root)
        record = {k: ckpt.meta[k] for k in _RUN_KEYS if k in ckpt.meta}
        record["weights"] = "ema" if ema else "model"
        record["metrics"] = run_metrics(root, loaded) if root is not None else {}
        return cls(loaded, record)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | Path, **kwargs: Any
    ) -> LatentImagePipeline:
        """Load an exported folder, or download a Hub repository that holds one (``huggingface_hub`` keywords:
        ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ...). ``device`` (default ``"cpu"``) places
        the network and decoder; ``progress`` shows the tokenizer's loading progress."""
        name = str(pretrained_model_name_or_path)
        if not os.path.isdir(name) and (os.path.exists(name) or not looks_like_repo_id(name)):
            raise FileNotFoundError(
                f"{name} is not a folder; pass a folder written by manifold-fm export or a Hub repository id"
            )
        if not os.path.isdir(name) and not kwargs.get("local_files_only"):
            # With the Hub out of reach, its cached snapshot or one line, instead of retries (manifold_fm.hub).
            cached = offline_snapshot(
                name, "exported model", cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
            )
            name = name if cached is None else str(cached)
        return super().from_pretrained(name, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        device: str | torch.device = "cpu",
        progress: bool = False,
        **unused: Any,
    ) -> LatentImagePipeline:
        folder = Path(model_id)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    repo_id=model_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                )
            )
        return cls.load(folder, device=device, progress=progress)

    @classmethod
    def load(
        cls, folder: str | Path, *, device: str | torch.device = "cpu", progress: bool = False
    ) -> LatentImagePipeline:
        """Load an exported folder (what :func:`from_pretrained` does once the folder is local)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        record = read_record(folder)
        meta = json.loads(json.dumps({k: record[k] for k in _RUN_KEYS if k in record}))  # a deep copy
        tok = meta["config"].setdefault("tokenizer", {})
        tok["cache_dir"] = None  # where the training machine cached the built-in tokenizer means nothing here
        if tok.get("decoder_state") is not None:
            if tok["decoder_state"] != DECODER_NAME:
                raise InputError(f"{folder}: tokenizer.decoder_state must be {DECODER_NAME!r} in an exported model")
            path = folder / DECODER_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{folder} lacks {DECODER_NAME}, the finetuned decoder its config names")
            tok["decoder_state"] = str(path.resolve())
        try:
            weights = load_file(str(folder / WEIGHTS_NAME))
        except (OSError, SafetensorError) as exc:
            raise InputError(f"{folder / WEIGHTS_NAME} is missing or unreadable ({exc})") from None
        run = build_run(meta, weights, device=device, progress=progress)
        _check_tokenizer(run, record.get("tokenizer"))
        return cls(run, record)

    # ----------------------------------------------------------------------------------------------- saving
    def saved_record(self) -> dict[str, Any]:
        """The record as an exported folder holds it (``config.json``): no machine-local paths, and the decoder
        named ``decoder.safetensors`` (or none when the samples use no finetuned decoder)."""
        record = json.loads(json.dumps(self.record, default=str))
        tok = record["config"].setdefault("tokenizer", {})
        tok["cache_dir"] = None  # a path on this machine
        # linear runs ignore the decoder; a spherical run without one uses the base decoder
        tok["decoder_state"] = DECODER_NAME if self.uses_finetuned_decoder else None
        return record

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        def plain(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}

        save_directory = Path(save_directory)
        record = self.saved_record()
        if self.uses_finetuned_decoder:
            save_file(plain(self.run.decoder.decoder_module().state_dict()), str(save_directory / DECODER_NAME))
        save_file(plain(self.run.model.state_dict()), str(save_directory / WEIGHTS_NAME))
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__, **record}
        (save_directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        # safetensors writes owner-only files; give the weights the mode the umask gave config.json
        mode = (save_directory / CONFIG_NAME).stat().st_mode & 0o777
        for name in (WEIGHTS_NAME, DECODER_NAME):
            if (save_directory / name).is_file():
                os.chmod(save_directory / name, mode)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:  # type: ignore[override]
        """Upload the folder :meth:`save_pretrained` writes to the Hub repository ``repo_id`` (``huggingface_hub``'s
        ``push_to_hub``; the model card's usage snippet names ``repo_id``)."""
        card = {"location": repo_id, **(kwargs.pop("model_card_kwargs", None) or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)

    def generate_model_card(self, *args: Any, location: str = "path/to/this/folder", **kwargs: Any) -> ModelCard:
        """The model card (``README.md``): the model, its use (loading from ``location``), the files the exported
        folder holds, tokenizer, training settings and the metrics measured in the run folder (none are made up)."""
        return ModelCard(model_card(self.saved_record(), location))

    # ----------------------------------------------------------------------------------------------- sampling
    @property
    def num_classes(self) -> int:
        return self.run.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.run.latent_shape

    @property
    def device(self) -> torch.device:
        return next(self.run.model.parameters()).device

    @property
    def uses_finetuned_decoder(self) -> bool:
        """Whether the samples decode with a decoder finetuned on projected latents (``decoder.safetensors``)."""
        cfg = self.run.cfg
        return (
            self.run.decoder is not None
            and cfg.flow.resolved_latent == "spherical"
            and cfg.tokenizer.decoder_state is not None
        )

    def to(self, device: str | torch.device) -> LatentImagePipeline:
        """Move the network and the decoder to ``device``; returns ``self``."""
        self.run.model.to(device)
        if self.run.decoder is not None:
            self.run.decoder.to(device)
        return self

    def sampler_spec(self, **overrides: Any) -> SamplerSpec:
        """The run's own sampler (its ``sample`` section) with the given fields replaced (``None``: keep)."""
        from .config import validate

        base = self.run.cfg.sample.model_dump(include=set(SamplerSpec.model_fields))
        return validate(SamplerSpec, {**base, **{k: v for k, v in overrides.items() if v is not None}})

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | Tensor | None = None,
        *,
        num_samples: int | None = None,
        num_steps: int | None = None,
        method: str | None = None,
        cfg_scale: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        seed: int = 0,
        batch_size: int = 64,
        output_type: OutputType = "pt",
        progress: bool = False,
    ) -> Any:
        """Sample images of the classes ``class_labels`` (or ``num_samples`` images, classes cycling 0, 1, ...).

        The sampler is the run's (``method``, ``num_steps`` -> ``steps``, ``cfg_scale``, ``cfg_interval`` replace
        its fields); the noise of chunk ``j`` of ``batch_size`` samples comes from ``(seed, j)``, as in
        :func:`~manifold_fm.training.runs.sample_run` and ``manifold-fm sample``, so the same arguments give the
        same images. ``output_type``: ``"pt"`` a float32 tensor ``(N, 3, H, W)`` in ``[-1, 1]`` on the CPU;
        ``"np"`` uint8 ``(N, H, W, 3)`` (the ADM ``.npz`` layout); ``"pil"`` a list of PIL images; ``"latent"`` the
        generated latents ``(N, C, h, w)``, not decoded.
        """
        if output_type not in _OUTPUT_TYPES:
            raise InputError(f"output_type: expected one of {', '.join(_OUTPUT_TYPES)}, got {output_type!r}")
        if output_type != "latent" and self.run.decoder is None:
            raise InputError("this model has no tokenizer (tokenizer.kind: none): use output_type='latent'")
        labels = None
        if class_labels is None:
            if num_samples is None:
                raise InputError("pass class_labels (class ids in [0, num_classes)) or num_samples")
            n = int(num_samples)
        else:
            labels = torch.as_tensor(class_labels).reshape(-1)
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise InputError(f"class_labels must be integer class ids, got dtype {labels.dtype}")
            labels = labels.long().cpu()
            n = labels.numel()
            if num_samples is not None and num_samples != n:
                raise InputError(f"num_samples={num_samples} but {n} class_labels; pass one of them")
        if n < 1:
            raise InputError("nothing to sample: pass at least one class label (or num_samples >= 1)")
        spec = self.sampler_spec(method=method, steps=num_steps, cfg_scale=cfg_scale, cfg_interval=cfg_interval)
        _, _, out = sample_run(
            self.run,
            n,
            spec,
            seed=seed,
            batch_size=batch_size,
            labels=labels,
            progress=progress,
            decode=output_type != "latent",
        )
        if output_type in ("pt", "latent"):
            return out
        from .eval.image_io import to_uint8

        arr = to_uint8(out)
        if output_type == "np":
            return arr
        from PIL import Image

        return [Image.fromarray(a) for a in arr]

    def __repr__(self) -> str:
        c, h, w = self.latent_shape
        return (
            f"{type(self).__name__}(flow={self.run.flow.name}, model={self.run.cfg.model.arch}, latents={c}x{h}x{w}, "
            f"classes={self.num_classes}, step={self.run.step})"
        )


#: ``config.json``'s ``format`` of an exported manifold run (:class:`ManifoldPipeline`).
MANIFOLD_FORMAT = "manifold-fm/manifold"


class ManifoldPipeline:
    """A trained manifold flow (``kind: manifold`` run), exported by ``manifold-fm export`` and loaded by
    :func:`from_pretrained`::

        pipe = manifold_fm.from_pretrained("exported/")
        x = pipe.sample(1000, seed=0)        # (1000, *point_shape) points on pipe.manifold
        logp = pipe.log_prob(x[:10])         # exact log-density w.r.t. the Riemannian volume

    Attributes: ``run`` (:class:`~manifold_fm.training.toy.LoadedManifoldRun`: config, manifold, flow, model),
    ``record`` (what ``config.json`` holds), ``manifold``, ``model``, ``point_shape``."""

    def __init__(self, run: Any, record: Mapping[str, Any]) -> None:
        self.run, self.record = run, dict(record)
        self.manifold, self.model, self.point_shape = run.manifold, run.model, run.point_shape

    @classmethod
    def from_run(
        cls, run: str | Path, *, use_ema: bool = True, checkpoint: str | int | Path | None = None
    ) -> ManifoldPipeline:
        """A manifold run folder's best weights by validation NLL (or ``checkpoint``'s EMA / raw weights), with the
        run's ``metrics.json``."""
        from .training.toy import load_manifold_run

        loaded = load_manifold_run(run, checkpoint=checkpoint, use_ema=use_ema)
        metrics = {}
        if checkpoint is None and (Path(run) / "metrics.json").is_file():
            metrics = json.loads((Path(run) / "metrics.json").read_text())
        record = {
            "config": json.loads(json.dumps(loaded.cfg.model_dump(mode="json"), default=str)),
            "point_shape": list(loaded.point_shape),
            "step": loaded.step,
            "weights": loaded.weights,
            "metrics": metrics,
        }
        return cls(loaded, record)

    @classmethod
    def load(cls, folder: str | Path) -> ManifoldPipeline:
        """Load an exported folder."""
        from safetensors.torch import load_file

        from .training.toy import manifold_run_from_record

        record = read_record(folder)
        weights = load_file(str(Path(folder) / WEIGHTS_NAME))
        run = manifold_run_from_record(
            record["config"], record["point_shape"], weights, int(record["step"]), record.get("weights", ""), None
        )
        return cls(run, record)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``save_directory``."""
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, str(folder / WEIGHTS_NAME)
        )
        config = {
            "format": MANIFOLD_FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            **self.record,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
        m = self.record.get("metrics") or {}
        measured = [
            f"- {k}: {m[k]}" for k in ("test_nll", "test_nll_stderr", "likelihood_solver", "best_step") if k in m
        ]
        card = [
            f"# {self.record['config'].get('name', 'manifold flow')}",
            "",
            f"A flow-matching model on {m.get('manifold', 'a manifold')} trained with manifold-fm "
            f"(step {self.record['step']}, {self.record.get('weights', '')} weights).",
            "",
            "```python",
            "import manifold_fm",
            "pipe = manifold_fm.from_pretrained('path/to/this/folder')",
            "x = pipe.sample(1000, seed=0)",
            "logp = pipe.log_prob(x)",
            "```",
            "",
            "## Metrics measured in the run folder",
            "",
            *(measured or ["none found"]),
        ]
        (folder / "README.md").write_text("\n".join(card) + "\n")
        return folder

    def sample(self, num: int, *, seed: int = 0, method: str | None = None, steps: int | None = None) -> Tensor:
        """``num`` points on the manifold (the run's sampler; ``method``/``steps`` override it)."""
        from .training.toy import sample_manifold_run

        return sample_manifold_run(self.run, num, seed=seed, method=method, steps=steps)

    def log_prob(self, x: Tensor, *, steps: int | None = None) -> Tensor:
        """Log-density of points ``x`` (w.r.t. the manifold's Riemannian volume), the run's likelihood solver."""
        from .training.toy import log_prob

        cfg = self.run.cfg
        return log_prob(self.model, x, self.manifold, cfg, steps or cfg.eval.likelihood_steps).detach()

    def __repr__(self) -> str:
        return f"ManifoldPipeline({self.manifold!r}, point_shape={self.point_shape}, step={self.run.step})"


def from_pretrained(
    name_or_path: str | Path, *, device: str | torch.device = "cpu", **kwargs: Any
) -> LatentImagePipeline | ManifoldPipeline:
    """Load an exported model (a folder written by ``manifold-fm export``, or a Hub repository id) as a
    :class:`LatentImagePipeline` on ``device`` (an exported manifold run: a :class:`ManifoldPipeline`, on the CPU);
    other keywords go to ``huggingface_hub`` (``revision``, ``token``, ``cache_dir``, ``local_files_only``, ...)."""
    if _is_export(Path(name_or_path), MANIFOLD_FORMAT):
        return ManifoldPipeline.load(name_or_path)
    return LatentImagePipeline.from_pretrained(name_or_path, device=device, **kwargs)


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    use_ema: bool = True,
    progress: bool = False,
    checkpoint: str | int | Path | None = None,
) -> Path:
    """Export a trained run (see :meth:`LatentImagePipeline.from_run`; ``checkpoint``: a kept one other than the
    latest) to the folder ``out``; returns ``out``.

    ``out`` must be new or empty; with ``overwrite`` it may hold an earlier export, which is replaced only once
    the new one is complete (a folder holding anything else is never overwritten).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out {out} is not empty; pass --overwrite to replace an earlier export there")
        if not (_is_export(out) or _is_export(out, MANIFOLD_FORMAT)):
            raise FileExistsError(f"--out {out} holds files that are not an exported model; choose a new folder")
    from .training.toy import is_manifold_run

    pipe: Any
    if is_manifold_run(run):
        pipe = ManifoldPipeline.from_run(run, use_ema=use_ema, checkpoint=checkpoint)
    else:
        pipe = LatentImagePipeline.from_run(run, use_ema=use_ema, progress=progress, checkpoint=checkpoint)
    if out.is_dir() and not any(out.iterdir()):
        pipe.save_pretrained(out)  # an empty folder (perhaps the working directory) is written in place
        return out
    # a new folder, or an earlier export: written beside it, then swapped in whole
    target = out.resolve()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        pipe.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def read_record(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` record of an exported folder (one-line errors for anything else)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not an exported model (no {CONFIG_NAME}); create one with manifold-fm export"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("format") not in (FORMAT, MANIFOLD_FORMAT):
        raise InputError(f"{path} does not describe a manifold-fm model (its format is not {FORMAT!r})")
    if int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(
            f"{path} has format version {record['format_version']}, newer than this manifold-fm reads "
            f"({FORMAT_VERSION}); upgrade manifold-fm"
        )
    needed = (
        ("config", "point_shape", "step")
        if record["format"] == MANIFOLD_FORMAT
        else ("config", "latent_shape", "num_classes", "step")
    )
    missing = [k for k in needed if k not in record]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}")
    return record


def run_metrics(run_root: str | Path, run: LoadedRun) -> dict[str, Any]:
    """The measured metrics a run folder holds for ``run``'s step, as recorded (nothing is estimated):

    ``default_run``: the final row of this mode in the default run's ``results.json`` (the run folder is a mode
    folder ``<out>/<mode>`` of ``manifold-fm train``'s default run), with its reference rows; ``training``: the
    last logged training loss (``metrics.jsonl``); ``evaluation``: the last evaluation logged during training;
    ``sample_evaluations``: ``manifold-fm evaluate`` results written next to ``manifold-fm sample`` output in the
    run folder (``<folder>/metrics.json`` beside ``sample_info.json``) for this step.
    """
    from .training.metrics_log import read_jsonl

    root, step, out = Path(run_root), run.step, {}
    results = root.parent / "results.json"
    if results.is_file():
        try:
            data = json.loads(results.read_text())
            final = data["modes"][root.name]
            same_run = run.cfg.name == f"{data['config']['name']}-{root.name}" and int(final.get("steps", -1)) == step
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            same_run = False
        if same_run:
            out["default_run"] = {
                "source": "../results.json",
                "final": final,
                "references": data.get("references", {}),
            }
    records = [r for r in read_jsonl(root / "metrics.jsonl") if int(r.get("step", -1)) <= step]
    losses = [r for r in records if "loss" in r]
    if losses:
        out["training"] = {"step": losses[-1]["step"], "loss": losses[-1]["loss"]}
    # the trainer's own records carry the loss; a hook's (an evaluation's) are logged separately
    evals = [r for r in records if "loss" not in r and set(r) - {"step", "time"}]
    if evals:
        out["evaluation"] = {k: v for k, v in evals[-1].items() if k != "time"}
    found = []
    for info_path in sorted(root.glob("*/sample_info.json")):
        metrics_path = info_path.with_name("metrics.json")
        try:
            info = json.loads(info_path.read_text())
            metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        except json.JSONDecodeError:
            continue
        if metrics and int(info.get("step", -1)) == step:
            sampler = {k: info.get(k) for k in ("num_samples", "method", "steps", "cfg_scale", "cfg_interval", "ema")}
            scores = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num_samples"}
            found.append({"folder": info_path.parent.name, **sampler, "metrics": scores})
    if found:
        out["sample_evaluations"] = found
    return out


def model_card(record: Mapping[str, Any], location: str = "path/to/this/folder") -> str:
    """The Markdown model card (with YAML metadata) of a ``config.json`` record."""
    cfg = record["config"]
    flow, tok, train = cfg.get("flow", {}), cfg.get("tokenizer", {}), cfg.get("train", {})
    latent = flow.get("latent") or ("spherical" if flow.get("path", "geodesic") == "geodesic" else "vanilla")
    spherical = latent == "spherical"
    c, h, w = record["latent_shape"]
    tags = ["spherical-flow-matching"] if spherical else []
    meta = ModelCardData(library_name="manifold-fm", tags=["manifold-fm", "flow-matching", "image-generation", *tags])
    flow_text = (
        f"**spherical flow matching**: each of the {h * w} latent tokens lies on the sphere of radius sqrt({c}), "
        "the prior is uniform on the spheres, the path is the great circle (slerp) and sampling takes exp-map steps"
        if spherical
        else "the **linear** flow-matching baseline: Gaussian prior, straight path, the tokenizer's normalised latents"
    )
    weights = "EMA" if record.get("weights", "ema") == "ema" else "raw (non-EMA)"
    sample = cfg.get("sample", {})
    lines = [
        "---",
        meta.to_yaml(),
        "---",
        "",
        f"# {cfg.get('name', 'manifold-fm model')}",
        "",
        f"A class-conditional latent-image flow trained with manifold-fm: {flow_text}. "
        f"Network {cfg.get('model', {}).get('arch')} on {c}x{h}x{w} latents, {record['num_classes']} classes, "
        f"{weights} weights at training step {record['step']}.",
        "",
        "## Use",
        "",
        "```python",
        "import manifold_fm",
        "",
        f'pipe = manifold_fm.from_pretrained("{location}")',
        "images = pipe(class_labels=[0, 1, 2], num_steps=20, seed=0)  # (3, 3, H, W) float32 in [-1, 1]",
        "```",
        "",
        '`output_type="pil"` returns PIL images, `"np"` uint8 `(N, H, W, 3)` arrays, `"latent"` the undecoded '
        f"latents. By default the run's sampler: `{sample.get('method')}`, {sample.get('steps')} steps, "
        f"guidance scale {sample.get('cfg_scale')}; `method`, `num_steps`, `cfg_scale` and `cfg_interval` override "
        "it. On the same device, the same arguments (and `batch_size`) give the images `manifold-fm sample` gives for "
        "the original run.",
        "",
        "## Files",
        "",
        "| file | contents |",
        "|---|---|",
        "| `config.json` | the run config, latent shape, classes, tokenizer reference, latent normalisation, metrics |",
        f"| `model.safetensors` | the network's {weights} weights |",
    ]
    if tok.get("decoder_state"):
        lines.append(f"| `{tok['decoder_state']}` | the tokenizer's decoder finetuned on projected latents |")
    lines += ["| `README.md` | this card |", "", "## Tokenizer", ""]
    if tok.get("kind", "builtin") == "builtin":
        lines.append(f"The built-in tiny VAE that ships with manifold-fm (`{record.get('tokenizer')}`).")
    elif tok.get("kind") == "diffusers":
        sub = f", subfolder `{tok.get('subfolder')}`" if tok.get("subfolder") else ""
        lines.append(
            f"The diffusers VAE `{tok.get('name_or_path')}`{sub} (kind `{tok.get('vae_kind')}`): not included here; "
            "it is loaded from that Hub id or local folder, which must be available where the model is loaded."
        )
    else:
        lines.append('None: the model generates latents only (`output_type="latent"`).')
    if spherical:
        lines.append(
            "Samples decode with the decoder finetuned on projected latents (`decoder.safetensors`)."
            if tok.get("decoder_state")
            else "Samples decode with the tokenizer's base decoder (the run used no finetuned decoder)."
        )
    else:
        norm = record.get("latent_normalization") or {}
        lines.append(f"Samples are denormalised with the recorded latent normalisation (kind `{norm.get('kind')}`).")
    data = cfg.get("data", {})
    data_text = (
        f"the built-in images ({data.get('per_class')} per class, {data.get('size')} px)"
        if data.get("source", "builtin") == "builtin"
        else f"the latent cache `{data.get('latents')}`"
    )
    lines += [
        "",
        "## Training",
        "",
        f"{train.get('steps')} steps at batch size {train.get('batch_size')}, learning rate "
        f"{cfg.get('optim', {}).get('lr')}, EMA decay {train.get('ema_decay')}, seed {train.get('seed')}, on "
        f"{data_text}. The whole config is in `config.json`.",
        "",
        "## Metrics",
        "",
        *_metric_lines(record.get("metrics") or {}),
    ]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else f"{v}"


def _table(rows: Mapping[str, Any]) -> list[str]:
    return ["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows.items())]


def _metric_lines(metrics: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if "default_run" in metrics:
        d = metrics["default_run"]
        lines += [
            "From the default run's `results.json` (`manifold-fm train`), on its final samples. "
            "`fd_builtin_classifier` is the Fréchet distance in the built-in classifier's features (not FID).",
            "",
            *_table({k: v for k, v in d["final"].items() if isinstance(v, (int, float))}),
            "",
        ]
        refs = d.get("references") or {}
        if refs:
            lines += ["Reference rows of the same evaluation:", "", "| reference | metric | value |", "|---|---|---|"]
            lines += [f"| {name} | {k} | {_fmt(v)} |" for name, row in refs.items() for k, v in row.items()]
            lines.append("")
    for e in metrics.get("sample_evaluations", []):
        lines += [
            f"`manifold-fm evaluate` on `{e['folder']}`: {e.get('num_samples')} samples, `{e.get('method')}` "
            f"{e.get('steps')} steps, guidance {e.get('cfg_scale')} (interval {e.get('cfg_interval')}), "
            f"EMA {e.get('ema')}.",
            "",
            *_table(e["metrics"]),
            "",
        ]
    if "evaluation" in metrics:
        ev = dict(metrics["evaluation"])
        lines += [f"Last evaluation logged during training (step {ev.pop('step', '?')}):", "", *_table(ev), ""]
    if "training" in metrics:
        t = metrics["training"]
        lines += [f"Training loss {_fmt(t['loss'])} at step {t['step']} (`metrics.jsonl`).", ""]
    if not lines:
        lines = ["The run folder held no measured metrics for this step, so none are reported.", ""]
    return lines


def _is_export(folder: Path, fmt: str = FORMAT) -> bool:
    try:
        return json.loads((folder / CONFIG_NAME).read_text()).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def _check_tokenizer(run: LoadedRun, recorded: str | None) -> None:
    """Warn when the tokenizer found here is not the one the model was trained with (e.g. other built-in weights)."""
    if run.decoder is None or not recorded:
        return
    info = run.decoder.describe()
    found = info.get("base", info).get("name")
    if found is not None and found != recorded:
        warnings.warn(
            f"this model was trained with tokenizer {recorded!r} but {found!r} was loaded; samples may differ",
            stacklevel=3,
        )


__all__ = [
    "CONFIG_NAME",
    "DECODER_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "LatentImagePipeline",
    "MANIFOLD_FORMAT",
    "ManifoldPipeline",
    "OutputType",
    "export_run",
    "from_pretrained",
    "model_card",
    "read_record",
    "run_metrics",
]
