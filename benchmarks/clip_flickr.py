"""CLIP and LiT on Flickr8k-1k: held-out retrieval recall@K of three ways to get the image tower.

  scratch      CLIP, both towers trained from random init
  lit-simclr   LiT: the image backbone is a SimCLR encoder trained by the toolkit on the same 800 training
               images (captions unused), then locked; only the text tower and the projections learn
  lit-random   the same locked recipe with a random-init backbone (what the SSL tower is worth)

Each run reports recall@1/5/10 in both directions on the 200 held-out images (1,000 captions) before and
after training, wall-clock seconds, and writes one JSON with the commit, device and library versions.

  python benchmarks/clip_flickr.py                       # CPU-sized: tiny CNN at 32 px, 2-layer text tower
  python benchmarks/clip_flickr.py --device cuda --backbone resnet18 --size 64 --clip-epochs 100 --simclr-epochs 200
"""

import argparse
import json
import os
import time
from dataclasses import replace

import pytorch_lightning as pl
import torch

from ssl_toolkit.backbones import BackboneConfig, TextConfig
from ssl_toolkit.data import CaptionDataModule
from ssl_toolkit.eval import RetrievalCallback
from ssl_toolkit.methods import CLIP, OptimConfig, SimCLR
from ssl_toolkit.methods.clip import CLIP_VIEWS
from ssl_toolkit.views import ViewConfig

HERE = os.path.dirname(os.path.abspath(__file__))
MEAN, STD = (0.4585, 0.4496, 0.4116), (0.2503, 0.2440, 0.2590)  # Flickr8k-1k training images


def main() -> None:
    from throughput import environment

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(HERE, "..", "..", "shared", "datasets", "flickr8k-1k"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="tiny_cnn")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--simclr-epochs", type=int, default=30)
    p.add_argument("--clip-epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--out", default=os.path.join(HERE, "results", "clip-flickr8k-{device}.json"))
    a = p.parse_args()
    device = torch.device(a.device)
    env = environment(device)
    backbone = BackboneConfig(a.backbone, width=16, cifar_stem=a.backbone.startswith("resnet"))
    text = TextConfig(vocab_size=1024, context_length=32, width=64, layers=2, heads=2)
    data = lambda: CaptionDataModule(a.root, image_size=a.size, vocab_size=1024, context_length=32,  # noqa: E731
                                     batch_size=a.batch, resident=device.type == "cuda")
    trainer = lambda epochs, cbs=(): pl.Trainer(  # noqa: E731
        max_epochs=epochs, accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(cbs),
        precision="bf16-mixed" if device.type == "cuda" else "32")

    pl.seed_everything(0)
    start = time.perf_counter()
    simclr = SimCLR(backbone, proj_hidden_dim=512, proj_out_dim=128,
                    optim=OptimConfig("adamw", lr=3e-3, weight_decay=1e-4, warmup_epochs=1),
                    views=ViewConfig(crop_size=a.size, mean=MEAN, std=STD, scale=(0.2, 1.0)))
    tr = trainer(a.simclr_epochs)
    tr.fit(simclr, data())
    ckpt = os.path.join(HERE, "results", ".simclr-flickr8k.ckpt")
    tr.save_checkpoint(ckpt)
    simclr_seconds = time.perf_counter() - start

    views = replace(CLIP_VIEWS, crop_size=a.size, mean=MEAN, std=STD, scale=(0.6, 1.0), flip_p=0.5)
    optim = OptimConfig("adamw", lr=2e-3, betas=(0.9, 0.98), weight_decay=0.1, warmup_epochs=1)
    runs = {"scratch": {}, "lit-simclr": {"image_checkpoint": ckpt, "lock_image": True},
            "lit-random": {"lock_image": True}}
    results = {}
    for name, kw in runs.items():
        pl.seed_everything(0)
        model = CLIP(backbone, optim=optim, views=views, text=text, embed_dim=64, **kw)
        cb = RetrievalCallback(every_n_epochs=10_000)
        start = time.perf_counter()
        trainer(a.clip_epochs, [cb]).fit(model, data())
        results[name] = {"seconds": round(time.perf_counter() - start, 1), **cb.results}
        print(name, results[name])
    os.remove(ckpt)
    out = a.out.format(device=device.type)
    record = {**env, "config": {"backbone": a.backbone, "size": a.size, "simclr_epochs": a.simclr_epochs,
                                "clip_epochs": a.clip_epochs, "batch": a.batch, "text": text.__dict__,
                                "train_images": 800, "test_images": 200, "test_captions": 1000},
              "simclr_seconds": round(simclr_seconds, 1), "results": results}
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
