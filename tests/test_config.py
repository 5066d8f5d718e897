"""Config: defaults < YAML < flags, type checks with one-line errors, the shipped config files."""
import pytest
import yaml

from utils.config import FIELDS, load_yaml, parse_config, save_config
from utils.errors import ConfigError
from DataLoader.eval_views import default_resize_size

from conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "config"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", ["CUB.yaml", "ILSVRC.yaml", "demo.yaml"])
def test_shipped_configs_list_every_key_and_load(name):
    values = load_yaml(CONFIGS / name)
    assert set(values) == set(FIELDS)


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
    threshold=0.4, test_tencrop=True,  # evaluator.py: --threshold [0.4], --tencrop True
    val_split=False, seed=6, amp=False)
OFFICIAL_IMAGENET = dict(
    OFFICIAL_CUB, area_thr=0.35, area_loss_scope=128,  # DDP: each of its 4 GPUs' own batch of 512 / 4
    epochs=1,  # `break  ## 1 epoch is enough`
    eval_start_epoch=1,  # it evaluates nothing while training: the one epoch is the last, evaluated anyway
    batch_size=512, lr=1.5e-5, drop_last=True, threshold=0.3, test_tencrop=False)  # evaluator_ImageNet.py
for _official in (OFFICIAL_CUB, OFFICIAL_IMAGENET):
    del _official["pretrained"]  # a key of ours; both official scripts load DeiT weights (pretrained=True)


@pytest.mark.parametrize("argv, official", [
    ([], OFFICIAL_CUB),  # built-in defaults
    (["--config", str(CONFIGS / "CUB.yaml")], OFFICIAL_CUB),
    (["--config", str(CONFIGS / "ILSVRC.yaml")], OFFICIAL_IMAGENET),
])
def test_official_defaults(argv, official):
    cfg = parse_config(argv)
    cfg.resize_size = cfg.resize_size or default_resize_size(cfg.img_size)  # null: 256/224 x img_size
    assert {key: getattr(cfg, key) for key in official} == official
    assert cfg.pretrained is True


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = write(tmp_path, "epochs: 3\nlr: 0.5\nval_split: true\n")
    cfg = parse_config(["--config", path, "--lr", "0.01", "--batch-size", "8", "--no-amp", "--no-val-split",
                        "--eval-thresholds", "0.2", "0.4", "--images-per-class", "2", "--clip-grad", "none",
                        "--pretrained", "weights.pth"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.amp, cfg.val_split) == (3, 0.01, 8, False, False)
    assert cfg.eval_thresholds == [0.2, 0.4] and cfg.images_per_class == 2 and cfg.clip_grad is None
    assert cfg.pretrained == "weights.pth" and cfg.weight_decay == FIELDS["weight_decay"].default
    assert parse_config(["--amp"]).amp is True and parse_config([]).amp is False
    assert parse_config(["--amp", "auto"]).amp == "auto"
    assert parse_config(["--pretrained", "false"]).pretrained is False


def test_resume_and_launcher_arguments():
    assert parse_config([]).resume is None
    assert parse_config(["--resume"]).resume == "auto"
    assert parse_config(["--resume", "x/last.pth"]).resume == "x/last.pth"
    # torch.distributed.launch passes --local-rank=N (older: --local_rank=N)
    assert parse_config(["--local-rank=1"]).local_rank == 1
    assert parse_config(["--local_rank", "3"]).local_rank == 3


def test_default_config_file_is_used_without_config(tmp_path):
    path = write(tmp_path, "epochs: 7\n")
    assert parse_config([], default_config=lambda cli: path).epochs == 7
    assert parse_config(["--epochs", "2"], default_config=lambda cli: path).epochs == 2


@pytest.mark.parametrize("text, message", [
    ("epochz: 3\n", "unknown key 'epochz' (did you mean epochs?)"),
    ("epochs: 2.5\n", "epochs must be an integer"),
    ("lr: fast\n", "lr must be a number"),
    ("amp: maybe\n", "amp must be auto, true or false"),
    ("selection_metric: best\n", "selection_metric must be one of loc, top1_loc"),
    ("area_loss_scope: node\n", "area_loss_scope must be one of global, process or a number of images >= 1"),
    ("area_loss_scope: 0\n", "area_loss_scope must be one of global, process or a number of images >= 1"),
    ("lr_schedule: step\n", "lr_schedule must be one of constant, cosine"),
    ("eval_thresholds: 0.4\n", "eval_thresholds must be a list of numbers"),
    ("- a\n- b\n", "expected a mapping"),
    ("epochs: [1\n", "invalid YAML"),
    ("epochs: 3\nlr: 1e-4\nbatch_size 8\nseed: 1\nworkers: 2\n", "line 3: invalid YAML"),
])
def test_bad_yaml_values_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="c.yaml") as err:
        parse_config(["--config", path])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--area-thr", "1.5"], "area_thr must be in (0, 1)"),
    (["--img-size", "100"], "multiple of the patch size"),
    (["--warmup-epochs", "-1"], "warmup_epochs must be >= 0"),
    (["--eval-thresholds", "1.2"], "eval_thresholds must lie in [0, 1)"),
])
def test_range_checks(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert message in str(err.value)


def test_yaml_numbers_in_exponent_notation(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; config files accept it as the number it is
    cfg = parse_config(["--config", write(tmp_path, "lr: 1e-3\nmin_lr: 5E-7\nweight_decay: 1.0e-2\n")])
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay) == (1e-3, 5e-7, 1e-2)


def test_abbreviated_flags_are_rejected(capsys):
    for flag in ("--epoch", "--lr-schedul"):
        with pytest.raises(SystemExit):
            parse_config([flag, "3"])
        assert "unrecognized arguments" in capsys.readouterr().err


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        parse_config(["--config", "nope.yaml"])


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--lr-schedule", "step"])
    assert "invalid choice" in capsys.readouterr().err


def test_area_loss_scope_takes_a_name_or_a_group_size(tmp_path, capsys):
    assert parse_config(["--area-loss-scope", "process"]).area_loss_scope == "process"
    assert parse_config(["--area-loss-scope", "64"]).area_loss_scope == 64
    assert parse_config(["--config", write(tmp_path, "area_loss_scope: 32\n")]).area_loss_scope == 32
    for bad in ("0", "node", "1.5"):
        with pytest.raises(SystemExit):
            parse_config(["--area-loss-scope", bad])
        assert "argument --area-loss-scope" in capsys.readouterr().err


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(["--config", str(CONFIGS / "demo.yaml"), "--epochs", "4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["epochs"] == 4
    again = parse_config(["--config", str(tmp_path / "config.yaml")])
    assert {k: getattr(again, k) for k in FIELDS} == {k: getattr(cfg, k) for k in FIELDS}
