"""Make the README's pictures by driving napari and the MedCondDiff widget as a user would.

    xvfb-run -a -s '-screen 0 1800x1300x24' .venv/bin/python docs/make_screenshot.py [--threads 1]

* ``docs/screenshot.png``: the bundled liver CT (File ▸ Open Sample equivalent) segmented with the
  bundled default model; consensus, uncertainty and the widget, in the radiological convention.
* ``docs/finetune_loop.png``: the fine-tuning loop on a chest CT the liver model never saw (a
  lung CT of ../shared/data, stored LPS): segment, correct three slices of its lung lesion as a new
  class, fine-tune (Steps left at *auto*: 200 for one scan), re-segment the other slices, and show a lesion slice
  that was not corrected. One run, one picture: the accuracy of the loop is measured in the README.

Uses the bundled default model when it is installed; otherwise a tiny randomly initialised model
(the masks are then meaningless, only the layout is shown), and says which in its output.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
SHARED_DATA = DOCS.parents[1] / "shared" / "data"
PLUGIN, WIDGET = "napari-medconddiff", "MedCondDiff segmentation"


def tiny_random_checkpoint(folder: Path) -> Path:
    """A small untrained model (pvt_v2_b0): shows the UI when no trained model is installed."""
    import torch

    from medconddiff.checkpoint import save_checkpoint
    from medconddiff.config import ExperimentConfig, ModelConfig
    from medconddiff.families import build_model

    torch.manual_seed(0)
    config = ExperimentConfig(model=ModelConfig(backbone="pvt_v2_b0", denoiser_channels=(16,), stem_channels=8,
                                                time_embed_dim=32))
    return save_checkpoint(folder / "tiny_random.safetensors", build_model(config.model), config)


def wait_for(condition, timeout_s: float, what: str) -> None:
    from qtpy.QtWidgets import QApplication

    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not finish in {timeout_s:.0f} s")
        QApplication.processEvents()
        time.sleep(0.01)


def settle(seconds: float = 1.0) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(int(seconds / 0.02)):
        QApplication.processEvents()
        time.sleep(0.02)


def open_with_widget(path: Path, size: tuple[int, int]):
    import napari

    viewer = napari.Viewer(title="napari-medconddiff")
    viewer.window.resize(*size)
    (scan,) = viewer.open(path, plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    wait_for(lambda: widget.controller.engine is not None, 300, "loading the engine")
    return viewer, scan, widget


def choose_model(widget, folder: Path) -> str:
    from medconddiff.checkpoint import default_checkpoint_path
    from napari_medconddiff._widget import CHECKPOINT_FILE, DEFAULT_MODEL

    if default_checkpoint_path().is_file():
        widget.model_combo.setCurrentText(DEFAULT_MODEL)
        return f"bundled default ({default_checkpoint_path().name})"
    widget.model_combo.setCurrentText(CHECKPOINT_FILE)
    widget.checkpoint_edit.setText(str(tiny_random_checkpoint(folder)))
    return "tiny RANDOM model (the default model is not installed); masks are meaningless"


def segment(widget, timeout_s: float = 1800) -> None:
    outcome: list[str] = []
    widget.run_finished.connect(outcome.append)
    widget.segment_button.click()
    wait_for(lambda: bool(outcome), timeout_s, "the segmentation")
    if outcome != ["done"]:
        raise SystemExit(f"segmentation did not finish: {outcome}, {widget.status.text()}")


def save(viewer, output: Path) -> None:
    settle()
    output.parent.mkdir(parents=True, exist_ok=True)
    image = viewer.screenshot(str(output), canvas_only=False)
    if np.asarray(viewer.screenshot(canvas_only=True))[..., :3].max() == 0:
        raise SystemExit("the canvas rendered black")
    print(f"wrote {output} ({image.shape[1]}×{image.shape[0]})")


def liver_screenshot(args, folder: Path) -> None:
    from medconddiff.nifti import sample_scan_path

    viewer, scan, widget = open_with_widget(sample_scan_path(), (1600, 1000))
    print("liver: model", choose_model(widget, folder))
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("all"))
    widget.steps_spin.setValue(args.steps)
    segment(widget)
    # The slice with the largest tumour section, the last diffusion step, the consensus selected.
    widget.controller.go_to_slice(args.liver_slice)
    viewer.dims.set_current_step(0, args.steps - 1)
    viewer.reset_view()
    save(viewer, args.output)
    print(f"liver: {widget.status.text()}")
    viewer.close()


def finetune_screenshot(args, folder: Path) -> None:
    from qtpy.QtWidgets import QFileDialog, QScrollArea

    from medconddiff.nifti import load_labels

    image_path, label_path = SHARED_DATA / f"{args.case}_image.nii.gz", SHARED_DATA / f"{args.case}_label.nii.gz"
    if not image_path.is_file():
        print(f"finetune: skipped, {image_path} is not there")
        return
    viewer, scan, widget = open_with_widget(image_path, (1800, 1300))
    print("finetune: model", choose_model(widget, folder))
    # A slab around the lesion (counted from inferior) keeps the first run short.
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("range"))
    widget.range_edit.setText(f"{args.first_slab[0]}-{args.first_slab[1]}")   # inclusive
    widget.steps_spin.setValue(args.steps)
    segment(widget)

    # The user's correction of two lesion slices: the lesion as a new class, nothing else there.
    results = widget.controller.current
    consensus = results.consensus
    truth, _ = load_labels(label_path)
    truth_slices = results.space.geometry.slice_view(truth)
    for s in args.corrected:
        shown = results.space.slices(consensus.data)[s]
        wanted = np.where(truth_slices[s] > 0, 3, 0).astype(shown.dtype)
        rows, columns = np.nonzero(shown != wanted)
        consensus.data_setitem(results.space.layer_indices(np.full(len(rows), s), rows, columns),
                               wanted[rows, columns])
    wait_for(lambda: widget.class_table.rowCount() == 4, 30, "the class table")
    widget.class_table.item(3, 1).setText("lesion")
    if args.finetune_steps:          # 0: leave Steps at 'auto', as a user who does not touch it
        widget.ft_steps_spin.setValue(args.finetune_steps)

    target = folder / f"{args.case}_image_finetuned.safetensors"
    QFileDialog.getSaveFileName = staticmethod(lambda *a, **k: (str(target), ""))   # the user's answer
    finished: list[str] = []
    widget.run_finished.connect(finished.append)
    clicked = time.perf_counter()
    widget.finetune_button.click()
    wait_for(lambda: bool(finished), 3600, "fine-tuning and re-segmenting")
    print(f"finetune: {widget.status.text()}")
    print(f"finetune: click on Fine-tune to the re-segmented scan: {time.perf_counter() - clicked:.1f} s")

    # The lesion slice that was not corrected, centred on the lesion; the x̂0 layer stays hidden and the
    # uncertainty too (on a scan this far from its training data it is high everywhere and would cover it).
    results.layers["uncertainty"].visible = False
    shown = results.space.slices(consensus.data)[args.show_slice]
    truth = truth_slices[args.show_slice] > 0
    found = shown == 3
    print(f"finetune: slice {args.show_slice}: lesion {truth.sum()} px, called lesion {found.sum()} px, "
          f"of which on the lesion {(found & truth).sum()} px")
    row, column = np.argwhere(truth).mean(axis=0).round().astype(int)
    lesion = results.space.layer_indices(np.array([args.show_slice]), np.array([row]), np.array([column]))
    widget.controller.go_to_slice(args.show_slice)
    viewer.reset_view()
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = tuple(scan.data_to_world([int(a[0]) for a in lesion])[-2:])
    camera.zoom *= args.zoom
    scroll = widget.findChild(QScrollArea)
    scroll.verticalScrollBar().setValue(scroll.verticalScrollBar().maximum())   # the fine-tune section
    save(viewer, args.finetune_output)
    viewer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DOCS / "screenshot.png")
    parser.add_argument("--finetune-output", type=Path, default=DOCS / "finetune_loop.png")
    parser.add_argument("--only", choices=("liver", "finetune"), help="make one picture only")
    parser.add_argument("--liver-slice", type=int, default=49, help="liver slice shown (49: the largest tumour "
                        "section)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--case", default="lung2", help="lung CT of ../shared/data (lung2: the scan of the README's "
                        "fine-tuning figures)")
    parser.add_argument("--corrected", type=int, nargs="+", default=[15, 16, 17], help="lung slices corrected "
                        "(as in the README's measurement)")
    parser.add_argument("--first-slab", type=int, nargs=2, default=[10, 24], help="slices of the first run")
    parser.add_argument("--show-slice", type=int, default=21, help="lung slice shown (21: a lesion slice not "
                        "corrected)")
    parser.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps (0: the widget's auto)")
    parser.add_argument("--zoom", type=float, default=2.0, help="zoom of the lung picture around the lesion")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        if args.only in (None, "liver"):
            liver_screenshot(args, Path(folder))
        if args.only in (None, "finetune"):
            finetune_screenshot(args, Path(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
