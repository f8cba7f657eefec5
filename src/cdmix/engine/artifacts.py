"""What a run leaves behind: summary.json, and the end-of-run outputs a method writes through
``RunOutputs`` (a classifier's: label_issues.csv, pred_probs.npy, clean_prob.npy, division.npz and the
exported nets)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cdmix import runs
from cdmix.atomic import atomic_write
from cdmix.engine.console import device_name


def summary_dict(trainer, epoch: int, seconds: float, rows: list[dict[str, float]]) -> dict[str, Any]:
    """summary.json after the 0-based ``epoch`` (epoch numbers in it are 1-based); ``rows``: the
    typed metrics rows (``runs.MetricsLog.rows``)."""
    config, guard, sets = trainer.config, trainer.guard, trainer.sets
    tests = [row.get(runs.TEST_ACC, math.nan) for row in rows]
    tested = [i for i, t in enumerate(tests) if not math.isnan(t)]  # none without a test set
    best = max(tested, key=lambda i: tests[i]) if tested else None
    summary = {
        "dataset": config.dataset,
        "method": config.method,
        "preset": config.preset,
        "epochs_done": epoch + 1,
        "epochs": config.epochs,
        "test_acc_best": None if best is None else tests[best],
        "test_acc_best_epoch": None if best is None else int(rows[best][runs.EPOCH]),
        "test_acc_last": None if math.isnan(tests[-1]) else tests[-1],
        "selected_epoch": guard.best_epoch + 1,
        "selected_by": trainer.selection_key,
        "seconds_total": seconds,
        "device": device_name(config.device),
        "num_train": len(trainer.train),
        "num_val": 0 if sets.val_labels is None else len(sets.val_labels),
        "num_test": len(sets.test_labels),
        "collapse_warnings": guard.collapse_count,
        **trainer.pretrained,
        "epoch_numbering": "1-based (epoch 1 is the first)",
        **trainer.method.summary_info(),
        **trainer.data.noise_info,
    }
    if sets.clean_val or sets.extra_tests or trainer.selection_key == "val_acc":
        # The figure to compare with a published one when a validation set chose best.pt (Clothing1M's clean
        # one, or the noisy split): the test sets scored at that epoch. WebVision: its second test set there.
        if sets.clean_val:
            summary["val_set"] = "clean (the source's validation set)"
        selected = next((r for r in rows if int(r[runs.EPOCH]) == guard.best_epoch + 1), None)
        if selected is not None:
            summary["test_at_selected_epoch"] = {k: v for k, v in selected.items()
                                                 if k.startswith("test_") and not math.isnan(v)}
    train = trainer.train
    if train.true_labels is not None:
        summary["noise_rate_actual_train"] = float((train.labels != train.true_labels).float().mean())
    return summary


class RunOutputs:
    """What a method's ``write_artifacts`` hook writes the end of a run with.

    ``run_dir``: the run folder (None: arrays in, no folder; nothing is written); ``writes``: whether
    this process writes it (rank 0 with a folder); ``config``, ``data`` (``engine.data.PreparedData``),
    ``train`` (the method's ``TrainSet``). ``scores`` and ``model`` become the ``RunResult``'s.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.config = trainer.config
        self.run_dir: Path | None = trainer.run_dir
        self.data = trainer.data
        self.train = trainer.train
        self.writes = trainer.dist.is_main and trainer.run_dir is not None
        self.scores: dict[str, np.ndarray] | None = None
        self.model: Any = None

    def write_file(self, name: str, content: bytes | str | Callable) -> None:
        """Write ``run_dir/name`` atomically on the writing rank (a no-op elsewhere or without a
        folder); ``content``: bytes, text, or a function writing to a binary file handle."""
        if self.writes:
            atomic_write(self.run_dir / name, content)

    def write_classifier_outputs(self) -> None:
        """Score every training sample with the final nets (``final_scores``), keep the scores and the
        nets for the ``RunResult``, and write label_issues.csv, pred_probs.npy, clean_prob.npy,
        division.npz and the exported nets (net1.safetensors, model.json)."""
        trainer, method = self.trainer, self.trainer.method
        if method.last_division is None:
            method.clean_prob()  # a method without a division fits the loss GMM once (division.npz, report)
        self.scores = final_scores(trainer)
        self.model = trained_model(trainer)
        if not self.writes:
            return
        self._write_label_issues()
        division = method.last_division or {}
        arrays = {"index": self.train.index, **{k: np.asarray(v) for k, v in division.items()}}
        if self.train.true_labels is not None:
            arrays["is_noisy"] = (self.train.labels != self.train.true_labels).cpu().numpy()
        self.write_file(runs.DIVISION, lambda fh: np.savez(fh, **arrays))
        from cdmix.predict import export_model

        raw, config = self.data.raw, self.config
        export_model(self.run_dir, method.eval_nets(), model=config.model, width=config.width,
                     class_names=raw.class_names, image_size=raw.image_size, in_channels=self.train.images.shape[1],
                     mean=raw.mean, std=raw.std)

    def _write_label_issues(self) -> None:
        from cdmix.issues import write_label_issues

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
            knn_disagreement=scores.get("knn_disagreement"),
        )
        self.write_file(runs.PRED_PROBS, lambda fh: np.save(fh, scores["pred_probs"]))
        self.write_file(runs.CLEAN_PROB, lambda fh: np.save(fh, scores["clean_prob"]))


def final_scores(trainer) -> dict[str, np.ndarray]:
    """Every training sample, the ``--val-fraction`` part included, scored by the final nets
    (``cdmix.issues.score_samples``), in the dataset's training order; plus ``in_sample``."""
    from cdmix.issues import score_samples

    raw, bs, sets = trainer.data.raw, trainer.config.eval_batch_size, trainer.sets
    n = len(raw.train_labels)
    parts = [(trainer.data.train_pos, trainer.train.images)]
    if sets.val_images is not None and not sets.clean_val:  # the held-out part of the training set
        parts.append((trainer.data.val_pos, sets.val_images))
    logits: list[np.ndarray] = []
    for pos, images in parts:
        for i, part in enumerate(trainer.method.predict_logits(images, bs)):
            if len(logits) <= i:
                logits.append(np.zeros((n, part.shape[1]), dtype=np.float32))
            logits[i][pos] = part.float().cpu().numpy()
    in_sample = np.zeros(n, dtype=bool)
    in_sample[trainer.data.train_pos] = True
    scores = score_samples(logits, raw.train_labels, in_sample, seed=trainer.config.seed)
    knn = knn_disagreement(trainer, parts)
    return {**scores, "in_sample": in_sample, **({} if knn is None else {"knn_disagreement": knn})}


def knn_disagreement(trainer, parts) -> np.ndarray | None:
    """kNN label disagreement (``selection.knn_label_scores``, ``--knn-disagreement-k`` neighbours) of
    every training sample in the final nets' feature space (each net's input to its classifier), the
    mean over the nets; ``parts``: (positions, images) covering the training order. None where a net
    has no classifier to take features before, or a label is not a class index."""
    import torch

    from cdmix.errors import UserError
    from cdmix.methods.base import encoder_features
    from cdmix.models.encoder import encoder_of, feature_dim
    from cdmix.selection import knn_label_scores

    raw, config = trainer.data.raw, trainer.config
    labels = np.asarray(raw.train_labels)
    if len(labels) < 2 or labels.min() < 0:
        return None
    shares = []
    for net in trainer.method.eval_nets():
        net = getattr(net, "module", net)
        try:
            encoder, dim = encoder_of(net), feature_dim(net)
        except UserError:
            return None
        features = None
        for pos, images in parts:
            block = encoder_features(encoder, images, config, dim)
            if features is None:
                features = torch.zeros((len(labels), dim), device=block.device)
            features[torch.as_tensor(pos, device=block.device)] = block
        shares.append(knn_label_scores(features, labels, raw.num_classes, config.knn_disagreement_k,
                                        config.knn_temperature)[0])
    return np.mean(shares, axis=0)


def trained_model(trainer):
    """The final nets (eval mode) as a ``cdmix.predict.TrainedModel``."""
    from cdmix.predict import TrainedModel

    raw = trainer.data.raw
    nets = [getattr(net, "module", net).eval() for net in trainer.method.eval_nets()]
    return TrainedModel(nets, list(raw.class_names), raw.image_size, trainer.train.images.shape[1],
                        tuple(raw.mean), tuple(raw.std), trainer.config.device)
