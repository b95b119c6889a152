"""What the user did survives what they do next: another model, a removed scan, a failed save, a
consensus chosen mid-run, a slice marked as checked. The Qt-free controller on napari's ViewerModel
with the synchronous runner (or one that starts tasks later, as napari's workers do); the tiny random
model of tests/conftest.py on a 64×64×6 cut of the real liver CT.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from medconddiff.config import SamplingConfig
from napari_medconddiff import _result_layers
from napari_medconddiff._controller import REPLACE, FinetuneSettings, SegmentSettings
from napari_medconddiff._job import SliceChoice
from napari_medconddiff._runners import _SyncTask
from tests.conftest import save_tiny, tiny_config
from tests.test_controller import Answers, layer, make, paint, segment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIVER = ("background", "liver", "tumour")


class SaveAnswers(Answers):
    """Answers that also name another file when a fine-tuned model could not be saved."""

    def __init__(self, elsewhere=None, **kwargs):
        super().__init__(**kwargs)
        self.elsewhere = elsewhere

    def save_finetuned_elsewhere(self, problem, path):
        self.asked.append(("save elsewhere", [str(path)]))
        return (self.elsewhere, False) if self.elsewhere is not None else None


class LaterRunner:
    """Starts each task when pumped, not inside the call that made it (napari's thread workers start on the
    event loop): what a handler does between two tasks shows."""

    def __init__(self):
        self.queue: list[_SyncTask] = []

    def __call__(self, function, *args, **callbacks):
        task = _SyncTask(function, args, callbacks)
        queue = self.queue

        class Deferred:
            def start(self):
                queue.append(task)

            def quit(self):
                task.quit()
        return Deferred()

    def pump(self):
        while self.queue:
            self.queue.pop(0).start()


def finetune_settings(checkpoint, path, scan=None, steps=2):
    resegment = None if scan is None else SegmentSettings(scan, str(checkpoint), "cpu", SamplingConfig(steps=2))
    return FinetuneSettings(start=str(checkpoint), save_path=path, steps=steps, device="cpu", class_names=LIVER,
                            resegment=resegment)


def test_a_model_of_other_classes_gets_new_layers_and_the_old_ones_stay_the_users(liver_volume, tiny_checkpoint,
                                                                                   tmp_path):
    kidney = save_tiny(tmp_path / "kidney.safetensors", tiny_config(class_names=("background", "kidney")))
    viewer, scan, controller = make(liver_volume[0])
    statuses = []
    controller.status.connect(statuses.append)
    assert segment(controller, scan, tiny_checkpoint) == "done"
    liver_consensus = layer(viewer, "consensus")
    liver_labels = np.asarray(liver_consensus.data).copy()
    assert segment(controller, scan, kidney) == "done"

    consensus = layer(viewer, "consensus")
    assert consensus is not liver_consensus and list(consensus.features["class"]) == ["background", "kidney"]
    # The liver run's layer is the user's now, as it was: no label value changed its meaning.
    assert liver_consensus in viewer.layers and not _result_layers.is_own_result(liver_consensus)
    np.testing.assert_array_equal(liver_consensus.data, liver_labels)
    assert list(liver_consensus.features["class"]) == list(LIVER)
    assert any("are not those of the layers" in text for text in statuses)
    assert "are not those of the layers" in statuses[-1]       # also on the line that stays after the run
    # The set-aside uncertainty map is the user's now, but still no scan: never offered as Image or channel.
    (old_map,) = [x for x in viewer.layers if x.name == "liver uncertainty (liver, tumour)"]
    assert not _result_layers.is_own_result(old_map) and _result_layers.is_result_image(old_map)
    assert not _result_layers.is_result_image(scan)
    # The layer list tells the two apart: the old ones named by their classes, the new ones plain (no "[1]").
    assert liver_consensus.name == "liver consensus (liver, tumour)" and consensus.name == "liver consensus"
    assert sorted(layer.name for layer in viewer.layers if "[" in layer.name) == []
    _, sidecar = controller.export(tmp_path / "kidney_seg.nii.gz", overwrite=False)
    assert json.loads(sidecar.read_text())["class_names"] == ["background", "kidney"]


def test_a_model_slicing_another_way_gets_new_layers_and_the_old_ones_are_named_by_their_slicing(
        liver_volume, tiny_checkpoint, tmp_path):
    from medconddiff.config import PreprocessPlan

    coronal = save_tiny(tmp_path / "coronal.safetensors", tiny_config(plan=PreprocessPlan(slicing="coronal")))
    viewer, scan, controller = make(liver_volume[0])
    statuses = []
    controller.status.connect(statuses.append)
    assert segment(controller, scan, tiny_checkpoint) == "done"
    axial_consensus = layer(viewer, "consensus")
    axial_labels = np.asarray(axial_consensus.data).copy()
    assert segment(controller, scan, coronal) == "done"
    assert "slices the scan another way" in statuses[-1]
    assert axial_consensus.name == "liver consensus (axial slices)" and not _result_layers.is_own_result(
        axial_consensus)
    np.testing.assert_array_equal(axial_consensus.data, axial_labels)
    assert layer(viewer, "consensus").name == "liver consensus"
    assert [layer.name for layer in viewer.layers if "[" in layer.name] == []


def test_a_checked_slice_is_kept_from_a_rerun_unless_the_user_lets_it_be_replaced(liver_volume, tiny_checkpoint):
    answers = Answers()
    viewer, scan, controller = make(liver_volume[0], questions=answers)
    assert segment(controller, scan, tiny_checkpoint) == "done"
    consensus = layer(viewer, "consensus")
    viewer.dims.set_point(0, 3)
    checked = controller.mark_checked()
    seen = np.asarray(consensus.data).copy()

    other_seed = SegmentSettings(scan, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2, seed=7), SliceChoice())
    assert controller.segment(other_seed)
    assert answers.asked[-1][1] == [checked]                # asked, as for an edited slice
    np.testing.assert_array_equal(consensus.data[checked], seen[checked])
    changed = [s for s in range(seen.shape[0]) if not np.array_equal(consensus.data[s], seen[s])]
    assert changed and checked not in changed               # the others did change: the seed matters here
    assert controller.verified_slices() == [checked]

    answers.edit_answer = REPLACE
    before = np.asarray(consensus.data[checked]).copy()
    assert controller.segment(SegmentSettings(scan, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2, seed=11),
                                              SliceChoice()))
    assert controller.checked_slices() == []                # replaced as allowed: no longer what was checked
    assert not np.array_equal(consensus.data[checked], before)


def test_removing_the_scan_while_fine_tuning_saves_the_model_and_leaves_nothing_busy(liver_volume, tiny_checkpoint,
                                                                                     tmp_path):
    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint) == "done"
    paint(layer(viewer, "consensus"), 1, 1)
    statuses = []
    controller.status.connect(statuses.append)
    controller.finetune_step.connect(lambda step, total, loss: scan in viewer.layers and viewer.layers.remove(scan))
    assert controller.finetune(finetune_settings(tiny_checkpoint, tmp_path / "ft.safetensors", scan))
    assert (tmp_path / "ft.safetensors").is_file()
    assert not controller.busy and controller.can_export
    assert "its scan is no longer open, so nothing was re-segmented" in statuses[-1]


def test_new_layer_after_the_scan_was_removed_keeps_the_edits_and_a_consensus(liver_volume, tiny_checkpoint):
    from napari_medconddiff._controller import NEW_LAYER

    viewer, scan, controller = make(liver_volume[0], questions=Answers(edits=NEW_LAYER))
    assert segment(controller, scan, tiny_checkpoint, steps=3) == "done"
    edited = layer(viewer, "consensus")
    paint(edited, 2, 1)
    painted = np.asarray(edited.data).copy()
    viewer.layers.remove(scan)
    controller.set_consensus("last", 0)
    assert not controller.busy and controller.can_export
    fresh = layer(viewer, "consensus")
    assert fresh is not edited and edited.name.endswith("(your edits)")
    np.testing.assert_array_equal(edited.data, painted)
    np.testing.assert_allclose(fresh.affine.affine_matrix, edited.affine.affine_matrix)
    assert fresh.scale.tolist() == edited.scale.tolist()


def test_a_failed_save_offers_another_file_and_the_trained_weights_are_not_lost(liver_volume, tiny_checkpoint,
                                                                                tmp_path):
    target, other = tmp_path / "ft.safetensors", tmp_path / "other.safetensors"
    answers = SaveAnswers(elsewhere=other)
    viewer, scan, controller = make(liver_volume[0], questions=answers)
    assert segment(controller, scan, tiny_checkpoint) == "done"
    paint(layer(viewer, "consensus"), 1, 1)
    # Another program writes the chosen file while training runs: it is neither replaced nor the end of the run.
    controller.finetune_step.connect(lambda step, total, loss: target.write_bytes(b"someone else's model"))
    assert controller.finetune(finetune_settings(tiny_checkpoint, target))
    assert target.read_bytes() == b"someone else's model"
    assert ("save elsewhere", [str(target)]) in answers.asked and other.is_file()
    assert not controller.busy

    answers.elsewhere = None            # the user lets the weights go: nothing is written
    gone = tmp_path / "gone.safetensors"
    controller.finetune_step.connect(lambda step, total, loss: gone.write_bytes(b"someone else's"))
    assert controller.finetune(finetune_settings(tiny_checkpoint, gone))
    assert gone.read_bytes() == b"someone else's" and not controller.busy


def test_a_folder_that_cannot_hold_the_model_is_refused_before_training(liver_volume, tiny_checkpoint, tmp_path):
    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint) == "done"
    paint(layer(viewer, "consensus"), 1, 1)
    (tmp_path / "notes").write_text("a file, not a folder")
    statuses = []
    controller.status.connect(statuses.append)
    assert not controller.finetune(finetune_settings(tiny_checkpoint, tmp_path / "notes" / "ft.safetensors"))
    assert "is a file, not a folder" in statuses[-1] and not controller.busy


def test_a_consensus_chosen_while_fine_tuning_applies_after_the_resegment(liver_volume, tiny_checkpoint, tmp_path,
                                                                          notifications):
    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint, steps=3) == "done"
    paint(layer(viewer, "consensus"), 1, 1)
    later = controller.runner = LaterRunner()
    started = controller.runs_started
    assert controller.finetune(finetune_settings(tiny_checkpoint, tmp_path / "ft.safetensors", scan))
    controller.set_consensus("last", 0)       # the user changes Consensus while fine-tuning runs
    later.pump()
    assert controller.runs_started == started + 1            # the promised re-segment ran
    assert not notifications.messages("warning") and not controller.busy
    assert {run.sampling.consensus for run in controller.current.runs} == {"last"}    # and the choice applied


def test_ctrl_z_of_a_refusion_or_a_rerun_brings_back_engine_output_not_edits(liver_volume, tiny_checkpoint):
    """An undo restores what the engine wrote before, which differs from the reference (written outside napari's
    history): every slice counted as edited, so Add put 6 slices nobody checked into the training set."""
    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint, steps=3) == "done"
    consensus = layer(viewer, "consensus")
    paint(consensus, 2, 1)
    controller.set_consensus("last", 0)                  # keep my edits (the Answers default)
    consensus.undo()                                     # Ctrl-Z: the re-fusion goes, the stroke stays
    assert controller.edited_slices() == [2] and controller.verified_slices() == [2]
    controller.segment(SegmentSettings(scan, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2, seed=7),
                                       SliceChoice()))
    consensus.undo()                                     # Ctrl-Z of a second run with another seed
    assert controller.edited_slices() == [2]
    # An edit that happens to equal nothing the engine wrote stays an edit; erasing a slice is one too.
    consensus.data[4] = 0
    consensus.refresh()
    assert 4 in controller.edited_slices()


def test_the_consensus_recorded_follows_a_ctrl_z_and_redo_of_a_refusion(liver_volume, tiny_checkpoint):
    """Ctrl-Z of a re-fusion brought the mean's labels back while the runs, the sidecar's record and the
    Consensus box still said 'last', and choosing 'last' again did nothing (it was already 'recorded')."""
    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint, steps=3) == "done"
    consensus = layer(viewer, "consensus")
    mean_labels = np.array(consensus.data)
    asked_first = controller.shown_consensus()
    first = controller.current.runs[-1].sampling.consensus
    updates = []
    controller.consensus_updated.connect(lambda: updates.append(controller.shown_consensus()))
    controller.set_consensus("last", 1)
    last_labels = np.array(consensus.data)
    assert not np.array_equal(last_labels, mean_labels), "the tiny model's fusions must differ somewhere"
    assert controller.current.summary().provenance["sampling"]["consensus"] == "last"
    updates.clear()
    consensus.undo()                                    # Ctrl-Z: the labels of the first fusion
    np.testing.assert_array_equal(consensus.data, mean_labels)
    assert updates == [asked_first] and controller.shown_consensus() == asked_first
    recorded = controller.current.summary().provenance["sampling"]
    assert (recorded["consensus"], recorded["skip_first"]) == (first, 0)
    assert controller.edited_slices() == []
    consensus.redo()                                    # Shift-Ctrl-Z: the re-fusion again
    np.testing.assert_array_equal(consensus.data, last_labels)
    assert controller.shown_consensus() == ("last", 1)
    assert controller.current.summary().provenance["sampling"]["consensus"] == "last"
    consensus.undo()
    controller.set_consensus("last", 1)                  # asked again after the undo: fused again
    np.testing.assert_array_equal(consensus.data, last_labels)
    assert controller.current.runs[-1].sampling.consensus == "last"
    # Another fusion after an undo replaces what could have been redone; its Ctrl-Z goes back to the first.
    consensus.undo()
    controller.set_consensus("uncertainty_weighted", 0)
    assert controller.shown_consensus() == ("uncertainty_weighted", 0)
    consensus.undo()
    assert controller.shown_consensus() == asked_first
    assert controller.current.summary().provenance["sampling"]["consensus"] == first


def test_the_consensus_layer_says_when_it_holds_edits_so_its_saved_seg_is_semiautomatic(liver_volume,
                                                                                      tiny_checkpoint):
    """File > Save of the plugin's consensus wrote AUTOMATIC segments after the user had edited it."""
    from napari_medconddiff._writer import algorithm_type

    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint) == "done"
    consensus = layer(viewer, "consensus")
    assert algorithm_type(consensus.metadata) == "AUTOMATIC"
    paint(consensus, 2, 1)
    assert algorithm_type(consensus.metadata) == "SEMIAUTOMATIC"
    consensus.undo()
    controller.edited_slices()
    assert algorithm_type(consensus.metadata) == "AUTOMATIC"


def test_renaming_the_scan_layer_renames_what_is_made_from_it(liver_volume, tiny_checkpoint, tmp_path):
    """A user who renames 'Doe John 1961-02-03' to 'case 7' after segmenting still got the old name on new
    layers, the export's default file name, its sidecar and the training set's case."""
    viewer, scan, controller = make(liver_volume[0])
    scan.name = "Doe John 1961-02-03"
    assert segment(controller, scan, tiny_checkpoint) == "done"
    scan.name = "case 7"
    assert sorted(layer.name for layer in viewer.layers if _result_layers.is_own_result(layer)) == [
        "case 7 consensus", "case 7 uncertainty", "case 7 x̂0 (2 steps)"]
    assert segment(controller, scan, tiny_checkpoint) == "done"
    assert not [layer.name for layer in viewer.layers if "Doe" in layer.name]
    assert "Doe" not in str(controller.export_default_path())
    _, sidecar = controller.export(tmp_path / "seg.nii.gz", overwrite=False)
    assert "Doe" not in sidecar.read_text()


def test_the_edited_consensus_of_a_scan_opened_again_can_be_continued_from(liver_volume, tiny_checkpoint):
    """Remove the scan by mistake and open it again: its edited consensus was refused as 'already this plugin's
    consensus' and left out of Saved labels, so the edits stayed in a layer nothing could use."""
    from napari_medconddiff._result_layers import is_result_of

    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint) == "done"
    consensus = layer(viewer, "consensus")
    paint(consensus, 2, 2)
    painted = consensus.data[2].copy()
    data, kwargs = np.asarray(scan.data).copy(), {"scale": scan.scale, "translate": scan.translate}
    viewer.layers.remove(scan)
    again = viewer.add_image(data, name="liver", **kwargs)
    assert is_result_of(consensus, scan) and not is_result_of(consensus, again)
    assert controller.continue_from(SegmentSettings(again, str(tiny_checkpoint), "cpu", SamplingConfig(steps=2)),
                                    consensus)
    (new,) = [x for x in viewer.layers if is_result_of(x, again) and _result_layers.marker(x)["role"] == "consensus"]
    np.testing.assert_array_equal(new.data[2], painted)
    assert 2 in controller.edited_slices()


def test_a_refusion_says_where_skip_first_left_slices_their_last_step_alone(liver_volume, tiny_checkpoint):
    """A model that stops slices early (a step cap, adaptive stopping): skipping more steps than a slice took
    gives its last step, whatever the method; the status said 'mean, skipping 2' alone."""
    viewer, scan, controller = make(liver_volume[0])
    assert segment(controller, scan, tiny_checkpoint, steps=3) == "done"
    statuses = []
    controller.status.connect(statuses.append)
    controller.current.runs[-1].steps_used[:2] = 2             # as if two slices had stopped after 2 steps
    controller.set_consensus("mean", 2)
    assert "Note: skip-first 2: 2 of 6 slice(s) took 2 step(s) or fewer" in statuses[-1]
