"""Fine-tune a checkpoint on a few labelled slices of the user's own scans.

The one fine-tuning path: ``medconddiff finetune``, the Python API below and the napari widget's
Fine-tune button all build a :class:`FinetuneRun`, which trains with the same
:class:`~medconddiff.train.Trainer`, data pipeline and weight transfer as ``medconddiff train
--init`` (architecture and plan from the start checkpoint; class-dependent layers re-initialised
when the class list differs). Like a segmentation run it is iterable: iterate to train, stop
iterating to cancel; the weights of the last completed step are kept and can be saved.

    run = finetune("default", [LabelledScan("scan", image, meta, labels, slices=[40, 52, 61])],
                   class_names=("background", "lesion"), steps=300)
    for event in run: ...                 # TrainStep events: step, total_steps, losses
    run.save("scan_finetuned.safetensors")
    segmenter = run.segmenter()           # re-segment the rest of the scan with it

Reproducible: the same inputs and ``seed`` give the same weights (on the same device and torch).
The saved checkpoint records what it was fine-tuned from (path, SHA-256) and on which slices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import ExperimentConfig
from .datasets import Case, TrainingSlices
from .experiment import training_config
from .nifti import VolumeMeta

#: Optimisation defaults for a few slices: short warm-up, EMA that follows a few hundred steps.
FINETUNE_DEFAULTS = dict(lr=3e-4, warmup_steps=20, ema_decay=0.98, train_batch_size=4, val_every=0,
                         foreground_crop_fraction=0.7)


@dataclass
class LabelledScan:
    """A scan (file order, channels last if several), its labels (file order) and the canonical
    slices (along the start checkpoint's slicing direction) whose labels are to be learned."""

    name: str
    image: np.ndarray
    meta: Optional[VolumeMeta]
    labels: np.ndarray
    slices: Sequence[int]


class FinetuneRun:
    """An iterable fine-tuning run (see the module docstring)."""

    def __init__(self, start: Checkpoint, config: ExperimentConfig, scans: Sequence[LabelledScan], *,
                 device: str = "auto", log: Callable[[str], None] = print):
        from .train import Trainer

        if not scans or not any(len(s.slices) for s in scans):
            raise ValueError("no labelled slices to fine-tune on")
        self.start = start
        self.config = config
        self.scans = list(scans)
        cases = []
        for scan in self.scans:
            meta = scan.meta if scan.meta is not None else VolumeMeta.identity(known=False)
            if scan.labels.shape != scan.image.shape[:3]:
                raise ValueError(f"{scan.name}: labels {scan.labels.shape} do not match the scan {scan.image.shape[:3]}")
            top = int(scan.labels.max()) if scan.labels.size else 0
            if top >= config.model.num_classes:
                raise ValueError(f"{scan.name}: label {top} has no class name (classes: "
                                 f"{', '.join(config.model.class_names)}); name every label value")
            cases.append(Case(scan.name, scan.image, scan.labels.astype(np.uint8), meta))
        slices_by_case = {scan.name: sorted({int(i) for i in scan.slices}) for scan in self.scans}
        train_set = TrainingSlices(cases, config.plan, config.train.patch_size, slices_by_case=slices_by_case,
                                   augment=config.train.augment,
                                   foreground_fraction=config.train.foreground_crop_fraction)
        # No output folder: the run only writes where save() is told to.
        self.trainer = Trainer(config, train_set, None, device=device, log=log, init_from=start,
                               provenance=self.provenance())
        self.started = time.perf_counter()
        self.completed_steps = 0
        self._iterator: Optional[Iterator] = None

    def provenance(self) -> dict:
        return {
            "finetuned_from": {"path": str(self.start.path) if self.start.path else None, "sha256": self.start.sha256,
                               "classes": list(self.start.config.model.class_names)},
            "finetuned_on": [{"scan": s.name, "source": (s.meta.source if s.meta is not None else None),
                              "slices": sorted(int(i) for i in s.slices)} for s in self.scans],
            "trained_on": [s.name for s in self.scans],
        }

    @property
    def total_steps(self) -> int:
        return self.config.train.epochs * self.trainer.iterations_per_epoch()

    def __iter__(self):
        if self._iterator is None:
            self._iterator = self._generate()
        return self._iterator

    def _generate(self):
        from .train import TrainStep

        for event in self.trainer.iterate():
            if isinstance(event, TrainStep):
                self.completed_steps = event.step
                yield event

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the fine-tuned weights (EMA of the completed steps) as a checkpoint, atomically."""
        extra = {**self.provenance(), "steps": self.completed_steps, "steps_planned": self.total_steps,
                 "seconds": round(time.perf_counter() - self.started, 1),
                 "history": self.trainer.history[-50:],
                 "reinitialised": sorted({k.rsplit(".", 1)[0] for k in self.trainer.reinitialised})}
        return save_checkpoint(path, self.trainer.weights_to_save(), self.config, extra=extra, overwrite=overwrite)

    def segmenter(self, device: Optional[str] = None):
        """A Segmenter with the fine-tuned weights (a copy: training may go on without changing it)."""
        import copy

        from .segmenter import Segmenter

        model = copy.deepcopy(self.trainer.weights_to_save())
        return Segmenter(model, self.config, device=device or self.trainer.device)


#: What a scan's channels are, as the widget offers it: the start model's kind, or a named kind whose
#: intensity scheme the plan takes (CT: the HU window; anything else: per-scan z-scores).
SCAN_KINDS = ("model", "CT", "MRI", "other")


def channel_names_of_kind(kind: str, start_channels: Sequence[str]) -> Optional[tuple[str, ...]]:
    """Channel names that say a scan's ``kind`` (one of :data:`SCAN_KINDS`) for a model whose channels
    are ``start_channels``; None for "model" (keep the start model's channels and scheme)."""
    if kind not in SCAN_KINDS:
        raise ValueError(f"scan kind must be one of {', '.join(SCAN_KINDS)}, not {kind!r}")
    if kind == "model":
        return None
    label = "image" if kind == "other" else kind
    count = len(start_channels)
    return (label,) if count == 1 else tuple(f"{label} {i + 1}" for i in range(count))


def finetune_config(start: Checkpoint, *, class_names: Optional[Sequence[str]] = None,
                    channel_names: Optional[Sequence[str]] = None, steps: int = 300,
                    seed: int = 0, augment: bool = True, batch_size: Optional[int] = None,
                    lr: Optional[float] = None, log: Callable[[str], None] = print) -> ExperimentConfig:
    """The start checkpoint's architecture and plan, the new class list, and a short schedule.

    ``channel_names`` say what the scan's channels are when they are not what the start model took
    (e.g. ``("T1",)`` for a CT model): a channel of another kind than the start model's (CT or not)
    gets the intensity scheme of its kind (CT: the HU window; others: per-scan z-scores).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    train = {**FINETUNE_DEFAULTS, "epochs": 1, "iterations_per_epoch": int(steps), "train_seed": int(seed),
             "augment": bool(augment)}
    if batch_size is not None:
        train["train_batch_size"] = int(batch_size)
    if lr is not None:
        train["lr"] = float(lr)
    train["warmup_steps"] = min(train["warmup_steps"], max(1, steps // 5))
    return training_config(flags={"train": train}, start=start, class_names=class_names,
                           channel_names=channel_names, dataset_label="the class and channel names given", log=log)


def finetune(start: str | Path | Checkpoint | None, scans: Sequence[LabelledScan], *,
             class_names: Optional[Sequence[str]] = None, channel_names: Optional[Sequence[str]] = None,
             steps: int = 300, seed: int = 0, augment: bool = True,
             batch_size: Optional[int] = None, lr: Optional[float] = None, device: str = "auto",
             log: Callable[[str], None] = print) -> FinetuneRun:
    """A fine-tuning run from ``start`` (a checkpoint, its path, or a bundled name; None = default).

    ``class_names`` (background first) default to the start checkpoint's; label values beyond them
    need names. ``channel_names`` default to the start checkpoint's; name them when the scan is of
    another kind (an MRI for a CT model: see :func:`finetune_config`). Nothing is trained until the
    run is iterated.
    """
    checkpoint = start if isinstance(start, Checkpoint) else load_checkpoint(start, allow_legacy=True)
    config = finetune_config(checkpoint, class_names=class_names, channel_names=channel_names, steps=steps,
                             seed=seed, augment=augment, batch_size=batch_size, lr=lr, log=log)
    return FinetuneRun(checkpoint, config, scans, device=device, log=log)
