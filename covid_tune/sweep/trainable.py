"""The Ray Tune function trainable: one report (metrics + checkpoint) per epoch."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import ray
import torch
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from covid_tune.data.cache import DecodedSplits
from covid_tune.data.dataset import DatasetIndex
from covid_tune.data.loaders import as_tensor
from covid_tune.engine.checkpoints import METRICS_FILE, RESUME_ONLY, SELECTED_FILE, STATE_FILE, model_entries
from covid_tune.engine.hparams import HParams
from covid_tune.engine.schedule import Grace, time_metrics
from covid_tune.engine.training import TrainingRun, default_device
from covid_tune.results import selection
from covid_tune.spec.plan import with_trial_values

FEATURES_ACTOR = "covid_tune-features"  # + sweep name + node id: one feature registry per sweep and node
# a detached actor needs a named namespace (in the driver's anonymous one Ray warns on stdout)
FEATURES_NAMESPACE = "covid_tune"
CLAIM_WAIT_S = 900.0  # how long a trial waits for another one computing the same features before it computes
T = TypeVar("T")


def save_state(state: dict, metrics: dict, directory: Path, selected: dict | None = None) -> None:
    """What one checkpoint directory holds: the full training state, that epoch's metrics and, when the
    epoch selected so far is an earlier one, its model entries (``selected``, with its ``epoch``)."""
    torch.save(state, directory / STATE_FILE)
    (directory / METRICS_FILE).write_text(json.dumps(metrics))
    if selected is not None:
        torch.save(selected, directory / SELECTED_FILE)


def save_checkpoint(run: TrainingRun, metrics: dict, directory: Path, kept: Kept | None = None) -> None:
    """:func:`save_state` of ``run``'s current state (and of ``kept``'s selected weights)."""
    state = run.state_dict()
    if kept is not None:
        state["selection"] = kept.record()
    save_state(state, metrics, directory, kept.selected_file(run.epoch) if kept is not None else None)


def snapshot(state: Any) -> Any:
    """A deep copy of a state dict with every tensor copied to the CPU (safe to save while training goes on)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


class Kept:
    """The weights a trial keeps besides its latest state: those of the epoch selected so far.

    Selected as :func:`covid_tune.results.collect.best_epoch` will select at the end (``metric``, ``mode``,
    ``rule``), among the epochs whose smoothed score is final (all but the last
    :data:`~covid_tune.results.selection.LOOKAHEAD` ones), so the epoch picked over the whole history
    is always either this one or the latest, whose weights are in the latest checkpoint. Each new
    selection is copied to the CPU; a rule that looks ahead also holds the previous epoch's copy.
    """

    def __init__(self, metric: str, mode: str, rule: str) -> None:
        self.metric, self.mode, self.rule = metric, mode, rule
        self.lookahead = selection.LOOKAHEAD[rule]
        self.scores: list[dict] = []  # {"epoch", metric} per epoch so far
        self.epoch: int | None = None  # the selected epoch
        self.weights: dict | None = None  # its model entries, on the CPU
        self.recent: list[tuple[int, dict]] = []  # the last ``lookahead`` epochs' model entries

    def update(self, run: TrainingRun, metrics: dict) -> None:
        """After epoch ``metrics['epoch']`` (``run`` holding its weights): the selection so far."""
        epoch = int(metrics["epoch"])
        self.scores = [r for r in self.scores if r["epoch"] < epoch] + [
            {"epoch": epoch, self.metric: metrics.get(self.metric)}]
        # a copy of this epoch's weights only where they may be needed later
        current = snapshot(model_entries(run.state_dict())) if self.lookahead else None
        held = dict(self.recent)
        final = [e for e in [*held, epoch] if e <= epoch - self.lookahead]
        candidates = final + ([self.epoch] if self.epoch is not None else [])
        picked = selection.pick_epoch(self.scores, self.metric, self.mode, self.rule, candidates)
        if picked is not None and picked != self.epoch:
            self.epoch = picked
            self.weights = held[picked] if picked in held else (
                current if current is not None else snapshot(model_entries(run.state_dict())))
        if self.lookahead:
            self.recent = [*self.recent, (epoch, current)][-self.lookahead:]

    def record(self) -> dict:
        """What the training state stores to go on selecting after a resume."""
        return {"scores": self.scores, "epoch": self.epoch}

    def selected_file(self, latest: int) -> dict | None:
        """:data:`SELECTED_FILE`'s content: the selected weights, None when they are the latest's."""
        if self.epoch is None or self.epoch == latest:
            return None
        return {**self.weights, "epoch": self.epoch}

    def restore(self, run: TrainingRun, record: dict | None, selected: dict | None) -> None:
        """Resume from a checkpoint's ``record`` and :data:`SELECTED_FILE` (``run`` already loaded)."""
        if not record:
            return
        self.scores, self.epoch = list(record["scores"]), record["epoch"]
        current = snapshot(model_entries(run.state_dict()))
        self.weights = current if self.epoch == run.epoch or selected is None else selected
        self.recent = [(run.epoch, current)] if self.lookahead else []


class _NextEpoch:
    """``run.run_epoch()`` on a daemon thread, so it trains while the previous epoch is being reported.

    ``tune.report`` waits for Tune's driver to take the result and persists the checkpoint (a copy
    of the model and optimizer state): time in which nothing would train. When Tune stops the trial
    (ASHA) the epoch in flight is cut short with ``run.request_stop()``. Not a daemon thread: a
    worker that exits while a daemon thread is inside a torch operation aborts ("Fatal Python error")
    instead of exiting, so the exit waits for the epoch's next batch boundary instead.
    """

    def __init__(self, run: TrainingRun) -> None:
        self._out: dict = {}
        self._thread = threading.Thread(target=self._work, args=(run,), daemon=False, name="covid_tune-epoch")
        self._thread.start()

    def _work(self, run: TrainingRun) -> None:
        try:
            self._out["metrics"] = run.run_epoch()
        except BaseException as exc:  # re-raised in the trial's own thread by result()
            self._out["error"] = exc

    def join(self) -> None:
        self._thread.join()

    def result(self) -> dict:
        self._thread.join()
        if "error" in self._out:
            raise self._out["error"]
        return self._out["metrics"]


@ray.remote(num_cpus=0)
class FeatureRegistry:
    """One node's shared feature caches of a sweep: key -> reference to the prefix outputs.

    The references are of objects this actor put, so they outlive the trial that computed them
    (an object belongs to the worker that put it). A key being computed is *claimed*: a second
    trial asking for it waits for the first instead of computing it too. Detached, because an actor
    a trial creates otherwise ends with the trial's last handle to it (the next trial would compute
    again); :func:`release_feature_stores` ends the sweep's registries when the sweep ends.
    """

    def __init__(self) -> None:
        self._refs: dict[str, ray.ObjectRef] = {}
        self._pending: dict[str, asyncio.Event] = {}
        self.computed = 0

    async def claim(self, key: str, wait_s: float) -> list | None:
        """``[ref]`` when ``key`` is there (in a list, so Ray hands over the reference, not the value);
        None when the caller is to compute it: nobody is, or the one who was has not published in time."""
        while key not in self._refs:
            if key not in self._pending:
                self._pending[key] = asyncio.Event()
                return None
            try:
                await asyncio.wait_for(self._pending[key].wait(), wait_s)
            except asyncio.TimeoutError:
                return None
        return [self._refs[key]]

    async def publish(self, key: str, arrays: list) -> None:
        self._refs[key] = ray.put(arrays)  # a copy owned by this actor (arrays are an argument's zero-copy view)
        self.computed += 1
        self._release(key)

    async def abandon(self, key: str) -> None:
        """The claimant failed or was stopped: a waiting trial claims the key next."""
        self._release(key)

    async def count(self) -> int:
        """How many feature caches were published (computed) on this node."""
        return self.computed

    def _release(self, key: str) -> None:
        event = self._pending.pop(key, None)
        if event is not None:
            event.set()


def _to_arrays(tensors: tuple[torch.Tensor, ...]) -> list:
    # numpy arrays go through the object store without a copy on the reading side; bf16 has no numpy
    # dtype, so it travels as its bits
    out = []
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        out.append((str(t.dtype), (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()))
    return out


def _from_arrays(arrays: list) -> tuple[torch.Tensor, ...]:
    out = []
    for dtype, array in arrays:
        t = as_tensor(np.asarray(array))
        out.append(t.view(torch.bfloat16) if dtype == str(torch.bfloat16) else t)
    return tuple(out)


class RayFeatureStore:
    """The engine's :class:`~covid_tune.engine.features.FeatureStore` in a Ray sweep: prefix outputs shared by
    the trials of this node through its :class:`FeatureRegistry` (created on first use, by name).

    Any Ray failure of the registry (an actor that died with the trial that made it) falls back to
    computing locally: sharing saves time, it is never needed for a result.
    """

    def __init__(self, sweep: str) -> None:
        self.sweep = sweep

    def registry(self) -> ray.actor.ActorHandle:
        node = ray.get_runtime_context().get_node_id()
        return FeatureRegistry.options(
            name=f"{FEATURES_ACTOR}-{self.sweep}-{node}", get_if_exists=True, lifetime="detached",
            namespace=FEATURES_NAMESPACE, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()

    def get_or_compute(self, key: str, compute: Callable[[], T]) -> T:
        try:
            registry = self.registry()
            got = ray.get(registry.claim.remote(key, CLAIM_WAIT_S))
            if got is not None:
                return _from_arrays(ray.get(got[0]))
        except ray.exceptions.RayError:
            return compute()
        try:
            value = compute()
        except BaseException:
            registry.abandon.remote(key)
            raise
        try:
            ray.get(registry.publish.remote(key, _to_arrays(value)))
        except ray.exceptions.RayError:
            pass  # nobody to share with: this trial still has its own
        return value


def release_feature_stores(sweep: str) -> int:
    """End the feature registries of ``sweep`` on every node (what they hold goes with them); how many."""
    prefix = f"{FEATURES_ACTOR}-{sweep}-"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == FEATURES_NAMESPACE and a["name"].startswith(prefix)]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=FEATURES_NAMESPACE))
        except ValueError:  # already gone
            pass
    return len(names)


def pretrained_state(hp: HParams, pretrained: dict[str, ray.ObjectRef] | None) -> dict | None:
    """The trial's pretrained state_dict, fetched from the driver's object-store copy (None for none).

    Never read from this worker's disk or the network: a fresh node needs no TORCH_HOME.
    """
    if hp.weights == "none":
        return None
    if not pretrained or hp.backbone not in pretrained:
        raise RuntimeError(f"trial {hp.group}: trainer.weights={hp.weights} but the driver shipped no state_dict for "
                           f"{hp.backbone} (tuning.run_sweep resolves them; pass pretrained=share_weights(...))")
    return ray.get(pretrained[hp.backbone])


def train_trial(config: dict, plan: dict[str, HParams], index: DatasetIndex, cpus: float, gpu: float,
                decoded: DecodedSplits | None = None,
                pretrained: dict[str, ray.ObjectRef] | None = None, grace: Grace = 1,
                share_features: str | None = None, select: tuple[str, str, str] = ("val_loss", "min", "best")) -> None:
    """Train ``plan[config['config_id']]`` (with the settings ``config`` carries), resuming from Tune's last
    checkpoint when there is one.

    ``decoded`` (the sweep's decoded cache, from Ray's object store: zero-copy, read-only, one copy
    per node) selects the tensor pipeline; without it the trial decodes with PIL. Each epoch's
    metrics also say which paths ran: ``decoded_cache``, ``feature_cache``, ``augmented``, ``gpu`` (0/1),
    and ``node_id``, the Ray node training it (hostname and IP, which Tune adds, do not tell apart
    several nodes on one machine).
    ``pretrained`` maps each backbone to its state_dict's reference (:func:`covid_tune.sweep.cluster.share_weights`);
    a resumed trial builds its model from it too before loading its checkpoint.
    ``grace`` is ``scheduler.grace_period``: a per-freeze-level one adds ``asha_time`` to each report.
    ``share_features`` (the sweep's name) makes trials of one node that share a frozen prefix and its
    inputs compute its feature cache once (:class:`RayFeatureStore`); None: each trial its own.
    ``select`` (metric, mode, rule) is how the best epoch is chosen: each checkpoint also holds the
    weights of the epoch selected so far (:class:`Kept`), so that only the latest checkpoint is needed.

    Epoch k + 1 trains while epoch k is reported (and, on a GPU, while its state, copied to the CPU
    as soon as it ended, is written); the checkpoint of epoch k holds exactly the state after epoch k.
    """
    # a searcher's samples (optuna) arrive in the config, not in the plan
    hp = with_trial_values(plan[config["config_id"]], config)
    torch.set_num_threads(max(1, int(cpus)))
    store = RayFeatureStore(share_features) if share_features else None
    run = TrainingRun(hp, index, default_device(use_gpu=gpu > 0), decoded=decoded,
                      pretrained=pretrained_state(hp, pretrained), features=store)
    node = {"node_id": ray.get_runtime_context().get_node_id()}
    kept = Kept(*select)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=run.device, weights_only=True)
            if RESUME_ONLY[0] not in state:  # a finished trial's (sweep.tuning drops its optimizer state)
                return
            run.load_state_dict(state)
            chosen = Path(d) / SELECTED_FILE
            kept.restore(run, state.get("selection"),
                         torch.load(chosen, map_location="cpu", weights_only=True) if chosen.is_file() else None)
    if run.epoch >= hp.epochs:
        return
    # a GPU trains on while the CPU writes, so copy the state and write it behind the next epoch; on a
    # CPU the copy costs as much as the write and both take cores from training: write, then train on
    background_save = run.device.type == "cuda"
    pending = _NextEpoch(run)
    try:
        while True:
            metrics = {**pending.result(), **run.modes, **node}
            metrics.update(time_metrics(metrics["epoch"], grace, hp.freeze))
            last = run.epoch >= hp.epochs
            kept.update(run, metrics)
            with tempfile.TemporaryDirectory() as d:
                if background_save:
                    # before the next epoch touches weights or the RNG
                    state = {**snapshot(run.state_dict()), "selection": kept.record()}
                    selected = kept.selected_file(run.epoch)
                    if not last:
                        pending = _NextEpoch(run)
                    save_state(state, metrics, Path(d), selected)
                else:
                    save_checkpoint(run, metrics, Path(d), kept)
                    if not last:
                        pending = _NextEpoch(run)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))  # SystemExit when stopped
            if last:
                return
    finally:
        # stopped by the scheduler (tune.report raised SystemExit): end the epoch in flight at its next
        # batch and wait for it, so that no thread of this trial trains on in a worker that Tune may
        # reuse for another trial (reuse_actors)
        run.request_stop()
        pending.join()
