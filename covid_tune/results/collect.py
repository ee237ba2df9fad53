"""Trials -> results: read Tune's trial folders, pick and export each configuration's best
checkpoint, evaluate it once, and assemble one result row per configuration.

Reads the experiment folder as files (``params.json``, ``result.json``, ``checkpoint_*/``), so
it needs no running Ray and works on interrupted sweeps too.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from covid_tune.data.augment import augment_label
from covid_tune.data.cache import DecodedSplits
from covid_tune.data.dataset import DatasetIndex, index_targets
from covid_tune.data.folds import fold_view
from covid_tune.data.loaders import TensorLoader, make_loader
from covid_tune.engine import training as engine
from covid_tune.engine.checkpoints import (
    EXPORTED_KEY,
    FINISHED_KEY,
    METRICS_FILE,
    SELECTED_FILE,
    STATE_FILE,
    is_slim,
    released,
)
from covid_tune.engine.explain import explain_split
from covid_tune.engine.files import EVAL_FILE, MODEL_META, MODEL_WEIGHTS, write_atomic
from covid_tune.engine.losses import build_loss
from covid_tune.engine.metrics import bootstrap_ci
from covid_tune.models.registry import IMAGENET_MEAN, IMAGENET_STD, freeze_label, load_exported, save_exported
from covid_tune.results import clinical, selection, stats
from covid_tune.spec.load import Spec
from covid_tune.spec.plan import with_trial_values
from covid_tune.spec.sections import TRAINER_AXES, ReportSpec

log = logging.getLogger(__name__)

HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "train_f1", "val_loss", "val_acc", "val_f1")
MODE_KEYS = engine.TrainingRun.MODE_KEYS  # which paths an epoch took (0/1)


@dataclass
class TrialRecord:
    """What one trial left on disk."""

    config_id: str
    trial_dir: Path
    # one row per reported epoch (HISTORY_KEYS, MODE_KEYS, time_total_s, hostname, node_ip, node_id)
    history: list[dict]
    checkpoints: dict[int, Path] = field(default_factory=dict)  # epoch -> checkpoint folder
    # epoch -> the file holding its weights: the folder's state.pt, or selected.pt for the selected epoch
    weights: dict[int, Path] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)  # checkpoints that did not load
    params: dict = field(default_factory=dict)  # params.json: the settings the trial was given (sampled ones too)


def _read_history(path: Path) -> list[dict]:
    rows: dict[int, dict] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a crash
            continue
        if "epoch" in r:
            rows[int(r["epoch"])] = {k: r.get(k) for k in HISTORY_KEYS + MODE_KEYS
                                     + ("time_total_s", "hostname", "node_ip", "node_id")}
    return [rows[e] for e in sorted(rows)]


def _checkpoint_epoch(folder: Path) -> int:
    """The epoch a checkpoint folder holds; raises if the folder is incomplete or unreadable."""
    metrics = json.loads((folder / METRICS_FILE).read_text())
    # memory-mapped: reads the archive's index and record headers, which a cut-off file lacks, not every tensor
    torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    return int(metrics["epoch"])


def _selected_epoch(folder: Path) -> int | None:
    """The epoch of the selected weights a checkpoint folder holds besides its own (None: none)."""
    path = folder / SELECTED_FILE
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def read_trial(config_id: str, trial_dir: Path, result_file: Path | None = None) -> TrialRecord:
    """One trial folder: its history (from ``result_file``, default the folder's result.json) and the
    checkpoints that load (each folder's own epoch and the selected epoch it carries)."""
    rec = TrialRecord(config_id, trial_dir, _read_history(result_file or trial_dir / "result.json"))
    folders = sorted(trial_dir.glob("checkpoint_*"))
    # a folder's own epoch first: an epoch whose own checkpoint is kept is read from it
    for read, name in ((_checkpoint_epoch, STATE_FILE), (_selected_epoch, SELECTED_FILE)):
        for folder in folders:
            try:
                epoch = read(folder)
            except Exception as exc:
                rec.broken.append(f"{folder / name}: {type(exc).__name__}: {exc}")
                continue
            if epoch is not None and epoch not in rec.weights:
                rec.checkpoints[epoch] = folder
                rec.weights[epoch] = folder / name
    return rec


def collect(experiment: Path) -> dict[str, TrialRecord]:
    """Every trial under a Tune experiment folder, keyed by config id."""
    records: dict[str, TrialRecord] = {}
    for params in sorted(Path(experiment).glob("*/params.json")):
        trial_dir = params.parent
        try:
            given = json.loads(params.read_text())
        except json.JSONDecodeError:  # a trial folder Tune was still creating when the sweep stopped
            continue
        cid = given.get("config_id")
        if cid is None:
            continue
        rec = read_trial(cid, trial_dir)
        rec.params = given
        if cid in records and len(records[cid].history) >= len(rec.history):
            continue
        records[cid] = rec
    return records


def best_epoch(rec: TrialRecord, metric: str, mode: str, rule: str = "best") -> int | None:
    """The epoch with the best ``metric`` (smoothed by ``rule``, :mod:`covid_tune.results.selection`) among those
    whose checkpoint exists (earliest on ties)."""
    return selection.pick_epoch(rec.history, metric, mode, rule, candidates=rec.checkpoints)


def export_best(rec: TrialRecord, hp: engine.HParams, classes: list[str], metric: str, mode: str,
                out_dir: Path, pretrained: dict | None = None, rule: str = "best") -> Path | None:
    """Write ``out_dir/<config_id>/model.pt`` + ``model.json`` for the trial's best epoch (by ``rule``).

    ``pretrained`` (the backbone's state_dict) rebuilds a slim checkpoint's frozen layers; without it
    they come from ``hp.weights`` as the driver resolves them (torchvision's cache or the file)."""
    epoch = best_epoch(rec, metric, mode, rule)
    if epoch is None:
        return None
    target = out_dir / rec.config_id
    meta_path = target / MODEL_META
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("epoch") == epoch:
        return target
    source = rec.weights.get(epoch, rec.checkpoints[epoch] / STATE_FILE)
    state = torch.load(source, map_location="cpu", weights_only=True)
    if state.get(EXPORTED_KEY):
        raise FileNotFoundError(f"{rec.config_id}: the weights of epoch {epoch} are kept in {target / MODEL_WEIGHTS} "
                                f"only (the finished trial's checkpoint {source} gave them up once exported), and "
                                f"{target / MODEL_META} is missing or names another epoch")
    row = next(r for r in rec.history if r["epoch"] == epoch)
    meta = {
        **asdict(hp), "config_id": rec.config_id, "classes": classes, "epoch": epoch,
        "metrics": {k: row[k] for k in HISTORY_KEYS if k != "epoch"},
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "preprocess": f"grayscale={hp.grayscale}; Resize(round({hp.image_size}*256/224)); CenterCrop({hp.image_size})",
        "source_checkpoint": str(rec.checkpoints[epoch]),
    }
    (target / EVAL_FILE).unlink(missing_ok=True)
    # a full state_dict whatever the checkpoint holds: the frozen layers are rebuilt for a slim one, and
    # stored apart, once for all configurations that share them (save_exported)
    full = engine.full_model_state(hp, len(classes), state, pretrained)
    frozen = [k for k in full if k not in state["model"]] if is_slim(state) else []
    save_exported(full, meta, target, frozen=frozen)
    return target


def release_exported(rec: TrialRecord, target: Path) -> int:
    """Once ``target`` (best/<config_id>/) holds a finished trial's chosen epoch, drop the model entries
    from the trial's checkpoint files (:func:`~covid_tune.engine.checkpoints.released`): the chosen
    weights are in ``target``, the others are never read again (nothing resumes a finished trial, the
    report picks the same epoch). Only a state marked finished (its optimizer state already dropped)
    is touched, each file replaced whole. Returns the bytes freed."""
    meta = target / MODEL_META
    if not (meta.is_file() and (target / MODEL_WEIGHTS).is_file()):
        return 0
    folders = sorted({rec.weights[e].parent for e in rec.weights})
    states = [f / STATE_FILE for f in folders if (f / STATE_FILE).is_file()]
    loaded = {p: torch.load(p, map_location="cpu", weights_only=True) for p in states}
    if not loaded or not all(s.get(FINISHED_KEY) for s in loaded.values()):
        return 0
    freed = 0
    for folder in folders:
        for path in (folder / STATE_FILE, folder / SELECTED_FILE):
            if not path.is_file():
                continue
            state = loaded.get(path) or torch.load(path, map_location="cpu", weights_only=True)
            if state.get(EXPORTED_KEY):
                continue
            before = path.stat().st_size
            buffer = io.BytesIO()
            torch.save(released(state), buffer)
            write_atomic(path, buffer.getvalue())
            freed += before - path.stat().st_size
    return freed


def _eval_loader(index: DatasetIndex, split: str, meta: dict, batch_size: int, device: torch.device,
                 decoded: DecodedSplits | None):
    """The split's evaluation crops: from the decoded cache where it holds the split (the same pixels as
    the PIL path, without decoding every file once more per configuration), else from the files."""
    if decoded is not None and split in decoded.arrays:
        targets = index_targets(index, split, meta["label_mode"], meta["implies"])
        return TensorLoader(decoded[split], targets, meta["image_size"], batch_size, device=device)
    return make_loader(index, split, meta["image_size"], batch_size, meta["label_mode"], meta["implies"],
                              grayscale=meta["grayscale"])


CLINICAL_KEYS = ("positive", "operating_point")  # report settings that change only the clinical block
LAYOUT_KEYS = ("top_k",)  # report settings that change no evaluation (which are made, not what each holds)


def evaluate_export(model_dir: str | Path, index: DatasetIndex, batch_size: int = 64,
                    decoded: DecodedSplits | None = None, explain: dict | None = None) -> dict:
    """Evaluate an exported model on train (no augmentation), validation and test; cached in eval.json.

    ``decoded`` (the sweep's decoded cache) serves the splits it holds (train and validation).
    On validation and test it also stores each image's outputs (``logits``) and targets (``y``); on test
    each image's class probabilities (``probs``, ``files``), the shortcut check and the Grad-CAM sample
    (:mod:`covid_tune.engine.explain`), as ``explain`` (``ReportSpec.model_dump()``, default: the spec's
    defaults) asks. ``clinical``: :func:`covid_tune.results.clinical.evaluate_scores` of those outputs,
    recomputed alone when only ``report.positive`` or ``report.operating_point`` changed."""
    model_dir = Path(model_dir)
    cache = model_dir / EVAL_FILE
    model, meta = load_exported(model_dir)
    explain = explain or ReportSpec().model_dump()
    settings = {k: v for k, v in explain.items() if k not in CLINICAL_KEYS + LAYOUT_KEYS}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if (cached.get("epoch") == meta["epoch"] and cached.get("explain_settings") == settings
                and "logits" in cached["splits"]["test"]):
            if cached.get("clinical_settings") != _clinical_settings(explain):
                _add_clinical(cached, meta, explain)
                _write_json(cache, cached)
            return cached
    if meta.get("fold") is not None:  # a fold's model: validation is its held-out fold (out-of-fold outputs)
        index, decoded = fold_view(index, decoded, meta["fold"])
    device = engine.default_device()
    model.to(device)
    loss_fn = build_loss(meta["loss"], meta["focal_alpha"], meta["focal_gamma"])
    if decoded is not None:
        try:
            decoded.check(index, meta["image_size"], meta["grayscale"])
        except ValueError:  # made for other settings or another index: decode from the files
            decoded = None
    out = {"epoch": meta["epoch"], "splits": {}, "explain_settings": settings}
    for split in ("train", "validation", "test"):
        loader = _eval_loader(index, split, meta, batch_size, device, decoded)  # test's is read again below
        res = engine.evaluate(model, loader, loss_fn, device, meta["label_mode"], meta["threshold"],
                              len(meta["classes"]))
        correct = (res.y_true == res.y_pred) if res.y_true.ndim == 1 else (res.y_true == res.y_pred).all(1)
        out["splits"][split] = {"loss": res.loss, **res.metrics, "n": int(len(res.y_true)),
                                "acc_ci95": list(bootstrap_ci(correct)), "correct": correct.astype(int).tolist()}
        if split != "train" and res.logits is not None:
            out["splits"][split].update(logits=res.logits.tolist(), y=res.y_true.astype(int).tolist())
    probs, out["shortcut"], out["cam"] = explain_split(model, meta, loader, index.labels("test"), index.paths("test"),
                                                       device, explain["shortcut_check"],
                                                       # Grad-CAM needs one backbone's layers: none for an ensemble
                                                       {**explain["gradcam"], "per_class": 0} if "ensemble" in meta
                                                       else explain["gradcam"])
    out["splits"]["test"].update(probs=probs, files=index.paths("test"))
    _add_clinical(out, meta, explain)
    _write_json(cache, out)
    return out


def _clinical_settings(explain: dict) -> dict:
    return {k: explain.get(k) for k in CLINICAL_KEYS}


def _add_clinical(ev: dict, meta: dict, explain: dict) -> None:
    """ROC/PR, operating point and calibration numbers of an evaluation (from its stored outputs)."""
    settings = _clinical_settings(explain)
    ev["clinical_settings"] = settings
    try:
        ev["clinical"] = clinical.evaluate_scores(ev["splits"], meta["classes"], meta["label_mode"],
                                                  settings["positive"], settings["operating_point"] or "youden")
    except (KeyError, ValueError) as exc:  # e.g. no outputs stored, or a positive class the data lacks
        log.warning(f"{meta.get('config_id')}: no ROC/calibration numbers ({exc})")
        ev["clinical"] = None


def _write_json(path: Path, content: dict) -> None:
    write_atomic(path, json.dumps(content))


def store_operating_point(model_dir: Path, result: dict | None) -> None:
    """Write the temperature and the operating point of an evaluation's ``clinical`` block into
    ``model.json`` (what ``covid-tune predict`` applies); on the driver, so shipped evaluations count too."""
    meta_path = Path(model_dir) / MODEL_META
    meta = json.loads(meta_path.read_text())
    new = dict(meta)
    if result:
        new["temperature"] = result["temperature"]
        new["operating_point"] = {"rule": result["rule"], "positive": result["positive"],
                                  "threshold": result["threshold"]}
    else:
        new.pop("temperature", None)
        new.pop("operating_point", None)
    if new != meta:
        write_atomic(meta_path, json.dumps(new, indent=2, sort_keys=True))  # as save_exported writes it


Evaluator = Callable[[list[Path], DatasetIndex], list[dict]]


def evaluate_locally(model_dirs: list[Path], index: DatasetIndex, explain: dict | None = None) -> list[dict]:
    return [evaluate_export(d, index, explain=explain) for d in model_dirs]


def evaluator_for(explain: dict) -> Callable[..., dict]:
    """:func:`evaluate_export` with the spec's ``report`` settings bound (a plain function, for Ray tasks)."""
    def evaluate(model_dir: str | Path, index: DatasetIndex, batch_size: int = 64,
                 decoded: DecodedSplits | None = None) -> dict:
        return evaluate_export(model_dir, index, batch_size, decoded, explain)
    return evaluate


def assemble(experiment: Path, plan: dict[str, engine.HParams], index: DatasetIndex, metric: str, mode: str,
             out_dir: Path, trial_status: dict[str, dict] | None = None,
             evaluator: Evaluator = evaluate_locally, rule: str = "best", asha: bool = True,
             top_k: int | None = None) -> list[dict]:
    """One row per planned configuration: best epoch (by ``metric`` smoothed by ``rule``), its validation
    score under that rule (``select_score``), exported checkpoint, train/val/test metrics.

    Every configuration with a checkpoint is exported; with ``top_k`` only the shortlist
    (:func:`covid_tune.results.stats.shortlist`, chosen on validation) is evaluated (``eval``), the rest
    carry ``shortlisted: False`` and their validation numbers from training only.

    ``stopped_early`` (ASHA cut it) only with ``asha``: a trial cut short otherwise is "interrupted"
    (trials.json) or "incomplete" (no trials.json), never stopped by ASHA."""
    records = collect(experiment)
    rows, to_eval = [], []
    for sr, (cid, hp) in enumerate(plan.items(), 1):
        rec = records.get(cid)
        if rec is not None:
            hp = with_trial_values(hp, rec.params)  # what a searcher sampled at run time
        # no trials.json: the sweep was interrupted before Tune finished
        status = (trial_status or {}).get(cid, {}).get("status", "incomplete")
        row = {"sr": sr, "config_id": cid, "group": hp.group, "backbone": hp.backbone, "freeze": hp.freeze,
               "layers": freeze_label(hp.backbone, hp.freeze), "loss": hp.loss, "seed": hp.seed, "fold": hp.fold,
               "epochs_max": hp.epochs, "epochs_trained": 0, "best_epoch": None, "select_score": None,
               "stopped_early": False,
               "status": status if rec else "not started", "checkpoint": None, "history": [],
               "node": None, "node_ip": None, "node_id": None, **dict.fromkeys(MODE_KEYS)}
        row.update({k: getattr(hp, k) for k in TRAINER_AXES}, augment=augment_label(hp.augment))
        if rec is not None:
            for problem in rec.broken:
                warnings.warn(f"{cid}: skipping unreadable checkpoint {problem}", stacklevel=2)
            row["history"] = rec.history
            row["epochs_trained"] = len(rec.history)
            last = rec.history[-1] if rec.history else {}
            row["node"] = last.get("hostname")
            row["node_ip"] = last.get("node_ip")
            row["node_id"] = last.get("node_id")
            row.update({k: last.get(k) for k in MODE_KEYS})
            row["stopped_early"] = asha and status == "ok" and 0 < len(rec.history) < hp.epochs
            target = export_best(rec, hp, index.classes, metric, mode, out_dir, rule=rule)
            if target is not None and status == "ok":
                release_exported(rec, target)  # best/ holds the weights that matter: none twice on disk
            if target is not None:
                row["best_epoch"] = json.loads((target / MODEL_META).read_text())["epoch"]
                row["select_score"] = selection.score_at(rec.history, metric, rule, row["best_epoch"])
                row["checkpoint"] = str(target / MODEL_WEIGHTS)
                to_eval.append((row, target))
        rows.append(row)
    if top_k is not None:
        keep = set(stats.shortlist(rows, metric, mode, top_k))
        for row in rows:
            row["shortlisted"] = row["config_id"] in keep
        to_eval = [(row, target) for row, target in to_eval if row["shortlisted"]]
    sources = source_groups(index, "test")
    if to_eval:
        for (row, target), ev in zip(to_eval, evaluator([t for _, t in to_eval], index)):
            row["eval"] = ev["splits"]
            row["shortcut"], row["cam"] = ev.get("shortcut"), ev.get("cam")
            row["clinical"] = ev.get("clinical")
            if ev.get("worker"):  # which worker evaluated it (a sweep's evaluator pool: pid and Ray node)
                row["eval_worker"] = ev["worker"]
            store_operating_point(target, row["clinical"])
            if sources is not None:
                row["test_by_source"] = accuracy_by_group(ev["splits"]["test"]["correct"], sources)
                scores = clinical.test_scores(row, row["clinical"]["positive"]) if (
                    row["clinical"] and row["clinical"]["label_mode"] == "single") else None
                if scores is not None:
                    row["auc_by_source"] = clinical.auc_by_source(*scores, sources)
    return rows


def source_groups(index: DatasetIndex, split: str, column: str = "source_dataset") -> list[str] | None:
    """Each image's ``column`` value from ``ROOT/manifest.csv`` (None when there is no such manifest)."""
    import pandas as pd

    manifest = index.root / "manifest.csv"
    if not manifest.is_file():
        return None
    table = pd.read_csv(manifest)
    if column not in table.columns or "file" not in table.columns:
        return None
    lookup = dict(zip(table["file"].astype(str), table[column].astype(str)))
    return [lookup.get(str(Path(p).relative_to(index.root)), "unknown") for p in index.paths(split)]


def accuracy_by_group(correct: list[int], groups: list[str]) -> dict[str, dict]:
    """Accuracy and count of per-sample 0/1 outcomes within each group."""
    out: dict[str, dict] = {}
    for g in sorted(set(groups)):
        hits = [c for c, gg in zip(correct, groups) if gg == g]
        out[g] = {"n": len(hits), "acc": sum(hits) / len(hits)}
    return out


def download_experiment(spec: Spec) -> Path:
    """Copy a remote (URI) experiment to ``spec.experiment_dir`` so results can be read as files."""
    import pyarrow.fs  # comes with ray[tune]; reads s3://, gs://, hdfs:// and file:// alike

    target = spec.experiment_dir
    target.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(spec.experiment_path, str(target))
    return target


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if len(arr) == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
