"""torch.distributed under torchrun: process group, rank helpers, sharded evaluation.

Launch with ``torchrun --nproc_per_node=N -m cdmix train ...``. Without torchrun (no WORLD_SIZE in
the environment, or WORLD_SIZE=1) every helper here is the single-process identity.

Each rank keeps the whole dataset on its device and takes its slice of every global batch; the
global batch is ``world_size x --batch-size``. Per-sample passes (losses for the division, test
accuracy, train predictions) are computed shard-wise and all-gathered, so every rank fits the same
GMM on all N samples and makes the same division.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and world size as torchrun sets them (single process when absent)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str) -> tuple[DistInfo, str]:
    """Join the process group when launched by torchrun; returns (info, this rank's device).

    Backend: nccl on CUDA, gloo on CPU. ``device`` is the resolved config device ("cpu" or "cuda").
    """
    info = env_info()
    if not info.enabled:
        return info, device
    if not info.is_main:  # warnings once, from rank 0
        logging.getLogger("cdmix").setLevel(logging.ERROR)
    if device.startswith("cuda"):
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return info, device


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env_info().local_rank)
    return DistInfo()


def shard_range(n: int, info: DistInfo) -> tuple[int, int]:
    """Contiguous block [start, stop) of 0..n-1 for this rank (blocks of ceil(n / world))."""
    size = -(-n // info.world_size)
    start = min(n, info.rank * size)
    return start, min(n, start + size)


def gather_rows(local: torch.Tensor, n: int, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's block (from ``shard_range``) into the full n-row tensor."""
    if not info.enabled:
        return local
    size = -(-n // info.world_size)
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat(parts)[:n]


class _GatherPadded(torch.autograd.Function):
    """all_gather of equal-size (padded) blocks whose backward hands each rank the sum over ranks of
    the gradient of its own block (SimCLR's GatherLayer): every rank's loss reaches every block."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, padded.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def all_gather_with_grad(local: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, int]:
    """Every rank's rows of ``local`` concatenated in rank order (sizes may differ by rank), and
    the row where this rank's own rows start. Gradients flow back to each rank's rows from every
    rank's use of them (summed), so under DDP's gradient mean a loss computed from the gathered
    rows trains as the single-process loss would. Single process: ``(local, 0)``."""
    if not info.enabled:
        return local, 0
    size = torch.tensor([len(local)], device=local.device)
    sizes = [torch.empty_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = torch.cat([local, local.new_zeros((max(counts) - len(local), *local.shape[1:]))])
    stacked = _GatherPadded.apply(padded)
    rows = torch.cat([stacked[r, :counts[r]] for r in range(info.world_size)])
    return rows, sum(counts[:info.rank])


def local_slice(global_idx: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's part of a global batch of indices (near-equal pieces, in rank order)."""
    if not info.enabled:
        return global_idx
    return global_idx.tensor_split(info.world_size)[info.rank]


def broadcast_object(value, info: DistInfo):
    """Rank 0's value on every rank (e.g. the run folder name)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(net: torch.nn.Module, info: DistInfo, device: str) -> torch.nn.Module:
    """The module used for training forwards: DDP under torchrun, the net itself otherwise."""
    if not info.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(net, device_ids=device_ids)


def convert_sync_bn(net: torch.nn.Module, info: DistInfo, sync_bn: bool) -> torch.nn.Module:
    if info.enabled and sync_bn:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
