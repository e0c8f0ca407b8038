"""InfoGAN (Chen et al. 2016, arXiv:1606.03657): a GAN whose latent codes learn, without labels, to mean something.

    python infogan.py                                  # MNIST (45 epochs): one grid row per code value, runs/infogan/
    python infogan.py --preset paper                   # the paper's MNIST networks and hyper-parameters (a GPU's job)
    python infogan.py --generate 5000                  # samples.npz, its labels the images' categorical codes

G reads z and codes c (a categorical one, --continuous ones in [-1, 1]); Q, a head on D's body, reads c back from G's
images, and G and Q both minimise Q's error, a lower bound on I(c; G(z, c)). Unlabelled, the MNIST categorical code
becomes the digit, the continuous ones slant and width: continuous_K.png sweeps code K from -2 to 2 along each row.
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


def layout(image_size, width):
    """(side of the first feature map, channels of each stride-2 stage): 7 -> 14 -> 28 at 28 px, else 8 -> 16 -> ..."""
    start = 7 if image_size == 28 else 8
    stages = (image_size // start).bit_length() - 1  # 2 at 28 and 32, 3 at 64
    return start, [width * 2 ** (stages - 1 - i) for i in range(stages)]  # [2w, w] at 28/32, [4w, 2w, w] at 64


class Generator(nn.Module):
    """(z, categorical code, continuous codes) -> image in [-1, 1]. At --width 64 the paper's MNIST generator: fc 1024,
    fc 128x7x7, 4x4 stride-2 transposed convolutions to 64 channels and to the image; BatchNorm and ReLU between."""

    def __init__(self, latent_dim, categories, continuous, image_size, channels, width):
        super().__init__()
        self.latent_dim, self.categories, self.continuous = latent_dim, categories, continuous
        start, widths = layout(image_size, width)
        hidden, flat = 16 * width, widths[0] * start * start
        layers = [nn.Linear(latent_dim + categories + continuous, hidden, bias=False), nn.BatchNorm1d(hidden),
                  nn.ReLU(), nn.Linear(hidden, flat, bias=False), nn.BatchNorm1d(flat), nn.ReLU(),  # (B, 128 * 7 * 7)
                  nn.Unflatten(1, (widths[0], start, start))]  # (B, 128, 7, 7)
        for c_in, c_out in zip(widths, widths[1:]):  # (B, 64, 14, 14)
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, stride=2, padding=1), nn.Tanh()]  # (B, C, 28, 28)
        self.net = nn.Sequential(*layers)

    def forward(self, z, code_cat, code_cont):  # (B, latent_dim), (B,) int64, (B, continuous) -> (B, C, S, S)
        return self.net(torch.cat([z, F.one_hot(code_cat, self.categories).to(z.dtype), code_cont.to(z.dtype)], 1))


class Discriminator(nn.Module):
    """Image -> real/fake logit; with recognise=True also Q's reading of the codes (categorical logits, continuous
    means). At --width 64 the paper's: 4x4 stride-2 convolutions to 64 and 128 channels, fc 1024; Q adds fc 128."""

    def __init__(self, categories, continuous, image_size, channels, width):
        super().__init__()
        self.categories = categories
        start, widths = layout(image_size, width)
        widths, hidden = widths[::-1], 16 * width  # [w, 2w] at 28/32: the channels double as the side halves
        layers = [nn.Conv2d(channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.1)]  # (B, 64, 14, 14)
        for c_in, c_out in zip(widths, widths[1:]):  # (B, 128, 7, 7)
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]
        layers += [nn.Flatten(), nn.Linear(widths[-1] * start * start, hidden, bias=False),  # (B, 1024)
                   nn.BatchNorm1d(hidden), nn.LeakyReLU(0.1)]
        self.body = nn.Sequential(*layers)
        self.logit = nn.Linear(hidden, 1)
        self.q = nn.Sequential(nn.Linear(hidden, 2 * width, bias=False), nn.BatchNorm1d(2 * width),  # (B, 128)
                               nn.LeakyReLU(0.1), nn.Linear(2 * width, categories + continuous))  # (B, 10 + 2)

    def forward(self, images, recognise=False):  # (B, C, S, S) -> (B,), or ((B,), ((B, categories), (B, continuous)))
        h = self.body(images)
        logits = self.logit(h).squeeze(1)
        if not recognise:
            return logits
        codes = self.q(h).float()  # float32 under --amp too: the information term is taken from it
        return logits, (codes[:, :self.categories], codes[:, self.categories:])


def init_weights(module):
    """DCGAN's init: conv and linear weights from N(0, 0.02); BatchNorm's scale from N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------
# InfoGAN itself: the codes, the GAN losses, the information term and the alternating update

def sample_latent(n, G, device, generator=None):
    """z ~ N(0, I), a uniform categorical code, continuous codes uniform in [-1, 1]; from `generator` if given."""
    where = "cpu" if generator is not None else device
    z = torch.randn(n, G.latent_dim, generator=generator, device=where)
    code_cat = torch.randint(G.categories, (n,), generator=generator, device=where)
    code_cont = torch.rand(n, G.continuous, generator=generator, device=where) * 2 - 1
    return z.to(device), code_cat.to(device), code_cont.to(device)


def d_loss(real_logits, fake_logits):
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits):  # non-saturating -log D(G(z))
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def information_loss(q, code_cat, code_cont, lambda_cat, lambda_cont):
    """The weighted negative information bound: -log Q(c | x) of the codes drawn (their entropies are constants), with
    q = D(images, recognise=True)[1]. -> (total, cat, cont). The continuous codes' Gaussian has unit variance, as in
    the paper's code: a learned variance, or --lambda-cont 1, lets those codes carry the digit itself on MNIST."""
    cat = F.cross_entropy(q[0], code_cat)  # log(categories) minus this bounds I(c_cat; G(z, c)) from below, in nats
    cont = (0.5 * (code_cont - q[1]) ** 2 + 0.5 * math.log(2 * math.pi)).sum(dim=1).mean()  # summed over the codes
    return lambda_cat * cat + lambda_cont * cont, cat, cont


def average_gradients(model):
    """Under torchrun, each gradient becomes its mean over the processes (one flat all-reduce; why by hand: gan.py)."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, real, scaler, lambda_cat=1.0, lambda_cont=0.1, augment=None, amp=False):
    """One D-and-Q update, then one G update against the D and Q just improved. Q reads the codes from fakes only,
    through the augmentation D sees. Returns the GAN losses, D's mean outputs, Q's terms and accuracy as one tensor."""
    shown = augment or (lambda images: images)  # what D is shown of an image
    cast = torch.float16 if real.device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    z, code_cat, code_cont = sample_latent(len(real), G, real.device)
    with torch.autocast(real.device.type, cast, enabled=amp):
        fake = G(z, code_cat, code_cont)
        real_logits = D(shown(real)).float()
        fake_logits, q = D(shown(fake.detach()), recognise=True)  # not into G
        info_d, _, _ = information_loss(q, code_cat, code_cont, lambda_cat, lambda_cont)
        loss_d = d_loss(real_logits, fake_logits.float())
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d + info_d).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:  # ADA's p moves by what D said of the reals
        augment.observe(real_logits.detach())

    D.requires_grad_(False)  # G's backward passes through D and Q to the image without filling their gradients
    with torch.autocast(real.device.type, cast, enabled=amp):
        fake_logits_g, q = D(shown(fake), recognise=True)
        loss_g = g_loss(fake_logits_g.float())
        info_g, info_cat, info_cont = information_loss(q, code_cat, code_cont, lambda_cat, lambda_cont)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g + info_g).backward()  # G must draw the codes so that Q reads them
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    code_acc = (q[0].detach().argmax(dim=1) == code_cat).float().mean()  # how often Q reads the code right
    return torch.stack([loss_d.detach(), loss_g.detach(), real_logits.detach().sigmoid().mean(),
                        fake_logits.detach().float().sigmoid().mean(), info_cat.detach(), info_cont.detach(), code_acc])


@torch.no_grad()
def update_average(G_average, G, step, decay):
    """The moving average of G's weights that samples come from (why: gan.py)."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm's running statistics
        average.copy_(current)


@torch.no_grad()
def d_accuracy(D, G, reals, n=1000):
    """The share of n training and n held-out images D calls real, of n fakes of the raw G fake (why: gan.py)."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    share = {name: images is not None and torch.cat([D(data.to_float(x.to(device))) > 0
                                                     for x in images[:n].split(250)]).float().mean()
             for name, images in reals.items()}
    share["d_acc_fake"] = torch.cat([D(G(*sample_latent(250, G, device))) <= 0 for _ in range(n // 250)]).float().mean()
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
    dataset = data.load_data(args.dataset, args.data_dir, args.image_size, rank)  # its labels are never read
    dataset.images, dataset.labels = dataset.images[:args.train_images], dataset.labels[:args.train_images]
    held_out = data.load_data(args.dataset, args.data_dir, args.image_size, rank, split="test")
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    if len(dataset.images) // len(batches) < 2 * world_size:  # BatchNorm's batch statistics need 2 or more
        raise UsageError(f"{len(dataset.images)} images: BatchNorm needs at least 2 images a step and process")

    torch.manual_seed(args.seed)  # the same initial weights in every process
    channels = dataset.image_shape[0]
    G = Generator(args.latent_dim, args.categories, args.continuous, args.image_size, channels, args.width)
    D = Discriminator(args.categories, args.continuous, args.image_size, channels, args.width)
    G, D = G.apply(init_weights).to(device), D.apply(init_weights).to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    # The paper's Adam: lr 2e-4 for D, 1e-3 for G; Q's own layers chase G's drawing of the codes: G's rate.
    opt_d = torch.optim.Adam([{"params": [*D.body.parameters(), *D.logit.parameters()]},
                              {"params": D.q.parameters(), "lr": args.lr_g}], lr=args.lr, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
    augment = data.make_augmentation(args.augment, channels, device)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d,
             **({"augment": augment} if augment else {})}  # Q's weights are D's: "discriminator" holds them
    start_epoch, history = data.resume(checkpoint, parts, device) if checkpoint else (0, [])  # weights, RNG, log
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)  # sharing G's and D's weights
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    grid = grid_latents(G, 10, args.seed, device)  # the same latents every epoch
    sweeps = [(f"continuous_{k + 1}.png", grid_latents(G, 10, args.seed, device, k)) for k in range(args.continuous)]
    reals = {"d_acc_real_train": dataset.images, "d_acc_real_test": held_out and held_out.images}
    names = ["d_loss", "g_loss", "d_real", "d_fake", "info_cat", "info_cont", "code_acc"]
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, {len(batches)} steps an epoch, {device}")
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for i, (real, _) in enumerate(batches.epoch(epoch), 1):
            real = real.tensor_split(world_size)[rank]  # this process's share of the global batch
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, scaler, args.lambda_cat, args.lambda_cont,
                                 augment, args.amp)
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
                          f"{means[1]:.3f} | info {means[4]:.3f} {means[5]:.3f} | Q reads {means[6]:.0%} of codes | "
                          f"{i * args.batch_size / (time.time() - started):.0f} img/s", flush=True)
        if rank > 0:
            continue
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, reals)
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{len(dataset.images) / seconds:.1f}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        with torch.no_grad():
            images, pictures = G_average.eval()(*grid), [(name, G_average(*latents)) for name, latents in sweeps]
        curves = ["d_loss", "g_loss", "info_cat", "info_cont"] + ["augment_p"] * (args.augment == "ada")
        data.save_epoch(args.out, epoch, history, curves, images, {
            "script": SCRIPT, "epoch": epoch, "args": vars(args), "history": history, "classes": dataset.classes,
            "image_shape": list(dataset.image_shape), **{key: part.state_dict() for key, part in parts.items()},
            **data.random_states(device)}, pictures)
    if args.fid and rank == 0:  # fid.py is imported only here: only --fid needs it
        import fid
        code_cat = torch.arange(args.fid) % args.categories  # every code value equally often
        try:
            print(fid.report(generate_images(G_average, code_cat, device, args.seed + 1), dataset.images[:10_000],
                             device, cache_dir=dataset.cache_dir))
        except fid.FIDError as e:
            raise UsageError(f"--fid: {e}") from None


def grid_latents(G, columns, seed, device, sweep=None):
    """A row per categorical value, a fixed (z, continuous codes) a column: one style a column. With sweep=K, one z
    and continuous code K from -2 to 2 along each row, the others 0 (beyond [-1, 1], as in the paper's Figure 2)."""
    z, _, code_cont = sample_latent(columns, G, "cpu", generator=torch.Generator().manual_seed(seed))
    code_cat = torch.arange(G.categories).repeat_interleave(columns)
    z, code_cont = z.repeat(G.categories, 1), code_cont.repeat(G.categories, 1)
    if sweep is not None:
        z, code_cont = z[:1].repeat(len(z), 1), torch.zeros_like(code_cont)
        code_cont[:, sweep] = torch.linspace(-2, 2, columns).repeat(G.categories)
    return z.to(device), code_cat.to(device), code_cont.to(device)


@torch.no_grad()
def generate_images(G, code_cat, device, seed, batch_size=500):
    """One image per categorical code as uint8 (n, C, H, W), fresh z and continuous codes, G in eval mode."""
    G.eval()
    noise, images = torch.Generator().manual_seed(seed), []
    for chunk in code_cat.split(batch_size):
        z, _, code_cont = sample_latent(len(chunk), G, "cpu", generator=noise)
        images.append(data.to_uint8(G(z.to(device), chunk.to(device), code_cont.to(device))).cpu())
    return torch.cat(images)


def generate(args):
    checkpoint = load_checkpoint(args)
    saved = argparse.Namespace(**checkpoint["args"])
    if args.label is not None and args.label >= saved.categories:
        raise UsageError(f"--label {args.label}: the categorical code takes the values 0..{saved.categories - 1}")
    G = Generator(saved.latent_dim, saved.categories, saved.continuous, saved.image_size, checkpoint["image_shape"][0],
                  saved.width).to(args.device)
    G.load_state_dict(checkpoint["generator_average"])
    code_cat = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    code_cat %= saved.categories  # without --label: the code values in turn; samples.npz's labels
    data.save_samples(args.out, generate_images(G, code_cat, args.device, args.seed), code_cat)


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


KEPT = ("preset", "image_size", "width", "latent_dim", "categories", "continuous", "batch_size", "lr", "lr_g",
        "lambda_cat", "lambda_cont", "seed", "average_decay", "train_images", "augment")  # the preset first: by name


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


COUNT, RATE, DECAY, WEIGHT = number(int, 1), number(float, 1e-12), number(float, 0, 1), number(float, 0)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# --preset paper: the paper's MNIST model (appendix C, Table 1) and its authors' run (openai/InfoGAN: batch 128), whose
# code weighs every code 1 and draws z uniform; the paper's text and this script weigh continuous codes 0.1, z normal.
PRESETS = {"cpu": {}, "paper": {"image_size": 28, "width": 64, "latent_dim": 62, "categories": 10, "continuous": 2,
                                "batch_size": 128, "lr": 2e-4, "lr_g": 1e-3, "lambda_cat": 1.0}}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu (default) or paper; flags given win")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, stacked-mnist or a folder (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=COUNT, default=45, help="total passes over the training set (default 45)")
    p.add_argument("--batch-size", type=COUNT, default=64, help="images a step, over all processes (default 64)")
    p.add_argument("--lr", type=RATE, default=2e-4, help="Adam's learning rate of D (default 2e-4, the paper's)")
    p.add_argument("--lr-g", type=RATE, default=1e-3, help="of G and Q's own layers (default 1e-3, the paper's)")
    p.add_argument("--latent-dim", type=COUNT, default=62, help="size of the noise vector z (default 62, the paper's)")
    p.add_argument("--categories", type=COUNT, default=10, help="values of the categorical code (default 10)")
    p.add_argument("--continuous", type=number(int, 0), default=2, help="continuous codes (default 2; 0 for none)")
    p.add_argument("--lambda-cat", type=WEIGHT, default=2.0, help="weight of its information term (default 2; "
                   "the paper's 1)")
    p.add_argument("--lambda-cont", type=WEIGHT, default=0.1, help="weight of theirs (default 0.1, the paper's)")
    p.add_argument("--image-size", type=COUNT, help="28 or a power of two >= 32 (default 28, 64 for a folder)")
    p.add_argument("--width", type=COUNT, default=32, help="channels of G's last and D's first layer (default 32)")
    p.add_argument("--average-decay", type=DECAY, default=0.999, help="of the moving average of G (default 0.999)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="augment every image D "
                   "sees, always (diffaug) or adaptively (ada): for a few thousand images or fewer (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=os.path.join("runs", "infogan"), help="the run's folder (default runs/infogan)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: N images, codes to OUT/samples.npz")
    p.add_argument("--label", type=number(int, 0), metavar="K", help="with --generate: categorical code K only")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # flags given on the command line win
    args = p.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device) or args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: use cpu, or cuda, cuda:1, ... where torch sees a GPU")
    if args.image_size and args.image_size != 28 and (args.image_size < 32 or args.image_size & args.image_size - 1):
        p.error(f"--image-size {args.image_size}: use 28 or a power of two, at least 32")
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
