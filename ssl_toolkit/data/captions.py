"""Image-caption pairs from a CSV (``image,caption``) and a folder of images, for CLIP.

Every image may have several captions; each training step draws one of them per image (CLIP,
Radford et al. 2021, https://arxiv.org/abs/2103.00020; one caption sampled per image per epoch is
how Flickr/COCO captions are commonly used). The split is by image, so no held-out image has a
caption seen in training.
"""

import csv
import os
from pathlib import Path

import torch

from ssl_toolkit.data.base import DecodesFiles, InMemoryDataModule, Splits
from ssl_toolkit.data.images import report_unreadable
from ssl_toolkit.data.tokenizer import CaptionTokenizer
from ssl_toolkit.paths import expand


def read_captions(path: str, image_column: str = "image", caption_column: str = "caption") -> list[tuple[str, str]]:
    """``(image, caption)`` rows of a CSV with a header; a clear error for a missing column or an empty caption."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No caption file at {os.path.abspath(path)!r}. Set data.root to the dataset folder "
                                "and data.captions to its CSV (columns image,caption).")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if image_column not in columns or caption_column not in columns:
            raise ValueError(f"{path} has columns {columns}; it needs {image_column!r} and {caption_column!r}. "
                             "Set data.image_column / data.caption_column to the names it uses.")
        rows = [(r[image_column].strip(), (r[caption_column] or "").strip()) for r in reader]
    empty = [i + 2 for i, (img, cap) in enumerate(rows) if not img or not cap]
    if empty:
        raise ValueError(f"{path}: {len(empty)} row(s) have an empty image name or caption (lines {empty[:10]}); "
                         "fill or delete them.")
    if not rows:
        raise ValueError(f"{path} has a header but no captions.")
    return rows


class CaptionDataModule(DecodesFiles, InMemoryDataModule):
    """Images named in a caption CSV, decoded once into memory, with their tokenized captions.

    Training batches are ``(images, tokens)``: uint8 ``(B, 3, S, S)`` and ``(B, context_length)`` token ids
    (one caption drawn per image per step, padded with -1). Evaluation batches (``iter_split``) are
    ``(images, image_index)``; :meth:`captions` gives every caption of a split with the index of its image,
    for retrieval.

    Args:
        root: Dataset folder (``shared/datasets/flickr8k-1k``).
        captions: The CSV under ``root``, with a header naming the image and caption columns.
        images: Folder under ``root`` holding the images the CSV names.
        image_size: Side of the stored images (shorter side resized, centre-cropped).
        val_images: Images held out for evaluation (all their captions go with them); 200 for Flickr8k-1k. They are
            picked among the files the CSV names that exist, before decoding: with ``on_corrupt=skip`` an
            unreadable one leaves the held-out set one short, and the others keep their split.
        split_seed: Seed of the image permutation that picks the held-out images.
        tokenizer: A ``tokenizer.json`` to use; empty trains a byte-level BPE on the training captions.
        vocab_size: Size of the trained BPE (must not exceed the model's ``text.vocab_size``).
        context_length: Tokens per caption including start and end (CLIP: 77; 32 covers 99% of Flickr8k).
        image_column: CSV column of image file names.
        caption_column: CSV column of captions.
        on_corrupt: ``fail`` stops on missing or unreadable images with their list; ``skip`` drops them
            (and their captions) and logs which.
        batch_size: Image-caption pairs per step per device.
        num_workers: Processes that decode the images. ``None``: one per CPU core (under DDP, each rank of the node
            its share, unless ``cache_dir`` lets one process decode for all); 0: this process.
        resident: Keep images and tokens on the accelerator.
        cache_dir: Keep the decoded images in this folder, as ``.npy`` files that later runs with the same files
            (names, sizes, modification times), image size and split map instead of decoding, and that the DDP
            ranks of a node share: one copy in memory, not one per GPU (as ``ImageFolderDataModule``'s).
    """

    def __init__(self, root: str, captions: str = "captions.txt", images: str = "images", image_size: int = 64,
                 val_images: int = 200, split_seed: int = 0, tokenizer: str | None = None, vocab_size: int = 4096,
                 context_length: int = 77, image_column: str = "image", caption_column: str = "caption",
                 on_corrupt: str = "fail", batch_size: int = 256, num_workers: int | None = None,
                 resident: bool = False, cache_dir: str | None = None):
        super().__init__(batch_size, 0, resident)
        self.init_decoding(num_workers, cache_dir)
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"data.on_corrupt must be 'fail' or 'skip'; got {on_corrupt!r}.")
        if image_size < 1 or val_images < 1 or context_length < 2:
            raise ValueError(f"data needs image_size >= 1, val_images >= 1 and context_length >= 2; got "
                             f"{image_size}, {val_images}, {context_length}.")
        self.save_hyperparameters()
        self.root, self.captions_file, self.images_dir = expand(root), captions, images
        self.image_size, self.val_images, self.split_seed = image_size, val_images, split_seed
        self.tokenizer_file = tokenizer and expand(tokenizer)
        self.vocab_size, self.context_length = vocab_size, context_length
        self.columns, self.on_corrupt = (image_column, caption_column), on_corrupt
        self.name, self.num_skipped = os.path.basename(os.path.normpath(self.root)), 0
        self.tokenizer: CaptionTokenizer | None = None
        self.texts: dict[str, list[str]] = {}
        self.caption_image: dict[str, torch.Tensor] = {}  # per split: (M,) image index of each caption
        self.tokens: dict[str, torch.Tensor] = {}  # per split: (M, L) token ids, captions grouped by image
        self.offsets: dict[str, torch.Tensor] = {}  # per split: (N + 1,) first caption of each image

    def _listing(self) -> tuple[dict[str, list[str]], list[str], list[str], int]:
        """Each image's captions, the held-out and the training images (names, sorted) and how many the CSV names
        that are not there. The split is drawn here, before decoding, so that each split is decoded (and cached)
        as one array: no copy gathers it from the whole set."""
        root = Path(self.root)
        rows = read_captions(str(root / self.captions_file), *self.columns)
        by_image: dict[str, list[str]] = {}
        for image, caption in rows:
            by_image.setdefault(image, []).append(caption)
        names = sorted(by_image)
        missing = [n for n in names if not (root / self.images_dir / n).is_file()]
        if missing and self.on_corrupt == "fail":
            raise FileNotFoundError(
                f"{len(missing)} of {len(names)} images named in {root / self.captions_file} are not in "
                f"{root / self.images_dir}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. Add the "
                f"files, delete their rows, or set {self.skip_setting} to leave them out.")
        gone = set(missing)
        names = [n for n in names if n not in gone]
        if self.val_images >= len(names):
            raise ValueError(f"data.val_images={self.val_images} leaves no training images ({len(names)} in all); "
                             "lower it.")
        perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(self.split_seed))
        test, train = (sorted(perm[:self.val_images].tolist()), sorted(perm[self.val_images:].tolist()))
        return by_image, [names[i] for i in test], [names[i] for i in train], len(missing)

    test_part = 0  # of _parts: the held-out images, then the training ones

    def listed_labels(self) -> tuple[list[str], torch.Tensor]:
        """No classes: images and their captions (nothing to list to know it)."""
        return [], torch.zeros(0, dtype=torch.long)

    def _parts(self, listing) -> list[tuple[str, list[str]]]:
        """The held-out and the training images, each split one part."""
        folder = str(Path(self.root) / self.images_dir)
        return [(folder, [os.path.join(folder, n) for n in names]) for names in listing[1:3]]

    def load(self) -> Splits:
        (by_image, test, train, missing), decoded = self.listed_and_decoded()
        (x_test, keep_test, bad_test), *rest = decoded  # only_test(): the training images are not decoded
        x_train, keep_train, bad_train = rest[0] if rest else (None, None, [])
        where = str(Path(self.root) / self.images_dir)
        report_unreadable(bad_test + bad_train, len(test) + len(train) * bool(rest), where, self.on_corrupt,
                          self.skip_setting)
        self.num_skipped = missing + len(bad_test) + len(bad_train)
        names = {"train": [train[i] for i in keep_train.tolist()]} if rest else {}
        names["test"] = [test[i] for i in keep_test.tolist()]
        for split, kept in names.items():
            if not kept:
                raise ValueError(f"None of the {'training' if split == 'train' else 'held-out'} images in {where} "
                                 "could be read" + (" (change data.split_seed or data.val_images to hold out "
                                                    "others)." if split == "test" else "."))
            self.texts[split] = [c for n in kept for c in by_image[n]]  # grouped by image
        self.tokenizer = (CaptionTokenizer.from_file(self.tokenizer_file) if self.tokenizer_file else
                          CaptionTokenizer.train([c for n in names.get("train", train) for c in by_image[n]],
                                                 self.vocab_size))
        for split, kept in names.items():
            counts = torch.tensor([len(by_image[n]) for n in kept])
            self.tokens[split] = self.tokenizer.encode(self.texts[split], self.context_length)  # (M, L)
            self.caption_image[split] = torch.repeat_interleave(torch.arange(len(kept)), counts)  # (M,)
            self.offsets[split] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # (N + 1,)
        if x_train is None:  # only_test()
            return Splits.test_alone(x_test, torch.arange(len(x_test)), [])
        return Splits(x_train, torch.arange(len(x_train)), x_test, torch.arange(len(x_test)), [])

    def train_batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Images of ``idx`` and one caption drawn uniformly among each image's captions."""
        x = self.on_device("x_train", self.splits.x_train, device)
        offsets = self.on_device("offsets_train", self.offsets["train"], device)
        tokens = self.on_device("tokens_train", self.tokens["train"], device)
        start, count = offsets[idx], offsets[idx + 1] - offsets[idx]
        pick = start + (torch.rand(len(idx), device=device) * count).long().clamp_max(count - 1)  # (B,)
        return x[idx], tokens[pick]

    def captions(self, split: str) -> tuple[list[str], torch.Tensor]:
        """Every caption of ``split`` and the ``(M,)`` index of its image in ``iter_split`` order (for retrieval).

        Evaluators tokenize these with the model's own tokenizer, so a checkpoint is scored with the
        tokenizer it was trained with, whatever this data module would train.
        """
        self._checked_split(split)
        return self.texts[split], self.caption_image[split]
