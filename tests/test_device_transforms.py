"""The device-side input pipeline gives the tensors of the official torchvision transforms: train
(RandomCrop + flip from the same RNG draws), centre crop, ten-crop and the wsol resize, also through
loader workers and the prefetching iterator."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from DataLoader import build_dataset, build_loader, collate_samples, make_demo_dataset
from DataLoader.device_transforms import batch_on_device, holds_file_bytes, on_device, to_device
from DataLoader.eval_loader import build_eval_loader
from DataLoader.eval_views import EvalViews
from DataLoader.transforms import EvalPixels, TrainPixels, tencrop_boxes, train_transform
from Model import build_model_from_checkpoint
from utils.engine import evaluate

from test_evaluation import save_nano_checkpoint
from test_train_engine import make_model, run

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU (none visible)"))]


def images(n=8, seed=0):
    """RGB images of assorted sizes and aspect ratios, smaller and larger than the resize."""
    rng = np.random.default_rng(seed)
    sizes = [(50, 40), (97, 61), (64, 64), (33, 120), (150, 90), (71, 72), (40, 200), (81, 53)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def batch_of(samples):
    return collate_samples([{"image": s, "label": 0} for s in samples])["image"]


def test_tencrop_boxes_follow_torchvision_order():
    # 8x8 image, 5x5 crops: corners, centre (offset round(1.5) = 2), then the mirrored image's five
    assert tencrop_boxes(8, 5) == [(0, 0, 0), (0, 3, 0), (3, 0, 0), (3, 3, 0), (2, 2, 0),
                                   (0, 3, 1), (0, 0, 1), (3, 3, 1), (3, 0, 1), (2, 1, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("img_size, resize_size", [(64, 72), (64, 75)])  # gap 11: centre offset round(5.5) = 6
def test_train_crops_and_flips_equal_the_official_transform(device, img_size, resize_size):
    pictures = images()
    torch.manual_seed(3)
    official = torch.stack([train_transform(img_size, resize_size)(p) for p in pictures])
    torch.manual_seed(3)
    samples = [TrainPixels(img_size, resize_size)(p) for p in pictures]
    assert {int(s["crops"][2]) for s in samples} == {0, 1}  # both flip branches are exercised
    ours = to_device(batch_of(samples), device)
    assert ours.device.type == device and ours.dtype == torch.float32 and ours.shape == official.shape
    torch.testing.assert_close(ours.cpu(), official, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("protocol, tencrop", [("sat", False), ("sat", True), ("wsol", False), ("both", True)])
@pytest.mark.parametrize("img_size, resize_size", [(64, 72), (64, 75)])
def test_eval_views_equal_the_official_transforms(device, protocol, tencrop, img_size, resize_size):
    pictures = images()
    views = EvalViews(protocol, tencrop, img_size, resize_size)
    official = torch.stack([views(p) for p in pictures])
    ours = to_device(batch_of([views.pixels()(p) for p in pictures]), device)
    num_views = (10 if tencrop else 1) * (protocol != "wsol") + (protocol != "sat")
    assert ours.shape == official.shape == (8, num_views, 3, img_size, img_size)
    torch.testing.assert_close(ours.cpu(), official, rtol=0, atol=1e-6)


def test_loader_workers_draw_the_official_random_crops(tmp_path):
    """Two workers, the same seed: the device path yields the batches of the torchvision path."""
    root = make_demo_dataset(tmp_path / "cub", num_classes=2, train_per_class=6, test_per_class=1, image_size=48)

    def batches(transform):
        dataset = build_dataset("cub", root, "train", transform)
        loader = build_loader(dataset, 4, train=True, workers=2, seed=5)
        return [(b["index"], b["image"]) for b in on_device(loader, "cpu")]

    official, ours = batches(train_transform(40, 44)), batches(TrainPixels(40, 44))
    assert [i for i, _ in official] == [i for i, _ in ours] and len(ours) == 3
    for (_, a), (_, b) in zip(official, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_a_loader_without_workers_is_not_read_ahead(tmp_path, device):
    """Without workers the samples' crops are drawn from torch's RNG as the loader is read. on_device reads no
    batch ahead of such a loader, so that with batch k the caller sees the RNG state right after batch k's
    draws: the state a checkpoint after step k saves, from which a resumed run draws batch k + 1."""
    root = make_demo_dataset(tmp_path / "cub", num_classes=2, train_per_class=6, test_per_class=1, image_size=48)
    loader = build_loader(build_dataset("cub", root, "train", TrainPixels(40, 44)), 4, train=True, workers=0)

    def states(batches):
        loader.sampler.set_epoch(0)
        torch.manual_seed(0)
        return [torch.get_rng_state() for _ in batches]

    alone = states(loader)
    assert len(alone) == 3 and not torch.equal(alone[0], alone[1])
    assert all(torch.equal(a, b) for a, b in zip(alone, states(on_device(loader, device))))


@pytest.mark.parametrize("device", DEVICES)
def test_on_device_keeps_order_and_other_keys(device):
    pictures = images(4)
    loader = [collate_samples([{"image": EvalPixels(1, 0, 32, 36)(p), "label": k, "index": k}])
              for k, p in enumerate(pictures)]
    out = list(on_device(loader, device))
    assert len(on_device(loader, device)) == 4 and [b["index"] for b in out] == [[0], [1], [2], [3]]
    assert all(b["image"].device.type == device and b["image"].shape == (1, 1, 3, 32, 32) for b in out)
    assert all(b["label"].device.type == "cpu" for b in out)  # only the images move
    official = torch.stack([EvalViews("sat", False, 32, 36)(p) for p in pictures])
    torch.testing.assert_close(torch.cat([b["image"].cpu() for b in out]), official, rtol=0, atol=1e-6)


def test_training_and_evaluation_on_pixels_equal_the_official_path(tmp_path):
    """train_one_epoch and evaluate take the uint8 batches (the hooks) and give the same results."""
    root = make_demo_dataset(tmp_path / "cub", num_classes=3, train_per_class=4, test_per_class=2, image_size=56)
    trained = []
    for transform in (train_transform(48, 54), TrainPixels(48, 54)):
        dataset = build_dataset("cub", root, "train", transform)
        model = make_model()
        stats, _, _ = run(model, build_loader(dataset, 4, train=True, workers=0, seed=1))
        trained.append((stats["loss"], [p.detach().clone() for p in model.parameters()]))
    assert trained[0][0] == trained[1][0]
    assert all(torch.equal(a, b) for a, b in zip(trained[0][1], trained[1][1]))

    model, _ = build_model_from_checkpoint(save_nano_checkpoint(tmp_path / "nano.pth"))
    settings = dict(protocol="both", tencrop=True, img_size=64)
    pixels = build_eval_loader("cub", root, "test", batch_size=4, workers=0, **settings)
    assert isinstance(pixels.dataset.transform, EvalPixels)
    official = build_loader(build_dataset("cub", root, "test", EvalViews(**settings)), 4, train=False, workers=0)
    assert evaluate(pixels, model, "cpu", threshold=0.4, per_image=True, progress=False) == \
        evaluate(official, model, "cpu", threshold=0.4, per_image=True, progress=False)


def test_a_torch_loader_of_pairs_on_cuda_is_not_taken_for_file_bytes(monkeypatch):
    """On CUDA, on_device looks at the first batch to choose its background thread (--gpu-decode's file bytes);
    a torch DataLoader's (images, labels) pair, which train_one_epoch takes, failed there ('list indices must be
    integers or slices, not str') before any batch. The preparation (CUDA streams) is stubbed out: CPU only."""
    monkeypatch.setattr(on_device, "_prepared", lambda self, first, rest: ((batch_on_device(b, "cpu"), None)
                                                                          for b in itertools.chain([first], rest)))
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8), torch.arange(4)),
                                        batch_size=2)
    batches = list(on_device(pairs, "cuda"))
    assert [b["label"].tolist() for b in batches] == [[0, 1], [2, 3]]
    assert not holds_file_bytes([torch.zeros(1), torch.zeros(1)]) and not holds_file_bytes({"image": torch.zeros(1)})


@pytest.mark.parametrize("device", DEVICES)
def test_a_torch_loader_of_pairs_through_on_device(device):
    """The same without the stub: on CUDA (the GPU check) the pairs' images are prepared on the side stream."""
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(4, 3, 8, 8), torch.arange(4)),
                                        batch_size=2)
    batches = list(on_device(pairs, device))
    assert [b["label"].tolist() for b in batches] == [[0, 1], [2, 3]]
    assert all(b["image"].device.type == device for b in batches)
    torch.testing.assert_close(torch.cat([b["image"].cpu() for b in batches]), pairs.dataset.tensors[0], rtol=0,
                               atol=0)
