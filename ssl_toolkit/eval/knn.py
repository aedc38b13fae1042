"""Weighted kNN classification on frozen features, on FAISS with a brute-force torch reference.

The protocol of Wu et al. 2018 (https://arxiv.org/abs/1805.01978), as used by DINO
(https://arxiv.org/abs/2104.14294): cosine similarity, the k nearest training features
vote for their class with weight ``exp(s / T)``.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

try:
    import faiss
except ImportError:  # faiss is a declared dependency; the torch path still works without it
    faiss = None


def faiss_has_gpu() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def search_torch(train: torch.Tensor, test: torch.Tensor, k: int, chunk: int = 4096,
                 fp16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k by matrix products, in chunks of test rows (the reference).

    With ``fp16`` the features are rounded to half precision first (stored as half on CUDA, where the products
    run in half; on the CPU the rounded values are multiplied in float32).
    """
    if fp16:
        dtype = torch.float16 if train.is_cuda else torch.float32
        train, test = train.half().to(dtype), test.half().to(dtype)
    sims, idx = [], []
    for q in test.split(chunk):
        s, i = (q @ train.T).float().topk(k, dim=1)  # (chunk, N) -> (chunk, k)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def make_index(xb: np.ndarray, kind: str = "flat", fp16: bool = False, nlist: int | None = None, nprobe: int = 8,
               gpu: bool = True):
    """A FAISS inner-product index holding ``xb``: ``flat`` (exact) or ``ivf`` (``nlist`` k-means cells, ``nprobe`` of
    them searched per query; default nlist sqrt(N), at most N / 39: FAISS's k-means wants 39 vectors a cell and warned
    on stderr below that, as for sqrt(1000) = 32 cells). ``fp16`` stores vectors in half precision (FAISS's fp16
    scalar quantizer). With ``gpu``, a flat float32 index moves to the GPU when faiss has one.
    """
    if faiss is None:
        raise ImportError("faiss is not installed: pip install faiss-cpu (or faiss-gpu), or pass backend='torch'.")
    d, ip = xb.shape[1], faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, ip) if fp16 else faiss.IndexFlatIP(d)
        if gpu and faiss_has_gpu() and not fp16:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    elif kind == "ivf":
        nlist = nlist or max(1, min(int(round(len(xb) ** 0.5)), len(xb) // 39))
        if not 1 <= nlist <= len(xb):
            raise ValueError(f"An IVF index with nlist={nlist} needs at least that many vectors; got {len(xb)}. "
                             "Lower nlist or use the flat index.")
        quantizer = faiss.IndexFlatIP(d)
        index = (faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, ip) if fp16
                 else faiss.IndexIVFFlat(quantizer, d, nlist, ip))
        index.train(xb)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"Unknown index type {kind!r}; use flat or ivf.")
    index.add(xb)
    return index


def search_faiss(train: torch.Tensor, test: torch.Tensor, k: int, fp16: bool = False, index: str = "flat",
                 nlist: int | None = None, nprobe: int = 8, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner-product top-k with a FAISS index (:func:`make_index`), queries searched ``chunk`` at a time so the
    result buffers stay bounded for any number of queries."""
    xb = np.ascontiguousarray(train.detach().float().cpu().numpy())
    built = make_index(xb, index, fp16, nlist, nprobe)
    sims, idx = [], []
    for q in test.split(chunk):
        s, i = built.search(np.ascontiguousarray(q.detach().float().cpu().numpy()), k)
        sims.append(torch.from_numpy(s))
        idx.append(torch.from_numpy(i).long())
    return torch.cat(sims).to(test.device), torch.cat(idx).to(test.device)


def auto_backend(on_cuda: bool, index: str = "flat") -> str:
    """The backend ``auto`` picks: FAISS when installed, except for an exact search of features already on a GPU
    that the installed FAISS cannot use (faiss-cpu): there the torch search runs on the GPU, with no copy to the host.

    Example:
        >>> auto_backend(on_cuda=False) == ("faiss" if faiss is not None else "torch")
        True
    """
    if faiss is None:
        return "torch"
    if on_cuda and index == "flat" and not faiss_has_gpu():
        return "torch"
    return "faiss"


def knn_search(train_feats: torch.Tensor, test_feats: torch.Tensor, k: int, backend: str = "auto",
               fp16: bool = False, **index_args) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of each test feature in the training features: ``(M, k)`` similarities and indices.

    Args:
        train_feats: ``(N, D)`` memory bank; L2-normalised here.
        test_feats: ``(M, D)`` queries; L2-normalised here.
        k: Neighbours to return, sorted by decreasing similarity.
        backend: ``faiss``, ``torch`` (brute-force reference) or ``auto`` (:func:`auto_backend`).
        fp16: Keep the (normalised) features in half precision: half the memory of the memory bank.
        index_args: FAISS only: ``index="ivf"``, ``nlist``, ``nprobe`` for an approximate search.
    """
    if not 1 <= k <= len(train_feats):
        raise ValueError(f"kNN needs 1 <= k <= {len(train_feats)} (the memory bank size); got k={k}.")
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"kNN needs (N, D) and (M, D) features of one dimension; got {tuple(train_feats.shape)} "
                         f"and {tuple(test_feats.shape)}.")
    kind = index_args.get("index", "flat")
    if backend == "auto":
        backend = auto_backend(train_feats.is_cuda, kind)
    if backend not in ("faiss", "torch"):
        raise ValueError(f"kNN backend must be 'auto', 'faiss' or 'torch'; got {backend!r}.")
    if backend == "torch" and kind != "flat":
        raise ValueError("An IVF index needs the faiss backend; the torch reference is exact.")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    if backend == "faiss":
        return search_faiss(train, test, k, fp16=fp16, **index_args)
    return search_torch(train, test, k, fp16=fp16)


def neighbour_recall(found, exact) -> float:
    """Mean fraction of each row's exact neighbours (``(M, k)`` indices) that ``found`` also returns; 1.0 when the
    sets agree. Takes tensors or arrays.

    Example:
        >>> neighbour_recall(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]]))
        0.75
    """
    found, exact = np.asarray(found), np.asarray(exact)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), exact.tolist())]))


def vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores ``(M, C)``: each neighbour adds ``exp(s / T)`` to its class, scaled per query by
    ``exp(-s_max / T)`` (its nearest neighbour's similarity): the classes rank the same, and a T under ~0.012,
    where ``exp(1 / T)`` overflows float32, no longer turns every vote into inf and the answer into class 0."""
    if not 0 < temperature < math.inf:  # nan passed "<= 0" and scored every query as class 0
        raise ValueError(f"kNN temperature must be a finite number > 0; got {temperature}.")
    weights = ((sims - sims.amax(1, keepdim=True)) / temperature).exp()  # (M, k) in (0, 1]
    return torch.zeros(len(sims), num_classes, device=sims.device).scatter_add_(1, neighbour_labels, weights)


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, backend: str = "auto") -> torch.Tensor:
    """Class scores ``(M, C)`` of weighted kNN.

    Args:
        train_feats: ``(N, D)`` memory bank.
        train_labels: ``(N,)`` labels of the memory bank.
        test_feats: ``(M, D)`` queries.
        num_classes: Number of classes C.
        k: Neighbours that vote (20 and 200 are the usual reports).
        temperature: Vote weight ``exp(s / T)``; 0.07 in Wu et al. and DINO, 0.1 in lightly's CIFAR benchmarks.
        backend: ``faiss``, ``torch`` or ``auto`` (faiss when installed).

    Example:
        >>> bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> knn_scores(bank, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.05]]), 2, k=2).argmax(1)
        tensor([0])
    """
    sims, idx = knn_search(train_feats, test_feats, k, backend)
    return vote(sims, train_labels.to(idx.device)[idx], num_classes, temperature)


def knn_sweep(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
              test_labels: torch.Tensor, num_classes: int, ks: tuple[int, ...] = (10, 20, 100, 200),
              temperatures: tuple[float, ...] = (0.02, 0.05, 0.07, 0.1, 0.2, 0.5),
              backend: str = "auto", fp16: bool = False, **index_args) -> dict[float, dict[int, float]]:
    """Top-1 accuracy (in %) of weighted kNN for every (T, k), from one search with the largest k.

    Neighbours come back sorted, so each k is a prefix of the one search and each T only re-weights the votes:
    the whole grid costs one search. A k larger than the memory bank is reduced to its size.

    Returns:
        ``{T: {k: top1}}``.

    Example:
        >>> bank, labels = torch.eye(4), torch.tensor([0, 0, 1, 1])
        >>> knn_sweep(bank, labels, bank, labels, 2, ks=(1, 4), temperatures=(0.1,), backend="torch")
        {0.1: {1: 100.0, 4: 100.0}}
    """
    sims, idx = knn_search(train_feats, test_feats, min(max(ks), len(train_feats)), backend, fp16, **index_args)
    return vote_sweep(sims, idx, train_labels, test_labels, num_classes, ks, temperatures)


def vote_sweep(sims: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, test_labels: torch.Tensor,
               num_classes: int, ks: tuple[int, ...], temperatures: tuple[float, ...]) -> dict[float, dict[int, float]]:
    """``{T: {k: top1}}`` from one sorted search result ``(M, k_max)``; a k above ``k_max`` is reduced to it."""
    ks = tuple(sorted({min(k, idx.shape[1]) for k in ks}))
    labels = train_labels.to(idx.device)[idx]  # (M, k_max)
    truth = test_labels.to(idx.device)
    return {t: {k: 100.0 * (vote(sims[:, :k], labels[:, :k], num_classes, t).argmax(1) == truth).float().mean().item()
                for k in ks} for t in temperatures}


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, ks: tuple[int, ...] = (20, 200),
                 temperature: float = 0.07, backend: str = "auto") -> dict[int, float]:
    """Top-1 accuracy (in %) of weighted kNN for each k in ``ks`` at one temperature (see :func:`knn_sweep`)."""
    return knn_sweep(train_feats, train_labels, test_feats, test_labels, num_classes, ks, (temperature,),
                     backend)[temperature]
