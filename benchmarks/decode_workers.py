"""How many processes should decode an image folder: images/s of ``decode_files`` by number of processes.

Image folders (``data.num_workers``), caption sets and ``ssl-toolkit embed`` (``--workers``) decode in one process per
CPU core by default (``None``); 0 is this process. A set of fewer than 2 x ``IMAGES_PER_PROCESS`` images is decoded
here whatever the setting, since starting a pool costs more than it saves. Two parts, each arm timed in ``--rounds``
rounds interleaved with the others, after one untimed pass that reads the files into the page cache:
  large: the whole folder with 0 (this process), 2, 4, ... processes up to the cores this process may use, and the
         default (``None``);
  small: the first 32-1024 images with 0 processes, and with a pool forced on every core; where the pool loses,
         the default decodes here.

  python benchmarks/decode_workers.py          # CIFAR-10's training JPEGs (data/cifar10-folder/train, unpack.py)
  python benchmarks/decode_workers.py --folder ../shared/datasets/flickr8k-1k/images --size 64 \\
      --out benchmarks/results/decode-workers-cpu-flickr.json

Writes ``benchmarks/results/decode-workers-cpu.json`` with the commit, device and versions.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from throughput import environment, write_record  # noqa: E402

from ssl_toolkit.data import images  # noqa: E402
from ssl_toolkit.data.images import cpu_cores, decode_files, image_files  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seconds(paths: list[str], size: int, workers: int | None, forced: bool) -> float:
    """One timed decode; ``forced``: a pool of ``workers`` even where the default would decode here."""
    per_process = images.IMAGES_PER_PROCESS
    images.IMAGES_PER_PROCESS = 1 if forced else per_process
    try:
        start = time.perf_counter()
        _, _, bad = decode_files(paths, size, workers)
        took = time.perf_counter() - start
    finally:
        images.IMAGES_PER_PROCESS = per_process
    if bad:
        sys.exit(f"{len(bad)} unreadable images, e.g. {bad[0]}")
    return took


def timed(arms: dict, paths: list[str], size: int, rounds: int) -> dict:
    """``{arm: (workers, forced)}`` -> ``{arm: {images_per_s, seconds}}``, arms interleaved round by round."""
    times = {arm: [] for arm in arms}
    for _ in range(rounds):
        for arm, (workers, forced) in arms.items():
            times[arm].append(seconds(paths, size, workers, forced))
    return {arm: {"images_per_s": len(paths) / statistics.median(t), "seconds": t} for arm, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=os.path.join(ROOT, "data", "cifar10-folder", "train"))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args()
    paths = image_files(a.folder)
    if not paths:
        sys.exit(f"no images under {a.folder}; unpack CIFAR-10 with `python ../shared/datasets/cifar10/unpack.py "
                 "data/cifar10-folder --imagefolder` or pass --folder")
    cores = cpu_cores()
    decode_files(paths, a.size, cores)  # into the page cache: every arm reads warm files
    counts = sorted({0, *(2 ** i for i in range(1, cores.bit_length())), *([cores] if cores > 1 else [])})
    large = timed({**{str(n): (n, False) for n in counts}, "default": (None, False)}, paths, a.size, a.rounds)
    base = large["0"]["images_per_s"]
    for arm, row in large.items():
        row["speedup"] = row["images_per_s"] / base
        print(f"{len(paths):,} images, {arm:>7} processes: {row['images_per_s']:7.0f} images/s, "
              f"x{row['speedup']:.2f}", flush=True)
    small = {}
    for n in (32, 64, 128, 256, 512, 1024):
        if n < len(paths):
            small[str(n)] = row = timed({"here": (0, False), f"pool of {cores}": (cores, True)}, paths[:n], a.size,
                                        a.rounds * 3)
            print(f"{n:6,} images: " + ", ".join(f"{arm} {r['images_per_s']:5.0f} images/s" for arm, r in row.items()),
                  flush=True)
    record = {**environment(torch.device("cpu")), "command": " ".join(sys.argv), "folder": os.path.normpath(a.folder),
              "images": len(paths), "image_size": a.size, "rounds": a.rounds, "cores_usable": cores,
              "images_per_process": images.IMAGES_PER_PROCESS, "large": large, "small": small}
    out = a.out or os.path.join(os.path.dirname(__file__), "results", "decode-workers-cpu.json")
    write_record(record, out)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
