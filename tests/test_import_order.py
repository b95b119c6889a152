"""torch/timm imported *after* napari opened its OpenGL window, as the plugin does, must not crash.

triton (pulled in by torch via torchvision/timm) segfaulted on import once Mesa had put its LLVM
in the process's global symbols; :mod:`napari_medconddiff._torch_import` fixes it. Each check runs
in a subprocess, so a segfault fails the test instead of killing pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest

TIMEOUT_S = 240
TRITON_INSTALLED = find_spec("triton") is not None

OPEN_WINDOW = """
import faulthandler, sys
faulthandler.enable()
import numpy as np
import napari
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=True)
viewer.add_image(np.random.default_rng(0).random((4, 64, 64)).astype("float32"), name="scan")
for _ in range(20):          # let the canvas create and use its GL context
    QApplication.processEvents()
assert "triton" not in sys.modules and "timm" not in sys.modules
"""

WIDGET_AFTER_WINDOW = OPEN_WINDOW + """
import time
from napari_medconddiff import _torch_import
from napari_medconddiff._widget import CHECKPOINT_FILE
if sys.argv[2] == "no-protection":       # the control: the same run without the fix
    _torch_import.protect_triton_import = lambda: None
_, widget = viewer.window.add_plugin_dock_widget("napari-medconddiff", "MedCondDiff segmentation")
finished = []
widget.run_finished.connect(finished.append)
deadline = time.time() + 180
while widget.controller.engine is None and time.time() < deadline:
    QApplication.processEvents(); time.sleep(0.01)
widget.model_combo.setCurrentText(CHECKPOINT_FILE)
widget.checkpoint_edit.setText(sys.argv[1])
widget.steps_spin.setValue(2)
widget.segment_button.click()
while not finished and time.time() < deadline:
    QApplication.processEvents(); time.sleep(0.01)
print("run", finished, [layer.name for layer in viewer.layers], "triton loaded:", "triton" in sys.modules, flush=True)
viewer.close()
"""


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X display (pytest-xvfb provides one)")
    # A real GL context, as in a desktop session; one torch thread, so a machine shared with other jobs
    # does not slow the run down with threads spinning against each other.
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env)


def _explain(process: subprocess.CompletedProcess) -> str:
    return f"exit code {process.returncode}\n--- stdout\n{process.stdout[-3000:]}\n--- stderr\n{process.stderr[-3000:]}"


def test_widget_segments_in_a_fresh_napari_process(tiny_checkpoint):
    """The user's path: napari's window first, then the widget imports torch/timm in its workers."""
    process = _run(WIDGET_AFTER_WINDOW, str(tiny_checkpoint), "protect")
    assert process.returncode == 0, _explain(process)
    assert "run ['done']" in process.stdout and "scan consensus" in process.stdout, _explain(process)
    assert f"triton loaded: {TRITON_INSTALLED}" in process.stdout   # the dangerous import really happened


def test_without_the_fix_this_machine_crashes(tiny_checkpoint):
    """Control: shows the check above is meaningful here (skipped where the GL driver has no LLVM)."""
    process = _run(WIDGET_AFTER_WINDOW, str(tiny_checkpoint), "no-protection")
    if process.returncode == 0:
        pytest.skip("importing triton after the GL context does not crash on this machine")
    assert process.returncode == -signal.SIGSEGV, _explain(process)
    assert "triton" in process.stderr
