"""``search.algorithm: optuna`` on Ray Tune: one Ray Tune ``OptunaSearch`` (Optuna's TPE, seeded) per grid cell.

A single ``OptunaSearch`` draws from one space for the whole sweep; covid_tune keeps the listed axes a
full grid and draws ``search.samples`` settings per grid cell. :class:`CellSearch` is the thin Tune
``Searcher`` between them: it hands out the plan's slots (``{cell}-n{K}-s{seed}``) in plan order, asks
the cell's ``OptunaSearch`` once per group ``{cell}-n{K}`` and gives the same sample to every seed, and
tells that ``OptunaSearch`` the seeds' mean score (the last result of each, as Tune reports it) once they
all ended. No sampling of its own. Tune saves and restores it with its experiment state
(``searcher-state-*.pkl``), so a resumed sweep goes on with the slots not yet handed out.
"""

from __future__ import annotations

import json
import logging
import pickle
import zlib
from pathlib import Path

import optuna
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from covid_tune.engine.hparams import HParams
from covid_tune.spec.load import Spec
from covid_tune.spec.plan import cells, tune_params
from covid_tune.spec.sections import INTEGER_AXES, Distribution

log = logging.getLogger(__name__)


def tune_domain(dist: Distribution, integer: bool = False):
    """A spec distribution as Tune's sampling domain (what ``OptunaSearch`` converts to Optuna's)."""
    if dist.kind == "choice":
        return tune.choice(list(dist.args))
    lo, hi = dist.args
    if integer:  # Tune's integer domains exclude the upper bound
        return (tune.lograndint if dist.kind == "loguniform" else tune.randint)(int(lo), int(hi) + 1)
    return (tune.loguniform if dist.kind == "loguniform" else tune.uniform)(lo, hi)


def cell_seed(seed: int, cell: str) -> int:
    """The TPE sampler's seed of one grid cell: ``search.seed`` and the cell's name."""
    return (seed * 1_000_003 + zlib.crc32(cell.encode())) % 2**32


class CellSearch(Searcher):
    """Tune's searcher for ``search.algorithm: optuna``: one seeded ``OptunaSearch`` per grid cell (see the
    module doc). ``slots`` are the plan's trials in order, each ``(config_id, group, cell, fixed config)``."""

    def __init__(self, slots: list[tuple[str, str, str, dict]], space: dict, metric: str, mode: str,
                 seed: int) -> None:
        super().__init__(metric=metric, mode=mode)
        self._slots = list(slots)
        self._next = 0  # the first slot not handed out
        self._searchers: dict[str, OptunaSearch] = {}
        self._space, self._seed = space, seed
        self._sampled: dict[str, dict] = {}  # group -> its sample
        self._trials: dict[str, str] = {}  # Tune trial id -> group
        self._seeds: dict[str, int] = {}  # group -> its trials
        self._scores: dict[str, list] = {}  # group -> the ended trials' scores (None: failed)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        # the space is the searcher's own (param_space is empty); metric and mode are the spec's
        return True

    def _cell_search(self, cell: str) -> OptunaSearch:
        if cell not in self._searchers:
            sampler = optuna.samplers.TPESampler(seed=cell_seed(self._seed, cell))
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a "new study created" line per cell
            # Optuna's own distributions: given Tune's, OptunaSearch converts them itself but warns each time
            space = OptunaSearch.convert_search_space(self._space)
            self._searchers[cell] = OptunaSearch(space=space, metric=self.metric, mode=self.mode, sampler=sampler)
        return self._searchers[cell]

    def suggest(self, trial_id: str) -> dict | None:
        if self._next >= len(self._slots):
            return Searcher.FINISHED
        cid, group, cell, fixed = self._slots[self._next]
        self._next += 1
        if group not in self._sampled:
            self._sampled[group] = self._cell_search(cell).suggest(group)
            self._seeds[group] = sum(1 for s in self._slots if s[1] == group)
        self._trials[trial_id] = group
        return {**fixed, **self._sampled[group]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        group = self._trials.get(trial_id)
        if group is None:  # a trial this searcher did not hand out (restored from an older state)
            return
        score = (result or {}).get(self.metric)
        self._scores.setdefault(group, []).append(None if error else score)
        scores = self._scores[group]
        if len(scores) == self._seeds[group]:
            done = [s for s in scores if s is not None]
            cell = next(s[2] for s in self._slots if s[1] == group)
            self._cell_search(cell).on_trial_complete(
                group, {self.metric: sum(done) / len(done)} if done else None, error=not done)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        super().restore_from_dir(checkpoint_dir)
        # a trial that started after this state was saved is never handed out again
        started = set()
        for params in Path(checkpoint_dir).glob("*/params.json"):
            try:
                started.add(json.loads(params.read_text()).get("config_id"))
            except (OSError, ValueError):
                continue
        while self._next < len(self._slots) and self._slots[self._next][0] in started:
            log.warning(f"{self._slots[self._next][0]} had started after the searcher's state was saved: "
                        "not handed out again")
            self._next += 1


def cell_search(spec: Spec, plan: dict[str, HParams]) -> CellSearch:
    """The searcher of an optuna sweep: the plan's slots with their fixed settings, the spec's distributions."""
    fixed = tune_params(spec, plan)
    cell_of = {g: c for c, groups in cells(plan).items() for g in groups}
    slots = [(cid, h.group, cell_of[h.group], fixed[cid]) for cid, h in plan.items()]
    space = {a: tune_domain(d, a in INTEGER_AXES) for a, d in spec.grid.distributions().items()}
    return CellSearch(slots, space, spec.scheduler.metric, spec.scheduler.mode, spec.search.seed)
