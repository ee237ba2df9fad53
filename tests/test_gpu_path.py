"""The fast path, exercised on CPU: tensor augmentation, device-resident loaders, precision settings,
the no_grad frozen prefix and the feature cache."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from engine_helpers import CPU, SYNTHETIC, TINY_HP  # noqa: F401  (SYNTHETIC sizes conftest's index/decoded)
from torch.nn import functional as F

from covid_tune.data import augment as A
from covid_tune.data.cache import build_decoded_cache
from covid_tune.data.dataset import eval_transform, load_image
from covid_tune.data.loaders import FeatureLoader, TensorLoader, epoch_generator
from covid_tune.engine.features import feature_cache_mode
from covid_tune.engine.losses import build_loss
from covid_tune.engine.training import (
    COMPILE_MIN_STEPS,
    TrainingRun,
    resolve_compile,
    resolve_precision,
    train_one_epoch,
)
from covid_tune.models.freeze import SplitForward
from covid_tune.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model, split_frozen_prefix

HP = TINY_HP
LOW = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))



def uint8_images(n: int = 6, size: int = 37, channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


# --- tensor augmentation -----------------------------------------------------------------------

def test_augmented_batch_shapes_ranges_and_determinism() -> None:
    x = uint8_images()
    a = A.make_batch(x, 32, True, torch.Generator().manual_seed(1))
    b = A.make_batch(x, 32, True, torch.Generator().manual_seed(1))
    c = A.make_batch(x, 32, True, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert LOW - 1e-5 <= a.min().item() and a.max().item() <= HIGH + 1e-5
    assert torch.equal(a, b) and not torch.equal(a, c)
    # grayscale is replicated: every channel is the same image, normalized per channel
    raw = a * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 0], raw[:, 2], atol=1e-5)
    with pytest.raises(ValueError, match="generator"):
        A.make_batch(x, 32, True, None)


def test_augmentation_off_is_the_eval_center_crop() -> None:
    x = uint8_images(size=37)
    got = A.make_batch(x, 32, False)
    top = int(round((37 - 32) / 2))
    ref = (x[..., top:top + 32, top:top + 32].float() / 255).expand(-1, 3, -1, -1)
    ref = (ref - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(got, ref)


def _affine_crop(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    # the resampling make_batch does, on the 0-1 scale
    return A._affine_sample(images, theta, size) / 255


def test_affine_geometry_identity_flip_rotation_and_crop() -> None:
    x = uint8_images(n=1, size=10)
    one, half, zero = torch.ones(1), torch.full((1,), 0.5), torch.zeros(1)
    no, yes = torch.zeros(1, dtype=torch.bool), torch.ones(1, dtype=torch.bool)
    as_float = x.float() / 255
    ident = _affine_crop(x, A.affine_matrix(one, one, half, half, zero, no), 10)
    assert torch.allclose(ident, as_float, atol=1e-5)
    flipped = _affine_crop(x, A.affine_matrix(one, one, half, half, zero, yes), 10)
    assert torch.allclose(flipped, as_float.flip(-1), atol=1e-5)
    quarter = _affine_crop(x, A.affine_matrix(one, one, half, half, torch.full((1,), math.pi / 2), no), 10)
    assert torch.allclose(quarter, torch.rot90(as_float, 1, (2, 3)), atol=1e-4)
    # the top-left 5x5 box, read at 5 px: exactly those pixels
    corner = _affine_crop(x, A.affine_matrix(half, half, torch.full((1,), .25), torch.full((1,), .25), zero, no), 5)
    assert torch.allclose(corner, as_float[..., :5, :5], atol=1e-5)


def test_sampled_crops_follow_random_resized_crop_and_rotation_ranges() -> None:
    theta = A.sample_affine(4000, torch.Generator().manual_seed(0)).double()
    lin, shift = theta[:, :, :2], theta[:, :, 2]
    w, h = lin[:, :, 0].norm(dim=1), lin[:, :, 1].norm(dim=1)  # columns: R @ (+-w, 0) and R @ (0, h)
    area, aspect = w * h, w / h
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6
    assert aspect.min() >= 3 / 4 - 1e-6 and aspect.max() <= 4 / 3 + 1e-6
    angle = torch.atan2(-lin[:, 0, 1], lin[:, 1, 1])  # second column is (-sin, cos) * h
    assert angle.abs().max() <= math.radians(30) + 1e-6 and angle.abs().max() > math.radians(28)
    flips = torch.det(lin) < 0
    assert 0.45 < flips.double().mean() < 0.55
    rot_back = torch.stack([torch.stack([angle.cos(), angle.sin()], 1), torch.stack([-angle.sin(), angle.cos()], 1)], 1)
    centre = (rot_back @ shift.unsqueeze(-1)).squeeze(-1)  # box centre before rotation, in [-1, 1]
    assert (centre[:, 0].abs() + w <= 1 + 1e-5).all() and (centre[:, 1].abs() + h <= 1 + 1e-5).all()


# --- loaders over device-resident tensors ----------------------------------------------------------

def test_loader_order_depends_on_seed_and_epoch_only() -> None:
    images, targets = uint8_images(n=11), torch.arange(11)
    loader = TensorLoader(images, targets, 32, batch_size=4, shuffle=True, seed=3)
    loader.set_epoch(1)
    first = torch.cat([y for _, y in loader])
    loader.set_epoch(2)
    other = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    again = torch.cat([y for _, y in loader])
    assert len(loader) == 3 and sorted(first.tolist()) == list(range(11))
    assert torch.equal(first, again) and not torch.equal(first, other)
    features = FeatureLoader(torch.randn(11, 5), targets, batch_size=4, shuffle=True, seed=3)
    features.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in features]), first)  # same order on the feature path
    g1, g2 = epoch_generator(3, 1, 0), epoch_generator(3, 1, 1)
    assert not torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_cpu_resident_split_is_used_in_place_without_workers(decoded) -> None:
    arr = decoded["train"]
    arr.flags.writeable = False  # as handed out by Ray's object store
    loader = TensorLoader(arr, np.zeros(len(arr), dtype=np.int64), 32, batch_size=8, device="cpu")
    assert loader.images.data_ptr() == arr.ctypes.data  # no copy of the split per trial
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.device.type == "cpu" and y.shape == (8,)
    assert not hasattr(loader, "num_workers")
    cl = TensorLoader(arr, np.zeros(len(arr), dtype=np.int64), 32, batch_size=8, channels_last=True)
    assert next(iter(cl))[0].is_contiguous(memory_format=torch.channels_last)


def test_tensor_path_train_batches_without_augmentation_are_eval_crops(index, decoded) -> None:
    run = TrainingRun(HP, index, CPU, decoded=decoded)
    assert isinstance(run.train_loader, TensorLoader) and isinstance(run.val_loader, TensorLoader)
    run.train_loader.set_epoch(0)
    x, y = next(iter(run.train_loader))
    order = torch.randperm(len(index.paths("train")), generator=epoch_generator(HP.seed, 0, 0))[:len(y)]
    ref = torch.stack([eval_transform(32)(load_image(index.paths("train")[i], True)) for i in order])
    assert torch.equal(x, ref) and torch.equal(y, torch.as_tensor(index.labels("train")[order]))


def test_tensor_path_validation_equals_pil_path(index, decoded) -> None:
    plain, fast = TrainingRun(HP, index, CPU), TrainingRun(HP, index, CPU, decoded=decoded)
    a, b = plain.run_epoch(), fast.run_epoch()
    assert plain.modes == {"decoded_cache": 0, "feature_cache": 0, "augmented": 0, "gpu": 0, "compiled": 0}
    assert fast.modes == {"decoded_cache": 1, "feature_cache": 0, "augmented": 0, "gpu": 0, "compiled": 0}
    # training order differs (DataLoader vs seeded permutation); the data do not
    assert set(a) == set(b) and math.isfinite(b["train_loss"])
    fresh_plain, fresh_fast = TrainingRun(HP, index, CPU), TrainingRun(HP, index, CPU, decoded=decoded)
    from covid_tune.engine.training import evaluate
    ra = evaluate(fresh_plain.model, fresh_plain.val_loader, fresh_plain.loss_fn, CPU, "single", 0.5, 2)
    rb = evaluate(fresh_fast.model, fresh_fast.val_loader, fresh_fast.loss_fn, CPU, "single", 0.5, 2)
    assert ra.loss == rb.loss and np.array_equal(ra.y_pred, rb.y_pred)


def test_tensor_path_resumes_exactly(index, decoded) -> None:
    hp = replace(HP, augment=True, dropout=0.3)
    straight = TrainingRun(hp, index, CPU, decoded=decoded)
    straight.run_epoch()
    expected = straight.run_epoch()
    first = TrainingRun(hp, index, CPU, decoded=decoded)
    first.run_epoch()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = TrainingRun(hp, index, CPU, decoded=decoded)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.run_epoch() == expected


# --- precision --------------------------------------------------------------------------------------

def test_bf16_and_channels_last_switch_on_only_for_cuda(index) -> None:
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert resolve_precision("auto", CPU) == (None, False)
    assert resolve_precision("auto", cuda) == (torch.bfloat16, True)
    assert resolve_precision("fp32", cuda) == (None, False)
    assert resolve_precision("bf16", CPU) == (torch.bfloat16, False)
    with pytest.raises(KeyError, match="auto, bf16, fp32"):
        resolve_precision("fp16", CPU)
    run = TrainingRun(HP, index, CPU)  # precision auto on a CPU: plain float32, default memory format
    assert run.amp_dtype is None and not run.channels_last
    assert run.model.net.features[0][0].weight.is_contiguous()


def test_compile_auto_only_on_cuda_for_long_trials_that_run_the_network() -> None:
    cuda = torch.device("cuda")
    assert resolve_compile("auto", cuda, "off", COMPILE_MIN_STEPS)
    assert not resolve_compile("auto", cuda, "off", COMPILE_MIN_STEPS - 1)  # compiling would not pay off
    assert not resolve_compile("auto", cuda, "exact", 10**6)  # a head on cached features
    assert not resolve_compile("auto", CPU, "off", 10**6)
    assert resolve_compile("on", CPU, "exact", 1) and not resolve_compile("off", cuda, "off", 10**6)
    with pytest.raises(KeyError, match="auto, on, off"):
        resolve_compile("max", CPU, "off", 1)


@pytest.mark.slow
@pytest.mark.parametrize("freeze", ["none", "fc_only"])
def test_compiled_run_matches_the_eager_one(index, decoded, freeze: str) -> None:
    """compile: on (torch.compile, inductor on the CPU) trains to the eager run's numbers, epoch after
    epoch (train mode and eval mode, a smaller last batch), and leaves the checkpoint's keys as they were."""
    hp = replace(HP, freeze=freeze, dropout=0.0, augment=False)
    eager = TrainingRun(replace(hp, compile="off"), index, CPU, decoded=decoded)
    a = [eager.run_epoch() for _ in range(2)]
    torch._dynamo.utils.counters.clear()
    compiled = TrainingRun(replace(hp, compile="on"), index, CPU, decoded=decoded)
    b = [compiled.run_epoch() for _ in range(2)]
    assert compiled.modes["compiled"] == 1 and eager.modes["compiled"] == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the forward
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], abs=1e-4), k
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    for k, v in eager.model.state_dict().items():
        assert torch.allclose(v.float(), compiled.model.state_dict()[k].float(), atol=1e-4), k


def test_bf16_autocast_channels_last_step_runs_on_cpu() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,))
    losses, grads = {}, {}
    for name, amp, cl in (("fp32", None, False), ("bf16", torch.bfloat16, True)):
        torch.manual_seed(0)
        model = create_model("tiny_cnn", 2, head_hidden=8, dropout=0.0)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        res = train_one_epoch(model, [(x, y)], build_loss("ce"), opt, CPU, "single", 0.5, 2,
                              amp_dtype=amp, channels_last=cl)
        losses[name] = res.loss
        grads[name] = model.net.fc[0].weight.grad.clone()
    assert math.isfinite(losses["bf16"]) and losses["bf16"] == pytest.approx(losses["fp32"], rel=5e-2)
    assert F.cosine_similarity(grads["bf16"].flatten(), grads["fp32"].flatten(), dim=0) > 0.98
    assert losses["bf16"] != losses["fp32"]  # bf16 really ran


# --- frozen prefix ------------------------------------------------------------------------------------

def count_saved_tensors(fn) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return len(saved)


@pytest.mark.parametrize("backbone,level", [("tiny_cnn", "block1"), ("resnet18", "layer1"), ("resnet18", "fc_only")])
def test_no_grad_prefix_gives_the_same_outputs_and_gradients(backbone: str, level: str) -> None:
    torch.manual_seed(0)
    model = create_model(backbone, 2, freeze=level, head_hidden=8, dropout=0.0)
    split = split_frozen_prefix(model, backbone)
    assert split and split.rest_names[-1] in ("fc",)
    fast = SplitForward(model, split)
    fast.train()
    assert model.training and all(not m.training for n, m in model.net.named_modules()
                                  if n and any(n == p or n.startswith(p + ".") for p in model.frozen))
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1])
    outs, grads = [], []
    for forward in (model, fast):
        model.zero_grad(set_to_none=True)
        out = forward(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    # the frozen prefix builds no graph: its output is a plain tensor, and nothing more is saved
    # for backward than autograd would keep anyway (frozen parameters already stop it recording)
    assert split.prefix(x).grad_fn is None
    assert count_saved_tensors(lambda: fast(x)) <= count_saved_tensors(lambda: model(x))
    # with an input that needs a gradient (saliency maps), the plain forward records the whole prefix
    xg = x.clone().requires_grad_(True)
    assert count_saved_tensors(lambda: fast(xg)) < count_saved_tensors(lambda: model(xg))


def test_prefix_split_covers_the_network_for_every_level() -> None:
    from covid_tune.models.registry import backbone_names, freeze_level_names
    x = torch.randn(1, 3, 32, 32)
    for b in backbone_names():
        for level in freeze_level_names(b):
            if b == "vgg16" and level != "fc_only":
                continue  # same stage list; keeps the test fast
            torch.manual_seed(0)
            model = create_model(b, 2, freeze=level, head_hidden=8).eval()
            split = split_frozen_prefix(model, b)
            with torch.no_grad():
                assert torch.equal(split.rest(split.prefix(x)), model(x)), (b, level)
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            assert not any(id(p) in trainable for p in split.prefix.parameters())
            assert split.head_only == (level == "fc_only"), (b, level)
            assert bool(split) == (level != "none")


@pytest.mark.parametrize("use_decoded", [True, False])
def test_frozen_params_and_batchnorm_buffers_unchanged_by_training(index, decoded, use_decoded: bool) -> None:
    hp = replace(HP, freeze="block1", augment=True)
    run = TrainingRun(hp, index, CPU, decoded=decoded if use_decoded else None)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.run_epoch()
    after = run.model.state_dict()
    for k in before:
        if k.startswith("net.features.0."):
            assert torch.equal(before[k], after[k]), k  # weights and running_mean/var/num_batches
        elif k.startswith("net.features.1.") and "running_mean" in k:
            assert not torch.equal(before[k], after[k]), k  # unfrozen BatchNorm does move


# --- feature cache ------------------------------------------------------------------------------------

def test_feature_cache_modes() -> None:
    assert feature_cache_mode("auto", True, False) == "exact"
    assert feature_cache_mode("auto", True, True) == "off"
    assert feature_cache_mode("on", True, True) == "inexact"
    assert feature_cache_mode("on", False, False) == "off"  # no frozen prefix: nothing to cache
    assert feature_cache_mode("off", True, False) == "off"
    with pytest.raises(KeyError, match="auto, on, off"):
        feature_cache_mode("yes", True, False)


@pytest.mark.parametrize("freeze", ["fc_only", "block1"])
def test_feature_cache_follows_the_plain_path(index, decoded, freeze: str) -> None:
    """Head-only (fc_only) and a partial prefix (block1: blocks 2-3 and the head train on block 1's
    cached outputs) give the plain path's losses, metrics and weights, epoch after epoch."""
    hp = replace(HP, freeze=freeze, dropout=0.3, head_hidden=8, lr=0.1)
    # one after the other: each TrainingRun seeds the global RNG that dropout draws from
    plain = TrainingRun(replace(hp, feature_cache="off"), index, CPU, decoded=decoded)
    a = [plain.run_epoch() for _ in range(3)]
    cached = TrainingRun(replace(hp, feature_cache="auto"), index, CPU, decoded=decoded)
    b = [cached.run_epoch() for _ in range(3)]
    assert plain.modes["feature_cache"] == 0 and cached.modes == {"decoded_cache": 1, "feature_cache": 1,
                                                                    "augmented": 0, "gpu": 0, "compiled": 0}
    per_image = {"fc_only": 32, "block1": 8 * 16 * 16}[freeze] * 4  # float32 outputs of the prefix
    n = len(index.paths("train")) + len(index.paths("validation"))
    assert cached.feature_bytes == n * per_image
    assert tuple(cached._features[0].features.shape[1:]) == {"fc_only": (32,), "block1": (8, 16, 16)}[freeze]
    for ra, rb in zip(a, b):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), k
    assert a[0]["train_loss"] != a[2]["train_loss"]  # it trained
    pa, pb = plain.model.state_dict(), cached.model.state_dict()
    for k in pa:
        assert torch.allclose(pa[k].float(), pb[k].float(), rtol=1e-4, atol=1e-6), k
    if freeze == "block1":  # the unfrozen BatchNorm after the prefix kept learning its statistics
        running_mean = pb["net.features.1.1.running_mean"]
        assert not torch.equal(running_mean, torch.zeros_like(running_mean))


def test_feature_cache_over_its_memory_budget_is_off(index, decoded) -> None:
    hp = replace(HP, freeze="block1")
    n = len(index.paths("train")) + len(index.paths("validation"))
    need = n * 8 * 16 * 16 * 4
    under = TrainingRun(replace(hp, feature_cache_gb=need / 1e9), index, CPU, decoded=decoded)
    over = TrainingRun(replace(hp, feature_cache_gb=(need - 1) / 1e9), index, CPU, decoded=decoded)
    assert under.feature_mode == "exact" and under.modes["feature_cache"] == 1
    assert over.feature_mode == "off" and over.modes["feature_cache"] == 0
    # the size probe (a forward pass) left every weight and BatchNorm statistic as a run without it has them
    unprobed = TrainingRun(replace(hp, feature_cache="off"), index, CPU, decoded=decoded).model.state_dict()
    assert all(torch.equal(unprobed[k], v) for k, v in under.model.state_dict().items())
    assert math.isfinite(over.run_epoch()["train_loss"]) and over._features is None


def test_feature_cache_on_with_augmentation_is_flagged(index, decoded) -> None:
    hp = replace(HP, freeze="fc_only", augment=True)
    auto = TrainingRun(hp, index, CPU, decoded=decoded)
    on = TrainingRun(replace(hp, feature_cache="on"), index, CPU, decoded=decoded)
    assert auto.feature_mode == "off" and auto.modes["augmented"] == 1
    assert on.feature_mode == "inexact"
    assert on.modes == {"decoded_cache": 1, "feature_cache": 1, "augmented": 0, "gpu": 0, "compiled": 0}
    before = {k: v.clone() for k, v in on.model.state_dict().items()}
    out = on.run_epoch()
    assert math.isfinite(out["train_loss"])
    after = on.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("net.features."))
    assert not torch.equal(before["net.fc.0.weight"], after["net.fc.0.weight"])


def test_request_stop_ends_an_epoch_in_another_thread(index, decoded, monkeypatch) -> None:
    """What the trainable does when Tune stops a trial while the next epoch already trains."""
    import threading

    from covid_tune.engine.training import EpochInterrupted

    run = TrainingRun(replace(HP, batch_size=2), index, CPU, decoded=decoded)
    batches, go_on = [], threading.Event()
    real_iter = TensorLoader.__iter__

    def slow(self):
        for batch in real_iter(self):
            batches.append(1)
            go_on.wait(10)
            yield batch

    monkeypatch.setattr(TensorLoader, "__iter__", slow)
    outcome = {}

    def epoch() -> None:
        try:
            run.run_epoch()
        except EpochInterrupted as exc:
            outcome["stopped"] = exc

    worker = threading.Thread(target=epoch)
    worker.start()
    while not batches:
        worker.join(0.01)
    run.request_stop()
    go_on.set()
    worker.join(10)
    assert not worker.is_alive() and "stopped" in outcome
    assert len(batches) <= 2 < len(run.train_loader)  # ended at the next batch, not the end of the epoch
    assert run.epoch == 0  # an interrupted epoch does not count


def test_benchmark_table_and_targets_smoke(monkeypatch) -> None:
    """benchmarks/run.py's report: targets judged right, every measured part rendered (no training here)."""
    import importlib.util
    import sys

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # the script sets it: restored after the test
    sys.modules["bench_run"] = bench  # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench_run"]
    assert bench.verdict("loader_speedup", 5.0) == "met" and bench.verdict("loader_speedup", 4.9) == "MISSED"
    assert bench.verdict("tune_overhead", 0.06) == "MISSED" and bench.verdict("same_best_config", True) == "met"
    assert bench.best_of({"a": [{"epoch": 1, "val_loss": 0.5}], "b": [{"epoch": 2, "val_loss": 0.4}]}) == ("b", 2, 0.4)
    res = {"results": {
        "loader": {"image_size": 224, "images_per_s": {"per_core_pil": 100.0, "per_core_cache": 600.0,
                                                       "all_cores_pil": 180.0, "all_cores_cache": 900.0},
                   "loader_speedup": 6.0, "all_cores_speedup": 5.0},
        "head_cache": {"image_size": 224, "train_images": 8, "val_images": 4, "backbones": {
            "resnet18": {"plain_epoch_s": 1.0, "cached_epoch_s": 0.01, "cached_first_epoch_s": 1.1, "speedup": 100.0}}},
        "tune_overhead": {"config": "x", "direct_s": [10.0], "trial_s": [10.2], "fixed_per_trial_s": 3.0,
                          "tune_overhead": 0.02},
        "grid": {"configurations": 2, "epochs": 2, "image_size": 32, "train_images": 8, "val_images": 4,
                 "course_s": 30.0, "course_epochs_trained": 4, "covid_tune_s": 9.0, "covid_tune_epochs_trained": 3,
                 "covid_tune_ray_start_s": 2.0, "grid_speedup": 3.3, "same_best_config": True,
                 "course_best": {"config": "a"}, "covid_tune_best": {"config": "a"}},
        "gpu": {"device": "H200", "batch": 128, "course_workers": 8, "backbones": {
            b: {"images_per_s": 1000.0, "course_images_per_s": 500.0, "speedup": 2.0, "mfu": 0.1,
                "compiled_best_batch": 256, "compiled": {
                    128: {"images_per_s": 1500.0, "compile_s": 40.0, "mfu": 0.2, "vs_eager": 1.5},
                    256: {"images_per_s": 1600.0, "compile_s": 45.0, "mfu": mfu, "vs_eager": 1.6}}}
            for b, mfu in (("resnet18", 0.16), ("vgg16", 0.31))}}}}
    text = bench.table(res)
    for key in ("loader_speedup", "head_cache_speedup", "tune_overhead", "grid_speedup", "same_best_config", "gpu_mfu",
                "gpu_mfu_resnet18", "gpu_mfu_vgg16"):
        assert f"[{key}]" in text, key
    compiled = {line.split("|")[1].split()[0]: line for line in text.splitlines() if "torch.compile" in line}
    assert "MFU 16.0% [gpu_mfu_resnet18] | >= 0.15 | met" in compiled["resnet18"]  # batch 256, the faster arm
    assert "MFU 31.0% [gpu_mfu_vgg16] | >= 0.32 | MISSED" in compiled["vgg16"]
    assert text.count("MISSED") == 1
    assert bench.flops_per_image("tiny_cnn", 32) > 0


def test_test_evaluation_reads_the_decoded_cache_with_the_pil_paths_numbers(index, decoded, tmp_path,
                                                                            monkeypatch) -> None:
    """The best checkpoints' evaluation takes train and validation from the decoded cache (test, which
    the cache does not hold, from the files) and gets exactly what decoding every file again gives."""
    from dataclasses import asdict

    from covid_tune.models.registry import save_exported
    from covid_tune.results import collect as results

    hp = replace(HP, freeze="block1", augment=False)
    run = TrainingRun(hp, index, CPU, decoded=decoded)
    run.run_epoch()
    meta = {**asdict(hp), "classes": list(index.classes), "epoch": 1}
    for name in ("plain", "cached"):
        save_exported(run.model.state_dict(), meta, tmp_path / name)
    plain = results.evaluate_export(tmp_path / "plain", index)
    from_files = []
    from covid_tune.data.loaders import make_loader
    monkeypatch.setattr(results, "make_loader", lambda idx, split, *a, **k: (from_files.append(split),
                                                                      make_loader(idx, split, *a, **k))[1])
    cached = results.evaluate_export(tmp_path / "cached", index, decoded=decoded)
    assert from_files == ["test"]
    assert set(decoded.arrays) == {"train", "validation"}
    for split in ("train", "validation", "test"):
        a, b = plain["splits"][split], cached["splits"][split]
        assert a["correct"] == b["correct"] and a["n"] == b["n"] == len(index.paths(split))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), split
    save_exported(run.model.state_dict(), meta, tmp_path / "other")
    other = build_decoded_cache(index, 24, True, splits=("train",))  # made for another image size: not used
    assert results.evaluate_export(tmp_path / "other", index, decoded=other)["splits"] == plain["splits"]
