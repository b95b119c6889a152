"""Whether an image channel can be CT in Hounsfield units (numpy only: the plugin asks on the GUI thread)."""

from __future__ import annotations

import numpy as np


def looks_like_hounsfield(channel: np.ndarray) -> bool:
    """Whether a channel can be CT in Hounsfield units: some voxel below 0 HU (fat, lung, air).

    Any CT field of view that holds more than one organ has them; MRI, PET and CT stored without
    its rescale intercept have none, and a fixed HU window would flatten them into a few grey levels.
    An empty channel has no such voxel.
    """
    return bool(channel.size > 0 and channel.min() < 0)
