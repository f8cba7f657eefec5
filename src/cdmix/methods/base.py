"""What every method shares: its nets and optimizers, the batch iterator, the supervised epoch,
the sharded evaluation pass, state."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cdmix import distributed
from cdmix import losses as L
from cdmix.config import Config
from cdmix.data.batches import DeviceImages
from cdmix.ensemble import accuracy, ensemble_logits, top_k_accuracy
from cdmix.models import create_model
from cdmix.selection import fit_gmm_clean_prob, minmax_normalise, selection_metrics

log = logging.getLogger("cdmix")


@dataclass
class TrainSet:
    """The training samples a method sees.

    images: N samples, wherever the run's data placement keeps them (``DeviceImages`` on the device,
    or host / disk held images with the same ``batch`` / ``subset`` / ``prefetch`` interface: each batch
    reaches the device when it is read); labels: int64 (N,) noisy labels, on the config's device;
    true_labels: int64 (N,) or None, on the device; index: int64 numpy (N,) position of each sample in
    the dataset's training order.
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
class EvalSets:
    """The held-out images a method is evaluated on after each epoch (placed like the training images).

    test_images / test_labels: the test split (labels int64 (M,) on the device; M may be 0);
    val_images / val_labels: the validation part (noisy, split off the training set) or the source's
    clean validation set (``clean_val``), None without one; extra_tests: further test sets by name
    (WebVision's ILSVRC2012 val), name -> (images, labels); batch_size: the evaluation batch;
    top5: also report top-5 accuracy.
    """

    test_images: DeviceImages
    test_labels: torch.Tensor
    val_images: DeviceImages | None = None
    val_labels: torch.Tensor | None = None
    extra_tests: dict = field(default_factory=dict)
    batch_size: int = 256
    top5: bool = False
    clean_val: bool = False

    def selection_images(self) -> int:
        """How many images a selection accuracy (validation, else test) is measured on."""
        return len(self.val_labels) if self.val_labels is not None else len(self.test_labels)


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
    from cdmix.models.weights import timm_name

    if timm_name(config.pretrained):  # --pretrained timm:NAME: timm's own pretrained loader, a fresh classifier
        from cdmix.models.timm_models import create_timm_model

        net = create_timm_model(timm_name(config.pretrained), num_classes, in_channels, config.width, pretrained=True)
    else:
        net = create_model(config.model, num_classes=num_classes, in_channels=in_channels, width=config.width)
    if config.pretrained and not timm_name(config.pretrained):  # a weights file or a `cdmix pretrain` encoder
        from cdmix.models.encoder import find_encoder, load_encoder

        load_encoder(net, find_encoder(config.pretrained)[0])
    net = net.to(config.device)
    if torch.device(config.device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return net


@torch.inference_mode()
def encoder_features(encoder: torch.nn.Module, images, config: Config, dim: int,
                     batch_size: int | None = None) -> torch.Tensor:
    """``encoder(x)`` (``dim`` features) of all ``images`` in eval mode without augmentation (the
    evaluation crop), float32 N x dim on the images' device. Under torchrun each rank computes a block
    and all receive all rows."""
    dist = distributed.current()
    batch_size = batch_size or config.eval_batch_size or 256
    was_training = encoder.training
    encoder.eval()
    n = len(images)
    first, stop = distributed.shard_range(n, dist)
    device = images.device
    batches = [torch.arange(start, min(start + batch_size, stop), device=device)
               for start in range(first, stop, batch_size)]
    out = []
    try:
        with autocast(config), images.prefetch(batches):
            for idx in batches:
                out.append(encoder(images.batch(idx, augment=False)).float())
    finally:
        encoder.train(was_training)
    local = torch.cat(out) if out else torch.zeros((0, dim), device=device)
    return distributed.gather_rows(local, n, dist)


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

    The engine (``cdmix.engine``) seeds each epoch, sets the learning rate (``set_lr``), calls
    ``train_epoch``, evaluates, checkpoints ``state_dict`` and writes the run's outputs. It never
    knows which method runs: whatever differs between methods it asks through the hooks below, each
    of which has the image classifier's default. A method that is no classifier (SimCLR
    pretraining: one net, encoder + projection head) overrides them:

    - ``evaluation_row(sets) -> dict[str, float]``: the evaluation columns of an epoch's metrics row
      (default: ``test_acc``, per-net, top-5, extra test sets, ``val_acc`` from ``predict_logits``).
      SimCLR returns e.g. ``{"knn_acc": ...}`` of a kNN monitor on ``sets``.
    - ``selection_key(sets) -> str | None``: the column of ``evaluation_row`` that picks the best
      epoch (best.pt, ``selected_epoch``) and that the collapse guard watches (default ``val_acc``
      with a validation set, else ``test_acc``); None: no best-epoch selection (best = latest) and no
      collapse guard.
    - ``selected_set_column``: the metrics column with the size of the selected (clean) set, whose
      halving the collapse guard reports (None: nothing to watch).
    - ``console_fields(row) -> list[str]``: the method's fields of the per-epoch console line
      (default: the training loss and, where known, the selection's ROC-AUC).
    - ``epoch_phase(epoch) -> str | None``: which phase a 0-based epoch belongs to, for the time-left
      estimate (epochs of one phase cost about the same); None: not known yet.
    - ``decided_settings() -> dict``: config fields the method decided while training (the
      automatic warm-up's length); the engine records them in config.json and places the lr step.
    - ``from_scratch_min_images`` (class attribute): the pre-flight check warns when the method trains
      from scratch on fewer training images than this (0: never).
    - ``summary_info() -> dict``: method facts for summary.json.
    - ``write_artifacts(outputs)``: the end-of-run files; ``outputs`` is the engine's
      ``engine.artifacts.RunOutputs`` (run folder, data, ``write_file``). Default:
      ``outputs.write_classifier_outputs()`` (label_issues.csv, pred_probs.npy, clean_prob.npy,
      division.npz, the exported nets, and the scores and model of the ``RunResult``). SimCLR writes
      its encoder and kNN scores with ``outputs.write_file`` instead.
    - ``end_of_run_text(summary) -> list[str] | None``: the lines the CLI prints when training ends;
      None (default): the classifier's lines (test accuracy, label issues, report).
    """

    name = "base"
    num_nets = 1
    swa = None  # a method with stochastic weight averaging sets an ``averaging.SWA``
    selected_set_column: str | None = None
    from_scratch_min_images = 0
    has_warmup = False  # whether ``config.warmup`` means anything to this method (the start line)

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

    # ----- hooks the engine calls (see the class docstring); the classifier's defaults
    def evaluation_row(self, sets: EvalSets) -> dict[str, float]:
        """Test (and validation) accuracy of the ensemble (``cdmix.ensemble``) and of each net, in percent."""
        bs = sets.batch_size
        logits = self.predict_logits(sets.test_images, bs)
        ensemble = ensemble_logits(logits)
        row = {"test_acc": accuracy(ensemble, sets.test_labels)}
        if len(logits) > 1:
            for i, net_logits in enumerate(logits, start=1):
                row[f"test_acc_net{i}"] = accuracy(net_logits, sets.test_labels)
        if sets.top5:
            row["test_top5"] = top_k_accuracy(ensemble, sets.test_labels)
        for name, (images, labels) in sets.extra_tests.items():
            ensemble = ensemble_logits(self.predict_logits(images, bs))
            row[f"test_acc_{name}"] = accuracy(ensemble, labels)
            if sets.top5:
                row[f"test_top5_{name}"] = top_k_accuracy(ensemble, labels)
        if sets.val_images is not None:
            row["val_acc"] = accuracy(ensemble_logits(self.predict_logits(sets.val_images, bs)), sets.val_labels)
        return row

    def selection_key(self, sets: EvalSets) -> str | None:
        """The ``evaluation_row`` column that selects the best epoch and that the collapse guard watches."""
        return "val_acc" if sets.val_images is not None else "test_acc"

    def console_fields(self, row: dict) -> list[str]:
        """This method's fields of the per-epoch console line."""
        parts = [f"loss {row['train_loss']:.3f}"] if "train_loss" in row else []
        if "sel_auc_net1" in row and row["sel_auc_net1"] == row["sel_auc_net1"]:
            parts.append(f"sel-AUC {row['sel_auc_net1']:.3f}")
        return parts

    def epoch_phase(self, epoch: int) -> str | None:
        """The phase of a 0-based epoch for the time-left estimate: one phase by default."""
        return "train"

    def decided_settings(self) -> dict:
        """Config fields decided while training, to be recorded in config.json; none by default."""
        return {}

    def summary_info(self) -> dict:
        """Method facts for summary.json (e.g. how long the warm-up was); none by default."""
        return {}

    def write_artifacts(self, outputs) -> None:
        """The end-of-run files (``outputs``: ``cdmix.engine.artifacts.RunOutputs``)."""
        outputs.write_classifier_outputs()

    def end_of_run_text(self, summary: dict) -> list[str] | None:
        """Lines for the end of training; None: the CLI's classifier lines."""
        return None

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

