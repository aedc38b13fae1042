"""Speed of the kNN search behind `ssl-toolkit knn`: N x M features of dimension d, top-k by inner product.

Backends: FAISS flat (exact) on the CPU with 2 threads and with all cores, FAISS IVF (approximate, with its
recall against exact), FAISS on the GPU when the installed faiss has GPUs, and the torch reference (chunked
matrix products; fp32 on the CPU, bf16 and fp32 on CUDA). Every backend's neighbours are compared with the
exact torch fp32 result. Writes a JSON result with the commit, device and library versions.

  python benchmarks/knn.py                                  # 50k x 10k, d=512, k=20 (the issue's setting)
  python benchmarks/knn.py --train 5000 --test 1000         # a quick run
"""

import argparse
import json
import os
import time

import torch

from ssl_toolkit.eval.knn import faiss, faiss_has_gpu, neighbour_recall, search_torch
from throughput import environment


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall-clock of ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nlist", type=int, default=256, help="IVF cells")
    p.add_argument("--nprobe", type=int, default=16, help="IVF cells searched per query")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/knn-<device>.json)")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    env = environment(torch.device("cuda" if cuda else "cpu"))
    g = torch.Generator().manual_seed(0)
    # Clustered unit vectors, like SSL features: 100 centres, neighbours mostly within a cluster.
    centres = torch.randn(100, a.dim, generator=g)
    train = torch.nn.functional.normalize(centres[torch.randint(0, 100, (a.train,), generator=g)]
                                          + 0.7 * torch.randn(a.train, a.dim, generator=g), dim=1)
    test = torch.nn.functional.normalize(centres[torch.randint(0, 100, (a.test,), generator=g)]
                                         + 0.7 * torch.randn(a.test, a.dim, generator=g), dim=1)
    xb, xq = train.numpy(), test.numpy()
    results = {}
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"knn-{'cuda' if cuda else 'cpu'}.json")

    def record(name: str, seconds: float, idx) -> None:
        idx = idx.cpu().numpy() if torch.is_tensor(idx) else idx
        results[name] = {"seconds": round(seconds, 4), "queries_per_s": round(a.test / seconds, 1),
                         "recall_vs_exact": round(neighbour_recall(idx, ref), 4)}
        print(f"{name:28s} {1000 * seconds:10.1f} ms  {a.test / seconds:12.0f} queries/s  "
              f"overlap with exact {results[name]['recall_vs_exact']:.4f}")
        with open(out, "w") as f:  # after every row, so a run cut short keeps what it measured
            json.dump({**env, "config": {"train": a.train, "test": a.test, "dim": a.dim, "k": a.k,
                                         "nlist": a.nlist, "nprobe": a.nprobe, "repeats": a.repeats},
                       "results": results}, f, indent=2)

    sec, (_, ref) = timed(lambda: search_torch(train, test, a.k), a.repeats)
    ref = ref.numpy()
    record("torch fp32 (cpu)", sec, ref)
    if cuda:  # first: the GPU rows are the ones a short GPU slot is for
        tr, te = train.cuda(), test.cuda()
        for dtype in (torch.float32, torch.bfloat16):
            trd, ted = tr.to(dtype), te.to(dtype)
            sec, (_, idx) = timed(lambda: search_torch(trd, ted, a.k, chunk=a.test), a.repeats)
            record(f"torch {str(dtype).split('.')[-1]} (cuda)", sec, idx)
    if faiss is not None:
        threads = faiss.omp_get_max_threads()
        for n in sorted({2, os.cpu_count() or 2}):
            faiss.omp_set_num_threads(n)
            flat = faiss.IndexFlatIP(a.dim)
            flat.add(xb)
            sec, (_, idx) = timed(lambda: flat.search(xq, a.k), a.repeats)
            record(f"faiss flat (cpu, {n} threads)", sec, idx)
        faiss.omp_set_num_threads(threads)
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(a.dim), a.dim, a.nlist, faiss.METRIC_INNER_PRODUCT)
        start = time.perf_counter()
        ivf.train(xb)
        ivf.add(xb)
        build = time.perf_counter() - start
        ivf.nprobe = a.nprobe
        sec, (_, idx) = timed(lambda: ivf.search(xq, a.k), a.repeats)
        record(f"faiss ivf{a.nlist} nprobe {a.nprobe} (cpu)", sec, idx)
        results[f"faiss ivf{a.nlist} nprobe {a.nprobe} (cpu)"]["build_seconds"] = round(build, 3)
        if faiss_has_gpu():
            gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(a.dim))
            gpu.add(xb)
            sec, (_, idx) = timed(lambda: gpu.search(xq, a.k), a.repeats)
            record("faiss flat (gpu)", sec, idx)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
