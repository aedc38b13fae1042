"""Decoding an image folder into memory: JPEGs decoded reduced (libjpeg's DCT scaling) against decoded whole.

Image folders, caption sets and ``ssl-toolkit embed``/``search`` decode each image once and keep the centred
square resampled to ``image_size``. A JPEG at least twice that size on both sides is decoded at 1/2, 1/4 or 1/8
scale (Pillow's ``draft``). Arms, interleaved over ``--rounds`` rounds, one process (the cost per core):
  reduced: as the toolkit decodes;
  whole:   the same with the reduction switched off (``JpegImageFile.draft`` made a no-op).
Quality: the mean absolute difference (0-255 levels) of each arm's pixels from an area average (Pillow's BOX
filter) of the whole decoded image's centred square.

  python benchmarks/decode.py                                      # ../shared/datasets/flickr8k-1k/images
  python benchmarks/decode.py --min-side 300 --out benchmarks/results/decode-cpu-300px.json  # its 172 larger ones
  python benchmarks/decode.py --folder photos/ --sizes 64,224

Writes ``benchmarks/results/decode-cpu.json`` with the commit, device and versions.
"""

import argparse
import collections
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin

sys.path.insert(0, os.path.dirname(__file__))
from throughput import environment, write_record  # noqa: E402

from ssl_toolkit.data.images import centred_square, decode_files, image_files  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def area_average(paths: list[str], size: int) -> np.ndarray:
    """(N, size, size, 3) float: each whole image, upright, its centred square area-averaged to ``size``."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            out.append(np.asarray(im.resize((size, size), Image.BOX, box=centred_square(*im.size)), dtype=np.float32))
    return np.stack(out)


def decode(paths: list[str], size: int, reduced: bool, workers: int) -> tuple[float, torch.Tensor]:
    draft = JpegImagePlugin.JpegImageFile.draft
    if not reduced:
        JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None
    try:
        start = time.perf_counter()
        x, _, bad = decode_files(paths, size, workers)
        seconds = time.perf_counter() - start
    finally:
        JpegImagePlugin.JpegImageFile.draft = draft
    if bad:
        sys.exit(f"{len(bad)} unreadable images, e.g. {bad[0]}")
    return seconds, x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=os.path.join(ROOT, "..", "shared", "datasets", "flickr8k-1k", "images"))
    p.add_argument("--sizes", default="32,64,96,224")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-side", type=int, default=0, help="only images whose shorter side is at least this")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: this one)")
    p.add_argument("--out")
    a = p.parse_args()
    sizes = {}
    for f in image_files(a.folder):
        with Image.open(f) as im:
            sizes[f] = im.size
    paths = [f for f, wh in sizes.items() if min(wh) >= a.min_side]
    if not paths:
        sys.exit(f"no images under {a.folder}" + (f" with a shorter side of {a.min_side} px or more" * bool(sizes)))
    sizes = collections.Counter(sizes[f] for f in paths)
    results = {}
    for size in (int(s) for s in a.sizes.split(",")):
        area = area_average(paths, size)
        seconds, images = {"reduced": [], "whole": []}, {}
        for _ in range(a.rounds):
            for arm in seconds:
                t, images[arm] = decode(paths, size, arm == "reduced", a.workers)
                seconds[arm].append(t)
        error = {arm: float(np.abs(x.permute(0, 2, 3, 1).numpy().astype(np.float32) - area).mean())
                 for arm, x in images.items()}  # decoding is deterministic: the last round's images
        row = {arm: {"images_per_s": len(paths) / statistics.median(seconds[arm]), "seconds": seconds[arm],
                     "mean_abs_diff_from_area_average": error[arm]} for arm in seconds}
        row["speedup"] = row["reduced"]["images_per_s"] / row["whole"]["images_per_s"]
        results[str(size)] = row
        print(f"{size:4d} px: " + "  ".join(f"{arm} {row[arm]['images_per_s']:6.0f} images/s, "
                                            f"{row[arm]['mean_abs_diff_from_area_average']:.2f} from the area average"
                                            for arm in seconds) + f"  speed-up x{row['speedup']:.2f}", flush=True)
    record = {**environment(torch.device("cpu")), "command": " ".join(sys.argv), "folder": os.path.normpath(a.folder),
              "min_side": a.min_side, "images": len(paths), "workers": a.workers, "rounds": a.rounds,
              "image_sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common()}, "by_size": results}
    out = a.out or os.path.join(os.path.dirname(__file__), "results", "decode-cpu.json")
    write_record(record, out)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
