"""Config: defaults < YAML < flags, type checks with one-line errors, the shipped config files."""
import pytest
import yaml

from utils.config import FIELDS, load_yaml, parse_config, save_config
from utils.errors import ConfigError

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


def test_official_defaults():
    cub = parse_config(["--config", str(CONFIGS / "CUB.yaml")])
    assert (cub.lr, cub.batch_size, cub.epochs, cub.area_thr, cub.drop_path, cub.weight_decay, cub.seed) == \
        (1e-4, 256, 30, 0.25, 0.1, 0.05, 6)
    assert cub.lr_schedule == "constant" and cub.eval_thresholds == [0.3, 0.35, 0.4, 0.45]
    imagenet = parse_config(["--config", str(CONFIGS / "ILSVRC.yaml")])
    assert (imagenet.lr, imagenet.batch_size, imagenet.epochs, imagenet.area_thr) == (1.5e-5, 512, 1, 0.35)


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = write(tmp_path, "epochs: 3\nlr: 0.5\nval_split: true\n")
    cfg = parse_config(["--config", path, "--lr", "0.01", "--batch-size", "8", "--no-amp", "--no-val-split",
                        "--eval-thresholds", "0.2", "0.4", "--images-per-class", "2", "--clip-grad", "none",
                        "--pretrained", "weights.pth"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.amp, cfg.val_split) == (3, 0.01, 8, False, False)
    assert cfg.eval_thresholds == [0.2, 0.4] and cfg.images_per_class == 2 and cfg.clip_grad is None
    assert cfg.pretrained == "weights.pth" and cfg.weight_decay == FIELDS["weight_decay"].default
    assert parse_config(["--amp"]).amp is True and parse_config([]).amp == "auto"
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
    ("lr_schedule: step\n", "lr_schedule must be one of constant, cosine"),
    ("eval_thresholds: 0.4\n", "eval_thresholds must be a list of numbers"),
    ("- a\n- b\n", "expected a mapping"),
    ("epochs: [1\n", "invalid YAML"),
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


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        parse_config(["--config", "nope.yaml"])


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--lr-schedule", "step"])
    assert "invalid choice" in capsys.readouterr().err


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(["--config", str(CONFIGS / "demo.yaml"), "--epochs", "4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["epochs"] == 4
    again = parse_config(["--config", str(tmp_path / "config.yaml")])
    assert {k: getattr(again, k) for k in FIELDS} == {k: getattr(cfg, k) for k in FIELDS}
