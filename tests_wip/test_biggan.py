from common import *

from PIL import Image

import biggan

TINY = ["--width", "4", "--latent-dim", "8", "--epochs", "1"]


def models(image_size=32, channels=1, num_classes=10, width=4, latent_dim=8, **options):
    torch.manual_seed(0)
    return (biggan.Generator(latent_dim, image_size, channels, width, num_classes, **options),
            biggan.Discriminator(image_size, channels, width, num_classes, options.get("attention", 0)))


def step(G, D, group, events=(), lr=1e-3, **options):  # events: a list that hears each optimizer step
    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, 0.999)) for net in (G, D))
    for name, opt in (("G step", opt_g), ("D step", opt_d)) if events != () else ():
        opt.register_step_post_hook(lambda *a, name=name: events.append(name))
    return biggan.train_step(G, D, opt_g, opt_d, group, 8, torch.amp.GradScaler("cpu", enabled=False), **options)


BATCH = torch.rand(4, 1, 32, 32) * 2 - 1, torch.arange(4)  # (reals, labels)


@pytest.mark.parametrize("image_size, channels, num_classes", [(32, 1, 10), (64, 3, 0)])
def test_shapes_one_block_per_doubling_attention_where_asked_as_the_identity(image_size, channels, num_classes):
    G, D = models(image_size, channels, num_classes, attention=16)
    seen = {}
    for name, module in (("G", G.attention), ("D", D.attention)):
        module.register_forward_hook(lambda m, inputs, out, name=name: seen.__setitem__(name, (inputs[0], out)))
    labels = torch.arange(6) % max(num_classes, 1)
    fake = G(torch.randn(6, 8), labels)
    assert fake.shape == (6, channels, image_size, image_size) and fake.abs().max() <= 1 and D(fake, labels).ndim == 1
    assert [x.shape[-1] for x, _ in seen.values()] == [16, 16] and all(torch.equal(x, y) for x, y in seen.values())
    size = ["--image-size", str(image_size)]  # --attention: a power of two from 8 to half the image size
    assert biggan.parse_args(["--attention", str(image_size // 2), *size]).attention == image_size // 2
    for bad in (4, 12, image_size):
        with pytest.raises(SystemExit):
            biggan.parse_args(["--attention", str(bad), *size])
    blocks = image_size.bit_length() - 3  # 4x4 -> 32x32: 3 blocks up; D: 2 down at 32x32, then 2 without
    assert len(G.blocks) == blocks and len(D.blocks) == blocks + 1 and sum(not b.downsample for b in D.blocks) == 2
    assert len(G.z_chunks) == blocks + 1 and sum(G.z_chunks) == 8  # hierarchical z: a chunk per block + the linear
    assert (G.shared is not None, D.projection is not None) == (bool(num_classes), bool(num_classes))


def test_g_batchnorms_read_the_shared_class_embedding_and_their_own_chunk_of_z():
    G = models()[0].eval()
    z, labels = torch.randn(2, 8), torch.tensor([3, 3])
    base = G(z, labels)
    assert not torch.allclose(base, G(z, torch.tensor([4, 4])))
    for chunk in range(4):  # the linear layer's chunk and each block's
        assert not torch.allclose(base, G(z + (torch.arange(8) // 2 == chunk), labels)), chunk
    assert [b.bn1.gain.in_features for b in G.blocks] == [2 + 128] * 3  # its chunk + the shared embedding


def test_truncated_z_is_the_normal_inside_t_and_t_0_gives_one_image_per_class():
    z = biggan.sample_z(20000, 5, truncation=0.5, generator=torch.Generator().manual_seed(0)).flatten()
    normal = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1))
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    assert z.abs().max() <= 0.5
    torch.testing.assert_close(z.quantile(q), normal[normal.abs() <= 0.5][:100000].quantile(q), atol=0.01, rtol=0)
    images = biggan.generate_images(models()[0], torch.tensor([0, 0, 5, 5]), 8, "cpu", seed=1, truncation=0)
    assert torch.equal(images[0], images[1]) and torch.equal(images[2], images[3]) and not torch.equal(*images[1:3])


def test_spectral_norm_keeps_every_layers_largest_singular_value_near_1():
    G, D = models(width=8, attention=16)
    for _ in range(10):
        step(G, D, [BATCH], lr=2e-4)
    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)
    G.eval(), D.eval()
    for layer in [m for m in [*G.modules(), *D.modules()] if isinstance(m, kinds) and m is not G.shared]:
        assert abs(torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2) - 1) < 0.05, layer


def test_orthogonal_penalty_is_the_hand_computed_one_on_gs_raw_weights_and_moves_only_g():
    w, kernel = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]]), torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    holder = torch.nn.ParameterList([w, kernel])  # the kernel's rows [1, 0], [1, 1]: 2 * 1^2
    # W W^T = [[5, 11, 2], [11, 25, 4], [2, 4, 1]]: off the diagonal 2 * (11^2 + 2^2 + 4^2) = 282
    (penalty := biggan.orthogonal_penalty(holder)).backward()
    assert penalty.item() == 282 + 2
    torch.testing.assert_close(holder[0].grad, 4 * torch.tensor([[0.0, 11, 2], [11, 0, 4], [2, 4, 0]]) @ w)
    G, _ = models()
    biggan.orthogonal_penalty(G).backward()  # on the raw weights (before spectral norm), not the class embedding
    got = {name for name, p in G.named_parameters() if p.grad is not None}
    assert got and all(n.endswith("parametrizations.weight.original") for n in got) and "shared.weight" not in got
    (G0, D0), (G1, D1) = models(), models()
    for G, D, beta in ((G0, D0, 0.0), (G1, D1, 1.0)):
        torch.manual_seed(1)
        assert (step(G, D, [BATCH], ortho_beta=beta)[4] > 0) == (beta > 0)  # the penalty column
    vectors = [torch.nn.utils.parameters_to_vector(net.parameters()) for net in (D0, D1, G0, G1)]
    assert torch.equal(*vectors[:2]) and not torch.equal(*vectors[2:])  # D's update the same, G's not


def test_d_steps_group_the_batches_one_d_update_each_then_one_g_update_on_every_image_augmented():
    assert list(biggan.step_groups(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    (G, D), events = models(), []
    D.register_forward_hook(lambda module, inputs, out: events.append(f"D {len(inputs[0])}"))

    def augment(images):  # a stand-in for data.Augmentation: records what D is shown and what ADA hears
        return events.append(f"augment {len(images)}") or images.flip(-1)
    augment.observe = lambda real_scores: events.append(f"observe {len(real_scores)}")
    step(G, D, [BATCH] * 3, events, augment=augment)
    # each D step sees its reals and fakes in one batch of 8, augmented; G's step scores the last 4 fakes again
    assert events == ["augment 8", "D 8", "D step", "observe 4"] * 3 + ["augment 4", "D 4", "G step"]


def test_paper_preset_builds_the_authors_cifar_10_networks():
    args = biggan.parse_args(["--preset", "paper"])  # launch_cifar_ema.sh; lr 2e-4 for G and D like the defaults
    assert vars(args).items() >= dict(image_size=32, width=256, latent_dim=128, shared_dim=0, hier=False, attention=0,
                                      ortho_beta=0, batch_size=50, d_steps=4, average_decay=0.9999, lr=2e-4).items()
    G = biggan.Generator(args.latent_dim, 32, 3, args.width, 10, args.shared_dim, args.hier, args.attention)
    D = biggan.Discriminator(32, 3, args.width, 10, args.attention)
    # BigGAN-PyTorch's counts for the model of launch_cifar_ema.sh
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (4_304_387, 4_207_361)
    assert G.shared is None and not G.hier and G.attention is None and D.attention is None and args.lr_g == 2e-4


def test_label_is_one_of_the_models_classes_and_a_folder_of_loose_images_has_none(tiny_data_dir, tmp_path, capsys):
    assert run(biggan, tmp_path, tiny_data_dir, *TINY) == 0
    assert biggan.main(["--out", str(tmp_path / "run"), "--generate", "3", "--label", "10"]) == 2  # MNIST's 0..9
    (folder := tmp_path / "images").mkdir()
    for i in range(32):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / f"{i}.png")
    assert run(biggan, tmp_path, tiny_data_dir, "--dataset", str(folder), *TINY, "--d-steps", "2", out="loose") == 0
    assert biggan.main(["--out", str(tmp_path / "loose"), "--generate", "3"]) == 0
    assert set(np.load(tmp_path / "loose" / "samples.npz")) == {"images"}
    assert biggan.main(["--out", str(tmp_path / "loose"), "--generate", "3", "--label", "0"]) == 2
    assert "not conditional" in capsys.readouterr().err
