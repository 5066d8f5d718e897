"""Device selection, and the tests that mean CUDA: AMP training steps, NCCL with one torchrun process,
kill-and-resume on a GPU. The CUDA tests skip (with the reason) on a machine without one; the rest
of the suite passes --device cpu wherever it means the CPU."""
import functools
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from DataLoader import build_dataset, build_loader, make_demo_dataset
from DataLoader.eval_loader import build_eval_loader
from DataLoader.eval_views import EvalViews
from Model import build_model, build_model_from_checkpoint
from Model.losses import SATLoss
from utils.amp import LossScaler, autocast_context, describe
from utils.checkpoint import read_checkpoint
from utils.distributed import init_distributed, select_device
from utils.engine import train_one_epoch
from utils.errors import ConfigError
from utils.engine import evaluate
from utils.optim import build_optimizer, build_scheduler

from conftest import REPO_ROOT, rendezvous, start_ranks, wait_for_file
from test_evaluation import save_nano_checkpoint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
TINY = ["--config", str(REPO_ROOT / "config" / "demo.yaml"), "--img-size", "64", "--resize-size", "72",
        "--batch-size", "8", "--eval-batch-size", "12", "--eval-every", "1", "--workers", "0", "--log-every", "1",
        "--warmup-epochs", "0", "--overlays", "0"]


@pytest.fixture
def one_visible_gpu(monkeypatch):
    """Pretend CUDA is available with one GPU; selecting a device index must never reach the driver."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def set_device(index):
        raise AssertionError(f"torch.cuda.set_device({index}) called")
    monkeypatch.setattr(torch.cuda, "set_device", set_device)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_more_processes_than_visible_gpus_is_a_one_line_error(one_visible_gpu, monkeypatch, device):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError) as err:
        init_distributed(device)
    message = str(err.value)
    assert "\n" not in message
    assert "2 processes on this node but 1 visible GPU(s)" in message
    assert "--nproc_per_node 1" in message and "--device cpu" in message
    # rank 0 of the same launch fails the same way instead of waiting for its peer
    with pytest.raises(ConfigError, match="2 processes on this node but 1 visible GPU"):
        select_device(device, local_rank=0, local_processes=2)
    assert select_device("cpu", local_rank=1, local_processes=2) == torch.device("cpu")


def test_cuda_requested_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available; use --device cpu"):
        select_device("cuda")
    assert select_device("auto") == torch.device("cpu")


# ------------------------------------------------------------------------------------ CUDA only
def _train_steps(amp, device="cuda", steps=3, fp16=False):
    """``steps`` training steps of a nano model under ``amp`` (utils.amp), or fp16 autocast + GradScaler
    (the path of GPUs without bf16) with ``fp16``; the stats and how many parameters changed."""
    torch.manual_seed(0)
    model = build_model("deit_sat_nano_patch16_224", num_classes=3, img_size=48).to(device)
    optimizer = build_optimizer(model, 1e-3, 0.05)
    scheduler = build_scheduler(optimizer, schedule="constant", lr=1e-3, min_lr=0, epochs=1, warmup_epochs=0,
                                steps_per_epoch=steps)
    g = torch.Generator().manual_seed(0)
    loader = [{"image": torch.randn(4, 3, 48, 48, generator=g), "label": torch.randint(0, 3, (4,), generator=g),
               "num_skipped": 0} for _ in range(steps)]
    before = [p.detach().clone() for p in model.parameters()]
    loss_scaler = LossScaler(device, amp)
    autocast = autocast_context(device, amp)
    if fp16:
        loss_scaler.scaler = torch.amp.GradScaler(torch.device(device).type)
        autocast = functools.partial(torch.autocast, device_type=torch.device(device).type, dtype=torch.float16)
    stats = train_one_epoch(model, SATLoss(area_thr=0.25), loader, optimizer, torch.device(device), 0, loss_scaler,
                            scheduler=scheduler, autocast=autocast, clip_grad=1.0, progress=False)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return stats, changed


@needs_cuda
def test_amp_training_steps_on_cuda():
    assert describe("cuda", True) == "bf16 autocast"  # every GPU of the bf16 era (Ampere and later)
    stats, changed = _train_steps(True)
    assert stats["steps"] == 3 and stats["images"] == 12 and math.isfinite(stats["loss"])
    assert changed > 0
    # the fp16 + GradScaler path (GPUs without bf16) on any GPU
    stats, changed = _train_steps(True, fp16=True)
    assert stats["steps"] == 3 and math.isfinite(stats["loss"]) and changed > 0


def _nccl_rank(rank, init_method, root, checkpoint, out):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=init_method, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        model, _ = build_model_from_checkpoint(checkpoint)
        loader = build_eval_loader("cub", root, "test", protocol="both", tencrop=False, img_size=64, batch_size=4,
                                   workers=0, distributed=True)
        result = evaluate(loader, model.cuda(), "cuda", threshold=0.4, distributed=True, progress=False)
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@needs_cuda
def test_nccl_one_process(tmp_path):
    """One torchrun process trains on cuda:0; a one-process NCCL group evaluates like no group at all."""
    root = make_demo_dataset(tmp_path / "cub", num_classes=3, train_per_class=4, test_per_class=2, image_size=64)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "train.py", *TINY, "--epochs", "1", "--batch-size", "4", "--device", "cuda",
                           "--data-root", str(root), "--output-dir", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 process(es) on cuda:0" in (out / "log.txt").read_text()

    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    start_ranks(_nccl_rank, (rendezvous(tmp_path), str(root), str(checkpoint), str(tmp_path / "nccl.json")), nprocs=1)
    model, _ = build_model_from_checkpoint(checkpoint)
    loader = build_eval_loader("cub", root, "test", protocol="both", tencrop=False, img_size=64, batch_size=4,
                               workers=0)
    single = evaluate(loader, model.cuda(), "cuda", threshold=0.4, progress=False)
    assert json.loads((tmp_path / "nccl.json").read_text()) == json.loads(json.dumps(single))


# (attention on the math kernel: the fused kernels' backward passes need not be deterministic, and AdamW turns a
# gradient's flipped sign near 0 into a step of the learning rate)
DETERMINISTIC = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                 "torch.backends.cudnn.benchmark = False; torch.backends.cuda.enable_flash_sdp(False); "
                 "torch.backends.cuda.enable_mem_efficient_sdp(False); torch.backends.cuda.enable_cudnn_sdp(False); "
                 "from utils.errors import run_cli; "
                 "from train import main; run_cli(main, sys.argv[1:])")


@needs_cuda
def test_kill_and_resume_on_cuda_within_tolerance(tmp_path):
    """CUDA kernels (atomics in backward passes) need not be bit-reproducible, even with deterministic
    algorithms where they exist (set here, with CUBLAS_WORKSPACE_CONFIG): the resumed run's weights
    must equal the uninterrupted run's within rtol 1e-3, atol 1e-4 (the CPU test demands equality)."""
    root = str(make_demo_dataset(tmp_path / "cub", num_classes=3, train_per_class=8, test_per_class=4,
                                 image_size=64))
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

    def command(out, *extra):
        # 6 epochs: on a GPU an epoch of these tiny steps takes a fraction of a second, which the poll for the
        # first last.pth (under a loaded machine) could miss until the run has ended
        return [sys.executable, "-c", DETERMINISTIC, *TINY, "--epochs", "6", "--device", "cuda", "--data-root", root,
                "--output-dir", str(out), *extra]

    reference = tmp_path / "reference"
    done = subprocess.run(command(reference), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.pth"
    wait_for_file(proc, last)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_checkpoint(last)["epoch"] < 6, "the run ended before it could be killed"
    resumed = subprocess.run(command(out, "--resume"), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (read_checkpoint(path / "checkpoints" / "last.pth") for path in (reference, out))
    assert a["epoch"] == b["epoch"] == 6
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-3, atol=1e-4, msg=key)


@needs_cuda
def test_batches_joined_from_worker_slices_are_pinned_and_equal_on_cuda(tmp_path):
    """With CUDA the loader joins each batch's slices into pinned memory (for non_blocking copies) in its own
    thread, which allocates in the caller's device context; the result equals whole batches."""
    root = make_demo_dataset(tmp_path / "cub", num_classes=2, train_per_class=8, test_per_class=1, image_size=48)
    dataset = build_dataset("cub", root, "train", EvalViews("sat", False, 32, 36).pixels())
    whole, sliced = (list(build_loader(dataset, 8, train=False, workers=2, parts=parts)) for parts in (1, 2))
    assert len(whole) == len(sliced) == 2
    for a, b in zip(whole, sliced):
        assert b["image"]["pixels"].is_pinned() and torch.equal(a["image"]["pixels"], b["image"]["pixels"])
        assert a["index"] == b["index"]
