"""DCGAN (Radford et al. 2016, arXiv:1511.06434): convolutional generator and discriminator, non-saturating loss.

    python dcgan.py --dataset fashion-mnist                           # 28x28 grids, GIF, metrics in runs/dcgan/
    python dcgan.py --dataset fashion-mnist --conditional --out runs/dcgan-cond   # one row per class in the grids
    python dcgan.py --out runs/dcgan-cond --generate 1000 --label 3   # 1000 dresses into samples.npz/.png
    python dcgan.py --out runs/dcgan-cond --generate 100 --truncation none   # z not truncated: more varied
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


class Generator(nn.Module):  # z (and a class embedding) -> image in [-1, 1]: 4x4 (7x7), a stride-2 block a doubling
    def __init__(self, latent_dim, image_size, channels, width, num_classes=0, label_dim=16):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, label_dim) if num_classes else None
        in_dim = latent_dim + (label_dim if num_classes else 0)
        start, doublings = (7, 2) if image_size == 28 else (4, image_size.bit_length() - 3)  # 7, 14, 28 at 28x28
        width_at = [width * 2 ** i for i in reversed(range(doublings))]  # 4w, 2w, w at 4x4, 8x8, 16x16 (32x32)
        layers = [nn.ConvTranspose2d(in_dim, width_at[0], start, bias=False), nn.BatchNorm2d(width_at[0]), nn.ReLU()]
        for c_in, c_out in zip(width_at, width_at[1:]):  # kernel 4, stride 2, padding 1: the side doubles
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(width_at[-1], channels, 4, 2, 1), nn.Tanh()]  # no BatchNorm on G's output
        self.net = nn.Sequential(*layers)  # (B, 4w, 4, 4), (B, 2w, 8, 8), (B, w, 16, 16), (B, C, 32, 32) at 32x32

    def forward(self, z, labels=None):  # (B, latent_dim), (B,) -> (B, C, S, S)
        z = torch.cat([z, self.label_embedding(labels)], dim=1) if self.label_embedding is not None else z
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):  # image -> logit: stride-2 convs to 4x4; <embed(y), features> (Miyato & Koyama 2018)
    def __init__(self, image_size, channels, width, num_classes=0):
        super().__init__()
        start, doublings = (7, 2) if image_size == 28 else (4, image_size.bit_length() - 3)
        width_at = [width * 2 ** i for i in range(doublings)]  # 16x16, 8x8, 4x4 at 32x32; 14x14, 7x7 at 28x28
        layers = [nn.Conv2d(channels, width_at[0], 4, 2, 1), nn.LeakyReLU(0.2)]  # (B, w, 16, 16), no BatchNorm
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, 8, 8), (B, 4w, 4, 4) at 32x32
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())  # (B, 4w * 4 * 4)
        self.logit = nn.Linear(width_at[-1] * start ** 2, 1)  # = a 4x4 (7x7) convolution to one channel
        self.projection = nn.Embedding(num_classes, width_at[-1] * start ** 2) if num_classes else None
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, mean=0.0, std=0.02)  # starts as small as the other weights

    def forward(self, images, labels=None):  # (B, C, S, S), (B,) -> (B,)
        h = self.features(images)
        return self.logit(h).squeeze(1) + ((self.projection(labels) * h).sum(1) if self.projection is not None else 0)


def init_weights(module):  # DCGAN's N(0, 0.02) (BatchNorm scales N(1, 0.02)); G's label embedding keeps N(0, 1)
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, mean=1.0 if isinstance(module, nn.BatchNorm2d) else 0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---- The GAN itself: gan.py's losses (--loss), an optional R1 penalty, and the alternating update --------------

def bce(logits, label):  # binary cross-entropy of D's logits (numerically safe) against 1 (real) or 0 (fake)
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


# --loss (why each: gan.py): D's loss of (real, fake) outputs, G's loss of fake outputs, D's real/fake threshold.
LOSSES = {
    "non-saturating": (lambda real, fake: bce(real, 1) + bce(fake, 0), lambda fake: bce(fake, 1), 0.0),
    "minimax": (lambda real, fake: bce(real, 1) + bce(fake, 0), lambda fake: -F.softplus(fake).mean(), 0.0),
    "lsgan": (lambda real, fake: 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean(),
              lambda fake: 0.5 * ((fake - 1) ** 2).mean(), 0.5),
    "hinge": (lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(), lambda fake: -fake.mean(), 0.0),
}


def r1_penalty(D, real, labels=None, augment=None):  # R1 (Mescheder et al. 2018): E||grad_x D(x)||^2 at the reals
    real = real.detach().requires_grad_(True)
    (grads,) = torch.autograd.grad(D(augment(real) if augment else real, labels).float().sum(), real, create_graph=True)
    return grads.float().flatten(1).pow(2).sum(1).mean()


def average_gradients(model):  # under torchrun, each gradient its mean over the processes (why by hand: gan.py)
    if dist.is_initialized():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]) / dist.get_world_size()
        dist.all_reduce(flat)
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler, loss="non-saturating", r1_gamma=0.0,
               augment=None, amp=False):
    """gan.py's step on the batch's classes (unconditional models ignore them); r1_gamma adds gamma/2 R1 to D's loss."""
    d_loss_fn, g_loss_fn, threshold = LOSSES[loss]
    shown = augment or (lambda images: images)  # what D is shown of an image
    cast = torch.float16 if real.device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    with torch.autocast(real.device.type, cast, enabled=amp):
        fake = G(torch.randn(len(real), latent_dim, device=real.device), labels)
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
    outputs = torch.stack([real_logits, fake_logits]).detach()
    if loss in ("non-saturating", "minimax"):  # D's output is a logit: log the probability D(x)
        outputs = outputs.sigmoid()
    return torch.cat([torch.stack([loss_d, loss_g]).detach(), outputs.mean(dim=1)])


def sample_z(n, latent_dim, truncation=math.inf, generator=None):  # N(0, I), each entry cut to [-T, T] (BigGAN's
    if truncation == math.inf:                                         # truncation trick), drawn by the inverse CDF
        return torch.randn(n, latent_dim, generator=generator)
    low = torch.special.ndtr(torch.tensor(-truncation, dtype=torch.float64))  # P(z < -T)
    uniform = torch.rand(n, latent_dim, generator=generator, dtype=torch.float64)
    return torch.special.ndtri(low + uniform * (1 - 2 * low)).clamp(-truncation, truncation).float()


@torch.no_grad()
def update_average(G_average, G, step, decay):  # what samples come from, its decay ramped up (why: gan.py)
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm's running statistics
        average.copy_(current)


@torch.no_grad()
def d_accuracy(D, G, reals, latent_dim, num_classes, threshold, n=1000):  # gan.py's, each image with a class
    D.eval(), G.eval()
    device = next(D.parameters()).device
    share = {name: part is not None and torch.cat([D(data.to_float(x.to(device)), y.to(device)) > threshold for x, y
                                                   in zip(part.images[:n].split(250), part.labels[:n].split(250))])
             .float().mean() for name, part in reals.items()}
    labels = torch.randint(max(num_classes, 1), (n,), device=device)
    share["d_acc_fake"] = torch.cat([D(G(torch.randn(len(y), latent_dim, device=device), y), y) <= threshold
                                     for y in labels.split(250)]).float().mean()
    D.train(), G.train()
    return {name: f"{value:.4f}" if value is not False else "" for name, value in share.items()}


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
    num_classes = dataset.num_classes if args.conditional else 0
    # z cut to [-1.75, 1.75] when sampling a conditional G: 93-94% -> 95-96% recognised as asked (docs/dcgan.md)
    args.truncation = args.truncation or (1.75 if args.conditional else math.inf)

    torch.manual_seed(args.seed)  # the same initial weights in every process
    G = Generator(args.latent_dim, args.image_size, dataset.image_shape[0], args.width, num_classes)
    D = Discriminator(args.image_size, dataset.image_shape[0], args.width, num_classes)
    G, D = G.apply(init_weights).to(device), D.apply(init_weights).to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.5, 0.999))  # DCGAN's beta1: 0.9 overshoots
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
    grid_noise = sample_z(columns, args.latent_dim, args.truncation, torch.Generator().manual_seed(args.seed))
    grid_labels = data.grid_classes(num_classes).to(device).repeat_interleave(columns)  # 10 rows at most
    grid_noise = grid_noise.repeat(len(grid_labels) // columns, 1).to(device)
    reals = {"d_acc_real_train": dataset, "d_acc_real_test": held_out}
    names, threshold = ["d_loss", "g_loss", "d_real", "d_fake"], LOSSES[args.loss][2]
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, {len(batches)} steps an epoch, {device}")
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
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)},
                        **d_accuracy(D, G, reals, args.latent_dim, num_classes, threshold), "seconds": f"{seconds:.2f}",
                        "img_per_s": f"{len(dataset.images) / seconds:.1f}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        grid = G_average.eval()(grid_noise, grid_labels)
        data.save_epoch(args.out, epoch, history, ["d_loss", "g_loss"] + ["augment_p"] * (args.augment == "ada"),
                        grid, {"script": SCRIPT, "epoch": epoch, "args": vars(args), "history": history,
                               "image_shape": list(dataset.image_shape), "classes": dataset.classes,
                               **{key: part.state_dict() for key, part in parts.items()}, **data.random_states(device)})
    if args.fid and rank == 0:  # fid.py is imported only here: only --fid needs it
        import fid
        labels = torch.arange(args.fid) % dataset.num_classes  # every class equally often
        try:
            fakes = generate_images(G_average, labels, args.latent_dim, device, args.seed + 1, args.truncation)
            print(fid.report(fakes, dataset.images[:10_000], device, cache_dir=dataset.cache_dir))
        except fid.FIDError as e:
            raise UsageError(f"--fid: {e}") from None


@torch.no_grad()
def generate_images(G, labels, latent_dim, device, seed, truncation=math.inf):  # uint8 (n, C, H, W), 500 at a time
    z = sample_z(len(labels), latent_dim, truncation, torch.Generator().manual_seed(seed))
    return torch.cat([data.to_uint8(G.eval()(batch.to(device), y.to(device))).cpu()
                      for batch, y in zip(z.split(500), labels.split(500))])


def generate(args):
    checkpoint = load_checkpoint(args)
    saved = argparse.Namespace(**checkpoint["args"])
    num_classes = len(checkpoint["classes"]) if saved.conditional else 0
    if args.label is not None and args.label >= num_classes:
        raise UsageError(f"--label {args.label}: the model is " + (
            f"conditional on classes 0..{num_classes - 1}" if num_classes else "not conditional"))
    G = Generator(saved.latent_dim, saved.image_size, checkpoint["image_shape"][0], saved.width, num_classes)
    G.to(args.device).load_state_dict(checkpoint["generator_average"])
    labels = torch.arange(args.generate) % max(num_classes, 1)  # every class in turn
    labels = labels if args.label is None else torch.full_like(labels, args.label)
    truncation = args.truncation or getattr(saved, "truncation", math.inf)  # not given: the run's
    data.save_samples(args.out, generate_images(G, labels, saved.latent_dim, args.device, args.seed, truncation),
                      labels if num_classes else None)


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
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
    def check(text):
        if not low <= kind(text) < high:
            raise argparse.ArgumentTypeError(f"{text} is not in [{low}, {high})")
        return kind(text)
    check.__name__ = kind.__name__  # for argparse's "invalid int value"
    return check


COUNT, RATE, DECAY = number(int, 1), number(float, 1e-12), number(float, 0, 1)


def truncation(text):  # --truncation T > 0, or none: math.inf, no cut
    return math.inf if text == "none" else RATE(text)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# --preset paper: Radford et al.'s LSUN/faces model, for a GPU (the rest of the paper's recipe is the default).
PRESETS = {
    "cpu": {},  # the defaults below: a recognisable grid in minutes on a laptop CPU
    "paper": {
        "image_size": 64,  # 64x64 images (section 4; Figure 1)
        "width": 128,  # G: 1024, 512, 256, 128 channels at 4..32 px (Figure 1); D mirrors it (authors' code, ndf 128)
        "latent_dim": 100, "batch_size": 128,  # a 100-d z (Figure 1), mini-batches of 128 (section 4)
        "lr": 2e-4, "lr_g": 2e-4,  # Adam at lr 0.0002, beta1 0.5 (section 4)
        "average_decay": 0.0,  # samples from G's own weights: the paper keeps no moving average
        "truncation": math.inf,  # z not cut: the truncation trick is BigGAN's, three years later
    },
}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu (default) or paper; flags given win")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, stacked-mnist or a folder (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=COUNT, default=6, help="total passes over the training set (default 6)")
    p.add_argument("--batch-size", type=COUNT, default=32, help="images a step, over all processes (default 32)")
    p.add_argument("--lr", type=RATE, default=2e-4, help="Adam's learning rate of D (default 2e-4)")
    p.add_argument("--lr-g", type=RATE, help="Adam's learning rate of G (default 1e-3; 2e-4 with --conditional)")
    p.add_argument("--latent-dim", type=COUNT, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=int, choices=(28, 32, 64, 128, 256, 512, 1024), help="default 28, a folder 64")
    p.add_argument("--width", type=COUNT, default=64, help="channels of G's last and D's first layer (default 64)")
    p.add_argument("--conditional", action="store_true", help="condition G and D on the class label")
    p.add_argument("--loss", default="non-saturating", choices=list(LOSSES), help="(default non-saturating)")
    p.add_argument("--r1-gamma", type=number(float, 0), default=0.0, help="gamma of R1 (default 0: off)")
    p.add_argument("--average-decay", type=DECAY, default=0.999, help="of the moving average of G (default 0.999)")
    p.add_argument("--truncation", type=truncation, metavar="T",
                   help="sample z cut to [-T, T], or none (default 1.75 with --conditional, else none; "
                        "--generate: the run's)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="what D sees (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1...")
    p.add_argument("--out", default=os.path.join("runs", "dcgan"), help="the run's folder (default runs/dcgan)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=number(int, 0), metavar="K", help="with --generate, conditional: only class K")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    known = p.parse_known_args(argv)[0]  # G's rate by mode (why: docs/dcgan.md), the preset's values, the flags given
    p.set_defaults(**{"lr_g": 2e-4 if known.conditional else 1e-3, **PRESETS[known.preset]})
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
