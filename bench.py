"""How fast each training script trains, measured from outside through its command line, as one markdown table.

    python bench.py                                  # every script, one epoch of 6,000 synthetic MNIST-sized images
    python bench.py --scripts gan dcgan --images 2000 --device cuda
    python bench.py --quick --scripts gan cgan       # a smoke run: a few hundred images, seconds

Each script runs `main([... --epochs 1 --train-images N ...])` on a synthetic IDX dataset written to a temporary
folder, and its img/s is read from the metrics.csv it wrote: the script's own loop, nothing re-implemented here. The
feed row compares data.Batches (the dataset kept on the device as uint8, sliced per step) with the tutorial way, a
DataLoader over a Dataset that makes a PIL image per item, on the same images; and frechet_distance is timed at
2048 dimensions, against scipy's sqrtm (pytorch-fid's route) when scipy is installed.
"""
import argparse
import contextlib
import csv
import gzip
import importlib
import io
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import data
import fid

SCRIPTS = ["gan", "cgan", "dcgan", "wgan_gp", "infogan", "acgan", "began", "lapgan", "biggan", "stylegan"]


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic_mnist(root, n):
    """DATA_DIR/mnist/ holding n random 28x28 digits with labels 0..9: the timing does not depend on what they show."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "mnist")
    os.makedirs(folder, exist_ok=True)
    for split, count in (("train", n), ("t10k", min(n, 1000))):
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), rng.integers(0, 256, (count, 28, 28)))
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), np.arange(count) % 10)
    return root


def time_script(name, data_dir, out, options):
    """(img/s of the script's epoch from its metrics.csv or None, wall seconds, what went wrong) of one run."""
    flags = ["--data-dir", data_dir, "--out", out, "--epochs", "1", "--train-images", str(options.images),
             "--device", options.device, "--log-every", "1000000"] + options.flags
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            status = importlib.import_module(name).main(flags)
    except Exception as e:  # a script that fails is a row that says so, not the end of the table
        return None, time.perf_counter() - started, f"{type(e).__name__}: {e}"[:80]
    seconds = time.perf_counter() - started
    if status != 0:
        return None, seconds, f"exit status {status}"
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return float(list(csv.DictReader(f))[-1]["img_per_s"]), seconds, status


class PILImages(torch.utils.data.Dataset):
    """The tutorial feed: a PIL image per item, then ToTensor and Normalize((0.5,), (0.5,)) written out by hand."""

    def __init__(self, dataset):
        self.images, self.labels = dataset.images[:, 0].numpy(), dataset.labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index])
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).unsqueeze(0).float().div(255)
        return (x - 0.5) / 0.5, int(self.labels[index])


def time_feed(dataset, batch_size, device, epochs=1):
    """Images/s of reading whole epochs of batches onto the device: data.Batches vs a DataLoader over PIL images."""
    def rate(make_batches):
        started, seen = time.perf_counter(), 0
        for epoch in range(1, epochs + 1):
            for real, labels in make_batches(epoch):
                seen += len(real.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return seen / (time.perf_counter() - started)

    batches = data.Batches(dataset, batch_size, device, seed=0)
    loader = torch.utils.data.DataLoader(PILImages(dataset), batch_size=batch_size, shuffle=True)
    return rate(batches.epoch), rate(lambda epoch: iter(loader))


def time_frechet(dims):
    """Seconds of fid.frechet_distance and, with scipy, of pytorch-fid's sqrtm route, and how far apart they are."""
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((2 * dims, dims)), rng.standard_normal((2 * dims, dims)) * 1.2 + 0.1
    mu1, sigma1, mu2, sigma2 = first.mean(0), np.cov(first, rowvar=False), second.mean(0), np.cov(second, rowvar=False)
    started = time.perf_counter()
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    result = {"ours_s": time.perf_counter() - started}
    try:
        import scipy.linalg
    except ImportError:
        return result
    started = time.perf_counter()
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    theirs = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return {**result, "scipy_s": time.perf_counter() - started, "difference": abs(ours - theirs) / abs(theirs)}


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def machine_line(options):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    if options.device.startswith("cuda"):
        cpu += f", GPU {torch.cuda.get_device_name(torch.device(options.device))}"
    return (f"Machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"device {options.device}; {options.images} images a run; extra flags: {' '.join(options.flags) or '-'}")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like the training scripts
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv):
    def count(text):
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
        return int(text)

    p = ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", nargs="+", choices=SCRIPTS, default=SCRIPTS, help="which scripts (default: all)")
    p.add_argument("--images", type=count, help="training images a run (default 6000; --quick 256)")
    p.add_argument("--batch-size", type=count, default=64, help="the feed rows' batch size (default 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--threads", type=count, help="torch threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 256 images, a small FID")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="the rest goes to every script, e.g. "
                   "--flags --amp --compile")
    args = p.parse_args(argv)
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        p.error(f"--device {args.device}: use cpu, or cuda, cuda:1, ... where torch sees a GPU")
    args.images = args.images or (256 if args.quick else 6000)
    return args


def main(argv=None):
    options = parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    started, device = time.perf_counter(), torch.device(options.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = synthetic_mnist(tmp, options.images)
        for name in options.scripts:
            rate, seconds, status = time_script(name, data_dir, os.path.join(tmp, name), options)
            rows.append((f"{name}.py: img/s of one epoch (its metrics.csv)",
                         f"{rate:.0f}" if rate else status, f"{seconds:.1f} s in all"))
        dataset = data.load_dataset("mnist", data_dir)
    ours, tutorial = time_feed(dataset, options.batch_size, device)
    rows.append((f"feed: img/s, data.Batches vs DataLoader + PIL (batch {options.batch_size})", f"{ours:.0f}",
                 f"{tutorial:.0f} (ours {ours / tutorial:.1f}x as fast)"))
    dims = 256 if options.quick else 2048
    frechet = time_frechet(dims)
    rows.append((f"frechet_distance at {dims} dims: seconds, ours vs scipy sqrtm", f"{frechet['ours_s']:.3f}",
                 f"{frechet['scipy_s']:.3f} (values {frechet['difference']:.0e} apart)" if "scipy_s" in frechet
                 else "scipy not installed"))
    print(machine_line(options))
    print()
    print(markdown(("figure", "ours", "reference"), rows))
    print(f"\nbench.py took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
