"""Peak memory of the napari widget segmenting a 512×512×300 scan at 10 steps (issue 4's figure).

Run under Xvfb:  xvfb-run -a .venv/bin/python docs/measure_widget_memory.py
Opens a viewer (not shown), adds a synthetic CT-like 512×512×300 int16 scan (RAS, 0.7×0.7×1.5 mm)
as the reader would, docks the widget through the manifest, clicks Segment with the bundled model,
waits, and prints the process's peak RSS (ru_maxrss) before and after, plus the size of every result
layer and of the controller's per-scan reference of what the engine wrote (used to find edits), and
the longest the GUI event loop went without serving a 50 ms heartbeat timer during the run (how
long the UI was ever frozen).
"""

import resource
import time

import numpy as np
from qtpy.QtCore import QEventLoop, Qt, QTimer
from qtpy.QtTest import QTest


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main() -> None:
    import napari

    from medconddiff.nifti import VolumeMeta
    from napari_medconddiff._layers import volume_to_layer

    rng = np.random.default_rng(0)
    volume = rng.normal(40, 30, (512, 512, 300)).astype(np.int16)   # soft-tissue HU with noise
    viewer = napari.Viewer(show=False)
    data, kwargs = volume_to_layer(volume, VolumeMeta(affine=np.diag([0.7, 0.7, 1.5, 1.0]), spacing=(0.7, 0.7, 1.5)))
    viewer.add_image(data, name="big", **kwargs)
    del volume, data
    _, widget = viewer.window.add_plugin_dock_widget("napari-medconddiff", "MedCondDiff segmentation")
    loop = QEventLoop()
    while widget.controller.engine is None:
        QTimer.singleShot(100, loop.quit)
        loop.exec()
    before = peak_rss_gb()
    widget.steps_spin.setValue(10)
    widget.slice_combo.setCurrentIndex(widget.slice_combo.findData("all"))
    started = time.perf_counter()
    finished = []
    widget.run_finished.connect(finished.append)
    beats = [time.perf_counter()]
    heartbeat = QTimer()
    heartbeat.timeout.connect(lambda: beats.append(time.perf_counter()))
    heartbeat.start(50)
    QTest.mouseClick(widget.segment_button, Qt.MouseButton.LeftButton)
    while not finished:
        QTimer.singleShot(100, loop.quit)
        loop.exec()
    seconds = time.perf_counter() - started
    heartbeat.stop()
    gap = max(b - a for a, b in zip(beats, beats[1:]))
    print(f"run: {finished[0]}; longest GUI event-loop gap during the run {gap * 1e3:.0f} ms")
    print(f"segment time {seconds:.1f} s; peak RSS before Segment {before:.2f} GB, after {peak_rss_gb():.2f} GB")
    for layer in viewer.layers:
        print(f"  layer {layer.name!r}: {layer.data.shape} {layer.data.dtype} {layer.data.nbytes / 1e9:.3f} GB")
    reference = widget.controller.current.reference
    print(f"  edit reference: {reference.shape} {reference.dtype} {reference.nbytes / 1e9:.3f} GB")
    viewer.close()


if __name__ == "__main__":
    main()
