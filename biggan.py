"""BigGAN (Brock et al. 2019, arXiv:1809.11096): ResNet G and D with spectral norm, class-conditional BatchNorm fed by a
shared class embedding and a hierarchical z, projection D, hinge loss, orthogonal regularisation, the truncation trick.

    python biggan.py --dataset fashion-mnist                 # one row per class in runs/biggan/samples/, ~13 min
    python biggan.py --generate 100 --label 8 --truncation 0.5   # runs/biggan/samples.npz and .png: 100 of class 8
    python biggan.py --preset paper --dataset DIR            # the authors' CIFAR-10 model and settings, for a GPU
"""
import argparse
import copy
import itertools
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
from torch.nn.utils.parametrizations import spectral_norm

import data

SCRIPT = os.path.basename(__file__)


def spectrally_normed(layer):
    """layer / its largest singular value (Miyato et al. 2018), initialised first as the authors do: N(0, 0.02), 0."""
    nn.init.normal_(layer.weight, mean=0.0, std=0.02)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return spectral_norm(layer)


def sn_conv(c_in, c_out, kernel_size, bias=True):
    return spectrally_normed(nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=bias))


class ConditionalBatchNorm(nn.Module):
    """BatchNorm scaled by 1 + Linear(c), shifted by Linear(c); c: the class (embedded, or one-hot) and a chunk of z."""

    def __init__(self, channels, condition_dim):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1, affine=condition_dim == 0)
        self.gain = spectrally_normed(nn.Linear(condition_dim, channels, bias=False)) if condition_dim else None
        self.bias = spectrally_normed(nn.Linear(condition_dim, channels, bias=False)) if condition_dim else None

    def forward(self, x, condition):  # (B, C, H, W), (B, condition_dim) -> (B, C, H, W)
        if self.gain is None:
            return self.bn(x)
        return self.bn(x) * (1 + self.gain(condition))[:, :, None, None] + self.bias(condition)[:, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN's block (Zhang et al. 2019), keys and values max-pooled 2x2 as in the authors' code; gamma 0: identity."""

    def __init__(self, channels):
        super().__init__()
        self.query = sn_conv(channels, max(1, channels // 8), 1, bias=False)
        self.key = sn_conv(channels, max(1, channels // 8), 1, bias=False)
        self.value = sn_conv(channels, max(1, channels // 2), 1, bias=False)
        self.out = sn_conv(max(1, channels // 2), channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        b, _, h, w = x.shape
        query = self.query(x).flatten(2)  # (B, C/8, HW)
        key = F.max_pool2d(self.key(x), 2).flatten(2)  # (B, C/8, HW/4)
        value = F.max_pool2d(self.value(x), 2).flatten(2)  # (B, C/2, HW/4)
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # (B, HW, HW/4)
        return x + self.gamma * self.out((value @ attention.transpose(1, 2)).view(b, -1, h, w))


class GBlock(nn.Module):
    """BigGAN's ResBlock up: cBN-ReLU-upsample-conv3x3-cBN-ReLU-conv3x3, plus the input upsampled through a 1x1 conv."""

    def __init__(self, c_in, c_out, condition_dim):
        super().__init__()
        self.bn1, self.bn2 = ConditionalBatchNorm(c_in, condition_dim), ConditionalBatchNorm(c_out, condition_dim)
        self.conv1, self.conv2 = sn_conv(c_in, c_out, 3), sn_conv(c_out, c_out, 3)
        self.shortcut = sn_conv(c_in, c_out, 1)

    def forward(self, x, condition):  # (B, c_in, S, S) -> (B, c_out, 2S, 2S)
        h = F.interpolate(F.relu(self.bn1(x, condition)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), condition)))
        return h + F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest")  # conv first: same, 1/4 the cost


class DBlock(nn.Module):
    """BigGAN's ResBlock down: [ReLU]-conv3x3-ReLU-conv3x3-[avgpool 2x2], plus the input (1x1 conv if reshaped)."""

    def __init__(self, c_in, c_out, preactivation=True, downsample=True):
        super().__init__()
        self.preactivation, self.downsample = preactivation, downsample
        self.conv1, self.conv2 = sn_conv(c_in, c_out, 3), sn_conv(c_out, c_out, 3)
        self.shortcut = sn_conv(c_in, c_out, 1) if c_in != c_out or downsample else None

    def forward(self, x):  # (B, c_in, S, S) -> (B, c_out, S/2, S/2), or (B, c_out, S, S) without downsampling
        h = self.conv2(F.relu(self.conv1(F.relu(x) if self.preactivation else x)))
        if self.downsample:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)  # average pooling commutes with the 1x1 shortcut conv
        return h + (self.shortcut(x) if self.shortcut is not None else x)


class Generator(nn.Module):
    """z (and a class) -> image in [-1, 1]: linear to 4x4, one ResBlock up per doubling, BN-ReLU-conv3x3-tanh."""

    def __init__(self, latent_dim, image_size, channels, width, num_classes=0, shared_dim=128, hier=True, attention=0):
        super().__init__()
        start = 7 if image_size == 28 else 4  # 7 -> 14 -> 28: 2 blocks at 28x28; 4 -> 8 -> 16 -> 32: 3 at 32x32
        num_blocks = (image_size // start).bit_length() - 1
        self.num_classes, self.hier, self.width = num_classes, hier, width
        self.shared = nn.Embedding(num_classes, shared_dim) if num_classes and shared_dim else None
        if self.shared is not None:  # N(0, 0.02) like every other weight; the only one without spectral norm
            nn.init.normal_(self.shared.weight, mean=0.0, std=0.02)
        class_dim = (shared_dim or num_classes) if num_classes else 0
        self.z_chunks = [len(c) for c in torch.arange(latent_dim).tensor_split(num_blocks + 1 if hier else 1)]
        self.start, self.linear = start, spectrally_normed(nn.Linear(self.z_chunks[0], start * start * width))
        block_z = self.z_chunks[1:] if hier else [0] * num_blocks
        self.blocks = nn.ModuleList(GBlock(width, width, z_dim + class_dim) for z_dim in block_z)
        self.attention_after = (attention // start).bit_length() - 1 if attention else 0  # the block making that size
        self.attention = SelfAttention(width) if attention else None
        self.out_bn = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
        self.out_conv = sn_conv(width, channels, 3)

    def forward(self, z, labels):  # (B, latent_dim), (B,) -> (B, C, S, S); labels unread when unconditional
        chunks = z.split(self.z_chunks, dim=1)
        classes = []
        if self.num_classes:
            classes = [self.shared(labels) if self.shared is not None else F.one_hot(labels, self.num_classes).float()]
        h = self.linear(chunks[0]).view(len(z), self.width, self.start, self.start)  # (B, w, 4, 4)
        for i, block in enumerate(self.blocks):  # (B, w, 8, 8), (B, w, 16, 16), (B, w, 32, 32) at 32x32
            condition = ([chunks[1 + i]] if self.hier else []) + classes
            h = block(h, torch.cat(condition, dim=1) if condition else None)
            if i + 1 == self.attention_after:
                h = self.attention(h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))  # (B, C, S, S)


class Discriminator(nn.Module):
    """Image (and a class) -> raw score: ResBlocks to 8x8 (+2), ReLU, sum, linear, + projection (Miyato & Koyama)."""

    def __init__(self, image_size, channels, width, num_classes=0, attention=0):
        super().__init__()
        num_down = 2 if image_size == 28 else image_size.bit_length() - 4  # to 7x7 at 28x28; 8x8: 2 at 32, 3 at 64
        self.blocks = nn.ModuleList(
            [DBlock(channels, width, preactivation=False)]  # (B, w, 16, 16) at 32x32
            + [DBlock(width, width) for _ in range(num_down - 1)]  # (B, w, 8, 8)
            + [DBlock(width, width, downsample=False) for _ in range(2)])  # (B, w, 8, 8)
        self.attention_after = (image_size // attention).bit_length() - 1 if attention else 0  # first at that size
        self.attention = SelfAttention(width) if attention else None
        self.linear = spectrally_normed(nn.Linear(width, 1))
        self.projection = spectrally_normed(nn.Embedding(num_classes, width)) if num_classes else None

    def forward(self, images, labels):  # (B, C, S, S), (B,) -> (B,); labels unread when unconditional
        h = images
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i + 1 == self.attention_after:
                h = self.attention(h)
        h = F.relu(h).sum(dim=(2, 3))  # (B, w): a sum, not a mean, so the score grows with evidence over the image
        projection = (self.projection(labels) * h).sum(dim=1) if self.projection is not None else 0
        return self.linear(h).squeeze(1) + projection


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: orthogonal regularisation, the hinge loss, D steps per G step

def orthogonal_penalty(G):
    """sum of ||W W^T * (1 - I)||_F^2 over G's raw weights W (before spectral norm; not the embedding, as theirs), W
    with one row per output unit: the filters' overlaps, norms left free (sec. 3.1; they apply half this gradient)."""
    weights = [w.float().flatten(1) for name, w in G.named_parameters() if w.ndim >= 2 and "shared." not in name]
    return sum((gram - torch.diag(torch.diagonal(gram))).pow(2).sum() for gram in (w @ w.T for w in weights))


def average_gradients(model):
    """Under torchrun, each gradient becomes its mean over the processes (one flat all-reduce; why: gan.py)."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, group, latent_dim, scaler, ortho_beta=1e-4, augment=None, amp=False):
    """One D update per (real, labels) batch of the group (--d-steps of them), then one G update that scores the last
    fake batch (the only one made with a graph) again, with the D just improved. Fakes take the reals' classes."""
    shown = augment or (lambda images: images)  # what D is shown of an image
    cast = torch.float16 if group[0][0].device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    totals = torch.zeros(3, device=group[0][0].device)
    for i, (real, labels) in enumerate(group):
        z = torch.randn(len(real), latent_dim, device=real.device)
        with torch.autocast(real.device.type, cast, enabled=amp):
            with torch.set_grad_enabled(i == len(group) - 1):
                fake = G(z, labels)
            # Reals and fakes in one pass (D has no BatchNorm, so this is two passes' result); fake detached: not G's.
            both = D(shown(torch.cat([real, fake.detach()])), labels.repeat(2)).float()
            real_scores, fake_scores = both.tensor_split(2)
            # hinge (Lim & Ye 2017): only scores inside the margin, D(x) < 1 or D(G(z)) > -1, push D
            loss_d = F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        average_gradients(D)
        scaler.step(opt_d)
        scaler.update()  # before the next D step: a GradScaler steps each optimizer once per update
        if augment:  # ADA's p moves by the sign of D's scores of the reals (hinge: real above 0)
            augment.observe(real_scores.detach())
        totals += torch.stack([loss_d.detach(), real_scores.detach().mean(), fake_scores.detach().mean()])

    D.requires_grad_(False)  # G's backward passes through D to the image without filling D's gradients
    with torch.autocast(real.device.type, cast, enabled=amp):
        loss_g = -D(shown(fake), labels).float().mean()  # G raises D's raw score of its fakes, without a margin
    penalty = orthogonal_penalty(G) if ortho_beta else torch.zeros(())  # float32, no autocast
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g + ortho_beta * penalty.to(loss_g.device)).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    means = totals / len(group)
    return torch.stack([means[0], loss_g.detach(), means[1], means[2], penalty.detach().to(means.device)])


def step_groups(batches, d_steps):
    """The epoch's batches in groups of d_steps consecutive ones, one group per G step (the last may be shorter)."""
    batches = iter(batches)
    while group := list(itertools.islice(batches, d_steps)):
        yield group


@torch.no_grad()
def update_average(G_average, G, step, decay):
    """G's moving average (why, and the decay's ramp: gan.py). The ramp stands for the authors' start at step 1,000."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm's running statistics
        average.copy_(current)


@torch.no_grad()
def recompute_batchnorm(G, latent_dim, num_classes, device, seed, n=2000):
    """The averaged G's own BatchNorm statistics, the mean over n of its samples (the authors' "standing statistics"):
    the running ones copied from G belong to G's weights (28 px, 1 epoch: feature FID 52.1 -> 46.7, docs/biggan.md)."""
    for norm in [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative mean, not a moving one
    noise = torch.Generator().manual_seed(seed)
    G.train()  # each batch's own statistics, accumulated into the running ones
    for _ in range(n // 250):
        z = torch.randn(250, latent_dim, generator=noise)
        G(z.to(device), torch.randint(max(num_classes, 1), (250,), generator=noise).to(device))
    G.eval()


@torch.no_grad()
def d_accuracy(D, G, dataset, held_out, latent_dim, num_classes, n=1000):
    """The shares of training and held-out images D scores above 0 (the hinge's middle), of fakes at or below 0."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    share = {name: part is not None and torch.cat([D(data.to_float(x.to(device)), y.to(device)) > 0 for x, y in
                                                   zip(part.images[:n].split(250), part.labels[:n].split(250))])
             for name, part in (("d_acc_real_train", dataset), ("d_acc_real_test", held_out))}
    fakes = torch.randint(max(num_classes, 1), (n,), device=device).split(250)  # the classes of the fakes
    share["d_acc_fake"] = torch.cat([D(G(torch.randn(len(y), latent_dim, device=device), y), y) <= 0 for y in fakes])
    D.train(), G.train()
    return {name: f"{value.float().mean():.4f}" if value is not False else "" for name, value in share.items()}


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
    args.image_size = args.image_size or (28 if args.dataset in data.DATASETS else 64)
    if rank == 0:
        data.prepare_out(args.out)  # writable, and no other run writing there
    dataset = data.load_data(args.dataset, args.data_dir, args.image_size, rank)
    dataset.images, dataset.labels = dataset.images[:args.train_images], dataset.labels[:args.train_images]
    held_out = data.load_data(args.dataset, args.data_dir, args.image_size, rank, split="test")
    num_classes = dataset.num_classes if dataset.num_classes > 1 else 0  # one class: unconditional

    torch.manual_seed(args.seed)  # the same initial weights in every process
    G = Generator(args.latent_dim, args.image_size, dataset.image_shape[0], args.width, num_classes, args.shared_dim,
                  args.hier, args.attention).to(device)
    D = Discriminator(args.image_size, dataset.image_shape[0], args.width, num_classes, args.attention).to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    # Adam with beta1 = 0 (BigGAN, SAGAN): no momentum, so neither player keeps moving on a stale direction.
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.0, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.999))
    augment = data.make_augmentation(args.augment, dataset.image_shape[0], device)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d,
             **({"augment": augment} if augment else {})}
    start_epoch, history = data.resume(checkpoint, parts, device) if checkpoint else (0, [])  # weights, RNG, log
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)  # sharing G's and D's weights
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    steps = math.ceil(len(batches) / args.d_steps)  # G steps an epoch
    names = ["d_loss", "g_loss", "d_real_output", "d_fake_output", "ortho_penalty"]  # what train_step returns
    columns = 10 if num_classes else 100  # the grid: a row per class, one z down each column
    grid_labels = data.grid_classes(num_classes).to(device).repeat_interleave(columns)  # 10 rows at most
    grid_noise = sample_z(columns, args.latent_dim, args.truncation, torch.Generator().manual_seed(args.seed))
    grid_noise = grid_noise.repeat(len(grid_labels) // columns, 1).to(device)
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, {steps} G steps an epoch, {device}")
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for i, group in enumerate(step_groups(batches.epoch(epoch), args.d_steps), 1):
            group = [(real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank])
                     for real, labels in group]  # this process's share of each global batch
            totals += train_step(G_fast, D_fast, opt_g, opt_d, group, args.latent_dim, scaler, args.ortho_beta,
                                 augment, args.amp)
            update_average(G_average, G, (epoch - 1) * steps + i, args.average_decay)
            if i % args.log_every == 0 or i == steps:
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means.div_(world_size))
                means = means.tolist()  # the only sync with the device, every --log-every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"the losses became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch}")
                if rank == 0:
                    print(f"epoch {epoch}/{args.epochs} step {i}/{steps} | d_loss {means[0]:.3f} g_loss "
                          f"{means[1]:.3f} | D out real {means[2]:.2f} fake {means[3]:.2f} | ortho {means[4]:.3g} "
                          f"| {i * args.d_steps * args.batch_size / (time.time() - started):.0f} img/s", flush=True)
        if rank > 0:
            continue
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, dataset, held_out, args.latent_dim, num_classes)
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{len(dataset.images) / seconds:.1f}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        recompute_batchnorm(G_average, args.latent_dim, num_classes, device, args.seed)
        with torch.no_grad():
            grid = G_average(grid_noise, grid_labels)
        data.save_epoch(args.out, epoch, history, ["d_loss", "g_loss"] + ["augment_p"] * (args.augment == "ada"),
                        grid, {"script": SCRIPT, "epoch": epoch, "args": vars(args), "history": history,
                               "image_shape": list(dataset.image_shape), "classes": dataset.classes,
                               **{key: part.state_dict() for key, part in parts.items()}, **data.random_states(device)})
    if args.fid and rank == 0:  # fid.py is imported only here: only --fid needs it
        import fid
        labels = torch.arange(args.fid) % max(num_classes, 1)  # every class equally often, like the grid
        try:
            fakes = generate_images(G_average, labels, args.latent_dim, device, args.seed + 1, args.truncation)
            print(fid.report(fakes, dataset.images[:10_000], device, cache_dir=dataset.cache_dir))
        except fid.FIDError as e:
            raise UsageError(f"--fid: {e}") from None


def sample_z(n, latent_dim, truncation=None, generator=None):
    """z ~ N(0, I), or N(0, I) truncated to [-T, T] (the truncation trick), drawn in one go by its inverse CDF."""
    if truncation is None:
        return torch.randn(n, latent_dim, generator=generator)
    low = torch.special.ndtr(torch.tensor(-float(truncation), dtype=torch.float64))  # P(z < -T)
    uniform = torch.rand(n, latent_dim, generator=generator, dtype=torch.float64)
    return torch.special.ndtri(low + uniform * (1 - 2 * low)).clamp(-truncation, truncation).float()


@torch.no_grad()
def generate_images(G, labels, latent_dim, device, seed, truncation=None, batch_size=500):
    """len(labels) images as uint8 (n, C, H, W), from G in eval mode; labels (n,) on the CPU."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    return torch.cat([data.to_uint8(G(sample_z(len(chunk), latent_dim, truncation, noise).to(device), chunk.to(device)))
                      .cpu() for chunk in labels.split(batch_size)])


def generate(args):
    checkpoint = load_checkpoint(args)
    saved = argparse.Namespace(**checkpoint["args"])
    num_classes = len(checkpoint["classes"]) if len(checkpoint["classes"]) > 1 else 0
    if args.label is not None and args.label >= num_classes:
        raise UsageError(f"--label {args.label}: the model is " + (
            f"conditional on classes 0..{num_classes - 1}" if num_classes else "not conditional"))
    G = Generator(saved.latent_dim, saved.image_size, checkpoint["image_shape"][0], saved.width, num_classes,
                  saved.shared_dim, saved.hier, saved.attention).to(args.device)
    G.load_state_dict(checkpoint["generator_average"])
    labels = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    labels = labels % max(num_classes, 1)  # without --label: the classes in turn
    images = generate_images(G, labels, saved.latent_dim, args.device, args.seed, args.truncation)
    data.save_samples(args.out, images, labels if num_classes else None)  # labels: conditional only


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


KEPT = ("preset", "image_size", "width", "latent_dim", "shared_dim", "hier", "attention", "batch_size", "lr", "lr_g",
        "seed", "average_decay", "d_steps", "ortho_beta", "truncation", "train_images", "augment")


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
    """An argparse type: a number of this kind in [low, high), else one line naming the range."""
    def check(text):
        if not low <= kind(text) < high:
            raise argparse.ArgumentTypeError(f"{text} is not in [{low}, {high})")
        return kind(text)
    check.__name__ = kind.__name__  # for argparse's "invalid int value"
    return check


COUNT, RATE, DECAY = number(int, 1), number(float, 1e-12), number(float, 0, 1)


def truncation(text):  # --truncation T >= 0, or none: z not cut
    return None if text == "none" else number(float, 0)(text)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# --preset paper: the authors' CIFAR-10 run (BigGAN-PyTorch's launch_cifar_ema.sh), for a GPU; lr as the defaults.
PRESETS = {
    "cpu": {},  # the defaults: 3 epochs of Fashion-MNIST at 28 px, 5,625 steps of 0.14 s on 2 CPU cores
    "paper": {"image_size": 32, "width": 256, "latent_dim": 128, "shared_dim": 0, "hier": False, "attention": 0,
              "ortho_beta": 0.0, "batch_size": 50, "d_steps": 4, "average_decay": 0.9999, "truncation": None},
}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu (the defaults) or paper; flags win")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, stacked-mnist or a folder (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=COUNT, default=3, help="total passes over the training set (default 3)")
    p.add_argument("--batch-size", type=COUNT, default=32, help="images a D step, over all processes (default 32)")
    p.add_argument("--lr", type=RATE, default=2e-4, help="Adam's learning rate of D (default 2e-4)")
    p.add_argument("--lr-g", type=RATE, default=2e-4, help="Adam's learning rate of G (default 2e-4)")
    p.add_argument("--latent-dim", type=COUNT, default=80, help="size of z (default 80: 3 chunks at 28x28, 4 at 32x32)")
    p.add_argument("--image-size", type=int, choices=(28, 32, 64, 128, 256, 512), help="default 28; a folder: 64")
    p.add_argument("--width", type=COUNT, default=32, help="channels of every block of G and D (default 32)")
    p.add_argument("--shared-dim", type=number(int, 0), default=128, help="class embedding (default 128; 0: one-hot)")
    p.add_argument("--hier", action=argparse.BooleanOptionalAction, default=True, help="a chunk of z for each G block")
    p.add_argument("--attention", type=number(int, 0), help="self-attention's side (default 14 at 28 px, else 16; "
                   "0: none)")
    p.add_argument("--ortho-beta", type=number(float, 0), default=1e-4, help="G's ortho. regularisation (default 1e-4)")
    p.add_argument("--d-steps", type=COUNT, default=1, help="D steps a G step, each on its own batch (default 1)")
    p.add_argument("--truncation", type=truncation, default=1.5, metavar="T", help="sample z cut to [-T, T], or none "
                   "(default 1.5)")
    p.add_argument("--average-decay", type=DECAY, default=0.999, help="of the moving average of G (default 0.999)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="augment every image D "
                   "sees, always (diffaug) or adaptively (ada): for a few thousand images or fewer (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "biggan"), help="the run's folder (default runs/biggan)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=number(int, 0), metavar="K", help="with --generate: every image of class K")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="G steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # the preset's values, under the flags given
    args = p.parse_args(argv)
    size = args.image_size or (28 if args.dataset in data.DATASETS else 64)
    sides = [(7 if size == 28 else 4) * 2 ** k for k in range(1, size.bit_length() - 3)]  # G's stages below the image
    args.attention = (14 if size == 28 else 16) if args.attention is None else args.attention
    if args.attention and args.attention not in sides:
        p.error(f"--attention {args.attention}: 0 or the side of one of G's stages below the image ({sides})")
    if args.label is not None and not args.generate:
        p.error(f"--label {args.label}: only with --generate N")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device) or args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: use cpu, or cuda, cuda:1, ... where torch sees a GPU")
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
