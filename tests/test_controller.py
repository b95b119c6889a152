"""The Qt-free controller, driven without a window: napari's ViewerModel, a synchronous runner.

The same anatomy stored in different voxel orders must look the same on screen and segment the
same; results land on the right voxels (the model-resolution x̂0 stack included); edits survive
re-fusions and re-runs unless the user says otherwise; fine-tuning and export go through the core.
A tiny random model (tests/conftest.py) on a 64×64×6 cut of the real liver CT, 2–3 steps.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medconddiff.config import SamplingConfig
from medconddiff.dicom_series import DicomSource
from medconddiff.nifti import VolumeMeta
from medconddiff.segmenter import Segmenter
from napari_medconddiff import _controller as controller_module
from napari_medconddiff import _notifications, _result_layers
from napari_medconddiff._controller import (
    KEEP,
    NEW_LAYER,
    REPLACE,
    FinetuneSettings,
    Questions,
    SegmentationController,
    SegmentSettings,
)
from medconddiff.slice_lists import parse_slice_list, slice_list_text
from napari_medconddiff._export import checkpoint_target, default_export_path, default_finetune_path
from napari_medconddiff._geometry import PLAIN_LAYER_STATUS
from napari_medconddiff._job import SliceChoice
from napari_medconddiff._layers import volume_to_layer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Answers(Questions):
    """Scripted answers to the controller's questions, recording what was asked."""

    def __init__(self, edits=KEEP, save=True):
        self.edit_answer, self.save_answer = edits, save
        self.asked: list[tuple[str, list[int]]] = []

    def edits(self, action, slices):
        self.asked.append((action, list(slices)))
        return self.edit_answer

    def save_cancelled_finetune(self, done, total, path):
        self.asked.append(("save", [done, total]))
        return self.save_answer


def stored(ras: np.ndarray, how: str) -> tuple[np.ndarray, VolumeMeta]:
    """The same 1 mm anatomy (an RAS array) as a file would store it: ``how`` names the file's axes."""
    columns = {"ras": ((1, 0, 0), (0, 1, 0), (0, 0, 1)), "lps": ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),
               "sagittal": ((0, -1, 0), (0, 0, -1), (1, 0, 0)),    # i → P, j → I, k → R: slices along x
               "swapped": ((0, 1, 0), (1, 0, 0), (0, 0, 1))}[how]  # i ↔ j
    if how == "ras":
        data = ras
    elif how == "lps":
        data = ras[::-1, ::-1, :]
    elif how == "sagittal":
        data = ras.transpose(1, 2, 0)[::-1, ::-1, :]
    else:
        data = ras.transpose(1, 0, 2)
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns, dtype=float).T
    return np.ascontiguousarray(data), VolumeMeta(affine=affine, spacing=(1.0, 1.0, 1.0))


def make(ras, how="ras", questions=None):
    from napari.components import ViewerModel

    viewer = ViewerModel()
    data, kwargs = volume_to_layer(*stored(ras, how))
    scan = viewer.add_image(data, name="liver", **kwargs)
    return viewer, scan, SegmentationController(viewer, questions=questions or Answers())


def segment(controller, scan, checkpoint, steps=2, **slices):
    finished = []
    controller.run_finished.connect(finished.append)
    assert controller.segment(SegmentSettings(scan, str(checkpoint), "cpu", SamplingConfig(steps=steps),
                                              SliceChoice(**slices)))
    controller.run_finished.disconnect(finished.append)
    return finished[0]


def layer(viewer, role):
    (found,) = [x for x in viewer.layers
                if _result_layers.is_own_result(x) and _result_layers.marker(x)["role"] == role]
    return found


# ----------------------------------------------------------------------------- geometry


def test_storage_order_changes_nothing_on_screen_nor_in_the_result(liver_volume, tiny_checkpoint, tmp_path):
    """RAS, LPS, a sagittal stack and swapped i/j of one anatomy: same layer, same segmentation, and
    Export writes each file's own voxel order, equal to what the core gives for that file."""
    ras = liver_volume[0]
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    shown = {}
    for how in ("ras", "lps", "sagittal", "swapped"):
        viewer, scan, controller = make(ras, how)
        assert segment(controller, scan, tiny_checkpoint) == "done"
        assert scan.axis_labels == ("I→S", "A→P", "R→L")
        consensus = layer(viewer, "consensus").data
        shown[how] = (np.asarray(scan.data), consensus.copy())
        nifti, _ = controller.export(tmp_path / f"{how}_seg.nii.gz", overwrite=False)
        file_data, meta = stored(ras, how)
        expected = segmenter.segment(file_data, SamplingConfig(steps=2, batch_size=4), meta=meta).labels
        written = nib.load(nifti)
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
        np.testing.assert_allclose(written.affine, meta.affine)
    for how in ("lps", "sagittal", "swapped"):
        np.testing.assert_array_equal(shown[how][0], shown["ras"][0])
        np.testing.assert_array_equal(shown[how][1], shown["ras"][1])
    # Radiological: slider inferior → superior, anterior at the top, the patient's right on the left.
    np.testing.assert_array_equal(shown["ras"][0], ras.transpose(2, 1, 0)[:, ::-1, ::-1])


def affine_map(function, ndim):
    """(A, b) with function(x) = A x + b, read from the origin and the unit vectors (napari transforms are affine)."""
    origin = np.asarray(function(np.zeros(ndim)), dtype=float)
    columns = [np.asarray(function(np.eye(ndim)[k]), dtype=float) - origin for k in range(ndim)]
    return np.stack(columns, axis=1), origin


def scan_voxels_of(scan, steps, step):
    """The scan layer voxel under every voxel of one step of the x̂0 layer (world positions compared)."""
    shape = steps.data.shape[1:]
    to_world, to_world_origin = affine_map(lambda q: steps.data_to_world(np.r_[step, q])[1:], len(shape))
    to_scan, to_scan_origin = affine_map(scan.world_to_data, len(shape))
    grid = np.indices(shape).reshape(len(shape), -1).astype(float)
    world = to_world @ grid + to_world_origin[:, None]
    return np.round(to_scan @ world + to_scan_origin[:, None]).astype(int)


@pytest.mark.parametrize("how", ["lps", "sagittal", "plain"])
def test_every_x0_voxel_lands_on_the_matching_scan_voxel(liver_volume, tiny_checkpoint, how):
    """On a 1 mm scan the model grid is the scan grid, so each x̂0 stack voxel must sit on the scan
    voxel that holds the same step's labels (computed by the core on the scan's grid)."""
    from napari.components import ViewerModel

    ras = liver_volume[0]
    if how == "plain":
        viewer = ViewerModel()
        data, _ = volume_to_layer(*stored(ras, "ras"))
        scan = viewer.add_image(np.array(data), name="liver", scale=(1.0, 1.0, 1.0))
        controller = SegmentationController(viewer)
    else:
        viewer, scan, controller = make(ras, how)
    scan.translate = (3.0, -2.0, 5.0)            # a user-moved layer: results follow it
    assert segment(controller, scan, tiny_checkpoint, steps=3, mode="range", first=1, last=4) == "done"
    steps = layer(viewer, "steps")
    results = controller.current
    run = results.runs[-1]
    assert steps.data.shape[0] == 3 and steps.data.dtype == np.uint8
    np.testing.assert_allclose(layer(viewer, "consensus").translate, scan.translate)
    for step in (0, 2):
        on_scan = np.zeros(results.space.geometry.file_shape, np.uint8)
        results.space.geometry.slice_view(on_scan)[run.slice_indices] = _step_labels_on_scan(run, step)
        expected = results.space.layer.layer_view(on_scan)
        voxels = scan_voxels_of(scan, steps, step)
        np.testing.assert_array_equal(expected[tuple(voxels)], steps.data[step].ravel())
        assert steps.data[step].any() and len(np.unique(voxels[0])) == 4     # real labels, slices 1..4


def _step_labels_on_scan(run, step):
    from medconddiff.segmenter import scan_labels

    return scan_labels(run.trajectory[step].transpose(1, 0, 2, 3), run.geometry)


def test_x0_pixels_sit_where_the_model_grid_samples_an_anisotropic_scan(liver_volume, tiny_checkpoint):
    """0.6 × 0.7 mm pixels and 4 mm slices, LPS: model pixel p of a plane of H scan pixels resized to h
    is centred on scan pixel (p + 0.5) H / h - 0.5 (align_corners=False)."""
    from napari.components import ViewerModel

    viewer = ViewerModel()
    lps = liver_volume[0][::-1, ::-1].copy()
    affine = np.diag([-0.6, -0.7, 4.0, 1.0])
    data, kwargs = volume_to_layer(lps, VolumeMeta(affine=affine, spacing=(0.6, 0.7, 4.0)))
    scan = viewer.add_image(data, name="liver", **kwargs)
    controller = SegmentationController(viewer)
    assert segment(controller, scan, tiny_checkpoint, mode="range", first=2, last=3) == "done"
    steps = layer(viewer, "steps")
    h_r, h_a = controller.current.space.geometry.model_shape        # canonical (R, A) model plane
    assert (h_r, h_a) == (38, 45) and steps.data.shape == (2, 2, 45, 38)   # layer axes (S, P, L)
    for z, p, q in [(0, 0, 0), (1, 44, 37), (0, 20, 7)]:
        a, r = (h_a - 1) - p, (h_r - 1) - q                            # P and L run against A and R
        scan_a, scan_r = (a + 0.5) * 64 / h_a - 0.5, (r + 0.5) * 64 / h_r - 0.5
        expected = (2 + z, 63 - scan_a, 63 - scan_r)                  # scan layer (S, P, L) index
        np.testing.assert_allclose(steps.data_to_world((1, z, p, q))[1:], scan.data_to_world(expected), atol=1e-6)


def test_plain_layer_is_sliced_along_the_slider_axis_and_exported_without_orientation(liver_volume, tiny_checkpoint,
                                                                                        tmp_path):
    from napari.components import ViewerModel

    ras = liver_volume[0]
    viewer = ViewerModel()
    shown, _ = volume_to_layer(*stored(ras, "ras"))
    scan = viewer.add_image(np.array(shown), name="liver")          # (S, P, L) without NIfTI metadata
    controller = SegmentationController(viewer)
    statuses = []
    controller.status.connect(statuses.append)
    assert segment(controller, scan, tiny_checkpoint) == "done"
    assert any(PLAIN_LAYER_STATUS in text for text in statuses)
    plain = layer(viewer, "consensus").data.copy()
    # Shown as the radiological axial view: the same result as the scan read from its file.
    viewer2, scan2, controller2 = make(ras, "ras")
    segment(controller2, scan2, tiny_checkpoint)
    np.testing.assert_array_equal(plain, layer(viewer2, "consensus").data)

    nifti, sidecar = controller.export(tmp_path / "plain_seg.nii.gz", overwrite=False)
    written = nib.load(nifti)
    assert int(written.header["qform_code"]) == int(written.header["sform_code"]) == 0
    np.testing.assert_array_equal(np.asarray(written.dataobj), plain)       # the layer's own axis order
    record = json.loads(sidecar.read_text())
    assert record["affine_known"] is False and "orientation unknown" in record["affine_note"]
    assert "unknown" in statuses[-1]

    # Another slider axis (the user rolled the dims): the model slices along it.
    viewer = ViewerModel()
    scan = viewer.add_image(np.array(shown), name="liver")
    controller = SegmentationController(viewer)
    viewer.dims.order = (1, 0, 2)
    viewer.dims.set_current_step(1, 40)
    assert segment(controller, scan, tiny_checkpoint, mode="current") == "done"
    assert controller.current.space.n_slices == 64                      # axis 1 has 64 slices
    assert controller.current.runs[-1].slice_indices.tolist() == [40]   # the slider's position
    consensus = layer(viewer, "consensus").data
    assert consensus[:, 40].any() and not np.delete(consensus, 40, axis=1).any()


def test_class_volumes_use_the_file_spacing_or_say_they_took_the_layer_scale(liver_volume, tiny_checkpoint):
    from napari.components import ViewerModel

    ras = liver_volume[0]
    data, meta = stored(ras, "sagittal")
    meta = dataclasses.replace(meta, spacing=(0.8, 0.9, 2.5))
    viewer = ViewerModel()
    shown, kwargs = volume_to_layer(data, meta)
    scan = viewer.add_image(shown, name="liver", **kwargs)
    controller = SegmentationController(viewer)
    assert controller.class_volumes() is None                     # nothing segmented yet
    assert segment(controller, scan, tiny_checkpoint) == "done"
    labels = layer(viewer, "consensus").data
    volumes = controller.class_volumes()
    assert volumes.size_from_file and not volumes.partial
    for k, name in enumerate(("background", "liver", "tumour")):
        assert volumes.ml[name] == pytest.approx(np.count_nonzero(labels == k) * 0.8 * 0.9 * 2.5 / 1000, abs=1e-3)

    plain = ViewerModel()
    scan = plain.add_image(np.array(shown), name="liver", scale=(3.0, 1.0, 1.0))   # no file behind it
    controller = SegmentationController(plain)
    assert segment(controller, scan, tiny_checkpoint) == "done"
    volumes = controller.class_volumes()
    assert not volumes.size_from_file
    tumour = np.count_nonzero(layer(plain, "consensus").data == 2)
    assert volumes.ml["tumour"] == pytest.approx(tumour * 3.0 / 1000, abs=1e-3)
    plain.layers.remove(layer(plain, "consensus"))
    assert controller.class_volumes() is None

    viewer, scan, controller = make(ras, "lps")                  # one slice of the scan: a partial volume
    assert segment(controller, scan, tiny_checkpoint, mode="range", first=2, last=3) == "done"
    volumes = controller.class_volumes()
    assert (volumes.partial, volumes.slices_segmented, volumes.slices) == (True, 2, ras.shape[2])


def test_a_plain_2d_layer_is_one_slice_in_its_own_axis_order(liver_volume, tiny_checkpoint, tmp_path):
    from napari.components import ViewerModel

    viewer = ViewerModel()
    shown, _ = volume_to_layer(*stored(liver_volume[0], "ras"))
    scan = viewer.add_image(np.array(shown[3]), name="slice", scale=(0.7, 0.6))    # one axial image, no metadata
    controller = SegmentationController(viewer)
    assert segment(controller, scan, tiny_checkpoint, mode="current") == "done"
    consensus = layer(viewer, "consensus")
    assert consensus.data.shape == (64, 64) and consensus.data.any()
    assert layer(viewer, "steps").data.shape == (2, 45, 38)      # 64 pixels of 0.7 and 0.6 mm at 1 mm
    nifti, _ = controller.export(tmp_path / "slice_seg.nii.gz", overwrite=False)
    written = nib.load(nifti)
    np.testing.assert_array_equal(np.asarray(written.dataobj), consensus.data)
    assert written.header.get_zooms() == pytest.approx((0.7, 0.6))
    assert int(written.header["sform_code"]) == 0


def test_current_slice_of_a_sagittal_stack_is_the_slice_under_the_slider(liver_volume, tiny_checkpoint):
    viewer, scan, controller = make(liver_volume[0], "sagittal")
    viewer.dims.set_current_step(0, 4)             # the slider runs I → S: axial slice 4
    assert segment(controller, scan, tiny_checkpoint, mode="current") == "done"
    assert controller.current.runs[-1].slice_indices.tolist() == [4]
    consensus = layer(viewer, "consensus").data
    assert consensus[4].any() and not np.delete(consensus, 4, axis=0).any()


# ----------------------------------------------------------------------------- edits


def paint(layer_, slice_index, value, size=6):
    """A user's brush stroke on a slice (napari's own paint, as the mouse does it) that changes it."""
    before = layer_.data[slice_index].copy()
    layer_.brush_size = size
    layer_.paint((slice_index, 20, 20), value)
    assert not np.array_equal(layer_.data[slice_index], before), "the stroke painted what was there already"


def test_edits_are_tracked_and_each_choice_does_what_it_says(liver_volume, tiny_checkpoint):
    answers = Answers()
    viewer, scan, controller = make(liver_volume[0], questions=answers)
    assert segment(controller, scan, tiny_checkpoint, steps=3) == "done"
    consensus = layer(viewer, "consensus")
    edits = []
    controller.edits_changed.connect(edits.append)
    paint(consensus, 2, 1)
    assert edits[-1] == (2,) and controller.edited_slices() == [2]
    painted = consensus.data[2].copy()

    # Keep my edits: slice 2 stays as painted, the others are re-fused.
    controller.set_consensus("last", 0)
    assert answers.asked[-1] == ("Re-fusing with the last step consensus", [2])
    np.testing.assert_array_equal(consensus.data[2], painted)
    assert controller.current.runs[-1].sampling.consensus == "last"
    assert layer(viewer, "consensus") is consensus and controller.edited_slices() == [2]

    # New layer: the edited layer is set aside untouched, a new consensus shows the engine's result.
    answers.edit_answer = NEW_LAYER
    controller.set_consensus("mean", 1)
    aside = viewer.layers["liver consensus (your edits)"]
    assert aside is consensus and not _result_layers.is_own_result(aside)
    np.testing.assert_array_equal(aside.data[2], painted)
    fresh = layer(viewer, "consensus")
    assert fresh is not consensus and controller.edited_slices() == []
    reference = fresh.data.copy()

    # Replace: the edit is overwritten, and napari's undo brings it back.
    paint(fresh, 3, 1)
    edited = fresh.data[3].copy()
    answers.edit_answer = REPLACE
    controller.set_consensus("vote_gated", 1)
    assert controller.edited_slices() == []
    assert not np.array_equal(fresh.data[3], edited)
    fresh.undo()          # undoes the whole re-fusion (one undo step): the edit is back
    np.testing.assert_array_equal(fresh.data[3], edited)
    np.testing.assert_array_equal(np.delete(fresh.data, 3, axis=0), np.delete(reference, 3, axis=0))
    assert 3 in controller.edited_slices()
    assert len(answers.asked) == 3


def test_a_run_on_one_slice_updates_only_that_slice(liver_volume, tiny_checkpoint):
    answers = Answers()
    viewer, scan, controller = make(liver_volume[0], questions=answers)
    assert segment(controller, scan, tiny_checkpoint, steps=2) == "done"
    consensus = layer(viewer, "consensus")
    paint(consensus, 1, 1)
    before = consensus.data.copy()
    statuses = []
    controller.status.connect(statuses.append)

    # Another seed on slice 4 only: slice 4 changes, every other slice (the edit included) is untouched.
    controller.segment(SegmentSettings(scan, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2, seed=7),
                                       SliceChoice(mode="range", first=4, last=4)))
    assert answers.asked == []                     # slice 4 was not edited: nothing to ask
    assert layer(viewer, "consensus") is consensus
    np.testing.assert_array_equal(np.delete(consensus.data, 4, axis=0), np.delete(before, 4, axis=0))
    assert not np.array_equal(consensus.data[4], before[4])
    assert "Updated slice(s) 4 of the existing result layers; the other slices are untouched" in statuses[-1]

    # A run over the edited slice asks; "keep" leaves the edit and updates the rest.
    controller.segment(SegmentSettings(scan, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2, seed=9),
                                       SliceChoice(mode="range", first=0, last=2)))
    assert answers.asked == [("Segmenting slice(s) 0–2", [1])]
    np.testing.assert_array_equal(consensus.data[1], before[1])
    assert "Your edits on slice(s) 1 were kept" in statuses[-1]
    assert controller.current.shown_slices.tolist() == list(range(6))
    assert [run.shown_slices.tolist() for run in controller.current.runs] == [[3, 5], [4], [0, 1, 2]]

    # Re-fusing later re-fuses each slice from the run that produced it.
    controller.set_consensus("last", 0)
    assert [run.sampling.consensus for run in controller.current.runs] == ["last"] * 3


# ----------------------------------------------------------------------------- fine-tune and export


def test_segment_correct_finetune_resegment_export(liver_volume, tiny_checkpoint, tmp_path):
    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint) == "done"
    consensus = layer(viewer, "consensus")
    paint(consensus, 1, 1)
    paint(consensus, 2, 3, size=8)              # a label the model does not know: a new class
    assert controller.edited_slices() == [1, 2]
    assert controller.class_table() == [(0, "background"), (1, "liver"), (2, "tumour"), (3, "class_3")]
    before = consensus.data.copy()

    events = {"steps": [], "models": [], "finished": []}
    controller.finetune_step.connect(lambda *a: events["steps"].append(a))
    controller.model_added.connect(lambda *a: events["models"].append(a))
    controller.finetune_finished.connect(events["finished"].append)
    names = ("background", "liver", "tumour", "lesion")
    assert controller.finetune(FinetuneSettings(
        start=str(tiny_checkpoint), save_path=tmp_path / "liver_finetuned", class_names=names, steps=2, device="cpu",
        resegment=SegmentSettings(scan, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2))))
    assert [(s, t) for s, t, _ in events["steps"]] == [(1, 2), (2, 2)] and events["finished"] == ["done"]
    saved = tmp_path / "liver_finetuned.safetensors"
    assert events["models"] == [("liver_finetuned", str(saved))]
    from medconddiff.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(saved)
    assert checkpoint.config.model.class_names == names
    assert checkpoint.extra["finetuned_on"][0]["slices"] == [1, 2]

    # The other slices were re-segmented with the fine-tuned model; the corrected ones are untouched.
    runs = controller.current.runs
    assert runs[-1].slice_indices.tolist() == [0, 3, 4, 5]
    assert runs[-1].provenance["checkpoint"] == str(saved)
    np.testing.assert_array_equal(consensus.data[1:3], before[1:3])
    assert list(consensus.features["class"]) == list(names)

    nifti, sidecar = controller.export(tmp_path / "liver_seg.nii.gz", overwrite=False)
    record = json.loads(sidecar.read_text())
    assert record["edited_in_napari"] is True and record["edited_slices"] == [1, 2]
    assert record["class_names"] == list(names) and record["slices"] == list(range(6))
    assert [run["slices"] for run in record["runs"]] == [[1, 2], [0, 3, 4, 5]]
    assert record["class_volumes"]["lesion"]["voxels"] > 0
    assert (np.asarray(nib.load(nifti).dataobj) == 3).any()


def test_an_mri_is_flagged_for_a_ct_model_and_finetuned_with_its_own_intensity_scheme(liver_volume, tiny_checkpoint,
                                                                                         tmp_path):
    """An image with no voxel below 0 is no CT in HU: the status says so when the CT model runs on it,
    and fine-tuning with "Scan is: MRI" trains and records a z-scored MRI model, which runs unflagged."""
    ras = liver_volume[0]
    mri = (ras - ras.min()) / (ras.max() - ras.min())          # intensities in [0, 1], as many MRI files hold
    viewer, scan, controller = make(mri)
    messages = []
    controller.status.connect(messages.append)
    assert segment(controller, scan, tiny_checkpoint) == "done"
    started = [m for m in messages if m.startswith("Segmenting")][-1]
    assert "does not look like CT in Hounsfield units" in started and "Scan is" in started
    paint(layer(viewer, "consensus"), 1, 1)
    finished = []
    controller.finetune_finished.connect(finished.append)
    assert controller.finetune(FinetuneSettings(start=str(tiny_checkpoint), save_path=tmp_path / "mri",
                                                class_names=("background", "liver", "tumour"), scan_kind="MRI",
                                                steps=1, device="cpu"))
    assert finished == ["done"]
    from medconddiff.checkpoint import load_checkpoint

    plan = load_checkpoint(tmp_path / "mri.safetensors").config.plan
    assert plan.channel_names == ("MRI",) and plan.intensity == ("zscore",)
    messages.clear()
    assert segment(controller, scan, tmp_path / "mri.safetensors") == "done"
    assert not any("Hounsfield" in m for m in messages)


def test_cancelling_finetuning_keeps_the_weights_and_offers_to_save(liver_volume, tiny_checkpoint, tmp_path):
    answers = Answers(save=True)
    viewer, scan, controller = make(liver_volume[0], questions=answers)
    assert segment(controller, scan, tiny_checkpoint) == "done"
    paint(layer(viewer, "consensus"), 2, 1)
    controller.finetune_step.connect(lambda step, total, loss: step == 1 and controller.cancel())
    finished, models = [], []
    controller.finetune_finished.connect(finished.append)
    controller.model_added.connect(lambda name, path: models.append(path))
    controller.finetune(FinetuneSettings(start=str(tiny_checkpoint), save_path=tmp_path / "cut.safetensors",
                                         class_names=("background", "liver", "tumour"), steps=5, device="cpu",
                                         resegment=SegmentSettings(scan, str(tiny_checkpoint), "cpu")))
    assert answers.asked == [("save", [1, 5])] and finished == ["cancelled"]
    from medconddiff.checkpoint import load_checkpoint

    assert load_checkpoint(models[0]).extra["steps"] == 1
    assert len(controller.current.runs) == 1                 # a cancelled fine-tuning does not re-segment
    assert not controller.busy and segment(controller, scan, models[0], mode="range", first=0, last=0) == "done"


def test_finetuning_refuses_unnamed_labels_and_paths_inside_the_package(liver_volume, tiny_checkpoint, tmp_path):
    viewer, scan, controller = make(liver_volume[0])
    segment(controller, scan, tiny_checkpoint)
    paint(layer(viewer, "consensus"), 2, 5)
    messages = []
    controller.status.connect(messages.append)
    settings = FinetuneSettings(start=str(tiny_checkpoint), save_path=tmp_path / "x.safetensors",
                                class_names=("background", "liver", "tumour"), steps=1, device="cpu")
    assert not controller.finetune(settings)
    assert "label 5" in messages[-1] and "no class name" in messages[-1]
    import medconddiff

    inside = Path(medconddiff.__file__).parent / "models" / "mine.safetensors"
    names = ("background", "liver", "tumour", "a", "b", "c")
    assert not controller.finetune(FinetuneSettings(start=str(tiny_checkpoint), save_path=inside,
                                                    class_names=names, steps=1, device="cpu"))
    assert "inside the installed package" in messages[-1] and not inside.exists()


def test_default_paths_are_next_to_the_scan_or_in_the_home_never_in_the_package(tmp_path, monkeypatch):
    from medconddiff.nifti import sample_scan_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_export_path("liver", str(sample_scan_path())) == tmp_path / "home" / "liver117_image_seg.nii.gz"
    assert default_export_path("ct", str(tmp_path / "scans" / "ct.nii.gz")) == tmp_path / "scans" / "ct_seg.nii.gz"
    assert default_export_path("ct", None) == tmp_path / "home" / "ct_seg.nii.gz"
    # A DICOM series opened as its folder, one of its files or a CD's DICOMDIR: beside the folder.
    series = tmp_path / "cd" / "SERIES"
    series.mkdir(parents=True)
    (series / "IM0001").write_bytes(b"")
    (tmp_path / "cd" / "DICOMDIR").write_bytes(b"")
    source = DicomSource(series_uid="1.2.3", series_number=2, series_description="CT chest", modality="CT",
                         frame_of_reference_uid="", sop_instance_uids=("1.2.3.1",), files=(str(series / "IM0001"),),
                         frame_numbers=(None,))
    # Named by the series, never by the folder (exports are filed in folders named after the patient).
    expected = {series: tmp_path / "cd" / "series2_CT_chest_seg.dcm",
                series / "IM0001": tmp_path / "cd" / "series2_CT_chest_seg.dcm",
                tmp_path / "cd" / "DICOMDIR": tmp_path / "series2_CT_chest_seg.dcm"}
    assert {opened: default_export_path("x", str(opened), source) for opened in expected} == expected
    assert default_finetune_path("x", str(series), source) == tmp_path / "cd" / "series2_CT_chest_finetuned.safetensors"
    # One echo of a file that holds two (an enhanced multi-frame MRI): named by its echo, so the other
    # echo's export does not land on the same name.
    echo = dataclasses.replace(source, part="echo 2", frame_numbers=(2,))
    assert default_export_path("x", str(series / "IM0001"), echo) == \
        tmp_path / "cd" / "series2_CT_chest_echo_2_seg.dcm"
    assert default_finetune_path("liver", str(sample_scan_path())) == \
        tmp_path / "home" / ".medconddiff" / "models" / "liver117_image_finetuned.safetensors"
    assert default_finetune_path("ct", str(tmp_path / "ct.nii")) == tmp_path / "ct_finetuned.safetensors"
    assert checkpoint_target(tmp_path / "model") == tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="inside the installed package"):
        checkpoint_target(sample_scan_path().parent / "x.safetensors")


def test_slice_lists_read_and_write_the_way_users_type_them():
    assert parse_slice_list("10, 12, 20-24") == [10, 12, 20, 21, 22, 23, 24]
    assert parse_slice_list("3–4;1") == [1, 3, 4]
    with pytest.raises(ValueError, match="10, 12, 20-24"):
        parse_slice_list("ten")
    assert slice_list_text([9, 3, 4, 5]) == "3–5, 9"
    assert controller_module.CONSENSUS_NAMES["uncertainty_weighted"] == "uncertainty-weighted mean"



# ----------------------------------------------------------------------------- several channels


def channel_layer(viewer, ras, name, how="lps", shift_mm=0.0):
    """Another channel of the scan, as a layer read from its own file (``how``, 1 mm, origin moved by ``shift_mm``)."""
    data, meta = stored(ras, how)
    meta.affine[:3, 3] += shift_mm
    layer_data, kwargs = volume_to_layer(data, meta)
    return viewer.add_image(layer_data, name=name, **kwargs)


def test_a_two_channel_scan_is_segmented_and_finetuned_with_all_its_channels(liver_volume, two_channel_checkpoint,
                                                                             tmp_path, monkeypatch):
    """The scan layer is channel 0 (FLAIR), the further layer channel 1 (T1): the engine gets both,
    channels last in file order; results belong to the scan layer; fine-tuning trains on both."""
    ras = liver_volume[0]
    viewer, scan, controller = make(ras, "lps")
    negative = channel_layer(viewer, -ras, "negative")
    assert controller.model_channels(str(two_channel_checkpoint)) == ("FLAIR", "T1")
    settings = SegmentSettings(scan, str(two_channel_checkpoint), "cpu", SamplingConfig(steps=2), channels=(negative,))
    finished = []
    controller.run_finished.connect(finished.append)
    assert controller.segment(settings) and finished == ["done"]
    consensus = layer(viewer, "consensus")
    assert controller.current.scan is scan and _result_layers.marker(consensus)["scan"] == str(scan.unique_id)
    assert consensus.data.shape == scan.data.shape and np.allclose(consensus.scale, scan.scale)
    lps, meta = stored(ras, "lps")
    expected = Segmenter.from_checkpoint(two_channel_checkpoint, device="cpu").segment(
        np.stack([lps, -lps], axis=-1), SamplingConfig(steps=2, batch_size=4), meta=meta).labels
    np.testing.assert_array_equal(consensus.data, controller.current.space.layer.layer_view(expected))
    assert consensus.data.any()

    # A layer without NIfTI geometry drawn voxel for voxel over the scan (say, computed from it in napari)
    # holds the scan's voxels: the same result.
    plain = viewer.add_image(-np.asarray(scan.data), name="plain negative", scale=scan.scale)
    assert controller.segment(dataclasses.replace(settings, channels=(plain,))) and finished[-1] == "done"
    np.testing.assert_array_equal(consensus.data, controller.current.space.layer.layer_view(expected))

    # Fine-tuning trains on the image that was segmented: both channels.
    import medconddiff.finetune

    images = []
    original = medconddiff.finetune.finetune
    monkeypatch.setattr(medconddiff.finetune, "finetune",
                        lambda start, scans, **kw: images.append(scans[0].image) or original(start, scans, **kw))
    paint(consensus, 1, 1)
    outcome = []
    controller.finetune_finished.connect(outcome.append)
    names = ("background", "liver", "tumour")
    assert controller.finetune(FinetuneSettings(start=str(two_channel_checkpoint), save_path=tmp_path / "mri_finetuned",
                                                class_names=names, steps=2, device="cpu", resegment=settings))
    assert outcome == ["done"] and finished[-1] == "done"
    np.testing.assert_array_equal(images[0], np.stack([lps, -lps], axis=-1))
    from medconddiff.checkpoint import load_checkpoint

    saved = tmp_path / "mri_finetuned.safetensors"
    assert load_checkpoint(saved).config.plan.channel_names == ("FLAIR", "T1")
    assert controller.current.runs[-1].provenance["checkpoint"] == str(saved)   # re-segmented with both channels

    # A channel removed since the segmentation cannot be trained on: said, nothing starts.
    viewer.layers.remove(plain)
    viewer.layers.remove(negative)
    messages = []
    controller.status.connect(messages.append)
    assert not controller.finetune(FinetuneSettings(start=str(saved), save_path=tmp_path / "again", class_names=names,
                                                    steps=1, device="cpu"))
    assert "'negative', a channel of 'liver', was removed" in messages[-1]


def test_a_channel_count_or_grid_mismatch_is_one_clear_message_and_no_run(liver_volume, two_channel_checkpoint,
                                                                          tiny_checkpoint, monkeypatch):
    ras = liver_volume[0]
    viewer, scan, controller = make(ras, "lps")
    told, statuses, finished = [], [], []
    monkeypatch.setattr(_notifications, "notify", lambda kind, message: told.append((kind, message)))
    controller.status.connect(statuses.append)
    controller.run_finished.connect(finished.append)

    def attempt(checkpoint, *channels):
        told.clear()
        started = controller.segment(SegmentSettings(scan, str(checkpoint), "cpu", SamplingConfig(steps=2),
                                                     channels=channels))
        assert len(told) == 1 and told[0][0] == "error" and statuses[-1] == f"Failed: {told[0][1][13:]}"
        assert [x for x in viewer.layers if _result_layers.is_own_result(x)] == []
        return started, told[0][1]

    # Too few or too many channels: said before the model is even loaded.
    expected = "the model expects 2 channels (FLAIR, T1): pick 1 more layer under More channels"
    assert attempt(two_channel_checkpoint) == (False, f"MedCondDiff: {expected}")
    other = channel_layer(viewer, -ras, "negative")
    assert attempt(tiny_checkpoint, other) == (False, "MedCondDiff: this model takes one channel; untick More channels")
    assert "picked twice" in attempt(two_channel_checkpoint, scan)[1]
    assert controller.runs_started == 0 and finished == []
    # A checkpoint whose header cannot tell: the loaded model says the same.
    monkeypatch.setattr(controller, "model_channels", lambda checkpoint: None)
    assert attempt(two_channel_checkpoint) == (True, f"MedCondDiff: {expected}") and finished == ["failed"]

    # Channels off the scan's grid: another shape, another place, or a plain layer of another size.
    half = channel_layer(viewer, ras[:, :32].copy(), "half")
    assert "'half' has shape (6, 32, 64) but 'liver' has (6, 64, 64)" in attempt(two_channel_checkpoint, half)[1]
    moved = channel_layer(viewer, ras, "moved", shift_mm=5.0)
    assert "'moved' lies elsewhere than 'liver': their affines differ by up to 5 mm" in \
        attempt(two_channel_checkpoint, moved)[1]
    coarse = viewer.add_image(np.asarray(scan.data), name="coarse", scale=(2.0, 1.0, 1.0))
    assert "'coarse' (shape (6, 64, 64), voxel size 2 × 1 × 1 mm) is not drawn voxel for voxel over 'liver'" in \
        attempt(two_channel_checkpoint, coarse)[1]
    assert finished == ["failed"] * 4 and not controller.busy


# ----------------------------------------------------------------------------- issue 19: edits, undo, files, errors


def test_one_refusion_over_several_runs_is_one_undo_step(liver_volume, tiny_checkpoint):
    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint, steps=3) == "done"
    controller.segment(SegmentSettings(scan, str(tiny_checkpoint), "cpu", SamplingConfig(steps=3, seed=7),
                                       SliceChoice(mode="range", first=3, last=5)))
    consensus = layer(viewer, "consensus")
    assert [run.shown_slices.tolist() for run in controller.current.runs] == [[0, 1, 2], [3, 4, 5]]
    before = consensus.data.copy()
    controller.set_consensus("last", 0)
    after = consensus.data.copy()
    changed = {s for s in range(6) if not np.array_equal(after[s], before[s])}
    assert changed & {0, 1, 2} and changed & {3, 4, 5}, "the re-fusion must change both runs' slices"
    consensus.undo()                       # one Ctrl-Z undoes the whole re-fusion
    np.testing.assert_array_equal(consensus.data, before)
    consensus.redo()
    np.testing.assert_array_equal(consensus.data, after)


def test_a_run_over_existing_layers_is_one_undo_step(liver_volume, tiny_checkpoint):
    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint, steps=2) == "done"
    consensus = layer(viewer, "consensus")
    before = consensus.data.copy()
    batches = []
    controller.progress.connect(lambda done, total: done and batches.append(done))
    controller.segment(SegmentSettings(scan, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2, seed=7)))
    assert len(batches) >= 2, "the run must stream its slices in several batches"
    changed = {s for s in range(6) if not np.array_equal(consensus.data[s], before[s])}
    assert changed & set(range(batches[0])) and changed - set(range(batches[0]))
    consensus.undo()
    np.testing.assert_array_equal(consensus.data, before)


def test_replace_overwrites_only_the_edits_it_was_asked_about(liver_volume, tiny_checkpoint):
    """Strokes painted while a run streams its slices are kept, even after "replace"."""
    answers = Answers(edits=REPLACE)
    viewer, scan, controller = make(liver_volume[0], questions=answers)
    assert segment(controller, scan, tiny_checkpoint, steps=2) == "done"
    consensus = layer(viewer, "consensus")
    paint(consensus, 1, (int(consensus.data[1, 20, 20]) + 1) % 3)       # an edit made before the question
    during = {}

    def paint_while_running(done, total):
        if 0 < done < total and not during:                    # slice 5 is not written yet
            paint(consensus, 5, (int(consensus.data[5, 20, 20]) + 1) % 3)
            during[5] = consensus.data[5].copy()

    controller.progress.connect(paint_while_running)
    statuses = []
    controller.status.connect(statuses.append)
    controller.segment(SegmentSettings(scan, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2, seed=7)))
    assert answers.asked == [("Segmenting slice(s) 0–5", [1])] and during
    np.testing.assert_array_equal(consensus.data[5], during[5])
    np.testing.assert_array_equal(consensus.data[1], controller.current.reference[1])   # replaced, as answered
    assert "Your edits on slice(s) 5 were kept" in statuses[-1]


def test_a_finetuned_model_never_replaces_a_file_without_a_yes_nor_its_start(liver_volume, tiny_checkpoint, tmp_path):
    import shutil

    viewer, scan, controller = make(liver_volume[0], questions=Questions())    # nobody answers: the defaults
    assert segment(controller, scan, tiny_checkpoint) == "done"
    paint(layer(viewer, "consensus"), 2, 1)
    names = ("background", "liver", "tumour")
    cancel_at_first_step = lambda step, total, loss: step == 1 and controller.cancel()     # noqa: E731
    controller.finetune_step.connect(cancel_at_first_step)
    models, messages = [], []
    controller.model_added.connect(lambda name, path: models.append(path))
    controller.status.connect(messages.append)
    unasked = tmp_path / "cut.safetensors"
    controller.finetune(FinetuneSettings(start=str(tiny_checkpoint), save_path=unasked, class_names=names, steps=5,
                                         device="cpu"))
    assert models == [] and not unasked.exists()              # no answer, no file
    controller.finetune_step.disconnect(cancel_at_first_step)

    controller.questions = Answers(save=True)
    start = tmp_path / "start.safetensors"
    shutil.copy(tiny_checkpoint, start)
    original = start.read_bytes()
    assert not controller.finetune(FinetuneSettings(start=str(start), save_path=start, class_names=names, steps=1,
                                                    device="cpu", replace_existing=True))
    assert "is the checkpoint being fine-tuned" in messages[-1] and start.read_bytes() == original

    existing = tmp_path / "mine.safetensors"
    existing.write_bytes(b"the user's own file")
    assert not controller.finetune(FinetuneSettings(start=str(tiny_checkpoint), save_path=existing,
                                                    class_names=names, steps=1, device="cpu"))
    assert "exists" in messages[-1] and existing.read_bytes() == b"the user's own file" and models == []
    assert controller.finetune(FinetuneSettings(start=str(tiny_checkpoint), save_path=existing, class_names=names,
                                                steps=1, device="cpu", replace_existing=True))
    assert models == [str(existing)] and existing.read_bytes() != b"the user's own file"


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(liver_volume, tiny_checkpoint, monkeypatch):
    from napari.utils.notifications import ErrorNotification, notification_manager

    from medconddiff.errors import UserInputError
    from napari_medconddiff import _segment_flow

    viewer, scan, controller = make(liver_volume[0])
    bug = ValueError("operands could not be broadcast together with shapes (3,) (4,)")

    def broken(request, cache):
        raise bug

    monkeypatch.setattr(_segment_flow, "prepare_run", broken)
    start = len(notification_manager.records)
    assert segment(controller, scan, tiny_checkpoint) == "failed"
    (shown,) = notification_manager.records[start:]
    assert isinstance(shown, ErrorNotification) and shown.exception is bug
    assert bug.__traceback__ is not None          # what the details button shows

    def mistake(request, cache):
        raise UserInputError("the scan has no voxels")

    monkeypatch.setattr(_segment_flow, "prepare_run", mistake)
    start = len(notification_manager.records)
    assert segment(controller, scan, tiny_checkpoint) == "failed"
    (shown,) = notification_manager.records[start:]
    assert not isinstance(shown, ErrorNotification) and str(shown.message) == "MedCondDiff: the scan has no voxels"


def test_runs_and_finetuning_work_on_copies_that_are_freed(liver_volume, tiny_checkpoint, tmp_path, monkeypatch):
    """The worker never reads a layer's live buffer (a float32 scan, no further channels, reached the
    engine uncopied), and the run's copy is freed when the run ends."""
    import gc
    import weakref

    from napari_medconddiff import _finetune_flow, _segment_flow

    viewer, scan, controller = make(liver_volume[0])
    assert scan.data.dtype == np.float32
    given = {}
    prepare_run, prepare_finetune = _segment_flow.prepare_run, _finetune_flow.prepare_finetune

    def spy_run(request, cache):
        given["shared"] = np.shares_memory(request.data, scan.data)
        given["copy"] = weakref.ref(request.data)
        return prepare_run(request, cache)

    def spy_finetune(job, log):
        given["finetune_shared"] = np.shares_memory(job.image, scan.data)
        return prepare_finetune(job, log)

    monkeypatch.setattr(_segment_flow, "prepare_run", spy_run)
    monkeypatch.setattr(_finetune_flow, "prepare_finetune", spy_finetune)
    assert segment(controller, scan, tiny_checkpoint) == "done"
    gc.collect()
    assert given["shared"] is False and given["copy"]() is None
    paint(layer(viewer, "consensus"), 2, 1)
    assert controller.finetune(FinetuneSettings(start=str(tiny_checkpoint), save_path=tmp_path / "ft",
                                                class_names=("background", "liver", "tumour"), steps=1, device="cpu"))
    assert given["finetune_shared"] is False


def test_auto_steps_count_the_scan_once_when_the_training_set_holds_it_too(liver_volume, tiny_checkpoint, tmp_path):
    """Steps 'auto' trains 200 steps for one scan and 600 for more: the scan in the viewer is one scan whether its
    slices come from the layers, from the training set, or both, and whatever name the set holds it under;
    another case of the set is a second."""
    from medconddiff.training_set import TrainingSet
    from napari_medconddiff._job import FinetuneJob, prepare_finetune
    from tests.conftest import meta_1mm

    image, labels = liver_volume
    names = ("background", "liver", "tumour")
    training_set = TrainingSet.create(tmp_path / "set", names)
    training_set.add_scan("liver", image, meta_1mm(), labels, names, verified_slices=[1])

    def steps(case_name: str, slices=(1, 2)) -> int:
        job = FinetuneJob(start=str(tiny_checkpoint), name="liver", image=image, meta=meta_1mm(), labels=labels,
                          slices=slices, class_names=names, steps=None, seed=0, device="cpu",
                          training_set=tmp_path / "set", case_name=case_name)
        return prepare_finetune(job, log=lambda message: None).total_steps

    assert steps("liver") == 200                  # this scan, in the set and on screen: one scan
    assert steps("liver", slices=(1,)) == 200     # all its slices already in the set
    assert steps("renamed layer") == 200          # the set holds these voxels as 'liver': still one scan
    training_set.add_scan("other scan", image + 1, meta_1mm(), labels, names, verified_slices=[3])
    assert steps("liver") == 600                  # another scan in the set: two


def test_a_scan_stored_lps_goes_into_the_training_set_in_its_own_file_order(liver_volume, tiny_checkpoint, tmp_path):
    from medconddiff.training_set import TrainingSet

    viewer, scan, controller = make(liver_volume[0], "lps")
    segment(controller, scan, tiny_checkpoint)
    consensus = layer(viewer, "consensus")
    paint(consensus, 1, 2)
    controller.go_to_slice(4)
    assert controller.mark_checked() == 4
    assert controller.choose_training_set(tmp_path / "set", str(tiny_checkpoint))
    assert controller.add_to_training_set(("background", "liver", "tumour"), str(tiny_checkpoint))
    results = controller.current
    edited = results.edited_slices()
    training_set = TrainingSet.open(tmp_path / "set")
    assert training_set.cases == ["liver"] and training_set.verified_slices("liver") == sorted({*edited, 4})
    case = training_set.load_case("liver")
    image, meta = stored(liver_volume[0], "lps")
    np.testing.assert_array_equal(case.image[..., 0], image)                     # file order, as stored
    np.testing.assert_allclose(case.meta.affine, meta.affine)
    shown = results.space.layer.file_view(np.asarray(consensus.data))
    verified = np.zeros(shown.shape, bool)
    results.space.geometry.slice_view(verified)[sorted({*edited, 4})] = True
    np.testing.assert_array_equal(case.labels[verified], shown[verified])
    assert (case.labels[~verified] == 255).all()                               # the rest is ignore
    # A folder inside the package is refused before anything is written; the set in use stays.
    import medconddiff

    inside = Path(medconddiff.__file__).parent / "my_set"
    assert not controller.choose_training_set(inside) and not inside.exists()
    assert controller.training_set_folder == (tmp_path / "set").resolve()


# ----------------------------------------------------------------------------- saved labels


def test_a_structure_sets_body_outline_is_left_out_of_the_consensus_unless_the_user_takes_it(liver_volume,
                                                                                            tiny_checkpoint):
    """A planning system's RT structure set opened over its scan holds an External on every slice: taken, every
    slice would count as corrected and the outline would be learned as a class. Asked; the default leaves it out."""
    ras, ras_labels = liver_volume
    planning = np.where(ras > -500, 1, 0).astype(np.uint8)            # the body outline, on every slice
    planning[..., [1, 3]] = np.where(ras_labels[..., [1, 3]] == 2, 2, planning[..., [1, 3]])   # the GTV on 1 and 3
    assert all(planning[..., k].any() for k in range(planning.shape[2]))
    data, kwargs = volume_to_layer(*stored(planning, "lps"))
    features = {"index": [0, 1, 2], "class": ["background", "External", "GTV"]}

    class Asked(Answers):
        def __init__(self, answer):
            super().__init__()
            self.answer, self.outlines = answer, []

        def classes_to_leave_out(self, saved_name, class_names, outlines):
            self.outlines.append((saved_name, class_names, outlines))
            return self.answer

    def continued(questions):
        viewer, scan, controller = make(ras, "lps", questions=questions)
        saved = viewer.add_labels(data, name="RS planning", features=features, **kwargs)
        said = []
        controller.status.connect(said.append)
        assert controller.continue_from(SegmentSettings(scan, str(tiny_checkpoint), "cpu"), saved)
        return viewer, controller, said

    viewer, controller, said = continued(Answers())                     # the default: outline left out
    assert controller.current.class_names == ("background", "GTV") and controller.edited_slices() == [1, 3]
    consensus = controller.current.space.slices(layer(viewer, "consensus").data)
    gtv = controller.current.space.slices(np.asarray(viewer.layers["RS planning"].data) == 2)
    np.testing.assert_array_equal(consensus == 1, gtv)
    assert "Left out (background here): External." in said[-1]
    asked = Asked(())                                                   # the user ticked the outline: taken
    viewer, controller, said = continued(asked)
    assert asked.outlines == [("RS planning", ("background", "External", "GTV"), (1,))]
    assert controller.current.class_names == ("background", "External", "GTV")
    assert controller.edited_slices() == list(range(planning.shape[2]))
    viewer, controller, said = continued(Asked(None))                    # Cancel: nothing loaded
    assert controller.current is None and "consensus" not in [lyr.name.split()[-1] for lyr in viewer.layers]
    assert said[-1] == "Nothing was loaded from 'RS planning'."

    # A structure set without an outline is asked about too when it holds several structures (read by the
    # plugin's reader, which marks it); a SEG's classes are not: they are someone's corrections.
    organs = np.where(ras_labels > 0, ras_labels, 0).astype(np.uint8)
    organs_data, _ = volume_to_layer(*stored(organs, "lps"))
    for labels_from, asked_expected in (("RTSTRUCT", [("RS organs", ("background", "Heart", "GTV"), ())]),
                                        ("SEG", [])):
        viewer, scan, controller = make(ras, "lps", questions=(asked := Asked(())))
        metadata = {**kwargs.get("metadata", {}), "medconddiff": {**kwargs.get("metadata", {}).get("medconddiff", {}),
                                                                  "labels_from": labels_from}}
        saved = viewer.add_labels(organs_data, name="RS organs", features={"index": [0, 1, 2],
                                  "class": ["background", "Heart", "GTV"]}, **{**kwargs, "metadata": metadata})
        assert controller.continue_from(SegmentSettings(scan, str(tiny_checkpoint), "cpu"), saved)
        assert asked.outlines == asked_expected, labels_from
        assert controller.current.class_names == ("background", "Heart", "GTV")


def test_saved_labels_become_the_consensus_as_edits_that_later_runs_keep(liver_volume, tiny_checkpoint, tmp_path,
                                                                        monkeypatch):
    """Yesterday's labels (a SEG or a mask opened over the scan, LPS as DICOM stores it) continue as today's
    consensus: the slices they label are edits (verified), Segment keeps them, Export writes them, the saved
    layer is untouched, Ctrl+Z undoes the load; labels on another grid are refused."""
    ras, ras_labels = liver_volume
    checked = ras_labels.copy()
    checked[..., [0, 2, 4, 5]] = 0                       # corrected and saved: axial slices 1 and 3
    viewer, scan, controller = make(ras, "lps", questions=Answers(edits=KEEP))
    data, kwargs = volume_to_layer(*stored(checked, "lps"))
    saved = viewer.add_labels(data, name="liver SEG", **kwargs)
    before = np.array(saved.data, copy=True)
    settings = SegmentSettings(scan, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2))

    said = []
    controller.status.connect(said.append)
    assert controller.continue_from(settings, saved)
    consensus = layer(viewer, "consensus")
    np.testing.assert_array_equal(consensus.data, saved.data)
    assert controller.edited_slices() == [1, 3]
    assert "their slice(s) 1, 3 are in the consensus now" in said[-1] and "(edited: 1, 3)" in said[-1]
    nifti, sidecar = controller.export(tmp_path / "continued.nii.gz", overwrite=False)
    np.testing.assert_array_equal(np.asarray(nib.load(nifti).dataobj), stored(checked, "lps")[0])
    assert json.loads(Path(sidecar).read_text())["edited_slices"] == [1, 3]

    assert segment(controller, scan, tiny_checkpoint) == "done"        # every slice; the edits asked about, kept
    assert controller.questions.asked and controller.questions.asked[0][1] == [1, 3]
    space = controller.current.space
    shown, expected = space.slices(consensus.data), space.slices(saved.data)
    np.testing.assert_array_equal(shown[[1, 3]], expected[[1, 3]])
    np.testing.assert_array_equal(saved.data, before)

    # Undo (the segmentation, then the load) goes back to nothing.
    consensus.undo()
    consensus.undo()
    assert not np.asarray(consensus.data).any()

    # Over a segmented scan, only the slices the saved labels label are taken: the others keep the model's
    # result and stay unedited (an export holds every slice; an empty one says nothing about a check).
    # Today's edit on a slice the saved labels also label is the user's to keep or replace: asked, kept here.
    viewer2, scan2, controller2 = make(ras, "lps", questions=Answers(edits=KEEP))
    assert segment(controller2, scan2, tiny_checkpoint) == "done"
    consensus2 = layer(viewer2, "consensus")
    model_result = np.array(consensus2.data, copy=True)
    space2 = controller2.current.space
    edited_today = int(space2.slice_of_layer_index(1))                 # where the stroke below lands
    assert edited_today in (1, 3)
    paint(consensus2, 1, 2, size=8)
    assert controller2.edited_slices() == [edited_today]
    painted = np.array(space2.slices(consensus2.data)[edited_today], copy=True)
    saved2 = viewer2.add_labels(data, name="liver SEG", **kwargs)
    assert controller2.continue_from(SegmentSettings(scan2, str(tiny_checkpoint), "cpu"), saved2)
    assert controller2.questions.asked[-1] == ("Continuing from 'liver SEG'", [edited_today])
    shown2 = space2.slices(consensus2.data)
    other = 4 - edited_today                                            # the other saved slice: taken
    np.testing.assert_array_equal(shown2[edited_today], painted)
    np.testing.assert_array_equal(shown2[other], space2.slices(saved2.data)[other])
    assert space2.slices(model_result)[[0, 2, 4, 5]].any()            # the model labelled something there
    np.testing.assert_array_equal(shown2[[0, 2, 4, 5]], space2.slices(model_result)[[0, 2, 4, 5]])
    assert set(controller2.edited_slices()) <= {1, 3}

    # Answered "new layer": today's edited consensus is put aside under its own name; the saved labels go
    # into a new one.
    viewer4, scan4, controller4 = make(ras, "lps", questions=Answers(edits=NEW_LAYER))
    assert segment(controller4, scan4, tiny_checkpoint) == "done"
    paint(layer(viewer4, "consensus"), 1, 2, size=8)
    today = np.array(layer(viewer4, "consensus").data, copy=True)
    saved4 = viewer4.add_labels(data, name="liver SEG", **kwargs)
    assert controller4.continue_from(SegmentSettings(scan4, str(tiny_checkpoint), "cpu"), saved4)
    np.testing.assert_array_equal(viewer4.layers["liver consensus (your edits)"].data, today)
    space4 = controller4.current.space
    np.testing.assert_array_equal(space4.slices(layer(viewer4, "consensus").data)[[1, 3]],
                                  space4.slices(saved4.data)[[1, 3]])

    # Fine-tuning learns the continued slices and re-segments the others, the continued ones untouched.
    edited2, before2 = controller2.edited_slices(), np.array(consensus2.data, copy=True)
    finished = []
    controller2.finetune_finished.connect(finished.append)
    assert controller2.finetune(FinetuneSettings(
        start=str(tiny_checkpoint), save_path=tmp_path / "continued_finetuned",
        class_names=("background", "liver", "tumour"), steps=2, device="cpu",
        resegment=SegmentSettings(scan2, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2))))
    assert finished == ["done"]
    from medconddiff.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "continued_finetuned.safetensors").extra["finetuned_on"][0]["slices"] == edited2
    np.testing.assert_array_equal(space2.slices(consensus2.data)[edited2], space2.slices(before2)[edited2])

    errors = []
    monkeypatch.setattr(controller_module, "report_error", lambda error: errors.append(str(error)))
    other = viewer.add_labels(np.zeros((3, 8, 8), np.uint8), name="other scan's labels")
    assert not controller.continue_from(settings, other)
    assert "does not lie on the voxels of 'liver'" in errors[-1]
    assert not controller.continue_from(settings, consensus)
    assert "already this plugin's consensus" in errors[-1]
    empty = viewer.add_labels(np.zeros_like(saved.data), name="empty", **kwargs)
    assert not controller.continue_from(settings, empty)
    assert "holds no label" in errors[-1]

    # Saved labels that name their classes otherwise than the model: taken with their names, and the user told
    # that segmenting with the model before fine-tuning would rename them.
    viewer3, scan3, controller3 = make(ras, "lps")
    lesion = (np.asarray(saved.data) == 2).astype(np.uint8)
    saved3 = viewer3.add_labels(lesion, name="lesion mask",
                                features={"index": [0, 1], "class": ["background", "lesion"]}, **kwargs)
    said3 = []
    controller3.status.connect(said3.append)
    assert controller3.continue_from(SegmentSettings(scan3, str(tiny_checkpoint), "cpu"), saved3)
    assert controller3.current.class_names == ("background", "lesion")
    assert "Their classes (lesion) are not the model's (liver, tumour)" in said3[-1]
