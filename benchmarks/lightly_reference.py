"""The reference run itself: lightly's SimCLR CIFAR-10 benchmark model, built from lightly's package, trained on this
repository's CIFAR-10 copy.

The 84% kNN target of the README comes from the table in lightly's ``cifar10_benchmark.py`` (March 2023: SimCLR,
batch 512, 200 epochs, 84.8%, RTX A6000). Our CIFAR-10 went through JPEG q75 and our model differs from theirs in
known ways, so this script rebuilds their run from lightly's public API (``pip install lightly``; a benchmark-only
package, not a toolkit dependency), with nothing of the toolkit in the training path unless asked:

  backbone   ``ResNetGenerator("resnet-18")``'s children without the classifier, then AdaptiveAvgPool2d: lightly's
             CIFAR ResNet with PyTorch's default initialisation (kaiming-uniform, a = sqrt(5): the convolutions after
             the stem start 6x (3x3, stride 1) or 3x (down-sampling) smaller in square norm than torchvision's
             fan-out kaiming-normal, so under batch norm their effective learning rate starts 3-6x higher) and, as that
             ResNet applies its stem ReLU in ``forward``, no ReLU between the stem's batch norm and layer1
  head       ``SimCLRProjectionHead(512, 512, 128, batch_norm=False)``: Linear-ReLU-Linear with biases, the head it
             had in March 2023 (lightly PR 1150, April 2023, kept batch norm out of it)
  loss       ``NTXentLoss()``: temperature 0.5
  views      ``SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)`` on PIL images in DataLoader
             workers (ImageNet normalisation); each view its own forward pass, so its own batch-norm statistics
  optimizer  SGD, lr 0.06 x batch / 128, momentum 0.9, weight decay 5e-4 on every parameter; CosineAnnealingLR
             over the epochs, stepped once per epoch; fp32 (cudnn's default TF32 convolutions)
  kNN        the backbone's normalised features of the un-augmented images, k=200, T=0.1, lightly's
             ``knn_predict``; the toolkit's ``knn_sweep`` on the same features is recorded beside it (k=200, 20)

One piece can be swapped for the toolkit's to attribute a difference: ``--backbone toolkit`` (torchvision resnet18
with the CIFAR stem, its initialisation, a stem ReLU), ``--views toolkit`` (``ContrastiveViews`` on the device from
the resident uint8 images, same augmentations and ImageNet normalisation), ``--precision bf16`` (autocast).

  python benchmarks/lightly_reference.py --epochs 30 --knn-every 10                # the reference, 30 epochs
  python benchmarks/lightly_reference.py --epochs 30 --views toolkit --tag gpu-views
  python benchmarks/lightly_reference.py --epochs 200 --max-seconds 540 --state /tmp/ref.pt   # then again: resumes
  python benchmarks/lightly_reference.py --train-images 512 --test-images 256 --batch 64 --epochs 2 \\
      --knn-every 1 --workers 1 --tag rehearsal                                      # CPU rehearsal, ~2 min

``--max-seconds`` stops at the first epoch end past it and saves the model, optimizer, scheduler and curve to
``--state``; the next call with the same ``--state`` goes on from there (the data order and augmentations are
freshly drawn, so a resumed run is statistically, not bitwise, the one run). Writes
``benchmarks/results/lightly-reference-<device>[-<tag>].json`` after every evaluation: the curve (epoch, step,
seconds, top-1 by lightly's kNN and the toolkit's), the best top-1 of lightly's kNN so far (lightly's table
reports each run's best epoch), the random-init baseline, ms per training step, peak GPU memory,
``finished``, the commit, device and library versions (lightly's too).
"""

import argparse
import json
import os
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))
from throughput import add_cifar_argument, environment, sync  # noqa: E402  (same commit/device/versions record)

from ssl_toolkit.backbones import Encoder, build_backbone  # noqa: E402
from ssl_toolkit.data import NpzDataModule  # noqa: E402
from ssl_toolkit.eval.knn import knn_sweep  # noqa: E402
from ssl_toolkit.views import ContrastiveViews, ViewConfig  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # lightly's IMAGENET_NORMALIZE
RUN_SETTINGS = ("data", "backbone", "views", "precision", "epochs", "batch", "train_images", "test_images", "seed")


def lightly_or_exit():
    try:
        import lightly
    except ImportError:
        raise SystemExit("lightly_reference.py trains lightly's own model: pip install lightly (a benchmark-only "
                         "package; on the GPU machine its wheel travels in .whl/, see benchmarks/device_bundle.sh).")
    return lightly


def build_model(backbone: str) -> tuple[nn.Module, nn.Module]:
    """(backbone mapping images to (B, 512) features, lightly's SimCLR v1 projection head)."""
    from lightly.models import ResNetGenerator
    from lightly.models.modules.heads import SimCLRProjectionHead

    if backbone == "lightly":
        resnet = ResNetGenerator("resnet-18")
        net = nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten())
    else:
        net, _ = build_backbone("resnet18", cifar_stem=True)
    return net, SimCLRProjectionHead(512, 512, 128, batch_norm=False)


class LightlyViews(torch.utils.data.Dataset):
    """Two ``SimCLRTransform`` views of a PIL image per item, with its label."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from lightly.transforms import SimCLRTransform

        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3) uint8 for PIL
        self.labels = labels
        self.transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def toolkit_batches(images: torch.Tensor, batch: int, views: ContrastiveViews):
    """One epoch of (view 1, view 2) from the resident uint8 images: shuffled, whole batches only."""
    order = torch.randperm(len(images), device=images.device)
    for i in range(len(images) // batch):
        yield views(images[order[i * batch:(i + 1) * batch]]).crops


@torch.no_grad()
def features(net: nn.Module, images: torch.Tensor, device: torch.device, autocast) -> torch.Tensor:
    """Normalised backbone features of un-augmented uint8 images (ToTensor + ImageNet Normalize), eval mode.

    Not ``eval.features.extract_features``: that runs bf16 autocast on CUDA, and lightly evaluates in the run's
    precision (fp32 here unless ``--precision bf16``).
    """
    encoder = Encoder(net, IMAGENET_MEAN, IMAGENET_STD).to(device)
    net.eval()
    out = []
    for chunk in images.split(1024):
        with autocast():
            out.append(F.normalize(encoder(chunk.to(device, non_blocking=True)).float(), dim=1))
    net.train()
    return torch.cat(out)


@torch.no_grad()
def evaluate(net: nn.Module, splits, device: torch.device, autocast) -> dict[str, float]:
    """kNN top-1 (%) on the test split: lightly's ``knn_predict`` at k=200, T=0.1, and the toolkit's at k=200, 20."""
    from lightly.utils.benchmarking import knn_predict

    bank, queries = features(net, splits.x_train, device, autocast), features(net, splits.x_test, device, autocast)
    y_bank, y_test = splits.y_train.to(device), splits.y_test.to(device)
    classes = len(splits.classes)
    k = min(200, len(bank))  # a rehearsal's bank under 200 images: all of it (as knn_sweep), still named k200
    hits = sum((knn_predict(q, bank.T, y_bank, classes, knn_k=k, knn_t=0.1)[:, 0] == y).sum().item()
               for q, y in zip(queries.split(512), y_test.split(512)))
    ours = knn_sweep(bank, y_bank, queries, y_test, classes, ks=(k, 20), temperatures=(0.1,), backend="torch")[0.1]
    return {"lightly_top1_k200": round(100.0 * hits / len(y_test), 2),
            "top1_k200": round(ours[k], 2), "top1_k20": round(ours[min(20, k)], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cifar_argument(p)
    p.add_argument("--backbone", choices=["lightly", "toolkit"], default="lightly")
    p.add_argument("--views", choices=["lightly", "toolkit"], default="lightly")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--knn-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="lightly views' DataLoader workers")
    p.add_argument("--train-images", type=int, default=0, help="first N training images (0: all)")
    p.add_argument("--test-images", type=int, default=0, help="first N test images (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, help="stop at the first epoch end past this and save --state")
    p.add_argument("--state", help="checkpoint to resume from when it exists, and to save to when stopped")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/lightly-reference-<device>[-<tag>].json)")
    p.add_argument("--tag", default="")
    p.add_argument("--note", default="")
    a = p.parse_args()
    lightly = lightly_or_exit()
    if a.max_seconds and not a.state:
        raise SystemExit("--max-seconds saves the run to resume it: give --state PATH too.")
    from lightly.loss import NTXentLoss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # fixed shapes: the fastest convolution algorithms (speed only)
    torch.manual_seed(a.seed)
    start = time.perf_counter()
    data = NpzDataModule(a.data, a.batch)
    data.setup()
    splits = data.splits
    if a.train_images or a.test_images:
        tr, te = a.train_images or len(splits.y_train), a.test_images or len(splits.y_test)
        splits = type(splits)(splits.x_train[:tr], splits.y_train[:tr], splits.x_test[:te], splits.y_test[:te],
                              splits.classes)
    if len(splits.y_train) < a.batch:
        raise SystemExit(f"--batch {a.batch} is larger than the {len(splits.y_train)} training images.")
    if device.type == "cuda":  # resident, as the recipes: the evaluation (and the toolkit views) read it there
        splits = type(splits)(splits.x_train.to(device), splits.y_train, splits.x_test.to(device), splits.y_test,
                              splits.classes)
    net, head = build_model(a.backbone)
    model = nn.Sequential(net, head).to(device)
    criterion = NTXentLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06 * a.batch / 128, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, a.epochs)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=a.precision == "bf16")  # noqa: E731
    if a.views == "lightly":
        loader = torch.utils.data.DataLoader(
            LightlyViews(splits.x_train.cpu(), splits.y_train), batch_size=a.batch, shuffle=True, drop_last=True,
            num_workers=a.workers, persistent_workers=a.workers > 0, pin_memory=device.type == "cuda")
        epoch_batches = lambda: (views for views, _ in loader)  # noqa: E731
    else:
        policy = ContrastiveViews(ViewConfig(crop_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)).to(device)
        epoch_batches = lambda: toolkit_batches(splits.x_train, a.batch, policy)  # noqa: E731

    tag = f"-{a.tag}" if a.tag else ""
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"lightly-reference-{device.type}{tag}.json")
    record = {**environment(device), "lightly": lightly.__version__, "command": " ".join(sys.argv),
              "config": vars(a), "note": a.note, "method": "simclr", "epochs": a.epochs, "finished": False}
    first_epoch, step, seconds_before = 0, 0, 0.0
    settings = {k: getattr(a, k) for k in RUN_SETTINGS}  # what a saved run must match to be resumed
    if a.state and os.path.isfile(a.state):
        state = torch.load(a.state, map_location=device, weights_only=False)
        if state["config"] != settings:
            raise SystemExit(f"{a.state} is a run with other settings ({state['config']}); remove it or match them.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first_epoch, step, seconds_before = state["epoch"], state["step"], state["seconds"]
        record.update(state["record"], resumed_at_epochs=state["record"].get("resumed_at_epochs", []) + [first_epoch])
        print(f"resumed {a.state} at epoch {first_epoch}", flush=True)
    else:
        record["knn_init"] = evaluate(net, splits, device, autocast)
        record["curve"] = []
        print(f"random init: {record['knn_init']}", flush=True)

    def save(path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=2)

    clock = lambda: seconds_before + time.perf_counter() - start  # noqa: E731
    train_seconds = record.get("train_seconds", 0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for epoch in range(first_epoch, a.epochs):
        sync(device)
        epoch_start = time.perf_counter()
        for x0, x1 in epoch_batches():
            x0, x1 = x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)
            with autocast():
                loss = criterion(model(x0), model(x1))  # each view its own batch, as lightly's training_step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        scheduler.step()
        sync(device)
        train_seconds += time.perf_counter() - epoch_start
        done = epoch + 1
        if done % a.knn_every == 0 or done == a.epochs:
            eval_start = time.perf_counter()
            knn = evaluate(net, splits, device, autocast)
            point = {"epoch": done, "step": step, "seconds": round(clock(), 1),
                     "eval_s": round(time.perf_counter() - eval_start, 2), "loss": round(loss.item(), 4), **knn}
            record["curve"].append(point)
            record["best_lightly_top1_k200"] = max(c["lightly_top1_k200"] for c in record["curve"])  # lightly's table
            record.update(train_seconds=round(train_seconds, 1), ms_per_step=round(1e3 * train_seconds / step, 2),
                          peak_memory_mb=round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                          if device.type == "cuda" else None)
            save(out)
            print(f"epoch {done}: {knn} ({point['seconds']:.0f} s)", flush=True)
        if done < a.epochs and a.max_seconds and clock() - seconds_before > a.max_seconds:
            record["train_seconds"] = round(train_seconds, 1)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": done, "step": step, "seconds": clock(),
                        "record": record, "config": settings}, a.state)
            save(out)
            print(f"stopped after epoch {done} ({clock():.0f} s in all); run again with --state {a.state} to go on")
            return
    last = record["curve"][-1]
    record.update(finished=True, wall_clock_s=round(clock(), 1),
                  knn={"trained": {"200": last["top1_k200"], "20": last["top1_k20"]},
                       "lightly_trained_k200": last["lightly_top1_k200"]})
    save(out)
    if a.state and os.path.isfile(a.state):
        os.remove(a.state)  # finished: a later call with the same --state starts a new run
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
