"""Fine-tune a checkpoint on a few labelled slices of the user's own scans.

The one fine-tuning path: ``medconddiff finetune``, the Python API below and the napari widget's
Fine-tune button all build a :class:`FinetuneRun`, which trains with the same
:class:`~medconddiff.train.Trainer`, data pipeline and weight transfer as ``medconddiff train
--init`` (architecture and plan from the start checkpoint; class-dependent layers re-initialised
when the class list differs). Like a segmentation run it is iterable: iterate to train, stop
iterating to cancel; the weights of the last completed step are kept and can be saved.

    run = finetune("default", [LabelledScan("scan", image, meta, labels, slices=[40, 52, 61])],
                   class_names=("background", "lesion"), steps=200)
    for event in run: ...                 # TrainStep events: step, total_steps, losses
    run.save("scan_finetuned.safetensors")
    segmenter = run.segmenter()           # re-segment the rest of the scan with it

A :class:`~medconddiff.training_set.TrainingSet` adds every verified voxel of every case it holds
(``finetune(start, [], training_set=TrainingSet.open(folder))``), next to the current scan's edits.
``replay`` mixes in slices the start model was trained on (:func:`bundled_replay`: the bundled
sample), a fixed share of every batch, and keeps the start model's classes in the class list, so
that growing the class list or adding scans does not wipe out what the start model did.

Reproducible: the same inputs and ``seed`` give the same weights (on the same device and torch).
The saved checkpoint records what it was fine-tuned from (path, SHA-256) and on which slices.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .class_match import class_index, merge_class_lists
from .config import ExperimentConfig, PreprocessPlan
from .consensus_choice import EXTRA_KEY as CONSENSUS_CHOICE_KEY
from .consensus_choice import ChoosingSlices, ConsensusChoice, choose_consensus
from .datasets import Case, TrainingSlices
from .errors import ConfigError, UserInputError
from .experiment import channel_order, training_config
from .finetune_steps import ONE_SCAN_FINETUNE_STEPS, SET_FINETUNE_STEPS, default_finetune_steps  # noqa: F401
from .label_values import whole_label_values
from .losses import IGNORE_INDEX
from .nifti import VolumeMeta
from .outputs import recorded_name

#: Optimisation defaults for a few slices: short warm-up, EMA that follows a few hundred steps, and x_t
#: dropout 0.8 (see :mod:`~medconddiff.xt_dropout`): at 0.5 one lung2 fine-tune's last three steps still
#: fell (0.567 → 0.517); at 0.8 no step of the four fine-tunes measured (lung2, MNI152; 2 seeds each) fell
#: more than 0.0011 below the one before it, and their held-out Dice rose (README).
FINETUNE_DEFAULTS = dict(lr=3e-4, warmup_steps=20, ema_decay=0.98, train_batch_size=4, val_every=0,
                         foreground_crop_fraction=0.7, xt_dropout=0.8)

def scans_learned_from(scans: Sequence["LabelledScan"], training_set=None) -> int:
    """How many scans a fine-tune learns from: every case of ``training_set`` (a
    :class:`~medconddiff.training_set.TrainingSet`), and every scan with slices to learn that is not one
    of them (a scan whose ``case`` the set holds is the same scan, and counts once)."""
    cases = set(training_set.cases) if training_set is not None else set()
    return len(cases) + sum(1 for scan in scans if len(scan.slices) and scan.case not in cases)


@dataclass
class LabelledScan:
    """A scan (file order, channels last if several), its labels (file order) and the canonical
    slices (along the start checkpoint's slicing direction) whose labels are to be learned."""

    name: str
    image: np.ndarray
    meta: Optional[VolumeMeta]
    labels: np.ndarray
    slices: Sequence[int]
    #: The training-set case this scan is, if the set a fine-tune learns from holds it (None: not in a set).
    case: Optional[str] = None

    def __post_init__(self) -> None:
        # Labels read with load_volume are float32: whole values are classes; 0.75 or -1 were cast to 0 or 255.
        self.labels = whole_label_values(self.labels, self.name)


#: The consensus of a fine-tuned model unless a held-back slice chooses another: trained with x_t dropout
#: 0.8, a fine-tune's trajectory rises until it settles, so its last step is its best (on all 6 held-out
#: fine-tune figures of the README, re-trained in this release's installation; the one-shot is 0.0001 above it
#: on one MNI152 slab), and means of earlier steps lag it (``mean`` by up to 0.063; README: "Do the diffusion
#: steps earn their cost?"). A two-scan training set trained for only 200 steps peaked at step 2–3 and then
#: fell, where ``mean`` was the better fusion; at :func:`default_finetune_steps`' 600 its steps rise to the
#: last or near it (README: "Corrections that add up").
FINETUNE_CONSENSUS = "last"

#: Share of every batch drawn from replayed start-model slices, when replay is asked for.
REPLAY_FRACTION = 0.25
#: Case name of the bundled sample (what the bundled models record in ``trained_on``).
BUNDLED_SAMPLE_CASE = "liver117_image"


@dataclass
class Replay:
    """Slices a start model was trained on, replayed during fine-tuning so it keeps what it knew.

    ``cases`` carry labels indexing ``class_names``; ``slices_by_case`` are canonical slices (along
    the start model's slicing) per case name; ``fraction`` of every batch comes from them.
    """

    cases: list[Case]
    class_names: tuple[str, ...]
    slices_by_case: dict[str, list[int]]
    fraction: float = REPLAY_FRACTION


def bundled_replay(start: Checkpoint, fraction: float = REPLAY_FRACTION) -> Replay:
    """The bundled sample's training slices (as the start checkpoint records them) with its labels,
    for a start model trained on that sample (both bundled models are)."""
    from .nifti import load_labels, load_volume, sample_label_path, sample_scan_path
    from .preprocess import ScanPreprocessor
    from .slice_lists import parse_slice_spec

    name = start.path.name if start.path else "the start checkpoint"
    if BUNDLED_SAMPLE_CASE not in (start.extra.get("trained_on") or []) or not start.extra.get("train_slices"):
        raise ConfigError(f"{name} was not trained on the bundled sample, so there is nothing of it to replay; "
                          "fine-tune without replay (or keep earlier cases in the training set)")
    if not 0 < fraction < 1:
        raise ConfigError(f"the replay fraction must be between 0 and 1, got {fraction}")
    image, meta = load_volume(sample_scan_path())
    labels, _ = load_labels(sample_label_path())
    n_slices = ScanPreprocessor(start.config.plan).geometry(image.shape, meta).n_slices
    slices = parse_slice_spec(str(start.extra["train_slices"]), "train_slices").indices(n_slices, where=name)
    case = Case(f"replay:{BUNDLED_SAMPLE_CASE}", image, labels.astype(np.uint8), meta)
    return Replay([case], tuple(start.config.model.class_names), {case.name: sorted(int(i) for i in slices)},
                  float(fraction))


class FinetuneRun:
    """An iterable fine-tuning run (see the module docstring)."""

    def __init__(self, start: Checkpoint, config: ExperimentConfig, scans: Sequence[LabelledScan], *,
                 device: str = "auto", log: Callable[[str], None] = print, training_set=None,
                 replay: Optional[Replay] = None, keep_known_classes: bool = False,
                 hold_back: bool = False):
        from .train import Trainer

        self.training_set = training_set
        self.log = log
        scans = list(scans)
        self.consensus_choice = ConsensusChoice(
            method=FINETUNE_CONSENSUS, basis="the fine-tune default (no corrected slice held back to choose it)",
            scans=0, slices=0)
        # Verified slices along this model's slicing (from the label files); the cases themselves are
        # loaded one at a time while the training slices are prepared, so a big set never sits in memory whole.
        set_names = training_set.cases if training_set is not None else []
        self.set_slices = {name: training_set.verified_slices(name, config.plan.slicing) for name in set_names}
        #: The corrected slice (of a scan or of a training-set case) that chooses the consensus, not trained on.
        self.held_back = held_back_slice(scans, hold_back, self.set_slices)
        if self.held_back is not None and self.held_back.case is None:
            position, held = self.held_back.position, self.held_back.slice
            scans[position] = dataclasses.replace(scans[position],
                                                  slices=[i for i in scans[position].slices if int(i) != held])
        elif self.held_back is not None:
            case = self.held_back.case
            self.set_slices[case] = [i for i in self.set_slices[case] if i != self.held_back.slice]
        set_cases = (_read_as_hounsfield_checked(
            dataclasses.replace(self._set_case(name, training_set, config), name=f"set:{name}"),
            config.plan) for name in set_names if self.set_slices[name])
        if not any(self.set_slices.values()) and (not scans or not any(len(s.slices) for s in scans)):
            raise UserInputError("no labelled slices to fine-tune on")
        self.start = start
        self.config = config
        self.scans = list(scans)
        self.replay = replay
        cases = []
        # Two scans may share a name (two patients' "series 2 'CT'"): each case keeps its own slices.
        keys = _distinct_names([scan.name for scan in self.scans])
        for scan, key in zip(self.scans, keys):
            meta = scan.meta if scan.meta is not None else VolumeMeta.identity(known=False)
            if scan.labels.shape != scan.image.shape[:3]:
                raise UserInputError(f"{scan.name}: labels {scan.labels.shape} do not match the scan "
                                     f"{scan.image.shape[:3]}")
            top = int(scan.labels.max()) if scan.labels.size else 0
            if top >= config.model.num_classes:
                raise ConfigError(f"{scan.name}: label {top} has no class name (classes: "
                                  f"{', '.join(config.model.class_names)}); name every label value")
            cases.append(Case(key, scan.image, scan.labels.astype(np.uint8), meta))
        slices_by_case = {key: sorted({int(i) for i in scan.slices}) for scan, key in zip(self.scans, keys)}
        slices_by_case.update({f"set:{name}": slices for name, slices in self.set_slices.items()})
        train_set = TrainingSlices(itertools.chain(cases, set_cases), config.plan, config.train.patch_size,
                                   slices_by_case=slices_by_case, augment=config.train.augment,
                                   foreground_fraction=config.train.foreground_crop_fraction)
        if replay is not None:
            train_set.add_replay(self._replay_slices(replay), replay.fraction)
        # No output folder: the run only writes where save() is told to.
        self.trainer = Trainer(config, train_set, None, device=device, log=log, init_from=start,
                               provenance=self.provenance())
        #: What the user should know before trying the model (the CLI prints them, napari notifies).
        self.warnings = untaught_class_warnings(train_set, config.model.class_names)
        for warning in self.warnings:
            log(f"warning: {warning}")
        self.carried: list[str] = []
        if keep_known_classes and self.trainer.reinitialised:
            from .transfer import carry_known_classes

            self.carried = carry_known_classes(self.trainer.model, start, log=log)
            if self.trainer.ema is not None:     # the EMA copy was taken before the entries were carried
                self.trainer.ema.module.load_state_dict(self.trainer.model.state_dict())
        self.started = time.perf_counter()
        self.completed_steps = 0
        self._iterator: Optional[Iterator] = None

    @staticmethod
    def _set_case(name: str, training_set, config: ExperimentConfig) -> Case:
        """A case of the training set, its channels in the run's order (a set naming the model's channels in
        another order: :func:`~medconddiff.experiment.channel_order`)."""
        case = training_set.load_case(name, config.model.class_names)
        order = channel_order(config.plan.channel_names, training_set.channel_names,
                              data_label=f"the training set {Path(training_set.root).name}")
        return case if order is None else dataclasses.replace(case, image=case.image[..., list(order)])

    def _replay_slices(self, replay: Replay) -> TrainingSlices:
        names = tuple(self.config.model.class_names)
        missing = [n for n in replay.class_names[1:] if class_index(names, n) is None]
        if missing:
            raise ConfigError(f"replayed classes {missing} are not in the class list {list(names)}")
        lut = np.asarray([0] + [class_index(names, n) for n in replay.class_names[1:]], dtype=np.uint8)
        cases = [dataclasses.replace(case, labels=lut[case.labels]) for case in replay.cases]
        return TrainingSlices(cases, self.config.plan, self.config.train.patch_size,
                              slices_by_case=replay.slices_by_case, augment=self.config.train.augment,
                              foreground_fraction=self.config.train.foreground_crop_fraction)

    def provenance(self) -> dict:
        record = {
            # Files by name, scans by their name, never a folder: scans are filed in folders named after
            # the patient, and a checkpoint is shared (medconddiff.outputs.recorded_name).
            "finetuned_from": {"path": recorded_name(self.start.path), "sha256": self.start.sha256,
                               "classes": list(self.start.config.model.class_names)},
            "finetuned_on": [{"scan": s.name, "slices": sorted(int(i) for i in s.slices)} for s in self.scans],
            "trained_on": [s.name for s in self.scans] + sorted(n for n, v in self.set_slices.items() if v),
        }
        if self.held_back is not None:
            held = self.held_back
            record["held_back"] = {"scan": held.case if held.case is not None else self.scans[held.position].name,
                                   "slice": held.slice, **({"training_set_case": True} if held.case else {}),
                                   "why": "chooses the consensus; not trained on"}
        if self.training_set is not None:
            record["training_set"] = {"path": recorded_name(self.training_set.root),
                                      "verified_slices": {n: len(v) for n, v in self.set_slices.items()}}
        if self.replay is not None:
            record["replay"] = {"fraction": self.replay.fraction,
                                "slices": {k: len(v) for k, v in self.replay.slices_by_case.items()}}
        return record

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
        if self.held_back is not None and self.completed_steps >= self.total_steps:
            self.consensus_choice = self._choose_consensus()
            self.log(self.consensus_choice.describe())

    def _choose_consensus(self) -> ConsensusChoice:
        """Score the candidate fusions on the held-back slice with the finished weights (EMA)."""
        held = self.held_back
        if held.case is None:
            scan = self.scans[held.position]
            choosing = ChoosingSlices(scan.image, scan.labels, scan.meta, [held.slice])
        else:
            case = self._set_case(held.case, self.training_set, self.config)
            choosing = ChoosingSlices(case.image, case.labels, case.meta, [held.slice], ignore_value=IGNORE_INDEX)
        return choose_consensus(self.segmenter(), [choosing], "1 corrected slice held back from training",
                                prior=FINETUNE_CONSENSUS)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the fine-tuned weights (EMA of the completed steps) as a checkpoint, atomically."""
        extra = {**self.provenance(), "steps": self.completed_steps, "steps_planned": self.total_steps,
                 "seconds": round(time.perf_counter() - self.started, 1),
                 "history": self.trainer.history[-50:],
                 "reinitialised": sorted({k.rsplit(".", 1)[0] for k in self.trainer.reinitialised}),
                 "carried_known_classes": self.carried, CONSENSUS_CHOICE_KEY: self.consensus_choice.to_dict()}
        return save_checkpoint(path, self.trainer.weights_to_save(), self.config, extra=extra, overwrite=overwrite)

    def segmenter(self, device: Optional[str] = None):
        """A Segmenter with the fine-tuned weights (a copy: training may go on without changing it)."""
        import copy

        from .segmenter import Segmenter

        model = copy.deepcopy(self.trainer.weights_to_save())
        return Segmenter(model, self.config, device=device or self.trainer.device,
                         consensus_choice=self.consensus_choice)


#: What a scan's channels are, as the widget offers it: the start model's kind, or a named kind whose
#: intensity scheme the plan takes (CT: the HU window; anything else: per-scan z-scores).
SCAN_KINDS = ("model", "CT", "MRI", "other")


def channel_names_of_kind(kind: str, start_channels: Sequence[str]) -> Optional[tuple[str, ...]]:
    """Channel names that say a scan's ``kind`` (one of :data:`SCAN_KINDS`) for a model whose channels
    are ``start_channels``; None for "model" (keep the start model's channels and scheme)."""
    if kind not in SCAN_KINDS:
        raise ConfigError(f"scan kind must be one of {', '.join(SCAN_KINDS)}, not {kind!r}")
    if kind == "model":
        return None
    label = "image" if kind == "other" else kind
    count = len(start_channels)
    return (label,) if count == 1 else tuple(f"{label} {i + 1}" for i in range(count))


def channels_not_in_hounsfield(plan: PreprocessPlan, image: np.ndarray) -> list[int]:
    """The channels ``plan`` reads through its CT window although ``image`` has no voxel below 0 there
    (so they are not CT in Hounsfield units: an MRI, or CT stored without its rescale intercept).

    ``image`` is in file order, channels last when several. Non-empty means: the user should say
    what the scan is (:data:`SCAN_KINDS`, ``--channel-names``) rather than get the CT window.
    """
    from .preprocess import check_volume, looks_like_hounsfield, with_channels

    volume = with_channels(check_volume(image), plan.num_channels)
    return [c for c in range(volume.shape[3])
            if plan.scheme_of(c) == "ct_window" and not looks_like_hounsfield(volume[..., c])]


def _read_as_hounsfield_checked(case: Case, plan: PreprocessPlan) -> Case:
    """``case`` of a training set, refused where the run would read a channel with no voxel below 0
    through the CT window (an MRI stored in a set whose channel is called CT): it would learn from a
    few saturated grey levels, as a single scan given the same way is refused."""
    unlike = channels_not_in_hounsfield(plan, case.image)
    if unlike:
        names = ", ".join(plan.channel_names[c] for c in unlike)
        raise ConfigError(f"case {case.name.removeprefix('set:')} of the training set has no voxel below 0 in its "
                          f"channel(s) {names}, so it is not CT in Hounsfield units, but this fine-tune reads them "
                          "through the CT window; keep MRI in a set of its own (add-to-set --channel-names MRI), "
                          "or fine-tune with --channel-names naming what the scans are")
    return case


def finetune_config(start: Checkpoint, *, class_names: Optional[Sequence[str]] = None,
                    channel_names: Optional[Sequence[str]] = None, steps: int = ONE_SCAN_FINETUNE_STEPS,
                    seed: int = 0, augment: bool = True, batch_size: Optional[int] = None,
                    lr: Optional[float] = None, log: Callable[[str], None] = print,
                    data_label: str = "the class and channel names given") -> ExperimentConfig:
    """The start checkpoint's architecture and plan, the new class list, and a short schedule.

    ``channel_names`` say what the scan's channels are when they are not what the start model took
    (e.g. ``("T1",)`` for a CT model): a channel of another kind than the start model's (CT or not)
    gets the intensity scheme of its kind (CT: the HU window; others: per-scan z-scores).
    """
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    train = {**FINETUNE_DEFAULTS, "epochs": 1, "iterations_per_epoch": int(steps), "train_seed": int(seed),
             "augment": bool(augment)}
    if batch_size is not None:
        train["train_batch_size"] = int(batch_size)
    if lr is not None:
        train["lr"] = float(lr)
    train["warmup_steps"] = min(train["warmup_steps"], max(1, steps // 5))
    # The run puts channels named in another order in the start model's (FinetuneRun, finetune()).
    return training_config(flags={"train": train}, start=start, class_names=class_names,
                           channel_names=channel_names, dataset_label=data_label, log=log,
                           reorder_channels=True)


def finetune(start: str | Path | Checkpoint | None, scans: Sequence[LabelledScan] = (), *,
             class_names: Optional[Sequence[str]] = None, channel_names: Optional[Sequence[str]] = None,
             steps: Optional[int] = None, seed: int = 0, augment: bool = True,
             batch_size: Optional[int] = None, lr: Optional[float] = None, device: str = "auto",
             log: Callable[[str], None] = print, training_set=None,
             replay: bool | float | Replay = False, keep_known_classes: bool = False,
             hold_back: bool = False) -> FinetuneRun:
    """A fine-tuning run from ``start`` (a checkpoint, its path, or a bundled name; None = default).

    ``class_names`` (background first) name the values of the ``scans``' labels; they default to the
    start checkpoint's (or the training set's, when one is given); label values beyond them need
    names. ``channel_names`` default to the start checkpoint's (or the training set's); name them when
    the scan is of another kind (an MRI for a CT model: see :func:`finetune_config`).

    ``training_set`` (a :class:`~medconddiff.training_set.TrainingSet`) adds every verified voxel of
    its cases; its classes join the class list by name. ``replay`` (True: :data:`REPLAY_FRACTION`; a
    float: that fraction; or a :class:`Replay`) mixes in what the start model was trained on
    (:func:`bundled_replay`) and puts the start model's classes first in the class list.
    ``keep_known_classes`` starts the class-dependent layers' entries of classes the start model
    knows (by name) from its weights instead of fresh (pixel family; meant with replay).

    ``steps`` (None: :func:`default_finetune_steps` of :func:`scans_learned_from`) are optimizer
    steps of :data:`FINETUNE_DEFAULTS`' batch of crops.

    ``hold_back`` keeps one corrected slice out of training (:func:`held_back_slice`) and chooses the
    model's consensus on it; without, the model's consensus is :data:`FINETUNE_CONSENSUS`. It is off
    by default: a held-back slice lies next to the trained ones and behaved like them (its steps got
    worse where the rest of the scan's got better), so on lung2 its choice lost more than it gained,
    besides the slice lost to training. Nothing is trained until the run is iterated.
    """
    checkpoint = start if isinstance(start, Checkpoint) else load_checkpoint(start, allow_legacy=True)
    if replay is not False and not isinstance(replay, Replay):
        replay = bundled_replay(checkpoint, REPLAY_FRACTION if replay is True else float(replay))
    replay = replay or None
    scan_classes = tuple(class_names) if class_names else None
    # By class, not spelling: a SEG's 'Liver' is the start model's 'liver', not a second class competing with it.
    classes = merge_class_lists(
        replay.class_names if replay is not None else (),
        scan_classes or (() if training_set is not None else tuple(checkpoint.config.model.class_names)),
        training_set.class_names if training_set is not None else ())
    scan_channels = tuple(channel_names) if channel_names else None   # what the scans' channels are, if said
    data_label = "the class and channel names given"
    if channel_names is None and training_set is not None:
        channel_names = training_set.channel_names
        data_label = f"the training set {Path(training_set.root).name}"
    if steps is None:
        steps = default_finetune_steps(scans_learned_from(scans, training_set))
    config = finetune_config(checkpoint, class_names=classes, channel_names=channel_names, steps=steps,
                             seed=seed, augment=augment, batch_size=batch_size, lr=lr, log=log, data_label=data_label)
    if scan_classes and scan_classes != classes:
        # The scans' label values name ``class_names``; the run's list may have grown around them.
        lut = np.asarray([0] + [class_index(classes, n) for n in scan_classes[1:]], dtype=np.int64)
        scans = [dataclasses.replace(s, labels=lut[_checked_labels(s, scan_classes)]) for s in scans]
    order = channel_order(config.plan.channel_names, scan_channels, data_label="the channel names given")
    if order is not None:       # the scans' channels, named in another order than the model's, put in its order
        scans = [dataclasses.replace(s, image=np.asarray(s.image)[..., list(order)]) for s in scans]
    return FinetuneRun(checkpoint, config, scans, device=device, log=log, training_set=training_set, replay=replay,
                       keep_known_classes=keep_known_classes, hold_back=hold_back)


def untaught_class_warnings(train_set: TrainingSlices, class_names: Sequence[str]) -> list[str]:
    """A warning naming the classes of ``class_names`` that no training slice shows (a class named but never
    painted, or whose only case left the set): fine-tuning teaches that they are nowhere, so the model
    stops predicting them."""
    shown = train_set.classes_shown(len(class_names)).tolist()
    absent = [name for name, present in zip(class_names[1:], shown[1:]) if not present]
    if not absent:
        return []
    one = len(absent) == 1
    names = ", ".join(repr(n) for n in absent)
    return [f"{'class' if one else 'classes'} {names} {'appears' if one else 'appear'} on no training slice: "
            f"fine-tuning teaches the model {'it is' if one else 'they are'} nowhere, so it will stop predicting "
            f"{'it' if one else 'them'}. Paint {'it' if one else 'them'} on a slice you train on, replay the start "
            "model's slices (for its own classes), or leave it out of the class list"]


class HeldBack(NamedTuple):
    """The corrected slice a fine-tune keeps out of training to choose its consensus on."""

    position: Optional[int]       # index in the run's scans; None when it is a training-set case's
    slice: int                    # canonical slice along the start model's slicing
    case: Optional[str] = None    # the training-set case it belongs to


def held_back_slice(scans: Sequence[LabelledScan], hold_back: bool = False,
                    set_slices: Optional[Mapping[str, Sequence[int]]] = None) -> Optional[HeldBack]:
    """The corrected slice to keep out of training, or None (``hold_back`` False).

    From the scan or training-set case (``set_slices``: case → its verified slices) with the most
    corrected slices (the first of equals: scans before cases, cases by name), the slice farthest from
    its nearest other corrected slice (the later of equals): the one most like the slices nobody
    corrected. It needs 2 corrected slices, so that one is left to train on.
    """
    if not hold_back:
        return None
    sources = [(len({int(i) for i in scan.slices}), position, None, scan.slices) for position, scan in enumerate(scans)]
    sources += [(len({int(i) for i in slices}), None, case, slices) for case, slices in sorted((set_slices or {}).items())]
    count, position, case, chosen = max(sources, key=lambda source: source[0], default=(0, None, None, ()))
    if count < 2:
        raise UserInputError(f"holding back a corrected slice needs a scan (or a case of the training set) with at "
                             f"least 2 corrected slices; the most any has is {count}")
    slices = sorted({int(i) for i in chosen})
    isolation = [min(abs(s - o) for o in slices if o != s) for s in slices]
    best = max(range(len(slices)), key=lambda i: (isolation[i], i))
    return HeldBack(position, slices[best], case)


def _checked_labels(scan: LabelledScan, class_names: Sequence[str]) -> np.ndarray:
    labels = np.asarray(scan.labels)
    top = int(labels.max()) if labels.size else 0
    if labels.size and (labels.min() < 0 or top >= len(class_names)):
        raise ConfigError(f"{scan.name}: label {top} has no class name (classes: {', '.join(class_names)}); "
                          "name every label value")
    return labels.astype(np.int64)


def _distinct_names(names: Sequence[str]) -> list[str]:
    """``names`` with a repeated one numbered from its second use on (``scan``, ``scan (2)``), never
    taking a name given."""
    taken, distinct = set(names), []
    for name in names:
        unique, n = name, 1
        while unique in distinct or (unique != name and unique in taken):
            n += 1
            unique = f"{name} ({n})"
        distinct.append(unique)
    return distinct
