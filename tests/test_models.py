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
    ("resnet50", "fc_only"): ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
    ("resnet50", "layer1-3"): ("conv1", "bn1", "layer1", "layer2", "layer3"),
    ("resnet50", "layer1"): ("conv1", "bn1", "layer1"),
    ("resnet50", "none"): (),
    # densenet121.features: conv0 norm0 relu0 pool0, then denseblockN + transitionN (N = 1-3), denseblock4, norm5
    ("densenet121", "fc_only"): ("features",),
    ("densenet121", "block1-3"): ("features.conv0", "features.norm0", "features.denseblock1", "features.transition1",
                                  "features.denseblock2", "features.transition2", "features.denseblock3",
                                  "features.transition3"),
    ("densenet121", "block1"): ("features.conv0", "features.norm0", "features.denseblock1", "features.transition1"),
    ("densenet121", "none"): (),
    # efficientnet_b0.features: 0 stem, 1-7 MBConv stages, 8 the last 1x1 conv
    ("efficientnet_b0", "fc_only"): ("features",),
    ("efficientnet_b0", "stage1-5"): ("features.0", "features.1", "features.2", "features.3", "features.4",
                                      "features.5"),
    ("efficientnet_b0", "stage1-3"): ("features.0", "features.1", "features.2", "features.3"),
    ("efficientnet_b0", "none"): (),
    # convnext_tiny.features: 0 stem, 1 stage 1, 2 downsample, 3 stage 2, 4, 5 stage 3, 6, 7 stage 4;
    # classifier: 0 LayerNorm2d, 1 Flatten, 2 Linear
    ("convnext_tiny", "fc_only"): ("features", "classifier.0"),
    ("convnext_tiny", "stage1-3"): ("features.0", "features.1", "features.2", "features.3", "features.4",
                                    "features.5"),
    ("convnext_tiny", "stage1"): ("features.0", "features.1"),
    ("convnext_tiny", "none"): (),
}
HEAD = {"vgg16": "classifier.6", "resnet18": "fc", "tiny_cnn": "fc", "resnet50": "fc", "densenet121": "classifier",
        "efficientnet_b0": "classifier.1", "convnext_tiny": "classifier.2"}
IN_FEATURES = {"vgg16": 4096, "resnet18": 512, "tiny_cnn": 32, "resnet50": 2048, "densenet121": 1024,
               "efficientnet_b0": 1280, "convnext_tiny": 768}
NO_BATCHNORM = {"vgg16", "convnext_tiny"}  # convnext normalizes with LayerNorm: no running statistics
TORCHVISION = {"vgg16": tvm.vgg16, "resnet18": tvm.resnet18, "resnet50": tvm.resnet50, "densenet121": tvm.densenet121,
               "efficientnet_b0": tvm.efficientnet_b0, "convnext_tiny": tvm.convnext_tiny}
CASES = [(b, level) for b in backbone_names() for level in freeze_level_names(b)]


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def strip_net(name: str) -> str:
    assert name.startswith("net."), name
    return name[len("net."):]


def test_every_registered_level_is_covered_here() -> None:
    assert set(backbone_names()) == {"vgg16", "resnet18", "tiny_cnn", "resnet50", "densenet121", "efficientnet_b0",
                                     "convnext_tiny"}
    assert set(CASES) == set(EXPECTED_FROZEN)


# --- one SGD step per (backbone, freeze level), shared by the tests below ------------------------------

def settle_batchnorm(model: Classifier) -> None:
    """Give every BatchNorm the statistics of one random batch (as pretrained weights would have them).

    Untrained efficientnet_b0 in eval mode (its frozen part) shrinks activations about 50-fold per
    stage, to 1e-15 at the head: too small for an SGD step to change the head's weights in float32."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    nn.Module.train(model, True)  # every module, the frozen ones too
    for bn in bns:
        bn.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    for bn in bns:
        bn.momentum = 0.1
        bn.num_batches_tracked.zero_()
    model.train()  # frozen BatchNorm back in eval mode


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-{lvl}" for b, lvl in CASES])
def stepped(request) -> SimpleNamespace:
    """A fresh model, a snapshot of every parameter and buffer, then one SGD step (lr 0.1) in train mode."""
    name, level = request.param
    torch.manual_seed(0)
    model = create_model(name, N_CLASSES, freeze=level, weights="none", head_hidden=HIDDEN, dropout=0.0)
    if name == "efficientnet_b0":
        settle_batchnorm(model)
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
    if stepped.name not in NO_BATCHNORM and stepped.frozen:
        assert any(n.endswith("running_mean") for n in frozen_bufs)
        assert any(n.endswith("num_batches_tracked") for n in frozen_bufs)


def test_unfrozen_batchnorm_buffers_move(stepped) -> None:
    """The step really ran in train mode: BatchNorm outside the frozen part updated its statistics."""
    moving = [n for n, _ in stepped.model.named_buffers()
              if n.endswith("running_mean") and not under(strip_net(n), stepped.frozen)]
    if stepped.name in NO_BATCHNORM or stepped.level == "fc_only":
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
    params = dict(stepped.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert changed <= trainable  # nothing else moved
    assert all(params[n].grad is not None for n in trainable)  # every trainable parameter got a gradient
    # and moved, unless its step is under float32's resolution: convnext's blocks are scaled by a layer
    # scale of 1e-6, so on a 1x1 grid (32 px) stage 4's LayerNorm weights (1.0) move by less than 1e-7
    still = [n for n in trainable - changed
             if (0.1 * params[n].grad).abs().max() > 1e-7 * stepped.before[n].abs().max().clamp(min=1e-30)]
    assert still == []


def expected_trainable(name: str, level: str) -> int:
    """Trainable parameter count from a plain torchvision/TinyCNN model and the block boundaries."""
    def numel(params) -> int:
        return sum(p.numel() for p in params)

    with torch.device("meta"):
        net = TinyCNN() if name == "tiny_cnn" else TORCHVISION[name](weights=None)
    old_head = net.get_submodule(HEAD[name])
    new_head = old_head.in_features * HIDDEN + HIDDEN + HIDDEN * N_CLASSES + N_CLASSES
    total = numel(net.parameters()) - numel(old_head.parameters()) + new_head
    if level == "none":
        return total
    if name in ("densenet121", "efficientnet_b0", "convnext_tiny"):  # the module lists above, taken as they are
        return total - sum(numel(net.get_submodule(p).parameters()) for p in EXPECTED_FROZEN[name, level])
    if name == "vgg16":
        if level == "fc_only":  # the classifier only, with the new head
            return numel(net.classifier.parameters()) - numel(old_head.parameters()) + new_head
        stop = {"conv1-3": 17, "conv1-2": 10}[level]
        return total - numel(net.features[0:stop].parameters())
    if name in ("resnet18", "resnet50"):
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
    # torchvision's published totals (its model table) minus the ImageNet head, plus ours
    for name, total, in_features in (("resnet50", 25557032, 2048), ("densenet121", 7978856, 1024),
                                     ("efficientnet_b0", 5288548, 1280), ("convnext_tiny", 28589128, 768)):
        head = in_features * HIDDEN + HIDDEN + HIDDEN * N_CLASSES + N_CLASSES
        assert expected_trainable(name, "none") == total - (in_features * 1000 + 1000) + head, name
        assert expected_trainable(name, "fc_only") == head, name  # convnext: its LayerNorm before the head frozen too


def test_head_shape(stepped) -> None:
    head = stepped.model.net.get_submodule(HEAD[stepped.name])
    in_features = IN_FEATURES[stepped.name]
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


# --- the new backbones' ImageNet weights: torchvision's own file, through the same cache/download path ---

# file names as torchvision publishes them (the 8 hex digits are the start of the file's SHA-256; for
# efficientnet_b0 the corrected name of torchvision 0.17+, pytorch/vision#8036)
TORCHVISION_FILES = {
    "resnet50": (tvm.ResNet50_Weights.IMAGENET1K_V1, "resnet50-0676ba61.pth"),
    "densenet121": (tvm.DenseNet121_Weights.IMAGENET1K_V1, "densenet121-a639ec97.pth"),
    "efficientnet_b0": (tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, "efficientnet_b0_rwightman-7f5810bc.pth"),
    "convnext_tiny": (tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1, "convnext_tiny-983f1562.pth"),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_FILES))
def test_weights_file_name_and_hash_are_torchvisions(empty_torch_home: Path, name: str) -> None:
    import os

    from covid_tune.models.weights import _hash_prefix, imagenet_url, imagenet_weights_file

    entry, filename = TORCHVISION_FILES[name]
    assert imagenet_url(name) == entry.url == f"https://download.pytorch.org/models/{filename}"
    path = imagenet_weights_file(name)
    # where torchvision's own weights API caches it, so a file torchvision downloaded is found and reused
    assert path == Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)
    assert path == empty_torch_home / "hub" / "checkpoints" / filename
    assert _hash_prefix(path) == filename.rsplit("-", 1)[1].removesuffix(".pth")  # the hash that is checked
    with pytest.raises(WeightsUnavailable, match=filename):
        check_weights(name, "imagenet")


def densenet_old_keys(state: dict) -> dict:
    """A densenet121 state_dict as torchvision's published file has it: ``norm.1`` for ``norm1``, and no
    ``num_batches_tracked`` (the file predates it)."""
    import re

    return {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()
            if not k.endswith("num_batches_tracked")}


def test_densenet_imagenet_file_from_cache_with_torchvisions_key_names(empty_torch_home: Path, monkeypatch) -> None:
    """torchvision's densenet121 file names its layers the old way: read through the cache, hash-checked,
    renamed as torchvision renames them, loaded."""
    import hashlib

    torch.manual_seed(7)
    state = tvm.densenet121(weights=None).state_dict()
    old = densenet_old_keys(state)
    assert "features.denseblock1.denselayer1.norm.1.weight" in old and old.keys() != state.keys()
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(old, cache / "w.pth")
    name = f"densenet121-{hashlib.sha256((cache / 'w.pth').read_bytes()).hexdigest()[:8]}.pth"
    (cache / "w.pth").rename(cache / name)
    monkeypatch.setattr(tvm.DenseNet121_Weights.IMAGENET1K_V1.value, "url", f"http://127.0.0.1:9/{name}")
    monkeypatch.setenv("COVID_TUNE_OFFLINE", "1")
    model = create_model("densenet121", 2, freeze="block1", weights="imagenet", head_hidden=HIDDEN)
    got = model.net.state_dict()
    for k in ("features.conv0.weight", "features.denseblock1.denselayer1.norm1.weight",
              "features.denseblock4.denselayer16.conv2.weight", "features.norm5.running_var"):
        assert torch.equal(got[k], state[k]), k
    # a damaged copy under the same name is refused by the hash in its name
    (cache / name).write_bytes((cache / name).read_bytes()[:-10])
    with pytest.raises(WeightsUnavailable, match="SHA-256"):
        create_model("densenet121", 2, weights="imagenet")
