"""LAPGAN (Denton et al. 2015, arXiv:1506.05751): one GAN per level of a Laplacian pyramid, sampled coarse to fine:
a 7x7 image from z, then at each finer level a G draws the residual the upsampled coarser image misses.

    python lapgan.py --dataset fashion-mnist                      # 28x28 (levels 7, 14, 28): grids, GIF, metrics
    python lapgan.py --dataset fashion-mnist --conditional --out runs/lapgan-cond   # class-conditional 7x7 level
    python lapgan.py --dataset faces/ --out runs/faces            # a folder of images, 64x64 (levels 8..64)
    python lapgan.py --out runs/lapgan --generate 5000            # the whole cascade into samples.npz/.png
"""
import argparse
import copy
import math
import os
import re
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data

SCRIPT = os.path.basename(__file__)


def binomial_blur(images, gain=1.0):
    """The 5x5 binomial kernel [1 4 6 4 1]^2 / 256 (Burt & Adelson 1983): it keeps an image in [-1, 1] there."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=images.device, dtype=images.dtype) / 16
    kernel = (torch.outer(taps, taps) * gain).expand(images.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="reflect"), kernel, groups=images.shape[1])


def upsample(images):  # (B, C, S, S) -> (B, C, 2S, 2S): zeros between the pixels, then 4x the blur (any S, 7 too)
    spread = images.new_zeros(*images.shape[:2], 2 * images.shape[2], 2 * images.shape[3])
    spread[..., ::2, ::2] = images
    return binomial_blur(spread, gain=4.0)


def laplacian_pyramid(images, levels):
    """images (B, C, S, S) -> (bands, lows), coarse to fine. bands[0]: the image blurred and halved levels - 1 times;
    bands[k]: what lows[k - 1], the upsampled coarser level (level k's condition), misses."""
    gaussian = [images]
    for _ in range(levels - 1):  # the blur removes what half the pixels cannot hold
        gaussian.insert(0, binomial_blur(gaussian[0])[..., ::2, ::2])
    lows = [upsample(coarse) for coarse in gaussian[:-1]]
    return [gaussian[0]] + [fine - low for fine, low in zip(gaussian[1:], lows)], lows


def pyramid_sizes(image_size):  # each level's side, coarse to fine, halved while even and 7 or more: [7, 14, 28]
    sizes = [image_size]
    while sizes[0] % 2 == 0 and sizes[0] >= 14:
        sizes.insert(0, sizes[0] // 2)
    return sizes


class CoarseGenerator(nn.Module):  # z (and a class) -> the top of the pyramid, 7x7 or 8x8: an MLP, as the paper's
    def __init__(self, latent_dim, channels, size, hidden, num_classes=0, label_dim=16):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, label_dim) if num_classes else None
        self.net = nn.Sequential(
            nn.Linear(latent_dim + (label_dim if num_classes else 0), hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),  # (B, hidden)
            nn.Linear(hidden, channels * size * size), nn.Tanh(), nn.Unflatten(1, (channels, size, size)))

    def forward(self, z, labels=None):  # (B, latent_dim), (B,) -> (B, C, S, S)
        if self.label_embedding is not None:
            z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.net(z)


class ResidualGenerator(nn.Module):  # (upsampled coarser image, a noise plane as one more channel) -> residual
    def __init__(self, channels, width, kernel):
        super().__init__()
        last = max(kernel - 2, 3)  # the authors' 7, 7, 5; all at the level's side: no strides, no stripes
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, channels, last, padding=last // 2))  # (B, w, S, S) -> (B, C, S, S), linear: signed

    def forward(self, low, noise=None):  # (B, C, S, S), (B, 1, S, S) -> (B, C, S, S)
        return self.net(torch.cat([low, torch.randn_like(low[:, :1]) if noise is None else noise], dim=1))


class Generator(nn.Module):  # every level's G: forward() trains them on the real pyramid, sample() runs the cascade
    def __init__(self, latent_dim, image_size, channels, width, hidden, kernel, num_classes=0):
        super().__init__()
        sizes = pyramid_sizes(image_size)
        self.coarse = CoarseGenerator(latent_dim, channels, sizes[0], hidden, num_classes)
        self.refiners = nn.ModuleList(ResidualGenerator(channels, width, kernel) for _ in sizes[1:])

    def forward(self, z, labels, lows):  # [coarsest image, residual given lows[0], residual given lows[1], ...]
        return [self.coarse(z, labels)] + [refine(low) for refine, low in zip(self.refiners, lows)]

    def sample(self, z, labels, noises):  # [7x7, 14x14, 28x28]: upsampled previous + residual, in [-1, 1]
        images = [self.coarse(z, labels)]
        for refine, noise in zip(self.refiners, noises):
            low = upsample(images[-1])
            images.append((low + refine(low, noise)).clamp(-1, 1))
        return images


class CoarseDiscriminator(nn.Module):  # coarsest image (and a class) -> a logit; the projection D of dcgan.py
    def __init__(self, channels, size, width, num_classes=0):
        super().__init__()
        features = 4 * width * (size // 2) ** 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, 2 * width, 3, padding=1), nn.LeakyReLU(0.2),  # (B, 2w, 7, 7)
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * width), nn.LeakyReLU(0.2),
            nn.Flatten())  # (B, 4w * 3 * 3)
        self.logit = nn.Linear(features, 1)
        self.projection = nn.Embedding(num_classes, features) if num_classes else None
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, 0.0, 0.02)

    def forward(self, images, labels=None):  # (B, C, S, S), (B,) -> (B,)
        h = self.features(images)
        logits = self.logit(h).squeeze(1)
        return logits if self.projection is None else logits + (self.projection(labels) * h).sum(dim=1)


def residual_discriminator(image_size, channels, width):  # a finer level's image -> a logit: dcgan.py's D
    return nn.Sequential(
        nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),  # (B, w, S/2, S/2)
        nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, 1), nn.Flatten(0))


class Discriminator(nn.Module):  # every level's D: one logit vector a level, coarse to fine
    def __init__(self, image_size, channels, width, num_classes=0):
        super().__init__()
        sizes = pyramid_sizes(image_size)
        self.coarse = CoarseDiscriminator(channels, sizes[0], width, num_classes)
        self.refiners = nn.ModuleList(residual_discriminator(size, channels, width) for size in sizes[1:])

    def forward(self, images, labels):  # each level's image, coarse to fine (level_images)
        return [self.coarse(images[0], labels)] + [judge(image) for judge, image in zip(self.refiners, images[1:])]


def init_weights(module):  # DCGAN's: weights from N(0, 0.02), BatchNorm's scales from N(1, 0.02), shifts 0
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0 if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) else 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: a non-saturating GAN at every level of the pyramid at once

def bce(logits, label):  # binary cross-entropy of D's logits against the label 1 (real) or 0 (fake)
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def level_images(bands, lows):  # what each D judges: the coarsest image, then each upsampled coarser image plus a
    return [bands[0]] + [low + band for low, band in zip(lows, bands[1:])]  # residual (the paper adds them too)


def average_gradients(model):
    if dist.is_initialized():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]) / dist.get_world_size()
        dist.all_reduce(flat)
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler, augment=None, amp=False):
    """One D update, then one G update, at every level, each on its own band of the real pyramid (as in the paper; one
    backward pass of the summed losses). Returns the sums, then each level's losses and D's mean outputs."""
    with torch.no_grad():  # in float32 even under --amp: a residual is a small difference of two images
        bands, lows = laplacian_pyramid(real, len(G.refiners) + 1)
    cast = torch.float16 if real.device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    z = torch.randn(len(real), latent_dim, device=real.device)
    shown = (lambda images: [augment(image) for image in images]) if augment else (lambda images: images)
    with torch.autocast(real.device.type, cast, enabled=amp):
        fakes = level_images(G(z, labels, lows), lows)  # a finer G's residual on the real upsampled coarser image
        real_logits = [logits.float() for logits in D(shown(level_images(bands, lows)), labels)]
        fake_logits = [logits.float() for logits in D(shown([fake.detach() for fake in fakes]), labels)]  # not G
        losses_d = torch.stack([bce(real, 1) + bce(fake, 0) for real, fake in zip(real_logits, fake_logits)])
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(losses_d.sum()).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:  # ADA's p moves by what every level's D said of the reals (a logit above 0: real)
        augment.observe(torch.cat([logits.detach() for logits in real_logits]))

    D.requires_grad_(False)  # G's backward passes through D to the bands without filling D's gradients
    with torch.autocast(real.device.type, cast, enabled=amp):
        losses_g = torch.stack([bce(logits.float(), 1) for logits in D(shown(fakes), labels)])  # -log D(G(z))
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(losses_g.sum()).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    levels = [torch.stack([loss_d, loss_g, r.detach().sigmoid().mean(), f.detach().sigmoid().mean()])
              for loss_d, loss_g, r, f in zip(losses_d.detach(), losses_g.detach(), real_logits, fake_logits)]
    return torch.cat([torch.stack([losses_d.detach().sum(), losses_g.detach().sum()]), *levels])


@torch.no_grad()
def update_average(G_average, G, step, decay):  # the moving average of G that samples come from (why: gan.py)
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)


@torch.no_grad()
def recompute_batchnorm(G, latent_dim, image_size, num_classes, device, seed, n=2000):
    """The averaged G's own BatchNorm statistics, the mean over n samples of its cascade: G's running statistics
    belong to G's weights, not to the average (seed 0: feature FID 40.0 -> 24.7, docs/lapgan.md)."""
    norms = [m for m in G.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative mean, not a moving one
    noise = torch.Generator().manual_seed(seed)
    G.train()  # each batch's own statistics, accumulated into the running ones
    for _ in range(n // 250):
        z, planes = cascade_noise(250, latent_dim, image_size, noise, device)
        G.sample(z, torch.randint(max(num_classes, 1), (250,), generator=noise).to(device), planes)
    G.eval()


@torch.no_grad()
def d_accuracy(D, G, reals, latent_dim, num_classes, sizes, n=1000):
    """Each level's D, as gan.py's; its fakes drawn as each level trains, on the real pyramid's upsampled bands."""
    D.eval(), G.eval()
    device, shares = next(D.parameters()).device, {}
    for name, dataset in {**reals, "d_acc_fake": reals["d_acc_real_train"]}.items():
        if dataset is None:  # a folder has no held-out split
            shares.update({f"{name}_{size}": "" for size in sizes})
            continue
        images, labels = dataset.images[:n].to(device), dataset.labels[:n].to(device)
        called_real = 0
        for chunk, classes in zip(images.split(250), labels.split(250)):
            bands, lows = laplacian_pyramid(data.to_float(chunk), len(sizes))
            if name == "d_acc_fake":
                classes = torch.randint(num_classes, (len(chunk),), device=device) if num_classes else None
                bands = G(torch.randn(len(chunk), latent_dim, device=device), classes, lows)
            called_real += torch.stack([(logits > 0).sum() for logits in D(level_images(bands, lows), classes)])
        right = len(images) - called_real if name == "d_acc_fake" else called_real
        shares.update({f"{name}_{size}": f"{share:.4f}" for size, share in zip(sizes, (right / len(images)).tolist())})
    D.train(), G.train()
    return shares


def train(args):
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if world_size > 1:  # NCCL with one GPU a process, or gloo on CPUs
        if args.batch_size % world_size:
            raise UsageError(f"--batch-size {args.batch_size} does not split evenly over {world_size} processes")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    device = torch.device(args.device)
    checkpoint = load_checkpoint(args) if args.resume else None
    args.image_size = args.image_size or (28 if args.dataset in data.DATASETS else 64)  # levels 7, 14, 28
    if rank == 0:
        data.prepare_out(args.out)  # writable, and no other run writing there
    dataset = data.load_data(args.dataset, args.data_dir, args.image_size, rank)
    dataset.images, dataset.labels = dataset.images[:args.train_images], dataset.labels[:args.train_images]
    held_out = data.load_data(args.dataset, args.data_dir, args.image_size, rank, split="test")
    num_classes, channels = dataset.num_classes if args.conditional else 0, dataset.image_shape[0]

    torch.manual_seed(args.seed)  # the same initial weights in every process
    G = Generator(args.latent_dim, args.image_size, channels, args.width, args.hidden, args.kernel, num_classes)
    D = Discriminator(args.image_size, channels, args.width, num_classes)
    G, D = G.apply(init_weights).to(device), D.to(device)  # D keeps PyTorch's init (docs/lapgan.md)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    optimizer = (lambda params, lr: torch.optim.SGD(params, lr=lr)) if args.optimizer == "sgd" else (
        lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999)))  # per weight: as one a level
    opt_g, opt_d = optimizer(G.parameters(), args.lr_g), optimizer(D.parameters(), args.lr)
    augment = data.make_augmentation(args.augment, channels, device)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d,
             **({"augment": augment} if augment else {})}
    start_epoch, history = data.resume(checkpoint, parts, device) if checkpoint else (0, [])  # weights, RNG, log
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)  # sharing G's and D's weights
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    sizes = pyramid_sizes(args.image_size)
    names = ["d_loss", "g_loss"] + [f"{k}_{size}" for size in sizes for k in ("d_loss", "g_loss", "d_real", "d_fake")]
    # The grid: 4 groups of 10 samples; conditional: a group a class, the same 10 noises in each (a column: one z).
    grid_labels = data.grid_classes(num_classes or 4).to(device).repeat_interleave(10)  # 10 classes at most
    grid_z, grid_planes = cascade_noise(10 if num_classes else 40, args.latent_dim, args.image_size,
                                        torch.Generator().manual_seed(args.seed), device,
                                        repeat=len(grid_labels) // 10 if num_classes else 1)
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, levels {sizes}, {len(batches)} steps an epoch")
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for group in opt_g.param_groups + opt_d.param_groups if args.optimizer == "sgd" else ():
            group["momentum"] = min(0.0008 * (epoch - 1), 0.7)  # the authors' schedule: from 0, a little an epoch
        for i, (real, labels) in enumerate(batches.epoch(epoch), 1):
            real, labels = real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank]
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, scaler, augment, args.amp)
            update_average(G_average, G, (epoch - 1) * len(batches) + i, args.average_decay)
            if i % args.log_every == 0 or i == len(batches):
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means.div_(world_size))
                means = means.tolist()  # the only sync with the device, every --log-every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"the losses became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch}")
                if rank == 0:
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | " + " | ".join(
                          f"{s}px d {means[2 + 4 * k]:.2f} g {means[3 + 4 * k]:.2f}" for k, s in enumerate(sizes))
                          + f" | {i * args.batch_size / (time.time() - started):.0f} img/s", flush=True)
        if rank > 0:
            continue
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, {"d_acc_real_train": dataset, "d_acc_real_test": held_out}, args.latent_dim,
                              num_classes, sizes)
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{len(dataset.images) / seconds:.1f}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        # D's and G's loss at the coarsest and the two finest levels (plot_curves has 6 colours), or ADA's p
        curves = [f"{loss}_{size}" for size in sizes[:1] + sizes[-2:] for loss in ("d_loss", "g_loss")]
        curves = curves[:5] + ["augment_p"] if args.augment == "ada" else curves
        recompute_batchnorm(G_average, args.latent_dim, args.image_size, num_classes, device, args.seed)
        with torch.no_grad():  # a row a level for each group of 10, coarse to fine, enlarged with square pixels
            levels = G_average.eval().sample(grid_z, grid_labels, grid_planes)
            grid = torch.stack([F.interpolate(x, size=levels[-1].shape[-2:]).unflatten(0, (-1, 10)) for x in levels],
                               dim=1).flatten(0, 2)  # (groups, levels, 10, C, S, S) -> rows of 10
        data.save_epoch(args.out, epoch, history, curves, grid,
                        {"script": SCRIPT, "epoch": epoch, "args": vars(args), "history": history,
                         "image_shape": list(dataset.image_shape), "classes": dataset.classes,
                         **{key: part.state_dict() for key, part in parts.items()}, **data.random_states(device)})
    if args.fid and rank == 0:  # fid.py is imported only here: only --fid needs it
        import fid
        labels = torch.arange(args.fid) % dataset.num_classes  # every class equally often
        fake = generate_images(G_average, labels, args.latent_dim, args.image_size, device, args.seed + 1)
        try:
            print(fid.report(fake, dataset.images[:10_000], device, cache_dir=dataset.cache_dir))
        except fid.FIDError as e:
            raise UsageError(f"--fid: {e}") from None


def cascade_noise(n, latent_dim, image_size, generator, device, repeat=1):
    """z and a noise plane a finer level, for n samples (each drawn n times in a row, to repeat them)."""
    z = torch.randn(n, latent_dim, generator=generator).to(device).repeat(repeat, 1)
    return z, [torch.randn(n, 1, s, s, generator=generator).to(device).repeat(repeat, 1, 1, 1)
               for s in pyramid_sizes(image_size)[1:]]


@torch.no_grad()
def generate_images(G, labels, latent_dim, image_size, device, seed):  # an image a label, uint8 (n, C, H, W)
    noise, images = torch.Generator().manual_seed(seed), []
    for chunk in labels.split(500):  # the whole cascade, 500 at a time, BatchNorm in eval mode
        z, planes = cascade_noise(len(chunk), latent_dim, image_size, noise, device)
        images.append(data.to_uint8(G.eval().sample(z, chunk.to(device), planes)[-1]).cpu())
    return torch.cat(images)


def generate(args):
    checkpoint = load_checkpoint(args)
    saved, classes = argparse.Namespace(**checkpoint["args"]), checkpoint["classes"]
    if args.label is not None and not (saved.conditional and args.label < len(classes)):
        raise UsageError(f"--label {args.label}: the model is " + (
            f"conditional on classes 0..{len(classes) - 1}" if saved.conditional else "not conditional"))
    G = Generator(saved.latent_dim, saved.image_size, checkpoint["image_shape"][0], saved.width, saved.hidden,
                  saved.kernel, len(classes) if saved.conditional else 0).to(args.device)
    G.load_state_dict(checkpoint["generator_average"])
    labels = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    labels = labels % len(classes)  # without --label: the classes in turn
    images = generate_images(G, labels, saved.latent_dim, saved.image_size, args.device, args.seed)
    data.save_samples(args.out, images, labels if saved.conditional else None)


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


KEPT = ("preset", "image_size", "width", "hidden", "kernel", "latent_dim", "conditional", "batch_size", "lr",
        "lr_g", "optimizer", "seed", "average_decay", "train_images", "augment")


def load_checkpoint(args):
    """OUT/checkpoint.pt, if this script wrote it. --resume takes the run's own settings (KEPT) over the defaults."""
    checkpoint = data.read_checkpoint(args.out)
    if checkpoint.get("script") != SCRIPT:
        raise UsageError(f"{checkpoint['path']} was written by {checkpoint.get('script', 'another program')}")
    defaults = vars(parse_args([]))
    for key in KEPT if args.resume else ():
        if getattr(args, key) not in (checkpoint["args"][key], defaults[key]):
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)}: the run in {args.out} has "
                             f"{checkpoint['args'][key]}, which --resume keeps")
        setattr(args, key, checkpoint["args"][key])
    if args.resume and args.epochs <= checkpoint["epoch"]:
        raise UsageError(f"--epochs {args.epochs}: the run has {checkpoint['epoch']} already (the total counts)")
    return checkpoint


def number(kind, low, high=math.inf):
    def check(text):
        if not low <= kind(text) < high:
            raise argparse.ArgumentTypeError(f"{text} is not in [{low}, {high})")
        return kind(text)
    check.__name__ = kind.__name__  # for argparse's "invalid int value"
    return check


COUNT, RATE, DECAY = number(int, 1), number(float, 1e-12), number(float, 0, 1)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


PRESETS = {  # --preset paper: Denton et al.'s pyramid and G for 28 px data, the authors' optimizer; D is ours
    "cpu": {},  # the defaults below: a clean grid in under 10 minutes on a 2-core CPU
    "paper": {
        "hidden": 1200, "latent_dim": 100,  # the 7x7 level's G: an MLP 100 -> 1200 -> 1200 -> 49 (section 4)
        "width": 128, "kernel": 7,  # finer G: 7x7, 7x7, 5x5 convolutions of 128 channels (the authors' code)
        "optimizer": "sgd", "lr": 0.01, "lr_g": 0.01, "batch_size": 64,  # eyescream's SGD; its D: 64 real, 64 fake
    },
}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu (default) or paper; flags given win")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, stacked-mnist or a folder (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=COUNT, default=5, help="total passes over the training set (default 5)")
    p.add_argument("--batch-size", type=COUNT, default=32, help="images a step, over all processes (default 32)")
    p.add_argument("--lr", type=RATE, default=2e-4, help="learning rate of every level's D (default 2e-4)")
    p.add_argument("--lr-g", type=RATE, default=1e-3, help="learning rate of every level's G (default 1e-3)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="adam (betas 0.5, 0.999; default) "
                                                                              "or sgd (the authors' momentum)")
    p.add_argument("--latent-dim", type=COUNT, default=64, help="size of the coarsest level's z (default 64)")
    p.add_argument("--image-size", type=int, choices=(28, 32, 64, 128, 256), help="default 28; a folder: 64")
    p.add_argument("--width", type=COUNT, default=32, help="channels of the finer levels' G and D (default 32)")
    p.add_argument("--hidden", type=COUNT, default=512, help="units of the coarsest level's G, an MLP (default 512)")
    p.add_argument("--kernel", type=int, choices=(3, 5, 7), default=3, help="of the finer G's convs (default 3)")
    p.add_argument("--conditional", action="store_true", help="condition the coarsest level's G and D on the class")
    p.add_argument("--average-decay", type=DECAY, default=0.999, help="of the moving average of G (default 0.999)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="what D sees (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1...")
    p.add_argument("--out", default=os.path.join("runs", "lapgan"), help="the run's folder (default runs/lapgan)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=number(int, 0), metavar="K", help="with --generate, conditional: class K only")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # the preset's values, under the flags given
    args = p.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device) or args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: use cpu, or cuda, cuda:1, ... where torch sees a GPU")
    if args.label is not None and not args.generate:
        p.error(f"--label {args.label}: only with --generate N")
    return args


def main(argv=None):
    args, status, message = None, 0, None
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        args = parse_args(argv)
        generate(args) if args.generate else train(args)
    except (data.DataError, UsageError) as e:
        status, message = 2, f"{SCRIPT}: error: {e}"
    except FloatingPointError as e:
        status, message = 1, f"{SCRIPT}: training diverged: {e}; {args.out}/checkpoint.pt holds the last good epoch"
    except torch.cuda.OutOfMemoryError:
        status, message = 2, f"{SCRIPT}: error: out of GPU memory on {args.device}: lower --batch-size or --width"
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM, at any moment: the last finished epoch is on disk
        status, message = (143, "stopped by SIGTERM") if e.args == ("SIGTERM",) else (130, "interrupted")
        message += f": --resume continues from {args.out}'s last finished epoch" if args and not args.generate else ""
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()
    if message and int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one error is one line
        print(message, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
