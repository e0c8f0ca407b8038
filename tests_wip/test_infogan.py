from common import *  # noqa: F401,F403
import math
import shutil

import torch.nn as nn
from PIL import Image

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
    convs = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in [*G.modules(), *D.modules()])
    assert convs == (6 if image_size == 64 else 4)  # one stride-2 stage per doubling beyond 32


def test_preset_paper_is_the_papers_mnist_architecture():
    args = infogan.parse_args(["--preset", "paper", "--lr-g", "5e-4"])  # flags given win
    assert (args.batch_size, args.lr, args.lr_g, args.lambda_cont) == (128, 2e-4, 5e-4, 0.1)
    G, D = models(28, 1, args.width, args.categories, args.continuous, args.latent_dim)
    layers = lambda net, kind: [m for m in net.modules() if isinstance(m, kind)]  # noqa: E731
    assert [(m.in_features, m.out_features) for m in layers(G, nn.Linear)] == [(62 + 10 + 2, 1024), (1024, 128 * 49)]
    assert [(m.in_channels, m.out_channels) for m in layers(G, nn.ConvTranspose2d)] == [(128, 64), (64, 1)]
    assert [(m.in_channels, m.out_channels) for m in layers(D, nn.Conv2d)] == [(1, 64), (64, 128)]
    assert [(m.in_features, m.out_features) for m in layers(D, nn.Linear)] == [(128 * 49, 1024), (1024, 1),
                                                                              (1024, 128), (128, 10 + 2)]


def test_information_terms_match_hand_computed_values_and_gradients():
    logits, codes = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]), torch.tensor([0, 2])
    expected_cat = (-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))) + math.log(3)) / 2
    # A unit-variance Gaussian's -log density per continuous code, summed over the codes: 0.5 (log 2 pi + (c - mean)^2)
    means = torch.tensor([[0.5, -1.0], [0.0, 0.2]], requires_grad=True)
    values, log_2pi = torch.tensor([[1.0, -1.0], [-1.0, 0.8]]), math.log(2 * math.pi)
    expected_cont = (0.5 * (log_2pi + 0.25) + 0.5 * log_2pi + 0.5 * (log_2pi + 1.0) + 0.5 * (log_2pi + 0.36)) / 2
    total, cat, cont = infogan.information_loss((logits, means), codes, values, lambda_cat=1.0, lambda_cont=0.1)
    assert cat.item() == pytest.approx(expected_cat, rel=1e-6) and cont.item() == pytest.approx(expected_cont, rel=1e-6)
    assert total.item() == pytest.approx(expected_cat + 0.1 * expected_cont, rel=1e-6)
    (grad,) = torch.autograd.grad(cont, means)  # (mean - c) / batch: a plain squared error's
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.0], [1.0, -0.6]]) / 2)


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
    D.forward = lambda images, recognise=False: calls.append((images is real, recognise)) or forward(images, recognise)
    for name, opt in (("D", opt_d), ("G", opt_g)):  # G's gradients when each optimizer steps
        opt.register_step_pre_hook(lambda *_, name=name: order.append((name, [p.grad for p in G.parameters()])))
    metrics = infogan.train_step(G, D, opt_g, opt_d, real, torch.amp.GradScaler("cpu", enabled=False))
    assert calls == [(True, False), (False, True), (False, True)]  # reals: the logit only; fakes: logit and Q
    assert [name for name, _ in order] == ["D", "G"] and all(g is None for g in order[0][1])  # D's: fakes detached
    assert metrics.shape == (7,) and torch.isfinite(metrics).all() and 0 <= metrics[6] <= 1  # code_acc: a share


def test_grid_has_one_code_value_a_row_and_a_sweep_moves_one_continuous_code_along_it():
    G, _ = models(continuous=3)
    z, code_cat, code_cont = infogan.grid_latents(G, 10, seed=0, device="cpu")
    assert code_cat.tolist() == [k for k in range(10) for _ in range(10)]
    assert torch.equal(z[:10], z[10:20]) and torch.equal(code_cont[:10], code_cont[90:])  # a column: one style
    z, code_cat, code_cont = infogan.grid_latents(G, 5, seed=0, device="cpu", sweep=1)
    assert len(z) == 50 and (z == z[0]).all() and code_cat.tolist() == [k for k in range(10) for _ in range(5)]
    torch.testing.assert_close(code_cont[:, 1], torch.linspace(-2, 2, 5).repeat(10))
    assert (code_cont[:, [0, 2]] == 0).all()


def test_run_never_reads_labels_draws_code_grids_logs_q_and_generates_codes(tmp_path, tiny_data_dir, capsys):
    relabelled = tmp_path / "relabelled"
    shutil.copytree(tiny_data_dir, relabelled)
    for split in ("train", "t10k"):
        write_idx(relabelled / "mnist" / f"{split}-labels-idx1-ubyte.gz", (7 * np.arange(64) + 3) % 10)
    weights = []
    for data_dir, out in ((tiny_data_dir, "run"), (str(relabelled), "b")):
        assert run(infogan, tmp_path, data_dir, "--epochs", "1", *TINY, "--categories", "3", "--lr-g", "2e-3",
                   out=out) == 0
        checkpoint = torch.load(tmp_path / out / "checkpoint.pt", weights_only=True)
        weights.append([*checkpoint["generator"].values(), *checkpoint["discriminator"].values()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    out = tmp_path / "run"
    assert Image.open(out / "samples" / "epoch_001.png").size == (2 + 10 * 30, 2 + 3 * 30)  # a row per code value
    assert Image.open(out / "continuous_2.png").size == (2 + 10 * 30, 2 + 3 * 30)  # rows: code values, columns: -2..2
    assert not (out / "continuous_3.png").exists()
    assert {"info_cat", "info_cont", "code_acc"} <= set((out / "metrics.csv").read_text().splitlines()[0].split(","))
    assert [group["lr"] for group in checkpoint["opt_d"]["param_groups"]] == [2e-4, 2e-3]  # D's body and head; Q
    assert run(infogan, tmp_path, tiny_data_dir, "--generate", "5") == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (5, 28, 28, 1) and samples["labels"].tolist() == [0, 1, 2, 0, 1]
    assert run(infogan, tmp_path, tiny_data_dir, "--generate", "3", "--label", "2") == 0
    assert np.load(out / "samples.npz")["labels"].tolist() == [2, 2, 2]
    capsys.readouterr()
    assert run(infogan, tmp_path, tiny_data_dir, "--generate", "3", "--label", "3") == 2
    assert "0..2" in capsys.readouterr().err


def test_too_few_images_a_step_for_batchnorm_exits_2(tmp_path, capsys):
    (tmp_path / "one").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "one" / "only.png")
    assert infogan.main(["--dataset", str(tmp_path / "one"), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "BatchNorm" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--image-size", "30"], ["--image-size", "48"], ["--continuous", "-1"],
                                   ["--lambda-cont", "nan"], ["--label", "3"]])
def test_bad_flags_exit_2_with_one_line(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        infogan.main(flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("infogan.py: error: ") and err.count("\n") == 1
