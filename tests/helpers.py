"""Helpers shared by several test modules (``from helpers import ...``: ``conftest.py`` puts ``tests/`` on
``sys.path``). Fixtures built on them live in ``conftest.py``.

The module is deliberately not ``tests/__init__.py``-based: torch-fidelity installs a top-level ``tests`` package.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from hypothesis import settings
from torch import Tensor

# ----------------------------------------------------------------------------------------------- hypothesis
CI_MAX_EXAMPLES = 40  # max_examples of the deterministic ``ci`` profile (conftest.py)


def max_examples(ci: int) -> int:
    """An example budget of ``ci`` under the ``ci`` profile, scaled with the loaded profile's budget otherwise.

    For ``@settings(max_examples=...)`` on tests that run fewer examples than the profile's default (many
    parametrized cases): under ``HYPOTHESIS_PROFILE=dev`` they then run proportionally more, instead of staying at
    their CI budget. Read when the test module is imported, i.e. after conftest loaded the profile.
    """
    return max(1, round(ci * settings.default.max_examples / CI_MAX_EXAMPLES))


# ----------------------------------------------------------------------------------------------- manifolds
def product_diff(a: Tensor, b: Tensor) -> Tensor:
    """Coordinate difference ``a - b`` on the test suites' product manifold, laid out as sphere (3) | flat torus (2)
    | euclidean (2): only the torus coordinates wrap (to ``[-pi, pi)``)."""
    from manifold_fm.manifolds.torus import wrap_angle  # here: conftest imports this module, keep that import light

    d = a - b
    return torch.cat([d[..., :3], wrap_angle(d[..., 3:5]), d[..., 5:]], dim=-1)


def sphere_grid(n_theta: int) -> tuple[Tensor, Tensor]:
    """Midpoint quadrature on the unit sphere S^2 in float64: ``n_theta`` polar by ``2 n_theta`` azimuthal cells.

    Returns the cell centres ``(n_theta * 2 n_theta, 3)`` and their areas ``sin(theta) dtheta dphi``.
    """
    th = (torch.arange(n_theta, dtype=torch.float64) + 0.5) * math.pi / n_theta
    ph = (torch.arange(2 * n_theta, dtype=torch.float64) + 0.5) * math.pi / n_theta
    T, P = torch.meshgrid(th, ph, indexing="ij")
    x = torch.stack([torch.sin(T) * torch.cos(P), torch.sin(T) * torch.sin(P), torch.cos(T)], -1).reshape(-1, 3)
    return x, (torch.sin(T) * (math.pi / n_theta) ** 2).reshape(-1)


# ----------------------------------------------------------------------------------------------- optional extras
#: The first diffusers release with ``AutoencoderKLFlux2`` (checked in the wheels of 0.35.2 and 0.36.0).
FLUX2_MIN_DIFFUSERS = "0.36.0"


def require_flux2_vae() -> type:
    """diffusers' ``AutoencoderKLFlux2``, or skip the calling test with the reason: diffusers is not installed (the
    optional ``images`` extra) or older than :data:`FLUX2_MIN_DIFFUSERS`."""
    import pytest

    diffusers = pytest.importorskip("diffusers", reason="FLUX.2's VAE needs diffusers (the optional 'images' extra)")
    cls = getattr(diffusers, "AutoencoderKLFlux2", None)
    if cls is None:
        pytest.skip(
            f"diffusers {diffusers.__version__} has no AutoencoderKLFlux2 (first in diffusers {FLUX2_MIN_DIFFUSERS})"
        )
    return cls


# ----------------------------------------------------------------------------------------------- torch-fidelity
def standin_extractor(
    *,
    pool: int,
    features: int | None = None,
    logits: int | Sequence[Sequence[float]] | Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> type:
    """A torch-fidelity feature-extractor class standing in for Inception, whose weights are not available here.

    Feature ``"pool"`` (the FD layer): the uint8 images in ``dtype``, divided by 255, average-pooled to
    ``pool x pool`` per channel and flattened; then, when ``features`` is given, times a fixed random
    ``(3 pool^2, features)`` projection drawn from ``torch.Generator().manual_seed(0)``.
    Feature ``"logits"`` (the Inception-score layer), only when ``logits`` is given: the pool features in float32
    times a head that is either random ``(features, logits)``, drawn next from the same generator, or the given
    matrix. Without logits, every metric (the Inception score too) reads ``"pool"``.

    torch-fidelity is imported here, so test modules that use this still collect without the ``images`` extra.
    """
    import torch.nn.functional as F
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    g = torch.Generator().manual_seed(0)
    proj = None if features is None else torch.randn(3 * pool * pool, features, generator=g)
    if logits is None:
        head = None
    elif isinstance(logits, int):
        if features is None:
            raise ValueError("a random logits head needs a random projection: give features too")
        head = torch.randn(features, logits, generator=g)
    else:
        head = torch.as_tensor(logits, dtype=torch.float32)
    provided = ("pool",) if head is None else ("pool", "logits")

    class StandIn(FeatureExtractorBase):
        def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
            super().__init__(name, features_list)
            self.register_buffer("proj", None if proj is None else proj.clone())
            self.register_buffer("head", None if head is None else head.clone())

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return provided

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "logits" if metric == "isc" and "logits" in provided else "pool"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> Tensor:
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            f = F.adaptive_avg_pool2d(x.to(dtype) / 255, pool).flatten(1)
            if self.proj is not None:
                f = f @ self.proj.to(dtype)
            out = {"pool": f}
            if self.head is not None:
                out["logits"] = f.float() @ self.head
            return tuple(out[k] for k in self.features_list)

    return StandIn


# ----------------------------------------------------------------------------------------------- CLI runs
def tiny_image_run(*settings: str) -> list[str]:
    """``manifold-fm train`` options of a seconds-long ``image-builtin`` run (2 images per class, batch 8, no sample
    grids during training) followed by ``--set`` for each of ``settings``."""
    base = ["data.per_class=2", "train.batch_size=8", "train.sample_every=null", *settings]
    return ["--config", "image-builtin", *(arg for s in base for arg in ("--set", s))]


# ----------------------------------------------------------------------------------------------- resume
def log_lines(run: Any) -> list[str]:
    """The complete lines of a run's ``metrics.jsonl`` (a line a killed process left half written is dropped)."""
    import json
    from pathlib import Path

    path = Path(run) / "metrics.jsonl"
    lines = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        lines.append(line)
    return lines


def _line_step(line: str) -> int:
    import json

    return int(json.loads(line)["step"])


def assert_resumed(run: Any, start: int, total: int, log_before: Sequence[str], key: str = "loss") -> None:
    """Prove that the run in ``run`` was resumed, not restarted: the last process started at the checkpoint's step
    ``start`` and trained only the remaining ``total - start`` steps (the sessions its final checkpoint records, each
    process's start step and step count, chain from 0 to ``total``), and its ``metrics.jsonl`` kept, byte for byte,
    the lines of steps ``<= start`` it held before the resume (``log_before``: a restarted run rewrites them) and
    logs each step's ``key`` once. A restore that does nothing fails every part of this."""
    import json
    from pathlib import Path

    from manifold_fm.training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(Path(run) / "checkpoints")
    assert latest is not None, f"{run} holds no checkpoint"
    meta = json.loads((latest / "meta.json").read_text())
    sessions = meta["sessions"]
    assert meta["step"] == total and sessions[-1] == {"start": start, "steps": total - start}, sessions
    reached = 0
    for session in sessions:
        assert session["start"] <= reached, sessions  # each process started where a checkpoint was
        reached = session["start"] + session["steps"]
    assert reached == total, sessions
    after = log_lines(run)
    kept = [line for line in log_before if _line_step(line) <= start]
    assert kept, "the first process logged nothing up to the checkpoint: nothing to compare"
    assert after[: len(kept)] == kept, "the lines logged before the checkpoint were rewritten"
    steps = [_line_step(line) for line in after if key in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == total, steps  # each step logged once


# ----------------------------------------------------------------------------------------------- processes, CPU
# The suite runs on the CPU on every machine, a GPU machine included: results compared bit for bit or across
# processes must come from the same kernels, and two gloo ranks must not become two NCCL ranks on one GPU. Launched
# processes get an environment that hides CUDA (cpu_env: every subprocess call in tests/ passes env=cpu_env(...),
# test_gpu_machine.py checks it); in-process code sees no CUDA through cpu_only() (conftest.py applies it to every
# test not marked ``gpu``).


def cpu_env(*, drop: Sequence[str] = (), **extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``) and one
    OpenMP thread, plus ``extra``, without the variables in ``drop``."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    """A TCP port free on this machine now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(*args: str, processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``processes`` CPU processes (gloo ranks) running ``args`` (``-m module ...`` or a
    script path and its arguments); run it with ``env=cpu_env()``."""
    import sys

    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *(["--multi_gpu"] if processes > 1 else ["--cpu"]),
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *args,
    ]


def load_script(path: Any, name: str) -> Any:
    """Import the script at ``path`` (not a package module) as module ``name``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def record_host_reads(monkeypatch: Any, watched: set[str]) -> list[str]:
    """Spy on ``Tensor.item/__float__/__bool__/tolist`` while ``Trainer.train_step`` runs: the returned list
    collects ``"<method> in <file>"`` for every call made from a ``manifold_fm`` file whose name is in ``watched``
    (a host read inside a step: a device sync on an accelerator)."""
    import sys
    from pathlib import Path

    from manifold_fm.training.trainer import Trainer

    inside = {"step": False}
    reads: list[str] = []

    def spy(name: str):  # noqa: ANN202
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: object):  # noqa: ANN202
            caller = sys._getframe(1).f_code.co_filename
            if inside["step"] and "manifold_fm" in caller and Path(caller).name in watched:
                reads.append(f"{name} in {Path(caller).name}")
            return original(self, *args)

        return wrapper

    for name in ("item", "__float__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    original_step = Trainer.train_step

    def traced(self: Trainer, *args: object, **kwargs: object):  # noqa: ANN202
        inside["step"] = True
        try:
            return original_step(self, *args, **kwargs)
        finally:
            inside["step"] = False

    monkeypatch.setattr(Trainer, "train_step", traced)
    return reads


def kill_launched(proc: Any) -> None:
    """SIGKILL an ``accelerate launch`` started with ``start_new_session=True`` and every process under it, then
    reap it. Its ranks run in sessions of their own (torch's elastic agent starts them so), so killing the launcher's
    process group alone leaves them running."""
    import os
    import signal

    import psutil  # a dependency of accelerate

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=30)
    proc.wait()


@contextlib.contextmanager
def cpu_only() -> Iterator[None]:
    """In-process code sees no CUDA (``torch.cuda.is_available()`` is false), so the library, accelerate and
    torch-fidelity choose the CPU as on a machine without a GPU; accelerate's process state is rebuilt on entry and
    on exit, so no device choice leaks into or out of the block."""
    from unittest import mock

    reset_accelerate()
    try:
        with mock.patch("torch.cuda.is_available", _no_cuda), mock.patch("torch.cuda.device_count", _no_devices):
            yield
    finally:
        reset_accelerate()


def _no_cuda() -> bool:
    return False


def _no_devices() -> int:
    return 0


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state (its device is chosen once per state); a no-op before any."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------------------------- devices
#: The device a simulated GPU reports (:func:`simulated_cuda`).
SIM_CUDA = torch.device("cuda", 0)


class DeviceMismatchError(RuntimeError):
    """What :func:`simulated_cuda` raises where a real GPU would refuse to mix devices (the messages follow
    PyTorch's)."""


def _sim_device(value: Any) -> torch.device | None:
    """``value`` as a device (``"cuda"`` and ``cuda`` without an index mean ``cuda:0``), ``None`` if it is none."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return torch.device("cuda", value)
    if isinstance(value, str):
        try:
            value = torch.device(value)
        except RuntimeError:
            return None
    if isinstance(value, torch.device):
        return SIM_CUDA if value.type == "cuda" else value
    return None


_REAL_GENERATOR = torch.Generator


class _GeneratorType(type(_REAL_GENERATOR)):
    def __instancecheck__(cls, obj: object) -> bool:  # real generators made before the simulation still count
        return isinstance(obj, _REAL_GENERATOR)


class SimGenerator(_REAL_GENERATOR, metaclass=_GeneratorType):
    """A CPU generator that reports the device it was asked for (``torch.Generator(device="cuda")`` needs a driver)."""

    def __new__(cls, device: Any = None) -> SimGenerator:
        self = super().__new__(cls)
        self._sim_device = _sim_device(device) or torch.device("cpu")
        return self

    def __init__(self, device: Any = None) -> None:
        pass

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._sim_device


# Tensor properties the simulation answers (their descriptors; compared with a getter's ``__self__``)
_DEVICE, _IS_CUDA, _IS_CPU, _GRAD = (torch._C.TensorBase.__dict__[n] for n in ("device", "is_cuda", "is_cpu", "grad"))


class _SimulatedCuda(torch.overrides.TorchFunctionMode):
    """Tensors on the simulated GPU are real CPU tensors whose storage is tagged; the mode reports their device as
    ``cuda:0``, tags what they produce, and raises :class:`DeviceMismatchError` where CUDA would refuse."""

    # functions that take tensors on different devices on a real GPU: indexing with host indices, copies, printing
    _MIXING = {"__getitem__", "copy_", "__repr__", "__format__", "__str__", "_has_compatible_shallow_copy_type"}
    # functions that refuse a 0-dim host tensor beside GPU tensors (elementwise ops accept it as a scalar; the
    # concatenations check every input's device)
    _NO_HOST_SCALARS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "column_stack"}

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self._tags: dict[int, Any] = {}

    def on_gpu(self, t: Tensor) -> bool:
        storage = t.untyped_storage()
        ref = self._tags.get(storage._cdata)
        if ref is not None and ref.expired():  # freed: its address may be reused by a host tensor
            del self._tags[storage._cdata]
            return False
        return ref is not None

    def tag(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        self._tags[storage._cdata] = self._ref(storage)
        return t

    def device_of(self, t: Tensor) -> torch.device:
        return SIM_CUDA if self.on_gpu(t) else t.device

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch.utils._pytree import tree_flatten

        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        if name in ("__get__", "__set__", "__delete__"):
            if owner is _DEVICE:
                return self.device_of(args[0])
            if owner is _IS_CUDA:
                return self.on_gpu(args[0])
            if owner is _IS_CPU:
                return not self.on_gpu(args[0])
            out = func(*args, **kwargs)
            if owner is _GRAD and out is not None and self.on_gpu(args[0]):
                self.tag(out)  # gradients, made by the autograd engine, follow their tensor
            return out
        if func in (Tensor.numpy, Tensor.__array__) and self.on_gpu(args[0]):
            raise TypeError(
                "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory "
                "first."
            )
        # explicit moves
        if func in (Tensor.to, Tensor.cuda, Tensor.cpu):
            src = args[0]
            if func is Tensor.cuda:
                target, args, kwargs = SIM_CUDA, (src,), {}
            elif func is Tensor.cpu:
                target = torch.device("cpu")
            else:
                target = None
                rest = []
                for a in args[1:]:
                    if isinstance(a, Tensor):  # .to(other): its device and dtype
                        target, a = self.device_of(a), a.dtype
                    elif _sim_device(a) is not None:
                        target, a = _sim_device(a), torch.device("cpu")
                    rest.append(a)
                if "device" in kwargs:
                    target, kwargs["device"] = _sim_device(kwargs["device"]), torch.device("cpu")
                args = (src, *rest)
                target = target or self.device_of(src)
                func = Tensor.to
            out = func(*args, **kwargs)
            same = out.untyped_storage()._cdata == src.untyped_storage()._cdata
            if target.type == "cuda":
                if same and not self.on_gpu(src):
                    out = self.tag(src.detach().clone())
                elif not same:
                    self.tag(out)
            elif same and self.on_gpu(src):
                out = src.detach().clone()
            return out
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        if "device" in kwargs and kwargs["device"] is not None:  # factories
            out_device = _sim_device(kwargs["device"]) or torch.device("cpu")
            kwargs["device"] = torch.device("cpu")
        else:
            scalars_count = name in self._NO_HOST_SCALARS
            on = {self.device_of(t).type for t in tensors if t.dim() > 0 or self.on_gpu(t) or scalars_count}
            if name == "__setitem__":  # host indices are fine, a value tensor must sit with the target
                on = {self.device_of(t).type for t in (args[0], args[2]) if isinstance(t, Tensor) and t.dim() > 0}
            if len(on) > 1 and name not in self._MIXING:
                raise DeviceMismatchError(
                    f"{name}: Expected all tensors to be on the same device, but found at least two devices, cuda:0 "
                    "and cpu!"
                )
            out_device = SIM_CUDA if any(self.on_gpu(t) for t in tensors) else torch.device("cpu")
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type != out_device.type:
            raise DeviceMismatchError(
                f"{name}: Expected a '{out_device.type}' device type for generator but found '{generator.device.type}'"
            )
        out = func(*args, **kwargs)
        if out_device.type == "cuda" and name not in self._MIXING - {"__getitem__"}:
            for o in tree_flatten(out)[0]:
                if isinstance(o, Tensor):
                    self.tag(o)
        return out


@contextlib.contextmanager
def simulated_cuda(accelerate: bool = False) -> Iterator[Any]:
    """A GPU for device-discipline tests on a machine without one: inside, ``device="cuda"`` (and ``.to("cuda")``,
    ``.cuda()``, ``torch.Generator(device="cuda")``) give tensors that report ``cuda:0`` and compute on the CPU,
    with the same values a CPU run gets; mixing them with host tensors the way a real GPU refuses raises
    :class:`DeviceMismatchError`: an op on tensors of both devices (0-dim host tensors excepted, as on CUDA, except in
    concatenations such as ``torch.stack``; indexing with host indices and ``copy_`` allowed), a generator of the
    other device, ``.numpy()`` of a GPU tensor.
    ``accelerate``: accelerate's ``Accelerator.device`` is the simulated GPU too (for the trainer).

    Build modules and real tensors outside or inside; move them in with ``.to("cuda")`` inside. Gradients follow
    their tensors (read through ``.grad`` or returned by ``torch.autograd.grad``). ``torch.cuda.is_available()`` stays
    false (nothing real is there).
    """
    from unittest import mock

    mode = _SimulatedCuda()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.Generator", SimGenerator))
        real_grad = torch.autograd.grad

        def grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:  # made by the engine, like .grad
            out = real_grad(outputs, inputs, *args, **kwargs)
            for g, x in zip(out, [inputs] if isinstance(inputs, Tensor) else inputs, strict=False):
                if g is not None and mode.on_gpu(x):
                    mode.tag(g)
            return out

        stack.enter_context(mock.patch("torch.autograd.grad", grad))
        if accelerate:
            from accelerate import Accelerator

            stack.enter_context(mock.patch.object(Accelerator, "device", property(lambda self: SIM_CUDA)))
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")  # torch.autocast("cuda") there
        stack.enter_context(mode)
        yield mode
