"""The dock widget, driven the way a user drives it: real scan, tiny model, clicks, napari's viewer.

Runs under pytest-xvfb. A tiny random model at 64², 2–3 steps (20 for the responsiveness check) and a
64×64×6 cut of the real liver CT keep every run to about a second of diffusion on CPU. The viewer is
not shown (make_napari_viewer's default), so the responsiveness check measures the widget's own work
on the GUI thread, not software OpenGL rendering.
"""

from __future__ import annotations

import json
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from qtpy.QtCore import Qt, QThreadPool, QTimer
from qtpy.QtWidgets import QFileDialog, QMessageBox

from medconddiff.config import CONSENSUS_METHODS
from medconddiff.nifti import VolumeMeta
from napari_medconddiff import _job, _result_layers
from napari_medconddiff import _widget as widget_module
from napari_medconddiff._geometry import stack_overlay_kwargs, stack_to_layer_order
from napari_medconddiff._layers import layer_to_volume, volume_to_layer

PLUGIN = "napari-medconddiff"
WIDGET_NAME = "MedCondDiff segmentation"
RUN_TIMEOUT_MS = 60_000
HEARTBEAT_STEPS = 20     # long enough a run (about a second on CPU) to measure the GUI's responsiveness
# A real scanner affine: flipped in-plane axes, 4 mm slices, an origin far from 0.
AFFINE = np.array([[-0.6, 0.0, 0.0, 90.0], [0.0, -0.7, 0.0, 110.0], [0.0, 0.0, 4.0, -50.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def scan(liver_volume):
    """Layer data + kwargs of the 64×64×6 liver cut, as the reader would give them."""
    image, _ = liver_volume
    data, kwargs = volume_to_layer(image, VolumeMeta(affine=AFFINE, spacing=(0.6, 0.7, 4.0)))
    return data, kwargs


@pytest.fixture(autouse=True)
def _no_worker_left_running():
    yield
    assert QThreadPool.globalInstance().waitForDone(RUN_TIMEOUT_MS), "a worker thread did not stop"


@pytest.fixture
def notifications():
    """Notifications dispatched during the test (napari's manager keeps every record)."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)

    class Recorded:
        def messages(self, severity: str | None = None) -> list[str]:
            return [str(n.message) for n in notification_manager.records[start:]
                    if severity is None or str(n.severity) == severity]

    return Recorded()


def open_viewer(make_napari_viewer, qtbot, scan, name="liver"):
    viewer = make_napari_viewer()
    data, kwargs = scan
    layer = viewer.add_image(data.copy(), name=name, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    assert isinstance(widget, widget_module.SegmentWidget)
    qtbot.waitUntil(lambda: widget._engine is not None, timeout=RUN_TIMEOUT_MS)
    return viewer, layer, widget


def choose(widget, checkpoint, steps=3, slices="all", first=0, last=0):
    """Set the controls as a user would."""
    widget.model_combo.setCurrentText(widget_module.CHECKPOINT_FILE)
    widget.checkpoint_edit.setText(str(checkpoint))
    widget.steps_spin.setValue(steps)
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData(slices))
    widget.first_spin.setValue(first)
    widget.last_spin.setValue(last)


def click_segment(qtbot, widget) -> str:
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as finished:
        qtbot.mouseClick(widget.segment_button, Qt.MouseButton.LeftButton)
    return finished.args[0]


def result_layers(viewer, role):
    return [layer for layer in viewer.layers
            if _result_layers.is_own_result(layer) and _result_layers.marker(layer)["role"] == role]


def gate_after_first_batch(monkeypatch):
    """Hold the worker after the first finished batch until the test releases it (deterministic timing)."""
    from medconddiff.segmenter import SlicesDone

    release = threading.Event()
    original = widget_module.iterate_run

    def gated(run):
        for event in original(run):
            yield event
            if isinstance(event, SlicesDone) and event.completed < event.total:
                release.wait(RUN_TIMEOUT_MS / 1000)
        return run.result

    monkeypatch.setattr(widget_module, "iterate_run", gated)
    return release


# ----------------------------------------------------------------------------- the main flow


def test_segment_adds_aligned_layers_and_keeps_the_gui_responsive(make_napari_viewer, qtbot, scan, tiny_checkpoint,
                                                                   notifications):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    layer.translate = (8.0, -5.0, 3.0)          # a user-moved layer: results must follow it
    choose(widget, tiny_checkpoint, steps=HEARTBEAT_STEPS)

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
    result = widget._session.result
    assert result.is_complete and widget.progress.value() == widget.progress.maximum() == 6

    steps = viewer.layers[f"liver x̂0 ({HEARTBEAT_STEPS} steps)"]
    consensus = viewer.layers["liver consensus"]
    uncertainty = viewer.layers["liver uncertainty"]
    assert [type(x).__name__ for x in (steps, consensus, uncertainty)] == ["Labels", "Labels", "Image"]
    # Step axis first, then the scan's slider axis (6 slices), then the model's 64×64 plane.
    assert steps.data.shape == (HEARTBEAT_STEPS, 6, 64, 64) and steps.data.dtype == np.uint8
    assert consensus.data.shape == layer.data.shape and consensus.data.dtype == np.uint8
    assert uncertainty.data.shape == layer.data.shape and uncertainty.data.dtype == np.float32
    assert steps.data.max() < 3 and consensus.data.max() < 3
    assert 0.0 <= uncertainty.data.min() and uncertainty.data.max() <= 1.0 and uncertainty.data.max() > 0
    assert uncertainty.colormap.name in ("inferno", "magma") and uncertainty.blending == "additive"
    assert tuple(uncertainty.contrast_limits) == (0.0, 1.0)
    assert list(consensus.features["class"]) == ["background", "liver", "tumour"]
    assert "liver" in widget.legend.text() and "tumour" in widget.legend.text()
    # The layers hold exactly the result, in the layer's axis order.
    np.testing.assert_array_equal(consensus.data, np.moveaxis(result.labels, -1, 0))
    np.testing.assert_allclose(uncertainty.data, np.moveaxis(result.uncertainty, -1, 0))
    np.testing.assert_array_equal(steps.data, stack_to_layer_order(result.step_labels, 2, 3))

    # Alignment: same transform as the scan; the 64² model grid covers the 64² scan exactly.
    for result_layer in (consensus, uncertainty):
        np.testing.assert_allclose(result_layer.scale, layer.scale)
        np.testing.assert_allclose(result_layer.translate, layer.translate)
    for voxel in [(0, 0, 0), (5, 63, 10), (2, 31.5, 40)]:
        np.testing.assert_allclose(steps.data_to_world((1,) + voxel)[1:], layer.data_to_world(voxel), atol=1e-6)

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
        z = viewer.dims.current_step[1]
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

    # Re-fuse from the kept trajectory: the layers change, no diffusion runs.
    other = next(m for m in CONSENSUS_METHODS if m == "last")
    with qtbot.waitSignal(widget.consensus_updated, timeout=RUN_TIMEOUT_MS):
        widget.consensus_combo.setCurrentText(other)
    assert widget.runs_started == runs
    expected = widget._session.result
    assert expected.sampling.consensus == "last"
    np.testing.assert_array_equal(consensus.data, np.moveaxis(expected.labels, -1, 0))
    assert not (np.array_equal(consensus.data, before[0]) and np.array_equal(uncertainty.data, before[1]))
    with qtbot.waitSignal(widget.consensus_updated, timeout=RUN_TIMEOUT_MS):
        widget.skip_spin.setValue(1)
    assert widget._session.result.sampling.skip_first == 1 and widget.runs_started == runs

    # Most uncertain slice: the slider moves to the slice with the highest mean uncertainty.
    index, value = widget.most_uncertain_slice()
    per_slice = uncertainty.data.mean(axis=(1, 2))
    assert index == int(np.argmax(per_slice)) and value == pytest.approx(per_slice.max(), rel=1e-5)
    qtbot.mouseClick(widget.uncertain_button, Qt.MouseButton.LeftButton)
    assert viewer.dims.current_step[-3] == index

    # Export the hand-edited consensus: labels with the scan's affine, plus a sidecar.
    first_edit = (int(consensus.data[0, 0, 0]) + 1) % 3
    consensus.data[0, :3, :3] = first_edit
    target = tmp_path / "liver_seg.nii.gz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    qtbot.mouseClick(widget.export_button, Qt.MouseButton.LeftButton)
    saved = nib.load(str(target))
    np.testing.assert_allclose(saved.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), layer_to_volume(consensus.data)[0])
    sidecar = json.loads((tmp_path / "liver_seg.json").read_text())
    assert sidecar["edited_in_napari"] is True and sidecar["sampling"]["consensus"] == "last"
    assert sidecar["class_names"] == ["background", "liver", "tumour"] and sidecar["checkpoint_sha256"]
    assert notifications.messages("error") == []

    # A file the save dialog did not ask about (the sidecar) is only replaced after a yes.
    stamp = (tmp_path / "liver_seg.json").stat().st_mtime_ns
    second_edit = (first_edit + 1) % 3
    consensus.data[0, :3, :3] = second_edit
    asked = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "liver_seg"), ""))
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
    qtbot.mouseClick(widget.export_button, Qt.MouseButton.LeftButton)
    assert asked and "liver_seg.json" in asked[0]
    assert (tmp_path / "liver_seg.json").stat().st_mtime_ns == stamp
    assert np.asarray(nib.load(str(target)).dataobj)[0, 0, 0] == first_edit
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    qtbot.mouseClick(widget.export_button, Qt.MouseButton.LeftButton)
    assert np.asarray(nib.load(str(target)).dataobj)[0, 0, 0] == second_edit


def test_rerun_replaces_only_its_own_layers(make_napari_viewer, qtbot, scan, tiny_checkpoint):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    users = viewer.add_labels(np.zeros(layer.data.shape, np.uint8), name="liver consensus", scale=layer.scale)
    choose(widget, tiny_checkpoint, steps=2, slices="current")
    viewer.dims.set_current_step(0, 4)
    assert click_segment(qtbot, widget) == "done"
    (first,) = result_layers(viewer, "consensus")
    assert first is not users and first.name != "liver consensus"     # napari renamed ours, not theirs
    copy = viewer.layers[first.name].data.copy()
    # Only the current slice (4) was segmented; the x̂0 stack holds one slice placed at slice 4.
    assert widget._session.result.slice_indices.tolist() == [4]
    (steps,) = result_layers(viewer, "steps")
    assert steps.data.shape == (2, 1, 64, 64)
    np.testing.assert_allclose(steps.data_to_world((0, 0, 0, 0))[1], layer.data_to_world((4, 0, 0))[0])
    duplicate = viewer.add_labels(copy, name="my copy", metadata=dict(first.metadata))   # a user's duplicate

    widget.steps_spin.setValue(3)
    assert click_segment(qtbot, widget) == "done"
    for role in ("steps", "consensus", "uncertainty"):
        assert len(result_layers(viewer, role)) == 1
    assert result_layers(viewer, "steps")[0].data.shape[0] == 3
    assert users in viewer.layers and duplicate in viewer.layers and first not in viewer.layers


def test_a_2d_image_is_one_slice(make_napari_viewer, qtbot, liver_volume, tiny_checkpoint):
    image = liver_volume[0][:, :, 3:4]
    data, kwargs = volume_to_layer(image, VolumeMeta(affine=AFFINE, spacing=(0.6, 0.7, 4.0), original_ndim=2))
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, (data, kwargs), name="slice")
    assert layer.ndim == 2
    choose(widget, tiny_checkpoint, steps=2, slices="current")
    assert click_segment(qtbot, widget) == "done"
    steps, consensus = viewer.layers["slice x̂0 (2 steps)"], viewer.layers["slice consensus"]
    assert steps.data.shape == (2, 64, 64) and consensus.data.shape == (64, 64)
    np.testing.assert_allclose(steps.data_to_world((1, 10, 20))[1:], layer.data_to_world((10, 20)))
    np.testing.assert_array_equal(consensus.data, widget._session.result.labels[:, :, 0])


# ----------------------------------------------------------------------------- stopping a run


def test_cancel_keeps_finished_slices(make_napari_viewer, qtbot, scan, tiny_checkpoint, monkeypatch, notifications):
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    choose(widget, tiny_checkpoint, steps=3)
    release = gate_after_first_batch(monkeypatch)

    def cancel_after_first_batch(value):
        if value >= 1 and widget.cancel_button.isEnabled():
            qtbot.mouseClick(widget.cancel_button, Qt.MouseButton.LeftButton)
            release.set()

    widget.progress.valueChanged.connect(cancel_after_first_batch)
    assert click_segment(qtbot, widget) == "cancelled"
    result = widget._session.result
    # CPU batches hold 4 slices: the first batch is kept, the run stopped before finishing the second.
    assert result.completed.tolist() == [True] * _job.CPU_BATCH_SIZE + [False] * (6 - _job.CPU_BATCH_SIZE)
    consensus = viewer.layers["liver consensus"]
    np.testing.assert_array_equal(consensus.data, np.moveaxis(result.labels, -1, 0))
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
    assert widget._session.result.completed.sum() == _job.CPU_BATCH_SIZE
    assert any("was removed" in m for m in notifications.messages("warning"))
    assert notifications.messages("error") == []
    assert len(result_layers(viewer, "consensus")) == 1
    assert widget.layer_combo.count() == 0


def test_closing_the_viewer_mid_run_stops_the_worker(make_napari_viewer, qtbot, scan, tiny_checkpoint, monkeypatch,
                                                     notifications):
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
    qtbot.mouseClick(widget.segment_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: release.is_set(), timeout=RUN_TIMEOUT_MS)
    assert QThreadPool.globalInstance().waitForDone(RUN_TIMEOUT_MS)
    qtbot.wait(50)   # let queued signals arrive: they must find nothing to do and raise nothing
    assert notifications.messages("error") == []


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_become_notifications(make_napari_viewer, qtbot, scan, tiny_checkpoint, tmp_path, notifications):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    qtbot.waitUntil(lambda: widget._engine is not None, timeout=RUN_TIMEOUT_MS)
    choose(widget, tiny_checkpoint)

    qtbot.mouseClick(widget.segment_button, Qt.MouseButton.LeftButton)            # no image layer
    assert "open a scan first" in notifications.messages("error")[-1]

    viewer.add_image(np.zeros((2, 3, 16, 16), np.float32), name="timeseries")
    widget.layer_combo.setCurrentText("timeseries")
    qtbot.mouseClick(widget.segment_button, Qt.MouseButton.LeftButton)
    assert "4-D" in notifications.messages("error")[-1]

    viewer.add_image(np.zeros((16, 16, 3), np.uint8), name="photo", rgb=True)
    widget.layer_combo.setCurrentText("photo")
    qtbot.mouseClick(widget.segment_button, Qt.MouseButton.LeftButton)
    assert "RGB" in notifications.messages("error")[-1]
    assert widget.runs_started == 0

    data, kwargs = scan
    viewer.add_image(data, name="liver", **kwargs)
    widget.layer_combo.setCurrentText("liver")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    widget.checkpoint_edit.setText(str(garbage))
    assert click_segment(qtbot, widget) == "failed"
    assert "garbage.safetensors" in notifications.messages("error")[-1]
    assert result_layers(viewer, "consensus") == []

    widget.checkpoint_edit.setText(str(tmp_path / "missing.safetensors"))
    qtbot.mouseClick(widget.segment_button, Qt.MouseButton.LeftButton)
    assert "checkpoint not found" in notifications.messages("error")[-1]

    choose(widget, tiny_checkpoint, slices="range", first=4, last=9)               # beyond the 6 slices
    assert click_segment(qtbot, widget) == "failed"
    assert "outside this scan's slices 0–5" in notifications.messages("error")[-1]

    widget.model_combo.setCurrentText(widget_module.DEFAULT_MODEL)
    if not widget._engine.default_checkpoint_exists:
        assert "not installed yet" in widget.model_status.text()
        qtbot.mouseClick(widget.segment_button, Qt.MouseButton.LeftButton)
        assert "not installed yet" in notifications.messages("error")[-1]
    assert not widget.cancel_button.isEnabled() and widget.segment_button.isEnabled()


# ----------------------------------------------------------------------------- no Qt needed


def test_widget_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, napari_medconddiff._widget; "
            "print(sorted(m for m in ('torch', 'timm', 'triton', 'medconddiff.segmenter') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_stack_layer_order_matches_the_layer_convention(slice_axis):
    """Each entry of the step stack is laid out exactly like volume_to_layer lays out a volume."""
    rng = np.random.default_rng(slice_axis)
    stack = rng.integers(0, 3, size=(2, 5, 7, 9), dtype=np.uint8)         # (S, n, h, w)
    layer_stack = stack_to_layer_order(stack, slice_axis, 3)
    meta = VolumeMeta(affine=np.eye(4), spacing=(1.0, 1.0, 1.0))
    for s in range(2):
        volume = np.moveaxis(stack[s], 0, slice_axis)
        np.testing.assert_array_equal(layer_stack[s], volume_to_layer(volume, meta)[0])


@pytest.mark.filterwarnings("ignore:Non-orthogonal slicing")
def test_overlay_transform_follows_rotated_and_sheared_layers():
    from napari.layers import Image

    scan_layer = Image(np.zeros((6, 40, 50), np.float32), scale=(4.0, 0.7, 0.6), translate=(10, -3, 2),
                       rotate=(15, 5, -10), shear=(0.1, 0.0, 0.2), affine=np.diag([1.0, 2.0, 1.0, 1.0]))
    kwargs = stack_overlay_kwargs(scan_layer, (3, 2, 8, 10), slice_layer_axis=0, first_slice=3, step_axis_label="s")
    steps = Image(np.zeros((3, 2, 8, 10), np.float32), **kwargs)
    # Model pixel (p) of a 5× smaller grid is centred on scan pixel 5p + 2 (align_corners=False).
    for voxel in [(0, 0, 0), (1, 7, 9), (0, 3, 4)]:
        scan_voxel = (3 + voxel[0], 5 * voxel[1] + 2, 5 * voxel[2] + 2)
        np.testing.assert_allclose(steps.data_to_world((2,) + voxel)[1:], scan_layer.data_to_world(scan_voxel),
                                   atol=1e-9)


def test_the_bundled_lsegdiff_model_runs_from_the_model_menu(make_napari_viewer, qtbot, scan, notifications):
    """The latent family is selectable in the widget and gives the same layers as the pixel family."""
    viewer, layer, widget = open_viewer(make_napari_viewer, qtbot, scan)
    assert widget.model_combo.findText(widget_module.LATENT_MODEL) >= 0
    widget.model_combo.setCurrentText(widget_module.LATENT_MODEL)
    assert "LSegDiff" in widget.model_status.text()
    widget.steps_spin.setValue(2)
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("all"))
    assert click_segment(qtbot, widget) == "done"
    assert notifications.messages("error") == []
    result = widget._session.result
    assert result.provenance["model"]["family"] == "latent"
    consensus = viewer.layers["liver consensus"]
    assert consensus.data.shape == layer.data.shape and consensus.data.max() < 3
    assert viewer.layers["liver x̂0 (2 steps)"].data.shape == (2, 6, 128, 128)   # the model's 128² grid
    # On this real liver cut, the trained model finds liver.
    assert (consensus.data == 1).mean() > 0.2
