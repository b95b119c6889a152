"""The dock widget acts on what it shows: the scan chosen under Image, the set the Folder field reads,
the class names typed for this scan's result, the Steps typed. Driven with pytest-qt as a user would
(keys, clicks) on napari's viewer under Xvfb; the tiny model of tests/conftest.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from tests.conftest import save_tiny, tiny_config
from tests.test_training_set_widget import choose_folder, click_add, scan_b, segment_and_paint  # noqa: F401
from tests.test_widget import _no_unexpected_question, _no_worker_left_running, scan_1mm  # noqa: F401 (fixtures)
from tests.test_widget import choose, click, click_segment, open_viewer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_choosing_another_scan_leaves_the_first_ones_results_alone(make_napari_viewer, qtbot, scan_1mm, scan_b,
                                                                    tiny_checkpoint):
    viewer, widget, _ = segment_and_paint(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint, "liverA")
    data, kwargs = scan_b
    viewer.add_image(np.array(data), name="liverB", **kwargs)
    widget.layer_combo.value = viewer.layers["liverB"]
    assert widget.controller.current is None
    click(qtbot, widget.training_set_panel.mark_button)       # on B, which has no result: refused, A untouched
    assert "segment a scan first" in widget.status.text()
    widget.layer_combo.value = viewer.layers["liverA"]
    assert widget.controller.current.scan_name == "liverA" and widget.controller.checked_slices() == []
    assert widget.controller.edited_slices() == [1]


def test_a_class_renamed_for_one_scan_does_not_rename_another_models_class(make_napari_viewer, qtbot, scan_1mm,
                                                                           scan_b, tiny_checkpoint, tmp_path):
    viewer, widget, _ = segment_and_paint(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint, "liverA")
    widget.class_table.item(2, 1).setText("lesion")              # the user renames tumour on scan A
    assert widget.class_names() == ("background", "liver", "lesion")
    kidney = save_tiny(tmp_path / "kidney.safetensors", tiny_config(class_names=("background", "kidney", "cyst")))
    data, kwargs = scan_b
    viewer.add_image(np.array(data), name="liverB", **kwargs)
    widget.layer_combo.value = viewer.layers["liverB"]
    choose(widget, kidney, steps=2)
    assert click_segment(qtbot, widget) == "done"
    assert widget.class_names() == ("background", "kidney", "cyst")


def test_typing_steps_keeps_skip_first_and_does_not_refuse_the_result(make_napari_viewer, qtbot, scan_1mm,
                                                                      tiny_checkpoint):
    viewer, _, widget = open_viewer(make_napari_viewer, qtbot, scan_1mm)
    choose(widget, tiny_checkpoint, steps=5)
    widget.skip_spin.setValue(3)
    assert click_segment(qtbot, widget) == "done"
    refusions = []
    widget.controller.consensus_updated.connect(lambda *a: refusions.append(a))
    widget.steps_spin.lineEdit().selectAll()
    qtbot.keyClicks(widget.steps_spin, "10")                   # passes through "1" as it is typed
    qtbot.keyClick(widget.steps_spin, Qt.Key.Key_Return)
    assert widget.steps_spin.value() == 10 and widget.skip_spin.value() == 3
    assert refusions == [] and {run.sampling.skip_first for run in widget.controller.current.runs} == {3}


def test_a_folder_typed_without_enter_is_not_taken_for_the_set_in_use(make_napari_viewer, qtbot, scan_1mm,
                                                                      tiny_checkpoint, tmp_path):
    viewer, widget, _ = segment_and_paint(make_napari_viewer, qtbot, scan_1mm, tiny_checkpoint, "liverA")
    old, new = tmp_path / "old set", tmp_path / "new set"
    assert choose_folder(qtbot, widget, old) == "done"
    panel = widget.training_set_panel
    panel.folder_edit.setText(str(new))                         # typed, Enter not pressed
    click(qtbot, panel.add_button)
    assert not old.exists() and not new.exists()
    assert "press Enter" in widget.status.text() and panel.folder_edit.text() == str(new)
    click(qtbot, widget.finetune_button)
    assert "press Enter" in widget.status.text() and not widget.controller.busy
    qtbot.keyClick(panel.folder_edit, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: widget.controller.training_set_folder is not None
                    and widget.controller.training_set_folder.name == "new set", timeout=5000)
    assert click_add(qtbot, widget) == "done" and new.is_dir() and not old.exists()

