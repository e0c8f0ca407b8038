"""AC-GAN (Odena et al. 2017, arXiv:1610.09585): a class-conditional G, and a D that also classifies what it sees.

    python acgan.py --data-dir DIR --epochs 5          # MNIST (DIR/mnist/), one row per digit in the grids, runs/acgan/
    python acgan.py --dataset fashion-mnist --out runs/acgan-fashion  # 32x32 grids, GIF, metrics
    python acgan.py --out runs/acgan-fashion --generate 1000 --label 3  # 1000 dresses into samples.npz/.png
    python acgan.py --preset paper --dataset DIR       # the paper's sizes and hyper-parameters, for a GPU

G draws an image of the class it is given (the label embedded and concatenated with z, as dcgan.py --conditional).
D never sees the label: one shared convolutional body under a real/fake head and a class head. D learns to tell
real from fake and to name the class of real images; G learns to fool the first head and to be named correctly by
the second. So D is a classifier too: metrics.csv tracks its accuracy on held-out images.

The class of fakes is learned by a third, "twin" head (TAC-GAN, Gong et al. 2019, arXiv:1907.02690) unless
--class-loss paper asks for the paper's D, whose class head learns it itself: see d_loss and g_loss for why.
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


class Generator(nn.Module):
    """z and a class -> image in [-1, 1]: a 4x4 map, then one stride-2 transposed convolution per doubling.

    The class enters as a learned embedding concatenated with z (dcgan.py --conditional's generator, unchanged).
    Kernel 4 with stride 2 covers every output pixel equally often, which avoids checkerboard artefacts."""

    def __init__(self, latent_dim, image_size, channels, width, num_classes, label_dim=16):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, label_dim)
        width_at = [width * image_size // (8 * 2 ** i) for i in range(image_size.bit_length() - 3)]  # 4x4, 8x8, ...
        layers = [nn.ConvTranspose2d(latent_dim + label_dim, width_at[0], kernel_size=4, stride=1, padding=0,
                                     bias=False),
                  nn.BatchNorm2d(width_at[0], momentum=0.1), nn.ReLU()]  # (B, 4w, 4, 4) at 32x32
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, 8, 8), (B, w, 16, 16) at 32x32
            layers += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out, momentum=0.1), nn.ReLU()]
        layers += [nn.ConvTranspose2d(width_at[-1], channels, kernel_size=4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)  # (B, C, 32, 32): no BatchNorm on the output (DCGAN rule)

    def forward(self, z, labels):  # (B, latent_dim), (B,) -> (B, C, S, S)
        z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """Image -> (real/fake logit, class logits, twin class logits): one body of stride-2 convolutions down to 4x4,
    linear heads on its features. The heads share every feature: learning to name the class of real images shapes
    the same features that judge real against fake (Odena et al., sec. 3). twin=False (--class-loss paper) leaves
    out the twin head, which only ever sees fakes; forward then returns None in its place."""

    def __init__(self, image_size, channels, width, num_classes, twin=True):
        super().__init__()
        width_at = [width * 2 ** i for i in range(image_size.bit_length() - 3)]  # 16x16, 8x8, 4x4 at 32x32
        layers = [nn.Conv2d(channels, width_at[0], kernel_size=4, stride=2, padding=1),  # (B, w, 16, 16)
                  nn.LeakyReLU(0.2)]  # no BatchNorm on the input layer (DCGAN rule)
        for c_in, c_out in zip(width_at, width_at[1:]):  # (B, 2w, 8, 8), (B, 4w, 4, 4) at 32x32
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out, momentum=0.1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())  # (B, 4w * 4 * 4)
        self.source = nn.Linear(width_at[-1] * 16, 1)  # real/fake: = a 4x4 convolution to one channel
        self.classes = nn.Linear(width_at[-1] * 16, num_classes)  # one logit per class
        self.twin = nn.Linear(width_at[-1] * 16, num_classes) if twin else None  # the same, for fakes only

    def forward(self, images):  # (B, C, S, S) -> (B,), (B, num_classes), (B, num_classes) or None
        h = self.features(images)
        return self.source(h).squeeze(1), self.classes(h), self.twin(h) if self.twin is not None else None


def init_weights(module):
    """DCGAN init: every conv and linear weight from N(0, 0.02); BatchNorm scale from N(1, 0.02), shift 0.
    G's label embedding keeps its N(0, 1) init, the same scale as z, so the class is not drowned out."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, mean=1.0, std=0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: the paper's two log-likelihoods, the losses built from them, and the alternating update

def source_loss(logits, real):
    """-L_S for one batch: minus the mean log-likelihood of the right source, from logits (softplus inside, so
    finite for any logit, in float32 also under bfloat16 autocast). real: the source the images truly have."""
    target = torch.ones_like if real else torch.zeros_like
    return F.binary_cross_entropy_with_logits(logits.float(), target(logits, dtype=torch.float32))


def class_loss(class_logits, labels):
    """-L_C for one batch: minus the mean log-likelihood of the right class (log-softmax inside, float32)."""
    return F.cross_entropy(class_logits.float(), labels)


def d_loss(real_logits, fake_logits, real_class_logits, fake_class_logits, labels, class_weight=1.0):
    """D maximises L_S + L_C: the right source of real and fake images, and the right class of both (for a fake,
    the class G was asked for). fake_class_logits come from the head that learns the class of fakes: the class
    head itself in the paper, the twin head in TAC-GAN.

    Why not the class head itself: then D and G can agree on a private code. D learns to read the requested class
    off any mark G leaves, G is rewarded for the mark instead of for drawing the class, and on MNIST whole rows of
    2s came out as 7s, "correctly" classified by D (notes/acgan.md). A head that never sees fakes is exploited
    the same way, through features only fakes have; a twin head keeps that knowledge where g_loss can use it."""
    return (source_loss(real_logits, real=True) + source_loss(fake_logits, real=False)
            + class_weight * (class_loss(real_class_logits, labels) + class_loss(fake_class_logits, labels)))


def g_loss(fake_logits, fake_class_logits, labels, class_weight=1.0, fake_twin_logits=None):
    """G maximises L_C - L_S, in the non-saturating form: -log D(G(z)) in place of log(1 - D(G(z))), which gives
    strong gradients early on, when D rejects the fakes with confidence; plus the right class for its fakes.

    That class term alone rewards every fake for being as easy to classify as possible: each class drifts to a
    few prototypes (Shu et al. 2017; the AC-GAN failure). TAC-GAN subtracts the twin head's log-likelihood: G is
    also asked to make its classes no easier to tell apart than the real classifier finds them, which cancels the
    pull towards prototypes, and no private mark pays off, since the twin would read it too."""
    loss_c = class_loss(fake_class_logits, labels)
    if fake_twin_logits is not None:
        loss_c = loss_c - class_loss(fake_twin_logits, labels)
    return source_loss(fake_logits, real=True) + class_weight * loss_c


def metric_names(class_loss_kind):
    """metrics.csv's per-step columns: the twin head's loss on fakes exists only with --class-loss tac."""
    return ["d_loss", "g_loss", "d_real", "d_fake", "class_loss_real", "class_loss_fake",
            *(["twin_loss_fake"] if class_loss_kind == "tac" else [])]


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler, class_weight=1.0, augment=None):
    """One D update, then one G update against the D just improved. The fakes are drawn for the labels of the real
    batch, so every class is asked for as often as the data holds it. D decides the variant: with a twin head it is
    TAC-GAN, without one the paper's AC-GAN. augment (--augment; None: off) is a data.Augmentation: every image D
    sees, real or fake, in both updates, goes through it with fresh random draws (the class heads learn the class
    of augmented images too); ADA's p moves by what the source head said of the reals."""
    shown = augment or (lambda images: images)  # what D is shown of an image
    z = torch.randn(len(real), latent_dim, device=real.device)
    with autocast(real.device, scaler):
        fake = G(z, labels)
        # Discriminator: fake is detached so this loss does not reach into G.
        (real_logits, real_class_logits, _), (fake_logits, fake_class_logits, fake_twin_logits) = (
            D(shown(real)), D(shown(fake.detach())))
        loss_d = d_loss(real_logits, fake_logits, real_class_logits,
                        fake_class_logits if fake_twin_logits is None else fake_twin_logits, labels, class_weight)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:
        augment.observe(real_logits.detach().float())  # a logit: real above 0

    # Generator: the same fake batch, scored again by the updated D. D's weights are frozen meanwhile, so the
    # backward pass computes only what G needs (gradients flow through D to the image, not into D's weights).
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        g_logits, g_class_logits, g_twin_logits = D(shown(fake))
        loss_g = g_loss(g_logits, g_class_logits, labels, class_weight, g_twin_logits)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)

    # Returned as tensors on the device: reading them (.item()) would force a sync every step.
    twin = [] if g_twin_logits is None else [class_loss(g_twin_logits.detach(), labels)]
    return torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(real_logits.detach().float()).mean(),
                        torch.sigmoid(fake_logits.detach().float()).mean(), class_loss(real_class_logits.detach(),
                        labels), class_loss(g_class_logits.detach(), labels), *twin])


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
    checkpoint, dataset, held_out = start_run(args, rank)
    if dataset.num_classes < 2:  # the class head would have nothing to learn, and G nothing to be told apart by
        raise UsageError(f"{dataset.source} holds a single class: an AC-GAN needs labelled images, a folder with "
                         f"one sub-folder per class (at least two)")
    torch.manual_seed(args.seed)
    G, D = build_models(args, dataset.image_shape, dataset.num_classes)  # the same initial weights in every process
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
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    names = metric_names(args.class_loss)
    num_classes, columns = dataset.num_classes, 10
    # The grid: one row per class, the same noise down each column, so a column shows one z drawn as every class.
    grid_noise = torch.randn(columns, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    grid_noise = grid_noise.repeat(num_classes, 1).to(device)
    grid_classes = torch.arange(num_classes).repeat_interleave(columns).to(device)
    real_sets = {"train": (batches.images, batches.labels),  # D's accuracy on up to 1,000 of each
                 "test": (held_out.images.to(device), held_out.labels.to(device)) if held_out else None}
    if rank == 0:
        print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source}, {len(batches)} steps per "
              f"epoch, device {device}" + (f" x {world_size} processes" if world_size > 1 else "") +
              f", epochs {start_epoch + 1}..{args.epochs}")

    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process draws its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(hash((args.seed, rank, epoch)))
        started, seen = time.time(), 0
        totals = torch.zeros(len(names), device=device)
        for i, (real, labels) in enumerate(batches.epoch(epoch), 1):
            seen += len(real)
            if world_size > 1:  # this process's share: disjoint slices of the same global batch
                real, labels = real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank]
            if device.type == "cuda":
                real = real.contiguous(memory_format=torch.channels_last)
            totals += train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, scaler,
                                 args.class_weight, augmentation)
            update_average(G_average, G, (epoch - 1) * len(batches) + i, args.average_decay)
            if i % args.log_every == 0 or i == len(batches):
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means)
                    means /= world_size
                means = means.tolist()  # the only sync with the device, every log_every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"loss became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch} step {i}")
                elapsed = time.time() - started
                steps_left = len(batches) - i + (args.epochs - epoch) * len(batches)
                if rank == 0:
                    twin = f" twin {means[6]:.3f}" if len(means) > 6 else ""
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | d_loss {means[0]:.3f} "
                          f"g_loss {means[1]:.3f} | D(x) {means[2]:.2f} D(G(z)) {means[3]:.2f} | class loss "
                          f"real {means[4]:.3f} fake {means[5]:.3f}{twin} | {seen / elapsed:.0f} img/s | "
                          f"{steps_left * elapsed / i / 60:.1f} min left ",
                          end="\r" if sys.stdout.isatty() else "\n", flush=True)
        if world_size > 1 and not replicas_agree(G, D):
            raise FloatingPointError(f"the processes' weights differ at the end of epoch {epoch}")
        if rank > 0:
            continue
        if sys.stdout.isatty():
            print()
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, real_sets, args.latent_dim, num_classes)
        print(f"epoch {epoch}: D calls real {accuracy['d_acc_real_train']} of training images, "
              f"{accuracy['d_acc_real_test'] or '-'} of held-out ones; calls fake {accuracy['d_acc_fake']} of fakes; "
              f"names the class of {accuracy['d_class_acc_test'] or '-'} of held-out images, "
              f"{accuracy['d_class_acc_fake']} of fakes")
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}",
                        "augment_p": data.augment_p(augmentation)})
        with torch.no_grad():
            grid = G_average.eval()(grid_noise, grid_classes)
        curves = ("d_loss", "g_loss") + (("augment_p",) if args.augment == "ada" else ())
        data.save_epoch(args.out, epoch, history, curves, grid, {
            "script": SCRIPT, **{key: part.state_dict() for key, part in parts.items()}, "epoch": epoch,
            "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            **data.random_states(device)})

    if args.fid and rank == 0:
        labels = torch.arange(args.fid) % num_classes  # every class equally often, like the grid
        data.report_fid(lambda: generate_images(G_average, labels, args.latent_dim, device, seed=args.seed + 1),
                        dataset, device)


@torch.no_grad()
def d_accuracy(D, G, real_sets, latent_dim, num_classes, n=1000):
    """How often D's source and class heads are right, in eval mode. Source head: the share of each set of real
    images it calls real (logit > 0), and of n fresh fakes from the raw generator (not its average, which D never
    saw) that it calls fake. Class head: the share of each real set, and of those fakes, whose top class is the
    label (for the fakes, the class G was asked for; the twin head is not asked). A training share that pulls
    away from the held-out one means D is memorising the training images (Karras et al. 2020); the held-out class
    accuracy is D's worth as a plain classifier.
    real_sets: "train" / "test" -> (uint8 images, labels) on the device, or None where there is no such set."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    accuracy, class_accuracy = {}, {}
    for name, images_and_labels in real_sets.items():
        if images_and_labels is None:  # a folder has no held-out split
            accuracy[f"d_acc_real_{name}"] = class_accuracy[f"d_class_acc_{name}"] = ""
            continue
        images, labels = images_and_labels
        logits, class_logits, _ = zip(*(D(data.to_float(chunk)) for chunk in images[:n].split(250)))
        accuracy[f"d_acc_real_{name}"] = f"{(torch.cat(logits) > 0).float().mean().item():.4f}"
        hits = torch.cat(class_logits).argmax(1) == labels[:n]
        class_accuracy[f"d_class_acc_{name}"] = f"{hits.float().mean().item():.4f}"
    labels = torch.randint(num_classes, (n,), device=device)
    logits, class_logits, _ = zip(*(D(G(torch.randn(len(chunk), latent_dim, device=device), chunk))
                                 for chunk in labels.split(250)))
    accuracy["d_acc_fake"] = f"{(torch.cat(logits) <= 0).float().mean().item():.4f}"
    class_accuracy["d_class_acc_fake"] = f"{(torch.cat(class_logits).argmax(1) == labels).float().mean().item():.4f}"
    D.train(), G.train()
    return {**accuracy, **class_accuracy}


def build_models(args, image_shape, num_classes):
    channels, image_size = image_shape[0], image_shape[-1]
    G = Generator(args.latent_dim, image_size, channels, args.width, num_classes)
    D = Discriminator(image_size, channels, args.width, num_classes, twin=args.class_loss == "tac")
    G.apply(init_weights)
    D.apply(init_weights)
    return G, D


# Copied from gan.make_optimizers
def make_optimizers(args, G, D):
    """Adam with beta1 = 0.5 (DCGAN's setting): the default 0.9 makes the two players' momentum overshoot."""
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    return opt_g, opt_d


@torch.no_grad()
def generate_images(G, labels, latent_dim, device, seed, batch_size=500):
    """len(labels) images as uint8 [n, C, H, W], made in batches by G in eval mode (BatchNorm uses its running
    averages). labels: int64 [n] on the CPU."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    images = [data.to_uint8(G(torch.randn(len(chunk), latent_dim, generator=noise).to(device), chunk.to(device))).cpu()
              for chunk in labels.split(batch_size)]
    return torch.cat(images)


def generate(args):
    checkpoint = load_checkpoint(args.out)
    saved = argparse.Namespace(**checkpoint["args"])
    classes = checkpoint["classes"]
    if args.label is not None and not 0 <= args.label < len(classes):
        raise UsageError(f"--label {args.label}: the model knows classes 0..{len(classes) - 1}")
    G, _ = build_models(saved, checkpoint["image_shape"], len(classes))
    data.restore(G, checkpoint["generator_average"], checkpoint, "generator")
    labels = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    labels = labels % len(classes)  # without --label: classes in turn
    data.save_samples(args.out, generate_images(G.to(args.device), labels, saved.latent_dim, args.device,
                                                seed=args.seed), labels)


def default_size(args):
    """32x32 for the 28x28 named datasets (a power of two keeps the up/down-sampling exact), 64 for a folder."""
    return 32 if args.dataset in data.DATASETS else 64


MODEL_SETTINGS = ("image_size", "width", "latent_dim", "class_loss")  # what the weights were made for
# What --resume keeps; the preset first, so that resuming a run with another preset names it (not a flag it changed).
RESUME_SETTINGS = ("preset", *MODEL_SETTINGS, "batch_size", "lr", "seed", "average_decay", "class_weight",
                   "train_images", "augment", "augment_policy", "ada_target")  # what --resume keeps
POWER_OF_TWO = (lambda value: value >= 32 and not value & (value - 1), "must be a power of two, at least 32")

# --preset: "cpu" is the defaults below; "paper" is the paper's CIFAR-10 model (Odena et al. 2017, the appendix's
# CIFAR-10 table), for a GPU. Its D (six 3x3 convolutions 16..512 wide, dropout 0.5) is not this script's DCGAN-style D;
# the preset keeps this D at the paper's G widths.
PRESETS = {
    "cpu": {},
    "paper": {
        "image_size": 32,  # CIFAR-10's 32x32 (sec. 4.1; the ImageNet model is 128x128)
        "latent_dim": 100,  # appendix: G's input is 110-d, 100 of noise and the 10-way class
        "width": 96,  # appendix: G's transposed convolutions 384 (4x4), 192 (8x8), 96 (16x16) = 4w, 2w, w
        "batch_size": 100,  # appendix: batch 100
        "lr": 2e-4,  # appendix: Adam lr 0.0002 for G and D, beta1 0.5 (make_optimizers' betas)
        "class_loss": "paper",  # the paper's D: its class head learns the class of fakes, no twin head
    },
}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help=(
        "cpu (default): the defaults below, a grid in minutes on a CPU; paper: the paper's CIFAR-10 settings, "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["paper"].items())
        + "; flags given with a preset win over it"))
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=int, default=5, help="total passes over the training set (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, over all processes (default 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of G and D (default 2e-4)")
    p.add_argument("--latent-dim", type=int, default=64, help="size of the noise vector z (default 64)")
    p.add_argument("--image-size", type=int, help="side of the square images, a power of two >= 32 "
                                                  "(default 32 for mnist/fashion-mnist, 64 for a folder)")
    p.add_argument("--width", type=int, default=32, help="channels of G's last and D's first layer; they double "
                                                         "per halving of the resolution (default 32, 3x faster "
                                                         "on a CPU than dcgan.py's 64; raise it on a GPU)")
    p.add_argument("--class-weight", type=float, default=1.0,
                   help="weight of the class log-likelihood L_C against the source one L_S, in D's loss and G's "
                        "(default 1, the paper's; 0 leaves G a conditional input it is never asked to honour)")
    p.add_argument("--class-loss", default="tac", choices=["tac", "paper"], help=(
        "who learns the class of fakes. tac (default): a twin head of D, and G also makes its classes no easier "
        "to tell apart than real ones (Gong et al. 2019), against the collapse of each class to a few images; "
        "paper: D's class head itself (Odena et al.), with which D and G can agree on marks instead of classes"))
    p.add_argument("--average-decay", type=float, default=0.999,
                   help="decay of the moving average of G's weights that samples are drawn from (default 0.999)")
    add_augment_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "acgan"), help="the run's folder (default runs/acgan)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=int, metavar="K", help="with --generate: only class K (default: every class "
                                                          "in turn)")
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
                      "seed": SEED, "lr": POSITIVE, "class_weight": NON_NEGATIVE, "average_decay": DECAY,
                      "image_size": POWER_OF_TWO,
                      "train_images": at_least(1), "ada_target": OPEN_UNIT})
    if args.label is not None and args.generate is None:
        raise UsageError(f"--label {args.label}: only with --generate N")
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
