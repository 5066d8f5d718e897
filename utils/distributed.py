"""Process-group setup for torchrun (environment variables), ``torch.distributed.launch``
(``--local-rank`` argument) and SLURM's ``srun`` (one task per GPU, no torchrun), NCCL on GPUs and gloo
on the CPU, plus small collective helpers that are no-ops in a single process."""
import contextlib
import datetime
import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import ConfigError, OutputError, SATError, echoed, first_line, output_error, user_message
from utils.host_memory import keep_freed_memory

# MASTER_PORT under srun: SLURM_PORT_BASE + (job id + SLURM_STEP_PORT_STRIDE * step id) % SLURM_PORT_RANGE, so that
# two steps of one job on a node (training and an evaluation) differ, below Linux's ephemeral ports (32768-)
SLURM_PORT_BASE = 10000
SLURM_PORT_RANGE = 20000
SLURM_STEP_PORT_STRIDE = 7919
# How long srun's tasks wait for each other to join (torch's default, 30 minutes, left a job whose tasks did not
# all start silent for that long)
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)


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


def select_device(device="auto", local_rank=0, local_processes=1, per_node_flag="--nproc_per_node"):
    """``auto``: this process's GPU when CUDA is available, else the CPU. ``local_processes``: the
    processes on this node (torchrun's LOCAL_WORLD_SIZE), each of which needs its own visible GPU;
    ``per_node_flag``: the launcher's flag for their number, for the error. The process keeps the host memory it
    frees for its next tensors, whatever the device (utils.host_memory)."""
    keep_freed_memory()
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but CUDA is not available; use --device cpu")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    visible, needed = torch.cuda.device_count(), max(local_processes, local_rank + 1)
    if needed > visible:
        raise ConfigError(f"device {device}: {needed} processes on this node but {visible} visible GPU(s) "
                          f"(local rank {local_rank}); launch at most {visible} ({per_node_flag} {visible}) "
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


def _slurm_integer(environ, key):
    try:
        return int(environ[key])
    except ValueError:
        raise ConfigError(f"SLURM: {key}={environ[key]!r}, expected an integer") from None


def tasks_on_node(tasks_per_node, node_id):
    """The number of tasks on node ``node_id`` of a SLURM tasks-per-node list (``4(x2),3``: 4, 4, 3), or None
    when it cannot be read."""
    counts = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def slurm_environment(environ):
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for a
    process started by ``srun``, or {} when this is not an srun task (no step id: the batch script or an salloc
    shell, where SLURM_PROCID / SLURM_NTASKS describe the job, not a process of several) or a launcher
    (torchrun) already set WORLD_SIZE. MASTER_ADDR / MASTER_PORT already in the environment are kept; otherwise
    the first host of the step's node list and a port derived from the job and step ids (the same in every
    task of the step)."""
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return {}
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))
    if step is None:
        return {}
    world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    rank, world_size = _slurm_integer(environ, "SLURM_PROCID"), _slurm_integer(environ, world_key)
    if not 0 <= rank < world_size:
        raise ConfigError(f"SLURM: SLURM_PROCID={rank} is not a rank of {world_size} tasks ({world_key})")
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size),
           "LOCAL_RANK": str(_slurm_integer(environ, "SLURM_LOCALID")) if "SLURM_LOCALID" in environ else "0"}
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE"))
    node = _slurm_integer(environ, "SLURM_NODEID") if environ.get("SLURM_NODEID") else 0
    local = tasks_on_node(per_node, node) if per_node else None
    if local:  # the CPUs of a node are shared by its tasks (cpu_share), as under torchrun
        env["LOCAL_WORLD_SIZE"] = str(local)
    if world_size == 1:
        return env
    nodelist = next((environ[key] for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                     if environ.get(key)), None)
    if "MASTER_ADDR" not in environ and nodelist is None:
        raise ConfigError("SLURM: SLURM_NTASKS > 1 but no SLURM_JOB_NODELIST / SLURM_NODELIST to find the "
                          "master host; set MASTER_ADDR")
    env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or first_host(nodelist)
    job_key = "SLURM_JOB_ID" if environ.get("SLURM_JOB_ID") else "SLURM_JOBID"
    job_id = _slurm_integer(environ, job_key) if environ.get(job_key) else 0
    step_id = int(step) if step.isdigit() else 0
    env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(
        SLURM_PORT_BASE + (job_id + SLURM_STEP_PORT_STRIDE * step_id) % SLURM_PORT_RANGE)
    return env


def _not_met(info, host, port, why):
    return ConfigError(f"SLURM: the {info.world_size} tasks did not all meet at {host}:{port} within "
                       f"{RENDEZVOUS_TIMEOUT.total_seconds():.0f} s (this is rank {info.rank}): did srun start them "
                       f"all? ({why})")


def _wait_for_master(info, host, port):
    """Wait until rank 0's store accepts connections, RENDEZVOUS_TIMEOUT at most (torch's client retries past
    its timeout, without a word, when rank 0 never starts)."""
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT.total_seconds()
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise _not_met(info, host, port, f"rank 0's store at {host}:{port} never answered: "
                                                 f"{err.strerror or err}") from None
            time.sleep(1)


def _srun_store(info):
    """The TCP store through which srun's tasks find each other, with RENDEZVOUS_TIMEOUT: a ConfigError naming
    what to check when they do not all arrive in time, or the port is taken. Its keys are the job step's (a
    task that reached another job's store on the same port waits for its own peers, not theirs)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if not info.is_main:
        _wait_for_master(info, host, port)
    try:
        store = dist.TCPStore(host, port, info.world_size, is_master=info.is_main, timeout=RENDEZVOUS_TIMEOUT,
                              wait_for_workers=True)
    except (RuntimeError, dist.DistError) as err:
        if "EADDRINUSE" in str(err) or "address already in use" in str(err).lower():
            raise ConfigError(f"SLURM: port {port} on {host} is in use (another job step?): set MASTER_PORT to a "
                              "free port") from None
        raise _not_met(info, host, port, first_line(err)) from None
    step = "{}.{}".format(os.environ.get("SLURM_JOB_ID", os.environ.get("SLURM_JOBID", "")),
                          os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID", "")))
    return dist.PrefixStore(f"sat-slurm-{step}", store)


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
        gpu, local_processes = 0, 1  # srun --gpus-per-task=1 / --gpu-bind: each task sees only its own GPU
    info = DistInfo(int(os.environ["RANK"]), world_size, local_rank,
                    select_device(device, gpu, local_processes, "--ntasks-per-node" if slurm else "--nproc_per_node"))
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    device_id = info.device if backend == "nccl" else None
    if not slurm:
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=world_size,
                                device_id=device_id)
        return info
    info.launcher = "srun ({} SLURM tasks, master {MASTER_ADDR}:{MASTER_PORT})".format(world_size, **os.environ)
    if "OMP_NUM_THREADS" not in os.environ:  # torch's threads: this task's share of the node's CPUs, not all
        torch.set_num_threads(cpu_share())
    store = _srun_store(info)
    try:
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=world_size, device_id=device_id)
    except (RuntimeError, dist.DistError) as err:  # rank 0 gave up waiting for the others: each task says so
        raise _not_met(info, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"],
                       f"rank 0 stopped waiting: {first_line(err)}") from None
    return info


# What gloo says when a peer process is gone (NCCL raises DistBackendError)
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def lost_peer(err):
    """Whether ``err``, met in a collective operation, says that another process of the job is gone."""
    return isinstance(err, dist.DistBackendError) or (isinstance(err, RuntimeError) and
                                                      any(text in str(err) for text in PEER_LOST))


def cpu_share():
    """The CPUs of this process: those it may run on, shared by the node's processes (LOCAL_WORLD_SIZE); at least
    SLURM's CPUs per task where they fit (srun binds each task to its own CPUs: none to share)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit():
        share = max(share, min(cpus, int(per_task)))
    return max(1, share)


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
    the first process that met it (the others' are echoes), instead of once per process; its warnings (each
    process meets the same ones: the same data, the same file) are said by the first process alone. Collective."""
    result, failure = None, None
    try:
        with _warnings_of_rank_0():
            result = fn(*args, **kwargs)
    except SATError as err:
        failure = (type(err), user_message(err))
    raise_first(all_gather_object(failure))
    return result


@contextlib.contextmanager
def _warnings_of_rank_0():
    """Drop the 'sat' logger's records below ERROR on the processes other than the first (rank 0 says them)."""
    if not _active() or dist.get_rank() == 0:
        yield
        return
    sat = logging.getLogger("sat")
    keep = lambda record: record.levelno >= logging.ERROR  # noqa: E731
    sat.addFilter(keep)
    try:
        yield
    finally:
        sat.removeFilter(keep)


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


def check_agreement(values, what, hint, kind=ConfigError):
    """Every process's ``values`` ({name: value}) equal to the main process's, else ``kind`` on every process (said
    by the main one): ``the processes of the job differ in <what>: <name> <value> on rank 0 but <value> on rank N;
    <hint>``. Processes started with other flags (another node's command line, data root) otherwise train with
    mismatched collectives: a crash whose message blames a dead peer, a hang, or, for a setting no collective
    depends on (lr), silently different models in one job. Collective."""
    from utils.config import show_value  # (utils.config imports this module)

    gathered = all_gather_object(values)
    differences = [f"{key} {show_value(gathered[0].get(key))} on rank 0 but {show_value(other.get(key))} on rank {rank}"
                   for rank, other in enumerate(gathered[1:], 1)
                   for key in dict.fromkeys([*gathered[0], *other]) if other.get(key) != gathered[0].get(key)]
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        error = kind(f"the processes of the job differ in {what}: {shown}; {hint}")
        raise error if not _active() or dist.get_rank() == 0 else echoed(error)


def all_gather_object(obj):
    """List of ``obj`` from every process, in rank order."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

