"""benchmarks/: report.py on the committed results and the record shapes the scripts write, the scripts' examples,
and step_audit.py's count of host reads in each recipe's step."""

import doctest
import glob
import importlib.util
import json
import os
import re
import sys

import pytest

from conftest import small_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark_script(name: str):
    """A script of benchmarks/ (not a package) imported as a module, and registered under its name: doctest finds a
    module's examples through ``sys.modules`` (another script may have imported an older copy there)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


report = benchmark_script("report")


def test_every_committed_result_of_a_reported_kind_gets_a_row_with_its_numbers():
    results = os.path.join(ROOT, "benchmarks", "results")
    text = report.report(report.load(results, None))
    kinds = ("throughput-", "time-to-accuracy-", "step-audit-", "lightly-reference-", "eval-precision-")
    names = [os.path.basename(p) for p in glob.glob(os.path.join(results, "*.json"))]
    assert [n for n in names if n.startswith(kinds) and f"`{n}`" not in text] == []
    simclr = json.load(open(os.path.join(results, "throughput-simclr-cuda.json")))
    row = next(line for line in text.splitlines() if "`throughput-simclr-cuda.json`" in line)
    full = simclr["results"]["full"]["images_per_s"]
    assert f"| {full:,.0f} | {simclr['full_over_ceiling']:.2f} |" in row
    gpu_only = report.report(report.load(results, "cuda"))
    assert "-cpu.json" not in gpu_only and "`throughput-simclr-cuda.json`" in gpu_only


def test_runs_cut_short_report_their_last_evaluation_and_finished_runs_their_final_one(tmp_path):
    env = {"commit": "0123456789abcdef", "uncommitted_changes": False, "device": "NVIDIA H100 80GB HBM3"}
    cut = {**env, "method": "simclr", "command": "time_to_accuracy.py", "finished": False,
           "overrides": {"compile": True}, "compile_cache": {"dir": "/tmp/x", "warm_at_start": False},
           "curve": [{"epoch": 0, "seconds": 3.0, "top1_k200": 37.1, "top1_k20": 40.0},
                     {"epoch": 170, "seconds": 410.2, "top1_k200": 80.5, "top1_k20": 81.9}]}
    done = {**cut, "finished": True, "epochs": 200, "wall_clock_s": 471.9, "eval_share": 0.012, "steady_ms_per_step": 19.8,
            "peak_memory_mb": 2764.8, "compile_cache": {"dir": "/tmp/y", "warm_at_start": True},
            "knn": {"trained": {"200": 84.25, "20": 85.0}}}
    audit = {**env, "method": "simclr", "window1_ms_per_step": 19.46, "device_busy_ms_per_step": 18.9,
             "device_busy_fraction": 0.971, "host_syncs_per_step": {"a.py:3 (f) <- b.py:9": 0.05}}
    for name, r in {"time-to-accuracy-simclr-cuda-cut.json": cut, "time-to-accuracy-simclr-cuda.json": done,
                    "step-audit-simclr-cuda.json": audit, "time-to-accuracy-simclr-cpu.json": done}.items():
        (tmp_path / name).write_text(json.dumps(r))
    text = report.report(report.load(str(tmp_path), "cuda"))
    rows = {line.split("`")[1]: line for line in text.splitlines() if "`" in line}
    assert set(rows) == {"time-to-accuracy-simclr-cuda-cut.json", "time-to-accuracy-simclr-cuda.json",
                         "step-audit-simclr-cuda.json"}
    assert "| cut | NVIDIA H100 80GB HBM3 | 170 (cut short) | 80.50 | 81.90 | 410.2 |  |" in \
        rows["time-to-accuracy-simclr-cuda-cut.json"]
    assert "| cold |" in rows["time-to-accuracy-simclr-cuda-cut.json"]
    assert "| 200 | 84.25 | 85.00 | 471.9 | 19.80 | 1.2 | 2.7 | warm |" in rows["time-to-accuracy-simclr-cuda.json"]
    assert "| 19.46 | 18.90 | 0.971 | 0.05 | a.py:3 (f) (0.05) | `step-audit-simclr-cuda.json` @ 0123456 |" in \
        rows["step-audit-simclr-cuda.json"]


def test_reference_runs_name_their_pieces_and_both_knn_results(tmp_path):
    env = {"commit": "0123456789abcdef", "uncommitted_changes": True, "device": "NVIDIA H100 80GB HBM3"}
    config = {"backbone": "lightly", "views": "lightly", "precision": "fp32", "epochs": 200}
    cut = {**env, "config": config, "finished": False, "knn_init": {"lightly_top1_k200": 31.2},
           "best_lightly_top1_k200": 70.5,
           "ms_per_step": 71.234, "peak_memory_mb": 5017.6,
           "curve": [{"epoch": 70, "seconds": 505.0, "lightly_top1_k200": 70.11, "top1_k200": 70.11, "top1_k20": 72.5}]}
    done = {**cut, "config": {**config, "views": "toolkit", "epochs": 30}, "finished": True,
            "best_lightly_top1_k200": 60.0,
            "curve": [{"epoch": 30, "seconds": 250.5, "lightly_top1_k200": 60.0, "top1_k200": 60.01, "top1_k20": 61.0}]}
    for name, r in {"lightly-reference-cuda-200ep.json": cut, "lightly-reference-cuda.json": done}.items():
        (tmp_path / name).write_text(json.dumps(r))
    text = report.report(report.load(str(tmp_path), "cuda"))
    rows = {line.split("`")[1]: line for line in text.splitlines() if "`" in line}
    assert rows["lightly-reference-cuda-200ep.json"].startswith(
        "| 200ep | NVIDIA H100 80GB HBM3 | lightly | lightly | fp32 | 70 of 200 | 31.20 | 70.11 | 70.50 | 70.11 | 72.50 "
        "| 505.0 "
        "| 71.23 | 4.9 | `lightly-reference-cuda-200ep.json` @ 0123456+ |")
    assert "|  | NVIDIA H100 80GB HBM3 | lightly | toolkit | fp32 | 30 | 31.20 | 60.00 | 60.00 | 60.01 | 61.00 |" in \
        rows["lightly-reference-cuda.json"]


def test_time_to_accuracy_examples():
    """time_to_accuracy.py's doctests (benchmarks/ is outside the doctest paths): the steady ms per step."""
    module = benchmark_script("time_to_accuracy")
    result = doctest.testmod(module)
    assert result.attempted >= 1 and result.failed == 0
    assert module.steady_ms_per_step([{"step": 0, "seconds": 5.0, "eval_s": 1.0}]) is None


def test_the_ceiling_is_timed_twice_and_the_report_shows_how_far_apart(tmp_path):
    """throughput.py's doctests (the faster of the two ceiling timings counts), and the drift column: empty for a
    record from before the second timing."""
    result = doctest.testmod(benchmark_script("throughput"))
    assert result.attempted >= 1 and result.failed == 0
    env = {"commit": "0123456789abcdef", "uncommitted_changes": False, "device": "NVIDIA H100 80GB HBM3",
           "config": {"method": "clip"}, "full_over_ceiling": 0.91}
    res = {"views": {"images_per_s": 1e6}, "full": {"images_per_s": 18000.0, "peak_memory_mb": 2048.0}}
    new = {**env, "results": {**res, "ceiling": {"images_per_s": 19780.2, "ms_per_step": 25.9, "drift": 0.034}}}
    old = {**env, "results": {**res, "ceiling": {"images_per_s": 19780.2, "ms_per_step": 25.9}}}
    for name, r in {"throughput-clip-cuda.json": new, "throughput-clip-cuda-old.json": old}.items():
        (tmp_path / name).write_text(json.dumps(r))
    rows = {line.split("`")[1]: line for line in report.report(report.load(str(tmp_path), "cuda")).splitlines()
            if "`" in line}
    assert "| 19,780 | 3% | 1,000,000 | 18,000 | 0.91 | 2.0 |" in rows["throughput-clip-cuda.json"]
    assert "| 19,780 |  | 1,000,000 | 18,000 | 0.91 | 2.0 |" in rows["throughput-clip-cuda-old.json"]


def test_step_audit_examples():
    """step_audit.py's doctests: the busy-time union and what HostReads counts."""
    result = doctest.testmod(benchmark_script("step_audit"))
    assert result.attempted >= 2 and result.failed == 0


# Reads in a step that are not waits for the GPU, or are left as they are, by the line that makes them (the innermost
# frame of step_audit.call_site), each with the reason.
READS_ALLOWED = {
    r"ssl_toolkit/methods/base\.py:\d+ \(__bool__\)":
        "methods.base.HostFlag: on a GPU the non-finite flag is copied to pinned memory behind its kernels and read "
        "after its event, without waiting for the work queued since",
    r"ssl_toolkit/methods/base\.py:\d+ \(scheduled\)":
        "BaseSSLModule.scheduled: per-step schedules (EMA momentum, DINO's teacher temperature) are CPU tensors",
    r"ssl_toolkit/methods/base\.py:\d+ \(<lambda>\)":
        "configure_optimizers: LambdaLR's learning-rate multiplier, from a CPU schedule tensor",
    r"kornia/color/(xyz|lab)\.py:\d+ \((rgb_to_xyz|_rgb_to_lab)\)":
        "left as it is: kornia's rgb_to_lab makes its two constant tensors with torch.tensor(..., device=) on each "
        "call, two blocking copies in each eager colorization step; the colorization recipe compiles its views",
}


@pytest.mark.parametrize("method", ["simclr", "moco", "dino", "cpc", "rotation", "jigsaw", "inpainting",
                                    "colorization"])
def test_recipe_steps_read_nothing_from_the_device_on_the_host(method, cifar_small, tmp_path, monkeypatch):
    """step_audit.py on the CPU, where it counts every read of a tensor's values on the host and every copy of host
    data to the device (``HostReads``): between logging steps, each CIFAR-10 recipe's whole step (views, forward,
    loss, backward, optimizer, schedules, callbacks) makes only those in ``READS_ALLOWED``. Any other (``.item()``,
    ``bool()`` of a tensor, a boolean mask, ``torch.tensor(..., device=)``) would make the host wait for the GPU
    every eager step. Until this test, each view policy made five a step (the colour-jitter bounds built with
    ``torch.tensor`` on the device), and kornia one more in MoCo's blur (the sigma check in ``gaussian_blur2d``)
    and in DINO's solarization (a float threshold copied to the device)."""
    step_audit = benchmark_script("step_audit")
    data = small_cifar(cifar_small, tmp_path / "c.npz", n_train=64, n_test=64)
    out = tmp_path / "audit.json"
    monkeypatch.setattr(sys, "argv", [
        "step_audit.py", "--recipe", os.path.join(ROOT, "recipes", method, "cifar10.yaml"),
        "--data", str(data), "--skip", "1", "--steps", "2", "--runs", str(tmp_path / "runs"),
        "--out", str(out), "--", "--trainer.accelerator", "cpu", "--model.init_args.backbone.name", "tiny_cnn",
        "--data.batch_size", "8"])  # 8 steps an epoch: the window (steps 3-5) holds no epoch end and no log step
    step_audit.main()
    record = json.loads(out.read_text())
    reads = record["host_reads_per_step"]
    assert record["host_syncs_per_step"] == {}  # CUDA only
    allowed = {site: next((p for p in READS_ALLOWED if re.fullmatch(p, site.split(" <- ")[0])), None) for site in reads}
    assert [site for site, pattern in allowed.items() if pattern is None] == []
    flag = [site for site, pattern in allowed.items() if pattern and "__bool__" in pattern]
    assert len(flag) == 1 and reads[flag[0]] == 1.0  # the finite flag, once a step
