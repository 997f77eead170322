"""Image distances for decoder finetuning and reconstruction reports: LPIPS (local weights), a weightless fallback,
PSNR and SSIM. Images are ``(B, 3, H, W)`` in ``[-1, 1]``; every distance returns one value per image ``(B,)``.

LPIPS (Zhang et al. 2018, "vgg" variant) needs two local files, since nothing is downloaded at run time:
torchvision's VGG16 ImageNet weights (``vgg16-397923af.pth``, keys ``features.N.weight``) and the LPIPS linear
heads (``lpips/weights/v0.1/vgg.pth``, keys ``linK.model.1.weight``). Without them :func:`perceptual_distance`
returns :class:`GradientPyramidDistance`, whose ``name`` (``"fallback:grad-pyramid-l1"``) is written into every
report so a fallback number is never mistaken for LPIPS.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        raise ValueError(
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
            raise ValueError(f"{vgg_weights} holds no 'features.*' tensors; expected torchvision's vgg16 state dict")
        features.load_state_dict(feat_state, assign=True)
        starts = (0, *_VGG_STAGE_ENDS[:-1])
        bounds = zip(starts, _VGG_STAGE_ENDS, strict=True)
        self.stages = nn.ModuleList(nn.Sequential(*features[s:e]) for s, e in bounds)
        lin = self._load(lin_weights, "LPIPS linear")
        self.lins = nn.ParameterList()
        for k, c in enumerate(_VGG_CHANNELS):
            key = f"lin{k}.model.1.weight"
            if key not in lin or tuple(lin[key].shape) != (1, c, 1, 1):
                raise ValueError(f"{lin_weights} lacks {key} of shape (1, {c}, 1, 1); expected LPIPS v0.1 vgg.pth")
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
            raise ValueError(f"{what} weights {path} are unreadable: {exc}") from None

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
        raise ValueError("LPIPS needs both --lpips-vgg (VGG16 weights) and --lpips-lin (LPIPS heads), or neither")
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
