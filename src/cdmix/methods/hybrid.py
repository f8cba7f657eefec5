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

from cdmix import distributed
from cdmix import losses as L
from cdmix.data.strong_aug import strong_augment
from cdmix.methods.base import EpochContext, autocast, progress_bar
from cdmix.methods.dividemix import DivideMix
from cdmix.methods.josrc import SWA, cap_confidence, make_teacher, soft_ood_score, teacher_logits
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

    def __init__(self, config, train):
        super().__init__(config, train)
        self.teachers = [make_teacher(net) for net in self.nets]
        self.gmm_state: dict | None = None
        self.swa = SWA(self.nets) if config.stab_swa_start > 0 else None
        self.selected = np.ones(len(train), dtype=bool)
        self.temperature_now = config.temperature

    # ----- schedules
    def second_warmup_start(self) -> int:
        c = self.config
        return c.warmup + (c.epochs - c.warmup) // 2

    def in_second_warmup(self, epoch: int) -> bool:
        k = self.config.stab_second_warmup
        start = self.second_warmup_start()
        return k > 0 and start <= epoch < start + k

    def ramp_start(self, epoch: int) -> int:
        """Epoch the λu ramp counts from: the warm-up end, or the end of the second warm-up."""
        k = self.config.stab_second_warmup
        end2 = self.second_warmup_start() + k
        return end2 if k > 0 and epoch >= end2 else self.config.warmup

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

    def ema_decay(self, epoch: int) -> float:
        c = self.config
        if c.stab_slow_ema > 0 and epoch >= c.warmup:
            return c.stab_slow_ema
        return c.ema_decay

    def blend_weight(self) -> float:
        c = self.config
        if c.stab_blend_selection > 0:
            return c.stab_blend_selection
        return 0.5 if c.stab_gmm_running_mean else 0.0

    # ----- evaluation
    def eval_nets(self) -> list[torch.nn.Module]:
        if self.swa is not None and self.swa.count > 0:
            return self.swa.nets
        return self.nets

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
                row.update(self.second_warmup_epoch(ctx))
            else:
                self.co_train(clean_probs, ctx, row)
                row["lcons"] = (row["lcons_net1"] + row["lcons_net2"]) / 2
        row["temperature_eff"] = self.temperature_now
        row["ema_decay"] = self.ema_decay(ctx.epoch)
        if self.swa is not None and ctx.epoch >= c.stab_swa_start:
            self.swa.update(self.nets)
            self.swa.recompute_bn(self.train.images, c.eval_batch_size, c)
            row["swa_count"] = self.swa.count
        return row

    def warmup_epoch(self, ctx: EpochContext) -> dict[str, float]:
        row = {}
        t0 = time.perf_counter()
        for i in range(len(self.nets)):
            row[f"loss_net{i + 1}"] = self.ce_epoch(i, ctx, None, f"epoch {ctx.epoch} warm-up net{i + 1}")
        row["train_loss"] = (row["loss_net1"] + row["loss_net2"]) / 2
        row["seconds_train"] = time.perf_counter() - t0
        return row

    def second_warmup_epoch(self, ctx: EpochContext) -> dict[str, float]:
        row = {"second_warmup": 1}
        labeled, _ = self.labeled_split(None, "second warm-up")
        for i in range(len(self.nets)):
            row[f"loss_net{i + 1}"] = self.ce_epoch(i, ctx, labeled, f"epoch {ctx.epoch} 2nd warm-up net{i + 1}")
        row["train_loss"] = (row["loss_net1"] + row["loss_net2"]) / 2
        if not self.in_second_warmup(ctx.epoch + 1):  # last one: teachers restart from the nets
            for teacher, net in zip(self.teachers, self.nets):
                teacher.load_state_dict(net.state_dict())
        return row

    def ce_epoch(self, i: int, ctx: EpochContext, indices: torch.Tensor | None, desc: str) -> float:
        """Cross-entropy on the noisy labels of ``indices`` (all samples when None), batch 2B.

        With every stabiliser off this is ``supervised_epoch`` (same random draws), plus the mean
        teacher's EMA update after every step.
        """
        c = self.config
        net, opt, teacher = self.train_nets[i], self.optimizers[i], self.teachers[i]
        train = self.train
        net.train()
        device = train.labels.device
        if indices is None:
            indices = torch.arange(len(train), device=device)
        n, bs = len(indices), 2 * c.batch_size * self.dist.world_size  # global batch
        decay = self.ema_decay(ctx.epoch)
        perm = indices[torch.randperm(n, device=device, generator=ctx.generator)]
        total = torch.zeros((), device=device)
        steps = 0
        with progress_bar((n + bs - 1) // bs, desc, ctx.progress) as bar:
            for start in range(0, n, bs):
                chunk = perm[start:start + bs]
                if len(chunk) < self.dist.world_size:  # too small to give every rank a sample
                    break
                idx = distributed.local_slice(chunk, self.dist)
                x = train.images.batch(idx, augment=True, generator=ctx.aug_generator)
                with autocast(c):
                    logits = net(x)
                logits = logits.float()
                loss = F.cross_entropy(logits, train.labels[idx], label_smoothing=c.stab_label_smoothing)
                if c.neg_entropy:
                    loss = loss + L.neg_entropy_penalty(logits)
                if c.stab_confidence_penalty > 0:
                    loss = loss + c.stab_confidence_penalty * L.neg_entropy_penalty(logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                L.ema_update_(teacher.parameters(), self.nets[i].parameters(), decay)
                total += loss.detach()
                steps += 1
                bar.update(1)
        return float(total) / max(steps, 1)

    # ----- selection
    def train_logits(self) -> list[torch.Tensor]:
        """Logits of each trained net on every training sample: eval mode, no augmentation (the same
        on every rank under torchrun)."""
        return self.predict_logits(self.train.images, self.config.eval_batch_size, nets=self.nets)

    def divide(self, ctx: EpochContext, row: dict[str, float]) -> list[np.ndarray]:
        """JS clean likelihood of the averaged prediction (and optionally a GMM blend); one score for
        both nets. Sets ``self.selected`` and ``last_division``; fills metrics."""
        c = self.config
        labels = self.train.labels
        logits1, logits2 = self.train_logits()
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
            clean_k = int(params.get("clean_component", int(np.argmin(params["means"]))))
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

    def labeled_split(self, clean_prob, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(labeled, unlabeled) indices from this epoch's selection; never (nearly) empty."""
        labeled = np.flatnonzero(self.selected)
        if len(labeled) < 2:
            score = self.last_division["clean_prob"] if self.last_division else np.zeros(len(self.selected))
            k = min(len(score), max(2, self.config.batch_size))
            print(f"warning: the selection for {tag} kept {len(labeled)} sample(s); "
                  f"using the {k} most likely clean instead")
            labeled = np.sort(np.argsort(-score, kind="stable")[:k])
        mask = np.zeros(len(self.selected), dtype=bool)
        mask[labeled] = True
        device = self.train.labels.device
        return torch.as_tensor(labeled, device=device), torch.as_tensor(np.flatnonzero(~mask), device=device)

    # ----- training one net
    def train_net(self, a: int, b: int, clean_prob: np.ndarray, ctx: EpochContext) -> dict[str, float]:
        c = self.config
        net, optimizer = self.nets[a], self.optimizers[a]
        net.train()
        device = self.train.labels.device
        labeled_idx, unlabeled_idx = self.labeled_split(clean_prob, f"net{a + 1}")
        weights = torch.as_tensor(clean_prob, dtype=torch.float32, device=device)
        start = self.ramp_start(ctx.epoch)
        scale = self.lambda_u_scale(ctx.epoch) * self.damping
        decay = self.ema_decay(ctx.epoch)
        sums = torch.zeros(5, device=device)
        lambda_u_eff = 0.0
        steps = 0
        for epoch_frac, idx_x, idx_u in self.mixmatch_batches(labeled_idx, unlabeled_idx, ctx, f"net{a + 1}"):
            lambda_u_eff = c.lambda_u * L.linear_rampup(epoch_frac, start, c.rampup_epochs) * scale
            parts = self.hybrid_step(a, idx_x, idx_u, weights, lambda_u_eff, ctx)
            optimizer.zero_grad(set_to_none=True)
            parts[0].backward()
            optimizer.step()
            L.ema_update_(self.teachers[a].parameters(), net.parameters(), decay)
            sums += torch.stack([p.detach() for p in parts])
            steps += 1
        means = (sums / max(steps, 1)).tolist()
        return {"loss": means[0], "lx": means[1], "lu": means[2], "penalty": means[3], "lcons": means[4],
                "lambda_u_eff": lambda_u_eff, "labeled_used": len(labeled_idx)}

    def pseudo_labels(self, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
        """Teachers' pseudo-labels: views-mean of softmax((mt1(u) + mt2(u)) / 2), sharpened, with the
        soft-OOD flattening and the confidence cap when those stabilisers are on (no grad)."""
        c = self.config
        both = torch.cat([u1, u2])
        avg = sum(teacher_logits(t, both) for t in self.teachers) / len(self.teachers)
        q1, q2 = F.softmax(avg, 1).chunk(2)
        q = L.sharpen((q1 + q2) / 2, self.temperature_now)
        if c.stab_soft_ood:
            o = soft_ood_score(q1, q2).unsqueeze(1)
            q = (1 - o) * q + o * F.softmax(q / c.ood_temperature, 1)
        return cap_confidence(q, c.stab_teacher_cap)

    def hybrid_step(self, a, idx_x, idx_u, weights, lambda_u_eff, ctx):
        """Loss of one batch for net ``a``: (total, Lx, Lu, penalty, L_cons), float32 scalars."""
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
                logits, views_out = net(torch.cat([mixed_inputs, torch.cat(views)])).split(len(mixed_inputs))
            else:
                logits = net(mixed_inputs)
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
        return total, lx, lu, penalty, lcons

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
        for teacher, sd in zip(self.teachers, state.get("teachers", [])):
            teacher.load_state_dict(sd)
        self.gmm_state = state.get("gmm_state")
        if "selected" in state:
            self.selected = np.asarray(state["selected"], dtype=bool)
        if self.swa is not None and "swa" in state:
            self.swa.load_state_dict(state["swa"])
