"""Jo-SRC (Yao et al., CVPR 2021), as the official code does it (REFERENCE §3), plus stabilisers.

One student net and a mean teacher (EMA of the parameters only, updated after every optimizer step;
its forwards run in train mode under ``no_grad``). Each step sees two augmented views of a batch.

* Clean likelihood ``P_clean = 1 - JS2(softmax(student(x1)) || smoothed label)`` in [0, 1];
  clean iff ``P_clean >= tau_clean(epoch)`` (official schedule, ``tau_clean_josrc``).
* Warm-up: mean over the clean samples of CE(logits1, ŷ) + CE(logits2, ŷ) (0, not NaN, when none).
* After warm-up: unclean samples whose views disagree in argmax are OOD, the others ID-noisy;
  targets clean → ŷ, ID → teacher soft label s, OOD → softmax(s / 10); loss
  ``(1 - α)·Lc + α·Lo`` with ``Lo = mean sign·symKL(p1, p2)``, sign −1 for OOD.

Stabilisers that apply here (all off by default): ``stab_teacher_cap`` (cap the teacher soft label's
largest probability), ``stab_slow_ema`` (EMA decay after warm-up), ``stab_strong_aug`` (student views
only), ``stab_confidence_penalty``, ``stab_per_class_threshold`` (per-class floors from the previous
epoch's likelihoods), ``stab_soft_ood`` (soft OOD weight instead of the argmax test) and
``stab_swa_start``. The others are DivideMix/hybrid options and are ignored (a warning is logged).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from cdmix import losses as L
from cdmix.data.strong_aug import strong_augment
from cdmix.methods.averaging import SWA, ema_decay, make_teacher, teacher_logits
from cdmix.methods.base import EpochContext, Method, autocast, shuffled_batches
from cdmix.selection import ood_metrics, per_class_thresholds

log = logging.getLogger("cdmix")

# Stabilisers that only mean something for the two-net DivideMix pipeline.
_HYBRID_ONLY = ("stab_temperature_decay", "stab_gmm_running_mean", "stab_blend_selection",
                "stab_second_warmup", "stab_label_smoothing")


def note_ignored(config, names: tuple[str, ...], method: str) -> None:
    defaults = type(config)()
    ignored = [n for n in names if getattr(config, n) != getattr(defaults, n)]
    if ignored:
        log.warning(f"{', '.join(ignored)} has no effect with --method {method}")


# ----------------------------------------------------------------------------------------- method


class JoSRC(Method):
    name = "josrc"
    num_nets = 1
    has_warmup = True  # the start of a run prints its warm-up
    selected_set_column = "frac_clean"  # the collapse guard reports a halving of the clean fraction

    def __init__(self, config, train):
        super().__init__(config, train)
        self.teacher = make_teacher(self.nets[0])
        device = train.labels.device
        n = len(train)
        # P_clean of every sample, as computed during the last epoch (by position).
        self.p_clean = torch.zeros(n, device=device)
        self.ood_flag = torch.zeros(n, dtype=torch.bool, device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)
        self.swa = SWA(self.nets) if config.stab_swa_start > 0 else None
        note_ignored(config, _HYBRID_ONLY, self.name)

    # ----- schedule
    def tau(self, epoch: int) -> float:
        c = self.config
        return L.tau_clean_josrc(epoch, c.warmup, c.epochs, c.tau_clean, c.tau_clean_max)

    def class_thresholds(self, tau: float) -> torch.Tensor:
        """Per-class thresholds (C,): ``tau``, or with per-class thresholds the floor
        ``min(tau, median of last epoch's P_clean of the class)``."""
        device = self.p_clean.device
        if not self.config.stab_per_class_threshold or not bool(self.seen.all()):
            return torch.full((self.num_classes,), float(tau), device=device)
        thresholds = per_class_thresholds(self.p_clean.cpu().numpy(), self.train.labels.cpu().numpy(),
                                          self.num_classes, tau)
        return torch.as_tensor(thresholds, dtype=torch.float32, device=device)

    # ----- one epoch
    def train_epoch(self, ctx: EpochContext) -> dict[str, float]:
        c = self.config
        t0 = time.perf_counter()
        net, opt = self.train_nets[0], self.optimizers[0]
        warm = ctx.epoch < c.warmup
        tau = self.tau(ctx.epoch)
        decay = ema_decay(c, ctx.epoch)
        thresholds = self.class_thresholds(tau)
        train, gen = self.train, ctx.aug_generator
        device = train.labels.device
        net.train()
        if self.dist.enabled:  # each sample is seen by one rank; the ranks' parts are summed at the end
            self.p_clean.zero_()
            self.ood_flag.zero_()
            self.seen.zero_()
        sums = torch.zeros(3, device=device)
        counts = torch.zeros(3, device=device)
        steps = 0
        for idx in shuffled_batches(torch.arange(len(train), device=device), c.batch_size * self.dist.world_size,
                                    ctx, f"epoch {ctx.epoch + 1} {'warm-up' if warm else 'train'}", train.images):
            x1 = train.images.batch(idx, augment=True, generator=gen)
            x2 = train.images.batch(idx, augment=True, generator=gen)
            s1, s2 = (strong_augment(x1, gen), strong_augment(x2, gen)) if c.stab_strong_aug else (x1, x2)
            with autocast(c):
                if self.dist.enabled:  # DDP allows one forward per backward: both views at once
                    logits1, logits2 = net(torch.cat([s1, s2])).chunk(2)
                else:
                    logits1, logits2 = net(s1), net(s2)
            logits1, logits2 = logits1.float(), logits2.float()
            labels = train.labels[idx]
            smoothed = L.smooth_labels(labels, self.num_classes, c.smooth_eps)
            p1, p2 = F.softmax(logits1.detach(), 1), F.softmax(logits2.detach(), 1)
            p_clean = L.clean_likelihood(p1, smoothed)
            ood_score = L.soft_ood_score(p1, p2) if c.stab_soft_ood else None
            clean, id_noisy, ood = L.josrc_split(p1, p2, p_clean, thresholds[labels], ood_score)
            if warm:
                loss = L.josrc_warmup_loss(logits1, logits2, smoothed, clean)
                lc, lo = loss.detach(), torch.zeros((), device=device)
            else:
                ood_weight = ood if ood_score is None else ood_score * (~clean).float()
                with autocast(c):
                    t1, t2 = teacher_logits(self.teacher, x1), teacher_logits(self.teacher, x2)
                s = L.cap_confidence((F.softmax(t1, 1) + F.softmax(t2, 1)) / 2, c.stab_teacher_cap)
                targets = L.josrc_targets(clean, ood_weight, smoothed, s, c.ood_temperature)
                # The collapse guard's damping cuts the weight of the pseudo-labelled samples.
                sample_weight = torch.where(clean, torch.ones_like(p_clean), torch.full_like(p_clean, self.damping))
                loss, lc, lo = L.josrc_loss(logits1, logits2, targets, ood_weight, c.josrc_alpha,
                                            sample_weight=sample_weight)
            if c.stab_confidence_penalty > 0:
                loss = loss + c.stab_confidence_penalty * (L.neg_entropy_penalty(logits1)
                                                           + L.neg_entropy_penalty(logits2)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            L.ema_update_(self.teacher.parameters(), self.nets[0].parameters(), decay)
            self.p_clean[idx] = p_clean
            self.ood_flag[idx] = ood
            self.seen[idx] = True
            sums += torch.stack([loss.detach(), lc.detach(), lo.detach()])
            counts += torch.stack([clean.sum(), id_noisy.sum(), ood.sum()]).float()
            steps += 1
        if self.dist.enabled:
            self.gather_epoch_state(counts)
        row = self.epoch_metrics(ctx.epoch, tau, thresholds, sums / max(steps, 1), counts / max(len(train), 1))
        row["ema_decay"] = decay
        row["seconds_train"] = time.perf_counter() - t0
        if self.swa is not None and ctx.epoch >= c.stab_swa_start:
            self.swa.update(self.nets, train.images, c.eval_batch_size, c)
            row["swa_count"] = self.swa.count
        return row

    def gather_epoch_state(self, counts: torch.Tensor) -> None:
        """Under torchrun: sum the ranks' per-sample likelihoods, OOD flags and counts (in place)."""
        import torch.distributed as dist

        flags = torch.stack([self.ood_flag.float(), self.seen.float()])
        for tensor in (self.p_clean, flags, counts):
            dist.all_reduce(tensor)
        self.ood_flag.copy_(flags[0] > 0)
        self.seen.copy_(flags[1] > 0)

    def epoch_metrics(self, epoch, tau, thresholds, means, fractions) -> dict[str, float]:
        means, fractions = means.tolist(), fractions.tolist()
        row = {"train_loss": means[0], "lc": means[1], "lo": means[2], "tau_clean": tau,
               "frac_clean": fractions[0], "frac_id": fractions[1], "frac_ood": fractions[2]}
        p_clean = self.p_clean.detach().cpu().numpy().astype(np.float64)
        selected = (self.p_clean >= thresholds[self.train.labels]).cpu().numpy()
        flagged = self.ood_flag.cpu().numpy()
        row["p_clean_mean"] = float(p_clean.mean()) if len(p_clean) else 0.0
        self.add_selection_metrics(row, "net1", selected, p_clean)
        if self.train.is_ood is not None:
            row.update(ood_metrics(flagged, self.train.is_ood.cpu().numpy()))
        self.last_division = {"clean_prob": p_clean, "js_clean_likelihood": p_clean,
                              "selected": selected, "ood_flag": flagged,
                              "tau_clean": np.asarray(tau), "epoch": np.asarray(epoch + 1)}
        return row

    # ----- state
    def extra_state(self) -> dict:
        state = {"teacher": self.teacher.state_dict(), "p_clean": self.p_clean.cpu(),
                 "ood_flag": self.ood_flag.cpu(), "seen": self.seen.cpu()}
        if self.swa is not None:
            state["swa"] = self.swa.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        device = self.p_clean.device
        for key in ("p_clean", "ood_flag", "seen"):
            setattr(self, key, state[key].to(device))
        if self.swa is not None:
            self.swa.load_state_dict(state["swa"])
