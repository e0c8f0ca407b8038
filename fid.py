"""Fréchet Inception Distance that gives pytorch-fid's number, in plain torch (no torchvision, no scipy), with KID,
precision/recall and clean-fid's resize on the same features.

FID compares the mean and covariance of Inception-v3 features of two image sets (Heusel et al. 2017, arXiv:1706.08500).
Every step that moves the number follows pytorch-fid 0.3.0: the TF-ported Inception with its FID-specific pooling,
the same weights file, bilinear resize to 299x299, inputs scaled to [-1, 1], float64 statistics, unbiased covariance.
KID (Bińkowski et al. 2018) and precision/recall (Kynkäänniemi et al. 2019) follow torch-fidelity 0.4.0, and
--resize clean follows clean-fid 0.1.35 (Parmar et al. 2022). A is the generated set, B the reference (real) set.

    python fid.py --save-stats mnist mnist.npz --num-samples 10000   # once, ~7 min on 2 CPU cores; pytorch-fid's format
    python fid.py runs/dcgan/samples.npz mnist.npz                   # samples from --generate vs MNIST
    python fid.py fake_images/ real_images/ --kid --prc              # two folders; FID, KID, precision and recall
    python fid.py --save-stats mnist mnist_feat.npz --kid            # the features too, for KID/precision/recall later

    import fid
    mu, sigma = fid.compute_statistics(images)       # uint8 [N, C, H, W], or generator output in [-1, 1]
    score = fid.frechet_distance(mu, sigma, mu_real, sigma_real)
    fake, real = fid.compute_features(images), fid.compute_features(real_images)   # [N, 2048] float32
    kid_mean, kid_std = fid.kernel_inception_distance(fake, real)
    precision, recall = fid.precision_recall(real, fake)
"""
import argparse
import collections.abc
import contextlib
import hashlib
import http.client
import os
import re
import sys
import tempfile
import urllib.parse
import urllib.request
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# pytorch-fid's published port of TF's inception-2015-12-05 graph; "6726825d" is the start of the file's sha256.
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
DIMS = (64, 192, 768, 2048)  # feature blocks: after the first max pool, the second max pool, Mixed_6e, Mixed_7c
# pytorch-fid's extensions; we also accept them in upper case (pytorch-fid's glob misses *.PNG on Linux).
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
DATASET_NAMES = ("mnist", "fashion-mnist")
FEATURE_LAYERS = {64: "first max pool", 192: "second max pool", 768: "Mixed_6e", 2048: "pool3"}
# How images reach 299x299 moves the number (clean-fid: one StyleGAN2 on CIFAR-10 scores 11.07 legacy, 12.96 clean).
RESIZE_MODES = ("legacy", "clean")  # pytorch-fid's bilinear in torch (the default), clean-fid's PIL bicubic on floats
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's defaults
PRC_K = 3  # Kynkäänniemi et al.'s and torch-fidelity's neighbourhood size


class FIDError(Exception):
    """Bad input: missing or unreadable file, wrong keys or shapes, too few images. The message is one line."""


# ----------------------------------------------------------------------------------------------------------------
# The network: torchvision's Inception3 as pytorch-fid patches it for the TF graph, with the same parameter names so
# pytorch-fid's weight file loads as is. Only the layers up to the requested feature block run.

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (TF's eps 0.001) -> ReLU. fold_batchnorm() moves the BatchNorm into the conv."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)

    @torch.no_grad()
    def fold_batchnorm(self):
        # In eval mode BN is y = (x - mean) * gamma / sqrt(var + eps) + beta: a per-channel affine map that can live
        # in the conv's weight and bias. Computed in float64 so the folded float32 weights are correctly rounded.
        bn = self.bn
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        self.conv.weight.copy_(self.conv.weight.double() * scale[:, None, None, None])
        self.conv.bias = nn.Parameter((bn.bias.double() - bn.running_mean.double() * scale).float())
        self.bn = nn.Identity()


def avg_pool_3x3(x):
    # TF averages only over the in-image part of the window at the borders (count_include_pad=False).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7 convolutions
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                          self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)),
                          self.branch7x7x3_4(self.branch7x7x3_3(b7)),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b/7c, 8x8, expanded filter banks
    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(self.pool(x))], 1)


def max_pool_3x3(x):
    # Mixed_7c's pool branch: the TF graph uses a max pool here (pytorch-fid keeps it, "likely an error" upstream).
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInception(nn.Module):
    """pytorch-fid's FID Inception-v3. Random init here; see load_inception for the published weights."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool=avg_pool_3x3)
        self.Mixed_7c = InceptionE(2048, pool=max_pool_3x3)
        self.fc = nn.Linear(2048, 1008)  # unused by FID; present so the weight file loads strictly
        self.channels_last = False  # set by prepare_for_inference

    def forward(self, x, dims=2048):
        """Features [B, dims] of images x: float [B, C, H, W] in [0, 1], C 1 or 3, any size."""
        if x.shape[-2:] != (299, 299):
            x = resize_299(x)
        x = 2 * x - 1  # pytorch-fid's normalize_input, after the resize
        x = x.expand(-1, 3, -1, -1)  # grayscale: 3 identical channels, as PIL's convert("RGB") gives
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        if dims == 64:
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        if dims == 192:
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        if dims == 768:
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def load_pytorch_fid_state_dict(self, state, source="state dict"):
        """Strict load of pytorch-fid's layout, with or without BatchNorm's num_batches_tracked entries."""
        expected = self.state_dict()
        optional = {name for name in expected if name.endswith("num_batches_tracked")}
        missing = [name for name in expected if name not in state and name not in optional]
        unexpected = [name for name in state if name not in expected]
        wrong_shape = [name for name in expected if name in state
                       and tuple(getattr(state[name], "shape", ())) != tuple(expected[name].shape)]
        if missing or unexpected or wrong_shape:
            raise FIDError(f"{source} is not pytorch-fid's Inception: {len(missing)} missing {missing[:2]}, "
                           f"{len(unexpected)} unexpected {unexpected[:2]}, {len(wrong_shape)} of another shape "
                           f"{wrong_shape[:2]}")
        self.load_state_dict(state, strict=False)

    def prepare_for_inference(self):
        """Fold each BatchNorm into its conv and go channels-last (NHWC, oneDNN's native layout): ~2.5x faster on a
        CPU, same features to ~1e-6 relative. Call after loading weights: the folded model has another layout."""
        with one_thread():
            for module in self.modules():
                if isinstance(module, BasicConv2d) and isinstance(module.bn, nn.BatchNorm2d):
                    module.fold_batchnorm()
        self.channels_last = True
        return self.to(memory_format=torch.channels_last).eval()


def resize_299(x):
    # pytorch-fid: bilinear, align_corners=False, no antialiasing (which would change small-image features)
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


def clean_resize(images):
    """clean-fid's "clean" resize of uint8 [B, C, H, W]: float32 [B, C, 299, 299] in 0..255.

    Each channel becomes a float32 ('F' mode) PIL image, is resized with PIL's bicubic (antialiased when shrinking;
    a = -0.5 where torch's bicubic has -0.75), clipped to 0..255 and not rounded back to uint8: what clean-fid 0.1.35's
    make_resizer("PIL", quantize_after=False, "bicubic", (299, 299)) does. Grayscale stays one channel here; the
    network repeats it, which equals clean-fid's convert("RGB") first.
    """
    array = torch.as_tensor(images).cpu().numpy()
    out = np.empty((*array.shape[:2], 299, 299), np.float32)
    for i, image in enumerate(array):
        for c, channel in enumerate(image):
            resized = Image.fromarray(channel.astype(np.float32)).resize((299, 299), resample=Image.BICUBIC)
            out[i, c] = np.asarray(resized).clip(0, 255)
    return torch.from_numpy(out)


def check_resize(resize):
    if resize not in RESIZE_MODES:
        raise FIDError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")


# ----------------------------------------------------------------------------------------------------------------
# Weights

def default_cache_dir():
    """Where torch.hub keeps downloaded weights (and where pytorch-fid's own copy would be)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def download_weights(url=WEIGHTS_URL, cache_dir=None, timeout=60):
    """Path of the weights file in cache_dir, downloaded once and checked against the sha256 prefix in its name."""
    cache_dir = cache_dir or default_cache_dir()
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    target = os.path.join(cache_dir, filename)
    if os.path.isfile(target):
        return target
    offline = f"offline, copy {filename} into {cache_dir} or pass --weights FILE"
    expected = re.search(r"-([0-9a-f]{6,})\.", filename)  # torch.hub's name-<sha256 prefix>.ext convention
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=filename + ".", suffix=".part")
        sha256 = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            print(f"downloading {url} into {cache_dir}", file=sys.stderr)
            while chunk := response.read(1 << 20):
                sha256.update(chunk)
                out.write(chunk)
        if expected and not sha256.hexdigest().startswith(expected.group(1)):
            raise FIDError(f"{url} has sha256 {sha256.hexdigest()[:16]}..., not {expected.group(1)}...; {offline}")
        os.replace(tmp, target)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts; IncompleteRead
        raise FIDError(f"could not download {url} ({one_line(e)}); {offline}") from None
    finally:
        if tmp and os.path.exists(tmp):  # a failed, partial or refused download leaves nothing behind
            os.remove(tmp)
    return target


@contextlib.contextmanager
def one_thread():
    # Loading and folding 94 convs is many tiny steps: threads cost more than they give, and on a shared CPU a
    # descheduled thread stalls the others (on a loaded 2-core machine folding took 2.9 s on 2 threads, 0.03 s on 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def load_inception(weights=None, device=None, url=WEIGHTS_URL, cache_dir=None):
    """The FID Inception, ready for inference: BatchNorm folded, channels-last, eval mode, on device.

    weights: None (pytorch-fid's file from the torch hub cache, downloaded once), a file path, or a state dict.
    """
    if weights is None:
        weights = download_weights(url, cache_dir)
    if isinstance(weights, collections.abc.Mapping):
        state, source = weights, "state dict"
    else:
        try:
            state, source = torch.load(weights, map_location="cpu", weights_only=True), weights
        except Exception as e:  # torch.load raises many types for missing, truncated or foreign files
            raise FIDError(f"cannot read Inception weights {weights} ({one_line(e)})") from None
        if not isinstance(state, collections.abc.Mapping):
            raise FIDError(f"{weights} is not a state dict")
    with one_thread():
        model = FIDInception()
        model.load_pytorch_fid_state_dict(state, source)
    return to_device(model.prepare_for_inference(), device)


def to_device(model, device=None):
    """model on device (default: CUDA when available, else CPU), with a one-line error for a bad device."""
    try:
        return model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    except (RuntimeError, TypeError, AssertionError) as e:  # AssertionError: "Torch not compiled with CUDA"
        raise FIDError(f"cannot use device {device!r} ({one_line(e)})") from None


# ----------------------------------------------------------------------------------------------------------------
# Features and statistics

@contextlib.contextmanager
def no_tf32(device):
    """Full float32 convolutions on CUDA: TF32 (on by default for cuDNN on Ampere+) perturbs the features."""
    # torch >= 2.9 has a per-operator setting, and mixing it with the old allow_tf32 flag is an error: use one.
    conv = getattr(torch.backends.cudnn, "conv", None)
    owner, flag, off = ((conv, "fp32_precision", "ieee") if hasattr(conv, "fp32_precision")
                        else (torch.backends.cudnn, "allow_tf32", False))
    saved = getattr(owner, flag)
    if device.type == "cuda":
        setattr(owner, flag, off)
    try:
        yield
    finally:
        setattr(owner, flag, saved)


def to_uint8(images):
    """Generator output in [-1, 1] -> uint8, rounded exactly as saving it as a PNG would (x*255 + 0.5, truncated)."""
    return (((images.detach().float() + 1) / 2) * 255 + 0.5).clamp_(0, 255).to(torch.uint8)


def batch_features(model, batch, dims=2048, resize="legacy"):
    """Features [B, dims] (float32, CPU) of a uint8 batch [B, C, H, W], or of a list of [1, C, H, W] of mixed sizes."""
    model.eval()  # here, not by the caller: BatchNorm in train mode changes FID by 10x (pytorch-fid #118)
    device = next(model.parameters()).device
    with torch.inference_mode(), no_tf32(device):
        if resize == "clean":  # PIL on the CPU, before the network; it then sees 299x299 and resizes nothing
            images = batch if isinstance(batch, list) else [batch]
            x = torch.cat([clean_resize(image) for image in images]).to(device) / 255
        elif isinstance(batch, list):  # each image resized on its own, which is what a batch of 1 would do
            x = torch.cat([resize_299(image.to(device).float() / 255) for image in batch])
        else:
            x = batch.to(device).float() / 255  # like torchvision's ToTensor: a division, not * (1/255)
        return model(x, dims).float().cpu()


def inception_features(model, images, dims=2048, batch_size=50, resize="legacy"):
    """Features [N, dims] (float32) of images: uint8 [N, C, H, W] (C 1 or 3), floats in [-1, 1], or image files."""
    batches = folder_batches if isinstance(images, list) else image_batches
    return torch.cat([batch_features(model, batch, dims, resize) for batch in batches(images, batch_size)])


def image_batches(images, batch_size):
    """uint8 batches of a tensor or array, quantising float images batch by batch on their own device."""
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(images[start:start + batch_size])
        yield batch if batch.dtype == torch.uint8 else to_uint8(batch)


def check_request(images, dims, batch_size, source="images", resize="legacy"):
    """One-line errors for bad arguments, before any weights are loaded."""
    if dims not in DIMS:
        raise FIDError(f"dims must be one of {DIMS}, got {dims}")
    if batch_size < 1:
        raise FIDError(f"batch size must be positive, got {batch_size}")
    check_resize(resize)
    if isinstance(images, list):  # image files, checked as they are read
        return
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        raise FIDError(f"{source}: expected a tensor or array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FIDError(f"{source}: expected shape [N, C, H, W] with C 1 or 3, got {list(images.shape)}")
    first = torch.as_tensor(images[:1])
    if first.dtype != torch.uint8 and not first.is_floating_point():
        raise FIDError(f"{source}: expected uint8 (0..255) or float (-1..1) images, got {first.dtype}")
    if len(images) < 2:
        raise FIDError(f"{source}: need at least 2 images for a covariance, got {len(images)}")


def statistics_from_batches(model, batches, dims, resize="legacy"):
    """mu and the unbiased covariance of the features, streamed: memory is O(dims^2), not O(N * dims)."""
    return streamed_statistics((batch_features(model, batch, dims, resize) for batch in batches), dims)


def statistics_of_features(features, batch_size=50):
    """(mu, sigma) of features [N, dims], taken batch by batch as from images: the same numbers as the streamed route
    for the same batch size, so adding KID or precision/recall to a run does not move its FID."""
    features = torch.as_tensor(features)
    return streamed_statistics(features.split(batch_size), features.shape[1])


def streamed_statistics(feature_batches, dims):
    count, mean, scatter = 0, torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64)
    for features in feature_batches:
        features = features.double()
        # Chan et al.'s pairwise update: per-batch mean and scatter merged without the cancellation of sum(x x^T).
        batch_mean = features.mean(0)
        centred = features - batch_mean
        delta, total = batch_mean - mean, count + len(features)
        scatter += centred.T @ centred + torch.outer(delta, delta) * (count * len(features) / total)
        mean += delta * (len(features) / total)
        count = total
    if count < dims:
        warnings.warn(f"{count} images give a singular {dims}x{dims} covariance: FID is biased upwards and not "
                      f"comparable to published figures (use at least {dims}, better 10000+)")
    return mean.numpy(), (scatter / (count - 1)).numpy()  # N-1, as np.cov


def as_model(weights, device):
    if isinstance(weights, FIDInception):
        return weights if device is None else to_device(weights, device)
    return load_inception(weights, device)


def compute_statistics(images, dims=2048, batch_size=50, device=None, weights=None, resize="legacy"):
    """(mu [dims], sigma [dims, dims]), float64 numpy, of uint8 images [N, C, H, W] (C 1 or 3) or floats in [-1, 1].

    weights: None (pytorch-fid's file, downloaded once), a file path, a state dict, or a loaded FIDInception.
    resize: "legacy" (pytorch-fid's bilinear, the default) or "clean" (clean-fid's PIL bicubic on floats).
    """
    check_request(images, dims, batch_size, resize=resize)
    return images_statistics(images, as_model(weights, device), dims, batch_size, resize)


def compute_features(images, dims=2048, batch_size=50, device=None, weights=None, resize="legacy"):
    """Features [N, dims] (float32, CPU) of images as compute_statistics takes them: what KID and precision/recall
    need (statistics_of_features gives their mu and sigma)."""
    check_request(images, dims, batch_size, resize=resize)
    return inception_features(as_model(weights, device), images, dims, batch_size, resize)


def extractor_name(weights, resize="legacy"):
    """What made a set of features: the network, its weights and the resize. Recorded with cached statistics."""
    in_memory = isinstance(weights, (FIDInception, collections.abc.Mapping))
    weights_name = "in-memory weights" if in_memory else os.path.basename(weights or WEIGHTS_URL)
    resized = "bilinear 299x299" if resize == "legacy" else "clean-fid PIL bicubic 299x299 float"
    return f"pytorch-fid Inception-v3 ({weights_name}), {resized}, uint8 input"


def cached_statistics(cache_file, images_fn, dims=2048, batch_size=50, device=None, weights=None, resize="legacy",
                      num_images=None, reference=None):
    """compute_statistics(images_fn()), kept in cache_file (.npz) and reused while the protocol matches: dims,
    extractor and resize always, and the image count and reference name when given (a changed N or reference set
    is recomputed, never mixed up)."""
    mu, sigma, _ = cached(cache_file, images_fn, dims, batch_size, device, weights, resize, num_images, reference,
                          with_features=False)
    return mu, sigma


def cached_features(cache_file, images_fn, dims=2048, batch_size=50, device=None, weights=None, resize="legacy",
                    num_images=None, reference=None):
    """compute_features(images_fn()) as float32 [N, dims], cached like cached_statistics (same file, which then also
    serves cached_statistics and pytorch-fid): for KID and precision/recall against a fixed reference set."""
    return torch.from_numpy(cached(cache_file, images_fn, dims, batch_size, device, weights, resize, num_images,
                                   reference, with_features=True)[2])


def cached(cache_file, images_fn, dims, batch_size, device, weights, resize, num_images, reference, with_features):
    # Statistics from other networks, weights, resizing or image sets do not mix (pytorch-fid #33): the cache says.
    check_resize(resize)
    extractor = extractor_name(weights, resize)
    try:
        with np.load(cache_file, allow_pickle=False) as saved:
            saved_reference = str(saved["reference"]) if "reference" in saved else None
            protocol_matches = (int(saved["dims"]) == dims and str(saved["extractor"]) == extractor
                                and str(saved["resize"] if "resize" in saved else "legacy") == resize
                                and (num_images is None or int(saved["num_images"]) == num_images)
                                and (reference is None or saved_reference == reference))
            if protocol_matches and (not with_features or "features" in saved):
                features = saved["features"].astype(np.float32) if with_features else None
                return saved["mu"].astype(np.float64), saved["sigma"].astype(np.float64), features
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # absent, foreign or damaged: recompute
        pass
    images = images_fn()
    if num_images is not None and len(images) != num_images:
        raise FIDError(f"{cache_file}: {len(images)} images given, {num_images} expected")
    check_request(images, dims, batch_size, resize=resize)
    model = as_model(weights, device)
    info = dict(dims=dims, extractor=extractor, resize=resize, num_images=len(images))
    if reference is not None:
        info["reference"] = reference
    if with_features:
        info["features"] = inception_features(model, images, dims, batch_size, resize).numpy()
        mu, sigma = statistics_of_features(info["features"], batch_size)
    else:
        mu, sigma = images_statistics(images, model, dims, batch_size, resize)
    save_statistics(cache_file, mu, sigma, **info)
    return mu, sigma, info.get("features")


def save_statistics(path, mu, sigma, **info):
    """pytorch-fid's .npz (mu, sigma) plus info keys it ignores; written atomically so readers never see half a file."""
    folder, tmp = os.path.dirname(os.path.abspath(path)), None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            np.savez_compressed(out, mu=mu, sigma=sigma, **info)
        os.replace(tmp, path)
    except OSError as e:
        raise FIDError(f"cannot write {path} ({one_line(e)})") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)), in float64 torch; numpy arrays or tensors in.

    Tr(sqrtm(S1 S2)) is the sum of the square roots of the eigenvalues of S1 S2. With S1 = L L^T, S1 S2 is similar
    to the symmetric L^T S2 L, so a factorisation and one symmetric eigenvalue problem replace scipy's general sqrtm
    (pytorch-fid's route): >10x faster at 2048 dims, and singular covariances give clamped zeros, not NaN or
    "imaginary component" errors.
    """
    mu1, mu2 = (torch.atleast_1d(torch.as_tensor(m).detach().cpu().double()) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.atleast_2d(torch.as_tensor(s).detach().cpu().double()) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f"statistics of mismatched dimensions: mu {list(mu1.shape)} and {list(mu2.shape)}, sigma "
                       f"{list(sigma1.shape)} and {list(sigma2.shape)} (compute both with the same --dims)")
    if not all(torch.isfinite(t).all() for t in (mu1, mu2, sigma1, sigma2)):
        raise FIDError("statistics contain NaN or infinity")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    factor, info = torch.linalg.cholesky_ex(sigma1)  # fast, and fine whenever S1 is positive definite
    if info != 0:  # singular (e.g. fewer images than dims): L = V sqrt(max(eigenvalues, 0)) from eigh
        eigenvalues, eigenvectors = torch.linalg.eigh(sigma1)
        factor = eigenvectors * eigenvalues.clamp(min=0).sqrt()
    inner = factor.T @ sigma2 @ factor
    eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2)
    trace_covmean = eigenvalues.clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_covmean
    return max(float(distance), 0.0)  # a distance; anything below 0 is rounding (e.g. identical statistics)


# ----------------------------------------------------------------------------------------------------------------
# KID and precision/recall: on features, so any feature extractor works (score.py uses its classifier's)

def as_features(features, name):
    """A 2-d float tensor on the CPU; float32 and float64 kept as they are (the inner products run in that)."""
    x = torch.as_tensor(features).detach().cpu()
    x = x if x.dtype in (torch.float32, torch.float64) else x.double()
    if x.ndim != 2:
        raise FIDError(f"{name}: expected features [N, dims], got shape {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise FIDError(f"{name}: features contain NaN or infinity")
    return x


def matching_features(features_a, features_b, names):
    a, b = as_features(features_a, names[0]), as_features(features_b, names[1])
    if a.shape[1] != b.shape[1]:
        raise FIDError(f"features of mismatched dimensions: {names[0]} {a.shape[1]}, {names[1]} {b.shape[1]} "
                       f"(compute both with the same --dims)")
    return a, b


def polynomial_mmd2(x, y):
    """The unbiased squared MMD of two sets of m features each, under the kernel k(x, y) = (x.y / d + 1)^3.

    The inner products run in the features' own precision (float32 for Inception features: twice as fast as
    float64, and their rounding averages out over the m^2 terms), the cube and the sums in float64. On synthetic
    2048-d features with KID 8e-5 that was 3e-7 relative off all-float64; all-float32 (torch-fidelity's numpy route)
    was 3e-3 off.
    """
    d, m = x.shape[1], len(x)

    def kernel_sum(p, q, skip_diagonal):
        k = ((p @ q.T).double() / d + 1) ** 3
        return k.sum() - (k.diagonal().sum() if skip_diagonal else 0)

    within = kernel_sum(x, x, True) + kernel_sum(y, y, True)  # k(x_i, x_i) left out: that is what makes it unbiased
    return float(within / (m * (m - 1)) - 2 * kernel_sum(x, y, False) / (m * m))


def kid_subset_size(num_a, num_b, subset_size=KID_SUBSET_SIZE):
    """The subset size KID uses: subset_size, or all of the smaller set when it has fewer images."""
    return min(subset_size, num_a, num_b)


def kernel_inception_distance(features_a, features_b, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                              seed=KID_SEED):
    """KID (Bińkowski et al. 2018, arXiv:1801.01401): (mean, std) of polynomial_mmd2 over random subsets.

    As torch-fidelity 0.4.0 draws them: numpy's RandomState(seed), per subset subset_size indices of features_a
    (torch-fidelity's input1, the generated set) then of features_b, each without replacement; std with ddof 0.
    When a set has fewer than subset_size images, every subset is the size of the smaller set, with a warning
    (torch-fidelity refuses). Unbiased: its mean does not drift with N as FID does, and may be slightly negative.
    """
    a, b = matching_features(features_a, features_b, ("features_a", "features_b"))
    if len(a) < 2 or len(b) < 2:
        raise FIDError(f"KID needs at least 2 images per side, got {len(a)} and {len(b)}")
    if subsets < 1:
        raise FIDError(f"KID needs at least 1 subset, got {subsets}")
    if subset_size < 2:
        raise FIDError(f"KID subsets need at least 2 images, got a subset size of {subset_size}")
    m = kid_subset_size(len(a), len(b), subset_size)
    if m < subset_size:
        warnings.warn(f"KID subsets of {m} images (all of the smaller set): {subset_size} asked, {len(a)} and "
                      f"{len(b)} given")
    if m == len(a) == len(b):  # every subset is the whole of both sets: one value
        return polynomial_mmd2(a, b), 0.0
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = a[torch.from_numpy(rng.choice(len(a), m, replace=False))]
        y = b[torch.from_numpy(rng.choice(len(b), m, replace=False))]
        values.append(polynomial_mmd2(x, y))
    return float(np.mean(values)), float(np.std(values))


def squared_distances(x, y):
    """||x_i - y_j||^2 [len(x), len(y)] in float64, the inner products in the features' own precision."""
    xx, yy = x.double().square().sum(1), y.double().square().sum(1)
    return (xx[:, None] + yy[None, :] - 2 * (x @ y.T).double()).clamp_(min=0)


def kth_neighbour_radii(x, k, batch_size):
    """Squared distance from each row of x to its k-th nearest other row, in blocks of batch_size x batch_size."""
    radii = torch.empty(len(x), dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        rows = x[i:i + batch_size]
        nearest = torch.full((len(rows), k), float("inf"), dtype=torch.float64)
        for j in range(0, len(x), batch_size):
            block = squared_distances(rows, x[j:j + batch_size])
            if i == j:
                block.fill_diagonal_(float("inf"))  # the point itself is not its own neighbour
            nearest = torch.cat([nearest, block], 1).topk(k, dim=1, largest=False).values
        radii[i:i + batch_size] = nearest.max(1).values
    return radii


def precision_recall(real_features, fake_features, k=PRC_K, batch_size=2048):
    """(precision, recall) of Kynkäänniemi et al. 2019 (arXiv:1904.06991), as torch-fidelity 0.4.0 computes them.

    Each point's ball reaches its k-th nearest neighbour in its own set (itself excluded). Precision: the share of
    generated points inside some real point's ball (are the fakes realistic?); recall: the share of real points
    inside some generated point's ball (is the real variety covered?). Both depend on N: compare figures with the
    same N per side. Memory: one batch_size x batch_size block of distances at a time (2048: 32 MB), never N x N.
    """
    real, fake = matching_features(real_features, fake_features, ("real features", "generated features"))
    for name, n in (("real", len(real)), ("generated", len(fake))):
        if not 1 <= k <= n - 1:
            raise FIDError(f"precision/recall: k must be in 1..N-1 = 1..{n - 1} for the {n} {name} images, got {k}")
    if batch_size < 1:
        raise FIDError(f"batch size must be positive, got {batch_size}")
    real_radii, fake_radii = kth_neighbour_radii(real, k, batch_size), kth_neighbour_radii(fake, k, batch_size)
    fake_inside = torch.zeros(len(fake), dtype=torch.bool)
    real_inside = torch.zeros(len(real), dtype=torch.bool)
    for i in range(0, len(fake), batch_size):  # one pass over the fake-real distances serves both
        for j in range(0, len(real), batch_size):
            block = squared_distances(fake[i:i + batch_size], real[j:j + batch_size])
            fake_inside[i:i + batch_size] |= (block <= real_radii[None, j:j + batch_size]).any(1)
            real_inside[j:j + batch_size] |= (block <= fake_radii[i:i + batch_size, None]).any(0)
    return fake_inside.double().mean().item(), real_inside.double().mean().item()


def protocol(num_a, num_b, dims=2048, resize="legacy", reference="B"):
    """What every figure is printed with: the images on each side, the feature layer, the resize and the reference
    set, e.g. "500 vs 10000 reference images (mnist train), Inception 2048-d pool3, resize legacy"."""
    counts = " vs ".join("?" if n is None else str(n) for n in (num_a, num_b))  # ?: a pytorch-fid file does not say
    return f"{counts} reference images ({reference}), {feature_layer(dims)}, resize {resize}"


def feature_layer(dims):
    return f"Inception {dims}-d {FEATURE_LAYERS[dims]}" if dims in FEATURE_LAYERS else f"{dims}-d features"


# ----------------------------------------------------------------------------------------------------------------
# Command line: folders, .npz files and dataset names

def open_source(source, num_samples=None, data_dir="data"):
    """((mu, sigma), None) for a statistics .npz; (None, images) for a folder (a list of files), an .npz of images or
    a dataset name (a uint8 tensor [N, C, H, W]), at most num_samples of them. Fails fast, before any network runs."""
    stats, images = read_source(source, data_dir)
    if stats is not None:
        return stats, None
    images = images[:num_samples]
    if len(images) < 2:
        raise FIDError(f"{source} has {len(images)} image(s); need at least 2 for a covariance")
    return None, images


def read_source(source, data_dir):
    if os.path.isdir(source):
        files = sorted(name for name in os.listdir(source) if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
        files = [os.path.join(source, name) for name in files if os.path.isfile(os.path.join(source, name))]
        if not files:
            raise FIDError(f"no images in {source} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return None, files
    if os.path.isfile(source):
        try:
            with np.load(source, allow_pickle=False) as npz:
                if "mu" in npz and "sigma" in npz:
                    mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
                    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                        raise FIDError(f"{source}: mu {list(mu.shape)} and sigma {list(sigma.shape)} do not match")
                    return (mu, sigma), None
                if "images" not in npz:
                    raise FIDError(f"{source} has neither mu and sigma (statistics) nor images (samples)")
                images = npz["images"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise FIDError(f"cannot read {source} as .npz ({one_line(e)})") from None
        if images.ndim == 3:  # [N, H, W] grayscale
            images = images[..., None]
        if images.ndim != 4 or images.shape[3] not in (1, 3) or images.dtype != np.uint8:
            raise FIDError(f"{source}: images must be uint8 [N, H, W, C] with C 1 or 3, got {images.dtype} "
                           f"{list(images.shape)}")
        return None, torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    if source in DATASET_NAMES:
        try:
            import data  # lazily: only dataset names need this repo's data.py; fid.py stays copyable without it
        except ImportError:
            raise FIDError(f"dataset name {source!r} needs data.py beside fid.py; pass a folder or .npz") from None
        try:
            return None, data.load_dataset(source, data_dir=data_dir, split="train").images
        except data.DataError as e:
            raise FIDError(str(e)) from None
    raise FIDError(f"{source}: no such folder or file, and not a dataset name ({', '.join(DATASET_NAMES)})")


def folder_batches(files, batch_size):
    """uint8 batches of image files read as pytorch-fid reads them: PIL, converted to RGB."""
    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start:start + batch_size]:
            try:
                with Image.open(path) as image:
                    images.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise FIDError(f"not a readable image: {path} ({one_line(e)})") from None
        same_size = all(image.shape == images[0].shape for image in images)
        yield torch.stack(images) if same_size else [image[None] for image in images]


def images_statistics(images, model, dims=2048, batch_size=50, resize="legacy"):
    """(mu, sigma) of image files (a list of paths) or of images in a tensor or array."""
    batches = folder_batches if isinstance(images, list) else image_batches
    return statistics_from_batches(model, batches(images, batch_size), dims, resize)


def statistics_of(source, dims=2048, batch_size=50, device=None, weights=None, num_samples=None, data_dir="data",
                  resize="legacy"):
    """(mu, sigma) of a folder of images, a .npz (statistics or images) or a dataset name."""
    stats, images = open_source(source, num_samples, data_dir)
    if stats is not None:
        return stats
    check_request(images, dims, batch_size, source, resize)
    return images_statistics(images, as_model(weights, device), dims, batch_size, resize)


def saved_protocol(path, dims, resize, with_features=False):
    """(image count or None, what the statistics are of, features or None) of a statistics .npz, refused in one line
    when it was made another way than this run (pytorch-fid's own files carry no record: they are legacy)."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FIDError(f"cannot read {path} as .npz ({one_line(e)})") from None
    with npz:
        saved_resize = str(npz["resize"]) if "resize" in npz else None
        if saved_resize != resize and (saved_resize is not None or resize != "legacy"):
            raise FIDError(f"{path} holds statistics made with --resize {saved_resize or 'legacy (pytorch-fid)'}; "
                           f"this run uses --resize {resize}: recompute one of them")
        if with_features and "features" not in npz:
            raise FIDError(f"{path} holds only mu and sigma; KID and precision/recall need features: pass the images, "
                           f"or save them with --save-stats ... --kid")
        features = npz["features"] if with_features else None
        if features is not None and features.shape[1:] != (dims,):
            raise FIDError(f"{path}: features of shape {list(features.shape)}, expected [N, {dims}]")
        num_images = int(npz["num_images"]) if "num_images" in npz else None
        made_from = str(npz["source"]) if "source" in npz else None
    return num_images, made_from, features



def report(fake, real, device=None, cache_dir=None):
    """The training scripts' --fid line: FID and KID of fake against real (uint8 [N, C, H, W] each), from one pass of
    Inception features per side; the real side's features are cached in cache_dir (if given) for the next run."""
    inception = load_inception(device=device)  # loaded once for both sides
    cache = cache_dir and os.path.join(cache_dir, f"fid_features_{real.shape[-1]}px_{len(real)}.npz")
    real_features = (cached_features(cache, lambda: real, weights=inception, num_images=len(real), reference="train")
                     if cache else compute_features(real, weights=inception))
    fake_features = compute_features(fake, weights=inception)
    with warnings.catch_warnings():  # fewer than 1,000 samples: smaller KID subsets, said in the line
        warnings.simplefilter("ignore")
        kid_mean, kid_std = kernel_inception_distance(fake_features, real_features)
    frechet = frechet_distance(*statistics_of_features(real_features), *statistics_of_features(fake_features))
    subset = kid_subset_size(len(fake_features), len(real_features))
    return (f"FID: {frechet:.6g}  KID: {kid_mean:.6g} ± {kid_std:.2g} (subsets of {subset}) "
            f"[{protocol(len(fake_features), len(real_features), reference='training images')}]")

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def check_device(device):
    """--device as given, refused in one line when torch cannot use it (None: CUDA if available, else the CPU)."""
    if device is None:
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise FIDError(f"--device {device}: not a device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise FIDError(f"--device {device}: this torch {torch.__version__} sees no CUDA GPU")
    if parsed.type not in ("cpu", "cuda"):
        raise FIDError(f"--device {device}: only cpu and cuda are supported")
    return device


def parse_args(argv):
    parser = ArgumentParser(
        prog="fid.py",
        description="FID (and with --kid, --prc: KID, precision and recall) of image set A against the reference set "
                    "B, equal to pytorch-fid's FID and torch-fidelity's KID and precision/recall on the same images. "
                    "Each input is a folder of images, a .npz with mu/sigma (pytorch-fid statistics, optionally with "
                    "features) or with images (uint8 [N, H, W, C], as written by --generate), or a dataset name "
                    "(mnist, fashion-mnist: the training split). Every figure is printed with its protocol: the image "
                    "count on each side, the feature layer, the resize and the reference set.",
        epilog="Speed: every image is resized to 299x299, so the cost per image does not depend on its size. A 2-core "
               "CPU does about 25 images/s when idle (10,000 images: about 7 minutes; several times slower when other "
               "work shares the cores); a GPU does hundreds per second. Save the real images' statistics once with "
               "--save-stats. Fewer images than --dims give a biased FID; use 10,000 or more for numbers comparable "
               "to published ones, or read KID, which is unbiased.")
    parser.add_argument("a", metavar="A", help="the generated (or evaluated) set")
    parser.add_argument("b", metavar="B", help="the reference (real) set; with --save-stats, the .npz to write")
    parser.add_argument("--save-stats", action="store_true",
                        help="write A's mu and sigma to B instead (with --kid or --prc, its features too)")
    parser.add_argument("--dims", type=int, default=2048, choices=DIMS, help="feature block (default 2048)")
    parser.add_argument("--resize", default="legacy", choices=RESIZE_MODES,
                        help="legacy: pytorch-fid's bilinear to 299x299 (default); clean: clean-fid's PIL bicubic of "
                             "each channel as float32, not re-quantised")
    parser.add_argument("--kid", action="store_true", help="also KID: mean ± std of the unbiased MMD^2 over subsets")
    parser.add_argument("--kid-subsets", type=int, default=None, metavar="S",
                        help=f"KID subsets (default {KID_SUBSETS})")
    parser.add_argument("--kid-subset-size", type=int, default=None, metavar="M",
                        help=f"images per KID subset and side (default {KID_SUBSET_SIZE}, or all of the smaller set "
                             f"when it has fewer)")
    parser.add_argument("--prc", action="store_true", help="also precision and recall (k-nearest-neighbour balls)")
    parser.add_argument("--prc-k", type=int, default=None, metavar="K", help=f"neighbourhood size (default {PRC_K})")
    parser.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--num-samples", type=int, default=None, metavar="N", help="use at most N images per input")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help=f"Inception weights (default: downloaded once into {default_cache_dir()})")
    parser.add_argument("--data-dir", default="data", help="where dataset names are looked for (default data)")
    return parser.parse_args(argv)


def check_numbers(args):
    """One-line errors for values no input could make right, before anything is read."""
    if args.num_samples is not None and args.num_samples < 2:
        raise FIDError(f"--num-samples must be at least 2, got {args.num_samples}")
    for flag, value, minimum, needs, needed in (("--kid-subsets", args.kid_subsets, 1, args.kid, "--kid"),
                                                ("--kid-subset-size", args.kid_subset_size, 2, args.kid, "--kid"),
                                                ("--prc-k", args.prc_k, 1, args.prc, "--prc")):
        if value is not None and not needs:
            raise FIDError(f"{flag} does nothing without {needed}")
        if value is not None and value < minimum:
            raise FIDError(f"{flag} must be at least {minimum}, got {value}")


def check_counts(args, names, counts):
    """One-line errors for KID subsets or precision/recall neighbourhoods that these image counts cannot give."""
    if args.kid and args.kid_subset_size is not None and args.kid_subset_size > min(counts):
        given = " and ".join(f"{name} has {n}" for name, n in zip(names, counts))
        raise FIDError(f"--kid-subset-size {args.kid_subset_size} needs {args.kid_subset_size} images per side; "
                       f"{given} (leave the flag out to use all {min(counts)})")
    k = args.prc_k or PRC_K
    for name, n in zip(names, counts):
        if args.prc and not 1 <= k <= n - 1:
            raise FIDError(f"--prc-k {k}: must be in 1..N-1 = 1..{n - 1}, since {name} has {n} images")


def main(argv=None):
    args = parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_, **__: print(f"fid.py: warning: {message}", file=sys.stderr)
            check_device(args.device)
            check_numbers(args)
            with_features = args.kid or args.prc
            sources = [args.a] if args.save_stats else [args.a, args.b]
            if args.save_stats and os.path.exists(args.b):
                raise FIDError(f"{args.b} exists; remove it or choose another output file")
            opened = [open_source(source, args.num_samples, args.data_dir) for source in sources]
            needs_network = any(stats is None for stats, _ in opened)
            sides = []  # per input: mu, sigma, features (or None), image count (or None), what it is
            for source, (stats, images) in zip(sources, opened):
                if stats is None:  # images to run: check everything before the long part
                    check_request(images, args.dims, args.batch_size, source, args.resize)
                    described = f"{source} train" if source in DATASET_NAMES and not os.path.exists(source) else source
                    sides.append(dict(images=images, count=len(images), what=described))
                    continue
                if needs_network and len(stats[0]) != args.dims:
                    raise FIDError(f"{source} holds {len(stats[0])}-d statistics; pass --dims {len(stats[0])}")
                count, made_from, features = saved_protocol(source, len(stats[0]), args.resize, with_features)
                count = len(features) if features is not None else count
                what = f"{source}: statistics of {made_from}" if made_from else source
                sides.append(dict(mu=stats[0], sigma=stats[1], features=features, count=count, what=what))
            if with_features:
                check_counts(args, sources, [side["count"] for side in sides])
            model = load_inception(args.weights, args.device) if needs_network else None  # statistics need none
            for side in sides:
                if "images" not in side:
                    continue
                if with_features:
                    side["features"] = inception_features(model, side["images"], args.dims, args.batch_size,
                                                          args.resize)
                    side["mu"], side["sigma"] = statistics_of_features(side["features"], args.batch_size)
                else:
                    side["mu"], side["sigma"] = images_statistics(side["images"], model, args.dims, args.batch_size,
                                                                  args.resize)
            dims = len(sides[0]["mu"])
            if args.save_stats:
                save(args, sides[0], dims, with_features)
            else:
                report(args, sides, dims)
    except FIDError as e:
        print(f"fid.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def save(args, side, dims, with_features):
    info = dict(dims=dims, resize=args.resize, extractor=extractor_name(args.weights, args.resize), source=side["what"])
    if side["count"] is not None:
        info["num_images"] = side["count"]
    if with_features:
        info["features"] = np.asarray(side["features"], dtype=np.float32)
    save_statistics(args.b, side["mu"], side["sigma"], **info)
    count = "?" if side["count"] is None else side["count"]
    print(f"saved mu and sigma{' and features' if with_features else ''} of {args.a} to {args.b} "
          f"[{count} images, {feature_layer(dims)}, resize {args.resize}]")


def report(args, sides, dims):
    """FID, then KID and precision/recall when asked, each with the protocol it was computed under."""
    a, b = sides
    line = protocol(a["count"], b["count"], dims, args.resize, b["what"])
    print(f"FID: {frechet_distance(a['mu'], a['sigma'], b['mu'], b['sigma'])} [{line}]")
    if args.kid:
        asked = args.kid_subset_size or KID_SUBSET_SIZE
        size = kid_subset_size(len(a["features"]), len(b["features"]), asked)
        subsets = args.kid_subsets or KID_SUBSETS
        mean, std = kernel_inception_distance(a["features"], b["features"], subsets, size)
        if size == len(a["features"]) == len(b["features"]):
            how = "the whole of both sets"
        else:
            smaller = "" if size == asked else f" (all of the smaller set; {asked} asked)"
            how = f"{subsets} subsets of {size}{smaller}"
        print(f"KID: {mean:.6g} ± {std:.6g} [mean ± std over {how}; {line}]")
    if args.prc:
        k = args.prc_k or PRC_K
        precision, recall = precision_recall(b["features"], a["features"], k)
        print(f"precision: {precision:.4f} [k={k}; {line}]")
        print(f"recall: {recall:.4f} [k={k}; {line}]")


if __name__ == "__main__":
    sys.exit(main())
