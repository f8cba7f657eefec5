"""The training loop: data, epochs, learning rate, evaluation, checkpoints, resume.

It never knows which method runs: a ``Method`` trains one epoch, the engine does the rest.
Every epoch is seeded from (seed, epoch), so a resumed run replays exactly the epochs it missed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdmix import distributed, runs
from cdmix.config import Config, load_json, resolve, save_json, validate
from cdmix.data.batches import DeviceImages
from cdmix.data.noise import apply_noise
from cdmix.data.sources import load_source
from cdmix.data.types import RawData
from cdmix.errors import UserError
from cdmix.methods import build_method
from cdmix.methods.base import EpochContext, Method, TrainSet

logger = logging.getLogger("cdmix")


@dataclass
class RunResult:
    """What ``train`` returns: where the run lives and how it ended."""

    run_dir: Path
    test_acc_best: float
    test_acc_last: float
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PreparedData:
    raw: RawData
    noise_info: dict[str, Any]
    train_pos: np.ndarray  # positions of the training part (the rest is validation)
    val_pos: np.ndarray


def load_data(config: Config) -> PreparedData:
    """Source arrays with the run's label noise applied and the validation part split off."""
    raw = load_source(config.dataset, config.data_path, labels=config.labels, label_file=config.label_file,
                      download=config.download, image_size=config.image_size, seed=config.seed,
                      progress=config.progress)
    if config.open_set_classes:
        from cdmix.data.openset import held_out_classes

        raw, noise_info = held_out_classes(raw, config.open_set_classes, config.noise_rate, config.noise_mode,
                                           config.seed)
    else:
        raw, noise_info = apply_noise(raw, config.noise_mode, config.noise_rate, config.seed, config.noise_file)
    if config.open_set_rate > 0:
        from cdmix.data.openset import apply_open_set

        raw, open_info = apply_open_set(raw, config.open_set_rate, config.open_set_source, config.seed)
        noise_info.update(open_info)
    if config.normalization == "imagenet" and raw.train_images.shape[-1] == 3:
        from cdmix.data.sources import IMAGENET_MEAN, IMAGENET_STD

        raw = dataclasses.replace(raw, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    n = len(raw.train_labels)
    order = np.random.default_rng([config.seed, 7]).permutation(n)
    n_val = int(round(config.val_fraction * n))
    return PreparedData(raw, noise_info, np.sort(order[n_val:]), np.sort(order[:n_val]))


def lr_at(config: Config, epoch: int) -> float:
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.lr if epoch < config.lr_step else config.lr / 10.0


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_epoch(config: Config, epoch: int) -> EpochContext:
    """Seed every random source for ``epoch`` from (seed, epoch) alone (and the rank, for augmentation)."""
    s = epoch_seed(config.seed, epoch)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    generator = torch.Generator(device=config.device)
    generator.manual_seed(s)
    info = distributed.current()
    aug_generator = None
    if info.enabled:
        aug_generator = torch.Generator(device=config.device)
        aug_generator.manual_seed(int(np.random.SeedSequence([config.seed, epoch, info.rank]).generate_state(1)[0]))
    return EpochContext(epoch=epoch, generator=generator, rng=np.random.default_rng(s),
                        progress=config.progress and info.is_main, aug_generator=aug_generator)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


class Trainer:
    """Holds one run: its config, data on the device, method, and run folder."""

    def __init__(self, config: Config, run_dir: Path, data: PreparedData, resume: bool):
        self.dist = distributed.current()
        self.config = config
        self.run_dir = run_dir
        self.data = data
        raw = data.raw
        device = torch.device(config.device)
        channels_last = device.type == "cuda"
        if channels_last:
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its kernels
        labels = torch.as_tensor(raw.train_labels, dtype=torch.int64)
        true = raw.train_true_labels
        train_idx = torch.as_tensor(data.train_pos)
        all_images = DeviceImages(raw.train_images, raw.mean, raw.std, device, channels_last)
        self.train = TrainSet(
            images=all_images.subset(train_idx),
            labels=labels[train_idx].to(device),
            true_labels=None if true is None else torch.as_tensor(true, dtype=torch.int64)[train_idx].to(device),
            index=data.train_pos,
            num_classes=raw.num_classes,
            is_ood=None if raw.train_is_ood is None else torch.as_tensor(raw.train_is_ood)[train_idx].to(device),
        )
        self.val_images = all_images.subset(torch.as_tensor(data.val_pos)) if len(data.val_pos) else None
        self.val_labels = labels[torch.as_tensor(data.val_pos)].to(device) if len(data.val_pos) else None
        self.test_images = DeviceImages(raw.test_images, raw.mean, raw.std, device, channels_last)
        self.test_labels = torch.as_tensor(raw.test_labels, dtype=torch.int64, device=device)
        torch.manual_seed(config.seed)
        self.method: Method = build_method(config, self.train)
        self.start_epoch = 0
        self.best_acc = -1.0
        self.best_epoch = -1
        self.seconds_before = 0.0
        self.collapse_count = 0
        self.last_selected: float | None = None
        if resume:
            state = runs.load_checkpoint(run_dir / runs.CHECKPOINT, map_location=str(device))
            self.method.load_state_dict(state["method"])
            set_rng_states(state["rng"])
            self.start_epoch = state["epoch"] + 1
            self.best_acc = state["best_acc"]
            self.best_epoch = state["best_epoch"]
            self.seconds_before = state["seconds"]
            self.collapse_count = state.get("collapse_count", 0)
            self.last_selected = state.get("last_selected")

    # ----- evaluation
    def evaluate(self) -> dict[str, float]:
        bs = self.config.eval_batch_size
        logits = self.method.predict_logits(self.test_images, bs)
        row = {"test_acc": accuracy(torch.stack(logits).sum(0), self.test_labels)}
        if len(logits) > 1:
            for i, net_logits in enumerate(logits, start=1):
                row[f"test_acc_net{i}"] = accuracy(net_logits, self.test_labels)
        if self.val_images is not None:
            val_logits = torch.stack(self.method.predict_logits(self.val_images, bs)).sum(0)
            row["val_acc"] = accuracy(val_logits, self.val_labels)
        return row

    def checkpoint_state(self, epoch: int, seconds: float) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "method": self.method.state_dict(),
            "rng": rng_states(),
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "seconds": seconds,
            "collapse_count": self.collapse_count,
            "last_selected": self.last_selected,
            "config": self.config.to_dict(),
        }

    def run(self) -> RunResult:
        config = self.config
        main = self.dist.is_main
        log = runs.MetricsLog(self.run_dir, self.start_epoch, tensorboard=main)
        last_row: dict[str, Any] = {}
        t_run = time.perf_counter()
        say(f"run folder: {self.run_dir}" + (f"  ({self.dist.world_size} processes)" if self.dist.enabled else ""))
        try:
            for epoch in range(self.start_epoch, config.epochs):
                t0 = time.perf_counter()
                ctx = seed_epoch(config, epoch)
                lr = lr_at(config, epoch)
                self.method.set_lr(lr)
                try:
                    stats = self.method.train_epoch(ctx)
                except torch.OutOfMemoryError:
                    raise UserError(f"CUDA ran out of memory at batch size {config.batch_size}; "
                                    "try a smaller --batch-size") from None
                t_test = time.perf_counter()
                evaluation = self.evaluate()
                seconds_test = time.perf_counter() - t_test
                row = {"epoch": epoch, "lr": lr, **stats, **evaluation,
                       "seconds_test": seconds_test, "seconds": time.perf_counter() - t0}
                select_acc = row.get("val_acc", row["test_acc"])
                if select_acc > self.best_acc:
                    self.best_acc, self.best_epoch = select_acc, epoch
                    improved = True
                else:
                    improved = False
                self.watch_collapse(row, select_acc)
                last_row = row
                seconds = self.seconds_before + time.perf_counter() - t_run
                if main:  # only rank 0 writes the run folder
                    log.log(row)
                    log.log_division(epoch, self.method.last_division)
                    paths = [self.run_dir / runs.CHECKPOINT] + ([self.run_dir / runs.BEST] if improved else [])
                    runs.atomic_torch_save(self.checkpoint_state(epoch, seconds), *paths)
                    self.write_summary(epoch, seconds, log.rows)
                    print(epoch_line(config, row, self.best_acc))
                distributed.barrier(self.dist)
        finally:
            log.close()
        if not last_row and self.start_epoch >= config.epochs:
            say(f"run already finished ({config.epochs} epochs)")
        self.write_label_issues()
        distributed.barrier(self.dist)
        summary = runs.read_summary(self.run_dir)
        return RunResult(self.run_dir, summary["test_acc_best"], summary["test_acc_last"], summary, log.rows)

    def watch_collapse(self, row: dict[str, Any], select_acc: float) -> None:
        """Flag a sharp drop below the best accuracy, or of the selected-set size, so a late
        collapse is seen when it happens (and, with --on-collapse rollback, undone)."""
        selected = row.get("labeled_net1", row.get("frac_clean"))
        if selected is not None and self.last_selected and selected < 0.5 * self.last_selected:
            row["selection_drop"] = 1
            logger.warning(f"the selected (clean) set shrank from {self.last_selected:g} to {selected:g}")
        if selected is not None:
            self.last_selected = selected
        drop = self.best_acc - select_acc
        row["collapse"] = int(drop >= self.config.collapse_drop)
        if row["collapse"]:
            self.collapse_count += 1
            logger.warning(f"accuracy dropped {drop:.1f} points below the best ({self.best_acc:.2f}% "
                        f"at epoch {self.best_epoch}): the run may be collapsing")
            if self.config.on_collapse == "rollback":
                self.rollback(row)

    def rollback(self, row: dict[str, Any]) -> None:
        """Restore the best checkpoint and continue with the lr and pseudo-label weight cut."""
        state = runs.load_checkpoint(self.run_dir / runs.BEST, map_location=self.config.device)
        self.method.load_state_dict(state["method"])
        self.method.on_rollback(self.collapse_count)
        row["rollback"] = 1
        logger.warning(f"rolled back to epoch {state['epoch']}; lr and pseudo-label weight cut "
                    f"x{0.5 ** self.collapse_count:g}")

    def write_summary(self, epoch: int, seconds: float, rows: list[dict[str, Any]]) -> None:
        tests = [float(r["test_acc"]) for r in rows]
        summary = {
            "dataset": self.config.dataset,
            "method": self.config.method,
            "preset": self.config.preset,
            "epochs_done": epoch + 1,
            "epochs": self.config.epochs,
            "test_acc_best": max(tests),
            "test_acc_best_epoch": int(np.argmax(tests)),
            "test_acc_last": tests[-1],
            "selected_epoch": self.best_epoch,
            "selected_by": "val_acc" if self.val_images is not None else "test_acc",
            "seconds_total": seconds,
            "device": device_name(self.config.device),
            "num_train": len(self.train),
            "num_val": 0 if self.val_labels is None else len(self.val_labels),
            "num_test": len(self.test_labels),
            "collapse_warnings": self.collapse_count,
            **self.data.noise_info,
        }
        if self.train.true_labels is not None:
            summary["noise_rate_actual_train"] = float((self.train.labels != self.train.true_labels).float().mean())
        runs.write_summary(self.run_dir, summary)

    def write_label_issues(self) -> None:
        from cdmix.issues import write_label_issues

        clean_prob = self.method.clean_prob()
        logits = torch.stack(self.method.predict_logits(self.train.images, self.config.eval_batch_size)).sum(0)
        if not self.dist.is_main:
            return
        write_label_issues(
            self.run_dir / runs.LABEL_ISSUES,
            index=self.train.index,
            given_label=self.train.labels.cpu().numpy(),
            predicted_label=logits.argmax(1).cpu().numpy(),
            clean_prob=clean_prob,
            true_label=None if self.train.true_labels is None else self.train.true_labels.cpu().numpy(),
        )
        division = self.method.last_division or {}
        np.savez(self.run_dir / runs.DIVISION, index=self.train.index,
                 **{k: np.asarray(v) for k, v in division.items()},
                 **({} if self.train.true_labels is None else
                    {"is_noisy": (self.train.labels != self.train.true_labels).cpu().numpy()}))


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def epoch_line(config: Config, row: dict[str, Any], best: float) -> str:
    parts = [f"epoch {row['epoch'] + 1}/{config.epochs}", f"lr {row['lr']:.4g}"]
    if "train_loss" in row:
        parts.append(f"loss {row['train_loss']:.3f}")
    if "labeled_net1" in row:
        parts.append(f"labeled {int(row['labeled_net1'])}/{int(row['labeled_net2'])}")
    if "sel_auc_net1" in row and row["sel_auc_net1"] == row["sel_auc_net1"]:
        parts.append(f"sel-AUC {row['sel_auc_net1']:.3f}")
    if "val_acc" in row:
        parts.append(f"val {row['val_acc']:.2f}%")
    parts.append(f"test {row['test_acc']:.2f}%")
    parts.append(f"(best {best:.2f}%)")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


def say(text: str) -> None:
    """Print on rank 0 only (every line once under torchrun)."""
    if distributed.current().is_main:
        print(text, flush=True)


def start_run(config: Config) -> Trainer:
    """Load the data, resolve the config, create the run folder and the trainer for a new run."""
    validate(config)
    data = load_data(config)
    config = resolve(config, data.raw.num_classes, data.raw.image_size)
    info, rank_device = distributed.setup(config.device)
    run_dir = Path(config.out) if config.out else runs.default_run_dir(config.dataset, config.method)
    run_dir = Path(distributed.broadcast_object(str(run_dir), info))
    config = config.replace(out=str(run_dir))
    if info.is_main:
        runs.prepare_run_dir(run_dir, config.overwrite)
        save_json(config, run_dir / runs.CONFIG)
        save_labels(run_dir, data)
        print_data_line(config, data)
    distributed.barrier(info)
    return Trainer(config.replace(device=rank_device), run_dir, data, resume=False)


def resume_run(run_dir: str | Path) -> Trainer:
    run_dir = Path(run_dir)
    if not (run_dir / runs.CONFIG).is_file():
        raise UserError(f"{run_dir} is not a cdmix run folder (no {runs.CONFIG})")
    if not (run_dir / runs.CHECKPOINT).is_file():
        raise UserError(f"{run_dir} has no {runs.CHECKPOINT}; nothing to resume (did the first epoch finish?)")
    config = load_json(run_dir / runs.CONFIG)
    data = load_data(config)
    saved = np.load(run_dir / runs.LABELS)
    if not np.array_equal(saved["train_labels"], data.raw.train_labels):
        raise UserError(f"the data no longer matches the labels saved in {run_dir / runs.LABELS}; "
                        "was the dataset or noise file changed?")
    info, rank_device = distributed.setup(config.device)
    say(f"resuming {run_dir}")
    return Trainer(config.replace(device=rank_device), run_dir, data, resume=True)


def save_labels(run_dir: Path, data: PreparedData) -> None:
    raw = data.raw
    arrays = {"train_labels": raw.train_labels, "train_pos": data.train_pos, "val_pos": data.val_pos,
              "class_names": np.asarray(raw.class_names)}
    if raw.train_true_labels is not None:
        arrays["train_true_labels"] = raw.train_true_labels
    np.savez(run_dir / runs.LABELS, **arrays)


def print_data_line(config: Config, data: PreparedData) -> None:
    raw, info = data.raw, data.noise_info
    text = (f"data: {config.dataset}  train {len(data.train_pos)}  val {len(data.val_pos)}  "
            f"test {len(raw.test_labels)}  classes {raw.num_classes}  image {raw.image_size}px")
    if info.get("noise_rate_actual") is not None:
        nominal = info.get("noise_rate_nominal")
        nominal_text = f"nominal {nominal:.1%}, " if nominal is not None else ""
        text += f"  noise {info.get('noise_source', '')} ({nominal_text}actual {info['noise_rate_actual']:.1%})"
    print(text)
    print(f"method: {config.method}  model: {config.model}  device: {device_name(config.device)}  "
          f"epochs: {config.epochs}  warm-up: {config.warmup}")


def train(config: Config) -> RunResult:
    """Train a new run described by ``config``; returns a ``RunResult`` (see ``cdmix.train``)."""
    return start_run(config).run()


def resume(run_dir: str | Path) -> RunResult:
    """Continue the run in ``run_dir`` from its last completed epoch."""
    return resume_run(run_dir).run()
