"""What a trained model looks at: Grad-CAM maps and the shortcut check (accuracy with the lungs hidden).

DeGrave, Janizek & Lee (Nat. Mach. Intell. 3, 610-619, 2021) showed that COVID chest X-ray classifiers
reach high test accuracy by reading hospital-specific markers outside the lungs. Two cheap probes of
that, run for every best checkpoint where its test evaluation runs:

- the shortcut check: test accuracy as is, with a central box (the lung field) filled with the image's
  mean, and with only that box kept (the border filled). A model that stays far above the
  majority-class rate with the lungs hidden reads something other than the lungs.
- Grad-CAM (the ``grad-cam`` package) on a fixed, seeded sample of test images per class, and the
  share of each map's mass inside the central box.

Everything works on normalized image batches (the evaluation crops), on the model's device.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from covid_tune.models.registry import Ensemble, get_backbone

MAP_SIZE = 64  # Grad-CAM maps are stored at most this many pixels wide (uint8), drawn at the crop's size


def centre_box(height: int, width: int, box_width: float, box_height: float) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of a centred box covering ``box_width`` x ``box_height`` of the image."""
    bw, bh = max(1, round(width * box_width)), max(1, round(height * box_height))
    x0, y0 = (width - bw) // 2, (height - bh) // 2
    return y0, y0 + bh, x0, x0 + bw


def box_mask(height: int, width: int, box_width: float, box_height: float) -> np.ndarray:
    y0, y1, x0, x1 = centre_box(height, width, box_width, box_height)
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def masked(images: torch.Tensor, box_width: float, box_height: float, keep_centre: bool) -> torch.Tensor:
    """A copy of ``images`` (N, C, H, W) with the central box (``keep_centre`` False) or everything
    outside it (True) filled with each image's own mean, per channel."""
    h, w = images.shape[-2:]
    inside = torch.as_tensor(box_mask(h, w, box_width, box_height), device=images.device)
    fill_where = ~inside if keep_centre else inside
    mean = images.mean(dim=(-2, -1), keepdim=True)
    return torch.where(fill_where, mean, images)


def probabilities(logits: torch.Tensor, label_mode: str) -> torch.Tensor:
    """Softmax over classes (single-label) or a sigmoid per class (multi-label)."""
    return torch.softmax(logits, 1) if label_mode == "single" else torch.sigmoid(logits)


def decide(probs: np.ndarray, label_mode: str, threshold: float) -> np.ndarray:
    """Class indices (single-label) or 0/1 rows (multi-label), as the evaluation decides."""
    return probs.argmax(1) if label_mode == "single" else (probs >= threshold).astype(np.int64)


def label_names(pred, classes: list[str]) -> str:
    """A decision as class names: one index, or a 0/1 row (multi-label, ``+``-joined; ``none`` when empty)."""
    if isinstance(pred, (list, tuple, np.ndarray)) and np.ndim(pred) == 1:
        return "+".join(c for c, p in zip(classes, pred) if p) or "none"
    return classes[int(pred)]


def hits(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-sample 0/1: right class (single-label) or every label right (multi-label)."""
    return (y_true == y_pred) if y_true.ndim == 1 else (y_true == y_pred).all(1)


def majority_rate(y_true: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class (or label row) of ``y_true``."""
    rows = y_true.reshape(len(y_true), -1)
    _, counts = np.unique(rows, axis=0, return_counts=True)
    return float(counts.max() / len(rows)) if len(rows) else float("nan")


def accuracy_low(k: int, n: int) -> float:
    """Lower end of the exact (Clopper-Pearson) 95% interval of an accuracy of k right out of n."""
    from scipy.stats import binomtest

    return float(binomtest(k, n).proportion_ci(0.95, method="exact").low) if n else float("nan")


def shortcut_flag(k_hidden: int, n: int, majority: float, margin: float) -> bool:
    """True when accuracy with the lungs hidden is far above the majority-class rate: the lower end of
    its 95% Clopper-Pearson interval exceeds ``majority + margin``."""
    return n > 0 and accuracy_low(k_hidden, n) > majority + margin


# --- Grad-CAM ----------------------------------------------------------------------------------

def cam_layer(model: nn.Module, backbone: str) -> nn.Module:
    """The registry's Grad-CAM target layer of ``backbone`` inside a :class:`~covid_tune.models.registry.Classifier`."""
    return model.net.get_submodule(get_backbone(backbone).cam_layer)


def grad_cam(model: nn.Module, backbone: str, images: torch.Tensor, classes: Iterable[int] | None = None) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] at the input's size, for ``classes`` (default: the predicted class).

    The input requires grad, so maps exist for frozen trunks too (no parameter before the layer trains).
    An :class:`~covid_tune.models.registry.Ensemble`'s map is the mean of its members' maps, each for the
    class the ensemble predicts (default) or ``classes``: where the averaged model looked.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    device = next(model.parameters()).device
    if isinstance(model, Ensemble):
        if classes is None:
            with torch.no_grad():
                classes = model(images.to(device)).argmax(1).tolist()
        classes = list(classes)
        return np.mean([grad_cam(m, backbone, images, classes) for m in model.members], axis=0).astype(np.float32)
    was = model.training
    x = images.detach().to(device).clone().requires_grad_(True)
    targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
    try:
        with torch.enable_grad(), GradCAM(model=model, target_layers=[cam_layer(model, backbone)]) as cam:
            maps = cam(input_tensor=x, targets=targets)
    finally:
        model.train(was)
        model.zero_grad(set_to_none=True)
    return np.asarray(maps, dtype=np.float32)


def mass_inside(maps: np.ndarray, box_width: float, box_height: float) -> np.ndarray:
    """Per map: the share of its mass inside the central box (nan for an all-zero map)."""
    inside = box_mask(*maps.shape[-2:], box_width, box_height)
    total = maps.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (maps * inside).sum(axis=(-2, -1)) / total, np.nan)


def shrink_maps(maps: np.ndarray, size: int = MAP_SIZE) -> list:
    """Maps as nested uint8 lists at most ``size`` pixels wide (for eval.json)."""
    t = torch.as_tensor(maps)[:, None]
    if t.shape[-1] > size:
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="area")
    return (t[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).tolist()


def cam_sample(labels: np.ndarray, n_classes: int, per_class: int, seed: int) -> list[int]:
    """A fixed, seeded sample of up to ``per_class`` indices of each class, in index order."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            chosen += rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()
    return sorted(int(i) for i in chosen)


# --- the check, over one split -------------------------------------------------------------

@torch.no_grad()
def _pass(model: nn.Module, loader, device: torch.device, label_mode: str, settings: dict,
          keep: set[int]) -> tuple[dict[str, list], np.ndarray, dict[int, torch.Tensor]]:
    """One pass: probabilities of each variant (plain, lungs hidden, lungs only), targets, kept images."""
    model.eval()
    w, h = settings["box_width"], settings["box_height"]
    out: dict[str, list] = {"plain": [], "hidden": [], "lungs_only": []}
    targets, kept, start = [], {}, 0
    for images, y in loader:
        images = images.to(device)
        out["plain"].append(probabilities(model(images).float(), label_mode).cpu())
        if settings["enabled"]:
            out["hidden"].append(probabilities(model(masked(images, w, h, False)).float(), label_mode).cpu())
            out["lungs_only"].append(probabilities(model(masked(images, w, h, True)).float(), label_mode).cpu())
        for j in range(len(images)):
            if start + j in keep:
                kept[start + j] = images[j].cpu()
        start += len(images)
        targets.append(torch.as_tensor(y).cpu())
    probs = {k: torch.cat(v).numpy() for k, v in out.items() if v}
    return probs, torch.cat(targets).numpy(), kept


def explain_split(model: nn.Module, meta: dict, loader, labels: np.ndarray, paths: list[str],
                  device: torch.device, shortcut: dict, gradcam: dict) -> tuple[list, dict | None, dict | None]:
    """Per-image probabilities, the shortcut check and the Grad-CAM sample of one split (for eval.json).

    ``labels`` are the split's class indices (for the per-class sample), ``paths`` its files.
    """
    mode, thr = meta["label_mode"], meta["threshold"]
    sample = cam_sample(labels, len(meta["classes"]), gradcam["per_class"], gradcam["seed"])
    probs, y_true, kept = _pass(model, loader, device, mode, shortcut, set(sample))
    check = None
    if shortcut["enabled"]:
        n, majority = len(y_true), majority_rate(y_true)
        right = {k: int(hits(y_true, decide(p, mode, thr)).sum()) for k, p in probs.items()}
        check = {"n": n, "majority_rate": majority, "box_width": shortcut["box_width"],
                 "box_height": shortcut["box_height"], "margin": shortcut["margin"],
                 **{f"acc_{k}": right[k] / n if n else float("nan") for k in right},
                 "acc_hidden_ci_low": accuracy_low(right["hidden"], n),
                 "flagged": shortcut_flag(right["hidden"], n, majority, shortcut["margin"])}
    cam = None
    if sample:
        images = torch.stack([kept[i] for i in sample])
        maps = grad_cam(model, meta["backbone"], images)
        pred = decide(probs["plain"][sample], mode, thr)
        share = mass_inside(maps, shortcut["box_width"], shortcut["box_height"])
        cam = {"indices": sample, "paths": [paths[i] for i in sample], "labels": labels[sample].tolist(),
               "pred": pred.tolist(), "top": probs["plain"][sample].argmax(1).tolist(),
               "mass_inside": share.tolist(), "mean_mass_inside": float(np.nanmean(share)) if len(share) else None,
               "maps": shrink_maps(maps)}
        if check is not None:
            check["cam_mass_inside"] = cam["mean_mass_inside"]
    return probs["plain"].tolist(), check, cam
