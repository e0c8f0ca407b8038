"""The tests: python -m pytest test_gans.py (offline, CPU only). First what every training script promises
(CONTRACT.md), run once per script on a tiny dataset; then gan.py's own variant; then each script's own."""
import contextlib
import csv
import gzip
import inspect
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

import acgan
import began
import biggan
import cgan
import data
import dcgan
import fid
import gan
import infogan
import lapgan
import stylegan
import wgan_gp

# The test models are tiny: a second thread buys nothing, and on a busy machine two threads wait on each other.
torch.set_num_threads(1)

SCRIPTS = ["gan", "cgan", "dcgan", "wgan_gp", "infogan", "acgan", "began", "lapgan", "biggan", "stylegan"]


def write_idx(path, array):
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def bar_images(labels, size=28, num_classes=4, seed=0):
    """Class k is a bright vertical bar at a position set by k, on a dark noisy background: easy to read off."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 30, size=(len(labels), size, size)).astype(np.uint8)
    for image, label in zip(images, labels):
        left = 2 + label * (size - 4) // num_classes
        image[:, left:left + 3] = 230
    return images


def make_tiny_mnist(root, n=64, num_classes=4):
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


def run(module, tmp_path, data_dir, *flags, out="run"):
    """module.main with a batch of 16 and no progress lines; pass the script's own size flags (TINY) where it has
    them. Returns the exit status."""
    return module.main(["--data-dir", data_dir, "--out", str(tmp_path / out), "--batch-size", "16",
                        "--log-every", "1000", *map(str, flags)])


# ----------------------------------------------------------------------------------------------------------------
# What every training script promises, each promise one test run on every script

MODULES = {name: sys.modules[name] for name in SCRIPTS}
# Each script's smallest model: one epoch of the 64 tiny images takes well under a second.
TINY = {
    "gan": ["--latent-dim", 8],
    "cgan": ["--latent-dim", 8],
    "dcgan": ["--latent-dim", 8, "--width", 4],
    "wgan_gp": ["--latent-dim", 8, "--width", 4],
    "infogan": ["--latent-dim", 8, "--width", 4],
    "acgan": ["--latent-dim", 8, "--width", 4],
    "began": ["--latent-dim", 8, "--width", 4],
    "lapgan": ["--latent-dim", 8, "--width", 4],
    "biggan": ["--latent-dim", 8, "--width", 4, "--shared-dim", 4, "--attention", 0],
    "stylegan": ["--latent-dim", 8, "--width", 4, "--w-dim", 8, "--mapping-layers", 1],
}
# The flags that make a model conditional (--label K with --generate; infogan's labels are its categorical code).
CONDITIONAL = {"cgan": [], "acgan": [], "biggan": [], "infogan": [],
               "dcgan": ["--conditional"], "wgan_gp": ["--conditional"], "lapgan": ["--conditional"]}
# What metrics.csv measures D by on training, held-out and fake images: its accuracy, or where D has no real/fake
# threshold, the critic's mean score (wgan_gp) or the autoencoder's reconstruction loss (began).
D_MEASURE = {"wgan_gp": "critic_", "began": "d_recon_"}
PRESET_SCRIPTS = [name for name in SCRIPTS if hasattr(MODULES[name], "PRESETS")]
CHECKPOINT_KEYS = {"script", "epoch", "args", "history", "image_shape", "classes", "generator", "generator_average",
                   "discriminator", "opt_g", "opt_d", "rng"}
TIMING = {"seconds", "img_per_s"}  # the metrics that differ between two runs of the same computation


def tiny_run(name, out, data_dir, *flags):
    """One tiny run of a script into OUT; returns the exit status."""
    return MODULES[name].main(["--data-dir", str(data_dir), "--out", str(out), "--batch-size", "16",
                               "--log-every", "1000", *map(str, TINY[name] + list(flags))])


def exit_code(name, *argv):
    """main()'s exit status, also where argparse exits by itself (an unknown flag, a choice, a non-number)."""
    try:
        return MODULES[name].main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def one_line_error(capsys, *names):
    """stderr holds exactly one line, no traceback, naming each of names."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    return err


def load(path):
    return torch.load(path, weights_only=True)


def read_metrics(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def assert_same(a, b, where=""):
    """Tensors, and dicts/lists of them, equal to the bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return make_tiny_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist):
    """name -> a folder holding two runs of the script: full/ (two epochs straight) and part/ (one epoch, then
    --resume to two). Shared by the tests that read a finished run."""
    done = {}

    def get(name):
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            assert tiny_run(name, root / "full", mnist, "--epochs", 2) == 0
            assert tiny_run(name, root / "part", mnist, "--epochs", 1) == 0
            assert tiny_run(name, root / "part", mnist, "--epochs", 2, "--resume") == 0
            done[name] = root
        return done[name]
    return get


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """name -> OUT of one epoch on an RGB folder with one sub-folder per class, conditional where it can be."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for k, colour in enumerate(["red", "green", "blue"]):
        (root / "images" / colour).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
            pixels[..., k] += 190
            Image.fromarray(pixels).save(root / "images" / colour / f"{i}.png")
    done = {}

    def get(name):
        if name not in done:
            out = root / name
            assert tiny_run(name, out, root, "--dataset", root / "images", "--image-size", 32, "--epochs", 1,
                         *CONDITIONAL.get(name, [])) == 0
            done[name] = out
        return done[name]
    return get


def copy_run(source, out):
    """A new OUT holding only source's checkpoint: the tests that resume or break it leave the shared runs alone."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "checkpoint.pt", out / "checkpoint.pt")
    return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_run_writes_every_contract_output(name, trained):
    out = trained(name) / "full"
    for path in ["samples/epoch_001.png", "samples/epoch_002.png", "progress.gif", "metrics.csv", "losses.png"]:
        assert (out / path).is_file(), path
    assert Image.open(out / "progress.gif").format == "GIF"
    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"epoch", "d_loss", "g_loss", "seconds", "img_per_s", "augment_p"} <= rows[0].keys()
    measure = [column for column in rows[0] if D_MEASURE.get(name, "acc") in column]
    assert len(measure) >= 3  # D on training, held-out and fake images
    assert all(row[column] != "" for row in rows for column in measure)  # MNIST has a held-out split
    checkpoint = load(out / "checkpoint.pt")
    assert CHECKPOINT_KEYS <= checkpoint.keys()
    assert checkpoint["script"] == f"{name}.py" and checkpoint["epoch"] == 2
    assert [{k: str(v) for k, v in row.items()} for row in checkpoint["history"]] == rows
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # every file was renamed into place


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_gives_exactly_the_uninterrupted_run(name, trained):
    full, part = (load(trained(name) / run / "checkpoint.pt") for run in ("full", "part"))
    for key in full.keys() - {"args", "history"}:  # weights, optimizers, average, RNG, ADA's p: every bit
        assert_same(full[key], part[key], key)
    without_timing = [[{k: v for k, v in row.items() if k not in TIMING} for row in checkpoint["history"]]
                      for checkpoint in (full, part)]
    assert without_timing[0] == without_timing[1]
    grids = [np.asarray(Image.open(trained(name) / run / "samples" / "epoch_002.png")) for run in ("full", "part")]
    assert np.array_equal(*grids)  # the grid's fixed noise, drawn again after --resume


@pytest.mark.parametrize("name", SCRIPTS)
def test_same_seed_gives_the_same_run(name, trained):
    """full/ and part/ are two runs of the same first epoch: the same grid to the pixel, the same metrics."""
    grids = [np.asarray(Image.open(trained(name) / run / "samples" / "epoch_001.png")) for run in ("full", "part")]
    assert np.array_equal(*grids)
    full, part = ({k: v for k, v in read_metrics(trained(name) / run)[0].items() if k not in TIMING}
                  for run in ("full", "part"))
    assert full == part


@pytest.mark.parametrize("name", SCRIPTS)
def test_generate_writes_samples_npz_and_png(name, trained, tmp_path):
    out = copy_run(trained(name) / "full", tmp_path / "run")
    assert exit_code(name, "--out", out, "--generate", 12) == 0
    samples = np.load(out / "samples.npz")
    channels, height, width = load(out / "checkpoint.pt")["image_shape"]
    assert samples["images"].dtype == np.uint8 and samples["images"].shape == (12, height, width, channels)
    if CONDITIONAL.get(name) == []:  # without --label, the classes (infogan: the codes) in turn: all 10 of MNIST's
        assert samples["labels"].dtype == np.int64 and samples["labels"].shape == (12,)
        assert sorted(set(samples["labels"].tolist())) == list(range(10))
    assert Image.open(out / "samples.png").format == "PNG"


@pytest.mark.parametrize("name", list(CONDITIONAL))
def test_label_k_generates_only_class_k(name, folder_run, tmp_path):
    out = copy_run(folder_run(name), tmp_path / "run")
    assert exit_code(name, "--out", out, "--generate", 6, "--label", 2) == 0
    assert np.load(out / "samples.npz")["labels"].tolist() == [2] * 6


@pytest.mark.parametrize("name", [name for name in SCRIPTS if CONDITIONAL.get(name) != []])
def test_label_on_an_unconditional_model_exits_2(name, trained, tmp_path, capsys):
    out = copy_run(trained(name) / "full", tmp_path / "run")
    assert exit_code(name, "--out", out, "--generate", 4, "--label", 1) == 2
    one_line_error(capsys, "--label")


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_without_flags_continues_with_the_runs_own_settings(name, trained, mnist, tmp_path):
    out = copy_run(trained(name) / "full", tmp_path / "run")
    assert exit_code(name, "--data-dir", mnist, "--out", out, "--log-every", 1000, "--resume", "--epochs", 3) == 0
    checkpoint = load(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 3 and checkpoint["args"]["latent_dim"] == 8


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_flag_contradicting_the_resumed_run_exits_2(name, trained, tmp_path, capsys):
    out = copy_run(trained(name) / "full", tmp_path / "run")
    assert exit_code(name, "--out", out, "--resume", "--epochs", 3, *TINY[name], "--latent-dim", 12) == 2
    one_line_error(capsys, "--latent-dim 12")


@pytest.mark.parametrize("case", ["other-script", "corrupt", "missing"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_or_generate_without_a_checkpoint_of_this_script_exits_2(name, case, trained, tmp_path, capsys):
    out = tmp_path / "run"
    other = "cgan" if name == "gan" else "gan"
    if case == "other-script":
        copy_run(trained(other) / "full", out)
    elif case == "corrupt":
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    for flags in (["--resume", "--epochs", 3], ["--generate", 4]):
        assert exit_code(name, "--out", out, *flags) == 2
        one_line_error(capsys, "checkpoint.pt", *[f"{other}.py"] * (case == "other-script"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_with_the_epochs_already_done_exits_2(name, trained, tmp_path, capsys):
    out = copy_run(trained(name) / "full", tmp_path / "run")
    assert exit_code(name, "--out", out, "--resume", "--epochs", 2) == 2
    one_line_error(capsys, "--epochs 2")


BAD_FLAGS = [["--epochs", 0], ["--epochs", -1], ["--epochs", "ten"], ["--batch-size", 0], ["--lr", 0],
             ["--lr", -1e-4], ["--lr", "nan"], ["--latent-dim", 0], ["--log-every", 0], ["--generate", 0],
             ["--fid", 1], ["--average-decay", 1], ["--average-decay", -0.1], ["--seed", -1], ["--train-images", 0],
             ["--image-size", 0], ["--augment", "sometimes"], ["--device", "tpu"], ["--no-such-flag"],
             ["--label", 1]]  # --label: only with --generate
SCRIPT_BAD_FLAGS = {
    "gan": [["--loss", "wasserstein"]],
    "dcgan": [["--width", 0], ["--loss", "wasserstein"], ["--image-size", 48], ["--lr-g", 0], ["--r1-gamma", -1]],
    "wgan_gp": [["--width", 0], ["--n-critic", 0], ["--gp-weight", -1], ["--clip-value", 0], ["--image-size", 48]],
    "infogan": [["--width", 0], ["--categories", 0], ["--continuous", -1], ["--lambda-cat", -1], ["--lr-g", 0]],
    "acgan": [["--width", 0], ["--class-weight", -1], ["--image-size", 16], ["--class-loss", "both"]],
    "began": [["--width", 0], ["--convs", 0], ["--gamma", 0], ["--lambda-k", -1], ["--image-size", 48]],
    "lapgan": [["--width", 0], ["--image-size", 48]],
    "biggan": [["--width", 0], ["--d-steps", 0], ["--ortho-beta", -1], ["--shared-dim", -1], ["--image-size", 48]],
    "stylegan": [["--width", 0], ["--style-mixing", 1.5], ["--r1-gamma", -1], ["--mbstd-group", 0],
                 ["--image-size", 48]],
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bad_flag_exits_2_with_one_line_before_any_data_is_loaded(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    for bad in BAD_FLAGS + SCRIPT_BAD_FLAGS.get(name, []):
        assert exit_code(name, "--out", tmp_path / "run", *bad) == 2, bad
        one_line_error(capsys, f"{name}.py: error: ", bad[0])
        assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests a machine without a GPU")
@pytest.mark.parametrize("name", SCRIPTS)
def test_device_cuda_without_a_gpu_exits_2(name, capsys):
    assert exit_code(name, "--device", "cuda") == 2
    one_line_error(capsys, "--device cuda")


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_bad_dataset_exits_2_with_one_line_naming_it(name, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text" / "notes").mkdir(parents=True)
    (tmp_path / "text" / "notes" / "notes.txt").write_text("not an image")
    broken = make_tiny_mnist(tmp_path / "broken")
    with open(os.path.join(broken, "mnist", "train-images-idx3-ubyte.gz"), "r+b") as f:
        f.truncate(100)
    for dataset, data_dir, named in [("no-such-dataset", tmp_path, "no-such-dataset"),
                                     (tmp_path / "empty", tmp_path, "empty"),
                                     (tmp_path / "text", tmp_path, "notes.txt"),
                                     ("mnist", broken, "train-images-idx3-ubyte.gz")]:
        assert tiny_run(name, tmp_path / "run", data_dir, "--dataset", dataset, "--image-size", 32) == 2
        one_line_error(capsys, named)


def break_train_step(monkeypatch, name, what):
    """From now on, each train_step of the script returns NaN losses (what="nan"), is interrupted by Ctrl-C or runs
    out of GPU memory."""
    step = MODULES[name].train_step

    def poison(result):
        if isinstance(result, torch.Tensor):
            return result * float("nan") if result.is_floating_point() else result
        if isinstance(result, dict):
            return {key: poison(value) for key, value in result.items()}
        return type(result)(poison(value) for value in result) if isinstance(result, (tuple, list)) else result

    def broken(*args, **kwargs):
        if what == "ctrl-c":
            raise KeyboardInterrupt
        if what == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return poison(step(*args, **kwargs))
    monkeypatch.setattr(MODULES[name], "train_step", broken)


@pytest.mark.parametrize("name", SCRIPTS)
def test_nan_loss_exits_1_and_keeps_the_last_good_checkpoint(name, trained, mnist, tmp_path, capsys, monkeypatch):
    out = copy_run(trained(name) / "full", tmp_path / "run")
    before = (out / "checkpoint.pt").read_bytes()
    break_train_step(monkeypatch, name, "nan")
    assert tiny_run(name, out, mnist, "--resume", "--epochs", 3) == 1
    one_line_error(capsys, "checkpoint.pt")
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("name", SCRIPTS)
def test_ctrl_c_exits_130_with_one_line_and_keeps_the_last_epoch(name, trained, mnist, tmp_path, capsys, monkeypatch):
    out = copy_run(trained(name) / "full", tmp_path / "run")
    before = (out / "checkpoint.pt").read_bytes()
    break_train_step(monkeypatch, name, "ctrl-c")
    assert tiny_run(name, out, mnist, "--resume", "--epochs", 3) == 130
    one_line_error(capsys, "--resume")
    assert (out / "checkpoint.pt").read_bytes() == before  # epoch 2's, whole


@pytest.mark.parametrize("name", SCRIPTS)
def test_out_of_gpu_memory_exits_2_with_one_line(name, trained, mnist, tmp_path, capsys, monkeypatch):
    out = copy_run(trained(name) / "full", tmp_path / "run")
    break_train_step(monkeypatch, name, "oom")
    assert tiny_run(name, out, mnist, "--resume", "--epochs", 3) == 2
    one_line_error(capsys, "out of GPU memory", "--batch-size")


@pytest.mark.parametrize("name", SCRIPTS)
def test_amp_trains_in_bfloat16_on_a_cpu_with_finite_losses(name, mnist, tmp_path, monkeypatch):
    autocast, entered = torch.autocast, set()

    def recording_autocast(*args, **kwargs):
        context = autocast(*args, **kwargs)
        entered.add((context.device, context.fast_dtype, context._enabled))
        return context
    monkeypatch.setattr(torch, "autocast", recording_autocast)
    assert tiny_run(name, tmp_path, mnist, "--epochs", 1, "--amp") == 0
    assert ("cpu", torch.bfloat16, True) in entered
    row = read_metrics(tmp_path)[0]
    assert np.isfinite([float(row["d_loss"]), float(row["g_loss"])]).all()


@pytest.mark.parametrize("kind", ["diffaug", "ada"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_augment_runs_and_train_images_limits_the_data(name, kind, mnist, tmp_path, monkeypatch):
    seen = []
    batches = data.Batches
    monkeypatch.setattr(data, "Batches", lambda dataset, *a, **k: seen.append(len(dataset.images)) or
                        batches(dataset, *a, **k))
    assert tiny_run(name, tmp_path, mnist, "--epochs", 1, "--augment", kind, "--train-images", 48) == 0
    assert seen and set(seen) == {48}
    p = float(read_metrics(tmp_path)[0]["augment_p"])
    assert p == 1.0 if kind == "diffaug" else 0 <= p <= 1
    assert "augment" in load(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("name", PRESET_SCRIPTS)
def test_preset_paper_parses_and_the_flags_given_win(name):
    parse_args, preset = MODULES[name].parse_args, MODULES[name].PRESETS["paper"]
    cpu, paper = vars(parse_args([])), vars(parse_args(["--preset", "paper"]))
    assert {key: paper[key] for key in preset} == preset
    key = sorted(key for key in preset if cpu[key] not in (None, preset[key]))[0]
    flag, value = f"--{key.replace('_', '-')}", cpu[key]
    given = parse_args(["--preset", "paper", flag, str(value)] if not isinstance(value, bool) else
                       ["--preset", "paper", *[flag] * value, *[f"--no-{key.replace('_', '-')}"] * (not value)])
    assert getattr(given, key) == value


@pytest.mark.parametrize("name", SCRIPTS)
def test_an_rgb_folder_with_class_subfolders_trains_with_empty_held_out_cells(name, folder_run, trained):
    out = folder_run(name)
    checkpoint = load(out / "checkpoint.pt")
    assert checkpoint["image_shape"] == [3, 32, 32] and checkpoint["classes"] == ["blue", "green", "red"]
    row = read_metrics(out)[0]
    empty = [column for column in row if D_MEASURE.get(name, "acc") in column and row[column] == ""]
    assert empty and all(read_metrics(trained(name) / "full")[0][column] != "" for column in empty)


@pytest.mark.parametrize("name", [name for name in CONDITIONAL if name not in ("infogan", "lapgan")])
def test_a_conditional_models_grid_has_a_row_per_class(name, folder_run):
    """(infogan's rows are its code's values, lapgan's each class at each pyramid level: their own tests)"""
    grid = Image.open(folder_run(name) / "samples" / "epoch_001.png")
    assert grid.height == 2 + 3 * (32 + 2)  # three classes of 32x32 images, 2 pixels apart


@pytest.mark.parametrize("name", SCRIPTS)
def test_fid_prints_fid_reports_line(name, mnist, tmp_path, capsys, monkeypatch):
    """fid.report itself (Inception's features) is fid.py's to test: here only what the script hands it."""
    calls, signature = [], inspect.signature(fid.report)

    def report(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)  # a call that fits the real function
        return "FID: 12.3  KID: 0.01 (fid.report's line)"
    monkeypatch.setattr(fid, "report", report)
    assert tiny_run(name, tmp_path, mnist, "--epochs", 1, "--fid", 10) == 0
    assert "FID: 12.3  KID: 0.01 (fid.report's line)" in capsys.readouterr().out.splitlines()
    (call,) = calls
    fake, real = call["fake"], call["real"]
    shape = tuple(load(tmp_path / "checkpoint.pt")["image_shape"])
    assert fake.dtype == torch.uint8 and fake.shape == (10, *shape)
    assert real.dtype == torch.uint8 and real.shape == (64, *shape)


@pytest.mark.parametrize("name", SCRIPTS)
def test_fid_that_cannot_run_exits_2_with_one_line(name, trained, mnist, tmp_path, capsys, monkeypatch):
    def report(*args, **kwargs):
        raise fid.FIDError("no Inception weights: put pt_inception-2015-12-05.pth in the torch hub cache")
    monkeypatch.setattr(fid, "report", report)
    out = copy_run(trained(name) / "full", tmp_path / "run")
    assert tiny_run(name, out, mnist, "--resume", "--epochs", 3, "--fid", 10) == 2
    one_line_error(capsys, "--fid", "no Inception weights")


# Processes a test stops (SIGTERM, kill -9) or holds (the lock on OUT): forked from a server that has imported torch
# and the scripts once, so that each costs a fork, not the two seconds of `import torch`.

def child_main(name, argv, err_path):
    torch.set_num_threads(1)
    sys.stdout, sys.stderr = open(os.devnull, "w"), open(err_path, "w", buffering=1)
    sys.exit(MODULES[name].main([str(a) for a in argv]))


@pytest.fixture(scope="module")
def forkserver():
    with pytest.MonkeyPatch.context() as patch:  # the server starts at the first child, finding this file's folder
        patch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                   os.environ.get("PYTHONPATH", "")]))
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "torch._dynamo", *SCRIPTS, __name__])  # Adam imports torch._dynamo
        yield context


def start_child(forkserver, name, data_dir, out, epochs=1000):
    """A run of many epochs in another process, returned once its first checkpoint is on disk."""
    argv = ["--data-dir", data_dir, "--out", out, "--batch-size", 16, "--log-every", 1000, *TINY[name],
            "--epochs", epochs]
    child = forkserver.Process(target=child_main, args=(name, argv, out.parent / "child.err"))
    child.start()
    deadline = time.time() + 60
    while not (out / "checkpoint.pt").exists() and child.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    assert (out / "checkpoint.pt").exists(), (out.parent / "child.err").read_text()
    return child


@pytest.fixture(scope="module")
def stopped(forkserver, mnist, tmp_path_factory):
    """name -> (OUT, status and stderr of a second run started into OUT while a run of many epochs in another
    process writes there, that other process's exit code and stderr after a SIGTERM)."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "run"
            child = start_child(forkserver, name, mnist, out)
            try:
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    second = tiny_run(name, out, mnist, "--epochs", 1)
            finally:
                os.kill(child.pid, signal.SIGTERM)
                child.join(30)
            done[name] = out, second, err.getvalue(), child.exitcode, (out.parent / "child.err").read_text()
        return done[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_a_second_run_into_the_same_out_exits_2_with_one_line(name, stopped):
    _, status, err, _, _ = stopped(name)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "another run" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_sigterm_exits_143_with_one_line_and_the_last_finished_epoch_resumes(name, stopped, mnist):
    out, _, _, exit_status, err = stopped(name)
    assert exit_status == 143 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    epoch = load(out / "checkpoint.pt")["epoch"]
    assert tiny_run(name, out, mnist, "--resume", "--epochs", epoch + 1) == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_kill_9_mid_run_leaves_a_resumable_checkpoint(name, forkserver, mnist, tmp_path):
    child = start_child(forkserver, name, mnist, tmp_path / "run")
    time.sleep(random.uniform(0, 0.2))  # somewhere in a later epoch: training, or writing its files
    child.kill()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    epoch = load(tmp_path / "run" / "checkpoint.pt")["epoch"]
    assert tiny_run(name, tmp_path / "run", mnist, "--resume", "--epochs", epoch + 1) == 0


# torchrun: one launch of two gloo processes runs every script in turn (a launch costs seconds; a tiny run does not)

TORCHRUN_WORKER = """
import contextlib, datetime, io, json, os, sys, traceback
import torch, torch.distributed as dist
import data
torch.set_num_threads(1)
rank, names, data_dir, root = int(os.environ["RANK"]), sys.argv[1].split(","), sys.argv[2], sys.argv[3]
# Each main() joins its own rendezvous (its own key prefix in torchrun's store), as it would in a launch of its own:
# the default group cannot be set up twice under the same keys. A hung collective fails in 60 s.
store, groups = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False), [0]
init_process_group = dist.init_process_group

def fresh_group(backend, **kwargs):
    groups[0] += 1
    init_process_group(backend, store=dist.PrefixStore(f"group{groups[0]}/", store), rank=rank,
                       world_size=int(os.environ["WORLD_SIZE"]), timeout=datetime.timedelta(seconds=60))
dist.init_process_group = fresh_group
writes = []
if rank > 0:  # record what rank 1 would write
    for what in ("write_atomic", "prepare_out"):
        original = getattr(data, what)
        setattr(data, what, lambda *a, _original=original, _what=what, **k: writes.append(_what) or _original(*a, **k))

def call(module, *argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = module.main([str(a) for a in argv])
        except BaseException as e:
            status = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    return {"status": status, "out": stdout.getvalue(), "err": stderr.getvalue()}

def gradients_average(module):
    fresh_group("gloo")
    try:
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
        whole = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))  # the whole batch
        model(x.tensor_split(2)[rank]).square().mean().backward()  # this process's half
        module.average_gradients(model)
        return all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), whole))
    finally:
        dist.destroy_process_group()

for name in names:
    module = __import__(name)
    tiny = json.loads(os.environ["TINY"])[name]
    common = ["--data-dir", data_dir, "--device", "cpu", "--log-every", 1000, *tiny]
    out = os.path.join(root, name)
    result = {"train": call(module, *common, "--out", out, "--batch-size", 16, "--epochs", 1),
              "resume": call(module, *common, "--out", out, "--batch-size", 16, "--epochs", 2, "--resume"),
              "uneven": call(module, *common, "--out", out + "-uneven", "--batch-size", 15, "--epochs", 1),
              "gradients_average": gradients_average(module), "writes": writes}
    with open(os.path.join(root, f"{name}.rank{rank}.json"), "w") as f:
        json.dump(result, f)
    writes.clear()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory, mnist):
    """Every script under `torchrun --nproc_per_node 2` (gloo, one thread each): train one epoch, --resume a second,
    then an uneven batch; and average_gradients in the same two-process group. -> (the root of the runs' OUTs,
    name -> what rank 0 and rank 1 recorded)."""
    root = tmp_path_factory.mktemp("torchrun")
    (root / "worker.py").write_text(textwrap.dedent(TORCHRUN_WORKER))
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": here,
           "TINY": json.dumps({name: [str(flag) for flag in flags] for name, flags in TINY.items()})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(root / "worker.py"), ",".join(SCRIPTS), mnist, str(root)]
    launch = subprocess.run(command, cwd=here, env=env, capture_output=True, text=True, timeout=180)

    def ranks(name):
        paths = [root / f"{name}.rank{rank}.json" for rank in (0, 1)]
        assert all(path.exists() for path in paths), launch.stderr[-3000:]
        return [json.loads(path.read_text()) for path in paths]
    return root, ranks


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_torchrun_two_processes_train_rank_0_alone_writes_and_resume_continues(name, torchrun):
    root, ranks = torchrun
    rank0, rank1 = ranks(name)
    for step in ("train", "resume"):
        assert rank0[step]["status"] == 0 and rank1[step]["status"] == 0, rank0[step]["err"] + rank1[step]["err"]
        assert rank1[step]["out"] == ""  # only rank 0 prints
    assert rank1["writes"] == []  # and writes
    assert load(root / name / "checkpoint.pt")["epoch"] == 2
    assert [row["epoch"] for row in read_metrics(root / name)] == ["1", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_torchrun_a_batch_that_does_not_split_evenly_exits_2_with_one_line(name, torchrun):
    rank0, rank1 = torchrun[1](name)
    assert rank0["uneven"]["status"] == 2 and rank1["uneven"]["status"] == 2
    err = rank0["uneven"]["err"] + rank1["uneven"]["err"]
    assert len(err.strip().splitlines()) == 1 and "--batch-size 15" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_torchrun_two_processes_average_gradients_to_the_whole_batch_gradient(name, torchrun):
    assert [rank["gradients_average"] for rank in torchrun[1](name)] == [True, True]


# ----------------------------------------------------------------------------------------------------------------
# gan.py: the losses of --loss, and the alternating update

def test_gan_each_loss_value_and_gradient_match_hand_computed():
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
    assert set(gan.LOSSES) == set(cases)
    for name, (d_value, d_real_grad, d_fake_grad, g_value, g_fake_grad) in cases.items():
        d_loss, g_loss, _ = gan.LOSSES[name]
        loss = d_loss(real, fake)
        torch.testing.assert_close(loss, d_value.detach(), msg=name)
        grads = torch.autograd.grad(loss, (real, fake))
        torch.testing.assert_close(grads[0], d_real_grad.detach(), msg=name)
        torch.testing.assert_close(grads[1], d_fake_grad.detach(), msg=name)
        loss = g_loss(fake)
        torch.testing.assert_close(loss, g_value.detach(), msg=name)
        torch.testing.assert_close(torch.autograd.grad(loss, fake)[0], g_fake_grad.detach(), msg=name)


def test_gan_minimax_gradient_saturates_when_d_rejects_the_fake():
    """At logit -10 (D is sure the image is fake) the minimax loss's gradient is -sigmoid(-10) = -4.5e-5, the
    non-saturating one's about -1: the paper's reason to train G on -log D(G(z))."""
    gradient = {}
    for name in ("minimax", "non-saturating"):
        logit = torch.tensor([-10.0], requires_grad=True)
        (gradient[name],) = torch.autograd.grad(gan.LOSSES[name][1](logit), logit)
    assert gradient["minimax"].item() == pytest.approx(-4.54e-5, rel=1e-2)
    assert gradient["non-saturating"].item() == pytest.approx(-1.0, abs=1e-4)


def test_gan_train_step_updates_d_then_g_with_the_fake_detached_for_d_and_d_frozen_for_g():
    torch.manual_seed(0)
    G, D = gan.Generator(8, (1, 6, 6)), gan.Discriminator((1, 6, 6))
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    start = {"G": [p.detach().clone() for p in G.parameters()], "D": [p.detach().clone() for p in D.parameters()]}
    nets, log = {"G": G, "D": D}, []

    def record(name, step):
        def recording_step(*args, **kwargs):  # at each optimizer step: which nets changed, and their gradients
            log.append((name, {n: (any(not torch.equal(p, q) for p, q in zip(net.parameters(), start[n])),
                                   [None if p.grad is None else p.grad.clone() for p in net.parameters()])
                               for n, net in nets.items()}))
            return step(*args, **kwargs)
        return recording_step
    opt_g.step, opt_d.step = record("G", opt_g.step), record("D", opt_d.step)
    result = gan.train_step(G, D, opt_g, opt_d, torch.rand(16, 1, 6, 6) * 2 - 1, 8,
                            torch.amp.GradScaler("cpu", enabled=False))
    assert [name for name, _ in log] == ["D", "G"]
    (_, at_d_step), (_, at_g_step) = log
    # At D's step nothing has changed yet, and G has no gradient: the fake batch was detached.
    assert not at_d_step["G"][0] and not at_d_step["D"][0]
    assert all(g is None for g in at_d_step["G"][1]) and all(g is not None for g in at_d_step["D"][1])
    # At G's step D has taken its step, and G's backward left D's gradients as they were: D was frozen.
    assert not at_g_step["G"][0] and at_g_step["D"][0]
    assert all(g is not None and g.abs().sum() > 0 for g in at_g_step["G"][1])
    assert all(torch.equal(a, b) for a, b in zip(at_d_step["D"][1], at_g_step["D"][1]))
    assert all(p.requires_grad for p in D.parameters())  # and thawed afterwards
    assert result.shape == (4,) and torch.isfinite(result).all()


def test_gan_moving_average_decay_ramps_up_from_the_first_step():
    """decay = min(decay, (1 + step) / (10 + step)): the average follows G closely at first, then slowly."""
    G_average, G = gan.Generator(4, (1, 2, 2), hidden=(3,)), gan.Generator(4, (1, 2, 2), hidden=(3,))
    for step, decay in [(0, 0.1), (10, 11 / 20), (10_000, 0.999)]:
        before = [p.clone() for p in G_average.parameters()]
        with torch.no_grad():
            G.net[1].running_mean.add_(1.0)
        gan.update_average(G_average, G, step, 0.999)
        for average, old, current in zip(G_average.parameters(), before, G.parameters()):
            torch.testing.assert_close(average, decay * old + (1 - decay) * current)
        assert torch.equal(G_average.net[1].running_mean, G.net[1].running_mean)  # buffers are copied
