"""BEGAN (Berthelot et al. 2017, arXiv:1703.10717): D is an autoencoder; G and D balance its reconstruction losses.

    python began.py --dataset fashion-mnist                # 32x32 grids, GIF, metrics (k_t, M_global) in runs/began/
    python began.py --dataset fashion-mnist --gamma 0.7 --out runs/began-g07   # higher gamma: more varied samples
    python began.py --dataset faces/ --preset paper        # the paper's 64x64 networks and settings (for a GPU)
    python began.py --generate 5000                        # runs/began/samples.npz and samples.png from the checkpoint

D never says "real" or "fake": it reconstructs its input, and its per-pixel L1 reconstruction loss L(v) is the
score. D minimises L(x) - k_t L(G(z)), G minimises L(G(z)), and k_t in [0, 1] is steered so that
L(G(z)) = gamma L(x) holds on average. M_global = L(x) + |gamma L(x) - L(G(z))| tracks convergence.
"""
import argparse
import copy
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import data

# Copied from gan.SCRIPT
SCRIPT = os.path.basename(__file__)
BASE = 8  # the decoders start from an 8x8 map and the encoder stops at one, as in the paper


def conv_block(c_in, c_out, convs):
    """`convs` 3x3 convolutions, each followed by an ELU (the paper's unit, repeated twice per resolution there)."""
    layers = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, kernel_size=3, padding=1), nn.ELU()]
    return layers


class Decoder(nn.Module):
    """h (B, h_dim) -> image (B, C, S, S). G and D's decoder both have this shape, with weights of their own.

    A fully connected layer without a nonlinearity maps h to an 8x8 map; per resolution, `convs` 3x3 convolutions
    with ELU (the paper: two), then nearest-neighbour upsampling (no transposed convolutions); a last 3x3 convolution
    gives C channels.
    No BatchNorm anywhere: BEGAN's losses are per image, and the balance needs D to judge each image on its own."""

    def __init__(self, h_dim, image_size, channels, width, convs=2):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(h_dim, width * BASE * BASE)  # (B, w * 8 * 8) -> viewed as (B, w, 8, 8)
        layers = []
        for i in range(image_size.bit_length() - BASE.bit_length() + 1):  # 8x8, 16x16, 32x32 at 32x32
            if i:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))  # (B, w, 2s, 2s)
            layers += conv_block(width, width, convs)
        layers.append(nn.Conv2d(width, channels, kernel_size=3, padding=1))  # (B, C, S, S)
        self.net = nn.Sequential(*layers)

    def forward(self, h):
        return self.net(self.fc(h).view(len(h), self.width, BASE, BASE))


class Encoder(nn.Module):
    """image (B, C, S, S) -> h (B, h_dim): per resolution `convs` 3x3 convolutions with ELU, then a stride-2 3x3
    convolution that halves the size and adds `width` channels (w, 2w, 3w: the paper's linear growth), down to 8x8,
    then a fully connected layer without a nonlinearity."""

    def __init__(self, image_size, channels, width, h_dim, convs=2):
        super().__init__()
        blocks = image_size.bit_length() - BASE.bit_length() + 1  # 3 at 32x32
        layers = [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ELU()]  # (B, w, S, S)
        for i in range(blocks):
            layers += conv_block(width * (i + 1), width * (i + 1), convs)
            if i < blocks - 1:  # (B, 2w, 16, 16), (B, 3w, 8, 8) at 32x32
                layers += [nn.Conv2d(width * (i + 1), width * (i + 2), kernel_size=3, stride=2, padding=1), nn.ELU()]
        self.net = nn.Sequential(*layers, nn.Flatten())  # (B, 3w * 8 * 8)
        self.fc = nn.Linear(width * blocks * BASE * BASE, h_dim)

    def forward(self, images):
        return self.fc(self.net(images))


class Generator(nn.Module):
    """z ~ U[-1, 1]^latent_dim -> image in [-1, 1]: the decoder, with a tanh so samples live where real images do."""

    def __init__(self, latent_dim, image_size, channels, width, convs=2):
        super().__init__()
        self.decoder = Decoder(latent_dim, image_size, channels, width, convs)

    def forward(self, z):  # (B, latent_dim) -> (B, C, S, S)
        return torch.tanh(self.decoder(z))


class Discriminator(nn.Module):
    """An autoencoder: image -> its reconstruction, through a bottleneck of latent_dim numbers (the paper's Nh = Nz).
    Images it has learnt to reconstruct well count as real."""

    def __init__(self, image_size, channels, width, latent_dim, convs=2):
        super().__init__()
        self.encoder = Encoder(image_size, channels, width, latent_dim, convs)
        self.decoder = Decoder(latent_dim, image_size, channels, width, convs)

    def forward(self, images):  # (B, C, S, S) -> (B, C, S, S)
        return self.decoder(self.encoder(images))


def init_weights(model):
    """He (Kaiming) initialisation: gain sqrt(2) for a layer an ELU follows, 1 for the linear ones (the bottleneck's
    fully connected layers, the output convolution). PyTorch's default init shrinks the signal about threefold per
    layer; through BEGAN's dozen layers that leaves G's output nearly independent of z (std 0.03 across z) and D's
    code nearly independent of the image: G starts collapsed, and with k_0 = 0 nothing pulls it out."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.ELU))]
    for layer, after in zip(layers, layers[1:] + [None]):
        if not isinstance(layer, nn.ELU):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu" if isinstance(after, nn.ELU) else "linear")
            nn.init.zeros_(layer.bias)


def sample_z(n, latent_dim, device, generator=None):
    """The paper's uniform noise on [-1, 1]. With a seeded generator (grids, --generate) it is drawn on the CPU, so
    the same seed gives the same z on every device; in training, on the device from the global stream."""
    if generator is not None:
        return (torch.rand(n, latent_dim, generator=generator) * 2 - 1).to(device)
    return torch.rand(n, latent_dim, device=device) * 2 - 1


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: the reconstruction loss, the two objectives, the control of k_t, and the alternating update

def reconstruction_loss(D, images):
    """L(v) = mean |v - D(v)| over pixels and channels, one value per image (B,): D's "realness" score, low = real."""
    return (D(images).float() - images.float()).abs().flatten(1).mean(1)


def d_loss(l_real, l_fake, k):
    """D reconstructs reals well and pushes fakes away, the latter weighted by k_t."""
    return l_real - k * l_fake


def g_loss(l_fake):
    """G makes images D reconstructs well."""
    return l_fake


def update_k(k, l_real, l_fake, gamma, lambda_k):
    """Proportional control k_{t+1} = clip(k_t + lambda_k (gamma L(x) - L(G(z))), 0, 1). When the fakes are too easy
    for D (L(G(z)) < gamma L(x)), k grows and D spends more effort pushing them away, and vice versa. gamma, the
    diversity ratio E[L(G(z))] / E[L(x)], is the one knob: the paper finds lower gamma gives sharper, less varied
    samples. Note that any images D reconstructs gamma times as well as the reals sit at the set point, blank or
    blurry ones included: the control alone does not keep G from collapsing onto them."""
    return (k + lambda_k * (gamma * l_real - l_fake)).clamp(0.0, 1.0)


def convergence_measure(l_real, l_fake, gamma):
    """M_global = L(x) + |gamma L(x) - L(G(z))|: small when D reconstructs reals well and the balance holds. The
    paper shows it falling as the samples improve; it also falls whenever D's reconstructions improve, collapsed
    samples or not, so read it beside the grids."""
    return l_real + (gamma * l_real - l_fake).abs()


METRICS = ["d_loss", "g_loss", "l_real", "l_fake", "m_global", "k"]  # per-step columns of metrics.csv (k: last)


def train_step(G, D, opt_g, opt_d, real, k, latent_dim, gamma, lambda_k, scaler, augment=None):
    """One D update, one G update against the D just improved, then the k_t update from D's step's two losses.

    k: float32 scalar tensor on the device, updated in place (reading it would sync with the device each step).
    augment (--augment; None: off) is a data.Augmentation: every image the autoencoder D sees, real or fake, in both
    updates, goes through it with fresh random draws, and D reconstructs the augmented image. ADA's overfitting
    signal: a real image counts as "called real" when D reconstructs it better than the batch's fakes on average,
    sign(mean L(G(z)) - L(x)). The balance keeps L(G(z)) near gamma L(x) < L(x), so this stays negative until D
    reconstructs the training images better than its control asks for, i.e. memorises them."""
    shown = augment or (lambda images: images)  # what D is shown (and asked to reconstruct) of an image
    z = sample_z(len(real), latent_dim, real.device)
    with autocast(real.device, scaler):
        fake = G(z)
        # Discriminator: reals and fakes in one forward (no BatchNorm, so they do not mix); fake is detached so this
        # loss does not reach into G.
        l_real, l_fake = reconstruction_loss(D, torch.cat([shown(real), shown(fake.detach())])).split(len(real))
        if augment:
            augment.observe(l_fake.detach().mean() - l_real.detach())
        l_real, l_fake = l_real.mean(), l_fake.mean()
        loss_d = d_loss(l_real, l_fake, k)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    average_gradients(D)
    scaler.step(opt_d)

    # Generator: the same fakes through the updated D, whose weights are frozen meanwhile so the backward pass only
    # computes what G needs.
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        loss_g = g_loss(reconstruction_loss(D, shown(fake)).mean())
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)

    # k_t follows the balance measured where the paper measures it: both losses of D's step, at the same weights.
    l_real, l_fake = l_real.detach(), l_fake.detach()
    balance_terms = torch.stack([l_real, l_fake])
    if dist.is_initialized():  # every process must move k alike: the batch-wide losses, not its own share's
        dist.all_reduce(balance_terms)
        balance_terms /= dist.get_world_size()
    m_global = convergence_measure(*balance_terms, gamma)
    k.copy_(update_k(k, *balance_terms, gamma, lambda_k))
    # Returned as tensors on the device: reading them (.item()) would force a sync every step.
    return torch.stack([loss_d.detach().float(), loss_g.detach().float(), l_real, l_fake, m_global])


# Copied from gan.update_average
@torch.no_grad()
def update_average(G_average, G, step, decay):
    """Exponential moving average of G's weights, the decay ramped up over the first steps (why: gan.py)."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm running statistics
        average.copy_(current)


# ----------------------------------------------------------------------------------------------------------------
# Training, sampling and the command line

def train(args, rank=0, world_size=1):
    device = torch.device(args.device)
    checkpoint, dataset, held_out = start_run(args, rank)
    torch.manual_seed(args.seed)
    G, D = build_models(args, dataset.image_shape)  # the same initial weights in every process
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # speed only: cuDNN autotuning
    # NHWC, for speed only: tensor cores on CUDA; on a CPU, oneDNN's 3x3 convolutions over few channels gain ~20% too.
    G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G, D = G.to(device), D.to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what the grids, --generate and --fid sample from
    opt_g, opt_d = make_optimizers(args, G, D)
    k = torch.zeros((), device=device)  # k_0 = 0: D starts by only learning to reconstruct the reals
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}
    augmentation = data.make_augmentation(args.augment, args.augment_policy, dataset.image_shape[0], device,
                                          args.ada_target)
    if augmentation:  # ADA's p and its accumulators, restored by --resume
        parts["augment"] = augmentation
    start_epoch = data.resume(checkpoint, parts, device) if checkpoint else 0
    if checkpoint:
        k.fill_(checkpoint["k"])
    # --compile: the compiled modules share their parameters with G and D, which are what gets saved.
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    scaler.amp = args.amp

    history = data.read_metrics(os.path.join(args.out, "metrics.csv"), start_epoch) if rank == 0 else []
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    grid_noise = sample_z(100, args.latent_dim, device, torch.Generator().manual_seed(args.seed))
    real_sets = {"d_recon_real_train": batches.images,  # D's reconstruction loss on up to 1,000 of each
                 "d_recon_real_test": held_out.images.to(device) if held_out else None}
    if rank == 0:
        print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source}, {len(batches)} steps per "
              f"epoch, device {device}" + (f" x {world_size} processes" if world_size > 1 else "") +
              f", epochs {start_epoch + 1}..{args.epochs}, gamma {args.gamma}")

    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process draws its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(hash((args.seed, rank, epoch)))
        started, seen = time.time(), 0
        totals = torch.zeros(len(METRICS) - 1, device=device)
        for i, (real, _) in enumerate(batches.epoch(epoch), 1):
            seen += len(real)
            if world_size > 1:  # this process's share: disjoint slices of the same global batch
                real = real.tensor_split(world_size)[rank]
            real = real.contiguous(memory_format=torch.channels_last)
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, k, args.latent_dim, args.gamma, args.lambda_k,
                                 scaler, augmentation)
            update_average(G_average, G, (epoch - 1) * len(batches) + i, args.average_decay)
            if i % args.log_every == 0 or i == len(batches):
                means = torch.cat([totals / i, k.view(1)])  # the epoch's means so far, and k_t as it is now
                if world_size > 1:
                    dist.all_reduce(means)
                    means /= world_size
                means = means.tolist()  # the only sync with the device, every log_every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"loss became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch} step {i}")
                elapsed = time.time() - started
                steps_left = len(batches) - i + (args.epochs - epoch) * len(batches)
                if rank == 0:
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | d_loss {means[0]:.3f} "
                          f"g_loss {means[1]:.3f} | L(x) {means[2]:.3f} L(G(z)) {means[3]:.3f} | "
                          f"M {means[4]:.3f} k {means[5]:.4f} | {seen / elapsed:.0f} img/s | "
                          f"{steps_left * elapsed / i / 60:.1f} min left ",
                          end="\r" if sys.stdout.isatty() else "\n", flush=True)
        if world_size > 1 and not replicas_agree(G, D):
            raise FloatingPointError(f"the processes' weights differ at the end of epoch {epoch}")
        if rank > 0:
            continue
        if sys.stdout.isatty():
            print()
        seconds = time.time() - started
        recon = d_reconstruction(D, G, real_sets, args.latent_dim)
        print(f"epoch {epoch}: M_global {means[4]:.4f}, k_t {means[5]:.4f}; D's reconstruction loss L on "
              f"training images {recon['d_recon_real_train']}, held-out {recon['d_recon_real_test'] or '-'}, "
              f"fakes {recon['d_recon_fake']}")
        history.append({"epoch": epoch, **{name: f"{v:.5f}" for name, v in zip(METRICS, means)}, **recon,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}",
                        "augment_p": data.augment_p(augmentation)})
        with torch.no_grad():
            grid = G_average.eval()(grid_noise)
        # The curves: the losses (on the scale of L, a mean absolute pixel error in [0, 2]) and k_t in [0, 1].
        curves = ("d_loss", "g_loss", "m_global", "k") + (("augment_p",) if args.augment == "ada" else ())
        data.save_epoch(args.out, epoch, history, curves, grid, {
            "script": SCRIPT, **{key: part.state_dict() for key, part in parts.items()}, "k": means[5],
            "epoch": epoch, "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            **data.random_states(device)})

    if args.fid and rank == 0:
        data.report_fid(lambda: generate_images(G_average, args.fid, args.latent_dim, device, seed=args.seed + 1),
                        dataset, device)


@torch.no_grad()
def d_reconstruction(D, G, real_sets, latent_dim, n=1000):
    """BEGAN's D has no real/fake decision, so in place of an accuracy: its mean reconstruction loss L on up to n
    images of each real set and on n fresh fakes from the raw generator (not its average, which D never saw).
    A training loss that falls below the held-out one means D is memorising the training images, the same signal
    a train/held-out accuracy gap gives for other GANs.
    real_sets: name -> uint8 images on the device, or None where there is no such set."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    losses = {}
    for name, images in real_sets.items():
        if images is None:
            losses[name] = ""  # a folder has no held-out split
            continue
        per_image = [reconstruction_loss(D, data.to_float(chunk)) for chunk in images[:n].split(250)]
        losses[name] = f"{torch.cat(per_image).mean().item():.5f}"
    sizes = torch.arange(n).split(250)
    per_image = [reconstruction_loss(D, G(sample_z(len(chunk), latent_dim, device))) for chunk in sizes]
    losses["d_recon_fake"] = f"{torch.cat(per_image).mean().item():.5f}"
    D.train(), G.train()
    return losses


def build_models(args, image_shape):
    channels, image_size = image_shape[0], image_shape[-1]
    G = Generator(args.latent_dim, image_size, channels, args.width, args.convs)
    D = Discriminator(image_size, channels, args.width, args.latent_dim, args.convs)
    init_weights(G)
    init_weights(D)
    return G, D


# Copied from gan.make_optimizers
def make_optimizers(args, G, D):
    """Adam with beta1 = 0.5 (DCGAN's setting): the default 0.9 makes the two players' momentum overshoot."""
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    return opt_g, opt_d


@torch.no_grad()
def generate_images(G, n, latent_dim, device, seed, batch_size=500):
    """n images as uint8 [n, C, H, W], made in batches by G in eval mode."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    images = [data.to_uint8(G(sample_z(min(batch_size, n - i), latent_dim, device, noise))).cpu()
              for i in range(0, n, batch_size)]
    return torch.cat(images)


# Copied from gan.generate
def generate(args):
    checkpoint = load_checkpoint(args.out)
    saved = argparse.Namespace(**checkpoint["args"])
    G, _ = build_models(saved, checkpoint["image_shape"])
    data.restore(G, checkpoint["generator_average"], checkpoint, "generator")
    data.save_samples(args.out, generate_images(G.to(args.device), args.generate, saved.latent_dim, args.device,
                                                seed=args.seed))


def default_size(args):
    """32x32 for the 28x28 named datasets (a power of two keeps the up/down-sampling exact), 64 for a folder."""
    return 32 if args.dataset in data.DATASETS else 64


MODEL_SETTINGS = ("image_size", "width", "convs", "latent_dim")  # what the weights were made for
# What --resume keeps; the preset first, so that another preset is refused by name.
RESUME_SETTINGS = ("preset", *MODEL_SETTINGS, "batch_size", "lr", "seed", "average_decay", "gamma", "lambda_k",
                   "train_images", "augment", "augment_policy", "ada_target")  # what --resume keeps
GAMMA = (lambda value: 0 < value <= 1, "must be in (0, 1]")  # also refuses nan
SIDE = (lambda value: value >= 32 and not value & (value - 1), "must be a power of two, at least 32")

# --preset: "cpu" is the defaults below; "paper" the paper's model and settings (Berthelot et al. 2017; the authors
# released no code), for a GPU. "(recalled)": from memory of the paper, to check before quoting. Not reproduced:
# the halving of the learning rate whenever M_global stalls (§4.1).
PRESETS = {
    "cpu": {},
    "paper": {
        "image_size": 64,  # §4: most results at 64x64 (CelebA; 128x128 too), always down to an 8x8 map (§4.1)
        "width": 64,  # Figure 1's n filters, growing by n per halving (§3.5); n = 64 (recalled, not in the text)
        "convs": 2,  # §3.5: each 3x3 convolution + ELU repeated "typically 2" times per resolution
        "latent_dim": 64,  # §4.1: Nh = Nz = 64 in most experiments
        "batch_size": 16,  # §4.1 (recalled; also the batch of the best-known reimplementation, carpedm20's)
        "lr": 1e-4,  # §4.1: Adam, initial learning rate in [5e-5, 1e-4]
        "gamma": 0.5,  # §4: the middle of the gammas compared, 0.3 / 0.5 / 0.7 (recalled: check before quoting)
        "lambda_k": 0.001,  # §3.4: lambda_k = 0.001, k_0 = 0
    },
}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu: the defaults, for a CPU; paper: " +
                   " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["paper"].items()) +
                   " (the paper's model, for a GPU). Flags given as well win over the preset (default cpu)")
    p.add_argument("--epochs", type=int, default=5, help="total passes over the training set (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, over all processes (default 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of G and D (default 2e-4; the paper "
                                                          "used 1e-4 for far longer runs)")
    p.add_argument("--latent-dim", type=int, default=64, help="size of z and of D's bottleneck h (default 64)")
    p.add_argument("--image-size", type=int, help="side of the square images, a power of two >= 32 "
                                                  "(default 32 for mnist/fashion-mnist, 64 for a folder)")
    p.add_argument("--width", type=int, default=16, help="channels of every decoder layer and of the encoder's first; "
                                                         "the encoder adds as many per halving (default 16, for a "
                                                         "CPU; the paper used 64-128)")
    p.add_argument("--convs", type=int, default=1, help="3x3 convolutions per resolution in G and in each half of D "
                                                        "(default 1, for a CPU; the paper used 2)")
    p.add_argument("--gamma", type=float, default=0.5, help="diversity ratio L(G(z)) / L(x) that k_t steers to; "
                                                            "the paper: lower is sharper, less varied (default 0.5)")
    p.add_argument("--lambda-k", type=float, default=0.001, help="gain of the k_t control (default 0.001)")
    p.add_argument("--average-decay", type=float, default=0.999,
                   help="decay of the moving average of G's weights that samples are drawn from (default 0.999)")
    add_augment_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "began"), help="the run's folder (default runs/began)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--fid", type=int, metavar="N", help="after training, FID of N generated vs the real images")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision: float16 + loss scaling on CUDA, bfloat16 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.set_defaults(sync_bn=False)  # no BatchNorm anywhere, so no --sync-bn (check_args reads it)
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])
    args = p.parse_args(argv)
    check_args(args, {"epochs": at_least(1), "batch_size": at_least(1), "latent_dim": at_least(1),
                      "width": at_least(1), "convs": at_least(1), "log_every": at_least(1), "generate": at_least(1),
                      "fid": at_least(2), "seed": SEED, "lr": POSITIVE, "gamma": GAMMA, "lambda_k": NON_NEGATIVE,
                      "average_decay": DECAY, "image_size": SIDE,
                      "train_images": at_least(1), "ada_target": OPEN_UNIT})
    return args


# ================================================================================================================
# Run machinery: checked copies of gan.py's originals, where it is explained; test_gans.py fails when one drifts.

# Copied from gan.UsageError
class UsageError(Exception):
    """Bad flags, an unusable checkpoint: reported as one line, exit status 2."""


# Copied from gan.ArgumentParser
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


# Copied from gan.at_least
def at_least(least):
    return lambda value: value >= least, f"must be at least {least}"


# Copied from gan.POSITIVE
POSITIVE = (lambda value: math.isfinite(value) and value > 0, "must be a positive number")
# Copied from gan.NON_NEGATIVE
NON_NEGATIVE = (lambda value: math.isfinite(value) and value >= 0, "must be a number >= 0")  # penalty weights (conv scripts)
# Copied from gan.DECAY
DECAY = (lambda value: 0 <= value < 1, "must be in [0, 1)")
# Copied from gan.SEED
SEED = (lambda value: 0 <= value < 2 ** 32, f"must be in 0..{2 ** 32 - 1}")
# Copied from gan.OPEN_UNIT
OPEN_UNIT = (lambda value: 0 < value < 1, "must be in (0, 1)")  # --ada-target


# Copied from gan.augment_policy
def augment_policy(text):
    """--augment-policy: a comma list of data.AUGMENTATIONS' names, in the order they are applied."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in data.AUGMENTATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown augmentation '{unknown[0]}': use a comma list of "
                                         + ", ".join(data.AUGMENTATIONS))
    return names


# Copied from gan.add_augment_args
def add_augment_args(p):
    """The small-data flags of every script: --train-images and --augment's three (data.py's augment does the work:
    each operation applied to every image D sees, real or fake, in D's step and in G's, differentiably)."""
    p.add_argument("--train-images", type=int, metavar="N", help=(
        "train on the first N training images only (all of them if N is larger); the held-out split is unchanged"))
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help=(
        "augment every image D sees (default none). diffaug: always (Zhao et al. 2020); ada: each operation with "
        "a probability p, raised while E[sign(D(x_train))] is above --ada-target, lowered while below (Karras et "
        "al. 2020). Turn it on for a few thousand images or fewer"))
    p.add_argument("--augment-policy", type=augment_policy, metavar="LIST", help=(
        "comma list of color, translation, cutout (default all three for colour images, translation,cutout for "
        "grayscale; color on grayscale is brightness and contrast)"))
    p.add_argument("--ada-target", type=float, default=0.6, help="ADA's target for E[sign(D(x_train))], in (0, 1) "
                                                                 "(default 0.6, the paper's)")


# Copied from gan.check_args
def check_args(args, rules):
    """Before anything is loaded: every number flag against its rule (flag -> (test, what it must be); an unset flag
    passes), then the device, and --sync-bn only where it works. One line naming the flag."""
    for name, (test, must) in rules.items():
        value = getattr(args, name)
        if value is not None and not test(value):
            raise UsageError(f"--{name.replace('_', '-')} {value}: {must}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this torch {torch.__version__} sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    if args.sync_bn and (device.type != "cuda" or int(os.environ.get("WORLD_SIZE", 1)) == 1):
        raise UsageError("--sync-bn: needs CUDA and torchrun (PyTorch's SyncBatchNorm has no CPU version)")


# Copied from gan.setup_distributed
def setup_distributed(args):
    """Under torchrun (which sets WORLD_SIZE, RANK and LOCAL_RANK): join the process group, NCCL on CUDA with one GPU
    per process, gloo on the CPU. Returns (rank, world_size); (0, 1) without torchrun, where nothing changes."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} does not split evenly over {world_size} processes")
    if args.device.startswith("cuda"):
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"process {local_rank} has no GPU: {torch.cuda.device_count()} visible")
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world_size


# Copied from gan.average_gradients
def average_gradients(model):
    """Under torchrun: replace every gradient by its mean over the processes, in one flat all-reduce."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(mean.view_as(grad))


# Copied from gan.replicas_agree
def replicas_agree(*models):
    """True when every process holds the same weights: a float64 checksum per process, compared in one all-reduce."""
    checksum = sum(p.detach().double().sum() for model in models for p in model.parameters())
    extremes = torch.stack([checksum, -checksum])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return bool(extremes[0] == -extremes[1])  # max == min


# Copied from gan.autocast
def autocast(device, scaler):
    """Mixed precision when --amp is on: float16 with loss scaling on CUDA, bfloat16 (no scaling needed) on CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=scaler.amp)


# Copied from gan.start_run
def start_run(args, rank):
    """The checkpoint to resume (its settings applied to args), the output folder checked, then the training data
    and the held-out split (None for a folder of images)."""
    checkpoint = load_checkpoint(args.out) if args.resume else None
    if checkpoint:
        resume_settings(args, checkpoint)
    args.image_size = args.image_size or default_size(args)
    if rank == 0:
        data.prepare_out(args.out)
    dataset = data.load_data(args.dataset, args.data_dir, args.image_size, rank)
    if args.train_images:  # a small-data run: the first N images (their order is the file's, fixed)
        dataset.images, dataset.labels = dataset.images[:args.train_images], dataset.labels[:args.train_images]
    held_out = (data.load_data(args.dataset, args.data_dir, args.image_size, rank, split="test")
                if args.dataset in data.DATASETS else None)
    return checkpoint, dataset, held_out


# Copied from gan.load_checkpoint
def load_checkpoint(out):
    """OUT/checkpoint.pt, refused (one line naming both scripts) unless its "script" field names this script."""
    checkpoint = data.read_checkpoint(out)
    written_by = checkpoint.get("script")
    if written_by != SCRIPT:
        saved = checkpoint["args"]
        settings = " ".join(f"--{k.replace('_', '-')} {saved[k]}"
                            for k in ("image_size", "width", "latent_dim", "conditional", "loss") if k in saved)
        raise UsageError(f"{checkpoint['path']} was written by {written_by or 'an unknown script (no script field)'}"
                         f" with {settings}; this is {SCRIPT}")
    return checkpoint


# Copied from gan.resume_settings
def resume_settings(args, checkpoint):
    """The run's own settings win over the defaults; a flag given with another value is refused, not ignored."""
    defaults = vars(parse_args([]))
    for key in RESUME_SETTINGS:
        saved = checkpoint["args"].get(key, defaults[key])
        if getattr(args, key) not in (saved, defaults[key]):
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)}: {checkpoint['path']} was written "
                             f"with --{key.replace('_', '-')} {saved}, which --resume keeps")
        setattr(args, key, saved)
    if args.epochs <= checkpoint["epoch"]:
        raise UsageError(f"--epochs {args.epochs}: {checkpoint['path']} is already at epoch {checkpoint['epoch']}; "
                         f"--epochs counts the total")


# Copied from gan.Stopped
class Stopped(KeyboardInterrupt):
    """SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143 (128 + 15)."""


# Copied from gan.stop
def stop(signum, frame):
    raise Stopped


# Copied from gan.main
def main(argv=None):
    rank = int(os.environ.get("RANK", 0))  # under torchrun only rank 0 reports, so one error is one line
    args, status, message = None, 0, None
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        args = parse_args(argv)
        if args.generate is None:
            train(args, *setup_distributed(args))
        elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise UsageError("--generate runs in one process: start it with python, not torchrun")
        else:
            generate(args)
    except (data.DataError, UsageError) as e:
        status, message = 2, f"{SCRIPT}: error: {e}"
    except FloatingPointError as e:
        status, message = 1, f"\n{SCRIPT}: training diverged: {e}; the last good checkpoint is kept in {args.out}"
    except torch.cuda.OutOfMemoryError:
        status, message = 2, (f"{SCRIPT}: error: out of GPU memory on {args.device}: lower --batch-size"
                              + (" or --width" if hasattr(args, "width") else ""))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM by way of stop(), at any moment, start-up included
        status, what = (143, "stopped by SIGTERM") if isinstance(e, Stopped) else (130, "interrupted")
        message = f"\n{what}"
        if args is not None and args.generate is None:  # training, or starting to
            message += (f": {args.out}/checkpoint.pt holds the last finished epoch; --resume continues"
                        if os.path.isfile(os.path.join(args.out, "checkpoint.pt")) else ": no epoch was finished")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()
    if message and rank == 0:
        print(message, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
