"""SimCLR pretraining speed (issue #22): a pretraining epoch against the pure model compute it contains.

All in one process, on random uint8 CIFAR-shaped images (``--images`` of ``--size`` px, 10 classes):

* **epoch**: ``SimCLR.train_epoch`` of the real method (``cdmix.methods.simclr``, PreAct ResNet-18 of
  ``--width`` + its projection head, SupContrast's settings at batch ``--batch``) with the engine's
  own ``EpochContext`` (``cdmix.engine.seed_epoch``) and lr (``lr_at``): shuffling, the two SimCLR
  views of every batch (``data.batches.simclr_views``), forward, NT-Xent, backward, SGD step, the
  loss bookkeeping. This is what metrics.csv's ``seconds - seconds_test`` is for that epoch.
* **pure compute**: the same number of steps of the same net on views made beforehand (the same
  batch shapes, no augmentation, no gathering): forward of the 2B views, ``nt_xent``, backward of
  the scaled loss, SGD step. ``epoch / pure compute`` is the cost of everything that is not the model;
  the target is <= 1.15 (issue #22).
* **views**: ``simclr_views`` alone for the epoch's batches (where most of the rest goes);
* **kNN monitor**: one ``SimCLR.knn_monitor`` (features of the training images and of
  ``--test`` test images, weighted kNN), which a run does every ``knn_every`` epochs (5): shown per
  call and per epoch (divided by 5).

The measurements alternate (epoch, pure, views, monitor, epoch, ...) ``--repeats`` times, and the
table shows medians of wall-clock and of process CPU time, so a busy neighbour slows each alike; on a
shared machine only the ratios mean something. As a run does (``engine.trainer.place_data``), glibc
keeps freed large blocks (``data.host_images.reuse_freed_host_memory``); ``--no-host-reuse`` leaves
malloc at its defaults, where every large activation faults in fresh pages (a third of the CPU time
here, and a noisy one). ``--device cuda`` measures a GPU (bf16 autocast by default there, as cdmix);
``--json`` / ``--markdown`` write the figures with the device name after every repeat, so a hard
time limit (benchmarks/gpu_check.sh, with ``--max-seconds``) still leaves them.

    python benchmarks/pretrain_speed.py --threads 1 --width 16 --images 2048 --batch 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import cdmix  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from cdmix import losses as L  # noqa: E402
from cdmix.config import Config, resolve  # noqa: E402
from cdmix.data.batches import DeviceImages, simclr_views  # noqa: E402
from cdmix.data.host_images import reuse_freed_host_memory  # noqa: E402
from cdmix.engine import lr_at, seed_epoch  # noqa: E402
from cdmix.methods.base import TrainSet, autocast  # noqa: E402
from cdmix.methods.simclr import PRETRAIN_DEFAULTS, SimCLR  # noqa: E402

TARGET_RATIO = 1.15
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall-clock and process CPU seconds of a block (``with Clock(device) as c: ...; c.wall, c.cpu``).
    CPU time counts what this process computed, not what the neighbours took from it: on a shared
    machine with one thread it is the steadier of the two."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self) -> "Clock":
        sync(self.device)
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0


def build(args) -> tuple[SimCLR, DeviceImages, torch.Tensor]:
    rng = np.random.default_rng(0)
    n, size = args.images, args.size
    images = rng.integers(0, 256, size=(n + args.test, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n + args.test)
    device = args.device
    if not args.no_host_reuse:
        reuse_freed_host_memory()  # as every run does (engine.trainer.place_data): else page faults dominate
    channels_last = torch.device(device).type == "cuda"  # as the engine places images (engine.data)
    train = TrainSet(DeviceImages(images[:n], MEAN, STD, device, channels_last),
                     torch.as_tensor(labels[:n], device=device), None, np.arange(n), 10)
    test = DeviceImages(images[n:], MEAN, STD, device, channels_last)
    settings = {k: v for k, v in PRETRAIN_DEFAULTS.items() if k != "val_fraction"}
    config = resolve(Config(**{**settings, "model": "preact_resnet18", "width": args.width,
                               "batch_size": args.batch, "device": device, "amp": args.amp, "progress": False,
                               "compile": args.compile}), 10, size)
    torch.manual_seed(0)
    return SimCLR(config, train), test, torch.as_tensor(labels[n:], device=device)


def epoch_batches(method: SimCLR) -> list[torch.Tensor]:
    """The index batches of one epoch, as ``train_epoch`` draws them (one process)."""
    from cdmix.methods.base import shuffled_batches

    ctx = seed_epoch(method.config, 0)
    idx = torch.arange(len(method.train), device=method.train.labels.device)
    return list(shuffled_batches(idx, method.config.batch_size, ctx, "", None))


def time_epoch(method: SimCLR, epoch: int) -> Clock:
    config = method.config
    ctx = seed_epoch(config, epoch)  # the engine's order: seed, lr, train
    method.set_lr(lr_at(config, epoch))
    with Clock(config.device) as clock:
        method.train_epoch(ctx)
    return clock


def time_pure(method: SimCLR, views: list[torch.Tensor]) -> Clock:
    """forward + NT-Xent + backward + SGD step of the method's net on ready views, one per step."""
    config = method.config
    net, optimizer = method.train_nets[0], method.optimizers[0]
    net.train()
    scale = config.simclr_temperature / config.simclr_base_temperature
    with Clock(config.device) as clock:
        for x in views:
            n = x.shape[0] // 2
            with autocast(config):
                z = net(x)
            loss = L.nt_xent(z[:n].float(), z[n:].float(), config.simclr_temperature)
            optimizer.zero_grad(set_to_none=True)
            (scale * loss).backward()
            optimizer.step()
    return clock


def time_views(method: SimCLR, batches: list[torch.Tensor], epoch: int) -> Clock:
    generator = seed_epoch(method.config, epoch).aug_generator
    with Clock(method.config.device) as clock:
        for idx in batches:
            simclr_views(method.train.images, idx, method.view_size(), generator)
    return clock


def time_monitor(method: SimCLR, test: DeviceImages, test_labels: torch.Tensor) -> Clock:
    with Clock(method.config.device) as clock:
        method.knn_monitor(test, test_labels)
    return clock


def table(result: dict, monitor: bool) -> str:
    wall, cpu = result["seconds"], result["cpu_seconds"]
    images, every = result["images"], result["knn_every"]
    lines = [f"## SimCLR pretraining epoch vs pure model compute ({result['device_name']}, {result['device']}"
             f"{', bf16' if result['amp'] else ''}, {result['threads']} threads)", "",
             f"PreAct ResNet-18 width {result['width']} + projection head, {images} random {result['size']} px images, "
             f"batch {result['batch']} ({2 * result['batch']} views), {result['steps_per_epoch']} steps an epoch; "
             f"median of {result['repeats_done']} interleaved repeats"
             + ("" if result["host_memory_reuse"] else "; glibc malloc at its defaults (--no-host-reuse)"), "",
             "| row | wall s | images/s | x pure (wall) | CPU s | x pure (CPU) |", "|---|---|---|---|---|---|"]
    rows = [("epoch (`SimCLR.train_epoch`)", "epoch", True),
            ("pure compute (fwd + NT-Xent + bwd + step)", "pure", True),
            ("views alone (`simclr_views`, inside the epoch)", "views", False)]
    if monitor:
        rows.append(("kNN monitor, one call", "monitor", False))
    for name, key, rate in rows:
        lines.append(f"| {name} | {wall[key]:.2f} | {f'{images / wall[key]:,.0f}' if rate else ''} | "
                     f"{wall[key] / wall['pure']:.3f} | {cpu[key]:.2f} | {cpu[key] / cpu['pure']:.3f} |")
    if monitor:
        w, c = wall["epoch"] + wall["monitor"] / every, cpu["epoch"] + cpu["monitor"] / every
        lines.append(f"| epoch + kNN monitor / {every} (a run's average epoch) | {w:.2f} | {images / w:,.0f} | "
                     f"{w / wall['pure']:.3f} | {c:.2f} | {c / cpu['pure']:.3f} |")
    ratio = result["ratio_epoch_over_pure"]
    lines += ["", f"epoch / pure compute: {ratio:.3f} wall, {result['cpu_ratio_epoch_over_pure']:.3f} CPU time "
                  f"(target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'missed'})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--width", type=int, default=16, help="PreAct ResNet-18 width (64 = the paper's)")
    parser.add_argument("--images", type=int, default=2048, help="training images (random uint8)")
    parser.add_argument("--test", type=int, default=None, help="test images for the kNN monitor (default images/5)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=256, help="images per step (2x views)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (the table shows medians)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no further repeat once this much time has gone (under a hard time limit)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: as cdmix, on for CUDA, off for a CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the net (as --compile does)")
    parser.add_argument("--no-host-reuse", action="store_true",
                        help="leave glibc's malloc at its defaults (the engine raises its thresholds: "
                             "data.host_images.reuse_freed_host_memory); shows what that setting saves")
    parser.add_argument("--no-monitor", action="store_true", help="skip the kNN monitor rows")
    parser.add_argument("--json", default=None, help="write the figures (and the device name) here, after every repeat")
    parser.add_argument("--markdown", default=None, help="write the table here (after every repeat)")
    args = parser.parse_args(argv)
    if args.test is None:
        args.test = max(args.images // 5, 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine does (fixed batch shapes)
    t_start = time.perf_counter()
    method, test, test_labels = build(args)
    batches = epoch_batches(method)
    steps = len(batches)
    generator = torch.Generator(device=args.device).manual_seed(1)
    views = [simclr_views(method.train.images, idx, method.view_size(), generator) for idx in batches]
    # Warm-up (allocator, kernels, cuDNN's choice, a compiled graph): one step, one batch of views, one monitor.
    time_pure(method, views[:1])
    time_views(method, batches[:1], 0)
    if not args.no_monitor:
        time_monitor(method, test, test_labels)
    print(f"[pretrain_speed] built and warmed up in {time.perf_counter() - t_start:.1f}s; "
          f"{steps} steps an epoch, {args.repeats} repeats", flush=True)
    device_name = (torch.cuda.get_device_name(0) if torch.device(args.device).type == "cuda"
                   else platform.processor() or platform.machine())
    wall: dict[str, list[float]] = {"epoch": [], "pure": [], "views": [], "monitor": []}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    result: dict = {}
    for r in range(args.repeats):
        elapsed = time.perf_counter() - t_start
        if r and args.max_seconds is not None and elapsed + elapsed / (r + 1) > args.max_seconds:
            print(f"[pretrain_speed] stopping after {r} repeats (--max-seconds {args.max_seconds:g})", flush=True)
            break
        clocks = {"epoch": time_epoch(method, 1 + r), "pure": time_pure(method, views),
                  "views": time_views(method, batches, 1 + r)}
        if not args.no_monitor:
            clocks["monitor"] = time_monitor(method, test, test_labels)
        for key, clock in clocks.items():
            wall[key].append(clock.wall)
            cpu[key].append(clock.cpu)
        print(f"[pretrain_speed] repeat {r + 1}: " + ", ".join(f"{k} {c.wall:.2f}s" for k, c in clocks.items()),
              flush=True)
        med = {k: float(np.median(v)) for k, v in wall.items() if v}
        med_cpu = {k: float(np.median(v)) for k, v in cpu.items() if v}
        result = {
            "device": args.device, "device_name": device_name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "model": "preact_resnet18", "width": args.width, "images": args.images,
            "size": args.size, "batch": args.batch, "amp": bool(method.config.amp), "steps_per_epoch": steps,
            "repeats_done": r + 1, "seconds": med, "cpu_seconds": med_cpu, "wall_samples": wall,
            "cpu_samples": cpu, "ratio_epoch_over_pure": med["epoch"] / med["pure"],
            "cpu_ratio_epoch_over_pure": med_cpu["epoch"] / med_cpu["pure"],
            "images_per_s_epoch": args.images / med["epoch"], "images_per_s_pure": args.images / med["pure"],
            "knn_every": method.config.knn_every, "target_ratio": TARGET_RATIO,
            "host_memory_reuse": not args.no_host_reuse,
        }
        if "monitor" in med:
            avg = med["epoch"] + med["monitor"] / method.config.knn_every
            result.update(images_per_s_with_monitor=args.images / avg, ratio_with_monitor=avg / med["pure"])
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        if args.markdown:
            Path(args.markdown).write_text(table(result, not args.no_monitor) + "\n")
    print("\n" + table(result, not args.no_monitor))
    return result


if __name__ == "__main__":
    main()
