"""dcgan.py's own promises: the DCGAN nets, the --loss table, R1, the update, the paper preset, resume's settings."""
from common import *

import torch.nn as nn

import data
import dcgan

TINY = ["--width", "4", "--latent-dim", "8", "--epochs", "1"]


def models(image_size, channels, num_classes=0, width=8):
    return (dcgan.Generator(16, image_size, channels, width, num_classes),
            dcgan.Discriminator(image_size, channels, width, num_classes))


@pytest.mark.parametrize("image_size, channels", [(32, 1), (64, 3)])
def test_nets_follow_the_dcgan_rules_one_stride_2_block_per_doubling(image_size, channels):
    G, D = models(image_size, channels)
    fake = G.apply(dcgan.init_weights)(torch.randn(5, 16))
    assert fake.shape == (5, channels, image_size, image_size) and D(fake).shape == (5,)
    convs = [sum(isinstance(m, kind) for m in net.modules()) for net, kind in ((G, nn.ConvTranspose2d), (D, nn.Conv2d))]
    assert convs == {32: [4, 3], 64: [5, 4]}[image_size]
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in D.modules())
    assert isinstance(D.features[1], nn.LeakyReLU) and D.features[1].negative_slope == 0.2  # no BN on D's input
    assert isinstance(G.net[-1], nn.Tanh) and isinstance(G.net[-2], nn.ConvTranspose2d)  # no BN on G's output
    assert any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    assert abs(torch.cat([m.weight.flatten() for m in G.net if isinstance(m, nn.ConvTranspose2d)]).std() - 0.02) < 2e-3


def test_conditional_output_depends_on_the_label():
    torch.manual_seed(0)
    G, D = models(32, 1, num_classes=10)
    labels = torch.arange(10)
    fake = G.eval()(torch.randn(1, 16).repeat(10, 1), labels)
    assert all((fake[0] - fake[k]).abs().max() > 1e-4 for k in range(1, 10))
    nn.init.normal_(D.projection.weight, std=1.0)
    assert D(fake[:1].repeat(10, 1, 1, 1), labels).unique().numel() == 10


def test_the_loss_table_is_gan_pys():  # whose values test_gans.py checks by hand
    import gan
    real, fake = torch.randn(5), torch.randn(5)
    assert list(dcgan.LOSSES) == list(gan.LOSSES)
    for (d_loss, g_loss, threshold), (d_gan, g_gan, threshold_gan) in zip(dcgan.LOSSES.values(), gan.LOSSES.values()):
        assert d_loss(real, fake) == d_gan(real, fake) and g_loss(fake) == g_gan(fake) and threshold == threshold_gan


def test_r1_penalty_is_the_squared_gradient_norm_through_the_augmentation_at_the_unaugmented_reals():
    weight, real, mask = torch.randn(1, 18), torch.randn(4, 2, 3, 3), (torch.arange(18) % 2).float()
    D = lambda images, labels=None: (images.flatten(1) * weight).sum(1) ** 2  # noqa: E731  grad = 2 (w.x) w
    for augment, kept in ((None, torch.ones(18)), (lambda images: images * mask.view(1, 2, 3, 3), mask)):
        x = real.flatten(1) * kept  # what D sees; the gradient at the reals passes through the mask again
        expected = ((2 * (x * weight).sum(1, keepdim=True) * weight * kept) ** 2).sum(1).mean()
        torch.testing.assert_close(dcgan.r1_penalty(D, real, augment=augment), expected)


def step(G, D, real, **options):
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    return dcgan.train_step(G, D, opt_g, opt_d, real, None, 16, torch.amp.GradScaler("cpu", enabled=False), **options)


def test_r1_gamma_adds_half_gamma_times_r1_to_ds_loss(monkeypatch):
    monkeypatch.setattr(dcgan, "r1_penalty", lambda *args: torch.tensor(3.0))
    losses = []
    for gamma in (0.0, 2.0):
        torch.manual_seed(0)
        losses.append(step(*models(32, 1, width=4), torch.rand(4, 1, 32, 32) * 2 - 1, r1_gamma=gamma)[0].item())
    assert losses[1] == pytest.approx(losses[0] + 2.0 / 2 * 3.0)


def test_d_sees_independently_augmented_reals_and_fakes_in_both_steps():
    torch.manual_seed(0)
    G, D = models(32, 1, width=4)
    seen, forward = [], D.forward
    D.forward = lambda images, labels=None: seen.append(images.detach().clone()) or forward(images, labels)
    step(G, D, torch.ones(8, 1, 32, 32), augment=data.Augmentation(("cutout",), "cpu"))
    assert len(seen) == 3  # reals and fakes in D's step, fakes in G's
    squares = [(images == 0).flatten(1) for images in seen]
    assert all(square.any(1).all() for square in squares)  # every image D saw had its square cut out
    assert not torch.equal(squares[0], squares[1]) and not torch.equal(squares[1], squares[2])  # fresh draws


def test_accuracy_counts_what_d_calls_real_and_fake():
    D = lambda images, labels=None: images.flatten(1).mean(1)  # noqa: E731  "real" = bright
    G = lambda z, labels=None: -torch.ones(len(z), 1, 4, 4)  # noqa: E731  every fake dark: D calls all fake
    D.eval = D.train = G.eval = G.train = lambda: None
    D.parameters = lambda: iter([torch.zeros(1)])
    images = torch.cat([torch.full((6, 1, 4, 4), 255, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)])
    reals = {"d_acc_real_train": data.Dataset(images, torch.zeros(10, dtype=torch.int64)), "d_acc_real_test": None}
    assert dcgan.d_accuracy(D, G, reals, latent_dim=3, num_classes=0, threshold=0.0) == {
        "d_acc_real_train": "0.6000", "d_acc_real_test": "", "d_acc_fake": "1.0000"}


def test_paper_preset_builds_the_papers_networks():
    args = dcgan.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.latent_dim, args.batch_size, args.lr, args.lr_g) == (
        64, 128, 100, 128, 2e-4, 2e-4)
    G, D = dcgan.Generator(100, 64, 1, 128), dcgan.Discriminator(64, 1, 128)
    # G: 100*1024*16 + 1024*512*16 + 512*256*16 + 256*128*16 conv weights, 2*(1024+512+256+128) BatchNorm, 128*16+1
    # D: 16*128+128, 128*256*16 + 256*512*16 + 512*1024*16 convs, 2*(256+512+1024) BatchNorm, 1024*16+1 linear
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (12_654_337, 11_032_193)


def test_resume_keeps_the_runs_loss_r1_gamma_and_learning_rates(tiny_data_dir, tmp_path):
    assert run(dcgan, tmp_path, tiny_data_dir, *TINY, "--loss", "hinge", "--r1-gamma", "1", "--lr-g", "1e-3") == 0
    assert run(dcgan, tmp_path, tiny_data_dir, *TINY[:-1], "2", "--resume") == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (checkpoint["args"]["loss"], checkpoint["args"]["r1_gamma"]) == ("hinge", 1)
    assert [checkpoint[k]["param_groups"][0]["lr"] for k in ("opt_g", "opt_d")] == [1e-3, 2e-4]
