"""The shipped models still segment their held-out slices as well as the README says.

A change to the engine, the preprocessing or a checkpoint that breaks a shipped model fails here.
Held-out slices 52–67 of the bundled liver CT (never trained on: training used slices 0–39 and
80–127; same patient), default sampling at 5 steps (adaptive), seed 0. The expected values are
this exact run, measured with the consensus and step cap each checkpoint records (default: ``last``
of at most 2 steps; LSegDiff: its one-shot forward, beside at most 2 steps); the
tolerance allows float-rounding differences across machines, not a regression.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medconddiff.config import SamplingConfig
from medconddiff.evaluation import dice_per_class
from medconddiff.nifti import load_labels, load_volume, sample_label_path, sample_scan_path
from medconddiff.segmenter import Segmenter

SLAB = range(52, 68)
EXPECTED = {"default": (0.9034, 0.8334), "lsegdiff-liver": (0.8932, 0.8240)}
TOLERANCE = 0.01


@pytest.fixture(scope="module")
def sample():
    image, meta = load_volume(sample_scan_path())
    labels, _ = load_labels(sample_label_path())
    return image, meta, labels


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_bundled_model_keeps_its_held_out_dice(sample, name):
    image, meta, labels = sample
    previous = torch.get_num_threads()
    torch.set_num_threads(1)      # steadier on a shared machine; results do not depend on it
    try:
        result = Segmenter.from_checkpoint(name, device="cpu").segment(image, SamplingConfig(steps=5), slices=SLAB,
                                                                         meta=meta)
    finally:
        torch.set_num_threads(previous)
    liver, tumour = dice_per_class(result.labels[:, :, SLAB.start:SLAB.stop], labels[:, :, SLAB.start:SLAB.stop], 3)
    expected_liver, expected_tumour = EXPECTED[name]
    assert liver >= expected_liver - TOLERANCE and tumour >= expected_tumour - TOLERANCE, (liver, tumour)
    assert result.provenance["plan"]["slicing"] == "axial" and np.all(result.steps_used <= 5)


def test_bf16_arithmetic_on_cpu_keeps_the_held_out_dice_and_is_recorded(sample):
    """``precision="bf16"`` runs the network under CPU autocast (faster where the CPU has AVX-512 BF16 or
    AMX); the labels barely move, the default model keeps its documented Dice, and the record says how it ran."""
    image, meta, labels = sample
    segmenter = Segmenter.from_checkpoint("default", device="cpu")
    runs = {p: segmenter.segment(image, SamplingConfig(steps=5, precision=p), slices=SLAB, meta=meta)
            for p in ("auto", "bf16")}
    assert runs["auto"].provenance["arithmetic"] == "fp32" and runs["bf16"].provenance["arithmetic"] == "bf16"
    slab = (slice(None), slice(None), slice(SLAB.start, SLAB.stop))
    agreement = np.mean(runs["bf16"].labels[slab] == runs["auto"].labels[slab])
    assert agreement > 0.99, agreement
    liver, tumour = dice_per_class(runs["bf16"].labels[slab], labels[slab], 3)
    assert liver >= EXPECTED["default"][0] - TOLERANCE and tumour >= EXPECTED["default"][1] - TOLERANCE
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        SamplingConfig(precision="fp16")
