"""The hybrid ("Contrastive DivideMix", REFERENCE §4): DivideMix with Jo-SRC parts, and stabilisers.

Faithful procedure (every ``stab_*`` option off):

1. warm-up (epochs < warmup): cross-entropy on the noisy labels, both nets, batch 2B (DivideMix);
2. selection, once per epoch, shared by both nets: ``p = softmax((f1(x) + f2(x)) / 2)`` (eval mode,
   no augmentation), ``P_clean = 1 - JS(p || ŷ) / ln 2`` clamped to [0, 1] (ŷ smoothed with
   ``smooth_eps``), labeled iff ``P_clean > tau(e)``, ``tau(e) = min(e / warmup, 1)·tau_clean_max``;
3. pseudo-labels for the unlabeled set from two EMA mean teachers (one per net, parameters only,
   decay ``ema_decay``, updated after every optimizer step, forwards in train mode under no_grad):
   mean over the two views of ``softmax((mt1(u) + mt2(u)) / 2)``, sharpened with T;
4. labeled targets: DivideMix co-refinement ``w·y + (1 - w)·p`` (w = P_clean, p the trained net's
   mean prediction on the two views), sharpened with T;
5. MixUp over [x1, x2, u1, u2] and the DivideMix loss ``Lx + λu_eff·Lu + penalty``;
6. ``λ_cons``·bidirectional KL (log base 2, as Jo-SRC) between the trained net's predictions on the
   two views of every labeled and unlabeled sample;
7. total ``Lx + λu_eff·Lu + penalty + λ_cons·L_cons``.

Stabilisers (each a config option, off by default):

* ``stab_temperature_decay``: over the second half of the post-warm-up epochs the sharpening
  temperature rises linearly from T to 1 (no sharpening at the end) and λu falls to half;
* ``stab_teacher_cap c``: the pseudo-labels' largest probability is capped at c (mixed with uniform);
* ``stab_gmm_running_mean``: a two-component GMM on the normalised per-sample losses of the averaged
  prediction, its means/variances/weights smoothed across epochs (momentum 0.9); the GMM only acts
  through blended selection, so on its own this turns on a 0.5 blend;
* ``stab_blend_selection w``: clean score ``(1 - w)·GMM posterior + w·P_clean``, threshold
  ``(1 - w)·p_threshold + w·tau``;
* ``stab_second_warmup k``: halfway through the post-warm-up epochs, k epochs of plain CE on the
  selected samples; then the teachers are reset to the nets and the λu ramp starts again;
* ``stab_slow_ema d``: teachers use EMA decay d after warm-up;
* ``stab_strong_aug``: the nets being trained see strongly augmented views (cutout, brightness and
  contrast jitter); the pseudo-label forwards keep the weak views;
* ``stab_confidence_penalty β``: ``+β·mean Σ p log p`` on the mixed batch (and in warm-up);
* ``stab_label_smoothing ε``: targets of warm-up CE and of Lx smoothed towards uniform by ε;
* ``stab_per_class_threshold``: per-class thresholds ``min(threshold, class median score)``;
* ``stab_soft_ood``: pseudo-labels flattened by the teachers' view disagreement
  ``o = 1 - Σ q1·q2`` (Jo-SRC's OOD target ``softmax(q / T_ood)``, weighted by o);
* ``stab_swa_start s``: from epoch s an equal-weight average of each net (BN recomputed) is used
  for evaluation.

The collapse guard's ``damping`` scales λu (as in DivideMix) and the learning rate.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from cdmix import losses as L
from cdmix.config import after_warmup_midpoint
from cdmix.data.strong_aug import strong_augment
from cdmix.methods.averaging import SWA, ema_decay, make_teacher, teacher_logits
from cdmix.methods.base import EpochContext, autocast
from cdmix.methods.dividemix import DivideMix
from cdmix.methods.unicon import with_contrastive
from cdmix.selection import (blend_clean_prob, fit_gmm_clean_prob, gmm_posterior_from_params, minmax_normalise,
                             per_class_threshold_mask, running_mean_update)

GMM_MOMENTUM = 0.9


def late_fraction(epoch: int, warmup: int, epochs: int) -> float:
    """0 until halfway through the post-warm-up epochs, then linear to 1 at the last epoch."""
    span = epochs - 1 - warmup
    if span <= 0:
        return 0.0
    progress = (epoch - warmup) / span
    return float(np.clip((progress - 0.5) / 0.5, 0.0, 1.0))


class Hybrid(DivideMix):
    name = "hybrid"
    num_nets = 2
    part_names = ("loss", "lx", "lu", "penalty", "lcons")

    def __init__(self, config, train):
        super().__init__(config, train)
        self.teachers = [make_teacher(net) for net in self.nets]
        self.gmm_state: dict | None = None
        self.swa = SWA(self.nets) if config.stab_swa_start > 0 else None
        self.selected = np.ones(len(train), dtype=bool)
        self.temperature_now = config.temperature

    # ----- schedules
    def second_warmup_start(self) -> int:
        return after_warmup_midpoint(self.config.warmup, self.config.epochs)

    def in_second_warmup(self, epoch: int) -> bool:
        k = self.config.stab_second_warmup
        start = self.second_warmup_start()
        return k > 0 and start <= epoch < start + k

    def temperature(self, epoch: int) -> float:
        c = self.config
        if not c.stab_temperature_decay:
            return c.temperature
        return c.temperature + (1.0 - c.temperature) * late_fraction(epoch, c.warmup, c.epochs)

    def lambda_u_scale(self, epoch: int) -> float:
        c = self.config
        if not c.stab_temperature_decay:
            return 1.0
        return 1.0 - 0.5 * late_fraction(epoch, c.warmup, c.epochs)

    def blend_weight(self) -> float:
        c = self.config
        if c.stab_blend_selection > 0:
            return c.stab_blend_selection
        return 0.5 if c.stab_gmm_running_mean else 0.0

    # ----- one epoch
    def train_epoch(self, ctx: EpochContext) -> dict[str, float]:
        c = self.config
        self.temperature_now = self.temperature(ctx.epoch)
        if ctx.epoch < c.warmup:
            row = self.warmup_epoch(ctx)
        else:
            row = {}
            t0 = time.perf_counter()
            clean_probs = self.divide(ctx, row)
            row["seconds_divide"] = time.perf_counter() - t0
            if self.in_second_warmup(ctx.epoch):
                row.update(self.second_warmup_epoch(ctx, clean_probs[0]))
            else:
                self.co_train(clean_probs, ctx, row)
                row["lcons"] = (row["lcons_net1"] + row["lcons_net2"]) / 2
        row["temperature_eff"] = self.temperature_now
        row["ema_decay"] = ema_decay(c, ctx.epoch)
        if self.swa is not None and ctx.epoch >= c.stab_swa_start:
            self.swa.update(self.nets, self.train.images, c.eval_batch_size, c)
            row["swa_count"] = self.swa.count
        return row

    def second_warmup_epoch(self, ctx: EpochContext, clean_prob: np.ndarray) -> dict[str, float]:
        row = {"second_warmup": 1}
        labeled, _ = self.labeled_split(clean_prob, "second warm-up")
        for i in range(self.num_nets):
            row[f"loss_net{i + 1}"] = self.ce_epoch(i, ctx, f"epoch {ctx.epoch + 1} 2nd warm-up net{i + 1}", labeled)
        row["train_loss"] = (row["loss_net1"] + row["loss_net2"]) / 2
        if not self.in_second_warmup(ctx.epoch + 1):  # last one: teachers restart from the nets
            for teacher, net in zip(self.teachers, self.nets):
                teacher.load_state_dict(net.state_dict())
        return row

    def ce_epoch(self, i: int, ctx: EpochContext, desc: str, indices: torch.Tensor | None = None) -> float:
        """DivideMix's warm-up epoch with the label-smoothing and confidence-penalty stabilisers,
        and the mean teacher's EMA update after every step."""
        c = self.config
        teacher, net, decay = self.teachers[i], self.nets[i], ema_decay(c, ctx.epoch)
        return self.supervised_epoch(i, ctx, 2 * c.batch_size, desc, indices, c.stab_label_smoothing,
                                     c.stab_confidence_penalty,
                                     after_step=lambda: L.ema_update_(teacher.parameters(), net.parameters(), decay))

    # ----- selection
    def divide(self, ctx: EpochContext, row: dict[str, float]) -> list[np.ndarray]:
        """JS clean likelihood of the averaged prediction (and optionally a GMM blend); one score for
        both nets. Sets ``self.selected`` and ``last_division``; fills metrics."""
        c = self.config
        labels = self.train.labels
        # Eval mode, no augmentation, the same on every rank under torchrun.
        logits1, logits2 = self.predict_logits(self.train.images, c.eval_batch_size, nets=self.nets)
        avg = (logits1 + logits2) / 2
        smoothed = L.smooth_labels(labels, self.num_classes, c.smooth_eps)
        js = L.js_divergence_base2(F.softmax(avg, 1), smoothed)  # = JS in nats / ln 2, in [0, 1]
        p_clean = (1.0 - js).clamp(0.0, 1.0).cpu().numpy().astype(np.float64)
        tau = L.tau_clean_report(ctx.epoch, c.warmup, c.tau_clean_max)
        score, threshold = p_clean, tau
        division: dict[str, np.ndarray] = {"js_clean_likelihood": p_clean}
        weight = self.blend_weight()
        if weight > 0:
            losses = F.cross_entropy(avg, labels, reduction="none")
            norm = minmax_normalise(losses.cpu().numpy())
            gmm_prob, params = fit_gmm_clean_prob(norm, seed=c.seed)
            if c.stab_gmm_running_mean:
                self.gmm_state = running_mean_update(self.gmm_state, params, GMM_MOMENTUM)
                params = self.gmm_state
                gmm_prob = gmm_posterior_from_params(norm, params)
            score = blend_clean_prob(gmm_prob, p_clean, weight)
            threshold = (1.0 - weight) * c.p_threshold + weight * tau
            clean_k = params["clean_component"]
            row["gmm_mean_clean_net1"] = float(params["means"][clean_k])
            row["gmm_mean_noisy_net1"] = float(params["means"][1 - clean_k])
            division.update({"loss_net1": norm, "gmm_prob": gmm_prob,
                             "gmm_means": np.asarray(params["means"], dtype=np.float64)})
        if c.stab_per_class_threshold:
            selected = per_class_threshold_mask(score, labels.cpu().numpy(), self.num_classes, threshold)
        else:
            selected = score > threshold
        self.selected = selected
        row["tau_clean"] = tau
        row["threshold"] = threshold
        row["js_mean"] = float(js.mean())
        row["labeled_net1"] = row["labeled_net2"] = int(selected.sum())
        self.add_selection_metrics(row, "net1", selected, score)
        division.update({"clean_prob": score, "clean_prob_net1": score, "clean_prob_net2": score,
                         "selected": selected})
        self.last_division = division
        return [score, score]

    def labeled_mask(self, clean_prob: np.ndarray) -> np.ndarray:
        return self.selected

    # ----- training one net: DivideMix's loop with these hooks
    def ramp_start(self, epoch: int) -> int:
        """Epoch the λu ramp counts from: the warm-up end, or the end of the second warm-up."""
        k = self.config.stab_second_warmup
        end2 = self.second_warmup_start() + k
        return end2 if k > 0 and epoch >= end2 else self.config.warmup

    def after_step(self, a: int, ctx: EpochContext) -> None:
        L.ema_update_(self.teachers[a].parameters(), self.nets[a].parameters(), ema_decay(self.config, ctx.epoch))

    def pseudo_labels(self, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
        """Teachers' pseudo-labels: views-mean of softmax((mt1(u) + mt2(u)) / 2), sharpened, with the
        soft-OOD flattening and the confidence cap when those stabilisers are on (no grad)."""
        c = self.config
        both = torch.cat([u1, u2])
        avg = sum(teacher_logits(t, both) for t in self.teachers) / len(self.teachers)
        q1, q2 = F.softmax(avg, 1).chunk(2)
        q = L.sharpen((q1 + q2) / 2, self.temperature_now)
        if c.stab_soft_ood:
            o = L.soft_ood_score(q1, q2).unsqueeze(1)
            q = (1 - o) * q + o * F.softmax(q / c.ood_temperature, 1)
        return L.cap_confidence(q, c.stab_teacher_cap)

    def loss_parts(self, a, b, idx_x, idx_u, weights, lambda_u_eff, ctx):
        """Loss of one batch for net ``a`` (the partner ``b`` is not used: the teachers guess the
        pseudo-labels): (total, Lx, Lu, penalty, L_cons), float32 scalars."""
        c = self.config
        net = self.train_nets[a]
        gen = ctx.aug_generator
        views, targets_x, targets_u = self.views_and_targets(net, idx_x, idx_u, weights, self.pseudo_labels,
                                                             self.temperature_now, gen)
        if c.stab_label_smoothing > 0:
            targets_x = (1 - c.stab_label_smoothing) * targets_x + c.stab_label_smoothing / self.num_classes
        if c.stab_strong_aug:
            views = [strong_augment(v, gen) for v in views]
        mixed_inputs, mixed_targets = self.mix(views, targets_x, targets_u, ctx)
        consistency = c.lambda_cons > 0
        with autocast(c):
            if consistency and self.dist.enabled:
                # DDP allows one forward per backward: the mixed batch and the two views at once.
                both, term = self.forward_with_term(a, net, torch.cat([mixed_inputs, torch.cat(views)]), idx_u, ctx)
                logits, views_out = both.split(len(mixed_inputs))
            else:
                logits, term = self.forward_with_term(a, net, mixed_inputs, idx_u, ctx)
                views_out = net(torch.cat(views)) if consistency else None
        logits = logits.float()
        total, lx, lu, penalty = L.dividemix_loss(logits, mixed_targets, 2 * len(idx_x), lambda_u_eff)
        if c.stab_confidence_penalty > 0:
            total = total + c.stab_confidence_penalty * L.neg_entropy_penalty(logits)
        if consistency:
            # Views in the order [x1, x2, u1, u2]: view 1 = x1 ∪ u1, view 2 = x2 ∪ u2.
            out = views_out.float()
            nx, nu = len(idx_x), len(idx_u) if targets_u is not None else 0
            v1 = torch.cat([out[:nx], out[2 * nx:2 * nx + nu]])
            v2 = torch.cat([out[nx:2 * nx], out[2 * nx + nu:]])
            lcons = L.symmetric_kl(F.softmax(v1, 1), F.softmax(v2, 1), base2=True).mean()
            total = total + c.lambda_cons * lcons
        else:
            lcons = torch.zeros((), device=logits.device)
        return with_contrastive((total, lx, lu, penalty, lcons), term, c.contrastive_weight)

    # ----- state
    def extra_state(self) -> dict:
        state = super().extra_state()
        state.update({"teachers": [t.state_dict() for t in self.teachers], "gmm_state": self.gmm_state,
                      "selected": self.selected})
        if self.swa is not None:
            state["swa"] = self.swa.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        for teacher, sd in zip(self.teachers, state["teachers"]):
            teacher.load_state_dict(sd)
        self.gmm_state = state["gmm_state"]
        self.selected = np.asarray(state["selected"], dtype=bool)
        if self.swa is not None:
            self.swa.load_state_dict(state["swa"])
