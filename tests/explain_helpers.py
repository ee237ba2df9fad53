"""A finished sweep written without Ray: real training runs, Tune's trial-folder layout, then report.build."""

from __future__ import annotations

import json
from pathlib import Path

from covid_tune.data.dataset import scan_dataset
from covid_tune.engine.training import TrainingRun
from covid_tune.report import build as report_mod
from covid_tune.spec import plan as plan_mod
from covid_tune.spec.load import validate
from covid_tune.sweep.trainable import save_checkpoint


def fake_sweep(raw: dict, epochs: int | None = None) -> Path:
    """Train every planned configuration in this process, lay out its trial folder as Tune does
    (params.json, result.json, checkpoint_*/), and build the report from it. Returns the output folder."""
    spec = validate(raw)
    out = spec.output_dir
    report_mod.save_spec(out, spec)
    root = report_mod.dataset_root(spec)
    if spec.data.synthetic is not None:
        from covid_tune.data.synthetic import make_synthetic

        s = spec.data.synthetic
        make_synthetic(root, s.classes, {"train": s.train, "validation": s.validation, "test": s.test},
                       s.image_size, s.seed)
    index = scan_dataset(root, spec.data.class_map, spec.data.on_bad_file)
    for i, (cid, hp) in enumerate(plan_mod.expand(spec).items()):
        trial = spec.experiment_dir / f"trial_{i:03d}"
        trial.mkdir(parents=True)
        (trial / "params.json").write_text(json.dumps({"config_id": cid}))
        run = TrainingRun(hp, index)
        with (trial / "result.json").open("w") as f:
            for _ in range(epochs or hp.epochs):
                metrics = run.run_epoch()
                ckpt = trial / f"checkpoint_{run.epoch - 1:06d}"
                ckpt.mkdir()
                save_checkpoint(run, metrics, ckpt)
                f.write(json.dumps(metrics) + "\n")
    (out / "trials.json").write_text(json.dumps({cid: {"status": "ok"} for cid in plan_mod.expand(spec)}))
    report_mod.build(out, spec, index=index)
    return out


def make_corner_marker_data(root: Path, counts: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """Two classes with the same lung-like centre (data.synthetic_image's 'normal' pattern); only class
    ``marked`` carries a bright square in the top-left corner, outside the central box: a pure shortcut."""
    import numpy as np
    from PIL import Image

    from covid_tune.data.dataset import SPLITS
    from covid_tune.data.synthetic import synthetic_image

    for s_i, split in enumerate(SPLITS):
        for c_i, cls in enumerate(("marked", "plain")):
            rng = np.random.default_rng([seed, s_i, c_i])
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                img = synthetic_image(rng, size, 0)
                if cls == "marked":
                    m = max(2, size // 8)
                    img[m // 2 + 1: m // 2 + 1 + m, m // 2 + 1: m // 2 + 1 + m] = 255
                Image.fromarray(img, "L").save(folder / f"{cls}_{i:03d}.png")
    return root
