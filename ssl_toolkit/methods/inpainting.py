"""Context encoder (Pathak et al. 2016, "Context Encoders: Feature Learning by Inpainting",
https://arxiv.org/abs/1604.07379).

Part of each crop is hidden; the backbone encodes what is left and a decoder paints the hidden
region back. The loss is the L2 error on the hidden pixels, optionally joined by an adversarial term
from a small discriminator (the paper's weights: 0.999 reconstruction, 0.001 adversarial).
"""

import torch
from torch import nn
from torch.func import functional_call

from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.heads import ConvDecoder
from ssl_toolkit.losses import adversarial_losses, masked_l2
from ssl_toolkit.methods.base import BaseSSLModule, OptimConfig
from ssl_toolkit.views import InpaintingViews, ViewConfig, Views, denormalize

INPAINTING_VIEWS = ViewConfig(scale=(0.6, 1.0), jitter_p=0.0, gray_p=0.0)


def discriminator(width: int = 32) -> nn.Sequential:
    """A small DCGAN-style discriminator over whole crops (stride-2 convs, LeakyReLU, one logit per image)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.BatchNorm2d(4 * width), nn.LeakyReLU(0.2, inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 1))


class Inpainting(BaseSSLModule):
    """Context encoder: backbone (encoder) + convolutional decoder, masked L2 (+ adversarial) loss.

    Args:
        backbone: The encoder; it sees the masked crop.
        optim: Optimizer and schedule (paper: Adam, lr 2e-4, beta1 0.5 for the joint loss).
        views: Crop/flip of the crop before masking; ``crop_size`` is 4 x a power of 2 for the decoder.
        mask: ``central`` (the paper's centre block), ``random_block`` or ``random_region`` (the paper's best
            features came from random regions).
        fraction: Block side as a fraction of the crop (0.5: 64 of 128 px in the paper).
        decoder_width: Channels of the decoder's first 4x4 map.
        adversarial_weight: lambda_adv; the reconstruction gets ``1 - lambda_adv`` (paper: 0.001; 0 turns the
            discriminator off).
        channels_last: NHWC memory layout for the convolutions.

    Example:
        >>> m = Inpainting(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), adversarial_weight=0.001)
        >>> sorted(m.step(m.view_policy(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))))
        ['adv_loss', 'disc_loss', 'rec_loss']
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(
                 "adamw", lr=2e-4, betas=(0.5, 0.999), weight_decay=0.0, warmup_epochs=0),
                 views: ViewConfig = INPAINTING_VIEWS, mask: str = "random_block", fraction: float = 0.5,
                 decoder_width: int = 256, adversarial_weight: float = 0.0, channels_last: bool = False):
        super().__init__(backbone, optim, views, channels_last)
        if not 0.0 <= adversarial_weight < 1.0:
            raise ValueError(f"adversarial_weight is lambda_adv in [0, 1); got {adversarial_weight}. The paper uses "
                             "0.001, and 0 trains with the reconstruction loss alone.")
        self.save_config(mask=mask, fraction=fraction, decoder_width=decoder_width,
                         adversarial_weight=adversarial_weight)
        self.view_policy = InpaintingViews(views, mask, fraction)
        self.decoder = ConvDecoder(self.feature_dim, views.crop_size, decoder_width)
        self.adversarial_weight = adversarial_weight
        self.discriminator = discriminator() if adversarial_weight > 0 else None

    def reconstruct(self, views: Views) -> torch.Tensor:
        """The decoder's ``(B, 3, s, s)`` image from the encoding of the masked crops."""
        return self.decoder(self.backbone(self.prepare_input(views.crops[0])))

    def step(self, views: Views) -> dict[str, torch.Tensor]:
        pred = self.reconstruct(views)  # (B, 3, s, s)
        target, mask = views.targets, views.masks
        out = {"rec_loss": (1 - self.adversarial_weight) * masked_l2(pred, target, mask)}
        if self.discriminator is not None:
            fake = pred * mask + target * (1 - mask)  # the painted region in its context
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            gan = adversarial_losses(self.discriminator(target), self.discriminator(fake.detach()),
                                     functional_call(self.discriminator, frozen, (fake,)))
            out["adv_loss"] = self.adversarial_weight * gan["gen"]  # trains the encoder-decoder only
            out["disc_loss"] = gan["disc"]  # trains the discriminator only
        return out

    @torch.no_grad()
    def inpaint(self, views: Views) -> torch.Tensor:
        """The crops with the hidden region painted in (normalised)."""
        pred = self.reconstruct(views)
        return pred * views.masks + views.targets * (1 - views.masks)

    def pictures(self, views: Views) -> dict[str, torch.Tensor]:
        """Named pictures in [0, 1]: the masked input, the inpainted crops, the original crops."""
        c = self.view_config
        return {"masked_input": denormalize(views.crops[0], c.mean, c.std),
                "inpainted": denormalize(self.inpaint(views), c.mean, c.std),
                "original": denormalize(views.targets, c.mean, c.std)}
