"""DCGAN (Radford et al. 2016, arXiv:1511.06434): convolutional generator and discriminator, non-saturating loss.

    python dcgan.py --dataset fashion-mnist --epochs 5                # 32x32 grids, GIF, metrics in runs/dcgan/
    python dcgan.py --dataset fashion-mnist --conditional --out runs/dcgan-cond   # one row per class in the grids
    python dcgan.py --out runs/dcgan-cond --generate 1000 --label 3   # 1000 dresses into samples.npz/.png
    python dcgan.py --preset paper --dataset faces/ --device cuda     # the paper's 64x64 model on a folder of images
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


class Generator(nn.Module):
    """z (and a class) -> image in [-1, 1]: a 4x4 map, then one stride-2 transposed convolution per doubling (kernel
    4, stride 2: no checkerboard). Conditional (num_classes > 0): a class embedding joins z; else labels are ignored."""

    def __init__(self, latent_dim, image_size, channels, width, num_classes=0, label_dim=16):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, label_dim) if num_classes else None
        in_dim = latent_dim + (label_dim if num_classes else 0)
        width_at = [width * image_size // (8 * 2 ** i) for i in range(image_size.bit_length() - 3)]  # 4x4, 8x8, ...
        layers = [nn.ConvTranspose2d(in_dim, width_at[0], kernel_size=4, stride=1, padding=0, bias=False),
                  nn.BatchNorm2d(width_at[0]), nn.ReLU()]  # (B, 4w, 4, 4) at 32x32
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, 8, 8), (B, w, 16, 16) at 32x32
            layers += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(width_at[-1], channels, kernel_size=4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)  # (B, C, 32, 32): no BatchNorm on the output (DCGAN rule)

    def forward(self, z, labels=None):  # (B, latent_dim), (B,) -> (B, C, S, S)
        if self.label_embedding is not None:
            z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """Image (and a class) -> one logit: stride-2 convolutions down to 4x4 (no pooling), then a 4x4 convolution.
    Conditional: the projection <embed(y), features> (Miyato & Koyama 2018) gives each class its own last layer."""

    def __init__(self, image_size, channels, width, num_classes=0):
        super().__init__()
        width_at = [width * 2 ** i for i in range(image_size.bit_length() - 3)]  # 16x16, 8x8, 4x4 at 32x32
        layers = [nn.Conv2d(channels, width_at[0], kernel_size=4, stride=2, padding=1),  # (B, w, 16, 16)
                  nn.LeakyReLU(0.2)]  # no BatchNorm on the input layer (DCGAN rule)
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, 8, 8), (B, 4w, 4, 4) at 32x32
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
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
    """DCGAN's init: conv weights from N(0, 0.02), BatchNorm scales from N(1, 0.02), biases 0. G's label embedding
    keeps its N(0, 1) init, the scale of z, so that the class is not drowned out."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, mean=1.0 if isinstance(module, nn.BatchNorm2d) else 0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: gan.py's losses (--loss), an optional R1 penalty, and the alternating update

def d_loss(real_logits, fake_logits):
    """Binary cross-entropy: real images are labelled 1, generated ones 0 (non-saturating and minimax GANs)."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits):
    """Non-saturating -log D(G(z)): the strongest gradient when D rejects the fakes."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# --loss: D's loss of (real, fake) outputs, G's loss of fake outputs, the output above which D calls an image real.
LOSSES = {
    "non-saturating": (d_loss, g_loss, 0.0),
    # the paper's minimax log(1 - D(G(z))) = -softplus(logit): its gradient -sigmoid(logit) vanishes once D wins
    "minimax": (d_loss, lambda fake: -F.softplus(fake).mean(), 0.0),
    # least squares (Mao et al. 2017, a=0, b=c=1) on D's raw output
    "lsgan": (lambda real, fake: 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean(),
              lambda fake: 0.5 * ((fake - 1) ** 2).mean(), 0.5),
    # hinge (Lim & Ye 2017): only outputs inside the margin, D(x) < 1 or D(G(z)) > -1, push D
    "hinge": (lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(), lambda fake: -fake.mean(), 0.0),
}


def r1_penalty(D, real, labels=None, augment=None):
    """R1 (Mescheder et al. 2018): E||grad_x D(x)||^2 at the reals stops D sharpening around them, running away from
    G. create_graph: D's update follows the penalty. With --augment: through it, at the un-augmented x."""
    real = real.detach().requires_grad_(True)
    (grads,) = torch.autograd.grad(D(augment(real) if augment else real, labels).float().sum(), real, create_graph=True)
    return grads.float().flatten(1).pow(2).sum(1).mean()


def average_gradients(model):
    """Under torchrun, each gradient becomes its mean over the processes: one flat all-reduce (why: gan.py)."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler, loss="non-saturating", r1_gamma=0.0,
               augment=None, amp=False):
    """gan.py's step (one D update, then one G update against the new D) on the batch's classes, which unconditional
    models ignore. r1_gamma > 0 adds gamma/2 times R1 to D's loss."""
    d_loss_fn, g_loss_fn, threshold = LOSSES[loss]
    shown = augment or (lambda images: images)  # what D is shown of an image
    cast = torch.float16 if real.device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    z = torch.randn(len(real), latent_dim, device=real.device)
    with torch.autocast(real.device.type, cast, enabled=amp):
        fake = G(z, labels)
        real_logits, fake_logits = D(shown(real), labels).float(), D(shown(fake.detach()), labels).float()  # not G
        loss_d = d_loss_fn(real_logits, fake_logits)
        if r1_gamma:
            loss_d = loss_d + r1_gamma / 2 * r1_penalty(D, real, labels, augment)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:  # ADA's p moves by what D said of the reals
        augment.observe(real_logits.detach() - threshold)

    D.requires_grad_(False)  # G's backward passes through D to the image without filling D's gradients
    with torch.autocast(real.device.type, cast, enabled=amp):
        loss_g = g_loss_fn(D(shown(fake), labels).float())
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    real_out, fake_out = real_logits.detach(), fake_logits.detach()
    if loss in ("non-saturating", "minimax"):  # D's output is a logit: log the probability D(x)
        real_out, fake_out = real_out.sigmoid(), fake_out.sigmoid()
    return torch.stack([loss_d.detach(), loss_g.detach(), real_out.mean(), fake_out.mean()])


@torch.no_grad()
def update_average(G_average, G, step, decay):
    """The moving average of G's weights that samples come from, its decay ramped up (why: gan.py)."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm's running statistics
        average.copy_(current)


@torch.no_grad()
def d_accuracy(D, G, dataset, held_out, latent_dim, num_classes, threshold, n=1000):
    """gan.py's check of D: the share of up to n training and n held-out images (each with its own class) that D
    calls real, and of n fresh fakes of the raw G, of random classes, that it calls fake. A folder: an empty cell."""
    D.eval(), G.eval()
    device = next(D.parameters()).device

    def calls_real(images, labels):
        logits = torch.cat([D(data.to_float(x.to(device)), y.to(device))
                            for x, y in zip(images[:n].split(250), labels[:n].split(250))])
        return f"{(logits > threshold).float().mean():.4f}"
    share = {"d_acc_real_train": calls_real(dataset.images, dataset.labels),
             "d_acc_real_test": calls_real(held_out.images, held_out.labels) if held_out else ""}
    labels = torch.randint(max(num_classes, 1), (n,), device=device)
    logits = torch.cat([D(G(torch.randn(len(y), latent_dim, device=device), y), y) for y in labels.split(250)])
    share["d_acc_fake"] = f"{(logits <= threshold).float().mean():.4f}"
    D.train(), G.train()
    return share


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
    args.image_size = args.image_size or (32 if args.dataset in data.DATASETS else 64)  # a power of two
    if rank == 0:
        data.prepare_out(args.out)  # writable, and no other run writing there
    dataset = data.load_data(args.dataset, args.data_dir, args.image_size, rank)
    dataset.images, dataset.labels = dataset.images[:args.train_images], dataset.labels[:args.train_images]
    held_out = data.load_data(args.dataset, args.data_dir, args.image_size, rank, split="test")
    num_classes = dataset.num_classes if args.conditional else 0

    torch.manual_seed(args.seed)  # the same initial weights in every process
    G = Generator(args.latent_dim, args.image_size, dataset.image_shape[0], args.width, num_classes)
    D = Discriminator(args.image_size, dataset.image_shape[0], args.width, num_classes)
    G, D = G.apply(init_weights).to(device), D.apply(init_weights).to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    # Adam with beta1 = 0.5 (DCGAN's); G's rate is its own flag: at --lr-g 1e-3 G keeps up with D for longer.
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    augment = data.make_augmentation(args.augment, dataset.image_shape[0], device)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d,
             **({"augment": augment} if augment else {})}
    start_epoch, history = data.resume(checkpoint, parts, device) if checkpoint else (0, [])  # weights, RNG, log
    # compiled modules share G's and D's weights; with R1, D stays eager: compile cannot differentiate twice
    G_fast, D_fast = (torch.compile(G), D if args.r1_gamma else torch.compile(D)) if args.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    columns = 10 if num_classes else 100  # conditional: one row per class, the same z down each column
    grid_noise = torch.randn(columns, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    grid_noise = grid_noise.repeat(max(num_classes, 1), 1).to(device)
    grid_labels = torch.arange(max(num_classes, 1), device=device).repeat_interleave(columns)
    names, threshold = ["d_loss", "g_loss", "d_real", "d_fake"], LOSSES[args.loss][2]
    if rank == 0:
        print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source}, {len(batches)} steps an "
              f"epoch, {device} x {world_size}, epochs {start_epoch + 1}..{args.epochs}")
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for i, (real, labels) in enumerate(batches.epoch(epoch), 1):
            real, labels = real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank]  # our share
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, scaler, args.loss,
                                 args.r1_gamma, augment, args.amp)
            update_average(G_average, G, (epoch - 1) * len(batches) + i, args.average_decay)
            if i % args.log_every == 0 or i == len(batches):
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means.div_(world_size))
                means = means.tolist()  # the only sync with the device, every --log-every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"the losses became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch}")
                if rank == 0:
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | d_loss {means[0]:.3f} g_loss "
                          f"{means[1]:.3f} | D out real {means[2]:.2f} fake {means[3]:.2f} | "
                          f"{i * args.batch_size / (time.time() - started):.0f} img/s", flush=True)
        if rank > 0:
            continue
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, dataset, held_out, args.latent_dim, num_classes, threshold)
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{len(dataset.images) / seconds:.1f}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        with torch.no_grad():
            grid = G_average.eval()(grid_noise, grid_labels)
        data.save_epoch(args.out, epoch, history, ["d_loss", "g_loss"] + ["augment_p"] * (args.augment == "ada"),
                        grid, {"script": SCRIPT, "epoch": epoch, "args": vars(args), "history": history,
                               "image_shape": list(dataset.image_shape), "classes": dataset.classes,
                               **{key: part.state_dict() for key, part in parts.items()}, **data.random_states(device)})
    if args.fid and rank == 0:  # fid.py is imported only here: only --fid needs it
        import fid
        labels = torch.arange(args.fid) % dataset.num_classes  # every class equally often
        try:
            print(fid.report(generate_images(G_average, labels, args.latent_dim, device, args.seed + 1),
                             dataset.images[:10_000], device, cache_dir=dataset.cache_dir))
        except fid.FIDError as e:
            raise UsageError(f"--fid: {e}") from None


@torch.no_grad()
def generate_images(G, labels, latent_dim, device, seed, batch_size=500):
    """One image of each class in labels (int64, on the CPU), as uint8 (n, C, H, W), from G in eval mode."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    return torch.cat([data.to_uint8(G(torch.randn(len(y), latent_dim, generator=noise).to(device), y.to(device)))
                      .cpu() for y in labels.split(batch_size)])


def generate(args):
    checkpoint = load_checkpoint(args)
    saved, classes = argparse.Namespace(**checkpoint["args"]), len(checkpoint["classes"])
    if args.label is not None and not (saved.conditional and args.label < classes):
        raise UsageError(f"--label {args.label}: the model is " + (
            f"conditional on classes 0..{classes - 1}" if saved.conditional else "not conditional"))
    G = Generator(saved.latent_dim, saved.image_size, checkpoint["image_shape"][0], saved.width,
                  classes if saved.conditional else 0).to(args.device)
    G.load_state_dict(checkpoint["generator_average"])
    labels = torch.arange(args.generate) % classes if args.label is None else torch.full((args.generate,), args.label)
    data.save_samples(args.out, generate_images(G, labels, saved.latent_dim, args.device, args.seed),
                      labels if saved.conditional else None)


# ----------------------------------------------------------------------------------------------------------------
# The command line: every bad flag or file is one line and exit status 2

class UsageError(Exception):
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


KEPT = ("preset", "image_size", "width", "latent_dim", "conditional", "loss", "batch_size", "lr", "lr_g", "seed",
        "average_decay", "r1_gamma", "train_images", "augment")


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


def power_of_two(text):  # --image-size: one more block in G and D per doubling
    if int(text) < 32 or int(text) & (int(text) - 1):
        raise argparse.ArgumentTypeError(f"{text} is not a power of two >= 32")
    return int(text)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# --preset paper: Radford et al.'s LSUN/faces model, for a GPU. The rest is the paper's already: BatchNorm (not on
# G's output or D's input), ReLU/LeakyReLU 0.2, N(0, 0.02) init, Adam betas (0.5, 0.999), non-saturating loss, no R1.
PRESETS = {
    "cpu": {},  # the defaults below: a recognisable grid in minutes on a laptop CPU
    "paper": {
        "image_size": 64,  # 64x64 images (section 4; Figure 1)
        "width": 128,  # G: 1024, 512, 256, 128 channels at 4..32 px (Figure 1); D mirrors it (authors' code, ndf 128)
        "latent_dim": 100,  # a 100-d z (Figure 1)
        "batch_size": 128,  # mini-batch SGD with batches of 128 (section 4)
        "lr": 2e-4, "lr_g": 2e-4,  # Adam at lr 0.0002, beta1 0.5 (section 4)
        "average_decay": 0.0,  # samples from G's own weights: the paper keeps no moving average
    },
}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu (default): the defaults below; paper: "
                   + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["paper"].items()) + "; flags win")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=COUNT, default=5, help="total passes over the training set (default 5)")
    p.add_argument("--batch-size", type=COUNT, default=64, help="images a step, over all processes (default 64)")
    p.add_argument("--lr", type=RATE, default=2e-4, help="Adam's learning rate of D (default 2e-4)")
    p.add_argument("--lr-g", type=RATE, default=2e-4, help="Adam's learning rate of G (default 2e-4)")
    p.add_argument("--latent-dim", type=COUNT, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=power_of_two, help="32, 64, ... (default 32; 64 for a folder)")
    p.add_argument("--width", type=COUNT, default=64, help="channels of G's last and D's first layer, doubled per "
                   "halving of the resolution (default 64; 32 is 3x faster on a CPU)")
    p.add_argument("--conditional", action="store_true", help="condition G and D on the class label")
    p.add_argument("--loss", default="non-saturating", choices=list(LOSSES), help="G minimises -log D(G(z)) "
                   "(non-saturating, the default) or log(1 - D(G(z))) (minimax, the GAN paper's); or lsgan, hinge")
    p.add_argument("--r1-gamma", type=number(float, 0), default=0.0, help="gamma of R1 (default 0: off)")
    p.add_argument("--average-decay", type=DECAY, default=0.999, help="of the moving average of G (default 0.999)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="augment every image D "
                   "sees, always (diffaug) or adaptively (ada): for a few thousand images or fewer (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "dcgan"), help="the run's folder (default runs/dcgan)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=number(int, 0), metavar="K", help="with --generate, conditional: only class K")
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
