"""Distributed evaluation with two gloo processes: disjoint shards without padding duplicates, counters
summed so that both ranks return the single-process metrics, each rank writing its own localization maps; an
unreadable image in one shard stops both ranks."""
import errno
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from DataLoader import make_demo_dataset
from DataLoader.eval_loader import build_eval_loader
from Model import build_model_from_checkpoint
from utils.engine import evaluate
from utils.errors import DataError, SATError, user_message

from test_evaluation import save_nano_checkpoint
from conftest import free_port, rendezvous, start_ranks

SETTINGS = dict(protocol="both", tencrop=True, img_size=64, batch_size=2, workers=0)


def _evaluate(root, checkpoint, distributed, scoremaps):
    model, _ = build_model_from_checkpoint(checkpoint)
    loader = build_eval_loader("cub", root, "test", distributed=distributed, **SETTINGS)
    return evaluate(loader, model, "cpu", threshold=0.4, distributed=distributed, save_maps=scoremaps,
                    per_image=True, progress=False)


def _rank(rank, init_method, root, checkpoint, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        try:
            record = {"result": _evaluate(root, checkpoint, True, os.path.join(out_dir, "scoremaps")),
                      "shard": len(build_eval_loader("cub", root, "test", distributed=True, **SETTINGS).sampler)}
        except DataError as err:
            record = {"error": user_message(err), "echo": err.echo}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


def _two_ranks(root, checkpoint, out_dir, rank_fn=_rank, init=None):
    """Each rank's JSON record; the ranks must end within 2 minutes (a rank left in a collective would not).
    ``init``: what ``rank_fn`` takes first (default: a file rendezvous; _evaluator_rank: a port)."""
    init = rendezvous(out_dir) if init is None else init
    ranks = start_ranks(rank_fn, (init, str(root), str(checkpoint), str(out_dir)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    try:
        while not ranks.join(timeout=5):  # True once every rank has ended (False: one has, or none yet)
            assert time.monotonic() < deadline, "a rank did not end"
    finally:
        for process in ranks.processes:
            process.kill()
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_process_evaluation_equals_single_process(tmp_path):
    # 9 test images: DistributedSampler would pad the two shards to 5 + 5
    root = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=1, test_per_class=3, image_size=64)
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    ranks = _two_ranks(root, checkpoint, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _evaluate(root, checkpoint, False, None)
    finally:
        torch.set_num_threads(threads)
    assert [r["shard"] for r in ranks] == [5, 4]
    single = json.loads(json.dumps(single))  # the same int-keyed dicts as the ranks' JSON
    assert ranks[0]["result"] == ranks[1]["result"] == single
    assert single["num_images"] == 9
    assert [len(list((tmp_path / "scoremaps" / key).rglob("*.npy"))) for key in ("sat", "wsol")] == [9, 9]


def test_an_unreadable_image_in_one_shard_stops_both_ranks_with_its_name(tmp_path):
    """Only the rank whose shard holds the file reads it; both raise the same DataError naming it, instead of
    one waiting for ever in the collectives that end the evaluation."""
    root = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=1, test_per_class=3, image_size=64)
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    broken = Path(build_eval_loader("cub", root, "test", **SETTINGS).dataset.image_path(1))  # rank 1: 1, 3 ...
    broken.write_bytes(broken.read_bytes()[:100])
    ranks = _two_ranks(root, checkpoint, tmp_path)
    errors = [r.get("error") for r in ranks]
    assert errors[0] == errors[1] and errors[0].startswith(f"unreadable image {broken} (OSError")
    assert [r["echo"] for r in ranks] == [True, False]  # rank 1 met it and prints it; rank 0 stops silently


def _rank_with_nan_outputs_on_rank_1(rank, init_method, root, checkpoint, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        model, _ = build_model_from_checkpoint(checkpoint)
        if rank == 1:  # a model that diverged, seen on one rank's shard only
            model.register_forward_hook(lambda module, inputs, out: (out[0] * float("nan"), *out[1:]))
        loader = build_eval_loader("cub", root, "test", distributed=True, **SETTINGS)
        try:
            evaluate(loader, model, "cpu", threshold=0.4, distributed=True, progress=False)
            record = {"error": None}
        except SATError as err:
            record = {"error": user_message(err), "type": type(err).__name__}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


def test_nan_outputs_on_one_rank_stop_both_ranks_with_the_same_error(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=1, test_per_class=3, image_size=64)
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    ranks = _two_ranks(root, checkpoint, tmp_path, _rank_with_nan_outputs_on_rank_1)
    assert ranks[0] == ranks[1] and ranks[0]["type"] == "NonFiniteOutputError"
    assert ranks[0]["error"].startswith("the model outputs NaN/Inf scores or maps for 2 image(s) of a batch, first ")


def _rank_with_a_full_disk(rank, init_method, root, checkpoint, out_dir):
    """Rank 1's --save-maps meets a full disk; then rank 0 alone fails to write a file (run_on_main)."""
    import numpy as np
    from utils.distributed import run_on_main
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    record = {}
    try:
        if rank == 1:
            def full(path, *args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            np.save = full
        try:
            _evaluate(root, checkpoint, True, os.path.join(out_dir, "scoremaps"))
        except SATError as err:
            record["evaluate"] = [type(err).__name__, user_message(err)]

        def write_results():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(out_dir, "results.json"))
        try:
            run_on_main(rank == 0, write_results)
        except SATError as err:
            record["run_on_main"] = [type(err).__name__, user_message(err)]
        try:  # a bug on the main process: its traceback there, one line elsewhere
            run_on_main(rank == 0, lambda: 1 / 0)
        except (SATError, ZeroDivisionError) as err:
            record["bug"] = [type(err).__name__, str(err)]
        # wsol overlays are drawn once the evaluation's threshold is known, after its last shared step
        import utils.engine as engine
        if rank == 0:
            def full_png(path, image):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a real full disk: no file named
            engine.save_rgb = full_png
        model, _ = build_model_from_checkpoint(checkpoint)
        loader = build_eval_loader("cub", root, "test", distributed=True, **{**SETTINGS, "protocol": "wsol",
                                                                            "tencrop": False})
        try:
            evaluate(loader, model, "cpu", distributed=True, overlay_dir=Path(out_dir) / "overlays", overlays=2,
                     per_image=True, progress=False)
        except SATError as err:
            record["wsol_overlays"] = [type(err).__name__, user_message(err)]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


def test_a_file_one_rank_cannot_write_stops_both_ranks_with_one_line(tmp_path):
    """An OSError writing one rank's saved maps, or the main process's files, is raised on every rank as one
    OutputError line: no rank is left waiting in a collective for one that stopped (a hang under NCCL)."""
    root = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=1, test_per_class=3, image_size=64)
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    ranks = _two_ranks(root, checkpoint, tmp_path, _rank_with_a_full_disk)
    assert ranks[0]["evaluate"] == ranks[1]["evaluate"] and ranks[0]["run_on_main"] == ranks[1]["run_on_main"]
    kind, message = ranks[0]["evaluate"]
    assert kind == "OutputError" and message.startswith(f"could not write {tmp_path / 'scoremaps'}")
    assert message.endswith(".npy: no space left on the device")
    assert ranks[0]["run_on_main"] == ["OutputError", f"could not write {tmp_path / 'results.json'}: no space left "
                                                      "on the device"]
    assert ranks[0]["bug"] == ["ZeroDivisionError", "division by zero"]
    assert ranks[1]["bug"] == ["SATError", "the main process failed: ZeroDivisionError: division by zero"]
    kind, message = ranks[1]["wsol_overlays"]
    assert kind == "OutputError" and ranks[0]["wsol_overlays"] == ranks[1]["wsol_overlays"]
    assert message.startswith(f"could not write {tmp_path / 'overlays'}") and message.endswith(
        ".png: no space left on the device")


def _evaluator_rank(rank, port, root, checkpoint, out_dir):
    """evaluator.py's main as torchrun starts it (the env:// rendezvous)."""
    from evaluator import main
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    try:
        main(["--data-root", root, "--checkpoint", checkpoint, "--output-dir", os.path.join(out_dir, "eval"),
              "--device", "cpu", "--workers", "0", "--eval-batch-size", "2"])
        record = {"error": None}
    except SATError as err:
        record = {"error": user_message(err), "echo": err.echo}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


def test_the_evaluator_stopped_by_bad_images_names_them_all_on_every_rank(tmp_path):
    """Rank 0 checks the split while the other waits for its line: one error, the same on both ranks."""
    root = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=1, test_per_class=3, image_size=64)
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    dataset = build_eval_loader("cub", root, "test", **SETTINGS).dataset
    broken = [Path(dataset.image_path(index)) for index in (1, 2)]  # one in each rank's shard
    for path in broken:
        path.write_bytes(path.read_bytes()[:100])
    records = _two_ranks(root, checkpoint, tmp_path, _evaluator_rank, init=str(free_port()))
    errors = [record["error"] for record in records]
    assert errors[0] == errors[1] and errors[0].startswith(f"test split: 2 bad images of 9, first {broken[0]} (")
    assert [record["echo"] for record in records] == [False, True]  # rank 0 found them: printed once, by rank 0
    log = (tmp_path / "eval" / "log.txt").read_text()
    assert log.count("ERROR error: test split: 2 bad images") == 1 and "[rank 1]" not in log  # once, not per rank
    assert log.count("2 processes, each evaluating its share of the images") == 1  # the launch is logged


def test_an_error_every_rank_meets_loading_is_said_once(tmp_path):
    """A checkpoint or data every process reads and finds bad: each stops with the line, printed and logged by
    rank 0 only (it was printed once per process)."""
    root = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=1, test_per_class=3, image_size=64)
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    records = _two_ranks(root, tmp_path / "bad.pth", tmp_path, _evaluator_rank, init=str(free_port()))
    assert records[0]["error"] == records[1]["error"] and "is not a readable checkpoint" in records[0]["error"]
    assert [record["echo"] for record in records] == [False, True]
    assert (tmp_path / "eval" / "log.txt").read_text().count("is not a readable checkpoint") == 1


def _bad_flags_rank(rank, port, root, maps, out_dir):
    """evaluator.py --maps under torchrun with flags each process refuses alike (a parse error, a protocol
    error met while loading the maps)."""
    from evaluator import main
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    records = []
    for flags in (["--wsol-threshold", "0.123"], ["--eval-protocol", "cls"]):
        try:
            main(["--data-root", root, "--maps", maps, "--output-dir", os.path.join(out_dir, "eval"), "--device",
                  "cpu", "--workers", "0", *flags])
            records.append({"error": None})
        except SATError as err:
            records.append({"error": user_message(err), "echo": err.echo})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)


def test_flags_every_rank_refuses_are_said_once(tmp_path):
    """A flag's error and a --maps refusal under two processes: rank 0 says it, rank 1's is an echo (each was
    printed by every process)."""
    from tools.make_baseline_maps import main as make_baseline_maps
    root = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=1, test_per_class=3, image_size=64)
    make_baseline_maps([str(tmp_path / "maps"), "--data-root", str(root), "--size", "8"])
    ranks = _two_ranks(root, tmp_path / "maps", tmp_path, _bad_flags_rank, init=str(free_port()))
    for k, fragment in enumerate(("--wsol-threshold: expected a number in [0, 0.99]", "--maps with --eval-protocol "
                                                                                     "cls: maps are scored")):
        assert ranks[0][k]["error"] == ranks[1][k]["error"] and ranks[0][k]["error"].startswith(fragment)
        assert [ranks[0][k]["echo"], ranks[1][k]["echo"]] == [False, True]


def _warning_rank(rank, init_method, out_dir):
    """Each rank runs the same warning-raising work through run_everywhere; what its 'sat' logger let through."""
    import logging
    from utils.distributed import run_everywhere
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        seen = []
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.getMessage())
        sat = logging.getLogger("sat")
        sat.addHandler(handler)
        run_everywhere(lambda: sat.warning("val/ holds 5 images, the val boxes name 3"))
        sat.warning("epoch 1: skipping unreadable image x.jpg")  # outside it: each process says its own
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)
    finally:
        dist.destroy_process_group()


def test_a_warning_every_process_meets_in_run_everywhere_is_said_by_rank_0_alone(tmp_path):
    """Building the data on every process said its warnings once per process (log.txt: again, marked [rank 1])."""
    ranks = start_ranks(_warning_rank, (rendezvous(tmp_path), str(tmp_path)), nprocs=2)
    assert ranks is None or ranks.join()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen == [["val/ holds 5 images, the val boxes name 3", "epoch 1: skipping unreadable image x.jpg"],
                    ["epoch 1: skipping unreadable image x.jpg"]]
