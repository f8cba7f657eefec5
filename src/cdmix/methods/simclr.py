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

import numpy as np
import torch

from cdmix import distributed
from cdmix import losses as L
from cdmix import selection as S
from cdmix.config import Config
from cdmix.data.batches import simclr_views
from cdmix.methods.base import (EpochContext, Method, TrainSet, autocast, build_optimizer, maybe_compile,
                                shuffled_batches)
from cdmix.models.encoder import ContrastiveNet, ProjectionHead, encoder_of, encoder_state_dict, feature_dim

# SupContrast's SimCLR run as C2D used it (main_supcon.py --method SimCLR; REFERENCE §7): the settings
# a `cdmix pretrain` preset gives, not defaults for classification runs. Its cosine schedule ends at
# lr x 0.1^3, and batches above 256 warm the lr up from 0.01 over the first 10 epochs (util.py).
SUPCONTRAST_SIMCLR = {
    "batch_size": 1024,
    "lr": 0.5,
    "simclr_temperature": 0.5,
    "schedule": "cosine",
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "epochs": 1000,
}


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
        for idx in shuffled_batches(indices, config.batch_size * self.dist.world_size, ctx,
                                    f"epoch {ctx.epoch + 1} simclr", images):
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
        batch_size = batch_size or self.config.eval_batch_size or 256
        encoder = self.encoder
        was_training = encoder.training
        encoder.eval()
        n = len(images)
        first, stop = distributed.shard_range(n, self.dist)
        batches = [torch.arange(start, min(start + batch_size, stop), device=self.train.labels.device)
                   for start in range(first, stop, batch_size)]
        out = []
        with autocast(self.config), images.prefetch(batches):
            for idx in batches:
                out.append(encoder(images.batch(idx, augment=False)).float())
        encoder.train(was_training)
        local = torch.cat(out) if out else torch.zeros((0, self.feature_dim), device=self.train.labels.device)
        return distributed.gather_rows(local, n, self.dist)

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
        given label differs from its own."""
        feats = self.features(self.train.images) if train_features is None else train_features
        return S.knn_label_disagreement(feats, self.train.labels, self.config.knn_disagreement_k)

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
        return {"knn_acc": self.knn_monitor(sets.test_images, sets.test_labels)}

    def selection_key(self, sets) -> str | None:
        return None  # no best epoch and no collapse guard: the last encoder is the result

    def console_fields(self, row: dict) -> list[str]:
        parts = [f"nt-xent {row['nt_xent']:.3f}"] if "nt_xent" in row else []
        if "knn_acc" in row:
            parts.append(f"kNN {row['knn_acc']:.1f}%")
        return parts

    def summary_info(self) -> dict:
        return {"pretraining": "simclr", "projection_dim": self.config.projection_dim}

    # ----- state
    def extra_state(self) -> dict:
        return {"epochs_done": self.epochs_done}

    def load_extra_state(self, state: dict) -> None:
        self.epochs_done = int(state.get("epochs_done", 0))
