"""The training loop: for each epoch seed, set the lr, train, evaluate, guard, checkpoint, print.

It never knows which method runs: a ``Method`` trains one epoch and answers the hooks of
``methods.base.Method``; the engine does the rest. Every epoch is seeded from (seed, epoch), so a
resumed run replays exactly the epochs it missed.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdmix import distributed, runs
from cdmix.config import Config, crop_size_for
from cdmix.data.host_images import choose_placement, place_images, reuse_freed_host_memory
from cdmix.engine import artifacts, console
from cdmix.engine.collapse import CollapseGuard
from cdmix.engine.data import PreparedData
from cdmix.engine.schedule import beta1_at, lr_at, with_decided
from cdmix.engine.seeding import rng_states, seed_epoch, set_rng_states
from cdmix.errors import UserError
from cdmix.methods import build_method
from cdmix.methods.base import EvalSets, Method, TrainSet

logger = logging.getLogger("cdmix")

PRETRAINED = "pretrained.json"
# The config fields a method may decide while training (``Method.decided_settings``) and the one that
# follows from them (``schedule.with_decided``): config.json is rewritten with these, and a resume
# accepts a config.json that a kill left one step behind the checkpoint in these alone.
DECIDED_FIELDS = ("warmup", "lr_step")


def update_config_file(path: Path, changes: dict[str, Any]) -> None:
    """Rewrite config.json (as ``config.save_json`` writes it) with ``changes``; the rest as it was."""
    import json

    from cdmix.atomic import atomic_write

    values = json.loads(path.read_text(encoding="utf-8"))
    values.update(changes)
    atomic_write(path, json.dumps(values, indent=2, sort_keys=True) + "\n")


@dataclass
class RunResult:
    """What ``train`` returns: where the run lives and how it ended."""

    run_dir: Path
    test_acc_best: float
    test_acc_last: float
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)  # typed rows (runs.MetricsLog.rows)
    # Every training sample scored by the final nets (cdmix.issues.score_samples) and in_sample.
    scores: dict[str, np.ndarray] | None = None
    model: Any = None  # the final nets for inference (cdmix.predict.TrainedModel)
    labels: np.ndarray | None = None  # the labels training used (given, plus any synthetic noise)
    class_names: list[str] = field(default_factory=list)
    # The method's end-of-training lines (Method.end_of_run_text); None: the CLI's classifier lines.
    end_text: list[str] | None = None


def place_data(config: Config, data: PreparedData) -> tuple[TrainSet, EvalSets]:
    """The training samples and the evaluation sets, placed where ``config.data_placement`` says
    (the device, host memory or the disk store; config.json records which)."""
    raw = data.raw
    device = torch.device(config.device)
    channels_last = device.type == "cuda"
    reuse_freed_host_memory()  # large host blocks (batches, CPU activations) are reused, not refaulted
    if channels_last:
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its kernels
    labels = torch.as_tensor(raw.train_labels, dtype=torch.int64)
    true = raw.train_true_labels
    train_idx = torch.as_tensor(data.train_pos)
    placement = choose_placement(config.data_placement, raw.train_images, raw.test_images, device)
    crop = config.crop_size or crop_size_for(config, raw.image_size)

    def place(images):
        return place_images(images, placement, raw.mean, raw.std, device, channels_last, crop,
                            config.random_resized_crop)

    def as_labels(values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int64, device=device)

    all_images = place(raw.train_images)
    train = TrainSet(
        images=all_images.subset(train_idx),
        labels=labels[train_idx].to(device),
        true_labels=None if true is None else torch.as_tensor(true, dtype=torch.int64)[train_idx].to(device),
        index=data.train_pos,
        num_classes=raw.num_classes,
        is_ood=None if raw.train_is_ood is None else torch.as_tensor(raw.train_is_ood)[train_idx].to(device),
    )
    sets = EvalSets(test_images=None, test_labels=None, batch_size=config.eval_batch_size, top5=config.top5)
    if len(data.val_pos):
        sets.val_images = all_images.subset(torch.as_tensor(data.val_pos))
        sets.val_labels = labels[torch.as_tensor(data.val_pos)].to(device)
    sets.clean_val = raw.val_images is not None
    if sets.clean_val:  # the source's clean validation set (Clothing1M), not a noisy split
        sets.val_images, sets.val_labels = place(raw.val_images), as_labels(raw.val_labels)
    sets.test_images, sets.test_labels = place(raw.test_images), as_labels(raw.test_labels)
    # Further test sets (WebVision's ILSVRC2012 val): name -> (images, labels).
    sets.extra_tests = {name: (place(images), as_labels(test_labels))
                        for name, (images, test_labels) in raw.extra_tests.items()}
    return train, sets


class Trainer:
    """Holds one run: its config, data placed for training, method, collapse guard and run folder.

    Build one with ``Trainer.fresh`` (a new run: the nets start from ``--pretrained`` when given) or
    ``Trainer.from_checkpoint`` (a resumed or evaluated run: the nets come from the checkpoint).
    """

    lock: runs.RunLock | None = None  # the run folder's lock, held by a train or resume (rank 0)
    summary: dict[str, Any] | None = None  # summary.json as last written (or, without a run folder, kept)
    scores: dict[str, np.ndarray] | None = None  # the classifier's final scores, once the run has ended

    def __init__(self, config: Config, run_dir: Path | None, data: PreparedData, *, from_pretrained: bool):
        self.dist = distributed.current()
        self.config = config
        self.run_dir = run_dir
        self.data = data
        self.train, self.sets = place_data(config, data)
        torch.manual_seed(config.seed)
        # A resumed or evaluated run's nets come from its checkpoint, not from the --pretrained file.
        self.method: Method = build_method(config if from_pretrained else config.replace(pretrained=None),
                                           self.train)
        self.selection_key = self.method.selection_key(self.sets)
        self.guard = CollapseGuard(config.collapse_drop, self.sets.selection_images())
        self.pretrained: dict[str, str] = {}
        self.start_epoch = 0
        self.seconds_before = 0.0
        self.best_state: dict[str, Any] | None = None  # best.pt's method state, kept in memory without a run folder
        self.time_left = console.TimeLeft()

    @classmethod
    def fresh(cls, config: Config, run_dir: Path | None, data: PreparedData) -> "Trainer":
        """A new run: nets from ``--pretrained`` (recorded in pretrained.json) or from scratch."""
        trainer = cls(config, run_dir, data, from_pretrained=True)
        trainer.pretrained = pretrained_record(run_dir, config, write=trainer.dist.is_main)
        return trainer

    @classmethod
    def from_checkpoint(cls, config: Config, run_dir: Path, data: PreparedData, name: str = runs.CHECKPOINT,
                        state: dict[str, Any] | None = None, resume: bool = True) -> "Trainer":
        """The run in ``run_dir`` with its method restored from the checkpoint ``name`` (``state``:
        that checkpoint already loaded). ``resume``: also its random states, epoch, timing and
        collapse guard, to continue training; else only the nets (``cdmix evaluate``). The
        ``--pretrained`` file is neither read nor recorded again: the weights are in the checkpoint."""
        trainer = cls(config, run_dir, data, from_pretrained=False)
        trainer.pretrained = pretrained_record(run_dir, config, write=False)
        path = run_dir / name
        if state is None:
            state = runs.load_checkpoint(path, map_location=config.device, config=config)
        runs.restore_method(trainer.method, state, path)
        if resume:
            set_rng_states(state["rng"])
            trainer.start_epoch = state["epoch"] + 1
            trainer.seconds_before = state["seconds"]
            trainer.guard.load_state_dict(state)
            if trainer.record_decisions() and trainer.dist.is_main:  # a run from before config.json recorded them
                trainer.write_decisions()
        return trainer

    def checkpoint_state(self, epoch: int, seconds: float) -> dict[str, Any]:
        """Everything a resume needs (``from_checkpoint`` reads it back): the 0-based epoch, the method,
        the random states, the seconds so far, the config and world size it ran with, the guard."""
        return {"epoch": epoch, "method": self.method.state_dict(), "rng": rng_states(), "seconds": seconds,
                "config": self.config.to_dict(), "world_size": self.dist.world_size, **self.guard.state_dict()}

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # ----- compatibility: the evaluation sets under their former names
    test_images = property(lambda self: self.sets.test_images)
    test_labels = property(lambda self: self.sets.test_labels)
    val_images = property(lambda self: self.sets.val_images)
    val_labels = property(lambda self: self.sets.val_labels)
    extra_tests = property(lambda self: self.sets.extra_tests)
    clean_val = property(lambda self: self.sets.clean_val)

    def evaluate(self) -> dict[str, float]:
        """The method's evaluation row for this epoch (``Method.evaluation_row``)."""
        return self.method.evaluation_row(self.sets)

    def record_decisions(self) -> bool:
        """Take into the config what the method decided while training (``Method.decided_settings``:
        the automatic warm-up) and the lr step that follows (``write_decisions`` puts them in
        config.json). True if something new was decided."""
        config = with_decided(self.config, self.method.decided_settings())
        if config is self.config:
            return False
        self.config = config
        return True

    def write_decisions(self) -> None:
        """config.json with the decided settings (``record_decisions``); every other field as it was
        (the device there is the run's, not this process's)."""
        changes = {k: getattr(self.config, k) for k in DECIDED_FIELDS}
        update_config_file(self.run_dir / runs.CONFIG, changes)

    # ----- the loop
    def run(self) -> RunResult:
        config = self.config
        main = self.dist.is_main
        writes = main and self.run_dir is not None  # no run folder (arrays in, nothing written): memory only
        log = runs.MetricsLog(self.run_dir if writes else None, self.start_epoch, tensorboard=main)
        last_row: dict[str, Any] = {}
        t_run = time.perf_counter()
        if self.run_dir is not None:
            console.say(f"run folder: {self.run_dir}"
                        + (f"  ({self.dist.world_size} processes)" if self.dist.enabled else ""))
        try:
            for epoch in range(self.start_epoch, config.epochs):
                row, improved = self.train_one_epoch(epoch)
                last_row = row
                decided = self.record_decisions()
                seconds = self.seconds_before + time.perf_counter() - t_run
                if main:
                    log.log(row)
                if writes:  # only rank 0 writes the run folder
                    log.log_division(epoch + 1, self.method.last_division)
                    paths = [self.run_dir / runs.CHECKPOINT] + ([self.run_dir / runs.BEST] if improved else [])
                    runs.atomic_torch_save(self.checkpoint_state(epoch, seconds), *paths)
                    if decided:  # after the checkpoint: a kill in between is repaired on resume
                        self.write_decisions()
                    self.summary = artifacts.summary_dict(self, epoch, seconds, log.rows)
                    runs.write_summary(self.run_dir, self.summary)
                elif main:
                    self.summary = artifacts.summary_dict(self, epoch, seconds, log.rows)
                if main:
                    print(self.epoch_line(row), flush=True)
                distributed.barrier(self.dist)
        finally:
            log.close()
        if not last_row and self.start_epoch >= config.epochs:
            console.say(f"run already finished ({config.epochs} epochs)")
        return self.finish(log)

    def train_one_epoch(self, epoch: int) -> tuple[dict[str, Any], bool]:
        """Seed, set the lr, train and evaluate the 0-based ``epoch``; the collapse guard judges it.
        Returns its metrics row and whether it is the best epoch so far."""
        config = self.config
        t0 = time.perf_counter()
        ctx = seed_epoch(config, epoch)
        lr = lr_at(config, epoch)
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
        row = {runs.EPOCH: epoch + 1, runs.LR: lr, **({} if beta1 is None else {runs.BETA1: beta1}), **stats,
               **evaluation, runs.SECONDS_TEST: seconds_test, runs.SECONDS: time.perf_counter() - t0}
        key = self.selection_key
        select_acc = row.get(key, math.nan) if key is not None else math.nan  # nothing to select by: the latest is best
        improved = self.guard.update_best(select_acc, epoch)
        if improved and self.run_dir is None:
            self.best_state = copy.deepcopy(self.method.state_dict())
        column = self.method.selected_set_column
        selected = row.get(column) if column is not None else None
        if self.guard.watch(row, select_acc, selected, key == runs.VAL_ACC) and config.on_collapse == "rollback":
            self.rollback(row)
        self.time_left.record(self.method.epoch_phase(epoch), row[runs.SECONDS])
        return row, improved

    def epoch_line(self, row: dict[str, Any]) -> str:
        epochs_left = range(int(row[runs.EPOCH]), self.config.epochs)
        left = self.time_left.estimate([self.method.epoch_phase(e) for e in epochs_left])
        return console.epoch_line(self.config, row, self.guard.best_acc, self.method.console_fields(row), left)

    # ----- collapse
    def restore_best(self) -> int:
        """Load the best epoch's method state (best.pt, or its copy in memory without a run folder)
        into the method; returns that epoch, 1-based."""
        if self.run_dir is None:
            self.method.load_state_dict(copy.deepcopy(self.best_state))
        else:
            state = runs.load_checkpoint(self.run_dir / runs.BEST, map_location=self.config.device, config=self.config)
            runs.restore_method(self.method, state, self.run_dir / runs.BEST)
        return self.guard.best_epoch + 1

    def rollback(self, row: dict[str, Any]) -> None:
        """Restore the best checkpoint and continue with the lr and pseudo-label weight cut."""
        epoch = self.restore_best()
        count = self.guard.collapse_count
        self.method.on_rollback(count)
        row[runs.ROLLBACK] = 1
        logger.warning(f"rolled back to epoch {epoch}; lr and pseudo-label weight cut x{0.5 ** count:g}")

    def end_with_best_if_collapsed(self) -> None:
        """A run that ended collapsed is scored and exported with its best epoch's nets, not the
        collapsed final ones; summary.json says which (``scored_epoch``, ``ended_collapsed``)."""
        if self.summary is None and self.run_dir is not None and (self.run_dir / runs.SUMMARY).is_file():
            self.summary = runs.read_summary(self.run_dir)  # a finished run resumed: nothing trained now
        if self.summary is None:  # not on rank 0 without a folder: the nets are restored below all the same
            self.summary = {}
        collapsed = self.guard.ended_collapsed()
        scored = self.restore_best() if collapsed else self.summary.get("epochs_done")
        if collapsed and self.dist.is_main:
            logger.warning(f"the run ended collapsed: its outputs (label issues, pred_probs.npy, exported "
                                   f"nets) come from the nets of epoch {scored}, the best "
                                   f"({self.guard.best_acc:.2f}%), not from the final ones")
        self.summary.update(ended_collapsed=collapsed, scored_epoch=scored)
        if self.dist.is_main and self.run_dir is not None:
            runs.write_summary(self.run_dir, self.summary)

    # ----- the end
    def finish(self, log: runs.MetricsLog) -> RunResult:
        """Score with the right nets, write the method's end-of-run outputs, return the result."""
        self.end_with_best_if_collapsed()
        outputs = artifacts.RunOutputs(self)
        self.method.write_artifacts(outputs)
        self.scores = outputs.scores
        distributed.barrier(self.dist)
        summary = self.summary if self.run_dir is None else runs.read_summary(self.run_dir)
        raw = self.data.raw
        return RunResult(self.run_dir, summary.get("test_acc_best"), summary.get("test_acc_last"), summary,
                         log.rows, self.scores, outputs.model, raw.train_labels, list(raw.class_names),
                         self.method.end_of_run_text(summary))


def pretrained_record(run_dir: Path | None, config: Config, write: bool) -> dict[str, str]:
    """{"pretrained": path, "pretrained_sha256": hex} of the run's --pretrained weights file ({} without
    one): computed (and written to ``pretrained.json`` when ``write`` and there is a run folder) for a
    new run, else read back from pretrained.json."""
    import json

    from cdmix.atomic import atomic_write

    if not config.pretrained:
        return {}
    if write or run_dir is None:
        from cdmix.models.pretrained import sha256_file

        from cdmix.models.encoder import find_encoder
        from cdmix.models.weights import name_of_sha256, timm_name

        if timm_name(config.pretrained):  # timm's loader read them from its own cache: their name says which
            record = {"pretrained": config.pretrained}
            if write and run_dir is not None:
                atomic_write(run_dir / PRETRAINED, json.dumps(record, indent=2) + "\n")
            return record
        weights, encoder = find_encoder(config.pretrained)
        record = {"pretrained": str(weights.resolve()), "pretrained_sha256": sha256_file(weights)}
        if name_of_sha256(record["pretrained_sha256"]):  # torchvision's official file (by name, or given by hand)
            record["pretrained_name"] = name_of_sha256(record["pretrained_sha256"])
        if encoder is not None:  # a `cdmix pretrain` encoder: where it came from (its encoder.json)
            record["pretrained_encoder"] = {k: encoder.get(k) for k in (
                "run_dir", "model", "width", "in_channels", "epochs", "dataset", "data_path", "train_fingerprint",
                "knn_acc_last", "mean", "std")}
        if write and run_dir is not None:
            atomic_write(run_dir / PRETRAINED, json.dumps(record, indent=2) + "\n")
        return record
    try:
        return json.loads((run_dir / PRETRAINED).read_text())
    except (OSError, ValueError):
        return {}
