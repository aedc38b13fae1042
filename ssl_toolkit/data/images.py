"""Image files to uint8 tensors: find the images of a folder, decode them (upright by their EXIF orientation,
the centred square resampled to a size), and report the unreadable ones.

Lightning-free, so that ``embed`` and ``search`` read images without importing it (the DataModules in
``ssl_toolkit.data.sources`` build on these)."""

import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ssl_toolkit.progress import Progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".avif", ".gif")
# images in formats Pillow does not decode without a plugin (HEIC: iPhones' default), or raw and layered ones: left
# out, but said, where they had vanished without a word from a folder that mixes them with JPEGs
UNREAD_EXTENSIONS = (".heic", ".heif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".psd",
                     ".svg")
SPLIT_FOLDERS = ("train", "val", "test")  # a labelled image folder: train/<class>/*, and val/<class>/* or test/


def listed(name: str) -> bool:
    """Whether a file or folder named ``name`` is part of an image folder. Hidden names (``.*``) and ``__MACOSX``
    are not, as ``ls`` does not show them: the ``._photo.jpg`` metadata files macOS writes beside each photo on
    USB drives, network shares and in zips (and ``__MACOSX/``, where a zip made on a Mac keeps them) are not
    images and cannot be decoded, and a ``.ipynb_checkpoints`` folder is not a class."""
    return not name.startswith(".") and name != "__MACOSX"


def image_files(folder: str | Path, unread: Counter | None = None) -> list[str]:
    """Every image file under ``folder`` (by extension; subfolders included, hidden files and folders left out:
    :func:`listed`), sorted. Symlinked folders are followed (a set assembled from links to class folders elsewhere,
    whose images were left out without a word), each real folder once: a link back up the tree is no loop. Images in
    formats that are not read (:data:`UNREAD_EXTENSIONS`) are counted by extension into ``unread``, or without it
    named in a warning (:func:`report_unread`)."""
    found, seen, skipped = [], set(), Counter()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # reached before, through a link or the folder itself
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(d for d in folders if listed(d))  # not walked into; sorted: the same folder wins a tie
        found += [os.path.join(root, f) for f in files
                  if listed(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        skipped.update(e for e in (os.path.splitext(f)[1].lower() for f in files if listed(f)) if e in UNREAD_EXTENSIONS)
    if unread is None:
        report_unread(skipped, str(folder))
    else:
        unread.update(skipped)
    return sorted(found)


def unread_note(unread: Counter) -> str:
    """What to say of the images :func:`image_files` left out for their format ("" for none)."""
    n, kinds = sum(unread.values()), ", ".join(f"{c} {e}" for e, c in unread.most_common())
    return f"{n} image{'s' * (n > 1)} in formats that are not read ({kinds}) left out: convert them to JPEG or PNG " \
        "to include them" if n else ""


def report_unread(unread: Counter, where: str) -> None:
    """Warn of the images :func:`image_files` left out for their format, by extension."""
    if unread:
        log.warning("%s: %s.", where, unread_note(unread))


ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2-8 flipped and/or rotated, undone by these (as ImageOps.exif_transpose)
UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
           7: "TRANSVERSE", 8: "ROTATE_90"}
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's 16-bit (and 32-bit integer) grey images


def _to_rgb(im):
    """``im`` as 8-bit RGB. Pillow's own ``convert("RGB")`` clips 16-bit grey (microscopy, medical, depth) at 255,
    so nearly every pixel turns white, and turns float images black. 16-bit grey keeps its high byte (``v >> 8``),
    as Pillow already does for 16-bit RGB on load; float and out-of-range 32-bit images are refused."""
    from PIL import Image

    if im.mode in WIDE_GREY_MODES:
        a = np.asarray(im).astype(np.int64)  # (H, W)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"32-bit integer image with values in [{a.min()}, {a.max()}], outside 16-bit "
                             "[0, 65535]; save it as 8- or 16-bit")
        return Image.fromarray((a >> 8).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        raise ValueError("floating-point image (Pillow mode F): its range is unknown; save it as 8- or 16-bit")
    return im.convert("RGB")


def centred_square(w: float, h: float) -> tuple[float, float, float, float]:
    """The box ``(left, top, right, bottom)`` of the centred square of side ``min(w, h)`` in a ``w x h`` picture."""
    side = min(w, h)
    return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2


def _decode_one(args: tuple[str, int]) -> np.ndarray | str:
    """Decode, turn upright by the EXIF orientation (as viewers show phone photos), and resample the centred square
    of side ``min(width, height)`` to ``size x size`` (bilinear, antialiased); return the error text on failure.

    A JPEG much larger than ``size`` is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's
    ``draft``), as long as both sides stay at least ``size``: about 2x faster for photos at 32-64 px, for pixels
    about one level (of 255) further on average from an area average of the whole image (``benchmarks/decode.py``)."""
    from PIL import Image

    path, size = args
    try:
        with Image.open(path) as im:
            drafted = im.draft(None, (size, size))
            # the picture's extent in decoded pixels: a reduced JPEG's last row and column can be partly padding
            box = centred_square(*(drafted[1][2:] if drafted else im.size))
            out = _to_rgb(im).resize((size, size), Image.BILINEAR, box=box, reducing_gap=None)
            turn = UPRIGHT.get(im.getexif().get(ORIENTATION, 1))
            if turn:  # the centred square turns with the picture: turn the small result, not the whole image
                out = out.transpose(Image.Transpose[turn])
            return np.asarray(out, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt, truncated or unknown files
        return f"{type(e).__name__}: {e}"


Decoded = tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]  # images, indices kept, (path, reason) unreadable


IMAGES_PER_PROCESS = 256  # fewer images than this per decoding process: starting the pool (30-40 ms) costs more


def cpu_cores(sharing: int = 1) -> int:
    """The CPU cores this process may run on (its affinity: what ``taskset``, cgroups or SLURM allow), divided
    among ``sharing`` processes that decode at the same time (the DDP ranks of a node without a cache). A process
    bound to fewer cores than the machine has is taken to have its own share (SLURM binds each task), not divided."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // sharing) if cores >= (os.cpu_count() or 1) else cores


def decoding_processes(workers: int | None, images: int) -> int:
    """The processes that decode ``images`` images: ``workers`` (``None``: one per CPU core, :func:`cpu_cores`), at
    most one per ``IMAGES_PER_PROCESS`` images; 0 when that leaves fewer than 2, meaning this process decodes (a
    pool of one decodes no faster than this process, and costs its start; ``benchmarks/decode_workers.py``)."""
    n = min(cpu_cores() if workers is None else workers, images // IMAGES_PER_PROCESS)
    return n if n >= 2 else 0


def decode_files(paths: list[str], size: int, workers: int | None = None, label: str | None = None) -> Decoded:
    """Decode ``paths`` to uint8 ``(N, 3, size, size)``, shorter side resized, centre-cropped, in ``workers``
    processes (``None``: one per CPU core; 0: this process; a small set always in this process,
    :func:`decoding_processes`).

    Returns the readable images, their indices in ``paths``, and ``(path, reason)`` for each file that could not be
    read; what to do about those is the caller's (``report_unreadable``). With ``label`` (the folder, say), a long
    decoding says how far it is (:class:`~ssl_toolkit.progress.Progress`): ``photos/train: 12,288 of 130,000 images
    decoded, 1,920 a second, about 61 s left``.

    Each image goes into the result as it arrives, so memory peaks at about the result's size (``N * 3 * size^2``
    bytes). Collecting the decoded arrays, stacking them and making them channels-first had peaked at 3x it: 1.8 GB
    for CIFAR-10's 50,000 training images at 64 px, now 0.6 GB. With unreadable files the result is the front of a
    buffer sized for every file.
    """
    x = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    rows, keep, bad = x.numpy(), [], []  # rows: the same memory, written by numpy (a decoded array is read-only)
    report = Progress(len(paths), "images decoded", label) if label else lambda done: None
    workers = decoding_processes(workers, len(paths))
    with ProcessPoolExecutor(workers) if workers else nullcontext() as pool:
        jobs = [(p, size) for p in paths]
        # about 4 chunks a process, so that they finish together; at most 256 images, so that results stream in
        chunk = min(256, -(-len(paths) // (4 * max(workers, 1))))
        decoded = pool.map(_decode_one, jobs, chunksize=chunk) if pool else map(_decode_one, jobs)
        for i, (path, image) in enumerate(zip(paths, decoded)):
            if isinstance(image, str):
                bad.append((path, image))
            else:
                rows[len(keep)] = image.transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S)
                keep.append(i)
            report(i + 1)
    x = x[:len(keep)]
    return x, torch.tensor(keep, dtype=torch.long), bad


def report_unreadable(bad: list[tuple[str, str]], total: int, where: str, on_corrupt: str,
                      skip: str = "data.on_corrupt=skip") -> None:
    """Stop with the list of unreadable files (``on_corrupt='fail'``, ``skip`` names the setting that leaves them out)
    or log them (``'skip'``)."""
    more = f"{len(bad) - 20} more" if len(bad) > 20 else ""
    if bad and on_corrupt == "fail":
        listing = "\n".join(f"  {p}: {r}" for p, r in bad[:20]) + (f"\n  ... and {more}" if more else "")
        raise ValueError(f"{len(bad)} of {total} images in {where} could not be read:\n{listing}\n"
                         f"Fix or delete them, or set {skip} to leave them out.")
    if bad:
        log.warning("Skipped %d unreadable image%s in %s: %s%s", len(bad), "s" * (len(bad) > 1), where,
                    ", ".join(p for p, _ in bad[:20]), f" and {more}" if more else "")


def decode_images(paths: list[str], size: int, workers: int | None, on_corrupt: str,
                  where: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``decode_files``, then unreadable or missing files stop with their list when ``on_corrupt='fail'``; with
    ``'skip'`` they are left out and logged. Returns the images, the indices of ``paths`` kept, and how many were
    skipped.
    """
    x, keep, bad = decode_files(paths, size, workers, where)
    report_unreadable(bad, len(paths), where, on_corrupt)
    if not len(keep):
        raise ValueError(f"No readable images in {where}.")
    return x, keep, len(bad)
