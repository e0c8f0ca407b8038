from common import *  # noqa: F401,F403
import math
import shutil

import torch.nn as nn
from PIL import Image

import data
import infogan

TINY = ["--width", "4", "--latent-dim", "8"]


def models(image_size=28, channels=1, width=4, categories=10, continuous=2, latent_dim=8):
    G = infogan.Generator(latent_dim, categories, continuous, image_size, channels, width).apply(infogan.init_weights)
    D = infogan.Discriminator(categories, continuous, image_size, channels, width).apply(infogan.init_weights)
    return G, D


@pytest.mark.parametrize("image_size,channels", [(28, 1), (32, 3), (64, 1)])
def test_shapes_follow_image_size_channels_and_codes(image_size, channels):
    G, D = models(image_size, channels, categories=7, continuous=3)
    z, code_cat, code_cont = infogan.sample_latent(5, G, "cpu")
    assert code_cat.dtype == torch.int64 and code_cat.max() < 7 and code_cont.shape == (5, 3)
    assert code_cont.abs().max() <= 1
    fake = G(z, code_cat, code_cont)
    assert fake.shape == (5, channels, image_size, image_size) and fake.abs().max() <= 1
    logits, (code_logits, code_means) = D(fake, recognise=True)
    assert code_logits.shape == (5, 7) and code_means.shape == (5, 3)
    torch.testing.assert_close(logits, D(fake))  # the same logit either way
    convs = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in [*G.modules(), *D.modules()])
    assert convs == (6 if image_size == 64 else 4)  # one stride-2 stage per doubling beyond 32


def test_width_64_is_the_papers_mnist_architecture():
    G, D = models(width=64, latent_dim=62)
    layers = lambda net, kind: [m for m in net.modules() if isinstance(m, kind)]  # noqa: E731
    assert [(m.in_features, m.out_features) for m in layers(G, nn.Linear)] == [(62 + 10 + 2, 1024), (1024, 128 * 49)]
    assert [(m.in_channels, m.out_channels) for m in layers(G, nn.ConvTranspose2d)] == [(128, 64), (64, 1)]
    assert isinstance(G.net[-1], nn.Tanh) and isinstance(G.net[-2], nn.ConvTranspose2d)  # no BatchNorm on the output
    assert [(m.in_channels, m.out_channels) for m in layers(D, nn.Conv2d)] == [(1, 64), (64, 128)]
    assert isinstance(D.body[1], nn.LeakyReLU) and D.body[1].negative_slope == 0.1  # no BatchNorm after the first
    assert [(m.in_features, m.out_features) for m in layers(D, nn.Linear)] == [(128 * 49, 1024), (1024, 1),
                                                                              (1024, 128), (128, 10 + 2)]


def test_generator_output_depends_on_every_code():
    torch.manual_seed(0)
    G = infogan.Generator(8, 10, 2, 28, 1, 4).eval()  # PyTorch's default init: larger weights than DCGAN's
    z = torch.randn(1, 8).repeat(10, 1)
    fake = G(z, torch.arange(10), torch.zeros(10, 2))
    assert all((fake[0] - fake[k]).abs().max() > 1e-4 for k in range(1, 10))
    sweep = G(z[:3], torch.zeros(3, dtype=torch.int64), torch.tensor([[-2.0, 0.0], [0.0, 0.0], [0.0, 2.0]]))
    assert (sweep[0] - sweep[1]).abs().max() > 1e-4 and (sweep[1] - sweep[2]).abs().max() > 1e-4


def test_gan_losses_are_bce_on_logits_and_non_saturating():
    real, fake, sig = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0]), torch.sigmoid
    torch.testing.assert_close(infogan.d_loss(real, fake), -(torch.log(sig(real)) + torch.log(1 - sig(fake))).mean())
    torch.testing.assert_close(infogan.g_loss(fake), -torch.log(sig(fake)).mean())


def test_information_terms_match_hand_computed_values_and_gradients():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    codes = torch.tensor([0, 2])
    expected_cat = (-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))) + math.log(3)) / 2
    # A unit-variance Gaussian's -log density per continuous code, summed over the codes: 0.5 (log 2 pi + (c - mean)^2)
    means = torch.tensor([[0.5, -1.0], [0.0, 0.2]], requires_grad=True)
    values = torch.tensor([[1.0, -1.0], [-1.0, 0.8]])
    log_2pi = math.log(2 * math.pi)
    expected_cont = (0.5 * (log_2pi + 0.25) + 0.5 * log_2pi + 0.5 * (log_2pi + 1.0) + 0.5 * (log_2pi + 0.36)) / 2
    total, cat, cont = infogan.information_loss((logits, means), codes, values, lambda_cat=1.0, lambda_cont=0.1)
    assert cat.item() == pytest.approx(expected_cat, rel=1e-6) and cont.item() == pytest.approx(expected_cont, rel=1e-6)
    assert total.item() == pytest.approx(expected_cat + 0.1 * expected_cont, rel=1e-6)
    (grad,) = torch.autograd.grad(cont, means)  # (mean - c) / batch: a plain squared error's
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.0], [1.0, -0.6]]) / 2)
    total, _, _ = infogan.information_loss((logits, means), codes, values, 0.0, 2.0)
    assert total.item() == pytest.approx(2 * cont.item())


def test_information_term_reaches_g_q_and_the_shared_body_but_not_the_real_fake_head():
    torch.manual_seed(0)
    G, D = models()
    z, code_cat, code_cont = infogan.sample_latent(16, G, "cpu")
    info, _, _ = infogan.information_loss(D(G(z, code_cat, code_cont), recognise=True)[1], code_cat, code_cont, 1, 0.1)
    for name, net in (("G", G), ("Q", D.q), ("body", D.body), ("logit", D.logit)):
        grads = torch.autograd.grad(info, list(net.parameters()), retain_graph=True, allow_unused=True)
        assert all(g is None for g in grads) if name == "logit" else all(g.abs().sum() > 0 for g in grads), name


def test_train_step_reads_codes_from_fakes_only_and_updates_d_then_g():
    torch.manual_seed(0)
    G, D = models()
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    real, calls, order, forward = torch.rand(16, 1, 28, 28) * 2 - 1, [], [], D.forward
    g_before = [p.detach().clone() for p in G.parameters()]

    def recording_forward(images, recognise=False):
        calls.append((images is real, recognise))
        return forward(images, recognise)

    def recording(name, step):
        def recorded_step():
            order.append((name, [p.grad for p in G.parameters()]))  # G's gradients when this optimizer steps
            return step()
        return recorded_step
    D.forward, opt_d.step, opt_g.step = recording_forward, recording("D", opt_d.step), recording("G", opt_g.step)
    metrics = infogan.train_step(G, D, opt_g, opt_d, real, torch.amp.GradScaler("cpu", enabled=False))
    assert calls == [(True, False), (False, True), (False, True)]  # reals: the logit only; fakes: logit and Q
    assert [name for name, _ in order] == ["D", "G"] and all(g is None for g in order[0][1])  # D's: fakes detached
    assert not all(torch.equal(p, q) for p, q in zip(G.parameters(), g_before))
    assert metrics.shape == (len(infogan.METRICS),) and torch.isfinite(metrics).all() and 0 <= metrics[6] <= 1


def test_sweep_changes_one_continuous_code_along_each_row_and_the_grid_one_code_value_a_row():
    G, _ = models(continuous=3)
    z, code_cat, code_cont = infogan.sweep_latents(G, 1, columns=5, seed=0, device="cpu")
    assert len(z) == 50 and (z == z[0]).all() and code_cat.tolist() == [k for k in range(10) for _ in range(5)]
    torch.testing.assert_close(code_cont[:, 1], torch.linspace(-2, 2, 5).repeat(10))
    assert (code_cont[:, [0, 2]] == 0).all()
    z, code_cat, code_cont = infogan.grid_latents(G, 10, seed=0, device="cpu")
    assert code_cat.tolist() == [k for k in range(10) for _ in range(10)]
    assert torch.equal(z[:10], z[10:20]) and torch.equal(code_cont[:10], code_cont[90:])  # a column: one style


def test_run_writes_code_grids_and_info_metrics_and_q_learns_at_gs_rate(tmp_path, tiny_data_dir):
    assert run(infogan, tmp_path, tiny_data_dir, "--epochs", "1", *TINY, "--categories", "3", "--lr-g", "2e-3") == 0
    out = tmp_path / "run"
    assert Image.open(out / "samples" / "epoch_001.png").size == (2 + 10 * 30, 2 + 3 * 30)  # a row per code value
    assert Image.open(out / "continuous_2.png").size == (2 + 10 * 30, 2 + 3 * 30)  # rows: code values, columns: -2..2
    assert not (out / "continuous_3.png").exists()
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(infogan.METRICS) <= set(header)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert [group["lr"] for group in checkpoint["opt_d"]["param_groups"]] == [2e-4, 2e-3]  # D's body and head; Q
    assert len(checkpoint["opt_d"]["param_groups"][1]["params"]) == len(list(models()[1].q.parameters()))


def test_never_reads_the_labels(tmp_path, tiny_data_dir):
    relabelled = tmp_path / "relabelled"
    shutil.copytree(tiny_data_dir, relabelled)
    for split in ("train", "t10k"):
        write_idx(relabelled / "mnist" / f"{split}-labels-idx1-ubyte.gz", (7 * np.arange(64) + 3) % 10)
    weights = []
    for data_dir, out in ((tiny_data_dir, "a"), (str(relabelled), "b")):
        assert run(infogan, tmp_path, data_dir, "--epochs", "1", *TINY, out=out) == 0
        checkpoint = torch.load(tmp_path / out / "checkpoint.pt", weights_only=True)
        weights.append([*checkpoint["generator"].values(), *checkpoint["discriminator"].values()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_generate_labels_are_the_categorical_codes_and_resume_keeps_them(tmp_path, tiny_data_dir, capsys):
    assert run(infogan, tmp_path, tiny_data_dir, "--epochs", "1", *TINY, "--categories", "4") == 0
    assert run(infogan, tmp_path, tiny_data_dir, "--generate", "6") == 0
    samples = np.load(tmp_path / "run" / "samples.npz")
    assert samples["images"].shape == (6, 28, 28, 1) and samples["labels"].tolist() == [0, 1, 2, 3, 0, 1]
    assert run(infogan, tmp_path, tiny_data_dir, "--generate", "3", "--label", "3") == 0
    assert np.load(tmp_path / "run" / "samples.npz")["labels"].tolist() == [3, 3, 3]
    capsys.readouterr()
    assert run(infogan, tmp_path, tiny_data_dir, "--generate", "3", "--label", "4") == 2
    assert "0..3" in capsys.readouterr().err
    assert run(infogan, tmp_path, tiny_data_dir, "--epochs", "2", "--resume", "--categories", "5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--categories 5" in err and "has 4" in err


def test_generate_draws_the_code_asked_for():
    torch.manual_seed(0)
    G, _ = models()
    images = infogan.generate_images(G, torch.full((4,), 6), "cpu", seed=3)
    z, _, code_cont = infogan.sample_latent(4, G, "cpu", generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(images, data.to_uint8(G.eval()(z, torch.full((4,), 6), code_cont)))


def test_preset_paper_sets_the_papers_settings_and_flags_win():
    args = infogan.parse_args(["--preset", "paper", "--lr-g", "5e-4"])
    assert (args.width, args.latent_dim, args.categories, args.continuous, args.batch_size, args.lr) == (
        64, 62, 10, 2, 128, 2e-4)
    assert args.lr_g == 5e-4 and infogan.parse_args([]).width == 32


def test_too_few_images_a_step_for_batchnorm_exits_2(tmp_path, capsys):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "only.png")
    assert infogan.main(["--dataset", str(folder), "--out", str(tmp_path / "run"), *TINY, "--image-size", "32"]) == 2
    assert "BatchNorm" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--loss", "hinge"], ["--image-size", "30"], ["--image-size", "48"],
                                   ["--continuous", "-1"], ["--lambda-cont", "nan"], ["--label", "3"]])
def test_bad_flags_exit_2_with_one_line(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        infogan.main(flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("infogan.py: error: ") and err.count("\n") == 1
