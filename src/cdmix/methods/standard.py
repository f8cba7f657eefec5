"""Cross-entropy on the noisy labels: the baseline every paper reports."""

from __future__ import annotations

from cdmix.methods.base import EpochContext, Method


class Standard(Method):
    name = "standard"
    num_nets = 1

    def train_epoch(self, ctx: EpochContext) -> dict[str, float]:
        return {"train_loss": self.supervised_epoch(0, ctx, self.config.batch_size, f"epoch {ctx.epoch + 1} CE")}
