"""Device discipline, checked without a GPU: the sampler, the evaluation hook (sampling, decoding and scoring), an
image run's training (steps, sample grids, evaluations, checkpoints) and decoder finetuning on a simulated GPU
(:func:`helpers.simulated_cuda`), where every tensor must be made on the device of the code that uses it.

The simulated GPU computes on the CPU, so besides "nothing mixes devices" each test checks that the numbers are
the CPU's: a test that only ran would not notice work silently moved back to the host.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from manifold_fm.sampler import SamplerSpec, generate
from manifold_fm.training.builders import latent_flow
from manifold_fm.training.image import eval_hook, image_model, run_decoder
from manifold_fm.training.schema import load_image_config

from helpers import SIM_CUDA, DeviceMismatchError, simulated_cuda

SHAPE = (16, 8, 8)  # the built-in tokenizer's latents of 32 px images
CLASSES = 12


@pytest.fixture(scope="module")
def evaluator():  # noqa: ANN201
    from manifold_fm.eval.classifier import builtin_evaluator

    return builtin_evaluator(test_per_class=4)


def _run(*settings: str):  # noqa: ANN202
    cfg = load_image_config("image-builtin", ["sample.steps=2", *settings])
    return cfg, image_model(cfg, SHAPE[0], SHAPE[1], CLASSES), latent_flow(cfg.flow, SHAPE[0])


def test_the_simulated_gpu_refuses_what_a_gpu_refuses() -> None:
    """The helper itself: what CUDA refuses raises, what it allows (host scalars, host indices, copies) runs, and
    values are the CPU's."""
    lin = torch.nn.Linear(4, 2)
    x_cpu = torch.randn(3, 4)
    with simulated_cuda():
        lin.to("cuda")
        x = x_cpu.to("cuda")
        assert x.device == SIM_CUDA and lin.weight.device == SIM_CUDA and lin(x).device == SIM_CUDA
        torch.testing.assert_close(
            lin(x).cpu(), torch.nn.functional.linear(x_cpu, *[p.detach().cpu() for p in lin.parameters()])
        )
        with pytest.raises(DeviceMismatchError, match="two devices"):
            lin(x_cpu)
        with pytest.raises(DeviceMismatchError, match="two devices"):
            x + torch.ones(3, 4)
        with pytest.raises(DeviceMismatchError, match="generator"):
            torch.randn(3, generator=torch.Generator().manual_seed(0), device="cuda")
        with pytest.raises(DeviceMismatchError, match="generator"):
            torch.randn(3, generator=torch.Generator(device="cuda").manual_seed(0))
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        assert (x * torch.tensor(2.0)).device == SIM_CUDA  # a 0-dim host tensor is fine
        with pytest.raises(DeviceMismatchError, match="two devices"):  # except in a concatenation
            torch.stack([x.sum(), torch.tensor(2.0)])
        assert x[torch.tensor([0, 2])].device == SIM_CUDA  # host indices are fine
        assert x.cpu().device.type == "cpu" and x.cpu().numpy().shape == (3, 4)
        loss = lin(x).square().mean()
        loss.backward()
        assert lin.weight.grad.device == SIM_CUDA
        torch.optim.AdamW(lin.parameters(), fused=True).step()  # what the trainer runs on a GPU
        assert torch.zeros(2, device=x.device).device == SIM_CUDA and x.new_ones(2).device == SIM_CUDA


@pytest.mark.parametrize("method", ["heun", "dopri5"])
def test_sampling_on_a_gpu_happens_there_with_guidance_and_exp_map_steps(method: str) -> None:
    """Labels handed in on the host (as callers do) and the generator on the model's device: the prior, the
    guided velocity and the exp-map (or adaptive) steps all run on the GPU, giving the CPU's samples."""
    _, model, flow = _run()
    spec = SamplerSpec(
        method=method,
        steps=1 if method == "dopri5" else 2,
        cfg_scale=2.0,
        cfg_interval=(0.1, 0.9),
        atol=1e-2,
        rtol=1e-2,
    )
    labels = torch.arange(4)
    cpu = generate(model, flow, (4, *SHAPE), spec, generator=torch.Generator().manual_seed(0), labels=labels,
                   null_class=CLASSES)  # fmt: skip
    with simulated_cuda():
        model.to("cuda")
        gpu = generate(model, flow, (4, *SHAPE), spec, generator=torch.Generator(device="cuda").manual_seed(0),
                       labels=labels, null_class=CLASSES)  # fmt: skip
        assert gpu.device == SIM_CUDA
        gpu = gpu.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=0)


def test_the_evaluation_hook_on_a_gpu_gives_the_cpu_metrics(evaluator) -> None:  # noqa: ANN001
    """``eval_hook`` (SampleQuality: chunked sampling, the run's decoder, the built-in classifier) with the EMA model
    on the GPU: labels, noise, decoder and classifier follow it there, and the metrics are the CPU's."""
    cfg, model, flow = _run("eval.samples=10", "eval.batch_size=4")  # 3 chunks, the last one short
    from manifold_fm.tokenizers import builtin_tokenizer

    cpu = eval_hook(cfg, flow, run_decoder(cfg, builtin_tokenizer(progress=False)), SHAPE, CLASSES, evaluator).fn(
        2, model
    )
    decoder = run_decoder(cfg, builtin_tokenizer(progress=False))
    hook = eval_hook(cfg, flow, decoder, SHAPE, CLASSES, evaluator)
    with simulated_cuda():
        model.to("cuda")
        gpu = hook.fn(2, model)
        assert decoder.device == SIM_CUDA and next(evaluator.model.parameters()).device == SIM_CUDA
    evaluator.model.cpu()
    assert set(gpu) == set(cpu) and {"fd_builtin_classifier", "classifier_accuracy", "on_sphere_error_max"} <= set(gpu)
    for key in set(cpu) - {"sample_s_per_image"}:
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-9, abs=1e-12), key


def test_an_image_run_trains_samples_and_evaluates_on_a_gpu(tmp_path: Path, evaluator) -> None:  # noqa: ANN001
    """A whole image run with the trainer on the GPU (accelerate's device): training steps, a sample grid, the
    evaluation hook and checkpoints; its evaluation equals a CPU run's up to the fused optimizer's rounding."""
    from manifold_fm.training import image as image_mod
    from manifold_fm.training.image import train_image

    settings = [
        "data.per_class=2",
        "train.batch_size=8",
        "train.steps=2",
        "train.sample_every=2",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "eval.samples=8",
        "eval.batch_size=4",
        "sample.steps=2",
        "train.threads=1",
    ]
    real = image_mod.eval_hook

    def hook(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return real(*args[:5], evaluator, *args[6:], **{k: v for k, v in kwargs.items() if k != "evaluator"})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(image_mod, "eval_hook", hook)  # the small classifier, not the 800-step default
        train_image("image-builtin", settings, tmp_path / "cpu", progress=False, device="cpu")
        with simulated_cuda(accelerate=True):
            train_image("image-builtin", settings, tmp_path / "gpu", progress=False)
    evaluator.model.cpu()

    def evaluation(run: Path) -> dict[str, float]:
        lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in lines if "fd_builtin_classifier" in r)

    gpu, cpu = evaluation(tmp_path / "gpu"), evaluation(tmp_path / "cpu")
    assert gpu["step"] == cpu["step"] == 2
    assert gpu["fd_builtin_classifier"] == pytest.approx(cpu["fd_builtin_classifier"], rel=1e-4)
    assert gpu["classifier_accuracy"] == cpu["classifier_accuracy"]
    assert (tmp_path / "gpu" / "samples" / "step_00000002.png").is_file()
    assert (tmp_path / "gpu" / "checkpoints" / "step_00000002" / "model.safetensors").is_file()


class _ConvDistance(torch.nn.Module):
    """A perceptual distance with weights (a convolution, as LPIPS's VGG): it must follow the images to the GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)) / 9)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (self.conv(a) - self.conv(b)).pow(2).mean(dim=(1, 2, 3))


def test_decoder_finetune_steps_on_a_gpu_give_the_cpu_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two decoder-finetune steps on the trainer with accelerate's device the GPU: the frozen encoder, the decoder,
    the BatchNorm PatchGAN discriminator and a perceptual network with weights all run there (every convolution sees
    GPU inputs), the adversarial terms are on from step 0 (the adaptive weight's autograd.grad at the decoder's
    last convolution, the hinge loss, both optimizers), and the losses and exported weights are bit for bit those
    of a CPU run with the same (fused) AdamW kernel the trainer picks on a GPU."""
    from manifold_fm.data.builtin_images import BuiltinImages
    from manifold_fm.tokenizers import TinyVAE, TinyVAETokenizer
    from manifold_fm.training.decoder_finetune import finetune_decoder

    data = BuiltinImages("train", per_class=1)
    over = ["train.steps=2", "train.batch_size=4", "train.log_every=1", "train.threads=1", "finetune.gan_start=0"]

    def finetune(out: Path, device: str | None):  # noqa: ANN202
        torch.manual_seed(0)
        tok = TinyVAETokenizer(TinyVAE(4, (8, 8)).eval().requires_grad_(False))
        return finetune_decoder(tok, data, None, over, out, perceptual=_ConvDistance(), eval_items=0,
                                device=device, progress=False)  # fmt: skip

    class FusedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **{**kwargs, "fused": True})

    with monkeypatch.context() as mp:
        mp.setattr(torch.optim, "AdamW", FusedAdamW)
        cpu = finetune(tmp_path / "cpu", "cpu")
    inputs: set[torch.device] = set()

    def record(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            inputs.add(args[0].device)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        with simulated_cuda(accelerate=True):
            gpu = finetune(tmp_path / "gpu", None)
    finally:
        handle.remove()
    assert inputs == {SIM_CUDA}
    assert gpu.report["final_losses"]["disc"] > 0 and gpu.report["final_losses"]["gan_scale"] != 1.0  # GAN on
    assert gpu.report["final_losses"] == cpu.report["final_losses"]
    for mine, theirs in ((gpu.decoder_state, cpu.decoder_state), (gpu.discriminator_state, cpu.discriminator_state)):
        assert mine.keys() == theirs.keys()
        for k, v in theirs.items():
            assert mine[k].device.type == "cpu"  # exported to the host
            torch.testing.assert_close(mine[k], v, rtol=0, atol=0)
    assert (tmp_path / "gpu" / "checkpoints" / "step_00000002" / "model.safetensors").is_file()


def test_a_model_on_a_gpu_with_a_host_generator_is_refused_in_one_line() -> None:
    _, model, flow = _run()
    with simulated_cuda():
        model.to("cuda")
        with pytest.raises(ValueError, match="generator is on cpu but the model on cuda"):
            generate(model, flow, (2, *SHAPE), SamplerSpec(steps=1), generator=torch.Generator().manual_seed(0))


def test_the_fid_evaluator_on_a_gpu_scores_like_fidelity_metrics(register_standin, tmp_path: Path) -> None:  # noqa: ANN001
    """``FidelityEvaluator`` (torch-fidelity's extractor run directly on the images' device, per-image rows, FID and
    IS from the rows of all images, here computed in two parts as two processes would) gives what
    ``fidelity_metrics`` gives for the whole set on the host."""
    import numpy as np

    from manifold_fm.eval.fid import FidelityEvaluator, fidelity_metrics
    from manifold_fm.eval.image_io import to_uint8

    register_standin("standin6", pool=8, features=6, logits=5)
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(40, 256, size=(40, 32, 32, 3)).astype(np.uint8))
    samples = torch.rand(30, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected = fidelity_metrics(to_uint8(samples), ref, feature_extractor="standin6", prc=False, cuda=False)
    evaluator = FidelityEvaluator(ref, feature_extractor="standin6", batch_size=8)
    with simulated_cuda():
        on_gpu = samples.to("cuda")
        parts = [evaluator.features(on_gpu[:18]), evaluator.features(on_gpu[18:])]
        rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        assert all(v.device == SIM_CUDA for v in rows.values())
        got = evaluator.metrics(rows)
    assert set(got) == set(expected) == {"fd[standin6]", "inception_score_mean", "inception_score_std"}
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key


def test_latent_geometry_diagnostics_on_a_gpu() -> None:
    """The probe's statistics of latents on the GPU (token norms, quantiles, path diagnostics) are the CPU's."""
    from manifold_fm.eval.geometry import path_diagnostics, token_norm_stats

    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, *SHAPE, generator=g), 2 * torch.randn(4, *SHAPE, generator=g)
    cpu = (token_norm_stats(x1), path_diagnostics(x0, x1, [0.0, 0.5, 1.0]))
    with simulated_cuda():
        gpu = (token_norm_stats(x1.to("cuda")), path_diagnostics(x0.to("cuda"), x1.to("cuda"), [0.0, 0.5, 1.0]))
    assert gpu == cpu


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_likelihoods_on_a_gpu(divergence: str) -> None:
    """``log_likelihood`` of points on the GPU (divergence by autograd, Hutchinson probes from a GPU generator)."""
    from manifold_fm.likelihood import log_likelihood
    from manifold_fm.manifolds import Sphere

    sphere = Sphere()
    field = torch.nn.Linear(3, 3)
    x1 = sphere.projx(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))

    def run(x: Tensor, g: torch.Generator) -> Tensor:
        return log_likelihood(lambda z, t: field(z) * t[:, None], x, sphere, steps=3, method="euler",
                              divergence_method=divergence, generator=g)  # fmt: skip

    cpu = run(x1, torch.Generator().manual_seed(1))
    with simulated_cuda():
        field.to("cuda")
        gpu = run(x1.to("cuda"), torch.Generator(device="cuda").manual_seed(1))
        assert gpu.device == SIM_CUDA
        gpu = gpu.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=0)


def test_sampling_a_trained_run_on_a_gpu_gives_the_cpu_images(tmp_path: Path) -> None:
    """What ``manifold-fm sample`` runs per process (``load_run`` onto the device, chunked sampling and decoding)."""
    from manifold_fm.training.image import train_image
    from manifold_fm.training.runs import load_run, sample_run

    settings = ["data.per_class=2", "train.batch_size=8", "train.steps=0", "train.sample_every=null"]
    train_image("image-builtin", settings, tmp_path / "run", progress=False)
    spec = SamplerSpec(steps=2, cfg_scale=1.5)
    cpu = sample_run(load_run(tmp_path / "run"), 5, spec, batch_size=2, progress=False)
    with simulated_cuda():
        gpu = sample_run(load_run(tmp_path / "run", device="cuda"), 5, spec, batch_size=2, progress=False)
    for a, b in zip(gpu, cpu, strict=True):
        assert a.device.type == "cpu"  # handed back to the host
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
def test_the_evaluation_hook_on_a_real_gpu(evaluator) -> None:  # noqa: ANN001
    """The same evaluation as the simulated one, on CUDA (fp32, TF32 off): the GPU's kernels round differently, so
    the metrics agree with the CPU's to a tolerance; the samples stay on the spheres."""
    cfg, model, flow = _run("eval.samples=10", "eval.batch_size=4", "sample.precision=fp32")
    from manifold_fm.tokenizers import builtin_tokenizer

    cpu = eval_hook(cfg, flow, run_decoder(cfg, builtin_tokenizer(progress=False)), SHAPE, CLASSES, evaluator).fn(
        2, model
    )
    decoder = run_decoder(cfg, builtin_tokenizer(progress=False))
    gpu = eval_hook(cfg, flow, decoder, SHAPE, CLASSES, evaluator).fn(2, model.to("cuda"))
    assert decoder.device.type == "cuda" and next(evaluator.model.parameters()).device.type == "cuda"
    evaluator.model.cpu()
    assert gpu["fd_builtin_classifier"] == pytest.approx(cpu["fd_builtin_classifier"], rel=1e-3)
    assert abs(gpu["classifier_accuracy"] - cpu["classifier_accuracy"]) <= 0.1  # one of 10 samples at most
    assert gpu["on_sphere_error_max"] < 1e-5
