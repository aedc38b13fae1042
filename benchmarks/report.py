"""The committed benchmark results as Markdown tables, straight from the JSON files.

  python benchmarks/report.py                 # every result in benchmarks/results/
  python benchmarks/report.py --device cuda   # only the GPU runs (file names ending in -cuda or -cuda-<tag>)

Tables: throughput (images/s of (a) the backbone-only ceiling and how far its two timings, before and after the
others, differ; (b) the views alone, (c) the full step, the ratio (c)/(a), peak memory), the peer pipeline against the toolkit's step, time to accuracy (kNN top-1, wall-clock,
training ms per step after the compile, evaluation share, peak memory, whether the compile started cold), lightly's
own benchmark model trained on our data (``lightly_reference.py``) and the step audits (ms per step, the GPU's busy
fraction, host syncs per step). Each row names its file and the commit it was measured at (``<commit>+``: the tree
had uncommitted changes, which the record's note should name), so a README table pasted from here says where every
number comes from. ``gpu_session.sh`` prints the tables of each stage's new GPU results after the stage.
"""

import argparse
import glob
import json
import os
import re

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def load(results: str, device: str | None, newer_than: float | None = None) -> dict[str, dict]:
    """``{file name: record}`` of the JSON results; only ``device``'s (cpu / cuda) when given, and only files
    modified after ``newer_than`` (a time stamp) when given."""
    out = {}
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        name = os.path.basename(path)
        if device and not re.search(rf"-{device}(-|\.json$)", name):
            continue
        if newer_than is not None and os.path.getmtime(path) <= newer_than:
            continue
        with open(path) as f:
            out[name] = json.load(f)
    return out


def variant(name: str, kind: str, method: str) -> str:
    """The tag of a file name ``<kind>-<method>-<device>[-<tag>].json`` ('' without one)."""
    m = re.fullmatch(rf"{kind}-{method}-(cpu|cuda)(-(?P<tag>.+))?\.json", name)
    return (m.group("tag") or "") if m else name


def fmt(x, digits: int | None = None) -> str:
    """``x`` with thousands separators; by default no decimals from 100 up, one below (CPU images/s)."""
    if x is None:
        return ""
    if digits is None:
        digits = 0 if abs(x) >= 100 else 1
    return f"{x:,.{digits}f}"


def gib(mb: float | None) -> str:
    """Peak memory recorded in MiB (``torch.cuda.max_memory_allocated() / 2**20``) as GiB; '' when not recorded."""
    return f"{mb / 1024:.1f}" if mb else ""


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def source(name: str, r: dict) -> str:
    dirty = "+" if r.get("uncommitted_changes") else ""
    return f"`{name}` @ {r.get('commit', '?')[:7]}{dirty}"


def throughput_rows(records: dict[str, dict]) -> tuple[list[list[str]], list[list[str]]]:
    rows, peers = [], []
    for name, r in records.items():
        if not name.startswith("throughput-"):
            continue
        res, method = r["results"], r["config"]["method"]
        memory = max((v.get("peak_memory_mb") or 0) for v in res.values())
        drift = res["ceiling"].get("drift")  # records from before the ceiling was timed twice have none
        rows.append([method, variant(name, "throughput", method) or "eager", r["device"],
                     fmt(res["ceiling"]["images_per_s"]), "" if drift is None else f"{100 * drift:.0f}%",
                     fmt(res["views"]["images_per_s"]), fmt(res["full"]["images_per_s"]), fmt(r["full_over_ceiling"], 2),
                     gib(memory), source(name, r)])
        for key, v in res.items():
            if m := re.fullmatch(r"peer_(\d+)_workers", key):
                peers.append([method, m.group(1), r["device"], fmt(v["images_per_s"]), fmt(res["full"]["images_per_s"]),
                              fmt(res["full"]["images_per_s"] / v["images_per_s"], 1) + "x", source(name, r)])
    return rows, peers


def accuracy(r: dict) -> tuple[dict, bool, float | None, int | None]:
    """(final kNN top-1 per k, finished, seconds, epochs) of a time-to-accuracy record.

    Finished runs report the kNN callback's last result and the whole wall-clock; a run cut short (``finished``
    false, or an older record rebuilt from its TensorBoard log) reports its curve's last point.
    """
    finished = r.get("finished", "wall_clock_s" in r)
    if finished:
        trained = r.get("knn", {}).get("trained", {})
        return {int(k): v for k, v in trained.items()}, True, r.get("wall_clock_s"), r.get("epochs")
    curve = r.get("curve") or []
    if not curve:
        return {}, False, None, None
    last = curve[-1]
    seconds = last.get("seconds", last.get("seconds_after_init_eval"))
    knn = {int(k[len("top1_k"):]): v for k, v in last.items() if k.startswith("top1_k")}
    return knn, False, seconds, last.get("epoch")


def time_to_accuracy_rows(records: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, r in records.items():
        if not name.startswith("time-to-accuracy-"):
            continue
        knn, finished, seconds, epochs = accuracy(r)
        cache = r.get("compile_cache")
        compiled = r.get("overrides", {}).get("compile", "--no-compile" not in r.get("command", ""))
        start = "eager" if not compiled else "unknown" if cache is None else "warm" if cache["warm_at_start"] else "cold"
        rows.append([r["method"], variant(name, "time-to-accuracy", r["method"]), r["device"],
                     " ".join(x for x in ("" if epochs is None else str(epochs), "" if finished else "(cut short)") if x),
                     fmt(knn.get(200), 2), fmt(knn.get(20), 2), fmt(seconds, 1),
                     fmt(r.get("steady_ms_per_step", r.get("median_ms_per_step_50_step_windows")), 2),
                     fmt(r.get("eval_share") and 100 * r["eval_share"], 1), gib(r.get("peak_memory_mb")), start,
                     source(name, r)])
    return rows


def audit_rows(records: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, r in records.items():
        if not name.startswith("step-audit-"):
            continue
        syncs = r.get("host_syncs_per_step") or {}
        top = max(syncs.items(), key=lambda kv: kv[1], default=("", 0))
        rows.append([r["method"], variant(name, "step-audit", r["method"]) or "compiled", r["device"],
                     fmt(r["window1_ms_per_step"], 2), fmt(r.get("device_busy_ms_per_step"), 2),
                     fmt(r.get("device_busy_fraction"), 3), fmt(sum(syncs.values()), 2),
                     f"{top[0].split(' <- ')[0]} ({top[1]:g})" if syncs else "", source(name, r)])
    return rows


def reference_rows(records: dict[str, dict]) -> list[list[str]]:
    """lightly_reference.py runs: which pieces were lightly's, and the kNN top-1 of lightly's and the toolkit's kNN."""
    rows = []
    for name, r in records.items():
        if not name.startswith("lightly-reference-"):
            continue
        c, curve = r["config"], r.get("curve") or [{}]
        last = curve[-1]
        epochs = f"{last.get('epoch', 0)} of {c['epochs']}" if not r.get("finished") else str(c["epochs"])
        rows.append([variant(name, "lightly", "reference"), r["device"], c["backbone"], c["views"], c["precision"],
                     epochs, fmt((r.get("knn_init") or {}).get("lightly_top1_k200"), 2),
                     fmt(last.get("lightly_top1_k200"), 2), fmt(r.get("best_lightly_top1_k200"), 2),
                     fmt(last.get("top1_k200"), 2), fmt(last.get("top1_k20"), 2),
                     fmt(last.get("seconds"), 1), fmt(r.get("ms_per_step"), 2), gib(r.get("peak_memory_mb")),
                     source(name, r)])
    return rows


def precision_rows(records: dict[str, dict]) -> list[list[str]]:
    """eval_precision.py runs: one checkpoint's kNN top-1 (T = 0.1) with fp32 and with bf16 features."""
    rows = []
    for name, r in records.items():
        if not name.startswith("eval-precision-"):
            continue
        f32, b16 = r["fp32"]["top1"]["0.1"], r["bf16"]["top1"]["0.1"]
        rows.append([r["method"].rsplit(".", 1)[-1], r["backbone"], r["dataset"], r["device"],
                     *(fmt(x[k], 2) for k in ("200", "20") for x in (f32, b16)),
                     f"{r['feature_difference']['test']['median_cosine_fp32_bf16']:.6f}", source(name, r)])
    return rows


def report(records: dict[str, dict]) -> str:
    parts = []
    rows, peers = throughput_rows(records)
    if rows:
        parts.append("### Throughput\n\n" + table(
            ["method", "variant", "device", "(a) ceiling img/s", "(a) first vs last", "(b) views img/s",
             "(c) full step img/s", "(c)/(a)", "peak GiB", "source"], rows))
    if peers:
        parts.append("### Peer pipeline (torchvision transforms in DataLoader workers, same step)\n\n" + table(
            ["method", "workers", "device", "peer img/s", "toolkit full step img/s", "toolkit / peer", "source"], peers))
    rows = time_to_accuracy_rows(records)
    if rows:
        parts.append("### Time to accuracy (kNN top-1 %, T = 0.1)\n\n" + table(
            ["method", "variant", "device", "epochs", "k=200", "k=20", "seconds", "ms/step", "eval %", "peak GiB", "compile",
             "source"], rows))
    rows = reference_rows(records)
    if rows:
        parts.append("### lightly's SimCLR benchmark model on our CIFAR-10 (kNN top-1 %, T = 0.1)\n\n" + table(
            ["variant", "device", "backbone", "views", "precision", "epochs", "random init k=200", "k=200 (lightly's kNN)",
             "best so far (lightly's kNN)", "k=200", "k=20", "seconds", "ms/step", "peak GiB", "source"], rows))
    rows = audit_rows(records)
    if rows:
        parts.append("### Step audit\n\n" + table(
            ["method", "variant", "device", "ms/step", "GPU busy ms/step", "busy fraction", "host syncs/step",
             "most syncs at", "source"], rows))
    rows = precision_rows(records)
    if rows:
        parts.append("### Evaluation precision (kNN top-1 %, T = 0.1, features extracted in fp32 and in bf16)\n\n" + table(
            ["method", "backbone", "dataset", "device", "k=200 fp32", "k=200 bf16", "k=20 fp32", "k=20 bf16",
             "median cosine fp32 vs bf16 (test)", "source"], rows))
    return "\n\n".join(parts) + "\n" if parts else "no results\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--device", choices=["cpu", "cuda"], help="only this device's files")
    p.add_argument("--newer", metavar="FILE", help="only results written after FILE was (gpu_session.sh: this stage's)")
    a = p.parse_args()
    print(report(load(a.results, a.device, os.path.getmtime(a.newer) if a.newer else None)), end="")


if __name__ == "__main__":
    main()
