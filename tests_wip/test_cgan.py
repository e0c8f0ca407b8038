from common import *  # noqa: F401,F403
from PIL import Image

import cgan
import data

TINY = ["--latent-dim", "8"]


def no_scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


def test_generator_reads_the_one_hot_label_with_z_and_keeps_the_shapes():
    torch.manual_seed(0)
    G, D = cgan.Generator(8, 10, (3, 8, 8)).eval(), cgan.Discriminator((3, 8, 8), 10)
    fake = G(torch.randn(1, 8).repeat(10, 1), torch.arange(10))
    assert fake.shape == (10, 3, 8, 8) and fake.abs().max() <= 1 and D(fake, torch.arange(10)).shape == (10,)
    assert G.net[0].in_features == 8 + 10  # the one-hot label concatenated to z
    assert all((fake[0] - fake[k]).abs().max() > 1e-3 for k in range(1, 10))


def test_discriminator_is_a_projection_realness_plus_class_vector_dot_features():
    torch.manual_seed(0)
    D = cgan.Discriminator((1, 6, 6), 4, hidden=(8, 5))
    images, labels = torch.randn(3, 1, 6, 6), torch.tensor([0, 2, 3])
    features = D.features(images)
    class_vectors = D.class_projection.weight.t()[labels]  # V's column of each label
    expected = D.realness(features).squeeze(1) + (class_vectors * features).sum(1)
    torch.testing.assert_close(D(images, labels), expected)
    assert not torch.allclose(D(images, labels), D(images, (labels + 1) % 4))


def test_bce_is_binary_cross_entropy_on_logits():
    logits, sig = torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.sigmoid
    torch.testing.assert_close(cgan.bce(logits, 1), -torch.log(sig(logits)).mean())
    torch.testing.assert_close(cgan.bce(logits, 0), -torch.log(1 - sig(logits)).mean())


def record_steps(nets, optimizers):  # at each step: (optimizer, {net: (changed yet?, its gradients)})
    start = {n: [p.detach().clone() for p in net.parameters()] for n, net in nets.items()}
    log = []

    def snapshot():
        return {n: (any(not torch.equal(p, q) for p, q in zip(net.parameters(), start[n])),
                    [None if p.grad is None else p.grad.clone() for p in net.parameters()]) for n, net in nets.items()}
    for name, opt in optimizers.items():
        def step(*args, _step=opt.step, _name=name, **kwargs):
            log.append((_name, snapshot()))
            return _step(*args, **kwargs)
        opt.step = step
    return log


def test_train_step_updates_d_then_g_on_the_real_batchs_labels_with_the_non_saturating_loss():
    torch.manual_seed(0)
    G, D = cgan.Generator(8, 10, (1, 6, 6)), cgan.Discriminator((1, 6, 6), 10)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    log, seen = record_steps({"G": G, "D": D}, {"G": opt_g, "D": opt_d}), []
    G.register_forward_hook(lambda module, inputs, fake: seen.append((inputs[1], fake)))
    real, labels = torch.rand(16, 1, 6, 6) * 2 - 1, torch.arange(16) % 10
    metrics = cgan.train_step(G, D, opt_g, opt_d, real, labels, 8, no_scaler())
    (seen_labels, fake), = seen
    assert [name for name, _ in log] == ["D", "G"] and torch.equal(seen_labels, labels)
    with torch.no_grad():  # G's loss is -log D(G(z)) under the D of G's step (the final D)
        torch.testing.assert_close(metrics[1], -torch.log(torch.sigmoid(D(fake, labels))).mean())
    (_, at_d), (_, at_g) = log
    assert not at_d["G"][0] and not at_d["D"][0] and all(g is None for g in at_d["G"][1])  # fakes detached for D
    assert at_g["D"][0] and not at_g["G"][0] and all(g is not None and g.abs().sum() > 0 for g in at_g["G"][1])
    assert all(torch.equal(a, b) for a, b in zip(at_d["D"][1], at_g["D"][1]))  # G's backward left D's grads alone
    assert metrics.shape == (4,) and torch.isfinite(metrics).all() and 0 <= metrics[2] <= 1 and 0 <= metrics[3] <= 1
    assert all(p.requires_grad for p in D.parameters())


def test_grid_has_one_row_per_class_and_d_accuracy_uses_labels(tmp_path, tiny_data_dir):
    assert run(cgan, tmp_path, tiny_data_dir, "--epochs", "1", *TINY) == 0
    out = tmp_path / "run"
    assert Image.open(out / "samples" / "epoch_001.png").size == (2 + 10 * 30, 2 + 10 * 30)  # MNIST: 10 classes
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"d_real", "d_fake", "d_acc_real_train", "d_acc_real_test", "d_acc_fake"} <= set(header)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["script"] == "cgan.py" and len(checkpoint["classes"]) == 10


def test_generate_writes_labels_and_honours_label(tmp_path, tiny_data_dir, capsys):
    assert run(cgan, tmp_path, tiny_data_dir, "--epochs", "1", *TINY) == 0
    assert run(cgan, tmp_path, tiny_data_dir, "--generate", "6") == 0
    samples = np.load(tmp_path / "run" / "samples.npz")
    assert samples["images"].shape == (6, 28, 28, 1) and samples["images"].dtype == np.uint8
    assert samples["labels"].dtype == np.int64 and samples["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    assert run(cgan, tmp_path, tiny_data_dir, "--generate", "5", "--label", "3") == 0
    assert np.load(tmp_path / "run" / "samples.npz")["labels"].tolist() == [3] * 5
    capsys.readouterr()
    assert run(cgan, tmp_path, tiny_data_dir, "--generate", "4", "--label", "10") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--label 10" in err and "0..9" in err


def test_generate_draws_the_label_asked_for():
    torch.manual_seed(0)
    G, labels = cgan.Generator(8, 4, (1, 6, 6)), torch.tensor([2, 0, 3])
    with torch.no_grad():
        expected = data.to_uint8(G.eval()(torch.randn(3, 8, generator=torch.Generator().manual_seed(3)), labels))
    assert torch.equal(cgan.generate_images(G, labels, 8, "cpu", seed=3), expected)


@pytest.mark.parametrize("flags", [["--label", "3"], ["--label", "-1", "--generate", "2"], ["--loss", "hinge"]])
def test_label_only_with_generate_and_no_loss_flag(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cgan.main(["--out", str(tmp_path / "run"), *flags])
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("cgan.py: error: ")
