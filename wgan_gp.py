"""WGAN-GP (Gulrajani et al. 2017, arXiv:1704.00028): Wasserstein critic kept 1-Lipschitz by a gradient penalty.

    python wgan_gp.py --epochs 20                                    # MNIST 32x32; grids, GIF, metrics in runs/wgan_gp/
    python wgan_gp.py --dataset fashion-mnist --conditional --out runs/wgan_gp-cond   # one row per class in the grids
    python wgan_gp.py --generate 1000                                # runs/wgan_gp/samples.npz and samples.png
    python wgan_gp.py --preset paper --device cuda                   # the paper's CIFAR-10 model and settings

Watch the Wasserstein estimate (column `wasserstein` of metrics.csv, drawn in losses.png): it falls as the samples
improve and then settles. The losses themselves are not comparable between runs.
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
        self.net = nn.Sequential(*layers)  # (B, C, 32, 32): no BatchNorm on the output

    def forward(self, z, labels=None):  # (B, latent_dim), (B,) -> (B, C, S, S)
        if self.label_embedding is not None:
            z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.net(z[:, :, None, None])


class Critic(nn.Module):
    """Image (and a class) -> one unbounded score: stride-2 convolutions down to 4x4, then a 4x4 convolution.

    No sigmoid: the score estimates the Wasserstein distance, not a probability. No BatchNorm either: it mixes the
    samples of a batch, and the gradient penalty is a per-sample promise; layer normalization (one group over
    channels and pixels of each image) is the paper's replacement.
    Conditional: a projection term (Miyato & Koyama 2018) adds <embed(y), features> to the score, i.e. each class
    gets its own last layer on top of shared features. Cheaper than feeding one label map per class as extra input
    channels, and the critic then scores "a good image *of class y*", which keeps samples on their class."""

    def __init__(self, image_size, channels, width, num_classes=0):
        super().__init__()
        width_at = [width * 2 ** i for i in range(image_size.bit_length() - 3)]  # 16x16, 8x8, 4x4 at 32x32
        layers = [nn.Conv2d(channels, width_at[0], kernel_size=4, stride=2, padding=1),  # (B, w, 16, 16)
                  nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, 8, 8), (B, 4w, 4, 4) at 32x32
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                       nn.GroupNorm(num_groups=1, num_channels=c_out, eps=1e-5), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())  # (B, 4w * 4 * 4)
        self.score = nn.Linear(width_at[-1] * 16, 1)  # = a 4x4 convolution to one channel
        self.projection = nn.Embedding(num_classes, width_at[-1] * 16) if num_classes else None
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, mean=0.0, std=0.02)  # starts as small as the other weights

    def forward(self, images, labels=None):  # (B, C, S, S), (B,) -> (B,)
        h = self.features(images)
        scores = self.score(h).squeeze(1)
        if self.projection is not None:
            scores = scores + (self.projection(labels) * h).sum(dim=1)
        return scores


def init_weights(module):
    """DCGAN's init, as in dcgan.py: every conv weight from N(0, 0.02); BatchNorm scale from N(1, 0.02), shift 0.
    G's label embedding keeps its N(0, 1) init, the same scale as z, so the class is not drowned out."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, mean=1.0, std=0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: critic loss, gradient penalty, generator loss and the n_critic:1 update

def critic_loss(real_scores, fake_scores):
    """The critic maximises E[D(real)] - E[D(fake)], the Wasserstein estimate; as a loss, its negative."""
    return fake_scores.mean() - real_scores.mean()


def gradient_penalty(D, real, fake, labels=None):
    """E[(||grad_x D(x)||_2 - 1)^2] at random points x between real and fake images (one point per pair).

    The norm is per sample, over all channels and pixels. create_graph=True keeps the gradient itself
    differentiable, so that the critic's update can follow the penalty's gradient (a second-order derivative)."""
    alpha = torch.rand(len(real), 1, 1, 1, device=real.device)
    between = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    scores = D(between, labels)
    # sum: each sample's own gradient, at full size (a mean would shrink it by 1/B, toward float16's underflow;
    # the gradient of a near-1-Lipschitz critic is of order 1, so it needs no loss scaling under --amp).
    (grads,) = torch.autograd.grad(scores.sum(), between, create_graph=True)
    return ((grads.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def g_loss(fake_scores):
    """The generator maximises the critic's score of its samples."""
    return -fake_scores.mean()


def clip_weights(D, clip_value):
    """WGAN as first published (Arjovsky et al. 2017): keep the critic Lipschitz by clamping every weight to
    [-c, c] after each update. Crude, as the WGAN-GP paper shows: the critic drifts toward the clip limits."""
    with torch.no_grad():
        for p in D.parameters():
            p.clamp_(-clip_value, clip_value)


def train_step(G, D, opt_g, opt_d, real_batches, label_batches, latent_dim, gp_weight, scaler, clip_value=None,
               augment=None):
    """n_critic critic updates, one per real batch given, then one generator update (Algorithm 1 of the paper).

    label_batches holds None per batch for unconditional models. clip_value: weight clipping instead of the
    gradient penalty (--lipschitz clip). augment (--augment; None: off) is a data.Augmentation: every image the
    critic sees, real or fake, in both updates, goes through it with fresh random draws, and the penalty is taken
    between the augmented images, the ones the critic is asked to be 1-Lipschitz on. A critic has no real/fake
    threshold: ADA's sign(D(x)) is taken against the mean score of the same step's fakes."""
    shown = augment or (lambda images: images)  # what the critic is shown of an image
    totals = torch.zeros(3, device=real_batches[0].device)
    for real, labels in zip(real_batches, label_batches):
        with autocast(real.device, scaler):
            # Critic: fake made without a graph, this loss must not reach into G (it would only waste a backward).
            with torch.no_grad():
                fake = G(torch.randn(len(real), latent_dim, device=real.device), labels)
            real_shown, fake_shown = shown(real), shown(fake)
            real_scores, fake_scores = D(real_shown, labels), D(fake_shown, labels)
            penalty = (gradient_penalty(D, real_shown, fake_shown, labels) if clip_value is None
                       else torch.zeros((), device=real.device))  # weight clipping instead
            loss_d = critic_loss(real_scores, fake_scores) + gp_weight * penalty
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        average_gradients(D)
        scaler.step(opt_d)
        scaler.update()
        if clip_value is not None:
            clip_weights(D, clip_value)
        if augment:
            augment.observe(real_scores.detach().float() - fake_scores.detach().float().mean())
        totals += torch.stack([loss_d.detach(), (real_scores.mean() - fake_scores.mean()).detach(),
                               penalty.detach()]).float()

    # Generator: a fresh batch (with the last batch's labels, so classes come as often as in the data). The critic's
    # weights are frozen meanwhile: the backward pass computes only what G needs.
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        loss_g = g_loss(D(shown(G(torch.randn(len(real), latent_dim, device=real.device), labels)), labels))
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)

    # Returned as tensors on the device: reading them (.item()) would force a sync every step.
    means = totals / len(real_batches)
    return torch.stack([means[0], loss_g.detach().float(), means[1], means[2]])


# Copied from gan.update_average
@torch.no_grad()
def update_average(G_average, G, step, decay):
    """Exponential moving average of G's weights, the decay ramped up over the first steps (why: gan.py)."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm running statistics
        average.copy_(current)


METRICS = ["d_loss", "g_loss", "wasserstein", "gradient_penalty"]  # wasserstein = E[D(real)] - E[D(fake)]



@torch.no_grad()
def critic_scores(D, G, real_sets, latent_dim, num_classes, n=1000):
    """The critic's mean score, in eval mode, on each set of real images and on n fresh fakes from the raw generator.
    A critic has no real/fake threshold, so the scores themselves are the figures: a training-set score that pulls
    away from the held-out one means the critic is memorising the training images (Karras et al. 2020).
    real_sets: name -> (uint8 images, labels) on the device, or None where there is no such set."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    scores = {}
    for name, images_and_labels in real_sets.items():
        if images_and_labels is None:
            scores[name] = ""  # a folder has no held-out split
            continue
        images, labels = images_and_labels
        values = torch.cat([D(data.to_float(chunk), classes if num_classes else None)
                            for chunk, classes in zip(images[:n].split(250), labels[:n].split(250))])
        scores[name] = f"{values.mean().item():.4f}"
    fake_scores = []
    for chunk in torch.randint(max(num_classes, 1), (n,), device=device).split(250):
        classes = chunk if num_classes else None
        fake_scores.append(D(G(torch.randn(len(chunk), latent_dim, device=device), classes), classes))
    scores["critic_fake"] = f"{torch.cat(fake_scores).mean().item():.4f}"
    D.train(), G.train()
    return scores


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
    # --compile: the compiled module shares its parameters with G, which is what gets saved. The critic stays eager:
    # the gradient penalty differentiates through it twice, which torch.compile does not support.
    G_fast, D_fast = (torch.compile(G), D) if args.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    scaler.amp = args.amp

    history = data.read_metrics(os.path.join(args.out, "metrics.csv"), start_epoch) if rank == 0 else []
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    num_classes = dataset.num_classes if args.conditional else 0
    names = METRICS
    clip_value = args.clip_value if args.lipschitz == "clip" else None
    steps = -(-len(batches) // args.n_critic)  # generator steps per epoch; the last may follow fewer critic steps
    # The grid: one row per class for a conditional model, the same noise down each column (one z, every class).
    columns = 10 if num_classes else 100
    grid_classes = torch.arange(num_classes, device=device).repeat_interleave(columns) if num_classes else None
    grid_noise = torch.randn(columns, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    grid_noise = grid_noise.repeat(max(num_classes, 1), 1).to(device)
    real_sets = {"critic_real_train": (batches.images, batches.labels),  # the critic's mean score on 1,000 of each
                 "critic_real_test": (held_out.images.to(device), held_out.labels.to(device)) if held_out else None}
    if rank == 0:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source}, {len(batches)} critic and "
              f"{steps} generator steps per epoch, device {device}{processes}, epochs {start_epoch + 1}..{args.epochs}")

    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process draws its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(hash((args.seed, rank, epoch)))
        started, seen = time.time(), 0
        totals = torch.zeros(len(names), device=device)
        for i, group in enumerate(critic_groups(batches.epoch(epoch), args.n_critic), 1):
            seen += sum(len(real) for real, _ in group)
            if world_size > 1:  # this process's share: disjoint slices of the same global batches
                group = [(real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank])
                         for real, labels in group]
            if device.type == "cuda":
                group = [(real.contiguous(memory_format=torch.channels_last), labels) for real, labels in group]
            real_batches = [real for real, _ in group]
            label_batches = [labels if num_classes else None for _, labels in group]
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real_batches, label_batches, args.latent_dim,
                                 args.gp_weight, scaler, clip_value, augmentation)
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
                    print(f"epoch {epoch}/{args.epochs} step {i}/{steps} | d_loss {means[0]:.3f} "
                          f"g_loss {means[1]:.3f} | wasserstein {means[2]:.3f} penalty {means[3]:.3f} | "
                          f"{seen / elapsed:.0f} img/s | {steps_left * elapsed / i / 60:.1f} min left ",
                          end="\r" if sys.stdout.isatty() else "\n", flush=True)
        if world_size > 1 and not replicas_agree(G, D):
            raise FloatingPointError(f"the processes' weights differ at the end of epoch {epoch}")
        if rank > 0:
            continue
        if sys.stdout.isatty():
            print()
        seconds = time.time() - started
        scores = critic_scores(D, G, real_sets, args.latent_dim, num_classes)
        print(f"epoch {epoch}: mean critic score {scores['critic_real_train']} on training images, "
              f"{scores['critic_real_test'] or '-'} on held-out ones, {scores['critic_fake']} on fakes")
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **scores,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}",
                        "augment_p": data.augment_p(augmentation)})
        with torch.no_grad():
            grid = G_average.eval()(grid_noise, grid_classes)
        curves = ("d_loss", "g_loss", "wasserstein") + (("augment_p",) if args.augment == "ada" else ())
        data.save_epoch(args.out, epoch, history, curves, grid, {
            "script": SCRIPT, **{key: part.state_dict() for key, part in parts.items()}, "epoch": epoch,
            "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            **data.random_states(device)})

    if args.fid and rank == 0:
        labels = torch.arange(args.fid) % dataset.num_classes  # every class equally often, like the grid
        data.report_fid(lambda: generate_images(G_average, labels, args.latent_dim, device, seed=args.seed + 1),
                        dataset, device)


def critic_groups(batches, n_critic):
    """Consecutive batches in lists of n_critic, one list per generator step (the last list may be shorter)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == n_critic:
            yield group
            group = []
    if group:
        yield group


def build_models(args, image_shape, num_classes):
    channels, image_size = image_shape[0], image_shape[-1]
    num_classes = num_classes if args.conditional else 0
    G = Generator(args.latent_dim, image_size, channels, args.width, num_classes)
    D = Critic(image_size, channels, args.width, num_classes)
    G.apply(init_weights)
    D.apply(init_weights)
    return G, D


def make_optimizers(args, G, D):
    """WGAN-GP: Adam with the paper's betas (0, 0.9), no momentum, which the critic's fast-moving target does not
    tolerate well. Weight clipping: RMSprop, as Arjovsky et al. found momentum-based optimizers unstable with it."""
    if args.lipschitz == "clip":
        return torch.optim.RMSprop(G.parameters(), lr=args.lr), torch.optim.RMSprop(D.parameters(), lr=args.lr)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.9))
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


MODEL_SETTINGS = ("image_size", "width", "latent_dim", "conditional", "lipschitz")  # what the weights were made for
RESUME_SETTINGS = ("preset", *MODEL_SETTINGS, "batch_size", "lr", "seed", "average_decay", "n_critic", "gp_weight",
                   "clip_value", "train_images", "augment", "augment_policy", "ada_target")  # what --resume keeps

# --preset: "cpu" is the defaults below (a recognisable grid in minutes on a laptop CPU). "paper" is Gulrajani et al.'s
# DCGAN-like CIFAR-10 model at its size, for a GPU; what it keeps from the defaults is the paper's too: lambda 10,
# Adam betas (0, 0.9) (Algorithm 1), BatchNorm in G and layer normalization in the critic (section 4:
# "we recommend layer normalization as a drop-in replacement"). Flags given on the command line win over the preset.
PRESETS = {
    "cpu": {},
    "paper": {
        "image_size": 32,  # CIFAR-10's 32x32 (section 5)
        "width": 128,  # G 512, 256, 128 channels at 4..16 px, the critic 128, 256, 512 (authors' gan_cifar.py, DIM 128)
        "latent_dim": 128,  # a 128-d z (authors' gan_cifar.py)
        "batch_size": 64,  # m = 64 (Algorithm 1)
        "n_critic": 5,  # n_critic = 5 (Algorithm 1)
        "lr": 1e-4,  # alpha = 0.0001 (Algorithm 1)
        "average_decay": 0.0,  # samples from G's own weights: the paper keeps no moving average (0 = a plain copy)
    },
}
POWER_OF_TWO = (lambda value: value >= 32 and not value & (value - 1), "must be a power of two, at least 32")


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help=(
        "cpu (default): the defaults below; paper: Gulrajani et al.'s architecture and settings, for a GPU: "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["paper"].items()) + "; flags given win"))
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=int, default=20, help="total passes over the training set (default 20)")
    # Batch 32, 2 critic steps per G step and lr 5e-4 (the paper: 64, 5 and 1e-4, --preset paper): 20 epochs of 10k
    # MNIST are 3,100 generator steps here against the paper's 200k, and the step count and size limit the samples.
    # At 7 epochs, score.py's feature FID was 112 with the old batch 8/5 steps/2e-4, 64 with 1 critic step, 63 with
    # 2 steps at 5e-4; 20 epochs of the new defaults gave 51.0 and 50.0 (two seeds; old defaults 72.7) in 8-10
    # minutes on 2 cores. Batch 32 also runs 1.5x more images per second than batch 8. docs/cpu-training.md.
    p.add_argument("--batch-size", type=int, default=32, help="images per critic step, over all processes "
                                                              "(default 32)")
    p.add_argument("--lr", type=float, help="learning rate of G and the critic (default 5e-4 for Adam with gp, "
                                            "5e-5 for RMSprop with clip, the WGAN paper's)")
    p.add_argument("--lipschitz", default="gp", choices=["gp", "clip"], help=(
        "how the critic is kept 1-Lipschitz (default gp). gp: gradient penalty, Adam (Gulrajani et al. 2017); "
        "clip: every critic weight clamped to [-c, c] after each step, RMSprop, no penalty (Arjovsky et al. 2017)"))
    p.add_argument("--n-critic", type=int, default=2, help="critic steps per generator step (default 2; the "
                                                           "paper's 5 with --preset paper)")
    p.add_argument("--gp-weight", type=float, default=10.0, help="lambda, weight of the gradient penalty "
                                                                 "(default 10)")
    p.add_argument("--clip-value", type=float, default=0.01, help="c of --lipschitz clip (default 0.01)")
    p.add_argument("--latent-dim", type=int, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=int, help="side of the square images, a power of two >= 32 "
                                                  "(default 32 for mnist/fashion-mnist, 64 for a folder)")
    p.add_argument("--width", type=int, default=32, help="channels of G's last and D's first layer; they double "
                                                         "per halving of the resolution (default 32; 64 on a GPU)")
    p.add_argument("--conditional", action="store_true", help="condition G and D on the class label")
    p.add_argument("--average-decay", type=float, default=0.999,
                   help="decay of the moving average of G's weights that samples are drawn from (default 0.999)")
    add_augment_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "wgan_gp"), help="the run's folder (default runs/wgan_gp)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=int, metavar="K", help="with --generate on a conditional model: only class K")
    p.add_argument("--fid", type=int, metavar="N", help="after training, FID of N generated vs the real images")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision: float16 + loss scaling on CUDA, bfloat16 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile G (pays off on GPUs)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA: BatchNorm statistics over the "
                                                          "global batch (default: each process's own share)")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # the preset's values, under the flags given
    args = p.parse_args(argv)
    check_args(args, {"epochs": at_least(1), "batch_size": at_least(1), "latent_dim": at_least(1),
                      "width": at_least(1), "log_every": at_least(1), "n_critic": at_least(1), "generate": at_least(1),
                      "fid": at_least(2), "seed": SEED, "lr": POSITIVE, "gp_weight": NON_NEGATIVE,
                      "clip_value": POSITIVE, "average_decay": DECAY, "image_size": POWER_OF_TWO,
                      "train_images": at_least(1), "ada_target": OPEN_UNIT})
    if args.label is not None and args.generate is None:
        raise UsageError(f"--label {args.label}: only with --generate N")
    if args.lr is None:
        args.lr = 5e-5 if args.lipschitz == "clip" else 5e-4
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
