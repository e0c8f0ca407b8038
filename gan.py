"""Vanilla GAN (Goodfellow et al. 2014, arXiv:1406.2661): MLP generator and discriminator, non-saturating loss.

    python gan.py --epochs 20                          # train on MNIST; grids, GIF, metrics in runs/gan/
    python gan.py --epochs 30 --resume                 # continue the same run up to epoch 30
    python gan.py --generate 1000                      # runs/gan/samples.npz and samples.png from the checkpoint
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
    """Binary cross-entropy: real images are labelled 1, generated ones 0."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits):
    """Non-saturating loss -log D(G(z)). The minimax form log(1 - D(G(z))) has almost no gradient early on,
    when D rejects the generator's samples with confidence; this form has its strongest gradient exactly then."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def train_step(G, D, opt_g, opt_d, real, latent_dim, scaler):
    """One D update, then one G update against the D just improved (Algorithm 1 of the paper, with k=1)."""
    z = torch.randn(len(real), latent_dim, device=real.device)
    with autocast(real.device, scaler):
        fake = G(z)
        # Discriminator: fake is detached so this loss does not reach into G.
        real_logits, fake_logits = D(real), D(fake.detach())
        loss_d = d_loss(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)

    # Generator: the same fake batch, scored again by the updated D. D's weights are frozen meanwhile, so the
    # backward pass computes only what G needs (gradients flow through D to the image, not into D's weights).
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        loss_g = g_loss(D(fake))
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


def build_models(args, image_shape):
    G = Generator(args.latent_dim, image_shape)
    D = Discriminator(image_shape)
    return G, D


@torch.no_grad()
def generate_images(G, n, latent_dim, device, seed, batch_size=500):
    """n images as uint8 [n, C, H, W], made in batches by G in eval mode (BatchNorm uses its running averages)."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    images = [data.to_uint8(G(torch.randn(min(batch_size, n - i), latent_dim, generator=noise).to(device))).cpu()
              for i in range(0, n, batch_size)]
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
    dataset = data.load_dataset(args.dataset, args.data_dir)
    checkpoint = load_checkpoint(args.out) if args.resume else None
    if checkpoint:
        for key in ("latent_dim", "batch_size", "lr", "seed"):  # the run's own settings win over the command line
            setattr(args, key, checkpoint["args"][key])
    torch.manual_seed(args.seed)
    G, D = build_models(args, dataset.image_shape)
    G, D = G.to(device), D.to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what the grids, --generate and --fid sample from
    # beta1 = 0.5 (DCGAN's setting): the default 0.9 makes the two players' momentum overshoot each other.
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
    grid_noise = torch.randn(100, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source}, {len(batches)} steps per epoch, "
          f"device {device}, epochs {start_epoch + 1}..{args.epochs}")

    for epoch in range(start_epoch + 1, args.epochs + 1):
        started, seen = time.time(), 0
        totals = torch.zeros(len(METRICS), device=device)
        for i, (real, _) in enumerate(batches.epoch(epoch), 1):
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, args.latent_dim, scaler)
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
            data.save_grid(G_average.eval()(grid_noise), os.path.join(args.out, "samples", f"epoch_{epoch:03d}.png"),
                           nrow=10)
        frames = sorted(os.listdir(os.path.join(args.out, "samples")))
        data.save_gif([os.path.join(args.out, "samples", f) for f in frames], os.path.join(args.out, "progress.gif"))
        save_checkpoint(os.path.join(args.out, "checkpoint.pt"), {
            "generator": G.state_dict(), "generator_average": G_average.state_dict(), "discriminator": D.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "epoch": epoch,
            "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            "rng": torch.get_rng_state()})

    if args.fid:
        report_fid(G_average, args, dataset, device)


def report_fid(G, args, dataset, device):
    """Print the FID of args.fid generated images against the real training images (their statistics cached)."""
    import fid  # only needed here; fid.py stands alone

    try:
        inception = fid.load_inception(device=device)  # loaded once for both sides
        fake = generate_images(G, args.fid, args.latent_dim, device, seed=args.seed + 1)
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
    G, _ = build_models(saved, checkpoint["image_shape"])
    G.load_state_dict(checkpoint["generator_average"])
    images = generate_images(G.to(args.device), args.generate, saved.latent_dim, args.device, seed=args.seed)
    path = os.path.join(args.out, "samples.npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=images.permute(0, 2, 3, 1).numpy())
    os.replace(tmp, path)
    data.save_grid(images[:100], os.path.join(args.out, "samples.png"), nrow=10)
    print(f"wrote {len(images)} images to {path} and a grid to {os.path.join(args.out, 'samples.png')}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=int, default=20, help="total passes over the training set (default 20)")
    # Small batches and a learning rate above DCGAN's 2e-4: more, larger steps for these small MLPs; the moving
    # average of G absorbs the extra noise. Measured best of bs 32/64 x lr 2e-4/5e-4 on MNIST in 20 epochs.
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate of G and D (default 5e-4)")
    p.add_argument("--latent-dim", type=int, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--average-decay", type=float, default=0.999,
                   help="decay of the moving average of G's weights that samples are drawn from (default 0.999)")
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.generate is not None:
            generate(args)
        else:
            train(args)
    except (data.DataError, UsageError) as e:
        print(f"gan.py: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"\ngan.py: training diverged: {e}; the last good checkpoint is kept in {args.out}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.out}/checkpoint.pt holds the last finished epoch; --resume continues",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
