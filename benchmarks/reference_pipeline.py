"""A DivideMix pipeline built the way the official code (LiJunnan1992/DivideMix) runs it.

This is the yardstick ``bench.py`` (``cdmix bench``) measures cdmix against, in the same process,
on the same model and for the same number of steps. It copies the *structure* of the official
``dataloader_cifar.py`` / ``Train_cifar.py`` (not its code), because that structure is where the
official run spends its time:

* the training set lives in a pickle on disk and is **re-read every time a loader is built**, and
  loaders are rebuilt every epoch (test, eval_train, warm-up, and labeled + unlabeled per net);
* a per-sample ``torch.utils.data.Dataset``: every ``__getitem__`` pads, crops, flips, converts and
  normalises **one image** on the CPU (numpy + small torch ops; the official code does the same
  with PIL + torchvision, which is not used here), batches are collated by the ``DataLoader``
  (``num_workers`` worker processes, started afresh on every pass as in the official code, which
  uses 5) and copied to the device per step;
* fp32 everywhere, default memory format, ``cudnn.benchmark = True`` (as the official script);
* ``eval_train``: eval-mode forwards with the *training* batch size and a per-sample Python loop
  that copies every loss into a CPU tensor (one device->host copy per sample on a GPU), then the
  two-component GMM;
* the MixMatch step with six separate no-grad forwards (net on u1, u2, partner on u1, u2, net on
  x1, x2), CPU-built one-hot labels and CPU ``randperm``, ``.item()`` for logging every step.

Nothing here is imported by the cdmix package itself: ``bench.py`` loads this file by path.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

PAD = 4  # RandomCrop(32, padding=4)


# ------------------------------------------------------------------------------------------------
# per-sample transforms (what RandomCrop + RandomHorizontalFlip + ToTensor + Normalize do)
# ------------------------------------------------------------------------------------------------


def crop_flip_normalise(img: np.ndarray, top: int, left: int, flip: bool, pad: int,
                        mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One H x W x C uint8 image -> C x H x W float32: zero-pad, crop at (top, left), flip, normalise.

    ``top`` / ``left`` index the padded image (0 .. 2*pad); ``pad = 0`` with (0, 0) is no crop.
    """
    h, w = img.shape[:2]
    if pad > 0:
        padded = np.zeros((h + 2 * pad, w + 2 * pad) + img.shape[2:], dtype=img.dtype)
        padded[pad:pad + h, pad:pad + w] = img
    else:
        padded = img
    crop = padded[top:top + h, left:left + w]
    if flip:
        crop = crop[:, ::-1]
    return to_tensor_normalise(crop, mean, std)


def to_tensor_normalise(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """ToTensor (HWC uint8 -> CHW float in [0, 1]) then Normalize ((x - mean) / std), one image."""
    if img.ndim == 2:
        img = img[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous().float().div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


class TrainTransform:
    """Random crop (zero padding ``pad``) + random horizontal flip + normalise, one image per call.

    Draws like torchvision: ``torch.randint`` for each offset, ``torch.rand(1) < 0.5`` for the flip,
    from the process's global torch RNG (each DataLoader worker seeds its own).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], pad: int = PAD):
        self.mean, self.std, self.pad = tuple(mean), tuple(std), pad

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        span = 2 * self.pad + 1
        top = int(torch.randint(0, span, (1,)).item())
        left = int(torch.randint(0, span, (1,)).item())
        flip = bool(torch.rand(1) < 0.5)
        return crop_flip_normalise(img, top, left, flip, self.pad, self.mean, self.std)


class TestTransform:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        return to_tensor_normalise(img, self.mean, self.std)


# ------------------------------------------------------------------------------------------------
# data on disk, re-read per loader (as the official cifar_dataset does)
# ------------------------------------------------------------------------------------------------


class PickleStore:
    """The training / test arrays as CIFAR-style pickles (rows of C*H*W bytes) plus a JSON noise file."""

    def __init__(self, folder: str | Path, train_images: np.ndarray, noisy_labels: np.ndarray,
                 test_images: np.ndarray, test_labels: np.ndarray):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.image_shape = tuple(train_images.shape[1:])  # H, W, C
        self._write("train", train_images, None)
        self._write("test", test_images, test_labels)
        with open(self.folder / "noise.json", "w") as fh:
            json.dump([int(v) for v in noisy_labels], fh)

    def _write(self, name: str, images: np.ndarray, labels: np.ndarray | None) -> None:
        rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))
        record = {"data": rows, "labels": None if labels is None else [int(v) for v in labels]}
        with open(self.folder / name, "wb") as fh:
            pickle.dump(record, fh, protocol=pickle.HIGHEST_PROTOCOL)

    def _read(self, name: str) -> tuple[np.ndarray, list | None]:
        with open(self.folder / name, "rb") as fh:
            record = pickle.load(fh)
        h, w, c = self.image_shape
        images = record["data"].reshape((-1, c, h, w)).transpose((0, 2, 3, 1))
        return images, record["labels"]

    def train(self) -> tuple[np.ndarray, list[int]]:
        images, _ = self._read("train")
        with open(self.folder / "noise.json") as fh:
            return images, json.load(fh)

    def test(self) -> tuple[np.ndarray, list[int]]:
        images, labels = self._read("test")
        return images, labels


class PerSampleDataset(Dataset):
    """The official ``cifar_dataset``: modes all | labeled | unlabeled | test, one image per item."""

    def __init__(self, store: PickleStore, mode: str, transform: Callable[[np.ndarray], torch.Tensor],
                 pred: np.ndarray | None = None, probability: np.ndarray | None = None):
        self.mode = mode
        self.transform = transform
        if mode == "test":
            self.data, self.labels = store.test()
            return
        data, labels = store.train()
        if mode == "all":
            self.data, self.labels = data, labels
        elif mode == "labeled":
            pred_idx = np.asarray(pred).nonzero()[0]
            self.probability = [probability[i] for i in pred_idx]
            self.data = data[pred_idx]
            self.labels = [labels[i] for i in pred_idx]
        elif mode == "unlabeled":
            pred_idx = (1 - np.asarray(pred, dtype=np.int64)).nonzero()[0]
            self.data = data[pred_idx]
            self.labels = [labels[i] for i in pred_idx]
        else:
            raise ValueError(f"unknown mode {mode!r}")

    def __getitem__(self, index: int):
        img = self.data[index]
        if self.mode == "labeled":
            return self.transform(img), self.transform(img), self.labels[index], self.probability[index]
        if self.mode == "unlabeled":
            return self.transform(img), self.transform(img)
        if self.mode == "all":
            return self.transform(img), self.labels[index], index
        return self.transform(img), self.labels[index]

    def __len__(self) -> int:
        return len(self.data)


class Loaders:
    """The official ``cifar_dataloader.run``: a fresh Dataset (pickle re-read) and DataLoader per call."""

    def __init__(self, store: PickleStore, batch_size: int, num_workers: int,
                 mean: Sequence[float], std: Sequence[float]):
        self.store = store
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform_train = TrainTransform(mean, std)
        self.transform_test = TestTransform(mean, std)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        extra = {}
        if self.num_workers > 0:
            import multiprocessing

            # The official code relies on Linux's default "fork"; keep it where it exists (this file
            # is loaded by path, so workers started with "spawn"/"forkserver" could not import it).
            if "fork" in multiprocessing.get_all_start_methods():
                extra["multiprocessing_context"] = "fork"
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers, **extra)

    def run(self, mode: str, pred: np.ndarray | None = None, prob: np.ndarray | None = None):
        bs = self.batch_size
        if mode == "warmup":
            return self._loader(PerSampleDataset(self.store, "all", self.transform_train), bs * 2, True)
        if mode == "train":
            labeled = PerSampleDataset(self.store, "labeled", self.transform_train, pred, prob)
            unlabeled = PerSampleDataset(self.store, "unlabeled", self.transform_train, pred)
            return self._loader(labeled, bs, True), self._loader(unlabeled, bs, True)
        if mode == "test":
            return self._loader(PerSampleDataset(self.store, "test", self.transform_test), bs, False)
        if mode == "eval_train":
            return self._loader(PerSampleDataset(self.store, "all", self.transform_test), bs, False)
        raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------------------------------------
# the official training loop, one epoch at a time
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ReferenceResult:
    seconds: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    labeled: dict[str, int] = field(default_factory=dict)
    test_acc: float = float("nan")


class ReferenceDivideMix:
    """Two nets trained like ``Train_cifar.py``; ``phase_hook(name)`` is told when each phase starts."""

    def __init__(self, store: PickleStore, num_classes: int, build_model: Callable[[], torch.nn.Module],
                 device: str | torch.device, batch_size: int = 64, num_workers: int = 5,
                 mean: Sequence[float] = (0.4914, 0.4822, 0.4465), std: Sequence[float] = (0.2023, 0.1994, 0.2010),
                 lr: float = 0.02, alpha: float = 4.0, lambda_u: float = 25.0, p_threshold: float = 0.5,
                 temperature: float = 0.5, warm_up: int = 1, rampup: int = 16, seed: int = 0,
                 phase_hook: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.alpha, self.lambda_u, self.p_threshold, self.T = alpha, lambda_u, p_threshold, temperature
        self.warm_up, self.rampup, self.seed = warm_up, rampup, seed
        self.loader = Loaders(store, batch_size, num_workers, mean, std)
        self.net1 = build_model().to(self.device)
        self.net2 = build_model().to(self.device)
        self.opt1 = torch.optim.SGD(self.net1.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.opt2 = torch.optim.SGD(self.net2.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.all_loss: list[list[torch.Tensor]] = [[], []]
        self.phase_hook = phase_hook or (lambda name: None)
        self.clock = clock
        self.log = open(os.devnull, "w")  # the official script writes a progress line every step
        self.np_rng = np.random.RandomState(seed)
        self.probs: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def nets(self) -> list[torch.nn.Module]:
        return [self.net1, self.net2]

    def close(self) -> None:
        self.log.close()

    # ----- the official functions
    def warmup(self, net, optimizer, dataloader, max_steps: int | None) -> int:
        net.train()
        steps = 0
        for batch_idx, (inputs, labels, _path) in enumerate(dataloader):
            if max_steps is not None and batch_idx >= max_steps:
                break
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = F.cross_entropy(outputs, labels)
            loss.backward()
            optimizer.step()
            self.log.write(f"\rIter[{batch_idx + 1}]\t CE-loss: {loss.item():.4f}")
            steps += 1
        return steps

    def eval_train(self, model, all_loss: list[torch.Tensor], eval_loader) -> np.ndarray:
        from sklearn.mixture import GaussianMixture

        model.eval()
        losses = torch.zeros(len(eval_loader.dataset))
        with torch.no_grad():
            for inputs, targets, index in eval_loader:
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                outputs = model(inputs)
                loss = F.cross_entropy(outputs, targets, reduction="none")
                for b in range(inputs.size(0)):
                    losses[index[b]] = loss[b]
        losses = (losses - losses.min()) / (losses.max() - losses.min())
        all_loss.append(losses)
        input_loss = losses.reshape(-1, 1)
        gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=self.seed)
        gmm.fit(input_loss)
        prob = gmm.predict_proba(input_loss)
        return prob[:, gmm.means_.argmin()]

    def train(self, epoch: int, net, net2, optimizer, labeled_loader, unlabeled_loader,
              max_steps: int | None) -> int:
        net.train()
        net2.eval()
        bs_cfg = self.batch_size
        has_u = len(unlabeled_loader.dataset) > 0
        unlabeled_iter = iter(unlabeled_loader) if has_u else None
        num_iter = len(labeled_loader.dataset) // bs_cfg + 1
        steps = 0
        for batch_idx, (inputs_x, inputs_x2, labels_x, w_x) in enumerate(labeled_loader):
            if max_steps is not None and batch_idx >= max_steps:
                break
            if has_u:
                try:
                    inputs_u, inputs_u2 = next(unlabeled_iter)
                except StopIteration:
                    unlabeled_iter = iter(unlabeled_loader)
                    inputs_u, inputs_u2 = next(unlabeled_iter)
            batch_size = inputs_x.size(0)
            labels_x = torch.zeros(batch_size, self.num_classes).scatter_(1, labels_x.view(-1, 1), 1)
            w_x = w_x.view(-1, 1).type(torch.FloatTensor)
            inputs_x, inputs_x2 = inputs_x.to(self.device), inputs_x2.to(self.device)
            labels_x, w_x = labels_x.to(self.device), w_x.to(self.device)
            with torch.no_grad():
                if has_u:
                    inputs_u, inputs_u2 = inputs_u.to(self.device), inputs_u2.to(self.device)
                    outputs_u11 = net(inputs_u)
                    outputs_u12 = net(inputs_u2)
                    outputs_u21 = net2(inputs_u)
                    outputs_u22 = net2(inputs_u2)
                    pu = (torch.softmax(outputs_u11, dim=1) + torch.softmax(outputs_u12, dim=1)
                          + torch.softmax(outputs_u21, dim=1) + torch.softmax(outputs_u22, dim=1)) / 4
                    ptu = pu ** (1 / self.T)
                    targets_u = (ptu / ptu.sum(dim=1, keepdim=True)).detach()
                outputs_x = net(inputs_x)
                outputs_x2 = net(inputs_x2)
                px = (torch.softmax(outputs_x, dim=1) + torch.softmax(outputs_x2, dim=1)) / 2
                px = w_x * labels_x + (1 - w_x) * px
                ptx = px ** (1 / self.T)
                targets_x = (ptx / ptx.sum(dim=1, keepdim=True)).detach()
            lam = self.np_rng.beta(self.alpha, self.alpha)
            lam = max(lam, 1 - lam)
            if has_u:
                all_inputs = torch.cat([inputs_x, inputs_x2, inputs_u, inputs_u2], dim=0)
                all_targets = torch.cat([targets_x, targets_x, targets_u, targets_u], dim=0)
            else:
                all_inputs = torch.cat([inputs_x, inputs_x2], dim=0)
                all_targets = torch.cat([targets_x, targets_x], dim=0)
            idx = torch.randperm(all_inputs.size(0))
            input_a, input_b = all_inputs, all_inputs[idx]
            target_a, target_b = all_targets, all_targets[idx]
            mixed_input = lam * input_a + (1 - lam) * input_b
            mixed_target = lam * target_a + (1 - lam) * target_b
            logits = net(mixed_input)
            logits_x, logits_u = logits[:batch_size * 2], logits[batch_size * 2:]
            lx = -torch.mean(torch.sum(F.log_softmax(logits_x, dim=1) * mixed_target[:batch_size * 2], dim=1))
            if has_u:
                lu = torch.mean((torch.softmax(logits_u, dim=1) - mixed_target[batch_size * 2:]) ** 2)
            else:
                lu = torch.zeros((), device=self.device)
            current = epoch + batch_idx / num_iter
            lamb = self.lambda_u * float(np.clip((current - self.warm_up) / self.rampup, 0.0, 1.0))
            prior = torch.ones(self.num_classes) / self.num_classes
            prior = prior.to(self.device)
            pred_mean = torch.softmax(logits, dim=1).mean(0)
            penalty = torch.sum(prior * torch.log(prior / pred_mean))
            loss = lx + lamb * lu + penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.log.write(f"\rIter[{batch_idx + 1}/{num_iter}]\t Labeled loss: {lx.item():.2f}  "
                           f"Unlabeled loss: {lu.item():.2f}")
            steps += 1
        return steps

    def test(self, test_loader) -> float:
        self.net1.eval()
        self.net2.eval()
        correct = total = 0
        with torch.no_grad():
            for inputs, targets in test_loader:
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                outputs = self.net1(inputs) + self.net2(inputs)
                _, predicted = torch.max(outputs, 1)
                total += targets.size(0)
                correct += predicted.eq(targets).cpu().sum().item()
        return 100.0 * correct / max(total, 1)

    # ----- epochs, timed per phase
    def _begin(self, name: str) -> float:
        _sync(self.device)
        self.phase_hook(name)
        return self.clock()

    def _end(self, result: ReferenceResult, name: str, t0: float) -> None:
        _sync(self.device)
        result.seconds[name] = result.seconds.get(name, 0.0) + self.clock() - t0

    def set_lr(self, lr: float) -> None:
        for opt in (self.opt1, self.opt2):
            for group in opt.param_groups:
                group["lr"] = lr

    def divide_phase(self, result: ReferenceResult) -> tuple[np.ndarray, np.ndarray]:
        """Official co-divide: eval_train of both nets (loss per sample, GMM). Returns (prob1, prob2)."""
        with _cudnn_benchmark(self.device):
            t0 = self._begin("divide")
            eval_loader = self.loader.run("eval_train")
            prob1 = self.eval_train(self.net1, self.all_loss[0], eval_loader)
            prob2 = self.eval_train(self.net2, self.all_loss[1], eval_loader)
            self._end(result, "divide", t0)
        self.probs = (prob1, prob2)
        return prob1, prob2

    def train_phase(self, which: int, epoch: int, result: ReferenceResult, pred: np.ndarray | None = None,
                    max_steps: int | None = None) -> None:
        """Train net ``which`` (1 or 2) on its partner's division: fresh labeled + unlabeled loaders.

        ``pred`` (labeled mask) replaces the partner's own ``prob > p_threshold`` when given.
        """
        name = f"train net{which}"
        net, net2, opt = (self.net1, self.net2, self.opt1) if which == 1 else (self.net2, self.net1, self.opt2)
        prob = self.probs[1] if which == 1 else self.probs[0]  # net1 learns from net2's division
        if pred is None:
            pred = prob > self.p_threshold
        pred = np.asarray(pred, dtype=bool)
        with _cudnn_benchmark(self.device):
            t0 = self._begin(name)
            labeled_loader, unlabeled_loader = self.loader.run("train", pred, prob)
            result.steps[name] = self.train(epoch, net, net2, opt, labeled_loader, unlabeled_loader, max_steps)
            result.labeled[name] = int(pred.sum())
            self._end(result, name, t0)

    def test_phase(self, result: ReferenceResult) -> None:
        with _cudnn_benchmark(self.device):
            t0 = self._begin("test")
            result.test_acc = self.test(self.loader.run("test"))
            self._end(result, "test", t0)

    def dividemix_epoch(self, epoch: int, train_masks: tuple[np.ndarray, np.ndarray] | None = None,
                        max_steps: int | None = None) -> ReferenceResult:
        """One official DivideMix epoch plus its test pass.

        ``train_masks`` (labeled mask used to train net1, then net2) replaces the reference's own
        division for the training loaders, so both pipelines run the same number and shapes of
        steps; the per-sample losses and GMMs are still computed (and timed) the official way.
        """
        result = ReferenceResult()
        self.divide_phase(result)
        for which in (1, 2):
            self.train_phase(which, epoch, result, None if train_masks is None else train_masks[which - 1],
                             max_steps)
        self.test_phase(result)
        return result

    def warmup_epoch(self, max_steps: int | None = None, result: ReferenceResult | None = None) -> ReferenceResult:
        """Official warm-up epoch: rebuild the per-epoch loaders, CE on both nets (batch 2B)."""
        result = ReferenceResult() if result is None else result
        with _cudnn_benchmark(self.device):
            t0 = self._begin("warm-up epoch")
            self.loader.run("test")  # built every epoch by the official loop
            self.loader.run("eval_train")
            warmup_loader = self.loader.run("warmup")
            steps = self.warmup(self.net1, self.opt1, warmup_loader, max_steps)
            steps += self.warmup(self.net2, self.opt2, warmup_loader, max_steps)
            self._end(result, "warm-up epoch", t0)
        result.steps["warm-up epoch"] = steps
        return result


class _cudnn_benchmark:
    """``cudnn.benchmark = True`` (official) for the duration of a block, restored afterwards."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self.saved = torch.backends.cudnn.benchmark
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark = self.saved
        return False


# ------------------------------------------------------------------------------------------------
# data path alone
# ------------------------------------------------------------------------------------------------


def data_path_images_per_second(store: PickleStore, batch_size: int, num_workers: int,
                                mean: Sequence[float], std: Sequence[float], device: str | torch.device,
                                max_images: int | None = None,
                                clock: Callable[[], float] = time.perf_counter) -> tuple[float, int, float]:
    """Augmented images per second of the official path: labeled-mode loader (two views per sample),
    collated by the DataLoader and copied to ``device``. Returns (images/s, images, seconds).

    Only the iteration is timed (worker start-up included, as every official epoch pays it); the
    Dataset construction (pickle re-read) is not.
    """
    device = torch.device(device)
    loaders = Loaders(store, batch_size, num_workers, mean, std)
    images, labels = store.train()
    n = len(labels) if max_images is None else min(len(labels), max_images)
    pred = np.zeros(len(labels), dtype=bool)
    pred[:n] = True
    dataset = PerSampleDataset(store, "labeled", loaders.transform_train, pred, np.ones(len(labels)))
    loader = loaders._loader(dataset, batch_size, True)
    count = 0
    _sync(device)
    t0 = clock()
    for x1, x2, _labels, _w in loader:
        x1, x2 = x1.to(device), x2.to(device)
        count += x1.shape[0] + x2.shape[0]
    _sync(device)
    seconds = clock() - t0
    return count / seconds, count, seconds


def temporary_store(train_images: np.ndarray, noisy_labels: np.ndarray, test_images: np.ndarray,
                    test_labels: np.ndarray) -> tuple[PickleStore, tempfile.TemporaryDirectory]:
    """A PickleStore in a fresh temporary folder; keep the returned TemporaryDirectory alive."""
    tmp = tempfile.TemporaryDirectory(prefix="cdmix-bench-ref-")
    return PickleStore(tmp.name, train_images, noisy_labels, test_images, test_labels), tmp
