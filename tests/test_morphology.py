"""Morphological clean-up of consensus labels: specks, holes, classes kept apart, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from medconddiff.morphology import disk, fill_from_nearest, largest_component, postprocess_labels


def liver_with_tumour() -> np.ndarray:
    labels = np.zeros((40, 40), np.uint8)
    labels[5:30, 5:30] = 1        # liver
    labels[12:18, 12:18] = 2      # tumour inside the liver
    return labels


def test_a_speck_is_removed_and_takes_its_surroundings_label():
    labels = liver_with_tumour()
    labels[35, 35] = 2            # a tumour speck in the background → background
    labels[25, 8] = 2             # a tumour speck inside the liver → liver
    cleaned = postprocess_labels(labels, 3, min_size=4)
    assert cleaned[35, 35] == 0 and cleaned[25, 8] == 1
    assert (cleaned[12:18, 12:18] == 2).all()  # the real tumour (36 px) stays
    expected = liver_with_tumour()
    assert np.array_equal(cleaned, expected)


def test_a_thin_diagonal_structure_is_one_component_not_a_row_of_specks():
    """A 30-px oblique vessel touches itself only at corners: measured 4-connected it was 30 specks, each
    under min_size, and removed whole."""
    labels = np.zeros((40, 40), np.uint8)
    rows = np.arange(5, 35)
    labels[rows, rows] = 2
    cleaned = postprocess_labels(labels, 3, min_size=8)
    assert (cleaned[rows, rows] == 2).all()


def test_a_hole_is_filled_with_the_enclosing_class():
    labels = liver_with_tumour()
    labels[22:25, 22:25] = 0      # background hole inside the liver
    labels[14:16, 14:16] = 0      # background hole inside the tumour
    cleaned = postprocess_labels(labels, 3)
    assert (cleaned[22:25, 22:25] == 1).all()
    assert (cleaned[14:16, 14:16] == 2).all()
    assert np.array_equal(cleaned, liver_with_tumour())
    # Off: nothing changes.
    assert np.array_equal(postprocess_labels(labels, 3, fill_holes=False), labels)


def test_separate_classes_are_not_merged():
    labels = np.zeros((30, 40), np.uint8)
    labels[5:20, 3:15] = 1
    labels[5:20, 17:30] = 2       # a separate object of the other class, 2 px apart
    cleaned = postprocess_labels(labels, 3, min_size=10, closing_radius=3)
    assert np.array_equal(cleaned, labels)  # closing fills the gap with neither class
    touching = labels.copy()
    touching[5:20, 15:17] = 2     # now they touch: still two classes, none absorbed
    assert np.array_equal(postprocess_labels(touching, 3, min_size=10), touching)


def test_opening_closing_and_keep_largest():
    labels = np.zeros((40, 40), np.uint8)
    labels[5:25, 5:25] = 1
    labels[14, 25:35] = 1         # a 1-px spur: opening removes it
    labels[30:34, 30:34] = 1      # a second, smaller component
    opened = postprocess_labels(labels, 2, opening_radius=1)
    assert not opened[14, 27:35].any() and opened[31:33, 31:33].all()  # (a cross erodes corners)
    largest = postprocess_labels(labels, 2, keep_largest=[1])
    assert not largest[30:34, 30:34].any() and largest[5:25, 5:25].all()
    gap = np.zeros((20, 20), np.uint8)
    gap[5:15, 3:9] = 1
    gap[5:15, 10:16] = 1          # a one-pixel gap column: closing bridges it
    closed = postprocess_labels(gap, 2, closing_radius=1, fill_holes=False)
    assert closed[6:14, 9].all() and not closed[:5].any()


def test_stacks_are_cleaned_slice_by_slice():
    one = liver_with_tumour()
    one[35, 35] = 1
    stack = np.stack([one, np.zeros_like(one), liver_with_tumour()])
    cleaned = postprocess_labels(stack, 3, min_size=4)
    assert cleaned.shape == stack.shape and cleaned.dtype == stack.dtype
    assert np.array_equal(cleaned[0], liver_with_tumour())
    assert not cleaned[1].any()
    assert np.array_equal(cleaned[2], liver_with_tumour())
    assert stack[0, 35, 35] == 1  # the input is not modified


@pytest.mark.parametrize("labels, kwargs, message", [
    (np.zeros((2, 2, 2, 2), np.uint8), {}, "labels must be"),
    (np.zeros((4, 4), np.float32), {}, "integers"),
    (np.full((4, 4), 3, np.uint8), {}, r"\[0, 3\)"),
    (np.zeros((4, 4), np.uint8), {"min_size": -1}, "negative"),
    (np.zeros((4, 4), np.uint8), {"keep_largest": [0]}, "keep_largest"),
])
def test_bad_input_is_refused(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        postprocess_labels(labels, 3, **kwargs)


def test_helpers():
    assert disk(1).sum() == 5 and disk(0).sum() == 1
    mask = np.zeros((5, 5), bool)
    assert not largest_component(mask).any()
    labels = np.array([[1, 0, 2]], np.uint8)
    assert np.array_equal(fill_from_nearest(labels, np.array([[False, True, True]])), [[1, 1, 1]])
    assert np.array_equal(fill_from_nearest(labels, np.ones((1, 3), bool)), [[0, 0, 0]])


def test_disk_is_every_pixel_within_the_radius():
    """scikit-image's disk, as the hand-written one was: bool, centre distance ≤ radius."""
    for radius in range(0, 8):
        grid = np.arange(-radius, radius + 1)
        expected = grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2
        footprint = disk(radius)
        assert footprint.dtype == bool
        np.testing.assert_array_equal(footprint, expected)


def test_threads_clean_the_same_as_one():
    rng = np.random.default_rng(3)
    noise = rng.random((6, 48, 48))
    labels = (noise > 0.55).astype(np.uint8) + (noise > 0.85)   # specks and holes on every slice
    options = dict(min_size=4, opening_radius=1, closing_radius=1, keep_largest=[2])
    one = postprocess_labels(labels, 3, workers=1, **options)
    assert not np.array_equal(one, labels)                       # there was something to clean
    for workers in (2, 3, None):
        assert np.array_equal(postprocess_labels(labels, 3, workers=workers, **options), one)
    with pytest.raises(ValueError, match="workers"):
        postprocess_labels(labels, 3, workers=0)
