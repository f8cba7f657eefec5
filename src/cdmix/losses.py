"""Loss functions and schedules for DivideMix, Jo-SRC and the hybrid.

Every function here is pure: tensors in, tensors (or floats) out, no module state and no config
objects. Shapes use ``B`` for the batch size and ``C`` for the number of classes.

Numerical policy
----------------
* Softmax / log-softmax are always computed in float32, whatever the dtype of the logits (bf16 and
  fp16 logits are upcast first). Losses are returned as float32 scalars.
* ``x log x`` terms use a clamp inside the log, so a probability of exactly 0 contributes 0 to the
  value and a finite amount to the gradient (``torch.xlogy(p, p)`` would give a NaN gradient at
  ``p == 0``). Cross terms ``p log q`` clamp ``q`` at ``_LOG_EPS``: where the official code returns
  ``inf``/``NaN`` (``q == 0``) we return a large finite number instead.
* A mean over an empty set is 0 (kept connected to the autograd graph), never NaN.

Randomness
----------
Nothing here draws random numbers implicitly: :func:`sample_mix_lambda` takes a
``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "sharpen",
    "co_refine",
    "co_guess",
    "mixup",
    "sample_mix_lambda",
    "soft_cross_entropy",
    "mse_consistency",
    "linear_rampup",
    "uniform_prior_penalty",
    "neg_entropy_penalty",
    "dividemix_loss",
    "smooth_labels",
    "js_divergence_base2",
    "clean_likelihood",
    "symmetric_kl",
    "josrc_split",
    "josrc_targets",
    "josrc_loss",
    "josrc_warmup_loss",
    "cap_confidence",
    "soft_ood_score",
    "tau_clean_josrc",
    "tau_clean_report",
    "ema_update_",
    "nt_xent",
]

_LN2 = math.log(2.0)
# Smallest positive normal float32: log of it is about -87.3, so x*log(x) stays finite.
_TINY = torch.finfo(torch.float32).tiny
# Floor for the second argument of cross terms p*log(q); caps a single term at ~27.6 nats.
_LOG_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a floating tensor of at least float32 precision (float64 stays float64)."""
    if x.dtype == torch.float64:
        return x
    return x.float()


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, computed in float32."""
    return torch.softmax(_f32(logits), dim=-1)


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p * log(p)`` with ``0 log 0 = 0`` and a finite gradient everywhere."""
    return p * torch.log(p.clamp_min(_TINY))


def _xlogy(p: torch.Tensor, q: torch.Tensor, eps: float = _LOG_EPS) -> torch.Tensor:
    """Elementwise ``p * log(max(q, eps))``: finite value and gradient even where ``q == 0``."""
    return p * torch.log(q.clamp_min(eps))


def _zero_like_graph(x: torch.Tensor) -> torch.Tensor:
    """A float32 scalar 0 that is still attached to ``x``'s autograd graph (if any)."""
    return _f32(x).sum() * 0.0


def _safe_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a 1-D tensor; 0 (attached to the graph) for an empty tensor."""
    if values.numel() == 0:
        return _zero_like_graph(values)
    return values.mean()


def _as_column(w: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Per-sample weights of shape (B,), (B, 1) or a scalar, as a (B, 1) tensor like ``like``."""
    w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
    if w.dim() == 0:
        return w.expand(batch, 1)
    return w.reshape(batch, 1)


# ----------------------------------------------------------------------------------------------
# DivideMix
# ----------------------------------------------------------------------------------------------


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature sharpening ``p^(1/T) / sum_c p_c^(1/T)`` over the last dim.

    Args:
        probs: (..., C) non-negative probabilities (rows need not sum to exactly 1).
        temperature: T > 0; T < 1 sharpens, T = 1 only renormalises.

    Returns:
        (..., C) float32 (float64 stays float64) rows summing to 1. Each row is divided by its
        maximum before the power (mathematically a no-op) so small probabilities and small T
        cannot underflow the whole row; an all-zero row is returned as zeros, not NaN.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = _f32(probs).clamp_min(0.0)
    scale = p.amax(dim=-1, keepdim=True).clamp_min(_TINY)
    powered = (p / scale) ** (1.0 / temperature)
    return powered / powered.sum(dim=-1, keepdim=True).clamp_min(_TINY)


def co_refine(
    probs_x1: torch.Tensor,
    probs_x2: torch.Tensor,
    labels_onehot: torch.Tensor,
    clean_prob: torch.Tensor | float,
    temperature: float,
) -> torch.Tensor:
    """DivideMix label co-refinement for the labeled batch.

    ``p = (probs_x1 + probs_x2) / 2``, ``p' = w * y + (1 - w) * p``, then :func:`sharpen` with T.

    Args:
        probs_x1, probs_x2: (B, C) softmax outputs of the net being trained on the two views.
        labels_onehot: (B, C) one-hot (or any target distribution) of the noisy labels.
        clean_prob: (B,) or (B, 1) clean probabilities w from the partner's GMM (or a scalar).
        temperature: sharpening temperature T.

    Returns:
        (B, C) refined, sharpened targets (float32). Not detached: call under ``no_grad``.
    """
    p = (_f32(probs_x1) + _f32(probs_x2)) / 2
    y = _f32(labels_onehot).to(p.dtype)
    w = _as_column(clean_prob, p.shape[0], p)
    return sharpen(w * y + (1 - w) * p, temperature)


def co_guess(probs_list: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """DivideMix label co-guessing for the unlabeled batch: mean of all inputs, then sharpen.

    Args:
        probs_list: non-empty sequence of (B, C) probability tensors (officially the softmax of
            both nets on both unlabeled views, in the order A(u1), A(u2), B(u1), B(u2)).
        temperature: sharpening temperature T.

    Returns:
        (B, C) sharpened guess (float32).
    """
    if len(probs_list) == 0:
        raise ValueError("co_guess needs at least one probability tensor")
    mean = torch.stack([_f32(p) for p in probs_list], dim=0).mean(dim=0)
    return sharpen(mean, temperature)


def mixup(
    inputs: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp with a given coefficient and permutation.

    ``mixed = lam * x + (1 - lam) * x[perm]`` for both inputs and targets (official DivideMix).

    Args:
        inputs: (N, ...) batch (e.g. (N, 3, H, W) images); its dtype is kept.
        targets: (N, C) soft targets.
        lam: mixing coefficient in [0, 1] (see :func:`sample_mix_lambda`).
        perm: (N,) int64 permutation of ``range(N)`` on the same device as the inputs.

    Returns:
        (mixed_inputs (N, ...), mixed_targets (N, C)).
    """
    lam = float(lam)
    mixed_inputs = lam * inputs + (1.0 - lam) * inputs[perm]
    mixed_targets = lam * targets + (1.0 - lam) * targets[perm]
    return mixed_inputs, mixed_targets


def sample_mix_lambda(alpha: float, rng: np.random.Generator | int) -> float:
    """Draw ``lam ~ Beta(alpha, alpha)`` and return ``max(lam, 1 - lam)`` (official DivideMix).

    Args:
        alpha: Beta parameter (> 0). DivideMix default 4.
        rng: a ``numpy.random.Generator`` (advanced by one Beta draw) or an int seed.

    Returns:
        A Python float in [0.5, 1].
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy with soft targets: ``-sum_c t_c log softmax(z)_c`` per row.

    Args:
        logits: (B, C) raw scores, any float dtype (log-softmax in float32).
        targets: (B, C) target distributions.
        reduction: "mean" (over rows; 0 for B = 0), "sum" or "none".

    Returns:
        float32 scalar, or (B,) for ``reduction="none"``.
    """
    log_p = F.log_softmax(_f32(logits), dim=-1)
    per_row = -(_f32(targets).to(log_p.dtype) * log_p).sum(dim=-1)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return _safe_mean(per_row)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def mse_consistency(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DivideMix unlabeled loss: mean over samples *and* classes of ``(softmax(z) - t)^2``.

    Args:
        logits: (B, C) raw scores.
        targets: (B, C) target distributions.

    Returns:
        float32 scalar; 0 for an empty batch.
    """
    if logits.numel() == 0:
        return _zero_like_graph(logits)
    p = _probs(logits)
    return ((p - _f32(targets).to(p.dtype)) ** 2).mean()


def linear_rampup(current: float, warmup: int, rampup_epochs: int = 16) -> float:
    """DivideMix ramp factor ``clip((current - warmup) / rampup_epochs, 0, 1)``.

    Official usage: ``lambda_u_eff = lambda_u * linear_rampup(epoch + batch_idx / num_iter,
    warm_up)``; this returns only the factor, the caller multiplies by lambda_u.

    Args:
        current: fractional epoch (epoch + batch_idx / num_iter).
        warmup: number of warm-up epochs.
        rampup_epochs: ramp length in epochs (official 16); <= 0 means a step at ``warmup``.
    """
    if rampup_epochs <= 0:
        return 1.0 if current >= warmup else 0.0
    return float(np.clip((current - warmup) / rampup_epochs, 0.0, 1.0))


def uniform_prior_penalty(logits: torch.Tensor) -> torch.Tensor:
    """DivideMix regulariser ``sum_c pi_c log(pi_c / mean_batch softmax(z)_c)``, pi = 1/C.

    This is KL(uniform || batch-mean prediction): 0 when the batch-mean prediction is uniform,
    positive otherwise.

    Args:
        logits: (B, C) raw scores.

    Returns:
        float32 scalar; 0 for an empty batch.
    """
    if logits.shape[0] == 0:
        return _zero_like_graph(logits)
    num_classes = logits.shape[-1]
    pred_mean = _probs(logits).mean(dim=0)
    prior = torch.full_like(pred_mean, 1.0 / num_classes)
    return (prior * (torch.log(prior) - torch.log(pred_mean.clamp_min(_LOG_EPS)))).sum()


def neg_entropy_penalty(logits: torch.Tensor) -> torch.Tensor:
    """DivideMix confidence penalty for asymmetric noise: ``mean_b sum_c p log p`` (= -entropy).

    Adding it to the loss pushes predictions away from over-confidence. ``0 log 0 = 0``.

    Args:
        logits: (B, C) raw scores.

    Returns:
        float32 scalar (<= 0); 0 for an empty batch.
    """
    if logits.shape[0] == 0:
        return _zero_like_graph(logits)
    return _xlogx(_probs(logits)).sum(dim=-1).mean()


def dividemix_loss(
    logits_mixed: torch.Tensor,
    targets_mixed: torch.Tensor,
    n_labeled: int,
    lambda_u_eff: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DivideMix training loss on one mixed batch.

    ``total = Lx + lambda_u_eff * Lu + penalty`` with
    ``Lx = soft_cross_entropy(logits[:n_labeled], targets[:n_labeled])``,
    ``Lu = mse_consistency(logits[n_labeled:], targets[n_labeled:])`` and
    ``penalty = uniform_prior_penalty(logits)`` over all rows.

    Args:
        logits_mixed: (N, C) logits of the mixed batch (officially N = 4B, n_labeled = 2B).
        targets_mixed: (N, C) mixed targets.
        n_labeled: number of leading rows that form the labeled part (0 <= n_labeled <= N).
            A missing part contributes 0.
        lambda_u_eff: the ramped unlabeled weight (lambda_u * :func:`linear_rampup`).

    Returns:
        (total, Lx, Lu, penalty), float32 scalars.
    """
    n = logits_mixed.shape[0]
    if not 0 <= n_labeled <= n:
        raise ValueError(f"n_labeled must be in [0, {n}], got {n_labeled}")
    lx = soft_cross_entropy(logits_mixed[:n_labeled], targets_mixed[:n_labeled])
    lu = mse_consistency(logits_mixed[n_labeled:], targets_mixed[n_labeled:])
    penalty = uniform_prior_penalty(logits_mixed)
    total = lx + float(lambda_u_eff) * lu + penalty
    return total, lx, lu, penalty


# ----------------------------------------------------------------------------------------------
# Jo-SRC
# ----------------------------------------------------------------------------------------------


def smooth_labels(labels: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """Jo-SRC label smoothing: target class ``1 - eps``, every other class ``eps / (C - 1)``.

    Args:
        labels: (B,) int64 class indices.
        num_classes: C.
        eps: smoothing in [0, 1] (Jo-SRC official 0.6).

    Returns:
        (B, C) float32 on the labels' device. With C = 1 every row is [1].
    """
    labels = labels.long()
    batch = labels.shape[0]
    if num_classes == 1:
        return torch.ones(batch, 1, device=labels.device)
    out = torch.full((batch, num_classes), eps / (num_classes - 1), device=labels.device)
    out.scatter_(1, labels.unsqueeze(1), 1.0 - eps)
    return out


def js_divergence_base2(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence with log base 2 (so it lies in [0, 1]).

    ``JS = 0.5 KL2(p || m) + 0.5 KL2(q || m)``, ``m = (p + q) / 2``. Zeros in p or q are safe
    (value and gradient). The result is clamped to [0, 1] against rounding.

    Args:
        p, q: (B, C) probability rows.

    Returns:
        (B,) float32.
    """
    p = _f32(p)
    q = _f32(q).to(p.dtype)
    m = (p + q) / 2
    log_m = torch.log(m.clamp_min(_TINY))
    kl_pm = (_xlogx(p) - p * log_m).sum(dim=-1)
    kl_qm = (_xlogx(q) - q * log_m).sum(dim=-1)
    return ((0.5 * kl_pm + 0.5 * kl_qm) / _LN2).clamp(0.0, 1.0)


def clean_likelihood(probs: torch.Tensor, smoothed_targets: torch.Tensor) -> torch.Tensor:
    """Jo-SRC clean likelihood ``1 - JS2(probs || smoothed_targets)`` per row.

    Args:
        probs: (B, C) predicted probabilities (official: softmax of the student on view 1; the
            hybrid uses softmax of the averaged logits of both nets).
        smoothed_targets: (B, C) from :func:`smooth_labels`.

    Returns:
        (B,) float32 in [0, 1].
    """
    return 1.0 - js_divergence_base2(probs, smoothed_targets)


def symmetric_kl(p1: torch.Tensor, p2: torch.Tensor, base2: bool = True) -> torch.Tensor:
    """Per-row ``KL(p1 || p2) + KL(p2 || p1)``.

    The official Jo-SRC code takes these logs in base 2 (``kl_div`` uses ``log2``), hence the
    default; ``base2=False`` gives nats. Zeros are safe: ``0 log 0 = 0`` and ``log q`` is floored
    at ``log(1e-12)``, so where the exact value is infinite a large finite value is returned.

    Args:
        p1, p2: (B, C) probability rows.
        base2: log base 2 (official) or natural log.

    Returns:
        (B,) float32, >= 0 up to rounding.
    """
    p1 = _f32(p1)
    p2 = _f32(p2).to(p1.dtype)
    kl12 = (_xlogx(p1) - _xlogy(p1, p2)).sum(dim=-1)
    kl21 = (_xlogx(p2) - _xlogy(p2, p1)).sum(dim=-1)
    out = kl12 + kl21
    return out / _LN2 if base2 else out


def soft_ood_score(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Soft version of "the two views disagree in argmax": ``1 - sum_c p1_c p2_c`` per row.

    It is the probability that labels drawn from the two view predictions differ: near 0 when both
    views agree confidently, ``1 - 1/C`` for two uniform predictions.

    Args:
        p1, p2: (B, C) probability rows.

    Returns:
        (B,) float32 in [0, 1].
    """
    return (1.0 - (_f32(p1) * _f32(p2)).sum(dim=-1)).clamp(0.0, 1.0)


def cap_confidence(probs: torch.Tensor, cap: float) -> torch.Tensor:
    """Rows whose largest probability exceeds ``cap`` are mixed with the uniform distribution so
    that it equals ``cap`` exactly (order and argmax are kept); other rows are unchanged.

    Args:
        probs: (B, C) probability rows.
        cap: the largest probability allowed; ``cap >= 1`` returns ``probs`` itself, and a cap
            must exceed 1/C to leave the argmax meaningful (ValueError otherwise).

    Returns:
        (B, C), like ``probs``.
    """
    if cap >= 1.0:
        return probs
    uniform = 1.0 / probs.shape[-1]
    if cap <= uniform:
        raise ValueError(f"a confidence cap must exceed 1/C = {uniform:.4g}, got {cap}")
    top = probs.amax(dim=-1, keepdim=True)
    a = ((cap - uniform) / (top - uniform).clamp_min(1e-12)).clamp(max=1.0)
    return a * probs + (1.0 - a) * uniform


def josrc_split(
    probs1: torch.Tensor,
    probs2: torch.Tensor,
    p_clean: torch.Tensor,
    threshold: float | torch.Tensor,
    ood_score: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jo-SRC sample division of one batch into clean / ID-noisy / OOD.

    clean: ``p_clean >= threshold``; the rest is OOD where the two views' argmax predictions
    disagree, ID-noisy where they agree (official order of tests).

    Args:
        probs1, probs2: (B, C) student probabilities (or logits: only the argmax is used) on the
            two views.
        p_clean: (B,) clean likelihood (:func:`clean_likelihood`).
        threshold: tau_clean for this epoch, a float or a (B,) tensor (per-class thresholds
            looked up by each sample's label).
        ood_score: optional (B,) soft disagreement (:func:`soft_ood_score`); when given, the views
            disagree where it exceeds 0.5, instead of the argmax test.

    Returns:
        (clean_mask, id_mask, ood_mask), each (B,) bool, disjoint, covering the batch.
    """
    clean = p_clean >= threshold
    if ood_score is None:
        disagree = probs1.argmax(dim=-1) != probs2.argmax(dim=-1)
    else:
        disagree = ood_score > 0.5
    ood = disagree & ~clean
    id_noisy = ~disagree & ~clean
    return clean, id_noisy, ood


def josrc_targets(
    clean_mask: torch.Tensor,
    ood: torch.Tensor,
    smoothed: torch.Tensor,
    teacher_probs: torch.Tensor,
    ood_temperature: float = 10.0,
) -> torch.Tensor:
    """Jo-SRC training targets.

    * clean: the smoothed label ``smoothed``;
    * ID-noisy (not clean, not OOD): the teacher soft label ``s = teacher_probs``;
    * OOD (not clean, OOD): ``softmax(s / ood_temperature)``; the official code applies softmax
      to the *probability vector* divided by T = 10, which is almost uniform.

    A soft OOD weight ``o`` in [0, 1] instead of the mask gives ``(1 - o)·s + o·softmax(s / T)``
    (a 0/1 weight is exactly the mask). A sample flagged both clean and OOD counts as clean (the
    official OOD set is ``disagree & unclean``).

    Args:
        clean_mask: (B,) bool.
        ood: (B,) bool OOD mask, or a float OOD weight in [0, 1].
        smoothed: (B, C) smoothed labels.
        teacher_probs: (B, C) mean teacher probability over the two views.
        ood_temperature: T for the OOD targets (official 10).

    Returns:
        (B, C) float32 targets (no gradient to the teacher).
    """
    smoothed = _f32(smoothed)
    s = _f32(teacher_probs).detach().to(smoothed.dtype)
    w = ood.to(s.dtype).unsqueeze(1)
    noisy = (1 - w) * s + w * torch.softmax(s / ood_temperature, dim=-1)
    return torch.where(clean_mask.bool().unsqueeze(1), smoothed, noisy)


def josrc_loss(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    targets: torch.Tensor,
    ood: torch.Tensor,
    alpha: float = 0.5,
    base2: bool = True,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jo-SRC loss after warm-up.

    ``Lc = mean_b w_b [CE(logits1_b, t_b) + CE(logits2_b, t_b)]`` over the whole batch
    (``w = 1`` officially), ``Lo = mean_b (1 - 2 o_b) * symKL(p1_b, p2_b)``: sign -1 for OOD
    samples (``o = 1``) and +1 otherwise, ``total = (1 - alpha) * Lc + alpha * Lo``.

    Args:
        logits1, logits2: (B, C) student logits on the two views.
        targets: (B, C) from :func:`josrc_targets`.
        ood: (B,) bool, the OOD samples (official: unclean and views disagree), or a soft OOD
            weight in [0, 1].
        alpha: weight of the consistency term (official 0.5).
        base2: logs in base 2 inside the symmetric KL (official: yes).
        sample_weight: optional (B,) weights of the CE terms.

    Returns:
        (total, Lc, Lo) float32 scalars; all 0 for an empty batch.
    """
    ce = soft_cross_entropy(logits1, targets, reduction="none") + soft_cross_entropy(
        logits2, targets, reduction="none"
    )
    loss_c = _safe_mean(ce if sample_weight is None else sample_weight * ce)
    sym = symmetric_kl(_probs(logits1), _probs(logits2), base2=base2)
    sign = 1.0 - 2.0 * ood.to(device=sym.device, dtype=sym.dtype)
    loss_o = _safe_mean(sign * sym)
    total = (1.0 - alpha) * loss_c + alpha * loss_o
    return total, loss_c, loss_o


def josrc_warmup_loss(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    smoothed: torch.Tensor,
    clean_mask: torch.Tensor,
) -> torch.Tensor:
    """Jo-SRC warm-up loss: mean over the selected (clean) samples of CE1 + CE2 on ``smoothed``.

    Args:
        logits1, logits2: (B, C) student logits on the two views.
        smoothed: (B, C) smoothed labels.
        clean_mask: (B,) bool, ``p_clean >= tau``.

    Returns:
        float32 scalar; 0 (attached to the graph) when nothing is selected. The official code
        returns NaN in that case.
    """
    ce = soft_cross_entropy(logits1, smoothed, reduction="none") + soft_cross_entropy(
        logits2, smoothed, reduction="none"
    )
    mask = clean_mask.to(device=ce.device, dtype=torch.bool)
    if not bool(mask.any()):
        return _zero_like_graph(ce)
    return ce[mask].mean()


def tau_clean_josrc(
    epoch: int,
    warmup: int,
    total_epochs: int,
    tau: float = 0.75,
    tau_max: float = 0.95,
) -> float:
    """Jo-SRC clean-likelihood threshold for an epoch (0-based), as the official code computes it.

    During warm-up (``epoch < warmup``): ``min(tau * epoch / warmup, tau)``. Afterwards
    ``tau + (tau_max - tau) * (epoch - warmup) / (total_epochs - warmup)`` (official denominator:
    the last epoch stops one step short of ``tau_max``). No epochs after warm-up gives ``tau``; the
    result never exceeds ``tau_max``.
    """
    if epoch < warmup:
        return min(tau * epoch / warmup, tau)
    span = total_epochs - warmup
    if span <= 0:
        return float(tau)
    return float(min(tau + (tau_max - tau) * (epoch - warmup) / span, tau_max))


def tau_clean_report(epoch: float, warmup: int, tau_max: float) -> float:
    """The hybrid report's threshold ``min(epoch / warmup * tau_max, tau_max)``.

    ``warmup <= 0`` gives ``tau_max`` for every epoch.
    """
    if warmup <= 0:
        return float(tau_max)
    return float(min(epoch / warmup * tau_max, tau_max))


@torch.no_grad()
def ema_update_(
    teacher_params: Iterable[torch.Tensor],
    student_params: Iterable[torch.Tensor],
    decay: float,
) -> None:
    """In-place mean-teacher update ``p_t = decay * p_t + (1 - decay) * p_s``.

    Pass ``teacher.parameters()`` and ``student.parameters()`` (parameters only, not buffers:
    the official Jo-SRC EMA does not average BN statistics). Runs under ``no_grad`` with
    ``torch._foreach_mul_`` / ``torch._foreach_add_``.

    Args:
        teacher_params: iterable of teacher tensors, updated in place.
        student_params: iterable of student tensors, same order and shapes.
        decay: EMA decay in [0, 1] (official 0.99).
    """
    teacher = [t for t in teacher_params]
    student = [s for s in student_params]
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors, student has {len(student)}")
    pairs = [(t, s) for t, s in zip(teacher, student) if t.is_floating_point()]
    if not pairs:
        return
    t_list = [t for t, _ in pairs]
    s_list = [s.detach().to(dtype=t.dtype, device=t.device) for t, s in pairs]
    torch._foreach_mul_(t_list, float(decay))
    torch._foreach_add_(t_list, s_list, alpha=1.0 - float(decay))


# ----------------------------------------------------------------------------------------------
# contrastive (SimCLR / UNICON)
# ----------------------------------------------------------------------------------------------


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    anchors: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2M views ``[z1; z2]`` (SupContrast's ``SupConLoss`` with no labels).

    For view ``a`` of sample ``i`` the positive is the other view of ``i``; the other 2M - 2 views
    are the negatives; the anchor itself is left out of the denominator::

        loss_a = -log( exp(z_a . z_pos / T) / sum_{b != a} exp(z_a . z_b / T) )

    and the result is the mean of ``loss_a`` over the anchors, both views of each anchor sample.

    Args:
        z1, z2: M x d projections of the two views (row i of each from the same image), normally
            L2-normalised; any float dtype, computed in float32.
        temperature: T > 0 (SupContrast SimCLR 0.5, UNICON 0.05).
        anchors: ``(start, stop)``: only samples ``start..stop-1`` are anchors (both their views);
            every one of the 2M views is still a negative. Under torchrun pass the all-gathered
            projections and this rank's rows (``cdmix.distributed.all_gather_with_grad``): the
            mean over ranks of the per-rank losses is then the single-process loss of the whole
            global batch. Default: all M samples.

    SupContrast multiplies this by ``temperature / base_temperature`` (0.07 unless set); that
    factor is the caller's. Returns a float32 scalar; an empty anchor set gives 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be M x d, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    m = z1.shape[0]
    start, stop = (0, m) if anchors is None else anchors
    if not 0 <= start <= stop <= m:
        raise ValueError(f"anchors {anchors} outside 0..{m}")
    if stop == start:
        return _zero_like_graph(z1.float())
    z = torch.cat([_f32(z1), _f32(z2)])  # 2M x d: view 1 of every sample, then view 2
    rows = torch.arange(start, stop, device=z.device)
    anchor_idx = torch.cat([rows, rows + m])
    positive_idx = torch.cat([rows + m, rows])
    logits = z[anchor_idx] @ z.T / temperature  # 2n x 2M
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(len(anchor_idx), device=z.device), anchor_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    positive = logits.gather(1, positive_idx.view(-1, 1)).squeeze(1)
    return (torch.logsumexp(logits, dim=1) - positive).mean()
