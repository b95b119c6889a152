"""medconddiff.nifti: reading, writing and failure modes of NIfTI volumes."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from medconddiff import nifti
from medconddiff.nifti import (
    VolumeMeta,
    VolumeReadError,
    load_labels,
    load_volume,
    sample_label_path,
    sample_scan_path,
    sanitize_nonfinite,
    save_volume,
    write_json_atomic,
)

# An oblique, anisotropic, non-RAS affine: catches any transposed or dropped component.
OBLIQUE_AFFINE = np.array(
    [
        [-0.8, 0.1, 0.0, 120.5],
        [0.05, 0.7, 0.2, -30.25],
        [0.0, -0.1, 2.5, 14.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _write_nifti(path, data, affine=OBLIQUE_AFFINE, zooms=None, qform_code=1, sform_code=1):
    """A NIfTI written with plain nibabel, as a scanner export would be."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_sform(affine, code=sform_code)
    if zooms is not None:
        img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return path


@pytest.fixture
def ramp():
    """Small asymmetric int16 volume: every axis has a different length and gradient."""
    i, j, k = np.meshgrid(np.arange(5), np.arange(6), np.arange(7), indexing="ij")
    return (100 * i + 10 * j + k - 300).astype(np.int16)


# ----------------------------------------------------------------------------- reading


def test_load_volume_keeps_file_axis_order_affine_and_spacing(tmp_path, ramp):
    path = _write_nifti(tmp_path / "ramp.nii.gz", ramp)

    array, meta = load_volume(path)

    assert array.dtype == np.float32
    assert array.shape == (5, 6, 7)
    np.testing.assert_array_equal(array, ramp.astype(np.float32))
    np.testing.assert_allclose(meta.affine, OBLIQUE_AFFINE, atol=1e-6)
    expected_spacing = np.sqrt((OBLIQUE_AFFINE[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(meta.spacing, expected_spacing, rtol=1e-5)
    assert meta.orientation == nib.aff2axcodes(OBLIQUE_AFFINE) == ("L", "A", "S")
    assert meta.original_ndim == 3
    assert meta.source == str(path)
    assert meta.affine.dtype == np.float64


def test_read_meta_gives_load_volumes_meta_from_the_header_alone(tmp_path, ramp):
    path = _write_nifti(tmp_path / "ramp.nii.gz", ramp)
    _, loaded = load_volume(path)
    meta = nifti.read_meta(path)
    np.testing.assert_array_equal(meta.affine, loaded.affine)
    assert (meta.spacing, meta.orientation, meta.original_ndim, meta.spatial_shape, meta.source) == \
        (loaded.spacing, loaded.orientation, loaded.original_ndim, (5, 6, 7), str(path))
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(nifti.VolumeReadError, match="junk.nii.gz"):
        nifti.read_meta(tmp_path / "junk.nii.gz")


def test_load_volume_applies_intensity_scaling(tmp_path, ramp):
    img = nib.Nifti1Image(ramp, np.eye(4))
    img.header.set_slope_inter(0.5, -10)
    nib.save(img, str(tmp_path / "scaled.nii"))

    array, _ = load_volume(tmp_path / "scaled.nii")

    np.testing.assert_allclose(array, ramp * 0.5 - 10)


def test_bundled_sample_scan_and_labels():
    image, meta = load_volume(sample_scan_path())
    labels, label_meta = load_labels(sample_label_path())

    assert image.shape == labels.shape == (128, 128, 128)
    assert meta.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(meta.affine, np.eye(4))
    assert -1100 < image.min() < image.max() < 4000  # Hounsfield units
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_array_equal(label_meta.affine, meta.affine)


@pytest.mark.parametrize("shape", [(8, 9), (8, 9, 1)])
def test_2d_image_loads_with_singleton_last_axis_and_saves_back_as_its_file_was(tmp_path, shape):
    """A 2-D image is one slice either way; written back, a 3-D file of one slice stays 3-D with its slice
    thickness (it came back 2-D with pixdim 1 and its qform's third column changed: ITK lost its z)."""
    data = np.arange(72, dtype=np.float32).reshape(shape)
    affine = np.diag([0.5, 0.75, 3.0, 1.0])
    affine[:3, 3] = [-4.0, 6.0, 100.0]
    path = _write_nifti(tmp_path / "slice.nii", data, affine=affine)

    array, meta = load_volume(path)
    assert array.shape == (8, 9, 1)
    assert meta.original_ndim == 2
    assert meta.spacing[:2] == (0.5, 0.75)
    assert len(meta.spacing) == 3

    for written_meta in (meta, VolumeMeta.from_dict(meta.to_dict())):      # napari keeps the meta as a dict
        out = save_volume(tmp_path / "out.nii.gz", array, written_meta, overwrite=True)
        written = nib.load(out)
        assert written.shape == shape
        np.testing.assert_array_equal(written.get_fdata(), data)
        assert written.header.get_zooms() == ((0.5, 0.75) if len(shape) == 2 else (0.5, 0.75, 3.0))
        if len(shape) == 3:
            np.testing.assert_allclose(written.header.get_qform(), affine)
            np.testing.assert_allclose(written.header.get_sform(), affine)


def test_4d_image_needs_a_channel(tmp_path):
    data = np.stack([np.full((3, 4, 5), c, np.float32) for c in range(3)], axis=-1)
    path = _write_nifti(tmp_path / "multi.nii.gz", data)

    with pytest.raises(VolumeReadError, match=r"axis 3.*channel=0\.\.2") as info:
        load_volume(path)
    assert "3 volumes" in str(info.value) and "multi.nii.gz" in str(info.value)

    picked, meta = load_volume(path, channel=2)
    assert picked.shape == (3, 4, 5)
    assert np.all(picked == 2)
    assert meta.spatial_shape == (3, 4, 5)

    with pytest.raises(VolumeReadError, match="out of range"):
        load_volume(path, channel=3)


def test_4d_image_with_one_volume_loads_as_3d(tmp_path, ramp):
    path = _write_nifti(tmp_path / "single.nii.gz", ramp[..., np.newaxis])
    array, meta = load_volume(path)
    assert array.shape == (5, 6, 7)
    assert meta.original_ndim == 3


def test_missing_file_and_directory_raise_volume_read_error(tmp_path):
    with pytest.raises(VolumeReadError, match="does not exist") as info:
        load_volume(tmp_path / "nowhere.nii.gz")
    assert "nowhere.nii.gz" in str(info.value)
    with pytest.raises(VolumeReadError, match="is a directory"):
        load_volume(tmp_path)


def test_truncated_gzip_is_detected(tmp_path):
    whole = sample_label_path().read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])  # the header is intact, the data are not

    with pytest.raises(VolumeReadError, match="truncated") as info:
        load_volume(path)
    message = str(info.value)
    assert "truncated.nii.gz" in message and "\n" not in message


def test_truncated_uncompressed_nifti_is_detected(tmp_path, ramp):
    full = _write_nifti(tmp_path / "full.nii", ramp).read_bytes()
    path = tmp_path / "short.nii"
    path.write_bytes(full[: len(full) - 40])

    with pytest.raises(VolumeReadError, match=r"short\.nii: file is truncated"):
        load_volume(path)


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("random.nii.gz", np.random.default_rng(0).bytes(4096), "not a NIfTI file"),
        ("random.nii", np.random.default_rng(1).bytes(4096), "not a NIfTI file"),
        ("notes.nii", b"this is a text file, not an image\n" * 20, "not a NIfTI file"),
        ("empty.nii.gz", b"", "file is empty"),
    ],
)
def test_not_a_nifti_raises_volume_read_error(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VolumeReadError, match=problem) as info:
        load_volume(path)
    assert name in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_corrupt_gzip_stream_is_reported(tmp_path):
    whole = bytearray(sample_label_path().read_bytes())
    whole[len(whole) // 2 : len(whole) // 2 + 64] = bytes(64)  # damage the middle, keep the length
    path = tmp_path / "damaged_label.nii.gz"
    path.write_bytes(bytes(whole))
    with pytest.raises(VolumeReadError, match="damaged_label.nii.gz"):
        load_volume(path)


def test_image_with_no_voxels_is_rejected(tmp_path):
    path = _write_nifti(tmp_path / "none.nii", np.zeros((4, 0, 3), np.float32))
    with pytest.raises(VolumeReadError, match="no voxels"):
        load_volume(path)


def test_nonfinite_voxels_are_kept_by_load_and_replaced_by_sanitize(tmp_path, ramp):
    data = ramp.astype(np.float32)
    data[0, 0, 0], data[1, 2, 3], data[4, 5, 6] = np.nan, np.inf, -np.inf
    path = _write_nifti(tmp_path / "nan.nii.gz", data)

    array, _ = load_volume(path)
    assert np.isnan(array[0, 0, 0]) and np.isposinf(array[1, 2, 3])

    cleaned, n_bad = sanitize_nonfinite(array)
    assert n_bad == 3
    assert np.isfinite(cleaned).all()
    finite_min = np.nanmin(np.where(np.isfinite(array), array, np.nan))
    assert cleaned[0, 0, 0] == cleaned[1, 2, 3] == cleaned[4, 5, 6] == finite_min
    assert np.isnan(array[0, 0, 0]), "sanitize must not modify its input"


def test_sanitize_leaves_finite_and_integer_arrays_alone():
    finite = np.arange(6, dtype=np.float32)
    assert sanitize_nonfinite(finite)[0] is finite
    assert sanitize_nonfinite(np.arange(3))[1] == 0
    cleaned, n_bad = sanitize_nonfinite(np.full(4, np.nan))
    assert n_bad == 4 and np.all(cleaned == 0)


def test_all_nonfinite_volume_is_rejected(tmp_path):
    path = _write_nifti(tmp_path / "allnan.nii", np.full((3, 3, 3), np.nan, np.float32))
    with pytest.raises(VolumeReadError, match="NaN or infinite"):
        load_volume(path)


def test_complex_voxels_are_refused_not_cast_to_their_real_part(tmp_path):
    data = (np.ones((3, 3, 3)) + 2j * np.ones((3, 3, 3))).astype(np.complex64)
    path = tmp_path / "phase.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(VolumeReadError, match="complex numbers.*magnitude"):
        load_volume(path)
    with pytest.raises(VolumeReadError, match="complex numbers.*magnitude"):    # as channels too (napari, evaluate)
        nifti.load_channels([path])


def test_load_labels_rejects_fractional_and_negative_values(tmp_path):
    fractional = np.zeros((4, 4, 4), np.float32)
    fractional[1, 1, 1] = 1.5
    negative = np.zeros((4, 4, 4), np.int16)
    negative[2, 2, 2] = -1
    with pytest.raises(VolumeReadError, match="non-integer"):
        load_labels(_write_nifti(tmp_path / "frac_label.nii", fractional))
    with pytest.raises(VolumeReadError, match="negative"):
        load_labels(_write_nifti(tmp_path / "neg_label.nii", negative))


def test_load_labels_picks_a_dtype_that_holds_every_label(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, 0] = 300  # float-stored labels, as some tools write them
    labels, _ = load_labels(_write_nifti(tmp_path / "big_label.nii", data))
    assert labels.dtype == np.uint16 and labels[0, 0, 0] == 300


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_save_load_round_trip_keeps_affine_spacing_and_dtype(tmp_path, ramp, suffix, dtype):
    source = _write_nifti(tmp_path / "source.nii.gz", ramp)
    array, meta = load_volume(source)
    values = np.clip(array, 0, 255) if dtype == np.uint8 else array

    out = save_volume(tmp_path / f"out{suffix}", values.astype(dtype), meta)

    written = nib.load(out)
    assert written.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), values.astype(dtype))
    np.testing.assert_allclose(written.affine, meta.affine, atol=1e-6)
    np.testing.assert_allclose(written.header.get_zooms(), meta.spacing, rtol=1e-6)
    assert int(written.header["sform_code"]) == int(written.header["qform_code"]) == 1
    reread, reread_meta = load_volume(out)
    np.testing.assert_array_equal(reread, values.astype(dtype).astype(np.float32))
    assert reread_meta.orientation == meta.orientation


def test_saving_with_a_scaled_ct_header_writes_plain_values_and_no_display_window(tmp_path, ramp):
    img = nib.Nifti1Image(ramp, np.eye(4))
    img.header.set_slope_inter(0.5, -10)
    img.header["cal_min"], img.header["cal_max"] = -100, 400
    nib.save(img, str(tmp_path / "scaled_ct.nii"))
    array, meta = load_volume(tmp_path / "scaled_ct.nii")
    labels = (array > 0).astype(np.uint8)

    written = nib.load(save_volume(tmp_path / "mask.nii", labels, meta))

    np.testing.assert_array_equal(written.get_fdata(), labels)
    assert written.header["cal_min"] == written.header["cal_max"] == 0


def test_written_spacing_is_the_meta_spacing_even_if_the_affine_disagrees(tmp_path):
    meta = VolumeMeta(affine=np.diag([2.0, 2.0, 2.0, 1.0]), spacing=(0.5, 0.6, 0.7))
    out = save_volume(tmp_path / "spacing.nii", np.zeros((2, 3, 4), np.float32), meta)
    written = nib.load(out)
    np.testing.assert_allclose(written.header.get_zooms(), (0.5, 0.6, 0.7), rtol=1e-6)
    np.testing.assert_allclose(written.affine, meta.affine)


def test_save_with_float_to_integer_dtype_rounds_and_checks_range(tmp_path):
    meta = VolumeMeta.identity()
    out = save_volume(tmp_path / "seg.nii.gz", np.array([[[0.2, 0.9, 2.0]]]), meta, dtype=np.uint8)
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), [[[0, 1, 2]]])
    with pytest.raises(ValueError, match="do not fit"):
        save_volume(tmp_path / "big.nii.gz", np.array([[[300.0]]]), meta, dtype=np.uint8)


def test_save_rejects_shape_that_does_not_match_the_header(tmp_path, ramp):
    _, meta = load_volume(_write_nifti(tmp_path / "source.nii", ramp))
    with pytest.raises(ValueError, match="does not match"):
        save_volume(tmp_path / "out.nii", np.zeros((7, 6, 5), np.float32), meta)
    assert not (tmp_path / "out.nii").exists()


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    meta = VolumeMeta.identity()
    target = save_volume(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.float32), meta)

    with pytest.raises(FileExistsError, match="--overwrite"):
        save_volume(target, np.ones((2, 2, 2), np.float32), meta)
    assert np.all(nib.load(target).get_fdata() == 0)

    save_volume(target, np.ones((2, 2, 2), np.float32), meta, overwrite=True)
    assert np.all(nib.load(target).get_fdata() == 1)


def test_failed_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    meta = VolumeMeta.identity()
    existing = save_volume(tmp_path / "keep.nii.gz", np.zeros((2, 2, 2), np.float32), meta)
    before = existing.read_bytes()

    def half_write_then_fail(image, filename):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nifti.nib, "save", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_volume(tmp_path / "new.nii.gz", np.ones((2, 2, 2), np.float32), meta)
    with pytest.raises(OSError, match="disk full"):
        save_volume(existing, np.ones((2, 2, 2), np.float32), meta, overwrite=True)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.nii.gz"]
    assert existing.read_bytes() == before


def test_written_file_gets_normal_permissions(tmp_path):
    out = save_volume(tmp_path / "perm.nii", np.zeros((2, 2, 2), np.float32), VolumeMeta.identity())
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        save_volume(tmp_path / "out.mha", np.zeros((2, 2, 2)), VolumeMeta.identity())


def test_int64_and_bool_arrays_are_written_in_portable_types(tmp_path):
    meta = VolumeMeta.identity()
    as_int = save_volume(tmp_path / "int.nii", np.arange(8, dtype=np.int64).reshape(2, 2, 2), meta)
    as_bool = save_volume(tmp_path / "bool.nii", np.ones((2, 2, 2), bool), meta)
    assert nib.load(as_int).get_data_dtype() == np.int32
    assert nib.load(as_bool).get_data_dtype() == np.uint8


# ----------------------------------------------------------------------------- meta and json


def test_meta_dict_is_json_safe_and_round_trips(tmp_path, ramp):
    _, meta = load_volume(_write_nifti(tmp_path / "m.nii.gz", ramp))

    d = json.loads(json.dumps(meta.to_dict()))
    back = VolumeMeta.from_dict(d)

    np.testing.assert_array_equal(back.affine, meta.affine)
    assert back.spacing == meta.spacing
    assert back.orientation == meta.orientation
    assert back.source == meta.source
    assert back.original_ndim == meta.original_ndim
    assert back.spatial_shape == (5, 6, 7)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 1


def test_identity_meta():
    meta = VolumeMeta.identity(spacing=(0.5, 0.5, 2.0))
    np.testing.assert_array_equal(meta.affine, np.diag([0.5, 0.5, 2.0, 1.0]))
    assert meta.orientation == ("R", "A", "S") and meta.header is None
    flat = VolumeMeta.identity(shape_ndim=2, spacing=(0.3, 0.4))
    assert flat.spacing == (0.3, 0.4, 1.0) and flat.original_ndim == 2
    with pytest.raises(ValueError):
        VolumeMeta.identity(spacing=(1.0, 1.0))
    assert VolumeMeta.from_dict(json.loads(json.dumps(meta.to_dict()))).header is None


def test_write_json_atomic(tmp_path):
    path = write_json_atomic(tmp_path / "side.json", {"dice": np.float32(0.5), "shape": np.array([1, 2])})
    assert json.loads(path.read_text()) == {"dice": 0.5, "shape": [1, 2]}
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_json_atomic(path, {"dice": 1.0})
    write_json_atomic(path, {"dice": 1.0}, overwrite=True)
    assert json.loads(path.read_text()) == {"dice": 1.0}
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "bad.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["side.json"]


# ----------------------------------------------------------------------------- channels


def test_load_channels_of_one_3d_file_adds_a_channel_axis(tmp_path, ramp):
    path = _write_nifti(tmp_path / "ct.nii.gz", ramp)

    array, meta = nifti.load_channels([path])

    assert array.shape == (5, 6, 7, 1) and array.dtype == np.float32
    np.testing.assert_array_equal(array[..., 0], ramp)
    np.testing.assert_allclose(meta.affine, OBLIQUE_AFFINE, atol=1e-6)


def test_load_channels_of_a_4d_file_keeps_its_volumes_in_order(tmp_path, ramp):
    data = np.stack([ramp + 1000 * c for c in range(3)], axis=-1)
    path = _write_nifti(tmp_path / "mri.nii.gz", data)

    array, meta = nifti.load_channels([str(path)])

    assert array.shape == (5, 6, 7, 3)
    np.testing.assert_array_equal(array, data)
    assert meta.spatial_shape == (5, 6, 7)


def test_load_channels_stacks_files_in_the_order_given(tmp_path, ramp):
    paths = [_write_nifti(tmp_path / f"case_{c:04d}.nii.gz", ramp + 1000 * c) for c in range(3)]

    array, meta = nifti.load_channels([paths[2], paths[0], paths[1]])

    assert array.shape == (5, 6, 7, 3)
    for index, channel in enumerate((2, 0, 1)):
        np.testing.assert_array_equal(array[..., index], ramp + 1000 * channel)
    assert meta.source == str(paths[2])


def test_load_channels_refuses_files_on_different_grids(tmp_path, ramp):
    first = _write_nifti(tmp_path / "a.nii.gz", ramp)
    other_shape = _write_nifti(tmp_path / "b.nii.gz", ramp[:, :, :6])
    shifted = OBLIQUE_AFFINE.copy()
    shifted[0, 3] += 0.5
    other_affine = _write_nifti(tmp_path / "c.nii.gz", ramp, affine=shifted)

    with pytest.raises(VolumeReadError, match=r"b\.nii\.gz has shape \(5, 6, 6\) but .*a\.nii\.gz has \(5, 6, 7\)"):
        nifti.load_channels([first, other_shape])
    with pytest.raises(VolumeReadError, match=r"c\.nii\.gz and .*a\.nii\.gz have affines that differ by up to 0\.5 mm"):
        nifti.load_channels([first, other_affine])


def test_load_channels_moves_a_channel_stored_in_another_voxel_order_onto_the_first(tmp_path, ramp):
    """A channel converted by another tool (i and j swapped, rows reversed) lies on the first file's grid: it
    was refused as 'affines that differ by up to 5.4 mm'."""
    stored = np.ascontiguousarray(ramp.transpose(1, 0, 2)[::-1]) + 1000     # stored[a, b, c] = ramp[b, 5 - a, c]
    to_first = np.array([[0, 1, 0, 0], [-1, 0, 0, 5], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    paths = [_write_nifti(tmp_path / "t1.nii.gz", ramp),
             _write_nifti(tmp_path / "t2.nii.gz", stored, affine=OBLIQUE_AFFINE @ to_first)]
    array, meta = nifti.load_channels(paths)
    np.testing.assert_array_equal(array[..., 0], ramp)
    np.testing.assert_array_equal(array[..., 1], ramp + 1000)
    np.testing.assert_allclose(meta.affine, OBLIQUE_AFFINE)


def test_load_channels_accepts_affines_equal_within_a_micrometre(tmp_path, ramp):
    nudged = OBLIQUE_AFFINE.copy()
    nudged[1, 3] += 5e-4
    paths = [_write_nifti(tmp_path / "a.nii", ramp), _write_nifti(tmp_path / "b.nii", ramp, affine=nudged)]
    assert nifti.load_channels(paths)[0].shape == (5, 6, 7, 2)


def test_load_channels_wants_3d_files_when_given_several(tmp_path, ramp):
    single = _write_nifti(tmp_path / "a.nii.gz", ramp)
    multi = _write_nifti(tmp_path / "b.nii.gz", np.stack([ramp, ramp], axis=-1))
    with pytest.raises(VolumeReadError, match=r"b\.nii\.gz: 4-D image \(5, 6, 7, 2\); with one file per channel"):
        nifti.load_channels([single, multi])


def test_load_channels_refuses_a_channel_without_finite_voxels(tmp_path, ramp):
    data = np.stack([ramp.astype(np.float32), np.full(ramp.shape, np.nan, np.float32)], axis=-1)
    path = _write_nifti(tmp_path / "half.nii.gz", data)
    with pytest.raises(VolumeReadError, match=r"half\.nii\.gz: channel 1: every voxel is NaN or infinite"):
        nifti.load_channels([path])
    with pytest.raises(ValueError, match="at least one file"):
        nifti.load_channels([])


@pytest.mark.parametrize("qform_code, sform_code", [(0, 0), (1, 0), (0, 2), (1, 1)])
def test_writing_back_keeps_the_form_codes_and_never_invents_an_orientation(tmp_path, qform_code, sform_code):
    affine = np.diag([-0.7, -0.7, 3.0, 1.0])
    source = tmp_path / "source.nii.gz"
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    nib.save(image, str(source))
    array, meta = load_volume(source)
    assert meta.affine_known == (qform_code > 0 or sform_code > 0)
    out = save_volume(tmp_path / "out.nii.gz", array, meta)
    written = nib.load(str(out))
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (qform_code, sform_code)
    np.testing.assert_allclose(written.affine, nib.load(str(source)).affine)


def test_an_array_from_nowhere_is_written_without_an_orientation(tmp_path):
    meta = VolumeMeta.identity(spacing=(0.5, 0.5, 2.0))
    assert not meta.affine_known
    written = nib.load(str(save_volume(tmp_path / "plain.nii.gz", np.zeros((3, 3, 3), np.uint8), meta)))
    assert int(written.header["qform_code"]) == int(written.header["sform_code"]) == 0
    np.testing.assert_allclose(written.header.get_zooms(), (0.5, 0.5, 2.0))


# ----------------------------------------------------------------------------- form matrices and memory


def _two_form_source(path, sform, qform, qform_code=1, sform_code=2):
    """A file whose qform and sform differ (as a scanner export with a registration sform has)."""
    image = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), None)
    image.set_qform(qform, code=qform_code)
    image.set_sform(sform, code=sform_code)
    nib.save(image, str(path))
    return path


@pytest.mark.parametrize("sform", [
    OBLIQUE_AFFINE,                                                        # another rotation than the qform's
    np.array([[0.9, 0.3, 0.0, -10.0], [0.0, 0.8, 0.0, 5.0], [0.0, 0.0, 3.0, 2.0], [0, 0, 0, 1.0]]),  # sheared
])
def test_written_labels_keep_the_source_qform_and_sform(tmp_path, sform):
    """Labels written with the scan's meta carry the scan's own qform and sform: codes and matrices.

    A qform cannot hold a shear and may differ from the sform; rewriting both from one affine changed it."""
    qform = np.diag([-0.8, 0.7, 2.5, 1.0])
    qform[:3, 3] = (100.0, -20.0, 7.5)
    source = _two_form_source(tmp_path / "scan.nii.gz", sform, qform)
    scan = nib.load(str(source))
    image, meta = load_volume(source)
    written = nib.load(str(save_volume(tmp_path / "labels.nii.gz", (image > 50).astype(np.uint8), meta)))
    for kind in ("qform", "sform"):
        matrix, code = getattr(written, f"get_{kind}")(coded=True)
        expected, expected_code = getattr(scan, f"get_{kind}")(coded=True)
        assert code == expected_code
        np.testing.assert_allclose(matrix, expected, atol=1e-6, err_msg=kind)
    # The same through the JSON form of the meta (how the napari layers keep it).
    again = VolumeMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    rewritten = nib.load(str(save_volume(tmp_path / "again.nii.gz", (image > 50).astype(np.uint8), again)))
    np.testing.assert_allclose(rewritten.get_qform(), scan.get_qform(), atol=1e-5)
    np.testing.assert_allclose(rewritten.get_sform(), scan.get_sform(), atol=1e-6)


def test_a_meta_with_a_new_affine_is_written_with_that_affine(tmp_path):
    """Keeping the source's forms applies only while the meta still has the source's affine."""
    source = _two_form_source(tmp_path / "scan.nii.gz", OBLIQUE_AFFINE, np.diag([0.8, 0.7, 2.5, 1.0]))
    image, meta = load_volume(source)
    meta.affine, meta.spacing = np.diag([-2.0, 2.0, 2.0, 1.0]), (2.0, 2.0, 2.0)
    written = nib.load(str(save_volume(tmp_path / "moved.nii.gz", image, meta)))
    np.testing.assert_allclose(written.get_sform(), meta.affine)
    np.testing.assert_allclose(written.get_qform(), meta.affine)


def test_running_out_of_memory_while_reading_is_not_reported_as_a_bad_file(tmp_path, ramp, monkeypatch):
    """A valid scan that does not fit in memory raises MemoryError naming the file, not a one-line
    VolumeReadError saying the header is wrong (which a cohort would skip and carry on after)."""
    path = _write_nifti(tmp_path / "big_but_valid.nii.gz", ramp)

    def out_of_memory(self, *args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", out_of_memory)
    with pytest.raises(MemoryError, match=r"big_but_valid\.nii\.gz.*\(5, 6, 7\)") as info:
        load_volume(path)
    assert not isinstance(info.value, VolumeReadError)


def test_a_header_describing_more_data_than_the_file_can_hold_is_a_read_error(tmp_path):
    """A gzip stream expands at most ~1032-fold: a 2 GB image in a tiny file is a broken header."""
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 512))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    path = tmp_path / "impossible.nii.gz"
    import gzip

    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\x00" * 4 + b"\x00" * 1000)
    with pytest.raises(VolumeReadError, match=r"impossible\.nii\.gz: header describes .*\(1024, 1024, 512\)"):
        load_volume(path)


def test_spacing_falls_back_to_the_affine_where_pixdim_is_unusable(tmp_path, ramp):
    path = _write_nifti(tmp_path / "nozooms.nii", ramp, affine=OBLIQUE_AFFINE, qform_code=0, sform_code=1)
    image = nib.load(str(path))
    image.header["pixdim"][1:4] = np.nan     # (zeros nibabel itself replaces by 1 on reading)
    nib.save(image, str(path))
    _, meta = load_volume(path)
    np.testing.assert_allclose(meta.spacing, np.sqrt((OBLIQUE_AFFINE[:3, :3] ** 2).sum(axis=0)), rtol=1e-6)


def test_staged_files_replace_their_targets_together_or_not_at_all(tmp_path, monkeypatch):
    from pathlib import Path

    from medconddiff.atomic import StagedFiles

    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("old a")
    with StagedFiles(tmp_path / ".staging") as staging:
        staging.file(first).write_text("new a")
        staging.file(second).write_text("new b")
        staging.commit()
    assert (first.read_text(), second.read_text()) == ("new a", "new b")
    assert not (tmp_path / ".staging").exists()

    # Stopped before commit: nothing changes.
    with StagedFiles(tmp_path / ".staging") as staging:
        staging.file(first).write_text("never")
    assert first.read_text() == "new a"

    # The second move fails: the first target is put back as it was, the second stays as it was.
    real_replace = os.replace

    def failing_replace(source, target):
        if Path(source).name == "1-b.txt":
            raise OSError("disk gone")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        with StagedFiles(tmp_path / ".staging") as staging:
            staging.file(first).write_text("newer a")
            staging.file(second).write_text("newer b")
            staging.commit()
    assert (first.read_text(), second.read_text()) == ("new a", "new b")


# ----------------------------------------------------------------------------- damaged and unusual files


def _flipped_copies(path, tmp_path, count=24):
    """Copies of a .nii.gz with one byte of the middle of its deflate stream inverted, each its own file."""
    whole = path.read_bytes()
    middle = len(whole) // 2
    copies = []
    for position in range(middle, middle + count):
        damaged = bytearray(whole)
        damaged[position] ^= 0xFF
        copy = tmp_path / f"flipped_{position}.nii.gz"
        copy.write_bytes(bytes(damaged))
        copies.append(copy)
    return copies


def test_a_gzip_stream_with_one_flipped_byte_is_refused_not_read_with_wrong_voxels(tmp_path):
    """nibabel reads exactly the data bytes, and gzip checks its CRC only at the end of the stream: about
    half of such files used to load with wrong voxels. Every one must now be a one-line read error."""
    rng = np.random.default_rng(0)
    scan = np.cumsum(rng.integers(-3, 4, size=(40, 40, 12)), axis=0).astype(np.int16)   # compresses like a scan
    source = _write_nifti(tmp_path / "scan.nii.gz", scan)
    copies = _flipped_copies(source, tmp_path)
    read_silently_by_nibabel = 0
    for copy in copies:
        try:
            read_silently_by_nibabel += not np.array_equal(np.asanyarray(nib.load(str(copy)).dataobj), scan)
        except Exception:
            pass
        with pytest.raises(VolumeReadError, match=rf"{copy.name}: .*(corrupt|truncated)") as info:
            load_volume(copy)
        assert "\n" not in str(info.value)
    assert read_silently_by_nibabel, "no copy exercises the end-of-stream check"


def test_one_channel_of_a_4d_gzip_file_is_checked_to_the_end_of_the_stream(tmp_path, ramp):
    """Channel 0 lies at the start of the stream: a flipped byte after it must still be noticed."""
    rng = np.random.default_rng(1)
    volumes = np.cumsum(rng.integers(-3, 4, size=(30, 30, 8, 3)), axis=0).astype(np.int16)
    source = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(volumes, np.eye(4)), str(source))
    whole = bytearray(source.read_bytes())
    whole[len(whole) - 400] ^= 0xFF       # in the last volume's data
    damaged = tmp_path / "damaged_four_d.nii.gz"
    damaged.write_bytes(bytes(whole))
    with pytest.raises(VolumeReadError, match=r"damaged_four_d\.nii\.gz: .*(corrupt|truncated)"):
        load_volume(damaged, channel=0)
    array, _ = load_volume(source, channel=2)          # an intact file reads as before
    np.testing.assert_array_equal(array, volumes[..., 2])


def _header_with_unusable_sform(data, srow_x):
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header.set_zooms((0.8, 0.9, 2.5))
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = srow_x, [0, 0.9, 0, 0], [0, 0, 2.5, 0]
    return header


@pytest.mark.parametrize("srow_x", [[0, 0, 0, 0], [np.nan, 0, 0, 0]], ids=["singular", "nan"])
def test_a_singular_or_nan_affine_is_read_as_unknown_and_written_back_with_codes_0(tmp_path, ramp, srow_x):
    """README: such a file is processed in voxel order with a warning and written back with codes 0 (a
    singular affine failed at writing, a NaN one already at reading)."""
    path = tmp_path / "bad_affine.nii.gz"
    nib.save(nib.Nifti1Image(ramp, None, header=_header_with_unusable_sform(ramp, srow_x)), str(path))
    _, meta = load_volume(path)
    assert not meta.affine_known and meta.geometry_note
    assert np.isfinite(meta.affine).all() and meta.spacing == pytest.approx((0.8, 0.9, 2.5))
    json.dumps(meta.to_dict(), allow_nan=False)       # the sidecar records it
    written = nib.load(str(save_volume(tmp_path / "labels.nii.gz", (ramp > 0).astype(np.uint8), meta)))
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (0, 0)
    assert written.header.get_zooms() == pytest.approx((0.8, 0.9, 2.5))
    assert VolumeMeta.from_dict(json.loads(json.dumps(meta.to_dict()))).affine_known is False


@pytest.mark.parametrize("srow_x", [[0, 0, 0, 0], [np.nan, 0, 0, 0]], ids=["singular", "nan"])
def test_a_broken_sform_gives_way_to_a_coded_qform_that_places_the_scan(tmp_path, ramp, srow_x):
    """NIfTI's qform method still places the voxels: the scan was processed in voxel order and its labels
    written with codes 0, the file's valid LPS qform thrown away."""
    header = _header_with_unusable_sform(ramp, srow_x)
    lps = np.diag([-0.8, -0.9, 2.5, 1.0])
    lps[:3, 3] = [40.0, 30.0, -20.0]
    header.set_qform(lps, code=1)
    path = tmp_path / "broken_sform.nii.gz"
    nib.save(nib.Nifti1Image(ramp, None, header=header), str(path))
    _, meta = load_volume(path)
    assert meta.affine_known and meta.orientation == ("L", "P", "S")
    np.testing.assert_allclose(meta.affine, lps)
    written = nib.load(str(save_volume(tmp_path / "labels.nii.gz", (ramp > 0).astype(np.uint8), meta)))
    np.testing.assert_allclose(written.header.get_qform(), lps)
    np.testing.assert_allclose(written.affine, lps)
    assert int(written.header["qform_code"]) == 1


@pytest.mark.parametrize("unit, mm_per_unit", [("meter", 1000.0), ("micron", 0.001)])
def test_spatial_units_in_metres_or_microns_are_read_and_written_as_mm(tmp_path, ramp, unit, mm_per_unit):
    """The same oblique scan stored in metres or microns: read in mm, and a result written from it lies
    where the scan lies (mm units, mm affine)."""
    stored_affine = OBLIQUE_AFFINE.copy()
    stored_affine[:3] /= mm_per_unit
    path = _write_nifti(tmp_path / f"in_{unit}.nii.gz", ramp, affine=stored_affine)
    image = nib.load(str(path))
    image.header.set_xyzt_units(unit, "sec")
    nib.save(image, str(path))

    _, meta = load_volume(path)

    np.testing.assert_allclose(meta.affine, OBLIQUE_AFFINE, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(meta.spacing, np.sqrt((OBLIQUE_AFFINE[:3, :3] ** 2).sum(axis=0)), rtol=1e-5)
    assert meta.affine_known and meta.orientation == ("L", "A", "S")
    assert nifti.read_meta(path).spacing == meta.spacing
    written = nib.load(str(save_volume(tmp_path / "labels.nii.gz", (ramp > 0).astype(np.uint8), meta)))
    assert written.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(written.affine, OBLIQUE_AFFINE, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(written.header.get_zooms(), meta.spacing, rtol=1e-5)
    # The qform (a rotation: it cannot hold this affine's shear) is the stored one, in mm.
    stored_qform_in_mm = image.header.get_qform()
    stored_qform_in_mm[:3] *= mm_per_unit
    np.testing.assert_allclose(written.header.get_qform(), stored_qform_in_mm, rtol=1e-4, atol=1e-3)


def _plain_nii_with_dims(tmp_path, name, dims):
    """A valid small .nii whose header's dim field is then overwritten (a damaged header)."""
    path = _write_nifti(tmp_path / name, np.zeros((16, 16, 4), np.int16))
    raw = bytearray(path.read_bytes())
    import struct

    struct.pack_into("<8h", raw, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    path.write_bytes(bytes(raw))
    return path


def test_an_uncompressed_header_describing_more_data_than_the_file_holds_is_a_read_error(tmp_path):
    """30000³ voxels in a 2 kB .nii: refused from the file size, not by running out of memory."""
    path = _plain_nii_with_dims(tmp_path, "huge_header.nii", (30000, 30000, 30000))
    with pytest.raises(VolumeReadError, match=r"huge_header\.nii: .*header is damaged.*\(30000, 30000, 30000\)") \
            as info:
        load_volume(path)
    assert "\n" not in str(info.value)


def test_a_negative_image_size_in_the_header_is_a_read_error(tmp_path):
    path = _plain_nii_with_dims(tmp_path, "negative.nii", (16, -16, 4))
    with pytest.raises(VolumeReadError, match=r"negative\.nii: header gives a negative image size"):
        load_volume(path)


def test_a_four_d_label_file_is_refused_as_a_label_map_not_told_to_pick_a_channel(tmp_path):
    """The scan reader's advice ('`--channel N` on the command line') reached evaluate --label, which has none."""
    from medconddiff.nifti import load_labels
    from medconddiff.nifti_read import VolumeReadError

    path = tmp_path / "masks.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.uint8), np.eye(4)), str(path))
    with pytest.raises(VolumeReadError, match="a label map holds one label per voxel") as caught:
        load_labels(path)
    assert "--channel" not in str(caught.value)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 1), np.uint8), np.eye(4)), str(tmp_path / "one.nii.gz"))
    assert load_labels(tmp_path / "one.nii.gz")[0].shape == (4, 4, 3)
