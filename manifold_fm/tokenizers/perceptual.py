"""Image distances for decoder finetuning and reconstruction reports: LPIPS (local weights), a weightless fallback,
PSNR and SSIM. Images are ``(B, 3, H, W)`` in ``[-1, 1]``; every distance returns one value per image ``(B,)``.

LPIPS (Zhang et al. 2018, "vgg" variant) needs two local files, since nothing is downloaded at run time:
torchvision's VGG16 ImageNet weights (``vgg16-397923af.pth``, keys ``features.N.weight``) and the LPIPS linear
heads (``lpips/weights/v0.1/vgg.pth``, keys ``linK.model.1.weight``). Without them :func:`perceptual_distance`
returns :class:`GradientPyramidDistance`, whose ``name`` (``"fallback:grad-pyramid-l1"``) is written into every
report so a fallback number is never mistaken for LPIPS.

:class:`DINOv2Distance` is the swap probe's second distance (the SFM paper reports LPIPS and DINOv2): the cosine
distance between DINOv2 class-token embeddings, from a local DINOv2 ViT state dict (no torch hub, no transformers).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manifold_fm.errors import InputError

# LPIPS' input scaling layer (ImageNet statistics expressed for inputs in [-1, 1]).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# VGG16 `features` indices ending the five LPIPS stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_VGG_STAGE_ENDS = (4, 9, 16, 23, 30)
_VGG_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    """VGG16's convolutional trunk (torchvision's layout), without building the 120M-parameter classifier."""
    try:
        from torchvision.models.vgg import cfgs, make_layers

        return make_layers(cfgs["D"], batch_norm=False)
    except ImportError:  # a torchvision without these helpers: build the whole model and keep its trunk
        from torchvision.models import vgg16

        return vgg16(weights=None).features


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise InputError(
            f"image distance needs two (B, C, H, W) batches of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


class LPIPS(nn.Module):
    """LPIPS-VGG: ``sum_l mean_hw |w_l * (f_l(a)/|f_l(a)| - f_l(b)/|f_l(b)|)|^2`` over five VGG16 stages.

    Channel-normalised features (``eps = 1e-10`` as in the reference), squared difference, a learned non-negative
    1x1 weighting per stage, spatial mean, sum over stages. Weights are frozen.
    """

    name = "lpips-vgg"

    def __init__(self, vgg_weights: str | Path, lin_weights: str | Path) -> None:
        super().__init__()
        with torch.device("meta"):  # the weights come from the file: skip the (slow) random initialisation
            features = _vgg16_features()
        state = self._load(vgg_weights, "VGG16")
        feat_state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        if not feat_state:
            raise InputError(f"{vgg_weights} holds no 'features.*' tensors; expected torchvision's vgg16 state dict")
        features.load_state_dict(feat_state, assign=True)
        starts = (0, *_VGG_STAGE_ENDS[:-1])
        bounds = zip(starts, _VGG_STAGE_ENDS, strict=True)
        self.stages = nn.ModuleList(nn.Sequential(*features[s:e]) for s, e in bounds)
        lin = self._load(lin_weights, "LPIPS linear")
        self.lins = nn.ParameterList()
        for k, c in enumerate(_VGG_CHANNELS):
            key = f"lin{k}.model.1.weight"
            if key not in lin or tuple(lin[key].shape) != (1, c, 1, 1):
                raise InputError(f"{lin_weights} lacks {key} of shape (1, {c}, 1, 1); expected LPIPS v0.1 vgg.pth")
            self.lins.append(nn.Parameter(lin[key].float(), requires_grad=False))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    @staticmethod
    def _load(path: str | Path, what: str) -> dict[str, Tensor]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{what} weights {path} do not exist")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling/format failure is one "unreadable" error
            raise InputError(f"{what} weights {path} are unreadable: {exc}") from None

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        _check_pair(a, b)
        h = torch.cat([a, b]).to(self.shift.dtype)
        h = (h - self.shift) / self.scale
        total = torch.zeros(a.shape[0], dtype=h.dtype, device=h.device)
        for stage, w in zip(self.stages, self.lins, strict=False):
            h = stage(h)
            fa, fb = h.chunk(2)
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((fa - fb) ** 2, w).mean(dim=(1, 2, 3))
        return total


class GradientPyramidDistance(nn.Module):
    """The weightless fallback: ``mean_s (mean|a_s - b_s| + mean|dx a_s - dx b_s| + mean|dy a_s - dy b_s|)``.

    ``a_s`` is ``a`` average-pooled ``2^s`` times (``s = 0..levels-1``), ``dx``/``dy`` forward differences. It
    compares structure (edges) at several scales, is differentiable and needs no weights; it is *not* LPIPS.
    """

    name = "fallback:grad-pyramid-l1"

    def __init__(self, levels: int = 3) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        _check_pair(a, b)
        total = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        used = 0
        for s in range(self.levels):
            if s:
                if min(a.shape[-2:]) < 4:
                    break
                a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
            d = a - b
            level = d.abs().mean(dim=(1, 2, 3))
            level = level + (d[..., :, 1:] - d[..., :, :-1]).abs().mean(dim=(1, 2, 3))
            level = level + (d[..., 1:, :] - d[..., :-1, :]).abs().mean(dim=(1, 2, 3))
            total = total + level
            used += 1
        return total / used


def perceptual_distance(vgg_weights: str | Path | None = None, lin_weights: str | Path | None = None) -> nn.Module:
    """LPIPS when both weight files are given, else :class:`GradientPyramidDistance`; read ``.name`` for which."""
    if (vgg_weights is None) != (lin_weights is None):
        raise InputError("LPIPS needs both --lpips-vgg (VGG16 weights) and --lpips-lin (LPIPS heads), or neither")
    if vgg_weights is None:
        return GradientPyramidDistance()
    return LPIPS(vgg_weights, lin_weights)  # type: ignore[arg-type]


def psnr(a: Tensor, b: Tensor, max_db: float = 100.0) -> Tensor:
    """``10 log10(1 / mse)`` per image on the ``[0, 1]`` scale (images given in ``[-1, 1]``), capped at ``max_db``."""
    _check_pair(a, b)
    mse = ((a.double() - b.double()) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10)))).float()


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM per image (Wang et al. 2004) on the ``[0, 1]`` scale, Gaussian window, valid positions only.

    ``SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))`` with ``C1 = 0.01^2``,
    ``C2 = 0.03^2``, local statistics under a separable Gaussian window, averaged over channels and positions.
    The window shrinks to the image side for images smaller than ``window``.
    """
    _check_pair(a, b)
    x, y = (a.double() + 1) / 2, (b.double() + 1) / 2
    size = min(window, *x.shape[-2:])
    g = _gaussian_window(size, sigma, x.dtype, x.device)
    c = x.shape[1]
    gh = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    gv = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return m.mean(dim=(1, 2, 3)).to(torch.float32)


# ImageNet statistics DINOv2 normalises its [0, 1] inputs with.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class _DinoBlock(nn.Module):
    """One DINOv2 ViT block: ``x + ls1 * attn(norm1 x)``, then ``x + ls2 * mlp(norm2 x)`` (pre-norm, LayerScale)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gamma2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.gamma1 * self.proj(att)
        return x + self.gamma2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DINOv2Distance(nn.Module):
    """Cosine distance ``1 - cos(f(a), f(b))`` between DINOv2 class-token embeddings, from a local state dict.

    The network is DINOv2's ViT (facebookresearch/dinov2 ``vision_transformer.py``: 14-px patches, class token,
    optional register tokens, pre-norm blocks with LayerScale, final LayerNorm; the MLP variants ViT-S/B/L, with or
    without registers) rebuilt here so no torch hub / transformers code runs; its size (width, depth, heads = width
    / 64, patch, registers) is read from the tensors. The file is the hub checkpoint (e.g.
    ``dinov2_vitb14_pretrain.pth``, keys ``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``,
    ``blocks.0.ls1.gamma``...). Images in ``[-1, 1]`` are resized (bicubic, antialiased) to ``image_size`` (a
    multiple of the patch size; 224 as in DINOv2's evaluations), normalised with the ImageNet statistics, and the
    position embeddings are interpolated to the patch grid as DINOv2 does (bicubic, offset 0.1).
    """

    def __init__(self, weights: str | Path | dict[str, Tensor], image_size: int = 224) -> None:
        super().__init__()
        if isinstance(weights, (str, Path)):
            state = LPIPS._load(weights, "DINOv2")
            self.source = str(weights)
        else:
            state, self.source = dict(weights), "state dict"
        state = {k[len("backbone.") :] if k.startswith("backbone.") else k: v for k, v in state.items()}
        need = ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight")
        if any(k not in state for k in need) or "blocks.0.attn.qkv.weight" not in state:
            raise InputError(
                f"DINOv2 weights {self.source} lack {[k for k in need if k not in state] or ['blocks.0.*']}; "
                "expected a facebookresearch/dinov2 ViT state dict (e.g. dinov2_vitb14_pretrain.pth)"
            )
        if "blocks.0.mlp.w12.weight" in state:
            raise InputError("DINOv2 ViT-g (SwiGLU MLP) is not supported; use ViT-S/B/L weights")
        proj = state["patch_embed.proj.weight"]
        dim, self.patch = int(proj.shape[0]), int(proj.shape[-1])
        if image_size % self.patch:
            raise InputError(f"DINOv2 image_size must be a multiple of the patch size {self.patch}, got {image_size}")
        self.image_size = image_size
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
        heads = max(1, dim // 64)
        self.patch_embed = nn.Conv2d(3, dim, self.patch, self.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros_like(state["pos_embed"]))
        regs = state.get("register_tokens")
        self.register_tokens = nn.Parameter(torch.zeros_like(regs)) if regs is not None else None
        self.blocks = nn.ModuleList(_DinoBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        mine: dict[str, Tensor] = {
            "patch_embed.weight": proj,
            "patch_embed.bias": state["patch_embed.proj.bias"],
            "cls_token": state["cls_token"],
            "pos_embed": state["pos_embed"],
            "norm.weight": state["norm.weight"],
            "norm.bias": state["norm.bias"],
        }
        if regs is not None:
            mine["register_tokens"] = regs
        names = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2"}
        names.update({"fc1": "mlp.fc1", "fc2": "mlp.fc2"})
        for i in range(depth):
            for ours, theirs in names.items():
                for p in ("weight", "bias"):
                    mine[f"blocks.{i}.{ours}.{p}"] = state[f"blocks.{i}.{theirs}.{p}"]
            for n in (1, 2):
                key = f"blocks.{i}.ls{n}.gamma"
                mine[f"blocks.{i}.gamma{n}"] = state[key] if key in state else torch.ones(dim)
        try:
            self.load_state_dict({k: v.float() for k, v in mine.items()}, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise InputError(f"DINOv2 weights {self.source} have unexpected shapes: {first}") from None
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.name = f"dinov2-vit{dim}d{depth}x{heads}h-p{self.patch}:cls-cosine@{image_size}"
        self.eval().requires_grad_(False)

    def _pos(self, gh: int, gw: int) -> Tensor:
        pos = self.pos_embed
        m = int(round(math.sqrt(pos.shape[1] - 1)))
        if gh == m and gw == m:
            return pos
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic", antialias=False)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def features(self, images: Tensor) -> Tensor:
        """The final-norm class token ``(B, width)`` of images ``(B, 3, H, W)`` in ``[-1, 1]``."""
        x = images.to(self.mean.dtype)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        h = self.patch_embed(x)
        gh, gw = h.shape[-2:]
        tokens = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h.flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens + self._pos(gh, gw)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(h.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        _check_pair(a, b)
        f = self.features(torch.cat([a, b]))
        fa, fb = f.chunk(2)
        return 1 - F.cosine_similarity(fa, fb, dim=1, eps=1e-12)
