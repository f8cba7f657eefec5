"""Cross-entropy on the noisy labels: the baseline every paper reports."""

from __future__ import annotations

from cdmix.methods.base import EpochContext, Method, supervised_epoch


class Standard(Method):
    name = "standard"
    num_nets = 1

    def train_epoch(self, ctx: EpochContext) -> dict[str, float]:
        loss = supervised_epoch(self.config, self.train_nets[0], self.optimizers[0], self.train,
                                self.config.batch_size, bool(self.config.neg_entropy), ctx,
                                desc=f"epoch {ctx.epoch} CE")
        return {"train_loss": loss}
