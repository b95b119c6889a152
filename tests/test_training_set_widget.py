"""The dock's Training set section, driven as a user drives it: correct scan A, add it to a set, check
another slice, add again (a merge), correct scan B, add it, fine-tune on the whole set; bad folders.

Runs under pytest-xvfb with the tiny model and 64×64×6 cuts of the real liver CT (see test_widget.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog

import medconddiff
from medconddiff.checkpoint import load_checkpoint
from medconddiff.training_set import TrainingSet
from napari_medconddiff._layers import volume_to_layer
from napari_medconddiff._model_picker import CHECKPOINT_FILE, DEFAULT_MODEL
from napari_medconddiff._training_set_flow import NEW_SET_TEXT
from tests.conftest import meta_1mm
from tests.test_widget import (  # noqa: F401 (fixtures used by name)
    RUN_TIMEOUT_MS,
    _no_unexpected_question,
    _no_worker_left_running,
    choose,
    click,
    click_segment,
    open_viewer,
    paint,
    scan_1mm,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def choose_folder(qtbot, widget, folder) -> str:
    """Type the folder and press Enter, as a user does; the open's outcome ('done' or 'failed')."""
    panel = widget.training_set_panel
    with qtbot.waitSignal(panel.finished, timeout=RUN_TIMEOUT_MS) as finished:
        panel.folder_edit.setText(str(folder))
        qtbot.keyClick(panel.folder_edit, Qt.Key.Key_Return)
    return finished.args[0]


def click_add(qtbot, widget) -> str:
    with qtbot.waitSignal(widget.training_set_panel.finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.training_set_panel.add_button)
    return finished.args[0]


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def scan_b(liver_volume):
    """Another small scan: the liver cut mirrored left-right (other voxels, the same 1 mm RAS grid)."""
    return volume_to_layer(np.ascontiguousarray(liver_volume[0][::-1]), meta_1mm())


def segment_and_paint(make_napari_viewer, qtbot, scan, checkpoint, name: str):
    """Open ``scan`` as ``name``, segment it with ``checkpoint`` (2 steps), paint label 1 on slice 1:
    (viewer, widget, its consensus layer)."""
    viewer, _, widget = open_viewer(make_napari_viewer, qtbot, scan, name=name)
    choose(widget, checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    consensus = viewer.layers[f"{name} consensus"]
    paint(consensus, 1, 1)
    return viewer, widget, consensus


def test_a_set_grows_scan_by_scan_and_fine_tuning_learns_from_all_of_it(
        make_napari_viewer, qtbot, scan_1mm, scan_b, tiny_checkpoint, tmp_path, monkeypatch, notifications):
    viewer, widget, consensus_a = segment_and_paint(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint, "liverA")
    panel = widget.training_set_panel
    qtbot.waitUntil(lambda: panel.verified_label.text() == "Verified slices: edited 1", timeout=5000)

    folder = tmp_path / "my set"
    assert choose_folder(qtbot, widget, folder) == "done"
    assert NEW_SET_TEXT in panel.summary_label.text() and not folder.exists()    # created on the first add
    assert click_add(qtbot, widget) == "done"
    training_set = TrainingSet.open(folder)
    assert training_set.cases == ["liverA"] and training_set.verified_slices("liverA") == [1]
    assert "1 case, 1 verified slice;" in panel.summary_label.text()
    assert "Training set: added as a new case 'liverA'" in widget.status.text()

    # The user checks slice 3 (right as it is) and adds again: merged into the same case.
    widget.controller.go_to_slice(3)
    click(qtbot, panel.mark_button)
    qtbot.waitUntil(lambda: panel.verified_label.text() == "Verified slices: edited 1; checked 3", timeout=5000)
    assert click_add(qtbot, widget) == "done"
    training_set = TrainingSet.open(folder)
    assert training_set.cases == ["liverA"] and training_set.verified_slices("liverA") == [1, 3]
    assert "1 case, 2 verified slices;" in panel.summary_label.text()
    assert "merged into its case" in widget.status.text()
    case_a = training_set.load_case("liverA")
    shown_a = widget.controller.current.space.slices(consensus_a.data)
    verified_a = training_set.verified_slices("liverA")
    stored = widget.controller.current.space.geometry.slice_view(case_a.labels)
    np.testing.assert_array_equal(stored[verified_a], shown_a[verified_a])   # the user's labels, slice for slice
    assert (stored[[0, 2, 4, 5]] == 255).all()                               # the rest is ignore
    painted_a = consensus_a.data.copy()

    # Scan B: segment, correct one slice with a class the model does not know, name it, add.
    data, kwargs = scan_b
    layer_b = viewer.add_image(np.array(data), name="liverB", **kwargs)
    widget.layer_combo.value = layer_b
    assert click_segment(qtbot, widget) == "done"
    consensus_b = viewer.layers["liverB consensus"]
    paint(consensus_b, 2, 3, size=10)
    widget.controller.go_to_slice(4)
    click(qtbot, panel.mark_button)
    qtbot.waitUntil(lambda: panel.verified_label.text() == "Verified slices: edited 2; checked 4", timeout=5000)
    widget.class_table.item(3, 1).setText("lesion")
    assert click_add(qtbot, widget) == "done"
    training_set = TrainingSet.open(folder)
    assert training_set.cases == ["liverA", "liverB"]
    assert training_set.class_names == ("background", "liver", "tumour", "lesion")
    assert "2 cases, 4 verified slices;" in panel.summary_label.text() and "lesion" in panel.summary_label.text()
    painted_b = consensus_b.data.copy()

    # Fine-tune: the whole set (A's two slices, B's two), B's edited slice not twice.
    assert not widget.finetune_panel.ft_replay_check.isChecked()     # not a bundled start model
    widget.ft_steps_spin.setValue(2)
    chosen = tmp_path / "from_the_set.safetensors"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(chosen), ""))
    with qtbot.waitSignals([widget.finetune_finished, widget.run_finished], timeout=RUN_TIMEOUT_MS):
        click(qtbot, widget.finetune_button)
    assert notifications.messages("error") == []
    extra = load_checkpoint(chosen).extra
    assert extra["trained_on"] == ["liverA", "liverB"]
    assert extra["finetuned_on"] == []            # B's edited slice is in the set: trained once, from there
    assert extra["training_set"] == {"path": folder.name, "verified_slices": {"liverA": 2, "liverB": 2}}
    assert "replay" not in extra
    # Nothing painted vanished: A untouched; B's corrected slice, and the one checked, kept through the
    # re-segmentation of the others with the new model.
    np.testing.assert_array_equal(consensus_a.data, painted_a)
    space_b = widget.controller.current.space
    np.testing.assert_array_equal(space_b.slices(consensus_b.data)[[2, 4]], space_b.slices(painted_b)[[2, 4]])
    assert widget.controller.current.runs[-1].slice_indices.tolist() == [0, 1, 3, 5]


def test_remove_from_set_asks_then_takes_out_the_slice_or_the_scan_and_never_the_layers(
        make_napari_viewer, qtbot, scan_1mm, scan_b, tiny_checkpoint, tmp_path, monkeypatch, notifications):
    from napari_medconddiff import _dialogs
    from napari_medconddiff._questions import REMOVE_CASE, REMOVE_SLICE

    viewer, widget, consensus = segment_and_paint(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint, "liverA")
    panel = widget.training_set_panel
    widget.controller.go_to_slice(3)
    click(qtbot, panel.mark_button)
    folder = tmp_path / "set"
    assert choose_folder(qtbot, widget, folder) == "done"
    assert click_add(qtbot, widget) == "done"
    assert TrainingSet.open(folder).verified_slices("liverA") == [1, 3]
    painted = consensus.data.copy()
    asked = []

    def answer(reply):
        def ask(parent, scan_name, slice_index, where):
            asked.append((scan_name, slice_index, Path(where)))
            return reply
        monkeypatch.setattr(_dialogs, "ask_remove_from_set", ask)

    # Closing the question removes nothing.
    answer("")
    before = files_of(folder)
    click(qtbot, panel.remove_button)
    assert asked == [("liverA", 3, folder)] and "Nothing removed from the training set" in widget.status.text()
    assert files_of(folder) == before

    # Slice 3 was checked by mistake: only it leaves the set, and its mark goes (the next Add keeps it out).
    answer(REMOVE_SLICE)
    with qtbot.waitSignal(panel.finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, panel.remove_button)
    assert finished.args[0] == "done"
    assert TrainingSet.open(folder).verified_slices("liverA") == [1]
    assert "slice 3 of case 'liverA' is no longer verified (1 verified slice(s) left)" in widget.status.text()
    assert "1 case, 1 verified slice;" in panel.summary_label.text()
    qtbot.waitUntil(lambda: panel.verified_label.text() == "Verified slices: edited 1", timeout=5000)

    # Its last verified slice cannot go alone (the message says what can); nothing changes.
    widget.controller.go_to_slice(1)
    before = files_of(folder)
    with qtbot.waitSignal(panel.finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, panel.remove_button)
    assert finished.args[0] == "failed" and "remove the case instead" in widget.status.text()
    assert files_of(folder) == before
    assert any("remove the case instead" in m for m in notifications.messages("error"))

    # A scan the set does not hold is told so.
    data, kwargs = scan_b
    layer_b = viewer.add_image(np.array(data), name="liverB", **kwargs)
    widget.layer_combo.value = layer_b
    assert click_segment(qtbot, widget) == "done"
    answer(REMOVE_CASE)
    with qtbot.waitSignal(panel.finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, panel.remove_button)
    assert finished.args[0] == "failed" and "does not hold the scan 'liverB'" in widget.status.text()
    assert files_of(folder) == before
    assert any("does not hold the scan 'liverB'" in m for m in notifications.messages("error"))

    # The whole scan: the set's copy goes, the layers stay as they were.
    widget.layer_combo.value = viewer.layers["liverA"]
    qtbot.waitUntil(lambda: widget.controller.current.scan_name == "liverA", timeout=5000)
    with qtbot.waitSignal(panel.finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, panel.remove_button)
    assert finished.args[0] == "done"
    assert TrainingSet.open(folder).cases == [] and not any((folder / "imagesTr").iterdir())
    assert "case 'liverA' removed" in widget.status.text() and "0 cases" in panel.summary_label.text()
    np.testing.assert_array_equal(consensus.data, painted)


def test_remove_from_set_offers_the_sets_cases_for_a_scan_not_on_screen(
        make_napari_viewer, qtbot, scan_1mm, scan_b, tiny_checkpoint, tmp_path, monkeypatch):
    from napari_medconddiff import _dialogs
    from napari_medconddiff._questions import REMOVE_OTHER

    viewer, widget, consensus_a = segment_and_paint(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint, "liverA")
    panel = widget.training_set_panel
    folder = tmp_path / "set"
    assert choose_folder(qtbot, widget, folder) == "done"
    assert click_add(qtbot, widget) == "done"
    data, kwargs = scan_b
    widget.layer_combo.value = viewer.add_image(np.array(data), name="liverB", **kwargs)
    assert click_segment(qtbot, widget) == "done"
    paint(viewer.layers["liverB consensus"], 2, 1)
    assert click_add(qtbot, widget) == "done"
    assert sorted(TrainingSet.open(folder).cases) == ["liverA", "liverB"]
    painted_a = consensus_a.data.copy()
    offered = []

    def choose_case(case):
        def ask(parent, case_lines, where):
            offered.append((tuple(case_lines), Path(where)))
            return None if case is None else [line.split(":")[0] for line in case_lines].index(case)
        monkeypatch.setattr(_dialogs, "ask_case_to_remove", ask)

    # liverB is on screen; its question's "Another case…" lists the set's cases. Closing the list removes nothing.
    monkeypatch.setattr(_dialogs, "ask_remove_from_set", lambda *args: REMOVE_OTHER)
    choose_case(None)
    before = files_of(folder)
    click(qtbot, panel.remove_button)
    lines, where = offered[-1]
    assert where == folder and sorted(line.split(" (")[0] for line in lines) == [
        "liverA: 1 verified slice", "liverB: 1 verified slice"]
    assert "Nothing removed from the training set" in widget.status.text() and files_of(folder) == before

    # liverA, not on screen, is chosen: it alone leaves the set; its layers are not touched.
    choose_case("liverA")
    with qtbot.waitSignal(panel.finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, panel.remove_button)
    assert finished.args[0] == "done" and TrainingSet.open(folder).cases == ["liverB"]
    assert "case 'liverA' removed" in widget.status.text() and "1 case, 1 verified slice;" in panel.summary_label.text()
    np.testing.assert_array_equal(consensus_a.data, painted_a)

    # No segmented scan on screen (both scans closed): the list is asked straight away, not the question.
    viewer.layers.remove("liverB")
    viewer.layers.remove("liverA")
    monkeypatch.setattr(_dialogs, "ask_remove_from_set", lambda *args: pytest.fail("asked about a closed scan"))
    choose_case("liverB")
    with qtbot.waitSignal(panel.finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, panel.remove_button)
    assert finished.args[0] == "done" and [line.split(" (")[0] for line in offered[-1][0]] == ["liverB: 1 verified slice"]
    assert TrainingSet.open(folder).cases == [] and "0 cases" in panel.summary_label.text()


def test_bad_folders_are_one_line_and_leave_the_set_as_it_was(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint,
                                                              tmp_path, notifications):
    viewer, _, widget = open_viewer(make_napari_viewer, qtbot, scan_1mm)
    panel = widget.training_set_panel
    choose(widget, tiny_checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    paint(viewer.layers["liver consensus"], 2, 1)
    folder = tmp_path / "set"
    assert choose_folder(qtbot, widget, folder) == "done"
    assert click_add(qtbot, widget) == "done"
    before, summary = files_of(folder), panel.summary_label.text()

    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    other = tmp_path / "Dataset001_Prostate"             # an nnU-Net dataset of two-channel MRI
    (other / "imagesTr").mkdir(parents=True)
    (other / "labelsTr").mkdir()
    (other / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"},
                                                    "labels": {"background": 0, "prostate": 1},
                                                    "numTraining": 1, "file_ending": ".nii.gz"}))
    for name in ("prostate_00_0000", "prostate_00_0001"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), other / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), np.eye(4)), other / "labelsTr" / "prostate_00.nii.gz")
    inside_package = Path(medconddiff.__file__).parent / "my_set"
    expected = {a_file: "is a file, not a folder", other: "the set holds 2 channel(s) (T2, ADC)",
                inside_package: "inside the installed package medconddiff"}
    for bad, why in expected.items():
        start = len(notifications.messages("error"))
        assert choose_folder(qtbot, widget, bad) == "failed"
        errors = notifications.messages("error")[start:]
        assert len(errors) == 1 and why in errors[0] and "\n" not in errors[0], errors
        assert widget.controller.training_set_folder == folder           # the set in use stays
        assert panel.folder_edit.text() == str(folder) and panel.summary_label.text() == summary
    assert not inside_package.exists()
    assert files_of(folder) == before
    # Adding again after the refusals still goes to the set in use.
    assert click_add(qtbot, widget) == "done" and TrainingSet.open(folder).cases == ["liver"]


def test_replay_defaults_on_for_a_bundled_model_learning_a_new_class(make_napari_viewer, qtbot, scan_1mm,
                                                                      tiny_checkpoint, tmp_path, monkeypatch,
                                                                      notifications):
    viewer, _, widget = open_viewer(make_napari_viewer, qtbot, scan_1mm)
    replay = widget.finetune_panel.ft_replay_check
    choose(widget, tiny_checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    paint(viewer.layers["liver consensus"], 2, 3)         # a new class
    qtbot.waitUntil(lambda: widget.class_table.rowCount() == 4, timeout=5000)
    assert not replay.isChecked()                         # the start model is not a bundled one
    widget.model_combo.setCurrentText(DEFAULT_MODEL)
    assert replay.isChecked()                             # bundled, and the class list grows
    widget.class_table.item(3, 1).setText("tumour")      # the user says label 3 is a class the model knows
    assert not replay.isChecked()
    widget.class_table.item(3, 1).setText("lesion")
    assert replay.isChecked()
    # The user's own choice stays; and it reaches the fine-tuning: this start model cannot replay.
    widget.model_combo.setCurrentText(CHECKPOINT_FILE)
    assert not replay.isChecked()
    replay.click()                                       # the user ticks it: their choice from now on
    widget.model_combo.setCurrentText(DEFAULT_MODEL)
    widget.model_combo.setCurrentText(CHECKPOINT_FILE)
    assert replay.isChecked()
    widget.ft_steps_spin.setValue(2)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "m.safetensors"), ""))
    with qtbot.waitSignal(widget.finetune_finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.finetune_button)
    assert finished.args == ["failed"]
    errors = notifications.messages("error")
    assert len(errors) == 1 and "was not trained on the bundled sample" in errors[0] and "\n" not in errors[0]


def test_yesterdays_seg_continues_as_todays_consensus_and_joins_the_set(make_napari_viewer, qtbot, liver_volume,
                                                                        tiny_checkpoint, tmp_path, monkeypatch,
                                                                        notifications):
    """Open a series folder with the SEG saved in an earlier session, choose it under Saved labels, Continue:
    it becomes the consensus (its labelled slices the user's edits), joins the training set as the user's
    verified slices, and exports as a SEG that reads back to the same voxels."""
    import warnings

    from medconddiff.dicom_seg import read_dicom_seg, write_dicom_seg
    from medconddiff.dicom_series import read_dicom_series
    from napari_medconddiff._export import DICOM_SEG_FILTER
    from napari_medconddiff._layers import layer_to_volume
    from tests.dicom_helpers import write_series

    volume, labels = liver_volume
    saved = labels.copy()
    saved[..., [0, 2, 3, 5]] = 0                       # yesterday's corrections: file slices 1 and 4
    folder = tmp_path / "export"
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])           # stored as DICOM usually is (LPS), 2 mm slices
    write_series(folder / "CT", volume.astype(np.int16).astype(np.float32), affine)
    write_dicom_seg(folder / "yesterday_seg.dcm", saved, read_dicom_series(folder / "CT").source,
                    ("background", "liver", "tumour"))
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan, seg = viewer.open(str(folder), plugin="napari-medconddiff")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medconddiff", "MedCondDiff segmentation")
    qtbot.waitUntil(lambda: widget.controller.engine is not None, timeout=RUN_TIMEOUT_MS)
    choose(widget, tiny_checkpoint, steps=2)
    widget.layer_combo.value = scan
    row = widget.saved_labels
    assert row.container.isVisibleTo(widget) and row.chosen() is seg        # the SEG is offered for this series
    click(qtbot, row.button)
    qtbot.waitUntil(lambda: not widget.controller.busy and widget.controller.current is not None,
                    timeout=RUN_TIMEOUT_MS)
    assert notifications.messages("error") == []
    consensus = viewer.layers[f"{scan.name} consensus"]
    np.testing.assert_array_equal(consensus.data, seg.data)
    space = widget.controller.current.space
    labelled = [int(s) for s in np.flatnonzero(space.slices(np.asarray(seg.data)).any(axis=(1, 2)))]
    assert len(labelled) == 2 and widget.controller.edited_slices() == labelled
    panel = widget.training_set_panel
    qtbot.waitUntil(lambda: panel.verified_label.text().startswith("Verified slices: edited"), timeout=5000)

    set_folder = tmp_path / "my set"
    assert choose_folder(qtbot, widget, set_folder) == "done"
    assert click_add(qtbot, widget) == "done"
    training_set = TrainingSet.open(set_folder)
    (case,) = training_set.cases
    assert case.startswith("series1_synthetic_CT_") and training_set.verified_slices(case) == labelled
    stored = space.geometry.slice_view(training_set.load_case(case).labels)
    np.testing.assert_array_equal(stored[labelled], space.slices(np.asarray(seg.data))[labelled])

    target = tmp_path / "today_seg.dcm"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), DICOM_SEG_FILTER))
    click(qtbot, widget.export_button)
    assert notifications.messages("error") == []
    np.testing.assert_array_equal(read_dicom_seg(target, folder / "CT"),
                                  layer_to_volume(consensus.data, consensus.metadata)[0])
    np.testing.assert_array_equal(read_dicom_seg(target, folder / "CT"), saved)


def test_in_a_rolled_or_3d_view_the_current_slice_is_refused_not_guessed(make_napari_viewer, qtbot, scan_1mm,
                                                                         tiny_checkpoint, notifications):
    viewer, widget, _ = segment_and_paint(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint, "liver")
    panel = widget.training_set_panel
    axial = viewer.dims.order
    runs = widget.runs_started
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("current"))
    for rolled, ndisplay in (((axial[2], axial[0], axial[1]), 2), (axial, 3)):   # sagittal; the 3-D view
        viewer.dims.order, viewer.dims.ndisplay = rolled, ndisplay
        click(qtbot, panel.mark_button)
        assert "napari shows no axial slice" in widget.status.text()
        click(qtbot, widget.segment_button)
        assert "napari shows no axial slice" in widget.status.text() and "\n" not in widget.status.text()
    assert widget.controller.checked_slices() == [] and widget.runs_started == runs     # nothing marked or segmented
    viewer.dims.order, viewer.dims.ndisplay = axial, 2
    widget.controller.go_to_slice(3)
    click(qtbot, panel.mark_button)
    assert widget.controller.checked_slices() == [3]
    widget.controller.go_to_slice(4)
    assert click_segment(qtbot, widget) == "done" and widget.runs_started == runs + 1
    assert widget.controller.current.runs[-1].slice_indices.tolist() == [4]


def test_a_plain_layer_joins_the_set_sliced_as_the_user_verified_it(make_napari_viewer, qtbot, liver_volume,
                                                                   tiny_checkpoint, tmp_path, monkeypatch):
    from napari_medconddiff import _dialogs
    from napari_medconddiff._questions import REMOVE_SLICE

    # An array with no file behind it: 6 axial slices on napari's slider, 0.7 × 0.6 mm pixels, 4 mm apart.
    stack = np.ascontiguousarray(np.transpose(liver_volume[0], (2, 1, 0)), dtype=np.float32)
    viewer, _, widget = open_viewer(make_napari_viewer, qtbot, (stack, {"scale": (4.0, 0.7, 0.6)}), name="stack")
    choose(widget, tiny_checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    consensus = viewer.layers["stack consensus"]
    paint(consensus, 2, 1)                                    # the user corrects slice 2 of the stack
    widget.controller.go_to_slice(4)
    click(qtbot, widget.training_set_panel.mark_button)      # and checks slice 4
    assert widget.controller.verified_slices() == [2, 4]
    folder = tmp_path / "set"
    assert choose_folder(qtbot, widget, folder) == "done"
    assert click_add(qtbot, widget) == "done"
    training_set = TrainingSet.open(folder)
    assert training_set.verified_slices("stack") == [2, 4]    # the slider's slices, not 64 slices across them
    stored = widget.controller.current.space.geometry.slice_view(training_set.load_case("stack").labels)
    shown = widget.controller.current.space.slices(consensus.data)
    np.testing.assert_array_equal(stored[[2, 4]], shown[[2, 4]])
    assert (stored[[0, 1, 3, 5]] == 255).all()

    # Slice 4 was checked by mistake: it alone leaves the set (a plain layer's slice is found there too).
    monkeypatch.setattr(_dialogs, "ask_remove_from_set", lambda *a: REMOVE_SLICE)
    with qtbot.waitSignal(widget.training_set_panel.finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.training_set_panel.remove_button)
    assert finished.args[0] == "done", widget.status.text()
    assert TrainingSet.open(folder).verified_slices("stack") == [2]
