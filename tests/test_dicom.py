"""DICOM decoding: files written with pydicom from known arrays decode to the pixels a viewer shows
(MONOCHROME1 inverted, VOI LUT or window, rescale slope/intercept, 12 and 16 bits -> 8 bits); a DICOM tree
scans, caches and trains; files pydicom cannot decode are bad files, named, under data.on_bad_file.

Expected values are worked out by hand from DICOM PS3.3 C.11.2.1.2 (the LINEAR window: x <= c - 0.5 -
(w - 1)/2 -> lowest, x > c - 0.5 + (w - 1)/2 -> highest, else ((x - (c - 0.5)) / (w - 1) + 0.5) * 255)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from dicom_helpers import write_dicom  # noqa: E402
from engine_helpers import CPU, TINY_HP  # noqa: E402

from covid_tune.data.cache import build_decoded_cache, decode_resized  # noqa: E402
from covid_tune.data.dataset import DatasetError, decode_image, scan_dataset  # noqa: E402
from covid_tune.data.dicom import decode_dicom, is_dicom  # noqa: E402


def decode(tmp_path: Path, pixels, **kw) -> np.ndarray:
    return decode_dicom(write_dicom(tmp_path / "x.dcm", np.asarray(pixels), **kw))


# --- pixels ------------------------------------------------------------------------------------------

def test_16_bit_monochrome2_without_window_is_min_max(tmp_path: Path) -> None:
    out = decode(tmp_path, [[0, 1000], [65535, 30000]])
    # x * 255 / 65535: 1000 -> 3.89, 30000 -> 116.7
    assert out.dtype == np.uint8 and out.tolist() == [[0, 4], [255, 117]]


def test_min_max_uses_the_images_own_range(tmp_path: Path) -> None:
    # 12-bit values 1000-3000: (x - 1000) * 255 / 2000; 1500 -> 63.75, 2000 -> 127.5 (to even: 128)
    assert decode(tmp_path, [[1000, 1500], [2000, 3000]], bits_stored=12).tolist() == [[0, 64], [128, 255]]


def test_12_bit_monochrome1_is_inverted(tmp_path: Path) -> None:
    # MONOCHROME1: low values are white; min-max then 255 - y
    assert decode(tmp_path, [[0, 1000], [4095, 2000]], bits_stored=12,
                  photometric="MONOCHROME1").tolist() == [[255, 193], [0, 130]]


def test_12_bit_window_center_width(tmp_path: Path) -> None:
    # c 2048, w 1024: 0 and 1535 at or below 1535.5 - 0 ... -> 0; 2048 -> (0.5/1023 + 0.5) * 255 = 127.62;
    # 2560 -> (512.5/1023 + 0.5) * 255 = 255.25 -> above: 255; 1800 -> (-247.5/1023 + 0.5) * 255 = 65.8
    out = decode(tmp_path, [[0, 2048], [4095, 1800]], bits_stored=12, window=(2048, 1024))
    assert out.tolist() == [[0, 128], [255, 66]]


def test_window_ignores_values_outside_it_where_min_max_would_not(tmp_path: Path) -> None:
    pixels = [[0, 2048], [4095, 1800]]
    assert decode(tmp_path, pixels, bits_stored=12).tolist() != decode(tmp_path, pixels, bits_stored=12,
                                                                        window=(2048, 1024)).tolist()


def test_16_bit_monochrome1_with_window_is_windowed_then_inverted(tmp_path: Path) -> None:
    out = decode(tmp_path, [[0, 2048], [4095, 1800]], bits_stored=16, window=(2048, 1024), photometric="MONOCHROME1")
    assert out.tolist() == [[255, 127], [0, 189]]


def test_window_linear_exact_and_sigmoid(tmp_path: Path) -> None:
    # LINEAR_EXACT: (x - c) / w + 0.5; 2048 -> 0.5 -> 127.5 (to even: 128); 1792 -> 0.25 -> 63.75
    exact = decode(tmp_path, [[2048, 1792], [0, 4095]], bits_stored=12, window=(2048, 1024),
                   voi_function="LINEAR_EXACT")
    assert exact.tolist() == [[128, 64], [0, 255]]
    # SIGMOID: 255 / (1 + exp(-4 (x - c) / w)); 2048 -> 127.5; 2304 -> 255 / (1 + e^-1) = 186.4
    sig = decode(tmp_path, [[2048, 2304], [0, 4095]], bits_stored=12, window=(2048, 1024), voi_function="SIGMOID")
    assert sig.tolist() == [[128, 186], [0, 255]]


def test_rescale_slope_intercept_before_the_window(tmp_path: Path) -> None:
    # signed 16 bits; slope 1, intercept -24: -1000 -> -1024, 0 -> -24, 200 -> 176, 1000 -> 976;
    # window c 40 w 400: -24 -> (-63.5/399 + 0.5) * 255 = 86.9; 176 -> (136.5/399 + 0.5) * 255 = 214.7
    out = decode(tmp_path, [[-1000, 0], [200, 1000]], signed=True, rescale=(1, -24), window=(40, 400))
    assert out.tolist() == [[0, 87], [215, 255]]
    # slope 2: 0 -> -24, 60 -> 96 -> (56.5/399 + 0.5) * 255 = 163.6
    assert decode(tmp_path, [[0, 60], [-1000, 1000]], signed=True, rescale=(2, -24),
                  window=(40, 400)).tolist() == [[87, 164], [0, 255]]


def test_voi_lut_sequence_wins_over_the_window(tmp_path: Path) -> None:
    # an 8-bit LUT of 4 entries from value 0: 0, 50, 200, 255; values past its end take its last entry
    out = decode(tmp_path, [[0, 1], [2, 9]], bits_stored=12, voi_lut=([4, 0, 8], [0, 50, 200, 255]),
                 window=(2, 1))
    assert out.tolist() == [[0, 50], [200, 255]]
    # a 12-bit LUT: entries * 255 / 4095: 500 -> 31.1, 2000 -> 124.5
    out = decode(tmp_path, [[0, 1], [2, 3]], bits_stored=12, voi_lut=([4, 0, 12], [0, 500, 2000, 4095]))
    assert out.tolist() == [[0, 31], [125, 255]]


def test_decode_image_and_the_cache_take_dicom(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", np.arange(64 * 48).reshape(48, 64) * 16, bits_stored=16)
    img = decode_image(str(path))
    assert img.mode == "L" and img.size == (64, 48)
    assert np.array_equal(np.asarray(img), decode_dicom(path))
    assert decode_image(str(path), grayscale=False).mode == "RGB"
    assert decode_resized(str(path), 32, True).shape == (1, 37, 37)


def test_dicom_without_extension_is_found_by_its_preamble(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "IM0001", np.zeros((4, 4)))
    assert is_dicom(path) and not is_dicom(tmp_path / "IM0002")
    (tmp_path / "notes").write_text("x" * 200)
    assert not is_dicom(tmp_path / "notes")


# --- a DICOM tree --------------------------------------------------------------------------------------

def dicom_tree(root: Path, n: int = 3, size: int = 40) -> Path:
    """root/{train,validation,test}/{normal,opacity}/*.dcm: 12-bit, half MONOCHROME1, half windowed."""
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        for c, cls in enumerate(("normal", "opacity")):
            for i in range(n):
                pixels = rng.integers(0, 2000, (size, size)) + (1500 if c else 0) * (np.arange(size) > size // 2)
                write_dicom(root / split / cls / f"{i}.dcm", pixels, bits_stored=12,
                            photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
                            window=(2048, 4096) if i % 3 == 0 else None)
    return root


def test_dicom_tree_scans_caches_and_trains_one_epoch(tmp_path: Path) -> None:
    from covid_tune.engine.training import TrainingRun

    index = scan_dataset(dicom_tree(tmp_path / "d"))
    assert index.classes == ["normal", "opacity"] and len(index.paths("train")) == 6
    decoded = build_decoded_cache(index, 32, True, cache_dir=tmp_path / "cache")
    assert decoded["train"].shape == (6, 1, 37, 37) and decoded["train"].max() > 0
    run = TrainingRun(replace(TINY_HP, batch_size=4), index, CPU, decoded=decoded)
    metrics = run.run_epoch()
    assert np.isfinite(metrics["val_loss"])


def test_undecodable_dicom_is_a_bad_file_named(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    root = dicom_tree(tmp_path / "d")
    garbage = root / "train" / "normal" / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 20)
    compressed = write_dicom(root / "train" / "opacity" / "jpegls.dcm", np.zeros((4, 4)),
                             transfer_syntax=JPEGLSLossless, pixel_data=encapsulate([b"\xff\xd8" + b"\0" * 40]))
    with pytest.raises(DatasetError) as info:
        scan_dataset(root)
    msg = str(info.value)
    assert f"{garbage}: unreadable DICOM" in msg and f"{compressed}: unreadable DICOM" in msg
    assert "covid_tune[dicom-compressed]" in msg  # what the JPEG-LS file needs
    assert "data.on_bad_file: skip" in msg
    with pytest.warns(UserWarning, match="skipping 2 bad file"):
        index = scan_dataset(root, on_bad_file="skip")
    assert sorted(index.skipped) == sorted([str(garbage), str(compressed)])
    assert len(index.paths("train")) == 6


def test_without_pydicom_a_dicom_tree_is_one_message(tmp_path: Path, monkeypatch) -> None:
    import sys

    root = dicom_tree(tmp_path / "d", n=1, size=8)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(DatasetError) as info:
        scan_dataset(root)
    assert len(info.value.problems) == 1 and "pip install 'covid_tune[dicom]'" in str(info.value)


def test_predict_takes_a_dicom_without_extension(tmp_path: Path, capsys) -> None:
    """DICOM files often come without an extension (IM0001): predict finds them by their preamble, as the
    data scan does, and still skips a file that is neither an image nor DICOM, naming it."""
    from conftest import cli_here

    from covid_tune.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model, save_exported

    meta = {"backbone": "tiny_cnn", "classes": ["normal", "opacity"], "config_id": "m", "dropout": 0.0,
            "freeze": "none", "grayscale": True, "head_hidden": 8, "image_size": 32, "label_mode": "single",
            "threshold": 0.5, "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    save_exported(create_model("tiny_cnn", 2, head_hidden=8).state_dict(), meta, tmp_path / "model")
    images = tmp_path / "images"
    write_dicom(images / "IM0001", np.random.default_rng(0).integers(0, 4000, (40, 40)), bits_stored=12)
    (images / "notes").write_text("x" * 300)
    proc = cli_here(capsys, "predict", tmp_path / "model", images)
    assert proc.returncode == 1  # one file skipped
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{images / 'IM0001'}\t")
    assert f"{images / 'notes'}: skipped, not an image file" in proc.stderr
