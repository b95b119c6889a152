"""Write the MNI152 2009a T1 template and a grey/white-matter label map as NIfTI, for the README's
MRI fine-tuning figures. Needs `pip install nilearn` (not a dependency of napari-medconddiff;
nilearn ships these files, so nothing is downloaded).

    python docs/make_mni152.py OUT_DIR     # writes OUT_DIR/mni152_t1.nii.gz and OUT_DIR/mni152_gm_wm.nii.gz

Labels: 0 background (including CSF), 1 grey matter, 2 white matter — for each voxel the most probable
of (1 - p_grey - p_white, p_grey, p_white), from the template's probability maps. 197×233×189, 1 mm, RAS.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn import datasets


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t1 = datasets.load_mni152_template(resolution=1)
    grey = np.asanyarray(datasets.load_mni152_gm_template(resolution=1).dataobj)
    white = np.asanyarray(datasets.load_mni152_wm_template(resolution=1).dataobj)
    labels = np.stack([1 - grey - white, grey, white]).argmax(0).astype(np.uint8)
    nib.save(nib.Nifti1Image(np.asanyarray(t1.dataobj).astype(np.float32), t1.affine), str(out / "mni152_t1.nii.gz"))
    nib.save(nib.Nifti1Image(labels, t1.affine), str(out / "mni152_gm_wm.nii.gz"))
    print(f"wrote {out / 'mni152_t1.nii.gz'} and {out / 'mni152_gm_wm.nii.gz'}: "
          f"label voxels {np.bincount(labels.ravel()).tolist()}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
