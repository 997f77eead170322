"""Patch discriminators for decoder finetuning.

:class:`NLayerDiscriminator` is the PatchGAN the LDM / taming-transformers autoencoders (SD-VAE, VA-VAE and their
kin) were trained with (pix2pix's ``NLayerDiscriminator`` as ``LPIPSWithDiscriminator`` builds it), written here from
its description, with the same module layout so its state dict keys (``main.<i>.*``) are the LDM ones without the
``loss.discriminator.`` prefix:

- ``Conv(in, C, 4, stride 2, pad 1) + LeakyReLU(0.2)``;
- for ``n = 1 .. layers-1``: ``Conv(C m_{n-1}, C m_n, 4, stride 2, pad 1, no bias) + norm + LeakyReLU(0.2)``,
  ``m_n = min(2^n, 8)``;
- ``Conv(C m_{L-1}, C m_L, 4, stride 1, pad 1, no bias) + norm + LeakyReLU(0.2)``;
- ``Conv(C m_L, 1, 4, stride 1, pad 1)``: one logit per patch.

``norm`` is BatchNorm (LDM's default; the convolutions before it then have no bias) or ActNorm
(``use_actnorm=True`` in LDM; with conv biases). With 3 layers and 64 channels a 256x256 image gives 30x30 logits,
each seeing a 70x70 patch. Weights are initialised as LDM does: convolution weights ``N(0, 0.02)``, BatchNorm scales
``N(1, 0.02)`` and shifts 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from manifold_fm.errors import InputError

from .state_files import load_state_file, tensor_state

# Prefixes under which LDM / taming checkpoints store the discriminator (longest first).
_DISC_PREFIXES = ("loss.discriminator.", "discriminator.")


class ActNorm(nn.Module):
    """Per-channel affine normalisation ``scale * (x + loc)`` whose ``loc`` / ``scale`` are set from the first
    training batch (``-mean``, ``1 / (std + 1e-6)`` per channel) and learned afterwards (Glow's ActNorm, as taming
    uses it). ``initialized`` is a buffer, so a loaded checkpoint is not re-initialised."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and int(self.initialized) == 0:
            with torch.no_grad():
                flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
                self.loc.copy_(-flat.mean(1).view_as(self.loc))
                self.scale.copy_((1.0 / (flat.std(1) + 1e-6)).view_as(self.scale))
                self.initialized.fill_(1)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """LDM's PatchGAN discriminator (module docstring); ``forward`` maps ``(B, in, H, W)`` to patch logits."""

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        layers: int = 3,
        norm: Literal["batch", "actnorm"] = "batch",
    ) -> None:
        super().__init__()
        if layers < 1 or base_channels < 1 or in_channels < 1:
            raise InputError(
                f"NLayerDiscriminator needs layers, base_channels, in_channels >= 1, got {layers}, "
                f"{base_channels}, {in_channels}"
            )
        if norm not in ("batch", "actnorm"):
            raise InputError(f"discriminator norm must be 'batch' or 'actnorm', got {norm!r}")
        self.layers, self.base_channels, self.in_channels, self.norm = layers, base_channels, in_channels, norm

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else ActNorm(c)

        bias = norm != "batch"
        mods: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers):
            prev, mult = mult, min(2**n, 8)
            mods += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, 2, 1, bias=bias),
                norm_layer(base_channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**layers, 8)
        mods += [
            nn.Conv2d(base_channels * prev, base_channels * mult, 4, 1, 1, bias=bias),
            norm_layer(base_channels * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(base_channels * mult, 1, 4, 1, 1),
        ]
        self.main = nn.Sequential(*mods)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LDM's initialisation: conv weights ``N(0, 0.02)`` (biases keep PyTorch's default), BatchNorm scale
        ``N(1, 0.02)``, shift 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_image_size(self) -> int:
        """The smallest square input side that still gives at least one logit."""
        # the two stride-1 4x4 convolutions take one pixel each, so the halved map needs a side of 3
        return 3 * 2**self.layers

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.min_image_size():
            raise InputError(
                f"a {self.layers}-layer patch discriminator needs images of at least {self.min_image_size()} px, "
                f"got {tuple(x.shape[-2:])}; use fewer discriminator layers"
            )
        return self.main(x)

    def describe(self) -> dict[str, Any]:
        return {
            "class": "NLayerDiscriminator (LDM/taming PatchGAN)",
            "layers": self.layers,
            "base_channels": self.base_channels,
            "in_channels": self.in_channels,
            "norm": self.norm,
            "parameters": sum(p.numel() for p in self.parameters()),
        }


def discriminator_state(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """The ``main.*`` tensors of a discriminator, from a bare state dict or an LDM / Lightning checkpoint (keys
    ``loss.discriminator.main.*`` or ``discriminator.main.*``, possibly under ``"state_dict"``)."""
    tensors = tensor_state(obj)
    for prefix in _DISC_PREFIXES:
        found = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix + "main.")}
        if found:
            return found
    return {k: v for k, v in tensors.items() if k.startswith("main.")}


def nlayer_discriminator_from_state(state: Mapping[str, Tensor]) -> NLayerDiscriminator:
    """An :class:`NLayerDiscriminator` of the architecture ``state`` describes (channels, layers, norm read from
    the tensor shapes), with ``state`` loaded strictly."""
    convs = sorted(
        (int(k.split(".")[1]) for k in state if k.endswith(".weight") and state[k].ndim == 4),
    )
    if len(convs) < 3 or convs[0] != 0:
        raise InputError(
            "not an NLayerDiscriminator state dict: expected convolution weights main.0.weight ... "
            f"(found {sorted(state)[:4]})"
        )
    first = state["main.0.weight"]
    norm: Literal["batch", "actnorm"] = "actnorm" if "main.3.loc" in state else "batch"
    disc = NLayerDiscriminator(int(first.shape[1]), int(first.shape[0]), len(convs) - 2, norm)
    try:
        disc.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise InputError(f"discriminator state does not match an NLayerDiscriminator: {first_line}") from None
    return disc


def load_nlayer_discriminator(path: str | Path, *, trust_pickle: bool = False) -> NLayerDiscriminator:
    """An :class:`NLayerDiscriminator` loaded from a local file: a bare state dict (``main.*``), or an LDM /
    VA-VAE autoencoder checkpoint holding ``loss.discriminator.main.*``; the architecture comes from the file."""
    state = discriminator_state(load_state_file(path, "discriminator checkpoint", trust_pickle=trust_pickle))
    if not state:
        raise InputError(
            f"discriminator checkpoint {path} has no 'main.*' / 'loss.discriminator.main.*' tensors "
            "(an LDM-layout autoencoder checkpoint or a saved NLayerDiscriminator state dict is expected)"
        )
    return nlayer_discriminator_from_state(state)
