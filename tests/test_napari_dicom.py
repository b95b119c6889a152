"""DICOM in napari: opening series folders and files, and saving the consensus as a DICOM SEG.

Series are written with pydicom (tests/dicom_helpers.py) from cuts of the bundled liver CT, with a
patient name, ID and birth date distinctive enough to search every layer name, metadata and message
for. The widget test drives the plugin as a user does (open the folder, choose the layer, click
Segment, Export) with the bundled default model on two slices.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medconddiff.dicom_seg import dicom_seg_codes, dicom_seg_segments, read_dicom_seg
from medconddiff.dicom_series import DicomError, read_dicom_series
from medconddiff.errors import UserInputError
from medconddiff.nifti import load_volume, sample_scan_path
from napari_medconddiff._layers import (DICOM_SOURCE_KEY, METADATA_KEY, dicom_record, dicom_source_of, layer_to_volume,
                                        volume_to_layer)
from napari_medconddiff._reader import get_reader, read_dicom, read_nifti
from napari_medconddiff._writer import write_dicom_seg_labels
from tests.dicom_helpers import (PATIENT, PATIENT_FOLDER, counted_folder_scans, oblique_affine, write_echoes,
                                 write_media, write_rtstruct, write_series)

PLUGIN = "napari-medconddiff"
WIDGET_NAME = "MedCondDiff segmentation"
RUN_TIMEOUT_MS = 120_000
# Anisotropic voxels (0.7 × 0.8 mm pixels, 2.5 mm slices) so that a wrong scale or axis order shows.
RAS = np.array([[0.7, 0, 0, -20.0], [0, 0.8, 0, 30.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
LPS = np.array([[-0.7, 0, 0, 20.0], [0, -0.8, 0, -30.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
AFFINES = {"RAS": RAS, "LPS": LPS, "oblique": oblique_affine()}


@pytest.fixture(scope="module")
def liver():
    """(64×64×6 HU cut of the bundled liver CT, its RAS affine moved with the cut)."""
    volume, meta = load_volume(sample_scan_path())
    start = (32, 32, 60)
    affine = meta.affine.copy()
    affine[:3, 3] = (meta.affine @ np.array([*start, 1.0]))[:3]
    return volume[32:96, 32:96, 60:66].copy(), affine


def export_folder(folder: Path, volume: np.ndarray, affine: np.ndarray) -> Path:
    """A PACS-like export: series 2 (the whole cut), series 5 (its first four slices), a scout series."""
    write_series(folder, volume, affine, series_number=2, description="CT venous", prefix="v")
    write_series(folder, volume[:, :, :4], affine, series_number=5, description="CT arterial", prefix="a")
    write_series(folder, volume[:, :, :1], affine, series_number=1, description="Scout", prefix="s",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    return folder


def assert_no_patient_data(*texts: str) -> None:
    for text in texts:
        for value in PATIENT.values():
            assert value not in text
        assert "Zyxwvut" not in text and "Qqpatientname" not in text


def layer_texts(layers) -> list[str]:
    return [text for layer in layers for text in (layer.name, json.dumps(layer.metadata, default=str))]


# ----------------------------------------------------------------------------- reading


def test_a_folder_opens_one_layer_per_series_named_by_series_without_the_scout(make_napari_viewer, tmp_path, liver):
    volume, _ = liver
    folder = export_folder(tmp_path / "export", volume, LPS)
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning) as caught:
        layers = viewer.open(str(folder), plugin=PLUGIN)
    notes = [str(w.message) for w in caught]
    assert [layer.name for layer in layers] == ["series 2 'CT venous'", "series 5 'CT arterial'"]
    assert any("series 1 'Scout'" in note and "localizer" in note for note in notes)
    for layer, slices in zip(layers, (6, 4)):
        assert layer.data.shape == (slices, 64, 64)
        np.testing.assert_allclose(layer.scale, (2.5, 0.8, 0.7))
        assert layer.axis_labels == ("I→S", "A→P", "R→L")
    source = dicom_source_of(layers[1].metadata)
    assert source.series_number == 5 and len(source.sop_instance_uids) == 4
    assert_no_patient_data(*layer_texts(layers), *notes)


def test_a_folder_of_several_series_is_read_once_and_gives_what_each_series_read_alone_gives(
        tmp_path, liver):
    """Opening a PACS export reads every header once (not once per series), with the same result."""
    volume, _ = liver
    folder = export_folder(tmp_path / "export", volume, LPS)
    with counted_folder_scans() as scans, pytest.warns(UserWarning):
        layers = read_dicom(str(folder))
    assert len(scans) == 1 and len(layers) == 2
    for (data, kwargs, _), number in zip(layers, (2, 5)):
        alone = read_dicom_series(folder, number)
        assert dicom_source_of(kwargs["metadata"]) == alone.source
        np.testing.assert_array_equal(data, volume_to_layer(alone.volume, alone.meta)[0])


@pytest.mark.parametrize("stored", list(AFFINES))
def test_the_displayed_series_equals_the_same_scan_opened_as_nifti(tmp_path, liver, stored):
    """Same voxels, scale, axis labels and geometry as the NIfTI reader's layer: the radiological view
    does not depend on the format the scan came in."""
    volume, _ = liver
    affine = AFFINES[stored]
    write_series(tmp_path / "series", volume, affine, series_number=3, description="CT")
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(nifti))
    ((dicom_data, dicom_kwargs, dicom_type),) = read_dicom(str(tmp_path / "series"))
    ((nifti_data, nifti_kwargs, nifti_type),) = read_nifti(str(nifti))
    assert dicom_type == nifti_type == "image"
    np.testing.assert_array_equal(dicom_data, nifti_data)
    np.testing.assert_allclose(dicom_kwargs["scale"], nifti_kwargs["scale"], rtol=1e-5)
    assert dicom_kwargs["axis_labels"] == nifti_kwargs["axis_labels"]
    assert dicom_kwargs["contrast_limits"] == pytest.approx(nifti_kwargs["contrast_limits"])
    # Back in file order the DICOM layer gives the reader's volume and a world geometry equal to the NIfTI's.
    array, meta = layer_to_volume(dicom_data, dicom_kwargs["metadata"])
    nifti_array, nifti_meta = layer_to_volume(nifti_data, nifti_kwargs["metadata"])
    assert_same_world(array, meta.affine, nifti_array, nifti_meta.affine)


def assert_same_world(a: np.ndarray, affine_a: np.ndarray, b: np.ndarray, affine_b: np.ndarray) -> None:
    """Two (array, affine) pairs put the same value at the same place in the world (voxel orders may differ)."""
    assert a.shape == b.shape
    index = np.array([[0, 0, 0], [5, 9, 2], [63, 0, 5], [17, 40, 3]], dtype=float)
    world = (affine_a @ np.c_[index, np.ones(len(index))].T)[:3].T
    other = np.rint((np.linalg.inv(affine_b) @ np.c_[world, np.ones(len(world))].T)[:3].T).astype(int)
    for (i, j, k), (p, q, r) in zip(index.astype(int), other):
        assert a[i, j, k] == b[p, q, r]


def test_metadata_survives_napari_copying_it(make_napari_viewer, tmp_path, liver):
    from napari.layers import Image

    volume, _ = liver
    write_series(tmp_path / "series", volume, RAS, series_number=3, description="CT")
    ((data, kwargs, _),) = read_dicom(str(tmp_path / "series"))
    layer = Image(data, **kwargs)
    copied = Image.create(*layer.as_layer_data_tuple())
    assert dicom_source_of(copied.metadata) == read_dicom_series(tmp_path / "series").source


def test_one_dcm_file_opens_its_series_and_alone_in_a_folder_one_slice(tmp_path, liver):
    volume, _ = liver
    paths = write_series(tmp_path / "series", volume, RAS, series_number=3, description="CT")
    write_series(tmp_path / "series", volume[:, :, :2], RAS, series_number=4, description="other", prefix="other")
    # One file dragged from the folder: its series (not the other one beside it), as the folder reads it.
    with pytest.warns(UserWarning, match="one of 6 files of its series in its folder: read them all"):
        ((data, kwargs, layer_type),) = get_reader(str(paths[2]))(str(paths[2]))
    ((folder_data, _, _), _) = sorted(read_dicom(str(tmp_path / "series")), key=lambda layer: layer[1]["name"])
    assert layer_type == "image" and kwargs["name"] == "series 3 'CT'" and data.shape == folder_data.shape
    np.testing.assert_array_equal(data, folder_data)
    # Every file of the series chosen together in the file dialog: the series once.
    with pytest.warns(UserWarning):
        layers = read_dicom([str(path) for path in paths])
    assert [layer[1]["name"] for layer in layers] == ["series 3 'CT'"]
    # A copy of the file alone in a folder is one slice: a 2-D layer.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(paths[2], alone / paths[2].name)
    ((data, kwargs, layer_type),) = read_dicom(str(alone / paths[2].name))
    assert layer_type == "image" and data.shape == (64, 64) and kwargs["name"] == "series 3 'CT'"
    np.testing.assert_allclose(kwargs["scale"], (0.8, 0.7))
    # Its series beside it with a slice missing: the file alone, as before its neighbours were looked at.
    paths[4].unlink()
    with pytest.warns(UserWarning, match="do not make one volume .*slices are not evenly spaced.*read this file alone"):
        ((data, _, _),) = read_dicom(str(paths[2]))
    assert data.shape == (64, 64)


def test_the_files_of_a_series_chosen_in_napari_open_it_once(make_napari_viewer, tmp_path, liver):
    volume, _ = liver
    paths = write_series(tmp_path / "series", volume, RAS, series_number=3, description="CT")
    viewer = make_napari_viewer()
    # napari's Open dialog hands a reader the chosen files one by one: the first reads the series, the
    # others are already shown by it.
    with pytest.warns(UserWarning, match="read them all as one volume"):
        layers = viewer.open([str(path) for path in paths], plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["series 3 'CT'"] and layers[0].data.shape == (6, 64, 64)
    # Closed, the series opens again from any of its files.
    viewer.layers.clear()
    with pytest.warns(UserWarning, match="read them all as one volume"):
        assert [layer.data.shape for layer in viewer.open(str(paths[3]), plugin=PLUGIN)] == [(6, 64, 64)]


def test_a_cds_folder_and_its_dicomdir_open_the_series_it_indexes(make_napari_viewer, tmp_path, liver):
    volume, _ = liver
    dicomdir = write_media(tmp_path / "CD", write_series(tmp_path / "exported", volume, RAS, series_number=3,
                                                         description="CT"))
    ((expected, _, _),) = read_dicom(str(tmp_path / "exported"))
    # The reader given the DICOMDIR (napari itself offers readers files by extension: users open the folder).
    ((data, kwargs, layer_type),) = get_reader(str(dicomdir))(str(dicomdir))
    assert layer_type == "image" and kwargs["name"] == "series 3 'CT'"
    np.testing.assert_array_equal(data, expected)
    # The disc's folder in napari: the series of its extensionless files, the index not a skipped file.
    viewer = make_napari_viewer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (layer,) = viewer.open(str(tmp_path / "CD"), plugin=PLUGIN)
    assert layer.name == "series 3 'CT'" and not any("Media Storage" in str(w.message) for w in caught)
    np.testing.assert_array_equal(layer.data, expected)


def test_an_rt_structure_set_in_the_folder_opens_as_labels_over_its_series(make_napari_viewer, tmp_path, liver):
    volume, _ = liver
    paths = write_series(tmp_path / "plan", volume, RAS, series_number=3, description="CT")
    square = np.array([(9.5, 9.5), (30.5, 9.5), (30.5, 30.5), (9.5, 30.5)])     # voxels 10..30 in i and j
    small = np.array([(14.5, 14.5), (20.5, 14.5), (20.5, 20.5), (14.5, 20.5)])
    write_rtstruct(tmp_path / "plan" / "RS.dcm", paths, RAS,
                   [("External", [(k, square) for k in range(volume.shape[2])]), ("GTV", [(2, small)])])
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning) as caught:
        image, contours = viewer.open(str(tmp_path / "plan"), plugin=PLUGIN)
    assert image.name == "series 3 'CT'" and contours.name == "series 3 'CT' RTSTRUCT 'planning'"
    assert list(contours.features["class"]) == ["background", "External", "GTV"]
    assert contours.metadata["medconddiff"]["labels_from"] == "RTSTRUCT"   # Continue asks which ROIs to take
    assert contours.data.shape == image.data.shape and tuple(contours.scale) == tuple(image.scale)
    labels, _ = layer_to_volume(contours.data, contours.metadata)
    expected = np.zeros(volume.shape, np.uint8)
    expected[10:31, 10:31, :] = 1
    expected[15:21, 15:21, 2] = 2
    np.testing.assert_array_equal(labels, expected)
    notes = [str(w.message) for w in caught]
    assert any("36 voxel(s) lie in more than one ROI" in note for note in notes)
    assert not any("RT Structure Set Storage" in note for note in notes)   # not reported as skipped any more
    assert_no_patient_data(*layer_texts([image, contours]), *notes)
    # The RTSTRUCT file opened alone: the series beside it gives its geometry.
    with pytest.warns(UserWarning, match="lie in more than one ROI"):
        ((data, kwargs, layer_type),) = get_reader(str(tmp_path / "plan" / "RS.dcm"))(str(tmp_path / "plan" / "RS.dcm"))
    assert layer_type == "labels" and kwargs["name"] == contours.name
    np.testing.assert_array_equal(data, contours.data)
    # A structure set that names no series (the standard allows it) is tied to its series by its frame of
    # reference, in the folder and alone.
    import pydicom

    unnamed = pydicom.dcmread(tmp_path / "plan" / "RS.dcm")
    del unnamed.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence
    unnamed.save_as(tmp_path / "plan" / "RS.dcm")
    viewer.layers.clear()
    with pytest.warns(UserWarning):
        layers = viewer.open(str(tmp_path / "plan"), plugin=PLUGIN)
    assert [layer.name for layer in layers] == [image.name, contours.name]
    np.testing.assert_array_equal(layers[1].data, contours.data)
    with pytest.warns(UserWarning):
        ((data, _, _),) = read_dicom(str(tmp_path / "plan" / "RS.dcm"))
    np.testing.assert_array_equal(data, contours.data)


def test_a_folder_without_dicom_is_declined_so_napari_tries_other_readers(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "scan.nii.gz"))
    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(tmp_path / "missing")) is None
    assert get_reader(str(tmp_path / "notes.txt")) is None


def test_a_broken_series_is_named_in_one_line_and_the_others_open(tmp_path, liver):
    volume, _ = liver
    write_series(tmp_path / "export" / "good", volume, RAS, series_number=1, description="good")
    cut = write_series(tmp_path / "export" / "cut", volume, RAS, series_number=2, description="cut short")
    cut[3].write_bytes(cut[3].read_bytes()[:-300])
    with pytest.warns(UserWarning) as caught:
        layers = read_dicom(str(tmp_path / "export"))
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["series 1 'good'"]
    refused = [str(w.message) for w in caught if "not opened" in str(w.message)]
    assert len(refused) == 1 and "series 2 'cut short'" in refused[0] and "\n" not in refused[0]

    # A folder whose only series is broken: the reader's error (which napari shows) names it in one line.
    with pytest.raises(DicomError) as raised:
        read_dicom(str(tmp_path / "export" / "cut"))
    assert "series 2 'cut short'" in str(raised.value) and "\n" not in str(raised.value)
    assert_no_patient_data(str(raised.value), *refused)


def test_a_series_in_a_transfer_syntax_pydicom_does_not_know_is_named_and_the_others_open(tmp_path, liver):
    """A JPEG XL series (DICOM 2024, unknown to pydicom 3.0) raised 'UID is not a transfer syntax', and napari
    opened nothing of the folder."""
    import pydicom

    volume, _ = liver
    write_series(tmp_path / "export" / "plain", volume, RAS, series_number=1, description="good")
    for path in write_series(tmp_path / "export" / "xl", volume, RAS, series_number=2, description="jpeg xl"):
        dataset = pydicom.dcmread(path)
        dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.110"
        pydicom.dcmwrite(path, dataset, implicit_vr=False, little_endian=True, force_encoding=True)
    with pytest.warns(UserWarning) as caught:
        layers = read_dicom(str(tmp_path / "export"))
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["series 1 'good'"]
    refused = [str(w.message) for w in caught if "not opened" in str(w.message)]
    assert len(refused) == 1 and "series 2 'jpeg xl'" in refused[0] and "1.2.840.10008.1.2.4.110" in refused[0]


def test_a_seg_that_cannot_be_placed_is_named_without_the_patients_folder(tmp_path, liver):
    """The note about a SEG that names the series but none of its images quoted the SEG's full path, whose
    folders are the patient's; SEG errors name the file alone."""
    import pydicom

    from medconddiff.dicom_seg import write_dicom_seg

    volume, _ = liver
    folder = tmp_path / PATIENT_FOLDER
    write_series(folder / "ct", volume, LPS, series_number=3, description="CT")
    write_series(tmp_path / "other", volume, LPS, series_number=4, description="CT", prefix="o")
    seg_path = write_dicom_seg(folder / "wrong_seg.dcm", np.zeros(volume.shape, np.uint8),
                               read_dicom_series(tmp_path / "other"), ("background", "liver"))
    seg = pydicom.dcmread(seg_path)      # claims series 3 while its images are series 4's
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = read_dicom_series(folder / "ct").source.series_uid
    seg.save_as(seg_path)
    with pytest.warns(UserWarning) as caught:
        layers = read_dicom(str(folder))
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["series 3 'CT'"]
    messages = [str(w.message) for w in caught]
    assert any("not opened: wrong_seg.dcm: wrong_seg.dcm: this segmentation references none of the images" in m
               for m in messages), messages
    assert_no_patient_data(*messages)
    with pytest.raises(DicomError) as alone:
        read_dicom(str(seg_path))
    assert_no_patient_data(str(alone.value))


# ----------------------------------------------------------------------------- writing


def test_labels_on_a_dicom_scan_save_as_a_seg_that_reads_back_to_the_same_voxels(make_napari_viewer, tmp_path,
                                                                                  liver):
    volume, _ = liver
    folder = tmp_path / "series"
    write_series(folder, volume, LPS, series_number=3, description="CT")
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(folder), plugin=PLUGIN)
    labels = np.zeros(image.data.shape, np.uint8)
    labels[1:4, 10:30, 5:20] = 1
    labels[2, 40:50, 40:60] = 2
    layer = viewer.add_labels(labels, name="painted", metadata=dict(image.metadata), scale=image.scale,
                              features={"class": ["background", "liver", "tumour"]})
    target = tmp_path / "painted.dcm"
    assert layer.save(str(target), plugin=PLUGIN) == [str(target)]
    np.testing.assert_array_equal(read_dicom_seg(target, folder), layer_to_volume(labels, image.metadata)[0])
    assert dicom_seg_segments(target) == {1: "liver", 2: "tumour"}

    plain = viewer.add_labels(labels, name="no scan")
    with pytest.raises(UserInputError, match="not made on a scan read from DICOM; save it as NIfTI"):
        write_dicom_seg_labels(str(tmp_path / "plain.dcm"), plain.data, {"name": plain.name, "metadata": {}})
    assert not (tmp_path / "plain.dcm").exists()


def test_a_seg_opens_as_labels_over_its_series_in_a_folder_or_alone_and_saves_back(make_napari_viewer, tmp_path,
                                                                                    liver):
    from medconddiff.dicom_seg import write_dicom_seg

    volume, _ = liver
    export = tmp_path / "export"
    write_series(export / "ct", volume, LPS, series_number=3, description="CT")
    write_series(export / "other", volume[:, :, :4], LPS, series_number=4, description="CT arterial", prefix="a")
    scan = read_dicom_series(export / "ct")
    truth = np.zeros(volume.shape, np.uint8)       # file order (i, j, k), as a SEG reads back
    truth[10:30, 5:20, 1:4] = 1
    truth[40:50, 40:60, 2] = 2
    # Another tool codes its tumour more finely than this package would from the name.
    primary = [["49755003", "SCT", "Morphologically Abnormal Structure"], ["86049000", "SCT", "Malignant neoplasm, primary"]]
    write_dicom_seg(export / "ct_seg.dcm", truth, scan.source, ("background", "liver", "tumour"),
                    codes={"tumour": primary})
    # A SEG of a series that is not in the folder: named, and the rest opens.
    elsewhere = tmp_path / "elsewhere"
    write_series(elsewhere, volume[:, :, :3], LPS, series_number=9, description="CT late", prefix="l")
    write_dicom_seg(export / "orphan_seg.dcm", truth[:, :, :3], read_dicom_series(elsewhere).source,
                    ("background", "liver", "tumour"))

    viewer = make_napari_viewer()
    with pytest.warns(UserWarning) as caught:
        layers = viewer.open(str(export), plugin=PLUGIN)
    messages = [str(w.message) for w in caught]
    assert [layer.name for layer in layers] == ["series 3 'CT'", "series 4 'CT arterial'",
                                                "series 3 'CT' SEG 'medconddiff segmentation'"]
    image, _, seg = layers
    assert seg.__class__.__name__ == "Labels"
    assert any("orphan_seg.dcm, a DICOM SEG of a series that is not opened here" in m for m in messages)
    assert not any("skipped DICOM segmentations" in m for m in messages)
    # Placed exactly over its series: the same view of the same voxels, scale and file geometry.
    np.testing.assert_array_equal(layer_to_volume(np.asarray(seg.data), image.metadata)[0], truth)
    assert tuple(seg.scale) == tuple(image.scale) and seg.data.shape == image.data.shape
    assert seg.metadata[METADATA_KEY][DICOM_SOURCE_KEY] == image.metadata[METADATA_KEY][DICOM_SOURCE_KEY]
    assert list(seg.features["class"]) == ["background", "liver", "tumour"]
    assert_no_patient_data(*(layer.name for layer in layers), json.dumps(seg.metadata, default=str), *messages)

    # Opened alone, the SEG finds its series in its own folder and lands on the same place.
    (alone,) = viewer.open(str(export / "ct_seg.dcm"), plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(alone.data), np.asarray(seg.data))
    assert tuple(alone.scale) == tuple(seg.scale)
    # Saved again as a SEG (the user's edits included), it reads back to the same voxels and names.
    alone.data[3, 5:9, 5:9] = 2
    target = tmp_path / "edited.dcm"
    assert alone.save(str(target), plugin=PLUGIN) == [str(target)]
    np.testing.assert_array_equal(read_dicom_seg(target, export / "ct"),
                                  layer_to_volume(np.asarray(alone.data), image.metadata)[0])
    assert dicom_seg_segments(target) == {1: "liver", 2: "tumour"}
    assert dicom_seg_codes(target)["tumour"] == primary            # the other tool's coding kept
    assert dicom_seg_codes(target)["liver"][1] == ["10200004", "SCT", "Liver"]
    # A SEG whose series is nowhere near: one clear error.
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "seg.dcm").write_bytes((export / "ct_seg.dcm").read_bytes())
    with pytest.raises(DicomError, match="seg.dcm is a DICOM SEG; the series it segments is not in its folder"):
        read_dicom(str(lonely / "seg.dcm"))


def test_a_multi_echo_series_opens_one_layer_per_echo_in_the_same_place(tmp_path, liver):
    volume, _ = liver
    write_echoes(tmp_path / "mri", [volume, volume * 0.5], LPS, description="T2 dual echo")
    first, second = read_dicom(str(tmp_path / "mri"))
    assert [first[1]["name"], second[1]["name"]] == ["series 1 'T2 dual echo' (echo 1)",
                                                     "series 1 'T2 dual echo' (echo 2)"]
    assert first[1]["scale"] == second[1]["scale"] and first[0].shape == second[0].shape
    np.testing.assert_allclose(second[0], first[0] * 0.5, atol=0.5)
    # A SEG of the second echo opens over that echo (the parts share the series UID; its images tell).
    from medconddiff.dicom_series import list_series
    from medconddiff.dicom_seg import write_dicom_seg

    echo2 = read_dicom_series(tmp_path / "mri", list_series(tmp_path / "mri")[1].uid)
    truth = np.zeros(volume.shape, np.uint8)
    truth[5:20, 5:20, 1:3] = 1
    write_dicom_seg(tmp_path / "mri" / "echo2_seg.dcm", truth, echo2.source, ("background", "lesion"))
    *_, seg = read_dicom(str(tmp_path / "mri"))
    assert seg[1]["name"].startswith("series 1 'T2 dual echo' (echo 2) SEG")
    np.testing.assert_array_equal(layer_to_volume(np.asarray(seg[0]), seg[1]["metadata"])[0], truth)


def test_an_enhanced_multiframe_file_of_two_echoes_opens_one_layer_per_echo_each_saving_its_own_seg(
        tmp_path, liver):
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    volume, _ = liver
    write_echoes(tmp_path / "mri", [volume, volume * 0.5], LPS, description="T2 dual echo",
                 study_uid=generate_uid(), frame_uid=generate_uid())
    single = [pydicom.dcmread(p) for p in sorted((tmp_path / "mri").iterdir())]
    hd.legacy.LegacyConvertedEnhancedCTImage(single, series_instance_uid=hd.UID(), series_number=3,
                                             sop_instance_uid=hd.UID(), instance_number=1).save_as(tmp_path / "dual.dcm")
    first, second = read_dicom(str(tmp_path / "dual.dcm"))
    assert [first[1]["name"], second[1]["name"]] == ["series 3 'T2 dual echo (enhanced conversion)' (echo 1)",
                                                     "series 3 'T2 dual echo (enhanced conversion)' (echo 2)"]
    assert first[1]["scale"] == second[1]["scale"] and first[0].shape == second[0].shape
    np.testing.assert_allclose(second[0], first[0] * 0.5, atol=0.5)
    # Labels painted on the second echo save as a SEG of that echo: they read back onto its voxels, and the
    # first echo (the same file and instance UID) is told the SEG is not its own.
    painted = np.zeros(second[0].shape, np.uint8)
    painted[1:4, 10:30, 5:20] = 1
    painted[2, 40:50, 40:60] = 2
    target = tmp_path / "echo2.dcm"
    write_dicom_seg_labels(str(target), painted, {"name": "painted", "metadata": second[1]["metadata"],
                                                  "features": {"class": ["background", "liver", "tumour"]}})
    echo_2 = dicom_source_of(second[1]["metadata"])
    np.testing.assert_array_equal(read_dicom_seg(target, echo_2), layer_to_volume(painted, second[1]["metadata"])[0])
    with pytest.raises(DicomError, match=r"references none of the frames of .*\(echo 1\)"):
        read_dicom_seg(target, dicom_source_of(first[1]["metadata"]))


def test_segment_a_dicom_series_with_the_bundled_model_and_export_a_seg(make_napari_viewer, qtbot, tmp_path, liver,
                                                                        monkeypatch, notifications):
    """Open the folder, choose series 2, segment slices 2–3 with the bundled model, Export as DICOM SEG."""
    import torch
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFileDialog, QMessageBox

    from napari_medconddiff import _widget as widget_module
    from napari_medconddiff._export import DICOM_SEG_FILTER

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        volume, affine = liver
        folder = export_folder(tmp_path / "export", volume, affine)
        viewer = make_napari_viewer()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scan, _ = viewer.open(str(folder), plugin=PLUGIN)
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
        qtbot.waitUntil(lambda: widget.controller.engine is not None, timeout=RUN_TIMEOUT_MS)
        widget.layer_combo.native.setCurrentText(scan.name)
        assert widget.layer_combo.value is scan
        widget.model_combo.setCurrentText(widget_module.DEFAULT_MODEL)
        widget.steps_spin.setValue(2)
        widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("range"))
        widget.range_edit.setText("2-3")
        with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
            qtbot.mouseClick(widget.segment_button, Qt.MouseButton.LeftButton)
        assert finished.args[0] == "done", notifications.messages()
        consensus = viewer.layers[f"{scan.name} consensus"]
        expected = layer_to_volume(consensus.data, consensus.metadata)[0]
        assert expected[:, :, 2:4].any() and not expected[:, :, [0, 1, 4, 5]].any()

        target = tmp_path / "venous_seg.dcm"
        offered = []
        monkeypatch.setattr(QFileDialog, "getSaveFileName",
                            lambda *a, **k: offered.append(a[1:]) or (str(target), DICOM_SEG_FILTER))
        qtbot.mouseClick(widget.export_button, Qt.MouseButton.LeftButton)
        title, proposed, filters = offered[0]
        assert "DICOM SEG" in title and filters.startswith(DICOM_SEG_FILTER) and "NIfTI" in filters
        assert "RT Structure Set" in filters
        assert Path(proposed) == tmp_path / "series2_CT_venous_seg.dcm"     # by the series, never the folder
        assert notifications.messages("error") == []
        np.testing.assert_array_equal(read_dicom_seg(target, folder, series=2), expected)
        assert dicom_seg_segments(target) == {1: "liver", 2: "tumour"}
        sidecar = json.loads((tmp_path / "venous_seg.json").read_text())
        source = dicom_source_of(scan.metadata)
        assert sidecar["dicom_source"]["series_instance_uid"] == source.series_uid
        assert sidecar["dicom_source"]["sop_instance_uids"] == list(source.sop_instance_uids)

        # A name typed without suffix under the DICOM SEG filter is the same SEG: replaced only after a yes.
        stamp = target.stat().st_mtime_ns
        asked = []
        monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "venous_seg"),
                                                                             DICOM_SEG_FILTER))
        monkeypatch.setattr(QMessageBox, "question",
                            lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
        qtbot.mouseClick(widget.export_button, Qt.MouseButton.LeftButton)
        assert asked and "venous_seg.dcm" in asked[0] and target.stat().st_mtime_ns == stamp

        # For a planning system: the same consensus as an RT structure set, which reads back voxel for voxel.
        from medconddiff.dicom_rtstruct import read_rtstruct
        from medconddiff.dicom_series import read_dicom_series
        from napari_medconddiff._export import DICOM_RTSTRUCT_FILTER

        contours = tmp_path / "venous_contours"
        monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(contours), DICOM_RTSTRUCT_FILTER))
        qtbot.mouseClick(widget.export_button, Qt.MouseButton.LeftButton)
        assert notifications.messages("error") == []
        structures = read_rtstruct(tmp_path / "venous_contours.dcm", read_dicom_series(folder, series=2))
        np.testing.assert_array_equal(structures.labels, expected)
        assert structures.class_names == ("background", "liver", "tumour")

        messages = notifications.messages() + [str(w.message) for w in caught] + [widget.status.text()]
        assert_no_patient_data(*layer_texts(viewer.layers), *messages, json.dumps(sidecar))
    finally:
        torch.set_num_threads(threads)


def summary_of(class_names=("background", "liver", "tumour")):
    from napari_medconddiff._export import ExportSummary

    return ExportSummary(slice_indices=np.array([1, 2]), completed=np.ones(2, bool), steps_used=np.array([2, 2]),
                         class_names=tuple(class_names), provenance={"checkpoint": "test"}, runs=[], complete=True)


def test_export_writes_a_seg_only_for_a_dicom_scan_and_never_replaces_a_file_unasked(tmp_path, liver):
    from napari_medconddiff._export import export_targets, write_export

    volume, _ = liver
    folder = tmp_path / PATIENT_FOLDER
    write_series(folder, volume, RAS, series_number=3, description="CT")
    scan = read_dicom_series(folder)
    named = {"source": str(folder), "scan_name": "series 3 'CT'"}
    labels = np.zeros(volume.shape, np.uint8)
    labels[10:20, 10:20, 1:3] = 1
    assert export_targets(tmp_path / "a.dcm") == (tmp_path / "a.dcm", tmp_path / "a.json")
    assert export_targets(tmp_path / "a", dicom_seg=True) == (tmp_path / "a.dcm", tmp_path / "a.json")
    assert export_targets(tmp_path / "a") == (tmp_path / "a.nii.gz", tmp_path / "a.json")

    target = tmp_path / "seg.dcm"
    with pytest.raises(UserInputError, match="was not read from DICOM; export it as NIfTI"):
        write_export(target, labels, scan.meta, summary_of(), **named, edited_slices=[], overwrite=False)
    assert not target.exists()

    written = write_export(target, labels, scan.meta, summary_of(), **named, edited_slices=[2],
                           overwrite=False, dicom=scan.source)
    assert written == (target, tmp_path / "seg.json")
    np.testing.assert_array_equal(read_dicom_seg(target, folder), labels)
    stamp = target.stat().st_mtime_ns
    labels[:] = 0
    with pytest.raises(FileExistsError):
        write_export(target, labels, scan.meta, summary_of(), **named, edited_slices=[],
                     overwrite=False, dicom=scan.source)
    assert target.stat().st_mtime_ns == stamp
    # Only the sidecar exists: refused before the SEG is written, so no SEG without its record appears.
    target.unlink()
    with pytest.raises(FileExistsError):
        write_export(target, labels, scan.meta, summary_of(), **named, edited_slices=[],
                     overwrite=False, dicom=scan.source)
    assert not target.exists()
    assert_no_patient_data((tmp_path / "seg.json").read_text())
    assert json.loads((tmp_path / "seg.json").read_text())["input"] == "series 3 'CT'"


def test_a_seg_of_edited_labels_says_semiautomatic_and_the_models_own_says_automatic(tmp_path, liver):
    """Export with edited slices, and File > Save of a layer that is not the plugin's result (a SEG opened,
    a layer painted), wrote segments that claimed AUTOMATIC: the model's output untouched."""
    import pydicom

    from napari_medconddiff._export import write_export
    from napari_medconddiff._result_layers import MARKER_KEY

    volume, _ = liver
    folder = tmp_path / "series"
    write_series(folder, volume, RAS, series_number=3, description="CT")
    scan = read_dicom_series(folder)
    named = {"source": str(folder), "scan_name": "series 3 'CT'", "overwrite": False, "dicom": scan.source}
    labels = np.zeros(volume.shape, np.uint8)
    labels[10:20, 10:20, 1:3] = 1

    def algorithm_types(path):
        return {str(item.SegmentAlgorithmType) for item in pydicom.dcmread(path).SegmentSequence}

    write_export(tmp_path / "edited.dcm", labels, scan.meta, summary_of(), edited_slices=[2], **named)
    write_export(tmp_path / "as_run.dcm", labels, scan.meta, summary_of(), edited_slices=[], **named)
    assert algorithm_types(tmp_path / "edited.dcm") == {"SEMIAUTOMATIC"}
    assert algorithm_types(tmp_path / "as_run.dcm") == {"AUTOMATIC"}

    data, kwargs = volume_to_layer(labels, scan.meta)
    kwargs["metadata"][METADATA_KEY][DICOM_SOURCE_KEY] = dicom_record(scan.source)
    features = {"class": ["background", "liver", "tumour"]}
    users = write_dicom_seg_labels(str(tmp_path / "users.dcm"), data,
                                   {"metadata": kwargs["metadata"], "features": features})
    ours = write_dicom_seg_labels(str(tmp_path / "ours.dcm"), data, {
        "metadata": {**kwargs["metadata"], MARKER_KEY: {"role": "consensus", "scan": "1", "layer": "2"}},
        "features": features})
    assert algorithm_types(users[0]) == {"SEMIAUTOMATIC"} and algorithm_types(ours[0]) == {"AUTOMATIC"}


def test_a_dicom_scan_enters_a_training_set_as_its_series_and_uid_never_its_folder(tmp_path, liver):
    """The case a scan becomes in the widget's training set: two patients' "series 3 'CT'" are two cases
    (one name would merge the second patient into the first's case, or refuse the add), the same series
    opened again is the same case, and the patient's folder names none of them."""
    from types import SimpleNamespace

    from medconddiff.training_set import case_id_from_name
    from napari_medconddiff._training_set_flow import case_name_of

    volume, _ = liver
    names = []
    for folder in (tmp_path / PATIENT_FOLDER, tmp_path / "another patient", tmp_path / PATIENT_FOLDER):
        if not folder.exists():
            write_series(folder, volume, RAS, series_number=3, description="CT")
        ((_, kwargs, _),) = get_reader(str(folder))(str(folder))
        results = SimpleNamespace(scan=SimpleNamespace(metadata=kwargs["metadata"]), consensus=None,
                                  source=str(folder), scan_name=kwargs["name"])
        names.append(case_id_from_name(case_name_of(results)))
    assert names[0] != names[1] and names[0] == names[2]
    assert all(name.startswith("series3_CT_") for name in names)
    assert_no_patient_data(*names)
    # A NIfTI scan is its file's name, as before.
    nifti = SimpleNamespace(scan=SimpleNamespace(metadata={}), consensus=None,
                            source=str(tmp_path / PATIENT_FOLDER / "liver-07.nii.gz"), scan_name="liver-07")
    assert case_name_of(nifti) == "liver-07.nii.gz"
