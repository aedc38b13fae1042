"""What evaluating in bf16 costs: one checkpoint's kNN top-1 with its features extracted in fp32 and in bf16.

The evaluators run the model in bf16 autocast on CUDA (``ssl_toolkit.eval.features.evaluating``), so every GPU kNN
figure so far, the time-to-accuracy curves included, came from bf16 features. This extracts the train and test
features of a checkpoint's encoder in each precision (``eval_precision``; autocast works on the CPU too), reports
their relative difference and the kNN top-1 of each (k=20 and 200, T=0.1 as lightly reports and 0.07), and writes
a JSON result with the commit, device and library versions.

  python benchmarks/eval_precision.py --ckpt RUN.ckpt                  # the checkpoint's own dataset
  python benchmarks/eval_precision.py --ckpt RUN.ckpt --data data/cifar10/cifar10.npz
  python benchmarks/eval_precision.py --latest /tmp/ssl-toolkit-bench  # the newest last.ckpt under a runs folder
"""

import argparse
import glob
import json
import os
import time

import torch

from ssl_toolkit.checkpoint import encoder_from_checkpoint, load_checkpoint
from ssl_toolkit.cli import checkpoint_info, resolve_data
from ssl_toolkit.eval import extract_features, knn_sweep
from ssl_toolkit.eval.features import eval_precision
from throughput import environment

KS, TEMPERATURES = (20, 200), (0.1, 0.07)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="checkpoint written by `ssl-toolkit pretrain`")
    which.add_argument("--latest", metavar="RUNS", help="use the newest last.ckpt under this runs folder")
    p.add_argument("--data", help="as `ssl-toolkit knn --data` (default: the checkpoint's dataset)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/eval-precision-<device>[-<tag>].json)")
    p.add_argument("--tag", help="suffix of the default JSON name")
    a = p.parse_args()
    path = a.ckpt
    if a.latest:
        found = glob.glob(os.path.join(a.latest, "**", "last.ckpt"), recursive=True)
        if not found:
            raise SystemExit(f"no last.ckpt under {a.latest}; train a recipe first (gpu_session.sh simclr, say)")
        path = max(found, key=os.path.getmtime)
    device = torch.device(a.device)
    ckpt = load_checkpoint(path)
    encoder = encoder_from_checkpoint(ckpt)
    dm = resolve_data(a.data, ckpt)
    record = {**environment(device), **checkpoint_info(path, ckpt, dm)}
    feats = {}
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        with eval_precision(precision):
            train = extract_features(encoder, dm, "train", device, a.batch_size)
            test = extract_features(encoder, dm, "test", device, a.batch_size)
        seconds = time.perf_counter() - start
        sweep = knn_sweep(train[0], train[1], test[0], test[1], dm.num_classes, KS, TEMPERATURES, "torch")
        feats[precision] = (train[0], test[0])
        record[precision] = {"extract_s": round(seconds, 3),
                             "top1": {str(t): {str(k): v for k, v in row.items()} for t, row in sweep.items()}}
        print(f"{precision}: kNN top-1 " + ", ".join(f"T={t:g} k={k}: {v:.2f}%" for t, row in sweep.items()
                                                       for k, v in row.items()) + f" (extraction {seconds:.1f} s)")
    difference = {}
    for i, split in enumerate(("train", "test")):
        f32, b16 = (torch.nn.functional.normalize(feats[p][i].float(), dim=1) for p in ("fp32", "bf16"))
        cos = (f32 * b16).sum(1)
        difference[split] = {"median_cosine_fp32_bf16": round(cos.median().item(), 6),
                             "min_cosine_fp32_bf16": round(cos.min().item(), 6)}
    record["feature_difference"] = difference
    record["top1_change_bf16_minus_fp32"] = {
        t: {k: round(record["bf16"]["top1"][t][k] - v, 3) for k, v in row.items()}
        for t, row in record["fp32"]["top1"].items()}
    print(f"bf16 - fp32 top-1 (points): {record['top1_change_bf16_minus_fp32']}; features: {difference}")
    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                f"eval-precision-{device.type}{'-' + a.tag if a.tag else ''}.json")
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
