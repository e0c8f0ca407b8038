"""DCGAN (Radford et al. 2016, arXiv:1511.06434): convolutional generator and discriminator, non-saturating loss.

    python dcgan.py --dataset fashion-mnist --epochs 5                # 32x32 grids, GIF, metrics in runs/dcgan/
    python dcgan.py --dataset fashion-mnist --conditional --out runs/dcgan-cond   # one row per class in the grids
    python dcgan.py --dataset faces/ --conditional --out runs/faces   # a folder (one sub-folder per class), 64x64
    python dcgan.py --out runs/dcgan-cond --generate 1000 --label 3   # 1000 dresses into samples.npz/.png
"""
import argparse
import copy
import csv
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data


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
# The GAN itself: two losses and the alternating update

def d_loss(real_logits, fake_logits):
    """Binary cross-entropy: real images are labelled 1, generated ones 0."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits):
    """Non-saturating loss -log D(G(z)): strong gradients early on, when D rejects the samples with confidence."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler):
    """One D update, then one G update against the D just improved. labels is None for unconditional models."""
    z = torch.randn(len(real), latent_dim, device=real.device)
    with autocast(real.device, scaler):
        fake = G(z, labels)
        # Discriminator: fake is detached so this loss does not reach into G.
        real_logits, fake_logits = D(real, labels), D(fake.detach(), labels)
        loss_d = d_loss(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)

    # Generator: the same fake batch, scored again by the updated D. D's weights are frozen meanwhile, so the
    # backward pass computes only what G needs (gradients flow through D to the image, not into D's weights).
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        loss_g = g_loss(D(fake, labels))
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)

    # Returned as tensors on the device: reading them (.item()) would force a sync every step.
    return torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(real_logits.detach()).mean(),
                        torch.sigmoid(fake_logits.detach()).mean()]).float()


def autocast(device, scaler):
    """Mixed precision when --amp is on: float16 with loss scaling on CUDA, bfloat16 (no scaling needed) on CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=scaler.amp)


@torch.no_grad()
def update_average(G_average, G, step, decay):
    """Exponential moving average of G's weights. Samples from the average are much cleaner than from the last
    step's weights, which oscillate around it (Yazici et al. 2019). The decay ramps up over the first steps so
    that the average does not drag the random initial weights along for thousands of steps."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm running statistics
        average.copy_(current)


METRICS = ["d_loss", "g_loss", "d_real", "d_fake"]  # d_real = mean D(x), d_fake = mean D(G(z)) before the D step


# ----------------------------------------------------------------------------------------------------------------
# Running it: training, sampling, checkpoints

class UsageError(Exception):
    """Bad flags or a missing checkpoint: reported as one line, exit status 2."""


def build_models(args, image_shape, num_classes):
    channels, image_size = image_shape[0], image_shape[-1]
    num_classes = num_classes if args.conditional else 0
    G = Generator(args.latent_dim, image_size, channels, args.width, num_classes)
    D = Discriminator(image_size, channels, args.width, num_classes)
    G.apply(init_weights)
    D.apply(init_weights)
    return G, D


def grid_labels(num_classes, columns, device):
    """Labels of the per-epoch grid: one row per class (None for unconditional models)."""
    return torch.arange(num_classes, device=device).repeat_interleave(columns) if num_classes else None


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


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash or Ctrl-C mid-save leaves the previous checkpoint intact
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(out):
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: train first (or pass the run's --out)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot load {path}: {str(e).splitlines()[0]}") from None


def write_metrics(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_metrics(path, up_to_epoch):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["epoch"]) <= up_to_epoch]


def train(args):
    device = torch.device(args.device)
    checkpoint = load_checkpoint(args.out) if args.resume else None
    if checkpoint:
        for key in ("latent_dim", "batch_size", "lr", "seed", "image_size", "width", "conditional"):
            setattr(args, key, checkpoint["args"][key])  # the run's own settings win over the command line
    args.image_size = args.image_size or default_size(args)
    if args.image_size < 32 or args.image_size & (args.image_size - 1):  # checked before a folder is decoded
        raise UsageError(f"--image-size {args.image_size}: must be a power of two, at least 32")
    dataset = data.load_dataset(args.dataset, args.data_dir, image_size=args.image_size)
    torch.manual_seed(args.seed)
    G, D = build_models(args, dataset.image_shape, dataset.num_classes)
    if device.type == "cuda":  # speed only, never on the CPU: cuDNN autotuning and NHWC for the tensor cores
        torch.backends.cudnn.benchmark = True
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G, D = G.to(device), D.to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what the grids, --generate and --fid sample from
    # Radford et al.: lr 2e-4 and beta1 = 0.5; the default 0.9 makes the two players' momentum overshoot.
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    start_epoch = 0
    if checkpoint:
        G.load_state_dict(checkpoint["generator"])
        G_average.load_state_dict(checkpoint["generator_average"])
        D.load_state_dict(checkpoint["discriminator"])
        opt_g.load_state_dict(checkpoint["opt_g"])
        opt_d.load_state_dict(checkpoint["opt_d"])
        start_epoch = checkpoint["epoch"]
        torch.set_rng_state(checkpoint["rng"])
    # --compile: the compiled modules share their parameters with G and D, which are what gets saved.
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    scaler.amp = args.amp

    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.csv")
    history = read_metrics(metrics_path, start_epoch)
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    num_classes = dataset.num_classes if args.conditional else 0
    columns = 10 if num_classes else 100
    grid_classes = grid_labels(num_classes, columns, device)
    # The same noise in every column: in a conditional grid each column is one z drawn as every class.
    grid_noise = torch.randn(columns, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    grid_noise = grid_noise.repeat(max(num_classes, 1), 1).to(device)
    print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source}, {len(batches)} steps per epoch, "
          f"device {device}, epochs {start_epoch + 1}..{args.epochs}")

    for epoch in range(start_epoch + 1, args.epochs + 1):
        started, seen = time.time(), 0
        totals = torch.zeros(len(METRICS), device=device)
        for i, (real, labels) in enumerate(batches.epoch(epoch), 1):
            if device.type == "cuda":
                real = real.contiguous(memory_format=torch.channels_last)
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, labels if num_classes else None,
                                 args.latent_dim, scaler)
            update_average(G_average, G, (epoch - 1) * len(batches) + i, args.average_decay)
            seen += len(real)
            if i % args.log_every == 0 or i == len(batches):
                means = (totals / i).tolist()  # the only sync with the device, every log_every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"loss became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch} step {i}")
                elapsed = time.time() - started
                steps_left = len(batches) - i + (args.epochs - epoch) * len(batches)
                print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | d_loss {means[0]:.3f} "
                      f"g_loss {means[1]:.3f} | D(x) {means[2]:.2f} D(G(z)) {means[3]:.2f} | "
                      f"{seen / elapsed:.0f} img/s | {steps_left * elapsed / i / 60:.1f} min left ",
                      end="\r" if sys.stdout.isatty() else "\n", flush=True)
        if sys.stdout.isatty():
            print()

        seconds = time.time() - started
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(METRICS, means)},
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}"})
        write_metrics(metrics_path, history)
        data.plot_curves({k: [float(row[k]) for row in history] for k in ("d_loss", "g_loss")},
                         os.path.join(args.out, "losses.png"))
        with torch.no_grad():
            data.save_grid(G_average.eval()(grid_noise, grid_classes),
                           os.path.join(args.out, "samples", f"epoch_{epoch:03d}.png"), nrow=10)
        frames = sorted(os.listdir(os.path.join(args.out, "samples")))
        data.save_gif([os.path.join(args.out, "samples", f) for f in frames], os.path.join(args.out, "progress.gif"))
        save_checkpoint(os.path.join(args.out, "checkpoint.pt"), {
            "generator": G.state_dict(), "generator_average": G_average.state_dict(), "discriminator": D.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "epoch": epoch,
            "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            "rng": torch.get_rng_state()})

    if args.fid:
        report_fid(G_average, args, dataset, device)


def default_size(args):
    """32x32 for the 28x28 named datasets (a power of two keeps the up/down-sampling exact), 64 for a folder."""
    return 32 if args.dataset in data.DATASETS else 64


def report_fid(G, args, dataset, device):
    """Print the FID of args.fid generated images against the real training images (their statistics cached)."""
    import fid  # only needed here; fid.py stands alone

    try:
        inception = fid.load_inception(device=device)  # loaded once for both sides
        labels = torch.arange(args.fid) % dataset.num_classes  # every class equally often, like the grid
        fake = generate_images(G, labels, args.latent_dim, device, seed=args.seed + 1)
        cache = os.path.join(dataset.cache_dir, f"fid_stats_{dataset.image_shape[-1]}px_{len(dataset.images)}.npz")
        mu_real, sigma_real = fid.cached_statistics(cache, lambda: dataset.images, weights=inception)
        mu_fake, sigma_fake = fid.compute_statistics(fake, weights=inception)
    except fid.FIDError as e:
        raise UsageError(f"--fid: {e}") from None
    print(f"FID: {fid.frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake):.6g} "
          f"({args.fid} generated vs {len(dataset.images)} real images, 2048-d pytorch-fid Inception features)")


def generate(args):
    checkpoint = load_checkpoint(args.out)
    saved = argparse.Namespace(**checkpoint["args"])
    classes = checkpoint["classes"]
    G, _ = build_models(saved, checkpoint["image_shape"], len(classes))
    G.load_state_dict(checkpoint["generator_average"])
    if args.label is not None and not (saved.conditional and 0 <= args.label < len(classes)):
        raise UsageError(f"--label {args.label}: the model is " + (
            f"conditional on classes 0..{len(classes) - 1}" if saved.conditional else "not conditional"))
    labels = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    labels = labels % len(classes)  # without --label: classes in turn
    images = generate_images(G.to(args.device), labels, saved.latent_dim, args.device, seed=args.seed)
    path = os.path.join(args.out, "samples.npz")
    tmp = path + ".tmp.npz"
    arrays = {"images": images.permute(0, 2, 3, 1).numpy()}
    if saved.conditional:
        arrays["labels"] = labels.numpy()
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    data.save_grid(images[:100], os.path.join(args.out, "samples.png"), nrow=10)
    print(f"wrote {len(images)} images to {path} and a grid to {os.path.join(args.out, 'samples.png')}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=int, default=5, help="total passes over the training set (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of G and D (default 2e-4)")
    p.add_argument("--latent-dim", type=int, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=int, help="side of the square images, a power of two >= 32 "
                                                  "(default 32 for mnist/fashion-mnist, 64 for a folder)")
    p.add_argument("--width", type=int, default=64, help="channels of G's last and D's first layer; they double "
                                                         "per halving of the resolution (default 64; 32 is 3x "
                                                         "faster on a CPU, with blurrier samples)")
    p.add_argument("--conditional", action="store_true", help="condition G and D on the class label")
    p.add_argument("--average-decay", type=float, default=0.999,
                   help="decay of the moving average of G's weights that samples are drawn from (default 0.999)")
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.generate is not None:
            generate(args)
        else:
            train(args)
    except (data.DataError, UsageError) as e:
        print(f"dcgan.py: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"\ndcgan.py: training diverged: {e}; the last good checkpoint is kept in {args.out}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.out}/checkpoint.pt holds the last finished epoch; --resume continues",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
