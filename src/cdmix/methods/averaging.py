"""Averaged copies of a net: the mean teacher (EMA of the parameters) and stochastic weight averaging.

The EMA update itself is :func:`cdmix.losses.ema_update_`; Jo-SRC and the hybrid both use these.
"""

from __future__ import annotations

import copy

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from cdmix.methods.base import autocast


def make_teacher(net: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``net`` to be used as its mean teacher."""
    teacher = copy.deepcopy(net)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_decay(config, epoch: int) -> float:
    """The mean teacher's EMA decay in ``epoch``: ``config.ema_decay``, or ``stab_slow_ema`` (when
    set) after warm-up."""
    if config.stab_slow_ema > 0 and epoch >= config.warmup:
        return config.stab_slow_ema
    return config.ema_decay


def teacher_logits(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Teacher forward as the official Jo-SRC code runs it: train mode (batch statistics), no grad."""
    teacher.train()
    with torch.no_grad():
        return teacher(x).float()


class SWA:
    """Stochastic weight averaging: an equal-weight running average of each net's parameters
    (``torch.optim.swa_utils.AveragedModel``), one snapshot per epoch, with BatchNorm statistics
    recomputed on the training images (``update_bn``) after each snapshot."""

    def __init__(self, nets: list[torch.nn.Module]):
        self.nets = [AveragedModel(net) for net in nets]

    @property
    def count(self) -> int:
        """Number of snapshots averaged so far."""
        return int(self.nets[0].n_averaged)

    def update(self, nets: list[torch.nn.Module], images, batch_size: int, config) -> None:
        """Add a snapshot of ``nets``, then recompute BatchNorm statistics as a cumulative average
        over one pass of ``images`` (a ``DeviceImages``; normalised, not augmented)."""
        n = len(images)
        for avg, net in zip(self.nets, nets):
            avg.update_parameters(net)
            batches = (images.batch(torch.arange(start, min(start + batch_size, n), device=images.device),
                                    augment=False) for start in range(0, n, batch_size))
            with autocast(config):
                update_bn(batches, avg)

    def state_dict(self) -> dict:
        return {"nets": [net.state_dict() for net in self.nets]}

    def load_state_dict(self, state: dict) -> None:
        for net, sd in zip(self.nets, state["nets"]):
            net.load_state_dict(sd)
