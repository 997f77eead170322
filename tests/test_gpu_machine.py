"""The suite on a machine with a GPU: every test that runs code in this process sees no CUDA, and every process a
test starts has CUDA hidden, so bitwise and cross-process comparisons run on the CPU and two launched ranks form
gloo groups, never two NCCL ranks on one GPU (tests/conftest.py, helpers.cpu_only / cpu_env)."""

from __future__ import annotations

import ast
from pathlib import Path
from unittest import mock

import torch

import helpers

TESTS = Path(__file__).resolve().parent
_LAUNCHERS = {"run", "Popen", "call", "check_call", "check_output"}


def _subprocess_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls ``subprocess.<run|Popen|...>(...)`` (or of those names imported from subprocess)."""
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "subprocess"
        for alias in node.names
    }
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "subprocess":
            if f.attr in _LAUNCHERS:
                calls.append(node)
        elif isinstance(f, ast.Name) and f.id in imported & _LAUNCHERS:
            calls.append(node)
    return calls


def test_every_process_a_test_starts_has_cuda_hidden() -> None:
    """Each ``subprocess`` call in tests/ passes ``env=cpu_env(...)``, and accelerate is launched only through
    ``helpers.accelerate_command`` (CPU ranks)."""
    unpinned, launches = [], []
    for path in sorted(TESTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for call in _subprocess_calls(tree):
            env = next((k.value for k in call.keywords if k.arg == "env"), None)
            pinned = isinstance(env, ast.Call) and isinstance(env.func, ast.Name) and env.func.id == "cpu_env"
            if not pinned:
                unpinned.append(f"{path.name}:{call.lineno}")
        if path.name not in ("helpers.py", Path(__file__).name) and "accelerate.commands.launch" in path.read_text():
            launches.append(path.name)
    assert not unpinned, f"subprocess calls without env=cpu_env(...): {unpinned}"
    assert not launches, f"accelerate launched without helpers.accelerate_command: {launches}"
    assert _subprocess_calls(ast.parse((TESTS / "test_multiprocess.py").read_text()))  # the scan sees them
    env = helpers.cpu_env(EXTRA="1", drop=("HOME",))
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["EXTRA"] == "1" and "HOME" not in env


def test_every_test_runs_on_the_cpu_in_process() -> None:
    """conftest.py hides CUDA from this test as from every test not marked ``gpu``."""
    assert torch.cuda.is_available is helpers._no_cuda and not torch.cuda.is_available()


def test_a_visible_gpu_is_hidden_from_the_library() -> None:
    """Where CUDA is visible (simulated here: torch reports one GPU), code inside ``cpu_only`` (every test) still
    chooses the CPU: the trainer's accelerator, a command's process state and torch-fidelity's default."""
    from accelerate import PartialState

    from manifold_fm.data.sources import TensorSource
    from manifold_fm.models.sit import SiT
    from manifold_fm.training.builders import preset_flow
    from manifold_fm.training.flow_objective import FlowObjective
    from manifold_fm.training.schema import load_image_config
    from manifold_fm.training.trainer import Trainer, cpu_only

    with mock.patch("torch.cuda.is_available", lambda: True), mock.patch("torch.cuda.device_count", lambda: 1):
        assert not cpu_only(None)  # unpinned, the library would take the GPU
        with helpers.cpu_only():
            assert cpu_only(None)
            cfg = load_image_config(None, ["tokenizer.kind=none", "data.source=latents", "data.latents=x"])
            model = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=3)
            data = TensorSource(torch.randn(8, 4, 4, 4), torch.arange(8) % 3)
            objective = FlowObjective(model, preset_flow("spherical", 4), cfg.optim, null_class=3)
            trainer = Trainer(objective, data, cfg.train, "unused", progress=False)
            assert trainer.device.type == "cpu"
            assert PartialState(cpu=cpu_only(None)).device.type == "cpu"
