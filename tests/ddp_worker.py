"""Run under torchrun by test_train.py: a few DDP steps (stopped by a time budget that only the first rank
sees spent), then each rank writes a digest of its weights."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from medconddiff.datasets import Case, TrainingSlices
from medconddiff.train import Trainer
from tests.conftest import meta_1mm, tiny_config


def main(output: Path) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    labels = np.zeros((64, 64, 4), np.uint8)
    labels[16:48, 16:48] = 1
    labels[24:32, 24:32] = 2
    image = (labels * 100 + rng.normal(0, 10, labels.shape)).astype(np.float32)
    config = tiny_config()
    config.train.epochs = 3
    cases = [Case("synthetic", image, labels, meta_1mm())]
    train_set = TrainingSlices(cases, config.plan, config.train.patch_size)
    trainer = Trainer(config, train_set, output, device="cpu")
    # The first process's clock says the time budget is spent after epoch 1, the second's never would: both
    # must stop there (the second went on alone into epoch 2 and hung in its gradient sync).
    trainer.fit(max_seconds=0.0 if trainer.dist.rank == 0 else 1e9)
    digest = hashlib.sha256()
    for tensor in trainer.model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    (output / f"rank{trainer.dist.rank}_of_{trainer.dist.world_size}.txt").write_text(digest.hexdigest())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
