"""Which images the batch area loss averages over: ``global`` under 2-process gloo DDP equals the official
DataParallel loss on the whole batch, ``process`` is each process's own batch, and gradient accumulation
computes it per micro-batch (with DDP, the micro-batches of all processes, all-reducing gradients once
per optimizer step: ``no_sync``). The data make the scope matter: one half of the batch has small maps,
the other large ones, and the area prior lies between the halves' mean areas."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from Model.losses import SATLoss, sat_loss
from utils.amp import LossScaler
from utils.engine import train_one_epoch
from conftest import free_port

AREA_THR = 0.45
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


class Toy(nn.Module):
    """(B, 4, 4) inputs -> logits (B, 3) and maps sigmoid(w x + b) (B, 4, 4): two scalars shape the maps."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.tensor(1.5)), nn.Parameter(torch.tensor(0.2))
        self.c = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return self.c * x.flatten(1)[:, :3], torch.sigmoid(self.w * x + self.b)


def images():
    """Images 0-3 mostly negative (map means ~0.2), 4-7 mostly positive (~0.85)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 4, generator=g) * 0.5
    x[:4] -= 1.5
    x[4:] += 1.5
    return x


def grads(model):
    return torch.stack([p.grad.detach().clone() for p in model.parameters()])


def reference_grads(groups):
    """Gradient of the mean over ``groups`` (lists of image indices) of the SAT loss of each group as one
    batch, in one process: what DataParallel computes when each group is its whole batch."""
    model, x = Toy(), images()
    loss = sum(sat_loss(*model(x[g]), LABELS[g], AREA_THR)["loss"] for g in groups) / len(groups)
    loss.backward()
    return grads(model)


def one_step(model, batches, accum_steps, scope="global"):
    """One optimizer step of the training engine (SGD, lr 1) over ``batches``: returns the update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module = getattr(model, "module", model)
    before = torch.stack([p.detach().clone() for p in module.parameters()])
    criterion = SATLoss(AREA_THR, scope)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    train_one_epoch(model, criterion, batches, optimizer, "cpu", 0, LossScaler("cpu"), scheduler=scheduler,
                    accum_steps=accum_steps, progress=False, world_size=world_size)
    return before - torch.stack([p.detach() for p in module.parameters()])


def batch(indices):
    return {"image": images()[indices], "label": LABELS[indices], "num_skipped": 0}


def _rank(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = {}
        half = list(range(4 * rank, 4 * rank + 4))
        for scope in ("global", "process"):
            model = nn.parallel.DistributedDataParallel(Toy())
            logits, maps = model(images()[half])
            SATLoss(AREA_THR, scope)(logits, maps, LABELS[half])["loss"].backward()
            result[scope] = grads(model.module)
        # accumulation: 2 micro-batches of 2 images per process; count the gradient all-reduces
        model = nn.parallel.DistributedDataParallel(Toy())
        calls = []

        def counting_hook(state, bucket):
            calls.append(1)
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        result["accum_update"] = one_step(model, [batch(half[:2]), batch(half[2:])], accum_steps=2)
        result["allreduces"] = len(calls)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



def test_scopes_under_two_process_ddp_and_accumulation(tmp_path):
    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = reference_grads([list(range(8))])  # DataParallel: one batch of 8
    halves = reference_grads([list(range(4)), list(range(4, 8))])
    assert not torch.allclose(whole, halves, atol=1e-3)  # the data make the scope matter
    for r in ranks:
        torch.testing.assert_close(r["global"], whole, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["process"], halves, atol=1e-6, rtol=1e-5)
    # with accumulation, each micro-batch's area spans the k-th micro-batch of every process
    expected = reference_grads([[0, 1, 4, 5], [2, 3, 6, 7]])
    for r in ranks:
        torch.testing.assert_close(r["accum_update"], expected, atol=1e-6, rtol=1e-5)
        assert r["allreduces"] == 1  # the first micro-batch's backward ran under no_sync


def test_accumulation_computes_the_area_loss_per_micro_batch():
    update = one_step(Toy(), [batch([0, 1, 4, 5]), batch([2, 3, 6, 7])], accum_steps=2)
    torch.testing.assert_close(update, reference_grads([[0, 1, 4, 5], [2, 3, 6, 7]]), atol=1e-6, rtol=1e-5)
    whole = one_step(Toy(), [batch([0, 1, 4, 5, 2, 3, 6, 7])], accum_steps=1)
    torch.testing.assert_close(whole, reference_grads([list(range(8))]), atol=1e-6, rtol=1e-5)
    # micro-batches that each hold one half differ from the whole batch: accumulation changes this loss
    split = one_step(Toy(), [batch([0, 1, 2, 3]), batch([4, 5, 6, 7])], accum_steps=2)
    assert not torch.allclose(split, whole, atol=1e-3)
