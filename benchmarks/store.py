"""The image store at practitioner scale (issue #11): build speed, data-path speed, memory, overhead.

1. Writes ``--images`` JPEGs of ``--jpeg-size`` (default 20,000 at 500 x 375, quality 90) in 10
   class folders: real CIFAR-10 photos (../shared/data/cifar10-subset) upscaled bicubic, randomly
   flipped and shifted, with mild sensor-like noise, so they decode and compress like photos
   (about 30-40 KB each). Without the subset: smooth synthetic scenes.
2. Builds the store at ``--size`` (256) with 1 and with 2 decoding workers: images/s.
3. Data path alone from the warm store at ``--crop`` (224): ``HostImages`` (rows read from the
   store file, prefetched on background threads), random crop + flip + normalise, batches of 64:
   images/s for training batches, RandomResizedCrop batches and evaluation (center crop) batches,
   and the same for device-resident ``DeviceImages`` of the first 4,000 images.
4. A 1-epoch DivideMix run (ResNet-18 of ``--width``, 224 px crops, batch 32) on the first
   ``--train-images`` images with ``--data-placement device`` and ``disk``: seconds, peak resident
   memory, and whether the two runs are bit-identical.
5. The same DivideMix epoch on the whole store with ``--data-placement disk`` and ``--p-threshold
   1`` (no sample passes it, so each net trains on one batch of the 32 most likely clean samples
   against the unlabeled rest: a short co-training, while the division's loss passes, the test
   pass and the label issues still read every image): peak resident memory against the store's size.

    python benchmarks/store.py --work /tmp/storebench --out docs/store_bench.json

With ``--gpu`` (benchmarks/gpu_check.sh): steps 1 and 2 (2 workers), then one DivideMix epoch of
ResNet-50 (``--gpu-model``) at 224 px on CUDA from the store (``--data-placement disk``): the GPU's
name, images/s of the loss passes and of the co-training, and the part of the epoch spent waiting
for rows from the store (``HostImages.waited``; target < 5%).

    python benchmarks/store.py --gpu --images 6000 --work /tmp/cdmix_store_bench --out store_gpu.json

Every step prints its figures; ``--out`` writes them as JSON. Re-running reuses the JPEGs and
stores already in ``--work``. Steps can be skipped (``--skip``) to fit a time budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# ------------------------------------------------------------------------------------------ the JPEGs


def _write_jpegs(task: tuple[int, int, int, int, str]) -> int:
    """Write JPEGs start..stop (one process's share)."""
    from PIL import Image

    start, stop, width, height, folder = task
    subset = SHARED / "cifar10-subset" / "cifar10_subset.npz"
    if subset.is_file():
        with np.load(subset) as npz:
            pool, labels = npz["train_images"], npz["train_labels"]
    else:
        rng = np.random.default_rng(0)
        ys, xs = np.mgrid[0:32, 0:32] / 32
        pool = np.stack([np.stack([(xs * rng.uniform(50, 250) + ys * rng.uniform(0, 250) + rng.uniform(0, 255)) % 256
                                   for _ in range(3)], -1) for _ in range(500)]).astype(np.uint8)
        labels = np.arange(500) % 10
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        k = i % len(pool)
        img = Image.fromarray(pool[k]).resize((width + 40, height + 30), Image.Resampling.BICUBIC)
        dx, dy = rng.integers(0, 41), rng.integers(0, 31)
        pixels = np.asarray(img.crop((dx, dy, dx + width, dy + height)), dtype=np.float32)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        pixels = pixels + rng.normal(0, 4, pixels.shape)  # sensor noise: JPEGs of photo-like size
        path = Path(folder) / f"class_{int(labels[k])}" / f"{i:06d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return stop - start


def make_jpegs(folder: Path, count: int, width: int, height: int, workers: int) -> dict:
    marker = folder / f".complete_{count}_{width}x{height}"
    if marker.is_file():
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    for c in range(10):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bounds = np.linspace(0, count, 4 * workers + 1).astype(int)
    tasks = [(int(a), int(b), width, height, str(folder)) for a, b in zip(bounds[:-1], bounds[1:])]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_jpegs, tasks))
    files = list(folder.rglob("*.jpg"))
    info = {"jpegs": len(files), "jpeg_size": f"{width}x{height}",
            "jpeg_mb": sum(f.stat().st_size for f in files) / 1e6,
            "seconds_to_write": time.perf_counter() - t0}
    marker.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------------- steps


def build(folder: Path, store: Path, size: int, workers: int) -> dict:
    from cdmix.data.sources import prepare_store

    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    built = prepare_store(folder, store, size, workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    return {"workers": workers, "images": len(built), "seconds": seconds, "images_per_s": len(built) / seconds,
            "store_gb": (store / "images.npy").stat().st_size / 1e9}


def warm(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(64 << 20):
            pass


def data_path(store: Path, crop: int, steps: int, threads: int, batch: int = 64) -> dict:
    """images/s of the data path alone (no model): HostImages from the store, DeviceImages in memory."""
    import torch

    torch.set_num_threads(threads)

    from cdmix.data.batches import DeviceImages
    from cdmix.data.host_images import HostImages, reuse_freed_host_memory
    from cdmix.data.sources import load_source

    reuse_freed_host_memory()  # as a training run does (engine.Trainer)
    raw = load_source("store", str(store), seed=0)
    warm(store / "images.npy")
    results = {"threads": torch.get_num_threads(), "batch": batch, "crop": crop}

    def speed(name: str, images, augment: bool, n_steps: int) -> None:
        """images/s of wall time, and per CPU-second used (all threads): the second does not depend on
        what else runs on a shared machine."""
        generator = torch.Generator().manual_seed(0)
        batches = list(torch.randperm(len(images), generator=generator)[: n_steps * batch].split(batch))
        images.batch(batches[0], augment, generator)  # first-call costs out of the timing
        with images.prefetch(batches[1:]):
            t0, cpu0 = time.perf_counter(), time.process_time()
            for idx in batches[1:]:
                images.batch(idx, augment, generator)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        count = (len(batches) - 1) * batch
        results[f"{name}_img_s"] = count / wall
        results[f"{name}_img_per_cpu_s"] = count / cpu

    host = HostImages(raw.train_images, raw.mean, raw.std, "cpu", crop=crop)
    speed("disk_train", host, True, steps)
    speed("disk_eval", host, False, steps)
    resized = HostImages(raw.train_images, raw.mean, raw.std, "cpu", crop=crop, resized_crop=True)
    speed("disk_random_resized_crop", resized, True, steps)
    subset = np.asarray(raw.train_images[: min(4000, len(raw.train_images))])
    device = DeviceImages(subset, raw.mean, raw.std, "cpu", crop=crop)
    speed("device_train", device, True, min(steps, len(subset) // batch))
    speed("device_eval", device, False, min(steps, len(subset) // batch))
    results["peak_rss_mb"] = peak_rss_mb()
    return results


def subset_csv(folder: Path, count: int, path: Path) -> Path:
    """A path,label CSV of the first ``count`` JPEGs (a store of data that fits in memory)."""
    files = sorted(folder.rglob("*.jpg"), key=lambda p: p.name)[:count]
    path.write_text("path,label\n" + "".join(f"{f.relative_to(path.parent)},{f.parent.name}\n" for f in files))
    return path


def train_child(store: Path, out: Path, placement: str, width: int, extra: list[str], threads: int | None) -> dict:
    """One 1-epoch DivideMix run in a fresh process: seconds, its peak resident memory, its metrics."""
    args = ["train", "--dataset", "store", "--data-path", str(store), "--method", "dividemix", "--epochs", "1",
            "--warmup", "0", "--model", "resnet18", "--width", str(width), "--batch-size", "32",
            "--eval-batch-size", "64", "--data-placement", placement, "--no-progress", "--overwrite",
            "--out", str(out), *extra]
    t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    summary = json.loads((out / "summary.json").read_text())
    return {"placement": placement, "seconds_wall": wall, "seconds_run": summary["seconds_total"], "cpu_seconds": cpu,
            "peak_rss_mb": rss, "train_images": summary["num_train"], "test_acc": summary["test_acc_last"],
            "metrics": (out / "metrics.csv").read_text()}


def gpu_epoch(store: Path, work: Path, model: str, batch: int, device: str = "cuda", width: int | None = None) -> dict:
    """One DivideMix epoch (division, co-training of both nets, test, label issues) on CUDA from the store."""
    import torch

    from cdmix import runs
    from cdmix.config import Config
    from cdmix.engine import start_run

    run_dir = work / "run_gpu"
    config = Config(dataset="store", data_path=str(store), method="dividemix", epochs=1, warmup=0, model=model,
                    width=width, batch_size=batch, device=device, data_placement="disk", progress=False, overwrite=True,
                    out=str(run_dir))
    trainer = start_run(config)
    t0 = time.perf_counter()
    trainer.run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    held = [trainer.train.images, trainer.test_images] + ([trainer.val_images] if trainer.val_images else [])
    waited = sum(getattr(images, "waited", 0.0) for images in held)
    row = runs.read_metrics(run_dir)[-1]
    n_train = len(trainer.train)
    seconds_train = row["seconds_train_net1"] + row["seconds_train_net2"]
    labeled = row["labeled_used_net1"] + row["labeled_used_net2"]
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else device
    return {"gpu": name, "model": model, "batch": batch, "train_images": n_train,
            "seconds_epoch": seconds, "seconds_waiting_for_data": waited, "wait_fraction": waited / seconds,
            "loss_pass_img_s": 2 * n_train / row["seconds_divide"],
            "cotrain_labeled_img_s": labeled / seconds_train,
            "cotrain_all_views_img_s": 4 * labeled / seconds_train,  # x1, x2, u1, u2 per labeled sample
            "amp": trainer.config.amp}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that over from the
    parent through fork and exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: list[str]) -> int:
    from cdmix.cli import main

    code = main(args)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
    return code


def _strip_seconds(metrics_csv: str) -> list[list[str]]:
    lines = [line.split(",") for line in metrics_csv.strip().splitlines()]
    keep = [i for i, name in enumerate(lines[0]) if not name.startswith("seconds")]
    return [[row[i] for i in keep] for row in lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cdmix_store_bench"))
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--jpeg-size", default="500x375")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--steps", type=int, default=60, help="batches of 64 per data-path measurement")
    parser.add_argument("--train-images", type=int, default=1000, help="images of the device-vs-disk epoch")
    parser.add_argument("--width", type=int, default=8, help="ResNet-18 width of the DivideMix epochs")
    parser.add_argument("--repeats", type=int, default=1, help="device / disk epoch pairs (alternating)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("build", "build1", "data", "epoch", "full"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the training runs (default: "
                        "torch's choice; 1 keeps runs comparable when other jobs share the cores)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--gpu", action="store_true", help="the CUDA check instead of steps 3-5 (see above)")
    parser.add_argument("--gpu-model", default="resnet50")
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument("--gpu-device", default="cuda", help="cpu: a dry run of --gpu at toy sizes")
    parser.add_argument("--gpu-width", type=int, default=None, help="model width of --gpu (default: the model's)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.jpeg_size.split("x"))
    cores = len(os.sched_getaffinity(0))
    results: dict = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cores": cores,
                     "python": platform.python_version(), "command": " ".join(sys.argv)}

    def report(key: str, value) -> None:
        results[key] = value
        shown = {k: v for k, v in value.items() if k != "metrics"} if isinstance(value, dict) else value
        print(f"{key}: {json.dumps(shown, default=str)}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")

    folder = args.work / "jpegs"
    report("jpegs", make_jpegs(folder, args.images, width, height, max(1, cores)))
    store = args.work / "store"
    if "build" not in args.skip or not (store / "manifest.json").is_file():
        report("build_2_workers", build(folder, store, args.size, 2))
    if args.gpu:
        report("gpu_epoch", gpu_epoch(store, args.work, args.gpu_model, args.gpu_batch, args.gpu_device,
                                      args.gpu_width))
        return 0
    if "build1" not in args.skip:
        report("build_1_worker", build(folder, args.work / "store_1worker", args.size, 1))
        shutil.rmtree(args.work / "store_1worker", ignore_errors=True)
    if "data" not in args.skip:
        for threads in (1, 2):
            report(f"data_path_{threads}_thread", data_path(store, args.crop, args.steps, threads))
    if "epoch" not in args.skip:
        from cdmix.data.sources import prepare_store

        small = args.work / f"store_{args.train_images}"
        prepare_store(subset_csv(folder, args.train_images, args.work / "subset.csv"), small, args.size,
                      workers=2, progress=False)
        for repeat in range(args.repeats):  # alternating, so load from other jobs hits both alike
            runs = {p: train_child(small, args.work / f"run_{p}", p, args.width, [], args.threads) for p in ("device", "disk")}
            report(f"epoch_device_{repeat}", runs["device"])
            report(f"epoch_disk_{repeat}", runs["disk"])
        report("epoch_overhead", {
            "disk_vs_device_seconds": sum(results[f"epoch_disk_{r}"]["seconds_run"] for r in range(args.repeats))
            / sum(results[f"epoch_device_{r}"]["seconds_run"] for r in range(args.repeats)) - 1,
            "disk_vs_device_cpu_seconds": sum(results[f"epoch_disk_{r}"]["cpu_seconds"] for r in range(args.repeats))
            / sum(results[f"epoch_device_{r}"]["cpu_seconds"] for r in range(args.repeats)) - 1,
            "bit_identical_metrics": (_strip_seconds(runs["disk"]["metrics"])
                                      == _strip_seconds(runs["device"]["metrics"]))})
    if "full" not in args.skip:
        run = train_child(store, args.work / "run_full", "disk", args.width, ["--p-threshold", "1.0"], args.threads)
        run["store_gb"] = (store / "images.npy").stat().st_size / 1e9
        report("epoch_full_store_disk", run)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
