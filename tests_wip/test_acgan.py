from common import *  # noqa: F401,F403
import csv

import torch.nn as nn
from PIL import Image

import acgan

TINY = ["--width", "4", "--latent-dim", "8"]


def models(image_size=32, channels=1, num_classes=10, width=4, twin=True):
    return (acgan.Generator(16, image_size, channels, width, num_classes),
            acgan.Discriminator(image_size, channels, width, num_classes, twin=twin))


def no_scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


@pytest.mark.parametrize("image_size,channels", [(32, 1), (64, 3)])
def test_d_has_a_source_head_and_class_heads_on_one_body(image_size, channels):
    G, D = models(image_size, channels, num_classes=7)
    fake = G(torch.randn(5, 16), torch.arange(5))
    assert fake.shape == (5, channels, image_size, image_size) and fake.abs().max() <= 1
    source, classes, twin = D(fake)
    assert source.shape == (5,) and classes.shape == twin.shape == (5, 7)
    body = {id(p) for p in D.features.parameters()}
    heads = {id(p) for head in (D.source, D.classes, D.twin) for p in head.parameters()}
    assert body | heads == {id(p) for p in D.parameters()} and not body & heads
    _, paper_d = models(image_size, channels, num_classes=7, twin=False)  # --class-loss paper: no twin head
    assert paper_d(fake)[2] is None
    assert sum(p.numel() for p in D.parameters()) - sum(p.numel() for p in paper_d.parameters()) == 7 * (
        D.twin.in_features + 1)


def test_generator_output_depends_on_the_label_and_d_never_sees_it():
    torch.manual_seed(0)
    G, D = models()
    fake = G.eval()(torch.randn(1, 16).repeat(10, 1), torch.arange(10))
    assert all((fake[0] - fake[k]).abs().max() > 1e-4 for k in range(1, 10))
    with pytest.raises(TypeError):
        D(fake, torch.arange(10))


def test_losses_are_the_papers_log_likelihoods_and_tac_subtracts_the_twins():
    real, fake = torch.tensor([2.0, -1.0], requires_grad=True), torch.tensor([0.5, -3.0], requires_grad=True)
    real_classes = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]], requires_grad=True)
    fake_classes = torch.tensor([[0.0, 0.0, 0.0], [4.0, -2.0, 1.0]], requires_grad=True)
    twin_classes = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    labels, sig = torch.tensor([0, 2]), torch.sigmoid

    def nll(logits):  # -log softmax(z)_y written out, batch mean
        return (torch.log(torch.exp(logits).sum(1)) - logits[torch.arange(2), labels]).mean()

    # by hand: -log softmax([0, 0, 0])[0] = log 3; -log softmax([4, -2, 1])[2] = log(e^4 + e^-2 + e) - 1 = 3.0509
    assert nll(fake_classes).item() == pytest.approx((np.log(3) + 3.0509) / 2, abs=1e-4)
    source_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    source_g = -torch.log(sig(fake)).mean()  # non-saturating
    inputs = (real, fake, real_classes, fake_classes, twin_classes)
    for got, expected in [
        (acgan.d_loss(real, fake, real_classes, fake_classes, labels), source_d + nll(real_classes) + nll(fake_classes)),
        (acgan.d_loss(real, fake, real_classes, twin_classes, labels, class_weight=0.25),
         source_d + 0.25 * (nll(real_classes) + nll(twin_classes))),
        (acgan.g_loss(fake, fake_classes, labels), source_g + nll(fake_classes)),
        (acgan.g_loss(fake, fake_classes, labels, 0.25, twin_classes),
         source_g + 0.25 * (nll(fake_classes) - nll(twin_classes)))]:
        torch.testing.assert_close(got, expected)
        for g, e in zip(*(torch.autograd.grad(x, inputs, retain_graph=True, materialize_grads=True)
                          for x in (got, expected))):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("twin", [True, False])
def test_train_step_updates_d_then_g_each_touching_only_its_own_weights(twin):
    torch.manual_seed(0)
    G, D = models(twin=twin)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    seen = []
    for name, opt in (("G", opt_g), ("D", opt_d)):
        opt.register_step_pre_hook(lambda opt, *_, name=name: seen.append(
            (name, [p.grad is None for p in G.parameters()], [p.grad.clone() for p in D.parameters()])))
    metrics = acgan.train_step(G, D, opt_g, opt_d, torch.rand(8, 1, 32, 32) * 2 - 1, torch.arange(8), 16, no_scaler())
    (d_name, g_grads_at_d, d_grads), (g_name, _, d_grads_at_g) = seen
    assert (d_name, g_name) == ("D", "G")
    assert all(g_grads_at_d)  # the fakes were detached for D's update
    assert all(g.abs().sum() > 0 for g in d_grads)  # every head of D learns in its update
    assert all(torch.equal(a, b) for a, b in zip(d_grads, d_grads_at_g))  # G's backward leaves D's gradients
    assert metrics.shape == (7 if twin else 6,) and torch.isfinite(metrics).all()
    assert all(p.requires_grad for p in D.parameters())


def test_twin_head_not_the_class_head_learns_the_class_of_fakes(monkeypatch):
    torch.manual_seed(0)
    G, D = models()
    with torch.no_grad():  # the twin says "class k has logit k" whatever the image: recognisable below
        D.twin.weight.zero_(), D.twin.bias.copy_(torch.arange(10.0))
    seen, d_loss, g_loss = {}, acgan.d_loss, acgan.g_loss
    monkeypatch.setattr(acgan, "d_loss", lambda *a: (seen.update(d_fake=a[3].detach()), d_loss(*a))[1])
    monkeypatch.setattr(acgan, "g_loss", lambda *a: (seen.update(g_class=a[1].detach(), g_twin=a[4].detach()),
                                                     g_loss(*a))[1])
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.0), torch.optim.SGD(D.parameters(), lr=0.0)
    acgan.train_step(G, D, opt_g, opt_d, torch.rand(8, 1, 32, 32) * 2 - 1, torch.arange(8), 16, no_scaler())
    assert torch.equal(seen["d_fake"], torch.arange(10.0).expand(8, 10))  # D: the twin names the fakes
    assert torch.equal(seen["g_twin"], torch.arange(10.0).expand(8, 10)) and not torch.equal(seen["g_class"],
                                                                                              seen["g_twin"])


def test_accuracy_columns_count_both_heads_on_training_held_out_and_fake_images():
    class BrightD(nn.Module):  # source logit = brightness; class 0 for bright images, 1 for dark ones
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, images):
            b = images.flatten(1).mean(1)
            return b, torch.stack([b, -b], dim=1), None

    class DarkG(nn.Module):
        def forward(self, z, labels):
            return -torch.ones(len(z), 1, 4, 4)

    images = torch.cat([torch.full((6, 1, 4, 4), 255, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])  # right: 3 bright + 2 dark of 10
    torch.manual_seed(0)
    accuracy = acgan.d_accuracy(BrightD(), DarkG(), {"train": (images, labels), "test": None}, 3, num_classes=2)
    assert 0.45 < float(accuracy.pop("d_class_acc_fake")) < 0.55  # right where G was asked for class 1
    assert accuracy == {"d_acc_real_train": "0.6000", "d_acc_real_test": "", "d_acc_fake": "1.0000",
                        "d_class_acc_train": "0.5000", "d_class_acc_test": ""}


def test_paper_preset_is_the_papers_cifar_generator_with_the_papers_loss():
    args = acgan.parse_args(["--preset", "paper"])
    assert (args.image_size, args.latent_dim, args.width, args.batch_size, args.lr, args.class_loss) == (
        32, 100, 96, 100, 2e-4, "paper")
    G = acgan.Generator(args.latent_dim, 32, 3, args.width, 10)
    D = acgan.Discriminator(32, 3, args.width, 10, twin=False)
    # G: convT 116->384 712,704 + 384->192 1,179,648 + 192->96 294,912 + 96->3 4,611, BatchNorms 1,344, embedding 160
    assert [m.out_channels for m in G.net if isinstance(m, nn.ConvTranspose2d)] == [384, 192, 96, 3]
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (2_193_379, 1_548_011)


def test_run_logs_both_heads_draws_a_row_per_class_and_generates_a_label(tiny_data_dir, tmp_path, capsys):
    assert run(acgan, tmp_path, tiny_data_dir, *TINY, "--epochs", "1") == 0
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    for column in ("d_acc_real_train", "d_acc_real_test", "d_acc_fake", "d_class_acc_train", "d_class_acc_test",
                   "d_class_acc_fake"):
        assert 0 <= float(row[column]) <= 1, column
    assert {"class_loss_real", "class_loss_fake", "twin_loss_fake"} <= set(row)
    assert Image.open(tmp_path / "run" / "samples" / "epoch_001.png").size == (2 + 10 * 34, 2 + 10 * 34)  # a row a class
    assert acgan.main(["--out", str(tmp_path / "run"), "--generate", "12"]) == 0
    assert list(np.load(tmp_path / "run" / "samples.npz")["labels"]) == [*range(10), 0, 1]
    assert acgan.main(["--out", str(tmp_path / "run"), "--generate", "3", "--label", "2"]) == 0
    assert list(np.load(tmp_path / "run" / "samples.npz")["labels"]) == [2, 2, 2]
    capsys.readouterr()
    assert acgan.main(["--out", str(tmp_path / "run"), "--generate", "3", "--label", "10"]) == 2
    assert capsys.readouterr().err.strip() == "acgan.py: error: --label 10: the model knows classes 0..9"


def test_a_folder_of_loose_images_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "loose").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / "loose" / f"{i}.png")
    assert run(acgan, tmp_path, str(tmp_path), "--dataset", str(tmp_path / "loose"), *TINY) == 2
    assert "single class" in capsys.readouterr().err
