"""InfoGAN (Chen et al. 2016, arXiv:1606.03657): a GAN whose latent codes learn, without labels, to mean something.

    python infogan.py --data-dir DIR                   # MNIST (DIR/mnist/): one row per code value in the grids
    python infogan.py --out runs/infogan --generate 5000           # samples.npz: labels = each image's code
    python infogan.py --preset paper --data-dir DIR    # the paper's MNIST networks and hyper-parameters
    python score.py runs/infogan/samples.npz --dataset mnist --data-dir DIR --codes   # code <-> digit agreement

G's input is incompressible noise z plus structured codes c: one categorical code (--categories values) and
--continuous codes uniform in [-1, 1]. A recognition network Q, which shares D's body, reads the codes back from
G's images; G and Q both minimise Q's error (a lower bound on the mutual information I(c; G(z, c))), so G must
draw the codes visibly. Nothing ever tells a code what to mean: the dataset's labels are never read. On MNIST the
categorical code ends up as the digit and the continuous ones as slant and stroke width. The grids show it:
samples/epoch_NNN.png has one row per categorical value; continuous_K.png sweeps code K from -2 to 2 along the rows.
"""
import argparse
import copy
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data

# Copied from gan.SCRIPT
SCRIPT = os.path.basename(__file__)


def layout(image_size, width):
    """(side of the first feature map, channels per stride-2 stage from the coarsest to the finest).

    28x28 is the paper's MNIST layout, 7 -> 14 -> 28; a power of two starts at 8x8 and adds one stride-2 stage per
    doubling beyond 32 (8 -> 16 -> 32 -> 64 ...), the channels doubling towards the coarse end as in dcgan.py."""
    start = 7 if image_size == 28 else 8
    stages = (image_size // start).bit_length() - 1  # 2 at 28 and 32, 3 at 64
    return start, [width * 2 ** (stages - 1 - i) for i in range(stages)]  # [2w, w] at 28/32, [4w, 2w, w] at 64


class Generator(nn.Module):
    """(z, categorical code, continuous codes) -> image in [-1, 1]. The paper's MNIST generator at --width 64:
    fc 1024 -> fc 128x7x7 -> 4x4 stride-2 transposed convolutions to 64 channels, then to the image; BatchNorm
    and ReLU after every layer but the last."""

    def __init__(self, latent_dim, categories, continuous, image_size, channels, width):
        super().__init__()
        self.latent_dim, self.categories, self.continuous = latent_dim, categories, continuous
        start, width_at = layout(image_size, width)
        hidden = 16 * width  # 1024 at the paper's width 64
        layers = [nn.Linear(latent_dim + categories + continuous, hidden, bias=False),  # (B, 1024)
                  nn.BatchNorm1d(hidden, momentum=0.1), nn.ReLU(),
                  nn.Linear(hidden, width_at[0] * start * start, bias=False),  # (B, 128 * 7 * 7)
                  nn.BatchNorm1d(width_at[0] * start * start, momentum=0.1), nn.ReLU(),
                  nn.Unflatten(1, (width_at[0], start, start))]  # (B, 128, 7, 7) at 28x28
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 64, 14, 14) at 28x28
            layers += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out, momentum=0.1), nn.ReLU()]
        layers += [nn.ConvTranspose2d(width_at[-1], channels, kernel_size=4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)  # (B, C, 28, 28): no BatchNorm on the output

    def forward(self, z, code_cat, code_cont):  # (B, latent_dim), (B,) int64, (B, continuous) -> (B, C, S, S)
        one_hot = F.one_hot(code_cat, self.categories).to(z.dtype)
        return self.net(torch.cat([z, one_hot, code_cont.to(z.dtype)], dim=1))


class Discriminator(nn.Module):
    """Image -> real/fake logit, and with recognise=True also Q's reading of the codes: the categorical code's
    logits, and the mean of each continuous code (Q's Gaussian has a fixed unit variance, as in the paper's code).

    The paper's MNIST discriminator at --width 64: 4x4 stride-2 convolutions to 64 and 128 channels, fc 1024,
    LeakyReLU 0.1, BatchNorm on every layer after the first. D and Q share this body; Q adds fc 128 and an output
    layer. Sharing makes Q nearly free, and Q's task (name the code behind an image) shapes the same features D
    judges with."""

    def __init__(self, categories, continuous, image_size, channels, width):
        super().__init__()
        self.categories, self.continuous = categories, continuous
        start, width_at = layout(image_size, width)
        width_at = width_at[::-1]  # [w, 2w] at 28/32: the channels double as the resolution halves
        hidden = 16 * width
        layers = [nn.Conv2d(channels, width_at[0], kernel_size=4, stride=2, padding=1),  # (B, 64, 14, 14)
                  nn.LeakyReLU(0.1)]  # no BatchNorm on the input layer
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 128, 7, 7) at 28x28
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out, momentum=0.1), nn.LeakyReLU(0.1)]
        layers += [nn.Flatten(), nn.Linear(width_at[-1] * start * start, hidden, bias=False),  # (B, 1024)
                   nn.BatchNorm1d(hidden, momentum=0.1), nn.LeakyReLU(0.1)]
        self.body = nn.Sequential(*layers)
        self.logit = nn.Linear(hidden, 1)
        self.q = nn.Sequential(nn.Linear(hidden, 2 * width, bias=False),  # (B, 128): Q's own layers
                               nn.BatchNorm1d(2 * width, momentum=0.1), nn.LeakyReLU(0.1),
                               nn.Linear(2 * width, categories + continuous))  # (B, 10 + 2)

    def forward(self, images, recognise=False):
        """(B, C, S, S) -> logits (B,); with recognise=True (logits, (code logits (B, categories), code means
        (B, continuous)))."""
        h = self.body(images)
        logits = self.logit(h).squeeze(1)
        if not recognise:
            return logits
        codes = self.q(h).float()  # float32 under --amp too: the information term is taken from it
        return logits, (codes[:, :self.categories], codes[:, self.categories:])


def init_weights(module):
    """DCGAN init: every conv and linear weight from N(0, 0.02); BatchNorm scale from N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, mean=1.0, std=0.02)
        nn.init.zeros_(module.bias)


def q_parameters(D):
    """Q's own layers (the head on D's body): trained at G's learning rate, see make_optimizers."""
    return list(D.q.parameters())


# ----------------------------------------------------------------------------------------------------------------
# InfoGAN itself: the latent codes, the GAN losses, the information term and the alternating update

def sample_latent(n, G, device, generator=None):
    """z ~ N(0, I), a categorical code uniform over G.categories values, continuous codes uniform in [-1, 1].
    Drawn on the device from the global RNG, or on the CPU from `generator` (fixed grids and samples)."""
    where = "cpu" if generator is not None else device
    z = torch.randn(n, G.latent_dim, generator=generator, device=where)
    code_cat = torch.randint(G.categories, (n,), generator=generator, device=where)
    code_cont = torch.rand(n, G.continuous, generator=generator, device=where) * 2 - 1
    return z.to(device), code_cat.to(device), code_cont.to(device)


def d_loss(real_logits, fake_logits):
    """Binary cross-entropy: real images are labelled 1, generated ones 0."""
    return (F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float))
            + F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float)))


def g_loss(fake_logits):
    """Non-saturating loss -log D(G(z)): strong gradients early on, when D rejects the samples with confidence."""
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float))


def categorical_nll(code_logits, code_cat):
    """-log Q(c_cat | x), averaged over the batch: cross-entropy between Q's logits and the code G was given.
    log(categories) minus this is the lower bound on I(c_cat; G(z, c)) in nats (the code's entropy is known)."""
    return F.cross_entropy(code_logits.float(), code_cat)


def continuous_nll(code_means, code_cont):
    """-log Q(c_cont | x) for a Gaussian with Q's mean and a fixed unit variance, summed over the codes, averaged
    over the batch: half the squared error plus a constant, as in the paper's code.

    Why not a learned variance: Q then shrinks its variance on codes it reads well, the same error costs more and
    more, and the continuous codes end up carrying the digit itself (measured on MNIST at --width 16: at epoch 23
    the categorical code agreed with the digit on 75% of samples, against 80-94% at epoch 20 with this term).
    The weight matters for the same reason: at 1 instead of 0.1, the continuous codes switch 4 <-> 9 and 1 <-> 8
    along their sweeps (85% agreement after 30 epochs at --width 16)."""
    squared_error = (code_cont.float() - code_means.float()) ** 2
    return (0.5 * squared_error + 0.5 * math.log(2 * math.pi)).sum(dim=1).mean()


def information_loss(q, code_cat, code_cont, lambda_cat, lambda_cont):
    """The negative mutual-information lower bound, weighted: lambda_cat * CE + lambda_cont * NLL (the codes'
    entropies, the rest of the bound, do not depend on G or Q). q: D's recognise=True output for the images drawn
    with these codes. Returns (weighted total, categorical term, continuous term)."""
    code_logits, code_means = q
    cat, cont = categorical_nll(code_logits, code_cat), continuous_nll(code_means, code_cont)
    return lambda_cat * cat + lambda_cont * cont, cat, cont


METRICS = ["d_loss", "g_loss", "d_real", "d_fake", "info_cat", "info_cont", "code_acc"]


def train_step(G, D, opt_g, opt_d, real, scaler, lambda_cat=1.0, lambda_cont=0.1, augment=None):
    """One D-and-Q update, then one G update against the D and Q just improved. The dataset's labels never come
    in: InfoGAN is unsupervised. Returns METRICS (the GAN losses without the information term, which has its own).
    augment (--augment; None: off) is a data.Augmentation: every image D sees, real or fake, in both updates, goes
    through it with fresh random draws. Q shares D's body and reads the codes from the same augmented fakes, so a
    code cannot live in what the augmentation scrambles (position, brightness): it must survive it."""
    shown = augment or (lambda images: images)  # what D is shown of an image
    z, code_cat, code_cont = sample_latent(len(real), G, real.device)
    with autocast(real.device, scaler):
        fake = G(z, code_cat, code_cont)
        # D and Q: D tells real from fake; Q (D's body plus its head) reads the codes back from the fakes. The
        # information term is computed on fakes only: real images have no codes, so D's real path never sees it.
        # fake is detached so that this loss does not reach into G.
        real_logits = D(shown(real))
        fake_logits, q = D(shown(fake.detach()), recognise=True)
        info_d, _, _ = information_loss(q, code_cat, code_cont, lambda_cat, lambda_cont)
        loss_d = d_loss(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d + info_d).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:
        augment.observe(real_logits.detach().float())  # a logit: real above 0

    # Generator: the same fakes, scored and read again by the updated D and Q. G minimises the information term
    # too, which is what makes it draw the codes visibly. D and Q are frozen meanwhile, so the backward pass
    # computes only what G needs.
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        fake_logits_g, q = D(shown(fake), recognise=True)
        loss_g = g_loss(fake_logits_g)
        info_g, info_cat, info_cont = information_loss(q, code_cat, code_cont, lambda_cat, lambda_cont)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g + info_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)

    code_acc = (q[0].detach().argmax(dim=1) == code_cat).float().mean()  # how well Q reads the code
    # Returned as tensors on the device: reading them (.item()) would force a sync every step.
    return torch.stack([loss_d.detach().float(), loss_g.detach().float(),
                        torch.sigmoid(real_logits.detach().float()).mean(),
                        torch.sigmoid(fake_logits.detach().float()).mean(),
                        info_cat.detach(), info_cont.detach(), code_acc])


# Copied from gan.update_average
@torch.no_grad()
def update_average(G_average, G, step, decay):
    """Exponential moving average of G's weights, the decay ramped up over the first steps (why: gan.py)."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - decay)
    for average, current in zip(G_average.buffers(), G.buffers()):  # BatchNorm running statistics
        average.copy_(current)


# ----------------------------------------------------------------------------------------------------------------
# Training, sampling and the command line

def train(args, rank=0, world_size=1):
    device = torch.device(args.device)
    checkpoint, dataset, held_out = start_run(args, rank)  # the labels are never read: only the images train
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    if len(dataset.images) // len(batches) < 2 * world_size:
        raise UsageError(f"{len(dataset.images)} images in {len(batches)} steps of {args.batch_size}: BatchNorm "
                         f"needs at least 2 images per step and process")
    torch.manual_seed(args.seed)
    G, D = build_models(args, dataset.image_shape)  # the same initial weights in every process
    if args.sync_bn:  # BatchNorm statistics over the global batch instead of each process's share
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    if device.type == "cuda":  # speed only, never on the CPU: cuDNN autotuning and NHWC for the tensor cores
        torch.backends.cudnn.benchmark = True
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G, D = G.to(device), D.to(device)
    G_average = copy.deepcopy(G).requires_grad_(False)  # what the grids, --generate and --fid sample from
    opt_g, opt_d = make_optimizers(args, G, D)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}
    augmentation = data.make_augmentation(args.augment, args.augment_policy, dataset.image_shape[0], device,
                                          args.ada_target)
    if augmentation:  # ADA's p and its accumulators, restored by --resume
        parts["augment"] = augmentation
    start_epoch = data.resume(checkpoint, parts, device) if checkpoint else 0
    # --compile: the compiled modules share their parameters with G and D, which are what gets saved.
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    scaler.amp = args.amp

    history = data.read_metrics(os.path.join(args.out, "metrics.csv"), start_epoch) if rank == 0 else []
    grid_latent = grid_latents(G, 10, args.seed, device)  # the same latents every epoch
    sweeps = {f"continuous_{code + 1}.png": sweep_latents(G, code, 10, args.seed, device)
              for code in range(args.continuous)}
    real_sets = {"d_acc_real_train": batches.images,  # D's accuracy on up to 1,000 of each
                 "d_acc_real_test": held_out.images.to(device) if held_out else None}
    if rank == 0:
        print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source} (labels unused), "
              f"{len(batches)} steps per epoch, device {device}"
              + (f" x {world_size} processes" if world_size > 1 else "") + f", epochs {start_epoch + 1}..{args.epochs}")

    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process draws its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(hash((args.seed, rank, epoch)))
        started, seen = time.time(), 0
        totals = torch.zeros(len(METRICS), device=device)
        for i, (real, _) in enumerate(batches.epoch(epoch), 1):  # the labels are dropped here, unread
            seen += len(real)
            if world_size > 1:  # this process's share: disjoint slices of the same global batch
                real = real.tensor_split(world_size)[rank]
            if device.type == "cuda":
                real = real.contiguous(memory_format=torch.channels_last)
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, scaler, args.lambda_cat, args.lambda_cont,
                                 augmentation)
            update_average(G_average, G, (epoch - 1) * len(batches) + i, args.average_decay)
            if i % args.log_every == 0 or i == len(batches):
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means)
                    means /= world_size
                means = means.tolist()  # the only sync with the device, every log_every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"loss became {means[0]:.3g}/{means[1]:.3g} (info {means[4]:.3g}/"
                                             f"{means[5]:.3g}) at epoch {epoch} step {i}")
                elapsed = time.time() - started
                steps_left = len(batches) - i + (args.epochs - epoch) * len(batches)
                if rank == 0:
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | d_loss {means[0]:.3f} "
                          f"g_loss {means[1]:.3f} | D(x) {means[2]:.2f} D(G(z)) {means[3]:.2f} | info cat "
                          f"{means[4]:.3f} cont {means[5]:.3f}, Q reads {100 * means[6]:.0f}% of codes | "
                          f"{seen / elapsed:.0f} img/s | {steps_left * elapsed / i / 60:.1f} min left ",
                          end="\r" if sys.stdout.isatty() else "\n", flush=True)
        if world_size > 1 and not replicas_agree(G, D):
            raise FloatingPointError(f"the processes' weights differ at the end of epoch {epoch}")
        if rank > 0:
            continue
        if sys.stdout.isatty():
            print()
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, real_sets)
        print(f"epoch {epoch}: D calls real {accuracy['d_acc_real_train']} of training images, "
              f"{accuracy['d_acc_real_test'] or '-'} of held-out ones; calls fake {accuracy['d_acc_fake']} of fakes")
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(METRICS, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}",
                        "augment_p": data.augment_p(augmentation)})
        with torch.no_grad():
            G_average.eval()
            grid, pictures = G_average(*grid_latent), [(name, G_average(*z)) for name, z in sweeps.items()]
        curves = ("d_loss", "g_loss", "info_cat", "info_cont") + (("augment_p",) if args.augment == "ada" else ())
        data.save_epoch(args.out, epoch, history, curves, grid, {
            "script": SCRIPT, **{key: part.state_dict() for key, part in parts.items()}, "epoch": epoch,
            "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            **data.random_states(device)}, pictures)

    if args.fid and rank == 0:
        code_cat = torch.arange(args.fid) % args.categories  # every code value equally often, like the grid
        data.report_fid(lambda: generate_images(G_average, code_cat, device, seed=args.seed + 1), dataset, device)


@torch.no_grad()
def d_accuracy(D, G, real_sets, n=1000):
    """How often D is right, in eval mode: the share of each set of real images it calls real (logit > 0), and of
    n fresh fakes from the raw generator (not its average, which D never saw) that it calls fake. A training share
    that pulls away from the held-out share means D is memorising the training images (Karras et al. 2020).
    real_sets: name -> uint8 images on the device, or None where there is no such set."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    accuracy = {}
    for name, images in real_sets.items():
        if images is None:
            accuracy[name] = ""  # a folder has no held-out split
            continue
        logits = torch.cat([D(data.to_float(chunk)) for chunk in images[:n].split(250)])
        accuracy[name] = f"{(logits > 0).float().mean().item():.4f}"
    fake_logits = [D(G(*sample_latent(size, G, device))) for size in [250] * (n // 250) + [n % 250] if size]
    accuracy["d_acc_fake"] = f"{(torch.cat(fake_logits) <= 0).float().mean().item():.4f}"
    D.train(), G.train()
    return accuracy


def build_models(args, image_shape):
    channels, image_size = image_shape[0], image_shape[-1]
    G = Generator(args.latent_dim, args.categories, args.continuous, image_size, channels, args.width)
    D = Discriminator(args.categories, args.continuous, image_size, channels, args.width)
    G.apply(init_weights)
    D.apply(init_weights)
    return G, D


def make_optimizers(args, G, D):
    """The paper's MNIST settings: Adam with beta1 = 0.5, lr 2e-4 for D and 1e-3 for G. Q's own layers learn at G's
    rate, since they chase G's rendering of the codes (on MNIST the codes then matched the digits a little more
    often than with Q at D's rate). D's body learns at D's rate, whichever loss its gradient comes from."""
    q = set(q_parameters(D))
    opt_d = torch.optim.Adam([{"params": [p for p in D.parameters() if p not in q], "lr": args.lr},
                              {"params": q_parameters(D), "lr": args.lr_g}], lr=args.lr, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
    return opt_g, opt_d


def grid_latents(G, columns, seed, device):
    """The per-epoch grid: one row per categorical value, one fixed (z, continuous codes) per column, so that each
    column shows the same style drawn as every code value."""
    noise = torch.Generator().manual_seed(seed)
    z, _, code_cont = sample_latent(columns, G, "cpu", generator=noise)
    code_cat = torch.arange(G.categories).repeat_interleave(columns)
    return z.repeat(G.categories, 1).to(device), code_cat.to(device), code_cont.repeat(G.categories, 1).to(device)


def sweep_latents(G, code, columns, seed, device, low=-2.0, high=2.0):
    """The grid of continuous code `code`: one row per categorical value, the code swept from low to high along
    the columns (beyond the [-1, 1] it was trained on, as in the paper's Figure 2), z and the other codes fixed
    (the other continuous codes at 0, their mean)."""
    z = torch.randn(1, G.latent_dim, generator=torch.Generator().manual_seed(seed))
    code_cat = torch.arange(G.categories).repeat_interleave(columns)
    code_cont = torch.zeros(G.categories * columns, G.continuous)
    code_cont[:, code] = torch.linspace(low, high, columns).repeat(G.categories)
    return z.repeat(len(code_cat), 1).to(device), code_cat.to(device), code_cont.to(device)


@torch.no_grad()
def generate_images(G, code_cat, device, seed, batch_size=500):
    """len(code_cat) images as uint8 [n, C, H, W], made in batches by G in eval mode (BatchNorm uses its running
    averages): the given categorical codes, fresh z and continuous codes. code_cat: int64 [n] on the CPU."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    images = []
    for chunk in code_cat.split(batch_size):
        z, _, code_cont = sample_latent(len(chunk), G, "cpu", generator=noise)
        images.append(data.to_uint8(G(z.to(device), chunk.to(device), code_cont.to(device))).cpu())
    return torch.cat(images)



def generate(args):
    checkpoint = load_checkpoint(args.out)
    saved = argparse.Namespace(**checkpoint["args"])
    G, _ = build_models(saved, checkpoint["image_shape"])
    data.restore(G, checkpoint["generator_average"], checkpoint, "generator")
    if args.label is not None and not 0 <= args.label < saved.categories:
        raise UsageError(f"--label {args.label}: the categorical code takes the values 0..{saved.categories - 1}")
    code_cat = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    code_cat = code_cat % saved.categories  # without --label: the code values in turn; samples.npz's labels
    data.save_samples(args.out, generate_images(G.to(args.device), code_cat, args.device, seed=args.seed), code_cat)


def default_size(args):
    """28x28 for the named datasets (the paper's MNIST layout), 64 for a folder."""
    return 28 if args.dataset in data.DATASETS else 64


MODEL_SETTINGS = ("image_size", "width", "latent_dim", "categories", "continuous")  # what the weights were made for
# What --resume keeps; the preset first, so that resuming a run with another preset names it (not a flag it changed).
RESUME_SETTINGS = ("preset", *MODEL_SETTINGS, "batch_size", "lr", "lr_g", "lambda_cat", "lambda_cont", "seed",
                   "average_decay", "train_images", "augment", "augment_policy", "ada_target")  # what --resume keeps
IMAGE_SIZE = (lambda value: value == 28 or value >= 32 and not value & (value - 1),
              "must be 28 or a power of two, at least 32")

# --preset: "cpu" is the defaults below; "paper" is the paper's MNIST model (Chen et al. 2016, appendix C, Table 1)
# and its authors' MNIST run (openai/InfoGAN, launchers/run_mnist_exp.py), for a GPU.
PRESETS = {
    "cpu": {},
    "paper": {
        "image_size": 28,  # MNIST's own 28x28 (appendix C, Table 1)
        "width": 64,  # Table 1: D 64, 128 channels and fc 1024; G fc 1024, fc 7x7x128, 64 channels
        "latent_dim": 62,  # G's input is 74-d: 62 of noise, a 10-way code and 2 continuous codes (sec. 5)
        "categories": 10,
        "continuous": 2,
        "batch_size": 128,  # the authors' launchers/run_mnist_exp.py (openai/InfoGAN): batch 128, 5,000 updates
        "lr": 2e-4,  # appendix C: Adam, lr 2e-4 for D and 1e-3 for G; beta1 0.5 in make_optimizers
        "lr_g": 1e-3,
        "lambda_cat": 1.0,  # appendix C: lambda 1 for discrete codes; continuous ones smaller (--lambda-cont 0.1),
    },  # though the authors' run weighs all codes 1.0 and draws z uniform (here z is normal)
}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help=(
        "cpu (default): the defaults below, sized for a CPU; paper: the paper's MNIST settings, "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["paper"].items())
        + "; flags given with a preset win over it"))
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=int, default=30, help="total passes over the training set (default 30)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, over all processes (default 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of D (default 2e-4, the paper's)")
    p.add_argument("--lr-g", type=float, default=1e-3, help="Adam learning rate of G and of Q's own layers "
                                                            "(default 1e-3, the paper's for G)")
    p.add_argument("--latent-dim", type=int, default=62, help="size of the noise vector z (default 62, the paper's)")
    p.add_argument("--categories", type=int, default=10, help="values of the categorical code (default 10)")
    p.add_argument("--continuous", type=int, default=2, help="continuous codes, uniform in [-1, 1] (default 2; "
                                                             "0 for none)")
    p.add_argument("--lambda-cat", type=float, default=1.0, help="weight of the categorical code's information term "
                                                                 "(default 1, the paper's)")
    p.add_argument("--lambda-cont", type=float, default=0.1, help="weight of the continuous codes' information term "
                                                                  "(default 0.1, the paper's)")
    p.add_argument("--image-size", type=int, help="side of the square images: 28 or a power of two >= 32 "
                                                  "(default 28 for mnist/fashion-mnist, 64 for a folder)")
    p.add_argument("--width", type=int, default=32, help="channels of G's last and D's first layer; they double "
                                                         "per halving of the resolution, and the fc layers have 16x "
                                                         "as many units (default 32; the paper's is 64: 1024 units; "
                                                         "at 16 the continuous codes stay unused)")
    p.add_argument("--average-decay", type=float, default=0.999,
                   help="decay of the moving average of G's weights that samples are drawn from (default 0.999)")
    add_augment_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "infogan"), help="the run's folder (default runs/infogan)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="no training: write N images to OUT/samples.npz, "
                                                             "labels = their categorical code")
    p.add_argument("--label", type=int, metavar="K", help="with --generate: only categorical code K (default: the "
                                                          "code values in turn)")
    p.add_argument("--fid", type=int, metavar="N", help="after training, FID of N generated vs the real images")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision: float16 + loss scaling on CUDA, bfloat16 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D (pays off on GPUs)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA: BatchNorm statistics over the "
                                                          "global batch (default: each process's own share)")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # then flags given on the command line win
    args = p.parse_args(argv)
    check_args(args, {"epochs": at_least(1), "batch_size": at_least(1), "latent_dim": at_least(1),
                      "width": at_least(1), "log_every": at_least(1), "generate": at_least(1), "fid": at_least(2),
                      "categories": at_least(1), "continuous": at_least(0), "seed": SEED, "lr": POSITIVE,
                      "lr_g": POSITIVE, "lambda_cat": NON_NEGATIVE, "lambda_cont": NON_NEGATIVE,
                      "average_decay": DECAY, "image_size": IMAGE_SIZE,
                      "train_images": at_least(1), "ada_target": OPEN_UNIT})
    if args.label is not None and args.generate is None:
        raise UsageError(f"--label {args.label}: only with --generate N")
    if args.label is not None and args.label < 0:
        raise UsageError(f"--label {args.label}: the categorical code's values start at 0")
    return args


# ================================================================================================================
# Run machinery: checked copies of gan.py's originals, where it is explained; test_gans.py fails when one drifts.

# Copied from gan.UsageError
class UsageError(Exception):
    """Bad flags, an unusable checkpoint: reported as one line, exit status 2."""


# Copied from gan.ArgumentParser
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


# Copied from gan.at_least
def at_least(least):
    return lambda value: value >= least, f"must be at least {least}"


# Copied from gan.POSITIVE
POSITIVE = (lambda value: math.isfinite(value) and value > 0, "must be a positive number")
# Copied from gan.NON_NEGATIVE
NON_NEGATIVE = (lambda value: math.isfinite(value) and value >= 0, "must be a number >= 0")  # penalty weights (conv scripts)
# Copied from gan.DECAY
DECAY = (lambda value: 0 <= value < 1, "must be in [0, 1)")
# Copied from gan.SEED
SEED = (lambda value: 0 <= value < 2 ** 32, f"must be in 0..{2 ** 32 - 1}")
# Copied from gan.OPEN_UNIT
OPEN_UNIT = (lambda value: 0 < value < 1, "must be in (0, 1)")  # --ada-target


# Copied from gan.augment_policy
def augment_policy(text):
    """--augment-policy: a comma list of data.AUGMENTATIONS' names, in the order they are applied."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in data.AUGMENTATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown augmentation '{unknown[0]}': use a comma list of "
                                         + ", ".join(data.AUGMENTATIONS))
    return names


# Copied from gan.add_augment_args
def add_augment_args(p):
    """The small-data flags of every script: --train-images and --augment's three (data.py's augment does the work:
    each operation applied to every image D sees, real or fake, in D's step and in G's, differentiably)."""
    p.add_argument("--train-images", type=int, metavar="N", help=(
        "train on the first N training images only (all of them if N is larger); the held-out split is unchanged"))
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help=(
        "augment every image D sees (default none). diffaug: always (Zhao et al. 2020); ada: each operation with "
        "a probability p, raised while E[sign(D(x_train))] is above --ada-target, lowered while below (Karras et "
        "al. 2020). Turn it on for a few thousand images or fewer"))
    p.add_argument("--augment-policy", type=augment_policy, metavar="LIST", help=(
        "comma list of color, translation, cutout (default all three for colour images, translation,cutout for "
        "grayscale; color on grayscale is brightness and contrast)"))
    p.add_argument("--ada-target", type=float, default=0.6, help="ADA's target for E[sign(D(x_train))], in (0, 1) "
                                                                 "(default 0.6, the paper's)")


# Copied from gan.check_args
def check_args(args, rules):
    """Before anything is loaded: every number flag against its rule (flag -> (test, what it must be); an unset flag
    passes), then the device, and --sync-bn only where it works. One line naming the flag."""
    for name, (test, must) in rules.items():
        value = getattr(args, name)
        if value is not None and not test(value):
            raise UsageError(f"--{name.replace('_', '-')} {value}: {must}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this torch {torch.__version__} sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    if args.sync_bn and (device.type != "cuda" or int(os.environ.get("WORLD_SIZE", 1)) == 1):
        raise UsageError("--sync-bn: needs CUDA and torchrun (PyTorch's SyncBatchNorm has no CPU version)")


# Copied from gan.setup_distributed
def setup_distributed(args):
    """Under torchrun (which sets WORLD_SIZE, RANK and LOCAL_RANK): join the process group, NCCL on CUDA with one GPU
    per process, gloo on the CPU. Returns (rank, world_size); (0, 1) without torchrun, where nothing changes."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} does not split evenly over {world_size} processes")
    if args.device.startswith("cuda"):
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"process {local_rank} has no GPU: {torch.cuda.device_count()} visible")
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world_size


# Copied from gan.average_gradients
def average_gradients(model):
    """Under torchrun: replace every gradient by its mean over the processes, in one flat all-reduce."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(mean.view_as(grad))


# Copied from gan.replicas_agree
def replicas_agree(*models):
    """True when every process holds the same weights: a float64 checksum per process, compared in one all-reduce."""
    checksum = sum(p.detach().double().sum() for model in models for p in model.parameters())
    extremes = torch.stack([checksum, -checksum])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return bool(extremes[0] == -extremes[1])  # max == min


# Copied from gan.autocast
def autocast(device, scaler):
    """Mixed precision when --amp is on: float16 with loss scaling on CUDA, bfloat16 (no scaling needed) on CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=scaler.amp)


# Copied from gan.start_run
def start_run(args, rank):
    """The checkpoint to resume (its settings applied to args), the output folder checked, then the training data
    and the held-out split (None for a folder of images)."""
    checkpoint = load_checkpoint(args.out) if args.resume else None
    if checkpoint:
        resume_settings(args, checkpoint)
    args.image_size = args.image_size or default_size(args)
    if rank == 0:
        data.prepare_out(args.out)
    dataset = data.load_data(args.dataset, args.data_dir, args.image_size, rank)
    if args.train_images:  # a small-data run: the first N images (their order is the file's, fixed)
        dataset.images, dataset.labels = dataset.images[:args.train_images], dataset.labels[:args.train_images]
    held_out = (data.load_data(args.dataset, args.data_dir, args.image_size, rank, split="test")
                if args.dataset in data.DATASETS else None)
    return checkpoint, dataset, held_out


# Copied from gan.load_checkpoint
def load_checkpoint(out):
    """OUT/checkpoint.pt, refused (one line naming both scripts) unless its "script" field names this script."""
    checkpoint = data.read_checkpoint(out)
    written_by = checkpoint.get("script")
    if written_by != SCRIPT:
        saved = checkpoint["args"]
        settings = " ".join(f"--{k.replace('_', '-')} {saved[k]}"
                            for k in ("image_size", "width", "latent_dim", "conditional", "loss") if k in saved)
        raise UsageError(f"{checkpoint['path']} was written by {written_by or 'an unknown script (no script field)'}"
                         f" with {settings}; this is {SCRIPT}")
    return checkpoint


# Copied from gan.resume_settings
def resume_settings(args, checkpoint):
    """The run's own settings win over the defaults; a flag given with another value is refused, not ignored."""
    defaults = vars(parse_args([]))
    for key in RESUME_SETTINGS:
        saved = checkpoint["args"].get(key, defaults[key])
        if getattr(args, key) not in (saved, defaults[key]):
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)}: {checkpoint['path']} was written "
                             f"with --{key.replace('_', '-')} {saved}, which --resume keeps")
        setattr(args, key, saved)
    if args.epochs <= checkpoint["epoch"]:
        raise UsageError(f"--epochs {args.epochs}: {checkpoint['path']} is already at epoch {checkpoint['epoch']}; "
                         f"--epochs counts the total")


# Copied from gan.Stopped
class Stopped(KeyboardInterrupt):
    """SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143 (128 + 15)."""


# Copied from gan.stop
def stop(signum, frame):
    raise Stopped


# Copied from gan.main
def main(argv=None):
    rank = int(os.environ.get("RANK", 0))  # under torchrun only rank 0 reports, so one error is one line
    args, status, message = None, 0, None
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        args = parse_args(argv)
        if args.generate is None:
            train(args, *setup_distributed(args))
        elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise UsageError("--generate runs in one process: start it with python, not torchrun")
        else:
            generate(args)
    except (data.DataError, UsageError) as e:
        status, message = 2, f"{SCRIPT}: error: {e}"
    except FloatingPointError as e:
        status, message = 1, f"\n{SCRIPT}: training diverged: {e}; the last good checkpoint is kept in {args.out}"
    except torch.cuda.OutOfMemoryError:
        status, message = 2, (f"{SCRIPT}: error: out of GPU memory on {args.device}: lower --batch-size"
                              + (" or --width" if hasattr(args, "width") else ""))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM by way of stop(), at any moment, start-up included
        status, what = (143, "stopped by SIGTERM") if isinstance(e, Stopped) else (130, "interrupted")
        message = f"\n{what}"
        if args is not None and args.generate is None:  # training, or starting to
            message += (f": {args.out}/checkpoint.pt holds the last finished epoch; --resume continues"
                        if os.path.isfile(os.path.join(args.out, "checkpoint.pt")) else ": no epoch was finished")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()
    if message and rank == 0:
        print(message, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
