"""npe2 reader for NIfTI volumes (.nii, .nii.gz) and DICOM series (a folder, or one .dcm file).

Layers follow :mod:`napari_medconddiff._layers`: the data are a view of the file's voxels in the
radiological convention (slider inferior → superior, anterior up, the patient's right on the
screen's left), ``scale`` is the voxel spacing in mm, and ``metadata`` lets the writer restore the
file's voxel order and affine exactly. A file whose name mentions label/seg/mask and whose voxels are small non-negative
integers opens as a Labels layer; everything else opens as a grey-scale Image.

A 4-D file with C > 1 volumes along its fourth axis (a multi-sequence MRI such as BraTS's FLAIR, T1,
T1c, T2) opens as C layers named ``<file> c0``, ``<file> c1``, …, each one volume with the geometry
of a 3-D file: they overlay exactly, each can be saved on its own as a 3-D file, and the widget's
"More channels" row takes them as the channels of one scan. A file with more volumes than
:data:`MAX_CHANNEL_LAYERS` is a series (fMRI, DCE, a 4-D CT): it opens as one layer with a volume
slider in front, in the same radiological view; napari's Layers ▸ Split Stack makes 3-D layers of it
that keep the file's geometry.

**DICOM** (:mod:`medconddiff.dicom_series` reads it): a folder (searched recursively; files need no
extension) opens as one grey-scale layer per image series, named by series number and description
(``series 3 'CT abdomen'``), never by a patient attribute; a single ``.dcm`` file opens alone. Each
layer gets the radiological view, scale and axis labels of the same scan stored as NIfTI, and
``metadata`` records the series it came from (:func:`napari_medconddiff._layers.dicom_record`), so
Export and the labels writer can write a DICOM SEG that references it. A series whose images are all
localizers (scouts) is left out; what was left out (scouts, files that are not DICOM) is said in a
warning, which napari shows as a notification. A **DICOM SEG** in the folder (the plugin's own export,
or another tool's) opens as a Labels layer over the series it references, named after it, with one
class per segment (the status bar names the segment under the cursor); a SEG file opened alone is
placed by its series, looked for in the SEG's own folder. A SEG whose series is not there, or that
cannot be mapped onto it, is named in a warning and the rest opens. A folder with no DICOM in it is
declined (None), so napari tries its other readers. A series that cannot be read is named in one line: as a warning when
other series of the folder open, as the error when none does.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medconddiff.nifti import NIFTI_SUFFIXES, VolumeMeta, load_channels, sanitize_nonfinite, smallest_label_dtype

from ._layers import DICOM_SOURCE_KEY, LABELS_FROM_KEY, METADATA_KEY, SEGMENT_CODES_KEY, dicom_record, display_reorientation, layer_name, volume_to_layer

LayerData = tuple[np.ndarray, dict[str, Any], str]
PathOrPaths = str | os.PathLike | list[str | os.PathLike]

LABEL_NAME_HINTS = ("label", "seg", "mask", "consensus")
# NIfTI's NIFTI_INTENT_LABEL: a header that says its voxels are labels (this plugin's label writer sets it).
INTENT_LABEL = 1002
# A label map has few distinct values; an integer-valued CT named "*_seg*" has thousands.
MAX_LABEL_VALUE = 65535
MAX_DISTINCT_LABELS = 1024
# More volumes than this in a 4-D file are a series, not the channels of one scan (multi-sequence
# MRI has 2–4): one layer per volume would bury the layer list.
MAX_CHANNEL_LAYERS = 8
# Percentiles of the display window: robust against a few extreme (metal, air) voxels.
CONTRAST_PERCENTILES = (1.0, 99.0)
# Percentiles are estimated on at most this many voxels to keep opening big scans fast.
CONTRAST_SAMPLE_SIZE = 1_000_000


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """Return :func:`read_nifti` if every path is an existing .nii/.nii.gz file, :func:`read_dicom`
    if every path is a DICOM file or a folder holding DICOM, else None.

    Whether a file is really readable is only known once it is read; the readers then raise a
    UserInputError whose message names the file or series and the problem, which napari shows.
    """
    paths = path if isinstance(path, (list, tuple)) else [path]
    if paths and all(_is_nifti_file(p) for p in paths):
        return read_nifti
    if paths and all(_is_dicom_input(p) for p in paths):
        return read_dicom
    return None


def read_nifti(path: PathOrPaths) -> list[LayerData]:
    """Read one or several NIfTI files into napari layer data tuples (one layer per file, one per
    volume of a 4-D file)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    return [layer for p in paths for layer in read_layers(p)]


def read_layers(path: str | os.PathLike) -> list[LayerData]:
    """One NIfTI file -> one ``(data, kwargs, "image" | "labels")`` per volume (channel)."""
    path = os.fspath(path)
    array, meta = load_channels([path])
    name = layer_name(path)
    count = array.shape[3]
    if count == 1:
        return [volume_layer(array[..., 0], meta, name, path)]
    if count > MAX_CHANNEL_LAYERS:
        return [series_layer(array, meta, name, path)]
    # Channel-major and contiguous: each layer then holds a plain (i, j, k) block, as a 3-D file's
    # does, instead of a view striding over the other channels (slow to slice and to render).
    channels = np.ascontiguousarray(np.moveaxis(array, 3, 0))
    del array
    return [volume_layer(channels[c], meta, f"{name} c{c}", path) for c in range(count)]


def read_layer(path: str | os.PathLike) -> LayerData:
    """One 3-D (or single-volume 4-D) NIfTI file -> ``(data, kwargs, "image" | "labels")``."""
    layers = read_layers(path)
    if len(layers) != 1:
        raise ValueError(f"{os.fspath(path)} holds {len(layers)} volumes; read it with read_layers")
    return layers[0]


def series_layer(array: np.ndarray, meta: VolumeMeta, name: str, path: str) -> LayerData:
    """A file-ordered ``(i, j, k, T)`` series -> one Image layer ``(T, S, P, L)``: each volume in the
    radiological view of a 3-D file (a view of the array), a volume slider in front."""
    array, n_bad = _finite(array, path)
    _, kwargs = volume_to_layer(array[..., 0], meta)
    to_layer, _ = display_reorientation(meta)      # the view volume_to_layer gave each volume
    data = np.moveaxis(to_layer.apply(array), 3, 0)
    kwargs.update(name=name, colormap="gray", contrast_limits=contrast_limits(array),
                  scale=(1.0, *kwargs["scale"]), axis_labels=("volume", *kwargs["axis_labels"]))
    kwargs["metadata"]["nonfinite_voxels_replaced"] = n_bad
    return data, kwargs, "image"


def volume_layer(array: np.ndarray, meta: VolumeMeta, name: str, path: str) -> LayerData:
    """One file-ordered ``(i, j, k)`` volume -> a Labels layer (a label-named file, or a file in a
    dataset's ``labelsTr``, of small integers) or a grey-scale Image layer. A dataset's label file gets
    the classes its ``dataset.json`` names, and its ``ignore`` value (voxels nobody verified, in a
    training set) shows nothing, so the verified slices stand out."""
    from medconddiff.dataset_layout import label_file_classes

    classes = label_file_classes(path)
    if _looks_like_labels(name, array, in_dataset=classes is not None or _says_labels(meta)):
        labels = array.astype(smallest_label_dtype(int(array.max())))
        data, kwargs = volume_to_layer(labels, meta)
        kwargs["name"] = name
        if classes is not None:
            kwargs.update(_dataset_label_style(*classes))
        return data, kwargs, "labels"
    array, n_bad = _finite(array, path)
    data, kwargs = volume_to_layer(array, meta)
    kwargs["metadata"]["nonfinite_voxels_replaced"] = n_bad
    kwargs.update(name=name, colormap="gray", contrast_limits=contrast_limits(array))
    return data, kwargs, "image"


def _finite(array: np.ndarray, path: str) -> tuple[np.ndarray, int]:
    """``array`` with NaN/Inf replaced, and how many were: napari's contrast and rendering break on
    NaN, so the reader says what it changed instead of failing."""
    array, n_bad = sanitize_nonfinite(array)
    if n_bad:
        warnings.warn(f"{path}: {n_bad} NaN/Inf voxels replaced by the smallest finite value", stacklevel=4)
    return array, n_bad


def contrast_limits(array: np.ndarray) -> tuple[float, float]:
    """Display window from the 1st..99th percentile: shows soft tissue in CT and MR alike."""
    values = np.asarray(array).ravel()
    step = max(1, values.size // CONTRAST_SAMPLE_SIZE)
    low, high = np.percentile(values[::step], CONTRAST_PERCENTILES)
    if not high > low:
        # Nearly constant images: fall back to the full range, or any non-empty window.
        low, high = float(values.min()), float(values.max())
        if not high > low:
            high = low + 1.0
    return float(low), float(high)


def read_dicom(path: PathOrPaths) -> list[LayerData]:
    """Read DICOM folders or files into image layer data tuples (one per series). One file of a series
    reads its whole series (the other files beside it), so a file that a layer of the current viewer
    already shows as part of a series is not read again: the files of one series chosen together in
    napari's Open dialog (which asks for them one by one) give that series once, not once per file.
    Nothing left to read gives napari's "no layers" answer, ``[(None,)]``."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    layers: list[LayerData] = []
    read = _series_files_shown()
    for p in paths:
        if Path(p).is_file() and Path(p).resolve() in read:
            continue
        for data, kwargs, layer_type in read_dicom_layers(p):
            layers.append((data, kwargs, layer_type))
            if layer_type == "image":   # a SEG's record names the files of the series it covers
                record = (kwargs.get("metadata") or {}).get(METADATA_KEY, {}).get(DICOM_SOURCE_KEY) or {}
                read.update(_files_of(record))
    return layers or [(None,)]


def _files_of(record: dict) -> set[Path]:
    return {Path(file).resolve() for file in record.get("files", ())}


def _series_files_shown() -> set[Path]:
    """The files of the DICOM series of several files that the current viewer's layers show."""
    import napari

    viewer = napari.current_viewer()
    shown: set[Path] = set()
    for layer in viewer.layers if viewer is not None else ():
        record = (layer.metadata or {}).get(METADATA_KEY, {}).get(DICOM_SOURCE_KEY) or {}
        if len(record.get("files", ())) > 1:
            shown |= _files_of(record)
    return shown


def read_dicom_layers(path: str | os.PathLike) -> list[LayerData]:
    """One folder (every series in it but the scouts) or one DICOM file (one layer per echo or phase of an
    enhanced multi-frame file that holds several) -> image layer data tuples."""
    from medconddiff.dicom_series import DicomError, list_series, read_dicom_series

    path = Path(path)
    if path.is_file():
        seg_header = _segmentation_header(path)
        if seg_header is not None:
            return [_segmentation_beside_its_series(path, seg_header)]
    infos = list_series(path)
    notes, failures, layers, opened = list(infos.notes), [], [], {}
    for info in infos:
        if info.localizers and info.localizers == info.instances:
            notes.append(f"{info.name}: left out, every image is a localizer (scout)")
            continue
        try:
            scan = read_dicom_series(path, info.uid, listed=infos)
        except DicomError as error:
            message = " ".join(str(error).split())
            failures.append(message if info.name in message else f"{info.name}: {message}")
            continue
        notes.extend(note for note in scan.source.notes if note not in notes)
        layers.append(dicom_layer(scan, info.name))
        opened[info.uid] = (scan, info.name)
    if infos.scanned is not None and infos.scanned.segmentations:
        seg_layers, seg_notes = segmentation_layers(infos.scanned.segmentations, opened)
        layers.extend(seg_layers)
        notes = [note for note in notes if note != infos.scanned.segmentation_note] + seg_notes
    if not layers:
        if not failures:
            where = path.name if path.is_file() else "DICOM folder"    # a folder's name is often the patient's
            raise DicomError(f"{where}: no series to show (only localizer images): "
                             + "; ".join(info.name for info in infos))
        raise DicomError("\n".join(failures))
    _warn_notes(path, notes + [f"not opened: {failure}" for failure in failures])
    return layers


def dicom_layer(scan: Any, name: str) -> LayerData:
    """A :class:`~medconddiff.dicom_series.DicomScan` -> a grey-scale Image layer in the radiological
    view, its metadata holding the volume meta and the series it came from."""
    volume, n_bad = _finite(scan.volume, name)
    data, kwargs = volume_to_layer(volume, scan.meta)
    kwargs["metadata"][METADATA_KEY][DICOM_SOURCE_KEY] = dicom_record(scan.source)
    kwargs["metadata"]["nonfinite_voxels_replaced"] = n_bad
    kwargs.update(name=name, colormap="gray", contrast_limits=contrast_limits(volume))
    return data, kwargs, "image"


def segmentation_layers(segmentations: list[Any], opened: dict[str, tuple[Any, str]]
                        ) -> tuple[list[LayerData], list[str]]:
    """Labels layers for the DICOM SEG and RT structure set files found in a folder
    (``dicom_folder.Instance``, headers only) whose series was opened (``opened``: series UID -> (scan,
    layer name)), and a note for each that was not."""
    from medconddiff.dicom_series import DicomError

    layers, notes = [], []
    for seg in segmentations:
        targets = [(scan, name) for scan, name in opened.values()
                   if _made_on(seg.header, scan.source.series_uid, scan.source.frame_of_reference_uid)]
        if not targets:
            notes.append(f"not opened: {seg.label}, {_kind_of(seg.header)} of a series that is not opened here")
            continue
        try:
            layers.append(_segmentation_over_one_of(seg.path, seg.header, iter(targets)))
        except DicomError as error:
            notes.append(f"not opened: {seg.label}: {error}")
    return layers, notes


def _segmentation_over_one_of(path: Path, header: Any, candidates: Any) -> LayerData:
    """The SEG's layer over the first of ``candidates`` ((scan, layer name) pairs; an iterator, so that
    scans can be read one by one) it maps onto: a series split into echoes or phases has one candidate
    per part, all with the UID the SEG references, and only the SEG's images say which part it is."""
    from medconddiff.dicom_series import DicomError

    problems = []
    for scan, name in candidates:
        try:
            return segmentation_layer(path, header, scan, name)
        except DicomError as error:
            problems.append(" ".join(str(error).split()))
    raise DicomError("; ".join(problems))


def segmentation_layer(path: Path, header: Any, scan: Any, series_name: str) -> LayerData:
    """A DICOM SEG or an RT structure set read onto its series' voxels -> a Labels layer placed exactly over
    the series' image layer (same view, scale and metadata, so it saves back as a SEG of that series), one
    class per segment or ROI, named as the file names them."""
    from ._result_layers import class_colormap, class_features

    if _is_structure_set(header):
        from medconddiff.dicom_rtstruct import describe, read_rtstruct

        structures = read_rtstruct(path, scan)
        labels, class_names, kind, description = (structures.labels, structures.class_names, "RTSTRUCT",
                                                  describe(header))
        for note in structures.notes:
            warnings.warn(note, stacklevel=2)
    else:
        from medconddiff.dicom_seg import dicom_seg_codes, read_dicom_seg, segment_class_names

        labels = read_dicom_seg(path, scan)
        class_names, kind = segment_class_names(path, labels), "SEG"
        description = str(header.get("SeriesDescription", "") or "").strip()
    data, kwargs = volume_to_layer(labels, scan.meta)
    kwargs["metadata"][METADATA_KEY][DICOM_SOURCE_KEY] = dicom_record(scan.source)
    kwargs["metadata"][METADATA_KEY][LABELS_FROM_KEY] = kind
    if kind == "SEG":
        kwargs["metadata"][METADATA_KEY][SEGMENT_CODES_KEY] = dicom_seg_codes(path)
    kwargs.update(name=f"{series_name} {kind}" + (f" {description!r}" if description else ""),
                  colormap=class_colormap(len(class_names)), features=class_features(class_names), opacity=0.5)
    return data, kwargs, "labels"


def _is_structure_set(header: Any) -> bool:
    from medconddiff.dicom_folder import RT_STRUCTURE_SET, sop_class_of

    return sop_class_of(header) == RT_STRUCTURE_SET


def _kind_of(header: Any) -> str:
    return "an RT structure set" if _is_structure_set(header) else "a DICOM SEG"


def _made_on(header: Any, series_uid: str, frame_of_reference_uid: str) -> bool:
    """Whether a SEG (the series its Referenced Series Sequence names) or an RT structure set (the series it
    names, else the frame of reference it shares with the series) was made on a series."""
    if _is_structure_set(header):
        from medconddiff.dicom_rtstruct import drawn_on

        return drawn_on(header, series_uid, frame_of_reference_uid)
    referenced = header.get("ReferencedSeriesSequence", [])
    return series_uid in {str(item.get("SeriesInstanceUID", "")) for item in referenced}


def _segmentation_header(path: Path) -> Any:
    """The header of a DICOM SEG or RT structure set file (no pixel data), or None for any other file."""
    import pydicom

    from medconddiff.dicom_folder import READ_ERRORS, RT_STRUCTURE_SET, SEGMENTATION_SOP_CLASSES, sop_class_of

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except READ_ERRORS:
        return None      # the series reader says what is wrong with it
    return header if sop_class_of(header) in (*SEGMENTATION_SOP_CLASSES, RT_STRUCTURE_SET) else None


def _segmentation_beside_its_series(path: Path, header: Any) -> LayerData:
    """A SEG (or RT structure set) file opened alone (``header``: its header): its series is looked for in
    its folder (where Export puts the SEG: beside the series folder), read for its geometry, and the SEG
    placed over it."""
    from medconddiff.dicom_folder import series_uid_of
    from medconddiff.dicom_series import DicomError, list_series, read_dicom_series

    try:
        infos = list_series(path.parent)
    except DicomError:
        infos = []

    def frame_of_reference(info: Any) -> str:     # from the series' first header, read while listing
        return str(infos.scanned.series[info.uid][0].header.get("FrameOfReferenceUID", "") or "")

    matches = [info for info in infos if _made_on(header, series_uid_of(info.uid), frame_of_reference(info))]
    if not matches:
        raise DicomError(f"{path.name} is {_kind_of(header)}; the series it segments is not in its folder: "
                         "open the series folder (with the SEG in it) or put the SEG beside it")
    parts = ((read_dicom_series(path.parent, info.uid, listed=infos), info.name) for info in matches)
    return _segmentation_over_one_of(path, header, parts)


def _warn_notes(path: Path, notes: list[str]) -> None:
    """What was left out or refused while reading, one warning per note (napari notifies each)."""
    # A file by its name; a folder not by its name, which is often the patient's (notes name the series).
    where = path.name if path.is_file() else "DICOM folder"
    for note in notes:
        warnings.warn(f"{where}: {note}", stacklevel=3)


def _is_dicom_input(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    from medconddiff.dicom_series import is_dicom_path

    return is_dicom_path(path)


def _is_nifti_file(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = os.fspath(path)
    return str(path).lower().endswith(NIFTI_SUFFIXES) and os.path.isfile(path)


def _dataset_label_style(class_names: tuple[str, ...], ignore: int | None) -> dict[str, Any]:
    """Labels kwargs naming a dataset's classes (the status bar shows the class under the cursor), with
    its ignore value transparent."""
    from ._result_layers import class_colormap, class_features

    names = list(class_names)
    colormap = class_colormap(len(names))
    if ignore is not None:
        names += [f"label {value}" for value in range(len(names), ignore)] + ["ignore (not verified)"]
        colormap[ignore] = (0.0, 0.0, 0.0, 0.0)
    return {"features": class_features(names), "colormap": colormap, "opacity": 0.5}


def _says_labels(meta: VolumeMeta) -> bool:
    """Whether the file's header declares label voxels (intent NIFTI_INTENT_LABEL)."""
    return meta.header is not None and int(meta.header["intent_code"]) == INTENT_LABEL


def _looks_like_labels(name: str, array: np.ndarray, in_dataset: bool = False) -> bool:
    """Name (or a dataset's label folder, or the header's intent: ``in_dataset``) hints at a segmentation
    and the voxels are few small non-negative integers."""
    if not in_dataset and not any(hint in name.lower() for hint in LABEL_NAME_HINTS):
        return False
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > MAX_LABEL_VALUE:
        return False
    if not np.array_equal(array, np.round(array)):
        return False
    counts = np.bincount(array.astype(np.int64).ravel(), minlength=1)
    return np.count_nonzero(counts) <= MAX_DISTINCT_LABELS
