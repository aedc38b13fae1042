"""Two gloo processes against one process with the whole batch: every collective of the methods, on the CPU."""

import numpy as np
import pytest
import torch

from ssl_toolkit import distributed
from ssl_toolkit.losses import nt_xent, update_center
from ssl_toolkit.queue import FeatureQueue

WORLD, B = 2, 4  # 2 ranks with 4 images each against 1 process with 8


def _on_two_ranks(worker, *args) -> list:
    """Run ``worker(rank, init_file, *args, results)`` in WORLD forked gloo processes; each puts
    ``(rank, ...)`` on ``results``. Returns the rest of each rank's tuple, in rank order; a worker's exception is
    raised here (rather than leaving the test waiting for its result)."""
    import queue
    import tempfile

    import torch.multiprocessing as mp

    results = mp.get_context("fork").Queue()
    with tempfile.TemporaryDirectory() as tmp:
        workers = mp.start_processes(worker, args=(f"{tmp}/init", *args, results), nprocs=WORLD, start_method="fork",
                                     join=False)
        got = {}
        while len(got) < WORLD:  # read before joining: a worker with a large result waits until it is read
            try:
                r = results.get(timeout=1)
                got[r[0]] = r[1:]
            except queue.Empty:
                workers.join(timeout=0)  # raises a failed worker's exception
        while not workers.join():
            pass
    return [got[r] for r in range(WORLD)]


def _worker(rank, init_file, z1, z2, keys, teacher, results):
    import warnings

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    rows = slice(rank * B, (rank + 1) * B)
    # SimCLR: negatives gathered from both ranks, with gradient.
    a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
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
                 int(queue.ptr), torch.equal(back, keys[rows]), center.numpy(), [str(w.message) for w in warned]))
    dist.destroy_process_group()


@pytest.mark.parametrize("gather", ["default", "torch.distributed.nn"])
def test_two_ranks_equal_one_process_with_the_whole_batch(gather, monkeypatch):
    """The gather with gradient of this torch (2.14: the functional collective) and of earlier ones (forced here);
    the forked ranks inherit the choice."""
    if gather != "default":
        monkeypatch.setattr(distributed, "_gather_with_grad", distributed._gather_cat)
    torch.manual_seed(1)
    z1, z2, keys, teacher = torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 5).softmax(1)
    got = _on_two_ranks(_worker, z1, z2, keys, teacher)

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
    import torch.distributed._functional_collectives as functional

    for r in range(WORLD):
        loss, g1, g2, feats, ptr, unshuffled, c, warned = got[r]
        if gather == "default" and hasattr(functional, "all_gather_single_autograd"):  # torch 2.14 deprecates the
            assert warned == [], warned  # other, with a FutureWarning on every call: every step of a DDP run
        rows = slice(r * B, (r + 1) * B)
        # Each rank's rows get WORLD x the single-process gradient; DDP's mean over ranks gives it back exactly.
        assert torch.allclose(torch.from_numpy(g1), WORLD * full1.grad[rows], atol=1e-6)
        assert torch.allclose(torch.from_numpy(g2), WORLD * full2.grad[rows], atol=1e-6)
        assert torch.equal(torch.from_numpy(feats), queue.features) and ptr == int(queue.ptr) == 4
        assert unshuffled
        assert torch.allclose(torch.from_numpy(c), center, atol=1e-7)


def test_ddp_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    """Two CPU processes under Lightning DDP: the DistributedSampler's epoch order resumes at the saved batch."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint

    from ssl_toolkit.backbones import BackboneConfig
    from ssl_toolkit.data import DigitsDataModule
    from ssl_toolkit.methods import MoCoV2, OptimConfig
    from ssl_toolkit.views import ViewConfig

    class OneThread(Callback):  # forked workers must not use the parent's thread pool
        def setup(self, trainer, pl_module, stage):
            torch.set_num_threads(1)

    class Kill(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 6:  # epoch 0 has 9 steps; the last checkpoint is step 6's
                raise RuntimeError("killed")

    def fit(folder, kill=False, ckpt_path=None, batch_size=64):
        pl.seed_everything(0)
        model = MoCoV2(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), queue_size=256,
                       optim=OptimConfig("sgd", lr=0.05, warmup_epochs=0.5), proj_hidden_dim=16, proj_out_dim=8)
        callbacks = [OneThread(), ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2)]
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=WORLD, strategy="ddp_fork", logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=callbacks + ([Kill()] if kill else []))
        trainer.fit(model, DigitsDataModule(image_size=16, batch_size=batch_size), ckpt_path=ckpt_path)
        return model  # the spawn strategies load rank 0's final weights back into this process's model

    pl.seed_everything(0)
    init = MoCoV2(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), queue_size=256,
                  proj_hidden_dim=16, proj_out_dim=8).state_dict()
    straight = fit(tmp_path / "a").state_dict()
    with pytest.raises(Exception, match="killed"):
        fit(tmp_path / "b", kill=True)
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["global_step"] == 6
    resumed = fit(tmp_path / "c", ckpt_path=str(tmp_path / "b" / "last.ckpt")).state_dict()
    assert not torch.equal(straight["backbone.0.weight"], init["backbone.0.weight"])  # trained weights came back
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k  # weights, key encoder, the queue filled by both ranks, its pointer
    # at half the batch size it goes on after the 768 images trained on (12 of the epoch's 19 batches of 2 x 32);
    # it skipped 6 batches of the new size, and 384 images went untrained (then 6 + 13 + 19 steps)
    fit(tmp_path / "d", ckpt_path=str(tmp_path / "b" / "last.ckpt"), batch_size=32)
    assert torch.load(tmp_path / "d" / "last.ckpt", weights_only=True)["global_step"] == 6 + (19 - 12) + 19


MODEL_B = 6  # images per rank in the model-level test


def _model(name: str):
    """The method with tiny settings, identical in every process; its batch norms use fixed statistics.

    Batch norm couples the samples of one rank; the DDP remedy, SyncBN (``trainer.sync_batchnorm``), runs on GPUs
    only in torch, so here every BN layer is in eval mode (an affine map per sample) and the rest trains.
    """
    from dataclasses import replace

    from ssl_toolkit.backbones import BackboneConfig, TextConfig
    from ssl_toolkit.methods import CLIP, DINO, MoCoV2, SimCLR
    from ssl_toolkit.methods.clip import CLIP_VIEWS
    from ssl_toolkit.views import ViewConfig

    torch.manual_seed(0)
    backbone, views = BackboneConfig("tiny_cnn", width=4), ViewConfig(crop_size=16)
    model = {
        "simclr": lambda: SimCLR(backbone, views=views, proj_hidden_dim=16, proj_out_dim=8),
        "moco": lambda: MoCoV2(backbone, views=views, queue_size=24, proj_hidden_dim=16, proj_out_dim=8),
        "dino": lambda: DINO(backbone, views=views, num_local_crops=2, local_crop_size=8, out_dim=32, hidden_dim=16,
                             bottleneck_dim=8, head_batch_norm=True),
        "clip": lambda: CLIP(backbone, embed_dim=8, views=replace(CLIP_VIEWS, crop_size=16),
                             text=TextConfig(vocab_size=64, context_length=8, width=16, layers=1, heads=2)),
    }[name]()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _rows(views, rank: int):
    """Rank ``rank``'s share of a batch's views: the same rows of every crop (and caption)."""
    from dataclasses import replace

    rows = slice(rank * MODEL_B, (rank + 1) * MODEL_B)
    return replace(views, crops=[c[rows] for c in views.crops],
                   tokens=views.tokens[rows] if views.tokens is not None else None)


def _train_step(model, views) -> tuple:
    """One step's loss, the parameter gradients and the state a step changes (queue, pointer, center)."""
    loss = model.sum_losses(model.step(views))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[-1] in ("features", "ptr", "center")}
    return loss.item(), grads, state


def _model_worker(rank, init_file, name, views, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    loss, grads, state = _train_step(_model(name), _rows(views, rank))
    results.put((rank, loss, {k: v.numpy() for k, v in grads.items()}, {k: v.numpy() for k, v in state.items()}))
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["simclr", "moco", "dino", "clip"])
def test_a_method_step_on_two_ranks_equals_one_process_with_the_whole_batch(name):
    """World 2 x batch B against one process with batch 2B, same data and views: the loss averaged over the
    ranks and the gradients averaged over the ranks (what DDP applies) equal the single process's."""
    model = _model(name)
    torch.manual_seed(1)
    views = model.view_policy(torch.randint(0, 256, (WORLD * MODEL_B, 3, 16, 16), dtype=torch.uint8))
    if name == "clip":
        views.tokens = torch.randint(0, 64, (WORLD * MODEL_B, 8))  # (2B, L) one caption per image
    got = _on_two_ranks(_model_worker, name, views)
    loss, grads, state = _train_step(model, views)

    # Stated tolerance: float32 sums in another order. 1e-5 relative on the loss; on each gradient tensor and on the
    # queue / center, 1e-3 of the tensor's largest entry plus 1e-7: entries near 0 are sums that cancel (a bias
    # before a normalisation), so their own size is no scale. Measured worst: 3e-4 of the largest entry (SimCLR's
    # last projector bias). A gradient off by the world size, or negatives from one rank only, miss by > 10%.
    def close(a, b):
        return (a - b).abs().max() <= 1e-3 * b.abs().max() + 1e-7

    assert np.mean([g[0] for g in got]) == pytest.approx(loss, rel=1e-5)
    assert set(got[0][1]) == set(grads) and len(grads) > 4
    for k, full in grads.items():
        ddp = torch.as_tensor(np.mean([g[1][k] for g in got], axis=0))  # DDP's all-reduce mean
        assert close(ddp, full), (k, (ddp - full).abs().max().item(), full.abs().max().item())
    for k, full in state.items():  # every rank holds the whole batch's queue / center
        for g in got:
            assert close(torch.from_numpy(g[2][k]), full), k


def _small_data(n_train: int, n_test: int):
    """An in-memory DataModule of random 16 px images with labels."""
    from ssl_toolkit.data import InMemoryDataModule
    from ssl_toolkit.data.base import Splits

    class Small(InMemoryDataModule):
        name = "small"

        def load(self) -> Splits:
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (n_train + n_test, 3, 16, 16), dtype=torch.uint8, generator=g)
            y = torch.arange(n_train + n_test) % 3
            return Splits(x[:n_train], y[:n_train], x[n_train:], y[n_train:], ["a", "b", "c"])

    return Small()


def _encoder():
    from ssl_toolkit.backbones import BackboneConfig
    from ssl_toolkit.methods import SimCLR

    torch.manual_seed(0)
    encoder = SimCLR(BackboneConfig("tiny_cnn", width=4)).encoder()
    for m in encoder.modules():  # trained-looking batch-norm statistics, the same in every process
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return encoder


class _Joint(torch.nn.Module):
    """A stand-in for a CLIP model's image tower: ``embed_images`` only."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.encoder(x)


def _features_worker(rank, init_file, results):
    import torch.distributed as dist

    from ssl_toolkit.eval.features import extract_features
    from ssl_toolkit.eval.retrieval import embed_split

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    encoder, dm = _encoder(), _small_data(37, 5)
    if rank == 1:  # after a DDP step each rank's running statistics have moved with its own batch
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(1.0)
    encoded = []
    encoder.register_forward_hook(lambda module, args, out: encoded.append(len(args[0])))
    got = {}
    for split, max_batches in (("train", None), ("train", 3), ("test", None)):  # 5, 3 and 1 batches of 8
        encoded.clear()
        x, y = extract_features(encoder, dm, split, "cpu", 8, max_batches, across_ranks=True)
        got[split, max_batches] = (x.numpy(), y.numpy(), list(encoded))
    encoded.clear()  # CLIP's held-out images (RetrievalCallback) go the same way
    joint = _Joint(encoder)
    got["embed_split"] = (embed_split(joint, dm, "train", "cpu", 8, across_ranks=True)[0].numpy(), list(encoded))
    results.put((rank, got))
    dist.destroy_process_group()


def test_evaluation_features_are_encoded_in_shares_across_ranks():
    """Under DDP each rank of a kNN or probe evaluation encoded the whole split, so 8 GPUs took as long as one.
    Now each encodes a contiguous share and gathers the rest: every rank gets the single process's features and
    labels, in order, from rank 0's model (rank 1's batch-norm statistics differ), after 1/world of the work.
    CLIP's held-out image embeddings (RetrievalCallback) take the same path."""
    from ssl_toolkit.eval.features import extract_features

    got = _on_two_ranks(_features_worker)
    encoder, dm = _encoder(), _small_data(37, 5)
    # images per forward on rank 0 and rank 1: 37 training images are 5 batches of 8, the last of 5
    shares = {("train", None): ([8, 8], [8, 8, 5]), ("train", 3): ([8], [8, 8]), ("test", None): ([5], [5])}
    for (split, max_batches), per_rank in shares.items():
        x, y = extract_features(encoder, dm, split, "cpu", 8, max_batches)
        for r in range(WORLD):
            gx, gy, encoded = got[r][0][split, max_batches]
            assert torch.equal(torch.from_numpy(gy), y)
            # Stated tolerance: the same batches through the same weights; only the thread count differs (1e-5).
            assert torch.allclose(torch.from_numpy(gx), x, atol=1e-5), (split, max_batches, r)
            assert encoded == per_rank[r], (split, max_batches, r)  # test: 1 batch for 2 ranks, each encodes it
    whole = 2 * extract_features(encoder, dm, "train", "cpu", 8)[0]
    for r in range(WORLD):
        gx, encoded = got[r][0]["embed_split"]
        assert torch.allclose(torch.from_numpy(gx), whole, atol=1e-5) and encoded == shares["train", None][r]


def test_every_collective_goes_through_the_distributed_helper():
    """No module but ``ssl_toolkit.distributed`` imports ``torch.distributed`` or calls a collective itself."""
    import ast
    from pathlib import Path

    collectives = {"all_gather", "all_reduce", "broadcast", "barrier", "reduce_scatter", "all_to_all",
                   "reduce_boolean_decision", "all_gather_object", "broadcast_object_list"}
    package = Path(distributed.__file__).parent
    offenders, files = [], 0
    for path in package.rglob("*.py"):
        if path == Path(distributed.__file__):
            continue
        files += 1
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(package.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                offenders += [where for a in node.names if a.name.startswith("torch.distributed")]
            elif isinstance(node, ast.ImportFrom) and node.module:
                offenders += [where for a in node.names if f"{node.module}.{a.name}".startswith("torch.distributed")]
            elif isinstance(node, ast.Attribute) and node.attr == "distributed" and getattr(node.value, "id", "") == "torch":
                offenders.append(where)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in collectives
                  and getattr(node.func.value, "id", "") != "distributed"):
                offenders.append(where)
    assert files > 30 and not offenders, offenders
