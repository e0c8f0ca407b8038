"""AC-GAN (Odena et al. 2017, arXiv:1610.09585): a class-conditional G, and a D that also classifies what it sees.

    python acgan.py --data-dir DIR --epochs 5          # MNIST (DIR/mnist/), one row per digit in the grids, runs/acgan/
    python acgan.py --dataset fashion-mnist --out runs/acgan-fashion  # 32x32 grids, GIF, metrics
    python acgan.py --out runs/acgan-fashion --generate 1000 --label 3  # 1000 dresses into samples.npz/.png

G draws an image of the class it is given (the label embedded and concatenated with z, as dcgan.py --conditional).
D never sees the label: one shared convolutional body under a real/fake head and a class head. D learns to tell
real from fake and to name the class of real images; G learns to fool the first head and to be named correctly by
the second. So D is a classifier too: metrics.csv tracks its accuracy on held-out images.

The class of fakes is learned by a third, "twin" head (TAC-GAN, Gong et al. 2019, arXiv:1907.02690) unless
--class-loss paper asks for the paper's D, whose class head learns it itself: see d_loss and g_loss for why.
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
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data

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


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler, class_weight=1.0):
    """One D update, then one G update against the D just improved. The fakes are drawn for the labels of the real
    batch, so every class is asked for as often as the data holds it. D decides the variant: with a twin head it is
    TAC-GAN, without one the paper's AC-GAN."""
    z = torch.randn(len(real), latent_dim, device=real.device)
    with autocast(real.device, scaler):
        fake = G(z, labels)
        # Discriminator: fake is detached so this loss does not reach into G.
        (real_logits, real_class_logits, _), (fake_logits, fake_class_logits, fake_twin_logits) = (
            D(real), D(fake.detach()))
        loss_d = d_loss(real_logits, fake_logits, real_class_logits,
                        fake_class_logits if fake_twin_logits is None else fake_twin_logits, labels, class_weight)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    average_gradients(D)
    scaler.step(opt_d)

    # Generator: the same fake batch, scored again by the updated D. D's weights are frozen meanwhile, so the
    # backward pass computes only what G needs (gradients flow through D to the image, not into D's weights).
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        g_logits, g_class_logits, g_twin_logits = D(fake)
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


def average_gradients(model):
    """Under torchrun: replace every gradient by its mean over the processes, so that all replicas take the same step.

    This is what DistributedDataParallel does, done by hand (as StyleGAN2-ADA does) because a GAN step does not fit
    DDP's one-forward-one-backward pattern: D runs forward on reals and on fakes before one backward, G's backward
    passes through a frozen D, and WGAN-GP differentiates the critic twice. One flat all-reduce per update."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(mean.view_as(grad))


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


# ----------------------------------------------------------------------------------------------------------------
# Running it: training, sampling, checkpoints

class UsageError(Exception):
    """Bad flags, an unusable output folder or checkpoint: reported as one line, exit status 2."""


def build_models(args, image_shape, num_classes):
    channels, image_size = image_shape[0], image_shape[-1]
    G = Generator(args.latent_dim, image_size, channels, args.width, num_classes)
    D = Discriminator(image_size, channels, args.width, num_classes, twin=args.class_loss == "tac")
    G.apply(init_weights)
    D.apply(init_weights)
    return G, D


def make_optimizers(args, G, D):
    """Radford et al.: Adam with lr 2e-4 and beta1 = 0.5; the default 0.9 makes the two players' momentum overshoot."""
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    return opt_g, opt_d


def grid_labels(num_classes, columns, device):
    """Labels of the per-epoch grid: one row per class."""
    return torch.arange(num_classes, device=device).repeat_interleave(columns)


@torch.no_grad()
def generate_images(G, labels, latent_dim, device, seed, batch_size=500):
    """len(labels) images as uint8 [n, C, H, W], made in batches by G in eval mode (BatchNorm uses its running
    averages). labels: int64 [n] on the CPU."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    images = [data.to_uint8(G(torch.randn(len(chunk), latent_dim, generator=noise).to(device), chunk.to(device))).cpu()
              for chunk in labels.split(batch_size)]
    return torch.cat(images)


# ----------------------------------------------------------------------------------------------------------------
# Several processes (torchrun): one process per GPU, the same weights everywhere, a share of each batch each

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


def load_data(args, rank, split="train"):
    """The dataset, read by every process. Rank 0 goes first (it may download) and passes on its error, if any, so
    that the others stop with the same one line instead of waiting. The test split is optional: None if absent."""
    def load():  # only the training split is worth a download; the test split only adds held-out figures
        return data.load_dataset(args.dataset, args.data_dir, split=split, image_size=args.image_size,
                                 download=split == "train")

    dataset, error = None, None
    if rank == 0:
        try:
            dataset = load()
        except data.DataError as e:
            error = str(e)
    if dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        if split == "test":
            return None
        raise data.DataError(error)
    return dataset if dataset is not None else load()


def replicas_agree(*models):
    """True when every process holds the same weights: a float64 checksum per process, compared in one all-reduce."""
    checksum = sum(p.detach().double().sum() for model in models for p in model.parameters())
    extremes = torch.stack([checksum, -checksum])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return bool(extremes[0] == -extremes[1])  # max == min


# ----------------------------------------------------------------------------------------------------------------
# Files: checkpoints, metrics, the output folder

def save_checkpoint(path, state):
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so not even a power cut leaves a torn checkpoint
        os.replace(tmp, path)  # atomic: a crash, kill -9 or Ctrl-C mid-save leaves the previous checkpoint intact
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


MODEL_SETTINGS = ("image_size", "width", "latent_dim", "class_loss")  # what the weights were made for


def load_checkpoint(out):
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: train first (or pass the run's --out)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: torch raises several types, all mean "not a checkpoint of ours"
        raise UsageError(f"cannot load {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if not isinstance(checkpoint, dict) or "generator" not in checkpoint or "args" not in checkpoint:
        raise UsageError(f"{path} is not a checkpoint written by a training script")
    written_by = checkpoint.get("script", "an older script")  # acgan.py has always recorded itself
    if written_by != SCRIPT:
        saved = checkpoint["args"]
        settings = " ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in MODEL_SETTINGS if k in saved)
        raise UsageError(f"{path} was written by {written_by} with {settings}; this is {SCRIPT}")
    checkpoint["path"] = path
    return checkpoint


def restore(module, state, checkpoint, what):
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:  # wrong shapes or names: the file is not this model's
        raise UsageError(f"{checkpoint['path']}: the {what} does not fit this model ({str(e).splitlines()[0][:120]})"
                         ) from None


def resume_settings(args, checkpoint):
    """The run's own settings win over the defaults; a flag given with another value is refused, not ignored."""
    defaults = vars(parse_args([]))
    for key in (*MODEL_SETTINGS, "batch_size", "lr", "seed", "average_decay", "class_weight"):
        saved = checkpoint["args"].get(key, defaults[key])
        if getattr(args, key) not in (saved, defaults[key]):
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)}: {checkpoint['path']} was written "
                             f"with --{key.replace('_', '-')} {saved}, which --resume keeps")
        setattr(args, key, saved)
    if args.epochs <= checkpoint["epoch"]:
        raise UsageError(f"--epochs {args.epochs}: {checkpoint['path']} is already at epoch {checkpoint['epoch']}; "
                         f"--epochs counts the total")


def prepare_out(out):
    """Create the run's folder and check that it takes files, before any data is loaded or time spent."""
    try:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        with open(os.path.join(out, ".write_test"), "wb") as f:
            f.write(b"ok")
        os.remove(os.path.join(out, ".write_test"))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None


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


# ----------------------------------------------------------------------------------------------------------------
# Training

def train(args, rank=0, world_size=1):
    device = torch.device(args.device)
    checkpoint = load_checkpoint(args.out) if args.resume else None
    if checkpoint:
        resume_settings(args, checkpoint)
    args.image_size = args.image_size or default_size(args)
    if rank == 0:
        prepare_out(args.out)
    dataset = load_data(args, rank)
    if dataset.num_classes < 2:  # the class head would have nothing to learn, and G nothing to be told apart by
        raise UsageError(f"{dataset.source} holds a single class: an AC-GAN needs labelled images, a folder with "
                         f"one sub-folder per class (at least two)")
    held_out = load_data(args, rank, split="test") if args.dataset in data.DATASETS else None
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
    start_epoch = 0
    if checkpoint:
        for module, key in ((G, "generator"), (G_average, "generator_average"), (D, "discriminator"),
                            (opt_g, "opt_g"), (opt_d, "opt_d")):
            restore(module, checkpoint[key], checkpoint, key.replace("_", " "))
        start_epoch = checkpoint["epoch"]
        torch.set_rng_state(checkpoint["rng"])
    # --compile: the compiled modules share their parameters with G and D, which are what gets saved.
    G_fast, D_fast = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    scaler.amp = args.amp

    metrics_path = os.path.join(args.out, "metrics.csv")
    history = read_metrics(metrics_path, start_epoch) if rank == 0 else []
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    num_classes, columns = dataset.num_classes, 10
    names = metric_names(args.class_loss)
    grid_classes = grid_labels(num_classes, columns, device)
    # The same noise in every column: each column is one z drawn as every class.
    grid_noise = torch.randn(columns, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    grid_noise = grid_noise.repeat(num_classes, 1).to(device)
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
                                 args.class_weight)
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
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}"})
        save_epoch(args, epoch, history, G_average, grid_noise, grid_classes, {
            "script": SCRIPT, "generator": G.state_dict(), "generator_average": G_average.state_dict(),
            "discriminator": D.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "epoch": epoch, "args": vars(args), "image_shape": list(dataset.image_shape),
            "classes": dataset.classes, "rng": torch.get_rng_state()})

    if args.fid and rank == 0:
        report_fid(G_average, args, dataset, device)


def save_epoch(args, epoch, history, G_average, grid_noise, grid_classes, checkpoint):
    """Everything an epoch leaves on disk, checkpoint last. A full disk or a vanished folder is one line (exit 2);
    the checkpoint of the previous epoch stays intact, since the new one replaces it only once it is whole."""
    try:
        write_metrics(os.path.join(args.out, "metrics.csv"), history)
        data.plot_curves({k: [float(row[k]) for row in history] for k in ("d_loss", "g_loss")},
                         os.path.join(args.out, "losses.png"))
        with torch.no_grad():
            data.save_grid(G_average.eval()(grid_noise, grid_classes),
                           os.path.join(args.out, "samples", f"epoch_{epoch:03d}.png"), nrow=10)
        frames = sorted(f for f in os.listdir(os.path.join(args.out, "samples")) if f.endswith(".png"))
        data.save_gif([os.path.join(args.out, "samples", f) for f in frames], os.path.join(args.out, "progress.gif"))
        save_checkpoint(os.path.join(args.out, "checkpoint.pt"), checkpoint)
    except OSError as e:
        raise UsageError(f"cannot write epoch {epoch}'s files into {args.out} ({e.strerror or e}); "
                         f"checkpoint.pt still holds epoch {epoch - 1}") from None


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
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UsageError("--generate runs in one process: start it with python, not torchrun")
    checkpoint = load_checkpoint(args.out)
    saved = argparse.Namespace(**checkpoint["args"])
    classes = checkpoint["classes"]
    if args.label is not None and not 0 <= args.label < len(classes):
        raise UsageError(f"--label {args.label}: the model knows classes 0..{len(classes) - 1}")
    G, _ = build_models(saved, checkpoint["image_shape"], len(classes))
    restore(G, checkpoint["generator_average"], checkpoint, "generator")
    labels = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    labels = labels % len(classes)  # without --label: classes in turn
    images = generate_images(G.to(args.device), labels, saved.latent_dim, args.device, seed=args.seed)
    path = os.path.join(args.out, "samples.npz")
    tmp = path + ".tmp.npz"
    arrays = {"images": images.permute(0, 2, 3, 1).numpy(), "labels": labels.numpy()}
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        data.save_grid(images[:100], os.path.join(args.out, "samples.png"), nrow=10)
    except OSError as e:
        raise UsageError(f"cannot write the samples into {args.out} ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {len(images)} images to {path} and a grid to {os.path.join(args.out, 'samples.png')}")


# ----------------------------------------------------------------------------------------------------------------
# Command line

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Every number, the device and the flag combinations, before anything is loaded: one line naming the flag."""
    for name, least in (("epochs", 1), ("batch_size", 1), ("latent_dim", 1), ("width", 1), ("log_every", 1),
                        ("generate", 1), ("fid", 2)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least {least}")
    if not 0 <= args.seed < 2 ** 32:
        raise UsageError(f"--seed {args.seed}: must be in 0..{2 ** 32 - 1}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr {args.lr}: must be a positive number")
    if not (math.isfinite(args.class_weight) and args.class_weight >= 0):
        raise UsageError(f"--class-weight {args.class_weight}: must be a number >= 0")
    if not 0 <= args.average_decay < 1:
        raise UsageError(f"--average-decay {args.average_decay}: must be in [0, 1)")
    if args.image_size is not None and (args.image_size < 32 or args.image_size & (args.image_size - 1)):
        raise UsageError(f"--image-size {args.image_size}: must be a power of two, at least 32")
    if args.label is not None and args.generate is None:
        raise UsageError(f"--label {args.label}: only with --generate N")
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


def main(argv=None):
    rank = int(os.environ.get("RANK", 0))  # under torchrun only rank 0 reports, so one error is one line
    args = None
    try:
        args = parse_args(argv)
        if args.generate is not None:
            generate(args)
        else:
            rank, world_size = setup_distributed(args)
            train(args, rank, world_size)
    except (data.DataError, UsageError) as e:
        if rank == 0:
            print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        if rank == 0:
            print(f"\n{SCRIPT}: training diverged: {e}; the last good checkpoint is kept in {args.out}",
                  file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        if rank == 0:
            print(f"{SCRIPT}: error: out of GPU memory on {args.device}: lower --batch-size"
                  + (" or --width" if hasattr(args, "width") else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\ninterrupted: {args.out}/checkpoint.pt holds the last finished epoch; --resume continues",
                  file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
