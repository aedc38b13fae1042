"""What bf16 similarities cost the contrastive losses, in gradient error and in time.

Under bf16 autocast torch runs every matmul in bf16, whatever the dtype of its inputs. Before commit 25fb281 the
similarity products of NT-Xent, MoCo's InfoNCE and CLIP ran that way although the losses upcast their embeddings;
they now go through ``losses.ntxent.similarities`` (autocast off, fp32). This script computes each loss and its
gradient three ways on the same embeddings: fp32 without autocast (the reference), under bf16 autocast as the
losses now run, and under bf16 autocast with ``similarities`` swapped for the plain matmul they used before. It
reports the loss, the relative error and cosine of the gradients against the reference, and the median time of
forward + backward of each autocast arm.

Embeddings are synthetic: ``z2 = z1 + noise * N(0, 1)`` (noise 0.3, 1.0, 3.0: mean positive cosine ~0.96, ~0.7,
~0.3, the last like CLIP's; at logit scale 100 the easier pairs give a zero loss and no gradient), queue rows
uniform on the sphere. On a CPU the bf16 arm is the slow one (no bf16 matrix units): only GPU timings say what
the fp32 products cost.

  python benchmarks/loss_precision.py                  # CPU
  python benchmarks/loss_precision.py --device cuda    # on a GPU (bf16 autocast on CUDA)

Writes ``benchmarks/results/loss-precision-<device>.json`` with the commit, device and versions.
"""

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from throughput import environment, sync  # noqa: E402

from ssl_toolkit.losses import clip, infonce, ntxent  # noqa: E402


@contextmanager
def autocast_matmul_similarities():
    """The losses as they were before 25fb281: ``a.float() @ b.float().T``, which autocast runs in bf16."""
    modules = (ntxent, infonce, clip)
    saved = [m.similarities for m in modules]
    for m in modules:
        m.similarities = lambda a, b: a.float() @ b.float().T
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            m.similarities = f


def cases(dim: int, queue: int, device: torch.device):
    bank = F.normalize(torch.randn(queue, dim, device=device), dim=1)
    return {
        "ntxent T=0.5": lambda a, b: ntxent.nt_xent(a, b, 0.5)["ntxent_loss"],
        "ntxent T=0.1": lambda a, b: ntxent.nt_xent(a, b, 0.1)["ntxent_loss"],
        f"infonce T=0.2 queue {queue}": lambda a, b: infonce.info_nce(a, b.detach(), bank, 0.2)["infonce_loss"],
        "clip scale 14.3": lambda a, b: clip.clip_loss(a, b, torch.tensor(14.3, device=device))["clip_loss"],
        "clip scale 100": lambda a, b: clip.clip_loss(a, b, torch.tensor(100.0, device=device))["clip_loss"],
    }


def run(loss, z1, z2, autocast: bool, repeats: int):
    times = []
    for _ in range(repeats):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        sync(z1.device)
        t0 = time.perf_counter()
        with torch.autocast(z1.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = loss(a, b)
        out.backward()
        sync(z1.device)
        times.append((time.perf_counter() - t0) * 1e3)
    grad = torch.cat([g.flatten() for g in (a.grad, b.grad) if g is not None])  # MoCo: no gradient to the keys
    return out.item(), grad, statistics.median(times[1:] if repeats > 1 else times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queue", type=int, default=4096, help="MoCo negatives (the CIFAR-10 recipe's queue_size)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/loss-precision-<device type>.json)")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    rows = []
    for noise in (0.3, 1.0, 3.0):
        z1 = torch.randn(a.batch, a.dim, device=device)
        z2 = z1 + noise * torch.randn_like(z1)
        for name, loss in cases(a.dim, a.queue, device).items():
            ref_loss, ref_grad, _ = run(loss, z1, z2, autocast=False, repeats=1)
            if ref_loss < 1e-3:  # every pair already far ahead of its negatives: no gradient worth comparing
                print(f"{name:28s} noise {noise}: loss {ref_loss:.1e}, saturated; left out")
                continue
            row = {"loss": name, "noise": noise, "loss_fp32": ref_loss,
                   "positive_cosine": F.cosine_similarity(z1, z2, dim=1).mean().item()}
            for arm, losses_as in (("fp32_similarities", nullcontext), ("bf16_similarities", autocast_matmul_similarities)):
                with losses_as():
                    value, grad, ms = run(loss, z1, z2, autocast=True, repeats=a.repeats)
                rel = ((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30)).item()
                row[arm] = {"loss": value, "grad_rel_error": rel,
                            "grad_cosine": F.cosine_similarity(grad, ref_grad, dim=0).item(), "ms_fwd_bwd": ms}
            rows.append(row)
            print(f"{name:28s} noise {noise}: loss {ref_loss:.5f}; grad rel. error fp32 sims "
                  f"{row['fp32_similarities']['grad_rel_error']:.2e}, bf16 sims {row['bf16_similarities']['grad_rel_error']:.2e}"
                  f" (cosine {row['bf16_similarities']['grad_cosine']:.6f}); ms {row['fp32_similarities']['ms_fwd_bwd']:.3f}"
                  f" vs {row['bf16_similarities']['ms_fwd_bwd']:.3f}")
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"loss-precision-{device.type}.json")
    with open(out, "w") as f:
        json.dump({**environment(device), "command": " ".join(["benchmarks/loss_precision.py", *sys.argv[1:]]),
                   "config": vars(a), "rows": rows}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
