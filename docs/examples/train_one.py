"""One configuration trained and evaluated with covid_tune's engine alone: no Ray, no YAML.

    python docs/examples/train_one.py [OUTPUT_DIR]

Writes a tiny synthetic X-ray-like dataset into OUTPUT_DIR (default: a temporary folder, deleted at
the end), trains a tiny CNN on it at 32 px for a few epochs (seconds on a CPU) and prints the train and
validation metrics of every epoch, then the test split's, evaluated once with the last epoch's weights.
"""

import sys
import tempfile
from pathlib import Path

import torch

from covid_tune.data.dataset import scan_dataset
from covid_tune.data.loaders import make_loader
from covid_tune.data.synthetic import make_synthetic
from covid_tune.engine.hparams import HParams
from covid_tune.engine.training import TrainingRun, evaluate


def main(out: Path) -> None:
    root = make_synthetic(out / "data", ["infected", "normal"], {"train": 40, "validation": 16, "test": 16},
                          image_size=36, seed=0)
    index = scan_dataset(root)  # root/{train,validation,test}/<class>/*.png
    hp = HParams(backbone="tiny_cnn", freeze="none", loss="ce", epochs=6, lr=0.01, batch_size=8,
                 head_hidden=16, image_size=32, augment=False)
    run = TrainingRun(hp, index, torch.device("cpu"))  # model, optimizer, loss, train/validation loaders
    for _ in range(hp.epochs):
        m = run.run_epoch()  # train_one_epoch + evaluate on validation
        print(f"epoch {m['epoch']}: train loss {m['train_loss']:.3f} acc {m['train_acc']:.3f} | "
              f"val loss {m['val_loss']:.3f} acc {m['val_acc']:.3f} f1 {m['val_f1']:.3f}")
    test = make_loader(index, "test", hp.image_size, hp.batch_size, hp.label_mode, hp.implies)
    result = evaluate(run.model, test, run.loss_fn, run.device, hp.label_mode, hp.threshold, len(index.classes))
    print(f"test: loss {result.loss:.3f} acc {result.metrics['acc']:.3f} f1 {result.metrics['f1']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="covid_tune-example-") as tmp:
            main(Path(tmp))
