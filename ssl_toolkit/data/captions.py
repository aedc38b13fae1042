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

from ssl_toolkit.data.base import InMemoryDataModule, Splits
from ssl_toolkit.data.images import decode_images
from ssl_toolkit.data.tokenizer import CaptionTokenizer


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


class CaptionDataModule(InMemoryDataModule):
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
        val_images: Images held out for evaluation (all their captions go with them); 200 for Flickr8k-1k.
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
            its share); 0: this process.
        resident: Keep images and tokens on the accelerator.
    """

    def __init__(self, root: str, captions: str = "captions.txt", images: str = "images", image_size: int = 64,
                 val_images: int = 200, split_seed: int = 0, tokenizer: str | None = None, vocab_size: int = 4096,
                 context_length: int = 77, image_column: str = "image", caption_column: str = "caption",
                 on_corrupt: str = "fail", batch_size: int = 256, num_workers: int | None = None,
                 resident: bool = False):
        super().__init__(batch_size, 0, resident)
        self.check_decoding_workers(num_workers)
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"data.on_corrupt must be 'fail' or 'skip'; got {on_corrupt!r}.")
        if image_size < 1 or val_images < 1 or context_length < 2:
            raise ValueError(f"data needs image_size >= 1, val_images >= 1 and context_length >= 2; got "
                             f"{image_size}, {val_images}, {context_length}.")
        self.save_hyperparameters()
        self.root, self.captions_file, self.images_dir = root, captions, images
        self.image_size, self.val_images, self.split_seed = image_size, val_images, split_seed
        self.tokenizer_file, self.vocab_size, self.context_length = tokenizer, vocab_size, context_length
        self.columns, self.on_corrupt, self.decode_workers = (image_column, caption_column), on_corrupt, num_workers
        self.name, self.num_skipped = os.path.basename(os.path.normpath(root)), 0
        self.tokenizer: CaptionTokenizer | None = None
        self.texts: dict[str, list[str]] = {}
        self.caption_image: dict[str, torch.Tensor] = {}  # per split: (M,) image index of each caption
        self.tokens: dict[str, torch.Tensor] = {}  # per split: (M, L) token ids, captions grouped by image
        self.offsets: dict[str, torch.Tensor] = {}  # per split: (N + 1,) first caption of each image

    def load(self) -> Splits:
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
                "files, delete their rows, or set data.on_corrupt=skip to leave them out.")
        gone = set(missing)
        names = [n for n in names if n not in gone]
        x, keep, skipped = decode_images([str(root / self.images_dir / n) for n in names], self.image_size,
                                         self.decoding_workers(self.decode_workers), self.on_corrupt,
                                         str(root / self.images_dir))
        self.num_skipped = len(missing) + skipped
        names = [names[i] for i in keep.tolist()]
        if self.val_images >= len(names):
            raise ValueError(f"data.val_images={self.val_images} leaves no training images ({len(names)} in all); "
                             "lower it.")
        perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(self.split_seed))
        split_idx = {"test": perm[:self.val_images].sort().values, "train": perm[self.val_images:].sort().values}
        for split, idx in split_idx.items():
            self.texts[split] = [c for i in idx.tolist() for c in by_image[names[i]]]  # grouped by image
        self.tokenizer = (CaptionTokenizer.from_file(self.tokenizer_file) if self.tokenizer_file
                          else CaptionTokenizer.train(self.texts["train"], self.vocab_size))
        for split, idx in split_idx.items():
            counts = torch.tensor([len(by_image[names[i]]) for i in idx.tolist()])
            self.tokens[split] = self.tokenizer.encode(self.texts[split], self.context_length)  # (M, L)
            self.caption_image[split] = torch.repeat_interleave(torch.arange(len(idx)), counts)  # (M,)
            self.offsets[split] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # (N + 1,)
        return Splits(x[split_idx["train"]], torch.arange(len(split_idx["train"])), x[split_idx["test"]],
                      torch.arange(len(split_idx["test"])), [])

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
        self.setup()
        if split not in self.texts:
            raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
        return self.texts[split], self.caption_image[split]
