"""Copy the real photographs that the scikit-image wheel ships into one folder, for the image run.

They are the only natural images reachable on our build and GPU machines (CIFAR-10 and ImageNet
cannot be downloaded there). Synthetic pictures that skimage also ships (logo, color wheel,
checkerboards, text scans, phantoms) are left out. The folder then loads as 32x32 tiles:

    python experiments/skimage_photos.py photos/
    sparse-transformer train --preset cifar10-small --dataset images --data photos/ --time 300
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
          "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
          "motorcycle_right.png", "retina.jpg", "rocket.jpg")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to copy the photographs into")
    args = parser.parse_args()
    try:
        import skimage
    except ImportError:
        raise SystemExit("error: scikit-image is not installed (pip install scikit-image)")
    source = Path(skimage.__file__).parent / "data"
    args.out.mkdir(parents=True, exist_ok=True)
    found = [name for name in PHOTOS if (source / name).is_file()]
    for name in found:
        shutil.copyfile(source / name, args.out / name)
    missing = sorted(set(PHOTOS) - set(found))
    print(f"copied {len(found)} photographs from {source} to {args.out}"
          + (f"; not in this scikit-image: {', '.join(missing)}" if missing else ""))
    if len(found) < 3:
        raise SystemExit("error: need at least 3 photographs (train, validation and test are split by picture)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
