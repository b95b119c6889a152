"""The RT structure set's contour fill: the voxels whose centres lie inside, as scikit-image's polygon2mask
decides them, at scan-line speed."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from skimage.draw import polygon2mask

from medconddiff.dicom_folder import DicomError
from medconddiff.dicom_rtstruct import _contour_points, fill_polygons


def placed(piece, shape):
    mask = np.zeros(shape, bool)
    if piece is not None:
        mask[piece.row:piece.row + piece.mask.shape[0], piece.column:piece.column + piece.mask.shape[1]] = piece.mask
    return mask


def star(rng, centre, n, grid):
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(3, 18, n)
    points = np.column_stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)])
    return np.round(points * grid) / grid if grid else points


def test_contours_fill_the_voxels_polygon2mask_fills_holes_included():
    rng = np.random.default_rng(0)
    shape = (48, 44)
    for trial in range(300):
        # Float vertices, and vertices on voxel centres or edges (ties), partly off the grid.
        grid = (None, 1, 2)[trial % 3]
        outer = star(rng, rng.uniform(5, 40, 2), int(rng.integers(3, 30)), grid)
        expected = polygon2mask(shape, outer)
        polygons = [outer]
        if trial % 2:                    # a second contour of the same ROI on the slice: even-odd
            inner = star(rng, rng.uniform(10, 35, 2), int(rng.integers(3, 12)), grid) * 0.5 + 10
            polygons.append(inner)
            expected ^= polygon2mask(shape, inner)
        got = placed(fill_polygons(polygons, shape), shape)
        # polygon2mask leaves out the centres on a zero-width spike that rounding can make; nothing else differs.
        assert (got != expected).sum() <= (0 if grid is None else 3), trial
    square = np.array([(2, 2), (2, 8), (8, 8), (8, 2)], float)         # its outline on voxel centres: inside
    assert placed(fill_polygons([square], (12, 12)), (12, 12)).sum() == 49
    assert fill_polygons([square + 100], (12, 12)) is None                # off the grid


def test_contour_data_is_read_from_the_files_text_and_bad_text_is_refused():
    item = pydicom.Dataset()
    item.ContourData = ["1.5", "-2", "3e1"]
    np.testing.assert_array_equal(_contour_points(item), [1.5, -2.0, 30.0])
    raw = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x30060050), "DS", 16, b"1.5\\-2 \\3e1 \\4\\5\\6 ", 0,
                                          False, True)
    item = pydicom.Dataset({pydicom.tag.Tag(0x30060050): raw})
    np.testing.assert_array_equal(_contour_points(item), [1.5, -2, 30, 4, 5, 6])
    bad = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x30060050), "DS", 8, b"1.5\\x\\3 ", 0, False, True)
    with pytest.raises(DicomError, match="not a list of numbers"):
        _contour_points(pydicom.Dataset({pydicom.tag.Tag(0x30060050): bad}))


def test_a_written_structure_set_keeps_holes_and_refuses_what_it_cannot_contour(tmp_path):
    from medconddiff.dicom_rtstruct import read_rtstruct
    from medconddiff.dicom_rtstruct_write import write_rtstruct
    from medconddiff.dicom_series import read_dicom_series
    from tests.dicom_helpers import write_series

    volume = np.zeros((40, 36, 4), np.float32)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = [30.0, 20.0, -100.0]
    write_series(tmp_path / "ct", volume, affine)
    scan = read_dicom_series(tmp_path / "ct")
    labels = np.zeros((40, 36, 4), np.uint8)
    labels[5:30, 6:30, 1] = 1
    labels[12:20, 12:20, 1] = 0                      # a ring: its hole is a contour of its own
    labels[14:17, 14:17, 1] = 2                      # an island inside the hole
    labels[0:3, 0:4, 3] = 2                          # touching the image's edge
    write_rtstruct(tmp_path / "rs.dcm", labels, scan.meta, scan.source, ("background", "organ", "lesion"))
    np.testing.assert_array_equal(read_rtstruct(tmp_path / "rs.dcm", scan).labels, labels)
    with pytest.raises(FileExistsError):
        write_rtstruct(tmp_path / "rs.dcm", labels, scan.meta, scan.source, ("background", "organ", "lesion"))
    for bad, names, message in ((labels[..., :3], ("background", "organ", "lesion"), "do not lie on the 4 slices"),
                                (np.zeros_like(labels), ("background", "organ"), "no class has a voxel"),
                                (labels, ("background", "organ"), "label 2 has no class name")):
        with pytest.raises(DicomError, match=message):
            write_rtstruct(tmp_path / "bad.dcm", bad, scan.meta, scan.source, names)
    assert not (tmp_path / "bad.dcm").exists()
