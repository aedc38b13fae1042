import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import mapped_from
from ssl_toolkit.data import CIFARDataModule, DigitsDataModule, ImageFolderDataModule, NpzDataModule
from ssl_toolkit.data import images
from ssl_toolkit.data.images import report_unreadable


def test_digits_is_offline_rgb_uint8_with_a_fixed_split():
    a, b = DigitsDataModule(image_size=24), DigitsDataModule(image_size=24)
    a.setup()
    b.setup()
    assert a.splits.x_train.shape == (1257, 3, 24, 24) and a.splits.x_test.shape == (540, 3, 24, 24)
    assert a.splits.x_train.dtype == torch.uint8 and a.num_classes == 10
    assert torch.equal(a.splits.y_test, b.splits.y_test) and torch.equal(a.splits.x_test, b.splits.x_test)
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (256, 3, 24, 24) and x.dtype == torch.uint8 and y.shape == (256,)


def write_npz(path, **over):
    arrays = dict(x_train=np.random.randint(0, 256, (20, 8, 8, 3), dtype=np.uint8), y_train=np.arange(20) % 4,
                  x_test=np.random.randint(0, 256, (8, 8, 8, 3), dtype=np.uint8), y_test=np.arange(8) % 4)
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return str(path)


def test_npz_reads_hwc_and_chw(tmp_path):
    dm = NpzDataModule(write_npz(tmp_path / "a.npz", classes=np.array(["a", "b", "c", "d"])), batch_size=4)
    dm.setup()
    assert dm.splits.x_train.shape == (20, 3, 8, 8) and dm.splits.classes == ["a", "b", "c", "d"]
    chw = NpzDataModule(write_npz(tmp_path / "b.npz", x_train=np.zeros((20, 3, 8, 8), np.uint8)))
    chw.setup()
    assert chw.splits.x_train.shape == (20, 3, 8, 8) and chw.num_classes == 4
    grey = np.arange(20 * 8 * 8, dtype=np.int64).astype(np.uint8).reshape(20, 8, 8)  # MNIST's (N, H, W) layout
    hw = NpzDataModule(write_npz(tmp_path / "c.npz", x_train=grey))
    hw.setup()
    assert hw.splits.x_train.shape == (20, 3, 8, 8) and all((hw.splits.x_train[:, c] == torch.from_numpy(grey)).all()
                                                            for c in range(3))


def test_npz_labels_may_be_class_names(tmp_path):
    names = np.array(["dog", "cat", "ship", "cat"])
    dm = NpzDataModule(write_npz(tmp_path / "s.npz", y_train=names[np.arange(20) % 4], y_test=names[np.arange(8) % 4]))
    dm.setup()
    assert dm.splits.classes == ["cat", "dog", "ship"] and dm.splits.y_train[:4].tolist() == [1, 0, 2, 0]
    given = NpzDataModule(write_npz(tmp_path / "g.npz", y_train=names[np.arange(20) % 4],
                                    y_test=names[np.arange(8) % 4], classes=np.array(["ship", "dog", "cat", "car"])))
    given.setup()
    assert given.num_classes == 4 and given.splits.y_test[:4].tolist() == [1, 2, 0, 2]
    whole = NpzDataModule(write_npz(tmp_path / "f.npz", y_train=(np.arange(20) % 4).astype(np.float32)))
    whole.setup()  # float labels that are whole numbers, as some pipelines save them
    assert whole.splits.y_train.dtype == torch.int64 and whole.num_classes == 4


@pytest.mark.parametrize("over,match", [
    ({"y_test": None}, "missing array.*y_test"),
    ({"y_train": np.full(20, 0.5)}, "y_train has float64 values that are not whole numbers"),
    ({"y_train": np.full(20, "cat"), "y_test": np.full(8, "dog"), "classes": np.array(["dog"])},
     r"labels \['cat'\] are not among the 1 names"),
    ({"y_train": np.arange(20) - 1}, r"labels must lie in \[0, 18\].*got \[-1, 18\]"),
    ({"y_test": np.zeros(0, np.int64)}, "y_test is empty"),
    ({"x_train": np.zeros((20, 8), np.uint8)}, r"x_train has shape \(20, 8\)"),
    ({"x_train": np.zeros((20, 8, 8, 2), np.uint8)}, r"x_train has shape \(20, 8, 8, 2\)"),
    ({"x_train": np.zeros((20, 8, 8, 3), np.float32)}, "x_train has dtype float32"),
    ({"y_train": np.arange(19)}, "one label per image"),
])
def test_npz_errors_name_the_key(tmp_path, over, match):
    dm = NpzDataModule(write_npz(tmp_path / "bad.npz", **over))
    with pytest.raises((KeyError, ValueError), match=match):
        dm.setup()


def test_cifar_loads_its_test_batch_alone_for_the_test_split(tmp_path, monkeypatch):
    """A CIFAR-10 folder in torchvision's layout (tiny batches; the checksums are not those of the real files, so
    torchvision's check is stood in for): ``only_test`` reads test_batch alone, so it works with the training
    batches gone."""
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {"data": np.full((2, 3072), 10 * i, np.uint8), "labels": [i % 10, (i + 1) % 10]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    full = CIFARDataModule(root=str(tmp_path))
    full.setup()
    assert full.splits.x_train.shape == (10, 3, 32, 32) and full.splits.x_test.shape == (2, 3, 32, 32)
    for name in names[:5]:
        (folder / name).unlink()
    dm = CIFARDataModule(root=str(tmp_path)).only_test()
    dm.setup()
    assert torch.equal(dm.splits.x_test, full.splits.x_test) and dm.splits.y_test.tolist() == [5, 6]
    assert dm.splits.classes == full.splits.classes and dm.num_classes == 10


def test_missing_sources_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="No .npz file"):
        NpzDataModule(str(tmp_path / "none.npz")).setup()
    with pytest.raises(FileNotFoundError, match="download=true"):
        CIFARDataModule(root=str(tmp_path / "nothing"), download=False).setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "nowhere")).setup()


def test_a_failed_download_says_how_to_do_without_one(tmp_path, monkeypatch):
    """Offline, torchvision's download raises URLError from deep in urllib; the recipes set download: true."""
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dm = CIFARDataModule(root=str(tmp_path / "data"), download=True)
    with pytest.raises(FileNotFoundError, match="could not download cifar10 .*Name or service not known.*"
                                                "cifar-10-batches-py.*NpzDataModule"):
        dm.prepare_data()
    assert not any(p.is_file() for p in (tmp_path / "data").rglob("*"))  # no partial archive left behind


def make_folder(root, corrupt=False, empty_class=False):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            if empty_class and split == "train" and c == "dog":
                continue
            for i in range(3):
                Image.fromarray(np.random.randint(0, 256, (20, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        good = (root / "train" / "dog" / "0.png").read_bytes()
        (root / "train" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_image_folder_decodes_resizes_and_center_crops(tmp_path):
    dm = ImageFolderDataModule(str(make_folder(tmp_path / "imgs")), image_size=16, batch_size=2)
    dm.setup()
    assert dm.splits.x_train.shape == (6, 3, 16, 16) and dm.splits.classes == ["cat", "dog"]
    assert dm.splits.y_test.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = next(iter(dm.train_dataloader()))  # a TypeError once: the folder's own _split shadowed the base's
    assert x.shape == (2, 3, 16, 16) and y.shape == (2,)
    x, y = next(dm.iter_split("test", 6))
    assert torch.equal(x, dm.splits.x_test) and y.tolist() == [0, 0, 0, 1, 1, 1]


def test_evaluators_of_the_test_split_load_nothing_else(tmp_path, flickr, count_cache_work, monkeypatch):
    """zeroshot, retrieval and pictures use the test split alone (``only_test``). An image folder's training images
    were decoded for them too (a CIFAR-10 folder: 50,000 decoded to score 10,000), and an unreadable one stopped
    them; a caption folder's were decoded, an .npz file's read."""
    from ssl_toolkit.data import CaptionDataModule

    root = make_folder(tmp_path / "imgs", corrupt=True)  # the unreadable files are training images
    full = ImageFolderDataModule(str(root), image_size=16, on_corrupt="skip", num_workers=0)
    full.setup()
    decodes, _ = count_cache_work()
    dm = ImageFolderDataModule(str(root), image_size=16, num_workers=0).only_test()
    dm.setup()
    assert decodes == [6]  # val/'s six images, nothing of train/
    assert torch.equal(dm.splits.x_test, full.splits.x_test) and torch.equal(dm.splits.y_test, full.splits.y_test)
    assert dm.num_classes == 2 and next(dm.iter_split("test", 6))[1].tolist() == [0, 0, 0, 1, 1, 1]
    for use in (lambda: dm.split_size("train"), dm.train_dataloader):
        with pytest.raises(RuntimeError, match="was loaded with its test split only"):
            use()
    # the test split alone needs no train/: class folders as they are (ImageNet's val/), or val/ without train/ (both
    # were unlabelled, or refused, for zero-shot); training still reads a folder without train/ and val/ as unlabelled
    shutil.copytree(root / "val", tmp_path / "only" / "val")
    for folder in (root / "val", tmp_path / "only"):
        alone = ImageFolderDataModule(str(folder), image_size=16, num_workers=0).only_test()
        alone.setup()
        assert alone.splits.classes == ["cat", "dog"] and torch.equal(alone.splits.x_test, full.splits.x_test)
        assert torch.equal(alone.splits.y_test, full.splits.y_test)
    unlabelled = ImageFolderDataModule(str(root / "val"), image_size=16, num_workers=0)
    unlabelled.setup()
    assert unlabelled.num_classes == 0 and len(unlabelled.splits.x_train) == 6
    shutil.copy(root / "val" / "cat" / "0.png", root / "val" / "loose.png")  # images of its own: a collection
    loose = ImageFolderDataModule(str(root / "val"), image_size=16, num_workers=0).only_test()
    loose.setup()
    assert loose.num_classes == 0 and len(loose.splits.x_test) == 7
    (root / "val" / "loose.png").unlink()

    read = []
    getitem = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda f, k: read.append(k) or getitem(f, k))
    npz = NpzDataModule(write_npz(tmp_path / "a.npz")).only_test()
    npz.setup()
    assert "x_train" not in read and npz.splits.x_test.shape == (8, 3, 8, 8) and npz.num_classes == 4

    decodes.clear()
    captions = CaptionDataModule(str(flickr), image_size=8, num_workers=0).only_test()
    texts, image = captions.captions("test")
    assert decodes == [200] and len(captions.splits.x_test) == 200 and len(texts) == 1000 and image.max() == 199
    whole = CaptionDataModule(str(flickr), image_size=8, num_workers=0)
    assert whole.captions("test")[0] == texts and torch.equal(whole.splits.x_test, captions.splits.x_test)
    assert torch.equal(whole.tokens["test"], captions.tokens["test"])  # the tokenizer of the training captions
    with pytest.raises(RuntimeError, match="was loaded with its test split only"):
        captions.captions("train")


def test_the_test_split_alone_maps_a_runs_cache_entry_and_writes_none(tmp_path, count_cache_work):
    """With data.cache_dir (recorded in the checkpoint), zeroshot and pictures wrote an entry of the test split
    alone: on disk again what the training run's entry holds. They map that entry when it is there, and otherwise
    decode the test split without writing one."""
    root, cache = str(make_folder(tmp_path / "imgs")), tmp_path / "cache"
    decodes, _ = count_cache_work()
    fresh = ImageFolderDataModule(root, image_size=8, num_workers=0, cache_dir=str(cache)).only_test()
    fresh.setup()
    assert decodes == [6] and not cache.exists()  # val/ decoded, nothing written
    run = ImageFolderDataModule(root, image_size=8, num_workers=0, cache_dir=str(cache))
    run.setup()  # a training run: both splits decoded into one entry
    entries = sorted(p.name for p in cache.iterdir())
    decodes.clear()
    dm = ImageFolderDataModule(root, image_size=8, num_workers=0, cache_dir=str(cache)).only_test()
    dm.setup()
    assert decodes == [] and sorted(p.name for p in cache.iterdir()) == entries and len(entries) == 1
    assert torch.equal(dm.splits.x_test, run.splits.x_test) and torch.equal(dm.splits.x_test, fresh.splits.x_test)


def test_an_image_folder_without_train_and_val_is_unlabelled(tmp_path):
    root = tmp_path / "photos"
    for i, sub in enumerate(["", "2019", "2019/june", "2020", "2020"]):
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 18, 3), 40 * i, np.uint8)).save(root / sub / f"{i}.jpg")
    (root / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(str(root), image_size=8, batch_size=2)
    assert dm.num_classes == 0 and dm.splits.x_train.shape == (5, 3, 8, 8)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 8, 8)
    assert torch.equal(next(dm.iter_split("test", 8))[0], dm.splits.x_train)  # test is the training set: no labels
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"has no images .* folder of images \(unlabelled\)"):
        ImageFolderDataModule(str(tmp_path / "empty")).setup()


def test_image_folder_corrupt_files_fail_with_the_list_or_are_skipped_and_counted(tmp_path, caplog, monkeypatch):
    root = make_folder(tmp_path / "imgs", corrupt=True)
    with pytest.raises(ValueError, match=r"2 of 8 images.*could not be read") as e:
        ImageFolderDataModule(str(root), image_size=8).setup()
    assert "broken.jpg" in str(e.value) and "truncated.png" in str(e.value) and "on_corrupt=skip" in str(e.value)
    monkeypatch.setattr(images, "IMAGES_PER_PROCESS", 1)  # decoded in 2 other processes, as a large folder is
    dm = ImageFolderDataModule(str(root), image_size=8, on_corrupt="skip", num_workers=2)
    dm.setup()
    assert dm.num_skipped == 2 and len(dm.splits.y_train) == 6
    assert "Skipped 2 unreadable images" in caplog.text
    caplog.clear()  # one of them, and many: the count reads right and the log line says how many it leaves out
    report_unreadable([("a.jpg", "cannot identify image")], 8, "imgs", "skip")
    report_unreadable([(f"{i}.jpg", "truncated") for i in range(25)], 30, "imgs", "skip")
    assert caplog.messages[-2:] == ["Skipped 1 unreadable image in imgs: a.jpg",
                                    "Skipped 25 unreadable images in imgs: "
                                    + ", ".join(f"{i}.jpg" for i in range(20)) + " and 5 more"]


def test_unreadable_files_of_both_splits_are_named_in_one_run(tmp_path, caplog):
    """train/'s bad files stopped the run before val/ was read, so val/'s were named only on the next run (after a
    whole decode of train/ again)."""
    root = make_folder(tmp_path / "imgs", corrupt=True)
    (root / "val" / "dog" / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"3 of 15 images in {root / 'train'} and {root / 'val'} could not be "
                                         "read") as e:
        ImageFolderDataModule(str(root), image_size=8).setup()
    assert all(name in str(e.value) for name in ("broken.jpg", "truncated.png", "empty.jpg")), e.value
    dm = ImageFolderDataModule(str(root), image_size=8, on_corrupt="skip")
    dm.setup()
    assert dm.num_skipped == 3 and len(dm.splits.y_train) == 6 and dm.splits.y_test.tolist() == [0, 0, 0, 1, 1, 1]
    (root / "val" / "dog" / "empty.jpg").unlink()
    (root / "val" / "bird").mkdir()
    (root / "val" / "bird" / "0.png").write_bytes((root / "val" / "dog" / "0.png").read_bytes())
    with pytest.raises(ValueError, match=r"has classes \['bird', 'cat', 'dog'\] but train/ has \['cat', 'dog'\]"):
        ImageFolderDataModule(str(root), image_size=8).setup()  # before any decoding: not after train/'s bad files


def test_16_bit_grey_images_keep_their_range_and_float_images_are_refused(tmp_path):
    """Pillow's convert("RGB") clips 16-bit grey at 255 (a mid-grey ramp came out 254.5 on average) and turns
    floats black; the decoder must give what the same picture saved as 8 bits gives."""
    from ssl_toolkit.data.images import decode_images

    wide = (np.arange(24 * 24, dtype=np.int64).reshape(24, 24) * 113).astype(np.uint16)  # 0 .. 64,975
    Image.fromarray(wide).save(tmp_path / "g16.png")
    Image.fromarray(wide).save(tmp_path / "g16.tif")
    Image.fromarray((wide >> 8).astype(np.uint8)).save(tmp_path / "g8.png")
    Image.fromarray(wide.astype(np.int32)).save(tmp_path / "i32.tif")  # Pillow mode I
    x, keep, skipped = decode_images([str(tmp_path / n) for n in ("g16.png", "g16.tif", "i32.tif", "g8.png")], 24, 0,
                                     "fail", "here")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16") and skipped == 0
    for i in range(3):
        assert torch.equal(x[i], x[3]), i
    assert x[3].float().mean() == pytest.approx((wide >> 8).mean(), abs=0.01) and x[3].float().mean() < 130
    Image.fromarray(np.random.rand(24, 24).astype(np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.full((24, 24), -5, np.int32)).save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"2 of 3 images") as e:
        decode_images([str(tmp_path / n) for n in ("f.tif", "neg.tif", "g8.png")], 24, 0, "fail", "here")
    assert "f.tif: ValueError: floating-point image" in str(e.value) and "save it as 8- or 16-bit" in str(e.value)
    assert "neg.tif: ValueError: 32-bit integer image with values in [-5, -5]" in str(e.value)


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    from ssl_toolkit.data.images import decode_images

    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # stored landscape, left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: portrait, top half white
    Image.fromarray(a).save(tmp_path / "phone.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(a, -1))).save(tmp_path / "upright.png")
    x, _, _ = decode_images([str(tmp_path / "phone.png"), str(tmp_path / "upright.png")], 20, 0, "fail", "here")
    assert torch.equal(x[0], x[1]) and x[0, :, :10].float().mean() == 255 and x[0, :, 10:].float().mean() == 0


def test_large_jpegs_are_decoded_reduced_to_the_centred_square_in_every_orientation(flickr, tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    from ssl_toolkit.data.images import decode_files

    photo = Image.open(flickr / "images" / "1716445442_9cf3528342.jpg").convert("RGB")  # 500 x 375
    stored = {1: None, 2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_90",
              7: "TRANSVERSE", 8: "ROTATE_270"}  # how a camera stores the upright photo with each EXIF orientation
    paths = []
    for orientation, turn in stored.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        paths.append(str(tmp_path / f"{orientation}.jpg"))
        (photo.transpose(Image.Transpose[turn]) if turn else photo).save(paths[-1], quality=95, exif=exif)
    scales, draft = [], JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = draft(self, mode, size)
        scales.append(self.decoderconfig[0])
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    x, _, bad = decode_files(paths, 32, 0)
    assert not bad and scales == [8] * 8  # 375 px decoded as 47: still >= 32
    # the same pixels as an area average of the upright photo's centred 375 x 375 square, in every orientation
    area = torch.from_numpy(np.array(photo.resize((32, 32), Image.BOX, box=(62.5, 0, 437.5, 375)))).permute(2, 0, 1)
    err = (x.float() - area.float()).abs().mean((1, 2, 3))
    assert err.max() < 6.5, err  # 5.84-6.10; 4.70 decoded whole; 11.3 resized whole, then cropped
    assert (x[0].flip(1, 2).float() - area.float()).abs().mean() > 40  # the photo upside down: 56


def test_symlinked_folders_are_followed_once_each(tmp_path):
    """A set assembled from links to folders elsewhere (class subsets of a shared copy) lost every linked folder's
    images without a word; a link back up the tree must not loop, nor a folder reached twice count twice."""
    from ssl_toolkit.data.images import image_files

    elsewhere = tmp_path / "shared" / "cats"
    elsewhere.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(elsewhere / f"{i}.png")
    root = tmp_path / "set"
    (root / "dogs").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "dogs" / "0.png")
    (root / "cats").symlink_to(elsewhere)
    (root / "dogs" / "up").symlink_to(root)  # a loop
    (root / "more").symlink_to(root / "cats")  # the same folder again
    assert [os.path.relpath(p, root) for p in image_files(root)] == ["cats/0.png", "cats/1.png", "cats/2.png",
                                                                     "dogs/0.png"]
    dm = ImageFolderDataModule(str(root), image_size=8, num_workers=0)
    dm.setup()
    assert len(dm.splits.x_train) == 4


def test_gif_avif_jfif_are_read_and_unread_formats_are_said(tmp_path, caplog):
    """.gif, .avif and .jfif, which Pillow decodes, were not listed; HEIC (iPhones' default), raw and other formats
    that are not read vanished without a word from a folder that mixed them with JPEGs."""
    from PIL import features

    from ssl_toolkit.data.images import image_files

    root = make_folder(tmp_path / "imgs")
    photo = Image.fromarray(np.random.randint(0, 256, (20, 30, 3), dtype=np.uint8))
    for name in ("a.gif", "b.jfif") + (("c.avif",) if features.check("avif") else ()):
        photo.save(root / "val" / "cat" / name, format={"jfif": "JPEG"}.get(name[-4:], None))
    for folder, name in (("cat", "d.HEIC"), ("cat", "e.heic"), ("dog", "f.dng")):
        (root / "train" / folder / name).write_bytes(b"x")
    with caplog.at_level("WARNING"):
        dm = ImageFolderDataModule(str(root), image_size=8, num_workers=0)
        dm.setup()
    assert len(dm.splits.x_test) == 6 + 2 + features.check("avif") and len(dm.splits.x_train) == 6
    warned = [r.getMessage() for r in caplog.records if "formats that are not read" in r.getMessage()]
    assert warned == [f"{root / 'train'}: 3 images in formats that are not read (2 .heic, 1 .dng) left out: convert "
                      "them to JPEG or PNG to include them."]  # one line for the split, not one per class folder
    only = tmp_path / "iphone" / "train" / "cat"
    only.mkdir(parents=True)
    (only / "1.heic").write_bytes(b"x")
    (tmp_path / "iphone" / "val" / "cat").mkdir(parents=True)
    photo.save(tmp_path / "iphone" / "val" / "cat" / "1.png")
    with pytest.raises(FileNotFoundError, match=r"has no images \(.*\) \(1 image in formats that are not read \(1 "
                                                r"\.heic\) left out: convert them to JPEG or PNG"):
        ImageFolderDataModule(str(tmp_path / "iphone")).setup()
    assert image_files(only) == []


def test_hidden_files_and_folders_are_not_images_or_classes(tmp_path):
    """A folder copied from a Mac (to a USB drive, a share, a zip) has a ``._name`` metadata file beside each image
    and, unzipped, a ``__MACOSX/`` copy of the tree of them; Jupyter leaves ``.ipynb_checkpoints``. None of them
    are images or classes: they had stopped the run as unreadable images, or as a class folder without images."""
    root = make_folder(tmp_path / "imgs")
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)  # its magic, then a header
    for d in (root / "train" / "cat", root / "__MACOSX" / "train" / "cat", root / "val" / ".ipynb_checkpoints"):
        d.mkdir(parents=True, exist_ok=True)
        (d / "._0.png").write_bytes(apple_double)
    (root / "train" / ".ipynb_checkpoints").mkdir()  # an empty class folder, in train/ only
    dm = ImageFolderDataModule(str(root), image_size=8)
    dm.setup()
    assert dm.splits.classes == ["cat", "dog"] and len(dm.splits.y_train) == 6 and len(dm.splits.y_test) == 6
    photos = tmp_path / "photos"  # unlabelled, unzipped from a Mac
    for d in (photos / "2020", photos / "__MACOSX" / "2020", photos / ".thumbnails"):
        d.mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(photos / "2020" / "a.jpg")
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(photos / ".thumbnails" / "a.jpg")
    for d in (photos / "2020", photos / "__MACOSX" / "2020"):
        (d / "._a.jpg").write_bytes(apple_double)
    assert images.image_files(photos) == [str(photos / "2020" / "a.jpg")]
    dm = ImageFolderDataModule(str(photos), image_size=8)
    dm.setup()
    assert dm.splits.x_train.shape == (1, 3, 8, 8)


def test_image_folder_empty_class_and_missing_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="dog has no images"):
        ImageFolderDataModule(str(make_folder(tmp_path / "a", empty_class=True))).setup()
    (tmp_path / "b" / "train" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="needs train/ and val/"):
        ImageFolderDataModule(str(tmp_path / "b")).setup()


def test_resident_mode_moves_indices_and_gathers_images_on_the_device(tmp_path):
    dm = NpzDataModule(write_npz(tmp_path / "a.npz"), batch_size=5, resident=True)
    (idx,) = next(iter(dm.train_dataloader()))
    assert idx.dtype == torch.int64 and idx.shape == (5,)
    x, y = dm.transfer_batch_to_device((idx,), torch.device("cpu"), 0)
    assert torch.equal(x, dm.splits.x_train[idx]) and torch.equal(y, dm.splits.y_train[idx])
    xs, ys = zip(*dm.iter_split("test", batch_size=3))
    assert torch.equal(torch.cat(xs), dm.splits.x_test) and torch.equal(torch.cat(ys), dm.splits.y_test)


def test_batch_larger_than_the_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lower data.batch_size"):
        NpzDataModule(write_npz(tmp_path / "a.npz"), batch_size=64).train_dataloader()


def test_real_cifar_subset_loads(cifar_small):
    dm = NpzDataModule(str(cifar_small))
    dm.setup()
    assert dm.splits.x_train.shape == (2000, 3, 32, 32) and dm.splits.classes[0] == "airplane"
    mean = dm.splits.x_train.float().div(255).mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.02)


def test_decoding_a_folder_holds_the_images_once(tmp_path):
    """Decoded images go into the result as they arrive. They used to be collected as arrays, stacked and made
    channels-first: three copies at the peak (1.8 GB for CIFAR-10's 50,000 training images at 64 px, whose set is
    0.6 GB; benchmarks/folder_memory.py). tracemalloc sees numpy's (and Pillow's Python) allocations, not the
    result's torch buffer: the arrays held at once were all of them, now one."""
    import tracemalloc

    from ssl_toolkit.data.images import decode_files

    paths = []
    for i in range(600):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((20, 24, 3), i % 256, np.uint8)).save(paths[-1])
    paths.insert(7, str(tmp_path / "missing.png"))
    tracemalloc.start()
    try:
        x, keep, bad = decode_files(paths, 16, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert x.shape == (600, 3, 16, 16) and x.is_contiguous() and [p for p, _ in bad] == [paths[7]]
    assert torch.equal(keep, torch.tensor([i for i in range(601) if i != 7]))
    assert torch.equal(x[:, 0, 0, 0], torch.arange(600) % 256) and torch.equal(x.amin((1, 2, 3)), x.amax((1, 2, 3)))
    # 460 KB of images: the old way peaked at 2.7x that in numpy arrays alone; now Pillow's ~0.1 MB for one image
    assert peak < x.numel() / 2, (peak, x.numel())


def test_decoding_a_large_folder_says_how_far_it_is(tmp_path, monkeypatch, capsys):
    """A folder of 100,000 photos takes minutes to decode before the first step, in silence before. Under the
    command line (reporting_progress) each split's decoding prints a line at most every 10 s (every image here)."""
    import re

    from ssl_toolkit import progress

    root = make_folder(tmp_path / "imgs")
    ImageFolderDataModule(str(root), image_size=8).setup()
    assert capsys.readouterr().err == ""  # a library call: silent
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0)
    monkeypatch.setattr(images, "IMAGES_PER_PROCESS", 1)  # decoded in 2 other processes, as a large folder is
    with progress.reporting_progress():
        ImageFolderDataModule(str(root), image_size=8, num_workers=2).setup()
    lines = [re.sub(r"\d[\d,]* a second(, about \d+ s left)?", "R", line)
             for line in capsys.readouterr().err.splitlines()]
    assert lines == [f"{root / split}: {i} of 6 images decoded, R" for split in ("train", "val") for i in range(1, 7)]
    # with a cache, a hit decodes nothing but still looks up every file: millions take minutes on a network disk
    ImageFolderDataModule(str(root), image_size=8, cache_dir=str(tmp_path / "cache")).setup()
    with progress.reporting_progress():
        ImageFolderDataModule(str(root), image_size=8, cache_dir=str(tmp_path / "cache")).setup()
    lines = [re.sub(r"\d[\d,]* a second(, about \d+ s left)?", "R", line)
             for line in capsys.readouterr().err.splitlines()]
    assert lines == [f"{root}: {i} of 12 files checked against the cache, R" for i in range(1, 13)]


def test_a_folder_is_decoded_on_every_core_unless_it_is_small(tmp_path, monkeypatch, caplog):
    """Decoding took one process unless data.num_workers was set: hours for an ImageNet-sized folder on a node of
    dozens of cores. By default (``None``) it takes one process per core this process may run on, shared out among
    the DDP ranks of a node when they all decode (no cache); a set too small to repay starting a pool is decoded
    here."""
    from types import SimpleNamespace

    pools = []
    real_pool = images.ProcessPoolExecutor
    monkeypatch.setattr(images, "ProcessPoolExecutor", lambda n: pools.append(n) or real_pool(n))
    monkeypatch.setattr(images.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(images.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    root = make_folder(tmp_path / "imgs")  # 6 images a split
    here = ImageFolderDataModule(str(root), image_size=8, num_workers=0)
    here.setup()
    assert pools == []
    ImageFolderDataModule(str(root), image_size=8).setup()
    assert pools == [], "6 images: a pool of processes costs more than it saves"

    monkeypatch.setattr(images, "IMAGES_PER_PROCESS", 1)  # as if every split were large
    dm = ImageFolderDataModule(str(root), image_size=8)
    dm.setup()
    assert pools == [4, 4]  # one per core, each split
    assert torch.equal(dm.splits.x_train, here.splits.x_train) and torch.equal(dm.splits.x_test, here.splits.x_test)
    for workers, expected in ((0, []), (1, []), (3, [3, 3])):  # as set; one other process is no faster than this one
        pools.clear()
        ImageFolderDataModule(str(root), image_size=8, num_workers=workers).setup()
        assert pools == expected, workers

    ddp = SimpleNamespace(num_devices=2)  # setup under DDP: both ranks of the node decode at once, 2 cores each
    for cache_dir, expected in ((None, [2, 2]), (str(tmp_path / "cache"), [4, 4])):
        pools.clear()
        caplog.clear()
        dm = ImageFolderDataModule(str(root), image_size=8, cache_dir=cache_dir)
        dm.trainer = ddp
        dm.prepare_data()  # with a cache, one process per node decodes, with every core, before the ranks' setup
        dm.setup()  # which maps the entry
        assert pools == expected, cache_dir
        hint = "Each of the 2 processes on this node decodes imgs and holds its own copy; set data.cache_dir"
        assert (hint in caplog.text) == (cache_dir is None), caplog.text  # a copy per rank: how to share one
    pools.clear()
    monkeypatch.setattr(images.os, "cpu_count", lambda: 16)  # bound to 4 of 16 cores (SLURM binds each rank):
    dm = ImageFolderDataModule(str(root), image_size=8)  # those are its own share
    dm.trainer = ddp
    dm.setup()
    assert pools == [4, 4]
    with pytest.raises(ValueError, match=r"data.num_workers must be >= 0, or null for one decoding process per CPU "
                                         r"core; got -1"):
        ImageFolderDataModule(str(root), num_workers=-1)


def test_a_cached_folder_is_decoded_once_then_mapped_by_every_run(tmp_path, count_cache_work, caplog):
    """With data.cache_dir the decoded images go to .npy files that later runs (and the DDP ranks of a node, which
    decoded and held a copy each: 8 on an 8-GPU node) map instead of decoding. The unreadable files are remembered:
    a run on the cache stops with their list, or skips them, as one that decodes does."""
    root, store = make_folder(tmp_path / "imgs", corrupt=True), tmp_path / "cache"
    plain = ImageFolderDataModule(str(root), image_size=8, on_corrupt="skip")
    plain.setup()
    decodes, keyed = count_cache_work()
    first = ImageFolderDataModule(str(root), image_size=8, on_corrupt="skip", batch_size=2, cache_dir=str(store))
    first.prepare_data()  # Lightning: once per node, before each rank's setup
    first.setup()
    assert decodes == [8, 6]  # train/ (with its 2 unreadable files) and val/, once
    assert keyed == [str(root)]  # setup reuses what prepare_data listed and mapped, where it listed all again
    first.prepare_data()  # a second fit with the same DataModule: set up already, nothing to list, nothing held
    assert keyed == [str(root)]
    entries = list(store.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("imgs-8px-")
    assert mapped_from(first.splits.x_train, entries[0] / "0.npy") and mapped_from(first.splits.x_test,
                                                                                    entries[0] / "1.npy")
    for dm in (first, ImageFolderDataModule(str(root), image_size=8, on_corrupt="skip", batch_size=2,
                                            cache_dir=str(store))):
        dm.setup()
        assert dm.num_skipped == 2 and dm.splits.classes == plain.splits.classes
        for name in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(dm.splits, name), getattr(plain.splits, name)), name
        x, _ = next(iter(dm.train_dataloader()))
        assert x.shape == (2, 3, 8, 8)
    assert decodes == [8, 6] and "Skipped 2 unreadable images" in caplog.text
    with pytest.raises(ValueError, match=r"2 of 8 images.*could not be read") as e:
        ImageFolderDataModule(str(root), image_size=8, cache_dir=str(store)).setup()
    assert "broken.jpg" in str(e.value) and "truncated.png" in str(e.value) and decodes == [8, 6]

    # a changed file (or size) is a new entry, decoded afresh; the unchanged old one stays
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "val" / "dog" / "2.png")
    changed = ImageFolderDataModule(str(root), image_size=8, on_corrupt="skip", cache_dir=str(store))
    changed.setup()
    assert decodes == [8, 6, 8, 6] and len(list(store.iterdir())) == 2
    assert changed.splits.x_test[-1].max() == 0 and torch.equal(changed.splits.x_test[:-1], plain.splits.x_test[:-1])
    ImageFolderDataModule(str(root), image_size=16, on_corrupt="skip", cache_dir=str(store)).setup()
    assert decodes == [8, 6] * 3 and len(list(store.iterdir())) == 3

    # unlabelled: one part, and "test" is the training set itself
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((12, 18, 3), 50 * i, np.uint8)).save(photos / f"{i}.jpg")
    for _ in range(2):
        dm = ImageFolderDataModule(str(photos), image_size=8, cache_dir=str(store))
        dm.setup()
        assert dm.num_classes == 0 and dm.splits.x_test is dm.splits.x_train and dm.splits.x_train.shape[0] == 3
    assert decodes == [8, 6] * 3 + [3]


def test_a_write_clears_what_killed_writers_on_this_host_left(tmp_path, caplog):
    """A writer killed mid-write (SIGKILL, out of memory, a job's time limit) left its partial entry in the cache for
    good: up to a whole decoded set on disk each time. The next write on that host removes the partial entries whose
    process is gone; a live writer's, and other hosts' (a shared filesystem), stay."""
    import logging
    import os
    import socket
    import subprocess
    import sys

    root, store = make_folder(tmp_path / "imgs"), tmp_path / "cache"
    host = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left_by = {"killed": f"imgs-8px-0123456789abcdef.partial-{host}-{gone.pid}-00ff00ff",
               "running": f"imgs-8px-0123456789abcdef.partial-{host}-{os.getpid()}-00ff00ff",
               "other host": f"imgs-8px-0123456789abcdef.partial-elsewhere-{gone.pid}-00ff00ff"}
    for name in left_by.values():
        (store / name).mkdir(parents=True)
        (store / name / "0.npy").write_bytes(bytes(1000))
    with caplog.at_level(logging.INFO, logger="ssl_toolkit.data.cache"):
        ImageFolderDataModule(str(root), image_size=8, cache_dir=str(store)).setup()
    left = {p.name for p in store.iterdir()}
    assert left_by["killed"] not in left and {left_by["running"], left_by["other host"]} <= left and len(left) == 3
    assert f"Removed 1 partial cache entry that killed writers left in {store}: {left_by['killed']}" in caplog.text


def test_a_damaged_or_unwritable_cache_costs_a_decode_not_the_run(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs")
    plain = ImageFolderDataModule(str(root), image_size=8)
    plain.setup()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    dm = ImageFolderDataModule(str(root), image_size=8, cache_dir=str(blocked))
    dm.setup()
    assert torch.equal(dm.splits.x_train, plain.splits.x_train)
    assert f"Could not cache the decoded images of {root} in {blocked}" in caplog.text

    store = tmp_path / "cache"
    ImageFolderDataModule(str(root), image_size=8, cache_dir=str(store)).setup()
    (entry,) = store.iterdir()
    (entry / "1.npy").write_bytes((entry / "1.npy").read_bytes()[:200])  # cut short: a full disk, a killed copy
    caplog.clear()
    dm = ImageFolderDataModule(str(root), image_size=8, cache_dir=str(store))
    dm.setup()
    assert "is incomplete or damaged" in caplog.text
    assert torch.equal(dm.splits.x_test, plain.splits.x_test) and mapped_from(dm.splits.x_test, entry / "1.npy")
    assert [p.name for p in store.iterdir()] == [entry.name]  # rewritten in place, no partial entry left


def test_data_paths_starting_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    """A recipe's `path: ~/data/cifar10.npz` (YAML, or `--data.path=~/...`, which the shell leaves as it is) was read
    as a folder named '~' under the working directory: "No .npz file at '/work/~/data/cifar10.npz'"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir("/")
    write_npz(tmp_path / "set.npz")
    make_folder(tmp_path / "imgs")
    npz = NpzDataModule("~/set.npz", batch_size=4)
    npz.setup()
    assert npz.splits.x_train.shape[0] == 20 and npz.name == "set.npz"
    folder = ImageFolderDataModule("~/imgs", image_size=8, batch_size=2)
    folder.setup()
    assert folder.splits.classes == ["cat", "dog"] and folder.name == "imgs"
    assert CIFARDataModule("~/cifar").root == str(tmp_path / "cifar")
    monkeypatch.setenv("SSL_TOOLKIT_DATA", str(tmp_path))  # $DATA/... in a recipe, as clusters' paths go
    assert NpzDataModule("$SSL_TOOLKIT_DATA/set.npz").path == str(tmp_path / "set.npz")
    cached = ImageFolderDataModule("$SSL_TOOLKIT_DATA/imgs", image_size=8, cache_dir="$SSL_TOOLKIT_DATA/cache")
    cached.setup()
    assert [p.name.split("-")[:2] for p in (tmp_path / "cache").iterdir()] == [["imgs", "8px"]]
