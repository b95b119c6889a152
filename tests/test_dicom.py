"""DICOM in (series folders, single files, enhanced multi-frame) and DICOM SEG out.

Series are written in the tests with pydicom from a 32x32x8 cut of the bundled liver CT
(tests/dicom_helpers.py); pydicom's own test files cover a real CT slice, a truncated file and an
RGB secondary capture.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2K, HTJ2KLossless, generate_uid

from medconddiff.dicom_geometry import LPS_TO_RAS
from medconddiff.dicom_seg import dicom_seg_segments, read_dicom_seg, write_dicom_seg
from medconddiff.dicom_series import (DicomError, dicom_source, is_dicom_path, list_series, load_dicom_series,
                                      read_dicom_series)
from medconddiff.errors import UserInputError
from medconddiff.nifti import load_labels, load_volume, sample_label_path, sample_scan_path, save_volume
from tests.dicom_helpers import (PATIENT, PATIENT_FOLDER, oblique_affine, slice_dataset, transcode, write_echoes,
                                 write_rtstruct, write_series)

CLASSES = ("background", "liver", "tumour")
CUT = (slice(40, 72), slice(50, 82), slice(60, 68))


@pytest.fixture(scope="module")
def cut() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(volume, labels, RAS affine) of a 32x32x8 cut of the bundled scan, affine moved with the cut."""
    volume, meta = load_volume(sample_scan_path())
    labels, _ = load_labels(sample_label_path())
    affine = meta.affine.copy()
    affine[:3, 3] = (meta.affine @ np.array([c.start for c in CUT] + [1.0]))[:3]
    return volume[CUT].copy(), labels[CUT].copy(), affine


def ras_position(lps_position) -> np.ndarray:
    return (LPS_TO_RAS @ np.append(np.asarray(lps_position, dtype=float), 1.0))[:3]


# --------------------------------------------------------------------------------------------
# the same scan as NIfTI and as DICOM


@pytest.mark.parametrize("stored_as", ["RAS", "LPS", "oblique"])
def test_dicom_series_reads_like_the_same_scan_as_nifti(tmp_path, cut, stored_as):
    volume, _, affine = cut
    if stored_as == "LPS":
        volume = volume[::-1, ::-1, :]
        flip_ij = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip_ij[:2, 3] = 31                                  # new voxel (i, j) is old voxel (31 - i, 31 - j)
        affine = affine @ flip_ij
    elif stored_as == "oblique":
        affine = oblique_affine()
    nifti_path = save_volume(tmp_path / "scan.nii.gz", volume, _meta(affine))
    nifti_volume, nifti_meta = load_volume(nifti_path)
    write_series(tmp_path / "series", nifti_volume, nifti_meta.affine)

    dicom_volume, dicom_meta = load_dicom_series(tmp_path / "series")

    assert dicom_volume.dtype == np.float32
    np.testing.assert_array_equal(dicom_volume, nifti_volume)
    np.testing.assert_allclose(dicom_meta.affine, nifti_meta.affine, atol=1e-6)
    np.testing.assert_allclose(dicom_meta.spacing, nifti_meta.spacing, atol=1e-6)
    assert dicom_meta.orientation == nifti_meta.orientation
    assert dicom_meta.affine_known and dicom_meta.original_ndim == 3


def test_left_handed_nifti_comes_back_with_slices_sorted_along_the_normal(tmp_path, cut):
    """DICOM has no slice order of its own: slices ascend along the normal, so a left-handed (LAS)
    NIfTI comes back with k reversed, and every voxel at the same world position."""
    volume, _, affine = cut
    las_volume = volume[::-1]
    flip_i = np.diag([-1.0, 1, 1, 1])
    flip_i[0, 3] = 31
    las_affine = affine @ flip_i
    write_series(tmp_path, las_volume, las_affine)
    scan = read_dicom_series(tmp_path)
    flip_k = np.diag([1.0, 1, -1, 1])
    flip_k[2, 3] = 7
    np.testing.assert_array_equal(scan.volume, las_volume[:, :, ::-1])
    np.testing.assert_allclose(scan.meta.affine, las_affine @ flip_k, atol=1e-6)


def test_affine_agrees_with_highdicoms_volume(tmp_path, cut):
    import highdicom as hd

    volume, _, _ = cut
    paths = write_series(tmp_path, volume, oblique_affine())
    reference = hd.get_volume_from_series([pydicom.dcmread(p) for p in paths], dtype=np.float32)
    reference_ras = hd.volume.convert_affine_to_convention(reference.affine, "LPS", "RAS")
    scan = read_dicom_series(tmp_path)
    for corner in np.ndindex(2, 2, 2):
        index = np.array(corner) * (np.array(reference.array.shape) - 1)          # (slice, row, column)
        world = reference_ras @ np.append(index, 1.0)
        ijk = np.linalg.solve(scan.meta.affine, world)[:3]
        np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-6)
        i, j, k = np.rint(ijk).astype(int)
        assert scan.volume[i, j, k] == reference.array[tuple(index)]


def test_rescale_slope_and_intercept_give_hounsfield_units(tmp_path, cut):
    volume, _, affine = cut
    write_series(tmp_path, volume, affine, slope=0.5, intercept=-2000.0)
    np.testing.assert_array_equal(load_dicom_series(tmp_path)[0], volume)


def test_pydicoms_ct_slice_reads_as_a_2d_image_in_hu():
    path = get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    scan = read_dicom_series(path)
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert is_dicom_path(path) and not is_dicom_path(sample_scan_path())
    assert scan.volume.shape == (dataset.Columns, dataset.Rows, 1)
    assert scan.meta.original_ndim == 2
    np.testing.assert_array_equal(scan.volume[:, :, 0], expected.T)
    np.testing.assert_allclose(scan.meta.affine[:3, 3], ras_position(dataset.ImagePositionPatient), atol=1e-6)
    assert any("one slice" in note for note in scan.source.notes)


@pytest.mark.parametrize("compressed", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_files_an_installed_decoder_reads_match_the_uncompressed_one(compressed):
    from pydicom.pixels import get_decoder

    path = get_testdata_file(compressed)
    if path is None or not get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID).is_available:
        pytest.skip(f"{compressed} or its decoder is not available here")
    reference = read_dicom_series(get_testdata_file("MR_small.dcm"))
    scan = read_dicom_series(path)
    np.testing.assert_array_equal(scan.volume, reference.volume)
    np.testing.assert_allclose(scan.meta.affine, reference.meta.affine)


@pytest.mark.parametrize("syntax, uid", [
    ("JPEGLosslessProcess14_1", "1.2.840.10008.1.2.4.70"),     # what most PACS exports hold
    ("JPEGLosslessProcess14", "1.2.840.10008.1.2.4.57"),
    ("JPEGLSLossless", "1.2.840.10008.1.2.4.80"),
    ("JPEG2000Lossless", "1.2.840.10008.1.2.4.90"),
    ("RLELossless", "1.2.840.10008.1.2.5"),
])
def test_compressed_series_reads_exactly_like_the_uncompressed_one(tmp_path, cut, syntax, uid):
    volume, _, _ = cut
    affine = oblique_affine()
    plain = write_series(tmp_path / "plain", volume, affine, slope=0.5, intercept=-1024.0)
    compressed = transcode(plain, tmp_path / "compressed", syntax)
    header = pydicom.dcmread(compressed[0], stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == uid and header.file_meta.TransferSyntaxUID.is_compressed
    reference, scan = read_dicom_series(tmp_path / "plain"), read_dicom_series(tmp_path / "compressed")
    np.testing.assert_array_equal(scan.volume, reference.volume)
    np.testing.assert_allclose(scan.volume, volume, atol=0.25)     # stored at slope 0.5: rounding only
    np.testing.assert_allclose(scan.meta.affine, reference.meta.affine)


def test_enhanced_multiframe_file_reads_like_its_series(tmp_path, cut):
    import highdicom as hd

    volume, _, _ = cut
    affine = oblique_affine()
    paths = write_series(tmp_path / "series", volume, affine)
    # Frames stored against the slice order: the reader must sort them by position.
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths[::-1]], series_instance_uid=hd.UID(), series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    scan = read_dicom_series(tmp_path / "enhanced.dcm")
    np.testing.assert_array_equal(scan.volume, volume)
    np.testing.assert_allclose(scan.meta.affine, affine, atol=1e-6)
    assert scan.source.frame_numbers == tuple(range(8, 0, -1))


# --------------------------------------------------------------------------------------------
# several series, scouts, gaps, tilt, orientations


def test_two_series_need_a_choice_listed_one_line_each(tmp_path, cut):
    volume, _, affine = cut
    write_series(tmp_path / "a", volume, affine, series_number=2, description="abdomen")
    write_series(tmp_path / "b", volume[:, :, :4], affine, series_number=7, description="low dose")
    infos = list_series(tmp_path)
    assert [(i.number, i.description, i.instances, i.size) for i in infos] == [
        (2, "abdomen", 8, (32, 32)), (7, "low dose", 4, (32, 32))]
    with pytest.raises(DicomError) as error:
        read_dicom_series(tmp_path)
    message = str(error.value)
    assert isinstance(error.value, UserInputError)
    assert "2 DICOM series" in message and "--series" in message
    assert infos[0].line() in message.splitlines() [1] and infos[1].line() in message.splitlines()[2]
    assert read_dicom_series(tmp_path, series=7).volume.shape == (32, 32, 4)
    assert read_dicom_series(tmp_path, series="2").volume.shape == (32, 32, 8)
    assert read_dicom_series(tmp_path, series=infos[1].uid).volume.shape == (32, 32, 4)
    with pytest.raises(DicomError, match="no series with number or UID 9"):
        read_dicom_series(tmp_path, series=9)


def test_two_series_with_one_number_need_the_uid(tmp_path, cut):
    volume, _, affine = cut
    write_series(tmp_path / "a", volume, affine, series_number=3)
    write_series(tmp_path / "b", volume, affine, series_number=3)
    with pytest.raises(DicomError, match="2 series have number or UID 3; choose one by the UID shown"):
        read_dicom_series(tmp_path, series=3)


def test_scout_in_another_orientation_in_the_same_series_is_left_out(tmp_path, cut):
    volume, _, affine = cut
    uid, frame = generate_uid(), generate_uid()
    write_series(tmp_path, volume, affine, series_uid=uid, frame_uid=frame)
    sagittal = slice_dataset(volume[:, 0, :].T, position_lps=(0, 0, 0), row_dir=(0, 1, 0), col_dir=(0, 0, -1),
                             pixel_spacing=(1, 1), series_uid=uid, study_uid=generate_uid(), frame_uid=frame,
                             image_type=("ORIGINAL", "PRIMARY", "OTHER"))
    sagittal.save_as(tmp_path / "scout.dcm", enforce_file_format=True)
    scan = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(scan.volume, volume)
    np.testing.assert_allclose(scan.meta.affine, affine, atol=1e-6)
    # Named by series and instance number, never by file name (exports name files after the patient).
    assert any("another orientation" in note and "series 1 image 1" in note and "scout.dcm" not in note
               for note in scan.source.notes)
    assert len(scan.source.sop_instance_uids) == 8


def test_single_off_stack_slice_in_the_same_orientation_is_left_out(tmp_path, cut):
    """The case that silently changed a CT's spacing from 0.700 to 0.817 mm elsewhere."""
    volume, _, affine = cut
    uid, frame = generate_uid(), generate_uid()
    write_series(tmp_path, volume, affine, series_uid=uid, frame_uid=frame)
    lps = LPS_TO_RAS @ affine
    beside = (lps @ [0, 0, 3.4, 1])[:3] + np.array([60.0, -40.0, 0.0])
    slice_dataset(volume[:, :, 0].T, position_lps=beside, row_dir=lps[:3, 0], col_dir=lps[:3, 1], pixel_spacing=(1, 1),
                  series_uid=uid, study_uid=generate_uid(), frame_uid=frame).save_as(tmp_path / "extra.dcm",
                                                                                  enforce_file_format=True)
    scan = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(scan.volume, volume)
    assert scan.meta.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert any("beside the stack" in note and "series 1 image 1" in note and "extra.dcm" not in note
               for note in scan.source.notes)


def test_localizer_image_type_is_left_out(tmp_path, cut):
    volume, _, affine = cut
    uid = generate_uid()
    write_series(tmp_path, volume, affine, series_uid=uid)
    write_series(tmp_path, volume[:, :, :1], affine, series_uid=uid, prefix="loc",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    scan = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(scan.volume, volume)
    assert any("left out 1 localizer image(s): series 1 image 1" in note for note in scan.source.notes)


@pytest.mark.parametrize("tag, word", [("EchoNumbers", "echo"), ("EchoTime", "echo time"),
                                       ("TemporalPositionIdentifier", "phase"), ("DiffusionBValue", "b-value")])
def test_a_series_of_several_echoes_or_phases_splits_into_one_volume_each(tmp_path, cut, tag, word):
    volume, _, affine = cut
    second = volume * 0.5 + 100.0
    uid = write_echoes(tmp_path, [volume, second], oblique_affine(), tag=tag)
    infos = list_series(tmp_path)
    assert [info.name for info in infos] == [f"series 1 'synthetic CT' ({word} 1)", f"series 1 'synthetic CT' ({word} 2)"]
    key = word.replace(" ", "_")
    assert [info.uid for info in infos] == [f"{uid}#{key}_1", f"{uid}#{key}_2"]
    for info, expected in zip(infos, (volume, second)):
        scan = read_dicom_series(tmp_path, info.uid)
        np.testing.assert_allclose(scan.volume, expected, atol=0.5)
        assert scan.source.series_uid == uid and len(scan.source.sop_instance_uids) == volume.shape[2]
        assert scan.source.name == info.name and scan.source.to_dict()["part"] == info.part   # sidecars say which
    with pytest.raises(DicomError, match="holds 2 DICOM series"):
        read_dicom_series(tmp_path)
    for chosen in (1, uid):      # its number and its own UID name both parts
        with pytest.raises(DicomError, match=f"2 series have number or UID {chosen}; choose one by the UID shown") \
                as error:
            read_dicom_series(tmp_path, chosen)
        assert f"{uid}#{key}_2" in str(error.value)


def test_a_series_of_several_echoes_at_several_phases_splits_by_both(tmp_path, cut):
    """Echo alone or phase alone leaves two images at each position; the pair of them does not."""
    volume, _, affine = cut
    uid, expected = generate_uid(), {}
    for echo, phase in itertools.product((1, 2), (1, 2, 10)):
        part = volume * (1.0 + 0.1 * echo) + 7.0 * phase
        for path in write_series(tmp_path, part, affine, series_uid=uid, prefix=f"e{echo}p{phase}_"):
            dataset = pydicom.dcmread(path)
            dataset.EchoNumbers, dataset.TemporalPositionIdentifier = echo, phase
            dataset.save_as(path, enforce_file_format=True)
        expected[f"echo {echo}, phase {phase}"] = part
    infos = list_series(tmp_path)
    # Phase 10 after phase 2: numbers in their natural order.
    assert [info.part for info in infos] == list(expected)
    assert infos[5].uid == f"{uid}#echo_2_phase_10" and infos[5].name == "series 1 'synthetic CT' (echo 2, phase 10)"
    for info in infos:
        np.testing.assert_allclose(read_dicom_series(tmp_path, info.uid).volume, expected[info.part], atol=0.5)


def test_two_images_at_one_position_with_nothing_to_tell_them_apart_are_refused(tmp_path, cut):
    volume, _, affine = cut
    write_echoes(tmp_path, [volume, volume + 1.0], affine, tag="")
    (info,) = list_series(tmp_path)
    assert not info.part
    with pytest.raises(DicomError, match="two slices at one position"):
        read_dicom_series(tmp_path)


def test_a_tag_that_differs_on_every_image_does_not_split_a_series_into_single_images(tmp_path, cut):
    """Two acquisitions at the same positions, each image with its own Trigger Time (as some scanners write
    one per image): split by acquisition, not into 16 one-image "series" by trigger time."""
    volume, _, affine = cut
    uid = write_echoes(tmp_path, [volume, volume + 50.0], affine, tag="AcquisitionNumber")
    for n, path in enumerate(sorted(tmp_path.iterdir())):
        dataset = pydicom.dcmread(path)
        dataset.TriggerTime = 10.0 * n
        dataset.save_as(path, enforce_file_format=True)
    infos = list_series(tmp_path)
    assert [info.uid for info in infos] == [f"{uid}#acquisition_1", f"{uid}#acquisition_2"]
    np.testing.assert_allclose(read_dicom_series(tmp_path, f"{uid}#acquisition_2").volume, volume + 50.0, atol=0.5)


def test_two_images_sharing_one_instance_uid_at_different_positions_are_refused(tmp_path, cut):
    """A faulty anonymiser gave two slices one SOP Instance UID: a SEG written on them could not be read back
    (it names images by that UID), so the series is refused when read, naming it and the two images."""
    volume, _, affine = cut
    paths = write_series(tmp_path, volume, affine, series_number=4)
    first, second = pydicom.dcmread(paths[1]), pydicom.dcmread(paths[2])
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    second.save_as(paths[2], enforce_file_format=True)
    assert len(list_series(tmp_path)) == 1               # listed as the series it is; refused when read
    with pytest.raises(DicomError) as error:
        read_dicom_series(tmp_path)
    message = str(error.value)
    assert message.startswith("series 4 'synthetic CT': ") and "share one SOP Instance UID" in message
    assert "series 4 image 2" in message and "series 4 image 3" in message and "\n" not in message


def test_a_copy_of_a_file_is_read_once_and_named(tmp_path, cut):
    """A series exported twice into one folder (same SOP Instance UIDs) reads as the series, with a note;
    it used to be refused as two slices at one position."""
    volume, _, affine = cut
    paths = write_series(tmp_path, volume, affine)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(paths[1], copy / paths[1].name)
    scan = read_dicom_series(tmp_path)
    np.testing.assert_allclose(scan.volume, volume, atol=0.5)
    assert any("skipped 1 duplicate file(s)" in note and "position): series 1 image 2" in note
               and paths[1].name not in note for note in scan.source.notes)


def test_missing_slice_is_refused_naming_the_gap(tmp_path, cut):
    volume, _, affine = cut
    paths = write_series(tmp_path, volume, affine, skip=(3,))
    with pytest.raises(DicomError) as error:
        read_dicom_series(tmp_path)
    message = str(error.value)
    assert "not evenly spaced: 2.000 mm" in message and "expected 1.000 mm" in message
    assert "about 1 slice(s) missing" in message
    assert "series 1 image 3" in message and "series 1 image 5" in message      # the slices either side (k=2, k=4)
    assert "\n" not in message


def test_uneven_spacing_is_refused(tmp_path, cut):
    volume, _, affine = cut
    steps = [0, 1, 2, 3, 4.3, 5.3, 6.3, 7.3]
    positions = [(LPS_TO_RAS @ affine @ [0, 0, z, 1])[:3] for z in steps]
    write_series(tmp_path, volume, affine, positions_lps=positions)
    with pytest.raises(DicomError, match=r"not evenly spaced: 1\.300 mm .* expected 1\.000 mm"):
        read_dicom_series(tmp_path)


def test_gantry_tilt_is_kept_as_acquired_with_a_sheared_affine(tmp_path, cut):
    volume, _, affine = cut
    lps = LPS_TO_RAS @ affine
    shear = np.array([0.0, 0.268, 0.0])                       # posterior drift per 1 mm slice: 15 degrees
    positions = [(lps @ [0, 0, k, 1])[:3] + k * shear for k in range(8)]
    write_series(tmp_path, volume, affine, positions_lps=positions)
    scan = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(scan.volume, volume)
    for k in range(8):                                         # every slice exactly where its file says
        np.testing.assert_allclose((scan.meta.affine @ [0, 0, k, 1])[:3], ras_position(positions[k]), atol=1e-6)
    assert any("gantry tilt of 15.00 degrees" in note and "not resampled" in note for note in scan.source.notes)


def test_equal_groups_of_orientations_are_refused(tmp_path, cut):
    volume, _, affine = cut
    uid = generate_uid()
    write_series(tmp_path, volume[:, :, :4], affine, series_uid=uid, prefix="ax")
    sagittal = affine[:, [1, 2, 0, 3]]
    write_series(tmp_path, volume[:, :, :4], sagittal, series_uid=uid, prefix="sag")
    with pytest.raises(DicomError, match="2 orientations of equal weight"):
        read_dicom_series(tmp_path)


def test_majority_orientation_is_the_stack(tmp_path, cut):
    volume, _, affine = cut
    uid = generate_uid()
    write_series(tmp_path, volume, affine, series_uid=uid, prefix="ax")
    write_series(tmp_path, volume[:, :, :3], affine[:, [1, 2, 0, 3]], series_uid=uid, prefix="cor")
    scan = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(scan.volume, volume)
    assert any("left out 3 slice(s) in another orientation" in note for note in scan.source.notes)


def test_two_slices_at_one_position_are_refused(tmp_path, cut):
    volume, _, affine = cut
    uid = generate_uid()
    write_series(tmp_path, volume, affine, series_uid=uid, prefix="a")
    write_series(tmp_path, volume[:, :, :1], affine, series_uid=uid, prefix="echo2")
    with pytest.raises(DicomError, match="two slices at one position"):
        read_dicom_series(tmp_path)


def test_one_file_of_a_split_series_reads_its_own_echo_with_the_files_beside_it(tmp_path, cut):
    volume, _, affine = cut
    second = volume * 0.5 + 100.0
    uid = write_echoes(tmp_path, [volume, second], affine)
    one_file = sorted(tmp_path.glob("e2_*"))[1]
    scan = read_dicom_series(one_file)
    np.testing.assert_allclose(scan.volume, second, atol=0.5)
    assert scan.source.series_uid == uid and scan.source.name.endswith("(echo 2)")
    assert any(f"the file given is one of {volume.shape[2]} files of its series" in note for note in scan.source.notes)
    assert all(one_file.name not in note for note in scan.source.notes)    # nor the file's (Siemens: the patient's)
    assert all(tmp_path.name not in note for note in scan.source.notes)    # a folder's name may be the patient's


def test_one_slice_series_is_a_2d_image(tmp_path, cut):
    volume, _, affine = cut
    write_series(tmp_path, volume[:, :, :1], affine, thickness=2.5)
    scan = read_dicom_series(tmp_path)
    assert scan.volume.shape == (32, 32, 1) and scan.meta.original_ndim == 2
    assert scan.meta.spacing == pytest.approx((1.0, 1.0, 2.5))
    assert any("one slice: read as a 2-D image" in note for note in scan.source.notes)


# --------------------------------------------------------------------------------------------
# bad input: one line naming the file or series


def test_folder_without_dicom_names_the_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan")
    with pytest.raises(DicomError) as error:
        list_series(tmp_path)
    assert str(tmp_path) in str(error.value) and "no DICOM image" in str(error.value)
    assert "skipped 1 file(s) that are not DICOM" in str(error.value) and "notes.txt" not in str(error.value)
    assert not is_dicom_path(tmp_path)


def test_non_dicom_files_beside_a_series_are_skipped_with_a_note(tmp_path, cut):
    volume, _, affine = cut
    write_series(tmp_path, volume, affine)
    (tmp_path / "README.txt").write_text("export notes")
    infos = list_series(tmp_path)
    assert len(infos) == 1 and is_dicom_path(tmp_path)
    assert "skipped 1 file(s) that are not DICOM" in infos.notes      # counted: its name may be the patient's
    assert "skipped 1 file(s) that are not DICOM" in read_dicom_series(tmp_path).source.notes


def test_truncated_file_is_named(tmp_path, cut):
    volume, _, affine = cut
    paths = write_series(tmp_path, volume, affine)
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[:-300])
    with pytest.raises(DicomError, match="series 1 image 5: cannot read its pixel data, the file may be truncated"):
        read_dicom_series(tmp_path)
    with pytest.raises(DicomError, match="series 1 image 1: cannot read its pixel data"):
        read_dicom_series(get_testdata_file("MR_truncated.dcm"))


def test_file_cut_inside_its_header_is_named_not_silently_left_out(tmp_path, cut):
    """pydicom returns what it parsed of a file cut short; the last slice must not just vanish."""
    volume, _, affine = cut
    paths = write_series(tmp_path / "scan", volume, affine)
    paths[7].write_bytes(paths[7].read_bytes()[:700])           # cut before its series UID
    with pytest.raises(DicomError) as error:
        read_dicom_series(tmp_path / "scan")
    # Cut before its instance number too: named by its place among the folder's files.
    place = sorted(paths).index(paths[7]) + 1
    assert f"cannot read 1 DICOM file(s) stored with this series: image #{place} (truncated" in str(error.value)
    assert any(f"image #{place} (truncated" in note for note in list_series(tmp_path / "scan").notes)
    # Stored in a folder of its own, it cannot belong to the series: a note only.
    (tmp_path / "junk").mkdir()
    paths[7].rename(tmp_path / "junk" / "cut.dcm")
    write_series(tmp_path / "scan", volume[:, :, 7:], affine @ _shift_k(7),
                 series_uid=str(pydicom.dcmread(paths[0]).SeriesInstanceUID), prefix="last")
    scan = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(scan.volume, volume)
    assert any("image #1 (truncated" in note and "junk" not in note for note in scan.source.notes)


def _shift_k(k: int) -> np.ndarray:
    shift = np.eye(4)
    shift[2, 3] = k
    return shift


def test_images_of_different_sizes_in_one_series_are_refused(tmp_path, cut):
    volume, _, affine = cut
    uid = generate_uid()
    write_series(tmp_path, volume[:, :, :4], affine, series_uid=uid, prefix="a")
    shifted = affine.copy()
    shifted[:3, 3] = (affine @ [0, 0, 4, 1])[:3]
    write_series(tmp_path, volume[:, :30, 4:], shifted, series_uid=uid, prefix="b")
    with pytest.raises(DicomError, match=r"images of different sizes in one series: .* is 32x32, .* is 30x32"):
        read_dicom_series(tmp_path)


def test_rgb_secondary_capture_is_refused(tmp_path):
    shutil.copy(get_testdata_file("SC_rgb_small_odd.dcm"), tmp_path / "capture.dcm")
    with pytest.raises(DicomError, match=r"series 1 image 1 is a colour image \(RGB, 3 samples per pixel\)"):
        read_dicom_series(tmp_path)


def test_compressed_transfer_syntax_without_decoder_is_refused(tmp_path, cut):
    from pydicom.pixels import get_decoder

    # HTJ2K: only pylibjpeg-openjpeg decodes it, and it is no dependency (GDCM reads the usual syntaxes).
    missing = [syntax for syntax in (HTJ2KLossless, HTJ2K) if not get_decoder(syntax).is_available]
    if not missing:
        pytest.skip("an HTJ2K decoder is installed here")
    volume, _, affine = cut
    path = write_series(tmp_path, volume[:, :, :1], affine)[0]
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = missing[0]
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64) + b"\xff\xd9"])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError) as error:
        read_dicom_series(tmp_path)
    assert f"series 1 image 1 is compressed as {missing[0].name}" in str(error.value)
    assert "no installed decoder reads (install one of:" in str(error.value)
    assert "pylibjpeg-openjpeg" in str(error.value)


def _siemens_name(number: int) -> str:
    """A file name as a Siemens export makes it: the patient's name first."""
    return f"{PATIENT_FOLDER}.CT.ABDOMEN.0002.{number:04d}.2026.01.01.12.00.00.123.IMA"


def test_notes_and_errors_name_images_by_series_and_instance_never_by_file_name(tmp_path, cut):
    """Siemens exports name each file after the patient: what was left out or refused is named by series and
    instance number (by its place among the files where it has none), and a file without a readable header
    is counted, its error text stripped of its path."""
    volume, labels, affine = cut
    folder = tmp_path / "export"
    uid, frame = generate_uid(), generate_uid()
    write_series(folder, volume, affine, series_uid=uid, frame_uid=frame, series_number=2)
    write_series(folder, volume[:, :, :1], affine, series_uid=uid, frame_uid=frame, series_number=2, prefix="loc",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    sagittal = slice_dataset(volume[:, 0, :].T, position_lps=(0, 0, 0), row_dir=(0, 1, 0), col_dir=(0, 0, -1),
                             pixel_spacing=(1, 1), series_uid=uid, study_uid=generate_uid(), frame_uid=frame,
                             series_number=2, image_type=("ORIGINAL", "PRIMARY", "OTHER"))
    del sagittal.InstanceNumber
    sagittal.save_as(folder / "scout.dcm", enforce_file_format=True)
    files = sorted(folder.iterdir())
    for number, path in enumerate(files, start=1):
        path.rename(folder / _siemens_name(number))
    (folder / "copy").mkdir()
    shutil.copy(folder / _siemens_name(3), folder / "copy" / _siemens_name(3))        # exported twice
    (folder / f"{PATIENT_FOLDER}.txt").write_text("not DICOM")
    (folder / _siemens_name(99)).symlink_to(tmp_path / f"{PATIENT_FOLDER}_moved.IMA")  # a link to nothing
    scout_place = sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()).index(
        folder / _siemens_name(files.index(folder / "scout.dcm") + 1)) + 1

    infos = list_series(folder)
    scan = read_dicom_series(folder)
    notes = [*infos.notes, *scan.source.notes]
    assert "skipped 1 file(s) that are not DICOM" in notes
    assert any(note.startswith("skipped 1 unreadable DICOM file(s): header unreadable: FileNotFoundError")
               and "the file" in note for note in notes)
    assert any("(same SOP Instance UID and position): series 2 image " in note for note in notes)
    assert "series 2 'synthetic CT': left out 1 localizer image(s): series 2 image 1" in notes
    assert any(f"another orientation (scout/localizer): image #{scout_place}" in note for note in notes)
    texts = [*notes, json.dumps(scan.source.to_dict()), repr(infos)]

    # Errors too: a file cut short, a file gone when the SEG is written.
    slice_file = folder / _siemens_name(5)
    written = write_dicom_seg(tmp_path / "seg.dcm", labels, scan, CLASSES)
    slice_file.rename(tmp_path / "elsewhere.IMA")
    with pytest.raises(DicomError) as gone:
        write_dicom_seg(tmp_path / "seg2.dcm", labels, scan, CLASSES)
    (tmp_path / "elsewhere.IMA").rename(slice_file)
    slice_file.write_bytes(slice_file.read_bytes()[:-300])
    with pytest.raises(DicomError) as cut_short:
        read_dicom_series(folder)
    assert "cannot read the file of slice" in str(gone.value) and "cannot read its pixel data" in str(cut_short.value)
    texts += [str(gone.value), str(cut_short.value)]
    for text in texts:
        assert "Zyxwvut" not in text and "Qqpatientname" not in text and str(folder) not in text, text
    assert written.exists()


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.110", "1.2.826.0.1.3680043.9.7433.99.1"],
                         ids=["JPEG XL", "private"])
def test_a_transfer_syntax_pydicom_does_not_know_refuses_its_series_only(tmp_path, cut, syntax):
    """JPEG XL (DICOM 2024, newer than pydicom 3.0) or a private syntax: pydicom cannot say whether it is
    compressed; it was an internal error ('UID is not a transfer syntax') that also kept the folder's
    other series from opening."""
    volume, _, affine = cut
    write_series(tmp_path / "plain", volume, affine, series_number=3)
    for path in write_series(tmp_path / "xl", volume, affine, series_number=4):
        dataset = pydicom.dcmread(path)
        dataset.file_meta.TransferSyntaxUID = syntax
        pydicom.dcmwrite(path, dataset, implicit_vr=False, little_endian=True, force_encoding=True)
    np.testing.assert_array_equal(read_dicom_series(tmp_path, series=3).volume, volume)
    with pytest.raises(DicomError) as error:
        read_dicom_series(tmp_path, series=4)
    message = str(error.value)
    assert message.startswith("series 4 'synthetic CT': series 4 image ") and f"transfer syntax {syntax}" in message
    assert "export the series uncompressed" in message and "\n" not in message


# --------------------------------------------------------------------------------------------
# DICOM SEG


@pytest.mark.parametrize("geometry", ["axial", "oblique", "tilted"])
def test_seg_round_trip_gives_the_same_labels_at_the_same_voxels(tmp_path, cut, geometry):
    volume, labels, affine = cut
    positions = None
    if geometry == "oblique":
        affine = oblique_affine()
    elif geometry == "tilted":
        positions = [(LPS_TO_RAS @ affine @ [0, 0, k, 1])[:3] + k * np.array([0, 0.268, 0]) for k in range(8)]
    write_series(tmp_path / "series", volume, affine, positions_lps=positions)
    scan = read_dicom_series(tmp_path / "series")
    seg_path = write_dicom_seg(tmp_path / "seg.dcm", labels, scan, CLASSES)

    np.testing.assert_array_equal(read_dicom_seg(seg_path, tmp_path / "series"), labels)
    assert dicom_seg_segments(seg_path) == {1: "liver", 2: "tumour"}
    seg = pydicom.dcmread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == scan.source.series_uid
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(scan.source.sop_instance_uids)
    # Liver and tumour are coded as what they are (SNOMED CT), so a PACS knows more than their labels.
    coded = [(item.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
              item.SegmentedPropertyTypeCodeSequence[0].CodeValue,
              item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) for item in seg.SegmentSequence]
    assert coded == [("91723000", "10200004", "SCT"), ("49755003", "108369006", "SCT")]


def test_seg_codes_classes_it_knows_and_tissue_for_the_others(tmp_path, cut):
    volume, labels, affine = cut
    write_series(tmp_path / "series", volume, affine)
    names = ("background", "Grey_Matter", "c2")
    seg = pydicom.dcmread(write_dicom_seg(tmp_path / "seg.dcm", labels, tmp_path / "series", names))
    types = [(item.SegmentLabel, item.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning,
              item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning) for item in seg.SegmentSequence]
    assert types == [("Grey_Matter", "Anatomical Structure", "Gray Matter"), ("c2", "Anatomical Structure", "Tissue")]


def test_seg_and_structure_set_keep_names_in_any_script_and_the_patients_accented_name(tmp_path, cut):
    """A class typed as "Läsion" or "肝臓" and a patient name of a Latin-1 series reach other readers as
    written: the objects declare UTF-8 (without a declared repertoire the default is ASCII). The series is
    anonymised the way many are: no birth date (type 2, dropped), which highdicom failed on."""
    from medconddiff.dicom_rtstruct_write import write_rtstruct
    from medconddiff.dicom_series import read_dicom_series

    volume, labels, affine = cut
    patient = {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jörg", "PatientID": "X1"}
    write_series(tmp_path / "series", volume, affine, patient=patient)
    names = ("background", "Leber", "Läsion 肝臓")
    seg_path = write_dicom_seg(tmp_path / "seg.dcm", labels, tmp_path / "series", names)
    scan = read_dicom_series(tmp_path / "series")
    rs_path = write_rtstruct(tmp_path / "rs.dcm", labels, scan.meta, scan.source, names)
    for path, labels_of in ((seg_path, lambda ds: [item.SegmentLabel for item in ds.SegmentSequence]),
                            (rs_path, lambda ds: [item.ROIName for item in ds.StructureSetROISequence])):
        written = pydicom.dcmread(path)
        assert written.SpecificCharacterSet == "ISO_IR 192"
        assert labels_of(written) == ["Leber", "Läsion 肝臓"]
        assert str(written.PatientName) == "Müller^Jörg" and written.PatientBirthDate == ""
        assert "Läsion 肝臓".encode("utf-8") in path.read_bytes()


def test_seg_of_an_enhanced_multiframe_source_round_trips(tmp_path, cut):
    import highdicom as hd

    volume, labels, affine = cut
    paths = write_series(tmp_path / "series", volume, affine)
    hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths[::-1]], series_instance_uid=hd.UID(), series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1).save_as(tmp_path / "enhanced.dcm")
    seg_path = write_dicom_seg(tmp_path / "seg.dcm", labels, tmp_path / "enhanced.dcm", CLASSES)
    np.testing.assert_array_equal(read_dicom_seg(seg_path, tmp_path / "enhanced.dcm"), labels)


@pytest.mark.parametrize("stored", ["legacy converted", "MR echo sequence", "frame acquisition number"])
def test_an_enhanced_multiframe_file_of_two_echoes_splits_into_one_volume_each(tmp_path, cut, stored):
    """One enhanced multi-frame file holding both echoes of a dual-echo scan (frames interleaved, two at each
    position): one part per echo, each read like its echo (it used to be refused: two slices at one position)."""
    import highdicom as hd

    volume, labels, _ = cut
    affine = oblique_affine()
    second = volume * 0.5 + 100.0
    tag = "AcquisitionNumber" if stored == "frame acquisition number" else "EchoNumbers"
    write_echoes(tmp_path / "echoes", [volume, second], affine, tag=tag, study_uid=generate_uid(),
                 frame_uid=generate_uid())
    single = sorted((pydicom.dcmread(p) for p in (tmp_path / "echoes").iterdir()),
                    key=lambda d: (float(d.ImagePositionPatient[2]), int(d.get(tag))))
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(single, series_instance_uid=hd.UID(), series_number=7,
                                                        sop_instance_uid=hd.UID(), instance_number=1)
    words = ("acquisition 1", "acquisition 2") if tag == "AcquisitionNumber" else ("echo 1", "echo 2")
    if stored == "frame acquisition number":   # the converter files it in the Frame Content Sequence
        assert "FrameAcquisitionNumber" in enhanced.PerFrameFunctionalGroupsSequence[1].FrameContentSequence[0]
    if stored == "MR echo sequence":     # where an enhanced MR keeps the echo: MR Echo Sequence, per frame
        for item in enhanced.PerFrameFunctionalGroupsSequence:
            unassigned = item.UnassignedPerFrameConvertedAttributesSequence[0]
            echo = pydicom.Dataset()
            echo.EffectiveEchoTime = 4.6 * int(unassigned.EchoNumbers)
            item.MREchoSequence = [echo]
            del unassigned.EchoNumbers
        words = ("echo time 4.6", "echo time 9.2")
    enhanced.save_as(tmp_path / "dual.dcm")
    infos = list_series(tmp_path / "dual.dcm")
    assert [info.part for info in infos] == list(words)
    assert [(info.instances, info.frames) for info in infos] == [(1, volume.shape[2])] * 2
    for info, expected in zip(infos, (volume, second)):
        scan = read_dicom_series(tmp_path / "dual.dcm", info.uid)
        np.testing.assert_allclose(scan.volume, expected, atol=0.5)
        np.testing.assert_allclose(scan.meta.affine, affine, atol=1e-6)
        assert scan.source.name == info.name and len(set(scan.source.frame_numbers)) == volume.shape[2]
    with pytest.raises(DicomError, match="holds 2 DICOM series"):
        read_dicom_series(tmp_path / "dual.dcm")
    # A SEG of one part (it used to be refused: the file repeats each plane position) names only that part's
    # frames, one per SEG frame: it reads back onto that part, and the other part is told it is not its SEG.
    first, second = (read_dicom_series(tmp_path / "dual.dcm", info.uid) for info in infos)
    for own, other, kind in ((first, second, "BINARY"), (second, first, "LABELMAP")):
        seg_path = write_dicom_seg(tmp_path / f"{own.source.part}.dcm", labels, own, CLASSES, segmentation_type=kind)
        seg = pydicom.dcmread(seg_path)
        named = [[int(source.ReferencedFrameNumber) for derivation in item.DerivationImageSequence
                  for source in derivation.SourceImageSequence] for item in seg.PerFrameFunctionalGroupsSequence]
        assert all(len(frames) == 1 for frames in named) and len(named) == int(seg.NumberOfFrames)
        assert {frame for frames in named for frame in frames} <= set(own.source.frame_numbers)
        np.testing.assert_array_equal(read_dicom_seg(seg_path, own), labels)
        with pytest.raises(DicomError, match=r"references none of the frames of series 7 .*\((echo|acquisition)"):
            read_dicom_seg(seg_path, other)
    # A SEG another tool made of one part references that part's frames of the shared file: it reads onto
    # that part, and the other part (same instance UID) is told it is not its SEG, not shown empty labels.
    seg_path = _seg_of_frames(tmp_path / "dual.dcm", first.source.frame_numbers, labels, tmp_path / "other.dcm")
    np.testing.assert_array_equal(read_dicom_seg(seg_path, first), labels == 1)
    with pytest.raises(DicomError, match=r"references none of the frames of series 7 .*\((echo|acquisition)"):
        read_dicom_seg(seg_path, second)


def test_a_seg_whose_segments_overlap_reads_with_the_smaller_segment_on_top(tmp_path, cut):
    """Another tool's SEG holding a tumour inside the liver as two overlapping segments (numbered tumour
    first, so the rule is not 'the higher number wins'): it was refused; it reads, the tumour on top."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    volume, _, affine = cut
    paths = write_series(tmp_path / "series", volume, affine)
    scan = read_dicom_series(tmp_path / "series")
    liver = np.zeros((len(paths),) + volume.shape[1::-1], bool)      # (frames, rows, columns) in file order
    liver[:, 10:40, 10:40] = True
    tumour = np.zeros_like(liver)
    tumour[2:4, 20:26, 20:26] = True
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number, label in ((1, "tumour"), (2, "liver"))]
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(path) for path in paths],
        pixel_array=np.stack([tumour, liver], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="another tool", manufacturer_model_name="x", software_versions="1", device_serial_number="1")
    seg.save_as(tmp_path / "overlap.dcm")
    with pytest.warns(UserWarning, match=r"72 voxel\(s\) lie in more than one segment .* smallest of its segments"):
        labels = read_dicom_seg(tmp_path / "overlap.dcm", scan)
    by_file = {Path(file): k for k, file in enumerate(scan.source.files)}
    expected = np.where(tumour, 1, np.where(liver, 2, 0))              # file order, (frames, rows, columns)
    for frame, path in enumerate(paths):
        np.testing.assert_array_equal(labels[:, :, by_file[path]], expected[frame].T)


def test_another_tools_fractional_seg_reads_at_half(tmp_path, cut):
    """AI tools write FRACTIONAL SEGs (probabilities): one segment, or two that do not overlap, were refused
    ('cannot map the segmentation'); a voxel is in a segment where its value is at least 0.5."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    volume, labels, affine = cut
    paths = write_series(tmp_path / "series", volume, affine)
    scan = read_dicom_series(tmp_path / "series")
    by_uid = {str(dataset.SOPInstanceUID): dataset for dataset in map(pydicom.dcmread, paths)}
    sources = [by_uid[uid] for uid in scan.source.sop_instance_uids]           # slice order
    for count in (1, 2):
        # 0.9 inside each segment, 0.3 on the other foreground (below the threshold), in slice order.
        probabilities = np.stack([np.where(labels == c, 0.9, np.where(labels > 0, 0.3, 0.0))
                                  for c in range(1, count + 1)], axis=-1).transpose(2, 1, 0, 3).astype(np.float32)
        descriptions = [hd.seg.SegmentDescription(
            segment_number=n, segment_label=f"s{n}", segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="AI", family=codes.cid7162.ArtificialIntelligence, version="1")) for n in range(1, count + 1)]
        hd.seg.Segmentation(
            source_images=sources, pixel_array=probabilities, segmentation_type="FRACTIONAL",
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=50,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="AI", manufacturer_model_name="x",
            software_versions="1", device_serial_number="1", max_fractional_value=255).save_as(tmp_path / "frac.dcm")
        assert (labels == 2).any() and ((labels > 0) & (labels != 1)).any()      # 0.3 voxels exist: thresholded
        np.testing.assert_array_equal(read_dicom_seg(tmp_path / "frac.dcm", scan), np.where(labels <= count, labels, 0))


def test_a_seg_of_a_series_it_cannot_reference_is_refused_in_one_line(tmp_path, cut):
    """An image without a Frame of Reference UID, and a series stored as two enhanced multi-frame files, crashed
    as internal errors inside highdicom; each is refused, saying to export NIfTI, before any label is looked at."""
    import highdicom as hd

    volume, labels, affine = cut
    path = write_series(tmp_path / "flat", volume[:, :, :1], affine)[0]
    dataset = pydicom.dcmread(path)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID"):
        delattr(dataset, keyword)
    dataset.save_as(path, enforce_file_format=True)
    flat = read_dicom_series(path)
    paths = sorted(write_series(tmp_path / "single", volume, affine),
                   key=lambda path: int(pydicom.dcmread(path).InstanceNumber))
    uid = hd.UID()
    (tmp_path / "two").mkdir()
    for number, part in enumerate((paths[:4], paths[4:]), start=1):
        hd.legacy.LegacyConvertedEnhancedCTImage(
            [pydicom.dcmread(p) for p in part], series_instance_uid=uid, series_number=7, sop_instance_uid=hd.UID(),
            instance_number=number).save_as(tmp_path / "two" / f"part{number}.dcm")
    two_files = read_dicom_series(tmp_path / "two")
    np.testing.assert_array_equal(two_files.volume, volume)             # it reads; only a SEG of it cannot be
    for scan, expected in ((flat, "has no Frame of Reference UID"), (two_files, "takes its frames from 2 files")):
        target = tmp_path / "seg.dcm"
        with pytest.raises(DicomError) as error:
            write_dicom_seg(target, np.zeros((1, 1, 1)), scan, CLASSES)     # labels of no fit: refused first
        assert str(error.value).startswith(f"seg.dcm: {scan.source.name} ") and expected in str(error.value)
        assert "export NIfTI instead" in str(error.value) and not target.exists()
    # What highdicom refuses beyond those (here a 2-D image without Pixel Spacing) is one line too, not a crash.
    unspaced = write_series(tmp_path / "unspaced", volume[:, :, :1], affine)[0]
    dataset = pydicom.dcmread(unspaced)
    del dataset.PixelSpacing
    dataset.save_as(unspaced, enforce_file_format=True)
    with pytest.raises(DicomError, match=r"^seg.dcm: a DICOM SEG of series 1 'synthetic CT' cannot be written \(.*Pix"):
        write_dicom_seg(tmp_path / "seg.dcm", labels[:, :, :1], read_dicom_series(unspaced), CLASSES)


@pytest.mark.parametrize("algorithm_type", ["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"])
def test_a_seg_says_whether_the_models_output_was_edited(tmp_path, cut, algorithm_type):
    volume, labels, affine = cut
    write_series(tmp_path / "series", volume, affine)
    seg_path = write_dicom_seg(tmp_path / "seg.dcm", labels, tmp_path / "series", CLASSES,
                               algorithm_type=algorithm_type)
    seg = pydicom.dcmread(seg_path)
    assert [item.SegmentAlgorithmType for item in seg.SegmentSequence] == [algorithm_type] * 2
    np.testing.assert_array_equal(read_dicom_seg(seg_path, tmp_path / "series"), labels)


def _rectangle(i0, i1, j0, j1):
    """The polygon around voxels i0..i1 × j0..j1 (inclusive): its edges between voxel centres."""
    return np.array([(i0 - 0.5, j0 - 0.5), (i1 + 0.5, j0 - 0.5), (i1 + 0.5, j1 + 0.5), (i0 - 0.5, j1 + 0.5)])


def test_an_rt_structure_set_fills_its_contours_on_the_series_voxels(tmp_path, cut):
    from medconddiff.dicom_rtstruct import read_rtstruct

    volume, _, affine = cut          # 32 x 32 x 8
    paths = write_series(tmp_path / "series", volume, affine)
    rois = [("BODY", [(k, _rectangle(1, 30, 1, 30)) for k in range(8)]),
            ("liver", [(k, _rectangle(5, 20, 5, 20)) for k in range(1, 5)]),
            ("tumour", [(2, _rectangle(10, 13, 10, 13))]),
            ("ring", [(3, _rectangle(22, 29, 22, 29)), (3, _rectangle(24, 27, 24, 27))]),   # inner contour: a hole
            ("marker", [])]
    rtstruct = write_rtstruct(tmp_path / "series" / "rs.dcm", paths, affine, rois)
    scan = read_dicom_series(tmp_path / "series")          # the RTSTRUCT beside the images is not a series
    found = read_rtstruct(rtstruct, scan)
    expected = np.zeros(volume.shape, np.uint8)
    expected[1:31, 1:31, :] = 1
    expected[5:21, 5:21, 1:5] = 2
    expected[10:14, 10:14, 2] = 3                           # the smallest ROI on top, whatever its number
    expected[22:30, 22:30, 3] = 4
    expected[24:28, 24:28, 3] = 1
    assert found.class_names == ("background", "BODY", "liver", "tumour", "ring")
    np.testing.assert_array_equal(found.labels, expected)
    assert any("left out ROI 'marker'" in note for note in found.notes)
    assert any("1,072 voxel(s) lie in more than one ROI" in note for note in found.notes)
    # Drawn on other images: refused, not filled somewhere else.
    shifted = write_rtstruct(tmp_path / "shifted.dcm", paths, affine, [("liver", [(2.5, _rectangle(5, 20, 5, 20))])])
    with pytest.raises(DicomError, match="does not lie on a slice of this series"):
        read_rtstruct(shifted, scan)


def test_an_rt_structure_set_keeps_the_series_patient_identity_attributes(tmp_path, cut):
    """Like a SEG, the structure set keeps whose ID it is and that the series was de-identified (and how)."""
    from medconddiff.dicom_rtstruct_write import write_rtstruct as write_structure_set

    volume, labels, affine = cut
    identity = {"IssuerOfPatientID": "HOSPITAL-A", "PatientIdentityRemoved": "YES",
                "DeidentificationMethod": "test anonymiser 1.0"}
    write_series(tmp_path / "series", volume, affine, patient={**PATIENT, **identity})
    scan = read_dicom_series(tmp_path / "series")
    written = pydicom.dcmread(write_structure_set(tmp_path / "rs.dcm", labels, scan.meta, scan.source, CLASSES))
    assert {keyword: str(written.get(keyword)) for keyword in identity} == identity
    assert str(written.PatientID) == PATIENT["PatientID"]


def _seg_of_frames(source_path, frame_numbers, labels, path):
    """A SEG of the given frames of a multi-frame file, as another tool would make it: highdicom directly,
    its frames matched to the source's by plane position, each naming the given frame as its source."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = pydicom.dcmread(source_path)
    shared = source.SharedFunctionalGroupsSequence[0]
    position = [hd.PlanePositionSequence("PATIENT", [float(v) for v in source.PerFrameFunctionalGroupsSequence[f - 1]
                                                     .PlanePositionSequence[0].ImagePositionPatient])
                for f in frame_numbers]
    measures = shared.PixelMeasuresSequence[0]
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="liver", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    segmentation = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(source_path, stop_before_pixels=True)],
        pixel_array=np.ascontiguousarray((labels == 1).transpose(2, 1, 0)).astype(np.uint8),
        segmentation_type="BINARY", segment_descriptions=[description], series_instance_uid=hd.UID(),
        series_number=99, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="another tool",
        manufacturer_model_name="x", software_versions="1", device_serial_number="0", plane_positions=position,
        plane_orientation=hd.PlaneOrientationSequence(
            "PATIENT", [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]),
        pixel_measures=hd.PixelMeasuresSequence([float(v) for v in measures.PixelSpacing],
                                                float(measures.SliceThickness)))
    # highdicom names every frame at a plane's position as its source (both echoes); this tool names its own.
    for item in segmentation.PerFrameFunctionalGroupsSequence:
        for derivation in item.DerivationImageSequence:
            derivation.SourceImageSequence = [source_item for source_item in derivation.SourceImageSequence
                                              if int(source_item.ReferencedFrameNumber) in set(frame_numbers)]
    segmentation.save_as(path)
    return path


def test_seg_takes_user_codes_and_labelmap_type(tmp_path, cut):
    volume, labels, affine = cut
    write_series(tmp_path / "series", volume, affine)
    liver = (("123037004", "SCT", "Anatomical Structure"), ("10200004", "SCT", "Liver"))
    seg_path = write_dicom_seg(tmp_path / "seg.dcm", labels, tmp_path / "series", CLASSES,
                               codes={"liver": liver}, segmentation_type="LABELMAP")
    seg = pydicom.dcmread(seg_path)
    types = {item.SegmentNumber: item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning
             for item in seg.SegmentSequence if item.SegmentNumber > 0}    # a label map adds segment 0
    assert types == {1: "Liver", 2: "Tumor"}
    assert dicom_seg_segments(seg_path) == {1: "liver", 2: "tumour"}
    np.testing.assert_array_equal(read_dicom_seg(seg_path, tmp_path / "series"), labels)


def test_seg_is_never_overwritten_unless_asked(tmp_path, cut):
    volume, labels, affine = cut
    write_series(tmp_path / "series", volume, affine)
    source = dicom_source(tmp_path / "series")
    seg_path = write_dicom_seg(tmp_path / "seg.dcm", labels, source, CLASSES)
    before = seg_path.read_bytes()
    with pytest.raises(FileExistsError):
        write_dicom_seg(seg_path, np.zeros_like(labels), source, CLASSES)
    assert seg_path.read_bytes() == before
    write_dicom_seg(seg_path, np.zeros_like(labels), source, CLASSES, overwrite=True)
    assert not read_dicom_seg(seg_path, source).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm", "series"]      # no temp file left


def test_seg_refuses_labels_that_do_not_fit(tmp_path, cut):
    volume, labels, affine = cut
    write_series(tmp_path / "series", volume, affine)
    with pytest.raises(DicomError, match="only 2 class names"):
        write_dicom_seg(tmp_path / "seg.dcm", labels, tmp_path / "series", CLASSES[:2])
    with pytest.raises(DicomError, match=r"labels of shape \(32, 32, 7\) do not fit"):
        write_dicom_seg(tmp_path / "seg.dcm", labels[:, :, :7], tmp_path / "series", CLASSES)
    assert not (tmp_path / "seg.dcm").exists()


def test_seg_read_against_another_series_is_refused(tmp_path, cut):
    volume, labels, affine = cut
    write_series(tmp_path / "a", volume, affine)
    write_series(tmp_path / "b", volume, affine)
    seg_path = write_dicom_seg(tmp_path / "seg.dcm", labels, tmp_path / "a", CLASSES)
    with pytest.raises(DicomError, match="references none of the images"):
        read_dicom_seg(seg_path, tmp_path / "b")


def test_seg_beside_its_series_does_not_count_as_another_series(tmp_path, cut):
    volume, labels, affine = cut
    write_series(tmp_path, volume, affine)
    write_dicom_seg(tmp_path / "seg.dcm", labels, tmp_path, CLASSES)
    infos = list_series(tmp_path)
    assert len(infos) == 1 and any("Segmentation Storage" in note for note in infos.notes)


# --------------------------------------------------------------------------------------------
# privacy


def test_patient_identifiers_appear_in_nothing_returned(tmp_path, cut):
    volume, labels, affine = cut
    write_series(tmp_path / "one", volume, affine, series_number=1)
    lps = LPS_TO_RAS @ affine
    tilted = [(lps @ [0, 0, k, 1])[:3] + k * np.array([0, 0.268, 0]) for k in range(8)]
    write_series(tmp_path / "one", volume, affine, series_number=2, positions_lps=tilted, prefix="t")
    write_series(tmp_path / "gap", volume, affine, skip=(4,))
    (tmp_path / "one" / "junk.bin").write_bytes(b"\x00" * 300)
    texts = []
    infos = list_series(tmp_path / "one")
    texts += [repr(infos), repr(list(infos)), *infos.notes, *(info.line() for info in infos)]
    for number in (1, 2):
        scan = read_dicom_series(tmp_path / "one", series=number)
        texts += [repr(scan.source), json.dumps(scan.source.to_dict()), json.dumps(scan.meta.to_dict()),
                  repr(scan.meta), *scan.source.notes]
    for call in (lambda: read_dicom_series(tmp_path / "one"), lambda: read_dicom_series(tmp_path / "gap")):
        with pytest.raises(DicomError) as error:
            call()
        texts.append(str(error.value))
    corpus = "\n".join(texts)
    assert "gantry tilt" in corpus and "not evenly spaced" in corpus and "1 file(s) that are not DICOM" in corpus
    for value in PATIENT.values():
        for fragment in value.split("^"):
            assert fragment not in corpus
    # The SEG carries the patient module on purpose: DICOM files it under the source's patient.
    seg_path = write_dicom_seg(tmp_path / "seg.dcm", labels, tmp_path / "one", CLASSES, series=1)
    assert str(pydicom.dcmread(seg_path).PatientID) == PATIENT["PatientID"]


def _meta(affine):
    from medconddiff.nifti import VolumeMeta

    return VolumeMeta(affine=affine, spacing=tuple(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
