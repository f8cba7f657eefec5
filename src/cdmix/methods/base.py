"""What every method shares: its nets and optimizers, the batch iterator, the supervised epoch,
the sharded evaluation pass, state."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cdmix import distributed
from cdmix import losses as L
from cdmix.config import Config
from cdmix.data.batches import DeviceImages
from cdmix.models import create_model
from cdmix.selection import fit_gmm_clean_prob, minmax_normalise, selection_metrics

log = logging.getLogger("cdmix")


@dataclass
class TrainSet:
    """The training samples a method sees, all on the config's device.

    images: DeviceImages (N samples); labels: int64 (N,) noisy labels; true_labels: int64 (N,) or
    None; index: int64 numpy (N,) position of each sample in the dataset's training order.
    """

    images: DeviceImages
    labels: torch.Tensor
    true_labels: torch.Tensor | None
    index: np.ndarray
    num_classes: int
    is_ood: torch.Tensor | None = None  # bool (N,): open-set images (when --open-set-rate is used)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class EpochContext:
    """Per-epoch random sources and switches handed to ``Method.train_epoch``."""

    epoch: int
    generator: torch.Generator  # on the device, the same on every rank: permutations of sample indices
    rng: np.random.Generator  # host, the same on every rank: MixUp lambda and other scalars
    progress: bool
    # On the device, this rank's own: crops, flips, MixUp permutations of the local batch.
    # Single process: the very same generator object as ``generator``.
    aug_generator: torch.Generator | None = None

    def __post_init__(self):
        if self.aug_generator is None:
            self.aug_generator = self.generator


def autocast(config: Config):
    """bf16 autocast on CUDA when ``config.amp``; a no-op elsewhere."""
    if not config.amp:
        return contextlib.nullcontext()
    device_type = torch.device(config.device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def shuffled_batches(indices: torch.Tensor, global_batch: int, ctx: EpochContext, desc: str, images=None):
    """One pass over ``indices`` (a 1-D tensor of sample indices) in a random order drawn from
    ``ctx.generator`` (the same on every rank), in global batches of ``global_batch``; yields this
    rank's slice of each. All ranks stop before a last batch too small to give every rank a
    sample. Shows a progress bar when ``ctx.progress``. ``images``: the images the batches will
    be read from, told the batches in advance (``prefetch``: host-held images gather them ahead)."""
    info = distributed.current()
    n = len(indices)
    perm = indices[torch.randperm(n, device=indices.device, generator=ctx.generator)]
    chunks = [perm[start:start + global_batch] for start in range(0, n, global_batch)]
    local = [distributed.local_slice(chunk, info) for chunk in chunks if len(chunk) >= info.world_size]
    with tqdm(total=len(chunks), desc=desc, leave=False, disable=not ctx.progress, dynamic_ncols=True) as bar, \
            prefetching(images, local):
        for idx in local:
            yield idx
            bar.update(1)


def prefetching(images, batches: list[torch.Tensor]):
    """``images.prefetch(batches)`` (a no-op for device-resident images, or without images)."""
    return contextlib.nullcontext() if images is None else images.prefetch(batches)


def build_net(config: Config, num_classes: int, in_channels: int) -> torch.nn.Module:
    net = create_model(config.model, num_classes=num_classes, in_channels=in_channels, width=config.width)
    if config.pretrained:
        from cdmix.models.pretrained import load_pretrained

        load_pretrained(net, config.pretrained)
    net = net.to(config.device)
    if torch.device(config.device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return net


def build_optimizer(config: Config, net: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (DivideMix, the default; Nesterov with ``config.nesterov``, the official Jo-SRC
    real-world runs) or Adam (the official Jo-SRC CIFAR run)."""
    if config.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=config.lr, betas=(config.momentum, 0.999),
                                weight_decay=config.weight_decay)
    return torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov)


def maybe_compile(config: Config, net: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """torch.compile when asked, tried once on ``example`` (eval mode, no grad, so no state changes);
    eager with a clear message when it cannot be used. The trial is needed because torch.compile is
    lazy: most failures (no C++ compiler, unsupported platform) only show at the first call."""
    if not config.compile:
        return net
    was_training = net.training
    try:
        compiled = torch.compile(net)
        net.eval()
        with torch.no_grad(), autocast(config):
            compiled(example)
        return compiled
    except Exception as exc:  # compile support varies by platform and install
        text = str(exc).strip()
        first = text.splitlines()[0][:200] if text else ""
        log.warning(f"--compile could not be used ({type(exc).__name__}: {first}); running eagerly")
        return net
    finally:
        net.train(was_training)


class Method:
    """Base class. A method owns ``nets`` and ``optimizers`` and trains one epoch at a time.

    The engine sets the learning rate, seeds the epoch, evaluates with ``predict_logits`` and saves
    ``state_dict``; it never needs to know which method runs.
    """

    name = "base"
    num_nets = 1
    swa = None  # a method with stochastic weight averaging sets an ``averaging.SWA``

    def __init__(self, config: Config, train: TrainSet):
        self.config = config
        self.train = train
        self.num_classes = train.num_classes
        in_channels = train.images.shape[1]
        self.dist = distributed.current()
        self.nets = [distributed.convert_sync_bn(build_net(config, self.num_classes, in_channels), self.dist,
                                                 config.sync_bn) for _ in range(self.num_nets)]
        self.optimizers = [build_optimizer(config, net) for net in self.nets]
        # Training forwards go through these: DDP wrappers under torchrun, compiled or plain nets otherwise.
        example = train.images.batch(torch.arange(min(2 * config.batch_size, len(train)),
                                                  device=train.labels.device), augment=False) if config.compile else None
        self.train_nets = [maybe_compile(config, distributed.wrap(net, self.dist, config.device),
                                         example) for net in self.nets]
        self.last_division: dict[str, np.ndarray] | None = None
        # Cut by the collapse guard's rollback: scales the lr and the pseudo-label weight.
        self.damping = 1.0

    # ----- training
    def train_epoch(self, ctx: EpochContext) -> dict[str, float]:
        raise NotImplementedError

    def set_lr(self, lr: float, beta1: float | None = None) -> None:
        """Learning rate (cut by the collapse guard's damping) and, for Adam, beta1 of this epoch."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * self.damping
                if beta1 is not None:
                    group["betas"] = (beta1, group["betas"][1])

    def on_rollback(self, collapse_count: int) -> None:
        """After the engine restored the best checkpoint: halve lr and pseudo-label weight per collapse."""
        self.damping = 0.5 ** collapse_count

    def supervised_epoch(self, i: int, ctx: EpochContext, batch_size: int, desc: str,
                         indices: torch.Tensor | None = None, label_smoothing: float = 0.0,
                         penalty: float = 0.0, after_step=None) -> float:
        """One epoch of cross-entropy of net ``i`` on the noisy labels of ``indices`` (default: all
        samples): the baseline, and DivideMix's and the hybrid's warm-up.

        ``batch_size`` is per rank. Loss: CE (with ``label_smoothing``), + the official confidence
        penalty (mean Σ p log p) when ``config.neg_entropy`` (asymmetric noise), + ``penalty`` times
        the same term. ``after_step()`` runs after every optimizer step. Returns the mean training
        loss of this rank's batches.
        """
        config, train = self.config, self.train
        net, optimizer = self.train_nets[i], self.optimizers[i]
        net.train()
        device = train.labels.device
        if indices is None:
            indices = torch.arange(len(train), device=device)
        total = torch.zeros((), device=device)
        steps = 0
        for idx in shuffled_batches(indices, batch_size * self.dist.world_size, ctx, desc, train.images):
            x = train.images.batch(idx, augment=True, generator=ctx.aug_generator)
            with autocast(config):
                logits = net(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, train.labels[idx], label_smoothing=label_smoothing)
            if config.neg_entropy:
                loss = loss + L.neg_entropy_penalty(logits)
            if penalty > 0:
                loss = loss + penalty * L.neg_entropy_penalty(logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.detach()
            steps += 1
        return float(total) / max(steps, 1)

    # ----- evaluation
    def eval_nets(self) -> list[torch.nn.Module]:
        """The nets used for prediction: the SWA averages once there are any, else the nets."""
        return self.swa.nets if self.swa is not None and self.swa.count > 0 else self.nets

    @torch.inference_mode()
    def predict_logits(self, images: DeviceImages, batch_size: int,
                       nets: list[torch.nn.Module] | None = None) -> list[torch.Tensor]:
        """Logits of each net (default: the prediction nets) on all ``images``, eval mode, no
        augmentation, float32, each N x C. Under torchrun each rank computes a block and all ranks
        receive the same gathered result."""
        nets = self.eval_nets() if nets is None else nets
        was_training = [net.training for net in nets]
        for net in nets:
            net.eval()
        outputs: list[list[torch.Tensor]] = [[] for _ in nets]
        n = len(images)
        first, stop = distributed.shard_range(n, self.dist)
        batches = [torch.arange(start, min(start + batch_size, stop), device=images.device)
                   for start in range(first, stop, batch_size)]
        with autocast(self.config), images.prefetch(batches):
            for idx in batches:
                x = images.batch(idx, augment=False)
                for out, net in zip(outputs, nets):
                    out.append(net(x).float())
        for net, mode in zip(nets, was_training):
            net.train(mode)
        empty = torch.zeros((0, self.num_classes), device=images.device)
        return [distributed.gather_rows(torch.cat(out) if out else empty, n, self.dist) for out in outputs]

    @torch.inference_mode()
    def per_sample_losses(self, net: torch.nn.Module) -> torch.Tensor:
        """CE loss of every training sample against its noisy label, eval mode, no augmentation: (N,)."""
        logits = self.predict_logits(self.train.images, self.config.eval_batch_size, nets=[net])[0]
        return F.cross_entropy(logits, self.train.labels, reduction="none")

    def clean_prob(self) -> np.ndarray:
        """Probability that each training sample's label is clean, from the last division.

        Methods without a division of their own fit the loss GMM on the ensemble's losses now.
        """
        if self.last_division is not None and "clean_prob" in self.last_division:
            return self.last_division["clean_prob"]
        losses = torch.stack([self.per_sample_losses(net) for net in self.eval_nets()]).mean(0)
        norm = minmax_normalise(losses.cpu().numpy())
        prob, params = fit_gmm_clean_prob(norm, seed=self.config.seed)
        self.last_division = {"loss_net1": norm, "clean_prob": prob,
                              "gmm_means": np.asarray(params["means"]),
                              "gmm_variances": np.asarray(params["variances"]),
                              "gmm_weights": np.asarray(params["weights"])}
        return prob

    def add_selection_metrics(self, row: dict, tag: str, selected: np.ndarray, score: np.ndarray,
                              idx: np.ndarray | None = None) -> None:
        """Precision / recall of the selected-as-clean set and ROC-AUC of ``score``, where the true
        labels are known (``sel_*_<tag>`` columns); ``idx``: the samples ``selected`` and ``score``
        are of, when not all of them."""
        if self.train.true_labels is None:
            return
        is_clean = (self.train.labels == self.train.true_labels).cpu().numpy()
        if idx is not None:
            is_clean = is_clean[idx]
        metrics = selection_metrics(selected, score, is_clean)
        row[f"sel_precision_{tag}"] = metrics["precision"]
        row[f"sel_recall_{tag}"] = metrics["recall"]
        row[f"sel_auc_{tag}"] = metrics["auc"]

    def summary_info(self) -> dict:
        """Method facts for summary.json (e.g. how long the warm-up was); none by default."""
        return {}

    # ----- state
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {
            "nets": [net.state_dict() for net in self.nets],
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "last_division": self.last_division,
            "damping": self.damping,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for net, sd in zip(self.nets, state["nets"]):
            net.load_state_dict(sd)
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        self.last_division = state["last_division"]
        self.damping = state["damping"]
        self.load_extra_state(state["extra"])

