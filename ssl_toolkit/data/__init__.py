"""LightningDataModules yielding uint8 ``(B, 3, H, W)`` image tensors and labels; no augmentation here."""

from ssl_toolkit.data.base import InMemoryDataModule, Splits
from ssl_toolkit.data.sources import CIFARDataModule, DigitsDataModule, ImageFolderDataModule, NpzDataModule

__all__ = ["InMemoryDataModule", "Splits", "CIFARDataModule", "DigitsDataModule", "ImageFolderDataModule",
           "NpzDataModule"]
