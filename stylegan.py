"""StyleGAN2 (Karras et al. 2020, arXiv:1912.04958): mapping network, modulated convolutions, noise, skip generator.

    python stylegan.py --dataset fashion-mnist               # 28x28 grids, GIF, metrics in runs/stylegan/, ~13 min
    python stylegan.py --generate 1000 --truncation 0.7      # samples.npz/.png, style_mixing.png, truncation.png
    python stylegan.py --preset paper --dataset cifar/ --device cuda   # StyleGAN2-ADA's cifar configuration
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
R1_INTERVAL, PL_INTERVAL = 16, 4  # lazy regularisation: R1 every 16 minibatches, path length every 4 (sec. 3.1)
BLUR = torch.tensor([1.0, 3.0, 3.0, 1.0]).outer(torch.tensor([1.0, 3.0, 3.0, 1.0])) / 64  # the binomial filter


def upsample(x):  # (B, C, H, W) -> (B, C, 2H, 2W): zeros between the pixels, then the filter (upfirdn2d(up=2))
    return F.conv_transpose2d(x, 4 * BLUR.to(x).expand(x.shape[1], 1, 4, 4), stride=2, padding=1, groups=x.shape[1])


def downsample(x):  # (B, C, H, W) -> (B, C, H/2, W/2): the filter, then every 2nd pixel: no aliasing for D to use
    return F.conv2d(x, BLUR.to(x).expand(x.shape[1], 1, 4, 4), stride=2, padding=1, groups=x.shape[1])


def leaky_relu(x):  # times sqrt(2): unit variance out (the official lrelu's gain)
    return F.leaky_relu(x, 0.2) * math.sqrt(2)


class EqualLinear(nn.Module):  # equalised learning rate (ProGAN): N(0, 1) weights, scaled by 1 / sqrt(fan_in) in use
    def __init__(self, in_features, out_features, bias_init=0.0, lr_mult=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)  # lr_mult scales its learning rate
        self.bias = nn.Parameter(torch.full((out_features,), bias_init / lr_mult))
        self.weight_gain, self.bias_gain = lr_mult / math.sqrt(in_features), lr_mult

    def forward(self, x):  # (B, in) -> (B, out)
        return F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)


class EqualConv2d(nn.Module):  # a convolution with equalised learning rate and "same" padding
    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x):  # (B, in, H, W) -> (B, out, H, W)
        return F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's heart (sec. 2.2): a style s = affine(w) scales the input channels, w' = w s, and demodulation,
    w'' = w' / sqrt(sum w'^2 + 1e-8), replaces instance norm. As the official training path: one conv for the batch."""

    def __init__(self, in_channels, out_channels, w_dim, kernel_size=3, demodulate=True, up=False):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.demodulate, self.up = demodulate, up

    def forward(self, x, w):  # (B, in, H, W), (B, w_dim) -> (B, out, H, W), or 2H, 2W with up
        styles = self.affine(w)  # (B, in)
        weight = self.weight * self.weight_gain  # (out, in, k, k)
        x = x * styles[:, :, None, None]
        x = F.conv2d(upsample(x) if self.up else x, weight, padding=weight.shape[-1] // 2)
        if self.demodulate:  # sum over in, k, k of (w s)^2 = s^2 @ (sum over k, k of w^2): no per-sample weights
            norms = styles.square() @ weight.square().sum(dim=(2, 3)).t()  # (B, out)
            x = x * (norms + 1e-8).rsqrt()[:, :, None, None]
        return x


class SynthesisLayer(nn.Module):  # modulated 3x3 conv, per-pixel noise times a learned strength (0 at first), bias
    def __init__(self, in_channels, out_channels, w_dim, resolution, up=False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, w_dim, kernel_size=3, up=up)
        self.noise_strength, self.bias = nn.Parameter(torch.zeros([])), nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(self, x, w, noise_mode="random"):  # (B, in, R or R/2, ...), (B, w_dim) -> (B, out, R, R)
        x = self.conv(x, w)
        noise = self.noise_const if noise_mode == "const" else torch.randn_like(x[:, :1])  # const: repeatable grids
        return leaky_relu(x + noise * self.noise_strength + self.bias[:, None, None])


class ToRGB(nn.Module):  # features -> this resolution's image: a modulated 1x1 conv without demodulation, a bias
    def __init__(self, in_channels, channels, w_dim):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, channels, w_dim, kernel_size=1, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, w):  # (B, in, R, R), (B, w_dim) -> (B, C, R, R)
        return self.conv(x, w) + self.bias[:, None, None]


def channels_at(image_size, width, channel_base):  # {4: c4, 8: c8, ...} ({7: c7, 14: c14, 28: c28} at 28 px)
    start = 7 if image_size == 28 else 4  # channels at resolution r: min(channel_base / r, width)
    sides = [start << i for i in range((image_size // start).bit_length())]
    return {side: max(1, min(channel_base // side, width)) for side in sides}


class MappingNetwork(nn.Module):  # z -> w at 1/100 the learning rate (StyleGAN, app. C.1); w_avg: truncation's centre
    def __init__(self, latent_dim, w_dim, num_layers):
        super().__init__()
        dims = [latent_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(EqualLinear(a, b, lr_mult=0.01) for a, b in zip(dims, dims[1:]))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z, psi=1.0, track_average=False):  # (B, latent_dim) -> (B, w_dim)
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()  # unit second moment, whatever the size
        for layer in self.layers:
            x = leaky_relu(layer(x))
        if track_average:  # in training only: the mean of the ws G learns from
            self.w_avg.copy_(x.detach().float().mean(0).lerp(self.w_avg, 0.995))  # the official w_avg_beta
        return self.w_avg.lerp(x, psi) if psi != 1 else x


class SynthesisNetwork(nn.Module):  # ws -> image: a ToRGB per resolution, upsampled and summed (skip G, sec. 4.1)
    def __init__(self, w_dim, image_size, channels, width, channel_base):
        super().__init__()
        widths = list(channels_at(image_size, width, channel_base).items())  # [(4, c4), (8, c8), ...]
        self.const = nn.Parameter(torch.randn(widths[0][1], widths[0][0], widths[0][0]))  # (c4, 4, 4)
        self.layers = nn.ModuleList([SynthesisLayer(widths[0][1], widths[0][1], w_dim, widths[0][0])])
        self.to_rgbs = nn.ModuleList([ToRGB(widths[0][1], channels, w_dim)])
        for (_, c_in), (resolution, c_out) in zip(widths, widths[1:]):
            self.layers.append(SynthesisLayer(c_in, c_out, w_dim, resolution, up=True))
            self.layers.append(SynthesisLayer(c_out, c_out, w_dim, resolution))
            self.to_rgbs.append(ToRGB(c_out, channels, w_dim))

    def forward(self, ws, noise_mode="random"):  # (B, num_ws, w_dim) -> (B, C, S, S)
        x = self.layers[0](self.const.expand(len(ws), -1, -1, -1), ws[:, 0], noise_mode)  # (B, c4, 4, 4)
        image = self.to_rgbs[0](x, ws[:, 1])  # (B, C, 4, 4)
        for j in range(1, len(self.to_rgbs)):  # (B, c8, 8, 8), ...: ToRGB shares its w with the next layer
            x = self.layers[2 * j - 1](x, ws[:, 2 * j - 1], noise_mode)
            x = self.layers[2 * j](x, ws[:, 2 * j], noise_mode)
            image = upsample(image) + self.to_rgbs[j](x, ws[:, 2 * j + 1])
        return image  # no tanh, as in the paper: D and the [-1, 1] data keep it in range


class Generator(nn.Module):  # z -> image: mapping, the same w for every layer, synthesis
    def __init__(self, latent_dim, w_dim, image_size, channels, width, channel_base, mapping_layers):
        super().__init__()
        self.mapping = MappingNetwork(latent_dim, w_dim, mapping_layers)
        self.synthesis = SynthesisNetwork(w_dim, image_size, channels, width, channel_base)
        self.num_ws = len(self.synthesis.layers) + 1
        self.register_buffer("pl_mean", torch.zeros([]))  # the path length's running mean, resumed with G

    def ws(self, z, psi=1.0, track_average=False, mixing_prob=0.0):  # (B, latent_dim) -> (B, num_ws, w_dim)
        ws = self.mapping(z, psi, track_average)[:, None].repeat(1, self.num_ws, 1)
        if mixing_prob > 0 and torch.rand([]).item() < mixing_prob:  # style mixing (StyleGAN, sec. 3.1)
            cutoff = int(torch.randint(1, self.num_ws, []))
            ws = torch.cat([ws[:, :cutoff], self.ws(torch.randn_like(z))[:, cutoff:]], dim=1)
        return ws

    def forward(self, z, psi=1.0, noise_mode="random"):  # (B, latent_dim) -> (B, C, S, S)
        return self.synthesis(self.ws(z, psi), noise_mode)


class Discriminator(nn.Module):  # image -> one logit: the official 'orig' D (no residuals)
    def __init__(self, image_size, channels, width, channel_base, mbstd_group=4):
        super().__init__()
        widths = channels_at(image_size, width, channel_base)
        self.from_rgb = EqualConv2d(channels, widths[image_size], kernel_size=1)  # (B, c32, 32, 32) at 32 px
        self.blocks = nn.ModuleList(  # (B, c16, 16, 16), (B, c8, 8, 8), (B, c4, 4, 4) at 32 px
            nn.ModuleList([EqualConv2d(widths[r], widths[r], 3), EqualConv2d(widths[r], widths[r // 2], 3)])
            for r in sorted(widths, reverse=True)[:-1])
        self.mbstd_group, self.start = mbstd_group, min(widths)  # 4 (7 at 28 px)
        c = widths[self.start]
        self.conv = EqualConv2d(c + 1, c, 3)  # (B, c4, 4, 4) after the stddev channel
        self.fc, self.out = EqualLinear(c * self.start ** 2, c), EqualLinear(c, 1)

    def forward(self, images):  # (B, C, S, S) -> (B,)
        x = leaky_relu(self.from_rgb(images))
        for conv0, conv1 in self.blocks:
            x = leaky_relu(conv1(downsample(leaky_relu(conv0(x)))))
        group = max(d for d in range(1, min(self.mbstd_group, len(x)) + 1) if len(x) % d == 0)  # divides B
        y = x.unflatten(0, (group, -1))  # minibatch stddev (ProGAN): sample k in group k mod B/group
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean(dim=(1, 2, 3))  # (B / group,): how varied
        y = y[:, None, None, None].repeat(group, 1, self.start, self.start)  # a constant channel, (B, 1, 4, 4)
        x = leaky_relu(self.conv(torch.cat([x, y], dim=1)))
        return self.out(leaky_relu(self.fc(x.flatten(1)))).squeeze(1)


# ---- The GAN itself: the logistic loss, lazy R1 and path length, the alternating update --------------------------

def bce(logits, label):  # binary cross-entropy of D's logits (numerically safe) against 1 (real) or 0 (fake)
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def r1_penalty(D, real, shown):  # R1 (Mescheder et al. 2018): E||grad_x D(x)||^2 at the reals, through augment
    real = real.detach().requires_grad_(True)
    (grads,) = torch.autograd.grad(D(shown(real)).float().sum(), real, create_graph=True)
    return grads.float().flatten(1).square().sum(1).mean()


def path_length_penalty(G, z, mixing_prob=0.0):  # sec. 3.2: E[(|J^T y| - a)^2], J = d image / d w, y random
    ws = G.ws(z, mixing_prob=mixing_prob)
    images = G.synthesis(ws)
    noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
    (grads,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    lengths = grads.float().square().sum(2).mean(1).sqrt()  # |J^T y|, (B,)
    G.pl_mean.copy_(G.pl_mean.lerp(lengths.detach().mean(), 0.01))  # a, its running mean (the official pl_decay)
    return (lengths - G.pl_mean).square().mean()


def average_gradients(model):
    """Under torchrun, each gradient becomes its mean over the processes (one flat all-reduce). By hand, as StyleGAN3
    does: D's two forward passes a backward, and G's backward through a frozen D, do not fit DDP's pattern."""
    if dist.is_initialized():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]) / dist.get_world_size()
        dist.all_reduce(flat)
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))


def train_step(G, D, opt_g, opt_d, real, latent_dim, scaler, step, r1_gamma, mixing_prob=0.0, pl_weight=0.0,
               augment=None, amp=False):
    """One D update, then one G update on the same fakes against the D just improved; D sees every image through
    augment. step (from 1) sets the lazy terms: R1 on every R1_INTERVAL-th step, path length on every PL_INTERVAL-th,
    each times its interval to weigh what it would every step. Returns the losses, D's mean outputs and the penalties
    (times their intervals) on the device: .item() here would wait every step."""
    shown = augment or (lambda images: images)  # what D is shown of an image
    zero = torch.zeros([], device=real.device)
    cast = torch.float16 if real.device.type == "cuda" else torch.bfloat16  # --amp (loss scaling: CUDA only)
    z = torch.randn(len(real), latent_dim, device=real.device)
    with torch.autocast(real.device.type, cast, enabled=amp):
        fake = G.synthesis(G.ws(z, track_average=True, mixing_prob=mixing_prob))
        real_logits, fake_logits = D(shown(real)).float(), D(shown(fake.detach())).float()  # not into G
        loss_d = bce(real_logits, 1) + bce(fake_logits, 0)  # StyleGAN2's logistic loss
        r1 = r1_penalty(D, real, shown) if r1_gamma and step % R1_INTERVAL == 0 else zero
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d + R1_INTERVAL * r1_gamma / 2 * r1).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:  # ADA's p moves by what D said of the reals
        augment.observe(real_logits.detach())

    D.requires_grad_(False)  # G's backward passes through D to the image without filling D's gradients
    with torch.autocast(real.device.type, cast, enabled=amp):
        loss_g = bce(D(shown(fake)).float(), 1)  # non-saturating: -log D(G(z))
        pl = zero
        if pl_weight and step % PL_INTERVAL == 0:  # on half the batch, as the official pl_batch_shrink 2
            pl = path_length_penalty(G, z[:max(1, len(z) // 2)], mixing_prob)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g + PL_INTERVAL * pl_weight * pl).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)
    return torch.stack([loss_d.detach(), loss_g.detach(), real_logits.detach().sigmoid().mean(),
                        fake_logits.detach().sigmoid().mean(), R1_INTERVAL * r1.detach(), PL_INTERVAL * pl.detach()])


@torch.no_grad()
def update_average(G_average, G, step, decay, ramp=0.05):
    """gan.py's moving average of G with StyleGAN2-ADA's ramp: decay gives the full half-life, log(0.5) / log(decay)
    steps, but while ramp * step is shorter that is the half-life: early samples are not an average of noise."""
    half_life = min(math.log(0.5) / math.log(decay), ramp * step) if decay > 0 else 0.0
    beta = 0.5 ** (1 / half_life) if half_life > 0 else 0.0
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - beta)
    for average, current in zip(G_average.buffers(), G.buffers()):  # w_avg, pl_mean, the fixed noise
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
    args.image_size = args.image_size or (28 if args.dataset in data.DATASETS else 64)
    if rank == 0:
        data.prepare_out(args.out)  # writable, and no other run writing there
    dataset = data.load_data(args.dataset, args.data_dir, args.image_size, rank)
    dataset.images, dataset.labels = dataset.images[:args.train_images], dataset.labels[:args.train_images]
    held_out = data.load_data(args.dataset, args.data_dir, args.image_size, rank, split="test")

    torch.manual_seed(args.seed)  # the same initial weights in every process
    channels = dataset.image_shape[0]
    G = Generator(args.latent_dim, args.w_dim, args.image_size, channels, args.width, args.channel_base,
                  args.mapping_layers).to(device)
    D = Discriminator(args.image_size, channels, args.width, args.channel_base, args.mbstd_group).to(device)
    torch.backends.cudnn.benchmark = True  # speed only: cuDNN picks its fastest convolutions for these shapes
    G_average = copy.deepcopy(G).requires_grad_(False)  # what grids, --generate and --fid sample from
    # Adam (0, 0.99), StyleGAN2's. A network regularised every k steps takes k + 1 steps' worth of gradient in k:
    # the official code scales its lr by c = k / (k + 1) and its betas to the power c (G only with path length).
    c_d = R1_INTERVAL / (R1_INTERVAL + 1) if args.r1_gamma else 1.0
    c_g = PL_INTERVAL / (PL_INTERVAL + 1) if args.pl_weight else 1.0
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr * c_g, betas=(0.0, 0.99 ** c_g), eps=1e-8)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr * c_d, betas=(0.0, 0.99 ** c_d), eps=1e-8)
    augment = data.make_augmentation(args.augment, channels, device)
    parts = {"generator": G, "generator_average": G_average, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d,
             **({"augment": augment} if augment else {})}
    start_epoch, history = data.resume(checkpoint, parts, device) if checkpoint else (0, [])  # weights, RNG, log
    # --compile in place (the checkpoint's names stay); R1 and path length differentiate twice, which it cannot
    if args.compile and not args.pl_weight:
        G.synthesis.compile()
    if args.compile and not args.r1_gamma:
        D.compile()
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    grid_noise = torch.randn(100, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    reals = {"d_acc_real_train": dataset.images, "d_acc_real_test": held_out and held_out.images}
    names = ["d_loss", "g_loss", "d_real", "d_fake", "r1_penalty", "pl_penalty"]
    widths = "/".join(map(str, channels_at(args.image_size, args.width, args.channel_base).values()))  # 4..S px
    if rank == 0:
        print(f"{len(dataset.images)} images from {dataset.source}, {len(batches)} steps an epoch, {device}, "
              f"channels {widths}")
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(args.seed * 1_000_003 + rank * 1009 + epoch)
        started, totals = time.time(), torch.zeros(len(names), device=device)
        for i, (real, _) in enumerate(batches.epoch(epoch), 1):
            step = (epoch - 1) * len(batches) + i
            real = real.tensor_split(world_size)[rank]  # this process's share of the global batch
            totals += train_step(G, D, opt_g, opt_d, real, args.latent_dim, scaler, step, args.r1_gamma,
                                 args.style_mixing, args.pl_weight, augment, args.amp)
            update_average(G_average, G, step, args.average_decay)
            if i % args.log_every == 0 or i == len(batches):
                means = totals / i
                if world_size > 1:
                    dist.all_reduce(means.div_(world_size))
                means = means.tolist()  # the only sync with the device, every --log-every steps
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"the losses became {means[0]:.3g}/{means[1]:.3g} at epoch {epoch}")
                if rank == 0:
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | d_loss {means[0]:.3f} g_loss "
                          f"{means[1]:.3f} | D(x) {means[2]:.2f} D(G(z)) {means[3]:.2f} | R1 {means[4]:.3g} | "
                          f"{i * args.batch_size / (time.time() - started):.0f} img/s", flush=True)
        if rank > 0:
            continue
        seconds = time.time() - started
        accuracy = d_accuracy(D, G, reals, args.latent_dim, 0.0)
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(names, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{len(dataset.images) / seconds:.1f}",
                        "augment_p": f"{augment.p.item() if augment else 0:.4f}"})
        grid = G_average.eval()(grid_noise, noise_mode="const")
        pictures = style_grids(G_average, args.latent_dim, device, args.seed) if epoch == args.epochs else []
        data.save_epoch(args.out, epoch, history, ["d_loss", "g_loss"] + ["augment_p"] * (args.augment == "ada"),
                        grid, {"script": SCRIPT, "epoch": epoch, "args": vars(args), "history": history,
                               "image_shape": list(dataset.image_shape), "classes": dataset.classes,
                               **{key: part.state_dict() for key, part in parts.items()}, **data.random_states(device)},
                        pictures)
    if args.fid and rank == 0:  # fid.py is imported only here: only --fid needs it
        import fid
        try:
            print(fid.report(generate_images(G_average, args.fid, args.latent_dim, device, args.seed + 1),
                             dataset.images[:10_000], device, cache_dir=dataset.cache_dir))
        except fid.FIDError as e:
            raise UsageError(f"--fid: {e}") from None


@torch.no_grad()
def generate_images(G, n, latent_dim, device, seed, psi=1.0):  # uint8 (n, C, H, W), 500 at a time, fixed noise
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([data.to_uint8(G.eval()(batch.to(device), psi, noise_mode="const")).cpu()
                      for batch in z.split(500)])


@torch.no_grad()
def style_grids(G, latent_dim, device, seed, columns=9, rows=6, cutoff=None):
    """(file name, images) of the grids written after the last epoch and by --generate. style_mixing.png, the
    paper's Figure 3: after an empty corner the top row holds `columns` coarse sources, the left column `rows` fine
    ones; a cell takes the coarse ws (ws[:cutoff], by default every stage but the last: at 28 px the 7x7 and 14x14
    layers, shape) from its column's source, the fine ones (the last stage's: stroke, shading) from its row's.
    truncation.png: one z a row, psi from 1 down to 0."""
    cutoff = G.num_ws - 3 if cutoff is None else cutoff  # the last stage's two layers and its ToRGB are fine
    G.eval()
    ws = G.ws(torch.randn(columns + rows, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device))
    coarse = torch.arange(G.num_ws, device=device)[:, None] < cutoff  # (num_ws, 1)
    cells = torch.where(coarse, ws[None, :columns], ws[columns:, None])  # (rows, columns, num_ws, w_dim)
    sources = G.synthesis(ws, noise_mode="const")
    mixed = G.synthesis(cells.flatten(0, 1), noise_mode="const").unflatten(0, (rows, columns))
    top = torch.cat([torch.zeros_like(sources[:1]), sources[:columns]])  # the corner: mid grey
    mixing = torch.cat([top, torch.cat([sources[columns:, None], mixed], dim=1).flatten(0, 1)])
    z = torch.randn(6, latent_dim, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    truncation = torch.stack([G(z, psi, noise_mode="const") for psi in torch.linspace(1, 0, 10).tolist()], dim=1)
    return [("style_mixing.png", mixing), ("truncation.png", truncation.flatten(0, 1))]


def generate(args):
    checkpoint = load_checkpoint(args)
    saved = argparse.Namespace(**checkpoint["args"])
    G = Generator(saved.latent_dim, saved.w_dim, saved.image_size, checkpoint["image_shape"][0], saved.width,
                  saved.channel_base, saved.mapping_layers).to(args.device)
    G.load_state_dict(checkpoint["generator_average"])
    data.save_samples(args.out, generate_images(G, args.generate, saved.latent_dim, args.device, args.seed,
                                                args.truncation))
    try:
        for name, images in style_grids(G, saved.latent_dim, args.device, args.seed):
            data.save_grid(images, os.path.join(args.out, name), nrow=10)
    except OSError as e:
        raise data.DataError(f"cannot write the style grids into {args.out} ({e.strerror or e})") from None
    print(f"wrote style_mixing.png and truncation.png into {args.out}")


class UsageError(Exception):  # bad flags or an unusable checkpoint: one line, exit status 2
    pass


def stop(signum, frame):  # SIGTERM, a scheduler's stop: unwinds like Ctrl-C, with exit status 143
    raise KeyboardInterrupt("SIGTERM")


# The preset first: resuming with another one names it, not a setting it changed.
KEPT = ("preset", "image_size", "width", "channel_base", "w_dim", "latent_dim", "mapping_layers", "mbstd_group",
        "batch_size", "lr", "seed", "average_decay", "r1_gamma", "style_mixing", "pl_weight", "train_images", "augment")


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


def probability(text):
    if not 0 <= float(text) <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return float(text)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# --preset cpu: parse_args' defaults, timed on two CPU cores (docs/stylegan.md). paper: StyleGAN2-ADA's cifar config
# (train.py's cfg_specs['cifar']); the defaults it keeps are the paper's too (Adam, lazy R1, 'orig' D, ramp 0.05).
PRESETS = {
    "cpu": {},
    "paper": {
        "image_size": 32,  # CIFAR-10's 32x32
        "width": 512, "channel_base": 16384,  # channel_max 512: min(16384 / 32, 512) = 512 channels at 4..32 px
        "latent_dim": 512, "w_dim": 512, "mapping_layers": 2,  # z_dim, w_dim, map 2 (8 at 1024 px)
        "batch_size": 64, "mbstd_group": 32, "lr": 0.0025, "r1_gamma": 0.01,  # mb, mbstd, lrate, gamma
        "average_decay": 0.5 ** (64 / 500_000),  # ema 500 kimg: a half-life of 500,000 images at batch 64
        "style_mixing": 0.0, "pl_weight": 0.0,  # both off at 32 px
    },
}


def parse_args(argv):
    COUNT, RATE, DECAY, WEIGHT = number(int, 1), number(float, 1e-12), number(float, 0, 1), number(float, 0)
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu (default): the defaults below; paper: "
                   + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["paper"].items())
                   + "; flags given win")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, stacked-mnist or a folder (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=COUNT, default=3, help="total passes over the training set (default 3)")
    p.add_argument("--batch-size", type=COUNT, default=32, help="images a step, over all processes (default 32)")
    p.add_argument("--lr", type=RATE, default=0.0025, help="Adam's learning rate, G and D (default 0.0025)")
    p.add_argument("--latent-dim", type=COUNT, default=128, help="size of the noise vector z (default 128)")
    p.add_argument("--w-dim", type=COUNT, default=128, help="size of w, the mapping network's output (default 128)")
    p.add_argument("--mapping-layers", type=COUNT, default=2, help="layers of the mapping network (default 2)")
    p.add_argument("--image-size", type=int, choices=[28, 32, 64, 128, 256, 512, 1024], metavar="S",
                   help="side of the images (default 28 for mnist/fashion-mnist, 64 for a folder)")
    p.add_argument("--width", type=COUNT, default=64, help="the most channels of any layer (default 64)")
    p.add_argument("--channel-base", type=COUNT, default=512, help="channels at resolution r: min(channel_base / r, "
                   "width) (default 512: 64/36/18 at 7/14/28 px)")
    p.add_argument("--r1-gamma", type=WEIGHT, default=4.0, help=f"weight gamma of R1, gamma/2 E||grad D(x)||^2 on "
                   f"the reals, every {R1_INTERVAL} steps (default 4; 0: off)")
    p.add_argument("--style-mixing", type=probability, default=0.0, help="chance a batch mixes 2 z (default 0)")
    p.add_argument("--pl-weight", type=WEIGHT, default=0.0, help="path length regularisation's weight (default 0)")
    p.add_argument("--mbstd-group", type=COUNT, default=4, help="group of D's minibatch stddev (default 4)")
    p.add_argument("--truncation", type=probability, default=1.0, metavar="PSI", help="with --generate: w = w_avg + "
                   "PSI (w - w_avg); 0: the mean image (default 1: none)")
    p.add_argument("--average-decay", type=DECAY, default=0.999, help="of the moving average of G, a half-life ramped "
                   "up as 0.05 x the steps (default 0.999)")
    p.add_argument("--train-images", type=COUNT, help="train on the first N training images only (default all)")
    p.add_argument("--augment", choices=("none", "diffaug", "ada"), default="none", help="what D sees (default none)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32), default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1...")
    p.add_argument("--out", default=os.path.join("runs", "stylegan"), help="the run's folder (default runs/stylegan)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (--epochs counts the total)")
    p.add_argument("--generate", type=COUNT, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--fid", type=number(int, 2), metavar="N", help="after training, FID and KID of N samples")
    p.add_argument("--log-every", type=COUNT, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D, each while no penalty is on")
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # the preset's values, under the flags given
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
