"""Data-parallel training under `accelerate launch`: which process this is, the pictures it
owns, and the gradient averaged over all processes. A plain `python -m tinv_gui train` is one
process, and then all of this does nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_with_several_processes() -> bool:
    """True under `accelerate launch --multi_gpu` / torchrun with more than one process. (On CPUs,
    `accelerate launch --cpu` starts a single process unless MPI is set up; use `--multi_gpu`,
    which accelerate runs through torchrun, or torchrun itself: gloo then links the processes.)"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_info() -> ProcessInfo:
    """This process's rank and the number of processes; starts accelerate's process group when
    launched with several processes (gloo on CPUs, NCCL on GPUs, as accelerate chooses)."""
    if not launched_with_several_processes():
        return ProcessInfo(0, 1)
    state = _state()
    return ProcessInfo(state.process_index, state.num_processes)


def _state():
    from accelerate import PartialState

    # accelerate only forms a CPU process group when told the run is on CPUs.
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    return PartialState(cpu=on_cpu)


def device_for_process(default: str) -> str:
    """Each process takes its own GPU (accelerate's choice); on CPUs, the CPU."""
    if not launched_with_several_processes():
        return default
    return str(_state().device)


def shard(items: list, info: ProcessInfo) -> list:
    """This process's share of `items` (every world-th item from its rank), so that processes see
    different pictures. Each process needs at least one."""
    if not info.distributed:
        return items
    if len(items) < info.world:
        raise ValueError(f"{len(items)} pictures cannot be shared among {info.world} processes; give at least {info.world}")
    return items[info.rank :: info.world]


def average_gradient(tensor: torch.Tensor, info: ProcessInfo) -> None:
    """Replace `tensor.grad` by its mean over all processes (in place)."""
    if info.distributed and tensor.grad is not None:
        torch.distributed.all_reduce(tensor.grad, op=torch.distributed.ReduceOp.SUM)
        tensor.grad /= info.world


def average_value(value: float, info: ProcessInfo, device: torch.device | str = "cpu") -> float:
    """The mean of a number over all processes (the loss that is reported)."""
    if not info.distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return float(total) / info.world


def broadcast_from_main(tensor: torch.Tensor, info: ProcessInfo) -> None:
    """Give every process the main process's values of `tensor` (in place)."""
    if info.distributed:
        with torch.no_grad():
            torch.distributed.broadcast(tensor.data, src=0)


def any_process(flag: bool, info: ProcessInfo) -> bool:
    """True on every process when `flag` is true on any (a stop asked of one stops all together)."""
    if not info.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)
