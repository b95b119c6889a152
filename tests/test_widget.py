"""The dock widget, driven the way a user drives it: real scan, tiny model, clicks, napari's viewer.

Runs under pytest-xvfb. A tiny random model, 2–3 steps (20 for the responsiveness check) and a
64×64×6 cut of the real liver CT keep every run to a fraction of a second of diffusion on CPU. The
viewer is not shown (make_napari_viewer's default), so the responsiveness check measures the
widget's own work on the GUI thread, not software OpenGL rendering. The controller's logic is
tested without Qt in test_controller.py; these tests check what the user sees and clicks.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from qtpy.QtCore import Qt, QThreadPool, QTimer
from qtpy.QtWidgets import (
    QAbstractButton,
    QApplication,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLineEdit,
    QListWidget,
    QMessageBox,
    QProgressBar,
    QScrollArea,
    QSpinBox,
    QTableWidget,
)

from medconddiff.consensus import first_argmax
from medconddiff.nifti import VolumeMeta
from napari_medconddiff import _dialogs, _job, _result_layers
from napari_medconddiff import _widget as widget_module
from napari_medconddiff._controller import KEEP, NEW_LAYER, REPLACE
from napari_medconddiff._geometry import stack_overlay_kwargs
from napari_medconddiff._layers import layer_to_volume, volume_to_layer
from tests.conftest import meta_1mm

PLUGIN = "napari-medconddiff"
WIDGET_NAME = "MedCondDiff segmentation"
RUN_TIMEOUT_MS = 60_000
HEARTBEAT_STEPS = 20     # 20 step updates for the GUI thread to draw while the worker runs
# The tiny model denoises faster than a real one; each of its steps is made to last at least this long
# (in the worker thread), so that the run is long enough to measure the GUI's responsiveness on any machine.
HEARTBEAT_STEP_SECONDS = 0.03
# A real scanner affine: LPS (flipped in-plane axes), 0.6 × 0.7 mm pixels, 4 mm slices, an origin far from 0.
AFFINE = np.array([[-0.6, 0.0, 0.0, 90.0], [0.0, -0.7, 0.0, 110.0], [0.0, 0.0, 4.0, -50.0], [0.0, 0.0, 0.0, 1.0]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scan(liver_volume):
    """Layer data + kwargs of the 64×64×6 liver cut stored LPS, as the reader would give them."""
    image, _ = liver_volume
    return volume_to_layer(image[::-1, ::-1].copy(), VolumeMeta(affine=AFFINE, spacing=(0.6, 0.7, 4.0)))


@pytest.fixture(scope="module")
def scan_1mm(liver_volume):
    """The same cut with its true 1 mm RAS geometry (what the bundled liver models were trained on)."""
    return volume_to_layer(liver_volume[0], meta_1mm())


# The real dialogs, kept before the guard below replaces them.
ASK_EDIT_CHOICE = _dialogs.ask_edit_choice
ASK_CLASSES_TO_LEAVE_OUT = _dialogs.ask_classes_to_leave_out
ASK_SAVE_FINETUNED_ELSEWHERE = _dialogs.ask_save_finetuned_elsewhere


@pytest.fixture(autouse=True)
def _no_unexpected_question(monkeypatch):
    """A test that does not expect a question fails instead of waiting for a click on a modal dialog."""
    def unexpected(*args):
        raise AssertionError(f"unexpected question: {args[1:]}")

    monkeypatch.setattr(_dialogs, "ask_edit_choice", unexpected)
    monkeypatch.setattr(_dialogs, "ask_save_cancelled_finetune", unexpected)
    monkeypatch.setattr(_dialogs, "ask_save_finetuned_elsewhere", unexpected)
    monkeypatch.setattr(_dialogs, "ask_remove_from_set", unexpected)
    monkeypatch.setattr(_dialogs, "ask_classes_to_leave_out", unexpected)


@pytest.fixture(autouse=True)
def _no_worker_left_running():
    yield
    assert QThreadPool.globalInstance().waitForDone(RUN_TIMEOUT_MS), "a worker thread did not stop"


def open_viewer(make_napari_viewer, qtbot, scan, name="liver"):
    viewer = make_napari_viewer()
    data, kwargs = scan
    layer = viewer.add_image(np.array(data), name=name, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    assert isinstance(widget, widget_module.SegmentWidget)
    qtbot.waitUntil(lambda: widget.controller.engine is not None, timeout=RUN_TIMEOUT_MS)
    return viewer, layer, widget


def choose(widget, checkpoint, steps=3, slices="all", first=0, last=0):
    """Set the controls as a user would."""
    widget.model_combo.setCurrentText(widget_module.CHECKPOINT_FILE)
    widget.checkpoint_edit.setText(str(checkpoint))
    widget.steps_spin.setValue(steps)
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData(slices))
    widget.range_edit.setText(f"{first}-{last}")


def click(qtbot, button):
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def click_segment(qtbot, widget) -> str:
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.segment_button)
    return finished.args[0]


def choose_consensus(qtbot, widget, method):
    with qtbot.waitSignal(widget.consensus_updated, timeout=RUN_TIMEOUT_MS):
        widget.consensus_combo.setCurrentIndex(widget.consensus_combo.findData(method))


def result_layers(viewer, role):
    return [layer for layer in viewer.layers
            if _result_layers.is_own_result(layer) and _result_layers.marker(layer)["role"] == role]


def paint(layer, slice_index, value, size=8, at=(20, 20)):
    """A brush stroke with napari's own paint (what a mouse drag does) that changes the slice."""
    before = layer.data[slice_index].copy()
    layer.brush_size = size
    layer.paint((slice_index, *at), value)
    assert not np.array_equal(layer.data[slice_index], before), "the stroke painted what was there already"


def gate_after_first_batch(monkeypatch):
    """Hold the worker after the first finished batch until the test releases it (deterministic timing)."""
    from medconddiff.segmenter import SlicesDone

    from napari_medconddiff import _segment_flow

    release = threading.Event()
    original = _segment_flow.iterate_run

    def gated(run):
        for event in original(run):
            yield event
            if isinstance(event, SlicesDone) and event.completed < event.total:
                release.wait(RUN_TIMEOUT_MS / 1000)
        return run.result

    monkeypatch.setattr(_segment_flow, "iterate_run", gated)
    return release


# ----------------------------------------------------------------------------- the main flow


def test_segment_adds_aligned_layers_and_keeps_the_gui_responsive(make_napari_viewer, qtbot, scan, tiny_checkpoint,
                                                                   notifications, monkeypatch):
    from medconddiff.segmenter import Segmenter

    real_denoise_slices = Segmenter.denoise_slices

    def steps_of_a_real_model(self, *args, **kwargs):
        for update in real_denoise_slices(self, *args, **kwargs):
            time.sleep(HEARTBEAT_STEP_SECONDS)
            yield update

    monkeypatch.setattr(Segmenter, "denoise_slices", steps_of_a_real_model)
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    assert layer.axis_labels == ("I→S", "A→P", "R→L") and layer.data.shape == (6, 64, 64)
    layer.translate = (8.0, -5.0, 3.0)          # a user-moved layer: results must follow it
    choose(widget, tiny_checkpoint, steps=HEARTBEAT_STEPS)
    widget.adaptive_check.setChecked(False)   # all 20 steps: a run long enough to measure the GUI's responsiveness
    assert not widget.export_button.isEnabled() and not widget.uncertain_button.isEnabled()

    beats: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    window: dict[str, float] = {}
    widget.diffusion_started.connect(lambda: window.setdefault("start", time.perf_counter()))
    timer.start(10)
    assert click_segment(qtbot, widget) == "done"
    window["end"] = time.perf_counter()
    timer.stop()

    assert notifications.messages("error") == []
    assert widget.progress.value() == widget.progress.maximum() == 6
    assert widget.export_button.isEnabled() and widget.uncertain_button.isEnabled()
    results = widget.controller.current
    (run,) = results.runs
    assert run.completed.all()

    steps = viewer.layers[f"liver x̂0 ({HEARTBEAT_STEPS} steps)"]
    consensus = viewer.layers["liver consensus"]
    uncertainty = viewer.layers["liver uncertainty"]
    assert [type(x).__name__ for x in (steps, consensus, uncertainty)] == ["Labels", "Labels", "Image"]
    # Step axis first, then the scan's layer axes (S, P, L) at the model's grid: 64 pixels of 0.7 (A)
    # and 0.6 mm (R) resampled to 1 mm.
    assert steps.data.shape == (HEARTBEAT_STEPS, 6, 45, 38) and steps.data.dtype == np.uint8
    assert not steps.visible
    assert consensus.data.shape == layer.data.shape and consensus.data.dtype == np.uint8
    assert uncertainty.data.shape == layer.data.shape and uncertainty.data.dtype == np.float32
    assert steps.data.max() < 3 and consensus.data.max() < 3
    assert 0.0 <= uncertainty.data.min() and uncertainty.data.max() <= 1.0 and uncertainty.data.max() > 0
    assert uncertainty.colormap.name in ("inferno", "magma") and uncertainty.blending == "additive"
    assert tuple(uncertainty.contrast_limits) == (0.0, 1.0)
    assert list(consensus.features["class"]) == ["background", "liver", "tumour"]
    assert "liver" in widget.legend.text() and "tumour" in widget.legend.text()
    # The x̂0 layer drawn live holds exactly the kept trajectory's per-step arg-max.
    np.testing.assert_array_equal(steps.data, results.space.stack_view(first_argmax(run.trajectory, axis=1)))
    # The result layers share the scan's transform; File > Save writes them in the scan's voxel order.
    for result_layer in (consensus, uncertainty):
        np.testing.assert_allclose(result_layer.scale, layer.scale)
        np.testing.assert_allclose(result_layer.translate, layer.translate)
    np.testing.assert_allclose(layer_to_volume(consensus.data, consensus.metadata)[1].affine, AFFINE)

    # The GUI thread was never blocked for long while the diffusion ran.
    inside = [t for t in beats if window["start"] <= t <= window["end"]]
    gaps = np.diff([window["start"], *inside, window["end"]])
    assert window["end"] - window["start"] > 0.3, "the run was too short to measure responsiveness"
    assert gaps.max() < 0.1, f"GUI blocked for {gaps.max() * 1000:.0f} ms during the run"

    # napari's own dims slider scrubs the diffusion steps (of the x̂0 layer, once the user shows it).
    assert viewer.dims.axis_labels[0] == _result_layers.STEP_AXIS_LABEL
    steps.visible = True
    differing = [k for k in range(1, HEARTBEAT_STEPS) if not np.array_equal(steps.data[k], steps.data[0])]
    assert differing, "the random model gave the same x̂0 at every step; nothing to scrub"
    shown = []
    for k in (0, differing[0]):
        viewer.dims.set_current_step(0, k)
        shown.append(np.asarray(steps._slice.image.raw).copy())
        z = int(np.round(steps.world_to_data(viewer.dims.point)[1]))
        np.testing.assert_array_equal(shown[-1], steps.data[k, z])
    assert not np.array_equal(shown[0], shown[1])


def test_consensus_switch_export_and_uncertain_slice(make_napari_viewer, qtbot, scan, tiny_checkpoint, tmp_path,
                                                     monkeypatch, notifications):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, tiny_checkpoint, steps=3)
    assert click_segment(qtbot, widget) == "done"
    consensus = viewer.layers["liver consensus"]
    uncertainty = viewer.layers["liver uncertainty"]
    before = consensus.data.copy(), uncertainty.data.copy()
    runs = widget.runs_started

    # Readable names on screen, the engine's names underneath; re-fusing runs no diffusion.
    assert [widget.consensus_combo.itemText(i) for i in range(widget.consensus_combo.count())] == \
        ["the model's choice", "mean", "vote-gated mean", "uncertainty-weighted mean", "last step",
         "mean of the later half", "one-shot forward"]
    # The one-shot forward is only kept by a run that uses it: choosing it afterwards asks for a new run.
    widget.consensus_combo.setCurrentIndex(widget.consensus_combo.findData("one_shot"))
    assert any("click Segment" in m for m in notifications.messages())
    assert widget.runs_started == runs and np.array_equal(consensus.data, before[0])
    choose_consensus(qtbot, widget, "last")
    assert widget.runs_started == runs
    assert widget.controller.current.runs[0].sampling.consensus == "last"
    assert not (np.array_equal(consensus.data, before[0]) and np.array_equal(uncertainty.data, before[1]))
    assert "last step" in widget.status.text()
    # Back to the model's choice: this model records none, so it is the mean the run started with.
    choose_consensus(qtbot, widget, "auto")
    assert widget.controller.current.runs[0].sampling.consensus == "mean"
    assert np.array_equal(consensus.data, before[0]) and np.array_equal(uncertainty.data, before[1])
    choose_consensus(qtbot, widget, "last")
    with qtbot.waitSignal(widget.consensus_updated, timeout=RUN_TIMEOUT_MS):
        widget.skip_spin.setValue(1)
    assert widget.controller.current.runs[0].sampling.skip_first == 1 and widget.runs_started == runs
    # The skip changed no label of the last step, so Ctrl-Z undoes the re-fusion to 'last': the model's
    # choice and its labels come back, and the box says so (without re-fusing); Shift-Ctrl-Z: 'last' again.
    consensus.undo()
    assert np.array_equal(consensus.data, before[0])
    assert (widget.consensus_combo.currentData(), widget.skip_spin.value()) == ("auto", 0)
    assert "as the labels undone or redone show" in widget.status.text()
    consensus.redo()
    assert (widget.consensus_combo.currentData(), widget.skip_spin.value()) == ("last", 1)
    assert widget.runs_started == runs and widget.controller.current.runs[0].sampling.skip_first == 1

    # Most uncertain slice: the slider moves to the slice with the highest mean uncertainty.
    index, value = widget.most_uncertain_slice()
    per_slice = uncertainty.data.mean(axis=(1, 2))          # layer axis 0 runs I → S like the model's slices
    assert index == int(np.argmax(per_slice)) and value == pytest.approx(per_slice.max(), rel=1e-5)
    click(qtbot, widget.uncertain_button)
    assert viewer.dims.current_step[-3] == index

    # Export the hand-edited consensus: the scan's voxel order and affine, plus a sidecar.
    first_edit = (int(consensus.data[0, 20, 20]) + 1) % 3
    paint(consensus, 0, first_edit)
    target = tmp_path / "liver_seg.nii.gz"
    offered = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: offered.append(a[2]) or (str(target), ""))
    click(qtbot, widget.export_button)
    saved = nib.load(str(target))
    np.testing.assert_allclose(saved.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), layer_to_volume(consensus.data, consensus.metadata)[0])
    sidecar = json.loads((tmp_path / "liver_seg.json").read_text())
    assert sidecar["edited_in_napari"] is True and sidecar["edited_slices"] == [0]
    assert sidecar["sampling"]["consensus"] == "last" and sidecar["sampling"]["skip_first"] == 1
    assert sidecar["class_names"] == ["background", "liver", "tumour"] and sidecar["checkpoint_sha256"]
    assert notifications.messages("error") == []
    assert not Path(offered[0]).is_relative_to(Path(widget_module.__file__).parent)

    # A file the save dialog did not ask about (the sidecar) is only replaced after a yes.
    stamp = (tmp_path / "liver_seg.json").stat().st_mtime_ns
    paint(consensus, 0, (first_edit + 1) % 3)
    asked = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "liver_seg"), ""))
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
    click(qtbot, widget.export_button)
    assert asked and "liver_seg.json" in asked[0]
    assert (tmp_path / "liver_seg.json").stat().st_mtime_ns == stamp
    assert not np.array_equal(np.asarray(nib.load(str(target)).dataobj),
                              layer_to_volume(consensus.data, consensus.metadata)[0])
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    click(qtbot, widget.export_button)
    np.testing.assert_array_equal(np.asarray(nib.load(str(target)).dataobj),
                                  layer_to_volume(consensus.data, consensus.metadata)[0])


def test_edited_slices_are_kept_unless_the_user_says_otherwise(make_napari_viewer, qtbot, scan, tiny_checkpoint,
                                                               monkeypatch):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, tiny_checkpoint, steps=3)
    assert click_segment(qtbot, widget) == "done"
    consensus = viewer.layers["liver consensus"]
    paint(consensus, 2, (int(consensus.data[2, 20, 20]) + 1) % 3)
    painted = consensus.data[2].copy()
    qtbot.waitUntil(lambda: widget.ft_edited_label.text() == "Edited slices: 2", timeout=5000)
    answers, asked = [KEEP, NEW_LAYER, REPLACE], []
    monkeypatch.setattr(_dialogs, "ask_edit_choice",
                        lambda parent, action, slices: asked.append((action, slices)) or answers.pop(0))

    choose_consensus(qtbot, widget, "last")                      # keep my edits
    assert asked[-1] == ("Re-fusing with the last step consensus", [2])
    np.testing.assert_array_equal(consensus.data[2], painted)
    assert "Your edits on slice(s) 2 were kept" in widget.status.text()

    choose_consensus(qtbot, widget, "vote_gated")                # new layer: the edited one is set aside
    assert viewer.layers["liver consensus (your edits)"] is consensus
    np.testing.assert_array_equal(consensus.data[2], painted)
    (current,) = result_layers(viewer, "consensus")
    assert current is not consensus
    qtbot.waitUntil(lambda: widget.ft_edited_label.text() == "Edited slices: none yet", timeout=5000)

    paint(current, 3, (int(current.data[3, 20, 20]) + 1) % 3)   # replace: overwritten, undo brings it back
    edit = current.data[3].copy()
    choose_consensus(qtbot, widget, "mean")
    assert not np.array_equal(current.data[3], edit)
    current.undo()
    np.testing.assert_array_equal(current.data[3], edit)
    assert len(asked) == 3


def test_the_legend_shows_each_class_volume_as_the_user_paints_and_undoes(make_napari_viewer, qtbot, scan,
                                                                          tiny_checkpoint):
    from napari_medconddiff._volumes import millilitres

    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, tiny_checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    consensus = viewer.layers["liver consensus"]
    voxel_ml = 0.6 * 0.7 * 4.0 / 1000        # the scan file's spacing, whatever the layer's axis order

    def shown(data):
        return [f"{name} <b>{millilitres(round(np.count_nonzero(data == k) * voxel_ml, 3))}</b>"
                for k, name in ((1, "liver"), (2, "tumour"))]

    def legend_shows(data) -> bool:
        return all(item in widget.legend.text() for item in shown(data))

    qtbot.waitUntil(lambda: legend_shows(consensus.data), timeout=5000)
    before = consensus.data.copy()
    paint(consensus, 2, 1, size=20)                    # more liver: the legend follows the stroke
    assert np.count_nonzero(consensus.data == 1) > np.count_nonzero(before == 1) + 100
    qtbot.waitUntil(lambda: legend_shows(consensus.data), timeout=5000)
    assert not legend_shows(before)
    consensus.undo()                                   # napari's undo emits no paint: still recounted
    np.testing.assert_array_equal(consensus.data, before)
    qtbot.waitUntil(lambda: legend_shows(before), timeout=5000)
    assert "voxel size from the layer" not in widget.legend.text()


def test_volumes_read_as_a_reader_compares_them():
    from napari_medconddiff._volumes import millilitres

    assert [millilitres(v) for v in (1523.4, 12.43, 3.456, 0.0834, 0.0)] == [
        "1,523 ml", "12.4 ml", "3.46 ml", "0.083 ml", "0 ml"]


def test_the_edit_question_offers_three_answers_and_escape_keeps_the_edits(qtbot):
    parent = widget_module.QWidget()
    qtbot.addWidget(parent)
    seen = []

    def answer(button_text):
        box = QApplication.activeModalWidget()
        seen.append(sorted(b.text() for b in box.findChildren(QAbstractButton) if b.text()))
        if button_text is None:
            qtbot.keyClick(box, Qt.Key.Key_Escape)
        else:
            next(b for b in box.findChildren(QAbstractButton) if b.text() == button_text).click()

    for text, expected in ((None, KEEP), ("New layer", NEW_LAYER), ("Replace", REPLACE)):
        QTimer.singleShot(0, lambda text=text: answer(text))
        assert ASK_EDIT_CHOICE(parent, "Re-fusing", [2, 3]) == expected
    assert seen[0] == ["Keep my edits", "New layer", "Replace"]


def test_the_body_outline_question_unticks_the_outline_and_escape_loads_nothing(qtbot):
    from qtpy.QtWidgets import QCheckBox, QDialogButtonBox

    parent = widget_module.QWidget()
    qtbot.addWidget(parent)
    seen = []

    def answer(tick_outline, escape=False):
        dialog = QApplication.activeModalWidget()
        boxes = {box.text(): box for box in dialog.findChildren(QCheckBox)}
        seen.append({name: box.isChecked() for name, box in boxes.items()})
        if escape:
            qtbot.keyClick(dialog, Qt.Key.Key_Escape)
            return
        if tick_outline:
            boxes["External"].setChecked(True)
        dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Ok).click()

    names = ("background", "External", "GTV", "Heart")
    for kwargs, expected in (({"tick_outline": False}, (1,)), ({"tick_outline": True}, ()),
                             ({"tick_outline": False, "escape": True}, None)):
        QTimer.singleShot(0, lambda kwargs=kwargs: answer(**kwargs))
        assert ASK_CLASSES_TO_LEAVE_OUT(parent, "RS planning", names, (1,)) == expected
    assert seen[0] == {"External": False, "GTV": True, "Heart": True}
    texts = []

    def read_and_accept():
        dialog = QApplication.activeModalWidget()
        texts.extend(label.text() for label in dialog.findChildren(widget_module.QLabel))
        dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Ok).click()

    QTimer.singleShot(0, read_and_accept)          # a plan's structures, no outline: every box ticked
    assert ASK_CLASSES_TO_LEAVE_OUT(parent, "RS organs", ("background", "Heart", "GTV"), ()) == ()
    assert any("holds 2 structures of a plan" in text for text in texts)


def test_rerun_updates_only_its_own_layers_and_only_the_chosen_slice(make_napari_viewer, qtbot, scan, tiny_checkpoint,
                                                                     monkeypatch):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    users = viewer.add_labels(np.zeros(layer.data.shape, np.uint8), name="liver consensus", scale=layer.scale)
    choose(widget, tiny_checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    (ours,) = result_layers(viewer, "consensus")
    assert ours is not users and ours.name != "liver consensus"     # napari renamed ours, not theirs
    duplicate = viewer.add_labels(ours.data.copy(), name="my copy", metadata=dict(ours.metadata),  # a user's copy
                                  scale=ours.scale)
    paint(ours, 1, (int(ours.data[1, 20, 20]) + 1) % 3)
    before = ours.data.copy()
    asked = []
    monkeypatch.setattr(_dialogs, "ask_edit_choice", lambda *a: asked.append(a[2]) or KEEP)

    # Another seed on the current slice (4): only slice 4 of our consensus changes.
    widget.seed_spin.setValue(7)
    widget.steps_spin.setValue(3)
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("current"))
    viewer.dims.set_point(viewer.dims.ndim - 3, layer.data_to_world((4, 0, 0))[0])
    assert click_segment(qtbot, widget) == "done"
    assert result_layers(viewer, "consensus") == [ours] and asked == []
    np.testing.assert_array_equal(np.delete(ours.data, 4, axis=0), np.delete(before, 4, axis=0))
    assert not np.array_equal(ours.data[4], before[4])
    assert "Updated slice(s) 4 of the existing result layers; the other slices are untouched" in widget.status.text()
    (steps,) = result_layers(viewer, "steps")
    assert steps.data.shape == (3, 1, 45, 38)                       # the x̂0 layer shows the latest run
    assert users.data.max() == 0 and duplicate in viewer.layers and users in viewer.layers

    # A run over the edited slice asks; "keep my edits" leaves it as painted.
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("range"))
    widget.range_edit.setText("0-2")
    assert click_segment(qtbot, widget) == "done"
    assert asked == [[1]]
    np.testing.assert_array_equal(ours.data[1], before[1])


def test_a_second_segment_reuses_the_loaded_model(make_napari_viewer, qtbot, scan, tiny_checkpoint, monkeypatch):
    from medconddiff.segmenter import Segmenter

    loads = []
    original = Segmenter.from_checkpoint.__func__
    monkeypatch.setattr(Segmenter, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or original(cls, *a, **k)))
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, tiny_checkpoint, steps=2, slices="current")
    assert click_segment(qtbot, widget) == "done"
    assert click_segment(qtbot, widget) == "done"
    assert loads == [str(Path(tiny_checkpoint).resolve())]


def test_a_2d_image_is_one_slice(make_napari_viewer, qtbot, liver_volume, tiny_checkpoint):
    image = liver_volume[0][::-1, ::-1, 3:4].copy()
    data, kwargs = volume_to_layer(image, VolumeMeta(affine=AFFINE, spacing=(0.6, 0.7, 4.0), original_ndim=2))
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, (data, kwargs), name="slice")
    assert layer.ndim == 2 and layer.axis_labels == ("A→P", "R→L")
    choose(widget, tiny_checkpoint, steps=2, slices="current")
    assert click_segment(qtbot, widget) == "done"
    steps, consensus = viewer.layers["slice x̂0 (2 steps)"], viewer.layers["slice consensus"]
    assert steps.data.shape == (2, 45, 38) and consensus.data.shape == (64, 64)
    assert consensus.data.any()
    # Model pixel (p, q) in layer order (P, L) is centred on scan pixel (p + 0.5) 64 / 45 - 0.5 along A, counted
    # from the other side (the layer runs A → P), and likewise along R → L.
    for p, q in [(0, 0), (44, 37), (10, 20)]:
        expected = (63 - (((44 - p) + 0.5) * 64 / 45 - 0.5), 63 - (((37 - q) + 0.5) * 64 / 38 - 0.5))
        np.testing.assert_allclose(steps.data_to_world((1, p, q))[1:], layer.data_to_world(expected), atol=1e-6)


def test_more_channels_feed_a_multichannel_model(make_napari_viewer, qtbot, scan, two_channel_checkpoint,
                                                 tiny_checkpoint, notifications):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    # One CT and a one-channel model: no empty More channels box; a layer to tick, or a model that needs one, shows it.
    assert widget.channels_list.isHidden() and widget.channels_label.isHidden()
    choose(widget, two_channel_checkpoint, steps=2)
    assert not widget.channels_list.isHidden() and widget.channels_list.count() == 0
    choose(widget, tiny_checkpoint, steps=2)
    assert widget.channels_list.isHidden()
    data, kwargs = scan
    negative = viewer.add_image(-np.array(data), name="negative", **{**kwargs, "metadata": dict(kwargs["metadata"])})
    assert not widget.channels_list.isHidden() and not widget.channels_label.isHidden()
    choose(widget, two_channel_checkpoint, steps=2)
    # What the model expects is said before any run: in the model status and on the list.
    expected = "This model takes 2 channels: FLAIR, T1. The Image is FLAIR; tick T1 under More channels, in this order."
    assert expected in widget.model_status.text() and expected in widget.channels_list.toolTip()
    listed = lambda: [widget.channels_list.item(r).text() for r in range(widget.channels_list.count())]  # noqa: E731
    assert listed() == ["negative"] and widget.selected_channels() == ()      # the Image itself is not listed
    # A long name (a DICOM series' part) stays a visible, tickable row, shortened, not a scroll bar.
    negative.name = "series 9 'MR brain dual echo (enhanced conversion, 2 echoes)' (echo 2)"
    qtbot.waitUntil(lambda: listed() == [negative.name], timeout=5000)
    channels = widget.channels_list
    rect = channels.visualItemRect(channels.item(0))
    assert not channels.horizontalScrollBar().isVisible() and channels.viewport().rect().contains(rect.center())
    assert channels.item(0).toolTip() == negative.name
    negative.name = "negative"
    qtbot.waitUntil(lambda: listed() == ["negative"], timeout=5000)

    click(qtbot, widget.segment_button)               # nothing ticked: one clear message, no run
    message = "the model expects 2 channels (FLAIR, T1): pick 1 more layer under More channels"
    assert notifications.messages("error") == [f"MedCondDiff: {message}"]
    assert widget.status.text() == f"Failed: {message}" and widget.runs_started == 0

    widget.set_channels(["negative"])
    assert widget.selected_channels() == (negative,)
    assert click_segment(qtbot, widget) == "done"
    assert notifications.messages("error") == [f"MedCondDiff: {message}"]
    consensus = viewer.layers["liver consensus"]      # the results belong to the Image layer
    assert consensus.data.shape == layer.data.shape and consensus.data.any()
    np.testing.assert_allclose(consensus.scale, layer.scale)
    results = widget.controller.current
    assert (results.scan.unique_id, results.channels[0].layer.unique_id) == (layer.unique_id, negative.unique_id)

    # Ticked layers are channels 1, 2, … in list order; a new layer comes last, unticked.
    third = viewer.add_image(np.array(data), name="third", **{**kwargs, "metadata": dict(kwargs["metadata"])})
    assert listed() == ["negative", "third"] and widget.selected_channels() == (negative,)
    widget.set_channels(["third", "negative"])
    assert listed() == ["third", "negative"] and widget.selected_channels() == (third, negative)
    widget.layer_combo.native.setCurrentText("negative")     # another Image: it leaves the list, the old one joins
    assert listed() == ["third", "liver"]
    widget.layer_combo.native.setCurrentText("liver")

    choose(widget, tiny_checkpoint, steps=2)          # a one-channel model with channels ticked
    assert "This model takes one channel (CT): tick none." in widget.channels_list.toolTip()
    click(qtbot, widget.segment_button)
    assert notifications.messages("error")[-1] == "MedCondDiff: this model takes one channel; untick More channels"
    assert widget.runs_started == 1


# ----------------------------------------------------------------------------- fine-tuning


def test_correct_finetune_resegment_export(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint, tmp_path,
                                           monkeypatch, notifications):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan_1mm)
    choose(widget, tiny_checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    consensus = viewer.layers["liver consensus"]
    paint(consensus, 1, 1)
    paint(consensus, 2, 3, size=10)                # a label the model does not know: a new class
    qtbot.waitUntil(lambda: widget.ft_edited_label.text() == "Edited slices: 1–2", timeout=5000)
    table = widget.class_table
    assert [table.item(r, 1).text() for r in range(table.rowCount())] == ["background", "liver", "tumour", "class_3"]
    table.item(3, 1).setText("lesion")            # the user names the new class
    assert widget.ft_steps_spin.text() == "auto"   # the engine's default, which the tooltip states
    from medconddiff.finetune_steps import finetune_steps_rule
    assert f"auto: {finetune_steps_rule()}" in widget.ft_steps_spin.toolTip()
    widget.ft_steps_spin.setValue(2)
    kinds = widget.ft_kind_combo
    assert [kinds.itemData(i) for i in range(kinds.count())] == ["model", "CT", "MRI", "other"]
    assert kinds.currentText() == "as the model (CT)"
    kinds.setCurrentIndex(kinds.findData("other"))     # "Scan is: other": z-scored, not clipped to HU
    before = consensus.data.copy()

    chosen = tmp_path / "liver_finetuned.safetensors"
    offered = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: offered.append(a[2]) or (str(chosen), ""))
    with qtbot.waitSignals([widget.finetune_finished, widget.run_finished], timeout=RUN_TIMEOUT_MS):
        click(qtbot, widget.finetune_button)
    assert notifications.messages("error") == []
    # A class the trained slices do not show is named in a warning (the model would stop predicting it).
    shown = set(np.unique(before[1:3]).tolist())
    absent = [name for k, name in enumerate(("liver", "tumour", "lesion"), 1) if k not in shown]
    warned = [m for m in notifications.messages("warning") if "on no training slice" in m]
    assert len(warned) == (1 if absent else 0) and all(repr(name) in warned[0] for name in absent)
    assert widget.ft_progress.value() == widget.ft_progress.maximum() == 2
    # The model is saved where the user chose, added to the model menu under its name, and selected.
    assert chosen.is_file() and widget.model_combo.currentText() == "liver_finetuned"
    assert widget.model_combo.currentData() == str(chosen)
    from medconddiff.checkpoint import load_checkpoint

    assert load_checkpoint(chosen).config.plan.intensity == ("zscore",)
    assert kinds.itemText(0) == "as the model (image)"   # the selected model is now the fine-tuned one
    # The other slices were re-segmented with it; the corrected slices are as the user left them.
    runs = widget.controller.current.runs
    assert runs[-1].slice_indices.tolist() == [0, 3, 4, 5] and runs[-1].provenance["checkpoint"] == str(chosen)
    np.testing.assert_array_equal(consensus.data[1:3], before[1:3])
    assert list(consensus.features["class"]) == ["background", "liver", "tumour", "lesion"]
    assert "lesion" in widget.legend.text()

    target = tmp_path / "liver_seg.nii.gz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    click(qtbot, widget.export_button)
    sidecar = json.loads((tmp_path / "liver_seg.json").read_text())
    assert sidecar["class_names"][-1] == "lesion" and sidecar["class_volumes"]["lesion"]["voxels"] > 0
    assert sidecar["edited_slices"] == [1, 2]


def test_fine_tuning_on_slices_that_show_no_tumour_warns_that_the_model_will_forget_it(
        make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint, tmp_path, monkeypatch, notifications):
    viewer, _, widget = open_viewer(make_napari_viewer, qtbot, scan_1mm)
    choose(widget, tiny_checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    consensus = viewer.layers["liver consensus"]
    paint(consensus, 1, 1, size=400, at=(32, 32))        # the whole slice painted liver: no tumour on it
    assert set(np.unique(consensus.data[1]).tolist()) == {1}
    widget.ft_steps_spin.setValue(1)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "ft.safetensors"), ""))
    with qtbot.waitSignals([widget.finetune_finished, widget.run_finished], timeout=RUN_TIMEOUT_MS):
        click(qtbot, widget.finetune_button)
    warned = [m for m in notifications.messages("warning") if "on no training slice" in m]
    assert len(warned) == 1 and "'tumour'" in warned[0] and "'liver'" not in warned[0]


def segmented_with_slice_2_edited(make_napari_viewer, qtbot, scan, checkpoint):
    """The scan segmented in 2 steps and slice 2 painted: ready to fine-tune."""
    viewer, _, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    paint(viewer.layers["liver consensus"], 2, 1)
    qtbot.waitUntil(lambda: widget.ft_edited_label.text() == "Edited slices: 2", timeout=5000)
    return viewer, widget


def test_cancelling_finetuning_keeps_the_weights_and_the_ui_usable(make_napari_viewer, qtbot, scan_1mm,
                                                                    tiny_checkpoint, tmp_path, monkeypatch):
    viewer, widget = segmented_with_slice_2_edited(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint)
    widget.ft_steps_spin.setValue(200)
    chosen = tmp_path / "stopped.safetensors"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(chosen), ""))
    offered = []
    monkeypatch.setattr(_dialogs, "ask_save_cancelled_finetune",
                        lambda parent, done, total, path: offered.append((done, total, path)) or True)

    def cancel_once_running(step):
        if step >= 1 and widget.ft_cancel_button.isEnabled():
            click(qtbot, widget.ft_cancel_button)

    widget.ft_progress.valueChanged.connect(cancel_once_running)
    with qtbot.waitSignal(widget.finetune_finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.finetune_button)
    assert finished.args == ["cancelled"]
    done, total, path = offered[0]
    assert 1 <= done < total == 200 and path == chosen and chosen.is_file()
    assert widget.model_combo.currentData() == str(chosen)
    assert len(widget.controller.current.runs) == 1        # a cancelled fine-tuning re-segments nothing
    assert widget.segment_button.isEnabled() and widget.finetune_button.isEnabled()
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("range"))
    widget.range_edit.setText("5")
    assert click_segment(qtbot, widget) == "done"          # the saved weights segment


def test_a_fine_tuned_model_that_cannot_be_saved_is_saved_to_another_file_the_user_names(
        make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint, tmp_path, monkeypatch):
    viewer, widget = segmented_with_slice_2_edited(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint)
    widget.ft_steps_spin.setValue(2)
    widget.ft_resegment_check.setChecked(False)
    first, other = tmp_path / "ft.safetensors", tmp_path / "elsewhere.safetensors"
    names = [str(first), str(other)]        # the Fine-tune button's save dialog, then the one offered after the failure
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (names.pop(0), ""))
    warned = []
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: warned.append(a[2]) or QMessageBox.StandardButton.Save)
    monkeypatch.setattr(_dialogs, "ask_save_finetuned_elsewhere", ASK_SAVE_FINETUNED_ELSEWHERE)
    # Another program writes the chosen file while the model trains.
    widget.ft_progress.valueChanged.connect(lambda step: step >= 1 and not first.exists() and first.write_bytes(b"x"))
    with qtbot.waitSignal(widget.finetune_finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.finetune_button)
    assert finished.args == ["done"]
    assert first.read_bytes() == b"x" and other.is_file()          # neither replaced nor lost
    assert len(warned) == 1 and "still in memory" in warned[0] and f"{first.name} exists" in warned[0]
    assert str(first.parent) not in warned[0]                        # the file by name, not its folder
    assert widget.model_combo.currentData() == str(other)


# ----------------------------------------------------------------------------- stopping a run


def test_cancel_keeps_finished_slices(make_napari_viewer, qtbot, scan, tiny_checkpoint, monkeypatch, notifications):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, tiny_checkpoint, steps=3)
    release = gate_after_first_batch(monkeypatch)

    def cancel_after_first_batch(value):
        if value >= 1 and widget.cancel_button.isEnabled():
            click(qtbot, widget.cancel_button)
            release.set()

    widget.progress.valueChanged.connect(cancel_after_first_batch)
    assert click_segment(qtbot, widget) == "cancelled"
    (run,) = widget.controller.current.runs
    # CPU batches hold 4 slices: the first batch is kept, the run stopped before finishing the second.
    assert run.completed.tolist() == [True] * _job.CPU_BATCH_SIZE + [False] * (6 - _job.CPU_BATCH_SIZE)
    consensus = viewer.layers["liver consensus"]
    assert consensus.data[:_job.CPU_BATCH_SIZE].any() and not consensus.data[_job.CPU_BATCH_SIZE:].any()
    steps = viewer.layers["liver x̂0 (3 steps)"]
    assert not steps.data[:, _job.CPU_BATCH_SIZE:].any()
    assert "Cancelled: kept 4 of 6" in widget.status.text()
    assert notifications.messages("error") == []
    assert widget.segment_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_removing_the_input_layer_stops_the_run(make_napari_viewer, qtbot, scan, tiny_checkpoint, monkeypatch,
                                                notifications):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, tiny_checkpoint, steps=3)
    release = gate_after_first_batch(monkeypatch)

    def remove_scan(value):
        if value >= 1 and layer in viewer.layers:
            viewer.layers.remove(layer)
            release.set()

    widget.progress.valueChanged.connect(remove_scan)
    assert click_segment(qtbot, widget) == "input layer removed"
    assert widget.controller.current.runs[0].completed.sum() == _job.CPU_BATCH_SIZE
    qtbot.waitUntil(lambda: any("was removed" in m for m in notifications.messages("warning")), timeout=5000)
    assert notifications.messages("error") == []
    assert len(result_layers(viewer, "consensus")) == 1
    assert widget.layer_combo.native.count() == 0


def test_closing_the_viewer_mid_run_stops_the_worker_quietly(make_napari_viewer, qtbot, scan, tiny_checkpoint,
                                                              monkeypatch, notifications):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, tiny_checkpoint, steps=3)
    release = gate_after_first_batch(monkeypatch)
    closed = []

    def close_viewer_soon(value):
        # Like a click on the window's close button: from the event loop, not from inside our own slot.
        if value >= 1 and not closed:
            closed.append(True)
            QTimer.singleShot(0, close_and_release)

    def close_and_release():
        viewer.close()
        release.set()

    widget.progress.valueChanged.connect(close_viewer_soon)
    click(qtbot, widget.segment_button)
    qtbot.waitUntil(lambda: release.is_set(), timeout=RUN_TIMEOUT_MS)
    assert QThreadPool.globalInstance().waitForDone(RUN_TIMEOUT_MS)
    qtbot.wait(50)   # let queued signals arrive: they must find nothing to do and raise nothing
    assert notifications.messages("error") == []
    assert notifications.messages("warning") == []      # no "layer was removed": the user closed napari


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_become_notifications_and_status(make_napari_viewer, qtbot, scan, tiny_checkpoint, tmp_path,
                                                    notifications):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    qtbot.waitUntil(lambda: widget.controller.engine is not None, timeout=RUN_TIMEOUT_MS)
    choose(widget, tiny_checkpoint)

    click(qtbot, widget.segment_button)            # no image layer
    assert "open a scan first" in notifications.messages("error")[-1]
    assert widget.status.text().startswith("Failed: open a scan first")

    viewer.add_image(np.zeros((2, 3, 16, 16), np.float32), name="timeseries")
    widget.layer_combo.native.setCurrentText("timeseries")
    click(qtbot, widget.segment_button)
    assert "4-D" in notifications.messages("error")[-1] and "4-D" in widget.status.text()

    viewer.add_image(np.zeros((16, 16, 3), np.uint8), name="photo", rgb=True)
    widget.layer_combo.native.setCurrentText("photo")
    click(qtbot, widget.segment_button)
    assert "RGB" in notifications.messages("error")[-1] and "RGB" in widget.status.text()
    assert widget.runs_started == 0

    data, kwargs = scan
    viewer.add_image(data, name="liver", **kwargs)
    widget.layer_combo.native.setCurrentText("liver")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    widget.checkpoint_edit.setText(str(garbage))
    assert click_segment(qtbot, widget) == "failed"
    assert "garbage.safetensors" in notifications.messages("error")[-1]
    assert result_layers(viewer, "consensus") == []

    widget.checkpoint_edit.setText(str(tmp_path / "missing.safetensors"))
    click(qtbot, widget.segment_button)
    assert "checkpoint not found" in notifications.messages("error")[-1]
    assert "checkpoint not found" in widget.status.text()

    choose(widget, tiny_checkpoint, slices="range", first=4, last=9)               # beyond the 6 slices
    assert click_segment(qtbot, widget) == "failed"
    assert "slice(s) 6–9 are outside the 6 slices of this axial scan (0 to 5)" in notifications.messages("error")[-1]

    widget.model_combo.setCurrentText(widget_module.DEFAULT_MODEL)
    if not widget.controller.engine.default_checkpoint_exists:
        assert "not installed yet" in widget.model_status.text()
        click(qtbot, widget.segment_button)
        assert "not installed yet" in notifications.messages("error")[-1]
    assert not widget.cancel_button.isEnabled() and widget.segment_button.isEnabled()
    assert not widget.export_button.isEnabled() and not widget.uncertain_button.isEnabled()


# ----------------------------------------------------------------------------- how it looks


def test_every_control_explains_itself_and_nothing_is_clipped(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    qtbot.waitUntil(lambda: widget.controller.engine is not None, timeout=RUN_TIMEOUT_MS)
    controls = [w for kind in (QComboBox, QSpinBox, QLineEdit, QAbstractButton, QTableWidget, QProgressBar,
                               QListWidget)
                for w in widget.findChildren(kind) if not isinstance(w.parent(), (QComboBox, QSpinBox))]
    # Qt's own parts of a table (its corner button) are not controls of ours.
    controls = [w for w in controls if not widget.class_table.isAncestorOf(w)]
    assert len(controls) > 20
    assert [w for w in controls if not w.toolTip()] == []
    # No label-less row shows an empty label; the checkpoint row spans the form when it is shown.
    for form in widget.findChildren(QFormLayout):
        for row in range(form.rowCount()):
            label = form.itemAt(row, QFormLayout.ItemRole.LabelRole)
            assert label is None or label.widget().text().strip()
    # The checkpoint-file row shows only while "Checkpoint file…" is the model.
    assert widget.model_combo.currentText() != widget_module.CHECKPOINT_FILE
    assert widget.checkpoint_row.isHidden()
    widget.model_combo.setCurrentText(widget_module.CHECKPOINT_FILE)
    assert not widget.checkpoint_row.isHidden()
    # A short dock scrolls: the status wraps inside a scroll area.
    assert widget.status.wordWrap() and isinstance(widget.findChild(QScrollArea), QScrollArea)
    for control in (widget.slice_combo, widget.range_edit, widget.ft_slices_edit):
        assert "canonical slices" in control.toolTip() and "inferior to superior" in control.toolTip()


# ----------------------------------------------------------------------------- no Qt needed


def test_widget_module_does_not_import_torch():
    import subprocess
    import sys

    # Every module of the plugin: torch only in workers, and never the command line's modules.
    code = ("import sys, pkgutil, importlib, napari_medconddiff; "
            "[importlib.import_module('napari_medconddiff.' + m.name) for m in pkgutil.iter_modules("
            "napari_medconddiff.__path__)]; "
            "print(sorted(m for m in ('torch', 'timm', 'triton', 'medconddiff.segmenter', 'medconddiff.commands', "
            "'medconddiff.cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.filterwarnings("ignore:Non-orthogonal slicing")
def test_overlay_transform_follows_rotated_and_sheared_layers():
    from napari.layers import Image

    scan_layer = Image(np.zeros((6, 40, 50), np.float32), scale=(4.0, 0.7, 0.6), translate=(10, -3, 2),
                       rotate=(15, 5, -10), shear=(0.1, 0.0, 0.2), affine=np.diag([1.0, 2.0, 1.0, 1.0]))
    # A 5× smaller model grid (align_corners=False: pixel p is centred on scan pixel 5p + 2), from slice 3.
    kwargs = stack_overlay_kwargs(scan_layer, (1.0, 5.0, 5.0), (3.0, 2.0, 2.0), step_axis_label="s")
    steps = Image(np.zeros((3, 2, 8, 10), np.float32), **kwargs)
    for voxel in [(0, 0, 0), (1, 7, 9), (0, 3, 4)]:
        scan_voxel = (3 + voxel[0], 5 * voxel[1] + 2, 5 * voxel[2] + 2)
        np.testing.assert_allclose(steps.data_to_world((2,) + voxel)[1:], scan_layer.data_to_world(scan_voxel),
                                   atol=1e-9)


def test_the_bundled_lsegdiff_model_runs_from_the_model_menu(make_napari_viewer, qtbot, scan_1mm, notifications):
    """The latent family is selectable in the widget and gives the same layers as the pixel family."""
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan_1mm)
    assert widget.model_combo.findText(widget_module.LATENT_MODEL) >= 0
    widget.model_combo.setCurrentText(widget_module.LATENT_MODEL)
    assert "LSegDiff" in widget.model_status.text()
    widget.steps_spin.setValue(2)
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("all"))
    assert click_segment(qtbot, widget) == "done"
    assert notifications.messages("error") == []
    run = widget.controller.current.runs[0]
    assert run.provenance["model"]["family"] == "latent"
    consensus = viewer.layers["liver consensus"]
    assert consensus.data.shape == layer.data.shape and consensus.data.max() < 3
    # Its recorded consensus is the one-shot forward, with one diffusion step beside it for the uncertainty.
    assert run.sampling.consensus == "one_shot" and run.one_shot is not None and set(run.steps_used) == {1}
    assert viewer.layers["liver x̂0 (adaptive: 1 of 2 steps)"].data.shape == (2, 6, 64, 64)   # 1 mm scan and plan
    assert "one-shot forward" in widget.status.text()
    # On this real liver cut, the trained model finds liver.
    assert (consensus.data == 1).mean() > 0.2


def test_adaptive_steps_show_each_stopped_slice_at_its_last_step(make_napari_viewer, qtbot, scan_1mm,
                                                                 tiny_checkpoint):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan_1mm)
    choose(widget, tiny_checkpoint, steps=8)
    widget.adaptive_check.setChecked(True)
    widget.precision_combo.setCurrentText("bf16")    # the user asks for bf16 arithmetic on the CPU
    assert click_segment(qtbot, widget) == "done"
    (results,) = widget.controller.results.values()
    run = results.runs[-1]
    assert run.sampling.adaptive and (run.steps_used < 8).any() and run.steps_used.min() >= 3
    assert run.sampling.precision == "bf16" and run.provenance["arithmetic"] == "bf16"
    steps = next(candidate for candidate in viewer.layers if "x̂0" in candidate.name)
    low, high = int(run.steps_used.min()), int(run.steps_used.max())
    said = f"{low} of 8 steps" if low == high else f"{low}–{high} of 8 steps, mean {run.steps_used.mean():.1f}"
    assert f"adaptive: {said}" in steps.name
    # A 1 mm RAS scan is shown (S, P, L): the x̂0 stack's second axis is the canonical slice.
    for slice_index, used in zip(run.slice_indices, run.steps_used):
        for later in range(used, 8):
            np.testing.assert_array_equal(steps.data[later, slice_index], steps.data[used - 1, slice_index])


# ----------------------------------------------------------------------------- issue 19: what a new user meets


def test_the_progress_bar_shows_no_invented_count_before_a_run(make_napari_viewer, qtbot, scan, tiny_checkpoint):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    assert widget.progress.text() == ""          # not "0 / 100 slices" for a 6-slice scan
    choose(widget, tiny_checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    assert widget.progress.text() == "6 / 6 slices"


def test_scan_is_defaults_to_mri_for_a_scan_with_no_voxel_below_zero(make_napari_viewer, qtbot, scan_1mm,
                                                                      tiny_checkpoint):
    data, kwargs = scan_1mm
    mri = (data - data.min()) / (data.max() - data.min())          # intensities in [0, 1], as many MRI files hold
    viewer = make_napari_viewer()
    ct = viewer.add_image(np.array(data), name="ct", **kwargs)
    t1 = viewer.add_image(np.array(mri, dtype=np.float32), name="t1",
                          **{**kwargs, "metadata": dict(kwargs["metadata"])})
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    qtbot.waitUntil(lambda: widget.controller.engine is not None, timeout=RUN_TIMEOUT_MS)
    choose(widget, tiny_checkpoint, steps=2)
    kinds = widget.ft_kind_combo
    widget.layer_combo.native.setCurrentText("t1")
    assert widget.selected_layer() is not None and widget.selected_layer().name == "t1"
    assert kinds.currentData() == "MRI"
    assert "no voxel below 0" in kinds.toolTip() and "'t1'" in kinds.toolTip()
    widget.layer_combo.native.setCurrentText("ct")                    # a CT in HU: as the model
    assert kinds.currentData() == "model" and "no voxel below 0" not in kinds.toolTip()
    widget.layer_combo.native.setCurrentText("t1")
    assert click_segment(qtbot, widget) == "done"
    assert kinds.currentData() == "MRI"                               # what fine-tuning would train on
    kinds.setCurrentIndex(kinds.findData("other"))
    kinds.activated.emit(kinds.currentIndex())                        # the user's own choice stays, for t1
    widget.layer_combo.native.setCurrentText("ct")
    assert kinds.currentData() == "model"                             # not for the next scan
    widget.layer_combo.native.setCurrentText("t1")
    assert kinds.currentData() == "other"
    assert ct in viewer.layers and t1 in viewer.layers


def test_the_slice_range_reads_both_syntaxes_the_command_line_reads(make_napari_viewer, qtbot, scan, tiny_checkpoint,
                                                                  notifications):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    from medconddiff.slice_lists import SLICE_SYNTAX

    assert SLICE_SYNTAX in widget.range_edit.toolTip() and SLICE_SYNTAX in widget.ft_slices_edit.toolTip()
    assert "a-b" in widget.range_label.text() and "a:b" in widget.range_label.text()
    choose(widget, tiny_checkpoint, steps=2, slices="range")
    widget.range_edit.setText("1-2, 4")                   # inclusive, as a person counts
    assert click_segment(qtbot, widget) == "done"
    assert widget.controller.current.runs[-1].slice_indices.tolist() == [1, 2, 4]
    widget.range_edit.setText("3:5")                      # half-open, as in Python: 3 and 4
    assert click_segment(qtbot, widget) == "done"
    assert widget.controller.current.runs[-1].slice_indices.tolist() == [3, 4]
    widget.range_edit.setText("4:")                       # to the scan's last slice
    assert click_segment(qtbot, widget) == "done"
    assert widget.controller.current.runs[-1].slice_indices.tolist() == [4, 5]
    runs = widget.runs_started
    for typo, said in (("2 to 4", "cannot read '2 to 4'"), ("5-9", "outside the 6 slices")):
        widget.range_edit.setText(typo)
        click(qtbot, widget.segment_button)
        qtbot.waitUntil(lambda: not widget.controller.busy, timeout=RUN_TIMEOUT_MS)
        assert said in notifications.messages("error")[-1]             # a user's mistake: one line
    # A typo is caught before any run; slices beyond the scan once the model's slicing counts them.
    assert widget.runs_started == runs + 1
    assert widget.controller.current.runs[-1].slice_indices.tolist() == [4, 5]


def test_the_image_menu_tracks_the_viewers_layers_by_itself(make_napari_viewer, qtbot, scan):
    from magicgui.widgets import ComboBox

    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    assert isinstance(widget.layer_combo, ComboBox)
    combo = widget.layer_combo.native

    def names():
        return [combo.itemText(i) for i in range(combo.count())]

    data, kwargs = scan
    viewer.add_image(np.array(data), name="second")
    viewer.add_labels(np.zeros(np.shape(data), np.uint8), name="mask")         # no Image: not offered
    assert names() == ["liver", "second"]
    viewer.layers["second"].name = "renamed"
    assert names() == ["liver", "renamed"]
    viewer.layers.remove("liver")
    assert names() == ["renamed"] and widget.selected_layer().name == "renamed"


CLOSE_RIGHT_AFTER_DOCKING = """
import faulthandler, sys
faulthandler.enable()
import numpy as np
import napari
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=True)
viewer.add_image(np.random.default_rng(0).random((4, 64, 64)).astype("float32"), name="scan")
QApplication.processEvents()
# The engine probe imports torch and timm for seconds; a probe that takes 3 s without them keeps the
# same worker in flight when the window closes, at a fraction of the test's time.
import time
from napari_medconddiff import _controller
_controller.probe_engine = lambda: (time.sleep(3), "a slow probe")[1]
_, widget = viewer.window.add_plugin_dock_widget("napari-medconddiff", "MedCondDiff segmentation")
QApplication.processEvents()
assert widget.controller.engine is None, "the engine probe must still be running for this check"
viewer.close()
print("closed", flush=True)
"""


def test_closing_napari_right_after_docking_exits_cleanly():
    """The engine probe is still running (importing torch) when the window closes: the process must exit
    with 0, not abort on a deleted worker signal. In a subprocess, so an abort fails the test."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-c", CLOSE_RIGHT_AFTER_DOCKING], capture_output=True, text=True,
                             timeout=240, env=env)
    explain = f"exit code {process.returncode}\n{process.stdout[-2000:]}\n{process.stderr[-3000:]}"
    assert process.returncode == 0 and "closed" in process.stdout, explain
    assert "has been deleted" not in process.stderr and "Fatal Python error" not in process.stderr, explain


# ----------------------------------------------------------------------------- closing the dock


def watch_batches(monkeypatch):
    """Hold the worker after each run's first batch until released; (release, held, finished_all) events,
    finished_all set when a run's last batch is done (the worker went on to the end)."""
    from medconddiff.segmenter import SlicesDone

    from napari_medconddiff import _segment_flow

    release, held, finished_all = threading.Event(), threading.Event(), threading.Event()
    original = _segment_flow.iterate_run

    def gated(run):
        for event in original(run):
            if isinstance(event, SlicesDone) and event.completed == event.total:
                finished_all.set()
            yield event
            if isinstance(event, SlicesDone) and event.completed < event.total:
                held.set()
                release.wait(RUN_TIMEOUT_MS / 1000)
        return run.result

    monkeypatch.setattr(_segment_flow, "iterate_run", gated)
    return release, held, finished_all


def test_the_docks_close_button_stops_the_run_and_its_hide_button_does_not(make_napari_viewer, qtbot, scan,
                                                                         tiny_checkpoint, monkeypatch, notifications):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, tiny_checkpoint, steps=2)
    dock = widget.parent()
    release, held, finished_all = watch_batches(monkeypatch)

    # Hidden (the title bar's hide button, as a tab hides it): the run goes on to the end.
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.segment_button)
        qtbot.waitUntil(held.is_set, timeout=RUN_TIMEOUT_MS)
        dock.title.hide_button.click()
        release.set()
    assert finished.args == ["done"] and finished_all.is_set()
    dock.show()

    # Closed (the title bar's ×): the worker stops at its next step; nothing more is written.
    release.clear(), held.clear(), finished_all.clear()
    widget.seed_spin.setValue(7)
    click(qtbot, widget.segment_button)
    qtbot.waitUntil(held.is_set, timeout=RUN_TIMEOUT_MS)
    dock.title.close_button.click()
    release.set()
    assert QThreadPool.globalInstance().waitForDone(RUN_TIMEOUT_MS)
    qtbot.wait(50)
    assert not finished_all.is_set(), "the run went on after its dock was closed"
    viewer.layers.remove(layer)          # the closed widget's controller no longer watches the layers
    qtbot.wait(50)
    assert notifications.messages("warning") == [] and notifications.messages("error") == []


# ----------------------------------------------------------------------------- what status lines name


def test_saving_a_model_and_exporting_name_the_files_not_the_patients_folder(make_napari_viewer, qtbot, scan_1mm,
                                                                            tiny_checkpoint, tmp_path, monkeypatch,
                                                                            notifications):
    viewer, widget = segmented_with_slice_2_edited(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint)
    folder = tmp_path / "DOE^JOHN 1957-03-02"        # scans are often filed under the patient's name
    folder.mkdir()
    statuses = []
    widget.controller.status.connect(statuses.append)
    widget.ft_steps_spin.setValue(2)
    widget.ft_resegment_check.setChecked(False)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(folder / "ft.safetensors"), ""))
    with qtbot.waitSignal(widget.finetune_finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.finetune_button)
    assert finished.args == ["done"]
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        lambda *a, **k: (str(folder / "seg.nii.gz"), widget_module.NIFTI_FILTER))
    click(qtbot, widget.export_button)
    assert (folder / "ft.safetensors").is_file() and (folder / "seg.nii.gz").is_file()
    shown = statuses + notifications.messages()
    assert any("ft.safetensors" in text for text in statuses) and any("seg.nii.gz" in text for text in shown)
    assert [text for text in shown if "DOE" in text] == []


# ----------------------------------------------------------------------------- cancelling before the first step


def held_until(monkeypatch, module, name):
    """Make ``module.name`` (a worker function) wait until the returned event is set."""
    go = threading.Event()
    original = getattr(module, name)

    def held(*args):
        go.wait(RUN_TIMEOUT_MS / 1000)
        return original(*args)

    monkeypatch.setattr(module, name, held)
    return go


def test_cancel_while_the_model_loads_says_it_was_cancelled(make_napari_viewer, qtbot, scan, tiny_checkpoint,
                                                            monkeypatch):
    from napari_medconddiff import _segment_flow

    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, tiny_checkpoint, steps=2)
    go = held_until(monkeypatch, _segment_flow, "prepare_run")
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.segment_button)
        click(qtbot, widget.cancel_button)
        go.set()
    assert finished.args == ["cancelled"]
    assert widget.status.text() == "Cancelled before the model had loaded; nothing was segmented."
    assert widget.segment_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_cancel_while_fine_tuning_prepares_says_it_was_cancelled(make_napari_viewer, qtbot, scan_1mm,
                                                                 tiny_checkpoint, tmp_path, monkeypatch):
    from napari_medconddiff import _finetune_flow

    viewer, widget = segmented_with_slice_2_edited(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint)
    widget.ft_steps_spin.setValue(2)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "ft.safetensors"), ""))
    go = held_until(monkeypatch, _finetune_flow, "prepare_finetune")
    with qtbot.waitSignal(widget.finetune_finished, timeout=RUN_TIMEOUT_MS) as finished:
        click(qtbot, widget.finetune_button)
        click(qtbot, widget.ft_cancel_button)
        go.set()
    assert finished.args == ["cancelled"]
    assert widget.status.text() == "Cancelled before fine-tuning began; no model was trained or saved."
    assert not (tmp_path / "ft.safetensors").exists() and widget.finetune_button.isEnabled()


# ----------------------------------------------------------------------------- export names what the user named


def test_a_class_painted_and_named_in_the_table_is_exported_under_that_name(make_napari_viewer, qtbot, liver_volume,
                                                                             tiny_checkpoint, tmp_path, monkeypatch):
    import pydicom

    from tests.dicom_helpers import write_series

    write_series(tmp_path / "series", liver_volume[0], np.diag([0.7, 0.8, 2.5, 1.0]), series_number=3,
                 description="CT")
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "series"), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    qtbot.waitUntil(lambda: widget.controller.engine is not None, timeout=RUN_TIMEOUT_MS)
    choose(widget, tiny_checkpoint, steps=2)
    assert click_segment(qtbot, widget) == "done"
    paint(result_layers(viewer, "consensus")[0], 2, 3)               # a new class, label 3 …
    qtbot.waitUntil(lambda: widget.class_table.rowCount() == 4, timeout=5000)
    widget.class_table.item(3, 1).setText("lesion")                  # … named in the class table
    for name, chosen_filter in (("seg.dcm", widget_module.DICOM_SEG_FILTER), ("seg2.nii.gz", widget_module.NIFTI_FILTER)):
        monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, n=name, f=chosen_filter: (str(tmp_path / n), f))
        click(qtbot, widget.export_button)
        assert widget.status.text().startswith("Exported"), widget.status.text()
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert "lesion" in [item.SegmentLabel for item in seg.SegmentSequence]
    for sidecar in (json.loads((tmp_path / name).read_text()) for name in ("seg.json", "seg2.json")):
        assert sidecar["class_names"] == ["background", "liver", "tumour", "lesion"]
        assert "lesion" in sidecar["class_volumes"]
