"""wgan_gp.py's own promises: the critic, the penalty, n_critic steps a G step, clipping, metrics, the paper preset."""
from common import *

import csv

import torch.nn as nn

import data
import wgan_gp

TINY = ["--width", "4", "--latent-dim", "8", "--epochs", "1"]


def models(image_size, channels, num_classes=0, width=8):
    return (wgan_gp.Generator(16, image_size, channels, width, num_classes),
            wgan_gp.Critic(image_size, channels, width, num_classes))


@pytest.mark.parametrize("image_size, channels", [(32, 1), (64, 3)])
def test_one_block_per_doubling_and_a_critic_without_batchnorm_or_sigmoid(image_size, channels):
    G, D = models(image_size, channels)
    fake = G(torch.randn(5, 16))
    assert fake.shape == (5, channels, image_size, image_size) and D(fake).shape == (5,)
    convs = [sum(isinstance(m, kind) for m in net.modules()) for net, kind in ((G, nn.ConvTranspose2d), (D, nn.Conv2d))]
    assert convs == {32: [4, 3], 64: [5, 4]}[image_size]
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Sigmoid)) for m in D.modules())
    scores = D(torch.randn(64, channels, image_size, image_size) * 50)
    assert not ((scores >= 0) & (scores <= 1)).all()  # unbounded, not a probability


def test_the_critics_score_depends_on_the_label():
    _, D = models(32, 1, num_classes=10)
    nn.init.normal_(D.projection.weight, std=1.0)
    assert D(torch.randn(1, 1, 32, 32).repeat(10, 1, 1, 1), torch.arange(10)).unique().numel() == 10


def test_gradient_penalty_matches_hand_computed_values_with_each_samples_own_gradient_norm():
    # A linear critic D(x) = <w, x>: its gradient is w everywhere, so the penalty is (||w|| - 1)^2.
    w = (torch.arange(18, dtype=torch.float32).view(1, 2, 3, 3) / 10).requires_grad_(True)
    penalty = wgan_gp.gradient_penalty(lambda x, labels=None: (x * w).flatten(1).sum(1),
                                       torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3))
    norm = (w.detach() ** 2).sum().sqrt()
    assert penalty.item() == pytest.approx(((norm - 1) ** 2).item(), rel=1e-5)
    penalty.backward()  # create_graph: differentiable in the critic's weights, with the analytic gradient
    torch.testing.assert_close(w.grad, 2 * (norm - 1) * w.detach() / norm)
    # D(x) = 0.5 ||x||^2 has gradient x; with real == fake the point between is x whatever alpha is.
    x = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 0.5, 1.0, 3.0)])  # norms 0, 1, 2, 6
    penalty = wgan_gp.gradient_penalty(lambda images, labels=None: 0.5 * (images ** 2).flatten(1).sum(1), x, x.clone())
    assert penalty.item() == pytest.approx((1 + 0 + 1 + 25) / 4)


def test_train_step_makes_a_critic_update_per_batch_then_one_generator_update():
    G, D = models(32, 1)
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    order = []
    for name, optimizer in (("g", opt_g), ("d", opt_d)):
        optimizer.step = (lambda step, name: lambda *a, **k: order.append(name) or step(*a, **k))(optimizer.step, name)
    group = [(torch.rand(4, 1, 32, 32) * 2 - 1, None) for _ in range(5)]
    metrics = wgan_gp.train_step(G, D, opt_g, opt_d, group, 16, torch.amp.GradScaler("cpu", enabled=False))
    assert order == ["d"] * 5 + ["g"]
    assert metrics.shape == (4,) and torch.isfinite(metrics).all() and metrics[3] > 0  # d, g, wasserstein, penalty


def test_step_groups_puts_n_batches_in_each_generator_step():
    assert list(wgan_gp.step_groups(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(wgan_gp.step_groups(range(2), 5)) == [[0, 1]]


def test_run_groups_n_critic_batches_per_generator_step(tiny_data_dir, tmp_path, monkeypatch):
    sizes, train_step = [], wgan_gp.train_step
    monkeypatch.setattr(wgan_gp, "train_step", lambda G, D, o_g, o_d, group, *rest: sizes.append(len(group))
                        or train_step(G, D, o_g, o_d, group, *rest))
    assert run(wgan_gp, tmp_path, tiny_data_dir, *TINY, "--batch-size", "8", "--n-critic", "3") == 0  # 8 batches
    assert sizes == [3, 3, 2]


def test_metrics_hold_the_wasserstein_estimate_and_the_critics_scores(tiny_data_dir, tmp_path):
    assert run(wgan_gp, tmp_path, tiny_data_dir, *TINY) == 0
    row = next(csv.DictReader((tmp_path / "run" / "metrics.csv").read_text().splitlines()))
    columns = ("wasserstein", "gradient_penalty", "critic_real_train", "critic_real_test", "critic_fake")
    assert np.isfinite([float(row[column]) for column in columns]).all() and float(row["gradient_penalty"]) > 0


def test_critic_scores_are_the_mean_scores_on_reals_and_fakes():
    D = lambda images, labels=None: images.flatten(1).mean(1)  # noqa: E731
    G = lambda z, labels=None: -torch.ones(len(z), 1, 4, 4)  # noqa: E731
    D.eval = D.train = G.eval = G.train = lambda: None
    D.parameters = lambda: iter([torch.zeros(1)])
    images = torch.cat([torch.full((6, 1, 4, 4), 255, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)])
    reals = {"critic_real_train": data.Dataset(images, torch.zeros(10, dtype=torch.int64)), "critic_real_test": None}
    assert wgan_gp.critic_scores(D, G, reals, latent_dim=3, num_classes=0) == {
        "critic_real_train": "0.2000", "critic_real_test": "", "critic_fake": "-1.0000"}  # (6 - 4) / 10


def test_clip_run_uses_rmsprop_at_wgans_rate_and_keeps_weights_within_c(tiny_data_dir, tmp_path):
    assert (wgan_gp.parse_args([]).lr, wgan_gp.parse_args(["--clip-value", "0.01", "--lr", "1e-4"]).lr) == (5e-4, 1e-4)
    assert run(wgan_gp, tmp_path, tiny_data_dir, *TINY, "--clip-value", "0.02") == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["args"]["lr"] == 5e-5 and "square_avg" in checkpoint["opt_d"]["state"][0]  # RMSprop's
    assert all(w.abs().max() <= 0.02 for w in checkpoint["discriminator"].values() if w.is_floating_point())


def test_paper_preset_builds_the_papers_networks():
    args = wgan_gp.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.latent_dim, args.batch_size, args.lr, args.n_critic, args.gp_weight) == (
        32, 128, 128, 64, 1e-4, 5, 10.0)
    G, D = wgan_gp.Generator(128, 32, 1, 128), wgan_gp.Critic(32, 1, 128)
    # G: 128*512*16 + 512*256*16 + 256*128*16 conv weights, 2*(512+256+128) BatchNorm, 128*16+1 output conv
    # critic: 16*128+128, 128*256*16+256, 256*512*16+512 convs with biases, 2*(256+512) layer norm, 512*16+1 linear
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (3_673_857, 2_634_113)
