"""Speed of every variant's training step and of FID, measured side by side, as one markdown table.

    python bench.py                              # the full table (several minutes on 2 CPU cores)
    python bench.py --quick                      # smoke run: every row, fewer steps, smaller FID inputs (< 1 min)
    python bench.py --device cuda --amp --compile

Training rows use each script's defaults (parse_args([]) and build_models) on synthetic MNIST-sized uint8 data
(60000 images, 28x28 for gan/cgan, 32x32 for dcgan/wgan_gp) and compare, in the same process, three ways to run
the same model: "ours", the body of the script's epoch loop (data.Batches slices, train_step, update_average, the
on-device metric sums); the tutorial way, a DataLoader over a Dataset that makes one PIL image per item and
normalises it; and the bare train_step on one fixed batch, which shows what the loop adds. Each figure is the median
of per-step rates after a warm-up; the three are interleaved in rounds so that a busy neighbour slows all alike.
Every variant runs in a fresh process so that its peak memory (VmHWM, or CUDA's max_memory_allocated) is its own.
"""
import argparse
import copy
import functools
import itertools
import multiprocessing
import os
import platform
import statistics
import sys
import time

import numpy as np
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

SCRIPTS = {"gan": gan, "cgan": cgan, "dcgan": dcgan, "wgan_gp": wgan_gp, "infogan": infogan, "acgan": acgan,
           "began": began, "lapgan": lapgan, "biggan": biggan,
           "stylegan": stylegan}
# Targets (issue 5). Feeding can only matter as much as it costs next to the step: more for the cheap MLP steps.
FEED_TARGET = {name: 2.0 if name in ("gan", "cgan") else 1.3 for name in SCRIPTS}
LOOP_OVERHEAD = 0.10  # the real loop may take at most 10% longer per step than train_step on a fixed batch
FID_SPEEDUP, FID_AGREEMENT = 10.0, 1e-6
NUM_IMAGES = 60000  # MNIST's training set


# ----------------------------------------------------------------------------------------------------------------
# One variant, set up the way its train() does it

def build_run(name, device, options):
    """Models, optimizers and step function exactly as the script's train() makes them, on synthetic data."""
    module = SCRIPTS[name]
    args = module.parse_args(["--device", str(device)] + ["--amp"] * options.amp + ["--compile"] * options.compile)
    size = 28 if name in ("gan", "cgan") else module.default_size(args)  # default_size: 32 for MNIST
    # Random pixels are fine for timing: nothing here depends on what the images show.
    dataset = data.Dataset(torch.randint(0, 256, (NUM_IMAGES, 1, size, size), dtype=torch.uint8),
                           torch.randint(0, 10, (NUM_IMAGES,)), classes=[str(k) for k in range(10)])
    torch.manual_seed(args.seed)
    conv = name not in ("gan", "cgan")
    G, D = (module.build_models(args, dataset.image_shape) if name in ("gan", "infogan", "began")
            else module.build_models(args, dataset.image_shape, dataset.num_classes))
    if conv and device.type == "cuda":  # as the conv scripts do on CUDA
        torch.backends.cudnn.benchmark = True
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G, D = G.to(device), D.to(device)
    opt_g, opt_d = module.make_optimizers(args, G, D)  # the script's own, so a change there is measured here
    # wgan_gp compiles G only: its critic is differentiated twice by the gradient penalty (so is D by R1).
    eager_d = name == "wgan_gp" or getattr(args, "r1_gamma", 0)
    G_fast, D_fast = (torch.compile(G), D if eager_d else torch.compile(D)) if args.compile else (G, D)
    if name == "stylegan" and args.compile:  # in place, as its train() does: its step calls G's parts by name
        G.synthesis.compile()
        G_fast, D_fast = G, D  # D stays eager: R1 differentiates it twice
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    scaler.amp = args.amp

    k = torch.zeros((), device=device)  # began's balance k_t, updated in place by its steps
    steps = itertools.count(1)  # stylegan's lazy regularisers fire on every 16th (R1) or 4th (path length) step

    def step(real, labels):  # the script's train_step call, with its own argument list
        if name == "infogan":
            return module.train_step(G_fast, D_fast, opt_g, opt_d, real, scaler, args.lambda_cat, args.lambda_cont)
        if name == "began":
            return module.train_step(G_fast, D_fast, opt_g, opt_d, real, k, args.latent_dim, args.gamma,
                                     args.lambda_k, scaler)
        if name == "acgan":
            return module.train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, scaler,
                                     args.class_weight)
        if name == "biggan":
            return module.train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, scaler,
                                     args.ortho_beta)
        if name == "lapgan":
            return module.train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, scaler)
        if name == "gan":
            return module.train_step(G_fast, D_fast, opt_g, opt_d, real, args.latent_dim, scaler, args.loss)
        if name == "wgan_gp":
            return module.train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, args.gp_weight,
                                     scaler)
        if name == "stylegan":
            return module.train_step(G_fast, D_fast, opt_g, opt_d, real, labels if args.conditional else None,
                                     args.latent_dim, scaler, next(steps), args.r1_gamma, args.style_mixing,
                                     args.pl_weight)
        if name == "dcgan":
            return module.train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, scaler, args.loss,
                                     args.r1_gamma)
        return module.train_step(G_fast, D_fast, opt_g, opt_d, real, labels, args.latent_dim, scaler, args.loss)

    return argparse.Namespace(name=name, module=module, args=args, device=device, dataset=dataset, G=G,
                              G_average=copy.deepcopy(G).requires_grad_(False), step=step,
                              conditional=name in ("cgan", "acgan", "biggan") or getattr(args, "conditional", False),
                              conv=conv)


def device_batches(run):
    """Ours: batches sliced from the uint8 dataset on the device, epoch after epoch."""
    batches = data.Batches(run.dataset, run.args.batch_size, run.device, seed=run.args.seed)
    for epoch in itertools.count(1):
        yield from batches.epoch(epoch)


class PILImages(torch.utils.data.Dataset):
    """The tutorial way: torchvision's MNIST (a PIL image per item), ToTensor, Normalize((0.5,), (0.5,)), by hand:
    the same tensor operations those transforms perform, so the per-item cost is theirs, not a strawman's."""

    def __init__(self, dataset):
        self.images = dataset.images[:, 0].numpy()  # [N, H, W] uint8, as torchvision's MNIST keeps them
        self.labels = dataset.labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index])  # mode "L"
        # ToTensor: HWC array copy -> CHW -> float / 255.
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).view(image.size[1], image.size[0], 1)
        x = x.permute(2, 0, 1).contiguous().to(dtype=torch.float32).div(255)
        # Normalize (not in place): a copy, mean and std as tensors, the zero-std check, then (x - mean) / std.
        mean, std = torch.as_tensor((0.5,), dtype=x.dtype), torch.as_tensor((0.5,), dtype=x.dtype)
        if (std == 0).any():
            raise ValueError("std of 0")
        return x.clone().sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1)), int(self.labels[index])


def tutorial_batches(run):
    loader = torch.utils.data.DataLoader(PILImages(run.dataset), batch_size=run.args.batch_size, shuffle=True)
    while True:
        for real, labels in loader:
            yield real.to(run.device), labels.to(run.device)


def script_inputs(run, batches):
    """What the script's loop hands to train_step: NHWC on CUDA for the conv models, None labels when unconditional,
    and for wgan_gp (biggan) lists of n_critic (d_steps) batches, one list per generator step."""
    batches = ((real.contiguous(memory_format=torch.channels_last) if run.conv and run.device.type == "cuda" else real,
                labels if run.conditional else None) for real, labels in batches)
    if run.name not in ("wgan_gp", "biggan"):
        return batches
    per_step = run.args.n_critic if run.name == "wgan_gp" else run.args.d_steps
    return (([real for real, _ in group], [labels for _, labels in group])
            for group in wgan_gp.critic_groups(batches, per_step))


def num_images(real):
    """Images per step as the scripts' img/s counts them: for wgan_gp (biggan), the real images of all n_critic
    (d_steps) batches."""
    return sum(len(r) for r in real) if isinstance(real, list) else len(real)


def training_loop(run, batches):
    """The body of the script's epoch loop, minus the progress line: same functions, same order."""
    totals = 0  # becomes the on-device sum of the step's metrics, as in the script
    for step, (real, labels) in enumerate(script_inputs(run, batches), 1):
        totals += run.step(real, labels)
        run.module.update_average(run.G_average, run.G, step, run.args.average_decay)
        if step % run.args.log_every == 0:
            (totals / step).tolist()  # the script's only sync, for its progress line
        yield num_images(real)


def fixed_batch_loop(run):
    """The same forward/backward/optimizer work with nothing around it: one batch made once and reused."""
    real, labels = next(script_inputs(run, device_batches(run)))
    return forever(lambda: run.step(real, labels), num_images(real))


def forever(fn, images):
    while True:
        fn()
        yield images


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA work is queued: a step is done when the device says so


def interleaved_rates(loops, device, warmup, rounds, steps):
    """Median images/s per loop (each a generator yielding images per step), the loops taking turns each round."""
    for loop in loops:
        for _ in range(warmup):  # first calls pick kernels and allocate; not what a long run sees
            next(loop)
    rates = [[] for _ in loops]
    for _ in range(rounds):
        for loop, loop_rates in zip(loops, rates):
            sync(device)
            last = time.perf_counter()
            for _ in range(steps):
                images = next(loop)
                sync(device)
                now = time.perf_counter()
                loop_rates.append(images / (now - last))
                last = now
    return [statistics.median(r) for r in rates]


def median_ms(fn, device, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open("/proc/self/status") as f:  # the process's high-water mark of resident memory
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measure_training(name, options):
    """All of one variant's figures. Runs in a fresh process: VmHWM only ever grows, so it must be this one's."""
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    baseline = peak_memory_mib(device)  # torch and the scripts imported, nothing built
    run = build_run(name, device, options)
    ours = training_loop(run, device_batches(run))
    for _ in range(options.warmup):
        next(ours)
    peak = peak_memory_mib(device)  # before the other loops add theirs
    tutorial, fixed = training_loop(run, tutorial_batches(run)), fixed_batch_loop(run)
    rates = interleaved_rates([ours, tutorial, fixed], device, options.warmup, options.rounds, options.steps)
    # Where the time goes: the loop's pieces alone, per step (ms).
    ours_inputs, tutorial_inputs = script_inputs(run, device_batches(run)), script_inputs(run, tutorial_batches(run))
    step = itertools.count(1)
    images = num_images(next(ours_inputs)[0])
    parts = {"batch": median_ms(lambda: next(ours_inputs), device, 3 * options.steps),
             "average": median_ms(lambda: run.module.update_average(run.G_average, run.G, next(step),
                                                                    run.args.average_decay), device, 3 * options.steps),
             "tutorial_batch": median_ms(lambda: next(tutorial_inputs), device, options.steps)}
    return {"name": name, "ours": rates[0], "tutorial": rates[1], "fixed": rates[2], "peak_mib": peak,
            "baseline_mib": baseline, "images": images, **parts}


def measure_frechet(options):
    """Seconds of fid.frechet_distance and of pytorch-fid's scipy route on the same statistics, and both values."""
    dims, samples = (256, 512) if options.quick else (2048, 4000)
    rng = np.random.default_rng(0)
    # Covariances of more samples than dimensions are well conditioned (eigenvalues ~0.08..2.9 at 4000 x 2048).
    first = rng.standard_normal((samples, dims))
    second = rng.standard_normal((samples, dims)) * rng.uniform(0.5, 1.5, dims) + rng.uniform(-0.1, 0.1, dims)
    mu1, sigma1, mu2, sigma2 = first.mean(0), np.cov(first, rowvar=False), second.mean(0), np.cov(second, rowvar=False)
    result = {"dims": dims, "ours": fid.frechet_distance(mu1, sigma1, mu2, sigma2),
              "ours_s": median_ms(lambda: fid.frechet_distance(mu1, sigma1, mu2, sigma2), torch.device("cpu"),
                                  1 if options.quick else 3) / 1000}
    try:
        import scipy.linalg
    except ImportError:
        return result
    start = time.perf_counter()  # one call: it takes long enough to time alone
    diff = mu1 - mu2  # pytorch-fid's formula, as it computes it (minus its retry with an offset on singular input)
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    reference = diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)
    return {**result, "scipy_s": time.perf_counter() - start, "scipy": float(reference)}


def measure_inception(options):
    """Images/s of Inception features, 28x28 grayscale uint8 resized to 299: fid.py's folded, channels-last network
    against the same random weights unfolded in the default layout (the plain pytorch-fid way)."""
    device, batch_size = torch.device(options.device), 2 if options.quick else 50
    torch.manual_seed(0)
    reference = fid.FIDInception().to(device).eval()
    ours = copy.deepcopy(reference)
    ours.prepare_for_inference()
    images = torch.randint(0, 256, (batch_size, 1, 28, 28), dtype=torch.uint8)
    plain = forever(torch.no_grad()(lambda: reference(images.to(device).float() / 255)), batch_size)
    optimised = forever(lambda: fid.batch_features(ours, images), batch_size)
    rates = interleaved_rates([optimised, plain], device, warmup=1, rounds=1 if options.quick else 3, steps=1)
    return {"ours": rates[0], "plain": rates[1], "batch_size": batch_size}


# ----------------------------------------------------------------------------------------------------------------
# The table

def step_rates(run, rank, world_size, steps):
    """Images/s of `steps` training steps, each on this process's share of a global batch, and the share of the time
    spent in average_gradients (the all-reduce; 0 in one process)."""
    in_allreduce = [0.0]
    average_gradients = run.module.average_gradients

    def timed_average(model):
        started = time.perf_counter()
        average_gradients(model)
        in_allreduce[0] += time.perf_counter() - started

    run.module.average_gradients = timed_average  # what the script's train_step calls
    batches = device_batches(run)
    started, images = time.perf_counter(), 0
    for i in range(2 + steps):
        if i == 2:  # after two warm-up steps
            in_allreduce[0], started, images = 0.0, time.perf_counter(), 0
        real, labels = next(batches)
        images += len(real)  # the global batch: what the run's img/s counts
        share = real.tensor_split(world_size)[rank], labels.tensor_split(world_size)[rank]
        run.step(*(x.contiguous() for x in share))
    seconds = time.perf_counter() - started
    run.module.average_gradients = average_gradients
    return images / seconds, in_allreduce[0] / seconds


def process_worker(rank, world_size, port, options, results):
    """One process of a torchrun-like group on the CPU: gloo on 127.0.0.1, one thread."""
    torch.set_num_threads(options.threads_per_process)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    rate, allreduce = step_rates(build_run(options.variant, torch.device("cpu"), options), rank, world_size,
                                 options.process_steps)
    results.put((rank, rate, allreduce))
    torch.distributed.destroy_process_group()


def measure_processes(options):
    """The variant's training on the CPU two ways with the same cores and the same global batch: one process with
    all the threads, or `--processes N` processes of one thread each (what torchrun --nproc_per_node N does), with
    the share of the step the processes spend averaging gradients."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with context.Pool(1, maxtasksperchild=1) as pool:  # one process, options.processes threads
        single = pool.apply(one_process_rate, (options,))
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [context.Process(target=process_worker, args=(rank, options.processes, port, options, results))
               for rank in range(options.processes)]
    for worker in workers:
        worker.start()
    shares = sorted(results.get(timeout=600) for _ in workers)
    for worker in workers:
        worker.join()
    return single, shares[0][1], max(allreduce for _, _, allreduce in shares)


def one_process_rate(options):
    torch.set_num_threads(options.processes)
    return step_rates(build_run(options.variant, torch.device("cpu"), options), 0, 1, options.process_steps)[0]


def machine_line(options):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    if options.device.startswith("cuda"):
        cpu += f", GPU {torch.cuda.get_device_name(torch.device(options.device))}"
    flags = " ".join(f"--{flag}" for flag in ("amp", "compile", "quick") if getattr(options, flag))
    # Thread settings from the environment change every figure (e.g. scipy's BLAS threads): part of the machine.
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                   if k in os.environ)
    return (f"Machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads"
            f"{' (' + env + ')' if env else ''}; device {options.device}{'; ' + flags if flags else ''}")


def verdict(met):
    return "yes" if met else "**NO**"


def table_rows(results, frechet, inception):
    rows = []  # (figure, ours, reference, speed-up, target, met?)
    for r in results:
        name, ratio, loop = r["name"], r["ours"] / r["tutorial"], r["ours"] / r["fixed"]
        rows.append((f"{name}: img/s, ours vs DataLoader + PIL", f"{r['ours']:.0f}", f"{r['tutorial']:.0f}",
                     f"{ratio:.2f}x", f">= {FEED_TARGET[name]}x", verdict(ratio >= FEED_TARGET[name])))
        rows.append((f"{name}: img/s, real loop vs fixed batch", f"{r['ours']:.0f}", f"{r['fixed']:.0f}",
                     f"{loop:.2f}x", f">= {1 / (1 + LOOP_OVERHEAD):.2f}x (<= {LOOP_OVERHEAD:.0%} slower)",
                     verdict(loop >= 1 / (1 + LOOP_OVERHEAD))))
        rows.append((f"{name}: peak memory of training, MiB (process / above import)",
                     f"{r['peak_mib']:.0f} / {r['peak_mib'] - r['baseline_mib']:.0f}", "", "", "-", "-"))
    timing, agreement = (f"FID {frechet['dims']}-d: seconds, frechet_distance vs scipy sqrtm",
                         f"FID {frechet['dims']}-d: relative difference of the two values")
    if "scipy" in frechet:
        speedup = frechet["scipy_s"] / frechet["ours_s"]
        difference = abs(frechet["ours"] - frechet["scipy"]) / abs(frechet["scipy"])
        rows.append((timing, f"{frechet['ours_s']:.3f}", f"{frechet['scipy_s']:.3f}", f"{speedup:.1f}x",
                     f">= {FID_SPEEDUP:.0f}x", verdict(speedup >= FID_SPEEDUP)))
        rows.append((agreement, f"{difference:.1e}", "", "", f"<= {FID_AGREEMENT:.0e}",
                     verdict(difference <= FID_AGREEMENT)))
    else:  # the rows stay, saying why they are empty
        rows.append((timing, f"{frechet['ours_s']:.3f}", "scipy not installed", "", f">= {FID_SPEEDUP:.0f}x",
                     "skipped"))
        rows.append((agreement, "", "scipy not installed", "", f"<= {FID_AGREEMENT:.0e}", "skipped"))
    rows.append((f"Inception features: img/s, batch {inception['batch_size']}, 28x28 -> 299, folded+NHWC vs plain",
                 f"{inception['ours']:.1f}", f"{inception['plain']:.1f}",
                 f"{inception['ours'] / inception['plain']:.2f}x", "-", "-"))
    return rows


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like the training scripts (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv):
    p = ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer steps, 256-d FID, Inception batch of 2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="the scripts' --amp: float16 + loss scaling on CUDA, "
                                                     "bfloat16 on CPU")
    p.add_argument("--compile", action="store_true", help="the scripts' --compile: torch.compile G and D")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice, shown in the header)")
    p.add_argument("--variants", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS), help="default: all")
    p.add_argument("--processes", type=int, metavar="N", help="instead of the table: --variant's img/s on the CPU as "
                   "one process with N threads vs N gloo processes of one thread (torchrun's way), and the share "
                   "of a step spent in the gradient all-reduce")
    p.add_argument("--variant", default="dcgan", choices=list(SCRIPTS), help="with --processes (default dcgan)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be at least 1")
    if args.processes is not None and args.processes < 2:
        p.error(f"--processes {args.processes}: must be at least 2")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch {torch.__version__} sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: only cpu and cuda are supported")
    # Full: 24 timed steps per loop, in 6 rounds of 4: short turns, so a neighbour's burst of load hits all loops.
    args.warmup, args.rounds, args.steps = (2, 1, 3) if args.quick else (5, 6, 4)
    args.process_steps, args.threads_per_process = (3 if args.quick else 30), 1
    return args


def main(argv=None):
    options = parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    started = time.perf_counter()
    if options.processes:
        single, several, allreduce = measure_processes(options)
        batch = SCRIPTS[options.variant].parse_args([]).batch_size
        print(machine_line(options))
        print()
        print(markdown(("figure", "value"), [
            (f"{options.variant}: img/s, 1 process x {options.processes} threads", f"{single:.0f}"),
            (f"{options.variant}: img/s, {options.processes} gloo processes x 1 thread (torchrun)", f"{several:.0f}"),
            ("share of a step in the gradient all-reduce (slowest process)", f"{allreduce:.1%}"),
        ]))
        print(f"\nGlobal batch {batch}, {options.process_steps} timed steps each, CPU. bench.py took "
              f"{time.perf_counter() - started:.0f} s")
        return 0
    # A fresh process per variant ("spawn": nothing inherited) so each peak memory figure is that variant's own.
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        results = pool.map(functools.partial(measure_training, options=options), options.variants, chunksize=1)
    frechet, inception = measure_frechet(options), measure_inception(options)

    print(machine_line(options))
    print()
    print(markdown(("figure", "ours", "reference", "speed-up", "target", "met?"),
                   table_rows(results, frechet, inception)))
    print()
    print("Where a step's time goes, ms per step (medians; each piece timed alone):")
    print()
    print(markdown(("variant", "img/step", "real loop", "fixed-batch train_step", "data.Batches batch",
                    "update_average", "DataLoader + PIL batch"), [
        (r["name"], str(r["images"]), *(f"{ms:.2f}" for ms in (1000 * r["images"] / r["ours"],
                                                               1000 * r["images"] / r["fixed"], r["batch"],
                                                               r["average"], r["tutorial_batch"])))
        for r in results]))
    print()
    print("img/s counts real images as the scripts' img/s does: wgan_gp's step is one generator step with its "
          "n_critic critic steps, counted as n_critic x batch-size images. Peak memory: VmHWM of the variant's own "
          "process, and above its level once torch and the scripts are imported (this part includes the 60000-image "
          "uint8 dataset, 45-59 MiB, and modules torch loads on first use), or max_memory_allocated on CUDA.")
    print(f"bench.py took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
