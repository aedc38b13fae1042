"""A FIFO queue of feature vectors, the negatives memory of MoCo.

He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning",
https://arxiv.org/abs/1911.05722 (Sec. 3.2, "Dictionary as a queue").
"""

import torch
import torch.nn.functional as F
from torch import nn


class FeatureQueue(nn.Module):
    """``size`` unit vectors of dimension ``dim``, oldest replaced first; saved in checkpoints.

    Args:
        size: Number of stored features K (4096 for CIFAR, 65536 for ImageNet); at least the
            number of keys pushed per step (the global batch). Pushes wrap around the end.
        dim: Feature dimension.

    Example:
        >>> q = FeatureQueue(size=4, dim=2)
        >>> q.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> int(q.ptr), q.features[:2].tolist()
        (2, [[1.0, 0.0], [0.0, 1.0]])
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"A feature queue needs size >= 1 and dim >= 1; got size={size}, dim={dim}.")
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))  # (K, D) random unit vectors
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (N, D) over the oldest N entries, wrapping around the end."""
        k, n = self.features.shape[0], keys.shape[0]
        if n > k:
            raise ValueError(f"Cannot push {n} keys into a queue of size {k}; raise queue_size above the global batch.")
        idx = (self.ptr + torch.arange(n, device=keys.device)) % k  # (N,) wrapped positions, no host sync
        self.features[idx] = keys.to(self.features.dtype)
        self.ptr.copy_((self.ptr + n) % k)
