"""AC-GAN (Odena et al. 2017, arXiv:1610.09585): a class-conditional G, and a D that also names the class it sees;
by default with TAC-GAN's twin class head (Gong et al. 2019, arXiv:1907.02690) and MSGAN's mode-seeking term (Mao et
al. 2019, arXiv:1903.05628), which keep each class from shrinking to a few prototypes.

    python acgan.py --dataset fashion-mnist            # 6 epochs, 28x28, one row per class: runs/acgan/
    python acgan.py --generate 1000 --label 3          # 1000 dresses into runs/acgan/samples.npz (with labels)
    python acgan.py --class-loss paper                 # the paper's own loss: D's class head also names the fakes
    python acgan.py --preset paper --dataset DIR       # the paper's CIFAR-10 sizes and hyper-parameters, for a GPU
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
    """z and a class -> image in [-1, 1]: the class as a learned embedding beside z, a 4x4 (7x7) map, then one stride-2
    transposed convolution per doubling (kernel 4, stride 2: every output pixel covered equally, no checkerboard)."""

    def __init__(self, latent_dim, image_size, channels, width, num_classes, label_dim=16):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, label_dim)
        start, doublings = (7, 2) if image_size == 28 else (4, image_size.bit_length() - 3)  # 7, 14, 28 at 28x28
        width_at = [width * 2 ** i for i in reversed(range(doublings))]  # 4w, 2w, w at 4x4, 8x8, 16x16 (32x32)
        layers = [nn.ConvTranspose2d(latent_dim + label_dim, width_at[0], start, bias=False),
                  nn.BatchNorm2d(width_at[0]), nn.ReLU()]  # (B, 4w, 4, 4) at 32x32
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, 8, 8), (B, w, 16, 16) at 32x32
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU()]
        layers += [nn.ConvTranspose2d(width_at[-1], channels, 4, stride=2, padding=1), nn.Tanh()]  # (B, C, 32, 32)
        self.net = nn.Sequential(*layers)

    def forward(self, z, labels):  # (B, latent_dim), (B,) -> (B, C, S, S)
        z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """Image (never its label) -> (real/fake logit, class logits, twin class logits or None): stride-2 convolutions
    down to 4x4 (7x7), linear heads on the shared features (learning the classes shapes them: Odena et al., sec. 3)."""

    def __init__(self, image_size, channels, width, num_classes, twin=True):
        super().__init__()
        start, doublings = (7, 2) if image_size == 28 else (4, image_size.bit_length() - 3)
        width_at = [width * 2 ** i for i in range(doublings)]  # 16x16, 8x8, 4x4 at 32x32; 14x14, 7x7 at 28x28
        layers = [nn.Conv2d(channels, width_at[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]  # (B, w, 16, 16)
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, 8, 8), (B, 4w, 4, 4) at 32x32
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())  # (B, 4w * 4 * 4)
        features = width_at[-1] * start ** 2
        self.source = nn.Linear(features, 1)
        self.classes = nn.Linear(features, num_classes)
        self.twin = nn.Linear(features, num_classes) if twin else None

    def forward(self, images):  # (B, C, S, S) -> (B,), (B, num_classes), (B, num_classes) or None
        h = self.features(images)
        return self.source(h).squeeze(1), self.classes(h), self.twin(h) if self.twin is not None else None


def init_weights(module):
    """DCGAN's init: conv and linear weights from N(0, 0.02), BatchNorm scales from N(1, 0.02). G's label embedding
    keeps its N(0, 1), the scale of z, so that the class is not drowned out."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: the paper's two log-likelihoods, the losses built from them, and the alternating update

def source_loss(logits, real):
    """-L_S: minus the mean log-likelihood of the right source, from logits (float32, also under --amp)."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, float(real), dtype=torch.float))


def class_loss(class_logits, labels):
    """-L_C: minus the mean log-likelihood of the right class."""
    return F.cross_entropy(class_logits.float(), labels)


def d_loss(real_logits, fake_logits, real_class_logits, fake_class_logits, labels, class_weight=1.0,
           fake_labels=None):
    """D maximises L_S + L_C: the right source of reals and fakes, and the right class of both (of a fake, the class
    G was asked for) by the class head (the paper) or TAC-GAN's twin head, which keeps G and D from agreeing on a
    private mark in place of the class (on MNIST whole rows of 2s came out as 7s, "rightly" named by D)."""
    return (source_loss(real_logits, real=True) + source_loss(fake_logits, real=False)
            + class_weight * (class_loss(real_class_logits, labels)
                              + class_loss(fake_class_logits, labels if fake_labels is None else fake_labels)))


def g_loss(fake_logits, fake_class_logits, labels, class_weight=1.0, fake_twin_logits=None):
    """G: non-saturating -log D(G(z)) plus the right class of its fakes, which alone pulls each class to a few easy
    prototypes (Shu et al. 2017); TAC-GAN subtracts the twin's term, so no mark pays off."""
    loss_c = class_loss(fake_class_logits, labels)
    if fake_twin_logits is not None:
        loss_c = loss_c - class_loss(fake_twin_logits, labels)
    return source_loss(fake_logits, real=True) + class_weight * loss_c


def mode_seeking_loss(fake, z):
    """MSGAN (Mao et al. 2019): the fakes' pairs (i, i + B/2), each pair one class, should differ as much as their z
    do; G minimises the inverse of that ratio, so it cannot draw one prototype per class whatever z says."""
    half = len(z) // 2
    ratio = (fake[:half] - fake[half:2 * half]).abs().mean() / (z[:half] - z[half:2 * half]).abs().mean()
    return 1 / (ratio.float() + 1e-5)


def average_gradients(model):
    """Under torchrun, each gradient becomes its mean over the processes, in one flat all-reduce (why: gan.py)."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler, class_weight=1.0, augment=None, amp=False,
               mode_seeking=0.0):
    """One D update, then one G update against the D just improved, the fakes drawn for the real batch's labels. D's
    twin head, if it has one, makes it TAC-GAN. Returns the losses and D's mean outputs as one device tensor."""
    shown = augment or (lambda images: images)  # what D is shown of an image
    cast = torch.float16 if real.device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    z = torch.randn(len(real), latent_dim, device=real.device)
    half = len(labels) // 2  # with the mode-seeking term, fakes i and i + B/2 are of one class
    fake_labels = torch.cat([labels[:half], labels[:half], labels[2 * half:]]) if mode_seeking else labels
    with torch.autocast(real.device.type, cast, enabled=amp):
        fake = G(z, fake_labels)
        (real_logits, real_class_logits, _), (fake_logits, fake_class_logits, fake_twin_logits) = (
            D(shown(real)), D(shown(fake.detach())))  # not into G
        loss_d = d_loss(real_logits, fake_logits, real_class_logits,
                        fake_class_logits if fake_twin_logits is None else fake_twin_logits, labels, class_weight,
                        fake_labels)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:  # ADA's p moves by what the source head said of the reals (a logit: real above 0)
        augment.observe(real_logits.detach().float())

    D.requires_grad_(False)  # G's backward passes through D to the image without filling D's gradients
    with torch.autocast(real.device.type, cast, enabled=amp):
        g_logits, g_class_logits, g_twin_logits = D(shown(fake))
        loss_g = g_loss(g_logits, g_class_logits, fake_labels, class_weight, g_twin_logits)
        if mode_seeking:
            loss_g = loss_g + mode_seeking * mode_seeking_loss(fake, z)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    twin = [] if g_twin_logits is None else [class_loss(g_twin_logits.detach(), fake_labels)]
    return torch.stack([loss_d.detach(), loss_g.detach(), real_logits.detach().float().sigmoid().mean(),
                        fake_logits.detach().float().sigmoid().mean(), class_loss(real_class_logits.detach(), labels),
                        class_loss(g_class_logits.detach(), fake_labels), *twin])


@torch.no_grad()
def update_average(G_average, G, step, decay):
    """The moving average of G's weights that samples come from, its decay ramped up (why: gan.py)."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm's running statistics
        average.copy_(current)


@torch.no_grad()
def d_accuracy(D, G, reals, latent_dim, num_classes, n=1000):
    """gan.py's check of D, for both heads: the share of n training, n held-out images ((uint8 images, labels) or None)
    and n fakes of the raw G that the source head judges rightly and the class head names rightly."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    share, class_share = {}, {}
    for split, images_labels in reals.items():
        if images_labels is None:  # a folder has no held-out split
            share[f"d_acc_real_{split}"] = class_share[f"d_class_acc_{split}"] = ""
            continue
        images, labels = images_labels
        logits, class_logits, _ = zip(*(D(data.to_float(x.to(device))) for x in images[:n].split(250)))
        share[f"d_acc_real_{split}"] = f"{(torch.cat(logits) > 0).float().mean():.4f}"
        hits = torch.cat(class_logits).argmax(1) == labels[:n].to(device)
        class_share[f"d_class_acc_{split}"] = f"{hits.float().mean():.4f}"
    labels = torch.randint(num_classes, (n,), device=device)
    logits, class_logits, _ = zip(*(D(G(torch.randn(len(chunk), latent_dim, device=device), chunk))
                                    for chunk in labels.split(250)))
    share["d_acc_fake"] = f"{(torch.cat(logits) <= 0).float().mean():.4f}"
    class_share["d_class_acc_fake"] = f"{(torch.cat(class_logits).argmax(1) == labels).float().mean():.4f}"
    D.train(), G.train()
    return {**share, **class_share}


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
    num_classes, channels = dataset.num_classes, dataset.image_shape[0]
    if num_classes < 2:  # the class heads would have nothing to learn
        raise UsageError(f"{dataset.source} holds a single class: an AC-GAN needs a folder of class folders")

    torch.manual_seed(args.seed)  # the same initial weights in every process
    G = Generator(args.latent_dim, args.image_size, channels, args.width, num_classes)
    D = Discriminator(args.image_size, channels, args.width, num_classes, twin=args.class_loss == "tac")
    G, D = G.apply(init_weights).to(device), D.apply(init_weights).to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))  # beta1 0.5: why in gan.py
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    augment = data.make_augmentation(args.augment, channels, device)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d,
             **({"augment": augment} if augment else {})}
    start_epoch, history = data.resume(checkpoint, parts, device) if checkpoint else (0, [])  # weights, RNG, log
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)  # sharing G's and D's weights
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    grid_noise = torch.randn(10, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    grid_labels = data.grid_classes(num_classes).repeat_interleave(10).to(device)  # a row a class (10 at most)
    grid_noise = grid_noise.repeat(len(grid_labels) // 10, 1).to(device)  # one z down each column
    reals = {"train": (dataset.images, dataset.labels), "test": held_out and (held_out.images, held_out.labels)}
    names = ["d_loss", "g_loss", "d_real", "d_fake", "class_loss_real", "class_loss_fake"]
    names += ["twin_loss_fake"] * (args.class_loss == "tac")
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, {len(batches)} steps an epoch, {device}")
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for i, (real, labels) in enumerate(batches.epoch(epoch), 1):
            real, labels = real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank]
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, scaler,
                                 args.class_weight, augment, args.amp, args.mode_seeking)
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
                          f"{means[1]:.3f} | D out real {means[2]:.2f} fake {means[3]:.2f} | class {means[4]:.3f} "
                          f"{means[5]:.3f} | {i * args.batch_size / (time.time() - started):.0f} img/s", flush=True)
        if rank > 0:
            continue
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, reals, args.latent_dim, num_classes)
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{len(dataset.images) / seconds:.1f}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        with torch.no_grad():
            grid = G_average.eval()(grid_noise, grid_labels)
        data.save_epoch(args.out, epoch, history, ["d_loss", "g_loss"] + ["augment_p"] * (args.augment == "ada"),
                        grid, {"script": SCRIPT, "epoch": epoch, "args": vars(args), "history": history,
                               "image_shape": list(dataset.image_shape), "classes": dataset.classes,
                               **{key: part.state_dict() for key, part in parts.items()}, **data.random_states(device)})
    if args.fid and rank == 0:  # every class equally often, like the grid
        import fid
        labels = torch.arange(args.fid) % num_classes
        try:
            print(fid.report(generate_images(G_average, labels, args.latent_dim, device, args.seed + 1),
                             dataset.images[:10_000], device, cache_dir=dataset.cache_dir))
        except fid.FIDError as e:
            raise UsageError(f"--fid: {e}") from None


@torch.no_grad()
def generate_images(G, labels, latent_dim, device, seed, batch_size=500):
    """One image of each class in labels (int64 on the CPU), as uint8 (n, C, H, W), from G in eval mode."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    return torch.cat([data.to_uint8(G(torch.randn(len(chunk), latent_dim, generator=noise).to(device),
                                      chunk.to(device))).cpu() for chunk in labels.split(batch_size)])


def generate(args):
    checkpoint = load_checkpoint(args)
    saved, classes = argparse.Namespace(**checkpoint["args"]), checkpoint["classes"]
    if args.label is not None and not 0 <= args.label < len(classes):
        raise UsageError(f"--label {args.label}: the model knows classes 0..{len(classes) - 1}")
    channels, image_size = checkpoint["image_shape"][0], checkpoint["image_shape"][-1]
    G = Generator(saved.latent_dim, image_size, channels, saved.width, len(classes)).to(args.device)
    G.load_state_dict(checkpoint["generator_average"])
    labels = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    labels = labels % len(classes)  # without --label: the classes in turn
    data.save_samples(args.out, generate_images(G, labels, saved.latent_dim, args.device, args.seed), labels)


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


KEPT = ("preset", "image_size", "width", "latent_dim", "class_loss", "class_weight", "mode_seeking", "batch_size",
        "lr", "seed", "average_decay", "train_images", "augment")  # the preset first: another one is refused by name


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


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# --preset paper: the appendix's CIFAR-10 G (110-d input, convs 384, 192, 96), batch, Adam and loss, for a GPU; its D
# (six 3x3 convolutions, dropout) is not this script's, which gets the same widths.
PRESETS = {"cpu": {}, "paper": {"image_size": 32, "latent_dim": 100, "width": 96, "batch_size": 100, "lr": 2e-4,
                                "class_loss": "paper", "mode_seeking": 0.0}}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu (default) or paper; flags given win")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, stacked-mnist or a folder of class folders")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=COUNT, default=6, help="total passes over the training set (default 6)")
    p.add_argument("--batch-size", type=COUNT, default=32, help="images a step, over all processes (default 32)")
    p.add_argument("--lr", type=RATE, default=2e-4, help="Adam's learning rate, G and D (default 2e-4)")
    p.add_argument("--latent-dim", type=COUNT, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=int, choices=(28, 32, 64, 128, 256, 512), help="default 28, a folder 64")
    p.add_argument("--width", type=COUNT, default=64, help="channels of G's last and D's first layer (default 64)")
    p.add_argument("--class-loss", default="tac", choices=["tac", "paper"], help="D's twin head (default) or class "
                   "head learns the class of fakes")
    p.add_argument("--class-weight", type=number(float, 0), default=1.0, help="of L_C against L_S (default 1)")
    p.add_argument("--mode-seeking", type=number(float, 0), default=0.5, help="weight of MSGAN's term in G's loss, "
                   "against one prototype per class (default 0.5; 0: off)")
    p.add_argument("--average-decay", type=DECAY, default=0.999, help="of the moving average of G (default 0.999)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="augment every image D "
                   "sees, always (diffaug) or adaptively (ada): for a few thousand images or fewer (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "acgan"), help="the run's folder (default runs/acgan)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=int, metavar="K", help="with --generate: class K only (default: each in turn)")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # then the flags given win
    args = p.parse_args(argv)
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
