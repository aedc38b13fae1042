"""LightningDataModules yielding uint8 ``(B, 3, H, W)`` image tensors and labels (or caption tokens); no augmentation."""

from ssl_toolkit.data.base import InMemoryDataModule, Splits
from ssl_toolkit.data.captions import CaptionDataModule
from ssl_toolkit.data.sources import CIFARDataModule, DigitsDataModule, ImageFolderDataModule, NpzDataModule
from ssl_toolkit.data.tokenizer import CaptionTokenizer

__all__ = ["CaptionDataModule", "CaptionTokenizer", "CIFARDataModule", "DigitsDataModule", "ImageFolderDataModule",
           "InMemoryDataModule", "NpzDataModule", "Splits"]
