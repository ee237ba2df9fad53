"""Models: freeze levels really freeze (parameters and BatchNorm statistics), trainable counts, heads, weights."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.nn import functional as F

from covid_tune.models.backbones import TinyCNN
from covid_tune.models.freeze import Classifier, count_trainable
from covid_tune.models.registry import (
    WeightsUnavailable,
    backbone_names,
    create_model,
    freeze_level_names,
    load_exported,
    save_exported,
)
from covid_tune.models.weights import check_weights

HIDDEN, N_CLASSES = 8, 2

# Frozen module prefixes per (backbone, level), written out here independently of the registry.
# vgg16.features conv blocks end at indices 4, 9, 16, 23, 30 (each block ends with a MaxPool).
EXPECTED_FROZEN: dict[tuple[str, str], tuple[str, ...]] = {
    ("vgg16", "fc_only"): ("features",),
    ("vgg16", "conv1-3"): tuple(f"features.{i}" for i in range(17)),
    ("vgg16", "conv1-2"): tuple(f"features.{i}" for i in range(10)),
    ("vgg16", "none"): (),
    ("resnet18", "fc_only"): ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
    ("resnet18", "layer1-3"): ("conv1", "bn1", "layer1", "layer2", "layer3"),
    ("resnet18", "layer1"): ("conv1", "bn1", "layer1"),
    ("resnet18", "none"): (),
    ("tiny_cnn", "fc_only"): ("features",),
    ("tiny_cnn", "block1"): ("features.0",),
    ("tiny_cnn", "none"): (),
}
HEAD = {"vgg16": "classifier.6", "resnet18": "fc", "tiny_cnn": "fc"}
CASES = [(b, level) for b in backbone_names() for level in freeze_level_names(b)]


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def strip_net(name: str) -> str:
    assert name.startswith("net."), name
    return name[len("net."):]


def test_every_registered_level_is_covered_here() -> None:
    assert set(backbone_names()) == {"vgg16", "resnet18", "tiny_cnn"}
    assert set(CASES) == set(EXPECTED_FROZEN)


# --- one SGD step per (backbone, freeze level), shared by the tests below ------------------------------

@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-{lvl}" for b, lvl in CASES])
def stepped(request) -> SimpleNamespace:
    """A fresh model, a snapshot of every parameter and buffer, then one SGD step (lr 0.1) in train mode."""
    name, level = request.param
    torch.manual_seed(0)
    model = create_model(name, N_CLASSES, freeze=level, weights="none", head_hidden=HIDDEN, dropout=0.0)
    before = {n: t.detach().clone() for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    trainable_before = count_trainable(model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # all parameters: frozen ones must get no gradient
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    yield SimpleNamespace(name=name, level=level, model=model, before=before, frozen=EXPECTED_FROZEN[name, level],
                          trainable_before=trainable_before, loss=loss.item())
    del model, before


def test_frozen_parameters_are_bit_identical(stepped) -> None:
    frozen = [n for n, _ in stepped.model.named_parameters() if under(strip_net(n), stepped.frozen)]
    if stepped.frozen:
        assert frozen, "expected some parameters under the frozen prefixes"
    for n, p in stepped.model.named_parameters():
        if n in frozen:
            assert not p.requires_grad, n
            assert p.grad is None, n
            assert torch.equal(p, stepped.before[n]), f"frozen parameter {n} changed"
        else:
            assert p.requires_grad, f"{n} is not under a frozen prefix but does not require grad"


def test_frozen_batchnorm_buffers_are_bit_identical(stepped) -> None:
    frozen_bufs = [n for n, _ in stepped.model.named_buffers() if under(strip_net(n), stepped.frozen)]
    for n, b in stepped.model.named_buffers():
        if n in frozen_bufs:
            assert torch.equal(b, stepped.before[n]), f"frozen buffer {n} changed"
    for mname, module in stepped.model.named_modules():
        if mname.startswith("net.") and under(strip_net(mname), stepped.frozen):
            assert not module.training, f"frozen module {mname} is in train mode"
    if stepped.name != "vgg16" and stepped.frozen:  # vgg16 has no BatchNorm
        assert any(n.endswith("running_mean") for n in frozen_bufs)
        assert any(n.endswith("num_batches_tracked") for n in frozen_bufs)


def test_unfrozen_batchnorm_buffers_move(stepped) -> None:
    """The step really ran in train mode: BatchNorm outside the frozen part updated its statistics."""
    moving = [n for n, _ in stepped.model.named_buffers()
              if n.endswith("running_mean") and not under(strip_net(n), stepped.frozen)]
    if stepped.name == "vgg16" or stepped.level == "fc_only":
        assert moving == []
        return
    assert moving
    buffers = dict(stepped.model.named_buffers())
    for n in moving:
        assert not torch.equal(buffers[n], stepped.before[n]), n
        assert buffers[n.replace("running_mean", "num_batches_tracked")].item() == 1


def test_trainable_parameters_changed(stepped) -> None:
    head_prefix = "net." + HEAD[stepped.name] + "."
    head = [n for n, _ in stepped.model.named_parameters() if n.startswith(head_prefix)]
    assert len(head) == 4  # two Linear layers, weight and bias each
    changed = {n for n, p in stepped.model.named_parameters() if not torch.equal(p, stepped.before[n])}
    assert set(head) <= changed
    trainable = {n for n, p in stepped.model.named_parameters() if p.requires_grad}
    assert changed == trainable  # every trainable parameter moved, nothing else did


def expected_trainable(name: str, level: str) -> int:
    """Trainable parameter count from a plain torchvision/TinyCNN model and the block boundaries."""
    def numel(params) -> int:
        return sum(p.numel() for p in params)

    with torch.device("meta"):
        net = {"vgg16": lambda: tvm.vgg16(weights=None), "resnet18": lambda: tvm.resnet18(weights=None),
               "tiny_cnn": TinyCNN}[name]()
    old_head = net.classifier[6] if name == "vgg16" else net.fc
    new_head = old_head.in_features * HIDDEN + HIDDEN + HIDDEN * N_CLASSES + N_CLASSES
    total = numel(net.parameters()) - numel(old_head.parameters()) + new_head
    if level == "none":
        return total
    if name == "vgg16":
        if level == "fc_only":  # the classifier only, with the new head
            return numel(net.classifier.parameters()) - numel(old_head.parameters()) + new_head
        stop = {"conv1-3": 17, "conv1-2": 10}[level]
        return total - numel(net.features[0:stop].parameters())
    if name == "resnet18":
        if level == "fc_only":
            return new_head
        layers = {"layer1-3": [net.layer1, net.layer2, net.layer3], "layer1": [net.layer1]}[level]
        return total - numel(net.conv1.parameters()) - numel(net.bn1.parameters()) - sum(
            numel(m.parameters()) for m in layers)
    if level == "fc_only":
        return new_head
    return total - numel(net.features[0].parameters())  # tiny_cnn block1


def test_trainable_count_matches_block_boundaries(stepped) -> None:
    expected = expected_trainable(stepped.name, stepped.level)
    assert stepped.trainable_before == expected
    assert count_trainable(stepped.model) == expected


def test_known_trainable_counts() -> None:
    """A few absolute numbers, so the independent computation above is itself pinned."""
    head = 512 * HIDDEN + HIDDEN + HIDDEN * N_CLASSES + N_CLASSES
    assert expected_trainable("resnet18", "fc_only") == head == 4122
    assert expected_trainable("resnet18", "none") == 11689512 - 513000 + head
    assert expected_trainable("vgg16", "fc_only") == 119578650
    assert expected_trainable("vgg16", "none") == 138357544 - 4097000 + 4096 * HIDDEN + HIDDEN + 18


def test_head_shape(stepped) -> None:
    head = stepped.model.net.get_submodule(HEAD[stepped.name])
    in_features = {"vgg16": 4096, "resnet18": 512, "tiny_cnn": 32}[stepped.name]
    assert isinstance(head, nn.Sequential) and len(head) == 4
    assert isinstance(head[0], nn.Linear) and (head[0].in_features, head[0].out_features) == (in_features, HIDDEN)
    assert isinstance(head[1], nn.ReLU)
    assert isinstance(head[2], nn.Dropout) and head[2].p == 0.0
    assert isinstance(head[3], nn.Linear) and (head[3].in_features, head[3].out_features) == (HIDDEN, N_CLASSES)
    stepped.model.eval()
    try:
        with torch.no_grad():
            assert stepped.model(torch.randn(1, 3, 32, 32)).shape == (1, N_CLASSES)
    finally:
        stepped.model.train()  # leave the shared model as the other tests expect it


@pytest.mark.parametrize("name, in_features", [("tiny_cnn", 32), ("resnet18", 512)])
def test_head_without_hidden_layer_is_one_linear(name: str, in_features: int) -> None:
    model = create_model(name, 3, freeze="fc_only", head_hidden=0)
    head = model.net.fc
    assert type(head) is nn.Linear and (head.in_features, head.out_features) == (in_features, 3)
    assert count_trainable(model) == in_features * 3 + 3


def test_head_dropout_is_the_given_rate() -> None:
    model = create_model("tiny_cnn", 4, head_hidden=5, dropout=0.3)
    assert model.net.fc[2].p == 0.3 and model.net.fc[0].out_features == 5 and model.net.fc[3].out_features == 4


def test_unknown_freeze_level_lists_levels() -> None:
    with pytest.raises(KeyError) as info:
        create_model("resnet18", 2, freeze="conv1-3")
    assert all(level in str(info.value) for level in ("fc_only", "layer1-3", "layer1", "none"))


def test_unknown_backbone_lists_backbones() -> None:
    with pytest.raises(KeyError) as info:
        create_model("alexnet", 2)
    assert all(b in str(info.value) for b in ("vgg16", "resnet18", "tiny_cnn"))


def test_eval_then_train_refreezes_batchnorm() -> None:
    model = create_model("tiny_cnn", 2, freeze="block1", head_hidden=4)
    model.eval()
    model.train()
    assert not model.net.features[0][1].training and model.net.features[1][1].training
    assert model.training and isinstance(model, Classifier)


# --- weights -------------------------------------------------------------------------------------

@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.mark.parametrize("name, filename", [("resnet18", "resnet18-f37072fd.pth"), ("vgg16", "vgg16-397923af.pth")])
def test_missing_imagenet_weights_name_file_and_path(empty_torch_home: Path, name: str, filename: str) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        check_weights(name, "imagenet")
    msg = str(info.value)
    assert filename in msg
    assert str(empty_torch_home / "hub" / "checkpoints" / filename) in msg
    assert not (empty_torch_home / "hub" / "checkpoints" / filename).exists()  # nothing was downloaded


def test_create_model_with_missing_imagenet_weights_raises(empty_torch_home: Path, monkeypatch) -> None:
    monkeypatch.setenv("COVID_TUNE_OFFLINE", "1")  # else it downloads, as torchvision does (tests/test_weights.py)
    with pytest.raises(WeightsUnavailable, match="resnet18-f37072fd.pth"):
        create_model("resnet18", 2, weights="imagenet")


def test_imagenet_weights_for_tiny_cnn_are_unavailable() -> None:
    with pytest.raises(WeightsUnavailable, match="tiny_cnn"):
        check_weights("tiny_cnn", "imagenet")


def test_missing_state_dict_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(WeightsUnavailable) as info:
        check_weights("resnet18", str(path))
    assert str(path) in str(info.value)
    with pytest.raises(WeightsUnavailable):
        create_model("resnet18", 2, weights=str(path))


def test_check_weights_none_and_existing_file_pass(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({}, path)
    assert check_weights("resnet18", "none") is None
    assert check_weights("resnet18", str(path)) is None


@pytest.fixture(scope="module")
def resnet18_state() -> dict:
    torch.manual_seed(123)
    net = tvm.resnet18(weights=None)
    with torch.no_grad():  # non-default BatchNorm statistics too
        net.bn1.running_mean.uniform_(-1, 1)
    return net.state_dict()


def test_weights_from_local_state_dict(tmp_path: Path, resnet18_state: dict) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(resnet18_state, path)
    torch.manual_seed(0)  # another init, so equality below comes from loading
    model = create_model("resnet18", 2, freeze="layer1", weights=str(path), head_hidden=HIDDEN)
    assert torch.equal(model.net.conv1.weight, resnet18_state["conv1.weight"])
    assert torch.equal(model.net.layer4[1].conv2.weight, resnet18_state["layer4.1.conv2.weight"])
    assert torch.equal(model.net.bn1.running_mean, resnet18_state["bn1.running_mean"])
    assert model.net.fc[3].out_features == 2  # head replaced after loading
    fresh = create_model("resnet18", 2, weights="none")
    assert not torch.equal(fresh.net.conv1.weight, resnet18_state["conv1.weight"])


def test_imagenet_weights_from_torch_home_cache(empty_torch_home: Path, resnet18_state: dict, monkeypatch) -> None:
    import hashlib

    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(resnet18_state, cache / "w.pth")
    name = f"resnet18-{hashlib.sha256((cache / 'w.pth').read_bytes()).hexdigest()[:8]}.pth"  # as torchvision names it
    (cache / "w.pth").rename(cache / name)
    monkeypatch.setattr(tvm.ResNet18_Weights.IMAGENET1K_V1.value, "url", f"http://127.0.0.1:9/{name}")
    monkeypatch.setenv("COVID_TUNE_OFFLINE", "1")  # read from the cache: no network
    check_weights("resnet18", "imagenet")
    model = create_model("resnet18", 2, freeze="fc_only", weights="imagenet", head_hidden=HIDDEN)
    assert torch.equal(model.net.conv1.weight, resnet18_state["conv1.weight"])


# --- exported checkpoints --------------------------------------------------------------------------

def test_save_and_load_exported_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_model("tiny_cnn", 3, freeze="block1", head_hidden=6, dropout=0.4)
    model.train()
    with torch.no_grad():  # move unfrozen BatchNorm statistics away from their defaults
        model(torch.randn(4, 3, 32, 32) * 3 + 1)
    meta = {"backbone": "tiny_cnn", "classes": ["a", "b", "c"], "freeze": "block1", "head_hidden": 6,
            "dropout": 0.4, "image_size": 32}
    save_exported(model.state_dict(), meta, tmp_path / "best")
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["model.json", "model.pt"]

    loaded, loaded_meta = load_exported(tmp_path / "best")
    assert loaded_meta == meta
    assert not loaded.training
    x = torch.randn(5, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
        other = create_model("tiny_cnn", 3, freeze="block1", head_hidden=6, dropout=0.4).eval()
        assert not torch.allclose(other(x), expected)  # the loaded weights matter
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
