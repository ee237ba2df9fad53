"""Best-epoch selection: which epoch of a trial becomes its configuration's model.

Validation accuracy on a couple of hundred images swings by several points from one epoch to the
next, so the raw argmax is partly noise. ``best`` takes the raw argmax (the course's way); ``ema``
and ``mean3`` take the argmax of a smoothed curve (an exponential moving average, or the mean of
each epoch with its two neighbours), so an epoch wins only if the epochs around it were good too.
Ties go to the earliest epoch.

:func:`best_of` is the one rule every choice of covid_tune follows (an epoch of a trial, a seed of a
configuration, a configuration of the sweep): the best score wins, the earliest of equals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

SELECT_RULES = ("best", "ema", "mean3")
EMA_ALPHA = 0.5  # weight of the newest epoch: about a 3-epoch memory
# how many later epochs an epoch's smoothed score depends on: a trial keeps the weights of every epoch
# whose score may still change (its latest ones), so that the best of the final scores is never gone
LOOKAHEAD = {"best": 0, "ema": 0, "mean3": 1}


def best_of(items: Iterable[T], score: Callable[[T], float | None], mode: str) -> T | None:
    """The item with the best ``score`` (highest for ``mode`` "max", lowest for "min"), the earliest of
    equals; items scored None are skipped; None when no item scores."""
    best, best_score = None, None
    for item in items:
        s = score(item)
        if s is not None and (best_score is None or (s > best_score if mode == "max" else s < best_score)):
            best, best_score = item, s
    return best


def top(items: Iterable[T], score: Callable[[T], float | None], mode: str, k: int) -> list[T]:
    """The ``k`` best items by ``score``, best first: :func:`best_of` taken again over what is left, so
    ties go exactly as it breaks them (the earliest of equals). Items scored None are left out."""
    left, out = list(items), []
    while len(out) < k:
        i = best_of(range(len(left)), lambda j: score(left[j]), mode)
        if i is None:
            break
        out.append(left.pop(i))
    return out


def smooth(values: list[float], rule: str, alpha: float = EMA_ALPHA) -> list[float]:
    """``values`` (one per epoch, in order) smoothed by ``rule``."""
    if rule == "best":
        return list(values)
    if rule == "ema":
        out, acc = [], None
        for v in values:
            acc = v if acc is None else alpha * v + (1 - alpha) * acc
            out.append(acc)
        return out
    if rule == "mean3":
        n = len(values)
        return [sum(values[max(0, i - 1):i + 2]) / len(values[max(0, i - 1):i + 2]) for i in range(n)]
    raise ValueError(f"unknown selection rule {rule!r} (allowed: {', '.join(SELECT_RULES)})")


def pick_epoch(history: list[dict], metric: str, mode: str, rule: str = "best",
               candidates: Iterable[int] | None = None) -> int | None:
    """The epoch whose (smoothed) ``metric`` is best; only among ``candidates`` (e.g. the epochs whose
    checkpoint still exists) when given. ``history``: one dict per epoch with ``epoch`` and ``metric``."""
    rows = sorted((r for r in history if r.get(metric) is not None), key=lambda r: r["epoch"])
    if not rows:
        return None
    scores = smooth([float(r[metric]) for r in rows], rule)
    allowed = None if candidates is None else set(candidates)
    picked = best_of([(r["epoch"], s) for r, s in zip(rows, scores) if allowed is None or r["epoch"] in allowed],
                     lambda es: es[1], mode)
    return None if picked is None else picked[0]


def score_at(history: list[dict], metric: str, rule: str, epoch: int) -> float | None:
    """The (smoothed) ``metric`` value of ``epoch``: what :func:`pick_epoch` compared."""
    rows = sorted((r for r in history if r.get(metric) is not None), key=lambda r: r["epoch"])
    scores = smooth([float(r[metric]) for r in rows], rule)
    return next((s for r, s in zip(rows, scores) if r["epoch"] == epoch), None)
