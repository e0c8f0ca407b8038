"""Conditional GAN (Mirza & Osindero 2014, arXiv:1411.1784): the class label, one-hot, goes into both G and D.

    python cgan.py                                     # train on MNIST (20 epochs); one grid row per class, runs/cgan/
    python cgan.py --epochs 30 --resume                # continue the same run up to epoch 30
    python cgan.py --generate 100 --label 7            # 100 sevens into runs/cgan/samples.npz and samples.png

G reads the label concatenated to z, as in the paper; D by projection (Miyato & Koyama 2018, arXiv:1802.05637), which
learns "does the image match its label" in a third of the epochs a one-hot concatenated to D's input needs.
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


class Generator(nn.Module):  # gan.py's MLP, the one-hot label concatenated to z
    def __init__(self, latent_dim, num_classes, image_shape, hidden=(256, 512, 1024)):
        super().__init__()
        self.num_classes = num_classes
        layers, width = [], latent_dim + num_classes
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.LeakyReLU(0.2)]
            width = h
        layers += [nn.Linear(width, math.prod(image_shape)), nn.Tanh(), nn.Unflatten(1, image_shape)]
        self.net = nn.Sequential(*layers)

    def forward(self, z, labels):  # (B, latent_dim), (B,) -> (B, C, H, W) in [-1, 1]
        return self.net(torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], dim=1))


class Discriminator(nn.Module):  # "a real image of this class?": the logit w.phi(x) + (V onehot(y)).phi(x)
    def __init__(self, image_shape, num_classes, hidden=(512, 256)):
        super().__init__()
        layers, width = [nn.Flatten()], math.prod(image_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
            width = h
        self.features = nn.Sequential(*layers)
        self.realness = nn.Linear(width, 1)  # w.phi(x) + b
        self.class_projection = nn.Linear(num_classes, width, bias=False)  # V onehot(y): one vector per class

    def forward(self, images, labels):  # (B, C, H, W), (B,) -> (B,) logits
        features = self.features(images)  # (B, hidden[-1])
        class_vector = self.class_projection(F.one_hot(labels, self.class_projection.in_features).to(features.dtype))
        return self.realness(features).squeeze(1) + (class_vector * features).sum(dim=1)


# ---- The GAN itself: gan.py's non-saturating loss and alternating update, the label given to G and D -----------

def bce(logits, label):  # binary cross-entropy of D's logits (numerically safe) against 1 (real) or 0 (fake)
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def average_gradients(model):
    """Under torchrun, each gradient becomes its mean over the processes (one flat all-reduce; why by hand: gan.py)."""
    if dist.is_initialized():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]) / dist.get_world_size()
        dist.all_reduce(flat)
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler, augment=None, amp=False):
    """gan.py's update, the fakes drawn for the real batch's labels: D tells the halves apart by the images alone."""
    shown = augment or (lambda images: images)  # what D is shown of an image
    cast = torch.float16 if real.device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    with torch.autocast(real.device.type, cast, enabled=amp):
        fake = G(torch.randn(len(real), latent_dim, device=real.device), labels)
        real_logits, fake_logits = D(shown(real), labels).float(), D(shown(fake.detach()), labels).float()
        loss_d = bce(real_logits, 1) + bce(fake_logits, 0)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:  # ADA's p moves by what D said of the reals
        augment.observe(real_logits.detach())

    D.requires_grad_(False)  # G's backward passes through D to the image without filling D's gradients
    with torch.autocast(real.device.type, cast, enabled=amp):
        loss_g = bce(D(shown(fake), labels).float(), 1)  # non-saturating: -log D(G(z))
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    outputs = torch.stack([real_logits, fake_logits]).detach().sigmoid()  # the probabilities D(x) and D(G(z))
    return torch.stack([loss_d.detach(), loss_g.detach(), *outputs.mean(dim=1)])


@torch.no_grad()
def update_average(G_average, G, step, decay):
    """The moving average of G's weights that samples come from (why: gan.py)."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm's running statistics
        average.copy_(current)


@torch.no_grad()
def d_accuracy(D, G, reals, latent_dim, num_classes, n=1000):
    """gan.py's d_accuracy: the images with their labels, the fakes with random labels."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    share = {name: pair is not None and torch.cat([D(data.to_float(x.to(device)), y.to(device)) > 0 for x, y in
                                                   zip(pair[0][:n].split(250), pair[1][:n].split(250))]).float().mean()
             for name, pair in reals.items()}
    labels = torch.randint(num_classes, (n,), device=device)
    share["d_acc_fake"] = torch.cat([D(G(torch.randn(len(y), latent_dim, device=device), y), y) <= 0
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
    args.image_size = args.image_size or (28 if args.dataset in data.DATASETS else 32)
    if rank == 0:
        data.prepare_out(args.out)  # writable, and no other run writing there
    dataset = data.load_data(args.dataset, args.data_dir, args.image_size, rank)
    dataset.images, dataset.labels = dataset.images[:args.train_images], dataset.labels[:args.train_images]
    held_out = data.load_data(args.dataset, args.data_dir, args.image_size, rank, split="test")
    num_classes = dataset.num_classes

    torch.manual_seed(args.seed)  # the same initial weights in every process
    G = Generator(args.latent_dim, num_classes, dataset.image_shape).to(device)
    D = Discriminator(dataset.image_shape, num_classes).to(device)
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
    grid_noise = torch.randn(10, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    grid_labels = data.grid_classes(num_classes).repeat_interleave(10).to(device)  # a row a class (10 at most)
    grid_noise = grid_noise.repeat(len(grid_labels) // 10, 1).to(device)  # one z down each column
    reals = {"d_acc_real_train": (dataset.images, dataset.labels),
             "d_acc_real_test": held_out and (held_out.images, held_out.labels)}
    names = ["d_loss", "g_loss", "d_real", "d_fake"]
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, {len(batches)} steps an epoch, {device}")
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for i, (real, labels) in enumerate(batches.epoch(epoch), 1):
            real, labels = real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank]
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, scaler, augment,
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
        accuracy = d_accuracy(D, G, reals, args.latent_dim, num_classes)
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{len(dataset.images) / seconds:.1f}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        grid = G_average.eval()(grid_noise, grid_labels)
        data.save_epoch(args.out, epoch, history, ["d_loss", "g_loss"] + ["augment_p"] * (args.augment == "ada"),
                        grid, {"script": SCRIPT, "epoch": epoch, "args": vars(args), "history": history,
                               "image_shape": list(dataset.image_shape), "classes": dataset.classes,
                               **{key: part.state_dict() for key, part in parts.items()}, **data.random_states(device)})
    if args.fid and rank == 0:  # fid.py is imported only here: only --fid needs it
        import fid
        labels = torch.arange(args.fid) % num_classes  # every class equally often
        try:
            print(fid.report(generate_images(G_average, labels, args.latent_dim, device, args.seed + 1),
                             dataset.images[:10_000], device, cache_dir=dataset.cache_dir))
        except fid.FIDError as e:
            raise UsageError(f"--fid: {e}") from None


@torch.no_grad()
def generate_images(G, labels, latent_dim, device, seed):  # gan.py's, one image per label
    z = torch.randn(len(labels), latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([data.to_uint8(G.eval()(batch.to(device), y.to(device))).cpu()
                      for batch, y in zip(z.split(500), labels.split(500))])


def generate(args):
    checkpoint = load_checkpoint(args)
    latent_dim, num_classes = checkpoint["args"]["latent_dim"], len(checkpoint["classes"])
    if args.label is not None and args.label >= num_classes:
        raise UsageError(f"--label {args.label}: this model's classes are 0..{num_classes - 1}")
    G = Generator(latent_dim, num_classes, checkpoint["image_shape"]).to(args.device)
    G.load_state_dict(checkpoint["generator_average"])
    labels = torch.arange(args.generate) % num_classes  # the classes in turn, or only --label's
    labels = labels if args.label is None else torch.full_like(labels, args.label)
    data.save_samples(args.out, generate_images(G, labels, latent_dim, args.device, args.seed), labels)


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


KEPT = ("image_size", "latent_dim", "batch_size", "lr", "seed", "average_decay", "train_images", "augment")


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
    p.add_argument("--epochs", type=COUNT, default=20, help="total passes over the training set (default 20)")
    # Small batches at 5e-4, above DCGAN's 2e-4: the best of batch 32/64 x lr 2e-4/5e-4 on MNIST in 20 epochs.
    p.add_argument("--batch-size", type=COUNT, default=32, help="images a step, over all processes (default 32)")
    p.add_argument("--lr", type=RATE, default=5e-4, help="Adam's learning rate, G and D (default 5e-4)")
    p.add_argument("--latent-dim", type=COUNT, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=COUNT, help="side of the images (default 28 for mnist/fashion-mnist, else 32)")
    p.add_argument("--average-decay", type=DECAY, default=0.999, help="of the moving average of G (default 0.999)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="what D sees (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1...")
    p.add_argument("--out", default=os.path.join("runs", "cgan"), help="the run's folder (default runs/cgan)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: N images, labels to OUT/samples.npz")
    p.add_argument("--label", type=number(int, 0), metavar="K", help="with --generate: class K only (default all)")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
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
