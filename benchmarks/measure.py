"""Measuring tools of the speed benchmark (``bench.py``): the clock, per-phase timing, the recorder of
every forward call of the nets and their replay on random batches (pure model compute), first-call
priming, peak memory, forward FLOPs and a description of the machine.

Nothing here knows cdmix's methods or the reference pipeline; ``bench.py`` composes them.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_CLOCK: Callable[[], float] = time.perf_counter


def clock() -> float:
    """The benchmark's clock: wall time (default) or, with --clock cpu, this thread's CPU time."""
    return _CLOCK()



def set_clock(kind: str) -> None:
    """``"wall"``: wall time (default); ``"cpu"``: this thread's CPU time (load-independent, one thread only)."""
    global _CLOCK
    _CLOCK = time.thread_time if kind == "cpu" else time.perf_counter

def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Call:
    phase: str
    net: int
    shape: tuple[int, ...]
    channels_last: bool
    training: bool
    grad: bool
    inference: bool
    wrapped: bool = False  # called through the method's training wrapper (compiled net), not the bare net


class CallRecorder:
    """Records every top-level forward of ``nets`` (forward pre-hooks), tagged with the current phase.

    ``wrappers[i]``, when it is a different module from ``nets[i]`` (a compiled net), is hooked too
    and its calls are recorded once, as ``wrapped`` calls (the bare net's hook stays quiet inside).
    """

    def __init__(self, nets: list[torch.nn.Module], wrappers: list[torch.nn.Module] | None = None):
        self.phase = "setup"
        self.calls: list[Call] = []
        self.enabled = True
        self.inside = 0
        self.handles = [net.register_forward_pre_hook(self._hook(i, False)) for i, net in enumerate(nets)]
        for i, wrapper in enumerate(wrappers or []):
            if wrapper is not nets[i]:
                self.handles.append(wrapper.register_forward_pre_hook(self._hook(i, True)))
                self.handles.append(wrapper.register_forward_hook(self._leave))

    def _leave(self, module, args, output):
        self.inside -= 1

    def _hook(self, index: int, wrapped: bool):
        def pre(module, args):
            if wrapped:
                self.inside += 1
            elif self.inside:
                return
            if not self.enabled or not args:
                return
            x = args[0]
            self.calls.append(Call(self.phase, index, tuple(x.shape),
                                   x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                                   and not x.is_contiguous(),
                                   module.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                                   wrapped))
        return pre

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class PhaseTimer:
    """Accumulates synchronised wall time per phase and tells the recorder which phase runs."""

    def __init__(self, device: torch.device, recorder: CallRecorder | None = None):
        self.device = device
        self.recorder = recorder
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        sync(self.device)
        if self.recorder is not None:
            self.recorder.phase = name
        t0 = clock()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + clock() - t0
            if self.recorder is not None:
                self.recorder.phase = "other"


def phase_stats(calls: list[Call], flops_per_image: int) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {}
    for c in calls:
        s = stats.setdefault(c.phase, {"forwards": 0, "grad_steps": 0, "images": 0, "flops": 0.0})
        s["forwards"] += 1
        s["grad_steps"] += int(c.grad)
        s["images"] += c.shape[0]
        s["flops"] += c.shape[0] * flops_per_image * (3 if c.grad else 1)
    return stats


def replay(calls: list[Call], nets: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer],
           amp: Callable[[], Any], device: torch.device, num_classes: int,
           per_kind: int | None = None, wrappers: list[torch.nn.Module] | None = None) -> dict[str, float]:
    """Model compute alone: the recorded forwards (a backward + optimizer step after each grad
    forward) on pre-built random batches of the recorded shapes. Returns seconds per phase.

    Nets run in the recorded train/eval and grad/no-grad/inference modes. ``per_kind=None`` replays
    every call in order; ``per_kind=k`` times at most k calls of each distinct kind (net, shape,
    modes) per phase and scales that time to the kind's count in the epoch (same count and shapes,
    a fraction of the cost).
    """
    pool: dict[tuple, torch.Tensor] = {}
    targets: dict[int, torch.Tensor] = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for c in calls:
        key = (c.shape, c.channels_last)
        if key not in pool:
            x = torch.randn(c.shape, generator=gen).to(device)
            pool[key] = x.contiguous(memory_format=torch.channels_last) if c.channels_last else x
        if c.grad and c.shape[0] not in targets:
            targets[c.shape[0]] = torch.softmax(torch.randn(c.shape[0], num_classes, generator=gen), 1).to(device)

    def run(c: Call) -> None:
        net = wrappers[c.net] if c.wrapped and wrappers is not None else nets[c.net]
        if net.training != c.training:
            net.train(c.training)
        x = pool[(c.shape, c.channels_last)]
        if c.inference:
            with torch.inference_mode(), amp():
                net(x)
        elif not c.grad:
            with torch.no_grad(), amp():
                net(x)
        else:
            with amp():
                logits = net(x)
            loss = F.cross_entropy(logits.float(), targets[c.shape[0]])
            optimizers[c.net].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[c.net].step()

    was_training = [net.training for net in nets]
    seconds: dict[str, float] = {}
    order: list[str] = []
    for c in calls:
        if c.phase not in order:
            order.append(c.phase)
    for phase in order:
        phase_calls = [c for c in calls if c.phase == phase]
        if per_kind is None:
            sync(device)
            t0 = clock()
            for c in phase_calls:
                run(c)
            sync(device)
            seconds[phase] = clock() - t0
            continue
        kinds: dict[tuple, list[Call]] = {}
        for c in phase_calls:
            kinds.setdefault((c.net, c.shape, c.channels_last, c.training, c.grad, c.inference, c.wrapped),
                             []).append(c)
        total = 0.0
        for group in kinds.values():
            timed = group[:per_kind]
            sync(device)
            t0 = clock()
            for c in timed:
                run(c)
            sync(device)
            total += (clock() - t0) * len(group) / len(timed)
        seconds[phase] = total
    for net, mode in zip(nets, was_training):
        net.train(mode)
    return seconds


def prime(nets: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer], shapes: list[tuple],
          amp: Callable[[], Any], device: torch.device, channels_last: bool,
          wrappers: list[torch.nn.Module] | None = None) -> float:
    """Untimed first calls (CUDA context, cuDNN autotuning, compilation) for the main shapes.

    Train-mode calls go through ``wrappers`` (the method's training modules) when given. Weights,
    BN statistics and optimizer state are restored afterwards. Returns seconds spent.
    """
    t0 = time.perf_counter()
    saved = [copy.deepcopy(net.state_dict()) for net in nets]
    modes = [net.training for net in nets]
    for i, net in enumerate(nets):
        trained = wrappers[i] if wrappers is not None else net
        for shape in shapes:
            x = torch.randn(shape, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            trained.train()
            with amp():
                trained(x).float().sum().backward()
            with torch.no_grad(), amp():
                trained(x)
            net.eval()
            with torch.inference_mode(), amp():
                net(x)
            with torch.no_grad(), amp():
                net(x)
        net.zero_grad(set_to_none=True)
    for net, state, mode in zip(nets, saved, modes):
        net.load_state_dict(state)
        net.train(mode)
    del optimizers  # untouched: no step was taken
    sync(device)
    return time.perf_counter() - t0


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory so far: CUDA allocator peak (MiB) on CUDA; process max RSS (MiB) on CPU."""
    if device.type == "cuda":
        return {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"max_rss_mib": self_rss, "children_max_rss_mib": children}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def snapshot(nets: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> tuple[list, list]:
    return ([copy.deepcopy(n.state_dict()) for n in nets], [copy.deepcopy(o.state_dict()) for o in optimizers])


def restore(nets: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer], state: tuple[list, list]) -> None:
    for net, sd in zip(nets, state[0]):
        net.load_state_dict(sd)
    for opt, sd in zip(optimizers, state[1]):
        opt.load_state_dict(sd)


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def count_flops(model: torch.nn.Module, input_shape: tuple[int, ...] | list[int] | torch.Size) -> int:
    """Forward FLOPs of ``model`` for ONE example, as ``torch.utils.flop_counter.FlopCounterMode`` counts
    them: 2 x the multiply-accumulates of convolutions and matrix products (linear layers included);
    biases, normalisation, activations and pooling are not counted.

    ``input_shape`` is ``(C, H, W)`` or ``(N, C, H, W)``; a leading batch size is ignored: one zero
    example of the given ``C x H x W`` runs through the model in eval mode without grad (its train/eval
    mode is restored). Example: preact_resnet18 at 32x32 -> about 1.11e9 FLOPs (0.557e9 MACs).
    """
    from torch.utils.flop_counter import FlopCounterMode

    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
