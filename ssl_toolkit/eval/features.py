"""Frozen-feature extraction shared by the evaluators."""

import torch
from torch import nn

from ssl_toolkit.data.base import InMemoryDataModule


@torch.no_grad()
def extract_features(encoder: nn.Module, datamodule: InMemoryDataModule, split: str,
                     device: torch.device | str = "cpu", batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` (in eval mode, no augmentation) over a split: ``(N, D)`` float32 features and labels.

    The encoder's train/eval mode is restored afterwards. On CUDA the forward runs in bf16 autocast.
    """
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for x, y in datamodule.iter_split(split, batch_size, device):
                feats.append(encoder(x).float())
                labels.append(y)
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)
