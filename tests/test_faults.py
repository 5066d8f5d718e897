"""Faults that must lose nothing: a start that fails under --overwrite, an evaluation that fails after an epoch's
training, a kill or a full disk while a checkpoint is written, a truncated last.pth on --resume; each error one
line on the terminal and in log.txt."""
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from utils.checkpoint import read_checkpoint, save_checkpoint
from utils.errors import ConfigError, run_cli
from utils.outputs import FolderLock
from evaluator import main as eval_main
from tools.check_dataset import main as check_main

import test_train
from test_evaluation import save_nano_checkpoint
from conftest import REPO_ROOT, folder_locked_by, refused_for_lock
from test_train import args, epochs_logged

data_root = test_train.data_root  # the tiny dataset fixture


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory):
    """A finished one-epoch run (checkpoints, metrics, results, TensorBoard, log); tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(args(data_root, out, "--epochs", "1"))
    return out


def copy_run(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


def files(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def split_images(root, split):
    """The image files of a CUB-layout dataset's 'train' or 'test' split."""
    is_train = dict(line.split() for line in (root / "train_test_split.txt").read_text().splitlines())
    return [root / "images" / path for image_id, path in
            (line.split() for line in (root / "images.txt").read_text().splitlines())
            if is_train[image_id] == ("1" if split == "train" else "0")]


def error_line(err, exit_info):
    """The one error line in ``err`` (stderr, beside progress bars) of a script that stopped with exit status 2."""
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert exit_info.value.code == 2 and len(lines) == 1 and err.endswith(lines[0] + "\n"), err
    assert "Traceback" not in err and "weights_only" not in err
    return lines[0]


def test_overwrite_that_cannot_start_leaves_the_old_run_intact(data_root, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    before = files(out)
    assert {"checkpoints/last.pth", "checkpoints/best.pth", "results.json", "log.txt"} <= set(before)
    assert any(name.startswith("tensorboard/") for name in before)
    # fails with the data (fewer than one batch)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, out, "--epochs", "1", "--overwrite", "--images-per-class", "2",
                                 "--drop-last"))
    assert "(--images-per-class 2), fewer than one batch" in error_line(capsys.readouterr().err, exit_info)
    assert files(out) == before  # nothing deleted, nothing appended to the old run's log
    # fails in the first batch, once data and model are built: every training image cut short, --strict-data
    broken = shutil.copytree(data_root, tmp_path / "broken")
    for image in split_images(broken, "train"):
        image.write_bytes(image.read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(str(broken), out, "--epochs", "1", "--overwrite", "--strict-data"))
    captured = capsys.readouterr()
    assert error_line(captured.err, exit_info).startswith(f"error: unreadable image {broken / 'images'}")
    assert "model deit_sat_nano_patch16_224" in captured.out  # data and model were built
    assert files(out) == before


def test_a_failed_start_is_not_a_previous_run(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.txt").write_text("12:00:00 ERROR error: the start that failed\n")
    (out / "config.yaml").write_text("epochs: 1\n")
    (out / "metrics.jsonl").write_text("")
    train.main(args(data_root, out, "--epochs", "1"))  # no --overwrite needed
    assert epochs_logged(out) == [1] and (out / "checkpoints" / "last.pth").is_file()
    assert (out / "log.txt").read_text().startswith("12:00:00 ERROR error: the start that failed\n")


def test_evaluation_failing_after_an_epoch_keeps_its_training(data_root, finished_run, tmp_path, capsys, monkeypatch):
    """A test image cut short after the check before training: the evaluation after epoch 1 fails; last.pth
    keeps the epoch's training, and --resume evaluates it again, ending as the uninterrupted run."""
    root = shutil.copytree(data_root, tmp_path / "data")
    test_image = split_images(root, "test")[0]
    good = test_image.read_bytes()
    check_data = train.check_data

    def check_then_cut(*check_args):
        check_data(*check_args)
        test_image.write_bytes(good[:100])  # the file changes under the run

    monkeypatch.setattr(train, "check_data", check_then_cut)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(str(root), out, "--epochs", "1"))
    line = error_line(capsys.readouterr().err, exit_info)
    last = out / "checkpoints" / "last.pth"
    assert line.startswith(f"error: the evaluation after epoch 1 failed: unreadable image {test_image}")
    assert f"the epoch's training is saved in {last} (a resumed run evaluates epoch 1 again): once the data is " \
           "fixed, resume with: python train.py " in line and line.endswith(" --resume")  # the one phrase
    assert line in (out / "log.txt").read_text()
    saved = read_checkpoint(last)
    assert saved["epoch"] == 0 and saved["epoch_stats"]["steps"] == 3 and not (out / "metrics.jsonl").read_text()

    monkeypatch.undo()
    test_image.write_bytes(good)
    train.main(args(str(root), out, "--epochs", "1", "--resume"))
    log = (out / "log.txt").read_text()
    resumed = log.split("resumed from")[1]
    assert resumed.startswith(f" {last}: 0 of 1 epochs done, and the training of epoch 1, whose evaluation runs again")
    assert "epoch 1 step" not in resumed  # not trained again
    assert json.loads((out / "metrics.jsonl").read_text())["train_loss"] == saved["epoch_stats"]["loss"]
    ours, reference = (json.loads((run / "results.json").read_text()) for run in (out, finished_run))
    assert {**ours, "checkpoint": None} == {**reference, "checkpoint": None}
    for name, weights in read_checkpoint(finished_run / "checkpoints" / "last.pth")["model"].items():
        assert torch.equal(read_checkpoint(last)["model"][name], weights), name


KILLED_WRITER = """
import io, sys, time
import torch
from PIL import Image
from utils.checkpoint import save_checkpoint

def half_then_wait(state, f):  # a large write, stopped in the middle
    buffer = io.BytesIO()
    torch_save(state, buffer)
    f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

torch_save, torch.save = torch.save, half_then_wait
save_checkpoint({"model": {"w": torch.full((1 << 20,), 2.0)}, "epoch": 2}, sys.argv[1])
"""


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pth"
    save_checkpoint({"model": {"w": torch.ones(1 << 20)}, "epoch": 1}, path)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    left = [p.name for p in path.parent.iterdir() if p != path]
    assert len(left) == 1 and left[0].startswith(".last.pth.")  # the killed write's temp file
    kept = read_checkpoint(path)
    assert kept["epoch"] == 1 and torch.equal(kept["model"]["w"], torch.ones(1 << 20))
    save_checkpoint({"model": {"w": torch.zeros(4)}, "epoch": 3}, path)  # the next save clears the leftover
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"] and read_checkpoint(path)["epoch"] == 3
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as torch.save makes it (0600: a teammate could not read)
    # a file system that refuses the mode (FAT, exFAT: EPERM): the checkpoint is written all the same
    import utils.outputs
    monkeypatch.setattr(utils.outputs.os, "fchmod", lambda fd, mode: (_ for _ in ()).throw(PermissionError(
        errno.EPERM, "Operation not permitted")))
    save_checkpoint({"model": {"w": torch.zeros(4)}, "epoch": 4}, path)
    assert read_checkpoint(path)["epoch"] == 4


def test_full_disk_when_saving_keeps_the_previous_checkpoint(data_root, tmp_path, capsys, monkeypatch):
    torch_save = torch.save

    def disk_full_at_epoch_2(state, f):  # last.pth of epoch 2: part of it written, then the disk is full
        if state.get("epoch") == 2 and "optimizer" in state:
            buffer = io.BytesIO()
            torch_save(state, buffer)
            f.write(buffer.getvalue()[:4096])
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:  # as torch's archive writer reports it, closing the archive after the failed write
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 915840 vs 915728")
        torch_save(state, f)

    monkeypatch.setattr(torch, "save", disk_full_at_epoch_2)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, out, "--epochs", "2"))
    line = error_line(capsys.readouterr().err, exit_info)
    last = out / "checkpoints" / "last.pth"
    assert line.startswith(f"error: could not write checkpoint {last}: no space left on the device; the previous "
                           "last.pth is left as it was; once that is fixed, resume with: python train.py ")
    assert line.endswith(" --resume") and line in (out / "log.txt").read_text()
    assert read_checkpoint(last)["epoch"] == 1
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


class MemoryHungryLoss(train.SATLoss):
    """The SAT criterion that, at its 5th call (optimizer step 2 of epoch 2 here), asks the allocator for 4 PiB:
    the CPU allocator's real error, handled as a GPU's OutOfMemoryError is."""

    def forward(self, *args):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 5:
            torch.empty(2 ** 50, dtype=torch.uint8)
        return super().forward(*args)


def test_out_of_memory_is_one_line_with_what_to_change_and_the_resume_command(data_root, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setattr("train.SATLoss", MemoryHungryLoss)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, out, "--epochs", "2"))
    line = error_line(capsys.readouterr().err, exit_info)
    assert line.startswith("error: out of memory (torch: [enforce fail at ") and "can't allocate memory" in line
    assert f"less is needed with --accum-steps K (K micro-batches per step), a smaller --eval-batch-size or --amp) " \
           f"in epoch 2/2; {out / 'checkpoints' / 'last.pth'} holds 1 finished epoch(s); resume with: python " \
           "train.py " in line and line.endswith(" --resume")
    assert line in (out / "log.txt").read_text() and "Traceback" not in (out / "log.txt").read_text()
    assert read_checkpoint(out / "checkpoints" / "last.pth")["epoch"] == 1


def test_out_of_memory_in_any_script_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: torch.empty(2 ** 50, dtype=torch.uint8))
    line = error_line(capsys.readouterr().err, exit_info)
    assert line.startswith("error: out of memory (torch: [enforce fail at ") and \
        line.endswith("; a smaller batch needs less: see --help)")

    def fails(argv):
        raise RuntimeError("another error")

    with pytest.raises(RuntimeError, match="another error"):  # any other error keeps its traceback
        run_cli(fails)


class MemoryHungryImages(torch.utils.data.Dataset):
    """Images whose loading asks the allocator for 4 PiB: the CPU allocator's real error, in a DataLoader worker."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.empty(2 ** 50, dtype=torch.uint8)


def test_out_of_memory_in_a_dataloader_worker_says_torch_s_line_not_the_worker_s_header(capsys):
    """The worker's error comes back with its traceback in its text: the line must be torch's (what was asked
    for), not 'Caught RuntimeError in DataLoader worker process 0.'"""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: list(torch.utils.data.DataLoader(MemoryHungryImages(), num_workers=1)))
    line = error_line(capsys.readouterr().err, exit_info)
    assert line.startswith("error: out of memory (torch: [enforce fail at ") and "can't allocate memory" in line


class KilledWorkerData(torch.utils.data.Dataset):
    """A dataset whose loader worker is killed (SIGKILL, as the kernel's out-of-memory killer ends one) at its first
    item: before any batch is in flight (one handed over through shared memory by a worker killed meanwhile fails
    to arrive as a ConnectionResetError of its own)."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_loader_worker_killed_is_one_line_naming_the_likely_cause(capsys):
    def main(argv):
        for _ in torch.utils.data.DataLoader(KilledWorkerData(), num_workers=1, multiprocessing_context="fork"):
            pass

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    line = error_line(capsys.readouterr().err, exit_info)  # (was torch's traceback, exit status 1)
    # torch says either, by which of its checks sees the worker gone first
    said = (r"DataLoader worker \(pid \d+\) is killed by signal: Killed\.|"
            r"DataLoader worker \(pid\(s\) \d+\) exited unexpectedly")
    assert re.fullmatch(rf"error: a data loading worker ended \(torch: (?:{said}); a killed worker was most often "
                        r"killed by the kernel's out-of-memory killer, which dmesg names: fewer --workers need less "
                        r"host memory\)", line), line


def _hand_over_then_die(queue):
    queue.put(torch.arange(4))  # (its storage shared through a socket of this process)
    queue.close()
    queue.join_thread()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_batch_whose_worker_was_killed_before_handing_it_over_is_the_same_line(capsys):
    """A worker killed while a batch it made was in flight: the main process met the worker's socket gone
    (ConnectionRefusedError or ConnectionResetError in torch's rebuild_storage_fd), not torch's worker check."""
    def main(argv):
        context = torch.multiprocessing.get_context("fork")
        queue = context.Queue()
        worker = context.Process(target=_hand_over_then_die, args=(queue,))
        worker.start()
        worker.join()
        queue.get(timeout=60)

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    line = error_line(capsys.readouterr().err, exit_info)
    assert re.fullmatch(r"error: a data loading worker ended \(torch: Connection(?:Refused|Reset)Error receiving a "
                        r"batch: \[Errno \d+\] Connection (?:refused|reset by peer); a killed worker was most often "
                        r"killed by the kernel's out-of-memory killer, which dmesg names: fewer --workers need less "
                        r"host memory\)", line), line

    def refused(argv):
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ConnectionRefusedError):  # another connection refused keeps its traceback
        run_cli(refused)


def test_full_disk_for_the_metrics_or_results_is_one_line_with_the_resume_command(data_root, tmp_path, capsys,
                                                                                   monkeypatch):
    def full(path, *_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    log_epoch = train.MetricsLog.log_epoch
    monkeypatch.setattr(train.MetricsLog, "log_epoch", lambda log, record: full(log.path))
    first = tmp_path / "first"  # in epoch 1: no last.pth to continue from
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, first, "--epochs", "1"))
    line = error_line(capsys.readouterr().err, exit_info)
    assert line.startswith(f"error: could not write {first / 'metrics.jsonl'}: no space left on the device; once "
                           "that is fixed, start again with: python train.py ") and line.endswith(" --overwrite")
    monkeypatch.setattr(train.MetricsLog, "log_epoch",
                        lambda log, record: full(log.path) if record["epoch"] == 2 else log_epoch(log, record))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, out, "--epochs", "2"))
    line = error_line(capsys.readouterr().err, exit_info)
    assert line.startswith(f"error: could not write {out / 'metrics.jsonl'}: no space left on the device; once that "
                           "is fixed, resume with: python train.py ") and line.endswith(" --resume")
    monkeypatch.undo()
    monkeypatch.setattr(train, "write_text_atomic", full)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, out, "--epochs", "2", "--resume"))
    line = error_line(capsys.readouterr().err, exit_info)
    assert line.startswith(f"error: the final test failed: could not write {out / 'results.json'}: no space left on "
                           f"the device; every epoch is saved in {out / 'checkpoints'} (a resumed run only runs the "
                           "final test again): once that is fixed, resume with: python train.py ")  # the one phrase


def test_truncated_last_pth_on_resume_names_the_newest_loadable_checkpoint(data_root, finished_run, tmp_path,
                                                                           capsys):
    out = copy_run(finished_run, tmp_path)
    last, best = out / "checkpoints" / "last.pth", out / "checkpoints" / "best.pth"
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, out, "--epochs", "2", "--resume"))
    assert error_line(capsys.readouterr().err, exit_info) == (
        f"error: --resume: {last} is not a readable checkpoint: a torch.save archive cut short or damaged, as by an "
        f"interrupted write or copy (failed finding central directory); the newest checkpoint in {best.parent} that "
        f"loads is {best} (epoch 1, its weights only: it holds no optimizer state, whose moments start again): "
        f"continue from it with --resume {best}")
    train.main(args(data_root, out, "--epochs", "2", "--resume", str(best)))
    assert epochs_logged(out) == [1, 2] and read_checkpoint(last)["epoch"] == 2
    assert f"resume from {best}: its weights after epoch 1; it holds no optimizer state" in \
        (out / "log.txt").read_text()


def test_evaluator_errors_reach_its_log_without_unsafe_advice(data_root, tmp_path, capsys):
    random_bytes = tmp_path / "model.pth"
    random_bytes.write_bytes(bytes(range(7, 256)) * 16)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(eval_main, ["--checkpoint", str(random_bytes), "--data-root", data_root, "--output-dir", str(out)])
    line = error_line(capsys.readouterr().err, exit_info)
    assert line == f"error: {random_bytes} is not a readable checkpoint: not a torch.save file (neither a zip " \
                   "archive nor a pickle)"
    assert line in (out / "log.txt").read_text()


def test_a_boxes_csv_that_misses_test_images_stops_before_training(tmp_path, capsys):
    root = tmp_path / "mydata"
    for split, count in (("train", 4), ("test", 2)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (64, 48), (40 * k, 90, 160)).save(root / split / name / f"{k}.png")
    (root / "boxes.csv").write_text("image,x0,y0,x1,y1\ntest/cat/0.png,1,2,30,18\ntest/cat/1.png,0,0,5,5\n"
                                    "test/dog/1.png,3,3,9,9\n")  # test/dog/0.png has none
    expected = f"error: {root}: 1 of the 4 evaluation images have no boxes in {root / 'boxes.csv'} (first: " \
               "test/dog/0.png); localization metrics need every image annotated: add them, or evaluate " \
               "classification only (--eval-protocol cls)"
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(str(root), out, "--data-format", "folder", "--epochs", "1"))
    assert error_line(capsys.readouterr().err, exit_info) == expected
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    with pytest.raises(SystemExit) as exit_info:  # the evaluator says the same before its forward
        run_cli(eval_main, ["--data-format", "folder", "--data-root", str(root), "--checkpoint",
                            str(save_nano_checkpoint(tmp_path / "nano.pth", num_classes=2)), "--output-dir",
                            str(tmp_path / "eval")])
    assert error_line(capsys.readouterr().err, exit_info) == expected
    with pytest.raises(SystemExit) as exit_info:  # and tools/check_dataset.py, after listing the splits
        run_cli(check_main, ["--data-format", "folder", "--data-root", str(root), "--workers", "0"])
    assert error_line(capsys.readouterr().err, exit_info) == expected
    train.main(args(str(root), tmp_path / "cls", "--data-format", "folder", "--epochs", "1", "--eval-protocol", "cls"))


def test_resume_from_another_folders_last_pth_carries_the_run_over(data_root, finished_run, tmp_path, capsys):
    """Resumed from another run's last.pth into a new folder, the run moves there: its best checkpoints (the final
    test reads best.pth in the run's folder) and last.pth (a plain --resume continues there) are copied. The same
    command again is refused: another run's checkpoint into a folder holding a run would mix the two."""
    out, source = tmp_path / "continued", finished_run / "checkpoints"
    results = train.main(args(data_root, out, "--epochs", "1", "--resume", str(source / "last.pth")))
    assert f"resumed from {source / 'last.pth'}: 1 epochs done, --epochs 1: no epoch left to train, the final " \
        "test runs" in (out / "log.txt").read_text()
    for name in ("best.pth", "best_top1_loc.pth", "best_gt_known_loc.pth", "last.pth"):
        assert (out / "checkpoints" / name).read_bytes() == (source / name).read_bytes()
    reference = json.loads((finished_run / "results.json").read_text())
    assert {**results, "checkpoint": None} == {**reference, "checkpoint": None}
    assert f"--resume: copied best.pth, best_top1_loc.pth, best_gt_known_loc.pth, last.pth (as last.pth) from " \
        f"{source} into {out / 'checkpoints'}" in (out / "log.txt").read_text()
    before = files(out)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, out, "--epochs", "1", "--resume", str(source / "last.pth")))
    assert error_line(capsys.readouterr().err, exit_info).startswith(
        f"error: --resume {source / 'last.pth'}: {out} holds another run (checkpoints/best.pth, ")
    assert files(out) == before
    train.main(args(data_root, out, "--epochs", "2", "--resume"))  # the run goes on in its new folder
    assert epochs_logged(out) == [2] and read_checkpoint(out / "checkpoints" / "last.pth")["epoch"] == 2


def test_resume_with_no_epoch_left_and_no_best_pth_is_refused(data_root, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    for best in (out / "checkpoints").glob("best*.pth"):
        best.unlink()
    before = files(out)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, out, "--epochs", "1", "--resume"))
    assert error_line(capsys.readouterr().err, exit_info) == (
        f"error: --resume {out / 'checkpoints' / 'last.pth'}: 1 epochs done and --epochs 1, so none is left to train, "
        f"and {out / 'checkpoints'} has no best.pth for the final test: raise --epochs above 1")
    assert {name: data for name, data in files(out).items() if name != "log.txt"} == \
        {name: data for name, data in before.items() if name != "log.txt"}
    new = tmp_path / "new"  # into another folder: refused before anything is copied there
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, new, "--epochs", "1", "--resume", str(out / "checkpoints" / "last.pth")))
    assert "so none is left to train" in error_line(capsys.readouterr().err, exit_info)
    assert not (new / "checkpoints").exists()


@pytest.mark.parametrize("script, holder_script", [("train.py", "evaluator.py"), ("evaluator.py", "train.py")])
def test_a_job_into_a_folder_another_job_writes_is_refused(data_root, tmp_path, capsys, script, holder_script):
    out = tmp_path / "run"
    with folder_locked_by(out, holder_script) as holder:
        (out / "metrics.partial.json").write_text("being written")
        before = files(out)
        with pytest.raises(SystemExit) as exit_info:
            if script == "train.py":
                run_cli(train.main, args(data_root, out, "--epochs", "1"))
            else:  # the evaluator removes an unfinished evaluation's partial files: not those of a running one
                run_cli(eval_main, ["--checkpoint", str(save_nano_checkpoint(tmp_path / "nano.pth")), "--data-root",
                                    data_root, "--output-dir", str(out)])
        assert refused_for_lock(error_line(capsys.readouterr().err, exit_info), out, holder_script, holder)
        assert files(out) == before and sorted(path.name for path in out.iterdir()) == [".lock",
                                                                                         "metrics.partial.json"]
    FolderLock(out, script).acquire().release()  # the holder was killed: no stale lock


def sigterm_first(monkeypatch, name):
    """train.``name`` sends this process a SIGTERM, then does its work."""
    function = getattr(train, name)

    def signalled(*call_args):
        os.kill(os.getpid(), signal.SIGTERM)
        return function(*call_args)

    monkeypatch.setattr(train, name, signalled)


@pytest.mark.usefixtures("sigterm_not_handled_fails")
def test_a_stop_signal_in_the_final_test_ends_with_the_resume_command(data_root, tmp_path, monkeypatch):
    """A signal while best.pth loads stops at once (not reported as a damaged checkpoint); one after results.json
    is written ends a complete run."""
    sigterm_first(monkeypatch, "load_checkpoint")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(args(data_root, out, "--epochs", "1"))
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert not (out / "results.json").exists()
    assert f"stopped by SIGTERM in the final test; {out / 'checkpoints' / 'last.pth'} holds 1 finished epoch(s); " \
        "resume with: python " in (out / "log.txt").read_text()
    monkeypatch.undo()
    write_text_atomic = train.write_text_atomic

    def written_then_signalled(*write_args):
        write_text_atomic(*write_args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "write_text_atomic", written_then_signalled)
    results = train.main(args(data_root, out, "--epochs", "1", "--resume"))  # runs the final test again
    assert json.loads((out / "results.json").read_text()) == results and results["epoch"] == 1
    assert epochs_logged(out) == [1]
    assert (out / "log.txt").read_text().rstrip().endswith("SIGTERM received after the final test: the run is "
                                                           "complete")


@pytest.mark.usefixtures("sigterm_not_handled_fails")
def test_a_stop_signal_before_training_starts_ends_with_one_line_and_frees_the_folder(data_root, tmp_path,
                                                                                       monkeypatch):
    sigterm_first(monkeypatch, "check_data")  # SIGTERM while the data is checked: nothing saved yet
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(args(data_root, out, "--epochs", "1"))
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM before training started; no checkpoint yet; resume with: python " in \
        (out / "log.txt").read_text()
    assert not (out / FolderLock.NAME).exists()
    monkeypatch.undo()
    train.main(args(data_root, out, "--epochs", "1", "--resume"))  # the printed command starts the run
    assert epochs_logged(out) == [1]


@pytest.mark.usefixtures("sigterm_not_handled_fails")
def test_a_stop_before_overwrite_replaced_the_run_says_to_start_again(data_root, tmp_path, monkeypatch, caplog):
    """Stopped while --overwrite still keeps the previous run: it is as it was, and the line gives the --overwrite
    command again (it said to resume, which would continue the run the user meant to replace)."""
    out = tmp_path / "run"
    train.main(args(data_root, out, "--epochs", "1"))
    results = (out / "results.json").read_bytes()
    sigterm_first(monkeypatch, "load_first_batch")
    with pytest.raises(SystemExit) as exit_info:
        train.main(args(data_root, out, "--epochs", "1", "--overwrite"))
    assert exit_info.value.code == 128 + signal.SIGTERM and (out / "results.json").read_bytes() == results
    line = next(line for line in caplog.text.splitlines() if "stopped by SIGTERM" in line)
    assert f"stopped by SIGTERM before training started; the previous run in {out} is as it was; start again " \
           "with: python train.py " in line and line.endswith(f"--output-dir {out} --epochs 1 --overwrite")


@pytest.mark.usefixtures("sigterm_not_handled_fails")
def test_a_stop_while_overwrite_deletes_the_run_deletes_it_whole(data_root, tmp_path, monkeypatch, caplog):
    """A signal while --overwrite deletes the previous run waits for the deletion: the folder held the old
    results.json and log without checkpoints, and the line said the previous run was as it was."""
    import utils.run_folder as run_folder
    out = tmp_path / "run"
    train.main(args(data_root, out, "--epochs", "1"))
    delete = run_folder.delete_outputs

    def signalled_mid_way(output_dir, names):
        delete(output_dir, names[:1])
        os.kill(os.getpid(), signal.SIGTERM)
        delete(output_dir, names[1:])

    monkeypatch.setattr(run_folder, "delete_outputs", signalled_mid_way)
    with pytest.raises(SystemExit) as exit_info:
        train.main(args(data_root, out, "--epochs", "1", "--overwrite"))
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert not (out / "results.json").exists() and not (out / "checkpoints").exists()
    line = next(line for line in caplog.text.splitlines() if "stopped by SIGTERM" in line)
    assert "is as it was" not in line and "no checkpoint yet; resume with: python train.py " in line


def test_the_lock_file_goes_with_its_job_and_a_file_removed_meanwhile_is_not_locked(tmp_path, monkeypatch):
    lock = FolderLock(tmp_path / "out", "train.py").acquire()
    assert (tmp_path / "out" / ".lock").read_text().startswith(f"train.py, pid {os.getpid()} on ")
    lock.release()
    assert not (tmp_path / "out").exists()  # made by the lock and left empty (a job refused at its start): removed
    lock = FolderLock(tmp_path / "a" / "b" / "out", "train.py").acquire()
    (tmp_path / "a" / "b" / "kept.txt").write_text("")
    lock.release()  # its outputs' folders stay (here a.b's file): only empty folders the lock made go
    assert sorted(path.name for path in (tmp_path / "a" / "b").iterdir()) == ["kept.txt"]
    (tmp_path / "out").mkdir()
    FolderLock(tmp_path / "out", "train.py").acquire().release()
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out" / ".lock").exists()  # not made by it: kept
    # the job holding the file opened here ends (and removes it) before the lock is taken: the new file is locked
    import utils.outputs as outputs
    lockf, calls = outputs.fcntl.lockf, []

    def ended_meanwhile(fd, operation):
        if not calls:
            (tmp_path / "out" / ".lock").unlink()
            (tmp_path / "out" / ".lock").write_text("")
        calls.append(fd)
        return lockf(fd, operation)

    monkeypatch.setattr(outputs.fcntl, "lockf", ended_meanwhile)
    lock = FolderLock(tmp_path / "out", "evaluator.py").acquire()
    assert len(calls) == 2 and os.fstat(lock.fd).st_ino == (tmp_path / "out" / ".lock").stat().st_ino
    assert (tmp_path / "out" / ".lock").read_text().startswith("evaluator.py, pid ")
    lock.release()
    # a folder that cannot hold the lock: one line, not a traceback
    (tmp_path / "odd" / ".lock").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"--output-dir \S+odd: cannot write its lock file \S+odd/.lock \(Is a "
                                          r"directory\)$"):
        FolderLock(tmp_path / "odd", "train.py").acquire()
    with pytest.raises(ConfigError, match=r"--output-dir /proc/sat_out: cannot be created \("):
        FolderLock("/proc/sat_out", "train.py").acquire()
    # the lock's line cannot be written (a quota, a full disk): one line, not a traceback; no fsync: not an error
    def failing_fsync(code):
        def fsync(fd):
            raise OSError(code, "x")
        return fsync

    for code, refused in ((errno.EDQUOT, True), (errno.EINVAL, False)):
        monkeypatch.setattr(outputs.os, "fsync", failing_fsync(code))
        if refused:
            with pytest.raises(ConfigError, match=r"--output-dir \S+/quota: cannot write its lock file \S+ \(x\)$"):
                FolderLock(tmp_path / "quota", "train.py").acquire()
        else:
            FolderLock(tmp_path / "quota", "train.py").acquire().release()
    FolderLock(tmp_path / "quota", "train.py").acquire().release()  # the refused one left it unlocked
    # a full disk: the lock file is made, its line cannot be written (an OSError naming no file: every job said
    # "could not write: no space left on the device")
    monkeypatch.setattr(outputs.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(ConfigError, match=r"^--output-dir \S+out: cannot write its lock file \S+out/.lock \(no space "
                                          r"left on the device\)$"):
        FolderLock(tmp_path / "out", "train.py").acquire()
    assert not (tmp_path / "out" / ".lock").exists()  # its empty lock file was left behind
    with pytest.raises(ConfigError, match="no space left on the device"):
        FolderLock(tmp_path / "new" / "out", "train.py").acquire()
    assert not (tmp_path / "new").exists()  # and the folders made for it


def test_a_folder_made_read_only_mid_job_leaves_the_job_s_own_error(tmp_path, monkeypatch):
    """A job whose --output-dir stopped taking changes (a file system remounted read-only, a folder made
    read-only) stopped on its one-line OutputError; removing the lock file, or the evaluator's partial outputs,
    then raised again: Python's traceback of a PermissionError replaced the line (exit status 1, not 2)."""
    import pathlib
    from evaluator import discard_partials
    from utils.outputs import partial_name
    out = tmp_path / "out"
    lock = FolderLock(out, "evaluator.py").acquire()
    partial = pathlib.Path(partial_name(out / "metrics.json"))
    partial.write_text("{}")

    def read_only(path, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(pathlib.Path, "unlink", read_only)
    discard_partials(type("Args", (), {"save_maps": None, "save_boxes": None})(), out)
    lock.release()
    monkeypatch.undo()
    assert lock.fd is None and partial.exists() and (out / ".lock").exists()
    FolderLock(out, "train.py").acquire().release()  # the file left is not locked: the next job takes it
    assert not (out / ".lock").exists()


@pytest.mark.usefixtures("sigterm_not_handled_fails")
def test_a_stop_signal_once_the_evaluation_is_complete_keeps_it(data_root, tmp_path, monkeypatch):
    """SIGTERM while the outputs of a complete evaluation are written: they are kept and the job ends as finished
    (it printed 'nothing of it was kept' after metrics.json was written, with a traceback from a DataLoader)."""
    import evaluator
    out = tmp_path / "eval"
    write_per_image = evaluator.write_per_image

    def signalled(*call_args):
        os.kill(os.getpid(), signal.SIGTERM)
        write_per_image(*call_args)

    monkeypatch.setattr(evaluator, "write_per_image", signalled)
    record = eval_main(["--checkpoint", str(save_nano_checkpoint(tmp_path / "nano.pth")), "--data-root", data_root,
                        "--output-dir", str(out), "--workers", "0", "--device", "cpu"])
    assert json.loads((out / "metrics.json").read_text())["gt_known_loc"] == record["gt_known_loc"]
    assert (out / "per_image.csv").is_file() and "stopped" not in (out / "log.txt").read_text()


@pytest.mark.usefixtures("sigterm_not_handled_fails")
@pytest.mark.parametrize("stop, status", [("SIGTERM", 128 + signal.SIGTERM), ("Ctrl-C", 130)])
def test_a_stopped_evaluation_leaves_the_earlier_one_whole_and_says_so(data_root, tmp_path, monkeypatch, stop,
                                                                       status):
    """SIGTERM (a job's time limit) as the evaluation ends, or Ctrl-C while it writes its outputs: one line, the
    status of a stopped job, the earlier evaluation's files as they were and no partial files (SIGTERM ended the
    process without a word and left them; Ctrl-C printed a traceback)."""
    import evaluator
    out, maps = tmp_path / "eval", tmp_path / "maps"
    flags = ["--checkpoint", str(save_nano_checkpoint(tmp_path / "nano.pth")), "--data-root", data_root,
             "--output-dir", str(out), "--overlays", "2", "--save-maps", str(maps), "--workers", "0",
             "--device", "cpu"]
    eval_main(flags)
    before, maps_before = files(out), files(maps)
    # SIGTERM once the metrics are computed (overlays and maps staged; later it lets the evaluation finish:
    # test_a_stop_signal_once_the_evaluation_is_complete_keeps_it); Ctrl-C with metrics.json staged too
    where = "evaluate" if stop == "SIGTERM" else "write_per_image"
    original = getattr(evaluator, where)

    def stopped(*call_args, **kwargs):
        result = original(*call_args, **kwargs)
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(evaluator, where, stopped)
    with pytest.raises(SystemExit) as exit_info:
        eval_main([*flags, "--overwrite"])
    assert exit_info.value.code == status
    after = files(out)
    log = after.pop("log.txt")
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items()
                                                                if k not in ("log.txt", ".lock")}
    assert files(maps) == maps_before and not list(tmp_path.glob("*.partial*")) and not list(out.glob("*.partial*"))
    assert f"the evaluation stopped: nothing of it was kept (the outputs in {out} are as they were); " \
           f"{'stopped by SIGTERM' if stop == 'SIGTERM' else 'interrupted'}" in log.decode()


def test_outputs_are_moved_in_place_whole_through_a_ctrl_c(tmp_path, monkeypatch):
    """Staged.commit holds Ctrl-C off for its few renames: an earlier folder is never left half deleted (a
    Ctrl-C, or a worker's death, in the middle of deleting it left 20 of 100 overlays)."""
    from utils.outputs import Staged
    (tmp_path / "overlays").mkdir()
    (tmp_path / "overlays" / "old.png").write_bytes(b"old")
    staged = Staged()
    new = staged.path(tmp_path / "overlays")
    new.mkdir()
    (new / "new.png").write_bytes(b"new")
    replace, calls = os.replace, []

    def interrupted(*args):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the two renames of the folder
        calls.append(args)
        return replace(*args)

    monkeypatch.setattr(os, "replace", interrupted)
    try:
        staged.commit(tmp_path)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C interrupted the commit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlays"] and len(calls) == 2
    assert [p.name for p in (tmp_path / "overlays").iterdir()] == ["new.png"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_log_that_a_full_disk_keeps_out_leaves_the_job_s_own_error(tmp_path):
    """log.txt's lines left unwritten on a full disk (each left out without a word) were written again when the
    job closed its log: their OSError, raised from close_logging in the job's finally, replaced its one-line
    error with a traceback."""
    import logging
    from utils.logger import close_logging, setup_logging
    (tmp_path / "log.txt").symlink_to("/dev/full")  # every write: ENOSPC
    setup_logging(tmp_path).info("a line the disk has no room for")
    close_logging()  # raised OSError: [Errno 28] No space left on device
    assert not [h for h in logging.getLogger().handlers if getattr(h, "_sat_run", False)]


@pytest.mark.parametrize("is_main", [True, False])
def test_closing_the_log_gives_the_root_logger_its_level_back(tmp_path, is_main):
    """A run (train.py's or an evaluator's main, from Python code or a test) left the root logger at INFO: the
    tests after it in the same process then saw INFO records that a fresh process does not."""
    import logging
    from utils.logger import close_logging, setup_logging
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.ERROR)
        setup_logging(tmp_path, is_main=is_main)
        setup_logging(tmp_path, is_main=is_main)  # a second run in the same process
        assert root.level == (logging.INFO if is_main else logging.WARNING)
        close_logging()
        assert root.level == logging.ERROR
        close_logging()  # again: nothing more to give back
        assert root.level == logging.ERROR
    finally:
        close_logging()
        root.setLevel(before)


def test_metrics_and_config_rewritten_on_resume_are_kept_whole_on_a_full_disk(tmp_path, monkeypatch):
    """A --resume rewrites metrics.jsonl (the lines of the epochs done) and config.yaml: written in place, a full
    disk (or a kill) after the truncation lost the earlier epochs' lines, and left a config.yaml that the next
    --resume without --config reads."""
    import pathlib
    from utils.config import parse_config, save_config
    from utils.errors import OutputError
    from utils.logger import MetricsLog
    out = tmp_path / "run"
    out.mkdir()
    lines = "".join(json.dumps({"epoch": epoch, "train_loss": 1.0 / epoch}) + "\n" for epoch in (1, 2))
    (out / "metrics.jsonl").write_text(lines)
    (out / "config.yaml").write_text("epochs: 2\n")

    def full(path, text, encoding=None):  # what a full disk does: the file opened (emptied), part of it written
        with open(path, "w", encoding=encoding) as file:
            file.write(text[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OutputError, match="metrics.jsonl: no space left on the device"):
        MetricsLog(out, 2, tensorboard=False)
    with pytest.raises(OutputError, match="config.yaml: no space left on the device"):
        save_config(parse_config(["--output-dir", str(out)]), out / "config.yaml")
    assert (out / "metrics.jsonl").read_text() == lines and (out / "config.yaml").read_text() == "epochs: 2\n"
    assert sorted(path.name for path in out.iterdir()) == ["config.yaml", "metrics.jsonl"]  # no temporary left


def test_tensorboard_events_a_removed_folder_lost_leave_the_job_s_own_error(tmp_path, caplog):
    """--output-dir removed (or the disk full) mid-run: TensorBoard's writer thread fails, log_epoch stops the run
    with one line; closing the writer in train.py's finally raised the thread's error again, a traceback (exit 1)
    in place of the line, which named the file as bytes (b'...')."""
    import logging
    from utils.errors import output_error
    from utils.logger import MetricsLog
    log = MetricsLog(tmp_path, tensorboard=False)

    class Failed:
        def close(self):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.fsencode(tmp_path / "events"))

    log.writer = Failed()
    log.close(quiet=True)  # raised FileNotFoundError
    log.writer = Failed()
    with caplog.at_level(logging.WARNING):
        log.close()
    assert f"TensorBoard: could not write {tmp_path / 'events'}: No such file or directory" in caplog.text
    assert str(output_error(FileNotFoundError(2, "x", b"/a/b"))) == "could not write /a/b: x"


def test_a_failed_run_removes_only_the_folders_it_made(tmp_path, monkeypatch):
    """removed_if_failed took ``new/../kept/sub`` for three new folders, ``kept`` among them (``new/..`` did not
    exist yet): the failure removed the user's empty kept/ too."""
    from utils.outputs import removed_if_failed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "kept")
    for output in ("new/../kept/sub", "link/deeper/sub", "made/a/b"):
        with pytest.raises(RuntimeError):
            with removed_if_failed(output):
                Path(output).mkdir(parents=True)
                raise RuntimeError("the run failed")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "link"] and not any((tmp_path / "kept").iterdir())
        # FolderLock's empty folders (a job refused at its start) by the same rule: it took new/.. and kept for
        # folders it made, removed the user's kept/ and left new/
        FolderLock(output, "train.py").acquire().release()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "link"] and not any((tmp_path / "kept").iterdir())


def test_a_last_pth_of_an_earlier_version_resumes_or_is_one_line(data_root, finished_run, tmp_path, capsys):
    """last.pth files of earlier versions (format_version 1 as now) hold one best record {'epoch', 'score',
    'threshold'} (a TypeError traceback on resume) and a config without decay_tokens, whose optimizer did not decay
    the tokens (a ValueError traceback from optimizer.load_state_dict under this version's default)."""
    out = copy_run(finished_run, tmp_path)
    last = out / "checkpoints" / "last.pth"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ckpt["best"] = {"epoch": 1, "score": [20.0, 40.0], "threshold": 0.4}
    del ckpt["config"]["drop_last"]  # the training loader dropped the last batch: the epochs now have more steps
    ckpt["config"]["test_tencrop"] = ckpt["config"].pop("tencrop")  # a key renamed since: compared under its name
    torch.save(ckpt, last)
    train.main(args(data_root, out, "--epochs", "2", "--resume"))
    log = (out / "log.txt").read_text()
    assert "resume: tencrop" not in log  # it said 'tencrop is not in the checkpoint's config (a key added since)'
    assert f"resume: {last} was written by an older version (one best record" in log
    assert "resume: drop_last is not in the checkpoint's config (a key added since; the version that wrote it ran " \
           "as true), now false" in log
    assert epochs_logged(out) == [1, 2] and read_checkpoint(last)["best"]["best.pth"]["epoch"] == 2
    out = tmp_path / "no_key"
    shutil.copytree(finished_run, out)
    last = out / "checkpoints" / "last.pth"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    del ckpt["config"]["decay_tokens"]  # its groups are this version's: with --no-decay-tokens they do not fit
    torch.save(ckpt, last)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, out, "--epochs", "2", "--resume"))
    assert "the run was trained with decay_tokens false (now true; not in its config: the version that wrote it " \
           "had no such key, give --no-decay-tokens)" in error_line(capsys.readouterr().err, exit_info)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args(data_root, out, "--epochs", "2", "--resume", "--no-decay-tokens"))
    assert error_line(capsys.readouterr().err, exit_info).startswith(
        f"error: --resume {last}: its optimizer state does not fit this run's optimizer (")


def test_tensorboard_a_resume_hides_the_epochs_it_redoes(tmp_path):
    """A run killed after epoch 2's metrics line but before last.pth (which still says 1 epoch) redoes epoch 2 on
    --resume: TensorBoard shows each epoch once, at step = ``epoch`` as in metrics.jsonl (no zigzag)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from utils.logger import MetricsLog
    killed = MetricsLog(tmp_path)
    for epoch in (1, 2):
        killed.log_epoch({"epoch": epoch, "train_loss": 10.0 + epoch})
    killed.close()
    resumed = MetricsLog(tmp_path, start_epoch=1)
    for epoch in (2, 3):
        resumed.log_epoch({"epoch": epoch, "train_loss": float(epoch)})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = [(event.step, event.value) for event in events.Scalars("train_loss")]
    assert scalars == [(1, 11.0), (2, 2.0), (3, 3.0)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["epoch"], line["train_loss"]) for line in lines] == scalars


def test_tensorboard_s_quiet_writer_errors_last_as_long_as_its_log(tmp_path):
    """MetricsLog quiets TensorBoard's writer thread through the process's threading.excepthook: closed, it puts
    the hook back (a library user's own hook, or Python's, is theirs again)."""
    import threading
    from utils.logger import MetricsLog
    before = threading.excepthook
    log = MetricsLog(tmp_path)
    assert threading.excepthook is not before
    log.close()
    assert threading.excepthook is before


def test_tensorboard_on_a_full_disk_is_one_line_naming_its_folder(tmp_path):
    """TensorBoard's events past what the disk takes (here a file-size limit: EFBIG, as a full disk's ENOSPC, from
    the writer thread's real write): the error named no file ("could not write: ..."), and the writer thread's
    traceback (some 30 lines, "Exception in thread Thread-1") followed the job's one-line error."""
    script = ("import resource, signal, sys\n"
              "from utils.errors import run_cli\n"
              "from utils.logger import MetricsLog\n"
              "def main(argv):\n"
              "    log = MetricsLog(argv[0])\n"
              "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
              "    for epoch in range(1, 200):\n"
              "        log.log_epoch({'epoch': epoch, **{f'k{i}': 1.0 for i in range(20)}})\n"
              "run_cli(main, sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, f"error: could not write {tmp_path / 'tensorboard'}: "
                                                 f"{os.strerror(errno.EFBIG)}\n")
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
