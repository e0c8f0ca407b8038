"""dcgan.py's own promises: the DCGAN nets, the --loss table, R1, the update, presets, conditional runs."""
from common import *

import torch.nn as nn
from PIL import Image

import data
import dcgan

TINY = ["--width", "4", "--latent-dim", "8", "--epochs", "1"]


def models(image_size, channels, num_classes=0, width=8):
    return (dcgan.Generator(16, image_size, channels, width, num_classes),
            dcgan.Discriminator(image_size, channels, width, num_classes))


@pytest.mark.parametrize("image_size, channels", [(32, 1), (64, 3)])
def test_output_shapes_follow_image_size_and_channels_one_block_per_doubling(image_size, channels):
    G, D = models(image_size, channels)
    fake = G(torch.randn(5, 16))
    assert fake.shape == (5, channels, image_size, image_size) and fake.abs().max() <= 1  # tanh
    assert D(fake).shape == (5,)
    blocks = [sum(isinstance(m, kind) for m in net.modules()) for net, kind in ((G, nn.ConvTranspose2d), (D, nn.Conv2d))]
    assert blocks == {32: [4, 3], 64: [5, 4]}[image_size]


def test_nets_follow_the_dcgan_rules():
    G, D = models(32, 3)
    G.apply(dcgan.init_weights)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in D.modules())
    assert isinstance(D.features[1], nn.LeakyReLU) and D.features[1].negative_slope == 0.2  # no BN on D's input
    assert isinstance(G.net[-1], nn.Tanh) and isinstance(G.net[-2], nn.ConvTranspose2d)  # no BN on G's output
    assert any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    weights = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(weights.std().item() - 0.02) < 0.002


def test_conditional_output_depends_on_the_label_and_unconditional_ignores_it():
    torch.manual_seed(0)
    G, D = models(32, 1, num_classes=10)
    G.eval()
    labels = torch.arange(10)
    fake = G(torch.randn(1, 16).repeat(10, 1), labels)
    assert all((fake[0] - fake[k]).abs().max() > 1e-4 for k in range(1, 10))
    nn.init.normal_(D.projection.weight, std=1.0)
    assert D(fake[:1].repeat(10, 1, 1, 1), labels).unique().numel() == 10
    G, D = models(32, 1)
    z, image = torch.randn(2, 16), torch.randn(2, 1, 32, 32)
    G.eval()
    assert torch.equal(G(z, torch.tensor([0, 5])), G(z)) and torch.equal(D(image, torch.tensor([3, 1])), D(image))


def test_losses_match_hand_computed_values():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    softplus = lambda x: torch.log1p(torch.exp(x))  # noqa: E731  -log(sigmoid(-x))
    expected = {  # D's loss, G's loss
        "non-saturating": (softplus(-real).mean() + softplus(fake).mean(), softplus(-fake).mean()),
        "minimax": (softplus(-real).mean() + softplus(fake).mean(), -softplus(fake).mean()),
        "lsgan": (0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean(), 0.5 * ((fake - 1) ** 2).mean()),
        "hinge": (torch.tensor((0 + 2) / 2 + (1.5 + 0) / 2), -fake.mean()),
    }
    for loss, (d_expected, g_expected) in expected.items():
        d_loss, g_loss, _ = dcgan.LOSSES[loss]
        torch.testing.assert_close(d_loss(real, fake), d_expected, msg=loss)
        torch.testing.assert_close(g_loss(fake), g_expected, msg=loss)


def test_r1_penalty_is_the_squared_gradient_norm_at_the_real_images():
    weight = torch.randn(1, 2 * 3 * 3)
    D = lambda images, labels=None: (images.flatten(1) * weight).sum(1) ** 2  # noqa: E731  grad = 2 (w.x) w
    real = torch.randn(4, 2, 3, 3)
    expected = ((2 * (real.flatten(1) * weight).sum(1, keepdim=True) * weight) ** 2).sum(1).mean()
    torch.testing.assert_close(dcgan.r1_penalty(D, real), expected)


def test_r1_differentiates_through_the_augmentation_at_the_unaugmented_reals():
    torch.manual_seed(0)
    _, D = models(32, 1, width=4)
    real = torch.rand(4, 1, 32, 32) * 2 - 1
    cut = lambda images: images * torch.cat([torch.zeros(1, 1, 16, 32), torch.ones(1, 1, 16, 32)], 2)  # noqa: E731
    x = real.clone().requires_grad_(True)
    (grads,) = torch.autograd.grad(D(cut(x)).sum(), x)
    assert (grads[:, :, :16] == 0).all()
    assert dcgan.r1_penalty(D, real, augment=cut).item() == pytest.approx(grads.flatten(1).pow(2).sum(1).mean().item())


def step(G, D, real, **options):
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    return dcgan.train_step(G, D, opt_g, opt_d, real, None, 16, torch.amp.GradScaler("cpu", enabled=False), **options)


def test_r1_gamma_adds_half_gamma_times_r1_to_ds_loss(monkeypatch):
    monkeypatch.setattr(dcgan, "r1_penalty", lambda *args: torch.tensor(3.0))
    real = torch.rand(4, 1, 32, 32) * 2 - 1
    losses = []
    for gamma in (0.0, 2.0):
        torch.manual_seed(0)
        losses.append(step(*models(32, 1, width=4), real, r1_gamma=gamma)[0].item())
    assert losses[1] == pytest.approx(losses[0] + 2.0 / 2 * 3.0)


def test_d_sees_independently_augmented_reals_and_fakes_in_both_steps_and_g_learns_through_it():
    torch.manual_seed(0)
    G, D = models(32, 1, width=4)
    seen, forward = [], D.forward
    D.forward = lambda images, labels=None: seen.append(images.detach().clone()) or forward(images, labels)
    before = [p.detach().clone() for p in G.parameters()]
    step(G, D, torch.ones(8, 1, 32, 32), augment=data.Augmentation(("cutout",), "cpu"))
    assert len(seen) == 3  # reals and fakes in D's step, fakes in G's
    squares = [(images == 0).flatten(1) for images in seen]
    assert all(square.any(1).all() for square in squares)  # every image D saw had its square cut out
    assert not torch.equal(squares[0], squares[1]) and not torch.equal(squares[1], squares[2])  # fresh draws
    assert all(not torch.equal(b, p) for b, p in zip(before, G.parameters()))


def test_a_step_without_augment_draws_only_z_from_the_rng():
    G, D = models(32, 1, width=4)
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    torch.manual_seed(1)
    step(G, D, real)
    after_step = torch.get_rng_state()
    torch.manual_seed(1)
    torch.randn(8, 16)
    assert torch.equal(after_step, torch.get_rng_state())


def test_accuracy_counts_what_d_calls_real_and_fake():
    D = lambda images, labels=None: images.flatten(1).mean(1)  # noqa: E731  "real" = bright
    G = lambda z, labels=None: -torch.ones(len(z), 1, 4, 4)  # noqa: E731  every fake dark: D calls all fake
    D.eval = D.train = G.eval = G.train = lambda: None
    D.parameters = lambda: iter([torch.zeros(1)])
    images = torch.cat([torch.full((6, 1, 4, 4), 255, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)])
    dataset = data.Dataset(images, torch.zeros(10, dtype=torch.int64))
    assert dcgan.d_accuracy(D, G, dataset, None, latent_dim=3, num_classes=0, threshold=0.0) == {
        "d_acc_real_train": "0.6000", "d_acc_real_test": "", "d_acc_fake": "1.0000"}


def test_paper_preset_builds_the_papers_networks():
    args = dcgan.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.latent_dim, args.batch_size, args.lr, args.lr_g) == (
        64, 128, 100, 128, 2e-4, 2e-4)
    G, D = dcgan.Generator(100, 64, 1, 128), dcgan.Discriminator(64, 1, 128)
    # G: 100*1024*16 + 1024*512*16 + 512*256*16 + 256*128*16 conv weights, 2*(1024+512+256+128) BatchNorm, 128*16+1
    # D: 16*128+128, 128*256*16 + 256*512*16 + 512*1024*16 convs, 2*(256+512+1024) BatchNorm, 1024*16+1 linear
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (12_654_337, 11_032_193)
    assert G.net[0].weight.shape == (100, 1024, 4, 4) and D.logit.in_features == 1024 * 4 * 4  # Figure 1's 4x4x1024


@pytest.mark.parametrize("bad", ["48", "16"])
def test_image_size_is_a_power_of_two_from_32(bad):
    with pytest.raises(SystemExit, match="^2$"):
        dcgan.parse_args(["--image-size", bad])


def test_conditional_run_draws_a_row_per_class_and_generates_the_label_asked(tiny_data_dir, tmp_path, capsys):
    assert run(dcgan, tmp_path, tiny_data_dir, *TINY, "--conditional") == 0
    assert Image.open(tmp_path / "run" / "samples" / "epoch_001.png").size == (10 * 34 + 2,) * 2  # MNIST: 10 classes
    assert dcgan.main(["--out", str(tmp_path / "run"), "--generate", "6", "--label", "2"]) == 0
    assert np.load(tmp_path / "run" / "samples.npz")["labels"].tolist() == [2] * 6
    capsys.readouterr()
    assert dcgan.main(["--out", str(tmp_path / "run"), "--generate", "6", "--label", "10"]) == 2
    assert "conditional on classes 0..9" in capsys.readouterr().err
    assert run(dcgan, tmp_path, tiny_data_dir, *TINY, out="plain") == 0
    assert dcgan.main(["--out", str(tmp_path / "plain"), "--generate", "6", "--label", "0"]) == 2
    assert "not conditional" in capsys.readouterr().err


def test_resume_keeps_the_runs_loss_r1_gamma_and_learning_rates(tiny_data_dir, tmp_path, capsys):
    assert run(dcgan, tmp_path, tiny_data_dir, *TINY, "--loss", "hinge", "--r1-gamma", "1", "--lr-g", "1e-3") == 0
    assert run(dcgan, tmp_path, tiny_data_dir, *TINY[:-1], "2", "--resume") == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (checkpoint["args"]["loss"], checkpoint["args"]["r1_gamma"]) == ("hinge", 1)
    assert [checkpoint[k]["param_groups"][0]["lr"] for k in ("opt_g", "opt_d")] == [1e-3, 2e-4]
    capsys.readouterr()
    assert run(dcgan, tmp_path, tiny_data_dir, *TINY[:-1], "3", "--resume", "--loss", "lsgan") == 2
    assert "--loss lsgan" in capsys.readouterr().err
