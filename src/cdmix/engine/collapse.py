"""The collapse guard: the best epoch so far, and a sharp drop below it (or of the selected set) seen
when it happens; with ``--on-collapse rollback`` the trainer restores the best checkpoint."""

from __future__ import annotations

import logging
import math
from typing import Any

from cdmix import runs

logger = logging.getLogger("cdmix")


def chance_drop(best_acc: float, images: int, z: float = 2.0) -> float:
    """Accuracy points that two evaluations of nets of equal accuracy ``best_acc`` (%) on ``images``
    images differ by at ``z`` standard errors: on 30 images a drop of 24 points from 67% can be chance."""
    n = max(images, 1)
    p = min(max(best_acc / 100, 1 / n), 1 - 1 / n)
    return 100 * z * math.sqrt(2 * p * (1 - p) / n)


class CollapseGuard:
    """Tracks the best selection accuracy (``Method.selection_key``'s column: validation, else test)
    and flags collapses.

    ``collapse_drop``: points below the best that count as a collapse; ``judged_images``: how many
    images the selection accuracy is measured on (for the warning and ``chance_drop``).
    Its ``state_dict`` is part of every checkpoint (the keys are top-level checkpoint fields).
    """

    def __init__(self, collapse_drop: float, judged_images: int):
        self.collapse_drop = collapse_drop
        self.judged_images = judged_images
        self.best_acc = -1.0
        self.best_epoch = -1  # 0-based; -1: none yet
        self.collapse_count = 0
        self.last_selected: float | None = None  # the selected-set size of the last epoch that had one
        self.last_select_acc: float | None = None  # the last epoch's selection accuracy

    def state_dict(self) -> dict[str, Any]:
        return {"best_acc": self.best_acc, "best_epoch": self.best_epoch, "collapse_count": self.collapse_count,
                "last_selected": self.last_selected, "last_select_acc": self.last_select_acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_acc = state["best_acc"]
        self.best_epoch = state["best_epoch"]
        self.collapse_count = state.get("collapse_count", 0)  # older checkpoints lack these
        self.last_selected = state.get("last_selected")
        self.last_select_acc = state.get("last_select_acc")

    def update_best(self, select_acc: float, epoch: int) -> bool:
        """Record the 0-based ``epoch``'s selection accuracy; True when it is the new best (a NaN,
        nothing to select by, makes the latest epoch the best)."""
        improved = select_acc > self.best_acc or math.isnan(select_acc)
        if improved:
            self.best_acc, self.best_epoch = select_acc, epoch
        self.last_select_acc = select_acc
        return improved

    def watch(self, row: dict[str, Any], select_acc: float, selected: float | None, val: bool) -> bool:
        """Flag in ``row`` a sharp drop of the selected set (``selected``: its size this epoch, or None)
        or of the selection accuracy below the best; True when this epoch is a collapse."""
        if selected is not None and self.last_selected and selected < 0.5 * self.last_selected:
            row[runs.SELECTION_DROP] = 1
            logger.warning(f"the selected (clean) set shrank from {self.last_selected:g} to {selected:g}")
        if selected is not None:
            self.last_selected = selected
        drop = self.best_acc - select_acc
        row[runs.COLLAPSE] = int(drop >= self.collapse_drop)
        if not row[runs.COLLAPSE]:
            return False
        self.collapse_count += 1
        logger.warning(f"epoch {row[runs.EPOCH]}: {'val' if val else 'test'} accuracy dropped "
                       f"{drop:.1f} points below the best ({self.best_acc:.2f}% at epoch {self.best_epoch + 1}; "
                       f"{round(drop * self.judged_images / 100)} of {self.judged_images} images): the run may "
                       f"be collapsing")
        return True

    def ended_collapsed(self) -> bool:
        """The run collapsed and did not recover: collapse warnings, and the last epoch's selection
        accuracy still below the best by ``collapse_drop`` points and by more than chance makes on
        that many images (``chance_drop``)."""
        if not self.collapse_count or self.last_select_acc is None or self.best_epoch < 0:
            return False
        drop = self.best_acc - self.last_select_acc
        return drop >= max(self.collapse_drop, chance_drop(self.best_acc, self.judged_images))
