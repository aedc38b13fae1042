import html
import json
import re
import shutil
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ssl_toolkit.backbones import BackboneConfig, Encoder, build_backbone
from ssl_toolkit.cli import main
from ssl_toolkit.data import NpzDataModule
from ssl_toolkit.eval.search import (build_index, embed_paths, faiss, list_images, load_embeddings, retrieval_metrics,
                                     write_gallery)
from ssl_toolkit.methods import SimCLR
from ssl_toolkit.progress import reporting_progress
from ssl_toolkit.views import ViewConfig


def checkpoint(path, data, seed: int) -> str:
    pl.seed_everything(seed)
    model = SimCLR(BackboneConfig("tiny_cnn", width=8), views=ViewConfig(crop_size=32), proj_hidden_dim=32,
                   proj_out_dim=16)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def gallery(cifar_small, tmp_path_factory):
    """90 real CIFAR-10 images as PNGs in 3 class folders, and a checkpoint (two SimCLR steps on the subset)."""
    root = tmp_path_factory.mktemp("search")
    arrays = np.load(cifar_small)
    x, y, classes = arrays["x_train"], arrays["y_train"], arrays["classes"]
    for c in (0, 1, 2):
        folder = root / "images" / str(classes[c])
        folder.mkdir(parents=True)
        for i in np.flatnonzero(y == c)[:30]:
            Image.fromarray(x[i]).save(folder / f"{i}.png")
    ckpt = checkpoint(root / "a.ckpt", NpzDataModule(str(cifar_small), batch_size=64), seed=0)
    return root, ckpt


def test_embed_index_search_round_trip(gallery, tmp_path, capsys):
    root, ckpt = gallery
    emb_dir = tmp_path / "emb"
    assert main(["embed", "--ckpt", ckpt, "--images", str(root / "images"), "--out", str(emb_dir)]) == 0
    emb, paths, meta = load_embeddings(str(emb_dir))
    assert emb.shape == (90, 64) and len(paths) == 90 and meta["classes"] == ["airplane", "automobile", "bird"]
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5) and meta["l2_normalized"]
    assert sorted(set(meta["labels"].tolist())) == [0, 1, 2] and meta["checkpoint"].endswith("a.ckpt")
    assert meta["input"] == "rgb" and meta["fingerprint"]

    assert main(["index", "--embeddings", str(emb_dir), "--out", f"{tmp_path}/indexes/"]) == 0  # a folder: its name
    assert sorted(p.name for p in (tmp_path / "indexes").iterdir()) == ["index.faiss", "index.faiss.json"]
    assert main(["index", "--embeddings", str(emb_dir)]) == 0
    info = json.loads((emb_dir / "index.faiss.json").read_text())
    direct = retrieval_metrics(torch.from_numpy(emb), torch.from_numpy(meta["labels"]))
    assert info["retrieval"]["recall@1"] == pytest.approx(direct["recall@1"])
    assert set(info["retrieval"]["mAP_per_class"]) == {"airplane", "automobile", "bird"}
    assert "leave-one-out retrieval over 90 queries" in capsys.readouterr().out

    query = paths[7]
    out = tmp_path / "g.html"
    index = str(emb_dir / "index.faiss")
    assert main(["search", "--index", index, "--query", query, "-k", "5", "--out", str(out), "--include-query"]) == 0
    first, *rest = [line.split() for line in capsys.readouterr().out.splitlines()[1:6]]
    assert first[2] == query and float(first[1]) == pytest.approx(1.0, abs=1e-4)  # itself, at similarity 1
    listed = [query] + [line[2] for line in rest]
    assert out.read_text().count("<img") == 6  # the query and 5 neighbours
    link = tmp_path / "link.png"  # the same file by another path is still the query itself
    link.symlink_to(query)
    for q in (query, str(link)):
        assert main(["search", "--index", index, "--query", q, "-k", "5", "--out", str(out)]) == 0
        printed = capsys.readouterr().out.splitlines()
        others = [line.split()[2] for line in printed[1:6]]
        assert others[:4] == listed[1:] and others[4] not in listed, (listed, others)  # 5 others, in order
        assert printed[6] == ("the query is one of the indexed images, left out of its own neighbours "
                              "(--include-query lists it)")
        assert out.read_text().count("<img") == 6  # the query and 5 other images
    png = tmp_path / "g.png"
    folder = str(root / "images" / "bird")
    assert main(["search", "--index", str(emb_dir / "index.faiss"), "--query", folder, "-k", "3", "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("query: ") == 30 and ("30 of the 30 queries are indexed images, each left out of its own "
                                               "neighbours (--include-query lists them)") in printed
    for row in printed.split("query: ")[1:]:
        lines = row.splitlines()
        assert lines[0] not in [line.split()[2] for line in lines[1:4]] and lines[0].startswith(folder)
    grid = np.asarray(Image.open(png))
    assert grid.shape[:2] == (2 + 30 * 98, 2 + 4 * 98)  # 30 rows of query + 3 neighbours, 96 px and 2 px padding


def test_search_refuses_an_index_of_replaced_embeddings_and_follows_a_moved_folder(gallery, tmp_path, monkeypatch,
                                                                                    capsys):
    """An embeddings folder embedded again (other images, the same count) kept its index, and search paired the old
    rows with the new paths: airplanes found for a bird, named as birds. A folder moved with its index stopped at
    "[Errno 2] No such file or directory: '.../paths.txt'". Relative --images paths were stored as given, so a
    search from another folder printed paths that were not there and its gallery's links were broken."""
    root, ckpt = gallery
    monkeypatch.chdir(root)
    emb = tmp_path / "emb"
    index = str(emb / "index.faiss")
    assert main(["embed", "--ckpt", ckpt, "--images", "images/airplane", "--out", str(emb)]) == 0
    assert main(["index", "--embeddings", str(emb)]) == 0
    assert main(["embed", "--ckpt", ckpt, "--images", "images/bird", "--out", str(emb)]) == 0  # 30 images, as before
    assert (f"index.faiss in {emb} holds the embeddings this replaced; build it again for search: ssl-toolkit index "
            f"--embeddings {emb}") in capsys.readouterr().out
    bird = str(root / "images" / "bird" / sorted(p.name for p in (root / "images" / "bird").iterdir())[0])
    assert main(["search", "--index", index, "--query", bird]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"error: {index} was built from other embeddings than {emb} holds now (30 images of {root / 'images' / 'bird'}"
        f": embedded again since, or changed by hand). Build the index again: ssl-toolkit index --embeddings {emb}")
    assert main(["index", "--embeddings", str(emb)]) == 0
    capsys.readouterr()
    moved = tmp_path / "moved"
    emb.rename(moved)
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--index", str(moved / "index.faiss"), "--query", bird, "-k", "3"]) == 0
    found = [line.split()[2] for line in capsys.readouterr().out.splitlines()[1:4]]
    assert bird not in found and all(p.startswith(str(root / "images" / "bird")) for p in found), found
    srcs = re.findall(r'<img src="([^"]*)"', (moved / "index.faiss.gallery.html").read_text())
    assert len(srcs) == 4 and all((moved / urllib.parse.unquote(html.unescape(s))).is_file() for s in srcs)
    copy = tmp_path / "copy.ckpt"  # the checkpoint moved: named with the option that takes it
    shutil.copy(ckpt, copy)
    info = json.loads((moved / "index.faiss.json").read_text())
    (moved / "index.faiss.json").write_text(json.dumps({**info, "checkpoint": str(tmp_path / "gone.ckpt")}))
    assert main(["search", "--index", str(moved / "index.faiss"), "--query", bird]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"error: The index was built with the checkpoint {tmp_path / 'gone.ckpt'}, which is not there any more "
        "(moved, or on another machine). Pass it, or a copy, with --ckpt: its weights are checked against the index's.")
    assert main(["search", "--index", str(moved / "index.faiss"), "--query", bird, "--ckpt", str(copy)]) == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    (moved / "index.faiss").rename(alone / "index.faiss")
    (moved / "index.faiss.json").rename(alone / "index.faiss.json")
    moved.rename(tmp_path / "gone")
    assert main(["search", "--index", str(alone / "index.faiss"), "--query", bird]) == 1
    assert f"was built from the embeddings in {emb}, which are not there any more, nor beside the index" in \
        capsys.readouterr().err


def test_folder_labels_read_class_folders_also_under_train_and_val():
    from ssl_toolkit.eval.search import folder_labels

    def labels(*rel):
        return folder_labels("/d", [f"/d/{r}" for r in rel])

    assert labels("cat/1.png", "dog/2.png", "cat/sub/3.png") == (["cat", "dog"], [0, 1, 0])
    # a labelled dataset's own layout: the classes, not "train" and "val" (retrieval metrics were by split)
    assert labels("train/cat/1.png", "train/dog/2.png", "val/dog/3.png") == (["cat", "dog"], [0, 1, 1])
    assert labels("train/cat/1.png", "val/2.png") is None  # an image outside any class folder: unlabelled
    assert labels("1.png", "cat/2.png") is None and labels("cat/1.png", "cat/2.png") is None


def test_gallery_links_images_whose_names_hold_url_characters(tmp_path):
    """The HTML gallery's src is a URL: a photo named 'party #2 (50%).png' linked as written pointed at
    'party ' plus a fragment."""
    (tmp_path / "my photos").mkdir()
    names = ["party #2 (50%).png", "what?.png", "ok.png"]
    for n in names:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "my photos" / n)
    paths = [str(tmp_path / "my photos" / n) for n in names]
    out = write_gallery(str(tmp_path / "out" / "g.html"), paths[:1], [[(p, 0.5) for p in paths[1:]]])
    srcs = re.findall(r'<img src="([^"]*)"', open(out).read())
    assert len(srcs) == 3 and all("#" not in s and "?" not in s for s in srcs)
    resolved = [(tmp_path / "out" / urllib.parse.unquote(html.unescape(s))).resolve() for s in srcs]
    assert resolved == [(tmp_path / "my photos" / n).resolve() for n in names]


def test_ivf_index_reports_its_recall_against_exact(gallery, tmp_path, capsys):
    root, ckpt = gallery
    assert main(["embed", "--ckpt", ckpt, "--images", str(root / "images"), "--out", str(tmp_path / "e"),
                 "--dtype", "float16"]) == 0
    assert np.load(tmp_path / "e" / "embeddings.npy").dtype == np.float16
    assert main(["index", "--embeddings", str(tmp_path / "e")]) == 0
    assert main(["index", "--embeddings", str(tmp_path / "e"), "--type", "ivf", "--nlist", "4", "--nprobe", "4"]) == 0
    info = json.loads((tmp_path / "e" / "index-ivf.faiss.json").read_text())
    assert info["recall_at_10_vs_exact"] == pytest.approx(1.0)  # every cell probed: exact
    assert json.loads((tmp_path / "e" / "index.faiss.json").read_text())["type"] == "flat"  # the exact one is kept
    assert main(["index", "--embeddings", str(tmp_path / "e"), "--type", "ivf", "--nlist", "9", "--nprobe", "1",
                 "--out", str(tmp_path / "i1.faiss")]) == 0
    low = json.loads((tmp_path / "i1.faiss.json").read_text())["recall_at_10_vs_exact"]
    assert 0 < low < 1  # one of 9 cells: approximate, and the number says by how much


def test_retrieval_metrics_by_hand():
    e = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    m = retrieval_metrics(e, labels, ks=(1, 2))
    # query 0 ranks 1 (x), 2 (hit), 3 (x): AP 1/2. query 1: 2 (x), 0 (x), 3 (hit): AP 1/3.
    # query 2: 1 (x), 3 (x), 0 (hit): AP 1/3. query 3: 2 (x), 1 (hit), 0: AP 1/2.
    assert m["mAP"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    assert m["recall@1"] == 0.0 and m["recall@2"] == 50.0
    assert m["mAP_per_class"] == {0: pytest.approx(100 * (1 / 2 + 1 / 3) / 2), 1: pytest.approx(100 * (1 / 3 + 1 / 2) / 2)}


def test_bad_input_says_the_fix(gallery, tmp_path, capsys, cifar_small):
    root, ckpt = gallery
    (tmp_path / "empty").mkdir()
    assert main(["embed", "--ckpt", ckpt, "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 1
    assert "No images in" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(broken / "ok.png")
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    assert main(["embed", "--ckpt", ckpt, "--images", str(broken), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "bad.jpg" in err and "--on-corrupt skip" in err
    assert main(["embed", "--ckpt", ckpt, "--images", str(broken), "--out", str(tmp_path / "b"),
                 "--on-corrupt", "skip"]) == 0
    assert "embedded 1 image (1 skipped) to 64-d" in capsys.readouterr().out  # "1 images" before
    with pytest.raises(SystemExit):  # a negative count of processes decoded here, as 0 did
        main(["embed", "--ckpt", ckpt, "--images", str(broken), "--out", str(tmp_path / "b"), "--workers", "-1"])
    assert "argument --workers: needs a whole number >= 0; got '-1'" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["skipped"] == 1
    (tmp_path / "taken").write_text("a file")  # output paths that cannot be written: a traceback, after embedding
    assert main(["embed", "--ckpt", ckpt, "--images", str(broken), "--out", str(tmp_path / "taken"), "--on-corrupt",
                 "skip"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"error: cannot write '{tmp_path / 'taken'}': it is a file, where a folder is written. Choose another path "
        "(--out).")
    assert main(["index", "--embeddings", str(tmp_path / "b"), "--out", str(tmp_path / "taken" / "i.faiss")]) == 1
    assert f"'{tmp_path / 'taken'}' is a file, not a folder. Choose another path (--out)." in capsys.readouterr().err
    assert main(["index", "--embeddings", str(tmp_path / "b")]) == 0
    assert main(["search", "--index", str(tmp_path / "b" / "index.faiss"), "--query", str(broken / "ok.png"),
                 "--out", str(tmp_path / "taken" / "g.html")]) == 1  # checked when written: one line, no traceback
    assert capsys.readouterr().err.strip().endswith(f"error: cannot write '{tmp_path / 'taken'}': a file is where a "
                                                    "folder has to be made. Choose another path.")
    other = checkpoint(tmp_path / "other.ckpt", NpzDataModule(str(cifar_small), batch_size=64), seed=1)
    index = str(tmp_path / "b" / "index.faiss")
    assert main(["search", "--index", index, "--query", str(broken / "ok.png"), "--ckpt", other]) == 1
    assert "The index was built from other weights" in capsys.readouterr().err
    faiss.write_index(build_index(np.eye(7, dtype=np.float32)[:1]), index)  # an index of another dimension
    assert main(["search", "--index", index, "--query", str(broken / "ok.png")]) == 1
    assert "64-d embeddings but the index holds 7-d ones" in capsys.readouterr().err
    assert main(["index", "--embeddings", str(tmp_path / "empty")]) == 1
    assert "is not an embeddings folder" in capsys.readouterr().err
    # a folder of queries with an unreadable one: the fix the message names (--on-corrupt skip) is search's too
    assert main(["index", "--embeddings", str(tmp_path / "b")]) == 0
    assert main(["search", "--index", index, "--query", str(broken)]) == 1
    err = capsys.readouterr().err
    assert f"1 of 2 images in {broken} could not be read" in err and "--on-corrupt skip" in err, err
    assert main(["search", "--index", index, "--query", str(broken), "--on-corrupt", "skip", "-k", "1"]) == 0
    assert "query: " + str(broken / "ok.png") in capsys.readouterr().out
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "bad.jpg").write_bytes(b"not a jpeg")
    embed = ["embed", "--ckpt", ckpt, "--images", str(tmp_path / "allbad"), "--out", str(tmp_path / "c")]
    assert main([*embed, "--on-corrupt", "skip"]) == 1  # it went on with nothing: 0 embeddings
    assert "None of the 1 images in" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    for skip in ([], ["--on-corrupt", "skip"]):  # one query: "1 of 1 images ... or set --on-corrupt skip", then with
        assert main(["search", "--index", index, "--query", str(tmp_path / "allbad" / "bad.jpg"), *skip]) == 1  # it,
        assert capsys.readouterr().err.strip().endswith(  # "None of the 1 images"
            f"error: --query '{tmp_path / 'allbad' / 'bad.jpg'}' cannot be read as an image (UnidentifiedImageError: "
            f"cannot identify image file '{tmp_path / 'allbad' / 'bad.jpg'}'). Pass an image file, or a folder of "
            "images.")
    assert main(["search", "--index", index, "--query", str(broken / "typo.png")]) == 1
    assert capsys.readouterr().err.strip().endswith(f"error: --query '{broken / 'typo.png'}' does not exist. Pass an "
                                                    "image, or a folder of images.")
    with pytest.raises(SystemExit):  # argparse's usage error; it was faiss's bare AssertionError
        main(["search", "--index", index, "--query", str(broken / "ok.png"), "-k", "0"])
    assert "argument -k: needs a whole number >= 1; got '0'" in capsys.readouterr().err
    assert main(["map", "--embeddings", str(tmp_path / "b")]) == 1  # one image: t-SNE's perplexity error before
    assert "A 2-D map needs at least 3 embeddings; the folder has 1" in capsys.readouterr().err
    assert list_images(str(root / "images"))[0].endswith(".png")


def test_embedding_lists_every_unreadable_file_not_the_first_chunks(tmp_path, capsys):
    """Images are embedded a chunk at a time; a failing run names the unreadable files of every chunk, so one
    fix-and-rerun suffices (it used to stop at the first chunk with a bad file and name only those)."""
    names = ["a.png", "bad1.jpg", "b.png", "c.png", "d.png", "bad2.png"]
    for n in names:
        if n.startswith("bad"):
            (tmp_path / n).write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(tmp_path / n)
    paths = [str(tmp_path / n) for n in names]
    backbone, dim = build_backbone("tiny_cnn", width=4)
    net = Encoder(backbone, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match=r"2 of 6 images in here could not be read:\n.*bad1.jpg.*\n.*bad2.png"):
        embed_paths(net, paths, 8, chunk=2, where="here")
    capsys.readouterr()
    with reporting_progress():  # as the command line runs it
        emb, kept = embed_paths(net, paths, 8, chunk=2, on_corrupt="skip")
    assert emb.shape == (4, dim) and kept == [p for p in paths if "bad" not in p]
    lines = capsys.readouterr().err.splitlines()  # embed's progress: a line a chunk (silent before, for any size)
    assert [re.sub(r"\d[\d,]* a second, about \d+ s left", "R", line) for line in lines] == [
        "2 of 6 images read, R (1 unreadable)", "4 of 6 images read, R (1 unreadable)",
        lines[2]], lines
    assert re.fullmatch(r"6 of 6 images read, [\d,]+ a second \(2 unreadable\)", lines[2])
    with reporting_progress():
        embed_paths(net, paths[:2], 8, chunk=2, on_corrupt="skip")  # one chunk: nothing to report
    embed_paths(net, paths, 8, chunk=2, on_corrupt="skip")  # outside reporting_progress: silent
    assert capsys.readouterr().err == ""


def test_map_png_and_tensorboard_projector(gallery, tmp_path, capsys, monkeypatch):
    root, ckpt = gallery
    emb = tmp_path / "emb"
    assert main(["embed", "--ckpt", ckpt, "--images", str(root / "images"), "--out", str(emb)]) == 0
    assert main(["map", "--embeddings", str(emb), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert "wrote the TensorBoard projector" in capsys.readouterr().out
    assert Image.open(emb / "map.png").size == (700, 700)
    files = {p.name for p in (tmp_path / "tb").rglob("*")}
    assert {"projector_config.pbtxt", "sprite.png", "metadata.tsv", "tensors.tsv"} <= files
    tsv = next((tmp_path / "tb").rglob("metadata.tsv")).read_text().splitlines()
    assert tsv[0] == "file\tclass" and len(tsv) == 91 and tsv[1].endswith("airplane")
    assert main(["map", "--embeddings", str(emb), "--method", "pca", "--out", str(tmp_path / "pca.png")]) == 0
    assert (tmp_path / "pca.png").exists()
    capsys.readouterr()
    # a larger folder draws a seeded sample (t-SNE of 50,000 took minutes, a million hours); the projector holds all
    drawn = []
    monkeypatch.setattr("ssl_toolkit.eval.search.embedding_map", lambda e, m: drawn.append(e) or e[:, :2])
    for _ in range(2):
        assert main(["map", "--embeddings", str(emb), "--max-points", "30", "--out", str(tmp_path / "some.png"),
                     "--tensorboard", str(tmp_path / "tb30")]) == 0
        assert f"wrote {tmp_path / 'some.png'} (tsne of 30 of 90 images in" in capsys.readouterr().out
    every, _, _ = load_embeddings(str(emb))
    rows = [next(i for i, e in enumerate(every) if np.array_equal(e, d)) for d in drawn[0]]
    assert len(rows) == 30 == len(set(rows)) and rows == sorted(rows) and np.array_equal(drawn[0], drawn[1])
    assert len(next((tmp_path / "tb30").rglob("metadata.tsv")).read_text().splitlines()) == 91
    # --out a folder wrote "<folder>.png" beside it and said "wrote <folder>"; a name without a suffix got .png
    # unsaid; a --tensorboard that cannot be written was a traceback after the PNG
    (tmp_path / "maps").mkdir()
    for given, written in (("maps", "maps/map.png"), ("plain", "plain.png"), ("new/", "new/map.png")):
        # "new/", a folder not made yet, wrote new/.png, a hidden file
        assert main(["map", "--embeddings", str(emb), "--method", "pca", "--out", f"{tmp_path}/{given}"]) == 0
        assert f"wrote {tmp_path / written} (pca of 90 images in" in capsys.readouterr().out
        assert (tmp_path / written).is_file()
    assert not (tmp_path / "maps.png").exists()
    (tmp_path / "taken").write_text("a file")
    assert main(["map", "--embeddings", str(emb), "--tensorboard", str(tmp_path / "taken"), "--out",
                 str(tmp_path / "never.png")]) == 1
    assert capsys.readouterr().err.strip().endswith("it is a file, where a folder is written. Choose another path "
                                                    "(--tensorboard).") and not (tmp_path / "never.png").exists()


def test_embed_index_search_and_map_start_without_lightning_kornia_or_dynamo(gallery, tmp_path):
    """They need torch, faiss and Pillow. Before, embed and search imported Lightning (through the image decoding
    and the checkpoint module), index and map did too (through ssl_toolkit.data), and every evaluation imported
    TorchDynamo (to run compiled modules eagerly): on 2 CPU cores `index` took 6.4-9.0 s and `search` 6.0-6.9 s
    with a tiny_cnn checkpoint, 2.1-2.9 s and 3.2-3.7 s now. torchvision comes only with a ResNet or ViT."""
    root, ckpt = gallery
    emb = str(tmp_path / "emb")
    query = str(root / "images" / "bird")
    code = ("import sys, contextlib, io\n"
            "from ssl_toolkit.cli import main\n"
            "heavy = ('pytorch_lightning', 'lightning_fabric', 'kornia', 'torch._dynamo', 'torchvision')\n"
            f"for args in ({['embed', '--ckpt', ckpt, '--images', str(root / 'images'), '--out', emb]!r},\n"
            f"             {['index', '--embeddings', emb]!r},\n"
            f"             {['search', '--index', emb + '/index.faiss', '--query', query, '-k', '3']!r},\n"
            f"             {['map', '--embeddings', emb, '--method', 'pca']!r}):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main(args) == 0, args\n"
            "    print(args[0], sorted(m for m in heavy if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:4] == ["embed []", "index []", "search []", "map []"]
