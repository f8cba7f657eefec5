"""Epoch time of hybrid-stable at CIFAR scale (issue #23's GPU step), to price the report's protocol.

Writes an npz of ``--images`` CIFAR-shaped training images (and ``--test`` test images), 10 classes,
each class a colour plus Gaussian pixel noise (learnable in one epoch, so the division splits as on
real noisy data rather than at random), then runs ``cdmix train --preset hybrid-stable`` on it with
``--noise-rate`` symmetric noise (CIFAR-10N worst: 40.2%), model ``--model`` of ``--width``, ``--epochs``
epochs of which ``--warmup`` warm-up, as a subprocess under ``--budget`` seconds. Whatever epochs
finished (metrics.csv is written every epoch) are then summarised in ``--out`` (JSON) and the same
path with ``.md``: seconds per warm-up epoch and per hybrid epoch (train + the test pass; the
checkpoint write is not in it), the labeled samples per net, and the estimate of the report's
protocol (``--protocol-epochs`` 120 of which ``--protocol-warmup`` 10 warm-up) in GPU hours.

The hybrid's steps per epoch follow the labeled set (DivideMix's ``num_iter``), so the estimate holds
for a run whose division keeps about as many samples as this one (the table says how many).

    python benchmarks/hybrid_epoch.py --device cuda --images 50000 --width 64 --epochs 3 --warmup 1 \\
        --budget 120 --work /tmp/hybrid_epoch --out RESULTS/hybrid_gpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_npz(path: Path, images: int, test: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(seed + 1).integers(40, 216, size=(10, 3))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, size=n)
        out = np.empty((n, size, size, 3), dtype=np.uint8)
        for start in range(0, n, 5000):  # bounded float temporaries
            y = labels[start:start + 5000]
            x = rng.normal(0.0, 40.0, size=(len(y), size, size, 3)) + colours[y][:, None, None, :]
            out[start:start + 5000] = np.clip(x, 0, 255).astype(np.uint8)
        return out, labels

    train_images, train_labels = make(images)
    test_images, test_labels = make(test)
    np.savez(path, train_images=train_images, train_labels=train_labels, test_images=test_images,
             test_labels=test_labels)


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def number(row: dict[str, str], key: str) -> float | None:
    value = row.get(key, "")
    try:
        return float(value) if value not in ("", None) else None
    except ValueError:
        return None


def summarise(rows: list[dict[str, str]], warmup: int, args) -> dict:
    warm = [number(r, "seconds") for r in rows if int(r["epoch"]) <= warmup]
    hybrid = [number(r, "seconds") for r in rows if int(r["epoch"]) > warmup]
    labeled = [number(r, "labeled_used_net1") for r in rows if int(r["epoch"]) > warmup]
    warm = [s for s in warm if s is not None]
    hybrid = [s for s in hybrid if s is not None]
    result = {"epochs_done": len(rows), "seconds_warmup_epochs": warm, "seconds_hybrid_epochs": hybrid,
              "labeled_used_net1": labeled, "images": args.images}
    if warm and hybrid:
        # The first hybrid epoch pays cuDNN autotuning of its new shapes: take the last one when there are two.
        per_hybrid = hybrid[-1] if len(hybrid) > 1 else hybrid[0]
        hybrid_epochs = args.protocol_epochs - args.protocol_warmup
        total = args.protocol_warmup * float(np.median(warm)) + hybrid_epochs * per_hybrid
        result.update(seconds_per_warmup_epoch=float(np.median(warm)), seconds_per_hybrid_epoch=per_hybrid,
                      protocol_epochs=args.protocol_epochs, protocol_warmup=args.protocol_warmup,
                      protocol_hours=total / 3600)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--model", default="preact_resnet18", help="preact_resnet18 (width 64) or wrn28 (width 2)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for the training subprocess")
    parser.add_argument("--protocol-epochs", type=int, default=120)
    parser.add_argument("--protocol-warmup", type=int, default=10)
    parser.add_argument("--work", default=None, help="folder for the npz and the run (default: a temp folder)")
    parser.add_argument("--out", required=True, help="JSON result; the markdown table goes next to it (.md)")
    args, extra = parser.parse_known_args(argv)  # any other flag goes to cdmix train
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="cdmix_hybrid_epoch_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"hybrid_{args.images}_{args.test}_{args.size}.npz"
    t0 = time.perf_counter()
    if not data.is_file():
        write_npz(data, args.images, args.test, args.size)
    print(f"[hybrid_epoch] data {data} ({time.perf_counter() - t0:.1f}s)", flush=True)
    run_dir = work / "run"
    command = [sys.executable, "-m", "cdmix", "train", "--preset", "hybrid-stable", "--dataset", "npz",
               "--data-path", str(data), "--model", args.model, "--width", str(args.width),
               "--epochs", str(args.epochs), "--warmup", str(args.warmup), "--noise-rate", str(args.noise_rate),
               "--noise-mode", "sym", "--device", args.device, "--no-progress", "--out", str(run_dir),
               "--overwrite", *extra]
    print("[hybrid_epoch] " + " ".join(command), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t_run = time.perf_counter()
    try:
        rc = subprocess.run(command, env=env, timeout=args.budget).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t_run
    result = summarise(read_metrics(run_dir / "metrics.csv"), args.warmup, args)
    device_name = platform.processor() or platform.machine()
    if args.device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    config_file = run_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    batch, amp = config.get("batch_size"), config.get("amp")
    result.update(device=args.device, device_name=device_name, model=args.model, width=args.width,
                  preset="hybrid-stable", batch_size=batch, amp=amp, noise_rate=args.noise_rate,
                  epochs_asked=args.epochs,
                  warmup=args.warmup, returncode=rc, wall_seconds=wall, command=command)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"## hybrid-stable epoch time ({device_name})", "",
             f"{args.model} width {args.width}, {args.images} CIFAR-shaped images ({args.size} px, 10 colour classes, "
             f"{args.noise_rate:.0%} sym noise), hybrid-stable preset (batch {batch}, {'bf16' if amp else 'fp32'}), "
             f"{args.epochs} epochs with --warmup {args.warmup}; run exit: {rc}, {wall:.0f} s wall", "",
             f"| epoch | kind | seconds | labeled (net1, of {args.images}) |", "|---|---|---|---|"]
    for r in read_metrics(run_dir / "metrics.csv"):
        kind = "warm-up" if int(r["epoch"]) <= args.warmup else "hybrid"
        labeled = number(r, "labeled_used_net1")
        lines.append(f"| {r['epoch']} | {kind} | {number(r, 'seconds') or math.nan:.1f} | "
                     f"{'' if labeled is None else int(labeled)} |")
    if "protocol_hours" in result:
        lines += ["", f"**The report's protocol ({args.protocol_epochs} epochs, {args.protocol_warmup} warm-up) "
                      f"at this pace: {args.protocol_warmup} x {result['seconds_per_warmup_epoch']:.1f} s + "
                      f"{args.protocol_epochs - args.protocol_warmup} x {result['seconds_per_hybrid_epoch']:.1f} s = "
                      f"{result['protocol_hours']:.2f} {'GPU' if args.device.startswith('cuda') else 'device'} "
                      f"hours per run** "
                      f"(one seed; checkpoint writes not counted; the last hybrid epoch's pace)"]
    else:
        lines += ["", "no estimate: not both a warm-up and a hybrid epoch finished within the budget"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
