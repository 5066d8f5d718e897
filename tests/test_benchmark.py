"""tools/benchmark.py in a small configuration: it runs the engine paths and reports sane numbers."""
import json

import pytest
import torch

from DataLoader import make_demo_dataset
from tools.benchmark import main as benchmark_main
from utils.errors import run_cli

SMALL = ["--arch", "deit_sat_nano_patch16_224", "--img-size", "64", "--batch-size", "2", "--steps", "1",
         "--warmup", "1", "--num-classes", "3", "--device", "cpu"]


def run(*argv):
    """tools/benchmark.py's result, run in this process."""
    return benchmark_main([*SMALL, *argv])


def test_train_benchmark_with_naive_baseline(capsys):
    """The result is printed as the last line: the naive baseline is the script run as a user runs it (another
    process), whose last line is read back."""
    returned = run("--mode", "train", "--compare-naive")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == returned
    assert (result["mode"], result["attn_impl"], result["steps"], result["batch_size"]) == ("train", "fused", 1, 2)
    assert result["images_per_second"] > 0 and result["peak_memory_mb"] > 0
    assert result["baseline"]["attn_impl"] == "naive" and result["baseline"]["precision"] == "fp32"
    assert result["speedup"] > 0 and result["memory_ratio"] > 0  # ratios of two measured runs, no fixed values


def test_eval_benchmark_reports_box_cost():
    result = run("--mode", "eval", "--eval-protocol", "both", "--no-amp", "--attn-impl", "naive")
    assert (result["mode"], result["eval_protocol"], result["precision"], result["attn_impl"]) == (
        "eval", "both", "fp32", "naive")
    assert result["images_per_second"] > 0 and result["box_ms_per_image"] > 0
    assert result["thresholds"] == [0.3, 0.35, 0.4, 0.45]
    assert result["wsol_box_ms_per_image"] > 0  # the 100 map thresholds' cost (docs/performance.md's wsol row)
    wsol = run("--mode", "eval", "--protocol", "wsol")  # the former name still read
    assert "box_ms_per_image" not in wsol and wsol["wsol_box_ms_per_image"] > 0  # each protocol's own cost
    sat = run("--mode", "eval", "--warmup", "0")
    assert sat["images_per_second"] > 0 and "wsol_box_ms_per_image" not in sat  # (no warm-up: 'no images accumulated')


@pytest.mark.parametrize("flags, message", [
    (["--mode", "loader", "--compare-naive"], "--compare-naive compares the model's naive fp32 baseline: --mode "
     "train or eval, not loader"),
    (["--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
    (["--batch-size", "x"], "--batch-size: expected an integer >= 1, got 'x'"),
    (["--img-size", "50"], "--img-size: expected a multiple of the patch size 16, got 50"),
    (["--thresholds", "2"], "--thresholds: expected a number in [0, 1], got '2'"),
    (["--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "meta"], "--device: expected auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--num-classes", "0"], "--num-classes: expected an integer >= 1, got '0'"),
    (["--img-size", "0"], "--img-size: expected an integer >= 16, got '0'"),
    (["--arch", "foo"], "unknown arch 'foo'"),
    (["--batch-parts", "0"], "--batch-parts: expected an integer >= 1, got '0'"),
    (["--mode", "train", "--resize-size", "48"], "--resize-size: expected at least --img-size 64 (the crops are "
     "taken from the resized image), got 48"),
    (["--mode", "eval", "--resize-size", "0"], "--resize-size: expected at least --img-size 64"),
    (["--mode", "loader", "--image-ms", "-1"], "--image-ms: expected a number >= 0, got '-1'"),  # (a worker's error)
    (["--mode", "loader", "--data-root", "data"], "--mode loader times the loader's scheduling on simulated items"),
    (["--gpu-decode"], "--gpu-decode decodes image files on the device: it needs --data-root and --pipeline device"),
    (["--mode", "check"], "--mode check reads image files: it needs --data-root"),
    (["extra"], "unexpected argument 'extra'"),  # (a tool's parser: OneLineParser.parse_args)
])
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: run(*argv), flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_data_with_more_classes_than_the_head_is_one_line(tmp_path, capsys):
    root = make_demo_dataset(tmp_path / "cub", num_classes=4, train_per_class=2, test_per_class=1, image_size=64)
    with pytest.raises(SystemExit):  # (an IndexError in the loss)
        run_cli(lambda argv: run(*argv), ["--mode", "train", "--data-root", str(root), "--workers", "0"])
    assert capsys.readouterr().err == f"error: --num-classes 3: the data at {root} has 4 classes; pass " \
                                      "--num-classes 4\n"


def test_short_batches_count_the_images_they_hold(tmp_path):
    root = make_demo_dataset(tmp_path / "cub", num_classes=3, train_per_class=1, test_per_class=2, image_size=64)
    result = benchmark_main([*SMALL, "--mode", "eval", "--data-root", str(root), "--workers", "0", "--batch-size",
                             "8", "--steps", "2"])  # a test split of 6: every batch holds 6 images, not 8
    assert result["images_per_second"] * result["ms_per_step"] / 1000 == pytest.approx(6, rel=0.01)


@pytest.mark.parametrize("mode, pipeline", [("train", "device"), ("eval", "host")])
def test_benchmark_from_image_files(tmp_path, mode, pipeline):
    root = make_demo_dataset(tmp_path / "cub", num_classes=3, train_per_class=2, test_per_class=2, image_size=64)
    result = run("--mode", mode, "--data-root", str(root), "--workers", "1", "--pipeline", pipeline,
                 "--eval-protocol", "both", "--tencrop")
    assert (result["mode"], result["pipeline"], result["workers"], result["images_in_split"]) == (mode, pipeline, 1, 6)
    for key in ("images_per_second", "data_images_per_second", "step_images_per_second"):
        assert result[key] > 0, key


def test_loader_benchmark_compares_whole_batches_and_slices():
    result = run("--mode", "loader", "--workers", "2", "--batch-size", "8", "--images", "24", "--image-ms", "1",
                 "--step-ms", "1")
    assert result["whole_batches"]["batch_parts"] == 1 and result["slices"]["batch_parts"] == 2
    for name in ("whole_batches", "slices"):
        assert result[name]["images_per_second"] > 0 and result[name]["vs_step"] > 0


def test_check_benchmark_times_each_method(tmp_path):
    root = make_demo_dataset(tmp_path / "cub", num_classes=2, train_per_class=1, test_per_class=3, image_size=40)
    result = run("--mode", "check", "--data-root", str(root), "--images", "4", "--workers", "2")
    assert (result["mode"], result["split"], result["images"], result["workers"]) == ("check", "test", 4, 2)
    methods = ["header", "marker_serial", "marker_workers", "decode_serial", "decode_workers"]
    assert list(result["images_per_second"]) == methods and all(result["images_per_second"][m] > 0 for m in methods)
    assert result["marker_vs_header"] > 0 and result["decode_vs_marker"] > 0
    assert result["workers_vs_serial"]["marker"] > 0 and result["workers_vs_serial"]["decode"] > 0
    assert list(result["seconds"]) == ["cub", "imagenet_val", "imagenet_train"]
    assert all(list(seconds) == methods for seconds in result["seconds"].values())
    serial = run("--mode", "check", "--data-root", str(root), "--images", "4", "--workers", "0")  # a KeyError before
    assert list(serial["images_per_second"]) == ["header", "marker_serial", "decode_serial"]
    assert serial["workers_vs_serial"] == {}


def test_check_benchmark_times_a_split_with_an_unreadable_image(tmp_path):
    """The header pass opened each image bare: a file PIL does not recognise ended the benchmark in a
    traceback (UnidentifiedImageError), where the check's own passes count it as bad."""
    root = make_demo_dataset(tmp_path / "cub", num_classes=2, train_per_class=1, test_per_class=2, image_size=40)
    for image in (root / "images").rglob("*.jpg"):  # (each split's, whichever is timed)
        image.write_bytes(b"not an image")
    result = run("--mode", "check", "--data-root", str(root), "--split", "train", "--workers", "0")
    assert result["images"] == 2 and result["images_per_second"]["header"] > 0

def test_check_benchmark_reads_boxes_kept_elsewhere(tmp_path):
    """--val-boxes (and --metadata-root) reach the dataset as in the scripts: an ImageNet root whose boxes are
    not under it (the flags were missing: such data could not be benchmarked)."""
    from test_evaluator_cli import _write_imagenet
    root = _write_imagenet(tmp_path / "ILSVRC2012")
    boxes = (root / "LOC_val_solution.csv").rename(tmp_path / "boxes.csv")
    result = run("--mode", "check", "--data-format", "imagenet", "--data-root", str(root), "--val-boxes", str(boxes),
                 "--images", "4", "--workers", "0")
    assert result["images"] == 4 and result["data_format"] == "imagenet"


def test_time_pass_adds_the_rate_of_a_whole_pass(tmp_path):
    root = make_demo_dataset(tmp_path / "cub", num_classes=3, train_per_class=2, test_per_class=2, image_size=64)
    common = ["--mode", "eval", "--data-root", str(root), "--workers", "0"]
    assert run(*common, "--time-pass")["data_pass_images_per_second"] > 0
    assert "data_pass_images_per_second" not in run(*common)


def test_device_auto_is_the_scripts_choice():
    """--device auto (every script's default and flag) is the GPU where there is one, else the CPU."""
    result = run("--mode", "eval", "--device", "auto")
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
