"""Accuracy parity of the views: one SimCLR model trained on the toolkit's views and on torchvision's.

Two arms, each a Lightning run with the same model, initial weights (seed), optimizer, schedule and steps:
  toolkit:      uint8 batches, views made by ``ContrastiveViews`` on the training device (the recipes' path);
  torchvision:  views made by torchvision transforms on PIL images in DataLoader workers (``PeerViews`` of
                throughput.py: lightly's and solo-learn's CPU pipeline), with the same ``ViewConfig``.
After training, the backbone's weighted kNN top-1 on the test split (k=200 and 20, T=0.1, lightly's protocol)
against the training images. Speed is not the point here (throughput.py measures it); a difference in accuracy
beyond the seeds' spread would mean the GPU views are not the augmentations they claim to be.

  python benchmarks/view_parity.py --data data/cifar10/cifar10.npz --epochs 30          # GPU: resnet18, all images
  python benchmarks/view_parity.py --backbone tiny_cnn --width 32 --train-images 10000 --batch 256 --epochs 15 \\
      --workers 1 --seeds 0 1                                                          # 2 CPU cores, ~1 h

The optimizer defaults to lightly's CIFAR-10 benchmark (SGD, lr 0.06 x batch / 128, momentum 0.9, weight decay
5e-4, cosine without warmup, projection 512-512-128, NT-Xent T=0.5). Writes
``benchmarks/results/view-parity-<device>[-<tag>].json`` (per seed and arm: kNN at random init and trained,
training seconds; the mean difference between the arms), with the commit, device and library versions.
"""

import argparse
import json
import os
import statistics
import sys
import time

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(__file__))
from throughput import PeerViews, add_cifar_argument, environment  # noqa: E402

from ssl_toolkit.backbones import BackboneConfig  # noqa: E402
from ssl_toolkit.data import NpzDataModule  # noqa: E402
from ssl_toolkit.data.base import Splits  # noqa: E402
from ssl_toolkit.eval import KNNCallback  # noqa: E402
from ssl_toolkit.methods import SimCLR  # noqa: E402
from ssl_toolkit.methods.base import OptimConfig  # noqa: E402
from ssl_toolkit.views import ViewConfig, Views  # noqa: E402

ARMS = ("toolkit", "torchvision")


class SubsetNpz(NpzDataModule):
    """The first ``train_images`` / ``test_images`` of each split (0: all of it)."""

    def __init__(self, path: str, batch_size: int, resident: bool, train_images: int = 0, test_images: int = 0):
        super().__init__(path, batch_size, resident=resident)
        self.train_images, self.test_images = train_images, test_images

    def load(self) -> Splits:
        s = super().load()
        tr, te = self.train_images or len(s.y_train), self.test_images or len(s.y_test)
        return Splits(s.x_train[:tr], s.y_train[:tr], s.x_test[:te], s.y_test[:te], s.classes)


class TorchvisionViewsData(SubsetNpz):
    """Training batches of two torchvision-made views per image (and the labels); evaluation as the toolkit's."""

    def __init__(self, *args, views: ViewConfig, workers: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.views, self.workers = views, workers

    def train_dataloader(self):
        self.setup()
        images = self.splits.x_train.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3) for PIL
        data = _WithLabels(PeerViews(images, self.views), self.splits.y_train)
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                           num_workers=self.workers, persistent_workers=self.workers > 0,
                                           pin_memory=torch.cuda.is_available())


class _WithLabels(torch.utils.data.Dataset):
    def __init__(self, views: PeerViews, labels: torch.Tensor):
        self.views, self.labels = views, labels

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int):
        return self.views[i], self.labels[i]


class SimCLRPremadeViews(SimCLR):
    """SimCLR whose training batches arrive as views already made (torchvision arm): no view policy is applied."""

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            (v1, v2), labels = batch
            return Views(crops=[v1, v2]), labels
        return batch


def run_arm(arm: str, seed: int, a, device: torch.device, views: ViewConfig) -> dict:
    pl.seed_everything(seed, workers=True)
    cls = SimCLR if arm == "toolkit" else SimCLRPremadeViews
    lr = a.lr if a.lr else 0.06 * a.batch / 128
    model = cls(BackboneConfig(a.backbone, cifar_stem=not a.no_cifar_stem, width=a.width),
                optim=OptimConfig("sgd", lr=lr, weight_decay=a.weight_decay, warmup_epochs=0,
                                  decay_norm_and_bias=a.decay_norm_and_bias),
                views=views, temperature=0.5, proj_hidden_dim=a.proj_hidden, proj_out_dim=128,
                channels_last=device.type == "cuda")
    common = dict(batch_size=a.batch, resident=device.type == "cuda", train_images=a.train_images,
                  test_images=a.test_images)
    data = (SubsetNpz(a.data, **common) if arm == "toolkit"
            else TorchvisionViewsData(a.data, views=views, workers=a.workers, **common))
    knn = KNNCallback(every_n_epochs=a.epochs, k=[200, 20], temperature=0.1)
    trainer = pl.Trainer(accelerator=device.type, devices=1, max_epochs=a.epochs,
                         precision="bf16-mixed" if device.type == "cuda" else "32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[knn], benchmark=device.type == "cuda", num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    result = {"arm": arm, "seed": seed, "steps": trainer.global_step, "seconds": round(seconds, 1),
              "knn_init": {str(k): v for k, v in knn.results["init"].items()},
              "knn_trained": {str(k): v for k, v in knn.results["trained"].items()}}
    print(f"{arm:12s} seed {seed}: kNN k=200 {result['knn_init']['200']:.2f}% -> {result['knn_trained']['200']:.2f}%, "
          f"k=20 {result['knn_init']['20']:.2f}% -> {result['knn_trained']['20']:.2f}% ({seconds:.0f} s)", flush=True)
    return result


def summarize(runs: list[dict]) -> dict:
    """Per arm the mean kNN top-1; the toolkit-minus-torchvision difference per seed and its mean."""
    out, seeds = {}, sorted({r["seed"] for r in runs})
    for k in ("200", "20"):
        top1 = {(r["arm"], r["seed"]): r["knn_trained"][k] for r in runs}
        diffs = [top1["toolkit", s] - top1["torchvision", s] for s in seeds]
        out[f"k{k}"] = {**{f"{arm}_mean": round(statistics.mean(top1[arm, s] for s in seeds), 2) for arm in ARMS},
                        "toolkit_minus_torchvision": [round(d, 2) for d in diffs],
                        "mean_difference": round(statistics.mean(diffs), 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cifar_argument(p)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=int, default=32, help="tiny_cnn width")
    p.add_argument("--no-cifar-stem", action="store_true")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, help="default: 0.06 x batch / 128 (lightly)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--decay-norm-and-bias", action="store_true", help="decay every parameter, as lightly does")
    p.add_argument("--proj-hidden", type=int, default=512)
    p.add_argument("--train-images", type=int, default=0, help="first N training images (0: all)")
    p.add_argument("--test-images", type=int, default=0, help="first N test images (0: all)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="torchvision arm's workers")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/view-parity-<device>[-<tag>].json)")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    views = ViewConfig(crop_size=32)  # SimCLR's CIFAR-10 augmentations (the recipe's), no blur
    tag = f"-{a.tag}" if a.tag else ""
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"view-parity-{device.type}{tag}.json")
    record = {**environment(device), "command": " ".join(sys.argv), "config": vars(a), "views": vars(views),
              "runs": []}
    for seed in a.seeds:
        for arm in a.arms:
            record["runs"].append(run_arm(arm, seed, a, device, views))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:  # after every run: a run cut short keeps what finished
                json.dump(record, f, indent=2)
    if set(a.arms) == set(ARMS):
        record["summary"] = summarize(record["runs"])
        print(json.dumps(record["summary"], indent=2))
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
