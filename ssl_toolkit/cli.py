"""The ``ssl-toolkit`` command: ``pretrain`` (LightningCLI) and the commands that evaluate, export, embed and search
with its checkpoints.

Every command but ``pretrain`` (whose parser is made from the classes) imports Lightning, Kornia and the methods only
after parsing its flags, so that its ``--help`` and a wrong flag answer in about 2 s rather than 7 on 2 CPU cores;
a test holds each command to it. ``embed``, ``index``, ``search`` and ``map`` do not import them at all (nor
TorchDynamo): with a tiny_cnn checkpoint, ``index`` takes about 2.5 s rather than 6.5-9 and ``search`` 3.5 rather
than 6.5; a test holds them to it too."""

import argparse
import contextlib
import contextvars
import datetime
import functools
import glob
import importlib
import itertools
import json
import logging
import math
import os
import re
import shlex
import sys
import time
import warnings

import torch

from ssl_toolkit.errors import CheckpointError, ConfigError, NonFiniteLossError, RunStopped

USAGE = """usage: ssl-toolkit COMMAND [options]

commands:
  pretrain   train an encoder from a recipe:  ssl-toolkit pretrain --config recipes/quickstart.yaml
  knn        weighted kNN top-1 of a checkpoint's encoder (several --k/--temperature: a sweep):  ssl-toolkit knn --ckpt RUN.ckpt
  probe      linear-probe top-1 of a checkpoint's encoder:  ssl-toolkit probe --ckpt RUN.ckpt
  retrieval  image<->text recall@K of a CLIP checkpoint:  ssl-toolkit retrieval --ckpt CLIP.ckpt
  zeroshot   zero-shot classification of a CLIP checkpoint:  ssl-toolkit zeroshot --ckpt CLIP.ckpt --data DATA
  pictures   PNGs of a checkpoint's views (and inpainting):  ssl-toolkit pictures --ckpt RUN.ckpt --out pictures/
  export     the backbone for use without the toolkit:  ssl-toolkit export --ckpt RUN.ckpt --format onnx
  embed      embeddings of a folder of images:  ssl-toolkit embed --ckpt RUN.ckpt --images DIR --out emb/
  index      a FAISS index of embeddings (+ retrieval metrics):  ssl-toolkit index --embeddings emb/ [--type ivf]
  search     nearest images of a query image or (CLIP) a caption:  ssl-toolkit search --index emb/index.faiss --query IMG
  map        2-D map of embeddings (PNG) and TensorBoard projector:  ssl-toolkit map --embeddings emb/

Run `ssl-toolkit COMMAND --help` for the options of each command; `ssl-toolkit --version` for the versions
(ssl-toolkit and the libraries it runs on) to put in a bug report.
"""


def versions() -> dict:
    """The versions of ssl-toolkit, Python and the libraries it runs on: what a bug report or a benchmark result
    needs to be reproduced (``faiss_gpu``: whether the installed faiss is a GPU build)."""
    import platform

    from ssl_toolkit import __version__
    from ssl_toolkit.eval.knn import faiss

    return {"ssl_toolkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "torchvision": _version("torchvision", "torchvision"),
            "pytorch_lightning": _version("pytorch_lightning", "pytorch-lightning"),
            "kornia": _version("kornia", "kornia"),
            "faiss": getattr(faiss, "__version__", None), "faiss_gpu": hasattr(faiss, "StandardGpuResources")}


def _version(module: str, distribution: str) -> str | None:
    """A library's version: the loaded module's own (a benchmark reports what it ran), else that of the installed
    distribution, as pip lists it. Importing Lightning, torchvision and kornia for it took 5 of ``--version``'s 7 s
    on 2 CPU cores."""
    import importlib.metadata

    if module in sys.modules:
        return getattr(sys.modules[module], "__version__", None)
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def print_versions() -> None:
    v = versions()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"ssl-toolkit {v['ssl_toolkit']}\n"
          f"python {v['python']}\n"
          f"torch {v['torch']} (CUDA {v['cuda'] or 'none: a CPU build'}; {gpus} GPU(s) visible)\n"
          f"torchvision {v['torchvision']}\n"
          f"pytorch-lightning {v['pytorch_lightning']}\n"
          f"kornia {v['kornia']}\n"
          f"faiss {v['faiss'] or 'not installed'}" + (" (GPU build)" if v["faiss_gpu"] else " (CPU build)"
                                                      if v["faiss"] else ""))


def concise_config_error(message: str) -> str:
    """Keep the reasons of a jsonargparse error, dropping the union-type noise around them, and for a misspelt
    key or class name add the accepted ones it is close to."""
    noise = ("Does not validate against any of the Union subtypes", "Subtypes: [", "Expected a <class 'NoneType'>",
             "Given value type:", "Given value:", "Errors:", "Subclass types expect one of", "a class path (str)",
             "a dict with class_path entry", "a dict without class_path", "a dict with parameters accepted")
    if "Problem with given class_path" in message:  # the reason is given; these only restate the option's type
        noise += ("Not a valid subclass of",)  # and its other forms (trainer.logger: a bool)
        message = "\n".join(line for line in message.splitlines()  # but not the reason: a setting's wrong type
                             if "Expected a <class" not in line or ". Got value: " in line)
    elif re.search(r"Given value type: <class '(str|int|float|bool)'>", message):  # a plain value's type: what was
        message = message.replace("Given value: ", "Given: ")  # given (not a class's settings: a long Namespace)
    keep = [_type_reason(line.strip()) for line in message.splitlines()
            if line.strip() and not any(n in line for n in noise)]
    # once each: a class-typed option that is also a list of them (trainer.logger) gives each reason twice
    keep = list(dict.fromkeys(line.lstrip("- ") for line in keep)) + _did_you_mean(message)
    return "\n  ".join(keep) + "\nRun `ssl-toolkit pretrain --help` for every option, or add --print_config to see the " \
                                "resolved config."


def _name_broken_config(message: str, args: list[str]) -> str:
    """A YAML syntax error of a ``--config`` file with the file's name where jsonargparse says ``"<unicode string>"``."""
    if "<unicode string>" not in message:
        return message
    import yaml

    configs = [b for a, b in zip(args, args[1:]) if a == "--config"] + [
        a.removeprefix("--config=") for a in args if a.startswith("--config=")]
    for path in configs:
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError:
            return message.replace("<unicode string>", path)
        except OSError:  # not there: jsonargparse's own error says so
            pass
    return message


_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string",
          "tuple": "a list, [a, b]", "list": "a list, [a, b]", "Iterable": "a list, [a, b]",
          "dict": "a mapping, {key: value}"}


def _type_reason(line: str) -> str:
    """jsonargparse's ``Expected a <class 'float'>. Got value: abc`` as ``Expected a number; got abc``, and its
    ``Expected a dot import path string: abc`` (a class-typed option, trainer.logger) as a class path."""
    m = re.fullmatch(r"(- )?Expected a <class '(?:[\w.]+\.)?(\w+)'>(?:\. Got value: (.*))?", line)
    if m and m[2] in _KINDS:
        return f"{m[1] or ''}Expected {_KINDS[m[2]]}" + (f"; got {m[3]}" if m[3] is not None else "")
    m = re.fullmatch(r"(- )?Expected a dot import path string: (.*)", line)
    if m:
        return f"{m[1] or ''}Expected a class path (package.module.Class); got {m[2]}"
    return line


def _accepted(owner) -> dict:
    """Option name -> annotation of a class's ``__init__`` (or a dataclass's fields)."""
    import dataclasses
    import inspect
    import typing

    if dataclasses.is_dataclass(owner):
        return {f.name: f.type for f in dataclasses.fields(owner)}
    try:
        hints = typing.get_type_hints(owner.__init__)
    except Exception:  # annotations that do not resolve: the names alone
        hints = {}
    return {n: hints.get(n) for n, p in inspect.signature(owner.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _not_none(kind):
    """The type inside ``Optional[...]`` (the first of a union's other members), or ``kind`` itself."""
    import typing

    return next((a for a in typing.get_args(kind) if a is not type(None)), kind)


def _did_you_mean(message: str) -> list[str]:
    """``Did you mean ...?`` for the unknown key or class name of a jsonargparse error, when a close one exists."""
    import difflib

    from ssl_toolkit.checkpoint import import_class

    classes = re.findall(r"class_path '([\w.]+)'", message)
    unknown = (re.search(r"Group '([\w.]+)' does not accept option '(\w+)'", message)
               or re.search(r"Option '([\w.]+)' is not accepted", message)
               or re.search(r"unrecognized arguments: --([\w.]+)", message)
               or re.search(r"ambiguous option: --([\w.]+) could match", message))
    missing = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", message)
    path = []
    try:
        if missing:
            module = importlib.import_module(missing.group(1))
            options, word = [n for n in dir(module) if n[:1].isupper()], missing.group(2)
        elif unknown:
            *group, word = path = ".".join(g for g in unknown.groups() if g).split(".")
            if classes:
                owner = import_class(classes[-1])
            elif group[:1] == ["trainer"]:
                from pytorch_lightning import Trainer as owner
                group = group[1:]
            else:  # a top-level key of the recipe
                options = {"trainer", "model", "data", "seed_everything", "ckpt_path", "config", "print_config"}
                owner, word = None, (group or [word])[0]
            if owner is not None:
                options = _accepted(owner)
                for g in group:  # nested settings (optim.lr, views.crop_size): into the annotated dataclass
                    kind = _not_none(options.get(g))
                    if g not in options or not isinstance(kind, type):
                        return _method_setting(path, classes)
                    options = _accepted(kind)
        else:
            return []
        close = difflib.get_close_matches(word, list(options), n=3)
        return [f"Did you mean {' or '.join(repr(c) for c in close)}?"] if close else _method_setting(path, classes)
    except Exception:  # a suggestion is a convenience; the error itself stands without it
        return []


def _method_setting(path: list[str], classes: list[str]) -> list[str]:
    """Where a method's nested setting goes when it was given at another level (``--lr``, ``--optim.lr``,
    ``--model.lr``: ``--model.optim.lr``), and that the optimizer is one of them (``--optim``, ``--scheduler``)."""
    import dataclasses

    from ssl_toolkit.checkpoint import import_class
    from ssl_toolkit.methods.base import BaseSSLModule

    method = import_class(classes[0]) if classes else BaseSSLModule
    if not (isinstance(method, type) and issubclass(method, BaseSSLModule)):
        return []
    homes: dict[str, list[str]] = {}  # field -> the method's settings that have it: lr -> [optim.lr]
    for option, kind in _accepted(method).items():
        kind = _not_none(kind)
        if dataclasses.is_dataclass(kind):
            for field in _accepted(kind):
                homes.setdefault(field, []).append(f"--model.{option}.{field}")
    for part in reversed(path):
        if part in homes:
            return [f"Did you mean {' or '.join(homes[part])}? (In a recipe: under model.init_args.)"]
    if {"optim", "optimizer", "lr_scheduler", "scheduler"} & set(path):
        return [_OPTIM_HOME]
    return []


_OPTIM_HOME = ("The optimizer and its learning-rate schedule (warmup, then cosine decay) are the method's settings: "
               "--model.optim.name (sgd, lars or adamw), --model.optim.lr, --model.optim.weight_decay, "
               "--model.optim.warmup_epochs, --model.optim.min_lr, ... (model.init_args.optim in a recipe).")


def _expand_paths(config) -> None:
    """``~`` and ``$VARIABLES`` in the run's paths (:func:`ssl_toolkit.paths.expand`): ``--ckpt_path``,
    ``trainer.default_root_dir``, the loggers' ``save_dir`` and the callbacks' ``dirpath``. Lightning's
    TensorBoardLogger expands its own for the logs, but ModelCheckpoint did not for the checkpoints: with
    ``save_dir: ~/runs`` (or ``$SCRATCH/runs``) they went to a folder named '~' (or '$SCRATCH') under the working
    directory, and the path the run printed at its end was not where they were."""
    from ssl_toolkit.paths import expand

    def at(args, key: str) -> None:
        value = args.get(key) if args is not None and hasattr(args, "get") else None
        if isinstance(value, str) and "://" not in value:
            args[key] = expand(value)

    at(config, "ckpt_path")
    trainer = config.get("trainer")
    at(trainer, "default_root_dir")
    for key, arg in (("logger", "save_dir"), ("callbacks", "dirpath")):
        given = (trainer or {}).get(key)
        for item in given if isinstance(given, list) else [given]:
            at(getattr(item, "init_args", None), arg)


def _tensorboard_runs(config) -> tuple | None:
    """The TensorBoard logger's init_args and the folder its ``version_N`` run folders go in,
    ``<save_dir>/<name>``; None when the run has no TensorBoard logger."""
    logger = (config.get("trainer") or {}).get("logger")
    if not str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger"):
        return None
    args = logger.init_args
    return args, os.path.join(args.get("save_dir") or ".", args.get("name") or "")


def _log_to_resumed_run(config) -> None:
    """Point the TensorBoard logger of a run resumed from a checkpoint of ``<save_dir>/<name>/version_N`` (one in
    its ``checkpoints/`` folder, or a SLURM requeue checkpoint, which records its run folder) at that
    ``version_N``: one run in TensorBoard whose steps go on, and its checkpoints (``last.ckpt`` included) go on in
    the folder it resumed from, so a chain of jobs resumes from one path. A logger given its own version, another
    folder or a checkpoint from elsewhere are left as they are."""
    path, tensorboard = config.get("ckpt_path"), _tensorboard_runs(config)
    if not path or "://" in path or tensorboard is None:
        return
    args, runs = tensorboard
    run = _run_of(path)
    if run is None:
        from ssl_toolkit.checkpoint import load_checkpoint

        run = load_checkpoint(path)["ssl_toolkit"].get("run_folder")
    if run is None or args.get("version") is not None or not _same_folder(runs, os.path.dirname(run)):
        return
    name = os.path.basename(run)
    args.version = int(name.removeprefix("version_")) if re.fullmatch(r"version_\d+", name) else name
    _expect_own_checkpoints(os.path.join(runs, name))


def _same_folder(a: str, b: str) -> bool:
    """Whether two paths name one folder, through symbolic links (and mounts, where both exist): ``runs`` linked to
    ``/scratch/me/runs`` and a checkpoint given by its real path (a resume then started a new ``version_N`` instead
    of going on in its own)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _run_of(path: str | None) -> str | None:
    """The run folder (absolute) of a local checkpoint in its ``checkpoints/`` folder, ``<run>/checkpoints/x.ckpt``;
    None for any other path."""
    if not path or "://" in path:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def _expect_own_checkpoints(run: str) -> None:
    """Silence ModelCheckpoint's warning about a folder with checkpoints in it for the ``checkpoints/`` of a resumed
    run's folder ``run`` (as the logger names it, through any link): they are the run's own, as expected."""
    folder = os.path.join(run, "checkpoints")
    forms = {os.path.relpath(folder), os.path.abspath(folder), folder}
    warnings.filterwarnings("ignore", message="|".join(re.escape(f"Checkpoint directory {f}") for f in sorted(forms)))


def _numbered(folder: str, pattern: str) -> dict[int, str]:
    """The entries of ``folder`` (none if it does not exist yet) whose names match ``pattern``, whose one group is
    their number: ``{number: name}``."""
    return {int(m.group(1)): m.group(0) for m in (re.fullmatch(pattern, f) for f in
                                                  (os.listdir(folder) if os.path.isdir(folder) else [])) if m}


# model and data settings that change how fast a run goes, not what it trains: a chain's jobs may differ in them
_SPEED_ONLY = {"model.channels_last", "data.num_workers", "data.pin_memory", "data.resident", "data.cache_dir"}


def _resolve_last(config, dump, random_seed: bool = False) -> str | None:
    """``--ckpt_path last``: the newest ``last.ckpt`` of the logger's run folders (``version_*``, or the logger's
    own version; without a logger the same ``version_*`` folders and SLURM jobs' ``slurm-*`` ones beside them (see
    _unlogged_runs), or ``default_root_dir/checkpoints`` and ``default_root_dir/slurm-*/checkpoints``, where such
    runs went before) whose run has this command's model and data settings and seed, or a fresh start when there
    is none yet (a run folder without a readable config.yaml counts as the same run). Lightning's own ``last``
    looks only in the new run's folder, which is empty.

    Each run of a sweep over the recipe's settings (``--model.optim.lr`` 0.1, 0.3) is its own: ``last`` took the
    recipe's newest run whatever its settings, so the second of a sweep's chains went on from the first one's run,
    in its folder. The trainer's settings (``max_epochs``, ``max_time``, ...) and those that change only the speed
    (``_SPEED_ONLY``) may change, and a seed drawn at random (``seed_everything: true``) is not compared (see
    _keep_run_seed). ``dump()`` gives this command's config.yaml. Returns the line that says which run it resumes,
    or why none."""
    if config.get("ckpt_path") != "last":
        return None
    trainer, tensorboard = config.get("trainer") or {}, _tensorboard_runs(config)
    if tensorboard is not None:
        args, base = tensorboard
        version = args.get("version")
        run = f"version_{version}" if isinstance(version, int) else version
        shown = os.path.join(base, run or "version_*")
        folders = [os.path.join(glob.escape(base), glob.escape(run) if run else "version_*")]
    else:  # without a logger: its run folders (_number_unlogged_run) and SLURM jobs' (_resume_requeued_slurm_job),
        # or default_root_dir and its slurm-* folders, where such runs went before
        root, runs = glob.escape(trainer.get("default_root_dir") or "."), _unlogged_runs(config)
        shown = os.path.join(runs, "version_*")
        folders = [root, os.path.join(root, "slurm-*"), *(os.path.join(glob.escape(runs), f) for f in
                                                          ("version_*", "slurm-*"))]
    pattern = os.path.join(shown, "checkpoints", "last.ckpt")
    found = [f for folder in folders for f in glob.glob(os.path.join(folder, "checkpoints", "last.ckpt"))]
    config.ckpt_path = None
    if not found:
        return f"--ckpt_path last: no {pattern} yet, so this run starts afresh"

    def compared(values: dict) -> dict:
        return _what_it_trains({key: values.get(key) for key in ("model", "data", "seed_everything")
                                if key != "seed_everything" or not random_seed})

    ours, others = compared(_settings(dump())), []
    found.sort(key=os.path.getmtime, reverse=True)
    for ckpt in found:
        run = os.path.dirname(os.path.dirname(ckpt))
        saved = _run_folder_settings(run)
        if saved is None or "unreadable" in saved:  # settings unknown (copied there, cut short): taken as before
            config.ckpt_path = ckpt
            break
        theirs = compared(saved)
        if theirs == ours:
            config.ckpt_path = ckpt
            break
        differ = [f"{key} {theirs.get(key)} -> {ours.get(key)}" for key in sorted({*theirs, *ours}, key=str)
                  if theirs.get(key) != ours.get(key)]
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        others.append(f"{run} differs in {', '.join(differ[:3])}{more}")
    if config.ckpt_path is None:
        return (f"--ckpt_path last: no run with this command's model and data settings and seed has a {pattern} "
                f"(the newest, {others[0]}), so this run starts afresh. To go on from a run with other settings, "
                f"give its checkpoint: --ckpt_path {found[0]}.")
    newer = f" ({len(others)} newer run{'s' * (len(others) > 1)} with other settings: {others[0]})" if others else ""
    return f"--ckpt_path last: resuming from {config.ckpt_path}{newer}"


def _slurm_job() -> str | None:
    """This SLURM job's id (``JOB_TASK`` for an array task) when Lightning runs under SLURM, else None. A job that
    SLURM requeues keeps its id."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")


def _resume_requeued_slurm_job(config, args: list[str]) -> str | None:
    """Keep SLURM's requeue checkpoints to the job and command that wrote them, and resume the requeued job's
    command from its own.

    On the requeue signal Lightning writes ``default_root_dir/hpc_ckpt_N.ckpt``, and every later run under SLURM
    with that ``default_root_dir`` (``runs`` for all recipes) resumed from it: another recipe's run, or a new run
    of the same recipe, which went on silently from the old one. Each job's command (``args``, the flags after
    ``pretrain``) now gets ``default_root_dir/slurm-<job id>-<8 hex digits of its flags>`` (without a logger, the
    folder is also the run's, and goes with its other runs: see _unlogged_runs): the requeued job runs
    its script again, and each command finds its own checkpoint there and resumes from it as from ``--ckpt_path``
    (the same checks, logging on in the same run folder), also when it was started with ``--ckpt_path`` (its own
    checkpoint is newer). Another command of the same job script (a sweep run one after the other) does not: with
    one folder per job it resumed from the requeued command's checkpoint, silently when the method and backbone
    were the same. A command that had finished in this job (``FINISHED`` in its folder, see _mark_finished) raises
    _Finished: requeued for a later command, the script ran it again, from its requeue checkpoint or from scratch.
    Returns the line that says it resumes.
    """
    import hashlib

    trainer, job = config.get("trainer"), _slurm_job()
    if trainer is None or job is None:
        return None
    command = hashlib.sha1("\0".join(args).encode()).hexdigest()[:8]
    base = (trainer.get("default_root_dir") or ".") if _logged(trainer) else _unlogged_runs(config)
    folder = os.path.join(base, f"slurm-{job}-{command}")
    trainer.default_root_dir = folder
    if os.path.isfile(done := os.path.join(folder, FINISHED)):
        with open(done) as f:
            raise _Finished(f"SLURM job {job} was requeued, and this command had finished in it before ({f.read()}); "
                            "nothing left to train.")
    numbered = _numbered(folder, REQUEUE_CHECKPOINT)
    if not numbered:
        return None
    config.ckpt_path = os.path.join(folder, numbered[max(numbered)])
    return f"SLURM job {job} was requeued: resuming from {config.ckpt_path}"


FINISHED = "finished"  # in a SLURM job's folder: the command ended its training (_mark_finished)
REQUEUE_CHECKPOINT = r"hpc_ckpt_(\d+)\.ckpt"  # Lightning's name for the checkpoint it saves on the requeue signal


class _Finished(Exception):
    """A requeued SLURM job's command that had finished before: pretrain says so and trains nothing."""


def _mark_finished(trainer, checkpoint: str | None) -> None:
    """Under SLURM, note in the job's folder (``trainer.default_root_dir``, see _resume_requeued_slurm_job) that
    this command's training ended (rank 0; call it on every rank), with the step and the final checkpoint."""
    if _slurm_job() is None or trainer.fast_dev_run or not trainer.is_global_zero:
        return
    os.makedirs(trainer.default_root_dir, exist_ok=True)
    with open(os.path.join(trainer.default_root_dir, FINISHED), "w") as f:
        f.write(f"step {trainer.global_step}" + (f", checkpoint {checkpoint}" if checkpoint else ""))
    if checkpoint:
        _remove_requeue_checkpoints(trainer)


def _end_ranks_started_here(trainer, grace: float = 5.0) -> None:
    """This rank failed: end the ranks it started. Under Lightning's own launcher (``--trainer.devices N`` without
    torchrun or srun) rank 0 starts the node's other ranks as its child processes. Lightning ends them all when
    one of them fails, and on Ctrl-C, but not when rank 0 fails alone (a checkpoint write on a full disk: only
    rank 0 writes). They were left waiting for it in their next collective, holding their devices until the
    process group's timeout (30 minutes under NCCL). Each gets ``grace`` seconds to end by itself (a rank that
    failed first may still be printing the error that made this one fail), then SIGKILL, as Lightning's launcher
    ends them. torchrun and ``srun --kill-on-bad-exit=1`` end the ranks they start themselves."""
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    launcher = trainer.strategy.launcher
    if not isinstance(launcher, _SubprocessScriptLauncher) or not launcher.procs:
        return  # not the process that started the others
    children = list(launcher.procs)
    # Lightning's observer thread reads this list, and SIGKILLs this process as soon as it sees a child ended
    # with an error: emptied, the observer ends quietly and this process goes on to say why it failed.
    launcher.procs.clear()
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = [(trainer.global_rank + local, p) for local, p in enumerate(children, 1) if p.poll() is None]
    for _, p in waiting:
        p.kill()
    for p in children:
        p.wait()
    if waiting:
        ranks = ", ".join(str(rank) for rank, _ in waiting)
        pids = ", ".join(str(p.pid) for _, p in waiting)
        s = "s" if len(waiting) > 1 else ""
        print(f"\nssl-toolkit pretrain: rank {trainer.global_rank} failed; ended rank{s} {ranks} (PID{s} {pids}), "
              f"which {'were' if s else 'was'} waiting for it.", file=sys.stderr)  # a progress bar may end the line


def _remove_requeue_checkpoints(trainer, resumed: str | None = None) -> None:
    """Under SLURM, remove the requeue checkpoints (``hpc_ckpt_N.ckpt``) of this job's command that are done with:
    those older than ``resumed``, the one the run resumes from (once it has been checked), or all of them when the
    run has written its final checkpoint. Each holds the whole training state, optimizer included; Lightning saves
    one more on every requeue and never removes any, so a long chain of requeues filled the disk. Rank 0."""
    if _slurm_job() is None or not trainer.is_global_zero:
        return
    folder = trainer.default_root_dir
    numbered = _numbered(folder, REQUEUE_CHECKPOINT)
    if not numbered:
        return
    if resumed is not None:
        m = re.fullmatch(REQUEUE_CHECKPOINT, os.path.basename(resumed))
        if not m or not _same_folder(os.path.dirname(os.path.abspath(resumed)), folder):
            return  # resumed from a checkpoint of the user's (--ckpt_path), not from this job's
        numbered = {n: name for n, name in numbered.items() if n < int(m.group(1))}
    for name in numbered.values():
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))


def _logged(trainer) -> bool:
    """Whether the run's trainer config (``config.trainer``) has a logger."""
    return trainer.get("logger") not in (None, False, [])


def _unlogged_runs(config) -> str:
    """Where the ``version_N`` folders of runs without a logger go: ``default_root_dir/<name>``, the folder of the
    recipe's own TensorBoard logger (``runs/simclr-cifar10``), with the name its ``--config`` files give the logger
    (the last that names one); ``default_root_dir`` when none does. So a run goes where it would with its logger,
    and ``--ckpt_path last`` finds this recipe's runs, not another recipe's."""
    import yaml

    name = None
    for path in config.get("config") or []:
        path = getattr(path, "absolute", None) or os.fspath(path)
        try:
            with open(path) as f:
                logger = ((yaml.safe_load(f) or {}).get("trainer") or {}).get("logger")
        except (OSError, yaml.YAMLError, AttributeError):  # unreadable now, or not a mapping: the parser's concern
            continue
        for one in logger if isinstance(logger, list) else [logger]:
            given = isinstance(one, dict) and isinstance(one.get("init_args"), dict) and one["init_args"].get("name")
            name = str(given) if given else name
    root = config.get("trainer", {}).get("default_root_dir") or "."
    return os.path.join(root, name) if name else root


def _number_unlogged_run(config) -> bool:
    """Give a run without a logger (``--trainer.logger false``) its own ``version_N`` folder where the recipe's
    logger would have put it (see _unlogged_runs), as the logger gives each run, and return True; False when the
    run has a logger, is a SLURM job (whose ``slurm-<job id>-<command>`` folder is its own already, see
    _resume_requeued_slurm_job) or is a fast_dev_run (which writes no files).

    Lightning writes such a run's ``config.yaml`` and checkpoints into ``default_root_dir`` itself, so a second
    run in the same folder replaced the first one's config (which then survived only in its checkpoint's
    hyperparameters) and named its checkpoints ``last-v1.ckpt``, next to the first run's, whatever their recipes.
    A run resumed from a checkpoint in one of those ``version_N/checkpoints`` goes on in that folder. Under DDP
    every rank numbers the run before any writes to it (Lightning makes the folder after the process group is set
    up), and Lightning takes rank 0's folder for the config and checkpoints all the same."""
    trainer = config.get("trainer")
    if trainer is None or _logged(trainer) or trainer.get("fast_dev_run") or _slurm_job() is not None:
        return False
    runs, run = _unlogged_runs(config), _run_of(config.get("ckpt_path"))
    if run and re.fullmatch(r"version_\d+", os.path.basename(run)) and _same_folder(os.path.dirname(run), runs):
        trainer.default_root_dir = os.path.join(runs, os.path.basename(run))
        _expect_own_checkpoints(trainer.default_root_dir)
        return True
    last = max(_numbered(runs, r"version_(\d+)"), default=-1)
    trainer.default_root_dir = os.path.join(runs, f"version_{last + 1}")
    return True


def _refuse_lightnings_optimizer(config) -> None:
    """LightningCLI's own ``optimizer`` and ``lr_scheduler`` (``--optimizer SGD --optimizer.lr 0.1``) replace the
    method's ``configure_optimizers``: the recipe's optimizer and schedule, the weight decay kept off biases and
    norms, and LARS's exclusions were dropped for a bare optimizer at a constant rate, with only a warning of
    Lightning's. Their keys stay accepted as null, as every run's saved ``config.yaml`` lists them."""
    given = [key for key in ("optimizer", "lr_scheduler") if config.get(key) is not None]
    if given:
        method = str(getattr(config.get("model"), "class_path", "the method")).rsplit(".", 1)[-1]
        raise ConfigError(f"Lightning's --{given[0]} ({given[0]}: in a recipe) would replace {method}'s optimizer "
                          f"and schedule. {_OPTIM_HOME}")


def _refuse_spawned_ranks(trainer, config) -> None:
    """Lightning's strategies that start the ranks from inside this process (``ddp_spawn``, and ``ddp_notebook``
    or ``ddp_fork``, which fork it) run only the Trainer's fit there, and give rank 0's weights back to this
    process. ``ddp_spawn`` failed with a traceback (``Can't pickle local object 'pretrain.<locals>.PretrainCLI'``);
    the forking ones trained, but the run's own steps after training ran here, outside the processes that
    trained: the final save wrote nothing (this process's ModelCheckpoint had no folder; a run that ended between
    two scheduled saves kept the older ``last.ckpt``), and it printed ``epoch=0-step=4.ckpt`` as its final
    checkpoint. Refused before anything is written, with what works: ``ddp`` runs this same command once per
    device."""
    method = getattr(trainer.strategy.launcher, "_start_method", None)  # Lightning's _MultiProcessingLauncher
    if method is not None:
        strategy = config.get("trainer", {}).get("strategy")
        strategy = strategy if isinstance(strategy, str) else type(trainer.strategy).__name__
        raise ConfigError(f"--trainer.strategy {strategy} starts the ranks from inside this process ({method}), "
                          "which pretrain does not support. Use --trainer.strategy ddp: Lightning, torchrun or srun "
                          "runs this same command once per device. In a notebook, run it as a shell command: "
                          "!ssl-toolkit pretrain ... --trainer.strategy ddp.")


# The environment this process started with. PL_GLOBAL_SEED: rank 0's seed in the ranks Lightning's launcher starts
# (or one the user set); WORLD_SIZE, SLURM_NTASKS: ranks started together (torchrun, srun). A run in this process
# sets PL_GLOBAL_SEED and, on several devices, WORLD_SIZE too, and a later run here (a notebook, a sweep calling
# main) is neither: see _choose_random_seed
_STARTED_ENV = {name: os.environ.get(name) for name in ("PL_GLOBAL_SEED", "WORLD_SIZE", "SLURM_NTASKS")}


def _choose_random_seed(config) -> None:
    """``seed_everything: true`` asks for a random seed (LightningCLI's help: "Set to True to use a random seed"),
    but Lightning 2.6 seeds 0 for it, with a warning ("No seed found, seed set to 0"), so runs meant to differ by
    their seed repeated one another. Choose one here; config.yaml records the number. Under Lightning's own
    launcher the other ranks, started later, inherit it through ``PL_GLOBAL_SEED``, which Lightning reads for
    true. Ranks that start together (torchrun, srun) cannot agree on a random one, so they are asked for a
    number."""
    import random

    if config.get("seed_everything") is not True or _STARTED_ENV["PL_GLOBAL_SEED"] is not None:
        return
    together = max(int(_STARTED_ENV[name] or 1) for name in ("WORLD_SIZE", "SLURM_NTASKS"))
    if together > 1:
        raise ConfigError(f"seed_everything: true gives each of the {together} ranks started together (torchrun, "
                          "srun) its own random seed, and a DDP run needs one for all. Give a number: "
                          "--seed_everything 1234.")
    config["seed_everything"] = random.SystemRandom().randrange(2**31)


def _refuse_tuners(trainer) -> None:
    """Lightning's tuner callbacks. LearningRateFinder failed with a traceback (it looks for a model attribute
    ``lr``; a method's learning rate is ``optim.lr``). BatchSizeFinder replaced the recipe's batch size with the
    largest that fits, searched from 2 upwards, and left the learning rate as the recipe scaled it for its own
    batch (SimCLR: 0.3 x batch / 256): a silent change of two hyperparameters, where a contrastive method's
    results depend on the batch; on a set smaller than the search it stopped the run with the data's "batch_size
    is larger than the training set"."""
    from pytorch_lightning.callbacks import BatchSizeFinder, LearningRateFinder

    for callback in trainer.callbacks:
        if isinstance(callback, LearningRateFinder):
            raise ConfigError("LearningRateFinder is not supported: a method's learning rate is model.optim.lr "
                              "(--model.optim.lr; each recipe's comment gives its source). " + _OPTIM_HOME)
        if isinstance(callback, BatchSizeFinder):
            raise ConfigError("BatchSizeFinder is not supported: it would replace the recipe's batch size, which "
                              "the learning rate is scaled for (SimCLR with LARS: 0.3 x batch / 256) and a "
                              "contrastive method's result depends on. Set --data.batch_size, and --model.optim.lr "
                              "to match.")


def _settings(text: str) -> dict:
    """A run's ``config.yaml`` as the settings that make it that run: what pretrain fills in to resume (the
    checkpoint's path, the logger's version) left out. One that is not YAML (cut short by a kill while it was
    written) gives ``{"unreadable": ...}``."""
    import yaml

    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        return {"unreadable": str(e).splitlines()[0]}
    if not isinstance(values, dict):
        return {"unreadable": f"a {type(values).__name__}, not settings"}
    values.pop("ckpt_path", None)
    loggers = (values.get("trainer") or {}).get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
            logger["init_args"].pop("version", None)
    return values


def _what_it_trains(values: dict) -> dict:
    """Settings (from _settings) flat, as their flags name them, without those that change only the speed."""
    from ssl_toolkit.checkpoint import flat_settings

    return {key: value for key, value in flat_settings(values).items() if key not in _SPEED_ONLY}


def _run_folder_settings(folder: str) -> dict | None:
    """The settings of the run in ``folder``, from its ``config.yaml`` (see _settings); None without one."""
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return _settings(f.read())


def _keep_run_seed(config, saved: dict) -> None:
    """A run resumed with ``seed_everything: true`` records its run's seed (``saved``: its run folder's settings),
    not the one drawn for it: the checkpoint's random states go on, so config.yaml named a seed the run never had
    (and differed from the run's own for that alone, see _keep_earlier_config)."""
    if isinstance(saved.get("seed_everything"), int):
        config.seed_everything = saved["seed_everything"]


def _keep_earlier_config(log_dir: str, saved: dict, config: str, step: int) -> str | None:
    """A resumed run writes its ``config.yaml`` over the run folder's: a run resumed with other settings (a longer
    ``max_epochs``, a lower ``optim.lr``) lost the record of those it had trained with so far. When they differ
    (the checkpoint given aside), the earlier one is kept as ``config.to-step-N.yaml``, N the step it resumed
    at; returns the line that says so. ``saved``: the settings in the run folder's config.yaml. What pretrain
    itself fills in to resume (the checkpoint's path, the logger's version) is not a difference, nor are the
    settings of speed only (_SPEED_ONLY)."""
    if _what_it_trains(saved) == _what_it_trains(_settings(config)):
        return None
    path = os.path.join(log_dir, "config.yaml")
    kept = os.path.join(log_dir, f"config.to-step-{step}.yaml")
    for n in itertools.count(1):  # resumed from the same step before, with other settings again
        if not os.path.exists(kept):
            break
        kept = os.path.join(log_dir, f"config.to-step-{step}-{n}.yaml")
    os.replace(path, kept)
    shown = os.path.relpath(kept)  # under the working directory as such; elsewhere whole (was ../../tmp/runs/...)
    return (f"This run's settings differ from those in its run folder's config.yaml, which is kept as "
            f"{os.path.abspath(kept) if shown.startswith(os.pardir) else shown}: the settings up to step {step}.")


def _refuse_true_precision(trainer) -> None:
    """``--trainer.precision bf16-true``, ``16-true`` and ``64-true`` keep the weights themselves in that type: the
    first step failed with a traceback ("Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be
    the same"), since the views are made in float32 on the device, after Lightning converts a batch's inputs, and
    so are the evaluation callbacks' inputs. Refused before anything is written, with the setting that works."""
    from pytorch_lightning.plugins.precision import DoublePrecision, HalfPrecision

    plugin = trainer.precision_plugin
    if isinstance(plugin, (HalfPrecision, DoublePrecision)):
        kind = {"bf16-true": "bf16", "16-true": "float16"}.get(plugin.precision, "float64")
        fix = "32-true" if kind == "float64" else f"{plugin.precision.replace('-true', '-mixed')} (the same " \
            "compute on float32 weights, as the GPU recipes' bf16-mixed) or 32-true"
        raise ConfigError(f"--trainer.precision {plugin.precision} keeps the weights themselves in {kind}, which "
                          "pretrain does not support: the views are made in float32 on the device, and the "
                          f"evaluation callbacks encode in float32. Use --trainer.precision {fix}.")


def _barebones(config) -> str | None:
    """``--trainer.barebones true``, Lightning's mode for timing its loop, refused the settings that can slow it one
    at a time, and every recipe sets some: the logger (named as ``<...TensorBoardLogger object at 0x7f...>``), then
    ``log_every_n_steps``, then the recipe's ModelCheckpoint. They are turned off for it (the ModelCheckpoint by
    _leave_out_checkpointing), with a line that names them; Lightning's own opt-ins (``fast_dev_run``,
    ``detect_anomaly``, ``profiler``) it still refuses, as asked for."""
    trainer = config.get("trainer") or {}
    if not trainer.get("barebones"):
        return None
    off = []
    logger = trainer.get("logger")
    if logger not in (None, False):
        name = getattr(logger, "class_path", None) or (logger.get("class_path") if isinstance(logger, dict) else None)
        off.append(f"the logger ({str(name).rsplit('.', 1)[-1]})" if name else "the logger")
        trainer.logger = False
    for key, default in (("log_every_n_steps", 0), ("num_sanity_val_steps", 0), ("enable_checkpointing", False),
                         ("enable_progress_bar", False),
                         ("enable_model_summary", False)):
        if trainer.get(key) not in (None, default):
            off.append(f"{key} {str(trainer.get(key)).lower()}")
            setattr(trainer, key, default)
    # the methods' and callbacks' self.log calls: Lightning warns, once, that they do nothing
    warnings.filterwarnings("ignore", message=r"You are trying to `self.log\(\)` but `Trainer\(barebones=True\)`")
    return (f"trainer.barebones: {', '.join(off[:-1]) + ' and ' + off[-1] if len(off) > 1 else off[0]} "
            f"{'are' if len(off) > 1 else 'is'} turned off, as Lightning's barebones mode needs; this run logs "
            "nothing." if off else None)


def _leave_out_checkpointing(config) -> str | None:
    """Leave the recipe's ModelCheckpoint out of a run that asks for no checkpoints, with a line that says so.

    ``--trainer.enable_checkpointing false``: Lightning refuses it next to a ModelCheckpoint, and every recipe has
    one, so the flag could not be used. ``--trainer.fast_dev_run``: Lightning says it writes no checkpoints, but
    its ModelCheckpoint still writes ``last.ckpt`` when training ends (Lightning 2.6), into a folder that may
    hold a real run's (``default_root_dir/checkpoints`` without a logger, where runs went before
    _number_unlogged_run). Returns the line to print once the config is known to be valid (a config error stays
    the first line).
    """
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    why = ("trainer.barebones" if trainer.get("barebones") else
           "trainer.enable_checkpointing is false" if trainer.get("enable_checkpointing") is False else
           "fast_dev_run" if trainer.get("fast_dev_run") else None)
    kept = [c for c in callbacks if not str(getattr(c, "class_path", "")).endswith(".ModelCheckpoint")]
    if why and len(kept) < len(callbacks):
        trainer.callbacks = kept
        return f"{why}: the recipe's ModelCheckpoint is left out and this run writes no checkpoint."
    return None


def _left_to_train(ckpt: dict, path: str, trainer) -> str | None:
    """A resumed run's limits count from the start of the run: a checkpoint already past ``max_epochs`` or
    ``max_steps`` is refused with what it has trained (past max_epochs was Lightning's traceback, "You restored a
    checkpoint with current_epoch=3, but you have set Trainer(max_epochs=2)", and past max_steps a run that
    trained nothing and said nothing; both after replacing the run's config.yaml with their own).

    ``--trainer.max_time`` is the training time in all, resumed runs included: Lightning's Timer keeps the time
    trained in the checkpoint. A resumed run whose checkpoint has used it all stopped after its first step, so a
    chain of jobs each given the same max_time made no progress after the first. That is refused, with the time
    trained; otherwise returns the line that says how much is left."""
    import datetime

    from ssl_toolkit.saving import max_time_timer

    epochs = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed")
    steps = ckpt.get("global_step", 0)
    trained = f"{path} has trained {epochs} epoch{'s' * (epochs != 1)} ({steps} steps)" if epochs is not None else \
        f"{path} has trained {steps} steps"
    limits = [(limit, value, done) for limit, value, done in (("max_epochs", trainer.max_epochs, epochs),
                                                              ("max_steps", trainer.max_steps, steps))
              if value is not None and value >= 0 and done is not None]
    for limit, value, done in limits:
        if done > value:
            raise ConfigError(f"{trained} already, past trainer.{limit} {value}, which counts from the start of the "
                              f"run, resumed runs included. Raise --trainer.{limit} to train on.")
    for limit, value, done in limits:
        if done == value:  # a finished run: Lightning trains nothing
            return f"{trained}: all of trainer.{limit} {value}, so nothing is left to train. Raise --trainer.{limit} " \
                   "to train on."
    timer = max_time_timer(trainer)
    if timer is None:
        return None
    trained = ckpt.get("callbacks", {}).get("Timer", {}).get("time_elapsed", {}).get("train", 0.0)
    show = lambda t: str(datetime.timedelta(seconds=round(t)))  # noqa: E731
    if trained >= timer._duration:
        raise ConfigError(f"trainer.max_time {show(timer._duration)} is the training time in all, resumed runs "
                          f"included, and {path} has trained {show(trained)} already. Raise --trainer.max_time to "
                          "train on (to stop each job of a chain in time, let the scheduler's SIGTERM or SLURM's "
                          "requeue signal end it; the README's \"Watching a run\" says how).")
    return (f"trainer.max_time counts the checkpoint's {show(trained)} of training: this run stops after "
            f"{show(timer._duration - trained)} more.")


# measured at ade7d05 with `--trainer.fast_dev_run` 1 and 4, no callbacks: the difference over 3 steps
SLOW_BF16 = ("SimCLR's CIFAR-10 recipe, resnet18 at batch 32 on 2 AMD EPYC cores without AVX-512: 30.6 s a step in "
             "bf16-mixed, 1.6 s in fp32")


def _bf16_is_slow_on_this_cpu() -> bool:
    """True on an x86 CPU without bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast ran several times
    slower than fp32 (:data:`SLOW_BF16`); False where it has them and where it is not known (not x86, or a torch
    without the checks)."""
    import platform

    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() not in ("x86_64", "amd64") or None in checks:
        return False
    return not any(check() for check in checks)


def _slow_precision(trainer) -> str | None:
    """The line to print when a run trains in bf16 on a CPU that is slow at it: the GPU recipes say bf16-mixed,
    and with --trainer.accelerator cpu (or auto on a machine without a GPU) they kept it without a word."""
    from pytorch_lightning.accelerators import CPUAccelerator

    if not (isinstance(trainer.accelerator, CPUAccelerator) and str(trainer.precision).startswith("bf16")
            and _bf16_is_slow_on_this_cpu()):
        return None
    return (f"trainer.precision {trainer.precision} on a CPU without bf16 instructions (AVX512-BF16 or AMX), where bf16 "
            f"runs far slower than fp32 ({SLOW_BF16}). Add --trainer.precision 32 to train on this CPU.")


def _remove_unused_run_folder(folder: str, made: str | None = None) -> None:
    """Remove the run folder of a run that failed before its first step (data not found, bad images, Ctrl-C
    while decoding): Lightning makes it, with an empty TensorBoard file and the config, before the data is
    loaded, and the next run would be numbered after it. Kept when it holds anything else. ``made``: the topmost
    of its parent folders that the run made (``runs/`` in a new directory); those are removed too once empty."""
    import shutil

    made_files = re.compile(r"events\.out\.tfevents\..*|config\.yaml|hparams\.yaml")
    for _, folders, files in os.walk(folder):
        if folders or not all(made_files.fullmatch(f) for f in files):
            return
    shutil.rmtree(folder, ignore_errors=True)
    while made is not None and folder != made:
        folder = os.path.dirname(folder)
        try:
            os.rmdir(folder)  # only an empty one
        except OSError:
            return


def _first_missing(path: str) -> str | None:
    """The topmost folder of the absolute ``path``'s chain (``path`` included) that does not exist yet; None if it
    exists."""
    missing = None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def _not_an_advert(record: logging.LogRecord) -> bool:
    """False for Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines, which advertise its cloud
    services on every run rather than say something about the run."""
    return not record.getMessage().startswith("💡 Tip:")


def pretrain(args: list[str]):
    """Run LightningCLI: every option of the model, data and trainer is a config key or a flag. Returns the trainer,
    or None when a requeued SLURM job runs a command that had finished in it (see _resume_requeued_slurm_job)."""
    from jsonargparse import ArgumentError
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.cli import LightningCLI

    from ssl_toolkit.checkpoint import check_resume, resume_differences
    from ssl_toolkit.data import InMemoryDataModule
    from ssl_toolkit.distributed import end_process_group
    from ssl_toolkit.methods import BaseSSLModule
    from ssl_toolkit.saving import StopAndSave, TimeOutrunsSchedules, save_final_checkpoint

    # LightningCLI knows (lists in --help, resolves by short name: `--data NpzDataModule`,
    # `--trainer.callbacks+=OnlineProbe`) only the subclasses imported, and the packages' names load on first use:
    # import every module their lazy tables name, so a DataModule or callback added to a table is known too
    for package in ("ssl_toolkit", "ssl_toolkit.data", "ssl_toolkit.eval"):
        for module in sorted(set(importlib.import_module(package)._HOME.values())):
            importlib.import_module(module)

    class PretrainCLI(LightningCLI):
        random_seed = False  # seed_everything: true, a seed drawn for this run
        def add_arguments_to_parser(self, parser):  # run=False leaves out fit's own --ckpt_path; resuming needs it
            parser.add_argument("--ckpt_path", type=str | None, default=None, help=(
                "resume from this checkpoint of an earlier run of the same recipe (e.g. its last.ckpt): weights, "
                "optimizer, schedules, random states and the position in the epoch, so the run goes on exactly, "
                "logging to the same run folder; `last`: the newest last.ckpt of this recipe's runs "
                "(<save_dir>/<name>/version_*/checkpoints/), or a fresh start when there is none yet, so every job "
                "of a chain can be the same command"))

        def _set_seed(self):  # LightningCLI's own, before the classes are made
            self.random_seed = self.config.get("seed_everything") is True
            _choose_random_seed(self.config)
            super()._set_seed()

        def before_instantiate_classes(self):
            _refuse_lightnings_optimizer(self.config)
            _expand_paths(self.config)
            # lines to print once the config has turned out valid, so that an error stays the first line
            dump = functools.partial(self.parser.dump, self.config, skip_none=False)
            self.notes = [n for n in (_barebones(self.config), _leave_out_checkpointing(self.config),
                                      _resolve_last(self.config, dump, self.random_seed),
                                      _resume_requeued_slurm_job(self.config, args)) if n]
            _log_to_resumed_run(self.config)
            self.numbered_run = _number_unlogged_run(self.config)

    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within Python.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_not_an_advert)  # once: the same filter
    # Lightning 2.6 calls a torch.utils._pytree API that newer torch deprecates, once per run: not the user's to fix.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    try:
        cli = PretrainCLI(
            BaseSSLModule, InMemoryDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args, run=False,
            seed_everything_default=0, save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "ssl-toolkit pretrain", "description": "Pretrain an encoder from a recipe.",
                           "exit_on_error": False},
            trainer_defaults={"default_root_dir": "runs", "logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
                "plugins": [{"class_path": "ssl_toolkit.saving.AtomicCheckpointIO"}],
                "callbacks": [StopAndSave(), TimeOutrunsSchedules()]})  # appended to the recipe's callbacks
    except (ArgumentError, ValueError) as e:  # jsonargparse wraps the config classes' own checks in ValueError
        raise ConfigError(concise_config_error(_name_broken_config(str(e), args))) from None
    except _Finished as e:  # every rank gets here; say it once
        from lightning_fabric.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank == 0:
            print(e, file=sys.stderr)
        return None
    except RuntimeError as e:
        twice = re.match(r"Found more than one stateful callback of type `(\w+)`", str(e))
        if not twice:
            raise
        # a second KNNCallback added to a recipe that has one: Lightning's RuntimeError and its traceback
        raise ConfigError(f"trainer.callbacks has {twice[1]} twice (a recipe's own, and one added with "
                          f"--trainer.callbacks+=?), which checkpoints cannot keep apart. Keep one: to change the "
                          f"recipe's {twice[1]}, copy the recipe and edit it.") from None
    except (MisconfigurationException, TypeError) as e:  # Lightning: settings this machine cannot run (no GPU, ...)
        import traceback

        if isinstance(e, TypeError) and not any(  # its devices parser raises TypeError: --trainer.devices -2 on CPUs
                "accelerators" in frame.filename for frame in traceback.extract_tb(e.__traceback__)):
            raise
        hardware = re.search(r"accelerator|device|gpu|cuda|mps|tpu|strategy|precision|node", str(e), re.I)
        raise ConfigError(f"{e}\nCheck trainer.accelerator, trainer.devices, trainer.strategy and trainer.precision "
                          "(--trainer.accelerator auto runs on whatever this machine has)." if hardware else
                          f"{e}\nCheck the trainer settings of the recipe and the --trainer flags.") from None
    _refuse_spawned_ranks(cli.trainer, cli.config)
    _refuse_tuners(cli.trainer)
    _refuse_true_precision(cli.trainer)
    notes = [*cli.notes, _slow_precision(cli.trainer)]  # the precision's line needs the trainer, made just now
    for note in filter(None, notes) if cli.trainer.is_global_zero else []:
        print(note, file=sys.stderr)
    ckpt_path = cli.config.get("ckpt_path")
    if ckpt_path and "://" not in ckpt_path:  # a local file: check it fits before Lightning loads it into the model
        ckpt = check_resume(ckpt_path, cli.model)
        for note in (_left_to_train(ckpt, ckpt_path, cli.trainer), resume_differences(ckpt, cli.model, cli.datamodule)):
            if note and cli.trainer.is_global_zero:
                print(note, file=sys.stderr)
        resumed_step = ckpt.get("global_step", 0)
        del ckpt  # Lightning loads it again, into the model
        _remove_requeue_checkpoints(cli.trainer, resumed=ckpt_path)
    start = time.perf_counter()
    # the run's own folder: the logger's (None under fast_dev_run) or, without a logger, the one numbered for it
    log_dir = cli.trainer.log_dir if cli.trainer.logger is not None or cli.numbered_run else None
    log_dir = log_dir and os.path.abspath(log_dir)
    resumed_here = ckpt_path and "://" not in ckpt_path and log_dir and cli.trainer.is_global_zero
    saved = _run_folder_settings(log_dir) if resumed_here else None
    if saved is not None:
        if cli.random_seed:
            _keep_run_seed(cli.config, saved)
        note = _keep_earlier_config(log_dir, saved, cli.parser.dump(cli.config, skip_none=False), resumed_step)
        if note:
            print(note, file=sys.stderr)
    made = log_dir and _first_missing(log_dir)  # the run folder is new; made: with the parents it needs
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except BaseException as e:
        if made and cli.trainer.global_step == 0 and cli.trainer.is_global_zero:
            _remove_unused_run_folder(log_dir, made)
        if isinstance(e, RunStopped):  # every DDP rank stopped after the same step and saved: all are here
            end_process_group()
        elif not isinstance(e, NonFiniteLossError):  # that one too stops every rank at the same step
            _end_ranks_started_here(cli.trainer)
        raise
    try:
        save_final_checkpoint(cli.trainer)
        ckpt = cli.trainer.checkpoint_callback
        final = ckpt and (ckpt.last_model_path or ckpt.best_model_path)
        _mark_finished(cli.trainer, final)
    except BaseException:
        _end_ranks_started_here(cli.trainer)
        raise
    if cli.trainer.is_global_zero:
        print(f"pretraining took {time.perf_counter() - start:.1f} s")
        if final:
            print(f"checkpoint: {final}")
        else:
            print("checkpoint: none (" + ("fast_dev_run writes none)" if cli.trainer.fast_dev_run else
                                          "the run has no ModelCheckpoint)"))
    end_process_group()  # DDP: every rank gets here once fit has ended
    return cli.trainer


def resolve_data(spec: str | None, ckpt: dict, test_only: bool = False, on_corrupt: str | None = None):
    """The DataModule to evaluate on: ``--data`` (a recipe YAML, an .npz file, an image folder, a caption folder
    with ``captions.txt`` or ``digits``) or, when omitted, the one recorded in the checkpoint. ``test_only``: for
    commands that use the test split alone (zero-shot, retrieval, pictures), which loads nothing else.
    ``on_corrupt``: the command's ``--on-corrupt`` for image and caption folders (``None``: the data's own, ``fail``
    for a folder given as ``--data``), and the option their unreadable-file errors name."""
    from ssl_toolkit.checkpoint import datamodule_from_checkpoint, import_class
    from ssl_toolkit.data import CaptionDataModule, DigitsDataModule, ImageFolderDataModule, NpzDataModule
    from ssl_toolkit.data.base import DecodesFiles

    crop = ckpt["hyper_parameters"]["views"]["crop_size"]
    if spec is None:
        dm = datamodule_from_checkpoint(ckpt)
    elif spec == "digits":
        dm = DigitsDataModule(image_size=crop)
    elif spec.endswith((".yaml", ".yml")):
        import yaml

        if not os.path.isfile(spec):  # was "[Errno 2] No such file or directory"
            raise FileNotFoundError(f"--data {spec!r}: no such recipe file. Pass a recipe .yaml, an .npz file, an image "
                                    "or caption folder or 'digits', or omit --data for the checkpoint's own dataset.")
        with open(spec) as f:
            data = (yaml.safe_load(f) or {}).get("data")
        if not isinstance(data, dict) or "class_path" not in data:
            raise ValueError(f"{spec} has no `data:` section with a class_path; pass a recipe, an .npz file or a folder.")
        dm = import_class(data["class_path"])(**data.get("init_args", {}))
    elif spec.endswith(".npz"):
        dm = NpzDataModule(spec)
    elif os.path.isfile(os.path.join(spec, "captions.txt")):
        dm = CaptionDataModule(spec, image_size=crop)
    elif os.path.isdir(spec):
        dm = ImageFolderDataModule(spec, image_size=crop)
    else:
        raise FileNotFoundError(f"--data {spec!r} is neither a recipe .yaml, an .npz file, an image or caption folder "
                                "nor 'digits'. Omit --data to use the dataset recorded in the checkpoint.")
    if isinstance(dm, DecodesFiles):  # their errors named data.on_corrupt=skip, which no command takes
        dm.on_corrupt, dm.skip_setting = on_corrupt or dm.on_corrupt, "--on-corrupt skip"
    return dm.only_test() if test_only else dm  # an image folder's training images were decoded for nothing


def _path(text: str) -> str:
    """argparse type of paths: ``~`` and variables expanded (:func:`ssl_toolkit.paths.expand`), as the shell does not
    in ``--data=~/cifar10.npz`` or in quotes."""
    from ssl_toolkit.paths import expand

    return expand(text)


def _count(text: str, least: int = 1) -> int:
    """argparse type of sizes and counts (batch size, k, epochs, IVF cells): a whole number >= 1 (``least``)."""
    if not text.strip().isdigit() or int(text) < least:
        raise argparse.ArgumentTypeError(f"needs a whole number >= {least}; got {text!r}")
    return int(text)


def _finite(text: str) -> float:
    """argparse type of rates, temperatures and fractions: a finite number (its range is the command's to check).
    ``float`` took nan and inf, and a probe with lr nan scored chance (9.6% on digits) without a word."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"needs a finite number; got {text!r}")
    return value


def _refuse_unused(a, options: tuple[str, ...], what: str, fix: str, instead: str) -> None:
    """Refuse ``options`` given for a mode this run does not use (the caller's check): they were ignored without a
    word, and the result was read as theirs. Their defaults are ``None`` in the parser, so that given is known."""
    given = [o for o in options if getattr(a, o[2:].replace("-", "_")) is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} set{'s' * (len(given) == 1)} {what}; {fix}, or leave "
                         f"{'them' if len(given) > 1 else 'it'} out ({instead}).")


def _label_budget(text: str):
    """argparse type of ``--labels``: images per class (``5``) or a share of each class (``1%``)."""
    from ssl_toolkit.eval.few_labels import LabelBudget

    try:
        return LabelBudget.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_labels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", type=_label_budget, nargs="+", metavar="N|P%",
                   help="also score with few labels: N labelled training images per class ('5') or a class-balanced "
                        "share of them ('1%%'), each drawn --draws times (mean and std over the draws); the test "
                        "split is scored whole (kNN: exact search)")
    p.add_argument("--draws", type=_count,
                   help="random draws of the labelled images for each --labels budget, draw r seeded with r "
                        "(default 5)")


def _parse_labels(a) -> None:
    """``--labels`` as given once each, and ``--draws`` (5 unless set) only with them."""
    if a.draws is not None and not a.labels:
        raise ValueError("--draws sets how many times --labels draws its labelled images; give --labels too (e.g. "
                         "--labels 1 5 10%).")
    a.labels, a.draws = list(dict.fromkeys(a.labels or ())), a.draws or 5


def _few_labels(a, train_y: torch.Tensor, classes: list[str], score, after_draw=None) -> dict:
    """Each ``--labels`` budget drawn ``--draws`` times: ``{budget: (labelled images, [score(index) of each draw])}``,
    where ``score`` scores with the labels of the training images at ``index`` alone; ``after_draw(results)`` is
    called with the draws done so far after each one."""
    from ssl_toolkit.eval.few_labels import labelled_subsets

    results = {}
    for budget in a.labels:
        subsets = labelled_subsets(train_y, budget, len(classes), a.draws, classes)
        results[str(budget)] = len(subsets[0]), []
        for index in subsets:
            results[str(budget)][1].append(score(index))
            if after_draw:
                after_draw(results)
    return results


def _spread(values: list[float]) -> dict:
    """A score over draws, as the result JSON keeps it: mean, sample std and each draw's value."""
    from ssl_toolkit.eval.few_labels import mean_std

    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "draws": values}


def _few_labels_table(a, title: str, columns: list[str], rows: dict, full: list[float] | None,
                      train_size: int) -> None:
    """Print the few-label scores (``rows``: ``{budget: (images, [spread of each column])}``) above all labels'
    (``full``; ``None``: not scored, ``probe --labels-only``)."""
    print(f"{title} with few labels: mean ± std over {a.draws} draw{'s' * (a.draws > 1)} of the labelled training "
          f"images")
    print(f"  {'labels':<10}{'images':>8}" + "".join(f"{c:>17}" for c in columns))
    for budget, (images, spreads) in rows.items():
        cells = "".join(f"{s['mean']:>9.2f} ± {s['std']:<5.2f}" for s in spreads)
        print(f"  {budget:<10}{images:>8,}{cells}".rstrip())
    if full is not None:
        print(f"  {'all':<10}{train_size:>8,}" + "".join(f"{v:>17.2f}" for v in full))


def _parser(prog: str, description: str, ckpt: bool = True, device: bool = True) -> argparse.ArgumentParser:
    """A subcommand's parser with the options most commands share: --ckpt and --device."""
    p = argparse.ArgumentParser(prog=f"ssl-toolkit {prog}", description=description)
    if ckpt:
        p.add_argument("--ckpt", type=_path, required=True, help="checkpoint written by `ssl-toolkit pretrain`")
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    return p


def _eval_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = _parser(prog, description)
    p.add_argument("--data", type=_path, help="recipe .yaml, .npz file, image folder (train/ + val/), caption folder "
                                  "(captions.txt + images/) or 'digits'; default: the dataset the checkpoint was trained on")
    p.add_argument("--batch-size", type=_count, default=512, help="images per forward pass during feature extraction "
                   "(and per step of probe --augment and --finetune)")
    _add_precision(p)
    p.add_argument("--on-corrupt", choices=["fail", "skip"],
                   help="unreadable images of an image or caption folder: stop with the list of them or leave them "
                        "out (default: fail for --data FOLDER, else the setting the data was trained with)")
    p.add_argument("--out", type=_path,
                   help="result file, JSON (default: next to the checkpoint, <ckpt>.<command>.json, or "
                        "<ckpt>.<command>.<dataset>.json with --data; probe --augment: probe-augmented, --finetune: "
                        "finetune); "
                        "for pictures, a folder (default <ckpt>.pictures)")
    return p


def _add_on_corrupt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-corrupt", default="fail", choices=["fail", "skip"],
                   help="unreadable images: stop with the list of them (default) or leave them out")


def _add_precision(p: argparse.ArgumentParser) -> None:
    from ssl_toolkit.eval.features import EVAL_PRECISIONS

    p.add_argument("--precision", default="auto", choices=EVAL_PRECISIONS,
                   help="the model's forward passes: auto (bf16 autocast on CUDA, fp32 on the CPU; the default), "
                        "bf16 or fp32")


def _use_precision(args) -> None:
    """The command's --precision for every evaluator it runs (main runs each command in its own context)."""
    from ssl_toolkit.eval.features import set_eval_precision

    set_eval_precision(args.precision)


def _device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) visible "
                         f"to torch (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use "
                         "--device cpu, or auto to take a GPU when there is one.")
    return device


def checkpoint_info(path: str, ckpt: dict, dm) -> dict:
    """What a result JSON says of what was scored: the checkpoint, its method and backbone, and the dataset."""
    return {"checkpoint": os.path.abspath(path), "method": ckpt["ssl_toolkit"]["method"],
            "backbone": ckpt["hyper_parameters"]["backbone"]["name"], "dataset": dm.name}


def _info(args, ckpt: dict, dm, device: torch.device) -> dict:
    """The result JSON's run info; with images left out as unreadable (``--on-corrupt skip``), how many: a score
    on fewer images than the folder holds said so only in a log line."""
    dm.setup()
    skipped = getattr(dm, "num_skipped", 0)
    return {**checkpoint_info(args.ckpt, ckpt, dm), "device": str(device), "precision": args.precision,
            **({"skipped_unreadable": skipped} if skipped else {})}


def _encoder_and_data(args):
    """The checkpoint's frozen encoder on the chosen device, the labelled data to evaluate on, and the run info."""
    from ssl_toolkit.checkpoint import encoder_from_checkpoint, load_checkpoint

    device = _device(args)
    ckpt = load_checkpoint(args.ckpt)
    encoder = encoder_from_checkpoint(ckpt).to(device)
    dm = resolve_data(args.data, ckpt, on_corrupt=args.on_corrupt)
    # an image folder's classes from its listing: unlabelled images and a budget no class can fill are refused before
    # the folder is decoded (30 s for CIFAR-10's 60,000 JPEGs, an hour for ImageNet), not after
    listed = dm.listed_labels() if dm.splits is None else None
    if listed is None:
        dm.setup()
    classes, y_train = listed or (dm.splits.classes, dm.splits.y_train)
    if not classes:
        raise ValueError(_split_hint(dm) or (
            f"{dm.name} has no class labels (unlabelled images, or image-caption data); pass --data with a labelled "
            "set (.npz, an image folder with train/<class>/ and val/<class>/, a recipe or 'digits'). For CLIP "
            "checkpoints see also `ssl-toolkit retrieval`."))
    _check_budgets(args, y_train, classes)
    info = _info(args, ckpt, dm, device)  # loads the images
    if listed and getattr(dm, "num_skipped", 0):  # unreadable files left out may have left a class short
        _check_budgets(args, dm.splits.y_train, classes)
    return encoder, dm, info, device


def _split_hint(dm) -> str | None:
    """Why an image folder of class folders reads as unlabelled, and what to pass: one split of a labelled set (its
    parent holds train/ and val/ or test/), or class folders without the train/val split the evaluators need."""
    from ssl_toolkit.data import ImageFolderDataModule
    from ssl_toolkit.data.images import SPLIT_FOLDERS, listed

    if not isinstance(dm, ImageFolderDataModule):
        return None
    root = os.path.normpath(dm.root)
    parent = os.path.dirname(root) or os.curdir
    if os.path.basename(root) in SPLIT_FOLDERS and os.path.isdir(os.path.join(parent, SPLIT_FOLDERS[0])) and any(
            os.path.isdir(os.path.join(parent, s)) for s in SPLIT_FOLDERS[1:]):
        return (f"{root} is one split of the labelled set {parent}, whose train/ class folders give the labels the "
                f"evaluation trains on and its val/ (or test/) the images it scores: pass --data {parent}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and listed(e.name))
    if len(classes) < 2:
        return None
    shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
    return (f"{dm.name} has no class labels: the {len(classes)} folders in {root} ({shown}) are read as unlabelled "
            "images, since it has no train/ and val/ (or test/) split for the evaluation to train on and score. If they "
            f"are classes, arrange them as {root}/train/<class>/ and {root}/val/<class>/ (the same class folders in "
            "both); otherwise pass --data a labelled set (.npz, a recipe or 'digits').")


def _check_budgets(args, y_train: torch.Tensor, classes: list[str]) -> None:
    """Refuse a ``--labels`` budget that a class has too few training images for, before the work."""
    for budget in getattr(args, "labels", None) or ():
        budget.check(y_train, len(classes), classes)


def _features(args):
    from ssl_toolkit.eval import extract_features

    encoder, dm, info, device = _encoder_and_data(args)
    start = time.perf_counter()
    train = extract_features(encoder, dm, "train", device, args.batch_size)
    test = extract_features(encoder, dm, "test", device, args.batch_size)
    info = {**info, "train_size": len(train[1]), "test_size": len(test[1]),
            "extract_seconds": round(time.perf_counter() - start, 3)}
    return train, test, dm.splits.classes, info


def _clip(args, test_only: bool):
    """The CLIP model of ``--ckpt`` (a clear error for another method's checkpoint) and the data to score."""
    from ssl_toolkit.checkpoint import load_checkpoint, method_from_checkpoint
    from ssl_toolkit.methods import CLIP

    device = _device(args)
    ckpt = load_checkpoint(args.ckpt)
    model = method_from_checkpoint(ckpt, expected=CLIP).to(device)
    dm = resolve_data(args.data, ckpt, test_only, args.on_corrupt)
    return model, dm, _info(args, ckpt, dm, device), device


def _can_write(path: str, folder: bool = False, option: str = "--out") -> None:
    """Refuse an output path before the work that fills it (extracting features, training a probe, embedding a
    folder), not after: a file where a folder must be, a file's part of the path, or a folder this user may not
    write in (a colleague's read-only checkpoint folder, where results go by default)."""
    target = os.path.abspath(path)
    if not folder and path.endswith(("/", os.sep)):  # abspath drops the '/': the write failed after the work
        raise ValueError(f"cannot write {path!r}: a file is written here, and the path ends in '/', as a folder's "
                         f"does. Give a file name ({option}).")
    if os.path.exists(target) and os.path.isdir(target) != folder:
        raise ValueError(f"cannot write {path!r}: it is a {'file' if folder else 'folder'}, where a "
                         f"{'folder' if folder else 'file'} is written. Choose another path ({option}).")
    parent = target if folder and os.path.isdir(target) else os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write {path!r}: {parent!r} is a file, not a folder. Choose another path ({option}).")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write {path!r}: this user may not write in {parent!r}. Choose another path "
                         f"({option}).")


def _in_folder(out: str, name: str) -> str:
    """``out``, or ``out/name`` where ``out`` is a folder: one that exists, or a path ending in '/' (``--out exports/``
    had written ``exports/.safetensors``, a hidden file, and ``--out exports`` ``exports.safetensors`` beside it)."""
    return os.path.join(out, name) if out.endswith(("/", os.sep)) or os.path.isdir(out) else out


def _made(p: argparse.ArgumentParser, args: list[str]) -> dict:
    """What a result or export file needs to be reproduced or compared months later: the command line, when it ran
    (UTC) and the versions of ssl-toolkit and the libraries it ran on."""
    return {"command": shlex.join([*p.prog.split(), *args]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "versions": versions()}


def _parse_eval(p: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """An evaluation command's arguments (knn, probe, retrieval, zeroshot), with its precision set and its result
    path checked before the work (the default is next to the checkpoint)."""
    a = p.parse_args(args)
    a.made = functools.partial(_made, p, args)  # for the result JSON: what to run again, when, on what
    _use_precision(a)
    _can_write(a.out or a.ckpt + ".json")
    return a


def _write(args, command: str, result: dict, quiet: bool = False) -> None:
    """The result as JSON to ``--out`` or next to the checkpoint: ``<ckpt>.<command>.json`` on the checkpoint's own
    data, ``<ckpt>.<command>.<dataset>.json`` with another ``--data``, so scores on several sets all stay. It ends
    with :func:`_made` (the command line, the date, the versions), as exports do. The file is replaced whole (written beside, then renamed), so
    a job killed while writing leaves the previous version; ``quiet``: no "wrote" line."""
    dataset = re.sub(r"[^\w.-]+", "_", result["dataset"]) if args.data else None
    out = args.out or ".".join(filter(None, (args.ckpt, command, dataset, "json")))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # --out results/knn.json: results/ made
    with open(out + ".partial", "w") as f:
        json.dump({**result, **args.made()}, f, indent=2)
    os.replace(out + ".partial", out)
    if not quiet:
        print(f"wrote {out}")


def knn(args: list[str]) -> None:
    from ssl_toolkit.eval import knn_sweep

    p = _eval_parser("knn", "Weighted kNN top-1 (cosine, weights exp(s/T)) of a checkpoint's frozen encoder. Several "
                            "k and T are a sweep on the same features and one search.")
    p.add_argument("--k", type=_count, nargs="+", default=[20, 200], help="neighbours (default: 20 200)")
    p.add_argument("--temperature", type=_finite, nargs="+", default=[0.07],
                   help="vote temperature(s) T (default 0.07); the first is the one reported as top1")
    p.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"], help="search backend")
    p.add_argument("--fp16", action="store_true", help="keep the features in half precision (half the memory)")
    p.add_argument("--index", default="flat", choices=["flat", "ivf"], help="FAISS index: flat (exact, default) or "
                   "ivf (approximate; its neighbour recall against exact is reported)")
    p.add_argument("--nlist", type=_count, help="IVF cells (default sqrt(N), at most N / 39)")
    p.add_argument("--nprobe", type=_count, help="IVF cells searched per query (default 8)")
    _add_labels(p)
    a = _parse_eval(p, args)
    _parse_labels(a)
    if a.index != "ivf":
        _refuse_unused(a, ("--nlist", "--nprobe"), "the IVF index", "add --index ivf", "the default index is exact")
    a.nprobe = a.nprobe or 8
    train, test, classes, info = _features(a)
    num_classes = len(classes)
    over = sorted({k for k in a.k if k > len(train[1])})
    if over:  # the result was filed under the reduced k without a word: top1["200"] was missing from the JSON
        print(f"k={', '.join(map(str, over))}: more than the {len(train[1]):,} training images; scored as "
              f"k={len(train[1]):,} (all of them vote)")
    start = time.perf_counter()
    if a.index == "flat":
        sweep = knn_sweep(train[0], train[1], test[0], test[1], num_classes, tuple(a.k), tuple(a.temperature),
                          a.backend, a.fp16)
        seconds = round(time.perf_counter() - start, 3)
    else:  # one approximate search serves the sweep and, against the exact one, the recall
        from ssl_toolkit.eval.knn import knn_search, neighbour_recall, vote_sweep

        k_max = min(max(a.k), len(train[0]))
        sims, idx = knn_search(train[0], test[0], k_max, a.backend, a.fp16, index="ivf", nlist=a.nlist,
                               nprobe=a.nprobe)
        sweep = vote_sweep(sims, idx, train[1], test[1], num_classes, tuple(a.k), tuple(a.temperature))
        seconds = round(time.perf_counter() - start, 3)
        k = min(min(a.k), k_max)
        recall = neighbour_recall(idx[:, :k].cpu(), knn_search(train[0], test[0], k, "faiss", a.fp16)[1].cpu())
        info["ivf_recall_vs_exact"] = {"k": k, "recall": recall}
        print(f"IVF index: recall@{k} of the exact neighbours {100 * recall:.2f}%")
    first = sweep[a.temperature[0]]
    if len(sweep) == 1:
        for k, v in first.items():
            print(f"kNN top-1 (k={k}, T={a.temperature[0]}) on {info['dataset']}: {v:.2f}%")
    else:
        print(f"kNN top-1 (%) on {info['dataset']} ({info['train_size']} train / {info['test_size']} test):")
        print("  T \\ k " + "".join(f"{k:>8d}" for k in first))
        for t, row in sweep.items():
            print(f"  {t:<6g}" + "".join(f"{v:8.2f}" for v in row.values()))
    if a.labels:
        info["labels"] = _few_label_knn(a, train, test, classes, first)
    _write(a, "knn", {**info, "search_seconds": seconds, "fp16": a.fp16, "index": a.index,
                      "temperature": a.temperature[0],
                      "top1": {str(k): v for k, v in first.items()},
                      "sweep": {str(t): {str(k): v for k, v in row.items()} for t, row in sweep.items()}})


def _few_label_knn(a, train, test, classes: list[str], full: dict) -> dict:
    """``knn --labels``: the sweep with the labels of a few training images as the memory bank, drawn ``--draws``
    times per budget (exact search: the bank is a part of the one searched above)."""
    from ssl_toolkit.eval import knn_sweep

    num_classes = len(classes)

    def score(index):  # {T: {k: top1}} for the k of the full sweep, a k above the bank scored as all of it
        sweep = knn_sweep(train[0][index], train[1][index], test[0], test[1], num_classes, tuple(full),
                          tuple(a.temperature), a.backend, a.fp16)
        return {t: {k: row[min(k, len(index))] for k in full} for t, row in sweep.items()}

    drawn = _few_labels(a, train[1], classes, score)
    result, rows = {"draws": a.draws}, {}
    for budget, (images, draws) in drawn.items():
        sweep = {t: {k: _spread([d[t][k] for d in draws]) for k in draws[0][t]} for t in draws[0]}
        first = sweep[a.temperature[0]]
        result[budget] = {"train_size": images, "top1": {str(k): v for k, v in first.items()},
                          **({"sweep": {str(t): {str(k): v for k, v in row.items()} for t, row in sweep.items()}}
                             if len(sweep) > 1 else {})}
        rows[budget] = images, list(first.values())
        if max(full) > images:
            print(f"{budget}: k above its {images:,} labelled images is scored as k={images:,} (all of them vote)")
    _few_labels_table(a, f"kNN top-1 (%, T={a.temperature[0]:g})", [f"k={k}" for k in full], rows,
                      list(full.values()), len(train[1]))
    return result


def probe(args: list[str]) -> None:
    from ssl_toolkit.eval import linear_probe
    from ssl_toolkit.eval.linear_probe import augmented_linear_probe, finetune, linear_probe_sweep

    p = _eval_parser("probe", "Linear probe on cached frozen features of a checkpoint's encoder. Several --lr or "
                              "--weight-decay values train one head per pair at once and choose on a validation "
                              "split of train. --augment: the standard protocol on random crops; --finetune: the "
                              "backbone trained too.")
    p.add_argument("--epochs", type=_count, default=100, help="epochs over the cached features, or over the images "
                   "with --augment or --finetune (default 100)")
    p.add_argument("--lr", type=_finite, nargs="+", default=[0.1],
                   help="SGD learning rate(s) on standardised features (default 0.1)")
    p.add_argument("--weight-decay", type=_finite, nargs="+", default=[0.0], help="L2 penalty (default 0)")
    p.add_argument("--val-fraction", type=_finite, help="share of train held out to choose among several --lr or "
                   "--weight-decay (default 0.1)")
    p.add_argument("--augment", action="store_true", help="the standard protocol: random resized crops and flips "
                   "each epoch through the frozen backbone (slower: the backbone runs every epoch)")
    p.add_argument("--scale", type=_finite, nargs=2, help="crop area range with --augment or --finetune (default "
                   "0.08 1.0)")
    p.add_argument("--flip-p", type=_finite, help="flip probability with --augment or --finetune (default 0.5; 0 for "
                   "digits, text)")
    p.add_argument("--finetune", action="store_true", help="fine-tune: --augment's protocol with the backbone trained "
                   "too, at --backbone-lr times --lr (slower still: a backward pass through it); with --labels, "
                   "SimCLR's semi-supervised protocol")
    p.add_argument("--backbone-lr", type=_finite, help="with --finetune, the backbone's lr as a share of --lr "
                   "(default 0.1)")
    _add_labels(p)
    p.add_argument("--labels-only", action="store_true", help="with --labels and --augment or --finetune: train on "
                   "the budgets alone, not also on every label (which costs more than all the budgets together)")
    a = _parse_eval(p, args)
    _parse_labels(a)
    # options of a protocol this run does not use were ignored without a word, and the score read as theirs
    grid = len(a.lr) > 1 or len(a.weight_decay) > 1
    crops = "--finetune" if a.finetune else "--augment" if a.augment else None  # the protocols on random crops
    if a.val_fraction is not None and (not grid or crops):
        raise ValueError("--val-fraction holds out training images to choose among several --lr or --weight-decay "
                         "values" + (f", which {crops} does not do; leave it out." if crops else
                                     "; give several (e.g. --lr 0.01 0.1 1), or leave it out."))
    if not crops:
        _refuse_unused(a, ("--scale", "--flip-p"), "the random crops and flips of --augment's protocol", "add --augment",
                       "the default protocol trains on the features of the whole images, unflipped")
    if not a.finetune:
        _refuse_unused(a, ("--backbone-lr",), "the backbone's lr when fine-tuning", "add --finetune",
                       "the backbone stays frozen")
    if a.labels_only and not (a.labels and crops):
        raise ValueError("--labels-only skips the all-labels training of --augment or --finetune, to score --labels "
                         "alone; " + ("add --augment or --finetune (the fast protocol's all-labels score costs next "
                                      "to nothing and is always given)." if a.labels else "give --labels too."))
    a.val_fraction = 0.1 if a.val_fraction is None else a.val_fraction
    a.scale, a.flip_p = a.scale or [0.08, 1.0], 0.5 if a.flip_p is None else a.flip_p
    a.backbone_lr = 0.1 if a.backbone_lr is None else a.backbone_lr
    if a.labels and grid:
        raise ValueError("--labels trains with one --lr and one --weight-decay: choosing among several on held-out "
                         "labelled images would use labels beyond the budget (and 1 per class leaves none to hold "
                         "out). Choose them with all labels, or fix them as low-shot papers do.")
    if crops:
        from ssl_toolkit.eval import extract_features

        if grid:
            raise ValueError(f"{crops} trains one {'network' if a.finetune else 'probe'}; give one --lr and one "
                             "--weight-decay (sweep with the fast protocol, without --augment or --finetune, then use "
                             "the chosen values here).")
        if a.finetune and not 0 < a.backbone_lr:
            raise ValueError(f"--backbone-lr must be > 0 (the backbone's lr as a share of --lr); got {a.backbone_lr:g}."
                             " For a frozen backbone use --augment.")
        encoder, dm, info, device = _encoder_and_data(a)
        start = time.perf_counter()
        if a.finetune:  # each fine-tuned copy embeds the test split itself
            def augmented(index=None):
                return finetune(encoder, dm, a.epochs, a.lr[0], a.backbone_lr, a.weight_decay[0], a.batch_size,
                                device, tuple(a.scale), a.flip_p, train_index=index)
        else:
            test = extract_features(encoder, dm, "test", device, a.batch_size)  # once, for every probe trained here

            def augmented(index=None):
                return augmented_linear_probe(encoder, dm, a.epochs, a.lr[0], a.weight_decay[0], a.batch_size, device,
                                              tuple(a.scale), a.flip_p, train_index=index, test_features=test)

        protocol = "finetune" if a.finetune else "augmented"
        command = "finetune" if a.finetune else "probe-augmented"

        def result(acc, labels=None) -> dict:
            settings = {"protocol": protocol, "epochs": a.epochs, "lr": a.lr[0]}
            if a.finetune:
                settings["backbone_lr"] = a.backbone_lr
            return {**info, **({"labels": labels} if labels else {}), **settings, "weight_decay": a.weight_decay[0],
                    "scale": a.scale, "flip_p": a.flip_p, "train_seconds": round(time.perf_counter() - start, 3),
                    **(acc or {})}

        acc = None if a.labels_only else augmented()
        if acc:
            name = "fine-tuned" if a.finetune else "linear probe (augmented)"
            print(f"{name} on {info['dataset']}: top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}%")
        if a.labels:
            def after_draw(done):  # on disk as they finish: a job ended by its time limit keeps the draws it trained
                _write(a, command, {**result(acc, _probe_labels_json(a, done)), "unfinished": True}, quiet=True)

            if acc:
                after_draw({})
            info["labels"] = _few_label_probe(a, dm.splits.y_train, dm.splits.classes, acc, augmented, protocol,
                                              after_draw)
        _write(a, command, result(acc))
        return
    train, test, classes, info = _features(a)
    num_classes = len(classes)
    start = time.perf_counter()
    if not grid:
        acc = linear_probe(train[0], train[1], test[0], test[1], num_classes, epochs=a.epochs, lr=a.lr[0],
                           weight_decay=a.weight_decay[0])
        acc.update(lr=a.lr[0], weight_decay=a.weight_decay[0])
    else:
        acc = linear_probe_sweep(train[0], train[1], test[0], test[1], num_classes, tuple(a.lr), tuple(a.weight_decay),
                                 a.val_fraction, a.epochs)
        print(f"validation top-1 (%) on {acc['val_size']} training images held out:")
        print("  lr \\ wd " + "".join(f"{w:>9g}" for w in a.weight_decay))
        for lr, row in acc["grid"].items():
            print(f"  {lr:<8g}" + "".join(f"{v:9.2f}" for v in row.values()))
        print(f"chosen: lr {acc['lr']:g}, weight decay {acc['weight_decay']:g}; retrained on all of train")
        acc["grid"] = {str(lr): {str(w): v for w, v in row.items()} for lr, row in acc["grid"].items()}
    print(f"linear probe on {info['dataset']}: top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}%")
    if a.labels:
        def cached(index):
            return linear_probe(train[0][index], train[1][index], test[0], test[1], num_classes, epochs=a.epochs,
                                lr=a.lr[0], weight_decay=a.weight_decay[0], standardize_with=train[0])

        info["labels"] = _few_label_probe(a, train[1], classes, acc, cached)
    _write(a, "probe", {**info, "protocol": "cached features", "epochs": a.epochs,
                        "train_seconds": round(time.perf_counter() - start, 3), **acc})


def _probe_labels_json(a, results: dict) -> dict:
    """The result JSON's ``labels`` of ``probe --labels`` (``results`` from :func:`_few_labels`)."""
    return {"draws": a.draws, **{budget: {"train_size": images, **{m: _spread([d[m] for d in draws])
                                                                   for m in ("top1", "top5")}}
                                 for budget, (images, draws) in results.items() if draws}}


def _few_label_probe(a, train_y: torch.Tensor, classes: list[str], full: dict, score, protocol: str = "",
                     after_draw=None) -> dict:
    """``probe --labels``: ``score(index)``, a probe (``protocol`` "augmented"; "finetune": the whole network)
    trained on the labels of the training images at ``index`` alone, for ``--draws`` draws of each budget
    (``after_draw``: see :func:`_few_labels`)."""
    result = _probe_labels_json(a, _few_labels(a, train_y, classes, score, after_draw))
    rows = {budget: (r["train_size"], [r["top1"], r["top5"]]) for budget, r in result.items() if budget != "draws"}
    settings = (f"lr {a.lr[0]:g}, " + (f"backbone x{a.backbone_lr:g}, " if protocol == "finetune" else "")
                + f"weight decay {a.weight_decay[0]:g}")
    title = {"finetune": f"fine-tuning ({settings})",
             "augmented": f"linear probe (augmented, {settings})"}.get(protocol, f"linear probe ({settings})")
    _few_labels_table(a, title, ["top-1", "top-5"], rows, full and [full["top1"], full["top5"]], len(train_y))
    return result


def retrieval(args: list[str]) -> None:
    from ssl_toolkit.eval import retrieval_recall

    p = _eval_parser("retrieval", "Image->text and text->image recall@K of a CLIP checkpoint on held-out captions.")
    p.add_argument("--k", type=_count, nargs="+", default=[1, 5, 10], help="K of recall@K (default: 1 5 10)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="images to search (default: test)")
    a = _parse_eval(p, args)
    model, dm, info, device = _clip(a, test_only=a.split == "test")
    if not hasattr(dm, "captions"):
        raise ValueError(f"--data {a.data!r} has no captions; retrieval needs a caption folder (captions.txt + images/) "
                         "or a recipe with a CaptionDataModule.")
    result = retrieval_recall(model, dm, a.split, device, a.k, a.batch_size)
    for k in a.k:
        print(f"recall@{k} on {info['dataset']} {a.split}: image->text {result[f'i2t_r{k}']:.2f}%, "
              f"text->image {result[f't2i_r{k}']:.2f}%")
    _write(a, "retrieval", {**info, "split": a.split, **result})


def zeroshot(args: list[str]) -> None:
    from ssl_toolkit.eval import zero_shot
    from ssl_toolkit.eval.retrieval import DEFAULT_TEMPLATES

    p = _eval_parser("zeroshot", "Zero-shot classification of a CLIP checkpoint from prompts built on class names.")
    p.add_argument("--template", action="append", help="prompt with {} for the class name; repeat to average several "
                                                        f"(default: {DEFAULT_TEMPLATES[0]!r})")
    a = _parse_eval(p, args)
    if a.data is None:
        raise ValueError("zeroshot needs a labelled --data (an .npz file, an image folder, a recipe or 'digits'); "
                         "its class names make the prompts.")
    model, dm, info, device = _clip(a, test_only=True)
    if not dm.splits.classes:  # was "the dataset has none"
        raise ValueError(f"Zero-shot classification makes its prompts from class names; {dm.name} has none "
                         "(unlabelled images, or image-caption data). Pass --data a labelled set: a folder of class "
                         "folders (DIR/<class>/*, as ImageNet's val/), an .npz file with labels, a recipe or 'digits'.")
    templates = a.template or list(DEFAULT_TEMPLATES)
    result = zero_shot(model, dm, templates, "test", device, a.batch_size)
    print(f"zero-shot on {info['dataset']} ({dm.num_classes} classes): top-1 {result['top1']:.2f}%, "
          f"top-5 {result['top5']:.2f}%, mean per class {result['mean_per_class']:.2f}%")
    _write(a, "zeroshot", {**info, "templates": templates, "classes": dm.splits.classes, **result})


def pictures(args: list[str]) -> None:
    p = _eval_parser("pictures", "Write PNG grids of a checkpoint's training views (jigsaw puzzles, rotations, masked "
                                 "inputs) and, for the context encoder and colorization, their inpainting and "
                                 "colours of test images.")
    p.add_argument("--num", type=_count, default=16, help="test images to show (default 16)")
    a = p.parse_args(args)
    _can_write(a.out or f"{a.ckpt}.pictures", folder=True)
    from ssl_toolkit.checkpoint import load_checkpoint, method_from_checkpoint
    from ssl_toolkit.eval import save_pictures, view_pictures

    _use_precision(a)
    device = _device(a)
    ckpt = load_checkpoint(a.ckpt)
    model = method_from_checkpoint(ckpt).to(device)
    dm = resolve_data(a.data, ckpt, test_only=True, on_corrupt=a.on_corrupt)
    images, _ = next(dm.iter_split("test", a.num))
    torch.manual_seed(0)
    for path in save_pictures(view_pictures(model, images), a.out or f"{a.ckpt}.pictures"):
        print(f"wrote {path}")


def export(args: list[str]) -> None:
    from ssl_toolkit.export import FORMATS, export as export_backbone

    p = _parser("export", "Write a checkpoint's backbone so it loads without this toolkit, with a JSON that says how "
                          "to prepare an image.", device=False)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="torchvision (ResNet state_dict), safetensors (weights), torchscript or onnx (whole encoder: "
                        "uint8 images in, features out)")
    p.add_argument("--out", type=_path,
                   help="output path, the format's suffix added when missing, or a folder to write the default "
                        "name in (default: next to the checkpoint: <ckpt>.onnx, <ckpt>.safetensors, "
                        "<ckpt>.torchscript.pt, <ckpt>.torchvision.pth); the JSON is that path + .json")
    a = p.parse_args(args)
    from ssl_toolkit.checkpoint import load_checkpoint

    out = _in_folder(a.out, f"{os.path.basename(a.ckpt)}.{a.format}") if a.out else f"{a.ckpt}.{a.format}"
    _can_write(out)
    ckpt = load_checkpoint(a.ckpt)
    made = {"checkpoint": os.path.abspath(a.ckpt), "global_step": ckpt.get("global_step"), **_made(p, args)}
    for path in export_backbone(ckpt, a.format, out, made):
        print(f"wrote {path}")


def embed(args: list[str]) -> None:
    p = _parser("embed", "Embed every image of a folder (recursive) with a checkpoint's encoder: embeddings.npy "
                         "(L2-normalised), paths.txt, meta.json.")
    p.add_argument("--images", type=_path, required=True, help="folder of images; a subfolder per class adds labels")
    p.add_argument("--out", type=_path, required=True, help="folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored precision")
    _add_on_corrupt(p)
    p.add_argument("--workers", type=functools.partial(_count, least=0),
                   help="decoding processes (default: one per CPU core; 0: this process)")
    p.add_argument("--batch-size", type=_count, default=256, help="images per forward pass")
    p.add_argument("--space", default="backbone", choices=["backbone", "joint"],
                   help="backbone: the encoder's features (default); joint: a CLIP checkpoint's image-text space, "
                        "where `search --text` finds images by a caption")
    _add_precision(p)
    a = p.parse_args(args)
    _can_write(a.out, folder=True)  # before the folder is embedded
    from ssl_toolkit.checkpoint import backbone_fingerprint, load_checkpoint
    from ssl_toolkit.eval.search import (embed_paths, folder_labels, image_embedder, list_images, save_embeddings,
                                         stale_indexes)
    from ssl_toolkit.export import metadata

    _use_precision(a)
    device = _device(a)
    ckpt = load_checkpoint(a.ckpt)
    paths = [os.path.abspath(p) for p in list_images(a.images)]  # absolute: search and its gallery work anywhere
    size = ckpt["hyper_parameters"]["views"]["crop_size"]
    start = time.perf_counter()
    embedder = image_embedder(ckpt, a.space)
    emb, kept = embed_paths(embedder, paths, size, device, a.batch_size, a.workers, a.on_corrupt, where=a.images)
    labelled = folder_labels(a.images, kept)
    meta = {**metadata(ckpt, "embeddings", int(emb.shape[1])), "checkpoint": os.path.abspath(a.ckpt),
            "space": a.space, "fingerprint": backbone_fingerprint(ckpt, a.space), "images": os.path.abspath(a.images),
            "image_size": size, "skipped": len(paths) - len(kept), "classes": labelled[0] if labelled else None,
            "precision": a.precision}
    digest = save_embeddings(a.out, emb, kept, meta, a.dtype, labelled[1] if labelled else None)
    n = len(kept)
    print(f"embedded {n:,} image{'s' * (n != 1)} ({len(paths) - n:,} skipped) to {emb.shape[1]}-d"
          f"{' (CLIP image-text space)' if a.space == 'joint' else ''} in "
          f"{time.perf_counter() - start:.1f} s{f'; {len(labelled[0])} classes' if labelled else ''}: wrote {a.out}")
    stale = stale_indexes(a.out, digest)
    if stale:
        print(f"{', '.join(stale)} in {a.out} hold{'s' * (len(stale) == 1)} the embeddings this replaced; build "
              f"{'it' if len(stale) == 1 else 'them'} again for search: ssl-toolkit index --embeddings {a.out}")


def index(args: list[str]) -> None:
    p = _parser("index", "Build a FAISS index over an embeddings folder (cosine). With class labels it also reports "
                         "leave-one-out recall@k and mAP.", ckpt=False, device=False)
    p.add_argument("--embeddings", type=_path, required=True, help="folder written by `ssl-toolkit embed`")
    p.add_argument("--type", default="flat", choices=["flat", "ivf"], help="flat (exact, default) or ivf (approximate)")
    p.add_argument("--nlist", type=_count, help="IVF cells (default: sqrt(N), at most N / 39)")
    p.add_argument("--nprobe", type=_count, help="IVF cells searched per query (default 8)")
    p.add_argument("--out", type=_path, help="index file, or a folder to write the default name in (default: "
                                 "EMBEDDINGS/index.faiss, or EMBEDDINGS/index-ivf.faiss for ivf, "
                                 "so building both keeps both)")
    a = p.parse_args(args)
    if a.type != "ivf":
        _refuse_unused(a, ("--nlist", "--nprobe"), "the IVF index", "add --type ivf", "the default index is exact")
    a.nprobe = a.nprobe or 8
    from ssl_toolkit.eval.search import build_index, faiss, load_embeddings, recall_against_exact, retrieval_metrics

    name = "index.faiss" if a.type == "flat" else "index-ivf.faiss"
    out = _in_folder(a.out, name) if a.out else os.path.join(a.embeddings, name)
    _can_write(out)  # faiss's own error came as a RuntimeError traceback, after building the index
    emb, paths, meta = load_embeddings(a.embeddings)
    idx = build_index(emb, a.type, a.nlist, a.nprobe)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    faiss.write_index(idx, out)
    info = {"embeddings": os.path.abspath(a.embeddings), "type": a.type, "count": len(paths), "dim": meta["dim"],
            "checkpoint": meta["checkpoint"], "fingerprint": meta["fingerprint"], "image_size": meta["image_size"],
            "space": meta.get("space", "backbone"), "embeddings_digest": meta.get("digest")}
    if a.type == "ivf":
        info.update(nlist=idx.nlist, nprobe=idx.nprobe, recall_at_10_vs_exact=recall_against_exact(idx, emb))
        print(f"IVF index ({idx.nlist} cells, nprobe {idx.nprobe}): recall@10 against exact search "
              f"{100 * info['recall_at_10_vs_exact']:.1f}%")
    if meta["labels"] is not None:
        m = retrieval_metrics(torch.from_numpy(emb), torch.from_numpy(meta["labels"]))
        info["retrieval"] = {**m, "mAP_per_class": {meta["classes"][c]: v for c, v in m["mAP_per_class"].items()}}
        print(f"leave-one-out retrieval over {m['queries']} queries: " + ", ".join(
            f"{k} {m[k]:.2f}%" for k in ("recall@1", "recall@5", "recall@10", "mAP")))
    with open(out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    print(f"wrote {out} ({len(paths)} x {meta['dim']}) and {out}.json")


def search(args: list[str]) -> None:
    p = _parser("search", "Nearest images of a query image (or a folder of queries), or with a CLIP checkpoint of "
                          "a caption, in an index; prints them with scores and writes a gallery.", ckpt=False)
    p.add_argument("--index", type=_path, required=True, help="index file written by `ssl-toolkit index`")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", type=_path, help="an image, or a folder of query images")
    query.add_argument("--text", nargs="+", help="captions to find images of ('a dog on the grass'), each a query: "
                                                 "the index of a CLIP checkpoint's `embed --space joint`")
    p.add_argument("-k", type=_count, default=10, help="neighbours per query (default 10)")
    p.add_argument("--ckpt", type=_path,
                   help="checkpoint to embed the queries (default: the one the index was built from)")
    p.add_argument("--out", type=_path, help="gallery: .html (default: INDEX.gallery.html) or .png")
    p.add_argument("--include-query", action="store_true",
                   help="list a query that is one of the indexed images as its own first neighbour (by default it "
                        "is left out, and the k neighbours are other images)")
    _add_on_corrupt(p)
    a = p.parse_args(args)
    if a.include_query and a.text:
        p.error("--include-query is for image queries; --text captions are not in the index")
    from ssl_toolkit.checkpoint import backbone_fingerprint, load_checkpoint
    from ssl_toolkit.data.images import decode_files
    from ssl_toolkit.eval.search import (embed_paths, embed_texts, faiss, image_embedder, index_paths, list_images,
                                         neighbour_lists, write_gallery)

    if not os.path.isfile(a.index) or not os.path.isfile(a.index + ".json"):
        raise FileNotFoundError(f"No index at {a.index!r} (with its .json). Build one with: ssl-toolkit index "
                                "--embeddings FOLDER")
    if a.query is not None and not os.path.exists(a.query):
        raise FileNotFoundError(f"--query {a.query!r} does not exist. Pass an image, or a folder of images.")
    with open(a.index + ".json") as f:
        info = json.load(f)
    space = info.get("space", "backbone")
    if a.text and space != "joint":
        raise ValueError(f"--text compares captions with images in a CLIP checkpoint's image-text space; this index "
                         f"holds the encoder features of {info['checkpoint']}. Embed with a CLIP checkpoint and "
                         "--space joint (ssl-toolkit embed --ckpt CLIP.ckpt --images DIR --out FOLDER --space joint), "
                         "then index that folder.")
    idx = faiss.read_index(a.index)
    paths = index_paths(a.index, info, idx.ntotal)  # before the queries are embedded
    given = a.ckpt or info["checkpoint"]
    if not a.ckpt and not os.path.exists(given):  # the generic message did not name --ckpt
        raise FileNotFoundError(f"The index was built with the checkpoint {given}, which is not there any more (moved, "
                                "or on another machine). Pass it, or a copy, with --ckpt: its weights are checked "
                                "against the index's.")
    ckpt = load_checkpoint(given)
    if backbone_fingerprint(ckpt, space) != info["fingerprint"]:
        raise ValueError(f"The index was built from other weights ({info['checkpoint']}, fingerprint "
                         f"{info['fingerprint']}); {given} has {backbone_fingerprint(ckpt, space)}. Query with the "
                         "checkpoint the index was built from, or re-run ssl-toolkit embed and index.")
    if a.text:
        emb, kept = embed_texts(ckpt, a.text, _device(a)), a.text
    else:
        queries = list_images(a.query) if os.path.isdir(a.query) else [a.query]
        unreadable = [] if os.path.isdir(a.query) else decode_files(queries, 8, 0)[2]  # one: skipping leaves none
        if unreadable:  # was "1 of 1 images ... could not be read ... or set --on-corrupt skip", then "None of the 1"
            raise ValueError(f"--query {a.query!r} cannot be read as an image ({unreadable[0][1]}). Pass an image "
                             "file, or a folder of images.")
        emb, kept = embed_paths(image_embedder(ckpt, space), queries, info["image_size"], _device(a),
                                on_corrupt=a.on_corrupt, where=a.query)
    if emb.shape[1] != idx.d:
        raise ValueError(f"The checkpoint gives {emb.shape[1]}-d embeddings but the index holds {idx.d}-d ones; "
                         "query with the checkpoint the index was built from.")
    leave_out = not (a.text or a.include_query)  # one more, in case the query itself is among them
    scores, ids = idx.search(emb.numpy(), min(a.k + leave_out, idx.ntotal))
    found, own = neighbour_lists(kept, scores, ids, paths, a.k, leave_out)
    for q, row in zip(kept, found):
        print(f"query: {json.dumps(q) if a.text else q}")
        for rank, (path, score) in enumerate(row, 1):
            print(f"  {rank:3d}. {score:.4f}  {path}")
        if not row:
            print("  (no other images in the index)")
    if own == len(kept) == 1:
        print("the query is one of the indexed images, left out of its own neighbours (--include-query lists it)")
    elif own:
        print(f"{own} of the {len(kept)} queries are indexed images, each left out of its own neighbours "
              "(--include-query lists them)")
    print(f"wrote {write_gallery(a.out or a.index + '.gallery.html', kept, found, texts=bool(a.text))}")


def map_(args: list[str]) -> None:
    p = _parser("map", "A 2-D map (t-SNE or PCA, scikit-learn) of an embeddings folder as a PNG coloured by class, "
                       "and optionally the TensorBoard embedding projector with image sprites.", ckpt=False, device=False)
    p.add_argument("--embeddings", type=_path, required=True, help="folder written by `ssl-toolkit embed`")
    p.add_argument("--method", default="tsne", choices=["tsne", "pca"], help="projection (default tsne)")
    p.add_argument("--out", type=_path, help="PNG path, or a folder to write map.png in (default: EMBEDDINGS/map.png)")
    p.add_argument("--tensorboard", type=_path,
                   help="also write the projector here (view with tensorboard --logdir DIR)")
    p.add_argument("--max-points", type=functools.partial(_count, least=0),
                   help="images the map draws: a random sample (seeded) of a larger folder (default 10000: t-SNE took "
                        "40 s for 10,000 on 2 CPU cores, and grows faster than the count; 0: all); the projector "
                        "holds all of them")
    a = p.parse_args(args)
    from ssl_toolkit.eval.search import embedding_map, load_embeddings, map_sample, save_map, write_projector

    out = _in_folder(a.out or a.embeddings, "map.png")  # --out emb/ had written emb.png, as "emb"
    out += "" if os.path.splitext(out)[1] else ".png"  # as matplotlib saves it, and said so
    _can_write(out)  # before the map is computed
    if a.tensorboard:
        _can_write(a.tensorboard, folder=True, option="--tensorboard")  # was a traceback after the PNG was written
    emb, paths, meta = load_embeddings(a.embeddings)
    start = time.perf_counter()
    rows = map_sample(len(emb), a.max_points)
    xy = embedding_map(emb[rows], a.method)
    drawn = f"{len(rows):,} of {len(paths):,}" if len(rows) < len(paths) else f"{len(paths):,}"
    title = f"{meta['method'].rpartition('.')[2]} {meta['backbone']['name']}: {drawn} images ({a.method})"
    labels = meta["labels"][rows] if meta["labels"] is not None else None
    out = save_map(xy, out, labels, meta["classes"], title)
    print(f"wrote {out} ({a.method} of {drawn} images in {time.perf_counter() - start:.1f} s)")
    if a.tensorboard:
        sprites = write_projector(a.tensorboard, emb, paths, meta["labels"], meta["classes"])
        print(f"wrote the TensorBoard projector to {a.tensorboard}" + ("" if sprites else " (no image sprites: more "
              "than 8192 images or unreadable ones)"))


COMMANDS = {"pretrain": pretrain, "knn": knn, "probe": probe, "retrieval": retrieval, "zeroshot": zeroshot,
            "pictures": pictures, "export": export, "embed": embed, "index": index, "search": search,
            "map": map_}


def _run(cmd, args: list[str]) -> None:
    """Every command says how far its long loops are on stderr (``reporting_progress``): decoding an image folder,
    feature extraction, the augmented probe, embedding a folder. (Lightning shows training's own progress, and the
    training callbacks' evaluations stay silent.)"""
    from ssl_toolkit.progress import reporting_progress

    with reporting_progress():
        return cmd(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print_versions()
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"ssl-toolkit: unknown command {argv[0]!r}.\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        contextvars.copy_context().run(_run, cmd, argv[1:])  # what a command sets (eval precision) ends with it
    except RunStopped as e:
        if not e.quiet:
            print(f"ssl-toolkit {argv[0]}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C in an evaluation or search command: nothing half-written to report
        print(f"\nssl-toolkit {argv[0]}: interrupted (Ctrl-C).", file=sys.stderr)
        return 130
    except (CheckpointError, ConfigError, FileNotFoundError, ImportError, KeyError, NonFiniteLossError,
            ValueError) as e:
        if os.environ.get("SSL_TOOLKIT_DEBUG"):
            raise
        print(f"ssl-toolkit {argv[0]}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # torch.OutOfMemoryError (a GPU's) is one; the CPU allocator's is a plain RuntimeError
        if os.environ.get("SSL_TOOLKIT_DEBUG") or not (isinstance(e, torch.OutOfMemoryError)
                                                       or "can't allocate memory" in str(e)):
            raise
        where, detail = "GPU" if isinstance(e, torch.OutOfMemoryError) else "CPU", str(e).strip().splitlines()[0]
        detail = detail[max(detail.find("DefaultCPUAllocator"), 0):]  # not "[enforce fail at alloc_cpu.cpp:127] ..."
        print(f"ssl-toolkit {argv[0]}: error: out of {where} memory ({detail}). Lower the batch "
              "size (data.batch_size for pretrain, --batch-size for the other commands), the image or crop size, or "
              "the model, or run where there is more memory.", file=sys.stderr)
        return 1
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:  # an output path: was a
        if os.environ.get("SSL_TOOLKIT_DEBUG"):  # traceback ending in "[Errno 17] File exists: 'emb'"
            raise
        why = {FileExistsError: "a file is where a folder has to be made", NotADirectoryError: "a part of the path "
               "is a file, not a folder", IsADirectoryError: "it is a folder, where a file is written",
               PermissionError: "this user may not write there"}[type(e)]
        print(f"ssl-toolkit {argv[0]}: error: cannot write {e.filename!r}: {why}. Choose another path.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
