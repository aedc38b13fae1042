from dataclasses import replace

import pytest
import pytorch_lightning as pl
import torch

from conftest import DIGITS_MEAN, DIGITS_STD, knn_before_and_after
from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.losses import masked_l2, pretext_cross_entropy
from ssl_toolkit.methods import Inpainting, Jigsaw, OptimConfig, Rotation
from ssl_toolkit.views import (InpaintingViews, JigsawViews, RotationViews, ViewConfig, hamming_permutations,
                               inpainting_masks)
from ssl_toolkit.views.pretext import cut_tiles, min_pairwise_hamming, rotate

# No augmentation at all: a view is the normalised image itself.
PLAIN = ViewConfig(crop_size=12, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def normalised(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - 0.5) / 0.25


# ---- rotation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("all_rotations", [True, False])
def test_rotating_each_view_back_by_its_label_recovers_the_input(all_rotations):
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    views = RotationViews(PLAIN, all_rotations=all_rotations)(images)
    x, k = views.crops[0], views.targets
    assert len(x) == (24 if all_rotations else 6)
    if all_rotations:
        assert k.tolist() == [r for r in range(4) for _ in range(6)]  # every image in all four rotations
    back = torch.stack([torch.rot90(v, -int(r), dims=(-2, -1)) for v, r in zip(x, k)])
    assert torch.allclose(back, normalised(images).repeat(len(x) // 6, 1, 1, 1), atol=1e-5)
    if not all_rotations:
        ks = torch.cat([RotationViews(PLAIN, all_rotations=False)(images).targets for _ in range(20)])
        assert set(ks.tolist()) == {0, 1, 2, 3}  # drawn per image


def test_rotate_matches_rot90_per_image():
    x = torch.randn(5, 3, 8, 8)
    k = torch.tensor([0, 1, 2, 3, 5])
    for i in range(5):
        assert torch.equal(rotate(x, k)[i], torch.rot90(x[i], int(k[i]) % 4, dims=(-2, -1)))
    with pytest.raises(ValueError, match="square"):
        rotate(torch.zeros(1, 3, 8, 6), torch.tensor([1]))


def test_pretext_cross_entropy_and_accuracy():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = pretext_cross_entropy(logits, torch.tensor([0, 1]))
    expected = (-torch.log_softmax(logits, 1)[[0, 1], [0, 1]]).mean()
    assert out["ce_loss"].item() == pytest.approx(expected.item()) and out["acc"].item() == 0.5


# ---- jigsaw --------------------------------------------------------------------------------------------------

def test_permutation_set_is_unique_fixed_and_keeps_its_minimum_hamming_distance():
    perms = hamming_permutations(100)
    assert perms.shape == (100, 9)
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())  # each row a permutation of the 9 tiles
    assert len({tuple(p) for p in perms.tolist()}) == 100  # no duplicates
    assert min_pairwise_hamming(perms) >= 6  # measured: 6 for P=100 with greedy farthest-point selection
    assert torch.equal(perms, hamming_permutations(100))  # fixed seed: the same classes on every rank and run
    assert min_pairwise_hamming(hamming_permutations(24, n=4)) == 2  # all 4!: two permutations differ in >= 2 places
    with pytest.raises(ValueError, match="lower num_permutations to"):
        hamming_permutations(100, min_distance=8)
    with pytest.raises(ValueError, match=r"num_permutations must be in \[2, 24\]"):
        hamming_permutations(25, n=4)


def test_unpermuting_tiles_by_the_label_restores_the_grid():
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    policy = JigsawViews(PLAIN, grid=3, tile=4, num_permutations=30, normalize_tiles=False)  # tile = cell: no gap
    views = policy(images)
    tiles = views.crops[0].view(4, 9, 3, 4, 4)
    order = policy.perms[views.targets]  # (B, 9): position j shows cell order[j]
    cells = torch.empty_like(tiles)
    cells[torch.arange(4)[:, None], order] = tiles  # put every tile back in its cell
    grid = cells.view(4, 3, 3, 3, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(4, 3, 12, 12)
    assert torch.allclose(grid, normalised(images), atol=1e-5)


def test_tiles_stay_inside_their_cells_and_are_normalised_per_tile():
    x = torch.arange(12.0).view(1, 1, 1, 12).expand(1, 1, 12, 12)  # value = column index
    offsets = torch.tensor([[[0, 2]] * 9])
    tiles = cut_tiles(x, grid=3, tile=2, offsets=offsets)  # (1, 9, 1, 2, 2)
    assert tiles[0, :3, 0, 0].tolist() == [[2.0, 3.0], [6.0, 7.0], [10.0, 11.0]]  # cell column + offset 2
    views = JigsawViews(ViewConfig(crop_size=12), grid=3, tile=3, num_permutations=10)(
        torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    t = views.crops[0]
    assert torch.allclose(t.mean((-2, -1)), torch.zeros(72, 3), atol=1e-4)  # per tile and channel
    assert views.targets.min() >= 0 and views.targets.max() < 10


def test_jigsaw_bad_settings_say_the_fix():
    with pytest.raises(ValueError, match="crop_size 32 is not a multiple of 3. Use crop_size 30 or 33"):
        JigsawViews(ViewConfig(crop_size=32))
    with pytest.raises(ValueError, match="tile 11 must be between 1 and the cell side 10"):
        JigsawViews(ViewConfig(crop_size=30), tile=11)
    with pytest.raises(ValueError, match="lower num_permutations"):
        Jigsaw(BackboneConfig("tiny_cnn", width=4), num_permutations=200, min_distance=7)
    from ssl_toolkit.data import DigitsDataModule

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    # a batch of one image stopped the first step with batch norm's "Expected more than 1 value per channel"
    with pytest.raises(ValueError, match="Jigsaw needs data.batch_size >= 2"):
        trainer.fit(Jigsaw(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=12), tile=3,
                           num_permutations=10), DigitsDataModule(image_size=16, batch_size=1))


def test_jigsaw_classifies_tiles_in_position_order():
    m = Jigsaw(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=12), tile=3, num_permutations=10,
               tile_dim=8, hidden_dim=16)
    views = m.view_policy(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8))
    out = m.step(views)
    out["ce_loss"].backward()
    assert m.backbone[0].weight.grad.abs().sum() > 0
    # the classifier input is the 9 tile embeddings of one puzzle side by side: swapping two tiles changes it
    swapped = views.crops[0].view(4, 9, 3, 3, 3)[:, [1, 0, 2, 3, 4, 5, 6, 7, 8]].reshape(36, 3, 3, 3)
    m.eval()
    with torch.no_grad():
        a = m.classifier(m.tile_head(m.backbone(views.crops[0])).view(4, -1))
        b = m.classifier(m.tile_head(m.backbone(swapped)).view(4, -1))
    assert not torch.allclose(a, b)


# ---- learning ------------------------------------------------------------------------------------------------

# The CPU learning tests' optimizer, and the crop of the digits ones (no flips or colour: digits are grey and
# mirroring changes them).
PRETEXT_OPTIM = OptimConfig("adamw", lr=3e-3, weight_decay=1e-4, warmup_epochs=1)
DIGITS_CROP = ViewConfig(crop_size=32, scale=(0.6, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, mean=DIGITS_MEAN,
                         std=DIGITS_STD)

def test_rotation_beats_random_init_on_digits():
    pl.seed_everything(0)
    m = Rotation(BackboneConfig("tiny_cnn", width=16), hidden_dim=128, optim=PRETEXT_OPTIM, views=DIGITS_CROP)
    init, trained = knn_before_and_after(m, epochs=5)
    # Measured on 2 CPU cores (seed 0): 83.52% at random init -> 90.56% after 5 epochs (16 s).
    assert trained - init >= 6.0, (init, trained)


def test_jigsaw_beats_random_init_on_cifar(cifar_small):
    from ssl_toolkit.data import NpzDataModule

    pl.seed_everything(0)
    m = Jigsaw(BackboneConfig("tiny_cnn", width=16), tile=9, num_permutations=100, tile_dim=128, hidden_dim=512,
               optim=PRETEXT_OPTIM,
               views=ViewConfig(crop_size=30, scale=(0.6, 1.0), jitter_p=0.8, gray_p=0.3))
    init, trained = knn_before_and_after(m, epochs=10, data=NpzDataModule(str(cifar_small), batch_size=128))
    # Measured on 2 CPU cores (seed 0), kNN on the solved puzzle (9 centre tiles, features concatenated):
    # seeds 0-3 19.8 -> 27.0, 23.2 -> 29.0, 23.6 -> 31.8, 23.2 -> 31.8 after 10 epochs (14 s). For scale: the random tiny_cnn on whole RGB images
    # gives 30.0%, and the trained tile encoder on whole images 31.0% (it never saw a whole image). With 5,000
    # training images: 25.0% -> 39.7% on tiles, against 30.5% for whole images at random init.
    assert trained - init >= 5.0, (init, trained)


def test_jigsaw_evaluators_see_the_solved_puzzle():
    from ssl_toolkit.backbones import Encoder
    from ssl_toolkit.views.pretext import centre_tiles

    m = Jigsaw(BackboneConfig("tiny_cnn", width=4), views=replace(PLAIN, crop_size=12), tile=3, num_permutations=10)
    m.eval()
    images = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    encoder = Encoder.from_hparams(m.backbone, m.hparams)
    tiles = centre_tiles(normalised(images), 3, 3)  # (2, 9, 3, 3, 3) cells in position order, normalised per tile
    with torch.no_grad():
        feats = encoder(images)
        assert feats.shape == (2, 9 * m.feature_dim)
        assert torch.allclose(feats, m.backbone(tiles.flatten(0, 1)).view(2, -1), atol=1e-5)
        assert torch.allclose(tiles[0, 4], normalize_tile(normalised(images)[0, :, 4:7, 4:7]), atol=1e-6)  # middle cell


def normalize_tile(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean((-2, -1), keepdim=True)) / t.std((-2, -1), keepdim=True).clamp_min(1e-3)


# ---- inpainting ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["central", "random_block", "random_region"])
def test_masks_stay_aligned_with_the_crops(kind):
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    views = InpaintingViews(replace(PLAIN, crop_size=16), mask=kind)(images)
    x, target, mask = views.crops[0], views.targets, views.masks
    assert torch.allclose(target, normalised(images), atol=1e-5)
    assert torch.equal(x, target * (1 - mask))  # hidden pixels are 0 (the mean), the rest is the crop itself
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    area = mask.mean((1, 2, 3))
    assert ((area > 0.15) & (area < 0.35)).all(), area  # a quarter of the crop, per image
    if kind != "central":
        assert not torch.equal(mask[0], mask[1])  # drawn per image
    else:
        assert mask[0, 0, 4:12, 4:12].all() and mask[0].sum() == 64


def test_reconstruction_loss_has_zero_gradient_outside_the_mask():
    pred = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randn(2, 3, 8, 8)
    mask = inpainting_masks(2, 8, "random_block")
    masked_l2(pred, target, mask).backward()
    assert (pred.grad * (1 - mask)).abs().max() == 0
    assert (pred.grad * mask).abs().sum() > 0
    expected = ((pred - target) ** 2 * mask).sum() / (mask.sum() * 3)
    assert masked_l2(pred, target, mask).item() == pytest.approx(expected.item())


def test_adversarial_term_trains_each_player_with_its_own_loss():
    m = Inpainting(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), decoder_width=16,
                   adversarial_weight=0.001)
    views = m.view_policy(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8))
    out = m.step(views)
    out["adv_loss"].backward()  # the generator's term reaches the encoder-decoder, not the discriminator
    assert m.backbone[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.discriminator.parameters())
    m.zero_grad()
    m.step(views)["disc_loss"].backward()  # the discriminator's term reaches only the discriminator
    assert m.backbone[0].weight.grad is None and m.decoder.fc.weight.grad is None
    assert m.discriminator[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="lambda_adv in \\[0, 1\\)"):
        Inpainting(BackboneConfig("tiny_cnn", width=4), adversarial_weight=1.0)
    with pytest.raises(ValueError, match="4 x a power of 2"):
        Inpainting(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=30))
    with pytest.raises(ValueError, match="Unknown inpainting mask 'box'"):
        InpaintingViews(ViewConfig(crop_size=16), mask="box")


def test_inpainting_beats_random_init_on_digits():
    pl.seed_everything(0)
    m = Inpainting(BackboneConfig("tiny_cnn", width=16), mask="random_region", decoder_width=64, optim=PRETEXT_OPTIM,
                   views=DIGITS_CROP)
    init, trained = knn_before_and_after(m, epochs=15)
    # Measured on 2 CPU cores, 15 epochs (12 s), AMD EPYC with AVX-512: seeds 0-4 83.52 -> 92.04, 83.70 -> 90.19,
    # 87.22 -> 91.30, 82.59 -> 91.11, 83.33 -> 90.19; random_block 89.63-91.48; seeds 0-2 with
    # ATEN_CPU_CAPABILITY=default 91.67, 91.30, 91.85. The centre mask for 10 epochs, which this test used, gave
    # +1.1 to +6.1 over seeds 0-4 and +3.89 at seed 0 on this CPU (+5.0 on earlier machines): too close to its margin.
    assert trained - init >= 3.0 and trained >= 89.0, (init, trained)


# ---- pictures ------------------------------------------------------------------------------------------------

def test_pictures_of_puzzles_rotations_and_inpainting(tmp_path):
    from ssl_toolkit.eval import view_pictures

    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    tiny = BackboneConfig("tiny_cnn", width=4)
    jig = view_pictures(Jigsaw(tiny, views=ViewConfig(crop_size=12), tile=3, num_permutations=10), images)
    rot = view_pictures(Rotation(tiny, views=ViewConfig(crop_size=16)), images)
    inp = view_pictures(Inpainting(tiny, views=ViewConfig(crop_size=16), decoder_width=16), images)
    assert jig["jigsaw_puzzles"].shape == (4, 3, 9, 9) and rot["views"].shape == (16, 3, 16, 16)
    assert sorted(inp) == ["inpainted", "masked_input", "original"]
    for pics in (jig, rot, inp):
        for x in pics.values():
            assert x.min() >= 0 and x.max() <= 1
    outside = inp["masked_input"] != inp["original"]  # the inpainted picture keeps the visible pixels
    assert torch.allclose(inp["inpainted"][~outside], inp["original"][~outside], atol=1e-5)


def test_pictures_command_and_tensorboard_callback(tmp_path, capsys):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ssl_toolkit.cli import main
    from ssl_toolkit.data import DigitsDataModule
    from ssl_toolkit.eval import PicturesCallback

    model = Inpainting(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), decoder_width=16)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[PicturesCallback(num_images=8)])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=16))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert {"pictures/inpainted", "pictures/masked_input", "pictures/original"} <= set(events.Tags()["images"])
    trainer.save_checkpoint(tmp_path / "inpainting.ckpt")
    assert main(["pictures", "--ckpt", str(tmp_path / "inpainting.ckpt"), "--out", str(tmp_path / "png"),
                 "--num", "8"]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["inpainted.png", "masked_input.png", "original.png"]
