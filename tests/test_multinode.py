"""What the nodes of a multi-node job must share, checked before training on a forked 2-process gloo group: the
settings (another node's flags: a crash blaming a dead peer, or with another lr silently different models), the
data (another node's --data-root: DDP's traceback) and the output folder (a folder of its own: the final test
failed after the whole run); and the line after a lost peer names what last.pth holds once written."""
import datetime
import json
import re
import types

import pytest
import torch
import torch.distributed as dist

from conftest import REPO_ROOT, rendezvous, start_ranks
from utils import distributed as dist_utils
from utils.checkpoint import TrainingCheckpoints
from utils.config import PER_NODE_KEYS, job_settings, parse_config
from utils.errors import DataError, SATError
from utils.outputs import FolderLock
from utils.run_folder import IMAGE_CACHE, check_shared_folder, remove_image_cache, remove_old_image_cache

# The config by its full path: the tests do not depend on the folder pytest is started from.
DEMO_CONFIG = str(REPO_ROOT / "config" / "demo.yaml")


def _outcome(fn):
    try:
        fn()
    except SATError as err:
        return {"type": type(err).__name__, "message": str(err), "echo": err.echo}
    return None


def _rank(rank, init, folder):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    info = dist_utils.DistInfo(rank=rank, world_size=2)
    try:
        base = ["--config", DEMO_CONFIG, "--data-root", f"/data/node{rank}", "--workers", str(rank)]
        cfg = parse_config(base + (["--batch-size", "16"] if rank else []), "train_imagenet")
        same = parse_config(base, "train_imagenet")
        data = types.SimpleNamespace(classes=["a", "b"] if rank == 0 else ["a", "c"])
        lock = FolderLock(f"{folder}/out{rank}" if rank else f"{folder}/out0", "train_ImageNet.py")
        shared = FolderLock(f"{folder}/shared", "train_ImageNet.py")
        results = {
            "settings": _outcome(lambda: dist_utils.check_agreement(job_settings(cfg), "their settings", "x")),
            "per_node": _outcome(lambda: dist_utils.check_agreement(job_settings(same), "their settings", "x")),
            "data": _outcome(lambda: dist_utils.check_agreement(
                {"classes": len(data.classes), "names": data.classes}, "the data they read", "y", DataError)),
        }
        if rank == 0:
            lock.acquire()
            shared.acquire()
        results["apart"] = _outcome(lambda: check_shared_folder(lock, info, wait=0.2))
        results["shared"] = _outcome(lambda: check_shared_folder(shared, info))
        if rank == 1:  # --overwrite of a run with an image cache, --cache-images on the second node only: the old
            (shared.path.parent / IMAGE_CACHE).mkdir()  # cache goes at the start (a collective on rank 1 alone)
        dist.barrier()
        results["old_cache"] = _outcome(lambda: results.update(replaced=remove_old_image_cache(
            shared.path.parent, ["results.json", IMAGE_CACHE], rank == 1, info)))
        results["old_cache_kept"] = (shared.path.parent / IMAGE_CACHE).exists()
        dist.barrier()
        if rank == 1:  # cache_images on the second node only (a per-node key): its cache in the shared folder
            (shared.path.parent / IMAGE_CACHE).mkdir()
            (shared.path.parent / IMAGE_CACHE / "node1.cache").write_bytes(b"x")
        dist.barrier()
        results["cache"] = _outcome(lambda: remove_image_cache(shared.path.parent, rank == 1, info))
        dist.barrier()  # (a process that skipped the collective met the other's next one: a mismatch or a hang)
        with open(f"{folder}/rank{rank}.json", "w") as file:
            json.dump(results, file)
    finally:
        dist.destroy_process_group()


def test_nodes_must_share_settings_data_and_output_folder(tmp_path):
    start_ranks(_rank, (rendezvous(tmp_path), str(tmp_path)), nprocs=2)
    main, other = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2))
    assert main["settings"] == {"type": "ConfigError", "echo": False, "message": "the processes of the job differ in "
                                "their settings: batch_size 32 on rank 0 but 16 on rank 1; x"}
    assert other["settings"]["echo"] and other["settings"]["message"] == main["settings"]["message"]
    assert main["per_node"] is None and other["per_node"] is None  # --data-root, --workers: each node's own
    assert main["data"]["type"] == "DataError" and "names [a, b] on rank 0 but [a, c] on rank 1" in \
        main["data"]["message"]
    assert main["apart"]["type"] == "ConfigError" and other["apart"]["echo"]
    message = main["apart"]["message"]
    assert message.startswith(f"--output-dir {tmp_path / 'out0'}: rank 1 (on ") and \
        f"does not find in its --output-dir {tmp_path / 'out1'} the lock file that the main process holds" in message
    assert main["shared"] is None and other["shared"] is None
    assert main["old_cache"] is None and other["old_cache"] is None and not main["old_cache_kept"]
    assert main["replaced"] == other["replaced"] == ["results.json"]  # (the main process deletes it later otherwise)
    assert main["cache"] is None and other["cache"] is None and not (tmp_path / "shared" / IMAGE_CACHE).exists()


def test_lost_peer_after_last_pth_is_written_says_what_it_holds(tmp_path, monkeypatch):
    """The main process wrote last.pth at the end of epoch 3, then the collective that shares its success met a
    dead peer: the line must not say that last.pth holds epoch 3's first steps only."""
    cfg = parse_config(["--config", DEMO_CONFIG, "--output-dir", str(tmp_path)], "train")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = types.SimpleNamespace(state_dict=lambda: {})
    progress = {"epoch": 2, "saved": 2, "steps_done": 4}
    checkpoints = TrainingCheckpoints(tmp_path / "checkpoints", model.state_dict, {}, cfg, dist_utils.DistInfo(),
                                      optimizer, scheduler, scaler, 5, best={}, progress=progress)

    def gather(obj):
        if obj is None:  # run_on_main sharing that the write succeeded
            raise RuntimeError("Connection reset by peer")
        return [obj]

    monkeypatch.setattr(dist_utils, "all_gather_object", gather)
    with pytest.raises(RuntimeError):
        checkpoints.save_epoch(2, None, [], types.SimpleNamespace(log_epoch=lambda record: None), {"epoch": 3})
    assert torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=False)["epoch"] == 3
    assert progress["saved"] == 3 and progress["steps_done"] == 0
    with pytest.raises(RuntimeError):
        checkpoints.save_position(3, 2, types.SimpleNamespace(state=lambda: {}))
    assert progress["saved"] == 3 and progress["steps_done"] == 2


def test_docs_name_the_per_node_settings():
    text = " ".join((REPO_ROOT / "docs" / "training.md").read_text(encoding="utf-8").split())
    listed = text[text.index("every config key but the per-node "):].split(";")[0]
    assert set(re.findall(r"`(\w+)`", listed)) == set(PER_NODE_KEYS)
