"""Checkpoints round-trip exactly and are written atomically; EMA follows its closed form."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from manifold_fm.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from manifold_fm.training.ema import EMA
from manifold_fm.training.trainer import load_step


def test_roundtrip_weights_state_and_rng(tmp_path):
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    rng = rng_state()
    path = save_checkpoint(
        tmp_path,
        7,
        model.state_dict(),
        ema=model.state_dict(),
        state={"optimizer": opt.state_dict(), "rng": rng, "data_pos": 13},
        meta={"note": "x"},
    )
    expected = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002 - the global RNG is under test
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == path and ckpt.step == 7 and ckpt.meta["note"] == "x" and ckpt.state["data_pos"] == 13
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model[k], v) and torch.equal(ckpt.ema[k], v)
    set_rng_state(ckpt.state["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002 - the global RNG is under test
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
    opt2 = torch.optim.AdamW(nn.Linear(4, 3).parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt.state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_latest_pointer_keep_and_leftover_tmp(tmp_path):
    sd = {"w": torch.ones(2)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, sd, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    # an interrupted write leaves only a .tmp folder, which is never taken as a checkpoint
    (tmp_path / "step_00000004.tmp-999").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert load_checkpoint(tmp_path).step == 3


def test_keep_every_spares_the_multiples_from_pruning(tmp_path):
    """keep=1 with keep_every=4 after steps 1..10: the newest (10) and the multiples of 4 (4, 8)."""
    sd = {"w": torch.ones(2)}
    for step in range(1, 11):
        save_checkpoint(tmp_path, step, sd, keep=1, keep_every=4)
    assert [load_step(p) for p in list_checkpoints(tmp_path)] == [4, 8, 10]
    save_checkpoint(tmp_path, 12, sd, keep=1, keep_every=4)
    assert [load_step(p) for p in list_checkpoints(tmp_path)] == [4, 8, 12]


def test_the_trainer_keeps_every_keep_every_th_checkpoint(tmp_path):
    """train.keep_every reaches the trainer's saves: a checkpoint every step, the newest and every 3rd kept."""
    from manifold_fm.data.sources import TensorSource
    from manifold_fm.models.sit import SiT
    from manifold_fm.training.builders import preset_flow
    from manifold_fm.training.flow_objective import FlowObjective
    from manifold_fm.training.schema import load_image_config
    from manifold_fm.training.trainer import Trainer

    overrides = ["tokenizer.kind=none", "data.source=latents", "data.latents=x", "train.batch_size=4", "train.steps=7"]
    keep = ["train.checkpoint_every=1", "train.keep_checkpoints=1", "train.keep_every=3"]
    cfg = load_image_config(None, [*overrides, *keep])
    model = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    data = TensorSource(torch.randn(8, 4, 4, 4), torch.arange(8) % 3)
    objective = FlowObjective(model, preset_flow("spherical", 4), cfg.optim, null_class=3)
    trainer = Trainer(objective, data, cfg.train, tmp_path, device="cpu", progress=False)
    trainer.fit()
    assert [load_step(p) for p in list_checkpoints(tmp_path / "checkpoints")] == [3, 6, 7]


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)


def test_ema_matches_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    ema = EMA(model, decay=0.9)
    w0 = model.weight.detach().clone()
    ref = w0.double()
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model)
        ref = 0.9 * ref + 0.1 * model.weight.detach().double()
    torch.testing.assert_close(ema.model.weight.double(), ref, rtol=1e-6, atol=1e-6)


def test_ema_warmup_decay():
    ema = EMA(nn.Linear(1, 1), decay=0.999, warmup=10)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.updates = 10_000
    assert ema.current_decay() == pytest.approx(0.999)


def test_corrupt_weights_file_is_one_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)})
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)
