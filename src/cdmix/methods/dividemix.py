"""DivideMix (Li, Socher, Hoi, ICLR 2020), as the official code does it (REFERENCE §2).

Two nets. Warm-up: cross-entropy, batch 2B. Then each epoch: co-divide (per-sample losses of
both nets, GMM clean probability), train net1 on net2's division, then net2 on net1's, with
co-refinement, co-guessing, MixUp over the 4B batch, Lx + λu_eff·Lu + prior penalty.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from cdmix import distributed
from cdmix import losses as L
from cdmix.methods.base import EpochContext, Method, autocast, prefetching, shuffled_batches
from cdmix.methods.unicon import ContrastiveTerm, with_contrastive
from cdmix.selection import (fit_gmm_clean_prob, gmm_separation, loss_history_average, minmax_normalise,
                             warmup_decision)

log = logging.getLogger("cdmix")

WARMUP_FLOOR_EPOCHS = 10  # --warmup auto: the step floor never asks for more epochs than this
# DivideMix from scratch on fewer training images than this failed in our measurements (docs/RESULTS.md,
# "A user's own folder": 270 images collapsed to chance whatever the warm-up).
SMALL_FROM_SCRATCH = 1000


class DivideMix(Method):
    name = "dividemix"
    num_nets = 2
    # The per-step losses ``loss_parts`` returns, averaged over the epoch into ``<name>_net<k>``.
    part_names = ("loss", "lx", "lu", "penalty")
    has_warmup = True  # the start of a run prints its warm-up
    selected_set_column = "labeled_net1"  # the collapse guard reports a halving of net1's labeled set
    from_scratch_min_images = SMALL_FROM_SCRATCH

    def __init__(self, config, train):
        super().__init__(config, train)
        # Normalised per-sample losses of past epochs, one list per net (for --loss-history > 1).
        self.loss_history: list[list[np.ndarray]] = [[] for _ in self.nets]
        # Warm-up epochs: fixed, or (--warmup auto) None until the loss distributions have separated.
        self.warmup_end: int | None = None if config.warmup == "auto" else int(config.warmup)
        self.warmup_reason = "fixed" if self.warmup_end is not None else ""
        self.separations: list[float] = []  # --warmup auto: separation after each warm-up epoch
        self.measured_losses: list[torch.Tensor] | None = None  # that pass's losses, reused by the division
        # UNICON's contrastive term only with --contrastive-weight > 0: default runs stay as they were.
        self.contrastive = ContrastiveTerm(self) if config.contrastive_weight > 0 else None
        if self.contrastive is not None:
            self.part_names = (*self.part_names, "lcontrast")

    # ----- state
    def extra_state(self) -> dict:
        state = {"loss_history": self.loss_history, "warmup_end": self.warmup_end,
                 "warmup_reason": self.warmup_reason, "separations": self.separations}
        if self.contrastive is not None:
            state["contrastive_heads"] = self.contrastive.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        if self.contrastive is not None:
            self.contrastive.load_state_dict(state["contrastive_heads"])
        self.loss_history = state["loss_history"]
        if "warmup_end" in state:
            self.warmup_end, self.warmup_reason = state["warmup_end"], state["warmup_reason"]
            self.separations = list(state["separations"])

    def summary_info(self) -> dict:
        """Warm-up facts for summary.json: epochs (1..N were warm-up) and how N was chosen."""
        return {"warmup_epochs": self.warmup_end, "warmup_rule": self.warmup_reason or "auto (undecided)"}

    # ----- engine hooks
    def decided_settings(self) -> dict:
        """--warmup auto, once decided: the warm-up that ran (config.json records it, the lr step follows)."""
        return {"warmup": self.warmup_end} if self.config.warmup == "auto" and self.warmup_end is not None else {}

    def epoch_phase(self, epoch: int) -> str | None:
        """warm-up (cheap: CE) or dividemix (divide + co-train); while an automatic warm-up is
        undecided, the epochs measured so far were warm-up and the later ones are not known."""
        if self.warmup_end is None:
            return "warm-up" if epoch < len(self.separations) else None
        return "warm-up" if epoch < self.warmup_end else self.name

    def console_fields(self, row: dict) -> list[str]:
        parts = super().console_fields(row)
        if "labeled_net1" in row:
            labeled = f"labeled {int(row['labeled_net1'])}/{int(row['labeled_net2'])}"
            parts.insert(1 if "train_loss" in row else 0, labeled)
        return parts

    # ----- one epoch
    def train_epoch(self, ctx: EpochContext) -> dict[str, float]:
        if self.warmup_end is None or ctx.epoch < self.warmup_end:
            row = self.warmup_epoch(ctx)
            if self.warmup_end is None:
                self.measure_warmup(ctx.epoch + 1, row)
            return row
        row: dict[str, float] = {}
        t0 = time.perf_counter()
        clean_probs = self.divide(ctx, row)
        row["seconds_divide"] = time.perf_counter() - t0
        self.co_train(clean_probs, ctx, row)
        return row

    def co_train(self, clean_probs: list[np.ndarray], ctx: EpochContext, row: dict[str, float]) -> None:
        """Train net1 on net2's division, then net2 on net1's (co-divide); per-net stats into ``row``."""
        for a, b in ((0, 1), (1, 0)):
            t1 = time.perf_counter()
            stats = self.train_net(a, b, clean_probs[b], ctx)
            row.update({f"{k}_net{a + 1}": v for k, v in stats.items()})
            row[f"seconds_train_net{a + 1}"] = time.perf_counter() - t1
        row["train_loss"] = (row["loss_net1"] + row["loss_net2"]) / 2
        row["lambda_u_eff"] = row["lambda_u_eff_net2"]

    def warmup_epoch(self, ctx: EpochContext) -> dict[str, float]:
        row = {}
        t0 = time.perf_counter()
        for i in range(self.num_nets):
            row[f"loss_net{i + 1}"] = self.ce_epoch(i, ctx, f"epoch {ctx.epoch + 1} warm-up net{i + 1}")
        row["train_loss"] = (row["loss_net1"] + row["loss_net2"]) / 2
        row["seconds_train"] = time.perf_counter() - t0
        return row

    def ce_epoch(self, i: int, ctx: EpochContext, desc: str, indices: torch.Tensor | None = None) -> float:
        """Warm-up cross-entropy of net ``i`` on ``indices`` (default all), batch 2B (official)."""
        return self.supervised_epoch(i, ctx, 2 * self.config.batch_size, desc, indices)

    # ----- --warmup auto
    def warmup_steps_per_epoch(self) -> int:
        """Optimiser steps per net in one warm-up epoch (global batch 2B)."""
        return max(1, -(-len(self.train) // (2 * self.config.batch_size * self.dist.world_size)))

    def measure_warmup(self, epochs_done: int, row: dict[str, float]) -> None:
        """After warm-up epoch ``epochs_done`` (1-based): measure how far apart the loss GMM's
        components are (``warmup_separation``, mean over the nets) and end the warm-up when
        ``selection.warmup_decision`` says so (``warmup_end`` = 1 in that epoch's row)."""
        config = self.config
        losses = [self.per_sample_losses(net) for net in self.nets]
        separations = [gmm_separation(fit_gmm_clean_prob(minmax_normalise(loss.cpu().numpy()), seed=config.seed)[1])
                       for loss in losses]
        self.separations.append(float(np.mean(separations)))
        row["warmup_separation"] = self.separations[-1]
        per_epoch = self.warmup_steps_per_epoch()
        max_epochs = max(1, (2 * config.epochs) // 3)
        # The floor in steps, but never more than WARMUP_FLOOR_EPOCHS passes: a few hundred images must not
        # be gone over a hundred times (memorising their wrong labels) before the separation may end it.
        floor = min(config.warmup_min_steps, WARMUP_FLOOR_EPOCHS * per_epoch)
        reason = warmup_decision(self.separations, per_epoch, floor, config.warmup_max_steps, max_epochs)
        if reason is None:
            return
        self.warmup_end, self.warmup_reason = epochs_done, f"auto: {reason}"
        self.measured_losses = losses
        row["warmup_end"] = 1
        steps = epochs_done * per_epoch
        if self.dist.is_main:
            log.info(f"warm-up ends after epoch {epochs_done} ({steps} steps per net): {reason} "
                     f"(loss separation {self.separations[-1]:.2f})")
        if reason == "epoch cap" and steps < floor:
            log.warning(f"--epochs {config.epochs} cut the automatic warm-up to {epochs_done} epoch(s), "
                        f"{steps} steps per net, below its {floor}-step floor: the clean and noisy losses may "
                        f"not have separated yet; more --epochs give DivideMix a better start")

    # ----- co-divide
    def divide(self, ctx: EpochContext, row: dict[str, float]) -> list[np.ndarray]:
        """Clean probability of every training sample from each net's loss GMM; fills metrics."""
        config = self.config
        division: dict[str, np.ndarray] = {}
        clean_probs = []
        measured, self.measured_losses = self.measured_losses, None  # the auto warm-up's last pass, if any
        for i, net in enumerate(self.nets):
            loss = measured[i] if measured is not None else self.per_sample_losses(net)
            norm = minmax_normalise(loss.cpu().numpy())
            history = (self.loss_history[i] + [norm])[-config.loss_history:]
            self.loss_history[i] = history if config.loss_history > 1 else []
            gmm_input = loss_history_average(history, config.loss_history)
            prob, params = fit_gmm_clean_prob(gmm_input, seed=config.seed)
            clean_probs.append(prob)
            tag = f"net{i + 1}"
            self.record_gmm(row, division, tag, prob, params)
            division.update({f"loss_{tag}": gmm_input, f"clean_prob_{tag}": prob})
        division["clean_prob"] = np.mean(clean_probs, axis=0)
        self.last_division = division
        if self.dist.enabled:
            row["division_ranks_agree"] = int(self.ranks_agree(clean_probs))
        return clean_probs

    def record_gmm(self, row: dict, division: dict, tag: str, prob: np.ndarray, params: dict,
                   idx: np.ndarray | None = None) -> None:
        """metrics.csv columns (labeled count, GMM means, selection metrics) and division.npz arrays
        (GMM parameters) of net ``tag``'s fit; ``prob``: the clean probabilities of the samples it was
        fitted on (``idx``, when not all of them)."""
        threshold = self.config.p_threshold
        clean_mean = params["means"][params["clean_component"]]
        noisy_mean = params["means"][1 - params["clean_component"]] if not params["degenerate"] else clean_mean
        row[f"labeled_{tag}"] = int((prob > threshold).sum())
        row[f"gmm_mean_clean_{tag}"] = clean_mean
        row[f"gmm_mean_noisy_{tag}"] = noisy_mean
        self.add_selection_metrics(row, tag, prob > threshold, prob, idx)
        division.update({f"gmm_means_{tag}": np.asarray(params["means"]),
                         f"gmm_variances_{tag}": np.asarray(params["variances"]),
                         f"gmm_weights_{tag}": np.asarray(params["weights"])})

    def ranks_agree(self, clean_probs: list[np.ndarray]) -> bool:
        """Under torchrun: do all ranks hold the same division? (A checksum of each, all-gathered.)"""
        labeled = [np.flatnonzero(p > self.config.p_threshold) for p in clean_probs]
        checksum = torch.tensor([float(p.sum()) for p in clean_probs] + [float((idx * 2654435761 % 1000003).sum())
                                                                         for idx in labeled],
                                dtype=torch.float64, device=self.train.labels.device)
        gathered = distributed.gather_rows(checksum.view(1, -1), self.dist.world_size, self.dist)
        agree = bool((gathered == gathered[0]).all())
        if not agree:
            log.warning(f"rank {self.dist.rank} holds a different division from rank 0")
        return agree

    # ----- training one net on its partner's division
    def labeled_mask(self, clean_prob: np.ndarray) -> np.ndarray:
        """(N,) bool: the samples used as labeled (official: clean probability > p_threshold)."""
        return clean_prob > self.config.p_threshold

    def labeled_split(self, clean_prob: np.ndarray, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(labeled_idx, unlabeled_idx) on the device; never leaves the labeled set nearly empty."""
        labeled = np.flatnonzero(self.labeled_mask(clean_prob))
        if len(labeled) < 2:
            k = min(len(clean_prob), max(2, self.config.batch_size))
            log.warning(f"the division for {tag} selected {len(labeled)} labeled sample(s); "
                        f"using the {k} most likely clean instead")
            labeled = np.sort(np.argsort(-clean_prob, kind="stable")[:k])
        mask = np.zeros(len(clean_prob), dtype=bool)
        mask[labeled] = True
        device = self.train.labels.device
        return (torch.as_tensor(labeled, device=device),
                torch.as_tensor(np.flatnonzero(~mask), device=device))

    # Hooks the hybrid overrides: where the λu ramp starts, a factor on λu, work after each step.
    def ramp_start(self, epoch: int) -> int:
        return self.warmup_end

    def lambda_u_scale(self, epoch: int) -> float:
        return 1.0

    def after_step(self, a: int, ctx: EpochContext) -> None:
        pass

    def train_net(self, a: int, b: int, clean_prob: np.ndarray, ctx: EpochContext) -> dict[str, float]:
        config = self.config
        optimizer = self.optimizers[a]
        self.train_nets[a].train()
        self.nets[b].eval()
        device = self.train.labels.device
        labeled_idx, unlabeled_idx = self.labeled_split(clean_prob, f"net{a + 1}")
        weights = torch.as_tensor(clean_prob, dtype=torch.float32, device=device)
        start = self.ramp_start(ctx.epoch)
        scale = self.lambda_u_scale(ctx.epoch) * self.damping
        sums = torch.zeros(len(self.part_names), device=device)
        lambda_u_eff = 0.0
        steps = 0
        for epoch_frac, idx_x, idx_u in self.mixmatch_batches(labeled_idx, unlabeled_idx, ctx, f"net{a + 1}"):
            lambda_u_eff = config.lambda_u * L.linear_rampup(epoch_frac, start, config.rampup_epochs) * scale
            parts = self.loss_parts(a, b, idx_x, idx_u, weights, lambda_u_eff, ctx)
            optimizer.zero_grad(set_to_none=True)
            parts[0].backward()
            optimizer.step()
            self.after_step(a, ctx)
            sums += torch.stack([p.detach() for p in parts])
            steps += 1
        stats = dict(zip(self.part_names, (sums / max(steps, 1)).tolist()))
        return {**stats, "lambda_u_eff": lambda_u_eff, "labeled_used": len(labeled_idx)}

    def mixmatch_batches(self, labeled_idx: torch.Tensor, unlabeled_idx: torch.Tensor, ctx: EpochContext,
                         tag: str):
        """One pass over the shuffled labeled set, each batch paired with the next unlabeled batch
        (the unlabeled set restarts when exhausted). Yields (fractional epoch of the official λu
        ramp, this rank's labeled indices, this rank's unlabeled indices)."""
        bs = self.config.batch_size * self.dist.world_size  # the global batch; each rank takes its slice
        num_iter = len(labeled_idx) // bs + 1  # official: fractional epoch of the λu ramp
        images = self.train.images
        unlabeled_batches = self.cycle(unlabeled_idx, bs, ctx.generator, images)
        for batch_idx, idx_x in enumerate(shuffled_batches(labeled_idx, bs, ctx, f"epoch {ctx.epoch + 1} train {tag}",
                                                           images)):
            yield ctx.epoch + batch_idx / num_iter, idx_x, next(unlabeled_batches)

    @staticmethod
    def cycle(indices: torch.Tensor, batch_size: int, generator: torch.Generator, images=None):
        """Endless shuffled global batches of ``indices``, reshuffled when exhausted (official
        restart); yields this rank's slice of each (told to ``images.prefetch`` a pass at a time).

        Yields empty tensors when ``indices`` is empty.
        """
        info = distributed.current()
        while True:
            if len(indices) == 0:
                yield indices
                continue
            perm = indices[torch.randperm(len(indices), device=indices.device, generator=generator)]
            local = [distributed.local_slice(perm[start:start + batch_size], info)
                     for start in range(0, len(perm), batch_size)]
            with prefetching(images, local):
                yield from local

    def guess_unlabeled(self, net, partner, u1, u2) -> torch.Tensor:
        """Co-guessing: sharpened mean of both nets on both unlabeled views (no grad)."""
        if self.config.faithful_order:
            # Official order: net stays in train mode for these no-grad forwards (batch statistics,
            # running stats updated), one forward per view.
            outs = [net(u1), net(u2)]
        else:
            outs = list(net(torch.cat([u1, u2])).chunk(2))
        both = partner(torch.cat([u1, u2]))  # eval mode: batching does not change the result
        outs += list(both.chunk(2))
        return L.co_guess([F.softmax(o.float(), dim=1) for o in outs], self.config.temperature)

    def refine_labeled(self, net, x1, x2, labels_onehot, w, temperature: float | None = None) -> torch.Tensor:
        """Co-refinement: w·y + (1−w)·mean prediction of the two views, sharpened with
        ``temperature`` (default: the config's T) (no grad)."""
        if self.config.faithful_order:
            p1, p2 = net(x1), net(x2)
        else:
            p1, p2 = net(torch.cat([x1, x2])).chunk(2)
        return L.co_refine(F.softmax(p1.float(), 1), F.softmax(p2.float(), 1), labels_onehot, w,
                           self.config.temperature if temperature is None else temperature)

    def views_and_targets(self, net, idx_x, idx_u, weights, guess, temperature, gen):
        """Two augmented views of the labeled and the unlabeled batch, the co-refined labeled targets
        and ``guess(u1, u2)`` for the unlabeled ones (no grad). Returns (views [x1, x2, u1, u2]
        (without u1, u2 when ``idx_u`` is empty), targets_x, targets_u or None)."""
        images = self.train.images
        views = [images.batch(idx_x, augment=True, generator=gen), images.batch(idx_x, augment=True, generator=gen)]
        labels_onehot = F.one_hot(self.train.labels[idx_x], self.num_classes).float()
        targets_u = None
        with torch.no_grad(), autocast(self.config):
            if len(idx_u) > 0:
                views += [images.batch(idx_u, augment=True, generator=gen),
                          images.batch(idx_u, augment=True, generator=gen)]
                targets_u = guess(views[2], views[3])
            targets_x = self.refine_labeled(net, views[0], views[1], labels_onehot, weights[idx_x], temperature)
        return views, targets_x, targets_u

    def mix(self, views, targets_x, targets_u, ctx):
        """MixUp over the concatenated views [x1, x2, u1, u2] with targets [p', p', q, q]: λ from the
        shared host RNG (max(λ, 1−λ)), the permutation from this rank's generator."""
        targets = [targets_x, targets_x] + ([] if targets_u is None else [targets_u, targets_u])
        all_inputs, all_targets = torch.cat(views), torch.cat(targets)
        lam = L.sample_mix_lambda(self.config.alpha, ctx.rng)
        perm = torch.randperm(len(all_inputs), device=all_inputs.device, generator=ctx.aug_generator)
        return L.mixup(all_inputs, all_targets, lam, perm)

    def loss_parts(self, a, b, idx_x, idx_u, weights, lambda_u_eff, ctx):
        """Loss of one batch for net ``a`` with partner ``b``: (total, Lx, Lu, penalty), float32 scalars."""
        net, partner = self.train_nets[a], self.nets[b]
        views, targets_x, targets_u = self.views_and_targets(
            net, idx_x, idx_u, weights, lambda u1, u2: self.guess_unlabeled(net, partner, u1, u2),
            self.config.temperature, ctx.aug_generator)
        mixed_inputs, mixed_targets = self.mix(views, targets_x, targets_u, ctx)
        if self.config.mix_forward == "labeled":
            # Official Clothing1M / WebVision code: only the 2B labeled mixes are forwarded (their partners
            # still come from all 4B views), so there is no Lu and the prior penalty covers those rows alone.
            mixed_inputs, mixed_targets = mixed_inputs[:2 * len(idx_x)], mixed_targets[:2 * len(idx_x)]
        with autocast(self.config):
            logits, term = self.forward_with_term(a, net, mixed_inputs, idx_u, ctx)
        parts = L.dividemix_loss(logits.float(), mixed_targets, 2 * len(idx_x), lambda_u_eff)
        return with_contrastive(parts, term, self.config.contrastive_weight)

    def forward_with_term(self, a: int, net, inputs: torch.Tensor, idx_u: torch.Tensor, ctx: EpochContext):
        """``(net(inputs), UNICON's contrastive term of the unlabeled batch idx_u)``; the term is
        None when --contrastive-weight is 0 (then this is just ``net(inputs)``)."""
        if self.contrastive is None:
            return net(inputs), None
        return self.contrastive.forward(a, net, inputs, idx_u, ctx.aug_generator)
