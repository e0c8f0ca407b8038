"""BEGAN (Berthelot et al. 2017, arXiv:1703.10717): D is an autoencoder; G and D balance its reconstruction losses.

    python began.py --dataset fashion-mnist            # 28x28, 5 epochs: grids, GIF, metrics.csv in runs/began/
    python began.py --dataset fashion-mnist --nets paper --out runs/began-paper   # the paper's ELU nets, at 28x28
    python began.py --dataset faces/ --preset paper    # the paper's 64x64 networks and settings (for a GPU)
    python began.py --generate 5000                    # runs/began/samples.npz and samples.png from the checkpoint
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

import data

SCRIPT = os.path.basename(__file__)


def halvings(image_size):  # (the decoders' start side, doublings): 8 and 2 at 32x32 (the paper's 8x8), 7 and 2 at 28
    side, n = image_size, 0
    while side > 8 and side % 2 == 0:
        side, n = side // 2, n + 1
    return side, n


def conv_block(channels, convs):  # `convs` 3x3 convolutions, each followed by an ELU (the paper's unit)
    return [layer for _ in range(convs) for layer in (nn.Conv2d(channels, channels, 3, padding=1), nn.ELU())]


class Decoder(nn.Module):  # h -> image; no BatchNorm anywhere: BEGAN's losses are per image, each judged alone
    def __init__(self, h_dim, image_size, channels, width, convs=2):
        super().__init__()
        self.width, (self.side, doublings) = width, halvings(image_size)
        self.fc = nn.Linear(h_dim, width * self.side ** 2)  # (B, w * 7 * 7), viewed as (B, w, 7, 7) at 28x28
        layers = conv_block(width, convs)  # at 7x7
        for _ in range(doublings):  # (B, w, 2s, 2s): 14x14, 28x28 at 28x28
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), *conv_block(width, convs)]
        layers.append(nn.Conv2d(width, channels, kernel_size=3, padding=1))  # (B, C, S, S)
        self.net = nn.Sequential(*layers)

    def forward(self, h):  # (B, h_dim) -> (B, C, S, S)
        return self.net(self.fc(h).view(len(h), self.width, self.side, self.side))


class Encoder(nn.Module):  # image -> h: each stride-2 conv halves the size and adds w channels (the paper's)
    def __init__(self, image_size, channels, width, h_dim, convs=2):
        super().__init__()
        side, halves = halvings(image_size)  # 7 and 2 at 28x28: 3 blocks
        blocks = halves + 1
        layers = [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ELU()]  # (B, w, S, S)
        for i in range(1, blocks):  # (B, 2w, 14, 14), (B, 3w, 7, 7) at 28x28
            layers += conv_block(width * i, convs)
            layers += [nn.Conv2d(width * i, width * (i + 1), kernel_size=3, stride=2, padding=1), nn.ELU()]
        self.net = nn.Sequential(*layers, *conv_block(width * blocks, convs), nn.Flatten())  # (B, 3w * 7 * 7)
        self.fc = nn.Linear(width * blocks * side * side, h_dim)

    def forward(self, images):
        return self.fc(self.net(images))


class Generator(nn.Module):  # z ~ U[-1, 1]^latent_dim -> image in [-1, 1]: the decoder's shape, with a tanh
    def __init__(self, latent_dim, image_size, channels, width, convs=2):
        super().__init__()
        self.decoder = Decoder(latent_dim, image_size, channels, width, convs)

    def forward(self, z):  # (B, latent_dim) -> (B, C, S, S)
        return torch.tanh(self.decoder(z))


class Discriminator(nn.Module):  # an autoencoder through latent_dim numbers (the paper's Nh = Nz)
    def __init__(self, image_size, channels, width, latent_dim, convs=2):
        super().__init__()
        self.encoder = Encoder(image_size, channels, width, latent_dim, convs)
        self.decoder = Decoder(latent_dim, image_size, channels, width, convs)

    def forward(self, images):  # (B, C, S, S) -> (B, C, S, S)
        return self.decoder(self.encoder(images))


class SmallGenerator(nn.Module):  # --nets infogan: Lucic et al.'s BEGAN G, InfoGAN's 28 px G (BatchNorm, ReLU)
    def __init__(self, latent_dim, image_size, channels, width):
        super().__init__()
        side, flat = image_size // 4, 2 * width * (image_size // 4) ** 2
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 16 * width, bias=False), nn.BatchNorm1d(16 * width), nn.ReLU(),  # (B, 1024)
            nn.Linear(16 * width, flat, bias=False), nn.BatchNorm1d(flat), nn.ReLU(),  # (B, 128 * 7 * 7)
            nn.Unflatten(1, (2 * width, side, side)),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1), nn.Tanh())  # (B, 64, 14, 14), (B, C, 28, 28)

    def forward(self, z):
        return self.net(z)


class SmallDiscriminator(nn.Module):  # --nets infogan: an autoencoder with one conv each way, through 32 numbers
    def __init__(self, image_size, channels, width, h_dim=32):
        super().__init__()
        side = image_size // 2
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),  # (B, 64 * 14 * 14)
            nn.Linear(width * side * side, h_dim), nn.Linear(h_dim, width * side * side), nn.ReLU(),  # no BatchNorm
            nn.Unflatten(1, (width, side, side)), nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1))

    def forward(self, images):  # (B, C, S, S) -> (B, C, S, S)
        return self.net(images)


def build(nets, latent_dim, image_size, channels, width, convs):  # (G, D): the paper's, or the CPU default's
    if nets == "paper":
        return (Generator(latent_dim, image_size, channels, width, convs),
                Discriminator(image_size, channels, width, latent_dim, convs))
    return SmallGenerator(latent_dim, image_size, channels, width), SmallDiscriminator(image_size, channels, width)


def sample_z(n, latent_dim, device, generator=None):  # the paper's U[-1, 1]; with a generator drawn on the CPU
    return (torch.rand(n, latent_dim, generator=generator, device="cpu" if generator else device) * 2 - 1).to(device)


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: the reconstruction loss, the alternating update and the control of k_t

def reconstruction_loss(D, images):  # L(v) = mean |v - D(v)|, one value an image (B,): D's score, low = real
    return (D(images).float() - images.float()).abs().flatten(1).mean(1)


def average_gradients(model):
    if dist.is_initialized():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]) / dist.get_world_size()
        dist.all_reduce(flat)
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, real, k, latent_dim, gamma, lambda_k, scaler, augment=None, amp=False):
    """One D update (L(x) - k_t L(G(z))), one G update (L(G(z))), then k_t, a device scalar, in place. Returns d_loss,
    g_loss, L(x), L(G(z)), M_global as one device tensor. ADA: a real is "called real" when D reconstructs it better."""
    shown = augment or (lambda images: images)  # what D is shown (and asked to reconstruct) of an image
    cast = torch.float16 if real.device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    z = sample_z(len(real), latent_dim, real.device)
    with torch.autocast(real.device.type, cast, enabled=amp):
        fake = G(z)
        # reals and fakes in one forward (no BatchNorm to mix them); the fakes detached, not into G
        l_real, l_fake = reconstruction_loss(D, torch.cat([shown(real), shown(fake.detach())])).split(len(real))
        if augment:
            augment.observe(l_fake.detach().mean() - l_real.detach())
        l_real, l_fake = l_real.mean(), l_fake.mean()
        loss_d = l_real - k * l_fake  # D reconstructs the reals well and pushes the fakes away, weighted by k_t
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    average_gradients(D)
    scaler.step(opt_d)

    D.requires_grad_(False)  # G's backward passes through D to the image without filling D's gradients
    with torch.autocast(real.device.type, cast, enabled=amp):
        loss_g = reconstruction_loss(D, shown(fake)).mean()
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    balance = torch.stack([l_real.detach(), l_fake.detach()])
    if dist.is_initialized():  # every process moves k alike: by the whole batch's losses
        dist.all_reduce(balance.div_(dist.get_world_size()))
    # k grows while D reconstructs the fakes too well (L(G(z)) < gamma L(x)) and D pushes them harder. M_global is
    # small when D reconstructs the reals well and the balance holds, collapsed samples or not: read it with the grids.
    imbalance = gamma * balance[0] - balance[1]
    k.copy_((k + lambda_k * imbalance).clamp(0.0, 1.0))
    m_global = balance[0] + imbalance.abs()
    return torch.stack([loss_d.detach().float(), loss_g.detach().float(), *balance, m_global])


@torch.no_grad()
def update_average(G_average, G, step, decay):
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm's running statistics
        average.copy_(current)


@torch.no_grad()
def d_reconstruction(D, G, reals, latent_dim, n=1000):
    """In place of an accuracy: D's mean reconstruction loss on n training, held-out and fresh fake images."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    losses = {name: images is not None and torch.cat([reconstruction_loss(D, data.to_float(x.to(device)))
                                                      for x in images[:n].split(250)]).mean()
              for name, images in reals.items()}
    losses["d_recon_fake"] = torch.cat([reconstruction_loss(D, G(sample_z(250, latent_dim, device)))
                                        for _ in range(n // 250)]).mean()
    D.train(), G.train()
    return {name: f"{value:.5f}" if value is not False else "" for name, value in losses.items()}


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
    channels = dataset.image_shape[0]

    torch.manual_seed(args.seed)  # the same initial weights in every process
    G, D = build(args.nets, args.latent_dim, args.image_size, channels, args.width, args.convs)
    # PyTorch's default init (He's made G draw noisy textures); NHWC: ~20% faster 3x3 convolutions on a CPU
    G, D = G.to(device, memory_format=torch.channels_last), D.to(device, memory_format=torch.channels_last)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))  # DCGAN's beta1: 0.9 overshoots
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    augment = data.make_augmentation(args.augment, channels, device)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d,
             **({"augment": augment} if augment else {})}
    start_epoch, history = data.resume(checkpoint, parts, device) if checkpoint else (0, [])  # weights, RNG, log
    k = torch.tensor(checkpoint["k"] if checkpoint else 0.0, device=device)  # k_0 = 0: D first learns the reals
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)  # sharing G's and D's weights
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    grid_noise = sample_z(100, args.latent_dim, device, torch.Generator().manual_seed(args.seed))
    reals = {"d_recon_real_train": dataset.images, "d_recon_real_test": held_out and held_out.images}
    names = ["d_loss", "g_loss", "l_real", "l_fake", "m_global"]  # the epoch's means; then k_t as it stands
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, {len(batches)} steps an epoch, {device}")
    last_m = float(history[-1]["m_global"]) if history else math.inf
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for i, (real, _) in enumerate(batches.epoch(epoch), 1):
            real = real.tensor_split(world_size)[rank].contiguous(memory_format=torch.channels_last)
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, k, args.latent_dim, args.gamma, args.lambda_k,
                                 scaler, augment, args.amp)
            update_average(G_average, G, (epoch - 1) * len(batches) + i, args.average_decay)
            if i % args.log_every == 0 or i == len(batches):
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means.div_(world_size))
                means = means.tolist() + [k.item()]  # the only sync with the device, every --log-every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"the losses became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch}")
                if rank == 0:
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | d_loss {means[0]:.3f} g_loss "
                          f"{means[1]:.3f} | M_global {means[4]:.3f} k_t {means[5]:.4f} | "
                          f"{i * args.batch_size / (time.time() - started):.0f} img/s", flush=True)
        if means[4] >= last_m:  # M_global stalled: both rates halve, down to a tenth (the paper's schedule, per epoch)
            for group in opt_g.param_groups + opt_d.param_groups:
                group["lr"] = max(group["lr"] / 2, args.lr / 10)
        last_m = float(f"{means[4]:.5f}")  # as metrics.csv has it, which --resume reads back
        if rank > 0:
            continue
        seconds = time.time() - started
        accuracy = d_reconstruction(D, G, reals, args.latent_dim)
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names + ["k_t"], means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{len(dataset.images) / seconds:.1f}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        with torch.no_grad():
            grid = G_average.eval()(grid_noise)
        curves = ["d_loss", "g_loss", "m_global", "k_t"] + ["augment_p"] * (args.augment == "ada")
        data.save_epoch(args.out, epoch, history, curves, grid,
                        {"script": SCRIPT, "epoch": epoch, "args": vars(args), "history": history, "k": k.item(),
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
    z = sample_z(n, latent_dim, "cpu", torch.Generator().manual_seed(seed))
    return torch.cat([data.to_uint8(G.eval()(batch.to(device))).cpu() for batch in z.split(500)])


def generate(args):
    checkpoint = load_checkpoint(args)
    saved = argparse.Namespace(**checkpoint["args"])
    channels, image_size = checkpoint["image_shape"][0], checkpoint["image_shape"][-1]
    G = build(saved.nets, saved.latent_dim, image_size, channels, saved.width, saved.convs)[0].to(args.device)
    G.load_state_dict(checkpoint["generator_average"])
    data.save_samples(args.out, generate_images(G, args.generate, saved.latent_dim, args.device, args.seed))


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


KEPT = ("preset", "image_size", "nets", "width", "convs", "latent_dim", "gamma", "lambda_k", "batch_size", "lr", "seed",
        "average_decay", "train_images", "augment")  # the preset first: another one is refused by name


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


# --preset paper (for a GPU): secs. 3.4-4.1 and Figure 1.
PRESETS = {"cpu": {}, "paper": {"image_size": 64, "nets": "paper", "width": 64, "convs": 2, "latent_dim": 64,
                                "batch_size": 16, "lr": 1e-4, "gamma": 0.5, "lambda_k": 0.001}}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu (default) or paper; flags given win")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, stacked-mnist or a folder (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=COUNT, default=5, help="total passes over the training set (default 5)")
    p.add_argument("--batch-size", type=COUNT, default=64, help="images a step, over all processes (default 64)")
    p.add_argument("--lr", type=RATE, default=2e-4, help="Adam's learning rate, G and D (default 2e-4)")
    p.add_argument("--latent-dim", type=COUNT, default=64, help="size of z (and of the paper nets' bottleneck; "
                   "default 64)")
    p.add_argument("--image-size", type=int, choices=(28, 32, 64, 128, 256, 512, 1024), help="default 28, a folder 64")
    p.add_argument("--nets", choices=("infogan", "paper"), default="infogan", help="infogan: InfoGAN's G and a "
                   "one-conv autoencoder D, Lucic et al.'s (default); paper: the paper's ELU nets")
    p.add_argument("--width", type=COUNT, default=64, help="infogan: G's last and D's channels; paper: the decoders' "
                   "channels, added at each halving (default 64)")
    p.add_argument("--convs", type=COUNT, default=2, help="paper nets: 3x3 convolutions a resolution (default 2)")
    p.add_argument("--gamma", type=RATE, default=1.1, help="the L(G(z)) / L(x) k_t aims at (default 1.1; paper 0.5)")
    p.add_argument("--lambda-k", type=number(float, 0), default=0.01, help="gain of k_t's control (default 0.01)")
    p.add_argument("--average-decay", type=DECAY, default=0.0, help="of the moving average of G samples come from "
                   "(default 0: G itself, docs/began.md)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="what D sees (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1...")
    p.add_argument("--out", default=os.path.join("runs", "began"), help="the run's folder (default runs/began)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # then the flags given win
    args = p.parse_args(argv)
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
