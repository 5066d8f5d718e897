"""Config: one schema for training and evaluation; defaults < config file (with base:) < flags; one-line
errors for bad flags, values and renamed keys; the shipped config files; docs/config.md is current."""
import argparse

import pytest
import yaml

from DataLoader import FORMATS
from DataLoader.build import LAYOUTS, LOADERS
from DataLoader.eval_views import PROTOCOLS, default_resize_size
from Model.sat import ATTENTION_IMPLS
from utils.config import FIELDS, SECTIONS, keys_of, load_yaml, markdown, parse_config, save_config
from utils.errors import ConfigError, run_cli
from utils.selection import selection_metrics

from conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "config"
TRAINING_KEYS = {key for key, field in FIELDS.items() if field.section != "evaluator"}


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return str(path)


def train(*argv):
    return parse_config(list(argv), "train")


def evaluate(*argv, script="evaluate"):
    return parse_config(list(argv), script)


def test_every_key_has_a_section_and_a_description():
    for key, field in FIELDS.items():
        assert field.section in SECTIONS and field.help, key
    assert set(keys_of("train")) == set(keys_of("train_imagenet")) == TRAINING_KEYS


@pytest.mark.parametrize("name", ["CUB.yaml", "ILSVRC.yaml"])
def test_official_configs_list_every_training_key(name):
    assert "base:" not in (CONFIGS / name).read_text(), f"{name} is complete: no base"
    listed = set(load_yaml(CONFIGS / name))
    assert listed == TRAINING_KEYS, f"{name}: missing {sorted(TRAINING_KEYS - listed)}, unknown " \
                                    f"{sorted(listed - TRAINING_KEYS)}"


@pytest.mark.parametrize("name, base, differs", [
    ("Dogs.yaml", "CUB.yaml", {"data_format", "output_dir"}),
    ("Cars.yaml", "CUB.yaml", {"data_format", "output_dir"}),
    ("Aircraft.yaml", "CUB.yaml", {"data_format", "output_dir"}),
    ("ILSVRC_fewshot.yaml", "ILSVRC.yaml", {"images_per_class", "epochs", "batch_size", "eval_every", "output_dir"}),
])
def test_derived_configs_state_only_what_differs(name, base, differs):
    values, parent = load_yaml(CONFIGS / name), load_yaml(CONFIGS / base)
    stated = set(yaml.safe_load((CONFIGS / name).read_text())) - {"base"}
    assert stated == differs == {key for key in values if values[key] != parent[key]}
    assert set(values) == set(parent)


# The official code's values (wpy1999/SAT train.py + evaluator.py for CUB, train_ImageNet.py +
# evaluator_ImageNet.py for ImageNet), written out by hand: a default that drifts fails here.
OFFICIAL_CUB = dict(
    arch="deit_sat_small_patch16_224", pretrained=True, img_size=224, resize_size=256, drop_path=0.1, area_thr=0.25,
    area_loss_scope="global",  # nn.DataParallel gathers the per-image areas of the whole batch
    epochs=30, batch_size=256, accum_steps=1, lr=1e-4, weight_decay=0.05, lr_schedule="constant", warmup_epochs=0,
    clip_grad=None, trainable="all",
    decay_tokens=True,  # create_optimizerv2(args, nn.DataParallel(model)): the wrapper hides no_weight_decay()
    drop_last=False,  # its CUB train DataLoader has no drop_last
    eval_thresholds=[0.3, 0.35, 0.4, 0.45], eval_start_epoch=26, eval_every=1,  # evaluate_epoch=25: `epoch >= 25`
    selection_metric="loc",  # best_loc.pth.tar: top1_acc + gt_acc, the file its evaluator loads
    threshold=0.4, tencrop=True,  # evaluator.py: --threshold [0.4], --tencrop True
    val_split=False, seed=6, amp=False)
OFFICIAL_IMAGENET = dict(
    OFFICIAL_CUB, area_thr=0.35, area_loss_scope=128,  # DDP: each of its 4 GPUs' own batch of 512 / 4
    epochs=1,  # `break  ## 1 epoch is enough`
    eval_start_epoch=1,  # it evaluates nothing while training: the one epoch is the last, evaluated anyway
    batch_size=512, lr=1.5e-5, drop_last=True, threshold=0.3, tencrop=False)  # evaluator_ImageNet.py
# Both official evaluators: fp32, the centre crop of Resize((256, 256)) (null: from the checkpoint).
OFFICIAL_EVALUATOR = dict(threshold=0.4, tencrop=True, amp=False, thresholds=[], eval_protocol="auto",
                          resize_size=None, arch=None)


def _official(cfg):
    values = {key: getattr(cfg, key) for key in OFFICIAL_CUB}
    values["resize_size"] = values["resize_size"] or default_resize_size(values["img_size"])  # null: 256/224 x
    return values


@pytest.mark.parametrize("argv, script, official", [
    (["--data-root", "d"], "train", OFFICIAL_CUB),  # no --config: config/CUB.yaml
    (["--config", str(CONFIGS / "CUB.yaml")], "train", OFFICIAL_CUB),
    (["--config", str(CONFIGS / "Dogs.yaml")], "train", OFFICIAL_CUB),
    (["--data-root", "d"], "train_imagenet", OFFICIAL_IMAGENET),  # no --config: config/ILSVRC.yaml
    (["--config", str(CONFIGS / "ILSVRC.yaml")], "train", OFFICIAL_IMAGENET),
])
def test_official_training_defaults(argv, script, official):
    assert _official(parse_config(argv, script)) == official


def test_train_imagenet_config_of_its_own_starts_from_the_official_imagenet_settings(tmp_path, capsys):
    own = write(tmp_path, "output_dir: out\n", "mine.yaml")  # no base: (it started from CUB's area_thr, lr, ...)
    assert _official(parse_config(["--config", own], "train_imagenet")) == OFFICIAL_IMAGENET
    with pytest.raises(SystemExit):  # and --help shows those values
        parse_config(["--help"], "train_imagenet")
    assert "(default: 1.5e-05)" in " ".join(capsys.readouterr().out.split())


def test_built_in_defaults_are_the_official_cub_ones():
    assert _official(argparse.Namespace(**{key: field.default for key, field in FIELDS.items()})) == OFFICIAL_CUB


def test_official_evaluator_defaults():
    cub = evaluate("--checkpoint", "c.pth")
    assert {key: getattr(cub, key) for key in OFFICIAL_EVALUATOR} == OFFICIAL_EVALUATOR
    assert (cub.data_format, cub.eval_batch_size, cub.output_dir, cub.split) == ("cub", 32, "output/eval", "test")
    imagenet = evaluate("--checkpoint", "c.pth", "--data-root", "d", script="evaluate_imagenet")
    assert {key: getattr(imagenet, key) for key in OFFICIAL_EVALUATOR} == dict(OFFICIAL_EVALUATOR, threshold=0.3,
                                                                                tencrop=False)
    assert not hasattr(imagenet, "data_format") and not hasattr(imagenet, "split")


def test_no_config_is_said_on_stdout(capsys):
    assert train().config == str(CONFIGS / "demo.yaml")
    assert capsys.readouterr().out == "no --config: using config/demo.yaml\n"
    train("--data-root", "d")
    assert capsys.readouterr().out == "no --config: using config/CUB.yaml\n"
    parse_config(["--data-root", "d"], "train_imagenet")
    assert capsys.readouterr().out == "no --config: using config/ILSVRC.yaml\n"
    train("--config", str(CONFIGS / "CUB.yaml"))
    evaluate("--checkpoint", "c")
    assert capsys.readouterr().out == ""


def test_resume_without_config_reads_the_runs_own(tmp_path, capsys, monkeypatch):
    """A plain --resume goes on with the run's settings (it took the defaults' config: demo.yaml's 60 epochs and
    3 blocks for a run of 4 epochs and 4 blocks); the checkpoint's own run folder when resumed elsewhere."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("# resolved\narch: deit_sat_nano_patch16_224\nnum_spatial_blocks: 4\nepochs: 4\n"
                                     f"output_dir: {run}\n")
    cfg = train("--output-dir", str(run), "--resume")
    assert (cfg.config, cfg.num_spatial_blocks, cfg.epochs) == (str(run / "config.yaml"), 4, 4)
    assert capsys.readouterr().out == f"no --config: using {run / 'config.yaml'} (the resumed run's own)\n"
    cfg = train("--output-dir", str(tmp_path / "new"), "--resume", str(run / "checkpoints" / "last.pth"),
                "--epochs", "6")
    assert (cfg.config, cfg.num_spatial_blocks, cfg.epochs) == (str(run / "config.yaml"), 4, 6)
    assert cfg.output_dir == str(tmp_path / "new")  # --output-dir given: continued there (from the other's weights)
    # no --output-dir: the run goes on in its folder, which its config.yaml names relative to where it started
    (run / "config.yaml").write_text("epochs: 4\noutput_dir: out/run\n")
    cfg = train("--resume", str(run / "checkpoints" / "last.pth"), "--epochs", "6")
    assert (cfg.config, cfg.output_dir, cfg.epochs) == (str(run / "config.yaml"), str(run), 6)
    monkeypatch.chdir(tmp_path)  # in the folder it started in: kept as recorded (config.yaml and the checkpoint)
    (run / "config.yaml").write_text("epochs: 4\noutput_dir: run\n")
    assert train("--resume", str(run / "checkpoints" / "last.pth")).output_dir == "run"
    assert train("--output-dir", str(tmp_path / "new")).config == str(CONFIGS / "demo.yaml")  # no --resume
    assert train("--output-dir", str(tmp_path / "none"), "--resume").config == str(CONFIGS / "demo.yaml")
    (tmp_path / "config.yaml").write_text("epochs: 9\n")  # beside a download, not a run's: not read
    cfg = train("--output-dir", str(tmp_path / "none"), "--resume", str(tmp_path / "downloads" / "best.pth"))
    assert cfg.config == str(CONFIGS / "demo.yaml")


def test_a_relative_path_of_a_run_started_elsewhere_names_that_folder(tmp_path, monkeypatch):
    """A run started in A with --data-root mydata, resumed from B: its config.yaml's data_root was read from B and
    failed far into the start as 'data root mydata: not found', naming neither A nor what to do."""
    started, elsewhere = tmp_path / "A", tmp_path / "B"
    (started / "mydata").mkdir(parents=True)
    (started / "runs" / "r1").mkdir(parents=True)
    elsewhere.mkdir()
    config = started / "runs" / "r1" / "config.yaml"
    config.write_text("epochs: 4\noutput_dir: runs/r1\ndata_root: mydata\n")
    last = str(started / "runs" / "r1" / "checkpoints" / "last.pth")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError, match=rf"^data_root: mydata \(config file {config}\) is relative to {started}, "
                       rf"where the run was started, and not found from this folder \({elsewhere}\): run from "
                       rf"{started}, or give --data-root {started / 'mydata'}$"):
        train("--resume", last)
    with pytest.raises(ConfigError, match="is relative to"):
        train("--config", str(config))  # a new run with the run's config.yaml: the same
    assert train("--resume", last, "--data-root", str(started / "mydata")).data_root == str(started / "mydata")
    (elsewhere / "mydata").mkdir()  # found from here: read from here, as any relative path
    assert train("--resume", last).data_root == "mydata"
    monkeypatch.chdir(started)
    (elsewhere / "mydata").rmdir()
    assert train("--resume", last).data_root == "mydata"


def test_a_relative_pretrained_path_of_a_run_started_elsewhere_is_not_refused_on_resume(tmp_path, monkeypatch):
    """A resumed checkpoint's run reads no pretrained weights (train.py: only a run that starts anew): its
    config.yaml's relative pretrained path, found only from where the run was started, was refused all the same."""
    started, elsewhere = tmp_path / "A", tmp_path / "B"
    (started / "runs" / "r1" / "checkpoints").mkdir(parents=True)
    (started / "deit.pth").write_bytes(b"")
    elsewhere.mkdir()
    config = started / "runs" / "r1" / "config.yaml"
    config.write_text("output_dir: runs/r1\npretrained: deit.pth\n")
    last = started / "runs" / "r1" / "checkpoints" / "last.pth"
    last.write_bytes(b"")
    monkeypatch.chdir(elsewhere)
    assert train("--resume", str(last)).pretrained == "deit.pth"
    assert train("--resume", "--output-dir", str(started / "runs" / "r1")).pretrained == "deit.pth"
    with pytest.raises(ConfigError, match=r"^pretrained: deit.pth \(config file .*\) is relative to "):
        train("--config", str(config))  # a new run reads them


def test_resume_naming_a_run_folder_is_one_line_before_the_data_is_read(tmp_path):
    """--resume RUN (the folder, not its checkpoint) read no config.yaml: the run took the defaults' config, read
    (or generated) the demo data and built the model before 'checkpoint RUN: a folder, not a checkpoint file'."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        train("--resume", str(run))
    assert str(err.value) == f"--resume {run}: a folder, not a checkpoint file; to continue the run it holds: " \
                             f"--output-dir {run} --resume (or --resume {run / 'checkpoints' / 'last.pth'})"


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    path = write(tmp_path, "epochs: 3\nlr: 0.5\nval_split: true\ntencrop: false\n")
    cfg = train("--config", path, "--lr", "0.01", "--batch-size", "8", "--no-amp", "--no-val-split",
                "--eval-thresholds", "0.2", "0.4", "--images-per-class", "2", "--clip-grad", "none",
                "--pretrained", "weights.pth", "--overlays", "all")
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.amp, cfg.val_split, cfg.tencrop) == (3, 0.01, 8, False, False,
                                                                                        False)
    assert cfg.eval_thresholds == [0.2, 0.4] and cfg.images_per_class == 2 and cfg.clip_grad is None
    assert cfg.pretrained == "weights.pth" and cfg.weight_decay == FIELDS["weight_decay"].default
    assert cfg.overlays == "all" and train("--overlays", "5").overlays == 5
    assert train("--area-loss-scope", "process").area_loss_scope == "process"
    assert train("--area-loss-scope", "64").area_loss_scope == 64
    assert train("--amp").amp is True and train().amp is False and train("--amp", "auto").amp == "auto"
    assert train("--pretrained", "false").pretrained is False



@pytest.mark.parametrize("key, word, value", [
    ("amp", "Auto", "auto"), ("amp", "on", True), ("amp", "1", True), ("amp", '"true"', True), ("amp", "off", False),
    ("pretrained", '"true"', True), ("pretrained", "on", True), ("pretrained", "0", False),
    ("pretrained", "weights.pth", "weights.pth"), ("resize_size", "None", None), ("resize_size", '"null"', None),
])
def test_a_word_means_the_same_in_a_config_file_and_as_a_flag(tmp_path, key, word, value):
    """amp: Auto was refused while --amp AUTO was auto; pretrained: "true" was a weights file named 'true'
    while --pretrained true was true; --amp on was refused while amp: on was true."""
    from_file = getattr(train("--config", write(tmp_path, f"{key}: {word}\n")), key)
    from_flag = getattr(train("--" + key.replace("_", "-"), word.strip('"')), key)
    assert from_file == from_flag == value and type(from_file) is type(value)
    with pytest.raises(ConfigError, match=r"^config file .*c.yaml: amp must be true, false or auto, got maybe$"):
        train("--config", write(tmp_path, 'amp: "maybe"\n'))
    with pytest.raises(ConfigError, match=r"^--amp: expected true, false or auto, got 'maybe'$"):
        train("--amp", "maybe")

def test_a_key_is_named_as_it_was_given(tmp_path):
    # messages name a key as the user gave it: the warm-up warning said 'warmup_epochs 3 > epochs 2' for the demo
    # config's warmup_epochs and a flag --epochs 2
    from utils.config import given_as
    cfg = train("--epochs", "2")  # no --config: config/demo.yaml (base: CUB.yaml)
    demo, cub = REPO_ROOT / "config" / "demo.yaml", REPO_ROOT / "config" / "CUB.yaml"
    assert (given_as(cfg, "epochs"), given_as(cfg, "warmup_epochs"), given_as(cfg, "area_thr")) == (
        "--epochs 2", f"warmup_epochs: 3 (config file {demo})", f"area_thr: 0.25 (config file {demo})")
    assert given_as(cfg, "weight_decay") == f"weight_decay: 0.05 (config file {cub})"
    assert given_as(train("--config", write(tmp_path, "epochs: 3\n")), "seed") == "seed: 6 (default)"


def test_resume_and_launcher_arguments():
    assert train().resume is None and train().overwrite is False
    assert train("--resume").resume == "auto" and train("--overwrite").overwrite is True
    assert train("--resume", "x/last.pth").resume == "x/last.pth"
    # torch.distributed.launch passes --local-rank=N (older: --local_rank=N)
    assert train("--local-rank=1").local_rank == 1
    assert train("--local_rank", "3").local_rank == 3


def test_evaluator_reads_a_training_config_without_translation(tmp_path):
    config = write(tmp_path, "data_root: /data\ndata_format: wsol\nmetadata_root: /meta\nepochs: 3\nlr: 0.001\n"
                             "batch_size: 512\neval_batch_size: 6\neval_protocol: both\nthreshold: 0.35\n"
                             "tencrop: false\noverlays: 4\narch: deit_sat_tiny_patch16_224\nresize_size: 300\n"
                             "workers: 0\namp: true\noutput_dir: run\ndevice: cpu\n")
    args = evaluate("--config", config, "--checkpoint", "c.pth")
    # data, evaluation and test keys are read
    assert (args.data_root, args.data_format, args.metadata_root) == ("/data", "wsol", "/meta")
    assert (args.eval_batch_size, args.eval_protocol, args.threshold, args.tencrop, args.overlays) == \
        (6, "both", 0.35, False, 4)
    # the model comes from the checkpoint and the run from the evaluator's own flags
    assert (args.arch, args.resize_size, args.amp, args.output_dir, args.device) == (None, None, False, "output/eval",
                                                                                     "auto")
    assert args.workers == FIELDS["workers"].evaluator_default
    assert args.ignored_config_keys == ["epochs", "lr", "batch_size", "arch", "resize_size", "workers", "amp",
                                        "output_dir", "device"]
    flags = evaluate("--config", config, "--checkpoint", "c.pth", "--arch", "deit_sat_nano_patch16_224", "--amp",
                     "--eval-batch-size", "3", "--output-dir", "o")
    assert (flags.arch, flags.amp, flags.eval_batch_size, flags.output_dir) == \
        ("deit_sat_nano_patch16_224", True, 3, "o")


def test_evaluator_config_file_over_its_script_defaults(tmp_path):
    config = write(tmp_path, "checkpoint: c.pth\nthresholds: [0.5, 0.3]\neval_batch_size: 4\n")
    imagenet = evaluate("--config", config, "--data-root", "d", script="evaluate_imagenet")
    assert (imagenet.checkpoint, imagenet.thresholds, imagenet.eval_batch_size) == ("c.pth", [0.5, 0.3], 4)
    assert (imagenet.threshold, imagenet.tencrop) == (0.3, False)  # config/ILSVRC.yaml's, not the built-in ones
    assert imagenet.ignored_config_keys == []
    ilsvrc = evaluate("--config", str(CONFIGS / "ILSVRC.yaml"), "--checkpoint", "c", "--data-root", "d",
                      script="evaluate_imagenet")
    assert ilsvrc.threshold == 0.3 and "data_format" in ilsvrc.ignored_config_keys


def test_training_ignores_evaluator_keys(tmp_path):
    cfg = train("--config", write(tmp_path, "epochs: 2\ncheckpoint: c.pth\nthresholds: [0.3]\n"))
    assert cfg.epochs == 2 and cfg.ignored_config_keys == ["checkpoint", "thresholds"]
    assert not hasattr(cfg, "checkpoint")


def test_base_config_is_inherited_relative_to_the_file(tmp_path):
    write(tmp_path, "epochs: 5\nlr: 0.01\nseed: 1\n", "configs/parent.yaml")
    write(tmp_path, "base: parent.yaml\nlr: 0.02\n", "configs/child.yaml")
    grandchild = write(tmp_path, "base: configs/child.yaml\nseed: 3\n", "grandchild.yaml")
    assert load_yaml(grandchild) == {"epochs": 5, "lr": 0.02, "seed": 3}
    cfg = train("--config", grandchild, "--seed", "4")
    assert (cfg.epochs, cfg.lr, cfg.seed, cfg.batch_size) == (5, 0.02, 4, FIELDS["batch_size"].default)


def test_home_in_paths_is_expanded_as_the_shell_would(tmp_path, monkeypatch):
    # ~ in a config file (or in --flag=~/..., which the shell leaves as it is) was read as a folder named '~'
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, "epochs: 5\n", "configs/parent.yaml")
    write(tmp_path, "base: ~/configs/parent.yaml\ndata_root: ~/data/CUB\npretrained: ~/deit.pth\n", "c.yaml")
    cfg = train("--config=~/c.yaml", "--output-dir=~/out", "--resume=~/out/checkpoints/last.pth")
    assert (cfg.epochs, cfg.data_root, cfg.pretrained, cfg.output_dir, cfg.resume) == (
        5, f"{tmp_path}/data/CUB", f"{tmp_path}/deit.pth", f"{tmp_path}/out", f"{tmp_path}/out/checkpoints/last.pth")
    cfg = evaluate("--checkpoint=~/best.pth", "--save-maps=~/maps", "--data-root", "~user_unknown/x")
    assert (cfg.checkpoint, cfg.save_maps) == (f"{tmp_path}/best.pth", f"{tmp_path}/maps")
    assert cfg.data_root == "~user_unknown/x"  # an unknown user's ~ stays, as in the shell
    # the tools' own flags (tools/predict.py --output-dir=~/out made a folder named '~')
    from utils.config import OneLineParser
    parser = OneLineParser()
    parser.add_argument("--output-dir")
    parser.add_argument("--note")
    assert vars(parser.parse_args(["--output-dir=~/out", "--note=a~b"])) == {"output_dir": f"{tmp_path}/out",
                                                                              "note": "a~b"}


@pytest.mark.parametrize("files, message", [
    ({"c.yaml": "base: a.yaml\n", "a.yaml": "base: c.yaml\n"}, "a.yaml: base c.yaml includes this file again"),
    ({"c.yaml": "base: c.yaml\n"}, "c.yaml: base c.yaml includes this file again"),
    ({"c.yaml": "base: missing.yaml\n"}, "c.yaml: base missing.yaml: "),
    ({"c.yaml": "base: a.yaml\n", "a.yaml": "epochz: 1\n"}, "a.yaml: unknown key 'epochz'"),
    ({"c.yaml": "base: [a.yaml]\n"}, "c.yaml: base must be a config file path"),
])
def test_bad_base_names_the_file(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path, text, name)
    with pytest.raises(ConfigError) as err:
        train("--config", str(tmp_path / "c.yaml"))
    assert message in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("epochz: 3\n", "unknown key 'epochz' (did you mean epochs?)"),
    ("epochs: 2.5\n", "epochs must be an integer >= 1, got 2.5"),
    ("epochs: 0\n", "epochs must be an integer >= 1, got 0"),
    ("lr: fast\n", "lr must be a number > 0"),
    ("amp: maybe\n", "amp must be true, false or auto"),
    ("threshold: 1.5\n", "threshold must be a number in [0, 1], got 1.5"),
    ("area_thr: 1\n", "area_thr must be a number in (0, 1)"),
    ("overlays: -2\n", "overlays must be all or an integer >= 0"),
    ("selection_metric: best\n", "selection_metric must be one of loc, top1_loc"),
    ("area_loss_scope: node\n", "area_loss_scope must be global, process or an integer >= 1, got node"),
    ("area_loss_scope: 0\n", "area_loss_scope must be global, process or an integer >= 1, got 0"),
    ("eval_thresholds: 0.4\n", "eval_thresholds must be a list of numbers in [0, 1]"),
    ("eval_thresholds: []\n", "eval_thresholds must be a list of numbers in [0, 1] (at least one), got []"),
    ("img_size: 100\n", "img_size must be an integer >= 16 (a multiple of 16), got 100"),
    ("lr: .inf\n", "lr must be a number > 0, got .inf"),
    ("trainable: last:x\n", "trainable must be all, sat, head or last:K, got last:x"),
    ("lr: 1e-4\nepochs: 3\nlr: 1e-3\n", "c.yaml line 3: invalid YAML (key lr given twice)"),
    ("test_tencrop: false\n", "test_tencrop was renamed: use tencrop"),
    ("save_images: 4\n", "save_images was renamed: use overlays (overlays are written to <output_dir>/overlays/)"),
    ("epochz: 3\nlr: 1e-4\ntest_tencrop: false\nzzz: 1\n", "c.yaml: unknown key 'epochz' (did you mean epochs?); "
     "test_tencrop was renamed: use tencrop; unknown key 'zzz'"),  # every one in the line, in file order
    ("- a\n- b\n", "expected a mapping"),
    ("# caf\xe9\nepochs: 1\n".encode("latin-1"), "not UTF-8 text (byte 5)"),
    ("epochs: [1\n", "invalid YAML"),
    ("epochs: 3\nlr: 1e-4\nbatch_size 8\nseed: 1\nworkers: 2\n", "line 3: invalid YAML"),
])
def test_bad_config_values_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    for script in ("train", "evaluate"):
        with pytest.raises(ConfigError, match="c.yaml") as err:
            parse_config(["--config", path, "--checkpoint", "c"] if script == "evaluate" else ["--config", path],
                         script)
        assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["", "# settings to come\n"])
def test_an_empty_config_file_sets_nothing(tmp_path, text):
    """A config file with no key (empty, or comments alone) is read as no setting: the built-in defaults."""
    cfg = train("--config", write(tmp_path, text), "--data-root", "d")
    assert {key: getattr(cfg, key) for key in TRAINING_KEYS if key not in ("data_root",)} == \
        {key: FIELDS[key].default for key in TRAINING_KEYS if key not in ("data_root",)}


@pytest.mark.parametrize("script, argv, message", [
    ("train", ["--epoch", "1"], "unknown flag --epoch (did you mean --epochs?)"),
    ("train", ["--lr-schedul", "cosine"], "unknown flag --lr-schedul (did you mean --lr-schedule?)"),
    ("train", ["--checkpoint", "c"], "unknown flag --checkpoint (train.py does not take it; evaluator.py and "
                                     "evaluator_ImageNet.py do)"),
    ("train", ["extra"], "unexpected argument 'extra'"),
    ("train", ["--val-split", "true"], "--val-split takes no value (--no-val-split for false), got 'true'"),
    ("train", ["--overwrite", "yes"], "--overwrite takes no value, got 'yes'"),
    ("train", ["--no-val-split", "false"], "--no-val-split takes no value (--val-split for true), got 'false'"),
    ("train", ["--epochs", "5", "--val-split", "5"], "--val-split takes no value (--no-val-split for false), got "
                                                     "'5'"),
    ("train", ["--img-size", "100"], "--img-size: expected an integer >= 16 (a multiple of 16), got '100'"),
    ("train", ["--trainable", "some"], "--trainable: expected all, sat, head or last:K, got 'some'"),
    ("train", ["--epochs", "x"], "--epochs: expected an integer >= 1, got 'x'"),
    ("train", ["--epochs", "0"], "--epochs: expected an integer >= 1, got '0'"),
    # torch.manual_seed raised a traceback after the output folder was set up
    ("train", ["--seed", "99999999999999999999"], "--seed: expected an integer in [0, 4294967295], got "
                                                 "'99999999999999999999'"),
    ("train", ["--num-spatial-blocks", "0"], "--num-spatial-blocks: expected an integer >= 1, got '0'"),
    ("train", ["--epochs"], "--epochs: expected one argument"),
    # refused when parsed (they were said after the data was read and checked)
    ("train", ["--arch", "deit_tiny"], "unknown arch 'deit_tiny' (--arch deit_tiny); known: "
                                      "deit_sat_base_patch16_224, deit_sat_nano_patch16_224, "
                                      "deit_sat_small_patch16_224, deit_sat_tiny_patch16_224"),
    ("train", ["--arch", "deit_sat_nano_patch16_224", "--num-spatial-blocks", "7"],
     "num_spatial_blocks must be in [1, 6] (the depth of deit_sat_nano_patch16_224): --num-spatial-blocks 7"),
    ("evaluate", ["--arch", "deit_small"], "unknown arch 'deit_small' (--arch deit_small); known: "),
    ("train", ["--arch", "deit_sat_nano_patch16_224", "--trainable", "last:7"],
     "trainable last:K must have K <= 6 (the depth of deit_sat_nano_patch16_224): --trainable last:7"),
    ("train", ["--lr-schedule", "step"], "--lr-schedule: expected one of constant, cosine, got 'step'"),
    ("train", ["--area-loss-scope", "1.5"], "--area-loss-scope: expected global, process or an integer >= 1, got "
                                            "'1.5'"),
    ("train", ["--area-thr", "1.5"], "--area-thr: expected a number in (0, 1), got '1.5'"),
    # not finite: --lr inf trained to a NaN loss, after --overwrite had deleted the previous run
    ("train", ["--lr", "inf"], "--lr: expected a number > 0, got 'inf'"),
    ("train", ["--weight-decay", "1e400"], "--weight-decay: expected a number >= 0, got '1e400'"),
    ("train", ["--min-lr", "inf"], "--min-lr: expected a number >= 0, got 'inf'"),
    ("train", ["--warmup-epochs", "inf"], "--warmup-epochs: expected a number >= 0, got 'inf'"),
    ("train", ["--eval-thresholds", "0.3", "nan"], "--eval-thresholds: expected numbers in [0, 1], got 'nan'"),
    ("train", ["--eval-thresholds", "0.3", "1.2"], "--eval-thresholds: expected numbers in [0, 1], got '1.2'"),
    ("train", ["--save-images", "4"], "--save-images was renamed: use --overlays N (overlays are written to "
                                      "<output-dir>/overlays/)"),
    ("train", ["--no-test-tencrop"], "--no-test-tencrop was renamed: use --no-tencrop"),
    ("train", ["--no-epochs"], "unknown flag --no-epochs (--epochs is not a true/false flag: give it a value)"),
    # the key's spelling (and the official code's): was "train.py does not take it; train.py ... do"
    ("train", ["--data_root", "d"], "unknown flag --data_root (did you mean --data-root?)"),
    ("train", ["--no-val_split"], "unknown flag --no-val_split (did you mean --no-val-split?)"),
    ("evaluate", ["--eval_batch_size", "4"], "unknown flag --eval_batch_size (did you mean --eval-batch-size?)"),
    ("evaluate", ["--threshold", "1.5"], "--threshold: expected a number in [0, 1], got '1.5'"),
    ("evaluate", ["--thresholds", "0.3", "-0.2"], "--thresholds: expected numbers in [0, 1], got '-0.2'"),
    ("evaluate", ["--thresh", "0.3"], "unknown flag --thresh (did you mean --threshold?)"),
    ("evaluate", ["--batch", "4"], "unknown flag --batch (did you mean --eval-batch-size?)"),
    ("evaluate", ["--epochs", "3"], "unknown flag --epochs (evaluator.py does not take it; train.py and "
                                    "train_ImageNet.py do)"),
    ("evaluate", ["--format", "dogs"], "--format was renamed: use --data-format"),
    ("evaluate", ["--batch-size", "4"], "--batch-size was renamed: use --eval-batch-size N"),
    ("evaluate", ["--save-images", "d"], "--save-images was renamed: use --overlays N (overlays are written to "
                                         "<output-dir>/overlays/)"),
    ("evaluate", ["--max-images", "3"], "--max-images was renamed: use --overlays N (overlays are written to "
                                        "<output-dir>/overlays/)"),
    ("evaluate", ["--save-scoremaps", "d"], "--save-scoremaps was renamed: use --save-maps DIR"),
    ("evaluate", ["--overlays", "some"], "--overlays: expected all or an integer >= 0, got 'some'"),
    ("evaluate", ["--wsol-threshold", "0.555"], "--wsol-threshold: expected a number in [0, 0.99] (one of "
                                                "wsolevaluation's map thresholds 0, 0.01, ..., 0.99) or null, got "
                                                "'0.555'"),  # it failed after the whole evaluation
    ("evaluate", ["--data-format", "imagenet"], "--data-format imagenet: use evaluator_ImageNet.py"),
    ("evaluate_imagenet", ["--data-format", "cub"], "unknown flag --data-format (evaluator_ImageNet.py does not "
                                                    "take it; train.py, train_ImageNet.py and evaluator.py do)"),
    ("evaluate_imagenet", ["--format", "cub"], "--format was renamed --data-format, which evaluator_ImageNet.py "
                                               "does not take (train.py, train_ImageNet.py and evaluator.py do)"),
    ("evaluate_imagenet", ["--split", "val"], "unknown flag --split (evaluator_ImageNet.py does not take it; "
                                              "evaluator.py does)"),
])
def test_flag_errors_are_one_line(capsys, script, argv, message):
    common = {"train": [], "evaluate": ["--checkpoint", "c"], "evaluate_imagenet": ["--checkpoint", "c",
                                                                                    "--data-root", "d"]}[script]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda a: parse_config(a, script), common + argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("script, argv, message", [
    ("evaluate", [], "--checkpoint is required"),
    ("evaluate", ["--checkpoint", "c", "--maps", "m"], "--checkpoint and --maps exclude each other"),
    ("evaluate_imagenet", ["--checkpoint", "c"], "--data-root is required"),
    ("train", ["--img-size", "224", "--resize-size", "200"], "resize_size must be at least img_size: --resize-size "
                                                             "200, --img-size 224"),
    ("train", ["--resume", "--overwrite"], "--resume continues the run in --output-dir and --overwrite deletes it"),
    ("train_imagenet", ["--data-format", "cub"], "--data-format cub: train_ImageNet.py reads only the ImageNet "
                                                 "layout (ILSVRC2012); train.py reads the other formats"),
])
def test_checks_across_keys(script, argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(argv, script)
    assert message in str(err.value)


def test_checks_across_keys_name_the_config_file_or_the_default(tmp_path):
    path = write(tmp_path, "resize_size: 100\n")
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", path], "train")
    assert str(err.value) == f"resize_size must be at least img_size: resize_size: 100 (config file {path}), " \
                             "img_size: 224 (default); give --resize-size N >= 224, or --resize-size null (the " \
                             "official 256/224 of img_size)"
    child = write(tmp_path, "base: c.yaml\nimg_size: 112\n", "child.yaml")  # the file that gave each key
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", child], "train")
    assert str(err.value).startswith(f"resize_size must be at least img_size: resize_size: 100 (config file "
                                     f"{path}), img_size: 112 (config file {child}); give --resize-size N >= 112")
    # a config file given to train_ImageNet.py may name another format: its model and schedule settings apply
    assert parse_config(["--config", str(REPO_ROOT / "config" / "CUB.yaml")], "train_imagenet").data_format == "cub"


def test_help_keeps_the_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--help"], "evaluate_imagenet")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: evaluator_ImageNet.py")
    assert "--threshold T" in out and "(default: 0.3)" in out and "--data-format" not in out
    # the formats a script takes: evaluator.py refuses imagenet, train_ImageNet.py reads only it
    for script, formats in (("evaluate", "{cub,wsol,folder,dogs,cars,aircraft}"), ("train_imagenet", "{imagenet}"),
                            ("train", "{cub,imagenet,wsol,folder,dogs,cars,aircraft}")):
        with pytest.raises(SystemExit):
            parse_config(["--help"], script)
        out = " ".join(capsys.readouterr().out.split())
        assert f"--data-format {formats} dataset format" in out
        assert ("(default: imagenet)" if script == "train_imagenet" else "(default: cub)") in out


def test_yaml_merge_keys_and_non_scalar_keys(tmp_path):
    path = write(tmp_path, "<<: {lr: 0.001, epochs: 3}\nseed: 7\n")
    assert {key: load_yaml(path)[key] for key in ("lr", "epochs", "seed")} == {"lr": 0.001, "epochs": 3, "seed": 7}
    with pytest.raises(ConfigError, match=r"c.yaml line 1: invalid YAML \(found unhashable key\)"):
        load_yaml(write(tmp_path, "? [a, b]\n: 1\n"))


def test_yaml_numbers_in_exponent_notation(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; config files accept it as the number it is
    cfg = train("--config", write(tmp_path, "lr: 1e-3\nmin_lr: 5E-7\nweight_decay: 1.0e-2\n"))
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay) == (1e-3, 5e-7, 1e-2)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        train("--config", "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = train("--config", str(CONFIGS / "demo.yaml"), "--epochs", "4")
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["epochs"] == 4 and set(saved) == TRAINING_KEYS
    again = train("--config", str(tmp_path / "config.yaml"))
    assert {k: getattr(again, k) for k in TRAINING_KEYS} == {k: getattr(cfg, k) for k in TRAINING_KEYS}
    # strings that this project's loader reads as numbers (YAML 1.2 floats): a run named by its learning rate
    cfg = train("--config", str(CONFIGS / "demo.yaml"), "--output-dir", "1e-4", "--data-root", "2.5e3",
                "--pretrained", "1e5")
    save_config(cfg, tmp_path / "config.yaml")
    again = train("--config", str(tmp_path / "config.yaml"))
    assert (again.output_dir, again.data_root, again.pretrained) == ("1e-4", "2.5e3", "1e5")


def test_saved_config_keeps_each_resume_line_once_and_a_new_run_none(tmp_path):
    # a resume that failed before its first checkpoint, resumed again with the same flags, wrote its line twice;
    # a new run in a folder whose config.yaml was left (its checkpoints deleted by hand) kept the old run's lines
    path, line = tmp_path / "config.yaml", "# resumed after 1 epoch(s), trained with the values before: epochs 1 -> 2"
    resumed = train("--config", str(CONFIGS / "demo.yaml"), "--resume")
    for _ in range(2):
        save_config(resumed, path, line)
        with open(path, "ab") as f:  # edited by hand in Latin-1: a UnicodeDecodeError traceback on the next resume
            f.write("# \u00e1rea\n".encode("latin-1"))
    assert [text for text in path.read_text(errors="replace").splitlines() if text.startswith("# resumed")] == [line]
    save_config(train("--config", str(CONFIGS / "demo.yaml")), path)
    assert not [text for text in path.read_text(errors="replace").splitlines() if text.startswith("# resumed")]


def test_resume_lines_spell_values_as_config_yaml_does():
    # config.yaml says clip_grad: null; its resume line said 'clip_grad 1.0 -> None', Python's spelling
    from utils.checkpoint import Resumed
    assert Resumed(epoch=1, changed=[("clip_grad", 1.0, None), ("tencrop", True, False)]).changed_line() == \
        "# resumed after 1 epoch(s), trained with the values before: clip_grad 1.0 -> null, tencrop true -> false"


def test_reference_page_is_current():
    # regenerate with: python -m utils.config --markdown > docs/config.md
    assert (REPO_ROOT / "docs" / "config.md").read_text() == markdown()


def test_choice_lists_are_those_of_the_code_that_reads_them():
    assert FIELDS["data_format"].choices == FORMATS
    assert set(LAYOUTS) == set(FORMATS)  # each format's expected layout, for its error lines
    assert set(LOADERS) | {"imagenet", "folder", "wsol"} == set(FORMATS)  # a reader each (three take more arguments)
    assert FIELDS["eval_protocol"].choices == ("auto", *PROTOCOLS)
    assert FIELDS["attn_impl"].choices == ATTENTION_IMPLS
    every_selection = {metric for protocol in PROTOCOLS for annotations in ("boxes", "masks", None)
                       for metric in selection_metrics(protocol, annotations)}
    assert set(FIELDS["selection_metric"].choices) == every_selection


@pytest.mark.parametrize("script, example", [("train", "    python train.py --config config/CUB.yaml --data-root"),
                                             ("train_imagenet", "    torchrun --nproc_per_node 8 train_ImageNet.py"),
                                             ("evaluate", "    python evaluator.py --checkpoint"),
                                             ("evaluate_imagenet", "    python evaluator_ImageNet.py --data-root")])
def test_help_starts_with_what_the_script_is_for_and_an_example(capsys, monkeypatch, script, example):
    monkeypatch.setenv("COLUMNS", "80")  # argparse's width
    with pytest.raises(SystemExit):
        parse_config(["--help"], script)
    out = capsys.readouterr().out
    lines = out.split("options:")[0].splitlines()
    assert any(line.startswith(example) for line in lines), out  # kept on one line, as a shell takes it
    assert max(len(line) for line in out.split("options:")[1].splitlines()) <= 80  # the rest wrapped as before
