"""DCGAN (Radford et al. 2016, arXiv:1511.06434): convolutional generator and discriminator, non-saturating loss.

    python dcgan.py --dataset fashion-mnist --epochs 5                # 32x32 grids, GIF, metrics in runs/dcgan/
    python dcgan.py --dataset fashion-mnist --conditional --out runs/dcgan-cond   # one row per class in the grids
    python dcgan.py --dataset faces/ --conditional --out runs/faces   # a folder (one sub-folder per class), 64x64
    python dcgan.py --out runs/dcgan-cond --generate 1000 --label 3   # 1000 dresses into samples.npz/.png
    python dcgan.py --preset paper --dataset faces/ --device cuda     # the paper's 64x64 model and settings
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

import data

# Copied from gan.SCRIPT
SCRIPT = os.path.basename(__file__)


class Generator(nn.Module):
    """z (and a class) -> image in [-1, 1]: a 4x4 map, then one stride-2 transposed convolution per doubling.

    Kernel 4 with stride 2 covers every output pixel equally often, which avoids checkerboard artefacts."""

    def __init__(self, latent_dim, image_size, channels, width, num_classes=0, label_dim=16):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, label_dim) if num_classes else None
        in_dim = latent_dim + (label_dim if num_classes else 0)
        width_at = [width * image_size // (8 * 2 ** i) for i in range(image_size.bit_length() - 3)]  # 4x4, 8x8, ...
        layers = [nn.ConvTranspose2d(in_dim, width_at[0], kernel_size=4, stride=1, padding=0, bias=False),
                  nn.BatchNorm2d(width_at[0], momentum=0.1), nn.ReLU()]  # (B, 4w, 4, 4) at 32x32
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, 8, 8), (B, w, 16, 16) at 32x32
            layers += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out, momentum=0.1), nn.ReLU()]
        layers += [nn.ConvTranspose2d(width_at[-1], channels, kernel_size=4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)  # (B, C, 32, 32): no BatchNorm on the output (DCGAN rule)

    def forward(self, z, labels=None):  # (B, latent_dim), (B,) -> (B, C, S, S)
        if self.label_embedding is not None:
            z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """Image (and a class) -> one logit: stride-2 convolutions down to 4x4 (no pooling), then a 4x4 convolution.

    Conditional: a projection term (Miyato & Koyama 2018) adds <embed(y), features> to the logit, i.e. each class
    gets its own last layer on top of shared features. Cheaper than feeding one label map per class as extra input
    channels, and it pushes D to judge "is this a good image *of class y*", which keeps samples on their class."""

    def __init__(self, image_size, channels, width, num_classes=0):
        super().__init__()
        width_at = [width * 2 ** i for i in range(image_size.bit_length() - 3)]  # 16x16, 8x8, 4x4 at 32x32
        layers = [nn.Conv2d(channels, width_at[0], kernel_size=4, stride=2, padding=1),  # (B, w, 16, 16)
                  nn.LeakyReLU(0.2)]  # no BatchNorm on the input layer (DCGAN rule)
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, 8, 8), (B, 4w, 4, 4) at 32x32
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out, momentum=0.1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())  # (B, 4w * 4 * 4)
        self.logit = nn.Linear(width_at[-1] * 16, 1)  # = a 4x4 convolution to one channel
        self.projection = nn.Embedding(num_classes, width_at[-1] * 16) if num_classes else None
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, mean=0.0, std=0.02)  # starts as small as the other weights

    def forward(self, images, labels=None):  # (B, C, S, S), (B,) -> (B,)
        h = self.features(images)
        logits = self.logit(h).squeeze(1)
        if self.projection is not None:
            logits = logits + (self.projection(labels) * h).sum(dim=1)
        return logits


def init_weights(module):
    """DCGAN init: every conv weight from N(0, 0.02); BatchNorm scale from N(1, 0.02), shift 0.
    G's label embedding keeps its N(0, 1) init, the same scale as z, so the class is not drowned out."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, mean=1.0, std=0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: gan.py's losses, an optional R1 penalty, and the alternating update

# Copied from gan.d_loss
def d_loss(real_logits, fake_logits):
    """Binary cross-entropy: real images are labelled 1, generated ones 0 (non-saturating and minimax GANs)."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


# Copied from gan.g_loss
def g_loss(fake_logits):
    """Non-saturating loss -log D(G(z)): the strongest gradient when D rejects the fakes (see g_loss_minimax)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# Copied from gan.g_loss_minimax
def g_loss_minimax(fake_logits):
    """Goodfellow et al.'s minimax form: G minimises log(1 - D(G(z))) = -softplus(logit). Its gradient with respect
    to the logit is -sigmoid(logit): almost nothing when D rejects a fake with confidence (the saturation)."""
    return -F.softplus(fake_logits.float()).mean()


# Copied from gan.d_loss_lsgan
def d_loss_lsgan(real_outputs, fake_outputs):
    """Least squares (Mao et al. 2017, a=0, b=1): D pulls its raw output to 1 on reals and 0 on fakes."""
    return 0.5 * ((real_outputs.float() - 1) ** 2).mean() + 0.5 * (fake_outputs.float() ** 2).mean()


# Copied from gan.g_loss_lsgan
def g_loss_lsgan(fake_outputs):
    """Least squares, c=1: G pulls D's output on its fakes to the value D gives reals."""
    return 0.5 * ((fake_outputs.float() - 1) ** 2).mean()


# Copied from gan.d_loss_hinge
def d_loss_hinge(real_outputs, fake_outputs):
    """Hinge (Lim & Ye 2017): only samples inside the margin, D(x) < 1 or D(G(z)) > -1, push D."""
    return F.relu(1 - real_outputs.float()).mean() + F.relu(1 + fake_outputs.float()).mean()


# Copied from gan.g_loss_hinge
def g_loss_hinge(fake_outputs):
    """Hinge GAN's generator raises D's raw output on its fakes, without a margin."""
    return -fake_outputs.float().mean()


# Copied from gan.LOSSES
LOSSES = {
    "non-saturating": (d_loss, g_loss, 0.0),
    "minimax": (d_loss, g_loss_minimax, 0.0),
    "lsgan": (d_loss_lsgan, g_loss_lsgan, 0.5),
    "hinge": (d_loss_hinge, g_loss_hinge, 0.0),
}
# Copied from gan.LOGIT_LOSSES
LOGIT_LOSSES = ("non-saturating", "minimax")  # D's output is a logit: the log shows sigmoid(D), a probability


# Copied from gan.metric_names
def metric_names(loss):
    """metrics.csv's per-step columns: D's mean output on reals and fakes is a probability only for the BCE pair."""
    outputs = ["d_real", "d_fake"] if loss in LOGIT_LOSSES else ["d_real_output", "d_fake_output"]
    return ["d_loss", "g_loss", *outputs]


def r1_penalty(D, real, labels=None, augment=None):
    """R1 (Mescheder et al. 2018): E[||grad_x D(x)||^2] on real images. Penalising D's slope at the data keeps it from
    sharpening without bound around the training images, which is how D runs away from G; it leaves the loss's
    optimum where it was (a zero-centred penalty, unlike WGAN-GP's). create_graph: D's update follows its gradient.
    With --augment, D sees augment(x) and the gradient is taken through the augmentation, at the un-augmented x."""
    real = real.detach().requires_grad_(True)
    (grads,) = torch.autograd.grad(D(augment(real) if augment else real, labels).float().sum(), real,
                                   create_graph=True)
    return grads.float().flatten(1).pow(2).sum(1).mean()


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler, loss="non-saturating", r1_gamma=0.0,
               augment=None):
    """One D update, then one G update against the D just improved. labels is None for unconditional models.
    r1_gamma > 0 adds gamma/2 times the R1 penalty to D's loss. augment (--augment; None: off) is a data.Augmentation:
    every image D sees, real or fake, in both updates, goes through it, each call with fresh random draws; G learns
    through it, since it is differentiable. ADA's p then moves by what D said of the (augmented) reals."""
    d_loss_fn, g_loss_fn, threshold = LOSSES[loss]
    shown = augment or (lambda images: images)  # what D is shown of an image
    z = torch.randn(len(real), latent_dim, device=real.device)
    with autocast(real.device, scaler):
        fake = G(z, labels)
        # Discriminator: fake is detached so this loss does not reach into G.
        real_logits, fake_logits = D(shown(real), labels), D(shown(fake.detach()), labels)
        loss_d = d_loss_fn(real_logits, fake_logits)
        if r1_gamma:
            loss_d = loss_d + r1_gamma / 2 * r1_penalty(D, real, labels, augment)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:
        augment.observe(real_logits.detach().float() - threshold)

    # Generator: the same fake batch, scored again by the updated D. D's weights are frozen meanwhile, so the
    # backward pass computes only what G needs (gradients flow through D to the image, not into D's weights).
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        loss_g = g_loss_fn(D(shown(fake), labels))
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)

    real_out, fake_out = real_logits.detach().float(), fake_logits.detach().float()
    if loss in LOGIT_LOSSES:
        real_out, fake_out = torch.sigmoid(real_out), torch.sigmoid(fake_out)
    # Returned as tensors on the device: reading them (.item()) would force a sync every step.
    return torch.stack([loss_d.detach().float(), loss_g.detach().float(), real_out.mean(), fake_out.mean()])


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
    opt_g, opt_d = make_optimizers(args, G, D)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}
    augmentation = data.make_augmentation(args.augment, args.augment_policy, dataset.image_shape[0], device,
                                          args.ada_target)
    if augmentation:  # ADA's p and its accumulators, restored by --resume
        parts["augment"] = augmentation
    start_epoch = data.resume(checkpoint, parts, device) if checkpoint else 0
    # --compile: the compiled modules share their parameters with G and D, which are what gets saved. With R1, D stays
    # eager: the penalty differentiates through it twice, which torch.compile does not support.
    G_fast, D_fast = (torch.compile(G), D if args.r1_gamma else torch.compile(D)) if args.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    scaler.amp = args.amp

    history = data.read_metrics(os.path.join(args.out, "metrics.csv"), start_epoch) if rank == 0 else []
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    num_classes = dataset.num_classes if args.conditional else 0
    names = metric_names(args.loss)
    # The grid: one row per class for a conditional model, the same noise down each column (one z, every class).
    columns = 10 if num_classes else 100
    grid_classes = torch.arange(num_classes, device=device).repeat_interleave(columns) if num_classes else None
    grid_noise = torch.randn(columns, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    grid_noise = grid_noise.repeat(max(num_classes, 1), 1).to(device)
    real_sets = {"d_acc_real_train": (batches.images, batches.labels),  # D's accuracy on up to 1,000 of each
                 "d_acc_real_test": (held_out.images.to(device), held_out.labels.to(device)) if held_out else None}
    if rank == 0:
        print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source}, {len(batches)} steps per "
              f"epoch, device {device}" + (f" x {world_size} processes" if world_size > 1 else "") +
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
                                 args.latent_dim, scaler, args.loss, args.r1_gamma, augmentation)
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
                    outputs = "D(x) {:.2f} D(G(z)) {:.2f}" if args.loss in LOGIT_LOSSES else "D out {:.2f} / {:.2f}"
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | d_loss {means[0]:.3f} "
                          f"g_loss {means[1]:.3f} | {outputs.format(*means[2:])} | {seen / elapsed:.0f} img/s | "
                          f"{steps_left * elapsed / i / 60:.1f} min left ",
                          end="\r" if sys.stdout.isatty() else "\n", flush=True)
        if world_size > 1 and not replicas_agree(G, D):
            raise FloatingPointError(f"the processes' weights differ at the end of epoch {epoch}")
        if rank > 0:
            continue
        if sys.stdout.isatty():
            print()
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, real_sets, args.latent_dim, num_classes, LOSSES[args.loss][2])
        print(f"epoch {epoch}: D calls real {accuracy['d_acc_real_train']} of training images, "
              f"{accuracy['d_acc_real_test'] or '-'} of held-out ones; calls fake {accuracy['d_acc_fake']} of fakes")
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}",
                        "augment_p": data.augment_p(augmentation)})
        with torch.no_grad():
            grid = G_average.eval()(grid_noise, grid_classes)
        curves = ("d_loss", "g_loss") + (("augment_p",) if args.augment == "ada" else ())
        data.save_epoch(args.out, epoch, history, curves, grid, {
            "script": SCRIPT, **{key: part.state_dict() for key, part in parts.items()}, "epoch": epoch,
            "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            **data.random_states(device)})

    if args.fid and rank == 0:
        labels = torch.arange(args.fid) % dataset.num_classes  # every class equally often, like the grid
        data.report_fid(lambda: generate_images(G_average, labels, args.latent_dim, device, seed=args.seed + 1),
                        dataset, device)


@torch.no_grad()
def d_accuracy(D, G, real_sets, latent_dim, num_classes, threshold, n=1000):
    """How often D is right, in eval mode: the share of each set of real images it calls real (output > threshold),
    and of n fresh fakes from the raw generator (not its average, which D never saw) that it calls fake. A training
    share that pulls away from the held-out share means D is memorising the training images (Karras et al. 2020).
    real_sets: name -> (uint8 images, labels) on the device, or None where there is no such set."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    accuracy = {}
    for name, images_and_labels in real_sets.items():
        if images_and_labels is None:
            accuracy[name] = ""  # a folder has no held-out split
            continue
        images, labels = images_and_labels
        logits = torch.cat([D(data.to_float(chunk), classes if num_classes else None)
                            for chunk, classes in zip(images[:n].split(250), labels[:n].split(250))])
        accuracy[name] = f"{(logits > threshold).float().mean().item():.4f}"
    fake_logits = []
    for chunk in torch.randint(max(num_classes, 1), (n,), device=device).split(250):
        classes = chunk if num_classes else None
        fake_logits.append(D(G(torch.randn(len(chunk), latent_dim, device=device), classes), classes))
    accuracy["d_acc_fake"] = f"{(torch.cat(fake_logits) <= threshold).float().mean().item():.4f}"
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


def make_optimizers(args, G, D):
    """Adam with beta1 = 0.5 (DCGAN's setting): the default 0.9 makes the two players' momentum overshoot. G's rate is
    its own flag: with --lr-g 1e-3 (InfoGAN's authors' rate for G) G keeps up with D for longer."""
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    return opt_g, opt_d


@torch.no_grad()
def generate_images(G, labels, latent_dim, device, seed, batch_size=500):
    """len(labels) images as uint8 [n, C, H, W], made in batches by G in eval mode (BatchNorm uses its running
    averages). labels: int64 [n] on the CPU; only conditional models read it."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    conditional = G.label_embedding is not None
    images = [data.to_uint8(G(torch.randn(len(chunk), latent_dim, generator=noise).to(device),
                              chunk.to(device) if conditional else None)).cpu()
              for chunk in labels.split(batch_size)]
    return torch.cat(images)


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
    data.save_samples(args.out, generate_images(G.to(args.device), labels, saved.latent_dim, args.device,
                                                seed=args.seed), labels if saved.conditional else None)


def default_size(args):
    """32x32 for the 28x28 named datasets (a power of two keeps the up/down-sampling exact), 64 for a folder."""
    return 32 if args.dataset in data.DATASETS else 64


MODEL_SETTINGS = ("image_size", "width", "latent_dim", "conditional", "loss")  # what the weights were made for
RESUME_SETTINGS = ("preset", *MODEL_SETTINGS, "batch_size", "lr", "lr_g", "seed", "average_decay", "r1_gamma",
                   "train_images", "augment", "augment_policy", "ada_target")  # what --resume keeps

# --preset: "cpu" is the defaults below (a recognisable grid in minutes on a laptop CPU). "paper" is Radford et al.'s
# LSUN/faces model at its size, for a GPU; what it keeps from the defaults is the paper's too: BatchNorm in G and D
# (not on G's output or D's input), ReLU/LeakyReLU 0.2, N(0, 0.02) init, Adam betas (0.5, 0.999), the non-saturating
# loss, no R1. Flags given on the command line win over the preset.
PRESETS = {
    "cpu": {},
    "paper": {
        "image_size": 64,  # 64x64 images (section 4; Figure 1)
        "width": 128,  # G: 1024, 512, 256, 128 channels at 4..32 px (Figure 1); D mirrors it (authors' code, ndf 128)
        "latent_dim": 100,  # a 100-d z (Figure 1)
        "batch_size": 128,  # mini-batch SGD with batches of 128 (section 4)
        "lr": 2e-4,  # Adam at lr 0.0002, beta1 0.5 (section 4), for D
        "lr_g": 2e-4,  # and for G
        "average_decay": 0.0,  # samples from G's own weights: the paper keeps no moving average (0 = a plain copy)
    },
}
POWER_OF_TWO = (lambda value: value >= 32 and not value & (value - 1), "must be a power of two, at least 32")


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help=(
        "cpu (default): the defaults below; paper: Radford et al.'s architecture and settings, for a GPU: "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["paper"].items()) + "; flags given win"))
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=int, default=5, help="total passes over the training set (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, over all processes (default 64)")
    # Unconditional, --width 32 --lr-g 1e-3 gave score.py's feature FID 44.2 on Fashion-MNIST in 10 minutes on 2 cores
    # (these defaults: 52.6), but with --conditional 55.0 (these defaults: 30.8): docs/cpu-training.md.
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of D (default 2e-4)")
    p.add_argument("--lr-g", type=float, default=2e-4, help="Adam learning rate of G (default 2e-4)")
    p.add_argument("--latent-dim", type=int, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=int, help="side of the square images, a power of two >= 32 "
                                                  "(default 32 for mnist/fashion-mnist, 64 for a folder)")
    p.add_argument("--width", type=int, default=64, help="channels of G's last and D's first layer; they double "
                                                         "per halving of the resolution (default 64; 32 is 3x "
                                                         "faster on a CPU)")
    p.add_argument("--conditional", action="store_true", help="condition G and D on the class label")
    p.add_argument("--loss", default="non-saturating", choices=list(LOSSES), metavar="LOSS", help=(
        "the GAN loss (default non-saturating). non-saturating: G minimises -log D(G(z)); "
        "minimax: G minimises log(1 - D(G(z))), Goodfellow et al.'s original; "
        "lsgan: least squares on D's raw output (Mao et al.); "
        "hinge: D minimises relu(1 - D(x)) + relu(1 + D(G(z))), G maximises D(G(z)) (Lim & Ye)"))
    p.add_argument("--r1-gamma", type=float, default=0.0, help="weight of the R1 penalty on D's gradient at real "
                                                               "images, gamma/2 * E||grad D(x)||^2 (default 0: off)")
    p.add_argument("--average-decay", type=float, default=0.999,
                   help="decay of the moving average of G's weights that samples are drawn from (default 0.999)")
    add_augment_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "dcgan"), help="the run's folder (default runs/dcgan)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=int, metavar="K", help="with --generate on a conditional model: only class K")
    p.add_argument("--fid", type=int, metavar="N", help="after training, FID of N generated vs the real images")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision: float16 + loss scaling on CUDA, bfloat16 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA: BatchNorm statistics over the "
                                                          "global batch (default: each process's own share)")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # the preset's values, under the flags given
    args = p.parse_args(argv)
    check_args(args, {"epochs": at_least(1), "batch_size": at_least(1), "latent_dim": at_least(1),
                      "width": at_least(1), "log_every": at_least(1), "generate": at_least(1), "fid": at_least(2),
                      "seed": SEED, "lr": POSITIVE, "lr_g": POSITIVE, "r1_gamma": NON_NEGATIVE, "average_decay": DECAY,
                      "image_size": POWER_OF_TWO,
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
