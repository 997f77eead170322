"""SiT: the Scalable Interpolant Transformer (Ma et al., 2024) — a DiT (Peebles & Xie, 2023) predicting velocity.

The network maps a latent ``x`` of shape ``(B, C, H, W)``, a time ``t`` of shape ``(B,)`` in ``[0, 1]`` and a class
label ``y`` of shape ``(B,)`` (``y == num_classes`` is the null class used for classifier-free guidance) to an
ambient velocity of the same shape as ``x``. It is the same network for the linear and the spherical flows: only
the path, prior, loss projection and sampler around it change.

Architecture (as in the DiT/SiT reference code):

- patchify: a ``p x p`` stride-``p`` convolution to ``(B, N, D)`` tokens, ``N = (H/p)(W/p)``, plus a fixed 2-D
  sin-cos position embedding;
- conditioning ``c = MLP(sinusoid(t)) + Embed(y)`` (frequency embedding of size 256, ``max_period = 10000``);
- ``depth`` DiT blocks with adaLN-Zero: ``(shift, scale, gate) x 2 = Linear(SiLU(c))``, each residual branch is
  ``x + gate * f(LN(x) * (1 + scale) + shift)`` and the modulation layers start at zero so every block starts as
  the identity;
- final layer ``Linear(LN(x) * (1 + scale) + shift)`` (also zero-initialised) and unpatchify. Learned sigma is off:
  the output has ``in_channels`` channels.

Published sizes (depth, width, heads): S (12, 384, 6), B (12, 768, 12), L (24, 1024, 16), XL (28, 1152, 16), each with
patch 1, 2 or 4 (``"SiT-B/2"``). ``"SiT-Tiny/*"`` and ``"SiT-Micro/*"`` are CPU-sized configs of the same design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name -> (depth, hidden size, heads)
SIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "Tiny": (6, 192, 3),
    "Micro": (4, 96, 4),
}
PATCH_SIZES = (1, 2, 4)


@dataclass(frozen=True)
class SiTSpec:
    """The shape of one SiT: ``SiTSpec.parse("SiT-B/2")``."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int

    @classmethod
    def parse(cls, name: str) -> SiTSpec:
        """``"SiT-XL/2"`` (or ``"XL/2"``) -> the published depth/width/heads with patch size 2."""
        raw = name.removeprefix("SiT-")
        size, _, patch = raw.partition("/")
        if size not in SIT_SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
            known = ", ".join(f"SiT-{s}/{p}" for s in SIT_SIZES for p in PATCH_SIZES)
            raise ValueError(f"unknown SiT config '{name}'; known: {known}")
        depth, hidden, heads = SIT_SIZES[size]
        return cls(depth, hidden, heads, int(patch))


def sit_names() -> list[str]:
    """Every named config, e.g. ``SiT-B/2``."""
    return [f"SiT-{s}/{p}" for s in SIT_SIZES for p in PATCH_SIZES]


# ----------------------------------------------------------------------------- embeddings
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[cos(t f_i), sin(t f_i)]``, ``f_i = max_period^(-i / (dim/2))``: ``(B,) -> (B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """``t -> MLP(sinusoid(t))``: Linear(256, D), SiLU, Linear(D, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1.0) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t * self.time_scale, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, the null class ``num_classes``, for classifier-free guidance.

    Dropping labels for guidance training is the trainer's job (it owns the random generator, so a resumed run
    draws the same drops); here label ``num_classes`` simply selects the null embedding.
    """

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """The MAE/DiT fixed 2-D sin-cos embedding: half the channels encode the row, half the column. ``(h*w, dim)``."""
    if dim % 4:
        raise ValueError(f"SiT hidden size must be divisible by 4 for the 2-D position embedding, got {dim}")

    def one_axis(pos: Tensor, d: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    gh, gw = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    # DiT's numpy code puts the w-coordinate first (meshgrid(grid_w, grid_h)); keep that order.
    emb = torch.cat([one_axis(gw, dim // 2), one_axis(gh, dim // 2)], dim=1)
    return emb.float()


# ----------------------------------------------------------------------------- blocks
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``(B, D)`` shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention (qkv with bias, output projection), via ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``Linear(D, rD) -> GELU(tanh) -> Linear(rD, D)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to ``p * p * C`` values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------- model
class SiT(nn.Module):
    """Class-conditional SiT velocity network ``v(x, t, y)``: ``(B, C, H, W), (B,), (B,) -> (B, C, H, W)``.

    Args:
        input_size: latent side ``H = W`` (must be divisible by ``patch_size``).
        in_channels: latent channels ``C`` (the output has the same number: learned sigma is off).
        num_classes: real classes; label ``num_classes`` is the null class.
        time_scale: ``t`` is multiplied by this before the sinusoidal embedding (SiT uses 1).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"SiT input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        grid = input_size // patch_size
        self.num_patches = grid * grid
        # Fixed (not learned) as in DiT; a non-persistent buffer keeps it out of checkpoints and the optimizer.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, zeroed adaLN modulations and output layer."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """``(B, N, p*p*C) -> (B, C, H, W)``."""
        c, p = self.out_channels, self.patch_size
        h = w = int(math.isqrt(x.shape[1]))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"SiT expects latents of shape (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def build_sit(
    name: str,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    time_scale: float = 1.0,
    device: torch.device | str | None = None,
) -> SiT:
    """A SiT by config name (``"SiT-B/2"``, ``"SiT-Tiny/1"``...) for the given latent size and classes."""
    spec = SiTSpec.parse(name)
    if device is not None:
        with torch.device(device):
            return build_sit(
                name, input_size=input_size, in_channels=in_channels, num_classes=num_classes, time_scale=time_scale
            )
    return SiT(
        input_size=input_size,
        patch_size=spec.patch_size,
        in_channels=in_channels,
        hidden_size=spec.hidden_size,
        depth=spec.depth,
        num_heads=spec.num_heads,
        num_classes=num_classes,
        time_scale=time_scale,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as the fixed position embedding excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def sit_forward_flops(model: SiT, batch: int = 1, attention: bool = True) -> float:
    """Forward-pass FLOPs (2 per multiply-add) of ``batch`` samples, counting matmuls and attention.

    Per block with ``N`` tokens of width ``D``: qkv + proj ``8 N D^2``, attention ``4 N^2 D``, MLP ``16 N D^2``
    (ratio 4), adaLN ``12 D^2``; plus patch embedding ``2 N p^2 C D`` and the output layer. Training costs ~3x this.
    ``attention=False`` leaves out the ``4 N^2 D`` score/value products (torch's CPU flop counter does not see them).
    """
    n, d, p, c = model.num_patches, model.hidden_size, model.patch_size, model.in_channels
    mlp_hidden = model.blocks[0].mlp.fc1.out_features if model.depth else 4 * d
    per_block = 2 * n * (3 * d * d + d * d + 2 * d * mlp_hidden) + 4 * n * n * d * attention + 2 * 6 * d * d
    embed = 2 * n * p * p * c * d + 2 * (256 * d + d * d)
    final = 2 * n * d * p * p * c + 2 * 2 * d * d
    return float(batch * (model.depth * per_block + embed + final))
