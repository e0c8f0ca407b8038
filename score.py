"""Score generated images from outside, with a small CNN classifier trained on the real data (not the GAN's own D).

A feature FID, KID and precision/recall (on the classifier's 128 penultimate-layer features, like the same metrics on
Inception features but cheap and in-domain; computed by fid.py's functions), how sure the classifier is, which classes
come out and how often, and, for conditional models, whether the image shows the class that was asked for and how
varied each class is.

    python score.py runs/gan/samples.npz --dataset mnist --data-dir DIR                 # from gan.py --generate 5000
    python score.py runs/dcgan runs/dcgan-cond --dataset fashion-mnist --json           # run folders, one JSON object
    python score.py runs/infogan --dataset mnist --codes                               # labels are InfoGAN codes
    python score.py runs/dcgan-stacked --dataset stacked-mnist                         # modes hit of 1,000, KL

The first call per dataset trains the classifier on the real training split (a minute or two on 2 cores, fixed seed)
and caches it, with the real test split's statistics and features, in <dataset folder>/classifier_<name>.pt
(~/.cache/gan-score/ if that folder is read-only; a cache is read from either); later calls only classify the
samples. Numbers to compare against are printed beside them: the classifier's accuracy and unsure share on real test
images, and FID, KID and precision/recall of real train vs real test images. KID takes all samples against all test
images; precision and recall, which depend on N, take the same number per side (the smaller of the two, a fixed
random subset of the test split).

Stacked MNIST (docs/modes.md): each channel of each sample is read by the MNIST classifier; modes hit of 1,000 and the
reverse KL(samples || uniform) are counted on the first 26,000 samples (--modes-samples), as VEEGAN and PacGAN do.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from fid import KID_SUBSETS, PRC_K, frechet_distance, kernel_inception_distance, kid_subset_size, precision_recall

SCRIPT = os.path.basename(__file__)
CLASSIFIER_VERSION = 1  # bump when the network or its training changes: cached classifiers are then retrained
TRAIN_IMAGES = 100_000  # images the classifier sees in training, in at least MIN_EPOCHS: 10 epochs of 10k MNIST
MIN_EPOCHS = 3  # 3 of Fashion-MNIST's 60k: 90% on its test split (2 give 89.9%)
UNSURE_BELOW = 0.9  # a top softmax probability below this counts as "unsure"
COVERED_SHARE = 0.01  # a class counts as covered when at least this share of the samples falls in it
PER_CLASS = 500  # images per class for the within-class pairwise distances (500 give ~125k pairs)
SIZE = 28  # every image is classified at 28x28
FEATURES = "classifier 128-d, gray 28x28"  # the protocol's feature layer and resize (antialiased bilinear)
MODES_SAMPLES = 26_000  # Stacked MNIST: samples whose modes are counted, the usual protocol


class Classifier(nn.Module):
    """28x28 gray image -> 10 logits; features() is the 128-d layer before the last one, the space FID is taken in.

    Two stride-2 convolutions with BatchNorm: ~1.5M multiply-adds per image, so it trains in a minute or two on a
    CPU and reaches ~98% on MNIST test from the 10k subset, ~90% on Fashion-MNIST."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, stride=2, padding=2, bias=False),  # (B, 32, 14, 14)
            nn.BatchNorm2d(32, momentum=0.1), nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1, bias=False),  # (B, 64, 7, 7)
            nn.BatchNorm2d(64, momentum=0.1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())  # (B, 128)
        self.dropout = nn.Dropout(p=0.3)  # training only: features() stays deterministic
        self.head = nn.Linear(128, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))


class UsageError(Exception):
    """Bad flags or an unusable samples file: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Images in

def to_input(images):
    """uint8 [N, C, H, W] (C = 1 or 3, any H, W) -> float [N, 1, 28, 28] in [-1, 1], the classifier's input.

    Colour becomes gray (ITU-R 601 luma); other sizes are resized with antialiased bilinear, as data.py does."""
    x = images.float()
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.div_(127.5).sub_(1.0)


def load_samples(path):
    """An .npz from a script's --generate (or a run folder holding samples.npz) -> (uint8 [N, C, H, W], labels|None)."""
    if os.path.isdir(path):
        path = os.path.join(path, "samples.npz")
    if not os.path.isfile(path):
        raise UsageError(f"no samples at {path}: write them with the script's --generate N")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files if key in ("images", "labels")}
    except (OSError, ValueError, EOFError) as e:  # not a zip, truncated, pickled objects
        raise UsageError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    images, labels = arrays.get("images"), arrays.get("labels")
    if images is None:
        raise UsageError(f"{path} has no 'images' array (expected uint8 [N, H, W, C] from --generate)")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UsageError(f"{path}: 'images' is {images.dtype} {list(images.shape)}, expected uint8 [N, H, W, C] "
                         f"with C 1 or 3")
    if len(images) < 2:
        raise UsageError(f"{path} holds {len(images)} image(s); a distance between distributions needs at least 2")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu"):
        raise UsageError(f"{path}: 'labels' is {labels.dtype} {list(labels.shape)}, expected integers [{len(images)}]")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return images, None if labels is None else torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# The classifier: trained once per dataset, cached with the real test split's statistics

def fingerprint(dataset):
    """A short hash of the training images and labels: a cached classifier is reused only for the same data."""
    digest = hashlib.md5(dataset.images.numpy().tobytes())
    digest.update(dataset.labels.numpy().tobytes())
    digest.update(f"v{CLASSIFIER_VERSION} e{classifier_epochs(len(dataset.images))}".encode())
    return digest.hexdigest()[:16]


def classifier_epochs(num_images):
    return max(MIN_EPOCHS, math.ceil(TRAIN_IMAGES / num_images))


def train_classifier(dataset, seed=0, batch_size=128, lr=1e-3, log=print):
    """Adam with a linear decay to 0 over classifier_epochs(N), fixed seed; no augmentation, so that the features
    stay sensitive to what a generator gets wrong (a digit off-centre, a broken stroke)."""
    torch.manual_seed(seed)
    model = Classifier(dataset.num_classes)
    batches = data.Batches(dataset, batch_size, "cpu", seed=seed)  # named datasets: 28x28 gray already
    epochs = classifier_epochs(len(dataset.images))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    start = time.time()
    model.train()
    for epoch in range(epochs):
        for real, labels in batches.epoch(epoch):
            loss = F.cross_entropy(model(real), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {time.time() - start:.0f} s")
    return model.eval()


@torch.no_grad()
def classify(model, images, batch_size=1000):
    """uint8 [N, C, H, W] -> (features float [N, 128], softmax probabilities [N, classes])."""
    features, probs = [], []
    for chunk in images.split(batch_size):
        f = model.features(to_input(chunk))
        features.append(f)
        probs.append(F.softmax(model.head(f), dim=1))
    return torch.cat(features), torch.cat(probs)


def statistics(features):
    """Mean and unbiased covariance in float64, as FID takes them."""
    x = features.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def within_class_distance(features, groups, num_classes, per_class=PER_CLASS, seed=0):
    """Mean pairwise Euclidean feature distance inside each group (up to per_class random members); NaN where a group
    has fewer than two. A class drawn as one image repeated scores 0."""
    generator = torch.Generator().manual_seed(seed)
    distances = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    for k in range(num_classes):
        members = features[groups == k]
        if len(members) > per_class:
            members = members[torch.randperm(len(members), generator=generator)[:per_class]]
        if len(members) >= 2:
            pairwise = torch.cdist(members.double(), members.double())
            distances[k] = pairwise.sum() / (len(members) * (len(members) - 1))  # the diagonal is 0
    return distances


def reference_statistics(model, train, test):
    """What real images score: the figures that samples are compared against."""
    test_features, test_probs = classify(model, test.images)
    train_features, _ = classify(model, train.images)
    mu, sigma = statistics(test_features)
    return {
        "test_images": len(test.images),
        "train_images": len(train.images),
        "test_accuracy": (test_probs.argmax(1) == test.labels).double().mean().item(),
        "test_unsure": (test_probs.max(1).values < UNSURE_BELOW).double().mean().item(),
        "train_vs_test_fid": frechet_distance(*statistics(train_features), mu, sigma),
        "test_mu": mu, "test_sigma": sigma,
        "test_class_distance": within_class_distance(test_features, test.labels, test.num_classes),
        "classes": list(test.classes),
        **real_features(model, train, test),
    }


def real_features(model, train, test, seed=0):
    """What KID and precision/recall compare against: the test split's features, those of a random subset of the
    training split as large as the test split (for the real train vs test figures), and KID real train vs test."""
    test_features, _ = classify(model, test.images)
    kept = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(seed))[:len(test.images)]
    train_features, _ = classify(model, train.images[kept])
    size = kid_subset_size(len(train_features), len(test_features))
    return {"test_features": test_features, "train_features": train_features,
            "train_vs_test_kid": list(kernel_inception_distance(train_features, test_features, KID_SUBSETS, size))}


def cache_paths(dataset, name):
    """(where the classifier is looked for, where it is cached): next to the data and in ~/.cache/gan-score; cached
    next to the data unless that folder exists and is read-only (by its permission bits, which root too should
    respect), then in ~/.cache/gan-score."""
    fallback = os.path.join(os.path.expanduser("~"), ".cache", "gan-score")
    folders = [folder for folder in (dataset.cache_dir, fallback) if folder]
    writable = folders
    if os.path.isdir(dataset.cache_dir) and not os.stat(dataset.cache_dir).st_mode & 0o222:
        writable = [fallback]
    return ([os.path.join(folder, f"classifier_{name}.pt") for folder in folders],
            [os.path.join(folder, f"classifier_{name}.pt") for folder in writable])


def save_cached(state, paths):
    """Write to the first folder that takes it (temporary file, then rename); returns the path or None."""
    for path in paths:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    return None


def load_cached(paths, key):
    """The first cached state whose fingerprint matches key, one holding the real features if any does (None if
    there is none)."""
    found = []
    for path in paths:
        try:
            state = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):  # absent, or a half-written or foreign file
            continue
        if isinstance(state, dict) and state.get("fingerprint") == key:
            found.append((state, path))
    complete = [(state, path) for state, path in found if "test_features" in state["reference"]]
    return (complete + found + [(None, None)])[0]


def load_classifier(name, data_dir, log=print):
    """(model, reference statistics, cache path): from the cache, or trained now on the training split and cached."""
    train = data.load_dataset(name, data_dir, split="train")
    paths, writable = cache_paths(train, name)
    key = fingerprint(train)
    state, path = load_cached(paths, key)
    if state is None:
        test = data.load_dataset(name, data_dir, split="test", download=False)
        log(f"training the {name} classifier on {len(train.images)} images (once; cached afterwards)")
        model = train_classifier(train, log=log)
        state = {"fingerprint": key, "model": model.state_dict(), "reference": reference_statistics(model, train, test)}
        path = save_cached(state, writable)
        if path is None:
            log(f"warning: could not cache the classifier in {' or '.join(os.path.dirname(p) for p in writable)}")
    model = Classifier(len(state["reference"]["classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    if "test_features" not in state["reference"]:  # cached before KID and precision/recall: add what they need
        test = data.load_dataset(name, data_dir, split="test", download=False)
        state["reference"].update(real_features(model, train, test))
        path = save_cached(state, writable) or path
    return model, state["reference"], path


# ----------------------------------------------------------------------------------------------------------------
# Scores

def best_assignment(counts):
    """counts[code, class] -> (class for each code, -1 if none; matches): the one-to-one assignment of codes to
    classes that agrees with the most samples. Exact, by dynamic programming over the subsets of classes taken."""
    num_codes, num_classes = counts.shape
    masks = np.arange(1 << num_classes)
    best = np.where(masks == 0, 0, -1)  # best[mask]: most matches with exactly the classes in mask taken
    choices = []
    for code in range(num_codes):
        new, choice = best.copy(), np.full(len(masks), -1)  # default: this code gets no class
        for k in range(num_classes):
            free = masks[((masks >> k) & 1 == 0) & (best >= 0)]
            gain = best[free] + counts[code, k]
            better = gain > new[free | (1 << k)]
            new[(free | (1 << k))[better]] = gain[better]
            choice[(free | (1 << k))[better]] = k
        best = new
        choices.append(choice)
    mask = int(np.argmax(best))
    assignment = [-1] * num_codes
    for code in reversed(range(num_codes)):
        k = int(choices[code][mask])
        if k >= 0:
            assignment[code] = k
            mask &= ~(1 << k)
    return assignment, int(best.max())


def score_samples(model, reference, images, labels, codes=False):
    """Every figure for one set of samples, as a dict (JSON-ready)."""
    num_classes = len(reference["classes"])
    features, probs = classify(model, images)
    predicted = probs.argmax(1)
    histogram = torch.bincount(predicted, minlength=num_classes).double() / len(images)
    result = {
        "images": len(images),
        "size": list(images.shape[1:]),
        "protocol": f"{len(images)} samples vs {reference['test_images']} real test images (reference), {FEATURES}",
        "fid": frechet_distance(*statistics(features), reference["test_mu"], reference["test_sigma"]),
        **distribution_scores(features, reference),
        "unsure": (probs.max(1).values < UNSURE_BELOW).double().mean().item(),
        "class_shares": [round(v, 4) for v in histogram.tolist()],
        "classes_covered": int((histogram >= COVERED_SHARE).sum()),
        "rarest_class": int(histogram.argmin()),
        "rarest_share": histogram.min().item(),
    }
    if codes and labels is None:
        raise UsageError("--codes: these samples have no labels (codes) to compare with")
    if labels is not None and codes:
        values, code_index = torch.unique(labels, return_inverse=True)
        counts = np.zeros((len(values), num_classes), np.int64)
        np.add.at(counts, (code_index.numpy(), predicted.numpy()), 1)
        assignment, matches = best_assignment(counts)
        result["code_to_class"] = {int(v): k for v, k in zip(values, assignment)}
        result["code_agreement"] = matches / len(images)
    elif labels is not None:
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UsageError(f"labels {labels.min().item()}..{labels.max().item()} are not classes 0..{num_classes - 1}"
                             f" (for InfoGAN codes use --codes)")
        result["label_accuracy"] = (predicted == labels).double().mean().item()
        per_class = [(predicted[labels == k] == k).double().mean().item() for k in range(num_classes)
                     if (labels == k).any()]
        result["worst_label_accuracy"] = min(per_class)
    requested = labels is not None and not codes
    groups = labels if requested else predicted
    distances = within_class_distance(features, groups, num_classes)
    present = ~distances.isnan()
    real = reference["test_class_distance"]
    result["diversity_grouped_by"] = "requested label" if requested else "predicted class"
    result["diversity"] = (distances[present].mean() / real[present].mean()).item() if present.any() else 0.0
    return result


def distribution_scores(features, reference, seed=0):
    """KID of all samples against all real test images, and precision/recall (k = 3) with the same number of images
    per side, for the samples and for real training images: precision/recall depend on N, so like is compared with
    like. fid.py's functions, on the classifier's features."""
    test, train = reference["test_features"], reference["train_features"]
    size = kid_subset_size(len(features), len(test))
    mean, std = kernel_inception_distance(features, test, KID_SUBSETS, size)
    scores = {"kid": {"mean": mean, "std": std, "subsets": KID_SUBSETS, "subset_size": size},
              "prc_k": PRC_K, "prc_images": min(len(features), len(test), len(train))}
    n = scores["prc_images"]
    if n <= PRC_K:  # k nearest other images need at least k + 1 per side
        return {**scores, "precision": None, "recall": None, "train_vs_test_precision": None,
                "train_vs_test_recall": None}
    real = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]]
    scores["precision"], scores["recall"] = precision_recall(real, features[:n], PRC_K)
    scores["train_vs_test_precision"], scores["train_vs_test_recall"] = precision_recall(real, train[:n], PRC_K)
    return scores


def read_modes(model, images):
    """uint8 [N, 3, H, W] -> each image's mode, 100 x the R channel's digit + 10 x G's + B's, each read alone."""
    digits = [classify(model, images[:, c:c + 1])[1].argmax(1) for c in range(3)]
    return 100 * digits[0] + 10 * digits[1] + digits[2]


def mode_scores(modes, num_modes=1000):
    """Modes hit, and the reverse KL(q || uniform) = sum_k q_k log(q_k num_modes) over the modes hit, q the samples'
    mode histogram (VEEGAN, PacGAN): 0 when all modes come equally often, log(num_modes) when one takes them all."""
    q = torch.bincount(modes, minlength=num_modes).double() / len(modes)
    q = q[q > 0]
    return {"modes_hit": len(q), "reverse_kl": (q * (q * num_modes).log()).sum().item()}


def score_modes(model, images, labels, num_samples=MODES_SAMPLES):
    """Stacked MNIST's figures for the first num_samples samples; with labels, the share whose mode is the one asked."""
    images, labels = images[:num_samples], None if labels is None else labels[:num_samples]
    modes = read_modes(model, images)
    result = {"images": len(images), "size": list(images.shape[1:]), **mode_scores(modes),
              "protocol": f"modes of {len(images)} samples (usual {MODES_SAMPLES}), each channel read at 28x28"}
    if labels is not None:
        if labels.min() < 0 or labels.max() >= 1000:
            raise UsageError(f"labels {labels.min().item()}..{labels.max().item()} are not modes 0..999")
        result["label_accuracy"] = (modes == labels).double().mean().item()
    return result


def format_report(dataset, path, reference, results):
    """The human-readable report: real reference first, then one block per samples file."""
    classes = reference["classes"]
    lines = [f"classifier: {path or '(not cached)'}, trained on {reference['train_images']} {dataset} "
             f"training images",
             f"real test images ({reference['test_images']}): accuracy {100 * reference['test_accuracy']:.1f}%, "
             f"unsure {100 * reference['test_unsure']:.1f}%; feature FID real train vs test "
             f"{reference['train_vs_test_fid']:.2f}, KID {kid_text(reference['train_vs_test_kid'])}"]
    for source, r in results.items():
        size = "x".join(str(s) for s in r["size"][1:]) + f"x{r['size'][0]}"
        if "modes_hit" in r:
            lines += [f"{source}: {r['images']} images {size}", f"  protocol              {r['protocol']}",
                      f"  modes hit             {r['modes_hit']}/1000   (the classifier reads real test digits "
                      f"{100 * reference['test_accuracy']:.1f}% right)",
                      f"  reverse KL            {r['reverse_kl']:.3f}   (to uniform; 0 = every mode equally often)"]
            if "label_accuracy" in r:
                lines.append(f"  requested mode        {100 * r['label_accuracy']:.1f}% recognised")
            continue
        shares = " ".join(f"{k}:{100 * s:.1f}" for k, s in enumerate(r["class_shares"]))
        lines += [f"{source}: {r['images']} images {size}",
                  f"  protocol              {r['protocol']}",
                  f"  feature FID vs test   {r['fid']:.2f}   (real train vs test {reference['train_vs_test_fid']:.2f})",
                  f"  feature KID vs test   {kid_text((r['kid']['mean'], r['kid']['std']))}   (real train vs test "
                  f"{kid_text(reference['train_vs_test_kid'])}; {r['kid']['subsets']} subsets of "
                  f"{r['kid']['subset_size']})",
                  f"  precision, recall     {prc_text(r['precision'], r['recall'])}   (real train vs test "
                  f"{prc_text(r['train_vs_test_precision'], r['train_vs_test_recall'])}; k={r['prc_k']}, "
                  f"{r['prc_images']} per side)",
                  f"  unsure                {100 * r['unsure']:.1f}%   "
                  f"(real test {100 * reference['test_unsure']:.1f}%)",
                  f"  classes (%)           {shares}",
                  f"  covered               {r['classes_covered']}/{len(classes)} classes >= "
                  f"{100 * COVERED_SHARE:.0f}%; rarest {r['rarest_class']} ({classes[r['rarest_class']]}) "
                  f"{100 * r['rarest_share']:.1f}%"]
        if "label_accuracy" in r:
            lines.append(f"  requested class       {100 * r['label_accuracy']:.1f}% recognised, worst class "
                         f"{100 * r['worst_label_accuracy']:.1f}%   (real test accuracy "
                         f"{100 * reference['test_accuracy']:.1f}%)")
        if "code_agreement" in r:
            mapping = " ".join(f"{code}->{k}" for code, k in r["code_to_class"].items())
            lines.append(f"  codes                 {100 * r['code_agreement']:.1f}% agree with the best one-to-one "
                         f"mapping {mapping}")
        lines.append(f"  within-class diversity {r['diversity']:.2f} of real (by {r['diversity_grouped_by']})")
    return "\n".join(lines)


def kid_text(kid):
    return f"{kid[0]:.4g} ± {kid[1]:.3g}"


def prc_text(precision, recall):
    return "n/a" if precision is None else f"{precision:.3f}, {recall:.3f}"


# ----------------------------------------------------------------------------------------------------------------
# Command line

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def count(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a count of at least 1")
    return int(text)


def parse_args(argv):
    p = ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="+", metavar="SAMPLES", help="an .npz from --generate, or a run folder holding "
                                                                 "samples.npz")
    p.add_argument("--dataset", required=True, choices=list(data.DATASETS), help="the real data the samples imitate")
    p.add_argument("--data-dir", default="data", help="where named datasets are found or downloaded (default data)")
    p.add_argument("--codes", action="store_true", help="the npz labels are InfoGAN codes, not requested classes: "
                                                        "report the best one-to-one code-to-class agreement")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--modes-samples", type=count, default=MODES_SAMPLES, metavar="N",
                   help=f"stacked-mnist: count the modes of the first N samples (default {MODES_SAMPLES:,})")
    return p.parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        samples = {path: load_samples(path) for path in args.samples}  # bad files fail before any training
        stacked = data.DATASETS[args.dataset].get("stacks")  # the classifier's dataset, for Stacked MNIST
        for source, (images, _) in samples.items() if stacked else ():
            if images.shape[1] != 3 or args.codes:
                raise UsageError("--codes is not for stacked-mnist" if args.codes else
                                 f"{source}: {args.dataset} samples need 3 channels (a digit in each), not 1")
        log = (lambda message: print(message, file=sys.stderr)) if args.json else print
        model, reference, path = load_classifier(stacked or args.dataset, args.data_dir, log=log)
        results = {source: score_modes(model, images, labels, args.modes_samples) if stacked else
                   score_samples(model, reference, images, labels, args.codes)
                   for source, (images, labels) in samples.items()}
    except (data.DataError, UsageError) as e:
        print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{SCRIPT}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        summary = {k: v for k, v in reference.items() if not torch.is_tensor(v)}
        summary["test_class_distance"] = reference["test_class_distance"].tolist()
        print(json.dumps({"dataset": args.dataset, "classifier": path, "real": summary, "samples": results}))
    else:
        print(format_report(stacked or args.dataset, path, reference, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
