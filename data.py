"""Pixels in and out for every script: datasets, device batches, image grids, GIFs and loss plots.

    import data
    ds = data.load_dataset("mnist", data_dir="data")         # ds.images uint8 [N, 1, 28, 28], ds.labels int64 [N]
    ds = data.load_dataset("faces/", image_size=64)           # one sub-folder per class, or loose images
    batches = data.Batches(ds, batch_size=64, device="cuda", seed=0)
    for real, labels in batches.epoch(0): ...                # real: float [B, C, H, W] in [-1, 1] on the device

Named datasets are looked for in DATA_DIR/<name>/, then in Debian's /usr/share/datasets/<name>/, and are
otherwise downloaded into DATA_DIR/<name>/ (every file checked against its published MD5 before it is kept).

Every file a run writes goes through write_atomic, and the files that every script writes the same way are here:
the output-folder check (prepare_out), checkpoints (save_checkpoint, read_checkpoint), metrics.csv, the files of
one epoch (save_epoch) and samples.npz (save_samples). Which script a checkpoint belongs to is the script's call.
Differentiable augmentation of device batches (augment, Augmentation: the scripts' --augment diffaug / ada) is
here too, so that it is written once for every script whose D sees images.
Bad input or an unusable output folder raises DataError with a one-line message naming the file; the scripts turn
it into exit status 2.
"""
import csv
import fcntl
import gzip
import hashlib
import http.client
import math
import os
import sys
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError


class DataError(Exception):
    """Bad input (missing, corrupt or unreadable data) or an output folder that takes no files. The message is one
    line that names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Named datasets: the four standard IDX files each, with the MD5 of the published gzip file

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DATASETS = {
    "mnist": {
        "mirrors": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",  # first: yann.lecun.com often answers 403
            "http://yann.lecun.com/exdb/mnist/",
        ],
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "classes": [str(digit) for digit in range(10)],
    },
    "fashion-mnist": {
        "mirrors": [
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        ],
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    },
}
SYSTEM_DATASET_DIR = "/usr/share/datasets"  # where Debian's dataset-mnist / dataset-fashion-mnist put the files
IMAGE_EXTENSIONS = {".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}


@dataclass
class Dataset:
    images: torch.Tensor  # uint8 [N, C, H, W], 0..255, on the CPU
    labels: torch.Tensor  # int64 [N]
    classes: list = field(default_factory=list)  # classes[label] is the class name
    source: str = ""  # the folder the data came from
    cache_dir: str = ""  # a writable folder next to the data, for derived files such as FID statistics

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])


def load_dataset(name, data_dir="data", split="train", image_size=None, channels=None, download=True):
    """A named dataset ('mnist', 'fashion-mnist') or a path to a folder of images, as one uint8 tensor.

    image_size: side of the square images to return (None keeps 28x28 for the named datasets; required for folders).
    channels: 1 or 3 to force grayscale or RGB; None keeps the data's own (1 for MNIST, a folder decides by content).
    """
    if name in DATASETS:
        folder = find_idx_folder(name, data_dir, split, download)
        images_file, labels_file = (idx_path(folder, stem) for stem in IDX_FILES[split])
        images = read_idx(images_file, ndim=3)
        labels = read_idx(labels_file, ndim=1)
        if len(images) != len(labels):
            raise DataError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels")
        cache_dir = folder if os.access(folder, os.W_OK) else os.path.join(data_dir, name)  # /usr/share: read-only
        dataset = Dataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                          list(DATASETS[name]["classes"]), folder, cache_dir)
        if labels.max() >= dataset.num_classes:
            raise DataError(f"{labels_file} has label {labels.max()}, expected 0..{dataset.num_classes - 1}")
    elif os.path.isdir(name):
        if image_size is None:
            raise DataError(f"an image folder needs an image size ({name})")
        try:
            return load_folder(name, image_size, channels)
        except OSError as e:  # a folder we may not list; unreadable files are caught per image
            raise DataError(f"cannot read {e.filename or name}: {e.strerror or e}") from None
    elif os.sep in name or os.path.exists(name):
        raise DataError(f"no folder of images at {name}")
    else:
        raise DataError(f"unknown dataset '{name}': use mnist, fashion-mnist or a folder of images")
    if channels == 3:
        dataset.images = dataset.images.expand(-1, 3, -1, -1).contiguous()
    if image_size is not None and image_size != dataset.images.shape[-1]:
        dataset.images = resize_images(dataset.images, image_size)
    return dataset


def resize_images(images, size):
    """Resize a uint8 [N, C, h, w] batch of square images to [N, C, size, size] (antialiased bilinear)."""
    resized = []
    for chunk in images.split(4096):  # bounded memory for the float copy
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        resized.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(resized)


def idx_path(folder, stem):
    """The IDX file `stem` in folder, plain or gzipped (None if neither is there)."""
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def find_idx_folder(name, data_dir, split, download):
    """DATA_DIR/<name>, then /usr/share/datasets/<name>, else download into DATA_DIR/<name>."""
    local = os.path.join(data_dir, name)
    for folder in (local, os.path.join(SYSTEM_DATASET_DIR, name)):
        if all(idx_path(folder, stem) for stem in IDX_FILES[split]):
            return folder
    if not download:
        raise DataError(f"{name} not found in {local} or {SYSTEM_DATASET_DIR}/{name}")
    info = DATASETS[name]
    for stem in IDX_FILES["train"] + IDX_FILES["test"]:  # both splits: the test split is small and gives held-out data
        if idx_path(local, stem) is None:
            fetch(stem + ".gz", info["mirrors"], info["md5"][stem + ".gz"], local)
    return local


def read_idx(path, ndim):
    """Parse an IDX file of unsigned bytes (gzipped or not), checking magic number, dimensions and length."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # BadGzipFile is an OSError; EOFError = truncated gzip
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (bad magic number {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header cut short)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: {len(raw)} bytes, header {dims} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def fetch(filename, mirrors, md5, folder, timeout=30):
    """Download `filename` from the first mirror that serves it with the right MD5, into folder/filename.

    The bytes go to a temporary file beside the target and are renamed only once the MD5 matches, so a failed,
    partial or wrong download never leaves a file behind."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {folder} to download {filename} into: {e.strerror or e}") from None
    target = os.path.join(folder, filename)
    failures = []
    for mirror in mirrors:
        url = mirror + filename
        fd, partial = tempfile.mkstemp(prefix=filename + ".", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                digest = copy_with_progress(response, out, filename)
            if digest != md5:
                failures.append(f"{url}: MD5 {digest}, expected {md5}")
                continue
            os.replace(partial, target)
            return target
        except (OSError, http.client.HTTPException) as e:  # URLError is an OSError; IncompleteRead: a cut-off
            failures.append(f"{url}: {getattr(e, 'reason', e)!s:.200}")
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    raise DataError(f"could not download {filename} ({'; '.join(failures)}); "
                    f"put the file in {folder} yourself to work offline")


def copy_with_progress(response, out, filename, chunk_size=1 << 16):
    """Stream response into out, showing progress on stderr for large files; returns the MD5 hex digest."""
    total = int(response.headers.get("Content-Length") or 0)
    show = total > (1 << 20) and sys.stderr.isatty()
    md5, done = hashlib.md5(), 0
    while chunk := response.read(chunk_size):
        out.write(chunk)
        md5.update(chunk)
        done += len(chunk)
        if show:
            print(f"\rdownloading {filename}: {100 * done // total:3d}% of {total / 1e6:.1f} MB",
                  end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    return md5.hexdigest()


def load_data(name, data_dir, image_size, rank=0, split="train"):
    """load_dataset in every process of a run. Rank 0 goes first (it may download) and passes on its error, if any,
    so that the others stop with the same one line instead of waiting. The test split is optional: None if absent,
    and never downloaded (it only adds held-out figures)."""
    if split == "test" and name not in DATASETS:
        return None  # a folder has no held-out split
    def load():
        return load_dataset(name, data_dir, split=split, image_size=image_size, download=split == "train")

    dataset, error = None, None
    if rank == 0:
        try:
            dataset = load()
        except DataError as e:
            error = str(e)
    if dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        if split == "test":
            return None
        raise DataError(error)
    return dataset if dataset is not None else load()


# ----------------------------------------------------------------------------------------------------------------
# A folder of images

def load_folder(root, image_size, channels=None):
    """One sub-folder per class (names sorted give the labels), or loose images as a single class.

    Every file is decoded once, resized (shorter side to image_size, then centre crop) and kept as uint8.
    Hidden files (.DS_Store, ...) are skipped; any other file PIL cannot read is an error naming it.
    channels=None picks 1 if every image is grayscale, else 3. RGBA is composited onto white."""
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    if classes:
        files = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
                 for f in sorted(os.listdir(os.path.join(root, c))) if not f.startswith(".")]
        loose = [e for e in entries if e not in classes]
        if loose:
            print(f"warning: {root}: ignoring {len(loose)} file(s) beside the class folders, e.g. {loose[0]}",
                  file=sys.stderr)
    else:
        classes = [os.path.basename(os.path.normpath(root))]
        files = [(os.path.join(root, f), 0) for f in entries]
    files = [(path, label) for path, label in files if os.path.isfile(path)]
    if not files:
        raise DataError(f"no images in {root}")
    pictures = [open_image(path, image_size) for path, _ in files]
    if channels is None:
        channels = 1 if all(p.mode == "L" for p in pictures) else 3
    mode = "L" if channels == 1 else "RGB"
    images = np.stack([np.asarray(p.convert(mode)).reshape(image_size, image_size, channels) for p in pictures])
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    cache_dir = os.path.join(root, ".cache")  # hidden, so the loader itself skips it next time
    return Dataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, classes, root, cache_dir)


def open_image(path, image_size):
    """Decode one image to mode L or RGB at image_size x image_size."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (image_size, image_size))  # JPEG: let the decoder downscale, much faster
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            elif img.mode not in ("L", "RGB"):
                img = img.convert("L" if img.mode in ("1", "I", "I;16", "F") else "RGB")
            return ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"not a readable image: {path} ({type(e).__name__})") from None


# ----------------------------------------------------------------------------------------------------------------
# Batches on the device

class Batches:
    """Shuffled mini-batches sliced from the whole dataset, kept once on the device as uint8.

    Each epoch is one random permutation split into len(self) nearly equal batches (sizes differ by at most one),
    so every image is seen exactly once per epoch and no batch is a tiny leftover (BatchNorm dislikes those).
    The permutation depends only on (seed, epoch), which makes a resumed run draw the same batches."""

    def __init__(self, dataset, batch_size, device, seed=0):
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.num_batches = max(1, round(len(self.images) / batch_size))
        self.seed = seed

    def __len__(self):
        return self.num_batches

    def epoch(self, epoch):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.images), generator=generator).to(self.images.device)
        for index in order.tensor_split(self.num_batches):
            yield to_float(self.images[index]), self.labels[index]


def to_float(images):
    """uint8 0..255 -> float32 in [-1, 1], the range the generators' tanh produces."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images):
    """Float images in [-1, 1] -> uint8 0..255, rounded exactly as saving a PNG with torchvision would."""
    return ((images.detach().float() + 1) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Image output

def make_grid(images, nrow, padding=2, pad_value=128):
    """[N, C, H, W] images (float in [-1, 1] or uint8) -> one uint8 array [rows, cols, C], nrow images per row."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    images = images.cpu().numpy()
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = np.full((padding + rows * (h + padding), padding + nrow * (w + padding), c), pad_value, np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = image.transpose(1, 2, 0)
    return grid


def save_grid(images, path, nrow, scale=1):
    """Save images as a PNG grid (rows of nrow); scale > 1 enlarges it with crisp pixels."""
    grid = make_grid(images, nrow)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    save_atomic(picture, path, "PNG")


GIF_FRAMES = 50  # at most: a run of hundreds of short epochs (a small dataset) would re-encode them all each epoch


def save_gif(png_paths, path, duration_ms=250, max_frames=GIF_FRAMES):
    """An animated GIF from PNG frames (the per-epoch grids), the last frame held a little longer. Longer runs show
    max_frames of them, evenly spaced from the first to the last."""
    if len(png_paths) > max_frames:
        png_paths = [png_paths[round(i * (len(png_paths) - 1) / (max_frames - 1))] for i in range(max_frames)]
    frames = [Image.open(p).convert("RGB") for p in png_paths]
    if not frames:
        return
    durations = [duration_ms] * (len(frames) - 1) + [duration_ms * 4]
    save_atomic(frames[0], path, "GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)


def save_atomic(picture, path, fmt, **options):
    """Write a PIL image through write_atomic."""
    write_atomic(path, lambda f: picture.save(f, format=fmt, **options))


COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def plot_curves(series, path, xlabel="epoch", size=(640, 400)):
    """Line plot of {name: [values...]} against 1..len with PIL: axes, ticks with values, a legend."""
    series = {name: [float(v) for v in values] for name, values in series.items() if len(values)}
    if not series:
        return
    width, height = size
    left, right, top, bottom = 64, 16, 16, 44
    font = ImageFont.load_default()
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    finite = [v for values in series.values() for v in values if math.isfinite(v)] or [0.0]
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    margin = 0.05 * (hi - lo)
    lo, hi = lo - margin, hi + margin
    n = max(len(values) for values in series.values())

    def xy(i, v):
        x = left + (width - left - right) * (i / max(n - 1, 1))
        y = top + (height - top - bottom) * (hi - v) / (hi - lo)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(6):  # y ticks with values and light grid lines
        v = lo + (hi - lo) * k / 5
        _, y = xy(0, v)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{v:.3g}", fill="black", font=font)
    for k in range(min(n, 8)):  # x ticks at whole epochs
        i = round(k * (n - 1) / max(min(n, 8) - 1, 1))
        x, _ = xy(i, lo)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 6, height - bottom + 6), str(i + 1), fill="black", font=font)
    draw.text(((width - left) // 2 + left - 12, height - 16), xlabel, fill="black", font=font)
    for (name, values), color in zip(series.items(), COLORS):
        points = [xy(i, v) for i, v in enumerate(values) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points if len(points) < 40 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    for k, (name, color) in enumerate(zip(series, COLORS)):  # legend, top right
        y = top + 6 + 14 * k
        draw.line([width - right - 120, y + 6, width - right - 100, y + 6], fill=color, width=2)
        draw.text((width - right - 94, y), name, fill="black", font=font)
    save_atomic(picture, path, "PNG")


# ----------------------------------------------------------------------------------------------------------------
# Files a run writes, each through write_atomic: a reader, or a resumed run, never sees half a file

def write_atomic(path, write, mode="wb"):
    """Write path by way of a temporary file beside it: write(f) fills the open file, which is flushed and fsynced,
    then renamed over path. On any failure (a full disk, Ctrl-C, SIGTERM) the temporary file is removed and path is
    as it was; only kill -9 or a power cut can leave the temporary behind, never a torn path."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so not even a power cut leaves a torn file
        os.replace(tmp, path)  # atomic: the old file or the new one, whole
    except Exception as e:
        # Ctrl-C or SIGTERM inside torch.save: its zip writer, closing, raises "unexpected pos" over the interrupt.
        # The interrupt is what happened; raise it, so that the script stops with 130/143 and its one line.
        interrupt = e.__context__
        while interrupt is not None and not isinstance(interrupt, KeyboardInterrupt):
            interrupt = interrupt.__context__
        if interrupt is not None:
            raise interrupt from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_locks = {}  # out -> the open lock file, held until the process ends


def prepare_out(out):
    """Create the run's folder, check that it takes files and lock it (OUT/.lock): a second run started into the same
    folder stops with one line instead of writing there too. The lock goes with the process, however it ends."""
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


def save_checkpoint(path, state):
    write_atomic(path, lambda f: torch.save(state, f))


def read_checkpoint(out):
    """OUT/checkpoint.pt as a dict (on the CPU, weights_only), with its "path" added; DataError if it is missing,
    unreadable or no training script's. Whether it is this script's own is for the script to decide."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        raise DataError(f"no checkpoint at {path}: train first (or pass the run's --out)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: torch raises several types, all mean "not a checkpoint of ours"
        raise DataError(f"cannot load {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if not isinstance(checkpoint, dict) or "generator" not in checkpoint or "args" not in checkpoint:
        raise DataError(f"{path} is not a checkpoint written by a training script")
    checkpoint["path"] = path
    return checkpoint


def restore(module, state, checkpoint, what):
    """module.load_state_dict(state), or one line saying that the checkpoint's `what` does not fit the model."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:  # wrong shapes or names: the file is not this model's
        raise DataError(f"{checkpoint['path']}: the {what} does not fit this model ({str(e).splitlines()[0][:120]})"
                        ) from None


def resume(checkpoint, parts, device):
    """Continue a run: every part (checkpoint key -> module or optimizer) and the random states saved by
    random_states; returns the epoch the checkpoint holds and the run's metrics so far (its "history")."""
    for key, part in parts.items():
        restore(part, checkpoint[key], checkpoint, key.replace("_", " "))
    torch.set_rng_state(checkpoint["rng"])
    if device.type == "cuda" and "cuda_rng" in checkpoint:  # rank 0's; the others re-seed every epoch
        torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
    return checkpoint["epoch"], list(checkpoint["history"])


def random_states(device):
    """What a checkpoint needs for --resume to draw the same noise: the CPU's random state and, training on a GPU,
    that GPU's (only the CPU's was saved before, so a resumed CUDA run replayed epoch 1's noise)."""
    states = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def write_metrics(path, rows):
    """metrics.csv: a header from the rows' keys in the order they first appear, then one row per dict."""
    def write(f):
        columns = list(dict.fromkeys(key for row in rows for key in row))  # a resumed run may add a column
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    write_atomic(path, write, mode="w")


def read_metrics(path, up_to_epoch):
    """The rows of metrics.csv up to an epoch (a resumed run continues them); [] if there is no file."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["epoch"]) <= up_to_epoch]


def save_epoch(out, epoch, history, curves, grid, checkpoint, pictures=()):
    """Everything an epoch leaves in out, checkpoint last: metrics.csv (history: one dict per epoch), losses.png (the
    columns named in curves), samples/epoch_NNN.png (grid: [N, C, H, W] images, 10 a row), progress.gif, then
    checkpoint.pt. pictures: more (file name, images) grids, replaced each epoch. A full disk or a vanished folder
    is one DataError; the previous epoch's checkpoint stays intact, since the new one replaces it only when whole."""
    try:
        write_metrics(os.path.join(out, "metrics.csv"), history)
        plot_curves({k: [float(row[k]) for row in history] for k in curves}, os.path.join(out, "losses.png"))
        save_grid(grid, os.path.join(out, "samples", f"epoch_{epoch:03d}.png"), nrow=10)
        for name, images in pictures:
            save_grid(images, os.path.join(out, name), nrow=10)
        frames = sorted(f for f in os.listdir(os.path.join(out, "samples")) if f.endswith(".png"))
        save_gif([os.path.join(out, "samples", f) for f in frames], os.path.join(out, "progress.gif"))
        save_checkpoint(os.path.join(out, "checkpoint.pt"), checkpoint)
    except OSError as e:
        raise DataError(f"cannot write epoch {epoch}'s files into {out} ({e.strerror or e}); "
                        f"checkpoint.pt still holds epoch {epoch - 1}") from None


def save_samples(out, images, labels=None):
    """--generate's files: OUT/samples.npz (key images, uint8 [N, H, W, C]; labels, int64 [N], if given) and a grid
    of the first 100 in OUT/samples.png. images: uint8 [N, C, H, W]."""
    path = os.path.join(out, "samples.npz")
    arrays = {"images": images.permute(0, 2, 3, 1).numpy(), **({} if labels is None else {"labels": labels.numpy()})}
    try:
        write_atomic(path, lambda f: np.savez(f, **arrays))
        save_grid(images[:100], os.path.join(out, "samples.png"), nrow=10)
    except OSError as e:
        raise DataError(f"cannot write the samples into {out} ({e.strerror or e})") from None
    print(f"wrote {len(images)} images to {path} and a grid to {os.path.join(out, 'samples.png')}")


# ----------------------------------------------------------------------------------------------------------------
# Differentiable augmentation of device batches (--augment), written once here for every script whose D sees
# images. With a few hundred to a few thousand images D memorises the training set and G's signal collapses;
# augmenting every image D sees, real and fake alike, in D's step and in G's, keeps D from memorising while G still
# learns the un-augmented distribution, because the operations are applied to both sides and are differentiable
# (G's gradients pass through them). DiffAugment (Zhao et al. 2020, arXiv:2006.10738) applies them to every image
# (p = 1); ADA (Karras et al. 2020, arXiv:2006.06676) applies each with a probability p that AdaptiveAugment tunes.
# Every random draw comes from torch's global random number generator of the images' device, so a seeded run is
# repeatable and --resume continues the same stream.

def brightness(images):
    """Add one random offset in [-0.5, 0.5) to each image (DiffAugment's rand_brightness, [-1, 1] pixels)."""
    return images + (torch.rand(len(images), 1, 1, 1, device=images.device, dtype=images.dtype) - 0.5)


def saturation(images):
    """Scale each pixel's distance from its own channel mean by one factor in [0, 2) per image (grey to vivid).
    A no-op on one channel, where every pixel is its own channel mean."""
    if images.shape[1] == 1:
        return images
    mean = images.mean(dim=1, keepdim=True)
    return (images - mean) * (torch.rand(len(images), 1, 1, 1, device=images.device, dtype=images.dtype) * 2) + mean


def contrast(images):
    """Scale each image's distance from its own mean pixel value by one factor in [0.5, 1.5)."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * (torch.rand(len(images), 1, 1, 1, device=images.device, dtype=images.dtype) + 0.5) + mean


def translation_limit(size):
    """The largest shift, in pixels, of an image side of `size`: 1/8 of it, rounded."""
    return int(size / 8 + 0.5)


def translate(images):
    """Shift each image by its own whole-pixel offset (dy, dx), each in [-S/8, S/8], filling with zeros what the
    shift uncovers: out[y, x] = in[y - dy, x - dx]. One gather for the batch (indexing is differentiable)."""
    b, _, h, w = images.shape
    limit_y, limit_x = translation_limit(h), translation_limit(w)
    shift_y = torch.randint(-limit_y, limit_y + 1, (b, 1, 1), device=images.device)
    shift_x = torch.randint(-limit_x, limit_x + 1, (b, 1, 1), device=images.device)
    padded = F.pad(images, [limit_x, limit_x, limit_y, limit_y])  # zeros around every image
    rows = torch.arange(h, device=images.device).view(1, h, 1) - shift_y + limit_y  # (B, H, 1) into padded
    cols = torch.arange(w, device=images.device).view(1, 1, w) - shift_x + limit_x  # (B, 1, W)
    batch = torch.arange(b, device=images.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def cutout_size(size):
    """The side of cutout's square for an image side of `size`: half of it, rounded."""
    return int(size / 2 + 0.5)


def cutout(images):
    """Zero one square of half the side per image, centred anywhere in the image (clipped at its border), as
    DiffAugment does: the pixels of [cy - s/2, cy + s/2) x [cx - s/2, cx + s/2)."""
    b, _, h, w = images.shape
    size_y, size_x = cutout_size(h), cutout_size(w)
    top = torch.randint(0, h, (b, 1, 1), device=images.device) - size_y // 2
    left = torch.randint(0, w, (b, 1, 1), device=images.device) - size_x // 2
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)  # (B, H, W)
    return images * (~inside).unsqueeze(1).to(images.dtype)


AUGMENTATIONS = {"color": (brightness, saturation, contrast), "translation": (translate,), "cutout": (cutout,)}


def default_policy(channels):
    """Every augmentation for colour images; translation and cutout for grayscale ones, where colour would be
    brightness and contrast only (ask for it with --augment-policy)."""
    return ("color", "translation", "cutout") if channels == 3 else ("translation", "cutout")


def augment(images, policy, p=1.0):
    """images: float (B, C, H, W) in [-1, 1] on any device; policy: names from AUGMENTATIONS, applied in that order.
    Each operation (brightness, saturation and contrast count as three) is applied to each image with probability
    p, with its own random parameters per image. p = 1 (a float) is DiffAugment and draws no coin; p may be a
    0-d tensor on the device (ADA's), which keeps the step free of device-to-host syncs."""
    for name in policy:
        for operation in AUGMENTATIONS[name]:
            if isinstance(p, float) and p >= 1:
                images = operation(images)
            else:
                chosen = torch.rand(len(images), 1, 1, 1, device=images.device) < p
                images = torch.where(chosen, operation(images), images)
    return images


# ADA moves p by (images since the last update) / ADA_SPEED_IMAGES every ADA_INTERVAL steps of D: p can go from
# 0 to 1 in 20,000 images. The paper's 500,000 images is more than a whole CPU run here sees (dcgan.py's default
# run is 5 epochs of 60,000); 20,000 is a third of one epoch of Fashion-MNIST, yet one update, whose r_t comes from
# only 256 images at batch 64, moves p by 0.013 at most.
ADA_SPEED_IMAGES = 20_000
ADA_INTERVAL = 4


class Augmentation:
    """--augment diffaug (p = 1 always) or ada (p adapted; target given): call it on any batch D is about to see.

    ADA's overfitting signal is r_t = E[sign(D's outputs on the training reals)], accumulated by observe() over
    ADA_INTERVAL steps of D: near 0 while D cannot tell training images from fakes, near 1 once it has memorised
    them. p goes up while r_t is above the target, down while below, clamped to [0, 1]. Under torchrun the signs
    and counts are summed over the processes, so every process holds the same p. p and the accumulators are
    tensors on the device (no sync per step) and go into the checkpoint (state_dict), so --resume is exact."""

    def __init__(self, policy, device, target=None, speed_images=None, interval=ADA_INTERVAL):
        self.policy, self.target, self.interval = tuple(policy), target, interval
        self.speed_images = speed_images or ADA_SPEED_IMAGES
        self.adaptive = target is not None
        self.p = torch.tensor(0.0 if self.adaptive else 1.0, device=device)
        self.sign_sum = torch.zeros((), device=device)  # sum of sign(D(x)) over the reals since the last update
        self.count = torch.zeros((), device=device)  # images (over all processes after an update's all-reduce)
        self.steps = 0  # D steps since the last update

    def __call__(self, images, policy=None):
        """images augmented by this run's policy, or by `policy` (a part of it) where given."""
        return augment(images, self.policy if policy is None else policy, self.p if self.adaptive else 1.0)

    def observe(self, real_outputs):
        """After one D step: real_outputs are D's outputs on the (augmented) training reals, minus the value above
        which D calls an image real. Every `interval` calls, p moves."""
        if not self.adaptive:
            return
        outputs = real_outputs.detach().float()
        self.sign_sum += outputs.sign().sum()
        self.count += outputs.numel()
        self.steps += 1
        if self.steps % self.interval == 0:
            self.update()

    def update(self):
        totals = torch.stack([self.sign_sum, self.count])
        if dist.is_initialized():
            dist.all_reduce(totals)
        sign_sum, count = totals
        step = torch.sign(sign_sum / count.clamp(min=1) - self.target) * count / self.speed_images
        self.p = (self.p + step).clamp(0.0, 1.0)
        self.sign_sum, self.count, self.steps = torch.zeros_like(self.sign_sum), torch.zeros_like(self.count), 0

    def state_dict(self):
        return {"p": self.p.detach().cpu().clone(), "sign_sum": self.sign_sum.cpu().clone(),
                "count": self.count.cpu().clone(), "steps": self.steps}  # copies: the accumulators grow in place

    def load_state_dict(self, state):
        device = self.p.device
        self.p, self.sign_sum = state["p"].to(device).clone(), state["sign_sum"].to(device).clone()
        self.count, self.steps = state["count"].to(device).clone(), int(state["steps"])


def augment_p(augmentation):
    """metrics.csv's augment_p: the probability that each operation is applied, at the end of the epoch: ADA's p,
    1 for diffaug, 0 without augmentation (so that the column is a number in every run, like the losses)."""
    return f"{0.0 if augmentation is None else augmentation.p.item():.4f}"


def make_augmentation(kind, channels, device, target=0.6):
    """--augment none/diffaug/ada -> None (nothing changes, not even a random draw) or an Augmentation with
    default_policy(channels)."""
    if kind == "none":
        return None
    return Augmentation(default_policy(channels), device, target=target if kind == "ada" else None)
