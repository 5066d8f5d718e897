"""The training loop shared by train.py, train_ImageNet.py and the benchmark, in the shape of MAE's
``engine_finetune.train_one_epoch``: forward under autocast, the SAT criterion, then the loss scaler does
backward, clipping and the optimizer step. Gradient accumulation, DDP (``no_sync`` between the micro-batches
of a step) and no host-device synchronisation between logging steps: the meters sum tensors on the device
and are read back every ``log_every`` optimizer steps."""
import contextlib
import logging
import math
import time

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from DataLoader.device_transforms import on_device
from utils.distributed import all_reduce_sum
from utils.errors import DataError, SATError

LOSS_KEYS = ("loss", "ce", "area", "norm")
_logger = logging.getLogger("sat")


class NonFiniteLossError(SATError):
    """The training loss became NaN or infinite."""


class Meters:
    """Named sums kept as device tensors (adding never waits for the device); ``totals()`` sums them over
    the processes in one all-reduce and reads them back."""

    def __init__(self, names, device, state=None):
        self.sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in names}
        for name, value in (state or {}).items():
            self.sums[name] += value.to(device)

    def state(self):
        """This process's sums, on the CPU (saved with a mid-epoch last.pth)."""
        return {name: value.cpu() for name, value in self.sums.items()}

    def update(self, **values):
        for name, value in values.items():
            self.sums[name] += value

    def totals(self):
        values = all_reduce_sum(torch.stack(list(self.sums.values()))).tolist()
        return dict(zip(self.sums, values))


def _check_window(window, first_step, epoch, world_size):
    """Raise NonFiniteLossError naming the first optimizer step whose loss (averaged over the
    processes) is not finite; ``window`` holds one loss tensor per micro-batch since the last check.
    One host-device sync (and one all-reduce with DDP) per call."""
    losses = all_reduce_sum(torch.stack([loss for _, loss in window])) / world_size
    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
    if bad:
        step = window[bad[0]][0]
        raise NonFiniteLossError(
            f"training loss is {losses[bad[0]].item()} at epoch {epoch + 1}, optimizer step {step + 1} of the "
            f"epoch (global step {first_step + step + 1}); stopping: lower --lr, set --clip-grad or leave out --amp")


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, loss_scaler, *, scheduler, accum_steps=1,
                    autocast=contextlib.nullcontext, clip_grad=None, log_every=20, max_steps=None, world_size=1,
                    progress=True, start_step=0, meters_state=None, on_step=None):
    """Train ``model`` (possibly DDP-wrapped) for one pass over ``loader``.

    ``criterion(logits, maps, labels)`` returns the loss terms (Model.losses.SATLoss); ``loss_scaler``
    (utils.amp.LossScaler) does backward, clipping to ``clip_grad`` and the step; ``scheduler`` is stepped
    once per optimizer step. Each loader batch is one micro-batch; ``accum_steps`` micro-batches make an
    optimizer step (the last, partial group of an epoch too), each backpropagating its loss divided by the
    group size, so the batch area loss is computed per micro-batch. ``max_steps`` stops after that many
    optimizer steps (benchmarks).

    Mid-epoch resume: ``start_step`` optimizer steps of the epoch are done (the loader then yields only the
    rest, see DataLoader.sampler) and ``meters_state`` holds their sums. ``on_step(steps_done, meters)`` is
    called after each optimizer step (utils.preemption.StepCheckpoint: saves last.pth, may stop the run).

    Returns the epoch's averages over all processes: loss, ce, area, norm (per micro-batch), acc1 (%),
    plus lr (last), steps, images, num_skipped (unreadable images dropped), time (s), images_per_sec and
    data_wait (s of ``time`` this process waited for the loader: the loop is input-bound when it is large).
    """
    model.train()
    done = start_step * accum_steps  # micro-batches of the epoch before this call
    num_batches = done + len(loader) if max_steps is None else min(done + len(loader), max_steps * accum_steps)
    num_steps = math.ceil(num_batches / accum_steps)
    first_step = scheduler.last_epoch - start_step  # optimizer steps done before this epoch
    meters = Meters((*LOSS_KEYS, "correct", "batches", "images", "skipped"), device, meters_state)
    window = []  # (optimizer step, loss) since the last read-back
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = tqdm(total=num_batches, initial=done, desc=f"epoch {epoch + 1}", disable=not progress, dynamic_ncols=True,
               leave=False)
    redirect = logging_redirect_tqdm() if progress else contextlib.nullcontext()
    optimizer.zero_grad(set_to_none=True)
    with bar, redirect:
        loaded = on_device(loader, device)
        for i, batch in enumerate(loaded, start=done):
            if i >= num_batches:
                break
            step, position = divmod(i, accum_steps)
            group_size = min(accum_steps, num_batches - step * accum_steps)
            last_of_group = position == group_size - 1
            meters.update(skipped=batch["num_skipped"])
            for message in batch.get("skipped", ()):
                _logger.warning("epoch %d: %s", epoch + 1, message)
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            if not len(images) and world_size > 1:
                raise DataError(f"every image of batch {i} was unreadable; with several processes this would "
                                "desynchronise them: remove the unreadable files")
            if len(images):
                # Gradients are all-reduced only on the last micro-batch of an accumulation group.
                sync = contextlib.nullcontext() if last_of_group or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with autocast():
                        logits, maps = model(images)
                    losses = criterion(logits, maps, labels)
                    loss_scaler(losses["loss"] / group_size, optimizer, clip_grad=clip_grad, update_grad=last_of_group)
                meters.update(**{key: losses[key].detach() for key in LOSS_KEYS}, batches=1, images=len(images),
                              correct=(logits.detach().argmax(dim=1) == labels).sum())
                window.append((step, losses["loss"].detach()))
            elif last_of_group:  # every image of the group's last micro-batch was unreadable: step on the rest
                loss_scaler.step(optimizer, clip_grad=clip_grad)
            if last_of_group:
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                if window and ((step + 1) % log_every == 0 or step + 1 == num_steps):
                    _check_window(window, first_step, epoch, world_size)
                    window.clear()
                    sums = torch.stack([meters.sums[key] for key in (*LOSS_KEYS, "batches")]).tolist()
                    _logger.info("epoch %d step %d/%d  %s  lr %.3g", epoch + 1, step + 1, num_steps,
                                 "  ".join(f"{k} {v / sums[-1]:.4f}" for k, v in zip(LOSS_KEYS, sums)), lr)
                if on_step is not None:
                    on_step(step + 1, meters)
            bar.update(1)
    elapsed = time.perf_counter() - start
    totals = meters.totals()
    batches, images = max(totals["batches"], 1), totals["images"]
    stats = {key: totals[key] / batches for key in LOSS_KEYS}
    stats.update(acc1=100.0 * totals["correct"] / max(images, 1), lr=lr, steps=num_steps, images=int(images),
                 num_skipped=int(totals["skipped"]), time=elapsed, images_per_sec=images / max(elapsed, 1e-9),
                 data_wait=loaded.wait)
    return stats
