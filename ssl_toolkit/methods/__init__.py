"""Methods: a base module with the plumbing, one short file per method."""

from ssl_toolkit.methods.base import BaseSSLModule, NonFiniteLossError, OptimConfig
from ssl_toolkit.methods.clip import CLIP
from ssl_toolkit.methods.colorization import Colorization
from ssl_toolkit.methods.cpc import CPCV2
from ssl_toolkit.methods.dino import DINO
from ssl_toolkit.methods.inpainting import Inpainting
from ssl_toolkit.methods.jigsaw import Jigsaw
from ssl_toolkit.methods.moco import MoCoV2
from ssl_toolkit.methods.rotation import Rotation
from ssl_toolkit.methods.simclr import SimCLR

__all__ = ["BaseSSLModule", "CLIP", "Colorization", "CPCV2", "DINO", "Inpainting", "Jigsaw", "MoCoV2", "NonFiniteLossError", "OptimConfig", "Rotation", "SimCLR"]
