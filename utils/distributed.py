"""Process-group setup for torchrun (environment variables) and ``torch.distributed.launch``
(``--local-rank`` argument), NCCL on GPUs and gloo on the CPU, plus small collective helpers that
are no-ops in a single process."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def select_device(device="auto", local_rank=0):
    """``auto``: this process's GPU when CUDA is available, else the CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but CUDA is not available; use --device cpu")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device="auto", local_rank_arg=None):
    """Join the process group when launched with WORLD_SIZE > 1; return the DistInfo of this process.

    RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from the launcher's environment; the local rank
    from LOCAL_RANK or, with ``torch.distributed.launch``, from its ``--local-rank`` argument.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    if world_size == 1:
        return DistInfo(local_rank=local_rank, device=select_device(device, local_rank))
    if "RANK" not in os.environ:
        raise ConfigError("WORLD_SIZE is set but RANK is not: launch with torchrun or torch.distributed.launch")
    info = DistInfo(int(os.environ["RANK"]), world_size, local_rank, select_device(device, local_rank))
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=world_size,
                            device_id=info.device if backend == "nccl" else None)
    return info


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if _active():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum of ``tensor`` over all processes (in place; returned for chaining)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj):
    """List of ``obj`` from every process, in rank order."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

