"""Make docs/screenshot.png: napari with the sample liver CT, the MedCondDiff widget and its results.

    xvfb-run -s '-screen 0 1600x1000x24' .venv/bin/python docs/make_screenshot.py

Uses the bundled default model when it is installed; otherwise a tiny randomly initialised model
(the masks are then meaningless, only the layout is shown), and says which in its output. Drives
the widget like a user: File > Open Sample equivalent, the widget from the manifest, Segment.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent


def tiny_random_checkpoint(folder: Path) -> Path:
    """A small untrained model (64², pvt_v2_b0): shows the UI when no trained model is installed."""
    import torch

    from medconddiff.checkpoint import save_checkpoint
    from medconddiff.config import ExperimentConfig, ModelConfig
    from medconddiff.model import build_model

    torch.manual_seed(0)
    config = ExperimentConfig(model=ModelConfig(backbone="pvt_v2_b0", image_size=64, denoiser_channels=(16,),
                                                stem_channels=8, time_embed_dim=32))
    return save_checkpoint(folder / "tiny_random.safetensors", build_model(config.model), config)


def wait_for(condition, timeout_s: float) -> None:
    from qtpy.QtWidgets import QApplication

    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("the widget did not finish in time")
        QApplication.processEvents()
        time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DOCS / "screenshot.png")
    parser.add_argument("--slice", type=int, default=49, help="slice shown (49: the largest tumour section)")
    parser.add_argument("--half-range", type=int, default=6, help="segment slice±N (the whole scan with "
                        "the default model)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from medconddiff.checkpoint import default_checkpoint_path
    from medconddiff.nifti import sample_scan_path
    from napari_medconddiff._widget import CHECKPOINT_FILE, DEFAULT_MODEL

    viewer = napari.Viewer(title="napari-medconddiff")
    viewer.window.resize(1600, 1000)
    (scan,) = viewer.open(sample_scan_path(), plugin="napari-medconddiff")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medconddiff", "MedCondDiff segmentation")
    wait_for(lambda: widget._engine is not None, 300)

    trained = default_checkpoint_path().is_file()
    with tempfile.TemporaryDirectory() as folder:
        if trained:
            widget.model_combo.setCurrentText(DEFAULT_MODEL)
            widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("all"))
            print(f"model: bundled default ({default_checkpoint_path()})")
        else:
            widget.model_combo.setCurrentText(CHECKPOINT_FILE)
            widget.checkpoint_edit.setText(str(tiny_random_checkpoint(Path(folder))))
            widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("range"))
            widget.first_spin.setValue(args.slice - args.half_range)
            widget.last_spin.setValue(args.slice + args.half_range)
            print("model: tiny RANDOM model (the default model is not installed yet); masks are meaningless")
        widget.steps_spin.setValue(args.steps)
        outcome: list[str] = []
        widget.run_finished.connect(outcome.append)
        widget.segment_button.click()
        wait_for(lambda: bool(outcome), 1800)
    if outcome != ["done"]:
        raise SystemExit(f"segmentation did not finish: {outcome}, {widget.status.text()}")

    # Show the chosen slice, the last diffusion step, and the consensus selected in the layer list.
    world = scan.data_to_world((args.slice, 0, 0))
    viewer.dims.set_point(viewer.dims.ndim - 3, world[0])
    viewer.dims.set_current_step(0, widget._session.result.trajectory.shape[0] - 1)
    viewer.reset_view()
    for _ in range(50):
        QApplication.processEvents()
        time.sleep(0.02)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image = viewer.screenshot(str(args.output), canvas_only=False)
    canvas = viewer.screenshot(canvas_only=True)
    if np.asarray(canvas)[..., :3].max() == 0:
        raise SystemExit("the canvas rendered black")
    print(f"wrote {args.output} ({image.shape[1]}×{image.shape[0]}); {widget.status.text()}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
