"""Scan geometry: reorientations are exact views, and the result does not depend on storage.

The invariance tests use the bundled model on the bundled liver CT stored in other voxel orders
(correct affines, same world coordinates), at another in-plane spacing and with a wider field of
view: what a user's scans look like.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medconddiff.config import PreprocessPlan, SamplingConfig
from medconddiff.evaluation import dice_per_class
from medconddiff.geometry import (GeometryWarning, Orientation, Reorientation, affine_from_codes, display_codes)
from medconddiff.nifti import VolumeMeta, load_labels, load_volume, sample_label_path, sample_scan_path
from medconddiff.preprocess import ScanPreprocessor
from medconddiff.segmenter import Segmenter

ORDERS = {"RAS": ("R", "A", "S"), "LAS": ("L", "A", "S"), "LPS": ("L", "P", "S"), "i<->j": ("A", "R", "S"),
          "sagittal stack": ("P", "I", "R"), "SRA": ("S", "R", "A")}
SLAB = range(52, 68)       # 16 slices of the bundled model's held-out slab (48-71)
SAMPLING = SamplingConfig(steps=3)


def test_reorientation_algebra_on_index_grids():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 1000, size=(3, 4, 5))
    for source in ORDERS.values():
        for target in ORDERS.values():
            r = Reorientation.between(source, target)
            out = r.apply(array)
            assert out.shape == r.shape(array.shape)
            np.testing.assert_array_equal(r.inverse().apply(out), array)
            assert r.codes(source) == tuple(target)
            for index in [(0, 0, 0), (2, 1, 4), (1, 3, 2)]:
                assert out[tuple(int(i) for i in r.index(index, array.shape))] == array[index]
            second = Reorientation.between(target, ("R", "A", "S"))
            np.testing.assert_array_equal(r.then(second).apply(array), second.apply(out))
    with pytest.raises(ValueError, match="not one orientation"):
        Reorientation.between(("R", "A", "S"), ("R", "R", "S"))


def test_reoriented_views_write_through_and_keep_trailing_axes():
    array = np.zeros((3, 4, 5, 2))
    view = Reorientation.between(("L", "P", "S"), ("R", "A", "S")).apply(array)
    assert np.shares_memory(view, array)
    view[0, 0, 0, 1] = 7        # canonical R-most, A-most voxel = the file's last i and j
    assert array[2, 3, 0, 1] == 7
    stack = np.zeros((6, 3, 4, 5))
    moved = Reorientation.between(("R", "A", "S"), ("S", "R", "A")).apply(stack, first_axis=1)
    assert moved.shape == (6, 5, 3, 4)


def test_orientation_of_real_affines_and_display_convention():
    lps = Orientation.of(np.diag([-0.7, -0.7, 5.0, 1.0]))
    assert lps.file_codes == ("L", "P", "S") and lps.known
    assert lps.to_canonical.flips == (True, True, False)
    with pytest.warns(GeometryWarning, match="degenerate"):
        degenerate = Orientation.of(np.zeros((4, 4)))
    assert not degenerate.known and degenerate.to_canonical.is_identity
    assert display_codes("axial") == ("S", "P", "L")
    affine = affine_from_codes(("S", "P", "L"), (5.0, 0.5, 0.5))
    assert nib.aff2axcodes(affine) == ("S", "P", "L")
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), [5.0, 0.5, 0.5])


def test_geometry_resamples_to_the_plan_spacing_keeping_the_field_of_view():
    plan = PreprocessPlan(slicing="axial", target_spacing=(1.0, 1.0))
    meta = VolumeMeta(affine=np.diag([-0.7, -0.5, 5.0, 1.0]), spacing=(0.7, 0.5, 5.0))
    geometry = ScanPreprocessor(plan).geometry((512, 400, 30), meta)
    assert geometry.n_slices == 30 and geometry.plane_shape == (512, 400)
    assert geometry.model_shape == (358, 200)           # 512 × 0.7 mm, 400 × 0.5 mm at 1 mm
    assert geometry.padded_shape == (384, 224)          # the network stride is 32
    coronal = ScanPreprocessor(PreprocessPlan(slicing="coronal")).geometry((512, 400, 30), meta)
    assert coronal.n_slices == 400 and coronal.plane_shape == (512, 30)
    assert coronal.model_shape == (358, 150)


def test_a_single_image_is_segmented_in_its_own_plane():
    plan = PreprocessPlan(slicing="axial")
    coronal_image = VolumeMeta(affine=affine_from_codes(("R", "S", "A"), (1, 1, 1)), spacing=(1, 1, 1),
                               original_ndim=2)
    geometry = ScanPreprocessor(plan).geometry((64, 48, 1), coronal_image)
    assert geometry.slicing == "coronal" and geometry.n_slices == 1 and geometry.plane_shape == (64, 48)
    assert "own plane" in geometry.notes[0]
    # The same holds for one slice stored as a 3-D file across any axis (it was cut into 1-pixel strips).
    ras = VolumeMeta(affine=np.eye(4), spacing=(1, 1, 1))
    for shape, slicing in (((1, 64, 48), "sagittal"), ((64, 1, 48), "coronal"), ((64, 48, 1), "axial")):
        geometry = ScanPreprocessor(plan).geometry(shape, ras)
        assert geometry.slicing == slicing and geometry.n_slices == 1 and sorted(geometry.plane_shape) == [48, 64]


def test_context_slices_sit_at_fixed_millimetres_whatever_the_slice_spacing():
    plan = PreprocessPlan(context_slices=1, context_mm=2.0, intensity=("percentile",), channel_names=("MR",))
    volume = np.arange(20, dtype=np.float32)[None, None, :].repeat(4, 0).repeat(4, 1)
    for spacing, expected in [(1.0, [8.0, 10.0, 12.0]), (0.5, [6.0, 10.0, 14.0]), (4.0, [9.5, 10.0, 10.5])]:
        meta = VolumeMeta(affine=np.diag([1.0, 1.0, spacing, 1.0]), spacing=(1.0, 1.0, spacing))
        scan = ScanPreprocessor(plan).prepare(volume, meta)
        assert scan.context_positions(10) == expected
        assert scan.forward([10]).shape[1] == 3
    assert scan.context_positions(0)[0] == 0.0          # clamped at the first slice


@pytest.mark.parametrize("scheme", ["percentile", "zscore"])
def test_mri_intensities_do_not_depend_on_the_voxel_order_of_a_large_scan(scheme):
    """Above 4 M voxels the statistics come from every n-th voxel: taken in canonical order, the same anatomy
    stored RAS, LPS or PIR normalises the same (a file-order subsample gave centres 1 % apart)."""
    plan = PreprocessPlan(intensity=(scheme,), channel_names=("T1",))
    ras = np.random.default_rng(0).gamma(2.0, 100.0, size=(161, 160, 163)).astype(np.float32)   # 4.2 M voxels
    ras += np.linspace(0.0, 800.0, 161, dtype=np.float32)[:, None, None]     # anatomy: brighter to the right
    measured = []
    for codes in (("R", "A", "S"), ("L", "P", "S"), ("P", "I", "R")):
        ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                               nib.orientations.axcodes2ornt(codes))
        stored = nib.Nifti1Image(ras, np.eye(4)).as_reoriented(ornt)
        meta = VolumeMeta(affine=stored.affine, spacing=(1.0, 1.0, 1.0))
        measured.append(ScanPreprocessor(plan).prepare(np.asarray(stored.dataobj), meta).intensities)
    assert measured[0] == measured[1] == measured[2]


@pytest.fixture(scope="module")
def bundled():
    image, meta = load_volume(sample_scan_path())
    labels, _ = load_labels(sample_label_path())
    segmenter = Segmenter.from_checkpoint(device="cpu")
    native = segmenter.segment(image, SAMPLING, slices=SLAB, meta=meta).labels
    return segmenter, image, meta, labels, native


def _stored_as(tmp_path, codes):
    """The bundled sample (and its labels) rewritten in another voxel order with the matching affine."""
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(codes))
    paths = []
    for source, suffix in ((sample_scan_path(), "image"), (sample_label_path(), "label")):
        path = tmp_path / f"{''.join(codes)}_{suffix}.nii.gz"
        nib.save(nib.load(str(source)).as_reoriented(ornt), str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize("order", list(ORDERS))
def test_the_same_anatomy_stored_in_another_voxel_order_gives_identical_labels(bundled, tmp_path, order):
    segmenter, _, _, _, native = bundled
    image_path, _ = _stored_as(tmp_path, ORDERS[order])
    image, meta = load_volume(image_path)
    result = segmenter.segment(image, SAMPLING, slices=SLAB, meta=meta)
    assert result.labels.shape == image.shape
    back = Reorientation.between(meta.orientation, ("R", "A", "S")).apply(result.labels)
    np.testing.assert_array_equal(back, native)


def test_the_cli_gives_identical_labels_for_an_lps_and_a_sagittal_file(bundled, tmp_path):
    from medconddiff.cli import main

    _, _, _, _, native = bundled
    for codes in (ORDERS["LPS"], ORDERS["sagittal stack"]):
        image_path, _ = _stored_as(tmp_path, codes)
        output = tmp_path / f"{''.join(codes)}_seg.nii.gz"
        assert main(["segment", str(image_path), "-o", str(output), "--steps", "3", "--quiet",
                     "--slices", f"{SLAB.start}:{SLAB.stop}"]) == 0
        written = nib.load(str(output))
        np.testing.assert_allclose(written.affine, nib.load(str(image_path)).affine)
        back = Reorientation.between(nib.aff2axcodes(written.affine), ("R", "A", "S")).apply(np.asarray(written.dataobj))
        np.testing.assert_array_equal(back, native)


def _dice(labels, reference):
    return np.array(dice_per_class(labels[:, :, SLAB.start:SLAB.stop], reference[:, :, SLAB.start:SLAB.stop], 3))


def test_finer_spacing_and_a_wider_field_of_view_keep_the_dice(bundled):
    """0.7 mm in-plane (resampled) and the scan padded with air to 256² at its own spacing."""
    segmenter, image, meta, labels, native = bundled
    native_dice = _dice(native, labels)
    zoom = 1 / 0.7
    fine_image = ndimage.zoom(image, (zoom, zoom, 1), order=1)
    fine_labels = ndimage.zoom(labels, (zoom, zoom, 1), order=0)
    fine_meta = VolumeMeta(affine=np.diag([0.7, 0.7, 1.0, 1.0]), spacing=(0.7, 0.7, 1.0))
    fine = segmenter.segment(fine_image, SAMPLING, slices=SLAB, meta=fine_meta).labels
    assert np.abs(_dice(fine, fine_labels) - native_dice).max() <= 0.02

    wide_image = np.full((256, 256, 128), -1000.0, np.float32)
    wide_image[64:192, 64:192] = image
    wide_labels = np.zeros((256, 256, 128), np.uint8)
    wide_labels[64:192, 64:192] = labels
    wide = segmenter.segment(wide_image, SAMPLING, slices=SLAB, meta=meta).labels
    assert np.abs(_dice(wide, wide_labels) - native_dice).max() <= 0.02


def _all_axis_codes():
    import itertools

    pairs = [("R", "L"), ("A", "P"), ("S", "I")]
    return [tuple(pairs[axis][flip] for axis, flip in zip(order, flips))
            for order in itertools.permutations(range(3)) for flips in itertools.product((0, 1), repeat=3)]


def test_reorientations_between_all_48_orientations_are_exact_views():
    """Built on nibabel.orientations: every voxel lands where the axis codes say, fractions included."""
    array = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    codes = _all_axis_codes()
    assert len(set(codes)) == 48
    for source in codes:
        for target in codes[::5]:
            r = Reorientation.between(source, target)
            out = r.apply(array)
            assert np.shares_memory(out, array) and r.codes(source) == target
            for index in [(0, 0, 0), (2, 3, 4), (1, 0, 3)]:
                assert out[tuple(int(i) for i in r.index(index, array.shape))] == array[index]
            middle = r.index((1.0, 1.5, 2.0), array.shape)       # the centre stays the centre
            assert middle == tuple((n - 1) / 2 for n in out.shape)
            voxels = np.nonzero(array >= 0)                       # whole index arrays at once, as the plugin maps
            moved = tuple(np.asarray(i, dtype=np.intp) for i in r.index(voxels, array.shape))
            np.testing.assert_array_equal(out[moved], array[voxels])
