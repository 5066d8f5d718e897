"""DDP on the CPU: train_ImageNet.py with 2 gloo processes under torchrun, torch.distributed.launch and as
SLURM srun tasks, on a tiny generated ILSVRC2012 layout (train/<wnid>/, flat val/ + LOC_val_solution.csv)."""
import datetime
import json
import os
import random
import signal
import socket
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from DataLoader.demo import CLASS_TEMPLATES, render_image
from utils.checkpoint import read_checkpoint
from utils import distributed
from utils.distributed import (SLURM_PORT_BASE, SLURM_PORT_RANGE, expand_nodelist, init_distributed,
                               slurm_environment, tasks_on_node)
from utils.errors import ConfigError

from conftest import REPO_ROOT, free_port, wait_for_file

WNIDS = ["n01440764", "n01443537", "n02102040"]
RUN = ["--config", str(REPO_ROOT / "config" / "demo.yaml"), "--img-size", "64", "--resize-size", "72",
       "--batch-size", "8", "--eval-batch-size", "4", "--epochs", "1", "--workers", "0", "--log-every", "1",
       "--warmup-epochs", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """3 classes x 8 train images, 2 val images per class with their boxes in LOC_val_solution.csv."""
    root = tmp_path_factory.mktemp("data") / "ILSVRC2012"
    templates = CLASS_TEMPLATES[:len(WNIDS)]
    rows = ["ImageId,PredictionString"]
    for label, (wnid, template) in enumerate(zip(WNIDS, templates)):
        (root / "train" / wnid).mkdir(parents=True)
        for k in range(8):
            pixels, _ = render_image(np.random.default_rng([label, k]), template, 64)
            Image.fromarray(pixels).save(root / "train" / wnid / f"{wnid}_{k}.JPEG")
        for k in range(2):
            pixels, box = render_image(np.random.default_rng([label, 100 + k]), template, 64)
            name = f"ILSVRC2012_val_{label * 2 + k + 1:08d}"
            (root / "val").mkdir(exist_ok=True)
            Image.fromarray(pixels).save(root / "val" / f"{name}.JPEG")
            rows.append(f"{name},{wnid} {' '.join(map(str, box))}")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root



def launch(launcher, imagenet_root, out, *extra, timeout=240):
    """Run a launcher command; on timeout kill its whole process group (the workers too)."""
    proc = subprocess.Popen([sys.executable, "-m", *launcher, "train_ImageNet.py", *RUN, "--data-root",
                             str(imagenet_root), "--output-dir", str(out), *extra], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return proc.returncode, stdout, stderr


def check_run(out, returncode, stdout, stderr, epochs=1, train_images=24):
    assert returncode == 0, stdout[-2000:] + stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "2 process(es) on cpu, global batch 8 = 4 per process x 1 accumulation steps" in log
    assert "data imagenet at" in log and "the ImageNet scripts read the ImageNet layout" in log
    assert "model selection on the test split (ILSVRC2012's val/, " in log  # the test split is ImageNet's val/
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, epochs + 1))
    record = json.loads(lines[-1])
    assert record["train_images"] == train_images and record["train_steps"] == 3  # global counts, both processes
    last = read_checkpoint(out / "checkpoints" / "last.pth")
    assert last["epoch"] == epochs and len(last["rng_states"]) == 2 and last["class_names"] == WNIDS
    assert not any(key.startswith("module.") for key in last["model"])
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 6  # each val image counted once over the two shards


def test_legacy_launch_overwrite_then_torchrun_resume(imagenet_root, tmp_path):
    """A run under torch.distributed.launch (which passes --local-rank) with --overwrite over a previous run's
    folder (every process must agree that there is a run to delete, whichever looks first), then in the same
    folder under torchrun --resume for one more epoch."""
    out, torchrun = tmp_path / "run", ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    legacy = ["torch.distributed.launch", "--nproc_per_node", "2", "--master_port", str(free_port())]
    (out / "checkpoints").mkdir(parents=True)  # a previous run, all gone with the overwrite
    for name in ("checkpoints/last.pth", "checkpoints/best.pth", "results.json", "log.txt"):
        (out / name).write_text("a line of the previous run\n")
    (out / "metrics.jsonl").write_text('{"epoch": 7}\n')
    check_run(out, *launch(legacy, imagenet_root, out, "--overwrite"))
    assert "a line of the previous run" not in (out / "log.txt").read_text()
    check_run(out, *launch(torchrun, imagenet_root, out, "--resume", "--epochs", "2"), epochs=2)


def test_single_process_without_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu", local_rank_arg=None)
    assert (info.rank, info.world_size, info.distributed, info.is_main, info.device.type) == (0, 1, False, True, "cpu")


def test_local_rank_argument_when_the_environment_lacks_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert init_distributed("cpu", local_rank_arg=3).local_rank == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert init_distributed("cpu", local_rank_arg=3).local_rank == 1


# ------------------------------------------------------------------------------------------ SLURM
def free_slurm_port():
    """A free port that a SLURM job id maps to (SLURM_PORT_BASE + job id % SLURM_PORT_RANGE in step 0)."""
    for port in random.Random().sample(range(SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_RANGE), 100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in the SLURM port range")


def test_slurm_node_lists_expand_as_scontrol_show_hostnames():
    assert expand_nodelist("node07") == ["node07"]
    assert expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_nodelist("gpu-a[9-11],cpu5") == ["gpu-a9", "gpu-a10", "gpu-a11", "cpu5"]
    assert expand_nodelist("r[1-2]-n[08-09]") == ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]
    with pytest.raises(ConfigError, match="node list 'n\\[a-b\\]'"):
        expand_nodelist("n[a-b]")


def test_slurm_environment_and_torchrun_precedence():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "node[03-04]", "SLURM_STEP_ID": "0", "SLURM_NODEID": "1",
             "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    assert slurm_environment(slurm) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                        "MASTER_ADDR": "node03", "MASTER_PORT": "13456"}  # 10000 + 123456 % 20000
    # another step of the job (an evaluation beside the training) gets another port
    assert slurm_environment({**slurm, "SLURM_STEP_ID": "1"})["MASTER_PORT"] == str(10000 + (123456 + 7919) % 20000)
    # the step's node list and task count first; MASTER_ADDR / MASTER_PORT already set are kept
    assert slurm_environment({**slurm, "SLURM_STEP_NODELIST": "gpu[2-3]"})["MASTER_ADDR"] == "gpu2"
    assert slurm_environment({**slurm, "SLURM_STEP_NUM_TASKS": "6"})["WORLD_SIZE"] == "6"
    kept = slurm_environment({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (kept["MASTER_ADDR"], kept["MASTER_PORT"]) == ("head", "1234")
    # torchrun started inside an srun task: its variables win; the batch script or an salloc shell (no step:
    # SLURM_PROCID / SLURM_NTASKS there describe the job): one process, where it waited 30 minutes for 8
    assert slurm_environment({**slurm, "WORLD_SIZE": "16", "RANK": "3"}) == {}
    assert slurm_environment({key: v for key, v in slurm.items() if key != "SLURM_STEP_ID"}) == {}
    assert slurm_environment({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "node1"}) == {}
    assert slurm_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEPID": "0"}) == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with pytest.raises(ConfigError, match=r"^SLURM: SLURM_NTASKS='two', expected an integer$"):
        slurm_environment({**slurm, "SLURM_NTASKS": "two"})
    with pytest.raises(ConfigError, match=r"^SLURM: SLURM_PROCID=8 is not a rank of 8 tasks \(SLURM_NTASKS\)$"):
        slurm_environment({**slurm, "SLURM_PROCID": "8"})
    assert [tasks_on_node("4(x2),3", node) for node in range(4)] == [4, 4, 3, None]
    assert tasks_on_node("odd", 0) is None


def test_srun_tasks_that_do_not_all_start_stop_with_one_line(monkeypatch):
    """A task that never starts (SLURM_NTASKS 2, one process): the other waits RENDEZVOUS_TIMEOUT, then says
    what to check, instead of torch's 30 minutes in silence; a port in use is said as such."""
    port = free_slurm_port()
    monkeypatch.setattr(distributed, "RENDEZVOUS_TIMEOUT", datetime.timedelta(seconds=1))
    launch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0",
              "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port)}
    with mock.patch.dict(os.environ, launch):  # the environment init_distributed writes is restored after
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
            os.environ.pop(key, None)
        with pytest.raises(ConfigError) as err:
            init_distributed("cpu")
        assert str(err.value).startswith(f"SLURM: the 2 tasks did not all meet at localhost:{port} within 1 s "
                                         "(this is rank 0): did srun start them all?")
        assert not torch.distributed.is_initialized()
    with mock.patch.dict(os.environ, {**launch, "SLURM_PROCID": "1"}):  # rank 0 never started: said in time too
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
            os.environ.pop(key, None)
        with pytest.raises(ConfigError) as err:
            init_distributed("cpu")
        assert str(err.value).startswith(f"SLURM: the 2 tasks did not all meet at localhost:{port} within 1 s "
                                         "(this is rank 1): did srun start them all? (rank 0's store at "
                                         f"localhost:{port} never answered: ")
    with mock.patch.dict(os.environ, launch), socket.socket() as taken:  # another step on the port
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
            os.environ.pop(key, None)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        os.environ["MASTER_PORT"] = str(taken.getsockname()[1])
        with pytest.raises(ConfigError, match=f"^SLURM: port {taken.getsockname()[1]} on localhost is in use "
                                              r"\(another job step\?\): set MASTER_PORT to a free port$"):
            init_distributed("cpu")


@pytest.mark.parametrize("affinity, tasks, per_task, share", [
    (32, "4", None, 8),  # torchrun's 4 processes on 32 CPUs
    (8, "4", "8", 8),  # srun binds each task to its own 8 CPUs: nothing to share (it gave 2)
    (32, "4", "8", 8),  # unbound: a quarter of the node
    (32, "4", "16", 16),  # --cpus-per-task above a quarter: what SLURM gives
])
def test_cpu_share(monkeypatch, affinity, tasks, per_task, share):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", tasks)
    if per_task is None:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    else:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", per_task)
    assert distributed.cpu_share() == share


def start_srun_tasks(imagenet_root, out, *extra):
    """Two train_ImageNet.py processes with the variables srun gives its tasks (no WORLD_SIZE / MASTER_*), and
    the port their job id maps to."""
    port = free_slurm_port()
    env = {key: value for key, value in os.environ.items()  # (no OMP_NUM_THREADS: each task takes its cpu_share)
           if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
           and not key.startswith("SLURM_")}
    job_id = port - SLURM_PORT_BASE + 7 * SLURM_PORT_RANGE  # a job id whose derived port is free
    env.update(SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job_id), SLURM_STEP_ID="0",
               SLURM_STEP_TASKS_PER_NODE="2")
    procs = [subprocess.Popen([sys.executable, "train_ImageNet.py", *RUN, "--device", "cpu", "--data-root",
                               str(imagenet_root), "--output-dir", str(out), *extra], cwd=REPO_ROOT, text=True,
                              env=dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
             for rank in range(2)]
    return procs, port


def finish(procs, timeout=240):
    """(stdout, stderr) of each process; all are killed if one outlives ``timeout``."""
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            outputs.append(proc.communicate())
    return outputs


def test_srun_tasks_form_one_job_and_each_process_writes_its_warnings_into_the_log(imagenet_root, tmp_path):
    """Two processes with the variables srun gives its tasks: one gloo job. Unreadable training images are
    skipped by the process whose batch holds them: the other process's lines reach log.txt too, marked [rank 1]
    (only its terminal had them, so the error of a process that stopped a job alone was missing from the log)."""
    import shutil
    root = tmp_path / "ILSVRC2012"
    shutil.copytree(imagenet_root, root)
    bad = sorted((root / "train").rglob("*_1.JPEG"))  # one image of each class: never a whole batch of 4
    for path in bad:
        path.write_bytes(path.read_bytes()[:200])
    out = tmp_path / "run"
    procs, port = start_srun_tasks(root, out)
    outputs = finish(procs)
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    check_run(out, 0, *outputs[0], train_images=24 - len(bad))
    log = (out / "log.txt").read_text()
    assert f"processes started by srun (2 SLURM tasks, master localhost:{port})" in log
    rank1 = [line for line in log.splitlines() if line.startswith("[rank 1] ")]
    assert rank1 and all(" WARNING epoch 1: skipping unreadable image " in line for line in rank1), rank1
    assert log.count("3 unreadable training images skipped") == 1  # a global count: said once
    named = [str(path) for path in bad if str(path) in log]
    assert len(named) == len(bad)  # every skipped image is in the log, whichever process read it


def test_a_process_killed_leaves_the_other_one_line_and_the_resume_command(imagenet_root, tmp_path):
    """SIGKILL of one task (a node failure, the OOM killer): the other stops at its next collective with one line
    naming what happened, what is saved and the resume command (it printed gloo's traceback)."""
    out = tmp_path / "run"
    procs, _ = start_srun_tasks(imagenet_root, out, "--epochs", "40")
    wait_for_file(procs[1], out / "checkpoints" / "last.pth")
    procs[1].send_signal(signal.SIGKILL)
    (_, stderr), _ = finish(procs, timeout=120)
    assert procs[0].returncode == 2, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: another process of the job ended (killed, out of memory or its node failed: its "
                           "own output says why; here: "), line
    assert ") in epoch " in line, line
    assert f"; {out / 'checkpoints' / 'last.pth'} holds " in line
    assert "; resume with: the same launcher (srun) with train_ImageNet.py --config " in line
    assert line.endswith(f" --output-dir {out} --epochs 40 --resume"), line
    assert line[len("error: "):] in (out / "log.txt").read_text()


def test_processes_share_the_data_check_and_stop_alike_on_a_broken_test_image(imagenet_root, tmp_path):
    """Each process checks its share of the evaluation images; a broken one stops both before training, the
    error said once (by the main process), whichever process read the file."""
    import shutil
    root = tmp_path / "ILSVRC2012"
    shutil.copytree(imagenet_root, root)
    broken = sorted((root / "val").glob("*.JPEG"))[1]  # the second: in process 1's share
    broken.write_bytes(broken.read_bytes()[:200])
    out = tmp_path / "run"
    procs, _ = start_srun_tasks(root, out)
    outputs = finish(procs)
    assert [proc.returncode for proc in procs] == [2, 2], outputs[0][1][-3000:]
    main_error = [line for line in outputs[0][1].splitlines() if line.startswith("error: ")]
    assert len(main_error) == 1 and main_error[0].startswith(f"error: test split: 1 bad image of 6: {broken} (")
    assert "error: " not in outputs[1][1] and "Traceback" not in outputs[0][1] + outputs[1][1]
    assert not (out / "checkpoints").exists()


def test_an_error_every_process_meets_alike_is_said_by_the_main_one():
    from utils.distributed import said_by_main
    from utils.errors import ConfigError
    for is_main in (True, False):
        with pytest.raises(ConfigError) as err:
            with said_by_main(is_main):
                raise ConfigError("batch_size 33 (global, per optimizer step) must be a multiple of processes")
        assert err.value.echo is not is_main  # run_cli prints an echo's line only where it is not one
