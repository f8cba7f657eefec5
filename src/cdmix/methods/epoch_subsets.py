"""DivideMix on a fresh class-balanced subset every epoch: the official Clothing1M protocol.

DivideMix's ``Train_clothing1M.py`` never passes over the million noisy images. With
``num_batches`` (1000) and the batch ``B`` (32), every ``loader.run`` draws a new random subset
(``dataloader_clothing1M.py``, mode ``all``: shuffle the noisy list, keep each image while its
class has fewer than ``size / 14`` and the subset fewer than ``size``):

* warm-up: net1 and net2 each on its own subset of ``num_batches x 2B`` images (batch 2B);
* after each epoch (here: at the start of the next, from the same nets): for each net a new
  subset of ``num_batches x B`` images is drawn, its per-sample losses fitted with the GMM, and
  the *partner* trains on that subset alone: labeled = clean probability > p_threshold, the rest
  of the subset unlabeled (``loader.run('train', pred2, prob2, paths=paths2)``).

Every subset is drawn from ``(seed, epoch, purpose, net)``, so a resumed run draws the same ones.
``--epoch-subset-batches N`` turns this on (``methods.build_method`` picks this class).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from cdmix.methods.base import EpochContext
from cdmix.methods.dividemix import DivideMix
from cdmix.selection import fit_gmm_clean_prob, minmax_normalise

# Stream ids of the subset draws, so the warm-up and the division subsets never coincide.
WARMUP_DRAW, DIVIDE_DRAW = 1, 2


def class_balanced_subset(labels: np.ndarray, size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of a random class-balanced subset of ``labels`` (int, values 0..C-1).

    As the official loader: walk a random permutation and keep a sample while its class holds fewer
    than ``size / num_classes`` and the subset fewer than ``size``; a class with fewer samples than
    its share leaves the subset smaller. Returns at most ``size`` int64 positions.
    """
    labels = np.asarray(labels, dtype=np.int64)
    perm = rng.permutation(len(labels))
    in_order = labels[perm]
    by_class = np.argsort(in_order, kind="stable")  # each class's samples in permutation order
    sorted_labels = in_order[by_class]
    rank = np.empty(len(labels), dtype=np.int64)  # how many of its class came before it in the walk
    rank[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    kept = perm[rank < size / num_classes][:size]
    return np.sort(kept)


class EpochSubsetDivideMix(DivideMix):
    """DivideMix whose warm-up, division and training see a fresh class-balanced subset each epoch."""

    def __init__(self, config, train):
        super().__init__(config, train)
        self.labels_host = train.labels.cpu().numpy()

    def global_batch(self) -> int:
        return self.config.batch_size * self.dist.world_size

    def draw(self, epoch: int, purpose: int, net: int, size: int) -> np.ndarray:
        """The subset (sorted positions) of ``size`` images for ``purpose`` and ``net`` in ``epoch``."""
        rng = np.random.default_rng([self.config.seed, epoch, purpose, net])
        return class_balanced_subset(self.labels_host, size, self.num_classes, rng)

    # ----- warm-up: each net on its own subset of num_batches x 2B images
    def ce_epoch(self, i: int, ctx: EpochContext, desc: str, indices: torch.Tensor | None = None) -> float:
        if indices is None:
            size = 2 * self.config.epoch_subset_batches * self.global_batch()
            indices = torch.as_tensor(self.draw(ctx.epoch, WARMUP_DRAW, i, size), device=self.train.labels.device)
        return super().ce_epoch(i, ctx, desc, indices)

    def warmup_steps_per_epoch(self) -> int:
        return self.config.epoch_subset_batches

    # ----- division: each net's GMM on its own subset of num_batches x B images
    @torch.inference_mode()
    def subset_losses(self, net: torch.nn.Module, idx: np.ndarray) -> np.ndarray:
        """CE loss of net on the images at ``idx`` against their noisy labels (eval mode, no augmentation)."""
        device = self.train.labels.device
        positions = torch.as_tensor(idx, device=device)
        logits = self.predict_logits(self.train.images.subset(positions), self.config.eval_batch_size, nets=[net])[0]
        return F.cross_entropy(logits, self.train.labels[positions], reduction="none").cpu().numpy()

    def divide(self, ctx: EpochContext, row: dict[str, float]) -> list[np.ndarray]:
        """Clean probability per training sample from each net's GMM on its subset; NaN off that subset."""
        config = self.config
        n = len(self.train)
        self.measured_losses = None  # the automatic warm-up's full pass is not this epoch's subset
        division: dict[str, np.ndarray] = {}
        clean_probs = []
        size = config.epoch_subset_batches * self.global_batch()
        for i, net in enumerate(self.nets):
            t0 = time.perf_counter()
            idx = self.draw(ctx.epoch, DIVIDE_DRAW, i, size)
            norm = minmax_normalise(self.subset_losses(net, idx))
            prob, params = fit_gmm_clean_prob(norm, seed=config.seed)
            tag = f"net{i + 1}"
            loss_full, prob_full = np.full(n, np.nan), np.full(n, np.nan)
            loss_full[idx], prob_full[idx] = norm, prob
            clean_probs.append(prob_full)
            row[f"subset_{tag}"] = len(idx)
            row[f"seconds_divide_{tag}"] = time.perf_counter() - t0
            self.record_gmm(row, division, tag, prob, params, idx)
            division.update({f"loss_{tag}": loss_full, f"clean_prob_{tag}": prob_full, f"subset_{tag}": idx})
        stacked = np.stack(clean_probs)
        seen = np.isfinite(stacked)
        division["clean_prob"] = np.where(seen.any(0), np.where(seen, stacked, 0).sum(0) / np.maximum(seen.sum(0), 1),
                                          np.nan)
        self.last_division = division
        if self.dist.enabled:
            row["division_ranks_agree"] = int(self.ranks_agree([np.nan_to_num(p, nan=-1.0) for p in clean_probs]))
        return clean_probs

    # ----- training: the partner's subset only (labeled above p_threshold, the rest of it unlabeled)
    def labeled_split(self, clean_prob: np.ndarray, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
        inside = np.isfinite(clean_prob)
        labeled, unlabeled = super().labeled_split(np.where(inside, clean_prob, -np.inf), tag)
        keep = torch.as_tensor(inside, device=unlabeled.device)[unlabeled]
        return labeled, unlabeled[keep]
