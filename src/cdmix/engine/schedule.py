"""The learning-rate and Adam-beta1 plans of a run, by epoch (0-based)."""

from __future__ import annotations

import math

from cdmix.config import Config, after_warmup_midpoint


def lr_at(config: Config, epoch: int, warmup_end: int | None = None) -> float:
    """Learning rate of a 0-based epoch.

    ``step``: ``lr`` until ``lr_step``, then ``lr / 10``. DivideMix under ``--warmup auto`` has no
    ``lr_step`` until its warm-up ends; the engine then records the warm-up and the step
    (``after_warmup_midpoint``) in the config, so ``config.lr_step`` is the one source. ``warmup_end``:
    for callers holding a config with ``lr_step`` None, the decided warm-up (the step follows the same
    rule). ``cosine``: half a cosine from ``lr`` to 0. ``josrc``: the official Jo-SRC plan, constant
    until ``lr_step``, then ``lr * (epochs - epoch) / (epochs - lr_step)``.
    """
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * epoch / config.epochs))
    if config.schedule == "josrc":
        if epoch < config.lr_step:
            return config.lr
        return config.lr * (config.epochs - epoch) / (config.epochs - config.lr_step)
    step = config.lr_step
    if step is None:  # --warmup auto, undecided: no step yet
        step = config.epochs if warmup_end is None else after_warmup_midpoint(warmup_end, config.epochs)
    return config.lr if epoch < step else config.lr / 10.0


def beta1_at(config: Config, epoch: int) -> float | None:
    """Adam's beta1 of a 0-based epoch (None: leave it): the official Jo-SRC plan drops it from
    ``momentum`` to 0.1 at ``lr_step``."""
    if config.optimizer != "adam":
        return None
    return 0.1 if config.schedule == "josrc" and epoch >= config.lr_step else config.momentum


def with_decided(config: Config, decided: dict) -> Config:
    """``config`` with the settings a method decided while training (``Method.decided_settings``:
    the automatic warm-up's length) and the lr step that follows from them; ``config`` itself when
    nothing new was decided. What config.json records, so that it says what ran."""
    changed = {k: v for k, v in decided.items() if getattr(config, k) != v}
    if not changed:
        return config
    if "warmup" in changed and config.lr_step is None:
        changed["lr_step"] = after_warmup_midpoint(int(changed["warmup"]), config.epochs)
    return config.replace(**changed)
