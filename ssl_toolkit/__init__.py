"""ssl-toolkit: self-supervised pretraining of image encoders with views made on the GPU."""

from ssl_toolkit.backbones import BackboneConfig, Encoder, TextConfig, build_backbone
from ssl_toolkit.compile import Compile
from ssl_toolkit.data import (CaptionDataModule, CIFARDataModule, DigitsDataModule, ImageFolderDataModule,
                              InMemoryDataModule, NpzDataModule)
from ssl_toolkit.eval import KNNCallback, RetrievalCallback, extract_features, knn_accuracy, linear_probe
from ssl_toolkit.methods import (CLIP, CPCV2, DINO, BaseSSLModule, Colorization, Inpainting, Jigsaw, MoCoV2,
                                 OptimConfig, Rotation, SimCLR)
from ssl_toolkit.views import ContrastiveViews, ViewConfig, Views

__version__ = "0.1.0"

__all__ = ["BackboneConfig", "Compile", "Encoder", "TextConfig", "build_backbone", "CaptionDataModule", "CIFARDataModule",
           "DigitsDataModule", "ImageFolderDataModule", "InMemoryDataModule", "NpzDataModule", "KNNCallback",
           "RetrievalCallback", "extract_features", "knn_accuracy", "linear_probe", "BaseSSLModule", "CLIP", "CPCV2",
           "DINO", "MoCoV2", "OptimConfig", "SimCLR", "Colorization", "Inpainting", "Jigsaw", "Rotation", "ContrastiveViews", "ViewConfig", "Views"]
