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
``stab_swa_start``. The others are DivideMix/hybrid options and are ignored (a note is printed).

This module also holds the pieces the hybrid shares: mean-teacher helpers, the confidence cap, the
soft OOD score and stochastic weight averaging.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from cdmix import distributed
from cdmix import losses as L
from cdmix.data.strong_aug import strong_augment
from cdmix.methods.base import EpochContext, Method, autocast, progress_bar
from cdmix.selection import per_class_thresholds

# Stabilisers that only mean something for the two-net DivideMix pipeline.
_HYBRID_ONLY = ("stab_temperature_decay", "stab_gmm_running_mean", "stab_blend_selection",
                "stab_second_warmup", "stab_label_smoothing")


# ---------------------------------------------------------------------------------------- helpers


def make_teacher(net: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``net`` to be used as its mean teacher."""
    teacher = copy.deepcopy(net)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_logits(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Teacher forward as the official Jo-SRC code runs it: train mode (batch statistics), no grad."""
    teacher.train()
    with torch.no_grad():
        return teacher(x).float()


def cap_confidence(probs: torch.Tensor, cap: float) -> torch.Tensor:
    """Rows whose largest probability exceeds ``cap`` are mixed with the uniform distribution so
    that it equals ``cap`` exactly (order and argmax are kept); other rows are unchanged.

    ``cap >= 1`` returns ``probs``; ``cap`` must exceed 1/C to leave the argmax meaningful.
    """
    if cap >= 1.0:
        return probs
    num_classes = probs.shape[-1]
    uniform = 1.0 / num_classes
    if cap <= uniform:
        raise ValueError(f"a confidence cap must exceed 1/C = {uniform:.4g}, got {cap}")
    top = probs.amax(dim=-1, keepdim=True)
    a = ((cap - uniform) / (top - uniform).clamp_min(1e-12)).clamp(max=1.0)
    return a * probs + (1.0 - a) * uniform


def soft_ood_score(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Soft version of "the two views disagree in argmax": ``1 - Σ_c p1_c p2_c`` per row, in [0, 1).

    It is the probability that labels drawn from the two view predictions differ: near 0 when both
    views agree confidently, ``1 - 1/C`` for two uniform predictions.
    """
    return (1.0 - (p1.float() * p2.float()).sum(dim=-1)).clamp(0.0, 1.0)


def josrc_weighted_loss(logits1, logits2, targets, ood_weight, sample_weight, alpha):
    """Jo-SRC loss with a per-sample OOD weight ``o`` in [0, 1] and per-sample CE weights.

    ``Lc = mean_b w_b [CE(l1_b, t_b) + CE(l2_b, t_b)]``, ``Lo = mean_b (1 - 2 o_b)·symKL2(p1_b, p2_b)``,
    total ``(1 - α)·Lc + α·Lo``. With a 0/1 ``o`` (the argmax test) and ``w = 1`` this is exactly
    :func:`cdmix.losses.josrc_loss`. Returns (total, Lc, Lo).
    """
    ce = (L.soft_cross_entropy(logits1, targets, reduction="none")
          + L.soft_cross_entropy(logits2, targets, reduction="none"))
    if ce.numel() == 0:
        zero = ce.sum() * 0.0
        return zero, zero, zero
    loss_c = (sample_weight * ce).mean()
    sym = L.symmetric_kl(F.softmax(logits1.float(), 1), F.softmax(logits2.float(), 1), base2=True)
    loss_o = ((1.0 - 2.0 * ood_weight) * sym).mean()
    return (1.0 - alpha) * loss_c + alpha * loss_o, loss_c, loss_o


class SWA:
    """Stochastic weight averaging: equal-weight running average of the nets' parameters, one
    snapshot per epoch, with BatchNorm statistics recomputed on the training images before use."""

    def __init__(self, nets: list[torch.nn.Module]):
        self.nets = [make_teacher(net) for net in nets]
        self.count = 0

    @torch.no_grad()
    def update(self, nets: list[torch.nn.Module]) -> None:
        self.count += 1
        for avg, net in zip(self.nets, nets):
            for pa, pn in zip(avg.parameters(), net.parameters()):
                if self.count == 1:
                    pa.copy_(pn.detach())
                else:
                    pa.mul_((self.count - 1) / self.count).add_(pn.detach(), alpha=1.0 / self.count)

    @torch.no_grad()
    def recompute_bn(self, images, batch_size: int, config) -> None:
        """Fresh BatchNorm running statistics: a cumulative average over one pass of ``images``
        (no augmentation), as ``torch.optim.swa_utils.update_bn`` does."""
        for net in self.nets:
            norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            if not norms:
                continue
            momenta = [m.momentum for m in norms]
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
            net.train()
            n = len(images)
            with autocast(config):
                for start in range(0, n, batch_size):
                    idx = torch.arange(start, min(start + batch_size, n), device=images.device)
                    net(images.batch(idx, augment=False))
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            net.eval()

    def state_dict(self) -> dict:
        return {"count": self.count, "nets": [net.state_dict() for net in self.nets]}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state.get("count", 0))
        for net, sd in zip(self.nets, state.get("nets", [])):
            net.load_state_dict(sd)


def ood_metrics(flagged: np.ndarray, is_ood: np.ndarray) -> dict[str, float]:
    """Precision / recall of an OOD flag against the known open-set mask (0.0 where undefined)."""
    flagged = np.asarray(flagged, dtype=bool)
    is_ood = np.asarray(is_ood, dtype=bool)
    tp = int((flagged & is_ood).sum())
    return {"ood_precision": tp / int(flagged.sum()) if flagged.any() else 0.0,
            "ood_recall": tp / int(is_ood.sum()) if is_ood.any() else 0.0}


def train_is_ood(train) -> np.ndarray | None:
    """The open-set mask of a ``TrainSet`` as a numpy bool array, when the engine passed one."""
    mask = getattr(train, "is_ood", None)
    if mask is None:
        return None
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask, dtype=bool)


def note_ignored(config, names: tuple[str, ...], method: str) -> None:
    defaults = type(config)()
    ignored = [n for n in names if getattr(config, n) != getattr(defaults, n)]
    if ignored:
        print(f"note: {', '.join(ignored)} has no effect with --method {method}")


# ----------------------------------------------------------------------------------------- method


class JoSRC(Method):
    name = "josrc"
    num_nets = 1

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

    # ----- evaluation
    def eval_nets(self) -> list[torch.nn.Module]:
        if self.swa is not None and self.swa.count > 0:
            return self.swa.nets
        return self.nets

    # ----- schedule
    def tau(self, epoch: int) -> float:
        c = self.config
        return L.tau_clean_josrc(epoch, c.warmup, c.epochs, c.tau_clean, c.tau_clean_max)

    def ema_decay(self, epoch: int) -> float:
        c = self.config
        if c.stab_slow_ema > 0 and epoch >= c.warmup:
            return c.stab_slow_ema
        return c.ema_decay

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
        net, opt, teacher = self.train_nets[0], self.optimizers[0], self.teacher
        warm = ctx.epoch < c.warmup
        tau = self.tau(ctx.epoch)
        decay = self.ema_decay(ctx.epoch)
        thresholds = self.class_thresholds(tau)
        train, images, gen = self.train, self.train.images, ctx.aug_generator
        n, bs = len(train), c.batch_size * self.dist.world_size  # global batch; each rank takes its slice
        device = train.labels.device
        net.train()
        perm = torch.randperm(n, device=device, generator=ctx.generator)
        if self.dist.enabled:  # each sample is seen by one rank; the ranks' parts are summed at the end
            self.p_clean.zero_()
            self.ood_flag.zero_()
            self.seen.zero_()
        sums = torch.zeros(3, device=device)
        counts = torch.zeros(3, device=device)
        steps = 0
        with progress_bar((n + bs - 1) // bs, f"epoch {ctx.epoch} {'warm-up' if warm else 'train'}",
                          ctx.progress) as bar:
            for start in range(0, n, bs):
                chunk = perm[start:start + bs]
                if len(chunk) < self.dist.world_size:  # too small to give every rank a sample
                    break
                idx = distributed.local_slice(chunk, self.dist)
                x1 = images.batch(idx, augment=True, generator=gen)
                x2 = images.batch(idx, augment=True, generator=gen)
                if c.stab_strong_aug:
                    s1, s2 = strong_augment(x1, gen), strong_augment(x2, gen)
                else:
                    s1, s2 = x1, x2
                with autocast(c):
                    if self.dist.enabled:  # DDP allows one forward per backward: both views at once
                        logits1, logits2 = net(torch.cat([s1, s2])).chunk(2)
                    else:
                        logits1, logits2 = net(s1), net(s2)
                logits1, logits2 = logits1.float(), logits2.float()
                labels = train.labels[idx]
                smoothed = L.smooth_labels(labels, self.num_classes, c.smooth_eps)
                p1 = F.softmax(logits1.detach(), 1)
                p2 = F.softmax(logits2.detach(), 1)
                p_clean = L.clean_likelihood(p1, smoothed)
                clean = p_clean >= thresholds[labels]
                if c.stab_soft_ood:
                    ood_w = soft_ood_score(p1, p2) * (~clean).float()
                    ood = ood_w > 0.5
                else:
                    ood = (p1.argmax(1) != p2.argmax(1)) & ~clean
                    ood_w = ood.float()
                if warm:
                    loss = L.josrc_warmup_loss(logits1, logits2, smoothed, clean)
                    lc, lo = loss.detach(), torch.zeros((), device=device)
                else:
                    with autocast(c):
                        t1, t2 = teacher_logits(teacher, x1), teacher_logits(teacher, x2)
                    s = (F.softmax(t1.float(), 1) + F.softmax(t2.float(), 1)) / 2
                    s = cap_confidence(s, c.stab_teacher_cap)
                    ood_target = F.softmax(s / c.ood_temperature, 1)
                    w = ood_w.unsqueeze(1)
                    targets = torch.where(clean.unsqueeze(1), smoothed, (1 - w) * s + w * ood_target)
                    # The collapse guard's damping cuts the weight of the pseudo-labelled samples.
                    sample_w = torch.where(clean, torch.ones_like(p_clean), torch.full_like(p_clean, self.damping))
                    loss, lc, lo = josrc_weighted_loss(logits1, logits2, targets, ood_w, sample_w, c.josrc_alpha)
                if c.stab_confidence_penalty > 0:
                    loss = loss + c.stab_confidence_penalty * (L.neg_entropy_penalty(logits1)
                                                               + L.neg_entropy_penalty(logits2)) / 2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                L.ema_update_(teacher.parameters(), self.nets[0].parameters(), decay)
                self.p_clean[idx] = p_clean
                self.ood_flag[idx] = ood
                self.seen[idx] = True
                sums += torch.stack([loss.detach(), lc.detach(), lo.detach()])
                counts += torch.stack([clean.sum(), (~clean & ~ood).sum(), ood.sum()]).float()
                steps += 1
                bar.update(1)
        if self.dist.enabled:
            self.gather_epoch_state(counts)
        row = self.epoch_metrics(ctx.epoch, tau, thresholds, sums / max(steps, 1), counts / max(n, 1))
        row["ema_decay"] = decay
        row["seconds_train"] = time.perf_counter() - t0
        if self.swa is not None and ctx.epoch >= c.stab_swa_start:
            self.swa.update(self.nets)
            self.swa.recompute_bn(images, c.eval_batch_size, c)
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
        is_ood = train_is_ood(self.train)
        if is_ood is not None:
            row.update(ood_metrics(flagged, is_ood))
        self.last_division = {"clean_prob": p_clean, "js_clean_likelihood": p_clean,
                              "selected": selected, "ood_flag": flagged,
                              "tau_clean": np.asarray(tau), "epoch": np.asarray(epoch)}
        return row

    # ----- state
    def extra_state(self) -> dict:
        state = {"teacher": self.teacher.state_dict(), "p_clean": self.p_clean.cpu(),
                 "ood_flag": self.ood_flag.cpu(), "seen": self.seen.cpu()}
        if self.swa is not None:
            state["swa"] = self.swa.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        if "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
        device = self.p_clean.device
        for key in ("p_clean", "ood_flag", "seen"):
            if key in state:
                setattr(self, key, state[key].to(device))
        if self.swa is not None and "swa" in state:
            self.swa.load_state_dict(state["swa"])
