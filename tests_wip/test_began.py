from common import *  # noqa: F401,F403
import csv

import torch.nn as nn

import began

TINY = ["--width", "4", "--latent-dim", "8"]


def models(image_size=32, channels=1, width=4, latent_dim=8, convs=1):
    return (began.Generator(latent_dim, image_size, channels, width, convs),
            began.Discriminator(image_size, channels, width, latent_dim, convs))


def test_reconstruction_loss_is_the_mean_absolute_error_an_image():
    images = torch.tensor([[[[0.5, -1.0], [0.0, 1.0]]], [[[0.2, 0.2], [0.2, 0.2]]]])
    halving = lambda x: x / 2  # noqa: E731  a "D" reconstructing half its input: L = mean |x| / 2
    torch.testing.assert_close(began.reconstruction_loss(halving, images), torch.tensor([2.5 / 8, 0.1]))


@pytest.mark.parametrize("image_size,channels", [(32, 1), (64, 3)])
def test_d_is_an_autoencoder_and_g_has_its_decoders_shape(image_size, channels):
    G, D = models(image_size, channels, convs=2)
    fake = G(began.sample_z(5, 8, "cpu"))
    assert fake.shape == (5, channels, image_size, image_size) and fake.abs().max() <= 1
    assert D(fake).shape == fake.shape  # D reconstructs, it does not classify
    assert [p.shape for p in G.decoder.parameters()] == [p.shape for p in D.decoder.parameters()]
    modules = [*G.modules(), *D.modules()]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ConvTranspose2d, nn.ReLU, nn.LeakyReLU)) for m in modules)
    assert all(m.mode == "nearest" for m in modules if isinstance(m, nn.Upsample))
    z = began.sample_z(1000, 8, "cpu")
    assert z.min() >= -1 and z.max() <= 1 and z.abs().mean() > 0.4  # uniform on [-1, 1], not normal


def test_train_step_updates_d_then_g_then_k_by_the_papers_control():
    torch.manual_seed(0)
    G, D = models()
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    order = []
    for name, opt in (("G", opt_g), ("D", opt_d)):
        opt.register_step_pre_hook(lambda *_, name=name: order.append(name))
    G0 = [p.clone() for p in G.parameters()]
    k, scaler = torch.tensor(0.3), torch.amp.GradScaler("cpu", enabled=False)
    metrics = began.train_step(G, D, opt_g, opt_d, torch.rand(6, 1, 32, 32) * 2 - 1, k, 8, 0.5, 0.01, scaler)
    assert order == ["D", "G"] and metrics.shape == (5,) and torch.isfinite(metrics).all()
    d_value, g_value, l_real, l_fake, m_global = metrics.tolist()
    assert d_value == pytest.approx(l_real - 0.3 * l_fake, rel=1e-5)  # L(x) - k_t L(G(z))
    assert m_global == pytest.approx(l_real + abs(0.5 * l_real - l_fake), rel=1e-5)
    assert k.item() == pytest.approx(min(max(0.3 + 0.01 * (0.5 * l_real - l_fake), 0), 1), rel=1e-5)  # in place
    assert all(not torch.equal(p, q) for p, q in zip(G.parameters(), G0))
    assert all(p.requires_grad for p in D.parameters())
    for gamma, clipped in ((1e3, 1.0), (0.0, 0.0)):  # k_t stays in [0, 1]
        began.train_step(G, D, opt_g, opt_d, torch.rand(6, 1, 32, 32) * 2 - 1, k, 8, gamma, 10.0, scaler)
        assert k.item() == clipped


def test_reconstruction_columns_measure_d_on_train_held_out_and_fakes():
    D = lambda images: torch.zeros_like(images)  # noqa: E731  reconstructs all as grey: L = mean |x|
    G = lambda z: -torch.ones(len(z), 1, 4, 4)  # noqa: E731  black fakes: L = 1
    D.eval = D.train = G.eval = G.train = lambda: None
    D.parameters = lambda: iter([torch.zeros(1)])
    white = torch.full((6, 1, 4, 4), 255, dtype=torch.uint8)
    losses = began.d_reconstruction(D, G, {"d_recon_real_train": white, "d_recon_real_test": None}, latent_dim=3)
    assert losses == {"d_recon_real_train": "1.00000", "d_recon_real_test": "", "d_recon_fake": "1.00000"}


def test_paper_preset_builds_the_papers_64px_networks():
    args = began.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.convs, args.latent_dim, args.batch_size, args.lr, args.gamma,
            args.lambda_k) == (64, 64, 2, 64, 16, 1e-4, 0.5, 0.001)
    G, D = models(64, 3, args.width, args.latent_dim, args.convs)
    # decoder: fc 64 -> 64*8*8 (266,240) + 8 convs 64->64 (8 x 36,928) + output conv 64->3 (1,731) = 563,395;
    # encoder: conv 3->64 (1,792) + two convs at 64, 128, 192, 256 channels (73,856 + 295,168 + 663,936 + 1,180,160)
    # + stride-2 64->128, 128->192, 192->256 (73,856 + 221,376 + 442,624) + fc 256*8*8 -> 64 (1,048,640)
    assert sum(p.numel() for p in G.parameters()) == 563_395
    assert sum(p.numel() for p in D.parameters()) == 4_001_408 + 563_395


def test_run_logs_k_t_and_m_global_and_resumes_k_exactly(tiny_data_dir, tmp_path, capsys):
    fast_k = [*TINY, "--lambda-k", "0.5", "--gamma", "1"]
    assert run(began, tmp_path, tiny_data_dir, *fast_k, "--epochs", "2", out="straight") == 0
    assert run(began, tmp_path, tiny_data_dir, *fast_k, "--epochs", "1", out="split") == 0
    assert run(began, tmp_path, tiny_data_dir, *TINY, "--epochs", "2", "--resume", out="split") == 0
    checkpoints, rows = [], []
    for out in ("straight", "split"):
        checkpoints.append(torch.load(tmp_path / out / "checkpoint.pt", weights_only=True))
        with open(tmp_path / out / "metrics.csv", newline="") as f:
            rows.append([{k: v for k, v in row.items() if k not in ("seconds", "img_per_s")}
                         for row in csv.DictReader(f)])
    assert rows[0] == rows[1] and checkpoints[0]["k"] == checkpoints[1]["k"] > 0
    assert float(rows[0][-1]["k_t"]) == pytest.approx(checkpoints[0]["k"], abs=1e-5)
    for column in ("m_global", "l_real", "l_fake", "d_recon_real_train", "d_recon_real_test", "d_recon_fake"):
        assert float(rows[0][-1][column]) > 0, column
    assert "M_global" in capsys.readouterr().out and (tmp_path / "straight" / "losses.png").stat().st_size > 0
