"""The shared training loop: accumulation, trainable subsets, AMP on/off, the loss scaler, NaN detection, RNG
state, the evaluation schedule and the best-checkpoint rule."""
import random
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from Model import build_model
from Model.losses import SATLoss
from utils.amp import LossScaler, autocast_context, cpu_supports_bf16
from utils.engine import Meters, NonFiniteLossError, train_one_epoch
from utils.optim import build_optimizer, build_scheduler, set_trainable
from train import per_process_batch
from utils.checkpoint import rng_state, set_rng_state
from utils.config import parse_config
from utils.errors import ConfigError, DataError
from utils.run_folder import check_run_folder, how_to_continue, interrupted_message
from utils.selection import should_evaluate, update_best

NANO = "deit_sat_nano_patch16_224"
IMG = 48


def make_model(seed=0):
    torch.manual_seed(seed)
    return build_model(NANO, num_classes=3, img_size=IMG)


def batches(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(size, 3, IMG, IMG, generator=g), "label": torch.randint(0, 3, (size,), generator=g),
             "num_skipped": 0} for _ in range(n)]


def run(model, loader, accum_steps=1, lr=1e-3, area_thr=0.25, amp=False, **kwargs):
    optimizer = build_optimizer(model, lr, 0.05)
    scheduler = build_scheduler(optimizer, schedule="constant", lr=lr, min_lr=0, epochs=1, warmup_epochs=0,
                                steps_per_epoch=-(-len(loader) // accum_steps))
    stats = train_one_epoch(model, SATLoss(area_thr), loader, optimizer, "cpu", 0, LossScaler("cpu", amp),
                            scheduler=scheduler, accum_steps=accum_steps, autocast=autocast_context("cpu", amp),
                            progress=False, **kwargs)
    return stats, optimizer, scheduler


def test_accumulation_matches_one_large_batch():
    # area_thr below every map mean keeps |mean - thr| linear, so two half batches give the same gradient
    big = batches(2, 8)
    halves = [{"image": b["image"][s], "label": b["label"][s], "num_skipped": 0}
              for b in big for s in (slice(0, 4), slice(4, 8))]
    whole, accumulated = make_model(), make_model()
    stats_whole, _, sched_whole = run(whole, big, area_thr=1e-4)
    stats_acc, _, sched_acc = run(accumulated, halves, accum_steps=2, area_thr=1e-4)
    assert sched_whole.last_epoch == sched_acc.last_epoch == 2 and stats_acc["steps"] == 2
    assert stats_whole["images"] == stats_acc["images"] == 16
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert stats_whole["ce"] == pytest.approx(stats_acc["ce"], rel=1e-3)


def test_epoch_loss_is_a_mean_over_images():
    """A partial last batch counts for its images: the cross-entropy (a per-image mean) of batches of 4 and 2
    equals that of the same 6 images in one batch (lr 1e-12: the same weights); a mean of batch means differs."""
    (six,) = batches(1, 6)
    parts = [{"image": six["image"][s], "label": six["label"][s], "num_skipped": 0} for s in (slice(0, 4), slice(4, 6))]
    whole, _, _ = run(make_model(), [six], lr=1e-12)
    split, _, _ = run(make_model(), parts, lr=1e-12)
    assert split["ce"] == pytest.approx(whole["ce"], abs=1e-6) and split["images"] == 6


def test_partial_accumulation_group_at_epoch_end_still_steps():
    stats, optimizer, scheduler = run(make_model(), batches(5, 2), accum_steps=2)
    assert stats["steps"] == 3 and scheduler.last_epoch == 3


@pytest.mark.parametrize("which", ["sat", "head"])
def test_frozen_parameters_do_not_change(which):
    model = make_model()
    set_trainable(model, which)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    run(model, batches(2, 4))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name


@pytest.mark.parametrize("amp", [False, True])
def test_amp_on_and_off(amp):
    if amp and not cpu_supports_bf16():
        pytest.skip("no native bf16 on this CPU")
    stats, _, _ = run(make_model(), batches(2, 4), amp=amp)
    assert np.isfinite(stats["loss"]) and stats["steps"] == 2


def test_non_finite_loss_names_the_step():
    loader = batches(4, 2)
    loader[2]["image"][0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, optimizer step 3 of the epoch \(global step 3\)"):
        run(make_model(), loader, log_every=100)


def test_a_torch_loader_of_pairs_without_scheduler():
    """As DeiT's engine: a torch DataLoader of (image, label) samples (no num_skipped) and no scheduler (the
    optimizer's lr throughout) train; a non-finite loss then names no global step (no scheduler counts them)."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(6, 3, IMG, IMG, generator=g),
                                          torch.randint(0, 3, (6,), generator=g))
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, SATLoss(0.25), torch.utils.data.DataLoader(data, batch_size=2), optimizer, "cpu", 0,
                            LossScaler("cpu"), progress=False)
    assert stats["images"] == 6 and stats["steps"] == 3 and stats["num_skipped"] == 0 and stats["lr"] == 1e-3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    data.tensors[0][2] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 2 of the epoch; stopping"):
        train_one_epoch(model, SATLoss(0.25), torch.utils.data.DataLoader(data, batch_size=2), optimizer, "cpu", 0,
                        LossScaler("cpu"), progress=False)

def test_skipped_images_counted():
    loader = batches(2, 2)
    loader[0]["num_skipped"] = 1
    stats, _, scheduler = run(make_model(), loader)
    assert stats["steps"] == 2 and scheduler.last_epoch == 2 and stats["images"] == 4 and stats["num_skipped"] == 1


def test_meters_resume_from_sums_no_longer_kept():
    # a mid-epoch last.pth of an earlier version also holds a "batches" sum, which nothing read
    saved = {"images": torch.tensor(4.0, dtype=torch.float64), "batches": torch.tensor(2.0, dtype=torch.float64)}
    meters = Meters(("images",), "cpu", saved)
    assert meters.state() == {"images": torch.tensor(4.0, dtype=torch.float64)}


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_global_batch_split_over_processes_and_accumulation():
    cfg = parse_config(["--batch-size", "64", "--accum-steps", "2"])
    assert per_process_batch(cfg, 4) == 8
    with pytest.raises(ConfigError, match="batch_size 64 .* multiple of processes \\(3\\) x accum_steps \\(2\\)"):
        per_process_batch(cfg, 3)


def test_loss_scaler_unscales_before_clipping_and_skips_overflowing_steps():
    # An enabled GradScaler (the fp16 path): gradients are unscaled before clipping, so the update is the
    # true gradient clipped to norm 1 (hand-checked: grad (3, 4) has norm 5 -> (0.6, 0.8)).
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([p], lr=1.0)
    loss_scaler = LossScaler("cpu")
    loss_scaler.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    norm = loss_scaler((p * torch.tensor([3.0, 4.0])).sum(), optimizer, clip_grad=1.0)
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))
    optimizer.zero_grad()
    loss_scaler((p * float("inf")).sum(), optimizer, clip_grad=1.0)  # overflow: no step, smaller scale
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))
    assert loss_scaler.state_dict()["scale"] == 2.0 ** 11
    # disabled (fp32, bf16): plain backward and step, nothing to save
    fp32 = LossScaler("cpu")
    assert not fp32.scaler.is_enabled() and fp32.state_dict() == {}


def test_a_group_without_gradients_steps_nothing():
    # Every image of an accumulation group unreadable: no gradient at all. With an enabled GradScaler (the fp16
    # path) a step would fail ("No inf checks were recorded for this optimizer"); nothing changes instead.
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([p], lr=1.0)
    loss_scaler = LossScaler("cpu")
    loss_scaler.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    loss_scaler((p * torch.tensor([0.3, 0.4])).sum(), optimizer, clip_grad=1.0)
    optimizer.zero_grad(set_to_none=True)
    assert loss_scaler.step(optimizer, clip_grad=1.0) is None
    torch.testing.assert_close(p.detach(), torch.tensor([-0.3, -0.4]))
    assert loss_scaler.state_dict()["scale"] == 2.0 ** 12


def test_best_checkpoint_rule():
    # Official: each file keeps the first epoch with a strictly higher value; best.pth (selection 'loc')
    # maximises Top-1 Loc + GT-known Loc, best_top1_loc.pth / best_gt_known_loc.pth their own metric.
    history = [(50.0, 70.0), (55.0, 60.0), (52.0, 75.0), (50.0, 77.0), (55.0, 61.0)]  # (top1_loc, gt_known)
    best, improved = {}, []
    for epoch, (top1, gt_known) in enumerate(history):
        metrics = {"top1_loc": top1, "gt_known_loc": gt_known, "top1_cls": 80.0, "best_threshold": 0.3 + epoch / 100}
        improved.append(update_best(best, metrics, "loc", epoch))
    assert {name: entry["epoch"] for name, entry in best.items()} == \
        {"best.pth": 3, "best_top1_loc.pth": 2, "best_gt_known_loc.pth": 4}
    assert best["best.pth"]["value"] == 127.0 and best["best.pth"]["threshold"] == 0.32
    assert improved[4] == [] and improved[1] == ["best_top1_loc.pth"]  # 55 ties 55 and 116 < 127: nothing
    top1 = {}
    for epoch, (t, g) in enumerate(history):
        update_best(top1, {"top1_loc": t, "gt_known_loc": g, "best_threshold": 0.4}, "top1_loc", epoch)
    assert top1["best.pth"]["epoch"] == 2
    # without the sat protocol (wsol, classification only) only best.pth is kept
    pxap = {}
    for epoch, value in enumerate([40.0, 45.0, 45.0]):
        update_best(pxap, {"pxap": value, "top1_cls": 90.0}, "pxap", epoch, sat=False)
    assert list(pxap) == ["best.pth"] and pxap["best.pth"]["epoch"] == 2 and pxap["best.pth"]["threshold"] is None


@pytest.mark.parametrize("epochs, start, every, expected", [
    (30, 26, 1, [26, 27, 28, 29, 30]),  # official CUB
    (3, 26, 1, [3]),  # short runs still evaluate their last epoch
    (10, 1, 4, [4, 8, 10]),
])
def test_evaluation_schedule(epochs, start, every, expected):
    cfg = parse_config(["--epochs", str(epochs), "--eval-start-epoch", str(start), "--eval-every", str(every)])
    assert [e + 1 for e in range(epochs) if should_evaluate(cfg, e)] == expected


def test_ctrl_c_line_says_what_last_pth_holds(tmp_path):
    cfg = parse_config(["--epochs", "30", "--output-dir", str(tmp_path)])
    last = tmp_path / "checkpoints" / "last.pth"

    def line(epoch, saved, steps_done=0):
        return interrupted_message(cfg, {"epoch": epoch, "saved": saved, "steps_done": steps_done},
                                   "python train.py --resume")

    assert line(None, None) == "interrupted before training started; no checkpoint yet; resume with: python " \
                               "train.py --resume"
    assert line(2, 2) == f"interrupted in epoch 3/30; {last} holds 2 finished epoch(s); resume with: python " \
                         "train.py --resume"
    assert line(2, 2, 250) == f"interrupted in epoch 3/30; {last} holds 2 finished epoch(s) and 250 optimizer " \
                              "steps of epoch 3; resume with: python train.py --resume"
    assert line(0, 0, 250).startswith(f"interrupted in epoch 1/30; {last} holds 250 optimizer steps of epoch 1;")
    assert line(30, 30).startswith("interrupted in the final test;")


class SlowLoader:
    """Batches that each take ``seconds`` to arrive, as from an input-bound loader."""

    def __init__(self, batches, seconds):
        self.batches, self.seconds = batches, seconds

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.seconds)
            yield batch


def test_epoch_reports_the_time_spent_waiting_for_data():
    stats, _, _ = run(make_model(), SlowLoader(batches(3, 2), 0.2))
    assert 0.6 <= stats["data_wait"] <= stats["time"]  # three waits of 0.2 s, within the epoch
    stats, _, _ = run(make_model(), batches(3, 2))
    assert 0 <= stats["data_wait"] < 0.2  # batches already in memory


def test_how_to_continue_after_a_file_could_not_be_written(tmp_path):
    resume = "python train.py --output-dir out --resume"
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    # a run started afresh, stopped before its first last.pth: nothing to continue from
    assert how_to_continue(checkpoints, None, resume) == "start again with: python train.py --output-dir out " \
                                                         "--overwrite"
    # resumed from another folder's best.pth (no optimizer state: no last.pth here yet), its copy here first
    other = tmp_path / "other run" / "best.pth"
    assert how_to_continue(checkpoints, other, resume) == f"resume with: {resume} '{other}'"
    (checkpoints / "best.pth").write_bytes(b"")
    assert how_to_continue(checkpoints, other, resume) == f"resume with: {resume} {checkpoints / 'best.pth'}"
    (checkpoints / "last.pth").write_bytes(b"")
    assert how_to_continue(checkpoints, other, resume) == f"resume with: {resume}"


def test_a_batch_of_unreadable_images_alone_stops_several_processes_naming_epoch_and_batch():
    # the line counted batches from 0, without the epoch
    data = batches(3, 2)
    data[1] = {"image": torch.zeros(0, 3, IMG, IMG), "label": torch.zeros(0, dtype=torch.long), "num_skipped": 2}
    with pytest.raises(DataError) as err:
        run(make_model(), data, world_size=2)
    assert str(err.value) == ("epoch 1, batch 2 of 3: every image was unreadable (named above); with several "
                              "processes this would desynchronise them: remove the unreadable files "
                              "(tools/check_dataset.py --split train lists them)")
    stats = run(make_model(), data)[0]  # one process steps on the other batches
    assert stats["images"] == 4 and stats["num_skipped"] == 2


def test_images_per_sec_of_a_resumed_epoch_counts_the_images_trained_since():
    """metrics.jsonl's train_images_per_sec after a mid-epoch resume: the restored sums hold the images of the
    steps before the stop, whose time is not in this call's (ImageNet's one epoch, preempted, read 27,920/s)."""
    from utils.checkpoint import set_schedule

    data, saved = batches(4, 4), {}
    run(make_model(), data, on_step=lambda step, meters: saved.setdefault(  # as last.pth holds them
        step, {name: value.clone() for name, value in meters.state().items()}))
    model = make_model()
    optimizer = build_optimizer(model, 1e-3, 0.05)
    scheduler = build_scheduler(optimizer, schedule="constant", lr=1e-3, min_lr=0, epochs=1, warmup_epochs=0,
                                steps_per_epoch=4)
    set_schedule(optimizer, scheduler, 3)
    stats = train_one_epoch(model, SATLoss(0.25), data[3:], optimizer, "cpu", 0, LossScaler("cpu"),
                            scheduler=scheduler, progress=False, steps_done=3, meters_state=saved[3])
    assert stats["images"] == 16 and stats["steps"] == 4  # the epoch's totals include the restored steps
    assert stats["images_per_sec"] * stats["time"] == pytest.approx(4.0)  # the 4 images trained in the time


@pytest.mark.parametrize("name", ["metrics.json", "per_image.csv", "wsol_curves.json", "wsol_curves.png"])
def test_a_run_does_not_start_beside_any_evaluation_file(tmp_path, name):
    # the files an evaluation writes are one list (utils/outputs.EVALUATION_FILES), read by evaluator.py and here
    (tmp_path / name).write_text("x")
    cfg = SimpleNamespace(resume=None, overwrite=True)
    with pytest.raises(ConfigError, match=rf"holds an evaluator's outputs \({re.escape(name)}\)"):
        check_run_folder(cfg, tmp_path)


def test_resume_from_a_best_file_puts_the_cosine_schedule_at_its_epoch(tmp_path):
    """A best*.pth holds no schedule: resuming from one after epoch 2 of 4 (5 steps each) sets the cosine lr at step
    10 of 20, halfway: (lr + min_lr) / 2 = 5.05e-5 (not restarting the schedule, nor one epoch off: 9.1e-5 at step
    5, 2.6e-5 at step 15)."""
    from utils.checkpoint import restore, save_checkpoint
    from utils.config import config_dict
    cfg = parse_config(["--epochs", "4", "--lr-schedule", "cosine", "--lr", "1e-4", "--min-lr", "1e-6"], "train")
    model = make_model()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, schedule="cosine", lr=1e-4, min_lr=1e-6, epochs=4, warmup_epochs=0,
                                steps_per_epoch=5)
    path = tmp_path / "best.pth"
    save_checkpoint({"model": make_model().state_dict(), "epoch": 2, "config": config_dict(cfg),
                     "selection": {"metric": "loc", "value": 1.0}}, path)  # as train.py writes a best*.pth
    restore(path, cfg, SimpleNamespace(is_main=True, world_size=1, rank=0), model, optimizer, scheduler,
            LossScaler("cpu"), steps_per_epoch=5)
    assert scheduler.last_epoch == 10
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5.05e-5] * len(optimizer.param_groups))


def test_train_one_epoch_refuses_mps_in_one_line_before_training():
    """A Mac user's DeiT-style call with device "mps" (the scripts' --device refuses it): one ConfigError naming the
    device, before the model is touched, not torch's error deep inside (Meters' float64 sums: MPS has none)."""
    model = make_model().eval()
    with pytest.raises(ConfigError, match=r"^train_one_epoch: device mps is not supported .*'cpu' or 'cuda'"):
        train_one_epoch(model, SATLoss(0.25), batches(1, 2), build_optimizer(model, 1e-3, 0.05), "mps", 0,
                        LossScaler("cpu"), progress=False)
    assert not model.training
