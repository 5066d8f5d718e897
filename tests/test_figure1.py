"""The paper's Figure 1 sweep: ``--trainable last:K`` subsets, config/ILSVRC_fewshot.yaml, and
tools/figure1.py (the sweep's commands, collecting results.json files into the two curves, the PNG)."""
import json

import cv2
import pytest
import yaml

from DataLoader import make_demo_dataset
from Model import build_model
from utils.config import load_yaml
from utils.errors import ConfigError, DataError
from utils.optim import set_trainable
from train import main as train_main

from conftest import REPO_ROOT
from tools import figure1

# deit_sat_nano_patch16_224 with 3 classes: dim 96, depth 6, MLP ratio 2, a 3x3 conv head.
BLOCK = (96 * 288 + 288) + (96 * 96 + 96) + (96 * 192 + 192) + (192 * 96 + 96) + 2 * 2 * 96  # qkv proj fc1 fc2 norms
HEAD_AND_TOKEN = (96 * 3 * 9 + 3) + 96 + 96 + 2 * 96  # head conv, loc_token, loc_embed, final norm


@pytest.fixture
def nano():
    return build_model("deit_sat_nano_patch16_224", num_classes=3, pretrained=False, img_size=64)


def test_trainable_last_k_blocks(nano):
    assert set_trainable(nano, "last:0") == HEAD_AND_TOKEN == 2979
    assert set_trainable(nano, "last:2") == HEAD_AND_TOKEN + 2 * BLOCK
    trained = {name for name, p in nano.named_parameters() if p.requires_grad}
    assert {"blocks.4.attn.qkv.weight", "blocks.5.mlp.fc2.bias", "loc_token", "loc_embed", "norm.weight",
            "head.weight"} <= trained
    assert not trained & {"blocks.3.attn.qkv.weight", "cls_token", "pos_embed", "patch_embed.proj.weight"}
    # the last 3 blocks are the spatial-aware ones: last:3 is the paper's parameter-efficient 'sat'
    assert set_trainable(nano, "last:3") == set_trainable(nano, "sat")
    with pytest.raises(ConfigError, match="only 6 blocks"):
        set_trainable(nano, "last:7")
    with pytest.raises(ConfigError, match="last:K"):
        set_trainable(nano, "last:-1")


def test_fewshot_config_is_the_imagenet_config_with_fewer_images():
    imagenet, fewshot = (load_yaml(REPO_ROOT / "config" / name) for name in ("ILSVRC.yaml", "ILSVRC_fewshot.yaml"))
    changed = {key for key in imagenet if fewshot.get(key) != imagenet[key]}
    assert set(fewshot) == set(imagenet)
    assert changed == {"images_per_class", "batch_size", "epochs", "eval_every", "output_dir"}
    assert fewshot["images_per_class"] == 1  # the paper's extreme setting


def test_sweep_commands():
    runs = figure1.sweep("/data/ILSVRC2012", "out", launcher="torchrun --nproc_per_node 8")
    commands = {folder.name: " ".join(command) for folder, command in runs}
    assert set(commands) == {"full", "shots_1", "shots_3", "shots_5", "shots_10", "last_0", "last_3", "last_6",
                             "last_9"}
    assert commands["shots_3"].startswith("torchrun --nproc_per_node 8 train_ImageNet.py --data-root "
                                          "/data/ILSVRC2012 --config config/ILSVRC_fewshot.yaml")
    assert "--images-per-class 3 --output-dir out/shots_3" in commands["shots_3"]
    assert "--config config/ILSVRC.yaml --trainable last:6 --output-dir out/last_6" in commands["last_6"]


def fake_run(folder, images_per_class, trainable, params, loc):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"images_per_class": images_per_class,
                                                        "trainable": trainable}))
    (folder / "results.json").write_text(json.dumps({"gt_known_loc": loc, "trainable_params": params}))


def test_collect_and_draw(tmp_path, capsys):
    """A real tiny training run (--trainable last:1) and fake ImageNet-sized results, collected and drawn."""
    runs = tmp_path / "runs"
    data = make_demo_dataset(tmp_path / "data", num_classes=3, train_per_class=4, test_per_class=2, image_size=64)
    train_main(["--config", str(REPO_ROOT / "config" / "demo.yaml"), "--img-size", "64", "--resize-size", "72",
                "--batch-size", "4", "--epochs", "1", "--workers", "0", "--overlays", "0", "--data-root",
                str(data), "--output-dir", str(runs / "tiny_last_1"), "--trainable", "last:1"])
    tiny = json.loads((runs / "tiny_last_1" / "results.json").read_text())
    assert tiny["trainable_params"] == HEAD_AND_TOKEN + BLOCK
    assert "M trainable (last:1)" in (runs / "tiny_last_1" / "log.txt").read_text()

    fake_run(runs / "full", None, "all", 25_123_432, 73.0)
    for n, loc in ((10, 72.5), (1, 70.1), (3, 71.2)):
        fake_run(runs / f"shots_{n}", n, "all", 25_123_432, loc)
    for k, params, loc in ((3, 8_781_928, 72.0), (0, 3_458_536, 71.1)):
        fake_run(runs / f"last_{k}", None, f"last:{k}", params, loc)
    png = tmp_path / "figure1.png"
    capsys.readouterr()  # the training's progress bars
    rows = figure1.main(["collect", str(runs), "--output", str(png)])
    assert len(rows) == 7
    assert capsys.readouterr().err == "warning: 1 run(s) not trained on ImageNet, drawn beside the paper's " \
                                      "ImageNet points: tiny_last_1 (cub)\n"  # (they were drawn without a word)
    table = json.loads((runs / "figure1.json").read_text())
    assert table["shots"] == [[1, 70.1], [3, 71.2], [10, 72.5], [None, 73.0]]
    assert table["params_m"] == [[tiny["trainable_params"] / 1e6, tiny["gt_known_loc"]], [3.458536, 71.1],
                                 [8.781928, 72.0], [25.123432, 73.0]]
    image = cv2.imread(str(png))
    assert image.shape == (440, 960, 3)
    for bgr in (figure1.OURS, figure1.PAPER):  # both curves are drawn
        assert ((image == bgr).all(axis=2)).sum() > 100
    fake_run(runs / "full_again", None, "all", 25_123_432, 72.8)
    figure1.main(["collect", str(runs), "--output", str(png)])
    assert "warning: full and full_again are the same point of the sweep (images_per_class all, trainable all): " \
           "both are drawn\n" in capsys.readouterr().err


def test_collect_names_a_results_file_without_parameter_count(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("trainable: all\n")
    (tmp_path / "old" / "results.json").write_text('{"gt_known_loc": 70.0}')
    with pytest.raises(DataError, match="old/results.json: no trainable_params"):
        figure1.main(["collect", str(tmp_path), "--output", str(tmp_path / "f.png")])
    (tmp_path / "old" / "results.json").write_text("{not json")
    with pytest.raises(DataError, match="old/results.json: not valid JSON"):
        figure1.main(["collect", str(tmp_path), "--output", str(tmp_path / "f.png")])
    (tmp_path / "old" / "results.json").write_text("72.5")  # a TypeError traceback before
    with pytest.raises(DataError, match="old/results.json: expected a JSON object, got float"):
        figure1.main(["collect", str(tmp_path), "--output", str(tmp_path / "f.png")])
    with pytest.raises(ConfigError, match="expected a .png"):
        figure1.main(["collect", str(tmp_path), "--output", str(tmp_path / "f.xyz")])
    with pytest.raises(DataError, match="nothere: not found"):
        figure1.main(["collect", str(tmp_path / "nothere")])
    # a subcommand's flag abbreviated was taken as the flag (the scripts refuse abbreviations)
    with pytest.raises(ConfigError, match=r"^unknown flag --out \(did you mean --output\?\)$"):
        figure1.main(["collect", str(tmp_path), "--out", str(tmp_path / "f.png")])
    # another subcommand's flag: it said "unknown flag --data-root (did you mean --data-root?)"
    with pytest.raises(ConfigError, match=r"^unknown flag --data-root for collect \(a flag of run\)$"):
        figure1.main(["collect", str(tmp_path), "--data-root", str(tmp_path)])


def test_collect_into_a_folder_it_cannot_write_is_one_line(tmp_path, monkeypatch):
    """figure1.json and the PNG on a full disk or a read-only folder: one OutputError line each (OSError
    tracebacks), an earlier file left as it was."""
    from utils.errors import OutputError
    fake_run(tmp_path / "runs" / "full", None, "all", 25_123_432, 73.0)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"^could not write \S*/file"):
        figure1.main(["collect", str(tmp_path / "runs"), "--output", str(tmp_path / "file" / "f.png")])
    (tmp_path / "f.png").write_bytes(b"an earlier figure")
    from test_visualize import full_disk_write
    monkeypatch.setattr("pathlib.Path.write_bytes", full_disk_write)
    with pytest.raises(OutputError, match=f"^could not write {tmp_path / 'f.png'}: no space left on the device$"):
        figure1.main(["collect", str(tmp_path / "runs"), "--output", str(tmp_path / "f.png")])
    assert (tmp_path / "f.png").read_bytes() == b"an earlier figure"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["f.png", "file", "runs"]  # no temporary left
    monkeypatch.setattr("pathlib.Path.write_text", lambda *args, **kwargs: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    with pytest.raises(OutputError, match=r"^could not write \S*figure1.json: no space left on the device"):
        figure1.main(["collect", str(tmp_path / "runs"), "--output", str(tmp_path / "f.png")])


@pytest.mark.parametrize("ylo, yhi, step", [(64.5, 71.5, 1), (57.5, 72.5, 2), (-0.5, 74.5, 10), (0, 100, 10)])
def test_the_y_grid_keeps_at_most_ten_labels(ylo, yhi, step):
    """The paper's ranges (a few points) get a label per point; a smoke run's 0-74 one every 10, not 75."""
    assert figure1.grid_step(ylo, yhi) == step


def test_a_run_in_neither_curve_is_named_and_labels_stay_inside_the_frame(tmp_path, capsys):
    """A run with both images_per_class and a trainable subset was left out of both curves and the table
    without a word; the label of a point at the bottom of the y range was drawn under the frame, over the x
    tick labels ('42.0' over 'full' and '0')."""
    runs = tmp_path / "runs"
    fake_run(runs / "full", None, "all", 25_123_432, 42.0)
    fake_run(runs / "shots_1", 1, "all", 25_123_432, 50.0)
    fake_run(runs / "last_0", None, "last:0", 3_458_536, 42.0)
    fake_run(runs / "mixed", 5, "last:3", 8_781_928, 60.0)
    png = tmp_path / "figure1.png"
    assert len(figure1.main(["collect", str(runs), "--output", str(png)])) == 4
    out, err = capsys.readouterr()
    assert err == ("warning: 1 run(s) in neither curve nor the table (curve (a) trains everything, (b) uses all "
                   "images; these set both; kept in figure1.json): mixed (images_per_class 5, trainable last:3)\n")
    table = json.loads((runs / "figure1.json").read_text())
    assert "60.00" not in out and 60.0 not in [y for _, y in table["shots"] + table["params_m"]]
    assert [row["run"] for row in table["runs"]] == ["full", "last_0", "mixed", "shots_1"]
    image = cv2.imread(str(png)).astype(int)
    red = image[:, :, 2] - image[:, :, 1] > 60  # this code's colour (BGR 40, 40, 220), not ink or the paper's grey
    bottom = 40 + 320  # the frame's last row (figure1._panel)
    assert red[:bottom + 9].sum() > 100 and not red[bottom + 9:].any()  # markers reach 8 px below it, labels none


def test_run_prints_the_sweep_and_execute_runs_only_the_unfinished_runs(tmp_path, capsys, monkeypatch):
    runs_dir = tmp_path / "runs"
    figure1.main(["run", "--data-root", "/data/ILSVRC2012", "--runs-dir", str(runs_dir)])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 9 and all(" train_ImageNet.py --data-root /data/ILSVRC2012 " in line for line in printed)
    assert not runs_dir.exists()  # printing makes no folder
    started = []

    def fake_run(command, cwd):
        started.append(command[command.index("--output-dir") + 1])
        return type("Done", (), {"returncode": 0})()
    monkeypatch.setattr(figure1.subprocess, "run", fake_run)
    for folder, _ in figure1.sweep("/data", runs_dir)[1:]:  # all but 'full' finished
        folder.mkdir(parents=True)
        (folder / "results.json").write_text("{}")
    figure1.main(["run", "--data-root", "/data", "--runs-dir", str(runs_dir), "--execute"])
    assert started == [str((runs_dir / "full").resolve())]
    monkeypatch.setattr(figure1.subprocess, "run", lambda command, cwd: type("Failed", (), {"returncode": 3})())
    with pytest.raises(DataError, match=r"^the run into \S+/full failed with status 3$"):
        figure1.main(["run", "--data-root", "/data", "--runs-dir", str(runs_dir), "--execute"])


def test_collect_refuses_an_output_that_is_no_png_file(tmp_path):
    (tmp_path / "out.png").mkdir()
    for output, message in (("figure.pdf", "expected a .png (or .jpg) file"),
                            (str(tmp_path / "out.png"), "a folder; expected the path of a PNG file")):
        with pytest.raises(ConfigError) as err:
            figure1.main(["collect", str(tmp_path), "--output", output])
        assert str(err.value) == f"--output {output}: {message}"
