"""Export a checkpoint's backbone so it loads without this toolkit.

Formats:
    ``torchvision``: the ResNet's ``state_dict`` (``.pth``) for ``torchvision.models.resnetXX`` with ``fc``
        replaced by ``nn.Identity()`` (and, for the CIFAR stem, a 3x3 ``conv1`` and no max-pool).
    ``safetensors``: the backbone weights as ``.safetensors``, the toolkit config in the file's metadata.
    ``torchscript``: the whole encoder traced (uint8 images in, features out: resizing, normalisation, lightness
        or tiles included) as a ``.pt`` file for ``torch.jit.load`` or LibTorch. ``torch.jit`` is deprecated
        upstream but still loads everywhere; prefer ``onnx`` for new deployments.
    ``onnx``: the same whole encoder as an ONNX graph with a dynamic batch axis (``pip install onnx onnxscript``).

Every format also writes ``<file>.json`` beside the exported file (``model.onnx.json``, so exports of one checkpoint
in several formats keep their own): the method, the backbone config, the feature dimension, how to prepare
an image (input size, mean/std, or lightness / tiles / patches), and where it came from: the fingerprint of the
backbone weights (as ``embed`` records it) and, from ``ssl-toolkit export``, the checkpoint, its step, the command,
the date and the versions.
"""

import json
import os
import warnings

import torch
from torch import nn

FORMATS = ("torchvision", "safetensors", "torchscript", "onnx")
SUFFIX = {"torchvision": ".pth", "safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx"}


def _input_description(hparams: dict) -> str:
    v, kind = hparams["views"], hparams.get("input", "rgb")
    if kind == "lightness":
        return ("CIE Lab lightness of the RGB image (sRGB, D65), scaled as L / 50 - 1 and copied to 3 channels "
                f"(colorization), at {v['crop_size']} px")
    if kind == "tiles":
        return (f"the image at {v['crop_size']} px, normalised with mean/std, cut into a {hparams['grid']}x"
                f"{hparams['grid']} grid; the centre {hparams['tile']} px tile of each cell"
                f"{', normalised per tile' if hparams['normalize_tiles'] else ''}, encoded one by one; the tile "
                "features concatenated in row-major order (jigsaw)")
    if "patch" in hparams:
        return (f"the image normalised with mean/std, cut into {hparams['patch']} px patches {hparams['stride']} px "
                "apart; the patch features averaged (CPC)")
    return f"RGB in [0, 1] resized to {v['crop_size']} px, then (x - mean) / std per channel"


def metadata(ckpt: dict, fmt: str, feature_dim: int) -> dict:
    """What a user needs to use the exported backbone: where it came from and how to prepare an image."""
    h = ckpt["hyper_parameters"]
    meta = {"format": fmt, "method": ckpt["ssl_toolkit"]["method"], "backbone": h["backbone"],
            "feature_dim": feature_dim, "input_size": h["views"]["crop_size"], "mean": list(h["views"]["mean"]),
            "std": list(h["views"]["std"]), "input": h.get("input", "patches" if "patch" in h else "rgb"),
            "preprocess": _input_description(h)}
    if fmt == "torchvision":
        b = h["backbone"]
        stem = ("; m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity()"
                if b["cifar_stem"] else "")
        meta["load"] = (f"m = torchvision.models.{b['name']}(weights=None); m.fc = torch.nn.Identity(){stem}; "
                        "m.load_state_dict(torch.load(PATH))")
    if fmt in ("torchscript", "onnx"):
        meta["takes"] = (f"uint8 images (B, 3, {h['views']['crop_size']}, {h['views']['crop_size']}); the graph "
                         "does the preprocessing")
    return meta


def export(ckpt: dict, fmt: str, out: str, made: dict | None = None) -> list[str]:
    """Write the backbone of ``ckpt`` in ``fmt`` to ``out`` (suffix added when missing) and ``<that path>.json``.

    ``made``: more to record in the JSON (``ssl-toolkit export`` gives the checkpoint's path, the command line, the
    date and the versions). Returns the written paths.
    """
    # imported here, so that `export --help` runs without torchvision and Lightning
    from ssl_toolkit.backbones import RESNETS
    from ssl_toolkit.checkpoint import backbone_fingerprint, encoder_from_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    b = ckpt["hyper_parameters"]["backbone"]
    if fmt == "torchvision" and b["name"] not in RESNETS:
        raise ValueError(f"The torchvision format holds torchvision ResNets; this backbone is {b['name']!r}. "
                         "Use --format safetensors (weights), torchscript or onnx (whole encoder).")
    path = out if out.endswith(SUFFIX[fmt]) else out + SUFFIX[fmt]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    encoder = encoder_from_checkpoint(ckpt).eval()
    size = ckpt["hyper_parameters"]["views"]["crop_size"]
    with torch.no_grad():
        dim = encoder(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[1]
    meta = {**metadata(ckpt, fmt, dim), "fingerprint": backbone_fingerprint(ckpt), **(made or {})}
    state = {k: t.detach().contiguous() for k, t in encoder.backbone.state_dict().items()}
    if fmt == "torchvision":
        torch.save(state, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path, metadata={k: json.dumps(v) for k, v in meta.items()})
    else:  # a whole-encoder graph takes images at the training size: the resize branch stays out of the trace
        encoder.input_size = None
        example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
        if fmt == "torchscript":
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # jit's deprecation notice and its tracer's notes on shape checks
                torch.jit.save(torch.jit.trace(encoder, example), path)
        else:
            _export_onnx(encoder, example, path)
    meta_path = path + ".json"  # not splitext's: model.onnx and model.safetensors would share model.json
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return [path, meta_path]


def _export_onnx(encoder: nn.Module, example: torch.Tensor, path: str) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript "
                          "(or pip install -e \".[onnx]\").") from None
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (example,), path, input_names=["images"], output_names=["features"],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False,
                          external_data=False)
