"""Memory and time to load an image folder: ``ImageFolderDataModule.setup()``, which decodes every image once and
keeps it in memory as uint8.

Each size runs in a fresh process; the peak is the rise of its maximum resident memory (``ru_maxrss``) over the
setup, against the decoded set's own size (``N * 3 * image_size^2`` bytes), so 1.0x is the floor.

  python ../shared/datasets/cifar10/unpack.py data/cifar10-folder --imagefolder   # 60,000 JPEGs
  python benchmarks/folder_memory.py                                               # data/cifar10-folder, 32 and 64 px

Until the commit that added this script, decoding collected the decoded arrays, stacked them and made them
channels-first. At 2f80b2a, on 2 AMD EPYC cores with 2 decoding processes, the peak was 472 MiB for the 176 MiB set
at 32 px (2.7x) and 1,792 MiB for the 703 MiB set at 64 px (2.5x; 3.0x for the training split alone). Each image now
goes into the set as it arrives.

Writes ``benchmarks/results/folder-memory-cpu.json`` with the commit, device and versions.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from throughput import environment, write_record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(folder: str, size: int, workers: int) -> dict:
    """Set up the folder at ``size`` in this process: seconds, the set's MiB and the peak memory rise in MiB."""
    from ssl_toolkit.data import ImageFolderDataModule

    dm = ImageFolderDataModule(folder, image_size=size, num_workers=workers)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    dm.setup()
    seconds = time.perf_counter() - start
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    s = dm.splits
    data = (s.x_train.numel() + s.x_test.numel()) / 2 ** 20
    return {"image_size": size, "images": len(s.y_train) + len(s.y_test), "seconds": round(seconds, 2),
            "set_mib": round(data, 1), "peak_rise_mib": round(rise, 1), "peak_over_set": round(rise / data, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=os.path.join(ROOT, "data", "cifar10-folder"))
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in a fresh process
    p.add_argument("--out")
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.folder, a.child, a.workers)))
        return
    if not os.path.isdir(a.folder):
        sys.exit(f"{a.folder} does not exist; unpack CIFAR-10 as an image folder first (see --help).")
    rows = []
    for size in map(int, a.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--folder", a.folder, "--workers", str(a.workers),
                              "--child", str(size)], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['images']:,} images at {size} px: {r['seconds']} s, set {r['set_mib']} MiB, "
              f"peak rise {r['peak_rise_mib']} MiB ({r['peak_over_set']}x)")
    record = {**environment(torch.device("cpu")), "command": " ".join(sys.argv), "folder": os.path.normpath(a.folder),
              "workers": a.workers, "results": rows}
    out = a.out or os.path.join(os.path.dirname(__file__), "results", "folder-memory-cpu.json")
    write_record(record, out)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
