from common import *  # noqa: F401,F403

import hashlib
import http.server
import functools
import io
import json
import math
import subprocess
import threading
import zlib
from pathlib import Path

import bench
import data
import fid
import score
from PIL import Image

HERE = Path(__file__).resolve().parent.parent
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
