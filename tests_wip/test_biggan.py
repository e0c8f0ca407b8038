from common import *

import torch.nn as nn
from PIL import Image

import biggan

TINY = ["--width", "4", "--latent-dim", "8", "--epochs", "1"]


def models(image_size=32, channels=1, num_classes=10, width=4, latent_dim=8, **options):
    torch.manual_seed(0)
    G = biggan.Generator(latent_dim, image_size, channels, width, num_classes, **options)
    D = biggan.Discriminator(image_size, channels, width, num_classes, options.get("attention", 0))
    return G, D


def step(G, D, group, lr=1e-3, **options):
    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, 0.999)) for net in (G, D))
    return biggan.train_step(G, D, opt_g, opt_d, group, 8, torch.amp.GradScaler("cpu", enabled=False), **options)


def batch(n):  # (reals, labels)
    return torch.rand(n, 1, 32, 32) * 2 - 1, torch.arange(n) % 10


@pytest.mark.parametrize("image_size, channels, num_classes", [(32, 1, 10), (64, 3, 0)])
def test_shapes_one_block_per_doubling_and_conditioning_only_with_classes(image_size, channels, num_classes):
    G, D = models(image_size, channels, num_classes, attention=16)
    labels = torch.arange(6) % max(num_classes, 1)
    fake = G(torch.randn(6, 8), labels)
    assert fake.shape == (6, channels, image_size, image_size) and fake.abs().max() <= 1 and D(fake, labels).ndim == 1
    blocks = image_size.bit_length() - 3  # 4x4 -> 32x32: 3 blocks up; D: 2 down at 32x32, then 2 without
    assert len(G.blocks) == blocks and len(D.blocks) == blocks + 1 and sum(not b.downsample for b in D.blocks) == 2
    assert len(G.z_chunks) == blocks + 1 and sum(G.z_chunks) == 8  # hierarchical z: a chunk per block + the linear
    assert (G.shared is not None, D.projection is not None) == (bool(num_classes), bool(num_classes))


def test_attention_sits_at_the_side_asked_and_starts_as_the_identity():
    G, D = models(attention=16)
    seen = {}
    for name, module in (("G", G.attention), ("D", D.attention)):
        module.register_forward_hook(lambda m, inputs, out, name=name: seen.__setitem__(name, (inputs[0], out)))
    D(G(torch.randn(2, 8), torch.arange(2)), torch.arange(2))
    assert [x.shape[-1] for x, _ in seen.values()] == [16, 16] and all(torch.equal(x, y) for x, y in seen.values())
    assert biggan.parse_args(["--attention", "32", "--image-size", "64"]).attention == 32  # up to half the side


def test_g_batchnorms_read_the_shared_class_embedding_and_their_own_chunk_of_z():
    G = models()[0].eval()
    z, labels = torch.randn(2, 8), torch.tensor([3, 3])
    base = G(z, labels)
    assert not torch.allclose(base, G(z, torch.tensor([4, 4])))
    for chunk in range(4):  # the linear layer's chunk and each block's
        assert not torch.allclose(base, G(z + (torch.arange(8) // 2 == chunk), labels)), chunk
    assert [b.bn1.gain.in_features for b in G.blocks] == [2 + 128] * 3  # its chunk + the shared embedding


def test_truncated_z_is_the_normal_inside_t_and_t_0_gives_one_image_per_class():
    z = biggan.sample_z(20000, 5, truncation=0.5, generator=torch.Generator().manual_seed(0))
    assert z.abs().max() <= 0.5
    normal = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1))
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    torch.testing.assert_close(torch.quantile(z.flatten(), quantiles),
                               torch.quantile(normal[normal.abs() <= 0.5][:100000], quantiles), atol=0.01, rtol=0)
    G, _ = models()
    images = biggan.generate_images(G, torch.tensor([0, 0, 5, 5]), 8, "cpu", seed=1, truncation=0)
    assert torch.equal(images[0], images[1]) and torch.equal(images[2], images[3])
    assert not torch.equal(images[0], images[2])


def test_spectral_norm_keeps_every_layers_largest_singular_value_near_1():
    G, D = models(width=8, attention=16)
    for _ in range(10):
        step(G, D, [batch(8)], lr=2e-4)
    layers = [m for m in [*G.modules(), *D.modules()] if hasattr(m, "parametrizations")]
    # G: linear, 3 blocks of 3 convs and 4 cBN maps, attention, output conv (not the shared embedding); D: 3 + 3 + 2
    # + 2 block convs, attention, linear, projection embedding
    assert len(layers) == (1 + 3 * 7 + 4 + 1) + (3 + 3 + 2 + 2 + 4 + 1 + 1)
    G.eval(), D.eval()
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2).item()
        assert abs(sigma - 1) < 0.05, layer


def test_orthogonal_penalty_matches_the_hand_computed_value_and_gradient_on_gs_raw_weights():
    holder = nn.Module()
    holder.w = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]]))
    holder.kernel = nn.Parameter(torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]]))  # rows [1, 0], [1, 1]: 2 * 1^2
    # W W^T = [[5, 11, 2], [11, 25, 4], [2, 4, 1]]: off the diagonal 2 * (11^2 + 2^2 + 4^2) = 282
    penalty = biggan.orthogonal_penalty(holder)
    assert penalty.item() == 282 + 2
    penalty.backward()
    off_diagonal = torch.tensor([[0.0, 11, 2], [11, 0, 4], [2, 4, 0]])
    torch.testing.assert_close(holder.w.grad, 4 * off_diagonal @ holder.w.detach())
    G, _ = models()
    biggan.orthogonal_penalty(G).backward()  # on the raw weights (before spectral norm), not the class embedding
    got = {name for name, p in G.named_parameters() if p.grad is not None}
    assert got and all(n.endswith("parametrizations.weight.original") for n in got) and "shared.weight" not in got


def test_ortho_beta_changes_only_gs_update():
    nets = [models() for _ in range(2)]
    for (G, D), beta in zip(nets, (0.0, 1.0)):
        torch.manual_seed(1)
        assert (step(G, D, [batch(4)], ortho_beta=beta)[4] > 0) == (beta > 0)  # the penalty column
    (G0, D0), (G1, D1) = nets
    assert all(torch.equal(a, b) for a, b in zip(D0.state_dict().values(), D1.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(G0.state_dict().values(), G1.state_dict().values()))


def test_d_steps_group_the_batches_one_d_update_each_then_one_g_update_on_every_image_augmented():
    assert list(biggan.step_groups(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    G, D = models()
    events, forward_sizes = [], []
    D.register_forward_hook(lambda module, inputs, out: forward_sizes.append(len(inputs[0])))

    def augment(images):  # a stand-in for data.Augmentation: records what D is shown and what ADA hears
        return events.append(f"augment {len(images)}") or images.flip(-1)
    augment.observe = lambda real_scores: events.append(f"observe {len(real_scores)}")

    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.0, 0.999)) for net in (G, D))
    for name, opt in (("G step", opt_g), ("D step", opt_d)):
        opt.register_step_post_hook(lambda *a, name=name: events.append(name))
    biggan.train_step(G, D, opt_g, opt_d, [batch(4)] * 3, 8, torch.amp.GradScaler("cpu", enabled=False),
                      augment=augment)
    # each D step sees its reals and fakes in one batch of 8, augmented; G's step scores the last 4 fakes again
    assert events == ["augment 8", "D step", "observe 4"] * 3 + ["augment 4", "G step"]
    assert forward_sizes == [8, 8, 8, 4]


def test_paper_preset_builds_the_authors_cifar_10_networks():
    args = biggan.parse_args(["--preset", "paper"])
    assert {k: v for k, v in vars(args).items() if k in biggan.PRESETS["paper"]} == dict(
        image_size=32, width=256, latent_dim=128, shared_dim=0, hier=False, attention=0, ortho_beta=0, batch_size=50,
        d_steps=4, average_decay=0.9999)  # launch_cifar_ema.sh; lr 2e-4 for G and D like the defaults
    assert args.lr == args.lr_g == 2e-4
    G = biggan.Generator(args.latent_dim, 32, 3, args.width, 10, args.shared_dim, args.hier, args.attention)
    D = biggan.Discriminator(32, 3, args.width, 10, args.attention)
    # G: linear 128 -> 4*4*256 (524,288 + 4,096); a block: two 3x3 convs 2 * (589,824 + 256), 1x1 shortcut
    # 65,536 + 256, two cBNs of gain and bias maps of the one-hot class 2 * 2 * 10 * 256; output BN 512, conv 6,915.
    block = 2 * (589_824 + 256) + 65_536 + 256 + 2 * 2 * 10 * 256
    assert sum(p.numel() for p in G.parameters()) == 524_288 + 4_096 + 3 * block + 512 + 6_915 == 4_304_387
    # D: block 1: convs 3 -> 256 and 256 -> 256, shortcut 3 -> 256; block 2 down with a 1x1 shortcut; blocks 3, 4
    # without downsampling: two convs, identity shortcut; linear 256 + 1; projection 10 x 256.
    conv = 589_824 + 256
    assert sum(p.numel() for p in D.parameters()) == (
        (7_168 + conv + 1_024) + (2 * conv + 65_792) + 2 * 2 * conv + 257 + 2_560) == 4_207_361  # BigGAN-PyTorch's
    assert G.shared is None and not G.hier and G.attention is None and D.attention is None


def test_conditional_run_grids_a_row_per_class_and_generate_writes_the_labels_asked(tiny_data_dir, tmp_path):
    assert run(biggan, tmp_path, tiny_data_dir, *TINY) == 0
    assert Image.open(tmp_path / "run" / "samples" / "epoch_001.png").size == (2 + 10 * 34, 2 + 10 * 34)  # MNIST's 10
    assert biggan.main(["--out", str(tmp_path / "run"), "--generate", "6"]) == 0
    samples = np.load(tmp_path / "run" / "samples.npz")
    assert samples["images"].shape == (6, 32, 32, 1) and list(samples["labels"]) == [0, 1, 2, 3, 4, 5]
    assert biggan.main(["--out", str(tmp_path / "run"), "--generate", "3", "--label", "2", "--truncation", "0"]) == 0
    samples = np.load(tmp_path / "run" / "samples.npz")
    assert (samples["labels"] == 2).all() and (samples["images"] == samples["images"][0]).all()
    assert biggan.main(["--out", str(tmp_path / "run"), "--generate", "3", "--label", "10"]) == 2  # 0..9


def test_a_folder_of_loose_images_trains_unconditional_and_refuses_label(tmp_path, capsys):
    (folder := tmp_path / "loose").mkdir()
    for i in range(16):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / f"{i}.png")
    assert biggan.main(["--dataset", str(folder), "--out", str(tmp_path / "run"), *TINY, "--batch-size", "8",
                        "--image-size", "32", "--d-steps", "2"]) == 0
    assert biggan.main(["--out", str(tmp_path / "run"), "--generate", "3"]) == 0
    assert set(np.load(tmp_path / "run" / "samples.npz")) == {"images"}
    assert biggan.main(["--out", str(tmp_path / "run"), "--generate", "3", "--label", "0"]) == 2
    assert "not conditional" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["--image-size 48", "--attention 12", "--attention 32", "--attention 4", "--label 3",
                                 "--d-steps 0", "--ortho-beta -1", "--truncation -0.5", "--lr-g nan"])
def test_every_bad_biggan_flag_is_one_line_and_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as stopped:
        biggan.parse_args(bad.split())
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and bad.split()[0] in err
