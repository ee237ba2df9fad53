"""What a trial's checkpoint holds of its model: only the part that training changes.

A frozen prefix never moves (``requires_grad=False``, its BatchNorm layers kept in eval mode), so
a checkpoint keeps :func:`~covid_tune.models.registry.trained_state` (trainable parameters and the buffers of
the unfrozen part) and a digest of the frozen part. Whoever loads it first rebuilds the model's
initial state with the same :func:`covid_tune.engine.training.build_model` call the trial made (seeded by the
trial's seed, with its weights), then lays the saved part over it: an ``fc_only`` resnet18
checkpoint is ~1 MB instead of ~90 MB. The digest catches a rebuild that does not give the weights
the trial was trained from (another weights file, another torch version's random init).

Full-model checkpoints (written before this format) still load.

A trial keeps its latest checkpoint (the whole training state, for resume) and, beside it in the same
folder, the weights of the epoch selected so far when that is an earlier one (:data:`SELECTED_FILE`:
the model entries only, no optimizer state); a finished trial's state loses its optimizer state
(:func:`finished_state`) and, once its chosen epoch is exported (``OUTPUT/best/<config_id>/model.pt``),
its model entries too (:func:`released`): both files keep their epoch, the report finds the same
epoch again and reads its weights from best/, and no weights are on disk twice.
"""

from __future__ import annotations

import torch
from torch import nn

from covid_tune.models.freeze import Classifier, trained_state

# a trial checkpoint folder: the state (torch.save) and the epoch's metrics (JSON); Ray-free so that
# results and report read checkpoints without importing Ray
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
SELECTED_FILE = "selected.pt"  # the selected earlier epoch's model entries and its "epoch"
FINISHED_KEY = "finished"  # set in a finished trial's state, whose optimizer state was dropped
EXPORTED_KEY = "exported"  # set in a finished trial's files whose weights went: best/<config_id>/ holds them
RESUME_ONLY = ("optimizer", "torch_rng", "cuda_rng")  # what only going on training needs
PART_KEY = "model_part"
TRAINED = "trained"  # the value of PART_KEY in a checkpoint that holds only the trained part
DIGEST_KEY = "frozen_digest"
DIGEST_RTOL = 1e-6  # float64 sums over the same tensors on another device differ in the last bits only


class FrozenPartMismatch(ValueError):
    """The model rebuilt to load a checkpoint is not the one the checkpoint was trained from."""


def frozen_digest(model: Classifier) -> list[float]:
    """(element count, sum of |x|, sum of x^2) over the frozen part, in float64: cheap, and any other
    initial weights (another seed, another file) change it far beyond :data:`DIGEST_RTOL`."""
    trained = trained_state(model).keys()
    frozen = [v for k, v in model.state_dict().items() if k not in trained]
    if not frozen:
        return [0.0, 0.0, 0.0]
    # tensor by tensor: one float64 copy of the whole frozen part (88 MB for resnet18) made the first
    # checkpoint of an fc_only trial cost 0.2-0.7 s; the sums agree with it to ~1e-14
    count = abs_sum = square_sum = 0.0
    for t in frozen:
        flat = t.detach().reshape(-1).to("cpu", torch.float64)
        count, abs_sum, square_sum = count + flat.numel(), abs_sum + float(flat.abs().sum()), \
            square_sum + float(torch.dot(flat, flat))
    return [count, abs_sum, square_sum]


def model_state(model: Classifier, digest: list[float] | None = None) -> dict:
    """The model entries of a checkpoint: the trained part, the marker, the frozen part's digest."""
    return {"model": trained_state(model), PART_KEY: TRAINED,
            DIGEST_KEY: digest if digest is not None else frozen_digest(model)}


MODEL_KEYS = ("model", PART_KEY, DIGEST_KEY)


def model_entries(state: dict) -> dict:
    """The model entries of a training state (what :func:`load_model_state` reads), without the rest."""
    return {k: state[k] for k in MODEL_KEYS if k in state}


def released(state: dict) -> dict:
    """``state`` (a finished trial's, or its :data:`SELECTED_FILE`) without its model entries, marked
    :data:`EXPORTED_KEY`: what is left once the exported model holds the weights that matter."""
    return {**{k: v for k, v in state.items() if k not in MODEL_KEYS}, EXPORTED_KEY: True}


def finished_state(state: dict) -> dict:
    """``state`` of a trial that trains no more: the model and epoch, without optimizer and RNG states."""
    return {**{k: v for k, v in state.items() if k not in RESUME_ONLY}, FINISHED_KEY: True}


def is_slim(state: dict) -> bool:
    return state.get(PART_KEY) == TRAINED


def load_model_state(model: nn.Module, state: dict) -> None:
    """Load a checkpoint's model entries into ``model`` (built as the trial built it, see module doc).

    A slim checkpoint must name exactly the trained part (no missing or unexpected key) and the
    rebuilt frozen part must match its digest; a full one loads as a plain state_dict.
    """
    if not is_slim(state):
        model.load_state_dict(state["model"])
        return
    expected = trained_state(model).keys()
    saved = state["model"].keys()
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise FrozenPartMismatch(f"checkpoint's trained part does not fit this model (freeze level changed?): "
                                 f"missing {missing[:5]}, unexpected {extra[:5]}")
    want, have = state.get(DIGEST_KEY), frozen_digest(model)
    if want is not None and not all(abs(a - b) <= DIGEST_RTOL * max(abs(a), abs(b), 1.0) for a, b in zip(want, have)):
        raise FrozenPartMismatch(
            "the frozen layers rebuilt for this checkpoint differ from those it was trained with (digest "
            f"{have} != {want}): the weights, the seed or the torch version changed since it was written")
    model.load_state_dict(state["model"], strict=False)
