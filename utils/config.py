"""Training configuration: built-in defaults < YAML file (``--config``) < command-line flags.

Every key of :data:`FIELDS` is a YAML key and a flag (``batch_size`` <-> ``--batch-size``); booleans
also take ``--no-<flag>``. The resolved configuration is an ``argparse.Namespace`` and is saved as YAML
next to the run's outputs.
"""
import argparse
import difflib
import re
from pathlib import Path

import yaml

from utils.errors import ConfigError
from utils.metrics import TRAIN_THRESHOLDS
from utils.optim import trainable_blocks

LR_SCHEDULES = ("constant", "cosine")
AREA_LOSS_SCOPES = ("global", "process")
EVAL_PROTOCOLS = ("auto", "sat", "wsol", "both", "cls")
# best.pth rule: 'loc' = Top-1 Loc + GT-known Loc, the official best_loc checkpoint (its evaluator and model zoo);
# maxboxaccv2 / pxap: wsolevaluation protocol (boxes / masks).
SELECTION_METRICS = ("loc", "top1_loc", "gt_known_loc", "top1_cls", "maxboxaccv2", "pxap")


class Field:
    """One config key: default, kind ('int', 'float', 'str', 'bool', 'floats', 'amp', 'pretrained',
    'area_scope'), whether ``null`` is allowed, allowed choices and help text."""

    def __init__(self, default, kind, help, nullable=False, choices=None):
        self.default, self.kind, self.help, self.nullable, self.choices = default, kind, help, nullable, choices


FIELDS = {
    # model
    "arch": Field("deit_sat_small_patch16_224", "str", "model architecture (Model.list_archs())"),
    "pretrained": Field(True, "pretrained", "true: DeiT ImageNet-1k weights via timm; false: random init; or a file"),
    "img_size": Field(224, "int", "input crop size"),
    "resize_size": Field(None, "int", "resize before cropping (default round(img_size * 256 / 224))", nullable=True),
    "drop_path": Field(0.1, "float", "stochastic depth rate"),
    "num_spatial_blocks": Field(3, "int", "number of final spatial-aware blocks"),
    "attn_impl": Field("fused", "str", "attention implementation", choices=("fused", "naive")),
    "area_thr": Field(0.25, "float", "area prior of the batch area loss (paper's lambda)"),
    "area_loss_scope": Field("global", "area_scope", "images the batch area loss averages over: global = one "
                                                     "micro-batch of every process (official CUB run: DataParallel, "
                                                     "256 images); process = each process's own micro-batch; N (an "
                                                     "integer) = groups of N images of the processes' micro-batches "
                                                     "in rank order, one term per group, averaged (official ImageNet "
                                                     "run: DDP, 128 images on each of its 4 GPUs: 128 on any number "
                                                     "of processes)"),
    # optimisation
    "epochs": Field(30, "int", "number of training epochs"),
    "batch_size": Field(256, "int", "GLOBAL batch per optimizer step (split over processes and accumulation)"),
    "accum_steps": Field(1, "int", "micro-batches per optimizer step (gradient accumulation); each micro-batch "
                                   "has its own batch area loss (over batch_size / accum_steps images), so K > 1 "
                                   "changes that loss; images per epoch are unchanged"),
    "lr": Field(1e-4, "float", "AdamW learning rate"),
    "min_lr": Field(1e-6, "float", "final learning rate of the cosine schedule"),
    "weight_decay": Field(0.05, "float", "AdamW weight decay (never on 1-D parameters and biases)"),
    "decay_tokens": Field(True, "bool", "weight decay also on cls_token, loc_token, pos_embed, loc_embed (official: "
                                        "its optimizer is built on the DataParallel/DDP wrapper, which hides the "
                                        "model's no_weight_decay(); false exempts them as DeiT does)"),
    "lr_schedule": Field("constant", "str", "constant (official behaviour) or cosine", choices=LR_SCHEDULES),
    "warmup_epochs": Field(0.0, "float", "linear warm-up epochs (either schedule)"),
    "clip_grad": Field(None, "float", "clip the gradient norm to this value", nullable=True),
    "trainable": Field("all", "str", "parameters to train: all, sat (spatial token + spatial-aware blocks + "
                                     "head), head, or last:K (spatial token + the last K blocks + head)"),
    # data
    "data_format": Field("cub", "str", "dataset layout",
                         choices=("cub", "imagenet", "wsol", "folder", "dogs", "cars", "aircraft")),
    "data_root": Field(None, "str", "dataset root (omitted: the synthetic demo dataset)", nullable=True),
    "metadata_root": Field(None, "str", "wsolevaluation metadata folder (<split>/image_ids.txt ...)", nullable=True),
    "val_boxes": Field(None, "str", "ImageNet val boxes (XML folder, LOC_val_solution.csv, val_gt.txt) or "
                                    "the folder format's boxes CSV", nullable=True),
    "val_split": Field(False, "bool", "select the model and threshold on the held-out 'val' split "
                                      "(wsolevaluation train-fullsup) instead of test"),
    "images_per_class": Field(None, "int", "few-shot: train on N images per class", nullable=True),
    "workers": Field(8, "int", "data loading processes per training process"),
    "drop_last": Field(False, "bool", "drop each epoch's last partial training batch (official: kept by train.py "
                                      "on CUB, dropped by train_ImageNet.py)"),
    "cache_images": Field(False, "bool", "keep each split's decoded, resized images in <output_dir>/image_cache "
                                         "(filled during the first epoch; same samples, later epochs skip decoding; "
                                         "CUB: 2.3 GB of disk / page cache); removed when the run finishes"),
    "check_train_split": Field(False, "bool", "also check every training image before the first step (the "
                                              "evaluation splits always are); bad ones are skipped, or an error "
                                              "with strict_data"),
    "strict_data": Field(False, "bool", "stop at an unreadable training image instead of skipping it with a warning"),
    "gpu_decode": Field(False, "bool", "decode JPEGs (batched nvJPEG on CUDA) and resize on the device instead of PIL "
                                       "in the workers; pixels differ slightly from PIL's (README, Performance)"),
    # evaluation
    "eval_thresholds": Field(list(TRAIN_THRESHOLDS), "floats", "CAM thresholds searched at each evaluation"),
    "eval_start_epoch": Field(26, "int", "first epoch (1-based) evaluated for model selection (official CUB: 26 "
                                         "of 30); the last epoch is always evaluated"),
    "eval_every": Field(1, "int", "from eval_start_epoch, evaluate every N epochs (and after the last)"),
    "eval_batch_size": Field(None, "int", "evaluation batch per process (default: the training micro-batch)",
                             nullable=True),
    "eval_protocol": Field("auto", "str", "how training evaluates: sat = official SAT protocol (needs boxes), wsol "
                                          "= wsolevaluation protocol (MaxBoxAcc/MaxBoxAccV2 with boxes, PxAP with "
                                          "masks), both, cls = classification only; auto = from the data (boxes -> "
                                          "sat, masks only -> wsol, neither -> cls), logged", choices=EVAL_PROTOCOLS),
    "selection_metric": Field("loc", "str", "metric choosing best.pth, the first epoch reaching its maximum: loc = "
                                            "Top-1 Loc + GT-known Loc (official best_loc), top1_loc, gt_known_loc, "
                                            "top1_cls, maxboxaccv2 or pxap; one the evaluation does not produce "
                                            "falls back (logged) to the protocol's first: loc, maxboxaccv2 or pxap, "
                                            "top1_cls", choices=SELECTION_METRICS),
    "threshold": Field(0.4, "float", "CAM threshold of the final test metrics in results.json (official "
                                     "evaluators: CUB 0.4, ImageNet 0.3)"),
    "test_tencrop": Field(True, "bool", "ten-crop classification in the final test evaluation (official: CUB yes, "
                                        "ImageNet no)"),
    "report_best_threshold": Field(False, "bool", "results.json also gets a 'best_threshold' section: the test "
                                                  "metrics at the best of eval_thresholds, chosen on the test "
                                                  "split itself (one more test pass)"),
    "save_images": Field(0, "int", "final test evaluation: save overlays of the first N test images"),
    # run
    "output_dir": Field("output/run", "str", "folder for checkpoints, logs, metrics and results"),
    "seed": Field(6, "int", "random seed (each process adds its rank)"),
    "device": Field("auto", "str", "auto (CUDA when available), cuda or cpu", choices=("auto", "cuda", "cpu")),
    "amp": Field(False, "amp", "mixed precision: false = fp32 (official); true = bf16 autocast (CUDA: fp16 + "
                               "grad scaler on GPUs without bf16; CPU: needs native bf16); auto = true where "
                               "supported, else fp32. The final test is always fp32"),
    "compile": Field(False, "bool", "torch.compile the model"),
    "save_every_steps": Field(None, "int", "also write last.pth every N optimizer steps, with the position in the "
                                           "epoch (--resume then continues mid-epoch); null: at each epoch's end only",
                              nullable=True),
    "log_every": Field(20, "int", "read the losses back (one host sync) and log every N optimizer steps"),
}


def _bool(text):
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(str(text).lower())
    if value is None:
        raise ValueError(text)
    return value


def _amp(text):
    return "auto" if str(text).lower() == "auto" else _bool(text)


def _area_scope(text):
    """'global', 'process' or a group size in images (>= 1)."""
    if text in AREA_LOSS_SCOPES:
        return text
    if re.fullmatch(r"\d+", str(text)) and int(text) >= 1:
        return int(text)
    raise ValueError(text)


def _pretrained(text):
    try:
        return _bool(text)
    except ValueError:
        return str(text)


CONVERTERS = {"int": int, "float": float, "str": str, "bool": _bool, "floats": float, "amp": _amp,
              "pretrained": _pretrained, "area_scope": _area_scope}


def _nullable(convert):
    def parse(text):
        return None if str(text).lower() in ("none", "null") else convert(text)
    parse.__name__ = convert.__name__
    return parse


def build_parser(description):
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False,
                                     epilog="Flags override the --config file, which overrides the built-in defaults.")
    parser.add_argument("--config", help="YAML file of config keys (default: train.py config/demo.yaml without "
                                         "--data-root, else config/CUB.yaml; train_ImageNet.py config/ILSVRC.yaml)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue a run: from PATH, or from <output-dir>/checkpoints/last.pth when no PATH")
    parser.add_argument("--overwrite", action="store_true", default=False,
                        help="start again in an --output-dir that holds a previous run (its checkpoints, metrics, "
                             "results, logs and images are deleted first); without it such a folder is refused")
    # torch.distributed.launch passes --local-rank (older versions --local_rank); torchrun sets LOCAL_RANK.
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    for key, field in FIELDS.items():
        flag = "--" + key.replace("_", "-")
        text = field.help if field.default is None else f"{field.help} (built-in default: {field.default})"
        if field.kind == "bool":
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, help=text)
        elif field.kind == "amp":
            parser.add_argument(flag, dest=key, nargs="?", const=True, type=_amp, help=text + "; --amp = true")
            parser.add_argument("--no-" + flag[2:], dest=key, action="store_false", help="same as --amp false")
        else:
            convert = _nullable(CONVERTERS[field.kind]) if field.nullable else CONVERTERS[field.kind]
            parser.add_argument(flag, dest=key, type=convert, nargs="+" if field.kind == "floats" else None,
                                choices=field.choices, metavar=None if field.choices else key.upper(), help=text)
    return parser


def _check_value(key, value, where):
    """The YAML value of ``key`` checked against its field (ints are accepted for floats)."""
    field = FIELDS[key]
    expected = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                "floats": "a list of numbers", "amp": "auto, true or false",
                "pretrained": "true, false or a file path",
                "area_scope": f"one of {', '.join(AREA_LOSS_SCOPES)} or a number of images >= 1"}[field.kind]
    if value is None and field.nullable:
        return None
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": is_number,
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "floats": isinstance(value, list) and bool(value)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
        "amp": isinstance(value, bool) or value == "auto",
        "pretrained": isinstance(value, (bool, str)),
        "area_scope": value in AREA_LOSS_SCOPES or (type(value) is int and value >= 1),
    }[field.kind]
    if not ok:
        raise ConfigError(f"{where}: {key} must be {expected}{' or null' if field.nullable else ''}, got {value!r}")
    if field.choices and value not in field.choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(field.choices)}, got {value!r}")
    if field.kind == "float":
        return float(value)
    if field.kind == "floats":
        return [float(v) for v in value]
    return value


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads numbers as YAML 1.2 does: ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _error_line(err):
    """1-based line of a YAML error: where the unfinished key, quote or bracket starts (PyYAML notices it
    lines later), else where the parser stopped."""
    context = getattr(err, "context", None) or ""
    mark = getattr(err, "context_mark", None) if "block" not in context else None
    mark = mark or getattr(err, "problem_mark", None)
    return mark.line + 1 if mark else None


def read_yaml_mapping(path):
    """A YAML file's top-level mapping ({} for an empty file); ConfigError naming the file (and line)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: not readable ({err.strerror})") from None
    except yaml.YAMLError as err:
        line = _error_line(err)
        where = f" line {line}" if line else ""
        raise ConfigError(f"config file {path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_yaml(path):
    """The keys of a config file, checked: unknown keys and wrong types raise ConfigError."""
    data = read_yaml_mapping(path)
    values = {}
    for key, value in data.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown key {key!r}{hint}")
        values[key] = _check_value(key, value, f"config file {path}")
    return values


def validate(cfg):
    """Range checks across keys; raise ConfigError naming the key."""
    positive = ("epochs", "batch_size", "accum_steps", "img_size", "eval_start_epoch", "eval_every", "log_every")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("images_per_class", "eval_batch_size", "resize_size", "save_every_steps"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1 or null, got {getattr(cfg, key)}")
    if cfg.img_size % 16:
        raise ConfigError(f"img_size must be a multiple of the patch size 16, got {cfg.img_size}")
    if cfg.resize_size is not None and cfg.resize_size < cfg.img_size:
        raise ConfigError(f"resize_size ({cfg.resize_size}) must be at least img_size ({cfg.img_size})")
    if not 0 < cfg.area_thr < 1:
        raise ConfigError(f"area_thr must be in (0, 1), got {cfg.area_thr}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.weight_decay < 0:
        raise ConfigError(f"lr must be > 0 and min_lr, weight_decay >= 0, got {cfg.lr}, {cfg.min_lr}, "
                          f"{cfg.weight_decay}")
    if cfg.warmup_epochs < 0:
        raise ConfigError(f"warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    if not 0 <= cfg.drop_path < 1:
        raise ConfigError(f"drop_path must be in [0, 1), got {cfg.drop_path}")
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        raise ConfigError(f"clip_grad must be > 0 or null, got {cfg.clip_grad}")
    if not all(0 <= t < 1 for t in cfg.eval_thresholds):
        raise ConfigError(f"eval_thresholds must lie in [0, 1), got {cfg.eval_thresholds}")
    trainable_blocks(cfg.trainable)
    if not 0 <= cfg.threshold < 1:
        raise ConfigError(f"threshold must lie in [0, 1), got {cfg.threshold}")
    if cfg.workers < 0 or cfg.save_images < 0:
        raise ConfigError(f"workers and save_images must be >= 0, got {cfg.workers}, {cfg.save_images}")


def parse_config(argv=None, description=None, default_config=None):
    """Defaults < ``--config`` file (or ``default_config(cli)`` when no file is given) < flags.

    Returns the resolved ``argparse.Namespace`` (config keys plus ``config``, ``resume``, ``overwrite``,
    ``local_rank``).
    """
    cli = vars(build_parser(description).parse_args(argv))
    config_file = cli.get("config") or (default_config(cli) if default_config else None)
    values = {key: field.default for key, field in FIELDS.items()}
    if config_file:
        values.update(load_yaml(config_file))
    values.update({key: value for key, value in cli.items() if key in FIELDS})
    cfg = argparse.Namespace(**values, config=str(config_file) if config_file else None,
                             resume=cli.get("resume"), overwrite=cli.get("overwrite", False),
                             local_rank=cli.get("local_rank"))
    validate(cfg)
    return cfg


def config_dict(cfg):
    """The config keys of ``cfg`` (what is saved and compared on resume)."""
    return {key: getattr(cfg, key) for key in FIELDS}


def save_config(cfg, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# resolved configuration (from {cfg.config or 'built-in defaults'} and command-line flags)\n"
    path.write_text(header + yaml.safe_dump(config_dict(cfg), sort_keys=False), encoding="utf-8")
