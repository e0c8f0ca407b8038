"""Fréchet Inception Distance in plain torch (no torchvision, no scipy) that gives pytorch-fid's number, with KID,
precision/recall and clean-fid's resize on the same features. Copy this file alone into any project.

FID (Heusel et al. 2017, arXiv:1706.08500) follows pytorch-fid 0.3.0 in every step that moves the number: its Inception
and weights, bilinear resize to 299x299, float64 statistics. KID and precision/recall follow torch-fidelity 0.4.0,
--resize clean follows clean-fid 0.1.35.

    python fid.py --save-stats mnist mnist.npz --num-samples 10000   # once (~7 min on 2 CPU cores)
    python fid.py runs/dcgan/samples.npz mnist.npz --kid --prc       # samples from --generate vs MNIST

    fake, real = fid.compute_features(images), fid.compute_features(real_images)  # uint8 [N, C, H, W] -> [N, 2048]
    score = fid.frechet_distance(*fid.statistics_of_features(fake), *fid.statistics_of_features(real))
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
FEATURE_LAYERS = {64: "first max pool", 192: "second max pool", 768: "Mixed_6e", 2048: "pool3"}  # --dims
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # any case
DATASET_NAMES = ("mnist", "fashion-mnist")
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
        # eval-mode BN is a per-channel affine map: into the conv's weight and bias, in float64 for correct rounding
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
        pool = nn.MaxPool2d(kernel_size=3, stride=2)
        blocks = {64: [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, pool],  # (B, 64, 73, 73)
                  192: [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, pool],  # (B, 192, 35, 35)
                  768: [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                        self.Mixed_6d, self.Mixed_6e],  # (B, 768, 17, 17)
                  2048: [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c]}  # (B, 2048, 8, 8)
        for block in list(blocks)[:list(blocks).index(dims) + 1]:  # only up to the requested block
            for layer in blocks[block]:
                x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def load_pytorch_fid_state_dict(self, state, source="state dict"):
        """Strict load of pytorch-fid's layout, with or without BatchNorm's num_batches_tracked entries."""
        expected = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        wrong = [name for name in set(expected) | set(state) if not name.endswith("num_batches_tracked") and
                 expected.get(name) != tuple(getattr(state.get(name), "shape", (None,)))]
        if wrong:
            raise FIDError(f"{source} is not pytorch-fid's Inception: {len(wrong)} entries missing, unexpected or of "
                           f"another shape, e.g. {sorted(wrong)[:2]}")
        self.load_state_dict(state, strict=False)

    def prepare_for_inference(self):
        """Fold each BatchNorm into its conv and go channels-last (NHWC, oneDNN's native layout): ~2.5x faster on a
        CPU, same features to ~1e-6 relative. Call after loading weights: the folded model has another layout."""
        for module in self.modules():
            if isinstance(module, BasicConv2d) and isinstance(module.bn, nn.BatchNorm2d):
                module.fold_batchnorm()
        self.channels_last = True
        return self.to(memory_format=torch.channels_last).eval()


def resize_299(x):
    # pytorch-fid: bilinear, align_corners=False, no antialiasing (which would change small-image features)
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


def clean_resize(images):
    """clean-fid's "clean" resize of uint8 [B, C, H, W] to float32 [B, C, 299, 299] in 0..255: each channel as a
    float PIL image, PIL's antialiased bicubic, clipped, not rounded (make_resizer("PIL", quantize_after=False))."""
    array = torch.as_tensor(images).cpu().numpy()
    out = np.empty((*array.shape[:2], 299, 299), np.float32)
    for i, image in enumerate(array):
        for c, channel in enumerate(image):
            resized = Image.fromarray(channel.astype(np.float32)).resize((299, 299), resample=Image.BICUBIC)
            out[i, c] = np.asarray(resized).clip(0, 255)
    return torch.from_numpy(out)


def download_weights(url=WEIGHTS_URL, cache_dir=None):
    """The weights file in cache_dir (torch hub's by default), downloaded once by torch hub, which checks the sha256
    prefix in its name and leaves nothing behind from a failed, cut-off or wrong download."""
    cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    target = os.path.join(cache_dir, os.path.basename(urllib.parse.urlparse(url).path))
    expected = re.search(r"-([0-9a-f]{6,})\.", target)  # torch hub's name-<sha256 prefix>.ext
    if not os.path.isfile(target):
        print(f"downloading {url} into {cache_dir}", file=sys.stderr)
        try:
            os.makedirs(cache_dir, exist_ok=True)
            torch.hub.download_url_to_file(url, target, expected and expected.group(1), progress=False)
        except (OSError, RuntimeError, http.client.HTTPException) as e:  # offline, a wrong hash, a cut-off
            raise FIDError(f"could not download {url} ({one_line(e)}); offline, copy {os.path.basename(target)} into "
                           f"{cache_dir} or pass --weights FILE") from None
    return target


def one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def load_inception(weights=None, device=None, url=WEIGHTS_URL, cache_dir=None):
    """The FID Inception ready for inference (BatchNorm folded, channels-last, eval mode) on device (default: CUDA if
    available). weights: None (pytorch-fid's file, downloaded once), a file path, a state dict or a loaded model."""
    if isinstance(weights, FIDInception):
        return weights if device is None else weights.to(device)
    if weights is None:
        weights = download_weights(url, cache_dir)
    state, source = weights, "state dict"
    if not isinstance(weights, collections.abc.Mapping):
        try:
            state, source = torch.load(weights, map_location="cpu", weights_only=True), weights
        except Exception as e:  # torch.load raises many types for missing, truncated or foreign files
            raise FIDError(f"cannot read Inception weights {weights} ({one_line(e)})") from None
        if not isinstance(state, collections.abc.Mapping):
            raise FIDError(f"{weights} is not a state dict")
    device = check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 94 convs loaded and folded in tiny steps: on a busy CPU threads only stall each other
    try:
        model = FIDInception()
        model.load_pytorch_fid_state_dict(state, source)
        return model.prepare_for_inference().to(device)
    finally:
        torch.set_num_threads(threads)


def check_device(device):  # as given (None stays None), or one line saying why torch cannot use it
    if device and not (re.fullmatch(r"cpu|cuda(:\d+)?", device) and (device == "cpu" or torch.cuda.is_available())):
        raise FIDError(f"--device {device}: use cpu, or cuda, cuda:1, ... where torch sees a GPU")
    return device


# ----------------------------------------------------------------------------------------------------------------
# Features and statistics

@contextlib.contextmanager
def no_tf32(device):
    """Full float32 convolutions on CUDA: TF32 (cuDNN's default on Ampere+) perturbs the features. torch >= 2.9 has
    a per-operator setting, and mixing it with the old allow_tf32 flag is an error: one of them."""
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


def to_uint8(images):  # generator output in [-1, 1] -> uint8, rounded as saving a PNG would
    return (((images.detach().float() + 1) / 2) * 255 + 0.5).clamp_(0, 255).to(torch.uint8)


def batch_features(model, batch, dims=2048, resize="legacy"):
    """Features [B, dims] (float32, CPU) of a uint8 batch [B, C, H, W], or of a list of [1, C, H, W] of mixed sizes."""
    model.eval()  # here, not by the caller: BatchNorm in train mode changes FID by 10x (pytorch-fid #118)
    device = next(model.parameters()).device
    with torch.inference_mode(), no_tf32(device):
        if resize == "clean":  # PIL on the CPU, before the network; it then sees 299x299 and resizes nothing
            x = torch.cat([clean_resize(image) for image in (batch if isinstance(batch, list) else [batch])])
            x = x.to(device) / 255
        elif isinstance(batch, list):  # each image resized on its own, which is what a batch of 1 would do
            x = torch.cat([resize_299(image.to(device).float() / 255) for image in batch])
        else:
            x = batch.to(device).float() / 255  # like torchvision's ToTensor: a division, not * (1/255)
        return model(x, dims).float().cpu()


def image_batches(images, batch_size):
    """uint8 batches of images: a tensor or array (floats in [-1, 1] quantised batch by batch), or image files read
    as pytorch-fid reads them (PIL, RGB; a batch of mixed sizes is a list of single images)."""
    for start in range(0, len(images), batch_size):
        if not isinstance(images, list):
            batch = torch.as_tensor(images[start:start + batch_size])
            yield batch if batch.dtype == torch.uint8 else to_uint8(batch)
            continue
        batch = []
        for path in images[start:start + batch_size]:
            try:
                with Image.open(path) as image:
                    batch.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise FIDError(f"not a readable image: {path} ({one_line(e)})") from None
        yield torch.stack(batch) if all(b.shape == batch[0].shape for b in batch) else [b[None] for b in batch]


def check_images(images, source="images"):
    """One-line errors for bad images, before any weights are loaded (image files are checked as they are read)."""
    if not isinstance(images, list) and (images.ndim != 4 or images.shape[1] not in (1, 3) or not (
            images.dtype in (torch.uint8, np.uint8) or torch.as_tensor(images[:1]).is_floating_point())):
        raise FIDError(f"{source}: expected uint8 or float (-1..1) images [N, C, H, W] with C 1 or 3, got "
                       f"{images.dtype} {list(images.shape)}")
    if len(images) < 2:
        raise FIDError(f"{source}: need at least 2 images for a covariance, got {len(images)}")


def compute_features(images, dims=2048, batch_size=50, device=None, weights=None, resize="legacy"):
    """Features [N, dims] (float32, CPU) of images: uint8 [N, C, H, W] (C 1 or 3), floats in [-1, 1], or a list of
    image files. weights as load_inception takes them; resize "legacy" (pytorch-fid) or "clean" (clean-fid)."""
    check_images(images)
    model = load_inception(weights, device)
    return torch.cat([batch_features(model, batch, dims, resize) for batch in image_batches(images, batch_size)])


def statistics_of_features(features):
    """(mu, sigma): the mean and unbiased covariance (N - 1, as np.cov) of features [N, dims], float64 numpy."""
    x = torch.as_tensor(features).double()
    if len(x) < x.shape[1]:
        warnings.warn(f"{len(x)} images give a singular {x.shape[1]}x{x.shape[1]} covariance: FID is biased upwards "
                      f"and not comparable to published figures (use at least {x.shape[1]}, better 10000+)")
    centred = x - x.mean(0)
    return x.mean(0).numpy(), (centred.T @ centred / (len(x) - 1)).numpy()


def cached_features(path, images, weights=None, device=None, dims=2048, resize="legacy"):
    """compute_features(images), kept in path (.npz, readable by pytorch-fid as statistics) and reused while the
    images (by MD5), dims and resize are the same: features of another set or protocol never mix (pytorch-fid #33)."""
    key = dict(dims=dims, resize=resize, images_md5=hashlib.md5(torch.as_tensor(images).numpy().tobytes()).hexdigest())
    try:
        with np.load(path, allow_pickle=False) as saved:
            if all(str(saved[k]) == str(v) for k, v in key.items()):
                return torch.from_numpy(saved["features"].astype(np.float32))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # absent, foreign or damaged: recompute
        pass
    features = compute_features(images, dims, weights=weights, device=device, resize=resize)
    save_statistics(path, *statistics_of_features(features), features=features.numpy(), **key)
    return features


def save_statistics(path, mu, sigma, **info):
    """pytorch-fid's .npz (mu, sigma) plus info keys it ignores, written to a temporary file renamed when whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as out:
            np.savez_compressed(out, mu=mu, sigma=sigma, **info)
        os.replace(tmp, path)
    except OSError as e:
        raise FIDError(f"cannot write {path} ({one_line(e)})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance, KID and precision/recall: on features, so any feature extractor works (score.py uses its own)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)), in float64 torch; numpy arrays or tensors in.
    With S1 = L L^T, S1 S2 is similar to the symmetric L^T S2 L: one symmetric eigenvalue problem replaces scipy's
    sqrtm (pytorch-fid's), >10x faster at 2048 dims, and singular covariances give zeros, not NaN or complex values."""
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
    trace_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_covmean
    return max(float(distance), 0.0)  # a distance; anything below 0 is rounding (e.g. identical statistics)


def as_features(*sets, names=("generated", "real")):
    """Each set as a 2-d float tensor on the CPU (float32 and float64 kept: the inner products run in that)."""
    sets = [torch.as_tensor(x).detach().cpu() for x in sets]
    sets = [x if x.dtype in (torch.float32, torch.float64) else x.double() for x in sets]
    for x, name in zip(sets, names):
        if x.ndim != 2 or not torch.isfinite(x).all():
            raise FIDError(f"{name} features: expected finite [N, dims], got shape {list(x.shape)} or NaN/infinity")
    if sets[0].shape[1] != sets[-1].shape[1]:
        raise FIDError(f"features of mismatched dimensions: {sets[0].shape[1]} and {sets[-1].shape[1]}")
    return sets


def polynomial_mmd2(x, y):
    """The unbiased squared MMD of two sets of m features under k(x, y) = (x.y / d + 1)^3: the inner products in the
    features' precision (float32: 3e-7 relative off float64), the cube and the sums in float64 (float32: 3e-3 off)."""
    d, m = x.shape[1], len(x)

    def kernel_sum(p, q, skip_diagonal):
        k = ((p @ q.T).double() / d + 1) ** 3
        return k.sum() - (k.diagonal().sum() if skip_diagonal else 0)
    within = kernel_sum(x, x, True) + kernel_sum(y, y, True)  # k(x_i, x_i) left out: that is what makes it unbiased
    return float(within / (m * (m - 1)) - 2 * kernel_sum(x, y, False) / (m * m))


def kid_subset_size(num_a, num_b, subset_size=KID_SUBSET_SIZE):  # subset_size, or all of the smaller set
    return min(subset_size, num_a, num_b)


def kernel_inception_distance(features_a, features_b, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                              seed=KID_SEED):
    """KID (Bińkowski et al. 2018, arXiv:1801.01401): (mean, std) of polynomial_mmd2 over random subsets, drawn as
    torch-fidelity 0.4.0 does (RandomState(seed), indices of a then of b, without replacement; std with ddof 0). A set
    smaller than subset_size shrinks the subsets, with a warning (torch-fidelity refuses). Unbiased; may be < 0."""
    a, b = as_features(features_a, features_b)
    if len(a) < 2 or len(b) < 2 or subsets < 1 or subset_size < 2:
        raise FIDError(f"KID needs at least 2 images per side and per subset and 1 subset, got {len(a)} and "
                       f"{len(b)} images, {subsets} subsets of {subset_size}")
    m = kid_subset_size(len(a), len(b), subset_size)
    if m < subset_size:
        warnings.warn(f"KID subsets of {m} images (all of the smaller set): {subset_size} asked, {len(a)} and "
                      f"{len(b)} given")
    if m == len(a) == len(b):  # every subset is the whole of both sets: one value
        return polynomial_mmd2(a, b), 0.0
    rng = np.random.RandomState(seed)
    values = [polynomial_mmd2(a[torch.from_numpy(rng.choice(len(a), m, replace=False))],
                              b[torch.from_numpy(rng.choice(len(b), m, replace=False))]) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def squared_distances(x, y):
    """||x_i - y_j||^2 [len(x), len(y)] in float64, the inner products in the features' own precision."""
    xx, yy = x.double().square().sum(1), y.double().square().sum(1)
    return (xx[:, None] + yy[None, :] - 2 * (x @ y.T).double()).clamp_(min=0)


def kth_neighbour_radii(x, k, batch_size):
    """Squared distance from each row of x to its k-th nearest other row, in blocks of batch_size x batch_size."""
    radii = torch.empty(len(x), dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        nearest = torch.full((len(x[i:i + batch_size]), k), float("inf"), dtype=torch.float64)
        for j in range(0, len(x), batch_size):
            block = squared_distances(x[i:i + batch_size], x[j:j + batch_size])
            if i == j:
                block.fill_diagonal_(float("inf"))  # the point itself is not its own neighbour
            nearest = torch.cat([nearest, block], 1).topk(k, dim=1, largest=False).values
        radii[i:i + batch_size] = nearest.max(1).values
    return radii


def precision_recall(real_features, fake_features, k=PRC_K, batch_size=2048):
    """(precision, recall) of Kynkäänniemi et al. 2019 (arXiv:1904.06991), as torch-fidelity 0.4.0 computes them.
    Each point's ball reaches its k-th nearest neighbour in its own set. Precision: the share of fakes in some real
    ball; recall: the share of reals in some fake ball. Both depend on N. Memory: one batch_size^2 block at a time."""
    real, fake = as_features(real_features, fake_features, names=("real", "generated"))
    for name, n in (("real", len(real)), ("generated", len(fake))):
        if not 1 <= k <= n - 1:
            raise FIDError(f"precision/recall: k must be in 1..N-1 = 1..{n - 1} for the {n} {name} images, got {k}")
    real_radii, fake_radii = kth_neighbour_radii(real, k, batch_size), kth_neighbour_radii(fake, k, batch_size)
    fake_inside, real_inside = torch.zeros(len(fake), dtype=torch.bool), torch.zeros(len(real), dtype=torch.bool)
    for i in range(0, len(fake), batch_size):  # one pass over the fake-real distances serves both
        for j in range(0, len(real), batch_size):
            block = squared_distances(fake[i:i + batch_size], real[j:j + batch_size])
            fake_inside[i:i + batch_size] |= (block <= real_radii[None, j:j + batch_size]).any(1)
            real_inside[j:j + batch_size] |= (block <= fake_radii[i:i + batch_size, None]).any(0)
    return fake_inside.double().mean().item(), real_inside.double().mean().item()


def protocol(num_a, num_b, dims=2048, resize="legacy", reference="B"):
    """What every figure is printed with; a count of None ("?") is a pytorch-fid file's, which does not say."""
    counts = " vs ".join("?" if n is None else str(n) for n in (num_a, num_b))
    return f"{counts} reference images ({reference}), Inception {dims}-d {FEATURE_LAYERS.get(dims)}, resize {resize}"


def report(fake, real, device=None, cache_dir=None):
    """The training scripts' --fid line: FID and KID of fake against real (uint8 [N, C, H, W] each), one pass of
    Inception features per side; the real side's features are cached in cache_dir (if given) for the next run."""
    inception = load_inception(device=device)  # loaded once for both sides
    real_features = (cached_features(os.path.join(cache_dir, f"fid_features_{real.shape[-1]}px_{len(real)}.npz"),
                                     real, inception) if cache_dir else compute_features(real, weights=inception))
    fake_features = compute_features(fake, weights=inception)
    with warnings.catch_warnings():  # fewer than 1,000 samples: smaller KID subsets, said in the line
        warnings.simplefilter("ignore")
        kid_mean, kid_std = kernel_inception_distance(fake_features, real_features)
        frechet = frechet_distance(*statistics_of_features(fake_features), *statistics_of_features(real_features))
    return (f"FID: {frechet:.6g}  KID: {kid_mean:.6g} ± {kid_std:.2g} (subsets of "
            f"{kid_subset_size(len(fake_features), len(real_features))}) "
            f"[{protocol(len(fake_features), len(real_features), reference='training images')}]")


# ----------------------------------------------------------------------------------------------------------------
# Command line: folders, .npz files and dataset names

def read_input(source, args):
    """One side: {"images": files or uint8 [N, C, H, W]} or {"mu", "sigma", "features"}, with "count" and "what"."""
    if os.path.isdir(source):
        images = sorted(os.path.join(source, f) for f in os.listdir(source)
                        if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        if not images:
            raise FIDError(f"no images in {source} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    elif os.path.isfile(source):
        try:
            with np.load(source, allow_pickle=False) as npz:
                npz = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise FIDError(f"cannot read {source} as .npz ({one_line(e)})") from None
        if "mu" in npz and "sigma" in npz:
            return statistics_input(source, npz, args)
        images = npz.get("images", np.zeros(0))
        images = images[..., None] if images.ndim == 3 else images  # [N, H, W] grayscale
        if images.ndim != 4 or images.shape[3] not in (1, 3) or images.dtype != np.uint8:
            raise FIDError(f"{source}: neither mu and sigma (statistics) nor images (uint8 [N, H, W, C], C 1 or 3)")
        images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    elif source in DATASET_NAMES:
        try:
            import data  # lazily: only dataset names need this repo's data.py; fid.py stays copyable without it
            images = data.load_dataset(source, data_dir=args.data_dir, split="train").images
        except ImportError:
            raise FIDError(f"dataset name {source!r} needs data.py beside fid.py; pass a folder or .npz") from None
        except data.DataError as e:
            raise FIDError(str(e)) from None
    else:
        raise FIDError(f"{source}: no such folder or file, and not a dataset name ({', '.join(DATASET_NAMES)})")
    images = images[:args.num_samples]
    check_images(images, source)
    if (args.kid or args.prc) and len(images) <= PRC_K:
        raise FIDError(f"{source}: precision/recall need at least {PRC_K + 1} images, got {len(images)}")
    return dict(images=images, count=len(images), what=f"{source} train" if source in DATASET_NAMES else source)


def statistics_input(source, npz, args):
    """A statistics .npz, refused in one line when it cannot serve this run (pytorch-fid's own files are legacy)."""
    mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDError(f"{source}: mu {list(mu.shape)} and sigma {list(sigma.shape)} do not match")
    if str(npz.get("resize", "legacy")) != args.resize:
        raise FIDError(f"{source} holds statistics made with --resize {npz.get('resize', 'legacy (pytorch-fid)')}; "
                       f"this run uses --resize {args.resize}: recompute one of them")
    if (args.kid or args.prc) and "features" not in npz:
        raise FIDError(f"{source} holds only mu and sigma; KID and precision/recall need features: pass the images, "
                       f"or save them with --save-stats ... --kid")
    features = npz.get("features")
    count = len(features) if features is not None else (int(npz["num_images"]) if "num_images" in npz else None)
    what = f"{source}: statistics of {npz['source']}" if "source" in npz else source
    return dict(mu=mu, sigma=sigma, features=features, count=count, what=what)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv):
    p = ArgumentParser(prog="fid.py", description="FID (and KID, precision, recall) of image set A against the "
                       "reference B: each a folder of images, a .npz of mu/sigma or of images, or mnist/fashion-mnist.")
    p.add_argument("a", metavar="A", help="the generated (or evaluated) set")
    p.add_argument("b", metavar="B", help="the reference (real) set; with --save-stats, the .npz to write")
    p.add_argument("--save-stats", action="store_true", help="write A's statistics to B (its features with --kid)")
    p.add_argument("--dims", type=int, default=2048, choices=tuple(FEATURE_LAYERS), help="feature block (default 2048)")
    p.add_argument("--resize", default="legacy", choices=RESIZE_MODES, help="pytorch-fid's (default) or clean-fid's")
    p.add_argument("--kid", action="store_true", help=f"also KID over {KID_SUBSETS} subsets of {KID_SUBSET_SIZE}")
    p.add_argument("--prc", action="store_true", help=f"also precision and recall (k = {PRC_K} nearest neighbours)")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--num-samples", type=int, default=None, metavar="N", help="use at most N images per input")
    p.add_argument("--weights", default=None, metavar="FILE", help="Inception weights (default: pytorch-fid's)")
    p.add_argument("--data-dir", default="data", help="where dataset names are looked for (default data)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_samples is not None and args.num_samples < 2:
        p.error("--batch-size must be at least 1 and --num-samples at least 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_, **__: print(f"fid.py: warning: {message}", file=sys.stderr)
            check_device(args.device)
            if args.save_stats and os.path.exists(args.b):
                raise FIDError(f"{args.b} exists; remove it or choose another output file")
            sides = [read_input(source, args) for source in ([args.a] if args.save_stats else [args.a, args.b])]
            for side in sides if any("images" in side for side in sides) else []:
                if "mu" in side and len(side["mu"]) != args.dims:
                    raise FIDError(f"{side['what']} holds {len(side['mu'])}-d statistics: use --dims {len(side['mu'])}")
            model = None
            for side in (side for side in sides if "images" in side):  # every input checked: now the long part
                model = load_inception(model or args.weights, args.device)
                side["features"] = compute_features(side["images"], args.dims, args.batch_size, weights=model,
                                                    resize=args.resize)
                side["mu"], side["sigma"] = statistics_of_features(side["features"])
            if args.save_stats:
                (a,) = sides
                extra = {"features": a["features"].numpy()} if args.kid or args.prc else {}
                save_statistics(args.b, a["mu"], a["sigma"], dims=args.dims, resize=args.resize, source=a["what"],
                                num_images=a["count"], **extra)
                print(f"saved mu and sigma{' and features' if extra else ''} of {args.a} to {args.b} [{a['count']} "
                      f"images, Inception {args.dims}-d {FEATURE_LAYERS[args.dims]}, resize {args.resize}]")
            else:
                print_figures(args, *sides)
    except FIDError as e:
        print(f"fid.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def print_figures(args, a, b):  # each figure with the protocol it was computed under
    line = protocol(a["count"], b["count"], len(a["mu"]), args.resize, b["what"])
    print(f"FID: {frechet_distance(a['mu'], a['sigma'], b['mu'], b['sigma'])} [{line}]")
    if args.kid:
        size = kid_subset_size(len(a["features"]), len(b["features"]))
        mean, std = kernel_inception_distance(a["features"], b["features"], KID_SUBSETS, size)
        how = (f"the whole of both sets" if size == len(a["features"]) == len(b["features"]) else
               f"{KID_SUBSETS} subsets of {size}" + (f" (all of the smaller set; {KID_SUBSET_SIZE} asked)"
                                                     if size < KID_SUBSET_SIZE else ""))
        print(f"KID: {mean:.6g} ± {std:.6g} [mean ± std over {how}; {line}]")
    if args.prc:
        precision, recall = precision_recall(b["features"], a["features"], PRC_K)
        print(f"precision: {precision:.4f} [k={PRC_K}; {line}]")
        print(f"recall: {recall:.4f} [k={PRC_K}; {line}]")


if __name__ == "__main__":
    sys.exit(main())
