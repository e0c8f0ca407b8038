from common import *

import math

import torch.nn.functional as F
from PIL import Image

import stylegan


def tiny_stylegan(image_size=32, channels=1):
    torch.manual_seed(0)
    return (stylegan.Generator(8, 8, image_size, channels, 8, 1024, 2),
            stylegan.Discriminator(image_size, channels, 8, 1024, 4))


def one_step(G, D, real, step, **flags):
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    return stylegan.train_step(G, D, opt_g, opt_d, real, 8, torch.amp.GradScaler("cpu", enabled=False), step, **flags)


def test_demodulation_is_the_per_sample_unit_norm_weight():
    torch.manual_seed(0)
    layer = stylegan.ModulatedConv2d(6, 5, w_dim=4, kernel_size=3)
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 4)
    out, styles = layer(x, w), layer.affine(w)
    for b in range(3):  # the paper's per-sample weight w'', built by hand
        modulated = layer.weight * styles[b][None, :, None, None]
        demodulated = modulated / modulated.square().sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
        torch.testing.assert_close(out[b:b + 1], F.conv2d(x[b:b + 1], demodulated, padding=1), atol=1e-5, rtol=1e-4)
    assert layer.affine.bias.eq(1).all() and layer.weight_gain == 1 / math.sqrt(6 * 9)  # styles from 1, He's gain


def test_resampling_is_the_1_3_3_1_filter():
    x = torch.randn(2, 3, 8, 8)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = (taps[:, None] * taps[None, :] / 64).expand(3, 1, 4, 4)
    torch.testing.assert_close(stylegan.downsample(x), F.conv2d(F.pad(x, [1, 1, 1, 1]), kernel, stride=2, groups=3))
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(stylegan.upsample(x)[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1])


def test_every_image_d_sees_is_augmented_and_r1_is_taken_at_the_unaugmented_reals_through_it():
    a = torch.randn(1, 2, 3, 3)
    linear = lambda images: (images * a).flatten(1).sum(1)  # noqa: E731  grad_x D = a for every image
    r1 = stylegan.r1_penalty(linear, torch.randn(4, 2, 3, 3), lambda x: 3 * x)  # through the augmentation x -> 3x
    torch.testing.assert_close(r1, 9 * a.square().sum())
    G, D = tiny_stylegan()
    shown = []

    def augment(images):  # what data.Augmentation is to train_step
        shown.append(("augment", len(images), images.requires_grad and images.is_leaf))
        return images.flip(-1)
    augment.observe = lambda real_logits: shown.append(("observe", len(real_logits)))  # noqa: E731
    one_step(G, D, torch.rand(4, 1, 32, 32), 16, r1_gamma=1.0, augment=augment)
    # D's step: reals, fakes, R1's reals (a leaf wanting its gradient); ADA hears; G's step: the fakes again
    assert shown == [("augment", 4, False), ("augment", 4, False), ("augment", 4, True), ("observe", 4),
                     ("augment", 4, False)]


def test_lazy_r1_every_16th_step_and_path_length_every_4th(monkeypatch):
    G, D = tiny_stylegan()
    calls = []
    monkeypatch.setattr(stylegan, "r1_penalty", lambda *a: calls.append("r1") or torch.ones([]))
    monkeypatch.setattr(stylegan, "path_length_penalty", lambda *a: calls.append("pl") or torch.ones([]))
    for step in range(1, 17):
        metrics = one_step(G, D, torch.rand(2, 1, 32, 32), step, r1_gamma=1.0, pl_weight=2.0)
    assert calls == ["pl"] * 3 + ["r1", "pl"]  # steps 4, 8, 12, then 16
    assert metrics[4:].tolist() == [stylegan.R1_INTERVAL, stylegan.PL_INTERVAL]  # raw penalty times its interval


def test_ws_truncation_to_the_tracked_mean_w_and_style_mixing_at_one_cutoff():
    G, _ = tiny_stylegan()
    z = torch.randn(16, 8)
    w = G.mapping(z, track_average=True)
    torch.testing.assert_close(G.mapping.w_avg, (1 - 0.995) * w.detach().mean(0))  # the official w_avg_beta
    torch.testing.assert_close(G.mapping(z, psi=0.5), (G.mapping.w_avg + G.mapping(z)) / 2)
    ws = G.ws(z, mixing_prob=1.0)  # with probability 1: one switch at a cutoff in 1..num_ws - 1
    assert sum(not torch.equal(ws[:, k], ws[:, k - 1]) for k in range(1, G.num_ws)) == 1


def test_style_mixing_grid_takes_coarse_ws_from_the_column_and_fine_ones_from_the_row():
    G, _ = tiny_stylegan()
    grids = {cutoff: stylegan.style_grids(G, 8, "cpu", 1, 9, 2, cutoff)[0][1].unflatten(0, (3, 10))
             for cutoff in (0, 4, G.num_ws)}  # style_mixing.png's images, 10 a row
    corner, columns, rows, mixed = grids[4][0, 0], grids[4][0, 1:], grids[4][1:, 0], grids[4][1:, 1:]
    assert corner.eq(0).all()  # mid grey
    torch.testing.assert_close(grids[G.num_ws][1:, 1:], columns.expand(2, -1, -1, -1, -1))  # all from the column
    torch.testing.assert_close(grids[0][1:, 1:], rows[:, None].expand(-1, 9, -1, -1, -1))  # all from the row
    assert (mixed - columns).abs().amax() > 1e-4 and (mixed - rows[:, None]).abs().amax() > 1e-4


def test_average_half_life_ramps_with_the_steps():
    G, average = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    for step, expected_half_life in ((100, 5.0), (100_000, math.log(0.5) / math.log(0.999))):
        average.weight.data.fill_(0.0), G.weight.data.fill_(1.0)
        stylegan.update_average(average, G, step, 0.999)
        assert average.weight.item() == pytest.approx(1 - 0.5 ** (1 / expected_half_life))


def test_preset_paper_is_stylegan2_adas_cifar_configuration():
    args = stylegan.parse_args(["--preset", "paper"])
    assert (args.batch_size, args.mbstd_group, args.lr, args.r1_gamma, args.style_mixing, args.pl_weight) == (
        64, 32, 0.0025, 0.01, 0, 0)
    assert math.log(0.5) / math.log(args.average_decay) * 64 == pytest.approx(500_000)  # half-life 500k images
    G = stylegan.Generator(args.latent_dim, args.w_dim, args.image_size, 3, args.width, args.channel_base,
                           args.mapping_layers)
    D = stylegan.Discriminator(args.image_size, 3, args.width, args.channel_base, args.mbstd_group)
    c, affine = 512, 512 * 512 + 512  # affine: w -> one style per input channel
    layer, to_rgb = affine + c * c * 9 + 1 + c, affine + 3 * c + 3  # weight, noise strength, bias
    g_count = 2 * (c * c + c) + c * 16 + 7 * layer + 4 * to_rgb  # mapping, const, 1 + 2 + 2 + 2 layers, 4 ToRGBs
    d_count = (3 * c + c) + 6 * (c * c * 9 + c) + ((c + 1) * c * 9 + c) + (c * 16 * c + c) + (c + 1)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (count(G), count(D)) == (g_count, d_count) == (19_947_539, 20_720_641)


def test_run_compensates_lazy_regularisation_and_generate_writes_the_style_grids(tiny_data_dir, tmp_path):
    assert run(stylegan, tmp_path, tiny_data_dir, "--width", "4", "--latent-dim", "8", "--w-dim", "8", "--epochs", "1",
               "--pl-weight", "1", "--style-mixing", "0.5") == 0
    out = tmp_path / "run"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    for (group,), c in ((checkpoint["opt_d"]["param_groups"], 16 / 17), (checkpoint["opt_g"]["param_groups"], 4 / 5)):
        assert group["lr"] == pytest.approx(0.0025 * c) and group["betas"] == (0.0, 0.99 ** c)  # R1 and path length
    assert checkpoint["generator"]["pl_mean"] > 0 and checkpoint["generator_average"]["mapping.w_avg"].any()
    assert Image.open(out / "style_mixing.png").size == (2 + 10 * 34, 2 + 7 * 34)  # sources row + 6 mixed rows
    os.remove(out / "truncation.png")
    assert stylegan.main(["--out", str(out), "--generate", "12", "--truncation", "0"]) == 0
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (12, 32, 32, 1) and (images == images[0]).all()  # psi 0: the mean image every time
    assert (out / "truncation.png").is_file() and (out / "style_mixing.png").is_file()
