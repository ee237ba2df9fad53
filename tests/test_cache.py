"""The decoded-image cache: equal to PIL decoding, keyed by content and settings, reused from disk."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from covid_tune.cli import run as run_mod
from covid_tune.data import cache
from covid_tune.data.dataset import eval_transform, load_image, scan_dataset
from covid_tune.data.loaders import TensorLoader
from covid_tune.spec.load import validate

# odd, non-square sizes on purpose: both crops' rounding is exercised
SHAPES = [(40, 30), (31, 47), (33, 33), (64, 50)]


def write_tree(root: Path, mode: str = "L") -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        for cls in ("infected", "normal"):
            for i, (w, h) in enumerate(SHAPES):
                channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
                arr = rng.integers(0, 255, size=(h, w, channels), dtype=np.uint8)
                path = root / split / cls / f"{cls}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "data")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("grayscale", [True, False])
def test_decoded_cache_equals_pil_decode_and_resize(tmp_path: Path, mode: str, grayscale: bool) -> None:
    index = scan_dataset(write_tree(tmp_path / mode, mode))
    size = 24
    decoded = cache.build_decoded_cache(index, size, grayscale, splits=("train",))
    arr = decoded["train"]
    s = cache.stored_size(size)
    assert arr.shape == (len(index.paths("train")), 1 if grayscale else 3, s, s) and arr.dtype == np.uint8
    for row, path in zip(arr, index.paths("train")):
        img = load_image(path, grayscale)  # the PIL path's RGB image
        resized = np.asarray(T.Resize(s)(img))  # shorter side to S, as eval_transform does
        ref = np.asarray(T.CenterCrop(size)(T.Resize(s)(img)))  # what the PIL eval path crops
        o = cache.center_offset(s, size)
        got = row[:, o:o + size, o:o + size].transpose(1, 2, 0)
        assert np.array_equal(np.broadcast_to(got, ref.shape), ref), path  # eval crop: pixel for pixel
        # and the whole square is a piece of the resized image
        h, w = resized.shape[:2]
        found = [(t, left) for t in range(h - s + 1) for left in range(w - s + 1)
                 if np.array_equal(np.broadcast_to(row.transpose(1, 2, 0), (s, s, 3)), resized[t:t + s, left:left + s])]
        assert found, path


def test_eval_batches_equal_the_pil_eval_transform(tree: Path) -> None:
    index = scan_dataset(tree)
    decoded = cache.build_decoded_cache(index, 24, True, splits=("validation",))
    loader = TensorLoader(decoded["validation"], index.labels("validation"), 24, batch_size=3)
    got = torch.cat([x for x, _ in loader])
    ref = torch.stack([eval_transform(24)(load_image(p, True)) for p in index.paths("validation")])
    assert got.dtype == ref.dtype and torch.equal(got, ref)  # bit-identical, normalization included


def test_second_build_reads_the_disk_cache_without_decoding(tree: Path, tmp_path: Path, monkeypatch) -> None:
    index = scan_dataset(tree)
    first = cache.build_decoded_cache(index, 24, True, tmp_path / "cache")
    assert sorted(Path(f).name.split("-")[0] for f in first.files.values()) == ["test", "train", "validation"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is on disk")

    monkeypatch.setattr(Image, "open", no_decoding)
    second = cache.build_decoded_cache(index, 24, True, tmp_path / "cache")
    assert second.keys == first.keys and second.files == first.files
    for split in first.arrays:
        assert isinstance(second[split], np.memmap) and not second[split].flags.writeable
        assert np.array_equal(second[split], first[split])
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_key_follows_content_and_settings(tree: Path, tmp_path: Path) -> None:
    paths = scan_dataset(tree).paths("train")
    key = cache.cache_key(paths, 24, True)
    assert cache.cache_key(paths, 24, True) == key
    assert cache.cache_key(paths, 32, True) != key  # image size
    assert cache.cache_key(paths, 24, False) != key  # grayscale
    assert cache.cache_key(paths[::-1], 24, True) != key  # order = rows of the array
    # same bytes elsewhere (a copied dataset): same key
    copy = tmp_path / "copy"
    copies = []
    for i, p in enumerate(paths):
        copies.append(str(copy / f"{i}.png"))
        Path(copies[-1]).parent.mkdir(parents=True, exist_ok=True)
        Path(copies[-1]).write_bytes(Path(p).read_bytes())
    assert cache.cache_key(copies, 24, True) == key
    # one file's content changed, name/size kept: another key, and the rebuilt array shows it
    before = cache.build_split(copies, 24, True, tmp_path / "c")
    img = np.asarray(Image.open(copies[0])).copy()
    img[:] = 255 - img
    Image.fromarray(img).save(copies[0])
    after = cache.build_split(copies, 24, True, tmp_path / "c")
    assert after[1] != before[1] and after[2] != before[2]
    assert not np.array_equal(after[0][0], before[0][0]) and np.array_equal(after[0][1:], before[0][1:])


def test_a_failed_build_leaves_no_cache_file(tree: Path, tmp_path: Path, monkeypatch) -> None:
    index = scan_dataset(tree)
    real = cache.decode_resized
    calls = []

    def flaky(path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk gone")
        return real(path, *args)

    monkeypatch.setattr(cache, "decode_resized", flaky)
    with pytest.raises(OSError, match="disk gone"):
        cache.build_decoded_cache(index, 24, True, tmp_path / "cache", workers=1)
    assert list((tmp_path / "cache").iterdir()) == []


def test_prepare_cache_follows_the_spec(tiny_raw: dict, tree: Path) -> None:
    raw = {**tiny_raw, "data": {"root": str(tree), "image_size": 24, "augment": False}}
    spec = validate(raw)
    assert spec.data.cache is True and spec.trainer.feature_cache == "auto"
    index = scan_dataset(tree)
    decoded = run_mod.prepare_cache(spec, index)
    assert set(decoded.arrays) == {"train", "validation"}  # trials never read the test split
    assert all(Path(f).parent == spec.output_dir / "cache" for f in decoded.files.values())
    assert decoded.nbytes == cache.node_memory_bytes(len(index.paths("train")) + len(index.paths("validation")), 24)
    off = validate({**raw, "data": {**raw["data"], "cache": False}})
    assert run_mod.prepare_cache(off, index) is None


def test_pickles_as_plain_arrays_out_of_band(tree: Path, tmp_path: Path) -> None:
    """What lets Ray's object store hold one copy and hand workers zero-copy views."""
    decoded = cache.build_decoded_cache(scan_dataset(tree), 24, True, tmp_path / "cache")
    buffers = []
    data = pickle.dumps(decoded, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 3 and len(data) < 2000  # the pixels travel out of band
    back = pickle.loads(data, buffers=buffers)
    assert type(back["train"]) is np.ndarray and np.array_equal(back["train"], decoded["train"])


def test_check_refuses_a_cache_of_other_settings_or_data(tree: Path) -> None:
    index = scan_dataset(tree)
    decoded = cache.build_decoded_cache(index, 24, True, splits=("train",))
    decoded.check(index, 24, True)
    with pytest.raises(ValueError, match="image_size=24"):
        decoded.check(index, 32, True)
    index.splits["train"] = index.splits["train"][1:]
    with pytest.raises(ValueError, match="images"):
        decoded.check(index, 24, True)


def test_memory_per_node_figure() -> None:
    # docs/cluster.md's figure (memory per node): the course part 1 (about 32,000 images) at 224 px, grayscale
    assert cache.stored_size(224) == 256
    assert cache.node_memory_bytes(32_000, 224) == 32_000 * 256 * 256
    assert 2.0e9 < cache.node_memory_bytes(32_000, 224) < 2.2e9


@pytest.mark.slow
def test_sweep_trials_use_the_caches_and_checkpoint_each_epoch(tiny_raw: dict) -> None:
    """Through Ray: the trials read the decoded cache, fc_only trains on features, and every checkpoint
    holds exactly its epoch's state although the next epoch starts training while it is reported."""
    from covid_tune.cli.run import prepare
    from covid_tune.engine import training as engine
    from covid_tune.engine.checkpoints import METRICS_FILE, STATE_FILE
    from covid_tune.results import collect as results
    from covid_tune.spec import plan as plan_mod
    from covid_tune.sweep import tuning

    raw = {**tiny_raw, "trainer": {**tiny_raw["trainer"], "epochs": 3, "dropout": 0.3},
           "scheduler": {**tiny_raw["scheduler"], "asha": False, "keep_checkpoints": 3}}
    spec = validate(raw)
    index, decoded, _ = prepare(spec)
    plan = plan_mod.expand(spec)
    import ray

    if not ray.is_initialized():  # a private local Ray, never a cluster someone left running here
        ray.init(address="local", include_dashboard=False, num_cpus=2, object_store_memory=256 * 1024**2)
    try:
        trials = tuning.run_sweep(spec, plan, index, decoded)
    finally:
        ray.shutdown()
    assert all(t["status"] == "ok" for t in trials.values()), trials
    # train + validation for the trials, test for the duplicate check (pixel digests), each built once
    built = sorted(p.name.split("-")[0] for p in (spec.output_dir / "cache").glob("*.npy"))
    assert built == ["test", "train", "validation"]
    for cid, rec in results.collect(spec.experiment_dir).items():
        hp = plan[cid]
        rows = [json.loads(line) for line in (rec.trial_dir / "result.json").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert all(r["decoded_cache"] == 1 and r["augmented"] == 0 for r in rows)
        # every level with a frozen prefix trains on its cached outputs (exact: no augmentation)
        assert all(r["feature_cache"] == int(hp.freeze != "none") for r in rows)
        assert [h["feature_cache"] for h in rec.history] == [r["feature_cache"] for r in rows]  # read back
        assert sorted(rec.checkpoints) == [1, 2, 3]
        for epoch, folder in rec.checkpoints.items():
            state = torch.load(folder / STATE_FILE, weights_only=True)
            assert state["epoch"] == epoch == json.loads((folder / METRICS_FILE).read_text())["epoch"]
            run = engine.TrainingRun(hp, index, torch.device("cpu"))
            run.load_state_dict(state)  # the trained part over the rebuilt initial state
            res = engine.evaluate(run.model, run.val_loader, run.loss_fn, torch.device("cpu"), "single", 0.5, 2)
            assert res.loss == pytest.approx(rows[epoch - 1]["val_loss"], rel=1e-5), (cid, epoch)
