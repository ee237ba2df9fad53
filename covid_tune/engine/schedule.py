"""Per-freeze-level ASHA grace periods, without Ray.

Ray's ASHA has one grace period per scheduler. ``scheduler.grace_period`` may instead map each freeze
level to its own grace (in epochs): a trial then reports ``asha_time = epoch * g_min / g_level``
(``g_min`` the smallest grace of the mapping, ``g_level`` its level's) and ASHA counts time in it with
grace ``g_min``, so a level's first cut falls at its own grace epoch and every later rung at
``g_level * reduction_factor**k`` epochs. Trials of different levels that meet at a rung are compared
there: a from-scratch level judged at epoch 8 against a frozen one at epoch 4. With an int grace
nothing changes: ASHA counts epochs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

Grace = int | Mapping[str, int]

TIME_ATTR = "asha_time"


def is_per_level(grace: Grace) -> bool:
    """True when ``grace`` maps freeze levels to their own grace periods."""
    return isinstance(grace, Mapping)


def min_grace(grace: Grace) -> int:
    """ASHA's own grace period: the int, or the smallest of the mapping."""
    return min(grace.values()) if is_per_level(grace) else int(grace)


def grace_of(grace: Grace, freeze: str) -> int:
    """The grace period (epochs) of a trial at freeze level ``freeze``."""
    return int(grace[freeze]) if is_per_level(grace) else int(grace)


def time_attr(grace: Grace) -> str:
    """The result key ASHA counts time in: ``epoch``, or ``asha_time`` for a per-level grace."""
    return TIME_ATTR if is_per_level(grace) else "epoch"


def asha_time(epoch: int, grace: Grace, freeze: str) -> float:
    """``epoch`` in ASHA's time units for a trial at ``freeze``: ``epoch * g_min / g_level``."""
    return epoch * min_grace(grace) / grace_of(grace, freeze)


def time_metrics(epoch: int, grace: Grace, freeze: str) -> dict[str, float]:
    """What a trial adds to each epoch's report: ``{"asha_time": ...}`` for a per-level grace, else nothing."""
    return {TIME_ATTR: asha_time(epoch, grace, freeze)} if is_per_level(grace) else {}


def parse_grace(value: object) -> Grace:
    """``scheduler.grace_period`` as given: a whole number >= 1, or a mapping of such numbers (ValueError else)."""
    def whole(v: object, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where}{v!r} is not a whole number of epochs (allowed: an int >= 1, or "
                             "{freeze_level: int >= 1, ...})")
        if v < 1:
            raise ValueError(f"{where}{v} should be greater than or equal to 1")
        return v

    if isinstance(value, Mapping):
        return {str(k): whole(v, f"{k}: ") for k, v in value.items()}
    return whole(value, "")


def grace_problems(grace: Grace, levels: Iterable[str], epochs: int) -> list[str]:
    """What is wrong with ``grace`` for a grid of freeze ``levels`` and ``epochs`` epochs ([] if nothing).

    A mapping needs an entry for every freeze level of the grid, no other key, and values 1..epochs."""
    levels = list(dict.fromkeys(levels))
    if not is_per_level(grace):
        if grace > epochs:
            return [f"scheduler.grace_period ({grace}) exceeds trainer.epochs ({epochs})"]
        return []
    problems = []
    if not grace:
        return [f"scheduler.grace_period: the mapping is empty (allowed keys: {', '.join(levels)})"]
    for key, value in grace.items():
        if key not in levels:
            problems.append(f"scheduler.grace_period.{key}: {key!r} is not a freeze level of the grid "
                            f"(allowed: {', '.join(levels)})")
        elif not 1 <= value <= epochs:
            problems.append(f"scheduler.grace_period.{key}: {value} is outside 1-{epochs} "
                            f"(allowed: 1-{epochs}, trainer.epochs)")
    missing = [lv for lv in levels if lv not in grace]
    if missing:
        problems.append(f"scheduler.grace_period: no grace for freeze level(s) {', '.join(missing)} "
                        f"(a mapping needs every freeze level of the grid: {', '.join(levels)})")
    return problems


def asha_rungs(grace_period: float, reduction_factor: float, max_t: float, bracket: int = 0) -> list[float]:
    """The times at which bracket ``bracket`` of Ray's ASHA judges trials (its formula), earliest first."""
    n = int(math.log(max_t / grace_period) / math.log(reduction_factor) - bracket + 1)
    return [grace_period * reduction_factor ** (k + bracket) for k in range(max(n, 0))]


def rungs_by_level(grace: Grace, reduction_factor: float, max_t: int, epochs: int,
                   levels: Iterable[str]) -> dict[str, list[int]]:
    """The epochs at which ASHA (one bracket) judges a trial of each freeze level, ascending, up to ``epochs``.

    ASHA's rungs are ``g_min * rf**k`` (up to ``max_t``) in its time units; a level reaches rung r at
    epoch ``r * g_level / g_min``, acted on at the first whole epoch at or past it."""
    g = min_grace(grace)
    out = {}
    for level in dict.fromkeys(levels):
        scale = grace_of(grace, level) / g
        at = {math.ceil(r * scale - 1e-9) for r in asha_rungs(g, reduction_factor, max_t)}
        out[level] = sorted(e for e in at if e <= epochs)
    return out


def rungs_text(grace: Grace, reduction_factor: float, max_t: int, epochs: int, levels: Iterable[str]) -> str:
    """``; per freeze level: fc_only 2, 4, 8; none 6, 12`` for a per-level grace, else ``""``."""
    if not is_per_level(grace):
        return ""
    per = rungs_by_level(grace, reduction_factor, max_t, epochs, levels)
    return "; per freeze level: " + "; ".join(f"{lv} {', '.join(map(str, r)) or '-'}" for lv, r in per.items())


def rung_epochs(grace: Grace, reduction_factor: float, max_t: int, epochs: int, levels: Iterable[str]) -> list[int]:
    """Every epoch at which ASHA judges some trial (one bracket), over all freeze levels, ascending."""
    return sorted(set().union(*rungs_by_level(grace, reduction_factor, max_t, epochs, levels).values()))
