"""Augmentation and normalization as batched tensor ops, on whatever device the images are on.

The course's training transform is ``RandomRotation(30)``, ``RandomResizedCrop(size)`` (scale
0.08-1, ratio 3/4-4/3) and a horizontal flip. Here the three are one affine map per sample
(rotation about the centre, then the crop box, then the flip), applied to a whole batch with a
single ``F.affine_grid`` + ``F.grid_sample`` (bilinear, zeros outside the image as
RandomRotation's fill). Parameters are drawn on the CPU from a seeded ``torch.Generator`` so
the same seed gives the same crops on CPU and GPU.

Evaluation (and training with augmentation off) is the centre crop: a slice of the cached square,
converted and normalized with the same float32 operations as ``ToTensor`` + ``Normalize``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from covid_tune.models import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class AugmentSettings:
    """The course's preset (torchvision's defaults for RandomResizedCrop)."""

    degrees: float = 30.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    attempts: int = 10  # RandomResizedCrop's tries before falling back to the whole image


COURSE = AugmentSettings()


def sample_affine(n: int, generator: torch.Generator, settings: AugmentSettings = COURSE) -> torch.Tensor:
    """``(n, 2, 3)`` float32 matrices for ``F.affine_grid``: output coords -> input coords in [-1, 1].

    Crop box as in torchvision's ``RandomResizedCrop.get_params`` on a square image (side 1):
    area fraction ~ U(scale), log aspect ~ U(log ratio), first of ``attempts`` boxes that fit,
    else the whole image; its position is uniform over where it fits.
    """
    a = settings.attempts
    u = torch.rand(n, 2 * a + 4, generator=generator, dtype=torch.float64)
    area = settings.scale[0] + (settings.scale[1] - settings.scale[0]) * u[:, :a]
    lo, hi = math.log(settings.ratio[0]), math.log(settings.ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, a:2 * a])
    w_all, h_all = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w_all <= 1) & (h_all <= 1)
    first = fits.to(torch.int8).argmax(1, keepdim=True)  # first attempt that fits
    found = fits.any(1)
    w = torch.where(found, w_all.gather(1, first).squeeze(1), torch.ones(n, dtype=torch.float64))
    h = torch.where(found, h_all.gather(1, first).squeeze(1), torch.ones(n, dtype=torch.float64))
    cx = w / 2 + u[:, 2 * a] * (1 - w)  # box centre, as a fraction of the side
    cy = h / 2 + u[:, 2 * a + 1] * (1 - h)
    angle = torch.deg2rad(settings.degrees * (2 * u[:, 2 * a + 2] - 1))
    flip = torch.where((u[:, 2 * a + 3] < 0.5) & settings.flip, -1.0, 1.0).to(torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # normalized coords: the box is centre (2c-1), half-size w (the full side spans 2)
    sx, sy, bx, by = w * flip, h, 2 * cx - 1, 2 * cy - 1
    theta = torch.stack([
        torch.stack([cos * sx, -sin * sy, cos * bx - sin * by], 1),
        torch.stack([sin * sx, cos * sy, sin * bx + cos * by], 1),
    ], 1)
    return theta.to(torch.float32)


def affine_crop(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Resample uint8 ``(B, C, S, S)`` images through ``theta`` to float ``(B, C, size, size)`` in [0, 1]."""
    x = images.to(torch.float32).div(255)
    grid = F.affine_grid(theta.to(x.device), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0, 1)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` crop of uint8 ``(B, C, S, S)`` images as float in [0, 1] (``ToTensor``'s values)."""
    s = images.shape[-1]
    top = int(round((s - size) / 2.0))
    return images[..., top:top + size, top:top + size].to(torch.float32).div(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """One channel replicated to three (grayscale meets the RGB network here), then ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - mean) / std


def make_batch(images: torch.Tensor, size: int, augment: bool, generator: torch.Generator | None = None,
               settings: AugmentSettings = COURSE, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``(B, C, S, S)`` -> normalized float ``(B, 3, size, size)``, augmented or centre-cropped."""
    if augment:
        if generator is None:
            raise ValueError("augmentation needs a seeded generator")
        x = affine_crop(images, sample_affine(images.shape[0], generator, settings), size)
    else:
        x = center_crop(images, size)
    x = normalize(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
