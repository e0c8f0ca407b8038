"""Data in and images out for every script: datasets, device batches, grids, GIFs, loss plots, the files of a run,
and differentiable augmentation. It imports no other file of this project.

    ds = data.load_dataset("mnist", data_dir="data")   # images uint8 [N, 1, 28, 28]; or a folder, image_size=64
    for real, labels in data.Batches(ds, 64, "cuda", seed=0).epoch(1): ...   # real: float [B, C, H, W] in [-1, 1]
"""
import csv
import fcntl
import gzip
import hashlib
import http.client
import math
import os
import sys
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError


class DataError(Exception):
    """Bad input (missing, corrupt or unreadable data) or an unusable output folder; the message names the file."""


IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
GZ_FILES = [stem + ".gz" for stem in IDX_FILES["train"] + IDX_FILES["test"]]
DATASETS = {  # the mirrors in the order tried (yann.lecun.com often answers 403); the MD5s of GZ_FILES, in order
    "mnist": dict(
        mirrors=["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        md5=["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432", "9fb629c4189551a2d022fa330f9573f3",
             "ec29112dd5afa0611ce80d1b7f02629c"],
        classes=[str(digit) for digit in range(10)]),
    "fashion-mnist": dict(
        mirrors=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"],
        md5=["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe", "bef4ecab320f06d8554ea6380940ec79",
             "bb300cfdad3c16e7a12a480ee83cd310"],
        classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]),
    # Stacked MNIST (VEEGAN, arXiv:1705.07761): three MNIST digits as R, G, B, built from MNIST's files; 1,000 modes
    "stacked-mnist": dict(stacks="mnist", classes=[f"{mode:03d}" for mode in range(1000)]),
}
SYSTEM_DATASET_DIR = "/usr/share/datasets"  # where Debian's dataset-mnist / dataset-fashion-mnist put the files


@dataclass
class Dataset:
    images: torch.Tensor  # uint8 [N, C, H, W], 0..255, on the CPU
    labels: torch.Tensor  # int64 [N]
    classes: list = field(default_factory=list)  # classes[label] is the class name
    source: str = ""  # the folder the data came from
    cache_dir: str = ""  # a writable folder next to the data, for derived files such as FID features
    num_classes = property(lambda self: len(self.classes))
    image_shape = property(lambda self: tuple(self.images.shape[1:]))


# ----------------------------------------------------------------------------------------------------------------
# Data in: named datasets (IDX files), folders of images, batches on the device

def load_dataset(name, data_dir="data", split="train", image_size=None, download=True):
    """A named dataset (DATA_DIR/<name>/, else Debian's /usr/share/datasets/<name>/, else downloaded) or a folder of
    images, as uint8 tensors of image_size x image_size (None keeps 28 for the named ones; required for folders)."""
    if name not in DATASETS:
        if not os.path.isdir(name):
            raise DataError(f"no folder of images at {name}" if os.sep in name or os.path.exists(name) else
                            f"unknown dataset '{name}': use {', '.join(DATASETS)} or a folder of images")
        try:
            return load_folder(name, image_size)
        except OSError as e:  # a folder we may not list; unreadable files are caught per image
            raise DataError(f"cannot read {e.filename or name}: {e.strerror or e}") from None
    source = DATASETS[name].get("stacks", name)  # the dataset whose IDX files are read
    folder, (images_file, labels_file) = find_idx_files(source, data_dir, split, download)
    images, labels = read_idx(images_file, 3).copy()[:, None], read_idx(labels_file, 1).astype(np.int64)
    if len(images) != len(labels) or labels.max() >= len(DATASETS[source]["classes"]):
        raise DataError(f"{labels_file}: {len(labels)} labels up to {labels.max()} for {len(images)} images")
    if source != name:  # as many images as the split has, each of 3 digits drawn with a fixed seed: mode 100a+10b+c
        picks = np.random.default_rng(0).integers(len(images), size=(len(images), 3))
        images, labels = images[picks, 0], labels[picks] @ np.array([100, 10, 1])
    images = torch.from_numpy(images)
    if image_size not in (None, images.shape[-1]):  # in chunks: bounded memory for the float copy
        images = torch.cat([F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear",
                                          antialias=True).round_().clamp_(0, 255).to(torch.uint8)
                            for chunk in images.split(4096)])
    writable = os.access(folder, os.W_OK) and source == name  # /usr/share is read-only; stacks keep their FID apart
    cache_dir = folder if writable else os.path.join(data_dir, name)
    return Dataset(images, torch.from_numpy(labels), list(DATASETS[name]["classes"]), folder, cache_dir)


def find_idx_files(name, data_dir, split, download):
    """(folder, [images file, labels file]) of the split, plain or gzipped; both splits downloaded if in neither."""
    def files_in(folder):
        return [next((p for p in (os.path.join(folder, stem), os.path.join(folder, stem + ".gz")) if os.path.isfile(p)),
                     None) for stem in IDX_FILES[split]]
    local = os.path.join(data_dir, name)
    for folder in (local, os.path.join(SYSTEM_DATASET_DIR, name)):
        if all(files_in(folder)):
            return folder, files_in(folder)
    if not download:
        raise DataError(f"{name} not found in {local} or {SYSTEM_DATASET_DIR}/{name}")
    for gz, md5 in zip(GZ_FILES, DATASETS[name]["md5"]):
        if not os.path.isfile(os.path.join(local, gz)) and not os.path.isfile(os.path.join(local, gz[:-3])):
            fetch(gz, DATASETS[name]["mirrors"], md5, local)
    return local, files_in(local)


def read_idx(path, ndim):
    """An IDX file of unsigned bytes (gzipped or not) as a numpy array, its magic number and length checked."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; EOFError: a truncated gzip
        raise DataError(f"cannot read {path}: {e}") from None
    if raw[:4] != bytes([0, 0, 8, ndim]):
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (bad magic number {raw[:4].hex()})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise DataError(f"{path} is truncated or too long: {len(raw)} bytes for a header of {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fetch(filename, mirrors, md5, folder, timeout=30):
    """Download into folder from the first mirror with the right MD5; a failed or wrong download leaves nothing."""
    failures = []
    for url in (mirror + filename for mirror in mirrors):
        print(f"downloading {url}", file=sys.stderr, flush=True)
        try:
            os.makedirs(folder, exist_ok=True)
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = response.read()  # at most 10 MB
            if hashlib.md5(body).hexdigest() != md5:
                raise ValueError(f"MD5 {hashlib.md5(body).hexdigest()}, expected {md5}")
            write_atomic(os.path.join(folder, filename), lambda f: f.write(body))
            return os.path.join(folder, filename)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError; IncompleteRead: cut
            failures.append(f"{url}: {getattr(e, 'reason', e)!s:.200}")
    raise DataError(f"could not download {filename} ({'; '.join(failures)}); put the file in {folder} yourself")


def load_data(name, data_dir, image_size, rank=0, split="train"):
    """load_dataset in every process, rank 0 first (it may download), or all stop with its one line. The test split
    (held-out figures) is None for a folder or if absent; it is never downloaded."""
    if split == "test" and name not in DATASETS:
        return None
    dataset, error = None, [None]
    try:
        dataset = load_dataset(name, data_dir, split, image_size, download=split == "train") if rank == 0 else None
    except DataError as e:
        error = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0] and split == "train":
        raise DataError(error[0])
    return None if error[0] else dataset or load_dataset(name, data_dir, split, image_size, download=False)


def load_folder(root, image_size):
    """One sub-folder per class (sorted names give the labels) or loose images as one class; each image's shorter side
    to image_size, then centre crop; 1 channel if every image is grayscale, else 3 (transparency onto white)."""
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    if classes:  # files beside the class folders are left out
        files = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
                 for f in sorted(os.listdir(os.path.join(root, c))) if not f.startswith(".")]
    else:
        classes, files = [os.path.basename(os.path.normpath(root))], [(os.path.join(root, f), 0) for f in entries]
    files = [(path, label) for path, label in files if os.path.isfile(path)]
    if not files:
        raise DataError(f"no images in {root}")
    pictures = []
    for path, _ in files:
        try:
            with Image.open(path) as img:
                img.draft("RGB", (image_size, image_size))  # JPEG: let the decoder downscale, much faster
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                    img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
                img = img.convert("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB")
                pictures.append(ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BICUBIC))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"not a readable image: {path} ({type(e).__name__})") from None
    mode = "L" if all(p.mode == "L" for p in pictures) else "RGB"
    images = np.stack([np.asarray(p.convert(mode)).reshape(image_size, image_size, len(mode)) for p in pictures])
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    cache_dir = os.path.join(root, ".cache")  # hidden, so the loader itself skips it next time
    return Dataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, classes, root, cache_dir)


class Batches:
    """Mini-batches sliced from the dataset kept once on the device as uint8 (no DataLoader): an epoch is a
    permutation fixed by (seed, epoch), for --resume, in batches differing by at most one image (no tiny last one)."""

    def __init__(self, dataset, batch_size, device, seed=0):
        self.images, self.labels = dataset.images.to(device), dataset.labels.to(device)
        self.num_batches, self.seed = max(1, round(len(self.images) / batch_size)), seed

    def __len__(self):
        return self.num_batches

    def epoch(self, epoch):
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        for index in order.to(self.images.device).tensor_split(self.num_batches):
            yield to_float(self.images[index]), self.labels[index]


def to_float(images):  # uint8 0..255 -> float32 in [-1, 1], the range of the generators' tanh
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images):  # float in [-1, 1] -> uint8, rounded as torchvision's save_image rounds
    return ((images.detach().float() + 1) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Images out, and every file a run writes: each through write_atomic, so no reader (or --resume) sees half a file

def grid_classes(num_classes, rows=10):
    """The class of each row of a conditional grid: every class up to rows of them, else rows classes spread evenly
    (Stacked MNIST's 1,000: 000, 100, ..., 900); one row, class 0, for an unconditional model."""
    return torch.arange(min(num_classes, rows) or 1) * max(num_classes // rows, 1)


def save_grid(images, path, nrow, padding=2):
    """[N, C, H, W] images (float in [-1, 1] or uint8) as one PNG, nrow images a row, on grey."""
    images = (images if images.dtype == torch.uint8 else to_uint8(images)).cpu().numpy()
    n, c, h, w = images.shape
    grid = np.full((padding + math.ceil(n / nrow) * (h + padding), padding + nrow * (w + padding), c), 128, np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = image.transpose(1, 2, 0)
    write_atomic(path, lambda f: Image.fromarray(grid.squeeze(2) if c == 1 else grid).save(f, format="PNG"))


def save_gif(png_paths, path, duration_ms=250, max_frames=50):
    """The PNG frames as a GIF, the last held longer; at most max_frames, evenly spaced (a long run's every epoch)."""
    if len(png_paths) > max_frames:
        png_paths = [png_paths[round(i * (len(png_paths) - 1) / (max_frames - 1))] for i in range(max_frames)]
    frames = [Image.open(p).convert("RGB") for p in png_paths]
    durations = [duration_ms] * (len(frames) - 1) + [duration_ms * 4]
    write_atomic(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                duration=durations, loop=0))


def plot_curves(series, path, width=640, height=400):
    """{name: [values]} against epochs 1..n as a PNG, drawn with PIL: a frame, value and epoch ticks, a legend."""
    left, right, top, bottom = 64, 16, 16, 44
    picture, font = Image.new("RGB", (width, height), "white"), ImageFont.load_default()
    draw = ImageDraw.Draw(picture)
    finite = [float(v) for values in series.values() for v in values if math.isfinite(float(v))] or [0.0]
    margin = 0.05 * (max(finite) - min(finite)) or 1.0
    lo, hi, n = min(finite) - margin, max(finite) + margin, max(map(len, series.values()), default=1)
    x_at = lambda i: left + (width - left - right) * i / max(n - 1, 1)  # noqa: E731
    y_at = lambda v: top + (height - top - bottom) * (hi - v) / (hi - lo)  # noqa: E731
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(6):  # value ticks on light grid lines, and epoch ticks
        value, i = lo + (hi - lo) * k / 5, round(k * (n - 1) / 5)
        draw.line([left - 4, y_at(value), width - right, y_at(value)], fill=(200, 200, 200))
        draw.text((4, y_at(value) - 6), f"{value:.3g}", fill="black", font=font)
        draw.text((x_at(i) - 6, height - bottom + 6), str(i + 1), fill="black", font=font)
    draw.text(((width - left) // 2 + left - 12, height - 16), "epoch", fill="black", font=font)
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    for k, ((name, values), color) in enumerate(zip(series.items(), colors)):
        points = [(x_at(i), y_at(float(v))) for i, v in enumerate(values) if math.isfinite(float(v))]
        draw.line(points + points[-1:] * (len(points) == 1), fill=color, width=3)  # one epoch: a dot
        draw.line([width - 136, top + 12 + 14 * k, width - 116, top + 12 + 14 * k], fill=color, width=2)  # legend
        draw.text((width - 110, top + 6 + 14 * k), name, fill="black", font=font)
    write_atomic(path, lambda f: picture.save(f, format="PNG"))


def write_atomic(path, write, mode="wb"):
    """write(f) fills a temporary file, fsynced then renamed over path: on any failure path is as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so not even a power cut leaves a torn file
        os.replace(tmp, path)
    except Exception as e:  # an interrupt inside torch.save surfaces as its zip writer's RuntimeError: re-raise it
        interrupt = e.__context__
        while interrupt is not None and not isinstance(interrupt, KeyboardInterrupt):
            interrupt = interrupt.__context__
        raise interrupt or e from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_locks = {}  # out -> the open lock file, held until the process ends


def prepare_out(out):
    """Create the run's folder and lock it (OUT/.lock, held until the process ends): a second run stops in one line."""
    try:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        lock = _locks.get(os.path.abspath(out)) or open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        raise DataError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise DataError(f"--out {out}: another run is writing there; wait for it or pick another --out") from None
    _locks[os.path.abspath(out)] = lock


def read_checkpoint(out):
    """OUT/checkpoint.pt (weights_only) with its "path" added; whether it is this script's own is the script's call."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        raise DataError(f"no checkpoint at {path}: train first (or pass the run's --out)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise DataError(f"cannot load {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if not isinstance(checkpoint, dict) or "generator" not in checkpoint or "args" not in checkpoint:
        raise DataError(f"{path} is not a checkpoint written by a training script")
    return {**checkpoint, "path": path}


def resume(checkpoint, parts, device):
    """Load the parts (checkpoint key -> module, optimizer...) and random states; returns (epoch, metrics so far)."""
    for key, part in parts.items():
        try:
            part.load_state_dict(checkpoint[key])
        except (RuntimeError, ValueError, KeyError) as e:  # wrong shapes or names: the file is not this model's
            raise DataError(f"{checkpoint['path']}: the {key.replace('_', ' ')} does not fit this model "
                            f"({str(e).splitlines()[0][:120]})") from None
    torch.set_rng_state(checkpoint["rng"])
    if device.type == "cuda" and "cuda_rng" in checkpoint:  # rank 0's; the others re-seed every epoch
        torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
    return checkpoint["epoch"], list(checkpoint["history"])


def random_states(device):  # for --resume to draw the same noise: the CPU's random state and, on CUDA, the GPU's
    return {"rng": torch.get_rng_state(), **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda"
                                             else {})}


def save_epoch(out, epoch, history, curves, grid, checkpoint, pictures=()):
    """An epoch's files, checkpoint last: metrics.csv (history: a dict per epoch), losses.png (the curves columns),
    samples/epoch_NNN.png (grid), the (file name, images) pictures, progress.gif, checkpoint.pt (the dict)."""
    def write_metrics(f):
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in history for k in row)), restval="")
        writer.writeheader()
        writer.writerows(history)
    try:
        write_atomic(os.path.join(out, "metrics.csv"), write_metrics, mode="w")
        plot_curves({k: [row[k] for row in history] for k in curves}, os.path.join(out, "losses.png"))
        for name, images in [(os.path.join("samples", f"epoch_{epoch:03d}.png"), grid), *pictures]:
            save_grid(images, os.path.join(out, name), nrow=10)
        frames = sorted(f for f in os.listdir(os.path.join(out, "samples")) if f.endswith(".png"))
        save_gif([os.path.join(out, "samples", f) for f in frames], os.path.join(out, "progress.gif"))
        write_atomic(os.path.join(out, "checkpoint.pt"), lambda f: torch.save(checkpoint, f))
    except OSError as e:  # a full disk: the previous checkpoint stays whole
        raise DataError(f"cannot write epoch {epoch}'s files into {out} ({e.strerror or e}); "
                        f"checkpoint.pt still holds epoch {epoch - 1}") from None


def save_samples(out, images, labels=None):
    """--generate's OUT/samples.npz (images uint8 [N, H, W, C], labels if given) and OUT/samples.png (the first 100)."""
    path = os.path.join(out, "samples.npz")
    arrays = {"images": images.permute(0, 2, 3, 1).numpy(), **({} if labels is None else {"labels": labels.numpy()})}
    try:
        write_atomic(path, lambda f: np.savez(f, **arrays))
        save_grid(images[:100], os.path.join(out, "samples.png"), nrow=10)
    except OSError as e:
        raise DataError(f"cannot write the samples into {out} ({e.strerror or e})") from None
    print(f"wrote {len(images)} images to {path} and a grid to {os.path.join(out, 'samples.png')}")


# ----------------------------------------------------------------------------------------------------------------
# Differentiable augmentation (--augment): with a few thousand images D memorises them and G's signal collapses.
# Augmenting every image D sees, real and fake, in both updates, stops that; G learns through the operations.
# DiffAugment (Zhao et al. 2020, arXiv:2006.10738) applies them always, ADA (Karras et al. 2020, arXiv:2006.06676)
# with a probability p it tunes. Draws come from torch's global generator: a seed and --resume repeat them.

def brightness(images):  # + one offset in [-0.5, 0.5) per image
    return images + (torch.rand_like(images[:, :1, :1, :1]) - 0.5)


def saturation(images):  # each pixel's distance from its grey scaled by a factor in [0, 2); grayscale unchanged
    mean = images.mean(dim=1, keepdim=True)
    return images if images.shape[1] == 1 else (images - mean) * (torch.rand_like(images[:, :1, :1, :1]) * 2) + mean


def contrast(images):  # each image's distance from its mean scaled by a factor in [0.5, 1.5)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * (torch.rand_like(images[:, :1, :1, :1]) + 0.5) + mean


def translate(images):
    """Shift each image by its own whole-pixel (dy, dx) in [-S/8, S/8], zeros where it uncovers: one gather."""
    b, _, h, w = images.shape
    limit_y, limit_x = int(h / 8 + 0.5), int(w / 8 + 0.5)
    shift_y = torch.randint(-limit_y, limit_y + 1, (b, 1, 1), device=images.device)
    shift_x = torch.randint(-limit_x, limit_x + 1, (b, 1, 1), device=images.device)
    padded = F.pad(images, [limit_x, limit_x, limit_y, limit_y])
    rows = torch.arange(h, device=images.device).view(1, h, 1) - shift_y + limit_y  # (B, H, 1) into padded
    cols = torch.arange(w, device=images.device).view(1, 1, w) - shift_x + limit_x  # (B, 1, W)
    batch = torch.arange(b, device=images.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def cutout(images):
    """Zero a square of half the side per image, centred anywhere (clipped at the border), as DiffAugment does."""
    b, _, h, w = images.shape
    size_y, size_x = int(h / 2 + 0.5), int(w / 2 + 0.5)
    top = torch.randint(0, h, (b, 1, 1), device=images.device) - size_y // 2
    left = torch.randint(0, w, (b, 1, 1), device=images.device) - size_x // 2
    rows, cols = torch.arange(h, device=images.device).view(1, h, 1), torch.arange(w, device=images.device)
    inside = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)  # (B, H, W)
    return images * (~inside).unsqueeze(1).to(images.dtype)


AUGMENTATIONS = {"color": (brightness, saturation, contrast), "translation": (translate,), "cutout": (cutout,)}
# ADA moves p by (images since the last update) / ADA_SPEED_IMAGES every ADA_INTERVAL steps of D: from 0 to 1 in
# 20,000 images, a third of a Fashion-MNIST epoch (the paper's 500,000 is more than a whole CPU run sees).
ADA_SPEED_IMAGES, ADA_INTERVAL = 20_000, 4


class Augmentation:
    """Called on every batch D sees. diffaug: p = 1. ada: r_t = E[sign(D(reals))] over ADA_INTERVAL D steps is near
    0 while D cannot tell reals from fakes, near 1 once it has memorised them; p rises while r_t > target. The sums
    are all-reduced under torchrun and stay on the device: no sync a step."""

    def __init__(self, policy, device, target=None):
        self.policy, self.target = tuple(policy), target
        self.p = torch.tensor(1.0 if target is None else 0.0, device=device)
        self.sign_sum, self.count, self.steps = torch.zeros((), device=device), torch.zeros((), device=device), 0

    def __call__(self, images, policy=None):  # policy: a part of this run's, where given
        for name in self.policy if policy is None else policy:
            for operation in AUGMENTATIONS[name]:
                if self.target is None:  # DiffAugment: every image, no coin drawn
                    images = operation(images)
                else:  # each image with probability p, a 0-d device tensor: no device-to-host sync
                    chosen = torch.rand(len(images), 1, 1, 1, device=images.device) < self.p
                    images = torch.where(chosen, operation(images), images)
        return images

    def observe(self, real_outputs):
        """After a D step: D's outputs on the augmented reals, minus the value above which D calls an image real."""
        if self.target is None:
            return
        self.sign_sum += real_outputs.detach().float().sign().sum()
        self.count += real_outputs.numel()
        self.steps += 1
        if self.steps == ADA_INTERVAL:
            totals = torch.stack([self.sign_sum, self.count])
            if dist.is_initialized():
                dist.all_reduce(totals)
            step = torch.sign(totals[0] / totals[1].clamp(min=1) - self.target) * totals[1] / ADA_SPEED_IMAGES
            self.p = (self.p + step).clamp(0.0, 1.0)
            self.sign_sum, self.count, self.steps = torch.zeros_like(self.p), torch.zeros_like(self.p), 0

    def state_dict(self):  # copies: the sums grow in place
        return {"p": self.p.cpu().clone(), "sign_sum": self.sign_sum.cpu().clone(), "count": self.count.cpu().clone(),
                "steps": self.steps}

    def load_state_dict(self, state):
        self.p, self.sign_sum, self.count = (state[k].to(self.p.device).clone() for k in ("p", "sign_sum", "count"))
        self.steps = int(state["steps"])


def make_augmentation(kind, channels, device, target=0.6):
    """--augment none/diffaug/ada -> None (nothing drawn) or an Augmentation (no colour on grayscale)."""
    policy = ("color", "translation", "cutout") if channels == 3 else ("translation", "cutout")
    return None if kind == "none" else Augmentation(policy, device, target if kind == "ada" else None)
