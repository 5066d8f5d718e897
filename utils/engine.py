"""The training loop shared by train.py, train_ImageNet.py and the benchmark: one epoch of SAT
training with gradient accumulation, autocast / grad scaling, DDP and no host-device synchronisation
between logging steps (losses are summed as tensors and read back every ``log_every`` steps)."""
import contextlib
import logging
import math
import time

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from DataLoader.device_transforms import on_device
from Model.losses import sat_loss
from utils.distributed import all_reduce_sum
from utils.errors import DataError, SATError

LOSS_KEYS = ("loss", "ce", "area", "norm")
_logger = logging.getLogger("sat")


class NonFiniteLossError(SATError):
    """The training loss became NaN or infinite."""


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
            f"epoch (global step {first_step + step + 1}); stopping: lower --lr, set --clip-grad or try --no-amp")


def train_one_epoch(model, loader, optimizer, scheduler, *, device, epoch, area_thr, accum_steps=1,
                    autocast=contextlib.nullcontext, scaler=None, clip_grad=None, log_every=20,
                    max_steps=None, world_size=1, progress=True):
    """Train ``model`` (possibly DDP-wrapped) for one pass over ``loader``; ``scheduler`` is stepped
    once per optimizer step. Each loader batch is one micro-batch; ``accum_steps`` micro-batches make
    an optimizer step (the last, partial group of an epoch too). ``max_steps`` stops after that many
    optimizer steps (benchmarks).

    Returns the epoch's averages over all processes: loss, ce, area, norm, acc1 (%), plus lr (last),
    steps, images, num_skipped (unreadable images dropped), time (s) and images_per_sec.
    """
    model.train()
    num_batches = len(loader) if max_steps is None else min(len(loader), max_steps * accum_steps)
    num_steps = math.ceil(num_batches / accum_steps)
    first_step = scheduler.last_epoch  # optimizer steps done before this epoch
    sums = torch.zeros(len(LOSS_KEYS) + 1, device=device)  # loss terms per micro-batch, correct top-1
    counts = torch.zeros(3, dtype=torch.long)  # micro-batches, images, skipped (host ints, no sync)
    window = []  # (optimizer step, loss) since the last read-back
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = tqdm(total=num_batches, desc=f"epoch {epoch + 1}", disable=not progress, dynamic_ncols=True,
               leave=False)
    redirect = logging_redirect_tqdm() if progress else contextlib.nullcontext()
    optimizer.zero_grad(set_to_none=True)
    with bar, redirect:
        for i, batch in enumerate(on_device(loader, device)):
            if i >= num_batches:
                break
            step, position = divmod(i, accum_steps)
            group_size = min(accum_steps, num_batches - step * accum_steps)
            last_of_group = position == group_size - 1
            counts[2] += batch["num_skipped"]
            for message in batch.get("skipped", ()):
                _logger.warning("epoch %d: %s", epoch + 1, message)
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            if len(images):
                # Gradients are all-reduced only on the last micro-batch of an accumulation group.
                sync = contextlib.nullcontext() if last_of_group or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with autocast():
                        logits, maps = model(images)
                    losses = sat_loss(logits, maps, labels, area_thr)
                    loss = losses["loss"] / group_size
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                sums[:-1] += torch.stack([losses[key].detach() for key in LOSS_KEYS])
                sums[-1] += (logits.detach().argmax(dim=1) == labels).sum()
                counts[0] += 1
                counts[1] += len(images)
                window.append((step, losses["loss"].detach()))
            elif world_size > 1:
                raise DataError(f"every image of batch {i} was unreadable; with several processes this would "
                                "desynchronise them: remove the unreadable files")
            if last_of_group:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(
                        [p for group in optimizer.param_groups for p in group["params"]], clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                if window and ((step + 1) % log_every == 0 or step + 1 == num_steps):
                    _check_window(window, first_step, epoch, world_size)
                    window.clear()
                    running = (sums[:-1] / counts[0]).tolist()
                    _logger.info("epoch %d step %d/%d  %s  lr %.3g", epoch + 1, step + 1, num_steps,
                                 "  ".join(f"{k} {v:.4f}" for k, v in zip(LOSS_KEYS, running)), lr)
            bar.update(1)
    elapsed = time.perf_counter() - start
    totals = all_reduce_sum(torch.cat([sums, counts.to(sums.device, sums.dtype)])).tolist()
    loss_sums, correct, batches, images, skipped = totals[:len(LOSS_KEYS)], *totals[len(LOSS_KEYS):]
    stats = {key: value / max(batches, 1) for key, value in zip(LOSS_KEYS, loss_sums)}
    stats.update(acc1=100.0 * correct / max(images, 1), lr=lr, steps=num_steps, images=int(images),
                 num_skipped=int(skipped), time=elapsed, images_per_sec=images / max(elapsed, 1e-9))
    return stats
