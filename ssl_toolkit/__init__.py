"""ssl-toolkit: self-supervised pretraining of image encoders with views made on the GPU.

The names below load with their module on first use (PEP 562), so that ``ssl-toolkit --help``, a subcommand's
``--help`` and ``import ssl_toolkit.distributed`` do not first import Lightning, Kornia and every method (5.6 s of
the 7.5 s that ``ssl-toolkit --help`` took). ``from ssl_toolkit import SimCLR`` works as before."""

from typing import TYPE_CHECKING

from ssl_toolkit._lazy import lazy_names

__version__ = "0.1.0"

_HOME, __getattr__, __dir__ = lazy_names(__name__, {
    "ssl_toolkit.backbones": ("BackboneConfig", "Encoder", "TextConfig", "build_backbone"),
    "ssl_toolkit.compile": ("Compile",),
    "ssl_toolkit.data": ("CaptionDataModule", "CIFARDataModule", "DigitsDataModule", "ImageFolderDataModule",
                         "InMemoryDataModule", "NpzDataModule"),
    "ssl_toolkit.eval": ("KNNCallback", "RetrievalCallback", "extract_features", "knn_accuracy", "linear_probe"),
    "ssl_toolkit.methods": ("BaseSSLModule", "CLIP", "CPCV2", "DINO", "MoCoV2", "OptimConfig", "SimCLR", "Colorization",
                            "Inpainting", "Jigsaw", "Rotation"),
    "ssl_toolkit.views": ("ContrastiveViews", "ViewConfig", "Views"),
})

__all__ = ["BackboneConfig", "Compile", "Encoder", "TextConfig", "build_backbone", "CaptionDataModule", "CIFARDataModule",
           "DigitsDataModule", "ImageFolderDataModule", "InMemoryDataModule", "NpzDataModule", "KNNCallback",
           "RetrievalCallback", "extract_features", "knn_accuracy", "linear_probe", "BaseSSLModule", "CLIP", "CPCV2",
           "DINO", "MoCoV2", "OptimConfig", "SimCLR", "Colorization", "Inpainting", "Jigsaw", "Rotation",
           "ContrastiveViews", "ViewConfig", "Views"]  # literal, for pyflakes and editors; a test checks it is _HOME's

if TYPE_CHECKING:  # what editors and type checkers read
    from ssl_toolkit.backbones import BackboneConfig, Encoder, TextConfig, build_backbone
    from ssl_toolkit.compile import Compile
    from ssl_toolkit.data import (CaptionDataModule, CIFARDataModule, DigitsDataModule, ImageFolderDataModule,
                                  InMemoryDataModule, NpzDataModule)
    from ssl_toolkit.eval import KNNCallback, RetrievalCallback, extract_features, knn_accuracy, linear_probe
    from ssl_toolkit.methods import (CLIP, CPCV2, DINO, BaseSSLModule, Colorization, Inpainting, Jigsaw, MoCoV2,
                                     OptimConfig, Rotation, SimCLR)
    from ssl_toolkit.views import ContrastiveViews, ViewConfig, Views

