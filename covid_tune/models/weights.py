"""Pretrained weights, resolved once on the driver and checked before anything trains.

``trainer.weights: imagenet`` reads torchvision's cache (``$TORCH_HOME/hub/checkpoints``) when the
file is there, without any network; else it downloads the file with torch.hub's own downloader (the
SHA-256 prefix in torchvision's file name checked, a progress bar, written to a ``.partial`` file
and renamed into place only when complete). ``trainer.weights: /path/state_dict.pt`` reads that
file. Either way the result is a plain state_dict whose keys and shapes match the backbone; the
driver ships it to the trials (:mod:`covid_tune.sweep.tuning`), so no worker reads TORCH_HOME, the file
or the network.

Downloads are off with ``trainer.weights_download: never`` or the environment variable
``COVID_TUNE_OFFLINE=1``; a missing file is then an error naming the file and where to put it. Every
problem raises :class:`~covid_tune.models.registry.WeightsUnavailable` with one message naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch

from covid_tune.models.registry import WeightsUnavailable, get_backbone

log = logging.getLogger(__name__)

OFFLINE_ENV = "COVID_TUNE_OFFLINE"
DOWNLOAD_MODES = ("auto", "never")
# seconds without progress (name lookup, connect, each read) before a download is given up: a
# dead network fails in seconds, a slow but working one still finishes
DOWNLOAD_TIMEOUT_S = 15.0


def offline_reason(download: str = "auto") -> str | None:
    """Why downloads are off (named in the error), or None when they are allowed."""
    if download not in DOWNLOAD_MODES:
        raise ValueError(f"weights download mode {download!r}; choose one of: {', '.join(DOWNLOAD_MODES)}")
    env = os.environ.get(OFFLINE_ENV, "").strip()
    if env.lower() not in ("", "0", "false", "no", "off"):
        return f"{OFFLINE_ENV}={env}"
    return "trainer.weights_download: never" if download == "never" else None


def imagenet_url(backbone: str) -> str:
    """Where torchvision downloads this backbone's ImageNet weights from (its Weights entry's url)."""
    entry = get_backbone(backbone).imagenet_weights
    if entry is None:
        raise WeightsUnavailable(f"backbone {backbone!r} has no ImageNet weights; use weights: none")
    return entry().url


def _where(backbone: str, path: Path) -> str:
    return (f"Place the file {path.name} (from {imagenet_url(backbone)}) at {path} (set TORCH_HOME to use "
            f"another cache folder), give a state_dict file as trainer.weights, or use trainer.weights=none.")


def imagenet_weights_file(backbone: str) -> Path:
    """Where torchvision's weights API caches this backbone's ImageNet file (TORCH_HOME aware)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(imagenet_url(backbone))


def check_weights(backbone: str, weights: str) -> None:
    """Whether pretrained weights are on disk here, without downloading (a quick pre-flight check)."""
    if weights == "none":
        return
    if weights == "imagenet":
        path = imagenet_weights_file(backbone)
        if not path.is_file():
            raise WeightsUnavailable(
                f"ImageNet weights for {backbone} are not on this machine. {_where(backbone, path)}")
        return
    problem = weights_file_problem(Path(weights), backbone)
    if problem:
        raise WeightsUnavailable(problem)


def weights_file_problem(path: Path, backbone: str) -> str | None:
    """Why ``trainer.weights: PATH`` cannot be a state_dict file (a folder, nothing there), or None."""
    if path.is_dir():
        return (f"trainer.weights: {path} is a directory, expected a state_dict file (.pt/.pth) "
                f"of the torchvision {backbone} model")
    if not path.is_file():
        return (f"trainer.weights: file {path} does not exist "
                f"(expected a state_dict of the torchvision {backbone} model)")
    return None


def load_weights(backbone: str, weights: str, download: str = "auto", progress: bool = True) -> dict | None:
    """The pretrained state_dict for ``backbone`` (None for ``weights='none'``), checked against it.

    ``weights``: ``none``, ``imagenet`` (torchvision's cache, else downloaded unless ``download`` is
    ``never`` or :data:`OFFLINE_ENV` is set) or a state_dict file. Raises WeightsUnavailable.
    """
    if weights == "none":
        return None
    if weights == "imagenet":
        path = imagenet_weights_file(backbone)
        if path.is_file():
            _check_hash(path)  # placed by hand, or copied: torchvision itself trusts any file there
        else:
            why = offline_reason(download)
            if why is not None:
                raise WeightsUnavailable(f"ImageNet weights for {backbone} are not on this machine and downloads "
                                         f"are off ({why}). {_where(backbone, path)}")
            _download(backbone, imagenet_url(backbone), path, progress)
    else:
        path = Path(weights)
        problem = weights_file_problem(path, backbone)
        if problem:
            raise WeightsUnavailable(problem)
    state = _read(path, backbone)
    fix = get_backbone(backbone).fix_state
    if fix is not None and isinstance(state, Mapping):
        state = fix(state)  # as torchvision does when it loads the same file
    check_state_dict(state, backbone, str(path))
    return state


def load_all(backbones: list[str], weights: str, download: str = "auto", progress: bool = True) -> dict[str, dict]:
    """:func:`load_weights` for each backbone that needs weights (an empty dict for ``weights='none'``)."""
    states = {b: load_weights(b, weights, download, progress) for b in dict.fromkeys(backbones)}
    return {b: s for b, s in states.items() if s is not None}


def state_nbytes(states: Mapping[str, Mapping]) -> int:
    """Bytes the tensors of these state_dicts take (room they need in an object store)."""
    return sum(t.nbytes for s in states.values() for t in s.values() if isinstance(t, torch.Tensor))


def _hash_prefix(path: Path) -> str | None:
    match = torch.hub.HASH_REGEX.search(path.name)
    return match.group(1) if match else None


def _check_hash(path: Path) -> None:
    prefix = _hash_prefix(path)
    if not prefix:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        raise WeightsUnavailable(
            f"{path}: its SHA-256 is {digest.hexdigest()[:12]}..., its name says {prefix}: the file is damaged or "
            "incomplete (or another file under this name). Delete it to download it again.")


def _resolve_host(url: str, timeout: float) -> None:
    """Look up the URL's host within ``timeout`` seconds (socket timeouts do not cover name lookup)."""
    parts = urlparse(url)
    if not parts.hostname:
        return
    out: dict = {}

    def lookup() -> None:
        try:
            socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        except OSError as exc:
            out["error"] = exc

    worker = threading.Thread(target=lookup, daemon=True, name="covid_tune-dns")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise URLError(f"looking up {parts.hostname} took over {timeout:g} s")
    if "error" in out:
        raise URLError(out["error"])


def _download(backbone: str, url: str, path: Path, progress: bool) -> None:
    """torch.hub's download (hash checked, .partial file renamed when done) with a network timeout."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsUnavailable(f"cannot create {path.parent} for the ImageNet weights of {backbone}: {exc}; "
                                 "set TORCH_HOME to a writable folder") from None
    log.info(f"downloading ImageNet weights for {backbone}: {url} -> {path}")
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urlopen in torch.hub takes no timeout of its own
    try:
        _resolve_host(url, DOWNLOAD_TIMEOUT_S)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=_hash_prefix(path), progress=progress)
    except (URLError, OSError) as exc:  # no network, refused, timed out, cut off, disk full
        reason = getattr(exc, "reason", None) or exc
        raise WeightsUnavailable(f"ImageNet weights for {backbone} are not on this machine and downloading {url} "
                                 f"failed ({reason}). {_where(backbone, path)}") from None
    except RuntimeError as exc:  # torch.hub: "invalid hash value (expected ..., got ...)"
        raise WeightsUnavailable(f"downloaded {url} for {backbone}, but it does not match the SHA-256 in its name "
                                 f"({exc}); nothing was saved at {path}. "
                                 "Run again, or place a good copy there.") from None
    finally:
        socket.setdefaulttimeout(before)


def _read(path: Path, backbone: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated copy, another kind of file, pickled objects
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailable(f"trainer.weights: {path} is not a readable PyTorch state_dict for {backbone} "
                                 f"(truncated, or not a file saved with torch.save(model.state_dict())): "
                                 f"{first}") from None


def check_state_dict(state: object, backbone: str, name: str) -> None:
    """Raise WeightsUnavailable, naming ``name``, unless ``state`` fits ``backbone``'s network exactly."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__
        keys = f" with keys {', '.join(map(str, list(state)[:5]))}" if isinstance(state, Mapping) else ""
        raise WeightsUnavailable(f"trainer.weights: {name} holds a {kind}{keys}, not a state_dict of tensors "
                                 f"(save it with torch.save(model.state_dict()))")
    with torch.device("meta"):  # shapes without allocating the network
        net = get_backbone(backbone).build()
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    # BatchNorm fills in num_batches_tracked when a file predates it (torchvision's own older files)
    missing = [k for k in want if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {want[k]})" for k in want
             if k in state and tuple(state[k].shape) != want[k]]
    problem = "; ".join(f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''} ({len(items)})"
                        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                        if items)
    if not problem:
        try:  # what the trials will do, on the meta network (no copy): the final word
            net.load_state_dict(state, assign=True)
        except RuntimeError as exc:
            problem = " ".join(str(exc).split())[:300]
    if problem:
        raise WeightsUnavailable(f"trainer.weights: {name} is not a state_dict of the torchvision {backbone} network "
                                 f"(another backbone's file?): {problem}")
