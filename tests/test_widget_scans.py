"""Several scans in one dock: what the Image picker says is the scan every button acts on, and nothing of one
scan (its run, its consensus, its class names, what it is, its slices) reaches another.

Runs under pytest-xvfb with the tiny model and 64×64×6 cuts of the real liver CT (see test_widget.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from medconddiff.config import SamplingConfig
from napari_medconddiff._controller import SegmentSettings
from napari_medconddiff._layers import volume_to_layer
from napari_medconddiff._model_picker import CHECKPOINT_FILE
from tests.conftest import meta_1mm
from tests.test_widget import (  # noqa: F401 (fixtures used by name)
    PLUGIN,
    RUN_TIMEOUT_MS,
    WIDGET_NAME,
    _no_unexpected_question,
    _no_worker_left_running,
    choose,
    click,
    click_segment,
    held_until,
    paint,
    scan_1mm,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scan_b(liver_volume):
    """Another scan of the same shape and geometry as ``scan_1mm`` (its slices in reverse)."""
    return volume_to_layer(np.ascontiguousarray(liver_volume[0][::-1]), meta_1mm())


def open_scans(make_napari_viewer, qtbot, *scans, names=("A", "B")):
    """A viewer with the scans opened as ``names`` and the dock; (viewer, widget, layers...)."""
    viewer = make_napari_viewer()
    layers = [viewer.add_image(np.array(data), name=name, **kwargs) for (data, kwargs), name in zip(scans, names)]
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    qtbot.waitUntil(lambda: widget.controller.engine is not None, timeout=RUN_TIMEOUT_MS)
    return (viewer, widget, *layers)


def pick(widget, layer):
    widget.layer_combo.value = layer


# ----------------------------------------------------------------------------- a run of a scan not picked


def test_a_run_of_a_scan_no_longer_picked_leaves_the_dock_on_the_picked_one(make_napari_viewer, qtbot, scan_1mm,
                                                                           scan_b, tiny_checkpoint, monkeypatch):
    """Segment A, pick B while A's model loads: A's diffusion made A current again, so Export, Mark, Add and
    Fine-tune acted on A while the Image picker read B."""
    from napari_medconddiff import _segment_flow

    viewer, widget, layer_a, layer_b = open_scans(make_napari_viewer, qtbot, scan_1mm, scan_b)
    choose(widget, tiny_checkpoint, steps=2)
    pick(widget, layer_b)
    assert click_segment(qtbot, widget) == "done"
    pick(widget, layer_a)
    go = held_until(monkeypatch, _segment_flow, "prepare_run")
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.segment_button)
        pick(widget, layer_b)              # the user looks at B while A's model loads
        go.set()
    assert finished.args[0] == "done"
    assert widget.controller.current.scan_name == "B"
    assert widget.controller.export_default_path().name == "B_seg.nii.gz"
    a_results = widget.controller.results[str(layer_a.unique_id)]
    assert len(a_results.shown_slices) == 6 and a_results.consensus is viewer.layers["A consensus"]
    pick(widget, layer_a)                  # A's results wait for it
    assert widget.controller.current is a_results


def test_a_run_of_a_scan_not_picked_leaves_a_scan_without_results_without_any(make_napari_viewer, qtbot, scan_1mm,
                                                                              scan_b, tiny_checkpoint, monkeypatch):
    from napari_medconddiff import _segment_flow

    viewer, widget, layer_a, layer_b = open_scans(make_napari_viewer, qtbot, scan_1mm, scan_b)
    choose(widget, tiny_checkpoint, steps=2)
    pick(widget, layer_a)
    go = held_until(monkeypatch, _segment_flow, "prepare_run")
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS):
        click(qtbot, widget.segment_button)
        pick(widget, layer_b)
        go.set()
    assert widget.controller.current is None and not widget.export_button.isEnabled()
    assert widget.class_table.rowCount() == 0


# ----------------------------------------------------------------------------- saved labels of another scan


def test_another_open_scans_consensus_is_no_saved_labels_of_this_one(make_napari_viewer, qtbot, scan_1mm, scan_b,
                                                                     tiny_checkpoint):
    """B (same shape as A, not segmented) offered A's live consensus under Saved labels; Continue made A's labels
    B's verified edits. A consensus left by a scan that was removed and opened again is still offered."""
    viewer, widget, layer_a, layer_b = open_scans(make_napari_viewer, qtbot, scan_1mm, scan_b)
    choose(widget, tiny_checkpoint, steps=2)
    pick(widget, layer_a)
    assert click_segment(qtbot, widget) == "done"
    consensus_a = viewer.layers["A consensus"]
    paint(consensus_a, 1, 2, size=14)
    pick(widget, layer_b)
    assert widget.saved_labels._layers == [] and widget.saved_labels.container.isHidden()
    settings = SegmentSettings(layer_b, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2))
    assert not widget.controller.continue_from(settings, consensus_a)
    assert widget.status.text() == ("Not loaded: 'A consensus' is this plugin's result of 'A', another open scan; "
                                    "pick 'A' under Image to edit it")
    assert str(layer_b.unique_id) not in widget.controller.results
    data, kwargs = np.asarray(layer_a.data).copy(), {"scale": layer_a.scale, "translate": layer_a.translate}
    viewer.layers.remove(layer_a)
    again = viewer.add_image(data, name="A again", **kwargs)
    pick(widget, again)
    assert [layer.name for layer in widget.saved_labels._layers] == ["A consensus"]


# ----------------------------------------------------------------------------- class names and "Scan is" per scan


def test_a_class_named_on_one_scan_keeps_its_name_after_looking_at_another(make_napari_viewer, qtbot, scan_1mm,
                                                                          scan_b, tiny_checkpoint):
    """A name typed for A's painted value 3 was cleared when B was picked: Add then stored A's lesion as
    'class_3', a class apart from B's 'lesion'."""
    viewer, widget, layer_a, layer_b = open_scans(make_napari_viewer, qtbot, scan_1mm, scan_b)
    choose(widget, tiny_checkpoint, steps=2)
    pick(widget, layer_a)
    assert click_segment(qtbot, widget) == "done"
    paint(viewer.layers["A consensus"], 2, 3, size=10)
    qtbot.waitUntil(lambda: widget.class_table.rowCount() == 4, timeout=5000)
    widget.class_table.item(3, 1).setText("lesion")
    pick(widget, layer_b)
    qtbot.waitUntil(lambda: widget.class_table.rowCount() == 0, timeout=5000)
    pick(widget, layer_a)
    qtbot.waitUntil(lambda: widget.class_table.rowCount() == 4, timeout=5000)
    assert widget.class_names() == ("background", "liver", "tumour", "lesion")


def test_scan_is_follows_the_scan_it_was_chosen_for(make_napari_viewer, qtbot, scan_1mm, liver_volume):
    """'Scan is: MRI' chosen for the MRI stuck to the CT picked next: the CT joined a set as an MRI."""
    mri = volume_to_layer(np.ascontiguousarray(liver_volume[0]).astype(np.float32) + 1024.0, meta_1mm())
    viewer, widget, ct, mr = open_scans(make_napari_viewer, qtbot, scan_1mm, mri, names=("CT", "MRI"))
    kinds = widget.ft_kind_combo
    pick(widget, mr)
    assert kinds.currentData() == "MRI"                       # suggested: no voxel below 0
    kinds.setCurrentIndex(kinds.findData("other"))
    kinds.activated.emit(kinds.currentIndex())                # the user's own choice for the MRI
    pick(widget, ct)
    assert kinds.currentData() == "model"                     # the CT's own suggestion
    pick(widget, mr)
    assert kinds.currentData() == "other"                     # the MRI's choice stays with it
    kinds.setCurrentIndex(kinds.findData("CT"))
    kinds.activated.emit(kinds.currentIndex())
    pick(widget, ct)
    pick(widget, mr)
    assert kinds.currentData() == "CT"


# ----------------------------------------------------------------------------- the slider beyond a scan's slices


def test_beyond_the_picked_scans_slices_the_current_slice_is_refused_not_clipped(make_napari_viewer, qtbot,
                                                                                 scan_1mm, liver_volume,
                                                                                 tiny_checkpoint):
    """A 6-slice CT and a 3-slice MRI: with the slider on CT slice 5, napari shows no MRI slice, yet Mark and
    Segment's current slice acted on MRI slice 2 (the point clipped to its last slice)."""
    mri = volume_to_layer(np.ascontiguousarray(liver_volume[0][:, :, :3]).astype(np.float32) + 1024.0, meta_1mm())
    viewer, widget, ct, mr = open_scans(make_napari_viewer, qtbot, scan_1mm, mri, names=("CT", "MRI"))
    choose(widget, tiny_checkpoint, steps=2)
    pick(widget, mr)
    assert click_segment(qtbot, widget) == "done"
    runs = widget.runs_started
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("current"))
    axis = viewer.dims.ndim - 3
    refusal = "the slider is outside the slices of 'MRI'; move it onto one of them to act on the current slice"
    viewer.dims.set_point(axis, 5.0)                           # CT slice 5; the MRI has slices 0..2
    click(qtbot, widget.training_set_panel.mark_button)
    assert widget.status.text() == f"Failed: {refusal}"
    click(qtbot, widget.segment_button)
    assert widget.status.text() == f"Failed: {refusal}"
    assert widget.controller.checked_slices() == [] and widget.runs_started == runs    # nothing marked or segmented
    viewer.dims.set_point(axis, 2.0)                           # the MRI's last slice, shown
    click(qtbot, widget.training_set_panel.mark_button)
    assert widget.controller.checked_slices() == [2]


# ----------------------------------------------------------------------------- a dock closed and opened again


def test_a_consensus_left_by_a_closed_dock_can_be_continued_from_in_the_new_one(make_napari_viewer, qtbot,
                                                                                scan_1mm, tiny_checkpoint):
    """Close the dock after correcting A, open it again: the new dock did not track 'A consensus', left it out of
    Saved labels and refused Continue as 'already this plugin's consensus': the edits were stranded."""
    viewer, widget, layer_a = open_scans(make_napari_viewer, qtbot, scan_1mm, names=("A",))
    choose(widget, tiny_checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    consensus = viewer.layers["A consensus"]
    paint(consensus, 1, 2, size=14)
    painted = consensus.data[1].copy()
    widget.parent().title.close_button.click()
    qtbot.wait(50)
    _, again = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    qtbot.waitUntil(lambda: again.controller.engine is not None, timeout=RUN_TIMEOUT_MS)
    choose(again, tiny_checkpoint, steps=2)
    pick(again, layer_a)
    assert again.saved_labels._layers == [consensus]
    with qtbot.waitSignal(again.controller.busy_changed, check_params_cb=lambda op: op == "", timeout=RUN_TIMEOUT_MS):
        click(qtbot, again.saved_labels.button)
    assert again.status.text().startswith("Continuing from the saved labels: their slice(s) ")
    assert 1 in again.controller.edited_slices()
    np.testing.assert_array_equal(again.controller.current.consensus.data[1], painted)


# ----------------------------------------------------------------------------- what the model line names


def test_a_fine_tuned_model_is_named_by_its_file_not_the_patients_folder(make_napari_viewer, qtbot, tmp_path):
    """A model fine-tuned next to a scan filed under the patient's name: the model line and the menu's tooltip
    showed its whole path, the patient's folder included."""
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    qtbot.waitUntil(lambda: widget.controller.engine is not None, timeout=RUN_TIMEOUT_MS)
    path = tmp_path / "DOE^JOHN 1957-03-02" / "ct_finetuned.safetensors"
    widget.controller.model_added.emit("ct_finetuned", str(path))
    combo = widget.model_combo
    assert widget.model_status.text().startswith("Fine-tuned model: ct_finetuned.safetensors")
    assert combo.itemData(combo.currentIndex(), Qt.ItemDataRole.ToolTipRole) == "Fine-tuned here: " \
                                                                                "ct_finetuned.safetensors"
    path.parent.mkdir()
    widget.model_combo.setCurrentText(CHECKPOINT_FILE)
    widget.checkpoint_edit.setText(str(path))             # not there (yet)
    click(qtbot, widget.segment_button)
    assert widget.status.text() == "Failed: checkpoint not found: ct_finetuned.safetensors"


# ----------------------------------------------------------------------------- the Consensus box follows the scan


def test_the_consensus_box_shows_the_picked_scans_fusion(make_napari_viewer, qtbot, scan_1mm, scan_b,
                                                         tiny_checkpoint):
    """'Last step' chosen for A stayed in the box when B (fused by the mean) was picked; B's next skip change
    re-fused B with A's choice."""
    from tests.test_widget import choose_consensus

    viewer, widget, layer_a, layer_b = open_scans(make_napari_viewer, qtbot, scan_1mm, scan_b)
    choose(widget, tiny_checkpoint, steps=3)
    widget.consensus_combo.setCurrentIndex(widget.consensus_combo.findData("mean"))
    pick(widget, layer_b)
    assert click_segment(qtbot, widget) == "done"
    pick(widget, layer_a)
    assert click_segment(qtbot, widget) == "done"
    choose_consensus(qtbot, widget, "last")
    runs = widget.runs_started
    pick(widget, layer_b)
    assert widget.sampling_form.consensus() == ("mean", 0)
    assert [run.sampling.consensus for run in widget.controller.current.runs] == ["mean"]
    pick(widget, layer_a)
    assert widget.sampling_form.consensus() == ("last", 0) and widget.runs_started == runs   # shown, not re-run
    assert [run.sampling.consensus for run in widget.controller.current.runs] == ["last"]
    assert widget.status.text() == f"Showing the results of '{layer_a.name}'."


def test_the_status_line_does_not_keep_another_scans_run(make_napari_viewer, qtbot, scan_1mm, scan_b,
                                                        tiny_checkpoint):
    """Seen on a screenshot: A's "Done: 128 slice(s) …" stayed under Image = B, which had no result."""
    viewer, widget, layer_a, layer_b = open_scans(make_napari_viewer, qtbot, scan_1mm, scan_b)
    choose(widget, tiny_checkpoint, steps=2)
    pick(widget, layer_a)
    assert click_segment(qtbot, widget) == "done" and widget.status.text().startswith("Done:")
    pick(widget, layer_b)
    assert widget.status.text() == f"No result for '{layer_b.name}' yet: click Segment."


# ----------------------------------------------------------------------------- File > Save of a consensus, reopened


def test_labels_saved_by_the_plugin_reopen_as_labels_whatever_their_name(tmp_path, liver_volume):
    """napari proposes the layer's name, 'ct consensus': saved, it reopened as an Image (no 'label', 'seg' or
    'mask' in the name), offered as a scan to segment and never as saved labels."""
    import nibabel as nib

    from napari_medconddiff._reader import read_layers
    from napari_medconddiff._writer import write_labels

    image, labels = liver_volume
    nib.save(nib.Nifti1Image(image.astype(np.int16), np.diag([0.8, 0.8, 3.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    ((_, kwargs, kind),) = read_layers(tmp_path / "ct.nii.gz")
    assert kind == "image"
    layer_labels = np.ascontiguousarray(labels[::-1, ::-1].transpose(2, 1, 0))     # any layer-shaped array
    attributes = {"metadata": kwargs["metadata"], "scale": kwargs["scale"]}
    for name in ("ct consensus.nii.gz", "ct result.nii.gz"):      # napari's proposed name; a name with no hint
        (written,) = write_labels(str(tmp_path / name), layer_labels, attributes)
        assert nib.load(written).header.get_intent()[0] == "label"
        ((_, _, kind),) = read_layers(written)
        assert kind == "labels"
    # A plain Labels layer (no file behind it, no header) says so too; it had no intent, so only a name could tell.
    (plain,) = write_labels(str(tmp_path / "ct result plain.nii.gz"), layer_labels, {"metadata": {}, "scale": (1, 1, 1)})
    assert nib.load(plain).header.get_intent()[0] == "label"
