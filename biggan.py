"""BigGAN (Brock et al. 2019, arXiv:1809.11096): ResNet G and D, class-conditional BatchNorm, projection D, hinge loss,
spectral norm in both networks, orthogonal regularisation and a moving average of G, the truncation trick.

    python biggan.py --dataset fashion-mnist --data-dir DIR      # one row per class in runs/biggan/samples/, ~18 min
    python biggan.py --out runs/biggan --generate 5000 --truncation 0.5   # samples.npz, samples.png (+ a T=0.5 grid)
    python biggan.py --dataset faces/ --out runs/faces           # a folder: a sub-folder per class, or loose images
    python biggan.py --preset paper --dataset DIR --device cuda  # the authors' CIFAR-10 model and settings

With labels (a named dataset, a folder of class sub-folders) G and D are class-conditional; a folder of loose images
is one class, and then both are unconditional (no embedding, no projection), as the authors' code allows.
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
from torch.nn.utils.parametrizations import spectral_norm

import data

# Copied from gan.SCRIPT
SCRIPT = os.path.basename(__file__)
LOW_TRUNCATION = 0.5  # the second grid, written beside the usual one: fewer, more typical images


def spectrally_normed(layer):
    """layer with its weight divided by its largest singular value (Miyato et al. 2018), estimated by one power
    iteration per forward pass in training mode; a kernel is taken as the matrix (c_out, c_in * k * k). The weight
    is drawn first, from N(0, 0.02) with biases 0 (the authors' CIFAR-10 run, G_init/D_init N02), so that the power
    iterations spectral_norm makes at the start estimate the weight actually trained. With spectral norm the scale
    of the init hardly matters: what the weights start as is their direction."""
    nn.init.normal_(layer.weight, mean=0.0, std=0.02)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return spectral_norm(layer)


def sn_conv(c_in, c_out, kernel_size, bias=True):
    return spectrally_normed(nn.Conv2d(c_in, c_out, kernel_size=kernel_size, padding=kernel_size // 2, bias=bias))


def sn_linear(n_in, n_out, bias=True):
    return spectrally_normed(nn.Linear(n_in, n_out, bias=bias))


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own scale and shift; instead gain 1 + Linear(c) and bias Linear(c) per sample, from the
    condition c (the class embedding and, with a hierarchical z, this block's chunk of z). With an empty condition
    (unconditional G, no hierarchical z) it is plain BatchNorm with a learned scale and shift."""

    def __init__(self, channels, condition_dim):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1, affine=condition_dim == 0)
        self.gain = sn_linear(condition_dim, channels, bias=False) if condition_dim else None
        self.bias = sn_linear(condition_dim, channels, bias=False) if condition_dim else None

    def forward(self, x, condition):  # (B, C, H, W), (B, condition_dim) -> (B, C, H, W)
        h = self.bn(x)
        if self.gain is None:
            return h
        return h * (1 + self.gain(condition))[:, :, None, None] + self.bias(condition)[:, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN's block (Zhang et al. 2019): every position attends to every other (keys and values max-pooled 2x2, as
    in the authors' code), the result added back times gamma. gamma starts at 0: the block begins as the identity
    and the networks learn how much non-local information to use."""

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
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # (B, HW, HW/4): each row sums to 1
        return x + self.gamma * self.out((value @ attention.transpose(1, 2)).view(b, -1, h, w))


class GBlock(nn.Module):
    """cBN-ReLU-upsample-conv3x3-cBN-ReLU-conv3x3, plus the upsampled input through a 1x1 conv (BigGAN's ResBlock
    up)."""

    def __init__(self, c_in, c_out, condition_dim):
        super().__init__()
        self.bn1, self.bn2 = ConditionalBatchNorm(c_in, condition_dim), ConditionalBatchNorm(c_out, condition_dim)
        self.conv1, self.conv2 = sn_conv(c_in, c_out, 3), sn_conv(c_out, c_out, 3)
        self.shortcut = sn_conv(c_in, c_out, 1)

    def forward(self, x, condition):  # (B, c_in, S, S) -> (B, c_out, 2S, 2S)
        h = F.interpolate(F.relu(self.bn1(x, condition)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), condition)))
        # A 1x1 conv commutes with nearest upsampling: the same shortcut as upsample-then-conv, at a quarter the cost.
        return h + F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest")


class DBlock(nn.Module):
    """[ReLU]-conv3x3-ReLU-conv3x3-[avgpool 2x2], plus the input, through a 1x1 conv where the shape changes (BigGAN's
    ResBlock down). The first block has no ReLU before its first conv: its input is the image itself."""

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
    """z (and a class) -> image in [-1, 1]: a linear map to 4x4 x width, one ResBlock up per doubling at constant
    width, then BN-ReLU-conv3x3-tanh. Each block's BatchNorms are conditioned on the class through one shared
    embedding (shared_dim; 0: a class embedding per layer, as a linear map of the one-hot class) and, with hier, on
    a chunk of z of its own: z is split into one chunk per block plus one for the linear layer (hierarchical z)."""

    def __init__(self, latent_dim, image_size, channels, width, num_classes=0, shared_dim=128, hier=True,
                 attention=0):
        super().__init__()
        num_blocks = image_size.bit_length() - 3  # 4x4 -> image_size: 3 blocks at 32x32, 4 at 64x64
        self.num_classes = num_classes
        self.shared = nn.Embedding(num_classes, shared_dim) if num_classes and shared_dim else None
        if self.shared is not None:  # N(0, 0.02) like every other weight; the only one without spectral norm
            nn.init.normal_(self.shared.weight, mean=0.0, std=0.02)
        class_dim = (shared_dim or num_classes) if num_classes else 0
        self.z_chunks = [len(c) for c in torch.arange(latent_dim).tensor_split(num_blocks + 1 if hier else 1)]
        self.hier, self.width = hier, width
        self.linear = sn_linear(self.z_chunks[0], 4 * 4 * width)  # (B, w * 4 * 4)
        block_z = self.z_chunks[1:] if hier else [0] * num_blocks
        self.blocks = nn.ModuleList(GBlock(width, width, z_dim + class_dim) for z_dim in block_z)  # 8, 16, 32 px
        self.attention_after = 0  # without attention: after no block
        if attention:
            self.attention_after = attention.bit_length() - 3  # the block that outputs attention x attention
            self.attention = SelfAttention(width)
        self.out_bn = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
        self.out_conv = sn_conv(width, channels, 3)

    def forward(self, z, labels=None):  # (B, latent_dim), (B,) -> (B, C, S, S)
        chunks = z.split(self.z_chunks, dim=1)
        class_vector = []
        if self.num_classes:
            class_vector = [self.shared(labels) if self.shared is not None
                            else F.one_hot(labels, self.num_classes).to(z.dtype)]
        h = self.linear(chunks[0]).view(len(z), self.width, 4, 4)  # (B, w, 4, 4)
        for i, block in enumerate(self.blocks):  # (B, w, 8, 8), (B, w, 16, 16), (B, w, 32, 32) at 32x32
            condition = ([chunks[1 + i]] if self.hier else []) + class_vector
            h = block(h, torch.cat(condition, dim=1) if condition else None)
            if i + 1 == self.attention_after:
                h = self.attention(h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))  # (B, C, S, S)

    def orthogonal_weights(self):
        """What orthogonal regularisation acts on: every weight matrix and kernel of G, raw (before spectral norm),
        except the shared class embedding, whose rows need not be orthogonal (the authors' code leaves it out)."""
        return [p for name, p in self.named_parameters() if p.ndim >= 2 and not name.startswith("shared.")]


class Discriminator(nn.Module):
    """Image (and a class) -> one raw score: ResBlocks at constant width, downsampling down to 8x8 and then two
    more without, ReLU, a sum over positions (global sum pooling), a linear layer, plus the projection
    <embed(y), h> (Miyato & Koyama 2018) for a conditional D. Each doubling of the image size adds one block down."""

    def __init__(self, image_size, channels, width, num_classes=0, attention=0):
        super().__init__()
        num_down = image_size.bit_length() - 4  # to 8x8: 2 blocks down at 32x32, 3 at 64x64
        self.blocks = nn.ModuleList(
            [DBlock(channels, width, preactivation=False)]  # (B, w, 16, 16) at 32x32
            + [DBlock(width, width) for _ in range(num_down - 1)]  # (B, w, 8, 8)
            + [DBlock(width, width, downsample=False) for _ in range(2)])  # (B, w, 8, 8), (B, w, 8, 8)
        resolutions = [image_size >> min(i + 1, num_down) for i in range(len(self.blocks))]
        self.attention_after = resolutions.index(attention) + 1 if attention else 0  # the first block at that size
        self.attention = SelfAttention(width) if attention else None
        self.linear = sn_linear(width, 1)
        self.projection = spectrally_normed(nn.Embedding(num_classes, width)) if num_classes else None

    def forward(self, images, labels=None):  # (B, C, S, S), (B,) -> (B,)
        h = images
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i + 1 == self.attention_after:
                h = self.attention(h)
        h = F.relu(h).sum(dim=(2, 3))  # (B, w): a sum, not a mean, so the score grows with evidence over the image
        scores = self.linear(h).squeeze(1)
        if self.projection is not None:
            scores = scores + (self.projection(labels) * h).sum(dim=1)
        return scores


def sample_z(n, latent_dim, truncation=None, generator=None):
    """z for sampling: N(0, I), or with the truncation trick N(0, I) with every entry |z| > T drawn again until it
    falls inside [-T, T]. That truncated normal is drawn here in one go, by its inverse CDF, which gives the same
    distribution as resampling without a loop that slows down as T shrinks. T = 0 is z = 0: one image per class."""
    if truncation is None:
        return torch.randn(n, latent_dim, generator=generator)
    if truncation == 0:
        return torch.zeros(n, latent_dim)
    low = torch.special.ndtr(torch.tensor(-float(truncation), dtype=torch.float64))  # P(z < -T)
    uniform = torch.rand(n, latent_dim, generator=generator, dtype=torch.float64)
    return torch.special.ndtri(low + uniform * (1 - 2 * low)).clamp(-truncation, truncation).float()


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: one point where images reach D, the hinge loss, orthogonal regularisation, the alternating update

def discriminate(D, images, labels, augment=None):
    """D's scores for images of the given classes (labels None: unconditional). Every image D sees, real or fake,
    in D's step and in G's, goes through here, and so through --augment's data.Augmentation when there is one (each
    call with fresh random draws; differentiable, so G learns through it)."""
    return D(augment(images) if augment else images, labels)


# Copied from gan.d_loss_hinge
def d_loss_hinge(real_outputs, fake_outputs):
    """Hinge (Lim & Ye 2017): only samples inside the margin, D(x) < 1 or D(G(z)) > -1, push D."""
    return F.relu(1 - real_outputs.float()).mean() + F.relu(1 + fake_outputs.float()).mean()


# Copied from gan.g_loss_hinge
def g_loss_hinge(fake_outputs):
    """Hinge GAN's generator raises D's raw output on its fakes, without a margin."""
    return -fake_outputs.float().mean()


def orthogonal_penalty(weights):
    """sum over W of ||W W^T * (1 - I)||_F^2, W each weight as a matrix with one row per output unit (a kernel as
    (c_out, c_in * k * k)): the squared cosine-like overlaps between different filters, their norms left free
    (BigGAN's relaxed orthogonal regularisation, sec. 3.1; the paper writes W^T W for W with one column per filter).
    The authors' code applies the gradient 2 (W W^T * (1 - I)) W directly, half this penalty's; beta is the weight."""
    total = torch.zeros(())
    for weight in weights:
        w = weight.float().flatten(1)
        gram = w @ w.T
        total = total + (gram - torch.diag(torch.diagonal(gram))).pow(2).sum()
    return total


METRICS = ["d_loss", "g_loss", "d_real_output", "d_fake_output", "ortho_penalty"]  # metrics.csv's per-step columns


def train_step(G, D, opt_g, opt_d, real_batches, label_batches, latent_dim, scaler, ortho_beta=1e-4, augment=None):
    """One D update per real batch given (--d-steps of them), then one G update. label_batches holds None per batch
    for unconditional models. The fakes are drawn for the classes of the real batch beside them. Only the last
    fake batch is made with a graph: G's update scores that same batch again, with the D just improved. augment:
    --augment's data.Augmentation or None; ADA's p moves by the sign of D's (hinge) scores of the reals."""
    totals = torch.zeros(3, device=real_batches[0].device)
    for i, (real, labels) in enumerate(zip(real_batches, label_batches)):
        z = torch.randn(len(real), latent_dim, device=real.device)
        with autocast(real.device, scaler):
            with torch.set_grad_enabled(i == len(real_batches) - 1):
                fake = G(z, labels)
            # One pass of D over reals and fakes together (D has no BatchNorm, so this is the same as two passes);
            # fake is detached so this loss does not reach into G.
            both = discriminate(D, torch.cat([real, fake.detach()]), None if labels is None else labels.repeat(2),
                                augment)
            real_outputs, fake_outputs = both.tensor_split(2)
            loss_d = d_loss_hinge(real_outputs, fake_outputs)
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        average_gradients(D)
        scaler.step(opt_d)
        scaler.update()
        if augment:
            augment.observe(real_outputs.detach().float())  # hinge: D calls an image real above 0
        totals += torch.stack([loss_d.detach(), real_outputs.detach().mean(), fake_outputs.detach().mean()]).float()

    # Generator: D's weights are frozen meanwhile, so the backward pass computes only what G needs. The orthogonal
    # penalty is added to G's loss outside autocast: it is about the weights, in float32.
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        loss_g = g_loss_hinge(discriminate(D, fake, labels, augment))
    penalty = orthogonal_penalty(G.orthogonal_weights()) if ortho_beta else torch.zeros(())
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g + ortho_beta * penalty.to(loss_g.device)).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)

    # Returned as tensors on the device: reading them (.item()) would force a sync every step.
    means = totals / len(real_batches)
    return torch.stack([means[0], loss_g.detach().float(), means[1], means[2], penalty.detach().to(means.device)])


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
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)
    if device.type == "cuda":  # speed only, never on the CPU: cuDNN autotuning and NHWC for the tensor cores
        torch.backends.cudnn.benchmark = True
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G, D = G.to(device), D.to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what the grids, --generate and --fid sample from
    opt_g, opt_d = make_optimizers(args, G, D)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}
    augmentation = data.make_augmentation(args.augment, args.augment_policy, dataset.image_shape[0], device,
                                          args.ada_target)
    if augmentation:  # ADA's p and its accumulators, restored by --resume
        parts["augment"] = augmentation
    start_epoch = data.resume(checkpoint, parts, device) if checkpoint else 0
    # --compile: the compiled modules share their parameters with G and D, which are what gets saved.
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    scaler.amp = args.amp

    history = data.read_metrics(os.path.join(args.out, "metrics.csv"), start_epoch) if rank == 0 else []
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    num_classes = conditional_classes(dataset.num_classes)
    steps = -(-len(batches) // args.d_steps)  # G steps per epoch; the last may follow fewer D steps
    # The grids: one row per class for a conditional model, the same noise down each column (one z, every class);
    # the second at a lower truncation, beside it in OUT.
    columns = 10 if num_classes else 100
    grid_classes = torch.arange(num_classes, device=device).repeat_interleave(columns) if num_classes else None
    grid_noise, low_noise = (sample_z(columns, args.latent_dim, truncation, torch.Generator().manual_seed(args.seed))
                             .repeat(max(num_classes, 1), 1).to(device)
                             for truncation in (args.truncation, LOW_TRUNCATION))
    real_sets = {"d_acc_real_train": (batches.images, batches.labels),  # D's accuracy on up to 1,000 of each
                 "d_acc_real_test": (held_out.images.to(device), held_out.labels.to(device)) if held_out else None}
    if rank == 0:
        print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source}, "
              + (f"{num_classes} classes" if num_classes else "unconditional") + f", {len(batches)} D and {steps} G "
              f"steps per epoch, device {device}" + (f" x {world_size} processes" if world_size > 1 else "") +
              f", epochs {start_epoch + 1}..{args.epochs}")

    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process draws its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(hash((args.seed, rank, epoch)))
        started, seen = time.time(), 0
        totals = torch.zeros(len(METRICS), device=device)
        for i, group in enumerate(d_step_groups(batches.epoch(epoch), args.d_steps), 1):
            seen += sum(len(real) for real, _ in group)
            if world_size > 1:  # this process's share: disjoint slices of the same global batches
                group = [(real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank])
                         for real, labels in group]
            if device.type == "cuda":
                group = [(real.contiguous(memory_format=torch.channels_last), labels) for real, labels in group]
            totals += train_step(G_fast, D_fast, opt_g, opt_d, [real for real, _ in group],
                                 [labels if num_classes else None for _, labels in group], args.latent_dim, scaler,
                                 args.ortho_beta, augmentation)
            update_average(G_average, G, (epoch - 1) * steps + i, args.average_decay)
            if i % args.log_every == 0 or i == steps:
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means)
                    means /= world_size
                means = means.tolist()  # the only sync with the device, every log_every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"loss became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch} step {i}")
                elapsed = time.time() - started
                steps_left = steps - i + (args.epochs - epoch) * steps
                if rank == 0:
                    print(f"epoch {epoch}/{args.epochs} step {i}/{steps} | d_loss {means[0]:.3f} g_loss "
                          f"{means[1]:.3f} | D out {means[2]:.2f} / {means[3]:.2f} | ortho {means[4]:.3g} | "
                          f"{seen / elapsed:.0f} img/s | {steps_left * elapsed / i / 60:.1f} min left ",
                          end="\r" if sys.stdout.isatty() else "\n", flush=True)
        if world_size > 1 and not replicas_agree(G, D):
            raise FloatingPointError(f"the processes' weights differ at the end of epoch {epoch}")
        if rank > 0:
            continue
        if sys.stdout.isatty():
            print()
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, real_sets, args.latent_dim, num_classes)
        print(f"epoch {epoch}: D calls real {accuracy['d_acc_real_train']} of training images, "
              f"{accuracy['d_acc_real_test'] or '-'} of held-out ones; calls fake {accuracy['d_acc_fake']} of fakes")
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(METRICS, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}",
                        "augment_p": data.augment_p(augmentation)})
        with torch.no_grad():
            grid, low_grid = (G_average.eval()(noise, grid_classes) for noise in (grid_noise, low_noise))
        curves = ("d_loss", "g_loss") + (("augment_p",) if args.augment == "ada" else ())
        data.save_epoch(args.out, epoch, history, curves, grid, {
            "script": SCRIPT, **{key: part.state_dict() for key, part in parts.items()}, "epoch": epoch,
            "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            **data.random_states(device)}, pictures=[(f"truncation_{LOW_TRUNCATION}.png", low_grid)])

    if args.fid and rank == 0:
        labels = torch.arange(args.fid) % max(num_classes, 1)  # every class equally often, like the grid
        data.report_fid(lambda: generate_images(G_average, labels, args.latent_dim, device, args.seed + 1,
                                                args.truncation), dataset, device)


def d_step_groups(batches, d_steps):
    """Consecutive batches in lists of d_steps, one list per G step (the last list may be shorter)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == d_steps:
            yield group
            group = []
    if group:
        yield group


def conditional_classes(num_classes):
    """The classes G and D are conditioned on: all of them, or none (0) for a single class, a folder of loose images."""
    return num_classes if num_classes > 1 else 0


@torch.no_grad()
def d_accuracy(D, G, real_sets, latent_dim, num_classes, n=1000):
    """How often D is right, in eval mode: the share of each set of real images it scores above 0 (the hinge's
    middle), and of n fresh fakes from the raw generator (not its average, which D never saw) that it scores at or
    below 0. A training share that pulls away from the held-out share means D is memorising the training images.
    real_sets: name -> (uint8 images, labels) on the device, or None where there is no such set."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    accuracy = {}
    for name, images_and_labels in real_sets.items():
        if images_and_labels is None:
            accuracy[name] = ""  # a folder has no held-out split
            continue
        images, labels = images_and_labels
        scores = torch.cat([discriminate(D, data.to_float(chunk), classes if num_classes else None)
                            for chunk, classes in zip(images[:n].split(250), labels[:n].split(250))])
        accuracy[name] = f"{(scores > 0).float().mean().item():.4f}"
    fake_scores = []
    for chunk in torch.randint(max(num_classes, 1), (n,), device=device).split(250):
        classes = chunk if num_classes else None
        fake_scores.append(discriminate(D, G(torch.randn(len(chunk), latent_dim, device=device), classes), classes))
    accuracy["d_acc_fake"] = f"{(torch.cat(fake_scores) <= 0).float().mean().item():.4f}"
    D.train(), G.train()
    return accuracy


def build_models(args, image_shape, num_classes):
    channels, image_size = image_shape[0], image_shape[-1]
    num_classes = conditional_classes(num_classes)
    G = Generator(args.latent_dim, image_size, channels, args.width, num_classes, args.shared_dim, args.hier,
                  args.attention)
    D = Discriminator(image_size, channels, args.width, num_classes, args.attention)
    return G, D


def make_optimizers(args, G, D):
    """Adam with beta1 = 0 (BigGAN, SAGAN): no momentum, so neither player keeps moving on a stale direction of the
    other; beta2 0.999. G's and D's rates are separate flags, 1:1 by default (the authors' CIFAR-10 run)."""
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.0, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.999))
    return opt_g, opt_d


@torch.no_grad()
def generate_images(G, labels, latent_dim, device, seed, truncation=None, batch_size=500):
    """len(labels) images as uint8 [n, C, H, W], made in batches by G in eval mode (BatchNorm uses its running
    averages), z truncated at truncation (None: not). labels: int64 [n] on the CPU; only conditional models read it."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    conditional = G.num_classes > 0
    images = [data.to_uint8(G(sample_z(len(chunk), latent_dim, truncation, noise).to(device),
                              chunk.to(device) if conditional else None)).cpu()
              for chunk in labels.split(batch_size)]
    return torch.cat(images)


def generate(args):
    checkpoint = load_checkpoint(args.out)
    saved = argparse.Namespace(**checkpoint["args"])
    classes = checkpoint["classes"]
    G, _ = build_models(saved, checkpoint["image_shape"], len(classes))
    data.restore(G, checkpoint["generator_average"], checkpoint, "generator")
    num_classes = conditional_classes(len(classes))
    if args.label is not None and not 0 <= args.label < num_classes:
        raise UsageError(f"--label {args.label}: the model is " + (
            f"conditional on classes 0..{num_classes - 1}" if num_classes else "not conditional"))
    labels = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    labels = labels % max(num_classes, 1)  # without --label: classes in turn
    G = G.to(args.device)
    data.save_samples(args.out, generate_images(G, labels, saved.latent_dim, args.device, args.seed, args.truncation),
                      labels if num_classes else None)
    # Beside samples.png: the same grid of classes at a low truncation, where G draws its most typical images.
    grid_labels = torch.arange(num_classes).repeat_interleave(10) if num_classes else torch.zeros(100, dtype=torch.long)
    path = os.path.join(args.out, f"samples_truncation_{LOW_TRUNCATION}.png")
    try:
        data.save_grid(generate_images(G, grid_labels, saved.latent_dim, args.device, args.seed, LOW_TRUNCATION),
                       path, nrow=10)
    except OSError as e:
        raise data.DataError(f"cannot write {path} ({e.strerror or e})") from None


def default_size(args):
    """32x32 for the 28x28 named datasets (a power of two keeps the up/down-sampling exact), 64 for a folder."""
    return 32 if args.dataset in data.DATASETS else 64


MODEL_SETTINGS = ("image_size", "width", "latent_dim", "shared_dim", "hier", "attention")  # what the weights fit
RESUME_SETTINGS = ("preset", *MODEL_SETTINGS, "batch_size", "lr", "lr_g", "seed", "average_decay", "d_steps",
                   "ortho_beta", "truncation", "train_images", "augment", "augment_policy", "ada_target")  # kept

# --preset: "cpu" is the defaults below (a good Fashion-MNIST grid in ~18 minutes on 2 CPU cores). "paper" is the
# authors' CIFAR-10 run, BigGAN-PyTorch's scripts/launch_cifar_ema.sh (the paper's appendix gives the ImageNet
# models in detail, the CIFAR-10 one only in outline), for a GPU. What it keeps from the defaults is that script's
# too: lr 2e-4 for G and D, Adam (0, 0.999), N(0, 0.02) init, hinge loss, spectral norm in G and D. Its EMA starts
# after 1,000 iterations; here the decay is ramped up from the first step instead (update_average).
PRESETS = {
    "cpu": {},
    "paper": {
        "image_size": 32,  # CIFAR-10
        "width": 256,  # --G_ch 256 --D_ch 256: G 4.3M, D 4.2M parameters
        "latent_dim": 128,  # dim_z 128 (the script's default)
        "shared_dim": 0,  # no --G_shared: each BatchNorm has its own class embedding
        "hier": False,  # no --hier: all of z enters the first layer
        "attention": 0,  # --G_attn 0 --D_attn 0
        "ortho_beta": 0.0,  # no --G_ortho
        "batch_size": 50,  # --batch_size 50
        "d_steps": 4,  # --num_D_steps 4
        "average_decay": 0.9999,  # --ema --ema_decay 0.9999
    },
}
POWER_OF_TWO = (lambda value: value >= 32 and not value & (value - 1), "must be a power of two, at least 32")


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help=(
        "cpu (default): the defaults below; paper: the authors' CIFAR-10 run (BigGAN-PyTorch launch_cifar_ema.sh), "
        "for a GPU: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["paper"].items())
        + "; flags given win"))
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    # About 0.5 s per step of 64 at these defaults on 2 CPU cores (G and D 2x dcgan.py's cost at its width 64): two
    # epochs of Fashion-MNIST, 1,876 steps, fit in ~18 minutes.
    p.add_argument("--epochs", type=int, default=2, help="total passes over the training set (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="images per D step, over all processes (default 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of D (default 2e-4)")
    p.add_argument("--lr-g", type=float, default=2e-4, help="Adam learning rate of G (default 2e-4)")
    p.add_argument("--latent-dim", type=int, default=80, help="size of z (default 80: with --hier at 32x32, 4 "
                                                              "chunks of 20)")
    p.add_argument("--image-size", type=int, help="side of the square images, a power of two >= 32 "
                                                  "(default 32 for mnist/fashion-mnist, 64 for a folder)")
    p.add_argument("--width", type=int, default=32, help="channels of every block of G and D (default 32; "
                                                            "the authors' CIFAR-10 model: 256)")
    p.add_argument("--shared-dim", type=int, default=128, help="size of G's class embedding shared by all its "
                                                               "BatchNorms (default 128; 0: one per BatchNorm)")
    p.add_argument("--hier", action=argparse.BooleanOptionalAction, default=True,
                   help="hierarchical z: a chunk of z for each block's BatchNorms (default on; --no-hier: off)")
    p.add_argument("--attention", type=int, default=16, help="resolution of the self-attention block in G and D, "
                                                             "8 .. image size / 2 (default 16; 0: none)")
    p.add_argument("--ortho-beta", type=float, default=1e-4, help="weight beta of the orthogonal regularisation of "
                                                                  "G's weights (default 1e-4; 0: off)")
    p.add_argument("--d-steps", type=int, default=1, help="D steps per G step, each on its own batch (default 1)")
    p.add_argument("--truncation", type=float, metavar="T", help="grids and --generate: z drawn from N(0, I) "
                                                                 "truncated to [-T, T] (default: not truncated; "
                                                                 "0: z = 0, one image per class)")
    p.add_argument("--average-decay", type=float, default=0.999,
                   help="decay of the moving average of G's weights that samples are drawn from (default 0.999)")
    add_augment_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "biggan"), help="the run's folder (default runs/biggan)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=int, metavar="K", help="with --generate on a conditional model: only class K")
    p.add_argument("--fid", type=int, metavar="N", help="after training, FID of N generated vs the real images")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision: float16 + loss scaling on CUDA, bfloat16 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA: G's BatchNorm statistics over the "
                                                          "global batch (default: each process's own share)")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # the preset's values, under the flags given
    args = p.parse_args(argv)
    check_args(args, {"epochs": at_least(1), "batch_size": at_least(1), "latent_dim": at_least(1),
                      "width": at_least(1), "log_every": at_least(1), "generate": at_least(1), "fid": at_least(2),
                      "seed": SEED, "lr": POSITIVE, "lr_g": POSITIVE, "average_decay": DECAY,
                      "shared_dim": at_least(0), "d_steps": at_least(1), "ortho_beta": NON_NEGATIVE,
                      "truncation": NON_NEGATIVE, "image_size": POWER_OF_TWO,
                      "train_images": at_least(1), "ada_target": OPEN_UNIT})
    size = args.image_size or default_size(args)
    if args.attention and not (8 <= args.attention <= size // 2 and not args.attention & (args.attention - 1)):
        raise UsageError(f"--attention {args.attention}: 0 or a power of two from 8 to half the image size ({size})")
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
