"""napari plugin I/O: reader, writer, sample data and the manifest (no viewer needed).

Layers are radiological views of the file's voxels (slider I → S, anterior up, the patient's right
on the screen's left); writing a layer back gives the file's own voxel order, affine and codes.
"""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from npe2 import PluginManifest

from medconddiff.errors import UserInputError
from medconddiff.geometry import GeometryWarning
from medconddiff.nifti import VolumeMeta, load_volume, sample_label_path, sample_scan_path
from napari_medconddiff import _layers
from napari_medconddiff._reader import contrast_limits, get_reader, read_nifti
from napari_medconddiff._sample_data import liver_ct, liver_ct_with_labels
from napari_medconddiff._writer import write_image, write_labels

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOT_MANIFEST = REPO_ROOT / "napari.yaml"

ANISOTROPIC_AFFINE = np.array(
    [[-0.6, 0.0, 0.0, 90.0], [0.0, -0.7, 0.0, 110.0], [0.0, 0.0, 4.0, -50.0], [0.0, 0.0, 0.0, 1.0]]
)


def _write_nifti(path, data, affine=ANISOTROPIC_AFFINE, code=1):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    nib.save(img, str(path))
    return path


def _radiological(ras: np.ndarray) -> np.ndarray:
    """An RAS-ordered array as the layer must show it: axes (S, P, L)."""
    return ras.transpose(2, 1, 0)[:, ::-1, ::-1]


@pytest.fixture(scope="module")
def sample_image_layer():
    (layer,) = get_reader(str(sample_scan_path()))(str(sample_scan_path()))
    return layer


# ----------------------------------------------------------------------------- reader


@pytest.mark.parametrize("name", ["scan.tif", "scan.nii.zip", "scan.mha", "notes.txt"])
def test_reader_declines_files_that_are_not_nifti(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00" * 64)
    assert get_reader(str(path)) is None


def test_reader_declines_directories_missing_files_and_mixed_lists(tmp_path):
    folder = tmp_path / "series.nii"
    folder.mkdir()
    assert get_reader(str(folder)) is None
    assert get_reader(str(tmp_path / "absent.nii.gz")) is None
    other = tmp_path / "x.png"
    other.write_bytes(b"png")
    assert get_reader([str(sample_scan_path()), str(other)]) is None
    assert get_reader([]) is None


def test_reader_opens_the_sample_as_an_image_layer(sample_image_layer):
    data, kwargs, layer_type = sample_image_layer
    array, meta = load_volume(sample_scan_path())

    assert layer_type == "image"
    np.testing.assert_array_equal(data, _radiological(array))      # the sample is stored RAS
    assert kwargs["scale"] == (1.0, 1.0, 1.0)
    assert kwargs["axis_labels"] == ("I→S", "A→P", "R→L")
    assert kwargs["name"] == "liver117_image"
    assert kwargs["metadata"][_layers.METADATA_KEY] == meta.to_dict()
    assert kwargs["metadata"][_layers.TO_LAYER_KEY] == {"axes": [2, 1, 0], "flips": [False, True, True]}
    low, high = kwargs["contrast_limits"]
    assert array.min() <= low < high <= array.max()
    assert kwargs["colormap"] == "gray"


def test_reader_shows_an_lps_file_radiologically_with_its_spacing(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    path = _write_nifti(tmp_path / "ct.nii.gz", data)          # i → L, j → P, k → S

    ((layer_data, kwargs, layer_type),) = read_nifti(str(path))

    assert layer_type == "image"
    np.testing.assert_array_equal(layer_data, data.transpose(2, 1, 0))   # (S, P, L): LPS needs no flip
    np.testing.assert_allclose(kwargs["scale"], (4.0, 0.7, 0.6))


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
def test_the_patients_anterior_right_is_at_the_top_left_however_the_file_is_stored(tmp_path, codes):
    """A mark in the patient's anterior-right corner of one slice, stored three ways, shows top-left
    (anterior up, the patient's right on the screen's left), on the slice the slider counts from inferior."""
    from medconddiff.geometry import Reorientation, affine_from_codes

    ras = np.zeros((8, 9, 5), np.float32)
    ras[6:8, 7:9, 1] = 100.0                           # right (high R), anterior (high A), slice 1 from inferior
    to_file = Reorientation.between(("R", "A", "S"), tuple(codes))
    stored = np.ascontiguousarray(to_file.apply(ras))
    spacing = to_file.shape((1.0, 1.0, 1.0))
    path = _write_nifti(tmp_path / f"{codes}.nii.gz", stored, affine_from_codes(tuple(codes), spacing))
    ((layer_data, kwargs, _),) = read_nifti(str(path))
    assert layer_data.shape == (5, 9, 8)
    marked = np.argwhere(layer_data > 0)
    assert set(marked[:, 0]) == {1}
    assert marked[:, 1].max() <= 1 and marked[:, 2].max() <= 1     # top rows, leftmost columns
    assert kwargs["axis_labels"] == ("I→S", "A→P", "R→L")


def test_label_named_integer_file_opens_as_labels():
    (data, kwargs, layer_type), = read_nifti(str(sample_label_path()))
    assert layer_type == "labels"
    assert data.dtype == np.uint8
    assert set(np.unique(data)) == {0, 1, 2}
    assert "contrast_limits" not in kwargs


def test_label_name_alone_does_not_make_labels(tmp_path):
    ct = (np.random.default_rng(1).normal(size=(4, 4, 4)) * 300).round().astype(np.int16)
    ((_, _, layer_type),) = read_nifti(str(_write_nifti(tmp_path / "ct_seg.nii.gz", ct)))
    assert layer_type == "image"  # negative HU values: not a label map
    mask = np.zeros((4, 4, 4), np.uint8)
    ((_, _, layer_type),) = read_nifti(str(_write_nifti(tmp_path / "liver.nii.gz", mask)))
    assert layer_type == "image"  # integer data, but the name does not say it is a mask


def test_reader_replaces_nan_with_a_warning(tmp_path):
    data = np.ones((3, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    path = _write_nifti(tmp_path / "nan.nii", data)
    with pytest.warns(UserWarning, match="1 NaN/Inf voxels"):
        ((layer_data, kwargs, _),) = read_nifti(str(path))
    assert np.isfinite(layer_data).all()
    assert kwargs["metadata"]["nonfinite_voxels_replaced"] == 1


def test_reader_reads_a_list_of_files_one_layer_each():
    layers = read_nifti([str(sample_scan_path()), str(sample_label_path())])
    assert [layer_type for _, _, layer_type in layers] == ["image", "labels"]


def test_a_4d_file_opens_as_one_layer_per_channel_and_each_saves_as_its_own_3d_file(tmp_path):
    """A BraTS-style file (X, Y, Z, C): C image layers named ``<file> c0``… that overlay exactly, each
    one channel's voxels; saving one gives that channel's 3-D file with the original affine."""
    rng = np.random.default_rng(5)
    volumes = (rng.normal(size=(4, 5, 6, 3)) * [1.0, 10.0, 100.0]).astype(np.float32)   # stored LPS
    path = _write_nifti(tmp_path / "brats.nii.gz", volumes)
    (single,) = read_nifti(str(_write_nifti(tmp_path / "t1.nii.gz", volumes[..., 1])))

    layers = read_nifti(str(path))

    assert [kwargs["name"] for _, kwargs, _ in layers] == ["brats c0", "brats c1", "brats c2"]
    assert [layer_type for _, _, layer_type in layers] == ["image"] * 3
    for channel, (data, kwargs, _) in enumerate(layers):
        np.testing.assert_array_equal(data, volumes[..., channel].transpose(2, 1, 0))   # (S, P, L), as a 3-D file
        for key in ("scale", "axis_labels"):
            assert kwargs[key] == single[1][key]
        assert kwargs["metadata"][_layers.TO_LAYER_KEY] == single[1]["metadata"][_layers.TO_LAYER_KEY]
        geometry, single_geometry = (dict(k["metadata"][_layers.METADATA_KEY]) for k in (kwargs, single[1]))
        assert geometry.pop("source") == str(path) and single_geometry.pop("source").endswith("t1.nii.gz")
        assert geometry == single_geometry                         # affine, spacing, 3-D header shape, codes
        low, high = kwargs["contrast_limits"]                      # each channel's own display window
        assert volumes[..., channel].min() <= low < high <= volumes[..., channel].max()
    np.testing.assert_allclose(layers[2][1]["contrast_limits"], contrast_limits(volumes[..., 2]))

    data, kwargs, _ = layers[1]
    (written_path,) = write_image(str(tmp_path / "brats_c1.nii.gz"), data, kwargs)
    written = nib.load(written_path)
    assert written.shape == (4, 5, 6)
    np.testing.assert_array_equal(written.get_fdata(), volumes[..., 1])
    np.testing.assert_allclose(written.affine, ANISOTROPIC_AFFINE)
    assert int(written.header["sform_code"]) == 1

    # A 4-D file with one volume is an ordinary 3-D scan: one layer, named after the file.
    ((data, kwargs, _),) = read_nifti(str(_write_nifti(tmp_path / "one.nii.gz", volumes[..., :1])))
    assert kwargs["name"] == "one"
    np.testing.assert_array_equal(data, volumes[..., 0].transpose(2, 1, 0))


def test_a_long_4d_series_is_one_layer_with_a_volume_slider_that_splits_into_scans(tmp_path):
    """Twenty volumes are a series (fMRI, DCE), not twenty channels: one layer, each volume shown as a
    3-D file is; napari's Split Stack gives 3-D layers that keep the file's geometry and can be written."""
    from napari.layers import Image
    from napari.layers.utils.stack_utils import stack_to_images

    rng = np.random.default_rng(6)
    series = rng.normal(size=(4, 5, 6, 20)).astype(np.float32)          # stored LPS, anisotropic
    path = _write_nifti(tmp_path / "bold.nii.gz", series)
    (single,) = read_nifti(str(_write_nifti(tmp_path / "vol7.nii.gz", series[..., 7])))
    ((data, kwargs, layer_type),) = read_nifti(str(path))
    assert layer_type == "image" and kwargs["name"] == "bold" and data.shape == (20, 6, 5, 4)
    np.testing.assert_array_equal(data[7], single[0])
    assert kwargs["scale"] == (1.0, *single[1]["scale"]) and kwargs["axis_labels"][0] == "volume"
    assert data.base is not None                                            # a view, not a copy

    (volume_7,) = stack_to_images(Image(data, **kwargs), axis=0)[7:8]
    assert volume_7.ndim == 3
    (written_path,) = write_image(str(tmp_path / "bold_7.nii.gz"), volume_7.data, {"metadata": volume_7.metadata})
    written = nib.load(written_path)
    np.testing.assert_array_equal(written.get_fdata(), series[..., 7])
    np.testing.assert_allclose(written.affine, ANISOTROPIC_AFFINE)


# ----------------------------------------------------------------------------- writer


def test_labels_round_trip_through_reader_and_writer(tmp_path):
    source = _write_nifti(
        tmp_path / "case_label.nii.gz",
        np.random.default_rng(2).integers(0, 3, size=(7, 8, 9)).astype(np.uint8),
    )
    ((data, kwargs, layer_type),) = read_nifti(str(source))
    assert layer_type == "labels"

    (written_path,) = write_labels(str(tmp_path / "saved.nii.gz"), data, kwargs)

    original, written = nib.load(source), nib.load(written_path)
    assert written.shape == original.shape
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(original.dataobj))
    np.testing.assert_allclose(written.affine, original.affine)
    np.testing.assert_allclose(written.header.get_zooms(), original.header.get_zooms())
    assert written.get_data_dtype() == np.uint8
    assert int(written.header["sform_code"]) == 1


def test_layers_saved_from_napari_carry_no_header_text(tmp_path):
    """File > Save of a consensus (whose metadata is its scan's) or of the scan itself writes no header free
    text: a converter may have put a name there. The geometry is kept."""
    image = nib.Nifti1Image(np.arange(7 * 8 * 9, dtype=np.int16).reshape(7, 8, 9), np.diag([0.8, 0.8, 2.5, 1.0]))
    image.header["descrip"] = b"Doe^John 1965-02-03"
    image.header["aux_file"] = b"PID-98765"
    nib.save(image, str(tmp_path / "scan.nii.gz"))
    ((data, kwargs, layer_type),) = read_nifti(str(tmp_path / "scan.nii.gz"))
    assert layer_type == "image"
    (labels_path,) = write_labels(str(tmp_path / "consensus.nii.gz"), (np.asarray(data) > 100).astype(np.uint8),
                                  kwargs)
    written = nib.load(labels_path)
    np.testing.assert_allclose(written.affine, image.affine)
    (image_path,) = write_image(str(tmp_path / "scan_again.nii.gz"), data, kwargs)
    again = nib.load(image_path)
    assert b"Doe" not in again.header.binaryblock and b"PID" not in again.header.binaryblock
    assert b"Doe" not in written.header.binaryblock and b"PID" not in written.header.binaryblock
    np.testing.assert_allclose(again.affine, image.affine)


def test_bundled_label_round_trip_keeps_every_voxel(tmp_path):
    ((data, kwargs, _),) = read_nifti(str(sample_label_path()))
    (written_path,) = write_labels(str(tmp_path / "liver_label"), data, kwargs)
    assert written_path.endswith(".nii.gz")
    original = nib.load(sample_label_path())
    np.testing.assert_array_equal(nib.load(written_path).dataobj, original.dataobj)
    np.testing.assert_array_equal(nib.load(written_path).affine, original.affine)


def test_image_writer_round_trip_on_a_2d_image(tmp_path):
    flat = np.arange(20, dtype=np.float32).reshape(4, 5)
    source = _write_nifti(tmp_path / "xray.nii", flat)          # an axial image stored L, P
    ((data, kwargs, _),) = read_nifti(str(source))
    # A 2-D layer in the radiological view of its plane: rows A → P, columns R → L.
    np.testing.assert_array_equal(data, flat.T)
    assert kwargs["axis_labels"] == ("A→P", "R→L") and kwargs["scale"] == pytest.approx((0.7, 0.6))

    (written_path,) = write_image(str(tmp_path / "xray_out.nii"), data, kwargs)

    written = nib.load(written_path)
    assert written.shape == (4, 5)
    np.testing.assert_array_equal(written.get_fdata(), flat)
    np.testing.assert_allclose(written.affine, ANISOTROPIC_AFFINE)


def test_a_coronal_image_is_shown_as_coronal_images_are(tmp_path):
    """A 2-D image is reoriented in its own plane: coronal means head up and the patient's right on the left."""
    flat = np.arange(20, dtype=np.float32).reshape(4, 5)       # i → R, j → S; the singleton axis points A
    affine = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    source = _write_nifti(tmp_path / "coronal.nii", flat, affine)
    ((data, kwargs, _),) = read_nifti(str(source))
    np.testing.assert_array_equal(data, flat[::-1, ::-1].T)   # rows S → I, columns R → L
    assert kwargs["axis_labels"] == ("S→I", "R→L")
    (written_path,) = write_image(str(tmp_path / "back.nii"), data, kwargs)
    np.testing.assert_array_equal(nib.load(written_path).get_fdata(), flat)


def test_writer_overwrites_because_napari_already_asked(tmp_path):
    target = tmp_path / "again.nii.gz"
    shutil.copy(sample_label_path(), target)
    labels = np.zeros((2, 3, 4), np.uint16)
    labels[0, 0, 0] = 700
    write_labels(str(target), labels, {"scale": (5.0, 1.0, 2.0), "metadata": {}})
    written = nib.load(target)
    assert written.shape == (2, 3, 4) and written.get_data_dtype() == np.uint16
    assert np.asanyarray(written.dataobj)[0, 0, 0] == 700
    assert written.header.get_zooms() == (5.0, 1.0, 2.0)


def test_a_name_typed_without_its_extension_never_replaces_the_file_with_it(tmp_path):
    """Qt's save dialog asks about the name typed ('liver_seg'); the writer adds '.nii.gz' and must not
    replace that other file, which nobody was asked about."""
    target = tmp_path / "liver_seg.nii.gz"
    shutil.copy(sample_label_path(), target)
    before = target.read_bytes()
    labels = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(UserInputError, match="type the full name"):
        write_labels(str(tmp_path / "liver_seg"), labels, {"scale": (1.0, 1.0, 1.0), "metadata": {}})
    assert target.read_bytes() == before
    written = write_labels(str(tmp_path / "fresh"), labels, {"scale": (1.0, 1.0, 1.0), "metadata": {}})
    assert written == [str(tmp_path / "fresh.nii.gz")]


def test_a_plain_layer_is_written_in_its_own_order_without_an_invented_orientation(tmp_path):
    data = np.arange(6 * 4 * 5, dtype=np.float32).reshape(6, 4, 5)
    array, meta = _layers.layer_to_volume(data, None, scale=(3.0, 0.5, 0.8))
    assert array.shape == (6, 4, 5) and meta.spacing == (3.0, 0.5, 0.8) and not meta.affine_known
    (path,) = write_image(str(tmp_path / "plain.nii.gz"), data, {"scale": (3.0, 0.5, 0.8), "metadata": {}})
    written = nib.load(path)
    np.testing.assert_array_equal(written.get_fdata(), data)
    assert int(written.header["qform_code"]) == int(written.header["sform_code"]) == 0
    _, default_meta = _layers.layer_to_volume(data)
    assert default_meta.spacing == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("how", ["ras", "lps", "sagittal", "swapped", "codes0"])
def test_reading_then_writing_labels_changes_nothing(tmp_path, how):
    """Voxels, affine and qform/sform codes survive a reader → writer round trip, however the file is stored."""
    affines = {
        "ras": np.diag([0.8, 0.9, 3.0, 1.0]),
        "lps": np.array([[-0.8, 0, 0, 90], [0, -0.9, 0, 110], [0, 0, 3, -50], [0, 0, 0, 1.0]]),
        "sagittal": np.array([[0, 0, -3, 10], [0.8, 0, 0, 5], [0, -0.9, 0, 3], [0, 0, 0, 1.0]]),   # A, I, L
        "swapped": np.array([[0, 0.9, 0, 0], [0.8, 0, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1.0]]),
        "codes0": np.diag([0.8, 0.9, 3.0, 1.0]),
    }
    labels = np.random.default_rng(4).integers(0, 3, size=(5, 6, 7)).astype(np.uint8)
    source = _write_nifti(tmp_path / f"{how}_label.nii.gz", labels, affines[how],
                          code={"sagittal": 2, "codes0": 0}.get(how, 1))
    if how == "codes0":
        with pytest.warns(GeometryWarning, match="voxel axes are taken as R, A, S"):
            ((data, kwargs, layer_type),) = read_nifti(str(source))
        assert kwargs["axis_labels"] == ("k", "j reversed", "i reversed")     # no anatomy is claimed
    else:
        ((data, kwargs, layer_type),) = read_nifti(str(source))
        assert kwargs["axis_labels"] == ("I→S", "A→P", "R→L")
    assert layer_type == "labels"
    (written_path,) = write_labels(str(tmp_path / "saved.nii.gz"), data, kwargs)
    original, written = nib.load(source), nib.load(written_path)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    np.testing.assert_array_equal(written.affine, original.affine)
    for code in ("qform_code", "sform_code"):
        assert int(written.header[code]) == int(original.header[code])


def test_volume_to_layer_and_back_is_exact():
    array = np.random.default_rng(3).normal(size=(3, 4, 5)).astype(np.float32)
    meta = VolumeMeta(affine=ANISOTROPIC_AFFINE, spacing=(0.6, 0.7, 4.0))
    data, kwargs = _layers.volume_to_layer(array, meta)
    assert np.shares_memory(data, array)                       # a view: nothing copied
    back, back_meta = _layers.layer_to_volume(data, kwargs["metadata"], scale=kwargs["scale"])
    np.testing.assert_array_equal(back, array)
    assert np.shares_memory(back, array)
    np.testing.assert_array_equal(back_meta.affine, meta.affine)
    assert back_meta.spacing == meta.spacing


# ----------------------------------------------------------------------------- sample data and manifest


def test_sample_data_returns_the_scan(sample_image_layer):
    ((data, kwargs, layer_type),) = liver_ct()
    assert layer_type == "image"
    np.testing.assert_array_equal(data, sample_image_layer[0])
    assert [layer_type for _, _, layer_type in liver_ct_with_labels()] == ["image", "labels"]


def test_manifest_is_valid_and_declares_every_contribution():
    manifest = PluginManifest.from_file(ROOT_MANIFEST)
    contributions = manifest.contributions

    assert manifest.name == "napari-medconddiff"
    assert manifest.display_name == "MedCondDiff"
    commands = {c.id: c.python_name for c in contributions.commands}
    assert commands["napari-medconddiff.segment_widget"] == "napari_medconddiff._widget:SegmentWidget"
    assert [w.display_name for w in contributions.widgets] == ["MedCondDiff segmentation"]
    (reader,) = contributions.readers
    assert set(reader.filename_patterns) == {"*.nii", "*.nii.gz", "*.dcm", "*.dicom"}
    assert reader.accepts_directories           # DICOM series folders (test_napari_dicom.py)
    assert sorted((tuple(w.layer_types), tuple(w.filename_extensions)) for w in contributions.writers) == [
        (("image",), (".nii.gz", ".nii")), (("labels",), (".dcm",)), (("labels",), (".nii.gz", ".nii"))]
    assert "liver_ct" in {s.key for s in contributions.sample_data}
    # Every command the manifest refers to must be declared.
    referenced = [r.command for r in contributions.readers] + [w.command for w in contributions.writers]
    referenced += [s.command for s in contributions.sample_data] + [w.command for w in contributions.widgets]
    assert set(referenced) <= set(commands)


def test_manifest_python_names_resolve_except_the_widget_module():
    """Each reader/writer/sample python_name points at a real function (catches typos)."""
    import importlib

    manifest = PluginManifest.from_file(ROOT_MANIFEST)
    for command in manifest.contributions.commands:
        module_name, attribute = command.python_name.split(":")
        if module_name == "napari_medconddiff._widget":
            continue  # written separately; importing it pulls in Qt and torch
        assert callable(getattr(importlib.import_module(module_name), attribute)), command.id


def test_packaged_manifest_has_the_same_bytes_as_the_root_one():
    packaged = importlib.resources.files("napari_medconddiff") / "napari.yaml"
    assert packaged.read_bytes() == ROOT_MANIFEST.read_bytes()
    assert (REPO_ROOT / "napari_medconddiff" / "napari.yaml").read_bytes() == ROOT_MANIFEST.read_bytes()


def test_a_multiscale_layer_is_written_at_full_resolution(tmp_path):
    """napari keeps a multiscale layer's levels in a MultiScaleData (no list): the writer takes level 0."""
    from napari.layers import Image, Labels

    ((data, kwargs, _),) = read_nifti(str(sample_scan_path()))
    full = np.asarray(data)
    image = Image([full, full[::2, ::2, ::2]], multiscale=True, **kwargs)
    assert type(image.data).__name__ == "MultiScaleData" and not isinstance(image.data, (list, tuple))
    assert _layers.full_resolution(image) is _layers.full_resolution(image.data) is image.data[0]
    (path,) = write_image(str(tmp_path / "multiscale.nii.gz"), image.data, kwargs)
    source_array, _ = load_volume(sample_scan_path())
    np.testing.assert_array_equal(nib.load(path).get_fdata(dtype=np.float32), source_array)

    labels = (full > 0).astype(np.uint8)
    placed = {key: kwargs[key] for key in ("scale", "metadata")}
    layer = Labels([labels, labels[::2, ::2, ::2]], multiscale=True, **placed)
    (path,) = write_labels(str(tmp_path / "multiscale_labels.nii.gz"), layer.data, kwargs)
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj),
                                  _layers.layer_to_volume(labels, kwargs["metadata"])[0])


def test_a_training_set_case_opens_as_its_image_and_labels_named_by_the_set(tmp_path):
    """A training set (nnU-Net v2) reviewed in napari: labelsTr/CASE.nii.gz, whose name does not say
    "label", opens as Labels with the set's classes, its ignore value (the slices nobody verified)
    transparent; imagesTr/CASE_0000.nii.gz as the image."""
    from medconddiff.training_set import TrainingSet

    image, _ = load_volume(sample_scan_path())
    labels, _ = load_volume(sample_label_path())
    image, labels = image[32:96, 32:96, 60:64], labels[32:96, 32:96, 60:64].astype(np.uint8)
    root = tmp_path / "Dataset001_Mine"
    TrainingSet.create(root, ("background", "liver", "tumour")).add_scan(
        "case1", image, VolumeMeta(affine=np.eye(4), spacing=(1.0, 1.0, 1.0)), labels,
        ("background", "liver", "tumour"), verified_slices=[1])
    label_path = str(root / "labelsTr" / "case1.nii.gz")
    ((data, kwargs, layer_type),) = get_reader(label_path)(label_path)
    assert layer_type == "labels"
    assert list(kwargs["features"]["class"]) == ["background", "liver", "tumour", "ignore (not verified)"]
    assert kwargs["colormap"][3][3] == 0.0 and kwargs["colormap"][1][3] > 0      # ignore shows nothing
    assert set(np.unique(data)) >= {1, 3}
    image_path = str(root / "imagesTr" / "case1_0000.nii.gz")
    ((_, _, layer_type),) = get_reader(image_path)(image_path)
    assert layer_type == "image"
    # Outside a dataset, the same file is an image unless its name says otherwise, as before.
    shutil.copy(label_path, tmp_path / "case1.nii.gz")
    ((_, _, layer_type),) = get_reader(str(tmp_path / "case1.nii.gz"))(str(tmp_path / "case1.nii.gz"))
    assert layer_type == "image"
