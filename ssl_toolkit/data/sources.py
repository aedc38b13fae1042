"""Dataset sources: scikit-learn digits, CIFAR-10/100, ``.npz`` arrays, image folders."""

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssl_toolkit.data.base import DecodesFiles, InMemoryDataModule, Splits
from ssl_toolkit.data.images import (IMAGE_EXTENSIONS, SPLIT_FOLDERS, image_files, listed, report_unread,
                                     report_unreadable, unread_note)
from ssl_toolkit.paths import expand

log = logging.getLogger(__name__)


def _to_nchw(x: np.ndarray, key: str, source: str) -> torch.Tensor:
    """Accept ``(N, H, W, 3|1)``, ``(N, 3|1, H, W)`` or grey ``(N, H, W)`` (MNIST's layout) uint8 arrays; return
    ``(N, 3, H, W)``."""
    if x.dtype != np.uint8:
        raise ValueError(f"{source}: {key} has dtype {x.dtype}; images must be uint8 in [0, 255]. "
                         f"Convert with (x * 255).round().astype(np.uint8) if they are floats in [0, 1].")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"{source}: {key} has shape {x.shape}; expected (N, H, W, 3) or (N, 3, H, W) images "
                         f"(grayscale as (N, H, W), (N, H, W, 1) or (N, 1, H, W)).")
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.expand(-1, 3, -1, -1).contiguous() if t.shape[1] == 1 else t


class DigitsDataModule(InMemoryDataModule):
    """scikit-learn's bundled handwritten digits (1,797 images, 10 classes; offline, no download).

    The 8x8 grey images are scaled to [0, 255], upsampled (bilinear) to ``image_size`` and
    repeated to RGB. The split is fixed: 30% of each class for test (``random_state=0``).

    Args:
        image_size: Side length after upsampling.
        batch_size: Images per step.
        num_workers: DataLoader workers (0 is right: the set is 6 MB).
        resident: Keep the set on the accelerator.
    """

    name = "digits"

    def __init__(self, image_size: int = 32, batch_size: int = 256, num_workers: int = 0, resident: bool = False):
        super().__init__(batch_size, num_workers, resident)
        if image_size < 1:  # was torch's "Input and output sizes should be greater than 0" from the first load
            raise ValueError(f"data.image_size must be >= 1; got {image_size}.")
        self.save_hyperparameters()
        self.image_size = image_size

    def load(self) -> Splits:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.from_numpy(d.images).float().mul(255.0 / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 255]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
        y = torch.from_numpy(d.target).long()
        tr, te = train_test_split(np.arange(len(y)), test_size=0.3, stratify=d.target, random_state=0)
        return Splits(x[tr], y[tr], x[te], y[te], [str(c) for c in range(10)])


class CIFARDataModule(InMemoryDataModule):
    """CIFAR-10 or CIFAR-100 through torchvision (Krizhevsky 2009).

    Args:
        root: Folder holding (or to receive) ``cifar-10-batches-py`` / ``cifar-100-python``.
        variant: ``cifar10`` or ``cifar100``.
        download: Fetch the dataset from the internet if it is not under ``root``.
        batch_size: Images per step per device (512 in SimCLR's CIFAR setting).
        num_workers: DataLoader workers (0 is right for in-memory data).
        resident: Keep the set (150 MB) on the accelerator.
    """

    def __init__(self, root: str = "data", variant: str = "cifar10", download: bool = False, batch_size: int = 512,
                 num_workers: int = 0, resident: bool = False):
        super().__init__(batch_size, num_workers, resident)
        if variant not in ("cifar10", "cifar100"):
            raise ValueError(f"data.variant must be 'cifar10' or 'cifar100'; got {variant!r}.")
        self.save_hyperparameters()
        self.root, self.variant, self.download, self.name = expand(root), variant, download, variant

    def prepare_data(self) -> None:
        if self.download:
            self._dataset(train=True)
            self._dataset(train=False)

    def _dataset(self, train: bool):
        import torchvision

        cls = torchvision.datasets.CIFAR10 if self.variant == "cifar10" else torchvision.datasets.CIFAR100
        root = os.path.abspath(self.root)
        elsewhere = (f"point data.root at the folder holding {cls.base_folder!r}, or use a local .npz copy (pretrain: "
                     "--data ssl_toolkit.data.NpzDataModule --data.path FILE; knn, probe, zeroshot: --data FILE)")
        try:
            return cls(self.root, train=train, download=self.download)
        except RuntimeError as e:  # torchvision: missing, or the download's checksum did not match
            fix = (f"Delete {cls.base_folder!r} and {cls.filename!r} there to fetch them afresh, " if self.download
                   else "Set data.download=true to fetch it, ")
            raise FileNotFoundError(f"{self.variant} not found under {root!r} or corrupted ({e}). {fix}{elsewhere}.") \
                from None
        except OSError as e:  # the download: no network (URLError, timeouts, refused connections), root not writable
            if not self.download:
                raise
            raise FileNotFoundError(
                f"could not download {self.variant} into {root!r} ({e}). Without internet access here, unpack "
                f"{cls.url} (fetched elsewhere) under data.root, {elsewhere}."
            ) from None

    def load(self) -> Splits:
        te = self._dataset(False)
        x_test = _to_nchw(te.data, "test images", self.variant)
        if self.test_only:
            return Splits.test_alone(x_test, torch.tensor(te.targets), list(te.classes))
        tr = self._dataset(True)
        return Splits(_to_nchw(tr.data, "train images", self.variant), torch.tensor(tr.targets), x_test,
                      torch.tensor(te.targets), list(tr.classes))


class NpzDataModule(InMemoryDataModule):
    """Images from one ``.npz`` file: ``x_train``, ``y_train``, ``x_test``, ``y_test``, optional ``classes``.

    This is the format ``shared/datasets/cifar10/unpack.py`` writes; images are uint8
    ``(N, H, W, 3)`` or ``(N, 3, H, W)``.

    Args:
        path: The ``.npz`` file.
        batch_size: Images per step per device.
        num_workers: DataLoader workers (0 is right for in-memory data).
        resident: Keep the set on the accelerator.
    """

    KEYS = ("x_train", "y_train", "x_test", "y_test")

    def __init__(self, path: str, batch_size: int = 512, num_workers: int = 0, resident: bool = False):
        super().__init__(batch_size, num_workers, resident)
        self.save_hyperparameters()
        self.path, self.name = expand(path), os.path.basename(path)  # "~/x.npz" in a YAML recipe

    def load(self) -> Splits:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"No .npz file at {os.path.abspath(self.path)!r}. Set data.path to a file with "
                                    f"arrays {', '.join(self.KEYS)} (shared/datasets/cifar10/unpack.py writes one).")
        with np.load(self.path, allow_pickle=False) as f:
            missing = [k for k in self.KEYS if k not in f.files]
            if missing:
                raise KeyError(f"{self.path}: missing array(s) {', '.join(missing)}; found {', '.join(f.files)}. "
                               f"The file needs {', '.join(self.KEYS)} (and optionally classes).")
            arrays = {k: f[k] for k in f.files if not (self.test_only and k == "x_train")}  # read when accessed
        y_train, y_test, classes = self._labels(arrays)
        x_test = _to_nchw(arrays["x_test"], "x_test", self.path)
        if self.test_only:
            return Splits.test_alone(x_test, y_test, classes)
        return Splits(_to_nchw(arrays["x_train"], "x_train", self.path), y_train, x_test, y_test, classes)

    def _labels(self, arrays: dict) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Integer labels (class names from ``classes``, else the numbers), or class names as strings, numbered in
        the order of ``classes`` when given, else sorted."""
        y = {k: arrays[k].reshape(-1) for k in ("y_train", "y_test")}
        for k, v in y.items():
            if not len(v):
                raise ValueError(f"{self.path}: {k} is empty; it needs one label per image.")
        given = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
        if any(v.dtype.kind in "US" for v in y.values()):
            names = set().union(*(map(str, v) for v in y.values()))
            classes = given or sorted(names)
            number = {c: i for i, c in enumerate(classes)}
            unknown = sorted(names - set(number))
            if unknown:
                raise ValueError(f"{self.path}: labels {unknown[:5]} are not among the {len(classes)} names in "
                                 "`classes`; add them there or leave `classes` out (then the names are sorted).")
            return *(torch.tensor([number[str(c)] for c in v], dtype=torch.int64) for v in y.values()), classes
        for k, v in y.items():
            if v.dtype.kind not in "iub" and not (v.dtype.kind == "f" and np.array_equal(v, np.round(v))):
                raise ValueError(f"{self.path}: {k} has {v.dtype} values that are not whole numbers; labels are "
                                 "class indices (integers) or class names (strings).")
        y_train, y_test = (torch.from_numpy(v.astype(np.int64)) for v in y.values())
        low, n_cls = int(min(y_train.min(), y_test.min())), int(max(y_train.max(), y_test.max())) + 1
        classes = given or [str(c) for c in range(n_cls)]
        if len(classes) < n_cls or low < 0:
            raise ValueError(f"{self.path}: labels must lie in [0, {len(classes) - 1}] (one per class name); "
                             f"got [{low}, {n_cls - 1}].")
        return y_train, y_test, classes


class ImageFolderDataModule(DecodesFiles, InMemoryDataModule):
    """An image folder: labelled, ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``), or unlabelled,
    any images under ``root`` (subfolders included) when it has neither ``train/`` nor ``val/``. Hidden files and
    folders (``.*``: macOS's ``._photo.jpg``, ``.ipynb_checkpoints``) and ``__MACOSX/`` are left out.

    Images are decoded once (in ``num_workers`` processes), resized so the shorter side is
    ``image_size`` and centre-cropped, and kept in memory as uint8: plan ``N * 3 * image_size^2``
    bytes (1.5 GB for 500k images at 32 px). Unlabelled, every image trains, ``num_classes`` is 0 (the kNN and
    probe monitors switch themselves off) and the test split is the training set itself (for ``pictures``).

    Args:
        root: Folder with ``train/`` and ``val/`` (or ``test/``) subfolders of class folders, or of unlabelled images.
        image_size: Side of the stored images.
        on_corrupt: ``fail`` stops with the list of unreadable files; ``skip`` leaves them out,
            logs how many and which, and counts them in ``num_skipped``.
        batch_size: Images per step per device.
        num_workers: Processes that decode the images. ``None``: one per CPU core (under DDP, each rank of the node
            its share, unless ``cache_dir`` lets one process decode for all); 0: this process. Batches need no
            DataLoader workers: they are index operations on the decoded set.
        resident: Keep the decoded set on the accelerator.
        cache_dir: Keep the decoded images in this folder, as ``.npy`` files that every later run with the same files
            (names, sizes, modification times) and image size maps instead of decoding, and that the DDP ranks of a
            node share: one copy in memory, not one per GPU. ``None``: decode on every run, in each process.
    """

    def __init__(self, root: str, image_size: int = 32, on_corrupt: str = "fail", batch_size: int = 256,
                 num_workers: int | None = None, resident: bool = False, cache_dir: str | None = None):
        super().__init__(batch_size, 0, resident)
        self.init_decoding(num_workers, cache_dir)
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"data.on_corrupt must be 'fail' or 'skip'; got {on_corrupt!r}.")
        if image_size < 1:
            raise ValueError(f"data.image_size must be >= 1; got {image_size}.")
        self.save_hyperparameters()
        self.root, self.image_size, self.on_corrupt = expand(root), image_size, on_corrupt
        self.name, self.num_skipped = os.path.basename(os.path.normpath(self.root)), 0

    def _files(self, split_dir: Path) -> tuple[list[str], list[str], list[int]]:
        classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and listed(d.name))
        if not classes:
            raise FileNotFoundError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image files>.")
        paths, labels, unread = [], [], Counter()
        for i, c in enumerate(classes):
            found = Counter()
            files = image_files(split_dir / c, found)  # one warning for the split, not one per class
            unread.update(found)
            if not files:
                note = f" ({unread_note(found)})" if found else ""
                raise FileNotFoundError(f"Class folder {split_dir / c} has no images ({', '.join(IMAGE_EXTENSIONS)})"
                                        f"{note}; add images or remove the folder.")
            paths += files
            labels += [i] * len(files)
        report_unread(unread, str(split_dir))
        return classes, paths, labels

    def _listing(self) -> tuple[list[str] | None, list[tuple[str, list[str], list[int]]]]:
        """The class names (``None``: unlabelled) and each split's ``(folder, files, labels)``: train/ and val/ (or
        test/), or the root alone. Every check on the folders runs here, before anything is decoded."""
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder {os.path.abspath(self.root)!r} does not exist. Set data.root to a "
                                    "folder of images (unlabelled) or with train/<class>/* and val/<class>/* images.")
        train_dir = root / SPLIT_FOLDERS[0]
        eval_dir = next((root / d for d in SPLIT_FOLDERS[1:] if (root / d).is_dir()), None)
        if self.test_only and not train_dir.is_dir():  # zero-shot scores labelled images and trains on none
            labelled = self._files(eval_dir) if eval_dir is not None else self._class_folders(root)
            if labelled is not None:
                return labelled[0], [(str(eval_dir or root), labelled[1], labelled[2])]
        if not train_dir.is_dir() and eval_dir is None:
            paths = image_files(root)
            if not paths:
                raise FileNotFoundError(f"{root} has no images ({', '.join(IMAGE_EXTENSIONS)}) and no train/ and val/ "
                                        "subfolders. Point data.root at a folder of images (unlabelled) or at one "
                                        "with train/<class>/* and val/<class>/* (labelled).")
            return None, [(str(root), paths, [0] * len(paths))]
        if not train_dir.is_dir() or eval_dir is None:
            raise FileNotFoundError(f"{root} needs train/ and val/ (or test/) subfolders, each with one folder per "
                                    f"class; found {sorted(p.name for p in root.iterdir())}. (A folder with neither "
                                    "is read as unlabelled images.)")
        # both splits listed and checked before either is decoded, and both decoded before their unreadable files are
        # reported: one run names every bad file (train's alone were named first, val's only on the next run)
        classes, train_paths, train_labels = self._files(train_dir)
        found, test_paths, test_labels = self._files(eval_dir)
        if found != classes:
            raise ValueError(f"{eval_dir} has classes {found} but train/ has {classes}; both splits need the same "
                             "class folders.")
        return classes, [(str(train_dir), train_paths, train_labels), (str(eval_dir), test_paths, test_labels)]

    def _class_folders(self, root: Path) -> tuple[list[str], list[str], list[int]] | None:
        """``root``'s folders as classes (as :meth:`_files` lists a split), for the commands that score the test split
        alone: an ImageNet-style ``val/<class>/`` folder given as it is. None where it holds images of its own, fewer
        than two folders, or a folder without images (a collection sorted into folders, read as unlabelled)."""
        entries = list(os.scandir(root))
        if any(e.is_file() and listed(e.name) and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
               for e in entries) or sum(e.is_dir() and listed(e.name) for e in entries) < 2:
            return None
        try:
            return self._files(root)
        except FileNotFoundError:
            return None

    test_part = 1  # of _parts: train/, then val/ (or test/)

    def listed_labels(self) -> tuple[list[str], torch.Tensor]:
        """The class folders' names and train/'s labels, from the listing (``[]`` and no labels: unlabelled)."""
        if self._listed is None:
            self._listed = self._listing()
        classes, splits = self._listed
        return (classes, torch.tensor(splits[0][2])) if classes is not None else ([], torch.zeros(0, dtype=torch.long))

    def _parts(self, listing) -> list[tuple[str, list[str]]]:
        return [(folder, paths) for folder, paths, _ in listing[1]]

    def load(self) -> Splits:
        (classes, splits), decoded = self.listed_and_decoded()
        splits = splits[len(splits) - len(decoded):]  # only_test(): val/ (or test/) alone
        with_bad = {folder: len(paths) for (folder, paths, _), (_, _, bad) in zip(splits, decoded) if bad}
        report_unreadable([b for _, _, bad in decoded for b in bad], sum(with_bad.values()), " and ".join(with_bad),
                          self.on_corrupt, self.skip_setting)
        for (folder, _, _), (x, _, _) in zip(splits, decoded):
            if not len(x):
                raise ValueError(f"No readable images in {folder}.")
        self.num_skipped = sum(len(bad) for _, _, bad in decoded)
        if classes is None:
            x = decoded[0][0]
            log.info("%s: %d unlabelled images (no train/ and val/ class folders)", self.root, len(x))
            y = torch.zeros(len(x), dtype=torch.long)
            return Splits(x, y, x, y, [])  # no classes; "test" is the training set itself, no copy
        labels = [torch.tensor(labels)[keep] for (_, _, labels), (_, keep, _) in zip(splits, decoded)]
        if len(decoded) == 1:  # only_test()
            return Splits.test_alone(decoded[0][0], labels[0], classes)
        return Splits(decoded[0][0], labels[0], decoded[1][0], labels[1], classes)
