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

``--ranks N`` measures what the DDP ranks of one node hold: N processes set up the folder at once and read every
image (as training does), first each decoding its own copy (no ``data.cache_dir``), then mapping one cache entry
that one process wrote before (what Lightning's ``prepare_data`` does on each node). The node's memory is the sum
over the ranks of their private memory's rise plus their proportional share (PSS) of the mapped entry, read from
``/proc/<pid>/smaps`` while all N hold the set. Writes ``benchmarks/results/folder-memory-ranks-cpu.json``.

  python benchmarks/folder_memory.py --ranks 4

A folder with a ``captions.txt`` is a caption set (CLIP's ``CaptionDataModule``: the images the CSV names, split into
training and held-out images) and is measured the same way; its results go to ``...-captions.json``:

  python benchmarks/folder_memory.py --folder ../shared/datasets/flickr8k-1k --sizes 64,224
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from throughput import environment, write_record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held(s) -> tuple[int, float]:
    """The images a DataModule's splits hold, and their MiB: each once (an unlabelled folder's test split is its
    training set, the same tensor)."""
    splits = [(s.x_train, s.y_train)] + ([(s.x_test, s.y_test)] if s.x_test is not s.x_train else [])
    return sum(len(y) for _, y in splits), sum(x.numel() for x, _ in splits) / 2 ** 20


def captions(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "captions.txt"))


def datamodule(folder: str, size: int, workers: int, cache: str | None = None):
    """The DataModule of ``folder``: a caption set's when it holds ``captions.txt``, else an image folder's."""
    from ssl_toolkit.data import CaptionDataModule, ImageFolderDataModule

    kind = CaptionDataModule if captions(folder) else ImageFolderDataModule
    return kind(folder, image_size=size, num_workers=workers, cache_dir=cache)


def measure(folder: str, size: int, workers: int) -> dict:
    """Set up the folder at ``size`` in this process: seconds, the set's MiB and the peak memory rise in MiB."""
    dm = datamodule(folder, size, workers)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    dm.setup()
    seconds = time.perf_counter() - start
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    s = dm.splits
    images, data = held(s)
    return {"image_size": size, "images": images, "seconds": round(seconds, 2),
            "set_mib": round(data, 1), "peak_rise_mib": round(rise, 1), "peak_over_set": round(rise / data, 2)}


def save(a, rows: list[dict], name: str) -> None:
    """Write ``rows`` with the commit, device and versions to ``--out`` or ``benchmarks/results/<name>``."""
    record = {**environment(torch.device("cpu")), "command": " ".join(sys.argv), "folder": os.path.normpath(a.folder),
              "workers": a.workers, "results": rows}
    if captions(a.folder):
        name = name.replace(".json", "-captions.json")
    out = a.out or os.path.join(os.path.dirname(__file__), "results", name)
    write_record(record, out)
    print(f"-> {out}")


def hold(folder: str, size: int, workers: int, cache: str | None) -> None:
    """One rank: set up the folder (through ``cache``, if given) and read every image (timed together), report, and
    hold the set until told (a line on stdin), so that every rank is measured while all of them hold theirs."""
    anon = memory(os.getpid())["anon_mib"]
    dm = datamodule(folder, size, workers, cache)
    start = time.perf_counter()
    dm.setup()
    s = dm.splits
    s.x_train.amax(), s.x_test.amax()  # every page read, as the training batches will (a sum would copy to int64)
    seconds, (images, data) = time.perf_counter() - start, held(s)
    print(json.dumps({"seconds": round(seconds, 2), "anon_before_mib": anon, "set_mib": round(data, 1),
                      "images": images}), flush=True)
    sys.stdin.readline()


def memory(pid: int, under: str | None = None) -> dict:
    """A process's private (anonymous) memory, and its proportional share of the files it maps from ``under``, in
    MiB (``/proc/<pid>/smaps``)."""
    anon = mapped = 0
    path = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: address perms offset dev inode [path]
                path = fields[5] if len(fields) > 5 else ""
            elif fields[0] == "Anonymous:":
                anon += int(fields[1])
            elif fields[0] == "Pss:" and under and path.startswith(under):
                mapped += int(fields[1])
    return {"anon_mib": round(anon / 1024, 1), "mapped_pss_mib": round(mapped / 1024, 1)}


def ranks(folder: str, size: int, workers: int, n: int, cache: str | None) -> dict:
    """``n`` processes holding the folder at ``size`` at once: the node's memory and each rank's setup time."""
    cmd = [sys.executable, __file__, "--folder", folder, "--workers", str(workers), "--hold", str(size)]
    procs = [subprocess.Popen(cmd + (["--cache", cache] if cache else []), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        reports = [json.loads(p.stdout.readline()) for p in procs]
        held = [memory(p.pid, cache) for p in procs]
    finally:
        for p in procs:
            p.communicate("\n")
    per_rank = [{"private_rise_mib": round(h["anon_mib"] - r["anon_before_mib"], 1),
                 "mapped_pss_mib": h["mapped_pss_mib"]} for r, h in zip(reports, held)]
    node = sum(r["private_rise_mib"] + r["mapped_pss_mib"] for r in per_rank)
    set_mib = reports[0]["set_mib"]
    return {"ranks": n, "cache": cache is not None, "images": reports[0]["images"], "set_mib": set_mib,
            "setup_seconds": [r["seconds"] for r in reports], "node_mib": round(node, 1),
            "node_over_set": round(node / set_mib, 2), "per_rank": per_rank}


def node_memory(a) -> None:
    """``--ranks``: each size without a cache, then with one (written once first, timed), N ranks at once."""
    rows = []
    for size in map(int, a.sizes.split(",")):
        rows.append(ranks(a.folder, size, a.workers, a.ranks, None))
        with tempfile.TemporaryDirectory(dir=a.cache_parent) as cache:
            build = [sys.executable, __file__, "--folder", a.folder, "--workers", str(a.workers), "--build",
                     str(size), "--cache", cache]
            start = time.perf_counter()
            subprocess.run(build, check=True)
            written = time.perf_counter() - start
            rows.append({**ranks(a.folder, size, a.workers, a.ranks, cache), "write_seconds": round(written, 2),
                         "entry_mib": round(sum(f.stat().st_size for f in os.scandir(next(os.scandir(cache)).path))
                                            / 2 ** 20, 1)})
        for r in rows[-2:]:
            how = (f"one cache entry (written once in {r['write_seconds']} s, {r['entry_mib']} MiB on disk)"
                   if r["cache"] else "each decoding its own copy")
            print(f"{r['ranks']} ranks, {r['images']:,} images at {size} px, {how}: node memory {r['node_mib']} MiB "
                  f"({r['node_over_set']}x the {r['set_mib']} MiB set); setup "
                  f"{min(r['setup_seconds'])}-{max(r['setup_seconds'])} s a rank")
    save(a, rows, "folder-memory-ranks-cpu.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=os.path.join(ROOT, "data", "cifar10-folder"))
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    p.add_argument("--ranks", type=int, help="measure N processes holding the folder at once, without and with "
                                              "data.cache_dir (DDP ranks of one node)")
    p.add_argument("--cache_parent", help="where --ranks puts its temporary cache (default: the system's temp folder)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in a fresh process
    p.add_argument("--hold", type=int, help=argparse.SUPPRESS)  # one rank of --ranks
    p.add_argument("--build", type=int, help=argparse.SUPPRESS)  # write --ranks' cache entry
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--out")
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.folder, a.child, a.workers)))
        return
    if a.hold:
        return hold(a.folder, a.hold, a.workers, a.cache)
    if a.build:
        return datamodule(a.folder, a.build, a.workers, a.cache).prepare_data()
    if not os.path.isdir(a.folder):
        sys.exit(f"{a.folder} does not exist; unpack CIFAR-10 as an image folder first (see --help).")
    if a.ranks:
        return node_memory(a)
    rows = []
    for size in map(int, a.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--folder", a.folder, "--workers", str(a.workers),
                              "--child", str(size)], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['images']:,} images at {size} px: {r['seconds']} s, set {r['set_mib']} MiB, "
              f"peak rise {r['peak_rise_mib']} MiB ({r['peak_over_set']}x)")
    save(a, rows, "folder-memory-cpu.json")


if __name__ == "__main__":
    main()
