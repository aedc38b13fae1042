"""Collectives for multi-process training, each with a single-process fast path.

Every collective of the toolkit goes through this module, so a loss or a method never
calls ``torch.distributed`` itself and everything runs in one CPU process for tests.
"""

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather as _all_gather_list


def _gather_cat(x: torch.Tensor, gather_dim: int, group) -> torch.Tensor:
    """torch.distributed.nn's differentiable all-gather, concatenated: the one torch before 2.14 has."""
    return torch.cat(_all_gather_list(x, group), dim=gather_dim)


try:  # torch 2.14 deprecates the one above for this one (a FutureWarning on every call, so on every DDP step)
    from torch.distributed._functional_collectives import all_gather_single_autograd as _gather_with_grad
except ImportError:
    _gather_with_grad = _gather_cat


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def end_process_group() -> None:
    """Destroy the default process group, on every rank, once a run has finished its last collective.

    Lightning destroys it at exit for NCCL only. A gloo group (DDP on CPUs) left to interpreter shutdown keeps
    gloo's worker threads, and the tensors of their last work, alive while Python tears down; one of them taking
    the GIL then aborts the process now and then ("terminate called without an active exception", exit code -6,
    after a run that had finished; pytorch/pytorch#38228). Destroying it first joins those threads while
    Python is still whole. The barrier first keeps a rank from closing its connections while a peer still
    finishes the last collective. No-op without a process group.
    """
    if is_distributed():
        dist.barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping the gradient path.

    The backward pass sums the gradients that every rank's loss sends to this rank's
    rows (torch's differentiable all-gather), so with DDP's gradient averaging the
    update equals the gradient of the mean loss over all ranks.

    Example:
        >>> gather_with_grad(torch.ones(2, 3)).shape  # single process: unchanged
        torch.Size([2, 3])
    """
    if not is_distributed():
        return x
    return _gather_with_grad(x.contiguous(), 0, dist.group.WORLD)  # (world * B, ...)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 without a gradient path."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order, when the ranks hold different numbers of rows
    (an evaluation's shares of a split). Each rank's rows are padded to the longest for the all-gather.

    Example:
        >>> gather_uneven(torch.ones(3, 2)).shape  # single process: unchanged
        torch.Size([3, 2])
    """
    if not is_distributed():
        return x
    sizes = gather(torch.tensor([len(x)], device=x.device)).tolist()
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[:len(x)] = x
    parts = gather(padded).split(max(sizes))
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers of ``module`` (batch-norm running statistics), in place.

    DDP does this before each training forward; after it, each rank's forward moves its running statistics with
    its own batch, so between steps they differ slightly across ranks. Training-mode batch norm does not read
    them, so overwriting them changes no step; an evaluation whose ranks each encode part of the data calls this
    first, so that all parts come from the same model."""
    if is_distributed():
        for b in module.buffers():
            dist.broadcast(b, src=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over all ranks (a copy; ``x`` itself is not changed)."""
    if not is_distributed():
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


@torch.no_grad()
def shuffle_across_ranks(x: torch.Tensor, in_process: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch across all ranks (MoCo's shuffle-BN); returns the shuffled local batch and the undo index.

    Every rank receives ``B`` rows drawn from the global batch, so batch-norm statistics of the
    key encoder cannot pair a query with its key through the local batch. Rank 0 draws the
    permutation and broadcasts it. In a single process the batch is returned as is (one process
    computes its statistics over the whole batch whatever the order), unless ``in_process``: then it
    is permuted locally, for batch norm split into sub-batches (``backbones.SplitBatchNorm2d``).
    """
    if not is_distributed():
        if not in_process:
            return x, torch.arange(len(x), device=x.device)
        perm = torch.randperm(len(x), device=x.device)
        return x[perm], perm.argsort()
    b = x.shape[0]
    x_all = gather(x)  # (W*B, ...)
    perm = torch.randperm(len(x_all), device=x.device)
    dist.broadcast(perm, src=0)
    unshuffle = perm.argsort()
    return x_all[perm.view(world_size(), b)[rank()]], unshuffle


@torch.no_grad()
def unshuffle_across_ranks(y: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shuffle_across_ranks` on the outputs ``y`` computed from the shuffled batch."""
    if not is_distributed():
        return y[unshuffle]
    b = y.shape[0]
    return gather(y)[unshuffle.view(world_size(), b)[rank()]]


class Vote:
    """The DDP ranks' agreement on whether a signal stops the run (ssl_toolkit.saving.StopAndSave), cast after
    each step.

    Each rank casts a code (0: no signal) in an all-reduce (max) of one integer on the CPU, over gloo (a group of
    its own when the run's is NCCL), started after one step and read after the next: by then it is done, so no
    rank waits for the others or for the GPU, and every rank reads the same result after the same step. Every
    rank must poll at the same points.
    """

    def __init__(self):
        self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._code = torch.zeros(1, dtype=torch.int64)
        self._work = None

    def _result(self) -> int:
        if self._work is None:
            return 0
        self._work.wait()
        self._work = None
        return int(self._code)

    def poll(self, code: int | None, wait: bool = False) -> int:
        """Cast ``code`` (None: end the voting) and return the highest code of the previous poll's votes, or with
        ``wait`` of this one's too."""
        agreed = self._result()
        if agreed or code is None:
            return agreed
        self._code.fill_(code)
        self._work = dist.all_reduce(self._code, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return self._result() if wait else 0
