"""LightningDataModules yielding uint8 ``(B, 3, H, W)`` image tensors and labels (or caption tokens); no augmentation.

The names load with their module on first use (``ssl_toolkit._lazy``), so that ``ssl_toolkit.data.images`` (image
decoding, for ``embed`` and ``search``) imports without Lightning."""

from typing import TYPE_CHECKING

from ssl_toolkit._lazy import lazy_names

_HOME, __getattr__, __dir__ = lazy_names(__name__, {
    "ssl_toolkit.data.base": ("InMemoryDataModule", "Splits"),
    "ssl_toolkit.data.captions": ("CaptionDataModule",),
    "ssl_toolkit.data.sources": ("CIFARDataModule", "DigitsDataModule", "ImageFolderDataModule", "NpzDataModule"),
    "ssl_toolkit.data.tokenizer": ("CaptionTokenizer",),
})

__all__ = ["CaptionDataModule", "CaptionTokenizer", "CIFARDataModule", "DigitsDataModule", "ImageFolderDataModule",
           "InMemoryDataModule", "NpzDataModule", "Splits"]  # literal, for pyflakes and editors; a test checks it

if TYPE_CHECKING:  # what editors and type checkers read
    from ssl_toolkit.data.base import InMemoryDataModule, Splits
    from ssl_toolkit.data.captions import CaptionDataModule
    from ssl_toolkit.data.sources import CIFARDataModule, DigitsDataModule, ImageFolderDataModule, NpzDataModule
    from ssl_toolkit.data.tokenizer import CaptionTokenizer
