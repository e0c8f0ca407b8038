from common import *
import csv

import torch.nn as nn
from PIL import Image

import data
import lapgan

TINY = ["--width", "4", "--latent-dim", "8", "--epochs", "1"]


def tiny_models(image_size=32, channels=1, num_classes=0):
    torch.manual_seed(0)
    G = lapgan.Generator(8, image_size, channels, 4, num_classes).apply(lapgan.init_weights)
    D = lapgan.Discriminator(image_size, channels, 4, num_classes).apply(lapgan.init_weights)
    return G, D


@pytest.mark.parametrize("image_size, channels", [(32, 1), (64, 3)])
def test_pyramid_adding_the_residuals_back_gives_the_image_exactly(image_size, channels):
    images = torch.randint(0, 256, (5, channels, image_size, image_size), dtype=torch.uint8)
    sizes = lapgan.pyramid_sizes(image_size)
    bands, lows = lapgan.laplacian_pyramid(data.to_float(images), len(sizes))
    assert [band.shape[-1] for band in bands] == sizes and [low.shape[-1] for low in lows] == sizes[1:]
    assert bands[0].abs().max() <= 1 and all(low.abs().max() <= 1 for low in lows)  # the blur keeps the range
    image = bands[0]
    for residual in bands[1:]:
        image = lapgan.upsample(image) + residual
    assert torch.equal(data.to_uint8(image), images)
    bands, _ = lapgan.laplacian_pyramid(torch.full((2, 1, 32, 32), 0.25), 3)
    torch.testing.assert_close(bands[0], torch.full((2, 1, 8, 8), 0.25))  # a constant: no residuals
    assert all(residual.abs().max() < 1e-6 for residual in bands[1:])


def test_one_generator_and_discriminator_per_level_each_finer_g_drawing_a_residual():
    G, D = tiny_models(64, 3)
    assert len(G.refiners) == len(D.refiners) == 3  # 8x8 from z, then 16, 32 and 64
    z, planes = lapgan.cascade_noise(5, 8, 64, torch.Generator().manual_seed(0), "cpu")
    levels = G.eval().sample(z, None, planes)
    assert [image.shape for image in levels] == [(5, 3, size, size) for size in (8, 16, 32, 64)]
    for k, refine in enumerate(G.refiners):  # each level: the upsampled coarser one plus its G's residual
        low = lapgan.upsample(levels[k])
        torch.testing.assert_close(levels[k + 1], (low + refine(low, planes[k])).clamp(-1, 1))
    bands, lows = lapgan.laplacian_pyramid(levels[-1], 4)
    assert [logits.shape for logits in D(bands, None, lows)] == [(5,)] * 4


def test_only_the_coarsest_level_reads_the_class():
    G, D = tiny_models(num_classes=10)
    assert not any(isinstance(m, nn.Embedding) for m in [*G.refiners.modules(), *D.refiners.modules()])
    coarse = G.eval().coarse(torch.randn(1, 8).repeat(10, 1), torch.arange(10))
    assert all((coarse[0] - coarse[k]).abs().max() > 1e-4 for k in range(1, 10))


def test_levels_train_independently_on_the_real_pyramid_and_report_sums_then_each_level():
    # a broken 8x8 G (NaN) spoils only its own level: the finer ones train on the real pyramid, not on its output
    G, D = tiny_models()
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    before = {name: p.detach().clone() for name, p in [*G.named_parameters(), *D.named_parameters()]}
    with torch.no_grad():
        G.coarse.net[-2].bias.fill_(float("nan"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    metrics = lapgan.train_step(G, D, opt_g, opt_d, torch.rand(8, 1, 32, 32) * 2 - 1, None, 8, scaler)
    assert metrics.shape == (2 + 4 * 3,)  # d_loss, g_loss, then d_loss, g_loss, d_real, d_fake at 8, 16, 32
    for model in (G, D):
        assert not all(torch.isfinite(p).all() for p in model.coarse.parameters())
        assert all(torch.isfinite(p).all() for p in model.refiners.parameters())
        assert any(not torch.equal(p, before[f"refiners.{name}"]) for name, p in model.refiners.named_parameters())
    assert torch.isfinite(metrics[6:]).all() and not torch.isfinite(metrics[2:6]).all()
    assert ((metrics[[8, 9, 12, 13]] >= 0) & (metrics[[8, 9, 12, 13]] <= 1)).all()  # D(x) at 16 and 32: probabilities


def test_augmentation_moves_each_coarse_image_and_its_residual_together():
    augment = data.make_augmentation("diffaug", 3, "cpu")
    image = torch.rand(4, 3, 16, 16) * 2 - 1
    bands, lows = lapgan.shown_levels(augment, [torch.rand(4, 3, 8, 8), image], [image])
    assert not torch.equal(lows[0], image) and torch.equal(bands[1], lows[0])  # moved, and alike: no colour change


def test_run_writes_each_levels_losses_and_d_accuracy_and_a_grid_row_per_level(tiny_data_dir, tmp_path):
    assert run(lapgan, tmp_path, tiny_data_dir, *TINY) == 0
    out = tmp_path / "run"
    with open(out / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["d_loss"]) == pytest.approx(sum(float(row[f"d_loss_{s}"]) for s in (8, 16, 32)), abs=1e-4)
    for size in (8, 16, 32):
        assert {f"d_loss_{size}", f"g_loss_{size}", f"d_real_{size}", f"d_fake_{size}"} <= set(row)
        assert all(0 <= float(row[f"d_acc_{name}_{size}"]) <= 1 for name in ("real_train", "real_test", "fake"))
    grid = np.asarray(Image.open(out / "samples" / "epoch_001.png"))
    assert grid.shape == (2 + 4 * 3 * 34, 2 + 10 * 34)  # 4 groups x 3 levels rows, 10 samples a row
    for r, pixel in ((0, 4), (1, 2)):  # the 8x8 row in 4x4 blocks, the 16x16 row in 2x2 blocks
        tile = grid[2 + r * 34: 2 + r * 34 + 32, 2:34]
        assert (tile == np.repeat(np.repeat(tile[::pixel, ::pixel], pixel, 0), pixel, 1)).all()


def test_conditional_folder_run_at_64px_a_group_a_class_and_generate_by_class(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("with_mask", "without_mask"):
        (tmp_path / "faces" / name).mkdir(parents=True)
        for i, pixels in enumerate(rng.integers(0, 256, (8, 60, 80, 3), dtype=np.uint8)):
            Image.fromarray(pixels).save(tmp_path / "faces" / name / f"{i}.png")
    assert run(lapgan, tmp_path, "unused", "--dataset", str(tmp_path / "faces"), "--conditional", *TINY) == 0
    out = tmp_path / "run"
    assert Image.open(out / "samples" / "epoch_001.png").size == (2 + 10 * 66, 2 + 2 * 4 * 66)  # 2 classes x 4 levels
    assert lapgan.main(["--out", str(out), "--generate", "6", "--label", "1"]) == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (6, 64, 64, 3) and (samples["labels"] == 1).all()
    assert lapgan.main(["--out", str(out), "--generate", "5"]) == 0
    assert list(np.load(out / "samples.npz")["labels"]) == [0, 1, 0, 1, 0]  # without --label: the classes in turn
