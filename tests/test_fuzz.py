"""Fuzzing (hypothesis): random config values and corrupted image files end in a clear error or a run, never in a
raw traceback from deep inside. Each test counts the cases it tried."""

import io
import math
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ROOT
from ssl_toolkit.cli import main
from ssl_toolkit.data import ImageFolderDataModule

NUMBERS = st.one_of(st.integers(-10, 5000), st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0, -1, 1e-12, 1e12]))
WORDS = st.one_of(st.sampled_from(["", "sgd", "lars", "adamw", "adam", "resnet18", "tiny_cnn", "vit_tiny", "none",
                                   "[1, 2]", "{a: 1}", "null", "true"]), st.text(max_size=8))
KEYS = {  # recipe keys of the quickstart, and values of the wrong kind, range or spelling
    "model.init_args.temperature": NUMBERS,
    "model.init_args.proj_hidden_dim": st.one_of(NUMBERS, WORDS),
    "model.init_args.proj_out_dim": NUMBERS,
    "model.init_args.optim.name": WORDS,
    "model.init_args.optim.lr": st.one_of(NUMBERS, WORDS),
    "model.init_args.optim.weight_decay": NUMBERS,
    "model.init_args.optim.warmup_epochs": NUMBERS,
    "model.init_args.backbone.name": WORDS,
    "model.init_args.backbone.width": NUMBERS,
    "model.init_args.views.crop_size": NUMBERS,
    "model.init_args.views.scale": st.lists(NUMBERS, min_size=0, max_size=3).map(str),
    "model.init_args.views.flip_p": NUMBERS,
    "model.init_args.views.hue": NUMBERS,
    "model.init_args.views.blur_p": NUMBERS,
    "model.init_args.views.blur_kernel": NUMBERS,
    "model.init_args.temprature": NUMBERS,  # a misspelt key
    "data.init_args.batch_size": NUMBERS,
    "data.init_args.image_size": NUMBERS,
    "trainer.max_epochs": NUMBERS,
}


def _arg(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)


def test_random_config_values_end_in_a_run_or_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    outcomes = []

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.lists(st.sampled_from(sorted(KEYS)), min_size=1, max_size=3, unique=True).flatmap(
        lambda keys: st.tuples(*[st.tuples(st.just(k), KEYS[k]) for k in keys])))
    def case(pairs):
        args = ["pretrain", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--trainer.fast_dev_run", "2"]
        for key, value in pairs:
            args += [f"--{key}", _arg(value)]
        capsys.readouterr()
        code = main(args)  # any exception other than the CLI's clear errors fails the test with this example
        err = capsys.readouterr().err
        assert code in (0, 1), (pairs, code)
        if code == 1:
            message = err.strip().splitlines()[0] if err.strip() else ""
            assert message.startswith("ssl-toolkit pretrain: error:") and "Traceback" not in err, (pairs, err)
        outcomes.append(code)

    case()
    assert len(outcomes) == 40  # the cases tried
    assert outcomes.count(1) >= 10 and outcomes.count(0) >= 1  # both bad and still-valid values were drawn


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.99)),
    st.tuples(st.just("overwrite"), st.floats(0.0, 0.99), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("replace"), st.binary(max_size=200)),
    st.tuples(st.just("text"), st.text(max_size=100)),
)


def _corrupt(data: bytes, corruption) -> bytes:
    kind = corruption[0]
    if kind == "truncate":
        return data[:int(len(data) * corruption[1])]
    if kind == "overwrite":
        at = int(len(data) * corruption[1])
        return data[:at] + corruption[2] + data[at + len(corruption[2]):]
    if kind == "replace":
        return corruption[1]
    return corruption[1].encode()


@pytest.mark.parametrize("on_corrupt", ["fail", "skip"])
def test_corrupted_image_files_end_in_a_clear_error_or_are_skipped(on_corrupt, tmp_path):
    tried = []

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, 5), CORRUPTIONS), min_size=1, max_size=3))
    def case(damage):
        root = tmp_path / f"case{len(tried)}"
        files = []
        for split in ("train", "val"):
            for cls in ("a", "b"):
                for i in range(3 if split == "train" else 1):
                    f = root / split / cls / f"{i}.png"
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_bytes(_png(len(files)))
                    files.append(f)
        broken = set()
        for index, corruption in damage:  # damage training files
            f = files[index]
            f.write_bytes(_corrupt(f.read_bytes(), corruption))
            broken.add(f)
        dm = ImageFolderDataModule(str(root), image_size=16, on_corrupt=on_corrupt, batch_size=2)
        try:
            dm.setup()
        except ValueError as e:  # the clear error: it names the unreadable files and the fix
            text = str(e)
            assert "could not be read" in text or "No readable images" in text, text
            assert "could not be read" not in text or any(str(f) in text for f in broken), text
            tried.append("error")
        else:
            assert len(dm.splits.x_train) + dm.num_skipped == 6  # every file either decoded or counted as skipped
            tried.append("ok")
        shutil.rmtree(root)

    case()
    assert len(tried) == 40  # the cases tried
    assert "error" in tried if on_corrupt == "fail" else tried.count("ok") >= 30
