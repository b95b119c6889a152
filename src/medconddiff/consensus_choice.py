"""Which consensus a model should use, chosen on labelled slices, and the record of that choice.

No fixed consensus wins on every model: on the bundled models the steps converge within three and
every fusion scores alike; on a fine-tune whose trajectory still rises (lung2), the later steps are
the better ones and the mean of all lags behind the last. So each model carries its own choice: one
sampling run over labelled slices keeps every step's x̂0, each candidate fusion re-fuses that
trajectory (no new diffusion), and the candidates are scored beside every single step and the
one-shot forward, which is a candidate too (``one_shot``: for a model whose steps never beat it). The
record goes into the checkpoint (``extra["consensus_choice"]``), and ``SamplingConfig(consensus="auto")``
(the default) uses it; the sidecar and the widget show it.

A candidate replaces ``mean`` (the paper's consensus) only when it beats it by more than
:data:`SWITCH_MARGIN` on those slices: smaller differences are what the sampling seed alone moves
(measured: 0.0002–0.002 between fusions on the bundled sample's slabs), and chasing them would swap
consensus on noise. One exception needs no margin: when the steps a (capped) run takes rise on those
slices, each at least as good as the one before, the last step is the best of them there, and a mean
can only pull it back towards the worse earlier ones, so ``last`` is the choice (what fine-tunes,
whose steps rise, record by default).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .config import ONE_SHOT, SamplingConfig
from .defined_values import defined, max_defined
from .errors import UserInputError

#: The fusions of the steps a model may choose from (every method of :data:`~medconddiff.config.CONSENSUS_METHODS`).
FUSION_CANDIDATES = ("mean", "late_mean", "last", "uncertainty_weighted", "vote_gated")
#: Everything a model may choose: the fusions, and last the one-shot forward, for a model whose steps
#: never beat it (its diffusion then only gives the trajectory and the uncertainty).
CANDIDATES = FUSION_CANDIDATES + (ONE_SHOT,)
#: Dice a candidate must gain over ``mean`` on the choosing slices before it replaces it.
SWITCH_MARGIN = 0.005
#: Where the choice of a model without a record comes from.
FALLBACK = "mean"
#: The key of the record in a checkpoint's ``extra``.
EXTRA_KEY = "consensus_choice"
#: Dice a later step must add over an earlier one on the choosing slices to be worth its cost.
STEP_GAIN = 0.001
#: The fewest steps a cap leaves: the uncertainty map is (half) the steps' disagreement, which needs two.
MIN_STEP_CAP = 2
#: The cap of a model whose consensus is the one-shot forward: its labels come from that pass, and one step
#: beside it gives the uncertainty its disagreement (with the one-shot's labels), at a 2-step run's cost.
ONE_SHOT_STEP_CAP = 1


@dataclass(frozen=True)
class ChoosingSlices:
    """Labelled slices one model's consensus is chosen on: ``image`` ((i, j, k) or (i, j, k, C)) and
    ``labels`` ((i, j, k)) in the file's voxel order with ``meta``; ``slices`` are canonical slice
    indices along the model plan's slicing direction."""

    image: np.ndarray
    labels: np.ndarray
    meta: Any
    slices: Sequence[int]
    ignore_value: Optional[int] = None   # reference voxels nobody checked: scored in no figure


@dataclass(frozen=True)
class ConsensusChoice:
    """The consensus a model uses under ``consensus="auto"``, and the evidence it was chosen on.

    Dice figures are mean foreground Dice over the choosing slices (pooled over their scans);
    ``basis`` says which slices those were in words without any patient identifier
    (e.g. "1 corrected slice held back from training").
    """

    method: str
    basis: str
    scans: int
    slices: int
    candidate_dice: Mapping[str, float] = field(default_factory=dict)
    step_dice: Sequence[float] = ()
    one_shot_dice: float = float("nan")
    step_cap: Optional[int] = None     # adaptive runs stop every slice here (None: no cap)
    #: The schedule (``SamplingConfig.steps``) the choice was measured on; None in records written before it
    #: was kept, all measured on the default schedule. A cap counts steps of that schedule only.
    schedule_steps: Optional[int] = None

    def __post_init__(self) -> None:
        if self.method not in CANDIDATES:
            raise UserInputError(f"a consensus choice names an unknown fusion {self.method!r}")
        if self.step_cap is not None and self.step_cap < 1:
            raise UserInputError(f"a consensus choice's step cap must be a number of steps, not {self.step_cap}")

    @property
    def best_rival(self) -> float:
        """max(best single step, one-shot) on the choosing slices (NaN if undefined)."""
        return max_defined((*self.step_dice, self.one_shot_dice))

    @property
    def steps_taken(self) -> Sequence[float]:
        """Per-step Dice of the steps a run under this choice takes (up to the cap)."""
        return tuple(self.step_dice[:self.step_cap]) if self.step_cap is not None else tuple(self.step_dice)

    @property
    def margin(self) -> float:
        """The chosen consensus minus max(best step, one-shot) on the choosing slices (≥ 0: it earns its cost)."""
        return float(self.candidate_dice.get(self.method, float("nan")) - self.best_rival)

    @property
    def one_shot_better(self) -> bool:
        """The one-shot forward beat every candidate fusion of the steps on the choosing slices."""
        fusions = [d for m, d in self.candidate_dice.items() if m != ONE_SHOT]
        return self.one_shot_dice > max_defined(fusions)   # False where either is NaN

    def method_for(self, sampling: Optional[SamplingConfig] = None) -> str:
        """The consensus for a run of ``sampling`` (its step cap resolved; None: a run as chosen): the
        recorded one, unless it is a fusion chosen on trajectories cut at the step cap and the run takes
        more steps than that (fixed steps, or a larger cap) — such a choice says nothing about the later
        steps (the default's ``last`` would be its 10th step there: 0.868 against ``mean``'s 0.870), so the
        run fuses with :data:`FALLBACK`, as a model without a record does. The one-shot does not depend
        on the steps and holds for any run."""
        if sampling is None or self.step_cap is None or self.method == ONE_SHOT:
            return self.method
        if not self.holds_for_schedule(sampling.steps):
            return FALLBACK
        most = sampling.step_cap if sampling.adaptive and sampling.step_cap else sampling.steps
        return self.method if most <= self.step_cap else FALLBACK

    @property
    def measured_schedule(self) -> int:
        """The ``steps`` of the schedule the choice was measured on."""
        return self.schedule_steps or SamplingConfig().steps

    def holds_for_schedule(self, steps: int) -> bool:
        """Whether a cap of this choice means the same steps in a run of ``steps``: its first two steps of
        10 are t = 999, 888, of 3 they are t = 999, 500 (there the default's cap of 2 scored 0.8704 and
        below its best step, against 0.8726 on 10)."""
        return self.step_cap is None or steps == self.measured_schedule

    def step_cap_for(self, consensus: str, steps: Optional[int] = None) -> Optional[int]:
        """The step cap of a run of ``steps`` (None: the measured schedule) that fuses with ``consensus``
        ("auto": this choice): the recorded one, except where the choice is the one-shot, whose single
        step only feeds the uncertainty beside it. A run that fuses the steps itself (the user asked for
        ``mean``) takes the cap its step Dice support (:func:`useful_steps`, at least
        :data:`MIN_STEP_CAP`; None: every step), so that it has steps to fuse and to disagree. A run on
        another schedule takes no cap (None): the steps the cap counted are not its steps."""
        one_shot_step = self.method == ONE_SHOT and self.step_cap == ONE_SHOT_STEP_CAP
        if one_shot_step and consensus in ("auto", ONE_SHOT):
            return self.step_cap            # the one-shot's labels do not depend on the schedule
        if steps is not None and not self.holds_for_schedule(steps):
            return None
        return useful_steps(self.step_dice) if one_shot_step else self.step_cap

    def origin(self) -> str:
        """Where the choice came from, in a few words."""
        return f"chosen on {self.basis}" if self.slices else self.basis

    def describe(self) -> str:
        """One line for a log, the widget or a sidecar reader."""
        if not self.slices:
            return f"consensus '{self.method}': {self.basis}"
        chosen = self.candidate_dice.get(self.method, float("nan"))
        text = (f"consensus '{self.method}', {self.origin()}: Dice {chosen:.3f} "
                f"(mean {self.candidate_dice.get('mean', float('nan')):.3f}, "
                f"best step {max_defined(self.step_dice):.3f}, one-shot {self.one_shot_dice:.3f})")
        if self.method == ONE_SHOT and self.step_cap == ONE_SHOT_STEP_CAP:
            text += f"; {ONE_SHOT_STEP_CAP} diffusion step beside it, for the uncertainty"
        elif self.step_cap is not None:
            text += f"; at most {self.step_cap} steps (later ones added under {STEP_GAIN} Dice)"
        if self.method == "last" and rises(self.steps_taken):
            text += "; its steps rise to the last there"
        if self.method == ONE_SHOT:
            text += "; its labels are the one-shot forward's, which beat every fusion of the steps there"
        elif self.one_shot_better:
            text += "; the one-shot forward was better there"
        return text

    def to_dict(self) -> dict:
        record = asdict(self)
        record["candidate_dice"] = {k: _json_float(v) for k, v in self.candidate_dice.items()}
        record["step_dice"] = [_json_float(v) for v in self.step_dice]
        record["one_shot_dice"] = _json_float(self.one_shot_dice)
        record["margin"] = _json_float(self.margin)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "ConsensusChoice":
        try:
            return cls(method=str(record["method"]), basis=str(record.get("basis", "")),
                       scans=int(record.get("scans", 0)), slices=int(record.get("slices", 0)),
                       candidate_dice={str(k): _float(v) for k, v in dict(record.get("candidate_dice", {})).items()},
                       step_dice=tuple(_float(v) for v in record.get("step_dice", ())),
                       one_shot_dice=_float(record.get("one_shot_dice")),
                       step_cap=None if record.get("step_cap") is None else int(record["step_cap"]),
                       schedule_steps=None if record.get("schedule_steps") is None else int(record["schedule_steps"]))
        except (KeyError, TypeError, ValueError) as error:
            raise UserInputError(f"the checkpoint's consensus choice is unreadable: {error}") from error


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _json_float(value: float) -> Optional[float]:
    return None if value is None or math.isnan(value) else float(value)


def rises(step_dice: Sequence[float]) -> bool:
    """Whether per-step Dice climbs to its last step: two or more defined figures, none below the one
    before, the last above the first."""
    if len(step_dice) < 2 or any(math.isnan(d) for d in step_dice):
        return False
    return all(b >= a for a, b in zip(step_dice, step_dice[1:])) and step_dice[-1] > step_dice[0]


def pick(candidate_dice: Mapping[str, float], prior: str = "mean", steps_taken: Sequence[float] = ()) -> str:
    """The candidate to use: ``prior`` unless another beats it by more than :data:`SWITCH_MARGIN`
    (then the best; ties go to the earlier entry of :data:`CANDIDATES`). ``steps_taken``, the
    per-step Dice of the steps a run takes (up to its cap): when they rise, ``last`` is the prior."""
    if rises(steps_taken) and "last" in candidate_dice:
        prior = "last"
    base = candidate_dice.get(prior, float("nan"))
    scored = [(candidate_dice[m], -i, m) for i, m in enumerate(CANDIDATES)
              if m in candidate_dice and not math.isnan(candidate_dice[m])]
    if not scored:
        return FALLBACK
    best_dice, _, best = max(scored)
    if math.isnan(base) or best_dice > base + SWITCH_MARGIN:
        return best
    return prior


def useful_steps(step_dice: Sequence[float], gain: float = STEP_GAIN) -> Optional[int]:
    """The step cap the per-step Dice of an adaptive run support: the first step k (1-based, at least
    :data:`MIN_STEP_CAP`) that no later step beats by more than ``gain``; None when only the last does."""
    for k in range(MIN_STEP_CAP, len(step_dice)):
        reference = step_dice[k - 1]
        later = defined(step_dice[k:])
        if not math.isnan(reference) and all(d <= reference + gain for d in later):
            return k
    return None


def choose_consensus(segmenter, scans: Sequence[ChoosingSlices], basis: str,
                     sampling: Optional[SamplingConfig] = None, prior: str = "mean",
                     cap_steps: bool = True) -> ConsensusChoice:
    """Score every candidate fusion, each step and the one-shot on ``scans`` and pick (see :func:`pick`:
    ``prior`` stays unless another candidate beats it by more than :data:`SWITCH_MARGIN`; ``last`` is the
    prior when the steps a capped run takes rise).

    With ``cap_steps`` the step cap comes first (:func:`useful_steps` on the pooled per-step Dice),
    and the candidates are scored on the trajectories cut there, as a capped run would fuse them
    (a prefix of the same deterministic trajectory). The sampling must be adaptive and uncapped.

    One sampling run per scan (``sampling``, default: the default settings, adaptive steps); Dice is
    pooled over all scans' slices per class (intersections and sizes summed), then averaged over the
    foreground classes present, so a one-slice scan weighs by its voxels, not as a whole scan.
    """
    if not scans or not any(len(s.slices) for s in scans):
        raise UserInputError("choosing a consensus needs labelled slices")
    sampling = sampling or SamplingConfig()
    sampling = dataclasses.replace(sampling, step_cap=sampling.step_cap or sampling.steps)   # never the model's own
    runs = []
    num_classes = segmenter.num_classes
    tallies: dict[str, np.ndarray] = {}

    def tally(key: str, predicted: np.ndarray, reference: np.ndarray, known: Optional[np.ndarray]) -> None:
        if known is not None:
            predicted = np.where(known, predicted, 0)
        counts = tallies.setdefault(key, np.zeros((num_classes, 3), np.int64))
        for k in range(1, num_classes):
            p, r = predicted == k, reference == k
            counts[k] += (int(np.count_nonzero(p & r)), int(np.count_nonzero(p)), int(np.count_nonzero(r)))

    slices_total = 0
    steps_seen = 0
    for scan in scans:
        if not len(scan.slices):
            continue
        result = segmenter.segment(scan.image, sampling, slices=scan.slices, meta=scan.meta)
        geometry, indices = result.geometry, np.asarray(result.slice_indices)
        reference = np.ascontiguousarray(geometry.slice_view(np.asarray(scan.labels))[indices])
        known = None
        if scan.ignore_value is not None:
            known = reference != scan.ignore_value
            reference = np.where(known, reference, 0)
        if reference.size and int(reference.max()) >= num_classes:
            raise UserInputError(f"label value {int(reference.max())} is outside the model's {num_classes} classes")
        slices_total += len(indices)
        steps_seen = max(steps_seen, result.trajectory.shape[0])
        for step in range(result.trajectory.shape[0]):
            tally(f"step{step}", result.step_labels_on_scan(step, clean=True), reference, known)
        one_shot = segmenter.one_shot(scan.image, slices=indices, meta=scan.meta, precision=sampling.precision)
        tally("one_shot", geometry.slice_view(one_shot)[indices], reference, known)
        runs.append((result, reference, known))
    step_dice = tuple(_pooled_dice(tallies[f"step{i}"]) for i in range(steps_seen))
    cap = useful_steps(step_dice) if cap_steps and sampling.adaptive else None
    for result, reference, known in runs:
        if cap is not None:
            result = dataclasses.replace(result, steps_used=np.minimum(result.steps_used, cap))
        indices = np.asarray(result.slice_indices)
        for method in FUSION_CANDIDATES:
            fused = result.refuse(method, skip_first=0)
            tally(method, result.geometry.slice_view(fused.labels)[indices], reference, known)
    # The one-shot candidate's labels are the one-shot forward's (the same quantised labels a run makes).
    one_shot_dice = _pooled_dice(tallies["one_shot"])
    candidate_dice = {**{m: _pooled_dice(tallies[m]) for m in FUSION_CANDIDATES}, ONE_SHOT: one_shot_dice}
    evidence = ConsensusChoice(method=prior, basis=basis, scans=len(runs), slices=slices_total,
                               candidate_dice=candidate_dice, step_dice=step_dice, one_shot_dice=one_shot_dice,
                               step_cap=cap, schedule_steps=sampling.steps)
    method = pick(candidate_dice, prior, evidence.steps_taken)
    if method == ONE_SHOT and cap is not None:
        cap = ONE_SHOT_STEP_CAP     # the steps no longer make the labels: one is enough for the uncertainty
    return dataclasses.replace(evidence, method=method, step_cap=cap)


def _pooled_dice(counts: np.ndarray) -> float:
    """Mean over the foreground classes present (in prediction or reference) of the pooled Dice."""
    scores = [2 * inter / (pred + ref) for inter, pred, ref in counts[1:] if pred + ref > 0]
    return float(np.mean(scores)) if scores else float("nan")


def resolved_consensus(method: str, provenance: Optional[Mapping[str, Any]],
                       sampling: Optional[SamplingConfig] = None) -> str:
    """The fusion ``method`` stands for in a run of ``sampling`` whose provenance (sidecar record) is
    ``provenance``: itself, or for ``"auto"`` the model's recorded choice for such a run (``mean``
    without one; see :meth:`ConsensusChoice.method_for`)."""
    if method != "auto":
        return method
    record = (provenance or {}).get(EXTRA_KEY)
    return ConsensusChoice.from_dict(record).method_for(sampling) if record else FALLBACK


def recorded_choice(extra: Mapping[str, Any]) -> Optional[ConsensusChoice]:
    """The choice a checkpoint's ``extra`` records, or None."""
    record = extra.get(EXTRA_KEY) if extra else None
    return ConsensusChoice.from_dict(record) if record else None
