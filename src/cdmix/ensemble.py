"""The ensemble of a method's nets, written once: what the engine's accuracy, ``predict`` and the
label issues use.

One rule: **the ensemble's probabilities are the mean of the nets' softmax**, and its class is the
argmax of ``ensemble_logits`` (the nets' summed logits).

Why two outputs of one rule rather than one number: the probabilities are what a user reads
(``pred_probs.npy``, ``cdmix predict``, ``model(images)``) and what cleanlab expects, so they must be
probabilities, and the mean softmax is the one that stays calibrated per net. The class for the
accuracy in ``metrics.csv`` is the official DivideMix test rule (``outputs1 + outputs2``, argmax), so
that our test accuracies compare with the published ones, and so that the figures of every earlier
run stay reproducible bit for bit. With one net both are the same class; with two they differ only on
near ties between nets of different confidence.

Both take one N x C array of logits per net (torch tensors, or numpy arrays for the host-side
scoring of ``cdmix.issues``, which works in float64).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def ensemble_logits(logits_per_net: Sequence):
    """The ensemble's logits for its class decision: the sum over the nets (N x C tensor)."""
    import torch

    return torch.stack(list(logits_per_net)).sum(0)


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of N x C logits, float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ensemble_probs(logits_per_net: Sequence, per_net: Sequence | None = None):
    """The ensemble's class probabilities: the mean over the nets of their softmax (N x C).

    Tensors in: float32 tensor out (softmax in float32). numpy arrays in: float64 array out.
    ``per_net``: the nets' softmax already computed (numpy only), to avoid computing it twice.
    """
    if isinstance(logits_per_net[0], np.ndarray) or per_net is not None:
        probs = per_net if per_net is not None else [softmax_np(z) for z in logits_per_net]
        return np.mean(probs, axis=0)
    import torch

    return torch.stack([torch.softmax(z.float(), dim=1) for z in logits_per_net]).mean(0)


def accuracy(logits, labels) -> float:
    """Percent of rows whose argmax is the label (N x C tensor, (N,) int64); NaN for no rows."""
    return 100.0 * float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def top_k_accuracy(logits, labels, k: int = 5) -> float:
    """Percent of rows whose label is among the ``k`` largest logits (N x C logits, C >= k)."""
    if not len(labels):
        return float("nan")
    top = logits.topk(k, dim=1).indices
    return 100.0 * float((top == labels[:, None]).any(1).float().mean())
