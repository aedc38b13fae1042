"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
https://arxiv.org/abs/2103.00020), with LiT's locked image tower (Zhai et al. 2022, "LiT: Zero-Shot
Transfer with Locked-image text Tuning", https://arxiv.org/abs/2111.07991).

An image tower (any toolkit backbone + a linear projection) and a text Transformer (+ a linear
projection) are trained so that matching image-caption pairs have the highest scaled cosine
similarity in the batch, in both directions. With ``image_checkpoint`` the image backbone starts from
a checkpoint of any of the toolkit's SSL methods, and with ``lock_image`` it stays frozen (LiT's
"Lu" setting): image SSL first, then text alignment.
"""

import math
import warnings
from dataclasses import asdict, replace

import torch
from torch import nn

from ssl_toolkit.backbones import BackboneConfig, TextConfig, TextTransformer
from ssl_toolkit.losses import clip_loss
from ssl_toolkit.methods.base import BaseSSLModule, OptimConfig
from ssl_toolkit.views import ContrastiveViews, ViewConfig, Views

# A locked image tower is kept in eval mode on purpose (LiT); Lightning would warn about it at every fit.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

# CLIP's only augmentation is a random square crop of the resized image (Sec. 2.5).
CLIP_VIEWS = ViewConfig(scale=(0.5, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)


class CLIP(BaseSSLModule):
    """CLIP: image tower + text tower, symmetric InfoNCE with a learnable logit scale clamped at 100.

    Args:
        backbone: Image encoder (ignored with ``image_checkpoint``, whose backbone is used).
        optim: Optimizer and schedule (paper: AdamW, betas (0.9, 0.98), wd 0.2, lr 5e-4 at batch 32k).
        views: Image augmentation (normalisation comes from ``image_checkpoint`` when given).
        text: The text Transformer; its vocab_size and context_length must cover the data's tokenizer.
        embed_dim: Width of the joint embedding space (512 for CLIP ViT-B/32).
        init_temperature: Initial softmax temperature; the logit scale starts at 1 / T (paper: 0.07).
        max_logit_scale: Clamp of the logit scale after each step (paper: 100).
        image_checkpoint: A toolkit checkpoint (SimCLR, MoCo, DINO, ...) whose backbone starts the image tower.
        lock_image: Freeze the image backbone, batch-norm statistics included (LiT); the image projection trains.
        gather: Use the captions and images of every rank as negatives.
        channels_last: NHWC memory layout for convolutional image backbones.

    Example:
        >>> m = CLIP(BackboneConfig("tiny_cnn", width=4), views=replace(CLIP_VIEWS, crop_size=16), embed_dim=8,
        ...          text=TextConfig(vocab_size=300, context_length=8, width=16, layers=1, heads=2))
        >>> views = m.view_policy(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8))
        >>> views.tokens = torch.tensor([[1, 5, 2, -1, -1, -1, -1, -1]] * 4) + torch.arange(4)[:, None] * 10
        >>> sorted(m.step(views))
        ['clip_loss', 'i2t_acc', 'logit_scale', 'neg_sim', 'pos_sim', 't2i_acc']
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(
                 "adamw", lr=5e-4, betas=(0.9, 0.98), weight_decay=0.2, warmup_epochs=1.0),
                 views: ViewConfig = CLIP_VIEWS, text: TextConfig = TextConfig(), embed_dim: int = 512,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0, image_checkpoint: str | None = None,
                 lock_image: bool = False, gather: bool = True, channels_last: bool = False):
        if not (init_temperature > 0 and 1 / init_temperature <= max_logit_scale):
            raise ValueError(f"CLIP needs 0 < 1 / init_temperature <= max_logit_scale; got init_temperature="
                             f"{init_temperature}, max_logit_scale={max_logit_scale} (paper: 0.07 and 100).")
        if embed_dim < 1:  # 0 trained on empty embeddings and said nothing
            raise ValueError(f"CLIP's embed_dim (the joint space) must be >= 1; got {embed_dim}. CLIP ViT-B/32 uses "
                             "512.")
        source = None
        if image_checkpoint:
            from ssl_toolkit.checkpoint import CheckpointError, load_checkpoint

            source = load_checkpoint(image_checkpoint)
            hp = source["hyper_parameters"]
            if "patch" in hp:
                raise CheckpointError(f"{image_checkpoint} is a patch-based ({source['ssl_toolkit']['method']}) "
                                      "checkpoint; its backbone sees patches, not whole images. Use a SimCLR, MoCo "
                                      "or DINO checkpoint as the CLIP image tower.")
            backbone = BackboneConfig(**hp["backbone"])  # the tower the checkpoint trained, with its normalisation
            views = replace(views, mean=tuple(hp["views"]["mean"]), std=tuple(hp["views"]["std"]))
        super().__init__(backbone, optim, views, channels_last)
        self.save_config(text=asdict(text), embed_dim=embed_dim, init_temperature=init_temperature,
                         max_logit_scale=max_logit_scale, lock_image=lock_image, gather=gather,
                         image_tower_from=image_checkpoint)  # provenance only: reloading uses the saved weights
        if source is not None:
            from ssl_toolkit.checkpoint import load_backbone_weights

            load_backbone_weights(source, self.backbone)
        self.text_config, self.lock_image, self.gather = text, lock_image, gather
        self.text = TextTransformer(text)
        self.image_proj = nn.Linear(self.feature_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.text_proj.weight, std=text.width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))  # log of the scale
        self.max_log_scale = math.log(max_logit_scale)
        self.view_policy = ContrastiveViews(views, num_views=1)
        self.tokenizer_json: str | None = None  # the data's tokenizer, saved in checkpoints for evaluation
        if lock_image:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lock_image:
            self.backbone.eval()  # a locked tower keeps its batch-norm statistics
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.attached_datamodule
        if dm is None:
            return
        tokenizer = getattr(dm, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"CLIP trains on image-caption pairs; {type(dm).__name__} has no captions. Use "
                            "data: ssl_toolkit.data.CaptionDataModule (a CSV of image,caption and an image folder).")
        c = self.text_config
        if tokenizer.vocab_size > c.vocab_size or dm.context_length > c.context_length:
            raise ValueError(f"The data's tokenizer has {tokenizer.vocab_size} tokens and {dm.context_length} positions, "
                             f"but the text tower has vocab_size={c.vocab_size}, context_length={c.context_length}. "
                             "Set model text.vocab_size >= data.vocab_size and text.context_length >= "
                             "data.context_length.")
        self.tokenizer_json = tokenizer.to_str()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        views, tokens = super().on_after_batch_transfer(batch, dataloader_idx)
        if isinstance(views, Views):
            views.tokens = tokens  # (B, L) one caption per image, drawn by the data module
        return views, tokens

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of normalised images; no gradient through a locked tower."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock_image):
            return self.backbone(self.prepare_input(x))  # (B, F)

    def step(self, views: Views) -> dict[str, torch.Tensor]:
        if views.tokens is None:
            raise ValueError("CLIP views carry no caption tokens; train it on a CaptionDataModule.")
        image = self.image_proj(self.image_features(views.crops[0]))  # (B, E)
        text = self.text_proj(self.text(views.tokens))  # (B, E)
        out = clip_loss(image, text, self.logit_scale.exp(), self.gather)
        return {**out, "logit_scale": self.logit_scale.detach().exp()}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.max_log_scale)  # CLIP: the scale never exceeds 100

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` images to unit-norm ``(B, E)`` joint embeddings (no augmentation)."""
        return nn.functional.normalize(self.image_proj(self.encoder()(images)).float(), dim=1)

    @torch.no_grad()
    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(M, L)`` token ids (padded with -1) to unit-norm ``(M, E)`` joint embeddings."""
        return nn.functional.normalize(self.text_proj(self.text(tokens)).float(), dim=1)

    def tokenizer(self):
        """The tokenizer the model was trained with (from the data module, or restored from a checkpoint)."""
        from ssl_toolkit.data.tokenizer import CaptionTokenizer

        if self.tokenizer_json is None:
            raise ValueError("This CLIP model has no tokenizer yet: train it on a CaptionDataModule or load a checkpoint.")
        return CaptionTokenizer.from_str(self.tokenizer_json)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ssl_toolkit"]["tokenizer"] = self.tokenizer_json

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tokenizer_json = checkpoint.get("ssl_toolkit", {}).get("tokenizer", self.tokenizer_json)
