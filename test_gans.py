"""Tests for the GAN scripts, data.py and fid.py: offline, CPU only, tiny data made here.

    python -m pytest test_gans.py            # everything (about a minute on 2 cores)
    python -m pytest test_gans.py -m "not slow"
"""
import copy
import csv
import functools
import gzip
import hashlib
import http.server
import math
import os
import re
import subprocess
import sys
import threading
import time
import types
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import bench
import cgan
import data
import dcgan
import fid
import gan
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
def test_fid_flag_prints_the_fid_and_caches_the_real_statistics(tmp_path, monkeypatch, capsys):
    data_dir = make_tiny_mnist(tmp_path / "data", n=16)
    # A random-weights Inception where torch.hub keeps pytorch-fid's file, so nothing is downloaded.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    os.makedirs(fid.default_cache_dir())
    torch.save(fid.FIDInception().state_dict(), os.path.join(fid.default_cache_dir(), os.path.basename(fid.WEIGHTS_URL)))
    with pytest.warns(UserWarning, match="singular"):  # 8 and 16 images: the warning users get for too few
        assert run(cgan, tmp_path, data_dir, "--epochs", "1", "--fid", "8") == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("FID: ")][0]
    assert float(line.split()[1]) > 0
    cached = np.load(os.path.join(data_dir, "mnist", "fid_stats_28px_16.npz"))
    assert cached["mu"].shape == (2048,) and cached["sigma"].shape == (2048, 2048)


def test_fid_flag_without_weights_offline_exits_2_saying_where_to_put_them(tmp_path, tiny_data_dir, monkeypatch,
                                                                            capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fid, "WEIGHTS_URL", "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    assert run(gan, tmp_path, tiny_data_dir, "--epochs", "1", "--fid", "8") == 2
    one_line_error(capsys, "--fid", fid.default_cache_dir())


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
    import fid

    scored = []

    def fake_statistics(images, **kwargs):
        scored.append(images)
        return np.zeros(3), np.eye(3)

    monkeypatch.setattr(fid, "load_inception", lambda **kwargs: None)
    monkeypatch.setattr(fid, "compute_statistics", fake_statistics)
    monkeypatch.setattr(fid, "cached_statistics", lambda cache_file, images_fn, **kwargs: (np.ones(3), np.eye(3)))
    argv = ["--data-dir", tiny_mnist, "--out", tmp_path / "run", "--epochs", 1, "--conditional", "--fid", 30, *TINY]
    assert run_script(script, argv) == 0
    assert "FID: 3 (" in capsys.readouterr().out  # |mu1 - mu2|^2 = 3, equal covariances
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
    assert bench.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Machine: ") and "torch " in out and " threads" in out
    for name in ("gan", "cgan", "dcgan", "wgan_gp"):
        for figure in ("img/s, ours vs DataLoader + PIL", "img/s, real loop vs fixed batch",
                       "peak memory of training, MiB (process / above import)"):
            assert f"| {name}: {figure} |" in out
        assert f"\n| {name} | " in out  # its line in the where-the-time-goes table
    assert "frechet_distance vs scipy sqrtm" in out and "relative difference of the two values" in out
    assert "Inception features: img/s" in out


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
    assert args.lr == 1e-4 and wgan_gp.parse_args([]).lr == 2e-4


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


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
@pytest.mark.parametrize("bad", [["--epochs", "ten"], ["--loss", "wasserstein"], ["--lipschitz", "both"],
                                 ["--no-such-flag"]])
def test_argparse_errors_are_one_line_too(script, bad, capsys):
    assert exit_code(script, bad) == 2
    one_line_error(capsys, f"{script.__name__}.py: error:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only case")
@pytest.mark.parametrize("script", [*TRAINING_SCRIPTS, bench])
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
print("ok", rank)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_averaging_halves_of_a_batch_get_the_whole_batch_gradient(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(GRADIENT_WORKER)
    result = torchrun([worker])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok 0" in result.stdout and "ok 1" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_torchrun_two_processes_write_every_output_once_and_resume(script, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    flags = ["--data-dir", tiny_mnist, "--out", out, "--device", "cpu", *tiny_flags(script)]
    result = torchrun([f"{script.__name__}.py", *flags, "--epochs", 1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("epoch 1: ") == 1  # only rank 0 reports
    result = torchrun([f"{script.__name__}.py", *flags, "--epochs", 2, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epochs 2..2" in result.stdout
    metric_names = [] if script is wgan_gp else script.metric_names("non-saturating")
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
