"""The tests: python -m pytest test_gans.py (offline, CPU only). First what every training script promises
(CONTRACT.md), run once per script on a tiny dataset; then gan.py's own variant; then each script's own."""
import contextlib
import copy
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
import r3gan
import stylegan
import wgan_gp

# The test models are tiny: a second thread buys nothing, and on a busy machine two threads wait on each other.
torch.set_num_threads(1)

SCRIPTS = ["gan", "cgan", "dcgan", "wgan_gp", "infogan", "acgan", "began", "lapgan", "biggan", "stylegan", "r3gan"]
from pathlib import Path
import bench
import functools
import hashlib
import http.server
import importlib
import math
import re
import score
import threading
import torch.nn as nn
import torch.nn.functional as F
import zlib


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
    "lapgan": ["--latent-dim", 8, "--width", 4, "--hidden", 16, "--image-size", 32],  # as the folder runs; 28: below
    "biggan": ["--latent-dim", 8, "--width", 4, "--shared-dim", 4, "--attention", 0],
    "stylegan": ["--latent-dim", 8, "--width", 4, "--w-dim", 8, "--mapping-layers", 1],
    "r3gan": ["--latent-dim", 8, "--width", 4, "--max-width", 8, "--group-width", 4],
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


def no_scaler():  # train_step in float32: loss scaling off
    return torch.amp.GradScaler("cpu", enabled=False)


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
    "began": [["--nets", "big"], ["--width", 0], ["--convs", 0], ["--gamma", 0], ["--lambda-k", -1],
              ["--image-size", 48]],
    "lapgan": [["--width", 0], ["--image-size", 48], ["--hidden", 0], ["--kernel", 4], ["--lr-g", 0],
               ["--optimizer", "rmsprop"]],
    "biggan": [["--width", 0], ["--d-steps", 0], ["--ortho-beta", -1], ["--shared-dim", -1], ["--image-size", 48]],
    "stylegan": [["--width", 0], ["--style-mixing", 1.5], ["--r1-gamma", -1], ["--mbstd-group", 0],
                 ["--image-size", 48]],
    "r3gan": [["--width", 0], ["--max-width", 0], ["--group-width", 0], ["--group-width", 3], ["--blocks", 0],
              ["--group-width", 16, "--width", 32, "--max-width", 36], ["--gamma", -1],
              ["--schedule-images", -1], ["--image-size", 48]],
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
    key = sorted(key for key in preset if cpu[key] not in (None, preset[key]))[-1]  # one the preset changes
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


@pytest.mark.slow
def test_two_torchrun_launches_on_loopback_act_as_two_machines(mnist, tmp_path):
    """The scripts' own rendezvous, unpatched: two launches, one process each, joined as --nnodes 2 on 127.0.0.1.
    The launch takes about 8 s; one that hangs is tried once more on a new port (free_port's port can be taken by
    another program before the rendezvous binds it), and a second hang fails the test."""
    here, env = os.path.dirname(os.path.abspath(__file__)), {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in (1, 2):
        port = free_port()
        launches = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "gan.py",
             "--data-dir", mnist, "--out", str(tmp_path / f"run{attempt}"), "--batch-size", "16", "--epochs", "1",
             "--latent-dim", "8", "--device", "cpu"], cwd=here, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True) for node in (0, 1)]
        try:
            outputs = [launch.communicate(timeout=90) for launch in launches]
            break
        except subprocess.TimeoutExpired:
            for launch in launches:
                os.killpg(launch.pid, signal.SIGKILL)  # the launcher and its worker
                launch.communicate()
    else:
        pytest.fail("two torchrun launches on 127.0.0.1 hung twice")
    assert [launch.returncode for launch in launches] == [0, 0], outputs
    assert outputs[1][0] == "" and "epoch 1/1" in outputs[0][0]  # only the first machine's rank 0 prints
    assert load(tmp_path / f"run{attempt}" / "checkpoint.pt")["epoch"] == 1


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
                            no_scaler())
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


# ---- cgan.py ----------------------------------------------------------------------------------------------------------

TINY_CGAN = [str(flag) for flag in TINY["cgan"]]


def test_generator_reads_the_one_hot_label_with_z_and_keeps_the_shapes():
    torch.manual_seed(0)
    G, D = cgan.Generator(8, 10, (3, 8, 8)).eval(), cgan.Discriminator((3, 8, 8), 10)
    fake = G(torch.randn(1, 8).repeat(10, 1), torch.arange(10))
    assert fake.shape == (10, 3, 8, 8) and fake.abs().max() <= 1 and D(fake, torch.arange(10)).shape == (10,)
    assert G.net[0].in_features == 8 + 10  # the one-hot label concatenated to z
    assert all((fake[0] - fake[k]).abs().max() > 1e-3 for k in range(1, 10))


def test_discriminator_is_a_projection_realness_plus_class_vector_dot_features():
    torch.manual_seed(0)
    D = cgan.Discriminator((1, 6, 6), 4, hidden=(8, 5))
    images, labels = torch.randn(3, 1, 6, 6), torch.tensor([0, 2, 3])
    features = D.features(images)
    class_vectors = D.class_projection.weight.t()[labels]  # V's column of each label
    expected = D.realness(features).squeeze(1) + (class_vectors * features).sum(1)
    torch.testing.assert_close(D(images, labels), expected)
    assert not torch.allclose(D(images, labels), D(images, (labels + 1) % 4))


def test_bce_is_binary_cross_entropy_on_logits():
    logits, sig = torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.sigmoid
    torch.testing.assert_close(cgan.bce(logits, 1), -torch.log(sig(logits)).mean())
    torch.testing.assert_close(cgan.bce(logits, 0), -torch.log(1 - sig(logits)).mean())


def record_steps(nets, optimizers):  # at each step: (optimizer, {net: (changed yet?, its gradients)})
    start = {n: [p.detach().clone() for p in net.parameters()] for n, net in nets.items()}
    log = []

    def snapshot():
        return {n: (any(not torch.equal(p, q) for p, q in zip(net.parameters(), start[n])),
                    [None if p.grad is None else p.grad.clone() for p in net.parameters()]) for n, net in nets.items()}
    for name, opt in optimizers.items():
        def step(*args, _step=opt.step, _name=name, **kwargs):
            log.append((_name, snapshot()))
            return _step(*args, **kwargs)
        opt.step = step
    return log


def test_train_step_updates_d_then_g_on_the_real_batchs_labels_with_the_non_saturating_loss():
    torch.manual_seed(0)
    G, D = cgan.Generator(8, 10, (1, 6, 6)), cgan.Discriminator((1, 6, 6), 10)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    log, seen = record_steps({"G": G, "D": D}, {"G": opt_g, "D": opt_d}), []
    G.register_forward_hook(lambda module, inputs, fake: seen.append((inputs[1], fake)))
    real, labels = torch.rand(16, 1, 6, 6) * 2 - 1, torch.arange(16) % 10
    metrics = cgan.train_step(G, D, opt_g, opt_d, real, labels, 8, no_scaler())
    (seen_labels, fake), = seen
    assert [name for name, _ in log] == ["D", "G"] and torch.equal(seen_labels, labels)
    with torch.no_grad():  # G's loss is -log D(G(z)) under the D of G's step (the final D)
        torch.testing.assert_close(metrics[1], -torch.log(torch.sigmoid(D(fake, labels))).mean())
    (_, at_d), (_, at_g) = log
    assert not at_d["G"][0] and not at_d["D"][0] and all(g is None for g in at_d["G"][1])  # fakes detached for D
    assert at_g["D"][0] and not at_g["G"][0] and all(g is not None and g.abs().sum() > 0 for g in at_g["G"][1])
    assert all(torch.equal(a, b) for a, b in zip(at_d["D"][1], at_g["D"][1]))  # G's backward left D's grads alone
    assert metrics.shape == (4,) and torch.isfinite(metrics).all() and 0 <= metrics[2] <= 1 and 0 <= metrics[3] <= 1
    assert all(p.requires_grad for p in D.parameters())


def test_grid_has_one_row_per_class_and_d_accuracy_uses_labels(tmp_path, tiny_data_dir):
    assert run(cgan, tmp_path, tiny_data_dir, "--epochs", "1", *TINY_CGAN) == 0
    out = tmp_path / "run"
    assert Image.open(out / "samples" / "epoch_001.png").size == (2 + 10 * 30, 2 + 10 * 30)  # MNIST: 10 classes
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"d_real", "d_fake", "d_acc_real_train", "d_acc_real_test", "d_acc_fake"} <= set(header)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["script"] == "cgan.py" and len(checkpoint["classes"]) == 10


def test_generate_writes_labels_and_honours_label(tmp_path, tiny_data_dir, capsys):
    assert run(cgan, tmp_path, tiny_data_dir, "--epochs", "1", *TINY_CGAN) == 0
    assert run(cgan, tmp_path, tiny_data_dir, "--generate", "6") == 0
    samples = np.load(tmp_path / "run" / "samples.npz")
    assert samples["images"].shape == (6, 28, 28, 1) and samples["images"].dtype == np.uint8
    assert samples["labels"].dtype == np.int64 and samples["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    assert run(cgan, tmp_path, tiny_data_dir, "--generate", "5", "--label", "3") == 0
    assert np.load(tmp_path / "run" / "samples.npz")["labels"].tolist() == [3] * 5
    capsys.readouterr()
    assert run(cgan, tmp_path, tiny_data_dir, "--generate", "4", "--label", "10") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--label 10" in err and "0..9" in err


def test_generate_draws_the_label_asked_for():
    torch.manual_seed(0)
    G, labels = cgan.Generator(8, 4, (1, 6, 6)), torch.tensor([2, 0, 3])
    with torch.no_grad():
        expected = data.to_uint8(G.eval()(torch.randn(3, 8, generator=torch.Generator().manual_seed(3)), labels))
    assert torch.equal(cgan.generate_images(G, labels, 8, "cpu", seed=3), expected)


@pytest.mark.parametrize("flags", [["--label", "3"], ["--label", "-1", "--generate", "2"], ["--loss", "hinge"]])
def test_label_only_with_generate_and_no_loss_flag(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cgan.main(["--out", str(tmp_path / "run"), *flags])
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("cgan.py: error: ")


# ---- dcgan.py ---------------------------------------------------------------------------------------------------------

TINY_DCGAN = [*map(str, TINY["dcgan"]), "--epochs", "1"]


def models_dcgan(image_size, channels, num_classes=0, width=8):
    return (dcgan.Generator(16, image_size, channels, width, num_classes),
            dcgan.Discriminator(image_size, channels, width, num_classes))


@pytest.mark.parametrize("image_size, channels", [(28, 1), (32, 1), (64, 3)])
def test_nets_follow_the_dcgan_rules_one_stride_2_block_per_doubling(image_size, channels):
    G, D = models_dcgan(image_size, channels)
    fake = G.apply(dcgan.init_weights)(torch.randn(5, 16))
    assert fake.shape == (5, channels, image_size, image_size) and D(fake).shape == (5,)
    convs = [sum(isinstance(m, kind) for m in net.modules()) for net, kind in ((G, nn.ConvTranspose2d), (D, nn.Conv2d))]
    assert convs == {28: [3, 2], 32: [4, 3], 64: [5, 4]}[image_size]
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in D.modules())
    assert isinstance(D.features[1], nn.LeakyReLU) and D.features[1].negative_slope == 0.2  # no BN on D's input
    assert isinstance(G.net[-1], nn.Tanh) and isinstance(G.net[-2], nn.ConvTranspose2d)  # no BN on G's output
    assert any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    assert abs(torch.cat([m.weight.flatten() for m in G.net if isinstance(m, nn.ConvTranspose2d)]).std() - 0.02) < 2e-3


def test_28_px_nets_go_z_7_14_28_and_back_to_7():
    G, D = models_dcgan(28, 1, num_classes=10, width=8)
    shapes, labels = [], torch.arange(4)
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for m in (*G.net, *D.features) if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d))]
    D(G(torch.randn(4, 16), labels), labels)
    assert shapes == [(16, 7, 7), (8, 14, 14), (1, 28, 28), (8, 14, 14), (16, 7, 7)]
    assert D.logit.in_features == D.projection.embedding_dim == 16 * 7 * 7
    assert dcgan.parse_args(["--image-size", "28"]).image_size == 28


def test_conditional_output_depends_on_the_label():
    torch.manual_seed(0)
    G, D = models_dcgan(32, 1, num_classes=10)
    labels = torch.arange(10)
    fake = G.eval()(torch.randn(1, 16).repeat(10, 1), labels)
    assert all((fake[0] - fake[k]).abs().max() > 1e-4 for k in range(1, 10))
    nn.init.normal_(D.projection.weight, std=1.0)
    assert D(fake[:1].repeat(10, 1, 1, 1), labels).unique().numel() == 10


def test_the_loss_table_is_gan_pys():  # whose values test_gans.py checks by hand
    import gan
    real, fake = torch.randn(5), torch.randn(5)
    assert list(dcgan.LOSSES) == list(gan.LOSSES)
    for (d_loss, g_loss, threshold), (d_gan, g_gan, threshold_gan) in zip(dcgan.LOSSES.values(), gan.LOSSES.values()):
        assert d_loss(real, fake) == d_gan(real, fake) and g_loss(fake) == g_gan(fake) and threshold == threshold_gan


def test_r1_penalty_is_the_squared_gradient_norm_through_the_augmentation_at_the_unaugmented_reals():
    weight, real, mask = torch.randn(1, 18), torch.randn(4, 2, 3, 3), (torch.arange(18) % 2).float()
    D = lambda images, labels=None: (images.flatten(1) * weight).sum(1) ** 2  # noqa: E731  grad = 2 (w.x) w
    for augment, kept in ((None, torch.ones(18)), (lambda images: images * mask.view(1, 2, 3, 3), mask)):
        x = real.flatten(1) * kept  # what D sees; the gradient at the reals passes through the mask again
        expected = ((2 * (x * weight).sum(1, keepdim=True) * weight * kept) ** 2).sum(1).mean()
        torch.testing.assert_close(dcgan.r1_penalty(D, real, augment=augment), expected)


def step_dcgan(G, D, real, **options):
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    return dcgan.train_step(G, D, opt_g, opt_d, real, None, 16, no_scaler(), **options)


def test_r1_gamma_adds_half_gamma_times_r1_to_ds_loss(monkeypatch):
    monkeypatch.setattr(dcgan, "r1_penalty", lambda *args: torch.tensor(3.0))
    losses = []
    for gamma in (0.0, 2.0):
        torch.manual_seed(0)
        losses.append(step_dcgan(*models_dcgan(32, 1, width=4), torch.rand(4, 1, 32, 32) * 2 - 1, r1_gamma=gamma)[0].item())
    assert losses[1] == pytest.approx(losses[0] + 2.0 / 2 * 3.0)


def test_d_sees_independently_augmented_reals_and_fakes_in_both_steps():
    torch.manual_seed(0)
    G, D = models_dcgan(32, 1, width=4)
    seen, forward = [], D.forward
    D.forward = lambda images, labels=None: seen.append(images.detach().clone()) or forward(images, labels)
    step_dcgan(G, D, torch.ones(8, 1, 32, 32), augment=data.Augmentation(("cutout",), "cpu"))
    assert len(seen) == 3  # reals and fakes in D's step_dcgan, fakes in G's
    squares = [(images == 0).flatten(1) for images in seen]
    assert all(square.any(1).all() for square in squares)  # every image D saw had its square cut out
    assert not torch.equal(squares[0], squares[1]) and not torch.equal(squares[1], squares[2])  # fresh draws


def test_accuracy_counts_what_d_calls_real_and_fake():
    D = lambda images, labels=None: images.flatten(1).mean(1)  # noqa: E731  "real" = bright
    G = lambda z, labels=None: -torch.ones(len(z), 1, 4, 4)  # noqa: E731  every fake dark: D calls all fake
    D.eval = D.train = G.eval = G.train = lambda: None
    D.parameters = lambda: iter([torch.zeros(1)])
    images = torch.cat([torch.full((6, 1, 4, 4), 255, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)])
    reals = {"d_acc_real_train": data.Dataset(images, torch.zeros(10, dtype=torch.int64)), "d_acc_real_test": None}
    assert dcgan.d_accuracy(D, G, reals, latent_dim=3, num_classes=0, threshold=0.0) == {
        "d_acc_real_train": "0.6000", "d_acc_real_test": "", "d_acc_fake": "1.0000"}


def test_dcgan_paper_preset_builds_the_papers_networks():
    args = dcgan.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.latent_dim, args.batch_size, args.lr, args.lr_g) == (
        64, 128, 100, 128, 2e-4, 2e-4)
    G, D = dcgan.Generator(100, 64, 1, 128), dcgan.Discriminator(64, 1, 128)
    # G: 100*1024*16 + 1024*512*16 + 512*256*16 + 256*128*16 conv weights, 2*(1024+512+256+128) BatchNorm, 128*16+1
    # D: 16*128+128, 128*256*16 + 256*512*16 + 512*1024*16 convs, 2*(256+512+1024) BatchNorm, 1024*16+1 linear
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (12_654_337, 11_032_193)


def test_resume_keeps_the_runs_loss_r1_gamma_and_learning_rates(tiny_data_dir, tmp_path):
    assert run(dcgan, tmp_path, tiny_data_dir, *TINY_DCGAN, "--loss", "hinge", "--r1-gamma", "1", "--lr-g", "1e-3") == 0
    assert run(dcgan, tmp_path, tiny_data_dir, *TINY_DCGAN[:-1], "2", "--resume") == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (checkpoint["args"]["loss"], checkpoint["args"]["r1_gamma"]) == ("hinge", 1)
    assert [checkpoint[k]["param_groups"][0]["lr"] for k in ("opt_g", "opt_d")] == [1e-3, 2e-4]


def test_dcgan_truncation_cuts_z_and_is_the_conditional_runs_default(tiny_data_dir, tmp_path):
    noise = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(dcgan.sample_z(50, 4, math.inf, noise()), torch.randn(50, 4, generator=noise()))  # none: uncut
    z = dcgan.sample_z(20000, 4, 0.5, noise())
    # the normal truncated to [-a, a]: variance 1 - 2a phi(a) / (2 Phi(a) - 1) = 0.2839^2 at a = 0.5
    assert z.abs().max() <= 0.5 and abs(z.mean().item()) < 0.01 and z.std().item() == pytest.approx(0.2839, abs=0.005)
    for flags, out, expected in ((["--conditional"], "cond", 1.75), ([], "plain", math.inf),
                                 (["--conditional", "--truncation", "none"], "uncut", math.inf)):
        assert run(dcgan, tmp_path, tiny_data_dir, *TINY_DCGAN, *flags, out=out) == 0
        assert torch.load(tmp_path / out / "checkpoint.pt", weights_only=True)["args"]["truncation"] == expected
    samples, cut = {}, ["--truncation", "1.75"]
    for out, flags in ("cond", []), ("cond", ["--truncation", "none"]), ("uncut", []), ("cond", cut):
        assert dcgan.main(["--out", str(tmp_path / out), "--generate", "8", *flags]) == 0  # not given: the run's
        samples[" ".join([out, *flags])] = np.load(tmp_path / out / "samples.npz")["images"]
    assert np.array_equal(samples["cond"], samples["cond --truncation 1.75"])
    assert not np.array_equal(samples["cond"], samples["cond --truncation none"])
    assert np.array_equal(samples["uncut"], samples["cond --truncation none"])  # the same weights, uncut z


# ---- wgan_gp.py -------------------------------------------------------------------------------------------------------

TINY_WGAN_GP = [*map(str, TINY["wgan_gp"]), "--epochs", "1"]


def models_wgan_gp(image_size, channels, num_classes=0, width=8):
    return (wgan_gp.Generator(16, image_size, channels, width, num_classes),
            wgan_gp.Critic(image_size, channels, width, num_classes))


@pytest.mark.parametrize("image_size, channels", [(28, 1), (32, 1), (64, 3)])
def test_one_block_per_doubling_and_a_critic_without_batchnorm_or_sigmoid(image_size, channels):
    G, D = models_wgan_gp(image_size, channels)
    fake = G(torch.randn(5, 16))
    assert fake.shape == (5, channels, image_size, image_size) and D(fake).shape == (5,)
    convs = [sum(isinstance(m, kind) for m in net.modules()) for net, kind in ((G, nn.ConvTranspose2d), (D, nn.Conv2d))]
    assert convs == {28: [3, 2], 32: [4, 3], 64: [5, 4]}[image_size]  # 28: 7x7 from z, then 14 and 28
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Sigmoid)) for m in D.modules())
    scores = D(torch.randn(64, channels, image_size, image_size) * 50)
    assert not ((scores >= 0) & (scores <= 1)).all()  # unbounded, not a probability


def test_the_critics_score_depends_on_the_label():
    _, D = models_wgan_gp(32, 1, num_classes=10)
    nn.init.normal_(D.projection.weight, std=1.0)
    assert D(torch.randn(1, 1, 32, 32).repeat(10, 1, 1, 1), torch.arange(10)).unique().numel() == 10


def test_gradient_penalty_matches_hand_computed_values_with_each_samples_own_gradient_norm():
    # A linear critic D(x) = <w, x>: its gradient is w everywhere, so the penalty is (||w|| - 1)^2.
    w = (torch.arange(18, dtype=torch.float32).view(1, 2, 3, 3) / 10).requires_grad_(True)
    penalty = wgan_gp.gradient_penalty(lambda x, labels=None: (x * w).flatten(1).sum(1),
                                       torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3))
    norm = (w.detach() ** 2).sum().sqrt()
    assert penalty.item() == pytest.approx(((norm - 1) ** 2).item(), rel=1e-5)
    penalty.backward()  # create_graph: differentiable in the critic's weights, with the analytic gradient
    torch.testing.assert_close(w.grad, 2 * (norm - 1) * w.detach() / norm)
    # D(x) = 0.5 ||x||^2 has gradient x; with real == fake the point between is x whatever alpha is.
    x = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 0.5, 1.0, 3.0)])  # norms 0, 1, 2, 6
    penalty = wgan_gp.gradient_penalty(lambda images, labels=None: 0.5 * (images ** 2).flatten(1).sum(1), x, x.clone())
    assert penalty.item() == pytest.approx((1 + 0 + 1 + 25) / 4)


def test_train_step_makes_a_critic_update_per_batch_then_one_generator_update():
    G, D = models_wgan_gp(32, 1)
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    order = []
    for name, optimizer in (("g", opt_g), ("d", opt_d)):
        optimizer.step = (lambda step, name: lambda *a, **k: order.append(name) or step(*a, **k))(optimizer.step, name)
    group = [(torch.rand(4, 1, 32, 32) * 2 - 1, None) for _ in range(5)]
    metrics = wgan_gp.train_step(G, D, opt_g, opt_d, group, 16, no_scaler())
    assert order == ["d"] * 5 + ["g"]
    assert metrics.shape == (4,) and torch.isfinite(metrics).all() and metrics[3] > 0  # d, g, wasserstein, penalty


def test_step_groups_puts_n_batches_in_each_generator_step():
    assert list(wgan_gp.step_groups(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(wgan_gp.step_groups(range(2), 5)) == [[0, 1]]


def test_run_groups_n_critic_batches_per_generator_step(tiny_data_dir, tmp_path, monkeypatch):
    sizes, train_step = [], wgan_gp.train_step
    monkeypatch.setattr(wgan_gp, "train_step", lambda G, D, o_g, o_d, group, *rest: sizes.append(len(group))
                        or train_step(G, D, o_g, o_d, group, *rest))
    assert run(wgan_gp, tmp_path, tiny_data_dir, *TINY_WGAN_GP, "--batch-size", "8", "--n-critic", "3") == 0  # 8 batches
    assert sizes == [3, 3, 2]


def test_metrics_hold_the_wasserstein_estimate_and_the_critics_scores(tiny_data_dir, tmp_path):
    assert run(wgan_gp, tmp_path, tiny_data_dir, *TINY_WGAN_GP) == 0
    row = next(csv.DictReader((tmp_path / "run" / "metrics.csv").read_text().splitlines()))
    columns = ("wasserstein", "gradient_penalty", "critic_real_train", "critic_real_test", "critic_fake")
    assert np.isfinite([float(row[column]) for column in columns]).all() and float(row["gradient_penalty"]) > 0


def test_critic_scores_are_the_mean_scores_on_reals_and_fakes():
    D = lambda images, labels=None: images.flatten(1).mean(1)  # noqa: E731
    G = lambda z, labels=None: -torch.ones(len(z), 1, 4, 4)  # noqa: E731
    D.eval = D.train = G.eval = G.train = lambda: None
    D.parameters = lambda: iter([torch.zeros(1)])
    images = torch.cat([torch.full((6, 1, 4, 4), 255, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)])
    reals = {"critic_real_train": data.Dataset(images, torch.zeros(10, dtype=torch.int64)), "critic_real_test": None}
    assert wgan_gp.critic_scores(D, G, reals, latent_dim=3, num_classes=0) == {
        "critic_real_train": "0.2000", "critic_real_test": "", "critic_fake": "-1.0000"}  # (6 - 4) / 10


def test_clip_run_uses_rmsprop_at_wgans_rate_and_keeps_weights_within_c(tiny_data_dir, tmp_path):
    assert (wgan_gp.parse_args([]).lr, wgan_gp.parse_args(["--clip-value", "0.01", "--lr", "1e-4"]).lr) == (5e-4, 1e-4)
    assert run(wgan_gp, tmp_path, tiny_data_dir, *TINY_WGAN_GP, "--clip-value", "0.02") == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["args"]["lr"] == 5e-5 and "square_avg" in checkpoint["opt_d"]["state"][0]  # RMSprop's
    assert all(w.abs().max() <= 0.02 for w in checkpoint["discriminator"].values() if w.is_floating_point())


def test_wgan_gp_paper_preset_builds_the_papers_networks():
    args = wgan_gp.parse_args(["--preset", "paper"])
    assert (args.image_size, args.width, args.latent_dim, args.batch_size, args.lr, args.n_critic, args.gp_weight) == (
        32, 128, 128, 64, 1e-4, 5, 10.0)
    G, D = wgan_gp.Generator(128, 32, 1, 128), wgan_gp.Critic(32, 1, 128)
    # G: 128*512*16 + 512*256*16 + 256*128*16 conv weights, 2*(512+256+128) BatchNorm, 128*16+1 output conv
    # critic: 16*128+128, 128*256*16+256, 256*512*16+512 convs with biases, 2*(256+512) layer norm, 512*16+1 linear
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (3_673_857, 2_634_113)


# ---- infogan.py -------------------------------------------------------------------------------------------------------

TINY_INFOGAN = [str(flag) for flag in TINY["infogan"]]


def models_infogan(image_size=28, channels=1, width=4, categories=10, continuous=2, latent_dim=8):
    G = infogan.Generator(latent_dim, categories, continuous, image_size, channels, width).apply(infogan.init_weights)
    D = infogan.Discriminator(categories, continuous, image_size, channels, width).apply(infogan.init_weights)
    return G, D


@pytest.mark.parametrize("image_size,channels", [(28, 1), (32, 3), (64, 1)])
def test_shapes_follow_image_size_channels_and_codes(image_size, channels):
    G, D = models_infogan(image_size, channels, categories=7, continuous=3)
    z, code_cat, code_cont = infogan.sample_latent(5, G, "cpu")
    assert code_cat.dtype == torch.int64 and code_cat.max() < 7 and code_cont.shape == (5, 3)
    assert code_cont.abs().max() <= 1
    fake = G(z, code_cat, code_cont)
    assert fake.shape == (5, channels, image_size, image_size) and fake.abs().max() <= 1
    logits, (code_logits, code_means) = D(fake, recognise=True)
    assert code_logits.shape == (5, 7) and code_means.shape == (5, 3)
    convs = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in [*G.modules(), *D.modules()])
    assert convs == (6 if image_size == 64 else 4)  # one stride-2 stage per doubling beyond 32


def test_preset_paper_is_the_papers_mnist_architecture():
    args = infogan.parse_args(["--preset", "paper", "--lr-g", "5e-4"])  # flags given win
    assert (args.batch_size, args.lr, args.lr_g, args.lambda_cont) == (128, 2e-4, 5e-4, 0.1)
    G, D = models_infogan(28, 1, args.width, args.categories, args.continuous, args.latent_dim)
    layers = lambda net, kind: [m for m in net.modules() if isinstance(m, kind)]  # noqa: E731
    assert [(m.in_features, m.out_features) for m in layers(G, nn.Linear)] == [(62 + 10 + 2, 1024), (1024, 128 * 49)]
    assert [(m.in_channels, m.out_channels) for m in layers(G, nn.ConvTranspose2d)] == [(128, 64), (64, 1)]
    assert [(m.in_channels, m.out_channels) for m in layers(D, nn.Conv2d)] == [(1, 64), (64, 128)]
    assert [(m.in_features, m.out_features) for m in layers(D, nn.Linear)] == [(128 * 49, 1024), (1024, 1),
                                                                              (1024, 128), (128, 10 + 2)]


def test_information_terms_match_hand_computed_values_and_gradients():
    logits, codes = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]), torch.tensor([0, 2])
    expected_cat = (-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))) + math.log(3)) / 2
    # A unit-variance Gaussian's -log density per continuous code, summed over the codes: 0.5 (log 2 pi + (c - mean)^2)
    means = torch.tensor([[0.5, -1.0], [0.0, 0.2]], requires_grad=True)
    values, log_2pi = torch.tensor([[1.0, -1.0], [-1.0, 0.8]]), math.log(2 * math.pi)
    expected_cont = (0.5 * (log_2pi + 0.25) + 0.5 * log_2pi + 0.5 * (log_2pi + 1.0) + 0.5 * (log_2pi + 0.36)) / 2
    total, cat, cont = infogan.information_loss((logits, means), codes, values, lambda_cat=1.0, lambda_cont=0.1)
    assert cat.item() == pytest.approx(expected_cat, rel=1e-6) and cont.item() == pytest.approx(expected_cont, rel=1e-6)
    assert total.item() == pytest.approx(expected_cat + 0.1 * expected_cont, rel=1e-6)
    (grad,) = torch.autograd.grad(cont, means)  # (mean - c) / batch: a plain squared error's
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.0], [1.0, -0.6]]) / 2)


def test_information_term_reaches_g_q_and_the_shared_body_but_not_the_real_fake_head():
    torch.manual_seed(0)
    G, D = models_infogan()
    z, code_cat, code_cont = infogan.sample_latent(16, G, "cpu")
    info, _, _ = infogan.information_loss(D(G(z, code_cat, code_cont), recognise=True)[1], code_cat, code_cont, 1, 0.1)
    for name, net in (("G", G), ("Q", D.q), ("body", D.body), ("logit", D.logit)):
        grads = torch.autograd.grad(info, list(net.parameters()), retain_graph=True, allow_unused=True)
        assert all(g is None for g in grads) if name == "logit" else all(g.abs().sum() > 0 for g in grads), name


def test_train_step_reads_codes_from_fakes_only_and_updates_d_then_g():
    torch.manual_seed(0)
    G, D = models_infogan()
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    real, calls, order, forward = torch.rand(16, 1, 28, 28) * 2 - 1, [], [], D.forward
    D.forward = lambda images, recognise=False: calls.append((images is real, recognise)) or forward(images, recognise)
    for name, opt in (("D", opt_d), ("G", opt_g)):  # G's gradients when each optimizer steps
        opt.register_step_pre_hook(lambda *_, name=name: order.append((name, [p.grad for p in G.parameters()])))
    metrics = infogan.train_step(G, D, opt_g, opt_d, real, no_scaler())
    assert calls == [(True, False), (False, True), (False, True)]  # reals: the logit only; fakes: logit and Q
    assert [name for name, _ in order] == ["D", "G"] and all(g is None for g in order[0][1])  # D's: fakes detached
    assert metrics.shape == (7,) and torch.isfinite(metrics).all() and 0 <= metrics[6] <= 1  # code_acc: a share


def test_grid_has_one_code_value_a_row_and_a_sweep_moves_one_continuous_code_along_it():
    G, _ = models_infogan(continuous=3)
    z, code_cat, code_cont = infogan.grid_latents(G, 10, seed=0, device="cpu")
    assert code_cat.tolist() == [k for k in range(10) for _ in range(10)]
    assert torch.equal(z[:10], z[10:20]) and torch.equal(code_cont[:10], code_cont[90:])  # a column: one style
    z, code_cat, code_cont = infogan.grid_latents(G, 5, seed=0, device="cpu", sweep=1)
    assert len(z) == 50 and (z == z[0]).all() and code_cat.tolist() == [k for k in range(10) for _ in range(5)]
    torch.testing.assert_close(code_cont[:, 1], torch.linspace(-2, 2, 5).repeat(10))
    assert (code_cont[:, [0, 2]] == 0).all()


def test_run_never_reads_labels_draws_code_grids_logs_q_and_generates_codes(tmp_path, tiny_data_dir, capsys):
    relabelled = tmp_path / "relabelled"
    shutil.copytree(tiny_data_dir, relabelled)
    for split in ("train", "t10k"):
        write_idx(relabelled / "mnist" / f"{split}-labels-idx1-ubyte.gz", (7 * np.arange(64) + 3) % 10)
    weights = []
    for data_dir, out in ((tiny_data_dir, "run"), (str(relabelled), "b")):
        assert run(infogan, tmp_path, data_dir, "--epochs", "1", *TINY_INFOGAN, "--categories", "3", "--lr-g", "2e-3",
                   out=out) == 0
        checkpoint = torch.load(tmp_path / out / "checkpoint.pt", weights_only=True)
        weights.append([*checkpoint["generator"].values(), *checkpoint["discriminator"].values()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    out = tmp_path / "run"
    assert Image.open(out / "samples" / "epoch_001.png").size == (2 + 10 * 30, 2 + 3 * 30)  # a row per code value
    assert Image.open(out / "continuous_2.png").size == (2 + 10 * 30, 2 + 3 * 30)  # rows: code values, columns: -2..2
    assert not (out / "continuous_3.png").exists()
    assert {"info_cat", "info_cont", "code_acc"} <= set((out / "metrics.csv").read_text().splitlines()[0].split(","))
    assert [group["lr"] for group in checkpoint["opt_d"]["param_groups"]] == [2e-4, 2e-3]  # D's body and head; Q
    assert run(infogan, tmp_path, tiny_data_dir, "--generate", "5") == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (5, 28, 28, 1) and samples["labels"].tolist() == [0, 1, 2, 0, 1]
    assert run(infogan, tmp_path, tiny_data_dir, "--generate", "3", "--label", "2") == 0
    assert np.load(out / "samples.npz")["labels"].tolist() == [2, 2, 2]
    capsys.readouterr()
    assert run(infogan, tmp_path, tiny_data_dir, "--generate", "3", "--label", "3") == 2
    assert "0..2" in capsys.readouterr().err


def test_too_few_images_a_step_for_batchnorm_exits_2(tmp_path, capsys):
    (tmp_path / "one").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "one" / "only.png")
    assert infogan.main(["--dataset", str(tmp_path / "one"), "--out", str(tmp_path / "run"), *TINY_INFOGAN]) == 2
    assert "BatchNorm" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--image-size", "30"], ["--image-size", "48"], ["--continuous", "-1"],
                                   ["--lambda-cont", "nan"], ["--label", "3"]])
def test_bad_flags_exit_2_with_one_line(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        infogan.main(flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("infogan.py: error: ") and err.count("\n") == 1


# ---- acgan.py ---------------------------------------------------------------------------------------------------------

TINY_ACGAN = [str(flag) for flag in TINY["acgan"]]


def models_acgan(image_size=32, channels=1, num_classes=10, width=4, twin=True):
    return (acgan.Generator(16, image_size, channels, width, num_classes),
            acgan.Discriminator(image_size, channels, width, num_classes, twin=twin))


@pytest.mark.parametrize("image_size,channels", [(32, 1), (64, 3)])
def test_d_has_a_source_head_and_class_heads_on_one_body(image_size, channels):
    G, D = models_acgan(image_size, channels, num_classes=7)
    fake = G(torch.randn(5, 16), torch.arange(5))
    assert fake.shape == (5, channels, image_size, image_size) and fake.abs().max() <= 1
    source, classes, twin = D(fake)
    assert source.shape == (5,) and classes.shape == twin.shape == (5, 7)
    body = {id(p) for p in D.features.parameters()}
    heads = {id(p) for head in (D.source, D.classes, D.twin) for p in head.parameters()}
    assert body | heads == {id(p) for p in D.parameters()} and not body & heads
    _, paper_d = models_acgan(image_size, channels, num_classes=7, twin=False)  # --class-loss paper: no twin head
    assert paper_d(fake)[2] is None
    assert sum(p.numel() for p in D.parameters()) - sum(p.numel() for p in paper_d.parameters()) == 7 * (
        D.twin.in_features + 1)


def test_generator_output_depends_on_the_label_and_d_never_sees_it():
    torch.manual_seed(0)
    G, D = models_acgan()
    fake = G.eval()(torch.randn(1, 16).repeat(10, 1), torch.arange(10))
    assert all((fake[0] - fake[k]).abs().max() > 1e-4 for k in range(1, 10))
    with pytest.raises(TypeError):
        D(fake, torch.arange(10))


def test_losses_are_the_papers_log_likelihoods_and_tac_subtracts_the_twins():
    real, fake = torch.tensor([2.0, -1.0], requires_grad=True), torch.tensor([0.5, -3.0], requires_grad=True)
    real_classes = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]], requires_grad=True)
    fake_classes = torch.tensor([[0.0, 0.0, 0.0], [4.0, -2.0, 1.0]], requires_grad=True)
    twin_classes = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    labels, sig = torch.tensor([0, 2]), torch.sigmoid

    def nll(logits):  # -log softmax(z)_y written out, batch mean
        return (torch.log(torch.exp(logits).sum(1)) - logits[torch.arange(2), labels]).mean()

    # by hand: -log softmax([0, 0, 0])[0] = log 3; -log softmax([4, -2, 1])[2] = log(e^4 + e^-2 + e) - 1 = 3.0509
    assert nll(fake_classes).item() == pytest.approx((np.log(3) + 3.0509) / 2, abs=1e-4)
    source_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    source_g = -torch.log(sig(fake)).mean()  # non-saturating
    inputs = (real, fake, real_classes, fake_classes, twin_classes)
    for got, expected in [
        (acgan.d_loss(real, fake, real_classes, fake_classes, labels), source_d + nll(real_classes) + nll(fake_classes)),
        (acgan.d_loss(real, fake, real_classes, twin_classes, labels, class_weight=0.25),
         source_d + 0.25 * (nll(real_classes) + nll(twin_classes))),
        (acgan.g_loss(fake, fake_classes, labels), source_g + nll(fake_classes)),
        (acgan.g_loss(fake, fake_classes, labels, 0.25, twin_classes),
         source_g + 0.25 * (nll(fake_classes) - nll(twin_classes)))]:
        torch.testing.assert_close(got, expected)
        for g, e in zip(*(torch.autograd.grad(x, inputs, retain_graph=True, materialize_grads=True)
                          for x in (got, expected))):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("twin", [True, False])
def test_train_step_updates_d_then_g_each_touching_only_its_own_weights(twin):
    torch.manual_seed(0)
    G, D = models_acgan(twin=twin)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    seen = []
    for name, opt in (("G", opt_g), ("D", opt_d)):
        opt.register_step_pre_hook(lambda opt, *_, name=name: seen.append(
            (name, [p.grad is None for p in G.parameters()], [p.grad.clone() for p in D.parameters()])))
    metrics = acgan.train_step(G, D, opt_g, opt_d, torch.rand(8, 1, 32, 32) * 2 - 1, torch.arange(8), 16, no_scaler())
    (d_name, g_grads_at_d, d_grads), (g_name, _, d_grads_at_g) = seen
    assert (d_name, g_name) == ("D", "G")
    assert all(g_grads_at_d)  # the fakes were detached for D's update
    assert all(g.abs().sum() > 0 for g in d_grads)  # every head of D learns in its update
    assert all(torch.equal(a, b) for a, b in zip(d_grads, d_grads_at_g))  # G's backward leaves D's gradients
    assert metrics.shape == (7 if twin else 6,) and torch.isfinite(metrics).all()
    assert all(p.requires_grad for p in D.parameters())


def test_twin_head_not_the_class_head_learns_the_class_of_fakes(monkeypatch):
    torch.manual_seed(0)
    G, D = models_acgan()
    with torch.no_grad():  # the twin says "class k has logit k" whatever the image: recognisable below
        D.twin.weight.zero_(), D.twin.bias.copy_(torch.arange(10.0))
    seen, d_loss, g_loss = {}, acgan.d_loss, acgan.g_loss
    monkeypatch.setattr(acgan, "d_loss", lambda *a: (seen.update(d_fake=a[3].detach()), d_loss(*a))[1])
    monkeypatch.setattr(acgan, "g_loss", lambda *a: (seen.update(g_class=a[1].detach(), g_twin=a[4].detach()),
                                                     g_loss(*a))[1])
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.0), torch.optim.SGD(D.parameters(), lr=0.0)
    acgan.train_step(G, D, opt_g, opt_d, torch.rand(8, 1, 32, 32) * 2 - 1, torch.arange(8), 16, no_scaler())
    assert torch.equal(seen["d_fake"], torch.arange(10.0).expand(8, 10))  # D: the twin names the fakes
    assert torch.equal(seen["g_twin"], torch.arange(10.0).expand(8, 10)) and not torch.equal(seen["g_class"],
                                                                                              seen["g_twin"])


def test_mode_seeking_term_is_one_over_the_image_distance_per_z_distance():
    fake = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 3.0], [4.0, 2.0]]).view(4, 1, 1, 2)  # pair gaps 1, 3, 0, 2: 1.5
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, -0.5], [2.0, 3.0]])  # pair gaps 0.5, 0.5, 1, 2: 1.0
    assert acgan.mode_seeking_loss(fake, z).item() == pytest.approx(1 / 1.5, rel=1e-4)


def test_mode_seeking_draws_the_fakes_in_pairs_of_one_class(monkeypatch):
    G, D = models_acgan()
    asked, forward = [], G.forward
    monkeypatch.setattr(G, "forward", lambda z, labels: (asked.append(labels.clone()), forward(z, labels))[1])
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.0), torch.optim.SGD(D.parameters(), lr=0.0)
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    acgan.train_step(G, D, opt_g, opt_d, real, torch.arange(8), 16, no_scaler())
    acgan.train_step(G, D, opt_g, opt_d, real, torch.arange(8), 16, no_scaler(), mode_seeking=1.0)
    assert asked[0].tolist() == list(range(8)) and asked[1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_accuracy_columns_count_both_heads_on_training_held_out_and_fake_images():
    class BrightD(nn.Module):  # source logit = brightness; class 0 for bright images, 1 for dark ones
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, images):
            b = images.flatten(1).mean(1)
            return b, torch.stack([b, -b], dim=1), None

    class DarkG(nn.Module):
        def forward(self, z, labels):
            return -torch.ones(len(z), 1, 4, 4)

    images = torch.cat([torch.full((6, 1, 4, 4), 255, dtype=torch.uint8), torch.zeros(4, 1, 4, 4, dtype=torch.uint8)])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])  # right: 3 bright + 2 dark of 10
    torch.manual_seed(0)
    accuracy = acgan.d_accuracy(BrightD(), DarkG(), {"train": (images, labels), "test": None}, 3, num_classes=2)
    assert 0.45 < float(accuracy.pop("d_class_acc_fake")) < 0.55  # right where G was asked for class 1
    assert accuracy == {"d_acc_real_train": "0.6000", "d_acc_real_test": "", "d_acc_fake": "1.0000",
                        "d_class_acc_train": "0.5000", "d_class_acc_test": ""}


def test_paper_preset_is_the_papers_cifar_generator_with_the_papers_loss():
    args = acgan.parse_args(["--preset", "paper"])
    assert (args.image_size, args.latent_dim, args.width, args.batch_size, args.lr, args.class_loss) == (
        32, 100, 96, 100, 2e-4, "paper")
    G = acgan.Generator(args.latent_dim, 32, 3, args.width, 10)
    D = acgan.Discriminator(32, 3, args.width, 10, twin=False)
    # G: convT 116->384 712,704 + 384->192 1,179,648 + 192->96 294,912 + 96->3 4,611, BatchNorms 1,344, embedding 160
    assert [m.out_channels for m in G.net if isinstance(m, nn.ConvTranspose2d)] == [384, 192, 96, 3]
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (2_193_379, 1_548_011)


def test_run_logs_both_heads_draws_a_row_per_class_and_generates_a_label(tiny_data_dir, tmp_path, capsys):
    assert run(acgan, tmp_path, tiny_data_dir, *TINY_ACGAN, "--epochs", "1") == 0
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    for column in ("d_acc_real_train", "d_acc_real_test", "d_acc_fake", "d_class_acc_train", "d_class_acc_test",
                   "d_class_acc_fake"):
        assert 0 <= float(row[column]) <= 1, column
    assert {"class_loss_real", "class_loss_fake", "twin_loss_fake"} <= set(row)
    assert Image.open(tmp_path / "run" / "samples" / "epoch_001.png").size == (2 + 10 * 30, 2 + 10 * 30)  # a row a class
    assert acgan.main(["--out", str(tmp_path / "run"), "--generate", "12"]) == 0
    assert list(np.load(tmp_path / "run" / "samples.npz")["labels"]) == [*range(10), 0, 1]
    assert acgan.main(["--out", str(tmp_path / "run"), "--generate", "3", "--label", "2"]) == 0
    assert list(np.load(tmp_path / "run" / "samples.npz")["labels"]) == [2, 2, 2]
    capsys.readouterr()
    assert acgan.main(["--out", str(tmp_path / "run"), "--generate", "3", "--label", "10"]) == 2
    assert capsys.readouterr().err.strip() == "acgan.py: error: --label 10: the model knows classes 0..9"


def test_a_folder_of_loose_images_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "loose").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / "loose" / f"{i}.png")
    assert run(acgan, tmp_path, str(tmp_path), "--dataset", str(tmp_path / "loose"), *TINY_ACGAN) == 2
    assert "single class" in capsys.readouterr().err


# ---- began.py ---------------------------------------------------------------------------------------------------------

TINY_BEGAN = [str(flag) for flag in TINY["began"]]


def models_began(image_size=32, channels=1, width=4, latent_dim=8, convs=1):
    return (began.Generator(latent_dim, image_size, channels, width, convs),
            began.Discriminator(image_size, channels, width, latent_dim, convs))


def test_reconstruction_loss_is_the_mean_absolute_error_an_image():
    images = torch.tensor([[[[0.5, -1.0], [0.0, 1.0]]], [[[0.2, 0.2], [0.2, 0.2]]]])
    halving = lambda x: x / 2  # noqa: E731  a "D" reconstructing half its input: L = mean |x| / 2
    torch.testing.assert_close(began.reconstruction_loss(halving, images), torch.tensor([2.5 / 8, 0.1]))


@pytest.mark.parametrize("image_size,channels,side", [(28, 1, 7), (32, 1, 8), (64, 3, 8)])
def test_d_is_an_autoencoder_and_g_has_its_decoders_shape(image_size, channels, side):
    G, D = models_began(image_size, channels, convs=2)
    assert G.decoder.fc.out_features == 4 * side * side  # starts from 8x8 (the paper's), or 7x7 at 28x28
    fake = G(began.sample_z(5, 8, "cpu"))
    assert fake.shape == (5, channels, image_size, image_size) and fake.abs().max() <= 1
    assert D(fake).shape == fake.shape  # D reconstructs, it does not classify
    assert [p.shape for p in G.decoder.parameters()] == [p.shape for p in D.decoder.parameters()]
    modules = [*G.modules(), *D.modules()]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ConvTranspose2d, nn.ReLU, nn.LeakyReLU)) for m in modules)
    assert all(m.mode == "nearest" for m in modules if isinstance(m, nn.Upsample))
    z = began.sample_z(1000, 8, "cpu")
    assert z.min() >= -1 and z.max() <= 1 and z.abs().mean() > 0.4  # uniform on [-1, 1], not normal


def test_train_step_updates_d_then_g_then_k_by_the_papers_control():
    torch.manual_seed(0)
    G, D = models_began()
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    order = []
    for name, opt in (("G", opt_g), ("D", opt_d)):
        opt.register_step_pre_hook(lambda *_, name=name: order.append(name))
    G0 = [p.clone() for p in G.parameters()]
    k, scaler = torch.tensor(0.3), no_scaler()
    metrics = began.train_step(G, D, opt_g, opt_d, torch.rand(6, 1, 32, 32) * 2 - 1, k, 8, 0.5, 0.01, scaler)
    assert order == ["D", "G"] and metrics.shape == (5,) and torch.isfinite(metrics).all()
    d_value, g_value, l_real, l_fake, m_global = metrics.tolist()
    assert d_value == pytest.approx(l_real - 0.3 * l_fake, rel=1e-5)  # L(x) - k_t L(G(z))
    assert m_global == pytest.approx(l_real + abs(0.5 * l_real - l_fake), rel=1e-5)
    assert k.item() == pytest.approx(min(max(0.3 + 0.01 * (0.5 * l_real - l_fake), 0), 1), rel=1e-5)  # in place
    assert all(not torch.equal(p, q) for p, q in zip(G.parameters(), G0))
    assert all(p.requires_grad for p in D.parameters())
    for gamma, clipped in ((1e3, 1.0), (0.0, 0.0)):  # k_t stays in [0, 1]
        began.train_step(G, D, opt_g, opt_d, torch.rand(6, 1, 32, 32) * 2 - 1, k, 8, gamma, 10.0, scaler)
        assert k.item() == clipped


def test_reconstruction_columns_measure_d_on_train_held_out_and_fakes():
    D = lambda images: torch.zeros_like(images)  # noqa: E731  reconstructs all as grey: L = mean |x|
    G = lambda z: -torch.ones(len(z), 1, 4, 4)  # noqa: E731  black fakes: L = 1
    D.eval = D.train = G.eval = G.train = lambda: None
    D.parameters = lambda: iter([torch.zeros(1)])
    white = torch.full((6, 1, 4, 4), 255, dtype=torch.uint8)
    losses = began.d_reconstruction(D, G, {"d_recon_real_train": white, "d_recon_real_test": None}, latent_dim=3)
    assert losses == {"d_recon_real_train": "1.00000", "d_recon_real_test": "", "d_recon_fake": "1.00000"}


def test_paper_preset_builds_the_papers_64px_networks():
    args = began.parse_args(["--preset", "paper"])
    assert (args.image_size, args.nets, args.width, args.convs, args.latent_dim, args.batch_size, args.lr, args.gamma,
            args.lambda_k) == (64, "paper", 64, 2, 64, 16, 1e-4, 0.5, 0.001)
    G, D = models_began(64, 3, args.width, args.latent_dim, args.convs)
    # decoder: fc 64 -> 64*8*8 (266,240) + 8 convs 64->64 (8 x 36,928) + output conv 64->3 (1,731) = 563,395;
    # encoder: conv 3->64 (1,792) + two convs at 64, 128, 192, 256 channels (73,856 + 295,168 + 663,936 + 1,180,160)
    # + stride-2 64->128, 128->192, 192->256 (73,856 + 221,376 + 442,624) + fc 256*8*8 -> 64 (1,048,640)
    assert sum(p.numel() for p in G.parameters()) == 563_395
    assert sum(p.numel() for p in D.parameters()) == 4_001_408 + 563_395


def test_default_nets_are_lucic_et_al_s_infogan_g_and_a_one_conv_autoencoder_d():
    args = began.parse_args([])
    assert (args.nets, args.width, args.lr) == ("infogan", 64, 2e-4)
    G, D = began.build(args.nets, 64, 28, 1, args.width, args.convs)
    # G: fc 64 -> 1024, BN, fc -> 128 * 7 * 7, BN, 4x4 stride-2 deconvs to 64 channels (BN) and to the image
    g_count = 64 * 1024 + 2 * 1024 + 1024 * 6272 + 2 * 6272 + 128 * 64 * 16 + 2 * 64 + 64 * 16 + 1
    # D: 4x4 stride-2 conv to 64 x 14 x 14, fc to 32 numbers and back, a 4x4 stride-2 deconv to the image
    d_count = 16 * 64 + 64 + 12544 * 32 + 32 + 32 * 12544 + 12544 + 64 * 16 + 1
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (g_count, d_count)
    fake = G(began.sample_z(5, 64, "cpu"))
    assert fake.shape == (5, 1, 28, 28) and fake.abs().max() <= 1 and D(fake).shape == fake.shape
    assert any(isinstance(m, nn.BatchNorm2d) for m in G.modules())  # G normalises its batch; D judges each image
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in D.modules())


def test_the_averaged_g_takes_the_batchnorm_statistics():
    G, G_average = began.SmallGenerator(8, 28, 1, 4), began.SmallGenerator(8, 28, 1, 4)
    G(began.sample_z(6, 8, "cpu"))  # one training-mode forward moves the running statistics
    began.update_average(G_average, G, step=0, decay=0.999)
    assert all(torch.equal(a, b) for a, b in zip(G_average.buffers(), G.buffers()))


def test_run_logs_k_t_and_m_global_halves_lr_when_m_stalls_and_resumes_exactly(tiny_data_dir, tmp_path, capsys):
    fast_k = [*TINY_BEGAN, "--lambda-k", "0.5", "--gamma", "1"]
    assert run(began, tmp_path, tiny_data_dir, *fast_k, "--epochs", "3", out="straight") == 0
    assert run(began, tmp_path, tiny_data_dir, *fast_k, "--epochs", "2", out="split") == 0
    assert run(began, tmp_path, tiny_data_dir, *TINY_BEGAN, "--epochs", "3", "--resume", out="split") == 0
    checkpoints, rows = [], []
    for out in ("straight", "split"):
        checkpoints.append(torch.load(tmp_path / out / "checkpoint.pt", weights_only=True))
        with open(tmp_path / out / "metrics.csv", newline="") as f:
            rows.append([{k: v for k, v in row.items() if k not in ("seconds", "img_per_s")}
                         for row in csv.DictReader(f)])
    assert rows[0] == rows[1] and checkpoints[0]["k"] == checkpoints[1]["k"] > 0
    assert float(rows[0][-1]["k_t"]) == pytest.approx(checkpoints[0]["k"], abs=1e-5)
    m = [float(row["m_global"]) for row in rows[0]]
    lr = 2e-4
    for before, after in zip(m, m[1:]):  # an epoch whose M_global is not below the last one's halves both rates
        lr = max(lr / 2, 2e-5) if after >= before else lr
    for checkpoint in checkpoints:
        rates = [group["lr"] for key in ("opt_g", "opt_d") for group in checkpoint[key]["param_groups"]]
        assert rates == pytest.approx([lr] * 2)
    for column in ("m_global", "l_real", "l_fake", "d_recon_real_train", "d_recon_real_test", "d_recon_fake"):
        assert float(rows[0][-1][column]) > 0, column
    assert "M_global" in capsys.readouterr().out and (tmp_path / "straight" / "losses.png").stat().st_size > 0


# ---- lapgan.py --------------------------------------------------------------------------------------------------------

TINY_LAPGAN = ["--latent-dim", "8", "--width", "4", "--hidden", "16", "--epochs", "1"]  # the default sizes: 28, 64


def tiny_models(image_size=28, channels=1, num_classes=0):
    torch.manual_seed(0)
    G = lapgan.Generator(8, image_size, channels, 4, 16, 3, num_classes).apply(lapgan.init_weights)
    D = lapgan.Discriminator(image_size, channels, 4, num_classes)
    return G, D


def test_pyramid_sizes_halve_while_even_down_to_7_or_8():
    assert [lapgan.pyramid_sizes(size) for size in (28, 32, 64)] == [[7, 14, 28], [8, 16, 32], [8, 16, 32, 64]]


@pytest.mark.parametrize("image_size, channels", [(28, 1), (28, 3), (32, 1), (64, 3)])
def test_pyramid_adding_the_residuals_back_gives_the_image_exactly(image_size, channels):
    images = torch.randint(0, 256, (5, channels, image_size, image_size), dtype=torch.uint8)
    sizes = lapgan.pyramid_sizes(image_size)
    bands, lows = lapgan.laplacian_pyramid(data.to_float(images), len(sizes))
    assert [band.shape[-1] for band in bands] == sizes and [low.shape[-1] for low in lows] == sizes[1:]
    assert bands[0].abs().max() <= 1 and all(low.abs().max() <= 1 for low in lows)  # the blur keeps the range
    image = bands[0]
    for residual in bands[1:]:
        image = lapgan.upsample(image) + residual
    assert torch.equal(data.to_uint8(image), images)
    bands, _ = lapgan.laplacian_pyramid(torch.full((2, 1, image_size, image_size), 0.25), len(sizes))
    torch.testing.assert_close(bands[0], torch.full((2, 1, sizes[0], sizes[0]), 0.25))  # a constant: no residuals
    assert all(residual.abs().max() < 1e-6 for residual in bands[1:])  # also at the edges of the odd 7x7 level


@pytest.mark.parametrize("image_size, channels, sizes", [(28, 1, (7, 14, 28)), (64, 3, (8, 16, 32, 64))])
def test_one_generator_and_discriminator_per_level_each_finer_g_drawing_a_residual(image_size, channels, sizes):
    G, D = tiny_models(image_size, channels)
    assert len(G.refiners) == len(D.refiners) == len(sizes) - 1  # the coarsest from z, then one a finer level
    z, planes = lapgan.cascade_noise(5, 8, image_size, torch.Generator().manual_seed(0), "cpu")
    levels = G.eval().sample(z, None, planes)
    assert [image.shape for image in levels] == [(5, channels, size, size) for size in sizes]
    for k, refine in enumerate(G.refiners):  # each level: the upsampled coarser one plus its G's residual
        low = lapgan.upsample(levels[k])
        torch.testing.assert_close(levels[k + 1], (low + refine(low, planes[k])).clamp(-1, 1))
    bands, lows = lapgan.laplacian_pyramid(levels[-1], len(sizes))
    assert [logits.shape for logits in D(lapgan.level_images(bands, lows), None)] == [(5,)] * len(sizes)


def test_finer_generators_have_no_strided_or_transposed_convolutions_and_a_linear_output():
    G, _ = tiny_models()
    convs = [m for m in G.refiners.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert convs and all(type(m) is nn.Conv2d and m.stride == (1, 1) for m in convs)
    assert all(type(refine.net[-1]) is nn.Conv2d for refine in G.refiners)  # a residual is signed: no tanh


def test_only_the_coarsest_level_reads_the_class():
    G, D = tiny_models(num_classes=10)
    assert not any(isinstance(m, nn.Embedding) for m in [*G.refiners.modules(), *D.refiners.modules()])
    coarse = G.eval().coarse(torch.randn(1, 8).repeat(10, 1), torch.arange(10))
    assert all((coarse[0] - coarse[k]).abs().max() > 1e-4 for k in range(1, 10))


def test_levels_train_independently_on_the_real_pyramid_and_report_sums_then_each_level():
    # a broken coarsest G (NaN) spoils only its own level: the finer ones train on the real pyramid, not on its output
    G, D = tiny_models()
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    before = {name: p.detach().clone() for name, p in [*G.named_parameters(), *D.named_parameters()]}
    with torch.no_grad():
        G.coarse.net[-3].bias.fill_(float("nan"))
    scaler = no_scaler()
    metrics = lapgan.train_step(G, D, opt_g, opt_d, torch.rand(8, 1, 28, 28) * 2 - 1, None, 8, scaler)
    assert metrics.shape == (2 + 4 * 3,)  # d_loss, g_loss, then d_loss, g_loss, d_real, d_fake at 7, 14, 28
    for model in (G, D):
        assert not all(torch.isfinite(p).all() for p in model.coarse.parameters())
        assert all(torch.isfinite(p).all() for p in model.refiners.parameters())
        assert any(not torch.equal(p, before[f"refiners.{name}"]) for name, p in model.refiners.named_parameters())
    assert torch.isfinite(metrics[6:]).all() and not torch.isfinite(metrics[2:6]).all()
    assert ((metrics[[8, 9, 12, 13]] >= 0) & (metrics[[8, 9, 12, 13]] <= 1)).all()  # D(x) at 14 and 28: probabilities


def test_paper_preset_builds_the_authors_nets_on_denton_et_als_28px_pyramid():
    args = lapgan.parse_args(["--preset", "paper"])
    assert (args.hidden, args.latent_dim, args.width, args.kernel, args.optimizer, args.lr, args.lr_g,
            args.batch_size) == (1200, 100, 128, 7, "sgd", 0.01, 0.01, 64)
    G = lapgan.Generator(args.latent_dim, 28, 1, args.width, args.hidden, args.kernel)
    D = lapgan.Discriminator(28, 1, args.width)
    assert [m.kernel_size[0] for m in G.refiners[1].modules() if isinstance(m, nn.Conv2d)] == [7, 7, 5]
    # G: MLP 100 -> 1200 -> 1200 -> 49 with BatchNorm; twice 2*128*49 + 128*128*49 + 128*25+1 convs, 2*2*128 BatchNorm
    # D at 7 px: 9*256+256, 256*512*16 convs, 2*512 BatchNorm, 512*3*3+1 linear; at 14 and 28 px: 16*128+128,
    # 128*256*16 convs, 2*256 BatchNorm, then 256*3*3+1 and 256*7*7+1 linears
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (3_264_195, 3_174_147)
    opt_g, opt_d = torch.optim.SGD(G.parameters(), args.lr), torch.optim.SGD(D.parameters(), args.lr)
    metrics = lapgan.train_step(G, D, opt_g, opt_d, torch.rand(4, 1, 28, 28) * 2 - 1, None, 100, no_scaler())
    assert torch.isfinite(metrics).all()  # one step at the paper's size


def test_sgd_momentum_rises_by_the_authors_schedule_and_resume_keeps_it(tiny_data_dir, tmp_path):
    assert run(lapgan, tmp_path, tiny_data_dir, "--preset", "paper", *TINY_LAPGAN, "--kernel", 3, "--lr", 0.05) == 0
    assert run(lapgan, tmp_path, tiny_data_dir, *TINY_LAPGAN[:-1], "3", "--resume") == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (checkpoint["args"]["optimizer"], checkpoint["args"]["kernel"], checkpoint["args"]["lr"]) == ("sgd", 3, 0.05)
    assert [group["momentum"] for key in ("opt_g", "opt_d") for group in checkpoint[key]["param_groups"]] == \
        pytest.approx([0.0016, 0.0016])  # epoch 3: from 0, 0.0008 an epoch


def test_the_averaged_g_gets_batchnorm_statistics_of_its_own_samples_and_keeps_its_weights():
    G = tiny_models()[0]
    weights = {name: p.clone() for name, p in G.named_parameters()}
    lapgan.recompute_batchnorm(G, 8, 28, 0, "cpu", seed=3, n=500)  # two chunks of 250 cascades
    noise, hidden = torch.Generator().manual_seed(3), []
    for _ in range(2):  # the same draws: z and the planes, then the (unused) classes
        z, _ = lapgan.cascade_noise(250, 8, 28, noise, "cpu")
        torch.randint(1, (250,), generator=noise)
        hidden.append(G.coarse.net[0](z).detach())  # what the first BatchNorm normalises
    norm = G.coarse.net[1]
    torch.testing.assert_close(norm.running_mean, torch.cat(hidden).mean(0))  # the mean over all 500, not a moving one
    torch.testing.assert_close(norm.running_var, torch.stack([h.var(0) for h in hidden]).mean(0))
    assert not G.training and all(torch.equal(p, weights[name]) for name, p in G.named_parameters())


def test_each_d_judges_its_levels_image_the_upsampled_coarser_image_plus_the_residual():
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    bands, lows = lapgan.laplacian_pyramid(images, 3)
    levels = lapgan.level_images(bands, lows)
    assert [level.shape[-1] for level in levels] == [7, 14, 28] and torch.equal(levels[0], bands[0])
    torch.testing.assert_close(levels[2], images)  # the finest level's image is the image
    torch.testing.assert_close(levels[1], lapgan.binomial_blur(images)[..., ::2, ::2])  # a finer one: the low-pass


def test_run_writes_each_levels_losses_and_d_accuracy_and_a_grid_row_per_level(tiny_data_dir, tmp_path):
    assert run(lapgan, tmp_path, tiny_data_dir, *TINY_LAPGAN) == 0
    out = tmp_path / "run"
    with open(out / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["d_loss"]) == pytest.approx(sum(float(row[f"d_loss_{s}"]) for s in (7, 14, 28)), abs=1e-4)
    for size in (7, 14, 28):
        assert {f"d_loss_{size}", f"g_loss_{size}", f"d_real_{size}", f"d_fake_{size}"} <= set(row)
        assert all(0 <= float(row[f"d_acc_{name}_{size}"]) <= 1 for name in ("real_train", "real_test", "fake"))
    grid = np.asarray(Image.open(out / "samples" / "epoch_001.png"))
    assert grid.shape == (2 + 4 * 3 * 30, 2 + 10 * 30)  # 4 groups x 3 levels rows, 10 samples a row
    for r, pixel in ((0, 4), (1, 2)):  # the 7x7 row in 4x4 blocks, the 14x14 row in 2x2 blocks
        tile = grid[2 + r * 30: 2 + r * 30 + 28, 2:30]
        assert (tile == np.repeat(np.repeat(tile[::pixel, ::pixel], pixel, 0), pixel, 1)).all()


def test_conditional_folder_run_at_64px_a_group_a_class_and_generate_by_class(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("with_mask", "without_mask"):
        (tmp_path / "faces" / name).mkdir(parents=True)
        for i, pixels in enumerate(rng.integers(0, 256, (8, 60, 80, 3), dtype=np.uint8)):
            Image.fromarray(pixels).save(tmp_path / "faces" / name / f"{i}.png")
    assert run(lapgan, tmp_path, "unused", "--dataset", str(tmp_path / "faces"), "--conditional", *TINY_LAPGAN) == 0
    out = tmp_path / "run"
    assert Image.open(out / "samples" / "epoch_001.png").size == (2 + 10 * 66, 2 + 2 * 4 * 66)  # 2 classes x 4 levels
    assert lapgan.main(["--out", str(out), "--generate", "6", "--label", "1"]) == 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (6, 64, 64, 3) and (samples["labels"] == 1).all()
    assert lapgan.main(["--out", str(out), "--generate", "5"]) == 0
    assert list(np.load(out / "samples.npz")["labels"]) == [0, 1, 0, 1, 0]  # without --label: the classes in turn


# ---- biggan.py --------------------------------------------------------------------------------------------------------

TINY_BIGGAN = ["--width", "4", "--latent-dim", "8", "--epochs", "1"]


def models_biggan(image_size=32, channels=1, num_classes=10, width=4, latent_dim=8, **options):
    torch.manual_seed(0)
    return (biggan.Generator(latent_dim, image_size, channels, width, num_classes, **options),
            biggan.Discriminator(image_size, channels, width, num_classes, options.get("attention", 0)))


def step_biggan(G, D, group, events=(), lr=1e-3, **options):  # events: a list that hears each optimizer step
    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, 0.999)) for net in (G, D))
    for name, opt in (("G step_biggan", opt_g), ("D step_biggan", opt_d)) if events != () else ():
        opt.register_step_post_hook(lambda *a, name=name: events.append(name))
    return biggan.train_step(G, D, opt_g, opt_d, group, 8, no_scaler(), **options)


BATCH = torch.rand(4, 1, 32, 32) * 2 - 1, torch.arange(4)  # (reals, labels)


@pytest.mark.parametrize("image_size, channels, num_classes", [(28, 1, 10), (32, 1, 10), (64, 3, 0)])
def test_shapes_one_block_per_doubling_attention_where_asked_as_the_identity(image_size, channels, num_classes):
    side = 14 if image_size == 28 else 16  # the default --attention, a stage of G
    G, D = models_biggan(image_size, channels, num_classes, attention=side)
    seen = {}
    for name, module in (("G", G.attention), ("D", D.attention)):
        module.register_forward_hook(lambda m, inputs, out, name=name: seen.__setitem__(name, (inputs[0], out)))
    labels = torch.arange(6) % max(num_classes, 1)
    fake = G(torch.randn(6, 8), labels)
    assert fake.shape == (6, channels, image_size, image_size) and fake.abs().max() <= 1 and D(fake, labels).ndim == 1
    assert [x.shape[-1] for x, _ in seen.values()] == [side, side] and all(torch.equal(x, y) for x, y in seen.values())
    size = ["--image-size", str(image_size)]  # --attention: the side of one of G's stages below the image's
    assert biggan.parse_args(size).attention == side and biggan.parse_args(["--attention", "0", *size]).attention == 0
    assert biggan.parse_args(["--attention", str(image_size // 2), *size]).attention == image_size // 2
    for bad in (4, 7, 12, image_size):
        with pytest.raises(SystemExit):
            biggan.parse_args(["--attention", str(bad), *size])
    blocks = {28: 2, 32: 3, 64: 4}[image_size]  # 7 -> 28 (4 -> 32): a block up per doubling; D: down to 7 (8), then 2
    down = {28: 2, 32: 2, 64: 3}[image_size]
    assert len(G.blocks) == blocks and len(D.blocks) == down + 2 and sum(not b.downsample for b in D.blocks) == 2
    assert len(G.z_chunks) == blocks + 1 and sum(G.z_chunks) == 8  # hierarchical z: a chunk per block + the linear
    assert (G.shared is not None, D.projection is not None) == (bool(num_classes), bool(num_classes))


def test_biggans_average_gets_batchnorm_statistics_of_its_own_samples_and_keeps_its_weights():
    G = models_biggan(28)[0]
    with torch.no_grad():  # spectral norm's power iterations settle first, so sigma no longer moves
        for _ in range(30):
            G(torch.randn(4, 8), torch.arange(4))
    weights = {name: p.clone() for name, p in G.named_parameters()}
    biggan.recompute_batchnorm(G, 8, 10, "cpu", seed=3, n=500)  # two batches of 250
    noise, hidden = torch.Generator().manual_seed(3), []
    for _ in range(2):  # the same draws: z, then the classes
        z = torch.randn(250, 8, generator=noise)
        torch.randint(10, (250,), generator=noise)
        hidden.append(G.linear(z.split(G.z_chunks, dim=1)[0]).view(250, 4, 7, 7).detach())  # the first BatchNorm's input
    norm = G.blocks[0].bn1.bn
    torch.testing.assert_close(norm.running_mean, torch.cat(hidden).mean((0, 2, 3)), atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(norm.running_var, torch.stack([h.var((0, 2, 3)) for h in hidden]).mean(0),
                               atol=1e-5, rtol=1e-3)  # the mean of the batches' statistics, not a moving one
    assert not G.training and all(torch.equal(p, weights[name]) for name, p in G.named_parameters())


def test_g_batchnorms_read_the_shared_class_embedding_and_their_own_chunk_of_z():
    G = models_biggan()[0].eval()
    z, labels = torch.randn(2, 8), torch.tensor([3, 3])
    base = G(z, labels)
    assert not torch.allclose(base, G(z, torch.tensor([4, 4])))
    for chunk in range(4):  # the linear layer's chunk and each block's
        assert not torch.allclose(base, G(z + (torch.arange(8) // 2 == chunk), labels)), chunk
    assert [b.bn1.gain.in_features for b in G.blocks] == [2 + 128] * 3  # its chunk + the shared embedding


def test_truncated_z_is_the_normal_inside_t_and_t_0_gives_one_image_per_class():
    z = biggan.sample_z(20000, 5, truncation=0.5, generator=torch.Generator().manual_seed(0)).flatten()
    normal = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1))
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    assert z.abs().max() <= 0.5
    torch.testing.assert_close(z.quantile(q), normal[normal.abs() <= 0.5][:100000].quantile(q), atol=0.01, rtol=0)
    images = biggan.generate_images(models_biggan()[0], torch.tensor([0, 0, 5, 5]), 8, "cpu", seed=1, truncation=0)
    assert torch.equal(images[0], images[1]) and torch.equal(images[2], images[3]) and not torch.equal(*images[1:3])
    assert biggan.parse_args([]).truncation == 1.5 and biggan.parse_args(["--truncation", "none"]).truncation is None


def test_spectral_norm_keeps_every_layers_largest_singular_value_near_1():
    G, D = models_biggan(width=8, attention=16)
    for _ in range(10):
        step_biggan(G, D, [BATCH], lr=2e-4)
    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)
    G.eval(), D.eval()
    for layer in [m for m in [*G.modules(), *D.modules()] if isinstance(m, kinds) and m is not G.shared]:
        assert abs(torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2) - 1) < 0.05, layer


def test_orthogonal_penalty_is_the_hand_computed_one_on_gs_raw_weights_and_moves_only_g():
    w, kernel = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]]), torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    holder = torch.nn.ParameterList([w, kernel])  # the kernel's rows [1, 0], [1, 1]: 2 * 1^2
    # W W^T = [[5, 11, 2], [11, 25, 4], [2, 4, 1]]: off the diagonal 2 * (11^2 + 2^2 + 4^2) = 282
    (penalty := biggan.orthogonal_penalty(holder)).backward()
    assert penalty.item() == 282 + 2
    torch.testing.assert_close(holder[0].grad, 4 * torch.tensor([[0.0, 11, 2], [11, 0, 4], [2, 4, 0]]) @ w)
    G, _ = models_biggan()
    biggan.orthogonal_penalty(G).backward()  # on the raw weights (before spectral norm), not the class embedding
    got = {name for name, p in G.named_parameters() if p.grad is not None}
    assert got and all(n.endswith("parametrizations.weight.original") for n in got) and "shared.weight" not in got
    (G0, D0), (G1, D1) = models_biggan(), models_biggan()
    for G, D, beta in ((G0, D0, 0.0), (G1, D1, 1.0)):
        torch.manual_seed(1)
        assert (step_biggan(G, D, [BATCH], ortho_beta=beta)[4] > 0) == (beta > 0)  # the penalty column
    vectors = [torch.nn.utils.parameters_to_vector(net.parameters()) for net in (D0, D1, G0, G1)]
    assert torch.equal(*vectors[:2]) and not torch.equal(*vectors[2:])  # D's update the same, G's not


def test_d_steps_group_the_batches_one_d_update_each_then_one_g_update_on_every_image_augmented():
    assert list(biggan.step_groups(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    (G, D), events = models_biggan(), []
    D.register_forward_hook(lambda module, inputs, out: events.append(f"D {len(inputs[0])}"))

    def augment(images):  # a stand-in for data.Augmentation: records what D is shown and what ADA hears
        return events.append(f"augment {len(images)}") or images.flip(-1)
    augment.observe = lambda real_scores: events.append(f"observe {len(real_scores)}")
    step_biggan(G, D, [BATCH] * 3, events, augment=augment)
    # each D step_biggan sees its reals and fakes in one batch of 8, augmented; G's step_biggan scores the last 4 fakes again
    assert events == ["augment 8", "D 8", "D step_biggan", "observe 4"] * 3 + ["augment 4", "D 4", "G step_biggan"]


def test_paper_preset_builds_the_authors_cifar_10_networks():
    args = biggan.parse_args(["--preset", "paper"])  # launch_cifar_ema.sh; lr 2e-4 for G and D like the defaults
    assert vars(args).items() >= dict(image_size=32, width=256, latent_dim=128, shared_dim=0, hier=False, attention=0,
                                      ortho_beta=0, batch_size=50, d_steps=4, average_decay=0.9999, lr=2e-4,
                                      truncation=None).items()
    G = biggan.Generator(args.latent_dim, 32, 3, args.width, 10, args.shared_dim, args.hier, args.attention)
    D = biggan.Discriminator(32, 3, args.width, 10, args.attention)
    # BigGAN-PyTorch's counts for the model of launch_cifar_ema.sh
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (4_304_387, 4_207_361)
    assert G.shared is None and not G.hier and G.attention is None and D.attention is None and args.lr_g == 2e-4


def test_label_is_one_of_the_models_classes_and_a_folder_of_loose_images_has_none(tiny_data_dir, tmp_path, capsys):
    assert run(biggan, tmp_path, tiny_data_dir, *TINY_BIGGAN) == 0
    assert biggan.main(["--out", str(tmp_path / "run"), "--generate", "3", "--label", "10"]) == 2  # MNIST's 0..9
    (folder := tmp_path / "images").mkdir()
    for i in range(32):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / f"{i}.png")
    assert run(biggan, tmp_path, tiny_data_dir, "--dataset", str(folder), *TINY_BIGGAN, "--d-steps", "2", out="loose") == 0
    assert biggan.main(["--out", str(tmp_path / "loose"), "--generate", "3"]) == 0
    assert set(np.load(tmp_path / "loose" / "samples.npz")) == {"images"}
    assert biggan.main(["--out", str(tmp_path / "loose"), "--generate", "3", "--label", "0"]) == 2
    assert "not conditional" in capsys.readouterr().err


# ---- stylegan.py ------------------------------------------------------------------------------------------------------

def tiny_stylegan(image_size=32, channels=1):
    torch.manual_seed(0)
    return (stylegan.Generator(8, 8, image_size, channels, 8, 1024, 2),
            stylegan.Discriminator(image_size, channels, 8, 1024, 4))


def one_step(G, D, real, step, **flags):
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    return stylegan.train_step(G, D, opt_g, opt_d, real, 8, no_scaler(), step, **flags)


def test_stylegan_stages_double_from_4x4_or_from_7x7_at_28_px():
    assert stylegan.channels_at(32, 64, 512) == {4: 64, 8: 64, 16: 32, 32: 16}  # min(channel_base / side, width)
    assert stylegan.channels_at(28, 64, 512) == {7: 64, 14: 36, 28: 18}  # the named datasets' native size
    for size in (28, 32):
        G, D = tiny_stylegan(size)
        fake = G(torch.randn(4, 8))
        assert G.synthesis.const.shape[-1] == {28: 7, 32: 4}[size] and fake.shape == (4, 1, size, size)
        assert D(fake).shape == (4,)
        assert G.num_ws == 2 * len(stylegan.channels_at(size, 8, 1024))  # 2 layers a stage (1 at the first) + ToRGB


def test_demodulation_is_the_per_sample_unit_norm_weight():
    torch.manual_seed(0)
    layer = stylegan.ModulatedConv2d(6, 5, w_dim=4, kernel_size=3)
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 4)
    out, styles = layer(x, w), layer.affine(w)
    for b in range(3):  # the paper's per-sample weight w'', built by hand
        modulated = layer.weight * styles[b][None, :, None, None]
        demodulated = modulated / modulated.square().sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
        torch.testing.assert_close(out[b:b + 1], F.conv2d(x[b:b + 1], demodulated, padding=1), atol=1e-5, rtol=1e-4)
    assert layer.affine.bias.eq(1).all() and layer.weight_gain == 1 / math.sqrt(6 * 9)  # styles from 1, He's gain


def test_resampling_is_the_1_3_3_1_filter():
    x = torch.randn(2, 3, 8, 8)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = (taps[:, None] * taps[None, :] / 64).expand(3, 1, 4, 4)
    torch.testing.assert_close(stylegan.downsample(x), F.conv2d(F.pad(x, [1, 1, 1, 1]), kernel, stride=2, groups=3))
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(stylegan.upsample(x)[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1])


def test_every_image_d_sees_is_augmented_and_r1_is_taken_at_the_unaugmented_reals_through_it():
    a = torch.randn(1, 2, 3, 3)
    linear = lambda images: (images * a).flatten(1).sum(1)  # noqa: E731  grad_x D = a for every image
    r1 = stylegan.r1_penalty(linear, torch.randn(4, 2, 3, 3), lambda x: 3 * x)  # through the augmentation x -> 3x
    torch.testing.assert_close(r1, 9 * a.square().sum())
    G, D = tiny_stylegan()
    shown = []

    def augment(images):  # what data.Augmentation is to train_step
        shown.append(("augment", len(images), images.requires_grad and images.is_leaf))
        return images.flip(-1)
    augment.observe = lambda real_logits: shown.append(("observe", len(real_logits)))  # noqa: E731
    one_step(G, D, torch.rand(4, 1, 32, 32), 16, r1_gamma=1.0, augment=augment)
    # D's step: reals, fakes, R1's reals (a leaf wanting its gradient); ADA hears; G's step: the fakes again
    assert shown == [("augment", 4, False), ("augment", 4, False), ("augment", 4, True), ("observe", 4),
                     ("augment", 4, False)]


def test_lazy_r1_every_16th_step_and_path_length_every_4th(monkeypatch):
    G, D = tiny_stylegan()
    calls = []
    monkeypatch.setattr(stylegan, "r1_penalty", lambda *a: calls.append("r1") or torch.ones([]))
    monkeypatch.setattr(stylegan, "path_length_penalty", lambda *a: calls.append("pl") or torch.ones([]))
    for step in range(1, 17):
        metrics = one_step(G, D, torch.rand(2, 1, 32, 32), step, r1_gamma=1.0, pl_weight=2.0)
    assert calls == ["pl"] * 3 + ["r1", "pl"]  # steps 4, 8, 12, then 16
    assert metrics[4:].tolist() == [stylegan.R1_INTERVAL, stylegan.PL_INTERVAL]  # raw penalty times its interval


def test_ws_truncation_to_the_tracked_mean_w_and_style_mixing_at_one_cutoff():
    G, _ = tiny_stylegan()
    z = torch.randn(16, 8)
    w = G.mapping(z, track_average=True)
    torch.testing.assert_close(G.mapping.w_avg, (1 - 0.995) * w.detach().mean(0))  # the official w_avg_beta
    torch.testing.assert_close(G.mapping(z, psi=0.5), (G.mapping.w_avg + G.mapping(z)) / 2)
    ws = G.ws(z, mixing_prob=1.0)  # with probability 1: one switch at a cutoff in 1..num_ws - 1
    assert sum(not torch.equal(ws[:, k], ws[:, k - 1]) for k in range(1, G.num_ws)) == 1


def test_style_mixing_grid_takes_coarse_ws_from_the_column_and_fine_ones_from_the_row():
    G, _ = tiny_stylegan()
    grids = {cutoff: stylegan.style_grids(G, 8, "cpu", 1, 9, 2, cutoff)[0][1].unflatten(0, (3, 10))
             for cutoff in (0, 4, G.num_ws)}  # style_mixing.png's images, 10 a row
    corner, columns, rows, mixed = grids[4][0, 0], grids[4][0, 1:], grids[4][1:, 0], grids[4][1:, 1:]
    assert corner.eq(0).all()  # mid grey
    torch.testing.assert_close(grids[G.num_ws][1:, 1:], columns.expand(2, -1, -1, -1, -1))  # all from the column
    torch.testing.assert_close(grids[0][1:, 1:], rows[:, None].expand(-1, 9, -1, -1, -1))  # all from the row
    assert (mixed - columns).abs().amax() > 1e-4 and (mixed - rows[:, None]).abs().amax() > 1e-4


def test_average_half_life_ramps_with_the_steps():
    G, average = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    for step, expected_half_life in ((100, 5.0), (100_000, math.log(0.5) / math.log(0.999))):
        average.weight.data.fill_(0.0), G.weight.data.fill_(1.0)
        stylegan.update_average(average, G, step, 0.999)
        assert average.weight.item() == pytest.approx(1 - 0.5 ** (1 / expected_half_life))


def test_preset_paper_is_stylegan2_adas_cifar_configuration():
    args = stylegan.parse_args(["--preset", "paper"])
    assert (args.batch_size, args.mbstd_group, args.lr, args.r1_gamma, args.style_mixing, args.pl_weight) == (
        64, 32, 0.0025, 0.01, 0, 0)
    assert math.log(0.5) / math.log(args.average_decay) * 64 == pytest.approx(500_000)  # half-life 500k images
    G = stylegan.Generator(args.latent_dim, args.w_dim, args.image_size, 3, args.width, args.channel_base,
                           args.mapping_layers)
    D = stylegan.Discriminator(args.image_size, 3, args.width, args.channel_base, args.mbstd_group)
    c, affine = 512, 512 * 512 + 512  # affine: w -> one style per input channel
    layer, to_rgb = affine + c * c * 9 + 1 + c, affine + 3 * c + 3  # weight, noise strength, bias
    g_count = 2 * (c * c + c) + c * 16 + 7 * layer + 4 * to_rgb  # mapping, const, 1 + 2 + 2 + 2 layers, 4 ToRGBs
    d_count = (3 * c + c) + 6 * (c * c * 9 + c) + ((c + 1) * c * 9 + c) + (c * 16 * c + c) + (c + 1)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (count(G), count(D)) == (g_count, d_count) == (19_947_539, 20_720_641)


def test_run_compensates_lazy_regularisation_and_generate_writes_the_style_grids(tiny_data_dir, tmp_path):
    assert run(stylegan, tmp_path, tiny_data_dir, "--width", "4", "--latent-dim", "8", "--w-dim", "8", "--epochs", "1",
               "--pl-weight", "1", "--style-mixing", "0.5") == 0
    out = tmp_path / "run"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    for (group,), c in ((checkpoint["opt_d"]["param_groups"], 16 / 17), (checkpoint["opt_g"]["param_groups"], 4 / 5)):
        assert group["lr"] == pytest.approx(0.0025 * c) and group["betas"] == (0.0, 0.99 ** c)  # R1 and path length
    assert checkpoint["generator"]["pl_mean"] > 0 and checkpoint["generator_average"]["mapping.w_avg"].any()
    assert Image.open(out / "style_mixing.png").size == (2 + 10 * 30, 2 + 7 * 30)  # sources row + 6 mixed rows, 28 px
    os.remove(out / "truncation.png")
    assert stylegan.main(["--out", str(out), "--generate", "12", "--truncation", "0"]) == 0
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (12, 28, 28, 1) and (images == images[0]).all()  # psi 0: the mean image every time
    assert (out / "truncation.png").is_file() and (out / "style_mixing.png").is_file()


# ---- r3gan.py ---------------------------------------------------------------------------------------------------------

class HalfSquare(nn.Module):  # D(x) = w ||x||^2 / 2: grad_x D = w x, known by hand at every image
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones([]))

    def forward(self, images):
        return self.w * images.flatten(1).square().sum(1) / 2


class Fixed(nn.Module):  # a G whose fakes are given images
    def __init__(self, images):
        super().__init__()
        self.images, self.p = images, nn.Parameter(torch.zeros([]))

    def forward(self, z):
        return self.images + self.p


def test_rpgan_losses_match_hand_computed_values():
    real, fake = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    d = (math.log(1 + math.exp(-(1.0 - 0.5))) + math.log(1 + math.exp(-(-2.0 - 1.0)))) / 2  # softplus(-(D(x)-D(G(z))))
    g = (math.log(1 + math.exp(-(0.5 - 1.0))) + math.log(1 + math.exp(-(1.0 + 2.0)))) / 2  # softplus(-(D(G(z))-D(x)))
    assert r3gan.d_loss_rpgan(real, fake).item() == pytest.approx(d)
    assert r3gan.g_loss_rpgan(real, fake).item() == pytest.approx(g)


def test_r1_at_the_reals_and_r2_at_the_fakes_through_the_augmentation_at_the_unaugmented_images():
    torch.manual_seed(0)
    real, fake, gamma = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), 2.0
    G, D = Fixed(fake), HalfSquare()
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.0), torch.optim.SGD(D.parameters(), lr=0.0)
    augment = lambda images: 3 * images  # noqa: E731  D(3x) = 9 ||x||^2 / 2: grad_x = 9x
    augment.observe = lambda outputs: None
    out = r3gan.train_step(G, D, opt_g, opt_d, real, 1, no_scaler(), gamma, augment)
    sq_real, sq_fake = real.flatten(1).square().sum(1), fake.flatten(1).square().sum(1)  # ||x||^2 per image
    r1, r2 = 81 * sq_real.mean(), 81 * sq_fake.mean()
    real_logits, fake_logits = 4.5 * sq_real, 4.5 * sq_fake
    torch.testing.assert_close(out[4:], torch.stack([r1, r2]))
    torch.testing.assert_close(out[0], F.softplus(fake_logits - real_logits).mean())
    torch.testing.assert_close(out[1], F.softplus(real_logits - fake_logits).mean())
    # D's gradient in w: the loss's, plus gamma/2 (R1 + R2) with R = 81 w^2 E||x||^2; G's step left it alone
    adversarial = (torch.sigmoid(fake_logits - real_logits) * 4.5 * (sq_fake - sq_real)).mean()
    torch.testing.assert_close(D.w.grad, adversarial + gamma / 2 * 2 * (r1 + r2))
    assert G.p.grad is not None  # G learnt through D


def test_each_residual_block_starts_as_its_shortcut_and_nothing_normalises():
    torch.manual_seed(0)
    G, D = r3gan.Generator(8, 32, 3, 8, 8, 8, 2), r3gan.Discriminator(32, 3, 8, 8, 8, 2)
    blocks = [m for net in (G, D) for m in net.modules() if isinstance(m, r3gan.ResidualBlock)]
    assert len(blocks) == 2 * 2 * 4  # 2 a resolution at 4, 8, 16, 32 px, in G and in D
    x = torch.randn(2, 8, 4, 4)
    for block in blocks:
        assert block.conv3.weight.eq(0).all() and torch.equal(block(x), x)
        assert block.conv2.groups == 2 and block.conv2.weight.shape == (16, 8, 3, 3)  # 1x1 -> grouped 3x3 -> 1x1
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.Tanh, nn.Sigmoid)
    assert not [m for net in (G, D) for m in net.modules() if isinstance(m, norms)]
    assert not [name for net in (G, D) for name, _ in net.named_parameters() if "orig" in name]  # no spectral norm
    assert G(torch.randn(2, 8)).shape == (2, 3, 32, 32) and D(torch.randn(2, 3, 32, 32)).shape == (2,)


def test_resampling_is_the_1_2_1_filter_as_bilinear_interpolation():
    x = torch.randn(2, 3, 8, 8)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])  # [1, 2, 1] convolved with [1, 1], as the authors' CreateLowpassKernel
    kernel = (taps[:, None] * taps[None, :] / 64).expand(3, 1, 4, 4)
    torch.testing.assert_close(r3gan.downsample(x), F.conv2d(F.pad(x, [1, 1, 1, 1]), kernel, stride=2, groups=3))
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(r3gan.upsample(x)[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1])


def test_preset_paper_is_the_authors_cifar_10_configuration_and_its_parameter_count():
    args = r3gan.parse_args(["--preset", "paper"])
    assert args.nets == "resnet" and r3gan.parse_args([]).nets == "conv"
    assert (args.width, args.max_width, args.group_width, args.blocks) == (768, 768, 16, 2)  # 96 groups of 1536
    assert (args.latent_dim, args.batch_size, args.image_size) == (64, 512, 32)
    assert (args.lr, args.gamma, args.schedule_images) == (2e-4, 0.05, 20_000_000)
    assert math.log(0.5) / math.log(args.average_decay) * 512 == pytest.approx(5_000_000)  # half-life 5M images
    nets = args.width, args.max_width, args.group_width, args.blocks
    G, D = r3gan.Generator(args.latent_dim, args.image_size, 3, *nets), r3gan.Discriminator(args.image_size, 3, *nets)
    c, inner = 768, 1536
    block = 2 * c * inner + inner * (inner // 96) * 9 + 2 * inner  # 1x1, grouped 3x3, 1x1, two biases
    g_count = c * 16 + 64 * c + 8 * block + c * 3  # basis, z -> basis scales, 2 blocks at 4..32 px, 1x1 to RGB
    d_count = 3 * c + 8 * block + c * 16 + c  # 1x1 from RGB, blocks, depthwise 4x4 basis, linear head
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (count(G), count(D)) == (g_count, d_count) == (20_732_160, 20_683_776)


def test_resnet_nets_at_28_px_halve_the_width_at_each_finer_stage_with_1x1_transitions():
    cpu = r3gan.parse_args([])
    assert r3gan.stage_widths(28, cpu.width, cpu.max_width) == (7, [128, 64, 32])  # 7x7 basis, 14, 28 px
    assert r3gan.stage_widths(32, 8, 8) == (4, [8, 8, 8, 8])
    assert r3gan.stage_widths(64, 16, 32)[1] == [32, 32, 32, 32, 16]  # 4, 8, 16, 32 px at the cap, 64 at 16
    nets = cpu.width, cpu.max_width, cpu.group_width, cpu.blocks
    G, D = r3gan.Generator(64, 28, 1, *nets), r3gan.Discriminator(28, 1, *nets)
    block = lambda c: 2 * c * 2 * c + 2 * c * 16 * 9 + 2 * 2 * c  # noqa: E731  1x1, grouped 3x3 (16 a group), 1x1
    blocks, transitions = block(128) + block(64) + block(32), 128 * 64 + 64 * 32
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(G) == 128 * 49 + 64 * 128 + blocks + transitions + 32  # basis, z -> its scales, ..., 1x1 to gray
    assert count(D) == 32 + blocks + transitions + 128 * 49 + 128  # 1x1 from gray, ..., 7x7 depthwise basis, head
    assert G(torch.randn(2, 64)).shape == (2, 1, 28, 28) and D(torch.randn(2, 1, 28, 28)).shape == (2,)


def test_cpu_default_nets_are_wgan_gps_and_the_average_keeps_their_batchnorm_statistics():
    args = r3gan.parse_args(["--image-size", "28"])
    torch.manual_seed(0)
    G, D = r3gan.make_nets(args, 3)
    torch.manual_seed(0)
    wgan_g, wgan_d = wgan_gp.Generator(64, 28, 3, 32).apply(wgan_gp.init_weights), \
        wgan_gp.Critic(28, 3, 32).apply(wgan_gp.init_weights)
    for ours, theirs in ((G, wgan_g), (D, wgan_d)):  # the same layers, drawn alike from the same seed
        assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    z = torch.randn(4, 64)
    wgan_g.eval(), G.eval()
    torch.testing.assert_close(G(z), wgan_g(z))
    torch.testing.assert_close(D(G(z)), wgan_d(G(z)))
    G.train()
    average = copy.deepcopy(G)
    G(torch.randn(8, 64))  # moves G's BatchNorm statistics
    r3gan.update_average(average, G, step=100, decay=0.999)
    assert all(torch.equal(a, b) for a, b in zip(average.buffers(), G.buffers()))


def test_schedules_are_the_papers_cosines_and_constant_without_schedule_images(tiny_data_dir, tmp_path):
    assert [r3gan.schedule(2e-4, 5e-5, n, 20_000_000) for n in (0, 10_000_000, 20_000_000, 30_000_000)] == \
        pytest.approx([2e-4, 1.25e-4, 5e-5, 5e-5])
    assert r3gan.schedule(0.05, 0.005, 10 ** 9, 0) == 0.05
    assert run(r3gan, tmp_path, tiny_data_dir, *TINY["r3gan"], "--epochs", 1, "--schedule-images", 64,
               "--gamma", 0.1, "--nets", "resnet", "--lr", 2e-4) == 0  # the paper's lr, to 5e-5
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    progress = (1 - math.cos(math.pi * 48 / 64)) / 2  # the 4th step of 16 images has seen 48 of 64
    (group,) = checkpoint["opt_d"]["param_groups"]
    assert group["lr"] == pytest.approx(2e-4 - progress * 1.5e-4)
    assert group["betas"][0] == 0 and group["betas"][1] == pytest.approx(0.9 + progress * 0.09)
    assert float(checkpoint["history"][0]["gamma"]) == pytest.approx(0.1 - progress * 0.09, rel=1e-4)


# ---- data.py, fid.py, score.py and bench.py ---------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "shared" / "fixtures"


# ---- data.py: IDX files, downloads, folders

@pytest.mark.parametrize("name", ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"])
def test_idx_files_plain_or_gzipped_read_back_and_damage_is_an_error_naming_the_file(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / name, images)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / name), ndim=3), images)
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.* is not an IDX file of 1-d"):
        data.read_idx(str(tmp_path / name), ndim=1)
    (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:30 if name.endswith(".gz") else -100])
    with pytest.raises(data.DataError, match="cannot read .*t10k|t10k-images-idx3-ubyte is truncated"):
        data.read_idx(str(tmp_path / name), ndim=3)


def test_named_dataset_loads_from_data_dir_then_the_system_folder(tmp_path, monkeypatch):
    make_tiny_mnist(tmp_path / "system", n=8)
    monkeypatch.setattr(data, "SYSTEM_DATASET_DIR", str(tmp_path / "system"))
    assert len(data.load_dataset("mnist", str(tmp_path / "empty"), download=False).images) == 8
    dataset = data.load_dataset("mnist", make_tiny_mnist(tmp_path / "local", n=12), image_size=32)
    assert dataset.images.shape == (12, 1, 32, 32) and dataset.images.dtype == torch.uint8
    assert dataset.labels.tolist()[:5] == [0, 1, 2, 3, 0] and dataset.classes == [str(d) for d in range(10)]
    with pytest.raises(data.DataError, match="unknown dataset 'cifar'"):
        data.load_dataset("cifar")
    assert data.load_data(str(tmp_path), "x", 32, split="test") is None  # a folder has no held-out split


@pytest.fixture
def www(tmp_path):
    """(base URL, folder): a server on 127.0.0.1 for the files in the folder."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    os.makedirs(tmp_path / "www")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tmp_path / "www"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "www"
    server.shutdown()
    server.server_close()


def test_download_keeps_only_a_file_with_the_right_md5_trying_each_mirror(tmp_path, www):
    base, folder = www
    for mirror, body in (("bad", b"wrong"), ("good", b"right")):
        os.makedirs(folder / mirror)
        (folder / mirror / "a.gz").write_bytes(body)
    md5 = hashlib.md5(b"right").hexdigest()
    for mirrors in ([base + "/bad/"], ["http://127.0.0.1:9/"]):
        with pytest.raises(data.DataError, match="could not download a.gz"):
            data.fetch("a.gz", mirrors, md5, str(tmp_path / "dl"))
        assert os.listdir(tmp_path / "dl") == []
    mirrors = [base + "/missing/", base + "/bad/", base + "/good/"]
    assert open(data.fetch("a.gz", mirrors, md5, str(tmp_path / "dl")), "rb").read() == b"right"


def test_a_named_dataset_found_nowhere_is_downloaded(tmp_path, www, monkeypatch):
    base, folder = www
    make_tiny_mnist(folder, n=8)
    md5s = [hashlib.md5((folder / "mnist" / name).read_bytes()).hexdigest() for name in data.GZ_FILES]
    monkeypatch.setitem(data.DATASETS, "mnist", {**data.DATASETS["mnist"], "mirrors": [base + "/mnist/"], "md5": md5s})
    monkeypatch.setattr(data, "SYSTEM_DATASET_DIR", str(tmp_path / "nowhere"))
    assert len(data.load_dataset("mnist", str(tmp_path / "data")).images) == 8
    assert sorted(os.listdir(tmp_path / "data" / "mnist")) == sorted(data.GZ_FILES)


def test_a_folder_gives_labels_from_subfolders_and_one_class_for_loose_images(tmp_path):
    (tmp_path / "pets" / "cats").mkdir(parents=True)
    (tmp_path / "pets" / "dogs").mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "pets" / "cats" / "red.png")
    Image.new("RGBA", (40, 40), (0, 0, 255, 0)).save(tmp_path / "pets" / "cats" / "clear.png")
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # a centre crop keeps only the white third
    Image.fromarray(wide).save(tmp_path / "pets" / "dogs" / "wide.jpg", quality=100)
    dataset = data.load_dataset(str(tmp_path / "pets"), image_size=16)
    assert dataset.classes == ["cats", "dogs"] and dataset.labels.tolist() == [0, 0, 1]
    clear, red, wide = dataset.images.int()
    assert dataset.images.shape == (3, 3, 16, 16) and (clear == 255).all() and red[0].min() == 255
    assert wide.float().mean() > 240
    (tmp_path / "loose").mkdir()
    for i in range(3):
        Image.new("L", (30, 20), 50 * i).save(tmp_path / "loose" / f"{i}.png")
    (tmp_path / "loose" / ".DS_Store").write_bytes(b"\0junk")  # hidden: skipped
    loose = data.load_dataset(str(tmp_path / "loose"), image_size=8)
    assert loose.images.shape == (3, 1, 8, 8) and loose.labels.tolist() == [0, 0, 0]
    (tmp_path / "pets" / "dogs" / "notes.txt").write_text("not an image")
    with pytest.raises(data.DataError, match="notes.txt"):
        data.load_dataset(str(tmp_path / "pets"), image_size=16)


# ---- data.py: batches, pictures, files

def test_batches_are_scaled_slices_covering_every_image_once_an_epoch_in_a_fixed_order():
    images = torch.arange(103, dtype=torch.uint8).view(103, 1, 1, 1).expand(103, 1, 2, 2).contiguous()
    batches = data.Batches(data.Dataset(images, torch.arange(103), ["x"]), batch_size=10, device="cpu", seed=0)
    seen = []
    for real, labels in batches.epoch(1):
        assert real.dtype == torch.float32 and len(real) in (10, 11) and -1 <= real.min() <= real.max() <= 1
        assert torch.equal(data.to_uint8(real[:, 0, 0, 0]), labels.to(torch.uint8))
        seen += labels.tolist()
    assert len(batches) == 10 and sorted(seen) == list(range(103))
    assert sum((l.tolist() for _, l in batches.epoch(1)), []) == seen != sum((l.tolist() for _, l in batches.epoch(2)), [])
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    assert data.to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]  # torchvision save_image's rounding


def test_grid_gif_and_loss_plot(tmp_path):
    data.save_grid(torch.rand(12, 3, 8, 8) * 2 - 1, str(tmp_path / "grid.png"), nrow=5)
    assert Image.open(tmp_path / "grid.png").size == (2 + 5 * 10, 2 + 3 * 10)
    paths = []
    for k in range(7):  # frame k is grey level 30 k: each kept frame says which it is
        paths.append(str(tmp_path / f"epoch_{k}.png"))
        Image.new("L", (4, 4), 30 * k).save(paths[-1])
    data.save_gif(paths, str(tmp_path / "progress.gif"), max_frames=4)
    gif, levels = Image.open(tmp_path / "progress.gif"), []
    for i in range(gif.n_frames):
        gif.seek(i)
        levels.append(gif.convert("L").getpixel((0, 0)))
    assert levels == [0, 60, 120, 180]
    data.plot_curves({"d_loss": ["1.3", "1.1", "1.2"], "g_loss": [0.7, 0.9, float("nan")]}, str(tmp_path / "l.png"))
    assert Image.open(tmp_path / "l.png").size == (640, 400)


@pytest.mark.parametrize("where", ["while writing", "Ctrl-C inside torch.save"])
def test_write_atomic_failing_keeps_the_old_file_and_the_interrupt(where, tmp_path):
    class InterruptedFile(io.RawIOBase):  # the third write is Ctrl-C: torch's zip writer raises over it
        def __init__(self, f):
            self.f, self.writes = f, 0

        def writable(self):
            return True

        def write(self, chunk):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return self.f.write(chunk)

    def write(f):
        if where == "while writing":
            f.write(b"half")
            raise OSError(28, "No space left on device")
        torch.save({"weights": torch.randn(1000, 100)}, InterruptedFile(f))

    path = tmp_path / "checkpoint.pt"
    data.write_atomic(str(path), lambda f: f.write(b"previous"))
    with pytest.raises(OSError if where == "while writing" else KeyboardInterrupt):
        data.write_atomic(str(path), write)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_second_process_into_the_same_out_stops_with_one_line(tmp_path):
    data.prepare_out(str(tmp_path / "run"))
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import data; data.prepare_out({str(tmp_path / 'run')!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "another run is writing there" in result.stderr.strip().splitlines()[-1]
    data.prepare_out(str(tmp_path / "run"))  # the same process may prepare it again


# ---- data.py: augmentation

def test_translation_and_cutout_move_and_zero_what_they_should():
    torch.manual_seed(0)
    images = torch.full((32, 1, 16, 16), -1.0)
    images[:, :, 8, 8] = 1.0
    for out in data.translate(images):
        (_, y, x), = (out == 1).nonzero().tolist()
        assert abs(y - 8) <= 2 and abs(x - 8) <= 2 and (out == 0).sum() == 16 * 16 - (16 - abs(y - 8)) * (16 - abs(x - 8))
    for out in data.cutout(torch.ones(32, 3, 16, 16)):
        rows, cols = (out[0] == 0).any(1).nonzero().flatten(), (out[0] == 0).any(0).nonzero().flatten()
        assert 0 < len(rows) <= 8 and 0 < len(cols) <= 8 and int((out[0] == 0).sum()) == len(rows) * len(cols)


def test_colour_operations_shift_and_scale_each_image_around_its_mean():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 8, 8) * 2 - 1
    offset = data.brightness(images) - images
    assert torch.allclose(offset, offset[:, :1, :1, :1].expand_as(offset)) and offset.abs().max() <= 0.5
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    factor = (data.contrast(images) - mean) / (images - mean)
    assert torch.allclose(factor, factor[:, :1, :1, :1].expand_as(factor), atol=1e-3) and 0.5 - 1e-3 <= factor.min()
    grey = images.mean(dim=1, keepdim=True)
    assert torch.allclose(data.saturation(images).mean(dim=1, keepdim=True), grey, atol=1e-6)
    assert torch.equal(data.saturation(images[:, :1]), images[:, :1])


def test_ada_applies_each_operation_with_probability_p_differentiably_and_repeatably():
    torch.manual_seed(0)
    ada = data.make_augmentation("ada", 3, "cpu")
    ada.p = torch.tensor(0.3)
    assert 0.26 < (ada(torch.ones(2000, 1, 8, 8), ("cutout",)) == 0).flatten(1).any(1).float().mean() < 0.34
    images = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    ada.p = torch.tensor(0.0)
    assert torch.equal(ada(images), images)
    ada.p = torch.tensor(0.5)
    torch.manual_seed(5)
    first = ada(images)
    first.sum().backward()
    torch.manual_seed(5)
    assert torch.equal(first, ada(images)) and images.grad is not None and (images.grad != 0).any()
    assert data.make_augmentation("ada", 1, "cpu").policy == ("translation", "cutout")
    assert data.make_augmentation("none", 1, "cpu") is None


def test_ada_p_rises_while_d_calls_every_real_real_and_its_state_round_trips():
    ada = data.make_augmentation("ada", 1, "cpu")
    for _ in range(4 * 10):  # 10 updates of 4 D steps of 64 reals
        ada.observe(torch.ones(64))
    assert ada.p.item() == pytest.approx(10 * 256 / data.ADA_SPEED_IMAGES)
    copy_of = data.make_augmentation("ada", 1, "cpu")
    ada.observe(torch.ones(8))
    copy_of.load_state_dict(ada.state_dict())
    for a in (ada, copy_of):
        for _ in range(3):
            a.observe(torch.ones(8))
    assert ada.p.item() == copy_of.p.item() > 0 and ada.steps == copy_of.steps == 0
    torch.manual_seed(0)
    for _ in range(4 * 200):
        ada.observe(torch.randn(64))  # r_t ~ 0 < 0.6: p falls to 0, no lower
    assert ada.p.item() == 0.0
    diffaug = data.make_augmentation("diffaug", 3, "cpu")
    diffaug.observe(-torch.ones(100))
    assert diffaug.p.item() == 1.0 and diffaug.policy == ("color", "translation", "cutout")


# ---- fid.py: the network against pytorch-fid (fixtures in ../shared/fixtures; skipped without them)

def fixture(*parts):
    path = FIXTURES.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"no fixture {path}")
    return path


def reference_state_dict():
    """The fixture's deterministic weights: a randn per entry seeded by the crc32 of its name, scaled by kind."""
    state = {}
    for name, tensor in fid.FIDInception().state_dict().items():
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        r = torch.randn(tuple(tensor.shape), generator=generator, dtype=torch.float64)
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
            continue
        value = (1 + 0.1 * r.abs() if name.endswith("running_var") else 1 + 0.1 * r if name.endswith("bn.weight")
                 else 0.1 * r if name.endswith(("running_mean", "bn.bias")) or name == "fc.bias"
                 else r * math.sqrt(2 / math.prod(tensor.shape[1:])))
        state[name] = value.float()
    return state


@pytest.fixture(scope="module")
def inception():
    return fid.load_inception(reference_state_dict(), device="cpu")


def test_the_network_has_pytorch_fids_layout_and_loads_only_it():
    layout = json.loads(fixture("fid_inception", "layout.json").read_text())
    assert [[name, list(t.shape)] for name, t in fid.FIDInception().state_dict().items()] == layout
    state = {k: v for k, v in reference_state_dict().items() if not k.endswith("num_batches_tracked")}
    fid.FIDInception().load_pytorch_fid_state_dict(state)
    for wrong in ({**state, "fc.weight": torch.zeros(1000, 2048)}, {"module." + k: v for k, v in state.items()}):
        with pytest.raises(fid.FIDError, match="not pytorch-fid's Inception"):
            fid.FIDInception().load_pytorch_fid_state_dict(wrong)


def test_features_equal_pytorch_fids_at_all_four_blocks(inception):
    reference = json.loads(fixture("fid_inception", "reference.json").read_text())["blocks"]
    b, c, i, j = torch.meshgrid(*(torch.arange(n) for n in (2, 3, 32, 32)), indexing="ij")
    images = ((7 * b + 13 * c + 3 * i + 5 * j) % 256).to(torch.uint8)
    for dims in (64, 192, 768, 2048):
        features = fid.compute_features(images, dims, weights=inception).double().numpy()
        np.testing.assert_allclose(features.sum(1), reference[str(dims)]["sum"], rtol=1e-5)
        np.testing.assert_allclose(features[:, :16], reference[str(dims)]["first16"], rtol=1e-5, atol=1e-6)


def test_grayscale_and_floats_score_like_their_three_channel_pngs(inception):
    gray = torch.randint(0, 256, (3, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    np.testing.assert_allclose(fid.compute_features(gray, 64, weights=inception),
                               fid.compute_features(gray.repeat(1, 3, 1, 1), 64, weights=inception), rtol=1e-5)
    as_float = gray.float() / 127.5 - 1
    np.testing.assert_allclose(fid.compute_features(as_float, 64, weights=inception),
                               fid.compute_features(gray, 64, weights=inception), rtol=1e-5)


# ---- fid.py: Fréchet distance, KID, precision/recall

def random_statistics(d, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_closed_forms_and_scipys_route():
    rng = np.random.default_rng(1)
    mu1, mu2, a, b = rng.standard_normal(16), rng.standard_normal(16), rng.random(16) + 0.1, rng.random(16) + 0.1
    a[:4] = 0  # singular: the eigh route
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(1.0, 4.0, -0.5, 9.0) == pytest.approx(3.25, rel=1e-12)  # N(1, 2^2) vs N(-0.5, 3^2)
    mu1, sigma1 = random_statistics(64, 400, seed=5)
    mu2, sigma2 = random_statistics(64, 400, seed=6)
    assert fid.frechet_distance(mu1, sigma1, mu1, sigma1) < 1e-9 * np.trace(sigma1)
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    assert fid.frechet_distance(*map(torch.from_numpy, (mu1, sigma1, mu2, sigma2))) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(fid.FIDError, match="mismatched dimensions"):
        fid.frechet_distance(mu1, sigma1, mu1[:4], sigma1[:4, :4])


@pytest.fixture(scope="module")
def metrics():
    reference = json.loads(fixture("metrics", "reference.json").read_text())
    return reference, np.load(FIXTURES / "metrics" / "features_generated.npy"), np.load(
        FIXTURES / "metrics" / "features_real.npy")


def test_kid_and_precision_recall_equal_torch_fidelitys(metrics):
    reference, fake, real = metrics
    with pytest.warns(UserWarning, match="KID subsets of 300 images"):
        assert fid.kernel_inception_distance(fake, real) == (pytest.approx(reference["kid_full_set"], rel=1e-5), 0)
    expected = reference["kid_50_subsets_of_100_numpy_randomstate_2020"]
    mean, std = fid.kernel_inception_distance(fake, real, subsets=50, subset_size=100, seed=2020)
    assert (mean, std) == (pytest.approx(expected["mean"], rel=1e-5), pytest.approx(expected["std"], rel=1e-5))
    for batch_size in (2048, 7):
        assert fid.precision_recall(real, fake, k=3, batch_size=batch_size) == (
            pytest.approx(reference["precision_k3"], rel=1e-5), pytest.approx(reference["recall_k3"], rel=1e-5))


def test_clean_resize_equals_clean_fids():
    with np.load(fixture("metrics", "clean_resize.npz")) as images:
        for name in ("gray28", "rgb32"):
            picture = images[f"{name}_input"]
            batch = picture[None, None] if picture.ndim == 2 else picture.transpose(2, 0, 1)[None]
            resized = fid.clean_resize(batch)[0].expand(3, -1, -1).permute(1, 2, 0).numpy()
            np.testing.assert_allclose(resized, images[f"{name}_resized"], rtol=0, atol=1e-3)


def test_kid_and_precision_recall_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    assert fid.kernel_inception_distance(x, y, subset_size=2) == (pytest.approx(1.125, rel=1e-12), 0.0)
    real, fake = torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([[0.5], [10.0]])
    assert fid.precision_recall(real, fake, k=1) == (0.5, 1.0)
    with pytest.raises(fid.FIDError, match=r"k must be in 1..N-1 = 1..1 for the 2 generated images"):
        fid.precision_recall(real, fake, k=2)


# ---- fid.py: the command line and the scripts' --fid line

def save_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{k:03d}.png"))
    return str(folder)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(reference_state_dict(), path)
    return str(path)


@pytest.mark.filterwarnings("ignore:.*singular")
def test_cli_prints_fid_kid_and_precision_recall_with_their_protocol(tmp_path, capsys, weights_file):
    fake = save_pngs(tmp_path / "fake", torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8))
    real = save_pngs(tmp_path / "real", torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8))
    flags = ["--dims", "64", "--weights", weights_file, "--device", "cpu"]
    assert fid.main([fake, real, *flags, "--kid", "--prc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["FID", "KID", "precision", "recall"]
    assert all(f"6 vs 5 reference images ({real}), Inception 64-d first max pool" in line for line in lines)
    assert fid.main(["--save-stats", real, str(tmp_path / "real.npz"), *flags, "--kid"]) == 0
    capsys.readouterr()
    assert fid.main([fake, str(tmp_path / "real.npz"), *flags, "--kid", "--prc"]) == 0
    assert [line.split("[")[0] for line in capsys.readouterr().out.splitlines()] == [line.split("[")[0]
                                                                                    for line in lines]


@pytest.mark.parametrize("case, expected", [("missing", "no such folder or file"), ("empty", "no images in"),
                                            ("dims", "mismatched dimensions"), ("kid", "holds only mu and sigma"),
                                            ("device", "--device cuda:7"), ("weights", "nope.pth")])
def test_cli_errors_are_one_line_and_exit_2(case, expected, tmp_path, capsys):
    np.savez(tmp_path / "s64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "s192.npz", mu=np.zeros(192), sigma=np.eye(192))
    os.makedirs(tmp_path / "empty")
    two = save_pngs(tmp_path / "two", torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    s64 = str(tmp_path / "s64.npz")
    argv = {"missing": [str(tmp_path / "x.npz"), s64], "empty": [str(tmp_path / "empty"), s64],
            "dims": [s64, str(tmp_path / "s192.npz")], "kid": [two, s64, "--kid"],
            "device": [s64, s64, "--device", "cuda:7"], "weights": [two, s64, "--dims", "64", "--weights", "nope.pth"]}
    assert fid.main(argv[case]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and expected in err, err


def test_fid_py_copied_alone_imports_and_computes_a_frechet_distance(tmp_path):
    (tmp_path / "fid.py").write_text((HERE / "fid.py").read_text())
    code = "import fid; print(fid.frechet_distance([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], [3.0, 4.0], [[1.0, 0.0], [0.0, 1.0]]))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and float(result.stdout) == pytest.approx(25.0), result.stderr


@pytest.mark.filterwarnings("ignore:.*singular")
def test_report_is_one_line_and_caches_the_real_features(tmp_path, monkeypatch, inception):
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device=None: inception)
    fake, real = (torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8) for n in (2, 3))
    line = fid.report(fake, real, cache_dir=str(tmp_path))
    assert line.startswith("FID: ") and "KID: " in line and "2 vs 3 reference images (training images)" in line
    assert os.listdir(tmp_path) == ["fid_features_8px_3.npz"]
    monkeypatch.setattr(fid, "compute_features", lambda *args, **kwargs: pytest.fail("recomputed"))
    assert fid.cached_features(str(tmp_path / "fid_features_8px_3.npz"), real).shape == (3, 2048)


# ---- score.py and bench.py

def test_score_recognises_real_bars_and_a_collapsed_set(tmp_path, monkeypatch, capsys):
    data_dir = make_tiny_mnist(tmp_path / "data", n=200, num_classes=10)
    monkeypatch.setattr(score, "TRAIN_IMAGES", 2000)
    monkeypatch.setattr(score, "MIN_EPOCHS", 1)
    labels = np.arange(300) % 10
    np.savez(tmp_path / "real.npz", images=bar_images(labels, num_classes=10, seed=1)[..., None], labels=labels)
    np.savez(tmp_path / "one.npz", images=np.repeat(bar_images(np.array([3]), num_classes=10)[..., None], 300, 0))
    argv = [str(tmp_path / "real.npz"), str(tmp_path / "one.npz"), "--dataset", "mnist", "--data-dir", data_dir]
    assert score.main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    real, one = report["samples"][argv[0]], report["samples"][argv[1]]
    assert real["label_accuracy"] > 0.9 and real["classes_covered"] == 10 and real["fid"] < 0.05 * one["fid"]
    assert one["classes_covered"] == 1 and one["diversity"] < 0.01 and one["recall"] < 0.05
    assert score.main([str(tmp_path / "nothing.npz"), "--dataset", "mnist", "--data-dir", data_dir]) == 2


def test_bench_quick_times_scripts_through_their_command_line(capsys):
    assert bench.main(["--quick", "--scripts", "gan", "--threads", "1", "--images", "64"]) == 0
    out = capsys.readouterr().out
    assert "| gan.py: img/s of one epoch (its metrics.csv) | " in out and "data.Batches vs DataLoader" in out
    assert "exit status" not in out and "Error" not in out


# ---- the README's tables against the code -----------------------------------------------------------------------------

def readme_rows(heading):
    """The rows of the README table under a line starting with heading, each a list of cells."""
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    table = text[text.index(heading):].split("\n\n")[1]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))] for line in table.splitlines()[2:]]


def same(cell, value):
    """A README cell's value (1e-3, 10, on, off, none, non-saturating, ...) against a parse_args default."""
    words = {"on": True, "off": False, "none": None}
    cell = cell.split(":")[0].split(",")[0].split(" ")[0].strip("`")
    if cell == str(value):
        return True
    if cell in words:
        return words[cell] is value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(cell) == value
    return cell == str(value)


def test_the_readmes_per_script_defaults_are_the_codes():
    rows = readme_rows("Per script (")
    assert [row[0].strip("`")[:-3] for row in rows] == SCRIPTS
    for script, epochs, batch_size, lr, latent_dim, width, own in rows:
        defaults = vars(importlib.import_module(script.strip("`")[:-3]).parse_args([]))
        for cell, key in [(epochs, "epochs"), (batch_size, "batch_size"), (lr, "lr"), (latent_dim, "latent_dim")]:
            assert same(cell, defaults[key]), (script, key, cell, defaults[key])
        assert same(width, defaults["width"]) if width != "-" else "width" not in defaults, (script, width)
        for flag, cell in re.findall(r"`--([\w-]+)` \(([^)]*)\)", lr + own):
            assert same(cell, defaults[flag.replace("-", "_")]), (script, flag, cell)


def test_the_readmes_common_defaults_are_every_scripts():
    cells = {row[0].split()[0].strip("`"): row[2] for row in readme_rows("## Flags (every training script)")}
    for script in SCRIPTS:
        defaults = vars(importlib.import_module(script).parse_args([]))
        for flag in ("--dataset", "--data-dir", "--seed", "--average-decay", "--augment", "--log-every"):
            cell = dict(re.findall(r"`(\w+)\.py`: ([\w.-]+)", cells[flag])).get(script, cells[flag])  # one's own
            assert same(cell, defaults[flag[2:].replace("-", "_")]), (script, flag)
        assert defaults["out"] == os.path.join("runs", script)
        if "preset" in defaults:
            assert defaults["preset"] == "cpu"


# ---- Stacked MNIST: data.py's stacked-mnist, score.py's modes -------------------------------------------------------

@pytest.fixture(scope="module")
def stacked_dir(tmp_path_factory):
    """A tiny MNIST of 10 bar digits whose test split is its own: 30 images with other noise."""
    root = make_tiny_mnist(tmp_path_factory.mktemp("stacked") / "data", n=200, num_classes=10)
    labels = np.arange(30) % 10
    write_idx(os.path.join(root, "mnist", "t10k-images-idx3-ubyte.gz"), bar_images(labels, num_classes=10, seed=5))
    write_idx(os.path.join(root, "mnist", "t10k-labels-idx1-ubyte.gz"), labels.astype(np.uint8))
    return root


@pytest.mark.parametrize("split", ["train", "test"])
def test_stacked_mnist_stacks_three_digits_of_the_split_as_rgb_labelled_by_their_mode(stacked_dir, split):
    digits = data.load_dataset("mnist", stacked_dir, split=split)
    stacked = data.load_dataset("stacked-mnist", stacked_dir, split=split)
    assert stacked.images.shape == (len(digits.images), 3, 28, 28) and stacked.images.dtype == torch.uint8
    assert stacked.classes == [f"{mode:03d}" for mode in range(1000)] and stacked.labels.max() < 1000
    label_of = {image.numpy().tobytes(): label for image, label in zip(digits.images[:, 0], digits.labels.tolist())}
    for image, mode in zip(stacked.images, stacked.labels.tolist()):  # each channel a digit of this split
        assert [label_of[channel.numpy().tobytes()] for channel in image] == [mode // 100, mode // 10 % 10, mode % 10]
    assert len(set(stacked.labels.tolist())) > len(stacked.labels) // 2  # drawn, not one digit thrice
    again = data.load_dataset("stacked-mnist", stacked_dir, split=split)
    assert torch.equal(again.images, stacked.images) and torch.equal(again.labels, stacked.labels)  # a fixed seed
    assert data.load_dataset("stacked-mnist", stacked_dir, split=split, image_size=32).images.shape[1:] == (3, 32, 32)
    assert data.load_data("stacked-mnist", stacked_dir, 28, split=split) is not None  # the scripts' held-out split


def test_stacked_mnist_trains_an_unconditional_conv_script_and_a_conditional_mlp(stacked_dir, tmp_path):
    for module, flags, shape in ((wgan_gp, TINY["wgan_gp"], (4, 28, 28, 3)), (cgan, TINY["cgan"], (4, 28, 28, 3))):
        assert run(module, tmp_path, stacked_dir, "--dataset", "stacked-mnist", "--epochs", 1, *flags,
                   out=module.__name__) == 0
        with open(tmp_path / module.__name__ / "metrics.csv") as f:
            row = next(csv.DictReader(f))
        assert all(row[k] != "" for k in row if "held_out" in k)  # the held-out split: stacked t10k digits
        assert run(module, tmp_path, stacked_dir, "--generate", 4, *(["--label", 123] if module is cgan else []),
                   out=module.__name__) == 0
        samples = np.load(tmp_path / module.__name__ / "samples.npz")
        assert samples["images"].shape == shape and (module is wgan_gp or samples["labels"].tolist() == [123] * 4)
    # cgan's grid: 10 rows of 10 (classes 000, 100, ..., 900), not a row for each of the 1,000 classes
    assert Image.open(tmp_path / "cgan" / "samples" / "epoch_001.png").size == (10 * 30 + 2,) * 2


def test_grid_classes_are_every_class_up_to_ten_rows_else_ten_spread_evenly():
    assert data.grid_classes(0).tolist() == [0]  # unconditional: one row
    assert data.grid_classes(4).tolist() == [0, 1, 2, 3]
    assert data.grid_classes(10).tolist() == list(range(10)) == data.grid_classes(12).tolist()
    assert data.grid_classes(1000).tolist() == list(range(0, 1000, 100))


def stacked_bars(modes, size=28):
    """uint8 [N, size, size, 3]: each mode's hundreds, tens and units as bar digits in R, G, B (size a multiple of
    28: each pixel repeated)."""
    modes, repeat = np.asarray(modes), size // 28
    images = np.stack([bar_images(modes // 10 ** p % 10, num_classes=10, seed=p) for p in (2, 1, 0)], -1)
    return images.repeat(repeat, 1).repeat(repeat, 2)


class BarReader(nn.Module):
    """A stand-in for score.py's MNIST classifier: reads bar_images' digit off the columns of the bar, exactly."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(28, 10)
        with torch.no_grad():
            self.head.weight.zero_(), self.head.bias.zero_()
            for digit in range(10):
                self.head.weight[digit, 2 + digit * 24 // 10:][:3] = 1.0

    def features(self, x):  # (B, 1, 28, 28) in [-1, 1] -> (B, 28) column means
        return x.mean(dim=(1, 2))


def test_reverse_kl_to_uniform_is_the_hand_computed_value():
    three = score.mode_scores(torch.tensor([7, 7, 400, 400, 999, 999]))
    assert three == {"modes_hit": 3, "reverse_kl": pytest.approx(math.log(1000 / 3))}
    assert score.mode_scores(torch.tensor([5] * 10))["reverse_kl"] == pytest.approx(math.log(1000))
    quarter = score.mode_scores(torch.tensor([1, 2, 2, 2]))["reverse_kl"]  # 1/4 ln 250 + 3/4 ln 750
    assert quarter == pytest.approx(0.25 * 5.521461 + 0.75 * 6.620073, abs=1e-5)


def test_score_counts_the_modes_of_stacked_samples_and_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    counts = {0: 1, 123: 2, 321: 3, 999: 4, 505: 5, 777: 6, 42: 9}  # 7 modes hit in 30 samples
    modes = [mode for mode, n in counts.items() for _ in range(n)]
    reference = {"classes": [str(d) for d in range(10)], "train_images": 200, "test_images": 30, "test_accuracy": 1.0,
                 "test_unsure": 0.0, "train_vs_test_fid": 0.0, "train_vs_test_kid": [0.0, 0.0],
                 "test_class_distance": torch.ones(10)}
    monkeypatch.setattr(score, "load_classifier", lambda name, *args, **kwargs: (BarReader(), reference, name))
    np.savez(tmp_path / "28.npz", images=stacked_bars(modes), labels=np.array(modes))
    np.savez(tmp_path / "56.npz", images=stacked_bars(modes, size=56))
    argv = [str(tmp_path / "28.npz"), str(tmp_path / "56.npz"), "--dataset", "stacked-mnist"]
    assert score.main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classifier"] == "mnist"  # the MNIST digits' classifier reads each channel
    for result in report["samples"].values():  # sum_k (c_k / 30) ln(1000 c_k / 30), by hand
        assert result["modes_hit"] == 7 and result["reverse_kl"] == pytest.approx(5.133227, abs=1e-5)
    assert report["samples"][argv[0]]["label_accuracy"] == 1.0
    assert score.main(argv + ["--modes-samples", "10"]) == 0  # the first 10: modes 0, 123, 321, 999
    assert "modes hit             4/1000" in capsys.readouterr().out
    np.savez(tmp_path / "gray.npz", images=stacked_bars(modes)[..., :1])
    np.savez(tmp_path / "labels.npz", images=stacked_bars(modes), labels=np.full(30, 1000))
    bad = {"3 channels": ["gray.npz"], "--codes": ["28.npz", "--codes"], "modes 0..999": ["labels.npz"],
           "0 is not a count": ["28.npz", "--modes-samples", "0"]}
    for message, (name, *flags) in bad.items():
        try:
            status = score.main([str(tmp_path / name), "--dataset", "stacked-mnist", *flags])
        except SystemExit as e:  # argparse's own exit
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and message in err, (message, err)
