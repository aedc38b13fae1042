"""Training throughput of each method: the model ceiling, the views alone, and the full training step.

Measures, on one device, images per second (each image makes the method's views: 2 for SimCLR and MoCo,
2 global + 6 local crops for DINO, a 7x7 grid of patches for CPC, one crop and one caption for CLIP,
4 rotations for RotNet, 9 tiles for Jigsaw, one masked crop for the context encoder) of
  (a) ceiling:  the method's forward/backward (backbone, heads, loss, EMA update) + optimizer step on pre-made views,
  (b) views:    the toolkit's GPU view policy alone (uint8 batch -> normalised views),
  (c) full:     (b) then (a), i.e. one training step from a uint8 batch already on the device,
timing (a) both first and last (the faster counts; both are kept, with their difference), and writes a JSON
result with the commit, device, library versions and peak memory.

  python benchmarks/throughput.py                       # SimCLR, resnet18 CIFAR stem, batch 512, bf16, channels_last
  python benchmarks/throughput.py --method moco         # MoCo v2, same setting
  python benchmarks/throughput.py --method clip         # CLIP: the recipe's text tower (4 layers, width 256, 32 tokens)
  python benchmarks/throughput.py --method all          # every method, one JSON each, and a summary table
  python benchmarks/throughput.py --peer-workers 2 16 --data data/cifar10/cifar10.npz
      # also (d) peer: torchvision CPU transforms in DataLoader workers feeding the same step (lightly's pipeline)
  python benchmarks/throughput.py --compile views       # torch.compile the view policy (also: model, both)
  python benchmarks/throughput.py --device cpu --batch 64 --steps 5 --warmup 2 --precision fp32   # CPU smoke run
"""

import argparse
import inspect
import sys
import json
import os
import platform
import subprocess
import time
from dataclasses import replace
from datetime import datetime, timezone

import torch

from ssl_toolkit.backbones import BackboneConfig, TextConfig
from ssl_toolkit.compile import compile_parts
from ssl_toolkit.methods import (CLIP, CPCV2, DINO, Colorization, Inpainting, Jigsaw, MoCoV2, OptimConfig,
                                 Rotation, SimCLR)
from ssl_toolkit.optim import make_optimizer
from ssl_toolkit.views import ViewConfig

METHODS = {"simclr": SimCLR, "moco": MoCoV2, "dino": DINO, "cpc": CPCV2, "clip": CLIP, "rotation": Rotation,
           "jigsaw": Jigsaw, "inpainting": Inpainting, "colorization": Colorization}
CLIP_TEXT = TextConfig(vocab_size=4096, context_length=32, width=256, layers=4, heads=4)  # recipes/clip/flickr8k.yaml


def captions(batch: int, text: TextConfig, device: torch.device) -> torch.Tensor:
    """Random caption tokens of 8-24 tokens (Flickr8k's range), padded with -1 to the context length."""
    tokens = torch.randint(3, text.vocab_size, (batch, text.context_length), device=device)
    lengths = torch.randint(8, 25, (batch, 1), device=device)
    return tokens.masked_fill(torch.arange(text.context_length, device=device) >= lengths, -1)  # (B, L)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def add_cifar_argument(p: argparse.ArgumentParser) -> None:
    """``--data``: the CIFAR-10 .npz; a missing file stops the parse with the command that makes it."""
    def existing(path: str) -> str:
        if not os.path.isfile(path):
            raise argparse.ArgumentTypeError(f"{path} not found; run: python ../shared/datasets/cifar10/unpack.py "
                                             f"data/cifar10")
        return path

    p.add_argument("--data", default="data/cifar10/cifar10.npz", type=existing,
                   help="CIFAR-10 .npz from ../shared/datasets/cifar10/unpack.py")


def environment(device: torch.device) -> dict:
    """What a result file records of where it was measured: commit, device and library versions."""
    from ssl_toolkit.cli import versions

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":!benchmarks/results"], capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):  # a copy without .git (a GPU machine): the caller names it
        commit, dirty = os.environ.get("BENCH_COMMIT", "unknown"), None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"commit": commit, "uncommitted_changes": dirty, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": name,
            **versions(), "cpu_count": os.cpu_count()}


def write_record(record: dict, out: str) -> None:
    """A result record as indented JSON at ``out``, its folder made if needed."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)


class PeerViews(torch.utils.data.Dataset):
    """Two SimCLR views per image made by torchvision transforms on PIL images in DataLoader workers: the
    pipeline of lightly and solo-learn's CPU path (RandomResizedCrop, flip, ColorJitter p=0.8, grayscale p=0.2)."""

    def __init__(self, images, views: ViewConfig):
        import torchvision.transforms as T

        self.images = images  # (N, H, W, 3) uint8 numpy
        c = views
        self.transform = T.Compose([
            T.RandomResizedCrop(c.crop_size, scale=c.scale, ratio=c.ratio), T.RandomHorizontalFlip(c.flip_p),
            T.RandomApply([T.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue)], p=c.jitter_p),
            T.RandomGrayscale(c.gray_p), T.ToTensor(), T.Normalize(c.mean, c.std)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return self.transform(img), self.transform(img)


def peer_images(path: str | None, size: int, n: int = 50000):
    """CIFAR-10 training images as (N, H, W, 3) uint8 from an .npz (``x_train``), or random pixels."""
    import numpy as np

    if path:
        from ssl_toolkit.data import NpzDataModule

        dm = NpzDataModule(path)
        dm.setup()
        return dm.splits.x_train.permute(0, 2, 3, 1).contiguous().numpy()
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def measure_peer(train_step, views: ViewConfig, images, batch: int, workers: int, steps: int, device: torch.device,
                 channels_last: bool) -> dict:
    """Images/s of ``train_step`` fed by torchvision transforms in ``workers`` DataLoader processes."""
    from ssl_toolkit.views import Views

    loader = torch.utils.data.DataLoader(PeerViews(images, views), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=True, prefetch_factor=4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    it = iter(loader)

    def step():
        v1, v2 = next(it)
        crops = [v.to(device, non_blocking=True).contiguous(memory_format=fmt) for v in (v1, v2)]
        train_step(Views(crops=crops))

    warmup = workers + 2  # the workers' first batches arrive together: take that burst before timing
    sec = timed(step, steps, warmup, device)
    it = loader = None  # drop the iterator: its workers shut down before the next measurement
    return {"images_per_s": round(batch / sec, 1), "ms_per_step": round(1000 * sec, 3), "workers": workers}


def build(method: str, a, device: torch.device):
    cls = METHODS[method]
    views: ViewConfig = inspect.signature(cls).parameters["views"].default  # the method's own augmentations
    extra = {"text": CLIP_TEXT, "embed_dim": 256} if method == "clip" else {}
    if method == "colorization":  # no DataModule to count colours in; the weight lookup costs the same either way
        extra = {"rebalance_mix": 1.0}
    if method == "moco":  # the CIFAR-10 recipe's shuffle-BN on one device
        extra = {"bn_splits": 8}
    crop = a.size - a.size % 3 if method == "jigsaw" else a.size  # a jigsaw crop divides into 3x3 cells
    model = cls(BackboneConfig(a.backbone, cifar_stem=not a.no_cifar_stem), views=replace(views, crop_size=crop),
                channels_last=not a.no_channels_last, **extra).to(device)
    model.setup("fit")
    optim = OptimConfig("lars", lr=0.3, weight_decay=1e-6) if a.optim == "lars" else \
        OptimConfig("sgd", lr=0.06, weight_decay=5e-4)
    opt = make_optimizer(model, optim, fused=False if a.no_fused else None)  # as configure_optimizers builds it
    parts = [p for p in a.compile.split(",") if p]
    if "online" in parts:  # A/B only: the backbone alone, its EMA copies eager (what Compile did before compile_parts)
        model.backbone.compile()
    parts = [{"model": "backbone"}.get(p, p) for p in parts if p != "online"]
    if parts:
        compile_parts(model, parts)  # as the Compile callback does
    return model, opt, replace(views, crop_size=crop)


def best_ceiling(first: dict, again: dict) -> dict:
    """The faster of the ceiling's two timings (before the views and full step, and after them), with both step
    times and their relative difference (``drift``) kept.

    Example:
        >>> best_ceiling({"images_per_s": 100.0, "ms_per_step": 10.0, "peak_memory_mb": None},
        ...              {"images_per_s": 125.0, "ms_per_step": 8.0, "peak_memory_mb": None})
        {'images_per_s': 125.0, 'ms_per_step': 8.0, 'peak_memory_mb': None, 'runs_ms_per_step': [10.0, 8.0], 'drift': 0.25}
    """
    best = min(first, again, key=lambda r: r["ms_per_step"])
    runs = [first["ms_per_step"], again["ms_per_step"]]
    return {**best, "runs_ms_per_step": runs, "drift": round(max(runs) / min(runs) - 1, 3)}


def measure(method: str, a, device: torch.device, peer_data=None) -> dict:
    torch.manual_seed(0)
    model, opt, views = build(method, a, device)
    images = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8, device=device)
    tokens = captions(a.batch, CLIP_TEXT, device) if method == "clip" else None

    def make_views():
        views = model.view_policy(images)
        views.tokens = tokens  # CLIP's captions come with the batch, as from CaptionDataModule
        return views

    premade = make_views()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def train_step(views):
        with amp:
            loss = model.sum_losses(model.step(views))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_targets(0.99)  # no-op for methods without a target network

    results = {}
    # The ceiling is timed again last (A, B, C, A): a step-time drift between the first and last timing (clocks,
    # a late recompile, the allocator) would otherwise land in the ratio. The faster of the two is the ceiling.
    for name, fn in (("ceiling", lambda: train_step(premade)), ("views", make_views),
                     ("full", lambda: train_step(make_views())), ("ceiling_again", lambda: train_step(premade))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = timed(fn, a.steps, a.warmup, device)
        results[name] = {"images_per_s": round(a.batch / sec, 1), "ms_per_step": round(1000 * sec, 3),
                         "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                         if device.type == "cuda" else None}
        print(f"{method:12s} {name:13s} {results[name]['images_per_s']:>10.1f} images/s  "
              f"{results[name]['ms_per_step']:>9.2f} ms/step", flush=True)
    results["ceiling"] = best_ceiling(results.pop("ceiling"), results.pop("ceiling_again"))
    if results["ceiling"]["drift"] > 0.05:
        print(f"{method:12s} warning: the two ceiling timings differ by {100 * results['ceiling']['drift']:.0f}%",
              flush=True)
    if peer_data is not None:
        for w in a.peer_workers:
            r = measure_peer(train_step, views, peer_data, a.batch, w, a.peer_steps, device, not a.no_channels_last)
            results[f"peer_{w}_workers"] = r
            print(f"{method:12s} peer {w:>2d}w  {r['images_per_s']:>10.1f} images/s  {r['ms_per_step']:>9.2f} ms/step",
                  flush=True)
    if a.profile:  # where the full step's device time goes: the top kernels and ops
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(5):
                train_step(make_views())
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)
    ratio = results["full"]["images_per_s"] / results["ceiling"]["images_per_s"]
    print(f"{method:12s} full / ceiling = {ratio:.3f}", flush=True)
    if ratio > 1.02:  # the full step does the ceiling's work and more: its timing or the ceiling's was not steady
        print(f"{method:12s} warning: the full step timed faster than the ceiling; rerun with more --steps", flush=True)
    return {"config": {"method": method, "backbone": a.backbone, "cifar_stem": not a.no_cifar_stem,
                       "batch": a.batch, "size": a.size, "precision": a.precision,
                       "channels_last": not a.no_channels_last, "optimizer": a.optim,
                       "fused": bool(opt.defaults.get("fused")), "compile": a.compile,
                       "steps": a.steps, "warmup": a.warmup,
                       "views_per_image": sum(len(c) for c in premade.crops) // a.batch},
            "results": results, "full_over_ceiling": round(ratio, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="simclr", choices=sorted(METHODS) + ["all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--no-cifar-stem", action="store_true")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--size", type=int, default=32, help="image and crop side")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--optim", default="sgd", choices=["sgd", "lars"])
    p.add_argument("--no-fused", action="store_true", help="SGD's multi-tensor (foreach) step instead of the fused one")
    p.add_argument("--compile", default="", help="torch.compile parts: views, model (the backbone and its EMA copies) or views,model; "
                                                    "online: the backbone without its EMA copies (A/B)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--peer-workers", type=int, nargs="*", default=[], help="also feed the step from torchvision "
                   "transforms in this many DataLoader workers (SimCLR views), e.g. 2 16")
    p.add_argument("--peer-steps", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="print the top ops of 5 full steps (torch.profiler)")
    p.add_argument("--data", help="CIFAR-10 .npz for the peer pipeline (default: random pixels)")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/throughput-<method>-<device>[-<tag>].json)")
    p.add_argument("--tag", default="", help="suffix of the default JSON name")
    a = p.parse_args()
    device = torch.device(a.device)
    env = environment(device)  # before measuring: the commit and tree state of the code that runs
    torch.backends.cudnn.benchmark = True
    methods = sorted(METHODS) if a.method == "all" else [a.method]
    peer = peer_images(a.data, a.size) if a.peer_workers else None
    summary = {}
    for method in methods:
        record = {**env, "command": " ".join(sys.argv), **measure(method, a, device, peer if method == "simclr" else None)}
        tag = f"-{a.tag}" if a.tag else ""
        out = a.out or os.path.join(os.path.dirname(__file__), "results", f"throughput-{method}-{device.type}{tag}.json")
        write_record(record, out)
        print(f"wrote {out}", flush=True)
        summary[method] = record
    if len(methods) > 1:
        print(f"{'method':12s} {'ceiling':>9s} {'full':>9s} {'ratio':>6s} {'peak MB':>8s}")
        for m, r in summary.items():
            res = r["results"]
            print(f"{m:12s} {res['ceiling']['images_per_s']:>9.0f} {res['full']['images_per_s']:>9.0f} "
                  f"{r['full_over_ceiling']:>6.3f} {res['full']['peak_memory_mb'] or 0:>8.0f}")


if __name__ == "__main__":
    main()
