"""Clean-sample selection: loss normalisation, the DivideMix GMM, selection thresholds and metrics.

Pure functions on numpy arrays (torch tensors are accepted and converted). ``N`` is the number of
training samples. All outputs are float64 / int64 / bool numpy arrays and never contain NaN,
except the documented ``auc = nan`` of :func:`selection_metrics` when it is undefined.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "minmax_normalise",
    "fit_gmm_clean_prob",
    "gmm_posterior_from_params",
    "running_mean_update",
    "loss_history_average",
    "selection_metrics",
    "ood_metrics",
    "per_class_threshold_mask",
    "blend_clean_prob",
    "gmm_separation",
    "warmup_decision",
    "knn_predict",
    "knn_accuracy",
    "knn_label_disagreement",
]


def _to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """A numpy copy-or-view of an array-like or torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if dtype is not None and getattr(x, "is_floating_point", lambda: False)():
            x = x.double()  # bf16 has no numpy equivalent
        x = x.numpy()
    return np.asarray(x, dtype=dtype) if dtype is not None else np.asarray(x)


def minmax_normalise(losses: Any) -> np.ndarray:
    """Min-max normalise per-sample losses to [0, 1] (DivideMix co-divide step).

    Args:
        losses: (N,) losses, numpy array or torch tensor (any float dtype).

    Returns:
        (N,) float64 ``(l - min) / (max - min)``; all zeros when the losses are constant or
        N = 0.

    Raises:
        ValueError: if a loss is NaN or infinite (a sign of a diverged network).
    """
    arr = _to_numpy(losses).reshape(-1)
    if arr.size == 0:
        return arr.copy()
    if not np.all(np.isfinite(arr)):
        raise ValueError("losses contain NaN or inf; cannot normalise")
    lo, hi = float(arr.min()), float(arr.max())
    span = hi - lo
    if span <= 0.0:
        return np.zeros_like(arr)
    return (arr - lo) / span


def _degenerate_params(x: np.ndarray) -> dict[str, Any]:
    mean = float(x.mean()) if x.size else 0.0
    var = float(x.var()) if x.size else 0.0
    return {
        "means": [mean, mean],
        "variances": [var, var],
        "weights": [1.0, 0.0],
        "clean_component": 0,
        "degenerate": True,
        "converged": False,
        "n_iter": 0,
    }


def fit_gmm_clean_prob(
    norm_losses: Any,
    seed: int = 0,
    reg_covar: float = 5e-4,
    max_iter: int = 10,
    tol: float = 1e-2,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit DivideMix's 1-D two-component GMM and return each sample's clean probability.

    Uses ``sklearn.mixture.GaussianMixture(n_components=2, max_iter, tol, reg_covar,
    random_state=seed)`` (official settings: 10, 1e-2, 5e-4). The clean probability is the
    posterior of the component with the smaller mean. sklearn's ConvergenceWarning (expected with
    max_iter=10) is silenced; ``params["converged"]`` records it.

    Args:
        norm_losses: (N,) normalised losses (:func:`minmax_normalise`), float64 preferred.
        seed: random_state of the k-means initialisation.

    Returns:
        (clean_prob (N,) float64 in [0, 1], params) with params = {"means": [m0, m1],
        "variances": [v0, v1], "weights": [w0, w1], "clean_component": int, "degenerate": bool,
        "converged": bool, "n_iter": int}, lists as Python floats in sklearn's component order.
        Degenerate input (N < 2, or fewer than two distinct values) gives all-ones clean_prob
        and ``degenerate=True``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    x = _to_numpy(norm_losses).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError("norm_losses contain NaN or inf")
    if x.size < 2 or np.unique(x).size < 2:
        return np.ones(x.size, dtype=np.float64), _degenerate_params(x)
    gmm = GaussianMixture(
        n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x.reshape(-1, 1))
    proba = gmm.predict_proba(x.reshape(-1, 1))
    means = gmm.means_.reshape(-1)
    clean_component = int(np.argmin(means))
    clean_prob = np.clip(proba[:, clean_component].astype(np.float64), 0.0, 1.0)
    params = {
        "means": [float(v) for v in means],
        "variances": [float(v) for v in gmm.covariances_.reshape(-1)],
        "weights": [float(v) for v in gmm.weights_.reshape(-1)],
        "clean_component": clean_component,
        "degenerate": False,
        "converged": bool(gmm.converged_),
        "n_iter": int(gmm.n_iter_),
    }
    return clean_prob, params


def gmm_posterior_from_params(norm_losses: Any, params: dict[str, Any]) -> np.ndarray:
    """Clean-component posterior of a 1-D two-Gaussian mixture with given parameters.

    ``post_k(x) = w_k N(x; mu_k, var_k) / sum_j w_j N(x; mu_j, var_j)``, computed in log space
    (log-sum-exp) so it never overflows. The clean component is ``params["clean_component"]`` if
    present, else the one with the smaller mean. Zero-weight components get probability 0.

    Args:
        norm_losses: (N,) values.
        params: dict with "means", "variances", "weights" (two entries each), e.g. from
            :func:`fit_gmm_clean_prob` or :func:`running_mean_update`.

    Returns:
        (N,) float64 in [0, 1]; all ones for ``params["degenerate"]``.
    """
    x = _to_numpy(norm_losses).reshape(-1)
    if params.get("degenerate", False):
        return np.ones(x.size, dtype=np.float64)
    means = np.asarray(params["means"], dtype=np.float64).reshape(-1)
    variances = np.asarray(params["variances"], dtype=np.float64).reshape(-1)
    weights = np.asarray(params["weights"], dtype=np.float64).reshape(-1)
    if not (means.size == variances.size == weights.size == 2):
        raise ValueError("params must hold two means, variances and weights")
    if np.any(variances <= 0):
        raise ValueError("variances must be > 0")
    clean = int(params.get("clean_component", int(np.argmin(means))))
    with np.errstate(divide="ignore"):
        log_w = np.log(weights)
    log_pdf = -0.5 * (np.log(2 * math.pi * variances)[None, :]
                      + (x[:, None] - means[None, :]) ** 2 / variances[None, :])
    log_joint = log_pdf + log_w[None, :]
    top = log_joint.max(axis=1, keepdims=True)
    log_norm = top + np.log(np.exp(log_joint - top).sum(axis=1, keepdims=True))
    post = np.exp(log_joint[:, clean] - log_norm[:, 0])
    return np.clip(post, 0.0, 1.0)


def _ordered(params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """means, variances, weights reordered so that index 0 is the clean (smaller-mean) one."""
    means = np.asarray(params["means"], dtype=np.float64).reshape(-1)
    variances = np.asarray(params["variances"], dtype=np.float64).reshape(-1)
    weights = np.asarray(params["weights"], dtype=np.float64).reshape(-1)
    clean = int(params.get("clean_component", int(np.argmin(means))))
    order = [clean, 1 - clean]
    return means[order], variances[order], weights[order]


def running_mean_update(
    prev_params: dict[str, Any] | None, new_params: dict[str, Any], momentum: float
) -> dict[str, Any]:
    """Smooth GMM statistics across epochs (stabiliser "running-mean GMM statistics").

    Components are aligned clean-with-clean (smaller mean first) and blended as
    ``momentum * prev + (1 - momentum) * new`` for means, variances and weights (weights are
    renormalised). Use :func:`gmm_posterior_from_params` on the result to get clean
    probabilities.

    Args:
        prev_params: last epoch's smoothed params, or None on the first call.
        new_params: this epoch's fit (:func:`fit_gmm_clean_prob`).
        momentum: weight of the previous statistics in [0, 1]; 0 returns the new fit.

    Returns:
        A params dict in the same format with ``clean_component = 0``. A degenerate new fit
        keeps the previous params; no usable previous params gives the new fit reordered.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if new_params.get("degenerate", False):
        if prev_params is None:
            return dict(new_params)
        return dict(prev_params)
    m_new, v_new, w_new = _ordered(new_params)
    if prev_params is None or prev_params.get("degenerate", False):
        means, variances, weights = m_new, v_new, w_new
    else:
        m_old, v_old, w_old = _ordered(prev_params)
        means = momentum * m_old + (1 - momentum) * m_new
        variances = momentum * v_old + (1 - momentum) * v_new
        weights = momentum * w_old + (1 - momentum) * w_new
    weights = weights / weights.sum()
    return {
        "means": [float(v) for v in means],
        "variances": [float(v) for v in variances],
        "weights": [float(v) for v in weights],
        "clean_component": 0,
        "degenerate": False,
        "converged": bool(new_params.get("converged", True)),
        "n_iter": int(new_params.get("n_iter", 0)),
    }


def loss_history_average(history: Sequence[Any] | np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` rows of a per-epoch loss history.

    Official DivideMix averages the normalised losses of the last 5 epochs for 90% noise.

    Args:
        history: (E, N) array or a list of E arrays of shape (N,), oldest first. A single (N,)
            array counts as one row.
        window: number of most recent rows to average (>= 1); fewer rows are all averaged.

    Returns:
        (N,) float64.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if isinstance(history, (list, tuple)):
        if len(history) == 0:
            raise ValueError("empty loss history")
        rows = np.stack([_to_numpy(h).reshape(-1) for h in history[-window:]], axis=0)
    else:
        arr = _to_numpy(history)
        rows = arr.reshape(1, -1) if arr.ndim == 1 else arr[-window:]
        if rows.shape[0] == 0:
            raise ValueError("empty loss history")
    return rows.mean(axis=0)


def selection_metrics(selected_mask: Any, clean_prob: Any, is_clean_true: Any) -> dict[str, float]:
    """Quality of a clean selection against the true clean/noisy split.

    Args:
        selected_mask: (N,) bool, the samples treated as clean.
        clean_prob: (N,) clean score used for the ROC curve (GMM posterior or P_clean).
        is_clean_true: (N,) bool, noisy label == true label.

    Returns:
        {"precision", "recall", "auc", "n_selected"}:
        precision = truly clean among selected / selected (0.0 for an empty selection);
        recall = truly clean selected / truly clean (0.0 when no sample is truly clean);
        auc = ROC-AUC of clean_prob for "truly clean" (sklearn ``roc_auc_score``), **float("nan")
        when the truth holds only one class** (AUC undefined) - the only possible NaN.
    """
    from sklearn.metrics import roc_auc_score

    selected = _to_numpy(selected_mask, dtype=bool).reshape(-1)
    truth = _to_numpy(is_clean_true, dtype=bool).reshape(-1)
    score = _to_numpy(clean_prob).reshape(-1)
    if not (selected.size == truth.size == score.size):
        raise ValueError("selected_mask, clean_prob and is_clean_true must have the same length")
    n_sel = int(selected.sum())
    n_clean = int(truth.sum())
    tp = int((selected & truth).sum())
    precision = tp / n_sel if n_sel > 0 else 0.0
    recall = tp / n_clean if n_clean > 0 else 0.0
    if 0 < n_clean < truth.size:
        auc = float(roc_auc_score(truth, score))
    else:
        auc = float("nan")
    return {
        "precision": float(precision),
        "recall": float(recall),
        "auc": auc,
        "n_selected": float(n_sel),
    }


def ood_metrics(flagged: Any, is_ood: Any) -> dict[str, float]:
    """Precision / recall of an OOD flag (N,) bool against the known open-set mask (N,) bool:
    ``{"ood_precision", "ood_recall"}``, each 0.0 where undefined."""
    flagged = _to_numpy(flagged, dtype=bool).reshape(-1)
    is_ood = _to_numpy(is_ood, dtype=bool).reshape(-1)
    tp = int((flagged & is_ood).sum())
    return {"ood_precision": tp / int(flagged.sum()) if flagged.any() else 0.0,
            "ood_recall": tp / int(is_ood.sum()) if is_ood.any() else 0.0}


def per_class_thresholds(clean_score: Any, labels: Any, num_classes: int, base_threshold: float,
                         quantile: float = 0.5) -> np.ndarray:
    """The thresholds ``t_c = min(base_threshold, Q_c)`` of :func:`per_class_threshold_mask`: (C,)
    float64; a class with no samples keeps ``base_threshold``."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    score = _to_numpy(clean_score).reshape(-1)
    lab = _to_numpy(labels, dtype=np.int64).reshape(-1)
    if score.size != lab.size:
        raise ValueError("clean_score and labels must have the same length")
    thresholds = np.full(num_classes, float(base_threshold))
    for c in range(num_classes):
        s_c = score[lab == c]
        if s_c.size:
            thresholds[c] = min(float(base_threshold), float(np.quantile(s_c, quantile, method="lower")))
    return thresholds


def per_class_threshold_mask(
    clean_score: Any,
    labels: Any,
    num_classes: int,
    base_threshold: float,
    quantile: float = 0.5,
) -> np.ndarray:
    """Per-class selection that cannot starve a hard class (stabiliser "per-class thresholds").

    Rule: for each class c (by noisy label), ``t_c = min(base_threshold, Q_c)`` where ``Q_c`` is
    the ``quantile`` of the scores of the samples labelled c (numpy's "lower" method, so it is
    one of those scores). A sample is selected iff ``score >= t_c``. Hence a class whose scores
    all fall below ``base_threshold`` still keeps at least a ``1 - quantile`` fraction of its
    samples (its best-scored ones; at least half with the default 0.5), while classes above the
    bar are filtered by ``base_threshold`` exactly as a global rule would (up to ``>=`` vs
    ``>``).

    Args:
        clean_score: (N,) clean probability / likelihood, higher = cleaner.
        labels: (N,) int noisy labels in [0, num_classes).
        num_classes: C.
        base_threshold: the global threshold (e.g. p_threshold or tau_clean).
        quantile: the per-class quantile in [0, 1] used as the floor.

    Returns:
        (N,) bool mask.
    """
    score = _to_numpy(clean_score).reshape(-1)
    lab = _to_numpy(labels, dtype=np.int64).reshape(-1)
    thresholds = per_class_thresholds(score, lab, num_classes, base_threshold, quantile)
    valid = (lab >= 0) & (lab < num_classes)
    per_sample = np.where(valid, thresholds[np.clip(lab, 0, num_classes - 1)], np.inf)
    return score >= per_sample


def blend_clean_prob(gmm_prob: Any, js_likelihood: Any, weight: float) -> np.ndarray:
    """Blend the GMM-loss and JS clean scores: ``(1 - weight) * gmm + weight * js``.

    Args:
        gmm_prob: (N,) GMM clean posterior.
        js_likelihood: (N,) Jo-SRC clean likelihood ``1 - JS``.
        weight: in [0, 1]; 0 = pure GMM, 1 = pure JS.

    Returns:
        (N,) float64 in [0, 1] when both inputs are.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    g = _to_numpy(gmm_prob).reshape(-1)
    j = _to_numpy(js_likelihood).reshape(-1)
    if g.size != j.size:
        raise ValueError("gmm_prob and js_likelihood must have the same length")
    return (1.0 - weight) * g + weight * j


# --------------------------------------------------------------------------- automatic warm-up length
SEPARATION_MIN_WEIGHT = 0.05  # a "component" holding fewer samples is a few outliers, not a split
SEPARATION_THRESHOLD = 3.0  # Ashman's D: modes this far apart (in pooled std units) are well separated
SEPARATION_PATIENCE = 2  # epochs without a better (smoothed) separation before warm-up ends
SEPARATION_WINDOW = 3  # epochs in the trailing mean that smooths the per-epoch separation


def gmm_separation(params: dict[str, Any]) -> float:
    """How far apart the two components of a fitted loss GMM are: Ashman's D,
    ``|m_noisy - m_clean| / sqrt((v_clean + v_noisy) / 2)`` (scale-free; D > 2 means two clearly
    distinct modes).

    Args:
        params: from :func:`fit_gmm_clean_prob`.

    Returns:
        D >= 0; 0.0 for a degenerate fit or one whose smaller component holds under 5% of the weight.
    """
    if params.get("degenerate", False):
        return 0.0
    means = np.asarray(params["means"], dtype=np.float64)
    variances = np.asarray(params["variances"], dtype=np.float64)
    if float(np.min(params["weights"])) < SEPARATION_MIN_WEIGHT:
        return 0.0
    pooled = math.sqrt(max(float(variances.mean()), 1e-12))
    return float(abs(means[1] - means[0]) / pooled)


def warmup_decision(separations: Sequence[float], steps_per_epoch: int, min_steps: int, max_steps: int,
                    max_epochs: int, threshold: float = SEPARATION_THRESHOLD,
                    patience: int = SEPARATION_PATIENCE, window: int = SEPARATION_WINDOW) -> str | None:
    """Whether an automatic warm-up ends after the epochs measured so far, and why.

    Args:
        separations: the separation (:func:`gmm_separation`) measured after each warm-up epoch so
            far, oldest first (its length is the number of warm-up epochs done).
        steps_per_epoch: optimiser steps per net in one warm-up epoch.
        min_steps / max_steps: floor and ceiling of the warm-up in optimiser steps per net.
        max_epochs: never warm up for more epochs than this (leaves epochs for the method).
        threshold: end as soon as the smoothed separation reaches this.
        patience: end when the smoothed separation has not beaten its best (since the floor) for
            this many epochs.
        window: the smoothed separation is the mean of the last ``window`` measurements.

    Returns:
        None to keep warming up, else the reason it ends: "epoch cap", "step ceiling",
        "separated" or "separation stopped improving".
    """
    epochs = len(separations)
    steps = epochs * steps_per_epoch
    if epochs >= max_epochs:
        return "epoch cap"
    if steps >= max_steps:
        return "step ceiling"
    if steps < min_steps or epochs == 0:
        return None
    values = np.asarray(separations, dtype=np.float64)
    smoothed = np.array([values[max(0, i + 1 - window):i + 1].mean() for i in range(epochs)])
    if smoothed[-1] >= threshold:
        return "separated"
    first = max(0, -(-min_steps // max(steps_per_epoch, 1)) - 1)  # the epoch that reached the floor
    best = first + int(np.argmax(smoothed[first:]))
    if epochs - 1 - best >= patience:
        return "separation stopped improving"
    return None


# ----------------------------------------------------------------------------------------------
# kNN in a feature space (torch, on the features' device)
# ----------------------------------------------------------------------------------------------

KNN_MONITOR_K = 200  # InstDisc's weighted kNN monitor (also SupContrast-era SimCLR monitors)
KNN_MONITOR_TEMPERATURE = 0.1
KNN_DISAGREEMENT_K = 10  # SimiFeat's default neighbourhood


def _unit_rows(features):
    import torch

    return torch.nn.functional.normalize(features.float(), dim=1)


def knn_predict(query, bank, bank_labels, num_classes: int, k: int = KNN_MONITOR_K,
                temperature: float = KNN_MONITOR_TEMPERATURE, batch_size: int = 1024):
    """Weighted kNN class of each query (InstDisc's monitor): among the ``k`` bank rows of highest
    cosine similarity ``s``, each votes for its label with weight ``exp(s / temperature)``; the
    class of the largest total wins (ties: the lowest class index).

    Args:
        query: Q x d features, bank: N x d features (any scale: rows are L2-normalised here), on
            one device; bank_labels: int (N,) labels of the bank rows.
        num_classes: C; k: neighbours (capped at N); batch_size: query rows per Q_b x N
            similarity block, so memory is batch_size x N floats.

    Returns:
        (predictions int64 (Q,), votes float32 Q x C), torch tensors on the features' device.
    """
    import torch

    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    bank = _unit_rows(bank)
    bank_labels = torch.as_tensor(bank_labels, device=bank.device).long()
    if len(bank) != len(bank_labels):
        raise ValueError(f"{len(bank)} bank rows but {len(bank_labels)} labels")
    k = min(k, len(bank))
    query = _unit_rows(query)
    votes = []
    for start in range(0, len(query), batch_size):
        sim = query[start:start + batch_size] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        block = torch.zeros((len(sim), num_classes), device=bank.device)
        votes.append(block.scatter_add_(1, bank_labels[top_idx], weights))
    votes = torch.cat(votes) if votes else torch.zeros((0, num_classes), device=bank.device)
    return votes.argmax(dim=1), votes


def knn_accuracy(query, query_labels, bank, bank_labels, num_classes: int, k: int = KNN_MONITOR_K,
                 temperature: float = KNN_MONITOR_TEMPERATURE, batch_size: int = 1024) -> float:
    """Accuracy in percent of :func:`knn_predict` on ``query`` against ``query_labels`` (the kNN
    monitor of self-supervised training: test features queried against the training features
    and their given labels). NaN for an empty query set."""
    import torch

    if len(query) == 0:
        return float("nan")
    predictions, _ = knn_predict(query, bank, bank_labels, num_classes, k, temperature, batch_size)
    truth = torch.as_tensor(query_labels, device=predictions.device).long()
    return float((predictions == truth).float().mean()) * 100.0


def knn_label_disagreement(features, labels, k: int = KNN_DISAGREEMENT_K,
                           temperature: float = KNN_MONITOR_TEMPERATURE, batch_size: int = 1024) -> np.ndarray:
    """Share of each sample's ``k`` nearest neighbours (cosine, the sample itself excluded) whose
    given label differs from its own (SimiFeat / Docta's kNN signal), each neighbour weighted by
    ``exp(cosine / temperature)`` as in the kNN monitor: 0 = every neighbour agrees, 1 = none does;
    higher = more likely mislabeled. No classifier is trained. The weights break the ties of the plain
    share (which takes only k + 1 values): of two samples with 3 of 10 disagreeing neighbours, the
    one whose disagreeing neighbours are the closer ranks first.

    Args:
        features: N x d features (rows L2-normalised here); labels: int (N,) given labels.
        k: neighbours per sample (capped at N - 1); temperature: > 0 (large: the plain share);
        batch_size: query rows per similarity block against all N rows (memory batch_size x N floats).

    Returns:
        float64 numpy (N,) in [0, 1] (all 0 when N < 2). Deterministic for the same inputs on the
        same device (``topk`` of a fixed matrix; ties among equal similarities go to one of them).
    """
    return knn_label_scores(features, labels, k=k, temperature=temperature, batch_size=batch_size)[0]


def knn_label_scores(features, labels, num_classes: int | None = None, k: int = KNN_DISAGREEMENT_K,
                     temperature: float = KNN_MONITOR_TEMPERATURE,
                     batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_label_disagreement` and, from the same neighbours and weights, each sample's kNN
    class: the label of the largest total weight among its ``k`` nearest neighbours (itself
    excluded; ties: the lowest class).

    Returns (disagreement float64 (N,) in [0, 1], predicted int64 (N,)), numpy; with N < 2 no sample
    has a neighbour: disagreement 0 and the sample's own label. ``num_classes``: default max label + 1.
    """
    import torch

    features = _unit_rows(features)
    labels = torch.as_tensor(labels, device=features.device).long()
    n = len(features)
    if len(labels) != n:
        raise ValueError(f"{n} feature rows but {len(labels)} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, n - 1)
    if k < 1:
        return np.zeros(n, dtype=np.float64), labels.cpu().numpy().astype(np.int64)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    scores, predicted = [], []
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n), device=features.device)
        sim = features[rows] @ features.T
        sim[torch.arange(len(rows), device=sim.device), rows] = float("-inf")  # not its own neighbour
        top_sim, top_idx = sim.topk(k, dim=1)
        neighbour_labels = labels[top_idx]
        # exp((s - s_max) / T): the monitor's weights up to a factor per row (no overflow or 0/0 at small T)
        weights = ((top_sim.double() - top_sim[:, :1].double()) / temperature).exp()
        disagree = (neighbour_labels != labels[rows, None]).double()
        scores.append((weights * disagree).sum(dim=1) / weights.sum(dim=1))
        votes = torch.zeros((len(rows), num_classes), dtype=torch.float64, device=features.device)
        predicted.append(votes.scatter_add_(1, neighbour_labels, weights).argmax(dim=1))
    return torch.cat(scores).cpu().numpy(), torch.cat(predicted).cpu().numpy().astype(np.int64)
