"""Pretrained weights: downloaded once on the driver, checked, shipped to the trials through Ray.

This machine has no internet, so the real download path (torch.hub's downloader, hash check, the
.partial file) runs against a local ``http.server`` serving a real resnet18 state_dict under a
torchvision-style name (``resnet18-<first 8 hex digits of its SHA-256>.pth``). The one seam: the URL
of torchvision's ``ResNet18_Weights.IMAGENET1K_V1`` entry, changed in the driver process only, so a
worker that tried to fetch the weights itself would find neither the file nor the server.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision.models as tvm
import yaml
from conftest import REPO, shrink

from covid_tune.models import weights as weights_mod
from covid_tune.models.backbones import TinyCNN
from covid_tune.models.registry import WeightsUnavailable
from covid_tune.models.weights import load_weights

ENTRY = tvm.ResNet18_Weights.IMAGENET1K_V1
DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once


class Server:
    """A static file server on 127.0.0.1 (a thread of this process) that counts its requests."""

    def __init__(self, folder: Path) -> None:
        self.requests = 0
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):  # noqa: N802 - http.server's name
                outer.requests += 1
                super().do_GET()

            def log_message(self, *args):  # keep the test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, dict]:
    """A real resnet18 state_dict saved under its torchvision-style hashed name, and the state itself."""
    torch.manual_seed(7)
    net = tvm.resnet18(weights=None)
    with torch.no_grad():  # not the default init, so equality below comes from the file
        net.bn1.running_mean.uniform_(-1, 1)
    state = net.state_dict()
    folder = tmp_path_factory.mktemp("served")
    torch.save(state, folder / "tmp.pth")
    digest = hashlib.sha256((folder / "tmp.pth").read_bytes()).hexdigest()
    path = folder / f"resnet18-{digest[:8]}.pth"
    (folder / "tmp.pth").rename(path)
    return path, state


@pytest.fixture
def server(served):
    path, _ = served
    srv = Server(path.parent)
    yield srv
    srv.stop()


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv(weights_mod.OFFLINE_ENV, raising=False)
    return home


def point_weights_at(monkeypatch, url: str) -> None:
    monkeypatch.setattr(ENTRY.value, "url", url)


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cached(home: Path) -> list[str]:
    folder = home / "hub" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# --------------------------------------------------------------------------------------------
# resolving the weights (no Ray)


def test_first_use_downloads_into_torch_home_then_the_cache_needs_no_network(
        served, server, torch_home, tmp_path, monkeypatch, capfd) -> None:
    from covid_tune.cli.main import setup_logging
    from covid_tune.cli.run import prepare
    from covid_tune.spec.load import load_spec

    setup_logging()  # as the command does: progress on stderr
    path, state = served
    point_weights_at(monkeypatch, server.url(path.name))
    got = load_weights("resnet18", "imagenet")
    assert same_state(got, state)
    assert cached(torch_home) == [path.name]  # no .partial file left over
    assert (torch_home / "hub" / "checkpoints" / path.name).read_bytes() == path.read_bytes()
    err = capfd.readouterr().err
    assert f"downloading ImageNet weights for resnet18: {server.url(path.name)}" in err
    assert server.requests == 1
    server.stop()  # a second run's weights step reads the cache: no server, no request
    _, _, pretrained = prepare(load_spec(_tiny_spec(tmp_path)))
    assert list(pretrained) == ["resnet18"] and same_state(pretrained["resnet18"], state)
    monkeypatch.setenv(weights_mod.OFFLINE_ENV, "1")
    assert same_state(load_weights("resnet18", "imagenet", download="never"), state)
    assert server.requests == 1


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated"])
def test_a_damaged_download_is_refused_by_the_hash_check(served, tmp_path, torch_home, monkeypatch, damage) -> None:
    path, _ = served
    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray(path.read_bytes())
    if damage == "flipped-byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    (bad / path.name).write_bytes(bytes(data))
    srv = Server(bad)
    try:
        point_weights_at(monkeypatch, srv.url(path.name))
        with pytest.raises(WeightsUnavailable) as info:
            load_weights("resnet18", "imagenet")
    finally:
        srv.stop()
    message = str(info.value)
    assert "does not match the SHA-256" in message and path.name[9:17] in message and srv.url(path.name) in message
    assert cached(torch_home) == []  # nothing that could later pass as the file


def test_a_damaged_file_in_the_cache_is_refused_naming_it(served, torch_home, monkeypatch) -> None:
    path, _ = served
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / path.name).write_bytes(path.read_bytes()[:1000])  # e.g. a copy that was cut short
    point_weights_at(monkeypatch, f"{DEAD}/{path.name}")
    with pytest.raises(WeightsUnavailable) as info:
        load_weights("resnet18", "imagenet")
    assert str(folder / path.name) in str(info.value) and "damaged or incomplete" in str(info.value)


def _write_wrong(kind: str, path: Path, served_path: Path) -> None:
    if kind == "not-torch":
        path.write_text("not a checkpoint")
    elif kind == "truncated":
        path.write_bytes(served_path.read_bytes()[:100_000])
    elif kind == "training-checkpoint":
        torch.save({"epoch": 3, "model": TinyCNN().state_dict()}, path)
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    elif kind == "other-backbone":
        torch.save(TinyCNN().state_dict(), path)
    elif kind == "wrong-shape":
        state = torch.load(served_path, weights_only=True)
        state["fc.weight"] = torch.zeros(10, 512)
        state["fc.bias"] = torch.zeros(10)
        torch.save(state, path)


WRONG = {
    "not-torch": "not a readable PyTorch state_dict",
    "truncated": "not a readable PyTorch state_dict",
    "training-checkpoint": "holds a dict with keys epoch, model, not a state_dict of tensors",
    "list": "holds a list, not a state_dict",
    "other-backbone": ("is not a state_dict of the torchvision resnet18 network (another backbone's file?): "
                       "missing: conv1.weight"),
    "wrong-shape": "wrong shape: fc.weight (10, 512) (expected (1000, 512))",
}


@pytest.mark.parametrize("kind", list(WRONG))
def test_a_wrong_state_dict_file_is_one_clear_message(served, tmp_path, kind) -> None:
    path = tmp_path / f"{kind}.pt"
    _write_wrong(kind, path, served[0])
    with pytest.raises(WeightsUnavailable) as info:
        load_weights("resnet18", str(path))
    message = str(info.value)
    assert str(path) in message and WRONG[kind] in message, message
    assert "\n" not in message


def test_a_state_dict_file_is_read_and_checked(served, tmp_path) -> None:
    from covid_tune.models.registry import create_model

    path, state = served
    assert same_state(load_weights("resnet18", str(path)), state)
    assert load_weights("resnet18", "none") is None
    # saved before BatchNorm counted batches (as torchvision's older files are): still a resnet18
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    loaded = load_weights("resnet18", str(tmp_path / "old.pt"))
    model = create_model("resnet18", 2, weights=loaded)
    assert torch.equal(model.net.bn1.running_mean, state["bn1.running_mean"])


# --------------------------------------------------------------------------------------------
# the command line stops before training (exit 2, in seconds)


def _tiny_spec(tmp_path: Path, **trainer) -> Path:
    raw = shrink({
        "name": "weights",
        "data": {"synthetic": {"classes": ["infected", "normal"], "train": 8, "validation": 4, "test": 4,
                               "image_size": 36}},
        "grid": {"backbone": ["resnet18"], "freeze": ["fc_only"], "loss": ["ce"], "seed": [0, 1]},
        "scheduler": {"metric": "val_loss", "asha": False},
    }, tmp_path, trainer={"epochs": 1, "batch_size": 8, "weights": "imagenet", **trainer})
    spec = tmp_path / "weights.yaml"
    spec.write_text(yaml.safe_dump(raw))
    return spec


@pytest.fixture
def hanging_server():
    """Accepts connections (the kernel does) but never answers: a network that went dead mid-way."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.mark.parametrize("case", ["env-offline", "weights_download-never", "dead-address", "no-answer",
                                  "wrong-file"])
def test_without_weights_the_run_stops_before_training_exit_2_in_seconds(
        served, tmp_path, torch_home, monkeypatch, capsys, hanging_server, case) -> None:
    from covid_tune.cli.run import main

    path, _ = served
    args = []
    point_weights_at(monkeypatch, f"{DEAD}/{path.name}")
    if case == "env-offline":
        monkeypatch.setenv(weights_mod.OFFLINE_ENV, "1")
        point_weights_at(monkeypatch, f"{hanging_server}/{path.name}")  # would hang if it were asked
    elif case == "weights_download-never":
        args = ["--set", "trainer.weights_download=never"]
    elif case == "no-answer":
        monkeypatch.setattr(weights_mod, "DOWNLOAD_TIMEOUT_S", 1.0)
        point_weights_at(monkeypatch, f"{hanging_server}/{path.name}")
    elif case == "wrong-file":
        _write_wrong("other-backbone", tmp_path / "tiny.pt", path)
        args = ["--set", f"trainer.weights={tmp_path / 'tiny.pt'}"]
    spec = _tiny_spec(tmp_path)
    start = time.monotonic()
    rc = main([str(spec), *args])
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2 and took < 10, (rc, took, err)
    line = [e for e in err.splitlines() if e.startswith("covid_tune: ")]
    assert len(line) == 1 and "Traceback" not in err, err
    if case == "wrong-file":
        assert str(tmp_path / "tiny.pt") in line[0] and "missing: conv1.weight" in line[0]
    else:
        assert f"Place the file {path.name}" in line[0]
        assert str(torch_home / "hub" / "checkpoints" / path.name) in line[0]
        assert {"env-offline": "downloads are off (COVID_TUNE_OFFLINE=1)",
                "weights_download-never": "downloads are off (trainer.weights_download: never)",
                "dead-address": "failed (", "no-answer": "failed ("}[case] in line[0]
    assert cached(torch_home) == []
    assert not (tmp_path / "out" / "ray").exists()  # nothing trained


@pytest.mark.parametrize("shipped", [True, False])
def test_a_resumed_sweep_builds_its_trials_from_this_run_s_references(
        served, server, tmp_path, torch_home, monkeypatch, shipped) -> None:
    """--resume hands Tune.restore a trainable made with this run's object-store references (Tune's
    pickled one would hold the previous run's, gone with its Ray session); without references given,
    run_sweep resolves the weights on the driver itself. No Ray is started: Tune's entry points are
    replaced by recorders."""
    from covid_tune.spec.load import load_spec
    from covid_tune.spec.plan import expand
    from covid_tune.sweep import cluster, tuning

    path, state = served
    point_weights_at(monkeypatch, server.url(path.name))
    spec = load_spec(_tiny_spec(tmp_path))
    seen: dict = {}
    refs = {"resnet18": object()}  # stands for ray.ObjectRef: only passed along
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: seen.setdefault("store_bytes", a[1]))
    monkeypatch.setattr(cluster, "share_weights", lambda states: seen.setdefault("put", dict(states)) and refs)
    monkeypatch.setattr(tuning, "check_resources", lambda spec: None)
    monkeypatch.setattr(tuning, "check_shared_paths", lambda spec, index: None)
    monkeypatch.setattr(tuning, "_trainable", lambda *a, **k: ("trainable", a[4] if len(a) > 4 else k["pretrained"]))

    def restore(path, trainable, **kwargs):
        seen["restored"] = trainable
        raise KeyboardInterrupt  # far enough: what Tune got is recorded

    monkeypatch.setattr(tuning.tune.Tuner, "can_restore", staticmethod(lambda path: True))
    monkeypatch.setattr(tuning.tune.Tuner, "restore", staticmethod(restore))
    with pytest.raises(KeyboardInterrupt):
        tuning.run_sweep(spec, expand(spec), None, resume=True, pretrained=refs if shipped else None)
    assert seen["restored"] == ("trainable", refs)
    if shipped:
        assert "put" not in seen and server.requests == 0
    else:  # resolved here (downloaded once into the driver's cache), then put in the store
        assert same_state(seen["put"]["resnet18"], state) and server.requests == 1
        assert seen["store_bytes"] == sum(t.nbytes for t in state.values())


# --------------------------------------------------------------------------------------------
# a two-node cluster whose nodes have no weights: they reach the trials through the object store


DRIVER = """
import sys
from torchvision.models import ResNet18_Weights
ResNet18_Weights.IMAGENET1K_V1.value.url = sys.argv[1]  # the test's seam: in this driver process only
from covid_tune.cli.run import main
sys.exit(main(sys.argv[2:]))
"""


def _torch_home_per_node(address: str) -> dict[str, str | None]:
    """TORCH_HOME as each node's Ray worker processes (those that run trials) see it."""
    import ray
    from ray._private import ray_constants
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def torch_home() -> str | None:
        return os.environ.get("TORCH_HOME")

    keep, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False  # keep 127.0.0.1 as it is
    ray.init(address=address, log_to_driver=False)
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        return dict(zip(nodes, ray.get([torch_home.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n, soft=False)).remote() for n in nodes])))
    finally:
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = keep


@pytest.mark.slow
def test_cluster_trials_get_the_weights_from_the_driver_through_the_object_store(served, tmp_path) -> None:
    """Head and worker node each have an empty TORCH_HOME of their own and no way to the server (its URL
    is known to the driver only); the driver (another TORCH_HOME) downloads the file once, and the
    trials train from it on the worker node (the head has no CPU for trials, so every trial lands on the
    worker: with CPUs on both, two 1-epoch trials often ran one after the other on a single node).
    (A second run reading the driver's cache: the first test.)"""
    from ray.cluster_utils import Cluster

    path, state = served
    node_args = {"num_cpus": 1, "object_store_memory": 200 * 1024**2, "node_ip_address": "127.0.0.1"}
    homes = {n: tmp_path / f"{n}-torch-home" for n in ("head", "worker", "driver")}
    ray_tmp = tempfile.mkdtemp(prefix="ct-ray-", dir="/tmp")  # short, private: see tests/test_cluster.py
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "TORCH_HOME")}
    os.environ["RAY_TMPDIR"] = ray_tmp
    cluster = None
    srv = Server(path.parent)
    try:
        os.environ["TORCH_HOME"] = str(homes["head"])  # what each node's Ray processes inherit
        cluster = Cluster(initialize_head=True, head_node_args={**node_args, "num_cpus": 0, "include_dashboard": False})
        os.environ["TORCH_HOME"] = str(homes["worker"])
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "TORCH_HOME": str(homes["driver"])}
        env.pop("RAY_ADDRESS", None)
        env.pop(weights_mod.OFFLINE_ENV, None)
        (tmp_path / "driver.py").write_text(DRIVER)
        spec = _tiny_spec(tmp_path)

        seen = _torch_home_per_node(cluster.address)
        worker = next(iter(cluster.worker_nodes)).node_id
        assert seen == {cluster.head_node.node_id: str(homes["head"]), worker: str(homes["worker"])}
        run = subprocess.run([sys.executable, str(tmp_path / "driver.py"), srv.url(path.name), str(spec), "--address",
                              cluster.address], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
        assert "downloading ImageNet weights" in run.stderr
        assert srv.requests == 1 and cached(homes["driver"]) == [path.name]
    finally:
        srv.stop()
        if cluster is not None:
            cluster.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not homes["head"].exists() and not homes["worker"].exists()  # nothing was fetched on a node
    csv = pd.read_csv(tmp_path / "out" / "report" / "results.csv")
    assert len(csv) == 2 and (csv["status"] == "ok").all() and set(csv["node_id"]) == {worker}
    for cid in csv["config_id"]:  # fc_only: the backbone is exactly the served file's, in frozen.pt
        model = torch.load(tmp_path / "out" / "best" / cid / "frozen.pt", weights_only=True)
        for key in ("conv1.weight", "bn1.running_mean", "layer4.1.conv2.weight"):
            assert torch.equal(model[f"net.{key}"], state[key]), (cid, key)
    first, second = (tmp_path / "out" / "best" / cid / "frozen.pt" for cid in csv["config_id"])
    assert first.samefile(second)  # the pretrained trunk on disk once for both configurations
