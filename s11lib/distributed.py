"""Data-parallel training over several processes and machines, as torchrun launches them.

    torchrun --standalone --nproc-per-node 2 -m s11lib.run --data-dir data --out-dir runs/ddp

One training script, any number of processes (nanoGPT's habit): `s11lib.run.run` reads the
variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); without them it is the
single-process run it always was. With them:

* Each process (a "rank") drives one device: cuda:LOCAL_RANK over nccl, or the CPU over gloo.
* `batch_size` stays the global batch. Every rank draws the shuffle and the augmentation
  parameters of the whole global batch from the same seeded generators and keeps its own slice
  (`DeviceLoader.sharded`), so N ranks see exactly the images and augmentations of one. The model
  has no cross-sample statistics (LayerNorm, no BatchNorm), so DistributedDataParallel's averaged
  gradient is the one-process gradient up to the order of additions (tests/test_distributed.py).
* The metrics are summed over the ranks before anyone reads them (`sum_over_ranks`):
  ReduceLROnPlateau steps on the same value everywhere, so every rank keeps the same rate.
* Each machine's local rank 0 reads the data first (and downloads it if asked), then its other
  ranks (`local_main_first`).
* Rank 0 alone reads and writes out_dir. A resumed run's state reaches the other ranks by
  broadcast, not through the file system (`on_main`), so no rank ever reads a file that another is
  writing, and several machines need no shared disk. An error that rank 0 finds there (a foreign
  checkpoint, a locked out_dir) is raised on every rank, so all stop together.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist

from s11lib.device import resolve_device

T = TypeVar("T")
ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Ranks:
    """Which of how many processes this one is, over all machines (rank) and on its own (local)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reads and writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Ranks":
        """The ranks torchrun put in the environment; one process of one when it set none."""
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, world, local_rank, local_world = (int(env[name]) for name in ENV_NAMES)
        except (KeyError, ValueError):
            found = ", ".join(f"{name}={env.get(name)!r}" for name in ENV_NAMES)
            raise ValueError(f"a data-parallel launch needs the integers {', '.join(ENV_NAMES)} in the environment, "
                             f"found {found}; launch with torchrun, which sets them") from None
        if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
            raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, "
                             f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world}")
        return cls(rank, world, local_rank, local_world)

    def part(self, length: int) -> slice:
        """This rank's share of `length` items: contiguous, the shares differing by at most one."""
        return slice(length * self.rank // self.world_size, length * (self.rank + 1) // self.world_size)


def rank_device(name: str, ranks: Ranks) -> torch.device:
    """The device of this rank for the `device` setting `name`: the GPU of its LOCAL_RANK, or the CPU."""
    device = resolve_device(name)
    if device.type != "cuda" or not ranks.distributed:
        return device
    if device.index is not None and device.index != ranks.local_rank:
        raise ValueError(f"device={name!r} names one GPU, but under torchrun each process takes the GPU of its "
                         "LOCAL_RANK; pass device='auto' or 'cuda'")
    count = torch.cuda.device_count()
    if ranks.local_world_size > count:
        raise ValueError(f"torchrun started {ranks.local_world_size} processes on this machine but it has {count} "
                         f"CUDA GPU(s); pass --nproc-per-node {count} or fewer (or device='cpu')")
    return resolve_device(f"cuda:{ranks.local_rank}")


@contextlib.contextmanager
def launch(device_name: str, batch_size: int, env: Mapping[str, str] = os.environ) \
        -> Iterator[tuple[Ranks, torch.device]]:
    """This process's ranks and device, inside the process group of a torchrun launch.

    Without torchrun (or with one process in all) no group is made. A bad launch is a ValueError
    before the group starts, raised alike on every rank: a global batch that does not split evenly,
    more processes on a machine than it has GPUs.
    """
    ranks = Ranks.from_env(env)
    if not ranks.distributed:
        yield ranks, resolve_device(device_name)
        return
    if batch_size % ranks.world_size:
        raise ValueError(f"batch_size={batch_size} does not split evenly over the {ranks.world_size} processes of "
                         f"this torchrun launch; pass a multiple of {ranks.world_size} (it is the global batch)")
    device = rank_device(device_name, ranks)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # broadcast_object_list and barriers use the current device
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield ranks, device
        # Leave together: a rank that tore down its connections while rank 0 still explained the
        # run killed itself with SIGABRT about one time in ten (gloo, torch 2.14).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def local_main_first(ranks: Ranks) -> Iterator[None]:
    """Run the block on each machine's local rank 0 first, then on its other ranks: a download into
    data_dir happens once per machine, and the others read what it unpacked. (If the block fails on
    a local rank 0, the others wait until torchrun stops them as that rank exits.)"""
    if not ranks.distributed:
        yield
        return
    if ranks.local_rank != 0:
        dist.barrier()
    yield
    if ranks.local_rank == 0:
        dist.barrier()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place, and return it (no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def on_main(ranks: Ranks, work: Callable[[], T]) -> T:
    """`work()` on rank 0, and its result on every rank; if it raises, every rank raises it.

    For what only rank 0 may do (read or write out_dir) but all must know the outcome of. The
    result travels by pickle from rank 0's own process (broadcast_object_list), on the current
    device.
    """
    if not ranks.distributed:
        return work()
    box: list = [None]
    error = None
    if ranks.is_main:
        try:
            box[0] = (True, work())
        except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, or they wait forever
            error = e
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if error is not None:
        raise error  # rank 0: the original, with its traceback
    if not ok:
        raise value
    return value
