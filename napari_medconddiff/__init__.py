"""napari plugin for MedCondDiff; npe2 loads its parts lazily from napari.yaml.

Nothing here imports torch, napari or Qt, so discovering the plugin stays cheap.
"""

__version__ = "0.2.0"
