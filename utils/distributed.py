"""Process-group setup for torchrun (environment variables), ``torch.distributed.launch``
(``--local-rank`` argument) and SLURM's ``srun`` (one task per GPU, no torchrun), NCCL on GPUs and gloo
on the CPU, plus small collective helpers that are no-ops in a single process."""
import contextlib
import itertools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import ConfigError, OutputError, SATError, echoed, output_error, user_message

SLURM_PORT_BASE = 20000  # MASTER_PORT under srun: SLURM_PORT_BASE + job id % SLURM_PORT_RANGE
SLURM_PORT_RANGE = 20000


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: str = ""  # how the processes were started, when not obvious (srun)

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def select_device(device="auto", local_rank=0, local_processes=1):
    """``auto``: this process's GPU when CUDA is available, else the CPU. ``local_processes``: the
    processes on this node (torchrun's LOCAL_WORLD_SIZE), each of which needs its own visible GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but CUDA is not available; use --device cpu")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    visible, needed = torch.cuda.device_count(), max(local_processes, local_rank + 1)
    if needed > visible:
        raise ConfigError(f"device {device}: {needed} processes on this node but {visible} visible GPU(s) "
                          f"(local rank {local_rank}); launch at most {visible} (--nproc_per_node {visible}) "
                          "or use --device cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


# ------------------------------------------------------------------------------------------ SLURM
def expand_nodelist(nodelist):
    """Host names of a SLURM node list, in order: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07
    gpu5 (zero padding kept, several bracket groups in one name expanded left to right)."""
    hosts = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        parts = re.split(r"\[([^\]]*)\]", name)  # literal, ranges, literal, ranges, ..., literal
        choices = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                choices.append([part])
                continue
            values = []
            for item in part.split(","):
                first, _, last = item.partition("-")
                if not first.isdigit() or (last and not last.isdigit()):
                    raise ConfigError(f"SLURM node list {nodelist!r}: cannot read the range {item!r}")
                values += [str(n).zfill(len(first)) for n in range(int(first), int(last or first) + 1)]
            choices.append(values)
        hosts += ["".join(combination) for combination in itertools.product(*choices)]
    return hosts


def first_host(nodelist):
    """The first host of a SLURM node list: ``scontrol show hostnames`` when available, else
    :func:`expand_nodelist`."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ConfigError(f"SLURM node list {nodelist!r} names no host; set MASTER_ADDR")
    return hosts[0]


def slurm_environment(environ):
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for a process
    started by ``srun``, or {} when this is not an srun task or a launcher (torchrun) already set
    WORLD_SIZE. MASTER_ADDR / MASTER_PORT already in the environment are kept; otherwise the first
    host of the step's node list and a port derived from the job id (the same in every task)."""
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return {}
    env = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
           "LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}
    if int(env["WORLD_SIZE"]) == 1:
        return env
    nodelist = next((environ[key] for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                     if environ.get(key)), None)
    if "MASTER_ADDR" not in environ and nodelist is None:
        raise ConfigError("SLURM: SLURM_NTASKS > 1 but no SLURM_JOB_NODELIST / SLURM_NODELIST to find the "
                          "master host; set MASTER_ADDR")
    env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or first_host(nodelist)
    job_id = environ.get("SLURM_JOB_ID", environ.get("SLURM_JOBID", "0"))
    env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(job_id) % SLURM_PORT_RANGE)
    return env


def init_distributed(device="auto", local_rank_arg=None):
    """Join the process group when launched with WORLD_SIZE > 1; return the DistInfo of this process.

    RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from the launcher's environment (torchrun,
    ``torch.distributed.launch``) or, for tasks started by ``srun`` without torchrun, from SLURM's
    (:func:`slurm_environment`); the local rank from LOCAL_RANK or, with ``torch.distributed.launch``,
    from its ``--local-rank`` argument.
    """
    slurm = slurm_environment(os.environ)
    os.environ.update(slurm)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world_size == 1:
        return DistInfo(local_rank=local_rank, device=select_device(device, local_rank, local_processes))
    if "RANK" not in os.environ:
        raise ConfigError("WORLD_SIZE is set but RANK is not: launch with torchrun or torch.distributed.launch")
    gpu = local_rank
    if slurm and torch.cuda.is_available() and torch.cuda.device_count() == 1:
        gpu = 0  # srun --gpus-per-task=1 / --gpu-bind: each task sees only its own GPU
    info = DistInfo(int(os.environ["RANK"]), world_size, local_rank, select_device(device, gpu, local_processes))
    if slurm:
        info.launcher = "srun ({} SLURM tasks, master {MASTER_ADDR}:{MASTER_PORT})".format(world_size, **os.environ)
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=world_size,
                            device_id=info.device if backend == "nccl" else None)
    return info


def cpu_share():
    """The CPUs of this process: those it may run on, shared by the node's processes (LOCAL_WORLD_SIZE)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


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


def all_reduce_max(tensor):
    """Element-wise maximum of ``tensor`` over all processes (in place; returned for chaining)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def run_on_main(is_main, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the main process only (the files only it writes); returns its result there,
    None elsewhere. Its failure, a SATError or an OSError (a full disk: an OutputError line), is raised on
    every process, so that none goes on into a collective that the stopped main process never joins (a hang
    under NCCL). Collective."""
    result, failure, bug = None, None, None
    if is_main:
        try:
            result = fn(*args, **kwargs)
        except SATError as err:
            failure = (type(err), user_message(err))
        except OSError as err:
            failure = (OutputError, str(output_error(err)))
        except Exception as err:  # a bug: the main process shows its traceback, the others stop with one line
            bug, failure = err, (SATError, f"the main process failed: {type(err).__name__}: {err}")
    failures = all_gather_object(failure)  # only the main process's can be set
    if bug is not None:
        raise bug
    raise_first(failures)
    return result


def run_everywhere(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on every process, for work that holds no collective operation (building datasets,
    loading a checkpoint): its SATError is raised on every process once all have run it, printed and logged by
    the first process that met it (the others' are echoes), instead of once per process. Collective."""
    result, failure = None, None
    try:
        result = fn(*args, **kwargs)
    except SATError as err:
        failure = (type(err), user_message(err))
    raise_first(all_gather_object(failure))
    return result


@contextlib.contextmanager
def said_by_main(is_main):
    """For an error every process meets alike (from the same flags, or from what the main process found and
    shared): the main process says it, the others' are echoes (utils.errors.SATError.echo)."""
    try:
        yield
    except SATError as err:
        raise err if is_main else echoed(err)


def raise_first(failures, kind=None):
    """After ``all_gather_object`` of each process's failure (a message, or (type, message); None for none):
    raise the first process's on every process (``kind``: the type of plain messages), marked as an echo
    (utils.errors.echoed) on the others; nothing when none failed."""
    origin = next((rank for rank, failure in enumerate(failures) if failure), None)
    if origin is None:
        return
    error = kind(failures[origin]) if kind else failures[origin][0](failures[origin][1])
    raise error if origin == (dist.get_rank() if _active() else 0) else echoed(error)


def all_gather_object(obj):
    """List of ``obj`` from every process, in rank order."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

