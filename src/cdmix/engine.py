"""The training loop: data, epochs, learning rate, evaluation, checkpoints, resume.

It never knows which method runs: a ``Method`` trains one epoch, the engine does the rest.
Every epoch is seeded from (seed, epoch), so a resumed run replays exactly the epochs it missed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
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
from cdmix.atomic import atomic_write
from cdmix.config import (Config, crop_size_for, load_json, noise_setting, normalization_for, resolve, save_json,
                          validate)
from cdmix.data.host_images import choose_placement, place_images, reuse_freed_host_memory
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
    # Every training sample scored by the final nets (cdmix.issues.score_samples) and in_sample.
    scores: dict[str, np.ndarray] | None = None
    model: Any = None  # the final nets for inference (cdmix.predict.TrainedModel)
    labels: np.ndarray | None = None  # the labels training used (given, plus any synthetic noise)
    class_names: list[str] = field(default_factory=list)


@dataclass
class PreparedData:
    raw: RawData
    noise_info: dict[str, Any]
    train_pos: np.ndarray  # positions of the training part (the rest is validation)
    val_pos: np.ndarray


def load_data(config: Config, raw: RawData | None = None) -> PreparedData:
    """Source arrays (``raw``, or the config's dataset) with the run's label noise applied and the
    validation part split off."""
    if raw is None:
        raw = load_source(config.dataset, config.data_path, labels=config.labels, label_file=config.label_file,
                          download=config.download, image_size=config.image_size, seed=config.seed,
                          progress=config.progress, extra_data_path=config.extra_data_path,
                          clean_train=config.clean_train)
    noise_mode, noise_rate = noise_setting(config) or (None, 0.0)
    if config.open_set_classes:
        from cdmix.data.openset import held_out_classes

        raw, noise_info = held_out_classes(raw, config.open_set_classes, noise_rate, noise_mode or "sym",
                                           config.seed)
    else:
        if raw.train_true_labels is not None and noise_rate > 0 and config.noise_rate is not None:
            logger.warning(f"{config.dataset} brings its own noisy labels and their true labels; the synthetic "
                           f"noise asked for (--noise-rate {config.noise_rate}) is not added")
        raw, noise_info = apply_noise(raw, noise_mode, noise_rate, config.seed, config.noise_file)
    if config.open_set_rate > 0:
        from cdmix.data.openset import apply_open_set

        raw, open_info = apply_open_set(raw, config.open_set_rate, config.open_set_source, config.seed)
        noise_info.update(open_info)
    if normalization_for(config) == "imagenet" and raw.train_images.shape[-1] == 3:
        from cdmix.data.sources import IMAGENET_MEAN, IMAGENET_STD

        raw = dataclasses.replace(raw, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    n = len(raw.train_labels)
    order = np.random.default_rng([config.seed, 7]).permutation(n)
    # A source with a clean validation set (Clothing1M) selects on it: the noisy set is not split.
    n_val = 0 if raw.val_images is not None else int(round(config.val_fraction * n))
    return PreparedData(raw, noise_info, np.sort(order[n_val:]), np.sort(order[:n_val]))


def lr_at(config: Config, epoch: int, warmup_end: int | None = None) -> float:
    """Learning rate of a 0-based epoch. ``josrc``: the official Jo-SRC plan, constant until
    ``lr_step``, then ``lr * (epochs - epoch) / (epochs - lr_step)``."""
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * epoch / config.epochs))
    if config.schedule == "josrc":
        if epoch < config.lr_step:
            return config.lr
        return config.lr * (config.epochs - epoch) / (config.epochs - config.lr_step)
    step = config.lr_step
    if step is None:  # dividemix with --warmup auto: halfway through the epochs after the warm-up, once it ended
        step = config.epochs if warmup_end is None else warmup_end + (config.epochs - warmup_end) // 2
    return config.lr if epoch < step else config.lr / 10.0


def beta1_at(config: Config, epoch: int) -> float | None:
    """Adam's beta1 of a 0-based epoch (None: leave it): the official Jo-SRC plan drops it from
    ``momentum`` to 0.1 at ``lr_step``."""
    if config.optimizer != "adam":
        return None
    return 0.1 if config.schedule == "josrc" and epoch >= config.lr_step else config.momentum


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


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Percent of rows whose label is among the ``k`` largest logits (N x C logits, C >= k)."""
    if not len(labels):
        return float("nan")
    top = logits.topk(k, dim=1).indices
    return 100.0 * float((top == labels[:, None]).any(1).float().mean())


class Trainer:
    """Holds one run: its config, data on the device, method, and run folder."""

    lock: runs.RunLock | None = None  # the run folder's lock, held by a train or resume (rank 0)
    summary: dict[str, Any] | None = None  # summary.json as last written (or, without a run folder, kept)
    scores: dict[str, np.ndarray] | None = None  # final_scores(), once the run has ended

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __init__(self, config: Config, run_dir: Path, data: PreparedData, resume: bool):
        self.dist = distributed.current()
        self.config = config
        self.run_dir = run_dir
        self.data = data
        raw = data.raw
        device = torch.device(config.device)
        channels_last = device.type == "cuda"
        reuse_freed_host_memory()  # large host blocks (batches, CPU activations) are reused, not refaulted
        if channels_last:
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its kernels
        labels = torch.as_tensor(raw.train_labels, dtype=torch.int64)
        true = raw.train_true_labels
        train_idx = torch.as_tensor(data.train_pos)
        # Today's device-resident images, or host / disk held ones (config.json records which).
        placement = choose_placement(config.data_placement, raw.train_images, raw.test_images, device)
        crop = config.crop_size or crop_size_for(config, raw.image_size)

        def place(images):
            return place_images(images, placement, raw.mean, raw.std, device, channels_last, crop,
                                config.random_resized_crop)

        all_images = place(raw.train_images)
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
        self.clean_val = raw.val_images is not None
        if self.clean_val:  # the source's clean validation set (Clothing1M), not a noisy split
            self.val_images = place(raw.val_images)
            self.val_labels = torch.as_tensor(raw.val_labels, dtype=torch.int64, device=device)
        self.test_images = place(raw.test_images)
        self.test_labels = torch.as_tensor(raw.test_labels, dtype=torch.int64, device=device)
        # Further test sets (WebVision's ILSVRC2012 val): name -> (images, labels).
        self.extra_tests = {name: (place(images), torch.as_tensor(test_labels, dtype=torch.int64, device=device))
                            for name, (images, test_labels) in raw.extra_tests.items()}
        torch.manual_seed(config.seed)
        # A resumed run's nets come from its checkpoint, not from the --pretrained file.
        self.method: Method = build_method(config.replace(pretrained=None) if resume else config, self.train)
        self.pretrained = pretrained_record(run_dir, config, write=not resume and self.dist.is_main)
        self.start_epoch = 0
        self.best_acc = -1.0
        self.best_epoch = -1
        self.seconds_before = 0.0
        self.collapse_count = 0
        self.last_selected: float | None = None
        self.last_select_acc: float | None = None  # the last epoch's selection accuracy (val, else test)
        self.best_state: dict[str, Any] | None = None  # best.pt's method state, kept in memory without a run folder
        self.summary: dict[str, Any] | None = None
        if resume:
            state = runs.load_checkpoint(run_dir / runs.CHECKPOINT, map_location=str(device), config=config)
            runs.restore_method(self.method, state, run_dir / runs.CHECKPOINT)
            set_rng_states(state["rng"])
            self.start_epoch = state["epoch"] + 1
            self.best_acc = state["best_acc"]
            self.best_epoch = state["best_epoch"]
            self.seconds_before = state["seconds"]
            self.collapse_count = state.get("collapse_count", 0)
            self.last_selected = state.get("last_selected")
            self.last_select_acc = state.get("last_select_acc")

    # ----- evaluation
    def evaluate(self) -> dict[str, float]:
        bs = self.config.eval_batch_size
        logits = self.method.predict_logits(self.test_images, bs)
        ensemble = torch.stack(logits).sum(0)
        row = {"test_acc": accuracy(ensemble, self.test_labels)}
        if len(logits) > 1:
            for i, net_logits in enumerate(logits, start=1):
                row[f"test_acc_net{i}"] = accuracy(net_logits, self.test_labels)
        if self.config.top5:
            row["test_top5"] = top_k_accuracy(ensemble, self.test_labels)
        for name, (images, labels) in self.extra_tests.items():
            ensemble = torch.stack(self.method.predict_logits(images, bs)).sum(0)
            row[f"test_acc_{name}"] = accuracy(ensemble, labels)
            if self.config.top5:
                row[f"test_top5_{name}"] = top_k_accuracy(ensemble, labels)
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
            "last_select_acc": self.last_select_acc,
            "config": self.config.to_dict(),
        }

    def run(self) -> RunResult:
        config = self.config
        main = self.dist.is_main
        writes = main and self.run_dir is not None  # no run folder (arrays in, nothing written): memory only
        log = runs.MetricsLog(self.run_dir, self.start_epoch, tensorboard=main) if writes else MemoryLog()
        last_row: dict[str, Any] = {}
        t_run = time.perf_counter()
        if self.run_dir is not None:
            say(f"run folder: {self.run_dir}" + (f"  ({self.dist.world_size} processes)" if self.dist.enabled else ""))
        try:
            for epoch in range(self.start_epoch, config.epochs):
                t0 = time.perf_counter()
                ctx = seed_epoch(config, epoch)
                lr = lr_at(config, epoch, getattr(self.method, "warmup_end", None))
                beta1 = beta1_at(config, epoch)
                self.method.set_lr(lr, beta1)
                try:
                    stats = self.method.train_epoch(ctx)
                except torch.OutOfMemoryError:
                    raise UserError(f"CUDA ran out of memory at batch size {config.batch_size}; "
                                    "try a smaller --batch-size") from None
                t_test = time.perf_counter()
                evaluation = self.evaluate()
                seconds_test = time.perf_counter() - t_test
                row = {"epoch": epoch + 1, "lr": lr, **({} if beta1 is None else {"beta1": beta1}), **stats,
                       **evaluation, "seconds_test": seconds_test, "seconds": time.perf_counter() - t0}
                select_acc = row.get("val_acc", row["test_acc"])
                if select_acc > self.best_acc or math.isnan(select_acc):  # nothing to select by: the latest
                    self.best_acc, self.best_epoch = select_acc, epoch
                    improved = True
                else:
                    improved = False
                if improved and self.run_dir is None:
                    self.best_state = copy.deepcopy(self.method.state_dict())
                self.last_select_acc = select_acc
                self.watch_collapse(row, select_acc)
                last_row = row
                seconds = self.seconds_before + time.perf_counter() - t_run
                if writes:  # only rank 0 writes the run folder
                    log.log(row)
                    log.log_division(epoch + 1, self.method.last_division)
                    paths = [self.run_dir / runs.CHECKPOINT] + ([self.run_dir / runs.BEST] if improved else [])
                    runs.atomic_torch_save(self.checkpoint_state(epoch, seconds), *paths)
                    self.write_summary(epoch, seconds, log.rows)
                elif main:
                    log.log(row)
                    self.summary = self.summary_dict(epoch, seconds, log.rows)
                if main:
                    print(epoch_line(config, row, self.best_acc))
                distributed.barrier(self.dist)
        finally:
            log.close()
        if not last_row and self.start_epoch >= config.epochs:
            say(f"run already finished ({config.epochs} epochs)")
        self.end_with_best_if_collapsed()
        self.write_label_issues()
        distributed.barrier(self.dist)
        summary = self.summary if self.run_dir is None else runs.read_summary(self.run_dir)
        return RunResult(self.run_dir, summary["test_acc_best"], summary["test_acc_last"], summary, log.rows,
                         self.scores, self.trained_model(), self.data.raw.train_labels, list(self.data.raw.class_names))

    def trained_model(self):
        """The final nets (eval mode) as a ``cdmix.predict.TrainedModel``."""
        from cdmix.predict import TrainedModel

        raw = self.data.raw
        nets = [getattr(net, "module", net).eval() for net in self.method.eval_nets()]
        return TrainedModel(nets, list(raw.class_names), raw.image_size, self.train.images.shape[1],
                            tuple(raw.mean), tuple(raw.std), self.config.device)

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
            judged = self.selection_images()
            logger.warning(f"epoch {row['epoch']}: {'val' if 'val_acc' in row else 'test'} accuracy dropped "
                           f"{drop:.1f} points below the best ({self.best_acc:.2f}% at epoch {self.best_epoch + 1}; "
                           f"{round(drop * judged / 100)} of {judged} images): the run may be collapsing")
            if self.config.on_collapse == "rollback":
                self.rollback(row)

    def restore_best(self) -> int:
        """Load the best epoch's method state (best.pt, or its copy in memory without a run folder)
        into the method; returns that epoch, 1-based."""
        if self.run_dir is None:
            self.method.load_state_dict(copy.deepcopy(self.best_state))
        else:
            state = runs.load_checkpoint(self.run_dir / runs.BEST, map_location=self.config.device, config=self.config)
            runs.restore_method(self.method, state, self.run_dir / runs.BEST)
        return self.best_epoch + 1

    def rollback(self, row: dict[str, Any]) -> None:
        """Restore the best checkpoint and continue with the lr and pseudo-label weight cut."""
        epoch = self.restore_best()
        self.method.on_rollback(self.collapse_count)
        row["rollback"] = 1
        logger.warning(f"rolled back to epoch {epoch}; lr and pseudo-label weight cut x{0.5 ** self.collapse_count:g}")

    def ended_collapsed(self) -> bool:
        """The run collapsed and did not recover: collapse warnings, and the last epoch's selection
        accuracy (validation, else test) still below the best by ``collapse_drop`` points and by more
        than chance makes on that many images (``chance_drop``)."""
        if not self.collapse_count or self.last_select_acc is None or self.best_epoch < 0:
            return False
        drop = self.best_acc - self.last_select_acc
        return drop >= max(self.config.collapse_drop, chance_drop(self.best_acc, self.selection_images()))

    def selection_images(self) -> int:
        """How many images the selection accuracy (validation, else test) is measured on."""
        return len(self.val_labels) if self.val_labels is not None else len(self.test_labels)

    def end_with_best_if_collapsed(self) -> None:
        """A run that ended collapsed is scored and exported with its best epoch's nets, not the
        collapsed final ones; summary.json says which (``scored_epoch``, ``ended_collapsed``)."""
        if self.summary is None and self.run_dir is not None and (self.run_dir / runs.SUMMARY).is_file():
            self.summary = runs.read_summary(self.run_dir)  # a finished run resumed: nothing trained now
        if self.summary is None:  # not on rank 0 without a folder: the nets are restored below all the same
            self.summary = {}
        collapsed = self.ended_collapsed()
        scored = self.restore_best() if collapsed else self.summary.get("epochs_done")
        if collapsed and self.dist.is_main:
            logger.warning(f"the run ended collapsed: its label issues, pred_probs.npy and exported nets come from "
                           f"the nets of epoch {scored}, the best ({self.best_acc:.2f}%), not from the final ones")
        self.summary.update(ended_collapsed=collapsed, scored_epoch=scored)
        if self.dist.is_main and self.run_dir is not None:
            runs.write_summary(self.run_dir, self.summary)

    def write_summary(self, epoch: int, seconds: float, rows: list[dict[str, Any]]) -> None:
        self.summary = self.summary_dict(epoch, seconds, rows)
        runs.write_summary(self.run_dir, self.summary)

    def summary_dict(self, epoch: int, seconds: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """summary.json after the 0-based ``epoch`` (epoch numbers in it are 1-based)."""
        tests = [float(r["test_acc"]) if r["test_acc"] != "" else math.nan for r in rows]
        tested = [i for i, t in enumerate(tests) if not math.isnan(t)]  # none without a test set
        best = max(tested, key=lambda i: tests[i]) if tested else None
        summary = {
            "dataset": self.config.dataset,
            "method": self.config.method,
            "preset": self.config.preset,
            "epochs_done": epoch + 1,
            "epochs": self.config.epochs,
            "test_acc_best": None if best is None else tests[best],
            "test_acc_best_epoch": None if best is None else int(float(rows[best]["epoch"])),
            "test_acc_last": None if math.isnan(tests[-1]) else tests[-1],
            "selected_epoch": self.best_epoch + 1,
            "selected_by": "val_acc" if self.val_images is not None else "test_acc",
            "seconds_total": seconds,
            "device": device_name(self.config.device),
            "num_train": len(self.train),
            "num_val": 0 if self.val_labels is None else len(self.val_labels),
            "num_test": len(self.test_labels),
            "collapse_warnings": self.collapse_count,
            **self.pretrained,
            "epoch_numbering": "1-based (epoch 1 is the first)",
            **self.method.summary_info(),
            **self.data.noise_info,
        }
        if self.clean_val or self.extra_tests:
            # The official Clothing1M / WebVision figures: the test sets scored at the selected epoch (best.pt).
            if self.clean_val:
                summary["val_set"] = "clean (the source's validation set)"
            selected = next((r for r in rows if int(float(r["epoch"])) == self.best_epoch + 1), None)
            if selected is not None:
                summary["test_at_selected_epoch"] = {k: float(v) for k, v in selected.items()
                                                     if k.startswith("test_") and v != ""}
        if self.train.true_labels is not None:
            summary["noise_rate_actual_train"] = float((self.train.labels != self.train.true_labels).float().mean())
        return summary

    def final_scores(self) -> dict[str, np.ndarray]:
        """Every training sample, the ``--val-fraction`` part included, scored by the final nets
        (``cdmix.issues.score_samples``), in the dataset's training order; plus ``in_sample``."""
        from cdmix.issues import score_samples

        raw, bs = self.data.raw, self.config.eval_batch_size
        n = len(raw.train_labels)
        parts = [(self.data.train_pos, self.train.images)]
        if self.val_images is not None and not self.clean_val:  # the held-out part of the training set
            parts.append((self.data.val_pos, self.val_images))
        logits: list[np.ndarray] = []
        for pos, images in parts:
            for i, part in enumerate(self.method.predict_logits(images, bs)):
                if len(logits) <= i:
                    logits.append(np.zeros((n, part.shape[1]), dtype=np.float32))
                logits[i][pos] = part.float().cpu().numpy()
        in_sample = np.zeros(n, dtype=bool)
        in_sample[self.data.train_pos] = True
        scores = score_samples(logits, raw.train_labels, in_sample, seed=self.config.seed)
        return {**scores, "in_sample": in_sample}

    def write_label_issues(self) -> None:
        """Score every training sample (``final_scores``) and, on rank 0 with a run folder, write
        label_issues.csv, pred_probs.npy, clean_prob.npy and division.npz."""
        from cdmix.issues import write_label_issues

        if self.method.last_division is None:
            self.method.clean_prob()  # a method without a division fits the loss GMM once (division.npz, report)
        self.scores = self.final_scores()
        if not self.dist.is_main or self.run_dir is None:
            return
        raw, scores = self.data.raw, self.scores
        write_label_issues(
            self.run_dir / runs.LABEL_ISSUES,
            index=np.arange(len(raw.train_labels)),
            given_label=raw.train_labels,
            predicted_label=scores["pred_probs"].argmax(1),
            clean_prob=scores["clean_prob"],
            true_label=raw.train_true_labels,
            issue_score=scores["issue_score"],
            ids=raw.train_ids,
            class_names=raw.class_names,
            scored=np.where(scores["in_sample"], "in-sample", "held-out"),
        )
        atomic_write(self.run_dir / runs.PRED_PROBS, lambda fh: np.save(fh, scores["pred_probs"]))
        atomic_write(self.run_dir / runs.CLEAN_PROB, lambda fh: np.save(fh, scores["clean_prob"]))
        division = self.method.last_division or {}
        arrays = {"index": self.train.index, **{k: np.asarray(v) for k, v in division.items()}}
        if self.train.true_labels is not None:
            arrays["is_noisy"] = (self.train.labels != self.train.true_labels).cpu().numpy()
        atomic_write(self.run_dir / runs.DIVISION, lambda fh: np.savez(fh, **arrays))
        from cdmix.predict import export_model

        export_model(self.run_dir, self.method.eval_nets(), model=self.config.model, width=self.config.width,
                     class_names=raw.class_names, image_size=raw.image_size, in_channels=self.train.images.shape[1],
                     mean=raw.mean, std=raw.std)


class MemoryLog:
    """The metrics of a run without a run folder: rows kept in memory only."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def epoch_line(config: Config, row: dict[str, Any], best: float) -> str:
    parts = [f"epoch {row['epoch']}/{config.epochs}", f"lr {row['lr']:.4g}"]
    if "train_loss" in row:
        parts.append(f"loss {row['train_loss']:.3f}")
    if "labeled_net1" in row:
        parts.append(f"labeled {int(row['labeled_net1'])}/{int(row['labeled_net2'])}")
    if "sel_auc_net1" in row and row["sel_auc_net1"] == row["sel_auc_net1"]:
        parts.append(f"sel-AUC {row['sel_auc_net1']:.3f}")
    if "val_acc" in row:
        parts.append(f"val {row['val_acc']:.2f}%")
    if not math.isnan(row["test_acc"]):
        parts.append(f"test {row['test_acc']:.2f}%")
    if not math.isnan(best):
        parts.append(f"(best {best:.2f}%)")
    parts.append(f"{row['seconds']:.1f}s")
    left = (config.epochs - int(row["epoch"])) * row["seconds"]
    if left >= 60:  # a long run on a CPU should say so after its first epoch, not after hours
        parts.append(f"(~{duration(left)} left at this pace)")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """``2h05m`` / ``14m`` for a human reading an estimate."""
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def say(text: str) -> None:
    """Print on rank 0 only (every line once under torchrun)."""
    if distributed.current().is_main:
        print(text, flush=True)


def start_run(config: Config, raw: RawData | None = None) -> Trainer:
    """Load the data, resolve the config, create the run folder and the trainer for a new run.

    ``raw``: the user's own arrays (``cdmix.data.arrays``) instead of the config's dataset; then a run
    folder is made only when ``config.out`` asks for one (it keeps the arrays as its data).
    """
    validate(config)
    if config.preset and not config.pretrained:
        from cdmix.config import preset_info

        weights = preset_info(config.preset)["info"].get("weights", "")
        if weights.startswith("--pretrained"):
            logger.warning(f"the preset {config.preset} starts from ImageNet weights ({weights}); without "
                           f"--pretrained the network trains from scratch and will not reach the published figure")
    data = load_data(config, raw)
    config = resolve(config, data.raw.num_classes, data.raw.image_size)
    check_labels(data)
    check_input_size(config, data.raw)
    caution = small_data_caution(config, len(data.train_pos))
    info, rank_device = distributed.setup(config.device)
    if caution and info.is_main:
        logger.warning(caution)
    placement = choose_placement(config.data_placement, data.raw.train_images, data.raw.test_images, rank_device)
    config = config.replace(data_placement=distributed.broadcast_object(placement, info))
    if raw is not None and not config.out:  # arrays in, no folder asked for: nothing is written
        if info.is_main:
            print_data_line(config, data)
        return Trainer(config.replace(device=rank_device), None, data, resume=False)
    run_dir = Path(config.out) if config.out else runs.default_run_dir(config.dataset, config.method)
    run_dir = Path(distributed.broadcast_object(str(run_dir), info))
    config = config.replace(out=str(run_dir))
    if raw is not None:  # the arrays are kept in the run folder as its data, so it can be resumed
        config = config.replace(dataset="arrays", data_path=str((run_dir / runs.ARRAYS).resolve()))

    def prepare() -> runs.RunLock:
        lock = runs.prepare_run_dir(run_dir, config.overwrite)
        try:
            if raw is not None:
                from cdmix.data.arrays import save_arrays

                save_arrays(run_dir / runs.ARRAYS, raw)
            save_json(config, run_dir / runs.CONFIG)
            save_labels(run_dir, data)
        except BaseException:
            lock.release()
            raise
        print_data_line(config, data)
        return lock

    lock = on_main(info, prepare)
    distributed.barrier(info)
    return _locked_trainer(lock, lambda: Trainer(config.replace(device=rank_device), run_dir, data, resume=False))


def on_main(info: distributed.DistInfo, action):
    """``action()`` on rank 0 (None elsewhere); under torchrun a ``UserError`` there is raised on every
    rank, so no rank waits forever for one that has stopped."""
    if not info.enabled:
        return action()
    result, error = None, None
    if info.is_main:
        try:
            result = action()
        except UserError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error, info)
    if error is not None:
        raise UserError(error)
    return result


def _locked_trainer(lock: runs.RunLock | None, build) -> Trainer:
    """``build()``'s trainer holding ``lock`` (released if building fails)."""
    try:
        trainer = build()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.lock = lock
    return trainer


def resume_run(run_dir: str | Path) -> Trainer:
    run_dir = Path(run_dir)
    if not (run_dir / runs.CONFIG).is_file():
        raise UserError(f"{run_dir} is not a cdmix run folder (no {runs.CONFIG})")
    if not (run_dir / runs.CHECKPOINT).is_file():
        raise UserError(f"{run_dir} has no {runs.CHECKPOINT}; nothing to resume (did the first epoch finish?)")
    config = runs.on_this_machine(load_json(run_dir / runs.CONFIG))  # validated: a hand edit is refused here
    info, rank_device = distributed.setup(config.device)

    def lock_folder() -> runs.RunLock:
        lock = runs.RunLock(run_dir)
        runs.remove_stale_temp_files(run_dir)
        return lock

    lock = on_main(info, lock_folder)

    def build() -> Trainer:
        data = load_data(config)
        check_data_unchanged(run_dir, data)
        say(f"resuming {run_dir}")
        return Trainer(config.replace(device=rank_device), run_dir, data, resume=True)

    return _locked_trainer(lock, build)


def hash_test_split(raw: RawData) -> str:
    """A hash of the test images and labels (hex), saved with the run: evaluate refuses other test data."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    images, labels = raw.test_images, np.ascontiguousarray(raw.test_labels, dtype=np.int64)
    digest.update(repr((tuple(images.shape), str(images.dtype), len(labels))).encode())
    digest.update(labels.tobytes())
    for start in range(0, len(images), 4096):
        digest.update(np.ascontiguousarray(images[start:start + 4096]).tobytes())
    return digest.hexdigest()


def check_data_unchanged(run_dir: Path, data: PreparedData) -> None:
    """Refuse data that is not what the run was trained and tested on (its labels.npz): other training
    labels would resume a different run, another test split would make evaluate score something else."""
    saved = runs.read_labels(run_dir)
    path = run_dir / runs.LABELS
    if not np.array_equal(saved["train_labels"], data.raw.train_labels):
        raise UserError(f"the data no longer matches the labels saved in {path}; "
                        "was the dataset or noise file changed?")
    if "test_fingerprint" not in saved:
        logger.warning(f"{path} predates the test-data check: cannot confirm the test images are the ones the "
                       "run was tested on")
    elif str(saved["test_fingerprint"]) != hash_test_split(data.raw):
        raise UserError(f"the test images or labels differ from those the run was tested on (see {path}); "
                        "was the data folder changed since training? Point --data-path back at the original data")


def check_labels(data: PreparedData) -> None:
    """Warn about labels that make a run silently poor: test labels no training sample has (those test
    images can only count as errors), and ids far beyond the classes in use (a huge output layer)."""
    raw = data.raw
    train = np.unique(raw.train_labels[raw.train_labels >= 0])
    unseen = np.setdiff1d(np.unique(raw.test_labels), train)
    if len(unseen):
        n = int(np.isin(raw.test_labels, unseen).sum())
        names = ", ".join(str(raw.class_names[c]) if 0 <= c < raw.num_classes else str(c) for c in unseen[:5])
        logger.warning(f"{n} test image(s) have label(s) no training image has ({names}"
                       f"{', ...' if len(unseen) > 5 else ''}); the model cannot learn them, so they count as errors")
    unused = raw.num_classes - len(train)
    if unused > max(10, len(train)):
        logger.warning(f"the labels go up to {raw.num_classes - 1} but only {len(train)} different labels occur in "
                       f"training: the network gets a {raw.num_classes}-class output; if the labels are not class "
                       f"indices, renumber them 0..{len(train) - 1}")


def check_input_size(config: Config, raw: RawData) -> None:
    """Refuse images too small for the model, before any training: the model is run on the meta device
    (shapes only, no memory, no compute)."""
    from cdmix.models import create_model

    size, channels = raw.image_size, raw.train_images.shape[-1]
    try:
        with torch.device("meta"):
            net = create_model(config.model, num_classes=raw.num_classes, in_channels=channels, width=config.width)
            net.eval()(torch.zeros(2, channels, size, size))
    except UserError:
        raise
    except Exception as exc:  # only shape errors count; anything else shows in training as it would
        text = str(exc)
        if "too small" in text or "greater than input size" in text or "at least" in text:
            raise UserError(f"{size}px images are too small for {config.model}; use --image-size 32 (folder/csv "
                            "data) or --model small_cnn") from None


def chance_drop(best_acc: float, images: int, z: float = 2.0) -> float:
    """Accuracy points that two evaluations of nets of equal accuracy ``best_acc`` (%) on ``images``
    images differ by at ``z`` standard errors: on 30 images a drop of 24 points from 67% can be chance."""
    n = max(images, 1)
    p = min(max(best_acc / 100, 1 / n), 1 - 1 / n)
    return 100 * z * math.sqrt(2 * p * (1 - p) / n)


# DivideMix from scratch on fewer training images than this failed in our measurements (docs/RESULTS.md,
# "A user's own folder": 270 images collapsed to chance whatever the warm-up).
SMALL_FROM_SCRATCH = 1000


def small_data_caution(config: Config, num_train: int) -> str | None:
    """A warning before a division method trains from scratch on so few images that it failed in our
    measurements; None otherwise."""
    if config.method not in ("dividemix", "hybrid") or config.pretrained or num_train >= SMALL_FROM_SCRATCH:
        return None
    return (f"--method {config.method} trains from scratch on only {num_train} training images; on a few hundred "
            f"images it collapsed in our tests, and --method standard or a pretrained backbone (--pretrained FILE) "
            f"ranked label errors better (README: 'Your own data')")


PRETRAINED = "pretrained.json"


def pretrained_record(run_dir: Path, config: Config, write: bool) -> dict[str, str]:
    """{"pretrained": path, "pretrained_sha256": hex} of the run's --pretrained weights file ({} without
    one): computed and written to ``pretrained.json`` when ``write``, else read back from it."""
    if not config.pretrained:
        return {}
    path = run_dir / PRETRAINED
    if write:
        from cdmix.models.pretrained import sha256_file

        record = {"pretrained": str(Path(config.pretrained).expanduser().resolve()),
                  "pretrained_sha256": sha256_file(Path(config.pretrained).expanduser())}
        atomic_write(path, json.dumps(record, indent=2) + "\n")
        return record
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_labels(run_dir: Path, data: PreparedData) -> None:
    raw = data.raw
    arrays = {"train_labels": raw.train_labels, "train_pos": data.train_pos, "val_pos": data.val_pos,
              "class_names": np.asarray(raw.class_names), "test_fingerprint": np.asarray(hash_test_split(raw))}
    if raw.train_ids is not None:
        arrays["train_ids"] = np.asarray(raw.train_ids, dtype=str)
    if raw.train_true_labels is not None:
        arrays["train_true_labels"] = raw.train_true_labels
    atomic_write(run_dir / runs.LABELS, lambda fh: np.savez(fh, **arrays))


def print_data_line(config: Config, data: PreparedData) -> None:
    raw, info = data.raw, data.noise_info
    val = f"{len(raw.val_labels)} (clean)" if raw.val_labels is not None else len(data.val_pos)
    extra = "".join(f" + {name} {len(labels)}" for name, (_, labels) in raw.extra_tests.items())
    text = (f"data: {config.dataset}  train {len(data.train_pos)}  val {val}  "
            f"test {len(raw.test_labels)}{extra}  classes {raw.num_classes}  image {raw.image_size}px")
    if config.dataset in ("folder", "csv"):
        text += " (your files, resized; --image-size to change)"
    if config.crop_size != raw.image_size or config.random_resized_crop:
        text += f" (crop {config.crop_size}{', random-resized' if config.random_resized_crop else ''})"
    if config.data_placement != "device":
        text += f"  images on {config.data_placement}"
    if info.get("noise_rate_actual") is not None:
        nominal = info.get("noise_rate_nominal")
        nominal_text = f"nominal {nominal:.1%}, " if nominal is not None else ""
        text += f"  noise {info.get('noise_source', '')} ({nominal_text}actual {info['noise_rate_actual']:.1%})"
    elif raw.train_true_labels is None:
        text += "  labels as given (no noise added; which are wrong is unknown: label_issues.csv ranks them)"
    print(text)
    warmup = "" if config.method == "standard" else f"  warm-up: {config.warmup}"
    print(f"method: {config.method}  model: {config.model}  device: {device_name(config.device)}  "
          f"epochs: {config.epochs}{warmup}")


def train(config: Config, raw: RawData | None = None) -> RunResult:
    """Train a new run described by ``config`` (on ``raw``, the user's arrays, when given); returns a
    ``RunResult`` (see ``cdmix.train``)."""
    trainer = start_run(config, raw)
    try:
        return trainer.run()
    finally:
        trainer.release_lock()


def resume(run_dir: str | Path) -> RunResult:
    """Continue the run in ``run_dir`` from its last completed epoch."""
    trainer = resume_run(run_dir)
    try:
        return trainer.run()
    finally:
        trainer.release_lock()
