"""Write the real-size test volumes of the benchmark (512×512×300 CTs, LPS, int16 HU) into a folder.

    python docs/make_real_size_volumes.py OUT_DIR [--lung2 path/to/lung2_image.nii.gz]

* ``sample_upsampled_512x512x300.nii.gz``: the bundled liver sample (128³ at 1 mm) resampled in-plane to
  0.7 mm (linear), padded with air (-1024 HU) to 512² (a 358 mm field of view), its 128 slices repeated
  to 300 (nearest), stored LPS at 0.7 × 0.7 × 1 mm.
* ``real_ct_512x512x300.nii.gz`` (with ``--lung2``): a real chest CT (512×512×61, 0.63 mm, 5 mm slices)
  resampled along its slice axis to 300 slices (linear), stored LPS.

The third real-size volume, CT-like noise, is the benchmark's own synthetic big volume. Then:

    medconddiff benchmark --real-size OUT_DIR/sample_upsampled_512x512x300.nii.gz \\
        --real-size OUT_DIR/real_ct_512x512x300.nii.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SHAPE = (512, 512, 300)
AIR_HU = -1024


def lps_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])


def write(volume: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    image = nib.Nifti1Image(np.clip(np.rint(volume), -32768, 32767).astype(np.int16), lps_affine(spacing))
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    print(f"wrote {path}: {volume.shape} at {spacing} mm")


def upsampled_sample(out: Path) -> None:
    from medconddiff.nifti import load_volume, sample_scan_path

    volume, meta = load_volume(sample_scan_path())
    # The sample is RAS; as LPS the first two axes run the other way.
    volume = volume[::-1, ::-1]
    zoom = (meta.spacing[0] / 0.7, meta.spacing[1] / 0.7)
    plane = np.stack([ndimage.zoom(volume[:, :, k], zoom, order=1) for k in range(volume.shape[2])], axis=2)
    big = np.full(SHAPE, AIR_HU, np.float32)
    x0, y0 = (SHAPE[0] - plane.shape[0]) // 2, (SHAPE[1] - plane.shape[1]) // 2
    repeat = np.minimum((np.arange(SHAPE[2]) * volume.shape[2]) // SHAPE[2], volume.shape[2] - 1)
    big[x0:x0 + plane.shape[0], y0:y0 + plane.shape[1]] = plane[:, :, repeat]
    write(big, (0.7, 0.7, float(meta.spacing[2])), out / "sample_upsampled_512x512x300.nii.gz")


def real_ct(lung2: Path, out: Path) -> None:
    from medconddiff.nifti import load_volume

    volume, meta = load_volume(lung2)
    if volume.shape[:2] != SHAPE[:2]:
        raise SystemExit(f"{lung2}: expected a 512×512 CT, got {volume.shape}")
    thickness = meta.spacing[2] * volume.shape[2] / SHAPE[2]
    positions = np.linspace(0, volume.shape[2] - 1, SHAPE[2])
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, volume.shape[2] - 1)
    weight = (positions - low).astype(np.float32)
    big = volume[:, :, low] * (1 - weight) + volume[:, :, high] * weight
    # Stored LPS like the source (its first two axes already run R→L, A→P).
    write(big, (float(meta.spacing[0]), float(meta.spacing[1]), float(thickness)), out / "real_ct_512x512x300.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--lung2", type=Path, help="the lung2 chest CT (shared data) for the real CT volume")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    upsampled_sample(args.out)
    if args.lung2:
        real_ct(args.lung2, args.out)


if __name__ == "__main__":
    main()
