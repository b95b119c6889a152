"""The dock's sampling rows: steps, adaptive stopping, seed(s), the consensus and how many first steps it
leaves out. Changing the consensus or skip-first re-fuses the last results (the ``on_consensus`` callback)."""

from __future__ import annotations

from typing import Any, Callable

from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout

from medconddiff.config import CONSENSUS_CHOICES, SamplingConfig

from ._form_controls import spin_box
from ._segment_flow import CONSENSUS_NAMES

__all__ = ["SamplingForm"]


class SamplingForm:
    def __init__(self, form: QFormLayout, on_consensus: Callable[..., Any]):
        defaults = SamplingConfig()
        self.steps_spin = spin_box(1, 1000, defaults.steps, "Denoising steps per seed")
        # Typing "10" must not pass through 1 step (which would clamp Skip first steps on the way).
        self.steps_spin.setKeyboardTracking(False)
        self.steps_spin.valueChanged.connect(self._on_steps_changed)
        form.addRow("Steps", self.steps_spin)
        self.adaptive_check = QCheckBox("Stop each slice once it has converged")
        self.adaptive_check.setChecked(defaults.adaptive)
        self.adaptive_check.setToolTip("Adaptive steps: a slice stops denoising once fewer than "
                                       f"{defaults.convergence_change:.0%} of its foreground pixels change label "
                                       f"for {defaults.convergence_patience} steps in a row, or at the model's own "
                                       "step cap (recorded in its checkpoint: the step after which its later steps "
                                       "added nothing on labelled slices); Steps is then the most it takes. The x0 "
                                       "slider repeats a stopped slice's last step.")
        form.addRow("Adaptive", self.adaptive_check)
        self.seed_spin = spin_box(0, 2**31 - 1, defaults.seed, "Seed of the initial noise")
        form.addRow("Seed", self.seed_spin)
        self.seeds_spin = spin_box(1, 64, defaults.num_seeds, "Independent runs pooled into one consensus")
        form.addRow("Number of seeds", self.seeds_spin)
        self.consensus_combo = QComboBox()
        for method in CONSENSUS_CHOICES:
            self.consensus_combo.addItem(CONSENSUS_NAMES[method], method)
        self.consensus_combo.setCurrentIndex(self.consensus_combo.findData(defaults.consensus))
        # Widget texts spell x̂0 as "x0": Qt mis-places the combining hat when it wraps a label.
        self.consensus_combo.setToolTip("How the predicted x0 of all steps are fused. 'The model's choice' is the "
                                        "fusion recorded in the checkpoint (a fine-tune chooses it on a corrected "
                                        "slice it held back; mean where none is recorded). Changing it re-fuses "
                                        "the last results at once (no new diffusion); it asks before touching "
                                        "slices you edited")
        self.consensus_combo.currentIndexChanged.connect(on_consensus)
        form.addRow("Consensus", self.consensus_combo)
        self.skip_spin = spin_box(0, defaults.steps - 1, defaults.skip_first,
                                  "Leave the first (noisiest) k steps out of the consensus")
        self.skip_spin.valueChanged.connect(on_consensus)
        form.addRow("Skip first steps", self.skip_spin)

    def _on_steps_changed(self, steps: int) -> None:
        # Steps are for the next run: a skip clamped to fit them must not re-fuse the result shown.
        self.skip_spin.blockSignals(True)
        self.skip_spin.setMaximum(max(0, steps - 1))
        self.skip_spin.blockSignals(False)

    def show_consensus(self, method: str, skip_first: int) -> None:
        """Show a consensus the labels have (a Ctrl-Z of a re-fusion brought it back) without re-fusing."""
        index = self.consensus_combo.findData(method)
        for control in (self.consensus_combo, self.skip_spin):
            control.blockSignals(True)
        try:
            if index >= 0:
                self.consensus_combo.setCurrentIndex(index)
            self.skip_spin.setValue(skip_first)
        finally:
            for control in (self.consensus_combo, self.skip_spin):
                control.blockSignals(False)

    def consensus(self) -> tuple[str, int]:
        """(consensus method, steps skipped) as chosen."""
        return self.consensus_combo.currentData(), self.skip_spin.value()

    def config(self, precision: str) -> SamplingConfig:
        return SamplingConfig(steps=self.steps_spin.value(), seed=self.seed_spin.value(),
                              num_seeds=self.seeds_spin.value(), consensus=self.consensus_combo.currentData(),
                              skip_first=self.skip_spin.value(), adaptive=self.adaptive_check.isChecked(),
                              precision=precision)
