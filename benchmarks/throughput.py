"""Training throughput of each method: the model ceiling, the views alone, and the full training step.

Measures, on one device, images per second (each image makes the method's views: 2 for SimCLR and MoCo,
2 global + 6 local crops for DINO, a 7x7 grid of patches for CPC, one crop and one caption for CLIP,
4 rotations for RotNet, 9 tiles for Jigsaw, one masked crop for the context encoder) of
  (a) ceiling:  the method's forward/backward (backbone, heads, loss, EMA update) + optimizer step on pre-made views,
  (b) views:    the toolkit's GPU view policy alone (uint8 batch -> normalised views),
  (c) full:     (b) then (a), i.e. one training step from a uint8 batch already on the device,
and writes a JSON result with the commit, device, library versions and peak memory.

  python benchmarks/throughput.py                       # SimCLR, resnet18 CIFAR stem, batch 512, bf16, channels_last
  python benchmarks/throughput.py --method moco         # MoCo v2, same setting
  python benchmarks/throughput.py --method clip         # CLIP: the recipe's text tower (4 layers, width 256, 32 tokens)
  python benchmarks/throughput.py --device cpu --batch 64 --steps 5 --warmup 2 --precision fp32   # CPU smoke run
"""

import argparse
import inspect
import json
import os
import platform
import subprocess
import time
from dataclasses import replace
from datetime import datetime, timezone

import torch

from ssl_toolkit.backbones import BackboneConfig, TextConfig
from ssl_toolkit.methods import CLIP, CPCV2, DINO, Colorization, Inpainting, Jigsaw, MoCoV2, Rotation, SimCLR
from ssl_toolkit.optim import param_groups
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


def environment(device: torch.device) -> dict:
    import kornia
    import pytorch_lightning

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":!benchmarks/results"], capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    from ssl_toolkit.eval.knn import faiss

    return {"commit": commit, "uncommitted_changes": dirty, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": name,
            "python": platform.python_version(), "torch": torch.__version__, "kornia": kornia.__version__,
            "pytorch_lightning": pytorch_lightning.__version__, "cuda": torch.version.cuda,
            "faiss": getattr(faiss, "__version__", None), "cpu_count": os.cpu_count()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="simclr", choices=sorted(METHODS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--no-cifar-stem", action="store_true")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--size", type=int, default=32, help="image and crop side")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/throughput-<device>.json)")
    a = p.parse_args()
    device = torch.device(a.device)
    env = environment(device)  # before measuring: the commit and tree state of the code that runs
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)

    cls = METHODS[a.method]
    views: ViewConfig = inspect.signature(cls).parameters["views"].default  # the method's own augmentations
    extra = {"text": CLIP_TEXT, "embed_dim": 256} if a.method == "clip" else {}
    if a.method == "colorization":  # no DataModule to count colours in; the weight lookup costs the same either way
        extra = {"rebalance_mix": 1.0}
    crop = a.size - a.size % 3 if a.method == "jigsaw" else a.size  # a jigsaw crop divides into 3x3 cells
    model = cls(BackboneConfig(a.backbone, cifar_stem=not a.no_cifar_stem), views=replace(views, crop_size=crop),
                channels_last=not a.no_channels_last, **extra).to(device)
    model.setup("fit")
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.06, momentum=0.9)
    images = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8, device=device)
    tokens = captions(a.batch, CLIP_TEXT, device) if a.method == "clip" else None

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
    for name, fn in (("ceiling", lambda: train_step(premade)), ("views", make_views),
                     ("full", lambda: train_step(make_views()))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = timed(fn, a.steps, a.warmup, device)
        results[name] = {"images_per_s": round(a.batch / sec, 1), "ms_per_step": round(1000 * sec, 3),
                         "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                         if device.type == "cuda" else None}
        print(f"{name:8s} {results[name]['images_per_s']:>10.1f} images/s  {results[name]['ms_per_step']:>9.2f} ms/step")
    ratio = results["full"]["images_per_s"] / results["ceiling"]["images_per_s"]
    print(f"full / ceiling = {ratio:.3f}")
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"throughput-{a.method}-{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    record = {**env, "config": {"method": a.method, "backbone": a.backbone, "cifar_stem": not a.no_cifar_stem,
                                                 "batch": a.batch, "size": a.size, "precision": a.precision,
                                                 "channels_last": not a.no_channels_last, "steps": a.steps,
                                                 "warmup": a.warmup,
                                                 "views_per_image": sum(len(c) for c in premade.crops) // a.batch},
              "results": results, "full_over_ceiling": round(ratio, 3)}
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
