"""DivideMix (Li, Socher, Hoi, ICLR 2020), as the official code does it (REFERENCE §2).

Two nets. Warm-up: cross-entropy, batch 2B. Then each epoch: co-divide (per-sample losses of
both nets, GMM clean probability), train net1 on net2's division, then net2 on net1's, with
co-refinement, co-guessing, MixUp over the 4B batch, Lx + λu_eff·Lu + prior penalty.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from cdmix import distributed
from cdmix import losses as L
from cdmix.methods.base import EpochContext, Method, autocast, progress_bar, supervised_epoch
from cdmix.selection import fit_gmm_clean_prob, loss_history_average, minmax_normalise


class DivideMix(Method):
    name = "dividemix"
    num_nets = 2

    def __init__(self, config, train):
        super().__init__(config, train)
        # Normalised per-sample losses of past epochs, one list per net (for --loss-history > 1).
        self.loss_history: list[list[np.ndarray]] = [[] for _ in self.nets]

    # ----- state
    def extra_state(self) -> dict:
        return {"loss_history": self.loss_history}

    def load_extra_state(self, state: dict) -> None:
        self.loss_history = state.get("loss_history", [[] for _ in self.nets])

    # ----- one epoch
    def train_epoch(self, ctx: EpochContext) -> dict[str, float]:
        config = self.config
        if ctx.epoch < config.warmup:
            return self.warmup_epoch(ctx)
        row: dict[str, float] = {}
        t0 = time.perf_counter()
        clean_probs = self.divide(ctx, row)
        row["seconds_divide"] = time.perf_counter() - t0
        self.co_train(clean_probs, ctx, row)
        return row

    def co_train(self, clean_probs: list[np.ndarray], ctx: EpochContext, row: dict[str, float]) -> None:
        """Train net1 on net2's division, then net2 on net1's (co-divide); per-net stats into ``row``."""
        for a, b in ((0, 1), (1, 0)):
            t1 = time.perf_counter()
            stats = self.train_net(a, b, clean_probs[b], ctx)
            row.update({f"{k}_net{a + 1}": v for k, v in stats.items()})
            row[f"seconds_train_net{a + 1}"] = time.perf_counter() - t1
        row["train_loss"] = (row["loss_net1"] + row["loss_net2"]) / 2
        row["lambda_u_eff"] = row["lambda_u_eff_net2"]

    def warmup_epoch(self, ctx: EpochContext) -> dict[str, float]:
        row = {}
        t0 = time.perf_counter()
        for i, (net, opt) in enumerate(zip(self.train_nets, self.optimizers), start=1):
            row[f"loss_net{i}"] = supervised_epoch(self.config, net, opt, self.train, 2 * self.config.batch_size,
                                                   bool(self.config.neg_entropy), ctx,
                                                   desc=f"epoch {ctx.epoch} warm-up net{i}")
        row["train_loss"] = (row["loss_net1"] + row["loss_net2"]) / 2
        row["seconds_train"] = time.perf_counter() - t0
        return row

    # ----- co-divide
    def divide(self, ctx: EpochContext, row: dict[str, float]) -> list[np.ndarray]:
        """Clean probability of every training sample from each net's loss GMM; fills metrics."""
        config = self.config
        division: dict[str, np.ndarray] = {}
        clean_probs = []
        for i, net in enumerate(self.nets):
            norm = minmax_normalise(self.per_sample_losses(net).cpu().numpy())
            history = (self.loss_history[i] + [norm])[-config.loss_history:]
            self.loss_history[i] = history if config.loss_history > 1 else []
            gmm_input = loss_history_average(history, config.loss_history)
            prob, params = fit_gmm_clean_prob(gmm_input, seed=config.seed)
            clean_probs.append(prob)
            tag = f"net{i + 1}"
            clean_mean = params["means"][params["clean_component"]]
            noisy_mean = params["means"][1 - params["clean_component"]] if not params["degenerate"] else clean_mean
            row[f"labeled_{tag}"] = int((prob > config.p_threshold).sum())
            row[f"gmm_mean_clean_{tag}"] = clean_mean
            row[f"gmm_mean_noisy_{tag}"] = noisy_mean
            self.add_selection_metrics(row, tag, prob > config.p_threshold, prob)
            division.update({f"loss_{tag}": gmm_input, f"clean_prob_{tag}": prob,
                             f"gmm_means_{tag}": np.asarray(params["means"]),
                             f"gmm_variances_{tag}": np.asarray(params["variances"]),
                             f"gmm_weights_{tag}": np.asarray(params["weights"])})
        division["clean_prob"] = np.mean(clean_probs, axis=0)
        self.last_division = division
        if self.dist.enabled:
            row["division_ranks_agree"] = int(self.ranks_agree(clean_probs))
        return clean_probs

    def ranks_agree(self, clean_probs: list[np.ndarray]) -> bool:
        """Under torchrun: do all ranks hold the same division? (A checksum of each, all-gathered.)"""
        labeled = [np.flatnonzero(p > self.config.p_threshold) for p in clean_probs]
        checksum = torch.tensor([float(p.sum()) for p in clean_probs] + [float((idx * 2654435761 % 1000003).sum())
                                                                         for idx in labeled],
                                dtype=torch.float64, device=self.train.labels.device)
        gathered = distributed.gather_rows(checksum.view(1, -1), self.dist.world_size, self.dist)
        agree = bool((gathered == gathered[0]).all())
        if not agree:
            print(f"warning: rank {self.dist.rank} holds a different division from rank 0")
        return agree

    # ----- training one net on its partner's division
    def labeled_split(self, clean_prob: np.ndarray, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(labeled_idx, unlabeled_idx) on the device; never leaves the labeled set nearly empty."""
        config = self.config
        labeled = np.flatnonzero(clean_prob > config.p_threshold)
        if len(labeled) < 2:
            k = min(len(clean_prob), max(2, config.batch_size))
            print(f"warning: the division for {tag} selected {len(labeled)} labeled sample(s); "
                  f"using the {k} most likely clean instead")
            labeled = np.sort(np.argsort(-clean_prob, kind="stable")[:k])
        mask = np.zeros(len(clean_prob), dtype=bool)
        mask[labeled] = True
        device = self.train.labels.device
        return (torch.as_tensor(labeled, device=device),
                torch.as_tensor(np.flatnonzero(~mask), device=device))

    def train_net(self, a: int, b: int, clean_prob: np.ndarray, ctx: EpochContext) -> dict[str, float]:
        config = self.config
        net, partner, optimizer = self.train_nets[a], self.nets[b], self.optimizers[a]
        net.train()
        partner.eval()
        device = self.train.labels.device
        labeled_idx, unlabeled_idx = self.labeled_split(clean_prob, f"net{a + 1}")
        weights = torch.as_tensor(clean_prob, dtype=torch.float32, device=device)
        sums = torch.zeros(4, device=device)
        lambda_u_eff = 0.0
        steps = 0
        for epoch_frac, idx_x, idx_u in self.mixmatch_batches(labeled_idx, unlabeled_idx, ctx, f"net{a + 1}"):
            ramp = L.linear_rampup(epoch_frac, config.warmup, config.rampup_epochs)
            lambda_u_eff = config.lambda_u * ramp * self.damping
            total, lx, lu, penalty = self.step(net, partner, optimizer, idx_x, idx_u, weights, lambda_u_eff, ctx)
            sums += torch.stack([total.detach(), lx.detach(), lu.detach(), penalty.detach()])
            steps += 1
        means = (sums / max(steps, 1)).tolist()
        return {"loss": means[0], "lx": means[1], "lu": means[2], "penalty": means[3],
                "lambda_u_eff": lambda_u_eff, "labeled_used": len(labeled_idx)}

    def mixmatch_batches(self, labeled_idx: torch.Tensor, unlabeled_idx: torch.Tensor, ctx: EpochContext,
                         tag: str):
        """One pass over the shuffled labeled set, each batch paired with the next unlabeled batch
        (the unlabeled set restarts when exhausted). Yields (fractional epoch of the official λu
        ramp, this rank's labeled indices, this rank's unlabeled indices)."""
        bs = self.config.batch_size * self.dist.world_size  # the global batch; each rank takes its slice
        n_labeled = len(labeled_idx)
        num_iter = n_labeled // bs + 1  # official: fractional epoch of the λu ramp
        num_batches = (n_labeled + bs - 1) // bs
        device = labeled_idx.device
        labeled_perm = labeled_idx[torch.randperm(n_labeled, device=device, generator=ctx.generator)]
        unlabeled_batches = self.cycle(unlabeled_idx, bs, ctx.generator)
        with progress_bar(num_batches, f"epoch {ctx.epoch} train {tag}", ctx.progress) as bar:
            for batch_idx in range(num_batches):
                chunk = labeled_perm[batch_idx * bs:(batch_idx + 1) * bs]
                if len(chunk) < self.dist.world_size:  # too small to give every rank a sample
                    break
                yield (ctx.epoch + batch_idx / num_iter, distributed.local_slice(chunk, self.dist),
                       distributed.local_slice(next(unlabeled_batches), self.dist))
                bar.update(1)

    @staticmethod
    def cycle(indices: torch.Tensor, batch_size: int, generator: torch.Generator):
        """Endless shuffled batches of ``indices``, reshuffled when exhausted (official restart).

        Yields empty tensors when ``indices`` is empty.
        """
        while True:
            if len(indices) == 0:
                yield indices
                continue
            perm = indices[torch.randperm(len(indices), device=indices.device, generator=generator)]
            for start in range(0, len(perm), batch_size):
                yield perm[start:start + batch_size]

    def guess_unlabeled(self, net, partner, u1, u2) -> torch.Tensor:
        """Co-guessing: sharpened mean of both nets on both unlabeled views (no grad)."""
        if self.config.faithful_order:
            # Official order: net stays in train mode for these no-grad forwards (batch statistics,
            # running stats updated), one forward per view.
            outs = [net(u1), net(u2)]
        else:
            outs = list(net(torch.cat([u1, u2])).chunk(2))
        both = partner(torch.cat([u1, u2]))  # eval mode: batching does not change the result
        outs += list(both.chunk(2))
        return L.co_guess([F.softmax(o.float(), dim=1) for o in outs], self.config.temperature)

    def refine_labeled(self, net, x1, x2, labels_onehot, w, temperature: float | None = None) -> torch.Tensor:
        """Co-refinement: w·y + (1−w)·mean prediction of the two views, sharpened with
        ``temperature`` (default: the config's T) (no grad)."""
        if self.config.faithful_order:
            p1, p2 = net(x1), net(x2)
        else:
            p1, p2 = net(torch.cat([x1, x2])).chunk(2)
        return L.co_refine(F.softmax(p1.float(), 1), F.softmax(p2.float(), 1), labels_onehot, w,
                           self.config.temperature if temperature is None else temperature)

    def views_and_targets(self, net, idx_x, idx_u, weights, guess, temperature, gen):
        """Two augmented views of the labeled and the unlabeled batch, the co-refined labeled targets
        and ``guess(u1, u2)`` for the unlabeled ones (no grad). Returns (views [x1, x2, u1, u2]
        (without u1, u2 when ``idx_u`` is empty), targets_x, targets_u or None)."""
        images = self.train.images
        views = [images.batch(idx_x, augment=True, generator=gen), images.batch(idx_x, augment=True, generator=gen)]
        labels_onehot = F.one_hot(self.train.labels[idx_x], self.num_classes).float()
        targets_u = None
        with torch.no_grad(), autocast(self.config):
            if len(idx_u) > 0:
                views += [images.batch(idx_u, augment=True, generator=gen),
                          images.batch(idx_u, augment=True, generator=gen)]
                targets_u = guess(views[2], views[3])
            targets_x = self.refine_labeled(net, views[0], views[1], labels_onehot, weights[idx_x], temperature)
        return views, targets_x, targets_u

    def mix(self, views, targets_x, targets_u, ctx):
        """MixUp over the concatenated views [x1, x2, u1, u2] with targets [p', p', q, q]: λ from the
        shared host RNG (max(λ, 1−λ)), the permutation from this rank's generator."""
        targets = [targets_x, targets_x] + ([] if targets_u is None else [targets_u, targets_u])
        all_inputs, all_targets = torch.cat(views), torch.cat(targets)
        lam = L.sample_mix_lambda(self.config.alpha, ctx.rng)
        perm = torch.randperm(len(all_inputs), device=all_inputs.device, generator=ctx.aug_generator)
        return L.mixup(all_inputs, all_targets, lam, perm)

    def step(self, net, partner, optimizer, idx_x, idx_u, weights, lambda_u_eff, ctx):
        config = self.config
        views, targets_x, targets_u = self.views_and_targets(
            net, idx_x, idx_u, weights, lambda u1, u2: self.guess_unlabeled(net, partner, u1, u2),
            config.temperature, ctx.aug_generator)
        mixed_inputs, mixed_targets = self.mix(views, targets_x, targets_u, ctx)
        with autocast(config):
            logits = net(mixed_inputs)
        total, lx, lu, penalty = L.dividemix_loss(logits.float(), mixed_targets, 2 * len(idx_x), lambda_u_eff)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total, lx, lu, penalty
