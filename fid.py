"""Fréchet Inception Distance that gives pytorch-fid's number, in plain torch (no torchvision, no scipy).

FID compares the mean and covariance of Inception-v3 features of two image sets (Heusel et al. 2017, arXiv:1706.08500).
Every step that moves the number follows pytorch-fid 0.3.0: the TF-ported Inception with its FID-specific pooling,
the same weights file, bilinear resize to 299x299, inputs scaled to [-1, 1], float64 statistics, unbiased covariance.

    python fid.py --save-stats mnist mnist.npz --num-samples 10000   # once, ~7 min on a 2-core CPU; pytorch-fid's format
    python fid.py runs/dcgan/samples.npz mnist.npz                   # samples from --generate vs MNIST
    python fid.py real_images/ fake_images/                          # two folders of images

    import fid
    mu, sigma = fid.compute_statistics(images)       # uint8 [N, C, H, W], or generator output in [-1, 1]
    score = fid.frechet_distance(mu, sigma, mu_real, sigma_real)
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


def batch_features(model, batch, dims=2048):
    """Features [B, dims] (float32, CPU) of a uint8 batch [B, C, H, W], or of a list of [1, C, H, W] of mixed sizes."""
    model.eval()  # here, not by the caller: BatchNorm in train mode changes FID by 10x (pytorch-fid #118)
    device = next(model.parameters()).device
    with torch.inference_mode(), no_tf32(device):
        if isinstance(batch, list):  # each image resized on its own, which is what a batch of 1 would do
            x = torch.cat([resize_299(image.to(device).float() / 255) for image in batch])
        else:
            x = batch.to(device).float() / 255  # like torchvision's ToTensor: a division, not * (1/255)
        return model(x, dims).float().cpu()


def inception_features(model, images, dims=2048, batch_size=50):
    """Features [N, dims] (float32) of images: uint8 [N, C, H, W] (C 1 or 3), or floats in [-1, 1]."""
    return torch.cat([batch_features(model, batch, dims) for batch in image_batches(images, batch_size)])


def image_batches(images, batch_size):
    """uint8 batches of a tensor or array, quantising float images batch by batch on their own device."""
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(images[start:start + batch_size])
        yield batch if batch.dtype == torch.uint8 else to_uint8(batch)


def check_request(images, dims, batch_size, source="images"):
    """One-line errors for bad arguments, before any weights are loaded."""
    if dims not in DIMS:
        raise FIDError(f"dims must be one of {DIMS}, got {dims}")
    if batch_size < 1:
        raise FIDError(f"batch size must be positive, got {batch_size}")
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


def statistics_from_batches(model, batches, dims):
    """mu and the unbiased covariance of the features, streamed: memory is O(dims^2), not O(N * dims)."""
    count, mean, scatter = 0, torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64)
    for batch in batches:
        features = batch_features(model, batch, dims).double()
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


def compute_statistics(images, dims=2048, batch_size=50, device=None, weights=None):
    """(mu [dims], sigma [dims, dims]), float64 numpy, of uint8 images [N, C, H, W] (C 1 or 3) or floats in [-1, 1].

    weights: None (pytorch-fid's file, downloaded once), a file path, a state dict, or a loaded FIDInception.
    """
    check_request(images, dims, batch_size)
    return images_statistics(images, as_model(weights, device), dims, batch_size)


def cached_statistics(cache_file, images_fn, dims=2048, batch_size=50, device=None, weights=None):
    """compute_statistics(images_fn()), kept in cache_file (.npz) and reused while dims and extractor match."""
    # Statistics from other networks, weights or resizing do not mix (pytorch-fid #33): the cache records them.
    in_memory = isinstance(weights, (FIDInception, collections.abc.Mapping))
    weights_name = "in-memory weights" if in_memory else os.path.basename(weights or WEIGHTS_URL)
    extractor = f"pytorch-fid Inception-v3 ({weights_name}), bilinear 299x299, uint8 input"
    try:
        with np.load(cache_file, allow_pickle=False) as cached:
            if int(cached["dims"]) == dims and str(cached["extractor"]) == extractor:
                return cached["mu"].astype(np.float64), cached["sigma"].astype(np.float64)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # absent, foreign or damaged: recompute
        pass
    images = images_fn()
    mu, sigma = compute_statistics(images, dims, batch_size, device, weights)
    save_statistics(cache_file, mu, sigma, dims=dims, extractor=extractor, num_images=len(images))
    return mu, sigma


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


def images_statistics(images, model, dims=2048, batch_size=50):
    """(mu, sigma) of image files (a list of paths) or of images in a tensor or array."""
    batches = folder_batches if isinstance(images, list) else image_batches
    return statistics_from_batches(model, batches(images, batch_size), dims)


def statistics_of(source, dims=2048, batch_size=50, device=None, weights=None, num_samples=None, data_dir="data"):
    """(mu, sigma) of a folder of images, a .npz (statistics or images) or a dataset name."""
    stats, images = open_source(source, num_samples, data_dir)
    if stats is not None:
        return stats
    check_request(images, dims, batch_size, source)
    return images_statistics(images, as_model(weights, device), dims, batch_size)


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
        description="FID between two image sets, equal to pytorch-fid's on the same images. Each input is a folder "
                    "of images, a .npz with mu/sigma (pytorch-fid statistics) or with images (uint8 [N, H, W, C], as "
                    "written by --generate), or a dataset name (mnist, fashion-mnist).",
        epilog="Speed: every image is resized to 299x299, so the cost per image does not depend on its size. A 2-core "
               "CPU does about 25 images/s when idle (10,000 images: about 7 minutes; several times slower when other "
               "work shares the cores); a GPU does hundreds per second. Save the real images' statistics once with --save-stats. Fewer images than --dims give "
               "a biased FID; use 10,000 or more for numbers comparable to published ones.")
    parser.add_argument("a", metavar="A", help="first input")
    parser.add_argument("b", metavar="B", help="second input; with --save-stats, the .npz to write")
    parser.add_argument("--save-stats", action="store_true", help="write A's mu and sigma to B instead")
    parser.add_argument("--dims", type=int, default=2048, choices=DIMS, help="feature block (default 2048)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--num-samples", type=int, default=None, metavar="N", help="use at most N images per input")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help=f"Inception weights (default: downloaded once into {default_cache_dir()})")
    parser.add_argument("--data-dir", default="data", help="where dataset names are looked for (default data)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_, **__: print(f"fid.py: warning: {message}", file=sys.stderr)
            check_device(args.device)
            if args.num_samples is not None and args.num_samples < 2:
                raise FIDError(f"--num-samples must be at least 2, got {args.num_samples}")
            sources = [args.a] if args.save_stats else [args.a, args.b]
            if args.save_stats and os.path.exists(args.b):
                raise FIDError(f"{args.b} exists; remove it or choose another output file")
            opened = [open_source(source, args.num_samples, args.data_dir) for source in sources]
            model = None
            if any(stats is None for stats, _ in opened):  # images to run: check everything before the long part
                for source, (stats, images) in zip(sources, opened):
                    if stats is None:
                        check_request(images, args.dims, args.batch_size, source)
                    elif len(stats[0]) != args.dims:
                        raise FIDError(f"{source} holds {len(stats[0])}-d statistics; pass --dims {len(stats[0])}")
                model = load_inception(args.weights, args.device)  # two statistics files need no network
            stats = [found if found is not None else images_statistics(images, model, args.dims, args.batch_size)
                     for found, images in opened]
            if args.save_stats:
                save_statistics(args.b, *stats[0], dims=len(stats[0][0]))
                print(f"saved mu and sigma of {args.a} to {args.b}")
            else:
                print(f"FID: {frechet_distance(*stats[0], *stats[1])}")
    except FIDError as e:
        print(f"fid.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
