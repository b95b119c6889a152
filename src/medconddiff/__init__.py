"""MedCondDiff: semantically guided diffusion segmentation of CT and MRI volumes (core library).

Importing this package never imports Qt or napari, and does not import torch until a model is used.
"""

__version__ = "0.2.0"
