"""Which images the batch area loss averages over: ``global`` (and a group size of the whole batch) under
2-process gloo DDP equals the official DataParallel loss on the whole batch, ``process`` (and a group size
of one process's batch) is each process's own batch, a group size N gives on 1, 2 or 4 processes the loss
on the concatenated batch cut into groups of N, and gradient accumulation computes it per micro-batch
(with DDP, the micro-batches of all processes, all-reducing gradients once per optimizer step:
``no_sync``). The data make the scope matter: one half of the batch has small maps, the other large ones,
and the area prior lies between the halves' mean areas."""
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from Model.losses import SATLoss, area_span, batch_area_loss, normalization_loss, sat_loss
from utils.amp import LossScaler
from utils.engine import train_one_epoch
from conftest import rendezvous, start_ranks

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


def _rank(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        result = {}
        half = list(range(4 * rank, 4 * rank + 4))
        for scope in ("global", "process", 8, 4):
            model = nn.parallel.DistributedDataParallel(Toy())
            logits, maps = model(images()[half])
            SATLoss(AREA_THR, scope, micro_batch=4)(logits, maps, LABELS[half])["loss"].backward()
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
    start_ranks(_rank, (rendezvous(tmp_path), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = reference_grads([list(range(8))])  # DataParallel: one batch of 8
    halves = reference_grads([list(range(4)), list(range(4, 8))])
    assert not torch.allclose(whole, halves, atol=1e-3)  # the data make the scope matter
    for r in ranks:
        for scope, expected in (("global", whole), (8, whole), ("process", halves), (4, halves)):
            torch.testing.assert_close(r[scope], expected, atol=1e-6, rtol=1e-5)
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


# A group size N: the global micro-batch of 16 maps cut into consecutive groups of N, one area term each.
NUM_MAPS, GROUP_SCOPES = 16, (4, 8, 6, "global")


def global_maps():
    """16 maps of 3x3 (with logits and labels): mean areas ~0.25, 0.7, 0.45, 0.3 by quarters, so that groups of
    4, 6, 8 and 16 give four different area terms."""
    maps = torch.rand(NUM_MAPS, 3, 3, generator=torch.Generator().manual_seed(2))
    maps[:8] *= 0.5
    maps[4:8] += 0.4
    maps[12:] *= 0.6
    return maps, torch.randn(NUM_MAPS, 5, generator=torch.Generator().manual_seed(2)), torch.arange(NUM_MAPS) % 5


def reference(groups, full=True):
    """(area term, gradient w.r.t. every map, loss) of one process holding all 16 maps: the mean over ``groups``
    (lists of map indices) of |mean area - AREA_THR|, plus (``full``) cross-entropy and normalization over
    the 16 maps."""
    maps, logits, labels = global_maps()
    maps.requires_grad_(True)
    areas = maps.flatten(1).mean(dim=1)
    area = torch.stack([(areas[g].mean() - AREA_THR).abs() for g in groups]).mean()
    loss = F.cross_entropy(logits, labels) + area + normalization_loss(maps) if full else area
    loss.backward()
    return area.detach(), maps.grad, loss.detach()


def consecutive(size, count=NUM_MAPS):
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def group_cases(rank, world_size):
    """Each case's area term, gradient w.r.t. this process's maps divided by the number of processes (what
    DDP's averaging leaves) and loss, with the warnings the loss raised."""
    micro = NUM_MAPS // world_size
    mine = slice(rank * micro, (rank + 1) * micro)
    result = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scope in (*GROUP_SCOPES, "process"):
            maps, logits, labels = (t[mine] for t in global_maps())
            maps.requires_grad_(True)
            losses = SATLoss(AREA_THR, scope, micro_batch=micro)(logits, maps, labels)
            losses["loss"].backward()
            result[scope] = (losses["area"], maps.grad / world_size, losses["loss"].detach())
        if world_size == 2:  # rank 1 dropped its last image: the groups keep their places
            maps = global_maps()[0][mine][:micro - rank].requires_grad_(True)
            area = batch_area_loss(maps, AREA_THR, 4, micro_batch=micro)
            area.backward()
            result["dropped"] = (area.detach(), maps.grad / world_size, area.detach())
            maps = global_maps()[0][mine][:2].requires_grad_(True)  # a partial last batch: 2 images each
            area = batch_area_loss(maps, AREA_THR, 4, micro_batch=micro)
            area.backward()
            result["partial"] = (area.detach(), maps.grad / world_size, area.detach())
            try:
                batch_area_loss(maps, AREA_THR, 4)
            except ValueError as err:  # each process's own count of groups could desynchronise them
                result["error"] = str(err)
    result["warnings"] = [str(w.message) for w in caught]
    return result


def _group_rank(rank, world_size, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        torch.save(group_cases(rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_group_cases(world_size, out_dir):
    """group_cases of every rank of ``world_size`` gloo processes (in this process when 1)."""
    if world_size == 1:
        return [group_cases(0, 1)]
    out_dir.mkdir()
    start_ranks(_group_rank, (world_size, rendezvous(out_dir), str(out_dir)), nprocs=world_size)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


def check_case(ranks, case, expected):
    """Every rank's area term is the reference's (``process``: their mean, each rank has its own), the ranks'
    gradients, in rank order, are its gradient, and their mean loss (what DDP optimises) is its loss."""
    area, grad, loss = expected
    areas = [r[case][0] for r in ranks]
    for value in [torch.stack(areas).mean()] if case == "process" else areas:
        torch.testing.assert_close(value, area, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r[case][1] for r in ranks]), grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(torch.stack([r[case][2] for r in ranks]).mean(), loss, atol=1e-6, rtol=1e-5)


def test_group_size_gives_the_same_loss_on_1_2_and_4_processes(tmp_path):
    expected = {scope: reference(consecutive(NUM_MAPS if scope == "global" else scope)) for scope in GROUP_SCOPES}
    assert len({round(expected[scope][0].item(), 2) for scope in GROUP_SCOPES}) == len(GROUP_SCOPES)  # groups matter
    for world_size in (1, 2, 4):
        ranks = run_group_cases(world_size, tmp_path / str(world_size))
        for scope in GROUP_SCOPES:
            check_case(ranks, scope, expected[scope])
        check_case(ranks, "process", reference(consecutive(NUM_MAPS // world_size)))
        assert all(r["warnings"] == [] for r in ranks)  # no deprecated collective
        if world_size == 2:  # rank 1 without its last image; then 2 images each (groups 1 and 3 empty)
            area, grad, loss = reference([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14]], full=False)
            check_case(ranks, "dropped", (area, grad[:15], loss))
            area, grad, loss = reference([[0, 1], [8, 9]], full=False)
            check_case(ranks, "partial", (area, torch.cat([grad[:2], grad[8:10]]), loss))
            assert all("needs micro_batch" in r["error"] for r in ranks)


def test_area_span():
    assert area_span("global", 64, 8) == 512 and area_span("process", 64, 8) == 64
    assert area_span(128, 64, 8) == 128 and area_span(128, 512, 1) == 128 and area_span(128, 32, 2) == 64
