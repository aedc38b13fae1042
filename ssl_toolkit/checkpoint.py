"""Reading toolkit checkpoints: the encoder and the data they were trained on, from the file alone."""

import hashlib
import importlib
import json
import os
import re
from typing import TYPE_CHECKING

import torch

from ssl_toolkit._lazy import lazy_names
from ssl_toolkit.backbones import Encoder, build_backbone
from ssl_toolkit.errors import CheckpointError, RunStopped
from ssl_toolkit.paths import expand

# Writing checkpoints while training needs Lightning; reading them does not (embed, search, export). These names
# live in ssl_toolkit.saving and load from here on first use, so that run configs naming
# ssl_toolkit.checkpoint.AtomicCheckpointIO keep working.
_HOME, __getattr__, __dir__ = lazy_names(__name__, {
    "ssl_toolkit.saving": ("AtomicCheckpointIO", "StopAndSave", "keep_stopped_epoch_open", "save_final_checkpoint",
                           "save_last"),
})

__all__ = ["CheckpointError", "RunStopped", "backbone_fingerprint", "check_resume", "datamodule_from_checkpoint",
           "encoder_from_checkpoint", "import_class", "load_backbone", "load_backbone_weights", "load_checkpoint",
           "method_from_checkpoint", "resume_differences",
           "AtomicCheckpointIO", "StopAndSave", "keep_stopped_epoch_open", "save_final_checkpoint", "save_last"]

if TYPE_CHECKING:  # what editors and type checkers read
    from ssl_toolkit.saving import (AtomicCheckpointIO, StopAndSave, keep_stopped_epoch_open, save_final_checkpoint,
                                    save_last)


def backbone_fingerprint(ckpt: dict, space: str = "backbone") -> str:
    """SHA-256 of a checkpoint's backbone weights: which weights made an embedding or an export, wherever the file
    moved. In the ``joint`` space CLIP's image projection counts too (LiT runs from one locked tower share the
    backbone)."""
    prefixes = ("backbone.",) if space == "backbone" else ("backbone.", "image_proj.")
    h = hashlib.sha256()
    for k, t in sorted(ckpt["state_dict"].items()):
        if k.startswith(prefixes):
            h.update(k.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _exported_from(path: str) -> str | None:
    """What to pass instead of a file ``ssl-toolkit export`` wrote (its ``<file>.json`` beside it says so), or None."""
    from ssl_toolkit.export import FORMATS

    try:
        with open(path + ".json") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS or "method" not in meta:
        return None
    source = meta.get("checkpoint") or f"the {str(meta['method']).rpartition('.')[2]} checkpoint it was made from"
    return (f"{path} is an `ssl-toolkit export` of a backbone ({meta['format']}), for use without the toolkit; the "
            f"toolkit's commands take the pretraining checkpoint itself: pass {source}.")


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` and check it is one of this toolkit's."""
    path = expand(path)  # a recipe's model.image_checkpoint: ~/runs/simclr/.../last.ckpt
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint at {os.path.abspath(path)!r}. Pass the .ckpt file pretraining wrote "
                                "(it prints the path when it ends; look under runs/*/version_*/checkpoints/).")
    exported = _exported_from(path)  # a TorchScript file was torch.load's advice to load it with weights_only=False
    if exported:
        raise CheckpointError(exported)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's unpickler on a file that is not a checkpoint: UnpicklingError, RuntimeError,
        # EOFError, and for some text files KeyError ("hello": 101) or IndexError ("a,b": pop from empty list)
        # torch's weights-only refusal opens with paragraphs of advice to load with weights_only=False; its reason
        # comes after "WeightsUnpickler error:"
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        reason = found.group(1) if found else str(e).strip().split("\n")[0]
        other = re.match(r"Unsupported global: GLOBAL (\S+)", reason)
        if other:  # a file another program pickled its own objects into: a checkpoint of another library
            raise CheckpointError(
                f"{path} is not an ssl-toolkit pretraining checkpoint: it holds a Python object ({other.group(1)}), "
                "as the toolkit's checkpoints never do (another library's checkpoint?), and was not loaded, since "
                "unpickling it would run code. Pass a checkpoint written by `ssl-toolkit pretrain`.") from None
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {reason}); the file is truncated or not a "
                              "PyTorch checkpoint. Use another checkpoint of the run (e.g. last.ckpt).") from None
    if not isinstance(ckpt, dict) or "ssl_toolkit" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an ssl-toolkit pretraining checkpoint (no 'ssl_toolkit' metadata). "
                              "Pass a checkpoint written by `ssl-toolkit pretrain`.")
    return ckpt


def check_resume(path: str, model) -> dict:
    """Raise a CheckpointError unless the checkpoint at ``path`` is one that training ``model`` can resume from:
    written by the same method, with every weight of the same name and shape (the same backbone and heads).
    Returns the checkpoint."""
    ckpt = load_checkpoint(path)
    method = ckpt["ssl_toolkit"]["method"]
    here = f"{type(model).__module__}.{type(model).__qualname__}"
    if method != here:
        raise CheckpointError(f"{path} is a checkpoint of a {method.rpartition('.')[2]} run; this run trains "
                              f"{type(model).__name__}. Resume with the recipe that wrote it, or leave out "
                              "--ckpt_path to start afresh.")
    refuse_other_optimizer(ckpt, model.hparams, path)
    saved = {k: tuple(t.shape) for k, t in ckpt["state_dict"].items()}
    ours = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    if differ:
        shown = ", ".join(f"{k} {saved.get(k, 'absent')} here {ours.get(k, 'absent')}" for k in differ[:3])
        raise CheckpointError(f"{path} does not fit this run's {type(model).__name__}: {len(differ)} weights differ "
                              f"in name or shape ({shown}). The checkpoint's backbone is "
                              f"{ckpt['hyper_parameters'].get('backbone')}; resume with the settings that wrote it.")
    return ckpt


def flat_settings(values, prefix: str = "") -> dict:
    """Nested settings as ``{"optim.lr": 0.3, ...}``, lists as tuples (a YAML list and a tuple field compare
    equal); the class as ``class_path``, without Lightning's other private keys (``_instantiator``). A config's
    ``init_args`` level is left out of the names, as its flags leave it out (``--model.optim.lr``)."""
    out = {}
    for key, value in dict(values).items():
        key = "class_path" if key == "_class_path" else str(key)
        if key.startswith("_"):
            continue
        if key == "init_args" and isinstance(value, dict):
            out.update(flat_settings(value, prefix))
        elif isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = tuple(value) if isinstance(value, list) else value
    return out


def resume_differences(ckpt: dict, model, datamodule=None) -> str | None:
    """The line that names the model and data settings of a resumed run that differ from the checkpoint's run
    (``model.optim.lr 0.3 -> 0.15``), or None when none do. Resuming with other settings is often meant (a lower
    learning rate after a loss went non-finite), and was not visible: the run went on with them silently."""
    changed = []
    for part, before, now in (("model", ckpt.get("hyper_parameters"), getattr(model, "hparams", None)),
                              ("data", ckpt.get("datamodule_hyper_parameters"), getattr(datamodule, "hparams", None))):
        if not before or now is None:
            continue
        before, now = flat_settings(before), flat_settings(now)
        changed += [f"{part}.{key} {before.get(key, '(none)')} -> {now.get(key, '(none)')}"
                    for key in sorted(before.keys() | now.keys()) if before.get(key, "(none)") != now.get(key, "(none)")]
    if not changed:
        return None
    return ("This run's settings differ from the checkpoint's run: " + ", ".join(changed) + ". It goes on from the "
            "checkpoint's weights, optimizer state and position with these.")


def refuse_other_optimizer(ckpt: dict, hparams, path: str = "the checkpoint") -> None:
    """A run resumes the checkpoint's optimizer state (momentum, Adam's moments), which fits only the same
    optimizer: resuming an SGD run with ``optim.name adamw`` failed with a traceback (``KeyError: 'step'``), with
    ``lars`` went on with SGD's momentum as LARS's, and an AdamW run resumed as SGD dropped Adam's moments, silently."""
    was = (ckpt.get("hyper_parameters") or {}).get("optim", {}).get("name")
    now = (hparams or {}).get("optim", {}).get("name")
    if was and now and was != now:
        raise CheckpointError(f"{path} was trained with optim.name {was}, and this run's is {now}: the optimizer's "
                              f"state (its momentum or moments) resumes only into the same optimizer. Resume with "
                              f"--model.optim.name {was}; the other optim settings (lr, weight_decay, ...) may "
                              "change.")


def load_backbone(ckpt: dict):
    """Rebuild the checkpoint's backbone and load its trained weights: ``(module, feature_dim)``."""
    backbone, dim = build_backbone(**ckpt["hyper_parameters"]["backbone"])
    return load_backbone_weights(ckpt, backbone), dim


def load_backbone_weights(ckpt: dict, backbone):
    """Load the checkpoint's backbone weights into ``backbone`` (built from the same config); returns it."""
    b = ckpt["hyper_parameters"]["backbone"]
    prefix = "backbone."
    state = {k[len(prefix):]: t for k, t in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"Checkpoint weights do not fit backbone {b['name']!r}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}. The checkpoint was written by another version or method.")
    return backbone


def encoder_from_checkpoint(ckpt: dict) -> Encoder:
    """Rebuild the backbone with its input normalisation and load its trained weights."""
    return Encoder.from_hparams(load_backbone(ckpt)[0], ckpt["hyper_parameters"])


def method_from_checkpoint(ckpt: dict, expected: type | None = None):
    """Rebuild the whole method module (heads, text tower, ...) from its saved config and load every weight.

    Args:
        ckpt: A checkpoint from :func:`load_checkpoint`.
        expected: The method class the caller needs; another method's checkpoint gets a CheckpointError.
    """
    import dataclasses
    import inspect
    import typing

    path = ckpt["ssl_toolkit"]["method"]
    cls = import_class(path)
    if expected is not None and not issubclass(cls, expected):
        raise CheckpointError(f"This is a {cls.__name__} checkpoint ({path}); this command needs a "
                              f"{expected.__name__} checkpoint. Pass the checkpoint of a {expected.__name__} run.")
    hints = typing.get_type_hints(cls.__init__)
    kwargs = {}
    for name, param in inspect.signature(cls).parameters.items():
        if name not in ckpt["hyper_parameters"]:
            continue
        value, hint = ckpt["hyper_parameters"][name], hints.get(name)
        kwargs[name] = hint(**value) if dataclasses.is_dataclass(hint) and isinstance(value, dict) else value
    module = cls(**kwargs)
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    return module.eval()


def import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def datamodule_from_checkpoint(ckpt: dict):
    """Rebuild the DataModule the checkpoint was trained on, from its saved hyper-parameters."""
    cls_path = ckpt["ssl_toolkit"].get("datamodule")
    if not cls_path or "datamodule_hyper_parameters" not in ckpt:
        raise CheckpointError("This checkpoint does not record its dataset; pass --data.")
    kwargs = {k: v for k, v in ckpt["datamodule_hyper_parameters"].items() if not k.startswith("_")}  # no CLI keys
    return import_class(cls_path)(**kwargs)
