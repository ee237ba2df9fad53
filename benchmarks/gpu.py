"""GPU only: training images/s and MFU per backbone (gpu_mfu), eager and under torch.compile."""

from __future__ import annotations

import os
import time

import torch
from common import PEAK_BF16, Sizes, timed

from covid_tune.data.dataset import DatasetIndex
from covid_tune.data.loaders import TensorLoader, make_loader
from covid_tune.engine import training as engine


def flops_per_image(backbone: str, size: int) -> float:
    """Training FLOPs per image: the forward pass counted by torch's FlopCounterMode, times 3 (fwd + bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    from covid_tune.models.registry import create_model

    model = create_model(backbone, 2, head_hidden=240).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return 3.0 * counter.get_total_flops()


def peak_flops(name: str) -> float | None:
    if os.environ.get("COVID_TUNE_PEAK_FLOPS"):
        return float(os.environ["COVID_TUNE_PEAK_FLOPS"])
    return next((v for k, v in PEAK_BF16.items() if k.lower() in name.lower()), None)


def gpu_train_steps(k: int, loader, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device,
                    amp_dtype: torch.dtype | None = None) -> int:
    """Train ``k`` steps, passing over ``loader`` as often as needed; waits for the GPU; returns images seen."""
    loss_fn = torch.nn.CrossEntropyLoss()
    done, images, epoch = 0, 0, 0
    while done < k:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done, images = done + 1, images + len(x)
            if done >= k:
                break
    torch.cuda.synchronize()
    return images


def gpu_images_per_s(backbone: str, s: Sizes, device: torch.device, compiled: bool = False,
                     batch: int | None = None) -> tuple[float, float]:
    """(training images/s, warm-up seconds) of one backbone on the GPU path: uint8 split on the GPU, tensor
    augmentation, bf16 autocast, channels_last, all layers trainable; ``compiled``: the model's forward
    under torch.compile as ``trainer.compile: on`` does it (the warm-up then includes compiling)."""
    from covid_tune.models.registry import create_model

    torch.manual_seed(0)
    batch = batch or s.gpu_batch
    n = batch * 4
    images = torch.randint(0, 256, (n, 1, 256, 256), dtype=torch.uint8)  # a decoded-cache-like split
    amp_dtype, channels_last = engine.resolve_precision("auto", device)
    model = create_model(backbone, 2, head_hidden=240).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = engine.make_optimizer(model, "sgd", 1e-3, 0.9, 0.0)
    loader = TensorLoader(images, torch.randint(0, 2, (n,)), 224, batch, shuffle=True, augment=True,
                          device=device, channels_last=channels_last)
    if compiled:
        torch._dynamo.reset()  # each arm compiles afresh, for its own batch size (no dynamic-shape graph)
        model.compile()
    start = time.perf_counter()
    gpu_train_steps(5, loader, model, opt, device, amp_dtype)  # warm-up: compiling, cuDNN autotuning, allocator
    warm_s = time.perf_counter() - start
    t, imgs = timed(lambda: gpu_train_steps(s.gpu_steps, loader, model, opt, device, amp_dtype))
    return imgs / t, warm_s


def course_gpu_images_per_s(backbone: str, s: Sizes, device: torch.device, index: DatasetIndex, workers: int) -> float:
    """Training images/s of one backbone the course's way on the same GPU: PIL DataLoader with
    ``workers`` processes (decode + augmentation every epoch), float32, default memory format."""
    from covid_tune.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(backbone, 2, head_hidden=240).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    loader = make_loader(index, "train", 224, s.gpu_batch, "single", {}, train=True, augment=True,
                                num_workers=workers, seed=0)
    gpu_train_steps(3, loader, model, opt, device)  # warm-up: worker processes, cuDNN autotuning
    t, imgs = timed(lambda: gpu_train_steps(s.gpu_steps, loader, model, opt, device))
    return imgs / t


def bench_gpu(s: Sizes, index: DatasetIndex, cores: int) -> dict:
    """Training images/s per backbone at 224 px on the GPU path, that as a fraction of peak, and the
    course's way (PIL DataLoader workers, float32) on the same GPU beside it; then the same path under
    torch.compile at batch ``gpu_batch`` and twice that, with each arm's compile time."""
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    workers = min(8, cores)
    out = {"device": name, "peak_bf16_flops": peak, "image_size": 224, "batch": s.gpu_batch,
           "course_workers": workers, "backbones": {}}
    for backbone in ("resnet18", "vgg16"):
        fpi = flops_per_image(backbone, 224)
        mfu = (lambda ips, fpi=fpi: fpi * ips / peak) if peak else (lambda ips: None)
        ips, _ = gpu_images_per_s(backbone, s, device)
        torch.cuda.empty_cache()
        course = course_gpu_images_per_s(backbone, s, device, index, workers)
        torch.cuda.empty_cache()
        compiled = {}
        for batch in (s.gpu_batch, 2 * s.gpu_batch):
            cips, compile_s = gpu_images_per_s(backbone, s, device, compiled=True, batch=batch)
            torch.cuda.empty_cache()
            compiled[batch] = {"images_per_s": cips, "compile_s": compile_s, "mfu": mfu(cips), "vs_eager": cips / ips}
        best = max(compiled, key=lambda b: compiled[b]["images_per_s"])
        out["backbones"][backbone] = {"images_per_s": ips, "course_images_per_s": course, "speedup": ips / course,
                                      "train_flops_per_image": fpi, "mfu": mfu(ips), "compiled": compiled,
                                      "compiled_best_batch": best, "compiled_mfu": compiled[best]["mfu"]}
    out["gpu_mfu"] = {b: v["mfu"] for b, v in out["backbones"].items()}
    out["gpu_mfu_compiled"] = {b: v["compiled_mfu"] for b, v in out["backbones"].items()}
    return out


# --- table ------------------------------------------------------------------------------------------------
