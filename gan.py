"""Vanilla GAN (Goodfellow et al. 2014, arXiv:1406.2661): MLP generator and discriminator, non-saturating loss.

    python gan.py                                      # train on MNIST (60 epochs); grids, GIF, metrics in runs/gan/
    python gan.py --epochs 80 --resume                 # continue the same run up to epoch 80
    python gan.py --generate 1000                      # runs/gan/samples.npz and samples.png from the checkpoint
    torchrun --nproc_per_node 2 gan.py                 # the same run over two processes (GPUs, or gloo on a CPU)
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
    def __init__(self, latent_dim, image_shape, hidden=(256, 512, 1024)):
        super().__init__()
        layers, width = [], latent_dim
        for h in hidden:  # BatchNorm keeps the activations well scaled from the first step
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.LeakyReLU(0.2)]
            width = h
        layers += [nn.Linear(width, math.prod(image_shape)), nn.Tanh(), nn.Unflatten(1, image_shape)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # (B, latent_dim) -> (B, C, H, W) in [-1, 1]
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self, image_shape, hidden=(512, 256)):
        super().__init__()
        layers, width = [nn.Flatten()], math.prod(image_shape)
        for h in hidden:  # dropout, as in the paper's D: without it D memorises MNIST's 10k training images
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2), nn.Dropout(0.3)]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))  # a logit, no sigmoid: the losses take logits

    def forward(self, images):  # (B, C, H, W) -> (B,) logits
        return self.net(images).squeeze(1)


# ---- The GAN itself: the losses (--loss) and the alternating update ---------------------------------------------

def bce(logits, label):  # binary cross-entropy of D's logits (numerically safe) against 1 (real) or 0 (fake)
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


# --loss: D's loss of (real, fake) outputs, G's loss of fake outputs, the output above which D calls an image real.
LOSSES = {
    # G minimises -log D(G(z)): the strongest gradient when D rejects the fakes
    "non-saturating": (lambda real, fake: bce(real, 1) + bce(fake, 0), lambda fake: bce(fake, 1), 0.0),
    # the paper's minimax log(1 - D(G(z))) = -softplus(logit): its gradient -sigmoid(logit) vanishes once D wins
    "minimax": (lambda real, fake: bce(real, 1) + bce(fake, 0), lambda fake: -F.softplus(fake).mean(), 0.0),
    # least squares (Mao et al. 2017, a=0, b=c=1) on D's raw output
    "lsgan": (lambda real, fake: 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean(),
              lambda fake: 0.5 * ((fake - 1) ** 2).mean(), 0.5),
    # hinge (Lim & Ye 2017): only outputs inside the margin, D(x) < 1 or D(G(z)) > -1, push D
    "hinge": (lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(), lambda fake: -fake.mean(), 0.0),
}


def average_gradients(model):
    """Under torchrun, each gradient becomes its mean over the processes (one flat all-reduce). By hand, as StyleGAN3
    does: D's two forward passes a backward, and G's backward through a frozen D, do not fit DDP's pattern."""
    if dist.is_initialized():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]) / dist.get_world_size()
        dist.all_reduce(flat)
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, real, latent_dim, scaler, loss="non-saturating", augment=None, amp=False):
    """One D update, then one G update against the D just improved (the paper's Algorithm 1, k=1); D sees every image
    through augment. Returns the losses and D's mean outputs on the device: .item() here would wait every step."""
    d_loss_fn, g_loss_fn, threshold = LOSSES[loss]
    shown = augment or (lambda images: images)  # what D is shown of an image
    cast = torch.float16 if real.device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    with torch.autocast(real.device.type, cast, enabled=amp):
        fake = G(torch.randn(len(real), latent_dim, device=real.device))
        real_logits, fake_logits = D(shown(real)).float(), D(shown(fake.detach())).float()  # not into G
        loss_d = d_loss_fn(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:  # ADA's p moves by what D said of the reals
        augment.observe(real_logits.detach() - threshold)

    D.requires_grad_(False)  # G's backward passes through D to the image without filling D's gradients
    with torch.autocast(real.device.type, cast, enabled=amp):
        loss_g = g_loss_fn(D(shown(fake)).float())
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    outputs = torch.stack([real_logits, fake_logits]).detach()  # for BCE, as the probabilities D(x) and D(G(z))
    outputs = outputs.sigmoid() if loss in ("non-saturating", "minimax") else outputs
    return torch.stack([loss_d.detach(), loss_g.detach(), *outputs.mean(dim=1)])


@torch.no_grad()
def update_average(G_average, G, step, decay):
    """Samples come from a moving average of G's weights, much cleaner than the last step's, which oscillate around
    it (Yazici et al. 2019). The decay ramps up so that the average soon forgets the random initial weights."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm's running statistics
        average.copy_(current)


@torch.no_grad()
def d_accuracy(D, G, reals, latent_dim, threshold, n=1000):
    """The share of up to n training and n held-out images D calls real (should they part, D memorises its training
    images), and of n fresh fakes of the raw G it calls fake."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    share = {name: images is not None and torch.cat([D(data.to_float(x.to(device))) > threshold
                                                     for x in images[:n].split(250)]).float().mean()
             for name, images in reals.items()}
    share["d_acc_fake"] = torch.cat([D(G(torch.randn(250, latent_dim, device=device))) <= threshold
                                     for _ in range(n // 250)]).float().mean()
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
    args.image_size = args.image_size or (28 if args.dataset in data.DATASETS else 32)
    if rank == 0:
        data.prepare_out(args.out)  # writable, and no other run writing there
    dataset = data.load_data(args.dataset, args.data_dir, args.image_size, rank)
    dataset.images, dataset.labels = dataset.images[:args.train_images], dataset.labels[:args.train_images]
    held_out = data.load_data(args.dataset, args.data_dir, args.image_size, rank, split="test")

    torch.manual_seed(args.seed)  # the same initial weights in every process
    G, D = Generator(args.latent_dim, dataset.image_shape).to(device), Discriminator(dataset.image_shape).to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))  # DCGAN's beta1: 0.9 overshoots
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    augment = data.make_augmentation(args.augment, dataset.image_shape[0], device)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d,
             **({"augment": augment} if augment else {})}
    start_epoch, history = data.resume(checkpoint, parts, device) if checkpoint else (0, [])  # weights, RNG, log
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)  # sharing G's and D's weights
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    grid_noise = torch.randn(100, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    reals = {"d_acc_real_train": dataset.images, "d_acc_real_test": held_out and held_out.images}
    names, threshold = ["d_loss", "g_loss", "d_real", "d_fake"], LOSSES[args.loss][2]
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, {len(batches)} steps an epoch, {device}")
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for i, (real, _) in enumerate(batches.epoch(epoch), 1):
            real = real.tensor_split(world_size)[rank]  # this process's share of the global batch
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, args.latent_dim, scaler, args.loss, augment,
                                 args.amp)
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
        accuracy = d_accuracy(D, G, reals, args.latent_dim, threshold)
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{len(dataset.images) / seconds:.1f}",
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
def generate_images(G, n, latent_dim, device, seed):  # uint8 (n, C, H, W), 500 at a time, BatchNorm in eval mode
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([data.to_uint8(G.eval()(batch.to(device))).cpu() for batch in z.split(500)])


def generate(args):
    checkpoint = load_checkpoint(args)
    latent_dim = checkpoint["args"]["latent_dim"]
    G = Generator(latent_dim, checkpoint["image_shape"]).to(args.device)
    G.load_state_dict(checkpoint["generator_average"])
    data.save_samples(args.out, generate_images(G, args.generate, latent_dim, args.device, args.seed))


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


KEPT = ("image_size", "latent_dim", "loss", "batch_size", "lr", "seed", "average_decay", "train_images", "augment")


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


def parse_args(argv):
    COUNT, RATE, DECAY = number(int, 1), number(float, 1e-12), number(float, 0, 1)
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, stacked-mnist or a folder (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    # 60 epochs of small batches at lr 1e-3: more and larger steps than DCGAN's 2e-4 (docs/cpu-training.md).
    p.add_argument("--epochs", type=COUNT, default=60, help="total passes over the training set (default 60)")
    p.add_argument("--batch-size", type=COUNT, default=32, help="images a step, over all processes (default 32)")
    p.add_argument("--lr", type=RATE, default=1e-3, help="Adam's learning rate, G and D (default 1e-3)")
    p.add_argument("--latent-dim", type=COUNT, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=COUNT, help="side of the images (default 28 for mnist/fashion-mnist, else 32)")
    p.add_argument("--loss", default="non-saturating", choices=list(LOSSES), help="(default non-saturating)")
    p.add_argument("--average-decay", type=DECAY, default=0.999, help="of the moving average of G (default 0.999)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="what D sees (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1...")
    p.add_argument("--out", default=os.path.join("runs", "gan"), help="the run's folder (default runs/gan)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
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
        status, message = 2, f"{SCRIPT}: error: out of GPU memory on {args.device}: lower --batch-size"
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
