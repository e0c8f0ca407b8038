"""R3GAN (Huang et al. 2024, arXiv:2501.05441): the relativistic loss with R1 and R2; the paper's residual G and D
without normalisation (--nets resnet, --preset paper), or on a CPU wgan_gp.py's conv nets. Unconditional.

    python r3gan.py --dataset stacked-mnist                  # 28x28 grids, GIF, metrics in runs/r3gan/
    python r3gan.py --generate 1000                          # runs/r3gan/samples.npz and samples.png
    python r3gan.py --preset paper --dataset cifar/ --device cuda   # the paper's CIFAR-10 networks and schedules
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
EXPANSION = 2  # a block's inner channels: EXPANSION x its width (every config of the paper)
BLUR = torch.tensor([1.0, 3.0, 3.0, 1.0]).outer(torch.tensor([1.0, 3.0, 3.0, 1.0])) / 64  # [1, 2, 1] * [1, 1]


def upsample(x):  # (B, C, H, W) -> (B, C, 2H, 2W): zeros between the pixels, then the filter (bilinear inside)
    return F.conv_transpose2d(x, 4 * BLUR.to(x).expand(x.shape[1], 1, 4, 4), stride=2, padding=1, groups=x.shape[1])


def downsample(x):  # (B, C, H, W) -> (B, C, H/2, W/2): the filter, then every 2nd pixel
    return F.conv2d(x, BLUR.to(x).expand(x.shape[1], 1, 4, 4), stride=2, padding=1, groups=x.shape[1])


def conv(c_in, c_out, kernel_size=1, groups=1, gain=1.0):  # no bias; He's init N(0, gain^2 / fan_in)
    layer = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(layer.weight[0].numel()))
    return layer


class ResidualBlock(nn.Module):  # x + 1x1 -> grouped 3x3 -> 1x1 (ResNeXt), a bias and leaky ReLU between
    def __init__(self, width, cardinality, num_blocks):
        super().__init__()  # the last conv starts at zero (the block starts as its shortcut); the paper's fix-up init:
        gain = math.sqrt(2 / (1 + 0.2 ** 2)) * num_blocks ** -0.25  # leaky ReLU's gain, scaled by blocks^(-1/4)
        inner = width * EXPANSION
        self.conv1, self.conv2 = conv(width, inner, gain=gain), conv(inner, inner, 3, cardinality, gain=gain)
        self.conv3 = conv(inner, width, gain=0.0)
        self.bias1, self.bias2 = nn.Parameter(torch.zeros(inner, 1, 1)), nn.Parameter(torch.zeros(inner, 1, 1))

    def forward(self, x):  # (B, width, R, R) -> the same
        y = F.leaky_relu(self.conv1(x) + self.bias1, 0.2)
        return x + self.conv3(F.leaky_relu(self.conv2(y) + self.bias2, 0.2))


def stage_widths(image_size, width, max_width):  # (the basis' side, channels a stage from the coarsest)
    side = 7 if image_size % 7 == 0 else 4  # 28 px: 7, 14, 28; 32 px: 4, 8, 16, 32
    return side, [min(width << k, max(max_width, width)) for k in reversed(range((image_size // side).bit_length()))]


def residual_stages(widths, group_width, blocks):  # each width's blocks, and a 1x1 conv where the width changes
    stages = nn.ModuleList(nn.Sequential(*[ResidualBlock(w, EXPANSION * w // group_width, blocks * len(widths))
                                           for _ in range(blocks)]) for w in widths)
    return stages, nn.ModuleList(conv(a, b) if a != b else nn.Identity() for a, b in zip(widths, widths[1:]))


class Generator(nn.Module):  # z -> a learned basis scaled by a linear map of z -> blocks, upsampling -> 1x1
    def __init__(self, latent_dim, image_size, channels, width, max_width, group_width, blocks):
        super().__init__()
        side, widths = stage_widths(image_size, width, max_width)
        self.basis = nn.Parameter(torch.randn(widths[0], side, side))
        self.linear = nn.Linear(latent_dim, widths[0], bias=False)
        nn.init.normal_(self.linear.weight, 0.0, 1 / math.sqrt(latent_dim))
        self.stages, self.transitions = residual_stages(widths, group_width, blocks)
        self.to_image = conv(widths[-1], channels)

    def forward(self, z):  # (B, latent_dim) -> (B, C, S, S); no tanh (the paper): D and the data keep it in range
        x = self.stages[0](self.basis * self.linear(z)[:, :, None, None])  # (B, widths[0], 4, 4) or 7x7
        for transition, stage in zip(self.transitions, self.stages[1:]):  # 8, 16, 32 px (14, 28)
            x = stage(upsample(transition(x)))
        return self.to_image(x)


class Discriminator(nn.Module):  # image -> 1x1 -> blocks, downsampling -> a learned depthwise basis -> linear
    def __init__(self, image_size, channels, width, max_width, group_width, blocks):
        super().__init__()
        side, widths = stage_widths(image_size, width, max_width)
        widths = widths[::-1]  # from the finest
        self.from_image = conv(channels, widths[0])
        self.stages, self.transitions = residual_stages(widths, group_width, blocks)
        self.basis = nn.Conv2d(widths[-1], widths[-1], side, groups=widths[-1], bias=False)  # (B, width, 1, 1)
        nn.init.normal_(self.basis.weight, 0.0, 1 / side)  # He's N(0, 1 / fan_in), fan_in side^2
        self.linear = nn.Linear(widths[-1], 1, bias=False)
        nn.init.normal_(self.linear.weight, 0.0, 1 / math.sqrt(widths[-1]))

    def forward(self, images):  # (B, C, S, S) -> (B,) logits
        x = self.stages[0](self.from_image(images))  # (B, widths[0], S, S)
        for transition, stage in zip(self.transitions, self.stages[1:]):  # downsampling, then a 1x1 (the paper's)
            x = stage(transition(downsample(x)))
        return self.linear(self.basis(x).flatten(1)).squeeze(1)


class ConvGenerator(nn.Sequential):
    """--nets conv (the CPU default; why: r3gan.md): wgan_gp.py's G: z -> 7x7 (4x4) by a transposed conv, a stride-2
    transposed conv a doubling, BatchNorm and ReLU between, tanh."""

    def __init__(self, latent_dim, image_size, channels, width):
        side, widths = stage_widths(image_size // 2, width, math.inf)  # no cap; 7, 14 px: 2w, w at 28 px
        layers = [nn.Unflatten(1, (latent_dim, 1, 1)), nn.ConvTranspose2d(latent_dim, widths[0], side, bias=False)]
        for c_in, c_out in zip(widths, widths[1:]):  # (B, 2w, 7, 7) -> (B, w, 14, 14) at 28 px
            layers += [nn.BatchNorm2d(c_in), nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False)]
        layers += [nn.BatchNorm2d(width), nn.ReLU(), nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        super().__init__(*layers)
        self.apply(dcgan_init)


class ConvDiscriminator(nn.Sequential):  # --nets conv: wgan_gp.py's critic (layer norm, not BatchNorm); -> (B,)
    def __init__(self, image_size, channels, width):
        side, widths = stage_widths(image_size // 2, width, math.inf)
        layers = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]  # (B, w, 14, 14) at 28 px
        for c_in, c_out in zip(widths[::-1], widths[-2::-1]):  # (B, 2w, 7, 7)
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.GroupNorm(1, c_out), nn.LeakyReLU(0.2)]
        super().__init__(*layers, nn.Flatten(), nn.Linear(widths[0] * side ** 2, 1), nn.Flatten(0))
        self.apply(dcgan_init)


def dcgan_init(module):  # DCGAN's N(0, 0.02) weights (BatchNorm's scales N(1, 0.02)), zero biases
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, float(isinstance(module, nn.BatchNorm2d)), 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---- The GAN itself: the relativistic pairing loss, R1 and R2, the alternating update ---------------------------

def d_loss_rpgan(real_logits, fake_logits):  # softplus(-(D(x) - D(G(z)))): D wants each real above its paired fake
    return F.softplus(fake_logits - real_logits).mean()


def g_loss_rpgan(real_logits, fake_logits):  # the same pairing seen from G: each fake above its real
    return F.softplus(real_logits - fake_logits).mean()


def gradient_penalty(logits, images):  # E||grad_x D(x)||^2 at the images D's logits were taken at (R1 or R2)
    (grads,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
    return grads.float().flatten(1).square().sum(1).mean()


def average_gradients(model):  # under torchrun, each gradient its mean over the processes (why by hand: gan.py)
    if dist.is_initialized():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]) / dist.get_world_size()
        dist.all_reduce(flat)
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, real, latent_dim, scaler, gamma, augment=None, amp=False):
    """One D update, then one G update on the same fakes against the D just improved. D minimises the RpGAN loss +
    gamma/2 (R1 + R2): R1 at the reals, R2 at the fakes, every step, each taken at the images before augment.
    Returns the losses, D's mean logits and the penalties on the device: .item() here would wait every step."""
    shown = augment or (lambda images: images)  # what D is shown of an image
    cast = torch.float16 if real.device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    with torch.autocast(real.device.type, cast, enabled=amp):
        fake = G(torch.randn(len(real), latent_dim, device=real.device))
        real_in, fake_in = real.detach().requires_grad_(gamma > 0), fake.detach().requires_grad_(gamma > 0)
        real_logits, fake_logits = D(shown(real_in)).float(), D(shown(fake_in)).float()  # not into G
        loss_d = d_loss_rpgan(real_logits, fake_logits)
        zero = torch.zeros([], device=real.device)
        r1 = gradient_penalty(real_logits, real_in) if gamma else zero
        r2 = gradient_penalty(fake_logits, fake_in) if gamma else zero
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d + gamma / 2 * (r1 + r2)).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:  # ADA's p moves by the sign of D(x) - D(G(z)), what the relativistic D says of the reals
        augment.observe((real_logits - fake_logits).detach())

    D.requires_grad_(False)  # G's backward passes through D to the image without filling D's gradients
    with torch.autocast(real.device.type, cast, enabled=amp):
        with torch.no_grad():  # the reals' logits under the new D: a constant for G
            real_logits_new = D(shown(real)).float()
        loss_g = g_loss_rpgan(real_logits_new, D(shown(fake)).float())
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    return torch.stack([loss_d.detach(), loss_g.detach(), real_logits.detach().mean(), fake_logits.detach().mean(),
                        r1.detach(), r2.detach()])


def schedule(start, end, images, total):  # the paper's cosine from start to end over total images; 0: start
    return start if not total else end + (start - end) * (1 + math.cos(math.pi * min(images / total, 1))) / 2


@torch.no_grad()
def update_average(G_average, G, step, decay, ramp=0.05):  # stylegan.py's: a half-life ramped up as 0.05 x step
    half_life = min(math.log(0.5) / math.log(decay), ramp * step) if decay > 0 else 0.0
    beta = 0.5 ** (1 / half_life) if half_life > 0 else 0.0
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - beta)
    for average, current in zip(G_average.buffers(), G.buffers()):  # the conv G's BatchNorm statistics
        average.copy_(current)


@torch.no_grad()
def d_accuracy(D, G, reals, latent_dim, n=1000):  # D calls real what is above the midpoint of its mean logits
    D.eval(), G.eval()
    device = next(D.parameters()).device
    logits = {name: images is not None and torch.cat([D(data.to_float(x.to(device))) for x in images[:n].split(250)])
              for name, images in reals.items()}
    fake = torch.cat([D(G(torch.randn(250, latent_dim, device=device))) for _ in range(n // 250)])
    threshold = (logits["d_acc_real_train"].mean() + fake.mean()) / 2
    share = {name: x is not False and (x > threshold).float().mean() for name, x in logits.items()}
    share["d_acc_fake"] = (fake <= threshold).float().mean()
    D.train(), G.train()
    return {name: f"{value:.4f}" if value is not False else "" for name, value in share.items()}


def make_nets(args, channels):  # (G, D) of --nets at the run's sizes
    if args.nets == "conv":
        return ConvGenerator(args.latent_dim, args.image_size, channels, args.width), \
            ConvDiscriminator(args.image_size, channels, args.width)
    nets = args.width, args.max_width, args.group_width, args.blocks
    return Generator(args.latent_dim, args.image_size, channels, *nets), Discriminator(args.image_size, channels, *nets)


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
    args.image_size = args.image_size or (28 if args.dataset in data.DATASETS else 64)  # 28: stages 7, 14, 28
    if rank == 0:
        data.prepare_out(args.out)  # writable, and no other run writing there
    dataset = data.load_data(args.dataset, args.data_dir, args.image_size, rank)
    dataset.images, dataset.labels = dataset.images[:args.train_images], dataset.labels[:args.train_images]
    held_out = data.load_data(args.dataset, args.data_dir, args.image_size, rank, split="test")

    torch.manual_seed(args.seed)  # the same initial weights in every process
    channels = dataset.image_shape[0]
    G, D = (net.to(device) for net in make_nets(args, channels))
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.9), eps=1e-8)  # the paper's beta1 0
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.9), eps=1e-8)
    augment = data.make_augmentation(args.augment, channels, device)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d,
             **({"augment": augment} if augment else {})}
    start_epoch, history = data.resume(checkpoint, parts, device) if checkpoint else (0, [])  # weights, RNG, log
    # compiled modules share G's and D's weights; with R1 and R2, D stays eager: compile cannot differentiate twice
    G_fast, D_fast = (torch.compile(G), D if args.gamma else torch.compile(D)) if args.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    grid_noise = torch.randn(100, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    reals = {"d_acc_real_train": dataset.images, "d_acc_real_test": held_out and held_out.images}
    names = ["d_loss", "g_loss", "d_real", "d_fake", "r1_penalty", "r2_penalty"]
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, {len(batches)} steps an epoch, {device}")
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for i, (real, _) in enumerate(batches.epoch(epoch), 1):
            step = (epoch - 1) * len(batches) + i
            images = (step - 1) * args.batch_size  # seen so far: the schedules' clock
            gamma, lr, beta2 = (schedule(start, end, images, args.schedule_images) for start, end in  # the paper's
                                ((args.gamma, args.gamma / 10), (args.lr, args.lr / 4), (0.9, 0.99)))  # ratios
            for group in opt_g.param_groups + opt_d.param_groups:
                group["lr"], group["betas"] = lr, (0.0, beta2)
            real = real.tensor_split(world_size)[rank]  # this process's share of the global batch
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, args.latent_dim, scaler, gamma, augment, args.amp)
            update_average(G_average, G, step, args.average_decay)
            if i % args.log_every == 0 or i == len(batches):
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means.div_(world_size))
                means = means.tolist()  # the only sync with the device, every --log-every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"the losses became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch}")
                if rank == 0:
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | d_loss {means[0]:.3f} g_loss "
                          f"{means[1]:.3f} | D(x) {means[2]:.2f} D(G(z)) {means[3]:.2f} | R1 {means[4]:.3g} R2 "
                          f"{means[5]:.3g} | {i * args.batch_size / (time.time() - started):.0f} img/s", flush=True)
        if rank > 0:
            continue
        seconds = time.time() - started
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)},
                        **d_accuracy(D, G, reals, args.latent_dim), "seconds": f"{seconds:.2f}",
                        "img_per_s": f"{len(dataset.images) / seconds:.1f}", "gamma": f"{gamma:.5g}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        grid = G_average.eval()(grid_noise)
        data.save_epoch(args.out, epoch, history, ["d_loss", "g_loss"] + ["augment_p"] * (args.augment == "ada"),
                        grid, {"script": SCRIPT, "epoch": epoch, "args": vars(args), "history": history,
                               "image_shape": list(dataset.image_shape), "classes": dataset.classes,
                               **{key: part.state_dict() for key, part in parts.items()}, **data.random_states(device)})
    if args.fid and rank == 0:  # fid.py is imported only here: only --fid needs it
        import fid
        try:
            print(fid.report(generate_images(G_average, args.fid, args.latent_dim, device, args.seed + 1),
                             dataset.images[:10_000], device, cache_dir=dataset.cache_dir))
        except fid.FIDError as e:
            raise UsageError(f"--fid: {e}") from None


@torch.no_grad()
def generate_images(G, n, latent_dim, device, seed):  # uint8 (n, C, H, W), 500 at a time
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([data.to_uint8(G.eval()(batch.to(device))).cpu() for batch in z.split(500)])


def generate(args):
    checkpoint = load_checkpoint(args)
    saved = argparse.Namespace(**checkpoint["args"])
    G = make_nets(saved, checkpoint["image_shape"][0])[0].to(args.device)
    G.load_state_dict(checkpoint["generator_average"])
    data.save_samples(args.out, generate_images(G, args.generate, saved.latent_dim, args.device, args.seed))


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


# The preset first: resuming with another one names it, not a setting it changed.
KEPT = ("preset", "image_size", "nets", "width", "max_width", "group_width", "blocks", "latent_dim", "batch_size", "lr",
        "gamma", "schedule_images", "seed", "average_decay", "train_images", "augment")


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


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# --preset cpu: parse_args' defaults, timed on two CPU cores (docs/r3gan.md). paper: brownvc/R3GAN train.py's
# 'CIFAR10' preset and its README's CIFAR-10 command (--batch 512); Generator/Discriminator as its R3GAN/Networks.py.
PRESETS = {"cpu": {}, "paper": {
    "image_size": 32, "nets": "resnet", "latent_dim": 64, "batch_size": 512,  # CIFAR-10, NoiseDimension 64
    "width": 768, "max_width": 768, "group_width": 16, "blocks": 2,  # 3/4 x 1024 at 4..32 px; 96 groups of 1536
    "lr": 2e-4, "gamma": 0.05, "schedule_images": 20_000_000,  # -> 5e-5 and 0.005, beta2 0.9 -> 0.99, cosine
    "average_decay": 0.5 ** (512 / 5_000_000), "augment": "ada"}}  # half-life 5M images; ADA: docs/r3gan.md


def parse_args(argv):
    COUNT, RATE, DECAY = number(int, 1), number(float, 1e-12), number(float, 0, 1)
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu (default) or paper; flags given win")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, stacked-mnist or a folder (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=COUNT, default=30, help="total passes over the training set (default 30)")
    p.add_argument("--batch-size", type=COUNT, default=32, help="images a step, over all processes (default 32)")
    p.add_argument("--lr", type=RATE, default=5e-4, help="Adam's learning rate, G and D (default 5e-4)")
    p.add_argument("--latent-dim", type=COUNT, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=int, choices=(28, 32, 64, 128, 256, 512), help="default 28, 64 for a folder")
    p.add_argument("--nets", choices=("conv", "resnet"), default="conv", help="conv (default) or the paper's resnet")
    p.add_argument("--width", type=COUNT, default=32, help="channels at the finest resolution (default 32)")
    p.add_argument("--max-width", type=COUNT, default=128, help="resnet: the widths' cap (default 128)")
    p.add_argument("--group-width", type=COUNT, default=16, help="resnet: channels a group of a 3x3 (default 16)")
    p.add_argument("--blocks", type=COUNT, default=1, help="resnet: residual blocks a resolution (default 1)")
    p.add_argument("--gamma", type=number(float, 0), default=1.0, help="gamma/2 (R1 + R2) (default 1; 0: off)")
    p.add_argument("--schedule-images", type=number(int, 0), default=0, help="the paper's cosines over N images "
                   "(default 0: constant)")
    p.add_argument("--average-decay", type=DECAY, default=0.995, help="of G's moving average (default 0.995)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="what D sees (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1...")
    p.add_argument("--out", default=os.path.join("runs", "r3gan"), help="the run's folder (default runs/r3gan)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G, and D when --gamma is 0")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # the preset's values, under the flags given
    args = p.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device) or args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: use cpu, or cuda, cuda:1, ... where torch sees a GPU")
    for flag, width in ("--width", args.width), ("--max-width", max(args.max_width, args.width)):
        if EXPANSION * width % args.group_width:
            p.error(f"--group-width {args.group_width}: must divide a block's {EXPANSION} x {flag} = "
                    f"{EXPANSION * width} inner channels")
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
