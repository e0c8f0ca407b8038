"""LAPGAN (Denton et al. 2015, arXiv:1506.05751): one GAN per level of a Laplacian pyramid, sampled coarse to fine.

    python lapgan.py --dataset fashion-mnist                      # 32x32 (levels 8, 16, 32): grids, GIF, metrics
    python lapgan.py --dataset fashion-mnist --conditional --out runs/lapgan-cond   # class-conditional 8x8 level
    python lapgan.py --dataset faces/ --out runs/faces            # a folder of images, 64x64 (levels 8..64)
    python lapgan.py --out runs/lapgan --generate 5000            # the whole cascade into samples.npz/.png

An image is split into a Laplacian pyramid: its 8x8 Gaussian-blurred version, plus at every finer level the residual
the blurred upsampling of the coarser level misses (edges, texture). The coarsest level is a small DCGAN; each finer
level's G takes the upsampled coarser image and a noise plane and draws the residual, and its D judges (upsampled
coarse image, residual) pairs. Every level trains on the real pyramid, independently of the others. To sample, the
cascade runs coarse to fine: 8x8 from z, upsample, add the 16x16 G's residual, upsample, add the 32x32 G's residual.

The pyramid of one image, as drawn in the README (assets/lapgan_pyramid.png):
    python -c "import lapgan; lapgan.save_pyramid_picture('fashion-mnist', 'assets/lapgan_pyramid.png')"
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
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data

# Copied from gan.SCRIPT
SCRIPT = os.path.basename(__file__)
COARSEST = 8  # side of the pyramid's top level, generated from z alone


# ----------------------------------------------------------------------------------------------------------------
# The Laplacian pyramid (Burt & Adelson 1983)

def binomial_blur(images, gain=1.0):
    """Blur with the 5x5 binomial kernel [1 4 6 4 1]^2 / 256 (Burt & Adelson's Gaussian), edges mirrored.
    Its weights are positive and sum to 1, so a blurred image in [-1, 1] stays in [-1, 1]."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=images.device, dtype=images.dtype) / 16
    channels = images.shape[1]
    kernel = (torch.outer(taps, taps) * gain).expand(channels, 1, 5, 5)
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="reflect"), kernel, groups=channels)


def downsample(images):  # (B, C, S, S) -> (B, C, S/2, S/2)
    """Blur, then keep every second pixel: the blur removes what half the pixels could not represent."""
    return binomial_blur(images)[..., ::2, ::2]


def upsample(images):  # (B, C, S, S) -> (B, C, 2S, 2S)
    """Spread the pixels out with zeros between them and blur with 4x the kernel (every output pixel gets weights
    summing to 1): a smooth interpolation. Mirroring keeps the zeros in step at the border, so there too."""
    b, c, h, w = images.shape
    spread = images.new_zeros(b, c, 2 * h, 2 * w)
    spread[..., ::2, ::2] = images
    return binomial_blur(spread, gain=4.0)


def laplacian_pyramid(images, levels):
    """images (B, C, S, S) -> (bands, lows), both ordered coarse to fine.

    bands[0]: the image blurred and halved levels - 1 times (S / 2^(levels-1) pixels wide); bands[k] for k >= 1: the
    residual at the k-th finer level, what upsample() of the coarser Gaussian level misses. lows[k - 1]: that
    upsampled coarser level, the condition the level-k GAN sees. reconstruct(bands) gives the images back."""
    gaussian = [images]
    for _ in range(levels - 1):
        gaussian.insert(0, downsample(gaussian[0]))
    lows = [upsample(coarse) for coarse in gaussian[:-1]]
    return [gaussian[0]] + [fine - low for fine, low in zip(gaussian[1:], lows)], lows


def reconstruct(bands):
    """The inverse of laplacian_pyramid: upsample and add each residual back, coarse to fine."""
    image = bands[0]
    for residual in bands[1:]:
        image = upsample(image) + residual
    return image


def pyramid_levels(image_size):
    """Levels of an image_size pyramid with an 8x8 top: 3 at 32 (8, 16, 32), 4 at 64."""
    return int(math.log2(image_size // COARSEST)) + 1


# ----------------------------------------------------------------------------------------------------------------
# One generator and one discriminator per level

class CoarseGenerator(nn.Module):
    """z (and a class) -> the 8x8 top of the pyramid in [-1, 1]: a small DCGAN generator."""

    def __init__(self, latent_dim, channels, width, num_classes=0, label_dim=16):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, label_dim) if num_classes else None
        in_dim = latent_dim + (label_dim if num_classes else 0)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(in_dim, 4 * width, kernel_size=4, stride=1, padding=0, bias=False),  # (B, 4w, 4, 4)
            nn.BatchNorm2d(4 * width, momentum=0.1), nn.ReLU(),
            nn.ConvTranspose2d(4 * width, 2 * width, kernel_size=4, stride=2, padding=1, bias=False),  # (B, 2w, 8, 8)
            nn.BatchNorm2d(2 * width, momentum=0.1), nn.ReLU(),
            nn.Conv2d(2 * width, channels, kernel_size=3, padding=1), nn.Tanh())  # (B, C, 8, 8)

    def forward(self, z, labels=None):  # (B, latent_dim), (B,) -> (B, C, 8, 8)
        if self.label_embedding is not None:
            z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.net(z[:, :, None, None])


class ResidualGenerator(nn.Module):
    """(upsampled coarser image, noise plane) -> the residual at this level, as in the paper: the noise enters as one
    more input channel, and the output is linear, since a residual is a signed correction around 0, not an image.

    The condition was upsampled from half this resolution, so all it says is there at half resolution: G works
    there (one stride-2 convolution in, two 3x3 convolutions with a wide view of the coarse shape) and steps up
    once at the end. Its last layer starts near 0, so a new G begins by adding almost nothing to the blurry
    upsampling, which is already a plausible image."""

    def __init__(self, channels, width):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, 2 * width, kernel_size=4, stride=2, padding=1, bias=False),  # (B, 2w, S/2, S/2)
            nn.BatchNorm2d(2 * width, momentum=0.1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, kernel_size=3, padding=1, bias=False),  # (B, 2w, S/2, S/2)
            nn.BatchNorm2d(2 * width, momentum=0.1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, kernel_size=3, padding=1, bias=False),  # (B, 2w, S/2, S/2)
            nn.BatchNorm2d(2 * width, momentum=0.1), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, channels, kernel_size=4, stride=2, padding=1))  # (B, C, S, S)

    def forward(self, low, noise=None):  # (B, C, S, S), (B, 1, S, S) -> (B, C, S, S)
        if noise is None:
            noise = torch.randn_like(low[:, :1])
        return self.net(torch.cat([low, noise], dim=1))


class Generator(nn.Module):
    """All levels' generators. forward() trains them, each on its own level of the real pyramid; sample() runs the
    cascade coarse to fine and returns every level's image, so the grids can show the refinement."""

    def __init__(self, latent_dim, image_size, channels, width, num_classes=0):
        super().__init__()
        self.coarse = CoarseGenerator(latent_dim, channels, width, num_classes)
        self.refiners = nn.ModuleList(ResidualGenerator(channels, width)
                                      for _ in range(pyramid_levels(image_size) - 1))  # 16x16, 32x32, ...

    @property
    def conditional(self):
        return self.coarse.label_embedding is not None

    def forward(self, z, labels, lows):
        """Training: [8x8 image from z, residual given lows[0], residual given lows[1], ...], one per level."""
        return [self.coarse(z, labels)] + [refine(low) for refine, low in zip(self.refiners, lows)]

    def sample(self, z, labels=None, noises=None):
        """The cascade: [8x8 image, 16x16 image, ...] coarse to fine, each the upsampled previous one plus its
        residual. noises: one (B, 1, S, S) plane per finer level, or None for fresh noise. A level of a real
        Gaussian pyramid never leaves [-1, 1], so neither may a generated one before it is refined further."""
        images = [self.coarse(z, labels)]
        for k, refine in enumerate(self.refiners):
            low = upsample(images[-1])
            images.append((low + refine(low, None if noises is None else noises[k])).clamp(-1, 1))
        return images


class CoarseDiscriminator(nn.Module):
    """8x8 image (and a class) -> one logit. Conditional: the projection term of dcgan.py (Miyato & Koyama 2018)."""

    def __init__(self, channels, width, num_classes=0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 2 * width, kernel_size=3, padding=1), nn.LeakyReLU(0.2),  # (B, 2w, 8, 8), no BN
            nn.Conv2d(2 * width, 4 * width, kernel_size=4, stride=2, padding=1, bias=False),  # (B, 4w, 4, 4)
            nn.BatchNorm2d(4 * width, momentum=0.1), nn.LeakyReLU(0.2), nn.Flatten())  # (B, 4w * 16)
        self.logit = nn.Linear(4 * width * 16, 1)
        self.projection = nn.Embedding(num_classes, 4 * width * 16) if num_classes else None
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, mean=0.0, std=0.02)

    def forward(self, images, labels=None):  # (B, C, 8, 8), (B,) -> (B,)
        h = self.features(images)
        logits = self.logit(h).squeeze(1)
        if self.projection is not None:
            logits = logits + (self.projection(labels) * h).sum(dim=1)
        return logits


class ResidualDiscriminator(nn.Module):
    """(upsampled coarser image, residual) -> one logit: is this the residual a real image has on top of this
    coarse image? Both enter as channels side by side (the first convolution can form their sum, the sharp image,
    or weigh them apart); then stride-2 convolutions down to 4x4, as dcgan.py's D."""

    def __init__(self, image_size, channels, width):
        super().__init__()
        width_at = [width * 2 ** i for i in range(int(math.log2(image_size)) - 2)]  # S/2, ..., 4: w, 2w, ...
        layers = [nn.Conv2d(2 * channels, width_at[0], kernel_size=4, stride=2, padding=1),  # (B, w, S/2, S/2)
                  nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, S/4, S/4), ... down to 4x4
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out, momentum=0.1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.logit = nn.Linear(width_at[-1] * 16, 1)

    def forward(self, low, residual):  # (B, C, S, S), (B, C, S, S) -> (B,)
        return self.logit(self.features(torch.cat([low, residual], dim=1))).squeeze(1)


class Discriminator(nn.Module):
    """All levels' discriminators: forward(bands, labels, lows) -> one logit vector per level, coarse to fine."""

    def __init__(self, image_size, channels, width, num_classes=0):
        super().__init__()
        self.coarse = CoarseDiscriminator(channels, width, num_classes)
        self.refiners = nn.ModuleList(ResidualDiscriminator(COARSEST * 2 ** k, channels, width)
                                      for k in range(1, pyramid_levels(image_size)))

    def forward(self, bands, labels, lows):
        return [self.coarse(bands[0], labels)] + [judge(low, residual) for judge, low, residual
                                                  in zip(self.refiners, lows, bands[1:])]


def init_weights(module):
    """DCGAN init: every conv weight from N(0, 0.02); BatchNorm scale from N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, mean=1.0, std=0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: two losses and the alternating update, at every level at once

def d_loss(real_logits, fake_logits):
    """Binary cross-entropy: real bands are labelled 1, generated ones 0 (in float32, also under --amp)."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits):
    """Non-saturating loss -log D(G(z)): strong gradients early on, when D rejects the samples with confidence."""
    fake_logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def metric_names(sizes):
    """metrics.csv's per-step columns: the losses summed over the levels, then each level's losses and D's mean
    probability on real and generated bands (d_real_8, d_fake_8, ...)."""
    return ["d_loss", "g_loss"] + [f"{name}_{size}" for size in sizes
                                   for name in ("d_loss", "g_loss", "d_real", "d_fake")]


def shown_levels(augment, bands, lows):
    """What each level's D is shown with --augment: the coarsest image augmented by the whole policy; at a finer
    level the pair (coarse image upsampled, residual) augmented as one stacked image by the policy's spatial
    operations, so that the two stay aligned pixel for pixel (colour is left out there: a residual's brightness or
    contrast is not the image's). Every call draws afresh. augment None: the bands and lows as they are."""
    if augment is None:
        return bands, lows
    spatial = tuple(name for name in augment.policy if name != "color")
    shown_bands, shown_lows = [augment(bands[0])], []
    for low, band in zip(lows, bands[1:]):
        pair = torch.cat([low, band], dim=1)  # (B, 2C, S, S)
        pair = augment(pair, spatial) if spatial else pair
        shown_lows.append(pair[:, :low.shape[1]])
        shown_bands.append(pair[:, low.shape[1]:])
    return shown_bands, shown_lows


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler, augment=None):
    """One D update, then one G update, at every level. Each level's pair sees only its own band of the real
    pyramid (the 8x8 image, or a residual with the real coarse image it belongs to), never another level's output,
    so the levels train independently, as in the paper. They share no weights either, so one backward pass of the
    summed losses gives each level exactly its own gradients. labels is None for unconditional models.
    augment (--augment; None: off): every band D sees, real or fake, in both updates, goes through shown_levels,
    with fresh random draws each time; ADA's p moves by what every level's D said of the reals."""
    with torch.no_grad():  # in float32 even under --amp: a residual is a small difference of two images
        bands, lows = laplacian_pyramid(real, len(G.refiners) + 1)
    z = torch.randn(len(real), latent_dim, device=real.device)
    with autocast(real.device, scaler):
        fakes = G(z, labels, lows)
        # Discriminators: the fakes are detached so these losses do not reach into G.
        real_bands, real_lows = shown_levels(augment, bands, lows)
        real_logits = D(real_bands, labels, real_lows)
        fake_bands, fake_lows = shown_levels(augment, [fake.detach() for fake in fakes], lows)
        fake_logits = D(fake_bands, labels, fake_lows)
        losses_d = torch.stack([d_loss(r, f) for r, f in zip(real_logits, fake_logits)])
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(losses_d.sum()).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:
        augment.observe(torch.cat([logits.detach().float() for logits in real_logits]))  # logits: real above 0

    # Generators: the same fakes, scored again by the updated discriminators, whose weights are frozen meanwhile.
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        shown_bands, shown_lows = shown_levels(augment, fakes, lows)
        losses_g = torch.stack([g_loss(logits) for logits in D(shown_bands, labels, shown_lows)])
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(losses_g.sum()).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)

    # Returned as tensors on the device: reading them (.item()) would force a sync every step.
    per_level = [torch.stack([loss_d, loss_g, torch.sigmoid(r.detach().float()).mean(),
                              torch.sigmoid(f.detach().float()).mean()])
                 for loss_d, loss_g, r, f in zip(losses_d.detach(), losses_g.detach(), real_logits, fake_logits)]
    return torch.cat([torch.stack([losses_d.detach().sum(), losses_g.detach().sum()]), *per_level])


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
    G, D = build_models(args, dataset.image_shape, dataset.num_classes)  # the same initial weights in every process
    if args.sync_bn:  # BatchNorm statistics over the global batch instead of each process's share
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    if device.type == "cuda":  # speed only, never on the CPU: cuDNN autotuning and NHWC for the tensor cores
        torch.backends.cudnn.benchmark = True
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G, D = G.to(device), D.to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what the grids, --generate and --fid sample from
    opt_g, opt_d = make_optimizers(args, G, D)  # one for every level's G, one for every D: Adam works per weight
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}
    augmentation = data.make_augmentation(args.augment, args.augment_policy, dataset.image_shape[0], device,
                                          args.ada_target)
    if augmentation:  # ADA's p and its accumulators, restored by --resume
        parts["augment"] = augmentation
    start_epoch = data.resume(checkpoint, parts, device) if checkpoint else 0
    # --compile: the compiled modules share their parameters with G and D, which are what gets saved. Their
    # forward() is the training path, every level on the real pyramid; sampling stays eager.
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    scaler.amp = args.amp

    history = data.read_metrics(os.path.join(args.out, "metrics.csv"), start_epoch) if rank == 0 else []
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    num_classes = dataset.num_classes if args.conditional else 0
    sizes = level_sizes(args.image_size)
    names = metric_names(sizes)
    columns, groups = 10, (num_classes or 4)
    grid_classes = grid_labels(num_classes, columns, device)
    # Unconditional: 4 groups of 10 samples. Conditional: one group per class, the same 10 noises in each, so that
    # a column is one z (and one set of noise planes) drawn as every class.
    grid_z, grid_planes = cascade_noise(columns if num_classes else columns * groups, args.latent_dim,
                                        args.image_size, torch.Generator().manual_seed(args.seed), device)
    if num_classes:
        grid_z, grid_planes = grid_z.repeat(groups, 1), [plane.repeat(groups, 1, 1, 1) for plane in grid_planes]
    real_sets = {"d_acc_real_train": (batches.images, batches.labels),  # D's accuracy on up to 1,000 of each
                 "d_acc_real_test": (held_out.images.to(device), held_out.labels.to(device)) if held_out else None}
    if rank == 0:
        print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source}, pyramid levels "
              f"{'/'.join(map(str, sizes))} px, {len(batches)} steps per epoch, device {device}"
              + (f" x {world_size} processes" if world_size > 1 else "") +
              f", epochs {start_epoch + 1}..{args.epochs}")

    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process draws its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(hash((args.seed, rank, epoch)))
        started, seen = time.time(), 0
        totals = torch.zeros(len(names), device=device)
        for i, (real, labels) in enumerate(batches.epoch(epoch), 1):
            seen += len(real)
            if world_size > 1:  # this process's share: disjoint slices of the same global batch
                real, labels = real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank]
            if device.type == "cuda":
                real = real.contiguous(memory_format=torch.channels_last)
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, labels if num_classes else None,
                                 args.latent_dim, scaler, augmentation)
            update_average(G_average, G, (epoch - 1) * len(batches) + i, args.average_decay)
            if i % args.log_every == 0 or i == len(batches):
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means)
                    means /= world_size
                means = means.tolist()  # the only sync with the device, every log_every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"loss became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch} step {i}")
                elapsed = time.time() - started
                steps_left = len(batches) - i + (args.epochs - epoch) * len(batches)
                if rank == 0:
                    levels = " | ".join(f"{size}px d {means[2 + 4 * k]:.2f} g {means[3 + 4 * k]:.2f}"
                                        for k, size in enumerate(sizes))
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | {levels} | "
                          f"{seen / elapsed:.0f} img/s | {steps_left * elapsed / i / 60:.1f} min left ",
                          end="\r" if sys.stdout.isatty() else "\n", flush=True)
        if world_size > 1 and not replicas_agree(G, D):
            raise FloatingPointError(f"the processes' weights differ at the end of epoch {epoch}")
        if rank > 0:
            continue
        if sys.stdout.isatty():
            print()
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, real_sets, args.latent_dim, num_classes, sizes)

        def shares(name):
            return "/".join(accuracy[f"{name}_{size}"] or "-" for size in sizes)
        print(f"epoch {epoch}: D calls real {shares('d_acc_real_train')} of training images, "
              f"{shares('d_acc_real_test')} of held-out ones; calls fake {shares('d_acc_fake')} of fakes "
              f"(levels {'/'.join(map(str, sizes))} px)")
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}",
                        "augment_p": data.augment_p(augmentation)})
        # Per level, D's and G's loss; at most 6 curves (the plot's colours): the coarsest and the two finest levels.
        curves = [f"{loss}_{size}" for size in sorted({sizes[0], *sizes[-2:]}) for loss in ("d_loss", "g_loss")]
        curves = curves[:5] + ["augment_p"] if args.augment == "ada" else curves  # 6 colours at most
        grid = level_grid(G_average, grid_z, grid_classes, grid_planes, columns)
        data.save_epoch(args.out, epoch, history, curves, grid, {
            "script": SCRIPT, **{key: part.state_dict() for key, part in parts.items()}, "epoch": epoch,
            "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            **data.random_states(device)})

    if args.fid and rank == 0:
        labels = torch.arange(args.fid) % dataset.num_classes  # every class equally often, like the grid
        data.report_fid(lambda: generate_images(G_average, labels, args.latent_dim, args.image_size, device,
                                                seed=args.seed + 1), dataset, device)


@torch.no_grad()
def d_accuracy(D, G, real_sets, latent_dim, num_classes, sizes, n=1000):
    """How often each level's D is right, in eval mode: the share of each set of real images whose band at that
    level D calls real (logit > 0), and the share of n fresh fakes from the raw generators (not their average,
    which D never saw) that it calls fake. The fakes are what each D trains on: the 8x8 level's from z, a finer
    level's residual drawn on the upsampled coarse band of a real training image. A training share that pulls away
    from the held-out share means that level's D is memorising the training images (Karras et al. 2020).
    real_sets: name -> (uint8 images, labels) on the device, or None where there is no such set (empty cells)."""
    D.eval(), G.eval()
    levels = len(sizes)
    accuracy = {}
    for name, images_and_labels in real_sets.items():
        if images_and_labels is None:  # a folder has no held-out split
            accuracy.update({f"{name}_{size}": "" for size in sizes})
            continue
        images, labels = images_and_labels
        called_real = torch.zeros(levels, device=images.device)
        for chunk, classes in zip(images[:n].split(250), labels[:n].split(250)):
            bands, lows = laplacian_pyramid(data.to_float(chunk), levels)
            logits = D(bands, classes if num_classes else None, lows)
            called_real += torch.stack([(level > 0).sum() for level in logits])
        accuracy.update({f"{name}_{size}": f"{share:.4f}"
                         for size, share in zip(sizes, (called_real / len(images[:n])).tolist())})
    images = real_sets["d_acc_real_train"][0][:n]  # the coarse bands the finer levels' fakes are drawn on
    called_fake = torch.zeros(levels, device=images.device)
    for chunk in images.split(250):
        _, lows = laplacian_pyramid(data.to_float(chunk), levels)
        classes = torch.randint(num_classes, (len(chunk),), device=chunk.device) if num_classes else None
        fakes = G(torch.randn(len(chunk), latent_dim, device=chunk.device), classes, lows)
        called_fake += torch.stack([(level <= 0).sum() for level in D(fakes, classes, lows)])
    accuracy.update({f"d_acc_fake_{size}": f"{share:.4f}"
                     for size, share in zip(sizes, (called_fake / len(images)).tolist())})
    D.train(), G.train()
    return accuracy


def build_models(args, image_shape, num_classes):
    channels, image_size = image_shape[0], image_shape[-1]
    num_classes = num_classes if args.conditional else 0
    G = Generator(args.latent_dim, image_size, channels, args.width, num_classes)
    D = Discriminator(image_size, channels, args.width, num_classes)
    G.apply(init_weights)
    D.apply(init_weights)
    return G, D



# Copied from gan.make_optimizers
def make_optimizers(args, G, D):
    """Adam with beta1 = 0.5 (DCGAN's setting): the default 0.9 makes the two players' momentum overshoot."""
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    return opt_g, opt_d


def level_sizes(image_size):
    """The pyramid's sides, coarse to fine: [8, 16, 32] at 32."""
    return [COARSEST * 2 ** k for k in range(pyramid_levels(image_size))]


def grid_labels(num_classes, columns, device):
    """Labels of the per-epoch grid: one group of rows per class (None for unconditional models)."""
    return torch.arange(num_classes, device=device).repeat_interleave(columns) if num_classes else None


def cascade_noise(n, latent_dim, image_size, generator=None, device="cpu"):
    """z and one noise plane per finer level for n samples: everything the cascade draws from."""
    z = torch.randn(n, latent_dim, generator=generator).to(device)
    planes = [torch.randn(n, 1, size, size, generator=generator).to(device) for size in level_sizes(image_size)[1:]]
    return z, planes


@torch.no_grad()
def level_grid(G, z, labels, planes, columns):
    """Every level's output for the same samples: for each group of `columns` samples, one row per level, coarse
    to fine, each level enlarged to the final size with square pixels so its real resolution shows."""
    levels = G.eval().sample(z, labels, planes)
    size = levels[-1].shape[-1]
    rows = torch.stack([F.interpolate(images, size=(size, size), mode="nearest").unflatten(0, (-1, columns))
                        for images in levels], dim=1)  # (groups, levels, columns, C, S, S)
    return rows.flatten(0, 2)


@torch.no_grad()
def generate_images(G, labels, latent_dim, image_size, device, seed, batch_size=500):
    """len(labels) images as uint8 [n, C, H, W]: the whole cascade in batches, in eval mode (BatchNorm uses its
    running averages). labels: int64 [n] on the CPU; only conditional models read it."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    images = []
    for chunk in labels.split(batch_size):
        z, planes = cascade_noise(len(chunk), latent_dim, image_size, noise, device)
        images.append(data.to_uint8(G.sample(z, chunk.to(device) if G.conditional else None, planes)[-1]).cpu())
    return torch.cat(images)


def save_pyramid_picture(dataset="fashion-mnist", path="assets/lapgan_pyramid.png", index=0, data_dir="data",
                         image_size=32, scale=5):
    """Draw the Laplacian pyramid of one training image, one column per level, coarse to fine: the upsampled coarser
    level (what that level's G is given), plus the residual (what it learns to draw; mid-grey is 0), equals
    the image at that level. The 8x8 column is the top band itself (what the first G draws)."""
    dataset = data.load_dataset(dataset, data_dir, image_size=image_size)
    levels = pyramid_levels(image_size)
    bands, lows = laplacian_pyramid(data.to_float(dataset.images[index:index + 1]), levels)
    rows = [("upsampled coarser level", [None, *lows]),
            ("+ residual (grey = 0)", [None, *[residual.clamp(-1, 1) for residual in bands[1:]]]),
            ("= image at this level", [reconstruct(bands[:k + 1]) for k in range(levels)])]
    font = ImageFont.load_default()
    cell, label, gap = image_size * scale, 14, 10
    picture = Image.new("RGB", (gap + levels * (cell + gap), len(rows) * (cell + label + gap) + gap), "white")
    draw = ImageDraw.Draw(picture)
    for r, (title, images) in enumerate(rows):
        top = gap + r * (cell + label + gap)
        draw.text((gap, top), title, fill="black", font=font)
        for k, level in enumerate(images):
            if level is None:
                continue
            tile = Image.fromarray(data.make_grid(level, nrow=1, padding=0)[..., 0])
            picture.paste(tile.resize((cell, cell), Image.Resampling.NEAREST), (gap + k * (cell + gap), top + label))
            if r == len(rows) - 1:
                draw.text((gap + k * (cell + gap), top + label + cell), f"{level.shape[-1]}x{level.shape[-1]}",
                          fill="black", font=font)
    data.save_atomic(picture, path, "PNG")
    return path


def generate(args):
    checkpoint = load_checkpoint(args.out)
    saved = argparse.Namespace(**checkpoint["args"])
    classes = checkpoint["classes"]
    G, _ = build_models(saved, checkpoint["image_shape"], len(classes))
    data.restore(G, checkpoint["generator_average"], checkpoint, "generator")
    if args.label is not None and not (saved.conditional and 0 <= args.label < len(classes)):
        raise UsageError(f"--label {args.label}: the model is " + (
            f"conditional on classes 0..{len(classes) - 1}" if saved.conditional else "not conditional"))
    labels = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    labels = labels % len(classes)  # without --label: classes in turn
    images = generate_images(G.to(args.device), labels, saved.latent_dim, saved.image_size, args.device,
                             seed=args.seed)
    data.save_samples(args.out, images, labels if saved.conditional else None)


def default_size(args):
    """32x32 for the 28x28 named datasets (a power of two keeps every level of the pyramid exact), 64 for a folder."""
    return 32 if args.dataset in data.DATASETS else 64


MODEL_SETTINGS = ("image_size", "width", "latent_dim", "conditional")  # what the weights were made for
# Copied from gan.RESUME_SETTINGS
RESUME_SETTINGS = (*MODEL_SETTINGS, "batch_size", "lr", "seed", "average_decay",
                   "train_images", "augment", "augment_policy", "ada_target")  # what --resume keeps
SIDE = (lambda value: value >= 32 and not value & (value - 1), "must be a power of two, at least 32")


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=int, default=6, help="total passes over the training set (default 6)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, over all processes (default 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of every G and D (default 2e-4)")
    p.add_argument("--latent-dim", type=int, default=64, help="size of the coarsest level's noise z (default 64)")
    p.add_argument("--image-size", type=int, help="side of the square images, a power of two >= 32: one pyramid "
                                                  "level per doubling above 8 (default 32 for mnist/fashion-mnist, "
                                                  "64 for a folder)")
    p.add_argument("--width", type=int, default=32, help="channels of each finer level's G and of its D's first "
                                                         "layer (doubling per halving); the 8x8 level uses 2w and 4w "
                                                         "(default 32)")
    p.add_argument("--conditional", action="store_true", help="condition the coarsest level's G and D on the class")
    p.add_argument("--average-decay", type=float, default=0.999,
                   help="decay of the moving average of G's weights that samples are drawn from (default 0.999)")
    add_augment_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "lapgan"), help="the run's folder (default runs/lapgan)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=int, metavar="K", help="with --generate on a conditional model: only class K")
    p.add_argument("--fid", type=int, metavar="N", help="after training, FID of N generated vs the real images")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision: float16 + loss scaling on CUDA, bfloat16 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA: BatchNorm statistics over the "
                                                          "global batch (default: each process's own share)")
    args = p.parse_args(argv)
    check_args(args, {"epochs": at_least(1), "batch_size": at_least(1), "latent_dim": at_least(1),
                      "width": at_least(1), "log_every": at_least(1), "generate": at_least(1), "fid": at_least(2),
                      "seed": SEED, "lr": POSITIVE, "average_decay": DECAY, "image_size": SIDE,
                      "train_images": at_least(1), "ada_target": OPEN_UNIT})
    if args.label is not None and args.generate is None:
        raise UsageError(f"--label {args.label}: only with --generate N")
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
