"""tools/compare.py on two small hand-written evaluator output folders (counts checked by hand)."""
import csv
import json
from pathlib import Path

import cv2
import pytest

from tools.compare import main as compare_main, metric_rows
from utils.errors import run_cli

from conftest import folder_locked_by, refused_for_lock

# per_image.csv of the two runs: image_id, label, gt_known, top1_loc, iou
ROWS_A = [("a", 0, 1, 1, 0.8), ("b", 0, 1, 0, 0.6), ("c", 0, 0, 0, 0.2), ("d", 1, 1, 1, 0.7), ("e", 1, 0, 0, 0.1)]
ROWS_B = [("b", 0, 0, 0, 0.3), ("c", 0, 1, 1, 0.6), ("d", 1, 1, 0, 0.65), ("e", 1, 0, 0, 0.2), ("f", 1, 1, 1, 0.9)]
METRICS_A = {"checkpoint": "sat.pth", "arch": "deit_sat_small_patch16_224", "num_spatial_blocks": 2, "split": "test",
             "eval_protocol": "sat", "num_classes": 2, "img_size": 224,
             "tencrop": True, "num_images": 5, "top1_cls": 80.0, "threshold": 0.4, "gt_known_loc": 60.0,
             "top1_loc": 40.0, "thresholds": [0.4, 0.2], "gt_known_loc_per_threshold": [60.0, 20.0],
             "top1_loc_per_threshold": [40.0, 20.0],
             "per_class": {"cat": {"num_images": 3, "top1_cls": 100.0, "top1_loc": 33.3, "gt_known_loc": 66.7},
                           "dog": {"num_images": 2, "top1_cls": 50.0, "top1_loc": 50.0, "gt_known_loc": 50.0}}}
METRICS_B = {"split": "test", "eval_protocol": "both", "num_images": 5, "top1_cls": 60.0, "threshold": 0.4,
             "gt_known_loc": 60.0, "top1_loc": 40.0, "maxboxacc": 70.0, "maxboxacc_threshold": 0.35,
             "maxboxaccv2_per_iou": {"30": 90.0, "50": 70.0, "70": 20.0},
             "per_class": {"dog": {"num_images": 3, "top1_cls": 66.7, "top1_loc": 66.7, "gt_known_loc": 66.7},
                           "bird": {"num_images": 2, "top1_cls": 50.0, "top1_loc": 0.0, "gt_known_loc": 50.0}}}
CURVES_B = {"box_accuracy": {"cam_thresholds": [0.0, 0.5], "boxacc": [10.0, 70.0],
                             "boxaccv2_per_iou": {"30": [20.0, 90.0], "50": [10.0, 70.0], "70": [0.0, 20.0]}}}


def write_run(folder, metrics, rows=None, curves=None):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if rows is not None:
        lines = ["image_id,label,top5,gt_known,top1_loc,iou"]
        lines += [f"{image_id},{label},{label} {1 - label},{gt},{top1},{iou!r}"
                  for image_id, label, gt, top1, iou in rows]
        (folder / "per_image.csv").write_text("\n".join(lines) + "\n")
    if curves is not None:
        (folder / "wsol_curves.json").write_text(json.dumps(curves))
    return folder


@pytest.fixture
def runs(tmp_path):
    return (write_run(tmp_path / "sat", METRICS_A, ROWS_A),
            write_run(tmp_path / "other", METRICS_B, ROWS_B, CURVES_B))


def test_table_lists_every_metric_of_every_run(runs, tmp_path, capsys):
    record = compare_main([*map(str, runs), "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    table = record["metrics"]
    assert list(table) == ["num_images", "top1_cls", "threshold", "gt_known_loc", "gt_known_loc@0.2",
                           "gt_known_loc@0.4", "top1_loc", "top1_loc@0.2", "top1_loc@0.4", "maxboxacc",
                           "maxboxacc_threshold", "maxboxaccv2_per_iou.30", "maxboxaccv2_per_iou.50",
                           "maxboxaccv2_per_iou.70"]
    assert table["gt_known_loc@0.2"] == {"sat": 20.0, "other": None}
    assert table["maxboxaccv2_per_iou.70"] == {"sat": None, "other": 20.0}
    assert table["top1_cls"] == {"sat": 80.0, "other": 60.0}
    lines = out.splitlines()
    assert lines[0] == f"sat: {runs[0]} (checkpoint sat.pth, arch deit_sat_small_patch16_224, num_spatial_blocks 2, " \
                       "split test, eval_protocol sat)"  # the model: a sweep over num_spatial_blocks told apart
    assert any(line.split() == ["metric", "sat", "other"] for line in lines)
    assert any(line.split() == ["gt_known_loc@0.2", "20.00", "-"] for line in lines)
    assert any(line.split() == ["maxboxacc_threshold", "-", "0.35"] for line in lines)
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["metrics"] == table
    assert record["per_class_gt_known_loc"] == {"cat": {"sat": 66.7, "other": None},
                                                "dog": {"sat": 50.0, "other": 66.7},
                                                "bird": {"sat": None, "other": 50.0}}


def test_per_image_wins_and_losses_on_the_shared_images(runs, tmp_path, capsys):
    record = compare_main([*map(str, runs), "--output-dir", str(tmp_path / "out")])
    counts = record["per_image"]["sat vs other"]
    # shared: b, c, d, e; a only in sat, f only in other
    assert (counts["shared"], counts["only_in_a"], counts["only_in_b"]) == (4, 1, 1)
    assert counts["gt_known"] == {"a_only": 1, "b_only": 1, "both": 1, "neither": 1}  # b / c / d / e
    assert counts["top1_loc"] == {"a_only": 1, "b_only": 1, "both": 0, "neither": 2}  # d / c / - / b, e
    out = capsys.readouterr().out
    assert "per image on the 4 images both evaluated (1 images only in sat and 1 only in other left out)" in out
    assert "gt_known: sat right and other wrong 1, other right and sat wrong 1 (both right 1, both wrong 1)" in out
    with open(counts["differing"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["image_id"] for row in rows] == ["b", "c", "d"]
    assert rows[0] == {"image_id": "b", "label": "0", "gt_known_sat": "1", "gt_known_other": "0", "top1_loc_sat": "0",
                       "top1_loc_other": "0", "iou_sat": "0.6", "iou_other": "0.3"}


def test_each_pair_gets_its_own_per_image_file_whatever_the_names(tmp_path):
    """Runs named 'x y' and 'x_y' gave one file name (per_image_sat_vs_x_y.csv): the second pair's rows replaced
    the first's, both entries of compare.json naming it; run folders with long paths gave a name too long."""
    long = "d" * 150
    runs = [write_run(tmp_path / "sat", METRICS_A, ROWS_A), write_run(tmp_path / "x y", METRICS_B, ROWS_B),
            write_run(tmp_path / "x_y", METRICS_A, ROWS_A), write_run(tmp_path / long / "a", METRICS_B, ROWS_B)]
    record = compare_main([*map(str, runs), "--output-dir", str(tmp_path / "out")])["per_image"]
    files = [record[f"sat vs {name}"]["differing"] for name in ("x y", "x_y", "a")]
    assert [Path(path).name for path in files] == ["per_image_sat_vs_x_y.csv", "per_image_sat_vs_x_y_2.csv",
                                                   "per_image_sat_vs_a.csv"]
    with open(files[1], newline="") as f:  # the pair's own rows: x_y is the same run as sat, no image differs
        assert list(csv.DictReader(f)) == []
    names = ["sat", "b" * 150]
    record = compare_main([*map(str, runs[:2]), "--names", *names, "--output-dir", str(tmp_path / "out2")])
    assert Path(record["per_image"][f"sat vs {names[1]}"]["differing"]).name == f"per_image_sat_vs_{'b' * 100}.csv"


def test_figure_has_the_curves_and_the_per_class_bars(runs, tmp_path):
    compare_main([*map(str, runs), "--output-dir", str(tmp_path / "out")])
    image = cv2.imread(str(tmp_path / "out" / "compare.png"))
    # first row: GT-known per map threshold (sat) and wsol box accuracy (other), 480x360 each; second: bars
    assert image.shape[1] == 960 and image.shape[0] > 2 * 360
    assert (image[:360, :480] != 255).any(axis=2).sum() > 1000 and (image[360:] != 255).any(axis=2).sum() > 1000


def test_runs_without_per_image_rows_or_curves_still_compare(tmp_path, capsys):
    first = write_run(tmp_path / "x", {"num_images": 3, "maxboxacc": 50.0})
    second = write_run(tmp_path / "y", {"num_images": 4, "maxboxacc": 25.0})
    record = compare_main([str(first), str(second), "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert record["per_image"] == {} and "x vs y: no per-image comparison (x and y: no per_image.csv)" in out
    assert "the runs evaluated different numbers of images (x 3, y 4)" in out
    assert not (tmp_path / "out" / "compare.png").exists()


def test_different_sat_settings_are_pointed_out(tmp_path, capsys):
    sat = {"num_images": 2, "eval_protocol": "sat", "img_size": 128, "resize_size": 144, "tencrop": False,
           "threshold": 0.4, "gt_known_loc": 50.0}
    first = write_run(tmp_path / "x", sat)
    second = write_run(tmp_path / "y", {**sat, "img_size": 224, "resize_size": 256})
    wsol = write_run(tmp_path / "w", {"num_images": 2, "eval_protocol": "wsol", "img_size": 224, "maxboxacc": 50.0})
    record = compare_main([str(first), str(second), "--output-dir", str(tmp_path / "out")])
    note = ("the runs' sat numbers come from different settings (x: img_size 128, resize_size 144, tencrop False, "
            "threshold 0.4; y: img_size 224, resize_size 256, tencrop False, threshold 0.4): not like for like")
    assert note in capsys.readouterr().out and record["notes"][0].startswith(note)
    record = compare_main([str(first), str(wsol), "--output-dir", str(tmp_path / "wsol")])  # no sat numbers in w
    assert "different settings" not in capsys.readouterr().out and record["notes"] == []
    # a checkpoint's ten-crop run against saved maps scored with its predictions (docs/evaluation.md's worked
    # example): the maps run's tencrop false is no setting of its numbers; its view still is
    tencrop = write_run(tmp_path / "t", {**sat, "tencrop": True})
    maps = write_run(tmp_path / "m", {**sat, "maps": "maps_sat", "predictions": "t/per_image.csv"})
    record = compare_main([str(tencrop), str(maps), "--output-dir", str(tmp_path / "maps")])
    assert "different settings" not in capsys.readouterr().out and record["notes"] == []
    other_view = write_run(tmp_path / "v", {**sat, "maps": "maps_224", "img_size": 224, "resize_size": 256})
    record = compare_main([str(tencrop), str(other_view), "--output-dir", str(tmp_path / "view")])
    assert record["notes"][0].startswith("the runs' sat numbers come from different settings (t: img_size 128, "
                                         "resize_size 144, tencrop True, threshold 0.4; v: img_size 224, "
                                         "resize_size 256, threshold 0.4)")


def test_no_shared_flag_or_image_is_no_per_image_comparison(runs, tmp_path, capsys):
    """Nothing to compare per image is said, not reported as 0 differing images in an empty CSV."""
    wsol_rows = [(image_id, label, "", "", "") for image_id, label, *_ in ROWS_A]  # a wsol-only run: empty flags
    wsol = write_run(tmp_path / "wsol", {"num_images": 5, "eval_protocol": "wsol"}, wsol_rows)
    strangers = write_run(tmp_path / "strangers", METRICS_A, [("z", 0, 1, 1, 0.9)])
    record = compare_main([str(runs[0]), str(wsol), str(strangers), "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "sat vs wsol: no per-image comparison (neither gt_known nor top1_loc scored by both: a wsol-only run " \
           "has neither)" in out
    assert "sat vs strangers: no per-image comparison (no image evaluated by both)" in out
    assert "differing images" not in out and not list((tmp_path / "out").glob("per_image_*.csv"))
    assert record["per_image"]["sat vs strangers"]["differing"] is None


def test_folder_without_metrics_is_one_error_line(tmp_path, runs, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(compare_main, [str(runs[0]), str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'empty'}: no metrics.json (expected an evaluator "
                                       "output folder)\n")
    (tmp_path / "empty" / "metrics.json").write_text("{not json")
    with pytest.raises(SystemExit):
        run_cli(compare_main, [str(runs[0]), str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")])
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'empty' / 'metrics.json'}: not valid JSON (")


def test_a_training_run_without_its_final_test_is_said_to_be_one(tmp_path, runs, capsys):
    """a train.py folder whose run stopped (a NaN loss, a time limit) or runs still: it was "no metrics.json
    (expected an evaluator output folder)", as if it were not a training run"""
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("arch: deit_sat_nano_patch16_224\n")
    (stopped / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.5}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(compare_main, [str(runs[0]), str(stopped), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {stopped}: a training run without results.json (its final test): "
                                       "the run has not finished, or stopped before it (its log.txt says why)\n")


def test_training_run_folders_are_compared_by_their_final_test_and_settings(tmp_path, runs, capsys):
    """A sweep's train.py folders (results.json and config.yaml, no metrics.json) were refused: their final tests
    are tabulated with an evaluator's run, and the settings the training runs differ in are named."""
    from utils.config import parse_config, save_config
    trained = []
    for name, area_thr, gt_known in (("area0.25", "0.25", 60.0), ("area0.1", "0.1", 45.0)):
        folder = tmp_path / name
        folder.mkdir()
        cfg = parse_config(["--area-thr", area_thr, "--output-dir", str(folder), "--workers", "3"], "train")
        save_config(cfg, folder / "config.yaml")
        (folder / "results.json").write_text(json.dumps({
            "checkpoint": str(folder / "checkpoints" / "best.pth"), "epoch": 2, "split": "test",
            "eval_protocol": "sat", "num_images": 5, "top1_cls": 80.0, "threshold": 0.4, "tencrop": True,
            "gt_known_loc": gt_known, "top1_loc": 40.0}))
        trained.append(folder)
    record = compare_main([str(runs[0]), *map(str, trained), "--output-dir", str(tmp_path / "out")])
    assert record["metrics"]["gt_known_loc"] == {"sat": 60.0, "area0.25": 60.0, "area0.1": 45.0}
    assert record["metrics"]["epoch"] == {"sat": None, "area0.25": 2, "area0.1": 2}
    # the demo config's view (128 of 144) is not the evaluator run's 224: said; of the settings, area_thr alone
    assert record["notes"][-2] == "the runs were trained with different settings (their config.yaml or checkpoint): " \
                                  "area_thr (area0.25 0.25, area0.1 0.1)"
    assert "the runs' sat numbers come from different settings (sat: img_size 224" in record["notes"][-1]
    out = capsys.readouterr().out
    assert f"area0.1: {trained[1]} (checkpoint {trained[1] / 'checkpoints' / 'best.pth'}, arch " \
           "deit_sat_nano_patch16_224, num_spatial_blocks 3, split test, eval_protocol sat)" in out.splitlines()
    assert "sat vs area0.25: no per-image comparison (area0.25: no per_image.csv; of a training run: evaluator.py " \
           "--checkpoint <run>/checkpoints/best.pth writes it)" in out
    (trained[0] / "config.yaml").unlink()
    with pytest.raises(SystemExit):
        run_cli(compare_main, [str(runs[0]), str(trained[0]), "--output-dir", str(tmp_path / "out2")])
    assert capsys.readouterr().err == f"error: {trained[0]}: results.json without config.yaml (a training run's " \
                                      "folder holds both)\n"


def test_a_training_run_on_the_demo_data_reads_the_data_its_evaluator_run_reads(tmp_path):
    """config.yaml's data_root null is the built-in demo data, which the evaluator records by its path: a demo
    run beside the evaluation of its best.pth was said to read different data ('cub test' vs 'cub <path> test')."""
    from DataLoader.demo import DEFAULT_DEMO_ROOT
    from utils.config import parse_config, save_config
    folder = tmp_path / "demo"
    folder.mkdir()
    save_config(parse_config(["--output-dir", str(folder)], "train"), folder / "config.yaml")
    (folder / "results.json").write_text(json.dumps({"split": "test", "eval_protocol": "sat", "num_images": 5,
                                                     "gt_known_loc": 60.0, "threshold": 0.4, "tencrop": True}))
    evaluated = write_run(tmp_path / "eval", {**METRICS_A, "data_format": "cub", "data_root": str(DEFAULT_DEMO_ROOT),
                                              "metadata_root": None, "img_size": 128, "resize_size": 144}, ROWS_A)
    record = compare_main([str(folder), str(evaluated), "--output-dir", str(tmp_path / "out")])
    assert not [note for note in record["notes"] if "different data" in note]


def test_a_training_runs_relative_data_root_is_of_the_folder_it_ran_in(tmp_path, monkeypatch):
    """config.yaml keeps --data-root as given (cub, relative to where train.py ran): compare.py run from another
    folder resolved it against its own and said the run and the evaluation of its best.pth read different data."""
    from utils.config import parse_config, save_config
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep").mkdir()
    save_config(parse_config(["--data-root", "cub", "--output-dir", "sweep/run"], "train"),
                tmp_path / "sweep" / "run" / "config.yaml")
    (tmp_path / "sweep" / "run" / "results.json").write_text(json.dumps({"split": "test", "eval_protocol": "sat",
                                                                         "num_images": 5, "gt_known_loc": 60.0}))
    evaluated = write_run(tmp_path / "eval", {**METRICS_A, "data_format": "cub", "data_root": str(tmp_path / "cub"),
                                              "metadata_root": None}, ROWS_A)
    monkeypatch.chdir(tmp_path / "sweep")
    record = compare_main(["run", str(evaluated), "--output-dir", str(tmp_path / "out")])
    assert not [note for note in record["notes"] if "different data" in note]


def test_names_of_another_count_and_unknown_flags_are_one_line(tmp_path, runs, capsys):
    """--names of the wrong count says what is expected ('1 names for 2 runs' before); an unknown flag is said
    as the training scripts and evaluators say it, not as argparse's 'unrecognized arguments: --output_dir x'."""
    for extra, line in ((["--names", "a"], "--names: expected 2 names (one per run, in order), got 1"),
                        (["--output_dir", "x"], "unknown flag --output_dir (did you mean --output-dir?)"),
                        (["--bogus=1"], "unknown flag --bogus")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(compare_main, [str(runs[0]), str(runs[1]), "--output-dir", str(tmp_path / "out"), *extra])
        assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {line}\n"
    assert not (tmp_path / "out").exists()


def test_metric_rows_flatten_nested_results_and_skip_settings():
    rows = metric_rows({"img_size": 224, "tencrop": True, "views": ["centre"], "at_best_threshold": {"iou50": 1.5},
                        "thresholds": [0.5, 0.1], "top1_loc_per_threshold": [3.0, 4.0], "pxap": 7.25})
    assert rows == [("at_best_threshold.iou50", 1.5), ("top1_loc@0.1", 4.0), ("top1_loc@0.5", 3.0), ("pxap", 7.25)]


def test_an_earlier_comparison_is_refused_then_replaced_with_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "out"
    compare_main([*map(str, runs), "--output-dir", str(out)])
    old_csv = out / "per_image_sat_vs_other.csv"
    (out / "notes.txt").write_text("mine")
    assert old_csv.exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(compare_main, [*map(str, runs), "--output-dir", str(out)])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: {out} holds a previous comparison (compare.json, compare.png, per_image_sat_vs_other.csv): "
        "--overwrite to replace it, or choose another --output-dir\n")
    with pytest.raises(SystemExit):  # a run that is not there is what to say first (it said the folder above)
        run_cli(compare_main, [str(runs[0]), str(tmp_path / "missing"), "--output-dir", str(out)])
    assert "missing" in capsys.readouterr().err
    record = compare_main([*map(str, runs), "--names", "A", "B", "--output-dir", str(out), "--overwrite"])
    assert not old_csv.exists() and (out / "per_image_A_vs_B.csv").exists() and list(record["runs"]) == ["A", "B"]
    assert (out / "notes.txt").read_text() == "mine"  # not the tool's: kept


def test_runs_on_different_data_are_pointed_out(tmp_path, capsys):
    first = write_run(tmp_path / "x", {"num_images": 3, "data_format": "cub", "data_root": "data/CUB", "split": "test"})
    second = write_run(tmp_path / "y", {"num_images": 3, "data_format": "cub", "data_root": "data/CUB", "split": "val"})
    compare_main([str(first), str(second), "--output-dir", str(tmp_path / "out")])
    assert "the runs read different data (x: cub data/CUB test; y: cub data/CUB val)" in capsys.readouterr().out
    compare_main([str(first), str(first), "--names", "a", "b", "--output-dir", str(tmp_path / "same")])
    assert "different data" not in capsys.readouterr().out
    wsol = {"num_images": 3, "data_format": "wsol", "data_root": "data/CUB", "split": "test"}
    fourth = write_run(tmp_path / "m1", {**wsol, "metadata_root": "metadata/CUB"})
    fifth = write_run(tmp_path / "m2", {**wsol, "metadata_root": "metadata/CUB_v2"})  # same images, other boxes
    compare_main([str(fourth), str(fifth), "--output-dir", str(tmp_path / "metadata")])
    assert "the runs read different data (m1: wsol data/CUB metadata/CUB test; m2: wsol data/CUB metadata/CUB_v2 " \
        "test)" in capsys.readouterr().out
    sixth = write_run(tmp_path / "m3", {**wsol, "metadata_root": None})  # the default metadata: unset, not 'None'
    compare_main([str(fourth), str(sixth), "--output-dir", str(tmp_path / "unset")])
    assert "(m1: wsol data/CUB metadata/CUB test; m3: wsol data/CUB test)" in capsys.readouterr().out
    third = write_run(tmp_path / "z", {"num_images": 3, "split": "test"})  # keys a run lacks are not compared
    compare_main([str(first), str(third), "--output-dir", str(tmp_path / "lacking")])
    assert "different data" not in capsys.readouterr().out
    for flags, message in ((["--names", "a", "a"], "--names: the runs' names must differ"),
                           ([], "a run folder is given twice: give --names that differ")):
        with pytest.raises(SystemExit):
            run_cli(compare_main, [str(first), str(first), *flags, "--output-dir", str(tmp_path / "never")])
        assert capsys.readouterr().err == f"error: {message}\n"
    (third / "per_image.csv").write_bytes(b"image_id,gt_known,top1_loc\n\xff\xfe,1,1\n")
    with pytest.raises(SystemExit):
        run_cli(compare_main, [str(first), str(third), "--output-dir", str(tmp_path / "never")])
    assert capsys.readouterr().err == f"error: {third / 'per_image.csv'}: not UTF-8 text (expected the " \
        "evaluator's per_image.csv)\n"
    for text, message in (("image_id,gt_known\na.jpg,1\n", "missing column(s) top1_loc"),
                          ("image_id,gt_known,top1_loc\na.jpg,1,1\nb.jpg,yes,1\n", "line 3: gt_known must be 0, 1 or "
                                                                                "empty, got 'yes'")):
        (third / "per_image.csv").write_text(text)
        with pytest.raises(SystemExit):
            run_cli(compare_main, [str(first), str(third), "--output-dir", str(tmp_path / "never")])
        assert capsys.readouterr().err == f"error: {third / 'per_image.csv'}{'' if 'line' in message else ':'} " \
                                          f"{message}\n"
    assert not (tmp_path / "never").exists()


def test_a_comparison_into_a_folder_another_job_writes_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "out"
    with folder_locked_by(out, "evaluator.py") as holder:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(compare_main, [*map(str, runs), "--output-dir", str(out)])
        assert exit_info.value.code == 2
        assert refused_for_lock(capsys.readouterr().err.rstrip("\n"), out, "evaluator.py", holder)
        assert [path.name for path in out.iterdir()] == [".lock"]


def test_a_comparison_that_fails_to_write_leaves_the_previous_one(runs, tmp_path, capsys, monkeypatch):
    import errno
    import tools.compare as compare_tool
    out = tmp_path / "out"
    compare_main([*map(str, runs), "--output-dir", str(out)])
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def full(path, image):
        raise OSError(errno.ENOSPC, "No space left on device")  # a full disk names no file

    monkeypatch.setattr(compare_tool, "save_rgb", full)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(compare_main, [*map(str, runs), "--names", "A", "B", "--output-dir", str(out), "--overwrite"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: could not write {out}: no space left on the device\n"
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # the previous comparison, whole


def test_a_training_run_of_an_earlier_version_is_read_in_this_versions_form(tmp_path):
    """An earlier version's results.json reported the numbers at best_threshold (no threshold key, no eval_protocol;
    later a best_threshold record) and its config.yaml has test_tencrop / save_images: its Top-1 Loc at 0.6 sat in
    one row with another run's at 0.4 without a note, and the renamed keys were told as settings that differ."""
    from utils.config import parse_config, save_config
    folders = []
    for name, results in (("old", {"best_threshold": 0.6, "top1_loc": 28.0, "gt_known_loc": 43.0}),
                          ("mid", {"threshold": 0.4, "eval_protocol": "sat", "top1_loc": 13.0, "gt_known_loc": 23.0,
                                   "best_threshold": {"threshold": 0.6, "top1_loc": 28.0, "gt_known_loc": 43.0}})):
        folder = tmp_path / name
        folder.mkdir()
        save_config(parse_config(["--output-dir", str(folder), "--no-tencrop"], "train"), folder / "config.yaml")
        if name == "old":
            text = (folder / "config.yaml").read_text()
            (folder / "config.yaml").write_text(text.replace("\ntencrop:", "\ntest_tencrop:"))
        (folder / "results.json").write_text(json.dumps({"split": "test", "num_images": 100, "tencrop": False,
                                                         **results}))
        folders.append(str(folder))
    record = compare_main([*folders, "--output-dir", str(tmp_path / "out")])
    assert record["metrics"]["threshold"] == {"old": 0.6, "mid": 0.4}
    assert record["metrics"]["best_threshold"] == {"old": 0.6, "mid": 0.6}
    assert record["metrics"]["at_best_threshold.top1_loc"] == {"old": None, "mid": 28.0}
    assert "the runs' sat numbers come from different settings (old: img_size 128, resize_size 144, tencrop False, " \
           "threshold 0.6; mid: img_size 128, resize_size 144, tencrop False, threshold 0.4)" in record["notes"][-1]
    assert not [note for note in record["notes"] if "trained with different settings" in note]


def test_a_nan_or_infinite_metric_is_written_as_null():
    """compare.json and metrics.jsonl write a NaN / infinite metric as JSON null (json.dumps would write NaN /
    Infinity, which strict JSON readers refuse) through utils.outputs.finite_or_none."""
    import math

    from utils.outputs import finite_or_none
    assert [finite_or_none(v) for v in (math.nan, -math.inf, 1.5, 3, "x", None)] == [None, None, 1.5, 3, "x", None]


def test_a_training_run_resumed_with_changed_settings_is_said_to_be_one(tmp_path):
    """config.yaml holds a resumed run's values after the change (area_loss_weight 0): the comparison named that
    value alone, as if every epoch had trained without the area loss; the resume's line now comes with it."""
    from utils.config import parse_config, save_config
    trained, line = [], "# resumed after 1 epoch(s), trained with the values before: area_loss_weight 1.0 -> 0.0"
    for name, flags, resumed in (("base", [], None), ("res", ["--area-loss-weight", "0"], line)):
        folder = tmp_path / name
        folder.mkdir()
        save_config(parse_config(flags + ["--output-dir", str(folder)], "train"), folder / "config.yaml", resumed)
        (folder / "results.json").write_text(json.dumps({"epoch": 2, "split": "test", "eval_protocol": "sat",
                                                         "num_images": 5, "threshold": 0.4, "tencrop": True,
                                                         "gt_known_loc": 60.0, "top1_loc": 40.0}))
        trained.append(str(folder))
    record = compare_main([*trained, "--output-dir", str(tmp_path / "out")])
    resumed = ("res was resumed after 1 epoch(s), trained with the values before: area_loss_weight 1.0 -> 0.0 "
               "(config.yaml holds the values after the change)")
    assert record["notes"] == ["the runs were trained with different settings (their config.yaml or checkpoint): "
                               "area_loss_weight (base 1.0, res 0.0)", resumed]


def test_evaluations_of_checkpoints_trained_differently_are_said_to_be(tmp_path):
    """An evaluator's metrics.json holds the checkpoint's training config (training_config; none in the official
    release files): the note names the settings its runs were trained with that differ, as for training runs."""
    trained = {"arch": "deit_sat_small_patch16_224", "area_loss_weight": 1.0, "output_dir": "runs/base", "seed": 6}
    base = write_run(tmp_path / "base", {**METRICS_A, "training_config": trained}, ROWS_A)
    ablated = write_run(tmp_path / "noarea", {**METRICS_A, "training_config": {
        **trained, "area_loss_weight": 0.0, "output_dir": "runs/noarea"}}, ROWS_A)
    released = write_run(tmp_path / "released", {**METRICS_A, "training_config": None}, ROWS_A)
    record = compare_main([str(base), str(ablated), str(released), "--output-dir", str(tmp_path / "out")])
    assert record["notes"] == ["the runs were trained with different settings (their config.yaml or checkpoint): "
                               "area_loss_weight (base 1.0, noarea 0.0)"]  # (output_dir is no setting)
    assert not [key for key in record["metrics"] if key.startswith("training_config")]


def test_the_settings_note_spells_values_as_config_yaml_does(tmp_path):
    """null, true, false as config.yaml and the resume messages spell them (show_value), not Python's None, True."""
    trained = {"arch": "deit_sat_small_patch16_224", "clip_grad": None, "decay_tokens": True}
    base = write_run(tmp_path / "base", {**METRICS_A, "training_config": trained}, ROWS_A)
    clipped = write_run(tmp_path / "clipped", {**METRICS_A, "training_config": {
        **trained, "clip_grad": 1.0, "decay_tokens": False}}, ROWS_A)
    record = compare_main([str(base), str(clipped), "--output-dir", str(tmp_path / "out")])
    assert record["notes"] == ["the runs were trained with different settings (their config.yaml or checkpoint): "
                               "clip_grad (base null, clipped 1.0); decay_tokens (base true, clipped false)"]


def test_a_full_disk_at_compare_json_names_the_file(runs, tmp_path, capsys, monkeypatch):
    """A full disk's error names no file: the line named the output folder, not the file that did not fit."""
    import errno
    import pathlib
    out = tmp_path / "out"
    write_text = pathlib.Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith("compare.") and self.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(compare_main, [*map(str, runs), "--output-dir", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: could not write {out / 'compare.json'}: no space left on the device\n"
