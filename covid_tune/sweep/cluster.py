"""Ray itself, for a sweep: starting a local Ray or joining a cluster, the object store's shared copies
(decoded cache, pretrained weights), and checks of what the cluster can hold and see before trials start."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from covid_tune.data.cache import DecodedSplits
from covid_tune.data.dataset import DatasetIndex
from covid_tune.spec.load import Spec

log = logging.getLogger(__name__)

MIN_OBJECT_STORE = 512 * 1024**2


class _OneLineSyncFailure(logging.Filter):
    """Tune's "Saving experiment state to storage ... failed" as one warning line, not a traceback.

    On a local storage path Tune's background copy of its driver folder can race Tune's own
    rename of a temporary state file (FileNotFoundError on ``.tmp-...-state-....json``); the state
    is written again at the next snapshot, so the sweep loses nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Saving experiment state to storage") and record.exc_info:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}{type(exc).__name__}: {exc} (Tune saves it again at its next snapshot)"
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _quiet_ray() -> dict:
    """ray.init options (and logger levels) that keep Ray's warnings but drop its info chatter, here and
    in the workers (e.g. a "Checkpoint successfully created" line per epoch per trial)."""
    # one notice per start that a local Ray uses token authentication (shown with -v)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    state_logger = logging.getLogger("ray.tune.execution.experiment_state")
    if not any(isinstance(f, _OneLineSyncFailure) for f in state_logger.filters):
        state_logger.addFilter(_OneLineSyncFailure())
    return {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="WARNING")}


def without_sigterm_tracebacks(lines: list[str]) -> list[str]:
    """``lines`` (a worker's forwarded stderr) less the "Exception ignored in ..." blocks that end in the
    SystemExit of Ray's own SIGTERM handler.

    When Tune stops a finished trial's actor at the end of a sweep, the SIGTERM can land while the worker
    runs a weakref callback: Python then prints the handler's SystemExit as an ignored exception, a
    9-line traceback from a worker that was stopping anyway. Every other line passes through."""
    out: list[str] = []
    block: list[str] | None = None
    for line in lines:
        if block is None:
            if line.startswith("Exception ignored in"):
                block = [line]
            else:
                out.append(line)
            continue
        block.append(line)
        if line.startswith("SystemExit"):
            if not any("sigterm_handler" in b for b in block):
                out += block
            block = None
    return out + (block or [])


def filter_worker_logs(dispatcher=None) -> bool:
    """Pass the workers' forwarded output through :func:`without_sigterm_tracebacks` on its way to this
    console (Ray's ``ray_print_logs`` handler, wrapped). False, and nothing changed, where Ray has no
    such handler (``log_to_driver`` off, or a Ray whose internals moved)."""
    try:
        if dispatcher is None:
            from covid_tune.sweep.ray_internals import stdstream_dispatcher

            dispatcher = stdstream_dispatcher()
        printers = [h for name, h in dispatcher.handlers if name == "ray_print_logs"]
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    if len(printers) != 1 or getattr(printers[0], "_covid_tune_filtered", False):
        return False
    print_logs = printers[0]

    def filtered(data: dict) -> None:
        lines = without_sigterm_tracebacks(list(data.get("lines") or []))
        if lines:
            print_logs({**data, "lines": lines})

    filtered._covid_tune_filtered = True
    dispatcher.remove_handler("ray_print_logs")  # ray.shutdown removes it by this name, as its own
    dispatcher.add_handler("ray_print_logs", filtered)
    return True


def connect(address: str | None, cache_bytes: int = 0, quiet: bool = False) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``); with neither, start Ray locally.

    A local Ray's object store gets room for ``cache_bytes`` (the decoded cache and pretrained weights, one copy each)
    plus a quarter for what else travels through it, at least 512 MB: smaller would spill the cache
    to disk-backed memory. A cluster's nodes size their own. ``quiet``: Ray logs warnings and errors
    only (worker output, spilling and trial errors still reach this console; a stopping worker's
    SIGTERM traceback does not, :func:`filter_worker_logs`)."""
    global _connected_here
    if ray.is_initialized():
        return
    extra = _quiet_ray() if quiet else {}
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("ray://"):
        # Ray Client runs this driver here but Tune's storage, the exported models and the report on
        # the cluster: the paths would not match. A job (or a shell on the head) runs it where they do.
        raise ValueError(f"--address {address}: Ray Client (ray://) addresses are not supported; submit the "
                         "sweep as a job instead (ray job submit --address http://HEAD:8265 -- "
                         "covid-tune run SPEC), or run it on the head node with --address auto")
    if address:
        ray.init(address=address, log_to_driver=True, **extra)
    else:
        # address="local": a new Ray instance even when `ray start` (or a test cluster) recorded one
        # in /tmp/ray/ray_current_cluster, which ray.init() would otherwise silently join.
        ray.init(address="local", include_dashboard=False,
                 object_store_memory=max(MIN_OBJECT_STORE, int(cache_bytes * 1.25)), log_to_driver=True,
                 **extra)
    _connected_here = True
    if quiet:
        filter_worker_logs()


# whether :func:`connect` called ray.init in this process: a Ray the caller had started is theirs to stop
_connected_here = False


def disconnect() -> None:
    """Leave the Ray :func:`connect` joined or started (a local one stops, its processes with it); a Ray
    this process had already initialized before (a notebook, a script calling covid_tune) stays up."""
    global _connected_here
    if _connected_here:
        ray.shutdown()
        _connected_here = False


def models_travel(spec: Spec) -> bool:
    """Whether the exported models' folder may be invisible to the workers, so models travel through the
    object store: this sweep joined a cluster (:func:`on_cluster`: it may scale up onto other machines),
    or Ray spans several nodes. Call after :func:`connect`."""
    return on_cluster(spec) or len([n for n in ray.nodes() if n.get("Alive")]) > 1


def share(decoded: DecodedSplits | ray.ObjectRef | None) -> ray.ObjectRef | None:
    """Put the decoded cache in the object store once (call after :func:`connect`): passing the
    returned reference to :func:`covid_tune.sweep.tuning.run_sweep` and
    :func:`covid_tune.sweep.evaluation.evaluate_remote` keeps one copy per node for both."""
    return ray.put(decoded) if isinstance(decoded, DecodedSplits) else decoded  # a reference stays one


def start_shared(spec: Spec, decoded: DecodedSplits | ray.ObjectRef | None, states: dict[str, dict], quiet: bool = False
                 ) -> tuple[ray.ObjectRef | None, dict[str, ray.ObjectRef]]:
    """Connect to (or start) Ray with room for what the trials share, then put the decoded cache and
    each backbone's pretrained state_dict in the object store once. The driver's copies of the weights
    are dropped (``states`` is emptied): trials, resumed ones too, build their models from the store."""
    from covid_tune.models.weights import state_nbytes

    cache_bytes = decoded.nbytes if isinstance(decoded, DecodedSplits) else 0
    connect(spec.ray.address, cache_bytes + state_nbytes(states), quiet=quiet)
    refs = share(decoded), share_weights(states)
    states.clear()
    return refs


def share_weights(states: dict[str, dict]) -> dict[str, ray.ObjectRef]:
    """Put each backbone's pretrained state_dict (:func:`covid_tune.models.weights.load_all`) in the object store
    once (call after :func:`connect`). Trials fetch theirs from there, so no node needs the file or a
    network; the driver may drop its copies afterwards."""
    return {backbone: ray.put(state) for backbone, state in states.items()}


def on_cluster(spec: Spec) -> bool:
    """True when this sweep joined a running cluster (--address, RAY_ADDRESS, ray.address)."""
    return bool(spec.ray.address or os.environ.get("RAY_ADDRESS"))


def check_resources(spec: Spec) -> None:
    """Refuse a trial size that no node could ever hold (Tune would otherwise wait forever).

    Only checked on a local Ray: a cluster's autoscaler may still add GPU nodes.
    """
    if on_cluster(spec):
        return
    have = ray.cluster_resources()
    for name, want in (("CPU", spec.resources.cpus), ("GPU", spec.resources.gpu)):
        if want > have.get(name, 0):
            key = "resources.cpus" if name == "CPU" else "resources.gpu"
            raise ValueError(f"{key}={want:g} but this machine's Ray has {have.get(name, 0):g} {name}(s); "
                             f"use --set {key}={have.get(name, 0):g} or run on a cluster (--address)")


@ray.remote(num_cpus=0)
def _path_exists(path: str) -> bool:
    return os.path.exists(path)


PROBE_TIMEOUT_S = 60.0


def _local_storage_folder(spec: Spec) -> str | None:
    """The folder behind ``ray.storage_path`` when it is one (a path or a file:// URI), else None."""
    root = spec.storage_root
    if root.startswith("file://"):
        return root[len("file://"):] or "/"
    return None if spec.remote_storage else root


def check_shared_paths(spec: Spec, index: DatasetIndex) -> None:
    """On a multi-node cluster every node must see the data and the storage folder.

    Ray Tune no longer syncs trial results to the head node, so a folder that only the head has
    would scatter checkpoints over the workers' disks. A probe task on each live node checks
    (nodes the autoscaler adds later are not probed: use shared or cloud storage up front).
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    data_key = "data.root" if spec.data.root else "data.synthetic (generated under the output folder)"
    probes = {data_key: (str(index.root), next(iter(index.paths("train")), str(index.root)))}
    storage = _local_storage_folder(spec)
    if storage is not None:
        Path(storage).mkdir(parents=True, exist_ok=True)
        marker = Path(storage) / f".covid_tune-probe-{uuid.uuid4().hex}"
        marker.write_text("probe")
        probes["ray.storage_path"] = (spec.storage_root, str(marker))
    try:
        for key, (shown, path) in probes.items():
            refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: _path_exists.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
                for n in nodes}
            blind = []
            for name, ref in refs.items():
                try:
                    seen = ray.get(ref, timeout=PROBE_TIMEOUT_S)
                except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as exc:
                    # a node that just died or cannot run a task now: not evidence either way
                    log.warning(f"could not check {key} on node {name}: {type(exc).__name__}")
                    continue
                if not seen:
                    blind.append(name)
            if blind:
                raise ValueError(
                    f"{key} {shown} is not visible from node(s) {', '.join(blind)}. On a multi-node cluster "
                    "Ray Tune no longer syncs trial results to the head node, so a folder only the head has "
                    "would scatter checkpoints over the workers' disks: put ray.storage_path on a shared "
                    "filesystem (NFS, ...) or use a cloud URI (s3://..., gs://...), and data.root on a shared "
                    "filesystem (or the same path on every node, e.g. a cluster.yaml file_mount).")
    finally:
        if "ray.storage_path" in probes:
            Path(probes["ray.storage_path"][1]).unlink(missing_ok=True)


def cluster_resources() -> dict[str, float]:
    """CPUs and GPUs of the Ray this driver is connected to."""
    have = ray.cluster_resources()
    return {"CPU": have.get("CPU", 0.0), "GPU": have.get("GPU", 0.0)}
