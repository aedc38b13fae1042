"""Two gloo processes against one process with the whole batch: every collective of the methods, on the CPU."""

import numpy as np
import pytest
import torch

from ssl_toolkit import distributed
from ssl_toolkit.losses import nt_xent, update_center
from ssl_toolkit.queue import FeatureQueue

WORLD, B = 2, 4  # 2 ranks with 4 images each against 1 process with 8


def _worker(rank, init_file, z1, z2, keys, teacher, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    rows = slice(rank * B, (rank + 1) * B)
    # SimCLR: negatives gathered from both ranks, with gradient.
    a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
    out = nt_xent(a, b, temperature=0.5)
    out["ntxent_loss"].backward()
    # MoCo: every rank pushes the keys of both ranks, in rank order.
    torch.manual_seed(0)
    queue = FeatureQueue(size=12, dim=keys.shape[1])
    queue.push(distributed.gather(keys[rows]))
    queue.push(distributed.gather(keys[rows] * -1))  # a second step wraps around the end
    # MoCo's shuffle-BN: the shuffle is undone exactly.
    shuffled, unshuffle = distributed.shuffle_across_ranks(keys[rows])
    back = distributed.unshuffle_across_ranks(shuffled, unshuffle)
    # DINO: the center moves with the mean teacher output of the whole batch.
    center = update_center(torch.zeros(teacher.shape[1]), teacher[rows], momentum=0.9)
    results.put((rank, out["ntxent_loss"].item(), a.grad.numpy(), b.grad.numpy(), queue.features.numpy(),
                 int(queue.ptr), torch.equal(back, keys[rows]), center.numpy()))
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(1)
    z1, z2, keys, teacher = torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 5).softmax(1)
    results = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_worker, args=(str(tmp_path / "init"), z1, z2, keys, teacher, results), nprocs=WORLD,
                       start_method="fork")
    got = {r[0]: r[1:] for r in (results.get() for _ in range(WORLD))}

    full1, full2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = nt_xent(full1, full2, temperature=0.5)["ntxent_loss"]
    full.backward()
    torch.manual_seed(0)
    queue = FeatureQueue(size=12, dim=6)
    queue.push(keys)
    queue.push(-keys)
    center = update_center(torch.zeros(5), teacher, momentum=0.9)
    # Stated tolerance: float32 reductions in another order, 1e-5 relative on the loss, 1e-6 on gradients.
    assert np.mean([got[r][0] for r in range(WORLD)]) == pytest.approx(full.item(), rel=1e-5)
    for r in range(WORLD):
        loss, g1, g2, feats, ptr, unshuffled, c = got[r]
        rows = slice(r * B, (r + 1) * B)
        # Each rank's rows get WORLD x the single-process gradient; DDP's mean over ranks gives it back exactly.
        assert torch.allclose(torch.from_numpy(g1), WORLD * full1.grad[rows], atol=1e-6)
        assert torch.allclose(torch.from_numpy(g2), WORLD * full2.grad[rows], atol=1e-6)
        assert torch.equal(torch.from_numpy(feats), queue.features) and ptr == int(queue.ptr) == 4
        assert unshuffled
        assert torch.allclose(torch.from_numpy(c), center, atol=1e-7)
