"""Vanilla GAN (Goodfellow et al. 2014, arXiv:1406.2661): MLP generator and discriminator, non-saturating loss.

    python gan.py                                      # train on MNIST (60 epochs); grids, GIF, metrics in runs/gan/
    python gan.py --epochs 80 --resume                 # continue the same run up to epoch 80
    python gan.py --generate 1000                      # runs/gan/samples.npz and samples.png from the checkpoint
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

SCRIPT = os.path.basename(__file__)


class Generator(nn.Module):
    """z -> flattened image in [-1, 1]. BatchNorm keeps the hidden activations well scaled from the first step."""

    def __init__(self, latent_dim, image_shape, hidden=(256, 512, 1024)):
        super().__init__()
        self.image_shape = tuple(image_shape)
        layers, width = [], latent_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h, momentum=0.1), nn.LeakyReLU(0.2)]
            width = h
        layers += [nn.Linear(width, int(torch.tensor(image_shape).prod())), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # (B, latent_dim) -> (B, C, H, W)
        return self.net(z).view(len(z), *self.image_shape)


class Discriminator(nn.Module):
    """Flattened image -> one logit (no sigmoid: the loss works on logits, which is numerically safe)."""

    def __init__(self, image_shape, hidden=(512, 256)):
        super().__init__()
        layers, width = [nn.Flatten()], int(torch.tensor(image_shape).prod())
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
            width = h
        layers += [nn.Linear(width, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images):  # (B, C, H, W) -> (B,)
        return self.net(images).squeeze(1)


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: two losses and the alternating update

def d_loss(real_logits, fake_logits):
    """Binary cross-entropy: real images are labelled 1, generated ones 0 (non-saturating and minimax GANs)."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits):
    """Non-saturating loss -log D(G(z)): the strongest gradient when D rejects the fakes (see g_loss_minimax)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def g_loss_minimax(fake_logits):
    """Goodfellow et al.'s minimax form: G minimises log(1 - D(G(z))) = -softplus(logit). Its gradient with respect
    to the logit is -sigmoid(logit): almost nothing when D rejects a fake with confidence (the saturation)."""
    return -F.softplus(fake_logits.float()).mean()


def d_loss_lsgan(real_outputs, fake_outputs):
    """Least squares (Mao et al. 2017, a=0, b=1): D pulls its raw output to 1 on reals and 0 on fakes."""
    return 0.5 * ((real_outputs.float() - 1) ** 2).mean() + 0.5 * (fake_outputs.float() ** 2).mean()


def g_loss_lsgan(fake_outputs):
    """Least squares, c=1: G pulls D's output on its fakes to the value D gives reals."""
    return 0.5 * ((fake_outputs.float() - 1) ** 2).mean()


def d_loss_hinge(real_outputs, fake_outputs):
    """Hinge (Lim & Ye 2017): only samples inside the margin, D(x) < 1 or D(G(z)) > -1, push D."""
    return F.relu(1 - real_outputs.float()).mean() + F.relu(1 + fake_outputs.float()).mean()


def g_loss_hinge(fake_outputs):
    """Hinge GAN's generator raises D's raw output on its fakes, without a margin."""
    return -fake_outputs.float().mean()


# --loss: D's loss, G's loss, and the raw output above which D calls an image real: the logit 0 for the BCE pair and
# the hinge, halfway between the targets 0 and 1 for least squares.
LOSSES = {
    "non-saturating": (d_loss, g_loss, 0.0),
    "minimax": (d_loss, g_loss_minimax, 0.0),
    "lsgan": (d_loss_lsgan, g_loss_lsgan, 0.5),
    "hinge": (d_loss_hinge, g_loss_hinge, 0.0),
}
LOGIT_LOSSES = ("non-saturating", "minimax")  # D's output is a logit: the log shows sigmoid(D), a probability


def metric_names(loss):
    """metrics.csv's per-step columns: D's mean output on reals and fakes is a probability only for the BCE pair."""
    outputs = ["d_real", "d_fake"] if loss in LOGIT_LOSSES else ["d_real_output", "d_fake_output"]
    return ["d_loss", "g_loss", *outputs]


def train_step(G, D, opt_g, opt_d, real, latent_dim, scaler, loss="non-saturating", augment=None):
    """One D update, then one G update against the D just improved (Algorithm 1 of the paper, with k=1).
    augment (--augment; None: off) is a data.Augmentation: every image D sees, real or fake, in both updates, goes
    through it, each call with fresh random draws; G learns through it (it is differentiable). ADA's p then moves by
    what D said of the (augmented) reals."""
    d_loss_fn, g_loss_fn, threshold = LOSSES[loss]
    shown = augment or (lambda images: images)  # what D is shown of an image
    z = torch.randn(len(real), latent_dim, device=real.device)
    with autocast(real.device, scaler):
        fake = G(z)
        # Discriminator: fake is detached so this loss does not reach into G.
        real_logits, fake_logits = D(shown(real)), D(shown(fake.detach()))
        loss_d = d_loss_fn(real_logits, fake_logits)
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
        loss_g = g_loss_fn(D(shown(fake)))
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


# Samples come from a moving average of G's weights: much cleaner than the last step's weights, which oscillate
# around it (Yazici et al. 2019). The decay ramps up over the first steps so that the average does not drag the
# random initial weights along for thousands of steps.
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
    if args.sync_bn:  # BatchNorm statistics over the global batch instead of each process's share
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
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
    names = metric_names(args.loss)
    grid_noise = torch.randn(100, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
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
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, args.latent_dim, scaler, args.loss,
                                 augmentation)
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
        accuracy = d_accuracy(D, G, real_sets, args.latent_dim, LOSSES[args.loss][2])
        print(f"epoch {epoch}: D calls real {accuracy['d_acc_real_train']} of training images, "
              f"{accuracy['d_acc_real_test'] or '-'} of held-out ones; calls fake {accuracy['d_acc_fake']} of fakes")
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}",
                        "augment_p": data.augment_p(augmentation)})
        with torch.no_grad():
            grid = G_average.eval()(grid_noise)
        curves = ("d_loss", "g_loss") + (("augment_p",) if args.augment == "ada" else ())
        data.save_epoch(args.out, epoch, history, curves, grid, {
            "script": SCRIPT, **{key: part.state_dict() for key, part in parts.items()}, "epoch": epoch,
            "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            **data.random_states(device)})

    if args.fid and rank == 0:
        data.report_fid(lambda: generate_images(G_average, args.fid, args.latent_dim, device, seed=args.seed + 1),
                        dataset, device)


@torch.no_grad()
def d_accuracy(D, G, real_sets, latent_dim, threshold, n=1000):
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
        images = images_and_labels[0][:n]
        logits = torch.cat([D(data.to_float(chunk)) for chunk in images.split(250)])
        accuracy[name] = f"{(logits > threshold).float().mean().item():.4f}"
    fake_logits = torch.cat([D(G(torch.randn(250, latent_dim, device=device))) for _ in range(n // 250)])
    accuracy["d_acc_fake"] = f"{(fake_logits <= threshold).float().mean().item():.4f}"
    D.train(), G.train()
    return accuracy


def build_models(args, image_shape):
    return Generator(args.latent_dim, image_shape), Discriminator(image_shape)


def make_optimizers(args, G, D):
    """Adam with beta1 = 0.5 (DCGAN's setting): the default 0.9 makes the two players' momentum overshoot."""
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    return opt_g, opt_d


@torch.no_grad()
def generate_images(G, n, latent_dim, device, seed, batch_size=500):
    """n images as uint8 [n, C, H, W], made in batches by G in eval mode (BatchNorm uses its running averages)."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    images = [data.to_uint8(G(torch.randn(min(batch_size, n - i), latent_dim, generator=noise).to(device))).cpu()
              for i in range(0, n, batch_size)]
    return torch.cat(images)


def generate(args):
    checkpoint = load_checkpoint(args.out)
    saved = argparse.Namespace(**checkpoint["args"])
    G, _ = build_models(saved, checkpoint["image_shape"])
    data.restore(G, checkpoint["generator_average"], checkpoint, "generator")
    data.save_samples(args.out, generate_images(G.to(args.device), args.generate, saved.latent_dim, args.device,
                                                seed=args.seed))


def default_size(args):
    """The named datasets' own 28x28; 32x32 for a folder (an MLP's input grows with the square of the side)."""
    return 28 if args.dataset in data.DATASETS else 32


MODEL_SETTINGS = ("image_size", "latent_dim", "loss")  # what the weights were made for
RESUME_SETTINGS = (*MODEL_SETTINGS, "batch_size", "lr", "seed", "average_decay",
                   "train_images", "augment", "augment_policy", "ada_target")  # what --resume keeps


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    # 60 epochs: 20 epochs of 10k MNIST are step-limited (2 minutes on 2 cores); 60 took score.py's feature FID from
    # 31.9 to 20.2-24.2 (two seeds) in 6 minutes. Small batches and a learning rate above DCGAN's 2e-4, for more and
    # larger steps: at 20 epochs the FID was 73 at lr 2e-4, 38 at 5e-4 and 29 at 1e-3. docs/cpu-training.md.
    p.add_argument("--epochs", type=int, default=60, help="total passes over the training set (default 60)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step, over all processes (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of G and D (default 1e-3)")
    p.add_argument("--latent-dim", type=int, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=int, help="side of the square images; the MLPs take C*S*S inputs "
                                                  "(default 28 for mnist/fashion-mnist, 32 for a folder)")
    p.add_argument("--loss", default="non-saturating", choices=list(LOSSES), metavar="LOSS", help=(
        "the GAN loss (default non-saturating). non-saturating: G minimises -log D(G(z)); "
        "minimax: G minimises log(1 - D(G(z))), Goodfellow et al.'s original; "
        "lsgan: least squares on D's raw output (Mao et al.); "
        "hinge: D minimises relu(1 - D(x)) + relu(1 + D(G(z))), G maximises D(G(z)) (Lim & Ye)"))
    p.add_argument("--average-decay", type=float, default=0.999,
                   help="decay of the moving average of G's weights that samples are drawn from (default 0.999)")
    add_augment_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "gan"), help="the run's folder (default runs/gan)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--fid", type=int, metavar="N", help="after training, FID of N generated vs the real images")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision: float16 + loss scaling on CUDA, bfloat16 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA: BatchNorm statistics over the "
                                                          "global batch (default: each process's own share)")
    args = p.parse_args(argv)
    check_args(args, {"epochs": at_least(1), "batch_size": at_least(1), "latent_dim": at_least(1),
                      "image_size": at_least(1), "log_every": at_least(1), "generate": at_least(1), "fid": at_least(2),
                      "seed": SEED, "lr": POSITIVE, "average_decay": DECAY,
                      "train_images": at_least(1), "ada_target": OPEN_UNIT})
    return args


# ================================================================================================================
# Run machinery: the same in every script, so that each stands alone with data.py. These are the originals; every
# other script carries checked copies, each under a `# Copied from gan.NAME` line (optionally `with A->B`), and
# test_gans.py fails when a copy differs from its original here. Change it here, then in every copy. Said once:
# - average_gradients does by hand what DistributedDataParallel does, as StyleGAN3 does (StyleGAN2-ADA still wraps
#   its networks in DDP): a GAN step does not fit DDP's one-forward-one-backward pattern. D runs forward on reals
#   and on fakes before one backward, G's backward passes through a frozen D, and a gradient penalty (wgan_gp.py,
#   dcgan.py's R1) differentiates D twice, which DDP does not support. One flat all-reduce per update.
# - --resume is exact: rank 0's CPU and CUDA random states are saved with each epoch; the other processes re-seed
#   every epoch from (seed, rank, epoch). SIGTERM (a scheduler's stop) unwinds like Ctrl-C: files are written
#   atomically by data.py, so the last finished epoch's checkpoint is always whole.
# - A checkpoint is resumed or sampled only by the script that wrote it, as its "script" field says; one without
#   that field is refused, since settings alone cannot tell a wgan_gp.py checkpoint from a dcgan.py one.

class UsageError(Exception):
    """Bad flags, an unusable checkpoint: reported as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def at_least(least):
    return lambda value: value >= least, f"must be at least {least}"


POSITIVE = (lambda value: math.isfinite(value) and value > 0, "must be a positive number")
NON_NEGATIVE = (lambda value: math.isfinite(value) and value >= 0, "must be a number >= 0")  # penalty weights (conv scripts)
DECAY = (lambda value: 0 <= value < 1, "must be in [0, 1)")
SEED = (lambda value: 0 <= value < 2 ** 32, f"must be in 0..{2 ** 32 - 1}")
OPEN_UNIT = (lambda value: 0 < value < 1, "must be in (0, 1)")  # --ada-target


def augment_policy(text):
    """--augment-policy: a comma list of data.AUGMENTATIONS' names, in the order they are applied."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in data.AUGMENTATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown augmentation '{unknown[0]}': use a comma list of "
                                         + ", ".join(data.AUGMENTATIONS))
    return names


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


def replicas_agree(*models):
    """True when every process holds the same weights: a float64 checksum per process, compared in one all-reduce."""
    checksum = sum(p.detach().double().sum() for model in models for p in model.parameters())
    extremes = torch.stack([checksum, -checksum])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return bool(extremes[0] == -extremes[1])  # max == min


def autocast(device, scaler):
    """Mixed precision when --amp is on: float16 with loss scaling on CUDA, bfloat16 (no scaling needed) on CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=scaler.amp)


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


class Stopped(KeyboardInterrupt):
    """SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143 (128 + 15)."""


def stop(signum, frame):
    raise Stopped


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
