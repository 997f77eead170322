"""SiT: published parameter counts, adaLN-Zero identity at init, patchify round trip, position embedding, FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import rearrange
from torch.utils.flop_counter import FlopCounterMode

from manifold_fm.models.sit import (
    SiT,
    SiTSpec,
    build_sit,
    count_parameters,
    sincos_pos_embed_2d,
    sit_forward_flops,
    sit_names,
)


@pytest.mark.parametrize(("name", "millions", "rel"), [("SiT-B/2", 130.0, 0.01), ("SiT-XL/2", 675.0, 0.005)])
def test_published_parameter_counts_on_meta_device(name: str, millions: float, rel: float) -> None:
    # SiT/DiT on ImageNet-256: 32x32x4 SD-VAE latents, 1000 classes; published B/2 ~130M, XL/2 ~675M.
    model = build_sit(name, input_size=32, in_channels=4, num_classes=1000, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=rel)


def test_every_named_config_parses() -> None:
    names = sit_names()
    assert {"SiT-S/1", "SiT-B/2", "SiT-L/4", "SiT-XL/2", "SiT-Tiny/1"} <= set(names)
    assert SiTSpec.parse("XL/2") == SiTSpec(28, 1152, 16, 2)
    with pytest.raises(ValueError, match="unknown SiT config"):
        SiTSpec.parse("SiT-XXL/2")
    with pytest.raises(ValueError, match="unknown SiT config"):
        SiTSpec.parse("SiT-B/3")


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_shapes_and_zero_output_at_init(patch: int) -> None:
    model = SiT(input_size=8, patch_size=patch, in_channels=6, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    x = torch.randn(3, 6, 8, 8)
    out = model(x, torch.rand(3), torch.tensor([0, 4, 5]))
    assert out.shape == x.shape
    # adaLN-Zero: the output layer starts at zero, so the initial velocity is exactly 0.
    assert torch.equal(out, torch.zeros_like(out))


def test_blocks_are_identity_at_init_and_learn_afterwards() -> None:
    model = SiT(input_size=4, patch_size=1, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=3)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(model.blocks[0](h, c), h)
    # One SGD step on a regression target must move the output off zero and reduce the loss.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, y = torch.randn(4, 3, 4, 4), torch.rand(4), torch.tensor([0, 1, 2, 3])
    target = torch.randn_like(x)
    losses = []
    for _ in range(3):
        loss = (model(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.blocks[0](h, c), h)


def test_unpatchify_inverts_an_independent_patchify() -> None:
    model = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=0, num_heads=2, num_classes=2)
    x = torch.randn(2, 3, 8, 8)
    tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=2, q=2)
    assert torch.equal(model.unpatchify(tokens), x)


def _dit_numpy_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    # Transcription of DiT's models.py get_2d_sincos_pos_embed (numpy), used as the independent reference.
    def from_grid(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([from_grid(embed_dim // 2, grid[0]), from_grid(embed_dim // 2, grid[1])], axis=1)


def test_position_embedding_matches_dit_reference() -> None:
    ours = sincos_pos_embed_2d(64, 5, 5).numpy()
    np.testing.assert_allclose(ours, _dit_numpy_pos_embed(64, 5), atol=1e-6)


def test_null_class_selects_its_own_embedding() -> None:
    model = SiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    assert model.null_class == 3
    emb = model.y_embedder(torch.tensor([0, 3]))
    assert torch.equal(emb[1], model.y_embedder.embedding_table.weight[3])


def test_bad_input_shape_is_one_clear_error() -> None:
    model = SiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match=r"expects latents of shape \(B, 2, 4, 4\)"):
        model(torch.randn(1, 3, 4, 4), torch.rand(1), torch.zeros(1, dtype=torch.long))


def test_flop_formula_matches_torch_flop_counter() -> None:
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    # Every matmul/conv is counted exactly; the fused CPU attention kernel is invisible to the counter.
    assert sit_forward_flops(model, batch=2, attention=False) == counter.get_total_flops()
    # The attention term on its own, against explicit matmuls the counter does see: QK^T and AV per head.
    b, n, d, heads = 2, model.num_patches, model.hidden_size, model.num_heads
    q = torch.randn(b, heads, n, d // heads)
    with FlopCounterMode(display=False) as attn_counter:
        (q @ q.transpose(-1, -2)).softmax(-1) @ q
    per_layer = sit_forward_flops(model, batch=2) - sit_forward_flops(model, batch=2, attention=False)
    assert per_layer == model.depth * attn_counter.get_total_flops()
