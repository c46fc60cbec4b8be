"""Obtain a dataset for `pretrain`/`evaluate`: `python scripts/fetch_data.py fashion_mnist [--root data]`.

Fashion-MNIST is taken from Debian's `dataset-fashion-mnist` package when it is installed (no copy
is made: the loader reads it in place), else installed with apt when running as root on Debian,
else downloaded by torchvision into `<root>/FashionMNIST/raw`.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys

from vfm.data import datasets

BUILDERS = {
    "fashion_mnist": datasets.fashion_mnist,
    "mnist": datasets.mnist,
    "cifar10": functools.partial(datasets.benchmark, variant="cifar10", img_size=32, in_chans=3, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": functools.partial(datasets.benchmark, variant="cifar100", img_size=32, in_chans=3, mean=(0.5071, 0.4865, 0.4409),
                                  std=(0.2673, 0.2564, 0.2762), num_classes=100),
    "stl10": datasets.stl10,
}


def try_load(name: str, root: str, download: bool) -> bool:
    try:
        splits = BUILDERS[name](root=root, download=download)
    except datasets.DatasetNotFoundError:
        return False
    print(f"{name}: ready ({len(splits.train)} train / {len(splits.val or [])} val / {len(splits.test or [])} test)")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(BUILDERS))
    ap.add_argument("--root", default=os.environ.get("VFM_DATA_DIR", "data"))
    args = ap.parse_args()
    if try_load(args.name, args.root, download=False):
        return 0
    if args.name == "fashion_mnist" and shutil.which("apt-get") and os.geteuid() == 0:
        print("installing Debian's dataset-fashion-mnist ...")
        subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=False)
        if try_load(args.name, args.root, download=False):
            return 0
    print(f"downloading {args.name} into {args.root} ...")
    try:
        return 0 if try_load(args.name, args.root, download=True) else 1
    except Exception as e:  # no network, mirror down: say what to do instead
        print(f"could not download {args.name}: {e}\nPlace the files under {args.root} (torchvision layout) "
              f"or set VFM_DATA_DIR.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
