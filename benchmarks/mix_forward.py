"""Step time of DivideMix's MixUp forward: all 4B mixed rows (official CIFAR code) against only the
2B labeled rows (official Clothing1M / WebVision code, ``mix_forward = "labeled"``).

Each timed step is ``loss_parts`` + backward + SGD step of net 1 on a fixed batch, 32 px images,
PreAct ResNet-18; the two modes alternate (ABAB...) so a busy neighbour slows both alike. Prints a
table and the ratio labeled / all.

    python benchmarks/mix_forward.py --threads 2 --width 16 --batch 64 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cdmix.config import Config, resolve
from cdmix.data.batches import DeviceImages
from cdmix.engine import seed_epoch
from cdmix.methods.base import TrainSet
from cdmix.methods.dividemix import DivideMix


def build(mode: str, width: int, batch: int, n: int) -> DivideMix:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = torch.as_tensor(rng.integers(0, 10, size=n))
    train = TrainSet(DeviceImages(images, (0.5,) * 3, (0.25,) * 3, "cpu"), labels, None, np.arange(n), 10)
    config = resolve(Config(model="preact_resnet18", width=width, batch_size=batch, warmup=1, epochs=2,
                            lambda_u=0.0, mix_forward=mode, progress=False), 10, 32)
    torch.manual_seed(0)
    return DivideMix(config, train)


def time_steps(method: DivideMix, batch: int, steps: int) -> float:
    ctx = seed_epoch(method.config, 1)
    idx_x, idx_u = torch.arange(batch), torch.arange(batch, 2 * batch)
    weights = torch.full((len(method.train),), 0.7)
    optimizer = method.optimizers[0]
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = method.loss_parts(0, 1, idx_x, idx_u, weights, 0.0, ctx)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {mode: build(mode, args.width, args.batch, 4 * args.batch) for mode in ("all", "labeled")}
    for method in methods.values():
        time_steps(method, args.batch, 2)  # warm-up of the allocator and kernels
    times: dict[str, list[float]] = {mode: [] for mode in methods}
    for _ in range(args.repeats):
        for mode, method in methods.items():
            times[mode].append(time_steps(method, args.batch, args.steps))
    print(f"| mix_forward | ms/step (median of {args.repeats}) | rows forwarded |")
    print("|---|---|---|")
    for mode in methods:
        print(f"| {mode} | {1000 * np.median(times[mode]):.0f} | {4 * args.batch if mode == 'all' else 2 * args.batch} |")
    print(f"\nlabeled / all: {np.median(times['labeled']) / np.median(times['all']):.2f}  "
          f"(width {args.width}, batch {args.batch}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
