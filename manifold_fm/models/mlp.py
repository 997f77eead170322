"""Small MLP velocity fields for toy manifolds: ``model(x, t, y=None) -> ambient velocity`` of ``x``'s shape."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style features of ``t`` (shape ``(B,)``): ``[cos(t f_k), sin(t f_k)]`` with geometric
    frequencies ``f_k = 1000 * max_period^{-k/half}`` (times in ``[0, 1]`` are scaled by 1000 as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class VelocityMLP(nn.Module):
    """``v(x, t[, y])``: an MLP on the flattened point, a sinusoidal time embedding and an optional class embedding.

    Args:
        point_shape: the shape of one point (e.g. ``(3,)`` for ``S^2``, ``(k, 3)`` for ``(S^2)^k``).
        hidden: width of the hidden layers; depth: number of hidden layers.
        time_dim: size of the sinusoidal time features.
        num_classes: if set, ``y`` in ``[0, num_classes]`` (``num_classes`` is the null class for guidance).
        periodic: feed ``[cos x, sin x]`` instead of ``x`` (for angle coordinates on the torus: continuous across
            the ``-pi/pi`` seam).
    """

    def __init__(
        self,
        point_shape: Sequence[int],
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 64,
        num_classes: int | None = None,
        periodic: bool = False,
    ) -> None:
        super().__init__()
        self.point_shape = tuple(int(s) for s in point_shape)
        self.n = math.prod(self.point_shape)
        self.time_dim, self.periodic, self.num_classes = time_dim, periodic, num_classes
        width_in = (2 * self.n if periodic else self.n) + time_dim
        self.class_embed = nn.Embedding(num_classes + 1, time_dim) if num_classes is not None else None
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU())
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(width_in if i == 0 else hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden if depth else width_in, self.n))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.point_shape:
            raise ValueError(f"VelocityMLP expects points of shape {self.point_shape}, got {tuple(x.shape[1:])}")
        flat = x.reshape(x.shape[0], self.n)
        feats = torch.cat([torch.cos(flat), torch.sin(flat)], dim=-1) if self.periodic else flat
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.time_mlp(sinusoidal_embedding(t, self.time_dim).to(flat.dtype))
        if self.class_embed is not None:
            if y is None:
                raise ValueError("this VelocityMLP is class-conditional: pass labels y")
            emb = emb + self.class_embed(y)
        out = self.net(torch.cat([feats, emb], dim=-1))
        return out.reshape(x.shape)


__all__ = ["VelocityMLP", "sinusoidal_embedding"]
