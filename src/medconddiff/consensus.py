"""Fusing the x̂_0 of every denoising step into one segmentation, and measuring disagreement.

Pure functions over a stack of per-step class probabilities shaped ``(S, K, *spatial)`` (S steps,
or steps × seeds; K classes). Stacks may be float or uint8-quantised (0..255) as the trajectory is
stored; every function returns float32 probabilities in [0, 1].
"""

from __future__ import annotations

from typing import Literal, Optional, Protocol, Union

import numpy as np

from .config import CONSENSUS_METHODS

QUANT_SCALE = 255.0


def quantize(probabilities: np.ndarray, class_axis: Union[int, None, Literal["auto"]] = "auto") -> np.ndarray:
    """Probabilities in [0, 1] → uint8, the compact form a kept trajectory is stored in.

    Same shape as ``probabilities``, e.g. (B, K, H, W). Along ``class_axis`` the arg-max survives
    rounding: where the float arg-max class (lowest index among exact float ties) would tie with a
    class of lower probability after rounding, it is raised by one level (or, at 255, the tied
    classes are lowered by one), so every arg-max convention still finds it. Exact float ties are
    left as rounded and keep the lowest-index rule. ``class_axis="auto"`` is axis 1 for arrays of
    2 or more dimensions and none (plain rounding) for scalars and 1-D arrays; ``None`` is plain
    rounding for any shape.
    """
    # Runs once per denoising step: one float temporary, rounded and clipped in place.
    values = np.asarray(np.multiply(np.asarray(probabilities, dtype=np.float32), np.float32(QUANT_SCALE)))
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    quantized = values.astype(np.uint8)
    if class_axis == "auto":
        class_axis = 1 if quantized.ndim >= 2 else None
    if class_axis is not None:
        _keep_argmax(quantized, np.asarray(probabilities), class_axis)
    return quantized if quantized.ndim else quantized[()]  # a scalar in, a scalar out (as before)


def _keep_argmax(quantized: np.ndarray, probabilities: np.ndarray, class_axis: int) -> None:
    """Fix, in place, the voxels of ``quantized`` whose rounding tied the arg-max class with a lesser one.

    Such voxels (~0.1% of a 3-class field) are a subset of those whose quantised maximum is shared
    by two or more classes; those are found with whole-array uint8 passes (no per-voxel arg-max,
    which over a non-innermost class axis is slow), and only they are looked at class by class.
    """
    if not -quantized.ndim <= class_axis < quantized.ndim:
        raise ValueError(f"class_axis {class_axis} is out of range for an array of {quantized.ndim} dimensions")
    class_axis %= quantized.ndim
    if quantized.ndim == 1:                    # one voxel: give it a voxel axis (views, so writes reach)
        quantized, probabilities, class_axis = quantized[None], probabilities[None], 1
    top = quantized.max(axis=class_axis, keepdims=True)
    shared = np.equal(quantized, top).sum(axis=class_axis, dtype=np.uint8) > 1
    if not shared.any():
        return
    # Voxel indices (class axis dropped); 1-D flatnonzero then unravel is ~15× faster than
    # np.nonzero on the (B, H, W) mask, which alone cost twice the whole rounding.
    rows = np.unravel_index(np.flatnonzero(shared), shared.shape)
    q_view = np.moveaxis(quantized, class_axis, -1)                      # a view: writes reach ``quantized``
    q = q_view[rows].astype(np.int16)                                    # (n, K)
    # The float arg-max in the input's own precision: a float64 near-tie that float32 rounding
    # would merge still has a winner.
    p = np.moveaxis(probabilities, class_axis, -1)[rows]                 # (n, K)
    n = np.arange(len(q))
    winner = p.argmax(axis=-1)                                           # ties → lowest index
    tied_below = (q == q[n, winner][:, None]) & (p < p[n, winner][:, None])
    fix = tied_below.any(axis=-1)
    raise_winner = fix & (q[n, winner] < 255)
    q[n[raise_winner], winner[raise_winner]] += 1
    # Only reachable with inputs above 1 (or ≈1 in two classes): no room above 255, so the tied
    # lesser classes go down instead (they are at 255, never below 0).
    q -= (tied_below & (fix & ~raise_winner)[:, None])
    q_view[rows] = q.astype(np.uint8)


def first_argmax(array: np.ndarray, axis: int) -> np.ndarray:
    """``array.argmax(axis)`` for a short axis (classes), as uint8; ties go to the lowest index.

    numpy's (and torch's CPU) arg-max over a short axis that is not the innermost one walks memory
    with a large stride and is ~10× slower than comparing whole class planes, which this does.
    Inputs are probabilities or counts (no NaN).
    """
    array = np.asarray(array)
    planes = np.moveaxis(array, axis, 0)
    if planes.shape[0] > 256:
        return array.argmax(axis=axis)
    best = planes[0].copy()
    labels = np.zeros(best.shape, np.uint8)
    for k in range(1, planes.shape[0]):
        better = np.greater(planes[k], best)
        # labels < k everywhere so far, so max(labels, k·better) sets k exactly where better; a
        # masked assignment here is data-dependent branching and ~50× slower.
        np.maximum(labels, np.multiply(better, np.uint8(k), dtype=np.uint8), out=labels)
        np.maximum(best, planes[k], out=best)
    return labels


def as_probabilities(stack: np.ndarray) -> np.ndarray:
    stack = np.asarray(stack)
    if stack.dtype == np.uint8:
        return stack.astype(np.float32) / QUANT_SCALE
    return stack.astype(np.float32, copy=False)


def _normalise(probabilities: np.ndarray) -> np.ndarray:
    total = probabilities.sum(axis=0, keepdims=True)
    return probabilities / np.maximum(total, 1e-8)


def mean_over_steps(stack: np.ndarray) -> np.ndarray:
    """The mean over the first axis (steps) as float32 probabilities, shaped like one step.

    A uint8-quantised stack (the kept trajectory) is summed exactly in integers and divided once: the
    exact mean of the quantised values, rounded once to float32 (6× faster than adding float32 steps
    for 10 steps of a batch, and no float copy of the whole stack). Float stacks are added one step at
    a time, as ``as_probabilities(stack).mean(axis=0)`` does, bit for bit.
    """
    stack = np.asarray(stack)
    if stack.dtype == np.uint8:
        count = stack.shape[0]
        total = stack.sum(axis=0, dtype=np.uint16 if count <= 257 else np.uint32)   # 257 × 255 < 2¹⁶
        return np.divide(total, np.float32(QUANT_SCALE * count), dtype=np.float32)
    total = np.array(as_probabilities(stack[0]), dtype=np.float32)  # a copy: it is accumulated into
    for step in range(1, stack.shape[0]):
        total += as_probabilities(stack[step])
    # Divided as ndarray.mean divides (by an intp count, through float64), so the result is identical.
    return np.true_divide(total, np.intp(stack.shape[0]), out=total, casting="unsafe")


def mean_fusion(stack: np.ndarray, num_seeds: int = 1) -> np.ndarray:
    """The paper's consensus: the mean of the per-step probabilities (of every seed alike)."""
    return _normalise(mean_over_steps(stack))


def vote_gated_fusion(stack: np.ndarray, num_seeds: int = 1) -> np.ndarray:
    """Mean over only the steps (of every seed alike) that vote for the per-voxel majority class.

    A few confident but wrong early steps cannot then drag the mean across the decision boundary.
    """
    probs = as_probabilities(stack)
    num_classes = probs.shape[1]
    votes = first_argmax(probs, axis=1)                             # (S, *spatial)
    counts = np.stack([(votes == k).sum(axis=0) for k in range(num_classes)])
    majority = first_argmax(counts, axis=0)                         # ties → lowest class index
    agrees = (votes == majority[None]).astype(np.float32)[:, None]  # (S, 1, *spatial)
    return _normalise((probs * agrees).sum(axis=0) / np.maximum(agrees.sum(axis=0), 1.0))


def normalised_entropy(probabilities: np.ndarray, axis: int = 0) -> np.ndarray:
    """Shannon entropy over the class axis divided by log K: 0 = certain, 1 = uniform.

    ``-Σ p log p`` as given, in the input's precision: not ``scipy.stats.entropy``, which rescales each
    distribution to sum to 1, where the uint8-quantised steps that uncertainty-weighted fusion weighs
    sum to 1 only within a few 1/255 (on the bundled sample that moved labels and uncertainty by up to
    0.25). numpy's vectorised ``log`` rather than ``scipy.special.entr``: the same values to float32
    rounding (2e-7), in about half the time (it runs for every batch of slices).
    """
    probs = np.clip(probabilities, 1e-8, 1.0)
    num_classes = probabilities.shape[axis]
    terms = np.log(probs)
    terms *= probs
    return (terms.sum(axis=axis) * float(-1.0 / np.log(num_classes))).astype(np.float32, copy=False)


def uncertainty_weighted_fusion(stack: np.ndarray, num_seeds: int = 1) -> np.ndarray:
    """Per-voxel weighted mean, each step (of every seed alike) weighted by its own confidence
    (1 - normalised entropy)."""
    probs = as_probabilities(stack)
    weights = 1.0 - normalised_entropy(probs, axis=1)[:, None] + 1e-3  # never all-zero
    return _normalise((probs * weights).sum(axis=0) / weights.sum(axis=0))


def last_step_fusion(stack: np.ndarray, num_seeds: int = 1) -> np.ndarray:
    """No fusion over steps: the final step's x̂_0 (what a plain diffusion sampler returns).

    ``stack`` is (num_seeds*steps, K, *spatial), seed-major; with several seeds the result is the
    mean of every seed's final step, normalised (one seed: that seed's final step alone).
    """
    if num_seeds < 1 or stack.shape[0] % num_seeds:
        raise ValueError(f"a stack of {stack.shape[0]} steps does not split into {num_seeds} seeds")
    steps = stack.shape[0] // num_seeds
    return _normalise(mean_over_steps(stack[steps - 1::steps]))


def late_mean_fusion(stack: np.ndarray, num_seeds: int = 1) -> np.ndarray:
    """The mean over the later half of each seed's steps (⌈steps/2⌉ of them; of all a slice took).

    Why: on fine-tuned models the first steps, read from nearly pure noise, are the least accurate,
    and how many steps to skip depends on how many a slice took before adaptive stopping ended it.
    """
    if num_seeds < 1 or stack.shape[0] % num_seeds:
        raise ValueError(f"a stack of {stack.shape[0]} steps does not split into {num_seeds} seeds")
    steps = stack.shape[0] // num_seeds
    later = [seed * steps + i for seed in range(num_seeds) for i in range(steps // 2, steps)]
    return _normalise(mean_over_steps(stack[later]))


class Fusion(Protocol):
    """``(num_seeds*steps, K, *spatial)`` seed-major stack → fused probabilities (K, *spatial).

    ``num_seeds`` tells a fusion where each seed's trajectory ends ('last' needs it); the fusions
    that pool every step of every seed alike take it and ignore it.
    """

    def __call__(self, stack: np.ndarray, num_seeds: int = 1) -> np.ndarray: ...


FUSIONS: dict[str, Fusion] = {
    "mean": mean_fusion,
    "vote_gated": vote_gated_fusion,
    "uncertainty_weighted": uncertainty_weighted_fusion,
    "last": last_step_fusion,
    "late_mean": late_mean_fusion,
}
assert set(FUSIONS) == set(CONSENSUS_METHODS)


def select_steps(stack: np.ndarray, skip_first: int = 0, num_seeds: int = 1) -> np.ndarray:
    """Drop the first ``skip_first`` steps of every seed from a (seeds*steps, K, ...) stack."""
    if skip_first == 0:
        return stack
    steps = stack.shape[0] // num_seeds
    if not 0 <= skip_first < steps:
        raise ValueError(f"skip_first must be in [0, {steps}), got {skip_first}")
    keep = [s * steps + i for s in range(num_seeds) for i in range(skip_first, steps)]
    return stack[keep]


def fuse(stack: np.ndarray, method: str = "mean", skip_first: int = 0, num_seeds: int = 1) -> np.ndarray:
    """Fused class probabilities (K, *spatial) of a per-step stack (seeds*steps, K, *spatial)."""
    if method == "auto":
        raise ValueError("consensus 'auto' stands for a model's own choice: resolve it first "
                         "(Segmenter.resolve_sampling, or consensus_choice.resolved_consensus)")
    if method not in FUSIONS:
        raise ValueError(f"unknown consensus {method!r}; choose one of {list(FUSIONS)}")
    return FUSIONS[method](select_steps(stack, skip_first, num_seeds), num_seeds=num_seeds)


def labels_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return first_argmax(probabilities, axis=0).astype(np.uint8, copy=False)


def step_disagreement(stack: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Fraction of steps whose own arg-max differs from the consensus label (0 = all agree)."""
    votes = first_argmax(stack, axis=1)
    # Integer count, then one division: the same float64 arithmetic as .mean(axis=0), without a
    # float64 array per step.
    disagree = np.count_nonzero(votes != labels[None], axis=0)
    return (disagree / votes.shape[0]).astype(np.float32)


def pooled_prediction(stack: np.ndarray, one_shot: Optional[np.ndarray] = None) -> np.ndarray:
    """Class probabilities (K, *spatial) of everything a run predicted: the mean over the steps of
    ``stack`` (S, K, *spatial), and the one-shot forward ``one_shot`` (K, *spatial) as one prediction
    more when the run kept it. Float or uint8-quantised inputs, like the fusions."""
    if one_shot is None:
        return _normalise(mean_over_steps(stack))
    total = mean_over_steps(stack) * np.float32(stack.shape[0]) + as_probabilities(one_shot)
    return _normalise(total / np.float32(stack.shape[0] + 1))


def uncertainty(stack: np.ndarray, labels: np.ndarray, kind: str = "combined",
                one_shot: Optional[np.ndarray] = None, pooled: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-voxel uncertainty in [0, 1] of a run's steps ``stack`` (S, K, *spatial) and its consensus
    ``labels``: 'entropy' of :func:`pooled_prediction` (the steps, and ``one_shot`` if kept),
    'disagreement' of the steps with the labels, or 'combined' (their mean: entropy alone is blind where
    all steps agree on a confident mistake, disagreement alone is coarse with few steps).

    The entropy is the run's, not the fusion's: a fusion that takes one prediction ('last', 'one_shot')
    would otherwise report that prediction's own confidence, higher where it is wrong (held-out slab of
    the bundled sample, default model, `last` of 2 steps: AUROC for wrong voxels 0.848 with the fused
    entropy, 0.862 with the pooled one). ``pooled``: :func:`pooled_prediction` of these arguments, where
    the caller has it already (the ``mean`` fusion is that)."""
    if kind not in ("entropy", "disagreement", "combined"):
        raise ValueError(f"unknown uncertainty kind {kind!r}")
    if kind == "disagreement":
        return step_disagreement(stack, labels)
    entropy = normalised_entropy(pooled if pooled is not None else pooled_prediction(stack, one_shot))
    if kind == "entropy":
        return entropy
    return 0.5 * (entropy + step_disagreement(stack, labels))


def skip_first_note(skip_first: int, consensus: str, steps_used: np.ndarray) -> str:
    """A note when ``skip_first`` left a slice nothing but its last step: the slices that took no more steps
    than it (the model's step cap, adaptive stopping) fuse their last step alone (a fusion keeps at least
    one step), so their consensus is that step whatever the method. Empty otherwise."""
    skip = int(skip_first)
    steps_used = np.asarray(steps_used)
    short = int((steps_used <= skip).sum()) if skip > 0 else 0
    if not short:
        return ""
    return (f"skip-first {skip}: {short} of {len(steps_used)} slice(s) took {skip} step(s) or fewer (a step cap or "
            f"adaptive stopping), so their consensus is their last step alone, not a {consensus} of steps")
