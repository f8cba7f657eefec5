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
    rule). ``cosine``: half a cosine from ``lr`` to 0. ``supcon``: SupContrast's
    (``util.adjust_learning_rate``), half a cosine from ``lr`` to ``lr x 0.001`` by the 1-based epoch
    (the last epoch runs at the minimum), plus its per-step warm-up (``step_lr``). ``josrc``: the official Jo-SRC plan, constant
    until ``lr_step``, then ``lr * (epochs - epoch) / (epochs - lr_step)``.
    """
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * epoch / config.epochs))
    if config.schedule == "supcon":
        return _supcon_cosine(config, epoch + 1)
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


# SupContrast's schedule (main_supcon.py / util.py): the cosine ends at lr x lr_decay_rate^3 (0.1^3), and a
# batch above 256 warms the lr up linearly from 0.01 over the first 10 epochs, step by step.
SUPCON_MIN_FACTOR = 0.1 ** 3
SUPCON_WARM_BATCH = 256
SUPCON_WARM_FROM = 0.01
SUPCON_WARM_EPOCHS = 10


def _supcon_cosine(config: Config, epoch_1based: int) -> float:
    eta_min = config.lr * SUPCON_MIN_FACTOR
    return eta_min + (config.lr - eta_min) * (1.0 + math.cos(math.pi * epoch_1based / config.epochs)) / 2.0


def step_lr(config: Config, epoch: int, step: int, steps: int, global_batch: int) -> float | None:
    """The lr of step ``step`` (0-based, of ``steps``) of the 0-based ``epoch`` where the schedule sets it
    per step, else None (the epoch's ``lr_at`` holds). ``supcon`` with a global batch above 256: during
    the first 10 epochs, ``0.01 + p x (lr_at(epoch 10) - 0.01)`` with ``p`` the share of the 10 epochs'
    steps done before this one (SupContrast's ``warmup_learning_rate``)."""
    if config.schedule != "supcon" or global_batch <= SUPCON_WARM_BATCH or epoch >= SUPCON_WARM_EPOCHS:
        return None
    warm_to = _supcon_cosine(config, SUPCON_WARM_EPOCHS)
    p = (step + epoch * steps) / (SUPCON_WARM_EPOCHS * steps)
    return SUPCON_WARM_FROM + p * (warm_to - SUPCON_WARM_FROM)
