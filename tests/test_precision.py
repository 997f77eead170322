"""Mixed precision, compile, gradient accumulation and the absence of per-step host syncs in the one trainer, on CPU.

The references: the same run in float32 (bf16/fp16 agree to a stated tolerance, the geometry stays float32 and
on the sphere), the same run eager (compile agrees to float rounding), the same global batch in one piece
(accumulation agrees to float rounding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from manifold_fm.data.sources import TensorSource
from manifold_fm.manifolds import TokenSpheres
from manifold_fm.models.sit import SiT
from manifold_fm.training.builders import preset_flow
from manifold_fm.training.checkpoint import load_checkpoint
from manifold_fm.training.flow_objective import FlowObjective
from manifold_fm.training.metrics_log import read_jsonl
from manifold_fm.training.schema import load_image_config
from manifold_fm.training.trainer import Trainer

from helpers import record_host_reads

PATH = {"spherical": "geodesic", "linear": "linear"}


def _data() -> TensorSource:
    g = torch.Generator().manual_seed(1)
    return TensorSource(torch.randn(32, 4, 4, 4, generator=g), torch.arange(32) % 3)


def _run(out: Path, mode: str = "spherical", steps: int = 6, **extra: object) -> Trainer:
    overrides = [
        f"train.steps={steps}",
        "train.batch_size=8",
        "train.log_every=1",
        "train.checkpoint_every=100",
        "train.ema_decay=0.9",
        "optim.lr=3e-3",
        "tokenizer.kind=none",
        "data.source=latents",
        "data.latents=unused",
        f"flow.path={PATH[mode]}",
        *(f"{k}={v}" for k, v in extra.items()),
    ]
    cfg = load_image_config(None, overrides)
    torch.manual_seed(0)
    model = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    trainer = Trainer(
        FlowObjective(model, preset_flow(mode, 4), cfg.optim, null_class=3),
        _data(),
        cfg.train,
        out,
        device="cpu",
        progress=False,
    )
    trainer.fit()
    return trainer


def _losses(out: Path) -> Tensor:
    return torch.tensor([r["loss"] for r in read_jsonl(out / "metrics.jsonl")])


def _weights(out: Path) -> dict[str, Tensor]:
    return load_checkpoint(out / "checkpoints").model


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_tracks_float32(tmp_path: Path, precision: str) -> None:
    ref = _run(tmp_path / "fp32")
    low = _run(tmp_path / precision, **{"train.mixed_precision": precision})
    assert low.autocast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # bf16 keeps 8 mantissa bits, fp16 11: per-step losses within 2% (bf16) / 0.5% (fp16) of float32 over 6 steps
    rel = ((_losses(tmp_path / precision) - _losses(tmp_path / "fp32")).abs() / _losses(tmp_path / "fp32")).max()
    assert float(rel) < {"bf16": 2e-2, "fp16": 5e-3}[precision]
    assert float(rel) > 0  # the forward pass really ran in low precision
    state = load_checkpoint(tmp_path / precision / "checkpoints").state
    if precision == "fp16":  # the gradient scaler ran and is checkpointed (its growth tracker counts good steps)
        assert low.scaler is not None and state["scaler"]["_growth_tracker"] == 6
    else:
        assert low.scaler is None and state["scaler"] is None
    assert ref.scaler is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_geometry_stays_float32_and_on_the_spheres_under_autocast(dtype: torch.dtype) -> None:
    """The trainer's autocast covers the network; the path, the projection and the sampler's step compute in float32
    inside it (the guard in manifolds/numerics.py:upcast). Against a float64 evaluation of the same inputs they are
    within float32 round-off (measured ~5e-7 of the radius); computed in the autocast dtype they are 1e-3 (float16) to
    2e-2 (bfloat16) of the radius off, and off the spheres by as much. The inputs require grad: on CPU, autocast
    reaches the dot products of the autograd path (linalg.vecdot) and projx; the no-grad path builds its dot products
    from elementwise kernels that autocast leaves alone, so a check there cannot fail."""
    m = TokenSpheres(4, axis=1)
    g = torch.Generator().manual_seed(2)
    x0, x1 = m.random_base((8, 4, 4, 4), g), m.random_base((8, 4, 4, 4), g)
    t = torch.rand(8, generator=g)
    ref_x, ref_u = m.geodesic(x0.double(), x1.double(), t.double())
    ref_step = m.expmap(ref_x, 0.5 * ref_u)
    ref_proj = m.projx(3.0 * x0.double())
    a, b = x0.clone().requires_grad_(True), x1.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        x_t, u_t = m.geodesic(a, b, t)
        stepped = m.expmap(x_t, 0.5 * u_t)
        projected = m.projx(3.0 * a)
    for name, out, ref in (
        ("x_t", x_t, ref_x),
        ("u_t", u_t, ref_u),
        ("step", stepped, ref_step),
        ("projx", projected, ref_proj),
    ):
        assert out.dtype == torch.float32, name
        error = float((out.detach().double() - ref).abs().max()) / m.radius
        assert error < 1e-5, (name, error)
    for name, points in (("x_t", x_t), ("step", stepped), ("projx", projected)):
        assert float(m.point_error(points.detach()).max()) / m.radius < 1e-6, name


def test_gradient_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    _run(tmp_path / "one")
    _run(tmp_path / "four", **{"train.grad_accum": 4})
    # the same draws, summed in 4 micro-batches instead of 1: float rounding only
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "four")) < 1e-6
    torch.testing.assert_close(_losses(tmp_path / "four"), _losses(tmp_path / "one"), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="grad_accum"):
        _run(tmp_path / "bad", **{"train.grad_accum": 3})


@pytest.mark.slow
def test_compile_really_compiles_and_matches_eager(tmp_path: Path) -> None:
    """train.compile: true runs the step through torch.compile (inductor on CPU: a C++ toolchain is needed)."""
    import torch._dynamo

    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    _run(tmp_path / "eager", steps=3)
    _run(tmp_path / "compiled", steps=3, **{"train.compile": "true"})
    assert counts["stats"]["unique_graphs"] >= 1  # something was compiled
    assert _max_diff(_weights(tmp_path / "eager"), _weights(tmp_path / "compiled")) < 1e-5
    torch._dynamo.reset()


def test_a_training_step_never_reads_a_tensor_on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside train_step, code of the trainer, the flow and the loss turns no tensor into a Python number: the loss
    and its finiteness are read every log_every steps instead."""
    watched = {"trainer.py", "objective.py", "flow_objective.py", "flow.py", "loss.py", "paths.py", "time.py"}
    watched.add("coupling.py")
    reads = record_host_reads(monkeypatch, watched)
    _run(tmp_path / "run", steps=4, **{"train.log_every": 2})
    assert reads == []
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [2, 4]


def test_a_non_finite_loss_stops_the_run_naming_the_steps_and_writes_no_checkpoint(tmp_path: Path) -> None:
    from manifold_fm.training.trainer import TrainingError

    with pytest.raises(TrainingError, match=r"not finite in steps 1\.\.2 \(no checkpoint after step 0"):
        _run(
            tmp_path / "nan",
            steps=6,
            **{"optim.lr": "1e30", "optim.grad_clip": "null", "train.log_every": 2, "train.checkpoint_every": 2},
        )
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_tensorboard_tracker_through_accelerate_logs_what_the_jsonl_logs(tmp_path: Path) -> None:
    """train.log_with: [tensorboard] goes through accelerate's tracking; the event file holds the JSONL's losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path / "tb", steps=4, **{"train.log_with": "[tensorboard]", "train.log_every": 2})
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("loss")]
    jsonl = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "tb" / "metrics.jsonl")]
    assert [s for s, _ in logged] == [s for s, _ in jsonl] == [2, 4]
    np.testing.assert_allclose([v for _, v in logged], [v for _, v in jsonl], rtol=1e-6)  # float32 in the file


# ----------------------------------------------------------------------------------------------- sampling precision
@pytest.mark.parametrize(
    ("precision", "device", "tf32", "autocast"),
    [
        ("fp32", "cpu", False, False),
        ("tf32", "cpu", True, False),  # TF32 has no CPU kernels: numerically fp32 there
        ("bf16", "cpu", True, True),
        ("auto", "cpu", False, False),  # auto is fp32 off CUDA
        ("fp32", "cuda", False, False),
        ("auto", "cuda", None, None),  # auto on CUDA: AUTO_ON_CUDA
    ],
)
@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_precision_scope_sets_tf32_and_autocast_and_restores_them(
    precision: str, device: str, tf32: bool | None, autocast: bool | None
) -> None:
    from manifold_fm.precision import AUTO_ON_CUDA, precision_scope

    if tf32 is None:
        tf32, autocast = AUTO_ON_CUDA != "fp32", AUTO_ON_CUDA == "bf16"
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for outer in (False, True):  # fp32 and tf32 also switch off an enclosing autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        with torch.autocast(device, dtype=torch.bfloat16, enabled=outer), precision_scope(precision, device):
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
            if device == "cpu":  # (autocast cannot switch on for CUDA on a machine without it)
                assert torch.is_autocast_enabled("cpu") is autocast
                dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
                assert dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.backends.cuda.matmul.allow_tf32 is (not tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    with pytest.raises(ValueError, match="precision must be one of"):
        with precision_scope("fp16", "cpu"):
            pass


def test_bf16_sampling_keeps_the_samples_on_the_spheres() -> None:
    """sample.precision: bf16 runs the network in bfloat16 (the samples differ from fp32's by bf16 rounding) while
    the exp-map steps stay float32: every token on its sphere to float32 rounding, as in fp32."""
    from manifold_fm.eval.sample_quality import token_norm_error
    from manifold_fm.sampler import SamplerSpec, generate

    torch.manual_seed(0)
    model = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    with torch.no_grad():  # a non-trivial velocity (SiT's zero-initialised output layer would give zero)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    flow, labels = preset_flow("spherical", 4), torch.arange(6) % 3
    out = {}
    for precision in ("fp32", "bf16"):
        spec = SamplerSpec(method="euler", steps=8, cfg_scale=2.0, precision=precision)
        g = torch.Generator().manual_seed(0)
        out[precision] = generate(model, flow, (6, 4, 4, 4), spec, generator=g, labels=labels, null_class=3)
    assert out["bf16"].dtype == torch.float32
    diff = float((out["bf16"] - out["fp32"]).abs().max())
    assert 1e-4 < diff < 0.5  # bf16 rounding of the velocity, not a different sample
    for z in out.values():
        assert token_norm_error(z)["max"] < 5e-7  # float32 rounding of |z| = 2 (1e-7 seen; bf16 steps: 1e-2)
