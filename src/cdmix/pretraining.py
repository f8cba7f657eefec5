"""``cdmix pretrain`` / ``cdmix.pretrain``: SimCLR pretraining of an encoder on the training images
(C2D's first stage, REFERENCE §7), run through the same engine as training (``--method simclr``).

Settings: ``PRETRAIN_DEFAULTS`` (SupContrast's SimCLR values: batch 1024, lr 0.5, temperature 0.5,
SGD 0.9, weight decay 1e-4, its cosine schedule with the per-step warm-up; every training image, no
validation part; 100 epochs) < ``--preset`` (``simclr-cifar10``, ``simclr-cifar100``: SupContrast's
1000 epochs) < ``--config`` file < flags. The labels are not used for training; the test split is
only queried by the kNN monitor.

The run folder is a run like any other (config.json, metrics.csv with ``train_loss`` / ``nt_xent`` and
``knn_acc``, TensorBoard, checkpoint.pt every epoch, ``cdmix resume``), plus:

- ``encoder.safetensors`` (``encoder.pt`` without the safetensors package): the encoder's plain state
  dict with the model's own parameter names, no classifier and no projection head;
- ``encoder.json``: its provenance (model, width, channels, image and crop size, normalisation mean
  and std, epochs, sha256, dataset, data fingerprint, last kNN accuracy, ...);
- ``label_issues.csv``: every training sample ranked by kNN label disagreement in the encoder's
  feature space (``cdmix issues RUN``), no classifier trained.

``cdmix train --pretrained RUN`` (or the encoder file) starts every net of any method from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdmix.config import PRETRAINING_METHODS, Config, build_config, preset_info
from cdmix.errors import UserError
from cdmix.methods.simclr import PRETRAIN_DEFAULTS

__all__ = ["PRETRAIN_DEFAULTS", "PretrainResult", "pretrain_config", "run_pretraining"]


@dataclass
class PretrainResult:
    """What ``cdmix.pretrain`` returns.

    run_dir: the run folder; encoder: its encoder file (None without a folder); knn_acc: the last kNN
    accuracy of the test split in percent (None without a test set); knn_disagreement: float64 (N,)
    the kNN label disagreement of every training sample (higher = label more likely wrong), and
    knn_predicted: int64 (N,) its neighbours' majority class, both in the order given; summary,
    metrics: summary.json and the metrics rows; run: the engine's ``RunResult``.
    """

    run_dir: Path | None
    encoder: Path | None
    knn_acc: float | None
    knn_disagreement: np.ndarray
    knn_predicted: np.ndarray
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    run: Any = None

    @property
    def ranking(self) -> np.ndarray:
        """All N indices, most suspicious first (highest kNN disagreement; ties in the order given)."""
        from cdmix.issues import rank_order

        return rank_order(self.knn_disagreement)


def pretrain_config(preset: str | None = None, config_file: str | None = None, **overrides: Any) -> Config:
    """The config of a pretraining run: ``PRETRAIN_DEFAULTS`` < preset < config file < ``overrides``
    (``None`` values ignored). A preset or setting of another method is refused in one line."""
    method = overrides.get("method")
    if method is not None and method not in PRETRAINING_METHODS:
        raise UserError(f"cdmix pretrain runs --method simclr; --method {method} is for cdmix train")
    name = overrides.get("preset") or preset
    if name:
        info = preset_info(name)
        preset_method = info["settings"].get("method")
        if preset_method not in PRETRAINING_METHODS:
            needs = info["info"].get("pretraining")
            raise UserError(f"--preset {name} is a training preset (--method {preset_method}), not a pretraining one"
                            + (f"; pretrain with --preset {needs}, then cdmix train --preset {name} --pretrained RUN"
                               if needs else "; `cdmix presets` lists the simclr-* pretraining presets"))
    overrides = {**overrides, "method": "simclr"}
    return build_config(preset, config_file, defaults=PRETRAIN_DEFAULTS, **overrides)


def run_pretraining(config: Config, raw=None) -> PretrainResult:
    """Pretrain as ``config`` says (on ``raw``, the user's arrays, when given); see the module docstring."""
    from cdmix.engine import train

    if config.method not in PRETRAINING_METHODS:
        raise UserError(f"pretraining runs --method simclr, not {config.method}")
    run = train(config, raw)
    scores = run.scores or {}
    encoder = None if run.run_dir is None else Path(run.run_dir) / run.summary["encoder"]
    return PretrainResult(run.run_dir, encoder, run.summary.get("knn_acc_last"), scores.get("knn_disagreement"),
                          scores.get("knn_predicted"), run.summary, run.metrics, run)
