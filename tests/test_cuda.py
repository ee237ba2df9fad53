"""The GPU path on a real GPU: skipped where torch sees none (CI, the development machines).

Run on a machine with CUDA as ``pytest tests/test_cuda.py``; the same behaviour on the CPU is
covered by tests/test_gpu_path.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from engine_helpers import CPU, SYNTHETIC, TINY_HP  # noqa: F401  (SYNTHETIC sizes conftest's index/decoded)

from covid_tune.data.loaders import TensorLoader
from covid_tune.engine.training import TrainingRun
from covid_tune.sweep.trainable import snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = torch.device("cuda")
HP = replace(TINY_HP, freeze="block1", augment=True, dropout=0.3)


def test_gpu_augmentation_matches_the_cpu_for_the_same_seed() -> None:
    images = torch.randint(0, 256, (16, 1, 37, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    targets = torch.arange(16)
    on = {d: TensorLoader(images, targets, 32, 8, shuffle=True, augment=True, seed=3, device=d) for d in (CPU, GPU)}
    for loader in on.values():
        loader.set_epoch(2)
    for (xc, yc), (xg, yg) in zip(on[CPU], on[GPU]):
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(yc, yg.cpu())  # same order
        # same crops: bilinear sampling agrees to float rounding (values are normalized, ~[-2, 2.7])
        assert torch.allclose(xc, xg.cpu(), atol=1e-4), (xc - xg.cpu()).abs().max()


def test_gpu_run_keeps_data_on_the_gpu_under_bf16_and_channels_last(index, decoded) -> None:
    run = TrainingRun(HP, index, GPU, decoded=decoded)
    assert run.amp_dtype == torch.bfloat16 and run.channels_last
    assert run.train_loader.images.is_cuda and run.train_loader.images.dtype == torch.uint8
    assert run.modes == {"decoded_cache": 1, "feature_cache": 0, "augmented": 1, "gpu": 1, "compiled": 0}
    x, _ = next(iter(run.train_loader))
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    first, second = run.run_epoch(), run.run_epoch()
    assert all(math.isfinite(v) for v in {**first, **second}.values())
    after = run.model.state_dict()
    for k in before:
        if k.startswith("net.features.0."):  # frozen block: weights and BatchNorm statistics
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["net.features.1.0.weight"], after["net.features.1.0.weight"])


def test_gpu_checkpoint_resumes_the_same_run(index, decoded) -> None:
    """What the trainable does on a GPU: copy the state to the CPU (snapshot), load it into a new run."""
    hp = replace(HP, augment=True)
    whole = TrainingRun(hp, index, GPU, decoded=decoded)
    expected = [whole.run_epoch() for _ in range(3)]
    first = TrainingRun(hp, index, GPU, decoded=decoded)
    first.run_epoch()
    state = snapshot(first.state_dict())
    assert "cuda_rng" in state and all(not t.is_cuda for t in state["model"].values())
    resumed = TrainingRun(hp, index, GPU, decoded=decoded)
    resumed.load_state_dict(state)
    got = [resumed.run_epoch() for _ in range(2)]
    for e, g in zip(expected[1:], got):
        assert g["epoch"] == e["epoch"]
        for k in ("train_loss", "val_loss"):
            # cuDNN's backward kernels may add in another order between runs
            assert g[k] == pytest.approx(e[k], rel=1e-3), k


@pytest.mark.parametrize("freeze", ["fc_only", "block1"])
def test_gpu_feature_cache_keeps_the_prefix_dtype_and_follows_the_plain_path(index, decoded, freeze: str) -> None:
    hp = replace(HP, freeze=freeze, augment=False)
    plain = TrainingRun(replace(hp, feature_cache="off"), index, GPU, decoded=decoded)
    a = [plain.run_epoch() for _ in range(2)]
    cached = TrainingRun(hp, index, GPU, decoded=decoded)
    b = [cached.run_epoch() for _ in range(2)]
    assert cached.modes["feature_cache"] == 1 and cached.modes["gpu"] == 1
    features = cached._features[0].features
    assert features.is_cuda and features.dtype == torch.bfloat16  # what autocast hands the next layer
    for ra, rb in zip(a, b):
        for k in ("train_loss", "val_loss"):
            assert ra[k] == pytest.approx(rb[k], rel=2e-2), k


def test_gpu_compiled_run_follows_the_eager_one(index, decoded) -> None:
    """compile: on under bf16 autocast and channels_last (inductor's Triton kernels) trains to the eager
    run's losses within bf16's rounding and leaves the checkpoint's keys as they were."""
    hp = replace(HP, freeze="none", augment=False, dropout=0.0)
    eager = TrainingRun(replace(hp, compile="off"), index, GPU, decoded=decoded)
    a = [eager.run_epoch() for _ in range(2)]
    torch._dynamo.utils.counters.clear()
    compiled = TrainingRun(replace(hp, compile="on"), index, GPU, decoded=decoded)
    b = [compiled.run_epoch() for _ in range(2)]
    assert compiled.modes["compiled"] == 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=0.05)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=0.05)
    assert eager.state_dict().keys() == compiled.state_dict().keys()
