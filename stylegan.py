"""StyleGAN2 (Karras et al. 2020, arXiv:1912.04958): a style-based generator with modulated convolutions.

    python stylegan.py --dataset fashion-mnist                 # 32x32 grids, GIF, metrics in runs/stylegan/
    python stylegan.py --dataset fashion-mnist --conditional --out runs/stylegan-cond  # one row per class
    python stylegan.py --out runs/stylegan --generate 1000 --truncation 0.7  # samples.npz/.png and the style grids
    python stylegan.py --preset paper --dataset cifar/ --device cuda  # StyleGAN2-ADA's cifar configuration

z goes through a small mapping network to w; w is turned into one style per layer by an affine map, and each style
scales the input channels of its layer's convolution (modulation), after which every output channel is divided by
its expected norm (demodulation). The picture is built up from a learned 4x4 constant, with per-pixel noise for the
fine detail, and as a sum of one RGB image per resolution ("skip" generator). D is a plain convolutional stack with
a minibatch standard deviation feature. Loss: the non-saturating logistic loss, lazy R1 on reals. At the end of
training (and with --generate) two more grids: style_mixing.png and truncation.png (see style_mixing_grid).
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

SQRT2 = math.sqrt(2)  # the gain that keeps leaky ReLU's output at unit variance (as the official code's lrelu)
MAPPING_LR_MULT = 0.01  # the mapping network learns 100x slower than the rest (StyleGAN, sec. C.1)
W_AVERAGE_BETA = 0.995  # running mean of w for truncation (official w_avg_beta)
R1_INTERVAL, PL_INTERVAL = 16, 4  # lazy regularisation: R1 every 16 minibatches, path length every 4 (sec. 3.1)
PL_DECAY = 0.01  # the path length's running mean a (official pl_decay)
MIX_GRID_CUTOFF = 4  # style_mixing_grid: ws 0..3 (the 4x4 and 8x8 layers) are "coarse", the rest "fine"


# ----------------------------------------------------------------------------------------------------------------
# Building blocks: equalised learning rate, [1, 3, 3, 1] resampling, modulated convolution

def normalize_2nd_moment(x, eps=1e-8):
    """x / sqrt(mean(x^2)) along dim 1: z (and a class embedding) with unit second moment, whatever its size."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def blur_kernel(x, gain):
    """The [1, 3, 3, 1] binomial filter (outer product, summing to gain), one copy per channel of x: (C, 1, 4, 4)."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], device=x.device, dtype=x.dtype)
    kernel = taps[:, None] * taps[None, :]
    return (kernel * (gain / kernel.sum())).expand(x.shape[1], 1, 4, 4)


def upsample(x):
    """(B, C, H, W) -> (B, C, 2H, 2W): zeros between the pixels, then the [1, 3, 3, 1] filter with gain 4, as the
    official upfirdn2d(up=2) (zero padding outside). Plain torch, a depthwise transposed convolution: runs on any
    device. In the interior this is bilinear interpolation (weights 9, 3, 3, 1 / 16)."""
    return F.conv_transpose2d(x, blur_kernel(x, gain=4.0), stride=2, padding=1, groups=x.shape[1])


def downsample(x):
    """(B, C, H, W) -> (B, C, H/2, W/2): the [1, 3, 3, 1] filter, then every second pixel (official
    upfirdn2d(down=2)); a low-pass before decimation keeps D from seeing aliasing that G could exploit."""
    return F.conv2d(x, blur_kernel(x, gain=1.0), stride=2, padding=1, groups=x.shape[1])


class EqualLinear(nn.Module):
    """A linear layer with equalised learning rate (Karras et al. 2018): weights stored as N(0, 1) / lr_mult and
    scaled by lr_mult / sqrt(fan_in) at run time, so Adam's step is the same relative size for every layer, and
    lr_mult < 1 slows one layer down (the mapping network). bias_init is the bias the layer starts with."""

    def __init__(self, in_features, out_features, bias_init=0.0, lr_mult=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full((out_features,), bias_init / lr_mult))
        self.weight_gain, self.bias_gain = lr_mult / math.sqrt(in_features), lr_mult

    def forward(self, x):  # (B, in) -> (B, out)
        return F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)


class EqualConv2d(nn.Module):
    """A convolution with equalised learning rate (see EqualLinear), "same" padding; down=True filters with
    [1, 3, 3, 1] and halves the resolution before convolving (D's downsampling)."""

    def __init__(self, in_channels, out_channels, kernel_size, down=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain, self.down = 1 / math.sqrt(in_channels * kernel_size ** 2), down

    def forward(self, x):  # (B, in, H, W) -> (B, out, H, W), or H/2, W/2 with down
        if self.down:
            x = downsample(x)
        return F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)


def leaky_relu(x):
    return F.leaky_relu(x, 0.2) * SQRT2


class ModulatedConv2d(nn.Module):
    """The heart of StyleGAN2 (sec. 2.2). A style s = affine(w) (bias 1 at the start: every style begins as "leave
    the channel alone") scales the weight's input channels, w' = w * s; demodulation then divides each output
    channel by the norm it would give unit-variance inputs, w'' = w' / sqrt(sum w'^2 + 1e-8), which replaces
    StyleGAN's instance normalisation and with it the "droplet" artefacts. Computed the non-fused way (the official
    training path): scale the input activations by s, one convolution with the shared weight for the whole batch,
    scale the outputs by the demodulation factor; mathematically the same as a per-sample weight, and fast on a
    CPU. up=True doubles the resolution (upsample) before the convolution."""

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
        if self.up:
            x = upsample(x)
        x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
        if self.demodulate:  # 1 / ||w'|| per sample and output channel: (B, out)
            # sum over in, k, k of (w s)^2 = sum over in of s^2 (sum over k, k of w^2): a matrix product, instead
            # of building the (B, out, in, k, k) per-sample weights
            norms = styles.square() @ weight.square().sum(dim=(2, 3)).t()
            x = x * (norms + 1e-8).rsqrt()[:, :, None, None]
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution, per-pixel noise times a learned strength (0 at the start), bias, leaky ReLU.
    noise_mode: "random" (training), "const" (one fixed noise image per layer, for repeatable grids), "none"."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, up=False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, w_dim, kernel_size=3, up=up)
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(self, x, w, noise_mode="random"):  # (B, in, R or R/2, ...), (B, w_dim) -> (B, out, R, R)
        x = self.conv(x, w)
        if noise_mode == "random":
            x = x + torch.randn(len(x), 1, *x.shape[2:], device=x.device, dtype=x.dtype) * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        return leaky_relu(x + self.bias[:, None, None])


class ToRGB(nn.Module):
    """Features -> an image at this resolution: a modulated 1x1 convolution without demodulation, plus a bias."""

    def __init__(self, in_channels, channels, w_dim):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, channels, w_dim, kernel_size=1, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, w):  # (B, in, R, R), (B, w_dim) -> (B, C, R, R)
        return self.conv(x, w) + self.bias[:, None, None]


def channels_at(image_size, width, channel_base):
    """Channels per resolution, as the official code: min(channel_base / resolution, width), at 4, 8, ... px."""
    return {4 * 2 ** i: max(1, min(channel_base // (4 * 2 ** i), width)) for i in range(image_size.bit_length() - 2)}


# ----------------------------------------------------------------------------------------------------------------
# The networks

class MappingNetwork(nn.Module):
    """z (and a class) -> w: z normalised to unit second moment, for a conditional model concatenated with the
    normalised class embedding, then num_layers equalised linear layers at a 100x lower learning rate. Keeps the
    running mean of w (w_avg) for truncation: w = w_avg + psi (w - w_avg)."""

    def __init__(self, latent_dim, w_dim, num_layers, num_classes=0):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, w_dim) if num_classes else None
        dims = [latent_dim + (w_dim if num_classes else 0)] + [w_dim] * num_layers
        self.layers = nn.ModuleList(EqualLinear(a, b, lr_mult=MAPPING_LR_MULT) for a, b in zip(dims, dims[1:]))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z, labels=None, psi=1.0, track_average=False):  # (B, latent_dim), (B,) -> (B, w_dim)
        x = normalize_2nd_moment(z)
        if self.label_embedding is not None:
            x = torch.cat([x, normalize_2nd_moment(self.label_embedding(labels))], dim=1)
        for layer in self.layers:
            x = leaky_relu(layer(x))
        if track_average:  # during training only: the mean of the w that G is actually trained on
            self.w_avg.copy_(x.detach().float().mean(0).lerp(self.w_avg, W_AVERAGE_BETA))
        return self.w_avg.lerp(x, psi) if psi != 1 else x


class SynthesisNetwork(nn.Module):
    """ws (one w per layer) -> image: a learned 4x4 constant, one SynthesisLayer at 4x4, then per doubling an
    upsampling SynthesisLayer and a plain one; a ToRGB per resolution, the images upsampled and summed (the skip
    generator, sec. 4.1). Layer k reads ws[:, k]; a ToRGB shares its w with the next resolution's first layer, as
    in the official code, so there are 2 ws per resolution (8 at 32x32)."""

    def __init__(self, w_dim, image_size, channels, width, channel_base):
        super().__init__()
        widths = list(channels_at(image_size, width, channel_base).items())  # [(4, c4), (8, c8), ...]
        self.const = nn.Parameter(torch.randn(widths[0][1], 4, 4))
        self.layers = nn.ModuleList([SynthesisLayer(widths[0][1], widths[0][1], w_dim, 4)])
        self.to_rgbs = nn.ModuleList([ToRGB(widths[0][1], channels, w_dim)])
        for (_, c_in), (resolution, c_out) in zip(widths, widths[1:]):
            self.layers.append(SynthesisLayer(c_in, c_out, w_dim, resolution, up=True))
            self.layers.append(SynthesisLayer(c_out, c_out, w_dim, resolution))
            self.to_rgbs.append(ToRGB(c_out, channels, w_dim))
        self.num_ws = len(self.layers) + 1

    def forward(self, ws, noise_mode="random"):  # (B, num_ws, w_dim) -> (B, C, S, S)
        x = self.const.expand(len(ws), -1, -1, -1)  # (B, c4, 4, 4)
        x = self.layers[0](x, ws[:, 0], noise_mode)
        image = self.to_rgbs[0](x, ws[:, 1])  # (B, C, 4, 4)
        for j in range(1, len(self.to_rgbs)):  # (B, c, 8, 8), (B, c, 16, 16), ...
            x = self.layers[2 * j - 1](x, ws[:, 2 * j - 1], noise_mode)
            x = self.layers[2 * j](x, ws[:, 2 * j], noise_mode)
            image = upsample(image) + self.to_rgbs[j](x, ws[:, 2 * j + 1])
        return image  # no tanh, as in the paper: D and the [-1, 1] data keep it in range


class Generator(nn.Module):
    """z (and a class) -> image: mapping to w, w copied to every layer, then synthesis. The path length's running
    mean (pl_mean) lives here as a buffer, so that a checkpoint resumes it."""

    def __init__(self, latent_dim, w_dim, image_size, channels, width, channel_base, mapping_layers, num_classes=0):
        super().__init__()
        self.mapping = MappingNetwork(latent_dim, w_dim, mapping_layers, num_classes)
        self.synthesis = SynthesisNetwork(w_dim, image_size, channels, width, channel_base)
        self.num_ws = self.synthesis.num_ws
        self.register_buffer("pl_mean", torch.zeros([]))

    def forward(self, z, labels=None, psi=1.0, noise_mode="random"):  # (B, latent_dim), (B,) -> (B, C, S, S)
        return self.synthesis(broadcast(self.mapping(z, labels, psi), self.num_ws), noise_mode)


def broadcast(w, num_ws):
    """(B, w_dim) -> (B, num_ws, w_dim): the same w for every layer, as a tensor of its own (style mixing writes
    into parts of it, path length differentiates by it)."""
    return w[:, None].repeat(1, num_ws, 1)


def mix_styles(ws, other_ws, cutoff):
    """Style mixing: layers before cutoff take their w from ws, the layers from cutoff on from other_ws."""
    return torch.cat([ws[..., :cutoff, :], other_ws[..., cutoff:, :]], dim=-2)


def minibatch_stddev(x, group_size):
    """(B, C, H, W) -> (B, C + 1, H, W): one more feature map, the standard deviation of every feature over a group
    of samples, averaged (ProGAN's minibatch stddev, one channel). D sees how varied a batch is, which penalises a
    G that gives everyone the same image. The group is the largest divisor of B up to group_size (the official
    code needs B to be a multiple; data.Batches' batches differ in size by one)."""
    n, c, h, w = x.shape
    group = max(d for d in range(1, min(group_size, n) + 1) if n % d == 0)
    y = x.reshape(group, n // group, c, h, w)  # sample k is in group k mod n/group
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean(dim=(1, 2, 3))  # (n / group,)
    return torch.cat([x, y.reshape(-1, 1, 1, 1).repeat(group, 1, h, w)], dim=1)


class Discriminator(nn.Module):
    """Image (and a class) -> one logit: the official 'orig' D, as in the cifar configuration. fromRGB (1x1), then
    per halving two 3x3 convolutions, the second after a [1, 3, 3, 1] downsampling; at 4x4 the minibatch stddev, a
    3x3 convolution, a linear layer and the output. Conditional: projection (Miyato & Koyama 2018) as in the
    official code, the logit is <features, normalised embed(y)> / sqrt(dim)."""

    def __init__(self, image_size, channels, width, channel_base, mbstd_group=4, num_classes=0):
        super().__init__()
        widths = channels_at(image_size, width, channel_base)
        self.from_rgb = EqualConv2d(channels, widths[image_size], kernel_size=1)  # (B, c32, 32, 32) at 32x32
        self.blocks = nn.ModuleList()
        resolution = image_size
        while resolution > 4:  # (B, c16, 16, 16), (B, c8, 8, 8), (B, c4, 4, 4) at 32x32
            self.blocks.append(nn.ModuleList([EqualConv2d(widths[resolution], widths[resolution], 3),
                                              EqualConv2d(widths[resolution], widths[resolution // 2], 3, down=True)]))
            resolution //= 2
        self.mbstd_group = mbstd_group
        self.conv = EqualConv2d(widths[4] + 1, widths[4], 3)  # (B, c4, 4, 4) after the stddev channel
        self.fc = EqualLinear(widths[4] * 16, widths[4])
        self.out = EqualLinear(widths[4], widths[4] if num_classes else 1)
        self.label_embedding = nn.Embedding(num_classes, widths[4]) if num_classes else None

    def forward(self, images, labels=None):  # (B, C, S, S), (B,) -> (B,)
        x = leaky_relu(self.from_rgb(images))
        for conv0, conv1 in self.blocks:
            x = leaky_relu(conv1(leaky_relu(conv0(x))))
        x = leaky_relu(self.conv(minibatch_stddev(x, self.mbstd_group)))
        x = self.out(leaky_relu(self.fc(x.flatten(1))))  # (B, 1), or (B, c4) for a conditional D
        if self.label_embedding is None:
            return x.squeeze(1)
        return (x * normalize_2nd_moment(self.label_embedding(labels))).sum(dim=1) / math.sqrt(x.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# The GAN itself: the logistic loss, lazy R1, path length, style mixing, the moving average, the alternating update

def discriminate(D, images, labels, augment=None):
    """The one door by which images, real or fake, reach D, in D's step and in G's (and R1's), and so through
    --augment's data.Augmentation when there is one (each call with fresh random draws; differentiable, so G learns
    through it and R1 is taken at the un-augmented reals)."""
    return D(augment(images) if augment else images, labels)


# StyleGAN2's logistic loss, softplus(-D(x)) + softplus(D(G(z))) for D and softplus(-D(G(z))) for G, is gan.py's
# binary cross-entropy on logits, to the formula:
# Copied from gan.d_loss
def d_loss(real_logits, fake_logits):
    """Binary cross-entropy: real images are labelled 1, generated ones 0 (non-saturating and minimax GANs)."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


# Copied from gan.g_loss
def g_loss(fake_logits):
    """Non-saturating loss -log D(G(z)): the strongest gradient when D rejects the fakes (see g_loss_minimax)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def r1_penalty(D, real, labels=None, augment=None):
    """R1 (Mescheder et al. 2018): E[||grad_x D(x)||^2] on real images, which keeps D from sharpening without bound
    around the data. create_graph: D's update follows the penalty's own gradient."""
    real = real.detach().requires_grad_(True)
    (grads,) = torch.autograd.grad(discriminate(D, real, labels, augment).float().sum(), real, create_graph=True)
    return grads.float().flatten(1).square().sum(1).mean()


def lazy_r1(D, real, labels, gamma, interval=R1_INTERVAL, augment=None):
    """The R1 term of D's loss on the steps that carry it (one in interval): gamma / 2 * E||grad D(x)||^2, times
    interval, so that on average it weighs what it would every step (sec. 3.1, lazy regularisation)."""
    return interval * gamma / 2 * r1_penalty(D, real, labels, augment)


def style_ws(G, z, labels, mixing_prob=0.0, track_average=False):
    """The per-layer ws that G is trained on. With probability mixing_prob the batch gets a second z: from a random
    cutoff layer on, its w takes over (style mixing regularisation, StyleGAN sec. 3.1), so that neighbouring layers
    cannot rely on sharing one style."""
    ws = broadcast(G.mapping(z, labels, track_average=track_average), G.num_ws)
    if mixing_prob > 0 and torch.rand([]).item() < mixing_prob:
        cutoff = int(torch.randint(1, G.num_ws, []))
        ws = mix_styles(ws, broadcast(G.mapping(torch.randn_like(z), labels), G.num_ws), cutoff)
    return ws


def path_length_penalty(G, z, labels, mixing_prob=0.0):
    """Path length regularisation (sec. 3.2): the length of J^T y, with J the Jacobian of the image by w and y a
    random image, should be the same for every w; its running mean a is G.pl_mean. Returns E[(|J^T y| - a)^2]."""
    ws = style_ws(G, z, labels, mixing_prob)
    images = G.synthesis(ws)
    noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
    (grads,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    lengths = grads.float().square().sum(2).mean(1).sqrt()  # (B,)
    G.pl_mean.copy_(G.pl_mean.lerp(lengths.detach().mean(), PL_DECAY))
    return (lengths - G.pl_mean).square().mean()


METRICS = ["d_loss", "g_loss", "d_real", "d_fake", "r1_penalty", "pl_penalty"]


def train_step(G, D, opt_g, opt_d, real, labels, latent_dim, scaler, step, r1_gamma, mixing_prob=0.0,
               pl_weight=0.0, augment=None):
    """One D update, then one G update against the D just improved; labels is None for unconditional models. Step
    (counted from 1 over the whole run) decides the lazy terms: R1 every R1_INTERVAL-th step, path length every
    PL_INTERVAL-th. Their metrics are the raw penalties times the interval, so an epoch's mean is their mean.
    augment: --augment's data.Augmentation or None; ADA's p moves by the sign of D's logits on the reals."""
    zero = torch.zeros([], device=real.device)
    z = torch.randn(len(real), latent_dim, device=real.device)
    with autocast(real.device, scaler):
        fake = G.synthesis(style_ws(G, z, labels, mixing_prob, track_average=True))
        # Discriminator: fake is detached so this loss does not reach into G.
        real_logits = discriminate(D, real, labels, augment)
        fake_logits = discriminate(D, fake.detach(), labels, augment)
        loss_d = d_loss(real_logits.float(), fake_logits.float())
        r1 = lazy_r1(D, real, labels, r1_gamma, augment=augment) if r1_gamma and step % R1_INTERVAL == 0 else zero
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d + r1).backward()
    average_gradients(D)
    scaler.step(opt_d)
    if augment:
        augment.observe(real_logits.detach().float())

    # Generator: the same fake batch, scored again by the updated D. D's weights are frozen meanwhile, so the
    # backward pass computes only what G needs (gradients flow through D to the image, not into D's weights).
    D.requires_grad_(False)
    with autocast(real.device, scaler):
        loss_g = g_loss(discriminate(D, fake, labels, augment).float())
        pl = zero
        if pl_weight and step % PL_INTERVAL == 0:  # on half the batch, as the official code (pl_batch_shrink 2)
            half = max(1, len(z) // 2)
            pl = PL_INTERVAL * pl_weight * path_length_penalty(G, z[:half], None if labels is None else labels[:half],
                                                               mixing_prob)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g + pl).backward()
    average_gradients(G)
    scaler.step(opt_g)
    scaler.update()
    D.requires_grad_(True)

    r1_raw = r1.detach() / (r1_gamma / 2) if r1_gamma else zero  # interval * E||grad D(x)||^2
    pl_raw = pl.detach() / pl_weight if pl_weight else zero  # interval * E(|J^T y| - a)^2
    # Returned as tensors on the device: reading them (.item()) would force a sync every step.
    return torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(real_logits.detach().float()).mean(),
                        torch.sigmoid(fake_logits.detach().float()).mean(), r1_raw, pl_raw])


@torch.no_grad()
def update_average(G_average, G, step, decay, ramp=0.05):
    """Exponential moving average of G's weights with a ramped half-life (StyleGAN2-ADA's training loop): decay is
    the per-step decay of the full half-life, log(0.5) / log(decay) steps, and until ramp * step exceeds that, the
    half-life is ramp * step instead (0.05 x the images seen so far), so early samples are not an average of noise.
    Buffers (w_avg, the fixed noise) are copied."""
    half_life = min(math.log(0.5) / math.log(decay), ramp * step) if decay > 0 else 0.0
    beta = 0.5 ** (1 / half_life) if half_life > 0 else 0.0
    for average, current in zip(G_average.parameters(), G.parameters()):
        average.lerp_(current, 1 - beta)
    for average, current in zip(G_average.buffers(), G.buffers()):
        average.copy_(current)


def make_optimizers(args, G, D):
    """Adam with betas (0, 0.99) (StyleGAN2's). Lazy regularisation compensated as in the official code: a network
    regularised every k steps gets lr * c and betas ** c with c = k / (k + 1), since it takes k + 1 steps' worth of
    gradient every k steps (here the terms ride on the main step; official code takes a separate one). G only when
    path length is on: without it G has no regularisation steps."""
    c_d = R1_INTERVAL / (R1_INTERVAL + 1) if args.r1_gamma else 1.0
    c_g = PL_INTERVAL / (PL_INTERVAL + 1) if args.pl_weight else 1.0
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr * c_g, betas=(0.0, 0.99 ** c_g), eps=1e-8)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr * c_d, betas=(0.0, 0.99 ** c_d), eps=1e-8)
    return opt_g, opt_d


# ----------------------------------------------------------------------------------------------------------------
# Training, sampling and the command line

def train(args, rank=0, world_size=1):
    device = torch.device(args.device)
    checkpoint, dataset, held_out = start_run(args, rank)
    torch.manual_seed(args.seed)
    G, D = build_models(args, dataset.image_shape, dataset.num_classes)  # the same initial weights in every process
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
    # --compile in place (the modules keep their names in the checkpoint). R1 and path length differentiate D and
    # G's synthesis twice, which torch.compile does not support: those stay eager while their penalty is on.
    if args.compile:
        if not args.pl_weight:
            G.synthesis.compile()
        if not args.r1_gamma:
            D.compile()
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    scaler.amp = args.amp

    history = data.read_metrics(os.path.join(args.out, "metrics.csv"), start_epoch) if rank == 0 else []
    batches = data.Batches(dataset, args.batch_size, device, seed=args.seed)
    num_classes = dataset.num_classes if args.conditional else 0
    # The grid: one row per class for a conditional model, the same noise down each column (one z, every class).
    columns = 10 if num_classes else 100
    grid_classes = torch.arange(num_classes, device=device).repeat_interleave(columns) if num_classes else None
    grid_noise = torch.randn(columns, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    grid_noise = grid_noise.repeat(max(num_classes, 1), 1).to(device)
    real_sets = {"d_acc_real_train": (batches.images, batches.labels),  # D's accuracy on up to 1,000 of each
                 "d_acc_real_test": (held_out.images.to(device), held_out.labels.to(device)) if held_out else None}
    if rank == 0:
        widths = "/".join(map(str, channels_at(args.image_size, args.width, args.channel_base).values()))
        print(f"{len(dataset.images)} images {dataset.image_shape} from {dataset.source}, {len(batches)} steps per "
              f"epoch, device {device}" + (f" x {world_size} processes" if world_size > 1 else "") +
              f", channels {widths} at 4..{args.image_size} px, epochs {start_epoch + 1}..{args.epochs}")

    for epoch in range(start_epoch + 1, args.epochs + 1):
        if rank > 0:  # every process draws its own noise, from a stream fixed by (seed, rank, epoch) for --resume
            torch.manual_seed(hash((args.seed, rank, epoch)))
        started, seen = time.time(), 0
        totals = torch.zeros(len(METRICS), device=device)
        for i, (real, labels) in enumerate(batches.epoch(epoch), 1):
            seen += len(real)
            step = (epoch - 1) * len(batches) + i
            if world_size > 1:  # this process's share: disjoint slices of the same global batch
                real, labels = real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank]
            if device.type == "cuda":
                real = real.contiguous(memory_format=torch.channels_last)
            totals += train_step(G, D, opt_g, opt_d, real, labels if num_classes else None, args.latent_dim, scaler,
                                 step, args.r1_gamma, args.style_mixing, args.pl_weight, augmentation)
            update_average(G_average, G, step, args.average_decay)
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
                    print(f"epoch {epoch}/{args.epochs} step {i}/{len(batches)} | d_loss {means[0]:.3f} "
                          f"g_loss {means[1]:.3f} | D(x) {means[2]:.2f} D(G(z)) {means[3]:.2f} | R1 {means[4]:.3g} "
                          f"| {seen / elapsed:.0f} img/s | {steps_left * elapsed / i / 60:.1f} min left ",
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
              f"{accuracy['d_acc_real_test'] or '-'} of held-out ones; calls fake {accuracy['d_acc_fake']} of fakes")
        history.append({"epoch": epoch, **{k: f"{v:.5f}" for k, v in zip(METRICS, means)}, **accuracy,
                        "seconds": f"{seconds:.2f}", "img_per_s": f"{seen / seconds:.1f}",
                        "augment_p": data.augment_p(augmentation)})
        with torch.no_grad():
            grid = G_average.eval()(grid_noise, grid_classes, noise_mode="const")
            pictures = (style_grids(G_average, args.latent_dim, num_classes, device, args.seed)
                        if epoch == args.epochs else [])
        curves = ("d_loss", "g_loss") + (("augment_p",) if args.augment == "ada" else ())
        data.save_epoch(args.out, epoch, history, curves, grid, {
            "script": SCRIPT, **{key: part.state_dict() for key, part in parts.items()}, "epoch": epoch,
            "args": vars(args), "image_shape": list(dataset.image_shape), "classes": dataset.classes,
            **data.random_states(device)}, pictures)

    if args.fid and rank == 0:
        labels = torch.arange(args.fid) % dataset.num_classes  # every class equally often, like the grid
        data.report_fid(lambda: generate_images(G_average, labels, args.latent_dim, device, seed=args.seed + 1),
                        dataset, device)


@torch.no_grad()
def d_accuracy(D, G, real_sets, latent_dim, num_classes, n=1000):
    """How often D is right, in eval mode: the share of each set of real images it calls real (logit > 0), and of n
    fresh fakes from the raw generator (not its average, which D never saw) that it calls fake. A training share
    that pulls away from the held-out share means D is memorising the training images (Karras et al. 2020).
    real_sets: name -> (uint8 images, labels) on the device, or None where there is no such set."""
    D.eval(), G.eval()
    device = next(D.parameters()).device
    accuracy = {}
    for name, images_and_labels in real_sets.items():
        if images_and_labels is None:
            accuracy[name] = ""  # a folder has no held-out split
            continue
        images, labels = images_and_labels
        logits = torch.cat([discriminate(D, data.to_float(chunk), classes if num_classes else None)
                            for chunk, classes in zip(images[:n].split(250), labels[:n].split(250))])
        accuracy[name] = f"{(logits > 0).float().mean().item():.4f}"
    fake_logits = []
    for chunk in torch.randint(max(num_classes, 1), (n,), device=device).split(250):
        classes = chunk if num_classes else None
        fake_logits.append(discriminate(D, G(torch.randn(len(chunk), latent_dim, device=device), classes), classes))
    accuracy["d_acc_fake"] = f"{(torch.cat(fake_logits) <= 0).float().mean().item():.4f}"
    D.train(), G.train()
    return accuracy


def build_models(args, image_shape, num_classes):
    channels, image_size = image_shape[0], image_shape[-1]
    num_classes = num_classes if args.conditional else 0
    G = Generator(args.latent_dim, args.w_dim, image_size, channels, args.width, args.channel_base,
                  args.mapping_layers, num_classes)
    D = Discriminator(image_size, channels, args.width, args.channel_base, args.mbstd_group, num_classes)
    return G, D  # every layer initialises itself: N(0, 1) weights under equalised learning rate


@torch.no_grad()
def generate_images(G, labels, latent_dim, device, seed, psi=1.0, batch_size=500):
    """len(labels) images as uint8 [n, C, H, W], made in batches by G with truncation psi and each layer's fixed
    noise (the official generate.py's default). labels: int64 [n] on the CPU; only conditional models read it."""
    G.eval()
    noise = torch.Generator().manual_seed(seed)
    conditional = G.mapping.label_embedding is not None
    images = [data.to_uint8(G(torch.randn(len(chunk), latent_dim, generator=noise).to(device),
                              chunk.to(device) if conditional else None, psi, noise_mode="const")).cpu()
              for chunk in labels.split(batch_size)]
    return torch.cat(images)


@torch.no_grad()
def style_mixing_grid(G, latent_dim, num_classes, device, seed, columns=9, rows=6, cutoff=MIX_GRID_CUTOFF):
    """The paper's Figure 3, 10 images a row: the top row holds `columns` "coarse" sources (after an empty corner),
    the left column `rows` "fine" sources. Each cell takes the coarse layers' w (ws[:cutoff], at 32x32 the 4x4
    and 8x8 layers: overall shape) from its column's source and the fine ones (ws[cutoff:], 16x16 and up: texture,
    stroke, shading) from its row's source. A conditional model draws each source's class in turn."""
    noise = torch.Generator().manual_seed(seed)
    z = torch.randn(columns + rows, latent_dim, generator=noise).to(device)
    labels = torch.arange(columns + rows, device=device) % num_classes if num_classes else None
    ws = broadcast(G.mapping(z, labels), G.num_ws)
    coarse, fine = ws[:columns], ws[columns:]
    cells = mix_styles(coarse[None].expand(rows, -1, -1, -1), fine[:, None].expand(-1, columns, -1, -1), cutoff)
    sources = G.synthesis(ws, noise_mode="const")
    mixed = G.synthesis(cells.flatten(0, 1), noise_mode="const").unflatten(0, (rows, columns))
    corner = torch.zeros_like(sources[:1])  # mid grey
    top = torch.cat([corner, sources[:columns]])
    body = torch.cat([sources[columns:, None], mixed], dim=1).flatten(0, 1)
    return torch.cat([top, body])  # (10 * (rows + 1), C, S, S)


@torch.no_grad()
def truncation_grid(G, latent_dim, num_classes, device, seed, rows=6, columns=10):
    """One z a row, psi from 1 (left) down to 0 (right) across the columns: at 0 every row is the mean image."""
    noise = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(rows, latent_dim, generator=noise).to(device)
    labels = torch.arange(rows, device=device) % num_classes if num_classes else None
    images = [G(z, labels, psi, noise_mode="const") for psi in torch.linspace(1, 0, columns).tolist()]
    return torch.stack(images, dim=1).flatten(0, 1)  # (rows * columns, C, S, S), row by row


def style_grids(G, latent_dim, num_classes, device, seed):
    """(file name, images) of the two grids written at the end of training and with --generate."""
    G.eval()
    return [("style_mixing.png", style_mixing_grid(G, latent_dim, num_classes, device, seed)),
            ("truncation.png", truncation_grid(G, latent_dim, num_classes, device, seed))]


def generate(args):
    checkpoint = load_checkpoint(args.out)
    saved = argparse.Namespace(**checkpoint["args"])
    classes = checkpoint["classes"]
    G, _ = build_models(saved, checkpoint["image_shape"], len(classes))
    data.restore(G, checkpoint["generator_average"], checkpoint, "generator")
    if args.label is not None and not (saved.conditional and 0 <= args.label < len(classes)):
        raise UsageError(f"--label {args.label}: the model is " + (
            f"conditional on classes 0..{len(classes) - 1}" if saved.conditional else "not conditional"))
    labels = torch.full((args.generate,), args.label) if args.label is not None else torch.arange(args.generate)
    labels = labels % len(classes)  # without --label: classes in turn
    G = G.to(args.device)
    data.save_samples(args.out, generate_images(G, labels, saved.latent_dim, args.device, seed=args.seed,
                                                psi=args.truncation), labels if saved.conditional else None)
    num_classes = len(classes) if saved.conditional else 0
    for name, images in style_grids(G, saved.latent_dim, num_classes, args.device, args.seed):
        try:
            data.save_grid(images, os.path.join(args.out, name), nrow=10)
        except OSError as e:
            raise data.DataError(f"cannot write {name} into {args.out} ({e.strerror or e})") from None
    print(f"wrote style_mixing.png and truncation.png into {args.out}")


def default_size(args):
    """32x32 for the 28x28 named datasets (a power of two keeps the up/down-sampling exact), 64 for a folder."""
    return 32 if args.dataset in data.DATASETS else 64


MODEL_SETTINGS = ("image_size", "width", "channel_base", "w_dim", "latent_dim", "mapping_layers", "conditional")
# What --resume keeps; the preset first, so that resuming a run with another preset names it (not a flag it changed).
RESUME_SETTINGS = ("preset", *MODEL_SETTINGS, "batch_size", "lr", "seed", "average_decay", "r1_gamma",
                   "style_mixing", "pl_weight", "mbstd_group", "train_images", "augment", "augment_policy",
                   "ada_target")
POWER_OF_TWO = (lambda value: value >= 32 and not value & (value - 1), "must be a power of two, at least 32")
PROBABILITY = (lambda value: 0 <= value <= 1, "must be in [0, 1]")
# The cpu defaults: sized by timing on two CPU cores (docs/stylegan.md); one epoch of Fashion-MNIST took 327 s there.
EPOCHS, WIDTH, CHANNEL_BASE, R1_GAMMA = 3, 64, 512, 0.1

# --preset: "cpu" is the defaults below, sized to train on two CPU cores in minutes. "paper" is StyleGAN2-ADA's
# `cifar` configuration (train.py's cfg_specs['cifar'] and the paper's appendix), for a GPU; what it keeps from the
# defaults is the paper's too: Adam (0, 0.99), lazy R1 every 16 steps, the 'orig' D, the EMA ramp 0.05.
PRESETS = {
    "cpu": {},
    "paper": {
        "image_size": 32,  # CIFAR-10's 32x32
        "width": 512,  # fmaps 1 -> channel_max 512: 512 channels at every resolution 4..32 px
        "channel_base": 16384,  # channel_base 16384 (min(16384 / 32, 512) = 512)
        "latent_dim": 512,  # z_dim 512
        "w_dim": 512,  # w_dim 512
        "mapping_layers": 2,  # map 2 (1024 px configurations use 8)
        "batch_size": 64,  # mb 64
        "mbstd_group": 32,  # mbstd 32
        "lr": 0.0025,  # lrate 0.0025 for G and D
        "r1_gamma": 0.01,  # gamma 0.01
        "average_decay": 0.5 ** (64 / 500_000),  # ema 500 kimg: a half-life of 500,000 images at batch 64
        "style_mixing": 0.0,  # style_mixing 0
        "pl_weight": 0.0,  # pl_weight 0
    },
}


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help=(
        "cpu (default): the defaults below, a grid in minutes on a CPU; paper: StyleGAN2-ADA's cifar settings, "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["paper"].items())
        + "; flags given with a preset win over it"))
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder of images (default mnist)")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"total passes over the training set (default {EPOCHS})")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, over all processes (default 64)")
    p.add_argument("--lr", type=float, default=0.0025, help="Adam learning rate of G and D (default 0.0025, the "
                                                            "paper's; equalised learning rate makes it this large)")
    p.add_argument("--latent-dim", type=int, default=128, help="size of the noise vector z (default 128)")
    p.add_argument("--w-dim", type=int, default=128, help="size of w, the mapping network's output (default 128)")
    p.add_argument("--mapping-layers", type=int, default=2, help="layers of the mapping network (default 2)")
    p.add_argument("--image-size", type=int, help="side of the square images, a power of two >= 32 "
                                                  "(default 32 for mnist/fashion-mnist, 64 for a folder)")
    p.add_argument("--width", type=int, default=WIDTH, help=f"the most channels of any layer, G's and D's (default "
                                                            f"{WIDTH}; the paper's channel_max)")
    p.add_argument("--channel-base", type=int, default=CHANNEL_BASE, help=(
        f"channels at resolution r: min(channel_base / r, width) (default {CHANNEL_BASE}: "
        + "/".join(map(str, channels_at(32, WIDTH, CHANNEL_BASE).values())) + " at 4/8/16/32 px)"))
    p.add_argument("--conditional", action="store_true", help="condition G (class embedding into the mapping "
                                                              "network) and D (projection) on the class label")
    p.add_argument("--r1-gamma", type=float, default=R1_GAMMA, help=(
        f"weight gamma of the R1 penalty gamma/2 * E||grad D(x)||^2 on reals, applied every {R1_INTERVAL} steps "
        f"(default {R1_GAMMA}; 0: off)"))
    p.add_argument("--style-mixing", type=float, default=0.0, help="probability that a training batch mixes the "
                                                                   "styles of two z (default 0, as cifar; 0.9 in the "
                                                                   "1024 px configurations)")
    p.add_argument("--pl-weight", type=float, default=0.0, help=f"weight of path length regularisation, every "
                                                                f"{PL_INTERVAL} steps (default 0, as cifar; 2 at "
                                                                f"1024 px)")
    p.add_argument("--mbstd-group", type=int, default=4, help="group size of D's minibatch standard deviation "
                                                              "(default 4)")
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI", help=(
        "with --generate: w = w_avg + PSI (w - w_avg), PSI in [0, 1]; 0 gives the mean image for every z "
        "(default 1: no truncation)"))
    p.add_argument("--average-decay", type=float, default=0.999, help=(
        "per-step decay of the moving average of G that samples are drawn from, i.e. a half-life of "
        "log(0.5)/log(decay) steps, ramped up as 0.05 x the steps so far (default 0.999: 693 steps)"))
    add_augment_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=os.path.join("runs", "stylegan"), help="the run's folder (default runs/stylegan)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--generate", type=int, metavar="N", help="no training: write N images to OUT/samples.npz")
    p.add_argument("--label", type=int, metavar="K", help="with --generate on a conditional model: only class K")
    p.add_argument("--fid", type=int, metavar="N", help="after training, FID of N generated vs the real images")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--amp", action="store_true", help="mixed precision: float16 + loss scaling on CUDA, bfloat16 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile G's synthesis and D where no penalty "
                                                          "differentiates them twice (pays off on GPUs)")
    p.set_defaults(sync_bn=False)  # no BatchNorm anywhere, so no --sync-bn (check_args reads it)
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])  # the preset's values, under the flags given
    args = p.parse_args(argv)
    check_args(args, {"epochs": at_least(1), "batch_size": at_least(1), "latent_dim": at_least(1),
                      "w_dim": at_least(1), "mapping_layers": at_least(1), "width": at_least(1),
                      "channel_base": at_least(1), "mbstd_group": at_least(1), "log_every": at_least(1),
                      "generate": at_least(1), "fid": at_least(2), "seed": SEED, "lr": POSITIVE,
                      "r1_gamma": NON_NEGATIVE, "pl_weight": NON_NEGATIVE, "style_mixing": PROBABILITY,
                      "truncation": PROBABILITY, "average_decay": DECAY, "image_size": POWER_OF_TWO,
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
