"""Decoded image folders (and caption sets' images) kept on disk: a folder is decoded once, and later runs, and
every DDP rank of a node, memory-map the same file instead of each decoding it and holding its own copy.

Lightning-free, like :mod:`ssl_toolkit.data.images`. A cached set is keyed by the decoding (``DECODE_VERSION``,
Pillow's version, the image size) and by each file's path under the root, size and modification time, so a changed,
added or removed file makes a new entry; stale entries stay until deleted.
"""

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from ssl_toolkit.data.images import Decoded, decode_files
from ssl_toolkit.paths import expand
from ssl_toolkit.progress import Progress

log = logging.getLogger(__name__)

# Bump when decoding a file gives other pixels (geometry, colour handling, resampling): older entries no longer match.
DECODE_VERSION = 1


def entry_name(root: str, parts: list[tuple[str, list[str]]], size: int) -> str:
    """The cache entry of these files decoded at ``size``: ``<root's name>-<size>px-<16 hex digits>``. Every file is
    looked up (``stat``), so a long listing says how far it is (minutes for millions of files on a network
    filesystem)."""
    from PIL import __version__ as pillow

    h = hashlib.sha256(f"decode {DECODE_VERSION} pillow {pillow} size {size}\n".encode())
    report, done = Progress(sum(len(paths) for _, paths in parts), "files checked against the cache", root), 0
    for folder, paths in parts:
        h.update(f"part {os.path.relpath(folder, root)} {len(paths)}\n".encode())
        for p in paths:
            done += 1
            report(done)
            try:
                st = os.stat(p)
                stamp = f"{st.st_size} {st.st_mtime_ns}"
            except OSError:
                stamp = "unreadable"  # decoding reports it; a file that appears later changes the key
            h.update(f"{os.path.relpath(p, root)}\0{stamp}\n".encode())
    return f"{os.path.basename(os.path.normpath(root))}-{size}px-{h.hexdigest()[:16]}"


def _load(entry: Path, parts: list[tuple[str, list[str]]], size: int) -> list[Decoded]:
    """The entry's images, memory-mapped (copy-on-write: pages are shared with every process that maps them)."""
    index = json.loads((entry / "index.json").read_text())
    if index.get("decode") != DECODE_VERSION or len(index["parts"]) != len(parts):
        raise ValueError("its index does not match these folders")
    out = []
    for k, ((_, paths), part) in enumerate(zip(parts, index["parts"])):
        if part["files"] != len(paths):
            raise ValueError(f"part {k} lists {part['files']} files, the folder {len(paths)}")
        bad = [(int(i), str(reason)) for i, reason in part["bad"]]
        kept = np.ones(len(paths), dtype=bool)
        kept[[i for i, _ in bad]] = False
        keep = torch.from_numpy(np.flatnonzero(kept))
        if len(keep):
            x = torch.from_numpy(np.load(entry / f"{k}.npy", mmap_mode="c"))
        else:  # every file unreadable: nothing was written (an empty array cannot be mapped)
            x = torch.empty(0, 3, size, size, dtype=torch.uint8)
        if x.dtype != torch.uint8 or tuple(x.shape) != (len(keep), 3, size, size):
            raise ValueError(f"{k}.npy holds {x.dtype} {tuple(x.shape)}, not {len(keep)} images of {size} px")
        out.append((x, keep, [(paths[i], reason) for i, reason in bad]))
    return out


def _remove_abandoned(cache_dir: Path) -> None:
    """Remove the partial entries (``<entry>.partial-<host>-<pid>-<hex>``) that writers on this host left when they
    were killed mid-write (SIGKILL, out of memory, a job's time limit): those whose process is gone. Other hosts'
    (a cache on a shared filesystem) are left to them."""
    host, removed = socket.gethostname(), []
    for p in cache_dir.glob(f"*.partial-{host}-*"):
        writer, pid, _ = p.name.rsplit("-", 2)
        if not (writer.endswith(f".partial-{host}") and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        except OSError:  # alive, another user's
            pass
    if removed:
        log.info("Removed %d partial cache entr%s that killed writers left in %s: %s", len(removed),
                 "ies" if len(removed) > 1 else "y", cache_dir, ", ".join(removed))


def _write(entry: Path, decoded: list[Decoded], parts: list[tuple[str, list[str]]]) -> None:
    """Write the entry under a temporary name and rename it into place, so that a reader sees all of it or none. If
    another process wrote it first, its entry stands."""
    if entry.parent.is_dir():
        _remove_abandoned(entry.parent)
    tmp = entry.with_name(f"{entry.name}.partial-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir(parents=True)
        for k, (x, _, _) in enumerate(decoded):
            if len(x):
                np.save(tmp / f"{k}.npy", x.numpy())
        index = {"decode": DECODE_VERSION, "parts": []}
        for (folder, paths), (_, keep, bad) in zip(parts, decoded):
            unread = np.ones(len(paths), dtype=bool)
            unread[keep.numpy()] = False  # the unreadable files' indices, in order, as ``bad`` lists them
            index["parts"].append({"folder": folder, "files": len(paths),
                                   "bad": [[int(i), reason] for i, (_, reason) in zip(np.flatnonzero(unread), bad)]})
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mapped(entry: Path, parts: list[tuple[str, list[str]]], size: int, root: str) -> list[Decoded] | None:
    """The entry's images when it is there and whole; a damaged one is removed (and ``None``)."""
    if entry.is_dir():
        try:
            return _load(entry, parts, size)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning("Decoded-image cache %s is incomplete or damaged (%s); decoding %s again.", entry, e, root)
            shutil.rmtree(entry, ignore_errors=True)
    return None


def decode_one_part(root: str, parts: list[tuple[str, list[str]]], keep: int, size: int, workers: int | None,
                    cache_dir: str | None) -> Decoded:
    """Part ``keep`` of these parts (a test split, for evaluators that use nothing else): mapped from the entry of
    every part when a run made one in ``cache_dir``, else decoded alone; no entry is written for it, which would
    duplicate on disk what a training run's entry holds."""
    if cache_dir:
        mapped = _mapped(Path(expand(cache_dir)) / entry_name(root, parts, size), parts, size, root)
        if mapped is not None:
            return mapped[keep]
    folder, paths = parts[keep]
    return decode_files(paths, size, workers, folder)


def decode_cached(root: str, parts: list[tuple[str, list[str]]], size: int, workers: int | None,
                  cache_dir: str | None) -> list[Decoded]:
    """``decode_files`` of each ``(folder, paths)`` part, through an entry in ``cache_dir``: mapped from there when
    these files were decoded at ``size`` before, else decoded, written there, and mapped. No ``cache_dir``: decoded.

    Memory-mapped, the images live in the page cache, once however many processes read them (the DDP ranks of a
    node), and on disk between runs. A damaged entry is decoded again; an entry that cannot be written (no space, no
    permission) leaves a warning and this run keeps its images in memory, as without a cache.
    """
    if not cache_dir:
        return [decode_files(paths, size, workers, folder) for folder, paths in parts]
    entry = Path(expand(cache_dir)) / entry_name(root, parts, size)
    mapped = _mapped(entry, parts, size, root)
    if mapped is not None:
        return mapped
    decoded = [decode_files(paths, size, workers, folder) for folder, paths in parts]
    try:
        _write(entry, decoded, parts)
        mapped = _load(entry, parts, size)
    except (OSError, ValueError) as e:
        log.warning("Could not cache the decoded images of %s in %s (%s); this run keeps them in memory. Free "
                    "space there or set data.cache_dir to another folder.", root, entry.parent, e)
        return decoded
    log.info("Cached the decoded images of %s in %s (%.1f MiB)", root, entry,
             sum(x.numel() for x, _, _ in decoded) / 2 ** 20)
    return mapped  # the decoded copy is dropped: this process maps the file like the others
