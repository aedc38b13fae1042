import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision

from ssl_toolkit.backbones import BackboneConfig, build_backbone
from ssl_toolkit.checkpoint import backbone_fingerprint, encoder_from_checkpoint, load_checkpoint
from ssl_toolkit.cli import main
from ssl_toolkit.data import DigitsDataModule, NpzDataModule
from ssl_toolkit.methods import Colorization, Jigsaw, SimCLR
from ssl_toolkit.views import ViewConfig


def trained_checkpoint(path, model, data) -> str:
    """Two training steps (batch-norm statistics move off their init), then a checkpoint as pretraining writes it."""
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    trainer.save_checkpoint(path)
    return str(path)


def colour_data(tmp_path) -> NpzDataModule:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    y = np.arange(64) % 4
    np.savez(tmp_path / "colour.npz", x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
    return NpzDataModule(str(tmp_path / "colour.npz"), batch_size=16)


def images(n: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def exported(tmp_path, ckpt: str, fmt: str) -> tuple[str, dict]:
    assert main(["export", "--ckpt", ckpt, "--format", fmt, "--out", str(tmp_path / "out" / fmt)]) == 0
    path = str(tmp_path / "out" / fmt) + {"torchvision": ".pth", "safetensors": ".safetensors", "torchscript": ".pt",
                                          "onnx": ".onnx"}[fmt]
    return path, json.loads(open(path + ".json").read())


@pytest.mark.parametrize("cifar_stem", [True, False])
def test_torchvision_export_loads_into_a_plain_torchvision_resnet(cifar_stem, tmp_path):
    views = ViewConfig(crop_size=16, mean=(0.3,) * 3, std=(0.3,) * 3)
    model = SimCLR(BackboneConfig("resnet18", cifar_stem=cifar_stem), views=views, proj_hidden_dim=32, proj_out_dim=8)
    ckpt = trained_checkpoint(tmp_path / "r.ckpt", model, DigitsDataModule(image_size=16, batch_size=16))
    path, meta = exported(tmp_path, ckpt, "torchvision")
    assert meta["feature_dim"] == 512 and meta["input_size"] == 16 and meta["mean"] == [0.3] * 3
    scope = {"torch": torch, "torchvision": torchvision}
    exec(meta["load"].replace("PATH", repr(path)), scope)  # the instructions the JSON gives, as written
    plain = scope["m"].eval()
    x = images(4, 16)
    with torch.no_grad():
        expected = encoder_from_checkpoint(load_checkpoint(ckpt)).eval()(x)
        assert torch.allclose(plain((x / 255.0 - 0.3) / 0.3), expected, atol=1e-5)


def test_safetensors_export_holds_the_weights_and_the_config(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = SimCLR(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), proj_hidden_dim=16,
                   proj_out_dim=8)
    ckpt = trained_checkpoint(tmp_path / "t.ckpt", model, DigitsDataModule(image_size=16, batch_size=16))
    path, meta = exported(tmp_path, ckpt, "safetensors")
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["backbone"])
    net, _ = build_backbone(**config)
    net.load_state_dict(load_file(path))
    x = images(3, 16)
    with torch.no_grad():
        encoder = encoder_from_checkpoint(load_checkpoint(ckpt)).eval()
        assert torch.allclose(net.eval()(encoder.prepare(x)), encoder(x), atol=1e-6)
    assert meta["input"] == "rgb" and "(x - mean) / std" in meta["preprocess"]
    # another format to the same --out keeps its own JSON (model.safetensors.json, model.pt.json), so the weights'
    # instructions are not replaced by the whole-encoder graph's ("uint8 images in")
    script, script_meta = exported(tmp_path, ckpt, "torchscript")
    assert script_meta["format"] == "torchscript" and "takes" in script_meta
    assert json.loads(open(path + ".json").read()) == meta and meta["format"] == "safetensors"
    # where it came from: the weights' fingerprint (as embed records it), the checkpoint and its step, the command,
    # the date and the versions
    assert meta["fingerprint"] == backbone_fingerprint(load_checkpoint(ckpt)) and meta["checkpoint"] == ckpt
    assert meta["global_step"] == 2 and meta["command"].startswith(f"ssl-toolkit export --ckpt {ckpt} --format")
    assert meta["date"].startswith("20") and {"ssl_toolkit", "torch", "kornia"} <= set(meta["versions"])
    # the toolkit's commands take the checkpoint, and name it for an export (a TorchScript file was torch.load's
    # advice to load it with weights_only=False)
    capsys.readouterr()
    for exported_file in (path, script):
        assert main(["knn", "--ckpt", exported_file]) == 1
        err = capsys.readouterr().err
        assert f"{exported_file} is an `ssl-toolkit export` of a backbone" in err and f"pass {ckpt}." in err, err
    older = {k: v for k, v in meta.items() if k != "checkpoint"}  # an export from before it was recorded
    open(path + ".json", "w").write(json.dumps(older))
    assert main(["probe", "--ckpt", path]) == 1
    assert "pass the SimCLR checkpoint it was made from." in capsys.readouterr().err


@pytest.mark.parametrize("method", ["colorization", "jigsaw", "vit"])
def test_torchscript_and_onnx_run_the_whole_encoder(method, tmp_path):
    import onnxruntime

    if method == "vit":  # position embeddings sized from the input (the trace failed on round() of a traced size)
        model = SimCLR(BackboneConfig("vit_tiny", patch_size=4, image_size=16, vit_layers=1),
                       views=ViewConfig(crop_size=16), proj_hidden_dim=16, proj_out_dim=8)
        data, size = DigitsDataModule(image_size=16, batch_size=16), 16
    elif method == "colorization":  # lightness input
        model = Colorization(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16, jitter_p=0, gray_p=0),
                             head_width=8)
        data, size = colour_data(tmp_path), 16
    else:  # the solved puzzle of 9 tiles
        model = Jigsaw(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=15), tile=4,
                       num_permutations=10, tile_dim=8, hidden_dim=16)
        data, size = DigitsDataModule(image_size=15, batch_size=16), 15
    ckpt = trained_checkpoint(tmp_path / "m.ckpt", model, data)
    x = images(5, size)  # another batch size than the traced example
    with torch.no_grad():
        expected = encoder_from_checkpoint(load_checkpoint(ckpt)).eval()(x)
    script, meta = exported(tmp_path, ckpt, "torchscript")
    assert meta["input"] == {"colorization": "lightness", "jigsaw": "tiles", "vit": "rgb"}[method]
    assert "uint8" in meta["takes"]
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(script)(x), expected, atol=1e-5)
    onnx_path, _ = exported(tmp_path, ckpt, "onnx")
    out = onnxruntime.InferenceSession(onnx_path).run(None, {"images": x.numpy()})[0]
    assert np.allclose(out, expected.numpy(), atol=1e-4)


def test_export_refuses_what_a_format_cannot_hold(tmp_path, capsys):
    model = SimCLR(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), proj_hidden_dim=16,
                   proj_out_dim=8)
    ckpt = trained_checkpoint(tmp_path / "t.ckpt", model, DigitsDataModule(image_size=16, batch_size=16))
    assert main(["export", "--ckpt", ckpt, "--format", "torchvision"]) == 1
    assert "holds torchvision ResNets; this backbone is 'tiny_cnn'. Use --format safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", ckpt, "--format", "keras"])


def test_export_to_a_folder_writes_the_default_name_in_it(tmp_path, capsys):
    """`--out exports/` wrote `exports/.safetensors`, a hidden file, and `--out exports` (a folder) wrote
    `exports.safetensors` beside it, as `map --out` did before it took folders."""
    model = SimCLR(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), proj_hidden_dim=16,
                   proj_out_dim=8)
    ckpt = trained_checkpoint(tmp_path / "t.ckpt", model, DigitsDataModule(image_size=16, batch_size=16))
    (tmp_path / "exports").mkdir()
    for out in ("exports", "exports/", "new/"):
        assert main(["export", "--ckpt", ckpt, "--format", "safetensors", "--out", f"{tmp_path}/{out}"]) == 0
        folder = tmp_path / out.rstrip("/")
        assert sorted(p.name for p in folder.iterdir()) == ["t.ckpt.safetensors", "t.ckpt.safetensors.json"]
        assert f"wrote {folder / 't.ckpt.safetensors'}\n" in capsys.readouterr().out
    assert not list(tmp_path.glob("exports.*"))
    (tmp_path / "taken").write_text("a file")
    assert main(["export", "--ckpt", ckpt, "--format", "onnx", "--out", str(tmp_path / "taken" / "m")]) == 1
    assert "is a file, not a folder. Choose another path (--out)." in capsys.readouterr().err
