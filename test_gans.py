"""Tests for the GAN scripts, data.py and fid.py: offline, CPU only, tiny data made here.

    python -m pytest test_gans.py            # everything (about a minute on 2 cores)
    python -m pytest test_gans.py -m "not slow"
"""
import argparse
import ast
import copy
import csv
import functools
import gzip
import hashlib
import http.server
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import acgan
import bench
import began
import biggan
import cgan
import data
import dcgan
import fid
import gan
import infogan
import lapgan
import score
import stylegan
import wgan_gp

# The test models are tiny: a second thread buys nothing, and on a busy machine two threads wait on each other
# (a 3-7x slowdown measured here). Child processes get OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# Tiny data

def write_idx(path, array):
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def bar_images(labels, size=28, num_classes=4, seed=0):
    """Class k is a bright vertical bar at a position set by k, on a dark noisy background: easy to read off."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 30, size=(len(labels), size, size)).astype(np.uint8)
    for image, label in zip(images, labels):
        left = 2 + label * (size - 4) // num_classes
        image[:, left:left + 3] = 230
    return images


def make_tiny_mnist(root, n=96, num_classes=4):
    """DATA_DIR/mnist/ with the four IDX files of a tiny bar dataset (train and test alike)."""
    folder = os.path.join(root, "mnist")
    os.makedirs(folder, exist_ok=True)
    labels = np.arange(n) % num_classes
    for split in ("train", "t10k"):
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), bar_images(labels, num_classes=num_classes))
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), labels.astype(np.uint8))
    return str(root)


@pytest.fixture
def tiny_data_dir(tmp_path):
    return make_tiny_mnist(tmp_path / "data")


# ----------------------------------------------------------------------------------------------------------------
# data.py: IDX files

@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip_plain_and_gzipped(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / name, images)
    loaded = data.read_idx(str(tmp_path / name), ndim=3)
    assert loaded.dtype == np.uint8 and loaded.shape == (5, 28, 28)
    np.testing.assert_array_equal(loaded, images)


def test_truncated_idx_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte is truncated"):
        data.read_idx(str(path), ndim=3)


def test_wrong_magic_number_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    write_idx(path, np.zeros((4, 28, 28), np.uint8))  # images where labels (1-d) are expected
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte is not an IDX file"):
        data.read_idx(str(path), ndim=1)


def test_garbled_gzip_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz"):
        data.read_idx(str(path), ndim=3)


def test_named_dataset_loads_from_data_dir_as_uint8_tensors(tiny_data_dir):
    dataset = data.load_dataset("mnist", tiny_data_dir)
    assert dataset.images.shape == (96, 1, 28, 28) and dataset.images.dtype == torch.uint8
    assert dataset.labels.dtype == torch.int64 and dataset.labels.tolist()[:5] == [0, 1, 2, 3, 0]
    assert dataset.classes == [str(d) for d in range(10)]
    resized = data.load_dataset("mnist", tiny_data_dir, image_size=32, channels=3)
    assert resized.images.shape == (96, 3, 32, 32) and resized.images.dtype == torch.uint8


def test_data_dir_is_searched_before_the_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "system"
    make_tiny_mnist(system, n=8)
    monkeypatch.setattr(data, "SYSTEM_DATASET_DIR", str(system))
    assert len(data.load_dataset("mnist", str(tmp_path / "empty"), download=False).images) == 8
    make_tiny_mnist(tmp_path / "local", n=12)
    assert len(data.load_dataset("mnist", str(tmp_path / "local"), download=False).images) == 12


def test_unknown_dataset_is_an_error():
    with pytest.raises(data.DataError, match="unknown dataset 'cifar'"):
        data.load_dataset("cifar")
    with pytest.raises(data.DataError, match="no folder of images at /no/such/folder"):
        data.load_dataset("/no/such/folder")


# ----------------------------------------------------------------------------------------------------------------
# data.py: downloads, against a local HTTP server

@pytest.fixture
def http_files():
    """A server on 127.0.0.1 serving {path: (body, declared length)}; a declared length beyond the body is a cut-off
    download. Yields (base URL, files); stopped after the test."""
    files = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                self.send_error(404)
                return
            body, length = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files
    server.shutdown()
    server.server_close()


def serve(files, path, body):
    files[path] = (body, len(body))
    return hashlib.md5(body).hexdigest()


def test_download_keeps_a_file_with_the_right_md5(tmp_path, http_files):
    base, files = http_files
    md5 = serve(files, "/a.gz", b"payload" * 1000)
    path = data.fetch("a.gz", [base + "/"], md5, str(tmp_path / "dl"))
    assert open(path, "rb").read() == b"payload" * 1000
    assert os.listdir(tmp_path / "dl") == ["a.gz"]


def test_download_with_the_wrong_md5_is_refused_and_leaves_nothing(tmp_path, http_files):
    base, files = http_files
    serve(files, "/a.gz", b"tampered")
    with pytest.raises(data.DataError, match="could not download a.gz.*MD5"):
        data.fetch("a.gz", [base + "/"], "0" * 32, str(tmp_path / "dl"))
    assert os.listdir(tmp_path / "dl") == []


def test_cut_off_download_is_refused_and_leaves_nothing(tmp_path, http_files):
    base, files = http_files
    files["/a.gz"] = (b"x" * 1000, 100_000)
    with pytest.raises(data.DataError, match="could not download a.gz"):
        data.fetch("a.gz", [base + "/"], hashlib.md5(b"x" * 100_000).hexdigest(), str(tmp_path / "dl"))
    assert os.listdir(tmp_path / "dl") == []


def test_download_falls_through_failing_mirrors_to_the_next(tmp_path, http_files):
    base, files = http_files
    md5 = serve(files, "/good/a.gz", b"right")
    serve(files, "/bad/a.gz", b"wrong")
    mirrors = ["http://127.0.0.1:9/nothing-listens-here/", base + "/missing/", base + "/bad/", base + "/good/"]
    path = data.fetch("a.gz", mirrors, md5, str(tmp_path / "dl"))
    assert open(path, "rb").read() == b"right"


def test_named_dataset_is_downloaded_when_found_nowhere(tmp_path, http_files, monkeypatch):
    base, files = http_files
    make_tiny_mnist(tmp_path / "www", n=8)
    md5s = {f: serve(files, "/mnist/" + f, (tmp_path / "www" / "mnist" / f).read_bytes())
            for f in os.listdir(tmp_path / "www" / "mnist")}
    monkeypatch.setitem(data.DATASETS, "mnist", {**data.DATASETS["mnist"], "mirrors": [base + "/mnist/"], "md5": md5s})
    monkeypatch.setattr(data, "SYSTEM_DATASET_DIR", str(tmp_path / "nowhere"))
    dataset = data.load_dataset("mnist", str(tmp_path / "data"))
    assert len(dataset.images) == 8
    assert sorted(os.listdir(tmp_path / "data" / "mnist")) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                                                              "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


# ----------------------------------------------------------------------------------------------------------------
# data.py: folders of images

def make_image_tree(root):
    """cats/: an RGB PNG and an RGBA PNG; dogs/: a grayscale JPEG and a wide RGB JPEG."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(root / "cats" / "red.png")
    Image.new("RGBA", (40, 40), (0, 0, 255, 0)).save(root / "cats" / "clear.png")  # fully transparent
    Image.new("L", (50, 50), 100).save(root / "dogs" / "gray.jpg")
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # only the centre third is white: a centre crop keeps just that
    Image.fromarray(wide).save(root / "dogs" / "wide.jpg", quality=100)
    return root


def test_folder_with_class_subfolders_gives_labels_and_names(tmp_path):
    dataset = data.load_dataset(str(make_image_tree(tmp_path / "pets")), image_size=16)
    assert dataset.classes == ["cats", "dogs"]
    assert dataset.labels.tolist() == [0, 0, 1, 1]  # clear.png, red.png, gray.jpg, wide.jpg
    assert dataset.images.shape == (4, 3, 16, 16) and dataset.images.dtype == torch.uint8
    clear, red, gray, wide = dataset.images.int()
    assert (clear == 255).all()  # transparent pixels composited onto white
    assert red[0].min() == 255 and red[1:].max() == 0
    assert abs(gray.float().mean() - 100) < 3 and (gray[0] == gray[2]).all()  # grayscale repeated to RGB
    assert wide.float().mean() > 240  # shorter side resized, then centre crop


def test_folder_of_loose_grayscale_images_is_one_class_with_one_channel(tmp_path):
    for i in range(3):
        Image.new("L", (30, 20), 50 * i).save(tmp_path / f"{i}.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0junk")  # hidden files are skipped
    dataset = data.load_dataset(str(tmp_path), image_size=8)
    assert dataset.images.shape == (3, 1, 8, 8) and dataset.labels.tolist() == [0, 0, 0]
    assert len(dataset.classes) == 1


def test_non_image_file_in_a_folder_is_an_error_naming_it(tmp_path):
    root = make_image_tree(tmp_path / "pets")
    (root / "dogs" / "notes.txt").write_text("not an image")
    with pytest.raises(data.DataError, match="notes.txt"):
        data.load_dataset(str(root), image_size=16)


# ----------------------------------------------------------------------------------------------------------------
# data.py: batches, grids, plots

def test_batches_are_scaled_device_slices_covering_every_image_once_per_epoch():
    images = torch.arange(103, dtype=torch.uint8).view(103, 1, 1, 1).expand(103, 1, 2, 2).contiguous()
    dataset = data.Dataset(images, torch.arange(103), ["x"])
    batches = data.Batches(dataset, batch_size=10, device="cpu", seed=0)
    seen = []
    for real, labels in batches.epoch(1):
        assert real.dtype == torch.float32 and real.shape[1:] == (1, 2, 2) and len(real) in (10, 11)
        assert real.min() >= -1 and real.max() <= 1
        assert torch.equal(data.to_uint8(real[:, 0, 0, 0]), labels.to(torch.uint8))  # image matches its label
        seen += labels.tolist()
    assert len(batches) == 10 and sorted(seen) == list(range(103))
    again = [labels.tolist() for _, labels in batches.epoch(1)]
    other = [labels.tolist() for _, labels in batches.epoch(2)]
    assert sum(again, []) == seen and sum(other, []) != seen  # order fixed by (seed, epoch) alone


def test_to_uint8_rounds_like_saving_a_png():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    expected = ((x + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)  # torchvision save_image's rounding
    assert torch.equal(data.to_uint8(x), expected) and data.to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]


def test_gif_of_a_long_run_keeps_evenly_spaced_frames_from_first_to_last(tmp_path):
    paths = []
    for k in range(7):  # frame k is filled with grey level 30 k, so each kept frame says which epoch it is
        paths.append(str(tmp_path / f"epoch_{k}.png"))
        Image.new("L", (4, 4), 30 * k).save(paths[-1])
    data.save_gif(paths, str(tmp_path / "progress.gif"), max_frames=4)
    gif = Image.open(tmp_path / "progress.gif")
    levels = []
    for i in range(gif.n_frames):
        gif.seek(i)
        levels.append(gif.convert("L").getpixel((0, 0)))
    assert levels == [0, 60, 120, 180]  # epochs 0, 2, 4, 6


def test_grid_gif_and_loss_plot_are_written(tmp_path):
    images = torch.rand(12, 3, 8, 8) * 2 - 1
    grid = data.make_grid(images, nrow=5, padding=2)
    assert grid.shape == (2 + 3 * 10, 2 + 5 * 10, 3) and grid.dtype == np.uint8
    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"epoch_{k}.png"))
        data.save_grid(images[:4] * (k / 3), paths[-1], nrow=2)
    data.save_gif(paths, str(tmp_path / "progress.gif"))
    assert Image.open(tmp_path / "progress.gif").n_frames == 3
    data.plot_curves({"d_loss": [1.3, 1.1, 1.2], "g_loss": [0.7, 0.9, float("nan")]}, str(tmp_path / "losses.png"))
    assert Image.open(tmp_path / "losses.png").size == (640, 400)


# ----------------------------------------------------------------------------------------------------------------
# gan.py and cgan.py: the models and the losses

def test_mlp_models_have_the_right_shapes_and_ranges():
    G, D = gan.Generator(16, (1, 28, 28)), gan.Discriminator((1, 28, 28))
    fake = G(torch.randn(5, 16))
    assert fake.shape == (5, 1, 28, 28) and fake.min() >= -1 and fake.max() <= 1
    assert D(fake).shape == (5,)
    G, D = cgan.Generator(16, 10, (3, 8, 8)), cgan.Discriminator((3, 8, 8), 10)
    labels = torch.tensor([0, 3, 9])
    fake = G(torch.randn(3, 16), labels)
    assert fake.shape == (3, 3, 8, 8) and fake.abs().max() <= 1
    assert D(fake, labels).shape == (3,)


def test_losses_are_bce_on_logits_and_non_saturating():
    real_logits, fake_logits = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sigmoid = torch.sigmoid
    expected_d = -(torch.log(sigmoid(real_logits)).mean() + torch.log(1 - sigmoid(fake_logits)).mean())
    expected_g = -torch.log(sigmoid(fake_logits)).mean()  # -log D(G(z)), not log(1 - D(G(z)))
    for module in (gan, cgan):
        torch.testing.assert_close(module.d_loss(real_logits, fake_logits), expected_d)
        torch.testing.assert_close(module.g_loss(fake_logits), expected_g)
    # Logits far beyond the range where sigmoid-then-log underflows still give finite gradients.
    logits = torch.tensor([-200.0], requires_grad=True)
    gan.g_loss(logits).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.item() < -0.99


def no_scaler():
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scaler.amp = False
    return scaler


def watch_steps(G, D, opt_g, opt_d):
    """Record, at each optimizer step, which networks had changed since the start, and their gradients."""
    start = {name: [p.detach().clone() for p in net.parameters()] for name, net in (("G", G), ("D", D))}
    nets, log = {"G": G, "D": D}, []

    def changed(name):
        return any(not torch.equal(p, q) for p, q in zip(nets[name].parameters(), start[name]))

    def grads(name):
        return [None if p.grad is None else p.grad.clone() for p in nets[name].parameters()]

    for name, opt in (("G", opt_g), ("D", opt_d)):
        step = opt.step

        def recording_step(*args, _name=name, _step=step, **kwargs):
            log.append((_name, {n: (changed(n), grads(n)) for n in nets}))
            return _step(*args, **kwargs)
        opt.step = recording_step
    return log, changed


@pytest.mark.parametrize("module", [gan, cgan])
def test_train_step_updates_d_then_g_each_touching_only_its_own_weights(module):
    torch.manual_seed(0)
    conditional = module is cgan
    G = module.Generator(8, 10, (1, 6, 6)) if conditional else module.Generator(8, (1, 6, 6))
    D = module.Discriminator((1, 6, 6), 10) if conditional else module.Discriminator((1, 6, 6))
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    log, changed = watch_steps(G, D, opt_g, opt_d)
    real, labels = torch.rand(16, 1, 6, 6) * 2 - 1, torch.arange(16) % 10
    extra = (labels,) if conditional else ()
    metrics = module.train_step(G, D, opt_g, opt_d, real, *extra, 8, no_scaler())
    assert [name for name, _ in log] == ["D", "G"]
    (_, at_d_step), (_, at_g_step) = log
    # At D's step nothing has changed yet, and G has no gradient: the fake batch was detached.
    assert not at_d_step["G"][0] and not at_d_step["D"][0]
    assert all(g is None for g in at_d_step["G"][1]) and all(g is not None for g in at_d_step["D"][1])
    # At G's step only D has changed (its own step), and G's backward left D's gradients as they were.
    assert not at_g_step["G"][0] and at_g_step["D"][0]
    assert all(g is not None and g.abs().sum() > 0 for g in at_g_step["G"][1])
    assert all(torch.equal(a, b) for a, b in zip(at_d_step["D"][1], at_g_step["D"][1]))
    assert changed("G") and changed("D")
    assert metrics.shape == (len(module.metric_names("non-saturating")),) and torch.isfinite(metrics).all()
    assert all(p.requires_grad for p in D.parameters())


def test_conditional_generator_output_depends_on_the_label():
    torch.manual_seed(0)
    G = cgan.Generator(8, 10, (1, 28, 28)).eval()
    z = torch.randn(1, 8).repeat(10, 1)
    fake = G(z, torch.arange(10))
    assert all((fake[0] - fake[k]).abs().max() > 1e-3 for k in range(1, 10))


# ----------------------------------------------------------------------------------------------------------------
# gan.py and cgan.py: runs end to end, as a user starts them

CONTRACT_OUTPUTS = ["samples/epoch_001.png", "progress.gif", "metrics.csv", "losses.png", "checkpoint.pt"]


def run(module, tmp_path, data_dir, *flags):
    return module.main(["--data-dir", data_dir, "--out", str(tmp_path / "run"), "--batch-size", "16", *flags])


def one_line_error(capsys, *names):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    return err


@pytest.mark.parametrize("module", [gan, cgan])
def test_a_short_run_writes_every_contract_output(module, tmp_path, tiny_data_dir):
    assert run(module, tmp_path, tiny_data_dir, "--epochs", "1") == 0
    out = tmp_path / "run"
    for name in CONTRACT_OUTPUTS:
        assert (out / name).is_file(), name
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "d_loss", "g_loss", "seconds", "img_per_s"} <= set(header)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"generator", "discriminator", "opt_g", "opt_d", "epoch", "args", "rng"} <= set(checkpoint)
    assert checkpoint["epoch"] == 1 and checkpoint["args"]["batch_size"] == 16
    grid = Image.open(out / "samples" / "epoch_001.png")
    if module is cgan:  # one row per class (10 MNIST classes), 10 columns
        assert grid.size == (2 + 10 * 30, 2 + 10 * 30)
    assert not [f for f in os.listdir(out) if ".tmp" in f]


@pytest.mark.parametrize("module", [gan, cgan])
def test_resume_continues_from_the_saved_epoch_exactly(module, tmp_path, tiny_data_dir):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(module, straight, tiny_data_dir, "--epochs", "2") == 0
    assert run(module, split, tiny_data_dir, "--epochs", "1") == 0
    assert run(module, split, tiny_data_dir, "--epochs", "2", "--resume") == 0
    a = torch.load(straight / "run" / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "run" / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 2
    for key in ("generator", "discriminator"):  # same batches, same noise, same optimizer moments
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0)
    rows = (split / "run" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1", "2"]


def test_generate_writes_samples_npz_with_the_contract_keys(tmp_path, tiny_data_dir):
    assert run(gan, tmp_path, tiny_data_dir, "--epochs", "1") == 0
    assert run(gan, tmp_path, tiny_data_dir, "--generate", "7") == 0
    samples = np.load(tmp_path / "run" / "samples.npz")
    assert list(samples.keys()) == ["images"]
    assert samples["images"].dtype == np.uint8 and samples["images"].shape == (7, 28, 28, 1)
    assert (tmp_path / "run" / "samples.png").is_file()


def test_conditional_generate_writes_labels_and_honours_label(tmp_path, tiny_data_dir):
    assert run(cgan, tmp_path, tiny_data_dir, "--epochs", "1") == 0
    assert run(cgan, tmp_path, tiny_data_dir, "--generate", "12") == 0
    samples = np.load(tmp_path / "run" / "samples.npz")
    assert samples["images"].shape == (12, 28, 28, 1) and samples["images"].dtype == np.uint8
    assert samples["labels"].dtype == np.int64 and samples["labels"].tolist() == [i % 10 for i in range(12)]
    assert run(cgan, tmp_path, tiny_data_dir, "--generate", "5", "--label", "3") == 0
    assert np.load(tmp_path / "run" / "samples.npz")["labels"].tolist() == [3] * 5


@pytest.mark.parametrize("module", [gan, cgan])
def test_missing_checkpoint_exits_2_with_one_line(module, tmp_path, tiny_data_dir, capsys):
    assert run(module, tmp_path, tiny_data_dir, "--generate", "4") == 2
    one_line_error(capsys, "checkpoint.pt")
    assert run(module, tmp_path, tiny_data_dir, "--resume") == 2
    one_line_error(capsys, "checkpoint.pt")


@pytest.mark.parametrize("module", [gan, cgan])
def test_unknown_dataset_exits_2_with_one_line(module, tmp_path, capsys):
    assert module.main(["--dataset", "cifar-11", "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "cifar-11")


def test_label_outside_the_classes_exits_2(tmp_path, tiny_data_dir, capsys):
    assert run(cgan, tmp_path, tiny_data_dir, "--epochs", "1") == 0
    capsys.readouterr()
    assert run(cgan, tmp_path, tiny_data_dir, "--generate", "4", "--label", "10") == 2
    one_line_error(capsys, "--label 10")


def test_corrupt_dataset_file_exits_2_naming_it(tmp_path, tiny_data_dir, capsys):
    path = os.path.join(tiny_data_dir, "mnist", "train-images-idx3-ubyte.gz")
    with open(path, "r+b") as f:
        f.truncate(40)
    assert run(gan, tmp_path, tiny_data_dir, "--epochs", "1") == 2
    one_line_error(capsys, "train-images-idx3-ubyte.gz")


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data_dir, monkeypatch,
                                                                             capsys):
    assert run(gan, tmp_path, tiny_data_dir, "--epochs", "1") == 0
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    real_d_loss, real_g_loss, threshold = gan.LOSSES["non-saturating"]
    monkeypatch.setitem(gan.LOSSES, "non-saturating", (lambda r, f: real_d_loss(r, f) * float("nan"), real_g_loss,
                                                       threshold))
    assert run(gan, tmp_path, tiny_data_dir, "--epochs", "3", "--resume") == 1
    assert "diverged" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good


def test_ctrl_c_exits_130_and_leaves_the_finished_epoch_resumable(tmp_path, tiny_data_dir, monkeypatch):
    assert run(cgan, tmp_path, tiny_data_dir, "--epochs", "1") == 0
    real_step = cgan.train_step
    calls = []

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args)
    monkeypatch.setattr(cgan, "train_step", interrupted_step)
    assert run(cgan, tmp_path, tiny_data_dir, "--epochs", "3", "--resume") == 130
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(cgan, "train_step", real_step)
    assert run(cgan, tmp_path, tiny_data_dir, "--epochs", "2", "--resume") == 0


@pytest.mark.parametrize("module", [gan, cgan])
def test_amp_runs_and_gives_finite_losses(module, tmp_path, tiny_data_dir):
    assert run(module, tmp_path, tiny_data_dir, "--epochs", "1", "--amp") == 0
    row = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1].split(",")
    assert all(np.isfinite(float(v)) for v in row)


@pytest.mark.slow
def test_conditional_gan_puts_the_bar_where_the_label_says():
    """A learning test a broken loss fails: class k of the data is a bar at column position k; after a short
    training the generator must draw the bar at the position its label asks for."""
    torch.manual_seed(0)
    num_classes, size = 4, 16
    labels = torch.arange(512) % num_classes
    real_images = torch.from_numpy(bar_images(labels.numpy(), size=size, num_classes=num_classes))
    dataset = data.Dataset(real_images.unsqueeze(1), labels, [str(k) for k in range(num_classes)])
    G = cgan.Generator(8, num_classes, (1, size, size), hidden=(64, 128))
    D = cgan.Discriminator((1, size, size), num_classes, hidden=(128, 64))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    batches = data.Batches(dataset, batch_size=32, device="cpu", seed=0)
    for epoch in range(15):
        for real, real_labels in batches.epoch(epoch):
            cgan.train_step(G, D, opt_g, opt_d, real, real_labels, 8, no_scaler())
    asked = torch.arange(400) % num_classes
    fake = cgan.generate_images(G, asked, 8, "cpu", seed=1).float()
    column_brightness = fake[:, 0].mean(dim=1)  # (N, size)
    bar_lefts = [2 + k * (size - 4) // num_classes for k in range(num_classes)]
    bar_brightness = torch.stack([column_brightness[:, left:left + 3].mean(1) for left in bar_lefts], dim=1)
    hit_rate = (bar_brightness.argmax(dim=1) == asked).float().mean().item()  # brightest bar = the asked one
    assert hit_rate > 0.9, hit_rate


@pytest.mark.slow
def test_fid_flag_prints_fid_and_kid_and_caches_the_real_features(tmp_path, monkeypatch, capsys):
    data_dir = make_tiny_mnist(tmp_path / "data", n=16)
    # A random-weights Inception where torch.hub keeps pytorch-fid's file, so nothing is downloaded.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    os.makedirs(fid.default_cache_dir())
    torch.save(fid.FIDInception().state_dict(), os.path.join(fid.default_cache_dir(), os.path.basename(fid.WEIGHTS_URL)))
    with pytest.warns(UserWarning, match="singular"):  # 8 and 16 images: the warning users get for too few
        assert run(cgan, tmp_path, data_dir, "--epochs", "1", "--fid", "8") == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("FID: ")][0]
    assert float(line.split()[1]) > 0 and "KID: " in line and "[8 vs 16 reference images (mnist train)" in line
    cached = np.load(os.path.join(data_dir, "mnist", "fid_features_28px_16.npz"))
    assert cached["mu"].shape == (2048,) and cached["sigma"].shape == (2048, 2048)
    assert cached["features"].shape == (16, 2048) and int(cached["num_images"]) == 16


def test_fid_flag_without_weights_offline_exits_2_saying_where_to_put_them(tmp_path, tiny_data_dir, monkeypatch,
                                                                            capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fid, "WEIGHTS_URL", "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    assert run(gan, tmp_path, tiny_data_dir, "--epochs", "1", "--fid", "8") == 2
    one_line_error(capsys, "--fid", fid.default_cache_dir())


def mock_inception(monkeypatch):
    """fid.py's feature functions replaced by cheap deterministic ones: returns the list of image batches the run
    scores and a function giving the "FID: ... KID: ..." figures expected for them (from fid.py's own formulas)."""
    import fid

    scored, sides = [], {}

    def features(images, rows_of):
        return torch.stack([torch.arange(3.0) * (i % 7) for i in range(len(images))]).add(rows_of).sin()

    def fake_features(images, **kwargs):
        scored.append(images)
        sides["fake"] = features(images, 0.5)
        return sides["fake"]

    def real_features(cache_file, images_fn, **kwargs):
        sides["real"] = features(images_fn(), 0.0)
        return sides["real"]

    def expected():
        frechet = fid.frechet_distance(*fid.statistics_of_features(sides["real"]),
                                       *fid.statistics_of_features(sides["fake"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kid = fid.kernel_inception_distance(sides["fake"], sides["real"])[0]
        return f"FID: {frechet:.6g}  KID: {kid:.6g} "

    monkeypatch.setattr(fid, "load_inception", lambda **kwargs: None)
    monkeypatch.setattr(fid, "compute_features", fake_features)
    monkeypatch.setattr(fid, "cached_features", real_features)
    return scored, expected


# ================================================================================================================
# dcgan.py and wgan_gp.py: models, the gradient penalty, and the run contract on tiny offline data

CONV_SCRIPTS = [dcgan, wgan_gp]
TINY = ["--width", "4", "--latent-dim", "8", "--batch-size", "16", "--log-every", "1"]


@pytest.fixture
def tiny_mnist(tmp_path):
    """tmp_path/mnist/ with 80 training images in all 10 classes, as gzipped IDX files."""
    return make_tiny_mnist(tmp_path, n=80, num_classes=10)


@pytest.fixture
def rgb_folder(tmp_path):
    """A folder of 80x60 RGB images in two class sub-folders."""
    rng = np.random.default_rng(1)
    for name in ("with_mask", "without_mask"):
        (tmp_path / "faces" / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "faces" / name / f"{i}.png")
    return tmp_path / "faces"


def break_generator_loss(monkeypatch, script):
    """Make G's loss NaN from now on (through the loss table where the script has --loss)."""
    nan_loss = lambda scores: scores.mean() * float("nan")  # noqa: E731
    if hasattr(script, "LOSSES"):
        d_loss, _, threshold = script.LOSSES["non-saturating"]
        monkeypatch.setitem(script.LOSSES, "non-saturating", (d_loss, nan_loss, threshold))
    else:
        monkeypatch.setattr(script, "g_loss", nan_loss)


def default_metrics(script):
    """The per-step columns of metrics.csv with the script's default loss."""
    return script.metric_names("non-saturating") if hasattr(script, "metric_names") else script.METRICS


def run_script(script, argv):
    return script.main([str(a) for a in argv])


def models(script, image_size, channels, num_classes=0, width=8):
    G = script.Generator(16, image_size, channels, width, num_classes)
    D = (script.Discriminator if script is dcgan else script.Critic)(image_size, channels, width, num_classes)
    return G, D


# ----------------------------------------------------------------------------------------------------------------
# Models and losses

@pytest.mark.parametrize("script", CONV_SCRIPTS)
@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes_follow_image_size_and_channels(script, image_size, channels):
    G, D = models(script, image_size, channels)
    fake = G(torch.randn(5, 16))
    assert fake.shape == (5, channels, image_size, image_size)
    assert fake.abs().max() <= 1  # tanh output
    assert D(fake).shape == (5,)


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_one_more_block_per_doubling_of_image_size(script):
    def convs(module):
        return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in module.modules())

    (G32, D32), (G64, D64) = models(script, 32, 1), models(script, 64, 1)
    assert convs(G64) == convs(G32) + 1 and convs(D64) == convs(D32) + 1


def test_dcgan_follows_the_dcgan_rules():
    G, D = models(dcgan, 32, 3)
    G.apply(dcgan.init_weights)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in D.modules())
    assert isinstance(D.features[1], nn.LeakyReLU) and D.features[1].negative_slope == 0.2  # no BN on D's input
    assert isinstance(G.net[-1], nn.Tanh) and isinstance(G.net[-2], nn.ConvTranspose2d)  # no BN on G's output
    assert any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    weights = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(weights.std().item() - 0.02) < 0.002


def test_critic_has_no_sigmoid_and_no_batchnorm():
    _, critic = models(wgan_gp, 64, 3, num_classes=2)
    banned = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Sigmoid)
    assert not any(isinstance(m, banned) for m in critic.modules())
    scores = critic(torch.randn(64, 3, 64, 64) * 50, torch.zeros(64, dtype=torch.long))
    assert not ((scores >= 0) & (scores <= 1)).all()  # unbounded, not a probability


def test_gradient_penalty_matches_hand_computed_value():
    # A linear critic D(x) = <w, x>: its gradient is w at every point, so the penalty is (||w|| - 1)^2
    # with the norm over all channels and pixels (here 2 x 3 x 3 = 18 numbers).
    w = torch.arange(18, dtype=torch.float32).view(1, 2, 3, 3) / 10
    w.requires_grad_(True)

    def linear_critic(x, labels=None):
        return (x * w).flatten(1).sum(1)

    real, fake = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    penalty = wgan_gp.gradient_penalty(linear_critic, real, fake)
    norm = (w.detach() ** 2).sum().sqrt()  # sqrt(sum k^2 for k < 18) / 10 = 4.3...
    assert penalty.item() == pytest.approx(((norm - 1) ** 2).item(), rel=1e-5)
    # create_graph=True: the penalty is differentiable w.r.t. the critic's weights, with the analytic gradient.
    penalty.backward()
    assert torch.allclose(w.grad, 2 * (norm - 1) * w.detach() / norm, rtol=1e-5)


def test_gradient_penalty_uses_each_samples_own_gradient_norm():
    # D(x) = 0.5 ||x||^2 has gradient x. With real == fake the interpolate is x itself whatever alpha is,
    # so the penalty is the mean over samples of (||x_i|| - 1)^2.
    x = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 0.5, 1.0, 3.0)])  # norms 0, 1, 2, 6

    def quadratic_critic(images, labels=None):
        return 0.5 * (images ** 2).flatten(1).sum(1)

    penalty = wgan_gp.gradient_penalty(quadratic_critic, x, x.clone())
    assert penalty.item() == pytest.approx((1 + 0 + 1 + 25) / 4, rel=1e-6)


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_conditional_output_depends_on_the_label(script):
    torch.manual_seed(0)
    G, D = models(script, 32, 1, num_classes=10)
    G.eval()
    z = torch.randn(1, 16).repeat(10, 1)
    labels = torch.arange(10)
    fake = G(z, labels)
    assert all((fake[0] - fake[k]).abs().max() > 1e-4 for k in range(1, 10))
    with torch.no_grad():
        nn.init.normal_(D.projection.weight, std=1.0)
    scores = D(fake[:1].repeat(10, 1, 1, 1), labels)
    assert scores.unique().numel() == 10


def test_wgan_gp_train_step_makes_n_critic_critic_steps_per_generator_step():
    G, D = models(wgan_gp, 32, 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.0, 0.9))
    counts = {"g": 0, "d": 0}

    def counting(optimizer, key):
        step = optimizer.step

        def counted_step(*args, **kwargs):
            counts[key] += 1
            return step(*args, **kwargs)
        return counted_step

    opt_g.step, opt_d.step = counting(opt_g, "g"), counting(opt_d, "d")
    reals = [torch.rand(4, 1, 32, 32) * 2 - 1 for _ in range(5)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scaler.amp = False
    for _ in range(3):
        metrics = wgan_gp.train_step(G, D, opt_g, opt_d, reals, [None] * 5, 16, 10.0, scaler)
    assert counts == {"g": 3, "d": 15}
    assert metrics.shape == (len(wgan_gp.METRICS),) and torch.isfinite(metrics).all()


def test_wgan_gp_run_groups_n_critic_batches_per_generator_step(tiny_mnist, tmp_path, monkeypatch):
    calls = []
    real_step = wgan_gp.train_step

    def recording_step(G, D, opt_g, opt_d, real_batches, *rest):
        calls.append(len(real_batches))
        return real_step(G, D, opt_g, opt_d, real_batches, *rest)

    monkeypatch.setattr(wgan_gp, "train_step", recording_step)
    # 80 images in batches of 8: 10 critic steps per epoch, 2 generator steps with --n-critic 5.
    argv = ["--data-dir", tiny_mnist, "--out", tmp_path / "run", "--epochs", 2, *TINY, "--batch-size", 8]
    assert run_script(wgan_gp, argv + ["--n-critic", 5]) == 0
    assert calls == [5, 5, 5, 5]


# ----------------------------------------------------------------------------------------------------------------
# Runs: every contract output, resume, generate, errors

def assert_run_outputs(out, epochs, metric_names):
    assert sorted(os.listdir(out / "samples")) == [f"epoch_{e:03d}.png" for e in range(1, epochs + 1)]
    for name in ("progress.gif", "losses.png", "checkpoint.pt", "metrics.csv"):
        assert (out / name).is_file(), name
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    for column in ["d_loss", "g_loss", "seconds", "img_per_s", *metric_names]:
        assert all(np.isfinite(float(r[column])) for r in rows), column
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"generator", "discriminator", "opt_g", "opt_d", "epoch", "args", "classes", "rng"} <= set(checkpoint)
    assert checkpoint["epoch"] == epochs
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    return rows, checkpoint


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_run_on_a_named_dataset_writes_every_output(script, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 2, *TINY]) == 0
    _, checkpoint = assert_run_outputs(out, 2, default_metrics(script))
    assert Image.open(out / "samples" / "epoch_002.png").size == (2 + 10 * 34, 2 + 10 * 34)  # 10x10 of 32x32
    assert checkpoint["args"]["image_size"] == 32


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_conditional_run_on_an_rgb_folder_at_64px(script, rgb_folder, tmp_path):
    out = tmp_path / "run"
    assert run_script(script, ["--dataset", rgb_folder, "--out", out, "--epochs", 1, "--conditional", *TINY]) == 0
    _, checkpoint = assert_run_outputs(out, 1, default_metrics(script))
    assert checkpoint["classes"] == ["with_mask", "without_mask"]
    grid = Image.open(out / "samples" / "epoch_001.png")
    assert grid.mode == "RGB" and grid.size == (2 + 10 * 66, 2 + 2 * 66)  # one row per class, 64x64 images
    assert run_script(script, ["--out", out, "--generate", 6, "--label", 1]) == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (6, 64, 64, 3) and samples["images"].dtype == np.uint8
    assert samples["labels"].dtype == np.int64 and (samples["labels"] == 1).all()


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_resume_continues_from_the_saved_epoch(script, tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_mnist, "--out", out, *TINY]
    assert run_script(script, common + ["--epochs", 1]) == 0
    first = torch.load(out / "checkpoint.pt", weights_only=True)
    capsys.readouterr()
    assert run_script(script, common + ["--epochs", 3, "--resume"]) == 0
    assert "epochs 2..3" in capsys.readouterr().out
    rows, checkpoint = assert_run_outputs(out, 3, default_metrics(script))
    assert checkpoint["epoch"] == 3
    assert not torch.equal(first["generator"]["net.0.weight"], checkpoint["generator"]["net.0.weight"])


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_same_seed_gives_the_same_run(script, tiny_mnist, tmp_path):
    weights = []
    for name in ("a", "b"):
        assert run_script(script, ["--data-dir", tiny_mnist, "--out", tmp_path / name, "--epochs", 1, *TINY]) == 0
        weights.append(torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["generator"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_generate_writes_samples_npz_and_png(script, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, "--conditional", *TINY]) == 0
    assert run_script(script, ["--out", out, "--generate", 25]) == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (25, 32, 32, 1) and samples["images"].dtype == np.uint8
    assert samples["labels"].dtype == np.int64 and list(samples["labels"][:12]) == [*range(10), 0, 1]
    assert Image.open(out / "samples.png").size == (2 + 10 * 34, 2 + 3 * 34)


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_amp_run_gives_finite_losses(script, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, "--amp", *TINY]) == 0
    assert_run_outputs(out, 1, default_metrics(script))


@pytest.mark.parametrize("script", CONV_SCRIPTS)
@pytest.mark.parametrize("bad", [
    ["--image-size", 48], ["--image-size", 16], ["--dataset", "nonexistent"], ["--generate", 5],
])
def test_bad_usage_exits_2_with_one_line(script, bad, tiny_mnist, tmp_path, capsys):
    argv = ["--data-dir", tiny_mnist, "--out", tmp_path / "empty", "--epochs", 1, *TINY, *bad]
    assert run_script(script, argv) == 2
    assert one_line_error(capsys).startswith(f"{script.__name__}.py: error: ")


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_label_on_an_unconditional_model_exits_2(script, tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *TINY]) == 0
    assert run_script(script, ["--out", out, "--generate", 4, "--label", 3]) == 2
    assert "not conditional" in capsys.readouterr().err


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(script, tiny_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_mnist, "--out", out, *TINY]
    assert run_script(script, common + ["--epochs", 1]) == 0
    break_generator_loss(monkeypatch, script)
    assert run_script(script, common + ["--epochs", 3, "--resume"]) == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_ctrl_c_exits_130_with_the_last_epoch_saved(script, tiny_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_step = script.train_step

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) > 5:  # during epoch 2 (80 images in batches of 16: 5 steps per epoch for dcgan)
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(script, "train_step", interrupted_step)
    one_step_per_batch = ["--n-critic", 1] if script is wgan_gp else []
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 3, *TINY, *one_step_per_batch]) == 130
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("script", CONV_SCRIPTS)
def test_fid_flag_prints_the_fid_of_generated_images(script, tiny_mnist, tmp_path, monkeypatch, capsys):
    scored, expected = mock_inception(monkeypatch)
    argv = ["--data-dir", tiny_mnist, "--out", tmp_path / "run", "--epochs", 1, "--conditional", "--fid", 30, *TINY]
    assert run_script(script, argv) == 0
    assert expected() in capsys.readouterr().out  # |mu1 - mu2|^2 = 3, equal covariances
    assert scored[0].shape == (30, 1, 32, 32) and scored[0].dtype == torch.uint8


# ================================================================================================================
# fid.py: pytorch-fid's network and numbers, the Fréchet distance, statistics files, the CLI, downloads.
# The real Inception weights cannot be downloaded here, so the network is proven against pytorch-fid 0.3.0 with
# deterministic made-up weights: the layout hash and the reference features below were produced by pytorch-fid
# itself (shared/fixtures/fid_inception); the weights are rebuilt from the parameter names alone.

HERE = os.path.dirname(os.path.abspath(__file__))

# sha256 of the "name:dim,dim,..." lines of pytorch-fid's state dict, in order (566 entries, 94 of them
# num_batches_tracked, 23,885,392 numbers in the others).
LAYOUT_SHA256 = "304100f408d0209479bb2191667383662e8e629ea6c32ca9e94acc341dbfe2a8"
LAYOUT_ENTRIES, LAYOUT_NUM_BATCHES_TRACKED, LAYOUT_NUMBERS = 566, 94, 23885392

# pytorch-fid's features of reference_images() under reference_state_dict(): per block, per image, the sum and the
# sum of squares of the pooled features and the first 16 of them.
REFERENCE = {
    64: {
        "sum": [16.2710812, 16.7831274],
        "sum_sq": [9.60007541, 10.4121328],
        "first16": [
            [0.0854066387, 0.563837886, 0.00884823035, 0.00804717839, 0.0549398139, 0.425383031, 0.115751334,
             0.0698370039, 0.507493079, 0.000259902445, 0.497928172, 0.0797776058, 0.00271595782, 0.0616733618,
             0.155943811, 0.552247584],
            [0.070047453, 0.61538893, 0.00692964904, 0.012095225, 0.0649368018, 0.427962542, 0.0979718491,
             0.0781103596, 0.547239602, 0.000261833047, 0.546586096, 0.0816215575, 0.00547541259, 0.0635799393,
             0.161149189, 0.51139456],
        ],
    },
    192: {
        "sum": [45.8731326, 47.6519314],
        "sum_sq": [27.5846081, 29.8521891],
        "first16": [
            [0.287195027, 0.0049082404, 0.550064147, 0.206063867, 0.0, 0.317079902, 0.0709348843, 0.4676148,
             0.00117037422, 0.0, 0.443306297, 0.0, 0.00976717658, 0.0, 0.0, 0.00154171186],
            [0.314644039, 0.00491998019, 0.521481931, 0.208532244, 0.0, 0.276123881, 0.0709629357, 0.50121963,
             0.00270831073, 0.0, 0.443720609, 0.0, 0.00703569129, 0.0, 0.0, 0.00228958204],
        ],
    },
    768: {
        "sum": [145.092882, 148.527406],
        "sum_sq": [74.9879499, 78.2450391],
        "first16": [
            [0.392262727, 0.0650010556, 0.103056863, 0.0, 0.267382979, 0.0386968069, 0.000117697658, 0.930991411,
             0.138034239, 0.0181567427, 0.0115862256, 1.04988468, 0.00089881249, 0.0916618705, 0.0985528678,
             0.50180006],
            [0.411608636, 0.0729986504, 0.105965309, 0.0, 0.278480202, 0.0425821133, 0.000200481736, 0.963662744,
             0.130809262, 0.0191187449, 0.012067656, 1.08375955, 0.000770603598, 0.087631315, 0.111410238,
             0.496629238],
        ],
    },
    2048: {
        "sum": [446.82194, 455.360013],
        "sum_sq": [262.810084, 272.351572],
        "first16": [
            [0.0589400306, 0.0, 0.661431313, 0.0, 0.7038396, 0.0481538177, 0.00104864128, 0.1055682, 0.0812246203,
             0.72034514, 0.437803328, 0.0144527815, 0.00024886438, 0.02831324, 0.162599653, 0.0],
            [0.0655887201, 0.0, 0.685743213, 0.0, 0.707719564, 0.0517692007, 0.000762860582, 0.123909488,
             0.0862859339, 0.726339936, 0.442874819, 0.0205775108, 0.000124821338, 0.0302251037, 0.174042344, 0.0],
        ],
    },
}


@functools.lru_cache(maxsize=1)
def reference_state_dict():
    """The fixture's deterministic weights: a randn per entry seeded by the crc32 of its name, scaled by kind."""
    state = {}
    for name, tensor in fid.FIDInception().state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
            continue
        shape = tuple(tensor.shape)
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        r = torch.randn(shape, generator=generator, dtype=torch.float64)
        if name.endswith("running_var"):
            value = 1 + 0.1 * r.abs()
        elif name.endswith(("running_mean", "bn.bias")) or name == "fc.bias":
            value = 0.1 * r
        elif name.endswith("bn.weight"):
            value = 1 + 0.1 * r
        else:  # conv and fc weights, He-scaled
            value = r * math.sqrt(2 / math.prod(shape[1:]))
        state[name] = value.float()
    return state


@functools.lru_cache(maxsize=1)
def reference_model():
    return fid.load_inception(reference_state_dict(), device="cpu")


def reference_images():
    """x[b, c, i, j] = ((7b + 13c + 3i + 5j) mod 256) / 255 as uint8 images [2, 3, 32, 32]."""
    b, c, i, j = torch.meshgrid(*(torch.arange(n) for n in (2, 3, 32, 32)), indexing="ij")
    return ((7 * b + 13 * c + 3 * i + 5 * j) % 256).to(torch.uint8)


def random_images(n, channels=3, size=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)


def save_pngs(folder, images, extension=".png"):
    os.makedirs(folder, exist_ok=True)
    for k, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)  # mode L or RGB
        picture.save(os.path.join(folder, f"{k:03d}{extension}"))
    return str(folder)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(reference_state_dict(), path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# The network

def test_layout_is_pytorch_fids():
    layout = [(name, list(tensor.shape)) for name, tensor in fid.FIDInception().state_dict().items()]
    canonical = "\n".join(f"{name}:{','.join(map(str, shape))}" for name, shape in layout)
    assert len(layout) == LAYOUT_ENTRIES
    assert sum(name.endswith("num_batches_tracked") for name, _ in layout) == LAYOUT_NUM_BATCHES_TRACKED
    assert sum(math.prod(shape) for name, shape in layout if shape) == LAYOUT_NUMBERS
    assert hashlib.sha256(canonical.encode()).hexdigest() == LAYOUT_SHA256


def test_loads_pytorch_fid_state_dict_strictly_with_or_without_num_batches_tracked():
    state = reference_state_dict()
    without = {name: t for name, t in state.items() if not name.endswith("num_batches_tracked")}
    model = fid.FIDInception()
    for candidate in (state, without):
        model.load_pytorch_fid_state_dict(candidate)
    wrong = [
        {name: t for name, t in without.items() if name != "Mixed_7c.branch_pool.conv.weight"},  # missing
        {**without, "AuxLogits.fc.weight": torch.zeros(1008, 768)},  # torchvision's aux head: not pytorch-fid's
        {**without, "fc.weight": torch.zeros(1000, 2048)},  # ImageNet-1000 classifier: another network
        {"module." + name: t for name, t in without.items()},  # a DataParallel wrapper's names
    ]
    for candidate in wrong:
        with pytest.raises(fid.FIDError, match="not pytorch-fid's Inception"):
            model.load_pytorch_fid_state_dict(candidate)


def test_reference_features_at_all_four_blocks():
    model = reference_model()
    for dims, expected in REFERENCE.items():
        features = fid.inception_features(model, reference_images(), dims).double().numpy()
        assert features.shape == (2, dims)
        np.testing.assert_allclose(features.sum(1), expected["sum"], rtol=1e-5)
        np.testing.assert_allclose((features ** 2).sum(1), expected["sum_sq"], rtol=1e-5)
        np.testing.assert_allclose(features[:, :16], expected["first16"], rtol=1e-5, atol=1e-6)


def test_batchnorm_folding_keeps_the_features():
    plain = fid.FIDInception()
    plain.load_pytorch_fid_state_dict(reference_state_dict())
    images = random_images(3, size=20)
    for dims in (64, 192):
        np.testing.assert_allclose(fid.inception_features(reference_model(), images, dims),
                                   fid.inception_features(plain, images, dims), rtol=1e-5, atol=1e-6)


def test_feature_function_puts_the_network_in_eval_mode():
    model = fid.FIDInception()
    model.load_pytorch_fid_state_dict(reference_state_dict())
    images = random_images(4, size=16)
    with torch.no_grad():  # what a caller who forgot .eval() would get from the raw module: batch statistics
        train_mode = copy.deepcopy(model).train()(images.float() / 255, 64)  # (a copy: it updates running stats)
    features = fid.inception_features(model.train(), images, 64)
    assert not model.training
    np.testing.assert_allclose(features, fid.inception_features(reference_model(), images, 64), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(features, train_mode, rtol=1e-2)


def test_grayscale_is_three_identical_channels():
    gray = random_images(3, channels=1, size=16)
    np.testing.assert_allclose(fid.inception_features(reference_model(), gray, 64),  # same up to float rounding
                               fid.inception_features(reference_model(), gray.repeat(1, 3, 1, 1), 64), rtol=1e-5)


def test_tf32_is_off_for_cuda_features_and_restored_after():
    conv = getattr(torch.backends.cudnn, "conv", None)
    owner, flag, off = ((conv, "fp32_precision", "ieee") if hasattr(conv, "fp32_precision")
                        else (torch.backends.cudnn, "allow_tf32", False))
    before = getattr(owner, flag)
    with fid.no_tf32(torch.device("cuda")):
        assert getattr(owner, flag) == off
    assert getattr(owner, flag) == before


@pytest.mark.filterwarnings("ignore:.*singular")  # a handful of images: the small-N warning is expected
def test_generated_floats_score_like_their_pngs(tmp_path):
    generator = torch.Generator().manual_seed(1)
    fake = torch.rand(6, 1, 14, 14, generator=generator) * 2.2 - 1.1  # a little outside [-1, 1]: clamped
    in_memory = fid.compute_statistics(fake, dims=64, weights=reference_model())
    as_saved = ((fake + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)  # torchvision save_image's rounding
    on_disk = fid.statistics_of(save_pngs(tmp_path / "fake", as_saved), dims=64, weights=reference_model())
    for ours, theirs in zip(in_memory, on_disk):  # float32 rounding only; one grey level off moves them ~1e-3
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-9)


def test_statistics_are_mean_and_unbiased_covariance():
    images = random_images(7, size=10, seed=3)
    features = fid.inception_features(reference_model(), images, 64).double().numpy()
    with pytest.warns(UserWarning, match="singular"):  # 7 images < 64 dims
        mu, sigma = fid.compute_statistics(images, dims=64, batch_size=3, weights=reference_model())
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (64, 64)
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-8)
    with pytest.raises(fid.FIDError, match="at least 2"):
        fid.compute_statistics(images[:1], dims=64, weights=reference_model())
    with pytest.raises(fid.FIDError, match="C 1 or 3"):
        fid.compute_statistics(images[:, :2], dims=64, weights=reference_model())


@pytest.mark.filterwarnings("ignore:.*singular")  # a handful of images: the small-N warning is expected
def test_cached_statistics_are_reused_and_readable_by_pytorch_fid(tmp_path):
    cache, images = str(tmp_path / "mnist_stats.npz"), random_images(5, channels=1, size=10)
    calls = []

    def images_fn():
        calls.append(1)
        return images

    first = fid.cached_statistics(cache, images_fn, dims=64, weights=reference_model())
    second = fid.cached_statistics(cache, images_fn, dims=64, weights=reference_model())
    assert len(calls) == 1
    np.testing.assert_array_equal(first[1], second[1])
    with np.load(cache) as f:  # what pytorch-fid reads
        np.testing.assert_array_equal(f["mu"][:], first[0])
    fid.cached_statistics(cache, images_fn, dims=192, weights=reference_model())  # other dims: recomputed
    assert len(calls) == 2
    assert os.listdir(tmp_path) == ["mnist_stats.npz"]  # no temporary file left


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance

def random_statistics(d, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_identical_statistics_give_zero():
    mu, sigma = random_statistics(32, 200, seed=0)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_closed_forms_diagonal_and_1d():
    rng = np.random.default_rng(1)
    mu1, mu2, a, b = rng.standard_normal(16), rng.standard_normal(16), rng.random(16) + 0.1, rng.random(16) + 0.1
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    a[:4] = 0  # singular: the eigh route
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # 1-D Gaussians N(1, 2^2) and N(-0.5, 3^2): (1 + 0.5)^2 + (2 - 3)^2
    assert fid.frechet_distance(1.0, 4.0, -0.5, 9.0) == pytest.approx(3.25, rel=1e-12)


def test_frechet_invariant_to_rotation_and_argument_order():
    mu1, sigma1 = random_statistics(24, 100, seed=2)
    mu2, sigma2 = random_statistics(24, 100, seed=3)
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((24, 24)))
    value = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert fid.frechet_distance(q @ mu1, q @ sigma1 @ q.T, q @ mu2, q @ sigma2 @ q.T) == pytest.approx(value, rel=1e-9)
    assert fid.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(value, rel=1e-9)
    tensors = [torch.from_numpy(t) for t in (mu1, sigma1, mu2, sigma2)]
    assert fid.frechet_distance(*tensors) == pytest.approx(value, rel=1e-12)
    assert isinstance(fid.frechet_distance(*tensors), float)


def test_frechet_agrees_with_pytorch_fids_scipy_route():
    linalg = pytest.importorskip("scipy.linalg")
    mu1, sigma1 = random_statistics(64, 400, seed=5)
    mu2, sigma2 = random_statistics(64, 400, seed=6)
    covmean = linalg.sqrtm(sigma1.dot(sigma2)).real  # no disp=: removed in SciPy 1.18
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_singular_covariances_stay_finite():
    mu1, sigma1 = random_statistics(50, 10, seed=7)  # 10 samples in 50 dims: rank 9
    mu2, sigma2 = random_statistics(50, 12, seed=8)
    value = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert math.isfinite(value) and value > 0
    assert fid.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(value, rel=1e-6)
    assert fid.frechet_distance(mu1, np.zeros((50, 50)), mu2, np.zeros((50, 50))) == pytest.approx(
        ((mu1 - mu2) ** 2).sum(), rel=1e-12)


def test_frechet_refuses_mismatched_or_non_finite_statistics():
    mu, sigma = random_statistics(8, 30, seed=9)
    with pytest.raises(fid.FIDError, match="mismatched dimensions"):
        fid.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    with pytest.raises(fid.FIDError, match="NaN"):
        fid.frechet_distance(mu * np.nan, sigma, mu, sigma)


# ----------------------------------------------------------------------------------------------------------------
# Command line and statistics files

def run_main(argv, capsys):
    code = fid.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_reads_pytorch_fid_statistics(tmp_path, capsys):
    files = []
    for seed in (10, 11):
        mu, sigma = random_statistics(16, 50, seed)
        files.append(str(tmp_path / f"stats{seed}.npz"))
        np.savez_compressed(files[-1], mu=mu, sigma=sigma)  # exactly what pytorch-fid --save-stats writes
    code, out, err = run_main(files, capsys)
    assert code == 0 and err == ""
    expected = fid.frechet_distance(*random_statistics(16, 50, 10), *random_statistics(16, 50, 11))
    assert out.startswith("FID: ") and float(out.split()[1]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.filterwarnings("ignore:.*singular")  # a handful of images: the small-N warning is expected
def test_cli_save_stats_writes_pytorch_fid_format(tmp_path, capsys, weights_file):
    samples = str(tmp_path / "samples.npz")  # as --generate writes it: uint8 [N, H, W, C]
    np.savez(samples, images=random_images(4, channels=1, size=10).permute(0, 2, 3, 1).numpy())
    out_file = str(tmp_path / "out.npz")
    code, out, err = run_main(["--save-stats", samples, out_file, "--dims", "64", "--weights", weights_file], capsys)
    assert code == 0
    with np.load(out_file) as f:  # pytorch-fid's reader: f["mu"][:], f["sigma"][:]
        mu, sigma = f["mu"][:], f["sigma"][:]
    assert mu.shape == (64,) and sigma.shape == (64, 64) and mu.dtype == np.float64
    np.testing.assert_allclose(mu, fid.statistics_of(samples, dims=64, weights=reference_model())[0], rtol=1e-6)
    code, out, err = run_main([out_file, out_file], capsys)
    assert code == 0 and float(out.split()[1]) == pytest.approx(0, abs=1e-9)


def test_cli_two_folders_end_to_end(tmp_path, weights_file):
    folder_a = save_pngs(tmp_path / "a", random_images(4, size=16, seed=1), extension=".PNG")  # upper case too
    folder_b = save_pngs(tmp_path / "b", random_images(3, size=24, seed=2))
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(os.path.join(folder_b, "odd_size.bmp"))  # mixed sizes
    (tmp_path / "b" / "notes.txt").write_text("not an image")  # ignored, like pytorch-fid
    result = subprocess.run([sys.executable, os.path.join(HERE, "fid.py"), folder_a, folder_b, "--dims", "64",
                             "--weights", weights_file, "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("FID: ") and float(result.stdout.split()[1]) > 0
    assert "Traceback" not in result.stderr


def test_cli_dataset_name_goes_through_data_py(tmp_path, capsys, monkeypatch, weights_file):
    class DataError(Exception):
        pass

    def load_dataset(name, data_dir, split):
        if not os.path.isdir(data_dir):
            raise DataError(f"{name} not found in {data_dir}")
        return types.SimpleNamespace(images=random_images(9, channels=1, size=28))

    monkeypatch.setitem(sys.modules, "data", types.SimpleNamespace(load_dataset=load_dataset, DataError=DataError))
    code, out, err = run_main(["mnist", "mnist", "--dims", "64", "--weights", weights_file, "--num-samples", "5",
                               "--data-dir", str(tmp_path)], capsys)
    assert code == 0 and float(out.split()[1]) == pytest.approx(0, abs=1e-6)
    assert "5 images" in err  # --num-samples took the first 5 of 9 (and the small-N warning says so)
    code, out, err = run_main(["mnist", "mnist", "--data-dir", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and err.strip().endswith("nowhere") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["empty folder", "npz without keys", "mismatched dims", "one image", "missing file",
                                  "missing weights", "corrupt image"])
def test_cli_bad_input_exits_2_with_one_line(case, tmp_path, capsys, weights_file):
    stats64, stats192 = str(tmp_path / "s64.npz"), str(tmp_path / "s192.npz")
    np.savez(stats64, mu=np.zeros(64), sigma=np.eye(64))
    np.savez(stats192, mu=np.zeros(192), sigma=np.eye(192))
    np.savez(str(tmp_path / "other.npz"), labels=np.zeros(3))
    os.makedirs(tmp_path / "empty")
    save_pngs(tmp_path / "one", random_images(1))
    save_pngs(tmp_path / "two", random_images(2))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    (tmp_path / "bad" / "y.png").write_bytes(b"not a png")
    argv, expected = {
        "empty folder": ([str(tmp_path / "empty"), stats64], "no images in"),
        "npz without keys": ([str(tmp_path / "other.npz"), stats64], "neither mu and sigma"),
        "mismatched dims": ([stats64, stats192], "mismatched dimensions"),
        "one image": ([str(tmp_path / "one"), stats64, "--dims", "64"], "need at least 2"),
        "missing file": ([str(tmp_path / "nothing.npz"), stats64], "no such folder or file"),
        "missing weights": ([str(tmp_path / "two"), stats64, "--dims", "64", "--weights", "nope.pth"], "nope.pth"),
        "corrupt image": ([str(tmp_path / "bad"), stats64, "--dims", "64"], "not a readable image"),
    }[case]
    if "--weights" not in argv:
        argv += ["--weights", weights_file]
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_cli_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "fid.py"), str(tmp_path / "missing"), "mnist.npz"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_help_says_how_long_a_cpu_takes(capsys):
    with pytest.raises(SystemExit):
        fid.main(["--help"])
    assert "images/s" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# fid.py: weight download, against the local HTTP server of the data.py tests

def test_download_keeps_a_file_whose_sha256_matches_its_name(http_files, tmp_path):
    base, files = http_files
    body = os.urandom(300_000)
    name = f"weights-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    files["/" + name] = (body, len(body))
    cache = str(tmp_path / "checkpoints")
    path = fid.download_weights(f"{base}/{name}", cache_dir=cache)
    assert path == os.path.join(cache, name) and open(path, "rb").read() == body
    files.clear()  # downloaded once: the second call does not ask the server
    assert fid.download_weights(f"{base}/{name}", cache_dir=cache) == path
    assert os.listdir(cache) == [name]


def test_download_refuses_a_wrong_hash_and_leaves_nothing(http_files, tmp_path):
    base, files = http_files
    files["/weights-00000000.pth"] = (b"tampered", 8)
    cache = str(tmp_path / "checkpoints")
    with pytest.raises(fid.FIDError, match="sha256"):
        fid.download_weights(f"{base}/weights-00000000.pth", cache_dir=cache)
    assert os.listdir(cache) == []


def test_failed_or_partial_download_says_what_to_do_offline(http_files, tmp_path):
    base, files = http_files
    files["/cut-12345678.pth"] = (b"x" * 1000, 100_000)
    cache = str(tmp_path / "checkpoints")
    for url in (f"{base}/missing-12345678.pth", f"{base}/cut-12345678.pth"):
        with pytest.raises(fid.FIDError) as error:
            fid.load_inception(url=url, cache_dir=cache)
        message = str(error.value)
        assert cache in message and "--weights" in message and "\n" not in message
        assert os.listdir(cache) == []


# ================================================================================================================
# bench.py: a smoke run (it never asserts a time)

@pytest.mark.slow
def test_bench_quick_prints_every_row(capsys):
    """bench.py --quick runs (spawning one process per variant) and prints the machine and every row; times are
    not asserted, they depend on the machine."""
    assert bench.main(["--quick", "--threads", "1", "--variants", "gan", "wgan_gp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Machine: ") and "torch " in out and " threads" in out
    for name in ("gan", "wgan_gp"):
        for figure in ("img/s, ours vs DataLoader + PIL", "img/s, real loop vs fixed batch",
                       "peak memory of training, MiB (process / above import)"):
            assert f"| {name}: {figure} |" in out
        assert f"\n| {name} | " in out  # its line in the where-the-time-goes table
    assert "frechet_distance vs scipy sqrtm" in out and "relative difference of the two values" in out
    assert "Inception features: img/s" in out


@pytest.mark.parametrize("name", list(bench.SCRIPTS))
def test_bench_runs_every_scripts_own_step_with_its_own_optimizers(name, monkeypatch):
    module = bench.SCRIPTS[name]
    made = []
    real_make = module.make_optimizers
    monkeypatch.setattr(module, "make_optimizers", lambda *a: made.append(1) or real_make(*a))
    monkeypatch.setattr(bench, "NUM_IMAGES", 128)
    options = bench.parse_args(["--quick", "--device", "cpu"])
    run = bench.build_run(name, torch.device("cpu"), options)
    real, labels = next(bench.script_inputs(run, bench.device_batches(run)))
    assert made == [1] and torch.isfinite(run.step(real, labels)).all()


@pytest.mark.slow
def test_bench_processes_compares_one_process_with_gloo_processes(capsys):
    assert bench.main(["--quick", "--processes", "2", "--variant", "gan", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for figure in ("gan: img/s, 1 process x 2 threads", "gan: img/s, 2 gloo processes x 1 thread (torchrun)",
                   "share of a step in the gradient all-reduce (slowest process)"):
        assert f"| {figure} |" in out
    share = float(out.split("gradient all-reduce (slowest process) | ")[1].split("%")[0])
    assert 0 < share < 100
    assert "nan" not in out.lower()


# ----------------------------------------------------------------------------------------------------------------
# Every training script: the GAN losses, D's accuracy, flag checks, faults, and several processes (torchrun)

TRAINING_SCRIPTS = [gan, cgan, dcgan, wgan_gp]
LOSS_SCRIPTS = [gan, cgan, dcgan]  # the scripts with --loss
MLP_TINY = ["--batch-size", "16", "--latent-dim", "8", "--log-every", "1"]


def tiny_flags(script):
    """The smallest models and batches each script accepts, for runs that test plumbing, not quality."""
    return MLP_TINY if script in (gan, cgan) else TINY


def exit_code(script, argv):
    """main()'s exit status, also where argparse itself exits (an unknown choice, a non-number)."""
    try:
        return script.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("script", LOSS_SCRIPTS)
def test_each_loss_value_and_gradient_match_hand_computed(script):
    real = torch.tensor([2.0, -1.0], requires_grad=True)
    fake = torch.tensor([0.5, -3.0], requires_grad=True)
    sig = torch.sigmoid
    cases = {  # loss: (D's loss, dD/dreal, dD/dfake, G's loss, dG/dfake), written out from the papers' formulas
        "non-saturating": (-(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean()),
                           -(1 - sig(real)) / 2, sig(fake) / 2, -torch.log(sig(fake)).mean(), -(1 - sig(fake)) / 2),
        "minimax": (-(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean()),
                    -(1 - sig(real)) / 2, sig(fake) / 2, torch.log(1 - sig(fake)).mean(), -sig(fake) / 2),
        "lsgan": (0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean(), (real - 1) / 2, fake / 2,
                  0.5 * ((fake - 1) ** 2).mean(), (fake - 1) / 2),
        "hinge": (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean(), torch.tensor([0.0, -0.5]),
                  torch.tensor([0.5, 0.0]), -fake.mean(), torch.tensor([-0.5, -0.5])),
    }
    assert set(script.LOSSES) == set(cases)
    for name, (d_value, d_real_grad, d_fake_grad, g_value, g_fake_grad) in cases.items():
        d_loss, g_loss, _ = script.LOSSES[name]
        loss = d_loss(real, fake)
        torch.testing.assert_close(loss, d_value.detach(), msg=name)
        grads = torch.autograd.grad(loss, (real, fake))
        torch.testing.assert_close(grads[0], d_real_grad.detach(), msg=name)
        torch.testing.assert_close(grads[1], d_fake_grad.detach(), msg=name)
        loss = g_loss(fake)
        torch.testing.assert_close(loss, g_value.detach(), msg=name)
        torch.testing.assert_close(torch.autograd.grad(loss, fake)[0], g_fake_grad.detach(), msg=name)


@pytest.mark.parametrize("script", LOSS_SCRIPTS)
def test_minimax_generator_gradient_saturates_when_d_rejects_the_fake(script):
    """The property that separates the two: at logit -10 (D is sure the image is fake) the minimax loss's gradient
    is sigmoid(-10) = 4.5e-5, the non-saturating one's about -1."""
    gradient = {}
    for name in ("minimax", "non-saturating"):
        logit = torch.tensor([-10.0], requires_grad=True)
        (gradient[name],) = torch.autograd.grad(script.LOSSES[name][1](logit), logit)
    assert gradient["minimax"].item() == pytest.approx(-4.54e-5, rel=1e-2)
    assert gradient["non-saturating"].item() == pytest.approx(-1.0, abs=1e-4)


@pytest.mark.parametrize("script", LOSS_SCRIPTS)
def test_losses_stay_finite_in_bfloat16_at_extreme_logits(script):
    logits = torch.tensor([-80.0, 0.0, 80.0], dtype=torch.bfloat16)
    for name, (d_loss, g_loss, _) in script.LOSSES.items():
        assert torch.isfinite(d_loss(logits, logits)) and torch.isfinite(g_loss(logits)), name


@pytest.mark.parametrize("loss", ["lsgan", "hinge", "minimax"])
@pytest.mark.parametrize("script", LOSS_SCRIPTS)
def test_each_loss_trains_and_writes_every_output_with_raw_output_columns(script, loss, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, "--loss", loss,
                               *tiny_flags(script)]) == 0
    rows, checkpoint = assert_run_outputs(out, 1, script.metric_names(loss))
    raw = loss in ("lsgan", "hinge")  # D's output is not a logit: reported as is, and named so
    assert ("d_real_output" in rows[0]) == raw and ("d_real" in rows[0]) == (not raw)
    assert checkpoint["args"]["loss"] == loss


def test_resume_and_generate_use_the_runs_own_loss(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_mnist, "--out", out, *TINY]
    assert run_script(dcgan, common + ["--epochs", 1, "--loss", "hinge"]) == 0
    assert run_script(dcgan, common + ["--epochs", 2, "--resume"]) == 0  # no --loss: the checkpoint's
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["loss"] == "hinge"
    with open(out / "metrics.csv", newline="") as f:
        assert all("d_real_output" in row for row in csv.DictReader(f))
    capsys.readouterr()
    assert run_script(dcgan, common + ["--epochs", 3, "--resume", "--loss", "lsgan"]) == 2
    one_line_error(capsys, "--loss lsgan", "hinge")


def test_wgan_weight_clipping_keeps_every_critic_weight_within_c_and_uses_rmsprop(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    flags = ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, "--lipschitz", "clip", "--clip-value", 0.02,
             "--n-critic", 2, *TINY]
    assert run_script(wgan_gp, flags) == 0
    rows, checkpoint = assert_run_outputs(out, 1, wgan_gp.METRICS)
    assert all(w.abs().max() <= 0.02 for w in checkpoint["discriminator"].values() if w.is_floating_point())
    assert checkpoint["args"]["lr"] == 5e-5  # the paper's rate when --lr is not given
    assert "square_avg" in checkpoint["opt_d"]["state"][0]  # RMSprop's state, not Adam's exp_avg
    assert float(rows[0]["gradient_penalty"]) == 0.0
    args = wgan_gp.parse_args(["--lipschitz", "clip", "--lr", "1e-4"])
    assert args.lr == 1e-4 and wgan_gp.parse_args([]).lr == 5e-4  # Adam with gp: the default since issue 17


def test_clip_step_clamps_after_each_critic_update():
    torch.manual_seed(0)
    G, D = models(wgan_gp, 32, 1)
    opt_g, opt_d = torch.optim.RMSprop(G.parameters(), lr=0.5), torch.optim.RMSprop(D.parameters(), lr=0.5)
    real = [torch.rand(4, 1, 32, 32) * 2 - 1]
    wgan_gp.train_step(G, D, opt_g, opt_d, real, [None], 16, 10.0, no_scaler(), clip_value=0.01)
    assert max(p.abs().max().item() for p in D.parameters()) <= 0.01
    assert max(p.abs().max().item() for p in D.parameters()) > 0.009  # a large step hit the limit


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_metrics_hold_ds_accuracy_on_training_held_out_and_fake_images(script, tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 2, *tiny_flags(script)]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = (["critic_real_train", "critic_real_test", "critic_fake"] if script is wgan_gp
             else ["d_acc_real_train", "d_acc_real_test", "d_acc_fake"])
    for row in rows:
        values = [float(row[name]) for name in names]
        assert script is wgan_gp or all(0 <= v <= 1 for v in values)
    assert "epoch 2: " in capsys.readouterr().out


def test_accuracy_counts_what_d_calls_real_and_fake():
    D = lambda images, labels=None: images.flatten(1).mean(1)  # noqa: E731  "real" = bright
    D.eval = D.train = lambda: None
    G = lambda z, labels=None: -torch.ones(len(z), 1, 4, 4)  # noqa: E731  every fake dark: D calls all fake
    G.eval = G.train = lambda: None
    D.parameters = lambda: iter([torch.zeros(1)])
    bright, dark = torch.full((6, 1, 4, 4), 255, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    sets = {"d_acc_real_train": (torch.cat([bright, dark]), torch.zeros(10, dtype=torch.int64)),
            "d_acc_real_test": None}
    accuracy = dcgan.d_accuracy(D, G, sets, latent_dim=3, num_classes=0, threshold=0.0, n=1000)
    assert accuracy == {"d_acc_real_train": "0.6000", "d_acc_real_test": "", "d_acc_fake": "1.0000"}


def test_held_out_columns_are_empty_for_a_folder(rgb_folder, tmp_path):
    out = tmp_path / "run"
    assert run_script(dcgan, ["--dataset", rgb_folder, "--out", out, "--epochs", 1, *TINY]) == 0
    with open(out / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["d_acc_real_test"] == "" and row["d_acc_real_train"] != ""


@pytest.mark.parametrize("script", [gan, cgan])
def test_mlp_scripts_train_on_an_rgb_folder_at_the_image_size_given(script, rgb_folder, tmp_path):
    out = tmp_path / "run"
    assert run_script(script, ["--dataset", rgb_folder, "--out", out, "--epochs", 1, "--image-size", 20,
                               *MLP_TINY]) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["image_shape"] == [3, 20, 20] and checkpoint["classes"] == ["with_mask", "without_mask"]
    assert run_script(script, ["--out", out, "--generate", 4]) == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (4, 20, 20, 3)
    assert ("labels" in samples) == (script is cgan)


def test_mlp_default_image_size_is_28_for_mnist_and_32_for_a_folder(rgb_folder):
    assert gan.default_size(gan.parse_args([])) == 28
    assert cgan.default_size(cgan.parse_args(["--dataset", str(rgb_folder)])) == 32


BAD_NUMBERS = [["--epochs", 0], ["--epochs", -1], ["--batch-size", 0], ["--lr", 0], ["--lr", -1e-4], ["--lr", "nan"],
               ["--latent-dim", 0], ["--log-every", 0], ["--generate", 0], ["--fid", 1], ["--average-decay", 1],
               ["--average-decay", -0.1], ["--seed", -1], ["--device", "tpu"], ["--device", "nonsense"]]
SCRIPT_BAD_NUMBERS = {gan: [["--image-size", 0]], cgan: [["--image-size", 0], ["--label", 3]],
                      dcgan: [["--width", 0], ["--image-size", 48], ["--label", 3], ["--r1-gamma", -1]],
                      wgan_gp: [["--width", 0], ["--n-critic", 0], ["--gp-weight", -1], ["--clip-value", 0],
                                ["--clip-value", -0.01]]}


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_every_bad_number_exits_2_with_one_line_before_any_data_is_loaded(script, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    for bad in BAD_NUMBERS + SCRIPT_BAD_NUMBERS[script]:
        assert exit_code(script, ["--out", tmp_path / "run", *bad]) == 2, bad
        err = one_line_error(capsys, bad[0])
        assert err.startswith(f"{script.__name__}.py: error: "), err


@pytest.mark.parametrize("script", [*TRAINING_SCRIPTS, infogan, acgan, began, lapgan, biggan, stylegan])
@pytest.mark.parametrize("bad", [["--epochs", "ten"], ["--loss", "wasserstein"], ["--lipschitz", "both"],
                                 ["--no-such-flag"]])
def test_argparse_errors_are_one_line_too(script, bad, capsys):
    assert exit_code(script, bad) == 2
    one_line_error(capsys, f"{script.__name__}.py: error:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only case")
@pytest.mark.parametrize("script", [*TRAINING_SCRIPTS, infogan, acgan, began, lapgan, biggan, stylegan, bench])
def test_asking_for_a_gpu_that_is_not_there_exits_2_naming_device(script, capsys):
    assert exit_code(script, ["--device", "cuda"]) == 2
    one_line_error(capsys, "--device cuda", "CUDA")


def test_fid_asking_for_a_gpu_that_is_not_there_exits_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("tests the CPU-only case")
    assert exit_code(fid, ["--device", "cuda", str(tmp_path), str(tmp_path)]) == 2
    one_line_error(capsys, "--device cuda")


def test_bench_bad_flags_exit_2_with_one_line(capsys):
    for bad in (["--threads", "0"], ["--variants", "nope"], ["--device", "nonsense"]):
        assert exit_code(bench, bad) == 2, bad
        one_line_error(capsys, "bench.py: error:")


def test_sync_bn_on_the_cpu_is_a_clear_error(capsys):
    assert exit_code(dcgan, ["--sync-bn", "--device", "cpu"]) == 2
    one_line_error(capsys, "--sync-bn", "CUDA")


def test_label_without_generate_is_refused(capsys):
    assert exit_code(cgan, ["--label", "3"]) == 2
    one_line_error(capsys, "--label 3", "--generate")


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_resuming_another_scripts_checkpoint_exits_2_naming_both(script, tiny_mnist, tmp_path, capsys):
    other = dcgan if script is not dcgan else wgan_gp
    out = tmp_path / "run"
    assert run_script(other, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *TINY]) == 0
    capsys.readouterr()
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 2, "--resume",
                               *tiny_flags(script)]) == 2
    one_line_error(capsys, f"was written by {other.__name__}.py with --image-size 32", f"this is {script.__name__}.py")
    assert run_script(script, ["--out", out, "--generate", 4]) == 2
    one_line_error(capsys, f"was written by {other.__name__}.py")


def test_a_checkpoint_that_does_not_fit_the_model_exits_2(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script(dcgan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *TINY]) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["generator_average"]["net.0.weight"] = torch.zeros(3, 3)
    torch.save(checkpoint, out / "checkpoint.pt")
    capsys.readouterr()
    assert run_script(dcgan, ["--out", out, "--generate", 4]) == 2
    one_line_error(capsys, "checkpoint.pt", "does not fit")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "a list"])
def test_corrupt_or_foreign_checkpoint_exits_2_naming_it(content, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save([1, 2, 3], path)
    assert run_script(dcgan, ["--out", tmp_path / "run", "--generate", 4]) == 2
    one_line_error(capsys, str(path))


def test_resume_with_epochs_already_done_is_refused(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script(gan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 2, *MLP_TINY]) == 0
    capsys.readouterr()
    assert run_script(gan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 2, "--resume", *MLP_TINY]) == 2
    one_line_error(capsys, "--epochs 2", "already at epoch 2")


def test_an_output_folder_that_cannot_be_created_exits_2_before_loading(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("in the way")
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before --out was checked"))
    assert run_script(dcgan, ["--out", tmp_path / "file" / "run", "--epochs", 1]) == 2
    one_line_error(capsys, "--out", "cannot write")


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("what", ["checkpoint", "grid"])
def test_full_disk_while_saving_exits_2_and_keeps_the_previous_checkpoint(what, tiny_mnist, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_mnist, "--out", out, *TINY]
    assert run_script(dcgan, common + ["--epochs", 1]) == 0
    good = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(*((torch, "save") if what == "checkpoint" else (data, "save_grid")), no_space)
    capsys.readouterr()
    assert run_script(dcgan, common + ["--epochs", 2, "--resume"]) == 2
    one_line_error(capsys, "No space left on device", "epoch 1")
    assert (out / "checkpoint.pt").read_bytes() == good
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_full_disk_while_writing_samples_exits_2(tiny_mnist, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_script(gan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *MLP_TINY]) == 0
    monkeypatch.setattr(np, "savez", no_space)
    capsys.readouterr()
    assert run_script(gan, ["--out", out, "--generate", 4]) == 2
    one_line_error(capsys, "No space left on device")


def child_run(tiny_mnist, out, epochs, before=""):
    """A training run in a child process that we can kill -9; `before` is Python run first inside the child."""
    argv = ["--data-dir", str(tiny_mnist), "--out", str(out), "--epochs", str(epochs), *map(str, TINY)]
    code = f"import sys, dcgan\n{before}\nsys.exit(dcgan.main({argv!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_resumable(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    # The child dies by SIGKILL in the middle of writing epoch 2's checkpoint, half the bytes written.
    die_mid_write = """
import os, signal, torch
real_save, saves = torch.save, []
def save_then_die(obj, f, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
        f.write(b"half a checkpoint"); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save_then_die
"""
    child = child_run(tiny_mnist, out, 5, die_mid_write)
    assert child.wait(timeout=120) == -9
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert run_script(dcgan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 2, "--resume", *TINY]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_kill_9_at_any_moment_leaves_a_resumable_checkpoint_of_a_finished_epoch(tiny_mnist, tmp_path):
    import random
    out = tmp_path / "run"
    child = child_run(tiny_mnist, out, 200)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1.0))  # then somewhere in a later epoch: training, or writing files
    child.kill()
    child.wait(timeout=30)
    epoch = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert epoch >= 1
    assert run_script(dcgan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", epoch + 1, "--resume", *TINY]) == 0


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, timeout=150, extra=()):
    """`torchrun` (python -m torch.distributed.run) on 127.0.0.1, gloo, one thread per process, with a timeout so a
    hung process group cannot stall the suite. Returns the CompletedProcess."""
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *extra]
    if not extra:
        command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": here}
    return subprocess.run(command + [str(a) for a in args], cwd=here, env=env, capture_output=True, text=True,
                          timeout=timeout)


GRADIENT_WORKER = """
import sys, torch, torch.distributed as dist
import gan, cgan, dcgan, wgan_gp
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
y = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
for script in (gan, cgan, dcgan, wgan_gp):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    whole = torch.autograd.grad(((model(x) - y) ** 2).mean(), list(model.parameters()))  # one process, whole batch
    ((model(x.tensor_split(world)[rank]) - y.tensor_split(world)[rank]) ** 2).mean().backward()  # this half
    script.average_gradients(model)
    for p, g in zip(model.parameters(), whole):
        torch.testing.assert_close(p.grad, g)
    assert script.replicas_agree(model)
    with torch.no_grad():
        model[0].weight[0, 0] += rank * 1e-6  # one replica drifts
    assert not script.replicas_agree(model)
open(f"{sys.argv[1]}/ok{rank}", "w").close()  # a file per rank: printed lines of two processes can interleave
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_averaging_halves_of_a_batch_get_the_whole_batch_gradient(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(GRADIENT_WORKER)
    result = torchrun([worker, tmp_path])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()  # both ranks got to the end


@pytest.mark.slow
@pytest.mark.parametrize("script", [*TRAINING_SCRIPTS, acgan, lapgan])  # infogan and began: tests of their own
def test_torchrun_two_processes_write_every_output_once_and_resume(script, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    flags = ["--data-dir", tiny_mnist, "--out", out, "--device", "cpu", *tiny_flags(script)]
    result = torchrun([f"{script.__name__}.py", *flags, "--epochs", 1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("epoch 1: ") == 1  # only rank 0 reports
    result = torchrun([f"{script.__name__}.py", *flags, "--epochs", 2, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epochs 2..2" in result.stdout
    metric_names = script.metric_names("non-saturating") if script in LOSS_SCRIPTS else []
    assert_run_outputs(out, 2, metric_names)  # one row per epoch, one grid per epoch: written once
    assert run_script(script, ["--out", out, "--generate", 4]) == 0  # afterwards, in one process


@pytest.mark.slow
def test_two_torchrun_launches_on_loopback_act_as_two_nodes(tiny_mnist, tmp_path):
    port = free_port()
    runs = []
    for node in range(2):
        here = os.path.dirname(os.path.abspath(__file__))
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "gan-test",
                   "--local_addr", "127.0.0.1",
                   "dcgan.py", "--data-dir", str(tiny_mnist), "--out", str(tmp_path / f"node{node}"), "--epochs", "2",
                   "--device", "cpu", *map(str, TINY)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": here}
        runs.append(subprocess.Popen(command, cwd=here, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True))
    outputs = [run.communicate(timeout=150) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    written = [node for node in range(2) if (tmp_path / f"node{node}" / "checkpoint.pt").exists()]
    assert len(written) == 1  # only the global rank 0 writes, whichever node it landed on
    assert torch.load(tmp_path / f"node{written[0]}" / "checkpoint.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_a_batch_that_does_not_split_over_the_processes_exits_2(script, tiny_mnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it; refused before joining a group
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", tmp_path / "run", "--epochs", 1,
                               *tiny_flags(script), "--batch-size", 15]) == 2
    one_line_error(capsys, "--batch-size 15", "2 processes")


def test_running_out_of_gpu_memory_is_one_line_naming_what_to_lower(tiny_mnist, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dcgan, "train_step", out_of_memory)
    assert run_script(dcgan, ["--data-dir", tiny_mnist, "--out", tmp_path / "run", "--epochs", 1, *TINY]) == 2
    one_line_error(capsys, "out of GPU memory", "--batch-size")


def test_an_empty_image_folder_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_script(dcgan, ["--dataset", tmp_path / "empty", "--out", tmp_path / "run", "--epochs", 1, *TINY]) == 2
    one_line_error(capsys, "no images", "empty")


def test_every_test_the_readmes_fault_table_names_exists():
    here = os.path.dirname(os.path.abspath(__file__))
    readme = open(os.path.join(here, "README.md"), encoding="utf-8").read()
    table = readme[readme.index("### Bad input and faults"):]
    table = table[:table.index("\n\n", table.index("| class of bad input"))]
    named = set(re.findall(r"`(test_\w+)`", table))
    assert len(named) > 20
    defined = {name for name in globals() if name.startswith("test_")}
    assert named <= defined, named - defined


def test_r1_penalty_is_the_squared_gradient_norm_at_the_real_images():
    weight = torch.randn(1, 2 * 3 * 3)
    D = lambda images, labels=None: (images.flatten(1) * weight).sum(1) ** 2  # noqa: E731  grad = 2 (w.x) w
    real = torch.randn(4, 2, 3, 3)
    expected = ((2 * (real.flatten(1) * weight).sum(1, keepdim=True) * weight) ** 2).sum(1).mean()
    torch.testing.assert_close(dcgan.r1_penalty(D, real), expected)


def test_r1_run_trains_and_resumes_with_its_gamma(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_mnist, "--out", out, *TINY]
    assert run_script(dcgan, common + ["--epochs", 1, "--r1-gamma", 1]) == 0
    assert run_script(dcgan, common + ["--epochs", 2, "--resume"]) == 0
    _, checkpoint = assert_run_outputs(out, 2, dcgan.metric_names("non-saturating"))
    assert checkpoint["args"]["r1_gamma"] == 1


# ----------------------------------------------------------------------------------------------------------------
# score.py: the outside classifier's scores, on tiny bar data with 10 classes (trained once per module)
BAR_CLASSES = 10


@pytest.fixture(scope="module")
def bars(tmp_path_factory):
    """A tiny 10-class bar dataset and its classifier, trained with a small budget and cached in the data folder."""
    root = tmp_path_factory.mktemp("score")
    data_dir = make_tiny_mnist(root / "data", n=200, num_classes=BAR_CLASSES)
    with pytest.MonkeyPatch.context() as patch:  # kept for the module: the cache key depends on the budget
        patch.setattr(score, "TRAIN_IMAGES", 3000)  # 15 epochs of 200 images: a few seconds
        patch.setattr(score, "MIN_EPOCHS", 1)
        model, reference, path = score.load_classifier("mnist", data_dir, log=lambda message: None)
        yield {"root": root, "data_dir": data_dir, "model": model, "reference": reference, "path": path}


def bar_samples(path, labels, seed=1, save_labels=None):
    """An npz as --generate writes it: fresh bar images (other noise than the real data) of the given classes."""
    images = bar_images(np.asarray(labels), num_classes=BAR_CLASSES, seed=seed)[..., None]
    arrays = {"images": images} if save_labels is None else {"images": images, "labels": np.asarray(save_labels)}
    np.savez(path, **arrays)
    return str(path)


def run_score(bars, *argv):
    return score.main([*map(str, argv), "--dataset", "mnist", "--data-dir", bars["data_dir"]])


def test_score_classifier_learns_the_bars_and_is_cached_beside_the_data(bars):
    assert bars["reference"]["test_accuracy"] == 1.0
    assert bars["path"].startswith(str(bars["root"])) and bars["path"].endswith("classifier_mnist.pt")
    model, reference, path = score.load_classifier("mnist", bars["data_dir"], log=pytest.fail)  # no retraining
    assert path == bars["path"] and reference["test_accuracy"] == 1.0


def test_score_real_images_score_near_zero_and_are_as_diverse_as_real(bars, tmp_path, capsys):
    labels = np.arange(400) % BAR_CLASSES
    samples = bar_samples(tmp_path / "real.npz", labels, save_labels=labels)
    assert run_score(bars, samples, "--json") == 0
    result = json.loads(capsys.readouterr().out)["samples"][samples]
    collapsed = score.score_samples(bars["model"], bars["reference"], torch.from_numpy(
        bar_images(np.zeros(400, int), num_classes=BAR_CLASSES, seed=1)[:1]).expand(400, 1, 28, 28), None)
    assert result["fid"] < 0.02 * collapsed["fid"]
    assert result["label_accuracy"] == 1.0 and result["classes_covered"] == BAR_CLASSES
    assert 0.8 < result["diversity"] < 1.2 and abs(result["rarest_share"] - 0.1) < 1e-6


def test_score_a_collapsed_set_has_no_diversity_and_covers_one_class(bars, tmp_path, capsys):
    image = bar_images(np.array([3]), num_classes=BAR_CLASSES)[..., None]
    samples = tmp_path / "collapsed.npz"
    np.savez(samples, images=np.repeat(image, 300, axis=0), labels=np.full(300, 3))
    assert run_score(bars, samples) == 0
    report = capsys.readouterr().out
    assert "covered               1/10" in report and "diversity 0.00 of real" in report
    result = score.score_samples(bars["model"], bars["reference"], *score.load_samples(str(samples)))
    assert result["diversity"] < 0.01 and result["classes_covered"] == 1 and result["rarest_share"] == 0


def test_score_codes_recover_a_permuted_mapping(bars, tmp_path, capsys):
    permutation = np.random.default_rng(0).permutation(BAR_CLASSES)  # code c draws class permutation[c]
    codes = np.arange(500) % BAR_CLASSES
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    bar_samples(run_folder / "samples.npz", permutation[codes], save_labels=codes)
    assert run_score(bars, run_folder, "--codes", "--json") == 0
    result = json.loads(capsys.readouterr().out)["samples"][str(run_folder)]
    assert result["code_to_class"] == {str(c): int(permutation[c]) for c in range(BAR_CLASSES)}
    assert result["code_agreement"] == 1.0 and "label_accuracy" not in result


def test_score_best_assignment_is_exact():
    rng = np.random.default_rng(0)
    for num_codes, num_classes in [(5, 5), (4, 6), (6, 4)]:
        counts = rng.integers(0, 20, size=(num_codes, num_classes))
        assignment, matches = score.best_assignment(counts)
        taken = [k for k in assignment if k >= 0]
        assert len(taken) == len(set(taken)) == min(num_codes, num_classes)
        assert matches == sum(counts[c, k] for c, k in enumerate(assignment) if k >= 0)
        best = max(sum(counts[c, k] for c, k in zip(codes, classes))
                   for codes in itertools.permutations(range(num_codes), min(num_codes, num_classes))
                   for classes in itertools.permutations(range(num_classes), min(num_codes, num_classes)))
        assert matches == best


def test_score_resizes_32px_colour_samples(bars, tmp_path):
    labels = np.arange(200) % BAR_CLASSES
    images = torch.from_numpy(bar_images(labels, size=28, num_classes=BAR_CLASSES, seed=1)).unsqueeze(1)
    big = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True)
    rgb = big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    result = score.score_samples(bars["model"], bars["reference"], rgb, torch.from_numpy(labels))
    assert result["size"] == [3, 32, 32] and result["label_accuracy"] == 1.0


@pytest.mark.parametrize("case, names", [
    ("missing", ["no samples at", "missing.npz"]),
    ("no-images", ["no 'images' array", "no-images.npz"]),
    ("float-images", ["expected uint8", "float-images.npz"]),
    ("not-an-npz", ["cannot read", "not-an-npz.npz"]),
    ("bad-labels", ["labels 0..12 are not classes 0..9", "--codes"]),
    ("codes-without-labels", ["--codes", "no labels"]),
])
def test_score_bad_input_is_one_line_and_exit_2(bars, tmp_path, capsys, case, names):
    path = tmp_path / f"{case}.npz"
    extra = []
    if case == "no-images":
        np.savez(path, labels=np.zeros(4, np.int64))
    elif case == "float-images":
        np.savez(path, images=np.zeros((4, 28, 28, 1), np.float32))
    elif case == "not-an-npz":
        path.write_text("hello")
    elif case == "bad-labels":
        bar_samples(path, np.arange(20) % BAR_CLASSES, save_labels=np.arange(20) % 13)
    elif case == "codes-without-labels":
        bar_samples(path, np.arange(20) % BAR_CLASSES)
        extra = ["--codes"]
    assert run_score(bars, path, *extra) == 2
    one_line_error(capsys, "score.py: error:", *names)


def test_score_bad_flags_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        score.main(["x.npz", "--dataset", "cifar"])
    assert exit_info.value.code == 2
    one_line_error(capsys, "score.py: error:", "--dataset")


# ----------------------------------------------------------------------------------------------------------------
# infogan.py: the latent codes, Q, the information term, and the run contract on tiny offline data
INFO_TINY = [*TINY, "--width", "4"]  # latent 8, batch 16, width 4; 10 categories and 2 continuous codes (defaults)


def info_models(image_size=28, channels=1, width=4, categories=10, continuous=2, latent_dim=8):
    G = infogan.Generator(latent_dim, categories, continuous, image_size, channels, width)
    D = infogan.Discriminator(categories, continuous, image_size, channels, width)
    G.apply(infogan.init_weights)
    D.apply(infogan.init_weights)
    return G, D


def info_run(data_dir, out, *flags):
    return run_script(infogan, ["--data-dir", data_dir, "--out", out, *INFO_TINY, *flags])


# ----------------------------------------------------------------------------------------------------------------
# Models

@pytest.mark.parametrize("image_size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_infogan_output_shapes_follow_image_size_channels_and_codes(image_size, channels):
    G, D = info_models(image_size, channels, categories=7, continuous=3)
    z, code_cat, code_cont = infogan.sample_latent(5, G, "cpu")
    assert z.shape == (5, 8) and code_cat.shape == (5,) and code_cont.shape == (5, 3)
    assert code_cat.dtype == torch.int64 and 0 <= code_cat.min() and code_cat.max() < 7
    assert code_cont.abs().max() <= 1
    fake = G(z, code_cat, code_cont)
    assert fake.shape == (5, channels, image_size, image_size) and fake.abs().max() <= 1
    assert D(fake).shape == (5,)
    logits, (code_logits, code_means) = D(fake, recognise=True)
    assert logits.shape == (5,) and code_logits.shape == (5, 7) and code_means.shape == (5, 3)
    torch.testing.assert_close(logits, D(fake))  # the same logit either way


def test_infogan_has_the_papers_mnist_architecture_at_width_64():
    G, D = info_models(width=64, latent_dim=62)
    layers = lambda net, kind: [m for m in net.modules() if isinstance(m, kind)]  # noqa: E731
    assert [(m.in_features, m.out_features) for m in layers(G, nn.Linear)] == [(62 + 10 + 2, 1024), (1024, 128 * 49)]
    assert [(m.in_channels, m.out_channels, m.stride) for m in layers(G, nn.ConvTranspose2d)] == [
        (128, 64, (2, 2)), (64, 1, (2, 2))]
    assert isinstance(G.net[-1], nn.Tanh) and isinstance(G.net[-2], nn.ConvTranspose2d)  # no BN on the output
    assert [(m.in_channels, m.out_channels, m.stride) for m in layers(D, nn.Conv2d)] == [
        (1, 64, (2, 2)), (64, 128, (2, 2))]
    assert isinstance(D.body[1], nn.LeakyReLU) and D.body[1].negative_slope == 0.1  # no BN after the first layer
    assert [(m.in_features, m.out_features) for m in layers(D.body, nn.Linear)] == [(128 * 49, 1024)]
    assert D.logit.in_features == 1024 and D.logit.out_features == 1
    assert [(m.in_features, m.out_features) for m in layers(D.q, nn.Linear)] == [(1024, 128), (128, 10 + 2)]
    assert len(layers(D, nn.BatchNorm2d)) == 1 and len(layers(D, nn.BatchNorm1d)) == 2  # body fc and Q's fc


def test_infogan_adds_one_stride_2_layer_per_doubling_beyond_32():
    def convs(module):
        return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in module.modules())

    (G28, D28), (G32, D32), (G64, D64) = info_models(28), info_models(32), info_models(64)
    assert convs(G28) == convs(G32) == 2 and convs(D28) == convs(D32) == 2
    assert convs(G64) == 3 and convs(D64) == 3


def test_infogan_generator_output_depends_on_every_code():
    torch.manual_seed(0)
    G = infogan.Generator(8, 10, 2, 28, 1, 4).eval()  # PyTorch's default init: larger weights than DCGAN's
    z = torch.randn(1, 8).repeat(10, 1)
    fake = G(z, torch.arange(10), torch.zeros(10, 2))
    assert all((fake[0] - fake[k]).abs().max() > 1e-4 for k in range(1, 10))
    sweep = G(z[:3], torch.zeros(3, dtype=torch.int64), torch.tensor([[-2.0, 0.0], [0.0, 0.0], [0.0, 2.0]]))
    assert (sweep[0] - sweep[1]).abs().max() > 1e-4 and (sweep[1] - sweep[2]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Losses and the information term

def test_infogan_gan_losses_match_hand_computed_values():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    expected_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    torch.testing.assert_close(infogan.d_loss(real, fake), expected_d)
    torch.testing.assert_close(infogan.g_loss(fake), -torch.log(sig(fake)).mean())  # non-saturating


def test_infogan_information_terms_match_hand_computed_values_and_gradients():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], requires_grad=True)
    codes = torch.tensor([0, 2])
    expected_cat = (-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))) + math.log(3)) / 2
    assert infogan.categorical_nll(logits, codes).item() == pytest.approx(expected_cat, rel=1e-6)

    # A unit-variance Gaussian NLL per code, summed over the codes: 0.5 * (log 2 pi + (c - mean)^2).
    means = torch.tensor([[0.5, -1.0], [0.0, 0.2]], requires_grad=True)
    values = torch.tensor([[1.0, -1.0], [-1.0, 0.8]])
    log_2pi = math.log(2 * math.pi)
    per_sample = [0.5 * (log_2pi + 0.25) + 0.5 * log_2pi, 0.5 * (log_2pi + 1.0) + 0.5 * (log_2pi + 0.36)]
    nll = infogan.continuous_nll(means, values)
    assert nll.item() == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    (grad_means,) = torch.autograd.grad(nll, means)  # (mean - c) / batch: a plain squared error's
    torch.testing.assert_close(grad_means, torch.tensor([[-0.5, 0.0], [1.0, -0.6]]) / 2)

    q = (logits, means)
    total, cat, cont = infogan.information_loss(q, codes, values, lambda_cat=1.0, lambda_cont=0.1)
    assert cat.item() == pytest.approx(expected_cat, rel=1e-6) and cont.item() == pytest.approx(nll.item())
    assert total.item() == pytest.approx(expected_cat + 0.1 * nll.item(), rel=1e-6)
    total, _, _ = infogan.information_loss(q, codes, values, lambda_cat=0.0, lambda_cont=2.0)
    assert total.item() == pytest.approx(2 * nll.item(), rel=1e-6)


def test_information_term_reaches_g_q_and_the_shared_body_but_not_the_real_fake_head():
    torch.manual_seed(0)
    G, D = info_models()
    z, code_cat, code_cont = infogan.sample_latent(16, G, "cpu")
    _, q = D(G(z, code_cat, code_cont), recognise=True)
    info, _, _ = infogan.information_loss(q, code_cat, code_cont, 1.0, 0.1)
    groups = {"G": list(G.parameters()), "Q": list(D.q.parameters()), "body": list(D.body.parameters()),
              "logit": list(D.logit.parameters())}
    grads = dict(zip(groups, [torch.autograd.grad(info, params, retain_graph=True, allow_unused=True)
                              for params in groups.values()]))
    for name in ("G", "Q", "body"):
        assert all(g is not None and g.abs().sum() > 0 for g in grads[name]), name
    assert all(g is None for g in grads["logit"])  # the real/fake logit is not part of Q


def test_infogan_train_step_reads_codes_from_fakes_only_and_updates_d_then_g():
    torch.manual_seed(0)
    G, D = info_models()
    args = infogan.parse_args(["--lr", "1e-3"])
    opt_g, opt_d = infogan.make_optimizers(args, G, D)
    log, changed = watch_steps(G, D, opt_g, opt_d)
    real = torch.rand(16, 1, 28, 28) * 2 - 1
    calls = []
    forward = D.forward

    def recording_forward(images, recognise=False):
        calls.append((images is real, recognise))
        return forward(images, recognise)

    D.forward = recording_forward
    metrics = infogan.train_step(G, D, opt_g, opt_d, real, no_scaler())
    assert calls == [(True, False), (False, True), (False, True)]  # real: the logit only; fakes: logit and Q
    assert [name for name, _ in log] == ["D", "G"]
    (_, at_d_step), (_, at_g_step) = log
    assert all(g is None for g in at_d_step["G"][1])  # D's step: the fakes were detached
    assert all(g is not None for g in at_d_step["D"][1])  # Q's layers too: the information term trains them
    assert not at_g_step["G"][0] and at_g_step["D"][0]
    assert all(g is not None and g.abs().sum() > 0 for g in at_g_step["G"][1])
    assert all(torch.equal(a, b) for a, b in zip(at_d_step["D"][1], at_g_step["D"][1]))  # G's step left D alone
    assert changed("G") and changed("D") and all(p.requires_grad for p in D.parameters())
    assert metrics.shape == (len(infogan.METRICS),) and torch.isfinite(metrics).all()


def test_information_weights_change_q_and_g_but_not_ds_real_fake_gradient():
    def step_gradients(lambda_cat, lambda_cont):
        torch.manual_seed(0)
        G, D = info_models()
        opt_g, opt_d = infogan.make_optimizers(infogan.parse_args([]), G, D)
        log, _ = watch_steps(G, D, opt_g, opt_d)
        real = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
        infogan.train_step(G, D, opt_g, opt_d, real, no_scaler(), lambda_cat, lambda_cont)
        names = [name for name, _ in D.named_parameters()]
        at_d = dict(zip(names, log[0][1]["D"][1]))
        return at_d, log[1][1]["G"][1]

    with_info, without_info = step_gradients(1.0, 0.1), step_gradients(0.0, 0.0)
    for name, grad in with_info[0].items():
        if name.startswith("logit."):  # D's real/fake head: the same gradient whatever the information weights
            torch.testing.assert_close(grad, without_info[0][name])
        if name.startswith("q."):  # Q's layers learn from the information term alone
            assert without_info[0][name].abs().max() == 0 and grad.abs().max() > 0, name
    assert any(not torch.allclose(a, b) for a, b in zip(with_info[1], without_info[1]))  # and G is pushed by it


def test_make_optimizers_gives_q_gs_learning_rate_and_d_its_own():
    G, D = info_models()
    opt_g, opt_d = infogan.make_optimizers(infogan.parse_args(["--lr", "3e-4", "--lr-g", "2e-3"]), G, D)
    assert opt_g.param_groups[0]["lr"] == 2e-3 and opt_g.param_groups[0]["betas"] == (0.5, 0.999)
    body_and_logit, q = opt_d.param_groups
    assert body_and_logit["lr"] == 3e-4 and q["lr"] == 2e-3
    assert {id(p) for p in q["params"]} == {id(p) for p in D.q.parameters()}
    assert len(body_and_logit["params"]) + len(q["params"]) == len(list(D.parameters()))


def test_sweep_grid_changes_only_one_continuous_code_along_each_row():
    G, _ = info_models(continuous=3)
    z, code_cat, code_cont = infogan.sweep_latents(G, 1, columns=5, seed=0, device="cpu")
    assert len(z) == 10 * 5 and (z == z[0]).all()  # the same z everywhere
    assert code_cat.tolist() == [k for k in range(10) for _ in range(5)]  # one row per categorical value
    torch.testing.assert_close(code_cont[:, 1], torch.linspace(-2, 2, 5).repeat(10))
    assert (code_cont[:, [0, 2]] == 0).all()
    z, code_cat, code_cont = infogan.grid_latents(G, 10, seed=0, device="cpu")
    assert code_cat.tolist() == [k for k in range(10) for _ in range(10)]
    assert torch.equal(z[:10], z[10:20]) and torch.equal(code_cont[:10], code_cont[90:])  # a column: one style


# ----------------------------------------------------------------------------------------------------------------
# Runs

def test_infogan_run_writes_every_output_with_code_grids_and_d_accuracy(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert info_run(tiny_mnist, out, "--epochs", 2) == 0
    rows, checkpoint = assert_run_outputs(out, 2, infogan.METRICS + ["d_acc_real_train", "d_acc_real_test",
                                                                     "d_acc_fake"])
    assert all(0 <= float(row[k]) <= 1 for row in rows for k in ("d_acc_real_train", "d_acc_real_test",
                                                                 "d_acc_fake", "code_acc"))
    assert checkpoint["script"] == "infogan.py" and checkpoint["args"]["image_size"] == 28
    assert Image.open(out / "samples" / "epoch_002.png").size == (2 + 10 * 30, 2 + 10 * 30)  # a row per code value
    for code in (1, 2):  # one sweep per continuous code: rows = code values, columns = -2..2
        assert Image.open(out / f"continuous_{code}.png").size == (2 + 10 * 30, 2 + 10 * 30)
    assert not (out / "continuous_3.png").exists()
    printed = capsys.readouterr().out
    assert "labels unused" in printed and "epoch 2: D calls real" in printed


def test_infogan_never_reads_the_labels(tmp_path):
    """The same seed on the same images with every label replaced gives the same weights: unsupervised."""
    original = make_tiny_mnist(tmp_path / "a", n=80, num_classes=10)
    relabelled = tmp_path / "b"
    shutil.copytree(original, relabelled)
    for split in ("train", "t10k"):
        write_idx(relabelled / "mnist" / f"{split}-labels-idx1-ubyte.gz", (7 * np.arange(80) + 3) % 10)
    labels = [data.load_dataset("mnist", folder).labels for folder in (original, relabelled)]
    assert not torch.equal(*labels)
    weights = []
    for data_dir, name in ((original, "a"), (relabelled, "b")):
        assert info_run(data_dir, tmp_path / f"run_{name}", "--epochs", 1) == 0
        checkpoint = torch.load(tmp_path / f"run_{name}" / "checkpoint.pt", weights_only=True)
        weights.append({**checkpoint["generator"], **{f"D.{k}": v for k, v in checkpoint["discriminator"].items()}})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_infogan_resume_continues_exactly(tiny_mnist, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert info_run(tiny_mnist, straight, "--epochs", 2) == 0
    assert info_run(tiny_mnist, resumed, "--epochs", 1) == 0
    capsys.readouterr()
    assert info_run(tiny_mnist, resumed, "--epochs", 2, "--resume") == 0
    assert "epochs 2..2" in capsys.readouterr().out
    a, b = (torch.load(out / "checkpoint.pt", weights_only=True) for out in (straight, resumed))
    for key in ("generator", "generator_average", "discriminator"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert_run_outputs(resumed, 2, infogan.METRICS)


def test_infogan_resume_refuses_other_code_settings(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert info_run(tiny_mnist, out, "--epochs", 1) == 0
    capsys.readouterr()
    assert info_run(tiny_mnist, out, "--epochs", 2, "--resume", "--categories", 5) == 2
    one_line_error(capsys, "--categories 5", "--categories 10")


def test_infogan_generate_labels_are_the_categorical_codes(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert info_run(tiny_mnist, out, "--epochs", 1, "--categories", 4) == 0
    assert run_script(infogan, ["--out", out, "--generate", 25]) == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (25, 28, 28, 1) and samples["images"].dtype == np.uint8
    assert samples["labels"].dtype == np.int64 and list(samples["labels"][:6]) == [0, 1, 2, 3, 0, 1]
    assert Image.open(out / "samples.png").size == (2 + 10 * 30, 2 + 3 * 30)
    assert run_script(infogan, ["--out", out, "--generate", 6, "--label", 3]) == 0
    three = np.load(out / "samples.npz")
    assert (three["labels"] == 3).all()
    capsys.readouterr()
    assert run_script(infogan, ["--out", out, "--generate", 6, "--label", 4]) == 2  # codes 0..3
    one_line_error(capsys, "--label 4", "0..3")


def test_infogan_generate_draws_the_code_asked_for():
    """With --label K every image is drawn with categorical code K: compare against G itself."""
    torch.manual_seed(0)
    G, _ = info_models()
    images = infogan.generate_images(G, torch.full((4,), 6), "cpu", seed=3)
    noise = torch.Generator().manual_seed(3)
    z, _, code_cont = infogan.sample_latent(4, G, "cpu", generator=noise)
    with torch.no_grad():
        expected = data.to_uint8(G.eval()(z, torch.full((4,), 6), code_cont))
    assert torch.equal(images, expected)


def test_infogan_on_an_rgb_folder_at_32_and_64px(rgb_folder, tmp_path):
    for size in (32, 64):
        out = tmp_path / f"run{size}"
        assert run_script(infogan, ["--dataset", rgb_folder, "--out", out, "--epochs", 1, *INFO_TINY,
                                    "--image-size", size, "--categories", 2, "--continuous", 1]) == 0
        rows, checkpoint = assert_run_outputs(out, 1, infogan.METRICS)
        assert rows[0]["d_acc_real_test"] == ""  # a folder has no held-out split
        assert checkpoint["image_shape"] == [3, size, size]
        assert Image.open(out / "samples" / "epoch_001.png").size == (2 + 10 * (size + 2), 2 + 2 * (size + 2))
        assert (out / "continuous_1.png").exists() and not (out / "continuous_2.png").exists()


def test_infogan_without_continuous_codes(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert info_run(tiny_mnist, out, "--epochs", 1, "--continuous", 0) == 0
    rows, _ = assert_run_outputs(out, 1, infogan.METRICS)
    assert float(rows[0]["info_cont"]) == 0 and not (out / "continuous_1.png").exists()


def test_infogan_amp_run_gives_finite_losses(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert info_run(tiny_mnist, out, "--epochs", 1, "--amp") == 0
    assert_run_outputs(out, 1, infogan.METRICS)


INFOGAN_BAD = [["--width", 0], ["--categories", 0], ["--continuous", -1], ["--lambda-cat", -1],
               ["--lambda-cont", "nan"], ["--lr-g", 0], ["--image-size", 30], ["--image-size", 48],
               ["--image-size", 16], ["--label", 3], ["--generate", 4, "--label", -1]]


def test_infogan_every_bad_number_exits_2_with_one_line_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    for bad in BAD_NUMBERS + INFOGAN_BAD:
        assert exit_code(infogan, ["--out", tmp_path / "run", *bad]) == 2, bad
        err = one_line_error(capsys, str(bad[-2]))
        assert err.startswith("infogan.py: error: "), err


@pytest.mark.parametrize("bad", [["--epochs", "ten"], ["--categories", "many"], ["--loss", "hinge"],
                                 ["--conditional"]])
def test_infogan_argparse_errors_are_one_line_too(bad, capsys):
    assert exit_code(infogan, bad) == 2
    one_line_error(capsys, "infogan.py: error:")


@pytest.mark.parametrize("bad", [["--dataset", "nonexistent"], ["--generate", 5]])
def test_infogan_bad_input_exits_2_with_one_line(bad, tiny_mnist, tmp_path, capsys):
    assert run_script(infogan, ["--data-dir", tiny_mnist, "--out", tmp_path / "empty", *INFO_TINY, *bad]) == 2
    assert one_line_error(capsys).startswith("infogan.py: error: ")


def test_infogan_refuses_another_scripts_checkpoint(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script(dcgan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *TINY]) == 0
    capsys.readouterr()
    assert info_run(tiny_mnist, out, "--epochs", 2, "--resume") == 2
    one_line_error(capsys, "was written by dcgan.py with --image-size 32", "this is infogan.py")
    assert run_script(infogan, ["--out", out, "--generate", 4]) == 2
    one_line_error(capsys, "was written by dcgan.py")


def test_infogan_checkpoint_that_does_not_fit_exits_2(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert info_run(tiny_mnist, out, "--epochs", 1) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["generator_average"]["net.0.weight"] = torch.zeros(3, 3)
    torch.save(checkpoint, out / "checkpoint.pt")
    capsys.readouterr()
    assert run_script(infogan, ["--out", out, "--generate", 4]) == 2
    one_line_error(capsys, "checkpoint.pt", "does not fit")


def test_infogan_too_few_images_per_step_for_batchnorm_exits_2(tmp_path, capsys):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "only.png")
    assert run_script(infogan, ["--dataset", folder, "--out", tmp_path / "run", *INFO_TINY, "--image-size", 32]) == 2
    one_line_error(capsys, "BatchNorm", "at least 2 images")


def test_infogan_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert info_run(tiny_mnist, out, "--epochs", 1) == 0
    monkeypatch.setattr(infogan, "g_loss", lambda logits: logits.float().mean() * float("nan"))
    assert info_run(tiny_mnist, out, "--epochs", 3, "--resume") == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_infogan_ctrl_c_exits_130_with_the_last_epoch_saved(tiny_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_step = infogan.train_step

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) > 5:  # during epoch 2 (80 images in batches of 16: 5 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(infogan, "train_step", interrupted_step)
    assert info_run(tiny_mnist, out, "--epochs", 3) == 130
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_infogan_fid_flag_scores_images_of_every_code(tiny_mnist, tmp_path, monkeypatch, capsys):
    scored, expected = mock_inception(monkeypatch)
    assert info_run(tiny_mnist, tmp_path / "run", "--epochs", 1, "--fid", 30) == 0
    assert expected() in capsys.readouterr().out
    assert scored[0].shape == (30, 1, 28, 28) and scored[0].dtype == torch.uint8


@pytest.mark.slow
def test_infogan_torchrun_two_processes_write_every_output_once_and_resume(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    flags = ["--data-dir", tiny_mnist, "--out", out, "--device", "cpu", *INFO_TINY]
    result = torchrun(["infogan.py", *flags, "--epochs", 1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("epoch 1: ") == 1
    result = torchrun(["infogan.py", *flags, "--epochs", 2, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_run_outputs(out, 2, infogan.METRICS)
    assert run_script(infogan, ["--out", out, "--generate", 4]) == 0


# ----------------------------------------------------------------------------------------------------------------
# began.py: the autoencoder D, the k_t control and M_global by hand, and the run contract on tiny offline data
BEGAN_RECON = ["d_recon_real_train", "d_recon_real_test", "d_recon_fake"]


@pytest.fixture
def began_mnist(tmp_path):
    """tmp_path/mnist/ with 80 training images in all 10 classes, as gzipped IDX files."""
    return make_tiny_mnist(tmp_path, n=80, num_classes=10)


def began_models(image_size=32, channels=1, width=4, latent_dim=8, convs=1):
    return (began.Generator(latent_dim, image_size, channels, width, convs),
            began.Discriminator(image_size, channels, width, latent_dim, convs))


# ----------------------------------------------------------------------------------------------------------------
# The variant's formulas, against numbers worked out by hand

def test_began_k_update_is_the_papers_clipped_proportional_control():
    t = torch.tensor
    # k + lambda_k (gamma L(x) - L(G(z))) = 0.5 + 0.001 * (0.5 * 0.2 - 0.15) = 0.5 - 0.00005
    assert began.update_k(t(0.5), t(0.2), t(0.15), 0.5, 0.001).item() == pytest.approx(0.49995, abs=1e-7)
    # fakes reconstructed too well (L(G(z)) = 0.02 < gamma L(x) = 0.1): k grows, by 0.001 * 0.08
    assert began.update_k(t(0.1), t(0.2), t(0.02), 0.5, 0.001).item() == pytest.approx(0.10008, abs=1e-7)
    # gamma 0.3 moves the set point: 0.3 * 0.2 - 0.02 = 0.04
    assert began.update_k(t(0.1), t(0.2), t(0.02), 0.3, 0.001).item() == pytest.approx(0.10004, abs=1e-7)
    # clipped to [0, 1] at both ends
    assert began.update_k(t(0.0), t(0.2), t(0.9), 0.5, 0.001).item() == 0.0
    assert began.update_k(t(0.99995), t(1.0), t(0.0), 0.5, 0.001).item() == 1.0
    assert began.update_k(t(0.3), t(0.2), t(0.9), 0.5, 0.0).item() == pytest.approx(0.3)  # lambda_k 0: frozen


def test_began_convergence_measure_is_l_real_plus_the_absolute_imbalance():
    t = torch.tensor
    # 0.2 + |0.5 * 0.2 - 0.15| = 0.25, and the same from the other side: 0.2 + |0.1 - 0.05| = 0.25
    assert began.convergence_measure(t(0.2), t(0.15), 0.5).item() == pytest.approx(0.25)
    assert began.convergence_measure(t(0.2), t(0.05), 0.5).item() == pytest.approx(0.25)
    assert began.convergence_measure(t(0.2), t(0.1), 0.5).item() == pytest.approx(0.2)  # in balance: just L(x)
    assert began.convergence_measure(t(0.4), t(0.1), 0.7).item() == pytest.approx(0.4 + 0.18)


def test_began_losses_are_l1_reconstruction_with_k_weighted_fakes():
    images = torch.tensor([[[[0.5, -1.0], [0.0, 1.0]]], [[[0.2, 0.2], [0.2, 0.2]]]])
    halving = lambda x: x / 2  # noqa: E731  a "D" whose reconstruction is half its input: L = mean |x| / 2
    torch.testing.assert_close(began.reconstruction_loss(halving, images), torch.tensor([2.5 / 8, 0.1]))
    l_real = torch.tensor(0.3, requires_grad=True)
    l_fake = torch.tensor(0.2, requires_grad=True)
    loss = began.d_loss(l_real, l_fake, torch.tensor(0.25))
    assert loss.item() == pytest.approx(0.3 - 0.25 * 0.2)
    assert [g.item() for g in torch.autograd.grad(loss, (l_real, l_fake))] == [1.0, -0.25]
    assert began.g_loss(l_fake) is l_fake


def test_began_d_is_an_autoencoder_and_g_has_its_decoders_shape():
    for image_size in (32, 64):
        for channels in (1, 3):
            G, D = began_models(image_size, channels, convs=2)
            fake = G(began.sample_z(5, 8, "cpu"))
            assert fake.shape == (5, channels, image_size, image_size) and fake.abs().max() <= 1
            assert D(fake).shape == fake.shape  # D reconstructs, it does not classify
            shapes = lambda module: [p.shape for p in module.parameters()]  # noqa: E731
            assert shapes(G.decoder) == shapes(D.decoder)  # the same architecture, weights of their own
    G, D = began_models()
    modules = [*G.modules(), *D.modules()]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ConvTranspose2d, nn.LeakyReLU, nn.ReLU)) for m in modules)
    assert any(isinstance(m, nn.ELU) for m in modules)
    assert all(m.mode == "nearest" for m in modules if isinstance(m, nn.Upsample))
    z = began.sample_z(1000, 8, "cpu")
    assert z.min() >= -1 and z.max() <= 1 and z.abs().mean() > 0.4  # uniform on [-1, 1], not normal


def test_began_one_more_block_per_doubling_and_width_and_convs_scale_it():
    def convs(module):
        return sum(isinstance(m, nn.Conv2d) for m in module.modules())

    (G32, D32), (G64, D64) = began_models(32), began_models(64)
    # G: one more resolution's conv; D: that, plus one more stride-2 conv in the encoder
    assert convs(G64) == convs(G32) + 1 and convs(D64) == convs(D32) + 3
    (G2, D2) = began_models(32, convs=2)
    assert convs(G2) == convs(G32) + 3  # one more per resolution: 8, 16, 32
    params = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert params(began_models(width=8)[1]) > 2 * params(began_models(width=4)[1])


def test_began_train_step_updates_d_then_g_and_k_from_ds_losses():
    torch.manual_seed(0)
    G, D = began_models()
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    G0, D0 = [p.clone() for p in G.parameters()], [p.clone() for p in D.parameters()]
    order = []
    for name, opt in (("G", opt_g), ("D", opt_d)):
        step = opt.step
        opt.step = lambda *a, _name=name, _step=step, **kw: (order.append(_name), _step(*a, **kw))[1]
    k = torch.tensor(0.3)
    real = torch.rand(6, 1, 32, 32) * 2 - 1
    metrics = began.train_step(G, D, opt_g, opt_d, real, k, 8, 0.5, 0.01, no_scaler())
    assert order == ["D", "G"]
    assert metrics.shape == (len(began.METRICS) - 1,) and torch.isfinite(metrics).all()
    d_value, g_value, l_real, l_fake, m_global = metrics.tolist()
    assert d_value == pytest.approx(l_real - 0.3 * l_fake, rel=1e-5)
    assert m_global == pytest.approx(l_real + abs(0.5 * l_real - l_fake), rel=1e-5)
    assert k.item() == pytest.approx(min(max(0.3 + 0.01 * (0.5 * l_real - l_fake), 0), 1), rel=1e-5)  # in place
    assert all(not torch.equal(p, q) for p, q in zip(G.parameters(), G0))
    assert any(not torch.equal(p, q) for p, q in zip(D.parameters(), D0))
    assert all(p.requires_grad for p in D.parameters())  # unfrozen again after G's step


def test_began_reconstruction_columns_measure_d_on_train_held_out_and_fakes():
    D = lambda images: torch.zeros_like(images)  # noqa: E731  reconstructs everything as grey: L = mean |x|
    D.eval = D.train = lambda: None
    D.parameters = lambda: iter([torch.zeros(1)])
    G = lambda z: -torch.ones(len(z), 1, 4, 4)  # noqa: E731  black fakes: L = 1
    G.eval = G.train = lambda: None
    white = torch.full((6, 1, 4, 4), 255, dtype=torch.uint8)
    losses = began.d_reconstruction(D, G, {"d_recon_real_train": white, "d_recon_real_test": None}, latent_dim=3)
    assert losses == {"d_recon_real_train": "1.00000", "d_recon_real_test": "", "d_recon_fake": "1.00000"}


# ----------------------------------------------------------------------------------------------------------------
# Runs: every contract output, exact resume, generate, faults and bad input

def began_run(data_dir, out, *flags):
    return run_script(began, ["--data-dir", data_dir, "--out", out, *TINY, *flags])


def test_began_short_run_writes_every_contract_output(began_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert began_run(began_mnist, out, "--epochs", 2) == 0
    rows, checkpoint = assert_run_outputs(out, 2, began.METRICS + BEGAN_RECON)
    assert checkpoint["script"] == "began.py" and 0 <= checkpoint["k"] <= 1
    assert float(rows[-1]["k"]) == pytest.approx(checkpoint["k"], abs=1e-5)
    assert Image.open(out / "samples" / "epoch_002.png").size == (2 + 10 * 34, 2 + 10 * 34)  # 10x10 of 32x32
    assert Image.open(out / "progress.gif").n_frames == 2
    assert "M_global" in capsys.readouterr().out


def test_began_resume_is_exact(began_mnist, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert began_run(began_mnist, straight, "--epochs", 2) == 0
    assert began_run(began_mnist, split, "--epochs", 1) == 0
    capsys.readouterr()
    assert began_run(began_mnist, split, "--epochs", 2, "--resume") == 0
    assert "epochs 2..2" in capsys.readouterr().out
    a, b = (torch.load(out / "checkpoint.pt", weights_only=True) for out in (straight, split))
    assert a["k"] == b["k"]
    for key in ("generator", "generator_average", "discriminator"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    rows = []
    for out in (straight, split):
        with open(out / "metrics.csv", newline="") as f:
            rows.append([{k: v for k, v in row.items() if k not in ("seconds", "img_per_s")}
                         for row in csv.DictReader(f)])
    assert rows[0] == rows[1]


def test_began_resume_keeps_the_runs_gamma_and_refuses_another(began_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert began_run(began_mnist, out, "--epochs", 1, "--gamma", 0.7) == 0
    assert began_run(began_mnist, out, "--epochs", 2, "--resume") == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["gamma"] == 0.7
    capsys.readouterr()
    assert began_run(began_mnist, out, "--epochs", 3, "--resume", "--gamma", 0.3) == 2
    one_line_error(capsys, "--gamma 0.3", "0.7")


def test_began_generate_writes_samples_npz_and_png(began_mnist, tmp_path):
    out = tmp_path / "run"
    assert began_run(began_mnist, out, "--epochs", 1) == 0
    assert run_script(began, ["--out", out, "--generate", 25]) == 0
    samples = np.load(out / "samples.npz")
    assert list(samples) == ["images"]  # unconditional: no labels
    assert samples["images"].shape == (25, 32, 32, 1) and samples["images"].dtype == np.uint8
    assert Image.open(out / "samples.png").size == (2 + 10 * 34, 2 + 3 * 34)
    first = samples["images"].copy()
    assert run_script(began, ["--out", out, "--generate", 25]) == 0
    assert np.array_equal(np.load(out / "samples.npz")["images"], first)  # same seed, same images


def test_began_rgb_folder_with_two_convs_per_resolution(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "faces").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "faces" / f"{i}.png")
    out = tmp_path / "run"
    argv = ["--dataset", tmp_path / "faces", "--out", out, "--epochs", 1, "--convs", 2, "--image-size", 32, *TINY]
    assert run_script(began, argv) == 0
    rows, _ = assert_run_outputs(out, 1, began.METRICS + ["d_recon_real_train", "d_recon_fake"])
    assert rows[0]["d_recon_real_test"] == ""  # a folder has no held-out split
    assert Image.open(out / "samples" / "epoch_001.png").mode == "RGB"
    assert run_script(began, ["--out", out, "--generate", 3]) == 0
    assert np.load(out / "samples.npz")["images"].shape == (3, 32, 32, 3)


def test_began_amp_run_gives_finite_losses(began_mnist, tmp_path):
    out = tmp_path / "run"
    assert began_run(began_mnist, out, "--epochs", 1, "--amp") == 0
    assert_run_outputs(out, 1, began.METRICS + BEGAN_RECON)


def test_began_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(began_mnist, tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "run"
    assert began_run(began_mnist, out, "--epochs", 1) == 0
    good = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(began, "g_loss", lambda l_fake: l_fake * float("nan"))
    capsys.readouterr()
    assert began_run(began_mnist, out, "--epochs", 3, "--resume") == 1
    assert "training diverged" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == good


def test_began_ctrl_c_exits_130_with_the_last_epoch_saved(began_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_step = began.train_step

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) > 5:  # during epoch 2 (80 images in batches of 16: 5 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(began, "train_step", interrupted_step)
    assert began_run(began_mnist, out, "--epochs", 3) == 130
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and "k" in checkpoint
    monkeypatch.setattr(began, "train_step", real_step)
    assert began_run(began_mnist, out, "--epochs", 2, "--resume") == 0


def test_began_fid_flag_prints_the_fid_of_generated_images(began_mnist, tmp_path, monkeypatch, capsys):
    scored, expected = mock_inception(monkeypatch)
    assert began_run(began_mnist, tmp_path / "run", "--epochs", 1, "--fid", 30) == 0
    assert expected() in capsys.readouterr().out
    assert scored[0].shape == (30, 1, 32, 32) and scored[0].dtype == torch.uint8


BEGAN_BAD_NUMBERS = [["--epochs", 0], ["--batch-size", 0], ["--lr", 0], ["--lr", "nan"], ["--latent-dim", 0],
                     ["--width", 0], ["--convs", 0], ["--log-every", 0], ["--generate", 0], ["--fid", 1],
                     ["--gamma", 0], ["--gamma", 1.5], ["--gamma", "nan"], ["--lambda-k", -0.001],
                     ["--lambda-k", "inf"], ["--average-decay", 1], ["--seed", -1], ["--image-size", 48],
                     ["--device", "tpu"], ["--device", "nonsense"]]


def test_began_every_bad_number_exits_2_with_one_line_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    for bad in BEGAN_BAD_NUMBERS:
        assert run_script(began, ["--out", tmp_path / "run", *bad]) == 2, bad
        assert one_line_error(capsys, bad[0]).startswith("began.py: error: ")


@pytest.mark.parametrize("bad", [["--epochs", "ten"], ["--gamma", "high"], ["--label", "3"], ["--no-such-flag"]])
def test_began_argparse_errors_are_one_line_too(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        began.main([str(a) for a in bad])
    assert exit_info.value.code == 2
    one_line_error(capsys, "began.py: error:")


@pytest.mark.parametrize("bad", [["--dataset", "nonexistent"], ["--generate", 5], ["--epochs", 2, "--resume"]])
def test_began_bad_input_exits_2_with_one_line(bad, began_mnist, tmp_path, capsys):
    assert began_run(began_mnist, tmp_path / "empty", "--epochs", 1, *bad) == 2
    assert one_line_error(capsys).startswith("began.py: error: ")


def test_began_corrupt_dataset_file_exits_2_naming_it(began_mnist, tmp_path, capsys):
    path = os.path.join(began_mnist, "mnist", "train-images-idx3-ubyte.gz")
    with open(path, "r+b") as f:
        f.truncate(100)
    assert began_run(began_mnist, tmp_path / "run", "--epochs", 1) == 2
    one_line_error(capsys, "train-images-idx3-ubyte")


def test_began_refuses_another_scripts_checkpoint_and_one_of_another_width(began_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script(dcgan, ["--data-dir", began_mnist, "--out", out, "--epochs", 1, *TINY]) == 0
    capsys.readouterr()
    assert began_run(began_mnist, out, "--epochs", 2, "--resume") == 2
    one_line_error(capsys, "was written by dcgan.py with --image-size 32", "this is began.py")
    assert run_script(began, ["--out", out, "--generate", 4]) == 2
    one_line_error(capsys, "was written by dcgan.py")
    mine = tmp_path / "mine"
    assert began_run(began_mnist, mine, "--epochs", 1) == 0
    checkpoint = torch.load(mine / "checkpoint.pt", weights_only=True)
    checkpoint["args"]["width"] = 6  # weights made for width 4, settings that say 6
    torch.save(checkpoint, mine / "checkpoint.pt")
    capsys.readouterr()
    assert run_script(began, ["--out", mine, "--generate", 4]) == 2
    one_line_error(capsys, "checkpoint.pt", "does not fit")


@pytest.mark.slow
def test_began_torchrun_two_processes_keep_one_k_and_write_every_output_once(began_mnist, tmp_path):
    from test_gans import torchrun

    out = tmp_path / "run"
    flags = ["--data-dir", began_mnist, "--out", out, "--device", "cpu", *TINY]
    result = torchrun(["began.py", *flags, "--epochs", 1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("epoch 1: ") == 1  # only rank 0 reports
    result = torchrun(["began.py", *flags, "--epochs", 2, "--resume"])  # replicas checked equal every epoch
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epochs 2..2" in result.stdout
    _, checkpoint = assert_run_outputs(out, 2, began.METRICS + BEGAN_RECON)
    assert 0 <= checkpoint["k"] <= 1


# began.py --preset paper (issue 17)

def test_began_preset_paper_builds_the_papers_networks_and_one_step_runs_at_64px():
    args = began.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.convs, args.latent_dim, args.batch_size, args.lr, args.gamma,
            args.lambda_k) == (64, 64, 2, 64, 16, 1e-4, 0.5, 0.001)
    G, D = began.build_models(args, (3, 64, 64))
    # By hand, n = 64, RGB, 64x64 (4 resolutions, 8 to 64, two 3x3 convolutions each): decoder = fc 64 -> 64*8*8
    # (266,240) + 8 convs 64->64 (8 x 36,928) + output conv 64->3 (1,731) = 563,395. Encoder = input conv 3->64
    # (1,792) + two convs at 64, 128, 192, 256 channels (73,856 + 295,168 + 663,936 + 1,180,160) + stride-2 convs
    # 64->128, 128->192, 192->256 (73,856 + 221,376 + 442,624) + fc 256*8*8 -> 64 (1,048,640) = 4,001,408.
    assert sum(p.numel() for p in G.parameters()) == 563_395
    assert sum(p.numel() for p in D.encoder.parameters()) == 4_001_408
    assert sum(p.numel() for p in D.parameters()) == 4_001_408 + 563_395
    assert D.encoder.fc.in_features == 256 * 8 * 8 and G.decoder.fc.out_features == 64 * 8 * 8
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scaler.amp = False
    opt_g, opt_d = began.make_optimizers(args, G, D)
    k = torch.zeros(())
    real = torch.rand(2, 3, 64, 64) * 2 - 1
    stats = began.train_step(G, D, opt_g, opt_d, real, k, args.latent_dim, args.gamma, args.lambda_k, scaler)
    assert stats.shape == (len(began.METRICS) - 1,) and torch.isfinite(stats).all() and 0 <= k <= 1


def test_began_a_flag_given_with_the_preset_wins_over_it():
    args = began.parse_args(["--width", "32", "--preset", "paper", "--lr", "5e-5"])
    assert (args.width, args.lr, args.convs, args.image_size) == (32, 5e-5, 2, 64)
    assert began.parse_args([]).width == 16 and began.parse_args(["--preset", "cpu"]).convs == 1  # today's defaults


def test_began_a_bad_preset_name_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        began.main(["--preset", "gpu"])
    assert exit_info.value.code == 2
    one_line_error(capsys, "began.py: error:", "--preset", "paper")


def test_began_help_lists_the_preset_and_what_it_changes(capsys):
    with pytest.raises(SystemExit):
        began.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset {cpu,paper}" in text and "paper: --image-size 64 --width 64 --convs 2" in text


def test_began_a_paper_run_resumes_with_or_without_the_preset_and_refuses_another(began_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    small = ["--width", 4, "--convs", 1, "--image-size", 32, "--latent-dim", 8, "--batch-size", 16, "--log-every", 1]
    argv = ["--data-dir", began_mnist, "--out", out, *small]
    assert run_script(began, [*argv, "--preset", "paper", "--epochs", 1]) == 0
    assert run_script(began, [*argv, "--epochs", 2, "--resume"]) == 0  # without it: the run's own settings
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["preset"] == "paper" and checkpoint["args"]["lr"] == 1e-4
    assert run_script(began, [*argv, "--preset", "paper", "--epochs", 3, "--resume"]) == 0  # or with it
    capsys.readouterr()
    assert run_script(began, [*argv, "--preset", "cpu", "--lr", "3e-4", "--epochs", 4, "--resume"]) == 2
    one_line_error(capsys, "--lr 0.0003", "--resume keeps")
    mine = tmp_path / "cpu-run"
    assert began_run(began_mnist, mine, "--epochs", 1) == 0
    capsys.readouterr()
    assert began_run(began_mnist, mine, "--epochs", 2, "--resume", "--preset", "paper") == 2  # no silent change
    one_line_error(capsys, "--preset paper", "written with --preset cpu")


# ----------------------------------------------------------------------------------------------------------------
# acgan.py: the two-headed D, the paper's log-likelihoods against hand-computed values, and the run contract
def acgan_run(*argv):
    return acgan.main([str(a) for a in argv])


def acgan_exit(*argv):
    """main()'s exit status, also where argparse itself exits (an unknown flag, a non-number)."""
    try:
        return acgan_run(*argv)
    except SystemExit as e:
        return e.code


def acgan_models(image_size=32, channels=1, num_classes=10, width=8):
    return (acgan.Generator(16, image_size, channels, width, num_classes),
            acgan.Discriminator(image_size, channels, width, num_classes))


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------------
# Models and losses

@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_acgan_d_has_a_source_head_and_class_heads_on_one_body(image_size, channels):
    G, D = acgan_models(image_size, channels, num_classes=7)
    fake = G(torch.randn(5, 16), torch.arange(5))
    assert fake.shape == (5, channels, image_size, image_size) and fake.abs().max() <= 1
    source_logits, class_logits, twin_logits = D(fake)
    assert source_logits.shape == (5,) and class_logits.shape == twin_logits.shape == (5, 7)
    # One body: every weight outside the heads feeds all of them.
    body = {id(p) for p in D.features.parameters()}
    heads = {id(p) for head in (D.source, D.classes, D.twin) for p in head.parameters()}
    assert body | heads == {id(p) for p in D.parameters()} and not body & heads
    assert D.source.in_features == D.classes.in_features == D.twin.in_features
    # The paper's D: two heads, no twin.
    paper_d = acgan.Discriminator(image_size, channels, 8, 7, twin=False)
    assert paper_d.twin is None and paper_d(fake)[2] is None
    assert sum(p.numel() for p in D.parameters()) - sum(p.numel() for p in paper_d.parameters()) == 7 * (
        D.twin.in_features + 1)


def test_acgan_generator_output_depends_on_the_label_and_d_never_sees_it():
    torch.manual_seed(0)
    G, D = acgan_models()
    G.eval()
    fake = G(torch.randn(1, 16).repeat(10, 1), torch.arange(10))
    assert all((fake[0] - fake[k]).abs().max() > 1e-4 for k in range(1, 10))
    with pytest.raises(TypeError):
        D(fake, torch.arange(10))


def test_acgan_losses_match_hand_computed_log_likelihoods_and_gradients():
    real = torch.tensor([2.0, -1.0], requires_grad=True)
    fake = torch.tensor([0.5, -3.0], requires_grad=True)
    real_classes = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]], requires_grad=True)
    fake_classes = torch.tensor([[0.0, 0.0, 0.0], [4.0, -2.0, 1.0]], requires_grad=True)
    twin_classes = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    sig = torch.sigmoid

    def nll(logits):  # minus the log-probability of the label, written out: log sum exp z - z_y, batch mean
        return (torch.log(torch.exp(logits).sum(1)) - logits[torch.arange(2), labels]).mean()

    # Numbers checked by hand once: -log softmax([2, 0, -1])[0] = 0.1698 = -log softmax([0, 1, 3])[2];
    # -log softmax([0, 0, 0])[0] = log 3, -log softmax([4, -2, 1])[2] = log(e^4 + e^-2 + e^1) - 1 = 3.0509.
    assert nll(real_classes).item() == pytest.approx(0.16985, abs=1e-4)
    assert nll(fake_classes).item() == pytest.approx((np.log(3) + 3.0509) / 2, abs=1e-4)
    source_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())  # -L_S
    source_g = -torch.log(sig(fake)).mean()  # non-saturating: -log D(G(z)), not log(1 - D(G(z)))
    inputs = (real, fake, real_classes, fake_classes, twin_classes)
    cases = [  # (a loss as the function computes it, and as written out from the papers)
        (acgan.d_loss(real, fake, real_classes, fake_classes, labels),
         source_d + nll(real_classes) + nll(fake_classes)),  # -(L_S + L_C), Odena et al.
        (acgan.d_loss(real, fake, real_classes, twin_classes, labels, class_weight=0.25),
         source_d + 0.25 * (nll(real_classes) + nll(twin_classes))),  # the twin head names the fakes' class
        (acgan.g_loss(fake, fake_classes, labels), source_g + nll(fake_classes)),
        (acgan.g_loss(fake, fake_classes, labels, class_weight=0.25, fake_twin_logits=twin_classes),
         source_g + 0.25 * (nll(fake_classes) - nll(twin_classes))),  # TAC-GAN: minus the twin's log-likelihood
    ]
    for got, expected in cases:
        torch.testing.assert_close(got, expected)
        got_grads = torch.autograd.grad(got, inputs, retain_graph=True, materialize_grads=True)
        expected_grads = torch.autograd.grad(expected, inputs, retain_graph=True, materialize_grads=True)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e)


def test_acgan_losses_stay_finite_in_bfloat16_at_extreme_logits():
    logits = torch.tensor([-80.0, 0.0, 80.0], dtype=torch.bfloat16, requires_grad=True)
    class_logits = torch.tensor([[90.0, -90.0], [-90.0, 90.0], [0.0, 0.0]], dtype=torch.bfloat16,
                                requires_grad=True)
    labels = torch.tensor([1, 0, 1])  # the first two confidently wrong
    losses = [acgan.d_loss(logits, logits, class_logits, class_logits, labels),
              acgan.g_loss(logits, class_logits, labels),
              acgan.g_loss(logits, class_logits, labels, fake_twin_logits=class_logits.flip(1))]
    for loss in losses:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        grads = torch.autograd.grad(loss, (logits, class_logits))
        assert all(torch.isfinite(g.float()).all() for g in grads)
    # G: -log sigmoid(-80, 0, 80) = 80, log 2, ~0; -log softmax: 180, 180, log 2 (two confidently wrong classes).
    assert losses[1].item() == pytest.approx((80 + np.log(2)) / 3 + (360 + np.log(2)) / 3, rel=1e-3)


@pytest.mark.parametrize("twin", [True, False])
def test_acgan_train_step_updates_d_then_g_each_touching_only_its_own_weights(twin):
    torch.manual_seed(0)
    G = acgan.Generator(16, 32, 1, 4, 10)
    D = acgan.Discriminator(32, 1, 4, 10, twin=twin)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    log, changed = watch_steps(G, D, opt_g, opt_d)
    real, labels = torch.rand(16, 1, 32, 32) * 2 - 1, torch.arange(16) % 10
    metrics = acgan.train_step(G, D, opt_g, opt_d, real, labels, 16, no_scaler())
    assert [name for name, _ in log] == ["D", "G"]
    (_, at_d_step), (_, at_g_step) = log
    assert not at_d_step["G"][0] and all(g is None for g in at_d_step["G"][1])  # fakes detached for D's update
    assert all(g is not None and g.abs().sum() > 0 for g in at_d_step["D"][1])  # every head learns in D's update
    assert not at_g_step["G"][0] and at_g_step["D"][0]
    assert all(torch.equal(a, b) for a, b in zip(at_d_step["D"][1], at_g_step["D"][1]))  # G's backward: D untouched
    assert changed("G") and changed("D")
    assert metrics.shape == (len(acgan.metric_names("tac" if twin else "paper")),) and torch.isfinite(metrics).all()
    assert all(p.requires_grad for p in D.parameters())


def test_acgan_twin_head_not_the_class_head_learns_the_class_of_fakes(monkeypatch):
    torch.manual_seed(0)
    G, D = acgan_models(width=4)
    with torch.no_grad():  # the twin head answers "class k has logit k" whatever the image: recognisable below
        D.twin.weight.zero_()
        D.twin.bias.copy_(torch.arange(10.0))
    seen = {}
    real_d_loss, real_g_loss = acgan.d_loss, acgan.g_loss

    def recording_d_loss(real_logits, fake_logits, real_class_logits, fake_class_logits, *rest):
        seen["d_fake_classes"] = fake_class_logits.detach().clone()
        return real_d_loss(real_logits, fake_logits, real_class_logits, fake_class_logits, *rest)

    def recording_g_loss(fake_logits, fake_class_logits, labels, class_weight=1.0, fake_twin_logits=None):
        seen["g_class"], seen["g_twin"] = fake_class_logits.detach().clone(), fake_twin_logits.detach().clone()
        return real_g_loss(fake_logits, fake_class_logits, labels, class_weight, fake_twin_logits)

    monkeypatch.setattr(acgan, "d_loss", recording_d_loss)
    monkeypatch.setattr(acgan, "g_loss", recording_g_loss)
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.0), torch.optim.SGD(D.parameters(), lr=0.0)
    acgan.train_step(G, D, opt_g, opt_d, torch.rand(8, 1, 32, 32) * 2 - 1, torch.arange(8), 16, no_scaler())
    assert torch.equal(seen["d_fake_classes"], torch.arange(10.0).expand(8, 10))  # D: the twin names the fakes
    assert torch.equal(seen["g_twin"], torch.arange(10.0).expand(8, 10))
    assert not torch.equal(seen["g_class"], seen["g_twin"])  # G: the class head and the twin, both


def test_acgan_accuracy_counts_both_heads_on_real_held_out_and_fake_images():
    class FakeD(nn.Module):  # source logit = mean brightness; class = 0 for bright images, 1 for dark ones
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, images):
            brightness = images.flatten(1).mean(1)
            return brightness, torch.stack([brightness, -brightness], dim=1), None  # no twin: never read here

    class DarkG(nn.Module):  # every fake dark: D calls all fake and names them class 1
        def forward(self, z, labels):
            return -torch.ones(len(z), 1, 4, 4)

    bright, dark = torch.full((6, 1, 4, 4), 255, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])  # right: 3 bright + 2 dark of 10
    sets = {"train": (torch.cat([bright, dark]), labels), "test": None}
    torch.manual_seed(0)
    accuracy = acgan.d_accuracy(FakeD(), DarkG(), sets, latent_dim=3, num_classes=2, n=1000)
    share_asked_1 = float(accuracy["d_class_acc_fake"])
    assert {k: v for k, v in accuracy.items() if k != "d_class_acc_fake"} == {
        "d_acc_real_train": "0.6000", "d_acc_real_test": "", "d_acc_fake": "1.0000",
        "d_class_acc_train": "0.5000", "d_class_acc_test": ""}
    assert 0.45 < share_asked_1 < 0.55  # right exactly where G was asked for class 1, half of the fakes


# ----------------------------------------------------------------------------------------------------------------
# Runs: every contract output, resume, generate, faults

def test_acgan_run_writes_every_output_with_both_heads_accuracy(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert acgan_run("--data-dir", tiny_mnist, "--out", out, "--epochs", 2, *TINY) == 0
    accuracy_columns = ["d_acc_real_train", "d_acc_real_test", "d_acc_fake", "d_class_acc_train",
                        "d_class_acc_test", "d_class_acc_fake"]
    rows, checkpoint = assert_run_outputs(out, 2, acgan.metric_names("tac") + accuracy_columns)
    assert all(0 <= float(row[name]) <= 1 for row in rows for name in accuracy_columns)
    assert checkpoint["script"] == "acgan.py" and checkpoint["args"]["image_size"] == 32
    assert Image.open(out / "samples" / "epoch_002.png").size == (2 + 10 * 34, 2 + 10 * 34)  # one row per class
    assert "names the class of" in capsys.readouterr().out


def test_acgan_rgb_folder_at_64px_has_no_held_out_columns_and_generates_a_label(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("cats", "dogs", "owls"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "pets" / name / f"{i}.png")
    out = tmp_path / "run"
    assert acgan_run("--dataset", tmp_path / "pets", "--out", out, "--epochs", 1, *TINY, "--batch-size", 6) == 0
    row = read_rows(out / "metrics.csv")[0]
    assert row["d_acc_real_test"] == row["d_class_acc_test"] == "" and row["d_class_acc_train"] != ""
    grid = Image.open(out / "samples" / "epoch_001.png")
    assert grid.mode == "RGB" and grid.size == (2 + 10 * 66, 2 + 3 * 66)
    assert acgan_run("--out", out, "--generate", 5, "--label", 2) == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (5, 64, 64, 3) and samples["images"].dtype == np.uint8
    assert samples["labels"].dtype == np.int64 and (samples["labels"] == 2).all()


def test_acgan_refuses_a_folder_of_loose_images_in_one_line(tmp_path, capsys):
    (tmp_path / "loose").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / "loose" / f"{i}.png")
    assert acgan_run("--dataset", tmp_path / "loose", "--out", tmp_path / "run", "--epochs", 1, *TINY) == 2
    one_line_error(capsys, "acgan.py: error: ", "single class", "sub-folder per class")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_acgan_resume_gives_exactly_the_uninterrupted_run(tiny_mnist, tmp_path, capsys):
    common = ["--data-dir", tiny_mnist, *TINY]
    assert acgan_run(*common, "--out", tmp_path / "straight", "--epochs", 2) == 0
    assert acgan_run(*common, "--out", tmp_path / "resumed", "--epochs", 1) == 0
    capsys.readouterr()
    assert acgan_run(*common, "--out", tmp_path / "resumed", "--epochs", 2, "--resume") == 0
    assert "epochs 2..2" in capsys.readouterr().out
    straight, resumed = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
                         for name in ("straight", "resumed"))
    for key in ("generator", "generator_average", "discriminator"):
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    columns = ["d_loss", "g_loss", "d_class_acc_fake", "d_class_acc_test"]
    assert ([[r[c] for c in columns] for r in read_rows(tmp_path / "straight" / "metrics.csv")]
            == [[r[c] for c in columns] for r in read_rows(tmp_path / "resumed" / "metrics.csv")])


def test_acgan_resume_keeps_the_runs_own_d_loss(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_mnist, "--out", out, *TINY]
    assert acgan_run(*common, "--epochs", 1, "--class-loss", "paper", "--class-weight", 0.5) == 0
    assert acgan_run(*common, "--epochs", 2, "--resume") == 0  # neither flag: the checkpoint's
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["args"]
    assert saved["class_loss"] == "paper" and saved["class_weight"] == 0.5
    assert "twin.weight" not in torch.load(out / "checkpoint.pt", weights_only=True)["discriminator"]
    assert "twin_loss_fake" not in read_rows(out / "metrics.csv")[0]
    capsys.readouterr()
    assert acgan_run(*common, "--epochs", 3, "--resume", "--class-weight", 2) == 2
    one_line_error(capsys, "--class-weight 2", "0.5")


def test_acgan_generate_writes_labels_cycling_through_the_classes(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert acgan_run("--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *TINY) == 0
    assert acgan_run("--out", out, "--generate", 25) == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (25, 32, 32, 1) and samples["images"].dtype == np.uint8
    assert samples["labels"].dtype == np.int64 and list(samples["labels"][:12]) == [*range(10), 0, 1]
    assert Image.open(out / "samples.png").size == (2 + 10 * 34, 2 + 3 * 34)
    capsys.readouterr()
    for bad in (10, -1):
        assert acgan_run("--out", out, "--generate", 4, "--label", bad) == 2
        one_line_error(capsys, f"--label {bad}", "classes 0..9")


ACGAN_BAD = [["--epochs", 0], ["--batch-size", 0], ["--lr", 0], ["--lr", "nan"], ["--latent-dim", 0], ["--width", 0],
             ["--log-every", 0], ["--generate", 0], ["--fid", 1], ["--average-decay", 1], ["--class-weight", -1],
             ["--class-weight", "inf"], ["--image-size", 48], ["--seed", -1], ["--label", 3], ["--device", "tpu"]]


def test_acgan_every_bad_number_exits_2_with_one_line_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    for bad in ACGAN_BAD:
        assert acgan_exit("--out", tmp_path / "run", *bad) == 2, bad
        assert one_line_error(capsys, bad[0]).startswith("acgan.py: error: ")
    for bad in (["--epochs", "ten"], ["--class-loss", "uniform"], ["--loss", "hinge"], ["--conditional"]):  # argparse's own errors, one line too
        assert acgan_exit(*bad) == 2, bad
        one_line_error(capsys, "acgan.py: error:")


def test_acgan_refuses_another_scripts_checkpoint(tiny_mnist, tmp_path, capsys):
    import dcgan

    out = tmp_path / "run"
    assert dcgan.main([str(a) for a in ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *TINY]]) == 0
    capsys.readouterr()
    assert acgan_run("--data-dir", tiny_mnist, "--out", out, "--epochs", 2, "--resume", *TINY) == 2
    one_line_error(capsys, "was written by dcgan.py with --image-size 32", "this is acgan.py")
    assert acgan_run("--out", out, "--generate", 4) == 2
    one_line_error(capsys, "was written by dcgan.py")


def test_acgan_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_mnist, "--out", out, *TINY]
    assert acgan_run(*common, "--epochs", 1) == 0
    good = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(acgan, "g_loss", lambda logits, *rest: logits.mean() * float("nan"))
    assert acgan_run(*common, "--epochs", 3, "--resume") == 1
    assert "diverged" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == good


def test_acgan_ctrl_c_exits_130_with_the_last_epoch_saved(tiny_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_step = acgan.train_step

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) > 5:  # during epoch 2 (80 images in batches of 16: 5 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(acgan, "train_step", interrupted_step)
    assert acgan_run("--data-dir", tiny_mnist, "--out", out, "--epochs", 3, *TINY) == 130
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    monkeypatch.setattr(acgan, "train_step", real_step)
    assert acgan_run("--data-dir", tiny_mnist, "--out", out, "--epochs", 2, "--resume", *TINY) == 0


def test_acgan_amp_run_gives_finite_losses(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert acgan_run("--data-dir", tiny_mnist, "--out", out, "--epochs", 1, "--amp", *TINY) == 0
    assert_run_outputs(out, 1, acgan.metric_names("tac"))


def test_acgan_fid_flag_scores_every_class_equally_often(tiny_mnist, tmp_path, monkeypatch, capsys):
    scored, expected = mock_inception(monkeypatch)
    assert acgan_run("--data-dir", tiny_mnist, "--out", tmp_path / "run", "--epochs", 1, "--fid", 30, *TINY) == 0
    assert expected() in capsys.readouterr().out
    assert scored[0].shape == (30, 1, 32, 32) and scored[0].dtype == torch.uint8


# ----------------------------------------------------------------------------------------------------------------
# lapgan.py: the Laplacian pyramid, the per-level GANs and the cascade, and the run contract on tiny offline data
torch.set_num_threads(1)

LAPGAN_TINY = ["--width", "4", "--latent-dim", "8", "--batch-size", "16", "--log-every", "1"]
LAPGAN_METRICS = lapgan.metric_names([8, 16, 32])


@pytest.fixture
def lapgan_mnist(tmp_path):
    """tmp_path/mnist/ with 80 training images in all 10 classes (bars), as gzipped IDX files."""
    return make_tiny_mnist(tmp_path, n=80, num_classes=10)


def lapgan_run(argv):
    return lapgan.main([str(a) for a in argv])


def lapgan_exit_code(argv):
    """main()'s exit status, also where argparse itself exits (an unknown choice, a non-number)."""
    try:
        return lapgan_run(argv)
    except SystemExit as e:
        return e.code


def tiny_lapgan_models(image_size=32, channels=1, num_classes=0, width=4, latent_dim=8):
    torch.manual_seed(0)
    G = lapgan.Generator(latent_dim, image_size, channels, width, num_classes)
    D = lapgan.Discriminator(image_size, channels, width, num_classes)
    G.apply(lapgan.init_weights)
    D.apply(lapgan.init_weights)
    return G, D


# ----------------------------------------------------------------------------------------------------------------
# The pyramid

@pytest.mark.parametrize("image_size, channels", [(32, 1), (64, 3)])
def test_pyramid_down_up_and_adding_the_residuals_back_gives_the_image_exactly(image_size, channels):
    images = torch.randint(0, 256, (5, channels, image_size, image_size), dtype=torch.uint8)
    levels = lapgan.pyramid_levels(image_size)
    bands, lows = lapgan.laplacian_pyramid(data.to_float(images), levels)
    sizes = [8 * 2 ** k for k in range(levels)]
    assert [band.shape[-1] for band in bands] == sizes  # coarse to fine, the top 8x8
    assert [low.shape[-1] for low in lows] == sizes[1:]
    rebuilt = lapgan.reconstruct(bands)
    assert (rebuilt - data.to_float(images)).abs().max() < 1e-5  # float rounding only
    assert torch.equal(data.to_uint8(rebuilt), images)  # exact as pixels


def test_pyramid_levels_are_blurred_halvings_and_residuals_what_the_upsampling_misses():
    flat = torch.full((2, 1, 32, 32), 0.25)
    bands, lows = lapgan.laplacian_pyramid(flat, 3)
    torch.testing.assert_close(bands[0], torch.full((2, 1, 8, 8), 0.25))  # the blur keeps a constant
    assert all(residual.abs().max() < 1e-6 for residual in bands[1:])  # nothing for a finer level to add
    # The blur's weights are positive and sum to 1: a level of a [-1, 1] image stays in [-1, 1].
    noise = torch.rand(4, 3, 32, 32) * 2 - 1
    bands, lows = lapgan.laplacian_pyramid(noise, 3)
    assert bands[0].abs().max() <= 1 and all(low.abs().max() <= 1 for low in lows)
    # A level is the blurred finer one with every second pixel kept.
    torch.testing.assert_close(lapgan.downsample(noise), lapgan.binomial_blur(noise)[..., ::2, ::2])


def test_pyramid_picture_is_written(tmp_path):
    make_tiny_mnist(tmp_path, n=8, num_classes=2)
    path = lapgan.save_pyramid_picture("mnist", str(tmp_path / "pyramid.png"), data_dir=str(tmp_path))
    picture = Image.open(path)
    assert picture.width > 3 * 32 and picture.height > 3 * 32


# ----------------------------------------------------------------------------------------------------------------
# The models and the step

def test_one_generator_and_discriminator_per_level_each_finer_g_drawing_a_residual():
    G, D = tiny_lapgan_models(64, 3)
    assert len(G.refiners) == len(D.refiners) == 3  # 8x8 from z, then 16, 32 and 64
    z, planes = lapgan.cascade_noise(5, 8, 64)
    levels = G.eval().sample(z, None, planes)
    assert [image.shape for image in levels] == [(5, 3, size, size) for size in (8, 16, 32, 64)]
    for k, refine in enumerate(G.refiners):  # each level: the upsampled coarser one plus its G's residual
        low = lapgan.upsample(levels[k])
        torch.testing.assert_close(levels[k + 1], (low + refine(low, planes[k])).clamp(-1, 1))
    bands, lows = lapgan.laplacian_pyramid(levels[-1], 4)
    assert [logits.shape for logits in D(bands, None, lows)] == [(5,)] * 4


def test_only_the_coarsest_level_reads_the_class():
    G, D = tiny_lapgan_models(num_classes=10)
    assert G.coarse.label_embedding is not None and D.coarse.projection is not None
    assert not any(isinstance(m, nn.Embedding) for m in [*G.refiners.modules(), *D.refiners.modules()])
    z = torch.randn(1, 8).repeat(10, 1)
    coarse = G.eval().coarse(z, torch.arange(10))
    assert all((coarse[0] - coarse[k]).abs().max() > 1e-4 for k in range(1, 10))


def test_levels_train_independently_on_the_real_pyramid():
    """A broken coarsest level (its G outputs NaN) spoils only its own weights: every finer level still takes a
    finite step, because it trains on the real pyramid's coarse image, never on the coarser G's output."""
    G, D = tiny_lapgan_models()
    opt_g, opt_d = lapgan.make_optimizers(lapgan.parse_args(["--lr", "1e-3"]), G, D)
    before = {name: p.detach().clone() for name, p in [*G.named_parameters(), *D.named_parameters()]}
    with torch.no_grad():
        G.coarse.net[-2].bias.fill_(float("nan"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scaler.amp = False
    metrics = lapgan.train_step(G, D, opt_g, opt_d, torch.rand(8, 1, 32, 32) * 2 - 1, None, 8, scaler)
    assert len(metrics) == len(LAPGAN_METRICS)
    for model in (G, D):
        assert not all(torch.isfinite(p).all() for p in model.coarse.parameters())
        for name, p in model.refiners.named_parameters():
            assert torch.isfinite(p).all(), name
        assert any(not torch.equal(p, before[f"refiners.{name}"]) for name, p in model.refiners.named_parameters())
    assert torch.isfinite(metrics[6:]).all() and not torch.isfinite(metrics[2:6]).all()  # levels 16, 32 vs 8


# ----------------------------------------------------------------------------------------------------------------
# Runs: every contract output, resume, generate, errors

def test_lapgan_short_run_writes_every_contract_output_with_each_levels_d_accuracy(lapgan_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert lapgan_run(["--data-dir", lapgan_mnist, "--out", out, "--epochs", 2, *LAPGAN_TINY]) == 0
    accuracy = [f"d_acc_{name}_{size}" for name in ("real_train", "real_test", "fake") for size in (8, 16, 32)]
    rows, checkpoint = assert_run_outputs(out, 2, LAPGAN_METRICS + accuracy)
    assert all(0 <= float(row[name]) <= 1 for row in rows for name in accuracy)
    assert checkpoint["script"] == "lapgan.py" and checkpoint["args"]["image_size"] == 32
    assert {"generator_average"} <= set(checkpoint)
    assert {name.split(".")[0] for name in checkpoint["generator"]} == {"coarse", "refiners"}
    assert "epoch 2: D calls real" in capsys.readouterr().out
    assert Image.open(out / "losses.png").size == (640, 400)


def test_lapgan_grid_shows_every_levels_output_for_the_same_samples(lapgan_mnist, tmp_path):
    out = tmp_path / "run"
    assert lapgan_run(["--data-dir", lapgan_mnist, "--out", out, "--epochs", 1, *LAPGAN_TINY]) == 0
    grid = np.asarray(Image.open(out / "samples" / "epoch_001.png"))
    assert grid.shape == (2 + 12 * 34, 2 + 10 * 34)  # 4 groups x 3 levels rows, 10 samples per row
    tiles = [[grid[2 + r * 34: 2 + r * 34 + 32, 2 + c * 34: 2 + c * 34 + 32] for c in range(10)] for r in range(12)]
    for r, pixel in ((0, 4), (1, 2)):  # the 8x8 row in 4x4 blocks, the 16x16 row in 2x2 blocks
        tile = tiles[r][0]
        assert (tile == np.repeat(np.repeat(tile[::pixel, ::pixel], pixel, 0), pixel, 1)).all()


def test_lapgan_conditional_run_on_an_rgb_folder_at_64px(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("with_mask", "without_mask"):
        (tmp_path / "faces" / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "faces" / name / f"{i}.png")
    out = tmp_path / "run"
    assert lapgan_run(["--dataset", tmp_path / "faces", "--out", out, "--epochs", 1, "--conditional",
                       *LAPGAN_TINY]) == 0
    rows, checkpoint = assert_run_outputs(out, 1, lapgan.metric_names([8, 16, 32, 64]))
    assert rows[0]["d_acc_real_test_64"] == "" and rows[0]["d_acc_real_train_64"] != ""  # a folder: no test split
    grid = Image.open(out / "samples" / "epoch_001.png")
    assert grid.mode == "RGB" and grid.size == (2 + 10 * 66, 2 + 2 * 4 * 66)  # 2 classes x 4 levels rows
    assert lapgan_run(["--out", out, "--generate", 6, "--label", 1]) == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (6, 64, 64, 3) and samples["images"].dtype == np.uint8
    assert samples["labels"].dtype == np.int64 and (samples["labels"] == 1).all()


def test_lapgan_resume_continues_from_the_saved_epoch_exactly(lapgan_mnist, tmp_path, capsys):
    common = ["--data-dir", lapgan_mnist, *LAPGAN_TINY]
    assert lapgan_run(common + ["--out", tmp_path / "straight", "--epochs", 2]) == 0
    assert lapgan_run(common + ["--out", tmp_path / "split", "--epochs", 1]) == 0
    capsys.readouterr()
    assert lapgan_run(common + ["--out", tmp_path / "split", "--epochs", 2, "--resume"]) == 0
    assert "epochs 2..2" in capsys.readouterr().out
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    _, b = assert_run_outputs(tmp_path / "split", 2, LAPGAN_METRICS)
    for key in ("generator", "generator_average", "discriminator"):  # every level, bit for bit
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0)


def test_lapgan_generate_runs_the_whole_cascade_into_samples_npz_and_png(lapgan_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert lapgan_run(["--data-dir", lapgan_mnist, "--out", out, "--epochs", 1, "--conditional", *LAPGAN_TINY]) == 0
    cascades = []
    sample = lapgan.Generator.sample
    monkeypatch.setattr(lapgan.Generator, "sample",
                        lambda self, *args: cascades.append(1) or sample(self, *args))
    assert lapgan_run(["--out", out, "--generate", 25]) == 0
    assert cascades  # sampled through every level, not one network
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (25, 32, 32, 1) and samples["images"].dtype == np.uint8
    assert samples["labels"].dtype == np.int64 and list(samples["labels"][:12]) == [*range(10), 0, 1]
    assert Image.open(out / "samples.png").size == (2 + 10 * 34, 2 + 3 * 34)


def test_lapgan_fid_flag_scores_images_from_the_whole_cascade(lapgan_mnist, tmp_path, monkeypatch, capsys):
    scored, expected = mock_inception(monkeypatch)
    argv = ["--data-dir", lapgan_mnist, "--out", tmp_path / "run", "--epochs", 1, "--fid", 30, *LAPGAN_TINY]
    assert lapgan_run(argv) == 0
    assert expected() in capsys.readouterr().out
    assert scored[0].shape == (30, 1, 32, 32) and scored[0].dtype == torch.uint8


def test_lapgan_amp_run_gives_finite_losses(lapgan_mnist, tmp_path):
    out = tmp_path / "run"
    assert lapgan_run(["--data-dir", lapgan_mnist, "--out", out, "--epochs", 1, "--amp", *LAPGAN_TINY]) == 0
    assert_run_outputs(out, 1, LAPGAN_METRICS)


def test_lapgan_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(lapgan_mnist, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "run"
    common = ["--data-dir", lapgan_mnist, "--out", out, *LAPGAN_TINY]
    assert lapgan_run(common + ["--epochs", 1]) == 0
    good = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(lapgan, "g_loss", lambda logits: logits.float().mean() * float("nan"))
    capsys.readouterr()
    assert lapgan_run(common + ["--epochs", 3, "--resume"]) == 1
    assert "training diverged" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == good


def test_lapgan_ctrl_c_exits_130_with_the_last_epoch_saved(lapgan_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_step = lapgan.train_step

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) > 5:  # during epoch 2 (80 images in batches of 16: 5 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(lapgan, "train_step", interrupted_step)
    assert lapgan_run(["--data-dir", lapgan_mnist, "--out", out, "--epochs", 3, *LAPGAN_TINY]) == 130
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    assert lapgan_run(["--data-dir", lapgan_mnist, "--out", out, "--epochs", 2, "--resume", *LAPGAN_TINY]) == 0


@pytest.mark.parametrize("bad", [["--epochs", 0], ["--batch-size", 0], ["--latent-dim", 0], ["--width", 0],
                                 ["--log-every", 0], ["--generate", 0], ["--fid", 1], ["--lr", 0], ["--lr", "nan"],
                                 ["--average-decay", 1], ["--seed", -1], ["--image-size", 48],
                                 ["--image-size", 16], ["--label", 3], ["--device", "tpu"], ["--device", "nonsense"]])
def test_lapgan_every_bad_number_exits_2_with_one_line_before_any_data_is_loaded(bad, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    assert lapgan_exit_code(["--out", tmp_path / "run", *bad]) == 2
    assert one_line_error(capsys, bad[0]).startswith("lapgan.py: error: ")


@pytest.mark.parametrize("bad", [["--epochs", "ten"], ["--loss", "hinge"], ["--no-such-flag"]])
def test_lapgan_argparse_errors_are_one_line_too(bad, capsys):
    assert lapgan_exit_code(bad) == 2
    one_line_error(capsys, "lapgan.py: error:")


def test_lapgan_bad_input_exits_2_with_one_line(lapgan_mnist, tmp_path, capsys):
    common = ["--out", tmp_path / "run", "--epochs", 1, *LAPGAN_TINY]
    assert lapgan_run(["--dataset", "nonexistent", *common]) == 2
    one_line_error(capsys, "unknown dataset")
    assert lapgan_run(["--dataset", tmp_path / "missing" / "folder", *common]) == 2
    one_line_error(capsys, "no folder")
    assert lapgan_run(["--out", tmp_path / "empty", "--generate", 4]) == 2
    one_line_error(capsys, "no checkpoint", "empty")
    with open(os.path.join(lapgan_mnist, "mnist", "train-images-idx3-ubyte.gz"), "r+b") as f:
        f.truncate(100)  # a cut-off download
    assert lapgan_run(["--data-dir", lapgan_mnist, *common]) == 2
    one_line_error(capsys, "train-images-idx3-ubyte.gz")


def test_lapgan_refuses_another_scripts_checkpoint_and_a_label_on_an_unconditional_model(lapgan_mnist, tmp_path,
                                                                                          capsys):
    other, out = tmp_path / "dcgan", tmp_path / "run"
    assert dcgan.main([str(a) for a in ["--data-dir", lapgan_mnist, "--out", other, "--epochs", 1, *LAPGAN_TINY]]) == 0
    capsys.readouterr()
    assert lapgan_run(["--data-dir", lapgan_mnist, "--out", other, "--epochs", 2, "--resume", *LAPGAN_TINY]) == 2
    one_line_error(capsys, "was written by dcgan.py with --image-size 32", "this is lapgan.py")
    assert lapgan_run(["--out", other, "--generate", 4]) == 2
    one_line_error(capsys, "was written by dcgan.py")
    assert lapgan_run(["--data-dir", lapgan_mnist, "--out", out, "--epochs", 1, *LAPGAN_TINY]) == 0
    capsys.readouterr()
    assert lapgan_run(["--out", out, "--generate", 4, "--label", 3]) == 2
    one_line_error(capsys, "--label 3", "not conditional")
    assert lapgan_run(["--data-dir", lapgan_mnist, "--out", out, "--epochs", 2, "--resume", *LAPGAN_TINY,
                       "--width", 8]) == 2
    one_line_error(capsys, "--width 8", "--width 4")
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["generator_average"]["refiners.1.net.0.weight"] = torch.zeros(3, 3)
    torch.save(checkpoint, out / "checkpoint.pt")
    assert lapgan_run(["--out", out, "--generate", 4]) == 2
    one_line_error(capsys, "checkpoint.pt", "does not fit")


# ---- fid.py: KID, precision/recall, clean resize (issue 20)
# Against ../shared/fixtures/metrics (torch-fidelity 0.4.0's KID and precision/recall on 300 + 300 64-d features,
# clean-fid 0.1.35's resize of three images; skipped in a clone without it), then properties that need no fixture.
from pathlib import Path  # noqa: E402  (this section is self-contained)

METRICS_FIXTURES = Path(__file__).parent.parent / "shared" / "fixtures" / "metrics"


@pytest.fixture(scope="module")
def metrics_fixture():
    if not (METRICS_FIXTURES / "reference.json").is_file():
        pytest.skip(f"no metrics fixtures at {METRICS_FIXTURES}")
    return {"reference": json.loads((METRICS_FIXTURES / "reference.json").read_text()),
            "generated": np.load(METRICS_FIXTURES / "features_generated.npy"),
            "real": np.load(METRICS_FIXTURES / "features_real.npy")}


def gaussian_features(n, d=32, shift=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator) + shift


def test_kid_matches_torch_fidelity_on_the_full_sets(metrics_fixture):
    reference, fake, real = metrics_fixture["reference"], metrics_fixture["generated"], metrics_fixture["real"]
    with pytest.warns(UserWarning, match="KID subsets of 300 images"):  # 300 per side < the default 1000
        mean, std = fid.kernel_inception_distance(fake, real)
    assert mean == pytest.approx(reference["kid_full_set"], rel=1e-5) and std == 0
    mean, _ = fid.kernel_inception_distance(real, real, subset_size=300)
    assert mean == pytest.approx(reference["kid_real_vs_itself"], rel=1e-5)  # unbiased: below 0 for a set vs itself


def test_kid_matches_torch_fidelity_on_50_subsets_of_100_drawn_by_randomstate_2020(metrics_fixture):
    expected = metrics_fixture["reference"]["kid_50_subsets_of_100_numpy_randomstate_2020"]
    mean, std = fid.kernel_inception_distance(metrics_fixture["generated"], metrics_fixture["real"], subsets=50,
                                              subset_size=100, seed=2020)
    assert mean == pytest.approx(expected["mean"], rel=1e-5) and std == pytest.approx(expected["std"], rel=1e-5)


def test_precision_recall_match_torch_fidelity_at_k3_for_any_batch_size(metrics_fixture):
    reference, fake, real = metrics_fixture["reference"], metrics_fixture["generated"], metrics_fixture["real"]
    for batch_size in (2048, 64, 7):  # one block, several, and blocks that do not divide 300
        precision, recall = fid.precision_recall(real, fake, k=3, batch_size=batch_size)
        assert precision == pytest.approx(reference["precision_k3"], rel=1e-5)
        assert recall == pytest.approx(reference["recall_k3"], rel=1e-5)


def test_clean_resize_matches_clean_fid(metrics_fixture):
    with np.load(METRICS_FIXTURES / "clean_resize.npz") as images:
        for name in ("gray28", "gray32", "rgb32"):
            picture = images[f"{name}_input"]
            batch = picture[None, None] if picture.ndim == 2 else picture.transpose(2, 0, 1)[None]  # [1, C, H, W]
            resized = fid.clean_resize(batch)[0].expand(3, -1, -1).permute(1, 2, 0).numpy()  # gray: 3 equal channels
            assert resized.dtype == np.float32 and resized.shape == (299, 299, 3)
            np.testing.assert_allclose(resized, images[f"{name}_resized"], rtol=0, atol=1e-3)
            assert resized.min() >= 0 and resized.max() <= 255 and not np.all(resized == resized.round())


def test_kid_is_the_hand_computed_unbiased_mmd_on_a_tiny_example():
    # k(x, y) = (x.y / 2 + 1)^3. Within x: k(x1, x2) = 1; within y: y1.y2 = 2 -> 8; across: 3.375 + 8 + 3.375 + 1.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    expected = (2 * 1 + 2 * 8) / (2 * 1) - 2 * (3.375 + 8 + 3.375 + 1) / (2 * 2)  # = 1.125
    assert fid.kernel_inception_distance(x, y, subset_size=2) == (pytest.approx(expected, rel=1e-12), 0.0)
    # In 1-d: x = {0, 1}, y = {1, 2}: (2 * 1 + 2 * 27) / 2 - 2 * (1 + 1 + 8 + 27) / 4 = 9.5
    assert fid.polynomial_mmd2(torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [2.0]])) == pytest.approx(9.5)


def test_kid_of_two_halves_of_one_set_is_near_zero():
    features = gaussian_features(1200)
    mean, std = fid.kernel_inception_distance(features[:600], features[600:], subsets=20, subset_size=300)
    shifted, _ = fid.kernel_inception_distance(features[:600], gaussian_features(600, shift=0.3, seed=1), subsets=20,
                                               subset_size=300)
    assert abs(mean) < 3 * std and abs(mean) < 0.05 * shifted


def test_kid_on_sets_smaller_than_a_subset_uses_all_of_the_smaller_and_says_so():
    a, b = gaussian_features(40), gaussian_features(30, seed=1)
    with pytest.warns(UserWarning, match="KID subsets of 30 images.*1000 asked, 40 and 30 given"):
        smaller = fid.kernel_inception_distance(a, b, subsets=5)
    assert smaller == fid.kernel_inception_distance(a, b, subsets=5, subset_size=30)
    with pytest.raises(fid.FIDError, match="at least 2 images per side, got 1 and 30"):
        fid.kernel_inception_distance(a[:1], b)


def test_precision_and_recall_of_a_set_against_itself_are_one():
    features = gaussian_features(300)
    assert fid.precision_recall(features, features) == (1.0, 1.0)


def test_recall_falls_when_the_generated_set_is_collapsed_to_a_few_points():
    real, fake = gaussian_features(400), gaussian_features(400, seed=1)
    precision, recall = fid.precision_recall(real, fake)
    collapsed = fake[:5].repeat(80, 1)  # 400 images, 5 distinct: each ball has radius 0
    collapsed_precision, collapsed_recall = fid.precision_recall(real, collapsed)
    assert recall > 0.5 and collapsed_recall <= 5 / 400 and collapsed_recall < 0.05 * recall
    assert precision > 0.5 and collapsed_precision > 0.5  # the few points are still realistic


def test_precision_recall_by_hand_on_a_line():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # every real ball: radius 1 (k = 1)
    fake = torch.tensor([[0.5], [10.0]])  # each fake ball reaches the other fake: radius 9.5
    assert fid.precision_recall(real, fake, k=1) == (0.5, 1.0)  # 10 is outside every real ball; 0.5's covers all
    with pytest.raises(fid.FIDError, match=r"k must be in 1..N-1 = 1..1 for the 2 generated images, got 2"):
        fid.precision_recall(real, fake, k=2)


def test_precision_recall_never_holds_more_than_a_batch_squared_of_distances(monkeypatch):
    blocks, original = [], fid.squared_distances

    def recording(x, y):
        blocks.append(len(x) * len(y))
        return original(x, y)

    monkeypatch.setattr(fid, "squared_distances", recording)
    real, fake = gaussian_features(250), gaussian_features(230, seed=1)
    result = fid.precision_recall(real, fake, batch_size=64)
    assert max(blocks) <= 64 * 64 and sum(blocks) == 250 ** 2 + 230 ** 2 + 250 * 230  # each distance once
    monkeypatch.setattr(fid, "squared_distances", original)
    assert fid.precision_recall(real, fake, batch_size=1000) == result


@pytest.mark.filterwarnings("ignore:.*singular")  # a handful of images: the small-N warning is expected
def test_cache_keys_differ_by_resize_mode_and_image_count(tmp_path):
    cache, calls = str(tmp_path / "stats.npz"), []

    def images_fn(n):
        def load():
            calls.append(n)
            return random_images(n, channels=1, size=10)
        return load

    kwargs = dict(dims=64, weights=reference_model())
    legacy = fid.cached_statistics(cache, images_fn(5), num_images=5, **kwargs)
    fid.cached_statistics(cache, images_fn(5), num_images=5, **kwargs)
    assert calls == [5]  # the same protocol: reused
    clean = fid.cached_statistics(cache, images_fn(5), num_images=5, resize="clean", **kwargs)
    assert calls == [5, 5] and not np.allclose(clean[0], legacy[0])  # another resize: recomputed, and it differs
    fid.cached_statistics(cache, images_fn(6), num_images=6, resize="clean", **kwargs)
    assert calls == [5, 5, 6]  # another N: recomputed
    features = fid.cached_features(cache, images_fn(6), num_images=6, resize="clean", **kwargs)
    assert calls == [5, 5, 6, 6] and features.shape == (6, 64)  # features were not cached yet
    again = fid.cached_features(cache, images_fn(6), num_images=6, resize="clean", reference="tiny", **kwargs)
    assert calls == [5, 5, 6, 6, 6]  # a reference name the cache does not hold: recomputed
    assert torch.equal(fid.cached_features(cache, images_fn(6), num_images=6, resize="clean", reference="tiny",
                                           **kwargs), again) and len(calls) == 5
    with np.load(cache) as saved:
        assert (str(saved["resize"]), int(saved["num_images"]), str(saved["reference"])) == ("clean", 6, "tiny")
    with pytest.raises(fid.FIDError, match="resize must be one of legacy, clean, got 'bicubic'"):
        fid.cached_statistics(cache, images_fn(6), resize="bicubic", **kwargs)


@pytest.mark.filterwarnings("ignore:.*singular")  # a handful of images: the small-N warning is expected
def test_cli_kid_prc_print_every_figure_with_its_protocol(tmp_path, capsys, weights_file):
    fake = save_pngs(tmp_path / "fake", random_images(6, size=12, seed=1))
    real = save_pngs(tmp_path / "real", random_images(5, size=12, seed=2))
    common = ["--dims", "64", "--weights", weights_file, "--device", "cpu", "--resize", "clean"]
    code, out, err = run_main([fake, real, *common, "--kid", "--prc"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["FID", "KID", "precision", "recall"]
    for line in lines:
        assert f"6 vs 5 reference images ({real}), Inception 64-d first max pool, resize clean" in line, line
    assert "±" in lines[1] and "100 subsets of 5 (all of the smaller set; 1000 asked)" in lines[1]
    assert "[k=3;" in lines[2] and 0 <= float(lines[2].split()[1]) <= 1
    code, plain, _ = run_main([fake, real, *common], capsys)
    assert code == 0 and plain.splitlines() == lines[:1]  # KID and precision/recall do not move the FID


@pytest.mark.filterwarnings("ignore:.*singular")  # a handful of images: the small-N warning is expected
def test_save_stats_with_kid_keeps_the_features_and_the_protocol(tmp_path, capsys, weights_file):
    real = save_pngs(tmp_path / "real", random_images(5, size=12, seed=2))
    fake = save_pngs(tmp_path / "fake", random_images(6, size=12, seed=1))
    saved = str(tmp_path / "real.npz")
    common = ["--dims", "64", "--weights", weights_file]
    code, out, err = run_main(["--save-stats", real, saved, *common, "--kid"], capsys)
    assert code == 0 and "and features" in out and "[5 images, Inception 64-d first max pool, resize legacy]" in out
    with np.load(saved) as f:
        assert f["features"].shape == (5, 64) and str(f["resize"]) == "legacy" and int(f["num_images"]) == 5
    code, from_file, _ = run_main([fake, saved, *common, "--kid", "--prc"], capsys)
    code_images, from_images, _ = run_main([fake, real, *common, "--kid", "--prc"], capsys)
    assert code == code_images == 0 and f"({saved}: statistics of {real})" in from_file
    assert [line.split("[")[0] for line in from_file.splitlines()] == [line.split("[")[0]
                                                                       for line in from_images.splitlines()]


@pytest.mark.parametrize("flags, expected", [
    (["--resize", "bicubic"], "invalid choice: 'bicubic'"),
    (["--kid", "--kid-subsets", "0"], "--kid-subsets must be at least 1, got 0"),
    (["--kid", "--kid-subset-size", "1"], "--kid-subset-size must be at least 2, got 1"),
    (["--kid", "--kid-subset-size", "7"], "--kid-subset-size 7 needs 7 images per side"),
    (["--prc", "--prc-k", "0"], "--prc-k must be at least 1, got 0"),
    (["--prc", "--prc-k", "5"], "--prc-k 5: must be in 1..N-1 = 1..4"),
    (["--kid-subsets", "10"], "--kid-subsets does nothing without --kid"),
    (["--prc-k", "2"], "--prc-k does nothing without --prc"),
    (["--kid", "STATS"], "holds only mu and sigma; KID and precision/recall need features"),
    (["--resize", "clean", "STATS"], "made with --resize legacy (pytorch-fid); this run uses --resize clean"),
])
def test_kid_prc_and_resize_bad_values_exit_2_with_one_line_before_any_network(flags, expected, tmp_path, capsys):
    fake = save_pngs(tmp_path / "fake", random_images(6, size=12, seed=1))
    real = save_pngs(tmp_path / "real", random_images(5, size=12, seed=2))
    stats = str(tmp_path / "stats.npz")
    np.savez(stats, mu=np.zeros(64), sigma=np.eye(64))  # pytorch-fid's own file: no features, no resize record
    if "STATS" in flags:
        flags, real = [flag for flag in flags if flag != "STATS"], stats
    missing = str(tmp_path / "never-loaded.pth")  # every one of these is refused before the weights are read
    try:
        code = fid.main([fake, real, "--dims", "64", "--weights", missing, *flags])
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err and "never-loaded" not in err, err


def test_resize_mode_and_kid_inputs_are_checked_in_python_too():
    with pytest.raises(fid.FIDError, match="resize must be one of legacy, clean"):
        fid.compute_statistics(random_images(3), dims=64, weights=reference_model(), resize="nearest")
    with pytest.raises(fid.FIDError, match="mismatched dimensions"):
        fid.kernel_inception_distance(gaussian_features(10, d=4), gaussian_features(10, d=5))
    with pytest.raises(fid.FIDError, match="NaN"):
        fid.precision_recall(torch.full((5, 3), float("nan")), gaussian_features(5, d=3))


def test_score_reports_kid_and_precision_recall_on_its_own_features(bars, tmp_path, capsys):
    labels = np.arange(400) % BAR_CLASSES
    real_like = bar_samples(tmp_path / "real.npz", labels)
    collapsed = tmp_path / "collapsed.npz"
    np.savez(collapsed, images=np.repeat(bar_images(np.array([3]), num_classes=BAR_CLASSES)[..., None], 400, 0))
    assert run_score(bars, real_like, collapsed, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    good, bad = report["samples"][real_like], report["samples"][str(collapsed)]
    assert good["protocol"] == "400 samples vs 200 real test images (reference), classifier 128-d, gray 28x28"
    assert good["kid"]["subset_size"] == 200 and good["prc_images"] == 200 and good["prc_k"] == 3
    assert good["kid"]["mean"] < 0.02 * bad["kid"]["mean"]
    assert good["precision"] > 0.5 and good["recall"] > 0.5 and bad["recall"] < 0.05
    assert report["real"]["train_vs_test_kid"][0] < 0.02 * bad["kid"]["mean"]
    assert run_score(bars, real_like) == 0
    text = capsys.readouterr().out
    assert "feature KID vs test" in text and "precision, recall" in text and "k=3, 200 per side" in text
    assert max(len(line) for line in text.splitlines()) <= 120


def test_score_adds_the_real_features_to_a_classifier_cached_before_them(bars, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    shutil.copytree(bars["data_dir"], data_dir)
    cached = data_dir / "mnist" / "classifier_mnist.pt"
    state = torch.load(cached, weights_only=True)
    for key in ("test_features", "train_features", "train_vs_test_kid"):
        del state["reference"][key]
    torch.save(state, cached)
    os.chmod(data_dir / "mnist", 0o555)  # a shared, read-only data folder: read from, never written to
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    try:
        model, reference, path = score.load_classifier("mnist", str(data_dir), log=pytest.fail)  # no retraining
        assert path == str(tmp_path / "home" / ".cache" / "gan-score" / "classifier_mnist.pt")  # upgraded copy
        assert reference["test_features"].shape == (200, 128) and "train_vs_test_kid" in reference
        assert score.load_classifier("mnist", str(data_dir), log=pytest.fail)[2] == path  # and read from now on
    finally:
        os.chmod(data_dir / "mnist", 0o755)


def test_fid_and_score_name_no_path_of_this_machine():
    for name in ("fid.py", "score.py", os.path.join("docs", "metrics.md")):
        path = os.path.join(HERE, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            # a home folder, or any absolute path into a top-level folder other than the standard system ones
            machine_path = r"/home/\w|/Users/\w|(?<![\w.~:/\\])/(?!usr/|dev/|tmp/|etc/|proc/)[A-Za-z_]\w*/"
            assert not re.search(machine_path, text), name


# ----------------------------------------------------------------------------------------------------------------
# Issue 18: files through data.py, checked copies of gan.py's machinery, and faults from the environment

SCRIPT_MODULES = [gan, cgan, dcgan, wgan_gp, infogan, acgan, began, lapgan, biggan, stylegan]
PORTED_SCRIPTS = [gan, cgan, dcgan, wgan_gp, acgan, infogan, began, lapgan, biggan, stylegan]  # in the shape of issue 18
COPY_MARKER = re.compile(r"# Copied from gan\.(\w+)(?: with (.+))?$")


def top_level_definitions(source):
    """name -> text of every top-level def, class and NAME = ... in source (decorators included)."""
    lines, found = source.splitlines(), {}
    for node in ast.parse(source).body:
        names = ([node.name] if hasattr(node, "name") else
                 [t.id for t in getattr(node, "targets", []) if type(t).__name__ == "Name"])
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for name in names:
            found[name] = "\n".join(lines[first - 1:node.end_lineno])
    return found


def copy_problems(script, source, originals):
    """Every `# Copied from gan.NAME [with A->B, C->D]` line in source must stand right above a definition that
    equals gan.py's NAME after the replacements, to the character (docstrings and comments included). Returns one
    line per problem, naming the script, the definition and the first line that differs."""
    lines, problems = source.splitlines(), []
    for number, line in enumerate(lines, 1):
        match = COPY_MARKER.fullmatch(line)
        if not match:
            if line.startswith("# Copied from"):
                problems.append(f"{script}:{number}: not a copy marker: {line!r}")
            continue
        name, replacements = match.groups()
        if name not in originals:
            problems.append(f"{script}:{number}: gan.py has no {name} to copy")
            continue
        expected = expected_copy(originals[name], replacements).splitlines()
        copy = lines[number:number + len(expected)]
        after = lines[number + len(expected)] if number + len(expected) < len(lines) else ""
        for offset, (want, got) in enumerate(itertools.zip_longest(expected, copy, fillvalue="<end of file>")):
            if want != got:
                problems.append(f"{script}:{number + 1 + offset}: the copy of gan.{name} differs from gan.py's: "
                                f"{got.strip()!r}, expected {want.strip()!r}")
                break
        else:
            if after.strip() and after[0] in " \t)]}":  # the copy goes on where the original ends
                problems.append(f"{script}:{number + len(expected) + 1}: the copy of gan.{name} is longer than "
                                f"gan.py's: {after.strip()!r}")
    return problems


def expected_copy(original, replacements):
    """The original's text after a marker's `with A->B, C->D` replacements, made in that order."""
    for pair in replacements.split(", ") if replacements else []:
        old, new = pair.split("->")
        original = original.replace(old, new)
    return original


def script_source(module):
    with open(module.__file__) as f:
        return f.read()


@pytest.mark.parametrize("script", SCRIPT_MODULES[1:], ids=lambda m: m.__name__)
def test_marked_copies_equal_their_original_in_gan_py(script):
    problems = copy_problems(os.path.basename(script.__file__), script_source(script),
                             top_level_definitions(script_source(gan)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("script", PORTED_SCRIPTS[1:], ids=lambda m: m.__name__)
def test_a_ported_script_marks_every_definition_it_shares_with_gan_py(script):
    source, originals = script_source(script), top_level_definitions(script_source(gan))
    marked = {match.group(1) for match in map(COPY_MARKER.fullmatch, source.splitlines()) if match}
    unmarked = [name for name, text in top_level_definitions(source).items()
                if originals.get(name) == text and name not in marked]
    assert not unmarked, f"{script.__name__}.py: the same as in gan.py but without a copy marker: {unmarked}"
    assert len(marked) >= 20


@pytest.mark.parametrize("script", PORTED_SCRIPTS[1:], ids=lambda m: m.__name__)
def test_removing_any_one_character_of_a_copy_fails_the_copy_check(script):
    name, source = os.path.basename(script.__file__), script_source(script)
    originals, lines = top_level_definitions(script_source(gan)), source.splitlines(keepends=True)
    assert not copy_problems(name, source, originals)
    checked = 0
    for number, line in enumerate(lines):
        match = COPY_MARKER.fullmatch(line.rstrip("\n"))
        if not match:
            continue
        start = sum(map(len, lines[:number + 1]))  # the copy's first character
        length = len(expected_copy(originals[match.group(1)], match.group(2)))
        for position in {start, start + length // 2, start + length - 1}:  # first, middle and last character
            mutated = source[:position] + source[position + 1:]
            problems = copy_problems(name, mutated, originals)
            assert problems and f"gan.{match.group(1)}" in problems[0], (match.group(1), position)
            checked += 1
    assert checked >= 60


def test_the_copy_check_names_the_script_the_definition_and_the_first_differing_line():
    originals = {"first": 'def first():\n    """Doc."""\n    return 1'}
    good = '# Copied from gan.first\ndef first():\n    """Doc."""\n    return 1\n'
    assert copy_problems("x.py", good, originals) == []
    drifted = good.replace("Doc.", "Dc.")
    assert copy_problems("x.py", drifted, originals) == [
        "x.py:3: the copy of gan.first differs from gan.py's: '\"\"\"Dc.\"\"\"', expected '\"\"\"Doc.\"\"\"'"]
    renamed = '# Copied from gan.first with first->second, 1->2\ndef second():\n    """Doc."""\n    return 2\n'
    assert copy_problems("x.py", renamed, originals) == []  # plain text replacements, in order (as transformers)
    assert "longer" in copy_problems("x.py", good + "    return 2\n", originals)[0]
    assert "has no h" in copy_problems("x.py", "# Copied from gan.h\ndef h(): pass\n", originals)[0]
    assert "not a copy marker" in copy_problems("x.py", "# Copied from gan.first, roughly\n", originals)[0]


# data.py: every file through one atomic write

def test_write_atomic_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    data.write_atomic(str(path), lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["file.bin"]
    data.write_atomic(str(tmp_path / "text.csv"), lambda f: f.write("a,b\n"), mode="w")
    assert (tmp_path / "text.csv").read_text() == "a,b\n"


@pytest.mark.parametrize("where", ["while writing", "at fsync", "Ctrl-C"])
def test_write_atomic_failing_keeps_the_old_file_and_removes_the_temporary(where, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the previous epoch")

    def write(f):
        f.write(b"half a file")
        if where == "while writing":
            raise OSError(28, "No space left on device")
        if where == "Ctrl-C":
            raise KeyboardInterrupt
    if where == "at fsync":
        monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(KeyboardInterrupt if where == "Ctrl-C" else OSError):
        data.write_atomic(str(path), write)
    assert path.read_bytes() == b"the previous epoch" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_an_interrupt_inside_torch_save_stays_an_interrupt_and_the_old_checkpoint_stays(tmp_path):
    """Ctrl-C or SIGTERM (raised as a KeyboardInterrupt) in the middle of torch.save: torch's zip writer, closing,
    raises a RuntimeError over it, which would end the run with a traceback and exit 1 instead of 130/143."""
    class InterruptedFile(io.RawIOBase):
        def __init__(self, f):
            self.f, self.writes = f, 0

        def writable(self):
            return True

        def write(self, chunk):
            self.writes += 1
            if self.writes == 3:
                raise gan.Stopped()
            return self.f.write(chunk)

    path = tmp_path / "checkpoint.pt"
    data.save_checkpoint(str(path), {"epoch": 1})
    with pytest.raises(gan.Stopped):
        data.write_atomic(str(path), lambda f: torch.save({"weights": torch.randn(1000, 100)}, InterruptedFile(f)))
    assert torch.load(path, weights_only=True) == {"epoch": 1} and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_every_file_of_a_run_goes_through_write_atomic(tmp_path, tiny_data_dir, monkeypatch):
    written, real_write = [], data.write_atomic
    monkeypatch.setattr(data, "write_atomic", lambda path, *a, **k: written.append(os.path.basename(path))
                        or real_write(path, *a, **k))
    assert run(cgan, tmp_path, tiny_data_dir, "--epochs", "1") == 0
    assert run(cgan, tmp_path, tiny_data_dir, "--generate", "4") == 0
    assert {"metrics.csv", "losses.png", "epoch_001.png", "progress.gif", "checkpoint.pt", "samples.npz",
            "samples.png"} <= set(written)


# A checkpoint without a "script" field: refused by every script, with the same line

@pytest.mark.parametrize("script", PORTED_SCRIPTS, ids=lambda m: m.__name__)
def test_a_checkpoint_that_names_no_script_is_refused_with_one_line(script, tmp_path, tiny_data_dir, capsys):
    other = cgan if script is gan else gan  # same settings, another script: settings cannot tell them apart
    assert run(other, tmp_path, tiny_data_dir, "--epochs", "1") == 0
    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["script"]
    torch.save(checkpoint, path)
    capsys.readouterr()
    for flags in (["--epochs", "2", "--resume"], ["--generate", "4"]):
        assert run(script, tmp_path, tiny_data_dir, *flags) == 2
        err = one_line_error(capsys, str(path), "was written by an unknown script (no script field)",
                             f"this is {script.__name__}.py")
        assert err == (f"{script.__name__}.py: error: {path} was written by an unknown script (no script field) "
                       f"with --image-size 28 --latent-dim 64 --loss non-saturating; this is {script.__name__}.py\n")


# --resume exact on CUDA: the GPU's random state is saved and restored too

def test_a_cuda_run_saves_and_restores_the_cuda_random_state(monkeypatch):
    cuda_state, restored = torch.tensor([7, 8, 9], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: cuda_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    states = data.random_states(torch.device("cuda:1"))
    assert torch.equal(states["rng"], torch.get_rng_state()) and torch.equal(states["cuda_rng"], cuda_state)
    assert "cuda_rng" not in data.random_states(torch.device("cpu"))
    checkpoint = {"path": "checkpoint.pt", "epoch": 3, "generator": {"weight": torch.ones(2)}, **states}
    torch.manual_seed(1)  # moved on since the save
    assert data.resume(checkpoint, {"generator": types.SimpleNamespace(load_state_dict=lambda s: None)},
                       torch.device("cuda:1")) == 3
    assert torch.equal(torch.get_rng_state(), states["rng"])
    assert restored == [(cuda_state, torch.device("cuda:1"))]


def test_training_writes_the_random_states_into_every_checkpoint(tmp_path, tiny_data_dir, monkeypatch):
    real_states = data.random_states
    monkeypatch.setattr(data, "random_states", lambda device: {**real_states(device), "cuda_rng": torch.ones(3)})
    assert run(gan, tmp_path, tiny_data_dir, "--epochs", "1") == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert torch.equal(checkpoint["cuda_rng"], torch.ones(3)) and checkpoint["rng"].dtype == torch.uint8


# Ctrl-C at any moment of start-up, and SIGTERM

@pytest.mark.parametrize("script", PORTED_SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("moment", ["parse_args", "data load"])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(script, moment, tmp_path, tiny_data_dir, monkeypatch,
                                                         capsys):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(*((script, "parse_args") if moment == "parse_args" else (data, "load_dataset")), ctrl_c)
    assert run(script, tmp_path, tiny_data_dir, "--epochs", "1") == 130
    one_line_error(capsys, "interrupted")


def test_sigterm_mid_training_exits_143_with_one_line_and_the_finished_epoch_resumable(tiny_data_dir, tmp_path):
    import random
    import signal
    out = tmp_path / "run"
    argv = ["--data-dir", tiny_data_dir, "--out", str(out), "--epochs", "500", *MLP_TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, os.path.abspath(gan.__file__), *argv], env=env, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 0.5))  # then somewhere in a later epoch: training, or writing files
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    assert len(err.strip().splitlines()) == 1 and "SIGTERM" in err and "--resume continues" in err, err
    epoch = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert epoch >= 1
    assert run_script(gan, [*argv[:4], "--epochs", epoch + 1, "--resume", *MLP_TINY]) == 0


# ----------------------------------------------------------------------------------------------------------------
# Issue 17: --preset paper gives the paper's networks and hyper-parameters; flags still win; --resume keeps the preset

PRESET_SCRIPTS = [dcgan, wgan_gp, biggan, stylegan]


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def test_acgan_preset_paper_builds_the_papers_cifar_generator_and_one_step_runs():
    args = acgan.parse_args(["--preset", "paper"])
    assert (args.image_size, args.latent_dim, args.width, args.batch_size, args.lr, args.class_loss) == (
        32, 100, 96, 100, 2e-4, "paper")
    torch.manual_seed(0)
    G, D = acgan.build_models(args, (3, 32, 32), 10)
    # G: convT 116->384 (4x4) 712,704 + 384->192 1,179,648 + 192->96 294,912 + 96->3 4,611, BatchNorms 1,344,
    # embedding 160. D: conv 3->96 4,704, 96->192 294,912, 192->384 1,179,648, BatchNorms 1,152, heads 6,145 + 61,450.
    assert (parameter_count(G), parameter_count(D)) == (2_193_379, 1_548_011)
    assert [m.out_channels for m in G.net if isinstance(m, nn.ConvTranspose2d)] == [384, 192, 96, 3]  # the paper's G
    assert D.twin is None  # the paper's D: the class head learns the class of fakes itself
    opt_g, opt_d = acgan.make_optimizers(args, G, D)
    metrics = acgan.train_step(G, D, opt_g, opt_d, torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4), args.latent_dim,
                               no_scaler())
    assert metrics.shape == (len(acgan.metric_names("paper")),) and torch.isfinite(metrics).all()


def test_infogan_preset_paper_builds_the_papers_mnist_networks_and_one_step_runs():
    args = infogan.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.latent_dim, args.categories, args.continuous, args.batch_size,
            args.lr, args.lr_g, args.lambda_cat) == (28, 64, 62, 10, 2, 128, 2e-4, 1e-3, 1.0)
    torch.manual_seed(0)
    G, D = infogan.build_models(args, (1, 28, 28))
    # G: fc 74->1024 75,776, fc 1024->6272 6,422,528, convT 128->64 131,072, 64->1 1,025, BatchNorms 14,720.
    # D: conv 1->64 1,088, 64->128 131,072, fc 6272->1024 6,422,528, logit 1,025, BatchNorms 2,304;
    # Q: fc 1024->128 131,072, BatchNorm 256, fc 128->12 1,548.
    assert (parameter_count(G), parameter_count(D)) == (6_645_121, 6_690_893)
    assert [m.out_features for m in G.net if isinstance(m, nn.Linear)] == [1024, 128 * 7 * 7]
    assert [m.out_channels for m in D.body if isinstance(m, nn.Conv2d)] == [64, 128]
    assert [m.out_features for m in D.q if isinstance(m, nn.Linear)] == [128, 12]
    opt_g, opt_d = infogan.make_optimizers(args, G, D)
    metrics = infogan.train_step(G, D, opt_g, opt_d, torch.rand(4, 1, 28, 28) * 2 - 1, no_scaler())
    assert metrics.shape == (len(infogan.METRICS),) and torch.isfinite(metrics).all()


@pytest.mark.parametrize("script", [acgan, infogan], ids=lambda m: m.__name__)
def test_a_flag_given_with_a_preset_wins_over_it_in_either_order(script):
    paper = script.parse_args(["--preset", "paper"])
    for argv in (["--preset", "paper", "--width", "8"], ["--width", "8", "--preset", "paper"]):
        args = script.parse_args(argv)
        assert args.width == 8 and args.batch_size == paper.batch_size and args.lr == paper.lr
    assert vars(script.parse_args(["--preset", "cpu"])) == vars(script.parse_args([]))  # cpu: today's defaults


@pytest.mark.parametrize("script", [acgan, infogan], ids=lambda m: m.__name__)
def test_a_bad_preset_name_is_one_line_and_exit_2_in_acgan_and_infogan(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(["--preset", "gpu"])
    assert exit_.value.code == 2
    one_line_error(capsys, f"{script.__name__}.py: error: ", "--preset", "gpu")


@pytest.mark.parametrize("script", [acgan, infogan], ids=lambda m: m.__name__)
def test_help_lists_the_presets_and_what_paper_changes_in_acgan_and_infogan(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    assert "--preset{cpu,paper}" in help_text
    assert "".join(f"--{k.replace('_', '-')}{v}" for k, v in script.PRESETS["paper"].items()) in help_text


@pytest.mark.parametrize("script", [acgan, infogan], ids=lambda m: m.__name__)
def test_a_paper_preset_run_resumes_with_or_without_the_preset_and_a_cpu_run_refuses_it(script, tiny_mnist, tmp_path,
                                                                                       capsys):
    small = ["--width", "4", "--latent-dim", "8", "--batch-size", "16", "--log-every", "5"]
    out = tmp_path / "run"
    common = ["--data-dir", tiny_mnist, "--out", out, "--device", "cpu"]
    assert run_script(script, [*common, "--epochs", 1, "--preset", "paper", *small]) == 0
    assert run_script(script, [*common, "--epochs", 2, "--resume"]) == 0  # the preset and small flags kept
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["preset"] == "paper"
    assert checkpoint["args"]["lr"] == script.PRESETS["paper"]["lr"] and checkpoint["args"]["width"] == 4
    assert run_script(script, [*common, "--epochs", 3, "--resume", "--preset", "paper", *small]) == 0
    cpu_out = tmp_path / "cpu"
    assert run_script(script, [*common, "--out", cpu_out, "--epochs", 1, *small]) == 0
    capsys.readouterr()
    assert run_script(script, [*common, "--out", cpu_out, "--epochs", 2, "--resume", "--preset", "paper"]) == 2
    one_line_error(capsys, "--preset paper", "--preset cpu", "which --resume keeps")


def test_dcgan_preset_paper_builds_the_papers_networks_and_one_step_runs():
    args = dcgan.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.latent_dim, args.batch_size, args.lr) == (64, 128, 100, 128, 2e-4)
    G, D = dcgan.build_models(args, (1, 64, 64), 10)
    # G: 100*1024*16 + 1024*512*16 + 512*256*16 + 256*128*16 conv weights, 2*(1024+512+256+128) BatchNorm, 128*16+1
    # D: 16*128+128, 128*256*16 + 256*512*16 + 512*1024*16 convs, 2*(256+512+1024) BatchNorm, 1024*16+1 linear
    assert (parameter_count(G), parameter_count(D)) == (12_654_337, 11_032_193)
    assert G.net[0].weight.shape == (100, 1024, 4, 4) and D.logit.in_features == 1024 * 4 * 4  # Figure 1's 4x4x1024
    opt_g, opt_d = dcgan.make_optimizers(args, G, D)
    assert opt_d.defaults["betas"] == (0.5, 0.999)
    real = torch.rand(2, 1, 64, 64) * 2 - 1
    metrics = dcgan.train_step(G, D, opt_g, opt_d, real, None, args.latent_dim, no_scaler())
    assert torch.isfinite(metrics).all() and G(torch.randn(2, 100)).shape == (2, 1, 64, 64)


def test_wgan_gp_preset_paper_builds_the_papers_networks_and_one_step_runs():
    args = wgan_gp.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.latent_dim, args.batch_size, args.lr) == (32, 128, 128, 64, 1e-4)
    assert (args.n_critic, args.gp_weight, args.lipschitz) == (5, 10.0, "gp")
    G, D = wgan_gp.build_models(args, (1, 32, 32), 10)
    # G: 128*512*16 + 512*256*16 + 256*128*16 conv weights, 2*(512+256+128) BatchNorm, 128*16+1 output conv
    # critic: 16*128+128, 128*256*16+256, 256*512*16+512 convs with biases, 2*(256+512) layer norm, 512*16+1 linear
    assert (parameter_count(G), parameter_count(D)) == (3_673_857, 2_634_113)
    assert G.net[0].weight.shape == (128, 512, 4, 4) and D.score.in_features == 512 * 4 * 4  # DIM 128: 4*DIM at 4x4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())  # layer norm in the critic
    opt_g, opt_d = wgan_gp.make_optimizers(args, G, D)
    assert opt_d.defaults["betas"] == (0.0, 0.9)
    reals = [torch.rand(2, 1, 32, 32) * 2 - 1 for _ in range(args.n_critic)]
    metrics = wgan_gp.train_step(G, D, opt_g, opt_d, reals, [None] * args.n_critic, args.latent_dim, args.gp_weight,
                                 no_scaler())
    assert torch.isfinite(metrics).all() and G(torch.randn(2, 128)).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("script", PRESET_SCRIPTS, ids=lambda m: m.__name__)
def test_a_flag_given_with_a_preset_wins_over_it(script):
    args = script.parse_args(["--preset", "paper", "--width", "16", "--lr", "1e-3"])
    assert (args.width, args.lr) == (16, 1e-3)
    assert args.latent_dim == script.PRESETS["paper"]["latent_dim"] != script.parse_args([]).latent_dim


@pytest.mark.parametrize("script", PRESET_SCRIPTS, ids=lambda m: m.__name__)
def test_a_bad_preset_name_is_one_line_and_exit_2(script, capsys):
    assert exit_code(script, ["--preset", "gpu"]) == 2
    one_line_error(capsys, f"{script.__name__}.py: error:", "--preset", "'gpu'")


@pytest.mark.parametrize("script", PRESET_SCRIPTS, ids=lambda m: m.__name__)
def test_help_lists_the_presets_and_what_paper_changes(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside a flag's name
    assert "--preset{cpu,paper}" in out
    assert all(f"--{k.replace('_', '-')}{v}" in out for k, v in script.PRESETS["paper"].items())


@pytest.mark.parametrize("script", PRESET_SCRIPTS, ids=lambda m: m.__name__)
def test_a_preset_run_resumes_with_or_without_the_preset_and_a_preset_cannot_change_a_run(script, tiny_mnist,
                                                                                          tmp_path, capsys):
    out, small = tmp_path / "run", ["--width", 4, "--image-size", 32, "--batch-size", 16]
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, "--preset", "paper", *small]) == 0
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 2, "--resume"]) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["args"]
    paper = script.PRESETS["paper"]
    assert saved["preset"] == "paper" and saved["width"] == 4 and saved["latent_dim"] == paper["latent_dim"]
    assert saved["average_decay"] == paper.get("average_decay", script.parse_args([]).average_decay)
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 3, "--resume", "--preset", "paper",
                               *small]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3
    cpu_run = tmp_path / "cpu"
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", cpu_run, "--epochs", 1, *TINY]) == 0
    capsys.readouterr()
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", cpu_run, "--epochs", 2, "--resume",
                               "--preset", "paper"]) == 2
    one_line_error(capsys, "--preset paper", "--preset cpu, which --resume keeps")


# ================================================================================================================
# biggan.py: ResNet G and D, spectral norm, orthogonal regularisation, truncation, the presets and the run contract

BIGGAN_TINY = ["--width", "4", "--latent-dim", "8", "--batch-size", "16", "--log-every", "1"]
BIGGAN_COLUMNS = [*biggan.METRICS, "d_acc_real_train", "d_acc_real_test", "d_acc_fake"]


def biggan_run(*argv):
    return biggan.main([str(a) for a in argv])


def biggan_models(image_size=32, channels=1, num_classes=10, width=4, latent_dim=8, **options):
    torch.manual_seed(0)
    G = biggan.Generator(latent_dim, image_size, channels, width, num_classes, **options)
    D = biggan.Discriminator(image_size, channels, width, num_classes, options.get("attention", 0))
    return G, D


def spectrally_normed(model):
    return [m for m in model.modules() if hasattr(m, "parametrizations")]


# ----------------------------------------------------------------------------------------------------------------
# Models, truncation, spectral norm, the orthogonal penalty

@pytest.mark.parametrize("image_size, channels", [(32, 1), (64, 3)])
@pytest.mark.parametrize("num_classes", [10, 0])
def test_biggan_shapes_at_32_and_64px_one_block_per_doubling(image_size, channels, num_classes):
    G, D = biggan_models(image_size, channels, num_classes, attention=16)
    labels = torch.arange(6) % 10 if num_classes else None
    fake = G(torch.randn(6, 8), labels)
    assert fake.shape == (6, channels, image_size, image_size) and fake.abs().max() <= 1
    assert D(fake, labels).shape == (6,)
    blocks = image_size.bit_length() - 3  # 4x4 -> 32x32: 3 blocks up; D: 2 down at 32x32 and 2 without
    assert len(G.blocks) == blocks and len(D.blocks) == blocks + 1
    assert sum(1 for b in D.blocks if not b.downsample) == 2
    assert len(G.z_chunks) == blocks + 1 and sum(G.z_chunks) == 8  # hierarchical z: a chunk per block + the linear
    assert (G.shared is not None, D.projection is not None) == (bool(num_classes), bool(num_classes))


def test_biggan_batchnorm_in_g_reads_the_class_and_its_own_chunk_of_z():
    G, _ = biggan_models()
    G.eval()
    z, labels = torch.randn(2, 8), torch.tensor([3, 3])
    base = G(z, labels)
    assert not torch.allclose(base, G(z, torch.tensor([4, 4])))  # the class changes the image
    for chunk in range(4):  # each chunk of z (the linear layer's and each block's) changes it too
        moved = z.clone()
        moved[:, 2 * chunk:2 * chunk + 2] += 1
        assert not torch.allclose(base, G(moved, labels)), chunk
    assert [b.bn1.gain.in_features for b in G.blocks] == [2 + 128] * 3  # chunk of 2 + the shared embedding
    G_flat, _ = biggan_models(shared_dim=0, hier=False)
    assert G_flat.linear.in_features == 8 and [b.bn1.gain.in_features for b in G_flat.blocks] == [10] * 3  # one-hot


def test_biggan_attention_sits_at_the_resolution_asked_and_starts_as_the_identity():
    G, D = biggan_models(attention=16)
    seen = {}
    for name, module in (("G", G.attention), ("D", D.attention)):
        module.register_forward_hook(lambda m, inputs, out, name=name: seen.__setitem__(name, (inputs[0], out)))
    labels = torch.arange(2)
    D(G(torch.randn(2, 8), labels), labels)
    assert seen["G"][0].shape[-1] == seen["D"][0].shape[-1] == 16
    assert all(torch.equal(x, out) for x, out in seen.values())  # gamma = 0 at the start
    assert G.attention.gamma.requires_grad and G.attention.gamma.item() == 0.0
    G0, D0 = biggan_models(attention=0)
    assert not any(isinstance(m, biggan.SelfAttention) for m in [*G0.modules(), *D0.modules()])


def test_biggan_truncation_zero_gives_the_same_image_for_every_z_in_each_class():
    G, _ = biggan_models()
    G.train()  # generate_images switches to eval itself
    labels = torch.tensor([0, 0, 0, 5, 5, 5])
    images = biggan.generate_images(G, labels, 8, "cpu", seed=1, truncation=0)
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])
    assert torch.equal(images[3], images[4]) and not torch.equal(images[0], images[3])
    untruncated = biggan.generate_images(G, labels, 8, "cpu", seed=1)
    assert not torch.equal(untruncated[0], untruncated[1])


def test_biggan_truncated_z_is_the_normal_with_every_entry_beyond_t_resampled():
    z = biggan.sample_z(20000, 5, truncation=0.5, generator=torch.Generator().manual_seed(0))
    assert z.shape == (20000, 5) and z.abs().max() <= 0.5
    normal = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1))
    kept = normal[normal.abs() <= 0.5]  # what resampling until inside leaves: the normal restricted to [-T, T]
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    torch.testing.assert_close(torch.quantile(z.flatten(), quantiles), torch.quantile(kept[:100000], quantiles),
                               atol=0.01, rtol=0)
    assert torch.equal(biggan.sample_z(3, 4, truncation=0.0), torch.zeros(3, 4))
    assert biggan.sample_z(4000, 5).abs().max() > 2  # None: not truncated


def test_biggan_spectral_norm_keeps_each_layers_largest_singular_value_near_1_after_training():
    G, D = biggan_models(width=8, attention=16)
    opt_g, opt_d = biggan.make_optimizers(types.SimpleNamespace(lr=2e-4, lr_g=2e-4), G, D)  # the authors' rates
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        real = torch.rand(8, 1, 32, 32, generator=generator) * 2 - 1
        biggan.train_step(G, D, opt_g, opt_d, [real], [torch.arange(8)], 8, no_scaler())
    layers = spectrally_normed(G) + spectrally_normed(D)
    # G: linear, 3 blocks of 3 convs and 4 cBN maps, attention's 4 convs, output conv; D: 3 + 3 + 2 + 2 block convs,
    # attention, linear, projection embedding
    assert len(layers) == (1 + 3 * 7 + 4 + 1) + (3 + 3 + 2 + 2 + 4 + 1 + 1)
    assert not any(isinstance(m, nn.Embedding) for m in spectrally_normed(G))  # G's shared embedding: no SN
    G.eval(), D.eval()  # the weight as the networks use it, from the last power iteration's vectors
    for layer in layers:
        effective = layer.weight.detach().flatten(1)
        raw = layer.parametrizations.weight.original.detach().flatten(1)
        assert abs(torch.linalg.matrix_norm(effective, ord=2).item() - 1) < 0.05, layer
        assert torch.linalg.matrix_norm(raw, ord=2).item() < 0.8  # N(0, 0.02) init: SN, not the init, gives 1


def test_biggan_orthogonal_penalty_matches_the_hand_computed_value_and_gradient():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]], requires_grad=True)
    # W W^T = [[5, 11, 2], [11, 25, 4], [2, 4, 1]]: off the diagonal 2 * (11^2 + 2^2 + 4^2) = 282
    kernel = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])  # (2, 1, 1, 2) -> rows [1, 0], [1, 1]: 2 * 1^2
    penalty = biggan.orthogonal_penalty([w, kernel])
    assert penalty.item() == 282 + 2
    penalty.backward()
    off_diagonal = torch.tensor([[0.0, 11, 2], [11, 0, 4], [2, 4, 0]])
    torch.testing.assert_close(w.grad, 4 * off_diagonal @ w.detach())  # d/dW ||W W^T * (1 - I)||^2
    orthogonal_rows = torch.tensor([[3.0, 0.0], [0.0, -2.0]])
    assert biggan.orthogonal_penalty([orthogonal_rows]).item() == 0  # norms are free, only overlaps count
    G, _ = biggan_models(attention=16)
    names = {id(p): n for n, p in G.named_parameters()}
    chosen = [names[id(p)] for p in G.orthogonal_weights()]
    assert chosen and all(n.endswith("parametrizations.weight.original") for n in chosen)  # raw, before SN
    assert not [n for n in chosen if n.startswith("shared.")] and "shared.weight" in names.values()
    assert len(chosen) == len(spectrally_normed(G))


def test_biggan_ortho_beta_changes_only_gs_update():
    results = []
    for beta in (0.0, 1.0):
        G, D = biggan_models()
        opt_g, opt_d = biggan.make_optimizers(types.SimpleNamespace(lr=1e-3, lr_g=1e-3), G, D)
        torch.manual_seed(1)
        metrics = biggan.train_step(G, D, opt_g, opt_d, [torch.rand(4, 1, 32, 32) * 2 - 1], [torch.arange(4)], 8,
                                    no_scaler(), ortho_beta=beta)
        results.append((G.state_dict(), D.state_dict(), metrics))
    (g0, d0, m0), (g1, d1, m1) = results
    assert all(torch.equal(d0[k], d1[k]) for k in d0)
    assert not all(torch.equal(g0[k], g1[k]) for k in g0)
    assert m0[4] == 0 and m1[4] > 0  # the penalty column: computed only when it is used


def test_biggan_every_image_reaches_d_through_discriminate_in_both_steps(monkeypatch):
    G, D = biggan_models()
    opt_g, opt_d = biggan.make_optimizers(types.SimpleNamespace(lr=1e-3, lr_g=1e-3), G, D)
    forward_calls, through = [], []
    D.register_forward_hook(lambda module, inputs, out: forward_calls.append(len(inputs[0])))
    real_discriminate = biggan.discriminate
    monkeypatch.setattr(biggan, "discriminate", lambda D_, images, labels, augment=None: through.append(len(images))
                        or real_discriminate(D_, images, labels, augment))
    reals = [torch.rand(4, 1, 32, 32) * 2 - 1 for _ in range(2)]
    biggan.train_step(G, D, opt_g, opt_d, reals, [torch.arange(4)] * 2, 8, no_scaler())
    assert through == forward_calls == [8, 8, 4]  # two D steps on reals + fakes, then G's step on fakes

    shown = []  # and with --augment, every one of those batches is augmented, and ADA hears of each D step

    class Recording:
        def __call__(self, images):
            shown.append(len(images))
            return images.flip(-1)

        def observe(self, real_outputs):
            shown.append(f"observe {len(real_outputs)}")

    biggan.train_step(G, D, opt_g, opt_d, reals, [torch.arange(4)] * 2, 8, no_scaler(), augment=Recording())
    assert shown == [8, "observe 4", 8, "observe 4", 4]


def test_biggan_d_steps_groups_batches_and_makes_one_d_update_per_batch(monkeypatch):
    groups = list(biggan.d_step_groups(iter(range(7)), 3))
    assert groups == [[0, 1, 2], [3, 4, 5], [6]]
    G, D = biggan_models()
    opt_g, opt_d = biggan.make_optimizers(types.SimpleNamespace(lr=1e-3, lr_g=1e-3), G, D)
    steps = {"g": 0, "d": 0}
    for key, opt in (("g", opt_g), ("d", opt_d)):
        opt.register_step_post_hook(lambda *a, key=key: steps.__setitem__(key, steps[key] + 1))
    biggan.train_step(G, D, opt_g, opt_d, [torch.rand(2, 1, 32, 32)] * 3, [torch.arange(2)] * 3, 8, no_scaler())
    assert steps == {"g": 1, "d": 3}


def test_biggan_preset_paper_builds_the_authors_cifar_networks_and_one_step_runs():
    args = biggan.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.latent_dim, args.batch_size, args.lr, args.lr_g, args.d_steps) == (
        32, 256, 128, 50, 2e-4, 2e-4, 4)
    assert (args.shared_dim, args.hier, args.attention, args.ortho_beta, args.average_decay) == (0, False, 0, 0, 0.9999)
    torch.manual_seed(0)
    G, D = biggan.build_models(args, (3, 32, 32), 10)
    # G: linear 128 -> 4*4*256 (524,288 + 4,096); per block: two 3x3 convs 2 * (589,824 + 256), 1x1 shortcut
    # 65,536 + 256, two cBNs of gain and bias embeddings 2 * 2 * 10 * 256; output BN 2 * 256, conv 256 -> 3 6,915.
    block = 2 * (589_824 + 256) + 65_536 + 256 + 2 * 2 * 10 * 256
    assert parameter_count(G) == 524_288 + 4_096 + 3 * block + 512 + 6_912 + 3 == 4_304_387
    # D: block 1: convs 3 -> 256 (6,912 + 256) and 256 -> 256, shortcut 3 -> 256 (768 + 256); block 2 down with a 1x1
    # shortcut; blocks 3 and 4: two convs each, identity shortcut; linear 256 + 1; projection 10 x 256.
    conv = 589_824 + 256
    assert parameter_count(D) == (7_168 + conv + 1_024) + (2 * conv + 65_792) + 2 * 2 * conv + 257 + 2_560 == 4_207_361
    assert G.shared is None and not G.hier and G.attention_after == 0 and D.attention is None
    opt_g, opt_d = biggan.make_optimizers(args, G, D)
    assert opt_g.defaults["betas"] == opt_d.defaults["betas"] == (0.0, 0.999)
    reals = [torch.rand(1, 3, 32, 32) * 2 - 1 for _ in range(args.d_steps)]  # one image per D step: a second
    metrics = biggan.train_step(G, D, opt_g, opt_d, reals, [torch.tensor([k]) for k in range(4)], args.latent_dim,
                                no_scaler(), args.ortho_beta)
    assert metrics.shape == (len(biggan.METRICS),) and torch.isfinite(metrics).all()


# ----------------------------------------------------------------------------------------------------------------
# Runs: the contract outputs, conditional and unconditional, resume, generate, errors

def test_biggan_conditional_run_writes_every_output_and_both_grids(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert biggan_run("--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *BIGGAN_TINY) == 0
    assert "10 classes" in capsys.readouterr().out
    _, checkpoint = assert_run_outputs(out, 1, BIGGAN_COLUMNS)
    assert checkpoint["script"] == "biggan.py" and checkpoint["args"]["image_size"] == 32
    assert "shared.weight" in checkpoint["generator"] and "projection.parametrizations.weight.original" in (
        checkpoint["discriminator"])
    for grid in ("samples/epoch_001.png", "truncation_0.5.png"):  # one row per class, 10 columns
        assert Image.open(out / grid).size == (2 + 10 * 34, 2 + 10 * 34), grid
    assert biggan_run("--out", out, "--generate", 25, "--truncation", 1.0) == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (25, 32, 32, 1) and samples["images"].dtype == np.uint8
    assert list(samples["labels"][:12]) == [*range(10), 0, 1]
    assert Image.open(out / "samples_truncation_0.5.png").size == (2 + 10 * 34, 2 + 10 * 34)
    assert biggan_run("--out", out, "--generate", 4, "--label", 7, "--truncation", 0) == 0
    samples = np.load(out / "samples.npz")
    assert (samples["labels"] == 7).all() and (samples["images"] == samples["images"][0]).all()  # T = 0


def test_biggan_folder_of_loose_images_trains_unconditional(tmp_path, capsys):
    folder = tmp_path / "loose"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    assert biggan_run("--dataset", folder, "--out", out, "--epochs", 1, *BIGGAN_TINY, "--batch-size", 8,
                      "--image-size", 32) == 0
    assert "unconditional" in capsys.readouterr().out
    rows, checkpoint = assert_run_outputs(out, 1, [*biggan.METRICS, "d_acc_fake"])
    assert rows[0]["d_acc_real_test"] == ""  # a folder has no held-out split
    assert not [k for k in checkpoint["generator"] if k.startswith("shared.")]
    assert not [k for k in checkpoint["discriminator"] if k.startswith("projection.")]
    assert Image.open(out / "samples" / "epoch_001.png").size == (2 + 10 * 34, 2 + 10 * 34)  # 100, not 10 a class
    assert biggan_run("--out", out, "--generate", 3) == 0
    assert set(np.load(out / "samples.npz")) == {"images"}
    capsys.readouterr()
    assert biggan_run("--out", out, "--generate", 3, "--label", 0) == 2
    one_line_error(capsys, "--label 0", "not conditional")


def test_biggan_resume_gives_exactly_the_uninterrupted_run(tiny_mnist, tmp_path, capsys):
    common = ["--data-dir", tiny_mnist, *BIGGAN_TINY, "--d-steps", 2]
    assert biggan_run(*common, "--out", tmp_path / "straight", "--epochs", 2) == 0
    assert biggan_run(*common, "--out", tmp_path / "resumed", "--epochs", 1) == 0
    capsys.readouterr()
    assert biggan_run("--data-dir", tiny_mnist, "--out", tmp_path / "resumed", "--epochs", 2, "--resume") == 0
    assert "epochs 2..2" in capsys.readouterr().out  # the run's own width, d-steps, ... kept
    straight, resumed = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
                         for name in ("straight", "resumed"))
    for key in ("generator", "generator_average", "discriminator"):  # spectral norm's vectors included
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    assert read_rows(tmp_path / "straight" / "metrics.csv")[1]["d_loss"] == read_rows(
        tmp_path / "resumed" / "metrics.csv")[1]["d_loss"]
    assert biggan_run(*common, "--out", tmp_path / "resumed", "--epochs", 3, "--resume", "--d-steps", 3) == 2
    one_line_error(capsys, "--d-steps 3", "--d-steps 2, which --resume keeps")


BIGGAN_BAD = [["--epochs", 0], ["--batch-size", 0], ["--lr", 0], ["--lr-g", "nan"], ["--latent-dim", 0],
              ["--width", 0], ["--log-every", 0], ["--generate", 0], ["--fid", 1], ["--average-decay", 1],
              ["--seed", -1], ["--image-size", 48], ["--d-steps", 0], ["--ortho-beta", -1], ["--truncation", -0.5],
              ["--shared-dim", -1], ["--attention", 12], ["--attention", 32], ["--attention", 4], ["--label", 3],
              ["--device", "tpu"]]


def test_biggan_every_bad_number_exits_2_with_one_line_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    for bad in BIGGAN_BAD:
        assert exit_code(biggan, ["--out", tmp_path / "run", *bad]) == 2, bad
        assert one_line_error(capsys, bad[0]).startswith("biggan.py: error: "), bad
    assert biggan.parse_args(["--attention", "32", "--image-size", "64"]).attention == 32


def test_biggan_nan_loss_stops_the_run_and_ctrl_c_keeps_the_last_epoch(tiny_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", tiny_mnist, "--out", out, *BIGGAN_TINY]
    calls, real_step = [], biggan.train_step

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) > 5:  # during epoch 2 (80 images in batches of 16: 5 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(biggan, "train_step", interrupted_step)
    assert biggan_run(*common, "--epochs", 3) == 130
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(biggan, "train_step", real_step)
    good = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(biggan, "g_loss_hinge", lambda outputs: outputs.float().mean() * float("nan"))
    capsys.readouterr()
    assert biggan_run(*common, "--epochs", 3, "--resume") == 1
    assert "diverged" in capsys.readouterr().err and (out / "checkpoint.pt").read_bytes() == good


def test_biggan_amp_run_gives_finite_losses(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert biggan_run("--data-dir", tiny_mnist, "--out", out, "--epochs", 1, "--amp", *BIGGAN_TINY) == 0
    assert_run_outputs(out, 1, BIGGAN_COLUMNS)


def test_biggan_fid_flag_scores_every_class_equally_often(tiny_mnist, tmp_path, monkeypatch, capsys):
    scored, expected = mock_inception(monkeypatch)
    assert biggan_run("--data-dir", tiny_mnist, "--out", tmp_path / "run", "--epochs", 1, "--fid", 30,
                      *BIGGAN_TINY) == 0
    assert expected() in capsys.readouterr().out
    assert scored[0].shape == (30, 1, 32, 32) and scored[0].dtype == torch.uint8


@pytest.mark.slow
def test_biggan_torchrun_two_processes_write_every_output_once(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    flags = ["--data-dir", tiny_mnist, "--out", out, "--device", "cpu", *BIGGAN_TINY]
    result = torchrun(["biggan.py", *flags, "--epochs", 2])  # replicas compared after each epoch
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("epoch 2: ") == 1  # only rank 0 reports
    assert_run_outputs(out, 2, BIGGAN_COLUMNS)  # one row and one grid per epoch: written once
    assert biggan_run("--out", out, "--generate", 4) == 0


# ================================================================================================================
# Augmentation for small data: data.augment, ADA's controller, --augment / --train-images in every script

def one_bright_pixel(b=16, size=16):
    """b grayscale images at -1 with one +1 pixel in the middle."""
    images = torch.full((b, 1, size, size), -1.0)
    images[:, :, size // 2, size // 2] = 1.0
    return images


def test_translation_moves_a_bright_pixel_by_the_drawn_shift_with_zero_fill():
    torch.manual_seed(0)
    size, limit = 16, data.translation_limit(16)
    images = one_bright_pixel(size=size)
    shifted = data.translate(images)
    shifts = set()
    for out in shifted:
        (_, y, x), = (out == 1).nonzero().tolist()
        dy, dx = y - size // 2, x - size // 2
        assert abs(dy) <= limit and abs(dx) <= limit
        expected = torch.zeros(1, size, size)  # what the shift uncovers is 0
        expected[:, max(dy, 0):size + min(dy, 0), max(dx, 0):size + min(dx, 0)] = -1.0
        expected[:, y, x] = 1.0
        assert torch.equal(out, expected)
        shifts.add((dy, dx))
    assert len(shifts) > 4  # each image draws its own shift


def test_cutout_zeroes_a_square_of_half_the_side():
    torch.manual_seed(0)
    images = torch.ones(64, 3, 16, 16)
    side = data.cutout_size(16)
    full = 0
    for out in data.cutout(images):
        zero = out == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # every channel alike
        rows, cols = zero[0].any(1).nonzero().flatten(), zero[0].any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert 0 < height <= side and 0 < width <= side and int(zero[0].sum()) == height * width  # a rectangle
        assert rows.max() - rows.min() + 1 == height and cols.max() - cols.min() + 1 == width
        touches = rows.min() == 0 or rows.max() == 15, cols.min() == 0 or cols.max() == 15
        assert (height == side or touches[0]) and (width == side or touches[1])  # only clipped at the border
        full += height == side and width == side
        assert torch.all(out[~zero] == 1)
    assert full > 10


def test_brightness_shifts_each_images_mean_and_contrast_scales_around_it():
    torch.manual_seed(0)
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    offset = data.brightness(images) - images
    assert torch.allclose(offset, offset[:, :1, :1, :1].expand_as(offset))  # one shift per image
    assert offset.abs().max() <= 0.5 and len(set(offset[:, 0, 0, 0].tolist())) == 8
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    contrasted = data.contrast(images)
    assert torch.allclose(contrasted.mean(dim=(1, 2, 3), keepdim=True), mean, atol=1e-6)
    factor = (contrasted - mean) / (images - mean)
    assert torch.allclose(factor, factor[:, :1, :1, :1].expand_as(factor), atol=1e-4)
    assert factor.min() >= 0.5 - 1e-4 and factor.max() < 1.5 + 1e-4


def test_saturation_scales_colour_around_each_pixels_grey_and_leaves_grayscale_alone():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 8, 8) * 2 - 1
    grey = images.mean(dim=1, keepdim=True)
    saturated = data.saturation(images)
    assert torch.allclose(saturated.mean(dim=1, keepdim=True), grey, atol=1e-6)
    factor = (saturated - grey) / (images - grey)
    assert torch.allclose(factor, factor[:, :1, :1, :1].expand_as(factor), atol=1e-3)
    assert 0 <= factor.min() and factor.max() < 2 + 1e-3 and factor[:, 0, 0, 0].std() > 0.1
    gray = images[:, :1]
    assert torch.equal(data.saturation(gray), gray)


def test_p_zero_is_the_identity_and_p_one_changes_every_image():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    policy = ("color", "translation", "cutout")
    assert torch.equal(data.augment(images, policy, p=torch.tensor(0.0)), images)
    assert torch.equal(data.augment(images, policy, p=0.0), images)
    changed = (data.augment(images, policy) != images).flatten(1).any(1)
    assert changed.all()


def test_each_operation_is_applied_to_each_image_with_probability_p():
    torch.manual_seed(0)
    images = torch.ones(2000, 1, 8, 8)
    hit = (data.augment(images, ("cutout",), p=torch.tensor(0.3)) == 0).flatten(1).any(1).float().mean()
    assert 0.26 < hit < 0.34


def test_gradients_flow_through_augment_to_its_input():
    torch.manual_seed(0)
    images = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    weights = torch.randn(4, 3, 16, 16)
    (data.augment(images, ("color", "translation", "cutout"), p=torch.tensor(0.7)) * weights).sum().backward()
    assert images.grad is not None and (images.grad != 0).all()  # colour's means spread it over every pixel
    images.grad = None
    (data.augment(images, ("translation", "cutout")) * weights).sum().backward()
    kept = images.grad != 0
    assert kept.flatten(1).any(1).all() and not kept.all()  # cut out or shifted away pixels get none


def test_default_policy_is_everything_for_colour_and_no_colour_for_grayscale():
    assert data.default_policy(3) == ("color", "translation", "cutout")
    assert data.default_policy(1) == ("translation", "cutout")


def test_augment_draws_from_the_global_rng_so_a_seed_repeats_it():
    images = torch.rand(4, 3, 16, 16)
    torch.manual_seed(5)
    first = data.augment(images, ("color", "translation", "cutout"), p=torch.tensor(0.5))
    torch.manual_seed(5)
    assert torch.equal(first, data.augment(images, ("color", "translation", "cutout"), p=torch.tensor(0.5)))


def test_ada_p_rises_when_d_calls_every_real_real_and_stays_near_zero_at_chance():
    overfit = data.Augmentation(("translation",), "cpu", target=0.6)
    for _ in range(4 * 10):  # 40 D steps of 64 reals: 10 updates of 256 images each
        overfit.observe(torch.ones(64))
    assert overfit.p.item() == pytest.approx(10 * 256 / data.ADA_SPEED_IMAGES)
    chance = data.Augmentation(("translation",), "cpu", target=0.6)
    torch.manual_seed(0)
    for _ in range(4 * 200):
        chance.observe(torch.randn(64))  # r_t ~ 0 < 0.6: p pushed down, clamped at 0
    assert chance.p.item() == 0.0
    fresh, images = data.Augmentation(("translation",), "cpu", target=0.6), 0
    while fresh.p.item() < 1:  # D calls every real real: p climbs from 0 to 1, within ~20k images
        fresh.observe(torch.ones(64))
        images += 64
    assert 15_000 <= images <= 25_000
    for _ in range(8):
        fresh.observe(torch.ones(64))
    assert fresh.p.item() == 1.0  # clamped at 1


def test_ada_state_round_trips_and_diffaug_is_always_p_one():
    ada = data.Augmentation(("cutout",), "cpu", target=0.6)
    for _ in range(6):
        ada.observe(torch.ones(8))
    copy_of = data.Augmentation(("cutout",), "cpu", target=0.6)
    copy_of.load_state_dict(ada.state_dict())
    for a in (ada, copy_of):
        for _ in range(2):
            a.observe(torch.ones(8))
    assert ada.p.item() == copy_of.p.item() > 0 and ada.steps == copy_of.steps == 0
    diffaug = data.make_augmentation("diffaug", None, 3, "cpu")
    diffaug.observe(-torch.ones(1000))
    assert diffaug.p.item() == 1.0 and diffaug.policy == ("color", "translation", "cutout")
    assert data.make_augmentation("none", None, 1, "cpu") is None


class RecordingD(nn.Module):
    """Wraps a D: records every batch of images it is shown."""

    def __init__(self, D):
        super().__init__()
        self.D, self.seen = D, []

    def forward(self, images, *rest):
        self.seen.append(images.detach().clone())
        return self.D(images, *rest)


def test_dcgan_d_sees_reals_and_fakes_independently_augmented_in_both_steps_and_g_learns_through_it():
    torch.manual_seed(0)
    G, D = models(dcgan, 32, 1, width=4)
    D = RecordingD(D)
    opt_g, opt_d = dcgan.make_optimizers(dcgan.parse_args([]), G, D)
    real = torch.ones(8, 1, 32, 32)
    augmentation = data.Augmentation(("cutout",), "cpu")
    before = [p.detach().clone() for p in G.parameters()]
    dcgan.train_step(G, D, opt_g, opt_d, real, None, 16, no_scaler(), augment=augmentation)
    assert len(D.seen) == 3  # reals and fakes in D's step, fakes in G's
    squares = [(images == 0).flatten(1) for images in D.seen]
    assert all(square.any(1).all() for square in squares)  # every image D saw had its square cut out
    assert not torch.equal(squares[0], squares[1]) and not torch.equal(squares[1], squares[2])  # fresh draws
    assert all(not torch.equal(b, p) for b, p in zip(before, G.parameters()))  # G's step passed through it


def test_dcgan_g_gradient_reaches_g_through_the_augmentation():
    torch.manual_seed(0)
    G, D = models(dcgan, 32, 1, width=4)
    fake = G(torch.randn(4, 16))
    dcgan.g_loss(D(data.augment(fake, ("translation", "cutout")))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())


def test_dcgan_r1_differentiates_through_the_augmentation_at_the_unaugmented_reals():
    torch.manual_seed(0)
    _, D = models(dcgan, 32, 1, width=4)
    real = torch.rand(4, 1, 32, 32) * 2 - 1
    cut = lambda images: images * torch.cat([torch.zeros(1, 1, 16, 32), torch.ones(1, 1, 16, 32)], 2)  # noqa: E731
    penalty = dcgan.r1_penalty(D, real, augment=cut)
    x = real.clone().requires_grad_(True)
    (grads,) = torch.autograd.grad(D(cut(x)).sum(), x)
    assert (grads[:, :, :16] == 0).all() and penalty.item() == pytest.approx(grads.flatten(1).pow(2).sum(1).mean())


def test_dcgan_augment_none_draws_nothing_more_from_the_rng():
    torch.manual_seed(0)
    G, D = models(dcgan, 32, 1, width=4)
    opt_g, opt_d = dcgan.make_optimizers(dcgan.parse_args([]), G, D)
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    torch.manual_seed(1)
    dcgan.train_step(G, D, opt_g, opt_d, real, None, 16, no_scaler(), augment=None)
    after_step = torch.get_rng_state()
    torch.manual_seed(1)
    torch.randn(8, 16)  # z: the step's only draw, as before --augment existed
    assert torch.equal(after_step, torch.get_rng_state())


def augment_p_column(out):
    with open(out / "metrics.csv", newline="") as f:
        return [row["augment_p"] for row in csv.DictReader(f)]


def test_dcgan_ada_resume_keeps_p_and_continues_exactly(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "ADA_SPEED_IMAGES", 200)  # p moves fast enough to see in 80 images
    common = ["--data-dir", tiny_mnist, *TINY, "--augment", "ada", "--ada-target", "0.1"]
    assert run_script(dcgan, [*common, "--out", tmp_path / "whole", "--epochs", 2]) == 0
    assert run_script(dcgan, [*common, "--out", tmp_path / "part", "--epochs", 1]) == 0
    assert run_script(dcgan, ["--out", tmp_path / "part", "--epochs", 2, "--resume", "--data-dir", tiny_mnist]) == 0
    whole, part = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("whole", "part"))
    assert part["args"]["augment"] == "ada" and part["args"]["ada_target"] == 0.1
    assert torch.equal(whole["augment"]["p"], part["augment"]["p"]) and whole["augment"]["p"] > 0  # p rose
    assert all(torch.equal(whole["generator"][k], part["generator"][k]) for k in whole["generator"])
    assert augment_p_column(tmp_path / "whole") == augment_p_column(tmp_path / "part")


def test_dcgan_augmented_images_never_reach_the_grid_or_generate(tiny_mnist, tmp_path, monkeypatch):
    """D is shown only white images; the grid and --generate come from G directly, so they are not white."""
    calls = []

    def white(images, policy, p=1.0):
        calls.append(len(images))
        return images * 0 + 1

    monkeypatch.setattr(data, "augment", white)
    out = tmp_path / "run"
    assert run_script(dcgan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *TINY, "--augment", "diffaug"]) == 0
    assert len(calls) == 3 * 5  # 5 steps: reals and fakes for D, fakes for G
    assert np.asarray(Image.open(out / "samples" / "epoch_001.png")).min() < 200
    assert run_script(dcgan, ["--out", out, "--generate", 10]) == 0
    assert np.load(out / "samples.npz")["images"].min() < 200
    assert augment_p_column(out) == ["1.0000"]


@pytest.mark.parametrize("script", [dcgan, gan])
@pytest.mark.parametrize("bad", [["--augment-policy", "color,flip"], ["--augment", "maybe"], ["--ada-target", 0],
                                 ["--ada-target", 1], ["--ada-target", 1.5], ["--train-images", 0]])
def test_bad_augment_flags_exit_2_with_one_line(script, bad, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    assert exit_code(script, ["--out", tmp_path / "run", *bad]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and bad[0] in lines[0], lines


def test_train_images_keeps_the_first_n_and_the_held_out_split(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script(dcgan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *TINY, "--train-images", 20]) == 0
    printed = capsys.readouterr().out
    assert "20 images" in printed and "1 steps per epoch" in printed  # 20 images, batch 16
    with open(out / "metrics.csv", newline="") as f:
        row, = csv.DictReader(f)
    assert row["d_acc_real_test"] != "" and row["augment_p"] == "0.0000"
    assert run_script(dcgan, ["--data-dir", tiny_mnist, "--out", tmp_path / "all", "--epochs", 1, *TINY,
                              "--train-images", 10_000]) == 0
    assert "80 images" in capsys.readouterr().out


def test_lapgan_augments_each_levels_coarse_image_and_residual_alike():
    torch.manual_seed(0)
    bands, lows = lapgan.laplacian_pyramid(torch.rand(8, 1, 32, 32) * 2 - 1, 3)
    augmentation = data.Augmentation(("translation", "cutout"), "cpu")
    shown_bands, shown_lows = lapgan.shown_levels(augmentation, bands, lows)
    assert [b.shape for b in shown_bands] == [b.shape for b in bands]
    for low, band in zip(shown_lows, shown_bands[1:]):
        assert torch.equal(low == 0, band == 0)  # the same square cut, the same border uncovered
    assert lapgan.shown_levels(None, bands, lows) == (bands, lows)


@pytest.mark.parametrize("script", SCRIPT_MODULES, ids=lambda m: m.__name__)
def test_every_script_trains_one_tiny_epoch_with_ada_and_logs_augment_p(script, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert run_script(script, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *tiny_flags(script),
                               "--augment", "ada", "--augment-policy", "color,translation,cutout"]) == 0
    p, = augment_p_column(out)
    assert 0 <= float(p) <= 1
    assert "p" in torch.load(out / "checkpoint.pt", weights_only=True)["augment"]


# ================================================================================================================
# stylegan.py: the StyleGAN2 ingredients one by one, the paper preset, and the run contract on tiny data

STYLE_TINY = ["--width", "4", "--latent-dim", "8", "--w-dim", "8", "--batch-size", "16", "--log-every", "1"]


def tiny_stylegan(image_size=32, channels=1, num_classes=0, width=8, dim=8):
    torch.manual_seed(0)
    G = stylegan.Generator(dim, dim, image_size, channels, width, 1024, 2, num_classes)
    D = stylegan.Discriminator(image_size, channels, width, 1024, 4, num_classes)
    return G, D


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_stylegan_shapes_at_32_and_64_px(image_size, num_classes):
    G, D = tiny_stylegan(image_size, 3, num_classes)
    z, labels = torch.randn(5, 8), (torch.arange(5) if num_classes else None)
    fake = G(z, labels)
    assert fake.shape == (5, 3, image_size, image_size) and D(fake, labels).shape == (5,)
    assert G.num_ws == 2 * (image_size.bit_length() - 2)  # 2 per resolution 4, 8, ...: 8 at 32 px, 10 at 64 px
    assert len(G.synthesis.to_rgbs) == G.num_ws // 2 and len(D.blocks) == image_size.bit_length() - 3


def test_stylegan_demodulation_gives_unit_norm_weights_per_output_channel():
    torch.manual_seed(0)
    layer = stylegan.ModulatedConv2d(6, 5, w_dim=4, kernel_size=3)
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 4)
    out = layer(x, w)
    styles = layer.affine(w)
    for b in range(3):  # the per-sample weight w'' of the fused formulation, built by hand
        modulated = layer.weight * layer.weight_gain * styles[b][None, :, None, None]
        demodulated = modulated / modulated.square().sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
        torch.testing.assert_close(demodulated.square().sum(dim=(1, 2, 3)), torch.ones(5))
        torch.testing.assert_close(out[b:b + 1], F.conv2d(x[b:b + 1], demodulated, padding=1), atol=1e-5, rtol=1e-4)


def test_stylegan_modulation_by_a_constant_style_of_ones_without_demodulation_is_a_plain_convolution():
    torch.manual_seed(0)
    layer = stylegan.ModulatedConv2d(6, 5, w_dim=4, kernel_size=3, demodulate=False)
    with torch.no_grad():
        layer.affine.weight.zero_()  # styles = the bias, which starts at 1
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 4)
    assert torch.equal(layer.affine(w), torch.ones(3, 6))
    torch.testing.assert_close(layer(x, w), F.conv2d(x, layer.weight / math.sqrt(6 * 9), padding=1))


def test_stylegan_resampling_is_the_1_3_3_1_filter():
    x = torch.randn(2, 3, 8, 8)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = (taps[:, None] * taps[None, :] / 64).expand(3, 1, 4, 4)
    torch.testing.assert_close(stylegan.downsample(x), F.conv2d(F.pad(x, [1, 1, 1, 1]), kernel, stride=2, groups=3))
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(stylegan.upsample(x)[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1])  # inside: bilinear
    assert stylegan.upsample(torch.ones(1, 1, 4, 4))[0, 0, 2:-2, 2:-2].eq(1).all()  # gain 4 after zero insertion


def test_stylegan_truncation_psi_0_gives_the_mean_image_for_every_z():
    G, _ = tiny_stylegan()
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.randn(8))  # as if trained: not the zero it starts at
    z = torch.randn(6, 8)
    for noise_mode in ("const", "none"):
        images = G(z, psi=0.0, noise_mode=noise_mode)
        mean_image = G.synthesis(stylegan.broadcast(G.mapping.w_avg[None], G.num_ws), noise_mode)
        torch.testing.assert_close(images, mean_image.expand_as(images))
    assert (G(z, psi=1.0, noise_mode="const")[0] - G(z, psi=1.0, noise_mode="const")[1]).abs().max() > 1e-3
    half = G.mapping(z, psi=0.5)
    torch.testing.assert_close(half, (G.mapping.w_avg + G.mapping(z)) / 2)


def test_stylegan_mapping_tracks_the_mean_w_only_when_asked():
    G, _ = tiny_stylegan()
    z = torch.randn(16, 8)
    G.mapping(z)
    assert G.mapping.w_avg.eq(0).all()
    w = G.mapping(z, track_average=True)
    torch.testing.assert_close(G.mapping.w_avg, (1 - stylegan.W_AVERAGE_BETA) * w.detach().mean(0))


def test_stylegan_r1_against_a_hand_computed_value():
    a = torch.randn(1, 2, 3, 3)
    D = lambda images, labels=None: (images * a).flatten(1).sum(1)  # noqa: E731  grad_x D = a for every image
    real = torch.randn(4, 2, 3, 3)
    norm = a.square().sum()
    torch.testing.assert_close(stylegan.r1_penalty(D, real), norm)
    gamma = 0.3  # on the steps that carry it, lazy R1 weighs gamma/2 ||a||^2 times the interval
    torch.testing.assert_close(stylegan.lazy_r1(D, real, None, gamma), stylegan.R1_INTERVAL * gamma / 2 * norm)


def test_stylegan_augments_every_image_d_sees_and_takes_r1_through_the_augmentation():
    G, D = tiny_stylegan()
    opt_g, opt_d = stylegan.make_optimizers(stylegan.parse_args(["--r1-gamma", "1"]), G, D)
    shown = []

    class Recording:  # what data.Augmentation is to train_step: called on images, told of D's real logits
        def __call__(self, images):
            shown.append(("augment", len(images), images.requires_grad))
            return images.flip(-1)

        def observe(self, real_logits):
            shown.append(("observe", len(real_logits)))

    real = torch.rand(4, 1, 32, 32) * 2 - 1
    stylegan.train_step(G, D, opt_g, opt_d, real, None, 8, no_scaler(), stylegan.R1_INTERVAL, 1.0, augment=Recording())
    # D's step: reals, fakes, then R1's reals (a leaf that wants its gradient); ADA hears; then G's step on fakes.
    assert shown == [("augment", 4, False), ("augment", 4, False), ("augment", 4, True), ("observe", 4),
                     ("augment", 4, True)]


def test_stylegan_lazy_r1_enters_ds_gradient_only_every_16th_step(monkeypatch):
    G, D = tiny_stylegan()
    calls = []
    monkeypatch.setattr(stylegan, "lazy_r1", lambda *a, **kw: calls.append(1) or torch.zeros([]))
    opt_g, opt_d = stylegan.make_optimizers(stylegan.parse_args(["--r1-gamma", "1"]), G, D)
    real = torch.rand(4, 1, 32, 32) * 2 - 1
    for step in range(1, 34):
        stylegan.train_step(G, D, opt_g, opt_d, real, None, 8, no_scaler(), step, r1_gamma=1.0)
    assert len(calls) == 2  # steps 16 and 32
    c = stylegan.R1_INTERVAL / (stylegan.R1_INTERVAL + 1)  # the official optimizer compensation
    assert opt_d.defaults["lr"] == pytest.approx(0.0025 * c) and opt_d.defaults["betas"] == (0.0, 0.99 ** c)
    assert opt_g.defaults["lr"] == 0.0025 and opt_g.defaults["betas"] == (0.0, 0.99)  # no path length: no G steps


def test_stylegan_style_mixing_switches_styles_at_the_cutoff_layer():
    G, _ = tiny_stylegan()
    w1, w2 = G.mapping(torch.randn(2, 8)), G.mapping(torch.randn(2, 8))
    cutoff = 3
    ws = stylegan.mix_styles(stylegan.broadcast(w1, G.num_ws), stylegan.broadcast(w2, G.num_ws), cutoff)
    seen = []  # the w each layer and each ToRGB receives, in the order the synthesis network reads them
    hooks = [m.register_forward_hook(lambda module, inputs, output: seen.append((module, inputs[1])))
             for m in [*G.synthesis.layers, *G.synthesis.to_rgbs]]
    G.synthesis(ws)
    for hook in hooks:
        hook.remove()
    layer_w = {id(module): w for module, w in seen}
    layers, to_rgbs = G.synthesis.layers, G.synthesis.to_rgbs
    indices = [(layer, k) for k, layer in enumerate(layers)] + [(rgb, 2 * j + 1) for j, rgb in enumerate(to_rgbs)]
    for module, k in indices:
        assert torch.equal(layer_w[id(module)], w1 if k < cutoff else w2), k
    # In training: with probability 1 every batch mixes, at a cutoff in 1..num_ws - 1
    torch.manual_seed(3)
    ws = stylegan.style_ws(G, torch.randn(2, 8), None, mixing_prob=1.0)
    switches = [k for k in range(1, G.num_ws) if not torch.equal(ws[:, k], ws[:, k - 1])]
    assert len(switches) == 1 and torch.equal(ws[:, 0], ws[:, switches[0] - 1])


def test_stylegan_style_mixing_grid_takes_coarse_layers_from_the_column_and_fine_ones_from_the_row():
    G, _ = tiny_stylegan()
    G.eval()
    grid = stylegan.style_mixing_grid(G, 8, 0, "cpu", seed=1, columns=9, rows=2).unflatten(0, (3, 10))
    assert grid[0, 0].eq(0).all()  # the empty corner
    every_layer_from_the_column = stylegan.style_mixing_grid(G, 8, 0, "cpu", 1, 9, 2, cutoff=G.num_ws)
    every_layer_from_the_row = stylegan.style_mixing_grid(G, 8, 0, "cpu", 1, 9, 2, cutoff=0)
    column_sources, row_sources = grid[0, 1:], grid[1:, 0]
    for r in range(2):
        torch.testing.assert_close(every_layer_from_the_column.unflatten(0, (3, 10))[r + 1, 1:], column_sources)
        torch.testing.assert_close(every_layer_from_the_row.unflatten(0, (3, 10))[r + 1, 1:],
                                   row_sources[r].expand(9, -1, -1, -1))
    mixed = grid[1:, 1:]  # the default cutoff: neither source alone
    assert (mixed - column_sources).abs().amax() > 1e-4 and (mixed - row_sources[:, None]).abs().amax() > 1e-4


def test_stylegan_path_length_penalty_moves_its_running_mean_and_g_gets_the_optimizer_compensation():
    G, _ = tiny_stylegan()
    assert stylegan.path_length_penalty(G, torch.randn(4, 8), None) > 0  # pl_mean starts at 0: far from the lengths
    assert 0 < G.pl_mean < 10
    opt_g, opt_d = stylegan.make_optimizers(stylegan.parse_args(["--pl-weight", "2"]), G, G)
    c = stylegan.PL_INTERVAL / (stylegan.PL_INTERVAL + 1)
    assert opt_g.defaults["lr"] == pytest.approx(0.0025 * c) and opt_g.defaults["betas"] == (0.0, 0.99 ** c)


def test_stylegan_average_half_life_ramps_with_the_images_seen():
    G = nn.Linear(1, 1, bias=False)
    average = copy.deepcopy(G)
    for step, decay, expected_half_life in ((100, 0.999, 5.0), (100_000, 0.999, math.log(0.5) / math.log(0.999))):
        with torch.no_grad():
            average.weight.fill_(0.0), G.weight.fill_(1.0)
        stylegan.update_average(average, G, step, decay)
        assert average.weight.item() == pytest.approx(1 - 0.5 ** (1 / expected_half_life))
    stylegan.update_average(average, G, 5, 0.0)
    assert average.weight.item() == 1.0  # decay 0: a plain copy


def test_stylegan_preset_paper_builds_the_papers_networks_and_one_step_runs():
    args = stylegan.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.channel_base, args.latent_dim, args.w_dim, args.mapping_layers) == (
        32, 512, 16384, 512, 512, 2)
    assert (args.batch_size, args.mbstd_group, args.lr, args.r1_gamma, args.style_mixing, args.pl_weight) == (
        64, 32, 0.0025, 0.01, 0.0, 0.0)
    assert math.log(0.5) / math.log(args.average_decay) * 64 == pytest.approx(500_000)  # half-life 500k images
    G, D = stylegan.build_models(args, (3, 32, 32), 10)
    c = 512
    affine = c * c + c  # w -> one style per input channel
    mapping = 2 * (c * c + c)
    layer = affine + c * c * 9 + 1 + c  # modulated 3x3 weight, noise strength, bias
    to_rgb = affine + 3 * c + 3
    g_count = mapping + c * 16 + 7 * layer + 4 * to_rgb  # const, 1 layer at 4 px + 2 at each of 8, 16, 32; 4 ToRGBs
    conv3 = c * c * 9 + c
    d_count = (3 * c + c) + 6 * conv3 + ((c + 1) * c * 9 + c) + (c * 16 * c + c) + (c + 1)  # fromRGB, 3 blocks, epilogue
    assert (parameter_count(G), parameter_count(D)) == (g_count, d_count) == (19_947_539, 20_720_641)
    assert list(stylegan.channels_at(32, 512, 16384).values()) == [512, 512, 512, 512]
    opt_g, opt_d = stylegan.make_optimizers(args, G, D)
    metrics = stylegan.train_step(G, D, opt_g, opt_d, torch.rand(2, 3, 32, 32) * 2 - 1, None, args.latent_dim,
                                  no_scaler(), step=1, r1_gamma=args.r1_gamma)
    assert metrics.shape == (len(stylegan.METRICS),) and torch.isfinite(metrics).all()


def test_stylegan_every_bad_number_exits_2_with_one_line_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    own = [["--width", 0], ["--channel-base", 0], ["--w-dim", 0], ["--mapping-layers", 0], ["--mbstd-group", 0],
           ["--image-size", 48], ["--r1-gamma", -1], ["--pl-weight", -1], ["--style-mixing", 1.5],
           ["--truncation", -0.1], ["--truncation", "nan"], ["--label", 3]]
    for bad in BAD_NUMBERS + own:
        assert exit_code(stylegan, ["--out", tmp_path / "run", *bad]) == 2, bad
        err = one_line_error(capsys, bad[0])
        assert err.startswith("stylegan.py: error: "), err


def test_stylegan_run_writes_every_output_and_generate_writes_samples_and_style_grids(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert run_script(stylegan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, *STYLE_TINY]) == 0
    rows, checkpoint = assert_run_outputs(out, 1, stylegan.METRICS)
    assert all(0 <= float(rows[0][c]) <= 1 for c in ("d_acc_real_train", "d_acc_real_test", "d_acc_fake"))
    assert Image.open(out / "samples" / "epoch_001.png").size == (2 + 10 * 34, 2 + 10 * 34)  # 10x10 of 32x32
    assert Image.open(out / "style_mixing.png").size == (2 + 10 * 34, 2 + 7 * 34)  # sources row + 6 mixed rows
    assert Image.open(out / "truncation.png").size == (2 + 10 * 34, 2 + 6 * 34)
    assert "w_avg" in "".join(checkpoint["generator_average"]) and checkpoint["args"]["image_size"] == 32
    os.remove(out / "truncation.png")
    assert run_script(stylegan, ["--out", out, "--generate", 12, "--truncation", 0]) == 0
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (12, 32, 32, 1) and (images == images[0]).all()  # psi 0: the mean image every time
    assert (out / "truncation.png").is_file() and (out / "style_mixing.png").is_file()


def test_stylegan_resume_gives_exactly_the_uninterrupted_run_with_every_regulariser(tiny_mnist, tmp_path, capsys):
    common = ["--data-dir", tiny_mnist, *STYLE_TINY, "--batch-size", 8, "--style-mixing", 0.5, "--pl-weight", 1]
    assert run_script(stylegan, [*common, "--out", tmp_path / "straight", "--epochs", 2]) == 0  # R1 at step 16
    assert run_script(stylegan, [*common, "--out", tmp_path / "resumed", "--epochs", 1]) == 0
    capsys.readouterr()
    assert run_script(stylegan, ["--data-dir", tiny_mnist, "--out", tmp_path / "resumed", "--epochs", 2,
                                 "--resume"]) == 0  # every setting from the checkpoint
    assert "epochs 2..2" in capsys.readouterr().out
    straight, resumed = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
                         for name in ("straight", "resumed"))
    for key in ("generator", "generator_average", "discriminator"):
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    assert straight["generator"]["pl_mean"] > 0
    rows = read_rows(tmp_path / "straight" / "metrics.csv")
    assert float(rows[1]["r1_penalty"]) > 0 and float(rows[0]["r1_penalty"]) == 0  # lazy: step 16 is in epoch 2
    assert rows == [dict(r, seconds=s["seconds"], img_per_s=s["img_per_s"])
                    for r, s in zip(read_rows(tmp_path / "resumed" / "metrics.csv"), rows)]
    capsys.readouterr()
    assert run_script(stylegan, [*common, "--out", tmp_path / "resumed", "--epochs", 3, "--resume",
                                 "--pl-weight", 2]) == 2
    one_line_error(capsys, "--pl-weight 2", "which --resume keeps")


def test_stylegan_conditional_one_tiny_epoch_and_generate_one_class(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    assert run_script(stylegan, ["--data-dir", tiny_mnist, "--out", out, "--epochs", 1, "--conditional",
                                 *STYLE_TINY]) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "mapping.label_embedding.weight" in checkpoint["generator"]
    assert "label_embedding.weight" in checkpoint["discriminator"]
    assert run_script(stylegan, ["--out", out, "--generate", 6, "--label", 3]) == 0
    assert np.load(out / "samples.npz")["labels"].tolist() == [3] * 6
    G, _ = stylegan.build_models(argparse.Namespace(**checkpoint["args"]), (1, 32, 32), 10)
    G.load_state_dict(checkpoint["generator_average"])
    z = torch.randn(1, 8).repeat(10, 1)
    fake = G(z, torch.arange(10), noise_mode="const")
    assert all((fake[0] - fake[k]).abs().max() > 1e-4 for k in range(1, 10))  # the class changes the image


@pytest.mark.slow
def test_stylegan_torchrun_two_processes_write_every_output_once_and_resume(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    flags = ["--data-dir", tiny_mnist, "--out", out, "--device", "cpu", *STYLE_TINY]
    result = torchrun(["stylegan.py", *flags, "--epochs", 1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("epoch 1: ") == 1  # only rank 0 reports
    result = torchrun(["stylegan.py", *flags, "--epochs", 2, "--resume"])  # replicas checked equal every epoch
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epochs 2..2" in result.stdout
    assert_run_outputs(out, 2, stylegan.METRICS)
    assert run_script(stylegan, ["--out", out, "--generate", 4]) == 0
