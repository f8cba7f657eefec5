"""SimCLR pretraining (C2D's first stage, REFERENCE §7): NT-Xent on two views of the training
images, labels unused, with SupContrast's augmentation, projection head and loss.

One net: ``ContrastiveNet(encoder, head)``, the encoder being the config's model with its
classifier replaced by ``nn.Identity`` (``cdmix.models.encoder``), the head SupContrast's 2-layer
MLP to ``projection_dim``. Each step: two SimCLR views of every image of the batch
(``data.batches.simclr_views``, from ``ctx.aug_generator``), one forward of the 2B views, the
projections all-gathered across ranks under torchrun (every rank's views are negatives, gradients
flow back to their own rank), loss ``NT-Xent x temperature / base_temperature`` (SupContrast's
scale), one SGD step. The encoder it writes (``encoder_state_dict``) loads into a classifier net of
the same model with a fresh classifier (``models.encoder.load_encoder``).

Evaluation: a weighted kNN monitor (``selection.knn_accuracy``, k 200, T 0.1) of the test split's
encoder features against the training split's features and given labels, and the kNN label
disagreement score of every training sample (``selection.knn_label_disagreement``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cdmix import distributed
from cdmix import losses as L
from cdmix import selection as S
from cdmix.config import Config
from cdmix.data.batches import simclr_views
from cdmix.methods.base import (EpochContext, Method, TrainSet, autocast, build_optimizer, encoder_features,
                                maybe_compile, shuffled_batches)
from cdmix.models.encoder import ContrastiveNet, ProjectionHead, encoder_of, encoder_state_dict, feature_dim
from cdmix.simclr_defaults import PRETRAIN_DEFAULTS, PRETRAIN_EPOCHS, SUPCONTRAST_SIMCLR  # noqa: F401 (re-exported)

ISSUE_SCORE_KIND = "knn_disagreement"  # summary.json's issue_score_kind of a pretraining run


class SimCLR(Method):
    """Self-supervised pretraining of the config's model on ``train.images`` (labels unused)."""

    name = "simclr"
    num_nets = 1

    def __init__(self, config: Config, train: TrainSet):
        super().__init__(config, train)  # builds the classifier net (with --pretrained weights, if given)
        classifier = self.nets[0]
        self.feature_dim = feature_dim(classifier)
        net = ContrastiveNet(encoder_of(classifier), ProjectionHead(self.feature_dim, config.projection_dim, "mlp"))
        net = distributed.convert_sync_bn(net.to(config.device), self.dist, config.sync_bn)
        self.nets = [net]
        self.optimizers = [build_optimizer(config, net)]
        example = (simclr_views(train.images, torch.arange(min(config.batch_size, len(train)),
                                                           device=train.labels.device),
                                self.view_size(), torch.Generator(device=train.labels.device).manual_seed(0))
                   if config.compile else None)
        self.train_nets = [maybe_compile(config, distributed.wrap(net, self.dist, config.device), example)]
        self.epochs_done = 0
        global_batch, n = config.batch_size * self.dist.world_size, len(train)
        if global_batch > n and self.dist.is_main:  # shuffled_batches gives one batch of all n: one step per epoch
            logging.getLogger("cdmix").info(
                f"note: the batch of {global_batch} is more than the {n} training images, so each epoch is one step "
                f"over all of them (--batch-size {max(2, n // (4 * self.dist.world_size))} gives ~4 steps an epoch)")
        self.last_knn_acc: float | None = None  # the kNN monitor's last reading (summary.json, encoder.json)
        self._run_dir = None  # the run folder, once write_artifacts knows it (end_of_run_text)

    @property
    def encoder(self) -> torch.nn.Module:
        return self.nets[0].encoder

    def view_size(self) -> int:
        """Side of the views: the run's training crop (the image size up to 64 px)."""
        return int(self.config.crop_size or min(self.train.images.shape[-2:]))

    # ----- training
    def train_epoch(self, ctx: EpochContext) -> dict[str, float]:
        """One pass of NT-Xent over the training images in global batches of ``batch_size x world``.

        Returns ``train_loss`` and ``nt_xent`` (the plain NT-Xent, mean over this rank's steps) and
        ``loss_scaled`` (what the gradient is of: x temperature / base_temperature)."""
        config, images = self.config, self.train.images
        net, optimizer = self.train_nets[0], self.optimizers[0]
        net.train()
        device = self.train.labels.device
        scale = config.simclr_temperature / config.simclr_base_temperature
        total = torch.zeros((), device=device)
        steps = 0
        indices = torch.arange(len(self.train), device=device)
        global_batch = config.batch_size * self.dist.world_size
        world = self.dist.world_size
        steps_per_epoch = len(indices) // global_batch + (len(indices) % global_batch >= world)
        for idx in shuffled_batches(indices, global_batch, ctx, f"epoch {ctx.epoch + 1} simclr", images):
            from cdmix.engine.schedule import step_lr  # here: the engine package imports the methods

            lr = step_lr(config, ctx.epoch, steps, steps_per_epoch, global_batch)
            if lr is not None:  # SupContrast's per-step warm-up
                self.set_lr(lr)
            views = simclr_views(images, idx, self.view_size(), ctx.aug_generator)
            with autocast(config):
                z = net(views)
            n = len(idx)
            pairs = torch.stack([z[:n], z[n:]], dim=1).float()  # n x 2 x dim: both views of each image
            pairs, offset = distributed.all_gather_with_grad(pairs, self.dist)
            loss = L.nt_xent(pairs[:, 0], pairs[:, 1], config.simclr_temperature, anchors=(offset, offset + n))
            optimizer.zero_grad(set_to_none=True)
            (scale * loss).backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        self.epochs_done = ctx.epoch + 1
        mean = float(total) / max(steps, 1)
        return {"train_loss": mean, "nt_xent": mean, "loss_scaled": mean * scale}

    # ----- features and scores
    @torch.inference_mode()
    def features(self, images, batch_size: int | None = None) -> torch.Tensor:
        """Encoder features of all ``images`` (eval mode, no augmentation: the evaluation crop),
        float32 N x d on the device. Under torchrun each rank computes a block, all receive all."""
        return encoder_features(self.encoder, images, self.config, self.feature_dim, batch_size)

    def knn_monitor(self, test_images, test_labels: torch.Tensor, train_labels: torch.Tensor | None = None,
                    train_features: torch.Tensor | None = None) -> float:
        """Weighted kNN accuracy (percent) of the test images against the training images with
        ``train_labels`` (default: the given, possibly noisy, labels) in the encoder's feature space
        (``config.knn_k`` neighbours, vote weights ``exp(cosine / config.knn_temperature)``)."""
        bank = self.features(self.train.images) if train_features is None else train_features
        labels = self.train.labels if train_labels is None else train_labels
        return S.knn_accuracy(self.features(test_images), test_labels, bank, labels, self.num_classes,
                              self.config.knn_k, self.config.knn_temperature)

    def label_disagreement(self, train_features: torch.Tensor | None = None) -> np.ndarray:
        """kNN label disagreement of every training sample (float64 (N,), higher = more likely
        mislabeled): the share of its ``config.knn_disagreement_k`` nearest training neighbours whose
        given label differs from its own, weighted by ``exp(cosine / config.knn_temperature)``."""
        feats = self.features(self.train.images) if train_features is None else train_features
        return S.knn_label_disagreement(feats, self.train.labels, self.config.knn_disagreement_k,
                                        self.config.knn_temperature)

    def monitor_due(self, epochs_done: int | None = None) -> bool:
        """Whether the kNN monitor runs after ``epochs_done`` epochs (default: those trained so far):
        every ``knn_every`` epochs and after the last."""
        done = self.epochs_done if epochs_done is None else epochs_done
        every = self.config.knn_every
        return done == self.config.epochs or (every > 0 and done % every == 0)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder as a plain CPU state dict with the model's own parameter names (no classifier,
        no projection head): what ``encoder.pt`` holds."""
        return encoder_state_dict(self.encoder)

    # ----- hooks of the engine (``Method``'s docstring): a method that is no classifier
    def evaluation_row(self, sets) -> dict[str, float]:
        """``knn_acc`` (percent) of the test split when the monitor is due, else nothing."""
        if not self.monitor_due() or len(sets.test_labels) == 0:
            return {}
        self.last_knn_acc = self.knn_monitor(sets.test_images, sets.test_labels)
        return {"knn_acc": self.last_knn_acc}

    def selection_key(self, sets) -> str | None:
        return None  # no best epoch and no collapse guard: the last encoder is the result

    def console_fields(self, row: dict) -> list[str]:
        parts = [f"nt-xent {row['nt_xent']:.3f}"] if "nt_xent" in row else []
        if "knn_acc" in row:
            parts.append(f"kNN {row['knn_acc']:.1f}%")
        return parts

    def epoch_phase(self, epoch: int) -> str | None:
        """Epochs with the kNN monitor cost more than those without: two phases for the time left."""
        return "train+knn" if self.monitor_due(epoch + 1) else "train"

    def summary_info(self) -> dict:
        return {"pretraining": "simclr", "projection_dim": self.config.projection_dim,
                "knn_acc_last": self.last_knn_acc, "issue_score_kind": ISSUE_SCORE_KIND}

    def write_artifacts(self, outputs) -> None:
        """The encoder (``encoder.safetensors``, or ``encoder.pt`` without safetensors), its provenance
        (``encoder.json``), ``label_issues.csv`` ranked by kNN label disagreement in the encoder's feature
        space (issue_score = the similarity-weighted share of a sample's ``knn_disagreement_k`` nearest
        training neighbours whose given label differs; clean_prob = 1 - that share; predicted = the
        neighbours' weighted majority class), and summary.json's ``encoder`` and ``knn_acc_last``. ``outputs.scores``:
        ``knn_disagreement`` and ``knn_predicted`` in the dataset's training order."""
        import json

        from cdmix import runs
        from cdmix.models.encoder import PROVENANCE, encoder_file_name, save_encoder

        raw, train, config = outputs.data.raw, self.train, self.config
        features = self.features(train.images)  # every rank: the rows are gathered
        disagreement, predicted = S.knn_label_scores(features, train.labels, self.num_classes,
                                                     config.knn_disagreement_k, config.knn_temperature)
        n = len(raw.train_labels)
        score, knn_class = np.zeros(n), np.asarray(raw.train_labels, dtype=np.int64).copy()
        score[train.index], knn_class[train.index] = disagreement, predicted
        outputs.scores = {"knn_disagreement": score, "knn_predicted": knn_class}
        name = encoder_file_name()
        summary = outputs.trainer.summary if outputs.trainer.summary is not None else {}
        summary.update(encoder=name, knn_acc_last=self.last_knn_acc, issue_score_kind=ISSUE_SCORE_KIND)
        outputs.trainer.summary = summary
        self._run_dir = outputs.run_dir
        if not outputs.writes:
            return
        run_dir = outputs.run_dir
        digest = save_encoder(self.encoder, run_dir / name)
        labels_file = runs.read_labels(run_dir)
        provenance = {
            "kind": "cdmix encoder", "file": name, "sha256": digest, "model": config.model, "width": config.width,
            "in_channels": int(train.images.shape[1]), "feature_dim": self.feature_dim,
            "image_size": int(raw.image_size), "crop_size": int(self.view_size()),
            "normalization": config.normalization, "mean": [float(v) for v in raw.mean],
            "std": [float(v) for v in raw.std], "epochs": self.epochs_done, "dataset": config.dataset,
            "data_path": config.data_path, "num_train": len(train),
            "train_fingerprint": str(labels_file["train_fingerprint"]) if "train_fingerprint" in labels_file else None,
            "knn_acc_last": self.last_knn_acc, "method": self.name, "projection_dim": config.projection_dim,
            "simclr_temperature": config.simclr_temperature, "batch_size": config.batch_size,
            "world_size": self.dist.world_size, "lr": config.lr, "schedule": config.schedule, "seed": config.seed,
            "run_dir": str(run_dir.resolve()),
            "use": "cdmix train --pretrained <this folder or the encoder file>: every net starts from this encoder "
                   "with a fresh classifier, normalised with mean/std",
        }
        outputs.write_file(PROVENANCE, json.dumps(provenance, indent=2) + "\n")
        if self._labelled():
            from cdmix.issues import write_label_issues

            write_label_issues(run_dir / runs.LABEL_ISSUES, index=np.arange(n), given_label=raw.train_labels,
                               predicted_label=knn_class, clean_prob=1.0 - score, issue_score=score,
                               true_label=raw.train_true_labels, ids=raw.train_ids, class_names=raw.class_names,
                               scored=np.full(n, "knn-encoder"))
        runs.write_summary(run_dir, summary)

    def _labelled(self) -> bool:
        """Whether the training images carry two labels or more (``cdmix.pretrain(images)`` without labels
        gives them all one): else no label issues, there is nothing to disagree with."""
        return bool((self.train.labels != self.train.labels[0]).any()) if len(self.train) else False

    def end_of_run_text(self, summary: dict) -> list[str]:
        knn = summary.get("knn_acc_last")
        lines = ["kNN accuracy (test split against the training labels, encoder features): "
                 + ("not measured (no test set)" if knn is None else f"{knn:.2f}%")]
        run_dir = self._run_dir
        if run_dir is None:
            return lines
        from cdmix.models.encoder import PROVENANCE

        lines.append(f"encoder:      {run_dir / summary.get('encoder', '')}  (provenance {run_dir / PROVENANCE})")
        if self._labelled():
            lines.append(f"label issues: cdmix issues {run_dir}  (ranked by kNN label disagreement in the encoder's "
                         f"feature space; no classifier trained)")
        lines.append(f"train from it: cdmix train --pretrained {run_dir} ...  (the same data flags)")
        lines.append(f"report:       cdmix report {run_dir}")
        return lines

    # ----- state
    def extra_state(self) -> dict:
        return {"epochs_done": self.epochs_done, "last_knn_acc": self.last_knn_acc}

    def load_extra_state(self, state: dict) -> None:
        self.epochs_done = int(state.get("epochs_done", 0))
        self.last_knn_acc = state.get("last_knn_acc")
