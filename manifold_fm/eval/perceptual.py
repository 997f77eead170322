"""Perceptual and pixel image distances for evaluation reports.

LPIPS (VGG) when local weight files are given, otherwise the weightless, clearly named fallback
``fallback:grad-pyramid-l1``; plus PSNR and SSIM. The implementations live in
:mod:`manifold_fm.tokenizers.perceptual` because decoder finetuning (a lower layer) trains with them; this module is
the evaluation-facing entry point. Every distance maps two ``(B, 3, H, W)`` batches in ``[-1, 1]`` to ``(B,)``.
"""

from __future__ import annotations

from ..tokenizers.perceptual import LPIPS, GradientPyramidDistance, perceptual_distance, psnr, ssim

__all__ = ["LPIPS", "GradientPyramidDistance", "perceptual_distance", "psnr", "ssim"]
