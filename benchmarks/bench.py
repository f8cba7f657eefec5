"""Speed benchmark: one warm-up and one DivideMix epoch, timed per phase, against the official-style pipeline.

Runs from a checkout of the repository (it is not part of the installed package):

    python benchmarks/bench.py --width 16 --images 5000          # or, from the repository root:
    cdmix bench --width 16 --images 5000
    python benchmarks/bench.py --source subset --images 5551 --markdown docs/RESULTS_speed.md

What it measures, all in one process:

* **cdmix**: the real ``DivideMix`` method built by the real ``Trainer`` on a CIFAR-shaped dataset
  (random uint8 images, or the real CIFAR-10 subset tiled up to ``--images``) with 50% symmetric
  noise: one warm-up epoch, then one DivideMix epoch (divide, train net1, train net2) and the test
  pass. Every forward call of the two nets is recorded (shape, train/eval mode, grad or not).
* **pure model compute**: the recorded calls replayed on pre-built random batches of the same
  shapes (same count, same modes, a backward + optimizer step after every grad forward), so
  ``epoch / pure compute`` is the overhead of everything that is not the model.
* **data path**: augmented images per second of cdmix's batch assembly (gather, crop, flip,
  normalise on the device) against the official per-sample Dataset + DataLoader.
* **reference**: ``reference_pipeline.py`` (next to this file), the official code's structure, for
  the same model and the same number and shapes of steps.

Estimated TFLOP/s count FLOPs (``measure.count_flops``) with forward+backward = 3x forward. Prints
the table to stdout; ``--out FILE`` writes it (markdown, or JSON when FILE ends in .json),
``--markdown FILE`` appends it to a markdown file. The timing tools live in ``measure.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling modules, however this file was loaded
    sys.path.insert(0, str(HERE))
try:
    import cdmix  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))

from measure import (  # noqa: E402
    Call, CallRecorder, PhaseTimer, clock, count_flops, cuda_peak_mib, load_average, machine_info, peak_memory,
    phase_stats, prime, replay, reset_peak, restore, set_clock, snapshot, sync,
)

from cdmix.errors import UserError  # noqa: E402

PHASES = ("warm-up epoch", "divide", "train net1", "train net2", "test")
EPOCH_PHASES = ("divide", "train net1", "train net2", "test")
REFERENCE_FILE = HERE / "reference_pipeline.py"
SUBSET_RELATIVE = Path("shared") / "data" / "cifar10-subset" / "cifar10_subset.npz"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
TARGET_COMPUTE_RATIO = 1.2
TARGET_DATA_PATH = 5.0


# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    model: str = "preact_resnet18"
    width: int | None = 16
    images: int = 5000
    batch_size: int = 64
    device: str = "auto"
    source: str = "random"  # random | subset
    subset_path: str | None = None
    steps: int | None = None  # cap on the training steps of each training phase
    reference: bool = True
    reference_compute: bool = False  # also replay the reference's forwards (its own overhead ratio)
    clock: str = "wall"  # wall | cpu (this thread's CPU time: needs --threads 1 --workers 0)
    profile: int = 0  # > 0: one more DivideMix epoch under torch.profiler, print the top N ops
    replay_calls: int = 8  # pure compute: calls timed per distinct kind and phase (0: replay every call)
    compile: bool = False
    fast: bool = False
    amp: bool | None = None  # None: cdmix's default (bf16 autocast on CUDA only)
    channels_last: bool | None = None  # None: cdmix's default (on CUDA only)
    classes: int = 10
    workers: int | None = None  # reference DataLoader workers; None: min(5, CPU count)
    eval_batch_size: int | None = None  # None: cdmix's default (1024 on CUDA, 64 on CPU)
    threads: int | None = None  # torch intra-op threads; None: torch's default
    seed: int = 0
    out: str | None = None
    command: str = ""

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return min(5, os.cpu_count() or 1)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="preact_resnet18", help="model name (default preact_resnet18)")
    p.add_argument("--width", type=int, default=16, help="model width (default 16; 64 = the paper's)")
    p.add_argument("--images", type=int, default=5000, help="training images (default 5000)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64, warm-up uses 2x)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--source", choices=("random", "subset"), default="random",
                   help="random uint8 images, or the real CIFAR-10 subset tiled up to --images")
    p.add_argument("--subset-path", help="cifar10_subset.npz (default: shared/data next to the checkout)")
    p.add_argument("--steps", type=int, help="at most N training steps per training phase (quick runs)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the official-style reference pipeline")
    p.add_argument("--reference-compute", action="store_true",
                   help="also replay the reference's model calls alone (its own epoch/compute ratio)")
    p.add_argument("--replay-calls", type=int, default=8,
                   help="pure compute: time up to N calls of each distinct kind (net, shape, mode) per phase "
                        "and scale to the epoch's count (default 8; 0 = replay every call)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="afterwards, run one more cdmix DivideMix epoch + test under torch.profiler and "
                        "print its top N ops by self time")
    p.add_argument("--compile", action="store_true", help="torch.compile the cdmix nets (eager fallback)")
    p.add_argument("--fast", action="store_true",
                   help="cdmix's --no-faithful-order variant (batched train-mode no-grad forwards)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="cdmix with / without bf16 autocast (default: cdmix's own default, on for CUDA only)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="cdmix nets and batches in channels_last (default: cdmix's own default, CUDA only)")
    p.add_argument("--classes", type=int, default=10, choices=(10, 100), help="10 (CIFAR-10) or 100 (CIFAR-100)")
    p.add_argument("--workers", type=int, help="reference DataLoader workers (default min(5, CPUs); official 5)")
    p.add_argument("--eval-batch-size", type=int,
                   help="cdmix loss/test pass batch (default: cdmix's own, 1024 on CUDA and 64 on CPU)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or the main thread's CPU time (load-independent on a busy "
                        "machine; needs --threads 1 and --workers 0 so that all work runs on that thread)")
    p.add_argument("--threads", type=int, help="torch CPU threads for this run (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this file (markdown; JSON if it ends in .json)")
    p.add_argument("--markdown", help="append the table to this markdown file")


def options_from_args(args: argparse.Namespace, command: str = "") -> BenchOptions:
    names = {f for f in BenchOptions.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in names and k != "command"}
    return BenchOptions(**values, command=command)


def log(message: str) -> None:
    """Progress on stderr, so a run cut off by a time limit still shows how far it got."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, prog: str = "python benchmarks/bench.py") -> int:
    """Parse ``argv`` (default: the command line), run the benchmark, print the table; 2 on a user error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        opts = options_from_args(args, command=" ".join([prog, *argv]))
        result = run_bench(opts)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = format_table(result)
    print(text)
    if opts.out:
        write_result(result, text, opts.out)
        print(f"wrote {opts.out}")
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write("\n" + text + "\n")
        print(f"appended to {path}")
    return 0


def write_result(result: dict[str, Any], text: str, path: str | Path) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    else:
        path.write_text(text + "\n")


def validate_options(opts: BenchOptions) -> None:
    if opts.images < 8:
        raise UserError(f"--images must be at least 8, got {opts.images}")
    if opts.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {opts.batch_size}")
    if opts.width is not None and opts.width < 1:
        raise UserError(f"--width must be positive, got {opts.width}")
    if opts.steps is not None and opts.steps < 1:
        raise UserError(f"--steps must be positive, got {opts.steps}")
    if opts.workers is not None and opts.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {opts.workers}")
    if opts.threads is not None and opts.threads < 1:
        raise UserError(f"--threads must be positive, got {opts.threads}")
    on_cpu = opts.device == "cpu" or (opts.device == "auto" and not torch.cuda.is_available())
    if opts.clock == "cpu" and (opts.threads != 1 or opts.resolved_workers() != 0 or not on_cpu):
        raise UserError("--clock cpu counts this thread's CPU time only: use it with --device cpu --threads 1 "
                        "--workers 0")
    if opts.replay_calls < 0:
        raise UserError(f"--replay-calls must be 0 or more, got {opts.replay_calls}")
    if opts.eval_batch_size is not None and opts.eval_batch_size < 1:
        raise UserError(f"--eval-batch-size must be positive, got {opts.eval_batch_size}")
    if opts.source == "subset" and opts.classes != 10:
        raise UserError("--source subset is CIFAR-10: use --classes 10 (or --source random)")
    if opts.source not in ("random", "subset"):
        raise UserError(f"--source must be random or subset, got {opts.source!r}")


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


@dataclass
class BenchData:
    train_images: np.ndarray  # N x 32 x 32 x 3 uint8
    true_labels: np.ndarray
    noisy_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str


def repo_root() -> Path:
    """The source checkout this file lives in (``benchmarks/bench.py`` -> checkout)."""
    return HERE.parent


def find_subset(path: str | None) -> Path:
    if path:
        found = Path(path)
        if not found.is_file():
            raise UserError(f"subset file {found} does not exist")
        return found
    for root in (repo_root().parent, repo_root(), Path.cwd()):
        candidate = root / SUBSET_RELATIVE
        if candidate.is_file():
            return candidate
    raise UserError("the CIFAR-10 subset (shared/data/cifar10-subset/cifar10_subset.npz) was not found; "
                    "pass --subset-path or use --source random")


def _tile(array: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(array))
    return np.concatenate([array] * reps)[:n] if reps > 1 else array[:n].copy()


def build_data(opts: BenchOptions) -> BenchData:
    from cdmix.data.noise import make_noisy_labels

    rng = np.random.default_rng(opts.seed)
    n, classes = opts.images, opts.classes
    if opts.source == "subset":
        path = find_subset(opts.subset_path)
        with np.load(path) as npz:
            base_images, base_labels = npz["train_images"], npz["train_labels"].astype(np.int64)
            test_images, test_labels = npz["test_images"], npz["test_labels"].astype(np.int64)
        train_images, true_labels = _tile(base_images, n), _tile(base_labels, n)
        tiled = f" (tiled x{n / len(base_images):.2f})" if n != len(base_images) else ""
        description = f"{n} real CIFAR-10 subset images{tiled}"
    else:
        train_images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        true_labels = rng.integers(0, classes, n).astype(np.int64)
        n_test = max(n // 5, 100)
        test_images = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
        test_labels = rng.integers(0, classes, n_test).astype(np.int64)
        description = f"{n} random CIFAR-shaped images, {classes} classes"
    noisy = make_noisy_labels(true_labels, classes, "sym", 0.5, opts.seed)
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)
    return BenchData(train_images, true_labels, noisy, test_images, test_labels, classes, mean, std,
                     description + ", 50% sym noise")


def build_trainer(opts: BenchOptions, data: BenchData, run_dir: Path):
    """The real engine ``Trainer`` holding a real ``DivideMix`` with warm-up = 1 epoch."""
    from cdmix.config import Config, resolve, validate
    from cdmix.data.types import RawData
    from cdmix.engine import PreparedData, Trainer

    config = Config(dataset="cifar100" if data.num_classes == 100 else "cifar10", method="dividemix",
                    model=opts.model, width=opts.width, warmup=1, epochs=2, lr_step=150, batch_size=opts.batch_size,
                    device=opts.device, compile=opts.compile, faithful_order=not opts.fast, progress=False,
                    seed=opts.seed, noise_mode="sym", noise_rate=0.5, eval_batch_size=opts.eval_batch_size,
                    amp=opts.amp)
    validate(config)
    config = resolve(config, data.num_classes, 32)
    raw = RawData(train_images=data.train_images, train_labels=data.noisy_labels, test_images=data.test_images,
                  test_labels=data.test_labels, class_names=[str(i) for i in range(data.num_classes)],
                  mean=data.mean, std=data.std, train_true_labels=data.true_labels, name="bench")
    prepared = PreparedData(raw, {}, np.arange(len(data.noisy_labels)), np.zeros(0, dtype=np.int64))
    return Trainer.fresh(config, run_dir, prepared)

# ------------------------------------------------------------------------------------------------
# cdmix
# ------------------------------------------------------------------------------------------------


def _is_compiled(net: torch.nn.Module) -> bool:
    return hasattr(net, "_orig_mod")


def _subset_train(train, k: int):
    """The first ``k`` samples of a TrainSet (a view, for --steps in the warm-up)."""
    from cdmix.methods.base import TrainSet

    images = copy.copy(train.images)
    images.images = train.images.images[:k]
    return TrainSet(images=images, labels=train.labels[:k],
                    true_labels=None if train.true_labels is None else train.true_labels[:k],
                    index=train.index[:k], num_classes=train.num_classes)


def instrument(method, timer: PhaseTimer, steps: int | None, batch_size: int,
               after: Callable[[str], None] = lambda name: None) -> dict[str, np.ndarray]:
    """Time the method's phases by wrapping its own methods on the instance (the class is untouched).

    ``after(phase)`` runs when a phase has finished, outside its timed region. Returns a dict that
    fills with the labeled indices each ``train_net`` used (before the --steps cap), keyed by the
    trained net's tag ("net1", "net2").
    """
    splits: dict[str, np.ndarray] = {}
    warmup_epoch, divide, train_net, labeled_split = (method.warmup_epoch, method.divide, method.train_net,
                                                      method.labeled_split)

    def timed_warmup(ctx):
        full = method.train
        if steps is not None:
            method.train = _subset_train(full, min(len(full), steps * 2 * batch_size))
        try:
            with timer.phase("warm-up epoch"):
                row = warmup_epoch(ctx)
        finally:
            method.train = full
        after("warm-up epoch")
        return row

    def timed_divide(*args, **kwargs):
        with timer.phase("divide"):
            out = divide(*args, **kwargs)
        after("divide")
        return out

    def timed_train_net(a, *args, **kwargs):
        name = f"train net{a + 1}"
        with timer.phase(name):
            out = train_net(a, *args, **kwargs)
        after(name)
        return out

    def recorded_split(clean_prob, tag, *args, **kwargs):
        labeled, unlabeled = labeled_split(clean_prob, tag, *args, **kwargs)
        splits[tag] = labeled.cpu().numpy()
        if steps is not None:
            labeled = labeled[:steps * batch_size]
        return labeled, unlabeled

    method.warmup_epoch, method.divide, method.train_net = timed_warmup, timed_divide, timed_train_net
    method.labeled_split = recorded_split
    return splits



class CdmixSide:
    """The real Trainer + DivideMix, instrumented; replays each phase's model calls right after it."""

    def __init__(self, opts: BenchOptions, data: BenchData, after_phase: Callable[[str], None]):
        from cdmix.methods.base import autocast

        self.opts, self.data = opts, data
        self.trainer = build_trainer(opts, data, Path(tempfile.gettempdir()) / "cdmix-bench-unused")
        self.config, self.method = self.trainer.config, self.trainer.method
        self.device = torch.device(self.config.device)
        self.channels_last = self.trainer.train.images.channels_last
        if opts.channels_last is not None and opts.channels_last != self.channels_last:
            self._set_channels_last(opts.channels_last)
        self.amp = lambda: autocast(self.config)
        self.compile_status = "off"
        if self.config.compile:
            self._compile()
        self.prime_seconds = 0.0
        bs = opts.batch_size
        self.wrappers = getattr(self.method, "train_nets", None)
        if self.device.type == "cuda" or self.compile_status == "compiled":  # compilation is not epoch time
            eval_bs = min(self.config.eval_batch_size, opts.images)
            shapes = [(n, 3, 32, 32) for n in sorted({bs, 2 * bs, 4 * bs, eval_bs})]
            self.prime_seconds = prime(self.method.nets, self.method.optimizers, shapes, self.amp, self.device,
                                       self.channels_last, self.wrappers)
        self.recorder = CallRecorder(self.method.nets, self.wrappers)
        self.timer = PhaseTimer(self.device, self.recorder)
        self.after_phase = after_phase
        self.splits = instrument(self.method, self.timer, opts.steps, bs, lambda name: self._after(name))
        self.compute_seconds: dict[str, float] = {}
        self.rows: list[dict] = []
        self.test_acc = float("nan")
        self.peak_mib = 0.0

    def _set_channels_last(self, on: bool) -> None:
        """--channels-last / --no-channels-last: override cdmix's per-device default (nets and batches)."""
        fmt = torch.channels_last if on else torch.contiguous_format
        for net in self.method.nets:
            net.to(memory_format=fmt)
        for images in (self.trainer.train.images, self.trainer.test_images, self.trainer.val_images):
            if images is not None:
                images.channels_last = on
        self.channels_last = on

    def _compile(self) -> None:
        """Report what ``Method`` did with ``config.compile``: it tries each compiled training module
        once (torch.compile is lazy) and keeps the bare net when that fails."""
        statuses = ["compiled" if _is_compiled(w) else "eager (compile failed)" for w in self.method.train_nets]
        self.compile_status = statuses[0] if len(set(statuses)) == 1 else "; ".join(statuses)

    def _after(self, name: str) -> None:
        self.peak_mib = max(self.peak_mib, cuda_peak_mib(self.device))
        self.recorder.enabled = False
        try:
            self._replay(name)
            self.after_phase(name)
        finally:
            self.recorder.enabled = True
            reset_peak(self.device)

    def _replay(self, name: str) -> None:
        calls = [c for c in self.recorder.calls if c.phase == name]
        state = snapshot(self.method.nets, self.method.optimizers)
        seconds = replay(calls, self.method.nets, self.method.optimizers, self.amp, self.device,
                         self.data.num_classes, self.opts.replay_calls or None, self.wrappers)
        restore(self.method.nets, self.method.optimizers, state)
        self.compute_seconds[name] = seconds.get(name, 0.0)

    def run(self) -> None:
        from cdmix.engine import lr_at, seed_epoch

        reset_peak(self.device)
        for epoch in range(2):  # epoch 0: warm-up, epoch 1: DivideMix
            ctx = seed_epoch(self.config, epoch)
            self.method.set_lr(lr_at(self.config, epoch))
            self.rows.append(self.method.train_epoch(ctx))
        with self.timer.phase("test"):
            self.test_acc = self.trainer.evaluate()["test_acc"]
        self._after("test")
        self.recorder.remove()

    def profile(self, top: int) -> str:
        """One more DivideMix epoch + test pass under torch.profiler (nothing else runs meanwhile);
        returns the table of the ``top`` ops by self time (CUDA time on CUDA, CPU time otherwise)."""
        from torch.profiler import ProfilerActivity, profile

        from cdmix.engine import lr_at, seed_epoch

        self.recorder.enabled = False
        self.after_phase = lambda name: None
        self._after = lambda name: None  # the wrappers call this: no replay, no reference
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        ctx = seed_epoch(self.config, 2)
        self.method.set_lr(lr_at(self.config, 2))
        sync(self.device)
        with profile(activities=activities) as prof:
            self.method.train_epoch(ctx)
            self.trainer.evaluate()
            sync(self.device)
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=48)

    def train_masks(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The labeled sets cdmix trained net1 and net2 on so far (net1 learns from net2's division
        and vice versa), as masks (None for a net not trained yet), for the reference to train on
        the same sets (same number and shapes of steps)."""
        masks = []
        for tag in ("net1", "net2"):
            if tag in self.splits:
                mask = np.zeros(len(self.trainer.train), dtype=bool)
                mask[self.splits[tag]] = True
                masks.append(mask)
            else:
                masks.append(None)
        return masks[0], masks[1]

    def labeled_used(self) -> dict[str, int]:
        last = self.rows[-1] if self.rows else {}
        return {"train net1": int(last.get("labeled_used_net1", 0)),
                "train net2": int(last.get("labeled_used_net2", 0))}



def cdmix_data_path(images, n: int, batch_size: int, device: torch.device, seed: int) -> tuple[float, int, float]:
    """cdmix's batch assembly: a device permutation, then two augmented views per batch (gather,
    crop, flip, normalise). Returns (images/s, images, seconds)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    count = 0
    sync(device)
    t0 = clock()
    perm = torch.randperm(n, device=device, generator=gen)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        x1 = images.batch(idx, augment=True, generator=gen)
        x2 = images.batch(idx, augment=True, generator=gen)
        count += x1.shape[0] + x2.shape[0]
    sync(device)
    seconds = clock() - t0
    return count / seconds, count, seconds


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------


def load_reference():
    """The reference pipeline module (``REFERENCE_FILE``), or None when the file is missing."""
    path = REFERENCE_FILE
    if not path.is_file():
        return None
    name = "cdmix_bench_reference_pipeline"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # DataLoader workers and pickling look classes up by module name
    spec.loader.exec_module(module)
    return module


class ReferenceSide:
    """The official-style pipeline on its own two nets (same model), run one phase at a time."""

    def __init__(self, ref, opts: BenchOptions, data: BenchData, device: torch.device):
        self.ref, self.opts, self.data, self.device = ref, opts, data, device
        self.store, self._tmp = ref.temporary_store(data.train_images, data.noisy_labels, data.test_images,
                                                    data.test_labels)
        self.model = None
        self.result = ref.ReferenceResult()
        self.compute_seconds: dict[str, float] = {}
        self.peak_mib = 0.0
        self.prime_seconds = 0.0

    def start(self) -> None:
        """Build the two nets (and prime them on CUDA); only the data store exists before this."""
        from cdmix.models import create_model

        ref, opts, data, device = self.ref, self.opts, self.data, self.device
        torch.manual_seed(opts.seed)

        def build_model():
            return create_model(opts.model, num_classes=data.num_classes, in_channels=3, width=opts.width)

        self.model = ref.ReferenceDivideMix(self.store, data.num_classes, build_model, device,
                                            batch_size=opts.batch_size, num_workers=opts.resolved_workers(),
                                            mean=data.mean, std=data.std, warm_up=1, seed=opts.seed, clock=clock)
        self.optimizers = [self.model.opt1, self.model.opt2]
        self.num_classes = data.num_classes
        self.recorder = CallRecorder(self.model.nets)
        self.model.phase_hook = lambda name: setattr(self.recorder, "phase", name)
        if device.type == "cuda":
            bs = opts.batch_size
            with ref._cudnn_benchmark(device):
                self.prime_seconds = prime(self.model.nets, self.optimizers,
                                           [(n, 3, 32, 32) for n in sorted({bs, 2 * bs, 4 * bs})],
                                           contextlib.nullcontext, device, False)

    def run_phase(self, name: str, masks: tuple[np.ndarray | None, np.ndarray | None] | None) -> None:
        if self.model is None:
            self.start()
        reset_peak(self.device)
        model, steps = self.model, self.opts.steps
        if name == "warm-up epoch":
            model.warmup_epoch(steps, self.result)
        elif name == "divide":
            model.divide_phase(self.result)
        elif name in ("train net1", "train net2"):
            which = int(name[-1])
            model.train_phase(which, 1, self.result, None if masks is None else masks[which - 1], steps)
        elif name == "test":
            model.test_phase(self.result)
        self.recorder.phase = "other"
        self.peak_mib = max(self.peak_mib, cuda_peak_mib(self.device))
        if self.opts.reference_compute:
            self.recorder.enabled = False
            self._replay(name)
            self.recorder.enabled = True

    def _replay(self, name: str) -> None:
        calls = [c for c in self.recorder.calls if c.phase == name]
        state = snapshot(self.model.nets, self.optimizers)
        seconds = replay(calls, self.model.nets, self.optimizers, contextlib.nullcontext, self.device,
                         self.num_classes, self.opts.replay_calls or None)
        restore(self.model.nets, self.optimizers, state)
        self.compute_seconds[name] = seconds.get(name, 0.0)

    def calls(self) -> list[Call]:
        return self.recorder.calls if self.model is not None else []

    def close(self) -> None:
        if self.model is not None:
            self.recorder.remove()
            self.model.close()
        self._tmp.cleanup()


# ------------------------------------------------------------------------------------------------
# the whole benchmark
# ------------------------------------------------------------------------------------------------


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the whole benchmark (see ``_run_bench``) with ``opts.threads`` torch threads, restored after."""
    validate_options(opts)
    saved = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    set_clock(opts.clock)
    limits = contextlib.nullcontext()
    if opts.threads is not None:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        limits = threadpool_limits(opts.threads)  # numpy/BLAS (the GMM) too
    try:
        with limits:
            return _run_bench(opts)
    finally:
        torch.set_num_threads(saved)
        set_clock("wall")


def _run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the whole benchmark; returns a JSON-able dict (``format_table`` prints it).

    Order: the data paths (cdmix, reference, cdmix, reference; best of two each), then cdmix's
    phases. Each cdmix phase is followed, outside its timed region, by the replay of its model
    calls (pure compute; nets and optimizers restored afterwards) and -- on the CPU, or with
    ``interleave`` -- by the same phase of the reference, so the three timings of a phase are taken
    back to back under the same machine load. On CUDA the reference runs after cdmix, so each
    pipeline's peak memory is its own.
    """
    from cdmix.models import create_model

    # One-off imports the first divide would otherwise pay inside its timed region.
    import sklearn.metrics  # noqa: F401
    import sklearn.mixture  # noqa: F401

    import cdmix.selection  # noqa: F401

    t_start = time.perf_counter()
    load_start = load_average()
    if load_start is not None and load_start > (os.cpu_count() or 1):
        print(f"warning: the machine is busy (load average {load_start:.1f} on {os.cpu_count()} CPUs); "
              "timings are comparable within this run only")
    data = build_data(opts)
    flops_per_image = count_flops(create_model(opts.model, data.num_classes, 3, opts.width), (3, 32, 32))
    ref_module = load_reference() if opts.reference else None
    reference_note = None
    if opts.reference and ref_module is None:
        reference_note = "reference not found (run from a source checkout)"
        print(reference_note)
    elif not opts.reference:
        reference_note = "reference skipped (--no-reference)"
    workers = opts.resolved_workers()
    reference: ReferenceSide | None = None
    holder: dict[str, Any] = {}

    def after_phase(name: str) -> None:
        if reference is not None and holder.get("interleave"):
            reference.run_phase(name, holder["cd"].train_masks())
            log(f"{name}: cdmix {holder['cd'].timer.seconds.get(name, 0):.2f}s, pure compute "
                f"{holder['cd'].compute_seconds.get(name, 0):.2f}s, reference "
                f"{reference.result.seconds.get(name, 0):.2f}s")
        else:
            log(f"{name}: cdmix {holder['cd'].timer.seconds.get(name, 0):.2f}s, pure compute "
                f"{holder['cd'].compute_seconds.get(name, 0):.2f}s")

    log(f"data ready: {data.description}")
    cd = CdmixSide(opts, data, after_phase)
    holder["cd"] = cd
    device = cd.device
    holder["interleave"] = device.type == "cpu"
    try:
        if ref_module is not None:
            reference = ReferenceSide(ref_module, opts, data, device)
        images = cd.trainer.train.images
        cd_ips, ref_ips = [], []
        for _ in range(2):
            cd_ips.append(cdmix_data_path(images, len(images), opts.batch_size, device, opts.seed)[0])
            if reference is not None:
                ref_ips.append(ref_module.data_path_images_per_second(reference.store, opts.batch_size, workers,
                                                                      data.mean, data.std, device,
                                                                      clock=clock)[0])
        log(f"data path images/s: cdmix {max(cd_ips):.0f}" + (f", reference {max(ref_ips):.0f}" if ref_ips else ""))
        if reference is not None and holder["interleave"]:
            reference.start()
        cd.run()
        cd_peak = cd.peak_mib
        if reference is not None and not holder["interleave"]:
            log(f"running the reference pipeline ({workers} DataLoader workers)")
            for name in PHASES:
                reference.run_phase(name, cd.train_masks())
                log(f"reference {name}: {reference.result.seconds.get(name, 0):.2f}s")
        memory_cd = {"cuda_max_allocated_mib": cd_peak} if device.type == "cuda" else peak_memory(device)
        profile_text = None
        if opts.profile > 0:
            log("profiling one more cdmix DivideMix epoch")
            profile_text = cd.profile(opts.profile)
        memory_ref = None
        if reference is not None:
            memory_ref = ({"cuda_max_allocated_mib": reference.peak_mib} if device.type == "cuda"
                          else peak_memory(device))
    finally:
        if reference is not None:
            reference.close()
    stats = phase_stats(cd.recorder.calls, flops_per_image)
    ref_stats = phase_stats(reference.calls(), flops_per_image) if reference is not None else {}
    phases = []
    for name in PHASES:
        row = {"phase": name, "cdmix_s": cd.timer.seconds.get(name), "compute_s": cd.compute_seconds.get(name),
               **stats.get(name, {})}
        if reference is not None:
            row["reference_s"] = reference.result.seconds.get(name)
            if opts.reference_compute:
                row["reference_compute_s"] = reference.compute_seconds.get(name)
            row["reference_steps"] = ref_stats.get(name, {}).get("grad_steps", 0)
            row["reference_flops"] = ref_stats.get(name, {}).get("flops")
        phases.append(row)
    epoch = {"phase": "DivideMix epoch (divide + train + test)"}
    for key in ("cdmix_s", "compute_s", "reference_s", "reference_compute_s", "forwards", "grad_steps", "images",
                "flops", "reference_steps", "reference_flops"):
        values = [r.get(key) for r in phases if r["phase"] in EPOCH_PHASES]
        if values and all(v is not None for v in values):
            epoch[key] = sum(values)
    return {
        "options": asdict(opts),
        "machine": machine_info(device),
        "load_average": {"start": load_start, "end": load_average()},
        "data": data.description,
        "num_train": len(data.noisy_labels),
        "num_test": len(data.test_labels),
        "flops_per_image": flops_per_image,
        "amp": bool(cd.config.amp), "channels_last": cd.channels_last, "compile": cd.compile_status,
        "eval_batch_size": cd.config.eval_batch_size,
        "faithful_order": not opts.fast,
        "workers": workers,
        "interleaved": bool(holder["interleave"] and reference is not None),
        "phases": phases,
        "epoch": epoch,
        "data_path": {"cdmix_images_per_s": max(cd_ips),
                      "reference_images_per_s": max(ref_ips) if ref_ips else None,
                      "images": 2 * len(images)},
        "memory": {"cdmix": memory_cd, "reference": memory_ref},
        "labeled": cd.labeled_used(),
        "test_acc": {"cdmix": cd.test_acc, "reference": reference.result.test_acc if reference else None},
        "prime_seconds": {"cdmix": cd.prime_seconds, "reference": reference.prime_seconds if reference else None},
        "reference_note": reference_note,
        "profile": profile_text,
        "total_seconds": time.perf_counter() - t_start,
    }


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _steps(row: dict[str, Any]) -> str:
    if row.get("grad_steps") is None:
        return "-"
    text = str(int(row["grad_steps"]))
    if row.get("reference_steps") is not None:
        text += f" / {int(row['reference_steps'])}"
    return text


def _tflops(flops: float | None, seconds: float | None) -> str:
    rate = _ratio(flops, seconds)
    return "-" if rate is None else f"{rate / 1e12:.4f}"


def _mib(memory: dict[str, float] | None) -> str:
    if not memory:
        return "-"
    if "cuda_max_allocated_mib" in memory:
        return f"{memory['cuda_max_allocated_mib']:.0f} MiB (CUDA max allocated)"
    return (f"{memory['max_rss_mib']:.0f} MiB (process max RSS so far; workers "
            f"{memory['children_max_rss_mib']:.0f} MiB)")


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _verdict(value: float | None, ok: bool, target: str) -> str:
    return f"{'met' if ok else 'MISSED'} ({target})" if value is not None else f"- ({target})"


def _header(result: dict[str, Any], has_ref: bool) -> list[str]:
    opts, machine = result["options"], result["machine"]
    where = machine.get("gpu") or (f"{machine['cpu']} ({machine['cpu_count']} CPUs, "
                                   f"{machine['torch_threads']} torch threads)")
    order = "fast (batched train-mode no-grad forwards)" if not result["faithful_order"] else "faithful"
    if has_ref:
        reference = (f"- reference: benchmarks/reference_pipeline.py, per-sample Dataset + DataLoader with "
                     f"{result['workers']} workers (official: 5), fp32, loaders rebuilt per epoch, trained on "
                     "cdmix's labeled sets (same steps)")
    else:
        reference = f"- {result['reference_note']}"
    if opts.get("replay_calls"):
        replayed = (f"up to {opts['replay_calls']} calls of each distinct kind (net, shape, mode) timed per phase "
                    "and scaled to the epoch's count")
    else:
        replayed = "every call replayed"
    if result.get("interleaved"):
        order_text = ("each cdmix phase, then its pure-compute replay, then the same reference phase, back to "
                      "back (same machine load)")
    else:
        order_text = "each cdmix phase then its pure-compute replay; the reference afterwards"
    if opts.get("clock") == "cpu":
        clock_text = "this thread's CPU time (--clock cpu, 1 thread, no workers: load-independent work)"
    else:
        clock_text = "wall time"
    load = result["load_average"]
    return [
        f"## cdmix bench: {opts['model']} width {opts['width']}, batch {opts['batch_size']}, {result['data']}",
        "",
        f"- device: {machine['device']} - {where}; torch {machine['torch']}, Python {machine['python']}"
        + "".join(f"; {k}={v}" for k, v in machine.get("env", {}).items()),
        f"- cdmix: {order} order, bf16 autocast {_on(result['amp'])}, channels_last "
        f"{_on(result['channels_last'])}, compile {result['compile']}; eval batch "
        f"{result.get('eval_batch_size', opts['eval_batch_size'])}",
        reference,
        f"- pure compute: the epoch's recorded forwards (+ backward and SGD step after each grad forward) on "
        f"pre-built batches, {replayed}",
        f"- {result['flops_per_image'] / 1e6:.1f} MFLOP forward per image; TFLOP/s = counted FLOPs "
        "(fwd+bwd = 3x fwd) / phase seconds" + (f"; --steps {opts['steps']}" if opts.get("steps") else ""),
        f"- order: {order_text}",
        f"- clock: {clock_text}; load average (1 min) at start / end: {_f(load['start'])} / {_f(load['end'])} "
        f"on {machine['cpu_count']} CPUs",
        f"- command: `{opts['command'].strip()}`",
    ]


def format_table(result: dict[str, Any]) -> str:
    """The markdown report of ``run_bench``'s result: settings, per-phase table, summary table."""
    has_ref = any(r.get("reference_s") is not None for r in result["phases"])
    has_ref_compute = any(r.get("reference_compute_s") is not None for r in result["phases"])
    lines = _header(result, has_ref) + [
        "",
        "| phase | cdmix s | pure compute s | cdmix / compute | reference s | reference / cdmix "
        "| steps (cdmix / ref) | forwarded images | cdmix images/s | cdmix TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["phases"] + [result["epoch"]]:
        secs = row.get("cdmix_s")
        lines.append("| " + " | ".join([
            row["phase"], _f(secs), _f(row.get("compute_s")), _f(_ratio(secs, row.get("compute_s")), suffix="x"),
            _f(row.get("reference_s")), _f(_ratio(row.get("reference_s"), secs), suffix="x"),
            _steps(row),
            str(int(row["images"])) if row.get("images") is not None else "-",
            _f(_ratio(row.get("images"), secs), 0),
            _tflops(row.get("flops"), secs),
        ]) + " |")
    epoch, warm, n = result["epoch"], result["phases"][0], result["num_train"]
    dp, memory, acc = result["data_path"], result["memory"], result["test_acc"]
    ratio_dp = _ratio(dp["cdmix_images_per_s"], dp["reference_images_per_s"])
    ratio_compute = _ratio(epoch.get("cdmix_s"), epoch.get("compute_s"))
    ref_ratio = _ratio(epoch.get("reference_s"), epoch.get("reference_compute_s")) if has_ref_compute else None
    lines += [
        "",
        "| metric | cdmix | reference | ratio (target) |",
        "|---|---:|---:|---:|",
        f"| DivideMix epoch, dataset images/s ({n} / epoch s) | {_f(_ratio(n, epoch.get('cdmix_s')), 0)} "
        f"| {_f(_ratio(n, epoch.get('reference_s')), 0)} "
        f"| {_f(_ratio(epoch.get('reference_s'), epoch.get('cdmix_s')), suffix='x faster')} |",
        f"| warm-up epoch, dataset images/s (2 nets x {n} / s) | {_f(_ratio(2 * n, warm.get('cdmix_s')), 0)} "
        f"| {_f(_ratio(2 * n, warm.get('reference_s')), 0)} "
        f"| {_f(_ratio(warm.get('reference_s'), warm.get('cdmix_s')), suffix='x faster')} |",
        f"| epoch / pure model compute | {_f(ratio_compute, suffix='x')} | {_f(ref_ratio, suffix='x')} "
        f"| {_verdict(ratio_compute, (ratio_compute or 0) <= TARGET_COMPUTE_RATIO, f'<= {TARGET_COMPUTE_RATIO}x')} |",
        f"| data path images/s (batch assembly + crop/flip + normalise, {dp['images']} images) "
        f"| {_f(dp['cdmix_images_per_s'], 0)} | {_f(dp['reference_images_per_s'], 0)} "
        f"| {_f(ratio_dp, 1, 'x')} {_verdict(ratio_dp, (ratio_dp or 0) >= TARGET_DATA_PATH, '>= 5x')} |",
        f"| peak memory | {_mib(memory['cdmix'])} | {_mib(memory['reference'])} | |",
        f"| estimated achieved TFLOP/s, DivideMix epoch | {_tflops(epoch.get('flops'), epoch.get('cdmix_s'))} "
        f"| {_tflops(epoch.get('reference_flops'), epoch.get('reference_s'))} | |",
        f"| labeled samples used (train net1 / net2) | {result['labeled']['train net1']} / "
        f"{result['labeled']['train net2']} | {'same masks' if has_ref else '-'} | |",
        f"| test accuracy after the epoch (%) | {_f(acc['cdmix'])} | {_f(acc['reference'])} | |",
        "",
        f"bench wall time {result['total_seconds']:.0f} s (untimed first-call priming: cdmix "
        f"{_f(result['prime_seconds']['cdmix'], 1)} s, reference {_f(result['prime_seconds']['reference'], 1)} s)",
    ]
    if result.get("profile"):
        lines += ["", "torch.profiler, one more cdmix DivideMix epoch + test (top ops by self time):", "",
                  "```", result["profile"].rstrip(), "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
