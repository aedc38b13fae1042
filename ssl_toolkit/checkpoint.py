"""Reading toolkit checkpoints: the encoder and the data they were trained on, from the file alone."""

import importlib
import os
import pickle
import zipfile

import torch

from ssl_toolkit.backbones import Encoder, build_backbone


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with what to do about it."""


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` and check it is one of this toolkit's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint at {os.path.abspath(path)!r}. Pass the .ckpt file pretraining wrote "
                                "(it prints the path when it ends; look under runs/*/version_*/checkpoints/).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {first}); the file is truncated or not a "
                              "PyTorch checkpoint. Use another checkpoint of the run (e.g. last.ckpt).") from None
    if not isinstance(ckpt, dict) or "ssl_toolkit" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an ssl-toolkit pretraining checkpoint (no 'ssl_toolkit' metadata). "
                              "Pass a checkpoint written by `ssl-toolkit pretrain`.")
    return ckpt


def encoder_from_checkpoint(ckpt: dict) -> Encoder:
    """Rebuild the backbone with its input normalisation and load its trained weights."""
    hp = ckpt["hyper_parameters"]
    b = hp["backbone"]
    backbone, _ = build_backbone(**b)
    prefix = "backbone."
    state = {k[len(prefix):]: t for k, t in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"Checkpoint weights do not fit backbone {b['name']!r}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}. The checkpoint was written by another version or method.")
    return Encoder.from_hparams(backbone, hp)


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
