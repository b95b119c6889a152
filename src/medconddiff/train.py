"""Training loop for both model families, on CPU, one GPU, or many with ``torchrun`` (DDP).

Under ``torchrun`` every process trains on its own draws of the weighted slice sampler, gradients
are averaged by ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA), and rank 0 alone writes
checkpoints and logs. Checkpoints hold the EMA weights as the model, plus the raw weights and the
AdamW state (``aux.*`` tensors) so a run resumes where it stopped; Ctrl-C saves before exiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.utils.data import DataLoader, WeightedRandomSampler

from .checkpoint import (Checkpoint, CheckpointError, check_tensor_shapes, load_checkpoint, model_state,
                         save_checkpoint)
from .config import ExperimentConfig, SamplingConfig
from .datasets import Case, SliceRanges, TrainingSlices, range_indices
from .errors import UserInputError
from .families import build_model
from .losses import IGNORE_INDEX
from .schedulers import NoiseSchedule
from .segmenter import Segmenter, resolve_device
from .transfer import transfer_weights

Log = Callable[[str], None]

#: Optimizer steps in a row whose gradients may be non-finite (each skipped, the weights untouched) before
#: the run stops: a stray one (a bf16 overflow) is survived, a diverged run is not saved over its last epoch.
MAX_NONFINITE_STEPS = 5


class TrainingDiverged(UserInputError):
    """The loss or its gradients stayed non-finite: the weights were left as they were before."""


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group torchrun set up (env:// rendezvous); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def lr_schedule(optimizer: torch.optim.Optimizer, total: int, config) -> LRScheduler:
    """Linear warm-up from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then cosine decay
    to 5 % of ``lr`` at step ``total`` (where it stays: see :func:`follow_lr_schedule`).

    Built on the optimizer's current rate, which must be ``config.lr``.
    """
    warmup = config.warmup_steps
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=0.05 * config.lr)
    if warmup == 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def follow_lr_schedule(schedule: LRScheduler, step: int, total: int, config) -> None:
    """Bring ``schedule`` (and its optimizer's rate) to optimizer step ``step``: one step per call in a
    run, all the steps done before in a resumed one. Past the cosine's end the rate stays at its floor."""
    end = config.warmup_steps + max(1, total - config.warmup_steps)
    with warnings.catch_warnings():
        # A resumed run catches up before its first optimizer step, which torch would warn about.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        while schedule.last_epoch < min(step, end):
            schedule.step()


def lr_at(step: int, total: int, config) -> float:
    """The learning rate of optimizer step ``step`` of ``total`` under :func:`lr_schedule`."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    schedule = lr_schedule(optimizer, total, config)
    follow_lr_schedule(schedule, step, total, config)
    return float(optimizer.param_groups[0]["lr"])


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"aux.optim.{index}.{name}"] = torch.as_tensor(value)
    return tensors


def _restore_optimizer(optimizer: torch.optim.Optimizer, state_dict: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith("aux.optim."):
            index, name = key[len("aux.optim."):].split(".", 1)
            state.setdefault(int(index), {})[name] = value.float() if name != "step" else value
    current = optimizer.state_dict()
    current["state"] = state
    optimizer.load_state_dict(current)


class Trainer:
    """Holds model, EMA, optimizer and data; ``fit()`` runs epochs until done or interrupted."""

    def __init__(self, config: ExperimentConfig, train_set: TrainingSlices, output_dir: Optional[Path], *,
                 device: str = "auto", validation: Optional["Validation"] = None, log: Log = print,
                 init_from: Optional[Checkpoint] = None, provenance: Optional[dict] = None):
        config.check_training()           # before a model is built, not when validation first runs epochs later
        self.config = config
        self.tc = config.train
        self.device = resolve_device(device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.output_dir = Path(output_dir) if output_dir is not None else None   # None: save() is not used
        self.provenance = dict(provenance or {})
        self.final_records: dict = {}   # what fit() adds to the final checkpoint (its consensus choice)
        self.log = log if self.dist.is_main else (lambda message: None)
        if init_from is not None and "upgraded_from_format" not in init_from.extra:
            # An edited config's widths would be allocated (gigabytes) before its tensors were found not to fit.
            check_tensor_shapes(init_from)     # (a medconddiff 0.1 file's tensors are transfer_weights' to match)
        torch.manual_seed(self.tc.train_seed)  # same initial weights on every rank
        self.model = build_model(config.model, in_channels=config.plan.input_channels).to(self.device)
        self.reinitialised: list[str] = []
        if init_from is not None:
            self.reinitialised = transfer_weights(self.model, init_from, log=self.log)
        self.schedule = NoiseSchedule(config.diffusion)
        self.train_set = train_set
        self.validation = validation
        self.generator = torch.Generator().manual_seed(self._draw_seed(0))
        self.model.prepare_training(train_set, self.tc, self.device, self.log)  # LSegDiff: its mask VAE
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # foreach: bit-identical to the single-tensor loop torch uses by default on the CPU, a third faster
        # there (the CUDA default already).
        self.optimizer = torch.optim.AdamW(self.trainable, lr=self.tc.lr, weight_decay=self.tc.weight_decay,
                                           foreach=True)
        self.ema = torch.optim.swa_utils.AveragedModel(
            self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(self.tc.ema_decay)) \
            if self.tc.ema_decay > 0 else None
        self.network: torch.nn.Module = _TrainingLoss(self.model)
        if self.dist.world_size > 1:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0
        self.epoch = 0
        self.history: list[dict] = []
        self.nonfinite_in_row = 0
        self._weights_before_step: Optional[list[torch.Tensor]] = None    # the undo of an optimizer step

    def _draw_seed(self, step: int) -> int:
        """The seed of the sampler's and the noise's draws from ``step`` on: each rank its own stream."""
        return self.tc.train_seed * 1000 + self.dist.rank + 7919 * step

    # -- data -----------------------------------------------------------------------------------
    def iterations_per_epoch(self) -> int:
        per_process = self.tc.train_batch_size
        return self.tc.iterations_per_epoch or max(1, len(self.train_set) // (per_process * self.dist.world_size))

    def loader(self) -> DataLoader:
        count = self.iterations_per_epoch() * self.tc.train_batch_size
        if self.tc.class_weighted_sampling:
            weights = self.train_set.class_slice_weights(self.model.num_classes)
        else:
            weights = torch.ones(len(self.train_set))
        sampler = WeightedRandomSampler(weights, count, replacement=True, generator=self.generator)
        return DataLoader(self.train_set, batch_size=self.tc.train_batch_size, sampler=sampler,
                          num_workers=self.tc.num_workers, drop_last=True)

    # -- checkpoints ----------------------------------------------------------------------------
    def weights_to_save(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def save(self, name: str, *, metrics: Optional[dict] = None, half: bool = False,
             records: Optional[dict] = None) -> Optional[Path]:
        """Write the weights (EMA if kept), config and training state; ``records`` go into ``extra`` too."""
        if not self.dist.is_main:
            return None
        if self.output_dir is None:
            raise ValueError("this trainer has no output folder to save checkpoints in")
        aux = {f"aux.raw.{k}": v for k, v in self.model.state_dict().items()} if self.ema is not None else {}
        if self.ema is not None:     # how many updates the average holds: 0 would restart it from the raw weights
            aux["aux.ema.n_averaged"] = self.ema.n_averaged.detach().clone()
        aux.update(_optimizer_tensors(self.optimizer))
        extra = {**self.provenance, "epoch": self.epoch, "step": self.step, "history": self.history[-200:],
                 "metrics": metrics or {}, "world_size": self.dist.world_size,
                 "reinitialised": sorted({k.rsplit(".", 1)[0] for k in self.reinitialised}), **(records or {})}
        return save_checkpoint(self.output_dir / name, self.weights_to_save(), self.config, extra=extra,
                               half=half, tensors=None if half else aux)

    def resume(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        # The pretrained backbone file a run began from is no part of the model (resumed weights replace it).
        if dataclasses.replace(checkpoint.config.model, backbone_weights=None) != \
                dataclasses.replace(self.config.model, backbone_weights=None):
            raise CheckpointError(f"{path} was trained with another model config; cannot resume it with this one")
        step, epoch, history = _training_state(checkpoint)
        state = checkpoint.state_dict
        if self.ema is not None:
            self.ema.module.load_state_dict(model_state(checkpoint))
            raw = {k[len("aux.raw."):]: v.float() if v.is_floating_point() else v
                   for k, v in state.items() if k.startswith("aux.raw.")}
            self.model.load_state_dict(raw if raw else model_state(checkpoint))
            # The average goes on from where it was (a checkpoint from before this record: it holds at least one).
            averaged = state.get("aux.ema.n_averaged")
            held = int(averaged) if averaged is not None else max(1, step)
            self.ema.n_averaged.fill_(held)
        else:
            self.model.load_state_dict(model_state(checkpoint))
        _restore_optimizer(self.optimizer, state)
        self.step = step
        # Draws go on from the step reached, not from the run's first ones again.
        self.generator.manual_seed(self._draw_seed(self.step))
        self.epoch = epoch
        self.history = history
        self.log(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

    # -- loop -----------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.tc.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _follow_lr_schedule(self, total_steps: int) -> None:
        """The optimizer's rate for step ``self.step``; the schedule is built once the total is known."""
        if getattr(self, "_lr_schedule", None) is None or self._lr_total != total_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self.tc.lr
                group.pop("initial_lr", None)
            self._lr_schedule, self._lr_total = lr_schedule(self.optimizer, total_steps, self.tc), total_steps
        follow_lr_schedule(self._lr_schedule, self.step, total_steps, self.tc)

    def train_step(self, image: torch.Tensor, labels: torch.Tensor, total_steps: int) -> dict[str, float]:
        self._follow_lr_schedule(total_steps)
        image, labels = image.to(self.device), labels.to(self.device)
        self.network.train()
        with self._autocast():
            losses = self.network(image, labels, self.schedule, self.generator, self.tc.dice_weight,
                                  self.tc.ce_weight, self.tc.ignore_fill, self.tc.xt_dropout)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        # The norm of the gradients, which every process holds alike after the all-reduce: all skip together.
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.step += 1
        if not torch.isfinite(norm):
            # A NaN would pass through AdamW and the EMA into every weight, and be saved over the last epoch.
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.log(f"step {self.step}: the loss or its gradients are not finite; step skipped, weights unchanged")
            if self.nonfinite_in_row >= MAX_NONFINITE_STEPS:
                raise TrainingDiverged(f"training diverged: {self.nonfinite_in_row} steps in a row had a non-finite "
                                       "loss or gradients (weights kept from before them); lower --lr, or train "
                                       "without mixed precision")
            return {k: float(v.detach()) for k, v in losses.items()}
        self.nonfinite_in_row = 0
        self._step_keeping_weights_finite()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return {k: float(v.detach()) for k, v in losses.items()}

    def _step_keeping_weights_finite(self) -> None:
        """``optimizer.step()``, undone (and the run stopped) where it left a weight NaN or infinite: finite
        gradients can still overflow a weight (a huge learning rate or weight decay), and the EMA and every
        later checkpoint would inherit it."""
        params = [p.detach() for p in self.trainable]
        if self._weights_before_step is None:
            self._weights_before_step = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self._weights_before_step, params)
        self.optimizer.step()
        # One fused norm per tensor (a tenth of the time of a check per tensor): NaN or infinite where a weight is
        # (or where weights beyond 1e19 overflow its squares: no less broken).
        if params and not bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all()):
            torch._foreach_copy_(params, self._weights_before_step)
            raise TrainingDiverged(f"training diverged: optimizer step {self.step} made weights NaN or infinite "
                                   "(weights kept from before it); lower --lr or --weight-decay")

    def validate(self) -> dict:
        if self.validation is None or not self.dist.is_main:
            return {}
        segmenter = Segmenter(self.weights_to_save(), self.config, device=self.device)
        dice = self.validation.dice(segmenter, SamplingConfig(steps=self.tc.val_steps))
        return {f"val_dice_{name}": round(d, 4) for name, d in dice.items()}

    def consensus_record(self) -> dict:
        """The trained weights' consensus choice and step cap, measured on the validation slices
        (:func:`~medconddiff.consensus_choice.choose_consensus`): ``{EXTRA_KEY: record}`` for the final
        checkpoint's ``extra``, so ``consensus="auto"`` uses what this model's own held-out slices
        support. Empty without validation slices, and on every rank but the first."""
        if self.validation is None or not self.dist.is_main:
            return {}
        from .consensus_choice import EXTRA_KEY, choose_consensus

        segmenter = Segmenter(self.weights_to_save(), self.config, device=self.device)
        scans = [scan for scan in self.validation.choosing_slices(segmenter) if len(scan.slices)]
        count = sum(len(scan.slices) for scan in scans)
        if not count:
            self.log("no validation slice holds a verified voxel: no consensus choice is recorded")
            return {}
        choice = choose_consensus(segmenter, scans, f"{count} validation slice(s) of {len(scans)} case(s), "
                                                    "not trained on")
        self.log(choice.describe())
        return {EXTRA_KEY: choice.to_dict()}

    def iterate(self) -> Iterator["TrainStep | EpochDone"]:
        """Train until ``epochs`` are done, yielding after every optimizer step and every epoch.

        A caller that stops iterating stops training after the step in progress; the model (and
        its EMA) then hold the weights of the last completed step.
        """
        total_steps = self.tc.epochs * self.iterations_per_epoch()
        started = time.perf_counter()
        while self.epoch < self.tc.epochs:
            epoch_losses = []
            for image, labels in self.loader():
                losses = self.train_step(image, labels, total_steps)
                epoch_losses.append(losses)
                yield TrainStep(self.step, total_steps, self.epoch, losses)
            self.epoch += 1
            record = {"epoch": self.epoch, "step": self.step,
                      "lr": round(self.optimizer.param_groups[0]["lr"], 7),
                      "seconds": round(time.perf_counter() - started, 1)}
            for key in epoch_losses[0]:
                finite = [losses[key] for losses in epoch_losses if np.isfinite(losses[key])]
                record[key] = round(float(np.mean(finite)), 5) if finite else float("nan")
            skipped = sum(not np.isfinite(losses["loss"]) for losses in epoch_losses)
            if skipped:
                record["skipped_steps"] = int(skipped)      # non-finite: no update (the loss means leave them out)
            if self.tc.val_every and self.epoch % self.tc.val_every == 0:
                record.update(self.validate())
            self.history.append(record)
            yield EpochDone(record)

    def describe(self) -> str:
        return (f"training {self.config.model.family} model on {len(self.train_set)} slices, "
                f"{self.tc.epochs} epochs × {self.iterations_per_epoch()} steps, device {self.device}, "
                f"{self.dist.world_size} process(es)")

    def _out_of_time(self, started: float, max_seconds: Optional[float]) -> bool:
        """Whether the time budget is spent, as the first process's clock says: every process stops after the
        same epoch (each by its own clock, one went on into an epoch the others never joined, and hung)."""
        if max_seconds is None:
            return False
        spent = time.perf_counter() - started > max_seconds
        if self.dist.world_size > 1:
            decision = torch.tensor([1.0 if spent else 0.0], device=self.device)
            dist.broadcast(decision, src=0)
            spent = bool(decision.item())
        return spent

    def fit(self, max_seconds: Optional[float] = None) -> Path:
        """Train to the end (or the time budget), saving ``last`` every epoch and ``final`` at the end."""
        started = time.perf_counter()
        self.log(self.describe())
        try:
            for event in self.iterate():
                if not isinstance(event, EpochDone):
                    continue
                self.log(json.dumps(event.record))
                self.save("last.safetensors", metrics=event.record)
                if self._out_of_time(started, max_seconds):
                    self.log(f"time budget of {max_seconds:.0f} s reached after epoch {self.epoch}")
                    break
        except KeyboardInterrupt:
            self.save("last.safetensors")
            self.log(f"interrupted: saved {self.output_dir / 'last.safetensors'} (resume with --resume)")
            raise
        self.final_records = self.consensus_record()
        final = self.save("final.safetensors", metrics=self.history[-1] if self.history else {},
                          records=self.final_records)
        self.log(f"saved {final}")
        return self.output_dir / "final.safetensors"


#: The most optimizer steps (or epochs) a resumed run's record may claim: far beyond any run, far below where
#: the per-step seeds (train_seed * 1000 + 7919 * step) leave the generators' 64 bits.
MAX_RECORDED_STEPS = 10 ** 9


def _training_state(checkpoint: Checkpoint) -> tuple[int, int, list]:
    """``(step, epoch, history)`` a checkpoint's record holds to resume from (0, 0, [] where it has none); an
    edited or damaged record is a CheckpointError naming the file and the entry."""
    where = checkpoint.path.name if checkpoint.path else "the checkpoint"
    counts = []
    for key in ("step", "epoch"):
        value = checkpoint.extra.get(key, 0)
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or not 0 <= value <= MAX_RECORDED_STEPS:
            raise CheckpointError(f"{where}: its record's {key!r} must be a whole number from 0 to "
                                  f"{MAX_RECORDED_STEPS}, got {value!r}; resume from the last.safetensors a run wrote")
        counts.append(int(value))
    history = checkpoint.extra.get("history", [])
    if not isinstance(history, list) or not all(isinstance(record, dict) for record in history):
        raise CheckpointError(f"{where}: its record's 'history' must be a list of epoch records, got "
                              f"{type(history).__name__}; resume from the last.safetensors a run wrote")
    return counts[0], counts[1], list(history)


@dataclasses.dataclass
class TrainStep:
    """One optimizer step finished (``step`` of ``total_steps``), with its losses."""

    step: int
    total_steps: int
    epoch: int
    losses: dict[str, float]


@dataclasses.dataclass
class EpochDone:
    """An epoch finished: its mean losses, learning rate, time and validation Dice."""

    record: dict


class _TrainingLoss(torch.nn.Module):
    """The model's ``training_loss`` as a ``forward``, so DDP's gradient hooks fire through its wrapper."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, labels, schedule, generator, dice_weight, ce_weight, ignore_fill, xt_dropout
                ) -> dict[str, torch.Tensor]:
        return self.model.training_loss(image, labels, schedule, generator, dice_weight=dice_weight,
                                        ce_weight=ce_weight, ignore_fill=ignore_fill, xt_dropout=xt_dropout)


@dataclasses.dataclass
class Validation:
    """Held-out slices scored during training: the full inference path (Segmenter) on each case."""

    cases: Sequence[Case]
    ranges: SliceRanges

    def choosing_slices(self, segmenter: Segmenter) -> list:
        """Every case's validation slices (canonical indices along ``segmenter``'s plan) that hold a
        verified voxel, as :class:`~medconddiff.consensus_choice.ChoosingSlices`, voxels nobody checked
        marked :data:`IGNORE_INDEX` (scored in no figure): what :meth:`dice` and the consensus choice
        score. A slice nobody checked (a sparse training set's) scores nothing and is not counted."""
        from .consensus_choice import ChoosingSlices

        scans = []
        for case in self.cases:
            geometry = segmenter.preprocessor.geometry(case.image.shape, case.meta)
            slices = range_indices(self.ranges, geometry.n_slices, case.name)
            canonical = geometry.slice_view(case.labels)
            slices = [i for i in slices if (canonical[i] != IGNORE_INDEX).any()]
            scans.append(ChoosingSlices(case.image, case.labels, case.meta, slices, ignore_value=IGNORE_INDEX))
        return scans

    def dice(self, segmenter: Segmenter, sampling: SamplingConfig) -> dict[str, float]:
        """Dice per foreground class over all held-out slices (NaN for a class absent from both)."""
        names = segmenter.class_names
        hits = np.zeros(len(names))
        totals = np.zeros(len(names))
        for scan in self.choosing_slices(segmenter):
            slices = scan.slices
            result = segmenter.segment(scan.image, sampling, slices=slices, meta=scan.meta)
            predicted = result.slice_view(result.labels)[slices]
            reference = result.slice_view(scan.labels)[slices]
            predicted = np.where(reference == scan.ignore_value, 0, predicted)   # unverified voxels count nowhere
            for k in range(1, len(names)):
                p, r = predicted == k, reference == k
                hits[k] += 2 * np.logical_and(p, r).sum()
                totals[k] += p.sum() + r.sum()
        return {names[k]: float(hits[k] / totals[k]) if totals[k] else float("nan") for k in range(1, len(names))}


def build_datasets(config: ExperimentConfig, cases: Sequence[Case], train_ranges: SliceRanges = None,
                   val_ranges: SliceRanges = None) -> tuple[TrainingSlices, Optional[Validation]]:
    train_set = TrainingSlices(cases, config.plan, config.train.patch_size, train_ranges,
                               augment=config.train.augment,
                               foreground_fraction=config.train.foreground_crop_fraction, held_out=val_ranges)
    return train_set, (Validation(cases, val_ranges) if val_ranges else None)
