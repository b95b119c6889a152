"""npe2 sample data: the bundled liver CT (LiTS case 117, 128^3 crop, HU) and its labels.

Layers are built by the reader, so they carry the same axis convention, scale and metadata as
a file opened from disk (the writer can save them back as NIfTI).
"""

from __future__ import annotations

from medconddiff.nifti import sample_label_path, sample_scan_path

from ._reader import LayerData, read_layer

__all__ = ["liver_ct", "liver_ct_with_labels"]


def liver_ct() -> list[LayerData]:
    """The sample scan as one Image layer."""
    return [read_layer(sample_scan_path())]


def liver_ct_with_labels() -> list[LayerData]:
    """The sample scan plus its reference labels (1 liver, 2 tumour) as a Labels layer."""
    return [read_layer(sample_scan_path()), read_layer(sample_label_path())]
