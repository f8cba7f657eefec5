"""Seeding: every epoch's random sources come from (seed, epoch) alone, so a resumed run replays
exactly the epochs it missed; and the process-wide random states a checkpoint keeps."""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch

from cdmix import distributed
from cdmix.config import Config
from cdmix.methods.base import EpochContext


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_epoch(config: Config, epoch: int) -> EpochContext:
    """Seed every random source for ``epoch`` from (seed, epoch) alone (and the rank, for augmentation).

    Progress bars only on rank 0 and only on a terminal: a log file gets the one line per epoch."""
    s = epoch_seed(config.seed, epoch)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    generator = torch.Generator(device=config.device)
    generator.manual_seed(s)
    info = distributed.current()
    aug_generator = None
    if info.enabled:
        aug_generator = torch.Generator(device=config.device)
        aug_generator.manual_seed(int(np.random.SeedSequence([config.seed, epoch, info.rank]).generate_state(1)[0]))
    return EpochContext(epoch=epoch, generator=generator, rng=np.random.default_rng(s),
                        progress=config.progress and info.is_main and on_terminal(), aug_generator=aug_generator)


def on_terminal() -> bool:
    """Whether progress bars (tqdm writes to stderr) reach a terminal rather than a log file."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
