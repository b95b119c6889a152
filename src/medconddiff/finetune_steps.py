"""How many optimizer steps a fine-tune takes when nobody says: the rule and the words for it.

Torch-free, so that the napari plugin's tooltip and the command line's help state the rule from the
same constants the fine-tune runs with.

200 for one scan: one scan's fine-tune then rises step after step (README: "Do the diffusion steps
earn their cost?"). A set of two scans needs more: lung2's held-out lesion Dice for training seeds
0 / 1 / 2 was 0.171 / 0.000 / 0.100 at 200 steps (its steps falling after a peak), 0.532 / 0.463 /
0.206 at 400, and 0.607 / 0.507 / 0.605 at 600 (the same day; README: "Corrections that add up").
A set of three scans (one labelled for other classes) did no better at 1000 steps than at 600
(README: "A third scan labelled for other classes lowered the lesion"), and 600 steps on a 5-case
set are what the 2-minute target leaves room for on this project's 2-core CPU, so the rule stops there.
"""

from __future__ import annotations

ONE_SCAN_FINETUNE_STEPS = 200
SET_FINETUNE_STEPS = 600


def default_finetune_steps(scans: int) -> int:
    """Optimizer steps for a fine-tune on ``scans`` scans (corrected scans plus training-set cases)."""
    return ONE_SCAN_FINETUNE_STEPS if int(scans) <= 1 else SET_FINETUNE_STEPS


def finetune_steps_rule() -> str:
    """The rule in words, for help texts: "200 for one scan, 600 when it learns from more"."""
    return f"{ONE_SCAN_FINETUNE_STEPS} for one scan, {SET_FINETUNE_STEPS} when it learns from more"
