"""Augmentation and normalization as batched tensor ops, on whatever device the images are on.

The course's training transform is ``RandomRotation(30)``, ``RandomResizedCrop(size)`` (scale
0.08-1, ratio 3/4-4/3) and a horizontal flip. Here the three are one affine map per sample
(rotation about the centre, then the crop box, then the flip), applied to a whole batch with one
sampling grid and one ``F.grid_sample`` (bilinear, zeros outside the image as RandomRotation's
fill). Parameters are drawn on the CPU from a seeded ``torch.Generator`` so
the same seed gives the same crops on CPU and GPU.

Evaluation (and training with augmentation off) is the centre crop: a slice of the cached square,
converted and normalized with the same float32 operations as ``ToTensor`` + ``Normalize``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from covid_tune.models.registry import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class AugmentSettings:
    """The course's preset (torchvision's defaults for RandomResizedCrop)."""

    degrees: float = 30.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    attempts: int = 10  # RandomResizedCrop's tries before falling back to the whole image


COURSE = AugmentSettings()
# torchvision's usual fine-tuning transforms: RandomRotation(15), RandomResizedCrop(scale=(0.7, 1)), flip
LIGHT = AugmentSettings(degrees=15.0, scale=(0.7, 1.0))
PRESETS: dict[str, AugmentSettings | None] = {"none": None, "light": LIGHT, "course": COURSE}
# a spec's custom augmentation: its keys and, for each one left out, the value that does nothing
CUSTOM_DEFAULTS = {"rotation": 0.0, "scale": (1.0, 1.0), "ratio": (3 / 4, 4 / 3), "flip": False}


def augment_settings(augment: bool | str | dict | None) -> AugmentSettings | None:
    """What a trial's ``augment`` means: None (no augmentation) or the settings of the batched pipeline.

    ``augment`` is a preset name (``none``, ``light``, ``course``), a custom ``{rotation, scale, ratio,
    flip}`` mapping (keys left out do nothing) or, as before presets, true (course) / false (none).
    """
    if augment is None or isinstance(augment, bool):
        return COURSE if augment else None
    if isinstance(augment, str):
        if augment not in PRESETS:
            raise ValueError(f"unknown augmentation {augment!r} (allowed: {', '.join(PRESETS)} or a mapping)")
        return PRESETS[augment]
    d = {**CUSTOM_DEFAULTS, **dict(augment)}
    return AugmentSettings(degrees=float(d["rotation"]), scale=tuple(float(v) for v in d["scale"]),
                           ratio=tuple(float(v) for v in d["ratio"]), flip=bool(d["flip"]))


def augment_label(augment: bool | str | dict | None) -> str:
    """A short readable name for config ids and tables: the preset's name, or ``r15s0.7-1f`` for a
    custom one (rotation, crop scale, ``f`` = flip, ``a`` + ratio when not 3/4-4/3)."""
    if augment is None or isinstance(augment, bool):
        return "course" if augment else "none"
    if isinstance(augment, str):
        return augment
    s = augment_settings(augment)
    text = f"r{s.degrees:g}s{s.scale[0]:g}-{s.scale[1]:g}" + ("f" if s.flip else "")
    if tuple(s.ratio) != CUSTOM_DEFAULTS["ratio"]:
        text += f"a{s.ratio[0]:.3g}-{s.ratio[1]:.3g}"
    return text


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
    flip = (u[:, 2 * a + 3] < 0.5) & settings.flip
    return affine_matrix(w, h, cx, cy, angle, flip)


def affine_matrix(w: torch.Tensor, h: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, angle: torch.Tensor,
                  flip: torch.Tensor) -> torch.Tensor:
    """``(n, 2, 3)`` float32 ``affine_grid`` matrices for crop boxes of a rotated, square image.

    Box: width ``w``, height ``h``, centre ``(cx, cy)``, all as fractions of the side, taken from
    the image rotated by ``angle`` (radians) about its centre; ``flip`` mirrors the crop. Output
    coordinate ``u`` reads input coordinate ``R(angle) @ (box_centre + diag(+-w, h) @ u)`` in
    normalized [-1, 1] units (isotropic on a square image, so a rotation stays a rotation).
    """
    f64 = dict(dtype=torch.float64)
    w, h, cx, cy, angle = (torch.as_tensor(t, **f64) for t in (w, h, cx, cy, angle))
    sign = 1.0 - 2.0 * torch.as_tensor(flip).to(torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy, bx, by = w * sign, h, 2 * cx - 1, 2 * cy - 1
    theta = torch.stack([
        torch.stack([cos * sx, -sin * sy, cos * bx - sin * by], -1),
        torch.stack([sin * sx, cos * sy, sin * bx + cos * by], -1),
    ], -2)
    return theta.to(torch.float32)


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, size, size), align_corners=False)``, built in two broadcast adds.

    The affine map is separable into a row part and a column part, so each coordinate plane is one
    ``(B, 1, W) + (B, H, 1)`` sum written straight into the grid; ``F.affine_grid``'s batched
    matmul over every pixel costs several times more on a CPU.
    """
    b = theta.shape[0]
    pos = (torch.arange(size, dtype=torch.float32, device=theta.device) * 2 + 1) / size - 1  # pixel centres
    grid = torch.empty(b, size, size, 2, dtype=torch.float32, device=theta.device)
    for k in range(2):
        along_x = theta[:, k, 0, None, None] * pos.view(1, 1, size) + theta[:, k, 2, None, None]
        along_y = theta[:, k, 1, None, None] * pos.view(1, size, 1)
        torch.add(along_x, along_y, out=grid[..., k])
    return grid


def _affine_sample(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    # sampled on the 0-255 scale: the division folds into the normalization that follows
    grid = affine_grid(theta.to(images.device), size)
    return F.grid_sample(images.to(torch.float32), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` crop of uint8 ``(B, C, S, S)`` images as float in [0, 1] (``ToTensor``'s values)."""
    s = images.shape[-1]
    top = int(round((s - size) / 2.0))
    return images[..., top:top + size, top:top + size].to(torch.float32).div(255)


@functools.cache
def _constants(device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Per-channel normalization constants as 0-dim float32 tensors, made once per device (no
    host-to-device copy per batch on a GPU)."""
    def t(values) -> list[torch.Tensor]:
        return [torch.tensor(v, dtype=torch.float32, device=device) for v in values]

    return {"mean": t(IMAGENET_MEAN), "std": t(IMAGENET_STD),
            "scale": t([1.0 / (255.0 * s) for s in IMAGENET_STD]),
            "shift": t([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])}


def normalize(x: torch.Tensor) -> torch.Tensor:
    """One channel replicated to three (grayscale meets the RGB network here), then ImageNet mean/std.

    Per channel ``(x - mean) / std`` in float32, the operations of ``T.Normalize``, so centre crops
    come out bit-identical to the PIL evaluation transform; each plane is written in place.
    """
    k = _constants(x.device)
    out = torch.empty(x.shape[0], 3, *x.shape[2:], dtype=torch.float32, device=x.device)
    for c in range(3):
        torch.sub(x[:, c if x.shape[1] == 3 else 0], k["mean"][c], out=out[:, c])
        out[:, c].div_(k["std"][c])
    return out


def make_batch(images: torch.Tensor, size: int, augment: bool, generator: torch.Generator | None = None,
               settings: AugmentSettings = COURSE, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``(B, C, S, S)`` -> normalized float ``(B, 3, size, size)``, augmented or centre-cropped."""
    if augment:
        if generator is None:
            raise ValueError("augmentation needs a seeded generator")
        x = _affine_sample(images, sample_affine(images.shape[0], generator, settings), size)
        x = _scale_normalize(x)
    else:
        x = normalize(center_crop(images, size))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _scale_normalize(x: torch.Tensor) -> torch.Tensor:
    """``normalize(x / 255)`` for 0-255 samples, one fused multiply-add per output plane."""
    k = _constants(x.device)
    out = torch.empty(x.shape[0], 3, *x.shape[2:], dtype=torch.float32, device=x.device)
    for c in range(3):
        torch.addcmul(k["shift"][c], x[:, c if x.shape[1] == 3 else 0], k["scale"][c], out=out[:, c])
    return out
