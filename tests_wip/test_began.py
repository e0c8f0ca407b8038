from common import *  # noqa: F401,F403
import csv

import torch.nn as nn

import began

TINY = ["--width", "4", "--latent-dim", "8"]


def models(image_size=32, channels=1, width=4, latent_dim=8, convs=1):
    return (began.Generator(latent_dim, image_size, channels, width, convs),
            began.Discriminator(image_size, channels, width, latent_dim, convs))


def test_k_update_is_the_papers_clipped_proportional_control():
    t = torch.tensor
    # k + lambda_k (gamma L(x) - L(G(z))) = 0.5 + 0.001 * (0.5 * 0.2 - 0.15) = 0.49995
    assert began.update_k(t(0.5), t(0.2), t(0.15), 0.5, 0.001).item() == pytest.approx(0.49995, abs=1e-7)
    # fakes reconstructed too well (0.02 < gamma L(x) = 0.1): k grows by 0.001 * 0.08; gamma 0.3: by 0.001 * 0.04
    assert began.update_k(t(0.1), t(0.2), t(0.02), 0.5, 0.001).item() == pytest.approx(0.10008, abs=1e-7)
    assert began.update_k(t(0.1), t(0.2), t(0.02), 0.3, 0.001).item() == pytest.approx(0.10004, abs=1e-7)
    assert began.update_k(t(0.0), t(0.2), t(0.9), 0.5, 0.001).item() == 0.0  # clipped at both ends
    assert began.update_k(t(0.99995), t(1.0), t(0.0), 0.5, 0.001).item() == 1.0


def test_convergence_measure_is_l_real_plus_the_absolute_imbalance():
    t = torch.tensor
    assert began.convergence_measure(t(0.2), t(0.15), 0.5).item() == pytest.approx(0.25)  # 0.2 + |0.1 - 0.15|
    assert began.convergence_measure(t(0.2), t(0.05), 0.5).item() == pytest.approx(0.25)  # 0.2 + |0.1 - 0.05|
    assert began.convergence_measure(t(0.2), t(0.1), 0.5).item() == pytest.approx(0.2)  # in balance: just L(x)
    assert began.convergence_measure(t(0.4), t(0.1), 0.7).item() == pytest.approx(0.4 + 0.18)


def test_losses_are_l1_reconstruction_with_k_weighted_fakes():
    images = torch.tensor([[[[0.5, -1.0], [0.0, 1.0]]], [[[0.2, 0.2], [0.2, 0.2]]]])
    halving = lambda x: x / 2  # noqa: E731  a "D" reconstructing half its input: L = mean |x| / 2
    torch.testing.assert_close(began.reconstruction_loss(halving, images), torch.tensor([2.5 / 8, 0.1]))
    l_real, l_fake = torch.tensor(0.3, requires_grad=True), torch.tensor(0.2, requires_grad=True)
    loss = began.d_loss(l_real, l_fake, torch.tensor(0.25))
    assert loss.item() == pytest.approx(0.3 - 0.25 * 0.2)
    assert [g.item() for g in torch.autograd.grad(loss, (l_real, l_fake))] == [1.0, -0.25]
    assert began.g_loss(l_fake) is l_fake


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


def test_one_more_block_per_doubling_and_convs_add_one_a_resolution():
    def convs(module):
        return sum(isinstance(m, nn.Conv2d) for m in module.modules())
    (G32, D32), (G64, D64), (G2, _) = models(32), models(64), models(32, convs=2)
    assert convs(G64) == convs(G32) + 1 and convs(D64) == convs(D32) + 3  # D: + a stride-2 conv in the encoder
    assert convs(G2) == convs(G32) + 3  # at 8, 16 and 32


def test_train_step_updates_d_then_g_and_k_from_ds_losses():
    torch.manual_seed(0)
    G, D = models()
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    order = []
    for name, opt in (("G", opt_g), ("D", opt_d)):
        opt.register_step_pre_hook(lambda *_, name=name: order.append(name))
    G0 = [p.clone() for p in G.parameters()]
    k = torch.tensor(0.3)
    metrics = began.train_step(G, D, opt_g, opt_d, torch.rand(6, 1, 32, 32) * 2 - 1, k, 8, 0.5, 0.01,
                               torch.amp.GradScaler("cpu", enabled=False))
    assert order == ["D", "G"] and metrics.shape == (5,) and torch.isfinite(metrics).all()
    d_value, g_value, l_real, l_fake, m_global = metrics.tolist()
    assert d_value == pytest.approx(l_real - 0.3 * l_fake, rel=1e-5)
    assert m_global == pytest.approx(l_real + abs(0.5 * l_real - l_fake), rel=1e-5)
    assert k.item() == pytest.approx(min(max(0.3 + 0.01 * (0.5 * l_real - l_fake), 0), 1), rel=1e-5)  # in place
    assert all(not torch.equal(p, q) for p, q in zip(G.parameters(), G0))
    assert all(p.requires_grad for p in D.parameters())


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
    assert run(began, tmp_path, tiny_data_dir, *TINY, "--epochs", "2", "--lambda-k", "0.5", "--gamma", "1", out="straight") == 0
    assert run(began, tmp_path, tiny_data_dir, *TINY, "--epochs", "1", "--lambda-k", "0.5", "--gamma", "1", out="split") == 0
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


def test_resume_keeps_the_runs_gamma_and_refuses_another(tiny_data_dir, tmp_path, capsys):
    assert run(began, tmp_path, tiny_data_dir, *TINY, "--epochs", "1", "--gamma", "0.7") == 0
    assert run(began, tmp_path, tiny_data_dir, *TINY, "--epochs", "2", "--resume") == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["args"]["gamma"] == 0.7
    capsys.readouterr()
    assert run(began, tmp_path, tiny_data_dir, *TINY, "--epochs", "3", "--resume", "--gamma", "0.3") == 2
    assert "--gamma 0.3: the run in" in capsys.readouterr().err


def test_generate_writes_images_without_labels_and_label_is_refused(tiny_data_dir, tmp_path, capsys):
    assert run(began, tmp_path, tiny_data_dir, *TINY, "--epochs", "1") == 0
    assert began.main(["--out", str(tmp_path / "run"), "--generate", "5"]) == 0
    samples = np.load(tmp_path / "run" / "samples.npz")
    assert list(samples) == ["images"] and samples["images"].shape == (5, 32, 32, 1)
    with pytest.raises(SystemExit) as exit_info:  # unconditional: no --label
        began.main(["--out", str(tmp_path / "run"), "--generate", "5", "--label", "1"])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
