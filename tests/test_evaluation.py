"""utils.evaluation: the views, evaluate() against a straightforward per-image recomputation with the
metrics functions, the official fixture boxes through evaluate(), PxAP on synthetic masks, sharding."""
import contextlib
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from DataLoader import build_dataset, load_mask, make_demo_dataset
from DataLoader import transforms as T
from DataLoader.eval_loader import ShardSampler, build_eval_loader
from DataLoader.eval_views import EvalViews, default_resize_size
from Model import build_model, build_model_from_checkpoint, model_spec
from utils.boxes import gt_boxes_sat, gt_boxes_wsol, iou_plus1
from utils.checkpoint import save_checkpoint
from utils import engine
from utils.engine import BatchScorer, box_pool, default_box_processes, evaluate, images_per_forward
from utils.errors import ConfigError
from utils.metrics import (LOC_KEYS, TRAIN_THRESHOLDS, ClassAccumulator, PxAPAccumulator, SATLocAccumulator,
                           WSOLBoxAccumulator)

from conftest import OFFICIAL_ARCH, OFFICIAL_CKPT, OFFICIAL_MODEL_KWARGS, Terminal

ARCH = "deit_sat_nano_patch16_224"
CLASS_NAMES = ["001.Ringed_Disc", "002.Checkered_Square", "003.Striped_Triangle"]  # the demo data's


def tiny_demo(root):
    """CUB-layout demo data: 3 classes, 4 test images each, 64x64."""
    return make_demo_dataset(root, num_classes=3, train_per_class=1, test_per_class=4, image_size=64)


def nano_model(num_classes=3, img_size=64, seed=0):
    torch.manual_seed(seed)
    return build_model(ARCH, num_classes=num_classes, img_size=img_size).eval()


def save_nano_checkpoint(path, num_classes=3, img_size=64, best_thr=0.35):
    model = nano_model(num_classes, img_size)
    names = CLASS_NAMES[:num_classes] + [f"class{k}" for k in range(len(CLASS_NAMES), num_classes)]
    save_checkpoint({"model": model.state_dict(), "epoch": 1, "best_thr": best_thr,
                     **model_spec(model, ARCH, names)}, path)
    return path


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return tiny_demo(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize("protocol,tencrop,views", [("sat", False, 1), ("sat", True, 10), ("wsol", True, 1),
                                                    ("both", False, 2), ("both", True, 11)])
def test_eval_transform_views(protocol, tencrop, views):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8))
    out = EvalViews(protocol, tencrop, img_size=64)(image)
    assert out.shape == (views, 3, 64, 64)
    resize = default_resize_size(64)
    if protocol != "wsol":
        centre = out[4] if tencrop else out[0]
        assert torch.equal(centre, T.test_transform(64, resize)(image))
        if tencrop:
            assert torch.equal(out[:10], T.tencrop_transform(64, resize)(image))
    if protocol != "sat":
        assert torch.equal(out[-1], T.wsol_transform(64)(image))


def _per_image_reference(model, dataset, img_size, thresholds):
    """The metrics of the sat (ten-crop) and wsol protocols, one image and one forward at a time."""
    resize = default_resize_size(img_size)
    ten, plain = T.tencrop_transform(img_size, resize), T.wsol_transform(img_size)
    sat, cls_b, boxes_b = SATLocAccumulator(thresholds, img_size), ClassAccumulator(), WSOLBoxAccumulator()
    with torch.inference_mode():
        for sample in dataset:
            image, label, boxes = sample["image"], torch.tensor([sample["label"]]), sample["boxes"]
            logits, maps = model(ten(image))
            probs = logits.softmax(dim=1).mean(dim=0, keepdim=True)
            sat.update(maps[4:5], [gt_boxes_sat(boxes, image.size, resize, img_size)], probs, label)
            logits_b, map_b = model(plain(image)[None])
            cls_b.update(logits_b, label)
            boxes_b.update(map_b, [gt_boxes_wsol(boxes, image.size)])
    best = sat.compute()
    expected = {key: best[key] for key in ("num_images", "top1_cls", "top5_cls", "best_threshold", "thresholds",
                                           "gt_known_loc_per_threshold", "top1_loc_per_threshold") if key in best}
    expected.update(thresholds=list(thresholds), at_best_threshold={key: best[key] for key in LOC_KEYS})
    expected.update(wsol_top1_cls=cls_b.compute()["top1_cls"], wsol_top5_cls=cls_b.compute()["top5_cls"])
    expected.update({k: v for k, v in boxes_b.compute().items() if k != "num_images"})
    return expected


@pytest.mark.parametrize("img_size, part", [(64, None), (224, None), (224, 16)])
def test_evaluate_equals_per_image_recomputation(demo_root, img_size, part, monkeypatch):
    """Batched ten-crop + the wsol view, 5 x 11 views per batch in one forward or (``part``) in forwards of
    16 images, the size the CPU activation budget then gives == one image at a time."""
    model = nano_model(img_size=img_size)
    if part:  # the nano model's MLP hidden layer at 224 px: 198 tokens x 192 features x 4 bytes per image
        monkeypatch.setattr(engine, "CPU_ACTIVATION_BYTES", part * 198 * 192 * 4 + 100)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(len(args[0])))
    loader = build_eval_loader("cub", demo_root, "test", protocol="both", tencrop=True, img_size=img_size,
                               batch_size=5, workers=0)
    result = evaluate(loader, model, "cpu", thresholds=TRAIN_THRESHOLDS, progress=False, threads=2)
    result.pop("curves")
    assert forwards == ([16, 16, 16, 7] if part else [55]) * 2 + ([16, 6] if part else [22])  # 12 images
    reference = _per_image_reference(model, build_dataset("cub", demo_root, "test", lambda im: im), img_size,
                                     TRAIN_THRESHOLDS)
    assert result == reference
    assert result["num_images"] == 12


def test_cpu_forwards_keep_the_mlp_activation_within_10_mib():
    """DeiT-S at 224 px: 198 tokens x 1,536 hidden features = 1.16 MiB per image in fp32, so 8 images per
    forward (the fastest of 4-32 measured on a 2-core CPU), 17 in bf16; the whole batch on other devices."""
    model, images = build_model("deit_sat_small_patch16_224", num_classes=2), torch.empty(64, 3, 224, 224)
    assert images_per_forward(model, images) == 8 and images_per_forward(model, images.to("meta")) == 64
    with torch.autocast("cpu", torch.bfloat16):
        assert images_per_forward(model, images) == 17


class _FixtureMaps(torch.nn.Module):
    """Stands in for a model: the image filled with value i gets fixture map i and class-i logits."""

    def __init__(self, maps):
        super().__init__()
        self.maps = torch.from_numpy(maps).float()

    def forward(self, x):
        index = x[:, 0, 0, 0].round().long()
        return torch.nn.functional.one_hot(index % 10, 10).float(), self.maps[index]


def test_evaluate_reproduces_official_fixture_boxes(official_boxes):
    """The official boxes of the fixture maps, through evaluate(): GT = the official box at 0.4 (as an
    original-image box of a 256x256 image), so each threshold's hits follow from the official boxes."""
    maps, thresholds, official = official_boxes["maps"], official_boxes["thresholds"], official_boxes["boxes"]
    gt = np.minimum(official[:, 2], 223)
    labels = np.arange(len(maps)) % 10
    labels[::3] = (labels[::3] + 1) % 10  # every third image misclassified
    batches = []
    for start in range(0, len(maps), 16):
        index = list(range(start, min(start + 16, len(maps))))
        batches.append({"image": torch.tensor(index).float().view(-1, 1, 1, 1).expand(-1, 3, 224, 224),
                        "label": torch.from_numpy(labels[index]), "size": [(256, 256)] * len(index),
                        "boxes": [torch.tensor(gt[i][None] + 16.0) for i in index],  # crop frame + 16
                        "image_id": [str(i) for i in index], "index": index})
    result = evaluate(batches, _FixtureMaps(maps), "cpu", thresholds=thresholds, views=EvalViews("sat", img_size=224),
                      progress=False)

    ious = np.stack([iou_plus1(official[:, t], gt).diagonal() for t in range(len(thresholds))], axis=1)
    hit, top1 = ious >= 0.5, labels == np.arange(len(maps)) % 10
    best = int(np.argmax(hit.sum(0) + (hit & top1[:, None]).sum(0)))
    np.testing.assert_allclose(result["gt_known_loc_per_threshold"], 100 * hit.mean(0))
    np.testing.assert_allclose(result["top1_loc_per_threshold"], 100 * (hit & top1[:, None]).mean(0))
    assert result["best_threshold"] == pytest.approx(thresholds[best]) and "gt_known_loc" not in result
    for level in (30, 50, 70):
        assert result["at_best_threshold"][f"iou{level}"] == pytest.approx(100 * (ious[:, best] >= level / 100).mean())
    assert result["top1_cls"] == pytest.approx(100 * top1.mean())


def test_official_release_checkpoint_through_evaluate(official_outputs):
    """The release-format fixture loads with --arch and its classification comes out of evaluate()."""
    model, meta = build_model_from_checkpoint(OFFICIAL_CKPT, arch=OFFICIAL_ARCH, **OFFICIAL_MODEL_KWARGS)
    labels = official_outputs["logits_test"].argmax(dim=1)
    batch = {"image": official_outputs["input"], "label": labels,
             "boxes": [torch.tensor([[16.0, 16.0, 200.0, 200.0]])] * 2, "size": [(256, 256)] * 2,
             "image_id": list("ab"), "index": [0, 1]}
    result = evaluate([batch], model, "cpu", threshold=meta["best_thr"], views=EvalViews("sat"), progress=False)
    assert result["num_images"] == 2 and result["top1_cls"] == 100.0


def _write_mask_dataset(root):
    """wsolevaluation OpenImages-style metadata: two 48x48 images, instance masks and an ignore mask."""
    images, meta = root / "images", root / "metadata" / "test"
    meta.mkdir(parents=True)
    ids, lines = ["test/a/x.jpg", "test/b/y.jpg"], []
    rng = np.random.default_rng(0)
    for k, image_id in enumerate(ids):
        (images / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(images / image_id)
        mask, ignore = np.zeros((48, 48), np.uint8), np.zeros((48, 48), np.uint8)
        mask[8 + k * 10:30 + k * 10, 6:40] = 255
        ignore[:, :4] = 255
        (images / "masks").mkdir(exist_ok=True)
        Image.fromarray(mask).save(images / f"masks/{k}_m.png")
        Image.fromarray(ignore).save(images / f"masks/{k}_ig.png")
        lines.append(f"{image_id},masks/{k}_m.png,masks/{k}_ig.png")
    (meta / "image_ids.txt").write_text("\n".join(ids) + "\n")
    (meta / "class_labels.txt").write_text(f"{ids[0]},0\n{ids[1]},1\n")
    (meta / "localization.txt").write_text("\n".join(lines) + "\n")
    return images, root / "metadata"


def test_pxap_on_synthetic_masks(tmp_path):
    images, metadata = _write_mask_dataset(tmp_path)
    model = nano_model(num_classes=2)
    loader = build_eval_loader("wsol", images, "test", protocol="wsol", tencrop=False, img_size=64, batch_size=4,
                               workers=0, metadata_root=metadata)
    result = evaluate(loader, model, "cpu", progress=False)
    assert "maxboxacc" not in result and 0 <= result["pxap"] <= 100

    dataset = build_dataset("wsol", images, "test", lambda im: im, metadata_root=metadata)
    with torch.inference_mode():  # the same batch of two as evaluate's, for identical float results
        _, loc_maps = model(torch.stack([T.wsol_transform(64)(sample["image"]) for sample in dataset]))
    expected = PxAPAccumulator()
    for sample, loc_map in zip(dataset, loc_maps):
        foreground, ignore = load_mask(sample["mask_paths"], sample["ignore_path"], 224)
        expected.update(loc_map[None], foreground[None], ignore[None])
    assert result["pxap"] == expected.compute()["pxap"]
    with pytest.raises(ConfigError, match="eval_protocol sat needs boxes"):
        build_eval_loader("wsol", images, "test", protocol="sat", tencrop=False, img_size=64, batch_size=4, workers=0,
                          metadata_root=metadata)


@pytest.mark.parametrize("wsol_threshold", [None, 0.5])  # drawn once PxAP's threshold is known / at once
def test_mask_data_overlays_outline_the_gt_mask_in_red(tmp_path, wsol_threshold):
    """On mask data the overlays' ground truth is the mask's outline (they drew none: no boxes), in the wsol 224 x
    224 frame: image 0's mask, rows 8-29 and columns 6-39 of 48, is rows 37-139 and columns 28-186 there."""
    images, metadata = _write_mask_dataset(tmp_path)
    loader = build_eval_loader("wsol", images, "test", protocol="wsol", tencrop=False, img_size=64, batch_size=4,
                               workers=0, metadata_root=metadata)
    evaluate(loader, nano_model(num_classes=2), "cpu", progress=False, overlay_dir=tmp_path / "overlays",
             wsol_threshold=wsol_threshold)
    red = (np.asarray(Image.open(tmp_path / "overlays" / "test/a/x.png").convert("RGB")) == (255, 0, 0)).all(-1)
    rows, columns = np.nonzero(red)
    assert abs(rows.min() - 37) <= 1 and abs(rows.max() - 139) <= 1
    assert abs(columns.min() - 28) <= 1 and abs(columns.max() - 186) <= 1
    assert not red[50:130, 40:175].any()  # an outline, inside it the heat map


def test_shard_sampler_covers_each_index_once():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert [len(ShardSampler(10, rank, 3)) for rank in range(3)] == [4, 3, 3]
    assert list(ShardSampler(2, 2, 3)) == []


def test_evaluation_loader_draws_nothing_from_the_global_rng(demo_root):
    """Evaluating during training must not move torch's global RNG: the training crops and flips after an
    evaluation (and so the trained model) would otherwise depend on the evaluation schedule."""
    loader = build_eval_loader("cub", demo_root, "test", protocol="sat", tencrop=False, img_size=64, batch_size=4,
                               workers=0)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    assert sum(len(batch["label"]) for batch in loader) == len(loader.dataset)
    assert torch.equal(torch.rand(4), expected)


def test_evaluate_argument_errors(demo_root):
    model = nano_model()
    loader = build_eval_loader("cub", demo_root, "test", protocol="sat", tencrop=False, img_size=64, batch_size=4,
                               workers=0)
    with pytest.raises(ValueError, match="do not fit EvalViews"):
        evaluate(loader, model, "cpu", threshold=0.4, views=EvalViews("sat", tencrop=True, img_size=64), progress=False)
    with pytest.raises(ValueError, match="ShardSampler"):
        evaluate(loader, model, "cpu", threshold=0.4, distributed=True, progress=False)
    with pytest.raises(ConfigError, match="reported threshold"):
        evaluate(loader, model, "cpu", thresholds=[0.3, 0.4], per_image=True, progress=False)
    with pytest.raises(ConfigError, match=r"views are 64 x 64 pixels, the model takes 96 x 96: .*img_size=96"):
        evaluate(loader, nano_model(img_size=96), "cpu", threshold=0.4, progress=False)  # not timm's AssertionError
    with pytest.raises(ConfigError, match="the loader's dataset has 3 classes, the model 2"):
        evaluate(loader, nano_model(num_classes=2), "cpu", threshold=0.4, progress=False)  # not Top-1 Cls 0 silently



def test_a_loader_without_eval_views_is_a_one_line_error(demo_root):
    """build_dataset's default test transform (a Compose) or a plain torch loader give no protocol: a ConfigError
    naming the dataset and transform and the ways to give EvalViews, not an AttributeError."""
    dataset = build_dataset("cub", demo_root, "test")
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    with pytest.raises(ConfigError, match=r"\(WSOLDataset, transform Compose\) has no EvalViews.*build_eval_loader"):
        evaluate(loader, nano_model(), "cpu", threshold=0.4, progress=False)
    with pytest.raises(ConfigError, match=r"\(NoneType, transform NoneType\) has no EvalViews"):
        evaluate([], nano_model(), "cpu", threshold=0.4, progress=False)

def test_box_process_pool_gives_the_same_numbers(demo_root):
    model = nano_model()
    loader = build_eval_loader("cub", demo_root, "test", protocol="both", tencrop=True, img_size=64, batch_size=3,
                               workers=0)
    settings = dict(threshold=0.4, thresholds=TRAIN_THRESHOLDS, per_image=True, progress=False)
    threads = evaluate(loader, model, "cpu", **settings)
    processes = evaluate(loader, model, "cpu", box_processes=2, **settings)
    assert processes == threads and len(processes["per_image"]) == 12


def test_an_evaluation_without_per_image_rows_builds_none(demo_root, monkeypatch):
    """A training-time evaluation (per_image=False) makes no per-image rows (50 MiB per 50k images, unused)
    and gives the same metrics."""
    loader = build_eval_loader("cub", demo_root, "test", protocol="both", tencrop=False, img_size=64, batch_size=4,
                               workers=0)
    settings = dict(threshold=0.4, thresholds=TRAIN_THRESHOLDS, progress=False, threads=1)
    with_rows = evaluate(loader, nano_model(), "cpu", per_image=True, **settings)
    monkeypatch.setattr(BatchScorer, "_rows", lambda *args: pytest.fail("per-image rows built"))
    without = evaluate(loader, nano_model(), "cpu", **settings)
    assert without == {key: value for key, value in with_rows.items() if key not in ("per_image", "per_class")}


def _parent_has_torch_loaded():
    """In a box-pool process: whether the process it was forked from (the fork server) has torch's library mapped."""
    with open(f"/proc/{os.getppid()}/maps") as maps:
        return "libtorch" in maps.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc (Linux)")
def test_box_pool_processes_are_forked_from_a_server_that_imported_torch():
    """The fork server imports utils.engine (torch, OpenCV) before it forks, so that the processes of each pool
    do not import them again (11 s per evaluation on a 16-core GPU machine)."""
    with box_pool(1, processes=2) as pool:
        assert pool.submit(_parent_has_torch_loaded).result()


def _freed_memory_kept():
    from utils import host_memory
    return host_memory._kept


def test_box_pool_processes_keep_their_freed_host_memory():
    """The fork server is a fresh interpreter (no fork of the script's process, which selected its device), so each
    box process sets utils.host_memory's thresholds itself, as every other process of the scripts has them."""
    with box_pool(1, processes=1) as pool:
        assert pool.submit(_freed_memory_kept).result() is not None


@pytest.mark.parametrize("device, cpus, local, expected", [
    ("cuda", 16, 1, 8), ("cuda", 64, 1, 8), ("cuda", 8, 1, 4), ("cuda", 4, 1, 2), ("cuda", 2, 1, 0),
    ("cuda", 64, 8, 4), ("cuda", 16, 8, 0), ("cpu", 16, 1, 0)])
def test_box_processes_default_scales_on_gpu_machines_only(monkeypatch, device, cpus, local, expected):
    """README (Performance): on a GPU machine a thread pool halves the evaluation rate (GIL); CPU runs keep
    threads; the processes of one node share its CPUs."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))  # the CPUs this process may use
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert default_box_processes(device) == expected


def test_wsol_protocol_alone_classifies_its_own_view(demo_root):
    """Under --eval-protocol wsol the plain top1_cls / top5_cls are the wsol view's (under both: wsol_top1_cls),
    recomputed here one image at a time (docs/evaluation.md, the wsol protocol)."""
    model = nano_model(img_size=64)
    loader = build_eval_loader("cub", demo_root, "test", protocol="wsol", tencrop=False, img_size=64, batch_size=5,
                               workers=0)
    result = evaluate(loader, model, "cpu", progress=False, threads=2)
    reference = _per_image_reference(model, build_dataset("cub", demo_root, "test", lambda im: im), 64,
                                     TRAIN_THRESHOLDS)
    assert (result["top1_cls"], result["top5_cls"]) == (reference["wsol_top1_cls"], reference["wsol_top5_cls"])
    assert "wsol_top1_cls" not in result and result["maxboxaccv2"] == reference["maxboxaccv2"]


def test_an_empty_mask_is_warned(tmp_path, caplog):
    images, metadata = _write_mask_dataset(tmp_path)
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(images / "masks/1_m.png")  # image 1's object: gone
    loader = build_eval_loader("wsol", images, "test", protocol="wsol", tencrop=False, img_size=64, batch_size=4,
                               workers=0, metadata_root=metadata)
    with caplog.at_level("WARNING", logger="sat"):
        result = evaluate(loader, nano_model(num_classes=2), "cpu", progress=False)
    assert result["empty_masks"] == 1
    assert caplog.messages == ["1 of the 2 images have a mask with no foreground pixel (at 224 x 224): PxAP counts "
                               "all their pixels as background; check those mask files"]


class _CropLogits(torch.nn.Module):
    """Stands in for a model: crop k of the ten (its pixels filled with k) gets logits [20, 0] for k = 0, else
    [0, 1], and the map filled with k."""

    def forward(self, x):
        crop = x[:, 0, 0, 0].round()
        logits = torch.where((crop == 0)[:, None], torch.tensor([20.0, 0.0]), torch.tensor([0.0, 1.0]))
        return logits, crop[:, None, None].expand(-1, 2, 2)


def test_tencrop_scores_are_the_mean_of_the_ten_softmaxes_and_the_map_the_centre_crops():
    """Official ten-crop: softmax per crop, then the mean (0.342 / 0.658 here: class 1), not the mean of the
    logits (2.0 / 0.9: class 0); the map is crop 4's (the centre crop)."""
    images = torch.arange(10.0).view(1, 10, 1, 1, 1).expand(1, 10, 3, 16, 16)
    scores, maps = engine.forward_views(_CropLogits(), images, EvalViews("sat", tencrop=True, img_size=16),
                                        contextlib.nullcontext).numpy()["sat"]
    p = 1 / (1 + np.exp(-1.0))  # softmax([0, 1])[1]
    np.testing.assert_allclose(scores, [[(1 + 9 * (1 - p)) / 10, 9 * p / 10]], rtol=1e-6)
    assert (maps == 4).all()


def test_the_eval_progress_bar_is_cleared_when_done(monkeypatch):
    """The eval bar leaves no finished line on the terminal (training evaluates each epoch: one left-over
    'eval: 100%' line per epoch among its log lines); the line after it says how the evaluation went."""
    model = nano_model(num_classes=2)
    batch = {"image": torch.randn(2, 3, 64, 64), "label": torch.tensor([0, 1]),
             "boxes": [torch.tensor([[4.0, 4.0, 40.0, 40.0]])] * 2, "size": [(64, 64)] * 2,
             "image_id": list("ab"), "index": [0, 1]}
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    evaluate([batch, batch], model, "cpu", threshold=0.5, views=EvalViews("sat", img_size=64), progress=True)
    err = terminal.getvalue()
    assert "eval" in err and "\n" not in err and not err.rstrip("\r").split("\r")[-1].strip(), repr(err)
