"""WGAN-GP (Gulrajani et al. 2017, arXiv:1704.00028): a Wasserstein critic kept 1-Lipschitz by a gradient penalty.

    python wgan_gp.py                                                # MNIST 28x28, 50 epochs; output in runs/wgan_gp/
    python wgan_gp.py --dataset fashion-mnist --conditional --out runs/wgan_gp-cond   # one row per class in the grids
    python wgan_gp.py --preset paper --device cuda                   # the paper's CIFAR-10 model and settings
"""
import argparse
import copy
import itertools
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


class Generator(nn.Module):  # dcgan.py's: z (and a class embedding) -> image in [-1, 1], 4x4 (7x7) then doublings
    def __init__(self, latent_dim, image_size, channels, width, num_classes=0, label_dim=16):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, label_dim) if num_classes else None
        in_dim = latent_dim + (label_dim if num_classes else 0)
        start, doublings = (7, 2) if image_size == 28 else (4, image_size.bit_length() - 3)  # 7, 14, 28 at 28x28
        width_at = [width * 2 ** i for i in reversed(range(doublings))]  # 4w, 2w, w at 4x4, 8x8, 16x16 (32x32)
        layers = [nn.ConvTranspose2d(in_dim, width_at[0], start, bias=False), nn.BatchNorm2d(width_at[0]), nn.ReLU()]
        for c_in, c_out in zip(width_at, width_at[1:]):  # kernel 4, stride 2, padding 1: the side doubles
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(width_at[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)  # (B, 4w, 4, 4), (B, 2w, 8, 8), (B, w, 16, 16), (B, C, 32, 32) at 32x32

    def forward(self, z, labels=None):  # (B, latent_dim), (B,) -> (B, C, S, S)
        if self.label_embedding is not None:
            z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.net(z[:, :, None, None])


class Critic(nn.Module):  # dcgan.py's D, its score unbounded (it estimates a distance, not a probability)
    def __init__(self, image_size, channels, width, num_classes=0):
        super().__init__()
        start, doublings = (7, 2) if image_size == 28 else (4, image_size.bit_length() - 3)
        width_at = [width * 2 ** i for i in range(doublings)]  # 16x16, 8x8, 4x4 at 32x32; 14x14, 7x7 at 28x28
        layers = [nn.Conv2d(channels, width_at[0], 4, 2, 1), nn.LeakyReLU(0.2)]  # (B, w, 16, 16)
        for c_in, c_out in zip(width_at, width_at[1:]):  # no BatchNorm: the penalty is per image (section 4)
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.GroupNorm(1, c_out), nn.LeakyReLU(0.2)]  # layer norm
        self.features = nn.Sequential(*layers, nn.Flatten())  # (B, 2w, 7, 7) flat at 28x28, (B, 4w * 4 * 4) at 32
        self.score = nn.Linear(width_at[-1] * start ** 2, 1)  # = a 4x4 (7x7) convolution to one channel
        self.projection = nn.Embedding(num_classes, width_at[-1] * start ** 2) if num_classes else None
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, mean=0.0, std=0.02)  # starts as small as the other weights

    def forward(self, images, labels=None):  # (B, C, S, S), (B,) -> (B,)
        h = self.features(images)
        projection = (self.projection(labels) * h).sum(dim=1) if self.projection is not None else 0
        return self.score(h).squeeze(1) + projection


def init_weights(module):  # DCGAN's N(0, 0.02) (BatchNorm scales N(1, 0.02)); G's label embedding keeps N(0, 1)
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, mean=1.0 if isinstance(module, nn.BatchNorm2d) else 0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---- The WGAN itself: the gradient penalty and the n_critic:1 update ---------------------------------------------

def gradient_penalty(D, real, fake, labels=None):
    """E[(||grad_x D(x)||_2 - 1)^2] at a random point between each real and fake image, each sample's own norm."""
    alpha = torch.rand(len(real), 1, 1, 1, device=real.device)
    between = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    # sum, not mean: each sample's gradient at full size, of order 1, needs no loss scaling under --amp
    (grads,) = torch.autograd.grad(D(between, labels).float().sum(), between, create_graph=True)
    return ((grads.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def average_gradients(model):  # under torchrun, each gradient its mean over the processes (why by hand: gan.py)
    if dist.is_initialized():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]) / dist.get_world_size()
        dist.all_reduce(flat)
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, group, latent_dim, scaler, gp_weight=10, clip_value=None, augment=None, amp=False):
    """A critic update per (real, labels) batch of the group, n_critic of them, then one G update (Algorithm 1)."""
    shown = augment or (lambda images: images)  # what the critic is shown of an image
    device = group[0][0].device
    cast = torch.float16 if device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    totals = torch.zeros(3, device=device)
    for real, labels in group:
        with torch.autocast(device.type, cast, enabled=amp):
            with torch.no_grad():  # the critic's loss need not reach into G
                fake = G(torch.randn(len(real), latent_dim, device=device), labels)
            real_shown, fake_shown = shown(real), shown(fake)
            real_scores, fake_scores = D(real_shown, labels).float(), D(fake_shown, labels).float()
            penalty = gradient_penalty(D, real_shown, fake_shown, labels) if clip_value is None else real.new_zeros(())
            loss_d = fake_scores.mean() - real_scores.mean() + gp_weight * penalty  # -Wasserstein estimate + lambda GP
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        average_gradients(D)
        scaler.step(opt_d)
        scaler.update()
        if clip_value is not None:  # crude, the WGAN-GP paper shows: the weights pile up at +-c
            for p in D.parameters():
                p.data.clamp_(-clip_value, clip_value)
        if augment:  # a critic has no threshold: ADA's sign(D(x)) is taken against the mean score of the fakes
            augment.observe(real_scores.detach() - fake_scores.detach().mean())
        totals += torch.stack([loss_d, real_scores.mean() - fake_scores.mean(), penalty]).detach()

    D.requires_grad_(False)  # G's backward passes through D to the image without filling D's gradients
    with torch.autocast(device.type, cast, enabled=amp):  # a fresh batch, with the last batch's classes
        loss_g = -D(shown(G(torch.randn(len(real), latent_dim, device=device), labels)), labels).float().mean()
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    means = totals / len(group)
    return torch.stack([means[0], loss_g.detach(), means[1], means[2]])


def step_groups(batches, n):  # consecutive batches in lists of n, one a generator step (the last may be shorter)
    batches = iter(batches)
    while group := list(itertools.islice(batches, n)):
        yield group


@torch.no_grad()
def update_average(G_average, G, step, decay):  # what samples come from, its decay ramped up (why: gan.py)
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm's running statistics
        average.copy_(current)


@torch.no_grad()
def critic_scores(D, G, reals, latent_dim, num_classes, n=1000):  # gan.py's d_accuracy as mean scores (no threshold)
    D.eval(), G.eval()
    device = next(D.parameters()).device
    scores = {name: part is not None and torch.cat([D(data.to_float(x.to(device)), y.to(device)) for x, y
                                                    in zip(part.images[:n].split(250), part.labels[:n].split(250))])
              .mean() for name, part in reals.items()}
    labels = torch.randint(max(num_classes, 1), (n,), device=device)
    scores["critic_fake"] = torch.cat([D(G(torch.randn(len(y), latent_dim, device=device), y), y)
                                       for y in labels.split(250)]).mean()
    D.train(), G.train()
    return {name: f"{value:.4f}" if value is not False else "" for name, value in scores.items()}


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

    torch.manual_seed(args.seed)  # the same initial weights in every process
    G = Generator(args.latent_dim, args.image_size, dataset.image_shape[0], args.width, num_classes)
    D = Critic(args.image_size, dataset.image_shape[0], args.width, num_classes)
    G, D = G.apply(init_weights).to(device), D.apply(init_weights).to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    if args.clip_value:  # RMSprop: Arjovsky et al. found momentum unstable with weight clipping
        opt_g, opt_d = (torch.optim.RMSprop(model.parameters(), lr=args.lr) for model in (G, D))
    else:  # the paper's Adam betas (0, 0.9): no momentum, which the critic's fast-moving target tolerates badly
        opt_g, opt_d = (torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.0, 0.9)) for model in (G, D))
    augment = data.make_augmentation(args.augment, dataset.image_shape[0], device)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d,
             **({"augment": augment} if augment else {})}
    start_epoch, history = data.resume(checkpoint, parts, device) if checkpoint else (0, [])  # weights, RNG, log
    G_fast = torch.compile(G) if args.compile else G  # the critic stays eager: compile cannot differentiate twice
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    steps = math.ceil(len(batches) / args.n_critic)  # generator steps an epoch
    columns = 10 if num_classes else 100  # conditional: one row per class, the same z down each column
    grid_noise = torch.randn(columns, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    grid_labels = data.grid_classes(num_classes).to(device).repeat_interleave(columns)  # 10 rows at most
    grid_noise = grid_noise.repeat(len(grid_labels) // columns, 1).to(device)
    reals = {"critic_real_train": dataset, "critic_real_test": held_out}
    names = ["d_loss", "g_loss", "wasserstein", "gradient_penalty"]  # wasserstein falls as the samples improve
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, {steps} generator steps an epoch, {device}")
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for i, group in enumerate(step_groups(batches.epoch(epoch), args.n_critic), 1):
            group = [(real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank])  # our share
                     for real, labels in group]
            totals += train_step(G_fast, D, opt_g, opt_d, group, args.latent_dim, scaler, args.gp_weight,
                                 args.clip_value, augment, args.amp)
            update_average(G_average, G, (epoch - 1) * steps + i, args.average_decay)
            if i % args.log_every == 0 or i == steps:
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means.div_(world_size))
                means = means.tolist()  # the only sync with the device, every --log-every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"the losses became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch}")
                if rank == 0:
                    print(f"epoch {epoch}/{args.epochs} step {i}/{steps} | d_loss {means[0]:.3f} g_loss "
                          f"{means[1]:.3f} | wasserstein {means[2]:.3f} penalty {means[3]:.3f} | "
                          f"{i * args.n_critic * args.batch_size / (time.time() - started):.0f} img/s", flush=True)
        if rank > 0:
            continue
        seconds = time.time() - started
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)},
                        **critic_scores(D, G, reals, args.latent_dim, num_classes), "seconds": f"{seconds:.2f}",
                        "img_per_s": f"{len(dataset.images) / seconds:.1f}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        grid = G_average.eval()(grid_noise, grid_labels)
        curves = ["d_loss", "g_loss", "wasserstein"] + ["augment_p"] * (args.augment == "ada")
        data.save_epoch(args.out, epoch, history, curves, grid, {"script": SCRIPT, "epoch": epoch, "args": vars(args),
                        "history": history, "image_shape": list(dataset.image_shape), "classes": dataset.classes,
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
def generate_images(G, labels, latent_dim, device, seed):  # an image a label: uint8 (n, C, H, W), 500 at a time
    z = torch.randn(len(labels), latent_dim, generator=torch.Generator().manual_seed(seed))
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
    data.save_samples(args.out, generate_images(G, labels, saved.latent_dim, args.device, args.seed),
                      labels if num_classes else None)


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


KEPT = ("preset", "image_size", "width", "latent_dim", "conditional", "clip_value", "batch_size", "lr", "n_critic",
        "gp_weight", "seed", "average_decay", "train_images", "augment")


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


PRESETS = {  # --preset paper: Gulrajani et al.'s CIFAR-10 model, for a GPU (lambda 10, Adam betas (0, 0.9): defaults)
    "cpu": {},  # the defaults below: a recognisable grid in minutes on a laptop CPU
    "paper": {  # G 512, 256, 128 channels at 4..16 px, the critic 128, 256, 512 (authors' gan_cifar.py, DIM 128)
        "image_size": 32, "width": 128, "latent_dim": 128,  # CIFAR-10 (section 5), DIM 128, a 128-d z (gan_cifar.py)
        "batch_size": 64, "n_critic": 5, "lr": 1e-4, "average_decay": 0.0,  # Algorithm 1's m, n_critic, alpha
    },
}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu (default) or paper; flags given win")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, stacked-mnist or a folder (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=COUNT, default=50, help="total passes over the training set (default 50)")
    p.add_argument("--batch-size", type=COUNT, default=32, help="images a critic step, over all processes (default 32)")
    p.add_argument("--lr", type=RATE, help="of G and the critic (default 5e-4; 5e-5, WGAN's, with --clip-value)")
    p.add_argument("--n-critic", type=COUNT, default=2, help="critic steps a generator step (default 2; the paper's 5)")
    p.add_argument("--gp-weight", type=number(float, 0), default=10.0, help="lambda of the penalty (default 10)")
    p.add_argument("--clip-value", type=RATE, metavar="C", help="clip the critic's weights to [-C, C] instead of "
                                                                "the penalty (the first WGAN)")
    p.add_argument("--latent-dim", type=COUNT, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=int, choices=(28, 32, 64, 128, 256, 512, 1024), help="default 28, a folder 64")
    p.add_argument("--width", type=COUNT, default=32, help="channels of G's last and D's first layer (default 32)")
    p.add_argument("--conditional", action="store_true", help="condition G and the critic on the class label")
    p.add_argument("--average-decay", type=DECAY, default=0.999, help="of the moving average of G (default 0.999)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="what D sees (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1...")
    p.add_argument("--out", default=os.path.join("runs", "wgan_gp"), help="the run's folder (default runs/wgan_gp)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=number(int, 0), metavar="K", help="with --generate, conditional: only class K")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="generator steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G (pays off on GPUs)")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # the preset's values, under the flags given
    args = p.parse_args(argv)
    args.lr = args.lr or (5e-5 if args.clip_value else 5e-4)
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
