"""Tests for the GAN scripts, data.py and fid.py: offline, CPU only, tiny data made here.

    python -m pytest test_gans.py            # everything (a few minutes on 2 cores)
    python -m pytest test_gans.py -m "not slow"
"""
import gzip
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import cgan
import data
import gan


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


# ----------------------------------------------------------------------------------------------------------------
# data.py: downloads, against a local HTTP server

@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/'www' on 127.0.0.1; yields (folder, base URL); stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_keeps_a_file_with_the_right_md5(tmp_path, http_server):
    www, url = http_server
    (www / "a.gz").write_bytes(b"payload" * 1000)
    md5 = hashlib.md5(b"payload" * 1000).hexdigest()
    path = data.fetch("a.gz", [url], md5, str(tmp_path / "dl"))
    assert open(path, "rb").read() == b"payload" * 1000
    assert os.listdir(tmp_path / "dl") == ["a.gz"]


def test_download_with_the_wrong_md5_is_refused_and_leaves_nothing(tmp_path, http_server):
    www, url = http_server
    (www / "a.gz").write_bytes(b"tampered")
    with pytest.raises(data.DataError, match="could not download a.gz.*MD5"):
        data.fetch("a.gz", [url], "0" * 32, str(tmp_path / "dl"))
    assert os.listdir(tmp_path / "dl") == []


def test_download_falls_through_a_failing_mirror_to_the_next(tmp_path, http_server):
    www, url = http_server
    (www / "good").mkdir()
    (www / "good" / "a.gz").write_bytes(b"right")
    (www / "bad").mkdir()
    (www / "bad" / "a.gz").write_bytes(b"wrong")
    mirrors = ["http://127.0.0.1:9/nothing-listens-here/", url + "missing/", url + "bad/", url + "good/"]
    path = data.fetch("a.gz", mirrors, hashlib.md5(b"right").hexdigest(), str(tmp_path / "dl"))
    assert open(path, "rb").read() == b"right"


def test_named_dataset_is_downloaded_when_found_nowhere(tmp_path, http_server, monkeypatch):
    www, url = http_server
    make_tiny_mnist(www, n=8)
    md5s = {f: hashlib.md5((www / "mnist" / f).read_bytes()).hexdigest() for f in os.listdir(www / "mnist")}
    monkeypatch.setitem(data.DATASETS, "mnist", {**data.DATASETS["mnist"], "mirrors": [url + "mnist/"], "md5": md5s})
    monkeypatch.setattr(data, "SYSTEM_DATASET_DIR", str(tmp_path / "nowhere"))
    dataset = data.load_dataset("mnist", str(tmp_path / "data"))
    assert len(dataset.images) == 8
    assert sorted(os.listdir(tmp_path / "data" / "mnist")) == ["train-images-idx3-ubyte.gz",
                                                              "train-labels-idx1-ubyte.gz"]


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
    assert metrics.shape == (len(module.METRICS),) and torch.isfinite(metrics).all()
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
    real_d_loss = gan.d_loss
    monkeypatch.setattr(gan, "d_loss", lambda r, f: real_d_loss(r, f) * float("nan"))
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
    import fid

    data_dir = make_tiny_mnist(tmp_path / "data", n=16)
    # A random-weights Inception where torch.hub keeps pytorch-fid's file, so nothing is downloaded.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    os.makedirs(fid.default_cache_dir())
    torch.save(fid.FIDInception().state_dict(), os.path.join(fid.default_cache_dir(), os.path.basename(fid.WEIGHTS_URL)))
    assert run(cgan, tmp_path, data_dir, "--epochs", "1", "--fid", "8") == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("FID: ")][0]
    assert float(line.split()[1]) > 0
    cached = np.load(os.path.join(data_dir, "mnist", "fid_stats_28px_16.npz"))
    assert cached["mu"].shape == (2048,) and cached["sigma"].shape == (2048, 2048)


def test_fid_flag_without_weights_offline_exits_2_saying_where_to_put_them(tmp_path, tiny_data_dir, monkeypatch,
                                                                            capsys):
    import fid

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fid, "WEIGHTS_URL", "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    assert run(gan, tmp_path, tiny_data_dir, "--epochs", "1", "--fid", "8") == 2
    one_line_error(capsys, "--fid", fid.default_cache_dir())
