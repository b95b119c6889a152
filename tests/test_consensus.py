"""Consensus fusion and uncertainty on hand-made stacks, where the right answer is known."""

import numpy as np
import pytest

from medconddiff.config import CONSENSUS_METHODS
from medconddiff.consensus import (first_argmax, fuse, labels_from_probabilities, mean_over_steps, normalised_entropy,
                                   quantize, select_steps, step_disagreement, uncertainty)


def stack_from(per_step_probs):
    """(S, K) per-step class probabilities of a single voxel → (S, K, 1, 1)."""
    return np.asarray(per_step_probs, dtype=np.float32)[:, :, None, None]


def test_mean_is_the_average_of_steps():
    stack = stack_from([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    np.testing.assert_allclose(fuse(stack, "mean")[:, 0, 0], [0.5, 0.5], atol=1e-6)


def test_vote_gated_ignores_a_confident_outlier():
    # Two steps say class 1 mildly, one early step says class 0 with certainty.
    stack = stack_from([[1.0, 0.0], [0.4, 0.6], [0.4, 0.6]])
    assert labels_from_probabilities(fuse(stack, "mean"))[0, 0] == 0   # mean is dragged to class 0
    fused = fuse(stack, "vote_gated")
    assert labels_from_probabilities(fused)[0, 0] == 1
    np.testing.assert_allclose(fused[:, 0, 0], [0.4, 0.6], atol=1e-6)


def test_uncertainty_weighted_trusts_confident_steps():
    stack = stack_from([[0.5, 0.5], [0.05, 0.95]])
    fused = fuse(stack, "uncertainty_weighted")
    assert fused[1, 0, 0] > fuse(stack, "mean")[1, 0, 0] > 0.5


def test_skip_first_drops_the_noisiest_steps_per_seed():
    stack = stack_from([[1, 0], [0, 1], [0, 1], [1, 0], [0, 1], [0, 1]])  # 2 seeds × 3 steps
    kept = select_steps(stack, skip_first=1, num_seeds=2)
    assert kept.shape[0] == 4 and (kept[:, 1] == 1).all()
    assert labels_from_probabilities(fuse(stack, "mean", skip_first=1, num_seeds=2))[0, 0] == 1
    with pytest.raises(ValueError):
        select_steps(stack, skip_first=3, num_seeds=2)


def test_last_step_and_unknown_method():
    stack = stack_from([[0.9, 0.1], [0.3, 0.7]])
    np.testing.assert_allclose(fuse(stack, "last")[:, 0, 0], [0.3, 0.7], atol=1e-6)
    with pytest.raises(ValueError):
        fuse(stack, "median")


def test_quantised_stack_fuses_like_float():
    rng = np.random.default_rng(0)
    raw = rng.random((5, 3, 4, 4)).astype(np.float32)
    probs = raw / raw.sum(axis=1, keepdims=True)
    q = quantize(probs)
    assert q.dtype == np.uint8
    for method in CONSENSUS_METHODS:
        np.testing.assert_allclose(fuse(q, method), fuse(probs, method), atol=3 / 255)


def test_uncertainty_maps():
    agree = stack_from([[0.0, 1.0]] * 4)
    split = stack_from([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    for stack, expected_disagreement in ((agree, 0.0), (split, 0.5)):
        fused = fuse(stack, "mean")
        labels = labels_from_probabilities(fused)
        assert step_disagreement(stack, labels)[0, 0] == pytest.approx(expected_disagreement)
    assert normalised_entropy(np.array([[0.5], [0.5]]))[0] == pytest.approx(1.0, abs=1e-4)
    assert normalised_entropy(np.array([[1.0], [0.0]]))[0] == pytest.approx(0.0, abs=1e-4)
    fused = fuse(split, "mean")
    combined = uncertainty(split, labels_from_probabilities(fused))
    assert 0.0 <= combined.min() and combined.max() <= 1.0 and combined[0, 0] > 0.5


def test_uncertainty_is_the_runs_whatever_fusion_chose_the_labels():
    """'last' takes one step's probabilities; the map still measures every step (and a kept one-shot)."""
    # Step 1 says class 1 surely, step 2 class 0 surely: the last step alone looks certain.
    stack = stack_from([[0.0, 1.0], [1.0, 0.0]])
    last = fuse(stack, "last")
    labels = labels_from_probabilities(last)
    assert normalised_entropy(last)[0, 0] < 1e-6
    assert uncertainty(stack, labels, kind="entropy")[0, 0] == pytest.approx(1.0, abs=1e-4)
    assert uncertainty(stack, labels, kind="disagreement")[0, 0] == pytest.approx(0.5)
    # A kept one-shot forward is one prediction more in the pooled entropy (2 for class 0, 1 for class 1).
    one_shot = np.array([1.0, 0.0], np.float32)[:, None, None]
    expected = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)) / np.log(2)
    assert uncertainty(stack, labels, kind="entropy", one_shot=one_shot)[0, 0] == pytest.approx(expected, abs=1e-4)
    # With 'mean' the pooled prediction is the fused one: the map is what it always was.
    mean = fuse(stack, "mean")
    np.testing.assert_allclose(uncertainty(stack, labels, kind="entropy"), normalised_entropy(mean), atol=1e-6)


def test_last_step_pools_every_seeds_last_step():
    # 2 seeds × 3 steps; seed 0 ends on class 0, seed 1 ends on class 1 (less surely).
    stack = stack_from([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1],
                        [0.5, 0.5], [0.9, 0.1], [0.3, 0.7]])
    np.testing.assert_allclose(fuse(stack, "last", num_seeds=2)[:, 0, 0], [0.6, 0.4], atol=1e-6)
    np.testing.assert_allclose(fuse(stack, "last", skip_first=1, num_seeds=2)[:, 0, 0], [0.6, 0.4], atol=1e-6)
    # One seed: still the final step alone, bit for bit.
    assert np.array_equal(fuse(stack, "last"), stack[-1] / stack[-1].sum(axis=0, keepdims=True))
    with pytest.raises(ValueError):
        fuse(stack[:5], "last", num_seeds=2)


def test_late_mean_averages_the_later_half_of_each_seed():
    # 2 seeds × 3 steps: the later half is steps 2 and 3 of each seed (⌈3/2⌉ = 2).
    stack = stack_from([[1.0, 0.0], [0.2, 0.8], [0.4, 0.6],
                        [1.0, 0.0], [0.6, 0.4], [0.8, 0.2]])
    np.testing.assert_allclose(fuse(stack, "late_mean", num_seeds=2)[:, 0, 0], [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(fuse(stack[:3], "late_mean")[:, 0, 0], [0.3, 0.7], atol=1e-6)
    np.testing.assert_allclose(fuse(stack[:1], "late_mean")[:, 0, 0], [1.0, 0.0], atol=1e-6)
    # skip_first drops steps before the later half is taken of what remains.
    np.testing.assert_allclose(fuse(stack[:3], "late_mean", skip_first=1)[:, 0, 0], [0.4, 0.6], atol=1e-6)
    with pytest.raises(ValueError):
        fuse(stack[:5], "late_mean", num_seeds=2)


def test_quantize_keeps_the_arg_max_through_rounding():
    # 0.399 and 0.401 both round to 102: without care the tie goes to the lower, wrong class.
    probs = np.array([0.2, 0.399, 0.401], dtype=np.float32)
    assert quantize(probs).tolist() == [51, 102, 102]           # 1-D: no class axis unless asked
    assert quantize(probs, class_axis=0).tolist() == [51, 102, 103]
    assert quantize(probs[None]).tolist() == [[51, 102, 103]]  # (B, K): classes on axis 1
    assert quantize(probs[None, :, None, None])[0, :, 0, 0].tolist() == [51, 102, 103]
    assert quantize(probs[::-1].copy(), class_axis=0).tolist() == [103, 102, 51]
    # Exact float ties keep the lowest-index rule and are left as rounded.
    assert quantize(np.array([[0.3, 0.35, 0.35]], dtype=np.float32)).tolist() == [[76, 89, 89]]
    # At the top of the range the tied losers go down instead (no uint8 wrap-around).
    assert quantize(np.array([[0.9999, 1.0]], dtype=np.float32)).tolist() == [[254, 255]]
    assert quantize(np.array([[1.0, 0.9999, 0.0]], dtype=np.float32)).tolist() == [[255, 254, 0]]
    # Scalars are unchanged.
    assert quantize(0.5) == 128 and np.ndim(quantize(0.5)) == 0


def test_quantize_keeps_the_arg_max_of_a_random_field():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3, 100, 250)).astype(np.float32) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    q = quantize(probs)
    assert q.dtype == np.uint8 and q.shape == probs.shape
    mismatched = first_argmax(q, axis=1) != first_argmax(probs, axis=1)
    assert not mismatched.any(), f"{mismatched.sum()} of {mismatched.size} voxels changed class"
    # Only the rounding ties moved, and by one level.
    plain = np.clip(np.rint(probs * np.float32(255)), 0, 255).astype(np.int16)
    assert np.abs(q.astype(np.int16) - plain).max() == 1
    assert np.count_nonzero(q != plain) < 0.01 * mismatched.size
    # Any class axis, float64 inputs compared at their own precision.
    np.testing.assert_array_equal(quantize(np.moveaxis(probs, 1, -1), class_axis=-1), np.moveaxis(q, 1, -1))
    probs64 = probs.astype(np.float64)
    assert np.array_equal(first_argmax(quantize(probs64), axis=1), first_argmax(probs64, axis=1))


def test_normalised_entropy_is_shannon_entropy_over_log_k_without_renormalising():
    """Quantised steps need not sum to 1: their entropy is taken as they are (scipy's entr per class)."""
    rng = np.random.default_rng(1)
    probs = rng.random((3, 5, 7)).astype(np.float32)
    probs /= probs.sum(axis=0, keepdims=True)
    clipped = np.clip(probs, 1e-8, 1.0)
    expected = -(clipped * np.log(clipped)).sum(axis=0) / np.log(3)
    np.testing.assert_allclose(normalised_entropy(probs), expected, rtol=0, atol=3e-7)
    assert normalised_entropy(np.full((4, 2), 0.25, np.float32)) == pytest.approx(1.0, abs=1e-6)
    assert normalised_entropy(np.array([1.0, 0.0], np.float32)) < 1e-6
    unnormalised = np.array([0.5, 0.4], np.float32)            # as a quantised step may be
    assert normalised_entropy(unnormalised) == pytest.approx(-(0.5 * np.log(0.5) + 0.4 * np.log(0.4)) / np.log(2))


def test_the_mean_of_quantised_steps_is_their_exact_mean_rounded_once():
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, size=(10, 3, 4, 5), dtype=np.uint8)
    exact = stack.astype(np.float64).sum(axis=0) / (255.0 * 10)
    np.testing.assert_array_equal(mean_over_steps(stack), exact.astype(np.float32))
    many = np.full((300, 2, 1, 1), 255, np.uint8)        # more steps than a uint16 sum holds
    np.testing.assert_array_equal(mean_over_steps(many), np.ones((2, 1, 1), np.float32))
    floats = stack.astype(np.float32) / 255
    np.testing.assert_array_equal(mean_over_steps(floats), floats.mean(axis=0))
    # The mean fusion and the uncertainty's pooled prediction are one computation.
    fused = fuse(stack, "mean")
    labels = labels_from_probabilities(fused)
    np.testing.assert_array_equal(uncertainty(stack, labels), uncertainty(stack, labels, pooled=fused))


def test_a_skip_first_beyond_the_steps_a_slice_took_is_said():
    """--skip-first 5 on the bundled model (capped at 2 steps) gave the last step's labels, while the console
    and sidecar said 'mean, skip_first 5'."""
    from medconddiff.consensus import skip_first_note

    assert skip_first_note(5, "mean", np.array([2, 2, 10])) == (
        "skip-first 5: 2 of 3 slice(s) took 5 step(s) or fewer (a step cap or adaptive stopping), so their "
        "consensus is their last step alone, not a mean of steps")
    assert skip_first_note(5, "mean", np.array([6, 10])) == ""
    assert skip_first_note(0, "mean", np.array([2])) == ""
