"""Distributed evaluation with two gloo processes: disjoint shards without padding duplicates, counters
summed so that both ranks return the single-process metrics, each rank writing its own localization maps."""
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from DataLoader import make_demo_dataset
from DataLoader.eval_loader import build_eval_loader
from utils.checkpoint import build_model_from_checkpoint
from utils.engine import evaluate

from test_evaluation import save_nano_checkpoint
from conftest import free_port

SETTINGS = dict(protocol="both", tencrop=True, img_size=64, batch_size=2, workers=0)


def _evaluate(root, checkpoint, distributed, scoremaps):
    model, _ = build_model_from_checkpoint(checkpoint)
    loader = build_eval_loader("cub", root, "test", distributed=distributed, **SETTINGS)
    return evaluate(loader, model, "cpu", threshold=0.4, distributed=distributed, save_maps=scoremaps,
                    per_image=True, progress=False)


def _rank(rank, port, root, checkpoint, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = _evaluate(root, checkpoint, True, os.path.join(out_dir, "scoremaps"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"result": result, "shard": len(build_eval_loader("cub", root, "test", distributed=True,
                                                                           **SETTINGS).sampler)}, f)
    finally:
        dist.destroy_process_group()



def test_two_process_evaluation_equals_single_process(tmp_path):
    # 9 test images: DistributedSampler would pad the two shards to 5 + 5
    root = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=1, test_per_class=3, image_size=64)
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    # fork: the children reuse the imported modules (spawn would re-import torch and timm, ~5 s); not
    # once CUDA is initialised in this process (earlier tests on a GPU machine): a forked child cannot use it
    mp.start_processes(_rank, args=(free_port(), str(root), str(checkpoint), str(tmp_path)), nprocs=2,
                       start_method="spawn" if torch.cuda.is_initialized() else "fork")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _evaluate(root, checkpoint, False, None)
    finally:
        torch.set_num_threads(threads)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["shard"] for r in ranks] == [5, 4]
    single = json.loads(json.dumps(single))  # the same int-keyed dicts as the ranks' JSON
    assert ranks[0]["result"] == ranks[1]["result"] == single
    assert single["num_images"] == 9
    assert [len(list((tmp_path / "scoremaps" / key).rglob("*.npy"))) for key in ("sat", "wsol")] == [9, 9]
