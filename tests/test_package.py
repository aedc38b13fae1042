"""Package-wide checks of how the toolkit's classes sit on torch's and Lightning's."""

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys

import pytest

from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.methods import SimCLR

import ssl_toolkit


def _toolkit_classes() -> list[type]:
    classes = {}
    for info in pkgutil.walk_packages(ssl_toolkit.__path__, "ssl_toolkit."):
        for _, cls in inspect.getmembers(importlib.import_module(info.name), inspect.isclass):
            if cls.__module__.startswith("ssl_toolkit."):
                classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(classes.values())


def _incompatible_overrides(cls: type) -> list[str]:
    """Methods of ``cls`` named like a base class's that the base's callers cannot call with the base's arguments."""
    found = []
    for name, fn in vars(cls).items():
        if name.startswith("__") or not inspect.isfunction(fn):
            continue
        base = next((b for b in cls.__mro__[1:] if name in vars(b)), None)
        if base is None or not callable(vars(base)[name]):
            continue
        try:
            theirs = inspect.signature(vars(base)[name])
        except (TypeError, ValueError):  # a builtin without a signature
            continue
        params = theirs.parameters.values()
        if any(p.kind is p.VAR_POSITIONAL for p in params):  # forward(*input), hooks(*args): anything goes
            continue
        required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        try:
            inspect.signature(fn).bind(*range(len(required)))
        except TypeError as e:
            found.append(f"{cls.__module__}.{cls.__qualname__}.{name}{inspect.signature(fn)} overrides "
                         f"{base.__module__}.{base.__qualname__}.{name}{theirs}: {e}")
    return found


def test_no_method_shadows_a_base_class_method_its_callers_cannot_call():
    """A method named like one of its base's (torch's nn.Module, Lightning's, the toolkit's own) is what the base's
    callers reach. Two such collisions broke real use: the views' ``apply(images, params)`` made ``model.apply(fn)``,
    PyTorch's idiom for custom initialisation, a TypeError on every contrastive method, and the image folder's
    ``_split(split_dir, classes)`` stopped training on image folders at the first batch."""
    classes = _toolkit_classes()
    assert len(classes) >= 50  # 60 today: the walk found the package
    bad = [line for cls in classes for line in _incompatible_overrides(cls)]
    assert not bad, "\n".join(bad)


def test_module_apply_reaches_every_submodule():
    model = SimCLR(BackboneConfig("tiny_cnn", width=4))
    seen = []
    model.apply(seen.append)
    assert len(seen) == len(list(model.modules())) and model.view_policy in seen


@pytest.mark.parametrize("package", ["ssl_toolkit", "ssl_toolkit.data", "ssl_toolkit.eval"])
def test_every_exported_name_loads_from_the_package(package):
    """The packages' names load on first use: each one in ``__all__`` resolves to the object its module defines
    (a typo in the table would surface only in a user's import), none is also the name of one of the package's
    modules (importing that module would make the name read as the module), and an unknown name is an
    AttributeError."""
    pkg = importlib.import_module(package)
    eager = {"ssl_toolkit": set(), "ssl_toolkit.data": set(),
             "ssl_toolkit.eval": {"linear_probe", "train_linear"}}[package]
    assert sorted(pkg.__all__) == sorted(set(pkg._HOME) | eager)
    assert not set(pkg._HOME) & {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    for name in pkg.__all__:
        obj = getattr(pkg, name)
        assert obj.__name__ == name and obj.__module__.startswith("ssl_toolkit.")
    assert set(pkg.__all__) <= set(dir(pkg))
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'SimCRL'"):
        pkg.SimCRL
    assert ssl_toolkit.SimCLR is SimCLR and ssl_toolkit.BackboneConfig is BackboneConfig


def test_help_and_the_losses_do_not_import_lightning_kornia_or_torchvision():
    """``ssl-toolkit --help`` imported every method, Lightning and Kornia first (7.5 s on 2 CPU cores, 2 s now), and
    ``import ssl_toolkit.losses`` did too, though the losses need only torch. So did every command's ``--help`` and
    a wrong flag (6.3-7 s), and main itself, for the exceptions it reports; ``pretrain`` alone needs them, since
    its parser is made from the classes. ``export --help`` imported torchvision (4.4-5.0 s, 2.0-2.5 s now).
    ``--version`` imported all three for their versions (6.9 s, 2.5 s now)."""
    code = ("import sys, contextlib, io\n"
            "from ssl_toolkit.cli import COMMANDS, main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out: assert main(['--help']) == 0\n"
            "assert 'pretrain' in out.getvalue()\n"
            "import ssl_toolkit.losses, ssl_toolkit.distributed\n"
            "heavy = ('pytorch_lightning', 'lightning_fabric', 'kornia', 'torchvision')\n"
            "print(sorted(m for m in (*heavy, 'faiss') if m in sys.modules))\n"
            "for cmd in sorted(set(COMMANDS) - {'pretrain'}):\n"
            "    for flags in (['--help'], ['--no-such-flag']):\n"
            "        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:\n"
            "            try: main([cmd, *flags])\n"
            "            except SystemExit as e: code = e.code\n"
            "        assert code == (0 if flags == ['--help'] else 2), (cmd, flags, code)\n"
            "        assert ('usage: ssl-toolkit ' + cmd) in out.getvalue() + err.getvalue(), (cmd, flags)\n"
            "    print(cmd, sorted(m for m in heavy if m in sys.modules))\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out: assert main(['--version']) == 0\n"
            "print('--version', sorted(m for m in heavy if m in sys.modules))\n"
            "print(out.getvalue())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "[]"
    assert lines[1:12] == [f"{cmd} []" for cmd in sorted({"knn", "probe", "retrieval", "zeroshot", "pictures",
                                                           "export", "embed", "index", "search", "map"})] + \
        ["--version []"]
    from importlib.metadata import version

    assert {f"{dist} {version(dist)}" for dist in ("torchvision", "pytorch-lightning", "kornia")} <= set(lines[12:])


def test_pretrain_knows_every_datamodule_and_callback_in_a_fresh_process():
    """LightningCLI lists and resolves by short name the subclasses that are imported. ssl_toolkit.data's names load
    on first use, and with only InMemoryDataModule imported, `--data NpzDataModule` was "not accessible or invalid"
    and `--help` listed no DataModule (unless the recipe named one by its path); nor did it list the toolkit's
    callbacks (since the top package's names load on first use), which resolved only when the recipe imported them."""
    code = ("import sys, contextlib, io\n"
            "from ssl_toolkit.cli import main\n"
            "for args in (['--help'], ['--model', 'SimCLR', '--data', 'NpzDataModule', '--data.path', 'x.npz',\n"
            "                          '--trainer.callbacks+=OnlineProbe', '--print_config']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try: main(['pretrain', *args])\n"
            "        except SystemExit as e: assert e.code == 0, e.code\n"
            "    print(out.getvalue())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = re.search(r"known subclasses: ssl_toolkit.InMemoryDataModule,([^)]*)\)", done.stdout).group(1).split()
    assert sorted(c.strip(",") for c in listed) == [f"ssl_toolkit.{c}DataModule" for c in
                                                    ("CIFAR", "Caption", "Digits", "ImageFolder", "Npz")], listed
    assert "data:\n  class_path: ssl_toolkit.NpzDataModule\n  init_args:\n    path: x.npz\n" in done.stdout
    assert "  callbacks:\n  - class_path: ssl_toolkit.eval.OnlineProbe\n" in done.stdout
    callbacks = done.stdout[done.stdout.index("--trainer.callbacks CALLBACKS, "):]  # the option, not the usage
    callbacks = re.sub(r"\s+", "", callbacks[:callbacks.index("--trainer.fast_dev_run")])  # help wraps mid-name
    for name in ("KNNCallback", "OnlineProbe", "RetrievalCallback", "CollapseMonitor", "PicturesCallback", "Compile"):
        assert re.search(rf"ssl_toolkit\.(eval\.)?{name}[,)]", callbacks), (name, callbacks)


def test_the_checkpoint_module_still_answers_for_what_moved_to_saving():
    """Writing checkpoints (Lightning) moved to ssl_toolkit.saving so that reading them needs no Lightning; a run
    config written before names ``ssl_toolkit.checkpoint.AtomicCheckpointIO`` as its plugin, and resolves as before."""
    import ssl_toolkit.checkpoint as checkpoint
    import ssl_toolkit.saving as saving
    from ssl_toolkit.checkpoint import import_class

    assert sorted(checkpoint._HOME) == ["AtomicCheckpointIO", "StopAndSave", "keep_stopped_epoch_open",
                                        "save_final_checkpoint", "save_last"]
    for name in checkpoint._HOME:
        assert getattr(checkpoint, name) is getattr(saving, name) and name in checkpoint.__all__
    assert import_class("ssl_toolkit.checkpoint.AtomicCheckpointIO") is saving.AtomicCheckpointIO
