"""What a run prints: the data and method lines at the start, one line per epoch, the time left."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from cdmix import distributed, runs
from cdmix.config import Config


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def duration(seconds: float) -> str:
    """``2h05m`` / ``14m`` for a human reading an estimate."""
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def say(text: str) -> None:
    """Print on rank 0 only (every line once under torchrun)."""
    if distributed.current().is_main:
        print(text, flush=True)


class TimeLeft:
    """The time left, from the cost of the phase each remaining epoch belongs to (a DivideMix epoch
    costs several warm-up epochs): each phase is priced by the median of its last ``RECENT`` epochs,
    so one slow epoch (the machine suspended, the process paused) does not multiply the estimate."""

    RECENT = 5

    def __init__(self):
        self.recent: dict[str, list[float]] = {}

    def record(self, phase: str | None, seconds: float) -> None:
        if phase is not None:
            self.recent[phase] = (self.recent.get(phase, []) + [seconds])[-self.RECENT:]

    def estimate(self, phases: list[str | None]) -> tuple[float, int]:
        """(seconds for the remaining epochs of phases already timed, how many remaining epochs are
        of a phase not timed yet or not known yet)."""
        price = {phase: statistics.median(seconds) for phase, seconds in self.recent.items()}
        known = [price[p] for p in phases if p in price]
        return sum(known), len(phases) - len(known)


def left_text(seconds: float, untimed: int) -> str | None:
    """The time-left field of the epoch line; None when there is nothing worth saying (under a
    minute, or nothing timed yet)."""
    if seconds < 60:  # a long run on a CPU should say so after its first epoch, not after hours
        return None
    if untimed:
        return f"(~{duration(seconds)} left, plus {untimed} epoch(s) of a phase not timed yet)"
    return f"(~{duration(seconds)} left at this pace)"


def epoch_line(config: Config, row: dict[str, Any], best: float, fields: list[str] | None = None,
               left: tuple[float, int] | None = None) -> str:
    """The console line of an epoch. ``fields``: the method's own (``Method.console_fields``;
    default: the training loss); ``left``: ``TimeLeft.estimate`` (default: every remaining epoch at
    this epoch's pace)."""
    parts = [f"epoch {row[runs.EPOCH]}/{config.epochs}", f"lr {row[runs.LR]:.4g}"]
    if fields is None:
        fields = [f"loss {row[runs.TRAIN_LOSS]:.3f}"] if runs.TRAIN_LOSS in row else []
    parts.extend(fields)
    if runs.VAL_ACC in row:
        parts.append(f"val {row[runs.VAL_ACC]:.2f}%")
    if not math.isnan(row.get(runs.TEST_ACC, math.nan)):
        parts.append(f"test {row[runs.TEST_ACC]:.2f}%")
    if not math.isnan(best):
        parts.append(f"(best {best:.2f}%)")
    parts.append(f"{row[runs.SECONDS]:.1f}s")
    if left is None:
        left = ((config.epochs - int(row[runs.EPOCH])) * row[runs.SECONDS], 0)
    text = left_text(*left)
    if text:
        parts.append(text)
    return "  ".join(parts)


def print_data_line(config: Config, data) -> None:
    """The data and method lines at the start of a run (``data``: ``engine.data.PreparedData``)."""
    raw, info = data.raw, data.noise_info
    val = f"{len(raw.val_labels)} (clean)" if raw.val_labels is not None else len(data.val_pos)
    extra = "".join(f" + {name} {len(labels)}" for name, (_, labels) in raw.extra_tests.items())
    text = (f"data: {config.dataset}  train {len(data.train_pos)}  val {val}  "
            f"test {len(raw.test_labels)}{extra}  classes {raw.num_classes}  image {raw.image_size}px")
    if config.dataset in ("folder", "csv", "hf"):
        text += " (your files, resized; --image-size to change)"
    if config.crop_size != raw.image_size or config.random_resized_crop:
        text += f" (crop {config.crop_size}{', random-resized' if config.random_resized_crop else ''})"
    if config.data_placement != "device":
        text += f"  images on {config.data_placement}"
    if info.get("noise_rate_actual") is not None:
        nominal = info.get("noise_rate_nominal")
        nominal_text = f"nominal {nominal:.1%}, " if nominal is not None else ""
        text += f"  noise {info.get('noise_source', '')} ({nominal_text}actual {info['noise_rate_actual']:.1%})"
    elif raw.train_true_labels is None:
        text += "  labels as given (no noise added; which are wrong is unknown: label_issues.csv ranks them)"
    print(text)
    from cdmix.methods import method_classes

    warmup = f"  warm-up: {config.warmup}" if getattr(method_classes().get(config.method), "has_warmup", False) else ""
    print(f"method: {config.method}  model: {config.model}  device: {device_name(config.device)}  "
          f"epochs: {config.epochs}{warmup}")
