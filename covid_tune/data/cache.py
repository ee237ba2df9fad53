"""Decoded-image cache: every image decoded and resized once, kept as uint8 arrays on disk.

One ``.npy`` file per split, shape ``(N, C, S, S)`` uint8 with ``C = 1`` for grayscale (kept as one
channel until the model) or 3 for RGB, rows in :class:`~covid_tune.data.dataset.DatasetIndex` order.
``S = round(image_size * 256 / 224)``: each image is resized with PIL exactly as the evaluation
transform does (shorter side to ``S``), then cut to an ``S x S`` square placed so that the centre
``image_size`` crop of the square is, pixel for pixel, ``CenterCrop(image_size)`` of the resized
image. Evaluation on the cache is therefore exactly the PIL evaluation path; training crops
(:mod:`covid_tune.data.augment`) sample from the square.

Key: SHA-256 over the settings (format version, ``S``, crop size, grayscale) and the SHA-256 of
every file's *content*, in order. Content rather than size+mtime: a copied, touched or re-synced
dataset still hits the cache, and an edited file always misses it. Labels are not part of the key
(they come from the index), so ``class_map`` changes reuse the same file.

Files are written to a temporary name and renamed into place, so a crash never leaves a partial
cache and concurrent builders (two drivers) do not corrupt each other; they are read back
memory-mapped, read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torchvision.transforms import functional as TF

from covid_tune.data.dataset import SPLITS, DatasetIndex, Duplicates, decode_image, match_duplicates

CACHE_VERSION = 1
_CHUNK = 1 << 20


def stored_size(image_size: int) -> int:
    """Side of the cached square: the evaluation resize, ``round(image_size * 256 / 224)``."""
    return round(image_size * 256 / 224)


def center_offset(stored: int, image_size: int) -> int:
    """Row/column where the evaluation crop starts inside the cached square (CenterCrop's rounding)."""
    return int(round((stored - image_size) / 2.0))


@dataclass
class DecodedSplits:
    """The decoded images of every split, plus what they were made with.

    ``arrays[split]`` is ``(N, C, S, S)`` uint8, usually a read-only memory map or, inside a Ray
    worker, a zero-copy read-only view of the object store. Pickles as plain arrays, so
    ``tune.with_parameters`` puts it in the object store once per node.
    """

    arrays: dict[str, np.ndarray]
    image_size: int
    grayscale: bool
    keys: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # split -> .npy path (empty when built in memory)

    @property
    def stored_size(self) -> int:
        return stored_size(self.image_size)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __getitem__(self, split: str) -> np.ndarray:
        return self.arrays[split]

    def check(self, index: DatasetIndex, image_size: int, grayscale: bool) -> None:
        """Refuse a cache that does not belong to this index or these settings."""
        if (image_size, grayscale) != (self.image_size, self.grayscale):
            raise ValueError(f"decoded cache made for image_size={self.image_size}, grayscale={self.grayscale}; "
                             f"the trial wants image_size={image_size}, grayscale={grayscale}")
        for split, arr in self.arrays.items():
            if split in index.splits and len(arr) != len(index.splits[split]):
                raise ValueError(f"decoded cache of split {split!r} has {len(arr)} images, the index "
                                 f"{len(index.splits[split])}")

    def __getstate__(self) -> dict:
        # plain ndarrays (not np.memmap): pickle protocol 5 then ships them out of band, which is
        # what lets Ray store one copy per node and hand workers zero-copy views
        state = dict(self.__dict__)
        state["arrays"] = {k: np.asarray(v) for k, v in self.arrays.items()}
        return state


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_key(paths: Sequence[str], image_size: int, grayscale: bool, workers: int | None = None) -> str:
    """The key of one split's cache: settings + the content digest of every file, in order."""
    settings = {"version": CACHE_VERSION, "stored_size": stored_size(image_size), "crop": image_size,
                "grayscale": grayscale, "resize": "PIL bilinear shorter side; eval-aligned square"}
    with ThreadPoolExecutor(workers or _workers()) as pool:  # hashlib and file reads release the GIL
        digests = list(pool.map(file_digest, paths))
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for d in digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def decode_resized(path: str, image_size: int, grayscale: bool) -> np.ndarray:
    """One image as ``(C, S, S)`` uint8: the evaluation resize, then the eval-aligned square."""
    s = stored_size(image_size)
    img = TF.resize(decode_image(path, grayscale), s, interpolation=TF.InterpolationMode.BILINEAR)
    w, h = img.size
    # the square's offset such that its centre crop equals CenterCrop(image_size) of the whole image
    top = min(max(int(round((h - image_size) / 2.0)) - center_offset(s, image_size), 0), h - s)
    left = min(max(int(round((w - image_size) / 2.0)) - center_offset(s, image_size), 0), w - s)
    arr = np.asarray(img.crop((left, top, left + s, top + s)), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _decode_into(out: np.ndarray, paths: Sequence[str], image_size: int, grayscale: bool,
                 workers: int | None) -> None:
    def one(i: int) -> None:
        out[i] = decode_resized(paths[i], image_size, grayscale)

    with ThreadPoolExecutor(workers or _workers()) as pool:  # PIL decodes and resizes without the GIL
        list(pool.map(one, range(len(paths))))


def cache_file(cache_dir: Path, split: str, image_size: int, grayscale: bool, key: str) -> Path:
    return Path(cache_dir) / f"{split}-{stored_size(image_size)}px-{'L' if grayscale else 'RGB'}-{key[:24]}.npy"


def build_split(paths: Sequence[str], image_size: int, grayscale: bool, cache_dir: str | Path | None = None,
                split: str = "split", workers: int | None = None) -> tuple[np.ndarray, str, str]:
    """Decode one split, or read it back from ``cache_dir`` when its key is already there.

    Returns ``(array, key, file)`` (file ``""`` without a cache_dir).
    """
    key = cache_key(paths, image_size, grayscale, workers)
    s = stored_size(image_size)
    shape = (len(paths), 1 if grayscale else 3, s, s)
    if cache_dir is None:
        arr = np.empty(shape, np.uint8)
        _decode_into(arr, paths, image_size, grayscale, workers)
        return arr, key, ""
    cache_dir = Path(cache_dir)
    target = cache_file(cache_dir, split, image_size, grayscale, key)
    if not target.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.{time.monotonic_ns()}.tmp.npy")
        try:
            # decode straight into the file's pages: no second copy of the split in memory
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            _decode_into(out, paths, image_size, grayscale, workers)
            out.flush()
            del out
            os.replace(tmp, target)  # atomic: readers see no file or a whole one
        finally:
            tmp.unlink(missing_ok=True)
    arr = np.load(target, mmap_mode="r")
    if arr.shape != shape or arr.dtype != np.uint8:
        raise ValueError(f"decoded cache {target} has shape {arr.shape} {arr.dtype}, expected {shape} uint8")
    return arr, key, str(target)


def build_decoded_cache(index: DatasetIndex, image_size: int, grayscale: bool = True,
                        cache_dir: str | Path | None = None, splits: Sequence[str] = SPLITS,
                        workers: int | None = None) -> DecodedSplits:
    """Decoded uint8 arrays for ``splits`` of ``index``; with ``cache_dir`` reused across runs."""
    arrays, keys, files = {}, {}, {}
    for split in splits:
        arrays[split], keys[split], files[split] = build_split(index.paths(split), image_size, grayscale,
                                                               cache_dir, split, workers)
    return DecodedSplits(arrays, image_size, grayscale, keys, {k: v for k, v in files.items() if v})


def node_memory_bytes(n_images: int, image_size: int, grayscale: bool = True) -> int:
    """Bytes of the decoded cache of ``n_images`` (what one node holds once, in Ray's object store)."""
    return n_images * (1 if grayscale else 3) * stored_size(image_size) ** 2



# --- exact duplicates across splits ---------------------------------------------------------

def pixel_digest(image: np.ndarray) -> str:
    """Digest of one decoded image's pixels (``(C, S, S)`` uint8): equal digests mean equal pixels."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()


def _digest_files(paths: Sequence[str], image_size: int, grayscale: bool, workers: int | None) -> list[str]:
    def one(path: str) -> str:
        return pixel_digest(decode_resized(path, image_size, grayscale))

    with ThreadPoolExecutor(workers or _workers()) as pool:
        return list(pool.map(one, paths))


def find_duplicates(index: DatasetIndex, image_size: int, grayscale: bool, decoded: DecodedSplits | None = None,
                    cache_dir: str | Path | None = None, store: bool = False,
                    workers: int | None = None) -> Duplicates:
    """Images of validation or test whose decoded pixels (at the cache's size, ``stored_size(image_size)``)
    equal an image of an earlier split.

    Each split's pixels come from, in order: ``decoded`` (no work beyond hashing), the split's file in
    ``cache_dir`` when its key is there already, a new file there (``store``: the decode is kept for the
    next run), else a decode in memory that is hashed and dropped."""
    digests = {}
    for split in SPLITS:
        paths = index.paths(split)
        if decoded is not None and split in decoded.arrays:
            arr = decoded[split]
        elif cache_dir is not None and (store or cache_file(Path(cache_dir), split, image_size, grayscale,
                                                           cache_key(paths, image_size, grayscale, workers)).is_file()):
            arr = build_split(paths, image_size, grayscale, cache_dir, split, workers)[0]
        else:
            digests[split] = _digest_files(paths, image_size, grayscale, workers)
            continue
        digests[split] = [pixel_digest(a) for a in arr]
    how = (f"blake2b of the decoded pixels at {stored_size(image_size)} px "
           f"({'grayscale' if grayscale else 'RGB'}), as the decoded cache holds them")
    return match_duplicates(index, digests, how)


def keep_rows(decoded: DecodedSplits, old: DatasetIndex, new: DatasetIndex) -> DecodedSplits:
    """``decoded`` for ``new``, an index with some images of ``old`` left out (data.on_duplicate: drop);
    a split that lost rows is an in-memory copy (its file on disk still holds every image)."""
    arrays, files = dict(decoded.arrays), dict(decoded.files)
    for split, arr in decoded.arrays.items():
        kept = set(new.paths(split))
        if len(kept) != len(old.paths(split)):
            arrays[split] = np.asarray(arr)[[p in kept for p in old.paths(split)]]
            files.pop(split, None)
    return DecodedSplits(arrays, decoded.image_size, decoded.grayscale, dict(decoded.keys), files)
