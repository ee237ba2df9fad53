"""What the engine's tests share: the CPU device, the tiny configuration they vary, the synthetic tree's sizes.

``SYNTHETIC`` sizes conftest's module-scoped ``index`` and ``decoded`` fixtures (a synthetic tree
decoded at 32 px) for a test module that imports it.
"""

from __future__ import annotations

import torch

from covid_tune.engine.hparams import HParams

CPU = torch.device("cpu")
# a tiny CNN at 32 px, nothing frozen, no augmentation: each test replaces what it is about
TINY_HP = HParams(backbone="tiny_cnn", freeze="none", loss="ce", image_size=32, batch_size=8, head_hidden=8,
                  augment=False, lr=0.05)
SYNTHETIC = {"counts": {"train": 20, "validation": 8, "test": 2}, "image_size": 36, "decoded_size": 32}
